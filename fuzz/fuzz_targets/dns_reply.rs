//! A DNS reply is a datagram anyone on the path can forge or mangle: names with compression
//! pointers that loop or point forward, counts that announce more records than there are,
//! records cut short. The parser must answer in bounded time without panicking, and what it
//! returns must hold together: addresses of the family asked for, a TTL exactly when there are
//! addresses, never more addresses than the packet has room for.
//!
//! Input: a byte choosing the query type and the name asked (a fixed one, or the question the
//! packet itself carries, so that the answers get read), then the packet.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::dns::{QueryType, encode_name, parse_reply};

/// The question's name in wire form as a query would have it: uncompressed, lower case.
fn question(packet: &[u8]) -> Option<Vec<u8>> {
    let mut name = Vec::new();
    let mut pos = 12;
    loop {
        let len = usize::from(*packet.get(pos)?);
        if len > 63 {
            return None;
        }
        name.push(len as u8);
        if len == 0 {
            return Some(name);
        }
        name.extend(packet.get(pos + 1..pos + 1 + len)?.iter().map(u8::to_ascii_lowercase));
        pos += 1 + len;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&choice, packet)) = data.split_first() else {
        return;
    };
    let qtype = if choice & 1 == 0 {
        QueryType::A
    } else {
        QueryType::Aaaa
    };
    let fixed = encode_name("example.com").unwrap_or_default();
    let name = if choice & 2 == 0 {
        fixed
    } else {
        question(packet).unwrap_or(fixed)
    };
    let id = packet
        .get(..2)
        .map_or(0, |id| u16::from_be_bytes([id[0], id[1]]));
    let Ok(reply) = parse_reply(packet, id, &name, qtype) else {
        return;
    };
    assert!(reply.rcode < 16);
    assert_eq!(reply.ttl.is_some(), !reply.addrs.is_empty());
    assert!(reply.ttl.is_none_or(|ttl| ttl <= i32::MAX as u32));
    // The smallest address record: a 2-byte pointer, 10 bytes of fields, 4 of address.
    assert!(reply.addrs.len() <= packet.len() / 16);
    for addr in &reply.addrs {
        assert_eq!(addr.is_ipv6(), qtype == QueryType::Aaaa);
    }
});
