//! What a result was measured on: date, machine, software versions, run parameters.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use super::contenders::Contender;
use super::workloads::Workload;

#[derive(Serialize)]
pub struct Meta {
    pub date: String,
    pub mode: String,
    pub rounds: usize,
    pub seconds_per_workload: u64,
    pub idle_conns: usize,
    pub cpu_model: String,
    pub cpus: usize,
    pub mem_gib: f64,
    pub kernel: String,
    pub l4lb_commit: String,
    pub versions: BTreeMap<String, String>,
    pub contenders: Vec<Contender>,
    pub workloads: Vec<Workload>,
    pub wall_s: f64,
}

impl Meta {
    pub fn collect(
        mode: &str,
        rounds: usize,
        duration: Duration,
        idle_conns: usize,
        contenders: &[Contender],
        workloads: &[Workload],
        wall: Duration,
    ) -> Meta {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib = field(&meminfo, "MemTotal:")
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        let versions = [
            ("nginx", "nginx", "-v"),
            ("haproxy", "haproxy", "-v"),
            ("iperf3", "iperf3", "--version"),
            ("redis", "redis-server", "--version"),
            ("mariadb", "mariadbd", "--version"),
            ("sysbench", "sysbench", "--version"),
        ]
        .into_iter()
        .map(|(name, bin, flag)| (name.to_string(), first_line(bin, &[flag])))
        .collect();
        let dirty =
            !first_line("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
        Meta {
            date: first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            mode: mode.to_string(),
            rounds,
            seconds_per_workload: duration.as_secs(),
            idle_conns,
            cpu_model: field(&cpuinfo, "model name").unwrap_or_default(),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            mem_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            l4lb_commit: format!(
                "{}{}",
                first_line("git", &["rev-parse", "--short", "HEAD"]),
                if dirty {
                    " (with uncommitted changes)"
                } else {
                    ""
                }
            ),
            versions,
            contenders: contenders.to_vec(),
            workloads: workloads.to_vec(),
            wall_s: wall.as_secs_f64().round(),
        }
    }
}

/// The value after `key` (and a colon) on the first line starting with it.
fn field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// First non-empty line of a command's stdout or stderr (nginx -v prints to stderr).
fn first_line(bin: &str, args: &[&str]) -> String {
    Command::new(bin)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(str::to_string)
        })
        .unwrap_or_default()
}
