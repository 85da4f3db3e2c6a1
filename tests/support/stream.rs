//! Checksummed byte streams for end-to-end tests: a pseudo-random stream both ends
//! generate, so gigabytes are compared byte for byte without being stored.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A pseudo-random byte stream that sender and receiver both generate, so gigabytes are
/// compared byte for byte without being stored.
pub struct Stream {
    x: u64,
}

impl Stream {
    pub fn new(seed: u64) -> Stream {
        Stream {
            x: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
        }
    }

    /// Fills `buf` (a multiple of 8 bytes) with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_exact_mut(8) {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            chunk.copy_from_slice(&self.x.to_le_bytes());
        }
    }
}

pub const CHUNK: usize = 256 * 1024;

/// Writes `len` bytes of stream `seed`, optionally paced to `rate` bytes/s; counts into
/// `progress` as it goes.
pub async fn send_stream<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    seed: u64,
    len: u64,
    rate: Option<u64>,
    progress: &AtomicU64,
) -> std::io::Result<()> {
    let mut s = Stream::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < len {
        s.fill(&mut buf);
        let n = (len - sent).min(CHUNK as u64) as usize;
        w.write_all(&buf[..n]).await?;
        sent += n as u64;
        progress.store(sent, Ordering::Relaxed);
        if let Some(rate) = rate {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    Ok(())
}

/// Reads to EOF, checking every byte against stream `seed`; optionally paced to `rate`.
/// Returns the byte count; errs on the first differing byte.
pub async fn recv_stream<R: AsyncReadExt + Unpin>(
    r: &mut R,
    seed: u64,
    rate: Option<u64>,
    progress: &AtomicU64,
) -> std::io::Result<u64> {
    let mut s = Stream::new(seed);
    let mut expect = vec![0u8; CHUNK];
    let mut have = 0usize; // valid bytes in `expect` not yet compared
    let mut at = 0usize;
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    let mut total = 0u64;
    loop {
        let want = match rate {
            Some(rate) => ((rate / 20) as usize).clamp(1, CHUNK),
            None => CHUNK,
        };
        let n = r.read(&mut buf[..want]).await?;
        if n == 0 {
            return Ok(total);
        }
        let mut got = &buf[..n];
        while !got.is_empty() {
            if have == 0 {
                s.fill(&mut expect);
                have = CHUNK;
                at = 0;
            }
            let k = got.len().min(have);
            if got[..k] != expect[at..at + k] {
                let d = (0..k).find(|&x| got[x] != expect[at + x]).unwrap();
                let m = total + d as u64;
                let pat: Vec<u8> = got[d..(d + 16).min(got.len())].to_vec();
                let lo = m.saturating_sub(64 << 20) & !7;
                let mut g = Stream::new(seed);
                let mut skip = vec![0u8; 8];
                for _ in 0..lo / 8 {
                    g.fill(&mut skip);
                }
                let mut win = vec![0u8; 128 << 20];
                g.fill(&mut win);
                let found = win.windows(pat.len()).position(|w| w == &pat[..]);
                return Err(std::io::Error::other(format!(
                    "byte mismatch near offset {total} (at {m}; chunk read {n}; got bytes found at {:?}, shift {:?})", found.map(|f| lo + f as u64), found.map(|f| (lo + f as u64) as i64 - m as i64)
                )));
            }
            got = &got[k..];
            at += k;
            have -= k;
            total += k as u64;
        }
        progress.store(total, Ordering::Relaxed);
        if let Some(rate) = rate {
            let due = Duration::from_secs_f64(total as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// One side's plan: what it sends, what it expects, and how fast it reads.
#[derive(Clone, Copy)]
pub struct Plan {
    pub send: u64,
    pub send_seed: u64,
    pub recv_seed: u64,
    pub read_rate: Option<u64>,
    /// Paces sending to this many bytes per second.
    pub send_rate: Option<u64>,
}

#[derive(Default)]
pub struct Progress {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

/// Sends and receives at once on `sock` per `plan`; half-closes after sending.
pub async fn exchange(
    sock: TcpStream,
    plan: Plan,
    progress: Arc<Progress>,
) -> std::io::Result<u64> {
    let _ = sock.set_nodelay(true);
    let (mut r, mut w) = sock.into_split();
    let p2 = Arc::clone(&progress);
    let send = tokio::spawn(async move {
        send_stream(&mut w, plan.send_seed, plan.send, plan.send_rate, &p2.sent).await?;
        w.shutdown().await
    });
    let got = recv_stream(&mut r, plan.recv_seed, plan.read_rate, &progress.received).await?;
    send.await.map_err(std::io::Error::other)??;
    Ok(got)
}

/// A backend that runs `plan` on every connection and reports what it received.
pub async fn stream_backend(
    plan: Plan,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<std::io::Result<u64>>,
    Arc<Progress>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let progress = Arc::new(Progress::default());
    let p = Arc::clone(&progress);
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let tx = tx.clone();
            let p = Arc::clone(&p);
            tokio::spawn(async move {
                let _ = tx.send(exchange(sock, plan, p).await);
            });
        }
    });
    (a, rx, progress)
}
