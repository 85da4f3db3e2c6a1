//! `stream { }`: upstreams, stream-wide logging, and the proxy settings every server
//! block inherits.

use super::convert::{source, Converter};
use super::emit;
use super::parser::Directive;
use super::values::{duration, flag, number, positive_duration, single, size};

/// A proxy setting l4lb honours, from the stream level (inherited by every server, as
/// in nginx) or from a server block.
#[derive(Clone)]
pub struct Setting {
    pub key: &'static str,
    pub value: String,
    pub source: String,
    pub directive: Directive,
}

/// The proxy directives l4lb honours, under the same names in `[[server]]`.
const PROXY_KEYS: [&str; 10] = [
    "proxy_connect_timeout",
    "proxy_timeout",
    "proxy_next_upstream",
    "proxy_next_upstream_tries",
    "proxy_next_upstream_timeout",
    "proxy_upload_rate",
    "proxy_download_rate",
    "proxy_responses",
    "proxy_protocol",
    "proxy_protocol_timeout",
];

/// Directives of modules or features l4lb does not have, and what is missing.
fn unsupported(name: &str) -> Option<&'static str> {
    if name.starts_with("ssl_") || name.starts_with("proxy_ssl") {
        return Some("l4lb does no TLS (neither terminating nor towards servers)");
    }
    if name.starts_with("js_") {
        return Some("l4lb has no njs scripting");
    }
    if name.starts_with("geoip") {
        return Some("l4lb has no variables (geoip)");
    }
    Some(match name {
        "proxy_bind" => "l4lb connects from the address the system picks",
        "resolver" => "l4lb resolves server names once, at load; it has no resolver",
        "map" | "geo" | "split_clients" | "set" => "l4lb has no variables",
        "return" | "pass" => "an l4lb server block proxies (or shows upstreams), nothing else",
        "proxy_requests" => {
            "l4lb ends UDP sessions by proxy_timeout and proxy_responses, not by a request count"
        }
        "proxy_session_drop" => "l4lb keeps sessions to a server that is removed or marked down",
        "health_check" | "health_check_timeout" | "match" => {
            "l4lb has passive health checks only (max_fails/fail_timeout)"
        }
        _ => return None,
    })
}

/// Directives without an l4lb meaning that only tune performance or resources.
fn ignored(d: &Directive) -> Option<&'static str> {
    let arg = d.args.first().map(String::as_str);
    Some(match d.name.as_str() {
        "proxy_buffer_size" => "l4lb sizes its copy buffers itself (adaptive, up to 256 KiB)",
        "proxy_socket_keepalive" if arg == Some("off") => "l4lb does not set SO_KEEPALIVE either",
        "proxy_socket_keepalive" => {
            "l4lb does not set SO_KEEPALIVE on server connections; proxy_timeout closes idle sessions"
        }
        "tcp_nodelay" if arg == Some("off") => "l4lb always sets TCP_NODELAY",
        "tcp_nodelay" => "l4lb always sets TCP_NODELAY (as this does)",
        "proxy_half_close" if arg == Some("on") => "l4lb always passes a half-close on (as this does)",
        "proxy_half_close" => {
            "l4lb always passes a half-close on, where nginx with off closes the session"
        }
        "preread_buffer_size" | "preread_timeout" => {
            "l4lb reads nothing from the client before choosing a server"
        }
        "limit_conn_log_level" | "limit_conn_dry_run" => {
            "l4lb counts refused clients in l4lb_refused_total{reason=\"limit_conn\"} and the access log"
        }
        "resolver_timeout" => "l4lb has no resolver",
        "variables_hash_max_size" | "variables_hash_bucket_size" => "l4lb has no variables",
        "server_names_hash_max_size" | "server_names_hash_bucket_size" | "server_name" => {
            "an l4lb listen address has one server block; names choose nothing"
        }
        "log_format" => "l4lb writes its own access log line (see the README's Access log)",
        _ => return None,
    })
}

impl Converter {
    pub fn stream_block(&mut self, d: &Directive) {
        if let Some(first) = &self.stream {
            let msg = format!("is duplicate (the first stream block is at {first})");
            return self.error(d, msg);
        }
        self.stream = Some(d.loc.clone());
        let block = self.block_of(d);
        // proxy_pass may name an upstream defined further down.
        let names: Vec<&str> = block
            .iter()
            .filter(|x| x.name == "upstream")
            .filter_map(|x| x.args.first().map(String::as_str))
            .collect();
        // limit_conn may name a zone defined further down.
        for z in block.iter().filter(|x| x.name == "limit_conn_zone") {
            self.conn_zone(z);
        }
        let mut inherited = Vec::new();
        let mut servers = Vec::new();
        let mut access_log = None;
        let mut rules = Vec::new();
        let mut real_ip = Vec::new();
        for x in block {
            match x.name.as_str() {
                "upstream" => self.upstream(x),
                "server" => servers.push(x),
                "access_log" => access_log = self.access_log(x).or(access_log),
                "error_log" => self.error_log(x),
                "limit_conn_zone" => {}
                "allow" | "deny" => rules.push(x.clone()),
                "set_real_ip_from" => real_ip.push(x.clone()),
                _ => self.add_setting(&mut inherited, x),
            }
        }
        inherited.extend(self.access_rules(&rules));
        inherited.extend(self.real_ip_from(&real_ip));
        if access_log.is_none() && !self.has_global("access_log") {
            self.set_global_with(
                "access_log",
                emit::value(toml::Value::Boolean(false)),
                "nginx stream logs no sessions without access_log".into(),
            );
        }
        for s in servers {
            self.server(s, &inherited, &names);
        }
    }

    /// `access_log off` or `access_log PATH FORMAT ...`: on or off for the whole process.
    fn access_log(&mut self, d: &Directive) -> Option<bool> {
        let on = match d.args.first().map(String::as_str) {
            None => {
                self.error(d, "takes off or a path and a format");
                return None;
            }
            Some("off") => false,
            Some(_) => {
                self.ignore(
                    d,
                    "the path, format and options: l4lb writes its own line to stderr (target access)",
                );
                true
            }
        };
        // Several access_log lines: any that logs makes l4lb log.
        if !on && self.has_global("access_log") {
            return Some(on);
        }
        self.set_global("access_log", emit::value(toml::Value::Boolean(on)), d);
        Some(on)
    }

    /// `limit_conn_zone KEY zone=NAME:SIZE`: l4lb limits by client address only.
    fn conn_zone(&mut self, d: &Directive) {
        let key = d.args.first().map(String::as_str);
        let zone = d
            .args
            .iter()
            .find_map(|a| a.strip_prefix("zone="))
            .and_then(|z| z.split(':').next());
        match (key, zone) {
            (Some("$binary_remote_addr" | "$remote_addr"), Some(name)) => {
                self.conn_zones.push(name.to_string());
                self.ignore(
                    d,
                    "the zone size: l4lb keeps one count per client address in memory",
                );
            }
            (Some(other), Some(_)) => self.unsupported(
                d,
                &format!(
                    "a limit keyed by {other}: l4lb limits connections per client address only"
                ),
            ),
            _ => self.error(d, "takes a key and zone=NAME:SIZE"),
        }
    }

    /// `allow`/`deny` lines of one level, in order, as one `access` list (a level with
    /// rules replaces the rules it would inherit, as in nginx).
    pub fn access_rules(&mut self, rules: &[Directive]) -> Option<Setting> {
        let first = rules.first()?.clone();
        let mut items = Vec::new();
        for d in rules {
            match single(d) {
                Ok(target) => {
                    let rule = format!("{} {target}", d.name);
                    match crate::config::AccessRule::parse(&rule) {
                        Ok(_) => items.push((emit::string(&rule), d.loc.to_string())),
                        Err(e) => self.error(d, e),
                    }
                }
                Err(m) => self.error(d, m),
            }
        }
        Some(Setting {
            key: "access",
            value: emit::array_lines(&items),
            source: format!("allow/deny from {}", first.loc),
            directive: first,
        })
    }

    /// `set_real_ip_from` lines: the peers whose PROXY header names the client.
    pub fn real_ip_from(&mut self, lines: &[Directive]) -> Option<Setting> {
        let first = lines.first()?.clone();
        let mut items = Vec::new();
        for d in lines {
            match single(d) {
                Ok(t) if t.starts_with("unix:") => {
                    self.unsupported(d, "l4lb listens on TCP and UDP only")
                }
                Ok(t) => match crate::config::AccessRule::parse(&format!("allow {t}")) {
                    Ok(_) if t != "all" => items.push((emit::string(t), d.loc.to_string())),
                    _ => self.error(d, format!("{t:?} is not an address or a prefix")),
                },
                Err(m) => self.error(d, m),
            }
        }
        Some(Setting {
            key: "set_real_ip_from",
            value: emit::array_lines(&items),
            source: format!("set_real_ip_from from {}", first.loc),
            directive: first,
        })
    }

    /// Converts `d` into `settings`; nginx refuses a directive a block already set
    /// ("is duplicate"), and so does the conversion.
    pub fn add_setting(&mut self, settings: &mut Vec<Setting>, d: &Directive) {
        let Some(s) = self.proxy_setting(d) else {
            return;
        };
        if settings.iter().any(|o| o.key == s.key) {
            // nginx applies every limit_conn of a block, l4lb has one limit per server.
            let why = if s.key == "limit_conn" {
                "a second limit_conn: l4lb has one connection limit per server"
            } else {
                "directive is duplicate"
            };
            self.error(d, why);
        } else {
            settings.push(s);
        }
    }

    /// A directive valid at stream or server level other than listen/proxy_pass.
    fn proxy_setting(&mut self, d: &Directive) -> Option<Setting> {
        if d.name == "limit_conn" {
            return self.limit_conn(d);
        }
        let Some(&key) = PROXY_KEYS.iter().find(|k| **k == d.name) else {
            if let Some(why) = unsupported(&d.name) {
                self.unsupported(d, why);
            } else if let Some(why) = ignored(d) {
                self.ignore(d, why);
            } else {
                self.error(d, "unknown directive in stream (not one l4lb can convert)");
            }
            return None;
        };
        let value = match key {
            "proxy_next_upstream" => single(d)
                .and_then(flag)
                .map(|b| emit::value(toml::Value::Boolean(b))),
            "proxy_next_upstream_tries" | "proxy_responses" => single(d).and_then(number),
            "proxy_upload_rate" | "proxy_download_rate" => single(d).and_then(size),
            "proxy_protocol" => single(d)
                .and_then(flag)
                .map(|on| emit::string(if on { "v1" } else { "off" })),
            "proxy_connect_timeout" | "proxy_timeout" => single(d).and_then(positive_duration),
            _ => single(d).and_then(duration),
        };
        match value {
            Ok(value) => Some(Setting {
                key,
                value,
                source: source(d),
                directive: d.clone(),
            }),
            Err(m) => {
                self.error(d, m);
                None
            }
        }
    }

    /// `limit_conn ZONE N` on a zone keyed by the client address.
    fn limit_conn(&mut self, d: &Directive) -> Option<Setting> {
        let [zone, n] = d.args.as_slice() else {
            self.error(d, "takes a zone and a number");
            return None;
        };
        if !self.conn_zones.contains(zone) {
            self.error(
                d,
                format!("no limit_conn_zone {zone} keyed by the client address"),
            );
            return None;
        }
        match number_of(n) {
            Some(value) => Some(Setting {
                key: "limit_conn",
                value,
                source: source(d),
                directive: d.clone(),
            }),
            None => {
                self.error(d, format!("{n:?} is not a connection count"));
                None
            }
        }
    }
}

fn number_of(text: &str) -> Option<String> {
    text.parse::<u32>()
        .ok()
        .filter(|n| *n > 0)
        .map(|n| emit::value(toml::Value::Integer(i64::from(n))))
}
