//! A stream `server { }` block: its listen addresses, proxy_pass, and settings, as one
//! `[[server]]` per listen.

use std::net::SocketAddr;

use super::convert::{source, Converter};
use super::emit::{self, Section};
use super::parser::Directive;
use super::stream::Setting;
use super::values::{is_host_port, no_variables, single};

struct Listen {
    addr: SocketAddr,
    udp: bool,
    proxy_protocol: bool,
    directive: Directive,
}

impl Converter {
    pub fn server(&mut self, d: &Directive, inherited: &[Setting], upstreams: &[&str]) {
        let block = self.block_of(d);
        let mut listens = Vec::new();
        // A bad listen line is reported once, not again as a missing listen.
        let mut listen_lines = 0;
        let mut own: Vec<Setting> = Vec::new();
        let mut proxy_pass: Option<(String, String)> = None;
        let mut proxy_pass_lines = 0;
        let mut show: Option<&Directive> = None;
        let mut rules = Vec::new();
        let mut real_ip = Vec::new();
        for x in block {
            match x.name.as_str() {
                "allow" | "deny" => rules.push(x.clone()),
                "set_real_ip_from" => real_ip.push(x.clone()),
                "listen" => {
                    listen_lines += 1;
                    listens.extend(self.listen(x));
                }
                "proxy_pass" => {
                    proxy_pass_lines += 1;
                    if proxy_pass_lines > 1 {
                        self.error(x, "directive is duplicate");
                    } else {
                        proxy_pass = self.proxy_pass(x, upstreams);
                    }
                }
                "upstream_show" => show = Some(x),
                "access_log" | "error_log" => self.ignore(
                    x,
                    "l4lb's access log and level are for the whole process ([global]), set from the main and stream levels",
                ),
                _ => self.add_setting(&mut own, x),
            }
        }
        own.extend(self.access_rules(&rules));
        own.extend(self.real_ip_from(&real_ip));
        if listen_lines == 0 {
            return self.error(d, "server block without listen");
        }
        match (&proxy_pass, show) {
            (None, None) if proxy_pass_lines == 0 => {
                return self.error(d, "server block without proxy_pass (or upstream_show)")
            }
            (None, None) => return,
            (Some(_), Some(s)) => {
                return self.error(
                    s,
                    "in a server block with proxy_pass: l4lb serves one or the other",
                )
            }
            _ => {}
        }
        // Server-level settings replace stream-level ones, as nginx merges them.
        let mut settings: Vec<Setting> = inherited
            .iter()
            .filter(|i| !own.iter().any(|o| o.key == i.key))
            .cloned()
            .collect();
        let inherited_count = settings.len();
        settings.extend(own);
        for l in listens {
            let other = self
                .listening
                .iter()
                .find(|(a, udp, _)| *udp == l.udp && crate::config::listens_clash(*a, l.addr))
                .map(|(a, _, o)| (*a, o.loc.clone()));
            if let Some((a, at)) = other {
                let msg = if a == l.addr {
                    format!("{a} is already used by the listen at {at}")
                } else {
                    format!("{} and {a} (listen at {at}) share a port: l4lb opens one socket per listen and these would clash", l.addr)
                };
                self.unsupported(&l.directive, &msg);
                continue;
            }
            if l.addr.is_ipv6() && l.addr.ip().is_unspecified() {
                self.warn(
                    &l.directive,
                    "l4lb's [::] socket takes IPv4 connections too (unless net.ipv6.bindv6only=1), where nginx's is IPv6 only",
                );
            }
            self.listening.push((l.addr, l.udp, l.directive.clone()));
            let mut s = Section::new("[[server]]".into());
            s.comment(format!("nginx: stream server {{ }} ({})", d.loc));
            s.set(
                "listen",
                emit::string(&l.addr.to_string()),
                Some(source(&l.directive)),
            );
            if l.udp {
                s.set("protocol", emit::string("udp"), None);
            }
            if l.proxy_protocol {
                s.set(
                    "proxy_protocol_in",
                    emit::value(toml::Value::Boolean(true)),
                    Some(source(&l.directive)),
                );
                if show.is_none() && !settings.iter().any(|st| st.key == "set_real_ip_from") {
                    self.warn(
                        &l.directive,
                        "without set_real_ip_from nginx keeps the peer's address for allow/deny, hash, limit_conn and the PROXY header it sends; l4lb believes every peer's header then: list your balancers in set_real_ip_from",
                    );
                }
            }
            if let Some((name, src)) = &proxy_pass {
                s.set("proxy_pass", emit::string(name), Some(src.clone()));
            }
            if let Some(x) = show {
                if l.udp {
                    self.error(x, "needs a TCP listen (it answers HTTP)");
                }
                if l.proxy_protocol {
                    self.error(
                        x,
                        "reads HTTP, not a PROXY header: drop proxy_protocol from its listen",
                    );
                }
                s.set(
                    "upstream_show",
                    emit::value(toml::Value::Boolean(true)),
                    Some(source(x)),
                );
            }
            for (i, st) in settings.iter().enumerate() {
                let from_stream = i < inherited_count;
                if show.is_some() {
                    // Stream-level settings reach every server; only this block's own
                    // are worth a note.
                    if !from_stream {
                        self.ignore(&st.directive, "an upstream_show server proxies nothing");
                    }
                    continue;
                }
                if st.key == "set_real_ip_from" && !l.proxy_protocol {
                    if !from_stream {
                        self.ignore(&st.directive, "read only on a proxy_protocol listen");
                    }
                    continue;
                }
                if st.key == "proxy_responses" && !l.udp {
                    self.ignore(&st.directive, "UDP only; nginx ignores it for TCP too");
                    continue;
                }
                if st.key == "proxy_protocol" && l.udp && st.value != emit::string("off") {
                    self.unsupported(
                        &st.directive,
                        "l4lb sends PROXY protocol headers over TCP only",
                    );
                    continue;
                }
                let comment = if from_stream {
                    format!("{}, from stream", st.source)
                } else {
                    st.source.clone()
                };
                s.set(st.key, st.value.clone(), Some(comment));
            }
            self.servers.push(s);
        }
    }

    fn listen(&mut self, d: &Directive) -> Option<Listen> {
        let Some((first, params)) = d.args.split_first() else {
            self.error(d, "needs an address or a port");
            return None;
        };
        let port = first
            .strip_prefix("*:")
            .unwrap_or(first)
            .parse::<u16>()
            .ok();
        let addr = if let Some(port) = port {
            // nginx: `listen PORT` and `listen *:PORT` are every IPv4 address.
            SocketAddr::from(([0, 0, 0, 0], port))
        } else if first.starts_with("unix:") {
            self.unsupported(
                d,
                "l4lb listens on TCP and UDP ports, not UNIX-domain sockets",
            );
            return None;
        } else if let Ok(addr) = first.parse::<SocketAddr>() {
            addr
        } else {
            self.error(
                d,
                format!("{first:?}: l4lb listens on PORT, IP:PORT or [IPv6]:PORT (no host names or port ranges)"),
            );
            return None;
        };
        let mut udp = false;
        let mut proxy_protocol = false;
        let mut ok = true;
        for p in params {
            let name = p.split('=').next().unwrap_or(p);
            match name {
                "udp" => udp = true,
                "ssl" => {
                    self.unsupported(d, "listen ... ssl: l4lb does no TLS");
                    ok = false;
                }
                "proxy_protocol" => proxy_protocol = true,
                "reuseport" => {
                    self.ignore(d, "reuseport: l4lb is one process, one socket per address")
                }
                "default_server" => {
                    self.ignore(d, "default_server: an l4lb address has one server block")
                }
                "backlog" | "rcvbuf" | "sndbuf" | "so_keepalive" | "fastopen" | "deferred"
                | "bind" | "ipv6only" | "setfib" | "accept_filter" => self.ignore(
                    d,
                    &format!("{name}: l4lb's listening sockets keep the system defaults"),
                ),
                _ => {
                    self.error(d, format!("unknown listen parameter {p:?}"));
                    ok = false;
                }
            }
        }
        if udp && proxy_protocol {
            self.unsupported(
                d,
                "listen ... udp proxy_protocol: PROXY headers arrive on TCP only",
            );
            ok = false;
        }
        ok.then(|| Listen {
            addr,
            udp,
            proxy_protocol,
            directive: d.clone(),
        })
    }

    /// The upstream a server proxies to: an upstream's name, or an address for which an
    /// upstream is generated, as nginx makes an implicit one.
    fn proxy_pass(&mut self, d: &Directive, upstreams: &[&str]) -> Option<(String, String)> {
        let target = match single(d).and_then(no_variables) {
            Ok(t) => t,
            Err(m) => {
                self.error(d, m);
                return None;
            }
        };
        // As nginx finds it: the name without regard to case.
        if let Some(name) = upstreams.iter().find(|u| u.eq_ignore_ascii_case(target)) {
            return Some((name.to_string(), source(d)));
        }
        if target.starts_with("unix:") {
            self.unsupported(
                d,
                "l4lb connects to TCP and UDP servers, not UNIX-domain sockets",
            );
            return None;
        }
        if !is_host_port(target) {
            self.error(
                d,
                format!("{target:?} is neither an upstream of this stream block nor host:port"),
            );
            return None;
        }
        if !self.generated.iter().any(|g| g == target) {
            self.generated.push(target.to_string());
            let mut s = Section::new(format!("[upstream.{}]", emit::key(target)));
            s.comment(format!(
                "nginx: proxy_pass {target} ({}) names an address: nginx makes an implicit",
                d.loc
            ));
            s.comment("upstream of it, named by the address; so does this section.");
            s.set(
                "servers",
                emit::array_lines(&[(
                    emit::inline_table(&[("address", emit::string(target))]),
                    d.loc.to_string(),
                )]),
                None,
            );
            self.upstreams.push(s);
        }
        Some((
            target.to_string(),
            format!("{} (the upstream generated for it)", source(d)),
        ))
    }
}
