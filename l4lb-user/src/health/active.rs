//! A server's active health state: what the checks found, turned into availability.
//!
//! The status is one atomic, read by every selection; the details (last result, counts)
//! sit behind a lock that only the checker and the admin views take.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// Where a server stands with active checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Status {
    /// No check has decided yet (or checks are off): the server may be used.
    Unchecked = 0,
    /// Appeared while checks run: no traffic until a check passes.
    Pending = 1,
    Up = 2,
    Down = 3,
}

impl Status {
    fn from_u8(v: u8) -> Status {
        match v {
            1 => Status::Pending,
            2 => Status::Up,
            3 => Status::Down,
            _ => Status::Unchecked,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Unchecked => "unchecked",
            Status::Pending => "pending",
            Status::Up => "up",
            Status::Down => "down",
        }
    }
}

/// The result of one check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail(String),
}

/// What the last check found, for `upstream_show`, the JSON API and metrics.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LastCheck {
    pub ok: bool,
    /// "ok", or why the check failed.
    pub reason: String,
    pub latency_ms: f64,
    pub at_unix: u64,
}

#[derive(Debug, Default)]
struct Detail {
    consecutive_fails: u32,
    consecutive_passes: u32,
    checks: u64,
    last: Option<LastCheck>,
}

/// A status change worth logging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    WentDown,
    CameUp,
}

#[derive(Debug, Default)]
pub struct ActiveHealth {
    status: AtomicU8,
    detail: Mutex<Detail>,
}

/// A copy of the state for the views and for a binary upgrade.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub status: Status,
    pub consecutive_fails: u32,
    pub consecutive_passes: u32,
    pub checks: u64,
    pub last: Option<LastCheck>,
}

impl ActiveHealth {
    /// A server added while checks run, which must pass one before it gets traffic.
    pub fn pending() -> Self {
        ActiveHealth {
            status: AtomicU8::new(Status::Pending as u8),
            detail: Mutex::default(),
        }
    }

    pub fn status(&self) -> Status {
        Status::from_u8(self.status.load(Ordering::Relaxed))
    }

    /// Whether checks allow traffic to the server (passive health decides separately).
    pub fn allows(&self) -> bool {
        matches!(self.status(), Status::Unchecked | Status::Up)
    }

    /// Checks were turned off for the server's upstream: forget what they found.
    /// Starts over: pending a first check if `checked`, else unchecked.
    pub fn restart(&self, checked: bool) {
        if checked {
            *self.lock() = Detail::default();
            self.status.store(Status::Pending as u8, Ordering::Relaxed);
        } else {
            self.clear();
        }
    }

    pub fn clear(&self) {
        let mut d = self.lock();
        *d = Detail::default();
        self.status
            .store(Status::Unchecked as u8, Ordering::Relaxed);
    }

    /// Records one check: `fails` consecutive failures take the server down, `passes`
    /// consecutive successes bring a down server back; a pending server comes up at its
    /// first success.
    pub fn record(
        &self,
        outcome: &Outcome,
        latency: Duration,
        fails: u32,
        passes: u32,
    ) -> Option<Transition> {
        let mut d = self.lock();
        d.checks += 1;
        d.last = Some(LastCheck {
            ok: *outcome == Outcome::Pass,
            reason: match outcome {
                Outcome::Pass => "ok".to_string(),
                Outcome::Fail(why) => why.clone(),
            },
            latency_ms: latency.as_secs_f64() * 1000.0,
            at_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |t| t.as_secs()),
        });
        let before = self.status();
        let after = match outcome {
            Outcome::Pass => {
                d.consecutive_fails = 0;
                d.consecutive_passes = d.consecutive_passes.saturating_add(1);
                match before {
                    Status::Down if d.consecutive_passes < passes => Status::Down,
                    _ => Status::Up,
                }
            }
            Outcome::Fail(_) => {
                d.consecutive_passes = 0;
                d.consecutive_fails = d.consecutive_fails.saturating_add(1);
                if d.consecutive_fails >= fails {
                    Status::Down
                } else {
                    before
                }
            }
        };
        self.status.store(after as u8, Ordering::Relaxed);
        match (before, after) {
            (Status::Down, Status::Up) | (Status::Pending, Status::Up) => Some(Transition::CameUp),
            (Status::Unchecked | Status::Up | Status::Pending, Status::Down) => {
                Some(Transition::WentDown)
            }
            _ => None,
        }
    }

    pub fn report(&self) -> Report {
        let d = self.lock();
        Report {
            status: self.status(),
            consecutive_fails: d.consecutive_fails,
            consecutive_passes: d.consecutive_passes,
            checks: d.checks,
            last: d.last.clone(),
        }
    }

    /// Takes over what another process's checks found (binary upgrade).
    pub fn restore(&self, saved: &Report) {
        let mut d = self.lock();
        d.consecutive_fails = saved.consecutive_fails;
        d.consecutive_passes = saved.consecutive_passes;
        d.checks = saved.checks;
        d.last = saved.last.clone();
        self.status.store(saved.status as u8, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Detail> {
        // Plain counters and strings: a poisoned lock still holds usable data.
        self.detail.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn fail() -> Outcome {
        Outcome::Fail("timed out".into())
    }

    #[test]
    fn down_after_fails_and_back_after_passes() {
        let h = ActiveHealth::default();
        assert!(h.allows());
        assert_eq!(h.record(&fail(), MS, 2, 2), None);
        assert!(h.allows(), "one failure of two");
        assert_eq!(h.record(&fail(), MS, 2, 2), Some(Transition::WentDown));
        assert!(!h.allows());
        assert_eq!(h.record(&Outcome::Pass, MS, 2, 2), None);
        assert!(!h.allows(), "one pass of two");
        assert_eq!(h.record(&fail(), MS, 2, 2), None);
        assert_eq!(h.record(&Outcome::Pass, MS, 2, 2), None);
        assert_eq!(h.record(&Outcome::Pass, MS, 2, 2), Some(Transition::CameUp));
        assert!(h.allows());
        let r = h.report();
        assert_eq!(
            (r.status, r.checks, r.consecutive_passes),
            (Status::Up, 6, 2)
        );
        assert_eq!(r.last.map(|l| l.reason), Some("ok".to_string()));
    }

    #[test]
    fn pending_needs_one_pass_and_clear_forgets() {
        let h = ActiveHealth::pending();
        assert!(!h.allows());
        assert_eq!(h.record(&Outcome::Pass, MS, 3, 3), Some(Transition::CameUp));
        assert!(h.allows());
        h.record(&fail(), MS, 1, 3);
        assert_eq!(h.status(), Status::Down);
        h.clear();
        assert_eq!(h.status(), Status::Unchecked);
        assert!(h.allows());
        assert_eq!(h.report().checks, 0);
    }
}
