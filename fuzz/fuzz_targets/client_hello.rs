//! The ClientHello reader of SNI passthrough gets bytes straight from the network: whatever
//! they are, it must not panic, and a name it returns must be one a route can match.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::tls::client_hello::{MAX_CLIENT_HELLO, parse};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(Some(name))) = parse(data) {
        assert!(!name.is_empty() && name.len() <= 253);
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        );
        assert!(!name.ends_with('.'));
    }
    // Past the cap the reader has decided: it never asks for more.
    if data.len() > MAX_CLIENT_HELLO {
        assert!(!matches!(parse(data), Ok(None)));
    }
});
