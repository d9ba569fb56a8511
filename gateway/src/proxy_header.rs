//! PROXY protocol v2 headers from a front proxy (`--accept-proxy-protocol`), parsed by the
//! `ppp` crate: the device's real address, the SNI (PP2_TYPE_AUTHORITY) and, from a
//! terminating proxy, the verified device identity (PP2_TYPE_SSL's SSL_CN sub-TLV).
//!
//! A connection is taken to carry a header when its first byte is the signature's (`\r`; a
//! TLS record starts with 0x16, a frame with its length's high byte, 0). Only connections from
//! `--proxy-protocol-from` networks may: from anywhere else the connection is closed and
//! counted, the header never read. A header that is truncated, over 4 KiB, or malformed closes
//! the connection too. Connections without one (the proxy's health probes, devices that dial
//! the gateway directly) go on as before.

use std::net::SocketAddr;
use std::time::Duration;

use ppp::v2::{Addresses, Command, Header, PROTOCOL_PREFIX, Type};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

/// The fixed part: signature (12), version and command, family and protocol, length (2).
const FIXED: usize = 16;
/// The largest header read (addresses and TLVs included).
pub const MAX_HEADER: usize = 4096;
const PP2_SUBTYPE_SSL_CN: u8 = 0x22;

/// What a header said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyInfo {
    /// The device's address (`None`: a LOCAL header, or no address family).
    pub src: Option<SocketAddr>,
    pub sni: Option<String>,
    /// The device identity a terminating proxy verified.
    pub identity: Option<String>,
}

/// Why a header was refused (the `result` label of the header counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    NotAllowed,
    Truncated,
    TooLong,
    Malformed,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::NotAllowed => "not_allowed",
            Refused::Truncated => "truncated",
            Refused::TooLong => "too_long",
            Refused::Malformed => "malformed",
        }
    }
}

/// Reads the header at the start of `stream` if there is one (see the module doc).
pub async fn read(
    stream: &mut TcpStream,
    peer: SocketAddr,
    allowed: &[ipnet::IpNet],
    deadline: Duration,
) -> Result<Option<ProxyInfo>, Refused> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == PROTOCOL_PREFIX[0] => {}
        // Not a header (or nothing yet to judge by: the session's own reads decide).
        _ => return Ok(None),
    }
    if !allowed.iter().any(|n| n.contains(&peer.ip())) {
        return Err(Refused::NotAllowed);
    }
    read_from(stream, deadline).await.map(Some)
}

/// Reads a header that must be there (a link stream's first bytes), within `deadline`.
pub async fn read_from<R: AsyncRead + Unpin>(
    stream: &mut R,
    deadline: Duration,
) -> Result<ProxyInfo, Refused> {
    let reading = async {
        let mut buf = vec![0u8; FIXED];
        stream
            .read_exact(&mut buf)
            .await
            .map_err(|_| Refused::Truncated)?;
        if buf[..PROTOCOL_PREFIX.len()] != PROTOCOL_PREFIX[..] {
            return Err(Refused::Malformed);
        }
        let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if FIXED + len > MAX_HEADER {
            return Err(Refused::TooLong);
        }
        buf.resize(FIXED + len, 0);
        stream
            .read_exact(&mut buf[FIXED..])
            .await
            .map_err(|_| Refused::Truncated)?;
        Ok(buf)
    };
    let buf = tokio::time::timeout(deadline, reading)
        .await
        .map_err(|_| Refused::Truncated)??;
    parse(&buf)
}

/// Parses a whole header.
pub fn parse(buf: &[u8]) -> Result<ProxyInfo, Refused> {
    let header = Header::try_from(buf).map_err(|_| Refused::Malformed)?;
    let mut info = ProxyInfo::default();
    if header.command == Command::Local {
        return Ok(info);
    }
    info.src = match header.addresses {
        Addresses::IPv4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        Addresses::IPv6(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        _ => None,
    };
    for tlv in header.tlvs() {
        let tlv = tlv.map_err(|_| Refused::Malformed)?;
        if tlv.kind == Type::Authority as u8 {
            info.sni = Some(text(&tlv.value)?);
        } else if tlv.kind == Type::SSL as u8 {
            info.identity = ssl_cn(&tlv.value)?;
        }
    }
    Ok(info)
}

fn text(bytes: &[u8]) -> Result<String, Refused> {
    String::from_utf8(bytes.to_vec()).map_err(|_| Refused::Malformed)
}

/// The SSL_CN sub-TLV of a PP2_TYPE_SSL value (client flags: 1 byte, verify: 4, sub-TLVs).
fn ssl_cn(value: &[u8]) -> Result<Option<String>, Refused> {
    let mut rest = value.get(5..).ok_or(Refused::Malformed)?;
    while !rest.is_empty() {
        let (&kind, after) = rest.split_first().ok_or(Refused::Malformed)?;
        let len_bytes = after.get(..2).ok_or(Refused::Malformed)?;
        let len = usize::from(u16::from_be_bytes([len_bytes[0], len_bytes[1]]));
        let body = after.get(2..2 + len).ok_or(Refused::Malformed)?;
        if kind == PP2_SUBTYPE_SSL_CN {
            return text(body).map(Some);
        }
        rest = &after[2 + len..];
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(tlvs: &[(u8, &[u8])]) -> Vec<u8> {
        let mut b = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | Command::Proxy,
            ppp::v2::Protocol::Stream,
            (
                "192.0.2.9:4000".parse::<SocketAddr>().unwrap(),
                "127.0.0.1:9001".parse::<SocketAddr>().unwrap(),
            ),
        );
        for (k, v) in tlvs {
            b = b.write_tlv(*k, v).unwrap();
        }
        b.build().unwrap()
    }

    #[test]
    fn addresses_sni_and_identity_are_read() {
        let mut ssl = vec![3, 0, 0, 0, 0, PP2_SUBTYPE_SSL_CN, 0, 3];
        ssl.extend_from_slice(b"d-1");
        let h = header(&[
            (Type::Authority as u8, b"sni.example"),
            (Type::SSL as u8, &ssl),
        ]);
        let info = parse(&h).unwrap();
        assert_eq!(info.src, Some("192.0.2.9:4000".parse().unwrap()));
        assert_eq!(info.sni.as_deref(), Some("sni.example"));
        assert_eq!(info.identity.as_deref(), Some("d-1"));
    }

    #[test]
    fn broken_headers_and_sub_tlvs_are_malformed_never_a_panic() {
        let h = header(&[]);
        for cut in 0..h.len() {
            assert!(parse(&h[..cut]).is_err(), "a header cut at {cut}");
        }
        let bad_ssl = [3u8, 0, 0, 0, 0, PP2_SUBTYPE_SSL_CN, 0, 9, b'x'];
        let h = header(&[(Type::SSL as u8, &bad_ssl)]);
        assert_eq!(parse(&h), Err(Refused::Malformed));
        let h = header(&[(Type::Authority as u8, &[0xff, 0xfe])]);
        assert_eq!(parse(&h), Err(Refused::Malformed));
    }
}
