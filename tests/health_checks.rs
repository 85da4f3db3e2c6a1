//! Active health checks end to end: a backend that accepts but hangs is taken out by
//! `send_expect` and brought back by `passes`; real redis-server and mariadbd checked
//! with the `redis` and `mysql` types; a killed backend found by `tcp`; checks spread
//! in time; a server added at reload gets no traffic before it passes; a reload keeps
//! every other server's state.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{free_port, http_get, read_line, servers, Backend, Behaviour, Daemon};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// A backend that answers `PING` with `PONG` while `answering`, and otherwise accepts
/// and stays silent (a service stuck on a lock); `WHO` gets its tag.
struct Switchable {
    addr: SocketAddr,
    answering: Arc<AtomicBool>,
}

impl Switchable {
    async fn start(tag: &'static str) -> Switchable {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let answering = Arc::new(AtomicBool::new(true));
        let on = Arc::clone(&answering);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let on = Arc::clone(&on);
                tokio::spawn(async move { serve(s, tag, &on).await });
            }
        });
        Switchable { addr, answering }
    }
}

async fn serve(mut s: TcpStream, tag: &str, on: &AtomicBool) {
    while let Ok(line) = read_line(&mut s).await {
        let reply = match line.trim_end() {
            "PING" if on.load(Ordering::SeqCst) => "PONG\r\n".to_string(),
            "PING" => {
                // Hung: hold the connection, answer nothing.
                tokio::time::sleep(Duration::from_secs(30)).await;
                return;
            }
            "WHO" => format!("{tag}\n"),
            "" => return,
            _ => "?\n".to_string(),
        };
        if s.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn who(lb: SocketAddr) -> String {
    let mut s = TcpStream::connect(lb).await.unwrap();
    s.write_all(b"WHO\n").await.unwrap();
    read_line(&mut s)
        .await
        .unwrap_or_else(|e| format!("ERR {e}"))
}

fn upstream_json(admin: SocketAddr, name: &str) -> Value {
    let (status, body) = http_get(admin, &format!("/api/upstreams/{name}"));
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The health state of `server` in `upstream`, from the JSON API.
fn state(admin: SocketAddr, upstream: &str, server: SocketAddr) -> (String, Value) {
    let v = upstream_json(admin, upstream);
    let s = v["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["address"] == server.to_string())
        .unwrap_or_else(|| panic!("{server} not in {v}"))
        .clone();
    (
        s["health_check"]["status"]
            .as_str()
            .unwrap_or("-")
            .to_string(),
        s,
    )
}

async fn wait_state(
    admin: SocketAddr,
    upstream: &str,
    server: SocketAddr,
    want: &str,
    within: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let (got, s) = state(admin, upstream, server);
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{server} still {got} after {within:?}, not {want}: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn check_config(admin: u16, lb: u16, show: u16, servers: &str, interval: &str) -> String {
    format!(
        r#"
[global]
splice = "off"

[admin]
listen = "127.0.0.1:{admin}"

[upstream.u]
servers = [{servers}]

[upstream.u.health_check]
interval = "{interval}"
timeout = "300ms"
fails = 2
passes = 2
type = "send_expect"
send = 'PING\r\n'
expect = "^PONG"

[[server]]
listen = "127.0.0.1:{lb}"
proxy_pass = "u"
proxy_connect_timeout = "1s"

[[server]]
listen = "127.0.0.1:{show}"
upstream_show = true
"#
    )
}

/// Backends `a` and `b`, answering; ports for the admin API, the balancer and
/// `upstream_show`; the `servers` list naming both.
async fn pair() -> (Switchable, Switchable, (u16, u16, u16), String) {
    let a = Switchable::start("a").await;
    let b = Switchable::start("b").await;
    let servers = format!(
        "{{ address = \"{}\" }}, {{ address = \"{}\" }}",
        a.addr, b.addr
    );
    (a, b, (free_port(), free_port(), free_port()), servers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_backend_is_marked_down_and_comes_back_after_passes() {
    let (a, b, (admin_port, lb_port, show_port), servers) = pair().await;
    let d = Daemon::start(&check_config(
        admin_port, lb_port, show_port, &servers, "500ms",
    ));
    let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
    let lb = SocketAddr::from(([127, 0, 0, 1], lb_port));
    wait_state(admin, "u", a.addr, "up", Duration::from_secs(3)).await;
    wait_state(admin, "u", b.addr, "up", Duration::from_secs(3)).await;

    a.answering.store(false, Ordering::SeqCst);
    let took = wait_state(admin, "u", a.addr, "down", Duration::from_secs(5)).await;
    // interval x fails + one timeout, plus scheduling slack.
    assert!(
        took <= Duration::from_millis(1300 + 400),
        "marked down after {took:?}"
    );
    let (_, s) = state(admin, "u", a.addr);
    let reason = s["health_check"]["last"]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("timed out"), "{s}");
    assert_eq!(s["available"], false, "{s}");
    let show = support::show(SocketAddr::from(([127, 0, 0, 1], show_port)), "u");
    assert!(
        show.contains(&format!("server {} ", a.addr)) && show.contains("# health=down last=fail"),
        "{show}"
    );
    for _ in 0..20 {
        assert_eq!(who(lb).await, "b", "a down server got a session");
    }

    a.answering.store(true, Ordering::SeqCst);
    let back = wait_state(admin, "u", a.addr, "up", Duration::from_secs(5)).await;
    assert!(
        back <= Duration::from_millis(1000 + 500),
        "back after {back:?}"
    );
    let mut tags = Vec::new();
    for _ in 0..10 {
        tags.push(who(lb).await);
    }
    assert!(tags.iter().any(|t| t == "a"), "{tags:?}");

    // A reload adds server c, which never answers checks, and changes the interval:
    // c gets no traffic (it has not passed a check), a and b keep their state.
    a.answering.store(false, Ordering::SeqCst);
    wait_state(admin, "u", a.addr, "down", Duration::from_secs(5)).await;
    let c = Switchable::start("c").await;
    c.answering.store(false, Ordering::SeqCst);
    let servers = format!("{servers}, {{ address = \"{}\" }}", c.addr);
    d.reload(&check_config(
        admin_port, lb_port, show_port, &servers, "400ms",
    ));
    assert_eq!(state(admin, "u", c.addr).0, "pending");
    assert_eq!(
        state(admin, "u", a.addr).0,
        "down",
        "reload reset a's state"
    );
    assert_eq!(state(admin, "u", b.addr).0, "up");
    for _ in 0..20 {
        assert_eq!(
            who(lb).await,
            "b",
            "an unchecked or down server got a session"
        );
    }
    wait_state(admin, "u", c.addr, "down", Duration::from_secs(5)).await;

    // A reload without checks: their series leave /metrics.
    let series = |who: &Switchable| {
        let s = support::scrape(admin);
        let server = who.addr.to_string();
        support::metric(
            &s,
            "l4lb_health_checks_total",
            &[
                ("upstream", "u"),
                ("server", server.as_str()),
                ("result", "fail"),
            ],
        )
    };
    assert!(series(&c).is_some(), "c failed checks: it has a series");
    // One reload that removes b and changes the interval: b's series go with it.
    let passed = |who: &Switchable| {
        let server = who.addr.to_string();
        support::metric(
            &support::scrape(admin),
            "l4lb_health_checks_total",
            &[
                ("upstream", "u"),
                ("server", server.as_str()),
                ("result", "pass"),
            ],
        )
    };
    assert!(passed(&b).is_some(), "b passed checks: it has a series");
    let without_b = format!(
        "{{ address = \"{}\" }}, {{ address = \"{}\" }}",
        a.addr, c.addr
    );
    d.reload(&check_config(
        admin_port, lb_port, show_port, &without_b, "300ms",
    ));
    let gone = support::wait_until(Duration::from_secs(2), || passed(&b).is_none()).await;
    assert!(gone.is_some(), "a removed server's check series stayed");
    let checked = check_config(admin_port, lb_port, show_port, &servers, "400ms");
    let (from, to) = (
        checked.find("[upstream.u.health_check]").expect("checks"),
        checked.find("[[server]]").expect("servers"),
    );
    d.reload(&format!("{}{}", &checked[..from], &checked[to..]));
    assert_eq!(
        series(&c),
        None,
        "check series left after the checks were removed"
    );
    assert_eq!(series(&a), None);
}

fn typed_config(admin: u16, lb: u16, upstreams: &[(&str, &str, SocketAddr)]) -> String {
    let mut c = format!("[global]\nsplice = \"off\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n");
    for (name, kind, addr) in upstreams {
        c.push_str(&format!(
            "\n[upstream.{name}]\nservers = [{{ address = \"{addr}\" }}]\n\n[upstream.{name}.health_check]\ninterval = \"300ms\"\ntimeout = \"1s\"\ntype = \"{kind}\"\n"
        ));
    }
    c.push_str(&format!(
        "\n[[server]]\nlisten = \"127.0.0.1:{lb}\"\nproxy_pass = \"{}\"\n",
        upstreams[0].0
    ));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_mysql_and_tcp_checks_against_real_servers() {
    let mut redis = servers::redis();
    let mysql = servers::mariadb();
    let plain = Backend::start(Behaviour::Echo).await;
    let plain_addr = plain.addr;
    let (admin_port, lb_port) = (free_port(), free_port());
    let d = Daemon::start(&typed_config(
        admin_port,
        lb_port,
        &[
            ("r", "redis", redis.addr),
            ("m", "mysql", mysql.addr),
            ("t", "tcp", plain_addr),
            // A MySQL check of a redis server: the reply is no MySQL handshake.
            ("wrong", "mysql", redis.addr),
        ],
    ));
    let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
    let within = Duration::from_secs(5);
    wait_state(admin, "r", redis.addr, "up", within).await;
    wait_state(admin, "m", mysql.addr, "up", within).await;
    wait_state(admin, "t", plain_addr, "up", within).await;
    wait_state(admin, "wrong", redis.addr, "down", within).await;

    redis.kill();
    wait_state(admin, "r", redis.addr, "down", within).await;
    let (_, s) = state(admin, "r", redis.addr);
    let reason = s["health_check"]["last"]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("connect"), "{s}");
    drop(plain);
    wait_state(admin, "t", plain_addr, "down", within).await;
    assert_eq!(state(admin, "m", mysql.addr).0, "up");
    assert!(d.exited().is_none(), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_of_many_servers_are_spread_in_time() {
    const N: usize = 100;
    let seen: Arc<Mutex<Vec<(usize, Instant)>>> = Arc::default();
    let mut addrs = Vec::new();
    for i in 0..N {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(l.local_addr().unwrap());
        let seen = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                seen.lock().unwrap().push((i, Instant::now()));
                drop(s);
            }
        });
    }
    let servers: Vec<String> = addrs
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    let lb = free_port();
    let d = Daemon::start(&format!(
        "[global]\nsplice = \"off\"\n\n[upstream.u]\nservers = [{}]\n\n[upstream.u.health_check]\ninterval = \"1s\"\ntype = \"tcp\"\n\n[[server]]\nlisten = \"127.0.0.1:{lb}\"\nproxy_pass = \"u\"\n",
        servers.join(", ")
    ));
    let start = Instant::now();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let seen = seen.lock().unwrap().clone();
    let in_window: Vec<Duration> = seen
        .iter()
        .map(|(_, t)| t.saturating_duration_since(start))
        .filter(|t| *t < Duration::from_millis(2500))
        .collect();
    let mut buckets: HashMap<u128, usize> = HashMap::new();
    for t in &in_window {
        *buckets.entry(t.as_millis() / 100).or_default() += 1;
    }
    let busiest = buckets.values().copied().max().unwrap_or(0);
    eprintln!(
        "{} checks in 2.5 s, busiest 100 ms: {busiest} (uniform: {})",
        in_window.len(),
        N / 10
    );
    // Uniform would be about 10 per 100 ms; all at once would be 100.
    assert!(busiest <= 30, "checks bunch up: {busiest} in one 100 ms");
    let mut per_server = vec![0usize; N];
    for (i, _) in &seen {
        per_server[*i] += 1;
    }
    assert!(
        per_server.iter().all(|&n| (2..=4).contains(&n)),
        "checks per server in 3 s: {per_server:?}"
    );
    assert!(d.exited().is_none(), "{}", d.log());
}

/// A server removed and put back while a session of its first stay still holds its
/// state starts over: pending, no session until it passes a check (it kept `up` and
/// got sessions with no check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_put_back_is_pending_again() {
    let (a, b, (admin_port, lb_port, show_port), servers) = pair().await;
    let token = "hc-admin-token";
    let cfg = check_config(admin_port, lb_port, show_port, &servers, "1s").replace(
        "[admin]\n",
        "[admin]\ntoken_env = \"L4LB_TEST_ADMIN_TOKEN\"\n",
    );
    let d = Daemon::start_with_env(&cfg, &[("L4LB_TEST_ADMIN_TOKEN", token)]);
    let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
    let lb = SocketAddr::from(([127, 0, 0, 1], lb_port));
    wait_state(admin, "u", a.addr, "up", Duration::from_secs(5)).await;
    wait_state(admin, "u", b.addr, "up", Duration::from_secs(5)).await;
    // A session on a stays open throughout.
    let mut held = None;
    for _ in 0..10 {
        let mut s = TcpStream::connect(lb).await.unwrap();
        s.write_all(b"WHO\n").await.unwrap();
        if read_line(&mut s).await.unwrap_or_default() == "a" {
            held = Some(s);
            break;
        }
    }
    let _held = held.expect("no session reached a");
    let bearer = format!("Bearer {token}");
    let change = |method: &str| {
        let path = format!("/api/upstreams/u/servers/{}", a.addr);
        let (status, body) = support::http(admin, method, &path, &[("Authorization", &bearer)], "");
        assert!(status < 300, "{method}: {status} {body}");
    };
    change("DELETE");
    // From now on a's checks time out.
    a.answering.store(false, Ordering::SeqCst);
    change("PUT");
    let (status, s) = state(admin, "u", a.addr);
    assert_eq!(status, "pending", "{s}\n{}", d.log());
    assert_eq!(s["available"], false, "{s}");
    for _ in 0..10 {
        assert_eq!(
            who(lb).await,
            "b",
            "a server put back got a session unchecked"
        );
    }
    wait_state(admin, "u", a.addr, "down", Duration::from_secs(5)).await;
}
