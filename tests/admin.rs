//! The JSON admin API end to end: reads, token-protected changes effective in traffic,
//! and its error answers.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use support::{free_port, http, http_get, tags, wait_until, Backend, Behaviour, Daemon};

const TOKEN: &str = "adm-7c1e-token";

struct Setup {
    lb: SocketAddr,
    admin: SocketAddr,
    d: Daemon,
}

fn config(lb: u16, admin: u16, servers: &str, admin_extra: &str, extra: &str) -> String {
    format!(
        r#"
[global]
splice = "off"

[admin]
listen = "127.0.0.1:{admin}"
{admin_extra}

[upstream.u]
servers = [{servers}]

[[server]]
listen = "127.0.0.1:{lb}"
proxy_pass = "u"
proxy_connect_timeout = "1s"
{extra}
"#
    )
}

fn start(servers: &str, with_token: bool, extra: &str) -> Setup {
    let (lb, admin) = (free_port(), free_port());
    let admin_extra = if with_token {
        "token_env = \"L4LB_TEST_ADMIN_TOKEN\""
    } else {
        ""
    };
    let d = Daemon::start_with_env(
        &config(lb, admin, servers, admin_extra, extra),
        &[("L4LB_TEST_ADMIN_TOKEN", TOKEN)],
    );
    Setup {
        lb: format!("127.0.0.1:{lb}").parse().unwrap(),
        admin: format!("127.0.0.1:{admin}").parse().unwrap(),
        d,
    }
}

fn bearer() -> (&'static str, String) {
    ("Authorization", format!("Bearer {TOKEN}"))
}

fn call(s: &Setup, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (k, v) = bearer();
    let (status, text) = http(
        s.admin,
        method,
        path,
        &[(k, &v), ("Content-Type", "application/json")],
        body,
    );
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn count(tags: &[String], tag: &str) -> usize {
    tags.iter().filter(|t| *t == tag).count()
}

fn server_json(up: &Value, addr: SocketAddr) -> &Value {
    up["servers"]
        .as_array()
        .and_then(|s| s.iter().find(|v| v["address"] == addr.to_string()))
        .unwrap_or_else(|| panic!("{addr} not in {up}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_need_the_bearer_token_reads_do_not() {
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let s = start(&format!("{{ address = \"{}\" }}", a.addr), true, "");
    let path = "/api/upstreams/u/servers/127.0.0.1:9";
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong")],
        vec![("Authorization", TOKEN)],
    ] {
        for method in ["PUT", "PATCH", "DELETE"] {
            let (status, body) = http(s.admin, method, path, &headers, "{}");
            assert_eq!(status, 401, "{method} with {headers:?}: {body}");
        }
    }
    let (status, body) = http_get(s.admin, "/api/upstreams");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["upstreams"]["u"]["servers"][0]["address"],
        a.addr.to_string()
    );
    assert_eq!(v["upstreams"]["u"]["source"], "config");
    assert!(!s.d.log().contains(TOKEN), "token logged");

    // Without a configured token, changes are disabled altogether.
    let s2 = start(&format!("{{ address = \"{}\" }}", a.addr), false, "");
    let (k, v) = bearer();
    let (status, body) = http(s2.admin, "PUT", path, &[(k, &v)], "{}");
    assert_eq!(status, 403, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_drain_reweight_remove_take_effect_in_traffic() {
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let b = Backend::start(Behaviour::Tagged("b".into())).await;
    let s = start(&format!("{{ address = \"{}\" }}", a.addr), true, "");
    assert_eq!(count(&tags(s.lb, 3).await, "a"), 3);

    let (status, up) = call(
        &s,
        "PUT",
        &format!("/api/upstreams/u/servers/{}", b.addr),
        r#"{"weight": 1, "max_fails": 3}"#,
    );
    assert_eq!(status, 201, "{up}");
    assert_eq!(server_json(&up, b.addr)["max_fails"], 3);
    assert_eq!(up["source"], "admin");
    let t = tags(s.lb, 6).await;
    assert_eq!((count(&t, "a"), count(&t, "b")), (3, 3), "{t:?}");

    // An open session, then drain its server: the session continues, new ones avoid it.
    let (tag, mut held) = support::connect_tagged(s.lb).await.unwrap();
    let held_server = if tag == "a" { a.addr } else { b.addr };
    let (status, up) = call(
        &s,
        "PATCH",
        &format!("/api/upstreams/u/servers/{held_server}"),
        r#"{"down": true}"#,
    );
    assert_eq!(status, 200, "{up}");
    assert_eq!(server_json(&up, held_server)["down"], true);
    // Earlier sessions end a moment after their clients close; the held one stays.
    let one_active = wait_until(Duration::from_secs(2), || {
        let (_, body) = http_get(s.admin, "/api/upstreams/u");
        serde_json::from_str::<Value>(&body)
            .is_ok_and(|up| server_json(&up, held_server)["active"] == 1)
    })
    .await;
    assert!(
        one_active.is_some(),
        "{}",
        http_get(s.admin, "/api/upstreams/u").1
    );
    let t = tags(s.lb, 4).await;
    assert_eq!(count(&t, &tag), 0, "drained server got new sessions: {t:?}");
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        held.write_all(b"still here").await.unwrap();
        let mut buf = [0u8; 10];
        held.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"still here");
    }
    drop(held);

    let (status, up) = call(
        &s,
        "PATCH",
        &format!("/api/upstreams/u/servers/{held_server}"),
        r#"{"down": false, "weight": "3"}"#,
    );
    assert_eq!(status, 200, "{up}");
    let t = tags(s.lb, 8).await;
    assert_eq!(count(&t, &tag), 6, "re-weighted 3:1: {t:?}");

    let (status, up) = call(
        &s,
        "DELETE",
        &format!("/api/upstreams/u/servers/{}", b.addr),
        "",
    );
    assert_eq!(status, 200, "{up}");
    assert_eq!(up["servers"].as_array().map(Vec::len), Some(1));
    assert_eq!(count(&tags(s.lb, 3).await, "a"), 3);

    // A reload that leaves the configured servers alone keeps the admin's changes.
    let (status, _) = call(
        &s,
        "PUT",
        &format!("/api/upstreams/u/servers/{}", b.addr),
        "",
    );
    assert_eq!(status, 201);
    let text = std::fs::read_to_string(&s.d.config_path).unwrap().replace(
        "proxy_connect_timeout = \"1s\"",
        "proxy_connect_timeout = \"2s\"",
    );
    s.d.reload(&text);
    let (_, body) = http_get(s.admin, "/api/upstreams/u");
    assert!(
        body.contains(&b.addr.to_string()),
        "admin change lost on reload: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_field_and_the_missing_thing() {
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let extra = r#"
[upstream.synced.upsync]
type = "consul"
url = "http://127.0.0.1:9/v1/kv/upstreams/synced/"
"#;
    let s = start(&format!("{{ address = \"{}\" }}", a.addr), true, extra);
    let p = |addr: &str| format!("/api/upstreams/u/servers/{addr}");

    let (status, v) = call(&s, "PUT", &p("127.0.0.1:9"), "{\"weight\": ");
    assert_eq!((status, v["field"].as_str()), (400, Some("(body)")), "{v}");
    let (status, v) = call(&s, "PUT", &p("127.0.0.1:9"), r#"{"weight": "x"}"#);
    assert_eq!((status, v["field"].as_str()), (400, Some("weight")), "{v}");
    assert!(v["error"].as_str().unwrap().contains("weight"), "{v}");
    let (status, v) = call(&s, "PUT", &p("127.0.0.1:9"), r#"{"weight": 0}"#);
    assert_eq!((status, v["field"].as_str()), (400, Some("weight")), "{v}");
    let (status, v) = call(&s, "PATCH", &p(&a.addr.to_string()), r#"{"dwon": true}"#);
    assert_eq!((status, v["field"].as_str()), (400, Some("dwon")), "{v}");
    let (status, v) = call(&s, "PUT", &p("not-an-address"), "{}");
    assert_eq!((status, v["field"].as_str()), (400, Some("address")), "{v}");

    let (status, v) = call(&s, "PUT", "/api/upstreams/nope/servers/127.0.0.1:9", "{}");
    assert_eq!(status, 404, "{v}");
    let (status, _) = http_get(s.admin, "/api/upstreams/nope");
    assert_eq!(status, 404);
    let (status, v) = call(&s, "PATCH", &p("127.0.0.1:9"), r#"{"down": true}"#);
    assert_eq!(status, 404, "{v}");
    let (status, v) = call(&s, "DELETE", &p("127.0.0.1:9"), "");
    assert_eq!(status, 404, "{v}");

    let (status, v) = call(&s, "PUT", "/api/upstreams/synced/servers/127.0.0.1:9", "{}");
    assert_eq!(status, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("upsync"), "{v}");

    // Oversized bodies, undecodable paths and unknown endpoints answer in the same JSON.
    let huge = format!("{{\"weight\": 1, \"pad\": \"{}\"}}", "x".repeat(100_000));
    let (status, v) = call(&s, "PUT", &p("127.0.0.1:9"), &huge);
    assert_eq!(status, 413, "{v}");
    assert!(v["error"].is_string(), "{v}");
    let (status, v) = call(&s, "PUT", "/api/upstreams/%FF/servers/127.0.0.1:9", "{}");
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].is_string(), "{v}");
    let (status, v) = call(&s, "GET", "/api/nothing-here", "");
    assert_eq!(status, 404, "{v}");
    assert!(v["error"].is_string(), "{v}");

    // Nothing of that changed the set.
    assert_eq!(count(&tags(s.lb, 2).await, "a"), 2);

    let m = support::scrape(s.admin);
    let accepted = support::metric(&m, "l4lb_accepted_total", &[]);
    assert!(accepted >= Some(2.0), "{accepted:?}");
    let errors = support::metric(&m, "l4lb_discovery_errors_total", &[("upstream", "synced")]);
    assert!(errors.is_some(), "{:?}", m.samples);
    let ok = wait_until(Duration::from_secs(3), || {
        let (_, body) = http_get(s.admin, "/api/upstreams/synced");
        serde_json::from_str::<Value>(&body).is_ok_and(|v| {
            v["upsync"]["errors"].as_u64() > Some(0) && v["upsync"]["last_error"].is_string()
        })
    })
    .await;
    assert!(
        ok.is_some(),
        "upsync status not shown: {}",
        http_get(s.admin, "/api/upstreams/synced").1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_moves_on_reload() {
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let s = start(&format!("{{ address = \"{}\" }}", a.addr), true, "");
    let new_port = free_port();
    let text = std::fs::read_to_string(&s.d.config_path).unwrap().replace(
        &format!("127.0.0.1:{}", s.admin.port()),
        &format!("127.0.0.1:{new_port}"),
    );
    s.d.reload(&text);
    let new: SocketAddr = format!("127.0.0.1:{new_port}").parse().unwrap();
    let moved = wait_until(Duration::from_secs(2), || {
        std::net::TcpStream::connect(new).is_ok()
    })
    .await;
    assert!(moved.is_some(), "{}", s.d.log());
    assert_eq!(http_get(new, "/api/upstreams/u").0, 200);
    let closed = wait_until(Duration::from_secs(2), || {
        std::net::TcpStream::connect(s.admin).is_err()
    })
    .await;
    assert!(closed.is_some(), "old admin listener still open");
}

/// What a raw HTTP/1.1 GET on a fresh connection gets back before the server closes it
/// (empty when it closed without answering).
fn raw_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    // A refused connection may be closed before the request is written.
    let _ = c.write_all(req.as_bytes());
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_show_obeys_access_and_the_admin_api_caps_its_connections() {
    let a = Backend::start(Behaviour::Tagged("a".into())).await;
    let (open, denied) = (free_port(), free_port());
    let show = format!(
        "\n[[server]]\nlisten = \"127.0.0.1:{open}\"\nupstream_show = true\n\n\
         [[server]]\nlisten = \"127.0.0.1:{denied}\"\nupstream_show = true\naccess = [\"deny 127.0.0.0/8\"]\n"
    );
    let s = start(&format!("{{ address = \"{}\" }}", a.addr), false, "");
    let text = std::fs::read_to_string(&s.d.config_path).unwrap() + &show;
    s.d.reload(&text);
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let served = wait_until(Duration::from_secs(5), || {
        std::net::TcpStream::connect(at(denied)).is_ok()
    })
    .await;
    assert!(served.is_some(), "{}", s.d.log());
    let answer = raw_get(at(open), "/upstream_show");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(&a.addr.to_string()), "{answer}");
    // The block's access rules apply as on a proxy listener: closed, nothing shown.
    assert_eq!(raw_get(at(denied), "/upstream_show"), "", "{}", s.d.log());

    // 64 idle connections fill the admin API; the next one is closed unanswered, and
    // once they go a request is served again.
    let idle: Vec<_> = (0..64)
        .map(|_| std::net::TcpStream::connect(s.admin).expect("connect"))
        .collect();
    let full = wait_until(Duration::from_secs(5), || {
        raw_get(s.admin, "/api/upstreams/u").is_empty()
    })
    .await;
    assert!(full.is_some(), "a 65th connection was served");
    drop(idle);
    let again = wait_until(Duration::from_secs(5), || {
        raw_get(s.admin, "/api/upstreams/u").starts_with("HTTP/1.1 200")
    })
    .await;
    assert!(again.is_some(), "{}", s.d.log());
}
