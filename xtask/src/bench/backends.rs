//! The servers every contender fronts, all on 127.0.0.1: redis-server, a private
//! mariadbd with the sysbench tables, an iperf3 server, and a sink that accepts and
//! holds idle connections.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use socket2::{Domain, Socket, Type};

use super::proc::{free_port, run_bounded, Proc};

/// The TCP ports of the four services, either the backends' or a balancer's.
#[derive(Clone, Copy, Debug)]
pub struct Services {
    pub iperf: u16,
    pub redis: u16,
    pub mysql: u16,
    pub sink: u16,
}

impl Services {
    pub fn all(&self) -> [u16; 4] {
        [self.iperf, self.redis, self.mysql, self.sink]
    }
}

pub const SYSBENCH_USER: &str = "sbtest";
pub const SYSBENCH_TABLES: u32 = 4;
pub const SYSBENCH_TABLE_SIZE: u32 = 10_000;

/// Long-lived backends, started once per bench run.
pub struct Backends {
    pub redis_port: u16,
    pub mysql_port: u16,
    pub sink: Sink,
    redis: Proc,
    mysql: Proc,
}

impl Backends {
    pub fn start(dir: &Path) -> Result<Backends> {
        let redis_port = free_port()?;
        let mut redis = Proc::spawn(
            "redis-server",
            Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port"])
                .arg(redis_port.to_string())
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .args(["--maxclients", "20000", "--logfile", ""])
                .arg("--dir")
                .arg(dir),
            &dir.join("redis.log"),
        )?;
        redis.wait_listening(&[redis_port], Duration::from_secs(10))?;
        let (mysql, mysql_port) = start_mariadb(dir)?;
        Ok(Backends {
            redis_port,
            mysql_port,
            sink: Sink::start()?,
            redis,
            mysql,
        })
    }

    pub fn redis_pid(&self) -> u32 {
        self.redis.pid()
    }

    pub fn mysql_pid(&self) -> u32 {
        self.mysql.pid()
    }
}

/// A private mariadbd on a temp datadir, with a user and the sysbench tables.
fn start_mariadb(dir: &Path) -> Result<(Proc, u16)> {
    let data = dir.join("mariadb");
    let socket = dir.join("mariadb.sock");
    run_bounded(
        "mariadb-install-db",
        Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args([
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ]),
        dir,
        Duration::from_secs(120),
    )?;
    let port = free_port()?;
    let mut mysql = Proc::spawn(
        "mariadbd",
        Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", dir.join("mariadb.pid").display()))
            .arg(format!("--port={port}"))
            .args([
                "--user=root",
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
            ])
            .args(["--skip-log-bin", "--innodb-buffer-pool-size=128M"])
            .args([
                "--innodb-flush-log-at-trx-commit=2",
                "--max-connections=1000",
            ])
            // Every proxy readiness check or aborted run counts as a connect error.
            .arg("--max-connect-errors=1000000000"),
        &dir.join("mariadbd.log"),
    )?;
    mysql.wait_listening(&[port], Duration::from_secs(60))?;
    let sql = format!(
        "CREATE DATABASE sbtest; CREATE USER '{u}'@'127.0.0.1' IDENTIFIED BY '{u}'; \
         GRANT ALL ON sbtest.* TO '{u}'@'127.0.0.1';",
        u = SYSBENCH_USER
    );
    run_bounded(
        "mariadb-client",
        Command::new("mariadb")
            .arg("--no-defaults")
            .arg(format!("--socket={}", socket.display()))
            .args(["-u", "root", "-e", &sql]),
        dir,
        Duration::from_secs(30),
    )?;
    run_bounded(
        "sysbench-prepare",
        Command::new("sysbench")
            .arg("oltp_point_select")
            .args(sysbench_args(port))
            .args(["--threads=4", "prepare"]),
        dir,
        Duration::from_secs(120),
    )?;
    Ok((mysql, port))
}

/// Connection and table arguments shared by `prepare` and `run`.
pub fn sysbench_args(port: u16) -> Vec<String> {
    vec![
        "--mysql-host=127.0.0.1".into(),
        format!("--mysql-port={port}"),
        format!("--mysql-user={SYSBENCH_USER}"),
        format!("--mysql-password={SYSBENCH_USER}"),
        format!("--tables={SYSBENCH_TABLES}"),
        format!("--table-size={SYSBENCH_TABLE_SIZE}"),
    ]
}

/// An iperf3 server; a fresh one per contender, so a run that a proxy broke cannot
/// leave it busy for the next contender.
pub fn start_iperf(dir: &Path) -> Result<(Proc, u16)> {
    let port = free_port()?;
    let mut proc = Proc::spawn(
        "iperf3-server",
        Command::new("iperf3")
            .args(["-s", "-B", "127.0.0.1", "-p"])
            .arg(port.to_string()),
        &dir.join("iperf3-server.log"),
    )?;
    proc.wait_listening(&[port], Duration::from_secs(10))?;
    Ok((proc, port))
}

/// Accepts connections and holds them open without reading: the far end of the idle
/// sessions. Its thread stops when the sink drops.
pub struct Sink {
    pub port: u16,
    held: Arc<Mutex<Vec<TcpStream>>>,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    fn start() -> Result<Sink> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        let addr: SocketAddr = ([127, 0, 0, 1], 0).into();
        socket.bind(&addr.into())?;
        // Large backlog: a balancer opens its upstream connections in bursts.
        socket.listen(8192)?;
        let listener: TcpListener = socket.into();
        let port = listener.local_addr()?.port();
        let held = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (held, accepted, stop) = (held.clone(), accepted.clone(), stop.clone());
            std::thread::Builder::new()
                .name("idle-sink".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        if let Ok(conn) = conn {
                            held.lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(conn);
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
                .context("spawn the idle sink thread")?
        };
        Ok(Sink {
            port,
            held,
            accepted,
            stop,
            thread: Some(thread),
        })
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Closes every held connection.
    pub fn release(&self) {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the blocking accept so the thread sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
