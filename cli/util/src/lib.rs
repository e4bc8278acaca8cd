//! Shared pieces of the `flynn` and `flynn-host` binaries.

/// Prints rows as left-aligned columns under a header.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Runs `main`, printing any error as one line on stderr with a non-zero exit.
pub fn run_main(prog: &str, main: impl std::future::Future<Output = anyhow::Result<()>>) -> ! {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(main);
    // Tasks still running (openraft's state-machine worker owns the Raft store) are dropped
    // here, so RocksDB closes before the process exits: exiting with it open runs C++
    // destructors under its live threads and aborts ("terminate called ...").
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("{prog}: {msg}");
            std::process::exit(1)
        }
    }
}
