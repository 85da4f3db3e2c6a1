//! `upstream NAME { }`: servers, the balancing method, and nginx-stream-upsync-module's
//! `upsync` / `upsync_dump_path`.

use std::path::Path;
use std::time::Duration;

use super::convert::{source, Converter};
use super::emit::{self, Section};
use super::parser::Directive;
use super::values::{
    duration, duration_at_least, flag, is_host_port, no_variables, number, positive_duration,
    single,
};

impl Converter {
    pub fn upstream(&mut self, d: &Directive) {
        let name = match d.args.as_slice() {
            [n] if !n.is_empty() => n.clone(),
            _ => return self.error(d, "takes one name"),
        };
        // nginx compares upstream names without regard to case.
        if let Some((_, first)) = self
            .declared
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(&name))
        {
            let msg = format!("{name:?} is duplicate (first defined at {first})");
            return self.error(d, msg);
        }
        self.declared.push((name.clone(), d.loc.clone()));
        let block = self.block_of(d);
        let mut s = Section::new(format!("[upstream.{}]", emit::key(&name)));
        s.comment(format!("nginx: upstream {name} {{ }} ({})", d.loc));
        let mut servers = Vec::new();
        // Each server's address as compared, and where it was listed.
        let mut listed = Vec::new();
        // A bad server line is reported once, not again as a missing server.
        let mut server_lines = 0;
        let mut method: Option<&Directive> = None;
        let mut upsync: Option<Section> = None;
        let mut dump: Option<&Directive> = None;
        let mut zone = false;
        let mut capped: Option<&Directive> = None;
        for x in block {
            match x.name.as_str() {
                "server" => {
                    server_lines += 1;
                    let Some(peer) = self.peer(x) else { continue };
                    if capped.is_none() && x.args.iter().any(|a| a.starts_with("max_conns=")) {
                        capped = Some(x);
                    }
                    let address = x.args.first().map_or("", String::as_str);
                    let key = same_server(address);
                    match listed.iter().find(|(k, _)| *k == key) {
                        Some((_, first)) => {
                            let msg = format!(
                                "{address} is listed twice (first at {first}): l4lb takes each server once; merge the lines (their weights add)"
                            );
                            self.error(x, msg);
                        }
                        None => {
                            listed.push((key, x.loc.clone()));
                            servers.push(peer);
                        }
                    }
                }
                "least_conn" | "hash" | "random" => match method {
                    Some(first) => {
                        let msg = format!("load balancing method redefined (first at {})", first.loc);
                        self.error(x, msg);
                    }
                    None => {
                        method = Some(x);
                        self.balance(x, &mut s);
                    }
                },
                "upsync" => match upsync {
                    Some(_) => self.error(x, "is duplicate"),
                    None => upsync = self.upsync(x, &name),
                },
                "upsync_dump_path" => dump = Some(x),
                "upsync_lb" => self.ignore(
                    x,
                    "l4lb keeps the upstream's own balancing method across upsync updates",
                ),
                // Left unexpanded by the loader: the upstream's own dump file.
                "include" => self.ignore(
                    x,
                    "the upsync dump file: l4lb reads dump_path itself at start (strong_dependency off)",
                ),
                "zone" => {
                    zone = true;
                    self.ignore(
                        x,
                        "l4lb shares an upstream's state between its threads without a zone",
                    );
                }
                "least_time" => self.unsupported(x, "least_time (NGINX Plus)"),
                "state" => self.unsupported(x, "state files (NGINX Plus)"),
                n if n == "check" || n.starts_with("check_") => self.unsupported(
                    x,
                    "the upstream check module's directives (write [upstream.NAME.health_check] instead)",
                ),
                _ => self.error(x, "unknown directive in upstream"),
            }
        }
        if let (false, Some(x)) = (zone, capped) {
            self.warn(
                x,
                "without a zone nginx counts max_conns in each worker process; l4lb counts it once for the whole daemon",
            );
        }
        // A bad upsync line is reported once too.
        let has_upsync = block.iter().any(|x| x.name == "upsync");
        if server_lines == 0 && !has_upsync {
            self.error(d, "no servers are inside the upstream (and no upsync)");
        }
        if !servers.is_empty() {
            if upsync.is_some() {
                s.comment("These servers are the bootstrap set, used until the upsync source");
                s.comment("first answers, as in nginx (with strong_dependency off, a dump file");
                s.comment("replaces them at start).");
            }
            s.set("servers", emit::array_lines(&servers), None);
        }
        self.upstreams.push(s);
        match (upsync, dump) {
            (Some(mut u), Some(x)) => {
                self.dump_path(x, &mut u);
                self.upstreams.push(u);
            }
            (Some(mut u), None) => {
                u.comment(format!(
                    "nginx-upsync dumps to /tmp/servers_{name}.conf when upsync_dump_path is"
                ));
                u.comment("not set; l4lb writes a dump file only with dump_path.");
                self.upstreams.push(u);
            }
            (None, Some(x)) if !has_upsync => self.error(x, "needs upsync in the same upstream"),
            (None, _) => {}
        }
    }

    fn balance(&mut self, d: &Directive, s: &mut Section) {
        let comment = Some(source(d));
        let args: Vec<&str> = d.args.iter().map(String::as_str).collect();
        match (d.name.as_str(), args.as_slice()) {
            ("least_conn", []) => s.set("balance", emit::string("least_conn"), comment),
            ("hash", ["$remote_addr", rest @ ..]) => {
                s.set("balance", emit::string("hash"), comment);
                match rest {
                    [] => {}
                    ["consistent"] => {
                        s.set("consistent", emit::value(toml::Value::Boolean(true)), None)
                    }
                    _ => self.error(d, "takes a key and an optional consistent"),
                }
            }
            ("hash", [key, ..]) => self.error(
                d,
                format!("{key:?}: l4lb hashes on the client address only (hash $remote_addr)"),
            ),
            ("random", []) => s.set("balance", emit::string("random"), comment),
            ("random", ["two"] | ["two", "least_conn"]) => {
                s.set("balance", emit::string("random"), comment);
                s.set("two", emit::value(toml::Value::Boolean(true)), None);
            }
            ("random", ["two", method]) => self.error(
                d,
                format!("{method:?}: l4lb picks between two by least_conn only"),
            ),
            _ => self.error(d, "invalid arguments"),
        }
    }

    /// `server ADDRESS [weight=N] [max_fails=N] [fail_timeout=T] [backup] [down]
    /// [max_conns=N]`: an inline table and its comment.
    fn peer(&mut self, d: &Directive) -> Option<(String, String)> {
        let Some((address, params)) = d.args.split_first() else {
            self.error(d, "needs an address");
            return None;
        };
        if address.starts_with("unix:") {
            self.unsupported(
                d,
                "l4lb connects to TCP and UDP servers, not UNIX-domain sockets",
            );
            return None;
        }
        if !is_host_port(address) {
            self.error(
                d,
                format!("{address:?}: expected host:port (a stream server needs a port)"),
            );
            return None;
        }
        let mut pairs = vec![("address", emit::string(address))];
        let mut ok = true;
        for p in params {
            let (key, value) = p.split_once('=').unwrap_or((p, ""));
            let converted = match key {
                "weight" => number(value).and_then(|v| {
                    if v == "0" {
                        Err("weight must be at least 1".into())
                    } else {
                        Ok(v)
                    }
                }),
                "max_fails" | "max_conns" => number(value),
                "fail_timeout" => duration(value),
                "backup" | "down" if value.is_empty() => {
                    Ok(emit::value(toml::Value::Boolean(true)))
                }
                "resolve" | "service" => {
                    self.unsupported(d, &format!("{key}: l4lb resolves names once, at load"));
                    ok = false;
                    continue;
                }
                "slow_start" | "route" | "drain" => {
                    self.unsupported(d, &format!("{key} (NGINX Plus)"));
                    ok = false;
                    continue;
                }
                _ => Err(format!("unknown server parameter {p:?}")),
            };
            match converted {
                Ok(v) => {
                    // Given twice (`weight=1 weight=2`): the last one counts, as in
                    // nginx, and the inline table gets the key once.
                    pairs.retain(|(k, _)| *k != key);
                    pairs.push((key, v));
                }
                Err(m) => {
                    self.error(d, m);
                    ok = false;
                }
            }
        }
        ok.then(|| (emit::inline_table(&pairs), d.loc.to_string()))
    }

    /// `upsync HOST:PORT/PATH upsync_type=consul|etcd [upsync_interval=T]
    /// [upsync_timeout=T] [strong_dependency=on|off]` as `[upstream.NAME.upsync]`.
    fn upsync(&mut self, d: &Directive, upstream: &str) -> Option<Section> {
        let Some((target, params)) = d.args.split_first() else {
            self.error(d, "needs HOST:PORT/PATH");
            return None;
        };
        let Some(slash) = target.find('/').filter(|&i| i > 0) else {
            self.error(d, format!("{target:?}: expected HOST:PORT/PATH"));
            return None;
        };
        let (host, path) = target.split_at(slash);
        let mut s = Section::new(format!("[upstream.{}.upsync]", emit::key(upstream)));
        s.comment(format!("nginx-stream-upsync-module: {}", source(d)));
        let mut kind = None;
        let mut rest = Vec::new();
        for p in params {
            let Some((key, value)) = p.split_once('=') else {
                self.error(d, format!("invalid parameter {p:?}"));
                return None;
            };
            let converted = match key {
                "upsync_type" => {
                    kind = Some(value);
                    continue;
                }
                "upsync_interval" => positive_duration(value).map(|v| ("interval", v)),
                "upsync_timeout" => {
                    duration_at_least(value, Duration::from_secs(1)).map(|v| ("timeout", v))
                }
                "strong_dependency" => {
                    flag(value).map(|b| ("strong_dependency", emit::value(toml::Value::Boolean(b))))
                }
                _ => Err(format!("unknown parameter {p:?}")),
            };
            match converted {
                Ok(kv) => {
                    // A parameter given twice: the last one counts, as in nginx-upsync
                    // (and a TOML table cannot have the key twice).
                    rest.retain(|(k, _)| *k != kv.0);
                    rest.push(kv);
                }
                Err(m) => {
                    self.error(d, m);
                    return None;
                }
            }
        }
        let (kind, url) = match kind {
            None => {
                self.error(d, "upsync_type is required (consul or etcd)");
                return None;
            }
            Some("consul") => match path.strip_prefix("/v1/kv/") {
                Some(prefix) if !prefix.is_empty() => ("consul", format!("http://{host}{path}")),
                _ => {
                    self.error(
                        d,
                        format!("{path:?}: a consul upsync path is /v1/kv/PREFIX"),
                    );
                    return None;
                }
            },
            Some("etcd") => {
                let key = match path.strip_prefix("/v2/keys/") {
                    Some(k) if !k.is_empty() => format!("/{k}"),
                    _ => {
                        self.error(
                            d,
                            format!("{path:?}: an etcd upsync path is /v2/keys/PREFIX"),
                        );
                        return None;
                    }
                };
                self.warn(
                    d,
                    "l4lb reads etcd's v3 API: the servers must be v3 keys (etcdctl put), named as before",
                );
                s.comment("nginx-upsync reads etcd's v2 API (/v2/keys/...); l4lb reads the v3 API");
                s.comment("(etcd 3.4+), whose keys are separate from v2's: write the servers as");
                s.comment(format!(
                    "v3 keys {key}/IP:PORT. The double slash keeps the leading '/' of"
                ));
                s.comment("the v2 key names in the v3 key prefix.");
                ("etcd", format!("http://{host}/{key}"))
            }
            Some("consul_services") => {
                self.unsupported(
                    d,
                    "upsync_type=consul_services (the catalog, weights in tags): l4lb reads passing instances from /v1/health/service/NAME (type = \"consul_health\"); convert by hand",
                );
                return None;
            }
            Some(other) => {
                self.error(d, format!("unknown upsync_type {other:?}"));
                return None;
            }
        };
        s.set("type", emit::string(kind), None);
        s.set("url", emit::string(&url), None);
        for (key, value) in rest {
            s.set(key, value, None);
        }
        Some(s)
    }

    fn dump_path(&mut self, d: &Directive, s: &mut Section) {
        match single(d).and_then(no_variables) {
            Ok(path) => {
                if let Some((_, first)) = self.dump_paths.iter().find(|(p, _)| p == path) {
                    let msg = format!(
                        "{path} is also the dump file of another upstream (at {first}): l4lb takes one file per upstream"
                    );
                    self.error(d, msg);
                    return;
                }
                self.dump_paths.push((path.to_string(), d.loc.clone()));
                if Path::new(path).is_relative() {
                    self.warn(
                        d,
                        "a relative path: nginx takes it from its prefix directory, l4lb from its working directory",
                    );
                }
                s.set("dump_path", emit::string(path), Some(source(d)));
            }
            Err(m) => self.error(d, m),
        }
    }
}

/// A server address as l4lb compares them: an IP literal in its one spelling, a name
/// case-insensitively.
fn same_server(address: &str) -> String {
    match address.parse::<std::net::SocketAddr>() {
        Ok(a) => a.to_string(),
        Err(_) => address.to_ascii_lowercase(),
    }
}
