//! UDP listeners: one session per client address, each with its own connected socket to
//! the chosen server. Datagram boundaries are kept; a session ends once the server sent
//! `proxy_responses` replies for every client datagram (as nginx counts them), or after
//! `proxy_timeout` of silence.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::access::ConnSlot;
use super::copy::idle;
use super::{HandedOver, ListenerCtx, SharedCtx};
use crate::metrics::METRICS;
use crate::panic;
use crate::runtime::DataPath;
use crate::upgrade::wire;
use crate::upstream::Lease;

const MAX_DATAGRAM: usize = 65_535;
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// A listener's sessions by client address. It outlives the listener's tasks, so a
/// binary upgrade that stops them can hand the sessions over, or resume them here.
pub type Sessions = Arc<Mutex<HashMap<SocketAddr, Arc<UdpSession>>>>;

pub struct UdpSession {
    backend: UdpSocket,
    lease: Lease,
    /// The client's place under `limit_conn`, held while the session lives.
    _slot: Option<ConnSlot>,
    /// A `max_connections` place, as nginx counts UDP sessions in `worker_connections`.
    _permit: OwnedSemaphorePermit,
    start: Instant,
    /// Milliseconds since `start` of the last datagram either way.
    last_activity: AtomicU64,
    upload: AtomicU64,
    download: AtomicU64,
    /// Client datagrams taken for this session: counted under the table's lock, so a
    /// session judged done there has answered every one it was given.
    requests: AtomicU64,
    responses: AtomicU64,
    /// Its listener was removed: datagrams still pass, but no longer keep it alive.
    winding_down: std::sync::atomic::AtomicBool,
}

impl UdpSession {
    fn touch(&self) {
        if self.winding_down.load(Ordering::Relaxed) {
            return;
        }
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity.store(ms, Ordering::Relaxed);
    }

    /// Whether the server sent `limit` replies for each client datagram (nginx's
    /// `proxy_responses`).
    fn answered(&self, limit: Option<u64>) -> bool {
        limit.is_some_and(|limit| {
            let requests = self.requests.load(Ordering::Relaxed);
            self.responses.load(Ordering::Relaxed) >= limit.saturating_mul(requests)
        })
    }
}

/// Serves datagrams until `pause` (binary upgrade: the sessions' reply tasks stop too,
/// and the table keeps them). After `stop` (the listener was removed, or the process
/// stops) it opens no session, and serves the open ones until the last has ended: a
/// session's client datagrams arrive on this socket.
pub async fn serve(
    socket: Arc<UdpSocket>,
    sessions: Sessions,
    ctx: SharedCtx,
    dp: Arc<DataPath>,
    stop: CancellationToken,
    pause: CancellationToken,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut last_error_log: Option<Instant> = None;
    tokio::select! {
        () = dp.accepting.raised() => {}
        () = stop.cancelled() => return,
        () = pause.cancelled() => return,
    }
    let mut draining = false;
    // While draining: how often to look whether the last session has ended.
    let mut look = tokio::time::interval(Duration::from_secs(1));
    loop {
        let (n, client) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    if last_error_log.is_none_or(|t| t.elapsed() >= ERROR_LOG_INTERVAL) {
                        warn!(listen = %ctx.load().server.listen, error = %e, "udp receive failed");
                        last_error_log = Some(Instant::now());
                    }
                    continue;
                }
            },
            () = stop.cancelled(), if !draining => {
                draining = true;
                // The open sessions run out: a client that keeps sending (or a server
                // that keeps answering) must not hold the port for ever.
                for s in lock(&sessions).values() {
                    s.winding_down.store(true, Ordering::Relaxed);
                }
                // Counted from now: the interval ran unpolled since the start.
                look.reset();
                continue;
            }
            _ = look.tick(), if draining => {
                if lock(&sessions).is_empty() {
                    return;
                }
                continue;
            }
            () = pause.cancelled() => return,
        };
        // Every datagram, so a reload's new `deny` also stops clients with a session.
        let current = ctx.load();
        if !super::access::allowed(&current.server.access, client.ip()) {
            current.metrics.denied.inc();
            continue;
        }
        drop(current);
        let existing = lock(&sessions).get(&client).map(|s| {
            s.requests.fetch_add(1, Ordering::Relaxed);
            Arc::clone(s)
        });
        let session = match existing {
            Some(s) => s,
            None if draining => continue,
            None => {
                let current = ctx.load_full();
                match panic::catch(open(&current, &dp, &socket, &sessions, client, &pause)).await {
                    Ok(Some(s)) => s,
                    Ok(None) => continue,
                    Err(panicked) => {
                        METRICS.session_panics.inc();
                        error!(%client, listen = %ctx.load().server.listen, panic = %panicked, "udp session panicked while opening");
                        continue;
                    }
                }
            }
        };
        session.touch();
        match session.backend.send(&buf[..n]).await {
            Ok(_) => {
                session.upload.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => {
                if last_error_log.is_none_or(|t| t.elapsed() >= ERROR_LOG_INTERVAL) {
                    warn!(%client, error = %e, "udp send to upstream failed");
                    last_error_log = Some(Instant::now());
                }
            }
        }
    }
}

fn lock(s: &Sessions) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<UdpSession>>> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes `session` from the table unless a newer session took the client's place.
fn forget(sessions: &Sessions, client: SocketAddr, session: &Arc<UdpSession>) {
    forget_if(sessions, client, session, || true);
}

/// Removes `session` from the table if `done` says so, judged under the table's lock: a
/// datagram that arrives meanwhile either counts first (and can keep it) or finds it
/// gone (and opens a new session).
fn forget_if(
    sessions: &Sessions,
    client: SocketAddr,
    session: &Arc<UdpSession>,
    done: impl FnOnce() -> bool,
) -> bool {
    let mut map = lock(sessions);
    if !done() {
        return false;
    }
    if map.get(&client).is_some_and(|s| Arc::ptr_eq(s, session)) {
        map.remove(&client);
    }
    true
}

async fn open(
    ctx: &Arc<ListenerCtx>,
    dp: &Arc<DataPath>,
    listener: &Arc<UdpSocket>,
    sessions: &Sessions,
    client: SocketAddr,
    pause: &CancellationToken,
) -> Option<Arc<UdpSession>> {
    let server = &ctx.server;
    let slot = ctx.admit(client.ip()).ok()?;
    let Ok(permit) = Arc::clone(&dp.conn_limit).try_acquire_owned() else {
        ctx.metrics.max_connections.inc();
        debug!(%client, listen = %server.listen, "max_connections reached; datagram dropped");
        return None;
    };
    let upstream = ctx.upstream.as_ref()?;
    let Some(lease) = upstream.select(client.ip(), &[]) else {
        ctx.metrics.no_server.inc();
        warn!(%client, upstream = %upstream.name, "no available server for udp session");
        return None;
    };
    let local: SocketAddr = if lease.spec.addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let backend = match UdpSocket::bind(local).await {
        Ok(s) => s,
        Err(e) => {
            warn!(%client, error = %e, "cannot open udp socket to upstream");
            return None;
        }
    };
    if let Err(e) = backend.connect(lease.spec.addr).await {
        lease.connect_failed(&upstream.name);
        warn!(%client, server = %lease.spec.addr, error = %e, "udp connect to upstream failed");
        return None;
    }
    let session = Arc::new(UdpSession {
        backend,
        lease,
        _slot: slot,
        _permit: permit,
        start: Instant::now(),
        last_activity: AtomicU64::new(0),
        upload: AtomicU64::new(0),
        download: AtomicU64::new(0),
        // The datagram that opened it.
        requests: AtomicU64::new(1),
        responses: AtomicU64::new(0),
        winding_down: std::sync::atomic::AtomicBool::new(false),
    });
    lock(sessions).insert(client, Arc::clone(&session));
    ctx.metrics.udp_sessions.inc();
    spawn_replies(ctx, dp, listener, sessions, &session, client, pause);
    Some(session)
}

fn spawn_replies(
    ctx: &Arc<ListenerCtx>,
    dp: &Arc<DataPath>,
    listener: &Arc<UdpSocket>,
    sessions: &Sessions,
    session: &Arc<UdpSession>,
    client: SocketAddr,
    pause: &CancellationToken,
) {
    let replying = replies(
        Arc::clone(ctx),
        Arc::clone(dp),
        Arc::clone(listener),
        Arc::clone(sessions),
        Arc::clone(session),
        client,
        pause.clone(),
    );
    let (sessions, this) = (Arc::clone(sessions), Arc::clone(session));
    dp.sessions.spawn(async move {
        if let Err(panicked) = panic::catch(replying).await {
            METRICS.session_panics.inc();
            error!(%client, panic = %panicked, "udp session panicked");
            forget(&sessions, client, &this);
        }
    });
}

/// Restarts the reply tasks of every session in `sessions` (after a binary upgrade
/// handed them over, or did not happen).
pub fn resume(
    ctx: &Arc<ListenerCtx>,
    dp: &Arc<DataPath>,
    listener: &Arc<UdpSocket>,
    sessions: &Sessions,
    pause: &CancellationToken,
) {
    let all: Vec<_> = lock(sessions)
        .iter()
        .map(|(c, s)| (*c, Arc::clone(s)))
        .collect();
    for (client, session) in all {
        spawn_replies(ctx, dp, listener, sessions, &session, client, pause);
    }
}

/// Undoes a removed listener's winding down, for the listener added back: its sessions
/// live on as before. Returns how many there are.
pub fn rejoin(sessions: &Sessions) -> usize {
    let all = lock(sessions);
    for s in all.values() {
        s.winding_down.store(false, Ordering::Relaxed);
    }
    all.len()
}

/// The sessions of a paused listener as a binary upgrade sends them, each with a
/// duplicate of its backend socket.
pub fn export(
    listen: SocketAddr,
    sessions: &Sessions,
) -> Vec<(wire::UdpSession, std::io::Result<OwnedFd>)> {
    lock(sessions)
        .iter()
        .map(|(client, s)| {
            let fd = s.backend.as_fd().try_clone_to_owned();
            let saved = wire::UdpSession {
                listen,
                client: *client,
                server: s.lease.spec.addr,
                age_ms: u64::try_from(s.start.elapsed().as_millis()).unwrap_or(u64::MAX),
                upload: s.upload.load(Ordering::Relaxed),
                download: s.download.load(Ordering::Relaxed),
                requests: s.requests.load(Ordering::Relaxed),
                responses: s.responses.load(Ordering::Relaxed),
            };
            (saved, fd)
        })
        .collect()
}

/// A handed-over session this process could not take (no room, no upstream, or no
/// such listener any more): it ends at the upgrade, and its line says so. The client's
/// next datagram opens a new session if it can.
pub fn not_taken(dp: &DataPath, saved: &wire::UdpSession, why: &str) {
    warn!(client = %saved.client, listen = %saved.listen, reason = %why, "udp session not taken over; it ends here");
    if dp.access_log.enabled() {
        info!(
            target: "access",
            client = %saved.client,
            listen = %saved.listen,
            protocol = "udp",
            upstream = "-",
            server = %saved.server,
            sent = saved.download,
            received = saved.upload,
            responses = saved.responses,
            duration_ms = saved.age_ms,
            end = %"not_taken_over",
        );
    }
}

/// Puts a handed-over session into `sessions` (its reply task starts with [`resume`]).
pub fn adopt(
    ctx: &ListenerCtx,
    dp: &DataPath,
    sessions: &Sessions,
    saved: &wire::UdpSession,
    backend: OwnedFd,
) -> Result<(), String> {
    let HandedOver {
        permit,
        lease,
        slot,
    } = HandedOver::admit(ctx, &dp.conn_limit, saved.client, saved.server)?;
    let backend = UdpSocket::from_std(std::net::UdpSocket::from(backend))
        .map_err(|e| format!("cannot register the backend socket: {e}"))?;
    let start = Instant::now()
        .checked_sub(Duration::from_millis(saved.age_ms))
        .unwrap_or_else(Instant::now);
    let session = Arc::new(UdpSession {
        backend,
        lease,
        _slot: slot,
        _permit: permit,
        last_activity: AtomicU64::new(
            u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
        ),
        start,
        upload: AtomicU64::new(saved.upload),
        download: AtomicU64::new(saved.download),
        // An older process did not send it: as it judged, on the replies alone.
        requests: AtomicU64::new(saved.requests.max(1)),
        responses: AtomicU64::new(saved.responses),
        winding_down: std::sync::atomic::AtomicBool::new(false),
    });
    lock(sessions).insert(saved.client, session);
    Ok(())
}

thread_local! {
    /// Where replies land first: one buffer per thread rather than 64 KiB per session,
    /// which thousands of clients (a resolver's) would each hold for `proxy_timeout`.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; MAX_DATAGRAM]);
}

/// How a UDP session ended, as the access log's `end` says it.
enum UdpEnd {
    /// Every client datagram has its `proxy_responses` replies.
    Responses,
    IdleTimeout,
    Shutdown,
    ClientError(std::io::Error),
    BackendError(std::io::Error),
}

impl std::fmt::Display for UdpEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UdpEnd::Responses => f.write_str("responses"),
            UdpEnd::IdleTimeout => f.write_str("idle_timeout"),
            UdpEnd::Shutdown => f.write_str("shutdown"),
            UdpEnd::ClientError(e) => write!(f, "client_error({e})"),
            UdpEnd::BackendError(e) => write!(f, "backend_error({e})"),
        }
    }
}

/// What became of the server's next datagram.
enum Reply {
    /// Sent on to the client straight from the thread's buffer (nearly always).
    Sent(usize),
    /// The listener had no room at once: this copy waits for it.
    Later(Vec<u8>),
    /// Sending it to the client failed.
    Failed(std::io::Error),
}

/// Receives the server's next datagram and sends it on to `client`; `Err` is the
/// server's side failing (an ICMP unreachable among them).
async fn reply(
    backend: &UdpSocket,
    listener: &UdpSocket,
    client: SocketAddr,
) -> std::io::Result<Reply> {
    // ERROR too, as tokio's own recv: an ICMP unreachable sets only EPOLLERR.
    let ready = tokio::io::Interest::READABLE | tokio::io::Interest::ERROR;
    backend
        .async_io(ready, || {
            SCRATCH.with_borrow_mut(|buf| {
                let n = nix::sys::socket::recv(
                    backend.as_fd().as_raw_fd(),
                    buf,
                    nix::sys::socket::MsgFlags::empty(),
                )
                .map_err(std::io::Error::from)?;
                let datagram = buf.get(..n).unwrap_or_default();
                Ok(match listener.try_send_to(datagram, client) {
                    Ok(_) => Reply::Sent(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        Reply::Later(datagram.to_vec())
                    }
                    Err(e) => Reply::Failed(e),
                })
            })
        })
        .await
}

/// Forwards the server's replies to the client until the session ends.
async fn replies(
    ctx: Arc<ListenerCtx>,
    dp: Arc<DataPath>,
    listener: Arc<UdpSocket>,
    sessions: Sessions,
    session: Arc<UdpSession>,
    client: SocketAddr,
    pause: CancellationToken,
) {
    let server = &ctx.server;
    let lease = &session.lease;
    // This session's own nodes: the loop polls them for every datagram.
    let (shutdown, pause) = (dp.shutdown.token().child_token(), pause.child_token());
    let limit = server.proxy_responses;
    let end = loop {
        // Ends once every datagram it took has its replies.
        if session.answered(limit)
            && forget_if(&sessions, client, &session, || session.answered(limit))
        {
            break UdpEnd::Responses;
        }
        tokio::select! {
            // A pause (a binary upgrade, a listener taken back by a reload): the session
            // stays in the table for whoever carries it on. Looked at first, so this
            // task stops at its next turn rather than handle one more reply or timeout
            // beside the task that took over.
            biased;
            () = pause.cancelled() => return,
            () = shutdown.cancelled() => break UdpEnd::Shutdown,
            r = reply(&session.backend, &listener, client) => match r {
                Ok(reply) => {
                    let n = match reply {
                        Reply::Sent(n) => n,
                        Reply::Later(datagram) => {
                            if let Err(e) = listener.send_to(&datagram, client).await {
                                break UdpEnd::ClientError(e);
                            }
                            datagram.len()
                        }
                        Reply::Failed(e) => break UdpEnd::ClientError(e),
                    };
                    session.touch();
                    if session.responses.fetch_add(1, Ordering::Relaxed) == 0 {
                        // The server answers: its failures so far no longer count
                        // against it (as a TCP connect that succeeds).
                        lease.connect_succeeded();
                    }
                    session.download.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    // ICMP port unreachable surfaces here as ECONNREFUSED.
                    if let Some(up) = ctx.upstream.as_ref() {
                        lease.connect_failed(&up.name);
                    }
                    break UdpEnd::BackendError(e);
                }
            },
            () = idle(&session.last_activity, session.start, server.proxy_timeout) => break UdpEnd::IdleTimeout,
        }
    };
    if matches!(end, UdpEnd::IdleTimeout) {
        // As nginx frees a UDP peer whose session saw no error: the server took the
        // datagrams without an ICMP error. One that never answers (syslog, statsd)
        // would otherwise stay out for good once taken out.
        lease.connect_succeeded();
    }
    forget(&sessions, client, &session);
    lease.add_bytes(
        session.upload.load(Ordering::Relaxed),
        session.download.load(Ordering::Relaxed),
    );
    if dp.access_log.enabled() {
        info!(
            target: "access",
            client = %client,
            listen = %server.listen,
            protocol = "udp",
            upstream = server.proxy_pass.as_deref().unwrap_or("-"),
            server = %lease.spec.addr,
            sent = session.download.load(Ordering::Relaxed),
            received = session.upload.load(Ordering::Relaxed),
            responses = session.responses.load(Ordering::Relaxed),
            duration_ms = session.start.elapsed().as_millis() as u64,
            end = %end,
        );
    }
}
