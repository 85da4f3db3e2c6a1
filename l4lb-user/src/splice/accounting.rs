//! Where every byte of a spliced session is, from the program's counters and the
//! sockets' TCP_INFO: how far a peer lags behind what was redirected to it (the lag
//! cap); bytes the program held back (passed to the source socket after a failed
//! redirect), forwarded here; a FIN passed on only once every byte before it is in the
//! peer's send queue; a direction with bytes stuck in the kernel (the watchdog).
//!
//! Backpressure: a redirect uncharges the bytes from the source socket, so its TCP
//! window never closes, and the kernel queues for a slow peer whatever a fast sender
//! pushes. So the program looks at the peer every 256 KiB, and when the redirected
//! bytes not yet in the peer's send queue exceed `l4lb_ebpf::PAUSE_ABOVE` it asks for a
//! pause: the sock_ops program takes the source socket out of the attached map, later
//! bytes stay in its receive queue, charged to it, and its window closes. Once the peer
//! is down to [`RESUME_BELOW`] (looked at whenever it has room to write), the socket
//! rejoins here and the kick hands the queued bytes to the verdict in order. No byte
//! goes through userspace for this. The pause is decided in the kernel because the
//! daemon reacts too late under load: on 2 cores its task was starved for tens of ms
//! while 60+ MiB were redirected. The window closing and reopening brings
//! retransmissions that overlap bytes already received; the verdict cuts those (see
//! l4lb-ebpf), or every pause would risk doubling a segment. Only established sockets
//! can rejoin, so a socket whose write side was shut down never pauses, and the FIN
//! that would shut it waits while its direction still moves bytes
//! (`defer_half_close`). Should a peer lag past [`LAG_CAP`] anyway, the session goes to
//! the userspace copy. Two simpler designs fail outright on 6.18: passing skbs to the
//! source socket does not close its window (they queue uncharged behind the other
//! direction's redirects), and removing the socket from the attached map from
//! userspace drops the skbs the kernel is handing to the verdict at that moment.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use l4lb_ebpf::Flow;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tracing::debug;

use super::session::{io_end, End, Session};
use super::sys::{self, TcpProgress};
use super::way::Way;
use crate::session::SessionEnd;

/// A direction with bytes queued in the kernel and no progress for this long, while the
/// peer's own send queue is empty, is stalled.
pub const STALL_AFTER: Duration = Duration::from_secs(2);
/// Userspace forwarding buffer per direction (large buffers double copy throughput).
const FORWARD_BUF: usize = 256 * 1024;
const FIRST_POLL: Duration = Duration::from_millis(1);
const MAX_POLL: Duration = Duration::from_millis(20);
const MIN_CHECK: Duration = Duration::from_millis(20);
const ACTIVE_CHECK: Duration = Duration::from_millis(500);
const MAX_CHECK: Duration = Duration::from_secs(4);
/// A paused direction is looked at when its peer has room to write, and otherwise when
/// the peer should be down to [`RESUME_BELOW`] at the pace it drained since the last
/// look, within these bounds (the peer may drain without ever reporting room). Resuming
/// late leaves the redirect worker idle: with a fixed 5 ms one bulk stream ran at 8.5
/// Gbit/s, with 1 ms at 11.9.
const PAUSED_CHECK_MIN: Duration = Duration::from_millis(1);
const PAUSED_CHECK_MAX: Duration = Duration::from_millis(5);
/// Redirected bytes waiting for the peer's send queue at or below which a paused source
/// resumes (the program pauses it above `l4lb_ebpf::PAUSE_ABOVE`): enough left to keep
/// the peer busy while the source's queued bytes come through.
pub const RESUME_BELOW: u64 = 4 << 20;
/// `SO_RCVBUF` of spliced sockets: a paused source queues at most about this much (the
/// kernel doubles it for overhead), and the window it offers stays below it. 4 MiB keeps
/// loopback and LAN sessions at full speed; a path with 50 ms round trips would be
/// window-bound at about 600 Mbit/s.
pub const SPLICE_RCVBUF: usize = 4 << 20;
/// `SO_SNDBUF` of spliced sockets. The redirect worker sends an skb only while the peer
/// socket is writable (less than half its send buffer queued); otherwise it retries one
/// jiffy later (4 ms at HZ=250), with no write-space wakeup. An autotuned send buffer
/// starts at 16 KiB: one bulk stream ran at 6.7 Gbit/s with it and 8.5 with 4 MiB (the
/// kernel doubles it); 8 and 16 MiB gave no more, 2 MiB 20% less.
pub const SPLICE_SNDBUF: usize = 4 << 20;
/// A direction whose source sent its FIN passes it on once the other direction has been
/// quiet this long (see `defer_half_close`) ...
const HALF_CLOSE_QUIET: Duration = Duration::from_millis(50);
/// ... or after this long at most.
const HALF_CLOSE_DEFER: Duration = Duration::from_secs(2);
/// The failsafe: a peer lagging this far means pausing did not hold (or the source can
/// no longer pause), and the session leaves the kernel for the userspace copy.
pub const LAG_CAP: u64 = 64 << 20;

/// Bytes redirected in direction `flow` that have not reached the peer's send queue.
/// `peer` is the peer's progress; `queued0` its `queued_total` at insert; `forwarded`
/// the bytes this daemon wrote to the peer itself.
pub fn backlog(flow: &Flow, peer: &TcpProgress, queued0: u64, forwarded: u64) -> u64 {
    let accepted = peer
        .queued_total
        .saturating_sub(queued0)
        .saturating_sub(forwarded);
    flow.redirected.saturating_sub(accepted)
}

/// The watchdog's memory of one direction.
#[derive(Debug, Default)]
pub struct Watchdog {
    last_queued: Option<u64>,
    stuck_since: Option<Instant>,
}

impl Watchdog {
    /// Records a sample; true once the direction has been stuck for [`STALL_AFTER`]:
    /// bytes wait in the redirect queue, the peer sent everything it had (so it has
    /// room) and no new byte reached its send queue since the previous sample.
    pub fn stalled(&mut self, backlog: u64, peer: &TcpProgress, now: Instant) -> bool {
        let unchanged = self.last_queued == Some(peer.queued_total);
        self.last_queued = Some(peer.queued_total);
        if backlog == 0 || peer.outq > 0 || !unchanged {
            self.stuck_since = None;
            return false;
        }
        let since = *self.stuck_since.get_or_insert(now);
        now.duration_since(since) >= STALL_AFTER
    }

    /// Whether the peer's send queue grew since the previous sample.
    pub fn moved(&self, peer: &TcpProgress) -> bool {
        self.last_queued.is_some_and(|q| q != peer.queued_total)
    }
}

/// When a running direction is looked at next, and what was seen last time.
#[derive(Debug)]
pub struct Check {
    interval: Duration,
    last_redirected: u64,
    last_backlog: u64,
    /// When `last_backlog` was sampled while paused: the drain pace comes from two such.
    paused_at: Option<Instant>,
    watchdog: Watchdog,
}

impl Default for Check {
    fn default() -> Self {
        Check {
            interval: ACTIVE_CHECK,
            last_redirected: 0,
            last_backlog: 0,
            paused_at: None,
            watchdog: Watchdog::default(),
        }
    }
}

impl Check {
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Look again soon (after a hold, the program may have passed more bytes).
    pub fn reset(&mut self) {
        self.interval = MIN_CHECK;
    }

    /// A pause began: look soon, and learn the drain pace afresh.
    pub fn paused(&mut self) {
        self.interval = PAUSED_CHECK_MIN;
        self.paused_at = None;
    }
}

/// When to look at a paused direction again: three quarters of the time its lag should
/// take to reach [`RESUME_BELOW`] at the pace it fell from `before` to `lag` over
/// `over` (early rather than late: a late resume idles the peer).
fn paused_check(lag: u64, before: u64, over: Duration) -> Duration {
    let drained = before.saturating_sub(lag);
    if drained == 0 {
        return PAUSED_CHECK_MAX;
    }
    let left = lag.saturating_sub(RESUME_BELOW);
    // try_from rather than mul_f64, which panics on overflow: a long gap between two
    // looks must not end the session.
    Duration::try_from_secs_f64(over.as_secs_f64() * 0.75 * left as f64 / drained as f64)
        .map_or(PAUSED_CHECK_MAX, |d| {
            d.clamp(PAUSED_CHECK_MIN, PAUSED_CHECK_MAX)
        })
}

/// Dups of the two sockets registered with tokio for the duration of a forwarding
/// stretch only (a dup, because the other direction may register the same socket).
#[derive(Default)]
struct Readiness {
    reader: Option<AsyncFd<OwnedFd>>,
    writer: Option<AsyncFd<OwnedFd>>,
}

fn register(stream: &std::net::TcpStream, interest: Interest) -> std::io::Result<AsyncFd<OwnedFd>> {
    let fd = stream.as_fd().try_clone_to_owned()?;
    // SAFETY: the AsyncFd owns the duplicate, so it stays open for the AsyncFd's life.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(std::io::Error::from)
}

impl Session {
    fn flow(&self, i: Way) -> Result<Flow, End> {
        self.maps
            .flow(self.socks[i].cookie)
            .map_err(|e| End::Session(SessionEnd::Error(self.socks[i].side, e.to_string())))
    }

    /// Whether the program asked for a pause of direction `i` that no resume ended.
    pub(super) fn pause_requested(&self, i: Way) -> Result<bool, End> {
        let cookie = self.socks[i].cookie;
        let side = self.socks[i].side;
        let ctl = self
            .maps
            .ctl(cookie)
            .map_err(|e| End::Session(SessionEnd::Error(side, e.to_string())))?;
        Ok(self.flow(i)?.pauses != ctl.resumes)
    }

    fn peer_progress(&self, j: Way) -> Result<TcpProgress, End> {
        let p = self
            .progress(j)
            .map_err(|e| io_end(self.socks[j].side, &e, "peer TCP_INFO"))?;
        if p.closed {
            debug!(side = %self.socks[j].side, "peer connection closed (reset)");
            return Err(End::Session(SessionEnd::Reset(self.socks[j].side)));
        }
        Ok(p)
    }

    /// Direction `i`'s lag: a pause the program asked for ends at [`RESUME_BELOW`], and
    /// past [`LAG_CAP`] the session leaves the kernel. Also the watchdog's sample.
    pub(super) fn regulate(&self, i: Way, check: &mut Check) -> Result<(), End> {
        let j = i.reverse();
        let f = self.flow(i)?;
        let p = self.peer_progress(j)?;
        let lag = backlog(&f, &p, self.socks[j].queued0, self.dirs[i].forwarded());
        if check.watchdog.moved(&p) {
            self.touch();
        }
        if check.watchdog.stalled(lag, &p, Instant::now()) {
            return Err(End::Stall(i));
        }
        if lag > LAG_CAP {
            debug!(from = %self.socks[i].side, lag, outq = p.outq, "peer lags past the cap");
            return Err(End::Lagging(i));
        }
        let before = check.last_backlog;
        check.last_redirected = f.redirected;
        check.last_backlog = lag;
        if self.paused(i) && lag <= RESUME_BELOW {
            debug!(from = %self.socks[i].side, lag, "backpressure: resume");
            self.resume(i)?;
        }
        check.interval = if self.paused(i) {
            let now = Instant::now();
            let next = check.paused_at.map_or(PAUSED_CHECK_MIN, |at| {
                paused_check(lag, before, now.saturating_duration_since(at))
            });
            check.paused_at = Some(now);
            next
        } else {
            check.paused_at = None;
            ACTIVE_CHECK
        };
        Ok(())
    }

    /// A periodic look at a running direction: a hold or a broken stream whose event
    /// was lost (the ring was full), a pause to end, the lag, or a stall.
    pub(super) async fn tick(&self, i: Way, check: &mut Check) -> Result<(), End> {
        if !self.paused(i) {
            let f = self.flow(i)?;
            if f.flags & l4lb_ebpf::FLOW_BROKEN != 0 {
                return Err(self.broken(i));
            }
            if f.passed > self.dirs[i].read() {
                self.relieve(i).await?;
                check.reset();
                return Ok(());
            }
            // A pause whose event was lost: the program asks for a pause once and then
            // waits for the resume, so without this the direction would never pause
            // again and would reach the lag cap.
            if self.pause_requested(i)? {
                check.paused();
                return self.paused_by_program(i);
            }
            if f.redirected == check.last_redirected && check.last_backlog == 0 {
                check.interval = (check.interval * 2).min(MAX_CHECK);
                if check.interval == MAX_CHECK {
                    self.dirs[i].quiet.store(true, Ordering::Relaxed);
                }
                return Ok(());
            }
        }
        self.regulate(i, check)
    }

    /// Before the FIN of direction `i` is passed on: once shut down for writing, the peer
    /// socket could not rejoin the attached map after a pause of its own direction (only
    /// established sockets can), and that direction would have to finish in userspace.
    /// So while it still moves bytes (or is paused, and so will resume), the FIN waits,
    /// at most [`HALF_CLOSE_DEFER`].
    async fn defer_half_close(&self, i: Way) -> Result<(), End> {
        let j = i.reverse();
        let quiet_ns = sys::nanos(HALF_CLOSE_QUIET);
        let deadline = Instant::now() + HALF_CLOSE_DEFER;
        while Instant::now() < deadline && !self.dirs[j].finished.load(Ordering::Relaxed) {
            let f = self.flow(j)?;
            // Only a direction that has carried more than a pause's worth can need one;
            // request/response sessions pass their FIN on at once.
            let streaming = f.redirected > l4lb_ebpf::PAUSE_ABOVE
                && sys::monotonic_ns().saturating_sub(f.last_ns) < quiet_ns;
            if !self.paused(j) && !streaming {
                break;
            }
            tokio::time::sleep(FIRST_POLL * 5).await;
        }
        Ok(())
    }

    /// Waits until every byte redirected in direction `i` is in the peer's send queue.
    pub(super) async fn wait_drained(&self, i: Way) -> Result<(), End> {
        let j = i.reverse();
        let mut watchdog = Watchdog::default();
        let mut delay = FIRST_POLL;
        loop {
            let f = self.flow(i)?;
            let p = self.peer_progress(j)?;
            let left = backlog(&f, &p, self.socks[j].queued0, self.dirs[i].forwarded());
            if left == 0 {
                return Ok(());
            }
            if watchdog.moved(&p) {
                self.touch();
            }
            if watchdog.stalled(left, &p, Instant::now()) {
                // A kernel redirect worker that hit a hard error sets it on the peer and
                // stops for good: that is an error of the peer, not a stall to rescue.
                if let Ok(Some(e)) = sys::take_socket_error(self.socks[j].fd) {
                    return Err(io_end(
                        self.socks[j].side,
                        &e,
                        "kernel redirect to peer failed",
                    ));
                }
                return Err(End::Stall(i));
            }
            if delay == MAX_POLL {
                debug!(from = %self.socks[i].side, backlog = left, outq = p.outq, notsent = p.notsent, "waiting for the redirect backlog to drain");
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_POLL);
        }
    }

    /// Direction `i` holds: waits until the peer took every redirected byte, then
    /// forwards the bytes the program passed to the source socket; the program resumes
    /// redirecting at the next skb once they are all forwarded.
    pub(super) async fn relieve(&self, i: Way) -> Result<(), End> {
        let side = self.socks[i].side;
        let mut ready = Readiness::default();
        let mut delay = FIRST_POLL;
        let (started, read0) = (Instant::now(), self.dirs[i].read());
        // Time spent waiting for passed bytes since the last one came: they are in the
        // kernel's backlog and arrive within milliseconds, so a long wait is an error.
        let mut starved = Duration::ZERO;
        loop {
            self.wait_drained(i).await?;
            self.flush_pending(i, &mut ready).await?;
            let f = self.flow(i)?;
            if self.dirs[i].read() >= f.passed {
                debug!(
                    from = %side,
                    userspace_bytes = self.dirs[i].read() - read0,
                    ms = started.elapsed().as_millis() as u64,
                    "held direction forwarded"
                );
                // The buffer (up to 256 KiB) is not kept for a hold that may never come.
                *self.dirs[i].pending() = Vec::new();
                return Ok(());
            }
            if starved > STALL_AFTER {
                return Err(End::Session(SessionEnd::Error(
                    side,
                    "passed bytes never reached the socket".into(),
                )));
            }
            let waiting = Instant::now();
            match self.read_some(i)? {
                Some(n) if n > 0 => {
                    delay = FIRST_POLL;
                    starved = Duration::ZERO;
                }
                // EOF before every passed byte arrived: the rest is still on its way
                // through the kernel's backlog. Readiness would spin here, so poll.
                Some(_) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_POLL);
                    starved += waiting.elapsed();
                }
                None => {
                    if ready.reader.is_none() {
                        ready.reader = Some(
                            register(&self.socks[i].stream, Interest::READABLE)
                                .map_err(|e| io_end(side, &e, "register source"))?,
                        );
                    }
                    if let Some(r) = &ready.reader {
                        // A timeout too: bytes passed to a socket's psock may come
                        // without a wakeup of their own.
                        if let Ok(Ok(mut g)) = tokio::time::timeout(MAX_POLL, r.readable()).await {
                            g.clear_ready();
                        }
                    }
                    starved += waiting.elapsed();
                }
            }
        }
    }

    /// Reads what the source of direction `i` holds into the (empty) pending buffer.
    /// `None`: nothing there now; `Some(0)`: EOF.
    fn read_some(&self, i: Way) -> Result<Option<usize>, End> {
        let mut buf = self.dirs[i].pending();
        debug_assert!(buf.is_empty());
        let got = sys::recv_to_spare(self.socks[i].fd, &mut buf, FORWARD_BUF);
        if let Ok(Some(n)) = got {
            self.dirs[i].read.fetch_add(n as u64, Ordering::Relaxed);
        }
        got.map_err(|e| io_end(self.socks[i].side, &e, "recv from source"))
    }

    /// Writes direction `i`'s pending bytes to the peer and tells the program.
    async fn flush_pending(&self, i: Way, ready: &mut Readiness) -> Result<(), End> {
        let j = i.reverse();
        let to_end = |e: std::io::Error| io_end(self.socks[j].side, &e, "send to peer");
        loop {
            let sent = {
                let mut buf = self.dirs[i].pending();
                if buf.is_empty() {
                    return Ok(());
                }
                let sent = sys::send(self.socks[j].fd, &buf).map_err(to_end)?;
                if let Some(n) = sent {
                    buf.drain(..n);
                }
                sent
            };
            match sent {
                Some(n) => {
                    let d = &self.dirs[i];
                    d.forwarded.fetch_add(n as u64, Ordering::Relaxed);
                    self.maps
                        .set_forwarded(self.socks[i].cookie, d.forwarded())
                        .map_err(|e| {
                            End::Session(SessionEnd::Error(self.socks[i].side, e.to_string()))
                        })?;
                    self.touch();
                }
                None => {
                    if ready.writer.is_none() {
                        ready.writer = Some(
                            register(&self.socks[j].stream, Interest::WRITABLE).map_err(to_end)?,
                        );
                    }
                    if let Some(w) = &ready.writer {
                        let mut g = w.writable().await.map_err(to_end)?;
                        g.clear_ready();
                    }
                }
            }
        }
    }

    /// Direction `i` saw its FIN: once every byte before it is in the peer's send queue,
    /// pass the FIN on with shutdown(SHUT_WR). The kernel does not do it by itself, and
    /// doing it early loses the bytes still queued for redirect.
    pub(super) async fn finish(&self, i: Way) -> Result<(), End> {
        let j = i.reverse();
        let started = Instant::now();
        let mut last_read = started;
        let mut delay = FIRST_POLL;
        let mut ready = Readiness::default();
        loop {
            let f = self.flow(i)?;
            // The FIN takes one sequence number, counted in `received`.
            let received = self
                .progress(i)
                .map_err(|e| io_end(self.socks[i].side, &e, "source TCP_INFO"))?
                .received
                .saturating_sub(self.socks[i].consumed0)
                .saturating_sub(1);
            let read = self.dirs[i].read();
            // Every received byte was redirected, passed (then read here) or read here.
            if f.redirected + f.passed.max(read) < received {
                if !self.attached(i) || read < f.passed {
                    self.wait_drained(i).await?;
                    self.flush_pending(i, &mut ready).await?;
                    if self.read_some(i)?.unwrap_or(0) > 0 {
                        delay = FIRST_POLL;
                        last_read = Instant::now();
                        continue;
                    }
                    if last_read.elapsed() > STALL_AFTER {
                        // A paused source that closed: its bytes could not be read.
                        return Err(End::ClosedWhilePaused(i));
                    }
                } else if started.elapsed() > STALL_AFTER {
                    // The verdict never ran on the last bytes.
                    return Err(End::Stall(i));
                }
                // The FIN woke us before the verdict or the psock delivered the last bytes.
                if delay == MAX_POLL {
                    debug!(from = %self.socks[i].side, received, redirected = f.redirected, passed = f.passed, read, attached = self.attached(i), "FIN seen; waiting for the bytes before it");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_POLL);
                continue;
            }
            self.wait_drained(i).await?;
            self.flush_pending(i, &mut ready).await?;
            let again = self.flow(i)?;
            if again.redirected == f.redirected
                && again.passed == f.passed
                && self.dirs[i].read() == read
            {
                break;
            }
        }
        self.defer_half_close(i).await?;
        sys::shutdown_write(self.socks[j].fd)
            .map_err(|e| io_end(self.socks[j].side, &e, "shutdown peer"))?;
        self.dirs[i].finished.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// After the program was detached: drains what the kernel still holds for both
    /// directions into the peers, so the session can go on in userspace without losing
    /// a byte. Kicks a peer whose redirect worker seems stuck. Errs if the kernel does
    /// not give the bytes up.
    pub(super) async fn reclaim(&self) -> Result<(), End> {
        for i in Way::BOTH {
            let j = i.reverse();
            if self.dirs[i].finished.load(Ordering::Relaxed) {
                continue;
            }
            // A slow peer may take long to drain a full backlog; only a stall (no
            // progress with room to send) ends the wait. A redirect worker that missed a
            // wakeup gets one kick.
            let mut kicked = false;
            loop {
                match self.wait_drained(i).await {
                    Ok(()) => break,
                    Err(End::Stall(_)) if !kicked => {
                        kicked = true;
                        let _ = sys::kick_write_space(self.socks[j].fd);
                    }
                    Err(End::Stall(_)) => {
                        let f = self.flow(i)?;
                        let p = self.peer_progress(j)?;
                        let lost = backlog(&f, &p, self.socks[j].queued0, self.dirs[i].forwarded());
                        return Err(End::Session(SessionEnd::Error(
                            self.socks[j].side,
                            format!("{lost} bytes stuck in the kernel's redirect queue"),
                        )));
                    }
                    Err(e) => return Err(e),
                }
            }
            let mut ready = Readiness::default();
            self.flush_pending(i, &mut ready).await?;
            // The passed bytes left in the socket: read them out before it leaves the
            // maps (leaving purges them).
            let passed = self.flow(i)?.passed;
            let mut delay = FIRST_POLL;
            let deadline = Instant::now() + STALL_AFTER;
            while self.dirs[i].read() < passed {
                if self.read_some(i)?.unwrap_or(0) == 0 {
                    if Instant::now() > deadline {
                        return Err(End::Session(SessionEnd::Error(
                            self.socks[i].side,
                            "passed bytes never reached the socket".into(),
                        )));
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_POLL);
                }
                self.flush_pending(i, &mut ready).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paused_direction_is_looked_at_when_it_should_be_drained() {
        const MIB: u64 = 1 << 20;
        let ms = Duration::from_millis;
        // 4 MiB drained in 4 ms, 2 MiB left above the resume mark: three quarters of 2 ms.
        assert_eq!(
            paused_check(RESUME_BELOW + 2 * MIB, RESUME_BELOW + 6 * MIB, ms(4)),
            ms(1) + Duration::from_micros(500)
        );
        // Far to go at a slow pace: no longer than the cap.
        assert_eq!(
            paused_check(RESUME_BELOW + 12 * MIB, RESUME_BELOW + 13 * MIB, ms(5)),
            PAUSED_CHECK_MAX
        );
        // Almost there: no sooner than the floor.
        assert_eq!(
            paused_check(RESUME_BELOW + 1, RESUME_BELOW + 8 * MIB, ms(4)),
            PAUSED_CHECK_MIN
        );
        // Not draining (or growing): the cap.
        assert_eq!(
            paused_check(RESUME_BELOW + MIB, RESUME_BELOW + MIB, ms(4)),
            PAUSED_CHECK_MAX
        );
        assert_eq!(
            paused_check(RESUME_BELOW + 2 * MIB, RESUME_BELOW, ms(4)),
            PAUSED_CHECK_MAX
        );
        // A huge gap between two looks: the cap, not a panic.
        assert_eq!(
            paused_check(
                RESUME_BELOW + 60 * MIB,
                RESUME_BELOW + 60 * MIB + 1,
                Duration::MAX
            ),
            PAUSED_CHECK_MAX
        );
    }

    fn peer(queued_total: u64, outq: u64) -> TcpProgress {
        TcpProgress {
            queued_total,
            outq,
            ..TcpProgress::default()
        }
    }

    #[test]
    fn backlog_counts_only_redirected_bytes_not_yet_queued() {
        let f = Flow {
            redirected: 1000,
            ..Flow::default()
        };
        // 100 queued before insert, 300 written by the daemon, 500 of the redirected.
        assert_eq!(backlog(&f, &peer(900, 0), 100, 300), 500);
        assert_eq!(backlog(&f, &peer(1400, 0), 100, 300), 0);
        // Counters read in the safe order never report more than was queued.
        assert_eq!(backlog(&f, &peer(50, 0), 100, 0), 1000);
    }

    #[test]
    fn watchdog_fires_only_when_stuck_with_room_for_long_enough() {
        let t0 = Instant::now();
        let mut w = Watchdog::default();
        // The first sample is the baseline; stuck from the second one on.
        assert!(!w.stalled(10, &peer(5, 0), t0));
        assert!(!w.stalled(10, &peer(5, 0), t0 + Duration::from_secs(1)));
        assert!(!w.stalled(10, &peer(5, 0), t0 + STALL_AFTER));
        assert!(w.stalled(10, &peer(5, 0), t0 + Duration::from_secs(1) + STALL_AFTER));

        // A slow reader: the peer's queue is full, so waiting is legitimate.
        let mut w = Watchdog::default();
        for s in 0..10 {
            assert!(!w.stalled(10, &peer(5, 4096), t0 + Duration::from_secs(s)));
        }
        // Progress resets the clock.
        let mut w = Watchdog::default();
        assert!(!w.stalled(10, &peer(5, 0), t0));
        assert!(!w.stalled(10, &peer(6, 0), t0 + STALL_AFTER));
        assert!(!w.stalled(10, &peer(6, 0), t0 + STALL_AFTER + Duration::from_secs(1)));
        // Nothing queued: nothing to watch.
        let mut w = Watchdog::default();
        assert!(!w.stalled(0, &peer(5, 0), t0));
        assert!(!w.stalled(0, &peer(5, 0), t0 + STALL_AFTER * 3));
    }
}
