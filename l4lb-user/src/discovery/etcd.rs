//! etcd v3 through its JSON gateway (`/v3/kv/range`, `/v3/watch`; etcd 3.4 and later).
//!
//! `url` is `http://HOST:PORT/KEY_PREFIX`: the path after the first `/` is the key
//! prefix, so `http://127.0.0.1:2379/upstreams/db/` reads keys `upstreams/db/<ip:port>`
//! (and `http://127.0.0.1:2379//upstreams/db/` reads keys `/upstreams/db/<ip:port>`).
//! Keys and values are as in nginx-upsync's Consul layout.
//!
//! The prefix is read once with a range, then followed with a watch from the next
//! revision. When etcd cancels the watch (compaction, or any other reason) the prefix is
//! read again. A watch is reopened after `timeout`, so a silently dead connection is
//! noticed.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use reqwest::{Client, Response, StatusCode, Url};
use serde::de::{self, Deserializer};
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;
use tracing::{info, warn};

use super::http::{self, MAX_BODY};
use super::{servers_from_kv, Source, SourceError};
use crate::config::{ServerSpec, UpsyncConfig};

const RANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// The local copy of the prefix: key to value, both as etcd stores them.
pub(crate) type Kvs = BTreeMap<Vec<u8>, Vec<u8>>;

/// etcd's JSON gateway writes 64-bit integers as strings.
fn int64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => s.parse().map_err(de::Error::custom),
        serde_json::Value::Number(n) => n.as_i64().ok_or_else(|| de::Error::custom("not an int64")),
        serde_json::Value::Null => Ok(0),
        other => Err(de::Error::custom(format!("expected an int64, got {other}"))),
    }
}

#[derive(Deserialize, Default)]
struct Header {
    #[serde(default, deserialize_with = "int64")]
    revision: i64,
}

#[derive(Deserialize)]
struct Kv {
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default, deserialize_with = "int64")]
    mod_revision: i64,
}

#[derive(Deserialize)]
struct RangeResponse {
    #[serde(default)]
    header: Header,
    #[serde(default)]
    kvs: Vec<Kv>,
}

#[derive(Deserialize)]
pub(crate) struct WatchLine {
    pub result: Option<WatchResult>,
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
pub(crate) struct WatchResult {
    #[serde(default)]
    canceled: bool,
    #[serde(default, deserialize_with = "int64")]
    compact_revision: i64,
    #[serde(default)]
    cancel_reason: String,
    #[serde(default)]
    pub events: Vec<Event>,
}

#[derive(Deserialize)]
pub(crate) struct Event {
    /// Absent for PUT (the gateway omits enum defaults).
    #[serde(rename = "type", default)]
    kind: String,
    kv: Kv,
}

struct Watch {
    resp: Response,
    buf: Vec<u8>,
    until: Instant,
}

pub struct Etcd {
    client: Client,
    base: Url,
    prefix: String,
    range_end: Vec<u8>,
    interval: Duration,
    watch_lifetime: Duration,
    /// Revision the local copy reflects; `None` = read the prefix again.
    revision: Option<i64>,
    kvs: Kvs,
    watch: Option<Watch>,
    last_range: Option<Instant>,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// The smallest key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: to the end of the keyspace.
    vec![0]
}

impl Etcd {
    pub fn new(cfg: &UpsyncConfig) -> anyhow::Result<Self> {
        let url = Url::parse(&cfg.url)?;
        let path = url.path();
        let decoded = super::decoded_path(path.strip_prefix('/').unwrap_or(path));
        let raw = decoded.as_str();
        if raw.trim_matches('/').is_empty() {
            anyhow::bail!("an etcd url has the form http://HOST:PORT/KEY_PREFIX/");
        }
        let prefix = format!("{}/", raw.trim_end_matches('/'));
        if cfg.token.is_some() {
            warn!("upsync token is not used with etcd");
        }
        let mut base = url.clone();
        base.set_path("/");
        base.set_query(None);
        Ok(Etcd {
            client: http::client(cfg, None)?,
            base,
            range_end: prefix_end(prefix.as_bytes()),
            prefix,
            interval: cfg.interval,
            watch_lifetime: cfg.timeout,
            revision: None,
            kvs: BTreeMap::new(),
            watch: None,
            last_range: None,
        })
    }

    fn endpoint(&self, path: &str) -> Result<Url, SourceError> {
        self.base
            .join(path)
            .map_err(|e| SourceError::Transport(format!("bad etcd url: {e}")))
    }

    fn servers(&self) -> Result<Vec<ServerSpec>, SourceError> {
        servers_from_kv(
            &self.prefix,
            self.kvs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())),
        )
    }

    async fn range(&mut self) -> Result<Vec<ServerSpec>, SourceError> {
        // A source that keeps cancelling watches must not turn into a loop of ranges.
        if let Some(t) = self.last_range {
            tokio::time::sleep_until(t + self.interval).await;
        }
        self.last_range = Some(Instant::now());
        let body = json!({
            "key": b64().encode(&self.prefix),
            "range_end": b64().encode(&self.range_end),
        });
        let req = self
            .client
            .post(self.endpoint("v3/kv/range")?)
            .json(&body)
            .timeout(RANGE_TIMEOUT);
        let resp = http::send(req).await?;
        if resp.status() != StatusCode::OK {
            return Err(http::status_error(resp).await);
        }
        let bytes = http::body(resp).await?;
        let (revision, kvs) = parse_range(&bytes)?;
        self.kvs = kvs;
        let servers = self.servers();
        // Keys it cannot use are read again after `interval` rather than awaited through
        // a watch: a start with strong_dependency then fails in its tries, as with Consul,
        // instead of waiting on a watch for ever.
        self.revision = servers.is_ok().then_some(revision);
        servers
    }

    async fn open_watch(&self, from: i64) -> Result<Watch, SourceError> {
        let body = json!({"create_request": {
            "key": b64().encode(&self.prefix),
            "range_end": b64().encode(&self.range_end),
            "start_revision": from.to_string(),
        }});
        // No overall timeout (the stream is long-lived), but its headers must come soon.
        let send = http::send(self.client.post(self.endpoint("v3/watch")?).json(&body));
        let resp = tokio::time::timeout(RANGE_TIMEOUT, send)
            .await
            .map_err(|_| {
                SourceError::Transport("etcd did not answer the watch request".into())
            })??;
        if resp.status() != StatusCode::OK {
            // The body of a refusal is read with a limit too: the request has none.
            let status = resp.status();
            return Err(
                tokio::time::timeout(RANGE_TIMEOUT, http::status_error(resp))
                    .await
                    .unwrap_or_else(|_| SourceError::Status {
                        status: status.as_u16(),
                        body: "(body not sent in time)".into(),
                    }),
            );
        }
        Ok(Watch {
            resp,
            buf: Vec::new(),
            until: Instant::now() + self.watch_lifetime,
        })
    }
}

/// The revision and the keys with their values of a range answer.
pub(crate) fn parse_range(body: &[u8]) -> Result<(i64, Kvs), SourceError> {
    let range: RangeResponse = serde_json::from_slice(body).map_err(|e| {
        SourceError::bad(
            "(response body)",
            format!("not an etcd range response: {e}"),
        )
    })?;
    let mut kvs = BTreeMap::new();
    for kv in &range.kvs {
        let (key, value) = decode(kv)?;
        kvs.insert(key, value);
    }
    Ok((range.header.revision, kvs))
}

/// One message of a watch stream.
pub(crate) fn parse_watch(line: &[u8]) -> Result<WatchLine, SourceError> {
    serde_json::from_slice(line)
        .map_err(|e| SourceError::bad("(watch stream)", format!("not an etcd watch message: {e}")))
}

/// Applies one batch of watch events whole, or nothing of it when an event cannot be
/// decoded; returns the revision the copy then reflects.
pub(crate) fn apply(kvs: &mut Kvs, revision: i64, events: &[Event]) -> Result<i64, SourceError> {
    let mut latest = revision;
    let mut decoded = Vec::with_capacity(events.len());
    for ev in events {
        let (key, value) = decode(&ev.kv)?;
        decoded.push((ev.kind == "DELETE", key, value));
        latest = latest.max(ev.kv.mod_revision);
    }
    for (delete, key, value) in decoded {
        if delete {
            kvs.remove(&key);
        } else {
            kvs.insert(key, value);
        }
    }
    Ok(latest)
}

/// Key and value of one gateway KV.
fn decode(kv: &Kv) -> Result<(Vec<u8>, Vec<u8>), SourceError> {
    let key = b64()
        .decode(&kv.key)
        .map_err(|e| SourceError::bad(&kv.key, format!("key is not base64: {e}")))?;
    let value = b64().decode(&kv.value).map_err(|e| {
        SourceError::bad(
            String::from_utf8_lossy(&key),
            format!("value is not base64: {e}"),
        )
    })?;
    Ok((key, value))
}

/// The next newline-delimited message of a watch; `None` when its lifetime is over.
async fn read_line(w: &mut Watch) -> Result<Option<WatchLine>, SourceError> {
    loop {
        if let Some(pos) = w.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = w.buf.drain(..=pos).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return parse_watch(&line).map(Some);
        }
        if w.buf.len() > MAX_BODY {
            return Err(SourceError::TooLarge { limit: MAX_BODY });
        }
        match tokio::time::timeout_at(w.until, w.resp.chunk()).await {
            Err(_) => return Ok(None),
            Ok(Err(e)) => return Err(http::transport(e)),
            Ok(Ok(None)) => {
                return Err(SourceError::Transport(
                    "etcd closed the watch stream".into(),
                ))
            }
            Ok(Ok(Some(chunk))) => w.buf.extend_from_slice(&chunk),
        }
    }
}

impl Source for Etcd {
    async fn next(&mut self) -> Result<Vec<ServerSpec>, SourceError> {
        loop {
            let Some(revision) = self.revision else {
                return self.range().await;
            };
            if self.watch.is_none() {
                self.watch = Some(self.open_watch(revision + 1).await?);
            }
            let Some(watch) = self.watch.as_mut() else {
                continue;
            };
            let line = match read_line(watch).await {
                Ok(Some(line)) => line,
                Ok(None) => {
                    self.watch = None;
                    continue;
                }
                Err(e) => {
                    self.watch = None;
                    return Err(e);
                }
            };
            let Some(result) = line.result else {
                self.watch = None;
                let detail = line
                    .error
                    .map_or_else(|| "empty watch message".to_string(), |e| e.to_string());
                return Err(SourceError::Transport(format!(
                    "etcd watch failed: {detail}"
                )));
            };
            if result.canceled || result.compact_revision > 0 {
                info!(
                    prefix = %self.prefix,
                    compact_revision = result.compact_revision,
                    reason = %result.cancel_reason,
                    "etcd cancelled the watch; reading the prefix again"
                );
                self.watch = None;
                self.revision = None;
                continue;
            }
            if result.events.is_empty() {
                // Created, or a progress notification. Not a revision to resume from: a
                // watch that starts behind sends its backlog after `created`.
                continue;
            }
            // An event that cannot be decoded would come again first on a watch from
            // the same revision, hiding every later fix: read the prefix again instead.
            let latest = apply(&mut self.kvs, revision, &result.events).inspect_err(|_| {
                self.watch = None;
                self.revision = None;
            })?;
            self.revision = Some(latest);
            return self.servers();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As the Consul source reads its prefix: escaped characters are the key's.
    #[test]
    fn the_key_prefix_is_decoded() {
        let etcd = Etcd::new(&UpsyncConfig::for_test(
            crate::config::UpsyncKind::Etcd,
            "http://127.0.0.1:2379/up%20stream/db",
        ))
        .unwrap();
        assert_eq!(etcd.prefix, "up stream/db/");
    }

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"up/db/"), b"up/db0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
