//! State shared by every listener of the data path.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::logging::AccessSink;
use crate::splice::Splicer;

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
}
