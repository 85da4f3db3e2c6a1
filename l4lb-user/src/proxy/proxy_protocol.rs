//! PROXY protocol headers (v1 text, v2 binary) sent to the backend before any client
//! byte, so backends see the real client address.

use std::net::SocketAddr;

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
    let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
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
            let ip6 = |a: SocketAddr| match a {
                SocketAddr::V4(v4) => v4.ip().to_ipv6_mapped(),
                SocketAddr::V6(v6) => *v6.ip(),
            };
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

#[cfg(test)]
mod tests {
    use super::*;

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
