//! What a TCP session is, whichever path carries it (the copy path in `proxy` or the
//! kernel path in `splice`): its sides, its limits, its byte counts and how it ended.
//! The session in `proxy::tcp` owns these; both paths only use them.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Backend => "backend",
        })
    }
}

/// How a session ended, for the access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// Both directions finished with FIN.
    Closed,
    /// `proxy_timeout` passed with no traffic.
    IdleTimeout,
    /// A side reset the connection.
    Reset(Side),
    /// Another I/O error on a side.
    Error(Side, String),
    /// The daemon stopped before the session finished.
    Shutdown,
    /// A bug: the session's code panicked (counted in `session_panics`).
    Panic,
}

impl SessionEnd {
    pub fn error(side: Side, e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => SessionEnd::Reset(side),
            _ => SessionEnd::Error(side, e.to_string()),
        }
    }
}

impl fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionEnd::Closed => f.write_str("closed"),
            SessionEnd::IdleTimeout => f.write_str("idle_timeout"),
            SessionEnd::Reset(side) => write!(f, "{side}_reset"),
            SessionEnd::Error(side, e) => write!(f, "{side}_error({e})"),
            SessionEnd::Shutdown => f.write_str("shutdown"),
            SessionEnd::Panic => f.write_str("panic"),
        }
    }
}

/// What bounds a session on either path (the rates only on the copy path, which paces
/// them).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// nginx `proxy_timeout`: longest time with no read or write in either direction.
    pub idle_timeout: Duration,
    /// Bytes per second client -> backend, 0 = unlimited.
    pub upload_rate: u64,
    /// Bytes per second backend -> client, 0 = unlimited.
    pub download_rate: u64,
}

/// Bytes moved by one session, readable while it runs.
#[derive(Debug)]
pub struct Transfer {
    /// Client -> backend.
    pub upload: AtomicU64,
    /// Backend -> client.
    pub download: AtomicU64,
    /// Reads the copy path passed on, each way: with the bytes, the promotion policy
    /// tells request/response traffic from streams.
    upload_messages: AtomicU64,
    download_messages: AtomicU64,
    /// [`Transfer::reached`] wakes once upload + download reach this.
    watermark: AtomicU64,
    watermark_reached: Notify,
}

impl Default for Transfer {
    fn default() -> Self {
        Transfer {
            upload: AtomicU64::new(0),
            download: AtomicU64::new(0),
            upload_messages: AtomicU64::new(0),
            download_messages: AtomicU64::new(0),
            watermark: AtomicU64::new(u64::MAX),
            watermark_reached: Notify::new(),
        }
    }
}

impl Transfer {
    pub fn upload(&self) -> u64 {
        self.upload.load(Ordering::Relaxed)
    }

    pub fn download(&self) -> u64 {
        self.download.load(Ordering::Relaxed)
    }

    /// Messages (reads passed on) client -> backend and backend -> client.
    pub fn messages(&self) -> (u64, u64) {
        (
            self.upload_messages.load(Ordering::Relaxed),
            self.download_messages.load(Ordering::Relaxed),
        )
    }

    pub fn total(&self) -> u64 {
        self.upload() + self.download()
    }

    /// Adds the bytes of another stretch of the session (e.g. its kernel path).
    pub fn add(&self, other: &Transfer) {
        self.upload.fetch_add(other.upload(), Ordering::Relaxed);
        self.download.fetch_add(other.download(), Ordering::Relaxed);
    }

    /// Resolves once upload + download reach `bytes` (counted by the copy path).
    pub async fn reached(&self, bytes: u64) {
        self.watermark.store(bytes, Ordering::Relaxed);
        while self.total() < bytes {
            self.watermark_reached.notified().await;
        }
    }

    /// Counts one read of `n` bytes one way, as the copy path moves it.
    pub fn count(&self, upload: bool, n: u64) {
        let (counter, messages) = if upload {
            (&self.upload, &self.upload_messages)
        } else {
            (&self.download, &self.download_messages)
        };
        counter.fetch_add(n, Ordering::Relaxed);
        messages.fetch_add(1, Ordering::Relaxed);
        if self.total() >= self.watermark.load(Ordering::Relaxed) {
            // Once: the reads after it would each pay a notification nobody waits for.
            self.watermark.store(u64::MAX, Ordering::Relaxed);
            // A stored permit, if nobody waits yet: `reached` checks again.
            self.watermark_reached.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::timeout;

    const TICK: Duration = Duration::from_millis(10);

    #[tokio::test(start_paused = true)]
    async fn a_watermark_fires_once_and_the_next_waits_for_its_own_bytes() {
        let t = Transfer::default();
        let first = t.reached(100);
        tokio::pin!(first);
        assert!(timeout(TICK, first.as_mut()).await.is_err());
        t.count(true, 60);
        assert!(timeout(TICK, first.as_mut()).await.is_err());
        t.count(false, 60);
        assert_eq!(
            t.watermark.load(Ordering::Relaxed),
            u64::MAX,
            "passing the watermark clears it, so later reads do not notify"
        );
        timeout(TICK, first).await.expect("the first watermark");
        t.count(true, 1000);
        let next = t.reached(5000);
        tokio::pin!(next);
        assert!(timeout(TICK, next.as_mut()).await.is_err());
        t.count(false, 4000);
        timeout(TICK, next).await.expect("the next watermark");
    }
}
