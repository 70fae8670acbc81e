//! Rate limits on real sockets: http listeners and routes answer 429 with `Retry-After` to a
//! client over its limit while other clients are served, buckets refill, HTTP/2 streams and
//! gRPC calls are limited alike, tcp listeners close new connections of a client over its
//! limit, and a reload that keeps a limit keeps its buckets.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

/// A connection to `addr` from the loopback address `source` (Linux answers all of 127/8), so
/// that one test has clients of several addresses.
async fn connect_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((source, 0)))
        .expect("bind a loopback source");
    socket.connect(addr).await.expect("connect")
}

/// An HTTP/1.1 client of `addr` from `source`.
async fn client_from(source: [u8; 4], addr: SocketAddr) -> HttpClient {
    HttpClient::from_stream(connect_from(source, addr).await)
}

#[tokio::test]
async fn a_client_over_the_listener_limit_gets_429_with_retry_after_and_others_are_served() {
    let backend = http_backend("b").await;
    let log = fresh_log("ratelimit-listener");
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        &format!(
            "rate_limit = {{ rate = 1, per = \"1m\", burst = 1 }}\n{}",
            json_access_log(&log)
        ),
        "",
    ));
    let addr = proxy.addr("l7");
    let mut first = client_from([127, 0, 0, 1], addr).await;
    // One, and the burst of one more.
    assert_eq!(first.get("/", "").await.status, 200);
    assert_eq!(first.get("/", "").await.status, 200);
    let refused = first.get("/", "").await;
    assert_eq!(refused.status, 429);
    // The bucket is two intervals of a minute ahead, one more than the burst allows: the next
    // request would pass in a minute.
    assert_eq!(refused.header("retry-after"), Some("60"));
    assert_eq!(refused.text(), "429 Too Many Requests\n");
    // The connection stays open, and is refused again.
    assert_eq!(first.get("/", "").await.status, 429);
    // The same client on another connection is the same client.
    let mut again = client_from([127, 0, 0, 1], addr).await;
    assert_eq!(again.get("/", "").await.status, 429);
    // Another address has its own bucket.
    let mut second = client_from([127, 0, 0, 2], addr).await;
    assert_eq!(second.get("/", "").await.status, 200);
    assert_eq!(proxy.stats("l7").rate_limited.load(Ordering::SeqCst), 3);
    let lines = json_lines(&log, 6).await;
    let statuses: Vec<u64> = lines.iter().filter_map(|l| l["status"].as_u64()).collect();
    assert_eq!(statuses, [200, 200, 429, 429, 429, 200]);
}

#[tokio::test]
async fn a_refused_request_with_a_body_is_answered_then_its_connection_closed() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        "rate_limit = { rate = 1, per = \"1h\" }",
        "",
    ));
    let addr = proxy.addr("l7");
    // The one request the bucket allows.
    assert_eq!(
        client_from([127, 0, 0, 3], addr)
            .await
            .get("/", "")
            .await
            .status,
        200
    );
    for body in [
        "content-length: 5\r\n\r\nhello",
        "transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        let mut client = client_from([127, 0, 0, 3], addr).await;
        // The body, and a request after it in the same write, are never read as requests.
        client
            .send(
                format!(
                    "POST / HTTP/1.1\r\nhost: x\r\n{body}GET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n"
                )
                .as_bytes(),
            )
            .await;
        let first = client.reply().await.expect("a reply");
        assert_eq!(first.status, 429);
        assert_eq!(first.header("connection"), Some("close"));
        assert!(
            client.closed().await,
            "the connection is closed after the 429"
        );
    }
    // The requests after the bodies were never read: only the two refused ones count.
    assert_eq!(proxy.stats("l7").rate_limited.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_header_key_gives_each_value_its_own_bucket_and_requests_without_it_their_address() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        "rate_limit = { rate = 1, per = \"1m\", key = { header = \"X-API-Key\" } }",
        "",
    ));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    assert_eq!(client.get("/", "X-API-Key: a\r\n").await.status, 200);
    assert_eq!(client.get("/", "x-api-key: a\r\n").await.status, 429);
    assert_eq!(client.get("/", "X-API-Key: b\r\n").await.status, 200);
    assert_eq!(client.get("/", "").await.status, 200);
    assert_eq!(client.get("/", "").await.status, 429);
    // Another address without the header is another client.
    let mut other = client_from([127, 0, 0, 3], proxy.addr("l7")).await;
    assert_eq!(other.get("/", "").await.status, 200);
    // ...but not with a value already used.
    assert_eq!(other.get("/", "X-API-Key: b\r\n").await.status, 429);
}

#[tokio::test]
async fn a_bucket_refills_at_its_rate() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        "rate_limit = { rate = 1, per = \"300ms\" }",
        "",
    ));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    // Requests on one keep-alive connection come far faster than one in 300 ms.
    let mut refused = None;
    for _ in 0..100 {
        let reply = client.get("/", "").await;
        if reply.status == 429 {
            refused = Some(reply);
            break;
        }
        assert_eq!(reply.status, 200);
    }
    let refused = refused.expect("a request over the limit");
    // Less than a second to wait is rounded up to one.
    assert_eq!(refused.header("retry-after"), Some("1"));
    let mut served = false;
    // Bounded: 400 polls 5 ms apart are well over the 300 ms the bucket takes.
    for _ in 0..400 {
        if client.get("/", "").await.status == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(served, "the bucket never refilled");
}

#[tokio::test]
async fn a_route_limit_applies_on_top_of_the_listener_limit() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&format!(
        r#"
[[listeners]]
name = "l7"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "p"
rate_limit = {{ rate = 1, per = "1m", burst = 3 }}

  [[listeners.routes]]
  match = {{ path_prefix = "/scarce" }}
  pool = "p"
  rate_limit = {{ rate = 1, per = "1m" }}

[pools.p]
backends = ["{}"]
"#,
        backend.addr
    ));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    assert_eq!(client.get("/scarce", "").await.status, 200);
    // The route's limit: one a minute.
    let refused = client.get("/scarce", "").await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("retry-after"), Some("60"));
    // Other requests go on under the listener's, which counted both of those.
    assert_eq!(client.get("/other", "").await.status, 200);
    assert_eq!(client.get("/other", "").await.status, 200);
    assert_eq!(client.get("/other", "").await.status, 429);
    assert_eq!(proxy.stats("l7").rate_limited.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn http2_streams_and_grpc_calls_over_the_limit_are_refused_in_their_terms() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        "rate_limit = { rate = 1, per = \"1m\" }",
        "",
    ));
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let request = || {
        http::Request::builder()
            .uri("http://test/")
            .body(())
            .expect("request")
    };
    let status = |sender: &mut h2::client::SendRequest<bytes::Bytes>, request| {
        let (response, _) = sender.send_request(request, true).expect("send");
        async move {
            tokio::time::timeout(PATIENCE, response)
                .await
                .expect("in time")
                .expect("a response")
        }
    };
    assert_eq!(status(&mut sender, request()).await.status(), 200);
    let refused = status(&mut sender, request()).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(
        refused.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"60"[..])
    );
    // A gRPC client is told in gRPC's terms: UNAVAILABLE, as gRPC maps an HTTP 429.
    let grpc = http::Request::builder()
        .method("POST")
        .uri("http://test/svc/Call")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let refused = status(&mut sender, grpc).await;
    assert_eq!(refused.status(), 200);
    assert_eq!(
        refused.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"14"[..])
    );
    assert!(refused.headers().contains_key("retry-after"));
}

/// Whether the proxy forwarded a connection from `source` (the backend's name arrives) or
/// closed it unanswered.
async fn forwarded_from(source: [u8; 4], addr: SocketAddr) -> bool {
    forwarded(connect_from(source, addr).await).await
}

/// Whether the proxy forwarded `stream` (the backend's name arrives) or closed it unanswered.
async fn forwarded(mut stream: TcpStream) -> bool {
    let mut got = Vec::new();
    let read = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 64];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.ends_with(b"\n") {
                        break;
                    }
                }
            }
        }
    });
    read.await.expect("an answer or a close in time");
    !got.is_empty()
}

#[tokio::test]
async fn a_tcp_listener_closes_new_connections_of_a_client_over_its_limit() {
    let backend = Backend::named("t").await;
    let proxy = Proxy::start(&single_tcp_pool(
        &[backend.addr],
        "rate_limit = { rate = 1, per = \"1m\", burst = 1 }",
        "",
    ));
    let addr = proxy.addr("l4");
    assert!(forwarded_from([127, 0, 0, 1], addr).await);
    assert!(forwarded_from([127, 0, 0, 1], addr).await);
    assert!(!forwarded_from([127, 0, 0, 1], addr).await);
    assert!(forwarded_from([127, 0, 0, 4], addr).await);
    assert_eq!(proxy.stats("l4").rate_limited.load(Ordering::SeqCst), 1);
    assert_eq!(backend.accepted(), 3);
}

#[tokio::test]
async fn a_tcp_listener_limits_the_client_its_proxy_protocol_header_names() {
    let backend = Backend::named("t").await;
    let proxy = Proxy::start(&single_tcp_pool(
        &[backend.addr],
        "rate_limit = { rate = 1, per = \"1m\" }\nproxy_protocol = \"v1\"\ntrusted_proxies = [\"127.0.0.1\"]",
        "",
    ));
    let addr = proxy.addr("l4");
    // Every connection comes from 127.0.0.1; the header names the client.
    let through = |client: &'static str| async move {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let header = format!("PROXY TCP4 {client} 192.0.2.99 4000 80\r\n");
        tokio::io::AsyncWriteExt::write_all(&mut stream, header.as_bytes())
            .await
            .expect("header");
        forwarded(stream).await
    };
    assert!(through("192.0.2.1").await);
    assert!(through("192.0.2.2").await);
    assert!(!through("192.0.2.1").await, "the first client again");
    assert_eq!(proxy.stats("l4").rate_limited.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_reload_keeps_the_buckets_of_an_unchanged_limit_and_resets_a_changed_one() {
    let backend = http_backend("b").await;
    let config = |limit: &str| single_pool(&[backend.addr], limit, "");
    let proxy = Proxy::start(&config("rate_limit = { rate = 1, per = \"1m\" }"));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    assert_eq!(client.get("/", "").await.status, 200);
    assert_eq!(client.get("/", "").await.status, 429);
    proxy
        .reload(&config("rate_limit = { rate = 1, per = \"1m\" }"))
        .await
        .expect("reload");
    let mut fresh = HttpClient::connect(proxy.addr("l7")).await;
    assert_eq!(fresh.get("/", "").await.status, 429);
    proxy
        .reload(&config("rate_limit = { rate = 2, per = \"1m\" }"))
        .await
        .expect("reload");
    let mut fresh = HttpClient::connect(proxy.addr("l7")).await;
    assert_eq!(fresh.get("/", "").await.status, 200);
}

#[tokio::test]
async fn a_reload_that_inserts_or_reorders_routes_keeps_each_route_s_buckets() {
    let backend = http_backend("b").await;
    // Routes on the paths given, in that order, each with the same limit of one a minute.
    let config = |paths: &[&str]| {
        let mut text = String::from(
            "[[listeners]]\nname = \"l7\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"p\"\n",
        );
        for path in paths {
            text.push_str(&format!(
                "[[listeners.routes]]\nmatch = {{ path_prefix = \"{path}\" }}\npool = \"p\"\nrate_limit = {{ rate = 1, per = \"1m\" }}\n"
            ));
        }
        text.push_str(&format!("[pools.p]\nbackends = [\"{}\"]\n", backend.addr));
        text
    };
    let proxy = Proxy::start(&config(&["/a", "/b"]));
    let status = |path: &'static str| {
        let addr = proxy.addr("l7");
        async move { HttpClient::connect(addr).await.get(path, "").await.status }
    };
    assert_eq!(status("/a").await, 200);
    assert_eq!(status("/a").await, 429);
    // A route inserted before them takes neither's buckets: /a's stays empty, /b's full.
    proxy
        .reload(&config(&["/new", "/a", "/b"]))
        .await
        .expect("reload");
    assert_eq!(status("/a").await, 429);
    assert_eq!(status("/new").await, 200);
    assert_eq!(status("/b").await, 200);
    assert_eq!(status("/b").await, 429);
    // Nor does a new order hand one route's buckets to another: all three are spent.
    proxy
        .reload(&config(&["/b", "/a", "/other", "/new"]))
        .await
        .expect("reload");
    for path in ["/a", "/b", "/new"] {
        assert_eq!(status(path).await, 429, "{path}");
    }
    assert_eq!(status("/other").await, 200);
}

#[tokio::test]
async fn a_flood_of_distinct_keys_is_bounded_and_leaves_known_clients_their_buckets() {
    // The listener answers with a redirect of its own, checked after the limit: requests
    // served cost no backend.
    let proxy = Proxy::start(&single_pool(
        &[dead_addr().await],
        "rate_limit = { rate = 1, per = \"1m\", key = { header = \"X-Key\" } }\n\
         redirect = { to = \"https://{host}{path}\" }",
        "",
    ));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    assert_eq!(client.get("/", "X-Key: known\r\n").await.status, 301);
    // Pipelined in batches, so that a hundred thousand requests take little time.
    let total = 100_000usize;
    let batch = 500;
    let mut served = 0;
    for start in (0..total).step_by(batch) {
        let mut raw = String::new();
        for i in start..start + batch {
            raw.push_str(&format!("GET / HTTP/1.1\r\nHost: t\r\nX-Key: k{i}\r\n\r\n"));
        }
        client.send(raw.as_bytes()).await;
        for _ in 0..batch {
            if client.reply().await.expect("a reply").status == 301 {
                served += 1;
            }
        }
    }
    // Past the table's cap, new keys share a few buckets: most of the flood was refused.
    assert!(
        served <= switchyard::ratelimit::MAX_KEYS + 64,
        "{served} served"
    );
    assert!(
        served >= switchyard::ratelimit::MAX_KEYS / 2,
        "{served} served"
    );
    // The client known before the flood still has its own (empty) bucket.
    assert_eq!(client.get("/", "X-Key: known\r\n").await.status, 429);
}
