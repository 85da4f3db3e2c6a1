//! Consul KV as nginx-upsync reads it: `GET <url>?recurse` with blocking queries.
//!
//! `url` is the KV URL of the prefix, e.g. `http://127.0.0.1:8500/v1/kv/upstreams/db/`;
//! each key `<prefix>/<ip:port>` is one server.

use std::time::Duration;

use base64::Engine;
use reqwest::{Client, StatusCode, Url};
use serde::Deserialize;
use tokio::time::Instant;

use super::{http, servers_from_kv, Source, SourceError};
use crate::config::{Consistency, ServerSpec, UpsyncConfig};

/// Timeout of a query that does not block (the first one, and after an index reset).
const QUICK_TIMEOUT: Duration = Duration::from_secs(10);
/// Beyond Consul's own jitter (up to wait/16) before a blocking query counts as hung.
const BLOCKING_SLACK: Duration = Duration::from_secs(1);

/// Consul's blocking-query protocol: `index` and `wait` parameters, `X-Consul-Index`
/// answers, and the client-side rules Consul's documentation asks for.
pub struct BlockingQuery {
    client: Client,
    url: Url,
    wait: Duration,
    interval: Duration,
    index: u64,
    /// Pacing: the next request does not start before this.
    not_before: Option<Instant>,
}

impl BlockingQuery {
    /// `url` already holds the fixed parameters (`recurse`, `passing`); consistency is
    /// added here.
    pub fn new(cfg: &UpsyncConfig, mut url: Url) -> anyhow::Result<Self> {
        match cfg.consistency {
            Consistency::Default => {}
            Consistency::Stale => {
                url.query_pairs_mut().append_key_only("stale");
            }
            Consistency::Consistent => {
                url.query_pairs_mut().append_key_only("consistent");
            }
        }
        Ok(BlockingQuery {
            client: http::client(cfg, Some("X-Consul-Token"))?,
            url,
            wait: cfg.timeout,
            interval: cfg.interval,
            index: 0,
            not_before: None,
        })
    }

    /// One query; `parse` turns a 200 or 404 body into servers. The index only moves on
    /// when the answer was usable, so a bad answer is asked for again (after `interval`)
    /// rather than skipped.
    pub async fn fetch(
        &mut self,
        parse: impl FnOnce(StatusCode, &[u8]) -> Result<Vec<ServerSpec>, SourceError>,
    ) -> Result<Vec<ServerSpec>, SourceError> {
        if let Some(t) = self.not_before.take() {
            tokio::time::sleep_until(t).await;
        }
        let started = Instant::now();
        let mut url = self.url.clone();
        let timeout = if self.index > 0 {
            url.query_pairs_mut()
                .append_pair("index", &self.index.to_string())
                .append_pair("wait", &format!("{}ms", self.wait.as_millis()));
            // Consul adds up to wait/16 of jitter to a blocking query.
            self.wait + self.wait / 16 + BLOCKING_SLACK
        } else {
            QUICK_TIMEOUT
        };
        let resp = http::send(self.client.get(url).timeout(timeout)).await?;
        let status = resp.status();
        if !(status.is_success() || status == StatusCode::NOT_FOUND) {
            return Err(http::status_error(resp).await);
        }
        let index = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<i64>().ok())
            .ok_or_else(|| {
                SourceError::bad("(X-Consul-Index header)", "missing or not a number")
            })?;
        let body = http::body(resp).await?;
        let servers = parse(status, &body)?;
        let next = next_index(self.index, index);
        if next <= self.index {
            // Nothing new (the wait ran out, or the server answered early, or the index
            // went backwards): ask again no sooner than `interval` after this request.
            self.not_before = Some(started + self.interval);
        }
        self.index = next;
        Ok(servers)
    }

    /// The index of the last usable answer (0: none yet).
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Continues from an index another process reached: the next query blocks until
    /// Consul has something newer, instead of asking for the whole set again.
    pub fn resume_at(&mut self, index: u64) {
        self.index = index;
    }
}

/// Consul's rules: reset to 0 when the index goes backwards, and never block on an
/// index below 1.
fn next_index(previous: u64, answered: i64) -> u64 {
    if answered < 1 {
        return 1;
    }
    let answered = answered.unsigned_abs();
    if answered < previous {
        0
    } else {
        answered
    }
}

#[derive(Deserialize)]
struct KvEntry {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "Value", default)]
    value: Option<String>,
}

pub struct ConsulKv {
    query: BlockingQuery,
    prefix: String,
}

impl ConsulKv {
    pub fn new(cfg: &UpsyncConfig) -> anyhow::Result<Self> {
        let mut url = Url::parse(&cfg.url)?;
        let path = url.path().to_string();
        let Some(raw) = path.split_once("/v1/kv/").map(|(_, p)| p) else {
            anyhow::bail!("a consul url has the form http://HOST:PORT/v1/kv/PREFIX/");
        };
        let decoded = super::decoded_path(raw);
        if decoded.trim_matches('/').is_empty() {
            anyhow::bail!("the consul url names no key prefix after /v1/kv/");
        }
        // `prefix` and `prefixfoo` are different upstreams: match with the slash.
        let prefix = format!("{}/", decoded.trim_end_matches('/'));
        if !path.ends_with('/') {
            url.set_path(&format!("{path}/"));
        }
        url.query_pairs_mut().append_key_only("recurse");
        Ok(ConsulKv {
            query: BlockingQuery::new(cfg, url)?,
            prefix,
        })
    }
}

impl Source for ConsulKv {
    fn position(&self) -> u64 {
        self.query.index()
    }

    fn resume_at(&mut self, position: u64) {
        self.query.resume_at(position);
    }

    async fn next(&mut self) -> Result<Vec<ServerSpec>, SourceError> {
        let prefix = &self.prefix;
        self.query
            .fetch(|status, body| {
                if status == StatusCode::NOT_FOUND {
                    return Ok(Vec::new());
                }
                parse_kv(prefix, body)
            })
            .await
    }
}

/// The servers of a `?recurse` answer (a JSON list of keys with base64 values).
pub(crate) fn parse_kv(prefix: &str, body: &[u8]) -> Result<Vec<ServerSpec>, SourceError> {
    let entries: Vec<KvEntry> = serde_json::from_slice(body)
        .map_err(|e| SourceError::bad("(response body)", format!("not a Consul KV list: {e}")))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut pairs = Vec::with_capacity(entries.len());
    for e in &entries {
        let value = match &e.value {
            Some(v) => b64
                .decode(v)
                .map_err(|err| SourceError::bad(&e.key, format!("Value is not base64: {err}")))?,
            None => Vec::new(),
        };
        pairs.push((e.key.as_bytes(), value));
    }
    servers_from_kv(prefix, pairs.iter().map(|(k, v)| (*k, v.as_slice())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_rules() {
        assert_eq!(next_index(0, 5), 5);
        assert_eq!(next_index(5, 5), 5);
        assert_eq!(next_index(5, 9), 9);
        assert_eq!(next_index(9, 3), 0, "backwards resets");
        assert_eq!(next_index(9, 0), 1, "zero is never blocked on");
        assert_eq!(next_index(0, -4), 1);
    }

    fn cfg(url: &str, consistency: Consistency) -> UpsyncConfig {
        UpsyncConfig {
            consistency,
            ..UpsyncConfig::for_test(crate::config::UpsyncKind::Consul, url)
        }
    }

    #[test]
    fn url_shapes() {
        let kv = ConsulKv::new(&cfg(
            "http://h:8500/v1/kv/upstreams/db?dc=x",
            Consistency::Stale,
        ))
        .unwrap();
        assert_eq!(kv.prefix, "upstreams/db/");
        assert_eq!(
            kv.query.url.as_str(),
            "http://h:8500/v1/kv/upstreams/db/?dc=x&recurse&stale"
        );
        let kv = ConsulKv::new(&cfg(
            "http://h:8500/v1/kv/upstreams/db/",
            Consistency::Consistent,
        ))
        .unwrap();
        assert_eq!(
            kv.query.url.as_str(),
            "http://h:8500/v1/kv/upstreams/db/?recurse&consistent"
        );
        assert!(ConsulKv::new(&cfg("http://h:8500/v1/kv/", Consistency::Default)).is_err());
        assert!(ConsulKv::new(&cfg("http://h:8500/upstreams/db/", Consistency::Default)).is_err());
    }
}
