//! The service-manager protocol (systemd `Type=notify`) against the real binary, with
//! the test as the service manager: a unix datagram socket in `NOTIFY_SOCKET`.
//! READY=1 comes only once the listener accepts (the start is held back by a
//! strong_dependency upsync source that fails at first), RELOADING=1 then READY=1 on
//! SIGHUP (also for a rejected file), STOPPING=1 on SIGTERM.

mod support;

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use support::consul::{Consul, Fault};
use support::{free_port, Backend, Behaviour, Daemon};

const PREFIX: &str = "upstreams/app/";

/// The test's end of NOTIFY_SOCKET.
struct Manager {
    sock: UnixDatagram,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Manager {
    fn bind() -> Manager {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        Manager {
            sock,
            path,
            _dir: dir,
        }
    }

    /// The next message, or None after `wait`.
    fn next(&self, wait: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(wait)).expect("timeout");
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("notify socket: {e}"),
        }
    }

    /// The next message, which must come within 10 s.
    fn expect(&self, d: &Daemon, what: &str) -> String {
        self.next(Duration::from_secs(10)).unwrap_or_else(|| {
            panic!(
                "no notification while waiting for {what}; log:\n{}",
                d.log()
            )
        })
    }
}

/// The lines of a notification (each `KEY=VALUE`).
fn fields(msg: &str) -> Vec<&str> {
    msg.lines().filter(|l| !l.is_empty()).collect()
}

fn config(listen: SocketAddr, consul_url: &str) -> String {
    format!(
        r#"
[global]
splice = "off"

[upstream.app.upsync]
type = "consul"
url = "{consul_url}"
interval = "1s"
timeout = "1s"
strong_dependency = true

[[server]]
listen = "{listen}"
proxy_pass = "app"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_after_listening_reloading_then_ready_on_sighup_stopping_on_sigterm() {
    let backend = Backend::start(Behaviour::Tagged("app".into())).await;
    let consul = Consul::start().await;
    consul.put(&format!("{PREFIX}{}", backend.addr), "");
    // The first try fails: the start waits `interval` (1 s) before the next one.
    consul.set_fault(Fault::Status500);
    let manager = Manager::bind();
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let notify_socket = manager.path.to_str().expect("utf-8 path").to_string();
    let d = Daemon::spawn(
        &config(listen, &consul.kv_url(PREFIX)),
        &[("NOTIFY_SOCKET", &notify_socket)],
    );

    // Still starting: no READY=1, and nothing listens.
    let started = support::wait_until(Duration::from_secs(10), || consul.reads() >= 1).await;
    assert!(
        started.is_some(),
        "the source was never asked; log:\n{}",
        d.log()
    );
    assert_eq!(
        manager.next(Duration::from_millis(300)),
        None,
        "notified before listening"
    );
    assert!(
        std::net::TcpStream::connect(listen).is_err(),
        "listening before the source answered"
    );
    consul.set_fault(Fault::None);

    // READY=1, and at that moment the listener accepts and serves.
    let ready = manager.expect(&d, "READY=1");
    assert!(fields(&ready).contains(&"READY=1"), "{ready}");
    assert!(ready.contains("STATUS=1 listeners"), "{ready}");
    let (tag, conn) = support::connect_tagged(listen)
        .await
        .expect("served after READY=1");
    assert_eq!(tag, "app");
    // Closed now, so the drain at the end has nothing to wait for.
    drop(conn);

    // A reload: RELOADING=1 (with the monotonic time notify-reload needs), then READY=1.
    d.signal(libc::SIGHUP);
    let reloading = manager.expect(&d, "RELOADING=1");
    assert!(fields(&reloading).contains(&"RELOADING=1"), "{reloading}");
    assert!(
        fields(&reloading)
            .iter()
            .any(|f| f.starts_with("MONOTONIC_USEC=")),
        "{reloading}"
    );
    let again = manager.expect(&d, "READY=1 after the reload");
    assert!(fields(&again).contains(&"READY=1"), "{again}");
    assert!(d.log().contains("configuration reloaded"), "{}", d.log());

    // A file with errors is rejected, and the service is ready again all the same.
    std::fs::write(&d.config_path, "[global]\nnot_a_key = 1\n").expect("rewrite config");
    d.signal(libc::SIGHUP);
    assert!(fields(&manager.expect(&d, "RELOADING=1")).contains(&"RELOADING=1"));
    assert!(fields(&manager.expect(&d, "READY=1")).contains(&"READY=1"));
    assert!(d.log().contains("reload rejected"), "{}", d.log());

    // SIGTERM: STOPPING=1, then a clean exit.
    d.signal(libc::SIGTERM);
    let stopping = manager.expect(&d, "STOPPING=1");
    assert!(fields(&stopping).contains(&"STOPPING=1"), "{stopping}");
    let status = d
        .wait_exit(Duration::from_secs(40))
        .expect("l4lb kept running");
    assert!(status.success(), "{status}");
    assert_eq!(
        manager.next(Duration::from_millis(100)),
        None,
        "notified after STOPPING=1"
    );
}
