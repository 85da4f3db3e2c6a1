//! The README's quick start, as a newcomer runs it: `cargo xtask run` on the default
//! configuration serves 127.0.0.1:8080 from two demo backends, balancing between them,
//! and SIGTERM to xtask stops the daemon (after its drain) and the backends.
//! Uses the default configuration's fixed ports, so it fails when one is taken.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A cold release build of l4lb before it serves; generous for a fresh machine.
const LIMIT: Duration = Duration::from_secs(900);
/// config/l4lb.toml: the listener, the two servers, the admin API, upstream_show.
const PORTS: [u16; 5] = [8080, 8081, 8082, 9180, 13307];

struct Xtask(Child);

impl Drop for Xtask {
    fn drop(&mut self) {
        // Only if the test failed before stopping it; SIGTERM lets it stop the daemon.
        if let Ok(pid) = libc::pid_t::try_from(self.0.id()) {
            // SAFETY: kill(2) on our own child has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = self.0.wait();
    }
}

fn free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// GET / through the balancer: the body, or None while nothing answers.
fn get() -> Option<String> {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, 8080)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n")
        .map(|(_, body)| body.trim().to_string())
}

fn log(dir: &tempfile::TempDir) -> String {
    std::fs::read_to_string(dir.path().join("xtask.log")).unwrap_or_default()
}

#[test]
fn cargo_xtask_run_serves_the_demo_backends_and_stops_with_them() {
    for port in PORTS {
        assert!(
            free(port),
            "127.0.0.1:{port} is taken: the quick start needs it"
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut xtask = Xtask(
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .arg("run")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout.txt")).expect("stdout"))
            .stderr(std::fs::File::create(dir.path().join("xtask.log")).expect("log"))
            .spawn()
            .expect("start xtask"),
    );

    let deadline = Instant::now() + LIMIT;
    let first = loop {
        if let Some(body) = get() {
            break body;
        }
        if let Some(status) = xtask.0.try_wait().expect("wait") {
            panic!("xtask run exited ({status}); log:\n{}", log(&dir));
        }
        assert!(
            Instant::now() < deadline,
            "nothing served 8080; log:\n{}",
            log(&dir)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut names = vec![first];
    names.extend((0..3).map(|_| get().expect("served")));
    // least_conn with one connection at a time: ties go round the servers.
    let mut seen = names.clone();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, ["demo-backend-1", "demo-backend-2"], "{names:?}");

    // SAFETY: kill(2) on our own child has no memory-safety preconditions.
    unsafe { libc::kill(xtask.0.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(status) = xtask.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "xtask run did not stop; log:\n{}",
            log(&dir)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}; log:\n{}", log(&dir));
    let log = log(&dir);
    assert!(
        log.contains("draining sessions") && log.contains("stopped"),
        "{log}"
    );
    for port in PORTS {
        assert!(
            free(port),
            "127.0.0.1:{port} still taken after xtask run stopped"
        );
    }
}
