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
use tracing::{info, warn};

use super::connect::connect;
use super::copy::{copy_bidirectional, CopyLimits, Transfer};
use super::{is_resource_exhaustion, proxy_protocol, ListenerCtx, SessionEnd, SharedCtx};
use crate::config::{ServerConfig, SpliceMode};
use crate::metrics::{self, CopyReason, METRICS};
use crate::runtime::DataPath;
use crate::splice::Path;

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
                metrics::add(&METRICS.accepted, 1);
                let ctx = ctx.load_full();
                let dp2 = Arc::clone(&dp);
                dp.sessions.spawn(session(ctx, dp2, client, peer, permit));
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
    METRICS.active.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let server = &ctx.server;
    let transfer = Transfer::default();
    let outcome = tokio::select! {
        o = proxy(&ctx, &dp, client, peer, &transfer) => o,
        () = dp.shutdown.cancelled() => Outcome { backend: None, end: SessionEnd::Shutdown.to_string(), path: None },
    };
    METRICS.active.fetch_sub(1, Ordering::Relaxed);
    if dp.access_log.load(Ordering::Relaxed) {
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

async fn proxy(
    ctx: &ListenerCtx,
    dp: &DataPath,
    mut client: TcpStream,
    peer: SocketAddr,
    transfer: &Transfer,
) -> Outcome {
    let server = &ctx.server;
    let Some(upstream) = ctx.upstream.as_ref() else {
        return Outcome {
            backend: None,
            end: "no_upstream".into(),
            path: None,
        };
    };
    let _ = client.set_nodelay(true);
    let (mut backend, lease) = match connect(upstream, server, peer).await {
        Ok(pair) => pair,
        Err(e) => {
            warn!(client = %peer, listen = %server.listen, error = %e, "closing client: no upstream server reachable");
            return Outcome {
                backend: None,
                end: "connect_failed".into(),
                path: None,
            };
        }
    };
    let backend_addr = Some(lease.spec.addr);
    if let Some(header) = client
        .local_addr()
        .ok()
        .and_then(|local| proxy_protocol::header(server.proxy_protocol, peer, local))
    {
        if let Err(e) = backend.write_all(&header).await {
            return Outcome {
                backend: backend_addr,
                end: SessionEnd::error(super::Side::Backend, &e).to_string(),
                path: None,
            };
        }
    }
    let limits = CopyLimits {
        idle_timeout: server.proxy_timeout,
        upload_rate: server.proxy_upload_rate,
        download_rate: server.proxy_download_rate,
    };
    let (end, path) = match (copy_reason(server, dp), dp.splicer.as_ref()) {
        (None, Some(splicer)) => {
            let o = splicer.run(client, backend, limits, transfer).await;
            let total = transfer.upload() + transfer.download();
            metrics::add(&METRICS.bytes_copied, o.userspace_bytes);
            metrics::add(
                &METRICS.bytes_spliced,
                total.saturating_sub(o.userspace_bytes),
            );
            (o.end, o.path)
        }
        (reason, _) => {
            let reason = reason.unwrap_or(CopyReason::KernelUnavailable);
            METRICS.copied_because(reason);
            metrics::add(&METRICS.sessions_copied, 1);
            let end = copy_bidirectional(&mut client, &mut backend, limits, transfer).await;
            metrics::add(
                &METRICS.bytes_copied,
                transfer.upload() + transfer.download(),
            );
            (end, Path::Copy(reason))
        }
    };
    drop(lease);
    Outcome {
        backend: backend_addr,
        end: end.to_string(),
        path: Some(path),
    }
}
