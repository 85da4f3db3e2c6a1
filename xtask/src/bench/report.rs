//! The report: a Markdown file (results, ratios, CPU, targets, method), the raw JSON
//! and a PNG chart, all in the output directory.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use super::chart;
use super::contenders::Contender;
use super::summary::{self, best_peer, ratio_to, stat, Stat, COLUMNS, TARGETS};
use super::workloads::{Measured, Workload};
use super::Results;

pub const MARKDOWN: &str = "results.md";
pub const JSON: &str = "results.json";
pub const PNG: &str = "throughput.png";

/// Writes the three files; returns the main Markdown table for the terminal.
pub fn write_all(r: &Results, out: &Path) -> Result<String> {
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let json = serde_json::to_string_pretty(r)?;
    std::fs::write(out.join(JSON), json)?;
    let md = markdown(r);
    std::fs::write(out.join(MARKDOWN), &md)?;
    chart::draw(r, &out.join(PNG)).context("drawing the PNG chart")?;
    Ok(results_table(r))
}

/// A number with as many decimals as its size deserves.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn cell(s: Option<Stat>) -> String {
    match s {
        None => "n/a".into(),
        Some(s) if s.n == 1 || s.min == s.max => num(s.median),
        Some(s) => format!("{} ({}–{})", num(s.median), num(s.min), num(s.max)),
    }
}

fn table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut s = format!("| {} |\n", header.join(" | "));
    let _ = writeln!(s, "|{}", "---|".repeat(header.len()));
    for row in rows {
        let _ = writeln!(s, "| {} |", row.join(" | "));
    }
    s
}

/// The columns of the workloads that ran.
fn columns(r: &Results) -> impl Iterator<Item = &'static summary::Column> + '_ {
    COLUMNS
        .iter()
        .filter(|c| r.meta.workloads.contains(&c.workload))
}

fn header(r: &Results, first: &str) -> Vec<String> {
    std::iter::once(first.to_string())
        .chain(columns(r).map(|c| c.title.to_string()))
        .collect()
}

fn label(r: &Results, who: Contender) -> String {
    match r.l4lb_paths.get(&who) {
        Some(paths) => format!("{} [{}]", who.name(), short_paths(paths)),
        None => who.name().to_string(),
    }
}

/// "kernel 2/3, copy:insert_failed 1/3 (daemon: ...)" -> "kernel 2/3+copy:insert_failed 1/3".
fn short_paths(paths: &str) -> String {
    let paths = paths.split(" (").next().unwrap_or(paths);
    paths.split(", ").collect::<Vec<_>>().join("+")
}

/// Medians (min–max) per contender: the table printed at the end and put in the README.
pub fn results_table(r: &Results) -> String {
    contender_table(r, |who, c| cell(stat(r, who, c.workload, c.metric)))
}

fn ratio_table(r: &Results, base: impl Fn(&summary::Column) -> Option<f64>) -> String {
    contender_table(r, |who, c| {
        ratio_to(r, who, c, base(c)).map_or_else(|| "n/a".into(), |x| format!("{x:.2}"))
    })
}

/// One row per contender: its label, then `value` for each column.
fn contender_table(r: &Results, value: impl Fn(Contender, &summary::Column) -> String) -> String {
    let rows: Vec<Vec<String>> = r
        .meta
        .contenders
        .iter()
        .map(|&who| {
            std::iter::once(label(r, who))
                .chain(columns(r).map(|c| value(who, c)))
                .collect()
        })
        .collect();
    table(&header(r, "contender"), &rows)
}

fn cpu_table(r: &Results) -> String {
    let header: Vec<String> = [
        "workload",
        "contender",
        "machine CPU-s",
        "proxy CPU-s",
        "net CPU-s (machine − load generator − backend)",
    ]
    .map(String::from)
    .to_vec();
    let mut rows = Vec::new();
    for &w in &r.meta.workloads {
        let Some(unit) = w.cpu_unit() else { continue };
        for &who in &r.meta.contenders {
            let st = |m: &str| cell(stat(r, who, w, m));
            rows.push(vec![
                format!("{} (per {unit})", w.name()),
                who.name().to_string(),
                st("cpu_machine"),
                st("cpu_proxy"),
                st("cpu_net"),
            ]);
        }
    }
    table(&header, &rows)
}

fn targets_table(r: &Results) -> String {
    let l4lbs: Vec<Contender> = r
        .meta
        .contenders
        .iter()
        .copied()
        .filter(|c| c.is_l4lb())
        .collect();
    let header: Vec<String> = ["target", "best peer"]
        .into_iter()
        .map(String::from)
        .chain(l4lbs.iter().map(|&c| label(r, c)))
        .collect();
    let rows: Vec<Vec<String>> = TARGETS
        .iter()
        .map(|t| {
            let best = best_peer(r, &t.column)
                .map_or_else(|| "n/a".into(), |(p, v)| format!("{} {}", p.name(), num(v)));
            [t.name.to_string(), best]
                .into_iter()
                .chain(l4lbs.iter().map(|&c| summary::judge(r, c, t)))
                .collect()
        })
        .collect();
    table(&header, &rows)
}

fn markdown(r: &Results) -> String {
    let m = &r.meta;
    let mut s = format!(
        "# l4lb benchmark, {}\n\n\
         {} mode: {} round(s), {} s per workload, {} idle connections. \
         Machine: {}, {} CPUs, {} GiB, Linux {}. l4lb {}. Run took {:.0} s.\n\n",
        m.date,
        m.mode,
        m.rounds,
        m.seconds_per_workload,
        m.idle_conns,
        m.cpu_model,
        m.cpus,
        m.mem_gib,
        m.kernel,
        m.l4lb_commit,
        m.wall_s
    );
    let versions: Vec<String> = m.versions.values().cloned().collect();
    let _ = writeln!(s, "Versions: {}.\n", versions.join("; "));
    for (who, path) in &r.l4lb_paths {
        let _ = writeln!(
            s,
            "- {} sessions ran on (path: sessions of the probe): `{path}`",
            who.name()
        );
    }
    if let Some(check) = &r.haproxy_splice {
        let _ = writeln!(s, "- haproxy-splice: {check}");
    }
    let _ = write!(
        s,
        "\n## Results (median{} over rounds)\n\n{}\n",
        if m.rounds > 1 { " (min–max)" } else { "" },
        results_table(r)
    );
    s.push_str(&interference(r));
    let direct =
        |c: &summary::Column| stat(r, Contender::Direct, c.workload, c.metric).map(|s| s.median);
    let _ = write!(
        s,
        "## Ratio to direct (median / direct's median)\n\n{}\n",
        ratio_table(r, direct)
    );
    let _ = write!(
        s,
        "## Ratio to the best peer (median / best median of nginx, haproxy, haproxy-splice \
         in that column: highest for rates, lowest for latency, memory and CPU)\n\n{}\n",
        ratio_table(r, |c| best_peer(r, c).map(|(_, v)| v))
    );
    let _ = write!(s, "## CPU seconds per unit of work\n\n{}\n", cpu_table(r));
    let _ = write!(
        s,
        "## Targets (l4lb vs the best peer)\n\n{}\n",
        targets_table(r)
    );
    let failed = r.samples.iter().filter(|x| x.error.is_some()).count();
    if failed > 0 {
        let _ = writeln!(
            s,
            "**{failed} measurement(s) failed; see `error` in {JSON}.**\n"
        );
    }
    s.push_str(METHOD);
    s
}

/// How much other sessions on the machine disturbed the measurements.
fn interference(r: &Results) -> String {
    let ok = || r.samples.iter().filter(|x| x.error.is_none());
    let before = ok().map(|x| x.busy_before).fold(0.0, f64::max);
    let during: Vec<(f64, &super::Sample)> = ok()
        .filter_map(|x| {
            let c = x.measured.cpu?;
            (c.wall_s > 0.0).then(|| (c.others_s / c.wall_s, x))
        })
        .collect();
    let worst = during.iter().max_by(|a, b| a.0.total_cmp(&b.0));
    let median = Stat::of(&during.iter().map(|d| d.0).collect::<Vec<_>>());
    match (worst, median) {
        (Some((w, x)), Some(m)) => format!(
            "Interference from other processes on the machine: before a run at most {} busy \
             CPUs (the harness waits for < 0.25); during runs a median {} and at most {} \
             CPUs ({} {} round {}).\n\n",
            num(before),
            num(m.median),
            num(*w),
            x.contender.name(),
            x.workload.name(),
            x.round + 1
        ),
        _ => String::new(),
    }
}

const METHOD: &str = "## Method\n\n\
- Everything runs on 127.0.0.1 on this one machine; load generators, backends and the \
  balancer share its CPUs, so absolute numbers are loopback numbers: compare contenders.\n\
- Each balancer has one worker: nginx `worker_processes 1`, haproxy `nbthread 1`, l4lb \
  `worker_threads = 1`; least-connections balancing to one backend per service; buffer \
  sizes at each product's best for one bulk stream (nginx proxy_buffer_size 64k, haproxy \
  tune.bufsize 64k, haproxy-splice tune.pipesize 256 KiB; the shipped 16k/16k/64 KiB held \
  them to 55-80% of that; l4lb's copy path grows to 256 KiB, then splices through 256 KiB \
  pipes). l4lb's access log is off. l4lb runs its \
  defaults (`l4lb`), `splice = \"off\"` (`l4lb-copy`) and `splice = \"auto\"` with \
  every session promoted to the kernel path at once (`l4lb-kernel-always`).\n\
- haproxy-splice uses `option splice-request` and `option splice-response` (haproxy \
  2.6's `option splice-auto` spliced nothing here). Its stats socket's spliced-bytes \
  counter is read around every bulk run: a run in which less than 90% of the received \
  bytes went through splice(2) fails (`spliced_share` in the JSON, for plain haproxy \
  too).\n\
- A round runs every contender once, each with a fresh balancer and iperf3 server; each \
  round starts at a different place in the list (rotated by an even share), so the host's \
  drift within a round falls on every contender. Cells are medians over rounds, \
  with min–max when there are several.\n\
- iperf3 -P1 / -P4: Gbit/s received (the control connection goes through the balancer \
  too). redis-benchmark PING with 50 clients, keep-alive (-k 1) and a new connection per \
  request (-k 0, so req/s = connections/s); a short probe run sizes -n to the wanted \
  duration. sysbench oltp_point_select, 8 threads, 4 tables x 10,000 rows on a private \
  mariadbd. Slow endpoints: iperf3 --bidir -b 1G -n 512M, both directions at once, \
  each paced at 1 Gbit/s; CPU per GB received in both directions. Idle: N connections opened through the balancer to a sink that holds them; \
  (balancer RSS 10 s after all sessions reached the sink − RSS after 10 s without them) / N, the same waits \
  for every balancer (l4lb's idle sessions move into the kernel after 1 s and sleep there \
  without a task a few seconds later); nginx preallocates its \
  connection array at start, so part of its per-connection cost is in the baseline. \
  Kernel slab per idle conn: the same difference in /proc/meminfo's SUnreclaim, which \
  holds every contender's sockets (four a connection, the harness's included) and what \
  the kernel path adds (sockmap links, map elements), none of it in any RSS.\n\
- CPU: machine CPU-s = busy time of all CPUs from /proc/stat (user+nice+system+irq+softirq, \
  no idle/iowait/steal) during the measured run, divided by GB received or by thousands \
  of requests/transactions. Proxy CPU-s = utime+stime of the balancer's processes (all \
  threads) from /proc/PID/stat; kernel work done for it in softirq or kworker context \
  (most of a sockmap splice) is not in it. Net CPU-s = machine − load generator \
  (getrusage of the reaped child) − backend servers (/proc/PID/stat): the balancer's \
  whole cost including unattributed kernel work, plus background noise.\n\
- Other sessions may share the machine: before each workload the harness waits (up to \
  2 min; 10 s in quick mode) until fewer than 0.25 CPUs are busy over a second; it \
  samples the CPU time of processes outside its own tree every 100 ms during each run \
  (`others_s` in the JSON) and repeats a run (3 runs at most, `attempts`; once in quick \
  mode) when they used more than 0.15 CPUs.\n\
- The l4lb path line comes from a probe before the runs: the same config with the \
  access log on, one redis PING session and a 64 MiB iperf3 transfer (control and data \
  sessions), and how many sessions logged each `path=`.\n";

/// One line of a workload's main numbers, for progress output.
pub fn brief(m: &Measured) -> String {
    m.metrics
        .iter()
        .filter(|(k, _)| !k.starts_with("cpu_"))
        .map(|(k, v)| format!("{k}={}", num(*v)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The workloads' order in the chart and the metric that is their rate.
pub const CHART_BARS: &[(Workload, &str, &str)] = &[
    (Workload::Iperf3P1, "gbit_s", "iperf3 -P1"),
    (Workload::Iperf3P4, "gbit_s", "iperf3 -P4"),
    (Workload::RedisKeepalive, "rps", "redis keep-alive"),
    (Workload::RedisNewconn, "rps", "redis new conn"),
    (Workload::Sysbench, "tps", "sysbench"),
];
