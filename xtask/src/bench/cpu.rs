//! CPU and memory accounting from /proc: the whole machine's busy time (/proc/stat),
//! a process tree's own time (/proc/PID/stat), and reaped load generators' time
//! (getrusage(RUSAGE_CHILDREN)).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use super::others::OthersWatch;

/// CPU seconds spent during one measurement.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CpuUse {
    pub wall_s: f64,
    /// Whole machine: user + nice + system + irq + softirq over all CPUs (no idle,
    /// iowait or steal), whoever ran it.
    pub machine_s: f64,
    /// The balancer's process tree (utime + stime, all threads). Kernel work done in
    /// softirq or kworker context on its behalf is not in it.
    pub proxy_s: f64,
    /// The load generator (iperf3 / redis-benchmark / sysbench client).
    pub loadgen_s: f64,
    /// The backend servers (iperf3 -s, redis-server, mariadbd).
    pub backend_s: f64,
    /// User-space processes outside the harness's tree (other sessions' builds and
    /// tests share this machine), sampled every 100 ms.
    pub others_s: f64,
}

impl CpuUse {
    /// Machine time minus the load generator's and backends' own time: the balancer
    /// plus kernel work nobody is charged for (softirq, kworkers) plus background noise.
    pub fn net_s(&self) -> f64 {
        (self.machine_s - self.loadgen_s - self.backend_s).max(0.0)
    }
}

/// Starts at construction; `finish` reads the deltas.
pub struct CpuMeter {
    start: Instant,
    machine: u64,
    proxy: Vec<(u32, u64)>,
    backend: Vec<(u32, u64)>,
    children: f64,
    others: OthersWatch,
}

impl CpuMeter {
    pub fn start(proxy_pids: &[u32], backend_pids: &[u32]) -> Result<CpuMeter> {
        let snap = |pids: &[u32]| pids.iter().map(|&p| (p, process_ticks(p))).collect();
        Ok(CpuMeter {
            others: OthersWatch::start(),
            proxy: snap(proxy_pids),
            backend: snap(backend_pids),
            children: children_secs(),
            machine: machine_busy_ticks()?,
            start: Instant::now(),
        })
    }

    pub fn finish(self) -> Result<CpuUse> {
        let hz = ticks_per_second();
        let delta = |snap: &[(u32, u64)]| -> f64 {
            snap.iter()
                .map(|&(p, t)| process_ticks(p).saturating_sub(t))
                .sum::<u64>() as f64
                / hz
        };
        Ok(CpuUse {
            wall_s: self.start.elapsed().as_secs_f64(),
            machine_s: machine_busy_ticks()?.saturating_sub(self.machine) as f64 / hz,
            proxy_s: delta(&self.proxy),
            loadgen_s: (children_secs() - self.children).max(0.0),
            backend_s: delta(&self.backend),
            others_s: self.others.finish() as f64 / hz,
        })
    }
}

/// Other sessions may share this machine (builds, tests): waits, at most `patience`,
/// until fewer than `max_cpus` CPUs are busy over a second, so a measurement does
/// not start in the middle of someone's build. Returns the last reading.
pub fn wait_quiet(max_cpus: f64, patience: Duration) -> Result<f64> {
    let deadline = Instant::now() + patience;
    loop {
        let (ticks, start) = (machine_busy_ticks()?, Instant::now());
        std::thread::sleep(Duration::from_secs(1));
        let busy = machine_busy_ticks()?.saturating_sub(ticks) as f64
            / ticks_per_second()
            / start.elapsed().as_secs_f64();
        if busy <= max_cpus || Instant::now() > deadline {
            return Ok(busy);
        }
    }
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf(3) has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

fn machine_busy_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...; guest time is inside user.
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    Ok(at(0) + at(1) + at(2) + at(5) + at(6))
}

/// The fields of /proc/PID/stat after the command name (which may hold spaces).
pub fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// utime + stime of a process (all its threads), 0 once it is gone.
fn process_ticks(pid: u32) -> u64 {
    let Some(f) = stat_fields(pid) else { return 0 };
    // After the name: state(0) ppid(1) ... utime(11) stime(12).
    let at = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    at(11) + at(12)
}

/// `pid` and every process below it (nginx's master and its workers).
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = stat_fields(p).and_then(|f| f.get(1)?.parse::<u32>().ok()) {
                parents.push((p, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|&&(_, pp)| pp == parent)
                .map(|&(p, _)| p),
        );
        i += 1;
    }
    tree
}

/// Resident memory of a process tree in KiB.
pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .sum()
}

/// The kernel's unreclaimable slab memory in KiB (`SUnreclaim` in /proc/meminfo): where
/// sockets, sockmap links and BPF map elements live, none of which is in any RSS.
pub fn kernel_slab_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with("SUnreclaim:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// User + system seconds of every child this process has reaped so far.
fn children_secs() -> f64 {
    // SAFETY: rusage is plain old data; getrusage(2) fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// Raises this process's open-file limit to its hard limit (children inherit it) and
/// returns it: 5,000 idle sessions need 10,000 descriptors in the harness and 10,000 in
/// each balancer. Raising the hard limit itself would need CAP_SYS_RESOURCE.
pub fn raise_nofile() -> Result<u64> {
    // SAFETY: rlimit is plain old data; getrlimit(2) fills it.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    lim.rlim_cur = lim.rlim_max.min(1 << 20);
    // SAFETY: `lim` is a valid rlimit; setrlimit(2) only reads it.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot raise the open-file limit to {}", lim.rlim_cur));
    }
    Ok(lim.rlim_cur)
}
