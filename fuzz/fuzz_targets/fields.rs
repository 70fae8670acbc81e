//! The small parsers of field values and bodies a client controls: Accept-Encoding q-values,
//! Cookie and query parameters (hashing and stickiness), the sticky cookie's signed value, the
//! Forwarded field extended for a backend, and the admin API's weight body and path segments.
//! None may panic; each answer must be one the caller can use as it is.
//!
//! Input: a byte choosing the client address and scheme, then the value.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchyard::Config;
use switchyard::backend::Registry;
use switchyard::config::{Compression, Encoding};
use switchyard::fuzzing::{admin_path_segment, admin_weight, forwarded_field};
use switchyard::http::compress::{compressible_type, negotiate};
use switchyard::http::persist::{cookie_value, query_value};
use switchyard::pool::Pool;
use switchyard::tls::TlsStore;

const STICKY: &str = r#"
[[listeners]]
name = "web"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "p"

[pools.p]
backends = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
sticky = { cookie = "SWY", ttl = "1h", secret = "a secret of the fuzz target" }
"#;

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let config = Config::from_toml(STICKY, "sticky.toml".as_ref()).expect("valid config");
        Pool::new(&config.pools["p"], &Registry::default(), &TlsStore::default())
    })
}

fn compression() -> Compression {
    Compression {
        algorithms: vec![Encoding::Zstd, Encoding::Brotli, Encoding::Gzip],
        min_size: 0,
        types: vec!["text/*".into(), "application/json".into()],
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&choice, value)) = data.split_first() else {
        return;
    };
    let text = std::str::from_utf8(value).ok();

    // Accept-Encoding: an encoding offered only when the client names it or `*`.
    let config = compression();
    if let Some(encoding) = negotiate(&config, Some(value)) {
        assert!(config.algorithms.contains(&encoding));
        let lower = String::from_utf8_lossy(value).to_ascii_lowercase();
        let token = match encoding {
            Encoding::Gzip => "gzip",
            Encoding::Brotli => "br",
            Encoding::Zstd => "zstd",
        };
        assert!(lower.contains(token) || lower.contains('*'), "{lower:?}");
    }
    let _ = compressible_type(&config, Some(value));

    // Cookie and query: a value never spans a separator.
    let (name, header) = value.split_at(value.len().min(usize::from(choice & 7)));
    if let Ok(name) = std::str::from_utf8(name)
        && let Some(found) = cookie_value(Some(header), name)
    {
        assert!(!found.contains(&b';'));
        assert_eq!(found, found.trim_ascii());
    }
    if let Some(text) = text {
        let name = &text[..text.find('=').unwrap_or(0)];
        if let Some(found) = query_value(Some(text), name) {
            assert!(!found.contains('&'));
        }
    }

    // The sticky cookie: forged values name nobody, genuine ones their backend.
    let Some(sticky) = pool().sticky.as_ref() else {
        panic!("the pool has a sticky cookie");
    };
    if let Some((index, _)) = sticky.lookup(value) {
        assert!(index < 3);
    }
    let issued = sticky.set_cookie(usize::from(choice % 3));
    let genuine = issued
        .strip_prefix("SWY=")
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_default();
    assert_eq!(
        sticky.lookup(genuine.as_bytes()),
        Some((usize::from(choice % 3), false))
    );

    // Forwarded: what the proxy appends is one clean element, whatever the Host was.
    let ip = if choice & 8 == 0 {
        IpAddr::V4(Ipv4Addr::new(choice, 2, 3, 4))
    } else {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(choice)))
    };
    let existing = (choice & 16 != 0).then_some(value);
    let field = forwarded_field(existing, ip, choice & 32 != 0, value);
    let own = &field[existing.map_or(0, |e| e.len() + 2)..];
    assert!(own.starts_with(b"for="));
    assert!(own.iter().all(|b| b.is_ascii_graphic()), "{own:?}");
    assert_eq!(own.iter().filter(|&&b| b == b'"').count() % 2, 0, "{own:?}");

    // The admin API: a weight in range, read back the same; a path segment decoded.
    if let Ok(weight) = admin_weight(value) {
        assert!(weight >= 1);
        assert_eq!(admin_weight(weight.to_string().as_bytes()), Ok(weight));
    }
    if let Some(text) = text {
        let decoded = admin_path_segment(text);
        if !text.contains('%') {
            assert_eq!(decoded, text);
        }
        assert!(decoded.len() <= text.len() || decoded.contains('\u{fffd}'));
    }
});
