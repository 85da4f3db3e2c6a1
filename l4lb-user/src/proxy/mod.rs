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

impl ListenerCtx {
    /// Whether a new session from `ip` may start (`allow`/`deny`, then `limit_conn`):
    /// its `limit_conn` place if it may, else the refusal's reason, counted.
    pub fn admit(&self, ip: std::net::IpAddr) -> Result<Option<access::ConnSlot>, &'static str> {
        if !access::allowed(&self.server.access, ip) {
            self.metrics.denied.inc();
            return Err("denied");
        }
        match self.server.limit_conn {
            0 => Ok(None),
            limit => match self.conn_limits.try_acquire(ip, limit) {
                Some(slot) => Ok(Some(slot)),
                None => {
                    self.metrics.limit_conn.inc();
                    Err("limit_conn")
                }
            },
        }
    }
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

/// Out of descriptors or memory on this host: not a peer's fault.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// A connect's EADDRNOTAVAIL: no local port is free towards that server (all in use or
/// in TIME_WAIT). Not the server's fault, but only that destination's: another server
/// may still be reached.
pub fn is_port_shortage(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
}
