//! The kernel splice path end to end: the real binary (eBPF loaded for real, as root)
//! against real sockets on 127.0.0.1. Every daemon here runs with `splice = "required"`,
//! so a kernel path that cannot load fails the test loudly; `L4LB_NO_EBPF=1` skips the
//! kernel cases on purpose, saying so.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::stream::{exchange, recv_stream, send_stream, stream_backend, Plan, Progress};
use support::{free_port, log_field, roundtrip, Backend, Behaviour, Daemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: u64 = 1 << 20;

/// False (with a note) when the run asked to skip the eBPF cases.
fn kernel_wanted(test: &str) -> bool {
    if std::env::var("L4LB_NO_EBPF").is_ok_and(|v| v == "1") {
        eprintln!("{test}: skipped by request (L4LB_NO_EBPF=1)");
        return false;
    }
    true
}

fn config(listen: u16, backend: SocketAddr, splice: &str, extra: &str) -> String {
    let admin = free_port();
    format!(
        r#"
[global]
splice = "required"
# Into the kernel at once: these tests are about the kernel path itself.
splice_after_time = 0
access_log = true

[admin]
listen = "127.0.0.1:{admin}"

[upstream.u]
servers = [{{ address = "{backend}" }}]

[[server]]
listen = "127.0.0.1:{listen}"
proxy_pass = "u"
proxy_connect_timeout = "2s"
splice = "{splice}"
{extra}
"#
    )
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The kernel path's figures from `/metrics`, as one ` name=value` line for [`stat`].
fn stats(d: &Daemon) -> String {
    let s = d.scrape();
    let get = |name: &str, labels: &[(&str, &str)]| {
        support::metric(&s, name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in /metrics")) as u64
    };
    let mut line = String::new();
    for (key, name, labels) in [
        ("sessions", "l4lb_kernel_sessions", &[][..]),
        ("flows", "l4lb_kernel_map_entries", &[("map", "flows")][..]),
        ("ctl", "l4lb_kernel_map_entries", &[("map", "ctl")][..]),
        (
            "targets",
            "l4lb_kernel_map_entries",
            &[("map", "targets")][..],
        ),
        (
            "attached",
            "l4lb_kernel_map_entries",
            &[("map", "attached")][..],
        ),
        (
            "watched",
            "l4lb_kernel_map_entries",
            &[("map", "watched")][..],
        ),
        ("pauses", "l4lb_kernel_pauses_total", &[][..]),
        ("holds", "l4lb_kernel_holds_total", &[][..]),
        ("trimmed", "l4lb_kernel_trimmed_bytes_total", &[][..]),
        ("lagging", "l4lb_kernel_lag_moves_total", &[][..]),
        (
            "bytes_spliced",
            "l4lb_bytes_total",
            &[("path", "kernel")][..],
        ),
        ("bytes_copied", "l4lb_bytes_total", &[("path", "copy")][..]),
    ] {
        line.push_str(&format!(" {key}={}", get(name, labels)));
    }
    line
}

/// Busy CPU time of the whole machine so far (all cores, /proc/stat), in seconds.
fn machine_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy: u64 = f
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    // SAFETY: sysconf has no memory-safety preconditions.
    busy as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

fn stat(line: &str, name: &str) -> u64 {
    log_field(line, name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {line}"))
}

/// Moves `size` bytes each way through `port` and checks them; returns the seconds taken.
async fn bulk(
    d: &Daemon,
    port: u16,
    backend_rx: &mut tokio::sync::mpsc::UnboundedReceiver<std::io::Result<u64>>,
    size: u64,
) -> f64 {
    let start = Instant::now();
    let sock = TcpStream::connect(addr(port)).await.expect("connect");
    let client = Plan {
        send: size,
        send_seed: 1,
        recv_seed: 2,
        read_rate: None,
        send_rate: None,
    };
    let got = match tokio::time::timeout(
        Duration::from_secs(120),
        exchange(sock, client, Arc::default()),
    )
    .await
    {
        Ok(Ok(n)) => n,
        other => panic!("client stream: {other:?}; log:\n{}", d.log()),
    };
    assert_eq!(got, size, "client received; log:\n{}", d.log());
    let back = match tokio::time::timeout(Duration::from_secs(30), backend_rx.recv()).await {
        Ok(Some(Ok(n))) => n,
        other => panic!("backend stream: {other:?}; log:\n{}", d.log()),
    };
    assert_eq!(back, size, "backend received; log:\n{}", d.log());
    start.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gib_each_way_kernel_vs_copy_byte_exact() {
    if !kernel_wanted("gib_each_way_kernel_vs_copy_byte_exact") {
        return;
    }
    let size = 1 << 30;
    let backend_plan = Plan {
        send: size,
        send_seed: 2,
        recv_seed: 1,
        read_rate: None,
        send_rate: None,
    };
    let (baddr, mut brx, _) = stream_backend(backend_plan).await;
    let (kport, cport) = (free_port(), free_port());
    let cfg = format!(
        "{}\n[[server]]\nlisten = \"127.0.0.1:{cport}\"\nproxy_pass = \"u\"\nsplice = \"off\"\n",
        config(kport, baddr, "required", "")
    );
    let d = Daemon::start(&cfg);

    let s0 = stats(&d);
    let (cpu0, m0) = (d.cpu_seconds(), machine_cpu_seconds());
    let kernel_s = bulk(&d, kport, &mut brx, size).await;
    let (kernel_cpu, kernel_machine) = (d.cpu_seconds() - cpu0, machine_cpu_seconds() - m0);
    let line = d
        .wait_access_lines(1, Duration::from_secs(10))
        .await
        .remove(0);
    let path = log_field(&line, "path").unwrap_or_default();
    // Pauses keep the kernel's queues bounded, so the session stays in the kernel; a
    // paused source that closes hands its last bytes to userspace, well under 1%.
    assert_eq!(path, "kernel", "{line}; log:\n{}", d.log());
    assert_eq!(log_field(&line, "end"), Some("closed"), "{line}");
    assert_eq!(log_field(&line, "sent"), Some("1073741824"), "{line}");
    assert_eq!(log_field(&line, "received"), Some("1073741824"), "{line}");
    let s = stats(&d);
    if std::env::var("L4LB_TEST_DUMP").is_ok() {
        eprintln!("{}", d.log());
    }
    let copied = stat(&s, "bytes_copied") - stat(&s0, "bytes_copied");
    let spliced = stat(&s, "bytes_spliced") - stat(&s0, "bytes_spliced");
    assert_eq!(copied + spliced, 2 * size, "{s}");
    assert!(
        copied * 100 <= 2 * size,
        "more than 1% through userspace: {s}"
    );

    let (cpu1, m1) = (d.cpu_seconds(), machine_cpu_seconds());
    let copy_s = bulk(&d, cport, &mut brx, size).await;
    let (copy_cpu, copy_machine) = (d.cpu_seconds() - cpu1, machine_cpu_seconds() - m1);
    let line = d
        .wait_access_lines(2, Duration::from_secs(10))
        .await
        .remove(1);
    assert_eq!(log_field(&line, "path"), Some("copy:splice_off"), "{line}");

    let gb = 2.0 * size as f64 / 1e9;
    eprintln!(
        "MEASURE 1 GiB each way (test endpoints included in machine CPU): kernel {:.2} s ({:.2} Gbit/s, \
         daemon CPU {:.3} s/GB, machine CPU {:.2} s/GB, path {path}, userspace {} of {} bytes, holds {}, pauses {}, trimmed {}); \
         copy {:.2} s ({:.2} Gbit/s, daemon CPU {:.3} s/GB, machine CPU {:.2} s/GB)",
        kernel_s,
        gb * 8.0 / kernel_s,
        kernel_cpu / gb,
        kernel_machine / gb,
        copied,
        2 * size,
        stat(&s, "holds"),
        stat(&s, "pauses"),
        stat(&s, "trimmed"),
        copy_s,
        gb * 8.0 / copy_s,
        copy_cpu / gb,
        copy_machine / gb
    );
}

/// The client sends everything and half-closes; the backend answers only after EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_still_gets_the_response() {
    if !kernel_wanted("client_half_close_still_gets_the_response") {
        return;
    }
    let b = Backend::start(Behaviour::Count).await;
    let port = free_port();
    let d = Daemon::start(&config(port, b.addr, "required", ""));
    for size in [1usize, 100_000, 32 << 20] {
        let data = support::payload(size, size as u64);
        let got = tokio::time::timeout(Duration::from_secs(30), roundtrip(addr(port), &data))
            .await
            .expect("timed out")
            .expect("roundtrip");
        assert_eq!(String::from_utf8_lossy(&got), format!("{size}\n"));
    }
    let lines = d.wait_access_lines(3, Duration::from_secs(10)).await;
    for l in &lines {
        assert_eq!(log_field(l, "end"), Some("closed"), "{l}");
    }
    // The big one cannot have raced its FIN into the insert.
    assert_eq!(log_field(&lines[2], "path"), Some("kernel"), "{}", lines[2]);
}

/// The backend sends its whole response and half-closes first; the client then uploads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_half_close_first_then_client_uploads() {
    if !kernel_wanted("server_half_close_first_then_client_uploads") {
        return;
    }
    let size = 16 * MIB;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let baddr = listener.local_addr().unwrap();
    let (tx, mut backend) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = sock.into_split();
                let p = Progress::default();
                let r = async {
                    send_stream(&mut w, 5, size, None, &p.sent).await?;
                    w.shutdown().await?;
                    recv_stream(&mut r, 6, None, &p.received).await
                };
                let _ = tx.send(r.await);
            });
        }
    });
    let port = free_port();
    let d = Daemon::start(&config(port, baddr, "required", ""));
    let sock = TcpStream::connect(addr(port)).await.unwrap();
    let (mut r, mut w) = sock.into_split();
    let p = Progress::default();
    let got = tokio::time::timeout(
        Duration::from_secs(30),
        recv_stream(&mut r, 5, None, &p.received),
    )
    .await
    .expect("download timed out")
    .expect("download");
    assert_eq!(got, size);
    send_stream(&mut w, 6, size, None, &p.sent).await.unwrap();
    w.shutdown().await.unwrap();
    let up = tokio::time::timeout(Duration::from_secs(30), backend.recv())
        .await
        .expect("backend timed out")
        .unwrap()
        .expect("upload");
    assert_eq!(up, size);
    let line = d
        .wait_access_lines(1, Duration::from_secs(10))
        .await
        .remove(0);
    assert_eq!(log_field(&line, "path"), Some("kernel"), "{line}");
    assert_eq!(log_field(&line, "end"), Some("closed"), "{line}");
}

/// A reset on either side ends the spliced session promptly and is logged as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_from_either_side_ends_the_session() {
    if !kernel_wanted("reset_from_either_side_ends_the_session") {
        return;
    }
    // Backend that reads a little, then resets.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let baddr = listener.local_addr().unwrap();
    let (btx, mut brx) = tokio::sync::mpsc::unbounded_channel::<TcpStream>();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let _ = btx.send(sock);
        }
    });
    let port = free_port();
    let d = Daemon::start(&config(port, baddr, "required", ""));

    // 1. The backend resets.
    let mut c = TcpStream::connect(addr(port)).await.unwrap();
    let mut b = brx.recv().await.unwrap();
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    b.read_exact(&mut buf).await.unwrap();
    b.write_all(b"pong").await.unwrap();
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    socket2::SockRef::from(&b)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(b);
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
        .await
        .expect("client not told of the backend reset");
    assert!(r.is_err() || rest.is_empty(), "{r:?}");
    let line = d
        .wait_access_lines(1, Duration::from_secs(5))
        .await
        .remove(0);
    assert_eq!(log_field(&line, "path"), Some("kernel"), "{line}");
    assert_eq!(log_field(&line, "end"), Some("backend_reset"), "{line}");

    // 2. The client resets.
    let mut c = TcpStream::connect(addr(port)).await.unwrap();
    let mut b = brx.recv().await.unwrap();
    c.write_all(b"ping").await.unwrap();
    b.read_exact(&mut buf).await.unwrap();
    b.write_all(b"pong").await.unwrap();
    c.read_exact(&mut buf).await.unwrap();
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), b.read_to_end(&mut rest))
        .await
        .expect("backend not told of the client reset");
    assert!(r.is_err() || rest.is_empty(), "{r:?}");
    let line = d
        .wait_access_lines(2, Duration::from_secs(5))
        .await
        .remove(1);
    assert_eq!(log_field(&line, "path"), Some("kernel"), "{line}");
    assert_eq!(log_field(&line, "end"), Some("client_reset"), "{line}");
}

/// Clients gone before the backend connection exists, or sending data and FIN at once
/// (no longer ESTABLISHED at insert): no leak, no loss, the daemon keeps serving.
/// (The daemon's loopback connect takes about 100 µs, so "before" is a race these
/// clients mostly win; the log line counts show which path each took.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_closing_early_leak_nothing() {
    if !kernel_wanted("clients_closing_early_leak_nothing") {
        return;
    }
    let b = Backend::start(Behaviour::Echo).await;
    let port = free_port();
    let d = Daemon::start(&config(port, b.addr, "required", ""));
    let fds0 = d.fd_count();
    // Gone before the daemon's backend connect finished: the client socket is no longer
    // ESTABLISHED when the session reaches the kernel path.
    for _ in 0..100 {
        drop(TcpStream::connect(addr(port)).await.unwrap());
    }
    // Data and FIN at once: many of these are no longer ESTABLISHED at insert.
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        tasks.push(tokio::spawn(async move {
            let data = support::payload(1000 + i as usize, i);
            let got = roundtrip(addr(port), &data).await.unwrap();
            assert!(got == data, "echo {i} differs");
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("timed out")
            .unwrap();
    }
    let lines = d.wait_access_lines(300, Duration::from_secs(20)).await;
    let kernel = lines
        .iter()
        .filter(|l| log_field(l, "path") == Some("kernel"))
        .count();
    let fallback = lines
        .iter()
        .filter(|l| log_field(l, "path") == Some("copy:insert_failed"))
        .count();
    eprintln!("early closes: {kernel} spliced, {fallback} fell back to copy (insert failed)");
    let s = stats(&d);
    for k in ["sessions", "flows", "ctl", "targets", "attached", "watched"] {
        assert_eq!(stat(&s, k), 0, "{k} left: {s}");
    }
    assert!(d.fd_count() <= fds0 + 2, "fds {} -> {}", fds0, d.fd_count());
}

/// Slow readers both ways, 256 MiB at 4 MiB/s each way (about a minute): nothing lost,
/// the idle timeout does not fire while bytes move slowly, the daemon's memory stays
/// flat, and what is buffered between sender and reader stays bounded while the session
/// stays in the kernel: the program pauses a direction whose reader lags (see
/// `l4lb-user/src/splice/accounting.rs`), where an unguarded splice queues nearly all of
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_both_ways_lose_nothing() {
    if !kernel_wanted("slow_readers_both_ways_lose_nothing") {
        return;
    }
    let size = 256 * MIB;
    let rate = 4 * MIB;
    let backend_plan = Plan {
        send: size,
        send_seed: 8,
        recv_seed: 7,
        read_rate: Some(rate),
        send_rate: None,
    };
    let (baddr, mut brx, bprog) = stream_backend(backend_plan).await;
    let port = free_port();
    // A short proxy_timeout: it must not fire while bytes move slowly.
    let d = Daemon::start(&config(port, baddr, "required", "proxy_timeout = \"3s\""));
    let rss0 = d.rss_kib();
    let cprog = Arc::new(Progress::default());
    let sock = TcpStream::connect(addr(port)).await.unwrap();
    let client = Plan {
        send: size,
        send_seed: 7,
        recv_seed: 8,
        read_rate: Some(rate),
        send_rate: None,
    };
    let run = tokio::spawn(exchange(sock, client, Arc::clone(&cprog)));
    let mut max_down = 0u64;
    let mut max_up = 0u64;
    let mut max_rss = 0u64;
    let deadline = Instant::now() + Duration::from_secs(150);
    while !run.is_finished() {
        assert!(Instant::now() < deadline, "slow transfer did not finish");
        // Bytes a sender has handed to its kernel that the reader has not read yet:
        // everything buffered anywhere on the way, the daemon's sockets included.
        max_down = max_down.max(
            bprog
                .sent
                .load(Ordering::Relaxed)
                .saturating_sub(cprog.received.load(Ordering::Relaxed)),
        );
        max_up = max_up.max(
            cprog
                .sent
                .load(Ordering::Relaxed)
                .saturating_sub(bprog.received.load(Ordering::Relaxed)),
        );
        max_rss = max_rss.max(d.rss_kib());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = run.await.unwrap();
    assert!(
        matches!(got, Ok(n) if n == size),
        "client: {got:?}; log:\n{}",
        d.log()
    );
    let back = brx.recv().await.unwrap();
    assert!(
        matches!(back, Ok(n) if n == size),
        "backend: {back:?}; log:\n{}",
        d.log()
    );
    let line = d
        .wait_access_lines(1, Duration::from_secs(10))
        .await
        .remove(0);
    assert_eq!(log_field(&line, "path"), Some("kernel"), "{line}");
    assert_eq!(log_field(&line, "end"), Some("closed"), "{line}");
    let s = stats(&d);
    eprintln!(
        "MEASURE slow readers 4 MiB/s: in flight max down {:.1} MiB, up {:.1} MiB; daemon RSS {} -> max {} KiB; \
         userspace {} of {} bytes; holds {}; lagging {}; pauses {}; trimmed {}",
        max_down as f64 / MIB as f64,
        max_up as f64 / MIB as f64,
        rss0,
        max_rss,
        stat(&s, "bytes_copied"),
        2 * size,
        stat(&s, "holds"),
        stat(&s, "lagging"),
        stat(&s, "pauses"),
        stat(&s, "trimmed")
    );
    assert!(
        max_rss < rss0 + 32 * 1024,
        "daemon RSS grew from {rss0} to {max_rss} KiB"
    );
    assert!(stat(&s, "pauses") > 0, "no pause: {s}");
    // The pause threshold (4 MiB), the paused source's capped receive buffer, and what
    // the sockets on the way buffer themselves (the readers' receive buffers autotune up
    // to net.ipv4.tcp_rmem's maximum, 32 MiB on these machines). Measured: about 25 MiB.
    let bound = 64 * MIB;
    assert!(
        max_down < bound && max_up < bound,
        "in flight down {max_down}, up {max_up} bytes; bound {bound}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_spliced_session_expires_at_proxy_timeout() {
    if !kernel_wanted("idle_spliced_session_expires_at_proxy_timeout") {
        return;
    }
    let b = Backend::start(Behaviour::Echo).await;
    let port = free_port();
    let d = Daemon::start(&config(port, b.addr, "required", "proxy_timeout = \"1s\""));
    let mut c = TcpStream::connect(addr(port)).await.unwrap();
    c.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    c.read_exact(&mut buf).await.unwrap();
    let idle_from = Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut rest))
        .await
        .expect("idle session not closed");
    let idle = idle_from.elapsed();
    assert!(idle >= Duration::from_millis(900), "closed after {idle:?}");
    assert!(idle < Duration::from_secs(4), "closed after {idle:?}");
    let line = d
        .wait_access_lines(1, Duration::from_secs(5))
        .await
        .remove(0);
    assert_eq!(log_field(&line, "path"), Some("kernel"), "{line}");
    assert_eq!(log_field(&line, "end"), Some("idle_timeout"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spliced_sessions_cut_at_shutdown_are_logged_with_server_and_bytes() {
    if !kernel_wanted("spliced_sessions_cut_at_shutdown_are_logged_with_server_and_bytes") {
        return;
    }
    let b = Backend::start(Behaviour::Echo).await;
    let port = free_port();
    let conf = config(port, b.addr, "required", "").replace(
        "[global]\n",
        "[global]\nworker_shutdown_timeout = \"500ms\"\n",
    );
    let d = Daemon::start(&conf);
    let echo = |c: &'static str, len: usize| async move {
        let mut s = TcpStream::connect(addr(port)).await.expect(c);
        let data = support::payload(len, len as u64);
        s.write_all(&data).await.expect(c);
        let mut echoed = vec![0u8; len];
        s.read_exact(&mut echoed).await.expect(c);
        assert!(echoed == data, "{c}: echo differs");
        s
    };
    // One session asleep in the kernel (no task), one running there.
    let _asleep = echo("asleep", 1000).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let dormant = || support::metric(&d.scrape(), "l4lb_kernel_dormant_sessions", &[]);
    while dormant() != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "no session fell asleep: {}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _running = echo("running", MIB as usize).await;
    d.signal(libc::SIGTERM);
    assert!(
        d.wait_exit(Duration::from_secs(10)).is_some(),
        "{}",
        d.log()
    );
    let lines = d.wait_access_lines(2, Duration::from_secs(1)).await;
    let server = b.addr.to_string();
    let mut received = Vec::new();
    for line in &lines {
        for (field, want) in [
            ("end", "shutdown"),
            ("path", "kernel"),
            ("server", server.as_str()),
        ] {
            assert_eq!(log_field(line, field), Some(want), "{line}");
        }
        assert_eq!(
            log_field(line, "sent"),
            log_field(line, "received"),
            "{line}"
        );
        received.push(log_field(line, "received").unwrap_or_default().to_string());
    }
    received.sort_by_key(|r| r.len());
    assert_eq!(received, ["1000", "1048576"], "{lines:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_sessions_leave_maps_empty_and_no_fds() {
    if !kernel_wanted("ten_thousand_sessions_leave_maps_empty_and_no_fds") {
        return;
    }
    let b = Backend::start(Behaviour::Echo).await;
    let port = free_port();
    let d = Daemon::start_with_env(
        &config(port, b.addr, "required", ""),
        &[(
            "L4LB_LOG",
            "warn,access=info,l4lb::daemon=info,l4lb::splice=info",
        )],
    );
    let fds0 = d.fd_count();
    let total = 10_000u64;
    let workers = 50u64;
    let mut tasks = Vec::new();
    for w in 0..workers {
        tasks.push(tokio::spawn(async move {
            for k in 0..total / workers {
                let mut s = TcpStream::connect(addr(port)).await.unwrap();
                let msg = format!("session {w}/{k}\n");
                s.write_all(msg.as_bytes()).await.unwrap();
                let mut back = vec![0u8; msg.len()];
                s.read_exact(&mut back).await.unwrap();
                assert_eq!(back, msg.as_bytes());
                s.shutdown().await.unwrap();
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).await.unwrap();
                assert!(rest.is_empty());
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(240), t)
            .await
            .expect("timed out")
            .unwrap();
    }
    let lines = d
        .wait_access_lines(total as usize, Duration::from_secs(30))
        .await;
    let kernel = lines
        .iter()
        .filter(|l| log_field(l, "path") == Some("kernel"))
        .count();
    assert!(
        kernel as u64 >= total * 9 / 10,
        "only {kernel} of {total} spliced"
    );
    assert!(
        lines.iter().all(|l| log_field(l, "end") == Some("closed")),
        "a session did not close cleanly"
    );
    let s = stats(&d);
    for k in ["sessions", "flows", "ctl", "targets", "attached", "watched"] {
        assert_eq!(stat(&s, k), 0, "{k} left: {s}");
    }
    assert!(d.fd_count() <= fds0 + 2, "fds {} -> {}", fds0, d.fd_count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_on_one_host_splice_independently() {
    if !kernel_wanted("two_daemons_on_one_host_splice_independently") {
        return;
    }
    let b = Backend::start(Behaviour::Echo).await;
    let (p1, p2) = (free_port(), free_port());
    let d1 = Daemon::start(&config(p1, b.addr, "required", ""));
    let d2 = Daemon::start(&config(p2, b.addr, "required", ""));
    let data = support::payload(8 << 20, 3);
    let (r1, r2) = tokio::join!(roundtrip(addr(p1), &data), roundtrip(addr(p2), &data));
    assert!(r1.unwrap() == data && r2.unwrap() == data, "echo differs");
    for d in [&d1, &d2] {
        let line = d
            .wait_access_lines(1, Duration::from_secs(10))
            .await
            .remove(0);
        assert_eq!(log_field(&line, "path"), Some("kernel"), "{line}");
        assert_eq!(log_field(&line, "end"), Some("closed"), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_off_and_rate_limited_take_the_copy_path() {
    if !kernel_wanted("splice_off_and_rate_limited_take_the_copy_path") {
        return;
    }
    let b = Backend::start(Behaviour::Echo).await;
    let (off, limited) = (free_port(), free_port());
    let cfg = format!(
        "{}\n[[server]]\nlisten = \"127.0.0.1:{limited}\"\nproxy_pass = \"u\"\nproxy_download_rate = \"10m\"\n",
        config(off, b.addr, "off", "")
    );
    let d = Daemon::start(&cfg);
    let data = support::payload(100_000, 9);
    assert!(roundtrip(addr(off), &data).await.unwrap() == data);
    let first = d
        .wait_access_lines(1, Duration::from_secs(10))
        .await
        .remove(0);
    assert!(roundtrip(addr(limited), &data).await.unwrap() == data);
    let second = d
        .wait_access_lines(2, Duration::from_secs(10))
        .await
        .remove(1);
    assert_eq!(
        log_field(&first, "path"),
        Some("copy:splice_off"),
        "{first}"
    );
    assert_eq!(
        log_field(&second, "path"),
        Some("copy:rate_limited"),
        "{second}"
    );
}
