//! Bounded resources against hostile or careless clients: UDP sessions count against
//! `max_connections` (as nginx's worker_connections counts them); TCP accept pauses at
//! the limit without spinning and resumes; a client that resets mid-stream leaks no
//! backend socket; trickling clients cost bounded memory and silent ones end at
//! `proxy_timeout`.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::{free_port, free_udp_port, metric, Backend, Behaviour, Daemon, UdpBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

fn admin() -> (u16, String) {
    let p = free_port();
    (p, format!("[admin]\nlisten = \"127.0.0.1:{p}\"\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_sessions_count_against_max_connections() {
    let b = UdpBackend::start("u").await;
    let port = free_udp_port();
    let (_, admin) = admin();
    let d = Daemon::start(&format!(
        r#"
[global]
max_connections = 200
{admin}
[upstream.u]
servers = [{{ address = "{b}" }}]

[[server]]
listen = "127.0.0.1:{port}"
protocol = "udp"
proxy_pass = "u"
proxy_timeout = "30s"
"#,
        b = b.addr
    ));
    let fds0 = d.fd_count();
    let lb = SocketAddr::from(([127, 0, 0, 1], port));
    // 2,000 clients (source ports), one datagram each.
    let mut clients = Vec::new();
    for i in 0..2000 {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.send_to(b"hello", lb).await.unwrap();
        clients.push(s);
        // Paced so the listener's receive buffer does not drop datagrams uncounted.
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let opened = d.fd_count().saturating_sub(fds0);
    eprintln!("2,000 UDP clients, max_connections 200: {opened} sockets opened");
    assert!(
        opened <= 200,
        "{opened} upstream sockets for max_connections = 200"
    );
    let m = d.scrape();
    let refused = metric(
        &m,
        "l4lb_refused_total",
        &[("listener", &lb.to_string()), ("reason", "max_connections")],
    );
    assert!(refused >= Some(1800.0), "{refused:?}");
    assert_eq!(metric(&m, "l4lb_udp_sessions_total", &[]), Some(200.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_accept_pauses_at_max_connections_without_spinning_and_resumes() {
    let b = Backend::start(Behaviour::Echo).await;
    let port = free_port();
    let d = Daemon::start(&format!(
        r#"
[global]
max_connections = 20
splice = "off"

[upstream.u]
servers = [{{ address = "{b}" }}]

[[server]]
listen = "127.0.0.1:{port}"
proxy_pass = "u"
"#,
        b = b.addr
    ));
    let lb = SocketAddr::from(([127, 0, 0, 1], port));
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(lb).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.unwrap();
        held.push(s);
    }
    // The 21st is queued by the kernel, not served.
    let mut waiting = TcpStream::connect(lb).await.unwrap();
    waiting.write_all(b"y").await.unwrap();
    let cpu0 = d.cpu_seconds();
    let mut one = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_secs(1), waiting.read_exact(&mut one)).await;
    assert!(early.is_err(), "served beyond max_connections");
    let spent = d.cpu_seconds() - cpu0;
    assert!(
        spent < 0.1,
        "the paused daemon used {spent:.3} CPU-s in 1 s"
    );
    assert!(d.wait_log("max_connections reached", Duration::from_secs(2)));
    drop(held.pop());
    tokio::time::timeout(Duration::from_secs(5), waiting.read_exact(&mut one))
        .await
        .expect("served once a session ended")
        .unwrap();
    assert_eq!(&one, b"y");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_mid_stream_leaks_no_backend_socket() {
    let b = Backend::start(Behaviour::Echo).await;
    let port = free_port();
    let d = Daemon::start(&format!(
        r#"
[global]
splice = "off"

[upstream.u]
servers = [{{ address = "{b}" }}]

[[server]]
listen = "127.0.0.1:{port}"
proxy_pass = "u"
"#,
        b = b.addr
    ));
    let lb = SocketAddr::from(([127, 0, 0, 1], port));
    let fds0 = d.fd_count();
    for _ in 0..50 {
        let mut s = TcpStream::connect(lb).await.unwrap();
        s.write_all(&[7u8; 64 * 1024]).await.unwrap();
        let mut some = [0u8; 1024];
        s.read_exact(&mut some).await.unwrap();
        // Close with unread data and SO_LINGER 0: a reset mid-stream.
        s.set_zero_linger().unwrap();
        drop(s);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.open() > 0 || d.fd_count() > fds0 {
        assert!(
            Instant::now() < deadline,
            "after 50 client resets: {} backend connections open, daemon fds {} -> {}",
            b.open(),
            fds0,
            d.fd_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resets = d
        .access_lines()
        .iter()
        .filter(|l| support::log_field(l, "end") == Some("client_reset"))
        .count();
    assert!(resets >= 45, "{resets} of 50 ended as client_reset");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_clients_cost_bounded_memory_and_silent_ones_end_at_proxy_timeout() {
    const CLIENTS: usize = 200;
    let b = Backend::start(Behaviour::Echo).await;
    let port = free_port();
    let d = Daemon::start(&format!(
        r#"
[global]
splice = "off"

[upstream.u]
servers = [{{ address = "{b}" }}]

[[server]]
listen = "127.0.0.1:{port}"
proxy_pass = "u"
proxy_timeout = "1s"
"#,
        b = b.addr
    ));
    let lb = SocketAddr::from(([127, 0, 0, 1], port));
    let rss0 = d.rss_kib();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(TcpStream::connect(lb).await.unwrap());
    }
    // One byte every 400 ms for 2.4 s: each stays inside proxy_timeout, so it lives
    // on (nginx's proxy_timeout is the idle time between two reads or writes).
    for _ in 0..6 {
        for c in &mut clients {
            c.write_all(b".").await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let mut echoed = 0;
    for c in &mut clients {
        let mut six = [0u8; 6];
        if tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut six))
            .await
            .is_ok_and(|r| r.is_ok())
        {
            echoed += 1;
        }
    }
    assert_eq!(echoed, CLIENTS, "trickling sessions were cut");
    let grown = d.rss_kib().saturating_sub(rss0);
    eprintln!("{CLIENTS} trickling sessions: daemon RSS +{grown} KiB");
    assert!(
        grown < 16 * 1024,
        "RSS grew {grown} KiB for {CLIENTS} idle-ish sessions"
    );
    // Now silent: each ends at proxy_timeout.
    let started = Instant::now();
    let mut closed = 0;
    for c in &mut clients {
        let mut rest = Vec::new();
        if tokio::time::timeout(Duration::from_secs(4), c.read_to_end(&mut rest))
            .await
            .is_ok()
        {
            closed += 1;
        }
    }
    assert_eq!(closed, CLIENTS, "silent sessions outlived proxy_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}
