//! The record layer as the fuzz targets drive it (behind the `model` feature): the proxy's end
//! of a TLS connection after its handshake, without a socket. What the peer sends is taken as
//! `TlsStream` takes it (`Records::open_all`, then what the peer is owed, or the fatal alert
//! on a refusal), so a target can put it beside rustls' own connection fed the same records.

use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{Error, ExtractedSecrets};

pub use super::ECDSA_SUITES;
use super::{Records, Side};

/// The proxy's end of one connection's records: a device's server or a gateway's client.
pub struct Model(Sides);

enum Sides {
    Server(Box<Records<ServerConnectionData>>),
    Client(Box<Records<ClientConnectionData>>),
}

impl Model {
    /// As a device's server, from what rustls handed over; `None` for a suite the records do
    /// not seal.
    pub fn server(
        handed: (ExtractedSecrets, KernelConnection<ServerConnectionData>),
    ) -> Option<Model> {
        Records::new(handed).map(|r| Model(Sides::Server(Box::new(r))))
    }

    /// As a gateway's client (which takes the server's tickets).
    pub fn client(
        handed: (ExtractedSecrets, KernelConnection<ClientConnectionData>),
    ) -> Option<Model> {
        Records::new(handed).map(|r| Model(Sides::Client(Box::new(r))))
    }

    /// Takes the whole records at the front of `incoming` (drained of them; a record that
    /// arrived in part stays), their data appended to `data`, then seals what the peer is owed
    /// onto `outgoing` (the answer to its request for new keys, the warning that declines its
    /// request to renegotiate). `Ok(true)`: the peer's `close_notify` came, and what followed
    /// it is dropped. A refusal seals its fatal alert onto `outgoing` (when one is sent) and
    /// returns rustls' error for it; the connection is over.
    pub fn take(
        &mut self,
        incoming: &mut Vec<u8>,
        data: &mut Vec<u8>,
        outgoing: &mut Vec<u8>,
    ) -> Result<bool, Error> {
        match &mut self.0 {
            Sides::Server(records) => take(records, incoming, data, outgoing),
            Sides::Client(records) => take(records, incoming, data, outgoing),
        }
    }

    /// Seals `data` onto `outgoing` as a write through `TlsStream` seals it (a key update of
    /// the proxy's own first, at the suite's limit).
    pub fn seal(&mut self, data: &[u8], outgoing: &mut Vec<u8>) -> Result<(), Error> {
        match &mut self.0 {
            Sides::Server(records) => seal(records, data, outgoing),
            Sides::Client(records) => seal(records, data, outgoing),
        }
    }
}

fn take<S: Side>(
    records: &mut Records<S>,
    incoming: &mut Vec<u8>,
    data: &mut Vec<u8>,
    outgoing: &mut Vec<u8>,
) -> Result<bool, Error> {
    let mut taken = 0;
    let opened = records.open_all(incoming, &mut taken, |plain| data.extend_from_slice(plain));
    incoming.drain(..taken);
    let answered = opened.and_then(|closed| records.answer(outgoing).map(|()| closed));
    answered.map_err(|f| {
        if let Some(alert) = f.alert {
            records.seal_fatal(alert, outgoing);
        }
        f.error
    })
}

fn seal<S: Side>(
    records: &mut Records<S>,
    data: &[u8],
    outgoing: &mut Vec<u8>,
) -> Result<(), Error> {
    let start = outgoing.len();
    outgoing.resize(start + Records::<S>::sealed_len(data.len()), 0);
    match records.seal(data, &mut outgoing[start..]) {
        Ok(n) => {
            outgoing.truncate(start + n);
            Ok(())
        }
        Err(f) => {
            outgoing.truncate(start);
            Err(f.error)
        }
    }
}
