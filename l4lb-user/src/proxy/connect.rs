//! Backend connect with nginx's `proxy_connect_timeout` and `proxy_next_upstream*`.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::net::TcpStream;
use tracing::warn;

use crate::config::ServerConfig;
use crate::upstream::{Lease, Upstream};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A local resource ran out (descriptors, memory): not counted against any server.
    #[error("cannot open a connection to {server}: {source}")]
    Local {
        server: SocketAddr,
        source: std::io::Error,
    },
    #[error("no available server in upstream {0}")]
    NoServer(String),
    #[error("all tries failed for upstream {upstream} ({tries} tried)")]
    Exhausted { upstream: String, tries: usize },
}

/// Connects to a server of `upstream`, trying the next one on failure as configured.
/// Each server is tried at most once per client connection.
pub async fn connect(
    upstream: &Upstream,
    server: &ServerConfig,
    client: SocketAddr,
) -> Result<(TcpStream, Lease), ConnectError> {
    let started = Instant::now();
    let mut tried: Vec<SocketAddr> = Vec::new();
    loop {
        let Some(lease) = upstream.select(client.ip(), &tried) else {
            return Err(if tried.is_empty() {
                ConnectError::NoServer(upstream.name.clone())
            } else {
                ConnectError::Exhausted {
                    upstream: upstream.name.clone(),
                    tries: tried.len(),
                }
            });
        };
        let addr = lease.spec.addr;
        tried.push(addr);
        let connecting = Instant::now();
        let err = match tokio::time::timeout(server.proxy_connect_timeout, TcpStream::connect(addr))
            .await
        {
            Ok(Ok(stream)) => {
                upstream
                    .connect_seconds
                    .observe(connecting.elapsed().as_secs_f64());
                lease.connect_succeeded();
                // nginx's stream module sets TCP_NODELAY on both sides by default.
                let _ = stream.set_nodelay(true);
                return Ok((stream, lease));
            }
            Ok(Err(e)) if super::is_resource_exhaustion(&e) => {
                return Err(ConnectError::Local {
                    server: addr,
                    source: e,
                });
            }
            // Not counted against the server (see `is_port_shortage`), but the next
            // server may still be reached.
            Ok(Err(e)) if super::is_port_shortage(&e) => {
                format!("{e} (no local port free towards it; not counted against it)")
            }
            Ok(Err(e)) => {
                lease.connect_failed(&upstream.name);
                e.to_string()
            }
            Err(_) => {
                lease.connect_failed(&upstream.name);
                format!("timed out after {:?}", server.proxy_connect_timeout)
            }
        };
        warn!(%client, upstream = %upstream.name, server = %addr, error = %err, "connect to upstream failed");
        drop(lease);
        let tries_left = server.proxy_next_upstream_tries == 0
            || tried.len() < server.proxy_next_upstream_tries as usize;
        let time_left = server.proxy_next_upstream_timeout.is_zero()
            || started.elapsed() < server.proxy_next_upstream_timeout;
        if !(server.proxy_next_upstream && tries_left && time_left) {
            return Err(ConnectError::Exhausted {
                upstream: upstream.name.clone(),
                tries: tried.len(),
            });
        }
    }
}
