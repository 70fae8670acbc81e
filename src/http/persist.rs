//! What ties a request to a backend: the hash key of consistent hashing and the sticky cookie.

use std::net::IpAddr;

use super::router::RequestView;
use crate::balance::hash::{hash_bytes, hash_ip};
use crate::config::HashKey;
use crate::pool::{PickInput, Pool};

/// The pick input for one request to `pool`: its hash key's hash (`None` when the request
/// lacks the key: round robin then) and the backend its sticky cookie names.
pub fn pick_input(pool: &Pool, request: &impl RequestView, client: IpAddr) -> PickInput {
    let hash = pool.hash_key.as_ref().and_then(|key| match key {
        HashKey::SourceIp => Some(hash_ip(client)),
        HashKey::Header(name) => request.header(name.as_str()).map(hash_bytes),
        HashKey::Cookie(name) => request.cookie(name).map(hash_bytes),
        HashKey::Path => Some(hash_bytes(request.path().as_bytes())),
        HashKey::Query(name) => {
            query_value(request.query(), name).map(|v| hash_bytes(v.as_bytes()))
        }
    });
    let sticky = pool.sticky.as_ref().and_then(|sticky| {
        request
            .cookie(&sticky.cookie)
            .and_then(|value| sticky.lookup(value))
    });
    PickInput {
        client: Some(client),
        hash,
        preferred: sticky.map(|(index, _)| index),
        refresh: sticky.is_some_and(|(_, stale)| stale),
    }
}

/// The `Set-Cookie` value to send when the request was not already on backend `index`, or its
/// cookie is due to be renewed.
pub fn sticky_cookie(pool: &Pool, input: &PickInput, index: usize) -> Option<String> {
    let sticky = pool.sticky.as_ref()?;
    (input.preferred != Some(index) || input.refresh).then(|| sticky.set_cookie(index))
}

/// The value of cookie `name` in a Cookie header.
pub fn cookie_value<'a>(header: Option<&'a [u8]>, name: &str) -> Option<&'a [u8]> {
    header?.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|&b| b == b'=')?;
        (&pair[..eq] == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
    })
}

/// The raw (still encoded) value of query parameter `name`.
pub fn query_value<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
        (n == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_and_queries() {
        let header = Some(&b"a=1; SWY=abc ;b=2"[..]);
        assert_eq!(cookie_value(header, "SWY"), Some(&b"abc"[..]));
        assert_eq!(cookie_value(header, "c"), None);
        assert_eq!(cookie_value(None, "a"), None);
        assert_eq!(query_value(Some("x=1&user=42&y"), "user"), Some("42"));
        assert_eq!(query_value(Some("y"), "y"), Some(""));
        assert_eq!(query_value(Some("x=1"), "user"), None);
    }
}
