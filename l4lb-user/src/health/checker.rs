//! Runs active checks: one task per upstream with `health_check`, which follows the
//! upstream's server set and keeps one check loop per server. Results go into each
//! server's live state (kept by address across snapshots), which selection reads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::active::{Outcome, Status, Transition};
use super::probe;
use crate::config::HealthCheckConfig;
use crate::metrics::CheckSeries;
use crate::upstream::{PeerState, Upstream, Upstreams};

struct Task {
    cfg: HealthCheckConfig,
    upstream: Arc<Upstream>,
    stop: CancellationToken,
}

/// The running check tasks by upstream name.
#[derive(Default)]
pub struct HealthChecks {
    tasks: HashMap<String, Task>,
}

impl HealthChecks {
    /// Starts, restarts (changed settings) or stops tasks to match the upstreams'
    /// configuration. Servers keep their state across a restart; an upstream whose
    /// checks were removed has its servers' check state cleared.
    pub fn reconcile(&mut self, upstreams: &Upstreams) {
        let all = upstreams.all();
        self.tasks.retain(|name, task| {
            let keep = all.get(name).is_some_and(|up| {
                Arc::ptr_eq(up, &task.upstream)
                    && up.config().health_check.as_ref() == Some(&task.cfg)
            });
            if !keep {
                task.stop.cancel();
                // Checks end here for good (not restarted with new settings): their
                // series leave /metrics, as a removed server's do.
                let still_checked = all
                    .get(name)
                    .is_some_and(|up| up.config().health_check.is_some());
                if !still_checked {
                    for peer in &task.upstream.snapshot().peers {
                        CheckSeries::forget(name, &peer.spec.addr.to_string());
                    }
                }
            }
            keep
        });
        for (name, up) in all.iter() {
            let cfg = up.config().health_check.clone();
            match cfg {
                Some(cfg) if !self.tasks.contains_key(name) => {
                    let stop = CancellationToken::new();
                    tokio::spawn(follow(Arc::clone(up), cfg.clone(), stop.clone()));
                    info!(upstream = %name, kind = cfg.kind.name(), interval = ?cfg.interval, "health checks started");
                    self.tasks.insert(
                        name.clone(),
                        Task {
                            cfg,
                            upstream: Arc::clone(up),
                            stop,
                        },
                    );
                }
                Some(_) => {}
                None => {
                    // Checks may have been on before this reload.
                    for peer in &up.snapshot().peers {
                        if peer.state.checks.status() != Status::Unchecked {
                            peer.state.checks.clear();
                        }
                    }
                }
            }
        }
    }

    pub fn stop_all(&mut self) {
        for task in self.tasks.values() {
            task.stop.cancel();
        }
        self.tasks.clear();
    }
}

/// Keeps one check loop per server of `up` until `stop`.
async fn follow(up: Arc<Upstream>, cfg: HealthCheckConfig, stop: CancellationToken) {
    let cfg = Arc::new(cfg);
    let mut changes = up.changes();
    let mut loops: HashMap<SocketAddr, CancellationToken> = HashMap::new();
    loop {
        changes.borrow_and_update();
        let snap = up.snapshot();
        loops.retain(|addr, token| {
            let present = snap.peers.iter().any(|p| p.spec.addr == *addr);
            if !present {
                token.cancel();
                CheckSeries::forget(&up.name, &addr.to_string());
            }
            present
        });
        for peer in &snap.peers {
            if loops.contains_key(&peer.spec.addr) {
                continue;
            }
            let token = stop.child_token();
            // Made here, not in the loop: a loop cancelled before it first ran must not
            // make again the series forgotten above.
            let series = CheckSeries::new(&up.name, &peer.spec.addr.to_string());
            tokio::spawn(check_loop(
                up.name.clone(),
                peer.spec.addr,
                Arc::clone(&peer.state),
                Arc::clone(&cfg),
                series,
                token.clone(),
            ));
            loops.insert(peer.spec.addr, token);
        }
        drop(snap);
        tokio::select! {
            () = stop.cancelled() => {
                // A reload that restarts or ends these checks may also have removed
                // servers this task never saw go: their series go now.
                let snap = up.snapshot();
                for addr in loops.keys() {
                    if !snap.peers.iter().any(|p| p.spec.addr == *addr) {
                        CheckSeries::forget(&up.name, &addr.to_string());
                    }
                }
                return;
            }
            r = changes.changed() => if r.is_err() { return },
        }
    }
}

/// Checks one server every `interval`. A pending server (added while checks run) is
/// checked at once, since it gets no traffic until it passes; the others start at a
/// random point of the interval, so an upstream's checks are spread in time.
async fn check_loop(
    upstream: String,
    addr: SocketAddr,
    state: Arc<PeerState>,
    cfg: Arc<HealthCheckConfig>,
    series: CheckSeries,
    stop: CancellationToken,
) {
    let first = if state.checks.status() == Status::Pending {
        Duration::ZERO
    } else {
        cfg.interval.mul_f64(fastrand::f64())
    };
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + first, cfg.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let started = Instant::now();
        let checked = tokio::select! {
            () = stop.cancelled() => return,
            o = probe::check(&cfg.kind, addr, cfg.timeout) => o,
        };
        let outcome = match checked {
            Ok(outcome) => outcome,
            Err(why) => {
                warn!(%upstream, server = %addr, reason = %why, "health check not made: this host is out of descriptors or memory; the server's state stands");
                continue;
            }
        };
        let latency = started.elapsed();
        series.seconds.observe(latency.as_secs_f64());
        match outcome {
            Outcome::Pass => series.passed.inc(),
            Outcome::Fail(_) => series.failed.inc(),
        };
        match state
            .checks
            .record(&outcome, latency, cfg.fails, cfg.passes)
        {
            Some(Transition::WentDown) => {
                let reason = match &outcome {
                    Outcome::Fail(why) => why.as_str(),
                    Outcome::Pass => "",
                };
                warn!(%upstream, server = %addr, kind = cfg.kind.name(), reason, "server marked down by health check");
            }
            Some(Transition::CameUp) => {
                info!(%upstream, server = %addr, kind = cfg.kind.name(), "server up by health check");
            }
            None => {}
        }
    }
}
