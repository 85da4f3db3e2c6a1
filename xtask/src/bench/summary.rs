//! Medians with their spread over rounds, ratios to `direct` and to the best peer,
//! and the l4lb targets.

use super::contenders::Contender;
use super::workloads::Workload;
use super::Results;

/// One metric shown in the report tables.
pub struct Column {
    pub workload: Workload,
    pub metric: &'static str,
    pub title: &'static str,
    pub higher_is_better: bool,
}

const fn col(
    workload: Workload,
    metric: &'static str,
    title: &'static str,
    higher_is_better: bool,
) -> Column {
    Column {
        workload,
        metric,
        title,
        higher_is_better,
    }
}

pub const COLUMNS: &[Column] = &[
    col(Workload::Iperf3P1, "gbit_s", "iperf3 -P1 Gbit/s", true),
    col(Workload::Iperf3P4, "gbit_s", "iperf3 -P4 Gbit/s", true),
    col(
        Workload::RedisKeepalive,
        "rps",
        "redis keep-alive req/s",
        true,
    ),
    col(
        Workload::RedisKeepalive,
        "p50_ms",
        "keep-alive p50 ms",
        false,
    ),
    col(
        Workload::RedisKeepalive,
        "p99_ms",
        "keep-alive p99 ms",
        false,
    ),
    col(Workload::RedisNewconn, "rps", "redis new conn/s", true),
    col(Workload::Sysbench, "tps", "sysbench tps", true),
    col(Workload::Sysbench, "p95_ms", "sysbench p95 ms", false),
    col(
        Workload::Idle,
        "rss_per_conn_kib",
        "RSS KiB per idle conn",
        false,
    ),
    col(
        Workload::Idle,
        "kernel_slab_per_conn_kib",
        "kernel slab KiB per idle conn",
        false,
    ),
    col(
        Workload::Iperf3P4,
        "cpu_machine",
        "machine CPU-s/GB (-P4)",
        false,
    ),
    col(
        Workload::Iperf3P4,
        "cpu_proxy",
        "proxy CPU-s/GB (-P4)",
        false,
    ),
    col(
        Workload::SlowEndpoints,
        "cpu_machine",
        "machine CPU-s/GB (slow)",
        false,
    ),
    col(
        Workload::SlowEndpoints,
        "cpu_proxy",
        "proxy CPU-s/GB (slow)",
        false,
    ),
];

/// Median and range of one metric over the successful rounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stat {
    pub fn of(values: &[f64]) -> Option<Stat> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

pub fn stat(r: &Results, who: Contender, w: Workload, metric: &str) -> Option<Stat> {
    let values: Vec<f64> = r
        .samples
        .iter()
        .filter(|s| s.contender == who && s.workload == w && s.error.is_none())
        .filter_map(|s| s.measured.metrics.get(metric).copied())
        .collect();
    Stat::of(&values)
}

/// The best peer (nginx or haproxy variant) on a column and its median.
pub fn best_peer(r: &Results, c: &Column) -> Option<(Contender, f64)> {
    r.meta
        .contenders
        .iter()
        .filter(|p| p.is_peer())
        .filter_map(|&p| stat(r, p, c.workload, c.metric).map(|s| (p, s.median)))
        .reduce(|a, b| {
            let b_better = if c.higher_is_better {
                b.1 > a.1
            } else {
                b.1 < a.1
            };
            if b_better {
                b
            } else {
                a
            }
        })
}

pub fn ratio_to(r: &Results, who: Contender, c: &Column, base: Option<f64>) -> Option<f64> {
    let s = stat(r, who, c.workload, c.metric)?;
    let base = base.filter(|b| *b > 0.0)?;
    Some(s.median / base)
}

/// A goal for l4lb, from issues 5 and 10.
pub struct Target {
    pub name: &'static str,
    pub column: Column,
    pub goal: Goal,
}

pub enum Goal {
    /// Median / best peer's median at least this.
    MinPeerRatio(f64),
    /// Median / best peer's median at most this.
    MaxPeerRatio(f64),
    /// Median at most this absolute value, in this unit.
    MaxValue(f64, &'static str),
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "bulk throughput, iperf3 -P1 >= 1.3x best peer",
        column: col(Workload::Iperf3P1, "gbit_s", "", true),
        goal: Goal::MinPeerRatio(1.3),
    },
    Target {
        name: "bulk throughput, iperf3 -P4 >= 1.3x best peer",
        column: col(Workload::Iperf3P4, "gbit_s", "", true),
        goal: Goal::MinPeerRatio(1.3),
    },
    Target {
        name: "keep-alive req/s >= 1.3x best peer",
        column: col(Workload::RedisKeepalive, "rps", "", true),
        goal: Goal::MinPeerRatio(1.3),
    },
    Target {
        name: "keep-alive p99 <= best peer",
        column: col(Workload::RedisKeepalive, "p99_ms", "", false),
        goal: Goal::MaxPeerRatio(1.0),
    },
    Target {
        name: "machine CPU per GB (-P1) <= 0.8x best peer",
        column: col(Workload::Iperf3P1, "cpu_machine", "", false),
        goal: Goal::MaxPeerRatio(0.8),
    },
    Target {
        name: "machine CPU per GB (-P4) <= 0.8x best peer",
        column: col(Workload::Iperf3P4, "cpu_machine", "", false),
        goal: Goal::MaxPeerRatio(0.8),
    },
    Target {
        name: "RSS per idle connection <= 2 KiB",
        column: col(Workload::Idle, "rss_per_conn_kib", "", false),
        goal: Goal::MaxValue(2.0, " KiB"),
    },
    Target {
        name: "new connections/s >= best peer",
        column: col(Workload::RedisNewconn, "rps", "", true),
        goal: Goal::MinPeerRatio(1.0),
    },
    Target {
        name: "sysbench tps >= 1.2x best peer",
        column: col(Workload::Sysbench, "tps", "", true),
        goal: Goal::MinPeerRatio(1.2),
    },
    Target {
        name: "proxy CPU per GB, slow endpoints <= 0.05 CPU-s/GB",
        column: col(Workload::SlowEndpoints, "cpu_proxy", "", false),
        goal: Goal::MaxValue(0.05, " CPU-s/GB"),
    },
];

/// The verdict on one target for one contender, e.g. "missed: 0.81x (goal >= 1.30x, 38% short)".
pub fn judge(r: &Results, who: Contender, t: &Target) -> String {
    let Some(s) = stat(r, who, t.column.workload, t.column.metric) else {
        return "not measured".into();
    };
    let (value, goal, at_least, unit) = match t.goal {
        Goal::MaxValue(limit, unit) => (s.median, limit, false, unit),
        Goal::MinPeerRatio(g) | Goal::MaxPeerRatio(g) => {
            let Some((_, best)) = best_peer(r, &t.column) else {
                return "no peer measured".into();
            };
            if best <= 0.0 {
                return "best peer is 0".into();
            }
            (
                s.median / best,
                g,
                matches!(t.goal, Goal::MinPeerRatio(_)),
                "x",
            )
        }
    };
    let (met, margin) = if at_least {
        (value >= goal, (value / goal - 1.0).abs())
    } else {
        (value <= goal, (1.0 - value / goal).abs())
    };
    let (verdict, how) = match (met, at_least) {
        (true, _) => ("met", "margin"),
        (false, true) => ("missed", "short"),
        (false, false) => ("missed", "over"),
    };
    format!(
        "{verdict}: {value:.2}{unit} (goal {} {goal:.2}{unit}, {:.0}% {how})",
        if at_least { ">=" } else { "<=" },
        margin * 100.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_endpoints_target_is_absolute() {
        let t = TARGETS
            .iter()
            .find(|t| t.column.workload == Workload::SlowEndpoints)
            .expect("a slow-endpoints target");
        assert!(matches!(t.goal, Goal::MaxValue(g, _) if g == 0.05));
        assert_eq!(t.column.metric, "cpu_proxy");
    }

    #[test]
    fn median_and_spread() {
        let s = Stat::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Stat::of(&[4.0, 1.0]).unwrap().median, 2.5);
        assert_eq!(Stat::of(&[]), None);
    }
}
