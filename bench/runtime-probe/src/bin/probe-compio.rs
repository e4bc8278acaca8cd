//! probe-compio LISTEN UPSTREAM: compio's io_uring driver, one task per client, owned
//! buffers passed to the kernel and back (completion style).
use compio::io::{AsyncRead, AsyncWriteExt};
use compio::BufResult;
use runtime_probe::{args, head_end, response_len};

#[compio::main]
async fn main() {
    let (listen, upstream) = args();
    let l = compio::net::TcpListener::bind(listen).await.unwrap();
    loop {
        let (mut c, _) = l.accept().await.unwrap();
        compio::runtime::spawn(async move {
            let _ = c.set_nodelay(true);
            let mut u = compio::net::TcpStream::connect(upstream).await.unwrap();
            let _ = u.set_nodelay(true);
            let mut cb: Vec<u8> = Vec::with_capacity(16384);
            let mut ub: Vec<u8> = Vec::with_capacity(16384);
            let mut chunk: Vec<u8> = Vec::with_capacity(16384);
            loop {
                let end = loop {
                    if let Some(e) = head_end(&cb) {
                        break e;
                    }
                    chunk.clear();
                    let BufResult(r, back) = c.read(chunk).await;
                    chunk = back;
                    match r {
                        Ok(0) | Err(_) => return,
                        Ok(_) => cb.extend_from_slice(&chunk),
                    }
                };
                let out: Vec<u8> = cb[..end].to_vec();
                let BufResult(r, _) = u.write_all(out).await;
                if r.is_err() {
                    return;
                }
                cb.drain(..end);
                let len = loop {
                    if let Some(n) = response_len(&ub) {
                        break n;
                    }
                    chunk.clear();
                    let BufResult(r, back) = u.read(chunk).await;
                    chunk = back;
                    match r {
                        Ok(0) | Err(_) => return,
                        Ok(_) => ub.extend_from_slice(&chunk),
                    }
                };
                let out: Vec<u8> = ub[..len].to_vec();
                let BufResult(r, _) = c.write_all(out).await;
                if r.is_err() {
                    return;
                }
                ub.drain(..len);
            }
        })
        .detach();
    }
}
