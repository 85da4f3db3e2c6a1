//! The command line: `l4lb check` (like `nginx -t`) and start-up errors.

mod support;

use std::process::Command;

use support::{l4lb_bin, repo_path};

fn check(text: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(l4lb_bin())
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).replace(path.to_str().unwrap(), "FILE"),
    )
}

/// Whether `check`'s stderr names an error at line `line` of the file, saying `what`.
fn names(err: &str, line: usize, what: &str) -> bool {
    err.contains(&format!("FILE:{line}:")) && err.contains(what)
}

#[test]
fn shipped_configs_check_ok() {
    for f in ["config/l4lb.toml", "config/examples/mysql.toml"] {
        let out = Command::new(l4lb_bin())
            .args(["check", "-c"])
            .arg(repo_path(f))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("syntax is ok"));
    }
}

#[test]
fn check_lists_every_error_with_file_line_column_and_key() {
    let (ok, _, err) = check(
        r#"[global]
max_conections = 10

[upstream.db]
balance = "least_conn"
servers = [
  { address = "127.0.0.1:3306", weight = -1 },
  { address = "127.0.0.1:3307", fail_timeout = "10 seconds" },
]

[[server]]
listen = "127.0.0.1:3307"
proxy_pass = "dbs"
proxy_timeout = "1x"
"#,
    );
    assert!(!ok);
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines[0].starts_with("FILE:2:1: global.max_conections: unknown field"),
        "{err}"
    );
    assert!(
        lines[1]
            .starts_with("FILE:7:42: upstream.db.servers[0].weight: invalid value: integer `-1`"),
        "{err}"
    );
    assert!(
        lines[2].starts_with("FILE:8:48: upstream.db.servers[1].fail_timeout: invalid duration"),
        "{err}"
    );
    assert!(
        lines[3].starts_with("FILE:14:17: server[0].proxy_timeout: invalid duration \"1x\""),
        "{err}"
    );
    assert!(err.contains("test failed (4 errors)"), "{err}");
}

#[test]
fn proxy_pass_to_an_undefined_upstream_is_named() {
    let (ok, _, err) = check("[[server]]\nlisten = \"127.0.0.1:1\"\nproxy_pass = \"nowhere\"\n");
    assert!(!ok);
    assert!(
        err.contains("FILE:3:14: server[0].proxy_pass: no [upstream.nowhere] is defined"),
        "{err}"
    );
}

#[test]
fn syntax_errors_and_missing_files_do_not_panic() {
    let (ok, _, err) = check("[upstream.a\nservers = [");
    assert!(!ok);
    assert!(
        err.contains("FILE:1:") && !err.contains("panicked"),
        "{err}"
    );
    let out = Command::new(l4lb_bin())
        .args(["check", "-c", "/nonexistent/l4lb.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn run_refuses_an_invalid_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[global]\nsplice = \"sometimes\"\n").unwrap();
    let out = Command::new(l4lb_bin())
        .args(["run", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("global.splice: unknown variant `sometimes`"),
        "{err}"
    );
}

/// A pid file left behind by a killed daemon may name another process: `l4lb upgrade`
/// refuses to send it SIGUSR2 (whose default action would end it).
#[test]
fn upgrade_does_not_signal_a_process_that_is_not_l4lb() {
    let dir = tempfile::tempdir().unwrap();
    let mut other = Command::new("sleep").arg("30").spawn().unwrap();
    let pid_file = dir.path().join("l4lb.pid");
    std::fs::write(&pid_file, format!("{}\n", other.id())).unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!("[global]\npid_file = \"{}\"\n", pid_file.display()),
    )
    .unwrap();
    let out = Command::new(l4lb_bin())
        .args(["upgrade", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("the pid file is stale"), "{err}");
    assert!(other.try_wait().unwrap().is_none(), "the process was ended");
    other.kill().unwrap();
    let _ = other.wait();
}

/// An access log file the daemon could not open fails check (which the unit's reload
/// runs), as `nginx -t` opens its logs: it used to pass, and every start then failed.
#[test]
fn check_opens_the_access_log_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir").join("access.log");
    let (ok, _, err) = check(&format!(
        "[global]\naccess_log = \"{}\"\n[upstream.u]\nservers = [{{ address = \"127.0.0.1:1\" }}]\n[[server]]\nlisten = \"127.0.0.1:1\"\nproxy_pass = \"u\"\n",
        missing.display()
    ));
    assert!(!ok, "{err}");
    assert!(err.contains("global.access_log: cannot open"), "{err}");
    let writable = dir.path().join("access.log");
    let (ok, _, err) = check(&format!(
        "[global]\naccess_log = \"{}\"\n[upstream.u]\nservers = [{{ address = \"127.0.0.1:1\" }}]\n[[server]]\nlisten = \"127.0.0.1:1\"\nproxy_pass = \"u\"\n",
        writable.display()
    ));
    assert!(ok, "{err}");
}

#[test]
fn health_check_errors_name_file_line_and_key() {
    let (ok, _, err) = check(
        r#"
[upstream.db]
servers = [{ address = "127.0.0.1:3306" }]

[upstream.db.health_check]
type = "send_expect"
send = 'PING\q'
expect = "PO(NG"

[upstream.cache]
servers = [{ address = "127.0.0.1:6379" }]

[upstream.cache.health_check]
type = "ping"

[[server]]
listen = "127.0.0.1:3307"
proxy_pass = "db"
"#,
    );
    assert!(!ok);
    assert!(
        names(&err, 7, "upstream.db.health_check.send: unknown escape \\q"),
        "{err}"
    );
    assert!(
        names(
            &err,
            8,
            "upstream.db.health_check.expect: not a regular expression"
        ),
        "{err}"
    );
    assert!(names(&err, 14, "upstream.cache.health_check.type"), "{err}");
}

#[test]
fn upsync_errors_name_the_upstream_and_key() {
    let (ok, _, err) = check(
        r#"
[upstream.cache.upsync]
type = "etcd"
url = "http://127.0.0.1:2379/v3/kv/upstreams/cache/"
timeout = "0s"

[[server]]
listen = "127.0.0.1:6380"
proxy_pass = "cache"
"#,
    );
    assert!(!ok);
    assert!(
        names(
            &err,
            5,
            "upstream.cache.upsync.timeout: timeout must be at least 1s"
        ) && err.contains("test failed (1 error)"),
        "a bad upsync section is one error, not also a missing source: {err}"
    );
    // A URL of the wrong shape is found by `check`, not after a start or reload.
    let (ok, _, err) = check(
        r#"
[upstream.db]
[upstream.db.upsync]
type = "consul"
url = "http://127.0.0.1:8500/upstreams/db/"

[[server]]
listen = "127.0.0.1:3307"
proxy_pass = "db"
"#,
    );
    assert!(!ok);
    assert!(
        err.contains("FILE: upstream db: upsync")
            && err.contains("a consul url has the form http://HOST:PORT/v1/kv/PREFIX/")
            && err.contains("test failed (1 error)"),
        "{err}"
    );
}
