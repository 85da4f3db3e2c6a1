//! One spliced session: insert both sockets into the maps, watch for FIN, errors,
//! held directions and idleness, propagate half-close once every byte reached the peer, and take
//! the session out of the kernel cleanly at the end (or to userspace on a stall).

use std::io;
use std::net::TcpStream as StdTcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{debug, warn};

use super::maps::Maps;
use super::sys::{self, TcpProgress};
use super::trial::{self, Traffic};
use super::watch::{self, Event, Watcher};
use super::way::{PerWay, Way};
use super::STATS;
use crate::session::{Limits, SessionEnd, Side, Transfer};
use crate::upgrade::wire::KernelState;

/// How long taking a flowing session out of the kernel may wait for the sock_ops program.
const DETACH_WAIT: Duration = Duration::from_secs(1);
/// How often a running session looks whether it may sleep.
const QUIET_POLL: Duration = Duration::from_secs(1);
/// A session on trial is measured after this long in the kernel (its first
/// redirects include what queued during the move), for `Trial::KERNEL_WINDOW`.
const TRIAL_WARMUP: Duration = Duration::from_millis(100);

/// How a spliced stretch of a session ended.
#[derive(Debug)]
pub enum End {
    Session(SessionEnd),
    /// Direction `.0` stopped making progress with bytes queued in the kernel.
    Stall(Way),
    /// The peer of direction `.0` lags by more than the cap: the session leaves the
    /// kernel for the userspace copy, whose reads stop when the peer stops.
    Lagging(Way),
    /// The source of direction `.0` cannot rejoin the attached map after a pause (it is
    /// no longer established: its write side was shut down), or it closed while paused
    /// and reading what it holds from userspace made no progress: the session leaves the
    /// kernel.
    ClosedWhilePaused(Way),
    /// A binary upgrade takes the session to the new process.
    Handover,
    /// Nothing to do for a while in either direction: the session may sleep (see
    /// `dormant`).
    Quiet,
    /// A session on trial moved slower than it did copied, it and the sessions of its
    /// kind measured with it together.
    Slower {
        traffic: Traffic,
        verdict: trial::Verdict,
    },
}

/// An I/O error that ends the session, logged with where it happened.
pub fn io_end(side: Side, e: &io::Error, what: &'static str) -> End {
    debug!(%side, error = %e, what, "spliced session ends on an I/O error");
    End::Session(SessionEnd::error(side, e))
}

impl From<SessionEnd> for End {
    fn from(e: SessionEnd) -> Self {
        End::Session(e)
    }
}

/// A socket of the session and where its streams stood at insert time.
pub struct Sock {
    pub stream: StdTcpStream,
    pub fd: RawFd,
    pub cookie: u64,
    pub side: Side,
    /// `queued_total` at insert: later growth is bytes the other direction delivered.
    pub queued0: u64,
    /// Bytes received and consumed before insert (never seen by the verdict).
    pub consumed0: u64,
}

/// Where a socket's streams stood just before insert.
pub struct Snapshot {
    fd: RawFd,
    cookie: u64,
    side: Side,
    queued0: u64,
    consumed0: u64,
}

impl Snapshot {
    pub fn take(stream: &StdTcpStream, side: Side) -> io::Result<Snapshot> {
        let fd = stream.as_raw_fd();
        let cookie = sys::socket_cookie(fd)?;
        // The starting point of every later "has the peer taken it all" judgement: an
        // ACK between the two reads making up `queued_total` would leave it low for
        // good, and each drain would then end that many bytes early (they would be
        // dropped with the socket's redirect queue). Repeat until the acked count holds.
        let mut queued0 = None;
        for _ in 0..8 {
            let before = sys::tcp_progress(fd)?;
            let acked = before.queued_total - before.outq;
            let after = sys::tcp_progress(fd)?;
            if after.queued_total - after.outq == acked {
                queued0 = Some(acked + before.outq);
                break;
            }
        }
        let queued0 = queued0.ok_or_else(|| io::Error::other("send counters kept moving"))?;
        // Bytes may arrive between the two reads: repeat until they agree.
        let mut consumed0 = None;
        for _ in 0..8 {
            let before = sys::tcp_progress(fd)?.received;
            let unread = sys::inq(fd)?;
            if sys::tcp_progress(fd)?.received == before {
                consumed0 = Some(before.saturating_sub(unread));
                break;
            }
        }
        let consumed0 =
            consumed0.ok_or_else(|| io::Error::other("receive counters kept moving"))?;
        Ok(Snapshot {
            fd,
            cookie,
            side,
            queued0,
            consumed0,
        })
    }

    pub fn with(self, stream: StdTcpStream) -> Sock {
        Sock {
            stream,
            fd: self.fd,
            cookie: self.cookie,
            side: self.side,
            queued0: self.queued0,
            consumed0: self.consumed0,
        }
    }
}

/// Userspace state of one direction (bytes read from `socks[i]`, written to the other).
#[derive(Default)]
pub struct Dir {
    /// Bytes this daemon read from the source itself (passed bytes first, then bytes
    /// read while the source was out of the attached map).
    pub read: AtomicU64,
    /// Of those, bytes written to the peer.
    pub forwarded: AtomicU64,
    /// Bytes read from the source and not yet written: kept outside the direction's
    /// future so a takeover after cancellation loses none.
    pub pending: Mutex<Vec<u8>>,
    /// The FIN was passed on.
    pub finished: AtomicBool,
    /// The source is out of the attached map because the peer lags (backpressure).
    pub paused: AtomicBool,
    /// The direction's checks found nothing moving for a while, and no event came since.
    pub quiet: AtomicBool,
}

impl Dir {
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    pub fn pending(&self) -> MutexGuard<'_, Vec<u8>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Which maps a socket is in, so teardown (also on cancellation) undoes exactly that.
#[derive(Default, Clone, Copy)]
struct Inserted {
    state: bool,
    watched: bool,
    target: bool,
    attached: bool,
}

pub struct Session {
    pub maps: Arc<Maps>,
    pub(super) watcher: Arc<Watcher>,
    /// Each direction's source socket: the client's for `Up`.
    pub socks: PerWay<Sock>,
    pub dirs: PerWay<Dir>,
    inserted: PerWay<Mutex<Inserted>>,
    /// CLOCK_MONOTONIC ns of the last byte this daemon moved or saw the kernel move.
    pub last_user_ns: AtomicU64,
}

/// Why the sockets could not be spliced.
pub struct InsertError {
    pub error: io::Error,
    /// A socket was already attached: bytes may be in the kernel, so the way back to
    /// userspace must drain them first.
    pub attached: bool,
}

impl Session {
    pub fn new(
        maps: Arc<Maps>,
        watcher: Arc<Watcher>,
        client: Sock,
        backend: Sock,
        quiet_for: Duration,
    ) -> Session {
        STATS.active.fetch_add(1, Ordering::Relaxed);
        Session {
            maps,
            watcher,
            socks: PerWay::new(client, backend),
            dirs: PerWay::default(),
            inserted: PerWay::default(),
            last_user_ns: AtomicU64::new(sys::monotonic_ns().saturating_sub(sys::nanos(quiet_for))),
        }
    }

    fn inserted(&self, i: Way) -> MutexGuard<'_, Inserted> {
        self.inserted[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark(&self, i: Way, f: impl FnOnce(&mut Inserted)) {
        f(&mut self.inserted(i));
    }

    /// Flow state, event routes, redirect targets, then the attached map: no skb ever
    /// finds its state or its peer missing. Returns the two directions' event streams.
    pub fn insert(&self) -> Result<PerWay<UnboundedReceiver<Event>>, InsertError> {
        let plain = |error| InsertError {
            error,
            attached: false,
        };
        let (routes, rx) = watch::wire();
        let (a, b) = (&self.socks[Way::Up], &self.socks[Way::Down]);
        for s in self.socks.values() {
            // What a paused source queues, and hands to the verdict in one burst when it
            // resumes, is its receive buffer: cap it (autotuning would grow it to
            // net.ipv4.tcp_rmem's maximum).
            sys::set_rcvbuf(s.fd, super::accounting::SPLICE_RCVBUF).map_err(plain)?;
            sys::set_sndbuf(s.fd, super::accounting::SPLICE_SNDBUF).map_err(plain)?;
            sys::watch_segments(s.fd).map_err(plain)?;
        }
        self.maps
            .create_flow(a.cookie, b.cookie, a.consumed0, b.queued0)
            .map_err(plain)?;
        self.mark(Way::Up, |m| m.state = true);
        self.maps
            .create_flow(b.cookie, a.cookie, b.consumed0, a.queued0)
            .map_err(plain)?;
        self.mark(Way::Down, |m| m.state = true);
        for ((i, s), (_, route)) in self.socks.iter().zip(routes.into_ways()) {
            self.watcher.add(s.fd, s.cookie, route).map_err(plain)?;
            self.mark(i, |m| m.watched = true);
        }
        for (i, s) in self.socks.iter() {
            self.maps.insert_target(s.cookie, s.fd).map_err(plain)?;
            self.mark(i, |m| m.target = true);
        }
        for (i, s) in self.socks.iter() {
            self.maps
                .insert_attached(s.cookie, s.fd)
                .map_err(|error| InsertError {
                    error,
                    attached: i == Way::Down,
                })?;
            self.mark(i, |m| m.attached = true);
        }
        for s in self.socks.values() {
            // Bytes that arrived before the insert wait for the next segment otherwise.
            if let Err(e) = sys::set_rcvlowat_one(s.fd) {
                debug!(error = %e, "SO_RCVLOWAT kick failed");
            }
        }
        Ok(rx)
    }

    /// What a binary upgrade's new process needs to carry the session on in the shared
    /// maps.
    pub fn export(&self) -> KernelState {
        let per = |f: &dyn Fn(Way) -> u64| [f(Way::Up), f(Way::Down)];
        KernelState {
            queued0: per(&|i| self.socks[i].queued0),
            consumed0: per(&|i| self.socks[i].consumed0),
            read: per(&|i| self.dirs[i].read()),
            forwarded: per(&|i| self.dirs[i].forwarded()),
            last_user_ns: self.last_user_ns.load(Ordering::Relaxed),
        }
    }

    /// A session the process this one replaced spliced, in maps both share: watched
    /// here from now on. Nothing in the maps is touched, also when this fails (the
    /// session is still the other process's then).
    pub fn adopt(
        maps: Arc<Maps>,
        watcher: Arc<Watcher>,
        client: StdTcpStream,
        backend: StdTcpStream,
        state: &KernelState,
    ) -> io::Result<(Box<Session>, PerWay<UnboundedReceiver<Event>>)> {
        let sock = |stream: StdTcpStream, side, at: usize| -> io::Result<Sock> {
            let fd = stream.as_raw_fd();
            Ok(Sock {
                cookie: sys::socket_cookie(fd)?,
                stream,
                fd,
                side,
                queued0: state.queued0[at],
                consumed0: state.consumed0[at],
            })
        };
        let (client, backend) = (
            sock(client, Side::Client, 0)?,
            sock(backend, Side::Backend, 1)?,
        );
        for s in [&client, &backend] {
            maps.flow(s.cookie)?;
        }
        let session = Box::new(Session::new(maps, watcher, client, backend, Duration::ZERO));
        session
            .last_user_ns
            .store(state.last_user_ns, Ordering::Relaxed);
        for (i, at) in [(Way::Up, 0), (Way::Down, 1)] {
            session.dirs[i]
                .read
                .store(state.read[at], Ordering::Relaxed);
            session.dirs[i]
                .forwarded
                .store(state.forwarded[at], Ordering::Relaxed);
        }
        let (routes, rx) = watch::wire();
        for ((i, s), (_, route)) in session.socks.iter().zip(routes.into_ways()) {
            session.watcher.add(s.fd, s.cookie, route)?;
            session.mark(i, |m| m.watched = true);
        }
        // Both looked up before either is marked: a lookup that fails then leaves
        // nothing marked, and dropping the session does not tear down the shared map
        // entries the old process still uses.
        let up = session.maps.is_attached(session.socks[Way::Up].cookie)?;
        let down = session.maps.is_attached(session.socks[Way::Down].cookie)?;
        for (i, a) in [(Way::Up, up), (Way::Down, down)] {
            session.mark(i, |m| {
                m.state = true;
                m.target = true;
                m.attached = a;
            });
        }
        Ok((session, rx))
    }

    /// Whether the session may move to a process sharing the maps as it is: nothing
    /// paused, held, half-closed or pending here, and no event waiting that would change
    /// that (the events are taken: the session's loop is over).
    pub fn at_clean_point(&self, rx: &mut PerWay<UnboundedReceiver<Event>>) -> bool {
        let mut calm = true;
        let (up, down) = rx.pair_mut();
        for r in [up, down] {
            while let Ok(ev) = r.try_recv() {
                calm &= match ev {
                    Event::Progress => true,
                    Event::Own(bits) | Event::Peer(bits) => {
                        bits & (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 == 0
                    }
                    Event::Held | Event::Broken | Event::Detached | Event::Paused => false,
                };
            }
        }
        calm && Way::BOTH.iter().all(|&i| {
            let (d, cookie) = (&self.dirs[i], self.socks[i].cookie);
            let kernel_calm = match (self.maps.flow(cookie), self.maps.ctl(cookie)) {
                (Ok(f), Ok(c)) => f.passed <= d.read() && f.pauses == c.resumes && c.detach == 0,
                _ => false,
            };
            kernel_calm
                && !d.paused.load(Ordering::Relaxed)
                && !d.finished.load(Ordering::Relaxed)
                && d.pending().is_empty()
                && self.attached(i)
        })
    }

    /// The session runs in another process now, which shares the maps: this one stops
    /// watching it and forgets it without touching the kernel.
    pub fn release(self: Box<Self>) {
        for (i, s) in self.socks.iter() {
            if self.inserted(i).watched {
                self.watcher.remove(s.fd, s.cookie);
            }
            *self.inserted(i) = Inserted::default();
        }
    }

    /// Stops the verdict on both sockets; redirects already queued still drain.
    pub fn detach(&self) {
        for i in Way::BOTH {
            self.detach_one(i);
        }
    }

    /// Stops the verdict on socket `i` from userspace. Caution, measured on 6.18: skbs
    /// the kernel is handing to the verdict at that very moment are dropped (it finds no
    /// program), so this is only for a session that ends, or whose program did not
    /// detach it in time.
    fn detach_one(&self, i: Way) {
        if self.inserted(i).attached {
            if let Err(e) = self.maps.remove_attached(self.socks[i].cookie) {
                warn!(error = %e, "cannot remove a socket from the attached sockmap");
            }
            self.mark(i, |m| m.attached = false);
        }
    }

    pub fn attached(&self, i: Way) -> bool {
        self.inserted(i).attached
    }

    pub fn paused(&self, i: Way) -> bool {
        self.dirs[i].paused.load(Ordering::Relaxed)
    }

    /// Backpressure: the program asked for socket `i` to leave the attached map, so what
    /// arrives from then on stays in its receive queue, charged to it, and its TCP window
    /// closes. The sock_ops program does it at the next outgoing segment (its callback is
    /// turned on here; a zero-length send makes one at once); [`Event::Detached`]
    /// confirms. The peer is watched for
    /// room to write, when the pause may end.
    pub fn paused_by_program(&self, i: Way) -> Result<(), End> {
        let (j, s) = (i.reverse(), &self.socks[i]);
        self.dirs[i].paused.store(true, Ordering::Relaxed);
        STATS.pauses.fetch_add(1, Ordering::Relaxed);
        sys::watch_segments(s.fd).map_err(|e| io_end(s.side, &e, "watch for pause"))?;
        match sys::send(s.fd, &[]) {
            Err(e) if e.raw_os_error() != Some(libc::EPIPE) => {
                return Err(io_end(s.side, &e, "trigger pause"))
            }
            _ => {}
        }
        self.watcher
            .want_writable(self.socks[j].fd, self.socks[j].cookie, true)
            .map_err(|e| io_end(self.socks[j].side, &e, "watch peer for room"))
    }

    /// Stops treating direction `i` as paused (also for good, when the source closed:
    /// what it still holds is then read here).
    pub fn end_pause(&self, i: Way) {
        let j = i.reverse();
        if self.dirs[i].paused.swap(false, Ordering::Relaxed) {
            let _ = self
                .watcher
                .want_writable(self.socks[j].fd, self.socks[j].cookie, false);
        }
    }

    /// Ends a pause: socket `i` rejoins the attached map and the kick hands what queued
    /// meanwhile to the verdict, in order (it cuts what retransmissions repeat). Also
    /// undoes a detach that completed after the pause was already called off.
    pub fn resume(&self, i: Way) -> Result<(), End> {
        let s = &self.socks[i];
        self.end_pause(i);
        let to_end = |e: io::Error| End::Session(SessionEnd::Error(s.side, e.to_string()));
        let pauses = self.maps.flow(s.cookie).map_err(to_end)?.pauses;
        self.maps.set_resumes(s.cookie, pauses).map_err(to_end)?;
        self.sync_attached(i)?;
        if self.attached(i) {
            return Ok(());
        }
        match self.maps.insert_attached(s.cookie, s.fd) {
            Ok(()) => {
                self.mark(i, |m| m.attached = true);
                sys::set_rcvlowat_one(s.fd).map_err(|e| io_end(s.side, &e, "kick after pause"))
            }
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let fin = self.progress(i).map(|p| p.fin_received).unwrap_or(false);
                if !fin {
                    // Its write side was shut down (half-close passed on) meanwhile.
                    return Err(End::ClosedWhilePaused(i));
                }
                // The source sent its FIN (or was reset) while paused: its EPOLLRDHUP
                // (or error) follows, and the rest is read here.
                debug!(side = %s.side, "paused source closed; it stays out of the kernel");
                Ok(())
            }
            Err(e) => Err(io_end(s.side, &e, "rejoin the attached map")),
        }
    }

    /// Learns from the kernel whether socket `i` is still in the attached map.
    fn sync_attached(&self, i: Way) -> Result<(), End> {
        let s = &self.socks[i];
        let attached = self
            .maps
            .is_attached(s.cookie)
            .map_err(|e| End::Session(SessionEnd::Error(s.side, e.to_string())))?;
        self.mark(i, |m| m.attached = attached);
        Ok(())
    }

    /// Sets the detach request of socket `i`, turns on the program's callback for the
    /// socket's segments and gives it a chance to act at once: a zero-length send runs
    /// it under the socket lock.
    fn request_detach(&self, i: Way) -> Result<(), End> {
        let s = &self.socks[i];
        self.maps
            .set_detach(s.cookie)
            .map_err(|e| End::Session(SessionEnd::Error(s.side, e.to_string())))?;
        if let Err(e) = sys::watch_segments(s.fd) {
            // The socket then leaves from here once `DETACH_WAIT` has passed.
            warn!(side = %s.side, error = %e, "cannot have the program detach the socket");
        }
        // A socket whose write side is shut down refuses even an empty send; its next
        // ACK runs the program instead.
        match sys::send(s.fd, &[]) {
            Err(e) if e.raw_os_error() != Some(libc::EPIPE) => {
                return Err(io_end(s.side, &e, "trigger detach"))
            }
            _ => {}
        }
        self.sync_attached(i)
    }

    /// Takes both sockets out of the attached map while bytes may still flow (the way
    /// to userspace). Only the sock_ops program can do that without racing the verdict
    /// (see l4lb-ebpf); it acts once the verdict has seen every byte received. After
    /// [`DETACH_WAIT`] without that, from here.
    pub async fn detach_flowing(&self) {
        // Both sockets are asked at once and each gets the whole wait: asked in turn, a
        // socket whose peer is slow to answer (zero-window probes) left the other one
        // a single try before its removal from here, which drops skbs in flight.
        let deadline = std::time::Instant::now() + DETACH_WAIT;
        let mut waiting = PerWay::new(true, true);
        loop {
            for i in Way::BOTH {
                if !waiting[i] {
                    continue;
                }
                if let Err(e) = self.request_detach(i) {
                    debug!(error = ?e, "detach request failed");
                    waiting[i] = false;
                } else if !self.attached(i) {
                    waiting[i] = false;
                }
            }
            if !waiting.values().any(|&w| w) {
                return;
            }
            if std::time::Instant::now() > deadline {
                for i in Way::BOTH {
                    if waiting[i] {
                        warn!(side = %self.socks[i].side, "socket did not leave the attached map in time; removing it from userspace");
                        self.detach_one(i);
                    }
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Direction `i` dropped bytes it could not keep in order (see l4lb-ebpf): the
    /// session ends, and both ends see a reset, not a FIN after a gap that would pass
    /// for a complete stream.
    pub(super) fn broken(&self, i: Way) -> End {
        for s in self.socks.values() {
            if let Err(e) = sys::reset_on_close(s.fd) {
                warn!(side = %s.side, error = %e, "cannot make the close a reset");
            }
        }
        SessionEnd::Error(
            self.socks[i].side,
            "the kernel could not keep the byte stream intact".into(),
        )
        .into()
    }

    /// Takes both sockets out of every map and the watcher. Idempotent.
    pub fn teardown(&self) {
        self.detach();
        for (i, s) in self.socks.iter() {
            let ins = *self.inserted(i);
            if ins.target {
                if let Err(e) = self.maps.remove_target(s.cookie) {
                    warn!(error = %e, "cannot remove a socket from the target sockmap");
                }
            }
            if ins.watched {
                self.watcher.remove(s.fd, s.cookie);
            }
            if ins.state {
                if let Ok(f) = self.maps.flow(s.cookie) {
                    STATS.holds.fetch_add(f.holds, Ordering::Relaxed);
                    STATS.trimmed.fetch_add(f.trimmed, Ordering::Relaxed);
                }
                if let Err(e) = self.maps.remove_state(s.cookie) {
                    warn!(error = %e, "cannot remove a flow from the kernel map");
                }
            }
            *self.inserted(i) = Inserted::default();
        }
    }

    /// Leaves the kernel: duplicates of both sockets (the originals close with the
    /// session) and the bytes this daemon forwarded so far.
    pub fn into_streams(self) -> io::Result<(StdTcpStream, StdTcpStream, u64)> {
        self.teardown();
        let client = self.socks[Way::Up].stream.try_clone()?;
        let backend = self.socks[Way::Down].stream.try_clone()?;
        Ok((client, backend, self.userspace_bytes()))
    }

    /// Copies the kernel counters into the access log's counters.
    pub fn publish(&self, transfer: &Transfer) {
        for (i, counter) in [(Way::Up, &transfer.upload), (Way::Down, &transfer.download)] {
            if let Ok(total) = self.moved(i) {
                counter.fetch_max(total, Ordering::Relaxed);
            }
        }
    }

    /// Bytes direction `i` moved since the insert: redirected by the kernel, or written
    /// by this daemon.
    fn moved(&self, i: Way) -> io::Result<u64> {
        let f = self.maps.flow(self.socks[i].cookie)?;
        Ok(f.redirected + self.dirs[i].forwarded())
    }

    pub fn userspace_bytes(&self) -> u64 {
        self.dirs.values().map(Dir::forwarded).sum()
    }

    pub fn touch(&self) {
        self.last_user_ns
            .store(sys::monotonic_ns(), Ordering::Relaxed);
    }

    pub fn progress(&self, i: Way) -> io::Result<TcpProgress> {
        sys::tcp_progress(self.socks[i].fd)
    }

    /// Runs both directions until both FINs were passed on, an error, idleness, a stall,
    /// or a quiet spell.
    pub async fn splice(
        &self,
        rx: &mut PerWay<UnboundedReceiver<Event>>,
        limits: Limits,
        transfer: &Transfer,
        interrupts: super::Interrupts<'_>,
        trial: Option<super::Trial>,
    ) -> End {
        let (up, down) = rx.pair_mut();
        let both = async {
            tokio::try_join!(self.direction(Way::Up, up), self.direction(Way::Down, down))
        };
        let end = tokio::select! {
            r = both => match r {
                Ok(_) => End::Session(SessionEnd::Closed),
                Err(e) => e,
            },
            e = self.idle(limits.idle_timeout, transfer) => e,
            () = interrupts.handover.cancelled() => End::Handover,
            () = interrupts.shutdown.cancelled() => End::Session(SessionEnd::Shutdown),
            () = self.quiet() => End::Quiet,
            e = self.trial(trial) => e,
        };
        self.publish(transfer);
        end
    }

    /// Resolves if the session is on trial and moves slower here than it did copied,
    /// judged with the trials measured at the same time (see `trial`); pending otherwise.
    async fn trial(&self, trial: Option<super::Trial>) -> End {
        if let Some(t) = trial {
            tokio::time::sleep(TRIAL_WARMUP).await;
            if let Ok(before) = self.measured(t.traffic) {
                let start = tokio::time::Instant::now();
                tokio::time::sleep(super::Trial::KERNEL_WINDOW).await;
                if let Ok(after) = self.measured(t.traffic) {
                    let end = tokio::time::Instant::now();
                    let report = trial::Report {
                        chatty: t.traffic == Traffic::Chatty,
                        messages: t.copied_messages,
                        start,
                        end,
                        copied: t.copied_rate,
                        kernel: super::Trial::rate(after.saturating_sub(before), end - start),
                    };
                    trial::post(report);
                    let alone = trial::Verdict {
                        chatty: report.chatty,
                        sessions: 1,
                        messages: report.messages,
                        kernel: report.kernel,
                        copied: report.copied,
                    };
                    let verdict = if report.chatty || alone.lost() {
                        tokio::time::sleep(trial::GATHER).await;
                        trial::judge(&report)
                    } else {
                        alone
                    };
                    debug!(
                        chatty = report.chatty,
                        rate = report.kernel,
                        copied = report.copied,
                        sessions = verdict.sessions,
                        messages = verdict.messages,
                        together = verdict.kernel,
                        together_copied = verdict.copied,
                        "session on trial measured in the kernel"
                    );
                    if verdict.lost() {
                        return End::Slower {
                            traffic: t.traffic,
                            verdict,
                        };
                    }
                }
            }
        }
        std::future::pending().await
    }

    /// The bytes a trial of `traffic` counts, moved so far.
    fn measured(&self, traffic: Traffic) -> io::Result<u64> {
        match traffic {
            Traffic::Bulk { upload: true } => self.moved(Way::Up),
            Traffic::Bulk { upload: false } => self.moved(Way::Down),
            Traffic::Chatty => Ok(self.moved(Way::Up)?.saturating_add(self.moved(Way::Down)?)),
        }
    }

    /// Resolves once both directions are quiet with nothing held: each waits for an
    /// event, so dropping them loses nothing.
    async fn quiet(&self) {
        loop {
            tokio::time::sleep(QUIET_POLL).await;
            let restful = Way::BOTH.iter().all(|&i| {
                let d = &self.dirs[i];
                d.quiet.load(Ordering::Relaxed)
                    && !d.paused.load(Ordering::Relaxed)
                    && !d.finished.load(Ordering::Relaxed)
                    && d.pending().is_empty()
                    && self.attached(i)
            });
            if restful {
                return;
            }
        }
    }

    /// Resolves when no byte moved in either direction for `timeout`.
    pub async fn idle(&self, timeout: Duration, transfer: &Transfer) -> End {
        let timeout_ns = sys::nanos(timeout);
        loop {
            let mut last = self.last_user_ns.load(Ordering::Relaxed);
            for s in self.socks.values() {
                match self.maps.flow(s.cookie) {
                    Ok(f) => last = last.max(f.last_ns),
                    Err(e) => return End::Session(SessionEnd::Error(s.side, e.to_string())),
                }
            }
            self.publish(transfer);
            let now = sys::monotonic_ns();
            let idle_for = now.saturating_sub(last);
            if idle_for >= timeout_ns {
                return End::Session(SessionEnd::IdleTimeout);
            }
            tokio::time::sleep(Duration::from_nanos(timeout_ns - idle_for)).await;
        }
    }

    /// One direction: reacts to its events and checks on it now and then.
    async fn direction(&self, i: Way, rx: &mut UnboundedReceiver<Event>) -> Result<(), End> {
        let j = i.reverse();
        let mut check = super::accounting::Check::default();
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                () = tokio::time::sleep(check.interval()) => None,
            };
            if ev.is_some() {
                self.dirs[i].quiet.store(false, Ordering::Relaxed);
            }
            match ev {
                Some(Event::Held) => {
                    self.relieve(i).await?;
                    check.reset();
                }
                Some(Event::Progress) => self.regulate(i, &mut check)?,
                Some(Event::Paused) => {
                    // Acted on only while the program's request is open: a tick may
                    // have found this pause first (see `tick`), and even ended it
                    // since; an event that late must not pause again.
                    if !self.paused(i) && self.pause_requested(i)? {
                        check.paused();
                        self.paused_by_program(i)?;
                    }
                }
                Some(Event::Detached) => {
                    self.mark(i, |m| m.attached = false);
                    if !self.paused(i) && !self.dirs[i].finished.load(Ordering::Relaxed) {
                        // The pause was called off before the program acted.
                        self.resume(i)?;
                    }
                }
                Some(Event::Broken) => return Err(self.broken(i)),
                Some(Event::Own(bits)) => {
                    if bits & libc::EPOLLERR as u32 != 0 {
                        if let Some(e) = sys::take_socket_error(self.socks[i].fd).ok().flatten() {
                            return Err(io_end(self.socks[i].side, &e, "source socket error"));
                        }
                    }
                    if bits & (libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0 {
                        self.end_pause(i);
                        self.finish(i).await?;
                        return Ok(());
                    }
                }
                Some(Event::Peer(bits)) => {
                    if bits & libc::EPOLLERR as u32 != 0 {
                        if let Some(e) = sys::take_socket_error(self.socks[j].fd).ok().flatten() {
                            return Err(io_end(self.socks[j].side, &e, "peer socket error"));
                        }
                    }
                    if bits & libc::EPOLLOUT as u32 != 0 && self.paused(i) {
                        self.regulate(i, &mut check)?;
                    }
                }
                None => {
                    if rx.is_closed() {
                        return Err(SessionEnd::Error(
                            self.socks[i].side,
                            "splice watcher gone".into(),
                        )
                        .into());
                    }
                    self.tick(i, &mut check).await?;
                }
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Also runs when the session's task is cancelled (daemon shutdown).
        self.teardown();
        STATS.active.fetch_sub(1, Ordering::Relaxed);
    }
}
