//! What operators ship: `/metrics` parsed as Prometheus does (labels per server,
//! counters rising on both paths, histograms with buckets), and the access log in a
//! file, as JSON, reopened on SIGUSR1 (with and without the kernel path) without ever
//! ending the daemon.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::{free_port, metric, roundtrip, Backend, Behaviour, Daemon};

fn kernel_wanted(test: &str) -> bool {
    if std::env::var("L4LB_NO_EBPF").is_ok_and(|v| v == "1") {
        eprintln!("{test}: kernel path part skipped by request (L4LB_NO_EBPF=1)");
        return false;
    }
    true
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Sends `data` and reads its echo, and only then closes: a FIN sent with the data
/// could reach the proxy before the session is in the kernel, which then (rightly)
/// continues it on the copy path, and the per-path counts would vary under load.
async fn echo_then_close(to: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(to).await?;
    let (mut r, mut w) = s.split();
    let mut got = vec![0u8; data.len()];
    let (sent, read) = tokio::join!(w.write_all(data), r.read_exact(&mut got));
    sent?;
    read?;
    w.shutdown().await?;
    r.read_to_end(&mut got).await?;
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cover_servers_paths_and_histograms() {
    let kernel = kernel_wanted("metrics_cover_servers_paths_and_histograms");
    let a = Backend::start(Behaviour::Echo).await;
    let b = Backend::start(Behaviour::Echo).await;
    let (admin, spliced, copied) = (free_port(), free_port(), free_port());
    let d = Daemon::start(&format!(
        r#"
[global]
splice = "{mode}"
splice_after_time = 0

[admin]
listen = "127.0.0.1:{admin}"

[upstream.u]
servers = [{{ address = "{a}" }}, {{ address = "{b}" }}]

[[server]]
listen = "127.0.0.1:{spliced}"
proxy_pass = "u"

[[server]]
listen = "127.0.0.1:{copied}"
proxy_pass = "u"
splice = "off"
"#,
        mode = if kernel { "required" } else { "off" },
        a = a.addr,
        b = b.addr,
    ));
    let data = support::payload(256 * 1024, 3);
    for port in [spliced, copied] {
        for _ in 0..4 {
            let got = echo_then_close(addr(port), &data).await.unwrap();
            assert!(got == data, "echo through {port} differs");
        }
    }
    let listener = |p: u16| format!("127.0.0.1:{p}");
    let (l_spliced, l_copied) = (listener(spliced), listener(copied));
    let mut s = d.scrape();
    // Sessions are counted as they end; the access log says when.
    for _ in 0..100 {
        if metric(&s, "l4lb_sessions_total", &[]) >= Some(8.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        s = d.scrape();
    }
    let copy_off = [
        ("listener", l_copied.as_str()),
        ("path", "copy"),
        ("reason", "splice_off"),
    ];
    assert_eq!(metric(&s, "l4lb_sessions_total", &copy_off), Some(4.0));
    if kernel {
        let k = [("listener", l_spliced.as_str()), ("path", "kernel")];
        assert_eq!(metric(&s, "l4lb_sessions_total", &k), Some(4.0));
        let bytes = metric(&s, "l4lb_bytes_total", &[("path", "kernel")]).unwrap_or(0.0);
        assert!(
            bytes >= 4.0 * 2.0 * data.len() as f64 * 0.99,
            "kernel bytes {bytes}"
        );
        assert!(metric(&s, "l4lb_kernel_sessions", &[]).is_some());
        assert!(metric(&s, "l4lb_kernel_map_entries", &[("map", "flows")]).is_some());
    }
    let copied_bytes = metric(&s, "l4lb_bytes_total", &[("path", "copy")]).unwrap_or(0.0);
    assert!(
        copied_bytes >= 4.0 * 2.0 * data.len() as f64,
        "copy bytes {copied_bytes}"
    );
    assert_eq!(
        metric(&s, "l4lb_accepted_total", &[("listener", &l_copied)]),
        Some(4.0)
    );
    for server in [a.addr, b.addr] {
        let l = [("upstream", "u"), ("server", &server.to_string())];
        assert_eq!(
            metric(&s, "l4lb_server_sessions_total", &l),
            Some(4.0),
            "{server}"
        );
        assert_eq!(metric(&s, "l4lb_server_active_sessions", &l), Some(0.0));
        assert_eq!(metric(&s, "l4lb_server_available", &l), Some(1.0));
        let up = metric(
            &s,
            "l4lb_server_bytes_total",
            &[l[0], l[1], ("direction", "upload")],
        );
        assert_eq!(up, Some(4.0 * data.len() as f64), "{server}");
    }
    // Histograms: buckets present and the sessions counted in them.
    let duration = s
        .samples
        .iter()
        .find(|x| x.metric == "l4lb_session_duration_seconds")
        .expect("session duration histogram");
    match &duration.value {
        prometheus_parse::Value::Histogram(buckets) => {
            assert!(buckets.len() >= 10, "{buckets:?}");
            assert!(buckets.iter().any(|b| b.count > 0.0), "{buckets:?}");
        }
        other => panic!("session duration is not a histogram: {other:?}"),
    }
    assert!(
        metric(&s, "l4lb_backend_connect_seconds", &[("upstream", "u")]) >= Some(8.0),
        "connect histogram"
    );
    assert_eq!(metric(&s, "l4lb_session_panics_total", &[]), Some(0.0));
}

async fn access_log_survives_rotation(splice: &str) {
    let b = Backend::start(Behaviour::Echo).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let port = free_port();
    let d = Daemon::start(&format!(
        r#"
[global]
splice = "{splice}"
splice_after_time = 0
access_log = "{log}"
access_log_format = "json"

[upstream.u]
servers = [{{ address = "{b}" }}]

[[server]]
listen = "127.0.0.1:{port}"
proxy_pass = "u"
"#,
        log = log.display(),
        b = b.addr,
    ));
    let lines = |path: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    };
    let wait_lines = |path: &std::path::Path, n: usize| {
        for _ in 0..250 {
            if lines(path).len() >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{} has fewer than {n} lines; daemon log:\n{}",
            path.display(),
            d.log()
        );
    };
    roundtrip(addr(port), b"first").await.unwrap();
    wait_lines(&log, 1);
    let first = &lines(&log)[0];
    assert_eq!(first["end"], "closed", "{first}");
    assert_eq!(first["received"], 5, "{first}");
    assert!(
        first["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("127.0.0.1:")),
        "{first}"
    );

    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    d.signal(libc::SIGUSR1);
    assert!(
        d.wait_log("log files reopened", Duration::from_secs(5)),
        "{}",
        d.log()
    );
    roundtrip(addr(port), b"second").await.unwrap();
    wait_lines(&log, 1);
    assert_eq!(lines(&log)[0]["received"], 6);
    assert_eq!(
        lines(&rotated).len(),
        1,
        "the old file got a line after reopening"
    );
    // Access lines go to the file only.
    assert!(!d.log().contains("received"), "{}", d.log());
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        d.exited().is_none(),
        "SIGUSR1 ended the daemon:\n{}",
        d.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_access_log_with_splice_off() {
    access_log_survives_rotation("off").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_access_log_with_the_kernel_path() {
    if kernel_wanted("sigusr1_reopens_the_access_log_with_the_kernel_path") {
        access_log_survives_rotation("required").await;
    }
}

/// An upstream's name is any TOML key: a quote or backslash in it is escaped in the
/// labels, so the scrape stays readable (one bad line makes Prometheus drop it all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_names_are_escaped_in_labels() {
    let a = Backend::start(Behaviour::Echo).await;
    let (admin, port) = (free_port(), free_port());
    let _d = Daemon::start(&format!(
        r#"
[global]
splice = "off"

[admin]
listen = "127.0.0.1:{admin}"

[upstream.'db "main" \x']
servers = [{{ address = "{a}" }}]

[[server]]
listen = "127.0.0.1:{port}"
proxy_pass = 'db "main" \x'
"#,
        a = a.addr,
    ));
    let (status, body) = support::http_get(addr(admin), "/metrics");
    assert_eq!(status, 200);
    assert!(
        body.contains(r#"upstream="db \"main\" \\x""#),
        "{}",
        body.lines()
            .filter(|l| l.contains("upstream="))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // And the whole exposition parses.
    let s = support::scrape(addr(admin));
    assert!(!s.samples.is_empty());
}

/// A TCP and a UDP listener on one address (DNS) keep apart in the series: each has
/// its `protocol` label, so neither's counts hide in the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_udp_listeners_on_one_address_have_their_own_series() {
    let tcp_backend = Backend::start(Behaviour::Echo).await;
    let udp_backend = support::UdpBackend::start("u").await;
    let admin = free_port();
    let port = loop {
        let p = free_port();
        if std::net::UdpSocket::bind(addr(p)).is_ok() {
            break p;
        }
    };
    let d = Daemon::start(&format!(
        r#"
[global]
splice = "off"

[admin]
listen = "127.0.0.1:{admin}"

[upstream.t]
servers = [{{ address = "{t}" }}]

[upstream.u]
servers = [{{ address = "{u}" }}]

[[server]]
listen = "127.0.0.1:{port}"
proxy_pass = "t"

[[server]]
listen = "127.0.0.1:{port}"
protocol = "udp"
proxy_pass = "u"
"#,
        t = tcp_backend.addr,
        u = udp_backend.addr,
    ));
    let lb = addr(port);
    for _ in 0..3 {
        assert_eq!(echo_then_close(lb, b"ping").await.unwrap(), b"ping");
    }
    for _ in 0..2 {
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.send_to(b"q", lb).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), s.recv(&mut buf))
            .await
            .expect("UDP reply in time")
            .unwrap();
        assert_eq!(&buf[..n], b"u:q");
    }
    let listener = lb.to_string();
    let on = |protocol| [("listener", listener.as_str()), ("protocol", protocol)];
    let mut s = d.scrape();
    for _ in 0..50 {
        if metric(&s, "l4lb_sessions_total", &on("tcp")) == Some(3.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        s = d.scrape();
    }
    assert_eq!(metric(&s, "l4lb_accepted_total", &on("tcp")), Some(3.0));
    assert_eq!(metric(&s, "l4lb_sessions_total", &on("tcp")), Some(3.0));
    assert_eq!(metric(&s, "l4lb_udp_sessions_total", &on("udp")), Some(2.0));
    assert_eq!(metric(&s, "l4lb_udp_sessions_total", &on("tcp")), Some(0.0));
    assert_eq!(metric(&s, "l4lb_accepted_total", &on("udp")), Some(0.0));
}
