//! Static balancing end to end: the real binary against real backends on 127.0.0.1.

mod support;

use std::time::Duration;

use support::{connect_tagged, free_port, roundtrip, Backend, Behaviour, Daemon};

fn config(listen: u16, balance: &str, servers: &str, extra: &str) -> String {
    format!(
        r#"
[global]
splice = "off"

[upstream.u]
balance = "{balance}"
servers = [{servers}]

[[server]]
listen = "127.0.0.1:{listen}"
proxy_pass = "u"
proxy_connect_timeout = "1s"
{extra}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_roundtrip_is_byte_exact() {
    let b = Backend::start(Behaviour::Echo).await;
    let port = free_port();
    let d = Daemon::start(&config(port, "round_robin", &format!("{{ address = \"{}\" }}", b.addr), ""));
    let data = support::payload(3 << 20, 7);
    let got = roundtrip(format!("127.0.0.1:{port}").parse().unwrap(), &data).await.unwrap();
    assert!(got == data, "echo differs: sent {} got {}", data.len(), got.len());
    assert!(d.wait_log("end=closed", Duration::from_secs(5)), "no access log line:\n{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_alternates_by_weight() {
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let b = Backend::start(Behaviour::Tagged("b".into())).await;
    let port = free_port();
    let servers = format!("{{ address = \"{}\", weight = 3 }}, {{ address = \"{}\" }}", a.addr, b.addr);
    let _d = Daemon::start(&config(port, "round_robin", &servers, ""));
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut tags = String::new();
    for _ in 0..40 {
        let (tag, _s) = connect_tagged(addr).await.unwrap();
        tags.push_str(&tag);
    }
    // Smooth weighted round-robin: any 4 consecutive picks hold 3 a and 1 b, so b never
    // comes twice in a row and 40 picks split exactly 30:10.
    assert_eq!(tags.matches('a').count(), 30, "{tags}");
    assert!(!tags.contains("bb"), "{tags}");
}
