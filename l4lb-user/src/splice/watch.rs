//! The private epoll that watches spliced sockets for FIN (EPOLLRDHUP) and errors, and for
//! room to write (EPOLLOUT) only while a direction towards them is paused. Spliced sockets
//! must stay out of tokio's reactor: every redirected skb wakes EPOLLIN waiters, and the
//! kernel filters those wakeups cheaply for an epoll that never asked for EPOLLIN. The same epoll carries the program's event ring and the eBPF log ring; one
//! tokio task drains it and routes each event to its session.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use aya::maps::{MapData, RingBuf};
use l4lb_ebpf::{
    Event as RingEvent, EVENT_BROKEN, EVENT_DETACHED, EVENT_HELD, EVENT_PAUSED, EVENT_PROGRESS,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, error, info, trace, warn};

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
    /// The program redirected another MiB in this direction.
    Progress,
    /// The program could not keep this direction's stream intact.
    Broken,
    /// The source left the attached map, as the direction or a pause asked.
    Detached,
    /// The program asked for a pause of this direction (its peer lags).
    Paused,
}

/// Where a socket's events go: the direction reading from it and the one writing to it.
pub struct Route {
    pub own: UnboundedSender<Event>,
    pub peer: UnboundedSender<Event>,
}

pub struct Watcher {
    epoll: OwnedFd,
    routes: Mutex<HashMap<u64, Route>>,
}

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
            routes: Mutex::new(HashMap::new()),
        })
    }

    fn routes(&self) -> MutexGuard<'_, HashMap<u64, Route>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts watching a socket.
    pub fn add(&self, fd: RawFd, cookie: u64, route: Route) -> io::Result<()> {
        self.routes().insert(cookie, route);
        epoll_ctl(
            self.epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            fd,
            BASE_INTEREST,
            cookie,
        )
        .inspect_err(|_| {
            self.routes().remove(&cookie);
        })
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
        if self.routes().remove(&cookie).is_some() {
            let _ = epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, 0, cookie);
        }
    }

    pub fn routes_len(&self) -> usize {
        self.routes().len()
    }

    fn socket_event(&self, cookie: u64, bits: u32) {
        if let Some(r) = self.routes().get(&cookie) {
            let _ = r.own.send(Event::Own(bits));
            let _ = r.peer.send(Event::Peer(bits));
        }
    }

    fn ring_event(&self, ev: RingEvent) {
        let event = match ev.kind {
            EVENT_HELD => Event::Held,
            EVENT_PROGRESS => Event::Progress,
            EVENT_BROKEN => Event::Broken,
            EVENT_DETACHED => Event::Detached,
            EVENT_PAUSED => Event::Paused,
            _ => return,
        };
        if let Some(r) = self.routes().get(&ev.cookie) {
            let _ = r.own.send(event);
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

/// Creates the watcher and spawns its dispatcher task on the current runtime.
pub fn start(
    mut events: RingBuf<MapData>,
    mut logger: Option<aya_log::EbpfLogger<TracingLog>>,
) -> anyhow::Result<Arc<Watcher>> {
    let watcher = Arc::new(Watcher::new()?);
    let epfd = watcher.epoll.as_raw_fd();
    epoll_ctl(
        epfd,
        libc::EPOLL_CTL_ADD,
        events.as_raw_fd(),
        libc::EPOLLIN as u32,
        TOKEN_EVENTS,
    )?;
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
            let mut guard = match afd.readable().await {
                Ok(g) => g,
                Err(e) => {
                    error!(error = %e, "splice watcher stopped; spliced sessions will end at their idle timeout");
                    return;
                }
            };
            let w = &afd.get_ref().0;
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
                            while let Some(item) = events.next() {
                                if let Some(ev) = ring_event(&item) {
                                    w.ring_event(ev);
                                }
                            }
                        }
                        TOKEN_LOG => {
                            if let Some(l) = logger.as_mut() {
                                l.flush();
                            }
                        }
                        cookie => w.socket_event(cookie, ev.events),
                    }
                }
                Ok(())
            });
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
