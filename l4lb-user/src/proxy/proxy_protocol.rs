//! PROXY protocol headers (v1 text, v2 binary): read from a load balancer in front
//! (`proxy_protocol_in`, parsed by the `ppp` crate) and sent to the backend before any
//! client byte (`proxy_protocol`), so backends see the real client address.

use std::net::SocketAddr;
use std::time::Duration;

use ppp::{v1, v2, HeaderResult, PartialResult};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::ProxyProtocol;

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The header for a TCP connection from `src` to `dst` (the listener's address).
pub fn header(version: ProxyProtocol, src: SocketAddr, dst: SocketAddr) -> Option<Vec<u8>> {
    match version {
        ProxyProtocol::Off => None,
        ProxyProtocol::V1 => Some(v1(src, dst)),
        ProxyProtocol::V2 => Some(v2(src, dst)),
    }
}

fn v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    let (family, src_ip, dst_ip) = match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => ("TCP4", s.ip().to_string(), d.ip().to_string()),
        // A client from a PROXY header may be IPv6 on an IPv4 listener: both as IPv6.
        (s, d) => ("TCP6", ip6(s).to_string(), ip6(d).to_string()),
    };
    format!(
        "PROXY {family} {src_ip} {dst_ip} {} {}\r\n",
        src.port(),
        dst.port()
    )
    .into_bytes()
}

fn ip6(a: SocketAddr) -> std::net::Ipv6Addr {
    match a {
        SocketAddr::V4(v4) => v4.ip().to_ipv6_mapped(),
        SocketAddr::V6(v6) => *v6.ip(),
    }
}

fn v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    let mut h = V2_SIGNATURE.to_vec();
    h.push(0x21); // version 2, PROXY command
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            h.push(0x11); // AF_INET, STREAM
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&s.ip().octets());
            h.extend_from_slice(&d.ip().octets());
            h.extend_from_slice(&s.port().to_be_bytes());
            h.extend_from_slice(&d.port().to_be_bytes());
        }
        (s, d) => {
            h.push(0x21); // AF_INET6, STREAM
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&ip6(s).octets());
            h.extend_from_slice(&ip6(d).octets());
            h.extend_from_slice(&s.port().to_be_bytes());
            h.extend_from_slice(&d.port().to_be_bytes());
        }
    }
    h
}

/// Both addresses in one family: IPv4-mapped IPv6 addresses are written as IPv4.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canon = |a: SocketAddr| match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    };
    (canon(src), canon(dst))
}

/// Longest v1 header; a v2 header says its own length (at most 16 + 65,535 bytes).
const V1_MAX: usize = 107;
/// The longest v2 header: 16 bytes and a 16-bit length.
const V2_MAX: usize = 16 + u16::MAX as usize;

/// What a load balancer's PROXY header carried.
#[derive(Debug, PartialEq, Eq)]
pub struct Received {
    /// The client's address; `None` for a `LOCAL` (v2) or `UNKNOWN` (v1) header, sent
    /// by the balancer's own health checks: the connection's peer is the client then.
    pub client: Option<SocketAddr>,
    /// Client bytes that arrived with the header, to forward before any other.
    pub leftover: Vec<u8>,
}

/// Why a connection that must start with a PROXY header was closed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("closed before a complete PROXY header")]
    Closed,
    #[error("not a PROXY header: {0}")]
    Malformed(String),
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads a v1 or v2 header from the start of `stream` within `timeout`.
pub async fn receive(stream: &mut TcpStream, timeout: Duration) -> Result<Received, ReceiveError> {
    tokio::time::timeout(timeout, read_header(stream))
        .await
        .map_err(|_| ReceiveError::Timeout(timeout))?
}

async fn read_header(stream: &mut TcpStream) -> Result<Received, ReceiveError> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(ReceiveError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(received) = parse(&buf)? {
            return Ok(received);
        }
    }
}

/// A complete header, `None` while more bytes may complete it, or why it never will.
pub(crate) fn parse(buf: &[u8]) -> Result<Option<Received>, ReceiveError> {
    // ppp reads any text as a possibly partial v1 header; reject what cannot become one.
    let starts = |prefix: &[u8]| {
        buf.len().min(prefix.len()) > 0 && prefix.starts_with(&buf[..buf.len().min(prefix.len())])
    };
    if !starts(b"PROXY ") && !starts(&V2_SIGNATURE) {
        return Err(ReceiveError::Malformed(shown(buf)));
    }
    if buf.starts_with(b"PROXY ") {
        // A v1 line is judged whole: ppp takes a line cut between \r and \n as complete.
        // Only its longest possible length is searched, so a slow sender costs no more.
        let v1_line_end = buf[..buf.len().min(V1_MAX + 1)]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| p + 2);
        // Too long whether or not its end has arrived: how the bytes were split into
        // reads must not decide (ppp alone accepts a long UNKNOWN line that came whole).
        let too_long = match v1_line_end {
            Some(end) => end > V1_MAX,
            None => buf.len() >= V1_MAX,
        };
        if too_long {
            return Err(ReceiveError::Malformed(
                "v1 header longer than 107 bytes".into(),
            ));
        }
        if v1_line_end.is_none() {
            return Ok(None);
        }
    }
    let header = HeaderResult::parse(buf);
    if header.is_incomplete() {
        // ppp reads only the first line of v1, so a whole line it calls incomplete
        // (`PROXY TCP4\r\n`) stays so however much follows; a v2 header is complete
        // by its announced length, at most V2_MAX.
        if buf.starts_with(b"PROXY ") || buf.len() >= V2_MAX {
            return Err(ReceiveError::Malformed(format!(
                "incomplete header: {}",
                shown(buf)
            )));
        }
        return Ok(None);
    }
    let (len, client) = match header {
        HeaderResult::V1(Ok(h)) => (
            h.header.len(),
            match h.addresses {
                v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Unknown => None,
            },
        ),
        HeaderResult::V2(Ok(h)) => (
            h.len(),
            match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, _) => None,
            },
        ),
        HeaderResult::V1(Err(e)) => return Err(ReceiveError::Malformed(e.to_string())),
        HeaderResult::V2(Err(e)) => return Err(ReceiveError::Malformed(e.to_string())),
    };
    Ok(Some(Received {
        client,
        leftover: buf.get(len..).unwrap_or_default().to_vec(),
    }))
}

/// The first bytes of a bad header, escaped, for logs.
fn shown(buf: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(&buf[..buf.len().min(32)]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn received_headers_carry_the_client_and_keep_what_follows() {
        for (version, client) in [
            (ProxyProtocol::V1, "10.1.2.3:4567"),
            (ProxyProtocol::V2, "10.1.2.3:4567"),
            (ProxyProtocol::V1, "[2001:db8::7]:40000"),
            (ProxyProtocol::V2, "[2001:db8::7]:40000"),
        ] {
            let mut bytes = header(version, addr(client), addr("127.0.0.1:3307")).unwrap();
            let len = bytes.len();
            bytes.extend_from_slice(b"HELLO");
            // Every prefix of the header is incomplete, never an error.
            for cut in 1..len {
                assert!(
                    parse(&bytes[..cut]).unwrap().is_none(),
                    "{version:?} cut {cut}"
                );
            }
            let got = parse(&bytes).unwrap().unwrap();
            assert_eq!(got.client, Some(addr(client)), "{version:?}");
            assert_eq!(got.leftover, b"HELLO");
        }
        let unknown = parse(b"PROXY UNKNOWN\r\nrest").unwrap().unwrap();
        assert_eq!((unknown.client, unknown.leftover), (None, b"rest".to_vec()));
        // v2 LOCAL (a balancer's own health check): no client address.
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(parse(&local).unwrap().unwrap().client, None);
    }

    #[test]
    fn what_is_not_a_header_is_malformed_at_once() {
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\x16\x03\x01",
            b"PROXY TCP4 10.0.0.1 nonsense 1 2\r\n",
            b"PROXY TCP4 999.0.0.1 10.0.0.2 1 2\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(ReceiveError::Malformed(_))),
                "{bad:?}"
            );
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert!(matches!(parse(&long), Err(ReceiveError::Malformed(_))));
        // Found by fuzzing: a 107-byte UNKNOWN line was refused when its end came in a
        // later read, and accepted when it came whole.
        let unknown = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 93], b"\r\n"].concat();
        assert_eq!(unknown.len(), 109);
        assert!(matches!(parse(&unknown), Err(ReceiveError::Malformed(_))));
        assert!(matches!(
            parse(&unknown[..107]),
            Err(ReceiveError::Malformed(_))
        ));
        // A whole line ppp finds short stays short, however much follows: refused at
        // once rather than buffered until the timeout.
        for short in [&b"PROXY TCP4\r\n"[..], b"PROXY TCP4 10.0.0.1 10.0.0.2\r\n"] {
            let streaming = [short, &[b'x'; 4096]].concat();
            for buf in [short, &streaming] {
                assert!(
                    matches!(parse(buf), Err(ReceiveError::Malformed(_))),
                    "{buf:?}"
                );
            }
        }
        let longest = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 91], b"\r\n"].concat();
        assert_eq!(longest.len(), V1_MAX);
        assert!(parse(&longest).unwrap().is_some());
    }

    #[test]
    fn v1_text() {
        let h = header(
            ProxyProtocol::V1,
            "10.1.2.3:4567".parse().unwrap(),
            "127.0.0.1:3307".parse().unwrap(),
        );
        assert_eq!(h.unwrap(), b"PROXY TCP4 10.1.2.3 127.0.0.1 4567 3307\r\n");
    }

    #[test]
    fn v2_binary_ipv4() {
        let h = header(
            ProxyProtocol::V2,
            "10.1.2.3:4567".parse().unwrap(),
            "127.0.0.1:3307".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(&h[..12], &V2_SIGNATURE);
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 12);
        assert_eq!(&h[16..20], &[10, 1, 2, 3]);
        assert_eq!(&h[20..24], &[127, 0, 0, 1]);
        assert_eq!(u16::from_be_bytes([h[24], h[25]]), 4567);
        assert_eq!(u16::from_be_bytes([h[26], h[27]]), 3307);
        assert_eq!(h.len(), 28);
    }

    #[test]
    fn v2_binary_ipv6() {
        let h = header(
            ProxyProtocol::V2,
            "[::1]:1".parse().unwrap(),
            "[::2]:2".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(h[13], 0x21);
        assert_eq!(h.len(), 16 + 36);
    }

    #[test]
    fn off_sends_nothing() {
        assert!(header(
            ProxyProtocol::Off,
            "1.2.3.4:1".parse().unwrap(),
            "1.2.3.4:2".parse().unwrap()
        )
        .is_none());
    }
}
