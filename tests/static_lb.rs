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
    let d = Daemon::start(&config(
        port,
        "round_robin",
        &format!("{{ address = \"{}\" }}", b.addr),
        "",
    ));
    let data = support::payload(3 << 20, 7);
    let got = roundtrip(format!("127.0.0.1:{port}").parse().unwrap(), &data)
        .await
        .unwrap();
    assert!(
        got == data,
        "echo differs: sent {} got {}",
        data.len(),
        got.len()
    );
    assert!(
        d.wait_log("end=closed", Duration::from_secs(5)),
        "no access log line:\n{}",
        d.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_alternates_by_weight() {
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let b = Backend::start(Behaviour::Tagged("b".into())).await;
    let port = free_port();
    let servers = format!(
        "{{ address = \"{}\", weight = 3 }}, {{ address = \"{}\" }}",
        a.addr, b.addr
    );
    let _d = Daemon::start(&config(port, "round_robin", &servers, ""));
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut tags = String::new();
    for _ in 0..40 {
        let (tag, _s) = connect_tagged(addr).await.unwrap();
        tags.push_str(&tag);
    }
    // nginx's smooth weighted round-robin for weights 3:1.
    assert_eq!(tags, "aabaaaba".repeat(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_picks_by_active_count_and_weight() {
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let b = Backend::start(Behaviour::Tagged("b".into())).await;
    let port = free_port();
    let servers = format!(
        "{{ address = \"{}\" }}, {{ address = \"{}\", weight = 2 }}",
        a.addr, b.addr
    );
    let _d = Daemon::start(&config(port, "least_conn", &servers, ""));
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..9 {
        held.push(connect_tagged(addr).await.unwrap());
    }
    let count =
        |t: &str, h: &[(String, tokio::net::TcpStream)]| h.iter().filter(|(x, _)| x == t).count();
    assert_eq!(
        (count("a", &held), count("b", &held)),
        (3, 6),
        "weight 2 carries twice the sessions"
    );
    // Close all of b's sessions: the next three go to b (fewest active per weight).
    held.retain(|(t, _)| t == "a");
    assert!(
        support::wait_until(Duration::from_secs(5), || b.open() == 0)
            .await
            .is_some()
    );
    for _ in 0..3 {
        let (t, s) = connect_tagged(addr).await.unwrap();
        assert_eq!(t, "b");
        held.push((t, s));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_keeps_each_client_on_one_server() {
    for consistent in [false, true] {
        let a = Backend::start(Behaviour::Tagged("a".into())).await;
        let b = Backend::start(Behaviour::Tagged("b".into())).await;
        let port = free_port();
        let servers = format!(
            "{{ address = \"{}\" }}, {{ address = \"{}\" }}",
            a.addr, b.addr
        );
        let extra_upstream = if consistent {
            "consistent = true\n"
        } else {
            ""
        };
        let cfg = config(port, "hash", &servers, "").replace(
            "balance = \"hash\"\n",
            &format!("balance = \"hash\"\n{extra_upstream}"),
        );
        let _d = Daemon::start(&cfg);
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut per_server = [0usize; 2];
        for i in 1..=40u8 {
            let src = std::net::IpAddr::from([127, 0, 1, i]);
            let mut seen = None;
            for _ in 0..3 {
                let mut s = support::connect_from(src, addr).await.unwrap();
                let tag = support::read_line(&mut s).await.unwrap();
                assert!(
                    seen.is_none() || seen.as_deref() == Some(tag.as_str()),
                    "client {src} moved"
                );
                seen = Some(tag);
            }
            per_server[usize::from(seen.as_deref() == Some("b"))] += 1;
        }
        assert!(
            per_server.iter().all(|&n| n >= 8),
            "consistent={consistent}: {per_server:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_serves_only_while_primaries_are_unavailable() {
    let primary_port = free_port();
    let backup = Backend::start(Behaviour::Tagged("backup".into())).await;
    let port = free_port();
    let servers = format!(
        "{{ address = \"127.0.0.1:{primary_port}\", max_fails = 1, fail_timeout = \"1s\" }}, {{ address = \"{}\", backup = true }}",
        backup.addr
    );
    let _d = Daemon::start(&config(port, "round_robin", &servers, ""));
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    // The primary refuses: the connection goes to the backup, and the primary is marked down.
    let (t, _) = connect_tagged(addr).await.unwrap();
    assert_eq!(t, "backup");
    let primary = Backend::start_on(
        format!("127.0.0.1:{primary_port}").parse().unwrap(),
        Behaviour::Tagged("primary".into()),
    )
    .await;
    // Once fail_timeout (1s) has passed the primary takes the traffic again.
    let mut got_primary = false;
    for _ in 0..40 {
        let (t, _) = connect_tagged(addr).await.unwrap();
        if t == "primary" {
            got_primary = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(got_primary, "primary never came back");
    for _ in 0..10 {
        assert_eq!(connect_tagged(addr).await.unwrap().0, "primary");
    }
    assert!(primary.accepted() >= 11);
}
