//! classify: a pure parser of the TLS ClientHello, for SNI and ALPN (no I/O, no panics).
//!
//! [`parse`] takes the bytes a device has sent so far and answers: the hello, "need more
//! bytes" ([`HelloError::Incomplete`]), "not TLS", or why it is refused. The hello may span
//! several TLS records (post-quantum key shares make it 1.2-1.8 KB); they are reassembled up to
//! `max` bytes in all.

/// What the proxy learns from a ClientHello.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The server name, lowercased; `None` when the device sent no SNI.
    pub sni: Option<String>,
    /// The offered ALPN protocols, in the device's order.
    pub alpn: Alpn,
    /// How many bytes of the input the hello's records occupy.
    pub len: usize,
}

/// The ALPN protocols a device offered, in its order: the extension's list as the device
/// sent it (each name after its length byte), checked when parsed, in one allocation (a
/// `Vec` per name cost an allocation per protocol per connection).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Alpn(Vec<u8>);

/// No protocol offered (a client whose TLS ended here is matched and counted with it).
pub static NO_ALPN: Alpn = Alpn(Vec::new());

impl Alpn {
    /// The offered protocols' names, in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let mut rest = self.0.as_slice();
        std::iter::from_fn(move || {
            let (&len, tail) = rest.split_first()?;
            let (name, after) = tail.split_at_checked(usize::from(len))?;
            rest = after;
            Some(name)
        })
    }

    /// Whether the device offered no protocol (or no ALPN extension).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first protocol offered, the device's preferred one.
    pub fn first(&self) -> Option<&[u8]> {
        self.iter().next()
    }
}

impl std::fmt::Debug for Alpn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.iter().map(String::from_utf8_lossy))
            .finish()
    }
}

/// Why bytes are not (yet) a usable ClientHello. Each has its own metric reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("the ClientHello is not complete yet")]
    Incomplete,
    #[error("not TLS")]
    NotTls,
    #[error("the ClientHello is larger than the configured maximum")]
    TooLarge,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("malformed server name extension: {0}")]
    BadSni(&'static str),
}

const RECORD_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const MAX_RECORD: usize = 16_384 + 256;
const EXT_SNI: u16 = 0;
const EXT_ALPN: u16 = 16;

/// Parses the ClientHello at the start of `buf`; `max` bounds the bytes it may take.
pub fn parse(buf: &[u8], max: usize) -> Result<ClientHello, HelloError> {
    match reassemble(buf) {
        Err(HelloError::Incomplete) if buf.len() >= max => Err(HelloError::TooLarge),
        Ok((_, len)) if len > max => Err(HelloError::TooLarge),
        Err(e) => Err(e),
        Ok((message, len)) => {
            let mut hello = parse_body(&message)?;
            hello.len = len;
            Ok(hello)
        }
    }
}

/// Collects the handshake message from the records; returns it and the records' length.
fn reassemble(buf: &[u8]) -> Result<(std::borrow::Cow<'_, [u8]>, usize), HelloError> {
    // Decide "not TLS" from the first bytes, without waiting for a whole record header.
    match buf {
        [first, ..] if *first != RECORD_HANDSHAKE => return Err(HelloError::NotTls),
        [_, major, ..] if *major != 3 => return Err(HelloError::NotTls),
        _ => {}
    }
    let mut message: Option<Vec<u8>> = None;
    let mut offset = 0;
    loop {
        let header = buf.get(offset..offset + 5).ok_or(HelloError::Incomplete)?;
        if header[0] != RECORD_HANDSHAKE || header[1] != 3 {
            return Err(if offset == 0 {
                HelloError::NotTls
            } else {
                HelloError::Malformed("record of another type inside the ClientHello")
            });
        }
        let record_len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if record_len == 0 || record_len > MAX_RECORD {
            return Err(HelloError::Malformed("bad record length"));
        }
        let body = buf
            .get(offset + 5..offset + 5 + record_len)
            .ok_or(HelloError::Incomplete)?;
        offset += 5 + record_len;
        let so_far: &[u8] = match &mut message {
            None if handshake_len(body).is_some_and(|n| n <= body.len()) => {
                let n = handshake_len(body).unwrap_or_default();
                return Ok((std::borrow::Cow::Borrowed(&body[..n]), offset));
            }
            None => message.insert(body.to_vec()),
            Some(m) => {
                m.extend_from_slice(body);
                m
            }
        };
        if let Some(n) = handshake_len(so_far).filter(|&n| n <= so_far.len()) {
            let mut m = message.unwrap_or_default();
            m.truncate(n);
            return Ok((std::borrow::Cow::Owned(m), offset));
        }
    }
}

/// The total length (header included) of the handshake message `m` starts with.
fn handshake_len(m: &[u8]) -> Option<usize> {
    let h = m.get(..4)?;
    Some(4 + (usize::from(h[1]) << 16 | usize::from(h[2]) << 8 | usize::from(h[3])))
}

/// A bounds-checked reader: every short read is a [`HelloError::Malformed`].
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if self.0.len() < n {
            return Err(HelloError::Malformed(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one- or two-byte length prefix.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u8(what)?;
        self.take(usize::from(n), what)
    }

    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }
}

fn parse_body(message: &[u8]) -> Result<ClientHello, HelloError> {
    let mut r = Reader(message);
    if r.u8("handshake type")? != HANDSHAKE_CLIENT_HELLO {
        return Err(HelloError::Malformed(
            "first handshake message is not a ClientHello",
        ));
    }
    r.take(3, "handshake length")?;
    r.take(2, "client version")?;
    r.take(32, "random")?;
    if r.vec8("session id")?.len() > 32 {
        return Err(HelloError::Malformed("session id longer than 32 bytes"));
    }
    let suites = r.vec16("cipher suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::Malformed("cipher suite list"));
    }
    if r.vec8("compression methods")?.is_empty() {
        return Err(HelloError::Malformed("no compression method"));
    }
    let mut hello = ClientHello::default();
    if r.0.is_empty() {
        return Ok(hello); // a hello without extensions (old clients) is valid
    }
    let mut extensions = Reader(r.vec16("extensions")?);
    let mut seen_sni = false;
    while !extensions.0.is_empty() {
        let kind = extensions.u16("extension type")?;
        let data = extensions.vec16("extension data")?;
        match kind {
            EXT_SNI if seen_sni => return Err(HelloError::BadSni("sent twice")),
            EXT_SNI => {
                seen_sni = true;
                hello.sni = parse_sni(data)?;
            }
            EXT_ALPN => hello.alpn = parse_alpn(data)?,
            _ => {}
        }
    }
    Ok(hello)
}

fn parse_sni(data: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader(data);
    let list = r
        .vec16("server name list")
        .map_err(|_| HelloError::BadSni("list length"))?;
    if !r.0.is_empty() {
        return Err(HelloError::BadSni("bytes after the list"));
    }
    let mut list = Reader(list);
    let mut name = None;
    while !list.0.is_empty() {
        let kind = list.u8("").map_err(|_| HelloError::BadSni("entry type"))?;
        let value = list
            .vec16("")
            .map_err(|_| HelloError::BadSni("entry length"))?;
        if kind != 0 || name.is_some() {
            continue; // only the first host_name (type 0) entry counts
        }
        name = Some(host_name(value)?);
    }
    name.map(Some)
        .ok_or(HelloError::BadSni("no host name entry"))
}

fn host_name(value: &[u8]) -> Result<String, HelloError> {
    let valid = !value.is_empty()
        && value.len() <= 253
        && value
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && !value.starts_with(b".")
        && !value.windows(2).any(|w| w == b"..");
    if !valid {
        return Err(HelloError::BadSni("host name is not a valid DNS name"));
    }
    // ASCII, checked above; at most one trailing dot ("..", a leading one are refused). One
    // allocation, the name's own.
    let name = value.strip_suffix(b".").unwrap_or(value);
    Ok(name
        .iter()
        .map(|&b| char::from(b.to_ascii_lowercase()))
        .collect())
}

/// The ALPN list, checked: whole entries, none empty (so [`Alpn::iter`] walks it exactly).
fn parse_alpn(data: &[u8]) -> Result<Alpn, HelloError> {
    let mut r = Reader(data);
    let list = r.vec16("ALPN list")?;
    let mut entries = Reader(list);
    while !entries.0.is_empty() {
        let proto = entries.vec8("ALPN protocol")?;
        if proto.is_empty() {
            return Err(HelloError::Malformed("empty ALPN protocol"));
        }
    }
    Ok(Alpn(list.to_vec()))
}

#[cfg(test)]
pub(crate) mod tests;
