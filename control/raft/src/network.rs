//! Raft RPCs between hosts: JSON, authenticated by the cluster secret.
//!
//! AppendEntries and Vote go over a lasting stream per peer connection ([`crate::stream`]);
//! snapshot chunks, and every RPC to a peer that does not offer the stream (an older
//! build), go as HTTP requests. The server side lives with the daemon's HTTP router; it
//! answers each path below with the JSON of `Result<Response, RaftError>`, so remote Raft
//! errors arrive typed.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use openraft::error::{NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse};
use openraft::BasicNode;
use openraft_legacy::network_v1::{
    Adapter, InstallSnapshotError, InstallSnapshotRequest, InstallSnapshotResponse, RaftNetwork,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::lease::LeaderLease;
use crate::stream::{self, Kind, OpenError, PeerStream};
use crate::{NodeId, SnapshotData, TypeConfig, SECRET_HEADER};

pub const PATH_APPEND: &str = "/raft/append";
pub const PATH_VOTE: &str = "/raft/vote";
pub const PATH_SNAPSHOT: &str = "/raft/snapshot";

/// The pause before a peer that did not answer is tried again.
const UNREACHABLE_BACKOFF: Duration = Duration::from_millis(500);
/// How long a peer that did not offer the stream is spoken to over HTTP before it is asked
/// again (it may have been updated in place meanwhile).
const HTTP_ONLY_FOR: Duration = Duration::from_secs(60);
/// As the HTTP client's.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Builds one connection handle per peer; they share a pooled HTTP client.
#[derive(Clone)]
pub struct HttpNetwork {
    client: reqwest::Client,
    secret: String,
    reachability: Reachability,
    lease: LeaderLease,
}

/// Whether each peer answered its last RPC, so a peer going down or coming back is logged
/// once per change, not once per failed request (openraft's own per-request errors are
/// filtered out of the daemon's log, see `flynn-host`'s `quiet_openraft`).
#[derive(Clone, Default)]
pub struct Reachability(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<NodeId, bool>>>);

impl Reachability {
    /// Notes an RPC's outcome; true when it changed what is known of the peer.
    pub fn note(&self, peer: NodeId, path: &str, error: Option<&str>) -> bool {
        let mut known = self.0.lock().expect("reachability lock");
        let reachable = error.is_none();
        // Every peer starts reachable: the first failure is a change worth saying.
        let was = known.insert(peer, reachable).unwrap_or(true);
        if was == reachable {
            return false;
        }
        match error {
            Some(e) => tracing::warn!(
                peer,
                rpc = path,
                error = e,
                "a Raft peer does not answer; retrying quietly until it does"
            ),
            None => tracing::info!(peer, rpc = path, "a Raft peer answers again"),
        }
        true
    }
}

impl HttpNetwork {
    pub fn new(secret: String) -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            // Under the API's 10 s idle close, so a pooled connection is never one being closed.
            .pool_idle_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .build()
            .expect("http client");
        HttpNetwork {
            client,
            secret,
            reachability: Reachability::default(),
            lease: LeaderLease::default(),
        }
    }

    /// The lease this network's AppendEntries answers keep (shared with every clone).
    pub fn lease(&self) -> LeaderLease {
        self.lease.clone()
    }
}

/// openraft 0.10 talks to a peer through its v2 network; the adapter keeps 0.9's RPCs (a
/// snapshot sent in chunks), which hosts of either build answer during a rolling update.
pub type PeerNetwork = Adapter<TypeConfig, PeerConnection, SnapshotData>;

impl RaftNetworkFactory<TypeConfig> for HttpNetwork {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerNetwork {
        Adapter::new(PeerConnection {
            target,
            addr: node.addr.clone(),
            base: format!("http://{}", node.addr),
            client: self.client.clone(),
            secret: self.secret.clone(),
            reachability: self.reachability.clone(),
            lease: self.lease.clone(),
            stream: None,
            http_only_until: None,
        })
    }
}

pub struct PeerConnection {
    target: NodeId,
    /// `host:port`, for the stream.
    addr: String,
    /// `http://host:port`, for requests.
    base: String,
    client: reqwest::Client,
    secret: String,
    reachability: Reachability,
    lease: LeaderLease,
    /// The open stream, if one is: opened at the first RPC, dropped at any failure.
    stream: Option<PeerStream>,
    /// Set when the peer answered the upgrade with 404: HTTP only until then.
    http_only_until: Option<Instant>,
}

type RpcResult<Resp, E> = Result<Resp, RPCError<TypeConfig, RaftError<TypeConfig, E>>>;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

impl PeerConnection {
    /// One RPC: over the stream for `kind`s, else (snapshot chunks, and peers without the
    /// stream) as a request to `path`.
    async fn call<Req, Resp, E>(
        &mut self,
        kind: Option<Kind>,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let streamed = match kind {
            Some(kind) if self.http_only_until.is_none_or(|t| Instant::now() >= t) => {
                self.send_on_stream(kind, req, option).await
            }
            _ => None,
        };
        let result = match streamed {
            Some(r) => {
                crate::metrics::PEER_RPCS_STREAM.fetch_add(1, Ordering::Relaxed);
                r
            }
            None => {
                crate::metrics::PEER_RPCS_HTTP.fetch_add(1, Ordering::Relaxed);
                self.send(path, req, option).await
            }
        };
        // A remote Raft error is an answer: the peer is there.
        let error = match &result {
            Err(RPCError::RemoteError(_)) | Ok(_) => None,
            Err(e) => Some(e.to_string()),
        };
        self.reachability.note(self.target, path, error.as_deref());
        result
    }

    /// The RPC over the stream, opened first if need be; `None` when the peer does not
    /// offer one (it is then asked again after [`HTTP_ONLY_FOR`]).
    async fn send_on_stream<Req, Resp, E>(
        &mut self,
        kind: Kind,
        req: &Req,
        option: &RPCOption,
    ) -> Option<RpcResult<Resp, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let frame = match stream::request_frame(kind, req) {
            Ok(f) => f,
            Err(e) => return Some(Err(RPCError::Network(NetworkError::new(&e)))),
        };
        let ttl = option.hard_ttl();
        let answer = match tokio::time::timeout(ttl, self.exchange(&frame)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(OpenError::NotOffered)) => {
                self.http_only_until = Some(Instant::now() + HTTP_ONLY_FOR);
                return None;
            }
            Ok(Err(e)) => {
                self.stream = None;
                return Some(Err(match e {
                    // Refused or timed out: openraft backs off from unreachable peers.
                    OpenError::Connect(e) => RPCError::Unreachable(Unreachable::new(&e)),
                    e => RPCError::Network(NetworkError::new(&e)),
                }));
            }
            Err(elapsed) => {
                // An answer may still come: the stream is out of step, so it goes.
                self.stream = None;
                return Some(Err(RPCError::Unreachable(Unreachable::new(&elapsed))));
            }
        };
        let result: Result<Resp, RaftError<TypeConfig, E>> = match serde_json::from_slice(&answer) {
            Ok(r) => r,
            Err(e) => {
                self.stream = None;
                return Some(Err(RPCError::Network(NetworkError::new(&e))));
            }
        };
        Some(result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))))
    }

    /// Sends `frame` and reads its answer, on the open stream or a new one. A stream that
    /// had carried requests and fails before answering is opened again once: the peer may
    /// have closed it while idle, or restarted. (AppendEntries and Vote may be repeated.)
    async fn exchange(&mut self, frame: &[u8]) -> Result<Vec<u8>, OpenError> {
        if self.stream.as_ref().is_some_and(|s| !s.reusable()) {
            self.stream = None;
        }
        for _ in 0..2 {
            let stream = match &mut self.stream {
                Some(s) => s,
                None => self
                    .stream
                    .insert(PeerStream::open(&self.addr, &self.secret, CONNECT_TIMEOUT).await?),
            };
            let served_before = stream.answered_before();
            match stream.call(frame).await {
                Ok(answer) => return Ok(answer),
                Err(e) => {
                    self.stream = None;
                    if !served_before {
                        return Err(OpenError::Io(e));
                    }
                }
            }
        }
        Err(OpenError::Io(std::io::Error::other(
            "the stream failed twice",
        )))
    }

    async fn send<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .header(SECRET_HEADER, &self.secret)
            .timeout(option.hard_ttl())
            .json(req)
            .send()
            .await
            .map_err(|e| {
                // Connection refused or timed out: openraft backs off from unreachable peers.
                if e.is_connect() || e.is_timeout() {
                    RPCError::Unreachable(Unreachable::new(&e))
                } else {
                    RPCError::Network(NetworkError::new(&e))
                }
            })?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(RPCError::Network(NetworkError::new(&TransportError(
                format!("peer {} answered {status}: {body}", self.target),
            ))));
        }
        let result: Result<Resp, RaftError<TypeConfig, E>> = resp
            .json()
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig, RaftError<TypeConfig>>>
    {
        let (sent, vote) = (std::time::Instant::now(), rpc.vote);
        let resp = self
            .call(Some(Kind::Append), PATH_APPEND, &rpc, &option)
            .await?;
        // Any answer but a higher vote means the peer took `vote` as its leader's (openraft
        // checks the vote before the log), and promised not to vote for another for a while.
        if !matches!(resp, AppendEntriesResponse::HigherVote(_)) {
            self.lease.accepted(self.target, vote, sent);
        }
        Ok(resp)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<TypeConfig>,
        RPCError<TypeConfig, RaftError<TypeConfig, InstallSnapshotError>>,
    > {
        let result = self.call(None, PATH_SNAPSHOT, &rpc, &option).await;
        // openraft-legacy's sender retries a failed chunk after 1 ms, without end, until
        // the core gives up on the transfer: a peer restarting mid-transfer would be asked
        // a thousand times a second. A failure here waits as a refused connection does.
        if matches!(
            result,
            Err(RPCError::Unreachable(_) | RPCError::Network(_) | RPCError::Timeout(_))
        ) {
            tokio::time::sleep(UNREACHABLE_BACKOFF).await;
        }
        result
    }

    /// How long replication waits before trying an unreachable peer again (openraft 0.9's
    /// pause; the legacy trait's default is 200 ms).
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(UNREACHABLE_BACKOFF))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig, RaftError<TypeConfig>>> {
        self.call(Some(Kind::Vote), PATH_VOTE, &rpc, &option).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use openraft::network::RPCOption;
    use openraft::raft::{VoteRequest, VoteResponse};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::{HttpNetwork, PeerConnection, RaftNetwork, Reachability, RpcResult, PATH_VOTE};
    use crate::stream::{Kind, PATH_STREAM, PROTOCOL};
    use crate::{TypeConfig, SECRET_HEADER};

    /// What a fake peer saw: one line per request head (`GET /raft/stream`, `POST
    /// /raft/vote`), or `frame K` per stream request of kind K.
    type Seen = Arc<Mutex<Vec<String>>>;

    /// How the fake peer treats the stream.
    #[derive(Clone, Copy)]
    enum Peer {
        /// An older build: 404 for the upgrade, HTTP routes only.
        NoStream,
        /// Answers one request per stream, then closes it (as an idle close would).
        OneAnswerPerStream,
        /// Takes the upgrade and the request, then closes without answering.
        CutsBeforeAnswering,
        /// Answers every request with the vote it asked for, the first one after 300 ms.
        EchoesSlowlyAtFirst,
        /// Speaks another stream protocol: 426 for this one.
        OtherProtocol,
    }

    fn vote_answer(vote: crate::Vote) -> Vec<u8> {
        let ok: Result<VoteResponse<TypeConfig>, openraft::error::RaftError<TypeConfig>> =
            Ok(VoteResponse::new(vote, None, true));
        serde_json::to_vec(&ok).unwrap()
    }

    async fn read_head(s: &mut TcpStream) -> Option<String> {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if s.read(&mut b).await.ok()? == 0 {
                return None;
            }
            head.push(b[0]);
        }
        Some(String::from_utf8(head).unwrap())
    }

    async fn fake_peer(behaviour: Peer) -> (String, Seen) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Seen::default();
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let log = log.clone();
                tokio::spawn(async move {
                    while let Some(head) = read_head(&mut s).await {
                        let line = head.lines().next().unwrap().to_string();
                        assert!(head.contains(&format!("{SECRET_HEADER}: s3cret")), "{head}");
                        log.lock().unwrap().push(line.replace(" HTTP/1.1", ""));
                        if line.starts_with(&format!("GET {PATH_STREAM} ")) {
                            let refusal = match behaviour {
                                Peer::NoStream => Some("404 Not Found"),
                                Peer::OtherProtocol => Some("426 Upgrade Required"),
                                _ => None,
                            };
                            if let Some(status) = refusal {
                                let body = br#"{"error":"no"}"#;
                                let ans = format!(
                                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n",
                                    body.len()
                                );
                                s.write_all(ans.as_bytes()).await.unwrap();
                                s.write_all(body).await.unwrap();
                                continue;
                            }
                            assert!(head.contains(&format!("upgrade: {PROTOCOL}")), "{head}");
                            s.write_all(format!("HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: {PROTOCOL}\r\n\r\n").as_bytes()).await.unwrap();
                            for n in 0.. {
                                let mut len = [0u8; 4];
                                if s.read_exact(&mut len).await.is_err() {
                                    return; // the caller closed the stream
                                }
                                let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
                                s.read_exact(&mut frame).await.unwrap();
                                let req: VoteRequest<TypeConfig> =
                                    serde_json::from_slice(&frame[1..]).unwrap();
                                log.lock().unwrap().push(format!("frame {}", frame[0]));
                                let answer = match behaviour {
                                    Peer::OneAnswerPerStream => vote_answer(req.vote),
                                    Peer::EchoesSlowlyAtFirst => {
                                        if n == 0 {
                                            tokio::time::sleep(Duration::from_millis(300)).await;
                                        }
                                        vote_answer(req.vote)
                                    }
                                    _ => return, // closed without an answer
                                };
                                let mut out = (answer.len() as u32).to_be_bytes().to_vec();
                                out.extend_from_slice(&answer);
                                if s.write_all(&out).await.is_err()
                                    || matches!(behaviour, Peer::OneAnswerPerStream)
                                {
                                    return; // closed after its one answer
                                }
                            }
                        }
                        assert!(line.starts_with(&format!("POST {PATH_VOTE} ")), "{line}");
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .unwrap()
                            .trim()
                            .parse()
                            .unwrap();
                        let mut body = vec![0u8; length];
                        s.read_exact(&mut body).await.unwrap();
                        let req: VoteRequest<TypeConfig> = serde_json::from_slice(&body).unwrap();
                        let answer = vote_answer(req.vote);
                        let ans = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", answer.len());
                        s.write_all(ans.as_bytes()).await.unwrap();
                        s.write_all(&answer).await.unwrap();
                    }
                });
            }
        });
        (addr, seen)
    }

    fn connection(addr: &str) -> PeerConnection {
        let net = HttpNetwork::new("s3cret".into());
        PeerConnection {
            target: 2,
            addr: addr.to_string(),
            base: format!("http://{addr}"),
            client: net.client.clone(),
            secret: net.secret.clone(),
            reachability: net.reachability.clone(),
            lease: net.lease.clone(),
            stream: None,
            http_only_until: None,
        }
    }

    async fn vote(
        c: &mut PeerConnection,
    ) -> RpcResult<VoteResponse<TypeConfig>, openraft::error::Infallible> {
        vote_in(c, 4).await
    }

    async fn vote_in(
        c: &mut PeerConnection,
        term: u64,
    ) -> RpcResult<VoteResponse<TypeConfig>, openraft::error::Infallible> {
        let req = VoteRequest::<TypeConfig>::new(crate::Vote::new(term, 1), None);
        c.vote(req, RPCOption::new(std::time::Duration::from_secs(5)))
            .await
    }

    fn seen(s: &Seen) -> Vec<String> {
        s.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn t02_a_peer_without_the_stream_is_spoken_to_over_http() {
        let (addr, log) = fake_peer(Peer::NoStream).await;
        let mut c = connection(&addr);
        for _ in 0..3 {
            assert!(vote(&mut c).await.expect("answered over HTTP").vote_granted);
        }
        assert_eq!(
            seen(&log),
            [
                format!("GET {PATH_STREAM}"),
                format!("POST {PATH_VOTE}"),
                format!("POST {PATH_VOTE}"),
                format!("POST {PATH_VOTE}"),
            ],
            "asked once for the stream, then HTTP until the minute is up"
        );
    }

    #[tokio::test]
    async fn t03_a_stream_closed_between_requests_is_opened_again() {
        let (addr, log) = fake_peer(Peer::OneAnswerPerStream).await;
        let mut c = connection(&addr);
        for _ in 0..3 {
            let answer = vote(&mut c).await.expect("answered over the stream");
            assert!(answer.vote_granted);
        }
        let vote = format!("frame {}", Kind::Vote as u8);
        let open = format!("GET {PATH_STREAM}");
        let (open, vote) = (open.as_str(), vote.as_str());
        assert_eq!(seen(&log), [open, vote, open, vote, open, vote]);
    }

    #[tokio::test]
    async fn t04_a_new_stream_cut_before_its_answer_is_an_error_not_a_retry() {
        let (addr, log) = fake_peer(Peer::CutsBeforeAnswering).await;
        let mut c = connection(&addr);
        let err = vote(&mut c).await.expect_err("no answer came");
        assert!(
            matches!(err, openraft::error::RPCError::Network(_)),
            "{err:?}"
        );
        assert_eq!(
            seen(&log),
            [
                format!("GET {PATH_STREAM}"),
                format!("frame {}", Kind::Vote as u8)
            ]
        );
        assert!(c.stream.is_none(), "the broken stream was dropped");
    }

    #[test]
    fn t01_a_peer_s_state_is_told_once_per_change() {
        let r = Reachability::default();
        assert!(
            !r.note(7, "/raft/append", None),
            "reachable at first: nothing to say"
        );
        assert!(r.note(7, "/raft/append", Some("connection refused")));
        for _ in 0..10 {
            assert!(!r.note(7, "/raft/append", Some("connection refused")));
        }
        assert!(!r.note(8, "/raft/vote", None), "another peer is its own");
        assert!(r.note(7, "/raft/append", None), "back");
        assert!(!r.note(7, "/raft/append", None));
    }

    #[tokio::test]
    async fn t05_a_call_given_up_midway_leaves_no_answer_for_the_next() {
        // openraft's heartbeat wraps each call in a timeout of its own: the stream must not
        // hand the next call the answer of the one given up.
        let (addr, log) = fake_peer(Peer::EchoesSlowlyAtFirst).await;
        let mut c = connection(&addr);
        let given_up = tokio::time::timeout(Duration::from_millis(50), vote_in(&mut c, 7)).await;
        assert!(given_up.is_err(), "the first answer takes 300 ms");
        tokio::time::sleep(Duration::from_millis(400)).await; // its answer is there now
        for term in [8, 9] {
            let answer = vote_in(&mut c, term).await.expect("answered");
            assert_eq!(answer.vote.leader_id().term, term, "another call's answer");
        }
        let opens = seen(&log).iter().filter(|l| l.starts_with("GET ")).count();
        assert_eq!(
            opens, 2,
            "a new stream after the abandoned one, then reused"
        );
    }

    #[tokio::test]
    async fn t06_a_peer_with_another_stream_protocol_is_spoken_to_over_http() {
        let (addr, log) = fake_peer(Peer::OtherProtocol).await;
        let mut c = connection(&addr);
        assert!(vote(&mut c).await.expect("answered over HTTP").vote_granted);
        assert_eq!(
            seen(&log),
            [format!("GET {PATH_STREAM}"), format!("POST {PATH_VOTE}")]
        );
    }
}
