//! A real etcd (Debian's `etcd-server`, 3.4) on 127.0.0.1 random ports with a temporary
//! data directory, driven through its JSON gateway; and a TCP relay that can cut the
//! daemon off from it.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::{free_port, http};

pub struct Etcd {
    pub addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

impl Etcd {
    pub fn start() -> Etcd {
        let bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("etcd not found: apt-get install -y etcd-server");
        let dir = tempfile::tempdir().expect("tempdir");
        let (client, peer) = (free_port(), free_port());
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
        let child = Command::new(bin)
            .args(["--name", "t", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &format!("t=http://127.0.0.1:{peer}"),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        let e = Etcd {
            addr: format!("127.0.0.1:{client}").parse().expect("addr"),
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while e
            .try_call("/v3/kv/range", &json!({"key": b64("probe")}))
            .is_none()
        {
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        e
    }

    fn try_call(&self, path: &str, body: &Value) -> Option<Value> {
        let s =
            std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).ok()?;
        drop(s);
        let (status, text) = http(
            self.addr,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            &body.to_string(),
        );
        (status == 200)
            .then(|| serde_json::from_str(&text).ok())
            .flatten()
    }

    fn call(&self, path: &str, body: Value) -> Value {
        self.try_call(path, &body)
            .unwrap_or_else(|| panic!("etcd {path} {body} failed"))
    }

    /// Puts a key; returns the new revision.
    pub fn put(&self, key: &str, value: &str) -> i64 {
        let r = self.call("/v3/kv/put", json!({"key": b64(key), "value": b64(value)}));
        revision(&r)
    }

    pub fn delete(&self, key: &str) -> i64 {
        revision(&self.call("/v3/kv/deleterange", json!({"key": b64(key)})))
    }

    /// Compacts history up to `revision` (physically, so old revisions are gone).
    pub fn compact(&self, revision: i64) {
        self.call(
            "/v3/kv/compaction",
            json!({"revision": revision.to_string(), "physical": true}),
        );
    }

    /// `http://ADDR/PREFIX` as l4lb's etcd url.
    pub fn url_via(addr: SocketAddr, prefix: &str) -> String {
        format!("http://{addr}/{prefix}")
    }
}

fn revision(v: &Value) -> i64 {
    v["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .expect("revision")
}

/// Forwards 127.0.0.1:PORT to a target; `cut` drops every connection and refuses new
/// ones until `restore`.
pub struct Relay {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    task: JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (o, c) = (Arc::clone(&open), Arc::clone(&conns));
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                if !o.load(Ordering::SeqCst) {
                    let _ = client.set_zero_linger();
                    continue;
                }
                let h = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                c.lock().unwrap_or_else(|p| p.into_inner()).push(h);
            }
        });
        Relay {
            addr,
            open,
            conns,
            task,
        }
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for h in self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            h.abort();
        }
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}
