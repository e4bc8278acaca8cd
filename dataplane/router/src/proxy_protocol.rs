//! PROXY protocol v1 (HAProxy's text form): a load balancer in front of the router sends
//! `PROXY TCP4 <src> <dst> <sport> <dport>\r\n` before the client's bytes. The line is read
//! exactly (peeked, then consumed), so what follows, TLS included, is left untouched.

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::io::AsyncReadExt;

use crate::io::Stream;

/// Longest v1 line, CRLF included (the spec's bound).
const MAX_LINE: usize = 107;

/// Reads the PROXY line. `Some(addr)`: the client's address; `None`: `PROXY UNKNOWN` (keep
/// the socket's peer). An error: no valid line (the connection should be closed).
pub async fn read(stream: &mut Stream) -> io::Result<Option<SocketAddr>> {
    let mut peek = [0u8; MAX_LINE];
    let len = loop {
        let n = match stream.peek(&mut peek).await {
            Ok(n) => n,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(i) = peek[..n].windows(2).position(|w| w == b"\r\n") {
            break i + 2;
        }
        if n >= MAX_LINE || !b"PROXY ".starts_with(&peek[..n.min(6)]) {
            return Err(bad("no PROXY line"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    };
    let parsed = parse(&peek[..len])?;
    // Consume exactly the line: it was peeked, so these bytes are already here.
    let mut line = [0u8; MAX_LINE];
    stream.read_exact(&mut line[..len]).await?;
    Ok(parsed)
}

fn bad(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

/// Parses one line, CRLF included.
pub fn parse(line: &[u8]) -> io::Result<Option<SocketAddr>> {
    let text = std::str::from_utf8(line).map_err(|_| bad("PROXY line not ASCII"))?;
    let text = text
        .strip_suffix("\r\n")
        .ok_or_else(|| bad("PROXY line without CRLF"))?;
    let parts: Vec<&str> = text.split(' ').collect();
    match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(None),
        ["PROXY", proto @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src.parse().map_err(|_| bad("PROXY source address"))?;
            if (*proto == "TCP4") != ip.is_ipv4() {
                return Err(bad("PROXY address family"));
            }
            let port: u16 = sport.parse().map_err(|_| bad("PROXY source port"))?;
            Ok(Some(SocketAddr::new(ip, port)))
        }
        _ => Err(bad("malformed PROXY line")),
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn t10_proxy_lines() {
        let a = parse(b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(a.to_string(), "192.0.2.1:56324");
        let a = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 80\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(a.to_string(), "[2001:db8::1]:4000");
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap(), None);
        for bad in [
            &b"PROXY TCP4 2001:db8::1 1.2.3.4 1 2\r\n"[..],
            b"PROXY TCP4 1.2.3.4 1.2.3.4 99999 2\r\n",
            b"PROXY TCP4 1.2.3.4\r\n",
            b"GET / HTTP/1.1\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
