//! What both probes share: finding the end of a head and its Content-Length.

/// End of the head (index after CRLFCRLF) if complete.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// The Content-Length of a response head (0 if absent).
pub fn content_length(head: &[u8]) -> usize {
    let text = std::str::from_utf8(head).unwrap_or("");
    text.split("\r\n")
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}

/// A complete response in `buf`: its total length.
pub fn response_len(buf: &[u8]) -> Option<usize> {
    let end = head_end(buf)?;
    let total = end + content_length(&buf[..end]);
    (buf.len() >= total).then_some(total)
}

pub fn args() -> (std::net::SocketAddr, std::net::SocketAddr) {
    let a: Vec<String> = std::env::args().collect();
    (a[1].parse().expect("LISTEN"), a[2].parse().expect("UPSTREAM"))
}
