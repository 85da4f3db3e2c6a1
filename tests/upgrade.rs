//! Binary upgrade (`kill -USR2`, `l4lb upgrade`): established TCP sessions on both
//! paths, UDP sessions and the listeners move to the new process without a dropped
//! session, a lost or repeated byte, or a refused connection; a new binary that cannot
//! start leaves the old process serving.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::consul::Consul;
use support::stream::Stream;
use support::{free_port, free_udp_port, http, show, Backend, Behaviour, Daemon, UdpBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const TOKEN: &str = "upgrade-test-token";
/// Each streaming session writes this much every `TICK` (160 KiB/s each way).
const CHUNK: usize = 4096;
const TICK: Duration = Duration::from_millis(25);

/// The process that serves now, read from the pid file: upgrades replace it, and the
/// last one is killed when the test ends however it ends.
struct Current {
    pid_file: PathBuf,
}

impl Current {
    fn pid(&self) -> i32 {
        std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid in {}", self.pid_file.display()))
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Whether `pid` has exited (a zombie nobody reaped yet counts as exited).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// Runs `l4lb upgrade` on `config`: (success, stdout + stderr).
fn upgrade_cmd(config: &Path) -> (bool, String) {
    let out = std::process::Command::new(support::l4lb_bin())
        .args(["upgrade", "--timeout", "60", "-c"])
        .arg(config)
        .output()
        .expect("run l4lb upgrade");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// What a streaming session saw.
#[derive(Debug, Default)]
struct Seen {
    sent: u64,
    received: u64,
    /// Longest time between two reads while the stream ran.
    longest_gap: Duration,
}

/// A session that streams `seed` to an echo backend and checks every echoed byte,
/// until `stop`; then half-closes and reads the rest.
async fn stream_session(
    addr: SocketAddr,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> Result<Seen, String> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut r, mut w) = s.into_split();
    let sent = Arc::new(AtomicU64::new(0));
    let sent_w = Arc::clone(&sent);
    let stop_w = Arc::clone(&stop);
    let writer = async move {
        let mut stream = Stream::new(seed);
        let mut buf = vec![0u8; CHUNK];
        while !stop_w.load(Ordering::Relaxed) {
            stream.fill(&mut buf);
            w.write_all(&buf).await.map_err(|e| format!("write: {e}"))?;
            sent_w.fetch_add(CHUNK as u64, Ordering::Relaxed);
            tokio::time::sleep(TICK).await;
        }
        w.shutdown().await.map_err(|e| format!("shutdown: {e}"))
    };
    let reader = async move {
        let mut expected = Stream::new(seed);
        let mut want = vec![0u8; CHUNK];
        let mut have = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        let mut received = 0u64;
        let mut last = Instant::now();
        let mut longest = Duration::ZERO;
        loop {
            let n = tokio::time::timeout(Duration::from_secs(30), r.read(&mut buf))
                .await
                .map_err(|_| format!("no echo for 30 s after {received} bytes"))?
                .map_err(|e| format!("read after {received} bytes: {e}"))?;
            if n == 0 {
                break;
            }
            if !stop.load(Ordering::Relaxed) {
                longest = longest.max(last.elapsed());
            }
            last = Instant::now();
            for &b in &buf[..n] {
                if have == 0 {
                    expected.fill(&mut want);
                }
                if b != want[have] {
                    return Err(format!("byte {received} differs"));
                }
                have = (have + 1) % CHUNK;
                received += 1;
            }
        }
        Ok::<_, String>((received, longest))
    };
    let (written, read) = tokio::join!(writer, reader);
    written?;
    let (received, longest_gap) = read?;
    let sent = sent.load(Ordering::Relaxed);
    if received != sent {
        return Err(format!("sent {sent} bytes, {received} came back"));
    }
    Ok(Seen {
        sent,
        received,
        longest_gap,
    })
}

/// A UDP client: one datagram every 50 ms, each answered by the same backend (the
/// session stays where it was). Returns (datagrams answered, problems).
async fn udp_client(addr: SocketAddr, id: usize, stop: Arc<AtomicBool>) -> (u64, Vec<String>) {
    let sock = UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind udp client");
    sock.connect(addr).await.expect("connect udp client");
    let mut problems = Vec::new();
    let mut tag: Option<String> = None;
    let mut answered = 0u64;
    let mut buf = vec![0u8; 1024];
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let msg = format!("c{id}-{n}");
        sock.send(msg.as_bytes()).await.expect("udp send");
        match tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf)).await {
            Ok(Ok(len)) => {
                let reply = String::from_utf8_lossy(&buf[..len]).to_string();
                match reply.split_once(':') {
                    Some((t, body)) if body == msg => {
                        if tag.get_or_insert_with(|| t.to_string()) != t {
                            problems.push(format!("{msg} answered by {t}, not {tag:?}"));
                        }
                        answered += 1;
                    }
                    _ => problems.push(format!("{msg}: reply {reply:?}")),
                }
            }
            Ok(Err(e)) => problems.push(format!("{msg}: {e}")),
            Err(_) => problems.push(format!("{msg}: no reply in 5 s")),
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (answered, problems)
}

/// New connections in a tight loop (connect, one byte there and back, close) until
/// `stop`. Returns (connections, failures).
async fn connect_loop(addr: SocketAddr, stop: Arc<AtomicBool>) -> (u64, Vec<String>) {
    let (mut ok, mut failed) = (0u64, Vec::new());
    while !stop.load(Ordering::Relaxed) {
        let once = async {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(b"x").await?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            Ok::<_, std::io::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(5), once).await {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => failed.push(e.to_string()),
            Err(_) => failed.push("timed out".into()),
        }
    }
    (ok, failed)
}

/// Active connections per server of `upstream`, from the admin API.
fn active(admin: SocketAddr, upstream: &str) -> Vec<(String, u64)> {
    let auth = format!("Bearer {TOKEN}");
    let (status, body) = http(
        admin,
        "GET",
        &format!("/api/upstreams/{upstream}"),
        &[("Authorization", &auth)],
        "",
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("admin json");
    v["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .map(|s| {
            (
                s["address"].as_str().unwrap_or_default().to_string(),
                s["active"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

/// Sends SIGUSR2 to the current process and returns the outcome it records.
fn signal_upgrade(d: &Daemon, current: &Current) -> String {
    let status = PathBuf::from(format!("{}.upgrade", current.pid_file.display()));
    let _ = std::fs::remove_file(&status);
    // SAFETY: kill(2) has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(current.pid(), libc::SIGUSR2) }, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(line) = std::fs::read_to_string(&status) {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no upgrade outcome; log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGUSR2 to the current process and waits until the new one recorded its
/// start and the old one exited. Returns the new pid.
fn upgrade_by_signal(d: &Daemon, current: &Current) -> i32 {
    let old = current.pid();
    let line = signal_upgrade(d, current);
    let deadline = Instant::now() + Duration::from_secs(60);
    let new: i32 = line
        .trim()
        .strip_prefix("ok ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("upgrade failed: {line}; log:\n{}", d.log()));
    assert_eq!(current.pid(), new, "the pid file names the new process");
    while !gone(old) {
        // The first process is the test's child: reap it.
        let _ = d.exited();
        assert!(
            Instant::now() < deadline,
            "process {old} did not exit; log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    new
}

/// The config of the tests: `kernel` and `copy` listeners over an echo upstream, a
/// UDP listener, the admin API and a pid file.
fn config(dir: &Path, p: &Ports, echo: &[SocketAddr], udp: &[SocketAddr]) -> String {
    let list = |addrs: &[SocketAddr]| {
        addrs
            .iter()
            .map(|a| format!("{{ address = \"{a}\" }}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        r#"
[global]
pid_file = "{pid}"

[admin]
listen = "127.0.0.1:{admin}"
token_env = "L4LB_ADMIN_TOKEN"

[upstream.db]
balance = "least_conn"
servers = [{echo}]

[upstream.dns]
servers = [{udp}]

[[server]]
listen = "127.0.0.1:{kernel}"
proxy_pass = "db"
splice = "required"
splice_after_time = "0"

[[server]]
listen = "127.0.0.1:{copy}"
proxy_pass = "db"
splice = "off"

[[server]]
listen = "127.0.0.1:{udp_port}"
protocol = "udp"
proxy_pass = "dns"
"#,
        pid = dir.join("l4lb.pid").display(),
        admin = p.admin,
        echo = list(echo),
        udp = list(udp),
        kernel = p.kernel,
        copy = p.copy,
        udp_port = p.udp,
    )
}

struct Ports {
    admin: u16,
    kernel: u16,
    copy: u16,
    udp: u16,
}

impl Ports {
    fn new() -> Ports {
        Ports {
            admin: free_port(),
            kernel: free_port(),
            copy: free_port(),
            udp: free_udp_port(),
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }
}

/// Streaming sessions, UDP clients and a connect loop running against a daemon.
struct Load {
    stop: Arc<AtomicBool>,
    kernel: Vec<tokio::task::JoinHandle<Result<Seen, String>>>,
    copy: Vec<tokio::task::JoinHandle<Result<Seen, String>>>,
    udp: Vec<tokio::task::JoinHandle<(u64, Vec<String>)>>,
    connects: Option<tokio::task::JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    fn start(p: &Ports, sessions_each: usize, udp_clients: usize, connect_loop_on: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let spawn = |port: u16, base: u64| {
            (0..sessions_each)
                .map(|i| {
                    tokio::spawn(stream_session(
                        Ports::addr(port),
                        base + i as u64,
                        Arc::clone(&stop),
                    ))
                })
                .collect()
        };
        Load {
            kernel: spawn(p.kernel, 1_000),
            copy: spawn(p.copy, 2_000),
            udp: (0..udp_clients)
                .map(|i| tokio::spawn(udp_client(Ports::addr(p.udp), i, Arc::clone(&stop))))
                .collect(),
            connects: connect_loop_on
                .then(|| tokio::spawn(connect_loop(Ports::addr(p.copy), Arc::clone(&stop)))),
            stop,
        }
    }

    /// Stops everything and checks it: every session byte-exact, every datagram
    /// answered by its session's backend, every new connection served. Returns the
    /// longest gap a kernel-path and a copy-path session saw.
    async fn finish(self) -> (Duration, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let mut problems = Vec::new();
        let mut gaps = [Duration::ZERO; 2];
        for (i, set) in [self.kernel, self.copy].into_iter().enumerate() {
            for (n, h) in set.into_iter().enumerate() {
                match h.await.expect("session task") {
                    Ok(seen) => {
                        assert!(seen.sent > 0 && seen.received == seen.sent);
                        gaps[i] = gaps[i].max(seen.longest_gap);
                    }
                    Err(e) => problems.push(format!("{} session {n}: {e}", ["kernel", "copy"][i])),
                }
            }
        }
        for h in self.udp {
            let (answered, p) = h.await.expect("udp task");
            assert!(answered > 0, "a UDP client got no answer at all");
            problems.extend(p);
        }
        if let Some(h) = self.connects {
            let (ok, failed) = h.await.expect("connect loop");
            println!("connect loop: {ok} connections, {} failed", failed.len());
            assert!(ok > 0);
            problems.extend(failed.into_iter().map(|e| format!("new connection: {e}")));
        }
        assert!(
            problems.is_empty(),
            "{} problems: {:?}",
            problems.len(),
            &problems[..problems.len().min(20)]
        );
        (gaps[0], gaps[1])
    }
}

/// 200 sessions streaming checksummed data both ways (100 on the kernel path, 100 on
/// the copy path) and 20 UDP sessions, while a client connects in a tight loop: 10
/// upgrades in a row lose nothing, least_conn counts carry over, and the admin API's
/// change and `upstream_show` survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_upgrades_in_a_row_lose_no_session_byte_or_connection() {
    let echo = [
        Backend::start(Behaviour::Echo).await,
        Backend::start(Behaviour::Echo).await,
    ];
    let udp = [UdpBackend::start("u1").await, UdpBackend::start("u2").await];
    let p = Ports::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(
        dir.path(),
        &p,
        &[echo[0].addr, echo[1].addr],
        &[udp[0].addr, udp[1].addr],
    );
    let d = Daemon::start_with_env(&cfg, &[("L4LB_ADMIN_TOKEN", TOKEN)]);
    let current = Current {
        pid_file: dir.path().join("l4lb.pid"),
    };
    assert_eq!(current.pid(), d.pid(), "the pid file names the daemon");
    let admin = Ports::addr(p.admin);

    // An admin API change the upgrades must keep.
    let auth = format!("Bearer {TOKEN}");
    let (status, body) = http(
        admin,
        "PATCH",
        &format!("/api/upstreams/db/servers/{}", echo[1].addr),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        r#"{"weight": 3, "max_fails": 5}"#,
    );
    assert_eq!(status, 200, "{body}");
    let shown = show(admin, "db");
    assert!(shown.contains("weight=3 max_fails=5"), "{shown}");

    let load = Load::start(&p, 100, 20, true);
    let settled = support::wait_until(Duration::from_secs(30), || {
        active(admin, "db").iter().map(|(_, n)| n).sum::<u64>() >= 200
    })
    .await;
    assert!(
        settled.is_some(),
        "200 sessions not active: {:?}",
        active(admin, "db")
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = active(admin, "db");

    let mut pids = vec![current.pid()];
    for round in 1..=10 {
        let pid = tokio::task::block_in_place(|| upgrade_by_signal(&d, &current));
        assert!(!pids.contains(&pid), "round {round}: pid {pid} again");
        pids.push(pid);
        let now = active(admin, "db");
        let total: u64 = now.iter().map(|(_, n)| n).sum();
        assert!(
            total >= 200,
            "round {round}: least_conn counts reset: {now:?} (before {before:?})"
        );
        // Half a second of streaming between upgrades.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        show(admin, "db"),
        shown,
        "upstream_show changed across the upgrades"
    );
    let after = active(admin, "db");
    for ((addr, a), (_, b)) in before.iter().zip(&after) {
        // The connect loop may hold a connection at either moment, and one closing.
        assert!(a.abs_diff(*b) <= 2, "{addr}: {a} active before, {b} after");
    }
    let (kernel_gap, copy_gap) = load.finish().await;
    println!(
        "10 upgrades: longest time without bytes: kernel path {kernel_gap:?}, copy path {copy_gap:?} (a chunk is sent every {TICK:?})"
    );
    let log = d.log();
    assert_eq!(log.matches("upgrade: handed over").count(), 10, "{log}");
    assert!(!log.contains("did not reach a clean point"), "{log}");
    assert!(!log.contains("did not take a session"), "{log}");
    // Every session moved every time: 200 TCP sessions (20 UDP ones travel with
    // their listener), plus at most one of the connect loop's.
    for line in log
        .lines()
        .filter(|l| l.contains("upgrade: handed over") || l.contains("upgrade complete"))
    {
        println!("{line}");
    }
    for line in log.lines().filter(|l| l.contains("upgrade: handed over")) {
        let figure = |name: &str| -> u64 {
            support::log_field(line, name)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} in {line}"))
        };
        // The connect loop may have one session open and one closing.
        assert!((200..=202).contains(&figure("sessions")), "{line}");
        assert_eq!(figure("kept"), 0, "{line}");
        // Spliced sessions stay in the maps both processes share: they move without
        // leaving the kernel, at a clean point (nothing paused or held), which a
        // session streaming 4 KiB every 25 ms is at nearly every moment.
        assert!(figure("in_kernel") >= 90, "{line}");
    }
    assert!(log.contains("udp_sessions=20"), "{log}");
}

/// The binary at the daemon's path is swapped for one that exits at once, then one
/// that is slow to fail (a second upgrade meanwhile is refused), then the real one
/// with a broken configuration file: each time the old process keeps serving and its
/// sessions stream on. Then the real upgrade works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_binary_that_cannot_start_leaves_the_old_process_serving() {
    let echo = [Backend::start(Behaviour::Echo).await];
    let udp = [UdpBackend::start("u1").await];
    let p = Ports::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), &p, &[echo[0].addr], &[udp[0].addr]);
    // `env` as launcher: the daemon runs a copy of the binary in its directory, which
    // this test may replace.
    let d = Daemon::start_via(&cfg, &[("L4LB_ADMIN_TOKEN", TOKEN)], &["env".to_string()]);
    let bin = d.dir.path().join("l4lb");
    let current = Current {
        pid_file: dir.path().join("l4lb.pid"),
    };
    let first = current.pid();
    let load = Load::start(&p, 5, 2, false);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let replace = |script: &str| {
        use std::os::unix::fs::PermissionsExt;
        // A running binary cannot be written ("text file busy"): put a new file there.
        let _ = std::fs::remove_file(&bin);
        std::fs::write(&bin, script).expect("write script");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    };
    replace("#!/bin/sh\nexit 3\n");
    let (ok, out) = tokio::task::block_in_place(|| upgrade_cmd(&d.config_path));
    assert!(!ok, "{out}");
    assert!(
        out.contains("exit status: 3") && out.contains(&format!("process {first} keeps serving")),
        "{out}"
    );

    replace("#!/bin/sh\nsleep 2\nexit 4\n");
    d.signal(libc::SIGUSR2);
    assert!(d.wait_log_count(
        "upgrade: starting the new binary",
        2,
        Duration::from_secs(10)
    ));
    d.signal(libc::SIGUSR2);
    assert!(
        d.wait_log(
            "upgrade refused: one is already running",
            Duration::from_secs(10)
        ),
        "{}",
        d.log()
    );
    assert!(
        d.wait_log("exit status: 4", Duration::from_secs(10)),
        "{}",
        d.log()
    );

    let _ = std::fs::remove_file(&bin);
    std::fs::copy(support::l4lb_bin(), &bin).expect("restore the binary");
    let good = std::fs::read_to_string(&d.config_path).expect("read config");
    let good_copy = dir.path().join("good.toml");
    std::fs::write(&good_copy, &good).expect("write config copy");
    std::fs::write(&d.config_path, format!("{good}\nbroken = \n")).expect("break config");
    let (ok, out) = tokio::task::block_in_place(|| upgrade_cmd(&good_copy));
    assert!(!ok, "{out}");
    assert!(out.contains("exit status: 1"), "{out}");
    assert_eq!(
        current.pid(),
        first,
        "the pid file still names the old process"
    );
    assert!(
        d.exited().is_none(),
        "the old process exited; log:\n{}",
        d.log()
    );

    std::fs::write(&d.config_path, &good).expect("restore config");
    let (ok, out) = tokio::task::block_in_place(|| upgrade_cmd(&d.config_path));
    assert!(ok, "{out}\nlog:\n{}", d.log());
    assert!(
        out.contains(&format!("process {first} handed over to {}", current.pid())),
        "{out}"
    );
    load.finish().await;
    assert_eq!(
        d.log()
            .matches("upgrade failed; this process keeps serving everything")
            .count(),
        3
    );
}

/// A new process with room for fewer sessions (a smaller `max_connections`) takes what
/// fits (each refused session is offered once) and refuses the rest, which stay in the old process: it keeps serving them
/// until they end, then exits. Every session is in exactly one process and byte-exact.
/// The default `max_connections` sizes the kernel maps differently from 25, so the two
/// processes do not share the kernel path: spliced sessions leave the sockmap to move.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_the_new_process_refuses_stay_in_the_old_one() {
    let line = refused_sessions_stay(None).await;
    assert_eq!(support::log_field(&line, "in_kernel"), Some("0"), "{line}");
}

/// As above, with maps sized the same in both processes (500 and 25 sessions both get
/// the smallest maps): they share the kernel path, spliced sessions that fit move
/// without leaving it, and those refused leave it for the copy path in the old process,
/// which no longer reads the kernel path's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_sessions_leave_a_shared_kernel_path_in_the_old_process() {
    let line = refused_sessions_stay(Some(500)).await;
    let in_kernel: u64 = support::log_field(&line, "in_kernel")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(in_kernel > 0, "{line}");
}

/// 40 sessions (20 spliced) under `max_connections = base` (the default when `None`),
/// then an upgrade to `max_connections = 25`; returns the old process's handover line.
async fn refused_sessions_stay(base: Option<u32>) -> String {
    let echo = [Backend::start(Behaviour::Echo).await];
    let udp = [UdpBackend::start("u1").await];
    let p = Ports::new();
    let dir = tempfile::tempdir().expect("tempdir");
    // A short grace period: the sessions that stay must outlive it.
    let mut cfg = config(dir.path(), &p, &[echo[0].addr], &[udp[0].addr])
        .replace("[global]\n", "[global]\nworker_shutdown_timeout = \"1s\"\n");
    if let Some(base) = base {
        cfg = cfg.replace(
            "[global]\n",
            &format!("[global]\nmax_connections = {base}\n"),
        );
    }
    let d = Daemon::start_with_env(&cfg, &[("L4LB_ADMIN_TOKEN", TOKEN)]);
    let current = Current {
        pid_file: dir.path().join("l4lb.pid"),
    };
    let load = Load::start(&p, 20, 0, false);
    let admin = Ports::addr(p.admin);
    let settled = support::wait_until(Duration::from_secs(30), || {
        active(admin, "db").iter().map(|(_, n)| n).sum::<u64>() >= 40
    })
    .await;
    assert!(
        settled.is_some(),
        "40 sessions not active: {:?}",
        active(admin, "db")
    );

    // Global settings take effect at restart, which an upgrade is.
    let smaller = match base {
        Some(base) => cfg.replace(
            &format!("max_connections = {base}\n"),
            "max_connections = 25\n",
        ),
        None => cfg.replace("[global]\n", "[global]\nmax_connections = 25\n"),
    };
    std::fs::write(&d.config_path, smaller).expect("rewrite config");
    let new = tokio::task::block_in_place(|| signal_upgrade(&d, &current));
    assert!(new.starts_with("ok "), "{new}\n{}", d.log());
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("upgrade: handed over"))
        .expect("handed over line")
        .to_string();
    // Each TCP listener's accept loop holds a place too: 23 sessions fit.
    let field = |name| {
        support::log_field(&line, name)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{line}"))
    };
    assert_eq!((field("sessions"), field("kept")), (23, 17), "{line}");
    assert!(log.contains("max_connections reached"), "{log}");
    // The old process still serves the 17 it kept, past its grace period: that is for
    // a stop, not for an upgrade.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        d.exited().is_none(),
        "the old process exited with sessions; log:\n{}",
        d.log()
    );

    load.finish().await;
    let exited = tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(10)));
    assert!(
        exited.is_some(),
        "the old process did not exit once its sessions ended"
    );
    line
}

/// An upgrade right after a Consul change and one right after a SIGHUP: the new
/// process ends up with the changed server set and the reloaded configuration. One more
/// while Consul is down keeps the set.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_during_a_consul_change_or_a_reload_keeps_both() {
    let consul = Consul::start().await;
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let b = Backend::start(Behaviour::Tagged("b".into())).await;
    let prefix = "upstreams/db/";
    consul.put(&format!("{prefix}{}", a.addr), "");
    let (admin, lb, extra) = (free_port(), free_port(), free_port());
    let dir = tempfile::tempdir().expect("tempdir");
    let pid = dir.path().join("l4lb.pid");
    let cfg = |extra_listener: bool| {
        let mut c = format!(
            r#"
[global]
pid_file = "{pid}"

[admin]
listen = "127.0.0.1:{admin}"

[upstream.db]
servers = []

[upstream.db.upsync]
type = "consul"
url = "{url}"
interval = "300ms"
timeout = "1s"
strong_dependency = true

[[server]]
listen = "127.0.0.1:{lb}"
proxy_pass = "db"
"#,
            pid = pid.display(),
            url = consul.kv_url(prefix),
        );
        if extra_listener {
            c.push_str(&format!(
                "\n[[server]]\nlisten = \"127.0.0.1:{extra}\"\nproxy_pass = \"db\"\n"
            ));
        }
        c
    };
    let d = Daemon::start(&cfg(false));
    let current = Current {
        pid_file: pid.clone(),
    };
    let admin_addr = Ports::addr(admin);
    let lists = |addrs: &[SocketAddr]| {
        let s = show(admin_addr, "db");
        addrs.iter().all(|x| s.contains(&x.to_string()))
    };
    assert!(
        support::wait_until(Duration::from_secs(10), || lists(&[a.addr]))
            .await
            .is_some()
    );

    // A held session, to see it survive both.
    let (tag, mut held) = support::connect_tagged(Ports::addr(lb))
        .await
        .expect("session");
    assert_eq!(tag, "a");

    let fresh = consul.fresh_reads();
    consul.put(&format!("{prefix}{}", b.addr), "");
    tokio::task::block_in_place(|| upgrade_by_signal(&d, &current));
    assert!(
        support::wait_until(Duration::from_secs(10), || lists(&[a.addr, b.addr]))
            .await
            .is_some(),
        "the Consul change is missing after the upgrade: {}\nlog:\n{}",
        show(admin_addr, "db"),
        d.log()
    );
    // The new process continued the blocking query from the index the old one reached
    // (handed over with the set) instead of asking for the whole set again.
    assert_eq!(
        consul.fresh_reads(),
        fresh,
        "a read without an index after the upgrade; log:\n{}",
        d.log()
    );
    assert!(
        d.log()
            .contains("discovery continues from the position the previous process reached"),
        "{}",
        d.log()
    );

    std::fs::write(&d.config_path, cfg(true)).expect("rewrite config");
    let old = current.pid();
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(old, libc::SIGHUP);
        libc::kill(old, libc::SIGUSR2);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while current.pid() == old || !gone(old) {
        assert!(Instant::now() < deadline, "no upgrade; log:\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reached = support::wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(Ports::addr(extra)).is_ok()
    })
    .await;
    assert!(
        reached.is_some(),
        "the reloaded listener is not served; log:\n{}",
        d.log()
    );

    // Consul down: with strong_dependency a fresh start would fail, but the set the
    // running process hands over is the source's last answer, so the upgrade works.
    consul.set_fault(support::consul::Fault::Status500);
    tokio::task::block_in_place(|| upgrade_by_signal(&d, &current));
    assert!(lists(&[a.addr, b.addr]), "{}", show(admin_addr, "db"));
    consul.set_fault(support::consul::Fault::None);

    held.write_all(b"still here\n").await.expect("write");
    let mut buf = vec![0u8; 11];
    tokio::time::timeout(Duration::from_secs(5), held.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&buf, b"still here\n");
}

/// A UDP session whose listener the new configuration drops cannot move: it ends at
/// the upgrade with its access-log line (it vanished without one).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_udp_session_the_new_process_cannot_take_is_logged() {
    let s = Setup::start("").await;
    let (p, cfg, d, current) = (&s.p, &s.cfg, &s.d, &s.current);
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    c.connect(Ports::addr(p.udp)).await.unwrap();
    c.send(b"hi").await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(3), c.recv(&mut buf))
        .await
        .expect("reply")
        .unwrap();
    assert_eq!(&buf[..n], b"u1:hi");
    let udp_block = cfg
        .find(&format!("listen = \"127.0.0.1:{}\"", p.udp))
        .and_then(|at| cfg[..at].rfind("[[server]]"))
        .expect("the udp listener");
    std::fs::write(&d.config_path, &cfg[..udp_block]).expect("rewrite config");
    let new = tokio::task::block_in_place(|| signal_upgrade(d, current));
    assert!(new.starts_with("ok "), "{new}\n{}", d.log());
    let logged = d.wait_log("end=not_taken_over", Duration::from_secs(5));
    assert!(logged, "{}", d.log());
    let line = d
        .access_lines()
        .into_iter()
        .find(|l| l.contains("end=not_taken_over"))
        .expect("line");
    let client = c.local_addr().unwrap().to_string();
    assert_eq!(
        support::log_field(&line, "client"),
        Some(client.as_str()),
        "{line}"
    );
    assert_eq!(support::log_field(&line, "received"), Some("2"), "{line}");
}

/// A stop asked of the old process while an upgrade runs is not lost: once the new
/// process took over, it gets the SIGTERM and stops too (it ran on, unstoppable by the
/// pid the operator knew), and the old one ends the session it kept within its grace
/// period (it waited for it without a bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stop_during_an_upgrade_stops_both_processes() {
    let s = Setup::start("worker_shutdown_timeout = \"1s\"\n").await;
    let (p, cfg, d, current) = (&s.p, &s.cfg, &s.d, &s.current);
    let old = current.pid();
    // A session the new process has no room for (its accept loops take both places).
    let mut kept = TcpStream::connect(Ports::addr(p.copy)).await.unwrap();
    kept.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    kept.read_exact(&mut buf).await.unwrap();
    let smaller = cfg.replace("[global]\n", "[global]\nmax_connections = 2\n");
    std::fs::write(&d.config_path, smaller).expect("rewrite config");
    let status = PathBuf::from(format!("{}.upgrade", current.pid_file.display()));
    let _ = std::fs::remove_file(&status);
    // SAFETY: kill(2) has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(old, libc::SIGUSR2) }, 0);
    // Inside the upgrade's window (it takes ~200 ms here): the new process is starting.
    let started = support::wait_until(Duration::from_secs(10), || {
        d.log().contains("upgrade: starting the new binary")
    })
    .await;
    assert!(started.is_some(), "{}", d.log());
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(old, libc::SIGTERM) }, 0);
    let written = support::wait_until(Duration::from_secs(30), || status.exists()).await;
    assert!(written.is_some(), "no upgrade outcome: {}", d.log());
    let outcome = std::fs::read_to_string(&status).expect("upgrade outcome");
    let new: i32 = outcome
        .strip_prefix("ok ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("{outcome}\n{}", d.log()));
    let both_gone = support::wait_until(Duration::from_secs(10), || {
        // The first process is the test's child: reap it.
        let _ = d.exited();
        gone(old) && gone(new)
    })
    .await;
    assert!(
        both_gone.is_some(),
        "old gone {} new gone {}; log:\n{}",
        gone(old),
        gone(new),
        d.log()
    );
    assert!(d.log().contains("kept=1"), "{}", d.log());
    drop(kept);
}

/// Admin changes made while an upgrade runs are either refused (503) or kept: none is
/// answered and then lost with the old process.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_changes_during_an_upgrade_are_refused_or_kept() {
    let s = Setup::start("").await;
    let (p, d, current) = (&s.p, &s.d, &s.current);
    let admin = Ports::addr(p.admin);
    let stop = Arc::new(AtomicBool::new(false));
    let adding = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let bearer = format!("Bearer {TOKEN}");
            let (mut kept, mut refused) = (Vec::new(), 0);
            for port in 40_000u16.. {
                if stop.load(Ordering::SeqCst) || port > 45_000 {
                    break;
                }
                let path = format!("/api/upstreams/db/servers/127.0.0.1:{port}");
                let (status, body) = http(admin, "PUT", &path, &[("Authorization", &bearer)], "{}");
                match status {
                    201 => kept.push(port),
                    503 => refused += 1,
                    // A connection the old process closed as it stopped its API.
                    0 => {}
                    other => panic!("{other} {body}"),
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (kept, refused)
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    tokio::task::block_in_place(|| upgrade_by_signal(d, current));
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::SeqCst);
    let (kept, refused) = adding.join().expect("the adding thread");
    let now: Vec<u16> = active(admin, "db")
        .iter()
        .filter_map(|(a, _)| a.rsplit_once(':').and_then(|(_, p)| p.parse().ok()))
        .collect();
    let lost: Vec<u16> = kept.iter().copied().filter(|p| !now.contains(p)).collect();
    assert!(
        lost.is_empty(),
        "{} changes answered 201 and lost: {lost:?} ({} kept, {refused} refused)",
        lost.len(),
        kept.len()
    );
    assert!(kept.len() > 20, "too few changes to tell: {}", kept.len());
}

/// A daemon on [`config`] (with `global` added to its `[global]`), its backends and
/// the handle on whichever process serves.
struct Setup {
    p: Ports,
    cfg: String,
    d: Daemon,
    /// Kills whichever process serves when dropped: before `_backends`, whose
    /// directory holds the pid file it reads.
    current: Current,
    _backends: (Backend, UdpBackend, tempfile::TempDir),
}

impl Setup {
    async fn start(global: &str) -> Setup {
        let echo = Backend::start(Behaviour::Echo).await;
        let udp = UdpBackend::start("u1").await;
        let p = Ports::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path(), &p, &[echo.addr], &[udp.addr])
            .replace("[global]\n", &format!("[global]\n{global}"));
        let d = Daemon::start_with_env(&cfg, &[("L4LB_ADMIN_TOKEN", TOKEN)]);
        let current = Current {
            pid_file: dir.path().join("l4lb.pid"),
        };
        Setup {
            p,
            cfg,
            d,
            current,
            _backends: (echo, udp, dir),
        }
    }
}
