//! Cost of routing one request, with 10 and with 10,000 exact-host routes in front of a
//! path-prefix route and a default pool. Exact hosts are looked up in a map, so the cost should
//! not grow with the number of virtual hosts (goal: 10,000 routes ≤ 1.2× the time of 10). The
//! allocation profiler shows that routing allocates nothing: its alloc columns must read 0.
//!
//! Run: `cargo bench --bench router`

use divan::{AllocProfiler, Bencher, black_box};
use switchyard::config::{HostPattern, RouteConfig, RouteMatch, RouteTarget, Rules};
use switchyard::http::router::{RequestView, Router};

#[global_allocator]
static ALLOC: AllocProfiler = AllocProfiler::system();

fn main() {
    divan::main();
}

/// Numbers of exact-host routes.
const SIZES: [usize; 2] = [10, 10_000];

/// A request as the router sees it.
struct Request {
    method: &'static str,
    path: &'static str,
    query: Option<&'static str>,
    host: Option<String>,
    headers: Vec<(&'static str, &'static str)>,
}

impl RequestView for Request {
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
        self.host.as_deref().map(str::as_bytes)
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_bytes())
    }
}

fn route(pool: &str, matcher: RouteMatch) -> RouteConfig {
    RouteConfig {
        name: None,
        matcher,
        target: Some(RouteTarget::Pool(pool.into())),
        rules: Rules::default(),
        access: Default::default(),
        rate_limit: None,
    }
}

/// `hosts` exact-host routes (`site{i}.example.com`, over 16 pools), then `/api/` → `api`,
/// default `web`.
fn router(hosts: usize) -> Router {
    let mut routes: Vec<RouteConfig> = (0..hosts)
        .map(|i| {
            route(
                &format!("pool{}", i % 16),
                RouteMatch {
                    host: Some(HostPattern::Exact(format!("site{i}.example.com"))),
                    ..Default::default()
                },
            )
        })
        .collect();
    routes.push(route(
        "api",
        RouteMatch {
            path_prefix: Some("/api/".into()),
            ..Default::default()
        },
    ));
    Router::new(&routes, Some("web"))
}

fn request(path: &'static str, host: &str) -> Request {
    Request {
        method: "GET",
        path,
        query: None,
        host: Some(host.to_owned()),
        headers: vec![("user-agent", "bench"), ("accept", "*/*")],
    }
}

/// The Host names one of the exact-host routes (as clients send it: mixed case, with a port).
#[divan::bench(consts = SIZES)]
fn host_hit<const N: usize>(bencher: Bencher) {
    let router = router(N);
    let req = request("/index.html", &format!("Site{}.Example.com:8080", N / 2));
    assert!(router.route(&req).is_some());
    bencher.bench_local(|| black_box(router.route(black_box(&req))));
}

/// No host route matches; the path-prefix route after all of them does.
#[divan::bench(consts = SIZES)]
fn path_prefix_after_hosts<const N: usize>(bencher: Bencher) {
    let router = router(N);
    let req = request("/api/users/42", "unknown.example.org");
    assert!(router.route(&req).is_some());
    bencher.bench_local(|| black_box(router.route(black_box(&req))));
}

/// Nothing matches: the default pool.
#[divan::bench(consts = SIZES)]
fn miss_to_default<const N: usize>(bencher: Bencher) {
    let router = router(N);
    let req = request("/index.html", "unknown.example.org");
    assert!(router.route(&req).is_some());
    bencher.bench_local(|| black_box(router.route(black_box(&req))));
}
