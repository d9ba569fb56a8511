//! The peer under the target: the records it seals under the keys its handshake gave, and its
//! reading of what the proxy's end sent back.

use std::sync::OnceLock;

use aws_lc_rs::aead::{
    AES_128_GCM, AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey,
};
use rustls::ConnectionTrafficSecrets;
use rustls::client::ClientConnectionData;
use rustls::crypto::cipher::{Iv, make_tls12_aad, make_tls13_aad};
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;

use super::handshake::configs;
use super::{KEY_UPDATE, NEW_SESSION_TICKET, Op, SUITES, handshake_records, header_len};

/// The peer's end: its keys, sealed and opened here.
pub(super) struct Peer {
    pub(super) kernel: Kernel,
    pub(super) tls12: bool,
    /// TLS 1.2 AES-GCM: an explicit nonce on the wire.
    pub(super) explicit: bool,
    pub(super) tx: Keys,
    pub(super) rx: Keys,
}

pub(super) enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

pub(super) struct Keys {
    pub(super) key: LessSafeKey,
    pub(super) iv: Iv,
    pub(super) seq: u64,
}

pub(super) fn keys((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Keys {
    let (algorithm, key, iv) = match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv),
        _ => unreachable!("only these suites are negotiated"),
    };
    let key = LessSafeKey::new(UnboundKey::new(algorithm, key.as_ref()).expect("a key"));
    Keys { key, iv, seq }
}

impl Peer {
    pub(super) fn new((secrets, kernel): (rustls::ExtractedSecrets, Kernel), tls12: bool) -> Peer {
        let explicit = tls12
            && !matches!(
                secrets.tx.1,
                ConnectionTrafficSecrets::Chacha20Poly1305 { .. }
            );
        Peer {
            kernel,
            tls12,
            explicit,
            tx: keys(secrets.tx),
            rx: keys(secrets.rx),
        }
    }

    /// The bytes of `op`.
    pub(super) fn send(&mut self, op: &Op, gateway: bool) -> Vec<u8> {
        match op {
            Op::Data(d, pad) => self.seal(23, d, usize::from(*pad)),
            Op::Empty(n) => (0..*n % 40).flat_map(|_| self.seal(23, b"", 0)).collect(),
            Op::Record(typ, content, pad) => self.seal(*typ, content, usize::from(*pad)),
            Op::Large(typ, delta) => {
                let len = ((1i32 << 14) + i32::from(*delta) % 2500).max(0) as usize;
                self.seal(*typ, &vec![0x5a; len], 0)
            }
            Op::Handshake(bytes, cuts) => handshake_records(bytes, cuts)
                .flat_map(|part| self.seal(22, part, 0))
                .collect(),
            Op::KeyUpdate(request) => {
                let record = self.seal(22, &[KEY_UPDATE, 0, 0, 1, *request], 0);
                if !self.tls12 && *request < 2 {
                    let next = match &mut self.kernel {
                        Kernel::Client(k) => k.update_tx_secret(),
                        Kernel::Server(k) => k.update_tx_secret(),
                    };
                    self.tx = keys(next.expect("the next keys"));
                }
                record
            }
            Op::Ticket(len) => self.seal(22, &ticket(usize::from(*len).max(13)), 0),
            Op::KeyUpdates(n) => (0..n % 40)
                .flat_map(|_| self.send(&Op::KeyUpdate(0), gateway))
                .collect(),
            Op::Tickets(n) => self.seal(22, &ticket(14).repeat(usize::from(n % 40)), 0),
            Op::Renegotiate => {
                let request = if gateway {
                    vec![0, 0, 0, 0]
                } else {
                    client_hello()
                };
                self.seal(22, &request, 0)
            }
            Op::Alert(level, description) => self.seal(21, &[*level, *description], 0),
            Op::Raw(bytes) => bytes.clone(),
            Op::Header(typ, version, near, len) => {
                let [v0, v1] = version.to_be_bytes();
                let [l0, l1] = header_len(*near, *len).to_be_bytes();
                vec![*typ, v0, v1, l0, l1]
            }
        }
    }

    /// A record of (inner) type `typ` carrying `content` (at most 2^16 - 1 bytes sealed, the
    /// rest dropped), then `padding` zeros on TLS 1.3.
    pub(super) fn seal(&mut self, typ: u8, content: &[u8], padding: usize) -> Vec<u8> {
        let Keys { key, iv, seq } = &mut self.tx;
        let mut nonce = rustls::crypto::cipher::Nonce::new(iv, *seq).0;
        let (mut body, aad, explicit) = if self.tls12 {
            let content = &content[..content.len().min(0xffff - 24)];
            let aad = make_tls12_aad(
                *seq,
                typ.into(),
                rustls::ProtocolVersion::TLSv1_2,
                content.len(),
            );
            (
                content.to_vec(),
                aad.to_vec(),
                if self.explicit { 8 } else { 0 },
            )
        } else {
            let mut inner = content[..content.len().min(0xffff - 17)].to_vec();
            inner.push(typ);
            inner.resize((inner.len() + padding).min(0xffff - 16), 0);
            let aad = make_tls13_aad(inner.len() + 16).to_vec();
            (inner, aad, 0)
        };
        if explicit == 8 {
            // The IV's salt, then an explicit part of the peer's choosing (as rustls'
            // own: the IV's rest mixed with the sequence number).
            nonce[..4].copy_from_slice(&iv.as_ref()[..4]);
        }
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut body,
            )
            .expect("sealed");
        *seq += 1;
        let len = u16::try_from(explicit + body.len() + 16).expect("a record's length");
        let outer = if self.tls12 { typ } else { 23 };
        let mut record = vec![outer, 3, 3];
        record.extend_from_slice(&len.to_be_bytes());
        record.extend_from_slice(&nonce[12 - explicit..]);
        record.extend_from_slice(&body);
        record.extend_from_slice(tag.as_ref());
        record
    }

    /// The records the proxy's end sealed in `bytes`, each of which must open (key updates
    /// followed), nothing after a fatal alert.
    pub(super) fn open_all(&mut self, mut bytes: &[u8]) -> Back {
        let mut back = Back::default();
        while let Some(header) = bytes.get(..5) {
            assert_eq!(back.fatal, None, "a record after a fatal alert");
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            let mut body = bytes[5..5 + len].to_vec();
            let Keys { key, iv, seq } = &mut self.rx;
            let mut nonce = rustls::crypto::cipher::Nonce::new(iv, *seq).0;
            let (aad, skip) = if self.tls12 {
                let skip = if self.explicit { 8 } else { 0 };
                if self.explicit {
                    nonce[..4].copy_from_slice(&iv.as_ref()[..4]);
                    nonce[4..].copy_from_slice(&body[..8]);
                }
                let aad = make_tls12_aad(
                    *seq,
                    header[0].into(),
                    rustls::ProtocolVersion::TLSv1_2,
                    len - skip - 16,
                );
                (aad.to_vec(), skip)
            } else {
                (header.to_vec(), 0)
            };
            let plain = key
                .open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    &mut body[skip..],
                )
                .expect("the proxy's end's record opens")
                .to_vec();
            *seq += 1;
            bytes = &bytes[5 + len..];
            let (typ, content) = if self.tls12 {
                (header[0], &plain[..])
            } else {
                let end = plain.iter().rposition(|&b| b != 0).expect("a type");
                (plain[end], &plain[..end])
            };
            match (typ, content) {
                (23, d) => back.data.extend_from_slice(d),
                (21, &[1, description]) => back.warnings.push(description),
                (21, &[2, description]) => back.fatal = Some(description),
                (22, [KEY_UPDATE, 0, 0, 1, 0]) if !self.tls12 => {
                    back.key_updates += 1;
                    let next = match &mut self.kernel {
                        Kernel::Client(k) => k.update_rx_secret(),
                        Kernel::Server(k) => k.update_rx_secret(),
                    };
                    self.rx = keys(next.expect("the next keys"));
                }
                other => panic!("the proxy's end sent {other:?}"),
            }
        }
        back
    }
}

/// What the proxy's end sent back.
#[derive(Default)]
pub(super) struct Back {
    pub(super) data: Vec<u8>,
    /// Its own key updates (each asking for none back).
    pub(super) key_updates: usize,
    /// The descriptions of its warnings.
    pub(super) warnings: Vec<u8>,
    pub(super) fatal: Option<u8>,
}

/// A `NewSessionTicket` message whose payload is `len` bytes (at least 13).
pub(super) fn ticket(len: usize) -> Vec<u8> {
    let len = len.min(0xffff);
    let mut message = vec![NEW_SESSION_TICKET];
    message.extend_from_slice(&u32::try_from(len).unwrap_or(0).to_be_bytes()[1..]);
    message.extend_from_slice(&[0, 0, 0, 60, 0, 0, 0, 1, 0]); // lifetime, age add, no nonce
    message.extend_from_slice(&u16::try_from(len - 13).unwrap_or(0).to_be_bytes());
    message.resize(4 + len - 2, 7);
    message.extend_from_slice(&[0, 0]); // extensions
    message
}

/// A device's ClientHello as rustls' client writes it, its record's header off.
pub(super) fn client_hello() -> Vec<u8> {
    static HELLO: OnceLock<Vec<u8>> = OnceLock::new();
    HELLO
        .get_or_init(|| {
            let name = rustls::pki_types::ServerName::try_from("device.test").expect("a name");
            let mut conn =
                rustls::ClientConnection::new(configs().client(SUITES[3]), name).expect("a client");
            let mut record = Vec::new();
            conn.write_tls(&mut record).expect("its hello");
            record.split_off(5)
        })
        .clone()
}
