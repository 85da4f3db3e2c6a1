//! The load generators, each bounded in time, and the parsing of their output.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use serde::Serialize;

use super::backends::{sysbench_args, Services, Sink};
use super::cpu::{self, CpuMeter, CpuUse};
use super::proc::run_bounded;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Idle connections held open through the balancer: its RSS per connection.
    Idle,
    /// iperf3, one stream.
    Iperf3P1,
    /// iperf3, four parallel streams.
    Iperf3P4,
    /// redis-benchmark PING, 50 clients, keep-alive.
    RedisKeepalive,
    /// redis-benchmark PING, 50 clients, a new connection per request.
    RedisNewconn,
    /// sysbench oltp_point_select on MariaDB, 8 threads.
    Sysbench,
    /// Slow endpoints: iperf3 --bidir paced at 1 Gbit/s each way, 512 MiB each way at
    /// once; what matters is the balancer's CPU per GB, not the rate.
    SlowEndpoints,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Idle => "idle",
            Workload::Iperf3P1 => "iperf3-p1",
            Workload::Iperf3P4 => "iperf3-p4",
            Workload::RedisKeepalive => "redis-keepalive",
            Workload::RedisNewconn => "redis-newconn",
            Workload::Sysbench => "sysbench",
            Workload::SlowEndpoints => "slow-endpoints",
        }
    }

    /// What CPU use is counted per, for the workloads that have a rate.
    pub fn cpu_unit(self) -> Option<&'static str> {
        match self {
            Workload::Idle => None,
            Workload::Iperf3P1 | Workload::Iperf3P4 | Workload::SlowEndpoints => Some("GB"),
            Workload::RedisKeepalive => Some("1k req"),
            Workload::RedisNewconn => Some("1k conn"),
            Workload::Sysbench => Some("1k tx"),
        }
    }
}

/// One workload run's numbers, keyed by metric name (see `report::COLUMNS`).
#[derive(Debug, Default, Serialize)]
pub struct Measured {
    pub metrics: BTreeMap<String, f64>,
    pub cpu: Option<CpuUse>,
}

impl Measured {
    fn set(&mut self, key: &str, value: f64) {
        self.metrics.insert(key.to_string(), value);
    }

    /// Records CPU use, also as seconds per unit of work (GB, 1k requests...).
    fn with_cpu(mut self, cpu: CpuUse, units: f64) -> Measured {
        if units > 0.0 {
            self.set("cpu_machine", cpu.machine_s / units);
            self.set("cpu_proxy", cpu.proxy_s / units);
            self.set("cpu_net", cpu.net_s() / units);
        }
        self.cpu = Some(cpu);
        self
    }
}

pub struct Ctx<'a> {
    pub fronts: Services,
    pub dir: &'a Path,
    pub duration: Duration,
    pub proxy_pids: Vec<u32>,
    pub iperf_pid: u32,
    pub redis_pid: u32,
    pub mysql_pid: u32,
    pub sink: &'a Sink,
    pub idle_conns: usize,
}

pub fn run(w: Workload, ctx: &Ctx) -> Result<Measured> {
    match w {
        Workload::Idle => idle(ctx),
        Workload::Iperf3P1 => iperf(ctx, 1),
        Workload::Iperf3P4 => iperf(ctx, 4),
        Workload::RedisKeepalive => redis(ctx, true),
        Workload::RedisNewconn => redis(ctx, false),
        Workload::Sysbench => sysbench(ctx),
        Workload::SlowEndpoints => slow_endpoints(ctx),
    }
}

/// The bulk workloads, whose bytes a splicing balancer should splice.
pub fn is_bulk(w: Workload) -> bool {
    matches!(
        w,
        Workload::Iperf3P1 | Workload::Iperf3P4 | Workload::SlowEndpoints
    )
}

/// Whole seconds, at least one (iperf3 and sysbench take integers).
fn secs(d: Duration) -> u64 {
    d.as_secs_f64().round().max(1.0) as u64
}

fn limit(d: Duration) -> Duration {
    d * 3 + Duration::from_secs(30)
}

fn iperf(ctx: &Ctx, streams: u32) -> Result<Measured> {
    let meter = CpuMeter::start(&ctx.proxy_pids, &[ctx.iperf_pid])?;
    let out = run_bounded(
        &format!("iperf3-p{streams}"),
        Command::new("iperf3")
            .args(["-c", "127.0.0.1", "-J", "--connect-timeout", "5000", "-p"])
            .arg(ctx.fronts.iperf.to_string())
            .arg("-t")
            .arg(secs(ctx.duration).to_string())
            .arg("-P")
            .arg(streams.to_string()),
        ctx.dir,
        limit(ctx.duration),
    )?;
    let cpu = meter.finish()?;
    let (bits_s, bytes) = parse_iperf(&out)?;
    let mut m = Measured::default();
    m.set("gbit_s", bits_s / 1e9);
    m.set("gbytes", bytes / 1e9);
    Ok(m.with_cpu(cpu, bytes / 1e9))
}

/// Bytes each way of the slow-endpoints workload, and the endpoints' pace.
const SLOW_BYTES: &str = "512M";
const SLOW_RATE: &str = "1G";

/// Both endpoints slow: iperf3 --bidir, each direction paced at 1 Gbit/s (-b), 512 MiB
/// each way at once (-n). CPU is counted per GB received in both directions together.
fn slow_endpoints(ctx: &Ctx) -> Result<Measured> {
    let meter = CpuMeter::start(&ctx.proxy_pids, &[ctx.iperf_pid])?;
    let out = run_bounded(
        "iperf3-slow",
        Command::new("iperf3")
            .args([
                "-c",
                "127.0.0.1",
                "-J",
                "--connect-timeout",
                "5000",
                "--bidir",
            ])
            .args(["-b", SLOW_RATE, "-n", SLOW_BYTES, "-p"])
            .arg(ctx.fronts.iperf.to_string()),
        ctx.dir,
        // 1 GiB at 2 x 1 Gbit/s takes about 4.3 s.
        limit(ctx.duration).max(Duration::from_secs(60)),
    )?;
    let cpu = meter.finish()?;
    let (forward, reverse) = parse_iperf_bidir(&out)?;
    let bytes = forward.1 + reverse.1;
    let mut m = Measured::default();
    m.set("gbit_s", (forward.0 + reverse.0) / 1e9);
    m.set("gbytes", bytes / 1e9);
    Ok(m.with_cpu(cpu, bytes / 1e9))
}

/// Bits per second and bytes received, from `iperf3 -J`.
fn parse_iperf(json: &str) -> Result<(f64, f64)> {
    let v = iperf_json(json)?;
    sum_of(&v, "sum_received")
}

/// Bits per second and bytes received each way, from `iperf3 --bidir -J`.
fn parse_iperf_bidir(json: &str) -> Result<((f64, f64), (f64, f64))> {
    let v = iperf_json(json)?;
    Ok((
        sum_of(&v, "sum_received")?,
        sum_of(&v, "sum_received_bidir_reverse")?,
    ))
}

fn iperf_json(json: &str) -> Result<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(json).context("iperf3 -J output is not JSON")?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {err}");
    }
    Ok(v)
}

fn sum_of(v: &serde_json::Value, key: &str) -> Result<(f64, f64)> {
    let sum = &v["end"][key];
    let bits = sum["bits_per_second"].as_f64();
    let bytes = sum["bytes"].as_f64();
    match (bits, bytes) {
        (Some(bits), Some(bytes)) if bytes > 0.0 => Ok((bits, bytes)),
        _ => bail!("iperf3 -J output has no end.{key}"),
    }
}

struct RedisResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn redis_benchmark(ctx: &Ctx, keepalive: bool, requests: u64) -> Result<RedisResult> {
    let out = run_bounded(
        if keepalive {
            "redis-benchmark-ka"
        } else {
            "redis-benchmark-nc"
        },
        Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-c", "50", "--csv", "-p"])
            .arg(ctx.fronts.redis.to_string())
            .arg("-n")
            .arg(requests.to_string())
            .arg("-k")
            .arg(if keepalive { "1" } else { "0" })
            .arg("PING"),
        ctx.dir,
        limit(ctx.duration),
    )?;
    parse_redis_csv(&out)
}

fn redis(ctx: &Ctx, keepalive: bool) -> Result<Measured> {
    // redis-benchmark counts requests, not time: a short probe sizes the run.
    let probe_n = if keepalive { 20_000 } else { 5_000 };
    let probe = redis_benchmark(ctx, keepalive, probe_n)?;
    let n = ((probe.rps * ctx.duration.as_secs_f64()) as u64).clamp(probe_n, 20_000_000);
    let meter = CpuMeter::start(&ctx.proxy_pids, &[ctx.redis_pid])?;
    let r = redis_benchmark(ctx, keepalive, n)?;
    let cpu = meter.finish()?;
    let mut m = Measured::default();
    m.set("rps", r.rps);
    m.set("p50_ms", r.p50_ms);
    m.set("p99_ms", r.p99_ms);
    m.set("requests", n as f64);
    Ok(m.with_cpu(cpu, n as f64 / 1000.0))
}

/// `redis-benchmark --csv` (redis 7): a header line, then
/// "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms".
fn parse_redis_csv(out: &str) -> Result<RedisResult> {
    let mut lines = out
        .lines()
        .map(|l| {
            l.split(',')
                .map(|f| f.trim().trim_matches('"'))
                .collect::<Vec<_>>()
        })
        .filter(|f| f.len() >= 8);
    let header = lines
        .next()
        .context("redis-benchmark printed no CSV header")?;
    let row = lines
        .next()
        .context("redis-benchmark printed no CSV result row")?;
    let col = |name: &str| -> Result<f64> {
        let i = header
            .iter()
            .position(|h| *h == name)
            .with_context(|| format!("redis-benchmark CSV has no column {name}"))?;
        row.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("redis-benchmark CSV column {name} is not a number"))
    };
    Ok(RedisResult {
        rps: col("rps")?,
        p50_ms: col("p50_latency_ms")?,
        p99_ms: col("p99_latency_ms")?,
    })
}

fn sysbench(ctx: &Ctx) -> Result<Measured> {
    let meter = CpuMeter::start(&ctx.proxy_pids, &[ctx.mysql_pid])?;
    let out = run_bounded(
        "sysbench",
        Command::new("sysbench")
            .arg("oltp_point_select")
            .args(sysbench_args(ctx.fronts.mysql))
            .args(["--threads=8", "--report-interval=0", "--events=0"])
            .arg(format!("--time={}", secs(ctx.duration)))
            .arg("run"),
        ctx.dir,
        limit(ctx.duration),
    )?;
    let cpu = meter.finish()?;
    let (tx, tps, p95) = parse_sysbench(&out)?;
    let mut m = Measured::default();
    m.set("tps", tps);
    m.set("p95_ms", p95);
    m.set("transactions", tx);
    Ok(m.with_cpu(cpu, tx / 1000.0))
}

/// Transactions, transactions per second and the 95th percentile latency (ms) from
/// sysbench's report ("transactions: 160007 (79901.78 per sec.)", "95th percentile: 0.18").
fn parse_sysbench(out: &str) -> Result<(f64, f64, f64)> {
    let line = |key: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(key).map(str::trim))
            .with_context(|| format!("sysbench output has no '{key}' line"))
    };
    let tx_line = line("transactions:")?;
    let tx = tx_line
        .split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok())
        .context("sysbench transactions count")?;
    let tps = tx_line
        .split('(')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .context("sysbench transactions per second")?;
    let p95 = line("95th percentile:")?
        .parse::<f64>()
        .context("sysbench 95th percentile")?;
    if tx <= 0.0 {
        bail!("sysbench ran no transaction:\n{out}");
    }
    Ok((tx, tps, p95))
}

/// How long the balancer sits before its memory is read, without and with the idle
/// connections.
const IDLE_SETTLE: Duration = Duration::from_secs(10);

/// Opens `idle_conns` connections through the balancer to the sink and measures the
/// balancer's resident memory growth per connection.
fn idle(ctx: &Ctx) -> Result<Measured> {
    if ctx.proxy_pids.is_empty() {
        bail!("the idle workload needs a balancer process");
    }
    let n = ctx.idle_conns;
    // Memory the previous workloads freed may still be on its way back to the kernel
    // (l4lb's allocator returns it lazily): the baseline too is read once settled.
    std::thread::sleep(IDLE_SETTLE);
    let base_kib = cpu::rss_kib(&ctx.proxy_pids);
    let base_slab = cpu::kernel_slab_kib();
    let before = ctx.sink.accepted();
    let addr: SocketAddr = ([127, 0, 0, 1], ctx.fronts.sink).into();
    let deadline = Instant::now() + limit(ctx.duration);
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("idle connection {i} of {n}"))?;
        conns.push(c);
        if Instant::now() > deadline {
            bail!("opened only {i} of {n} idle connections in time");
        }
    }
    // Every session is complete once the balancer's upstream side reached the sink.
    while ctx.sink.accepted() - before < n {
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} idle sessions reached the backend",
                ctx.sink.accepted() - before
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Every balancer gets the same time to settle: l4lb's idle sessions move into the
    // kernel after 1 s (the default time rule) and fall asleep there a few seconds later.
    std::thread::sleep(IDLE_SETTLE);
    let loaded_kib = cpu::rss_kib(&ctx.proxy_pids);
    let loaded_slab = cpu::kernel_slab_kib();
    drop(conns);
    ctx.sink.release();
    if loaded_kib < base_kib {
        // Memory freed before the baseline went back meanwhile: the difference would
        // read as free connections.
        bail!("the balancer's RSS fell from {base_kib} to {loaded_kib} KiB while {n} connections opened: no per-connection figure");
    }
    let mut m = Measured::default();
    m.set("conns", n as f64);
    m.set("rss_base_mib", base_kib as f64 / 1024.0);
    m.set("rss_loaded_mib", loaded_kib as f64 / 1024.0);
    m.set(
        "rss_per_conn_kib",
        loaded_kib.saturating_sub(base_kib) as f64 / n as f64,
    );
    // What the connections hold in the kernel: every contender's four sockets a
    // connection (client, balancer's two, sink), and what it adds (l4lb's sessions in
    // the kernel: sockmap links, map elements). Other activity on the host shows here
    // too, so it is a second figure, not the target.
    if let (Some(base), Some(loaded)) = (base_slab, loaded_slab) {
        m.set(
            "kernel_slab_per_conn_kib",
            (loaded as f64 - base as f64) / n as f64,
        );
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_redis_csv() {
        let out = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                   \"PING\",\"95693.77\",\"0.275\",\"0.072\",\"0.263\",\"0.415\",\"0.631\",\"1.175\"\n";
        let r = parse_redis_csv(out).unwrap();
        assert_eq!(r.rps, 95693.77);
        assert_eq!(r.p50_ms, 0.263);
        assert_eq!(r.p99_ms, 0.631);
    }

    #[test]
    fn parses_sysbench_report() {
        let out = "SQL statistics:\n    transactions:                        160007 (79901.78 per sec.)\n\
                   Latency (ms):\n         95th percentile:                        0.18\n";
        assert_eq!(parse_sysbench(out).unwrap(), (160007.0, 79901.78, 0.18));
    }

    #[test]
    fn parses_iperf_json_and_errors() {
        let ok = r#"{"end":{"sum_received":{"bytes":2.5e9,"bits_per_second":2.0e10}}}"#;
        assert_eq!(parse_iperf(ok).unwrap(), (2.0e10, 2.5e9));
        let bidir = r#"{"end":{"sum_received":{"bytes":5.0e8,"bits_per_second":1.0e9},
            "sum_received_bidir_reverse":{"bytes":5.1e8,"bits_per_second":0.9e9}}}"#;
        assert_eq!(
            parse_iperf_bidir(bidir).unwrap(),
            ((1.0e9, 5.0e8), (0.9e9, 5.1e8))
        );
        assert!(parse_iperf_bidir(ok).is_err());
        let err = r#"{"start":{},"error":"unable to connect to server"}"#;
        assert!(parse_iperf(err)
            .unwrap_err()
            .to_string()
            .contains("unable to connect"));
    }
}
