//! Balancing methods, as nginx's stream upstream modules define them.
//!
//! Every method decides on [`Candidate`]s: the eligible servers with their active
//! connection counts read once when the decision started. Other threads open and close
//! connections meanwhile; reading a count twice in one decision let two reads disagree
//! (a least_conn tie set once came out empty and indexing it panicked). No function here
//! indexes a slice: an empty or changed set yields `None`, never a panic.

use std::cmp::Ordering;
use std::net::IpAddr;
use std::sync::atomic::Ordering as AtomicOrdering;

use super::Peer;
use crate::config::Balance;

/// Points per unit of weight on the consistent-hash ring (nginx uses 160).
const POINTS_PER_WEIGHT: u32 = 160;
/// Most points on a ring (16 MiB of them). Weights come from the data (a Consul value
/// may say 4,000,000,000, which once meant 640 billion points and an abort): past this,
/// each server gets its share of this many points instead. Sets whose weights add up
/// to at most 6,553 are not affected.
const MAX_RING_POINTS: u64 = 1 << 20;
/// Rehashes before the plain hash method gives up and falls back to round-robin (nginx: 20).
const HASH_TRIES: u32 = 20;

/// Ketama-style ring over the primary servers: (point, index into the snapshot's peers).
#[derive(Debug)]
pub(super) struct Ring {
    points: Vec<(u32, usize)>,
}

impl Ring {
    pub(super) fn build(peers: &[Peer]) -> Ring {
        let primaries = || peers.iter().enumerate().filter(|(_, p)| !p.spec.backup);
        let wanted = |p: &Peer| u64::from(p.spec.weight) * u64::from(POINTS_PER_WEIGHT);
        let total: u64 = primaries().map(|(_, p)| wanted(p)).sum();
        let mut points = Vec::new();
        for (i, p) in primaries() {
            let n = if total <= MAX_RING_POINTS {
                wanted(p)
            } else {
                // Below 2^40 * 2^20: no overflow.
                (wanted(p) * MAX_RING_POINTS / total).max(1)
            };
            // n <= MAX_RING_POINTS. The point index stays a u32, hashed as 4 bytes, so
            // rings (and which server a client lands on) are as before.
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            let key = p.spec.addr.to_string();
            for j in 0..n {
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

/// A server that may take this connection, with its load as of the start of the decision.
#[derive(Clone, Copy, Debug)]
pub(super) struct Candidate<'a> {
    pub peer: &'a Peer,
    /// Position in the snapshot's peer list (what the hash methods map onto).
    pub index: usize,
    /// Active connections, read once: every rule of one decision sees the same value.
    pub active: u32,
}

impl Candidate<'_> {
    /// Compares active/weight of two candidates without division.
    fn cmp_load(&self, other: &Candidate<'_>) -> Ordering {
        let mine = u64::from(self.active) * u64::from(other.peer.spec.weight);
        let theirs = u64::from(other.active) * u64::from(self.peer.spec.weight);
        mine.cmp(&theirs)
    }
}

/// Chooses among `candidates`; `all` is the snapshot's peer list, which the hash methods
/// map onto so that a server being unavailable moves only its own clients. `None` when
/// there is no candidate.
pub(super) fn choose<'a>(
    balance: Balance,
    all: &'a [Peer],
    ring: Option<&Ring>,
    candidates: &[Candidate<'a>],
    client: IpAddr,
) -> Option<&'a Peer> {
    match balance {
        Balance::RoundRobin => smooth_weighted(candidates),
        Balance::LeastConn => least_conn(candidates),
        Balance::Hash { consistent } => {
            let eligible = Eligible::new(all.len(), candidates);
            let hashed = if consistent {
                ring.and_then(|r| hash_ring(r, all, client, &eligible))
            } else {
                hash_plain(all, client, &eligible)
            };
            hashed.or_else(|| smooth_weighted(candidates))
        }
        Balance::Random { two } => random(candidates, two),
    }
}

/// Which of the snapshot's peers are candidates, by index.
struct Eligible(Vec<bool>);

impl Eligible {
    fn new(len: usize, candidates: &[Candidate<'_>]) -> Self {
        let mut ok = vec![false; len];
        for c in candidates {
            if let Some(slot) = ok.get_mut(c.index) {
                *slot = true;
            }
        }
        Eligible(ok)
    }

    fn get(&self, index: usize) -> bool {
        self.0.get(index).copied().unwrap_or(false)
    }
}

/// nginx's smooth weighted round-robin: even spread, weights respected.
fn smooth_weighted<'a>(candidates: &[Candidate<'a>]) -> Option<&'a Peer> {
    let total: i64 = candidates
        .iter()
        .map(|c| i64::from(c.peer.spec.weight))
        .sum();
    let mut best: Option<(&Peer, i64)> = None;
    for c in candidates {
        let w = i64::from(c.peer.spec.weight);
        let cw = c
            .peer
            .state
            .current_weight
            .fetch_add(w, AtomicOrdering::Relaxed)
            + w;
        if best.is_none_or(|(_, best_cw)| cw > best_cw) {
            best = Some((c.peer, cw));
        }
    }
    let (peer, _) = best?;
    peer.state
        .current_weight
        .fetch_sub(total, AtomicOrdering::Relaxed);
    Some(peer)
}

/// Fewest active connections relative to weight; ties go round-robin.
fn least_conn<'a>(candidates: &[Candidate<'a>]) -> Option<&'a Peer> {
    let least = candidates.iter().min_by(|a, b| a.cmp_load(b))?;
    let tied: Vec<Candidate<'a>> = candidates
        .iter()
        .filter(|c| c.cmp_load(least) == Ordering::Equal)
        .copied()
        .collect();
    match tied.as_slice() {
        [only] => Some(only.peer),
        _ => smooth_weighted(&tied),
    }
}

fn client_hash(client: IpAddr) -> u32 {
    crc32fast::hash(client.to_string().as_bytes())
}

fn hash_plain<'a>(all: &'a [Peer], client: IpAddr, eligible: &Eligible) -> Option<&'a Peer> {
    let primaries: Vec<(usize, &Peer)> = all
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.spec.backup)
        .collect();
    let total: u64 = primaries
        .iter()
        .map(|(_, p)| u64::from(p.spec.weight))
        .sum();
    if total == 0 {
        return None;
    }
    let mut h = client_hash(client);
    for _ in 0..HASH_TRIES {
        let mut w = u64::from(h) % total;
        let mut chosen = None;
        for &(i, p) in &primaries {
            let pw = u64::from(p.spec.weight);
            if w < pw {
                chosen = Some((i, p));
                break;
            }
            w -= pw;
        }
        if let Some((_, p)) = chosen.filter(|&(i, _)| eligible.get(i)) {
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
    eligible: &Eligible,
) -> Option<&'a Peer> {
    let h = client_hash(client);
    let start = ring.points.partition_point(|&(point, _)| point < h);
    // Clockwise from the client's point, wrapping once round the ring.
    let (before, after) = ring.points.split_at(start);
    after
        .iter()
        .chain(before)
        .map(|&(_, i)| i)
        .find(|&i| eligible.get(i))
        .and_then(|i| all.get(i))
}

fn weighted_pick<'a>(candidates: &[Candidate<'a>]) -> Option<Candidate<'a>> {
    let total: u64 = candidates
        .iter()
        .map(|c| u64::from(c.peer.spec.weight))
        .sum();
    let mut r = fastrand::u64(0..total.max(1));
    for c in candidates {
        let w = u64::from(c.peer.spec.weight);
        if r < w {
            return Some(*c);
        }
        r -= w;
    }
    candidates.last().copied()
}

/// nginx `random [two]`: a weighted pick, or two distinct weighted picks of which the
/// one with fewer connections per weight wins.
fn random<'a>(candidates: &[Candidate<'a>], two: bool) -> Option<&'a Peer> {
    let a = weighted_pick(candidates)?;
    if !two {
        return Some(a.peer);
    }
    let rest: Vec<Candidate<'a>> = candidates
        .iter()
        .filter(|c| c.index != a.index)
        .copied()
        .collect();
    match weighted_pick(&rest) {
        Some(b) if b.cmp_load(&a) == Ordering::Less => Some(b.peer),
        _ => Some(a.peer),
    }
}
