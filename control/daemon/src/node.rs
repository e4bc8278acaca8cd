//! A running Raft member and the operations that need the leader.
//!
//! Everything that must happen on the leader (a write, a read index, a membership change) is a
//! [`LeaderOp`]. [`Node::on_leader`] runs it locally when this host leads and otherwise sends
//! it to the leader's `/raft/leader` endpoint, retrying while leadership is in flux. So a write
//! to any host reaches the leader: forwarded, never refused.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flynn_client::{ErrorBody, HostClient, HostEntry, JoinRequest, Role, SECRET_HEADER};
use flynn_raft::openraft::async_runtime::WatchReceiver;
use flynn_raft::openraft::error::{
    ChangeMembershipError, ClientWriteError, LinearizableReadError, RaftError,
};
use flynn_raft::openraft::raft::ReadPolicy;
use flynn_raft::openraft::{BasicNode, ChangeMembers, ServerState};
use flynn_raft::store::StateHandle;
use flynn_raft::{NodeId, Raft};
use flynn_state::{ApplyResult, Command};
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};
use crate::version;

/// How long an API call waits for a leader before answering 503.
const LEADER_WAIT: Duration = Duration::from_secs(10);
/// How long a write may take to commit before its outcome is reported unknown.
const COMMIT_WAIT: Duration = Duration::from_secs(8);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum LeaderOp {
    Propose { command: Command },
    ReadIndex,
    Join { request: JoinRequest },
    Promote { node_id: NodeId },
    Demote { node_id: NodeId, force: bool },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
// Replies are moved once per request; boxing the applied result would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum LeaderReply {
    Applied { result: ApplyResult },
    ReadIndex { index: Option<u64> },
    Done,
}

/// Why a leader-side attempt did not finish, and whether trying again is safe.
enum Attempt {
    /// Not leader (any more) or the leader is unknown: nothing was done; retry.
    Retry(String),
    Failed(ApiError),
}

/// A command waiting to be proposed, and where its outcome goes.
struct Proposal {
    command: Command,
    reply: tokio::sync::oneshot::Sender<ProposeOutcome>,
}

#[allow(clippy::large_enum_variant)]
enum ProposeOutcome {
    Applied(ApplyResult),
    /// Not appended: this host is not the leader (any more).
    NotLeader(String),
    /// Appended, but whether it committed is not known.
    Unknown(String),
    /// Never reached Raft: the batching task is gone.
    NotProposed(String),
}

/// Most commands one log entry carries.
const MAX_BATCH: usize = 512;
/// Batches proposed at once; more only queue behind them (and so batch better).
const BATCHES_IN_FLIGHT: usize = 2;

/// Proposes commands in batches: everything that arrived while earlier batches were in
/// flight goes into one log entry, so a burst pays one append and one fsync per batch.
///
/// A command that finds nothing queued and a batch slot free is proposed by its caller, by
/// itself: a lone write skips the queue, the batching task, the per-batch task and the
/// oneshot back.
struct Proposer {
    queue: tokio::sync::mpsc::Sender<Proposal>,
    permits: Arc<tokio::sync::Semaphore>,
    raft: Raft,
}

impl Proposer {
    fn new(raft: Raft) -> Self {
        let permits = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
        let queue = spawn_batcher(raft.clone(), permits.clone());
        Proposer {
            queue,
            permits,
            raft,
        }
    }

    /// Proposes `command` and says what became of it.
    async fn propose(&self, command: Command) -> ProposeOutcome {
        if self.queue.capacity() == self.queue.max_capacity() {
            if let Ok(_slot) = self.permits.clone().try_acquire_owned() {
                let mut outcomes = propose_batch(&self.raft, vec![command]).await;
                return outcomes.pop().expect("one outcome per command");
            }
        }
        let (reply, outcome) = tokio::sync::oneshot::channel();
        if self.queue.send(Proposal { command, reply }).await.is_err() {
            return ProposeOutcome::NotProposed("the proposer stopped".into());
        }
        outcome
            .await
            .unwrap_or_else(|_| ProposeOutcome::Unknown("the proposer dropped the write".into()))
    }
}

fn spawn_batcher(
    raft: Raft,
    permits: Arc<tokio::sync::Semaphore>,
) -> tokio::sync::mpsc::Sender<Proposal> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Proposal>(8192);
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            let raft = raft.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let (commands, replies): (Vec<Command>, Vec<_>) =
                    batch.into_iter().map(|p| (p.command, p.reply)).unzip();
                for (reply, outcome) in replies
                    .into_iter()
                    .zip(propose_batch(&raft, commands).await)
                {
                    // A caller that gave up has nothing to hear.
                    let _ = reply.send(outcome);
                }
            });
        }
    });
    tx
}

/// One log entry for several proposals. Batches do not nest, so a proposal that is itself a
/// batch is spliced in; `spans` says how many results each proposal gets back, and whether
/// it gets them as a batch.
fn splice(commands: Vec<Command>) -> (Command, Vec<(usize, bool)>) {
    let mut spans = Vec::with_capacity(commands.len());
    let mut flat = Vec::with_capacity(commands.len());
    for c in commands {
        match c {
            Command::Batch { commands: inner } => {
                spans.push((inner.len(), true));
                flat.extend(inner);
            }
            c => {
                spans.push((1, false));
                flat.push(c);
            }
        }
    }
    (Command::Batch { commands: flat }, spans)
}

/// Each proposal's result from the spliced entry's results (see [`splice`]).
fn unsplice(results: Vec<ApplyResult>, spans: &[(usize, bool)]) -> Vec<ApplyResult> {
    let mut results = results.into_iter();
    spans
        .iter()
        .map(|(n, was_batch)| {
            let mine: Vec<ApplyResult> = results.by_ref().take(*n).collect();
            if *was_batch {
                Ok(flynn_state::Response::Batch { results: mine })
            } else {
                mine.into_iter().next().expect("one result per command")
            }
        })
        .collect()
}

/// Proposes `commands` as one log entry; each command's outcome, in order.
async fn propose_batch(raft: &Raft, commands: Vec<Command>) -> Vec<ProposeOutcome> {
    let count = commands.len();
    let single = count == 1;
    let (entry, spans) = if single {
        (
            commands.into_iter().next().expect("one command"),
            Vec::new(),
        )
    } else {
        splice(commands)
    };
    let total: usize = spans.iter().map(|(n, _)| n).sum();
    // One failure, told to every command of the entry.
    let every = |outcome: fn(String) -> ProposeOutcome, why: String| {
        (0..count).map(|_| outcome(why.clone())).collect()
    };
    match tokio::time::timeout(COMMIT_WAIT, raft.client_write(entry)).await {
        Ok(Ok(resp)) if single => vec![ProposeOutcome::Applied(resp.data)],
        Ok(Ok(resp)) => match resp.data {
            Ok(flynn_state::Response::Batch { results }) if results.len() == total => {
                unsplice(results, &spans)
                    .into_iter()
                    .map(ProposeOutcome::Applied)
                    .collect()
            }
            other => every(
                ProposeOutcome::Unknown,
                format!("unexpected batch result {other:?}"),
            ),
        },
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => every(
            ProposeOutcome::NotLeader,
            format!("not the leader (leader: {:?})", f.leader_id),
        ),
        Ok(Err(e)) => every(ProposeOutcome::Unknown, e.to_string()),
        Err(_) => every(
            ProposeOutcome::Unknown,
            format!(
                "not committed within {}s; the write may still be applied",
                COMMIT_WAIT.as_secs()
            ),
        ),
    }
}

pub struct Node {
    pub id: NodeId,
    pub addr: String,
    pub raft: Raft,
    pub state: StateHandle,
    secret: String,
    peers: reqwest::Client,
    proposer: Proposer,
    /// When a quorum last accepted this host as leader: reads skip a heartbeat round.
    lease: flynn_raft::lease::LeaderLease,
}

impl Node {
    /// Every member host (peers and proxies): node id and host API address.
    pub fn members(&self) -> Vec<(NodeId, String)> {
        self.metrics()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect()
    }

    pub fn new(
        id: NodeId,
        addr: String,
        raft: Raft,
        state: StateHandle,
        secret: String,
        lease: flynn_raft::lease::LeaderLease,
    ) -> Arc<Self> {
        let peers = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(500))
            .pool_idle_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .build()
            .expect("http client");
        let proposer = Proposer::new(raft.clone());
        Arc::new(Node {
            id,
            addr,
            raft,
            state,
            secret,
            peers,
            proposer,
            lease,
        })
    }

    /// The cluster secret, for this host's own calls to other hosts.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    pub fn secret_matches(&self, given: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        given.ct_eq(self.secret.as_bytes()).into()
    }

    pub fn metrics(&self) -> flynn_raft::RaftMetrics {
        self.raft.metrics().borrow_watched().clone()
    }

    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }

    pub fn role(&self) -> Role {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let membership = m.membership_config.membership();
        if membership.voter_ids().any(|v| v == self.id) {
            Role::Peer
        } else if membership.get_node(&self.id).is_some() {
            Role::Proxy
        } else {
            Role::None
        }
    }

    /// The leader's id and host API address, as this host last heard.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id)?;
        Some((id, node.addr.clone()))
    }

    /// Proposes a command and returns what applying it answered.
    pub async fn propose(&self, command: impl Into<Command>) -> ApiResult<flynn_state::Response> {
        let command = command.into();
        match self.on_leader(LeaderOp::Propose { command }).await? {
            LeaderReply::Applied { result } => result.map_err(ApiError::from),
            other => Err(ApiError::Internal(format!(
                "unexpected leader reply {other:?}"
            ))),
        }
    }

    /// Proposes a command whose result has one type (`App`, `Route`, ...) and returns it.
    pub async fn propose_as<T>(&self, command: impl Into<Command>) -> ApiResult<T>
    where
        T: TryFrom<flynn_state::Response, Error = flynn_state::UnexpectedResponse>,
    {
        Ok(T::try_from(self.propose(command).await?)?)
    }

    /// Waits until this host's applied state reflects every write committed before the call:
    /// a linearizable read can then be answered from local state.
    pub async fn read_barrier(&self) -> ApiResult<()> {
        let index = match self.on_leader(LeaderOp::ReadIndex).await? {
            LeaderReply::ReadIndex { index } => index,
            other => {
                return Err(ApiError::Internal(format!(
                    "unexpected leader reply {other:?}"
                )))
            }
        };
        // Already applied (always, for a read on a leader under its lease): no wait.
        let applied = self.state.read(|a| a.last_applied.map_or(0, |l| l.index));
        if let Some(index) = index.filter(|i| *i > applied) {
            self.raft
                .wait(Some(LEADER_WAIT))
                .applied_index_at_least(Some(index), "read barrier")
                .await
                .map_err(|e| {
                    ApiError::Unavailable(format!("waiting to apply index {index}: {e}"))
                })?;
        }
        Ok(())
    }

    /// A read index without a heartbeat round, while this host leads under a lease: what it
    /// has applied, once that includes an entry of its own term (so everything committed
    /// by earlier leaders is applied too). Every write this leader acknowledged was applied
    /// before the acknowledgement, and while the lease holds no other leader can have
    /// committed one. `None`: confirm leadership the slow way.
    fn leased_read_index(&self) -> Option<u64> {
        let (vote, voter_sets) = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            if m.current_leader != Some(self.id) {
                return None;
            }
            let sets = m.membership_config.membership().get_joint_config().clone();
            (m.vote, sets)
        };
        if !self
            .lease
            .held(self.id, &vote, &voter_sets, std::time::Instant::now())
        {
            return None;
        }
        let applied = self.state.read(|a| a.last_applied)?;
        (applied.leader_id.term == vote.leader_id().term).then_some(applied.index)
    }

    /// Runs `op` on the leader, wherever it is.
    pub async fn on_leader(&self, op: LeaderOp) -> ApiResult<LeaderReply> {
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            let attempt = match self.leader() {
                Some((id, _)) if id == self.id => self.run_as_leader(op.clone()).await,
                Some((_, addr)) => self.forward(&addr, &op).await,
                None => Err(Attempt::Retry("no leader elected".into())),
            };
            match attempt {
                Ok(reply) => return Ok(reply),
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::Retry(why)) if Instant::now() >= deadline => {
                    return Err(ApiError::Unavailable(format!(
                        "no leader reachable within {}s: {why}",
                        LEADER_WAIT.as_secs()
                    )));
                }
                Err(Attempt::Retry(_)) => {}
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn forward(&self, addr: &str, op: &LeaderOp) -> Result<LeaderReply, Attempt> {
        let sent = self
            .peers
            .post(format!("http://{addr}/raft/leader"))
            .header(SECRET_HEADER, &self.secret)
            .timeout(COMMIT_WAIT + Duration::from_secs(2))
            .json(op)
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            // Never connected: the leader did not see the op.
            Err(e) if e.is_connect() => return Err(Attempt::Retry(format!("leader {addr}: {e}"))),
            Err(e) => {
                return Err(match op {
                    LeaderOp::Propose { .. } | LeaderOp::Join { .. } => {
                        Attempt::Failed(ApiError::UnknownOutcome(format!(
                            "the leader at {addr} did not answer ({e}); the write may or may not have been applied"
                        )))
                    }
                    _ => Attempt::Retry(format!("leader {addr}: {e}")),
                })
            }
        };
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| {
            Attempt::Failed(ApiError::UnknownOutcome(format!(
                "reading the leader's answer: {e}"
            )))
        })?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| {
                Attempt::Failed(ApiError::Internal(format!("bad leader reply: {e}")))
            });
        }
        let err = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(ApiError::from_body)
            .unwrap_or_else(|_| {
                ApiError::Internal(format!(
                    "leader answered {status}: {}",
                    String::from_utf8_lossy(&bytes)
                ))
            });
        match err {
            // The target stepped down or had not learnt the new leader yet.
            ApiError::Unavailable(m) => Err(Attempt::Retry(m)),
            e => Err(Attempt::Failed(e)),
        }
    }

    /// Executes `op` if this host is the leader; the `/raft/leader` endpoint calls this.
    pub async fn leader_endpoint(&self, op: LeaderOp) -> ApiResult<LeaderReply> {
        match self.run_as_leader(op).await {
            Ok(r) => Ok(r),
            Err(Attempt::Retry(m)) => Err(ApiError::Unavailable(m)),
            Err(Attempt::Failed(e)) => Err(e),
        }
    }

    async fn run_as_leader(&self, op: LeaderOp) -> Result<LeaderReply, Attempt> {
        match op {
            LeaderOp::Propose { command } => {
                let pending = crate::metrics::PendingProposal::start();
                match self.proposer.propose(command).await {
                    ProposeOutcome::Applied(result) => {
                        pending.committed(result.is_err());
                        Ok(LeaderReply::Applied { result })
                    }
                    ProposeOutcome::NotLeader(why) => {
                        crate::metrics::proposal_failed();
                        Err(Attempt::Retry(why))
                    }
                    ProposeOutcome::Unknown(why) => {
                        crate::metrics::proposal_failed();
                        Err(Attempt::Failed(ApiError::UnknownOutcome(why)))
                    }
                    ProposeOutcome::NotProposed(why) => {
                        crate::metrics::proposal_failed();
                        Err(Attempt::Failed(ApiError::Internal(why)))
                    }
                }
            }
            LeaderOp::ReadIndex => {
                if let Some(index) = self.leased_read_index() {
                    crate::metrics::READS_LEASED.fetch_add(1, Ordering::Relaxed);
                    return Ok(LeaderReply::ReadIndex { index: Some(index) });
                }
                crate::metrics::READS_CONFIRMED.fetch_add(1, Ordering::Relaxed);
                let read = self.raft.get_read_log_id(ReadPolicy::ReadIndex);
                match tokio::time::timeout(COMMIT_WAIT, read).await {
                    Err(_) => Err(Attempt::Retry("leadership not confirmed in time".into())),
                    Ok(Ok((read_log_id, _))) => Ok(LeaderReply::ReadIndex {
                        index: Some(read_log_id.index()),
                    }),
                    Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(_)))) => {
                        Err(Attempt::Retry("not the leader".into()))
                    }
                    Ok(Err(e)) => Err(Attempt::Retry(e.to_string())),
                }
            }
            LeaderOp::Join { request } => self.join(request).await,
            LeaderOp::Promote { node_id } => {
                let voters = self.voters();
                if voters.contains(&node_id) {
                    return Err(Attempt::Failed(ApiError::Conflict(format!(
                        "host {node_id} is a peer already"
                    ))));
                }
                self.change(ChangeMembers::AddVoterIds(BTreeSet::from([node_id])), true)
                    .await
            }
            LeaderOp::Demote { node_id, force } => self.demote(node_id, force).await,
        }
    }

    async fn join(&self, request: JoinRequest) -> Result<LeaderReply, Attempt> {
        if request.version != version() {
            return Err(Attempt::Failed(ApiError::VersionMismatch(format!(
                "host {} runs version {}, but the cluster runs version {}",
                request.addr,
                request.version,
                version()
            ))));
        }
        let m = self.metrics();
        if m.membership_config
            .membership()
            .get_node(&request.node_id)
            .is_some()
        {
            return Ok(LeaderReply::Done);
        }
        let add = self
            .raft
            .add_learner(request.node_id, BasicNode::new(&request.addr), false);
        match tokio::time::timeout(COMMIT_WAIT, add).await {
            Err(_) => Err(Attempt::Failed(ApiError::UnknownOutcome(
                "adding the host did not commit in time".into(),
            ))),
            Ok(r) => membership_result(r),
        }
    }

    async fn demote(&self, node_id: NodeId, force: bool) -> Result<LeaderReply, Attempt> {
        let voters = self.voters();
        if !voters.contains(&node_id) {
            return Err(Attempt::Failed(ApiError::Conflict(format!(
                "host {node_id} is not a peer"
            ))));
        }
        let remaining: Vec<NodeId> = voters.iter().copied().filter(|v| *v != node_id).collect();
        if remaining.is_empty() {
            return Err(Attempt::Failed(ApiError::Conflict(
                "cannot demote the last peer".into(),
            )));
        }
        let hosts = self.list_hosts().await;
        let reachable = |id: NodeId| hosts.iter().any(|h| h.node_id == id && h.reachable);
        let addr = hosts
            .iter()
            .find(|h| h.node_id == node_id)
            .map(|h| h.addr.clone())
            .unwrap_or_default();
        if !force && !reachable(node_id) {
            return Err(Attempt::Failed(ApiError::Conflict(format!(
                "host {addr} is unreachable; if it is gone for good, remove it with `flynn-host demote --force {}`",
                addr.split(':').next().unwrap_or(&addr)
            ))));
        }
        let alive = remaining.iter().filter(|id| reachable(**id)).count();
        if alive <= remaining.len() / 2 {
            return Err(Attempt::Failed(ApiError::Conflict(format!(
                "refusing: only {alive} of the {} remaining peers are reachable, which is no quorum",
                remaining.len()
            ))));
        }
        // A plain demote keeps the host as a proxy; a forced one removes it altogether.
        self.change(
            ChangeMembers::RemoveVoters(BTreeSet::from([node_id])),
            !force,
        )
        .await
    }

    async fn change(
        &self,
        change: ChangeMembers<NodeId, BasicNode>,
        retain: bool,
    ) -> Result<LeaderReply, Attempt> {
        let fut = self.raft.change_membership(change, retain);
        match tokio::time::timeout(COMMIT_WAIT * 2, fut).await {
            Err(_) => Err(Attempt::Failed(ApiError::UnknownOutcome(
                "the membership change did not commit in time".into(),
            ))),
            Ok(r) => membership_result(r),
        }
    }

    pub fn voters(&self) -> BTreeSet<NodeId> {
        self.metrics()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// Every member host from the Raft membership, probed for reachability.
    pub async fn list_hosts(&self) -> Vec<HostEntry> {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let nodes: BTreeMap<NodeId, BasicNode> =
            membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
        let probes = nodes.iter().map(|(id, node)| {
            let id = *id;
            let addr = node.addr.clone();
            let own = id == self.id;
            async move {
                let version = if own {
                    Some(version().to_string())
                } else {
                    let c =
                        HostClient::new(&format!("http://{addr}"), None, Duration::from_secs(1));
                    c.info()
                        .await
                        .ok()
                        .filter(|i| i.node_id == id)
                        .map(|i| i.version)
                };
                (id, addr, version)
            }
        });
        futures::future::join_all(probes)
            .await
            .into_iter()
            .map(|(id, addr, version)| HostEntry {
                node_id: id,
                role: if voters.contains(&id) {
                    Role::Peer
                } else {
                    Role::Proxy
                },
                leader: m.current_leader == Some(id),
                reachable: version.is_some(),
                addr,
                version,
            })
            .collect()
    }

    /// Finds a member by IP, IP:port or node id.
    pub fn resolve_host(&self, host: &str) -> ApiResult<NodeId> {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let matches: Vec<NodeId> = membership
            .nodes()
            .filter(|(id, n)| {
                n.addr == host
                    || n.addr.rsplit_once(':').map(|(ip, _)| ip) == Some(host)
                    || id.to_string() == host
            })
            .map(|(id, _)| *id)
            .collect();
        match matches.as_slice() {
            [id] => Ok(*id),
            [] => Err(ApiError::NotFound(format!("no cluster host at {host}"))),
            _ => Err(ApiError::Conflict(format!(
                "{host} names several hosts; give IP:PORT"
            ))),
        }
    }
}

fn membership_result(
    r: Result<
        flynn_raft::openraft::raft::ClientWriteResponse<flynn_raft::TypeConfig>,
        RaftError<flynn_raft::TypeConfig, ClientWriteError<flynn_raft::TypeConfig>>,
    >,
) -> Result<LeaderReply, Attempt> {
    match r {
        Ok(_) => Ok(LeaderReply::Done),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
            Err(Attempt::Retry("not the leader".into()))
        }
        Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
            let retry = matches!(e, ChangeMembershipError::InProgress(_));
            if retry {
                Err(Attempt::Retry(e.to_string()))
            } else {
                Err(Attempt::Failed(ApiError::Conflict(e.to_string())))
            }
        }
        Err(e) => Err(Attempt::Failed(ApiError::Unavailable(e.to_string()))),
    }
}

#[cfg(test)]
mod splice_tests {
    use super::*;
    use flynn_state::{AppsCommand, ClusterState};

    fn create(name: &str) -> Command {
        AppsCommand::CreateApp { name: name.into() }.into()
    }

    #[test]
    fn t10_a_batch_among_proposals_is_spliced_and_answered_as_a_batch() {
        let commands = vec![
            create("a"),
            Command::Batch {
                commands: vec![create("b"), create("a")],
            },
            create("c"),
            Command::Batch { commands: vec![] },
        ];
        let (entry, spans) = splice(commands);
        let mut s = ClusterState::default();
        let (applied, _) = s.apply(entry);
        let Ok(flynn_state::Response::Batch { results }) = applied else {
            panic!("not applied as one batch: {applied:?}");
        };
        let each = unsplice(results, &spans);
        assert_eq!(each.len(), 4);
        assert!(each[0].is_ok());
        match &each[1] {
            Ok(flynn_state::Response::Batch { results }) => {
                assert!(results[0].is_ok());
                assert!(
                    results[1].is_err(),
                    "app a exists already: {:?}",
                    results[1]
                );
            }
            other => panic!("the batch proposal got {other:?}"),
        }
        assert!(each[2].is_ok());
        assert!(
            matches!(&each[3], Ok(flynn_state::Response::Batch { results }) if results.is_empty())
        );
    }
}
