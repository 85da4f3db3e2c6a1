//! The text nginx-upsync's `upstream_show` prints, also the dump file's line format.

use std::fmt::Write;

use crate::config::ServerSpec;
use crate::upstream::Upstream;

/// One backend as an nginx `server` directive (loadable by nginx with `include`).
pub fn server_line(spec: &ServerSpec) -> String {
    let mut line = format!(
        "server {} weight={} max_fails={} fail_timeout={}s",
        spec.addr,
        spec.weight,
        spec.max_fails,
        spec.fail_timeout.as_secs()
    );
    if spec.max_conns > 0 {
        let _ = write!(line, " max_conns={}", spec.max_conns);
    }
    if spec.backup {
        line.push_str(" backup");
    }
    if spec.down {
        line.push_str(" down");
    }
    line.push(';');
    line
}

pub fn render(up: &Upstream) -> String {
    let snap = up.snapshot();
    let mut out = format!(
        "Upstream name: {};Backend server counts: {}\n",
        up.name,
        snap.peers.len()
    );
    for peer in &snap.peers {
        let _ = writeln!(out, "        {}", server_line(&peer.spec));
    }
    out
}
