//! Binary upgrade without dropping a session (`kill -USR2`, `l4lb upgrade`).
//!
//! The running process starts the binary at the path it was started from, with the
//! same arguments, and a handover channel (`wire`). The new process checks its
//! configuration and loads the kernel path, then says hello with its protocol version.
//! Only then does anything move, in this order:
//!
//! 1. upstream state (server sets and where they came from, failure windows, health),
//!    the listening sockets (both processes hold them: the kernel queues connections
//!    while neither accepts, so none is refused), the admin API's socket, and the UDP
//!    listeners with their sessions (the old process stops reading them first);
//! 2. the new process serves every listener and says so; the old one stops accepting;
//! 3. every TCP session stops at a clean point (the copy path writes out what it read;
//!    the kernel path takes the sockets out of the sockmap without losing a byte) and
//!    travels with its upstream, server, byte counts, age and path. The new process
//!    confirms each one before the old process lets go of it, so a handover that
//!    breaks leaves each session in exactly one process.
//!
//! Anything that fails before step 2 ends the new process and leaves the old one
//! serving everything. Sessions that cannot reach a clean point in time (a peer that
//! stopped reading) stay in the old process, which drains them as on SIGTERM.

pub mod wire;

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::Child;
use tokio::time::{timeout, Instant};
use tracing::{info, warn};

use wire::{Channel, Msg};

/// How long the new binary may take to check its configuration and load the kernel
/// path, and then to open its listeners.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long sessions get to reach a clean point; those that do not stay here.
const SESSIONS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the new process may take to confirm one session or to finish.
pub(crate) const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The binary and arguments this process was started with: what an upgrade runs.
#[derive(Clone, Debug)]
pub struct Exe {
    pub path: PathBuf,
    pub args: Vec<OsString>,
}

impl Exe {
    /// Read at start: once the file is replaced, /proc/self/exe names the old one.
    pub fn current() -> std::io::Result<Exe> {
        Ok(Exe {
            path: std::env::current_exe()?,
            args: std::env::args_os().skip(1).collect(),
        })
    }
}

/// A TCP listening socket the old process handed over, registered with the runtime.
pub fn tcp_listener(fd: OwnedFd) -> std::io::Result<tokio::net::TcpListener> {
    let std = std::net::TcpListener::from(fd);
    std.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(std)
}

/// A UDP socket the old process handed over, registered with the runtime.
pub fn udp_socket(fd: OwnedFd) -> std::io::Result<tokio::net::UdpSocket> {
    let std = std::net::UdpSocket::from(fd);
    std.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(std)
}

/// The new process while the old one still runs: started, with its channel.
pub struct Spawned {
    pub child: Child,
    pub channel: Channel,
}

impl Spawned {
    pub fn start(exe: &Exe) -> anyhow::Result<Spawned> {
        let (mine, theirs) = wire::pair().context("cannot create the handover channel")?;
        wire::inheritable(&theirs).context("cannot pass the handover channel")?;
        let child = tokio::process::Command::new(&exe.path)
            .args(&exe.args)
            .env(wire::ENV_FD, theirs.as_raw_fd().to_string())
            .spawn()
            .with_context(|| format!("cannot start {}", exe.path.display()))?;
        drop(theirs);
        Ok(Spawned {
            child,
            channel: Channel::new(mine)?,
        })
    }

    /// Waits for the new process's hello and checks its version; returns its pid and
    /// the identity of the kernel path it loaded.
    pub async fn hello(&mut self) -> anyhow::Result<(u32, Option<String>)> {
        let (msg, _) = self.recv(START_TIMEOUT, "its configuration check").await?;
        check_hello(&self.channel, msg).await
    }

    /// The next message, or why there is none: the new process exited (with its
    /// status), broke the channel, or took longer than `limit` for `what`.
    pub async fn recv(
        &mut self,
        limit: Duration,
        what: &str,
    ) -> anyhow::Result<(Msg, Vec<OwnedFd>)> {
        match timeout(limit, self.channel.recv()).await {
            Ok(Ok(got)) => Ok(got),
            Ok(Err(e)) => {
                // The channel closes as the process exits: name its status if it did.
                let status = timeout(Duration::from_secs(2), self.child.wait()).await;
                match status {
                    Ok(Ok(s)) => bail!("the new process exited ({s}) during {what}"),
                    _ => Err(anyhow::Error::from(e).context(format!("during {what}"))),
                }
            }
            Err(_) => bail!("the new process took longer than {limit:?} for {what}"),
        }
    }

    /// Ends a new process that will not take over.
    pub async fn abandon(mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = self.child.start_kill();
        let _ = timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// Accepts a hello of this process's protocol version; refuses any other, telling
/// the new process why, rather than misreading what it would send.
async fn check_hello(channel: &Channel, msg: Msg) -> anyhow::Result<(u32, Option<String>)> {
    match msg {
        Msg::Hello {
            version,
            pid,
            kernel,
        } if version == wire::VERSION => Ok((pid, kernel)),
        Msg::Hello { version, .. } => {
            let why = format!(
                "handover protocol version {version} is not this process's {}",
                wire::VERSION
            );
            let _ = channel.send(&Msg::Refused { why: why.clone() }, &[]).await;
            bail!(why)
        }
        other => bail!("expected the new process's hello, got {other:?}"),
    }
}

/// What the new process answered for a session: `true` when it took it.
pub fn session_answer(msg: Msg) -> anyhow::Result<bool> {
    match msg {
        Msg::Adopted => Ok(true),
        Msg::NotAdopted { why } => {
            warn!(reason = %why, "the new process did not take a session; it stays here");
            Ok(false)
        }
        other => bail!("expected a session's answer, got {other:?}"),
    }
}

/// Waits until every session task ended or parked, or `SESSIONS_TIMEOUT` passed.
pub fn sessions_deadline() -> Instant {
    Instant::now() + SESSIONS_TIMEOUT
}

/// Ends the handover: the new process writes the pid file and answers with its pid.
pub async fn finish(spawned: &mut Spawned) -> anyhow::Result<u32> {
    spawned.channel.send(&Msg::Done, &[]).await?;
    match spawned.recv(REPLY_TIMEOUT, "its start").await?.0 {
        Msg::Started { pid } => {
            info!(
                pid,
                "the new process runs; this one exits once its remaining sessions end"
            );
            Ok(pid)
        }
        other => bail!("expected the new process's start, got {other:?}"),
    }
}

/// Writes `pid` to `path` through a temporary file, so a reader never sees half of it.
pub fn write_pid_file(path: &std::path::Path, pid: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{pid}\n"))?;
    std::fs::rename(&tmp, path)
}

/// Removes the pid file at exit if it still names this process (after an upgrade it
/// names the new one).
pub fn remove_pid_file(path: &std::path::Path) {
    let ours = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        == Some(std::process::id());
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

/// Where the old process records how its last upgrade ended, for `l4lb upgrade`: the
/// pid file's path with `.upgrade` added.
pub fn status_path(pid_file: &std::path::Path) -> PathBuf {
    let mut name = pid_file.as_os_str().to_owned();
    name.push(".upgrade");
    PathBuf::from(name)
}

/// Records how an upgrade ended: `ok <new pid>`, or `failed: <why>`.
pub fn write_status(pid_file: &std::path::Path, line: &str) {
    let path = status_path(pid_file);
    let tmp = path.with_extension("tmp");
    let written =
        std::fs::write(&tmp, format!("{line}\n")).and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        warn!(path = %path.display(), error = %e, "cannot record the upgrade's outcome");
    }
}

/// `l4lb upgrade`: signals the process named by the configuration's pid file and waits
/// for it to record the outcome. Returns (old pid, new pid).
pub fn request(config: &std::path::Path, limit: Duration) -> anyhow::Result<(u32, u32)> {
    // Only the pid file is read here: checking the rest is the new process's job (it
    // may need secrets from the daemon's environment).
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not TOML", config.display()))?;
    let path = table
        .get("global")
        .and_then(|g| g.get("pid_file"))
        .and_then(|p| p.as_str())
        .map(PathBuf::from)
        .with_context(|| {
            format!(
                "{} sets no [global] pid_file: set one, or send SIGUSR2 to the daemon's pid",
                config.display()
            )
        })?;
    let old: u32 = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .with_context(|| format!("no pid in {}", path.display()))?;
    // A pid file left by a daemon that was killed may name another process by now, and
    // SIGUSR2 would end it.
    let comm = std::fs::read_to_string(format!("/proc/{old}/comm")).unwrap_or_default();
    if !comm.trim_end().starts_with("l4lb") {
        bail!(
            "process {old} (from {}) is {:?}, not l4lb: the pid file is stale",
            path.display(),
            comm.trim_end()
        );
    }
    let status = status_path(&path);
    let _ = std::fs::remove_file(&status);
    let target = nix::unistd::Pid::from_raw(i32::try_from(old)?);
    nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGUSR2)
        .with_context(|| format!("cannot signal process {old} (from {})", path.display()))?;
    let deadline = std::time::Instant::now() + limit;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if let Ok(line) = std::fs::read_to_string(&status) {
            let line = line.trim();
            return match line.strip_prefix("ok ").and_then(|p| p.parse().ok()) {
                Some(new) => Ok((old, new)),
                None => bail!("process {old} keeps serving: the upgrade {line}"),
            };
        }
        if !std::path::Path::new(&format!("/proc/{old}")).exists() {
            bail!("process {old} exited without recording the upgrade's outcome");
        }
        if std::time::Instant::now() >= deadline {
            bail!("process {old} did not finish the upgrade within {limit:?}; its log says why");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn another_protocol_version_is_refused_with_the_reason() {
        let (a, b) = wire::pair().unwrap();
        let (old, new) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        let hello = Msg::Hello {
            version: wire::VERSION + 1,
            pid: 1,
            kernel: None,
        };
        let err = check_hello(&old, hello).await.unwrap_err().to_string();
        assert!(
            err.contains(&format!("version {}", wire::VERSION + 1)),
            "{err}"
        );
        match new.recv().await.unwrap().0 {
            Msg::Refused { why } => assert_eq!(why, err),
            other => panic!("{other:?}"),
        }
        let same = Msg::Hello {
            version: wire::VERSION,
            pid: 42,
            kernel: Some("k".into()),
        };
        assert_eq!(
            check_hello(&old, same).await.unwrap(),
            (42, Some("k".to_string()))
        );
    }
}
