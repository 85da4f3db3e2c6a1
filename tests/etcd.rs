//! etcd v3 discovery end to end against a real etcd (Debian's etcd-server).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::etcd::{Etcd, Relay};
use support::{free_port, show, tags, wait_until, Backend, Behaviour, Daemon};

const PREFIX: &str = "upstreams/db/";

fn config(lb: u16, show_port: u16, url: &str) -> String {
    format!(
        r#"
[global]
splice = "off"

[upstream.db.upsync]
type = "etcd"
url = "{url}"
interval = "300ms"
timeout = "5s"

[[server]]
listen = "127.0.0.1:{lb}"
proxy_pass = "db"
proxy_connect_timeout = "1s"

[[server]]
listen = "127.0.0.1:{show_port}"
upstream_show = true
"#
    )
}

fn key(b: &Backend) -> String {
    format!("{PREFIX}{}", b.addr)
}

fn count(tags: &[String], tag: &str) -> usize {
    tags.iter().filter(|t| *t == tag).count()
}

async fn shows(addr: SocketAddr, limit: Duration, cond: impl Fn(&str) -> bool) -> Duration {
    match wait_until(limit, || cond(&show(addr, "db"))).await {
        Some(d) => d,
        None => panic!(
            "upstream_show never matched within {limit:?}:\n{}",
            show(addr, "db")
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_put_delete_reweight_down_within_a_second() {
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let b = Backend::start(Behaviour::Tagged("b".into())).await;
    let other = Backend::start(Behaviour::Tagged("other".into())).await;
    let etcd = Etcd::start();
    etcd.put(&format!("upstreams/dbx/{}", other.addr), "");
    let (lb, sp) = (free_port(), free_port());
    let lb_addr: SocketAddr = format!("127.0.0.1:{lb}").parse().unwrap();
    let show_addr: SocketAddr = format!("127.0.0.1:{sp}").parse().unwrap();
    let d = Daemon::start(&config(lb, sp, &Etcd::url_via(etcd.addr, PREFIX)));
    shows(show_addr, Duration::from_secs(3), |s| {
        s.contains("Backend server counts: 0")
    })
    .await;
    let second = Duration::from_secs(1);
    let mut latencies = Vec::new();

    etcd.put(&key(&a), "");
    etcd.put(&key(&b), "");
    latencies.push(
        shows(show_addr, second, |s| {
            s.contains(&format!(
                "server {} weight=1 max_fails=2 fail_timeout=10s;",
                a.addr
            )) && s.contains(&b.addr.to_string())
        })
        .await,
    );
    let t = tags(lb_addr, 10).await;
    assert!(count(&t, "a") == 5 && count(&t, "b") == 5, "{t:?}");

    etcd.delete(&key(&a));
    latencies.push(shows(show_addr, second, |s| !s.contains(&a.addr.to_string())).await);
    assert_eq!(count(&tags(lb_addr, 4).await, "b"), 4);

    etcd.put(&key(&a), "");
    etcd.put(&key(&b), r#"{"weight":"3"}"#);
    latencies.push(
        shows(show_addr, second, |s| {
            s.contains(&format!("{} weight=3", b.addr)) && s.contains(&a.addr.to_string())
        })
        .await,
    );
    let t = tags(lb_addr, 20).await;
    assert_eq!((count(&t, "a"), count(&t, "b")), (5, 15), "{t:?}");

    etcd.put(&key(&a), r#"{"down":1}"#);
    latencies.push(shows(show_addr, second, |s| s.contains(" down;")).await);
    assert_eq!(count(&tags(lb_addr, 4).await, "b"), 4);

    // Bad data: the last good set stays, the key is named.
    etcd.put(&format!("{PREFIX}10.0.0.9:1"), "{broken");
    assert!(
        d.wait_log(&format!("{PREFIX}10.0.0.9:1"), Duration::from_secs(2)),
        "{}",
        d.log()
    );
    assert!(show(show_addr, "db").contains("Backend server counts: 2"));
    assert_eq!(count(&tags(lb_addr, 4).await, "b"), 4);
    etcd.delete(&format!("{PREFIX}10.0.0.9:1"));

    // As nginx-upsync: deleting every key leaves the last set serving.
    etcd.delete(&key(&a));
    latencies.push(shows(show_addr, second, |s| !s.contains(&a.addr.to_string())).await);
    etcd.delete(&key(&b));
    assert!(d.wait_log("source lists no servers", second), "{}", d.log());
    assert!(show(show_addr, "db").contains(&b.addr.to_string()));
    assert_eq!(count(&tags(lb_addr, 4).await, "b"), 4);
    assert_eq!(other.accepted(), 0);
    println!("etcd update latencies (upstream_show): {latencies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_compaction_while_disconnected_reads_the_prefix_again() {
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let b = Backend::start(Behaviour::Tagged("b".into())).await;
    let c = Backend::start(Behaviour::Tagged("c".into())).await;
    let etcd = Etcd::start();
    etcd.put(&key(&a), "");
    let relay = Relay::start(etcd.addr).await;
    let (lb, sp) = (free_port(), free_port());
    let show_addr: SocketAddr = format!("127.0.0.1:{sp}").parse().unwrap();
    let d = Daemon::start(&config(lb, sp, &Etcd::url_via(relay.addr, PREFIX)));
    shows(show_addr, Duration::from_secs(3), |s| {
        s.contains(&a.addr.to_string())
    })
    .await;

    relay.cut();
    assert!(
        d.wait_log("discovery fetch failed", Duration::from_secs(3)),
        "{}",
        d.log()
    );
    etcd.put(&key(&b), "");
    etcd.delete(&key(&a));
    let rev = etcd.put(&key(&c), "");
    etcd.put("unrelated", "x");
    etcd.compact(rev);
    relay.restore();

    shows(show_addr, Duration::from_secs(3), |s| {
        s.contains("Backend server counts: 2")
            && s.contains(&b.addr.to_string())
            && s.contains(&c.addr.to_string())
    })
    .await;
    assert!(
        d.log()
            .contains("etcd cancelled the watch; reading the prefix again"),
        "{}",
        d.log()
    );
    let t = tags(format!("127.0.0.1:{lb}").parse().unwrap(), 4).await;
    assert!(count(&t, "b") == 2 && count(&t, "c") == 2, "{t:?}");
}

/// A key the daemon cannot use is an answer it cannot take: with strong_dependency the
/// start fails after its tries, as with Consul (it used to wait on a watch for ever,
/// with no listener open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strong_dependency_with_unusable_keys_fails_the_start() {
    let etcd = Etcd::start();
    etcd.put(&format!("{PREFIX}127.0.0.1:1"), r#"{"weight":"heavy"}"#);
    let (lb, sp) = (free_port(), free_port());
    let cfg = config(lb, sp, &Etcd::url_via(etcd.addr, PREFIX)).replace(
        "timeout = \"5s\"",
        "timeout = \"5s\"\nstrong_dependency = true",
    );
    let d = Daemon::spawn(&cfg, &[]);
    let status = d
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("l4lb kept waiting: {}", d.log()));
    assert!(!status.success(), "{status}");
    assert!(
        d.log()
            .contains("did not answer after 3 tries and strong_dependency = true"),
        "{}",
        d.log()
    );
}
