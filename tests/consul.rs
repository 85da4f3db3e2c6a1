//! Consul KV and Consul health discovery end to end: the real binary against the Consul
//! stand-in and real backends on 127.0.0.1.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::consul::{Consul, Fault, Instance};
use support::{free_port, http_get, show, tags, wait_until, Backend, Behaviour, Daemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PREFIX: &str = "upstreams/db/";

struct Ports {
    lb: u16,
    show: u16,
    admin: u16,
}

impl Ports {
    fn new() -> Ports {
        Ports {
            lb: free_port(),
            show: free_port(),
            admin: free_port(),
        }
    }

    fn lb(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.lb).parse().unwrap()
    }

    fn show(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.show).parse().unwrap()
    }

    fn admin(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.admin).parse().unwrap()
    }
}

/// One upstream `db` fed by `upsync` (TOML lines of `[upstream.db.upsync]`), a proxy
/// listener, an upstream_show listener and the admin API.
fn config(p: &Ports, servers: &str, upsync: &str) -> String {
    format!(
        r#"
[global]
splice = "off"

[admin]
listen = "127.0.0.1:{admin}"

[upstream.db]
servers = [{servers}]

[upstream.db.upsync]
{upsync}

[[server]]
listen = "127.0.0.1:{lb}"
proxy_pass = "db"
proxy_connect_timeout = "1s"

[[server]]
listen = "127.0.0.1:{show}"
upstream_show = true
"#,
        admin = p.admin,
        lb = p.lb,
        show = p.show
    )
}

fn consul_upsync(url: &str, extra: &str) -> String {
    format!("type = \"consul\"\nurl = \"{url}\"\ninterval = \"300ms\"\ntimeout = \"1s\"\n{extra}")
}

fn key(b: &Backend) -> String {
    format!("{PREFIX}{}", b.addr)
}

/// Waits (at most `limit`) until `upstream_show` satisfies `cond`; returns the latency.
async fn shows(d: &Daemon, p: &Ports, limit: Duration, cond: impl Fn(&str) -> bool) -> Duration {
    let addr = p.show();
    match wait_until(limit, || cond(&show(addr, "db"))).await {
        Some(took) => took,
        None => panic!(
            "upstream_show never matched within {limit:?}:\n{}\nlog:\n{}",
            show(addr, "db"),
            d.log()
        ),
    }
}

/// A discovery counter of upstream `db`, from `/metrics`.
fn metric(p: &Ports, name: &str) -> u64 {
    let s = support::scrape(p.admin());
    let full = format!("l4lb_{name}_total");
    support::metric(&s, &full, &[("upstream", "db")])
        .unwrap_or_else(|| panic!("no metric {full} in {:?}", s.samples)) as u64
}

/// The admin API shows no error since the source's last good answer.
fn last_error_cleared(p: &Ports) -> bool {
    let (_, body) = http_get(p.admin(), "/api/upstreams/db");
    serde_json::from_str::<serde_json::Value>(&body)
        .is_ok_and(|v| v["upsync"]["last_error"].is_null())
}

fn count(tags: &[String], tag: &str) -> usize {
    tags.iter().filter(|t| *t == tag).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upsync_scenario_is_visible_in_show_and_traffic_within_a_second() {
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let b = Backend::start(Behaviour::Tagged("b".into())).await;
    let other = Backend::start(Behaviour::Tagged("other".into())).await;
    let consul = Consul::start().await;
    // Same prefix without the slash: another upstream's key, never ours.
    consul.put(&format!("upstreams/dbx/{}", other.addr), "");
    consul.put(&format!("upstreams/db{}", other.addr), "");
    let p = Ports::new();
    let d = Daemon::start(&config(&p, "", &consul_upsync(&consul.kv_url(PREFIX), "")));
    shows(&d, &p, Duration::from_secs(3), |s| {
        s.contains("Backend server counts: 0")
    })
    .await;
    let t = tags(p.lb(), 3).await;
    assert_eq!(count(&t, "ERR"), 3, "no server: connections close: {t:?}");
    let second = Duration::from_secs(1);
    let mut latencies = Vec::new();

    consul.put(&key(&a), "");
    consul.put(&key(&b), "");
    latencies.push(
        shows(&d, &p, second, |s| {
            s.contains(&a.addr.to_string()) && s.contains(&b.addr.to_string())
        })
        .await,
    );
    assert!(show(p.show(), "db").contains(&format!(
        "server {} weight=1 max_fails=2 fail_timeout=10s;",
        a.addr
    )));
    let t = tags(p.lb(), 10).await;
    assert!(count(&t, "a") == 5 && count(&t, "b") == 5, "{t:?}");

    consul.delete(&key(&a));
    latencies.push(shows(&d, &p, second, |s| !s.contains(&a.addr.to_string())).await);
    let t = tags(p.lb(), 6).await;
    assert_eq!(count(&t, "b"), 6, "{t:?}");

    consul.put(&key(&a), "");
    consul.put(&key(&b), r#"{"weight":3,"max_fails":2,"fail_timeout":10}"#);
    latencies.push(
        shows(&d, &p, second, |s| {
            s.contains(&format!("{} weight=3", b.addr)) && s.contains(&a.addr.to_string())
        })
        .await,
    );
    let t = tags(p.lb(), 40).await;
    assert_eq!((count(&t, "a"), count(&t, "b")), (10, 30), "{t:?}");

    consul.put(
        &key(&a),
        r#"{"weight":1,"max_fails":2,"fail_timeout":10,"down":1}"#,
    );
    latencies.push(
        shows(&d, &p, second, |s| {
            s.contains(&format!(
                "{} weight=1 max_fails=2 fail_timeout=10s down;",
                a.addr
            ))
        })
        .await,
    );
    let t = tags(p.lb(), 8).await;
    assert_eq!(count(&t, "b"), 8, "{t:?}");

    // As nginx-upsync ("cannot delete all peers"): a source that lists no servers
    // leaves the last set serving, and says so.
    let errors = metric(&p, "discovery_errors");
    consul.delete_prefix(PREFIX);
    assert!(d.wait_log("source lists no servers", second), "{}", d.log());
    assert!(show(p.show(), "db").contains("Backend server counts: 2"));
    assert_eq!(metric(&p, "discovery_errors"), errors + 1);
    let t = tags(p.lb(), 4).await;
    assert_eq!(count(&t, "b"), 4, "{t:?}");
    assert_eq!(other.accepted(), 0, "a key outside the prefix was used");
    assert!(d.log().contains("server set updated"), "{}", d.log());
    println!("consul update latencies (upstream_show): {latencies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_changes_while_fifty_long_sessions_stream() {
    let backends = [
        Backend::start(Behaviour::Echo).await,
        Backend::start(Behaviour::Echo).await,
        Backend::start(Behaviour::Echo).await,
        Backend::start(Behaviour::Echo).await,
    ];
    let consul = Consul::start().await;
    for b in &backends {
        consul.put(&key(b), "");
    }
    let p = Ports::new();
    let d = Daemon::start(&config(&p, "", &consul_upsync(&consul.kv_url(PREFIX), "")));
    shows(&d, &p, Duration::from_secs(3), |s| {
        s.contains("Backend server counts: 4")
    })
    .await;
    let lb = p.lb();

    let sessions: Vec<_> = (0..50u64)
        .map(|i| {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(i * 10)).await;
                let data = support::payload(256 * 1024, i);
                let mut s = tokio::net::TcpStream::connect(lb).await.expect("connect");
                let (mut r, mut w) = s.split();
                let send = async {
                    for chunk in data.chunks(4096) {
                        w.write_all(chunk).await?;
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                    w.shutdown().await
                };
                let mut got = Vec::new();
                let (sent, read) = tokio::join!(send, r.read_to_end(&mut got));
                sent.expect("send");
                read.expect("read");
                got == data
            })
        })
        .collect();

    for i in 0..100usize {
        let b = &backends[i % 4];
        if i % 2 == 0 {
            consul.delete(&key(b));
        } else {
            consul.put(&key(b), &format!(r#"{{"weight":{}}}"#, i % 3 + 1));
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let mut exact = 0;
    for s in sessions {
        if tokio::time::timeout(Duration::from_secs(30), s)
            .await
            .expect("session hung")
            .expect("join")
        {
            exact += 1;
        }
    }
    assert_eq!(exact, 50, "sessions byte-exact");
    // The 100th change put backends[3] back with weight 1 (i = 99: 99 % 3 + 1).
    shows(&d, &p, Duration::from_secs(1), |s| {
        s.contains(&format!("{} weight=1", backends[3].addr))
    })
    .await;
    let t = tags_echo(lb).await;
    assert!(t, "new connections work after the changes");
}

/// One echo round trip through the balancer.
async fn tags_echo(lb: SocketAddr) -> bool {
    support::roundtrip(lb, b"ping")
        .await
        .map(|r| r == b"ping")
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strong_dependency_exits_when_the_source_is_unreachable() {
    let p = Ports::new();
    let url = format!("http://127.0.0.1:{}/v1/kv/{PREFIX}", free_port());
    let d = Daemon::spawn(
        &config(&p, "", &consul_upsync(&url, "strong_dependency = true")),
        &[],
    );
    let status = d
        .wait_exit(Duration::from_secs(10))
        .expect("l4lb kept running");
    assert!(!status.success(), "{status}");
    let log = d.log();
    assert!(
        log.contains("did not answer after 3 tries and strong_dependency = true"),
        "{log}"
    );
}

/// Several strong_dependency sources are waited for together: each one's tries, not
/// their sum, bound the start, and every one that fails is named before it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strong_dependency_sources_are_waited_for_together() {
    let p = Ports::new();
    let upsync = |name: &str| {
        format!(
            "[upstream.{name}.upsync]\ntype = \"consul\"\nurl = \"http://127.0.0.1:{}/v1/kv/{name}/\"\ninterval = \"500ms\"\ntimeout = \"1s\"\nstrong_dependency = true\n",
            free_port()
        )
    };
    let cfg = format!(
        "[upstream.one]\nservers = []\n{}\n[upstream.two]\nservers = []\n{}\n[[server]]\nlisten = \"127.0.0.1:{}\"\nproxy_pass = \"one\"\n",
        upsync("one"),
        upsync("two"),
        p.lb().port()
    );
    let d = Daemon::spawn(&cfg, &[]);
    let status = d
        .wait_exit(Duration::from_secs(10))
        .expect("l4lb kept running");
    assert!(!status.success(), "{status}");
    let log = d.log();
    for name in ["one", "two"] {
        assert!(
            log.lines()
                .any(|l| l.contains("discovery fetch failed")
                    && l.contains(&format!("upstream={name}"))),
            "{name} was never asked:\n{log}"
        );
    }
}

/// SIGHUP, SIGUSR1 and SIGUSR2 are caught from the start: one sent while the daemon
/// still waits for its source (a reload, a log rotation) no longer ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_during_a_slow_start_does_not_end_the_daemon() {
    let p = Ports::new();
    let url = format!("http://127.0.0.1:{}/v1/kv/{PREFIX}", free_port());
    let upsync = format!(
        "type = \"consul\"\nurl = \"{url}\"\ninterval = \"1s\"\ntimeout = \"1s\"\nstrong_dependency = true"
    );
    let d = Daemon::spawn(&config(&p, "", &upsync), &[]);
    assert!(
        d.wait_log("discovery fetch failed", Duration::from_secs(5)),
        "{}",
        d.log()
    );
    d.signal(libc::SIGHUP);
    d.signal(libc::SIGUSR1);
    let status = d
        .wait_exit(Duration::from_secs(10))
        .expect("l4lb kept running");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), None, "ended by a signal: {}", d.log());
    assert!(
        d.log()
            .contains("did not answer after 3 tries and strong_dependency = true"),
        "{}",
        d.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strong_dependency_serves_the_source_set_from_the_first_connection() {
    let a = Backend::start(Behaviour::Tagged("consul".into())).await;
    let s = Backend::start(Behaviour::Tagged("static".into())).await;
    let consul = Consul::start().await;
    consul.put(&key(&a), "");
    let p = Ports::new();
    let servers = format!("{{ address = \"{}\" }}", s.addr);
    let d = Daemon::start(&config(
        &p,
        &servers,
        &consul_upsync(&consul.kv_url(PREFIX), "strong_dependency = true"),
    ));
    assert_eq!(tags(p.lb(), 3).await, ["consul", "consul", "consul"]);
    assert!(d.log().contains("source=consul servers=1"), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_consul_down_uses_the_dump_file_then_resyncs() {
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let b = Backend::start(Behaviour::Tagged("b".into())).await;
    let s = Backend::start(Behaviour::Tagged("static".into())).await;
    let dumps = tempfile::tempdir().unwrap();
    let dump = dumps.path().join("db.conf");
    let consul = Consul::start().await;
    let consul_addr = consul.addr;
    consul.put(&key(&a), r#"{"weight":2}"#);
    consul.put(&key(&b), r#"{"backup":1}"#);
    let p = Ports::new();
    let servers = format!("{{ address = \"{}\" }}", s.addr);
    let upsync = consul_upsync(
        &consul.kv_url(PREFIX),
        &format!("dump_path = \"{}\"", dump.display()),
    );
    let cfg = config(&p, &servers, &upsync);
    let d = Daemon::start(&cfg);
    let mut sorted = [a.addr, b.addr];
    sorted.sort();
    let line = |addr: SocketAddr| {
        if addr == a.addr {
            format!("server {addr} weight=2 max_fails=2 fail_timeout=10s;")
        } else {
            format!("server {addr} weight=1 max_fails=2 fail_timeout=10s backup;")
        }
    };
    let expected = format!("{}\n{}\n", line(sorted[0]), line(sorted[1]));
    let written = wait_until(Duration::from_secs(3), || {
        std::fs::read_to_string(&dump).is_ok_and(|t| t.ends_with(&expected))
    })
    .await;
    assert!(
        written.is_some(),
        "dump file: {:?}",
        std::fs::read_to_string(&dump)
    );
    assert_eq!(
        d.stop(Duration::from_secs(10)).map(|s| s.success()),
        Some(true)
    );
    drop(d);
    drop(consul);

    let d = Daemon::start(&cfg);
    assert!(
        d.wait_log("servers loaded from the dump file", Duration::from_secs(2)),
        "{}",
        d.log()
    );
    assert_eq!(
        tags(p.lb(), 4).await,
        ["a", "a", "a", "a"],
        "the dump's primary serves, not the static server"
    );
    let (_, api) = http_get(p.admin(), "/api/upstreams/db");
    assert!(api.contains(r#""source":"dump_file""#), "{api}");
    assert!(
        d.wait_log("discovery fetch failed", Duration::from_secs(3)),
        "{}",
        d.log()
    );

    let consul = Consul::start_on(consul_addr).await;
    consul.put(&key(&b), "");
    shows(&d, &p, Duration::from_secs(3), |s| {
        s.contains("Backend server counts: 1") && s.contains(&b.addr.to_string())
    })
    .await;
    assert_eq!(tags(p.lb(), 2).await, ["b", "b"]);
    let resynced = wait_until(Duration::from_secs(2), || {
        std::fs::read_to_string(&dump).is_ok_and(|t| {
            t.ends_with(&format!(
                "server {} weight=1 max_fails=2 fail_timeout=10s;\n",
                b.addr
            ))
        })
    })
    .await;
    assert!(resynced.is_some(), "{:?}", std::fs::read_to_string(&dump));
}

/// The dump file is written whenever it may not hold the set: after a reload adds
/// `dump_path` the next answer writes it, though the set did not change. A dump that
/// lists no servers is not applied over the configured ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_path_added_by_reload_is_written_and_an_empty_dump_is_not_loaded() {
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let s = Backend::start(Behaviour::Tagged("static".into())).await;
    let dumps = tempfile::tempdir().unwrap();
    let dump = dumps.path().join("db.conf");
    let consul = Consul::start().await;
    consul.put(&key(&a), "");
    let p = Ports::new();
    let upsync = consul_upsync(&consul.kv_url(PREFIX), "");
    let d = Daemon::start(&config(&p, "", &upsync));
    shows(&d, &p, Duration::from_secs(3), |s| {
        s.contains(&a.addr.to_string())
    })
    .await;
    let with_dump = consul_upsync(
        &consul.kv_url(PREFIX),
        &format!("dump_path = \"{}\"", dump.display()),
    );
    d.reload(&config(&p, "", &with_dump));
    let written = wait_until(Duration::from_secs(4), || {
        std::fs::read_to_string(&dump).is_ok_and(|t| t.contains(&a.addr.to_string()))
    })
    .await;
    assert!(written.is_some(), "no dump file: {}", d.log());
    drop(d);

    std::fs::write(
        &dump,
        "# l4lb: servers of upstream db from consul; rewritten on every change\n",
    )
    .unwrap();
    let p = Ports::new();
    let down = format!("http://127.0.0.1:{}/v1/kv/{PREFIX}", free_port());
    let servers = format!("{{ address = \"{}\" }}", s.addr);
    let upsync = consul_upsync(&down, &format!("dump_path = \"{}\"", dump.display()));
    let d = Daemon::start(&config(&p, &servers, &upsync));
    assert!(
        d.wait_log("the dump file lists no servers", Duration::from_secs(2)),
        "{}",
        d.log()
    );
    assert_eq!(tags(p.lb(), 2).await, ["static", "static"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weak_dependency_without_dump_serves_the_static_servers() {
    let s = Backend::start(Behaviour::Tagged("static".into())).await;
    let p = Ports::new();
    let url = format!("http://127.0.0.1:{}/v1/kv/{PREFIX}", free_port());
    let servers = format!("{{ address = \"{}\" }}", s.addr);
    let d = Daemon::start(&config(&p, &servers, &consul_upsync(&url, "")));
    assert_eq!(tags(p.lb(), 2).await, ["static", "static"]);
    assert!(
        d.wait_log_count("discovery fetch failed", 2, Duration::from_secs(3)),
        "{}",
        d.log()
    );
    assert!(d.exited().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_bad_input_keeps_the_last_good_set_serving() {
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let b = Backend::start(Behaviour::Tagged("b".into())).await;
    let c = Backend::start(Behaviour::Tagged("c".into())).await;
    let consul = Consul::start().await;
    consul.put(&key(&a), "");
    consul.put(&key(&b), "");
    let p = Ports::new();
    let d = Daemon::start(&config(&p, "", &consul_upsync(&consul.kv_url(PREFIX), "")));
    let good = |s: &str| s.contains("Backend server counts: 2");
    shows(&d, &p, Duration::from_secs(3), good).await;

    enum Bad {
        Value(&'static str, &'static str),
        Fault(Fault),
    }
    let cases = [
        Bad::Value("10.0.0.1:3306", "{\"weight\": 2,"),
        Bad::Value("10.0.0.1:3306", r#"{"weight":"heavy"}"#),
        Bad::Value("db.example:3306", ""),
        Bad::Value("10.0.0.1", ""),
        Bad::Fault(Fault::BadBase64),
        Bad::Fault(Fault::Status500),
        Bad::Fault(Fault::Garbage),
        Bad::Fault(Fault::Hang),
        Bad::Fault(Fault::Reset),
        Bad::Fault(Fault::Truncated),
        Bad::Fault(Fault::Huge),
    ];
    for case in &cases {
        // Start from a clean state: the last fetch succeeded, so the query in flight
        // was sent before this case's fault.
        let clean = wait_until(Duration::from_secs(5), || last_error_cleared(&p)).await;
        assert!(clean.is_some(), "source did not recover; log:\n{}", d.log());
        let errors = metric(&p, "discovery_errors");
        let bad_data = metric(&p, "discovery_bad_data");
        let expect_bad_data = matches!(
            case,
            Bad::Value(..) | Bad::Fault(Fault::BadBase64 | Fault::Garbage)
        );
        let label = match case {
            Bad::Value(k, v) => {
                consul.put(&format!("{PREFIX}{k}"), v);
                format!("key {k} = {v:?}")
            }
            Bad::Fault(f) => {
                consul.set_fault(*f);
                consul.bump();
                format!("{f:?}")
            }
        };
        let seen = wait_until(Duration::from_secs(5), || {
            metric(&p, "discovery_errors") > errors
                && (!expect_bad_data || metric(&p, "discovery_bad_data") > bad_data)
        })
        .await;
        assert!(
            seen.is_some(),
            "{label}: no error counted; log:\n{}",
            d.log()
        );
        assert!(
            good(&show(p.show(), "db")),
            "{label}: set changed:\n{}",
            show(p.show(), "db")
        );
        let t = tags(p.lb(), 4).await;
        assert!(
            count(&t, "a") == 2 && count(&t, "b") == 2,
            "{label}: traffic {t:?}"
        );
        match case {
            Bad::Value(k, _) => {
                assert!(
                    d.log().contains(&format!("{PREFIX}{k}")),
                    "{label}: key not named in the log"
                );
                consul.delete(&format!("{PREFIX}{k}"));
            }
            Bad::Fault(Fault::Status500) => {
                // At most one request per interval (300ms) while the source fails.
                let before = consul.reads();
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let reads = consul.reads() - before;
                assert!(reads <= 7, "{reads} requests in 1.5s while failing");
                consul.set_fault(Fault::None);
            }
            Bad::Fault(_) => consul.set_fault(Fault::None),
        }
    }
    consul.put(&key(&c), "");
    shows(&d, &p, Duration::from_secs(3), |s| {
        s.contains("Backend server counts: 3")
    })
    .await;
    let t = tags(p.lb(), 6).await;
    assert!(count(&t, "c") == 2, "recovered: {t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_busy_loop_when_the_index_does_not_move() {
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let consul = Consul::start().await;
    consul.put(&key(&a), "");
    let p = Ports::new();
    let d = Daemon::start(&config(&p, "", &consul_upsync(&consul.kv_url(PREFIX), "")));
    shows(&d, &p, Duration::from_secs(3), |s| {
        s.contains("Backend server counts: 1")
    })
    .await;

    // Idle blocking queries: one per wait (1s).
    let before = consul.reads();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = consul.reads() - before;
    assert!(idle <= 3, "{idle} requests in 2s of blocking queries");

    // An agent that answers at once with the same index: paced by interval (300ms).
    consul.set_no_block(true);
    consul.bump();
    let before = consul.reads();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let eager = consul.reads() - before;
    assert!(
        (2..=9).contains(&eager),
        "{eager} requests in 2s against a non-blocking agent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_going_backwards_resets_and_follows_at_once() {
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let b = Backend::start(Behaviour::Tagged("b".into())).await;
    let c = Backend::start(Behaviour::Tagged("c".into())).await;
    let consul = Consul::start().await;
    for i in 0..20 {
        consul.put(&format!("other/{i}"), "");
    }
    consul.put(&key(&a), "");
    let p = Ports::new();
    let upsync =
        consul_upsync(&consul.kv_url(PREFIX), "").replace("timeout = \"1s\"", "timeout = \"3s\"");
    let d = Daemon::start(&config(&p, "", &upsync));
    shows(&d, &p, Duration::from_secs(3), |s| {
        s.contains("Backend server counts: 1")
    })
    .await;

    // A restored snapshot: the index drops to 2.
    consul.set_index(1);
    consul.put(&key(&b), "");
    shows(&d, &p, Duration::from_secs(6), |s| {
        s.contains(&b.addr.to_string())
    })
    .await;
    // Having reset, the client blocks on the new, low index, so the next change shows
    // at once instead of after a 3s wait.
    tokio::time::sleep(Duration::from_millis(500)).await;
    consul.put(&key(&c), "");
    let took = shows(&d, &p, Duration::from_secs(6), |s| {
        s.contains(&c.addr.to_string())
    })
    .await;
    assert!(
        took < Duration::from_secs(1),
        "change after an index reset took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_token_is_sent_and_never_logged() {
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let b = Backend::start(Behaviour::Tagged("b".into())).await;
    let secret = "6f1b0d0e-secret-token-9a7c";
    let consul = Consul::start().await;
    consul.require_token(Some(secret));
    consul.put(&key(&a), "");
    let p = Ports::new();
    let upsync = consul_upsync(
        &consul.kv_url(PREFIX),
        "token_env = \"L4LB_TEST_CONSUL_TOKEN\"\nconsistency = \"stale\"",
    );
    let d = Daemon::start_with_env(
        &config(&p, "", &upsync),
        &[("L4LB_TEST_CONSUL_TOKEN", secret)],
    );
    shows(&d, &p, Duration::from_secs(3), |s| {
        s.contains(&a.addr.to_string())
    })
    .await;
    assert_eq!(consul.last_token().as_deref(), Some(secret));

    consul.require_token(Some("another-token"));
    consul.bump();
    assert!(
        d.wait_log("HTTP status 403", Duration::from_secs(3)),
        "{}",
        d.log()
    );
    consul.put(&key(&b), "");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        show(p.show(), "db").contains("Backend server counts: 1"),
        "denied reads changed the set"
    );
    consul.require_token(Some(secret));
    consul.bump();
    shows(&d, &p, Duration::from_secs(3), |s| {
        s.contains(&b.addr.to_string())
    })
    .await;
    let (_, api) = http_get(p.admin(), "/api/upstreams");
    assert!(
        !d.log().contains(secret) && !api.contains(secret),
        "token leaked"
    );
}

/// A redirect is not followed: it would carry the ACL token header to wherever it
/// points (reqwest drops only standard credential headers on a redirect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_does_not_follow_a_redirect() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let secret = "7d2c-secret-redirected";
    let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let elsewhere_addr = elsewhere.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let log = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = elsewhere.accept().await {
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap_or(0);
            log.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let redirector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redirector_addr = redirector.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = redirector.accept().await {
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            let answer = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://{elsewhere_addr}/v1/kv/{PREFIX}?recurse\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = s.write_all(answer.as_bytes()).await;
        }
    });
    let p = Ports::new();
    let upsync = consul_upsync(
        &format!("http://{redirector_addr}/v1/kv/{PREFIX}"),
        "token_env = \"L4LB_TEST_CONSUL_TOKEN\"",
    );
    let d = Daemon::start_with_env(
        &config(&p, "", &upsync),
        &[("L4LB_TEST_CONSUL_TOKEN", secret)],
    );
    assert!(
        d.wait_log("HTTP status 307", Duration::from_secs(3)),
        "{}",
        d.log()
    );
    assert!(
        seen.lock().unwrap().is_empty(),
        "followed the redirect: {}",
        seen.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_health_follows_passing_instances() {
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let b = Backend::start(Behaviour::Tagged("b".into())).await;
    let c = Backend::start(Behaviour::Tagged("c".into())).await;
    let inst = |be: &Backend, node_addr: bool, weight: Option<u32>, passing: bool| Instance {
        node: format!("node-{}", be.addr.port()),
        node_addr: "127.0.0.1".into(),
        service_addr: if node_addr {
            String::new()
        } else {
            "127.0.0.1".into()
        },
        port: be.addr.port(),
        weight,
        passing,
    };
    let consul = Consul::start().await;
    consul.set_service(
        "mysql",
        vec![
            inst(&a, true, Some(3), true),
            inst(&b, false, None, true),
            inst(&c, false, None, false),
        ],
    );
    let p = Ports::new();
    let upsync = format!(
        "type = \"consul_health\"\nurl = \"{}\"\ninterval = \"300ms\"\ntimeout = \"1s\"",
        consul.health_url("mysql")
    );
    let d = Daemon::start(&config(&p, "", &upsync));
    shows(&d, &p, Duration::from_secs(3), |s| {
        s.contains(&format!("{} weight=3", a.addr))
            && s.contains(&format!("{} weight=1", b.addr))
            && !s.contains(&c.addr.to_string())
    })
    .await;
    let t = tags(p.lb(), 8).await;
    assert_eq!((count(&t, "a"), count(&t, "b")), (6, 2), "{t:?}");

    consul.set_service(
        "mysql",
        vec![
            inst(&a, true, Some(3), false),
            inst(&b, false, None, true),
            inst(&c, false, None, true),
        ],
    );
    let took = shows(&d, &p, Duration::from_secs(1), |s| {
        !s.contains(&a.addr.to_string())
            && s.contains(&b.addr.to_string())
            && s.contains(&c.addr.to_string())
    })
    .await;
    println!("consul_health update latency: {took:?}");
    let t = tags(p.lb(), 4).await;
    assert_eq!((count(&t, "b"), count(&t, "c")), (2, 2), "{t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_restarts_only_changed_sources_and_stops_removed_ones() {
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let b = Backend::start(Behaviour::Tagged("b".into())).await;
    let consul = Consul::start().await;
    consul.put(&format!("up/one/{}", a.addr), "");
    consul.put(&format!("up/two/{}", a.addr), "");
    consul.put(&format!("up/three/{}", b.addr), "");
    let show_port = free_port();
    let cfg = |two: &str, with_two: bool| {
        let mut c = format!("[global]\nsplice = \"off\"\n\n[[server]]\nlisten = \"127.0.0.1:{show_port}\"\nupstream_show = true\n");
        let mut names = vec![("one", "up/one/")];
        if with_two {
            names.push(("two", two));
        }
        for (name, prefix) in names {
            c.push_str(&format!(
                "\n[upstream.{name}.upsync]\ntype = \"consul\"\nurl = \"{}\"\ninterval = \"300ms\"\ntimeout = \"1s\"\n",
                consul.kv_url(prefix)
            ));
        }
        c
    };
    let d = Daemon::start(&cfg("up/two/", true));
    let show_addr: SocketAddr = format!("127.0.0.1:{show_port}").parse().unwrap();
    let started = |d: &Daemon, name: &str| {
        d.log()
            .lines()
            .filter(|l| l.contains("discovery started") && l.contains(&format!("upstream={name} ")))
            .count()
    };
    assert!(wait_until(Duration::from_secs(3), || show(show_addr, "two")
        .contains(&a.addr.to_string()))
    .await
    .is_some());

    d.reload(&cfg("up/three/", true));
    assert!(
        wait_until(Duration::from_secs(2), || show(show_addr, "two")
            .contains(&b.addr.to_string()))
        .await
        .is_some(),
        "{}",
        d.log()
    );
    assert_eq!(
        (started(&d, "one"), started(&d, "two")),
        (1, 2),
        "{}",
        d.log()
    );
    assert!(
        show(show_addr, "one").contains(&a.addr.to_string()),
        "unchanged upstream kept its discovered set"
    );

    // A source that cannot be built rejects the reload: discovery goes on as it was.
    d.reload(&cfg("up/three/", true).replace("/v1/kv/up/three/", "/up/three/"));
    assert!(
        d.wait_log("reload rejected", Duration::from_secs(2)),
        "{}",
        d.log()
    );
    assert!(d.log().contains("upstream two: upsync"), "{}", d.log());
    consul.put(&format!("up/three/{}", a.addr), "");
    assert!(
        wait_until(Duration::from_secs(2), || show(show_addr, "two")
            .contains(&a.addr.to_string()))
        .await
        .is_some(),
        "{}",
        d.log()
    );
    assert_eq!((started(&d, "one"), started(&d, "two")), (1, 2));

    d.reload(&cfg("", false));
    assert!(
        d.wait_log("discovery stopped upstream=two", Duration::from_secs(2)),
        "{}",
        d.log()
    );
    assert_eq!(started(&d, "one"), 1);
    let begin = Instant::now();
    consul.put(&format!("up/one/{}", b.addr), "");
    assert!(wait_until(Duration::from_secs(1), || show(show_addr, "one")
        .contains(&b.addr.to_string()))
    .await
    .is_some());
    assert!(begin.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_and_a_client_certificate() {
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let dir = tempfile::tempdir().unwrap();
    let certs = support::tls::Certs::generate(dir.path());
    let consul = Consul::start().await;
    consul.put(&key(&a), "");
    consul.put(&format!("upstreams/nocert/{}", a.addr), "");
    let tls = support::tls::Terminator::start(consul.addr, &certs).await;
    let url = |prefix: &str| format!("https://127.0.0.1:{}/v1/kv/{prefix}", tls.addr.port());
    let p = Ports::new();
    let with_cert = format!(
        "ca_file = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"",
        certs.ca.display(),
        certs.client_cert.display(),
        certs.client_key.display()
    );
    let mut cfg = config(&p, "", &consul_upsync(&url(PREFIX), &with_cert));
    cfg.push_str(&format!(
        "\n[upstream.nocert.upsync]\n{}\n",
        consul_upsync(
            &url("upstreams/nocert/"),
            &format!("ca_file = \"{}\"", certs.ca.display())
        )
    ));
    let d = Daemon::start(&cfg);
    shows(&d, &p, Duration::from_secs(3), |s| {
        s.contains(&a.addr.to_string())
    })
    .await;
    assert_eq!(tags(p.lb(), 2).await, ["a", "a"]);
    let refused = d.wait_log(
        "last good server set upstream=nocert",
        Duration::from_secs(3),
    );
    assert!(
        refused,
        "a source without a client certificate was not refused:\n{}",
        d.log()
    );
    assert!(show(p.show(), "nocert").contains("Backend server counts: 0"));
}
