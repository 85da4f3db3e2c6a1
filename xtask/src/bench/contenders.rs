//! The balancers under test, each started with its own configuration in a temp dir
//! and listening on fresh 127.0.0.1 ports in front of the same backends. Every proxy
//! gets one worker process / thread, least-connections balancing and its shipped
//! buffer defaults.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use serde::Serialize;

use super::backends::Services;
use super::cpu;
use super::proc::{free_port, Proc};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Contender {
    /// No balancer: the load generator talks to the backend.
    Direct,
    /// nginx stream, one worker process.
    Nginx,
    /// haproxy mode tcp, one thread.
    Haproxy,
    /// haproxy with `option splice-auto` (splice(2) through pipes).
    HaproxySplice,
    /// l4lb with splice = "auto" (kernel sockmap path when it loads).
    L4lbKernel,
    /// l4lb with splice = "off" (userspace copy).
    L4lbOff,
}

impl Contender {
    pub fn name(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::Nginx => "nginx",
            Contender::Haproxy => "haproxy",
            Contender::HaproxySplice => "haproxy-splice",
            Contender::L4lbKernel => "l4lb-kernel",
            Contender::L4lbOff => "l4lb-off",
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
        matches!(self, Contender::L4lbKernel | Contender::L4lbOff)
    }

    fn splice(self) -> &'static str {
        if self == Contender::L4lbKernel {
            "auto"
        } else {
            "off"
        }
    }
}

/// A started contender; the balancer process stops when this drops.
pub struct Running {
    pub fronts: Services,
    proc: Option<Proc>,
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
    let mut cmd = match who {
        Contender::Direct => {
            return Ok(Running {
                fronts: *backends,
                proc: None,
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
            std::fs::write(&conf, haproxy_conf(&routes, splice, opts))?;
            let mut c = Command::new("haproxy");
            c.arg("-db").arg("-f").arg(&conf);
            c
        }
        Contender::L4lbKernel | Contender::L4lbOff => {
            let conf = dir.join(format!("{name}.toml"));
            std::fs::write(&conf, l4lb_conf(&routes, who.splice(), opts))?;
            let mut c = Command::new(l4lb_bin);
            c.arg("run").arg("-c").arg(&conf);
            c
        }
    };
    let mut proc = Proc::spawn(name, &mut cmd, &log)?;
    proc.wait_listening(&fronts.all(), Duration::from_secs(20))?;
    Ok(Running {
        fronts,
        proc: Some(proc),
    })
}

type Route = (&'static str, u16, u16);

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
    for (name, front, back) in routes {
        let _ = writeln!(
            s,
            "  upstream {name} {{ least_conn; server 127.0.0.1:{back}; }}\n  \
             server {{ listen 127.0.0.1:{front}; proxy_pass {name}; }}"
        );
    }
    s.push_str("}\n");
    s
}

fn haproxy_conf(routes: &[Route], splice: bool, opts: Options) -> String {
    // haproxy refuses to start unless the fd limit covers 2 per connection plus, for
    // splicing, a pipe (2 fds) per 4 connections: size both variants alike for that.
    let conns = opts.max_fds.saturating_sub(200) * 2 / 5;
    let mut s = format!(
        "global\n  nbthread 1\n  maxconn {conns}\n\
         defaults\n  mode tcp\n  maxconn {conns}\n  timeout connect 5s\n  \
         timeout client 10m\n  timeout server 10m\n"
    );
    if splice {
        s.push_str("  option splice-auto\n");
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

fn l4lb_conf(routes: &[Route], splice: &str, opts: Options) -> String {
    // One worker thread like the single nginx worker and haproxy thread.
    let mut s = format!(
        "[global]\nworker_threads = 1\nmax_connections = {conns}\nlog_level = \"info\"\n\
         access_log = {log}\nsplice = \"{splice}\"\nworker_shutdown_timeout = \"1s\"\n",
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

/// Which path l4lb really carries sessions on: a short run with the access log on,
/// one redis PING through it, then the `path=` of its access log lines.
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
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = running.log();
        let paths = session_paths(&log);
        if !paths.is_empty() {
            let mut out = paths.join(", ");
            if log.contains("kernel splice path unavailable") {
                out.push_str(" (daemon: kernel splice path unavailable)");
            }
            return Ok(out);
        }
        if Instant::now() > deadline {
            bail!("l4lb wrote no access log line for the probe session; log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Distinct `path=` values of access log lines, in order of appearance.
fn session_paths(log: &str) -> Vec<String> {
    let mut paths: Vec<String> = Vec::new();
    for value in log
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("path="))
    {
        let value = value.trim_matches('"').to_string();
        if !paths.contains(&value) {
            paths.push(value);
        }
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_paths_are_collected_once_each() {
        let log = "INFO access: client=1 path=copy:off end=eof\n\
                   INFO access: client=2 path=kernel end=eof\n\
                   INFO access: client=3 path=copy:off end=eof\n";
        assert_eq!(session_paths(log), vec!["copy:off", "kernel"]);
    }

    #[test]
    fn l4lb_config_has_one_worker_and_no_access_log() {
        let opts = Options {
            access_log: false,
            max_fds: 20_000,
        };
        let conf = l4lb_conf(&[("redis", 1, 2)], "auto", opts);
        assert!(conf.contains("worker_threads = 1"));
        assert!(conf.contains("access_log = false"));
        assert!(conf.contains("address = \"127.0.0.1:2\""));
    }
}
