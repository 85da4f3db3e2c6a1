//! The capabilities the kernel path needs, measured on the real binary: as an
//! unprivileged user (uid/gid 65534, no groups, no_new_privs, RLIMIT_MEMLOCK 0) holding
//! exactly `capabilities::KERNEL_PATH` as ambient capabilities (what the systemd unit
//! grants), `splice = "required"` starts and splices a session; with any one of them
//! removed it refuses to start and names the missing one. The container form (uid 0 with
//! only these in the bounding set, as `cap_drop: ALL` + `cap_add` gives) splices too.
//! Ports below 1024 need CAP_NET_BIND_SERVICE on top, and say so.
//!
//! Needs root (setpriv changes credentials). The kernel cases fail loudly when eBPF
//! cannot load; `L4LB_NO_EBPF=1` skips them on purpose, saying so.

mod support;

#[path = "../l4lb-user/src/capabilities.rs"]
#[allow(dead_code)] // the daemon's helpers around the list; the test needs the list
mod capabilities;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use caps::Capability;
use support::{free_port, Backend, Behaviour, Daemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NOBODY: u32 = 65534;

/// False (with a note) when the run asked to skip the eBPF cases.
fn kernel_wanted(test: &str) -> bool {
    if std::env::var("L4LB_NO_EBPF").is_ok_and(|v| v == "1") {
        eprintln!("{test}: skipped by request (L4LB_NO_EBPF=1)");
        return false;
    }
    true
}

fn must_be_root() {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests change credentials with setpriv: run them as root"
    );
}

fn documented() -> Vec<Capability> {
    capabilities::KERNEL_PATH.iter().map(|(c, _)| *c).collect()
}

/// `CAP_NET_ADMIN` -> `,+net_admin` for setpriv's lists.
fn setpriv_list(set: &[Capability]) -> String {
    set.iter()
        .map(|c| {
            let name = c.to_string().to_lowercase();
            format!(",+{}", name.trim_start_matches("cap_"))
        })
        .collect()
}

/// setpriv as nobody with `set` ambient (so it survives the exec of a file without
/// file capabilities), the way systemd's User= + AmbientCapabilities= start it.
/// RLIMIT_MEMLOCK 0 shows that neither LimitMEMLOCK= nor CAP_SYS_RESOURCE matters (BPF
/// memory is charged to the memory cgroup since Linux 5.11).
fn as_nobody_with(set: &[Capability]) -> Vec<String> {
    let list = setpriv_list(set);
    let mut cmd: Vec<String> = vec![
        "setpriv".into(),
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".into(),
        "--no-new-privs".into(),
        format!("--inh-caps=-all{list}"),
        format!("--ambient-caps=-all{list}"),
        format!("--bounding-set=-all{list}"),
    ];
    cmd.extend(["prlimit".into(), "--memlock=0:0".into()]);
    cmd
}

/// setpriv as root limited to `set` by the bounding set: a container's root after
/// `cap_drop: [ALL]` and `cap_add`.
fn as_container_root_with(set: &[Capability]) -> Vec<String> {
    let list = setpriv_list(set);
    vec![
        "setpriv".into(),
        "--no-new-privs".into(),
        "--inh-caps=-all".into(),
        "--ambient-caps=-all".into(),
        format!("--bounding-set=-all{list}"),
    ]
}

fn config(listen: SocketAddr, backend: SocketAddr, splice: &str) -> String {
    format!(
        r#"
[global]
splice = "{splice}"
splice_after_time = 0
access_log = true

[upstream.u]
servers = [{{ address = "{backend}" }}]

[[server]]
listen = "{listen}"
proxy_pass = "u"
"#
    )
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Waits for "l4lb started"; panics with the log when the daemon exits or hangs.
fn wait_started(d: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.log().contains("l4lb started") {
        if let Some(status) = d.exited() {
            panic!("l4lb exited ({status}) before starting; log:\n{}", d.log());
        }
        assert!(
            Instant::now() < deadline,
            "l4lb did not start; log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A field of /proc/PID/status.
fn proc_status(pid: i32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The daemon runs with exactly `set` in effect, and a session goes through the kernel.
async fn splices_with(d: &Daemon, listen: SocketAddr, set: &[Capability], uid: u32) {
    wait_started(d);
    assert!(
        d.log().contains("kernel splice path loaded"),
        "log:\n{}",
        d.log()
    );
    let effective = u64::from_str_radix(&proc_status(d.pid(), "CapEff:"), 16).expect("CapEff");
    let wanted = set.iter().fold(0u64, |m, c| m | c.bitmask());
    assert_eq!(
        effective, wanted,
        "effective set {effective:#x}, wanted {wanted:#x}"
    );
    let uids = proc_status(d.pid(), "Uid:");
    assert!(
        uids.split_whitespace().all(|u| u == uid.to_string()),
        "Uid: {uids}"
    );

    let mut s = TcpStream::connect(listen).await.expect("connect");
    // Several round trips on an open connection: the session is inserted while it
    // carries bytes, and no FIN races the insert.
    for i in 0..5u8 {
        let msg = [i; 64];
        s.write_all(&msg).await.expect("send");
        let mut back = [0u8; 64];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .expect("echo timed out")
            .expect("echo");
        assert_eq!(back, msg);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(s);
    assert!(
        d.wait_log(" access: ", Duration::from_secs(10)),
        "no access log line; log:\n{}",
        d.log()
    );
    let line = d.access_lines().concat();
    assert!(
        line.contains("path=\"kernel\"") || line.contains("path=kernel"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_set_loads_and_splices_as_an_unprivileged_user() {
    if !kernel_wanted("the_documented_set_loads_and_splices_as_an_unprivileged_user") {
        return;
    }
    must_be_root();
    let backend = Backend::start(Behaviour::Echo).await;
    let set = documented();
    let listen = loopback(free_port());
    let d = Daemon::spawn_via(
        &config(listen, backend.addr, "required"),
        &[],
        &as_nobody_with(&set),
    );
    splices_with(&d, listen, &set, NOBODY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_set_splices_as_a_container_root() {
    if !kernel_wanted("the_documented_set_splices_as_a_container_root") {
        return;
    }
    must_be_root();
    let backend = Backend::start(Behaviour::Echo).await;
    let set = documented();
    let listen = loopback(free_port());
    let d = Daemon::spawn_via(
        &config(listen, backend.addr, "required"),
        &[],
        &as_container_root_with(&set),
    );
    splices_with(&d, listen, &set, 0).await;
}

#[test]
fn without_any_one_capability_required_refuses_to_start_and_names_it() {
    if !kernel_wanted("without_any_one_capability_required_refuses_to_start_and_names_it") {
        return;
    }
    must_be_root();
    let set = documented();
    for removed in &set {
        let rest: Vec<Capability> = set.iter().copied().filter(|c| c != removed).collect();
        // Nothing needs to answer: the daemon must stop before it connects anywhere.
        let d = Daemon::spawn_via(
            &config(loopback(free_port()), loopback(free_port()), "required"),
            &[],
            &as_nobody_with(&rest),
        );
        let status = d
            .wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("without {removed} l4lb kept running; log:\n{}", d.log()));
        assert!(!status.success(), "without {removed}: {status}");
        let log = d.log();
        let lacks = log
            .lines()
            .find(|l| l.contains("splice = \"required\" but the kernel path cannot be loaded"))
            .and_then(|l| l.split_once("lacks "))
            .and_then(|(_, rest)| rest.split_once(" in its effective capability set"))
            .map(|(named, _)| named.to_string())
            .unwrap_or_else(|| {
                panic!("without {removed}: no missing capability named; log:\n{log}")
            });
        assert!(
            lacks.starts_with(&format!("{removed} (")),
            "without {removed}: {lacks}"
        );
        for present in &rest {
            assert!(
                !lacks.contains(&present.to_string()),
                "{present} named missing: {lacks}"
            );
        }
    }
}

#[test]
fn a_port_below_1024_needs_net_bind_service_and_says_so() {
    must_be_root();
    // The copy path only: what is measured here is the bind, not eBPF.
    let port = (900..1024)
        .find(|p| std::net::TcpListener::bind(loopback(*p)).is_ok())
        .expect("a free port below 1024 on 127.0.0.1");
    let cfg = config(loopback(port), loopback(free_port()), "off");
    let set = documented();

    let d = Daemon::spawn_via(&cfg, &[], &as_nobody_with(&set));
    let status = d
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("l4lb bound port {port} without the capability"));
    assert!(!status.success(), "{status}");
    assert!(
        d.log().contains(&format!(
            "ports below 1024 need {}",
            capabilities::LOW_PORTS
        )),
        "log:\n{}",
        d.log()
    );

    let mut with_bind = set.clone();
    with_bind.push(capabilities::LOW_PORTS);
    let d = Daemon::spawn_via(&cfg, &[], &as_nobody_with(&with_bind));
    wait_started(&d);
}
