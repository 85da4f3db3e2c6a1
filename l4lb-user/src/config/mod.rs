//! Configuration: the TOML schema, nginx-style units, and validation that reports every
//! error with file, line, column and the key at fault.

mod schema;
pub mod units;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

pub use schema::{
    BalanceKind, ChattyPath, CheckType, Consistency, LogFormat, Protocol, ProxyProtocol,
    SpliceMode, UpsyncKind,
};
use schema::{
    RawAccessLog, RawAdmin, RawGlobal, RawHealthCheck, RawPeer, RawServer, RawUpstream, RawUpsync,
};
use units::{NgxDuration, NgxSize};

/// nginx's defaults for `server` parameters inside `upstream`.
pub const DEFAULT_WEIGHT: u32 = 1;
pub const DEFAULT_MAX_FAILS: u32 = 1;
pub const DEFAULT_FAIL_TIMEOUT: Duration = Duration::from_secs(10);
/// Whether two listening sockets of one protocol cannot both be bound: one address, or
/// a wildcard and a specific address on one port (Linux refuses the second), or `[::]`
/// and an IPv4 address (an IPv6 wildcard takes IPv4 too, net.ipv6.bindv6only=0). nginx
/// binds only the wildcard then and sorts connections by address; l4lb does not.
pub fn listens_clash(a: SocketAddr, b: SocketAddr) -> bool {
    let v6_takes_v4 = v6_wildcard_takes_v4();
    let covers = |x: SocketAddr, y: SocketAddr| {
        x.ip().is_unspecified() && (x.is_ipv6() == y.is_ipv6() || (x.is_ipv6() && v6_takes_v4))
    };
    a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// Whether an IPv6 wildcard socket also takes IPv4 here (net.ipv6.bindv6only = 0, the
/// default; l4lb leaves IPV6_V6ONLY as the host sets it).
fn v6_wildcard_takes_v4() -> bool {
    static TAKES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TAKES.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").map_or(true, |v| v.trim() == "0")
    })
}

const CLASH: &str = "a wildcard and a specific address on one port (or [::] and an IPv4 address) cannot both listen; use one";

/// `log_level` values (the error log's levels).
const LOG_LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];

/// The first part of a `log_level` (a tracing filter: `LEVEL` or `TARGET=LEVEL`, comma
/// separated) that names no level. A bare word is a level to tracing only if it is one;
/// any other it takes for a target, and the filter then lets nothing through.
fn not_a_level(filter: &str) -> Option<&str> {
    filter.split(',').map(str::trim).find(|part| {
        let level = part.rsplit_once('=').map_or(*part, |(_, l)| l);
        !LOG_LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level))
    })
}
/// The most `max_connections` may be: far above what the kernel path's maps and a
/// process's descriptors allow in practice, far below what would overflow a count.
pub const MAX_CONNECTIONS: usize = 1 << 24;

#[derive(Clone, Debug)]
pub struct Config {
    pub global: Global,
    pub admin: Option<AdminConfig>,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    pub servers: Vec<ServerConfig>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Global {
    /// Tokio worker threads; `None` means one per core.
    pub worker_threads: Option<usize>,
    /// Open client connections at once, like nginx's `worker_connections`.
    pub max_connections: usize,
    pub log_level: String,
    /// Format of the error log (stderr).
    pub log_format: LogFormat,
    pub access_log: AccessLog,
    pub access_log_format: LogFormat,
    pub splice: SpliceMode,
    pub splice_after: SpliceAfter,
    /// How long SIGTERM waits for sessions to finish.
    pub worker_shutdown_timeout: Duration,
    /// Interface whose XDP hook enforces the listeners' deny rules.
    pub xdp_interface: Option<String>,
    /// Where the process writes its pid, rewritten by a binary upgrade (nginx's `pid`).
    pub pid_file: Option<PathBuf>,
}

/// When a TCP session moves from the copy path into the kernel: once it has moved
/// `bytes` (both ways together) or lived `time`, whichever comes first. Zero for both
/// means at once, before any byte is copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpliceAfter {
    pub bytes: u64,
    pub time: Duration,
    pub chatty: ChattyPath,
}

impl Default for SpliceAfter {
    /// Measured (README, Kernel path): promoting costs about 40 µs of CPU and the
    /// kernel path saves about 0.24 ns per byte, so it pays for itself after about
    /// 170 KB; a session alive for a second is likely to live much longer.
    fn default() -> Self {
        SpliceAfter {
            bytes: 256 << 10,
            time: Duration::from_secs(1),
            chatty: ChattyPath::default(),
        }
    }
}

impl SpliceAfter {
    /// What a section gives, the rest from `base`.
    fn over(
        base: SpliceAfter,
        bytes: Option<NgxSize>,
        time: Option<NgxDuration>,
        chatty: Option<ChattyPath>,
    ) -> Self {
        SpliceAfter {
            bytes: bytes.map_or(base.bytes, |b| b.0),
            time: time.map_or(base.time, |t| t.0),
            chatty: chatty.unwrap_or(base.chatty),
        }
    }
}

/// Where the access log goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLog {
    Off,
    Stderr,
    File(PathBuf),
}

#[derive(Clone, Debug, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamConfig {
    pub name: String,
    pub balance: Balance,
    pub servers: Vec<ServerSpec>,
    pub upsync: Option<UpsyncConfig>,
    pub health_check: Option<HealthCheckConfig>,
}

/// Active health checks of an upstream's servers.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthCheckConfig {
    /// Between two checks of one server.
    pub interval: Duration,
    /// For one check, connect included.
    pub timeout: Duration,
    /// Consecutive failures that mark a server down.
    pub fails: u32,
    /// Consecutive successes that bring a down server back.
    pub passes: u32,
    pub kind: CheckKind,
}

#[derive(Clone, Debug)]
pub enum CheckKind {
    Tcp,
    SendExpect {
        send: Vec<u8>,
        expect: regex::bytes::Regex,
    },
    Mysql,
    Redis,
}

impl PartialEq for CheckKind {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (
                CheckKind::SendExpect { send, expect },
                CheckKind::SendExpect {
                    send: send2,
                    expect: expect2,
                },
            ) => send == send2 && expect.as_str() == expect2.as_str(),
            (a, b) => std::mem::discriminant(a) == std::mem::discriminant(b),
        }
    }
}

impl CheckKind {
    pub fn name(&self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::SendExpect { .. } => "send_expect",
            CheckKind::Mysql => "mysql",
            CheckKind::Redis => "redis",
        }
    }
}

/// Decodes the escapes a check's `send` may carry beyond TOML's own (which a literal
/// 'single-quoted' string leaves alone): `\r`, `\n`, `\t`, `\\`, `\0` and `\xHH`.
pub fn unescape(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'0') => out.push(0),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                let byte = std::str::from_utf8(&hex)
                    .ok()
                    .filter(|h| h.len() == 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| "\\x needs two hex digits".to_string())?;
                out.push(byte);
            }
            Some(other) => return Err(format!("unknown escape \\{}", other as char)),
            None => return Err("a trailing \\ escapes nothing".to_string()),
        }
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastConn,
    Hash { consistent: bool },
    Random { two: bool },
}

/// One backend as configured (or discovered): its identity is `addr`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServerSpec {
    /// As written (`host:port`), for logs and `upstream_show`.
    pub name: String,
    pub addr: SocketAddr,
    pub weight: u32,
    pub max_fails: u32,
    pub fail_timeout: Duration,
    pub backup: bool,
    pub down: bool,
    /// 0 = unlimited.
    pub max_conns: u32,
}

impl ServerSpec {
    pub fn new(addr: SocketAddr) -> Self {
        ServerSpec {
            name: addr.to_string(),
            addr,
            weight: DEFAULT_WEIGHT,
            max_fails: DEFAULT_MAX_FAILS,
            fail_timeout: DEFAULT_FAIL_TIMEOUT,
            backup: false,
            down: false,
            max_conns: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct UpsyncConfig {
    pub kind: UpsyncKind,
    pub url: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub strong_dependency: bool,
    pub dump_path: Option<PathBuf>,
    pub token: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub consistency: Consistency,
}

#[cfg(test)]
impl UpsyncConfig {
    /// A source of `kind` at `url` with nginx-upsync's usual settings, for unit tests.
    pub fn for_test(kind: UpsyncKind, url: &str) -> UpsyncConfig {
        UpsyncConfig {
            kind,
            url: url.into(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(360),
            strong_dependency: false,
            dump_path: None,
            token: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            consistency: Consistency::Default,
        }
    }
}

/// One `[[server]]` block: a listener.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub protocol: Protocol,
    pub proxy_pass: Option<String>,
    pub proxy_connect_timeout: Duration,
    pub proxy_timeout: Duration,
    pub proxy_next_upstream: bool,
    /// 0 = unlimited.
    pub proxy_next_upstream_tries: u32,
    /// Zero = unlimited.
    pub proxy_next_upstream_timeout: Duration,
    /// Bytes per second per connection, 0 = unlimited.
    pub proxy_upload_rate: u64,
    pub proxy_download_rate: u64,
    pub proxy_responses: Option<u64>,
    pub proxy_protocol: ProxyProtocol,
    pub proxy_protocol_in: bool,
    pub proxy_protocol_timeout: Duration,
    pub splice: SpliceMode,
    pub splice_after: SpliceAfter,
    pub upstream_show: bool,
    /// Checked in order; the first rule whose prefix holds the client decides, and a
    /// client no rule names is allowed (nginx's `allow`/`deny`).
    pub access: Vec<AccessRule>,
    /// With `proxy_protocol_in`, the peers (as `allow` rules) whose header names the
    /// client; empty: every peer's (nginx's `set_real_ip_from`).
    pub set_real_ip_from: Vec<AccessRule>,
    /// 0 = no limit.
    pub limit_conn: u32,
}

impl ServerConfig {
    /// Whether a PROXY header from `peer` names the client: else the peer is the
    /// client, as for nginx's realip module with `set_real_ip_from`.
    pub fn trusts_header_from(&self, peer: std::net::IpAddr) -> bool {
        self.set_real_ip_from.is_empty() || self.set_real_ip_from.iter().any(|r| r.matches(peer))
    }
}

/// One `allow`/`deny` rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccessRule {
    pub allow: bool,
    /// `all` is both `0.0.0.0/0` and `::/0`: `None`.
    pub prefix: Option<ipnet::IpNet>,
}

impl AccessRule {
    /// Whether the rule names `ip` (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn matches(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        self.prefix.is_none_or(|p| p.contains(&ip))
    }

    /// Parses `allow|deny PREFIX|ADDRESS|all`.
    pub fn parse(text: &str) -> Result<AccessRule, String> {
        let mut words = text.split_whitespace();
        let allow = match words.next() {
            Some("allow") => true,
            Some("deny") => false,
            _ => return Err(format!("{text:?}: expected \"allow ...\" or \"deny ...\"")),
        };
        let prefix = match (words.next(), words.next()) {
            (Some("all"), None) => None,
            (Some(p), None) => Some(
                p.parse::<ipnet::IpNet>()
                    .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| format!("{p:?} is not an address, a prefix or all"))?
                    .trunc(),
            ),
            _ => return Err(format!("{text:?}: expected one address, prefix or all")),
        };
        Ok(AccessRule { allow, prefix })
    }
}

impl ServerConfig {
    /// Identity of a listener across reloads.
    pub fn key(&self) -> (Protocol, SocketAddr) {
        (self.protocol, self.listen)
    }
}

/// One problem found in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub line: usize,
    pub column: usize,
    /// Dotted path of the key at fault, e.g. `upstream.db.servers[1].weight`.
    pub key: String,
    pub message: String,
}

/// Every problem found in one file.
#[derive(Debug)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub errors: Vec<ConfigError>,
}

impl ConfigErrors {
    /// Each error as `FILE:LINE:COLUMN: KEY: MESSAGE`.
    pub fn each(&self) -> impl Iterator<Item = String> + '_ {
        self.errors.iter().map(|e| {
            format!(
                "{}:{}:{}: {}: {}",
                self.file.display(),
                e.line,
                e.column,
                e.key,
                e.message
            )
        })
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.each().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            f.write_str(&e)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        file: path.to_path_buf(),
        errors: vec![ConfigError {
            line: 0,
            column: 0,
            key: "(file)".into(),
            message: format!("cannot read: {e}"),
        }],
    })?;
    parse(&text).map_err(|errors| ConfigErrors {
        file: path.to_path_buf(),
        errors,
    })
}

/// Validates configuration text; on failure returns every error found.
pub fn parse(text: &str) -> Result<Config, Vec<ConfigError>> {
    let mut v = Validator {
        text,
        errors: Vec::new(),
        dump_paths: HashMap::new(),
    };
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(e) => {
            v.push_span(e.span(), "(syntax)", e.message());
            return Err(v.errors);
        }
    };
    let config = v.config(root.get_ref());
    v.errors.sort_by_key(|e| (e.line, e.column));
    match config {
        Some(c) if v.errors.is_empty() => Ok(c),
        _ => Err(v.errors),
    }
}

struct Validator<'t> {
    text: &'t str,
    errors: Vec<ConfigError>,
    /// Each upsync dump file and the upsync section that writes it.
    dump_paths: HashMap<PathBuf, String>,
}

type Node<'i> = Spanned<DeValue<'i>>;

impl Validator<'_> {
    fn push_span(&mut self, span: Option<Range<usize>>, key: &str, message: impl Into<String>) {
        let (line, column) = span.map_or((0, 0), |s| line_col(self.text, s.start));
        self.errors.push(ConfigError {
            line,
            column,
            key: key.to_string(),
            message: message.into(),
        });
    }

    /// Deserializes one section, recording every error in it: after each error the key
    /// at fault is set aside and the rest is tried again, so one typo does not hide the
    /// next.
    fn section<T: DeserializeOwned>(&mut self, node: &Node<'_>, path: &str) -> Option<T> {
        let mut node = node.clone();
        let mut set_aside: Vec<String> = Vec::new();
        loop {
            let err = match T::deserialize(ValueDeserializer::from(node.clone())) {
                Ok(v) => return set_aside.is_empty().then_some(v),
                Err(e) => e,
            };
            let msg = err.message().to_string();
            // A required key we set aside ourselves is not a new error.
            if set_aside
                .iter()
                .any(|k| msg.contains(&format!("missing field `{k}`")))
            {
                return None;
            }
            let span = err.span().unwrap_or_else(|| node.span());
            self.push_span(Some(span.clone()), &key_at(&node, span.start, path), msg);
            let DeValue::Table(table) = node.get_mut() else {
                return None;
            };
            let at_fault = table
                .iter()
                .find(|(k, v)| {
                    k.span().contains(&span.start)
                        || find_key(v, span.start, "").is_some()
                        || v.span().contains(&span.start)
                })
                .map(|(k, _)| k.get_ref().to_string());
            let key = at_fault?;
            table.remove(key.as_str());
            set_aside.push(key);
        }
    }

    /// Records an error at the value of `key` inside `node` (or at `node` itself).
    fn at(&mut self, node: &Node<'_>, path: &str, key: &str, message: impl Into<String>) {
        let span = node
            .get_ref()
            .as_table()
            .and_then(|t| t.get(key))
            .map_or_else(|| node.span(), |v| v.span());
        let full = if key.is_empty() {
            path.to_string()
        } else {
            format!("{path}.{key}")
        };
        self.push_span(Some(span), &full, message);
    }

    fn config(&mut self, root: &DeTable<'_>) -> Option<Config> {
        let mut global = None;
        let mut global_node = None;
        let mut admin = None;
        let mut admin_node = None;
        let mut upstreams = BTreeMap::new();
        // Names declared, valid or not, so proxy_pass to a broken upstream is not
        // reported a second time as undefined.
        let mut declared = HashSet::new();
        let mut servers = Vec::new();
        let mut server_nodes = Vec::new();
        for (key, node) in root.iter() {
            match key.get_ref().as_ref() {
                "global" => {
                    global = self.section::<RawGlobal>(node, "global");
                    global_node = Some(node.clone());
                }
                "admin" => {
                    if let Some(raw) = self.section::<RawAdmin>(node, "admin") {
                        admin = self.admin(node, raw);
                        admin_node = Some(node.clone());
                    }
                }
                "upstream" => {
                    let Some(table) = node.get_ref().as_table() else {
                        self.push_span(
                            Some(node.span()),
                            "upstream",
                            "expected [upstream.NAME] tables",
                        );
                        continue;
                    };
                    for (name, unode) in table.iter() {
                        declared.insert(name.get_ref().to_string());
                        let path = format!("upstream.{}", name.get_ref());
                        if let Some(raw) = self.section::<RawUpstream>(unode, &path) {
                            if let Some(u) = self.upstream(unode, &path, name.get_ref(), raw) {
                                upstreams.insert(u.name.clone(), u);
                            }
                        }
                    }
                }
                "server" => {
                    let Some(array) = node.get_ref().as_array() else {
                        self.push_span(Some(node.span()), "server", "expected [[server]] blocks");
                        continue;
                    };
                    for (i, snode) in array.iter().enumerate() {
                        let path = format!("server[{i}]");
                        if let Some(raw) = self.section::<RawServer>(snode, &path) {
                            servers.push((path, raw));
                            server_nodes.push(snode.clone());
                        }
                    }
                }
                other => self.push_span(
                    Some(key.span()),
                    other,
                    "unknown section (expected global, admin, upstream or server)",
                ),
            }
        }
        let global = self.global(global_node.as_ref(), global.unwrap_or_default());
        let mut listeners: Vec<(ServerConfig, String)> = Vec::new();
        for ((path, raw), node) in servers.into_iter().zip(&server_nodes) {
            if let Some(s) = self.server(node, &path, raw, &global, &declared) {
                let taken = listeners
                    .iter()
                    .find(|(o, _)| o.protocol == s.protocol && listens_clash(o.listen, s.listen));
                match taken {
                    Some((o, at)) if o.listen == s.listen => {
                        let msg = format!("{} is already used by {at}", s.listen);
                        self.at(node, &path, "listen", msg);
                    }
                    Some((o, at)) => {
                        let msg = format!(
                            "{} cannot be bound beside {} ({at}): {CLASH}",
                            s.listen, o.listen
                        );
                        self.at(node, &path, "listen", msg);
                    }
                    None => listeners.push((s, path)),
                }
            }
        }
        if let (Some(a), Some(anode)) = (&admin, &admin_node) {
            let taken = listeners
                .iter()
                .find(|(o, _)| o.protocol == Protocol::Tcp && listens_clash(o.listen, a.listen));
            if let Some((o, at)) = taken {
                let msg = format!(
                    "{} cannot be bound beside {} ({at}): {CLASH}",
                    a.listen, o.listen
                );
                self.at(anode, "admin", "listen", msg);
            }
        }
        let listeners = listeners.into_iter().map(|(s, _)| s).collect();
        Some(Config {
            global,
            admin,
            upstreams,
            servers: listeners,
        })
    }

    fn global(&mut self, node: Option<&Node<'_>>, raw: RawGlobal) -> Global {
        let access_log = match raw.access_log {
            None | Some(RawAccessLog::Enabled(true)) => AccessLog::Stderr,
            Some(RawAccessLog::Enabled(false)) => AccessLog::Off,
            Some(RawAccessLog::Target(t)) => match t.as_str() {
                "off" => AccessLog::Off,
                "stderr" => AccessLog::Stderr,
                path if path.starts_with('/') => AccessLog::File(PathBuf::from(path)),
                other => {
                    let msg =
                        format!("{other:?}: expected \"off\", \"stderr\" or an absolute file path");
                    match node {
                        Some(n) => self.at(n, "global", "access_log", msg),
                        None => self.push_span(None, "global.access_log", msg),
                    }
                    AccessLog::Stderr
                }
            },
        };
        let log_level = raw.log_level.unwrap_or_else(|| "info".into());
        if let Some(word) = not_a_level(&log_level) {
            // tracing would read an unknown word as a target name and log nothing.
            let msg = format!(
                "{word:?} is not a level: expected one of {} (or a tracing filter such as \"info,l4lb::discovery=debug\")",
                LOG_LEVELS.join(", ")
            );
            match node {
                Some(n) => self.at(n, "global", "log_level", msg),
                None => self.push_span(None, "global.log_level", msg),
            }
        }
        let max_connections = raw.max_connections.unwrap_or(10_240);
        if !(1..=MAX_CONNECTIONS).contains(&max_connections) {
            let msg = format!("{max_connections}: expected 1 to {MAX_CONNECTIONS}");
            match node {
                Some(n) => self.at(n, "global", "max_connections", msg),
                None => self.push_span(None, "global.max_connections", msg),
            }
        }
        Global {
            log_format: raw.log_format.unwrap_or_default(),
            access_log_format: raw.access_log_format.unwrap_or_default(),
            worker_threads: raw.worker_threads.filter(|&n| n > 0),
            max_connections,
            log_level,
            access_log,
            splice: raw.splice.unwrap_or_default(),
            splice_after: SpliceAfter::over(
                SpliceAfter::default(),
                raw.splice_after_bytes,
                raw.splice_after_time,
                raw.splice_chatty,
            ),
            worker_shutdown_timeout: raw
                .worker_shutdown_timeout
                .map_or(Duration::from_secs(30), |d| d.0),
            xdp_interface: raw.xdp_interface,
            pid_file: raw.pid_file.map(PathBuf::from),
        }
    }

    fn admin(&mut self, node: &Node<'_>, raw: RawAdmin) -> Option<AdminConfig> {
        let listen_text = raw.listen.unwrap_or_else(|| "127.0.0.1:9180".into());
        let listen = match listen_text.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.at(
                    node,
                    "admin",
                    "listen",
                    format!("{listen_text:?} is not an ip:port address"),
                );
                return None;
            }
        };
        let token = self.secret(
            node,
            "admin",
            raw.token_env.as_deref(),
            raw.token_file.as_deref(),
        )?;
        Some(AdminConfig { listen, token })
    }

    /// Reads a secret from an environment variable or a file; never logs its value.
    fn secret(
        &mut self,
        node: &Node<'_>,
        path: &str,
        env: Option<&str>,
        file: Option<&str>,
    ) -> Option<Option<String>> {
        match (env, file) {
            (Some(_), Some(_)) => {
                self.at(
                    node,
                    path,
                    "token_env",
                    "set token_env or token_file, not both",
                );
                None
            }
            (Some(var), None) => match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => Some(Some(v.trim().to_string())),
                _ => {
                    self.at(
                        node,
                        path,
                        "token_env",
                        format!("environment variable {var} is not set"),
                    );
                    None
                }
            },
            (None, Some(f)) => match std::fs::read_to_string(f) {
                Ok(v) if !v.trim().is_empty() => Some(Some(v.trim().to_string())),
                Ok(_) => {
                    self.at(node, path, "token_file", format!("{f} is empty"));
                    None
                }
                Err(e) => {
                    self.at(node, path, "token_file", format!("cannot read {f}: {e}"));
                    None
                }
            },
            (None, None) => Some(None),
        }
    }

    fn upstream(
        &mut self,
        node: &Node<'_>,
        path: &str,
        name: &str,
        raw: RawUpstream,
    ) -> Option<UpstreamConfig> {
        let errors_before = self.errors.len();
        let kind = raw.balance.unwrap_or(BalanceKind::RoundRobin);
        if raw.consistent.is_some() && kind != BalanceKind::Hash {
            self.at(
                node,
                path,
                "consistent",
                "only valid with balance = \"hash\"",
            );
        }
        if raw.two.is_some() && kind != BalanceKind::Random {
            self.at(node, path, "two", "only valid with balance = \"random\"");
        }
        let balance = match kind {
            BalanceKind::RoundRobin => Balance::RoundRobin,
            BalanceKind::LeastConn => Balance::LeastConn,
            BalanceKind::Hash => Balance::Hash {
                consistent: raw.consistent.unwrap_or(false),
            },
            BalanceKind::Random => Balance::Random {
                two: raw.two.unwrap_or(false),
            },
        };
        // Each entry is checked on its own, so every bad entry is reported.
        let mut servers = Vec::new();
        let mut listed = 0;
        match node.get_ref().as_table().and_then(|t| t.get("servers")) {
            None => {}
            Some(list) => match list.get_ref().as_array() {
                Some(entries) => {
                    listed = entries.len();
                    // Each address with the entry it came from (a name may resolve to
                    // several, and two spellings to one).
                    let mut first: HashMap<SocketAddr, (usize, String)> = HashMap::new();
                    for (i, pnode) in entries.iter().enumerate() {
                        let ppath = format!("{path}.servers[{i}]");
                        let Some(peer) = self.section::<RawPeer>(pnode, &ppath) else {
                            continue;
                        };
                        for spec in self.peer(pnode, &ppath, peer) {
                            match first.get(&spec.addr) {
                                Some((j, written)) => {
                                    let msg = format!(
                                        "{} ({}) is already servers[{j}] ({written}): l4lb takes each server once; merge the entries (their weights add)",
                                        spec.name, spec.addr
                                    );
                                    self.at(pnode, &ppath, "address", msg);
                                }
                                None => {
                                    first.insert(spec.addr, (i, spec.name.clone()));
                                    servers.push(spec);
                                }
                            }
                        }
                    }
                }
                None => self.at(
                    node,
                    path,
                    "servers",
                    "expected a list of { address = \"host:port\", ... }",
                ),
            },
        }
        // A bad upsync section is reported on its own, not also as a missing source.
        let has_upsync = raw.upsync.is_some();
        let upsync = raw.upsync.and_then(|u| {
            let unode = node
                .get_ref()
                .as_table()
                .and_then(|t| t.get("upsync"))
                .unwrap_or(node);
            self.upsync(unode, &format!("{path}.upsync"), u)
        });
        let health_check = raw.health_check.and_then(|h| {
            let hnode = node
                .get_ref()
                .as_table()
                .and_then(|t| t.get("health_check"))
                .unwrap_or(node);
            self.health_check(hnode, &format!("{path}.health_check"), h)
        });
        if listed == 0 && !has_upsync {
            self.at(
                node,
                path,
                "servers",
                "an upstream needs servers or an upsync source",
            );
        }
        if self.errors.len() > errors_before {
            return None;
        }
        Some(UpstreamConfig {
            name: name.to_string(),
            balance,
            servers,
            upsync,
            health_check,
        })
    }

    /// Parses a list key of rules, each error at its own element.
    fn rules<'t>(
        &mut self,
        node: &Node<'_>,
        path: &str,
        key: &str,
        texts: impl Iterator<Item = &'t String>,
        parse: impl Fn(&str) -> Result<AccessRule, String>,
    ) -> Vec<AccessRule> {
        let mut rules = Vec::new();
        for (i, text) in texts.enumerate() {
            match parse(text) {
                Ok(rule) => rules.push(rule),
                Err(e) => {
                    let span = node
                        .get_ref()
                        .as_table()
                        .and_then(|t| t.get(key))
                        .and_then(|a| a.get_ref().as_array())
                        .and_then(|a| a.get(i))
                        .map_or_else(|| node.span(), |v| v.span());
                    self.push_span(Some(span), &format!("{path}.{key}[{i}]"), e);
                }
            }
        }
        rules
    }

    fn health_check(
        &mut self,
        node: &Node<'_>,
        path: &str,
        raw: RawHealthCheck,
    ) -> Option<HealthCheckConfig> {
        let errors_before = self.errors.len();
        let interval = raw.interval.map_or(Duration::from_secs(5), |d| d.0);
        if interval.is_zero() {
            self.at(node, path, "interval", "must be greater than zero");
        }
        let timeout = raw.timeout.map_or(Duration::from_secs(1), |d| d.0);
        if timeout.is_zero() {
            self.at(node, path, "timeout", "must be greater than zero");
        }
        let fails = raw.fails.unwrap_or(1);
        if fails == 0 {
            self.at(node, path, "fails", "must be at least 1");
        }
        let passes = raw.passes.unwrap_or(1);
        if passes == 0 {
            self.at(node, path, "passes", "must be at least 1");
        }
        let kind = match raw.kind.unwrap_or_default() {
            CheckType::SendExpect => {
                let send = match raw.send.as_deref().map(unescape).transpose() {
                    Ok(s) => s.unwrap_or_default(),
                    Err(e) => {
                        self.at(node, path, "send", e);
                        Vec::new()
                    }
                };
                match raw.expect.as_deref().map(regex::bytes::Regex::new) {
                    Some(Ok(expect)) => Some(CheckKind::SendExpect { send, expect }),
                    Some(Err(e)) => {
                        let msg = format!("not a regular expression: {e}");
                        self.at(node, path, "expect", msg.replace('\n', " "));
                        None
                    }
                    None => {
                        self.at(node, path, "expect", "type = \"send_expect\" needs expect");
                        None
                    }
                }
            }
            other => {
                for (key, given) in [
                    ("send", raw.send.is_some()),
                    ("expect", raw.expect.is_some()),
                ] {
                    if given {
                        self.at(node, path, key, "only valid with type = \"send_expect\"");
                    }
                }
                Some(match other {
                    CheckType::Mysql => CheckKind::Mysql,
                    CheckType::Redis => CheckKind::Redis,
                    _ => CheckKind::Tcp,
                })
            }
        };
        if self.errors.len() > errors_before {
            return None;
        }
        Some(HealthCheckConfig {
            interval,
            timeout,
            fails,
            passes,
            kind: kind?,
        })
    }

    /// One `servers` entry; a host name resolving to several addresses yields one server
    /// per address, as nginx does.
    fn peer(&mut self, node: &Node<'_>, path: &str, raw: RawPeer) -> Vec<ServerSpec> {
        let weight = raw.weight.unwrap_or(DEFAULT_WEIGHT);
        if weight == 0 {
            self.at(node, path, "weight", "weight must be at least 1");
            return Vec::new();
        }
        let addrs = match resolve(&raw.address) {
            Ok(a) => a,
            Err(msg) => {
                self.at(node, path, "address", msg);
                return Vec::new();
            }
        };
        addrs
            .into_iter()
            .map(|addr| ServerSpec {
                name: raw.address.clone(),
                addr,
                weight,
                max_fails: raw.max_fails.unwrap_or(DEFAULT_MAX_FAILS),
                fail_timeout: raw.fail_timeout.map_or(DEFAULT_FAIL_TIMEOUT, |d| d.0),
                backup: raw.backup.unwrap_or(false),
                down: raw.down.unwrap_or(false),
                max_conns: raw.max_conns.unwrap_or(0),
            })
            .collect()
    }

    fn upsync(&mut self, node: &Node<'_>, path: &str, raw: RawUpsync) -> Option<UpsyncConfig> {
        if !(raw.url.starts_with("http://") || raw.url.starts_with("https://")) {
            self.at(
                node,
                path,
                "url",
                format!("{:?} must start with http:// or https://", raw.url),
            );
            return None;
        }
        let interval = raw.interval.map_or(Duration::from_secs(5), |d| d.0);
        if interval.is_zero() {
            self.at(node, path, "interval", "interval must be greater than zero");
            return None;
        }
        if let Some(dump) = &raw.dump_path {
            // Two writers would overwrite each other's sets, and each upstream would
            // start from the other's.
            let dump = PathBuf::from(dump);
            if let Some(other) = self.dump_paths.get(&dump).cloned() {
                self.at(
                    node,
                    path,
                    "dump_path",
                    format!("{} is also the dump file of {other}", dump.display()),
                );
                return None;
            }
            self.dump_paths.insert(dump, path.to_string());
        }
        let timeout = raw.timeout.map_or(Duration::from_secs(360), |d| d.0);
        if timeout < Duration::from_secs(1) {
            // A blocking query or watch this short would end before any change came.
            self.at(node, path, "timeout", "timeout must be at least 1s");
            return None;
        }
        let token = self.secret(
            node,
            path,
            raw.token_env.as_deref(),
            raw.token_file.as_deref(),
        )?;
        if raw.client_key.is_some() && raw.client_cert.is_none() {
            self.at(node, path, "client_key", "client_key needs client_cert");
            return None;
        }
        Some(UpsyncConfig {
            kind: raw.kind,
            url: raw.url,
            interval,
            timeout,
            strong_dependency: raw.strong_dependency.unwrap_or(false),
            dump_path: raw.dump_path.map(PathBuf::from),
            token,
            ca_file: raw.ca_file.map(PathBuf::from),
            client_cert: raw.client_cert.map(PathBuf::from),
            client_key: raw.client_key.map(PathBuf::from),
            consistency: raw.consistency.unwrap_or_default(),
        })
    }

    fn server(
        &mut self,
        node: &Node<'_>,
        path: &str,
        raw: RawServer,
        global: &Global,
        upstreams: &HashSet<String>,
    ) -> Option<ServerConfig> {
        let errors_before = self.errors.len();
        let listen = match raw.listen.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.at(
                    node,
                    path,
                    "listen",
                    format!("{:?} is not an ip:port address", raw.listen),
                );
                None
            }
        };
        let protocol = raw.protocol.unwrap_or_default();
        let upstream_show = raw.upstream_show.unwrap_or(false);
        match (&raw.proxy_pass, upstream_show) {
            (Some(name), _) if !upstreams.contains(name) => {
                self.at(
                    node,
                    path,
                    "proxy_pass",
                    format!("no [upstream.{name}] is defined"),
                );
            }
            (Some(_), true) => {
                self.at(
                    node,
                    path,
                    "upstream_show",
                    "a server block either proxies (proxy_pass) or shows upstreams, not both",
                );
            }
            (None, false) => self.at(
                node,
                path,
                "proxy_pass",
                "missing proxy_pass (or upstream_show = true)",
            ),
            _ => {}
        }
        if upstream_show && protocol == Protocol::Udp {
            self.at(
                node,
                path,
                "upstream_show",
                "upstream_show needs protocol = \"tcp\"",
            );
        }
        if raw.proxy_protocol.is_some_and(|p| p != ProxyProtocol::Off) && protocol == Protocol::Udp
        {
            self.at(
                node,
                path,
                "proxy_protocol",
                "PROXY protocol headers are sent on TCP only",
            );
        }
        if raw.proxy_responses.is_some() && protocol != Protocol::Udp {
            self.at(
                node,
                path,
                "proxy_responses",
                "only valid with protocol = \"udp\"",
            );
        }
        let connect_timeout = raw
            .proxy_connect_timeout
            .map_or(Duration::from_secs(60), |d| d.0);
        if connect_timeout.is_zero() {
            self.at(
                node,
                path,
                "proxy_connect_timeout",
                "must be greater than zero",
            );
        }
        let proxy_timeout = raw.proxy_timeout.map_or(Duration::from_secs(600), |d| d.0);
        if proxy_timeout.is_zero() {
            self.at(node, path, "proxy_timeout", "must be greater than zero");
        }
        let proxy_protocol_in = raw.proxy_protocol_in.unwrap_or(false);
        if proxy_protocol_in && protocol == Protocol::Udp {
            self.at(
                node,
                path,
                "proxy_protocol_in",
                "PROXY protocol headers arrive on TCP only",
            );
        }
        if proxy_protocol_in && upstream_show {
            self.at(
                node,
                path,
                "proxy_protocol_in",
                "an upstream_show listener reads HTTP, not a PROXY header",
            );
        }
        let access = self.rules(node, path, "access", raw.access.iter().flatten(), |t| {
            AccessRule::parse(t)
        });
        let set_real_ip_from = self.rules(
            node,
            path,
            "set_real_ip_from",
            raw.set_real_ip_from.iter().flatten(),
            |t| {
                AccessRule::parse(&format!("allow {t}"))
                    .map_err(|_| format!("{t:?} is not an address or a prefix"))
            },
        );
        if !set_real_ip_from.is_empty() && !proxy_protocol_in {
            self.at(
                node,
                path,
                "set_real_ip_from",
                "names the peers whose PROXY header is trusted: only with proxy_protocol_in = true",
            );
        }
        if self.errors.len() > errors_before {
            return None;
        }
        Some(ServerConfig {
            listen: listen?,
            protocol,
            proxy_pass: raw.proxy_pass,
            proxy_connect_timeout: connect_timeout,
            proxy_timeout,
            proxy_next_upstream: raw.proxy_next_upstream.unwrap_or(true),
            proxy_next_upstream_tries: raw.proxy_next_upstream_tries.unwrap_or(0),
            proxy_next_upstream_timeout: raw
                .proxy_next_upstream_timeout
                .map_or(Duration::ZERO, |d| d.0),
            proxy_upload_rate: raw.proxy_upload_rate.map_or(0, |s| s.0),
            proxy_download_rate: raw.proxy_download_rate.map_or(0, |s| s.0),
            proxy_responses: raw.proxy_responses,
            proxy_protocol: raw.proxy_protocol.unwrap_or_default(),
            proxy_protocol_in,
            proxy_protocol_timeout: raw
                .proxy_protocol_timeout
                .map_or(Duration::from_secs(30), |d| d.0),
            splice: raw.splice.unwrap_or(global.splice),
            splice_after: SpliceAfter::over(
                global.splice_after,
                raw.splice_after_bytes,
                raw.splice_after_time,
                raw.splice_chatty,
            ),
            upstream_show,
            access,
            set_real_ip_from,
            limit_conn: raw.limit_conn.unwrap_or(0),
        })
    }
}

/// Resolves `ip:port` or `host:port`, sorted so every instance orders them alike.
pub fn resolve(address: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(a) = address.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    if address
        .rsplit_once(':')
        .is_none_or(|(_, p)| p.parse::<u16>().is_err())
    {
        return Err(format!("{address:?} is not host:port"));
    }
    // A fuzzer must not wait on DNS: a name stands for a loopback address made from it.
    #[cfg(fuzzing)]
    if let Some((host, port)) = address.rsplit_once(':') {
        let h = crc32fast::hash(host.as_bytes()).to_be_bytes();
        let port = port.parse::<u16>().map_err(|e| e.to_string())?;
        return Ok(vec![SocketAddr::from(([127, h[1], h[2], h[3]], port))]);
    }
    let mut addrs: Vec<SocketAddr> = address
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {address:?}: {e}"))?
        .collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(format!("{address:?} resolved to no address"));
    }
    Ok(addrs)
}

/// Names the innermost key whose key or value span contains `offset`. Tables written
/// as `[a.b]` headers do not span their contents, so every child is searched.
fn key_at(node: &Node<'_>, offset: usize, path: &str) -> String {
    find_key(node, offset, path).unwrap_or_else(|| path.to_string())
}

fn find_key(node: &Node<'_>, offset: usize, path: &str) -> Option<String> {
    match node.get_ref() {
        DeValue::Table(t) => t.iter().find_map(|(k, v)| {
            let child = format!("{path}.{}", k.get_ref());
            if k.span().contains(&offset) {
                return Some(child);
            }
            find_key(v, offset, &child).or_else(|| v.span().contains(&offset).then_some(child))
        }),
        DeValue::Array(a) => a.iter().enumerate().find_map(|(i, v)| {
            let child = format!("{path}[{i}]");
            find_key(v, offset, &child).or_else(|| v.span().contains(&offset).then_some(child))
        }),
        _ => None,
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests;
