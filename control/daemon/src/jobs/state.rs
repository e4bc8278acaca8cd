//! What the runner reads of the cluster state and proposes to it, behind a small trait:
//! the host's own applied state ([`LocalState`]) in the daemon, a fake in unit tests.

use std::sync::Arc;

use flynn_state::{ClusterState, Command, Response};
use futures::future::BoxFuture;

use crate::component::LocalState;
use crate::error::ApiResult;

pub trait RunnerState: Send + Sync + 'static {
    /// Calls `f` with the applied state (held briefly: `f` must not wait).
    fn with_state(&self, f: &mut dyn FnMut(&ClusterState));
    /// Proposes `cmd` through the leader; the answer once applied.
    fn propose(&self, cmd: Command) -> BoxFuture<'_, ApiResult<Response>>;
    /// Every member host: node id and host API address.
    fn members(&self) -> Vec<(u64, String)>;
    /// Wakes on every change of the applied state.
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;
}

impl dyn RunnerState {
    /// Reads the applied state.
    pub fn read<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        let mut f = Some(f);
        let mut out = None;
        self.with_state(&mut |s| {
            if let Some(f) = f.take() {
                out = Some(f(s));
            }
        });
        out.expect("with_state calls its function once")
    }
}

/// The runner's handle on the state.
pub type State = Arc<dyn RunnerState>;

impl RunnerState for LocalState {
    fn with_state(&self, f: &mut dyn FnMut(&ClusterState)) {
        self.read(|s| f(s))
    }

    fn propose(&self, cmd: Command) -> BoxFuture<'_, ApiResult<Response>> {
        Box::pin(self.node().propose(cmd))
    }

    fn members(&self) -> Vec<(u64, String)> {
        LocalState::members(self)
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        LocalState::changes(self)
    }
}

/// A state for the runner's unit tests: a real `ClusterState` that proposals are applied
/// to at once, as a one-host cluster would, with transient failures to inject.
#[cfg(test)]
pub(crate) struct FakeState {
    state: std::sync::Mutex<ClusterState>,
    /// Every command proposed, applied or not.
    pub proposed: std::sync::Mutex<Vec<Command>>,
    /// This many proposals fail as if the leader were away before they apply again.
    pub unavailable: std::sync::atomic::AtomicUsize,
    changes: tokio::sync::watch::Sender<u64>,
}

#[cfg(test)]
impl FakeState {
    /// A bootstrapped cluster with nothing in it.
    pub fn booted() -> Arc<FakeState> {
        let mut s = ClusterState::default();
        s.apply(
            flynn_state::ClusterCommand::Bootstrap {
                auth_key: "0123456789abcdef0123".into(),
                domain: None,
                controller_certificate: None,
                system_env: Default::default(),
            }
            .into(),
        )
        .0
        .expect("bootstrap");
        Arc::new(FakeState {
            state: std::sync::Mutex::new(s),
            proposed: Default::default(),
            unavailable: Default::default(),
            changes: tokio::sync::watch::channel(0).0,
        })
    }

    /// Applies a command as the cluster would (what a test sets up).
    pub fn apply(&self, cmd: impl Into<Command>) -> Response {
        let r = self.state.lock().expect("fake state").apply(cmd.into()).0;
        self.changes.send_modify(|n| *n += 1);
        r.expect("the command applies")
    }
}

#[cfg(test)]
impl RunnerState for FakeState {
    fn with_state(&self, f: &mut dyn FnMut(&ClusterState)) {
        f(&self.state.lock().expect("fake state"))
    }

    fn propose(&self, cmd: Command) -> BoxFuture<'_, ApiResult<Response>> {
        use std::sync::atomic::Ordering;
        self.proposed.lock().expect("proposed").push(cmd.clone());
        let down = self
            .unavailable
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let r = if down {
            Err(crate::error::ApiError::Unavailable("no leader".into()))
        } else {
            let r = self.state.lock().expect("fake state").apply(cmd).0;
            self.changes.send_modify(|n| *n += 1);
            r.map_err(crate::error::ApiError::from)
        };
        Box::pin(async move { r })
    }

    fn members(&self) -> Vec<(u64, String)> {
        vec![(1, "127.0.0.1:1113".into())]
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}
