//! One io_uring per worker thread, driven from inside the worker's tokio runtime.
//!
//! Tasks queue submissions as they run; a single drive task submits them all in one
//! `io_uring_enter` per loop turn (tokio runs it after the tasks it woke, so a turn's
//! submissions are batched), then hands each completion to the operation it belongs to and
//! wakes its task. The worker sleeps in one place, tokio's `epoll_wait`; the ring wakes it
//! through a registered eventfd that tokio's reactor watches.
//!
//! The ring runs its task work cooperatively (`COOP_TASKRUN`), not deferred
//! (`DEFER_TASKRUN`). With deferred task work the kernel signals the eventfd of a completion
//! that arrives from the network (in softirq context) through an RCU callback, one grace
//! period later: 16-30 ms per wake-up on this 6.18 kernel, measured with the `io_uring` and
//! `irq:softirq_entry` trace events (the worker was woken from the RCU softirq). A deferred
//! ring is only prompt for a task that sleeps in `io_uring_enter` itself, which tokio's
//! reactor does not. Cooperative task work wakes a sleeping worker at once (its
//! `epoll_wait` returns, the task work posts the completions on the way out, and the eventfd
//! is signalled from the task's own context), and, as with deferred work, never interrupts
//! a running one. `t10` in the tests guards this.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use slab::Slab;
use tokio::io::unix::AsyncFd;

use crate::bufring::BufRing;
pub(crate) use crate::send::SendOp;
use crate::send::Sent;

/// Completions carrying this are not anybody's (cancellations, whose effect shows on the
/// cancelled operation).
pub(crate) const IGNORED: u64 = u64::MAX;

/// A receive queue holding this many filled buffers stops receiving until it is read, so one
/// slow reader cannot take the whole buffer ring.
pub(crate) const MAX_QUEUED_BUFFERS: usize = 8;

/// Sizes of one worker's ring.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Submission queue entries (the completion queue is four times this).
    pub entries: u32,
    /// Provided receive buffers (a power of two).
    pub buffers: u16,
    /// Bytes per receive buffer.
    pub buffer_size: usize,
    /// Registered-file slots; connections beyond them use plain descriptors.
    pub files: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            entries: 1024,
            buffers: 1024,
            buffer_size: 8 * 1024,
            files: 8192,
        }
    }
}

/// How the ring was set up, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskRun {
    /// `COOP_TASKRUN | TASKRUN_FLAG`: completions are posted at the worker's next kernel
    /// entry or exit, without interrupting it while it runs (5.19+).
    Cooperative,
    /// Neither: the kernel interrupts the worker to post completions (older kernels).
    Interrupting,
}

impl TaskRun {
    pub fn name(self) -> &'static str {
        match self {
            TaskRun::Cooperative => "cooperative",
            TaskRun::Interrupting => "interrupting",
        }
    }
}

/// Counters of one ring (read by the router's metrics).
#[derive(Debug, Default)]
pub struct Stats {
    pub enters: Cell<u64>,
    pub submitted: Cell<u64>,
    pub completions: Cell<u64>,
    /// Receives that found the buffer ring empty.
    pub buffers_exhausted: Cell<u64>,
}

/// Where an operation's socket is: a registered-file slot, or a plain descriptor.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target {
    Fixed(u32),
    Fd(RawFd),
}

macro_rules! with_target {
    ($t:expr, |$fd:ident| $build:expr) => {
        match $t {
            Target::Fixed(i) => {
                let $fd = types::Fixed(i);
                $build
            }
            Target::Fd(f) => {
                let $fd = types::Fd(f);
                $build
            }
        }
    };
}

pub(crate) enum Op {
    Accept(AcceptOp),
    Recv(RecvOp),
    Send(SendOp),
}

#[derive(Default)]
pub(crate) struct AcceptOp {
    /// Accepted descriptors (or negative errnos) not yet taken.
    pub queue: VecDeque<i32>,
    pub armed: bool,
    pub waker: Option<Waker>,
    /// The listener is gone: close what still arrives, free the slot at the last completion.
    pub orphan: bool,
}

#[derive(Default)]
pub(crate) struct RecvOp {
    /// Completions (result, flags) not yet read: data in a provided buffer, 0 for EOF, or an
    /// error.
    pub queue: VecDeque<(i32, u32)>,
    /// An operation of this slot is in the kernel (the multishot receive, or a direct one).
    pub armed: bool,
    pub cancelling: bool,
    pub waker: Option<Waker>,
    pub orphan: bool,
    /// One receive per read (into one provided buffer), not a multishot: what the peer sends
    /// beyond it waits in the socket, held back by TCP's flow control, instead of filling
    /// the ring's shared buffers (backend connections, whose large responses a relay then
    /// takes by direct receives).
    pub on_demand: bool,
    /// A direct receive: one-shot, into this buffer the slot owns (a bulk relay's, sent on
    /// uncopied), and its result once it completes.
    pub direct: Option<Vec<u8>>,
    pub direct_res: Option<i32>,
}

pub(crate) struct State {
    pub ops: Slab<Op>,
    pub bufs: BufRing,
    pub buf_waiters: Vec<Waker>,
    driver_waker: Option<Waker>,
}

/// One worker's ring.
pub struct Driver {
    ring: IoUring,
    pub(crate) st: RefCell<State>,
    free_files: RefCell<Vec<u32>>,
    needs_turn: Cell<bool>,
    pub stats: Stats,
    pub taskrun: TaskRun,
    config: Config,
}

fn build_ring(entries: u32) -> io::Result<(IoUring, TaskRun)> {
    // Tried in order; EINVAL means the kernel does not know a flag (SINGLE_ISSUER is 6.0,
    // COOP_TASKRUN 5.19).
    let attempts: [(bool, bool); 3] = [(true, true), (false, true), (false, false)];
    let mut last = io::Error::from_raw_os_error(libc::EINVAL);
    for (single_issuer, coop) in attempts {
        let mut b = IoUring::builder();
        b.setup_cqsize(entries * 4);
        if single_issuer {
            b.setup_single_issuer();
        }
        if coop {
            b.setup_coop_taskrun().setup_taskrun_flag();
        }
        match b.build(entries) {
            Ok(r) => {
                let mode = if coop {
                    TaskRun::Cooperative
                } else {
                    TaskRun::Interrupting
                };
                return Ok((r, mode));
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Whether io_uring can run here, with every feature this backend uses; `Err` says why not.
pub fn probe() -> Result<TaskRun, String> {
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        if v.trim() == "2" {
            return Err("io_uring is disabled (kernel.io_uring_disabled=2)".into());
        }
    }
    let (ring, taskrun) = build_ring(8).map_err(|e| format!("io_uring_setup: {e}"))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring probe: {e}"))?;
    // SendZc arrived with multishot receive (6.0); its presence stands for both.
    for (code, name) in [
        (opcode::AcceptMulti::CODE, "accept"),
        (opcode::RecvMulti::CODE, "recv"),
        (opcode::SendZc::CODE, "multishot receive (6.0)"),
        (opcode::AsyncCancel::CODE, "cancel"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("the kernel's io_uring lacks {name}"));
        }
    }
    BufRing::new(&ring, 0, 8, 64).map_err(|e| format!("provided buffer ring: {e}"))?;
    Ok(taskrun)
}

impl Driver {
    /// Sets up this thread's ring and starts its drive task. Call inside a `LocalSet`.
    pub fn start(config: Config) -> io::Result<Rc<Driver>> {
        let (ring, taskrun) = build_ring(config.entries)?;
        let bufs = BufRing::new(&ring, 0, config.buffers, config.buffer_size)?;
        // SAFETY: eventfd(2) returns a new descriptor or -1, checked before it is owned.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a fresh descriptor nobody else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        let files = match ring.submitter().register_files_sparse(config.files) {
            Ok(()) => (0..config.files).rev().collect(),
            Err(e) => {
                tracing::debug!(error = %e, "no registered files: plain descriptors");
                Vec::new()
            }
        };
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same
        // file for as long as it is registered.
        let efd = unsafe { AsyncFd::register_with_interest(efd, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        let drv = Rc::new(Driver {
            ring,
            st: RefCell::new(State {
                ops: Slab::with_capacity(256),
                bufs,
                buf_waiters: Vec::new(),
                driver_waker: None,
            }),
            free_files: RefCell::new(files),
            needs_turn: Cell::new(false),
            stats: Stats::default(),
            taskrun,
            config,
        });
        tokio::task::spawn_local(drive(Rc::downgrade(&drv), efd));
        Ok(drv)
    }

    pub fn config(&self) -> Config {
        self.config
    }

    /// Operations with a slot (listeners, streams, sends still finishing after a close).
    pub fn live_ops(&self) -> usize {
        self.st.borrow().ops.len()
    }

    /// Receive buffers the kernel can fill now.
    pub fn free_buffers(&self) -> usize {
        self.st.borrow().bufs.available()
    }

    /// Queues one submission (sent at the end of this loop turn).
    ///
    /// # Safety
    /// Every pointer in `sqe` must stay valid until its completion arrives (the operation's
    /// slot owns the memory), and its user data must name a live slot or be `IGNORED`.
    pub(crate) unsafe fn push(&self, sqe: &squeue::Entry) {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.push_nowake(sqe) };
        self.wake_with(&self.st.borrow());
    }

    /// Makes sure the drive task runs this turn (`st`: the state, which the caller may hold).
    pub(crate) fn wake_with(&self, st: &State) {
        if !self.needs_turn.replace(true) {
            if let Some(w) = &st.driver_waker {
                w.wake_by_ref();
            }
        }
    }

    /// Registers `fd` in a free registered-file slot, if there is one.
    pub(crate) fn register(&self, fd: RawFd) -> Target {
        let Some(slot) = self.free_files.borrow_mut().pop() else {
            return Target::Fd(fd);
        };
        match self.ring.submitter().register_files_update(slot, &[fd]) {
            Ok(_) => Target::Fixed(slot),
            Err(_) => {
                self.free_files.borrow_mut().push(slot);
                Target::Fd(fd)
            }
        }
    }

    /// Frees a registered-file slot: the ring drops its reference to the socket (operations
    /// in flight keep their own until they complete).
    pub(crate) fn unregister(&self, target: Target) {
        if let Target::Fixed(slot) = target {
            if self
                .ring
                .submitter()
                .register_files_update(slot, &[-1])
                .is_ok()
            {
                self.free_files.borrow_mut().push(slot);
            }
        }
    }

    /// Asks the kernel to cancel the operation in slot `ud` (its last completion follows).
    pub(crate) fn cancel(&self, ud: usize) {
        let sqe = opcode::AsyncCancel::new(ud as u64)
            .build()
            .user_data(IGNORED);
        // SAFETY: a cancellation carries no pointers; its completion is ignored.
        unsafe { self.push(&sqe) };
    }

    pub(crate) fn arm_recv(&self, st: &mut State, ud: usize, target: Target) {
        let group = st.bufs.group;
        let Some(Op::Recv(r)) = st.ops.get_mut(ud) else {
            return;
        };
        r.armed = true;
        let sqe = if r.on_demand {
            with_target!(target, |fd| opcode::Recv::new(fd, std::ptr::null_mut(), 0)
                .buf_group(group)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
                .user_data(ud as u64))
        } else {
            with_target!(target, |fd| opcode::RecvMulti::new(fd, group)
                .build()
                .user_data(ud as u64))
        };
        self.wake_with(st);
        // SAFETY: the receive writes only into provided buffers (owned by `st.bufs`, which
        // outlives the ring's use of them); `ud` is the stream's live receive slot.
        unsafe { self.push_nowake(&sqe) };
    }

    /// Receives into the slot's direct buffer, after its `len` bytes: at most `max` bytes,
    /// and no more than its capacity.
    pub(crate) fn arm_direct(&self, st: &mut State, ud: usize, target: Target, max: usize) {
        let Some(Op::Recv(r)) = st.ops.get_mut(ud) else {
            return;
        };
        let Some(buf) = &mut r.direct else { return };
        let spare = buf.spare_capacity_mut();
        let len = spare.len().min(max).min(u32::MAX as usize) as u32;
        let ptr = spare.as_mut_ptr().cast::<u8>();
        let sqe = with_target!(target, |fd| opcode::Recv::new(fd, ptr, len)
            .build()
            .user_data(ud as u64));
        r.armed = true;
        r.direct_res = None;
        self.wake_with(st);
        // SAFETY: the kernel writes into the spare capacity of the slot's own `direct`
        // buffer, which stays in the slot, unread and unmoved (its heap block, that is), until
        // this receive completes; an orphaned slot keeps it until then too.
        unsafe { self.push_nowake(&sqe) };
    }

    pub(crate) fn arm_accept(&self, st: &mut State, ud: usize, fd: RawFd) {
        let sqe = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(ud as u64);
        if let Some(Op::Accept(a)) = st.ops.get_mut(ud) {
            a.armed = true;
        }
        self.wake_with(st);
        // SAFETY: accept carries no buffers; `ud` is the listener's live slot.
        unsafe { self.push_nowake(&sqe) };
    }

    /// Submits what send slot `ud` has in flight.
    pub(crate) fn submit_send(&self, ud: usize, s: &mut SendOp, bufs: &BufRing) {
        let sqe = s.sqe(ud as u64, bufs);
        // SAFETY: the chunks, iovecs and header the entry points to belong to send slot `ud`
        // and are neither changed nor freed while it is `busy` (set by `start`), which lasts
        // until this send completes; provided buffers among them stay out of the ring until
        // then.
        unsafe { self.push_nowake(&sqe) };
    }

    /// `push` without waking the drive task: for callers that hold the state (they wake it
    /// through `wake_with`) or run inside the turn.
    ///
    /// # Safety
    /// As for `push`.
    unsafe fn push_nowake(&self, sqe: &squeue::Entry) {
        // SAFETY: single thread, and no other SubmissionQueue handle is alive: every use of
        // `submission_shared` in this crate ends before it returns.
        let mut sq = unsafe { self.ring.submission_shared() };
        if sq.is_full() {
            drop(sq);
            if let Err(e) = self.ring.submitter().submit() {
                tracing::warn!(error = %e, "io_uring submit with a full queue");
            }
            self.stats.enters.set(self.stats.enters.get() + 1);
            // SAFETY: as above.
            sq = unsafe { self.ring.submission_shared() };
        }
        // SAFETY: forwarded from the caller's contract.
        if unsafe { sq.push(sqe) }.is_err() {
            tracing::error!("io_uring submission queue still full after a submit");
        }
        self.stats.submitted.set(self.stats.submitted.get() + 1);
    }

    /// One loop turn: submit what is queued, let the kernel post pending completions,
    /// dispatch them. Returns whether work is left for another turn.
    fn turn(&self) -> bool {
        // Completions that our own enters post are reaped right here: they need no wake-up.
        // SAFETY: single thread; no other CompletionQueue handle is alive.
        unsafe { self.ring.completion_shared() }.disable_eventfd();
        for _ in 0..8 {
            let (pending, taskrun, overflow) = {
                // SAFETY: see `push`.
                let sq = unsafe { self.ring.submission_shared() };
                (sq.len(), sq.taskrun(), sq.cq_overflow())
            };
            // Nothing to submit and no task work waiting: the completions are already in
            // the queue (task work ran when the worker left epoll_wait), so no enter.
            if pending > 0 || taskrun || overflow {
                self.enter(pending as u32);
            }
            let mut st = self.st.borrow_mut();
            loop {
                // SAFETY: single thread; no other CompletionQueue handle is alive.
                let cqe = unsafe { self.ring.completion_shared() }.next();
                let Some(cqe) = cqe else { break };
                self.stats.completions.set(self.stats.completions.get() + 1);
                self.dispatch(&mut st, cqe);
            }
            drop(st);
            // SAFETY: see `push`.
            if unsafe { self.ring.submission_shared() }.is_empty() {
                break;
            }
        }
        // SAFETY: single thread; no other CompletionQueue handle is alive.
        unsafe { self.ring.completion_shared() }.enable_eventfd();
        // A completion posted after the last reap and before the eventfd was enabled again
        // signalled nothing: look once more (the fence orders the flag's store before it).
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        // SAFETY: see `push` and above.
        let sq = unsafe { self.ring.submission_shared() };
        // SAFETY: as above.
        !sq.is_empty() || sq.taskrun() || !unsafe { self.ring.completion_shared() }.is_empty()
    }

    /// `io_uring_enter`: submits `pending` entries and runs the ring's pending task work.
    fn enter(&self, pending: u32) {
        // SAFETY: a plain io_uring_enter with no signal mask or extended argument.
        let r = unsafe {
            self.ring.submitter().enter::<libc::sigset_t>(
                pending,
                0,
                io_uring::EnterFlags::GETEVENTS.bits(),
                None,
            )
        };
        self.stats.enters.set(self.stats.enters.get() + 1);
        if let Err(e) = r {
            // EBUSY/EAGAIN: the completion queue is full; reaping makes room.
            if !matches!(
                e.raw_os_error(),
                Some(libc::EBUSY | libc::EAGAIN | libc::EINTR)
            ) {
                tracing::warn!(error = %e, "io_uring_enter");
            }
        }
    }

    fn dispatch(&self, st: &mut State, cqe: cqueue::Entry) {
        let ud = cqe.user_data();
        if ud == IGNORED {
            return;
        }
        let (res, flags) = (cqe.result(), cqe.flags());
        let more = cqueue::more(flags);
        let ud = ud as usize;
        let State {
            ops,
            bufs,
            buf_waiters,
            ..
        } = st;
        let Some(op) = ops.get_mut(ud) else { return };
        let mut remove = false;
        match op {
            Op::Accept(a) => {
                if !more {
                    a.armed = false;
                }
                if a.orphan {
                    if res >= 0 {
                        // SAFETY: a descriptor the kernel just accepted for us; nobody owns it.
                        drop(unsafe { OwnedFd::from_raw_fd(res) });
                    }
                    remove = !a.armed;
                } else {
                    if res != -libc::ECANCELED {
                        a.queue.push_back(res);
                    }
                    if let Some(w) = &a.waker {
                        w.wake_by_ref();
                    }
                }
            }
            Op::Recv(r) => {
                let bid = cqueue::buffer_select(flags);
                if bid.is_some() {
                    bufs.taken();
                }
                if !more {
                    r.armed = false;
                    r.cancelling = false;
                }
                if r.orphan {
                    if let Some(bid) = bid {
                        bufs.recycle(bid);
                        wake_all(buf_waiters);
                    }
                    remove = !r.armed;
                } else if r.direct.is_some() && bid.is_none() && r.direct_res.is_none() {
                    // The direct receive's completion (a multishot ended before it began).
                    r.direct_res = Some(res);
                    if let Some(w) = &r.waker {
                        w.wake_by_ref();
                    }
                } else {
                    match res {
                        e if e == -libc::ECANCELED => {}
                        e if e == -libc::ENOBUFS => {
                            let n = &self.stats.buffers_exhausted;
                            n.set(n.get() + 1);
                        }
                        _ => r.queue.push_back((res, flags)),
                    }
                    if r.armed && !r.cancelling && r.queue.len() >= MAX_QUEUED_BUFFERS {
                        r.cancelling = true;
                        let sqe = opcode::AsyncCancel::new(ud as u64)
                            .build()
                            .user_data(IGNORED);
                        // SAFETY: a cancellation carries no pointers.
                        unsafe { self.push_nowake(&sqe) };
                    }
                    if let Some(w) = &r.waker {
                        w.wake_by_ref();
                    }
                }
            }
            Op::Send(s) => {
                let before = bufs.available();
                if let Sent::Again = s.completed(res, bufs) {
                    self.submit_send(ud, s, bufs);
                }
                if bufs.available() > before {
                    wake_all(buf_waiters);
                }
                if let Some(w) = &s.waker {
                    w.wake_by_ref();
                }
                remove = !s.busy && s.keep.is_some();
            }
        }
        if remove {
            // A send slot's `keep` may be the last handle on its socket: its Drop unregisters
            // the file, which touches no state borrowed here.
            ops.remove(ud);
        }
    }
}

pub(crate) fn wake_all(waiters: &mut Vec<Waker>) {
    for w in waiters.drain(..) {
        w.wake();
    }
}

/// Stores `cx`'s waker in `slot` unless it is already there.
pub(crate) fn set_waker(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// The drive task: one turn whenever submissions are queued or the kernel signalled work.
async fn drive(drv: std::rc::Weak<Driver>, efd: AsyncFd<OwnedFd>) {
    loop {
        let ready = std::future::poll_fn(|cx| {
            let Some(d) = drv.upgrade() else {
                return Poll::Ready(false);
            };
            set_waker(&mut d.st.borrow_mut().driver_waker, cx);
            let mut ready = d.needs_turn.replace(false);
            // The readiness is cleared before the turn's enter, so a signal that arrives
            // during the turn is seen at the next poll rather than lost.
            if let Poll::Ready(Ok(mut g)) = efd.poll_read_ready(cx) {
                g.clear_ready();
                ready = true;
            }
            if ready {
                Poll::Ready(true)
            } else {
                Poll::Pending
            }
        })
        .await;
        if !ready {
            return;
        }
        let Some(d) = drv.upgrade() else { return };
        if d.turn() {
            // More arrived during the turn: take it after the tasks just woken have run.
            d.needs_turn.set(true);
            drop(d);
            tokio::task::yield_now().await;
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The kernel must stop picking our receive buffers before their memory goes.
        self.st.get_mut().bufs.unregister(&self.ring);
    }
}

/// A socket the ring uses: the descriptor, and the registered-file slot naming it.
pub(crate) struct Conn {
    pub tcp: std::net::TcpStream,
    pub target: Target,
    pub drv: std::rc::Weak<Driver>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(d) = self.drv.upgrade() {
            d.unregister(self.target);
        }
        // `tcp` closes the descriptor after this.
    }
}
