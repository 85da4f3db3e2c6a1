//! The text nginx-upsync's `upstream_show` prints, also the dump file's line format.

use std::fmt::Write;

use crate::config::ServerSpec;
use crate::upstream::Upstream;

/// One backend as an nginx `server` directive (loadable by nginx with `include`).
pub fn server_line(spec: &ServerSpec) -> String {
    let mut line = format!(
        "server {} weight={} max_fails={} fail_timeout={}",
        spec.addr,
        spec.weight,
        spec.max_fails,
        duration(spec.fail_timeout)
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

/// Whole seconds as `10s`, anything finer in milliseconds (`500ms`): a dump file must
/// read back the value it was written from, and the parsers keep milliseconds.
fn duration(d: std::time::Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// nginx-upsync's listing; with health checks, each line ends with a `#` comment
/// (which nginx's parser skips) giving the check state, last result and why.
pub fn render(up: &Upstream) -> String {
    let snap = up.snapshot();
    let checked = up.config().health_check.is_some();
    let mut out = format!(
        "Upstream name: {};Backend server counts: {}\n",
        up.name,
        snap.peers.len()
    );
    for peer in &snap.peers {
        let _ = write!(out, "        {}", server_line(&peer.spec));
        if checked {
            let r = peer.state.checks.report();
            let _ = write!(out, " # health={}", r.status.as_str());
            if let Some(last) = &r.last {
                let _ = write!(
                    out,
                    " last={} latency_ms={:.1} reason={:?}",
                    if last.ok { "pass" } else { "fail" },
                    last.latency_ms,
                    last.reason
                );
            }
        }
        out.push('\n');
    }
    out
}
