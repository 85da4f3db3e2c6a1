//! Process-wide counters: cheap relaxed atomics written by the data path, read by the
//! admin API and logs.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a TCP session was not (or no longer) spliced in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyReason {
    /// `splice = "off"` for this server block.
    SpliceOff,
    /// `proxy_upload_rate` / `proxy_download_rate` need userspace pacing.
    RateLimited,
    /// The eBPF programs could not be loaded at start.
    KernelUnavailable,
    /// The kernel refused the socket (e.g. no longer ESTABLISHED).
    InsertFailed,
    /// A spliced session stalled and was moved to userspace.
    Watchdog,
    /// A peer fell so far behind that the kernel would queue more than the lag cap for
    /// it (pausing did not hold, or the source could no longer pause); the userspace copy
    /// has TCP's own backpressure.
    Lagging,
    /// A paused source could not rejoin the kernel path (its write side was shut down
    /// meanwhile, or reading what it held made no progress).
    ClosedWhilePaused,
}

impl CopyReason {
    pub const ALL: [CopyReason; 7] = [
        CopyReason::SpliceOff,
        CopyReason::RateLimited,
        CopyReason::KernelUnavailable,
        CopyReason::InsertFailed,
        CopyReason::Watchdog,
        CopyReason::Lagging,
        CopyReason::ClosedWhilePaused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CopyReason::SpliceOff => "splice_off",
            CopyReason::RateLimited => "rate_limited",
            CopyReason::KernelUnavailable => "kernel_unavailable",
            CopyReason::InsertFailed => "insert_failed",
            CopyReason::Watchdog => "watchdog",
            CopyReason::Lagging => "lagging",
            CopyReason::ClosedWhilePaused => "closed_while_paused",
        }
    }
}

#[derive(Debug)]
pub struct Metrics {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub sessions_spliced: AtomicU64,
    pub sessions_copied: AtomicU64,
    pub bytes_spliced: AtomicU64,
    pub bytes_copied: AtomicU64,
    pub connect_failures: AtomicU64,
    pub no_server: AtomicU64,
    pub udp_sessions: AtomicU64,
    /// Sessions whose code panicked (a bug; each is logged with its addresses).
    pub session_panics: AtomicU64,
    /// Server sets a discovery source changed.
    pub discovery_updates: AtomicU64,
    /// Failed discovery fetches of any kind (the last good set stayed).
    pub discovery_errors: AtomicU64,
    /// Of those, answers whose data was unusable (bad JSON, key, address, base64).
    pub discovery_bad_data: AtomicU64,
    copy_reasons: [AtomicU64; CopyReason::ALL.len()],
}

impl Metrics {
    pub fn copied_because(&self, reason: CopyReason) {
        self.copy_reasons[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn copy_reason_count(&self, reason: CopyReason) -> u64 {
        self.copy_reasons[reason as usize].load(Ordering::Relaxed)
    }
}

pub static METRICS: Metrics = Metrics {
    accepted: AtomicU64::new(0),
    active: AtomicU64::new(0),
    sessions_spliced: AtomicU64::new(0),
    sessions_copied: AtomicU64::new(0),
    bytes_spliced: AtomicU64::new(0),
    bytes_copied: AtomicU64::new(0),
    connect_failures: AtomicU64::new(0),
    no_server: AtomicU64::new(0),
    udp_sessions: AtomicU64::new(0),
    session_panics: AtomicU64::new(0),
    discovery_updates: AtomicU64::new(0),
    discovery_errors: AtomicU64::new(0),
    discovery_bad_data: AtomicU64::new(0),
    copy_reasons: [const { AtomicU64::new(0) }; CopyReason::ALL.len()],
};

pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}
