//! `l4lb import-nginx` end to end: nginx configurations of the classic MySQL setup (a
//! static upstream, and one fed by nginx-stream-upsync-module from Consul) converted by
//! the real binary, checked, run, and carrying traffic to real backends.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use support::consul::Consul;
use support::{
    free_port, free_udp_port, l4lb_bin, roundtrip, show, tags, wait_until, Backend, Behaviour,
    Daemon, UdpBackend,
};
use tokio::net::UdpSocket;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

fn l4lb(args: &[&str]) -> Output {
    Command::new(l4lb_bin()).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Converts `nginx` to `out`; returns the TOML and the notes printed on stderr.
fn import(nginx: &Path, out: &Path) -> (String, String) {
    let o = l4lb(&[
        "import-nginx",
        nginx.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "import failed:\n{}", text(&o.stderr));
    let toml = std::fs::read_to_string(out).unwrap();
    let check = l4lb(&["check", "-c", out.to_str().unwrap()]);
    assert!(
        check.status.success() && text(&check.stdout).contains("syntax is ok"),
        "l4lb check rejects the output:\n{}\n{toml}",
        text(&check.stderr)
    );
    (toml, text(&o.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn static_mysql_setup_converts_checks_and_carries_traffic() {
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let b = Backend::start(Behaviour::Tagged("b".into())).await;
    let echo = Backend::start(Behaviour::Echo).await;
    let dns = UdpBackend::start("u").await;
    let (lb, pp, udp) = (free_port(), free_port(), free_udp_port());
    let dir = tempfile::tempdir().unwrap();
    let main = write(
        dir.path(),
        "nginx.conf",
        r#"# The main file: process settings, then the stream block.
user nginx;
worker_processes 1;
error_log /var/log/nginx/error.log warn;
pid /run/nginx.pid;

events {
    worker_connections 1024;   # per worker
}

http {
    server { listen 80; }
}

stream {
    # Every server inherits these.
    proxy_connect_timeout 1s;
    proxy_next_upstream on;
    include stream.d/*.conf;
}
"#,
    );
    write(
        dir.path(),
        "stream.d/mysql.conf",
        &format!(
            r#"upstream mysql_backend {{
    least_conn;
    server {a} weight=1 max_fails=2 fail_timeout=10s;
    server {b} weight=1 max_fails=2 fail_timeout=10s;
}}

upstream echo {{ server {echo}; }}
upstream dns {{ server {dns}; }}

server {{
    listen 127.0.0.1:{lb};
    proxy_pass mysql_backend;
    proxy_timeout 1m;
    proxy_next_upstream_tries 2;
    proxy_next_upstream_timeout 5s;
    proxy_upload_rate 10m;
    proxy_download_rate 10m;
    proxy_buffer_size 16k;   # a knob l4lb has no use for
}}

server {{
    listen 127.0.0.1:{pp};
    proxy_pass echo;
    proxy_protocol on;
}}

server {{
    listen 127.0.0.1:{udp} udp;
    proxy_pass dns;
    proxy_responses 1;
    proxy_timeout 5s;
}}
"#,
            a = a.addr,
            b = b.addr,
            echo = echo.addr,
            dns = dns.addr,
        ),
    );
    let out = dir.path().join("l4lb.toml");
    let (toml, notes) = import(&main, &out);
    for file in [&main, &dir.path().join("stream.d/mysql.conf")] {
        assert!(
            toml.contains(&format!("#   {}", file.display())),
            "source file not listed:\n{toml}"
        );
    }
    assert!(
        toml.contains("# nginx: upstream mysql_backend { } ("),
        "{toml}"
    );
    assert!(toml.contains("mysql.conf:1)"), "{toml}");
    assert!(toml.contains("balance = \"least_conn\""), "{toml}");
    assert!(
        toml.contains(&format!(
            "{{ address = \"{}\", weight = 1, max_fails = 2, fail_timeout = \"10s\" }}",
            a.addr
        )),
        "{toml}"
    );
    assert!(toml.contains("proxy_connect_timeout = \"1s\""), "{toml}");
    assert!(toml.contains("max_connections = 512"), "{toml}");
    for ignored in ["user", "pid", "http", "proxy_buffer_size"] {
        assert!(
            notes.contains(&format!(": {ignored}: ignored: ")),
            "{ignored} not reported:\n{notes}"
        );
    }
    // Without -o the same configuration goes to stdout.
    let o = l4lb(&["import-nginx", main.to_str().unwrap()]);
    assert!(o.status.success());
    assert_eq!(text(&o.stdout), toml);

    let d = Daemon::start(&toml);
    let t = tags(format!("127.0.0.1:{lb}").parse().unwrap(), 10).await;
    let count = |tag: &str| t.iter().filter(|x| *x == tag).count();
    assert!(
        count("a") > 0 && count("b") > 0 && count("ERR") == 0,
        "{t:?}"
    );

    let got = roundtrip(format!("127.0.0.1:{pp}").parse().unwrap(), b"hello")
        .await
        .unwrap();
    let got = text(&got);
    assert!(
        got.starts_with("PROXY TCP4 127.0.0.1 127.0.0.1 ") && got.ends_with("\r\nhello"),
        "{got:?}"
    );

    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(b"ping", format!("127.0.0.1:{udp}"))
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .expect("UDP reply")
        .unwrap();
    assert_eq!(&buf[..n], b"u:ping");
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upsync_setup_follows_consul() {
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let b = Backend::start(Behaviour::Tagged("b".into())).await;
    let consul = Consul::start().await;
    consul.put(&format!("upstreams/mysql/{}", a.addr), "");
    consul.put(
        &format!("upstreams/mysql/{}", b.addr),
        r#"{"weight":1,"max_fails":2,"fail_timeout":10}"#,
    );
    let (lb, show_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("servers_mysql.conf");
    let main = write(
        dir.path(),
        "nginx.conf",
        &format!(
            r#"stream {{
    upstream mysql {{
        upsync {consul}/v1/kv/upstreams/mysql upsync_timeout=6m upsync_interval=500ms upsync_type=consul strong_dependency=off;
        upsync_dump_path {dump};
        include {dump};
        server 127.0.0.1:1111;   # placeholder until Consul answers
    }}

    server {{
        listen 127.0.0.1:{lb};
        proxy_connect_timeout 1s;
        proxy_timeout 3s;
        proxy_pass mysql;
    }}

    server {{
        listen 127.0.0.1:{show_port};
        upstream_show;
    }}
}}
"#,
            consul = consul.addr,
            dump = dump.display(),
        ),
    );
    let out = dir.path().join("l4lb.toml");
    let (toml, notes) = import(&main, &out);
    assert!(toml.contains("[upstream.mysql.upsync]"), "{toml}");
    assert!(
        toml.contains(&format!(
            "url = \"http://{}/v1/kv/upstreams/mysql\"",
            consul.addr
        )),
        "{toml}"
    );
    for line in [
        "type = \"consul\"",
        "interval = \"500ms\"",
        "timeout = \"6m\"",
        "strong_dependency = false",
        "upstream_show = true",
        "{ address = \"127.0.0.1:1111\" }",
    ] {
        assert!(toml.contains(line), "no {line:?} in:\n{toml}");
    }
    assert!(
        notes.contains(": include: ignored: the upsync dump file"),
        "{notes}"
    );

    let d = Daemon::start(&toml);
    let show_addr = format!("127.0.0.1:{show_port}").parse().unwrap();
    let both = |s: &str| {
        s.contains("Backend server counts: 2")
            && s.contains(&a.addr.to_string())
            && s.contains(&b.addr.to_string())
    };
    assert!(
        wait_until(Duration::from_secs(5), || both(&show(show_addr, "mysql")))
            .await
            .is_some(),
        "upstream_show:\n{}\nlog:\n{}",
        show(show_addr, "mysql"),
        d.log()
    );
    let t = tags(format!("127.0.0.1:{lb}").parse().unwrap(), 10).await;
    let count = |tag: &str| t.iter().filter(|x| *x == tag).count();
    assert_eq!((count("a"), count("b")), (5, 5), "{t:?}");
    // The dump file is written right after the set is applied.
    let dumped = || std::fs::read_to_string(&dump).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(5), || dumped()
            .contains(&b.addr.to_string()))
        .await
        .is_some(),
        "dump file: {:?}",
        dumped()
    );
}

#[test]
fn what_l4lb_cannot_honour_fails_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let main = write(
        dir.path(),
        "nginx.conf",
        "# comments are fine\nstream {\n    include servers.conf;\n}\n",
    );
    write(
        dir.path(),
        "servers.conf",
        "upstream db { server 127.0.0.1:3306; }\nserver {\n    listen 3307;\n    ssl_certificate /etc/ssl/db.pem;\n    proxy_bind 10.0.0.8;\n    proxy_pass db;\n}\n",
    );
    let out = dir.path().join("l4lb.toml");
    let o = l4lb(&[
        "import-nginx",
        main.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    let inc = dir.path().join("servers.conf");
    for line in [
        format!("{}:4: ssl_certificate: not supported yet", inc.display()),
        format!("{}:5: proxy_bind: not supported yet", inc.display()),
        format!("l4lb: {} cannot be converted (2 errors)", main.display()),
    ] {
        assert!(err.contains(&line), "no {line:?} in:\n{err}");
    }
    assert!(!out.exists(), "nothing is written when there are errors");

    let o = l4lb(&["import-nginx", "/nonexistent/nginx.conf"]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("/nonexistent/nginx.conf: cannot read") && err.contains("(1 error)"),
        "{err}"
    );
}
