//! Property tests of the balancing methods: for any server set proptest makes up, the
//! invariants nginx's methods promise hold. Each property runs a few dozen cases, so
//! the whole module takes a few seconds.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use proptest::prelude::*;

use super::*;
use crate::config::{Balance, ServerSpec, UpstreamConfig};

const METHODS: [Balance; 6] = [
    Balance::RoundRobin,
    Balance::LeastConn,
    Balance::Hash { consistent: false },
    Balance::Hash { consistent: true },
    Balance::Random { two: false },
    Balance::Random { two: true },
];

/// Servers 127.0.0.1:1.. with the given weights and max_conns (0 = unlimited).
fn upstream(balance: Balance, servers: &[(u32, u32)]) -> Arc<Upstream> {
    let servers = servers
        .iter()
        .zip(1u16..)
        .map(|(&(weight, max_conns), port)| ServerSpec {
            weight,
            max_conns,
            ..ServerSpec::new(SocketAddr::from(([127, 0, 0, 1], port)))
        })
        .collect();
    Upstream::new(
        &UpstreamConfig {
            name: "p".into(),
            balance,
            servers,
            upsync: None,
            health_check: None,
        },
        Source::Config,
    )
}

/// Index of the chosen server in the list given to [`upstream`].
fn index(l: &Lease) -> usize {
    usize::from(l.spec.addr.port() - 1)
}

fn client(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(n))
}

fn weights(max_servers: usize) -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(1u32..=10, 1..=max_servers)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Smooth weighted round-robin is exact: over every full cycle (the sum of the
    /// weights) each server is chosen exactly its weight's times.
    #[test]
    fn round_robin_gives_each_server_its_weight_every_cycle(w in weights(8), cycles in 1usize..4) {
        let servers: Vec<(u32, u32)> = w.iter().map(|&w| (w, 0)).collect();
        let u = upstream(Balance::RoundRobin, &servers);
        let total: u32 = w.iter().sum();
        for _ in 0..cycles {
            let mut counts = vec![0u32; w.len()];
            for _ in 0..total {
                let l = u.select(client(0), &[]).expect("a server");
                counts[index(&l)] += 1;
            }
            prop_assert_eq!(&counts, &w);
        }
    }

    /// least_conn never chooses a server with more active connections per weight than
    /// another eligible one, whatever load the held connections make.
    #[test]
    fn least_conn_chooses_a_least_loaded_server(
        servers in prop::collection::vec((1u32..=5, 0u32..=4), 1..=6),
        ops in prop::collection::vec(any::<u8>(), 1..200),
    ) {
        let u = upstream(Balance::LeastConn, &servers);
        let mut held: Vec<Lease> = Vec::new();
        for op in ops {
            if op % 3 == 0 && !held.is_empty() {
                held.swap_remove(usize::from(op) % held.len());
                continue;
            }
            let mut active = vec![0u64; servers.len()];
            for l in &held {
                active[index(l)] += 1;
            }
            let eligible: Vec<usize> = (0..servers.len())
                .filter(|&i| servers[i].1 == 0 || active[i] < u64::from(servers[i].1))
                .collect();
            match u.select(client(u32::from(op)), &[]) {
                Some(l) => {
                    let c = index(&l);
                    prop_assert!(eligible.contains(&c), "chose a full server {}", c);
                    for &o in &eligible {
                        // active[c]/w[c] <= active[o]/w[o], without division.
                        prop_assert!(
                            active[c] * u64::from(servers[o].0) <= active[o] * u64::from(servers[c].0),
                            "chose {} ({} active, weight {}) over {} ({} active, weight {})",
                            c, active[c], servers[c].0, o, active[o], servers[o].0
                        );
                    }
                    held.push(l);
                }
                None => prop_assert!(eligible.is_empty(), "no choice with {:?} eligible", eligible),
            }
        }
    }

    /// Consistent hashing: removing one server moves only the clients it had.
    #[test]
    fn consistent_hash_moves_only_the_removed_servers_clients(
        w in prop::collection::vec(1u32..=4, 2..=8),
        removed in any::<prop::sample::Index>(),
        clients in prop::collection::vec(any::<u32>(), 200),
    ) {
        let servers: Vec<(u32, u32)> = w.iter().map(|&w| (w, 0)).collect();
        let u = upstream(Balance::Hash { consistent: true }, &servers);
        let before: Vec<usize> = clients
            .iter()
            .map(|&c| index(&u.select(client(c), &[]).expect("a server")))
            .collect();
        let gone = removed.index(servers.len());
        let remaining: Vec<ServerSpec> = u
            .snapshot()
            .specs()
            .filter(|s| usize::from(s.addr.port() - 1) != gone)
            .cloned()
            .collect();
        u.set_servers(remaining, Source::Config);
        for (&c, &b) in clients.iter().zip(&before) {
            let after = index(&u.select(client(c), &[]).expect("a server"));
            prop_assert_ne!(after, gone);
            if b != gone {
                prop_assert_eq!(after, b, "client {} moved off a server that stayed", c);
            }
        }
    }

    /// No method takes a server past its max_conns, and none refuses while a server
    /// has room.
    #[test]
    fn max_conns_is_never_exceeded(
        method in 0usize..METHODS.len(),
        servers in prop::collection::vec((1u32..=5, 0u32..=3), 1..=5),
        ops in prop::collection::vec(any::<u16>(), 1..200),
    ) {
        let u = upstream(METHODS[method], &servers);
        let mut held: Vec<Lease> = Vec::new();
        for op in ops {
            if op % 4 == 0 && !held.is_empty() {
                held.swap_remove(usize::from(op) % held.len());
                continue;
            }
            let mut active: HashMap<usize, u32> = HashMap::new();
            for l in &held {
                *active.entry(index(l)).or_default() += 1;
            }
            let room = servers
                .iter()
                .enumerate()
                .any(|(i, &(_, max))| max == 0 || active.get(&i).copied().unwrap_or(0) < max);
            match u.select(client(u32::from(op)), &[]) {
                Some(l) => {
                    let (i, max) = (index(&l), servers[index(&l)].1);
                    let now = active.get(&i).copied().unwrap_or(0) + 1;
                    prop_assert!(max == 0 || now <= max, "server {} has {} of max_conns {}", i, now, max);
                    prop_assert_eq!(l.state.active(), now);
                    held.push(l);
                }
                None => prop_assert!(!room, "{:?} refused with a server under max_conns", METHODS[method]),
            }
        }
    }
}

/// Any weight a source may send (up to u32::MAX) is balanced without overflow or a
/// runaway allocation: a consistent-hash ring once took 160 points per unit of weight,
/// 640 billion for a weight of 4,000,000,000, and aborted.
#[test]
fn the_largest_weights_are_balanced() {
    let servers = [(u32::MAX, 0), (1, 0), (4_000_000_000, 0), (u32::MAX - 1, 0)];
    for method in METHODS {
        let u = upstream(method, &servers);
        for c in 0..50 {
            assert!(
                u.select(client(c), &[]).is_some(),
                "{method:?} chose nothing"
            );
        }
    }
}

proptest! {
    // 20,000 selections a case: fewer cases.
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// `random` picks in proportion to weight: over 20,000 picks each server's share is
    /// within 2 points of its weight's share (over 5 standard deviations).
    #[test]
    fn random_follows_weights_in_the_long_run(w in weights(6)) {
        let servers: Vec<(u32, u32)> = w.iter().map(|&w| (w, 0)).collect();
        let u = upstream(Balance::Random { two: false }, &servers);
        const PICKS: u32 = 20_000;
        let mut counts = vec![0u32; w.len()];
        for _ in 0..PICKS {
            let l = u.select(client(0), &[]).expect("a server");
            counts[index(&l)] += 1;
        }
        let total: u32 = w.iter().sum();
        for (i, (&c, &wi)) in counts.iter().zip(&w).enumerate() {
            let got = f64::from(c) / f64::from(PICKS);
            let want = f64::from(wi) / f64::from(total);
            prop_assert!((got - want).abs() < 0.02, "server {}: {} of picks, weight share {}", i, got, want);
        }
    }
}
