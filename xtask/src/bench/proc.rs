//! External processes under an RAII guard: everything the harness starts is stopped
//! when its guard drops (on success, on error, on panic), and dies with the harness
//! (`PR_SET_PDEATHSIG`) if the harness itself is killed.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::cpu;

/// A running child process, terminated on drop together with the processes it forked.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc> {
        let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        Self::spawn_with(name, cmd, log, out, err)
    }

    fn spawn_with(name: &str, cmd: &mut Command, log: &Path, out: File, err: File) -> Result<Proc> {
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: prctl(2) is async-signal-safe and touches only the child's own state.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({cmd:?})"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines of the process's output, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails with the process's log if it has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.exited() {
            Some(status) => bail!(
                "{} exited ({status}); its log:\n{}",
                self.name,
                self.log_tail()
            ),
            None => Ok(()),
        }
    }

    /// Waits until every port is in LISTEN state on 127.0.0.1.
    pub fn wait_listening(&mut self, ports: &[u16], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let listening = listening_ports()?;
            if ports.iter().all(|p| listening.contains(p)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {ports:?} within {timeout:?}; its log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // A pid_t always holds a child pid; kill(2) on our own child cannot harm others.
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        // Forked workers (nginx) are collected first: they may outlive a killed parent.
        let forked = cpu::descendants(self.pid());
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.exited().is_none() {
            eprintln!("bench: {} ignored SIGTERM for 5 s; killing it", self.name);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for pid in forked.into_iter().filter(|&p| p != self.pid()) {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                if Path::new(&format!("/proc/{pid}")).exists() {
                    // SAFETY: kill(2) has no memory-safety preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

/// Runs a load generator to completion with a hard time limit; returns its stdout.
/// Its stdout goes to a file, not a pipe, so a large output cannot block it.
pub fn run_bounded(name: &str, cmd: &mut Command, dir: &Path, limit: Duration) -> Result<String> {
    let out_path = dir.join(format!("{name}.out"));
    let err_path = dir.join(format!("{name}.err"));
    let out = File::create(&out_path)?;
    let err = File::create(&err_path)?;
    let mut proc = Proc::spawn_with(name, cmd, &err_path, out, err)?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = proc.exited() {
            break status;
        }
        if Instant::now() > deadline {
            bail!(
                "{name} did not finish within {limit:?} (stopped); stderr:\n{}",
                proc.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    if !status.success() {
        bail!(
            "{name} failed ({status}); stderr:\n{}\nstdout:\n{}",
            proc.log_tail(),
            tail(&stdout, 15)
        );
    }
    Ok(stdout)
}

pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A TCP port on 127.0.0.1 that was free a moment ago, for a server started next. It
/// comes from below the kernel's ephemeral range: a port from that range, once
/// released, can become the source port of a workload's connection before the server
/// binds it (the end-to-end tests saw that in CI). The bench starts one server at a
/// time, so walking the range from a point that depends on the process is enough.
pub fn free_port() -> Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(LOW).max(1_000);
    let start = std::process::id().wrapping_mul(7_919);
    for _ in 0..span {
        let port = LOW + start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free TCP port on 127.0.0.1 in {LOW}..{}", LOW + span)
}

/// Local ports in LISTEN state (IPv4), from /proc/net/tcp: a readiness check that needs
/// no connection (an iperf3 server reports an error for every probe connection).
fn listening_ports() -> Result<Vec<u16>> {
    let table = std::fs::read_to_string("/proc/net/tcp").context("read /proc/net/tcp")?;
    Ok(table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            let port = local.rsplit(':').next()?;
            (state == "0A")
                .then(|| u16::from_str_radix(port, 16).ok())
                .flatten()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::free_port;

    #[test]
    fn ports_come_from_below_the_ephemeral_range_and_are_free() {
        let ephemeral: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .expect("port range")
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .expect("first port");
        let (a, b) = (free_port().expect("a port"), free_port().expect("another"));
        assert_ne!(a, b);
        for port in [a, b] {
            assert!((10_000..ephemeral).contains(&port), "{port}");
            std::net::TcpListener::bind(("127.0.0.1", port)).expect("still free");
        }
    }
}
