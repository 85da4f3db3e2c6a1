//! When a TCP session on the copy path earns the kernel path: once it has moved
//! `splice_after_bytes` or lived `splice_after_time` (whichever first), unless at that
//! moment it is moving bytes as a bulk stream, which the copy path's splice(2) moves
//! faster than the kernel's redirect worker on these hosts, or, with
//! `splice_chatty = "copy"`, is busy with small requests and answers (README, Kernel
//! path). Such a session is measured again every second, and moves once it calms down.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::{ChattyPath, SpliceAfter};
use crate::metrics::{CopyReason, METRICS};

use crate::session::Transfer;

/// How long a due session's traffic is measured before it is moved.
const SAMPLE: Duration = Duration::from_millis(100);
/// A session moving more than this per [`SAMPLE`] in one direction (200 MB/s,
/// 1.6 Gbit/s) stays on the copy path for now: there it is spliced through a pipe, which
/// moved one stream at 13.5 Gbit/s against 7.8 through a buffer, and four at 13.9
/// against 10.5 in the kernel, in alternating runs on one 2-core host. Slower sessions
/// (a client at 1 Gbit/s) are cheaper for the daemon in the kernel.
const BULK_PER_SAMPLE: u64 = 20_000_000;
/// A session that passed at least this many messages each way in a [`SAMPLE`] (100
/// requests and answers a second) ...
const CHATTY_PER_SAMPLE: u64 = 10;
/// ... of less than this on average is request/response traffic, which
/// `splice_chatty = "copy"` keeps copied: the kernel hands each message to its redirect
/// worker on its own, which on some hosts relays them slower than the copy path (README).
/// A stream, even one of small segments, goes one way, so it moves.
const SMALL_MESSAGE: u64 = 4096;
/// How long a deferred session stays copied before it is measured again.
const RECHECK: Duration = Duration::from_secs(1);

/// What the policy found when it decided.
#[derive(Clone, Copy, Debug, Default)]
pub struct Decision {
    /// Why the last check kept the session copied (`Bulk` or `Chatty`), if one did.
    pub deferred: Option<CopyReason>,
}

/// Whether sessions go into the kernel before any byte is copied (there is no rate to
/// measure then).
pub fn at_once(after: SpliceAfter) -> bool {
    after.bytes == 0 || after.time.is_zero()
}

/// Resolves when the session should move into the kernel. `started` is when it began
/// forwarding; `decision` tells, even while this is still pending, whether it was
/// deferred and why.
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
        let before = Sample::take(transfer);
        tokio::time::sleep(SAMPLE).await;
        let sample = Sample::take(transfer).since(&before);
        let Some(reason) = sample.keeps_copied(after.chatty) else {
            return;
        };
        decision.deferred = Some(reason);
        METRICS.promotions_deferred.inc();
        tokio::time::sleep(RECHECK).await;
    }
}

/// A session's counts at one moment.
struct Sample {
    bytes: (u64, u64),
    messages: (u64, u64),
}

impl Sample {
    fn take(t: &Transfer) -> Sample {
        Sample {
            bytes: (t.upload(), t.download()),
            messages: t.messages(),
        }
    }

    fn since(&self, before: &Sample) -> Sample {
        let d = |a: (u64, u64), b: (u64, u64)| (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1));
        Sample {
            bytes: d(self.bytes, before.bytes),
            messages: d(self.messages, before.messages),
        }
    }

    /// For the traffic of one [`SAMPLE`]: why it should stay copied, if it should.
    fn keeps_copied(&self, chatty_path: ChattyPath) -> Option<CopyReason> {
        let (up, down) = self.bytes;
        let (up_msgs, down_msgs) = self.messages;
        if up.max(down) >= BULK_PER_SAMPLE {
            return Some(CopyReason::Bulk);
        }
        let msgs = up_msgs + down_msgs;
        let chatty = chatty_path == ChattyPath::Copy
            && up_msgs.min(down_msgs) >= CHATTY_PER_SAMPLE
            && (up + down) < SMALL_MESSAGE.saturating_mul(msgs);
        chatty.then_some(CopyReason::Chatty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(bytes: u64, ms: u64) -> SpliceAfter {
        SpliceAfter {
            bytes,
            time: Duration::from_millis(ms),
            ..SpliceAfter::default()
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
        assert_eq!(d.deferred, None);
    }

    #[tokio::test(start_paused = true)]
    async fn time_rule_then_one_sample() {
        let t = Transfer::default();
        let mut d = Decision::default();
        let start = Instant::now();
        due(after(1 << 20, 1000), &t, start, &mut d).await;
        assert_eq!(start.elapsed(), Duration::from_millis(1000) + SAMPLE);
        assert_eq!(d.deferred, None);
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
        assert_eq!(d.deferred, None);
    }

    /// Counts `per_tick` messages of `size` bytes each way (or only upload) every
    /// `tick_ms` for 3 s, then nothing.
    fn traffic(
        t: &std::sync::Arc<Transfer>,
        tick_ms: u64,
        per_tick: u64,
        size: u64,
        both_ways: bool,
    ) -> tokio::task::JoinHandle<()> {
        let t = std::sync::Arc::clone(t);
        tokio::spawn(async move {
            for _ in 0..3000 / tick_ms {
                for _ in 0..per_tick {
                    t.count(true, size);
                    if both_ways {
                        t.count(false, size);
                    }
                }
                tokio::time::sleep(Duration::from_millis(tick_ms)).await;
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn busy_sessions_wait_until_they_calm_down() {
        for (tick_ms, per_tick, size, both_ways, chatty, why) in [
            // 1 GB/s one way for 3 s.
            (
                10,
                1,
                10_000_000,
                false,
                ChattyPath::Kernel,
                CopyReason::Bulk,
            ),
            // 300 small requests and answers a second for 3 s, kept copied by request.
            (10, 3, 100, true, ChattyPath::Copy, CopyReason::Chatty),
        ] {
            let t = std::sync::Arc::new(Transfer::default());
            let busy = traffic(&t, tick_ms, per_tick, size, both_ways);
            let mut d = Decision::default();
            let start = Instant::now();
            let rules = SpliceAfter {
                chatty,
                ..after(1 << 20, 200)
            };
            due(rules, &t, start, &mut d).await;
            busy.await.unwrap();
            assert_eq!(d.deferred, Some(why));
            assert!(
                start.elapsed() >= Duration::from_secs(3),
                "{why:?}: promoted at {:?}, while still busy",
                start.elapsed()
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn exchanges_and_streams_of_small_segments_move() {
        // Whatever moves with `splice_chatty = "copy"` moves with the default too.
        for (tick_ms, per_tick, size, both_ways, chatty) in [
            // 300 small requests and answers a second: busy, and moved by default.
            (10, 3, 100, true, ChattyPath::default()),
            // 50 requests and answers a second: a pooled connection in use.
            (20, 1, 100, true, ChattyPath::Copy),
            // A stream of 1,448-byte segments one way, 2,000 a second.
            (10, 20, 1448, false, ChattyPath::Copy),
            // Both ways at 64 KiB per message, 200 MB/s in all: slow endpoints.
            (10, 8, 64 * 1024, true, ChattyPath::Copy),
        ] {
            let t = std::sync::Arc::new(Transfer::default());
            let traffic = traffic(&t, tick_ms, per_tick, size, both_ways);
            let mut d = Decision::default();
            let start = Instant::now();
            let rules = SpliceAfter {
                chatty,
                ..after(1 << 40, 200)
            };
            due(rules, &t, start, &mut d).await;
            assert_eq!(
                start.elapsed(),
                Duration::from_millis(200) + SAMPLE,
                "{per_tick} x {size} B per {tick_ms} ms"
            );
            assert_eq!(d.deferred, None);
            traffic.abort();
        }
    }
}
