//! Access control (`access` allow/deny in nginx order, `limit_conn`) and PROXY protocol
//! in (v1, v2, malformed, missing), with the carried client address flowing to the
//! access rules, hashing, the access log and the PROXY header sent on.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use support::{connect_from, free_port, log_field, metric, Backend, Behaviour, Daemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Sends `payload`, half-closes, and returns everything the other end sent back.
async fn exchange(mut s: TcpStream, payload: &[u8]) -> Vec<u8> {
    let _ = s.write_all(payload).await;
    let _ = s.shutdown().await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    got
}

fn admin_and(config: &str) -> (String, SocketAddr) {
    let admin = free_port();
    (
        format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n{config}"),
        SocketAddr::from(([127, 0, 0, 1], admin)),
    )
}

fn refused(d: &Daemon, listener: &str, reason: &str) -> f64 {
    metric(
        &d.scrape(),
        "l4lb_refused_total",
        &[("listener", listener), ("reason", reason)],
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_deny_in_nginx_order_and_limit_conn() {
    let b = Backend::start(Behaviour::Echo).await;
    let (v4, v6, limited) = (free_port(), free_port(), free_port());
    let (config, _) = admin_and(&format!(
        r#"
[global]
splice = "off"

[upstream.u]
servers = [{{ address = "{b}" }}]

[[server]]
listen = "127.0.0.1:{v4}"
proxy_pass = "u"
access = ["deny 127.0.0.3", "allow 127.0.0.0/8", "deny all"]

[[server]]
listen = "[::1]:{v6}"
proxy_pass = "u"
access = ["allow 2001:db8::/32", "deny ::1", "allow all"]

[[server]]
listen = "127.0.0.1:{limited}"
proxy_pass = "u"
limit_conn = 2
"#,
        b = b.addr
    ));
    let d = Daemon::start(&config);
    let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let allowed = connect_from(ip("127.0.0.2"), at(v4)).await.unwrap();
    assert_eq!(exchange(allowed, b"hi").await, b"hi");
    let denied = connect_from(ip("127.0.0.3"), at(v4)).await.unwrap();
    assert_eq!(
        exchange(denied, b"hi").await,
        b"",
        "a denied client got data"
    );
    let v6_client = TcpStream::connect(SocketAddr::new(ip("::1"), v6))
        .await
        .unwrap();
    assert_eq!(exchange(v6_client, b"hi").await, b"", "::1 is denied");
    assert_eq!(refused(&d, &format!("127.0.0.1:{v4}"), "denied"), 1.0);
    assert_eq!(refused(&d, &format!("[::1]:{v6}"), "denied"), 1.0);
    assert_eq!(b.accepted(), 1, "a denied client reached the backend");

    // limit_conn 2 per client address.
    let c = ip("127.0.0.5");
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from(c, at(limited)).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.unwrap();
        held.push(s);
    }
    let third = connect_from(c, at(limited)).await.unwrap();
    assert_eq!(
        exchange(third, b"hi").await,
        b"",
        "a third session from one client"
    );
    let other = connect_from(ip("127.0.0.6"), at(limited)).await.unwrap();
    assert_eq!(
        exchange(other, b"hi").await,
        b"hi",
        "another client is not limited"
    );
    drop(held.pop());
    let mut ok = false;
    for _ in 0..50 {
        let again = connect_from(c, at(limited)).await.unwrap();
        if exchange(again, b"hi").await == b"hi" {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "a slot freed by a closed session was not given back");
    assert!(refused(&d, &format!("127.0.0.1:{limited}"), "limit_conn") >= 1.0);
    let denied_lines = d
        .access_lines()
        .iter()
        .filter(|l| log_field(l, "end") == Some("denied"))
        .count();
    assert_eq!(denied_lines, 2, "{:#?}", d.access_lines());
}

fn v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else {
        panic!("v4 only here");
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&s.ip().octets());
    h.extend_from_slice(&d.ip().octets());
    h.extend_from_slice(&s.port().to_be_bytes());
    h.extend_from_slice(&d.port().to_be_bytes());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_in_carries_the_client_everywhere() {
    // Echo backends behind a PROXY v1 header l4lb sends on: the echo shows what the
    // backend was told.
    let a = Backend::start(Behaviour::Echo).await;
    let b = Backend::start(Behaviour::Echo).await;
    let port = free_port();
    let (config, _) = admin_and(&format!(
        r#"
[global]
splice = "off"

[upstream.u]
balance = "hash"
servers = [{{ address = "{a}" }}, {{ address = "{b}" }}]

[[server]]
listen = "127.0.0.1:{port}"
proxy_pass = "u"
proxy_protocol_in = true
proxy_protocol_timeout = "500ms"
proxy_protocol = "v1"
access = ["deny 192.0.2.0/24", "allow all"]
"#,
        a = a.addr,
        b = b.addr
    ));
    let d = Daemon::start(&config);
    let lb = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = format!("127.0.0.1:{port}");

    // v1, with data in the same write as the header.
    let s = TcpStream::connect(lb).await.unwrap();
    let got = exchange(
        s,
        format!("PROXY TCP4 198.51.100.7 10.0.0.1 5555 {port}\r\nhello").as_bytes(),
    )
    .await;
    let text = String::from_utf8_lossy(&got);
    assert_eq!(
        text,
        format!("PROXY TCP4 198.51.100.7 127.0.0.1 5555 {port}\r\nhello")
    );

    // v2, the header alone first, data later.
    let mut s = TcpStream::connect(lb).await.unwrap();
    let src: SocketAddr = "198.51.100.8:6666".parse().unwrap();
    s.write_all(&v2_header(src, "10.0.0.1:3307".parse().unwrap()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let got = exchange(s, b"world").await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        format!("PROXY TCP4 198.51.100.8 127.0.0.1 6666 {port}\r\nworld")
    );

    // Hashing uses the carried address: one address, one server, whatever the port.
    let mut firsts = Vec::new();
    for i in 0..6u16 {
        let s = TcpStream::connect(lb).await.unwrap();
        exchange(
            s,
            format!("PROXY TCP4 203.0.113.9 10.0.0.1 {} {port}\r\n", 7000 + i).as_bytes(),
        )
        .await;
        firsts.push((a.accepted(), b.accepted()));
    }
    let moved: Vec<_> = firsts
        .windows(2)
        .map(|w| (w[1].0 - w[0].0, w[1].1 - w[0].1))
        .collect();
    assert!(
        moved.iter().all(|m| *m == moved[0]),
        "one client address went to both servers: {firsts:?}"
    );

    // Access rules see the carried address, not the balancer's.
    let s = TcpStream::connect(lb).await.unwrap();
    let got = exchange(
        s,
        format!("PROXY TCP4 192.0.2.7 10.0.0.1 1 {port}\r\nx").as_bytes(),
    )
    .await;
    assert!(got.is_empty(), "a denied carried address got {got:?}");
    assert_eq!(refused(&d, &listener, "denied"), 1.0);

    // Malformed and missing headers close the connection, counted.
    let s = TcpStream::connect(lb).await.unwrap();
    assert!(exchange(s, b"GET / HTTP/1.1\r\n\r\n").await.is_empty());
    let silent = TcpStream::connect(lb).await.unwrap();
    let mut rest = Vec::new();
    let started = std::time::Instant::now();
    let mut silent = silent;
    let _ = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(400)
            && started.elapsed() < Duration::from_secs(3),
        "a client that sends no header is closed at proxy_protocol_timeout, took {:?}",
        started.elapsed()
    );
    assert_eq!(refused(&d, &listener, "proxy_protocol"), 2.0);

    // The access log names the carried client.
    let lines = d.access_lines();
    assert!(
        lines
            .iter()
            .any(|l| log_field(l, "client") == Some("198.51.100.7:5555")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| log_field(l, "client") == Some("192.0.2.7:1")
                && log_field(l, "end") == Some("denied")),
        "{lines:#?}"
    );

    // With set_real_ip_from, a header names the client only from a trusted peer: from
    // 127.0.0.1, untrusted, it cannot borrow an allowed address past `deny`.
    let strict = config.replace(
        "access = [\"deny 192.0.2.0/24\", \"allow all\"]",
        "access = [\"deny 127.0.0.1\", \"allow all\"]\nset_real_ip_from = [\"10.0.0.0/8\"]",
    );
    d.reload(&strict);
    let s = TcpStream::connect(lb).await.unwrap();
    let got = exchange(
        s,
        format!("PROXY TCP4 198.51.100.7 10.0.0.1 5555 {port}\r\nhi").as_bytes(),
    )
    .await;
    assert!(
        got.is_empty(),
        "an untrusted peer's header was believed: {got:?}"
    );
    d.reload(&strict.replace("10.0.0.0/8", "127.0.0.1"));
    let s = TcpStream::connect(lb).await.unwrap();
    let got = exchange(
        s,
        format!("PROXY TCP4 198.51.100.7 10.0.0.1 5555 {port}\r\nhi").as_bytes(),
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        format!("PROXY TCP4 198.51.100.7 127.0.0.1 5555 {port}\r\nhi"),
        "a trusted peer's header names the client"
    );
}
