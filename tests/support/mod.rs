//! Shared pieces of the end-to-end tests: the real `l4lb` binary started on a
//! configuration, and real TCP/UDP backends on 127.0.0.1.
#![allow(dead_code)] // each test binary uses a different part of this module

pub mod consul;
pub mod etcd;
pub mod servers;
pub mod stream;
pub mod tls;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdTcpListener, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

pub fn l4lb_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_l4lb"))
}

/// A TCP port on 127.0.0.1 that was free a moment ago, for the daemon to bind later.
pub fn free_port() -> u16 {
    unused_port(|a| StdTcpListener::bind(a).is_ok())
}

/// A UDP port on 127.0.0.1 that was free a moment ago, for the daemon to bind later.
pub fn free_udp_port() -> u16 {
    unused_port(|a| std::net::UdpSocket::bind(a).is_ok())
}

/// Ports handed out come from below the kernel's ephemeral range: one taken from that
/// range and released can become the source port of any test's outgoing connection
/// before the daemon binds it (seen in CI as "Address already in use"). Each test
/// process walks the range from its own starting point, so parallel tests in it never
/// get the same port twice.
fn unused_port(free: impl Fn(SocketAddr) -> bool) -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(usize::MAX);
    const LOW: usize = 10_000;
    let high = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<usize>().ok())
        .unwrap_or(32_768)
        .max(LOW + 1_000);
    let span = high - LOW;
    let _ = NEXT.compare_exchange(
        usize::MAX,
        std::process::id() as usize * 997 % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if free(SocketAddr::from(([127, 0, 0, 1], port))) {
            return port;
        }
    }
    panic!("no free port in {LOW}..{high}");
}

/// A running `l4lb run` process, killed on drop.
pub struct Daemon {
    child: std::sync::Mutex<Option<Child>>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    log_path: PathBuf,
}

impl Daemon {
    /// Starts the daemon and waits until it reports that every listener is bound.
    /// (Waiting on the log rather than probing keeps test backends free of probe
    /// connections.)
    pub fn start(config: &str) -> Daemon {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Daemon {
        let d = Self::spawn(config, env);
        d.wait_started();
        d
    }

    /// Starts the daemon through `launcher` (see [`Daemon::spawn_via`]) and waits as
    /// [`Daemon::start`].
    pub fn start_via(config: &str, env: &[(&str, &str)], launcher: &[String]) -> Daemon {
        let d = Self::spawn_via(config, env, launcher);
        d.wait_started();
        d
    }

    /// Starts the daemon inside network namespace `netns` and waits as [`Daemon::start`].
    pub fn start_in_netns(netns: &str, config: &str) -> Daemon {
        let launcher = ["ip", "netns", "exec", netns].map(String::from);
        let d = Self::spawn_via(config, &[], &launcher);
        d.wait_started();
        d
    }

    /// Starts the daemon without waiting for anything.
    pub fn spawn(config: &str, env: &[(&str, &str)]) -> Daemon {
        Self::spawn_via(config, env, &[])
    }

    fn wait_started(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log().contains("l4lb started") {
            if let Some(status) = self.exited() {
                panic!(
                    "l4lb exited ({status}) before starting; log:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                panic!("l4lb did not start; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts `LAUNCHER... l4lb run -c CONFIG` (e.g. setpriv with other credentials)
    /// without waiting. With a launcher, the binary is copied next to the configuration
    /// in a directory anyone may read, so an unprivileged user can run it wherever the
    /// build lives.
    pub fn spawn_via(config: &str, env: &[(&str, &str)], launcher: &[String]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("l4lb.toml");
        std::fs::write(&config_path, config).expect("write config");
        let log_path = dir.path().join("l4lb.log");
        let log = std::fs::File::create(&log_path).expect("create log");
        let mut cmd = match launcher.split_first() {
            None => Command::new(l4lb_bin()),
            Some((program, args)) => {
                use std::os::unix::fs::PermissionsExt;
                let bin = dir.path().join("l4lb");
                std::fs::copy(l4lb_bin(), &bin).expect("copy l4lb");
                for (path, mode) in [(dir.path(), 0o755), (config_path.as_path(), 0o644)] {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                        .expect("chmod");
                }
                let mut cmd = Command::new(program);
                cmd.args(args).arg(bin);
                cmd
            }
        };
        cmd.arg("run")
            .arg("-c")
            .arg(&config_path)
            .env(
                "L4LB_LOG",
                std::env::var("L4LB_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn l4lb");
        Daemon {
            child: std::sync::Mutex::new(Some(child)),
            dir,
            config_path,
            log_path,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child_lock().as_ref().map_or(0, |c| c.id() as i32)
    }

    fn child_lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log contains `needle` `count` times.
    pub fn wait_log_count(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().matches(needle).count() >= count {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_log_count(needle, 1, timeout)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }

    /// Rewrites the config file and sends SIGHUP; waits for the reload's log line.
    pub fn reload(&self, config: &str) {
        let before = self.log().matches("configuration reloaded").count()
            + self.log().matches("reload rejected").count();
        std::fs::write(&self.config_path, config).expect("rewrite config");
        self.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log().matches("configuration reloaded").count()
            + self.log().matches("reload rejected").count()
            <= before
        {
            assert!(
                Instant::now() < deadline,
                "reload not logged; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn exited(&self) -> Option<ExitStatus> {
        self.child_lock()
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&self, timeout: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        self.wait_exit(timeout)
    }

    /// Resident memory of the daemon in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// CPU time (user + system) the daemon has used so far, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are 14th and 15th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        ticks as f64 / hz
    }

    /// The `[admin] listen` address of the daemon's configuration.
    pub fn admin(&self) -> SocketAddr {
        let text = std::fs::read_to_string(&self.config_path).expect("read config");
        let table: toml::Table = toml::from_str(&text).expect("config toml");
        table["admin"]["listen"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .expect("the test config has [admin] listen")
    }

    /// The daemon's `/metrics`, parsed as Prometheus does.
    pub fn scrape(&self) -> Scrape {
        scrape(self.admin())
    }

    /// The access log lines (target `access`) written so far.
    pub fn access_lines(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(" access: "))
            .map(str::to_string)
            .collect()
    }

    /// Waits up to `timeout` for at least `count` access log lines and returns them all.
    pub async fn wait_access_lines(&self, count: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.access_lines();
            if lines.len() >= count {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {count} access log lines; log:\n{}",
                lines.len(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Open file descriptors of the daemon.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, |d| d.count())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child_lock().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What a test backend does with a connection.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Echo everything back; half-close when the client does.
    Echo,
    /// Write the tag and a newline, then echo.
    Tagged(String),
    /// Accept, then reset at once.
    Reset,
    /// Read and discard everything; reply with the byte count when the client closes.
    Count,
}

/// A TCP backend on 127.0.0.1 counting accepted and currently open connections.
pub struct Backend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub open: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Backend {
    pub async fn start(behaviour: Behaviour) -> Backend {
        Self::start_on("127.0.0.1:0".parse().expect("addr"), behaviour).await
    }

    pub async fn start_on(addr: SocketAddr, behaviour: Behaviour) -> Backend {
        let listener = TcpListener::bind(addr).await.expect("bind backend");
        let addr = listener.local_addr().expect("backend addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (acc, opn) = (Arc::clone(&accepted), Arc::clone(&open));
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                opn.fetch_add(1, Ordering::SeqCst);
                let opn = Arc::clone(&opn);
                let b = behaviour.clone();
                tokio::spawn(async move {
                    serve_one(sock, b).await;
                    opn.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Backend {
            addr,
            accepted,
            open,
            task,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_one(mut sock: TcpStream, behaviour: Behaviour) {
    let _ = sock.set_nodelay(true);
    match behaviour {
        Behaviour::Reset => {
            let _ = sock.set_zero_linger();
            drop(sock);
        }
        Behaviour::Count => {
            let mut buf = vec![0u8; 256 * 1024];
            let mut n: u64 = 0;
            while let Ok(k) = sock.read(&mut buf).await {
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            let _ = sock.write_all(format!("{n}\n").as_bytes()).await;
            let _ = sock.shutdown().await;
        }
        Behaviour::Echo | Behaviour::Tagged(_) => {
            if let Behaviour::Tagged(tag) = &behaviour {
                if sock.write_all(format!("{tag}\n").as_bytes()).await.is_err() {
                    return;
                }
            }
            let (mut r, mut w) = sock.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        }
    }
}

/// Connects, reads the tag line a `Tagged` backend writes, and returns it, keeping the
/// connection open in the returned stream.
pub async fn connect_tagged(addr: SocketAddr) -> std::io::Result<(String, TcpStream)> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))??;
    let tag = read_line(&mut s).await?;
    if tag.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before tag",
        ));
    }
    Ok((tag, s))
}

/// Sends `payload`, half-closes, and returns everything read back until EOF.
pub async fn roundtrip(addr: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(payload).await?;
        w.shutdown().await
    };
    let mut out = Vec::new();
    let recv = r.read_to_end(&mut out);
    let (a, b) = tokio::join!(send, recv);
    a?;
    b?;
    Ok(out)
}

/// The value of `name=` in a log line (up to the next space).
pub fn log_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=");
    let start = line.find(&key)? + key.len();
    Some(
        line[start..]
            .split(' ')
            .next()
            .unwrap_or("")
            .trim_matches('"'),
    )
}

/// A deterministic pseudo-random payload.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A UDP backend echoing each datagram prefixed with its tag.
pub struct UdpBackend {
    pub addr: SocketAddr,
    pub received: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl UdpBackend {
    pub async fn start(tag: &str) -> UdpBackend {
        let sock = UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind udp backend");
        let addr = sock.local_addr().expect("udp addr");
        let received = Arc::new(AtomicUsize::new(0));
        let rec = Arc::clone(&received);
        let tag = tag.as_bytes().to_vec();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                rec.fetch_add(1, Ordering::SeqCst);
                let mut reply = tag.clone();
                reply.push(b':');
                reply.extend_from_slice(&buf[..n]);
                let _ = sock.send_to(&reply, from).await;
            }
        });
        UdpBackend {
            addr,
            received,
            task,
        }
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Blocking HTTP GET on loopback, for `upstream_show` and the admin API.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path, &[], "")
}

/// Minimal blocking HTTP/1.1 request; returns status and body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = StdTcpStream::connect(addr).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("send http");
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, dechunk(&text, body))
}

fn dechunk(head: &str, body: String) -> String {
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body;
    }
    let mut out = String::new();
    let mut rest = body.as_str();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// Path of a file inside the repository.
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Connects from a chosen loopback source address (any 127.x.y.z works on Linux), so
/// tests can act as many different clients.
pub async fn connect_from(src: std::net::IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(src, 0))?;
    sock.connect(addr).await
}

/// Reads one `\n`-terminated line.
pub async fn read_line(s: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .map_err(|_| std::io::Error::other("read timed out"))??;
        if n == 0 || byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
    }
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes; returns how long it took.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Some(start.elapsed());
        }
        if start.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub use prometheus_parse::Scrape;

/// `GET /metrics` from an admin listener, parsed by a Prometheus text-format parser.
pub fn scrape(admin: SocketAddr) -> Scrape {
    let (status, body) = http_get(admin, "/metrics");
    assert_eq!(status, 200, "{body}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("prometheus text format")
}

/// The sum of the samples named `name` whose labels include all of `labels`; `None`
/// when there is no such sample.
pub fn metric(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for sample in s.samples.iter().filter(|x| x.metric == name) {
        if labels.iter().all(|(k, v)| sample.labels.get(k) == Some(*v)) {
            let v = match &sample.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(h) => {
                    h.iter().map(|b| b.count).fold(0.0, f64::max)
                }
                prometheus_parse::Value::Summary(_) => 0.0,
            };
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// The `upstream_show` text of one upstream.
pub fn show(addr: SocketAddr, upstream: &str) -> String {
    http_get(addr, &format!("/upstream_show?upstream={upstream}")).1
}

/// Opens `n` connections one after another and returns the tag each got ("ERR" when
/// the connection failed or closed without a tag).
pub async fn tags(addr: SocketAddr, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(
            connect_tagged(addr)
                .await
                .map_or_else(|_| "ERR".to_string(), |(t, _)| t),
        );
    }
    out
}
