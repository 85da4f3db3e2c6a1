//! One check of one server: connect, and for the protocol types, a short exchange.
//! Every failure says why in a few words, for logs and `upstream_show`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::active::Outcome;
use crate::config::CheckKind;

/// The most a check reads from a server before it gives up matching.
const MAX_REPLY: usize = 16 * 1024;

/// Runs one check, all of it within `timeout`; a reply that came but did not match
/// in time is quoted in the reason. `Err` when this host could not connect for want of
/// descriptors or memory: that says nothing about the server (as for sessions'
/// connects, see `proxy::connect`).
pub async fn check(
    kind: &CheckKind,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Outcome, String> {
    let deadline = Instant::now() + timeout;
    let stream = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e))
            if crate::proxy::is_resource_exhaustion(&e) || crate::proxy::is_port_shortage(&e) =>
        {
            return Err(format!("connect: {e}"))
        }
        Ok(Err(e)) => return Ok(Outcome::Fail(format!("connect: {e}"))),
        Err(_) => {
            return Ok(Outcome::Fail(format!(
                "connect timed out after {timeout:?}"
            )))
        }
    };
    // Reads quote what came by the deadline; the bound around the whole exchange also
    // covers a send or close to a server that stopped reading.
    Ok(
        match tokio::time::timeout_at(deadline, exchange(kind, stream, deadline, timeout)).await {
            Ok(Ok(())) => Outcome::Pass,
            Ok(Err(why)) => Outcome::Fail(why),
            Err(_) => Outcome::Fail(format!("timed out after {timeout:?}")),
        },
    )
}

async fn exchange(
    kind: &CheckKind,
    mut stream: TcpStream,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), String> {
    let reader = Reader { deadline, timeout };
    let _ = stream.set_nodelay(true);
    let result = match kind {
        CheckKind::Tcp => Ok(Vec::new()),
        CheckKind::SendExpect { send, expect } => {
            send_all(&mut stream, send).await?;
            reader
                .until(&mut stream, |reply| expect.is_match(reply))
                .await
                .map_err(|(why, reply)| {
                    format!("{why}; expected /{expect}/, got {}", shown(&reply))
                })
        }
        CheckKind::Redis => {
            send_all(&mut stream, b"PING\r\n").await?;
            reader
                .until(&mut stream, |reply| reply.contains(&b'\n'))
                .await
                .map_err(|(why, reply)| format!("{why}; got {}", shown(&reply)))
                .and_then(|reply| {
                    if reply.starts_with(b"+PONG") {
                        Ok(reply)
                    } else {
                        Err(format!("expected +PONG, got {}", shown(&reply)))
                    }
                })
        }
        CheckKind::Mysql => reader.mysql_handshake(&mut stream).await,
    };
    // A quiet close: no reset for the server to log.
    let _ = stream.shutdown().await;
    result.map(|_| ())
}

/// Reads of one check, each bounded by the check's deadline.
struct Reader {
    deadline: Instant,
    timeout: Duration,
}

async fn send_all(stream: &mut TcpStream, bytes: &[u8]) -> Result<(), String> {
    if bytes.is_empty() {
        return Ok(());
    }
    stream
        .write_all(bytes)
        .await
        .map_err(|e| format!("send: {e}"))
}

impl Reader {
    fn timed_out(&self) -> String {
        format!("timed out after {:?}", self.timeout)
    }

    /// Reads until `done` holds for what has arrived; on failure returns why and what
    /// came.
    async fn until(
        &self,
        stream: &mut TcpStream,
        done: impl Fn(&[u8]) -> bool,
    ) -> Result<Vec<u8>, (String, Vec<u8>)> {
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = match tokio::time::timeout_at(self.deadline, stream.read(&mut buf)).await {
                Err(_) => return Err((self.timed_out(), reply)),
                Ok(Err(e)) => return Err((format!("read: {e}"), reply)),
                Ok(Ok(n)) => n,
            };
            if n == 0 {
                return Err(("closed before a match".to_string(), reply));
            }
            reply.extend_from_slice(&buf[..n]);
            if done(&reply) {
                return Ok(reply);
            }
            if reply.len() >= MAX_REPLY {
                return Err((format!("no match in {MAX_REPLY} bytes"), reply));
            }
        }
    }

    async fn exact(
        &self,
        stream: &mut TcpStream,
        buf: &mut [u8],
        what: &str,
    ) -> Result<(), String> {
        match tokio::time::timeout_at(self.deadline, stream.read_exact(buf)).await {
            Err(_) => Err(format!("{what}: {}", self.timed_out())),
            Ok(Err(e)) => Err(format!("{what}: {e}")),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// The first packet a MySQL/MariaDB server sends: protocol 10 handshake, or an
    /// error packet (too many connections, host blocked) whose message is the reason.
    async fn mysql_handshake(&self, stream: &mut TcpStream) -> Result<Vec<u8>, String> {
        let mut header = [0u8; 4];
        self.exact(stream, &mut header, "no handshake").await?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
        if len == 0 || len > MAX_REPLY {
            return Err(format!("not a MySQL packet (length {len})"));
        }
        let mut payload = vec![0u8; len];
        self.exact(stream, &mut payload, "handshake cut short")
            .await?;
        match payload.first() {
            Some(10) => Ok(payload),
            // Error packet: 0xff, 2-byte code, then (in a handshake) the message.
            Some(0xff) => {
                let code = payload
                    .get(1..3)
                    .map_or(0, |c| u16::from_le_bytes([c[0], c[1]]));
                let message = payload.get(3..).map_or_else(String::new, |m| {
                    String::from_utf8_lossy(m)
                        .trim_start_matches('#')
                        .to_string()
                });
                Err(format!("server error {code}: {message}"))
            }
            Some(v) => Err(format!("not a MySQL handshake (protocol byte {v})")),
            None => Err("empty handshake".to_string()),
        }
    }
}

/// A reply as shown in a reason: escaped, at most 64 bytes.
fn shown(reply: &[u8]) -> String {
    let head = &reply[..reply.len().min(64)];
    let text: String = head.escape_ascii().to_string();
    if reply.len() > head.len() {
        format!("\"{text}...\" ({} bytes)", reply.len())
    } else {
        format!("\"{text}\"")
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    /// A one-connection server that answers what the check sends with `reply`.
    async fn server(reply: &'static [u8], read_first: bool) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            if read_first {
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
            }
            let _ = s.write_all(reply).await;
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        });
        addr
    }

    const T: Duration = Duration::from_secs(2);

    async fn made(kind: &CheckKind, addr: SocketAddr, timeout: Duration) -> Outcome {
        check(kind, addr, timeout)
            .await
            .expect("the check was made")
    }

    #[tokio::test]
    async fn send_expect_matches_and_explains_a_mismatch() {
        let kind = CheckKind::SendExpect {
            send: b"PING\r\n".to_vec(),
            expect: regex::bytes::Regex::new("PO+NG").unwrap(),
        };
        let ok = server(b"+PONG\r\n", true).await;
        assert_eq!(made(&kind, ok, T).await, Outcome::Pass);
        let bad = server(b"-ERR nope\r\n", true).await;
        let Outcome::Fail(why) = made(&kind, bad, T).await else {
            panic!("a wrong reply must fail");
        };
        assert!(why.contains("-ERR nope") && why.contains("PO+NG"), "{why}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let kind = CheckKind::Redis;
        let got = made(&kind, l.local_addr().unwrap(), Duration::from_millis(200)).await;
        assert!(
            matches!(&got, Outcome::Fail(w) if w.contains("timed out")),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn mysql_handshake_error_packet_and_garbage() {
        // A protocol-10 greeting (truncated after the version string is enough).
        let ok = server(b"\x0b\x00\x00\x00\x0a10.11.6\x00\x01\x02", false).await;
        assert_eq!(made(&CheckKind::Mysql, ok, T).await, Outcome::Pass);
        let err = server(b"\x17\x00\x00\x00\xff\x10\x04Too many connections", false).await;
        let got = made(&CheckKind::Mysql, err, T).await;
        assert!(
            matches!(&got, Outcome::Fail(w) if w.contains("1040") && w.contains("Too many")),
            "{got:?}"
        );
        let junk = server(b"HTTP/1.1 400 Bad Request\r\n\r\n", false).await;
        assert!(matches!(
            made(&CheckKind::Mysql, junk, T).await,
            Outcome::Fail(_)
        ));
    }

    #[tokio::test]
    async fn tcp_fails_on_a_closed_port() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let got = made(&CheckKind::Tcp, addr, T).await;
        assert!(
            matches!(&got, Outcome::Fail(w) if w.contains("connect")),
            "{got:?}"
        );
    }
}
