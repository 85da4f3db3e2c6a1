//! The userspace copy path: every TCP session starts here (until it earns the kernel
//! path), and it carries rate-limited flows and every fallback from the kernel path, so
//! it is built to be fast too. A direction that never read more than 16 KiB at once
//! holds no buffer while its socket has nothing to read (idle keep-alive sessions stay
//! cheap; a grown buffer is kept for the stream's next burst); buffers start at 16 KiB
//! and grow when reads fill them: measured here, 8 KiB buffers halve bulk throughput
//! against 256 KiB ones. An unpaced direction whose read fills 64 KiB is a bulk stream
//! and moves on to splice(2) through a pipe (`pipe`), so its bytes are no longer copied
//! at all.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;

use socket2::SockRef;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use tracing::debug;

use super::pipe::Pipe;
use crate::session::{Limits, SessionEnd, Side, Transfer};

const INITIAL_BUF: usize = 16 * 1024;
const MAX_BUF: usize = 256 * 1024;
/// An unpaced direction whose read fills a buffer this large is a bulk stream and moves
/// to splice(2) (README, copy path).
const SPLICE_AFTER_FULL_READ: usize = 64 * 1024;

/// How a stretch of copying ended.
#[derive(Debug)]
pub enum CopyEnd {
    Ended(SessionEnd),
    /// Both directions stopped as asked, at a clean point: every byte read was written
    /// to the peer socket, and neither side has finished. `quiet_for`: how long no byte
    /// had moved, so `proxy_timeout` goes on counting from the last one.
    Stopped {
        quiet_for: Duration,
    },
}

/// One direction's fixed parameters.
#[derive(Clone, Copy)]
struct Dir {
    /// Bytes per second, 0 = unlimited.
    rate: u64,
    upload: bool,
    from: Side,
    to: Side,
}

/// What both directions share.
struct Shared<'a> {
    transfer: &'a Transfer,
    /// Milliseconds since `start` of the last read or write.
    last_activity: AtomicU64,
    start: Instant,
    /// `start` on the coarse clock.
    coarse_start: Duration,
    /// Directions that read their source's EOF.
    finished: AtomicU8,
}

enum Pumped {
    /// EOF read and passed on.
    Finished,
    /// Stopped as asked, holding nothing.
    Stopped,
}

/// Asks a copy to stop at its next clean point. The session's own task sets it and then
/// polls the copy again, so the directions need no waker: they look at it whenever they
/// are polled. (A `CancellationToken` took a mutex for every look and registered a
/// waiter for every wait for bytes: per message, each way.)
#[derive(Debug, Default)]
pub struct Stop(AtomicBool);

impl Stop {
    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Copies both ways until both sides have finished (half-close propagated), one side
/// fails, the session is idle for `idle_timeout`, or `stop` is set: then each
/// direction stops at its next clean point, and a direction whose side finishes first
/// makes the other run to its end instead.
pub async fn copy(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    limits: Limits,
    transfer: &Transfer,
    stop: Option<&Stop>,
) -> CopyEnd {
    let shared = Shared {
        transfer,
        last_activity: AtomicU64::new(0),
        start: Instant::now(),
        coarse_start: coarse_now(),
        finished: AtomicU8::new(0),
    };
    let up = Dir {
        rate: limits.upload_rate,
        upload: true,
        from: Side::Client,
        to: Side::Backend,
    };
    let down = Dir {
        rate: limits.download_rate,
        upload: false,
        from: Side::Backend,
        to: Side::Client,
    };
    let (cr, mut cw) = client.split();
    let (br, mut bw) = backend.split();
    let run = async {
        let pumped = tokio::try_join!(
            pump(&cr, &mut bw, up, &shared, stop),
            pump(&br, &mut cw, down, &shared, stop)
        )?;
        match pumped {
            (Pumped::Stopped, Pumped::Stopped) => {
                let last = Duration::from_millis(shared.last_activity.load(Ordering::Relaxed));
                let quiet_for = shared.start.elapsed().saturating_sub(last);
                return Ok(CopyEnd::Stopped { quiet_for });
            }
            (Pumped::Finished, Pumped::Finished) => {}
            (Pumped::Stopped, Pumped::Finished) => {
                pump(&cr, &mut bw, up, &shared, None).await?;
            }
            (Pumped::Finished, Pumped::Stopped) => {
                pump(&br, &mut cw, down, &shared, None).await?;
            }
        }
        Ok(CopyEnd::Ended(SessionEnd::Closed))
    };
    tokio::select! {
        biased;
        r = run => r.unwrap_or_else(CopyEnd::Ended),
        () = idle(&shared.last_activity, shared.start, limits.idle_timeout) => {
            CopyEnd::Ended(SessionEnd::IdleTimeout)
        }
    }
}

/// Resolves once no byte has moved for `timeout`.
pub async fn idle(last_activity: &AtomicU64, start: Instant, timeout: Duration) {
    let mut seen = last_activity.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep_until((start + Duration::from_millis(seen) + timeout).into()).await;
        let now = last_activity.load(Ordering::Relaxed);
        if now == seen {
            return;
        }
        seen = now;
    }
}

/// Waits for `reader` to be readable; false when `stop` came first.
async fn ready(reader: &ReadHalf<'_>, stop: Option<&Stop>, from: Side) -> Result<bool, SessionEnd> {
    std::future::poll_fn(|cx| {
        if stop.is_some_and(Stop::is_set) {
            return Poll::Ready(Ok(false));
        }
        reader.as_ref().poll_read_ready(cx).map_ok(|()| true)
    })
    .await
    .map_err(|e| SessionEnd::error(from, &e))
}

async fn pump(
    reader: &ReadHalf<'_>,
    writer: &mut WriteHalf<'_>,
    dir: Dir,
    shared: &Shared<'_>,
    stop: Option<&Stop>,
) -> Result<Pumped, SessionEnd> {
    let Dir {
        rate,
        upload,
        from,
        to,
    } = dir;
    // The buffer's capacity is its size; its length is what the last read put there. It
    // is never zeroed: reads go into the spare capacity (zeroing 16 KiB per direction
    // per session showed in the profile of short sessions).
    let mut buf: Vec<u8> = Vec::new();
    // Paced reads are at most a tenth of a second's worth, so the rate holds closely.
    let chunk_cap = if rate > 0 {
        usize::try_from((rate / 10).max(1))
            .unwrap_or(MAX_BUF)
            .min(MAX_BUF)
    } else {
        MAX_BUF
    };
    let paced_since = Instant::now();
    let mut sent: u64 = 0;
    loop {
        // Here every byte read so far has been written: a clean point to stop at.
        if stop.is_some_and(Stop::is_set) {
            return Ok(Pumped::Stopped);
        }
        if buf.capacity() == 0 {
            if !ready(reader, stop, from).await? {
                return Ok(Pumped::Stopped);
            }
            buf = Vec::with_capacity(INITIAL_BUF);
        }
        let size = buf.capacity();
        // A short read emptied the socket's queue, so it also clears the readiness (bytes
        // arriving since set it again): the next turn waits for them instead of paying a
        // read that only says EAGAIN, one system call per message each way.
        let spare = buf.spare_capacity_mut();
        let want = spare.len().min(chunk_cap);
        let mut got = 0;
        let read = reader.as_ref().try_io(Interest::READABLE, || {
            got = SockRef::from(reader.as_ref()).recv(&mut spare[..want])?;
            if got > 0 && got < want {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(got)
            }
        });
        let n = match read {
            Ok(0) => return finish(writer, to, shared).await,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => got,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Nothing to read: a small buffer goes back to the allocator until the
                // next readiness; a grown one (a bulk stream) is kept.
                if size <= INITIAL_BUF {
                    buf = Vec::new();
                } else if !ready(reader, stop, from).await? {
                    return Ok(Pumped::Stopped);
                }
                continue;
            }
            Err(e) => return Err(SessionEnd::error(from, &e)),
        };
        // SAFETY: the read initialized the first `n` bytes of the spare capacity, and
        // the buffer was empty before it.
        unsafe { buf.set_len(n) };
        touch(shared);
        // Most writes go out at once, in the same tick as the read: the activity is
        // marked again only when the write had to wait.
        let written = match writer.as_ref().try_write(&buf) {
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(SessionEnd::error(to, &e)),
        };
        // A write that waits marks each step it makes: a slow reader taking the rest
        // bit by bit is activity (nginx's proxy_timeout counts every write).
        let mut done = written;
        while done < n {
            writer
                .as_ref()
                .writable()
                .await
                .map_err(|e| SessionEnd::error(to, &e))?;
            match writer.as_ref().try_write(&buf[done..]) {
                Ok(k) => {
                    done += k;
                    touch(shared);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(SessionEnd::error(to, &e)),
            }
        }
        buf.clear();
        shared.transfer.count(upload, n as u64);
        sent += n as u64;
        if n == size && size < MAX_BUF.min(chunk_cap) {
            if rate == 0 && size >= SPLICE_AFTER_FULL_READ {
                // A bulk stream: splice(2) from here on, if a pipe can be had.
                match Pipe::new() {
                    Ok(pipe) => {
                        drop(buf);
                        return spliced(reader, writer, dir, shared, stop, pipe).await;
                    }
                    Err(e) => debug!(error = %e, "no pipe for splice(2); copying through a buffer"),
                }
            }
            buf = Vec::with_capacity((size * 4).min(MAX_BUF));
        }
        if rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            let elapsed = paced_since.elapsed();
            if due > elapsed {
                tokio::time::sleep(due - elapsed).await;
            }
        }
    }
}

/// The rest of an unpaced direction through a pipe with splice(2): no userspace buffer.
async fn spliced(
    reader: &ReadHalf<'_>,
    writer: &mut WriteHalf<'_>,
    dir: Dir,
    shared: &Shared<'_>,
    stop: Option<&Stop>,
    mut pipe: Pipe,
) -> Result<Pumped, SessionEnd> {
    let Dir {
        upload, from, to, ..
    } = dir;
    let src = reader.as_ref();
    let dst = writer.as_ref();
    loop {
        // The pipe is empty here: a clean point to stop at.
        if stop.is_some_and(Stop::is_set) {
            return Ok(Pumped::Stopped);
        }
        let n = match src.try_io(Interest::READABLE, || pipe.fill(src.as_raw_fd())) {
            Ok(0) => return finish(writer, to, shared).await,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !ready(reader, stop, from).await? {
                    return Ok(Pumped::Stopped);
                }
                continue;
            }
            Err(e) => return Err(SessionEnd::error(from, &e)),
        };
        touch(shared);
        while !pipe.is_empty() {
            match dst.try_io(Interest::WRITABLE, || pipe.drain(dst.as_raw_fd())) {
                // Each step of a drain that waits is activity, as above.
                Ok(_) => touch(shared),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    dst.writable()
                        .await
                        .map_err(|e| SessionEnd::error(to, &e))?;
                }
                Err(e) => return Err(SessionEnd::error(to, &e)),
            }
        }
        shared.transfer.count(upload, n as u64);
    }
}

/// The source's EOF: pass the FIN on and keep the other direction running. The second
/// direction to finish leaves its FIN to the close that follows at once (the peer has
/// sent its own FIN, so nothing unread turns the close into a reset): one system call.
async fn finish(
    writer: &mut WriteHalf<'_>,
    to: Side,
    shared: &Shared<'_>,
) -> Result<Pumped, SessionEnd> {
    if shared.finished.fetch_add(1, Ordering::Relaxed) == 1 {
        return Ok(Pumped::Finished);
    }
    match writer.shutdown().await {
        Ok(()) => Ok(Pumped::Finished),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(Pumped::Finished),
        Err(e) => Err(SessionEnd::error(to, &e)),
    }
}

/// Marks a read or write, in milliseconds since the copy began. The coarse clock (one
/// kernel tick, 1-4 ms) is enough for `proxy_timeout` and costs a fraction of a precise
/// one, read once per message (the precise clock was 1% of the daemon's keep-alive CPU).
fn touch(shared: &Shared<'_>) {
    let ms = coarse_now().saturating_sub(shared.coarse_start).as_millis();
    shared
        .last_activity
        .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
}

fn coarse_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; this clock always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}
