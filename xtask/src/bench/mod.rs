//! `cargo xtask bench`: l4lb side by side with nginx stream, haproxy and a direct
//! connection, on 127.0.0.1, with every process started and stopped by the harness.
//! Results (Markdown, JSON, PNG) go to bench/results/.

mod backends;
mod chart;
mod contenders;
mod cpu;
mod machine;
mod others;
mod proc;
mod report;
mod summary;
mod workloads;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use serde::Serialize;

use crate::setup;
use backends::{start_iperf, Backends, Services};
use contenders::Contender;
use workloads::{Measured, Workload};

/// Debian packages the contenders and load generators come from. The *-core MariaDB
/// packages carry the server and client without a system service that would start.
const BENCH_PACKAGES: &[&str] = &[
    "nginx",
    "libnginx-mod-stream",
    "haproxy",
    "iperf3",
    "redis-server",
    "redis-tools",
    "mariadb-server-core",
    "mariadb-client-core",
    "sysbench",
    "fonts-dejavu-core",
];

/// Busy CPUs below which the machine counts as quiet, and how long to wait for that.
const QUIET_CPUS: f64 = 0.25;
/// Other processes' CPUs during a run above which it is repeated.
const NOISY_CPUS: f64 = 0.15;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// One round of about 2 s per workload (the smoke test's mode).
    #[arg(long)]
    quick: bool,
    /// Contenders, comma-separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    contenders: Vec<Contender>,
    /// Workloads, comma-separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    workloads: Vec<Workload>,
    /// Rounds; each round runs every contender once, each round in a rotated order
    /// (default 3, quick 1).
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds per workload (default 10, quick 2).
    #[arg(long)]
    seconds: Option<u64>,
    /// Idle connections opened for the RSS-per-connection measurement.
    #[arg(long, default_value_t = 5000)]
    idle_conns: usize,
    /// Output directory (default bench/results, or bench/results/quick with --quick).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One workload run of one contender in one round.
#[derive(Serialize)]
pub struct Sample {
    pub round: usize,
    pub contender: Contender,
    pub workload: Workload,
    #[serde(flatten)]
    pub measured: Measured,
    /// Busy CPUs on the machine just before the run (after waiting for quiet).
    pub busy_before: f64,
    /// Runs made: more than one when other processes disturbed the earlier ones.
    pub attempts: u32,
    pub error: Option<String>,
}

#[derive(Serialize)]
pub struct Results {
    pub meta: machine::Meta,
    /// What the l4lb contenders' sessions actually ran on (from a probe with the access
    /// log on): "kernel" or "copy:<reason>".
    pub l4lb_paths: BTreeMap<Contender, String>,
    /// haproxy-splice's probe: how much of a short transfer went through splice(2),
    /// or why the check failed.
    pub haproxy_splice: Option<String>,
    pub samples: Vec<Sample>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let started = Instant::now();
    setup::apt_install(BENCH_PACKAGES)?;
    let l4lb_bin = crate::build_daemon(&std::env::current_dir()?)?;
    let max_fds = cpu::raise_nofile()?;
    // Each idle session holds a client and an upstream descriptor, in the harness
    // (client and sink side) and in the balancer alike.
    if (args.idle_conns as u64) * 2 + 200 > max_fds {
        bail!(
            "{} idle connections need {} open files; the limit is {max_fds} (ulimit -Hn)",
            args.idle_conns,
            args.idle_conns * 2 + 200
        );
    }

    let contenders = or_all(args.contenders.clone(), Contender::value_variants());
    let workloads = or_all(args.workloads.clone(), Workload::value_variants());
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let duration = Duration::from_secs(args.seconds.unwrap_or(if args.quick { 2 } else { 10 }));
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from(if args.quick {
            "bench/results/quick"
        } else {
            "bench/results"
        })
    });

    let tmp = tempfile::Builder::new().prefix("l4lb-bench-").tempdir()?;
    eprintln!("bench: backends in {}", tmp.path().display());
    let backends = Backends::start(tmp.path())?;

    let mut l4lb_paths = BTreeMap::new();
    for &who in contenders.iter().filter(|c| c.is_l4lb()) {
        let path = probe_path(who, &backends, &l4lb_bin, tmp.path(), max_fds)
            .unwrap_or_else(|e| format!("unknown (probe failed: {})", one_line(&e)));
        eprintln!("bench: {} sessions run on: {path}", who.name());
        l4lb_paths.insert(who, path);
    }
    let haproxy_splice = contenders.contains(&Contender::HaproxySplice).then(|| {
        let checked = probe_haproxy_splice(&backends, tmp.path(), max_fds);
        let line = match &checked {
            Ok(line) => line.clone(),
            Err(e) => format!("NOT SPLICING: {e:#}"),
        };
        eprintln!("bench: haproxy-splice: {line}");
        line
    });

    let plan = Plan {
        workloads: &workloads,
        duration,
        idle_conns: args.idle_conns,
        l4lb_bin: &l4lb_bin,
        dir: tmp.path(),
        max_fds,
        // The quick mode checks the harness, not the numbers: it does not wait long.
        quiet_patience: Duration::from_secs(if args.quick { 10 } else { 120 }),
        max_attempts: if args.quick { 1 } else { 3 },
    };
    let mut samples = Vec::new();
    for round in 0..rounds {
        for who in round_order(&contenders, round, rounds) {
            eprintln!("bench: round {}/{rounds}: {}", round + 1, who.name());
            samples.extend(run_contender(&plan, &backends, who, round));
        }
    }
    drop(backends);

    let meta = machine::Meta::collect(
        if args.quick { "quick" } else { "full" },
        rounds,
        duration,
        args.idle_conns,
        &contenders,
        &workloads,
        started.elapsed(),
    );
    let results = Results {
        meta,
        l4lb_paths,
        haproxy_splice,
        samples,
    };
    let table = report::write_all(&results, &out)?;
    println!("{table}");
    eprintln!(
        "bench: results in {} ({:.0} s)",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    let failed: Vec<String> = results
        .samples
        .iter()
        .filter_map(|s| {
            s.error.as_ref().map(|e| {
                format!(
                    "{} {} round {}: {e}",
                    s.contender.name(),
                    s.workload.name(),
                    s.round + 1
                )
            })
        })
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} measurement(s) failed:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }
    Ok(())
}

/// An error with its causes on one line (log excerpts included), for report lines.
fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" / ")
}

/// The contenders in the order `round` runs them: the list rotated by an even share per
/// round, so that across rounds each contender runs at different places. The host's
/// speed drifts within a round and the contender run first did better in paired runs
/// (bench/README.md, Method): a fixed order would put that drift into the ratios.
fn round_order<T: Copy>(contenders: &[T], round: usize, rounds: usize) -> Vec<T> {
    let n = contenders.len();
    let shift = round * n / rounds.max(1);
    contenders
        .iter()
        .cycle()
        .skip(shift)
        .take(n)
        .copied()
        .collect()
}

fn or_all<T: Copy>(chosen: Vec<T>, all: &[T]) -> Vec<T> {
    if chosen.is_empty() {
        all.to_vec()
    } else {
        chosen
    }
}

struct Plan<'a> {
    workloads: &'a [Workload],
    duration: Duration,
    idle_conns: usize,
    l4lb_bin: &'a Path,
    dir: &'a Path,
    max_fds: u64,
    quiet_patience: Duration,
    max_attempts: u32,
}

fn probe_path(
    who: Contender,
    backends: &Backends,
    l4lb_bin: &Path,
    dir: &Path,
    max_fds: u64,
) -> Result<String> {
    let (_iperf, iperf_port) = start_iperf(dir)?;
    let services = services(backends, iperf_port);
    contenders::probe_l4lb_path(who, &services, l4lb_bin, dir, max_fds)
}

fn probe_haproxy_splice(backends: &Backends, dir: &Path, max_fds: u64) -> Result<String> {
    let (_iperf, iperf_port) = start_iperf(dir)?;
    contenders::probe_haproxy_splice(&services(backends, iperf_port), dir, max_fds)
}

fn services(backends: &Backends, iperf: u16) -> Services {
    Services {
        iperf,
        redis: backends.redis_port,
        mysql: backends.mysql_port,
        sink: backends.sink.port,
    }
}

/// Every workload of one contender: a fresh iperf3 server and balancer, stopped after.
fn run_contender(plan: &Plan, backends: &Backends, who: Contender, round: usize) -> Vec<Sample> {
    // Direct has no balancer whose memory the idle workload could measure.
    let workloads: Vec<Workload> = plan
        .workloads
        .iter()
        .copied()
        .filter(|&w| !(w == Workload::Idle && who == Contender::Direct))
        .collect();
    let sample = |workload, m: Measurement| match m.result {
        Ok(measured) => Sample {
            round,
            contender: who,
            workload,
            measured,
            busy_before: m.busy_before,
            attempts: m.attempts,
            error: None,
        },
        Err(e) => {
            eprintln!("bench: {} {} failed: {e:#}", who.name(), workload.name());
            Sample {
                round,
                contender: who,
                workload,
                measured: Measured::default(),
                busy_before: m.busy_before,
                attempts: m.attempts,
                error: Some(format!("{e:#}")),
            }
        }
    };
    let dir = plan.dir.join(format!("r{round}-{}", who.name()));
    let started = std::fs::create_dir_all(&dir)
        .context("create the contender's directory")
        .and_then(|()| start_iperf(&dir))
        .and_then(|(iperf, port)| {
            let running = contenders::start(
                who,
                &services(backends, port),
                plan.l4lb_bin,
                &dir,
                contenders::Options {
                    access_log: false,
                    max_fds: plan.max_fds,
                },
            )?;
            Ok((iperf, running))
        });
    let (iperf, mut running) = match started {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("{e:#}");
            return workloads
                .into_iter()
                .map(|w| {
                    let result = Err(anyhow::anyhow!("start failed: {msg}"));
                    sample(
                        w,
                        Measurement {
                            busy_before: f64::NAN,
                            attempts: 0,
                            result,
                        },
                    )
                })
                .collect();
        }
    };
    let ctx = workloads::Ctx {
        fronts: running.fronts,
        dir: &dir,
        duration: plan.duration,
        proxy_pids: running.pids(),
        iperf_pid: iperf.pid(),
        redis_pid: backends.redis_pid(),
        mysql_pid: backends.mysql_pid(),
        sink: &backends.sink,
        idle_conns: plan.idle_conns,
    };
    workloads
        .into_iter()
        .map(|w| sample(w, measure(plan, who, w, &ctx, &mut running)))
        .collect()
}

/// haproxy's share of the received bytes that it moved with splice(2), recorded for
/// both haproxy variants; haproxy-splice fails the run under 90% (it spliced 100% of
/// every bulk run here): a direction left unspliced would be plain haproxy under
/// another name.
fn check_spliced(
    who: Contender,
    m: &mut Measured,
    before: Option<u64>,
    after: Option<u64>,
) -> Result<()> {
    let (Some(before), Some(after)) = (before, after) else {
        return Ok(());
    };
    let received = m.metrics.get("gbytes").copied().unwrap_or(0.0) * 1e9;
    if received <= 0.0 {
        return Ok(());
    }
    let share = after.saturating_sub(before) as f64 / received;
    m.metrics.insert("spliced_share".into(), share);
    if who == Contender::HaproxySplice && share < 0.9 {
        bail!(
            "haproxy-splice did not splice: {:.0}% of the {:.2} GB received went through \
             splice(2) (TotalSplicdedBytesOut {before} -> {after})",
            share * 100.0,
            received / 1e9
        );
    }
    Ok(())
}

struct Measurement {
    busy_before: f64,
    attempts: u32,
    result: Result<Measured>,
}

/// Runs one workload once the machine is quiet, and again (`max_attempts` runs in all)
/// when other processes took more than `NOISY_CPUS` during the run.
fn measure(
    plan: &Plan,
    who: Contender,
    w: Workload,
    ctx: &workloads::Ctx,
    running: &mut contenders::Running,
) -> Measurement {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let busy_before = cpu::wait_quiet(QUIET_CPUS, plan.quiet_patience).unwrap_or(f64::NAN);
        if busy_before > QUIET_CPUS {
            eprintln!(
                "bench:   machine still busy ({busy_before:.2} CPUs) after {:?}; measuring anyway",
                plan.quiet_patience
            );
        }
        let spliced_before = running.spliced_bytes();
        let result = workloads::run(w, ctx).and_then(|mut m| {
            // A balancer that crashed under load must not pass as a fast one.
            running.check_alive()?;
            if workloads::is_bulk(w) {
                check_spliced(who, &mut m, spliced_before?, running.spliced_bytes()?)?;
            }
            Ok(m)
        });
        if let Ok(m) = &result {
            eprintln!("bench:   {} {}", w.name(), report::brief(m));
        }
        let others = result
            .as_ref()
            .ok()
            .and_then(|m| m.cpu)
            .map(|c| c.others_s / c.wall_s.max(1e-3))
            .filter(|&o| o > NOISY_CPUS);
        match others {
            Some(o) if attempts < plan.max_attempts => {
                eprintln!("bench:   other processes used {o:.2} CPUs during the run; repeating it");
            }
            _ => {
                return Measurement {
                    busy_before,
                    attempts,
                    result,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::round_order;

    #[test]
    fn each_round_runs_everyone_once_and_nobody_keeps_a_place() {
        let all: Vec<usize> = (0..7).collect();
        let orders: Vec<Vec<usize>> = (0..3).map(|r| round_order(&all, r, 3)).collect();
        assert_eq!(orders[0], all);
        for order in &orders {
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, all);
        }
        for who in &all {
            let mut places: Vec<usize> = orders
                .iter()
                .map(|o| o.iter().position(|c| c == who).unwrap())
                .collect();
            places.sort_unstable();
            places.dedup();
            assert_eq!(places.len(), 3, "contender {who} ran at {places:?}");
        }
        assert_eq!(round_order(&[1, 2], 0, 1), vec![1, 2]);
        assert!(round_order::<u8>(&[], 2, 3).is_empty());
    }
}
