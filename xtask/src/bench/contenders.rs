//! The balancers under test, each started with its own configuration in a temp dir
//! and listening on fresh 127.0.0.1 ports in front of the same backends. Every proxy
//! gets one worker process / thread, least-connections balancing and its shipped
//! buffer defaults.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use serde::Serialize;

use super::backends::Services;
use super::cpu;
use super::proc::{free_port, run_bounded, Proc};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Contender {
    /// No balancer: the load generator talks to the backend.
    Direct,
    /// nginx stream, one worker process.
    Nginx,
    /// haproxy mode tcp, one thread.
    Haproxy,
    /// haproxy with `option splice-request` and `option splice-response` (splice(2)
    /// through pipes in both directions; checked through its stats socket).
    HaproxySplice,
    /// l4lb with its default configuration (no `splice` key).
    L4lb,
    /// l4lb with splice = "off" (userspace copy).
    L4lbCopy,
    /// l4lb with splice = "auto" and every session promoted to the kernel path at once
    /// (splice_after_bytes = 0, splice_after_time = "0s").
    L4lbKernelAlways,
}

impl Contender {
    pub fn name(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::Nginx => "nginx",
            Contender::Haproxy => "haproxy",
            Contender::HaproxySplice => "haproxy-splice",
            Contender::L4lb => "l4lb",
            Contender::L4lbCopy => "l4lb-copy",
            Contender::L4lbKernelAlways => "l4lb-kernel-always",
        }
    }

    /// nginx and haproxy: the peers l4lb is compared with.
    pub fn is_peer(self) -> bool {
        matches!(
            self,
            Contender::Nginx | Contender::Haproxy | Contender::HaproxySplice
        )
    }

    pub fn is_l4lb(self) -> bool {
        matches!(
            self,
            Contender::L4lb | Contender::L4lbCopy | Contender::L4lbKernelAlways
        )
    }

    /// The splice keys of an l4lb contender's `[global]`: none for the default.
    fn l4lb_splice_keys(self) -> &'static str {
        match self {
            Contender::L4lbCopy => "splice = \"off\"\n",
            Contender::L4lbKernelAlways => {
                "splice = \"auto\"\nsplice_after_bytes = 0\nsplice_after_time = \"0s\"\n"
            }
            _ => "",
        }
    }
}

/// A started contender; the balancer process stops when this drops.
pub struct Running {
    pub fronts: Services,
    proc: Option<Proc>,
    /// haproxy's stats socket (`show info`), for its splice counter.
    stats_socket: Option<PathBuf>,
}

impl Running {
    /// The balancer's processes (nginx: master and worker); empty for `direct`.
    pub fn pids(&self) -> Vec<u32> {
        self.proc
            .as_ref()
            .map(|p| cpu::descendants(p.pid()))
            .unwrap_or_default()
    }

    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log).unwrap_or_default()
    }

    /// Fails with the balancer's log if it died during a workload.
    pub fn check_alive(&mut self) -> Result<()> {
        self.proc.as_mut().map_or(Ok(()), Proc::check_alive)
    }

    /// Bytes haproxy has sent with splice(2) since it started (`show info` on its
    /// stats socket); None for the other contenders.
    pub fn spliced_bytes(&self) -> Result<Option<u64>> {
        let Some(sock) = &self.stats_socket else {
            return Ok(None);
        };
        let info = haproxy_show_info(sock)?;
        spliced_bytes_of(&info)
            .map(Some)
            .with_context(|| format!("no spliced-bytes counter in haproxy's show info:\n{info}"))
    }
}

fn haproxy_show_info(sock: &Path) -> Result<String> {
    let mut conn = UnixStream::connect(sock)
        .with_context(|| format!("connect to haproxy's stats socket {}", sock.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(b"show info\n")?;
    let mut info = String::new();
    conn.read_to_string(&mut info)
        .context("read haproxy's show info")?;
    Ok(info)
}

/// `TotalSplicdedBytesOut` (haproxy 2.6 spells it so; later versions
/// `TotalSplicedBytesOut`) from `show info`.
fn spliced_bytes_of(info: &str) -> Option<u64> {
    info.lines().find_map(|l| {
        let (key, value) = l.split_once(':')?;
        matches!(key.trim(), "TotalSplicdedBytesOut" | "TotalSplicedBytesOut")
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

/// Per-run settings of the balancers.
#[derive(Clone, Copy)]
pub struct Options {
    /// l4lb's access log (on only for the path probe).
    pub access_log: bool,
    /// The open-file limit the balancers inherit.
    pub max_fds: u64,
}

impl Options {
    /// Client connections that fit the limit: each has an upstream descriptor too.
    fn max_conns(self) -> u64 {
        self.max_fds.saturating_sub(100) / 2
    }
}

pub fn start(
    who: Contender,
    backends: &Services,
    l4lb_bin: &Path,
    dir: &Path,
    opts: Options,
) -> Result<Running> {
    let fronts = Services {
        iperf: free_port()?,
        redis: free_port()?,
        mysql: free_port()?,
        sink: free_port()?,
    };
    let routes = [
        ("iperf", fronts.iperf, backends.iperf),
        ("redis", fronts.redis, backends.redis),
        ("mysql", fronts.mysql, backends.mysql),
        ("sink", fronts.sink, backends.sink),
    ];
    let name = who.name();
    let log = dir.join(format!("{name}.log"));
    let mut stats_socket = None;
    let mut cmd = match who {
        Contender::Direct => {
            return Ok(Running {
                fronts: *backends,
                proc: None,
                stats_socket: None,
            })
        }
        Contender::Nginx => {
            let conf = dir.join("nginx.conf");
            std::fs::write(&conf, nginx_conf(&routes, dir, opts))?;
            let mut c = Command::new("nginx");
            c.arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(&conf)
                .arg("-e")
                .arg(&log);
            c
        }
        Contender::Haproxy | Contender::HaproxySplice => {
            let conf = dir.join(format!("{name}.cfg"));
            let splice = who == Contender::HaproxySplice;
            let sock = dir.join(format!("{name}.sock"));
            std::fs::write(&conf, haproxy_conf(&routes, splice, &sock, opts))?;
            stats_socket = Some(sock);
            let mut c = Command::new("haproxy");
            c.arg("-db").arg("-f").arg(&conf);
            c
        }
        Contender::L4lb | Contender::L4lbCopy | Contender::L4lbKernelAlways => {
            let conf = dir.join(format!("{name}.toml"));
            std::fs::write(&conf, l4lb_conf(&routes, who.l4lb_splice_keys(), opts))?;
            let mut c = Command::new(l4lb_bin);
            c.arg("run").arg("-c").arg(&conf);
            c
        }
    };
    let mut proc = Proc::spawn(name, &mut cmd, &log)?;
    proc.wait_listening(&fronts.all(), Duration::from_secs(20))?;
    if who == Contender::Nginx {
        // nginx's master listens before it forks its worker: the pids measured (CPU,
        // idle RSS) must include the worker, which does the proxying.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while cpu::descendants(proc.pid()).len() < 2 {
            if std::time::Instant::now() > deadline {
                bail!("nginx started no worker process:\n{}", proc.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(Running {
        fronts,
        proc: Some(proc),
        stats_socket,
    })
}

type Route = (&'static str, u16, u16);

/// Every peer at its best on a bulk stream (iperf3 -P1, alternating 6 s runs by hand,
/// 2026-12-03): the defaults held nginx to 8.5 Gbit/s (16k buffers), plain haproxy to
/// 8.2-8.8 (16k buffers) and haproxy-splice to 15.0-16.5 (64 KiB pipes); with these,
/// 12-15, 13.9-15.5 and 17.2-20.1. l4lb's own pipes are 256 KiB too.
const NGINX_BUFFER: &str = "64k";
const HAPROXY_BUFSIZE: u32 = 65_536;
const HAPROXY_PIPESIZE: u32 = 262_144;

fn nginx_conf(routes: &[Route], dir: &Path, opts: Options) -> String {
    // worker_connections counts client and upstream connections alike.
    let mut s = format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         daemon off;\nmaster_process on;\nworker_processes 1;\n\
         worker_rlimit_nofile {fds};\npid {dir}/nginx.pid;\n\
         error_log {dir}/nginx.log warn;\n\
         events {{ worker_connections {conns}; }}\nstream {{\n",
        dir = dir.display(),
        fds = opts.max_fds,
        conns = opts.max_conns() * 2,
    );
    // 32k moved 12-13 Gbit/s, 128k 13-14, 256k 10-14: 64k is the best buffer.
    for (name, front, back) in routes {
        let _ = writeln!(
            s,
            "  upstream {name} {{ least_conn; server 127.0.0.1:{back}; }}\n  \
             server {{ listen 127.0.0.1:{front}; proxy_pass {name}; \
             proxy_buffer_size {NGINX_BUFFER}; }}"
        );
    }
    s.push_str("}\n");
    s
}

fn haproxy_conf(routes: &[Route], splice: bool, stats_socket: &Path, opts: Options) -> String {
    // haproxy refuses to start unless the fd limit covers 2 per connection plus, for
    // splicing, a pipe (2 fds) per 4 connections: size both variants alike for that.
    let conns = opts.max_fds.saturating_sub(200) * 2 / 5;
    let pipes = if splice {
        format!("  tune.pipesize {HAPROXY_PIPESIZE}\n")
    } else {
        String::new()
    };
    let mut s = format!(
        "global\n  nbthread 1\n  maxconn {conns}\n  stats socket {sock} mode 600 level user\n\
         \x20 tune.bufsize {HAPROXY_BUFSIZE}\n{pipes}\
         defaults\n  mode tcp\n  maxconn {conns}\n  timeout connect 5s\n  \
         timeout client 10m\n  timeout server 10m\n",
        sock = stats_socket.display(),
    );
    if splice {
        // Not `option splice-auto`: haproxy 2.6.12 never found a loopback iperf3 stream
        // worth splicing with it (0 splice(2) calls, TotalSplicdedBytesOut 0); these two
        // splice every transfer in both directions.
        s.push_str("  option splice-request\n  option splice-response\n");
    }
    for (name, front, back) in routes {
        let _ = writeln!(
            s,
            "listen {name}\n  bind 127.0.0.1:{front}\n  balance leastconn\n  \
             server s1 127.0.0.1:{back}"
        );
    }
    s
}

fn l4lb_conf(routes: &[Route], splice_keys: &str, opts: Options) -> String {
    // One worker thread like the single nginx worker and haproxy thread.
    let mut s = format!(
        "[global]\nworker_threads = 1\nmax_connections = {conns}\nlog_level = \"info\"\n\
         access_log = {log}\n{splice_keys}worker_shutdown_timeout = \"1s\"\n",
        conns = opts.max_conns(),
        log = opts.access_log,
    );
    for (name, front, back) in routes {
        let _ = write!(
            s,
            "\n[upstream.{name}]\nbalance = \"least_conn\"\n\
             servers = [{{ address = \"127.0.0.1:{back}\" }}]\n\n\
             [[server]]\nlisten = \"127.0.0.1:{front}\"\nproxy_pass = \"{name}\"\n"
        );
    }
    s
}

/// Bytes of the probe transfers: large enough for a bulk session, short enough to be
/// done in well under a second.
const PROBE_BYTES: &str = "64M";

/// A short bulk transfer through a started contender: iperf3 -n 64 MiB.
fn probe_transfer(running: &Running, dir: &Path) -> Result<()> {
    run_bounded(
        "iperf3-probe",
        Command::new("iperf3")
            .args([
                "-c",
                "127.0.0.1",
                "--connect-timeout",
                "5000",
                "-n",
                PROBE_BYTES,
            ])
            .arg("-p")
            .arg(running.fronts.iperf.to_string()),
        dir,
        Duration::from_secs(30),
    )?;
    Ok(())
}

/// Which path l4lb really carries sessions on: a short run with the access log on,
/// one redis PING and one iperf3 transfer of 64 MiB (a control and a data session)
/// through it, then the `path=` values of its access log lines with their counts.
pub fn probe_l4lb_path(
    who: Contender,
    backends: &Services,
    l4lb_bin: &Path,
    dir: &Path,
    max_fds: u64,
) -> Result<String> {
    let probe_dir = dir.join(format!("{}-probe", who.name()));
    std::fs::create_dir_all(&probe_dir)?;
    let opts = Options {
        access_log: true,
        max_fds,
    };
    let running = start(who, backends, l4lb_bin, &probe_dir, opts)?;
    {
        let mut conn = TcpStream::connect(("127.0.0.1", running.fronts.redis))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(b"PING\r\n")?;
        let mut reply = [0u8; 7];
        conn.read_exact(&mut reply)
            .context("no PING reply through l4lb")?;
    }
    probe_transfer(&running, &probe_dir)?;
    // Sessions are logged when they end: the PING's, iperf3's control and data.
    const SESSIONS: usize = 3;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = running.log();
        let paths = session_paths(&log);
        let logged: usize = paths.iter().map(|(_, n)| n).sum();
        if logged >= SESSIONS || (logged > 0 && Instant::now() > deadline) {
            let mut out = paths_summary(&paths);
            if log.contains("kernel splice path unavailable") {
                out.push_str(" (daemon: kernel splice path unavailable)");
            }
            return Ok(out);
        }
        if Instant::now() > deadline {
            bail!("l4lb wrote no access log line for the probe sessions; log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// "kernel 2/3, copy:short 1/3": every path with how many of the sessions took it.
fn paths_summary(paths: &[(String, usize)]) -> String {
    let total: usize = paths.iter().map(|(_, n)| n).sum();
    paths
        .iter()
        .map(|(p, n)| format!("{p} {n}/{total}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `path=` values of access log lines, in order of first appearance, with the
/// number of sessions that logged each.
fn session_paths(log: &str) -> Vec<(String, usize)> {
    let mut paths: Vec<(String, usize)> = Vec::new();
    for value in log
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("path="))
    {
        let value = value.trim_matches('"');
        match paths.iter_mut().find(|(p, _)| p == value) {
            Some((_, n)) => *n += 1,
            None => paths.push((value.to_string(), 1)),
        }
    }
    paths
}

/// Whether haproxy-splice really splices: a 64 MiB iperf3 transfer through it, and the
/// growth of haproxy's spliced-bytes counter. Fails when nothing was spliced.
pub fn probe_haproxy_splice(backends: &Services, dir: &Path, max_fds: u64) -> Result<String> {
    let who = Contender::HaproxySplice;
    let probe_dir = dir.join(format!("{}-probe", who.name()));
    std::fs::create_dir_all(&probe_dir)?;
    let opts = Options {
        access_log: false,
        max_fds,
    };
    let running = start(who, backends, Path::new(""), &probe_dir, opts)?;
    let before = running.spliced_bytes()?.unwrap_or(0);
    probe_transfer(&running, &probe_dir)?;
    let spliced = running.spliced_bytes()?.unwrap_or(0) - before;
    let sent = 64 << 20;
    if spliced == 0 {
        bail!("haproxy spliced 0 of the {PROBE_BYTES} probe bytes (TotalSplicdedBytesOut)");
    }
    Ok(format!(
        "spliced {:.0}% of a {PROBE_BYTES}iB probe transfer ({spliced} bytes in TotalSplicdedBytesOut)",
        spliced as f64 * 100.0 / f64::from(sent)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_paths_are_counted() {
        let log = "INFO access: client=1 path=copy:off end=eof\n\
                   INFO access: client=2 path=kernel end=eof\n\
                   INFO access: client=3 path=copy:off end=eof\n";
        let paths = session_paths(log);
        assert_eq!(
            paths,
            vec![("copy:off".to_string(), 2), ("kernel".to_string(), 1)]
        );
        assert_eq!(paths_summary(&paths), "copy:off 2/3, kernel 1/3");
    }

    #[test]
    fn haproxy_spliced_bytes_from_show_info() {
        let info = "Name: HAProxy\nMaxpipes: 1980\nPipesUsed: 0\nPipesFree: 1\n\
                    TotalSplicdedBytesOut: 3599356689\nBusyPolling: 0\n";
        assert_eq!(spliced_bytes_of(info), Some(3_599_356_689));
        assert_eq!(spliced_bytes_of("TotalSplicedBytesOut: 7\n"), Some(7));
        assert_eq!(spliced_bytes_of("Maxpipes: 1\n"), None);
    }

    #[test]
    fn nginx_config_has_one_worker_and_64k_buffers() {
        let opts = Options {
            access_log: false,
            max_fds: 20_000,
        };
        let conf = nginx_conf(&[("iperf", 1, 2)], Path::new("/tmp/n"), opts);
        assert!(conf.contains("worker_processes 1;"));
        assert!(conf
            .contains("server { listen 127.0.0.1:1; proxy_pass iperf; proxy_buffer_size 64k; }"));
    }

    #[test]
    fn haproxy_splice_config_splices_both_ways() {
        let opts = Options {
            access_log: false,
            max_fds: 20_000,
        };
        let sock = Path::new("/tmp/h.sock");
        let conf = haproxy_conf(&[("iperf", 1, 2)], true, sock, opts);
        assert!(conf.contains("option splice-request\n  option splice-response\n"));
        assert!(!conf.contains("splice-auto"));
        assert!(conf.contains("stats socket /tmp/h.sock"));
        assert!(conf.contains("tune.pipesize 262144\ndefaults\n"));
        let plain = haproxy_conf(&[("iperf", 1, 2)], false, sock, opts);
        assert!(!plain.contains("splice") && !plain.contains("pipesize"));
        assert!(plain.contains("  tune.bufsize 65536\n"));
    }

    #[test]
    fn l4lb_config_has_one_worker_and_no_access_log() {
        let opts = Options {
            access_log: false,
            max_fds: 20_000,
        };
        let conf = l4lb_conf(&[("redis", 1, 2)], "", opts);
        assert!(conf.contains("worker_threads = 1"));
        // The default contender runs l4lb's defaults: no splice key.
        assert!(!conf.contains("splice"));
        let always = l4lb_conf(&[], Contender::L4lbKernelAlways.l4lb_splice_keys(), opts);
        assert!(always
            .contains("splice = \"auto\"\nsplice_after_bytes = 0\nsplice_after_time = \"0s\"\n"));
        assert!(conf.contains("access_log = false"));
        assert!(conf.contains("address = \"127.0.0.1:2\""));
    }
}
