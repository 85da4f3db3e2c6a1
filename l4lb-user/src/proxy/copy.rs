//! The userspace copy path: carries rate-limited flows and every fallback from the kernel
//! path, so it is built to be fast too. A direction holds no buffer while its socket has
//! nothing to read (idle keep-alive sessions stay cheap); buffers start at 16 KiB and
//! grow to 256 KiB when reads fill them, and grown ones are kept: measured here, 8 KiB
//! buffers halve bulk throughput against 256 KiB ones.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::ReadHalf;
use tokio::net::TcpStream;

use super::{SessionEnd, Side};

const INITIAL_BUF: usize = 16 * 1024;
const MAX_BUF: usize = 256 * 1024;

#[derive(Clone, Copy, Debug)]
pub struct CopyLimits {
    /// nginx `proxy_timeout`: longest time with no read or write in either direction.
    pub idle_timeout: Duration,
    /// Bytes per second client -> backend, 0 = unlimited.
    pub upload_rate: u64,
    /// Bytes per second backend -> client, 0 = unlimited.
    pub download_rate: u64,
}

/// Bytes moved by one session, readable while it runs.
#[derive(Debug, Default)]
pub struct Transfer {
    /// Client -> backend.
    pub upload: AtomicU64,
    /// Backend -> client.
    pub download: AtomicU64,
}

impl Transfer {
    pub fn upload(&self) -> u64 {
        self.upload.load(Ordering::Relaxed)
    }

    pub fn download(&self) -> u64 {
        self.download.load(Ordering::Relaxed)
    }
}

/// Copies both ways until both sides have finished (half-close propagated), one side
/// fails, or the session is idle for `idle_timeout`.
pub async fn copy_bidirectional(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    limits: CopyLimits,
    transfer: &Transfer,
) -> SessionEnd {
    let start = Instant::now();
    // Milliseconds since `start` of the last read or write, shared by both directions.
    let last_activity = AtomicU64::new(0);
    let (cr, mut cw) = client.split();
    let (br, mut bw) = backend.split();
    let up = pump(
        &cr,
        &mut bw,
        limits.upload_rate,
        &transfer.upload,
        &last_activity,
        start,
        Side::Client,
        Side::Backend,
    );
    let down = pump(
        &br,
        &mut cw,
        limits.download_rate,
        &transfer.download,
        &last_activity,
        start,
        Side::Backend,
        Side::Client,
    );
    tokio::select! {
        r = async { tokio::try_join!(up, down) } => match r {
            Ok(_) => SessionEnd::Closed,
            Err(end) => end,
        },
        () = idle(&last_activity, start, limits.idle_timeout) => SessionEnd::IdleTimeout,
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

#[allow(clippy::too_many_arguments)]
async fn pump<W>(
    reader: &ReadHalf<'_>,
    writer: &mut W,
    rate: u64,
    counter: &AtomicU64,
    last_activity: &AtomicU64,
    start: Instant,
    from: Side,
    to: Side,
) -> Result<(), SessionEnd>
where
    W: AsyncWrite + Unpin,
{
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
        if buf.is_empty() {
            reader
                .readable()
                .await
                .map_err(|e| SessionEnd::error(from, &e))?;
            buf = vec![0u8; INITIAL_BUF];
        }
        let want = buf.len().min(chunk_cap);
        let n = match reader.try_read(&mut buf[..want]) {
            Ok(0) => {
                // Half-close: pass the FIN on and keep the other direction running.
                return match writer.shutdown().await {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                    Err(e) => Err(SessionEnd::error(to, &e)),
                };
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Nothing to read: a small buffer goes back to the allocator until the
                // next readiness; a grown one (a bulk stream) is kept.
                if buf.len() <= INITIAL_BUF {
                    buf = Vec::new();
                } else {
                    reader
                        .readable()
                        .await
                        .map_err(|e| SessionEnd::error(from, &e))?;
                }
                continue;
            }
            Err(e) => return Err(SessionEnd::error(from, &e)),
        };
        touch(last_activity, start);
        writer
            .write_all(&buf[..n])
            .await
            .map_err(|e| SessionEnd::error(to, &e))?;
        touch(last_activity, start);
        counter.fetch_add(n as u64, Ordering::Relaxed);
        sent += n as u64;
        if n == buf.len() && buf.len() < MAX_BUF.min(chunk_cap) {
            buf.resize((buf.len() * 4).min(MAX_BUF), 0);
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

fn touch(last_activity: &AtomicU64, start: Instant) {
    let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    last_activity.store(ms, Ordering::Relaxed);
}
