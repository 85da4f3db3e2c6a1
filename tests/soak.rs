//! The soak: many sessions stream checksummed data both ways (short and long; kernel,
//! copy and rate-limited paths; UDP) while everything goes wrong at once: Consul and
//! etcd changes, SIGHUP reloads (some rejected), admin drains and re-weights, backends
//! killed and restarted, a backend that resets, a slow one, and Consul faults (500,
//! garbage, hang, truncated body, reset, index reset, down). Every session's end is
//! accounted for; the bounds are checked at the end and the figures printed.
//!
//! `L4LB_SOAK_SECONDS` (45) and `L4LB_SOAK_SESSIONS` (100) size it; `cargo xtask soak`
//! runs it longer (10 minutes, 500 sessions by default).

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::consul::{Consul, Fault};
use support::etcd::Etcd;
use support::{free_port, free_udp_port, metric, payload, Backend, Behaviour, Daemon, UdpBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;

const TOKEN: &str = "soak-token";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// An echo backend that writes its tag first, and that can be killed (listener and
/// every connection gone at once, as a crash would) and restarted on its address.
struct Killable {
    addr: SocketAddr,
    tag: String,
    /// Bumped at every kill, so a session can tell it was cut by one.
    kills: AtomicU64,
    slow: bool,
    tasks: Mutex<JoinSet<()>>,
}

impl Killable {
    async fn start(tag: &str, slow: bool) -> Arc<Killable> {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let k = Arc::new(Killable {
            addr: l.local_addr().unwrap(),
            tag: tag.to_string(),
            kills: AtomicU64::new(0),
            slow,
            tasks: Mutex::new(JoinSet::new()),
        });
        k.serve(l);
        k
    }

    fn serve(self: &Arc<Self>, l: TcpListener) {
        let me = Arc::clone(self);
        self.tasks.lock().unwrap().spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let (tag, slow) = (me.tag.clone(), me.slow);
                me.tasks.lock().unwrap().spawn(echo(s, tag, slow));
            }
        });
    }

    /// Returns once the listener and every connection are gone; only then does the
    /// kill count move, so a session that began after it cannot have been cut by it.
    async fn kill(&self) {
        loop {
            let mut set = std::mem::take(&mut *self.tasks.lock().unwrap());
            if set.is_empty() {
                break;
            }
            set.abort_all();
            while set.join_next().await.is_some() {}
        }
        self.kills.fetch_add(1, Ordering::SeqCst);
    }

    async fn restart(self: &Arc<Self>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => return self.serve(l),
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "cannot rebind {}: {e}",
                        self.addr
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn echo(mut s: TcpStream, tag: String, slow: bool) {
    if s.write_all(format!("{tag}\n").as_bytes()).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if slow {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if s.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    let _ = s.shutdown().await;
}

/// How one TCP session ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum End {
    Completed,
    /// Its backend was killed while it ran.
    KilledBackend,
    /// The daemon's access log says its server was the one that resets.
    ResetBackend,
    /// On the slow backend, the client gave up waiting (bytes intact so far).
    GaveUpOnSlow,
    /// Bytes came back that were not the bytes sent.
    Corrupted,
    /// Anything else: a bug.
    Unexplained,
}

struct Tally {
    ends: HashMap<End, usize>,
    bytes: u64,
    unexplained: Vec<String>,
    /// Failures to look up in the access log: client address, what the client saw,
    /// kill counts at its start.
    /// Client, why, and every backend's kill count when it began and when it failed.
    to_check: Vec<(SocketAddr, String, Vec<u64>, Vec<u64>)>,
}

struct Fleet {
    backends: Vec<Arc<Killable>>,
}

impl Fleet {
    fn kill_counts(&self) -> Vec<u64> {
        self.backends
            .iter()
            .map(|b| b.kills.load(Ordering::SeqCst))
            .collect()
    }
}

/// What one session saw; an `Unexplained` end with a client address is looked up in
/// the access log at the end (the backend that resets sends no tag).
struct Seen {
    end: End,
    bytes: u64,
    client: Option<SocketAddr>,
    why: String,
    /// Every backend's kill count when the session began, and when it failed.
    kills: Vec<u64>,
    kills_after: Vec<u64>,
}

impl Seen {
    fn failed(client: Option<SocketAddr>, why: String, kills: &[u64], fleet: &Fleet) -> Seen {
        Seen {
            end: End::Unexplained,
            bytes: 0,
            client,
            why,
            kills: kills.to_vec(),
            kills_after: fleet.kill_counts(),
        }
    }
}

/// One session: tag line, then `len` checksummed bytes echoed back while being sent.
async fn session(lb: SocketAddr, len: usize, seed: u64, fleet: &Fleet) -> Seen {
    // Before connecting: a kill may cut the session after its tag is already on the wire.
    let kills = fleet.kill_counts();
    let s = match TcpStream::connect(lb).await {
        Ok(s) => s,
        Err(e) => return Seen::failed(None, format!("connect to {lb}: {e}"), &kills, fleet),
    };
    let client = s.local_addr().ok();
    let mut s = s;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match tokio::time::timeout(Duration::from_secs(30), s.read(&mut byte)).await {
            Ok(Ok(1)) if byte[0] == b'\n' => break,
            Ok(Ok(1)) => line.push(byte[0]),
            other => {
                return Seen::failed(
                    client,
                    format!("no tag from {lb}: {other:?}"),
                    &kills,
                    fleet,
                )
            }
        }
    }
    let tag = String::from_utf8_lossy(&line).into_owned();
    let killed = || {
        fleet
            .backends
            .iter()
            .zip(&kills)
            .any(|(b, k)| b.tag == tag && b.kills.load(Ordering::SeqCst) != *k)
    };
    let data = payload(len, seed);
    let (mut r, mut w) = s.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        // Long sessions pause half way, for longer than the promotion rules take (100 ms,
        // then a 100 ms sample), so they move into the kernel mid-stream: on a fast host
        // the 4 MiB were echoed before that, and 0-28 of 39,000 sessions moved.
        let (first, rest) = sent.split_at(if sent.len() >= 1 << 20 {
            sent.len() / 2
        } else {
            sent.len()
        });
        let mut ok = w.write_all(first).await.is_ok();
        if ok && !rest.is_empty() {
            tokio::time::sleep(Duration::from_millis(300)).await;
            ok = w.write_all(rest).await.is_ok();
        }
        let _ = w.shutdown().await;
        ok
    });
    let mut got = Vec::with_capacity(len);
    let read = tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut got)).await;
    let wrote = writer.await.unwrap_or(false);
    let prefix_ok = got.len() <= data.len() && got == data[..got.len()];
    let end = match (&read, wrote) {
        (Ok(Ok(_)), true) if got == data => End::Completed,
        _ if !prefix_ok => End::Corrupted,
        _ if killed() => End::KilledBackend,
        (Err(_), _) if tag == "slow" => End::GaveUpOnSlow,
        _ => {
            let why = format!(
                "{tag} via {lb}: read {read:?}, wrote all: {wrote}, got {} of {len}",
                got.len()
            );
            return Seen {
                bytes: got.len() as u64,
                ..Seen::failed(client, why, &kills, fleet)
            };
        }
    };
    Seen {
        end,
        bytes: got.len() as u64,
        client: None,
        why: String::new(),
        kills: Vec::new(),
        kills_after: Vec::new(),
    }
}

fn consul_value(weight: u32, down: bool) -> String {
    format!(r#"{{"weight":{weight},"max_fails":0,"fail_timeout":10,"down":{down}}}"#)
}

struct Ports {
    admin: u16,
    kernel: u16,
    copy: u16,
    limited: u16,
    udp: u16,
    show: u16,
}

fn config(
    p: &Ports,
    consul: &str,
    etcd: &str,
    statics: &[SocketAddr],
    udp: SocketAddr,
    log: &str,
    variant: u32,
) -> String {
    let kernel = if std::env::var("L4LB_NO_EBPF").is_ok_and(|v| v == "1") {
        "off"
    } else {
        "auto"
    };
    let statics: Vec<String> = statics
        .iter()
        .enumerate()
        .map(|(i, a)| {
            format!(
                "{{ address = \"{a}\", weight = {} }}",
                1 + (variant as usize + i) % 3
            )
        })
        .collect();
    format!(
        r#"
[global]
splice = "{kernel}"
# Soak sessions are short: earlier promotion moves many of them mid-stream.
splice_after_bytes = "32k"
splice_after_time = "100ms"
access_log = "{log}"
access_log_format = "json"
max_connections = 4000

[admin]
listen = "127.0.0.1:{admin}"
token_env = "L4LB_SOAK_TOKEN"

[upstream.db]
[upstream.db.upsync]
type = "consul"
url = "{consul}"
interval = "100ms"
timeout = "2s"

[upstream.cache]
balance = "least_conn"
[upstream.cache.upsync]
type = "etcd"
url = "{etcd}"
interval = "100ms"
timeout = "2s"

[upstream.static]
servers = [{statics}]

[upstream.dgram]
servers = [{{ address = "{udp}" }}]

[[server]]
listen = "127.0.0.1:{kp}"
proxy_pass = "db"
proxy_connect_timeout = "1s"
proxy_timeout = "{timeout}s"

[[server]]
listen = "127.0.0.1:{cp}"
proxy_pass = "cache"
splice = "off"
proxy_connect_timeout = "1s"

[[server]]
listen = "127.0.0.1:{lp}"
proxy_pass = "static"
proxy_upload_rate = "4m"
proxy_download_rate = "4m"

[[server]]
listen = "127.0.0.1:{up}"
protocol = "udp"
proxy_pass = "dgram"
proxy_timeout = "5s"

[[server]]
listen = "127.0.0.1:{sp}"
upstream_show = true
"#,
        admin = p.admin,
        kp = p.kernel,
        cp = p.copy,
        lp = p.limited,
        up = p.udp,
        sp = p.show,
        statics = statics.join(", "),
        timeout = 60 + variant % 2,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_under_churn_and_faults() {
    let seconds = env_or("L4LB_SOAK_SECONDS", 45);
    let sessions = env_or("L4LB_SOAK_SESSIONS", 100) as usize;
    let scale = |n: u64, min: u64| (n * seconds / 600).max(min);

    // Backends: db via Consul (three echo, one that resets), cache via etcd (two echo
    // and a slow one), static (two echo) behind a rate-limited listener, UDP.
    let mut all = Vec::new();
    for (tag, slow) in [
        ("a", false),
        ("b", false),
        ("c", false),
        ("d", false),
        ("e", false),
        ("slow", true),
        ("f", false),
        ("g", false),
    ] {
        all.push(Killable::start(tag, slow).await);
    }
    let fleet = Arc::new(Fleet { backends: all });
    let resetter = Backend::start(Behaviour::Reset).await;
    let udp_backend = UdpBackend::start("u").await;
    let consul = Arc::new(Consul::start().await);
    let consul_addr = consul.addr;
    let etcd = Arc::new(Etcd::start());
    let db_key = |a: SocketAddr| format!("upstreams/db/{a}");
    let cache_key = |a: SocketAddr| format!("upstreams/cache/{a}");
    for b in &fleet.backends[0..3] {
        consul.put(&db_key(b.addr), &consul_value(2, false));
    }
    consul.put(&db_key(resetter.addr), &consul_value(1, false));
    for b in &fleet.backends[3..6] {
        etcd.put(&cache_key(b.addr), &consul_value(1, false));
    }
    let statics = [fleet.backends[6].addr, fleet.backends[7].addr];
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let ports = Ports {
        admin: free_port(),
        kernel: free_port(),
        copy: free_port(),
        limited: free_port(),
        udp: free_udp_port(),
        show: free_port(),
    };
    let consul_url = consul.kv_url("upstreams/db/");
    let etcd_url = Etcd::url_via(etcd.addr, "upstreams/cache/");
    let make = |v: u32| {
        config(
            &ports,
            &consul_url,
            &etcd_url,
            &statics,
            udp_backend.addr,
            &log.display().to_string(),
            v,
        )
    };
    let d = Arc::new(Daemon::start_with_env(
        &make(0),
        &[("L4LB_SOAK_TOKEN", TOKEN)],
    ));
    let admin = SocketAddr::from(([127, 0, 0, 1], ports.admin));
    let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    // db and cache have no bootstrap servers, and with `strong_dependency = false` the
    // daemon serves at once: they are empty until their source first answers, and a
    // session before that rightly fails to connect. Sessions begin once both are in.
    let t0 = Instant::now();
    for (upstream, backends) in [
        ("db", &fleet.backends[0..3]),
        ("cache", &fleet.backends[3..6]),
    ] {
        while !backends
            .iter()
            .all(|b| support::show(at(ports.show), upstream).contains(&b.addr.to_string()))
        {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{upstream}: no servers from its source after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let (rss0, fds0) = (d.rss_kib(), d.fd_count());
    let peak_rss = Arc::new(AtomicU64::new(rss0));
    let peak_fds = Arc::new(AtomicUsize::new(fds0));
    let deadline = Instant::now() + Duration::from_secs(seconds);

    // Sessions.
    let tally = Arc::new(Mutex::new(Tally {
        ends: HashMap::new(),
        bytes: 0,
        unexplained: Vec::new(),
        to_check: Vec::new(),
    }));
    let started = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for wkr in 0..sessions {
        let (fleet, tally, started) =
            (Arc::clone(&fleet), Arc::clone(&tally), Arc::clone(&started));
        let listeners = [at(ports.kernel), at(ports.copy), at(ports.limited)];
        workers.spawn(async move {
            let mut rng = fastrand::Rng::with_seed(wkr as u64);
            while Instant::now() < deadline {
                let lb = listeners[rng.usize(..listeners.len())];
                // Mostly short, some long.
                let len = if rng.u8(..20) == 0 {
                    rng.usize(..4 << 20)
                } else {
                    rng.usize(..64 << 10)
                };
                started.fetch_add(1, Ordering::Relaxed);
                let seen = session(lb, len, rng.u64(..), &fleet).await;
                let mut t = tally.lock().unwrap();
                t.bytes += seen.bytes;
                match (seen.end, seen.client) {
                    (End::Unexplained, Some(c)) => {
                        t.to_check.push((c, seen.why, seen.kills, seen.kills_after))
                    }
                    (End::Unexplained, None) => {
                        t.unexplained.push(seen.why);
                        *t.ends.entry(End::Unexplained).or_default() += 1;
                    }
                    (e, _) => *t.ends.entry(e).or_default() += 1,
                }
            }
        });
    }
    // UDP clients: a request, a reply.
    let udp_stats = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
    for _ in 0..8 {
        let stats = Arc::clone(&udp_stats);
        let lb = at(ports.udp);
        workers.spawn(async move {
            let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let mut buf = [0u8; 256];
            while Instant::now() < deadline {
                stats.0.fetch_add(1, Ordering::Relaxed);
                let _ = s.send_to(b"ping", lb).await;
                if let Ok(Ok((n, _))) =
                    tokio::time::timeout(Duration::from_secs(2), s.recv_from(&mut buf)).await
                {
                    if &buf[..n] == b"u:ping" {
                        stats.1.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
    // Resource sampling.
    {
        let (d, peak_rss, peak_fds) =
            (Arc::clone(&d), Arc::clone(&peak_rss), Arc::clone(&peak_fds));
        workers.spawn(async move {
            while Instant::now() < deadline {
                peak_rss.fetch_max(d.rss_kib(), Ordering::Relaxed);
                peak_fds.fetch_max(d.fd_count(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    }

    // Chaos, spread over the run.
    let consul_changes = scale(1000, 100);
    let etcd_changes = scale(200, 20);
    let reloads = scale(20, 4);
    let admin_calls = scale(20, 4);
    let kills = scale(5, 2);
    let faults = [
        Fault::Status500,
        Fault::Garbage,
        Fault::Hang,
        Fault::Truncated,
        Fault::Reset,
    ];
    let mut events: Vec<(f64, u32, u64)> = Vec::new();
    for i in 0..consul_changes {
        events.push((i as f64 / consul_changes as f64, 0, i));
    }
    for i in 0..etcd_changes {
        events.push((i as f64 / etcd_changes as f64, 1, i));
    }
    for i in 0..reloads {
        events.push(((i as f64 + 0.5) / reloads as f64, 2, i));
    }
    for i in 0..admin_calls {
        events.push(((i as f64 + 0.3) / admin_calls as f64, 3, i));
    }
    for i in 0..kills {
        events.push(((i as f64 + 0.2) / kills as f64 * 0.8, 4, i));
    }
    for i in 0..faults.len() as u64 {
        events.push(((i as f64 + 0.6) / faults.len() as f64 * 0.7, 5, i));
    }
    events.push((0.75, 6, 0)); // Consul down, then back.
    events.sort_by(|a, b| a.0.total_cmp(&b.0));
    let run_start = Instant::now();
    let span = Duration::from_secs(seconds.saturating_sub(5).max(5));
    let mut recovery = None;
    let mut reload_results = (0, 0);
    let mut consul = Some(consul);
    for (when, kind, i) in events {
        let at_time = span.mul_f64(when);
        if let Some(wait) = at_time.checked_sub(run_start.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let c = consul.as_ref().expect("consul");
        match kind {
            0 => {
                // Re-weight the real servers; flip `down` on a; add/remove a dead one.
                let b = &fleet.backends[(i % 3) as usize];
                let down = b.tag == "a" && i % 7 == 3;
                c.put(&db_key(b.addr), &consul_value(1 + (i % 4) as u32, down));
                if i % 5 == 0 {
                    let dead = SocketAddr::from(([127, 0, 0, 1], 1));
                    if i % 10 == 0 {
                        c.put(&db_key(dead), &consul_value(1, false))
                    } else {
                        c.delete(&db_key(dead))
                    }
                }
            }
            1 => {
                let b = &fleet.backends[3 + (i % 3) as usize];
                etcd.put(&cache_key(b.addr), &consul_value(1 + (i % 3) as u32, false));
            }
            2 => {
                let before = d.log().matches("reload rejected").count();
                if i % 3 == 2 {
                    d.reload(&format!("{}\n[global.bad]\n", make(i as u32)));
                } else {
                    d.reload(&make(i as u32));
                }
                if d.log().matches("reload rejected").count() > before {
                    reload_results.1 += 1
                } else {
                    reload_results.0 += 1
                }
            }
            3 => {
                let server = statics[(i % 2) as usize];
                let body = if i % 2 == 0 {
                    r#"{"down":true}"#
                } else {
                    r#"{"down":false,"weight":2}"#
                };
                let (status, text) = support::http(
                    admin,
                    "PATCH",
                    &format!("/api/upstreams/static/servers/{server}"),
                    &[
                        ("Authorization", &format!("Bearer {TOKEN}")),
                        ("Content-Type", "application/json"),
                    ],
                    body,
                );
                assert_eq!(status, 200, "admin change: {text}");
                if i % 2 == 0 {
                    // Never leave both static servers drained.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    support::http(
                        admin,
                        "PATCH",
                        &format!("/api/upstreams/static/servers/{server}"),
                        &[
                            ("Authorization", &format!("Bearer {TOKEN}")),
                            ("Content-Type", "application/json"),
                        ],
                        r#"{"down":false}"#,
                    );
                }
            }
            4 => {
                // Never f or g: the admin calls drain those.
                let victim = &fleet.backends[[0usize, 3, 1, 4, 2][(i % 5) as usize]];
                victim.kill().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                victim.restart().await;
            }
            5 => {
                c.set_fault(faults[i as usize]);
                tokio::time::sleep(Duration::from_millis(700)).await;
                c.set_fault(Fault::None);
                if i == 0 {
                    // An index reset: Consul's index goes backwards.
                    c.set_index(1);
                }
            }
            _ => {
                drop(consul.take()); // Consul down.
                tokio::time::sleep(Duration::from_secs(1)).await;
                let back = Consul::start_on(consul_addr).await;
                for b in &fleet.backends[0..3] {
                    back.put(&db_key(b.addr), &consul_value(2, false));
                }
                back.put(&db_key(resetter.addr), &consul_value(1, false));
                // The first change after Consul returns: a marker server.
                let marker = SocketAddr::from(([127, 0, 0, 1], 2));
                back.put(&db_key(marker), &consul_value(1, true));
                let t0 = Instant::now();
                while !support::show(at(ports.show), "db").contains(&marker.to_string()) {
                    assert!(
                        t0.elapsed() < Duration::from_secs(15),
                        "no change applied 15 s after Consul returned"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                recovery = Some(t0.elapsed());
                consul = Some(Arc::new(back));
            }
        }
    }
    while let Some(r) = workers.join_next().await {
        r.expect("worker");
    }

    // Let the daemon close what the last sessions left and write their log lines.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Failures the client cannot explain: the access log says which server it was
    // (a client port may be reused, so every line of that client counts).
    let access = std::fs::read_to_string(&log).unwrap_or_default();
    let mut by_client: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    for v in access
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        if let Some(c) = v["client"].as_str() {
            by_client.entry(c.to_string()).or_default().push(v);
        }
    }
    let reset_server = resetter.addr.to_string();
    let mut t = tally.lock().unwrap();
    for (client, why, kills, kills_after) in std::mem::take(&mut t.to_check) {
        let lines = by_client.get(&client.to_string());
        let servers: Vec<&str> = lines
            .map(|ls| ls.iter().filter_map(|l| l["server"].as_str()).collect())
            .unwrap_or_default();
        // A connect that failed on every server tried names none: it is explained by a
        // kill while the session ran (with the others down in Consul at that moment).
        let connect_failed =
            lines.is_some_and(|ls| ls.iter().any(|l| l["end"] == "connect_failed"));
        let overlapped_kill = kills != kills_after;
        let killed = (connect_failed && overlapped_kill)
            || fleet.backends.iter().zip(&kills).any(|(b, k)| {
                servers.contains(&b.addr.to_string().as_str())
                    && b.kills.load(Ordering::SeqCst) != *k
            });
        let end = if servers.contains(&reset_server.as_str()) {
            End::ResetBackend
        } else if killed {
            End::KilledBackend
        } else {
            t.unexplained
                .push(format!("{client}: {why}; access log: {lines:?}"));
            End::Unexplained
        };
        *t.ends.entry(end).or_default() += 1;
    }
    let (rss1, fds1) = (d.rss_kib(), d.fd_count());
    let m = d.scrape();
    let kernel = |n: &str| metric(&m, n, &[]).unwrap_or(0.0) as u64;
    let count = |e: End| t.ends.get(&e).copied().unwrap_or(0);
    let ended: usize = t.ends.values().sum();
    let (udp_sent, udp_ok) = (
        udp_stats.0.load(Ordering::Relaxed),
        udp_stats.1.load(Ordering::Relaxed),
    );
    eprintln!(
        "soak {seconds} s, {sessions} concurrent TCP clients + 8 UDP clients\n\
         sessions started {} ended {ended}: completed {}, on a killed backend {}, on the resetting backend {}, client gave up on the slow backend {}, corrupted {}, unexplained {}\n\
         bytes echoed {:.1} MiB; UDP {udp_ok}/{udp_sent} answered\n\
         changes: consul {consul_changes}, etcd {etcd_changes}, reloads {} applied / {} rejected, admin {admin_calls}, kills {kills}, consul faults {}, consul down 1 s\n\
         first change applied {:?} after Consul returned\n\
         daemon RSS {rss0} / {} / {rss1} KiB (start/peak/end), fds {fds0} / {} / {fds1}\n\
         kernel path: promoted {} (deferred as bulk {}), sessions {} pauses {} trimmed {} lag moves {} watchdog {} insert failures {}; session panics {}",
        started.load(Ordering::Relaxed),
        count(End::Completed), count(End::KilledBackend), count(End::ResetBackend), count(End::GaveUpOnSlow), count(End::Corrupted), count(End::Unexplained),
        t.bytes as f64 / 1048576.0,
        reload_results.0, reload_results.1, faults.len(), recovery,
        peak_rss.load(Ordering::Relaxed), peak_fds.load(Ordering::Relaxed),
        kernel("l4lb_kernel_promotion_age_seconds_count"), kernel("l4lb_kernel_promotions_deferred_total"),
        kernel("l4lb_kernel_sessions"), kernel("l4lb_kernel_pauses_total"), kernel("l4lb_kernel_trimmed_bytes_total"),
        kernel("l4lb_kernel_lag_moves_total"), kernel("l4lb_kernel_watchdog_moves_total"), kernel("l4lb_kernel_insert_failures_total"),
        kernel("l4lb_session_panics_total"),
    );
    assert!(d.exited().is_none(), "the daemon died:\n{}", d.log());
    assert_eq!(count(End::Corrupted), 0, "bytes corrupted");
    if !std::env::var("L4LB_NO_EBPF").is_ok_and(|v| v == "1") {
        assert!(
            kernel("l4lb_kernel_promotion_age_seconds_count") > 0,
            "no session moved into the kernel; the daemon's kernel path lines:\n{}",
            d.log()
                .lines()
                .filter(|l| l.contains("kernel") || l.contains("splice") || l.contains("ebpf"))
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // The daemon's warnings from the same moments say why, e.g. a failed connect.
    let warnings: Vec<String> = if t.unexplained.is_empty() {
        Vec::new()
    } else {
        d.log()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .take(40)
            .map(str::to_string)
            .collect()
    };
    assert!(
        t.unexplained.is_empty(),
        "sessions that ended for no accounted reason:\n{:#?}\ndaemon warnings:\n{}",
        &t.unexplained[..t.unexplained.len().min(10)],
        warnings.join("\n")
    );
    assert_eq!(
        ended,
        started.load(Ordering::Relaxed),
        "every session's end is accounted for"
    );
    assert!(count(End::Completed) > 0);
    assert_eq!(kernel("l4lb_session_panics_total"), 0);
    assert!(
        reload_results.1 >= 1 && reload_results.0 >= 1,
        "{reload_results:?}"
    );
    assert!(
        recovery.is_some_and(|r| r < Duration::from_secs(5)),
        "{recovery:?}"
    );
    assert!(
        udp_ok * 100 >= udp_sent * 95,
        "UDP answered {udp_ok} of {udp_sent}"
    );
    assert!(fds1 <= fds0 + 16, "descriptors {fds0} -> {fds1}: a leak");
    assert!(rss1 <= rss0 + 64 * 1024, "RSS {rss0} -> {rss1} KiB");
}
