//! Routing: which pool a request goes to.
//!
//! Routes are compiled once per configuration into matchers; nothing is parsed per request. Routes
//! whose host is exact are indexed by that host in a map, so a listener with thousands of virtual
//! hosts costs one lookup, not a scan. "First match wins" still holds across the map and the
//! other routes: both lists keep their routes' original order and are merged by it.

use std::collections::HashMap;

use crate::config::{HostPattern, RouteConfig, RouteMatch, RouteTarget, ValueMatch};

/// What the router needs to know about a request.
pub trait RequestView {
    /// The method, as sent.
    fn method(&self) -> &str;
    /// The query (after `?`), if any.
    fn query(&self) -> Option<&str>;
    /// The path, without the query.
    fn path(&self) -> &str;
    /// The Host as sent (any case, port included), if any.
    fn host(&self) -> Option<&[u8]>;
    /// The first value of header `name` (lower-case), if any.
    fn header(&self, name: &str) -> Option<&[u8]>;

    /// The value of cookie `name`. The default reads the first Cookie field; HTTP/2, where
    /// cookies may come in separate fields, looks in all of them.
    fn cookie(&self, name: &str) -> Option<&[u8]> {
        super::persist::cookie_value(self.header("cookie"), name)
    }
}

/// One compiled route.
#[derive(Debug)]
struct Route {
    matcher: RouteMatch,
    target: Target,
}

/// The outcome of routing one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routed<'a> {
    /// The pool to send it to; `None` for a route that only redirects.
    pub pool: Option<&'a str>,
    /// The index of the matching route in the listener's routes; `None` for the default pool.
    pub route: Option<usize>,
}

/// A route's pool (or pools), as indexes into [`Router::pools`].
#[derive(Debug)]
enum Target {
    /// A route without a pool (it redirects).
    None,
    Pool(usize),
    /// `cumulative[i]` = sum of the weights of `pools[0..=i]`.
    Split {
        pools: Vec<usize>,
        cumulative: Vec<u32>,
    },
}

impl Target {
    fn pick(&self) -> Option<usize> {
        Some(match self {
            Target::None => return None,
            Target::Pool(pool) => *pool,
            Target::Split { pools, cumulative } => {
                let total = cumulative.last().copied().unwrap_or(0).max(1);
                let draw = fastrand::u32(0..total);
                let i = cumulative.partition_point(|&sum| sum <= draw);
                pools[i.min(pools.len() - 1)]
            }
        })
    }
}

/// The compiled routes of one listener.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
    /// Exact host (lower-case, no port) → indexes of the routes for it, in file order.
    by_host: HashMap<String, Vec<usize>>,
    /// Indexes of the routes without an exact host, in file order.
    others: Vec<usize>,
    /// Pool names; routes refer to them by index.
    pools: Vec<String>,
    /// Index of the default pool, if any.
    default: Option<usize>,
}

impl Router {
    /// Compiles the routes of a listener.
    pub fn new(routes: &[RouteConfig], default_pool: Option<&str>) -> Router {
        let mut pools: Vec<String> = Vec::new();
        let mut pool_index = |name: &str| match pools.iter().position(|p| p == name) {
            Some(i) => i,
            None => {
                pools.push(name.to_owned());
                pools.len() - 1
            }
        };
        let mut compiled = Vec::with_capacity(routes.len());
        let mut by_host: HashMap<String, Vec<usize>> = HashMap::new();
        let mut others = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            let m = &route.matcher;
            match &m.host {
                Some(HostPattern::Exact(host)) => by_host.entry(host.clone()).or_default().push(i),
                _ => others.push(i),
            }
            let target = match &route.target {
                None => Target::None,
                Some(RouteTarget::Pool(pool)) => Target::Pool(pool_index(pool)),
                Some(RouteTarget::Split(split)) => {
                    let mut total = 0;
                    let mut pools = Vec::new();
                    let mut cumulative = Vec::new();
                    for (pool, weight) in split {
                        total += weight;
                        pools.push(pool_index(pool));
                        cumulative.push(total);
                    }
                    Target::Split { pools, cumulative }
                }
            };
            compiled.push(Route {
                matcher: m.clone(),
                target,
            });
        }
        let default = default_pool.map(&mut pool_index);
        Router {
            routes: compiled,
            by_host,
            others,
            pools,
            default,
        }
    }

    /// The first matching route and its pool, else the default pool, else `None`.
    pub fn route(&self, request: &impl RequestView) -> Option<Routed<'_>> {
        let mut host_buf = [0u8; 256];
        let host = request
            .host()
            .and_then(|h| normalize_host(h, &mut host_buf));
        let exact: &[usize] = host
            .and_then(|h| self.by_host.get(h))
            .map_or(&[], Vec::as_slice);
        // Merge the two ordered lists: the first route, in file order, that matches wins.
        let (mut a, mut b) = (exact.iter().peekable(), self.others.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(&&x), Some(&&y)) if x < y => a.next(),
                (Some(_), None) => a.next(),
                (_, Some(_)) => b.next(),
                (None, None) => break,
            };
            let Some(&index) = next else { break };
            let route = &self.routes[index];
            if route.matches(request, host) {
                return Some(Routed {
                    pool: route.target.pick().map(|i| self.pools[i].as_str()),
                    route: Some(index),
                });
            }
        }
        self.default.map(|i| Routed {
            pool: Some(self.pools[i].as_str()),
            route: None,
        })
    }
}

impl Route {
    fn matches(&self, request: &impl RequestView, host: Option<&str>) -> bool {
        let m = &self.matcher;
        if let Some(prefix) = &m.path_prefix
            && !request.path().starts_with(prefix.as_str())
        {
            return false;
        }
        if let Some(path) = &m.path
            && request.path() != path
        {
            return false;
        }
        if let Some(pattern) = &m.host {
            let Some(host) = host else { return false };
            let ok = match pattern {
                HostPattern::Exact(exact) => host == exact,
                // ".example.com" matches "a.example.com", not "example.com".
                HostPattern::Suffix(suffix) => {
                    host.len() > suffix.len() && host.ends_with(suffix.as_str())
                }
                HostPattern::Prefix(prefix) => {
                    host.len() > prefix.len() && host.starts_with(prefix.as_str())
                }
            };
            if !ok {
                return false;
            }
        }
        if !m.methods.is_empty() && !m.methods.iter().any(|x| x == request.method()) {
            return false;
        }
        if let Some(header) = &m.header {
            let value = request.header(&header.name);
            let ok = match (&header.condition, value) {
                (_, None) => false,
                (ValueMatch::Present, Some(_)) => true,
                (ValueMatch::Exact(expected), Some(value)) => value == expected.as_bytes(),
                (ValueMatch::Regex(regex), Some(value)) => {
                    std::str::from_utf8(value).is_ok_and(|v| regex.is_match(v))
                }
            };
            if !ok {
                return false;
            }
        }
        if let Some((name, value)) = &m.query
            && !query_has(request.query(), name, value)
        {
            return false;
        }
        // The same lookup as sticky sessions and cookie hashing: the first cookie of that name,
        // in whichever Cookie field (HTTP/2 clients send one field per cookie).
        if let Some((name, value)) = &m.cookie
            && request.cookie(name) != Some(value.as_bytes())
        {
            return false;
        }
        // Last: the regex is the most expensive condition.
        if let Some(regex) = &m.path_regex
            && !regex.is_match(request.path())
        {
            return false;
        }
        true
    }
}

/// Whether the query has parameter `name` equal to `value`, both compared percent-decoded
/// (`+` as a space), without allocating.
fn query_has(query: Option<&str>, name: &str, value: &str) -> bool {
    let Some(query) = query else { return false };
    query.split('&').any(|pair| {
        let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
        decoded_eq(n, name) && decoded_eq(v, value)
    })
}

/// Compares a percent-encoded form field with plain text.
fn decoded_eq(encoded: &str, plain: &str) -> bool {
    let mut bytes = encoded.bytes();
    let mut expected = plain.bytes();
    while let Some(b) = bytes.next() {
        let decoded = match b {
            b'+' => b' ',
            b'%' => {
                let hi = bytes.next().and_then(|h| (h as char).to_digit(16));
                let lo = bytes.next().and_then(|l| (l as char).to_digit(16));
                match (hi, lo) {
                    (Some(hi), Some(lo)) => (hi * 16 + lo) as u8,
                    _ => return false,
                }
            }
            b => b,
        };
        if expected.next() != Some(decoded) {
            return false;
        }
    }
    expected.next().is_none()
}

/// Lower-cases a Host and strips its port, into `buf`. `None` if it is not a plausible host.
fn normalize_host<'a>(host: &[u8], buf: &'a mut [u8; 256]) -> Option<&'a str> {
    let host = if host.first() == Some(&b'[') {
        // An IPv6 literal: "[::1]:8080" -> "[::1]".
        let end = host.iter().position(|&b| b == b']')?;
        &host[..=end]
    } else {
        match host.iter().rposition(|&b| b == b':') {
            Some(colon) => &host[..colon],
            None => host,
        }
    };
    // A trailing dot names the same host.
    let host = host.strip_suffix(b".").unwrap_or(host);
    if host.is_empty() || host.len() > buf.len() {
        return None;
    }
    let out = &mut buf[..host.len()];
    for (o, &b) in out.iter_mut().zip(host) {
        if !(b.is_ascii_alphanumeric() || b"-._:[]".contains(&b)) {
            return None;
        }
        *o = b.to_ascii_lowercase();
    }
    std::str::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteMatch;

    struct Req {
        method: &'static str,
        query: Option<&'static str>,
        path: &'static str,
        host: Option<&'static str>,
        headers: Vec<(&'static str, &'static str)>,
    }

    impl RequestView for Req {
        fn method(&self) -> &str {
            self.method
        }
        fn query(&self) -> Option<&str> {
            self.query
        }
        fn path(&self) -> &str {
            self.path
        }
        fn host(&self) -> Option<&[u8]> {
            self.host.map(str::as_bytes)
        }
        fn header(&self, name: &str) -> Option<&[u8]> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_bytes())
        }
    }

    fn pool_of<'a>(r: &'a Router, request: &Req) -> Option<&'a str> {
        r.route(request).and_then(|routed| routed.pool)
    }

    fn route(pool: &str, m: RouteMatch) -> RouteConfig {
        RouteConfig {
            name: None,
            matcher: m,
            target: Some(RouteTarget::Pool(pool.into())),
            rules: Default::default(),
            access: Default::default(),
            rate_limit: None,
        }
    }

    fn seed_router() -> Router {
        Router::new(
            &[
                route(
                    "api",
                    RouteMatch {
                        path_prefix: Some("/api/".into()),
                        ..Default::default()
                    },
                ),
                route(
                    "static",
                    RouteMatch {
                        path_prefix: Some("/static/".into()),
                        ..Default::default()
                    },
                ),
                route(
                    "admin",
                    RouteMatch {
                        host: Some(HostPattern::Prefix("admin.".into())),
                        ..Default::default()
                    },
                ),
                route(
                    "v2",
                    RouteMatch {
                        header: Some(crate::config::HeaderMatch {
                            name: "x-api-version".into(),
                            condition: ValueMatch::Exact("v2".into()),
                        }),
                        ..Default::default()
                    },
                ),
                route(
                    "exact",
                    RouteMatch {
                        host: Some(HostPattern::Exact("shop.example.com".into())),
                        ..Default::default()
                    },
                ),
                route(
                    "wild",
                    RouteMatch {
                        host: Some(HostPattern::Suffix(".example.com".into())),
                        ..Default::default()
                    },
                ),
            ],
            Some("web"),
        )
    }

    fn req(
        path: &'static str,
        host: Option<&'static str>,
        headers: Vec<(&'static str, &'static str)>,
    ) -> Req {
        Req {
            method: "GET",
            query: None,
            path,
            host,
            headers,
        }
    }

    #[test]
    fn first_match_wins_and_default_catches_the_rest() {
        let r = seed_router();
        assert_eq!(
            pool_of(&r, &req("/api/x", Some("admin.x"), vec![])),
            Some("api")
        );
        assert_eq!(
            pool_of(&r, &req("/static/a.css", None, vec![])),
            Some("static")
        );
        assert_eq!(
            pool_of(&r, &req("/", Some("ADMIN.example.com:8443"), vec![])),
            Some("admin")
        );
        assert_eq!(
            pool_of(&r, &req("/", Some("x"), vec![("X-API-Version", "v2")])),
            Some("v2")
        );
        assert_eq!(
            pool_of(&r, &req("/", Some("Shop.Example.com."), vec![])),
            Some("exact")
        );
        assert_eq!(
            pool_of(&r, &req("/", Some("a.example.com"), vec![])),
            Some("wild")
        );
        assert_eq!(
            pool_of(&r, &req("/", Some("example.com"), vec![])),
            Some("web")
        );
        assert_eq!(pool_of(&r, &req("/apix", None, vec![])), Some("web"));
        // The header route comes before the exact host route, so it wins for that host too.
        assert_eq!(
            pool_of(
                &r,
                &req("/", Some("shop.example.com"), vec![("x-api-version", "v2")])
            ),
            Some("v2")
        );
    }

    #[test]
    fn no_match_and_no_default_is_none() {
        let r = Router::new(
            &[route(
                "api",
                RouteMatch {
                    path_prefix: Some("/api/".into()),
                    ..Default::default()
                },
            )],
            None,
        );
        assert_eq!(pool_of(&r, &req("/", None, vec![])), None);
    }

    #[test]
    fn queries_and_cookies() {
        assert!(query_has(Some("a=1&beta=x%20y+z"), "beta", "x y z"));
        assert!(!query_has(Some("a=1&beta=x"), "beta", "xx"));
        assert!(!query_has(Some("a=%zz"), "a", "?"));
        assert!(query_has(Some("flag"), "flag", ""));
        assert!(!query_has(None, "a", "1"));
        let r = Router::new(
            &[route(
                "canary",
                RouteMatch {
                    cookie: Some(("canary".into(), "yes".into())),
                    ..Default::default()
                },
            )],
            Some("web"),
        );
        let with_cookie = |cookie: &'static str| req("/", None, vec![("cookie", cookie)]);
        assert_eq!(pool_of(&r, &with_cookie("a=1; canary=yes")), Some("canary"));
        assert_eq!(pool_of(&r, &with_cookie("a=1; canary=no")), Some("web"));
        assert_eq!(pool_of(&r, &with_cookie("xcanary=yes")), Some("web"));
        // The first cookie of the name counts, as for sticky sessions (and most servers).
        assert_eq!(
            pool_of(&r, &with_cookie("canary=no; canary=yes")),
            Some("web")
        );
    }

    #[test]
    fn weighted_split_follows_weights() {
        let r = Router::new(
            &[RouteConfig {
                name: None,
                matcher: RouteMatch {
                    path_prefix: Some("/".into()),
                    ..Default::default()
                },
                target: Some(RouteTarget::Split(vec![
                    ("v1".into(), 95),
                    ("v2".into(), 5),
                ])),
                rules: Default::default(),
                access: Default::default(),
                rate_limit: None,
            }],
            None,
        );
        let mut v2 = 0;
        for _ in 0..20_000 {
            if pool_of(&r, &req("/", None, vec![])) == Some("v2") {
                v2 += 1;
            }
        }
        // Expected 1,000; 5 standard deviations is about 155.
        assert!((850..=1150).contains(&v2), "{v2}");
    }

    #[test]
    fn hosts_are_normalized() {
        let mut buf = [0u8; 256];
        assert_eq!(normalize_host(b"A.B:80", &mut buf), Some("a.b"));
        assert_eq!(normalize_host(b"[::1]:80", &mut buf), Some("[::1]"));
        assert_eq!(normalize_host(b"a b", &mut buf), None);
        assert_eq!(normalize_host(&[b'a'; 300], &mut buf), None);
    }
}
