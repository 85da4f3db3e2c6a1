//! When a TCP session on the copy path earns the kernel path: once it has moved
//! `splice_after_bytes` or lived `splice_after_time` (whichever first), unless it is
//! moving bytes as a bulk stream at that moment, which the copy path's splice(2) moves
//! faster than the kernel's redirect worker on these hosts (README, Kernel path).

use std::time::Duration;

use tokio::time::Instant;

use crate::config::SpliceAfter;
use crate::metrics::METRICS;

use crate::session::Transfer;

/// How long a due session's rate is measured before it is moved.
const SAMPLE: Duration = Duration::from_millis(100);
/// A session moving more than this per [`SAMPLE`] in one direction (200 MB/s,
/// 1.6 Gbit/s) stays on the copy path for now: there it is spliced through a pipe, which
/// moved one stream at 13.5 Gbit/s against 7.8 through a buffer, and four at 13.9
/// against 10.5 in the kernel, in alternating runs on one 2-core host. Slower sessions
/// (a client at 1 Gbit/s) are cheaper for the daemon in the kernel.
const BULK_PER_SAMPLE: u64 = 20_000_000;
/// How long a bulk session stays copied before it is measured again.
const RECHECK: Duration = Duration::from_secs(1);

/// What the policy found when it decided.
#[derive(Clone, Copy, Debug, Default)]
pub struct Decision {
    /// At least one check found the session moving as a bulk stream.
    pub deferred: bool,
}

/// Whether sessions go into the kernel before any byte is copied (there is no rate to
/// measure then).
pub fn at_once(after: SpliceAfter) -> bool {
    after.bytes == 0 || after.time.is_zero()
}

/// Resolves when the session should move into the kernel. `started` is when it began
/// forwarding; `decision` tells, even while this is still pending, whether it was
/// deferred as a bulk stream.
pub async fn due(
    after: SpliceAfter,
    transfer: &Transfer,
    started: Instant,
    decision: &mut Decision,
) {
    if at_once(after) {
        return;
    }
    tokio::select! {
        () = transfer.reached(after.bytes) => {}
        () = tokio::time::sleep_until(started + after.time) => {}
    }
    loop {
        let (up, down) = (transfer.upload(), transfer.download());
        tokio::time::sleep(SAMPLE).await;
        let fastest =
            (transfer.upload().saturating_sub(up)).max(transfer.download().saturating_sub(down));
        if fastest < BULK_PER_SAMPLE {
            return;
        }
        decision.deferred = true;
        METRICS.promotions_deferred.inc();
        tokio::time::sleep(RECHECK).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(bytes: u64, ms: u64) -> SpliceAfter {
        SpliceAfter {
            bytes,
            time: Duration::from_millis(ms),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn zero_means_at_once() {
        let t = Transfer::default();
        let mut d = Decision::default();
        let start = Instant::now();
        due(after(0, 1000), &t, Instant::now(), &mut d).await;
        due(after(1 << 20, 0), &t, Instant::now(), &mut d).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(!d.deferred);
    }

    #[tokio::test(start_paused = true)]
    async fn time_rule_then_one_sample() {
        let t = Transfer::default();
        let mut d = Decision::default();
        let start = Instant::now();
        due(after(1 << 20, 1000), &t, start, &mut d).await;
        assert_eq!(start.elapsed(), Duration::from_millis(1000) + SAMPLE);
        assert!(!d.deferred);
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_rule_comes_first() {
        let t = Transfer::default();
        let mut d = Decision::default();
        let start = Instant::now();
        {
            let fut = due(after(1000, 60_000), &t, start, &mut d);
            tokio::pin!(fut);
            assert!(
                tokio::time::timeout(Duration::from_millis(50), fut.as_mut())
                    .await
                    .is_err()
            );
            t.count(true, 600);
            t.count(false, 600);
            tokio::time::timeout(SAMPLE + Duration::from_millis(1), fut)
                .await
                .expect("due one sample after the bytes rule");
        }
        assert!(!d.deferred);
    }

    #[tokio::test(start_paused = true)]
    async fn a_bulk_stream_waits_until_it_slows_down() {
        let t = std::sync::Arc::new(Transfer::default());
        let bulk = {
            let t = std::sync::Arc::clone(&t);
            tokio::spawn(async move {
                // 1 GB/s for 3 s, then nothing.
                for _ in 0..300 {
                    t.count(true, 10_000_000);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        let mut d = Decision::default();
        let start = Instant::now();
        due(after(1000, 60_000), &t, start, &mut d).await;
        bulk.await.unwrap();
        assert!(d.deferred);
        assert!(
            start.elapsed() >= Duration::from_secs(3),
            "promoted at {:?}, while still bulk",
            start.elapsed()
        );
    }
}
