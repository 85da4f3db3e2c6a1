//! The deploy files, checked without a container engine or a running systemd (these
//! machines have neither): every one grants exactly the capability set that
//! tests/capabilities.rs measured, their l4lb configurations pass `l4lb check`, their
//! health probes tell a running admin API from none, the Dockerfile builds with the
//! xtask commands and nothing else, `systemd-analyze verify` accepts the unit and its
//! sandbox allows every system call and socket family the daemon uses (strace); and the
//! default configuration path rule.

mod support;

#[path = "../l4lb-user/src/capabilities.rs"]
#[allow(dead_code)] // the daemon's helpers around the list; the test needs the list
mod capabilities;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::{free_port, l4lb_bin, repo_path, Daemon};
use yaml_rust2::{Yaml, YamlLoader};

const UNIT: &str = "deploy/systemd/l4lb.service";
const COMPOSE: &str = "deploy/compose.yaml";
const KUBERNETES: &str = "deploy/kubernetes/l4lb-sidecar.yaml";

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(rel: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// CAP_BPF, CAP_PERFMON, ... as measured.
fn measured() -> BTreeSet<String> {
    capabilities::KERNEL_PATH
        .iter()
        .map(|(c, _)| c.to_string())
        .collect()
}

/// A YAML list of strings; container runtimes spell capabilities without `CAP_`.
fn runtime_caps(list: &Yaml, what: &str) -> BTreeSet<String> {
    list.as_vec()
        .unwrap_or_else(|| panic!("{what} is not a list"))
        .iter()
        .map(|c| format!("CAP_{}", c.as_str().expect("a capability name")))
        .collect()
}

fn compose_l4lb() -> Yaml {
    yaml(COMPOSE)[0]["services"]["l4lb"].clone()
}

/// The Deployment's l4lb sidecar container.
fn kubernetes_l4lb() -> Yaml {
    let docs = yaml(KUBERNETES);
    let deployment = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("Deployment"))
        .expect("a Deployment");
    deployment["spec"]["template"]["spec"]["initContainers"]
        .as_vec()
        .expect("initContainers")
        .iter()
        .find(|c| c["name"].as_str() == Some("l4lb"))
        .expect("the l4lb sidecar")
        .clone()
}

/// The values of `Key=` lines of the unit, split on whitespace.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .flat_map(|v| v.split_whitespace().map(str::to_string))
        .collect()
}

#[test]
fn every_deploy_file_grants_exactly_the_measured_capabilities() {
    let want = measured();
    assert_eq!(want.len(), 3, "{want:?}");

    let unit = read(UNIT);
    for key in ["AmbientCapabilities", "CapabilityBoundingSet"] {
        let got: BTreeSet<String> = unit_values(&unit, key).into_iter().collect();
        assert_eq!(got, want, "{UNIT}: {key}=");
    }

    let compose = compose_l4lb();
    assert_eq!(
        runtime_caps(&compose["cap_add"], "cap_add"),
        want,
        "{COMPOSE}"
    );
    assert_eq!(
        runtime_caps(&compose["cap_drop"], "cap_drop"),
        BTreeSet::from(["CAP_ALL".to_string()]),
        "{COMPOSE}"
    );

    let sidecar = kubernetes_l4lb();
    let security = &sidecar["securityContext"];
    let caps = &security["capabilities"];
    assert_eq!(runtime_caps(&caps["add"], "add"), want, "{KUBERNETES}");
    assert_eq!(
        runtime_caps(&caps["drop"], "drop"),
        BTreeSet::from(["CAP_ALL".to_string()]),
        "{KUBERNETES}"
    );
    assert_eq!(
        security["privileged"].as_bool(),
        Some(false),
        "{KUBERNETES}"
    );
    assert_eq!(
        security["allowPrivilegeEscalation"].as_bool(),
        Some(false),
        "{KUBERNETES}"
    );

    let readme = read("README.md");
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Install and deploy"))
        .expect("README section Install and deploy");
    for cap in &want {
        assert!(
            section.contains(cap.as_str()),
            "README does not explain {cap}"
        );
    }
}

#[test]
fn the_unit_runs_as_a_notify_service_with_no_new_privileges() {
    let unit = read(UNIT);
    for line in [
        "Type=notify",
        "NotifyAccess=all",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "User=l4lb",
        "StateDirectory=l4lb",
    ] {
        assert!(unit.lines().any(|l| l == line), "{UNIT} lacks {line}");
    }
    // bpf(2) is not in @system-service: without it the kernel path could not load.
    assert_eq!(
        unit_values(&unit, "SystemCallFilter"),
        ["@system-service", "bpf"]
    );
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = dir.path().join("l4lb.service");
    // verify insists that the binary exists: point it at the one just built.
    let text = read(UNIT).replace(
        "/usr/local/bin/l4lb",
        l4lb_bin().to_str().expect("utf-8 path"),
    );
    std::fs::write(&unit, text).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze (Debian package systemd; cargo xtask setup installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on unknown keys and bad values too: anything it says is a finding.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "{}: {stderr}",
        out.status
    );
}

/// The configuration of the compose file and of the ConfigMap.
fn deploy_configs() -> [(&'static str, String); 2] {
    let compose = yaml(COMPOSE)[0]["configs"]["l4lb_toml"]["content"]
        .as_str()
        .expect("compose configs.l4lb_toml.content")
        .to_string();
    let docs = yaml(KUBERNETES);
    let map = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("ConfigMap"))
        .expect("a ConfigMap");
    let kubernetes = map["data"]["l4lb.toml"]
        .as_str()
        .expect("ConfigMap data l4lb.toml")
        .to_string();
    [(COMPOSE, compose), (KUBERNETES, kubernetes)]
}

#[test]
fn the_deploy_configurations_pass_l4lb_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let configs = deploy_configs();
    assert_eq!(
        configs[0].1, configs[1].1,
        "the compose file and the ConfigMap should carry one configuration"
    );
    for (file, toml) in configs {
        let path = dir.path().join("l4lb.toml");
        std::fs::write(&path, &toml).expect("write");
        let out = Command::new(l4lb_bin())
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .expect("run l4lb check");
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The health probes as shell scripts, their admin port replaced by `port`.
fn probes(port: u16) -> Vec<(&'static str, String)> {
    let compose = compose_l4lb()["healthcheck"]["test"]
        .as_vec()
        .expect("healthcheck test")
        .iter()
        .map(|a| a.as_str().expect("string").to_string())
        .collect::<Vec<_>>();
    assert_eq!(&compose[..3], ["CMD", "bash", "-c"], "{COMPOSE}");
    // `$$` is Compose's escape for a literal `$`.
    let compose_script = compose[3].replace("$$", "$");
    let sidecar = kubernetes_l4lb();
    let mut scripts = vec![(COMPOSE, compose_script)];
    for probe in ["startupProbe", "readinessProbe"] {
        let cmd = sidecar[probe]["exec"]["command"]
            .as_vec()
            .unwrap_or_else(|| panic!("{probe} exec command"))
            .iter()
            .map(|a| a.as_str().expect("string").to_string())
            .collect::<Vec<_>>();
        assert_eq!(&cmd[..2], ["bash", "-c"], "{KUBERNETES} {probe}");
        scripts.push((KUBERNETES, cmd[2].clone()));
    }
    scripts
        .into_iter()
        .map(|(f, s)| {
            assert!(s.contains("127.0.0.1/9180"), "{f}: {s}");
            (f, s.replace("127.0.0.1/9180", &format!("127.0.0.1/{port}")))
        })
        .collect()
}

fn probe_passes(script: &str) -> bool {
    Command::new("bash")
        .args(["-c", script])
        .stderr(std::process::Stdio::null())
        .status()
        .expect("bash")
        .success()
}

#[test]
fn the_health_probes_pass_only_while_the_admin_api_answers() {
    let admin = free_port();
    let scripts = probes(admin);
    for (file, script) in &scripts {
        assert!(
            !probe_passes(script),
            "{file}: passes with nothing listening"
        );
    }
    let d = Daemon::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[upstream.u]\nservers = [{{ address = \"127.0.0.1:{}\" }}]\n\n[[server]]\nlisten = \"127.0.0.1:{}\"\nproxy_pass = \"u\"\n",
        free_port(),
        free_port()
    ));
    for (file, script) in &scripts {
        assert!(
            probe_passes(script),
            "{file}: fails against a running daemon; log:\n{}",
            d.log()
        );
    }
}

/// Instructions of a Dockerfile, continuation lines joined, per stage.
fn dockerfile_stages() -> Vec<Vec<(String, String)>> {
    let mut stages: Vec<Vec<(String, String)>> = Vec::new();
    let mut pending = String::new();
    for line in read("Dockerfile").lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(part) = line.strip_suffix('\\') {
            pending.push_str(part);
            continue;
        }
        pending.push_str(line);
        let full = std::mem::take(&mut pending);
        let (op, args) = full.split_once(' ').unwrap_or((&full, ""));
        let op = op.to_uppercase();
        if op == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("an instruction before FROM")
            .push((op, args.trim().to_string()));
    }
    stages
}

#[test]
fn the_dockerfile_builds_with_the_xtask_commands_and_nothing_else() {
    let stages = dockerfile_stages();
    assert_eq!(stages.len(), 2, "a builder and a runtime stage");
    let (build, runtime) = (&stages[0], &stages[1]);

    // Debian 12 (bookworm), as the xtask's setup expects.
    assert_eq!(
        build[0],
        ("FROM".into(), "rust:1.95-bookworm AS build".into())
    );
    let runs: Vec<&str> = build
        .iter()
        .filter(|(op, _)| op == "RUN")
        .map(|(_, a)| a.as_str())
        .collect();
    assert_eq!(
        runs,
        [
            "cargo xtask setup --build-only",
            "cargo xtask install --prefix /usr/local --destdir /out"
        ],
        "the image must install exactly what cargo xtask installs"
    );

    // Before the toolchain layer, what `cargo xtask` needs to start: the workspace
    // manifests, every member's included.
    let before_setup: Vec<&str> = build
        .iter()
        .take_while(|(op, _)| op != "RUN")
        .filter(|(op, _)| op == "COPY")
        .map(|(_, a)| a.as_str())
        .collect();
    let workspace: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml");
    let members = workspace["workspace"]["members"]
        .as_array()
        .expect("workspace members");
    for member in members {
        let member = member.as_str().expect("member name");
        let wanted = if member == "xtask" {
            "xtask xtask".to_string()
        } else {
            format!("{member}/Cargo.toml {member}/Cargo.toml")
        };
        assert!(
            before_setup.contains(&wanted.as_str()),
            "COPY {wanted} missing: {before_setup:?}"
        );
    }
    assert!(before_setup.contains(&"Cargo.toml Cargo.lock ./"));
    assert!(before_setup.contains(&".cargo .cargo"));

    // The runtime stage takes what `cargo xtask install --destdir /out` staged.
    assert_eq!(runtime[0], ("FROM".into(), "debian:12-slim".into()));
    let copies: Vec<&str> = runtime
        .iter()
        .filter(|(op, _)| op == "COPY")
        .map(|(_, a)| a.as_str())
        .collect();
    assert_eq!(
        copies,
        [
            "--from=build /out/usr/local/bin/l4lb /usr/local/bin/l4lb",
            "--from=build /out/etc/l4lb/l4lb.toml /etc/l4lb/l4lb.toml",
            "--from=build /out/var/lib/l4lb /var/lib/l4lb",
        ]
    );
    assert!(runtime.contains(&("ENTRYPOINT".into(), "[\"/usr/local/bin/l4lb\"]".into())));
}

/// `l4lb check` without -c, run in `dir`: the file it reports on.
fn default_config_in(dir: &Path) -> String {
    let out = Command::new(l4lb_bin())
        .arg("check")
        .current_dir(dir)
        .output()
        .expect("run l4lb check");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn without_c_the_working_directory_config_is_used_else_etc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = default_config_in(dir.path());
    assert!(out.contains("/etc/l4lb/l4lb.toml"), "{out}");

    std::fs::create_dir(dir.path().join("config")).expect("mkdir");
    std::fs::copy(
        repo_path("config/l4lb.toml"),
        dir.path().join("config/l4lb.toml"),
    )
    .expect("copy config");
    let out = default_config_in(dir.path());
    assert!(
        out.contains("configuration file config/l4lb.toml syntax is ok"),
        "{out}"
    );
}

/// Every name a systemd syscall filter entry stands for (groups expanded).
fn syscall_names(entry: &str, out: &mut BTreeSet<String>) {
    if !entry.starts_with('@') {
        out.insert(entry.to_string());
        return;
    }
    let listing = Command::new("systemd-analyze")
        .args(["syscall-filter", entry])
        .output()
        .expect("systemd-analyze (Debian package systemd; cargo xtask setup installs it)");
    assert!(
        listing.status.success(),
        "systemd-analyze syscall-filter {entry}"
    );
    for line in String::from_utf8_lossy(&listing.stdout).lines().skip(1) {
        let name = line.trim();
        if !name.is_empty() && !name.starts_with('#') {
            syscall_names(name, out);
        }
    }
}

/// An echo server on a thread of its own.
fn echo_backend() -> std::net::SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = conn.try_clone().expect("clone");
                let _ = std::io::copy(&mut reader, &mut conn);
            });
        }
    });
    addr
}

#[test]
fn the_units_sandbox_allows_every_call_and_socket_family_the_daemon_uses() {
    if std::env::var("L4LB_NO_EBPF").is_ok_and(|v| v == "1") {
        eprintln!("the_units_sandbox_allows...: skipped by request (L4LB_NO_EBPF=1)");
        return;
    }
    let backend = echo_backend();
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let trace_dir = tempfile::tempdir().expect("tempdir");
    let trace = trace_dir.path().join("strace.out");
    let launcher: Vec<String> = [
        "strace",
        "-f",
        "-qq",
        "-o",
        trace.to_str().expect("utf-8"),
        "--",
    ]
    .map(String::from)
    .to_vec();
    let d = Daemon::spawn_via(
        &format!(
            "[global]\nsplice = \"required\"\nsplice_after_time = 0\n\n[upstream.u]\nservers = [{{ address = \"{backend}\" }}]\n\n[[server]]\nlisten = \"{listen}\"\nproxy_pass = \"u\"\n"
        ),
        &[],
        &launcher,
    );
    assert!(
        d.wait_log("l4lb started", Duration::from_secs(30)),
        "log:\n{}",
        d.log()
    );
    // strace's child is the daemon: signals go to it, not to strace.
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", d.pid()))
        .expect("strace's children");
    let pid: i32 = children
        .split_whitespace()
        .next()
        .expect("a child")
        .parse()
        .expect("pid");
    let signal = |sig| {
        // SAFETY: kill(2) on the daemon this test started has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
    };

    // A spliced session, a reload, a log reopen and the drain: what a service does.
    let mut conn = TcpStream::connect(listen).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    for _ in 0..3 {
        conn.write_all(&[7u8; 256]).expect("send");
        let mut back = [0u8; 256];
        conn.read_exact(&mut back).expect("echo");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(conn);
    assert!(
        d.wait_log("path=\"kernel\"", Duration::from_secs(10)),
        "log:\n{}",
        d.log()
    );
    signal(libc::SIGHUP);
    assert!(
        d.wait_log("configuration reloaded", Duration::from_secs(10)),
        "log:\n{}",
        d.log()
    );
    signal(libc::SIGUSR1);
    assert!(
        d.wait_log("log files reopened", Duration::from_secs(10)),
        "log:\n{}",
        d.log()
    );
    signal(libc::SIGTERM);
    let status = d
        .wait_exit(Duration::from_secs(40))
        .expect("l4lb did not stop");
    assert!(status.success(), "{status}; log:\n{}", d.log());

    let trace = std::fs::read_to_string(&trace).expect("strace output");
    let mut used = BTreeSet::new();
    let mut families = BTreeSet::new();
    for line in trace.lines() {
        // "PID  name(args..." or "PID  <... name resumed> ..."
        let call = line
            .split_once(' ')
            .map_or("", |(_, rest)| rest.trim_start());
        let call = call.strip_prefix("<... ").unwrap_or(call);
        let name: String = call
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() || name == "exited" || name == "killed" {
            continue;
        }
        if let Some(args) = call.strip_prefix("socket(") {
            families.insert(args.split(',').next().unwrap_or("").to_string());
        }
        used.insert(name);
    }
    assert!(
        used.contains("bpf"),
        "no bpf(2) seen: is this the kernel path? {used:?}"
    );

    let unit = read(UNIT);
    let mut allowed = BTreeSet::new();
    for entry in unit_values(&unit, "SystemCallFilter") {
        syscall_names(&entry, &mut allowed);
    }
    let refused: Vec<&String> = used.difference(&allowed).collect();
    assert!(
        refused.is_empty(),
        "SystemCallFilter= would refuse {refused:?}"
    );
    let permitted: BTreeSet<String> = unit_values(&unit, "RestrictAddressFamilies")
        .into_iter()
        .collect();
    let refused: Vec<&String> = families.difference(&permitted).collect();
    assert!(
        refused.is_empty(),
        "RestrictAddressFamilies= would refuse {refused:?}"
    );
}
