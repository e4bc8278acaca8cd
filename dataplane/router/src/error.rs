//! One classified error for every way a proxied request can fail, in the manner of
//! pingora's: what went wrong, which side it came from, and whether the request may be tried
//! again elsewhere. Both protocols answer from it, so a failure reads the same over HTTP/1.1
//! and HTTP/2.

/// Which side of the proxy failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client: a body that stopped coming, a connection gone.
    Downstream,
    /// The backend: unreachable, too slow, a broken response.
    Upstream,
    /// The router's own state: no route, no live instance.
    Internal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No route for the host and path.
    NoRoute,
    /// The route has no live backend.
    NoLiveBackend,
    /// Every backend refused or timed out the connection.
    Unreachable,
    /// The backend did not answer in time.
    UpstreamTimeout,
    /// The connection to the backend failed (reset, closed) before a whole response head.
    UpstreamFailed,
    /// The backend's response cannot be passed on safely.
    BadResponse(&'static str),
    /// The client's request body failed: the status to answer with.
    ClientBody(u16),
    /// The client went away: nothing to answer.
    ClientGone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyError {
    pub kind: ErrorKind,
    /// Nothing of the request reached a backend in a way that could have acted on it, and the
    /// request is safe to send again: another connection or backend may be tried.
    pub retryable: bool,
}

impl ProxyError {
    pub fn new(kind: ErrorKind) -> Self {
        ProxyError {
            kind,
            retryable: false,
        }
    }

    pub fn side(&self) -> Side {
        match self.kind {
            ErrorKind::NoRoute | ErrorKind::NoLiveBackend => Side::Internal,
            ErrorKind::ClientBody(_) | ErrorKind::ClientGone => Side::Downstream,
            _ => Side::Upstream,
        }
    }

    /// The status the client gets; `None` when there is no one to answer.
    pub fn status(&self) -> Option<u16> {
        Some(match self.kind {
            ErrorKind::NoRoute => 404,
            ErrorKind::NoLiveBackend | ErrorKind::Unreachable => 503,
            ErrorKind::UpstreamTimeout => 504,
            ErrorKind::UpstreamFailed | ErrorKind::BadResponse(_) => 502,
            ErrorKind::ClientBody(status) => status,
            ErrorKind::ClientGone => return None,
        })
    }

    /// What the answer's body says.
    pub fn why(&self) -> &'static str {
        match self.kind {
            ErrorKind::NoRoute => "no route for this host and path",
            ErrorKind::NoLiveBackend => "no live backend for this route",
            ErrorKind::Unreachable => "no backend could be reached",
            ErrorKind::UpstreamTimeout => "backend did not answer in time",
            ErrorKind::UpstreamFailed => "backend failed",
            ErrorKind::BadResponse(why) => why,
            ErrorKind::ClientBody(_) => "request body not received",
            ErrorKind::ClientGone => "client went away",
        }
    }

    /// Whether the client connection can carry another request after this answer: not when
    /// the backend or the client broke mid-exchange (what remains on the connection is
    /// unknown).
    pub fn keeps_connection(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::NoRoute | ErrorKind::NoLiveBackend | ErrorKind::Unreachable
        )
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} ({:?}): {}", self.kind, self.side(), self.why())
    }
}

impl std::error::Error for ProxyError {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend_h1::UpstreamError;

    #[test]
    fn t10_each_kind_answers_its_status_and_side() {
        let cases = [
            (ErrorKind::NoRoute, Some(404), Side::Internal),
            (ErrorKind::NoLiveBackend, Some(503), Side::Internal),
            (ErrorKind::Unreachable, Some(503), Side::Upstream),
            (ErrorKind::UpstreamTimeout, Some(504), Side::Upstream),
            (ErrorKind::UpstreamFailed, Some(502), Side::Upstream),
            (ErrorKind::ClientBody(408), Some(408), Side::Downstream),
            (ErrorKind::ClientGone, None, Side::Downstream),
        ];
        for (kind, status, side) in cases {
            let e = ProxyError::new(kind);
            assert_eq!((e.status(), e.side()), (status, side), "{kind:?}");
        }
    }

    #[test]
    fn t11_only_failures_before_any_response_byte_are_retryable() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(ProxyError::from(UpstreamError::ClosedEarly).retryable);
        assert!(ProxyError::from(UpstreamError::Io(reset, true)).retryable);
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(!ProxyError::from(UpstreamError::Io(reset, false)).retryable);
        assert!(!ProxyError::from(UpstreamError::Timeout).retryable);
        assert!(!ProxyError::from(UpstreamError::Malformed).retryable);
    }
}
