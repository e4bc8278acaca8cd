//! The answers the router gives itself (errors, refusals), the same for HTTP/1 and HTTP/2
//! clients: the operator's page for 503s when configured, else a JSON body.

use crate::worker::Worker;

pub fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// An error response, whole, for an HTTP/1.1 client, and its body's length.
pub fn error_response(w: &Worker, status: u16, why: &str, close: bool) -> (Vec<u8>, u64) {
    let (ctype, body) = error_body(w, status, why);
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n{}\r\n",
        reason(status),
        body.len(),
        if close { "connection: close\r\n" } else { "" }
    )
    .into_bytes();
    out.extend_from_slice(&body);
    (out, body.len() as u64)
}

/// The body of an answer the router gives itself, and its content type: the operator's
/// page for 503s when one is configured, else `{"error": ..., "status": ...}`.
pub fn error_body(w: &Worker, status: u16, why: &str) -> (&'static str, Vec<u8>) {
    match (&w.shared.page_503, status) {
        (Some(page), 503) => ("text/html; charset=utf-8", page.clone()),
        _ => (
            "application/json",
            format!("{{\"error\":{},\"status\":{status}}}", json_string(why)).into_bytes(),
        ),
    }
}

pub fn json_string(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}
