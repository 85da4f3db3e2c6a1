//! TCP listeners: accept (with backoff), connect with retries, then hand the pair to the
//! kernel splice path or the userspace copy path, and write the access log line.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::{debug, error, info, warn};

use super::access::ConnSlot;
use super::connect::{connect, ConnectError};
use super::copy::{copy, CopyEnd, Stop};
use super::promotion::{self, Decision};
use super::{is_resource_exhaustion, proxy_protocol, HandedOver, ListenerCtx, SharedCtx};
use crate::config::{ProxyProtocol, ServerConfig, SpliceMode};
use crate::metrics::{self, CopyReason, METRICS};
use crate::panic;
use crate::runtime::DataPath;
use crate::runtime::Parked;
use crate::session::{Limits, SessionEnd, Side, Transfer};
use crate::splice::{
    first_to_tell, Awake, Dormant, Entry, InPlace, Interrupts, KernelEnd, Path, Resume, Splicer,
};
use crate::upgrade::wire;
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
        // After taking the place: a new process's accept loops hold theirs from the
        // start, before any session is handed over (as `max_connections` counts them).
        if !dp.accepting.is_raised() {
            tokio::select! {
                () = dp.accepting.raised() => {}
                () = stop.cancelled() => return,
            }
        }
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((client, peer)) => {
                let ctx = ctx.load_full();
                ctx.metrics.accepted.inc();
                let start = Start::Accepted(client);
                let transfer = Transfer::default();
                spawn_session(ctx, &dp, start, peer, permit, Instant::now(), transfer);
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
    } else if !dp.splicer.as_ref().is_some_and(|s| s.accepts_sessions()) {
        Some(CopyReason::KernelUnavailable)
    } else {
        None
    }
}

/// How a session begins: accepted here, or handed over by the process this one
/// replaced (binary upgrade), at a clean point and with its backend connected.
enum Start {
    Accepted(TcpStream),
    Adopted {
        client: TcpStream,
        established: Established,
        kernel: bool,
    },
    /// Handed over still in the kernel path's maps, which both processes share.
    AdoptedInKernel {
        awake: Awake,
        held: Held,
    },
    /// A dormant kernel-path session woke (see [`Sleeping`]).
    Woken {
        awake: Awake,
        held: Held,
    },
}

/// A session another process handed over.
pub struct Adopted {
    pub session: wire::TcpSession,
    pub client: std::net::TcpStream,
    pub backend: std::net::TcpStream,
}

/// A handed-over session, ready to run here once the old process let go of it.
pub struct Pending {
    ctx: Arc<ListenerCtx>,
    dp: Arc<DataPath>,
    start: Start,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    started: Instant,
    transfer: Transfer,
}

impl Pending {
    pub fn start(self) {
        let Pending {
            ctx,
            dp,
            start,
            peer,
            permit,
            started,
            transfer,
        } = self;
        spawn_session(ctx, &dp, start, peer, permit, started, transfer);
    }

    /// Lets it go unrun: the old process was not told this one took it, so it may run
    /// it still. A session in the shared kernel maps is forgotten without touching
    /// them (a teardown would cut the old process's session); copies of sockets close.
    pub fn abandon(self) {
        if let Start::AdoptedInKernel { awake, .. } = self.start {
            awake.release();
        }
    }
}

/// Prepares a handed-over session under this process's listener settings. Refused
/// (the old process keeps it) when there is no room or no upstream for it here.
pub fn adopt(
    ctx: Arc<ListenerCtx>,
    dp: &Arc<DataPath>,
    adopted: Adopted,
) -> Result<Pending, String> {
    let Adopted {
        session: s,
        client,
        backend,
    } = adopted;
    let HandedOver {
        permit,
        lease,
        slot,
    } = HandedOver::admit(&ctx, &dp.conn_limit, s.client, s.server)?;
    let transfer = Transfer::default();
    transfer.upload.store(s.upload, Ordering::Relaxed);
    transfer.download.store(s.download, Ordering::Relaxed);
    let started = Instant::now()
        .checked_sub(Duration::from_millis(s.age_ms))
        .unwrap_or_else(Instant::now);
    let held = Held { lease, _slot: slot };
    let start = match &s.in_kernel {
        Some(state) => {
            let splicer = dp
                .splicer
                .as_ref()
                .filter(|s| s.reads_ring())
                .ok_or("it is in the kernel path's maps, which this process does not share")?;
            let awake = splicer
                .adopt_session(client, backend, state)
                .map_err(|e| format!("cannot take it in the shared maps: {e}"))?;
            Start::AdoptedInKernel { awake, held }
        }
        None => {
            let stream = |std: std::net::TcpStream| {
                std.set_nonblocking(true)?;
                TcpStream::from_std(std)
            };
            let (client, backend) = match (stream(client), stream(backend)) {
                (Ok(c), Ok(b)) => (c, b),
                (Err(e), _) | (_, Err(e)) => return Err(format!("cannot use its sockets: {e}")),
            };
            Start::Adopted {
                client,
                established: Established {
                    backend,
                    held,
                    early_bytes: 0,
                },
                kernel: s.kernel,
            }
        }
    };
    Ok(Pending {
        ctx,
        dp: Arc::clone(dp),
        start,
        peer: s.client,
        permit,
        started,
        transfer,
    })
}

/// Runs a session as a task of its own. The session's future (several KiB) is boxed
/// first: the task then moves and clears a pointer, not the whole future, when it is
/// spawned and when it ends (three copies of it per session otherwise, about 1% of the
/// daemon's time on new connections).
fn spawn_session(
    ctx: Arc<ListenerCtx>,
    dp: &Arc<DataPath>,
    start: Start,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    started: Instant,
    transfer: Transfer,
) {
    let run = Box::pin(session(
        ctx,
        Arc::clone(dp),
        start,
        peer,
        permit,
        started,
        transfer,
    ));
    dp.sessions.spawn(run);
}

async fn session(
    ctx: Arc<ListenerCtx>,
    dp: Arc<DataPath>,
    start: Start,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    started: Instant,
    transfer: Transfer,
) {
    if !matches!(start, Start::Woken { .. }) {
        ctx.metrics.active.inc();
    }
    let server = &ctx.server;
    // The client as the session knows it: a PROXY header from a balancer may name it.
    let mut peer = peer;
    let run = async {
        match start {
            Start::Accepted(client) => {
                proxy(&ctx, &dp, client, &mut peer, &transfer, started).await
            }
            Start::Adopted {
                client,
                established,
                kernel,
            } => {
                let at = Forwarding {
                    ctx: &ctx,
                    dp: &dp,
                    peer,
                    started,
                    kernel,
                };
                caught_forward(at, Begin::connected(client, established), &transfer).await
            }
            Start::Woken { awake, held } | Start::AdoptedInKernel { awake, held } => {
                let at = Forwarding {
                    ctx: &ctx,
                    dp: &dp,
                    peer,
                    started,
                    kernel: true,
                };
                caught_forward(at, Begin::Woken(awake, held), &transfer).await
            }
        }
    };
    let mut outcome = tokio::select! {
        biased;
        o = run => o,
        () = dp.shutdown.raised() => Outcome::ended(None, SessionEnd::Shutdown),
    };
    if let Some(asleep) = outcome.asleep.take() {
        let cont = Sleeping {
            ctx,
            dp: Arc::clone(&dp),
            peer,
            permit,
            started,
            transfer,
            held: asleep.held,
            _tracked: dp.sessions.token(),
        };
        asleep.dormant.sleep(Box::new(cont), || {
            dp.handover.alarm().is_raised() || dp.shutdown.is_raised()
        });
        return;
    }
    drop(permit);
    ctx.metrics.active.dec();
    if outcome.handed_over {
        // The new process counts and logs it when it ends.
        return;
    }
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
    end: Ended,
    path: Option<Path>,
    /// The session went on in a new process (binary upgrade).
    handed_over: bool,
    /// The session is quiet in the kernel and sleeps without a task.
    asleep: Option<Asleep>,
}

/// The access log's `end`: how a forwarded session ended, or why it never was
/// (`denied`, `limit_conn`, `no_upstream`, `connect_failed`, ...). Formatted only when
/// the line is written.
enum Ended {
    Session(SessionEnd),
    Before(&'static str),
}

impl From<SessionEnd> for Ended {
    fn from(end: SessionEnd) -> Self {
        Ended::Session(end)
    }
}

impl From<&'static str> for Ended {
    fn from(why: &'static str) -> Self {
        Ended::Before(why)
    }
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ended::Session(end) => end.fmt(f),
            Ended::Before(why) => f.write_str(why),
        }
    }
}

impl Outcome {
    fn ended(backend: Option<SocketAddr>, end: impl Into<Ended>) -> Self {
        Outcome {
            backend,
            end: end.into(),
            path: None,
            handed_over: false,
            asleep: None,
        }
    }
}

/// A session going to sleep, with what it holds.
struct Asleep {
    dormant: Dormant,
    held: Held,
}

/// Everything a dormant session needs to go on when it wakes: the task it gave up held
/// these. It keeps counting as a session (its permit, the active gauge, the drain).
struct Sleeping {
    ctx: Arc<ListenerCtx>,
    dp: Arc<DataPath>,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    started: Instant,
    transfer: Transfer,
    held: Held,
    _tracked: TaskTrackerToken,
}

impl Resume for Sleeping {
    fn resume(self: Box<Self>, awake: Awake) {
        let Sleeping {
            ctx,
            dp,
            peer,
            permit,
            started,
            transfer,
            held,
            _tracked,
        } = *self;
        let start = Start::Woken { awake, held };
        spawn_session(ctx, &dp, start, peer, permit, started, transfer);
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
    started: Instant,
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
    let at = Forwarding {
        ctx,
        dp,
        peer: *peer,
        started,
        kernel: false,
    };
    caught_forward(at, Begin::connected(client, established), transfer).await
}

/// How forwarding begins: with a connected pair, or with a woken dormant session.
enum Begin {
    Connected {
        client: TcpStream,
        backend: TcpStream,
        held: Held,
        early_bytes: u64,
    },
    Woken(Awake, Held),
}

impl Begin {
    fn connected(client: TcpStream, e: Established) -> Begin {
        Begin::Connected {
            client,
            backend: e.backend,
            held: e.held,
            early_bytes: e.early_bytes,
        }
    }

    fn held(&self) -> &Held {
        match self {
            Begin::Connected { held, .. } | Begin::Woken(_, held) => held,
        }
    }
}

async fn caught_forward(at: Forwarding<'_>, begin: Begin, transfer: &Transfer) -> Outcome {
    let backend_addr = begin.held().lease.spec.addr;
    let (peer, listen) = (at.peer, at.ctx.server.listen);
    match panic::catch(forward(at, begin, transfer)).await {
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
    held: Held,
    /// Client bytes that came with a PROXY header and were sent on already.
    early_bytes: u64,
}

/// What a session holds for its life: its server's lease and its client's place under
/// `limit_conn`.
struct Held {
    lease: Lease,
    _slot: Option<ConnSlot>,
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
                if server.trusts_header_from(peer.ip()) {
                    *peer = received.client.unwrap_or(*peer);
                }
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
    let slot = ctx
        .admit(peer.ip())
        .map_err(|refused| Outcome::ended(None, refused))?;
    let Some(upstream) = ctx.upstream.as_ref() else {
        return Err(Outcome::ended(None, "no_upstream"));
    };
    let (mut backend, lease) = connect(upstream, server, peer).await.map_err(|e| {
        match e {
            ConnectError::NoServer(_) => ctx.metrics.no_server.inc(),
            _ => ctx.metrics.connect_failed.inc(),
        };
        warn!(client = %peer, listen = %server.listen, error = %e, "closing client: no upstream server reachable");
        Outcome::ended(None, "connect_failed")
    })?;
    // getsockname(2) only when a header needs the address: one syscall less per session.
    let mut first = match server.proxy_protocol {
        ProxyProtocol::Off => Vec::new(),
        version => client
            .local_addr()
            .ok()
            .and_then(|local| proxy_protocol::header(version, peer, local))
            .unwrap_or_default(),
    };
    first.extend_from_slice(&early);
    if !first.is_empty() {
        if let Err(e) = backend.write_all(&first).await {
            return Err(Outcome::ended(
                Some(lease.spec.addr),
                SessionEnd::error(Side::Backend, &e),
            ));
        }
    }
    Ok(Established {
        backend,
        held: Held { lease, _slot: slot },
        early_bytes: early.len() as u64,
    })
}

/// Where a session is forwarded from, and what parking it for an upgrade needs.
struct Forwarding<'a> {
    ctx: &'a ListenerCtx,
    dp: &'a DataPath,
    peer: SocketAddr,
    /// When the session was accepted (in the old process, for a handed-over one).
    started: Instant,
    /// Start on the kernel path (a handed-over session that was there).
    kernel: bool,
}

/// What a session does next, with its sockets.
enum Next<'a> {
    /// The copy path; `promote` when the session may move into the kernel.
    Copy {
        client: TcpStream,
        backend: TcpStream,
        promote: bool,
    },
    Kernel(KernelStart<'a>),
}

/// Forwards the connected pair: on the copy path, moved into the kernel once the
/// session earns it (see `promotion`), back to the copy path if it has to leave, to
/// sleep without a task while it is quiet there, and to a new process at a clean point
/// during a binary upgrade. The session owns its sockets and counts; the paths are
/// tools it hands them to.
async fn forward(at: Forwarding<'_>, begin: Begin, transfer: &Transfer) -> Outcome {
    let (ctx, dp) = (at.ctx, at.dp);
    let server = &ctx.server;
    let limits = Limits {
        idle_timeout: server.proxy_timeout,
        upload_rate: server.proxy_upload_rate,
        download_rate: server.proxy_download_rate,
    };
    let fallback = copy_reason(server, dp);
    let splicer = dp.splicer.as_deref().filter(|_| fallback.is_none());
    let in_kernel_or_copy = |client, backend, entry| match splicer {
        Some(s) => Next::Kernel(KernelStart::Insert(s, client, backend, entry)),
        None => Next::Copy {
            client,
            backend,
            promote: false,
        },
    };
    let (mut next, held) = match begin {
        Begin::Woken(awake, held) => (Next::Kernel(KernelStart::Wake(awake)), held),
        Begin::Connected {
            client,
            backend,
            held,
            early_bytes,
        } => {
            // The paths count from zero; bytes sent on with the PROXY header come first.
            transfer.upload.fetch_add(early_bytes, Ordering::Relaxed);
            metrics::add_bytes(0, early_bytes);
            let next = if at.kernel || promotion::at_once(server.splice_after) {
                in_kernel_or_copy(client, backend, Entry::default())
            } else {
                Next::Copy {
                    client,
                    backend,
                    promote: splicer.is_some(),
                }
            };
            (next, held)
        }
    };
    let lease = &held.lease;
    // From the accept, also for a session handed over by another process.
    let promote_from = tokio::time::Instant::from_std(at.started);
    let mut decision = Decision::default();
    let mut left: Option<CopyReason> = None;
    let (end, path) = loop {
        let handover = dp.handover.alarm();
        next = match next {
            Next::Kernel(start) => {
                let handover = handover.token().child_token();
                let shutdown = dp.shutdown.token().child_token();
                let interrupts = Interrupts {
                    handover: &handover,
                    shutdown: &shutdown,
                };
                match in_kernel(start, limits, transfer, interrupts).await {
                    KernelStretch::Done(end, path) => break (end, path),
                    KernelStretch::Left(client, backend, reason) => {
                        left = Some(reason);
                        // A session that lost its trial may come back once it calms
                        // down; other reasons to leave last.
                        let lost_trial = decision.lose(reason);
                        Next::Copy {
                            client,
                            backend,
                            promote: lost_trial,
                        }
                    }
                    KernelStretch::Handover(c, b) => {
                        match park(&at, lease, transfer, true, c, b).await {
                            Ok(()) => return Outcome::handed_over(lease.spec.addr),
                            Err((c, b)) => in_kernel_or_copy(c, b, Entry::default()),
                        }
                    }
                    KernelStretch::InPlace(in_place) => {
                        match park_in_place(&at, lease, transfer, in_place).await {
                            Ok(()) => return Outcome::handed_over(lease.spec.addr),
                            Err(in_place) => Next::Kernel(KernelStart::Leave(in_place)),
                        }
                    }
                    KernelStretch::Dormant(dormant) => {
                        return Outcome {
                            asleep: Some(Asleep { dormant, held }),
                            ..Outcome::ended(None, SessionEnd::Shutdown)
                        }
                    }
                }
            }
            Next::Copy {
                mut client,
                mut backend,
                promote,
            } => {
                // Set when the session is due for the kernel, or for a binary upgrade.
                let stop = Stop::default();
                let before = transfer.total();
                let copied = {
                    let copying = copy(&mut client, &mut backend, limits, transfer, Some(&stop));
                    tokio::pin!(copying);
                    let due = async {
                        if promote {
                            promotion::due(
                                server.splice_after,
                                transfer,
                                promote_from,
                                &mut decision,
                            )
                            .await;
                        } else {
                            std::future::pending::<()>().await;
                        }
                    };
                    let asked_to_stop = async {
                        tokio::select! {
                            biased;
                            () = due => {}
                            () = handover.raised() => {}
                        }
                    };
                    let stretch = async {
                        tokio::select! {
                            biased;
                            end = &mut copying => end,
                            () = asked_to_stop => {
                                stop.set();
                                copying.await
                            }
                        }
                    };
                    // Cut here rather than from outside, so the line names the server
                    // and path and the bytes count for the server.
                    tokio::select! {
                        biased;
                        end = stretch => end,
                        () = dp.shutdown.raised() => CopyEnd::Ended(SessionEnd::Shutdown),
                    }
                };
                let handing = handover.is_raised();
                metrics::add_bytes(0, transfer.total().saturating_sub(before));
                match copied {
                    CopyEnd::Ended(end) => {
                        let reason =
                            left.or(fallback)
                                .or(decision.deferred)
                                .unwrap_or(if stop.is_set() {
                                    CopyReason::HalfClosed
                                } else {
                                    CopyReason::Short
                                });
                        break (end, Path::Copy(reason));
                    }
                    CopyEnd::Stopped { .. } if handing => {
                        match park(&at, lease, transfer, false, client, backend).await {
                            Ok(()) => return Outcome::handed_over(lease.spec.addr),
                            Err((client, backend)) => Next::Copy {
                                client,
                                backend,
                                promote,
                            },
                        }
                    }
                    CopyEnd::Stopped { quiet_for } => {
                        METRICS
                            .promotions
                            .observe(promote_from.elapsed().as_secs_f64());
                        let entry = Entry {
                            quiet_for,
                            trial: decision.trial.take(),
                        };
                        in_kernel_or_copy(client, backend, entry)
                    }
                }
            }
        };
    };
    lease.add_bytes(transfer.upload(), transfer.download());
    let backend_addr = Some(lease.spec.addr);
    drop(held);
    Outcome {
        backend: backend_addr,
        end: end.into(),
        path: Some(path),
        handed_over: false,
        asleep: None,
    }
}

impl Outcome {
    fn handed_over(backend: SocketAddr) -> Self {
        Outcome {
            handed_over: true,
            ..Outcome::ended(Some(backend), SessionEnd::Shutdown)
        }
    }
}

/// Offers the session to a running binary upgrade; `Err` gives the sockets back when
/// it stays here (no upgrade runs, or the new process did not take it).
async fn park(
    at: &Forwarding<'_>,
    lease: &Lease,
    transfer: &Transfer,
    kernel: bool,
    client: TcpStream,
    backend: TcpStream,
) -> Result<(), (TcpStream, TcpStream)> {
    let (client, backend) = match (client.into_std(), backend.into_std()) {
        (Ok(c), Ok(b)) => (c, b),
        // Not reachable for a registered stream; the session cannot go on either way.
        (Err(e), _) | (_, Err(e)) => {
            warn!(error = %e, "session cannot leave the runtime for the upgrade");
            return Ok(());
        }
    };
    let Some(returned) = offer(at, lease, transfer, kernel, None, client, backend).await else {
        return Ok(());
    };
    match (
        TcpStream::from_std(returned.0),
        TcpStream::from_std(returned.1),
    ) {
        (Ok(c), Ok(b)) => Err((c, b)),
        (Err(e), _) | (_, Err(e)) => {
            warn!(error = %e, "session cannot rejoin the runtime after the upgrade");
            Ok(())
        }
    }
}

/// Offers a spliced session at a clean point to a binary upgrade whose new process
/// shares the maps: only its state and duplicates of its sockets travel. `Err` gives
/// it back when it stays here.
async fn park_in_place(
    at: &Forwarding<'_>,
    lease: &Lease,
    transfer: &Transfer,
    in_place: InPlace,
) -> Result<(), InPlace> {
    let (client, backend) = match in_place.sockets() {
        Ok(socks) => socks,
        Err(e) => {
            warn!(error = %e, "cannot duplicate a spliced session's sockets for the upgrade");
            return Err(in_place);
        }
    };
    let state = Some(in_place.state());
    match offer(at, lease, transfer, true, state, client, backend).await {
        None => {
            in_place.release();
            Ok(())
        }
        // The duplicates close; the session goes on with its own sockets.
        Some(_) => Err(in_place),
    }
}

/// Parks a session with the upgrade: `None` once the new process took it, the
/// sockets back when it stays here.
async fn offer(
    at: &Forwarding<'_>,
    lease: &Lease,
    transfer: &Transfer,
    kernel: bool,
    in_kernel: Option<wire::KernelState>,
    client: std::net::TcpStream,
    backend: std::net::TcpStream,
) -> Option<(std::net::TcpStream, std::net::TcpStream)> {
    let (back, answer) = oneshot::channel();
    let parked = Parked {
        session: wire::TcpSession {
            listen: at.ctx.server.listen,
            client: at.peer,
            server: lease.spec.addr,
            age_ms: u64::try_from(at.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            upload: transfer.upload(),
            download: transfer.download(),
            kernel,
            in_kernel,
        },
        client,
        backend,
        back,
    };
    match at.dp.handover.park(parked) {
        None => match answer.await {
            Ok(None) => None,
            Ok(Some(socks)) => Some(socks),
            // The upgrade dropped the session without answering: it kept the sockets.
            Err(_) => None,
        },
        Some(p) => Some((p.client, p.backend)),
    }
}

/// How a session's kernel stretch ended.
enum KernelStretch {
    /// It is quiet and may sleep.
    Dormant(Dormant),
    Done(SessionEnd, Path),
    /// It left the kernel; the copy path continues it.
    Left(TcpStream, TcpStream, CopyReason),
    /// It left the kernel for a binary upgrade.
    Handover(TcpStream, TcpStream),
    /// It goes to a binary upgrade's new process as it is, still in the kernel.
    InPlace(InPlace),
}

/// How a session's kernel stretch begins.
enum KernelStart<'a> {
    /// Its sockets go into the kernel.
    Insert(&'a Splicer, TcpStream, TcpStream, Entry),
    /// It is there already, and woke.
    Wake(Awake),
    /// It is there, and must leave: a binary upgrade's new process reads the events now.
    Leave(InPlace),
}

/// The kernel stretch of a session.
async fn in_kernel(
    start: KernelStart<'_>,
    limits: Limits,
    transfer: &Transfer,
    interrupts: Interrupts<'_>,
) -> KernelStretch {
    // The kernel counts from the insert, also across sleeps; its bytes join the
    // session's when the stretch ends.
    let kernel = Transfer::default();
    let ended = match start {
        KernelStart::Insert(splicer, client, backend, entry) => {
            splicer
                .run(client, backend, entry, limits, &kernel, interrupts)
                .await
        }
        KernelStart::Wake(awake) => awake.run(limits, &kernel, interrupts).await,
        KernelStart::Leave(in_place) => in_place.leave(limits, &kernel, interrupts.shutdown).await,
    };
    // A dormant session's stretch goes on: its bytes are counted when it ends.
    if let Some(userspace) = ended.userspace_bytes() {
        metrics::add_bytes(kernel.total().saturating_sub(userspace), userspace);
        transfer.add(&kernel);
    }
    let streams = |c, b| match (TcpStream::from_std(c), TcpStream::from_std(b)) {
        (Ok(c), Ok(b)) => Ok((c, b)),
        (Err(e), _) | (_, Err(e)) => Err(KernelStretch::Done(
            SessionEnd::Error(Side::Client, e.to_string()),
            Path::Kernel,
        )),
    };
    match ended {
        KernelEnd::Dormant(d) => KernelStretch::Dormant(d),
        KernelEnd::InPlace(i) => KernelStretch::InPlace(i),
        KernelEnd::Ended { end, path, .. } => KernelStretch::Done(end, path),
        KernelEnd::Handover {
            client, backend, ..
        } => match streams(client, backend) {
            Ok((c, b)) => KernelStretch::Handover(c, b),
            Err(done) => done,
        },
        KernelEnd::Left(left) => {
            if matches!(left.reason, CopyReason::Bulk | CopyReason::Chatty) {
                if first_to_tell(left.reason == CopyReason::Chatty) {
                    info!(reason = %left.why, "back to the copy path");
                } else {
                    debug!(reason = %left.why, "back to the copy path");
                }
            } else if left.why.raw_os_error() == Some(libc::EOPNOTSUPP) {
                // Expected for a client that sent its data and FIN at once, and for a
                // source that closed while backpressure held it.
                info!(reason = left.reason.as_str(), error = %left.why, "socket no longer established; copying in userspace");
            } else {
                warn!(reason = left.reason.as_str(), error = %left.why, "session leaves the kernel path; copying in userspace");
            }
            match streams(left.client, left.backend) {
                Ok((c, b)) => KernelStretch::Left(c, b, left.reason),
                Err(done) => done,
            }
        }
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
