//! A fleet that agrees: three l4lb processes on one Consul (the stand-in) and on one
//! real etcd. After each of 200 changes all three serve the same set within a bound
//! (the p99 and worst case are printed), and with `hash` + `consistent` a client address
//! maps to the same backend on every instance.

mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use support::consul::Consul;
use support::etcd::Etcd;
use support::{connect_from, free_port, read_line, show, Backend, Behaviour, Daemon};

const PREFIX: &str = "upstreams/db/";
const CHANGES: usize = 200;

struct Member {
    daemon: Daemon,
    lb: SocketAddr,
    show: SocketAddr,
}

fn member(kind: &str, url: &str) -> Member {
    let (lb, show) = (free_port(), free_port());
    let daemon = Daemon::start(&format!(
        r#"
[global]
splice = "off"
access_log = false

[upstream.db]
balance = "hash"
consistent = true

[upstream.db.upsync]
type = "{kind}"
url = "{url}"
interval = "200ms"
timeout = "5s"

[[server]]
listen = "127.0.0.1:{lb}"
proxy_pass = "db"
proxy_connect_timeout = "1s"

[[server]]
listen = "127.0.0.1:{show}"
upstream_show = true
"#
    ));
    Member {
        daemon,
        lb: SocketAddr::from(([127, 0, 0, 1], lb)),
        show: SocketAddr::from(([127, 0, 0, 1], show)),
    }
}

/// The server addresses an instance shows.
fn shown(m: &Member) -> BTreeSet<String> {
    show(m.show, "db")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("server "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

/// Applies `CHANGES` adds and removes through `put`/`delete` and measures how long the
/// whole fleet takes to show each new set.
async fn converge(
    fleet: &[Member],
    mut put: impl FnMut(&str),
    mut delete: impl FnMut(&str),
    base: &BTreeSet<String>,
) -> Vec<Duration> {
    let mut want = base.clone();
    let mut took = Vec::with_capacity(CHANGES);
    for i in 0..CHANGES {
        // Odd changes remove what the even one before added: the set keeps moving.
        let addr = format!("127.0.0.1:{}", 20_000 + (i / 2) % 500);
        if i % 2 == 0 {
            put(&addr);
            want.insert(addr);
        } else {
            delete(&addr);
            want.remove(&addr);
        }
        let start = Instant::now();
        loop {
            if fleet.iter().all(|m| shown(m) == want) {
                took.push(start.elapsed());
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "change {i} not applied everywhere in 10 s: {:?}",
                fleet.iter().map(shown).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    took.sort();
    took
}

/// The backend each of 50 client addresses reaches, per instance.
async fn mapping(m: &Member) -> Vec<String> {
    let mut out = Vec::new();
    for c in 0..50u8 {
        let src = IpAddr::V4(Ipv4Addr::new(127, 0, 2, 10 + c));
        let mut s = connect_from(src, m.lb).await.expect("connect");
        out.push(
            read_line(&mut s)
                .await
                .unwrap_or_else(|e| format!("ERR {e}")),
        );
    }
    out
}

async fn agree_on_hashing(fleet: &[Member]) {
    let first = mapping(&fleet[0]).await;
    assert!(first.iter().all(|t| !t.starts_with("ERR")), "{first:?}");
    let distinct: BTreeSet<&String> = first.iter().collect();
    assert!(distinct.len() >= 3, "hashing used {distinct:?} only");
    for m in &fleet[1..] {
        assert_eq!(
            mapping(m).await,
            first,
            "instances hash clients differently"
        );
    }
}

fn report(source: &str, took: &[Duration]) {
    eprintln!(
        "{source}: {CHANGES} changes, fleet of 3 converged in p50 {:?}, p99 {:?}, max {:?}",
        percentile(took, 0.5),
        percentile(took, 0.99),
        took.last().copied().unwrap_or_default()
    );
}

async fn backends() -> Vec<Backend> {
    let mut out = Vec::new();
    for i in 0..5 {
        out.push(Backend::start(Behaviour::Tagged(format!("b{i}"))).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_on_consul_agrees() {
    let consul = Consul::start().await;
    let bs = backends().await;
    for b in &bs {
        consul.put(&format!("{PREFIX}{}", b.addr), "");
    }
    let url = consul.kv_url(PREFIX);
    let fleet: Vec<Member> = (0..3).map(|_| member("consul", &url)).collect();
    let base: BTreeSet<String> = bs.iter().map(|b| b.addr.to_string()).collect();
    let took = converge(
        &fleet,
        |a| consul.put(&format!("{PREFIX}{a}"), ""),
        |a| consul.delete(&format!("{PREFIX}{a}")),
        &base,
    )
    .await;
    report("consul", &took);
    assert!(percentile(&took, 0.99) < Duration::from_secs(1), "{took:?}");
    agree_on_hashing(&fleet).await;
    assert!(fleet.iter().all(|m| m.daemon.exited().is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_on_etcd_agrees() {
    let etcd = Etcd::start();
    let bs = backends().await;
    for b in &bs {
        etcd.put(&format!("{PREFIX}{}", b.addr), "");
    }
    let url = Etcd::url_via(etcd.addr, PREFIX);
    let fleet: Vec<Member> = (0..3).map(|_| member("etcd", &url)).collect();
    let base: BTreeSet<String> = bs.iter().map(|b| b.addr.to_string()).collect();
    let took = converge(
        &fleet,
        |a| {
            etcd.put(&format!("{PREFIX}{a}"), "");
        },
        |a| {
            etcd.delete(&format!("{PREFIX}{a}"));
        },
        &base,
    )
    .await;
    report("etcd", &took);
    assert!(percentile(&took, 0.99) < Duration::from_secs(1), "{took:?}");
    agree_on_hashing(&fleet).await;
    assert!(fleet.iter().all(|m| m.daemon.exited().is_none()));
}
