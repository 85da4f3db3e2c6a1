//! Session lifetime end to end: idle timeout, half-close, rate limits, reload, drain.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::{free_port, Backend, Behaviour, Daemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn config(listen: u16, backend: SocketAddr, extra: &str) -> String {
    format!(
        r#"
[global]
splice = "off"
worker_shutdown_timeout = "10s"

[upstream.u]
servers = [{{ address = "{backend}" }}]

[[server]]
listen = "127.0.0.1:{listen}"
proxy_pass = "u"
{extra}
"#
    )
}

async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(limit, s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_close_at_proxy_timeout_active_ones_stay() {
    let b = Backend::start(Behaviour::Echo).await;
    let port = free_port();
    let _d = Daemon::start(&config(port, b.addr, "proxy_timeout = \"600ms\""));
    let mut idle = TcpStream::connect(addr(port)).await.unwrap();
    let mut busy = TcpStream::connect(addr(port)).await.unwrap();
    let t = Instant::now();
    // The busy session exchanges a byte every 200 ms for 2 s: never idle for 600 ms.
    let mut buf = [0u8; 1];
    while t.elapsed() < Duration::from_secs(2) {
        busy.write_all(b"x").await.unwrap();
        busy.read_exact(&mut buf).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(closed_within(&mut idle, Duration::from_millis(10)).await, "idle session still open");
    busy.write_all(b"y").await.unwrap();
    busy.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"y");
    // And the busy one goes too once it stops talking, not before the timeout.
    let quiet = Instant::now();
    assert!(closed_within(&mut busy, Duration::from_secs(3)).await);
    assert!(quiet.elapsed() >= Duration::from_millis(500), "{:?}", quiet.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_reaches_backend_and_response_flows_back() {
    let b = Backend::start(Behaviour::Count).await;
    let port = free_port();
    let d = Daemon::start(&config(port, b.addr, ""));
    let data = support::payload(5 << 20, 1);
    let reply = support::roundtrip(addr(port), &data).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&reply).trim(), (5 << 20).to_string());
    assert!(d.wait_log("end=closed", Duration::from_secs(3)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_half_close_reaches_client_who_can_still_send() {
    // The backend sends a greeting and shuts its write side, then keeps reading: the
    // client sees EOF, and its later bytes still arrive.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"bye").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    });
    let port = free_port();
    let d = Daemon::start(&config(port, backend, ""));
    let mut c = TcpStream::connect(addr(port)).await.unwrap();
    let mut greeting = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut greeting)).await.unwrap().unwrap();
    assert_eq!(greeting, b"bye");
    c.write_all(b"still here").await.unwrap();
    c.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), server).await.unwrap().unwrap();
    assert_eq!(got, b"still here");
    assert!(d.wait_log("end=closed", Duration::from_secs(3)), "{}", d.log());
}
