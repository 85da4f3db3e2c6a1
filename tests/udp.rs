//! UDP end to end: sessions per client address, datagram boundaries, responses, expiry.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::{free_udp_port, Daemon, UdpBackend};
use tokio::net::UdpSocket;

fn config(listen: u16, backends: &[&UdpBackend], extra: &str) -> String {
    let servers = backends
        .iter()
        .map(|b| format!("{{ address = \"{}\" }}", b.addr))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"
[upstream.u]
servers = [{servers}]

[[server]]
listen = "127.0.0.1:{listen}"
protocol = "udp"
proxy_pass = "u"
{extra}
"#
    )
}

async fn recv(sock: &UdpSocket) -> Option<String> {
    let mut buf = vec![0u8; 65_535];
    match tokio::time::timeout(Duration::from_secs(3), sock.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        _ => None,
    }
}

async fn client(listen: u16) -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.connect(SocketAddr::from(([127, 0, 0, 1], listen)))
        .await
        .unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_keeps_datagram_boundaries_and_session_affinity() {
    let a = UdpBackend::start("a").await;
    let b = UdpBackend::start("b").await;
    let port = free_udp_port();
    let _d = Daemon::start(&config(port, &[&a, &b], "proxy_timeout = \"5s\""));
    let c1 = client(port).await;
    let c2 = client(port).await;
    let sizes = [1usize, 1000, 8000, 60_000];
    let mut first_tag = None;
    for &n in &sizes {
        let msg = "x".repeat(n);
        c1.send(msg.as_bytes()).await.unwrap();
        let reply = recv(&c1).await.expect("reply");
        let (tag, body) = reply.split_once(':').unwrap();
        assert_eq!(body.len(), n, "datagram boundary lost");
        // One session per client address: every datagram goes to the same server.
        assert!(first_tag.is_none() || first_tag.as_deref() == Some(tag));
        first_tag = Some(tag.to_string());
    }
    c2.send(b"hi").await.unwrap();
    let other = recv(&c2).await.unwrap();
    assert_ne!(
        other.split_once(':').unwrap().0,
        first_tag.unwrap(),
        "round robin across sessions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_end_after_proxy_responses_or_idle_timeout() {
    let a = UdpBackend::start("a").await;
    let port = free_udp_port();
    let d = Daemon::start(&config(
        port,
        &[&a],
        "proxy_responses = 1\nproxy_timeout = \"300ms\"",
    ));
    let c = client(port).await;
    for i in 0..3 {
        c.send(format!("q{i}").as_bytes()).await.unwrap();
        assert_eq!(recv(&c).await.unwrap(), format!("a:q{i}"));
    }
    assert!(
        d.wait_log_count("end=responses", 3, Duration::from_secs(3)),
        "{}",
        d.log()
    );
    // Two datagrams at once (a resolver's A and AAAA queries): the session waits for a
    // reply to each, as nginx counts proxy_responses per datagram.
    let c = client(port).await;
    c.send(b"A").await.unwrap();
    c.send(b"AAAA").await.unwrap();
    let mut got = vec![recv(&c).await, recv(&c).await];
    got.sort();
    assert_eq!(
        got,
        [Some("a:A".to_string()), Some("a:AAAA".to_string())],
        "{}",
        d.log()
    );
    assert!(
        d.wait_log_count("end=responses", 4, Duration::from_secs(3)),
        "{}",
        d.log()
    );

    let port2 = free_udp_port();
    let d2 = Daemon::start(&config(port2, &[&a], "proxy_timeout = \"300ms\""));
    let c = client(port2).await;
    c.send(b"ping").await.unwrap();
    assert_eq!(recv(&c).await.unwrap(), "a:ping");
    assert!(
        d2.wait_log("end=idle_timeout", Duration::from_secs(3)),
        "{}",
        d2.log()
    );
    // A new datagram after expiry opens a new session.
    c.send(b"again").await.unwrap();
    assert_eq!(recv(&c).await.unwrap(), "a:again");
    assert!(d2.wait_log_count("end=idle_timeout", 2, Duration::from_secs(3)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_udp_server_is_counted_and_others_served() {
    let a = UdpBackend::start("a").await;
    let dead = free_udp_port();
    let port = free_udp_port();
    let cfg = config(port, &[&a], "proxy_timeout = \"2s\"").replace(
        &format!("{{ address = \"{}\" }}", a.addr),
        &format!("{{ address = \"127.0.0.1:{dead}\", max_fails = 1, fail_timeout = \"10s\" }}, {{ address = \"{}\" }}", a.addr),
    );
    let d = Daemon::start(&cfg);
    // The first client lands on the dead server: ICMP unreachable ends its session and
    // marks the server down; later clients all reach the live one.
    let first = client(port).await;
    first.send(b"x").await.unwrap();
    assert!(
        d.wait_log("server marked unavailable", Duration::from_secs(3)),
        "{}",
        d.log()
    );
    for i in 0..5 {
        let c = client(port).await;
        c.send(format!("m{i}").as_bytes()).await.unwrap();
        assert_eq!(recv(&c).await.unwrap(), format!("a:m{i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_server_that_answers_has_its_failures_forgotten() {
    let (d, port, later, admin) =
        with_a_failed_udp_server("max_fails = 3, fail_timeout = \"30s\"", "2s").await;
    let fails = || server_state(admin, later).0;
    // The server comes up and answers a new session: the failure no longer counts.
    let server = UdpSocket::bind(("127.0.0.1", later)).await.unwrap();
    let c = client(port).await;
    c.send(b"y").await.unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = server.recv_from(&mut buf).await.unwrap();
    server.send_to(&buf[..n], from).await.unwrap();
    assert_eq!(recv(&c).await.as_deref(), Some("y"));
    // Counted just after the reply went out.
    let forgotten = support::wait_until(Duration::from_secs(2), || fails() == 0).await;
    assert!(forgotten.is_some(), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_deny_stops_a_client_that_has_a_session() {
    let a = UdpBackend::start("a").await;
    let port = free_udp_port();
    let cfg = config(port, &[&a], "proxy_timeout = \"10s\"");
    let d = Daemon::start(&cfg);
    let c = client(port).await;
    c.send(b"before").await.unwrap();
    assert_eq!(recv(&c).await.as_deref(), Some("a:before"));
    d.reload(&format!("{cfg}access = [\"deny 127.0.0.1\"]\n"));
    c.send(b"after").await.unwrap();
    assert_eq!(
        recv(&c).await,
        None,
        "a denied client's datagram was forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_listener_serves_its_sessions_to_their_end() {
    let a = UdpBackend::start("a").await;
    let (port, other) = (free_udp_port(), free_udp_port());
    let cfg = config(port, &[&a], "proxy_timeout = \"1s\"");
    let d = Daemon::start(&cfg);
    let c = client(port).await;
    c.send(b"one").await.unwrap();
    assert_eq!(recv(&c).await.as_deref(), Some("a:one"));
    // The listener moves to another port: the open session goes on where it was.
    d.reload(&cfg.replace(&format!(":{port}\""), &format!(":{other}\"")));
    c.send(b"two").await.unwrap();
    assert_eq!(recv(&c).await.as_deref(), Some("a:two"), "{}", d.log());
    let newcomer = client(port).await;
    newcomer.send(b"new").await.unwrap();
    // Its session runs out at proxy_timeout even while the client keeps sending (it
    // would hold the port for ever), and then the old port is closed for good.
    let until = std::time::Instant::now() + Duration::from_secs(4);
    while !d.log().contains("end=idle_timeout") {
        assert!(
            std::time::Instant::now() < until,
            "the session outlived its listener: {}",
            d.log()
        );
        let _ = c.send(b"still here").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut buf = [0u8; 64];
    assert!(
        newcomer.try_recv(&mut buf).is_err(),
        "a removed listener opened a session"
    );
    let gone = support::wait_until(Duration::from_secs(5), || {
        std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
    })
    .await;
    assert!(gone.is_some(), "the removed listener's port stayed bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_added_back_while_it_drains_takes_its_sessions_back() {
    let a = UdpBackend::start("a").await;
    let (port, other) = (free_udp_port(), free_udp_port());
    let cfg = config(port, &[&a], "proxy_timeout = \"2s\"");
    let d = Daemon::start(&cfg);
    let c = client(port).await;
    c.send(b"one").await.unwrap();
    assert_eq!(recv(&c).await.as_deref(), Some("a:one"));
    d.reload(&cfg.replace(&format!(":{port}\""), &format!(":{other}\"")));
    // Back while its session still drains: its port was still bound.
    d.reload(&cfg);
    assert!(!d.log().contains("cannot open listener"), "{}", d.log());
    let newcomer = client(port).await;
    newcomer.send(b"new").await.unwrap();
    assert_eq!(
        recv(&newcomer).await.as_deref(),
        Some("a:new"),
        "{}",
        d.log()
    );
    // The old session lives on as before: no longer winding down, datagrams keep it
    // alive past proxy_timeout.
    for i in 0..8 {
        let msg = format!("again {i}");
        c.send(msg.as_bytes()).await.unwrap();
        assert_eq!(recv(&c).await, Some(format!("a:{msg}")), "{}", d.log());
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let mine = format!("client={}", c.local_addr().unwrap());
    assert!(
        !d.log().lines().any(|l| l.contains(&mine)),
        "its session ended: {}",
        d.log()
    );
    assert_eq!(
        a.received.load(std::sync::atomic::Ordering::SeqCst),
        10,
        "{}",
        d.log()
    );
}

/// A UDP server that never answers (syslog, statsd) comes back after it was taken out:
/// a session that ends without an error from it counts as a success, as in nginx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_server_that_never_answers_comes_back_after_an_error() {
    let (d, port, later, admin) = with_a_failed_udp_server("fail_timeout = \"1s\"", "1s").await;
    let state = || server_state(admin, later);
    // It comes up, takes datagrams and never answers.
    let server = UdpSocket::bind(("127.0.0.1", later)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    client(port).await.send(b"y").await.unwrap();
    let mut buf = [0u8; 16];
    let got = tokio::time::timeout(Duration::from_secs(3), server.recv_from(&mut buf)).await;
    assert!(got.is_ok(), "its one try never came: {}", d.log());
    // That session runs out at proxy_timeout with no error: the server is back.
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    while state() != (0, true) {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?} {}",
            state(),
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A daemon whose UDP upstream's primary (with `params`) has no socket yet, beside a
/// backup (the lone server of an upstream counts no failures, as in nginx), once a
/// datagram sent its way failed (ICMP unreachable). Returns the daemon, its port, the
/// primary's port and the admin API's port.
async fn with_a_failed_udp_server(params: &str, proxy_timeout: &str) -> (Daemon, u16, u16, u16) {
    let port = free_udp_port();
    let later = free_udp_port();
    let spare = free_udp_port();
    let admin = support::free_port();
    let d = Daemon::start(&format!(
        r#"
[admin]
listen = "127.0.0.1:{admin}"

[upstream.u]
servers = [{{ address = "127.0.0.1:{later}", {params} }}, {{ address = "127.0.0.1:{spare}", backup = true }}]

[[server]]
listen = "127.0.0.1:{port}"
protocol = "udp"
proxy_pass = "u"
proxy_timeout = "{proxy_timeout}"
"#
    ));
    client(port).await.send(b"x").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while server_state(admin, later).0 != 1 {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (d, port, later, admin)
}

/// The failures and availability the admin API shows for the server on `port`.
fn server_state(admin: u16, port: u16) -> (u64, bool) {
    let (status, body) = support::http_get(
        SocketAddr::from(([127, 0, 0, 1], admin)),
        &format!("/api/upstreams/u/servers/127.0.0.1:{port}"),
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    (
        v["fails"].as_u64().expect("fails"),
        v["available"].as_bool().expect("available"),
    )
}
