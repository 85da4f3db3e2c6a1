//! Failure semantics end to end: retries, passive health, timeouts, misbehaving peers.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{connect_tagged, free_port, Backend, Behaviour, Daemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(listen: u16, servers: &str, extra: &str) -> String {
    format!(
        r#"
[global]
splice = "off"

[upstream.u]
servers = [{servers}]

[[server]]
listen = "127.0.0.1:{listen}"
proxy_pass = "u"
proxy_connect_timeout = "500ms"
{extra}
"#
    )
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_upstream_hides_a_dead_server_over_1000_connections() {
    let dead = free_port();
    let live = Backend::start(Behaviour::Echo).await;
    let port = free_port();
    let servers = format!(
        "{{ address = \"127.0.0.1:{dead}\", max_fails = 1, fail_timeout = \"200ms\" }}, {{ address = \"{}\" }}",
        live.addr
    );
    let d = Daemon::start(&config(port, &servers, ""));
    let failures = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..20u64 {
        let failures = Arc::clone(&failures);
        tasks.push(tokio::spawn(async move {
            for i in 0..50u64 {
                let msg = format!("client {t} message {i}");
                match support::roundtrip(addr(port), msg.as_bytes()).await {
                    Ok(echo) if echo == msg.as_bytes() => {}
                    _ => {
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::SeqCst), 0, "log:\n{}", d.log());
    assert!(live.accepted() >= 1000);
    // The dead server was really tried (and its failures hidden from clients).
    assert!(
        d.log().contains("connect to upstream failed"),
        "{}",
        d.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_fails_marks_a_server_down_for_fail_timeout_then_it_recovers() {
    let flaky = free_port();
    let good = Backend::start(Behaviour::Tagged("good".into())).await;
    let port = free_port();
    let servers = format!(
        "{{ address = \"127.0.0.1:{flaky}\", max_fails = 2, fail_timeout = \"2s\" }}, {{ address = \"{}\" }}",
        good.addr
    );
    let d = Daemon::start(&config(port, &servers, ""));
    // Round-robin sends every other connection to the flaky server until it fails twice.
    for _ in 0..6 {
        assert_eq!(connect_tagged(addr(port)).await.unwrap().0, "good");
    }
    assert!(
        d.wait_log("server marked unavailable", Duration::from_secs(2)),
        "{}",
        d.log()
    );
    let marked = Instant::now();
    let back = Backend::start_on(addr(flaky), Behaviour::Tagged("flaky".into())).await;
    // Within fail_timeout, it gets nothing although it listens again.
    while marked.elapsed() < Duration::from_millis(1500) {
        assert_eq!(connect_tagged(addr(port)).await.unwrap().0, "good");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(back.accepted(), 0);
    // After fail_timeout it is used again.
    let recovered = support::wait_until(Duration::from_secs(3), || back.accepted() > 0);
    let traffic = async {
        for _ in 0..60 {
            let _ = connect_tagged(addr(port)).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (took, ()) = tokio::join!(recovered, traffic);
    assert!(took.is_some(), "server never recovered");
    assert!(marked.elapsed() >= Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_on_a_full_backlog_then_next_server() {
    // A listener that never accepts, with its backlog filled: further SYNs are dropped,
    // as with a blackholed address.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&addr(0).into()).unwrap();
    sock.listen(0).unwrap();
    let full: SocketAddr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(full)).await
        {
            fillers.push(s);
        }
    }
    let good = Backend::start(Behaviour::Tagged("good".into())).await;
    let port = free_port();
    let servers = format!(
        "{{ address = \"{full}\" }}, {{ address = \"{}\" }}",
        good.addr
    );
    let d = Daemon::start(&config(port, &servers, ""));
    let mut slowest = Duration::ZERO;
    for _ in 0..2 {
        let t = Instant::now();
        assert_eq!(connect_tagged(addr(port)).await.unwrap().0, "good");
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        d.wait_log("timed out after 500ms", Duration::from_secs(2)),
        "{}",
        d.log()
    );
    assert!(
        slowest >= Duration::from_millis(450) && slowest < Duration::from_secs(3),
        "{slowest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tries_and_timeout_bound_the_retries() {
    let dead: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let servers = dead
        .iter()
        .map(|p| format!("{{ address = \"127.0.0.1:{p}\", max_fails = 0 }}"))
        .collect::<Vec<_>>()
        .join(", ");
    let port = free_port();
    let d = Daemon::start(&config(port, &servers, "proxy_next_upstream_tries = 2\n"));
    let mut s = TcpStream::connect(addr(port)).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "client must see a closed connection"
    );
    assert!(d.wait_log("2 tried", Duration::from_secs(2)), "{}", d.log());

    let port2 = free_port();
    let d2 = Daemon::start(&config(port2, &servers, "proxy_next_upstream = false\n"));
    let mut s = TcpStream::connect(addr(port2)).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap();
    assert!(
        d2.wait_log("1 tried", Duration::from_secs(2)),
        "{}",
        d2.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_peers_do_not_disturb_others() {
    let reset = Backend::start(Behaviour::Reset).await;
    let echo = Backend::start(Behaviour::Echo).await;
    let port_reset = free_port();
    let port_echo = free_port();
    let cfg = format!(
        r#"
[global]
splice = "off"
[upstream.r]
servers = [{{ address = "{}" }}]
[upstream.e]
servers = [{{ address = "{}" }}]
[[server]]
listen = "127.0.0.1:{port_reset}"
proxy_pass = "r"
[[server]]
listen = "127.0.0.1:{port_echo}"
proxy_pass = "e"
proxy_timeout = "300ms"
"#,
        reset.addr, echo.addr
    );
    let d = Daemon::start(&cfg);
    // A backend that accepts and resets: the client sees the connection end.
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr(port_reset)).await.unwrap();
        let _ = s.write_all(b"hello").await;
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(r, Ok(0) | Err(_)));
    }
    // Clients that connect and send nothing are closed at proxy_timeout.
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(addr(port_echo)).await.unwrap());
    }
    // Meanwhile everyone else is served.
    for i in 0..50 {
        let msg = format!("m{i}");
        assert_eq!(
            support::roundtrip(addr(port_echo), msg.as_bytes())
                .await
                .unwrap(),
            msg.as_bytes()
        );
    }
    for mut s in silent {
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(r, Ok(0) | Err(_)));
    }
    assert!(
        d.wait_log_count("end=idle_timeout", 20, Duration::from_secs(3)),
        "{}",
        d.log()
    );
    assert!(d.exited().is_none(), "daemon died");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_in_use_at_start_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let d = Daemon::spawn(&config(port, "{ address = \"127.0.0.1:1\" }", ""), &[]);
    let status = d
        .wait_exit(Duration::from_secs(10))
        .expect("daemon should exit");
    assert!(!status.success());
    let log = d.log();
    assert!(
        log.contains(&format!("cannot listen on 127.0.0.1:{port}")) && log.contains("in use"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_exhaustion_backs_off_and_recovers() {
    let echo = Backend::start(Behaviour::Echo).await;
    let port = free_port();
    let d = Daemon::start(&config(
        port,
        &format!("{{ address = \"{}\" }}", echo.addr),
        "",
    ));
    let base = d.fd_count() as u64;
    // Leave room for a handful of sessions (two descriptors each).
    let limit = libc::rlimit {
        rlim_cur: base + 8,
        rlim_max: base + 8,
    };
    // SAFETY: prlimit(2) on our own child with a valid rlimit struct.
    assert_eq!(
        unsafe { libc::prlimit(d.pid(), libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) },
        0
    );
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(TcpStream::connect(addr(port)).await.unwrap());
    }
    // Out of descriptors either at accept (it backs off) or, with one descriptor left,
    // at the backend connect (the client is closed, the server not blamed): which one
    // depends on how many descriptors the sessions left.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(d.log().contains("accept failed; backing off")
        || d.log().contains("Too many open files"))
    {
        assert!(
            Instant::now() < deadline,
            "no sign of descriptor exhaustion:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Backing off, not spinning: the daemon's CPU time stays low while it is out of fds.
    let before = d.cpu_seconds();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = d.cpu_seconds() - before;
    assert!(
        used < 0.3,
        "daemon used {used:.2} CPU-s in 1 s while out of descriptors"
    );
    let errors_logged = d.log().matches("accept failed; backing off").count();
    assert!(
        errors_logged <= 2,
        "logged {errors_logged} times in about a second"
    );
    // Once sessions end, new clients are served again.
    drop(held);
    let mut ok = false;
    for _ in 0..50 {
        if let Ok(echoed) = support::roundtrip(addr(port), b"back").await {
            if echoed == b"back" {
                ok = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "not serving after descriptors were freed:\n{}", d.log());
    assert!(d.exited().is_none());
}
