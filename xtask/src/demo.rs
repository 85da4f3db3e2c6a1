//! Demo backends for the quick start: `cargo xtask run` on the default configuration
//! starts one on each of its upstream's ports (127.0.0.1:8081 and :8082) where nothing
//! listens yet, so `curl 127.0.0.1:8080` or `nc 127.0.0.1 8080` shows balancing on a
//! fresh machine. They live in the xtask process and end with it, after the daemon.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result};

/// The servers of `[upstream.app_backend]` in config/l4lb.toml.
pub const BACKENDS: [(&str, u16); 2] = [("demo-backend-1", 8081), ("demo-backend-2", 8082)];

/// How long a new connection may take to show it speaks HTTP before it gets the
/// plain-text greeting: curl sends at once, a person at nc does not.
const HTTP_WAIT: Duration = Duration::from_millis(200);

/// Starts a demo backend on each port of [`BACKENDS`] that is free, saying what it
/// does; a port already in use is left to whatever listens there.
pub fn start_where_free() -> Result<()> {
    for (name, port) in BACKENDS {
        match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            Ok(listener) => {
                eprintln!(
                    "xtask: DEMO backend {name} on 127.0.0.1:{port} (replies with its name, then echoes; stops with the daemon)"
                );
                serve(listener, name);
            }
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                eprintln!("xtask: 127.0.0.1:{port} is in use: no demo backend there");
            }
            Err(e) => return Err(e).with_context(|| format!("demo backend on 127.0.0.1:{port}")),
        }
    }
    Ok(())
}

/// Accepts on a thread of its own, one thread per connection.
pub fn serve(listener: TcpListener, name: &'static str) {
    std::thread::spawn(move || {
        // A failed accept (a client gone before it was taken) concerns that client only.
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                // The demo has nobody to report a client's I/O error to.
                let _ = answer(conn, name);
            });
        }
    });
}

/// An HTTP request gets one response naming the backend; anything else gets the name
/// on a line of its own, then an echo of whatever it sends.
fn answer(mut conn: TcpStream, name: &str) -> std::io::Result<()> {
    conn.set_read_timeout(Some(HTTP_WAIT))?;
    let mut first = [0u8; 4096];
    let n = match conn.read(&mut first) {
        Ok(n) => n,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => 0,
        Err(e) => return Err(e),
    };
    let head = &first[..n];
    if [&b"GET "[..], b"HEAD ", b"POST ", b"PUT "]
        .iter()
        .any(|m| head.starts_with(m))
    {
        let body = format!("{name}\n");
        return conn.write_all(
            format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }
    conn.set_read_timeout(None)?;
    conn.write_all(format!("{name}\n").as_bytes())?;
    conn.write_all(head)?;
    let mut reader = conn.try_clone()?;
    std::io::copy(&mut reader, &mut conn)?;
    conn.shutdown(std::net::Shutdown::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(name: &'static str) -> u16 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        serve(listener, name);
        port
    }

    #[test]
    fn plain_clients_get_the_name_then_an_echo() {
        let port = backend("demo-x");
        let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect");
        c.write_all(b"ping\n").expect("send");
        c.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut out = String::new();
        c.read_to_string(&mut out).expect("read");
        assert_eq!(out, "demo-x\nping\n");
    }

    #[test]
    fn a_silent_client_is_greeted() {
        let port = backend("demo-y");
        let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect");
        let mut line = [0u8; 7];
        c.read_exact(&mut line).expect("greeting");
        assert_eq!(&line, b"demo-y\n");
    }

    #[test]
    fn http_clients_get_a_response_naming_the_backend() {
        let port = backend("demo-z");
        let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect");
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("send");
        let mut out = String::new();
        c.read_to_string(&mut out).expect("read");
        assert!(out.starts_with("HTTP/1.0 200 OK\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\ndemo-z\n"), "{out}");
    }
}
