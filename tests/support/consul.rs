//! A Consul HTTP API stand-in on 127.0.0.1: KV (PUT, DELETE, GET with `recurse`,
//! base64 `Value`, `ModifyIndex`), `/v1/health/service/NAME?passing`, blocking queries
//! (`index`, `wait`, `X-Consul-Index`), ACL tokens, and switches for the faults a real
//! cluster or network produces.
//!
//! One request per connection (`Connection: close`), which keeps the faults exact.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the next read requests (KV GET and health GET) get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// HTTP 500.
    Status500,
    /// 200 with a body that is not JSON.
    Garbage,
    /// Never answers (until the client gives up).
    Hang,
    /// Closes the connection with a TCP reset, no response.
    Reset,
    /// Announces a body longer than what it sends, then closes.
    Truncated,
    /// A body of 32 MiB without a length (read until close).
    Huge,
    /// A KV entry whose `Value` is not base64.
    BadBase64,
}

/// One instance of a service for the health API.
#[derive(Clone, Debug)]
pub struct Instance {
    pub node: String,
    pub node_addr: String,
    /// Empty: Consul's "use the node's address".
    pub service_addr: String,
    pub port: u16,
    pub weight: Option<u32>,
    pub passing: bool,
}

struct State {
    index: u64,
    kv: BTreeMap<String, (Vec<u8>, u64)>,
    services: BTreeMap<String, Vec<Instance>>,
    token: Option<String>,
    fault: Fault,
    no_block: bool,
    reads: u64,
    /// Reads without an `index`: a client asking for the whole set at once.
    fresh_reads: u64,
    last_token: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a change and wakes blocking queries.
    fn change(&self, f: impl FnOnce(&mut State)) {
        let idx = {
            let mut s = self.lock();
            s.index += 1;
            f(&mut s);
            s.index
        };
        self.changed.send_replace(idx);
    }
}

pub struct Consul {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for Consul {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Consul {
    pub async fn start() -> Consul {
        Self::start_on("127.0.0.1:0".parse().expect("addr")).await
    }

    /// On a given address, e.g. to bring a "restarted" Consul back on its old port.
    pub async fn start_on(addr: SocketAddr) -> Consul {
        let listener = TcpListener::bind(addr).await.expect("bind consul stand-in");
        let addr = listener.local_addr().expect("consul addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                index: 1,
                kv: BTreeMap::new(),
                services: BTreeMap::new(),
                token: None,
                fault: Fault::None,
                no_block: false,
                reads: 0,
                fresh_reads: 0,
                last_token: None,
            }),
            changed: watch::channel(1).0,
        });
        let stop = CancellationToken::new();
        let (sh, st) = (Arc::clone(&shared), stop.clone());
        tokio::spawn(async move {
            loop {
                let sock = tokio::select! {
                    _ = st.cancelled() => return,
                    r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                };
                let (sh, st) = (Arc::clone(&sh), st.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = st.cancelled() => {}
                        _ = serve(sock, sh) => {}
                    }
                });
            }
        });
        Consul { addr, shared, stop }
    }

    /// `http://ADDR/v1/kv/PREFIX`
    pub fn kv_url(&self, prefix: &str) -> String {
        format!("http://{}/v1/kv/{prefix}", self.addr)
    }

    pub fn health_url(&self, service: &str) -> String {
        format!("http://{}/v1/health/service/{service}", self.addr)
    }

    pub fn put(&self, key: &str, value: &str) {
        self.shared.change(|s| {
            let idx = s.index;
            s.kv.insert(key.to_string(), (value.as_bytes().to_vec(), idx));
        });
    }

    pub fn delete(&self, key: &str) {
        self.shared.change(|s| {
            s.kv.remove(key);
        });
    }

    pub fn delete_prefix(&self, prefix: &str) {
        self.shared
            .change(|s| s.kv.retain(|k, _| !k.starts_with(prefix)));
    }

    pub fn set_service(&self, name: &str, instances: Vec<Instance>) {
        self.shared.change(|s| {
            s.services.insert(name.to_string(), instances);
        });
    }

    pub fn set_fault(&self, fault: Fault) {
        self.shared.lock().fault = fault;
    }

    /// Requires `X-Consul-Token` (403 otherwise).
    pub fn require_token(&self, token: Option<&str>) {
        self.shared.lock().token = token.map(str::to_string);
    }

    /// The token the last read carried.
    pub fn last_token(&self) -> Option<String> {
        self.shared.lock().last_token.clone()
    }

    /// Moves the index (e.g. backwards, as after a snapshot restore) and changes nothing
    /// else; waiting queries are not woken, as in Consul.
    pub fn set_index(&self, index: u64) {
        self.shared.lock().index = index;
    }

    pub fn index(&self) -> u64 {
        self.shared.lock().index
    }

    /// Answers blocking queries at once with the unchanged index (a misbehaving agent).
    pub fn set_no_block(&self, on: bool) {
        self.shared.lock().no_block = on;
    }

    /// Read requests (KV and health GETs) received so far.
    pub fn reads(&self) -> u64 {
        self.shared.lock().reads
    }

    /// Read requests that carried no `index` (not blocking queries).
    pub fn fresh_reads(&self) -> u64 {
        self.shared.lock().fresh_reads
    }

    /// Wakes every blocking query with a new index and no data change.
    pub fn bump(&self) {
        self.shared.change(|_| {});
    }
}

struct Request {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    token: Option<String>,
    body: Vec<u8>,
}

impl Request {
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

async fn read_request(sock: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut body = buf[head_end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let mut token = None;
    let mut length = 0usize;
    for line in lines {
        let (k, v) = line.split_once(':')?;
        match k.trim().to_ascii_lowercase().as_str() {
            "x-consul-token" => token = Some(v.trim().to_string()),
            "content-length" => length = v.trim().parse().ok()?,
            _ => {}
        }
    }
    while body.len() < length {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    Some(Request {
        method,
        path: path.to_string(),
        query,
        token,
        body,
    })
}

async fn respond(sock: &mut TcpStream, status: u16, index: Option<u64>, body: &[u8]) {
    let reason = match status {
        200 => "OK",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Error",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(i) = index {
        head.push_str(&format!("X-Consul-Index: {i}\r\n"));
    }
    head.push_str("\r\n");
    let _ = sock.write_all(head.as_bytes()).await;
    let _ = sock.write_all(body).await;
    let _ = sock.shutdown().await;
}

/// Go duration as Consul takes it for `wait` ("500ms", "2s", "5m").
fn parse_wait(s: &str) -> Duration {
    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
    let n: u64 = digits.parse().unwrap_or(0);
    match &s[digits.len()..] {
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        _ => Duration::from_secs(n),
    }
    .min(Duration::from_secs(600))
}

async fn serve(mut sock: TcpStream, sh: Arc<Shared>) {
    let Some(req) = read_request(&mut sock).await else {
        return;
    };
    let kv_key = req.path.strip_prefix("/v1/kv/").map(str::to_string);
    match (req.method.as_str(), kv_key) {
        ("PUT", Some(key)) => {
            let body = req.body.clone();
            sh.change(|s| {
                let idx = s.index;
                s.kv.insert(key, (body, idx));
            });
            respond(&mut sock, 200, None, b"true").await;
        }
        ("DELETE", Some(key)) => {
            let recurse = req.param("recurse").is_some();
            sh.change(|s| {
                if recurse {
                    s.kv.retain(|k, _| !k.starts_with(&key));
                } else {
                    s.kv.remove(&key);
                }
            });
            respond(&mut sock, 200, None, b"true").await;
        }
        ("GET", Some(key)) => read(sock, sh, req, Read::Kv(key)).await,
        ("GET", None) => match req.path.strip_prefix("/v1/health/service/") {
            Some(name) => {
                let name = name.to_string();
                read(sock, sh, req, Read::Health(name)).await
            }
            None => respond(&mut sock, 404, None, b"no such endpoint").await,
        },
        _ => respond(&mut sock, 405, None, b"method not allowed").await,
    }
}

enum Read {
    Kv(String),
    Health(String),
}

async fn read(mut sock: TcpStream, sh: Arc<Shared>, req: Request, what: Read) {
    let (fault, no_block, denied) = {
        let mut s = sh.lock();
        s.reads += 1;
        if req.param("index").is_none() {
            s.fresh_reads += 1;
        }
        s.last_token = req.token.clone();
        (
            s.fault,
            s.no_block,
            s.token.is_some() && s.token != req.token,
        )
    };
    if denied {
        return respond(&mut sock, 403, None, b"ACL not found").await;
    }
    match fault {
        Fault::Status500 => {
            return respond(&mut sock, 500, None, b"rpc error: No cluster leader").await
        }
        Fault::Hang => {
            tokio::time::sleep(Duration::from_secs(120)).await;
            return;
        }
        Fault::Reset => {
            let _ = sock.set_zero_linger();
            return;
        }
        _ => {}
    }
    let asked: u64 = req.param("index").and_then(|i| i.parse().ok()).unwrap_or(0);
    if asked > 0 && !no_block {
        let wait = req
            .param("wait")
            .map_or(Duration::from_secs(300), parse_wait);
        let mut rx = sh.changed.subscribe();
        let _ = tokio::time::timeout(wait, async {
            loop {
                let index = sh.lock().index;
                if index > asked {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }
    let (status, index, body) = {
        let s = sh.lock();
        let (status, body) = match &what {
            Read::Kv(key) => kv_body(
                &s,
                key,
                req.param("recurse").is_some(),
                fault == Fault::BadBase64,
            ),
            Read::Health(name) => (200, health_body(&s, name, req.param("passing").is_some())),
        };
        (status, s.index, body)
    };
    match fault {
        Fault::Garbage => respond(&mut sock, 200, Some(index), b"<html>not json").await,
        Fault::Truncated => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Consul-Index: {index}\r\nConnection: close\r\n\r\n",
                body.len() + 100
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(&body[..body.len() / 2]).await;
            let _ = sock.shutdown().await;
        }
        Fault::Huge => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: {index}\r\nConnection: close\r\n\r\n["
            );
            if sock.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let entry = br#"{"Key":"padding","Value":null,"ModifyIndex":1},"#.repeat(1000);
            let mut sent = 0;
            while sent < 32 << 20 {
                if sock.write_all(&entry).await.is_err() {
                    return;
                }
                sent += entry.len();
            }
        }
        _ => respond(&mut sock, status, Some(index), &body).await,
    }
}

fn kv_body(s: &State, key: &str, recurse: bool, bad_base64: bool) -> (u16, Vec<u8>) {
    let b64 = base64::engine::general_purpose::STANDARD;
    let entries: Vec<Value> = s
        .kv
        .iter()
        .filter(|(k, _)| if recurse { k.starts_with(key) } else { k.as_str() == key })
        .map(|(k, (v, idx))| {
            let value = if bad_base64 {
                Value::String("!!not base64!!".into())
            } else if v.is_empty() {
                Value::Null
            } else {
                Value::String(b64.encode(v))
            };
            json!({"Key": k, "Value": value, "Flags": 0, "CreateIndex": idx, "ModifyIndex": idx, "LockIndex": 0})
        })
        .collect();
    if entries.is_empty() {
        return (404, Vec::new());
    }
    (200, serde_json::to_vec(&entries).expect("json"))
}

fn health_body(s: &State, name: &str, passing_only: bool) -> Vec<u8> {
    let entries: Vec<Value> = s
        .services
        .get(name)
        .into_iter()
        .flatten()
        .filter(|i| i.passing || !passing_only)
        .enumerate()
        .map(|(n, i)| {
            let mut service = json!({
                "ID": format!("{name}-{n}"), "Service": name, "Address": i.service_addr, "Port": i.port,
            });
            if let Some(w) = i.weight {
                service["Weights"] = json!({"Passing": w, "Warning": 1});
            }
            json!({
                "Node": {"Node": i.node, "Address": i.node_addr},
                "Service": service,
                "Checks": [{"Status": if i.passing { "passing" } else { "critical" }}],
            })
        })
        .collect();
    serde_json::to_vec(&entries).expect("json")
}
