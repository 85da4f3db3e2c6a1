//! Real servers for the tests, on loopback: redis-server and a private mariadbd.
//! Each is killed when its guard drops.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// A child process killed (and reaped) on drop.
pub struct Server {
    pub addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_listening(addr: SocketAddr, child: &mut Child, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "{what} did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(cmd: &mut Command, log: &Path, what: &str) -> Child {
    let out = std::fs::File::create(log).expect("server log");
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().expect("clone log"))
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what} (cargo xtask test installs it): {e}"))
}

pub fn redis() -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let log = dir.path().join("redis.log");
    let mut child = spawn(
        Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--logfile", ""])
            .arg("--dir")
            .arg(dir.path()),
        &log,
        "redis-server",
    );
    wait_listening(addr, &mut child, "redis-server", &log);
    Server {
        addr,
        child,
        _dir: dir,
    }
}

pub fn mariadb() -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let log = dir.path().join("mariadbd.log");
    let status = Command::new("mariadb-install-db")
        .arg("--no-defaults")
        .arg(format!("--datadir={}", data.display()))
        .args(["--user=root", "--skip-test-db"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("mariadb-install-db (cargo xtask test installs mariadb-server-core)");
    assert!(status.success(), "mariadb-install-db failed: {status}");
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut child = spawn(
        Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", dir.path().join("sock").display()))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .arg(format!("--port={port}"))
            .args(["--user=root", "--bind-address=127.0.0.1"])
            .args(["--skip-log-bin", "--innodb-buffer-pool-size=16M"]),
        &log,
        "mariadbd",
    );
    wait_listening(addr, &mut child, "mariadbd", &log);
    Server {
        addr,
        child,
        _dir: dir,
    }
}
