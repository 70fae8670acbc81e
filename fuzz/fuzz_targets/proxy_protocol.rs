//! The PROXY protocol header comes first on a connection, before anything is known of the
//! peer. However the header is split across reads, the reader must come to the same header (or
//! refuse it either way), never panic, never read past its cap; and what `encode` writes for a
//! client, `parse` reads back as that client.
//!
//! Input: a byte choosing the versions accepted, four bytes that place the cuts, then the
//! bytes of the connection.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use switchyard::config::{ProxyProtocolVersion, ProxyProtocolVersions};
use switchyard::proxy_protocol::{MAX_HEADER_LEN, encode, parse};

/// Where the header said the client was, and how long the header was.
type Header = (Option<SocketAddr>, Option<SocketAddr>, usize);

/// Reads as the listener does: each read appended, the buffer parsed after each one.
/// `Ok(None)`: the connection ended first.
fn read(bytes: &[u8], cuts: &[usize], accept: ProxyProtocolVersions) -> Result<Option<Header>, ()> {
    let mut buf = Vec::new();
    let mut from = 0;
    for &cut in cuts {
        if buf.len() >= MAX_HEADER_LEN {
            return Err(());
        }
        let cut = cut.min(from + MAX_HEADER_LEN - buf.len());
        if cut == from {
            continue;
        }
        buf.extend_from_slice(&bytes[from..cut]);
        from = cut;
        match parse(&buf, accept) {
            Ok(Some(received)) => {
                assert!(buf.ends_with(&received.leftover));
                let len = buf.len() - received.leftover.len();
                assert!(len > 0);
                return Ok(Some((received.source, received.destination, len)));
            }
            Ok(None) => {}
            Err(_) => return Err(()),
        }
    }
    // The listener reads again, and refuses a header that has reached the cap.
    if buf.len() >= MAX_HEADER_LEN {
        return Err(());
    }
    Ok(None)
}

fn address(bytes: &[u8], v6: bool) -> SocketAddr {
    let mut b = [0u8; 18];
    for (o, i) in b.iter_mut().zip(bytes) {
        *o = *i;
    }
    let port = u16::from_be_bytes([b[16], b[17]]);
    let ip = if v6 {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&b[..16]).unwrap_or_default()))
    } else {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    };
    SocketAddr::new(ip, port)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let (choice, seeds, bytes) = (data[0], &data[1..5], &data[5..]);
    let accept = match choice % 3 {
        0 => ProxyProtocolVersions::V1,
        1 => ProxyProtocolVersions::V2,
        _ => ProxyProtocolVersions::Any,
    };
    let mut cuts: Vec<usize> = seeds
        .iter()
        .map(|&s| usize::from(s) * bytes.len() / 256)
        .chain(std::iter::once(bytes.len()))
        .collect();
    cuts.sort_unstable();
    let whole = read(bytes, &[bytes.len()], accept);
    let pieces = read(bytes, &cuts, accept);
    match (&whole, &pieces) {
        (Ok(Some(a)), Ok(Some(b))) => assert_eq!(a, b),
        (Err(()), Err(())) | (Ok(None), Ok(None)) => {}
        (a, b) => panic!("in one read: {a:?}, in pieces at {cuts:?}: {b:?}"),
    }

    // Round trip: any two addresses (from the input), in each version.
    let v6 = choice & 0x80 != 0;
    let source = address(bytes, v6);
    let destination = address(bytes.get(18..).unwrap_or_default(), choice & 0x40 != 0);
    for version in [ProxyProtocolVersion::V1, ProxyProtocolVersion::V2] {
        let mut header = encode(version, source, destination);
        let len = header.len();
        header.extend_from_slice(b"payload");
        let received = match parse(&header, ProxyProtocolVersions::Any) {
            Ok(Some(received)) => received,
            other => panic!("{header:?} as written for {source} -> {destination}: {other:?}"),
        };
        let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        assert_eq!(received.source.map(canonical), Some(canonical(source)));
        assert_eq!(received.leftover, b"payload");
        assert_eq!(header.len() - received.leftover.len(), len);
    }
});
