//! probe-tokio LISTEN UPSTREAM: a current-thread tokio runtime (epoll), one task per client.
use runtime_probe::{args, head_end, response_len};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() {
    let (listen, upstream) = args();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let l = tokio::net::TcpListener::bind(listen).await.unwrap();
        loop {
            let (mut c, _) = l.accept().await.unwrap();
            tokio::task::spawn_local(async move {
                let _ = c.set_nodelay(true);
                let mut u = tokio::net::TcpStream::connect(upstream).await.unwrap();
                let _ = u.set_nodelay(true);
                let mut cb = Vec::with_capacity(16384);
                let mut ub = Vec::with_capacity(16384);
                loop {
                    let end = loop {
                        if let Some(e) = head_end(&cb) {
                            break e;
                        }
                        if c.read_buf(&mut cb).await.unwrap_or(0) == 0 {
                            return;
                        }
                    };
                    if u.write_all(&cb[..end]).await.is_err() {
                        return;
                    }
                    cb.drain(..end);
                    let len = loop {
                        if let Some(n) = response_len(&ub) {
                            break n;
                        }
                        if u.read_buf(&mut ub).await.unwrap_or(0) == 0 {
                            return;
                        }
                    };
                    if c.write_all(&ub[..len]).await.is_err() {
                        return;
                    }
                    ub.drain(..len);
                }
            });
        }
    });
}
