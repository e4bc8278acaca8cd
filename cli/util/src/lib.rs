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

/// Milliseconds since the epoch as RFC 3339 UTC (`2026-11-27T16:31:35.123Z`).
pub fn rfc3339_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// One log line as both CLIs print it: `TIME APP[TYPE.JOB]: MESSAGE`.
pub fn log_line(ts: u64, app: &str, proc_type: &str, job: &str, msg: &str) -> String {
    format!("{} {app}[{proc_type}.{job}]: {msg}", rfc3339_ms(ts))
}

#[cfg(test)]
mod tests {
    #[test]
    fn t10_timestamps_are_rfc3339_utc() {
        assert_eq!(super::rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            super::rfc3339_ms(951_782_400_001),
            "2000-02-29T00:00:00.001Z"
        );
        assert_eq!(
            super::rfc3339_ms(1_795_796_895_123),
            "2026-11-27T16:28:15.123Z"
        );
    }
}
