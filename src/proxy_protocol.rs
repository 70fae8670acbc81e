//! The PROXY protocol (v1 text, v2 binary): reading it from trusted peers, writing it to backends.
//!
//! Parsing is the `ppp` crate's; this module adds the I/O around it: a bounded read with a
//! deadline, and the bytes that arrived after the header, which belong to the payload and are
//! handed back so nothing is lost.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use ppp::PartialResult;
use ppp::v2::{self, Command, Protocol, Version};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::{ProxyProtocolVersion, ProxyProtocolVersions};

/// The largest header accepted: the v2 fixed part plus address blocks and TLVs that proxies
/// commonly send. Anything longer is refused rather than buffered.
pub const MAX_HEADER_LEN: usize = 1024;

/// How a v1 (text) header starts.
const V1_SIGNATURE: &[u8] = b"PROXY ";
/// How a v2 (binary) header starts.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header line, CRLF included (the specification's worst case, TCP6 with full
/// addresses and ports).
const V1_MAX_LEN: usize = 107;

/// Why a PROXY protocol header was refused. Each closes that one connection.
#[derive(Debug, thiserror::Error)]
pub enum ProxyProtocolError {
    /// The peer closed or failed before a whole header arrived.
    #[error("connection ended inside the PROXY protocol header")]
    Truncated,
    /// The header did not arrive within the listener's deadline.
    #[error("no complete PROXY protocol header within {0:?}")]
    Timeout(Duration),
    /// The bytes are not a PROXY protocol header.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    /// A valid header of a version the listener does not accept.
    #[error("PROXY protocol {0} is not accepted on this listener")]
    WrongVersion(&'static str),
    /// Longer than [`MAX_HEADER_LEN`].
    #[error("PROXY protocol header longer than {MAX_HEADER_LEN} bytes")]
    TooLong,
    /// A socket error while reading.
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] io::Error),
}

/// A header as received.
#[derive(Debug, Default)]
pub struct Received {
    /// The original client, when the header names one (not for `UNKNOWN` / `LOCAL`).
    pub source: Option<SocketAddr>,
    /// The address the client connected to, when the header names one.
    pub destination: Option<SocketAddr>,
    /// Payload bytes that arrived in the same reads as the header; they go to the backend first.
    pub leftover: Vec<u8>,
}

/// Reads one PROXY protocol header from `stream`, within `timeout`.
pub async fn read_header(
    stream: &mut TcpStream,
    accept: ProxyProtocolVersions,
    timeout: Duration,
) -> Result<Received, ProxyProtocolError> {
    match tokio::time::timeout(timeout, read_header_inner(stream, accept)).await {
        Ok(result) => result,
        Err(_) => Err(ProxyProtocolError::Timeout(timeout)),
    }
}

async fn read_header_inner(
    stream: &mut TcpStream,
    accept: ProxyProtocolVersions,
) -> Result<Received, ProxyProtocolError> {
    let mut buf = Vec::with_capacity(256);
    loop {
        if buf.len() >= MAX_HEADER_LEN {
            return Err(ProxyProtocolError::TooLong);
        }
        let mut chunk = [0u8; 256];
        let want = chunk.len().min(MAX_HEADER_LEN - buf.len());
        let n = stream.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(ProxyProtocolError::Truncated);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(received) = parse(&buf, accept)? {
            return Ok(received);
        }
    }
}

/// Parses a header at the start of `buf`: `Ok(None)` when more bytes are needed.
pub fn parse(
    buf: &[u8],
    accept: ProxyProtocolVersions,
) -> Result<Option<Received>, ProxyProtocolError> {
    // Bytes that start neither signature are no header however many follow; ppp calls some of
    // them incomplete, some not, depending on where the read stopped.
    let starts = |signature: &[u8]| {
        let n = buf.len().min(signature.len());
        buf[..n] == signature[..n]
    };
    if !starts(V1_SIGNATURE) && !starts(V2_SIGNATURE) {
        return Err(ProxyProtocolError::Malformed(
            "no PROXY protocol signature".into(),
        ));
    }
    // A v1 header is one line. ppp parses a line that has not ended yet as if it had, and a
    // line cut right after the space before its last port reads as an empty (invalid) port:
    // hand it only whole lines, so that where TCP splits the header does not matter.
    let v1_prefix = &V1_SIGNATURE[..buf.len().min(V1_SIGNATURE.len())];
    if buf.starts_with(v1_prefix) && !buf.contains(&b'\n') {
        if buf.len() >= V1_MAX_LEN {
            return Err(ProxyProtocolError::Malformed(
                "v1 header line longer than 107 bytes".into(),
            ));
        }
        return Ok(None);
    }
    // ppp reads a line ended by a bare LF one way or another depending on what follows it.
    if buf.starts_with(V1_SIGNATURE)
        && let Some(lf) = memchr::memchr(b'\n', buf)
        && buf[..lf].last() != Some(&b'\r')
    {
        return Err(ProxyProtocolError::Malformed(
            "v1 header line not ended by CRLF".into(),
        ));
    }
    let result = ppp::HeaderResult::parse(buf);
    if result.is_incomplete() {
        // ppp reports a v1 line with missing fields, or ended by a bare LF, as "incomplete";
        // once the line has ended, no further bytes can complete it.
        if buf.starts_with(b"PROXY") && buf.contains(&b'\n') {
            return Err(ProxyProtocolError::Malformed(
                "v1 header line is missing fields or not ended by CRLF".into(),
            ));
        }
        return Ok(None);
    }
    let (version, len, source, destination) = match result {
        ppp::HeaderResult::V1(Ok(header)) => {
            let (source, destination) = match header.addresses {
                ppp::v1::Addresses::Tcp4(a) => (
                    Some(SocketAddr::from((a.source_address, a.source_port))),
                    Some(SocketAddr::from((
                        a.destination_address,
                        a.destination_port,
                    ))),
                ),
                ppp::v1::Addresses::Tcp6(a) => (
                    Some(SocketAddr::from((a.source_address, a.source_port))),
                    Some(SocketAddr::from((
                        a.destination_address,
                        a.destination_port,
                    ))),
                ),
                ppp::v1::Addresses::Unknown => (None, None),
            };
            (
                ProxyProtocolVersions::V1,
                header.header.len(),
                source,
                destination,
            )
        }
        ppp::HeaderResult::V2(Ok(header)) => {
            let addresses = match (header.command, header.addresses) {
                // LOCAL: the proxy's own connection (a health check); no client to report.
                (Command::Local, _) => None,
                (Command::Proxy, v2::Addresses::IPv4(a)) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                (Command::Proxy, v2::Addresses::IPv6(a)) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                (Command::Proxy, _) => None,
            };
            (
                ProxyProtocolVersions::V2,
                header.len(),
                addresses.map(|a| a.0),
                addresses.map(|a| a.1),
            )
        }
        ppp::HeaderResult::V1(Err(error)) => {
            return Err(ProxyProtocolError::Malformed(error.to_string()));
        }
        ppp::HeaderResult::V2(Err(error)) => {
            return Err(ProxyProtocolError::Malformed(error.to_string()));
        }
    };
    match (accept, version) {
        (ProxyProtocolVersions::V1, ProxyProtocolVersions::V2) => {
            return Err(ProxyProtocolError::WrongVersion("v2"));
        }
        (ProxyProtocolVersions::V2, ProxyProtocolVersions::V1) => {
            return Err(ProxyProtocolError::WrongVersion("v1"));
        }
        _ => {}
    }
    // A dual-stack proxy in front may state an IPv4 client as ::ffff:a.b.c.d; it is the same
    // client, and is treated as IPv4 like a peer connecting that way (trust, hashing, logs,
    // forwarding headers).
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    Ok(Some(Received {
        source: source.map(canonical),
        destination: destination.map(canonical),
        leftover: buf[len..].to_vec(),
    }))
}

/// Encodes a header that tells a backend about a client at `source` that connected to
/// `destination`. Mixed address families (an IPv4 client on an IPv6 listener) are sent as
/// IPv6, mapping the IPv4 address, so the client address is never dropped.
pub fn encode(
    version: ProxyProtocolVersion,
    source: SocketAddr,
    destination: SocketAddr,
) -> Vec<u8> {
    let (source, destination) = same_family(source, destination);
    match version {
        ProxyProtocolVersion::V1 => {
            let addresses = ppp::v1::Addresses::from((source, destination));
            addresses.to_string().into_bytes()
        }
        ProxyProtocolVersion::V2 => {
            let builder = v2::Builder::with_addresses(
                Version::Two | Command::Proxy,
                Protocol::Stream,
                (source, destination),
            );
            // Building into a Vec cannot fail: the only error is a length over u16, and two
            // addresses without TLVs are at most 36 bytes.
            builder.build().unwrap_or_default()
        }
    }
}

fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (source, destination) = (canonical(source), canonical(destination));
    fn v6(addr: SocketAddr) -> SocketAddr {
        match addr {
            SocketAddr::V4(a) => SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port()),
            v6 => v6,
        }
    }
    match (source, destination) {
        (SocketAddr::V4(_), SocketAddr::V6(_)) => (v6(source), destination),
        (SocketAddr::V6(_), SocketAddr::V4(_)) => (source, v6(destination)),
        _ => (source, destination),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn round_trips_both_versions() {
        for version in [ProxyProtocolVersion::V1, ProxyProtocolVersion::V2] {
            let mut bytes = encode(version, addr("192.0.2.7:4000"), addr("198.51.100.1:443"));
            bytes.extend_from_slice(b"payload");
            let got = parse(&bytes, ProxyProtocolVersions::Any).unwrap().unwrap();
            assert_eq!(got.source, Some(addr("192.0.2.7:4000")));
            assert_eq!(got.destination, Some(addr("198.51.100.1:443")));
            assert_eq!(got.leftover, b"payload");
        }
    }

    #[test]
    fn v1_text_is_standard() {
        let bytes = encode(
            ProxyProtocolVersion::V1,
            addr("10.0.0.1:1234"),
            addr("10.0.0.2:80"),
        );
        assert_eq!(bytes, b"PROXY TCP4 10.0.0.1 10.0.0.2 1234 80\r\n");
    }

    #[test]
    fn partial_then_complete() {
        let bytes = encode(
            ProxyProtocolVersion::V2,
            addr("[2001:db8::1]:1"),
            addr("[2001:db8::2]:2"),
        );
        for cut in 1..bytes.len() {
            assert!(
                parse(&bytes[..cut], ProxyProtocolVersions::Any)
                    .unwrap()
                    .is_none(),
                "cut {cut}"
            );
        }
        assert!(parse(&bytes, ProxyProtocolVersions::V2).unwrap().is_some());
    }

    #[test]
    fn a_v1_header_cut_anywhere_asks_for_more() {
        // A header split over TCP segments may stop at any byte, also right after the space
        // before the destination port, where the line so far already has every field.
        for header in [
            &b"PROXY TCP4 203.0.113.9 198.51.100.1 5555 443\r\n"[..],
            b"PROXY TCP6 2001:db8::9 2001:db8::1 6666 443\r\n",
            b"PROXY UNKNOWN\r\n",
        ] {
            for cut in 1..header.len() {
                assert!(
                    matches!(parse(&header[..cut], ProxyProtocolVersions::Any), Ok(None)),
                    "{:?}",
                    String::from_utf8_lossy(&header[..cut])
                );
            }
            let mut whole = header.to_vec();
            whole.extend_from_slice(b"data");
            let got = parse(&whole, ProxyProtocolVersions::V1).unwrap().unwrap();
            assert_eq!(got.leftover, b"data");
        }
    }

    #[test]
    fn a_v1_line_ended_by_a_bare_lf_is_refused_however_it_arrives() {
        // The line has ended: no later byte can make it a header, so it is refused at once
        // rather than waited on, whatever follows it in the same read.
        for (line, ended) in [
            (&b"PROXY TCP4 19_\nPO5 19_\n0.2. 19181"[..], 15),
            (b"PROXY TCP6 2003::5 ::1 1961 0 \n3:\x19\n\x19\0\0", 31),
        ] {
            for end in ended..=line.len() {
                assert!(
                    parse(&line[..end], ProxyProtocolVersions::Any).is_err(),
                    "{:?}",
                    String::from_utf8_lossy(&line[..end])
                );
            }
        }
    }

    #[test]
    fn bytes_that_start_no_signature_are_refused_at_once() {
        let garbage = &b"P TCP6 200 2001P"[..];
        for end in 2..=garbage.len() {
            assert!(
                parse(&garbage[..end], ProxyProtocolVersions::Any).is_err(),
                "{:?}",
                String::from_utf8_lossy(&garbage[..end])
            );
        }
        // A start of either signature is waited on.
        assert!(matches!(
            parse(b"PRO", ProxyProtocolVersions::Any),
            Ok(None)
        ));
        assert!(matches!(
            parse(b"\r\n\r\n\0", ProxyProtocolVersions::Any),
            Ok(None)
        ));
    }

    #[test]
    fn refuses_garbage_and_wrong_versions() {
        assert!(parse(b"GET / HTTP/1.1\r\n\r\n", ProxyProtocolVersions::Any).is_err());
        assert!(
            parse(
                b"PROXY TCP4 1.2.3.4 nonsense\r\n",
                ProxyProtocolVersions::Any
            )
            .is_err()
        );
        let v1 = encode(
            ProxyProtocolVersion::V1,
            addr("10.0.0.1:1"),
            addr("10.0.0.2:2"),
        );
        assert!(matches!(
            parse(&v1, ProxyProtocolVersions::V2),
            Err(ProxyProtocolError::WrongVersion("v1"))
        ));
        let v2 = encode(
            ProxyProtocolVersion::V2,
            addr("10.0.0.1:1"),
            addr("10.0.0.2:2"),
        );
        assert!(matches!(
            parse(&v2, ProxyProtocolVersions::V1),
            Err(ProxyProtocolError::WrongVersion("v2"))
        ));
    }

    #[test]
    fn mapped_addresses_are_sent_as_ipv4() {
        let bytes = encode(
            ProxyProtocolVersion::V1,
            addr("[::ffff:192.0.2.7]:4000"),
            addr("[::ffff:10.0.0.1]:443"),
        );
        assert_eq!(bytes, b"PROXY TCP4 192.0.2.7 10.0.0.1 4000 443\r\n");
    }

    #[test]
    fn mapped_addresses_received_are_read_as_ipv4() {
        let bytes = encode(
            ProxyProtocolVersion::V2,
            addr("[::ffff:192.0.2.7]:4000"),
            addr("[2001:db8::1]:443"),
        );
        let got = parse(&bytes, ProxyProtocolVersions::Any).unwrap().unwrap();
        assert_eq!(got.source, Some(addr("192.0.2.7:4000")));
        assert_eq!(got.destination, Some(addr("[2001:db8::1]:443")));
    }

    #[test]
    fn mixed_families_map_to_v6() {
        let bytes = encode(
            ProxyProtocolVersion::V2,
            addr("10.0.0.1:1"),
            addr("[::1]:2"),
        );
        // Encoded as IPv6 (both addresses must share a family), read back as the IPv4 it is.
        assert_eq!(bytes[13], 0x21, "TCP over IPv6");
        let got = parse(&bytes, ProxyProtocolVersions::Any).unwrap().unwrap();
        assert_eq!(got.source, Some(addr("10.0.0.1:1")));
    }
}
