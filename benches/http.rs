//! The per-request work of the HTTP/1.1 path that is not I/O: parsing a request head, and
//! writing the head sent upstream (plain, and with header rules' drop and add lists). The
//! allocation columns show what each costs in allocations.
//!
//! Run: `cargo bench --bench http`

use bytes::BytesMut;
use divan::{AllocProfiler, Bencher, black_box};
use switchyard::http::h1;

#[global_allocator]
static ALLOC: AllocProfiler = AllocProfiler::system();

fn main() {
    divan::main();
}

/// A browser-like GET with a dozen fields.
const REQUEST: &[u8] = b"GET /api/v1/users/42?fields=name,email HTTP/1.1\r\n\
Host: shop.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)\r\n\
Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n\
Accept-Language: en-GB,en;q=0.9\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Connection: keep-alive\r\n\
Cookie: session=abcdef0123456789; theme=dark\r\n\
Cache-Control: no-cache\r\n\
X-Request-ID: 7f3a2c9e\r\n\
Sec-Fetch-Mode: navigate\r\n\
Referer: https://shop.example.com/\r\n\r\n";

#[divan::bench]
fn parse_request(bencher: Bencher) {
    bencher.bench_local(|| {
        let mut buf = BytesMut::from(REQUEST);
        black_box(h1::parse_request(black_box(&mut buf)).ok())
    });
}

#[divan::bench]
fn write_upstream_plain(bencher: Bencher) {
    let mut buf = BytesMut::from(REQUEST);
    let head = h1::parse_request(&mut buf)
        .ok()
        .flatten()
        .expect("valid request");
    let mut out = BytesMut::with_capacity(2048);
    let extra: [(&str, &[u8]); 4] = [
        ("x-forwarded-for", b"192.0.2.7"),
        ("x-real-ip", b"192.0.2.7"),
        ("x-forwarded-proto", b"http"),
        ("x-request-id", b"7f3a2c9e"),
    ];
    let drop = [
        "x-forwarded-for",
        "x-real-ip",
        "x-forwarded-proto",
        "x-request-id",
    ];
    bencher.bench_local(|| {
        out.clear();
        head.write_upstream(&mut out, None, None, &drop, &extra);
        black_box(out.len())
    });
}

/// As a listener with `request_headers = { set, add, remove }` and a rewrite produces it.
#[divan::bench]
fn write_upstream_with_rules(bencher: Bencher) {
    let mut buf = BytesMut::from(REQUEST);
    let head = h1::parse_request(&mut buf)
        .ok()
        .flatten()
        .expect("valid request");
    let mut out = BytesMut::with_capacity(2048);
    let extra: [(&str, &[u8]); 6] = [
        ("x-forwarded-for", b"192.0.2.7"),
        ("x-real-ip", b"192.0.2.7"),
        ("x-forwarded-proto", b"http"),
        ("x-request-id", b"7f3a2c9e"),
        ("x-edge", b"switchyard"),
        ("cache-control", b"max-age=0"),
    ];
    let drop = [
        "x-forwarded-for",
        "x-real-ip",
        "x-forwarded-proto",
        "x-request-id",
        "cookie",
        "cache-control",
    ];
    bencher.bench_local(|| {
        out.clear();
        head.write_upstream(
            &mut out,
            Some(b"internal.local"),
            Some("/v1/users/42?fields=name,email"),
            &drop,
            &extra,
        );
        black_box(out.len())
    });
}

/// The tokenising alone, for comparison with `parse_request`.
#[divan::bench]
fn httparse_only(bencher: Bencher) {
    bencher.bench_local(|| {
        let mut headers = [httparse::EMPTY_HEADER; h1::MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        black_box(
            request
                .parse(black_box(REQUEST))
                .ok()
                .map(|s| s.is_complete()),
        )
    });
}
