use std::time::Duration;

use super::*;

fn errors(text: &str) -> Vec<ConfigError> {
    parse(text).expect_err("config should be rejected")
}

const MINIMAL: &str = r#"
[upstream.db]
servers = [{ address = "127.0.0.1:3306" }]

[[server]]
listen = "127.0.0.1:3307"
proxy_pass = "db"
"#;

#[test]
fn defaults_follow_nginx() {
    let c = parse(MINIMAL).unwrap();
    let s = &c.servers[0];
    assert_eq!(s.protocol, Protocol::Tcp);
    assert_eq!(s.proxy_connect_timeout, Duration::from_secs(60));
    assert_eq!(s.proxy_timeout, Duration::from_secs(600));
    assert!(s.proxy_next_upstream);
    assert_eq!(s.proxy_next_upstream_tries, 0);
    assert_eq!(s.proxy_next_upstream_timeout, Duration::ZERO);
    assert_eq!((s.proxy_upload_rate, s.proxy_download_rate), (0, 0));
    assert_eq!(s.splice, SpliceMode::Auto);
    assert_eq!(
        (s.splice_after.bytes, s.splice_after.time),
        (256 << 10, Duration::from_secs(1))
    );
    let u = &c.upstreams["db"];
    assert_eq!(u.balance, Balance::RoundRobin);
    let p = &u.servers[0];
    assert_eq!(
        (p.weight, p.max_fails, p.fail_timeout),
        (1, 1, Duration::from_secs(10))
    );
    assert!(!p.backup && !p.down);
    assert_eq!(c.global.max_connections, 10_240);
}

#[test]
fn shipped_configs_are_valid() {
    for f in ["l4lb.toml", "examples/mysql.toml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../config")
            .join(f);
        if let Err(e) = load(&path) {
            panic!("{e}");
        }
    }
}

#[test]
fn splice_after_is_inherited_key_by_key() {
    let c = parse(
        r#"
[global]
splice_after_bytes = "1m"
splice_chatty = "copy"

[upstream.u]
servers = [{ address = "127.0.0.1:1" }]

[[server]]
listen = "127.0.0.1:1000"
proxy_pass = "u"
splice_after_time = "5s"

[[server]]
listen = "127.0.0.1:1001"
proxy_pass = "u"
splice_after_time = 0
splice_chatty = "kernel"
"#,
    )
    .unwrap();
    let after = |i: usize| {
        let a = c.servers[i].splice_after;
        (a.bytes, a.time, a.chatty)
    };
    assert_eq!(
        after(0),
        (1 << 20, Duration::from_secs(5), ChattyPath::Copy)
    );
    assert_eq!(after(1), (1 << 20, Duration::ZERO, ChattyPath::Kernel));
}

#[test]
fn chatty_sessions_go_into_the_kernel_on_trial_by_default() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.servers[0].splice_after.chatty, ChattyPath::Trial);
}

#[test]
fn full_example_parses() {
    let c = parse(
        r#"
[global]
worker_threads = 2
access_log = false
splice = "off"
worker_shutdown_timeout = "5s"

[upstream.h]
balance = "hash"
consistent = true
servers = [
  { address = "127.0.0.1:1", weight = 5, max_fails = 3, fail_timeout = "30s", max_conns = 9 },
  { address = "127.0.0.1:2", backup = true },
  { address = "localhost:3", down = true },
]

[[server]]
listen = "127.0.0.1:53"
protocol = "udp"
proxy_pass = "h"
proxy_responses = 1
proxy_timeout = "500ms"
proxy_upload_rate = "10k"
proxy_download_rate = 2048
"#,
    )
    .unwrap();
    assert_eq!(c.upstreams["h"].balance, Balance::Hash { consistent: true });
    let s = &c.servers[0];
    assert_eq!(s.protocol, Protocol::Udp);
    assert_eq!(s.proxy_responses, Some(1));
    assert_eq!(s.proxy_timeout, Duration::from_millis(500));
    assert_eq!((s.proxy_upload_rate, s.proxy_download_rate), (10240, 2048));
    assert_eq!(
        s.splice,
        SpliceMode::Off,
        "server inherits the global splice mode"
    );
    let peers = &c.upstreams["h"].servers;
    assert_eq!(peers[0].max_conns, 9);
    assert!(peers[1].backup);
    assert!(peers.iter().any(|p| p.down && p.name == "localhost:3"));
}

#[test]
fn unknown_keys_are_errors_with_position() {
    let e = errors("[global]\nlog_lvl = \"info\"\n");
    assert_eq!(e.len(), 1);
    assert_eq!((e[0].line, e[0].column), (2, 1));
    assert_eq!(e[0].key, "global.log_lvl");
    assert!(e[0].message.contains("unknown field"), "{}", e[0].message);

    let e = errors(&format!("{MINIMAL}proxy_timout = \"1s\"\n"));
    assert_eq!(e[0].key, "server[0].proxy_timout");
    assert_eq!(e[0].line, 8);

    let e = errors("[unknown]\n");
    assert_eq!(e[0].key, "unknown");
}

#[test]
fn every_error_is_reported_in_file_order() {
    let e = errors(
        r#"
[upstream.a]
balance = "fastest"
servers = [{ address = "127.0.0.1:1" }]

[upstream.b]
servers = [{ address = "127.0.0.1:2", weight = 0, fail_timeout = "3q" }]

[[server]]
listen = "nonsense"
proxy_pass = "missing"
"#,
    );
    let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "upstream.a.balance",
            "upstream.b.servers[0].fail_timeout",
            "server[0].listen",
            "server[0].proxy_pass",
        ]
    );
    assert!(e.windows(2).all(|w| w[0].line <= w[1].line));
    assert_eq!(e[0].line, 3);
}

/// Seconds past what a deadline can hold were accepted, and the first connect failure
/// then panicked computing `now + fail_timeout`.
#[test]
fn durations_too_large_for_a_deadline_are_errors() {
    let e = errors(
        "[upstream.u]\nservers = [{ address = \"127.0.0.1:1\", fail_timeout = 9223372036854775807 }]\n",
    );
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].key, "upstream.u.servers[0].fail_timeout");
    assert_eq!(e[0].line, 2);
    assert!(e[0].message.contains("too large"), "{}", e[0].message);
}

#[test]
fn semantic_errors() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "[upstream.u]\nservers = [{ address = \"127.0.0.1:1\", weight = 0 }]\n",
            "upstream.u.servers[0].weight",
            "at least 1",
        ),
        (
            "[upstream.u]\nservers = [{ address = \"no-port\" }]\n",
            "upstream.u.servers[0].address",
            "host:port",
        ),
        (
            "[upstream.u]\nservers = [{ address = \"no.such.host.invalid:80\" }]\n",
            "upstream.u.servers[0].address",
            "cannot resolve",
        ),
        ("[upstream.u]\nservers = []\n", "upstream.u.servers", "needs servers"),
        (
            "[upstream.u]\nservers = [{ address = \"127.0.0.1:1\" }]\n[[server]]\nlisten = \"0.0.0.0:7000\"\nproxy_pass = \"u\"\n[[server]]\nlisten = \"127.0.0.1:7000\"\nproxy_pass = \"u\"\n",
            "server[1].listen",
            "cannot be bound beside 0.0.0.0:7000 (server[0])",
        ),
        (
            "[upstream.u]\nservers = [{ address = \"127.0.0.1:1\" }]\n[[server]]\nlisten = \"[::]:7000\"\nproxy_pass = \"u\"\n[[server]]\nlisten = \"0.0.0.0:7000\"\nproxy_pass = \"u\"\n",
            "server[1].listen",
            "cannot be bound beside [::]:7000",
        ),
        (
            "[admin]\nlisten = \"127.0.0.1:7000\"\n[upstream.u]\nservers = [{ address = \"127.0.0.1:1\" }]\n[[server]]\nlisten = \"0.0.0.0:7000\"\nproxy_pass = \"u\"\n",
            "admin.listen",
            "cannot be bound beside 0.0.0.0:7000 (server[0])",
        ),
        (
            "[global]\nlog_level = \"warning\"\n",
            "global.log_level",
            "\"warning\" is not a level: expected one of error, warn, info, debug, trace, off",
        ),
        (
            "[global]\nlog_level = \"info,aya=verbose\"\n",
            "global.log_level",
            "\"aya=verbose\" is not a level",
        ),
        (
            "[global]\nmax_connections = 0\n",
            "global.max_connections",
            "expected 1 to",
        ),
        (
            "[global]\nmax_connections = 3000000000000000000\n",
            "global.max_connections",
            "expected 1 to",
        ),
        (
            "[upstream.u]\nconsistent = true\nservers = [{ address = \"127.0.0.1:1\" }]\n",
            "upstream.u.consistent",
            "hash",
        ),
        (
            "[upstream.u]\nservers = [{ address = \"127.0.0.1:1\" }, { address = \"127.0.0.1:1\" }]\n",
            "upstream.u.servers[1].address",
            "is already servers[0] (127.0.0.1:1)",
        ),
        (
            "[upstream.u]\nservers = [{ address = \"127.0.0.1:1\" }, { address = \"localhost:1\" }]\n",
            "upstream.u.servers[1].address",
            "localhost:1 (127.0.0.1:1) is already servers[0]",
        ),
        ("[[server]]\nlisten = \"127.0.0.1:1\"\n", "server[0].proxy_pass", "missing proxy_pass"),
        (
            "[[server]]\nlisten = \"127.0.0.1:1\"\nupstream_show = true\nprotocol = \"udp\"\n",
            "server[0].upstream_show",
            "tcp",
        ),
        (
            "[[server]]\nlisten = \"127.0.0.1:1\"\nupstream_show = true\nproxy_protocol_in = true\n",
            "server[0].proxy_protocol_in",
            "reads HTTP",
        ),
        (
            "[upstream.u]\nservers = [{ address = \"127.0.0.1:1\" }]\n[[server]]\nlisten = \"127.0.0.1:1\"\nproxy_pass = \"u\"\nset_real_ip_from = [\"10.0.0.0/8\"]\n",
            "server[0].set_real_ip_from",
            "only with proxy_protocol_in",
        ),
        (
            "[upstream.u]\nservers = [{ address = \"127.0.0.1:1\" }]\n[[server]]\nlisten = \"127.0.0.1:1\"\nproxy_pass = \"u\"\nproxy_protocol_in = true\nset_real_ip_from = [\"10.0.0.0/8\", \"lb.example\"]\n",
            "server[0].set_real_ip_from[1]",
            "not an address or a prefix",
        ),
        (
            "[upstream.u]\nservers = [{ address = \"127.0.0.1:1\" }]\n[[server]]\nlisten = \"127.0.0.1:1\"\nproxy_pass = \"u\"\nproxy_responses = 1\n",
            "server[0].proxy_responses",
            "udp",
        ),
        (
            "[upstream.u]\nservers = [{ address = \"127.0.0.1:1\" }]\n[[server]]\nlisten = \"127.0.0.1:1\"\nproxy_pass = \"u\"\nproxy_connect_timeout = \"0\"\n",
            "server[0].proxy_connect_timeout",
            "greater than zero",
        ),
        (
            "[upstream.u]\nservers = [{ address = \"127.0.0.1:1\" }]\n[[server]]\nlisten = \"127.0.0.1:1\"\nproxy_pass = \"u\"\n[[server]]\nlisten = \"127.0.0.1:1\"\nproxy_pass = \"u\"\n",
            "server[1].listen",
            "already used",
        ),
        (
            "[upstream.u]\nservers = [{ address = \"127.0.0.1:1\" }]\n[upstream.u.upsync]\ntype = \"zookeeper\"\nurl = \"http://x/\"\n",
            "upstream.u.upsync.type",
            "unknown variant",
        ),
        (
            "[upstream.u]\n[upstream.u.upsync]\ntype = \"consul\"\nurl = \"ftp://x/\"\n",
            "upstream.u.upsync.url",
            "http://",
        ),
        (
            "[upstream.u]\n[upstream.u.upsync]\ntype = \"consul\"\nurl = \"http://x/\"\ntoken_env = \"L4LB_TEST_SURELY_UNSET\"\n",
            "upstream.u.upsync.token_env",
            "not set",
        ),
        (
            "[upstream.u]\n[upstream.u.upsync]\ntype = \"consul\"\nurl = \"http://x/v1/kv/u/\"\ntimeout = \"500ms\"\n",
            "upstream.u.upsync.timeout",
            "at least 1s",
        ),
        (
            "[upstream.u]\n[upstream.u.upsync]\ntype = \"consul\"\nurl = \"http://x/v1/kv/u/\"\ndump_path = \"/tmp/u.conf\"\n[upstream.v]\n[upstream.v.upsync]\ntype = \"consul\"\nurl = \"http://x/v1/kv/v/\"\ndump_path = \"/tmp/u.conf\"\n",
            "upstream.v.upsync.dump_path",
            "also the dump file of upstream.u.upsync",
        ),
        (
            "[upstream.u]\nservers = [{ address = \"127.0.0.1:1\" }]\n[[server]]\nlisten = \"127.0.0.1:1\"\nprotocol = \"udp\"\nproxy_pass = \"u\"\nproxy_protocol = \"v1\"\n",
            "server[0].proxy_protocol",
            "TCP only",
        ),
        ("[admin]\nlisten = \"localhost\"\n", "admin.listen", "ip:port"),
        ("[global]\nsplice = \"maybe\"\n", "global.splice", "unknown variant"),
        (
            "[global]\nsplice_chatty = \"userspace\"\n",
            "global.splice_chatty",
            "expected one of `trial`, `kernel`, `copy`",
        ),
        ("[global\n", "(syntax)", ""),
    ];
    for (text, key, msg) in cases {
        let e = errors(text);
        assert!(
            e.iter()
                .any(|e| e.key == *key && e.message.contains(msg) && e.line > 0),
            "for {text:?} expected {key}: ..{msg}.. got {e:?}"
        );
    }
}

#[test]
fn display_names_file_line_and_key() {
    let errs = ConfigErrors {
        file: PathBuf::from("/etc/l4lb.toml"),
        errors: errors("[global]\nfoo = 1\n"),
    };
    let text = errs.to_string();
    assert!(
        text.starts_with("/etc/l4lb.toml:2:1: global.foo: unknown field"),
        "{text}"
    );
}

/// Any spelling tracing reads as a level, and filters of targets and levels, pass.
#[test]
fn log_levels_and_filters_that_tracing_reads() {
    for level in [
        "WARN",
        "Info",
        "off",
        "info,l4lb::discovery=debug",
        "warn, aya=off",
    ] {
        let text = format!("[global]\nlog_level = \"{level}\"\n{MINIMAL}");
        assert!(parse(&text).is_ok(), "{level}");
    }
}
