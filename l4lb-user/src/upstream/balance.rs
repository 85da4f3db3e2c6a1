//! Balancing methods, as nginx's stream upstream modules define them.

use std::net::IpAddr;
use std::sync::atomic::Ordering;

use super::Peer;
use crate::config::Balance;

/// Points per unit of weight on the consistent-hash ring (nginx uses 160).
const POINTS_PER_WEIGHT: u32 = 160;
/// Rehashes before the plain hash method gives up and falls back to round-robin (nginx: 20).
const HASH_TRIES: u32 = 20;

/// Ketama-style ring over the primary servers: (point, index into the snapshot's peers).
#[derive(Debug)]
pub(super) struct Ring {
    points: Vec<(u32, usize)>,
}

impl Ring {
    pub(super) fn build(peers: &[Peer]) -> Ring {
        let mut points = Vec::new();
        for (i, p) in peers.iter().enumerate().filter(|(_, p)| !p.spec.backup) {
            let key = p.spec.addr.to_string();
            for j in 0..p.spec.weight.saturating_mul(POINTS_PER_WEIGHT) {
                let mut h = crc32fast::Hasher::new();
                h.update(key.as_bytes());
                h.update(&j.to_le_bytes());
                points.push((h.finalize(), i));
            }
        }
        points.sort_unstable();
        Ring { points }
    }
}

/// Chooses among `candidates` (eligible peers, non-empty); `all` is the snapshot's peer
/// list, which the hash methods map onto so that a server being down moves only its
/// own clients.
pub(super) fn choose<'a>(
    balance: Balance,
    all: &'a [Peer],
    ring: Option<&Ring>,
    candidates: &[&'a Peer],
    client: IpAddr,
    eligible: &dyn Fn(&Peer) -> bool,
) -> Option<&'a Peer> {
    if candidates.is_empty() {
        return None;
    }
    match balance {
        Balance::RoundRobin => Some(smooth_weighted(candidates)),
        Balance::LeastConn => Some(least_conn(candidates)),
        Balance::Hash { consistent: false } => {
            hash_plain(all, client, eligible).or_else(|| Some(smooth_weighted(candidates)))
        }
        Balance::Hash { consistent: true } => ring
            .and_then(|r| hash_ring(r, all, client, eligible))
            .or_else(|| Some(smooth_weighted(candidates))),
        Balance::Random { two } => Some(random(candidates, two)),
    }
}

/// nginx's smooth weighted round-robin: even spread, weights respected.
fn smooth_weighted<'a>(candidates: &[&'a Peer]) -> &'a Peer {
    let total: i64 = candidates.iter().map(|p| i64::from(p.spec.weight)).sum();
    let mut best = candidates[0];
    let mut best_cw = i64::MIN;
    for p in candidates {
        let w = i64::from(p.spec.weight);
        let cw = p.state.current_weight.fetch_add(w, Ordering::Relaxed) + w;
        if cw > best_cw {
            best = p;
            best_cw = cw;
        }
    }
    best.state
        .current_weight
        .fetch_sub(total, Ordering::Relaxed);
    best
}

/// Fewest active connections relative to weight; ties go round-robin.
fn least_conn<'a>(candidates: &[&'a Peer]) -> &'a Peer {
    // a.active / a.weight < b.active / b.weight, without division.
    let load = |p: &Peer| (u64::from(p.state.active()), u64::from(p.spec.weight));
    let less = |a: (u64, u64), b: (u64, u64)| a.0 * b.1 < b.0 * a.1;
    let mut best = load(candidates[0]);
    for p in &candidates[1..] {
        let l = load(p);
        if less(l, best) {
            best = l;
        }
    }
    let tied: Vec<&Peer> = candidates
        .iter()
        .copied()
        .filter(|p| {
            let l = load(p);
            !less(best, l) && !less(l, best)
        })
        .collect();
    if tied.len() == 1 {
        tied[0]
    } else {
        smooth_weighted(&tied)
    }
}

fn client_hash(client: IpAddr) -> u32 {
    crc32fast::hash(client.to_string().as_bytes())
}

fn hash_plain<'a>(
    all: &'a [Peer],
    client: IpAddr,
    eligible: &dyn Fn(&Peer) -> bool,
) -> Option<&'a Peer> {
    let primaries: Vec<&Peer> = all.iter().filter(|p| !p.spec.backup).collect();
    let total: u64 = primaries.iter().map(|p| u64::from(p.spec.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut h = client_hash(client);
    for _ in 0..HASH_TRIES {
        let mut w = u64::from(h) % total;
        let mut chosen = None;
        for p in &primaries {
            let pw = u64::from(p.spec.weight);
            if w < pw {
                chosen = Some(*p);
                break;
            }
            w -= pw;
        }
        if let Some(p) = chosen.filter(|p| eligible(p)) {
            return Some(p);
        }
        h = crc32fast::hash(&h.to_le_bytes());
    }
    None
}

fn hash_ring<'a>(
    ring: &Ring,
    all: &'a [Peer],
    client: IpAddr,
    eligible: &dyn Fn(&Peer) -> bool,
) -> Option<&'a Peer> {
    if ring.points.is_empty() {
        return None;
    }
    let h = client_hash(client);
    let start = ring.points.partition_point(|&(point, _)| point < h);
    (0..ring.points.len())
        .map(|k| ring.points[(start + k) % ring.points.len()].1)
        .map(|i| &all[i])
        .find(|p| eligible(p))
}

fn weighted_pick<'a>(candidates: &[&'a Peer]) -> &'a Peer {
    let total: u64 = candidates.iter().map(|p| u64::from(p.spec.weight)).sum();
    let mut r = fastrand::u64(0..total.max(1));
    for p in candidates {
        let w = u64::from(p.spec.weight);
        if r < w {
            return p;
        }
        r -= w;
    }
    candidates[candidates.len() - 1]
}

/// nginx `random [two]`: a weighted pick, or two distinct weighted picks of which the
/// one with fewer connections per weight wins.
fn random<'a>(candidates: &[&'a Peer], two: bool) -> &'a Peer {
    let a = weighted_pick(candidates);
    if !two || candidates.len() < 2 {
        return a;
    }
    let rest: Vec<&Peer> = candidates
        .iter()
        .copied()
        .filter(|p| !std::ptr::eq(*p, a))
        .collect();
    let b = weighted_pick(&rest);
    // a.active / a.weight vs b.active / b.weight, without division.
    let la = u64::from(a.state.active()) * u64::from(b.spec.weight);
    let lb = u64::from(b.state.active()) * u64::from(a.spec.weight);
    if lb < la {
        b
    } else {
        a
    }
}
