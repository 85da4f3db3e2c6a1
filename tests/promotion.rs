//! Sessions that start on the copy path and earn the kernel path (`splice_after_bytes`,
//! `splice_after_time`): moved at any moment of their life, under load, with half-close
//! and resets around the move, every byte arrives once. eBPF is loaded for real
//! (`splice = "required"`); `L4LB_NO_EBPF=1` skips these on purpose, saying so.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::stream::{exchange, recv_stream, send_stream, Plan, Progress};
use support::{free_port, log_field, metric, Daemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// False (with a note) when the run asked to skip the eBPF cases.
fn kernel_wanted(test: &str) -> bool {
    if std::env::var("L4LB_NO_EBPF").is_ok_and(|v| v == "1") {
        eprintln!("{test}: skipped by request (L4LB_NO_EBPF=1)");
        return false;
    }
    true
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn config(listen: u16, backend: SocketAddr, splice_after: &str) -> String {
    let admin = free_port();
    format!(
        r#"
[global]
splice = "required"
{splice_after}
access_log = true
max_connections = 4000

[admin]
listen = "127.0.0.1:{admin}"

[upstream.u]
servers = [{{ address = "{backend}" }}]

[[server]]
listen = "127.0.0.1:{listen}"
proxy_pass = "u"
proxy_timeout = "60s"
"#
    )
}

/// How a session ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Close {
    /// Both sides send everything and half-close; every byte is checked both ways.
    Clean,
    /// The client resets after sending part of its bytes.
    ClientReset,
    /// The backend resets after receiving part of the client's bytes.
    BackendReset,
}

/// What a client asks of the backend, in a 25-byte header before its own bytes.
#[derive(Clone, Copy, Debug)]
struct Ask {
    /// Bytes the client sends after the header.
    up: u64,
    /// Bytes the backend sends.
    down: u64,
    seed: u64,
    close: Close,
}

impl Ask {
    fn encode(&self) -> [u8; 25] {
        let mut h = [0u8; 25];
        h[..8].copy_from_slice(&self.up.to_le_bytes());
        h[8..16].copy_from_slice(&self.down.to_le_bytes());
        h[16..24].copy_from_slice(&self.seed.to_le_bytes());
        h[24] = self.close as u8;
        h
    }

    fn decode(h: &[u8; 25]) -> Ask {
        let word = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        Ask {
            up: word(0),
            down: word(8),
            seed: word(16),
            close: match h[24] {
                0 => Close::Clean,
                1 => Close::ClientReset,
                _ => Close::BackendReset,
            },
        }
    }
}

/// Every other session sends at 2 MiB/s each way, so it is still streaming when the
/// promotion rules fire; the others run as fast as the path allows.
fn pace(seed: u64) -> Option<u64> {
    seed.is_multiple_of(2).then_some(2 << 20)
}

/// Closes with a reset (SO_LINGER 0).
fn reset(sock: TcpStream) {
    let _ = sock.set_zero_linger();
    drop(sock);
}

/// A backend that reads the header, then streams and checks as asked; each connection's
/// result (bytes received, or why not) goes to the channel.
async fn backend() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(Option<Ask>, Result<u64, String>)>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut h = [0u8; 25];
                if let Err(e) = sock.read_exact(&mut h).await {
                    let _ = tx.send((None, Err(format!("header: {e}"))));
                    return;
                }
                let ask = Ask::decode(&h);
                let r = match ask.close {
                    Close::BackendReset => {
                        // Take part of the upload, then reset.
                        let mut buf = vec![0u8; 64 * 1024];
                        let mut got = 0u64;
                        while got < ask.up / 2 {
                            match sock.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => got += n as u64,
                            }
                        }
                        reset(sock);
                        Ok(got)
                    }
                    _ => {
                        let plan = Plan {
                            send: ask.down,
                            send_seed: ask.seed * 2 + 1,
                            recv_seed: ask.seed * 2,
                            read_rate: None,
                            send_rate: pace(ask.seed),
                        };
                        exchange(sock, plan, Arc::default())
                            .await
                            .map_err(|e| e.to_string())
                    }
                };
                let _ = tx.send((Some(ask), r));
            });
        }
    });
    (a, rx)
}

/// One client session per `ask`; Ok(bytes received) for a clean one.
async fn client(lb: SocketAddr, ask: Ask) -> Result<u64, String> {
    let mut sock = TcpStream::connect(lb)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    sock.write_all(&ask.encode())
        .await
        .map_err(|e| format!("header: {e}"))?;
    match ask.close {
        Close::Clean => {
            let plan = Plan {
                send: ask.up,
                send_seed: ask.seed * 2,
                recv_seed: ask.seed * 2 + 1,
                read_rate: None,
                send_rate: pace(ask.seed),
            };
            let got = exchange(sock, plan, Arc::default())
                .await
                .map_err(|e| e.to_string())?;
            if got == ask.down {
                Ok(got)
            } else {
                Err(format!("received {got} of {}", ask.down))
            }
        }
        Close::ClientReset => {
            let (mut r, mut w) = sock.into_split();
            let sent = AtomicU64::new(0);
            let _ = send_stream(&mut w, ask.seed * 2, ask.up / 2, None, &sent).await;
            // Whatever arrived so far must still be the right bytes.
            let _ = tokio::time::timeout(
                Duration::from_millis(50),
                recv_stream(&mut r, ask.seed * 2 + 1, None, &AtomicU64::new(0)),
            )
            .await;
            reset(r.reunite(w).map_err(|e| e.to_string())?);
            Ok(0)
        }
        Close::BackendReset => {
            // Upload until the backend resets; a reset or an early EOF is the expected end.
            let (_r, mut w) = sock.into_split();
            let _ = send_stream(&mut w, ask.seed * 2, ask.up, None, &AtomicU64::new(0)).await;
            Ok(0)
        }
    }
}

/// A small deterministic generator for the test's choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// 0 to 8 MiB (0 one time in eight).
    fn size(&mut self) -> u64 {
        match self.next() % 8 {
            0 => 0,
            _ => {
                // 4 KiB to 8 MiB, even over the orders of magnitude.
                let bits = 12 + self.next() % 12;
                (self.next() % (1 << bits)) & !7
            }
        }
    }
}

fn kernel_figure(d: &Daemon, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&d.scrape(), name, labels).unwrap_or_else(|| panic!("no {name} {labels:?}"))
}

/// 1,000 sessions, 32 at a time: random sizes each way (0 to 8 MiB), half of them paced,
/// clean half-closes in either order, resets from either side. Promotion after 64 KiB
/// or 200 ms, so sessions move at every stage, and some close while they move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_under_load_is_byte_exact() {
    if !kernel_wanted("promotion_under_load_is_byte_exact") {
        return;
    }
    let (b, mut results) = backend().await;
    let port = free_port();
    let d = Daemon::start(&config(
        port,
        b,
        "splice_after_bytes = \"64k\"\nsplice_after_time = \"200ms\"",
    ));
    let fds0 = d.fd_count();
    let lb = addr(port);
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let asks: Vec<Ask> = (0..1000u64)
        .map(|seed| Ask {
            up: rng.size(),
            down: rng.size(),
            seed,
            close: match rng.next() % 10 {
                0 => Close::ClientReset,
                1 => Close::BackendReset,
                _ => Close::Clean,
            },
        })
        .collect();
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = Vec::new();
    for ask in asks.iter().copied() {
        let permit = Arc::clone(&sem).acquire_owned().await.expect("semaphore");
        tasks.push(tokio::spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(60), client(lb, ask)).await;
            drop(permit);
            (ask, r)
        }));
    }
    let mut bytes = 0u64;
    let mut failures = Vec::new();
    for t in tasks {
        let (ask, r) = t.await.expect("client task");
        match r {
            Ok(Ok(n)) => bytes += n,
            Ok(Err(e)) if ask.close == Close::Clean => failures.push(format!("{ask:?}: {e}")),
            Ok(Err(_)) => {}
            Err(_) => failures.push(format!("{ask:?}: timed out")),
        }
    }
    let clean: Vec<&Ask> = asks.iter().filter(|a| a.close == Close::Clean).collect();
    let mut backend_ok = 0;
    for _ in 0..asks.len() {
        match tokio::time::timeout(Duration::from_secs(30), results.recv()).await {
            Ok(Some((_, Ok(_)))) => backend_ok += 1,
            Ok(Some((Some(ask), Err(_)))) if ask.close != Close::Clean => {}
            Ok(Some((ask, Err(e)))) => failures.push(format!("backend {ask:?}: {e}")),
            _ => failures.push("backend result missing".into()),
        }
    }
    assert!(
        failures.iter().all(|f| !f.contains("mismatch")),
        "corrupted bytes: {failures:#?}"
    );
    // Only sessions the test itself reset may fail, on either end.
    assert!(
        failures.is_empty(),
        "{} failures: {failures:#?}; log tail:\n{}",
        failures.len(),
        d.log()
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let expected: u64 = clean.iter().map(|a| a.down).sum();
    assert_eq!(bytes, expected, "bytes received by clean clients");
    // Every session ended and was logged, with the path it ended on.
    let deadline = Instant::now() + Duration::from_secs(30);
    let lines = loop {
        let lines = d.access_lines();
        if lines.len() >= asks.len() || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(lines.len(), asks.len(), "access log lines");
    let mut paths = std::collections::BTreeMap::<String, usize>::new();
    for l in &lines {
        *paths
            .entry(log_field(l, "path").unwrap_or("-").to_string())
            .or_default() += 1;
    }
    // A session still copied for lack of time or bytes must have ended before the rules
    // (200 ms, then a 100 ms sample) could fire; 1 s of slack for a loaded host.
    let long_short: Vec<&String> = lines
        .iter()
        .filter(|l| log_field(l, "path") == Some("copy:short"))
        .filter(|l| {
            log_field(l, "duration_ms")
                .and_then(|d| d.parse::<u64>().ok())
                .is_some_and(|ms| ms > 1300)
        })
        .collect();
    assert!(
        long_short.is_empty(),
        "long sessions that never moved: {long_short:#?}"
    );
    let promoted = kernel_figure(&d, "l4lb_kernel_promotion_age_seconds_count", &[]);
    eprintln!(
        "1,000 sessions in {:.1} s, {:.0} MiB to clean clients; paths {paths:?}; promoted {promoted}; backend ok {backend_ok}",
        started.elapsed().as_secs_f64(),
        bytes as f64 / 1048576.0
    );
    // How many live long enough to move depends on how fast the rest is moved: 113-127
    // on bf5f2af (the 1,000 took 15-16 s), 84-103 later (13.5-14.5 s), 47-49 on a faster
    // host (9.8 s). That each long session moved is checked above; this is a floor
    // against promotion not working at all.
    assert!(
        promoted >= 20.0,
        "only {promoted} sessions moved into the kernel"
    );
    assert!(paths.get("kernel").copied().unwrap_or(0) >= 20, "{paths:?}");
    assert!(
        paths.get("copy:short").copied().unwrap_or(0) >= 50,
        "{paths:?}"
    );
    assert_eq!(
        kernel_figure(&d, "l4lb_session_panics_total", &[]),
        0.0,
        "panics"
    );
    // Everything left the kernel and no descriptor leaked.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sessions = kernel_figure(&d, "l4lb_kernel_sessions", &[]);
        let flows = kernel_figure(&d, "l4lb_kernel_map_entries", &[("map", "flows")]);
        let fds = d.fd_count();
        if sessions == 0.0 && flows == 0.0 && fds <= fds0 + 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kernel sessions {sessions}, flows {flows}, fds {fds} (start {fds0})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A session moves into the kernel while its reader is slow: every byte arrives, and
/// the daemon's memory stays bounded (the kernel path's backpressure, not a queue).
/// The sender must still be sending when the session moves: socket buffers on the way
/// took up to 20 MiB within 0.8 s here (net.ipv4.tcp_rmem's maximum is 32 MiB), and a
/// sender done by then has half-closed its socket, which the kernel path refuses (the
/// session rightly stays on the copy path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_with_a_slow_reader_is_bounded_and_exact() {
    if !kernel_wanted("promotion_with_a_slow_reader_is_bounded_and_exact") {
        return;
    }
    const SIZE: u64 = 48 << 20;
    const RATE: u64 = 8 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let b = listener.local_addr().expect("addr");
    let sender = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.expect("accept");
        let (_r, mut w) = sock.into_split();
        send_stream(&mut w, 7, SIZE, None, &AtomicU64::new(0)).await?;
        w.shutdown().await
    });
    let port = free_port();
    // The time rule moves it while it streams.
    let d = Daemon::start(&config(
        port,
        b,
        "splice_after_bytes = \"1g\"\nsplice_after_time = \"500ms\"",
    ));
    let rss0 = d.rss_kib();
    let sock = TcpSocket::new_v4().expect("socket");
    // A small receive buffer, so the slow reader really holds the sender back.
    sock.set_recv_buffer_size(64 * 1024).expect("rcvbuf");
    let mut c = sock.connect(addr(port)).await.expect("connect");
    let progress = Arc::new(Progress::default());
    let reader = {
        let progress = Arc::clone(&progress);
        tokio::spawn(async move {
            let got = recv_stream(&mut c, 7, Some(RATE), &progress.received).await;
            (got, c)
        })
    };
    let mut peak = rss0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reader.is_finished() {
        assert!(Instant::now() < deadline, "slow reader timed out");
        peak = peak.max(d.rss_kib());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (got, mut c) = reader.await.expect("reader");
    match got {
        Ok(n) if n == SIZE => {}
        other => panic!(
            "the client got {other:?} of {SIZE} bytes; daemon log:\n{}",
            d.log()
        ),
    }
    sender.await.expect("sender").expect("sent");
    c.shutdown().await.expect("client FIN");
    let line = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(l) = d.access_lines().pop() {
                break l;
            }
            assert!(Instant::now() < deadline, "no access log line");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    eprintln!(
        "48 MiB to an 8 MiB/s reader: daemon RSS {rss0} KiB at start, peak {peak} KiB; {line}"
    );
    assert_eq!(
        log_field(&line, "path"),
        Some("kernel"),
        "{line}\ndaemon log:\n{}",
        d.log()
    );
    assert!(
        peak < rss0 + 16 * 1024,
        "daemon RSS grew from {rss0} to {peak} KiB"
    );
}

/// A session that has to leave the kernel while its reader has stopped reading for good
/// still ends at `proxy_timeout`: taking it out drains what the kernel holds into that
/// reader's socket, which never takes it. Here a bulk stream's backend stops reading
/// right after the stream moved on trial, so the trial is lost and the session leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_the_kernel_towards_a_reader_that_stopped_ends_at_proxy_timeout() {
    if !kernel_wanted("leaving_the_kernel_towards_a_reader_that_stopped_ends_at_proxy_timeout") {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let b = listener.local_addr().expect("addr");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let backend = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.expect("accept");
            let mut buf = vec![0u8; 1 << 16];
            while !stop.load(Ordering::Relaxed) {
                if matches!(sock.read(&mut buf).await, Ok(0) | Err(_)) {
                    break;
                }
            }
            // Open, and never read again.
            sock
        })
    };
    let port = free_port();
    let d = Daemon::start(
        &config(
            port,
            b,
            "splice_after_bytes = \"64k\"\nsplice_after_time = \"10s\"",
        )
        .replace("proxy_timeout = \"60s\"", "proxy_timeout = \"3s\""),
    );
    let mut c = TcpStream::connect(addr(port)).await.expect("connect");
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 1 << 16];
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if c.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    wait_for(&d, "l4lb_kernel_bulk_trials_total", 1.0, "moved on trial").await;
    stop.store(true, Ordering::Relaxed);
    let stopped = Instant::now();
    let line = {
        let deadline = stopped + Duration::from_secs(20);
        loop {
            if let Some(l) = d.access_lines().pop() {
                break l;
            }
            assert!(
                Instant::now() < deadline,
                "the session never ended; daemon log:\n{}",
                d.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let took = stopped.elapsed();
    eprintln!("ended {took:?} after the reader stopped: {line}");
    assert_eq!(
        kernel_figure(&d, "l4lb_kernel_bulk_trials_lost_total", &[]),
        1.0,
        "{}",
        d.log()
    );
    assert_eq!(log_field(&line, "end"), Some("idle_timeout"), "{line}");
    assert_eq!(log_field(&line, "path"), Some("copy:bulk"), "{line}");
    assert!(took >= Duration::from_millis(2500), "{took:?}: {line}");
    assert_eq!(kernel_figure(&d, "l4lb_kernel_sessions", &[]), 0.0);
    writer.abort();
    drop(backend.await.expect("backend"));
}

/// With the default configuration, short sessions never touch the kernel path, and a
/// long-lived idle one is moved there by the time rule and still ends at
/// `proxy_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defaults_keep_short_sessions_copied_and_move_long_ones() {
    if !kernel_wanted("defaults_keep_short_sessions_copied_and_move_long_ones") {
        return;
    }
    let (b, _results) = backend().await;
    let port = free_port();
    let d = Daemon::start(&config(port, b, "").replace("\"60s\"", "\"3s\""));
    let lb = addr(port);
    for seed in 0..50 {
        let ask = Ask {
            up: 1000,
            down: 2000,
            seed,
            close: Close::Clean,
        };
        assert_eq!(client(lb, ask).await, Ok(2000));
    }
    let flows = |d: &Daemon| kernel_figure(d, "l4lb_kernel_map_entries", &[("map", "flows")]);
    assert!(
        d.wait_access_lines(50, Duration::from_secs(10))
            .await
            .iter()
            .all(|l| log_field(l, "path") == Some("copy:short")),
        "{:#?}",
        d.access_lines()
    );
    assert_eq!(
        kernel_figure(&d, "l4lb_kernel_promotion_age_seconds_count", &[]),
        0.0
    );
    // A pooled connection: connected, then idle (the backend waits for bytes).
    let mut idle = TcpStream::connect(lb).await.expect("connect");
    let ask = Ask {
        up: u64::MAX,
        down: 0,
        seed: 99,
        close: Close::BackendReset,
    };
    idle.write_all(&ask.encode()).await.expect("header");
    let opened = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(flows(&d), 2.0, "the idle session moved by the time rule");
    // Nothing more is sent: proxy_timeout (3 s) ends it, in the kernel.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("ended by proxy_timeout");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // From its last byte, not from its move into the kernel 1 s later.
    let lived = opened.elapsed();
    assert!(
        lived >= Duration::from_millis(2900) && lived < Duration::from_millis(3700),
        "idle session ended after {lived:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        if let Some(l) = d.access_lines().get(50) {
            break l.clone();
        }
        assert!(Instant::now() < deadline, "access log");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(log_field(&line, "path"), Some("kernel"), "{line}");
    assert_eq!(log_field(&line, "end"), Some("idle_timeout"), "{line}");
}

/// One request through the echo backend; its answer must come back unchanged.
async fn ask(sock: &mut TcpStream, i: u32) {
    let req = format!("request {i:08}\n");
    sock.write_all(req.as_bytes()).await.expect("request");
    let mut answer = vec![0u8; req.len()];
    sock.read_exact(&mut answer).await.expect("answer");
    assert_eq!(answer, req.as_bytes(), "answer {i}");
}

/// An echo server for small requests, on a port of its own; each answer waits `delay`
/// milliseconds first (none while it reads 0).
async fn small_echo(delay: Arc<AtomicU64>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let b = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let delay = Arc::clone(&delay);
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = sock.read(&mut buf).await {
                    let ms = delay.load(Ordering::Relaxed);
                    if ms > 0 {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    if sock.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    b
}

/// About 500 exchanges a second for `how_long`, each answer checked; returns the next
/// request's number.
async fn keep_busy(sock: &mut TcpStream, mut i: u32, how_long: Duration) -> u32 {
    let busy = Instant::now();
    let mut every = tokio::time::interval(Duration::from_millis(2));
    while busy.elapsed() < how_long {
        every.tick().await;
        ask(sock, i).await;
        i += 1;
    }
    i
}

/// Waits for the session's access-log line and returns its path.
async fn ended_on(d: &Daemon) -> String {
    let lines = d.wait_access_lines(1, Duration::from_secs(10)).await;
    log_field(&lines[0], "path").unwrap_or_default().to_string()
}

/// A daemon in front of [`small_echo`] (answers delayed by `delay` ms), due for the
/// kernel after 200 ms, with `extra` settings, and the port it listens on.
async fn request_response_daemon(extra: &str, delay: Arc<AtomicU64>) -> (Daemon, u16) {
    let b = small_echo(delay).await;
    let port = free_port();
    let d = Daemon::start(&config(
        port,
        b,
        &format!("splice_after_bytes = \"1m\"\nsplice_after_time = \"200ms\"\n{extra}"),
    ));
    (d, port)
}

/// The same, and a session through it.
async fn request_response_session(extra: &str, delay: Arc<AtomicU64>) -> (Daemon, TcpStream) {
    let (d, port) = request_response_daemon(extra, delay).await;
    let sock = TcpStream::connect(addr(port)).await.expect("connect");
    (d, sock)
}

fn flows(d: &Daemon) -> f64 {
    kernel_figure(d, "l4lb_kernel_map_entries", &[("map", "flows")])
}

/// Sessions kept busy by clients of their own until told to stop.
struct BusyClients {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(TcpStream, u32)>>,
}

impl BusyClients {
    /// Each session at 500 exchanges a second, paced by one clock for its whole life
    /// (ticks missed while the machine is busy are made up at once), so that both paths
    /// see the same rate.
    fn start(socks: Vec<TcpStream>) -> BusyClients {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = socks
            .into_iter()
            .map(|mut sock| {
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    let mut every = tokio::time::interval(Duration::from_millis(2));
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        every.tick().await;
                        ask(&mut sock, i).await;
                        i += 1;
                    }
                    (sock, i)
                })
            })
            .collect();
        BusyClients { stop, tasks }
    }

    /// Each session's socket and the number of its next request.
    async fn stop(self) -> Vec<(TcpStream, u32)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut socks = Vec::new();
        for t in self.tasks {
            socks.push(t.await.expect("client"));
        }
        socks
    }
}

/// Sessions through a daemon listening on `port`: six [`BusyClients`] pass 3,000
/// messages in a copied window, enough to judge.
async fn sessions(port: u16, n: usize) -> Vec<TcpStream> {
    let mut socks = Vec::new();
    for _ in 0..n {
        socks.push(TcpStream::connect(addr(port)).await.expect("connect"));
    }
    socks
}

/// Waits until the kernel figure `name` reaches `want`.
async fn wait_for(d: &Daemon, name: &str, want: f64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(4);
    while kernel_figure(d, name, &[]) < want {
        assert!(
            Instant::now() < deadline,
            "{what}: {name} never reached {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// By default sessions busy with small requests and answers move into the kernel on
/// trial once they are due, and stay there when together they exchange as fast as they
/// did copied; every answer comes back right across the move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_request_response_moves_on_trial_and_stays_when_as_fast() {
    if !kernel_wanted("busy_request_response_moves_on_trial_and_stays_when_as_fast") {
        return;
    }
    let (d, port) = request_response_daemon("", Arc::default()).await;
    let clients = BusyClients::start(sessions(port, 6).await);
    // Due at 200 ms, sampled for 100 ms, measured copied for 500 ms, moved, and judged
    // after 0.1 + 1 + 0.1 s in the kernel: at about 2 s.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let figure = |name: &str| kernel_figure(&d, name, &[]);
    assert_eq!(figure("l4lb_kernel_chatty_trials_total"), 6.0);
    assert_eq!(figure("l4lb_kernel_chatty_trials_lost_total"), 0.0);
    assert_eq!(flows(&d), 12.0, "not in the kernel after their trial");
    assert_eq!(figure("l4lb_kernel_promotions_deferred_total"), 0.0);
    drop(clients.stop().await);
    for line in d.wait_access_lines(6, Duration::from_secs(10)).await {
        assert_eq!(log_field(&line, "path"), Some("kernel"), "{line}");
    }
}

/// Sessions busy with requests and answers that together exchange slower in the kernel
/// than they did copied go back to the copy path without losing a byte, stay copied
/// while they are busy, and move again once they calm down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_request_response_slower_in_the_kernel_goes_back_to_the_copy_path() {
    if !kernel_wanted("busy_request_response_slower_in_the_kernel_goes_back_to_the_copy_path") {
        return;
    }
    let delay = Arc::new(AtomicU64::new(0));
    let (d, port) = request_response_daemon("", Arc::clone(&delay)).await;
    let clients = BusyClients::start(sessions(port, 6).await);
    wait_for(&d, "l4lb_kernel_chatty_trials_total", 6.0, "moved on trial").await;
    // In the kernel the backend answers 3 ms late: about 300 exchanges a second each
    // against 500.
    delay.store(3, Ordering::Relaxed);
    wait_for(
        &d,
        "l4lb_kernel_chatty_trials_lost_total",
        4.0,
        "judged slower",
    )
    .await;
    delay.store(0, Ordering::Relaxed);
    assert_eq!(flows(&d), 0.0, "all back on the copy path");
    // Busy and copied: deferred at each check while they stay busy.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(flows(&d), 0.0, "moved again while busy");
    let figure = |name: &str| kernel_figure(&d, name, &[]);
    assert!(figure("l4lb_kernel_promotions_deferred_total") >= 12.0);
    // Quiet: a few exchanges a second. The next check moves them, without a trial.
    let mut socks = clients.stop().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while flows(&d) < 12.0 {
        assert!(Instant::now() < deadline, "never moved once quiet");
        for (sock, i) in &mut socks {
            ask(sock, *i).await;
            *i += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (sock, i) in &mut socks {
        for _ in 0..20 {
            ask(sock, *i).await;
            *i += 1;
        }
    }
    drop(socks);
    for line in d.wait_access_lines(6, Duration::from_secs(10)).await {
        assert_eq!(log_field(&line, "path"), Some("kernel"), "{line}");
    }
    assert_eq!(figure("l4lb_kernel_chatty_trials_total"), 6.0);
    assert_eq!(figure("l4lb_kernel_promotion_age_seconds_count"), 12.0);
}

/// A lone session at 500 exchanges a second passes 500 messages in its copied window:
/// too few to tell the paths apart, so it stays in the kernel even though it exchanges
/// slower there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_few_requests_and_answers_to_judge_stay_in_the_kernel() {
    if !kernel_wanted("too_few_requests_and_answers_to_judge_stay_in_the_kernel") {
        return;
    }
    let delay = Arc::new(AtomicU64::new(0));
    let (d, port) = request_response_daemon("", Arc::clone(&delay)).await;
    let clients = BusyClients::start(vec![TcpStream::connect(addr(port)).await.expect("connect")]);
    wait_for(&d, "l4lb_kernel_chatty_trials_total", 1.0, "moved on trial").await;
    delay.store(3, Ordering::Relaxed);
    // Judged at about 1.2 s after the move.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(
        kernel_figure(&d, "l4lb_kernel_chatty_trials_lost_total", &[]),
        0.0
    );
    assert_eq!(flows(&d), 2.0);
    drop(clients.stop().await);
    assert_eq!(ended_on(&d).await, "kernel");
}

/// With `splice_chatty = "kernel"`, a busy session moves once it is due, with no trial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_request_response_moves_at_once_on_request() {
    if !kernel_wanted("busy_request_response_moves_at_once_on_request") {
        return;
    }
    let (d, mut sock) =
        request_response_session("splice_chatty = \"kernel\"", Arc::default()).await;
    // Due at 200 ms, sampled for 100 ms, then moved while still busy.
    let i = keep_busy(&mut sock, 0, Duration::from_millis(700)).await;
    assert_eq!(flows(&d), 2.0, "not moved while busy ({i} exchanges)");
    let figure = |name: &str| kernel_figure(&d, name, &[]);
    assert_eq!(figure("l4lb_kernel_promotions_deferred_total"), 0.0);
    assert_eq!(figure("l4lb_kernel_chatty_trials_total"), 0.0);
    keep_busy(&mut sock, i, Duration::from_millis(300)).await;
    drop(sock);
    assert_eq!(ended_on(&d).await, "kernel");
}

/// With `splice_chatty = "copy"`, a session busy with small requests and answers stays
/// on the copy path while it is busy and moves once it calms down; every answer comes
/// back right on both paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_request_response_stays_copied_until_it_calms_down_on_request() {
    if !kernel_wanted("busy_request_response_stays_copied_until_it_calms_down_on_request") {
        return;
    }
    let (d, mut sock) = request_response_session("splice_chatty = \"copy\"", Arc::default()).await;
    // For 1.5 s: due at 200 ms, deferred, and measured again at 1.3 s.
    let mut i = keep_busy(&mut sock, 0, Duration::from_millis(1500)).await;
    assert_eq!(flows(&d), 0.0, "moved while busy ({i} exchanges)");
    let deferred = kernel_figure(&d, "l4lb_kernel_promotions_deferred_total", &[]);
    assert!(deferred >= 2.0, "deferred {deferred} times");
    // Quiet: a few exchanges a second. The next check (within 1.1 s) moves it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while flows(&d) < 2.0 {
        assert!(Instant::now() < deadline, "never moved once quiet");
        ask(&mut sock, i).await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for _ in 0..20 {
        ask(&mut sock, i).await;
        i += 1;
    }
    drop(sock);
    assert_eq!(ended_on(&d).await, "kernel");
}

/// A bulk stream moves on trial, and one slower in the kernel than it was copied goes
/// back to the copy path without losing a byte; once it is no longer a bulk stream it
/// moves again, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_stream_slower_in_the_kernel_goes_back_to_the_copy_path() {
    if !kernel_wanted("a_bulk_stream_slower_in_the_kernel_goes_back_to_the_copy_path") {
        return;
    }
    // A prime period: a byte lost, repeated or reordered shows as a mismatch.
    const PERIOD: usize = 1_048_573;
    let pattern: Arc<Vec<u8>> = Arc::new((0..PERIOD).map(|i| (i * 31 % 251) as u8).collect());
    let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let b = listener.local_addr().expect("addr");
    let reader = {
        let (pattern, slow) = (Arc::clone(&pattern), Arc::clone(&slow));
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.expect("accept");
            let mut buf = vec![0u8; 256 << 10];
            let mut total = 0usize;
            loop {
                // Slow, about 12 MB/s, once the stream is on trial in the kernel.
                let slowly = slow.load(Ordering::Relaxed);
                let want = if slowly { 64 << 10 } else { buf.len() };
                let n = sock.read(&mut buf[..want]).await.expect("read");
                if n == 0 {
                    return total;
                }
                let mut got = &buf[..n];
                while !got.is_empty() {
                    let at = total % PERIOD;
                    let k = got.len().min(PERIOD - at);
                    assert!(
                        got[..k] == pattern[at..at + k],
                        "mismatch in {total}..{}",
                        total + k
                    );
                    got = &got[k..];
                    total += k;
                }
                if slowly {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    let port = free_port();
    let d = Daemon::start(&config(
        port,
        b,
        "splice_after_bytes = \"1m\"\nsplice_after_time = \"10s\"",
    ));
    let mut sock = TcpStream::connect(addr(port)).await.expect("connect");
    let writer = tokio::spawn(async move {
        let mut sent = 0usize;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(4) {
            let at = sent % PERIOD;
            let k = (64 << 10).min(PERIOD - at);
            sock.write_all(&pattern[at..at + k]).await.expect("write");
            sent += k;
        }
        sock.shutdown().await.expect("shutdown");
        sent
    });
    let figure = |d: &Daemon, name: &str| kernel_figure(d, name, &[]);
    let deadline = Instant::now() + Duration::from_secs(3);
    while figure(&d, "l4lb_kernel_bulk_trials_total") < 1.0 {
        assert!(Instant::now() < deadline, "never moved on trial");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    slow.store(true, Ordering::Relaxed);
    let sent = writer.await.expect("writer");
    let received = reader.await.expect("reader");
    assert_eq!(received, sent, "bytes received against sent");
    assert_eq!(figure(&d, "l4lb_kernel_bulk_trials_total"), 1.0);
    assert_eq!(figure(&d, "l4lb_kernel_bulk_trials_lost_total"), 1.0);
    // Moved on trial, and again once slow.
    assert_eq!(figure(&d, "l4lb_kernel_promotion_age_seconds_count"), 2.0);
    assert_eq!(ended_on(&d).await, "kernel");
}
