//! PROXY protocol v2 towards gateways (per pool: `--proxy-protocol POOL`), built with the
//! `ppp` crate: the device's address and the address it dialed, a PP2_TYPE_AUTHORITY TLV with
//! the SNI, and, in terminate mode, a PP2_TYPE_SSL TLV whose SSL_CN sub-TLV carries the
//! verified device identity (the way HAProxy passes a client certificate's name).
//!
//! The header goes first on the TCP connection, before the device's bytes (passthrough) or
//! the link's TLS handshake (terminate); a gateway reads it only with `--accept-proxy-protocol`
//! and only from the networks it trusts for it.

use std::net::SocketAddr;

use ppp::v2::{Builder, Command, Protocol, Type, Version};

/// PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN: TLS, with a client certificate on this connection.
const CLIENT_SSL_CERT: u8 = 0x01 | 0x02;
/// PP2_SUBTYPE_SSL_CN.
const SUBTYPE_SSL_CN: u8 = 0x22;

/// Where a session comes from, as a gateway should see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The device's address.
    pub src: SocketAddr,
    /// The address the device dialed (the proxy's listener).
    pub dst: SocketAddr,
    pub sni: Option<String>,
    /// Terminate mode: the device named by its verified certificate.
    pub identity: Option<String>,
}

impl Origin {
    /// The PROXY v2 header for this origin.
    pub fn header(&self) -> std::io::Result<Vec<u8>> {
        // One address family for both ends (an IPv4 device on an IPv6 listener is mapped).
        let (src, dst) = match (self.src, self.dst) {
            (SocketAddr::V4(s), SocketAddr::V6(d)) => (
                SocketAddr::new(s.ip().to_ipv6_mapped().into(), s.port()),
                SocketAddr::V6(d),
            ),
            (SocketAddr::V6(s), SocketAddr::V4(d)) => (
                SocketAddr::V6(s),
                SocketAddr::new(d.ip().to_ipv6_mapped().into(), d.port()),
            ),
            pair => pair,
        };
        let mut builder =
            Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (src, dst));
        if let Some(sni) = &self.sni {
            builder = builder.write_tlv(Type::Authority, sni.as_bytes())?;
        }
        if let Some(id) = &self.identity {
            let id = &id.as_bytes()[..id.len().min(u16::MAX as usize - 16)];
            let mut ssl = Vec::with_capacity(8 + id.len());
            ssl.push(CLIENT_SSL_CERT);
            ssl.extend_from_slice(&0u32.to_be_bytes()); // verify: 0 = the certificate verified
            ssl.push(SUBTYPE_SSL_CN);
            ssl.extend_from_slice(&(id.len() as u16).to_be_bytes());
            ssl.extend_from_slice(id);
            builder = builder.write_tlv(Type::SSL, &ssl)?;
        }
        builder.build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_parses_back_with_its_addresses_and_tlvs() {
        let origin = Origin {
            src: "192.0.2.7:40000".parse().unwrap(),
            dst: "127.0.0.1:8443".parse().unwrap(),
            sni: Some("devices.example".into()),
            identity: Some("device-0007".into()),
        };
        let bytes = origin.header().unwrap();
        let h = ppp::v2::Header::try_from(bytes.as_slice()).unwrap();
        assert_eq!(h.command, Command::Proxy);
        match h.addresses {
            ppp::v2::Addresses::IPv4(a) => {
                assert_eq!(a.source_address.to_string(), "192.0.2.7");
                assert_eq!(a.source_port, 40000);
            }
            other => panic!("{other:?}"),
        }
        let tlvs: Vec<_> = h.tlvs().map(|t| t.unwrap()).collect();
        assert_eq!(tlvs[0].kind, Type::Authority as u8);
        assert_eq!(&tlvs[0].value[..], b"devices.example");
        assert_eq!(tlvs[1].kind, Type::SSL as u8);
        assert_eq!(&tlvs[1].value[8..], b"device-0007");
    }
}
