//! Server health. Passive (here): nginx's `max_fails` / `fail_timeout`, from the
//! outcome of real connects. Active (`active`, `checker`, `probe`): checks of each
//! server on a timer. A server takes traffic only when both allow it.
//!
//! Passive health:
//! `max_fails` connect failures within `fail_timeout` make a server unavailable for
//! `fail_timeout`. Once that has passed, one connection tries it (as nginx's `checked`
//! time does): the server is unavailable again for `fail_timeout` from that pick,
//! so a server that still fails slowly (a connect timeout) stalls one client per
//! `fail_timeout`, not every client sent its way. A connection that succeeds clears
//! the history; one more failure takes it out again at once.

pub mod active;
mod checker;
mod probe;

pub use checker::HealthChecks;

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct PassiveHealth {
    inner: Mutex<FailWindow>,
}

#[derive(Debug, Default)]
struct FailWindow {
    fails: u32,
    window_start: Option<Instant>,
    unavailable_until: Option<Instant>,
}

/// A failure window carried across a binary upgrade.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SavedWindow {
    pub fails: u32,
    pub window_age_ms: Option<u64>,
    pub unavailable_for_ms: Option<u64>,
}

/// What a recorded failure did to the server.
#[derive(Debug, PartialEq, Eq)]
pub enum FailOutcome {
    Counted { fails: u32 },
    MarkedUnavailable { fails: u32 },
}

impl PassiveHealth {
    pub fn is_available(&self, now: Instant) -> bool {
        let w = self.lock();
        w.unavailable_until.is_none_or(|until| now >= until)
    }

    pub fn record_failure(
        &self,
        now: Instant,
        max_fails: u32,
        fail_timeout: Duration,
    ) -> FailOutcome {
        let mut w = self.lock();
        let window_expired = w
            .window_start
            .is_none_or(|start| now.duration_since(start) > fail_timeout);
        if w.fails < max_fails && window_expired {
            w.fails = 0;
            w.window_start = Some(now);
        }
        w.fails = w.fails.saturating_add(1);
        if max_fails > 0 && w.fails >= max_fails {
            w.unavailable_until = Some(now + fail_timeout);
            FailOutcome::MarkedUnavailable { fails: w.fails }
        } else {
            FailOutcome::Counted { fails: w.fails }
        }
    }

    /// The server was chosen for a connection: if it is on probation (taken out, and
    /// its `fail_timeout` passed), that connection is its one try for the next
    /// `fail_timeout`.
    pub fn picked(&self, now: Instant, fail_timeout: Duration) {
        let mut w = self.lock();
        if w.unavailable_until.is_some_and(|until| now >= until) {
            w.unavailable_until = Some(now + fail_timeout);
        }
    }

    /// A successful connect clears the failure history.
    pub fn record_success(&self) {
        let mut w = self.lock();
        if w.fails != 0 || w.unavailable_until.is_some() {
            *w = FailWindow::default();
        }
    }

    pub fn fails(&self) -> u32 {
        self.lock().fails
    }

    /// The failure window as times relative to `now`, for a binary upgrade.
    pub fn save(&self, now: Instant) -> SavedWindow {
        let w = self.lock();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        SavedWindow {
            fails: w.fails,
            window_age_ms: w.window_start.map(|t| ms(now.saturating_duration_since(t))),
            unavailable_for_ms: w
                .unavailable_until
                .map(|t| ms(t.saturating_duration_since(now))),
        }
    }

    pub fn restore(&self, saved: &SavedWindow, now: Instant) {
        let mut w = self.lock();
        w.fails = saved.fails;
        w.window_start = saved
            .window_age_ms
            .and_then(|ms| now.checked_sub(Duration::from_millis(ms)));
        w.unavailable_until = saved
            .unavailable_for_ms
            .and_then(|ms| now.checked_add(Duration::from_millis(ms)));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FailWindow> {
        // The window holds plain counters: a poisoned lock still has usable data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    /// The largest fail_timeout any parser accepts still makes a deadline.
    #[test]
    fn the_longest_fail_timeout_does_not_overflow() {
        let h = PassiveHealth::default();
        let longest = crate::config::units::seconds(u64::MAX / 1000).unwrap();
        let t0 = Instant::now();
        h.record_failure(t0, 1, longest);
        assert!(!h.is_available(t0 + T));
    }

    #[test]
    fn marks_unavailable_after_max_fails_within_window() {
        let h = PassiveHealth::default();
        let t0 = Instant::now();
        assert_eq!(
            h.record_failure(t0, 2, T),
            FailOutcome::Counted { fails: 1 }
        );
        assert!(h.is_available(t0));
        assert_eq!(
            h.record_failure(t0 + Duration::from_secs(1), 2, T),
            FailOutcome::MarkedUnavailable { fails: 2 }
        );
        assert!(!h.is_available(t0 + Duration::from_secs(5)));
        assert!(h.is_available(t0 + Duration::from_secs(12)));
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let h = PassiveHealth::default();
        let t0 = Instant::now();
        h.record_failure(t0, 2, T);
        let later = t0 + Duration::from_secs(11);
        assert_eq!(
            h.record_failure(later, 2, T),
            FailOutcome::Counted { fails: 1 }
        );
        assert!(h.is_available(later));
    }

    #[test]
    fn one_failure_after_recovery_marks_down_again_until_success() {
        let h = PassiveHealth::default();
        let t0 = Instant::now();
        h.record_failure(t0, 1, T);
        let after = t0 + Duration::from_secs(11);
        assert!(h.is_available(after));
        assert!(matches!(
            h.record_failure(after, 1, T),
            FailOutcome::MarkedUnavailable { .. }
        ));
        assert!(!h.is_available(after + Duration::from_secs(1)));
        h.record_success();
        assert!(h.is_available(after + Duration::from_secs(1)));
        assert_eq!(h.fails(), 0);
    }

    #[test]
    fn max_fails_zero_never_marks_unavailable() {
        let h = PassiveHealth::default();
        let t0 = Instant::now();
        for _ in 0..100 {
            h.record_failure(t0, 0, T);
        }
        assert!(h.is_available(t0));
    }
}
