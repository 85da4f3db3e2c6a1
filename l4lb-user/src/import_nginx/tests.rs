use std::path::Path;
use std::sync::Arc;

use super::lexer::{tokenize, Token};
use super::parser::{self, Directive};
use super::{import, ImportError, Imported};
use crate::config::{self, Balance, Protocol, ProxyProtocol, UpsyncKind};

fn parse(text: &str) -> (Vec<Directive>, Vec<ImportError>) {
    let file: Arc<Path> = Arc::from(Path::new("t.conf"));
    let mut errors = Vec::new();
    let d = parser::parse(text, &file, &mut errors);
    (d, errors)
}

fn messages(errors: &[ImportError]) -> Vec<String> {
    errors.iter().map(ToString::to_string).collect()
}

/// Writes `files` (name, text) into a temporary directory and imports the first.
fn import_files(files: &[(&str, &str)]) -> (tempfile::TempDir, Result<Imported, Vec<String>>) {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }
    let result = import(&dir.path().join(files[0].0)).map_err(|e| {
        e.0.iter()
            .map(|e| {
                e.to_string()
                    .replace(&format!("{}/", dir.path().display()), "")
            })
            .collect()
    });
    (dir, result)
}

fn convert(text: &str) -> Imported {
    let (_dir, r) = import_files(&[("nginx.conf", text)]);
    r.unwrap_or_else(|e| panic!("conversion failed: {e:#?}"))
}

fn convert_err(text: &str) -> Vec<String> {
    let (_dir, r) = import_files(&[("nginx.conf", text)]);
    match r {
        Ok(i) => panic!("converted, expected errors:\n{}", i.toml),
        Err(e) => e,
    }
}

/// The output as l4lb's own loader reads it.
fn load(i: &Imported) -> config::Config {
    config::parse(&i.toml).unwrap_or_else(|e| panic!("l4lb rejects the output: {e:#?}\n{}", i.toml))
}

fn notes(i: &Imported) -> Vec<String> {
    i.notes.iter().map(ToString::to_string).collect()
}

// ---- tokenizer and parser ----

#[test]
fn words_quotes_and_escapes() {
    let (d, e) = parse(r#"a "b c" 'd\'e' "x\"y\\z" 'tab\t' plain\;still;"#);
    assert!(e.is_empty(), "{e:?}");
    assert_eq!(d[0].name, "a");
    // A backslash keeps `;` in a bare word, and is itself kept (nginx unescapes only
    // quotes, backslash, t, r and n).
    assert_eq!(
        d[0].args,
        ["b c", "d'e", "x\"y\\z", "tab\t", "plain\\;still"]
    );
}

#[test]
fn comments_only_where_a_word_starts() {
    let (d, e) = parse("# whole line\nfoo bar; # after\nkey a#b;\n");
    assert!(e.is_empty(), "{e:?}");
    assert_eq!(d.len(), 2);
    assert_eq!((d[0].name.as_str(), d[0].loc.line), ("foo", 2));
    assert_eq!(d[1].args, ["a#b"]);
    assert_eq!(d[1].loc.line, 3);
}

#[test]
fn variables_with_braces_stay_one_word() {
    let (d, e) = parse("hash ${remote_addr}x;\n");
    assert!(e.is_empty(), "{e:?}");
    assert_eq!(d[0].args, ["${remote_addr}x"]);
}

#[test]
fn nested_blocks_keep_lines() {
    let text = "stream {\n  upstream db {\n    server 127.0.0.1:1;\n  }\n\n  server { listen 1; proxy_pass db; }\n}\n";
    let (d, e) = parse(text);
    assert!(e.is_empty(), "{e:?}");
    let stream = &d[0];
    assert_eq!((stream.name.as_str(), stream.loc.line), ("stream", 1));
    let inner = stream.block.as_ref().expect("block");
    assert_eq!(inner[0].args, ["db"]);
    let servers = inner[0].block.as_ref().expect("upstream block");
    assert_eq!(
        (servers[0].name.as_str(), servers[0].loc.line),
        ("server", 3)
    );
    let server = inner[1].block.as_ref().expect("server block");
    assert_eq!(server.len(), 2);
    assert!(server.iter().all(|x| x.loc.line == 6));
    assert_eq!(inner[1].block.as_ref().map(Vec::len), Some(2));
}

#[test]
fn string_across_lines_counts_lines() {
    let (d, e) = parse("a \"x\ny\";\nb;\n");
    assert!(e.is_empty(), "{e:?}");
    assert_eq!(d[0].args, ["x\ny"]);
    assert_eq!(d[1].loc.line, 3);
}

#[test]
fn missing_semicolon_before_close_is_named() {
    let (_, e) = parse("stream {\n  server {\n    listen 3307\n  }\n}\n");
    assert_eq!(
        messages(&e),
        ["t.conf:3: listen: missing \";\" (the block closes on line 4 first)"]
    );
}

#[test]
fn missing_close_names_the_block_and_its_line() {
    let (_, e) = parse("stream {\n  upstream db {\n    server 1.1.1.1:1;\n");
    assert_eq!(
        messages(&e),
        [
            "t.conf:2: upstream: block is not closed: unexpected end of file, expecting \"}\"",
            "t.conf:1: stream: block is not closed: unexpected end of file, expecting \"}\"",
        ]
    );
}

#[test]
fn every_syntax_error_is_reported() {
    let (_, e) = parse("a;\n}\n;\nb {\n  c\n}\nd");
    assert_eq!(
        messages(&e),
        [
            "t.conf:2: (syntax): unexpected \"}\"",
            "t.conf:3: (syntax): unexpected \";\"",
            "t.conf:5: c: missing \";\" (the block closes on line 6 first)",
            "t.conf:7: d: unexpected end of file, expecting \";\"",
        ]
    );
}

#[test]
fn unterminated_string_and_junk_after_quote() {
    let e = tokenize("a;\nb \"open\n\n").expect_err("unterminated");
    assert_eq!(e.line, 2);
    let e = tokenize("a \"x\"y;").expect_err("junk");
    assert!(e.message.contains("unexpected \"y\""), "{}", e.message);
    let t = tokenize("a{b}").expect("tokens");
    assert_eq!(
        t.iter().map(|t| t.token.clone()).collect::<Vec<_>>(),
        [
            Token::Word("a".into()),
            Token::Open,
            Token::Word("b}".into()),
        ]
    );
}

#[test]
fn include_with_glob_relative_to_the_main_file() {
    let (dir, r) = import_files(&[
        (
            "nginx.conf",
            "events { worker_connections 100; }\nstream {\n  include conf.d/*.conf;\n  include empty.d/*.conf;\n}\n",
        ),
        // Nested includes are relative to the main file's directory too, as in nginx.
        ("conf.d/b.conf", "server { listen 2; proxy_pass db; include snippets/t.conf; }\n"),
        ("conf.d/a.conf", "upstream db {\n  server 127.0.0.1:9;\n}\n"),
        ("snippets/t.conf", "\n\nproxy_timeout 5s;\n"),
        // A hidden file: glob(3) does not match it, nor does the import.
        ("conf.d/.hidden.conf", "garbage"),
    ]);
    let i = r.expect("converts");
    let names: Vec<String> = i
        .files
        .iter()
        .map(|f| {
            f.strip_prefix(dir.path())
                .expect("in dir")
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(
        names,
        [
            "nginx.conf",
            "conf.d/a.conf",
            "conf.d/b.conf",
            "snippets/t.conf"
        ]
    );
    assert!(i.toml.contains("conf.d/a.conf:1"), "{}", i.toml);
    assert!(
        i.toml
            .contains("proxy_timeout = \"5s\"  # proxy_timeout 5s (")
            && i.toml.contains("snippets/t.conf:3)"),
        "{}",
        i.toml
    );
    let c = load(&i);
    assert_eq!(c.servers[0].proxy_timeout.as_secs(), 5);
}

#[test]
fn include_errors_name_the_include() {
    let (_dir, r) = import_files(&[
        (
            "nginx.conf",
            "stream {\n  include missing.conf;\n  include loop.conf;\n}\n",
        ),
        ("loop.conf", "include loop.conf;\n"),
    ]);
    let e = r.expect_err("errors");
    assert!(
        e[0].starts_with("nginx.conf:2: include: cannot read "),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("loop.conf:1: include: ") && m.contains("includes itself")),
        "{e:?}"
    );
}

// ---- conversion ----

const MYSQL: &str = r#"
user nginx;
worker_processes 2;
error_log /var/log/nginx/error.log warn;
pid /run/nginx.pid;
events { worker_connections 1024; }
http { server { listen 80; } }
stream {
    proxy_connect_timeout 1s;
    proxy_timeout 3s;
    upstream mysql_backend {
        least_conn;
        server 127.0.0.1:3306 weight=2 max_fails=2 fail_timeout=10s;
        server 127.0.0.2:3306 max_fails=2 fail_timeout=10s backup;
        server 127.0.0.3:3306 down max_conns=10;
    }
    server {
        listen 3307;
        proxy_pass mysql_backend;
        proxy_timeout 1m;
        proxy_next_upstream on;
        proxy_next_upstream_tries 3;
        proxy_next_upstream_timeout 10s;
        proxy_upload_rate 1m;
        proxy_download_rate 512k;
        proxy_protocol on;
        proxy_buffer_size 16k;
        tcp_nodelay on;
    }
}
"#;

#[test]
fn classic_mysql_setup() {
    let i = convert(MYSQL);
    let c = load(&i);
    assert_eq!(c.global.worker_threads, Some(2));
    // 1024 per worker x 2 workers, halved: each session holds two connections in nginx.
    assert_eq!(c.global.max_connections, 1024);
    assert_eq!(c.global.log_level, "warn");
    assert_eq!(c.global.access_log, crate::config::AccessLog::Off);
    let u = &c.upstreams["mysql_backend"];
    assert_eq!(u.balance, Balance::LeastConn);
    assert_eq!(u.servers.len(), 3);
    assert_eq!((u.servers[0].weight, u.servers[0].max_fails), (2, 2));
    assert!(u.servers[1].backup && u.servers[2].down);
    assert_eq!(u.servers[2].max_conns, 10);
    let s = &c.servers[0];
    assert_eq!(s.listen.to_string(), "0.0.0.0:3307");
    assert_eq!(s.proxy_connect_timeout.as_secs(), 1);
    assert_eq!(s.proxy_timeout.as_secs(), 60, "the server's own value wins");
    assert_eq!(s.proxy_next_upstream_tries, 3);
    assert_eq!(s.proxy_next_upstream_timeout.as_secs(), 10);
    assert_eq!(
        (s.proxy_upload_rate, s.proxy_download_rate),
        (1 << 20, 512 << 10)
    );
    assert_eq!(s.proxy_protocol, ProxyProtocol::V1);
    // Only the parameters given are written.
    assert!(
        i.toml
            .contains("{ address = \"127.0.0.3:3306\", down = true, max_conns = 10 },  # "),
        "{}",
        i.toml
    );
    assert!(i
        .toml
        .contains("proxy_connect_timeout = \"1s\"  # proxy_connect_timeout 1s ("));
    assert!(i.toml.contains(", from stream"));
    let n = notes(&i);
    for ignored in [
        "user",
        "pid",
        "http",
        "proxy_buffer_size",
        "tcp_nodelay",
        "error_log",
    ] {
        assert!(
            n.iter()
                .any(|x| x.contains(&format!(": {ignored}: ignored: "))),
            "{ignored} not reported: {n:#?}"
        );
    }
    assert!(i
        .toml
        .starts_with("# l4lb configuration converted from nginx"));
    assert!(
        i.toml.contains("#   ") && i.toml.contains("user: ignored: "),
        "{}",
        i.toml
    );
}

#[test]
fn upsync_consul() {
    let i = convert(
        r#"stream {
    upstream test {
        upsync 127.0.0.1:8500/v1/kv/upstreams/test upsync_timeout=6m upsync_interval=500ms upsync_type=consul strong_dependency=off;
        upsync_dump_path /var/lib/l4lb/servers_test.conf;
        include /var/lib/l4lb/servers_test.conf;
        server 127.0.0.1:1111;
    }
    server { listen 127.0.0.1:12345; proxy_pass test; }
    server { listen 2345; upstream_show; }
}"#,
    );
    let c = load(&i);
    let u = &c.upstreams["test"];
    assert_eq!(u.servers.len(), 1, "the placeholder is the bootstrap set");
    let up = u.upsync.as_ref().expect("upsync");
    assert_eq!(up.kind, UpsyncKind::Consul);
    assert_eq!(up.url, "http://127.0.0.1:8500/v1/kv/upstreams/test");
    assert_eq!(up.interval.as_millis(), 500);
    assert_eq!(up.timeout.as_secs(), 360);
    assert!(!up.strong_dependency);
    assert_eq!(
        up.dump_path.as_deref(),
        Some(Path::new("/var/lib/l4lb/servers_test.conf"))
    );
    assert!(c.servers[1].upstream_show);
    assert_eq!(c.servers[1].listen.to_string(), "0.0.0.0:2345");
    assert!(
        notes(&i)
            .iter()
            .any(|n| n.contains(": include: ignored: the upsync dump file")),
        "{:#?}",
        i.notes
    );
}

#[test]
fn upsync_etcd_keeps_the_v2_key_names() {
    let i = convert(
        "stream { upstream t { upsync 10.0.0.1:2379/v2/keys/upstreams/t upsync_type=etcd; }\nserver { listen 1; proxy_pass t; } }",
    );
    let c = load(&i);
    let up = c.upstreams["t"].upsync.as_ref().expect("upsync");
    assert_eq!(up.kind, UpsyncKind::Etcd);
    assert_eq!(up.url, "http://10.0.0.1:2379//upstreams/t");
    assert!(notes(&i)
        .iter()
        .any(|n| n.contains("upsync: note: l4lb reads etcd's v3 API")));
    assert!(i.toml.contains("nginx-upsync dumps to /tmp/servers_t.conf"));
}

#[test]
fn balancing_methods() {
    let i = convert(
        "stream {\nupstream h { hash $remote_addr consistent; server 127.0.0.1:1; }\nupstream p { hash $remote_addr; server 127.0.0.1:1; }\nupstream r { random two least_conn; server 127.0.0.1:1; }\nupstream q { random; server 127.0.0.1:1; }\nserver { listen 1; proxy_pass h; }\n}",
    );
    let c = load(&i);
    assert_eq!(c.upstreams["h"].balance, Balance::Hash { consistent: true });
    assert_eq!(
        c.upstreams["p"].balance,
        Balance::Hash { consistent: false }
    );
    assert_eq!(c.upstreams["r"].balance, Balance::Random { two: true });
    assert_eq!(c.upstreams["q"].balance, Balance::Random { two: false });
    let e = convert_err(
        "stream {\nupstream h { hash $remote_port; server 127.0.0.1:1; }\nupstream r { random two least_time=connect; server 127.0.0.1:1; }\nupstream x { least_conn; hash $remote_addr; server 127.0.0.1:1; }\nserver { listen 1; proxy_pass h; }\n}",
    );
    assert_eq!(e.len(), 3, "{e:#?}");
    assert!(e[0].starts_with(
        "nginx.conf:2: hash: \"$remote_port\": l4lb hashes on the client address only"
    ));
    assert!(e[1].starts_with("nginx.conf:3: random: "));
    assert!(e[2].starts_with("nginx.conf:4: hash: load balancing method redefined"));
}

/// nginx without `set_real_ip_from` keeps the peer's address; l4lb then believes every
/// header: the import says so rather than change who gets in silently.
#[test]
fn a_proxy_protocol_listen_without_set_real_ip_from_is_noted() {
    let i = convert(
        "stream {\nupstream db { server 127.0.0.1:3306; }\nserver { listen 3307 proxy_protocol; allow 10.0.0.5; deny all; proxy_pass db; }\n}",
    );
    assert!(
        notes(&i).iter().any(|n| n.contains("set_real_ip_from")),
        "{:?}",
        notes(&i)
    );
    let with = convert(
        "stream {\nset_real_ip_from 10.0.0.5;\nupstream db { server 127.0.0.1:3306; }\nserver { listen 3307 proxy_protocol; proxy_pass db; }\n}",
    );
    assert!(
        !notes(&with)
            .iter()
            .any(|n| n.contains("believes every peer")),
        "{:?}",
        notes(&with)
    );
}

/// Without a zone nginx keeps max_conns per worker: the import says l4lb counts once.
#[test]
fn max_conns_without_a_zone_is_noted() {
    let text = |zone: &str| {
        format!("stream {{\nupstream db {{ {zone} server 127.0.0.1:3306 max_conns=100; }}\nserver {{ listen 3307; proxy_pass db; }}\n}}")
    };
    let noted = |i: &Imported| notes(i).iter().any(|n| n.contains("each worker process"));
    assert!(
        noted(&convert(&text(""))),
        "{:?}",
        notes(&convert(&text("")))
    );
    assert!(!noted(&convert(&text("zone db 64k;"))));
}

/// nginx finds upstreams without regard to case, and reads `)` after a quoted string
/// as the start of the next word (an http block's `if`, skipped, must not fail it).
#[test]
fn upstream_names_ignore_case_and_a_paren_may_follow_a_quote() {
    let i = convert(
        "http {\nserver { if ($request_method = 'OPTIONS') { return 204; } }\n}\nstream {\nupstream Backend { server 127.0.0.1:3306; }\nserver { listen 3307; proxy_pass backend; }\n}",
    );
    let c = load(&i);
    assert_eq!(c.servers[0].proxy_pass.as_deref(), Some("Backend"));
    let e = convert_err(
        "stream {\nupstream db { server 127.0.0.1:1; }\nupstream DB { server 127.0.0.1:2; }\nserver { listen 3307; proxy_pass db; }\n}",
    );
    assert!(e.iter().any(|m| m.contains("duplicate")), "{e:?}");
}

#[test]
fn upstream_show_behind_a_proxy_protocol_listen_is_refused() {
    let e = convert_err("stream {\nserver { listen 2345 proxy_protocol; upstream_show; }\n}");
    assert_eq!(e.len(), 1, "{e:#?}");
    assert!(
        e[0].starts_with("nginx.conf:2: upstream_show: reads HTTP, not a PROXY header"),
        "{e:#?}"
    );
}

#[test]
fn proxy_pass_to_an_address_generates_an_upstream() {
    let i = convert(
        "stream {\nserver { listen 127.0.0.1:5353 udp; proxy_pass 127.0.0.1:53; proxy_responses 1; }\nserver { listen [::1]:6000; proxy_pass 127.0.0.1:53; proxy_responses 1; }\n}",
    );
    let c = load(&i);
    let u = &c.upstreams["127.0.0.1:53"];
    assert_eq!(u.servers[0].addr.to_string(), "127.0.0.1:53");
    assert_eq!(c.upstreams.len(), 1, "one upstream per address");
    assert_eq!(c.servers[0].protocol, Protocol::Udp);
    assert_eq!(c.servers[0].proxy_responses, Some(1));
    assert_eq!(c.servers[1].listen.to_string(), "[::1]:6000");
    assert_eq!(c.servers[1].proxy_responses, None);
    assert!(notes(&i)
        .iter()
        .any(|n| n.contains("proxy_responses: ignored: UDP only")));
    assert!(i.toml.contains("[upstream.\"127.0.0.1:53\"]"));
}

#[test]
fn several_listens_make_several_servers() {
    let i = convert("stream { upstream a { server 127.0.0.1:1; } server { listen 1; listen 127.0.0.1:2; proxy_pass a; proxy_timeout 9s; } }");
    let c = load(&i);
    assert_eq!(c.servers.len(), 2);
    assert!(c.servers.iter().all(|s| s.proxy_timeout.as_secs() == 9));
}

#[test]
fn what_l4lb_cannot_honour_is_an_error_each_time() {
    let e = convert_err(
        r#"stream {
    resolver 127.0.0.1;
    map $remote_addr $x { default 1; }
    upstream a { server 127.0.0.1:1 resolve; zone a 64k; }
    server {
        listen 1 ssl;
        ssl_certificate /x.pem;
        proxy_ssl on;
        proxy_bind 127.0.0.2;
        allow 127.0.0.1;
        deny everyone;
        limit_conn addr 1;
        js_preread main;
        proxy_pass a;
        frobnicate on;
    }
}
"#,
    );
    let expected = [
        "nginx.conf:2: resolver: not supported yet",
        "nginx.conf:3: map: not supported yet",
        "nginx.conf:4: server: not supported yet: resolve",
        "nginx.conf:6: listen: not supported yet: listen ... ssl",
        "nginx.conf:7: ssl_certificate: not supported yet",
        "nginx.conf:8: proxy_ssl: not supported yet",
        "nginx.conf:9: proxy_bind: not supported yet",
        "nginx.conf:11: deny: \"everyone\" is not an address",
        "nginx.conf:12: limit_conn: no limit_conn_zone addr",
        "nginx.conf:13: js_preread: not supported yet",
        "nginx.conf:15: frobnicate: unknown directive",
    ];
    // One error per directive at fault: a bad listen or server line is not reported
    // again as a missing one.
    assert_eq!(e.len(), expected.len(), "{e:#?}");
    for want in expected {
        assert!(
            e.iter().any(|m| m.starts_with(want)),
            "no {want:?} in {e:#?}"
        );
    }
}

#[test]
fn bad_values_are_errors() {
    let e = convert_err(
        "stream {\nupstream a { server 127.0.0.1 weight=0; server 127.0.0.1:1 weight=0 fail_timeout=10x bogus; }\nserver { listen 1; proxy_pass nowhere; proxy_timeout 1x; proxy_next_upstream maybe; proxy_upload_rate $rate; }\n}",
    );
    let want = [
        "nginx.conf:2: server: \"127.0.0.1\": expected host:port",
        "nginx.conf:2: server: weight must be at least 1",
        "nginx.conf:2: server: invalid duration",
        "nginx.conf:2: server: unknown server parameter \"bogus\"",
        "nginx.conf:3: proxy_pass: \"nowhere\" is neither an upstream",
        "nginx.conf:3: proxy_timeout: invalid duration",
        "nginx.conf:3: proxy_next_upstream: \"maybe\": expected on or off",
        "nginx.conf:3: proxy_upload_rate: \"$rate\": variables are not supported",
    ];
    for w in want {
        assert!(e.iter().any(|m| m.starts_with(w)), "no {w:?} in {e:#?}");
    }
}

#[test]
fn a_server_listed_twice_is_an_error_naming_both_lines() {
    let e = convert_err(
        "stream {\nupstream a {\nserver 127.0.0.1:1111;\nserver [::1]:2;\nserver 127.0.0.1:1111 weight=2;\nserver [0:0::1]:2;\nserver db:3;\nserver DB:3;\n}\nserver { listen 1; proxy_pass a; }\n}",
    );
    let want = [
        "nginx.conf:5: server: 127.0.0.1:1111 is listed twice (first at nginx.conf:3)",
        "nginx.conf:6: server: [0:0::1]:2 is listed twice (first at nginx.conf:4)",
        "nginx.conf:8: server: DB:3 is listed twice (first at nginx.conf:7)",
    ];
    for w in want {
        assert!(e.iter().any(|m| m.starts_with(w)), "no {w:?} in {e:#?}");
    }
    assert_eq!(e.len(), 3, "{e:#?}");
}

#[test]
fn names_needing_quotes_and_process_settings() {
    let i = convert(
        "worker_processes auto;\nworker_shutdown_timeout 10s;\nerror_log stderr info;\nerror_log /x.log;\nevents { worker_connections 100; use epoll; }\nstream {\naccess_log /var/log/s.log basic;\nlog_format basic '$remote_addr';\nupstream db.main { server localhost:3306; }\nserver { listen 1; proxy_pass db.main; }\n}",
    );
    let c = load(&i);
    assert!(c.upstreams.contains_key("db.main"));
    assert_eq!(c.global.worker_threads, None);
    assert_eq!(c.global.worker_shutdown_timeout.as_secs(), 10);
    assert_eq!(
        c.global.log_level, "info",
        "the most verbose error_log wins"
    );
    assert_eq!(c.global.access_log, crate::config::AccessLog::Stderr);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(c.global.max_connections, (100 * cores / 2).max(1));
    let n = notes(&i);
    assert!(
        n.iter()
            .any(|x| x.contains("worker_processes: ignored: auto")),
        "{n:#?}"
    );
    assert!(n.iter().any(|x| x.contains("use: ignored: ")), "{n:#?}");
    assert!(
        n.iter().any(|x| x.contains("log_format: ignored: ")),
        "{n:#?}"
    );
}

#[test]
fn no_stream_block_is_an_error() {
    let e = convert_err("http { }\n");
    assert_eq!(
        e,
        ["nginx.conf: stream: no stream { } block: there is nothing for l4lb to proxy"]
    );
}

#[test]
fn listens_that_would_clash_are_errors() {
    let e = convert_err(
        "stream {\nupstream a { server 127.0.0.1:1; }\nserver { listen 3307; listen [::]:3307; proxy_pass a; }\nserver { listen 127.0.0.1:3307; proxy_pass a; }\nserver { listen 127.0.0.1:9; proxy_pass a; }\nserver { listen 127.0.0.1:9; proxy_pass a; }\n}",
    );
    assert_eq!(e.len(), 3, "{e:#?}");
    assert!(e[0].starts_with("nginx.conf:3: listen: not supported yet: [::]:3307 and 0.0.0.0:3307 (listen at nginx.conf:3) share a port"), "{e:#?}");
    assert!(
        e[1].starts_with(
            "nginx.conf:4: listen: not supported yet: 127.0.0.1:3307 and 0.0.0.0:3307"
        ),
        "{e:#?}"
    );
    assert!(e[2].starts_with("nginx.conf:6: listen: not supported yet: 127.0.0.1:9 is already used by the listen at nginx.conf:5"), "{e:#?}");
    let i = convert(
        "stream {\nupstream a { server 127.0.0.1:1; }\nserver { listen 1; listen 1 udp; listen [::1]:1; listen [::]:2; proxy_pass a; }\n}",
    );
    assert_eq!(load(&i).servers.len(), 4);
    assert!(notes(&i)
        .iter()
        .any(|n| n.contains("listen: note: l4lb's [::] socket takes IPv4")));
}

#[test]
fn access_rules_limits_and_proxy_protocol_listen() {
    let i = convert(
        r#"stream {
    limit_conn_zone $binary_remote_addr zone=per_ip:10m;
    allow 10.0.0.0/8;
    deny all;
    limit_conn per_ip 20;
    set_real_ip_from 10.0.0.0/8;
    set_real_ip_from 192.0.2.1;
    upstream db { server 127.0.0.1:3306; }
    server {
        listen 3307 proxy_protocol;
        proxy_protocol_timeout 5s;
        proxy_pass db;
    }
    server {
        listen 3308;
        allow 192.0.2.0/24;
        allow 2001:db8::/32;
        deny all;
        limit_conn per_ip 2;
        proxy_pass db;
    }
}
"#,
    );
    let c = load(&i);
    let rules = |s: &config::ServerConfig| -> Vec<(bool, Option<String>)> {
        s.access
            .iter()
            .map(|r| (r.allow, r.prefix.map(|p| p.to_string())))
            .collect()
    };
    let (a, b) = (&c.servers[0], &c.servers[1]);
    assert!(a.proxy_protocol_in);
    assert_eq!(a.proxy_protocol_timeout, std::time::Duration::from_secs(5));
    assert_eq!(
        rules(a),
        vec![(true, Some("10.0.0.0/8".into())), (false, None)]
    );
    assert_eq!(a.limit_conn, 20);
    // A server's own rules replace the stream's, as nginx merges them.
    assert_eq!(
        rules(b),
        vec![
            (true, Some("192.0.2.0/24".into())),
            (true, Some("2001:db8::/32".into())),
            (false, None)
        ]
    );
    assert_eq!((b.limit_conn, b.proxy_protocol_in), (2, false));
    // set_real_ip_from reaches the proxy_protocol listen only.
    let trusted = |s: &config::ServerConfig| -> Vec<String> {
        s.set_real_ip_from
            .iter()
            .filter_map(|r| r.prefix.map(|p| p.to_string()))
            .collect()
    };
    assert_eq!(trusted(a), ["10.0.0.0/8", "192.0.2.1/32"]);
    assert!(trusted(b).is_empty());
    assert!(a.trusts_header_from("10.1.2.3".parse().unwrap()));
    assert!(!a.trusts_header_from("127.0.0.1".parse().unwrap()));
    let e = convert_err(
        "stream {\n limit_conn_zone $server_name zone=s:1m;\n upstream u { server 127.0.0.1:1; }\n server { listen 1; limit_conn s 1; proxy_pass u; }\n}\n",
    );
    assert!(
        e.iter()
            .any(|m| m.contains("nginx.conf:2: limit_conn_zone: not supported yet")),
        "{e:#?}"
    );
}

/// Found by fuzzing: a control character in a directive's argument was copied into the
/// comment that quotes the directive, and TOML refuses control characters in comments,
/// so l4lb could not load the converted file.
#[test]
fn control_characters_in_quoted_directives_stay_valid_toml() {
    let i = convert(
        "stream {\n upstream u {\n upsync 127.0.0.1:8500/v1/kv/u upsync_type=consul;\n upsync_dump_path /tmp/a\u{1}\u{0}b.conf;\n server 127.0.0.1:1;\n }\n server { listen 1; proxy_pass u; }\n}\n",
    );
    let c = load(&i);
    assert_eq!(
        c.upstreams["u"]
            .upsync
            .as_ref()
            .and_then(|u| u.dump_path.as_deref()),
        Some(Path::new("/tmp/a\u{1}\u{0}b.conf"))
    );
    assert!(
        i.toml
            .contains("# upsync_dump_path /tmp/a\\u{1}\\u{0}b.conf ("),
        "{}",
        i.toml
    );
}

/// Found by fuzzing: `upsync_interval=0ms` (and a zero proxy_timeout or
/// proxy_connect_timeout) was carried over, and l4lb refused the converted file.
#[test]
fn zero_intervals_and_timeouts_are_errors() {
    let errors = convert_err(
        "stream {\n upstream u {\n upsync 127.0.0.1:8500/v1/kv/u upsync_type=consul upsync_interval=000ms;\n server 127.0.0.1:1;\n }\n server { listen 1; proxy_pass u; proxy_timeout 0; }\n server { listen 2; proxy_pass u; proxy_connect_timeout 0s; }\n}\n",
    );
    assert_eq!(
        errors,
        [
            "nginx.conf:3: upsync: \"000ms\" must be greater than zero",
            "nginx.conf:6: proxy_timeout: \"0\" must be greater than zero",
            "nginx.conf:7: proxy_connect_timeout: \"0s\" must be greater than zero",
        ]
    );
}

/// l4lb refuses an upsync timeout under a second and two upstreams sharing a dump file,
/// so the conversion refuses them too (a file it writes must load).
#[test]
fn short_upsync_timeouts_and_shared_dump_files_are_errors() {
    let errors = convert_err(
        "stream {\n upstream u {\n upsync 127.0.0.1:8500/v1/kv/u upsync_type=consul upsync_timeout=500ms;\n server 127.0.0.1:1;\n }\n upstream v {\n upsync 127.0.0.1:8500/v1/kv/v upsync_type=consul;\n upsync_dump_path /tmp/s.conf;\n server 127.0.0.1:2;\n }\n upstream w {\n upsync 127.0.0.1:8500/v1/kv/w upsync_type=consul;\n upsync_dump_path /tmp/s.conf;\n server 127.0.0.1:3;\n }\n server { listen 1; proxy_pass u; }\n}\n",
    );
    assert_eq!(
        errors,
        [
            "nginx.conf:3: upsync: \"500ms\" must be at least 1s",
            "nginx.conf:13: upsync_dump_path: /tmp/s.conf is also the dump file of another upstream (at nginx.conf:8): l4lb takes one file per upstream",
        ]
    );
}

/// Found by fuzzing: `upsync ... upsync_interval=50 upsync_interval=500ms` wrote
/// `interval` twice, which TOML refuses. As in nginx-upsync, the last one counts.
#[test]
fn a_repeated_upsync_parameter_counts_once() {
    let i = convert(
        "stream {\n upstream u {\n upsync 127.0.0.1:8500/v1/kv/u upsync_interval=50 upsync_interval=500ms upsync_type=consul;\n server 127.0.0.1:1;\n }\n server { listen 1; proxy_pass u; }\n}\n",
    );
    let c = load(&i);
    let up = c.upstreams["u"].upsync.as_ref().expect("upsync");
    assert_eq!(up.interval.as_millis(), 500);
    // The same for a server's parameters, found reading the code next to it.
    let i = convert(
        "stream {\n upstream u { server 127.0.0.1:1 weight=1 weight=3 down down; }\n server { listen 1; proxy_pass u; }\n}\n",
    );
    let s = &load(&i).upstreams["u"].servers[0];
    assert_eq!((s.weight, s.down), (3, true));
}

/// Found by fuzzing: an upstream named after a `proxy_pass` address holding quotes and
/// a backslash got a `'''...'''` table key, which TOML refuses.
#[test]
fn any_name_makes_a_valid_toml_key() {
    for name in [
        "a''b\\c:1",
        "x'''y",
        "tab\there",
        "del\u{7f}",
        "quote\"d",
        "",
    ] {
        let doc = format!("[upstream.{}]\nk = 1\n", super::emit::key(name));
        let table: toml::Table = doc.parse().unwrap_or_else(|e| panic!("{doc}: {e}"));
        assert!(
            table["upstream"].as_table().unwrap().contains_key(name),
            "{doc}"
        );
    }
}

/// Found by fuzzing: a directive set twice in one block was written twice, a duplicate
/// TOML key. nginx refuses such a configuration ("is duplicate"), and so does the
/// conversion.
#[test]
fn a_directive_set_twice_in_a_block_is_an_error() {
    let errors = convert_err(
        "stream {\n proxy_timeout 1s;\n proxy_timeout 2s;\n upstream u { server 127.0.0.1:1; }\n server { listen 1; proxy_pass u; proxy_connect_timeout 1s;\n proxy_connect_timeout 2s; proxy_pass u; }\n}\n",
    );
    assert_eq!(
        errors,
        [
            "nginx.conf:3: proxy_timeout: directive is duplicate",
            "nginx.conf:6: proxy_connect_timeout: directive is duplicate",
            "nginx.conf:6: proxy_pass: directive is duplicate",
        ]
    );
}
