//! The proxy's end under the target, by either engine: what it handed over, sent back, and
//! whether it refused or saw the peer's `close_notify`.

use rustls::Error;
use wasmbed_proxy::tls_records::Model;

/// The proxy's end, by one engine or the other.
pub(super) enum Engine {
    Records(Model),
    Rustls(Box<rustls::Connection>),
}

/// What one end has done so far.
#[derive(Default)]
pub(super) struct End {
    pub(super) incoming: Vec<u8>,
    pub(super) data: Vec<u8>,
    pub(super) out: Vec<u8>,
    pub(super) closed: bool,
    pub(super) refused: Option<Error>,
}

impl End {
    pub(super) fn over(&self) -> bool {
        self.closed || self.refused.is_some()
    }

    pub(super) fn feed(&mut self, engine: &mut Engine, bytes: &[u8]) {
        if self.over() {
            return;
        }
        match engine {
            Engine::Records(model) => {
                self.incoming.extend_from_slice(bytes);
                match model.take(&mut self.incoming, &mut self.data, &mut self.out) {
                    Ok(closed) => self.closed = closed,
                    Err(e) => self.refused = Some(e),
                }
            }
            Engine::Rustls(conn) => self.feed_rustls(conn, bytes),
        }
    }

    pub(super) fn feed_rustls(&mut self, conn: &mut rustls::Connection, mut bytes: &[u8]) {
        loop {
            let mut full = None;
            if !bytes.is_empty() {
                // A full buffer is processed first.
                if let Err(e) = conn.read_tls(&mut bytes) {
                    full = Some(e);
                }
            }
            let processed = conn.process_new_packets();
            // A buffer still full once processed: rustls takes no more (as `tokio-rustls`
            // would report it, the connection's end).
            let stuck = full.filter(|_| {
                processed
                    .as_ref()
                    .is_ok_and(|state| state.plaintext_bytes_to_read() == 0)
            });
            let mut buf = [0u8; 4096];
            loop {
                match std::io::Read::read(&mut conn.reader(), &mut buf) {
                    Ok(0) => {
                        self.closed = true;
                        break;
                    }
                    Ok(n) => self.data.extend_from_slice(&buf[..n]),
                    Err(_) => break,
                }
            }
            while conn.wants_write() {
                if conn.write_tls(&mut self.out).is_err() {
                    break;
                }
            }
            if let Err(e) = processed {
                self.refused = Some(e);
                return;
            }
            if let Some(e) = stuck {
                self.refused = Some(Error::General(e.to_string()));
                return;
            }
            if bytes.is_empty() || self.closed {
                return;
            }
        }
    }
}

impl Engine {
    pub(super) fn write(&mut self, data: &[u8], out: &mut Vec<u8>) {
        match self {
            Engine::Records(model) => model.seal(data, out).expect("a write seals"),
            Engine::Rustls(conn) => {
                std::io::Write::write_all(&mut conn.writer(), data).expect("a write");
                while conn.wants_write() {
                    conn.write_tls(out).expect("a write");
                }
            }
        }
    }
}
