//! What the JSON admin API shows: upstreams with live per-server state, and metrics.

use std::time::Instant;

use serde_json::{json, Value};

use crate::config::{Balance, UpsyncKind};
use crate::discovery::Board;
use crate::upstream::{Peer, Upstream};

fn balance(b: Balance) -> &'static str {
    match b {
        Balance::RoundRobin => "round_robin",
        Balance::LeastConn => "least_conn",
        Balance::Hash { consistent: false } => "hash",
        Balance::Hash { consistent: true } => "hash_consistent",
        Balance::Random { two: false } => "random",
        Balance::Random { two: true } => "random_two",
    }
}

fn upsync_kind(k: UpsyncKind) -> &'static str {
    match k {
        UpsyncKind::Consul => "consul",
        UpsyncKind::ConsulHealth => "consul_health",
        UpsyncKind::Etcd => "etcd",
    }
}

pub fn server(peer: &Peer, source: &str, now: Instant, checked: bool) -> Value {
    let s = &peer.spec;
    let health_check = checked.then(|| peer.state.checks.report());
    json!({
        "address": s.addr.to_string(),
        "name": s.name,
        "weight": s.weight,
        "max_fails": s.max_fails,
        "fail_timeout": s.fail_timeout.as_secs_f64(),
        "max_conns": s.max_conns,
        "down": s.down,
        "backup": s.backup,
        "active": peer.state.active(),
        "total": peer.state.total(),
        "fails": peer.state.health.fails(),
        "available": !s.down && peer.state.is_available(now),
        "health_check": health_check,
        "source": source,
    })
}

pub fn upstream(up: &Upstream, board: &Board) -> Value {
    let snap = up.snapshot();
    let source = snap.source.to_string();
    let now = Instant::now();
    let config = up.config();
    let upsync = config.upsync.as_ref().map(|u| {
        let status = board.get(&up.name);
        json!({
            "type": upsync_kind(u.kind),
            "url": crate::discovery::shown_url(&u.url),
            "updates": status.as_ref().map_or(0, |s| s.updates.load(std::sync::atomic::Ordering::Relaxed)),
            "errors": status.as_ref().map_or(0, |s| s.errors.load(std::sync::atomic::Ordering::Relaxed)),
            "last_error": status.as_ref().and_then(|s| s.last_error()),
            "last_success_unix": status.as_ref().map_or(0, |s| s.last_success_unix()),
        })
    });
    json!({
        "name": up.name,
        "balance": balance(snap.balance),
        "source": source,
        "upsync": upsync,
        "health_check": config.health_check.as_ref().map(|h| json!({
            "type": h.kind.name(),
            "interval": h.interval.as_secs_f64(),
            "timeout": h.timeout.as_secs_f64(),
            "fails": h.fails,
            "passes": h.passes,
        })),
        "servers": snap
            .peers
            .iter()
            .map(|p| server(p, &source, now, config.health_check.is_some()))
            .collect::<Vec<_>>(),
    })
}
