//! The XDP access filter on a veth pair between two network namespaces this test
//! creates: a denied source's SYNs are dropped on the interface and never reach the
//! listener (no accept, no reset, the connect times out), an allowed source is served,
//! and a reload moves the rules.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use support::Daemon;

/// Two namespaces joined by a veth pair, removed on drop.
struct Link {
    server_ns: String,
    client_ns: String,
    server_if: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Link {
    fn new() -> Link {
        let id = std::process::id() % 100_000;
        let link = Link {
            server_ns: format!("l4lb-xdp-s{id}"),
            client_ns: format!("l4lb-xdp-c{id}"),
            server_if: format!("l4xs{id}"),
        };
        let client_if = format!("l4xc{id}");
        for ns in [&link.server_ns, &link.client_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&[
            "link",
            "add",
            &link.server_if,
            "type",
            "veth",
            "peer",
            "name",
            &client_if,
        ]);
        ip(&["link", "set", &link.server_if, "netns", &link.server_ns]);
        ip(&["link", "set", &client_if, "netns", &link.client_ns]);
        ip(&[
            "-n",
            &link.server_ns,
            "addr",
            "add",
            "10.231.0.1/24",
            "dev",
            &link.server_if,
        ]);
        for a in ["10.231.0.2/24", "10.231.0.3/24"] {
            ip(&["-n", &link.client_ns, "addr", "add", a, "dev", &client_if]);
        }
        ip(&["-n", &link.server_ns, "link", "set", &link.server_if, "up"]);
        ip(&["-n", &link.client_ns, "link", "set", &client_if, "up"]);
        link
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for ns in [&self.server_ns, &self.client_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Runs `f` on a thread that has entered network namespace `ns`.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("netns file");
            // SAFETY: setns(2) on a valid namespace fd; it changes only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread")
    })
}

/// Connects from `src` and fetches `upstream_show` through the proxy; Err says how
/// the connection failed.
fn fetch_from(src: &str, dst: SocketAddr) -> Result<String, std::io::ErrorKind> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| e.kind())?;
    let src: IpAddr = src.parse().expect("address");
    sock.bind(&SocketAddr::new(src, 0).into())
        .map_err(|e| e.kind())?;
    sock.connect_timeout(&dst.into(), Duration::from_millis(1500))
        .map_err(|e| e.kind())?;
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.kind())?;
    s.write_all(b"GET /upstream_show HTTP/1.0\r\n\r\n")
        .map_err(|e| e.kind())?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(|e| e.kind())?;
    Ok(body)
}

fn config(deny: &str) -> String {
    format!(
        r#"
[global]
splice = "off"
xdp_interface = "IFACE"

[admin]
listen = "127.0.0.1:7002"

[upstream.show]
servers = [{{ address = "127.0.0.1:7001" }}]

[[server]]
listen = "10.231.0.1:7000"
proxy_pass = "show"
access = ["deny {deny}", "allow all"]

[[server]]
listen = "127.0.0.1:7001"
upstream_show = true
"#
    )
}

fn scrape_in(ns: &str) -> support::Scrape {
    in_netns(ns, || {
        support::scrape(SocketAddr::from(([127, 0, 0, 1], 7002)))
    })
}

#[test]
fn denied_syns_are_dropped_on_the_interface() {
    if std::env::var("L4LB_NO_EBPF").is_ok_and(|v| v == "1") {
        eprintln!("denied_syns_are_dropped_on_the_interface: skipped by request (L4LB_NO_EBPF=1)");
        return;
    }
    let link = Link::new();
    let d = Daemon::start_in_netns(
        &link.server_ns,
        &config("10.231.0.3").replace("IFACE", &link.server_if),
    );
    let lb = SocketAddr::from(([10, 231, 0, 1], 7000));
    let listener = [("listener", "10.231.0.1:7000")];

    let ok = in_netns(&link.client_ns, || fetch_from("10.231.0.2", lb));
    assert!(
        ok.as_ref().is_ok_and(|b| b.contains("Upstream name: show")),
        "allowed client: {ok:?}\n{}",
        d.log()
    );
    let denied = in_netns(&link.client_ns, || fetch_from("10.231.0.3", lb));
    assert_eq!(
        denied.as_ref().err(),
        Some(&std::io::ErrorKind::TimedOut),
        "a denied SYN got an answer: {denied:?}"
    );
    let m = scrape_in(&link.server_ns);
    assert!(
        support::metric(&m, "l4lb_xdp_dropped_total", &[]) >= Some(1.0),
        "{:?}",
        m.samples
    );
    assert_eq!(
        support::metric(&m, "l4lb_accepted_total", &listener),
        Some(1.0),
        "the denied client reached the listener"
    );

    // A reload turns the rules round.
    d.reload(&config("10.231.0.2").replace("IFACE", &link.server_if));
    let now_ok = in_netns(&link.client_ns, || fetch_from("10.231.0.3", lb));
    assert!(now_ok.is_ok(), "{now_ok:?}\n{}", d.log());
    let now_denied = in_netns(&link.client_ns, || fetch_from("10.231.0.2", lb));
    assert_eq!(now_denied.err(), Some(std::io::ErrorKind::TimedOut));

    // A binary upgrade: the interface holds one XDP program, so the old process
    // detaches its filter and the new one attaches its own, with the same rules.
    d.signal(libc::SIGUSR2);
    assert!(
        d.wait_log("upgrade: handed over", Duration::from_secs(30)),
        "{}",
        d.log()
    );
    let denied = in_netns(&link.client_ns, || fetch_from("10.231.0.2", lb));
    assert_eq!(denied.err(), Some(std::io::ErrorKind::TimedOut));
    let m = scrape_in(&link.server_ns);
    assert!(
        support::metric(&m, "l4lb_xdp_dropped_total", &[]) >= Some(1.0),
        "the new process's filter dropped nothing: {:?}",
        m.samples
    );
    let allowed = in_netns(&link.client_ns, || fetch_from("10.231.0.3", lb));
    assert!(allowed.is_ok(), "{allowed:?}\n{}", d.log());
    // The new process is no child of this test: stop it through its pid.
    let new_pid = d
        .log()
        .lines()
        .find(|l| l.contains("upgrade: handed over"))
        .and_then(|l| support::log_field(l, "pid"))
        .and_then(|p| p.parse::<i32>().ok())
        .expect("the new process's pid in the log");
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(new_pid, libc::SIGKILL) };
    drop(d);
}
