use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::*;
use crate::config::{Balance, ServerSpec, UpstreamConfig};

fn spec(port: u16, weight: u32) -> ServerSpec {
    ServerSpec {
        weight,
        ..ServerSpec::new(SocketAddr::from(([127, 0, 0, 1], port)))
    }
}

fn upstream(balance: Balance, servers: Vec<ServerSpec>) -> Arc<Upstream> {
    Upstream::new(
        &UpstreamConfig {
            name: "u".into(),
            balance,
            servers,
            upsync: None,
        },
        Source::Config,
    )
}

fn client(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

fn port(l: &Lease) -> u16 {
    l.spec.addr.port()
}

#[test]
fn least_conn_follows_active_count_and_weight() {
    let u = upstream(Balance::LeastConn, vec![spec(1, 1), spec(2, 2)]);
    // Weight 2 carries twice the connections of weight 1 before they tie.
    let leases: Vec<Lease> = (0..6).map(|_| u.select(client(0), &[]).unwrap()).collect();
    let on = |p| leases.iter().filter(|l| port(l) == p).count();
    assert_eq!((on(1), on(2)), (2, 4));
    // Closing connections on server 1 makes it the least loaded.
    let mut leases = leases;
    leases.retain(|l| port(l) != 1);
    assert_eq!(port(&u.select(client(0), &[]).unwrap()), 1);
}

#[test]
fn least_conn_ties_go_round_robin() {
    let u = upstream(Balance::LeastConn, vec![spec(1, 1), spec(2, 1), spec(3, 1)]);
    let picks: Vec<u16> = (0..6)
        .map(|_| port(&u.select(client(0), &[]).unwrap()))
        .collect();
    let mut counts = HashMap::new();
    for p in picks {
        *counts.entry(p).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&c| c == 2), "{counts:?}");
}

#[test]
fn plain_hash_is_stable_and_spreads() {
    let u = upstream(
        Balance::Hash { consistent: false },
        vec![spec(1, 1), spec(2, 1), spec(3, 1)],
    );
    let mut counts = HashMap::new();
    for i in 0..3000 {
        let a = port(&u.select(client(i), &[]).unwrap());
        let b = port(&u.select(client(i), &[]).unwrap());
        assert_eq!(a, b, "same client, same server");
        *counts.entry(a).or_insert(0) += 1;
    }
    assert!(
        counts.values().all(|&c| (700..1300).contains(&c)),
        "{counts:?}"
    );
}

#[test]
fn consistent_hash_moves_only_the_lost_servers_clients() {
    let servers = vec![spec(1, 1), spec(2, 1), spec(3, 1), spec(4, 1)];
    let u = upstream(Balance::Hash { consistent: true }, servers.clone());
    let before: Vec<u16> = (0..2000)
        .map(|i| port(&u.select(client(i), &[]).unwrap()))
        .collect();
    u.set_servers(servers[..3].to_vec(), Source::Config);
    let after: Vec<u16> = (0..2000)
        .map(|i| port(&u.select(client(i), &[]).unwrap()))
        .collect();
    for (b, a) in before.iter().zip(&after) {
        if *b != 4 {
            assert_eq!(a, b, "a client of a remaining server moved");
        }
    }
    let share = before.iter().filter(|&&p| p == 4).count();
    assert!(
        (300..700).contains(&share),
        "server 4 had {share} of 2000 clients"
    );
}

#[test]
fn hash_skips_unavailable_servers_and_keeps_others_in_place() {
    let u = upstream(
        Balance::Hash { consistent: false },
        vec![spec(1, 1), spec(2, 1)],
    );
    let before: Vec<u16> = (0..200)
        .map(|i| port(&u.select(client(i), &[]).unwrap()))
        .collect();
    let tried = [SocketAddr::from(([127, 0, 0, 1], 1))];
    for (i, b) in before.iter().enumerate() {
        let p = port(&u.select(client(i as u32), &tried).unwrap());
        assert_eq!(p, 2);
        if *b == 2 {
            assert_eq!(p, *b);
        }
    }
}

#[test]
fn random_two_prefers_the_less_loaded() {
    let u = upstream(Balance::Random { two: true }, vec![spec(1, 1), spec(2, 1)]);
    let _held: Vec<Lease> = (0..20)
        .map(|_| {
            u.select(client(0), &[SocketAddr::from(([127, 0, 0, 1], 2))])
                .unwrap()
        })
        .collect();
    // With two choices and server 1 holding 20 connections, server 2 always wins.
    for _ in 0..50 {
        assert_eq!(port(&u.select(client(0), &[]).unwrap()), 2);
    }
}

#[test]
fn random_respects_weights() {
    let u = upstream(Balance::Random { two: false }, vec![spec(1, 1), spec(2, 3)]);
    let n2 = (0..4000)
        .filter(|_| port(&u.select(client(0), &[]).unwrap()) == 2)
        .count();
    assert!((2700..3300).contains(&n2), "{n2}");
}

#[test]
fn backup_only_when_primaries_unavailable_and_down_never() {
    let mut b = spec(3, 1);
    b.backup = true;
    let mut d = spec(2, 1);
    d.down = true;
    let u = upstream(Balance::RoundRobin, vec![spec(1, 1), d, b]);
    for _ in 0..5 {
        assert_eq!(port(&u.select(client(0), &[]).unwrap()), 1);
    }
    let primary = u.select(client(0), &[]).unwrap();
    primary.connect_failed("u"); // max_fails 1: unavailable for fail_timeout
    drop(primary);
    for _ in 0..5 {
        assert_eq!(port(&u.select(client(0), &[]).unwrap()), 3);
    }
    let all = [1, 2, 3].map(|p| SocketAddr::from(([127, 0, 0, 1], p)));
    assert!(u.select(client(0), &all).is_none());
}

#[test]
fn max_conns_caps_a_server() {
    let mut s = spec(1, 1);
    s.max_conns = 2;
    let u = upstream(Balance::RoundRobin, vec![s]);
    let a = u.select(client(0), &[]).unwrap();
    let _b = u.select(client(0), &[]).unwrap();
    assert!(u.select(client(0), &[]).is_none());
    drop(a);
    assert!(u.select(client(0), &[]).is_some());
}

#[test]
fn live_state_survives_snapshot_swaps() {
    let u = upstream(Balance::LeastConn, vec![spec(1, 1), spec(2, 1)]);
    let held = u.select(client(0), &[]).unwrap();
    let held_port = port(&held);
    let failing = u.select(client(0), &[]).unwrap();
    failing.connect_failed("u");
    let failed_port = port(&failing);
    drop(failing);
    // A discovery update that changes a weight keeps counts and failure windows.
    let mut changed = vec![spec(1, 1), spec(2, 1)];
    changed[0].weight = 5;
    assert!(u.set_servers(changed.clone(), Source::Consul));
    assert!(
        !u.set_servers(changed, Source::Consul),
        "no change, no swap"
    );
    let snap = u.snapshot();
    let state = |p: u16| {
        &snap
            .peers
            .iter()
            .find(|x| x.spec.addr.port() == p)
            .unwrap()
            .state
    };
    assert_eq!(state(held_port).active(), 1);
    assert!(!state(failed_port).health.is_available(Instant::now()));
    // Removing a server keeps the leases of its sessions valid.
    u.set_servers(vec![spec(3, 1)], Source::Consul);
    assert_eq!(held.state.active(), 1);
    drop(held);
    let l = u.select(client(0), &[]).unwrap();
    assert_eq!(port(&l), 3);
}

#[test]
fn reload_keeps_a_discovered_set_when_upsync_is_unchanged() {
    let upsync = Some(crate::config::UpsyncConfig {
        kind: crate::config::UpsyncKind::Consul,
        url: "http://127.0.0.1:8500/v1/kv/u/".into(),
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(60),
        strong_dependency: false,
        dump_path: None,
        token: None,
        ca_file: None,
        client_cert: None,
        client_key: None,
        consistency: crate::config::Consistency::Default,
    });
    let cfg = UpstreamConfig {
        name: "u".into(),
        balance: Balance::RoundRobin,
        servers: vec![spec(1, 1)],
        upsync,
    };
    let u = Upstream::new(&cfg, Source::Config);
    u.set_servers(vec![spec(7, 1)], Source::Consul);
    let mut reloaded = cfg.clone();
    reloaded.balance = Balance::LeastConn;
    u.reconfigure(&reloaded);
    let snap = u.snapshot();
    assert_eq!(snap.balance, Balance::LeastConn);
    assert_eq!(snap.peers[0].spec.addr.port(), 7);
    // A changed source keeps serving the current set until the new source answers.
    reloaded.upsync.as_mut().unwrap().url = "http://127.0.0.1:8500/v1/kv/other/".into();
    u.reconfigure(&reloaded);
    assert_eq!(u.snapshot().peers[0].spec.addr.port(), 7);
    // Without any upsync source the configured servers apply again.
    reloaded.upsync = None;
    u.reconfigure(&reloaded);
    assert_eq!(u.snapshot().peers[0].spec.addr.port(), 1);
}
