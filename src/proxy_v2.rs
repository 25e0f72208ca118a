//! PROXY protocol version 2 headers, as specified by HAProxy's
//! "The PROXY protocol" document (section 2.2, binary header format).
//!
//! h8 sends one before the first byte of a forwarded stream when a service
//! sets `identity = "proxy-v2"`. The address block carries the peer daemon's
//! UDP address as the source and this daemon's address as the destination;
//! custom TLVs carry the verified caller identity. Sans-IO.

use std::net::{IpAddr, SocketAddr};

/// The 12-byte signature that starts every v2 header.
pub const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// TLV type of the caller's resource server name (custom range 0xE0–0xEF).
pub const TLV_PEER_NAME: u8 = 0xE0;
/// TLV type of the caller's client identifier.
pub const TLV_CLIENT_ID: u8 = 0xE1;
/// TLV type of the caller's source identifier.
pub const TLV_SOURCE_ID: u8 = 0xE2;
/// Maximum header size this module decodes.
pub const MAX_HEADER_LEN: usize = 16 + 1024;

/// A decoded header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    /// Source address (the caller's daemon).
    pub source: SocketAddr,
    /// Destination address (this daemon).
    pub destination: SocketAddr,
    /// TLVs in order: type and value.
    pub tlvs: Vec<(u8, Vec<u8>)>,
}

impl ProxyHeader {
    /// Finds the value of the first TLV of `kind`.
    pub fn tlv(&self, kind: u8) -> Option<&[u8]> {
        self.tlvs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.as_slice())
    }
}

/// Encodes a PROXY v2 header with command PROXY over STREAM. A source and
/// destination of different families are both mapped to IPv6.
pub fn encode(source: SocketAddr, destination: SocketAddr, tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    let mut addresses = Vec::with_capacity(36);
    let family = match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            addresses.extend_from_slice(&s.octets());
            addresses.extend_from_slice(&d.octets());
            0x11 // AF_INET, STREAM
        }
        (s, d) => {
            addresses.extend_from_slice(&to_v6(s).octets());
            addresses.extend_from_slice(&to_v6(d).octets());
            0x21 // AF_INET6, STREAM
        }
    };
    addresses.extend_from_slice(&source.port().to_be_bytes());
    addresses.extend_from_slice(&destination.port().to_be_bytes());

    let mut body = addresses;
    for (kind, value) in tlvs {
        let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
        body.push(*kind);
        body.extend_from_slice(&len.to_be_bytes());
        body.extend_from_slice(&value[..len as usize]);
    }

    let mut header = Vec::with_capacity(16 + body.len());
    header.extend_from_slice(&SIGNATURE);
    header.push(0x21); // version 2, command PROXY
    header.push(family);
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    header.extend_from_slice(&len.to_be_bytes());
    header.extend_from_slice(&body);
    header
}

fn to_v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Errors decoding a header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    /// More bytes are needed.
    #[error("incomplete PROXY v2 header")]
    Incomplete,
    /// The bytes are not a valid v2 header.
    #[error("invalid PROXY v2 header: {0}")]
    Invalid(&'static str),
}

/// Decodes a header at the start of `bytes`; returns it and its length.
pub fn decode(bytes: &[u8]) -> Result<(ProxyHeader, usize), ProxyHeaderError> {
    if bytes.len() < 16 {
        return Err(ProxyHeaderError::Incomplete);
    }
    if bytes[..12] != SIGNATURE {
        return Err(ProxyHeaderError::Invalid("bad signature"));
    }
    if bytes[12] != 0x21 {
        return Err(ProxyHeaderError::Invalid(
            "not version 2 with command PROXY",
        ));
    }
    let len = u16::from_be_bytes([bytes[14], bytes[15]]) as usize;
    if 16 + len > MAX_HEADER_LEN {
        return Err(ProxyHeaderError::Invalid("header too long"));
    }
    let Some(body) = bytes.get(16..16 + len) else {
        return Err(ProxyHeaderError::Incomplete);
    };
    let (source, destination, rest) = match bytes[13] {
        0x11 => {
            let a = body
                .get(..12)
                .ok_or(ProxyHeaderError::Invalid("short IPv4 address block"))?;
            let ip = |o: usize| IpAddr::from([a[o], a[o + 1], a[o + 2], a[o + 3]]);
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            (
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
                &body[12..],
            )
        }
        0x21 => {
            let a = body
                .get(..36)
                .ok_or(ProxyHeaderError::Invalid("short IPv6 address block"))?;
            let ip = |o: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[o..o + 16]);
                IpAddr::from(octets)
            };
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            (
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
                &body[36..],
            )
        }
        _ => return Err(ProxyHeaderError::Invalid("unsupported address family")),
    };
    let mut tlvs = Vec::new();
    let mut rest = rest;
    while !rest.is_empty() {
        if rest.len() < 3 {
            return Err(ProxyHeaderError::Invalid("truncated TLV"));
        }
        let kind = rest[0];
        let len = u16::from_be_bytes([rest[1], rest[2]]) as usize;
        let value = rest
            .get(3..3 + len)
            .ok_or(ProxyHeaderError::Invalid("TLV longer than the header"))?;
        tlvs.push((kind, value.to_vec()));
        rest = &rest[3 + len..];
    }
    Ok((
        ProxyHeader {
            source,
            destination,
            tlvs,
        },
        16 + len,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_matches_specification_layout() {
        let source: SocketAddr = "127.0.0.2:4000".parse().expect("address");
        let destination: SocketAddr = "127.0.0.1:7401".parse().expect("address");
        let header = encode(source, destination, &[(TLV_PEER_NAME, b"server-a")]);
        let mut expected = SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x11, 0x00, 12 + 3 + 8]);
        expected.extend_from_slice(&[127, 0, 0, 2, 127, 0, 0, 1]);
        expected.extend_from_slice(&4000u16.to_be_bytes());
        expected.extend_from_slice(&7401u16.to_be_bytes());
        expected.extend_from_slice(&[0xE0, 0x00, 0x08]);
        expected.extend_from_slice(b"server-a");
        assert_eq!(header, expected);
    }

    #[test]
    fn header_round_trips() {
        let source: SocketAddr = "[::1]:4000".parse().expect("address");
        let destination: SocketAddr = "127.0.0.1:7401".parse().expect("address");
        let header = encode(
            source,
            destination,
            &[(TLV_CLIENT_ID, b"cid"), (TLV_SOURCE_ID, b"src")],
        );
        let (decoded, len) = decode(&header).expect("valid");
        assert_eq!(len, header.len());
        assert_eq!(decoded.source, source);
        assert_eq!(decoded.tlv(TLV_SOURCE_ID), Some(&b"src"[..]));
    }

    #[test]
    fn truncated_header_is_incomplete() {
        let header = encode(
            "127.0.0.1:1".parse().expect("a"),
            "127.0.0.1:2".parse().expect("a"),
            &[],
        );
        assert_eq!(
            decode(&header[..header.len() - 1]),
            Err(ProxyHeaderError::Incomplete)
        );
    }
}
