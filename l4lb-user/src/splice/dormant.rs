//! Dormant spliced sessions. A session whose bytes the kernel moves with nothing for the
//! daemon to do (no pause, no held bytes, no FIN) gives up its task: it waits as an
//! entry of the watcher's table, its sockets' events routed to the entry. Any event
//! wakes it on a new task, with the event; so does the sweep, which looks at each
//! dormant session every [`LOOK_EVERY`] (its counters moved without an event, a hold
//! whose event was lost) and at its idle deadline. An idle connection then costs its
//! table entry, not a task with its timers and channels.
//!
//! The memory a task gives up goes back to the kernel because the allocator (mimalloc)
//! keeps each size class on its own pages: with glibc's malloc the small objects that
//! stay (this table's entries) pinned the pages of the tasks freed around them, and
//! 5,000 idle sessions kept 5.3 KiB each of daemon RSS (of which 0.8 KiB in use), with
//! mimalloc 1.1-1.2 KiB (release, one worker thread, the bench's idle workload; see
//! `main.rs` for what keeps freed memory returned).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

use super::maps::Maps;
use super::session::Session;
use super::sys;
use super::watch::{Event, Watcher};
use super::way::{PerWay, Way};
use super::{KernelEnd, STATS};
use crate::session::{Limits, Transfer};

/// How often the sweep runs ...
const SWEEP: Duration = Duration::from_secs(1);
/// ... and how often it looks at one dormant session (as a running one's slowest check).
const LOOK_EVERY: Duration = Duration::from_secs(4);
/// What carries a session on once it wakes: the rest of its life (counts, access log)
/// belongs to the proxy, which implements this.
pub trait Resume: Send {
    /// Called on the watcher's or the sweep's task: spawn, do not run.
    fn resume(self: Box<Self>, awake: Awake);
}

/// A quiet session, ready to sleep.
pub struct Dormant {
    pub(super) session: Box<Session>,
    pub(super) rx: PerWay<UnboundedReceiver<Event>>,
    pub(super) timeout: Duration,
}

impl Dormant {
    /// Leaves the session to the watcher until something happens on it. `stay_awake`
    /// (a handover or shutdown began) makes it go on at once, as does an event that
    /// came meanwhile.
    pub fn sleep(self, cont: Box<dyn Resume>, stay_awake: impl Fn() -> bool) {
        let Dormant {
            session,
            rx,
            timeout,
        } = self;
        let timeout_ns = sys::nanos(timeout);
        let look = look(&session.maps, &Look::of(&session, None));
        let Some(next_check_ns) = look.asleep_until(timeout_ns) else {
            cont.resume(Awake { session, rx });
            return;
        };
        let watcher = Arc::clone(&session.watcher);
        // A fresh allocation, made now like the continuation's: what stays for hours
        // then sits with what stays, not among the copy path's freed buffers.
        let session = Box::new(*session);
        let sleeper = Sleeper {
            seen: look.redirected,
            session,
            cont,
            timeout_ns,
            next_check_ns,
        };
        // Handed back at once (an event was waiting, a handover or shutdown began): it
        // never slept, so it is no wake-up either.
        if let Some(woken) = watcher.sleep(sleeper, rx, stay_awake) {
            carry_on(woken);
        }
    }
}

/// A session woken from dormancy, for the proxy to run again.
pub struct Awake {
    session: Box<Session>,
    rx: PerWay<UnboundedReceiver<Event>>,
}

impl Awake {
    pub(super) fn new(session: Box<Session>, rx: PerWay<UnboundedReceiver<Event>>) -> Awake {
        Awake { session, rx }
    }

    /// Not run here after all (a binary upgrade's confirmation did not reach the old
    /// process, which may run it still): forgotten without touching the kernel.
    pub fn release(self) {
        self.session.release();
    }

    pub async fn run(
        self,
        limits: Limits,
        transfer: &Transfer,
        interrupts: super::Interrupts<'_>,
    ) -> KernelEnd {
        super::drive(self.session, self.rx, limits, transfer, interrupts, None).await
    }
}

/// A dormant session in the watcher's table.
pub struct Sleeper {
    pub(super) session: Box<Session>,
    cont: Box<dyn Resume>,
    timeout_ns: u64,
    /// Bytes redirected each way when it was last looked at.
    seen: PerWay<u64>,
    /// CLOCK_MONOTONIC ns of the sweep's next look.
    next_check_ns: u64,
}

/// A woken session and the receiving ends of its new routes.
pub type Woken = (Sleeper, PerWay<UnboundedReceiver<Event>>);

/// Carries woken sessions on.
pub fn resume(woken: Vec<Woken>) {
    STATS
        .wakeups
        .fetch_add(woken.len() as u64, Ordering::Relaxed);
    for w in woken {
        carry_on(w);
    }
}

fn carry_on((sleeper, rx): Woken) {
    sleeper.cont.resume(Awake {
        session: sleeper.session,
        rx,
    });
}

/// What the sweep needs of a dormant session, copied out under the table's lock.
struct Look {
    cookies: PerWay<u64>,
    read: PerWay<u64>,
    /// Bytes redirected each way at the previous look, if any.
    seen: Option<PerWay<u64>>,
    last_user_ns: u64,
}

impl Look {
    fn of(session: &Session, seen: Option<PerWay<u64>>) -> Look {
        let per = |f: &dyn Fn(Way) -> u64| PerWay::new(f(Way::Up), f(Way::Down));
        Look {
            cookies: per(&|i| session.socks[i].cookie),
            read: per(&|i| session.dirs[i].read()),
            seen,
            last_user_ns: session.last_user_ns.load(Ordering::Relaxed),
        }
    }
}

/// What the kernel's counters say of a dormant session.
struct Looked {
    /// Bytes redirected each way.
    redirected: PerWay<u64>,
    /// Something for a running session to handle: counters that moved since `seen`, a
    /// held direction, or a flow that cannot be read.
    wake: bool,
    last_ns: u64,
    now_ns: u64,
}

impl Looked {
    /// When to look again, or `None` when it must wake: something to handle, or idle
    /// for `timeout_ns` (the running session ends it).
    fn asleep_until(&self, timeout_ns: u64) -> Option<u64> {
        let deadline = self.last_ns.saturating_add(timeout_ns);
        if self.wake || self.now_ns >= deadline {
            return None;
        }
        let every = sys::nanos(LOOK_EVERY);
        Some(deadline.min(self.now_ns.saturating_add(every)))
    }
}

fn look(maps: &Maps, l: &Look) -> Looked {
    let mut redirected = PerWay::default();
    let mut wake = false;
    let mut last_ns = l.last_user_ns;
    for (i, cookie) in l.cookies.iter() {
        match maps.flow(*cookie) {
            Ok(f) => {
                redirected[i] = f.redirected;
                last_ns = last_ns.max(f.last_ns);
                wake |= f.passed > l.read[i];
            }
            Err(_) => wake = true,
        }
    }
    if let Some(seen) = &l.seen {
        wake |= Way::BOTH.iter().any(|&i| redirected[i] != seen[i]);
    }
    Looked {
        redirected,
        wake,
        last_ns,
        now_ns: sys::monotonic_ns(),
    }
}

/// Spawns the sweep on the current runtime, until `stop`.
pub fn start_sweep(watcher: Arc<Watcher>, maps: Arc<Maps>, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(SWEEP);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                () = stop.cancelled() => return,
            }
            sweep(&watcher, &maps);
        }
    });
}

fn sweep(watcher: &Watcher, maps: &Maps) {
    let now = sys::monotonic_ns();
    let due: Vec<(u64, Look)> = watcher
        .table()
        .asleep
        .iter()
        .filter(|(_, s)| s.next_check_ns <= now)
        .map(|(&id, s)| (id, Look::of(&s.session, Some(s.seen))))
        .collect();
    if due.is_empty() {
        return;
    }
    // The kernel is asked without the lock: events keep flowing meanwhile.
    let looked: Vec<(u64, Looked)> = due
        .into_iter()
        .map(|(id, l)| (id, look(maps, &l)))
        .collect();
    let woken = {
        let mut table = watcher.table();
        let mut woken = Vec::new();
        for (id, l) in looked {
            let Some(s) = table.asleep.get_mut(&id) else {
                continue;
            };
            match l.asleep_until(s.timeout_ns) {
                Some(next) => {
                    s.next_check_ns = next;
                    s.seen = l.redirected;
                }
                None => woken.extend(table.wake(id)),
            }
        }
        woken
    };
    resume(woken);
}
