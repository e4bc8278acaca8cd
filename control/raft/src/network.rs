//! Raft RPCs between hosts: JSON over HTTP, authenticated by the cluster secret.
//!
//! The server side lives with the daemon's HTTP router; it answers each path below with the
//! JSON of `Result<Response, RaftError>`, so remote Raft errors arrive typed.

use std::time::Duration;

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
use crate::{NodeId, SnapshotData, TypeConfig, SECRET_HEADER};

pub const PATH_APPEND: &str = "/raft/append";
pub const PATH_VOTE: &str = "/raft/vote";
pub const PATH_SNAPSHOT: &str = "/raft/snapshot";

/// The pause before a peer that did not answer is tried again.
const UNREACHABLE_BACKOFF: Duration = Duration::from_millis(500);

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
            .connect_timeout(Duration::from_millis(500))
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
            base: format!("http://{}", node.addr),
            client: self.client.clone(),
            secret: self.secret.clone(),
            reachability: self.reachability.clone(),
            lease: self.lease.clone(),
        })
    }
}

pub struct PeerConnection {
    target: NodeId,
    base: String,
    client: reqwest::Client,
    secret: String,
    reachability: Reachability,
    lease: LeaderLease,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

impl PeerConnection {
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<TypeConfig, RaftError<TypeConfig, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let result = self.send(path, req, option).await;
        // A remote Raft error is an answer: the peer is there.
        let error = match &result {
            Err(RPCError::RemoteError(_)) | Ok(_) => None,
            Err(e) => Some(e.to_string()),
        };
        self.reachability.note(self.target, path, error.as_deref());
        result
    }

    async fn send<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<TypeConfig, RaftError<TypeConfig, E>>>
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
        let resp = self.call(PATH_APPEND, &rpc, &option).await?;
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
        let result = self.call(PATH_SNAPSHOT, &rpc, &option).await;
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
        self.call(PATH_VOTE, &rpc, &option).await
    }
}

#[cfg(test)]
mod tests {
    use super::Reachability;

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
}
