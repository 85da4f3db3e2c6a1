//! The private epoll that watches spliced sockets for FIN (EPOLLRDHUP) and errors, and for
//! room to write (EPOLLOUT) only while a direction towards them is paused. Spliced sockets
//! must stay out of tokio's reactor: every redirected skb wakes EPOLLIN waiters, and the
//! kernel filters those wakeups cheaply for an epoll that never asked for EPOLLIN. The same epoll carries the program's event ring and the eBPF log ring; one
//! tokio task drains it and routes each event to its session.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use aya::maps::{MapData, RingBuf};
use l4lb_ebpf::{
    Event as RingEvent, EVENT_BROKEN, EVENT_DETACHED, EVENT_HELD, EVENT_PAUSED, EVENT_PROGRESS,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, trace, warn};

use super::dormant::{resume, Sleeper, Woken};
use super::way::PerWay;
use super::STATS;

/// epoll tokens of the two rings; socket tokens are socket cookies (small counters).
const TOKEN_EVENTS: u64 = u64::MAX;
const TOKEN_LOG: u64 = u64::MAX - 1;

/// What every watched socket is watched for. Edge-triggered: FIN and errors are state
/// changes.
const BASE_INTEREST: u32 = (libc::EPOLLRDHUP | libc::EPOLLET) as u32;

/// Something a session must look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// epoll bits of the socket this direction reads from.
    Own(u32),
    /// epoll bits of the socket this direction writes to.
    Peer(u32),
    /// The program holds this direction (a redirect failed).
    Held,
    /// The program redirected another `1 << PROGRESS_SHIFT` bytes (4 MiB) in this direction.
    Progress,
    /// The program could not keep this direction's stream intact.
    Broken,
    /// The source left the attached map, as the direction or a pause asked.
    Detached,
    /// The program asked for a pause of this direction (its peer lags).
    Paused,
}

/// Where a socket's events go.
pub enum Route {
    /// To a running session: the direction reading from the socket and the one writing
    /// to it.
    Live {
        own: UnboundedSender<Event>,
        peer: UnboundedSender<Event>,
    },
    /// To a dormant session, which the event wakes.
    Asleep(u64),
}

/// The routes of both sockets of a session, and the receiving ends of its directions.
pub fn wire() -> (PerWay<Route>, PerWay<UnboundedReceiver<Event>>) {
    let (tx_up, rx_up) = mpsc::unbounded_channel();
    let (tx_down, rx_down) = mpsc::unbounded_channel();
    let routes = PerWay::new(
        Route::Live {
            own: tx_up.clone(),
            peer: tx_down.clone(),
        },
        Route::Live {
            own: tx_down,
            peer: tx_up,
        },
    );
    (routes, PerWay::new(rx_up, rx_down))
}

/// Routes, and the dormant sessions they lead to: one lock, so an event finds a session
/// either running or asleep, never between the two.
#[derive(Default)]
pub(super) struct Table {
    routes: HashMap<u64, Route>,
    pub(super) asleep: HashMap<u64, Sleeper>,
    next_id: u64,
}

impl Table {
    /// Takes a dormant session out, its routes live again.
    pub(super) fn wake(&mut self, id: u64) -> Option<Woken> {
        let sleeper = self.asleep.remove(&id)?;
        let (routes, rx) = wire();
        for (way, route) in routes.into_ways() {
            self.routes.insert(sleeper.session.socks[way].cookie, route);
        }
        Some((sleeper, rx))
    }

    /// Sends an event to its session, waking it if it sleeps; false when no session
    /// watches the socket.
    fn deliver(&mut self, cookie: u64, woken: &mut Vec<Woken>, send: impl Fn(&Route)) -> bool {
        if let Some(&Route::Asleep(id)) = self.routes.get(&cookie) {
            woken.extend(self.wake(id));
        }
        match self.routes.get(&cookie) {
            Some(route) => {
                send(route);
                true
            }
            None => false,
        }
    }
}

pub struct Watcher {
    epoll: OwnedFd,
    table: Mutex<Table>,
    /// The program's event ring, while this process is its reader: a ring has one
    /// reader, and a binary upgrade passes it from the old process to the new one.
    ring: Mutex<Option<RingBuf<MapData>>>,
    /// Ring events for sockets not watched yet, kept while sessions arrive from the
    /// process this one replaces (it stopped reading the ring before sending them).
    orphans: Mutex<Option<HashMap<u64, Vec<Event>>>>,
}

/// Most sockets, and events per socket, kept as orphans: past that they are dropped
/// (a session's periodic checks make up for a lost event, as for a full ring).
const MAX_ORPHAN_SOCKETS: usize = 1 << 16;
const MAX_ORPHAN_EVENTS: usize = 64;

fn epoll_ctl(epfd: RawFd, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `ev` is a valid epoll_event for the call.
    let rc = unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Watcher {
    fn new() -> io::Result<Watcher> {
        // SAFETY: no pointers; the returned fd is owned below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Watcher {
            // SAFETY: a fresh descriptor nobody else owns.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            table: Mutex::new(Table::default()),
            ring: Mutex::new(None),
            orphans: Mutex::new(None),
        })
    }

    pub(super) fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts watching a socket.
    pub fn add(&self, fd: RawFd, cookie: u64, route: Route) -> io::Result<()> {
        {
            // Under the table's lock (then the orphans'), as `ring_event` takes them: an
            // event it fails to deliver meanwhile would otherwise become an orphan after
            // the orphans were handed over, and be lost.
            let mut table = self.table();
            let orphaned = self.orphans().as_mut().and_then(|o| o.remove(&cookie));
            if let (Some(events), Route::Live { own, .. }) = (orphaned, &route) {
                for ev in events {
                    let _ = own.send(ev);
                }
            }
            table.routes.insert(cookie, route);
        }
        epoll_ctl(
            self.epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            fd,
            BASE_INTEREST,
            cookie,
        )
        .inspect_err(|_| {
            self.table().routes.remove(&cookie);
        })
    }

    fn orphans(&self) -> MutexGuard<'_, Option<HashMap<u64, Vec<Event>>>> {
        self.orphans.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ring(&self) -> MutexGuard<'_, Option<RingBuf<MapData>>> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Becomes the ring's reader. `orphans`: keep events for sockets not watched yet
    /// until [`Watcher::drop_orphans`] (sessions are still arriving).
    pub fn take_ring(&self, ring: RingBuf<MapData>, orphans: bool) -> io::Result<()> {
        if orphans {
            *self.orphans() = Some(HashMap::new());
        }
        let mut slot = self.ring();
        epoll_ctl(
            self.epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            ring.as_raw_fd(),
            libc::EPOLLIN as u32,
            TOKEN_EVENTS,
        )?;
        *slot = Some(ring);
        Ok(())
    }

    /// Stops reading the ring for good; once this returns, no read is under way.
    pub fn release_ring(&self) {
        if let Some(ring) = self.ring().take() {
            let _ = epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                ring.as_raw_fd(),
                0,
                TOKEN_EVENTS,
            );
        }
    }

    /// Every session that was to arrive did: events for unknown sockets are dropped
    /// again.
    pub fn drop_orphans(&self) {
        *self.orphans() = None;
    }

    /// Adds or drops EPOLLOUT for a watched socket. Adding reports at once if there is
    /// room already (epoll polls the socket on modify).
    pub fn want_writable(&self, fd: RawFd, cookie: u64, on: bool) -> io::Result<()> {
        let events = if on {
            BASE_INTEREST | libc::EPOLLOUT as u32
        } else {
            BASE_INTEREST
        };
        epoll_ctl(
            self.epoll.as_raw_fd(),
            libc::EPOLL_CTL_MOD,
            fd,
            events,
            cookie,
        )
    }

    pub fn remove(&self, fd: RawFd, cookie: u64) {
        if self.table().routes.remove(&cookie).is_some() {
            let _ = epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, 0, cookie);
        }
    }

    pub fn routes_len(&self) -> usize {
        self.table().routes.len()
    }

    /// Puts a quiet session to sleep: its sockets' routes lead to `sleeper` until an
    /// event or the sweep wakes it. Gives it back, to go on at once, when an event is
    /// already waiting for it or `stay_awake` says so; asked under the same lock as
    /// [`Watcher::wake_all`], so a session never falls asleep after a wake-up call.
    pub(super) fn sleep(
        &self,
        sleeper: Sleeper,
        rx: PerWay<UnboundedReceiver<Event>>,
        stay_awake: impl Fn() -> bool,
    ) -> Option<Woken> {
        let mut table = self.table();
        if rx.values().any(|r| !r.is_empty()) || stay_awake() {
            return Some((sleeper, rx));
        }
        let id = table.next_id;
        table.next_id += 1;
        for s in sleeper.session.socks.values() {
            table.routes.insert(s.cookie, Route::Asleep(id));
        }
        table.asleep.insert(id, sleeper);
        STATS.slept.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Wakes every dormant session (a binary upgrade or shutdown needs them all).
    pub fn wake_all(&self) {
        let woken: Vec<Woken> = {
            let mut table = self.table();
            let ids: Vec<u64> = table.asleep.keys().copied().collect();
            ids.into_iter().filter_map(|id| table.wake(id)).collect()
        };
        resume(woken);
    }

    pub fn asleep_len(&self) -> usize {
        self.table().asleep.len()
    }

    fn socket_event(&self, cookie: u64, bits: u32, woken: &mut Vec<Woken>) {
        // A socket no session watches any more: nothing to tell.
        let _ = self.table().deliver(cookie, woken, |route| {
            if let Route::Live { own, peer } = route {
                let _ = own.send(Event::Own(bits));
                let _ = peer.send(Event::Peer(bits));
            }
        });
    }

    fn ring_event(&self, ev: RingEvent, woken: &mut Vec<Woken>) {
        let event = match ev.kind {
            EVENT_HELD => Event::Held,
            EVENT_PROGRESS => Event::Progress,
            EVENT_BROKEN => Event::Broken,
            EVENT_DETACHED => Event::Detached,
            EVENT_PAUSED => Event::Paused,
            _ => return,
        };
        let mut table = self.table();
        let delivered = table.deliver(ev.cookie, woken, |route| {
            if let Route::Live { own, .. } = route {
                let _ = own.send(event);
            }
        });
        if !delivered {
            if let Some(orphans) = self.orphans().as_mut() {
                if orphans.len() < MAX_ORPHAN_SOCKETS || orphans.contains_key(&ev.cookie) {
                    let kept = orphans.entry(ev.cookie).or_default();
                    if kept.len() < MAX_ORPHAN_EVENTS {
                        kept.push(event);
                    }
                }
            }
        }
    }
}

/// The epoll fd as tokio sees it.
struct EpollFd(Arc<Watcher>);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.epoll.as_raw_fd()
    }
}

/// Creates the watcher and spawns its dispatcher task on the current runtime, until
/// `stop`. Without `events`, the ring is read once [`Watcher::take_ring`] gives it.
pub fn start(
    events: Option<RingBuf<MapData>>,
    mut logger: Option<aya_log::EbpfLogger<TracingLog>>,
    stop: CancellationToken,
) -> anyhow::Result<Arc<Watcher>> {
    let watcher = Arc::new(Watcher::new()?);
    let epfd = watcher.epoll.as_raw_fd();
    if let Some(events) = events {
        watcher.take_ring(events, false)?;
    }
    if let Some(l) = &logger {
        epoll_ctl(
            epfd,
            libc::EPOLL_CTL_ADD,
            l.as_raw_fd(),
            libc::EPOLLIN as u32,
            TOKEN_LOG,
        )?;
    }
    // SAFETY: the AsyncFd holds an `Arc` of the watcher, which owns the epoll fd: it stays
    // open as long as the AsyncFd exists.
    let afd = unsafe {
        AsyncFd::register_with_interest(EpollFd(Arc::clone(&watcher)), Interest::READABLE)
    }
    .map_err(io::Error::from)?;
    tokio::spawn(async move {
        let mut buf = [libc::epoll_event { events: 0, u64: 0 }; 64];
        loop {
            let readable = tokio::select! {
                r = afd.readable() => r,
                () = stop.cancelled() => return,
            };
            let mut guard = match readable {
                Ok(g) => g,
                Err(e) => {
                    error!(error = %e, "splice watcher stopped; spliced sessions will end at their idle timeout");
                    return;
                }
            };
            let w = &afd.get_ref().0;
            let mut woken = Vec::new();
            let drained = guard.try_io(|_| {
                // SAFETY: `buf` has room for its length in events; timeout 0 never blocks.
                let n = unsafe {
                    libc::epoll_wait(w.epoll.as_raw_fd(), buf.as_mut_ptr(), buf.len() as i32, 0)
                };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                if n == 0 {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                for ev in &buf[..n as usize] {
                    match ev.u64 {
                        TOKEN_EVENTS => {
                            if let Some(events) = w.ring().as_mut() {
                                while let Some(item) = events.next() {
                                    if let Some(ev) = ring_event(&item) {
                                        w.ring_event(ev, &mut woken);
                                    }
                                }
                            }
                        }
                        TOKEN_LOG => {
                            if let Some(l) = logger.as_mut() {
                                l.flush();
                            }
                        }
                        cookie => w.socket_event(cookie, ev.events, &mut woken),
                    }
                }
                Ok(())
            });
            resume(woken);
            if let Ok(Err(e)) = drained {
                warn!(error = %e, "splice watcher epoll_wait failed");
            }
        }
    });
    Ok(watcher)
}

fn ring_event(item: &[u8]) -> Option<RingEvent> {
    let word = |at: usize| -> Option<u64> {
        Some(u64::from_ne_bytes(item.get(at..at + 8)?.try_into().ok()?))
    };
    Some(RingEvent {
        cookie: word(0)?,
        kind: word(8)?,
    })
}

/// Sends the program's aya-log records to `tracing` (target `ebpf`).
pub struct TracingLog;

impl log::Log for TracingLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, r: &log::Record<'_>) {
        match r.level() {
            log::Level::Error => error!(target: "ebpf", "{}", r.args()),
            log::Level::Warn => warn!(target: "ebpf", "{}", r.args()),
            log::Level::Info => info!(target: "ebpf", "{}", r.args()),
            log::Level::Debug => debug!(target: "ebpf", "{}", r.args()),
            log::Level::Trace => trace!(target: "ebpf", "{}", r.args()),
        }
    }

    fn flush(&self) {}
}
