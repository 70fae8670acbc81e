//! A pool's `retry`: answers with a listed status, and response timeouts, send a replayable
//! request to another backend; the client sees the answer of the last backend tried.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use switchyard::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTP/1.1 backend that answers every request with one status, and the requests it got.
struct Answering {
    backend: Backend,
    requests: Arc<AtomicUsize>,
}

impl Answering {
    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Holds the first `count` requests of the backends sharing it until all of them arrived, so
/// that each holds its backend's slot at the same time; later requests pass at once.
#[derive(Clone)]
struct Gate {
    arrived: Arc<AtomicUsize>,
    barrier: Arc<tokio::sync::Barrier>,
    count: usize,
}

impl Gate {
    fn new(count: usize) -> Gate {
        Gate {
            arrived: Arc::new(AtomicUsize::new(0)),
            barrier: Arc::new(tokio::sync::Barrier::new(count)),
            count,
        }
    }

    /// Waits, up to [`PATIENCE`], for the others of the first `count` requests.
    async fn pass(&self) {
        if self.arrived.fetch_add(1, Ordering::SeqCst) < self.count {
            let _ = tokio::time::timeout(PATIENCE, self.barrier.wait()).await;
        }
    }
}

/// A keep-alive HTTP/1.1 backend answering each request with `status`, header `x-backend:
/// NAME` and the body `NAME N`, where N is the request's place among all those that backends
/// sharing `order` received (1 for the first). `None` for `status` never answers: it reads
/// requests and holds them.
async fn answering(status: Option<u16>, name: &'static str, order: &Arc<AtomicUsize>) -> Answering {
    answering_through(status, name, order, None).await
}

/// [`answering`], with each request passing `gate` before its answer.
async fn answering_through(
    status: Option<u16>,
    name: &'static str,
    order: &Arc<AtomicUsize>,
    gate: Option<Gate>,
) -> Answering {
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&requests);
    let order = Arc::clone(order);
    let backend = Backend::start(move |mut stream| {
        let requests = Arc::clone(&counted);
        let order = Arc::clone(&order);
        let gate = gate.clone();
        async move {
            let mut buf = Vec::new();
            // Bounded by the client: each round reads one request or ends.
            loop {
                let Some(end) = read_until(&mut stream, &mut buf, b"\r\n\r\n").await else {
                    return;
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                buf.drain(..end + 4);
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while buf.len() < length {
                    if !fill(&mut stream, &mut buf).await {
                        return;
                    }
                }
                buf.drain(..length);
                requests.fetch_add(1, Ordering::SeqCst);
                if let Some(gate) = &gate {
                    gate.pass().await;
                }
                let place = order.fetch_add(1, Ordering::SeqCst) + 1;
                let Some(status) = status else {
                    let mut rest = Vec::new();
                    let _ = stream.read_to_end(&mut rest).await;
                    return;
                };
                let body = format!("{name} {place}");
                let answer = format!(
                    "HTTP/1.1 {status} Answer\r\ncontent-length: {}\r\nx-backend: {name}\r\n\r\n{body}",
                    body.len()
                );
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    Answering { backend, requests }
}

/// An HTTP/2 backend answering every stream with `status` (none: never) and `x-backend: NAME`,
/// and the streams it got.
async fn answering_h2(status: Option<u16>, name: &'static str) -> Answering {
    answering_h2_through(status, name, None).await
}

/// [`answering_h2`], with each stream passing `gate` before its answer.
async fn answering_h2_through(
    status: Option<u16>,
    name: &'static str,
    gate: Option<Gate>,
) -> Answering {
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&requests);
    let backend = h2_backend_with(move |_request, mut respond| {
        let requests = Arc::clone(&counted);
        let gate = gate.clone();
        async move {
            requests.fetch_add(1, Ordering::SeqCst);
            if let Some(gate) = &gate {
                gate.pass().await;
            }
            let Some(status) = status else {
                // Held, unanswered, until the proxy gives the stream up.
                std::future::pending::<()>().await;
                drop(respond);
                return;
            };
            let response = http::Response::builder()
                .status(status)
                .header("x-backend", name)
                .body(())
                .expect("response");
            if let Ok(mut body) = respond.send_response(response, false) {
                let _ = body.send_data(bytes::Bytes::from(name), true);
            }
        }
    })
    .await;
    Answering { backend, requests }
}

/// Backend `a` answering `status` (none: never) and backend `b` answering 200, numbering their
/// answers in one sequence: the pair most tests here retry between.
async fn failing_and_healthy(status: Option<u16>) -> (Answering, Answering) {
    let order = Arc::new(AtomicUsize::new(0));
    let failing = answering(status, "a", &order).await;
    (failing, answering(Some(200), "b", &order).await)
}

/// [`failing_and_healthy`] with HTTP/2 backends.
async fn failing_and_healthy_h2(status: Option<u16>) -> (Answering, Answering) {
    let failing = answering_h2(status, "a").await;
    (failing, answering_h2(Some(200), "b").await)
}

/// The proxy in front of `backends` with `pool_extra` in the pool's table.
fn proxy(backends: &[SocketAddr], pool_extra: &str) -> Proxy {
    Proxy::start(&single_pool(backends, "", pool_extra))
}

/// Requests the listener counted as having tried more than one backend.
fn retries(proxy: &Proxy) -> usize {
    proxy.stats("l7").retries.load(Ordering::SeqCst) as usize
}

/// Sends `raw` on a connection of its own and reads the answer.
async fn ask(proxy: &Proxy, raw: &str) -> Reply {
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    client.send(raw.as_bytes()).await;
    client.reply().await.expect("a reply")
}

const GET: &str = "GET /x HTTP/1.1\r\nHost: test\r\n\r\n";

/// The statuses of two requests `raw`, each on a connection of its own, in ascending order:
/// with round robin over two backends, one answer of each.
async fn two_statuses(proxy: &Proxy, raw: &str) -> Vec<u16> {
    let mut statuses = vec![ask(proxy, raw).await.status, ask(proxy, raw).await.status];
    statuses.sort();
    statuses
}

/// Sends `count` GETs, each on a connection of its own, and checks that backend `b` answers
/// every one with 200.
async fn all_answered_by_b(proxy: &Proxy, count: usize) {
    for _ in 0..count {
        let reply = ask(proxy, GET).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-backend"), Some("b"));
    }
}

#[tokio::test]
async fn an_answer_with_a_listed_status_is_retried_on_the_other_backend() {
    let (failing, healthy) = failing_and_healthy(Some(503)).await;
    let proxy = proxy(
        &[failing.backend.addr, healthy.backend.addr],
        "retry = { on = [\"502\", \"503\", \"504\"] }\noutlier = { consecutive_failures = 100 }",
    );
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    for _ in 0..4 {
        let reply = client.get("/x", "").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.header("x-backend"), Some("b"));
    }
    // Round robin sends every other first try to the failing backend.
    let passed_over = failing.requests();
    assert!(passed_over >= 1, "the failing backend was never tried");
    assert_eq!(healthy.requests(), 4);
    assert_eq!(retries(&proxy), passed_over);
    // A 503 passed over still counts against the backend that gave it.
    let state = proxy.registry.state("p", failing.backend.addr);
    assert_eq!(
        state.consecutive_failures.load(Ordering::SeqCst) as usize,
        passed_over
    );
    assert_eq!(
        state.responses[4].load(Ordering::SeqCst) as usize,
        passed_over
    );
}

#[tokio::test]
async fn the_access_log_names_the_backends_tried_and_the_one_that_answered() {
    let (failing, healthy) = failing_and_healthy(Some(503)).await;
    let log = fresh_log("retry_access_log");
    let proxy = Proxy::start(&single_pool(
        &[failing.backend.addr, healthy.backend.addr],
        &json_access_log(&log),
        "retry = { on = [\"503\"] }",
    ));
    for _ in 0..2 {
        assert_eq!(ask(&proxy, GET).await.status, 200);
    }
    let lines = json_lines(&log, 2).await;
    let retried: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|line| line.get("attempts").is_some())
        .collect();
    assert_eq!(retried.len(), failing.requests(), "{lines:?}");
    for line in lines.iter() {
        assert_eq!(line["backend"], healthy.backend.addr.to_string(), "{line}");
        assert_eq!(line["status"], 200, "{line}");
    }
    for line in retried {
        assert_eq!(line["attempts"], 2, "{line}");
    }
}

#[tokio::test]
async fn a_post_is_not_retried() {
    let (failing, healthy) = failing_and_healthy(Some(503)).await;
    let proxy = proxy(
        &[failing.backend.addr, healthy.backend.addr],
        "retry = { on = [\"503\"] }",
    );
    let statuses = two_statuses(&proxy, "POST /x HTTP/1.1\r\nHost: test\r\n\r\n").await;
    assert_eq!(statuses, [200, 503]);
    assert_eq!(failing.requests() + healthy.requests(), 2);
    assert_eq!(retries(&proxy), 0);
}

#[tokio::test]
async fn a_request_with_a_body_is_not_retried() {
    let (failing, healthy) = failing_and_healthy(Some(503)).await;
    let proxy = proxy(
        &[failing.backend.addr, healthy.backend.addr],
        "retry = { on = [\"503\"] }",
    );
    let statuses = two_statuses(
        &proxy,
        "PUT /x HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert_eq!(statuses, [200, 503]);
    assert_eq!(failing.requests() + healthy.requests(), 2);
    assert_eq!(retries(&proxy), 0);
}

#[tokio::test]
async fn the_last_answer_reaches_the_client_when_every_backend_fails() {
    let order = Arc::new(AtomicUsize::new(0));
    let first = answering(Some(503), "a", &order).await;
    let second = answering(Some(503), "b", &order).await;
    let proxy = proxy(
        &[first.backend.addr, second.backend.addr],
        "retry = { on = [\"5xx\"] }",
    );
    let reply = ask(&proxy, GET).await;
    assert_eq!(reply.status, 503);
    // Each backend tried once, and the answer is the second one's.
    assert_eq!((first.requests(), second.requests()), (1, 1));
    assert!(reply.text().ends_with(" 2"), "{}", reply.text());
    assert_eq!(retries(&proxy), 1);
}

#[tokio::test]
async fn attempts_bound_the_backends_one_request_tries() {
    let order = Arc::new(AtomicUsize::new(0));
    let mut backends = Vec::new();
    for name in ["a", "b", "c"] {
        backends.push(answering(Some(502), name, &order).await);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.backend.addr).collect();
    let proxy = proxy(&addrs, "retry = { on = [\"502\"], attempts = 2 }");
    let reply = ask(&proxy, GET).await;
    assert_eq!(reply.status, 502);
    assert!(reply.text().ends_with(" 2"), "{}", reply.text());
    let tried: usize = backends.iter().map(Answering::requests).sum();
    assert_eq!(tried, 2);
}

#[tokio::test]
async fn a_status_not_listed_is_passed_on() {
    let (failing, healthy) = failing_and_healthy(Some(500)).await;
    let proxy = proxy(
        &[failing.backend.addr, healthy.backend.addr],
        "retry = { on = [\"503\"] }",
    );
    let statuses = two_statuses(&proxy, GET).await;
    assert_eq!(statuses, [200, 500]);
    assert_eq!(retries(&proxy), 0);
}

#[tokio::test]
async fn a_response_timeout_is_retried_on_the_healthy_backend() {
    let (silent, healthy) = failing_and_healthy(None).await;
    let proxy = proxy(
        &[silent.backend.addr, healthy.backend.addr],
        "response_timeout = \"200ms\"\nretry = { on = [\"timeout\"] }",
    );
    all_answered_by_b(&proxy, 2).await;
    assert!(silent.requests() >= 1, "the silent backend was never tried");
    assert_eq!(retries(&proxy), silent.requests());
}

#[tokio::test]
async fn without_timeout_listed_a_response_timeout_is_a_504() {
    let (silent, healthy) = failing_and_healthy(None).await;
    let proxy = proxy(
        &[silent.backend.addr, healthy.backend.addr],
        "response_timeout = \"200ms\"\nretry = { on = [\"503\"] }",
    );
    let statuses = two_statuses(&proxy, GET).await;
    assert_eq!(statuses, [200, 504]);
}

#[tokio::test]
async fn an_h2_pool_retries_a_listed_status() {
    let (failing, healthy) = failing_and_healthy_h2(Some(503)).await;
    let proxy = proxy(
        &[failing.backend.addr, healthy.backend.addr],
        "upstream_protocol = \"h2\"\nretry = { on = [\"503\"] }",
    );
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    for _ in 0..4 {
        let reply = client.get("/x", "").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.header("x-backend"), Some("b"));
    }
    assert!(
        failing.requests() >= 1,
        "the failing backend was never tried"
    );
    assert_eq!(healthy.requests(), 4);
    assert_eq!(retries(&proxy), failing.requests());
}

#[tokio::test]
async fn an_h2_pool_does_not_retry_a_post() {
    let (failing, healthy) = failing_and_healthy_h2(Some(503)).await;
    let proxy = proxy(
        &[failing.backend.addr, healthy.backend.addr],
        "upstream_protocol = \"h2\"\nretry = { on = [\"503\"] }",
    );
    let statuses = two_statuses(&proxy, "POST /x HTTP/1.1\r\nHost: test\r\n\r\n").await;
    assert_eq!(statuses, [200, 503]);
    assert_eq!(retries(&proxy), 0);
}

#[tokio::test]
async fn an_h2_pool_retries_a_response_timeout() {
    let (silent, healthy) = failing_and_healthy_h2(None).await;
    let proxy = proxy(
        &[silent.backend.addr, healthy.backend.addr],
        "upstream_protocol = \"h2\"\nresponse_timeout = \"200ms\"\nretry = { on = [\"timeout\"] }",
    );
    all_answered_by_b(&proxy, 2).await;
    assert!(silent.requests() >= 1, "the silent backend was never tried");
}

/// Sends a bodiless `method` request from an HTTP/2 client and returns the status and the
/// `x-backend` field of the answer.
async fn ask_h2(proxy: &Proxy, method: &str) -> (u16, Option<String>) {
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let request = http::Request::builder()
        .method(method)
        .uri("http://test/x")
        .body(())
        .expect("request");
    let (response, _) = sender.send_request(request, true).expect("send");
    let response = tokio::time::timeout(PATIENCE, response)
        .await
        .expect("a response in time")
        .expect("a response");
    let backend = response
        .headers()
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (response.status().as_u16(), backend)
}

#[tokio::test]
async fn an_http2_client_s_request_is_retried_on_an_http1_pool() {
    let (failing, healthy) = failing_and_healthy(Some(503)).await;
    h2_gets_are_retried_and_posts_not(&failing, &healthy, "retry = { on = [\"503\"] }").await;
}

/// Through a pool of `failing` (503) and `healthy`, with `pool_extra`: an HTTP/2 client's GETs
/// all reach `healthy`, each 503 passed over counted as a retry, while of two POSTs one gets the
/// 503.
async fn h2_gets_are_retried_and_posts_not(
    failing: &Answering,
    healthy: &Answering,
    pool_extra: &str,
) {
    let proxy = proxy(&[failing.backend.addr, healthy.backend.addr], pool_extra);
    for _ in 0..4 {
        assert_eq!(ask_h2(&proxy, "GET").await, (200, Some("b".to_owned())));
    }
    assert!(
        failing.requests() >= 1,
        "the failing backend was never tried"
    );
    assert_eq!(retries(&proxy), failing.requests());
    let mut statuses = Vec::new();
    for _ in 0..2 {
        statuses.push(ask_h2(&proxy, "POST").await.0);
    }
    statuses.sort();
    assert_eq!(statuses, [200, 503]);
}

#[tokio::test]
async fn an_http2_client_s_request_is_retried_after_a_timeout_on_an_http1_pool() {
    let (silent, healthy) = failing_and_healthy(None).await;
    let proxy = proxy(
        &[silent.backend.addr, healthy.backend.addr],
        "response_timeout = \"200ms\"\nretry = { on = [\"timeout\"] }",
    );
    for _ in 0..2 {
        assert_eq!(ask_h2(&proxy, "GET").await, (200, Some("b".to_owned())));
    }
    assert!(silent.requests() >= 1, "the silent backend was never tried");
}

#[tokio::test]
async fn an_http2_client_s_request_is_retried_on_an_h2_pool() {
    let (failing, healthy) = failing_and_healthy_h2(Some(503)).await;
    h2_gets_are_retried_and_posts_not(
        &failing,
        &healthy,
        "upstream_protocol = \"h2\"\nretry = { on = [\"503\"] }",
    )
    .await;
}

#[tokio::test]
async fn an_http2_client_gets_the_last_answer_when_every_backend_fails() {
    let first = answering_h2(Some(503), "a").await;
    let second = answering_h2(Some(503), "b").await;
    let proxy = proxy(
        &[first.backend.addr, second.backend.addr],
        "upstream_protocol = \"h2\"\nresponse_timeout = \"200ms\"\nretry = { on = [\"503\"] }",
    );
    let (status, backend) = ask_h2(&proxy, "GET").await;
    assert_eq!(status, 503);
    assert!(backend.is_some(), "a backend's own answer");
    assert_eq!((first.requests(), second.requests()), (1, 1));
}

/// The problems `check` would report for a pool of two backends with `retry`.
fn problems(retry: &str) -> Vec<String> {
    let text = format!(
        "{}retry = {retry}\n",
        single_pool(
            &[
                "127.0.0.1:1".parse().expect("addr"),
                "127.0.0.1:2".parse().expect("addr")
            ],
            "",
            ""
        )
    );
    match Config::from_toml(&text, Path::new("retry.toml")) {
        Ok(_) => Vec::new(),
        Err(error) => error
            .problems()
            .into_iter()
            .map(|p| format!("{}: {}", p.path, p.reason))
            .collect(),
    }
}

#[test]
fn retry_settings_are_checked_with_their_key_paths() {
    assert_eq!(
        problems(
            "{ on = [\"502\", \"503\", \"504\", \"5xx\", \"429\", \"timeout\"], attempts = 3 }"
        ),
        Vec::<String>::new()
    );
    let unknown = problems("{ on = [\"503\", \"http_502\", \"200\", \"5030\"] }");
    assert_eq!(unknown.len(), 3, "{unknown:?}");
    for (problem, index) in unknown.iter().zip(1..) {
        assert!(
            problem.starts_with(&format!("pools.p.retry.on[{index}]: unknown condition")),
            "{problem}"
        );
    }
    for attempts in [0, 17] {
        let wrong = problems(&format!("{{ on = [\"503\"], attempts = {attempts} }}"));
        assert_eq!(wrong.len(), 1, "{wrong:?}");
        assert!(
            wrong[0].starts_with("pools.p.retry.attempts: "),
            "{}",
            wrong[0]
        );
    }
    let typo = problems("{ on = [\"503\"], tries = 2 }");
    assert!(
        typo.iter().any(|p| p.starts_with("pools.p.retry.tries")),
        "{typo:?}"
    );
}

/// A backend that reads each request's head and closes the connection without answering.
async fn resetting() -> (Backend, Arc<AtomicUsize>) {
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&requests);
    let backend = Backend::start(move |mut stream| {
        let requests = Arc::clone(&counted);
        async move {
            let mut buf = Vec::new();
            if read_until(&mut stream, &mut buf, b"\r\n\r\n")
                .await
                .is_some()
            {
                requests.fetch_add(1, Ordering::SeqCst);
            }
        }
    })
    .await;
    (backend, requests)
}

#[tokio::test]
async fn an_http2_client_s_request_moves_on_when_a_fresh_connection_fails_before_an_answer() {
    let (failing, tried) = resetting().await;
    let healthy = answering(Some(200), "b", &Arc::new(AtomicUsize::new(0))).await;
    // No `retry`: a reset before any answer moves an idempotent request without a body to
    // another backend anyway, as for an HTTP/1.1 client.
    let proxy = proxy(&[failing.addr, healthy.backend.addr], "");
    for _ in 0..4 {
        assert_eq!(ask_h2(&proxy, "GET").await, (200, Some("b".to_owned())));
    }
    assert!(
        tried.load(Ordering::SeqCst) >= 1,
        "the failing backend was never tried"
    );
}

#[tokio::test]
async fn an_http1_client_s_request_moves_on_when_a_fresh_connection_fails_before_an_answer() {
    let (failing, tried) = resetting().await;
    let healthy = answering(Some(200), "b", &Arc::new(AtomicUsize::new(0))).await;
    let proxy = proxy(&[failing.addr, healthy.backend.addr], "");
    all_answered_by_b(&proxy, 4).await;
    assert!(
        tried.load(Ordering::SeqCst) >= 1,
        "the failing backend was never tried"
    );
}

#[tokio::test]
async fn a_sticky_request_retried_elsewhere_gets_a_cookie_naming_the_backend_that_answered() {
    let (failing, healthy) = failing_and_healthy(Some(503)).await;
    let proxy = proxy(
        &[failing.backend.addr, healthy.backend.addr],
        "retry = { on = [\"503\"] }\nsticky = { cookie = \"SWY\", ttl = \"1h\", secret = \"a secret of sixteen or more\" }",
    );
    // Requests until one went to the failing backend first: its answer names the other.
    let mut cookie = None;
    for _ in 0..4 {
        let reply = ask(&proxy, GET).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-backend"), Some("b"));
        cookie = reply
            .header("set-cookie")
            .and_then(|c| c.split(';').next())
            .map(str::to_owned);
    }
    assert!(
        failing.requests() >= 1,
        "the failing backend was never tried"
    );
    let cookie = cookie.expect("a sticky cookie");
    // That cookie brings the next requests straight to the backend that answered.
    let before = failing.requests();
    for _ in 0..3 {
        let reply = ask(
            &proxy,
            &format!("GET /x HTTP/1.1\r\nHost: test\r\nCookie: {cookie}\r\n\r\n"),
        )
        .await;
        assert_eq!(reply.header("x-backend"), Some("b"));
        assert_eq!(reply.header("set-cookie"), None, "already on its backend");
    }
    assert_eq!(failing.requests(), before);
}

#[tokio::test]
async fn a_request_whose_every_connect_fails_counts_as_retried_from_either_client() {
    let dead = [dead_addr().await, dead_addr().await];
    let http1 = proxy(&dead, "");
    let reply = ask(&http1, GET).await;
    assert_eq!(reply.status, 502);
    assert_eq!(
        retries(&http1),
        1,
        "an HTTP/1.1 client's request tried both"
    );
    assert_eq!(ask_h2(&http1, "GET").await.0, 502);
    // Counted once its stream is recorded, after its response went out.
    eventually("the HTTP/2 request counted as retried", || {
        retries(&http1) == 2
    })
    .await;

    // And on an HTTP/2 pool.
    let h2 = proxy(&dead, "upstream_protocol = \"h2\"");
    assert_eq!(ask(&h2, GET).await.status, 502);
    assert_eq!(retries(&h2), 1);
    assert_eq!(ask_h2(&h2, "GET").await.0, 502);
    eventually("the HTTP/2 request counted as retried", || {
        retries(&h2) == 2
    })
    .await;
}

/// Two requests at once to a pool of two backends that take one request each and answer 503,
/// from HTTP/2 clients or HTTP/1.1 ones, to an HTTP/2 pool or an HTTP/1.1 one: each request
/// holds the slot of the answer its retry passed over, and the other's retry would need that
/// slot. Neither waits in the queue for it: both are answered well before its timeout.
async fn crossed_retries_are_answered_at_once(h2_client: bool, h2_pool: bool) {
    let order = Arc::new(AtomicUsize::new(0));
    let gate = Gate::new(2);
    let (a, b) = if h2_pool {
        (
            answering_h2_through(Some(503), "a", Some(gate.clone())).await,
            answering_h2_through(Some(503), "b", Some(gate)).await,
        )
    } else {
        (
            answering_through(Some(503), "a", &order, Some(gate.clone())).await,
            answering_through(Some(503), "b", &order, Some(gate)).await,
        )
    };
    let protocol = if h2_pool {
        "upstream_protocol = \"h2\""
    } else {
        ""
    };
    let proxy = Proxy::start(&format!(
        r#"
[[listeners]]
name = "l7"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "p"

[pools.p]
backends = [{{ address = "{}", max_connections = 1 }}, {{ address = "{}", max_connections = 1 }}]
queue = {{ size = 8, timeout = "60s" }}
retry = {{ on = ["503"] }}
{protocol}
"#,
        a.backend.addr, b.backend.addr
    ));
    let one = || async {
        if h2_client {
            ask_h2(&proxy, "GET").await
        } else {
            let reply = ask(&proxy, GET).await;
            (reply.status, reply.header("x-backend").map(str::to_owned))
        }
    };
    let answers = tokio::time::timeout(PATIENCE, async { tokio::join!(one(), one()) })
        .await
        .expect("both answered long before the queue timeout");
    for (status, backend) in [answers.0, answers.1] {
        assert_eq!(status, 503);
        assert!(backend.is_some(), "a backend's own answer");
    }
    assert!(
        a.requests() >= 1 && b.requests() >= 1,
        "both backends answered"
    );
}

#[tokio::test]
async fn crossed_retries_of_http1_clients_on_an_http1_pool_do_not_wait() {
    crossed_retries_are_answered_at_once(false, false).await;
}

#[tokio::test]
async fn crossed_retries_of_http1_clients_on_an_h2_pool_do_not_wait() {
    crossed_retries_are_answered_at_once(false, true).await;
}

#[tokio::test]
async fn crossed_retries_of_http2_clients_on_an_http1_pool_do_not_wait() {
    crossed_retries_are_answered_at_once(true, false).await;
}

#[tokio::test]
async fn crossed_retries_of_http2_clients_on_an_h2_pool_do_not_wait() {
    crossed_retries_are_answered_at_once(true, true).await;
}
