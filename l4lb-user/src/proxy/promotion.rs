//! When a TCP session on the copy path earns the kernel path: once it has moved
//! `splice_after_bytes` or lived `splice_after_time` (whichever first). A session
//! moving bytes as a bulk stream at that moment, or (with `splice_chatty = "trial"`, the
//! default) one busy with small requests and answers, moves on trial: which path moves
//! such traffic faster depends on the host (README, Kernel path), so it stays in the
//! kernel only if it runs nearly as fast there as it ran copied. One that lost its
//! trial, or, with `splice_chatty = "copy"`, one busy with requests and answers, stays
//! copied, is measured again every second, and moves once it calms down.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::{ChattyPath, SpliceAfter};
use crate::metrics::{CopyReason, METRICS};

use crate::session::Transfer;
use crate::splice::{Traffic, Trial};

/// How long a due session's traffic is measured before it is moved.
const SAMPLE: Duration = Duration::from_millis(100);
/// A session moving more than this per [`SAMPLE`] in one direction (200 MB/s,
/// 1.6 Gbit/s) is a bulk stream, which the proxy may be what limits: it moves on trial.
/// On the copy path it is spliced through a pipe, which on one 2-core host moved four
/// streams at 13.9 Gbit/s against 10.5 in the kernel, and on another 15.5 against 16.5.
/// Slower sessions (a client at 1 Gbit/s) are limited by their ends, and cheaper for
/// the daemon in the kernel.
const BULK_PER_SAMPLE: u64 = 20_000_000;
/// A session that passed at least this many messages each way in a [`SAMPLE`] (100
/// requests and answers a second) ...
const CHATTY_PER_SAMPLE: u64 = 10;
/// ... of less than this on average is request/response traffic: the kernel hands each
/// message to its redirect worker on its own, which on some hosts relays them slower
/// than the copy path (README), so it moves on trial (or as `splice_chatty` says). A
/// stream, even one of small segments, goes one way, so it moves.
const SMALL_MESSAGE: u64 = 4096;
/// How long a deferred session stays copied before it is measured again.
const RECHECK: Duration = Duration::from_secs(1);

/// What the policy found when it decided.
#[derive(Clone, Copy, Debug, Default)]
pub struct Decision {
    /// Why the last check kept the session copied (`Bulk` or `Chatty`), if one did.
    pub deferred: Option<CopyReason>,
    /// Set when the session is due as a bulk stream or a busy exchange of requests and
    /// answers: it moves on this trial.
    pub trial: Option<Trial>,
    /// The session lost a trial as a bulk stream, and as requests and answers: as such
    /// it now stays copied.
    pub lost_bulk: bool,
    pub lost_chatty: bool,
}

impl Decision {
    /// Notes that the session left the kernel for `reason`; true if it lost a trial.
    pub fn lose(&mut self, reason: CopyReason) -> bool {
        match reason {
            CopyReason::Bulk => self.lost_bulk = true,
            CopyReason::Chatty => self.lost_chatty = true,
            _ => return false,
        }
        true
    }

    /// Whether the session lost a trial as `kind` (`Bulk` or `Chatty`) traffic.
    fn lost(&self, kind: CopyReason) -> bool {
        match kind {
            CopyReason::Bulk => self.lost_bulk,
            CopyReason::Chatty => self.lost_chatty,
            _ => false,
        }
    }
}

/// Whether sessions go into the kernel before any byte is copied (there is no rate to
/// measure then).
pub fn at_once(after: SpliceAfter) -> bool {
    after.bytes == 0 || after.time.is_zero()
}

/// Resolves when the session should move into the kernel. `started` is when it was
/// accepted (in the old process, for a session a binary upgrade handed over);
/// `decision` tells, even while this is still pending, whether it was deferred and why,
/// and once this resolves, whether it moves on trial.
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
        let (sample, _) = Sample::over(transfer, SAMPLE).await;
        let Some(kind) = sample.kind() else {
            return;
        };
        let on_trial = match (kind, after.chatty) {
            _ if decision.lost(kind) => false,
            (CopyReason::Chatty, ChattyPath::Kernel) => return,
            (CopyReason::Chatty, ChattyPath::Copy) => false,
            _ => true,
        };
        if on_trial {
            // Measured again: the first sample may have caught the stream's start.
            let (sample, took) = Sample::over(transfer, Trial::COPIED_WINDOW).await;
            decision.trial = Some(sample.trial(kind, took));
            return;
        }
        decision.deferred = Some(kind);
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

    /// The session's traffic over `window`, and how long that really took.
    async fn over(t: &Transfer, window: Duration) -> (Sample, Duration) {
        let before = Sample::take(t);
        let from = Instant::now();
        tokio::time::sleep(window).await;
        (Sample::take(t).since(&before), from.elapsed())
    }

    /// A trial of a `kind` (`Bulk` or `Chatty`) sample taken over `took`: a bulk
    /// stream is measured in its faster direction, requests and answers both ways.
    fn trial(&self, kind: CopyReason, took: Duration) -> Trial {
        let (up, down) = self.bytes;
        let (traffic, bytes) = if kind == CopyReason::Chatty {
            (Traffic::Chatty, up.saturating_add(down))
        } else {
            (Traffic::Bulk { upload: up >= down }, up.max(down))
        };
        Trial {
            traffic,
            copied_rate: Trial::rate(bytes, took),
            copied_messages: self.messages.0.saturating_add(self.messages.1),
        }
    }

    /// For the traffic of one [`SAMPLE`]: `Bulk` or `Chatty` if it is either.
    fn kind(&self) -> Option<CopyReason> {
        let (up, down) = self.bytes;
        let (up_msgs, down_msgs) = self.messages;
        if up.max(down) >= BULK_PER_SAMPLE {
            return Some(CopyReason::Bulk);
        }
        let msgs = up_msgs + down_msgs;
        let chatty = up_msgs.min(down_msgs) >= CHATTY_PER_SAMPLE
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
        for (tick_ms, per_tick, size, both_ways, chatty, lost, why) in [
            // 1 GB/s one way for 3 s, after a lost trial.
            (
                10,
                1,
                10_000_000,
                false,
                ChattyPath::Kernel,
                Some(CopyReason::Bulk),
                CopyReason::Bulk,
            ),
            // 300 small requests and answers a second for 3 s, kept copied by request.
            (10, 3, 100, true, ChattyPath::Copy, None, CopyReason::Chatty),
            // The same after a lost trial, by default.
            (
                10,
                3,
                100,
                true,
                ChattyPath::default(),
                Some(CopyReason::Chatty),
                CopyReason::Chatty,
            ),
        ] {
            let t = std::sync::Arc::new(Transfer::default());
            let busy = traffic(&t, tick_ms, per_tick, size, both_ways);
            let mut d = Decision::default();
            if let Some(reason) = lost {
                assert!(d.lose(reason));
            }
            let start = Instant::now();
            let rules = SpliceAfter {
                chatty,
                ..after(1 << 20, 200)
            };
            due(rules, &t, start, &mut d).await;
            busy.await.unwrap();
            assert_eq!(d.deferred, Some(why));
            assert_eq!(d.trial, None);
            assert!(
                start.elapsed() >= Duration::from_secs(3),
                "{why:?}: promoted at {:?}, while still busy",
                start.elapsed()
            );
        }
    }

    #[test]
    fn only_lost_trials_are_remembered() {
        let mut d = Decision::default();
        assert!(!d.lose(CopyReason::Watchdog));
        assert!(!d.lost(CopyReason::Bulk) && !d.lost(CopyReason::Chatty));
        assert!(d.lose(CopyReason::Chatty));
        assert!(d.lose(CopyReason::Bulk));
        assert!(d.lost(CopyReason::Bulk) && d.lost(CopyReason::Chatty));
    }

    /// Asserts that a session due after 200 ms moves on trial `want`, once measured
    /// over the copied window.
    async fn moves_on_trial(t: &Transfer, want: Trial) {
        let mut d = Decision::default();
        let start = Instant::now();
        due(after(1 << 40, 200), t, start, &mut d).await;
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(200) + SAMPLE + Trial::COPIED_WINDOW
        );
        assert_eq!(d.deferred, None);
        assert_eq!(d.trial, Some(want));
    }

    #[tokio::test(start_paused = true)]
    async fn a_bulk_stream_moves_on_trial_against_its_copied_rate() {
        for (upload, rate) in [(true, 1_000_000_000), (false, 500_000_000)] {
            let t = std::sync::Arc::new(Transfer::default());
            // 10 MB (or 5 MB) every 10 ms in one direction, and a trickle back.
            let t2 = std::sync::Arc::clone(&t);
            let busy = tokio::spawn(async move {
                for _ in 0..300 {
                    t2.count(upload, rate / 100);
                    t2.count(!upload, 100);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
            moves_on_trial(
                &t,
                Trial {
                    traffic: Traffic::Bulk { upload },
                    copied_rate: rate,
                    copied_messages: 100,
                },
            )
            .await;
            busy.abort();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn busy_requests_and_answers_move_on_trial_by_default() {
        let t = std::sync::Arc::new(Transfer::default());
        // 300 requests and answers of 100 bytes a second: 60 kB/s both ways together.
        let busy = traffic(&t, 10, 3, 100, true);
        moves_on_trial(
            &t,
            Trial {
                traffic: Traffic::Chatty,
                copied_rate: 60_000,
                copied_messages: 300,
            },
        )
        .await;
        busy.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn exchanges_and_streams_of_small_segments_move() {
        // Whatever moves with `splice_chatty = "copy"` moves with "kernel" too.
        for (tick_ms, per_tick, size, both_ways, chatty) in [
            // 300 small requests and answers a second: busy, and moved at once.
            (10, 3, 100, true, ChattyPath::Kernel),
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
