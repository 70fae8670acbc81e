//! Reads the server name (SNI) out of a TLS ClientHello without terminating TLS, for listeners
//! that pass TLS through to a pool chosen by name.
//!
//! The parser is written by hand, bounded and allocation-light: it only walks the length
//! prefixes of RFC 8446 section 4.1.2 (and RFC 5246 section 7.4.1.2, the same layout) and of the
//! server_name extension (RFC 6066 section 3), refuses anything that does not add up, and never
//! looks at more than [`MAX_CLIENT_HELLO`] bytes. A ClientHello split over several records is
//! reassembled. The bytes themselves are forwarded untouched: this module only reads them.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The largest ClientHello accepted, records included. Real ones are a few hundred bytes to
/// about 2 KiB (a post-quantum key share adds about 1.2 KiB); 16 KiB leaves room for many
/// extensions while bounding what one connection may make the proxy hold.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;
/// Largest TLS record payload (RFC 8446 section 5.1: 2^14).
const MAX_RECORD: usize = 1 << 14;
/// Record type of handshake messages.
const HANDSHAKE: u8 = 22;
/// Handshake type of a ClientHello.
const CLIENT_HELLO: u8 = 1;
/// Extension type of server_name.
const SERVER_NAME: u16 = 0;

/// Why a ClientHello was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// The first bytes are not a TLS handshake record (plain HTTP, say).
    #[error("not TLS: the first record is not a handshake")]
    NotTls,
    /// A record or message is larger than allowed.
    #[error("ClientHello larger than {MAX_CLIENT_HELLO} bytes")]
    TooLarge,
    /// The first handshake message is not a ClientHello.
    #[error("the first handshake message is not a ClientHello")]
    NotClientHello,
    /// Lengths that do not add up, or a field with an impossible value.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// The client closed before its ClientHello was complete.
    #[error("connection closed inside the ClientHello")]
    Truncated,
    /// The client did not send its whole ClientHello in time.
    #[error("no complete ClientHello within the timeout")]
    Timeout,
    /// Reading the socket failed.
    #[error("reading the ClientHello: {0}")]
    Io(String),
}

/// Parses a ClientHello at the start of `data`. `Ok(None)`: more bytes are needed.
/// `Ok(Some(name))`: complete, with the server name if the client sent one (lower-cased,
/// without a trailing dot).
pub fn parse(data: &[u8]) -> Result<Option<Option<String>>, HelloError> {
    // Reassemble the handshake message from as many records as it spans.
    let mut message: Vec<u8> = Vec::new();
    let mut pos = 0;
    loop {
        let Some(header) = data.get(pos..pos + 5) else {
            return Ok(None);
        };
        if header[0] != HANDSHAKE {
            return Err(if pos == 0 {
                HelloError::NotTls
            } else {
                HelloError::Malformed("a non-handshake record inside the ClientHello")
            });
        }
        if header[1] != 3 {
            return Err(HelloError::Malformed("record version is not 3.x"));
        }
        let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if length == 0 {
            return Err(HelloError::Malformed("empty handshake record"));
        }
        if length > MAX_RECORD {
            return Err(HelloError::TooLarge);
        }
        if pos + 5 + length > MAX_CLIENT_HELLO {
            return Err(HelloError::TooLarge);
        }
        let Some(fragment) = data.get(pos + 5..pos + 5 + length) else {
            return Ok(None);
        };
        pos += 5 + length;
        message.extend_from_slice(fragment);
        if message.len() < 4 {
            continue;
        }
        if message[0] != CLIENT_HELLO {
            return Err(HelloError::NotClientHello);
        }
        let body_length = (usize::from(message[1]) << 16)
            | (usize::from(message[2]) << 8)
            | usize::from(message[3]);
        if body_length + 4 > MAX_CLIENT_HELLO {
            return Err(HelloError::TooLarge);
        }
        if message.len() < 4 + body_length {
            continue;
        }
        // Bytes past the ClientHello in the same record would be a second handshake message,
        // which a client must not send before the server's reply.
        if message.len() > 4 + body_length {
            return Err(HelloError::Malformed("data after the ClientHello"));
        }
        return server_name(&message[4..]).map(Some);
    }
}

/// A cursor over a byte slice whose reads fail instead of panicking.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if n > self.data.len() {
            return Err(HelloError::Malformed(what));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u8(what)?;
        self.take(usize::from(n), what)
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }
}

/// Walks a ClientHello body to its server_name extension.
fn server_name(body: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader { data: body };
    let version = r.u16("legacy_version")?;
    if version >> 8 != 3 {
        return Err(HelloError::Malformed("legacy_version is not 3.x"));
    }
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
    if r.data.is_empty() {
        // A ClientHello without extensions (old clients): no name.
        return Ok(None);
    }
    let extensions = r.vec16("extensions")?;
    if !r.data.is_empty() {
        return Err(HelloError::Malformed("bytes after the extensions"));
    }
    let mut r = Reader { data: extensions };
    let mut found: Option<String> = None;
    let mut seen_sni = false;
    while !r.data.is_empty() {
        let kind = r.u16("extension type")?;
        let data = r.vec16("extension data")?;
        if kind != SERVER_NAME {
            continue;
        }
        if seen_sni {
            return Err(HelloError::Malformed("server_name extension twice"));
        }
        seen_sni = true;
        let mut names = Reader { data };
        let list = names.vec16("server name list")?;
        if !names.data.is_empty() || list.is_empty() {
            return Err(HelloError::Malformed("server name list"));
        }
        let mut list = Reader { data: list };
        while !list.data.is_empty() {
            let name_type = list.u8("server name type")?;
            let name = list.vec16("server name")?;
            // Only host_name (0) is defined; RFC 6066 allows one name per type.
            if name_type == 0 {
                if found.is_some() {
                    return Err(HelloError::Malformed("two host names"));
                }
                found = Some(host_name(name)?);
            }
        }
    }
    Ok(found)
}

/// A host name as SNI carries it: ASCII letters, digits, `-`, `_` and dots, 1 to 253 bytes
/// (RFC 6066 forbids IP addresses and a trailing dot, which is tolerated and dropped).
fn host_name(name: &[u8]) -> Result<String, HelloError> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty()
        || name.len() > 253
        || !name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err(HelloError::Malformed("server name is not a host name"));
    }
    Ok(name
        .iter()
        .map(|b| b.to_ascii_lowercase() as char)
        .collect())
}

/// Reads from `stream` into `buf` (which may already hold bytes, from a PROXY header) until a
/// whole ClientHello is there, within `limit` and [`MAX_CLIENT_HELLO`] bytes. Returns the
/// server name; the bytes stay in `buf`, to be forwarded as they are.
pub async fn read(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    limit: Duration,
) -> Result<Option<String>, HelloError> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(name) = parse(buf)? {
            return Ok(name);
        }
        if buf.len() >= MAX_CLIENT_HELLO {
            return Err(HelloError::TooLarge);
        }
        // Never read past the cap, so a flood of bytes cannot grow the buffer.
        buf.reserve(MAX_CLIENT_HELLO - buf.len());
        let room = MAX_CLIENT_HELLO - buf.len();
        let mut limited = (&mut *stream).take(room as u64);
        match tokio::time::timeout_at(deadline, limited.read_buf(buf)).await {
            Ok(Ok(0)) => return Err(HelloError::Truncated),
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return Err(HelloError::Io(error.to_string())),
            Err(_) => return Err(HelloError::Timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A real ClientHello, as rustls writes it, naming `name`.
    fn hello(name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(name.to_owned()).expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("write");
        out
    }

    #[test]
    fn reads_the_name_of_a_real_client_hello() {
        let data = hello("A.Example.com");
        assert_eq!(parse(&data), Ok(Some(Some("a.example.com".to_owned()))));
    }

    #[test]
    fn every_prefix_asks_for_more() {
        let data = hello("a.example.com");
        for n in 0..data.len() {
            assert_eq!(parse(&data[..n]), Ok(None), "prefix of {n} bytes");
        }
    }

    #[test]
    fn a_hello_split_over_records_is_reassembled() {
        let data = hello("split.example.com");
        let message = &data[5..];
        let (first, second) = message.split_at(10);
        let mut split = Vec::new();
        for part in [first, second] {
            split.extend_from_slice(&[22, 3, 1]);
            split.extend_from_slice(&(part.len() as u16).to_be_bytes());
            split.extend_from_slice(part);
        }
        assert_eq!(
            parse(&split),
            Ok(Some(Some("split.example.com".to_owned())))
        );
    }

    #[test]
    fn refuses_what_is_not_a_client_hello() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(HelloError::NotTls));
        assert_eq!(
            parse(&[22, 3, 1, 0x40, 0x01]),
            Err(HelloError::TooLarge),
            "record over 2^14"
        );
        assert_eq!(
            parse(&[22, 3, 1, 0, 4, 2, 0, 0, 0]),
            Err(HelloError::NotClientHello)
        );
        // A body whose inner lengths run past its end.
        let mut data = hello("a.example.com");
        let len = data.len();
        data[len - 1] ^= 0xff;
        let _ = parse(&data); // must not panic, whatever it says
        // Every single-byte corruption of a real hello is handled without panicking.
        let original = hello("b.example.com");
        for i in 0..original.len() {
            let mut bad = original.clone();
            bad[i] = bad[i].wrapping_add(0x55);
            let _ = parse(&bad);
        }
    }

    #[test]
    fn a_hello_without_sni_has_no_name() {
        // Hand-built: version, random, empty session id, one suite, null compression, no
        // extensions.
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        let mut data = vec![22, 3, 1];
        data.extend_from_slice(&((body.len() + 4) as u16).to_be_bytes());
        data.extend_from_slice(&[1, 0, 0, body.len() as u8]);
        data.extend_from_slice(&body);
        assert_eq!(parse(&data), Ok(Some(None)));
    }
}
