//! HTTP/1.1 request heads come from any client. Whatever the bytes and however TCP splits them,
//! the head parser must not panic, must decide the same way, and what it accepts must be what
//! it sends on: written upstream and parsed again, the request is the same request, with a
//! normalised path. The router, the lenient request-line reader of refused heads and the path
//! normaliser get the same bytes.

#![no_main]

use std::sync::OnceLock;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use switchyard::config::ListenerKind;
use switchyard::http::h1::{
    RequestHead, RequestLine, has_dot_segment, parse_request, without_dot_segments,
};
use switchyard::http::router::{RequestView, Router};
use switchyard::{Config, http::h1::HeadError};

/// Routes on everything a route can look at: host, path, method, header, query and cookie.
const ROUTES: &str = r#"
[[listeners]]
name = "web"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "p"

  [[listeners.routes]]
  match = { host = "*.example.com", path_prefix = "/api/" }
  pool = "p"

  [[listeners.routes]]
  match = { host = "example.com", path = "/exact" }
  pool = "p"

  [[listeners.routes]]
  match = { path_regex = "^/r/[0-9]+$", method = ["GET", "POST"] }
  pool = "p"

  [[listeners.routes]]
  match = { query = { name = "a b", value = "c&d" } }
  pool = "p"

  [[listeners.routes]]
  match = { cookie = { name = "session", value = "x" } }
  pool = "p"

  [[listeners.routes]]
  match = { header = { name = "X-Version", regex = "^v[0-9]$" } }
  pool = "p"

[pools.p]
backends = ["127.0.0.1:1"]
"#;

fn router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(|| {
        let config = Config::from_toml(ROUTES, "routes.toml".as_ref()).expect("valid routes");
        match &config.listeners[0].kind {
            ListenerKind::Http(http) => Router::new(&http.routes, http.default_pool.as_deref()),
            _ => unreachable!("an http listener"),
        }
    })
}

/// Parses `bytes` fed in the pieces that end at `cuts`, as reads from a socket would.
fn parse_in_pieces(bytes: &[u8], cuts: &[usize]) -> Result<Option<RequestHead>, HeadError> {
    let mut buf = BytesMut::new();
    let mut from = 0;
    for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
        let cut = cut.clamp(from, bytes.len());
        buf.extend_from_slice(&bytes[from..cut]);
        from = cut;
        if let Some(head) = parse_request(&mut buf)? {
            return Ok(Some(head));
        }
    }
    Ok(None)
}

fn same(a: &RequestHead, b: &RequestHead) -> bool {
    a.method() == b.method()
        && a.target() == b.target()
        // An HTTP/1.0 request without Host goes upstream with an empty one.
        && a.host().unwrap_or_default() == b.host().unwrap_or_default()
        && a.framing == b.framing
        && a.fields().eq(b.fields())
}

fn check_path(target: &str) {
    assert!(target == "*" || target.starts_with('/'), "{target:?}");
    // The target a head gives is already normal: normalising it again changes nothing.
    if target.starts_with('/') {
        let path = target.split_once('?').map_or(target, |(path, _)| path);
        assert!(!has_dot_segment(path), "{target:?}");
        assert_eq!(without_dot_segments(target), None, "{target:?}");
    }
}

/// `%XX` of an unreserved character decoded, byte by byte, and (when there is one) each `%`
/// that starts no escape written `%25`: what the normaliser must give for a path without dot
/// segments.
fn decode_unreserved(path: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = path.as_bytes();
    let escape = |i: usize| {
        (bytes[i] == b'%')
            .then(|| Some(hex(*bytes.get(i + 1)?)? * 16 + hex(*bytes.get(i + 2)?)?))
            .flatten()
            .and_then(|v| u8::try_from(v).ok())
    };
    let unreserved = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
    if !(0..bytes.len()).any(|i| escape(i).is_some_and(unreserved)) {
        return path.to_owned();
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match escape(i) {
            Some(b) if unreserved(b) => {
                out.push(b);
                i += 3;
            }
            None if bytes[i] == b'%' => {
                out.extend_from_slice(b"%25");
                i += 1;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).expect("only ASCII replaced")
}

/// The normaliser on any text, as an HTTP/2 `:path` may be (UTF-8 included).
fn check_normaliser(target: &str) {
    let (path, query) = target.split_at(target.find('?').unwrap_or(target.len()));
    let clean = without_dot_segments(target);
    if !path.starts_with('/') {
        assert_eq!(clean, None);
        return;
    }
    let clean = clean.unwrap_or_else(|| target.to_owned());
    assert!(clean.starts_with('/'), "{target:?} -> {clean:?}");
    assert!(clean.ends_with(query), "{target:?} -> {clean:?}");
    let clean_path = &clean[..clean.len() - query.len()];
    assert!(!has_dot_segment(clean_path), "{target:?} -> {clean:?}");
    assert_eq!(without_dot_segments(&clean), None, "{target:?} -> {clean:?}");
    let decoded = decode_unreserved(path);
    if !has_dot_segment(&decoded) {
        assert_eq!(clean_path, decoded, "{target:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check_normaliser(text);
    }
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let whole = parse_request(&mut BytesMut::from(bytes));
    let cuts = [usize::from(cut) * bytes.len() / 256];
    let pieces = parse_in_pieces(bytes, &cuts);
    // Far below every size limit, where a head is refused has no bearing on the decision.
    if bytes.len() < 4096 {
        match (&whole, &pieces) {
            (Ok(Some(a)), Ok(Some(b))) => assert!(same(a, b)),
            (Ok(None), Ok(None)) | (Err(_), Err(_)) => {}
            (a, b) => panic!("one piece: {a:?}, in pieces: {b:?}"),
        }
    }

    let line = RequestLine::lenient(bytes);
    if let Ok(Some(head)) = &whole {
        check_path(head.target());
        assert!(head.method().len() > 32 || line.method == head.method());
        let _ = router().route(head);
        let _ = (head.query(), head.cookie("session"), head.is_idempotent());

        let mut out = BytesMut::new();
        head.write_upstream(&mut out, None, None, &[], &[]);
        let again = match parse_request(&mut out.clone()) {
            Ok(Some(again)) => again,
            other => panic!("{out:?} written from an accepted head parses as {other:?}"),
        };
        assert!(same(head, &again), "{out:?}");
    }
});
