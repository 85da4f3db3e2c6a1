//! The TOML file as written: one struct per section, unknown keys rejected.
//! Names follow nginx's stream directives so an nginx user finds their way.

use serde::Deserialize;

use super::units::{NgxDuration, NgxSize};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGlobal {
    pub worker_threads: Option<usize>,
    pub max_connections: Option<usize>,
    pub log_level: Option<String>,
    pub log_format: Option<LogFormat>,
    pub access_log: Option<RawAccessLog>,
    pub access_log_format: Option<LogFormat>,
    pub splice: Option<SpliceMode>,
    pub splice_after_bytes: Option<NgxSize>,
    pub splice_after_time: Option<NgxDuration>,
    pub splice_chatty: Option<ChattyPath>,
    pub worker_shutdown_timeout: Option<NgxDuration>,
    /// Enforce `access` deny rules in XDP on this interface.
    pub xdp_interface: Option<String>,
    pub pid_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub token_env: Option<String>,
    pub token_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub balance: Option<BalanceKind>,
    /// `hash` only: ketama-style consistent hashing (nginx `hash ... consistent`).
    pub consistent: Option<bool>,
    /// `random` only: pick two, take the one with fewer connections (nginx `random two`).
    pub two: Option<bool>,
    /// Checked entry by entry by the validator, so every bad entry is reported.
    #[serde(default, rename = "servers")]
    pub _servers: serde::de::IgnoredAny,
    pub upsync: Option<RawUpsync>,
    pub health_check: Option<RawHealthCheck>,
}

/// `[upstream.NAME.health_check]`, after NGINX Plus `health_check` and HAProxy `check`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    pub interval: Option<NgxDuration>,
    pub timeout: Option<NgxDuration>,
    pub fails: Option<u32>,
    pub passes: Option<u32>,
    #[serde(rename = "type")]
    pub kind: Option<CheckType>,
    pub send: Option<String>,
    pub expect: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckType {
    /// A TCP connect within the timeout.
    #[default]
    Tcp,
    /// Send `send` (optional), read until the reply matches `expect`.
    SendExpect,
    /// The server's handshake packet (protocol 10), not an error packet.
    Mysql,
    /// `PING` answered with `+PONG`.
    Redis,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    pub address: String,
    pub weight: Option<u32>,
    pub max_fails: Option<u32>,
    pub fail_timeout: Option<NgxDuration>,
    pub backup: Option<bool>,
    pub down: Option<bool>,
    pub max_conns: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpsync {
    #[serde(rename = "type")]
    pub kind: UpsyncKind,
    pub url: String,
    pub interval: Option<NgxDuration>,
    pub timeout: Option<NgxDuration>,
    pub strong_dependency: Option<bool>,
    pub dump_path: Option<String>,
    pub token_env: Option<String>,
    pub token_file: Option<String>,
    pub ca_file: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    pub consistency: Option<Consistency>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: String,
    pub protocol: Option<Protocol>,
    pub proxy_pass: Option<String>,
    pub proxy_connect_timeout: Option<NgxDuration>,
    pub proxy_timeout: Option<NgxDuration>,
    pub proxy_next_upstream: Option<bool>,
    pub proxy_next_upstream_tries: Option<u32>,
    pub proxy_next_upstream_timeout: Option<NgxDuration>,
    pub proxy_upload_rate: Option<NgxSize>,
    pub proxy_download_rate: Option<NgxSize>,
    pub proxy_responses: Option<u64>,
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Expect a PROXY protocol header (v1 or v2) from a load balancer in front.
    pub proxy_protocol_in: Option<bool>,
    /// How long to wait for that header (nginx's `proxy_protocol_timeout`).
    pub proxy_protocol_timeout: Option<NgxDuration>,
    pub splice: Option<SpliceMode>,
    pub splice_after_bytes: Option<NgxSize>,
    pub splice_after_time: Option<NgxDuration>,
    pub splice_chatty: Option<ChattyPath>,
    pub upstream_show: Option<bool>,
    /// nginx's `allow`/`deny` in order: "allow 10.0.0.0/8", "deny all", ...
    pub access: Option<Vec<String>>,
    /// Peers whose PROXY header names the client (nginx's `set_real_ip_from`).
    pub set_real_ip_from: Option<Vec<String>>,
    /// Connections at once per client address (nginx's `limit_conn`), 0 = no limit.
    pub limit_conn: Option<u32>,
}

/// `access_log = true | false | "off" | "stderr" | "/path/file"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawAccessLog {
    Enabled(bool),
    Target(String),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// `key=value` lines, as today.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpliceMode {
    /// Kernel path when it loads, else userspace copy with one warning.
    #[default]
    Auto,
    Off,
    /// Refuse to start when the kernel path cannot load.
    Required,
}

/// Where a session busy with small requests and answers goes once it is due for the
/// kernel path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChattyPath {
    /// Into the kernel on trial, judged with the sessions moved at the same time: back
    /// to the copy path if together they exchange slower there (README, Kernel path).
    #[default]
    Trial,
    /// Into the kernel, like any other session.
    Kernel,
    /// Stays copied while busy, for hosts whose redirect worker relays small messages
    /// slower than the copy path (README, Kernel path).
    Copy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalanceKind {
    RoundRobin,
    LeastConn,
    Hash,
    Random,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    /// As written in the config (and in metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyProtocol {
    #[default]
    Off,
    V1,
    V2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpsyncKind {
    Consul,
    ConsulHealth,
    Etcd,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    #[default]
    Default,
    Stale,
    Consistent,
}
