//! TCP listeners: accept (with backoff), connect with retries, then hand the pair to the
//! kernel splice path or the userspace copy path, and write the access log line.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::access::{self, ConnSlot};
use super::connect::{connect, ConnectError};
use super::copy::{copy, CopyEnd, CopyLimits, Transfer};
use super::promotion::{self, Decision};
use super::{is_resource_exhaustion, proxy_protocol, ListenerCtx, SessionEnd, SharedCtx, Side};
use crate::config::{ServerConfig, SpliceMode};
use crate::metrics::{self, CopyReason, METRICS};
use crate::panic;
use crate::runtime::DataPath;
use crate::splice::{KernelEnd, Path, Splicer};
use crate::upstream::Lease;

/// How often an accept error (fd exhaustion, ...) is logged while it persists.
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);

pub async fn serve(
    listener: TcpListener,
    ctx: SharedCtx,
    dp: Arc<DataPath>,
    stop: CancellationToken,
) {
    let mut last_error_log: Option<Instant> = None;
    let mut last_limit_log: Option<Instant> = None;
    loop {
        let permit = match Arc::clone(&dp.conn_limit).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if last_limit_log.is_none_or(|t| t.elapsed() >= ACCEPT_ERROR_LOG_INTERVAL) {
                    warn!(listen = %ctx.load().server.listen, "max_connections reached; not accepting until sessions end");
                    last_limit_log = Some(Instant::now());
                }
                tokio::select! {
                    p = Arc::clone(&dp.conn_limit).acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                    () = stop.cancelled() => return,
                }
            }
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((client, peer)) => {
                let ctx = ctx.load_full();
                ctx.metrics.accepted.inc();
                let dp2 = Arc::clone(&dp);
                dp.sessions.spawn(session(ctx, dp2, client, peer, permit));
                // Let it start before the next accept: tokio runs the newest task
                // first, so two clients accepted together would otherwise reach their
                // backend in reverse order, which clients that open several connections
                // rely on (iperf3 --bidir deadlocked on it 1 run in 4).
                tokio::task::yield_now().await;
            }
            Err(e) => {
                if last_error_log.is_none_or(|t| t.elapsed() >= ACCEPT_ERROR_LOG_INTERVAL) {
                    warn!(listen = %ctx.load().server.listen, error = %e, "accept failed; backing off");
                    last_error_log = Some(Instant::now());
                }
                // Out of descriptors or memory: retrying at once would spin.
                if is_resource_exhaustion(&e) {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                        () = stop.cancelled() => return,
                    }
                }
            }
        }
    }
}

/// Why this session cannot use the kernel path, if it cannot.
fn copy_reason(server: &ServerConfig, dp: &DataPath) -> Option<CopyReason> {
    if server.splice == SpliceMode::Off {
        Some(CopyReason::SpliceOff)
    } else if server.proxy_upload_rate > 0 || server.proxy_download_rate > 0 {
        Some(CopyReason::RateLimited)
    } else if dp.splicer.is_none() {
        Some(CopyReason::KernelUnavailable)
    } else {
        None
    }
}

async fn session(
    ctx: Arc<ListenerCtx>,
    dp: Arc<DataPath>,
    client: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    ctx.metrics.active.inc();
    let started = Instant::now();
    let server = &ctx.server;
    let transfer = Transfer::default();
    // The client as the session knows it: a PROXY header from a balancer may name it.
    let mut peer = peer;
    let outcome = tokio::select! {
        o = proxy(&ctx, &dp, client, &mut peer, &transfer) => o,
        () = dp.shutdown.cancelled() => Outcome::ended(None, SessionEnd::Shutdown),
    };
    ctx.metrics.active.dec();
    ctx.metrics
        .session_seconds
        .observe(started.elapsed().as_secs_f64());
    match outcome.path {
        Some(Path::Kernel) => ctx.metrics.ended_on(None),
        Some(Path::Copy(reason)) => ctx.metrics.ended_on(Some(reason)),
        None => {}
    }
    if dp.access_log.enabled() {
        info!(
            target: "access",
            client = %peer,
            listen = %server.listen,
            upstream = server.proxy_pass.as_deref().unwrap_or("-"),
            server = %outcome.backend.map_or_else(|| "-".to_string(), |a| a.to_string()),
            sent = transfer.download(),
            received = transfer.upload(),
            duration_ms = started.elapsed().as_millis() as u64,
            path = outcome.path.map_or_else(|| "-".to_string(), |p| p.to_string()),
            end = %outcome.end,
        );
    }
}

struct Outcome {
    backend: Option<SocketAddr>,
    end: String,
    path: Option<Path>,
}

impl Outcome {
    fn ended(backend: Option<SocketAddr>, end: impl ToString) -> Self {
        Outcome {
            backend,
            end: end.to_string(),
            path: None,
        }
    }
}

/// Runs a session in two caught phases. A panic while the backend is chosen and
/// connected leaves the client socket here, so the client gets a clean close (FIN, not
/// a reset); a panic while forwarding has already dropped the sockets in the unwind.
/// Either way it is counted and logged once with the session's addresses.
async fn proxy(
    ctx: &ListenerCtx,
    dp: &DataPath,
    mut client: TcpStream,
    peer: &mut SocketAddr,
    transfer: &Transfer,
) -> Outcome {
    let listen = &ctx.server.listen;
    let established = match panic::catch(establish(ctx, &mut client, peer)).await {
        Ok(Ok(e)) => e,
        Ok(Err(outcome)) => {
            close_cleanly(client).await;
            return outcome;
        }
        Err(panicked) => {
            METRICS.session_panics.inc();
            ctx.metrics.panicked.inc();
            error!(client = %peer, %listen, panic = %panicked, "session panicked before forwarding; closing the client");
            close_cleanly(client).await;
            return Outcome::ended(None, SessionEnd::Panic);
        }
    };
    let backend_addr = established.lease.spec.addr;
    match panic::catch(forward(ctx, dp, client, established, transfer)).await {
        Ok(outcome) => outcome,
        Err(panicked) => {
            METRICS.session_panics.inc();
            error!(client = %peer, %listen, server = %backend_addr, panic = %panicked, "session panicked while forwarding");
            Outcome::ended(Some(backend_addr), SessionEnd::Panic)
        }
    }
}

/// A session with its backend connected, ready to forward.
struct Established {
    backend: TcpStream,
    lease: Lease,
    /// The client's place under `limit_conn`, held for the session.
    _slot: Option<ConnSlot>,
    /// Client bytes that came with a PROXY header and were sent on already.
    early_bytes: u64,
}

/// Admits the client (PROXY header, `access`, `limit_conn`), then chooses and connects
/// a backend and sends it the PROXY header and any early client bytes.
async fn establish(
    ctx: &ListenerCtx,
    client: &mut TcpStream,
    peer: &mut SocketAddr,
) -> Result<Established, Outcome> {
    let server = &ctx.server;
    let mut early = Vec::new();
    if server.proxy_protocol_in {
        match proxy_protocol::receive(client, server.proxy_protocol_timeout).await {
            Ok(received) => {
                *peer = received.client.unwrap_or(*peer);
                early = received.leftover;
            }
            Err(e) => {
                ctx.metrics.proxy_protocol.inc();
                debug!(client = %peer, listen = %server.listen, error = %e, "closing client: no valid PROXY header");
                return Err(Outcome::ended(None, "proxy_protocol_error"));
            }
        }
    }
    let peer = *peer;
    if !access::allowed(&server.access, peer.ip()) {
        ctx.metrics.denied.inc();
        return Err(Outcome::ended(None, "denied"));
    }
    let slot = match server.limit_conn {
        0 => None,
        limit => match ctx.conn_limits.try_acquire(peer.ip(), limit) {
            Some(slot) => Some(slot),
            None => {
                ctx.metrics.limit_conn.inc();
                return Err(Outcome::ended(None, "limit_conn"));
            }
        },
    };
    let Some(upstream) = ctx.upstream.as_ref() else {
        return Err(Outcome::ended(None, "no_upstream"));
    };
    let _ = client.set_nodelay(true);
    let (mut backend, lease) = connect(upstream, server, peer).await.map_err(|e| {
        match e {
            ConnectError::NoServer(_) => ctx.metrics.no_server.inc(),
            _ => ctx.metrics.connect_failed.inc(),
        };
        warn!(client = %peer, listen = %server.listen, error = %e, "closing client: no upstream server reachable");
        Outcome::ended(None, "connect_failed")
    })?;
    let mut first = client
        .local_addr()
        .ok()
        .and_then(|local| proxy_protocol::header(server.proxy_protocol, peer, local))
        .unwrap_or_default();
    first.extend_from_slice(&early);
    if !first.is_empty() {
        if let Err(e) = backend.write_all(&first).await {
            return Err(Outcome::ended(
                Some(lease.spec.addr),
                SessionEnd::error(super::Side::Backend, &e),
            ));
        }
    }
    Ok(Established {
        backend,
        lease,
        _slot: slot,
        early_bytes: early.len() as u64,
    })
}

/// Forwards the connected pair: on the copy path, moved into the kernel once the
/// session earns it (see `promotion`), and back to the copy path if it has to leave.
/// The session owns its sockets and counts; the two paths are tools it hands them to.
async fn forward(
    ctx: &ListenerCtx,
    dp: &DataPath,
    mut client: TcpStream,
    established: Established,
    transfer: &Transfer,
) -> Outcome {
    let Established {
        mut backend,
        lease,
        _slot,
        early_bytes,
    } = established;
    let server = &ctx.server;
    let limits = CopyLimits {
        idle_timeout: server.proxy_timeout,
        upload_rate: server.proxy_upload_rate,
        download_rate: server.proxy_download_rate,
    };
    let (end, path) = match (copy_reason(server, dp), dp.splicer.as_ref()) {
        (None, Some(splicer)) => {
            let started = tokio::time::Instant::now();
            let stop = CancellationToken::new();
            let mut decision = Decision::default();
            let copied = if promotion::at_once(server.splice_after) {
                CopyEnd::Stopped
            } else {
                let copying = copy(&mut client, &mut backend, limits, transfer, Some(&stop));
                tokio::pin!(copying);
                tokio::select! {
                    end = &mut copying => end,
                    () = promotion::due(server.splice_after, transfer, started, &mut decision) => {
                        stop.cancel();
                        copying.await
                    }
                }
            };
            metrics::add_bytes(0, transfer.total());
            match copied {
                CopyEnd::Ended(end) => {
                    let reason = if decision.deferred {
                        CopyReason::Bulk
                    } else if stop.is_cancelled() {
                        CopyReason::HalfClosed
                    } else {
                        CopyReason::Short
                    };
                    (end, Path::Copy(reason))
                }
                CopyEnd::Stopped => {
                    METRICS.promotions.observe(started.elapsed().as_secs_f64());
                    in_kernel(splicer, client, backend, limits, transfer).await
                }
            }
        }
        (reason, _) => {
            let reason = reason.unwrap_or(CopyReason::KernelUnavailable);
            let before = transfer.total();
            let end = copy_to_end(&mut client, &mut backend, limits, transfer).await;
            metrics::add_bytes(0, transfer.total().saturating_sub(before));
            (end, Path::Copy(reason))
        }
    };
    // The paths count from zero; bytes sent on with the PROXY header come first.
    transfer.upload.fetch_add(early_bytes, Ordering::Relaxed);
    metrics::add_bytes(0, early_bytes);
    lease.add_bytes(transfer.upload(), transfer.download());
    let backend_addr = Some(lease.spec.addr);
    drop(lease);
    Outcome {
        backend: backend_addr,
        end: end.to_string(),
        path: Some(path),
    }
}

/// The kernel stretch of a session, and the copy path after it if it has to leave.
async fn in_kernel(
    splicer: &Splicer,
    client: TcpStream,
    backend: TcpStream,
    limits: CopyLimits,
    transfer: &Transfer,
) -> (SessionEnd, Path) {
    // The kernel counts from the insert; its bytes join the session's afterwards.
    let kernel = Transfer::default();
    match splicer.run(client, backend, limits, &kernel).await {
        KernelEnd::Ended {
            end,
            path,
            userspace_bytes,
        } => {
            metrics::add_bytes(
                kernel.total().saturating_sub(userspace_bytes),
                userspace_bytes,
            );
            transfer.add(&kernel);
            (end, path)
        }
        KernelEnd::Left(left) => {
            metrics::add_bytes(
                kernel.total().saturating_sub(left.userspace_bytes),
                left.userspace_bytes,
            );
            transfer.add(&kernel);
            if left.why.raw_os_error() == Some(libc::EOPNOTSUPP) {
                // Expected for a client that sent its data and FIN at once, and for a
                // source that closed while backpressure held it.
                info!(reason = left.reason.as_str(), error = %left.why, "socket no longer established; copying in userspace");
            } else {
                warn!(reason = left.reason.as_str(), error = %left.why, "session leaves the kernel path; copying in userspace");
            }
            let end = match (
                TcpStream::from_std(left.client),
                TcpStream::from_std(left.backend),
            ) {
                (Ok(mut c), Ok(mut b)) => {
                    let before = transfer.total();
                    let end = copy_to_end(&mut c, &mut b, limits, transfer).await;
                    metrics::add_bytes(0, transfer.total().saturating_sub(before));
                    end
                }
                (Err(e), _) | (_, Err(e)) => SessionEnd::Error(Side::Client, e.to_string()),
            };
            (end, Path::Copy(left.reason))
        }
    }
}

/// The copy path with nothing that stops it early.
async fn copy_to_end(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    limits: CopyLimits,
    transfer: &Transfer,
) -> SessionEnd {
    match copy(client, backend, limits, transfer, None).await {
        CopyEnd::Ended(end) => end,
        // Only a cancelled stop token stops it, and there is none.
        CopyEnd::Stopped => SessionEnd::Closed,
    }
}

/// Closes a client we never forwarded for with a FIN: what it already sent is read and
/// discarded first, since closing a socket with unread data sends a reset.
async fn close_cleanly(mut client: TcpStream) {
    let mut buf = [0u8; 4096];
    // Bounded: a client streaming at us gets at most this much drained.
    for _ in 0..16 {
        match client.try_read(&mut buf) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
    let _ = client.shutdown().await;
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A plain close with unread data sends a reset; the clean close must send a FIN.
    #[tokio::test]
    async fn clean_close_sends_fin_even_with_unread_data() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        client.write_all(b"PING\r\n").await.unwrap();
        // Let the bytes reach the accepted socket's receive queue.
        tokio::time::sleep(Duration::from_millis(50)).await;
        close_cleanly(accepted).await;
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut buf))
            .await
            .expect("closed in time");
        assert_eq!(read.ok(), Some(0), "EOF, not a reset");
    }
}
