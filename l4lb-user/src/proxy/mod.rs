//! The data path: TCP accept/connect/retry, the userspace copy path, UDP sessions.
//! It only reads configuration snapshots and writes counters.

pub mod access;
pub mod connect;
pub mod copy;
pub mod pipe;
pub mod promotion;
pub mod proxy_protocol;
pub mod tcp;
pub mod udp;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::ServerConfig;
use crate::metrics::ListenerMetrics;
use crate::upstream::{Lease, Upstream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What a listener needs per connection; swapped whole on reload, so established
/// sessions keep the settings they started with.
#[derive(Debug)]
pub struct ListenerCtx {
    pub server: ServerConfig,
    pub upstream: Option<Arc<Upstream>>,
    pub metrics: ListenerMetrics,
    /// Shared by every configuration of the listener, so reloads keep the counts.
    pub conn_limits: Arc<access::ConnLimits>,
}

pub type SharedCtx = Arc<ArcSwap<ListenerCtx>>;

/// What a session handed over by another process (binary upgrade) holds here, as any
/// session does: a `max_connections` place, a lease on its server (so least_conn counts
/// it), and its client's `limit_conn` place when there is room.
pub struct HandedOver {
    pub permit: OwnedSemaphorePermit,
    pub lease: Lease,
    pub slot: Option<access::ConnSlot>,
}

impl HandedOver {
    /// Refused (the old process keeps the session) when there is no room or no
    /// upstream for it here.
    pub fn admit(
        ctx: &ListenerCtx,
        permits: &Arc<Semaphore>,
        client: SocketAddr,
        server: SocketAddr,
    ) -> Result<HandedOver, String> {
        let permit = Arc::clone(permits)
            .try_acquire_owned()
            .map_err(|_| "max_connections reached".to_string())?;
        let upstream = ctx
            .upstream
            .as_ref()
            .ok_or_else(|| format!("listener {} has no upstream here", ctx.server.listen))?;
        let slot = match ctx.server.limit_conn {
            0 => None,
            limit => ctx.conn_limits.try_acquire(client.ip(), limit),
        };
        Ok(HandedOver {
            permit,
            lease: upstream.lease_for(server),
            slot,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Backend => "backend",
        })
    }
}

/// How a session ended, for the access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// Both directions finished with FIN.
    Closed,
    /// `proxy_timeout` passed with no traffic.
    IdleTimeout,
    /// A side reset the connection.
    Reset(Side),
    /// Another I/O error on a side.
    Error(Side, String),
    /// The daemon stopped before the session finished.
    Shutdown,
    /// A bug: the session's code panicked (counted in `session_panics`).
    Panic,
}

impl SessionEnd {
    pub fn error(side: Side, e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => SessionEnd::Reset(side),
            _ => SessionEnd::Error(side, e.to_string()),
        }
    }
}

impl fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionEnd::Closed => f.write_str("closed"),
            SessionEnd::IdleTimeout => f.write_str("idle_timeout"),
            SessionEnd::Reset(side) => write!(f, "{side}_reset"),
            SessionEnd::Error(side, e) => write!(f, "{side}_error({e})"),
            SessionEnd::Shutdown => f.write_str("shutdown"),
            SessionEnd::Panic => f.write_str("panic"),
        }
    }
}

/// Out of descriptors or memory on this host: not a peer's fault.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
