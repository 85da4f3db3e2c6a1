//! State shared by every listener of the data path.

use std::net::TcpStream as StdTcpStream;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::{oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::logging::AccessSink;
use crate::splice::Splicer;
use crate::upgrade::wire;

pub struct DataPath {
    /// The kernel path, when it loaded.
    pub splicer: Option<Arc<Splicer>>,
    /// `max_connections` permits; a session holds one for its lifetime.
    pub conn_limit: Arc<Semaphore>,
    /// Every session task, so SIGTERM can wait for them to drain.
    pub sessions: TaskTracker,
    /// Cancelled when the drain grace period is over: sessions still open end then.
    pub shutdown: CancellationToken,
    pub access_log: Arc<AccessSink>,
    pub handover: Handover,
}

impl DataPath {
    /// Wakes the sessions asleep in the kernel, so each sees a handover or shutdown
    /// that just began (a running session sees it on its own).
    pub fn wake_dormant(&self) {
        if let Some(splicer) = &self.splicer {
            splicer.wake_all();
        }
    }
}

/// A TCP session stopped at a clean point for a binary upgrade. `back` answers with
/// the sockets when the session stays in this process, or with nothing once the new
/// process took it.
pub struct Parked {
    pub session: wire::TcpSession,
    pub client: StdTcpStream,
    pub backend: StdTcpStream,
    pub back: oneshot::Sender<Option<(StdTcpStream, StdTcpStream)>>,
}

/// How a binary upgrade asks TCP sessions for their sockets: the control plane begins
/// a handover, sessions see the token and park themselves, and the upgrade answers each.
#[derive(Default)]
pub struct Handover {
    token: ArcSwap<CancellationToken>,
    parked: Mutex<Option<UnboundedSender<Parked>>>,
}

impl Handover {
    /// Cancelled while a handover runs; sessions select on the one current at each
    /// stage of their life.
    pub fn token(&self) -> CancellationToken {
        CancellationToken::clone(&self.token.load())
    }

    /// Sessions park into the returned receiver from now until [`Handover::end`].
    pub fn begin(&self) -> UnboundedReceiver<Parked> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.lock() = Some(tx);
        self.token.load().cancel();
        rx
    }

    /// Sessions that park from now on get their sockets back at once.
    pub fn end(&self) {
        *self.lock() = None;
        self.token.store(Arc::new(CancellationToken::new()));
    }

    /// Hands a parked session to the upgrade; gives it back when none runs.
    pub fn park(&self, parked: Parked) -> Option<Parked> {
        match self.lock().as_ref() {
            Some(tx) => tx.send(parked).err().map(|e| e.0),
            None => Some(parked),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<UnboundedSender<Parked>>> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }
}
