//! Session lifetime end to end: idle timeout, half-close, rate limits, reload, drain.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::{free_port, log_field, Backend, Behaviour, Daemon};
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
    matches!(
        tokio::time::timeout(limit, s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
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
    assert!(
        closed_within(&mut idle, Duration::from_millis(10)).await,
        "idle session still open"
    );
    busy.write_all(b"y").await.unwrap();
    busy.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"y");
    // And the busy one goes too once it stops talking, not before the timeout.
    let quiet = Instant::now();
    assert!(closed_within(&mut busy, Duration::from_secs(3)).await);
    assert!(
        quiet.elapsed() >= Duration::from_millis(500),
        "{:?}",
        quiet.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_reaches_backend_and_response_flows_back() {
    let b = Backend::start(Behaviour::Count).await;
    let port = free_port();
    let d = Daemon::start(&config(port, b.addr, ""));
    let data = support::payload(5 << 20, 1);
    let reply = support::roundtrip(addr(port), &data).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&reply).trim(),
        (5 << 20).to_string()
    );
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
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut greeting))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(greeting, b"bye");
    c.write_all(b"still here").await.unwrap();
    c.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"still here");
    assert!(
        d.wait_log("end=closed", Duration::from_secs(3)),
        "{}",
        d.log()
    );
}

/// Moves 5 s worth of data at 1 MiB/s in one direction and returns the elapsed time.
async fn timed_transfer(port: u16, upload: bool) -> Duration {
    let total = 5 << 20;
    let mut s = TcpStream::connect(addr(port)).await.unwrap();
    let t = Instant::now();
    if upload {
        // Count backend: replies with the byte count once the client has finished.
        s.write_all(&support::payload(total, 3)).await.unwrap();
        s.shutdown().await.unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.unwrap();
        assert_eq!(reply.trim(), total.to_string());
    } else {
        // Echo backend, download limited: the echo comes back at the limited rate.
        let (mut r, mut w) = s.split();
        let data = support::payload(total, 4);
        let send = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let recv = r.read_to_end(&mut got);
        let ((), n) = tokio::join!(send, recv);
        n.unwrap();
        assert!(got == data, "echo differs");
    }
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_and_download_rates_hold_within_ten_percent() {
    let count = Backend::start(Behaviour::Count).await;
    let echo = Backend::start(Behaviour::Echo).await;
    let up_port = free_port();
    let down_port = free_port();
    let _up = Daemon::start(&config(up_port, count.addr, "proxy_upload_rate = \"1m\""));
    let _down = Daemon::start(&config(
        down_port,
        echo.addr,
        "proxy_download_rate = 1048576",
    ));
    let (up, down) = tokio::join!(
        timed_transfer(up_port, true),
        timed_transfer(down_port, false)
    );
    for (what, t) in [("upload", up), ("download", down)] {
        let rate = (5u64 << 20) as f64 / t.as_secs_f64() / f64::from(1 << 20);
        assert!(
            (0.9..=1.1).contains(&rate),
            "{what}: {rate:.3} MiB/s over {t:?}"
        );
    }
}

/// One client streaming `chunks` of 64 KiB through an echo backend, pausing between
/// chunks, and checking every byte that comes back.
async fn streaming_client(
    port: u16,
    seed: u64,
    chunks: usize,
    pause: Duration,
) -> Result<(), String> {
    let data = support::payload(chunks * 65536, seed);
    let mut s = TcpStream::connect(addr(port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut r, mut w) = s.split();
    let send = async {
        for c in data.chunks(65536) {
            w.write_all(c).await.map_err(|e| e.to_string())?;
            tokio::time::sleep(pause).await;
        }
        w.shutdown().await.map_err(|e| e.to_string())
    };
    let mut got = Vec::new();
    let recv = async { r.read_to_end(&mut got).await.map_err(|e| e.to_string()) };
    let (a, b) = tokio::join!(send, recv);
    a?;
    b?;
    if got != data {
        return Err(format!(
            "client {seed}: got {} of {} bytes, or different ones",
            got.len(),
            data.len()
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_keeps_50_streaming_sessions_byte_exact() {
    let echo = Backend::start(Behaviour::Echo).await;
    let other = Backend::start(Behaviour::Tagged("new".into())).await;
    let port = free_port();
    let old_port = free_port();
    let new_port = free_port();
    let base = config(port, echo.addr, "proxy_timeout = \"30s\"");
    let with_old =
        format!("{base}\n[[server]]\nlisten = \"127.0.0.1:{old_port}\"\nproxy_pass = \"u\"\n");
    let d = Daemon::start(&with_old);
    let clients: Vec<_> = (0..50u64)
        .map(|i| tokio::spawn(streaming_client(port, i, 32, Duration::from_millis(60))))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Reload: a new upstream and listener, the old listener removed, a changed timeout.
    let reloaded = format!(
        "{}\n[upstream.n]\nservers = [{{ address = \"{}\" }}]\n[[server]]\nlisten = \"127.0.0.1:{new_port}\"\nproxy_pass = \"n\"\n",
        config(port, echo.addr, "proxy_timeout = \"20s\""),
        other.addr
    );
    d.reload(&reloaded);
    // A broken file is rejected and changes nothing.
    d.reload("[upstream.u]\nservers = [{ address = \"bad\" }]\n");
    assert!(d.log().contains("reload rejected"), "{}", d.log());
    for c in clients {
        c.await.unwrap().unwrap();
    }
    assert_eq!(
        support::connect_tagged(addr(new_port)).await.unwrap().0,
        "new"
    );
    assert!(
        TcpStream::connect(addr(old_port)).await.is_err(),
        "removed listener still accepts"
    );
    assert!(d.log().matches("end=closed").count() >= 50);
}

/// A reload that turns a listener into `upstream_show` (or back) replaces it on the
/// same address: the new one takes the old one's socket, as binding it again fails
/// while the old one's task still holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_replaced_on_its_address_keeps_serving_it() {
    let tagged = Backend::start(Behaviour::Tagged("t".into())).await;
    let port = free_port();
    let proxied = config(port, tagged.addr, "");
    let show = proxied.replace("proxy_pass = \"u\"", "upstream_show = true");
    let d = Daemon::start(&proxied);
    assert_eq!(support::connect_tagged(addr(port)).await.unwrap().0, "t");
    d.reload(&show);
    assert!(!d.log().contains("cannot open listener"), "{}", d.log());
    let at = addr(port);
    let (status, body) =
        tokio::task::spawn_blocking(move || support::http_get(at, "/upstream_show"))
            .await
            .unwrap();
    assert_eq!(status, 200, "{body}\n{}", d.log());
    assert!(body.contains(&tagged.addr.to_string()), "{body}");
    d.reload(&proxied);
    assert!(!d.log().contains("cannot open listener"), "{}", d.log());
    assert_eq!(support::connect_tagged(addr(port)).await.unwrap().0, "t");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_drains_sessions() {
    let echo = Backend::start(Behaviour::Echo).await;
    let port = free_port();
    let d = Daemon::start(&config(port, echo.addr, ""));
    let mut s = TcpStream::connect(addr(port)).await.unwrap();
    s.write_all(b"a").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    d.signal(libc::SIGTERM);
    assert!(d.wait_log("draining sessions", Duration::from_secs(5)));
    assert!(
        TcpStream::connect(addr(port)).await.is_err(),
        "still accepting after SIGTERM"
    );
    // The established session keeps working during the drain.
    s.write_all(b"b").await.unwrap();
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"b");
    assert!(d.exited().is_none());
    drop(s);
    let status = d
        .wait_exit(Duration::from_secs(5))
        .expect("exits once drained");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_ends_at_worker_shutdown_timeout() {
    let echo = Backend::start(Behaviour::Echo).await;
    let port = free_port();
    let d = Daemon::start(&config(port, echo.addr, "").replace("\"10s\"", "\"500ms\""));
    let mut s = TcpStream::connect(addr(port)).await.unwrap();
    s.write_all(b"a").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    let t = Instant::now();
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(5)).is_some());
    assert!(
        t.elapsed() >= Duration::from_millis(450),
        "{:?}",
        t.elapsed()
    );
    assert!(closed_within(&mut s, Duration::from_secs(1)).await);
    // Cut at the end of the grace period, the session is still logged with its server,
    // path and bytes.
    let lines = d.access_lines();
    let line = lines
        .iter()
        .find(|l| log_field(l, "end") == Some("shutdown"))
        .unwrap_or_else(|| panic!("no session ended at shutdown: {}", d.log()));
    let server = echo.addr.to_string();
    for (field, want) in [
        ("server", server.as_str()),
        ("path", "copy:splice_off"),
        ("received", "1"),
        ("sent", "1"),
    ] {
        assert_eq!(log_field(line, field), Some(want), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_header_precedes_client_bytes() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    });
    let port = free_port();
    let _d = Daemon::start(&config(port, backend, "proxy_protocol = \"v1\""));
    let mut c = TcpStream::connect(addr(port)).await.unwrap();
    let client_port = c.local_addr().unwrap().port();
    c.write_all(b"hello").await.unwrap();
    c.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
    let expected = format!("PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {port}\r\nhello");
    assert_eq!(String::from_utf8_lossy(&got), expected);
}
