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
            health_check: None,
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

/// nginx's `single`: the only server of an upstream without backups stays in after a
/// failed connect (a restarting database is not refused for `fail_timeout`); with a
/// backup, failures count again.
#[test]
fn a_lone_server_is_not_taken_out_by_failed_connects() {
    let u = upstream(Balance::RoundRobin, vec![spec(1, 1)]);
    for _ in 0..3 {
        let l = u.select(client(0), &[]).expect("the lone server");
        l.connect_failed("u");
    }
    let l = u
        .select(client(0), &[])
        .expect("still chosen after 3 failures");
    assert_eq!(l.state.connect_failures(), 3, "failures are still counted");
    assert_eq!(l.state.health.fails(), 0);
    drop(l);
    let mut b = spec(2, 1);
    b.backup = true;
    let u = upstream(Balance::RoundRobin, vec![spec(1, 1), b]);
    u.select(client(0), &[]).unwrap().connect_failed("u");
    assert_eq!(port(&u.select(client(0), &[]).unwrap()), 2);
}

/// Once a failed server's `fail_timeout` has passed, one connection tries it, and the
/// others keep away for another `fail_timeout` unless that one succeeds: a server
/// whose connects time out stalls one client per `fail_timeout`, not half of them.
#[test]
fn a_failed_server_gets_one_try_per_fail_timeout() {
    let timeout = Duration::from_millis(200);
    let with_timeout = |p| ServerSpec {
        fail_timeout: timeout,
        ..spec(p, 1)
    };
    let u = upstream(Balance::RoundRobin, vec![with_timeout(1), with_timeout(2)]);
    let picks = |n| {
        (0..n)
            .map(|_| u.select(client(0), &[]).unwrap())
            .collect::<Vec<_>>()
    };
    let first = picks(2);
    let failing = first.iter().find(|l| port(l) == 1).unwrap();
    failing.connect_failed("u");
    drop(first);
    assert!(picks(10).iter().all(|l| port(l) == 2));
    std::thread::sleep(timeout + Duration::from_millis(20));
    let trial = picks(10);
    let tried: Vec<_> = trial.iter().filter(|l| port(l) == 1).collect();
    assert_eq!(tried.len(), 1, "one try after fail_timeout");
    // Its try still pending (a slow connect), the server stays out.
    assert!(picks(10).iter().all(|l| port(l) == 2));
    tried[0].connect_succeeded();
    let after = picks(10);
    assert_eq!(after.iter().filter(|l| port(l) == 1).count(), 5);
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
    let upsync = Some(crate::config::UpsyncConfig::for_test(
        crate::config::UpsyncKind::Consul,
        "http://127.0.0.1:8500/v1/kv/u/",
    ));
    let cfg = UpstreamConfig {
        name: "u".into(),
        balance: Balance::RoundRobin,
        servers: vec![spec(1, 1)],
        upsync,
        health_check: None,
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

type ReadHook = Box<dyn Fn(&PeerState)>;

thread_local! {
    /// Runs right after a server's active count is read on this thread: stands in for
    /// another worker thread opening or closing connections between two reads.
    static AFTER_ACTIVE_READ: std::cell::RefCell<Option<ReadHook>> =
        const { std::cell::RefCell::new(None) };
}

pub(super) fn after_active_read(state: &PeerState) {
    AFTER_ACTIVE_READ.with(|h| {
        if let Some(hook) = h.borrow().as_ref() {
            hook(state);
        }
    });
}

fn with_read_hook<T>(hook: impl Fn(&PeerState) + 'static, f: impl FnOnce() -> T) -> T {
    AFTER_ACTIVE_READ.with(|h| *h.borrow_mut() = Some(Box::new(hook)));
    let out = f();
    AFTER_ACTIVE_READ.with(|h| *h.borrow_mut() = None);
    out
}

const EVERY_METHOD: [Balance; 6] = [
    Balance::RoundRobin,
    Balance::LeastConn,
    Balance::Hash { consistent: false },
    Balance::Hash { consistent: true },
    Balance::Random { two: false },
    Balance::Random { two: true },
];

/// The race behind "index out of bounds: the len is 0" in least_conn: it read every
/// count once to find the minimum and again to collect the ties, so a count that moved
/// in between left the tie set empty. Here every count moves right after each read, on
/// every decision; a decision must read each count once and always choose.
#[test]
fn counts_moving_between_reads_never_empty_a_decision() {
    for balance in EVERY_METHOD {
        let u = upstream(
            balance,
            vec![spec(1, 1), spec(2, 2), spec(3, 3), spec(4, 1), spec(5, 1)],
        );
        let reads = std::rc::Rc::new(std::cell::Cell::new(0u32));
        let counter = std::rc::Rc::clone(&reads);
        let decisions = 300u32;
        let chosen: Vec<u16> = with_read_hook(
            move |state| {
                counter.set(counter.get() + 1);
                // Alternately a burst of new connections and all of them ending.
                if counter.get().is_multiple_of(2) {
                    state.active.fetch_add(5, Ordering::Relaxed);
                } else {
                    let n = state.active.load(Ordering::Relaxed);
                    state.active.fetch_sub(n.min(5), Ordering::Relaxed);
                }
            },
            || {
                (0..decisions)
                    .map(|i| {
                        let lease = u.select(client(i), &[]);
                        port(&lease.unwrap_or_else(|| panic!("{balance:?}: no choice")))
                    })
                    .collect()
            },
        );
        assert_eq!(
            reads.get(),
            5 * decisions,
            "{balance:?}: each count must be read exactly once per decision"
        );
        assert!(chosen.iter().all(|p| (1..=5).contains(p)), "{balance:?}");
    }
}

/// least_conn decides on the counts it read, whatever they became since.
#[test]
fn least_conn_uses_the_counts_it_read() {
    let u = upstream(Balance::LeastConn, vec![spec(1, 1), spec(2, 1), spec(3, 1)]);
    let snap = u.snapshot();
    let reads: Vec<u32> = vec![4, 1, 4];
    let candidates: Vec<balance::Candidate<'_>> = snap
        .peers
        .iter()
        .enumerate()
        .map(|(index, peer)| balance::Candidate {
            peer,
            index,
            active: reads[index],
        })
        .collect();
    // Meanwhile server 2 became the busiest by far.
    snap.peers[1].state.active.store(100, Ordering::Relaxed);
    let chosen = balance::choose(
        Balance::LeastConn,
        &snap.peers,
        None,
        &candidates,
        client(0),
    );
    assert_eq!(chosen.map(|p| p.spec.addr.port()), Some(2));
    snap.peers[1].state.active.store(0, Ordering::Relaxed);
}

#[test]
fn no_method_chooses_from_an_empty_set() {
    let u = upstream(Balance::RoundRobin, vec![spec(1, 1)]);
    let snap = u.snapshot();
    for balance in EVERY_METHOD {
        assert!(balance::choose(balance, &snap.peers, None, &[], client(0)).is_none());
    }
}

/// Many threads selecting and releasing at once: every decision chooses, and
/// `max_conns` is never exceeded (leases are only taken under the selection lock).
#[test]
fn concurrent_selection_always_chooses_and_respects_max_conns() {
    for balance in EVERY_METHOD {
        let capped = ServerSpec {
            max_conns: 3,
            ..spec(3, 1)
        };
        let u = upstream(balance, vec![spec(1, 2), spec(2, 1), capped]);
        let peak = Arc::new(std::sync::atomic::AtomicU32::new(0));
        std::thread::scope(|s| {
            for t in 0..8u32 {
                let (u, peak) = (&u, &peak);
                s.spawn(move || {
                    let mut held = std::collections::VecDeque::new();
                    for i in 0..5_000u32 {
                        let lease = u
                            .select(client(t * 10_000 + i), &[])
                            .unwrap_or_else(|| panic!("{balance:?}: no choice"));
                        if lease.spec.addr.port() == 3 {
                            peak.fetch_max(lease.state.active(), Ordering::Relaxed);
                        }
                        held.push_back(lease);
                        if held.len() > 4 {
                            held.pop_front();
                        }
                    }
                });
            }
        });
        assert!(
            peak.load(Ordering::Relaxed) <= 3,
            "{balance:?}: max_conns 3 exceeded: {}",
            peak.load(Ordering::Relaxed)
        );
    }
}

#[test]
fn update_reads_and_writes_the_set_as_one_step_and_an_error_changes_nothing() {
    let u = upstream(Balance::RoundRobin, vec![spec(1, 1), spec(2, 1)]);
    let refused: Result<((), bool), &str> = u.update(Source::Admin, |_, _| Err("no"));
    assert_eq!(refused, Err("no"));
    assert_eq!(
        u.snapshot().source,
        Source::Config,
        "an error changes nothing"
    );
    let (inside, go_on) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
    let seen = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            u.update(Source::Admin, |_, mut servers| {
                let seen = servers.len();
                inside.wait();
                // The other writer has started by now, and waits for this one.
                go_on.wait();
                std::thread::sleep(std::time::Duration::from_millis(20));
                servers.push(spec(3, 1));
                Ok::<_, ()>((servers, seen))
            })
        });
        inside.wait();
        let other = scope.spawn(|| u.set_servers(vec![spec(1, 1)], Source::Consul));
        go_on.wait();
        let seen = writer.join().unwrap();
        other.join().unwrap();
        seen
    });
    assert_eq!(seen, Ok((2, true)));
    // The later writer applied after the update, not in the middle of it.
    let ports: Vec<u16> = u.snapshot().specs().map(|s| s.addr.port()).collect();
    assert_eq!(ports, [1], "{ports:?}");
    assert_eq!(u.snapshot().source, Source::Consul);
}
