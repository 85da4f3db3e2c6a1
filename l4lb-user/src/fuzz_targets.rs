//! What the fuzz targets in `fuzz/` run (`cargo xtask fuzz`): each function feeds
//! arbitrary bytes to one parser and asserts what must hold for every input. Any input
//! may be rejected, but with an error that says where; none may panic; and what is
//! accepted must survive the round trip the daemon puts it through (a discovered set is
//! written to the dump file and read back at the next start, an admin change is shown
//! as JSON, a converted nginx configuration is loaded by l4lb).
//!
//! The unit tests replay the seed corpus (`fuzz/corpus/`) and every regression input
//! through these functions, so they run without cargo-fuzz too.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::config::{self, ServerSpec};
use crate::discovery::params::{ServerParams, Strictness};
use crate::discovery::{consul, consul_health, dump, etcd, servers_from_kv, SourceError};
use crate::proxy::proxy_protocol::{self, ReceiveError};
use crate::upstream::Source;

/// The key prefix the Consul KV and etcd targets read, as in the end-to-end tests.
const PREFIX: &str = "upstreams/db/";

/// `config::parse`: every error points at a line and column of the text.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::parse(text) {
        Ok(c) => {
            for u in c.upstreams.values() {
                assert!(u.servers.iter().all(|s| s.weight >= 1), "{u:?}");
            }
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "rejected without an error");
            let last_line = text.matches('\n').count() + 1;
            for e in &errors {
                assert!(
                    (1..=last_line).contains(&e.line) && e.column >= 1,
                    "error outside the text: {e:?}"
                );
                assert!(!e.key.is_empty() && !e.message.is_empty(), "{e:?}");
            }
        }
    }
}

/// A Consul KV `?recurse` answer: accepted servers are under the prefix and survive the
/// dump file.
pub fn consul_kv(data: &[u8]) {
    match consul::parse_kv(PREFIX, data) {
        Ok(servers) => {
            for s in &servers {
                assert_eq!(s.name.parse::<SocketAddr>().ok(), Some(s.addr), "{s:?}");
            }
            discovered(&servers);
        }
        Err(e) => bad_data(&e),
    }
}

/// A Consul health answer: accepted instances have a port and survive the dump file.
pub fn consul_health(data: &[u8]) {
    match consul_health::parse_body(data) {
        Ok(servers) => {
            assert!(servers.iter().all(|s| s.addr.port() != 0), "{servers:?}");
            discovered(&servers);
        }
        Err(e) => bad_data(&e),
    }
}

/// An etcd range answer (first line) and watch messages (each further line), whose
/// event batches are applied to the copy: a batch with a bad event changes nothing.
pub fn etcd(data: &[u8]) {
    let mut lines = data.split(|&b| b == b'\n');
    let range = lines.next().unwrap_or_default();
    let (mut revision, mut kvs) = match etcd::parse_range(range) {
        Ok(r) => r,
        Err(e) => return bad_data(&e),
    };
    for line in lines {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let message = match etcd::parse_watch(line) {
            Ok(m) => m,
            Err(e) => {
                bad_data(&e);
                continue;
            }
        };
        let Some(result) = message.result else {
            continue;
        };
        let before = kvs.clone();
        match etcd::apply(&mut kvs, revision, &result.events) {
            Ok(next) => {
                assert!(next >= revision, "revision went back: {revision} -> {next}");
                revision = next;
            }
            Err(e) => {
                bad_data(&e);
                assert_eq!(kvs, before, "a rejected batch changed the copy");
            }
        }
    }
    let entries = kvs.iter().map(|(k, v)| (k.as_slice(), v.as_slice()));
    match servers_from_kv(PREFIX, entries) {
        Ok(servers) => discovered(&servers),
        Err(e) => bad_data(&e),
    }
}

/// The dump file: errors name their line; accepted servers are written back unchanged.
pub fn dump(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match dump::parse(text) {
        Ok(servers) => {
            let again = dump::parse(&dump::render("db", Source::Consul, &servers));
            assert_eq!(again.ok().as_ref(), Some(&servers), "dump round trip");
        }
        Err(e) => {
            let shown = format!("{e:#}");
            assert!(shown.starts_with("line "), "no line in {shown:?}");
        }
    }
}

/// An admin API PUT/PATCH body: errors name the field; accepted parameters read back
/// the same from their JSON.
pub fn admin_body(data: &[u8]) {
    match crate::admin::api::parse_body(data) {
        Ok(params) => {
            let again = ServerParams::from_json(&params_json(&params), Strictness::Admin);
            assert_eq!(again, Ok(params), "admin body round trip");
        }
        Err(e) => assert!(!e.field.is_empty(), "error without a field: {e}"),
    }
}

/// A received PROXY header, as the daemon reads one from a connection: the result must
/// not depend on how the bytes were split into reads. Also the header l4lb writes for
/// addresses taken from the input is read back as the same client.
pub fn proxy_header(data: &[u8]) {
    // The daemon parses only after a read that brought bytes.
    if data.is_empty() {
        return;
    }
    match proxy_protocol::parse(data) {
        Ok(Some(received)) => {
            assert!(
                data.ends_with(&received.leftover),
                "leftover is not the tail"
            );
            let len = data.len() - received.leftover.len();
            // A header that arrives in pieces is waited for, never refused.
            for cut in 1..len {
                assert!(
                    matches!(proxy_protocol::parse(&data[..cut]), Ok(None)),
                    "the first {cut} bytes of a {len}-byte header are not incomplete"
                );
            }
            let more = [data, b"more"].concat();
            let later = proxy_protocol::parse(&more);
            assert!(
                matches!(&later, Ok(Some(r)) if r.client == received.client),
                "more bytes changed the header: {later:?}"
            );
        }
        Ok(None) => {}
        Err(e) => {
            // What was refused stays refused whatever follows.
            let more = [data, b"\r\n"].concat();
            assert!(
                matches!(
                    proxy_protocol::parse(&more),
                    Err(ReceiveError::Malformed(_))
                ),
                "refused ({e}), then accepted with more bytes"
            );
        }
    }
    if let Some((src, dst)) = addresses(data) {
        for version in [config::ProxyProtocol::V1, config::ProxyProtocol::V2] {
            let Some(header) = proxy_protocol::header(version, src, dst) else {
                continue;
            };
            let got = proxy_protocol::parse(&header);
            assert!(
                matches!(&got, Ok(Some(r)) if r.client == Some(written(src, dst)) && r.leftover.is_empty()),
                "{version:?} header for {src} -> {dst} reads back as {got:?}"
            );
        }
    }
}

/// `import-nginx` on one file: errors are located in it; a conversion without errors is
/// a configuration l4lb loads.
pub fn nginx_conf(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file: Arc<Path> = Arc::from(Path::new("nginx.conf"));
    match crate::import_nginx::convert_text(text, &file) {
        Ok(toml) => {
            if let Err(errors) = config::parse(&toml) {
                // Outside cargo fuzz (the corpus replay) names are looked up for real:
                // one that does not resolve here is not the conversion's fault.
                let errors: Vec<_> = errors
                    .iter()
                    .filter(|e| !e.message.starts_with("cannot resolve"))
                    .collect();
                assert!(
                    errors.is_empty(),
                    "l4lb rejects the conversion: {errors:#?}\n{toml}"
                );
            }
        }
        Err(errors) => {
            let last_line = text.matches('\n').count() + 1;
            for e in &errors.0 {
                assert!(e.loc.line <= last_line, "error past the end: {e}");
                assert!(!e.message.is_empty(), "{e:?}");
            }
        }
    }
}

/// What every discovery source's accepted servers must satisfy.
fn discovered(servers: &[ServerSpec]) {
    assert!(servers.iter().all(|s| s.weight >= 1), "{servers:?}");
    // The dump file keeps addresses, not names: compare what it keeps.
    let kept: Vec<ServerSpec> = servers
        .iter()
        .map(|s| ServerSpec {
            name: s.addr.to_string(),
            ..s.clone()
        })
        .collect();
    let again = dump::parse(&dump::render("db", Source::Consul, servers));
    assert_eq!(again.ok(), Some(kept), "dump round trip");
}

fn bad_data(e: &SourceError) {
    assert!(
        matches!(e, SourceError::BadData { .. }),
        "bad input is not reported as bad data: {e}"
    );
}

/// Parameters as the admin API's JSON, every duration in milliseconds.
fn params_json(p: &ServerParams) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.to_string(), v);
        }
    };
    put("weight", p.weight.map(Value::from));
    put("max_fails", p.max_fails.map(Value::from));
    put(
        "fail_timeout",
        p.fail_timeout
            .map(|d| Value::from(format!("{}ms", d.as_millis()))),
    );
    put("down", p.down.map(Value::from));
    put("backup", p.backup.map(Value::from));
    put("max_conns", p.max_conns.map(Value::from));
    Value::Object(m)
}

/// Two socket addresses from the first 36 bytes (v4 or v6 by the first byte's low bit).
fn addresses(data: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let one = |b: &[u8]| -> Option<SocketAddr> {
        let port = u16::from_be_bytes([*b.get(1)?, *b.get(2)?]);
        if b.first()? & 1 == 0 {
            let ip: [u8; 4] = b.get(3..7)?.try_into().ok()?;
            Some(SocketAddr::from((ip, port)))
        } else {
            let ip: [u8; 16] = b.get(3..19)?.try_into().ok()?;
            Some(SocketAddr::from((ip, port)))
        }
    };
    Some((one(data)?, one(data.get(18..)?)?))
}

/// The client a header written for `src` -> `dst` carries: IPv4-mapped addresses as
/// IPv4, and an IPv4 client as IPv4-mapped IPv6 when the other side is IPv6.
fn written(src: SocketAddr, dst: SocketAddr) -> SocketAddr {
    let canon = |a: SocketAddr| match a {
        SocketAddr::V6(v6) => v6
            .ip()
            .to_ipv4_mapped()
            .map_or(a, |v4| SocketAddr::new(v4.into(), v6.port())),
        v4 => v4,
    };
    match (canon(src), canon(dst)) {
        (s @ SocketAddr::V4(_), SocketAddr::V4(_)) => s,
        (SocketAddr::V4(s), _) => SocketAddr::new(s.ip().to_ipv6_mapped().into(), s.port()),
        (s, _) => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Target = fn(&[u8]);

    /// Every seed and regression input of every target, as `cargo fuzz` would run it.
    #[test]
    fn the_corpus_passes_every_target() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let targets: [(&str, Target); 8] = [
            ("config", config),
            ("consul_kv", consul_kv),
            ("consul_health", consul_health),
            ("etcd", etcd),
            ("dump", dump),
            ("admin_body", admin_body),
            ("proxy_header", proxy_header),
            ("nginx_conf", nginx_conf),
        ];
        for (name, target) in targets {
            let dir = root.join(name);
            let mut n = 0;
            for entry in std::fs::read_dir(&dir).expect("corpus directory") {
                let path = entry.expect("entry").path();
                let data = std::fs::read(&path).expect("corpus file");
                eprintln!("{name}: {}", path.display());
                target(&data);
                n += 1;
            }
            assert!(n >= 3, "{name}: only {n} seed inputs");
        }
    }

    #[test]
    fn proxy_addresses_from_bytes() {
        let v4 = [0u8, 0, 80, 10, 0, 0, 1];
        let mut data = [0u8; 40];
        data[..7].copy_from_slice(&v4);
        data[18] = 1;
        let (src, dst) = addresses(&data).expect("two addresses");
        assert_eq!(src, "10.0.0.1:80".parse().expect("addr"));
        assert!(dst.is_ipv6());
        assert_eq!(
            written(src, dst),
            "[::ffff:10.0.0.1]:80".parse().expect("addr")
        );
        assert!(addresses(&data[..20]).is_none());
    }
}
