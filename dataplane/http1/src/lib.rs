//! HTTP/1.1 for the router: parsing request heads and deciding body framing, strict about
//! everything that request smuggling and resource exhaustion are built from.
//!
//! Every refusal is an [`Http1Error`] with the status the router answers (then closes).

pub mod chunked;

pub use chunked::{ChunkedDecoder, Decoded};

/// Limits on what a client may send before its body.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest request line (method, target, version): beyond it, 414.
    pub max_request_line: usize,
    /// Largest head (request line + headers): beyond it, 431.
    pub max_head: usize,
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_line: 8 * 1024,
            max_head: 64 * 1024,
            max_headers: 100,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Http1Error {
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("request line longer than {0} bytes")]
    UriTooLong(usize),
    #[error("request head larger than {0} bytes or more than the header limit")]
    HeadersTooLarge(usize),
    #[error("ambiguous body framing: {0}")]
    Smuggling(&'static str),
    #[error("unsupported transfer coding")]
    UnsupportedCoding,
    #[error("bad chunked encoding: {0}")]
    BadChunk(&'static str),
}

impl Http1Error {
    /// The status the router answers with before closing the connection.
    pub fn status(&self) -> u16 {
        match self {
            Http1Error::UriTooLong(_) => 414,
            Http1Error::HeadersTooLarge(_) => 431,
            Http1Error::UnsupportedCoding => 501,
            Http1Error::Malformed(_) | Http1Error::Smuggling(_) | Http1Error::BadChunk(_) => 400,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    pub headers: Vec<Header>,
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

impl RequestHead {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_slice())
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_slice())
    }

    /// The body framing, per RFC 9112 §6.3, refusing every ambiguous shape instead of
    /// picking one (a proxy and its backend must never disagree on where a request ends).
    pub fn framing(&self) -> Result<BodyFraming, Http1Error> {
        let te: Vec<&[u8]> = self.all("transfer-encoding").collect();
        let cl: Vec<&[u8]> = self.all("content-length").collect();
        if !te.is_empty() {
            if !cl.is_empty() {
                return Err(Http1Error::Smuggling(
                    "both Transfer-Encoding and Content-Length",
                ));
            }
            if self.minor_version == 0 {
                return Err(Http1Error::Smuggling("Transfer-Encoding in HTTP/1.0"));
            }
            // Only a single `chunked` coding is accepted: anything else (gzip, a repeated
            // chunked, chunked not last) is a coding this proxy will not frame by.
            let codings: Vec<String> = te
                .iter()
                .flat_map(|v| v.split(|b| *b == b','))
                .map(|c| String::from_utf8_lossy(c).trim().to_ascii_lowercase())
                .filter(|c| !c.is_empty())
                .collect();
            return match codings.as_slice() {
                [only] if only == "chunked" => Ok(BodyFraming::Chunked),
                _ => Err(Http1Error::UnsupportedCoding),
            };
        }
        let mut length: Option<u64> = None;
        for v in cl {
            // Repeated values (in one header or several) must all agree.
            for part in v.split(|b| *b == b',') {
                let part = trim(part);
                if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                    return Err(Http1Error::Smuggling("invalid Content-Length"));
                }
                let n: u64 = std::str::from_utf8(part)
                    .expect("digits")
                    .parse()
                    .map_err(|_| Http1Error::Smuggling("invalid Content-Length"))?;
                match length {
                    Some(prev) if prev != n => {
                        return Err(Http1Error::Smuggling("conflicting Content-Lengths"))
                    }
                    _ => length = Some(n),
                }
            }
        }
        Ok(match length {
            Some(0) | None => BodyFraming::None,
            Some(n) => BodyFraming::Length(n),
        })
    }

    /// Whether the client keeps the connection open after this request.
    pub fn keep_alive(&self) -> bool {
        let conn = self.connection_tokens();
        if self.minor_version == 0 {
            conn.iter().any(|t| t == "keep-alive")
        } else {
            !conn.iter().any(|t| t == "close")
        }
    }

    pub fn expects_continue(&self) -> bool {
        self.header("expect")
            .is_some_and(|v| trim(v).eq_ignore_ascii_case(b"100-continue"))
    }

    fn connection_tokens(&self) -> Vec<String> {
        self.all("connection")
            .flat_map(|v| v.split(|b| *b == b','))
            .map(|t| String::from_utf8_lossy(trim(t)).to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    }

    /// Removes hop-by-hop headers (RFC 9110 §7.6.1), including any the Connection header
    /// names, before the request goes upstream. `Upgrade` is kept when the request asks to
    /// upgrade (the router splices those connections).
    pub fn strip_hop_by_hop(&mut self) {
        let named = self.connection_tokens();
        let upgrading = named.iter().any(|t| t == "upgrade");
        self.headers.retain(|h| {
            let n = h.name.to_ascii_lowercase();
            let hop = matches!(
                n.as_str(),
                "connection"
                    | "keep-alive"
                    | "proxy-connection"
                    | "proxy-authenticate"
                    | "proxy-authorization"
                    | "te"
                    | "trailer"
                    | "transfer-encoding"
            ) || (n == "upgrade" && !upgrading)
                || (named.contains(&n) && n != "upgrade");
            !hop
        });
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// The most header lines a request may have, whatever [`Limits::max_headers`] says.
pub const MAX_HEADER_SLOTS: usize = 256;

/// Parses a request head from the start of `buf`. `Ok(None)`: incomplete, read more (the
/// limits are enforced on what has arrived so far, so a slow client cannot grow the buffer
/// past them). `Ok(Some((head, n)))`: the head took `n` bytes.
pub fn parse_request(
    buf: &[u8],
    limits: &Limits,
) -> Result<Option<(RequestHead, usize)>, Http1Error> {
    // The request line: refuse an overlong one before parsing anything else.
    match buf.iter().position(|b| *b == b'\n') {
        Some(eol) if eol > limits.max_request_line => {
            return Err(Http1Error::UriTooLong(limits.max_request_line))
        }
        None if buf.len() > limits.max_request_line => {
            return Err(Http1Error::UriTooLong(limits.max_request_line))
        }
        _ => {}
    }
    // Bare CR anywhere in the head is refused (httparse would accept some placements).
    let head_end = find_head_end(buf);
    let scanned = &buf[..head_end.unwrap_or(buf.len())];
    if has_bare_cr(scanned) {
        return Err(Http1Error::Malformed("bare CR"));
    }
    if head_end.is_none() && buf.len() > limits.max_head {
        return Err(Http1Error::HeadersTooLarge(limits.max_head));
    }
    // Uninitialised header slots on the stack: no allocation and no clearing per request.
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADER_SLOTS];
    let slots = &mut slots[..limits.max_headers.min(MAX_HEADER_SLOTS)];
    let mut req = httparse::Request::new(&mut []);
    let status = match req.parse_with_uninit_headers(buf, slots) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Http1Error::HeadersTooLarge(limits.max_head))
        }
        Err(httparse::Error::Version) => return Err(Http1Error::Malformed("HTTP version")),
        Err(httparse::Error::Token | httparse::Error::Status) => {
            return Err(Http1Error::Malformed("request line"))
        }
        Err(_) => return Err(Http1Error::Malformed("header")),
    };
    let n = match status {
        httparse::Status::Partial => return Ok(None),
        httparse::Status::Complete(n) => n,
    };
    if n > limits.max_head {
        return Err(Http1Error::HeadersTooLarge(limits.max_head));
    }
    let method = req.method.ok_or(Http1Error::Malformed("method"))?;
    let target = req.path.ok_or(Http1Error::Malformed("target"))?;
    if target.is_empty() {
        return Err(Http1Error::Malformed("empty target"));
    }
    let headers = req
        .headers
        .iter()
        .map(|h| Header {
            name: h.name.to_string(),
            value: h.value.to_vec(),
        })
        .collect::<Vec<_>>();
    if headers
        .iter()
        .any(|h| h.value.iter().any(|b| *b == b'\n' || *b == b'\r'))
    {
        return Err(Http1Error::Malformed("obs-fold"));
    }
    let head = RequestHead {
        method: method.to_string(),
        target: target.to_string(),
        minor_version: req.version.ok_or(Http1Error::Malformed("version"))?,
        headers,
    };
    let hosts = head.all("host").count();
    if head.minor_version == 1 && hosts != 1 {
        return Err(Http1Error::Malformed(
            "HTTP/1.1 needs exactly one Host header",
        ));
    }
    if hosts > 1 {
        return Err(Http1Error::Malformed("repeated Host header"));
    }
    Ok(Some((head, n)))
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn has_bare_cr(buf: &[u8]) -> bool {
    buf.iter()
        .enumerate()
        .any(|(i, b)| *b == b'\r' && buf.get(i + 1).is_some_and(|n| *n != b'\n'))
}

#[cfg(test)]
mod tests;
