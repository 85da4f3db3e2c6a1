//! The kernel splice path (sockmap + SK_SKB verdict program, and a sock_ops program that
//! detaches sockets safely): established TCP sessions whose bytes the kernel moves
//! between the two sockets, with the daemon only watching for FIN, errors, held
//! directions, pauses, lag and idleness.
//!
//! Modules: `loader` (aya), `offsets` (kernel structure offsets from BTF), `maps` and
//! `sys` (syscalls), `watch` (private epoll), `session` (one session's life),
//! `accounting` (where every byte is: held bytes, half-close, pause/resume, the lag cap,
//! watchdog).
//!
//! Backpressure: the kernel redirect has none, so the program pauses a direction whose
//! peer lags (its socket leaves the attached map and its window closes) and the daemon
//! resumes it once the peer caught up. See the module docs of `accounting` for what was
//! measured, and `l4lb-ebpf` for the repeated bytes the verdict cuts.

mod accounting;
mod dormant;
mod loader;
mod maps;
mod offsets;
mod session;
mod sys;
mod trial;
mod watch;
mod way;

use std::fmt;
use std::io;
use std::net::TcpStream as StdTcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::capabilities;
use crate::metrics::CopyReason;
use crate::session::{Limits, SessionEnd, Side, Transfer};
pub use dormant::{Awake, Dormant, Resume};
use maps::Maps;
use session::{End, Session, Snapshot};
use tokio::sync::mpsc::UnboundedReceiver;
pub use trial::{first_to_tell, Traffic, Trial};
use watch::Watcher;
use way::{PerWay, Way};

/// What cuts a kernel stretch short: a binary upgrade (the session leaves for the new
/// process) and the end of the shutdown grace period (the session ends here, its bytes
/// counted and its line logged like any other's).
#[derive(Clone, Copy)]
pub struct Interrupts<'a> {
    pub handover: &'a CancellationToken,
    pub shutdown: &'a CancellationToken,
}

/// Which path carried a session's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Kernel,
    Copy(CopyReason),
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Kernel => f.write_str("kernel"),
            Path::Copy(reason) => write!(f, "copy:{}", reason.as_str()),
        }
    }
}

/// How a session's stretch on the kernel path ended.
pub enum KernelEnd {
    /// The session ended; `path` is `Copy` when it was leaving the kernel as it ended.
    Ended {
        end: SessionEnd,
        path: Path,
        /// Bytes the daemon forwarded itself meanwhile (held bytes).
        userspace_bytes: u64,
    },
    /// The session left the kernel without losing a byte; the copy path continues it.
    Left(Leaving),
    /// The session is quiet: it may sleep, without a task, until something happens.
    Dormant(Dormant),
    /// A binary upgrade's new process shares the maps: the session, at a clean point,
    /// goes to it as it is, still in the kernel.
    InPlace(InPlace),
    /// The session left the kernel, without losing a byte, for a binary upgrade.
    Handover {
        client: StdTcpStream,
        backend: StdTcpStream,
        userspace_bytes: u64,
    },
}

/// A spliced session at a clean point, offered to a binary upgrade's new process that
/// shares the maps; its bytes keep flowing in the kernel meanwhile.
pub struct InPlace {
    session: Box<Session>,
}

impl InPlace {
    pub fn state(&self) -> crate::upgrade::wire::KernelState {
        self.session.export()
    }

    /// Duplicates of its sockets, to send.
    pub fn sockets(&self) -> io::Result<(StdTcpStream, StdTcpStream)> {
        Ok((
            self.session.socks[Way::Up].stream.try_clone()?,
            self.session.socks[Way::Down].stream.try_clone()?,
        ))
    }

    /// The new process took it: forgotten here, the kernel untouched.
    pub fn release(self) {
        self.session.release();
    }

    /// It stays here, where the event ring is no longer read: it leaves the kernel for
    /// the copy path, without losing a byte.
    pub async fn leave(
        self,
        limits: Limits,
        transfer: &Transfer,
        shutdown: &CancellationToken,
    ) -> KernelEnd {
        let why = io::Error::other("the kernel path went to a new process (binary upgrade)");
        let out = Out {
            limits,
            transfer,
            shutdown,
        };
        leave(
            self.session,
            Way::Up,
            CopyReason::KernelUnavailable,
            why,
            out,
        )
        .await
    }
}

/// A session that left the kernel: its sockets and why.
pub struct Leaving {
    pub client: StdTcpStream,
    pub backend: StdTcpStream,
    pub reason: CopyReason,
    pub why: io::Error,
    pub userspace_bytes: u64,
}

impl KernelEnd {
    /// Bytes the daemon forwarded itself during the stretch; `None` while the stretch
    /// goes on (a dormant session).
    pub fn userspace_bytes(&self) -> Option<u64> {
        match self {
            KernelEnd::Ended {
                userspace_bytes, ..
            }
            | KernelEnd::Handover {
                userspace_bytes, ..
            } => Some(*userspace_bytes),
            KernelEnd::Left(left) => Some(left.userspace_bytes),
            KernelEnd::Dormant(_) | KernelEnd::InPlace(_) => None,
        }
    }

    fn error(side: Side, e: &io::Error, reason: CopyReason) -> KernelEnd {
        KernelEnd::Ended {
            end: SessionEnd::Error(side, e.to_string()),
            path: Path::Copy(reason),
            userspace_bytes: 0,
        }
    }
}

/// A copy of the kernel path's counters for the metrics registry.
#[derive(Debug)]
pub struct KernelStats {
    pub sessions: u64,
    /// Of those, sessions asleep without a task.
    pub dormant: u64,
    pub pauses: u64,
    pub holds: u64,
    pub trimmed: u64,
    pub lagging: u64,
    pub watchdog: u64,
    pub insert_failed: u64,
    pub slept: u64,
    pub wakeups: u64,
    pub trials: u64,
    pub trials_lost: u64,
    pub chatty_trials: u64,
    pub chatty_trials_lost: u64,
    /// Entries per map, and the sockets the daemon watches.
    pub maps: [(&'static str, u64); 5],
}

/// Counters of the kernel path, read by the metrics registry with the map sizes.
struct Stats {
    active: AtomicU64,
    /// Sessions moved to userspace because a peer lagged past the cap.
    lagging: AtomicU64,
    /// Backpressure pauses (a source left the attached map while its peer caught up).
    pauses: AtomicU64,
    holds: AtomicU64,
    /// Bytes the verdict cut off skbs because they repeated bytes already seen.
    trimmed: AtomicU64,
    watchdog: AtomicU64,
    insert_failed: AtomicU64,
    /// Times a quiet session fell asleep, and times one woke.
    slept: AtomicU64,
    wakeups: AtomicU64,
    /// Bulk streams moved on trial, and those that went back to the copy path.
    trials: AtomicU64,
    trials_lost: AtomicU64,
    /// The same for sessions busy with requests and answers.
    chatty_trials: AtomicU64,
    chatty_trials_lost: AtomicU64,
}

static STATS: Stats = Stats {
    active: AtomicU64::new(0),
    lagging: AtomicU64::new(0),
    pauses: AtomicU64::new(0),
    holds: AtomicU64::new(0),
    trimmed: AtomicU64::new(0),
    watchdog: AtomicU64::new(0),
    insert_failed: AtomicU64::new(0),
    slept: AtomicU64::new(0),
    wakeups: AtomicU64::new(0),
    trials: AtomicU64::new(0),
    trials_lost: AtomicU64::new(0),
    chatty_trials: AtomicU64::new(0),
    chatty_trials_lost: AtomicU64::new(0),
};

pub use loader::Shared;

/// How a copied session enters the kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct Entry {
    /// How long the pair has moved no byte (the idle clock goes on from there).
    pub quiet_for: std::time::Duration,
    /// A session on trial: one slower here than it was copied (with its cohort) leaves
    /// (`CopyReason::Bulk` or `CopyReason::Chatty`).
    pub trial: Option<Trial>,
}

/// How long a session waits for the event ring before it stays on the copy path.
const RING_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Splicer {
    maps: Arc<Maps>,
    watcher: Arc<Watcher>,
    /// The object and settings the instance was loaded with (see `loader::identity`).
    identity: String,
    /// The descriptors a binary upgrade's new process needs to share this instance.
    shared: Shared,
    owner: Owner,
    /// Set once this process passed the event ring to a new one: no session enters
    /// the kernel here any more.
    retired: AtomicBool,
    /// True while this process reads the event ring; sessions enter the kernel only
    /// then (a new process waits for the old one to stop reading it).
    reading: tokio::sync::watch::Sender<bool>,
    /// Ends the watcher's and the sweep's tasks.
    stop: CancellationToken,
}

/// Who attached the programs.
enum Owner {
    /// This process loaded them. The verdict's attachment is dropped (detached) with
    /// the splicer, unless a new process shares the maps (then it is let go).
    Loaded {
        _ebpf: aya::Ebpf,
        verdict: std::sync::Mutex<Option<aya::programs::sk_skb::SkSkbLink>>,
    },
    /// The process this one replaced did; this one attached the cgroup programs again.
    Adopted { _links: [std::os::fd::OwnedFd; 2] },
}

impl Drop for Splicer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Splicer {
    fn params(max_sessions: usize) -> loader::Params {
        let max_sockets =
            u32::try_from(max_sessions.saturating_mul(2).clamp(1024, 1 << 21)).unwrap_or(1 << 21);
        loader::Params {
            max_sockets,
            log_level: aya_log::Level::Warn as u8,
        }
    }

    /// Loads and attaches the programs; `max_sessions` sizes the maps. Must run inside
    /// the tokio runtime (it spawns the watcher).
    pub fn load(max_sessions: usize) -> anyhow::Result<Splicer> {
        tokio::runtime::Handle::try_current().context("the kernel path needs the tokio runtime")?;
        let params = Self::params(max_sessions);
        let loaded = loader::load(&params).map_err(|e| {
            // The kernel's own error (EPERM, or a verifier message about a helper) does
            // not say which capability was missing: name it first.
            match capabilities::describe_missing(&capabilities::missing_for_kernel_path()) {
                Some(missing) => e.context(missing),
                None => e,
            }
        })?;
        let owner = Owner::Loaded {
            _ebpf: loaded.ebpf,
            verdict: std::sync::Mutex::new(Some(loaded.verdict)),
        };
        Self::assemble(
            &params,
            loaded.maps,
            loaded.shared,
            owner,
            Some(loaded.events),
            loaded.logger,
        )
    }

    /// Shares the instance a running process loaded (binary upgrade), when this
    /// process loaded the same one (`identity`). The event ring is read once the old
    /// process passes it ([`Splicer::take_ring`]); sessions wait for that to enter the
    /// kernel.
    pub fn adopt(shared: Shared, max_sessions: usize) -> anyhow::Result<Splicer> {
        let params = Self::params(max_sessions);
        let adopted = loader::adopt(&shared, &params)?;
        let owner = Owner::Adopted {
            _links: adopted.links,
        };
        Self::assemble(&params, adopted.maps, shared, owner, None, None)
    }

    /// Starts the watcher and the sweep; without `events`, the ring is read once
    /// [`Splicer::take_ring`] gives it.
    fn assemble(
        params: &loader::Params,
        maps: Maps,
        shared: Shared,
        owner: Owner,
        events: Option<aya::maps::RingBuf<aya::maps::MapData>>,
        logger: Option<aya_log::EbpfLogger<watch::TracingLog>>,
    ) -> anyhow::Result<Splicer> {
        let stop = CancellationToken::new();
        let reading = events.is_some();
        let watcher = watch::start(events, logger, stop.clone())?;
        let maps = Arc::new(maps);
        dormant::start_sweep(Arc::clone(&watcher), Arc::clone(&maps), stop.clone());
        Ok(Splicer {
            maps,
            watcher,
            identity: loader::identity(params),
            shared,
            owner,
            retired: AtomicBool::new(false),
            reading: tokio::sync::watch::Sender::new(reading),
            stop,
        })
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The old process's side of sharing the instance with a new one, once that one
    /// took the descriptors: the verdict stays attached when this process exits, and
    /// sessions at a clean point move without leaving the kernel.
    pub fn share_with_successor(&self) {
        if let Owner::Loaded { verdict, .. } = &self.owner {
            let link = verdict.lock().unwrap_or_else(|p| p.into_inner()).take();
            // Dropping the link would detach the verdict from the map both share; the
            // kernel drops the attachment with the map, when no process holds it.
            std::mem::forget(link);
        }
        self.maps.successor.store(true, Ordering::Relaxed);
    }

    /// Stops reading the event ring for good (the new process reads it next); no
    /// session enters the kernel here from now on.
    pub fn release_ring(&self) {
        self.retired.store(true, Ordering::Relaxed);
        self.watcher.release_ring();
        self.reading.send_replace(false);
    }

    /// Becomes the event ring's reader, after the old process stopped reading it;
    /// events for sessions still to arrive wait until [`Splicer::sessions_arrived`].
    pub fn take_ring(&self) -> anyhow::Result<()> {
        if self.reads_ring() {
            return Ok(());
        }
        let ring = loader::ring(&self.shared.events)?;
        self.watcher.take_ring(ring, true)?;
        self.reading.send_replace(true);
        Ok(())
    }

    pub fn reads_ring(&self) -> bool {
        *self.reading.borrow()
    }

    /// Waits up to [`RING_WAIT`] for this process to read the event ring.
    async fn ring_arrives(&self) -> bool {
        let mut reading = self.reading.subscribe();
        let arrived = tokio::time::timeout(RING_WAIT, reading.wait_for(|r| *r)).await;
        matches!(arrived, Ok(Ok(_)))
    }

    pub fn sessions_arrived(&self) {
        self.watcher.drop_orphans();
    }

    /// Sessions may enter the kernel here (not once the ring went to a new process).
    pub fn accepts_sessions(&self) -> bool {
        !self.retired.load(Ordering::Relaxed)
    }

    /// The descriptors to pass to a new process, duplicated.
    pub fn shared(&self) -> io::Result<Shared> {
        self.shared.try_clone()
    }

    /// A session the old process handed over still in the shared maps, woken here.
    pub fn adopt_session(
        &self,
        client: StdTcpStream,
        backend: StdTcpStream,
        state: &crate::upgrade::wire::KernelState,
    ) -> io::Result<Awake> {
        let (session, rx) = Session::adopt(
            Arc::clone(&self.maps),
            Arc::clone(&self.watcher),
            client,
            backend,
            state,
        )?;
        Ok(Awake::new(session, rx))
    }

    /// The kernel path's counters and map sizes (a map that cannot be counted shows 0).
    pub fn stats(&self) -> KernelStats {
        let counts = self.maps.counts().unwrap_or_default();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        KernelStats {
            sessions: load(&STATS.active),
            dormant: self.watcher.asleep_len() as u64,
            pauses: load(&STATS.pauses),
            holds: load(&STATS.holds),
            trimmed: load(&STATS.trimmed),
            lagging: load(&STATS.lagging),
            watchdog: load(&STATS.watchdog),
            insert_failed: load(&STATS.insert_failed),
            slept: load(&STATS.slept),
            wakeups: load(&STATS.wakeups),
            trials: load(&STATS.trials),
            trials_lost: load(&STATS.trials_lost),
            chatty_trials: load(&STATS.chatty_trials),
            chatty_trials_lost: load(&STATS.chatty_trials_lost),
            maps: [
                ("flows", counts.flows as u64),
                ("ctl", counts.ctl as u64),
                ("targets", counts.targets as u64),
                ("attached", counts.attached as u64),
                ("watched", self.watcher.routes_len() as u64),
            ],
        }
    }

    /// Wakes every dormant session, so each sees a binary upgrade or shutdown begin.
    pub fn wake_all(&self) {
        self.watcher.wake_all();
    }

    /// Puts an established pair into the kernel until the session ends, has to leave
    /// or falls quiet. `transfer` counts from zero: the kernel's counters start at the
    /// insert.
    pub async fn run(
        &self,
        client: TcpStream,
        backend: TcpStream,
        entry: Entry,
        limits: Limits,
        transfer: &Transfer,
        interrupts: Interrupts<'_>,
    ) -> KernelEnd {
        let Entry { quiet_for, trial } = entry;
        // A new process shares the kernel path with the one it replaces, which reads its
        // event ring until it passed its own sessions over (milliseconds).
        let retired = !self.accepts_sessions();
        let usable = !retired && (self.reads_ring() || self.ring_arrives().await);
        // Out of tokio's reactor: it would wake on every redirected skb.
        let (client, backend) = match (client.into_std(), backend.into_std()) {
            (Ok(c), Ok(b)) => (c, b),
            (Err(e), _) | (_, Err(e)) => {
                return KernelEnd::error(Side::Client, &e, CopyReason::InsertFailed)
            }
        };
        if !usable {
            return KernelEnd::Left(Leaving {
                client,
                backend,
                reason: CopyReason::KernelUnavailable,
                why: io::Error::other(if retired {
                    "the kernel path went to a new process (binary upgrade)"
                } else {
                    "the process this one replaced did not pass the event ring on"
                }),
                userspace_bytes: 0,
            });
        }
        let (client, backend) = match (
            Snapshot::take(&client, Side::Client),
            Snapshot::take(&backend, Side::Backend),
        ) {
            (Ok(c), Ok(b)) => (c.with(client), b.with(backend)),
            (Err(why), _) | (_, Err(why)) => {
                return KernelEnd::Left(Leaving {
                    client,
                    backend,
                    reason: CopyReason::InsertFailed,
                    why,
                    userspace_bytes: 0,
                });
            }
        };
        let session = Box::new(Session::new(
            Arc::clone(&self.maps),
            Arc::clone(&self.watcher),
            client,
            backend,
            quiet_for,
        ));
        let rx = match session.insert() {
            Ok(rx) => rx,
            Err(e) => {
                STATS.insert_failed.fetch_add(1, Ordering::Relaxed);
                if e.attached {
                    // A socket was live in the kernel: drain it like a stalled session.
                    let (i, reason) = (Way::Up, CopyReason::InsertFailed);
                    let out = Out::new(limits, transfer, interrupts);
                    return leave(session, i, reason, e.error, out).await;
                }
                return match session.into_streams() {
                    Ok((client, backend, userspace_bytes)) => KernelEnd::Left(Leaving {
                        client,
                        backend,
                        reason: CopyReason::InsertFailed,
                        why: e.error,
                        userspace_bytes,
                    }),
                    Err(clone_err) => {
                        KernelEnd::error(Side::Client, &clone_err, CopyReason::InsertFailed)
                    }
                };
            }
        };
        if let Some(t) = trial {
            t.traffic.counters().0.fetch_add(1, Ordering::Relaxed);
        }
        drive(session, rx, limits, transfer, interrupts, trial).await
    }
}

/// Runs an inserted session until it ends, has to leave or falls quiet.
async fn drive(
    session: Box<Session>,
    mut rx: PerWay<UnboundedReceiver<watch::Event>>,
    limits: Limits,
    transfer: &Transfer,
    interrupts: Interrupts<'_>,
    trial: Option<Trial>,
) -> KernelEnd {
    let out = Out::new(limits, transfer, interrupts);
    match session
        .splice(&mut rx, limits, transfer, interrupts, trial)
        .await
    {
        End::Session(end) => kernel_end(&session, End::Session(end), Path::Kernel),
        End::Quiet => KernelEnd::Dormant(Dormant {
            session,
            rx,
            timeout: limits.idle_timeout,
        }),
        End::Handover
            if session.maps.successor.load(Ordering::Relaxed)
                && session.at_clean_point(&mut rx) =>
        {
            KernelEnd::InPlace(InPlace { session })
        }
        End::Handover => {
            let reason = CopyReason::KernelUnavailable;
            match take_out(session, Way::Up, reason, out).await {
                Ok((client, backend, userspace_bytes)) => KernelEnd::Handover {
                    client,
                    backend,
                    userspace_bytes,
                },
                Err(end) => end,
            }
        }
        End::Stall(i) => {
            STATS.watchdog.fetch_add(1, Ordering::Relaxed);
            warn!(from = %session.socks[i].side, "spliced session stalled; continuing it in userspace");
            let why = io::Error::other(format!(
                "no progress towards the {} for {:?}",
                session.socks[i.reverse()].side,
                accounting::STALL_AFTER
            ));
            leave(session, i, CopyReason::Watchdog, why, out).await
        }
        End::Lagging(i) => {
            STATS.lagging.fetch_add(1, Ordering::Relaxed);
            let why = io::Error::other(format!(
                "the {} lags by more than {} MiB{}",
                session.socks[i.reverse()].side,
                accounting::LAG_CAP >> 20,
                if session.dirs[i.reverse()].finished.load(Ordering::Relaxed) {
                    " (no pauses once its write side is shut down)"
                } else {
                    ""
                }
            ));
            leave(session, i, CopyReason::Lagging, why, out).await
        }
        End::ClosedWhilePaused(i) => {
            let why = io::Error::from_raw_os_error(libc::EOPNOTSUPP);
            leave(session, i, CopyReason::ClosedWhilePaused, why, out).await
        }
        End::Slower { traffic, verdict } => {
            traffic.counters().1.fetch_add(1, Ordering::Relaxed);
            let (way, reason, one, many) = match traffic {
                Traffic::Bulk { upload } => (
                    if upload { Way::Up } else { Way::Down },
                    CopyReason::Bulk,
                    "a bulk stream",
                    "bulk streams",
                ),
                Traffic::Chatty => (
                    Way::Up,
                    CopyReason::Chatty,
                    "a session busy with requests and answers",
                    "sessions busy with requests and answers",
                ),
            };
            let together = match verdict.sessions {
                1 => one.to_owned(),
                n => format!("{n} {many} measured together"),
            };
            let why = io::Error::other(format!(
                "{together} ran at {} in the kernel against {} copied",
                per_second(verdict.kernel),
                per_second(verdict.copied)
            ));
            leave(session, way, reason, why, out).await
        }
    }
}

impl Traffic {
    /// The counters of trials of this kind: started, and lost.
    fn counters(self) -> (&'static AtomicU64, &'static AtomicU64) {
        match self {
            Traffic::Bulk { .. } => (&STATS.trials, &STATS.trials_lost),
            Traffic::Chatty => (&STATS.chatty_trials, &STATS.chatty_trials_lost),
        }
    }
}

/// A rate for the log: MB/s for bulk streams, kB/s for requests and answers.
fn per_second(bytes: u64) -> String {
    if bytes >= 10_000_000 {
        format!("{} MB/s", bytes / 1_000_000)
    } else {
        format!("{} kB/s", bytes / 1_000)
    }
}

/// What taking a session out of the kernel needs: its limits, its counters, and the
/// end of the shutdown grace period, which cuts the drain short.
#[derive(Clone, Copy)]
struct Out<'a> {
    limits: Limits,
    transfer: &'a Transfer,
    shutdown: &'a CancellationToken,
}

impl<'a> Out<'a> {
    fn new(limits: Limits, transfer: &'a Transfer, interrupts: Interrupts<'a>) -> Self {
        Out {
            limits,
            transfer,
            shutdown: interrupts.shutdown,
        }
    }
}

/// Takes a running session out of the kernel without losing a byte, for the copy path
/// to continue; `i` is the direction that made it leave.
async fn leave(
    session: Box<Session>,
    i: Way,
    reason: CopyReason,
    why: io::Error,
    out: Out<'_>,
) -> KernelEnd {
    match take_out(session, i, reason, out).await {
        Ok((client, backend, userspace_bytes)) => KernelEnd::Left(Leaving {
            client,
            backend,
            reason,
            why,
            userspace_bytes,
        }),
        Err(end) => end,
    }
}

/// Detaches both sockets and writes out what the daemon holds; `reason` names the
/// path if the session ends meanwhile. A peer that takes no byte for `proxy_timeout`
/// ends it, as on either path: draining waits on the peers, which may have stopped
/// reading for good.
async fn take_out(
    session: Box<Session>,
    i: Way,
    reason: CopyReason,
    out: Out<'_>,
) -> Result<(StdTcpStream, StdTcpStream, u64), KernelEnd> {
    let (side, transfer) = (session.socks[i].side, out.transfer);
    let reclaimed = tokio::select! {
        r = async {
            session.detach_flowing().await;
            session.reclaim().await
        } => r,
        end = session.idle(out.limits.idle_timeout, transfer) => Err(end),
        () = out.shutdown.cancelled() => Err(End::Session(SessionEnd::Shutdown)),
    };
    if let Err(end) = reclaimed {
        session.publish(transfer);
        return Err(kernel_end(&session, end, Path::Copy(reason)));
    }
    session.publish(transfer);
    session
        .into_streams()
        .map_err(|e| KernelEnd::error(side, &e, reason))
}

fn kernel_end(session: &Session, end: End, path: Path) -> KernelEnd {
    let end = match end {
        End::Session(e) => e,
        End::Stall(i) => SessionEnd::Error(session.socks[i].side, "stalled in the kernel".into()),
        End::Lagging(i) => SessionEnd::Error(session.socks[i.reverse()].side, "lagging".into()),
        End::ClosedWhilePaused(i) => {
            SessionEnd::Error(session.socks[i].side, "closed while paused".into())
        }
        End::Handover | End::Quiet | End::Slower { .. } => SessionEnd::Shutdown,
    };
    KernelEnd::Ended {
        end,
        path,
        userspace_bytes: session.userspace_bytes(),
    }
}
