//! Layer 7 HTTP/1.1 through the real proxy and real backends on loopback.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The seed's routing table over named test backends.
async fn seed() -> (Proxy, Vec<Backend>) {
    let api = http_backend("api").await;
    let stat = http_backend("static").await;
    let admin = http_backend("admin").await;
    let v2 = http_backend("v2").await;
    let web = http_backend("web").await;
    let proxy = Proxy::start(&format!(
        r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "web"
trusted_proxies = ["10.0.0.0/8"]

  [[listeners.routes]]
  match = {{ path_prefix = "/api/" }}
  pool = "api"

  [[listeners.routes]]
  match = {{ path_prefix = "/static/" }}
  pool = "static"

  [[listeners.routes]]
  match = {{ host = "admin.*" }}
  pool = "admin"

  [[listeners.routes]]
  match = {{ header = {{ name = "X-API-Version", value = "v2" }} }}
  pool = "v2"

[pools.api]
backends = ["{}"]
[pools.static]
backends = ["{}"]
[pools.admin]
backends = ["{}"]
[pools.v2]
backends = ["{}"]
[pools.web]
backends = ["{}"]
"#,
        api.addr, stat.addr, admin.addr, v2.addr, web.addr
    ));
    (proxy, vec![api, stat, admin, v2, web])
}

#[tokio::test]
async fn requests_are_routed_by_path_host_and_header() {
    let (proxy, _backends) = seed().await;
    let mut client = HttpClient::connect(proxy.addr("public")).await;
    let cases = [
        ("/api/users", "", "api"),
        ("/static/app.css", "", "static"),
        ("/", "X-API-Version: v2\r\n", "v2"),
        ("/anything", "", "web"),
        ("/api", "", "web"),
    ];
    for (path, extra, expected) in cases {
        let reply = client.get(path, extra).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-backend"), Some(expected), "{path} {extra}");
    }
    // Host routing: case-insensitive, port ignored.
    client
        .send(b"GET / HTTP/1.1\r\nHost: ADMIN.example.com:8443\r\n\r\n")
        .await;
    let reply = client.reply().await.expect("reply");
    assert_eq!(reply.header("x-backend"), Some("admin"));
}

#[tokio::test]
async fn no_route_and_no_default_is_404() {
    let api = http_backend("api").await;
    let proxy = Proxy::start(&format!(
        r#"
[[listeners]]
name = "l7"
bind = "127.0.0.1:0"
protocol = "http"
routes = [{{ match = {{ path_prefix = "/api/" }}, pool = "api" }}]

[pools.api]
backends = ["{}"]
"#,
        api.addr
    ));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    let reply = client.get("/other", "").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.text(), "404 Not Found\n");
    // The connection stays usable.
    assert_eq!(client.get("/api/x", "").await.status, 200);
    assert_eq!(api.accepted(), 1);
}

/// A proxy in front of one backend, with the listener's `splice` set as given.
fn splicing(backend: std::net::SocketAddr, splice: bool, pool_extra: &str) -> Proxy {
    Proxy::start(&single_pool(
        &[backend],
        &format!("splice = {splice}"),
        pool_extra,
    ))
}

/// Body bytes the proxy's `l7` listener has spliced so far.
fn spliced(proxy: &Proxy) -> u64 {
    proxy
        .handle
        .metrics()
        .listener("l7")
        .spliced
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// HTTP/1.1 backend `b` behind listener `l7` (with `listener_extra` in its table, `pool_extra`
/// in its pool's), and a client of that listener: the start of most tests here.
async fn behind_l7(listener_extra: &str, pool_extra: &str) -> (Backend, Proxy, HttpClient) {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], listener_extra, pool_extra));
    let client = HttpClient::connect(proxy.addr("l7")).await;
    (backend, proxy, client)
}

#[tokio::test]
async fn backend_connections_are_pooled_across_clients() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
    for _ in 0..5 {
        let mut client = HttpClient::connect(proxy.addr("l7")).await;
        for _ in 0..4 {
            assert_eq!(client.get("/", "").await.status, 200);
        }
    }
    // 20 requests from 5 client connections, one after the other: one backend connection.
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn keepalive_connections_zero_opens_a_backend_connection_per_request() {
    let (backend, _proxy, mut client) = behind_l7("", "keepalive_connections = 0").await;
    for _ in 0..4 {
        assert_eq!(client.get("/", "").await.status, 200);
    }
    assert_eq!(backend.accepted(), 4);
}

#[tokio::test]
async fn an_idle_backend_connection_older_than_keepalive_timeout_is_not_reused() {
    let (backend, _proxy, mut client) = behind_l7("", "keepalive_timeout = \"50ms\"").await;
    assert_eq!(client.get("/", "").await.status, 200);
    assert_eq!(client.get("/", "").await.status, 200);
    assert_eq!(backend.accepted(), 1, "reused while fresh");
    // Idle past the pool's keep-alive timeout: the point of the test is the idle time. The
    // pool's clock is coarse (a few milliseconds), hence a wide margin.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(client.get("/", "").await.status, 200);
    assert_eq!(
        backend.accepted(),
        2,
        "a fresh connection after the timeout"
    );
}

#[tokio::test]
async fn forwarding_headers_and_hop_by_hop_fields() {
    let (_backend, _proxy, mut client) = behind_l7("", "").await;
    let reply = client
        .get(
            "/",
            "X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: 5\r\nTE: trailers\r\nProxy-Connection: x\r\nX-Kept: yes\r\n",
        )
        .await;
    let seen = reply.text();
    // Untrusted peer: its X-Forwarded-For is replaced, not extended.
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\n"), "{seen}");
    assert!(seen.contains("x-real-ip: 127.0.0.1\n"), "{seen}");
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(!seen.contains("6.6.6.6"), "{seen}");
    assert!(seen.contains("X-Kept: yes\n"), "{seen}");
    for hop in [
        "X-Secret",
        "Keep-Alive",
        "TE:",
        "Proxy-Connection",
        "Connection:",
    ] {
        assert!(
            !seen
                .to_ascii_lowercase()
                .contains(&hop.to_ascii_lowercase()),
            "{hop} passed: {seen}"
        );
    }
}

#[tokio::test]
async fn a_trusted_peer_extends_x_forwarded_for() {
    let (_backend, _proxy, mut client) = behind_l7("trusted_proxies = [\"127.0.0.0/8\"]", "").await;
    let seen = client
        .get("/", "X-Forwarded-For: 203.0.113.7\r\n")
        .await
        .text();
    assert!(
        seen.contains("x-forwarded-for: 203.0.113.7, 127.0.0.1\n"),
        "{seen}"
    );
}

#[tokio::test]
async fn request_bodies_arrive_intact_in_both_framings() {
    let (_backend, _proxy, mut client) = behind_l7("", "").await;
    let body = "x".repeat(100_000);
    client
        .send(
            format!(
                "POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await;
    let seen = client.reply().await.expect("reply").text();
    assert!(seen.ends_with(&format!("\n\n{body}")), "length body lost");
    client
        .send(b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
        .await;
    let seen = client.reply().await.expect("reply").text();
    assert!(seen.contains("transfer-encoding: chunked"), "{seen}");
    assert!(seen.ends_with("\n\nhello world"), "{seen}");
}

#[tokio::test]
async fn long_bodies_arrive_intact_spliced_or_copied() {
    // Long enough to be spliced both ways (request and echoed response), and bytes that vary,
    // so that a lost, repeated or reordered piece shows.
    let body: Vec<u8> = (0..1_000_003u32).map(|i| (i % 251) as u8).collect();
    for splice in [true, false] {
        let backend = http_backend("b").await;
        let proxy = splicing(backend.addr, splice, "");
        let mut client = HttpClient::connect(proxy.addr("l7")).await;
        for round in 0..2 {
            let mut request = format!(
                "POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            request.extend_from_slice(&body);
            client.send(&request).await;
            let reply = client.reply().await.expect("reply");
            assert_eq!(reply.status, 200, "splice = {splice}, round {round}");
            assert!(
                reply.body.ends_with(&body),
                "splice = {splice}, round {round}: body differs ({} bytes back)",
                reply.body.len()
            );
        }
        // Both exchanges used one backend connection: exactly the body was taken from it.
        assert_eq!(backend.accepted(), 1, "splice = {splice}");
        // And the kernel path was taken, both ways, only when asked for.
        let moved = spliced(&proxy);
        if splice {
            assert!(moved > 2 * 2 * 900_000, "only {moved} bytes spliced");
        } else {
            assert_eq!(moved, 0);
        }
    }
}

/// Answers `GET /N?head=H` with N body bytes (varying) and a header padded to H bytes, on a
/// keep-alive connection.
async fn sized_backend() -> Backend {
    Backend::start(|mut stream| async move {
        let mut buf = Vec::new();
        while let Some(end) = read_until(&mut stream, &mut buf, b"\r\n\r\n").await {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            let target = head.split(' ').nth(1).unwrap_or("/0").to_owned();
            let (size, pad) = target[1..]
                .split_once("?head=")
                .unwrap_or((&target[1..], "0"));
            let size: usize = size.parse().unwrap_or(0);
            let pad: usize = pad.parse().unwrap_or(0);
            let mut response = format!(
                "HTTP/1.1 200 OK\r\nx-pad: {}\r\ncontent-length: {size}\r\n\r\n",
                "p".repeat(pad)
            )
            .into_bytes();
            response.extend((0..size).map(|i| (i % 253) as u8));
            if stream.write_all(&response).await.is_err() {
                return;
            }
        }
    })
    .await
}

#[tokio::test]
async fn responses_of_every_size_follow_a_spliced_one_on_the_same_backend_connection() {
    // After a spliced body, the next head is read in a small piece: heads longer than that
    // piece, bodies too short to splice and bodies just long enough all come through intact.
    let backend = sized_backend().await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    let cases = [
        (100_000, 0),
        (100, 6000),
        (100_000, 0),
        (10_000, 0),
        (100_000, 0),
        (20_481, 9000),
        (20_480, 0),
        (0, 0),
        (65_536, 0),
    ];
    for (size, pad) in cases {
        let path = format!("/{size}?head={pad}");
        let reply = client.get(&path, "").await;
        assert_eq!(reply.status, 200, "{path}");
        assert_eq!(reply.header("x-pad").map(str::len), Some(pad), "{path}");
        let expected: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        assert!(reply.body == expected, "{path}: body differs");
    }
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn a_request_pipelined_behind_a_spliced_upload_is_answered() {
    // The upload is spliced to the backend: exactly its length must be taken from the client's
    // socket, leaving the next request there.
    let (_backend, proxy, mut client) = behind_l7("", "").await;
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    let mut both = format!(
        "POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    both.extend_from_slice(&body);
    both.extend_from_slice(b"GET /second HTTP/1.1\r\nHost: t\r\n\r\n");
    client.send(&both).await;
    let first = client.reply().await.expect("first reply");
    assert_eq!(first.status, 200);
    assert!(first.body.ends_with(&body), "upload differs");
    let second = client.reply().await.expect("second reply");
    assert_eq!(second.status, 200);
    assert!(
        second.text().contains("GET /second HTTP/1.1"),
        "{}",
        second.text()
    );
    assert!(spliced(&proxy) > 2 * 250_000);
}

#[tokio::test]
async fn a_client_that_stalls_mid_upload_is_cut_off_spliced_or_copied() {
    for splice in [true, false] {
        let (backend, mut events) = silent_backend().await;
        let proxy = splicing(backend.addr, splice, "response_timeout = \"300ms\"");
        let mut stream = tokio::net::TcpStream::connect(proxy.addr("l7"))
            .await
            .expect("connect");
        // A long upload that stops a tenth of the way, with the connection left open.
        stream
            .write_all(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n")
            .await
            .expect("head");
        stream.write_all(&[b'u'; 100_000]).await.expect("body");
        assert_eq!(
            tokio::time::timeout(PATIENCE, events.recv()).await,
            Ok(Some("request")),
            "splice = {splice}"
        );
        // The proxy gives up on the client, closes it, and lets go of the backend.
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest)).await;
        assert!(
            closed.is_ok(),
            "splice = {splice}: the client was never cut off"
        );
        assert_eq!(
            tokio::time::timeout(PATIENCE, events.recv()).await,
            Ok(Some("closed")),
            "splice = {splice}"
        );
    }
}

/// Answers every request with a chunked body: chunks of the sizes in the path
/// (`/chunks/100000,50000,7`), of varying bytes, on a keep-alive connection.
async fn chunked_backend() -> Backend {
    Backend::start(|mut stream| async move {
        let mut buf = Vec::new();
        while let Some(end) = read_until(&mut stream, &mut buf, b"\r\n\r\n").await {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            let target = head.split(' ').nth(1).unwrap_or("/chunks/1").to_owned();
            let sizes: Vec<usize> = target
                .trim_start_matches("/chunks/")
                .split(',')
                .filter_map(|n| n.parse().ok())
                .collect();
            let mut response = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            let mut i = 0usize;
            for size in sizes {
                response.extend_from_slice(format!("{size:x};ext=1\r\n").as_bytes());
                response.extend((0..size).map(|k| ((i + k) % 251) as u8));
                response.extend_from_slice(b"\r\n");
                i += size;
            }
            response.extend_from_slice(b"0\r\n\r\n");
            // In uneven pieces, so that size lines and data arrive split at any point.
            let _ = stream.set_nodelay(true);
            for piece in response.chunks(6_007) {
                if stream.write_all(piece).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        }
    })
    .await
}

#[tokio::test]
async fn long_chunks_are_spliced_under_chunk_lines_of_our_own() {
    for splice in [true, false] {
        let backend = chunked_backend().await;
        let proxy = splicing(backend.addr, splice, "");
        let mut client = HttpClient::connect(proxy.addr("l7")).await;
        for sizes in [
            vec![100_000, 50_000, 7],
            vec![5, 300_000],
            vec![16_384, 16_385, 1],
            vec![3],
            vec![6_000, 40_000, 6_007, 70_000, 12_014, 1, 1],
        ] {
            let list: Vec<String> = sizes.iter().map(ToString::to_string).collect();
            let path = format!("/chunks/{}", list.join(","));
            let reply = client.get(&path, "").await;
            assert_eq!(reply.status, 200, "{path}");
            assert_eq!(reply.header("transfer-encoding"), Some("chunked"));
            let total: usize = sizes.iter().sum();
            let expected: Vec<u8> = (0..total).map(|k| (k % 251) as u8).collect();
            assert!(
                reply.body == expected,
                "splice = {splice}, {path}: body differs"
            );
        }
        let moved = spliced(&proxy);
        assert_eq!(moved > 300_000, splice, "{moved} bytes spliced");
        // An HTTP/1.0 client gets the bytes as they are, delimited by the close.
        let mut stream = tokio::net::TcpStream::connect(proxy.addr("l7"))
            .await
            .expect("connect");
        stream
            .write_all(b"GET /chunks/200000,1 HTTP/1.0\r\nHost: t\r\n\r\n")
            .await
            .expect("send");
        let mut got = Vec::new();
        tokio::time::timeout(PATIENCE, stream.read_to_end(&mut got))
            .await
            .expect("closed in time")
            .expect("read");
        let body_at = got
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| i + 4)
            .expect("a head");
        let expected: Vec<u8> = (0..200_001usize).map(|k| (k % 251) as u8).collect();
        assert!(
            got[body_at..] == expected[..],
            "splice = {splice}: HTTP/1.0 body differs"
        );
        // A chunked upload with a long chunk and trailers reaches the backend intact.
        let echo = http_backend("e").await;
        let proxy = splicing(echo.addr, splice, "");
        let mut client = HttpClient::connect(proxy.addr("l7")).await;
        let big: Vec<u8> = (0..200_000u32).map(|k| (k % 239) as u8).collect();
        let mut upload =
            b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        upload.extend_from_slice(format!("{:x}\r\n", big.len()).as_bytes());
        upload.extend_from_slice(&big);
        upload.extend_from_slice(b"\r\n2\r\nok\r\n0\r\nx-sum: 1\r\n\r\n");
        client.send(&upload).await;
        let reply = client.reply().await.expect("reply");
        let mut expected = big.clone();
        expected.extend_from_slice(b"ok");
        assert!(
            reply.body.ends_with(&expected),
            "splice = {splice}: upload differs"
        );
        let moved = spliced(&proxy);
        if splice {
            assert!(moved >= 150_000, "only {moved} bytes spliced");
        } else {
            assert_eq!(moved, 0);
        }
    }
}

#[tokio::test]
async fn a_response_cut_short_closes_the_client_connection() {
    let backend = Backend::start(|mut stream| async move {
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf).await;
        let head = "HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n";
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(&vec![b'y'; 100_000]).await;
        // Then the backend goes away, 948,576 bytes short.
    })
    .await;
    for splice in [true, false] {
        let proxy = splicing(backend.addr, splice, "");
        let mut stream = tokio::net::TcpStream::connect(proxy.addr("l7"))
            .await
            .expect("connect");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("send");
        // The client gets what there was, then the connection ends rather than hangs.
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got))
            .await
            .expect("the connection was closed");
        assert!(read.is_ok(), "splice = {splice}: {read:?}");
        assert!(got.starts_with(b"HTTP/1.1 200"), "splice = {splice}");
        let body_at = got
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| i + 4)
            .expect("a head");
        assert_eq!(got.len() - body_at, 100_000, "splice = {splice}");
        assert!(
            got[body_at..].iter().all(|&b| b == b'y'),
            "splice = {splice}"
        );
    }
}

#[tokio::test]
async fn a_body_until_close_is_rechunked_for_http11_clients() {
    let backend = Backend::start(|mut stream| async move {
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nstreamed until close")
            .await;
    })
    .await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    let reply = client.get("/", "").await;
    assert_eq!(reply.header("transfer-encoding"), Some("chunked"));
    assert_eq!(reply.text(), "streamed until close");
    // The client connection survives the backend's close.
    let reply = client.get("/", "").await;
    assert_eq!(reply.text(), "streamed until close");
}

#[tokio::test]
async fn smuggling_attempts_get_400_and_never_reach_the_backend() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
    let cases: &[&[u8]] = &[
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nX: y\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX\x7fY: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GARBAGE\r\n\r\n",
    ];
    for raw in cases {
        let mut client = HttpClient::connect(proxy.addr("l7")).await;
        client.send(raw).await;
        let reply = client.reply().await;
        let status = reply.as_ref().map(|r| r.status);
        assert!(
            matches!(status, Some(400 | 501)),
            "{:?} got {status:?}",
            String::from_utf8_lossy(raw)
        );
        assert!(
            client.closed().await,
            "connection left open after {:?}",
            String::from_utf8_lossy(raw)
        );
    }
    // A chunked body with an invalid chunk size: the head is fine, the body is not. The backend
    // may see the head, but no request is completed and the client connection is closed.
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    client
        .send(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
        .await;
    assert!(client.closed().await);
    assert!(backend.accepted() <= 1);
}

#[tokio::test]
async fn a_host_that_is_not_an_authority_gets_400_and_an_absolute_target_keeps_its_query() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
    for host in ["a b", "a, b", "a/b", "evil@a", "a:8x"] {
        let mut client = HttpClient::connect(proxy.addr("l7")).await;
        let raw = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        client.send(raw.as_bytes()).await;
        let status = client.reply().await.map(|r| r.status);
        assert_eq!(status, Some(400), "Host {host:?}");
        assert!(client.closed().await, "Host {host:?}");
    }
    assert_eq!(backend.accepted(), 0);

    // The authority of an absolute-form target ends at `?` as well as at `/`; the scheme may be
    // in any case.
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    client
        .send(b"GET http://example.com:8080?q=1 HTTP/1.1\r\nHost: other\r\n\r\n")
        .await;
    let reply = client.reply().await.expect("reply");
    assert!(
        reply
            .text()
            .starts_with("b\nGET /?q=1 HTTP/1.1\nhost: example.com:8080\n"),
        "{}",
        reply.text()
    );
    client
        .send(b"GET HTTP://example.com/x HTTP/1.1\r\nHost: other\r\n\r\n")
        .await;
    let reply = client.reply().await.expect("reply");
    assert!(
        reply
            .text()
            .starts_with("b\nGET /x HTTP/1.1\nhost: example.com\n"),
        "{}",
        reply.text()
    );
}

#[tokio::test]
async fn oversized_requests_get_414_and_431() {
    let (backend, proxy, mut client) = behind_l7("", "").await;
    let long_path = format!("/{}", "a".repeat(20_000));
    client
        .send(format!("GET {long_path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
        .await;
    assert_eq!(client.reply().await.map(|r| r.status), Some(414));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    let many: String = (0..200).map(|i| format!("X-{i}: v\r\n")).collect();
    client
        .send(format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes())
        .await;
    assert_eq!(client.reply().await.map(|r| r.status), Some(431));
    assert_eq!(backend.accepted(), 0);
}

#[tokio::test]
async fn dead_backends_give_502_and_silent_ones_504() {
    let dead = dead_addr().await;
    let silent = Backend::start(|stream| async move {
        tokio::time::sleep(PATIENCE).await;
        drop(stream);
    })
    .await;
    let proxy = Proxy::start(&single_pool(&[dead], "", ""));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    assert_eq!(client.get("/", "").await.status, 502);

    let proxy = Proxy::start(&single_pool(
        &[silent.addr],
        "",
        "response_timeout = \"200ms\"",
    ));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    assert_eq!(client.get("/", "").await.status, 504);
}

#[tokio::test]
async fn an_idempotent_request_is_retried_on_another_backend_after_a_reset() {
    let reset = Backend::start(|mut stream| async move {
        let mut buf = [0u8; 1024];
        let _ = stream.read(&mut buf).await;
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        drop(stream);
    })
    .await;
    let good = http_backend("good").await;
    let proxy = Proxy::start(&single_pool(&[reset.addr, good.addr], "", ""));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    for _ in 0..4 {
        let reply = client.get("/", "").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-backend"), Some("good"));
    }
    assert!(reset.accepted() >= 1);
    // A POST is not repeated: it gets a 502 when it lands on the resetting backend.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let mut client = HttpClient::connect(proxy.addr("l7")).await;
        client
            .send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
            .await;
        statuses.push(client.reply().await.map(|r| r.status));
    }
    assert!(statuses.contains(&Some(502)), "{statuses:?}");
}

#[tokio::test]
async fn a_slowloris_client_is_cut_off_while_others_are_served() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        "client_header_timeout = \"300ms\"",
        "",
    ));
    let mut slow = tokio::net::TcpStream::connect(proxy.addr("l7"))
        .await
        .expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        .await
        .expect("write");
    let mut normal = HttpClient::connect(proxy.addr("l7")).await;
    assert_eq!(normal.get("/", "").await.status, 200);
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, slow.read_to_end(&mut response))
        .await
        .expect("cut off in time")
        .expect("read");
    assert!(
        response.starts_with(b"HTTP/1.1 408 "),
        "{:?}",
        String::from_utf8_lossy(&response)
    );
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (_backend, _proxy, mut client) = behind_l7("", "").await;
    client
        .send(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nGET /two HTTP/1.1\r\nHost: a\r\n\r\nGET /three HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await;
    for path in ["/one", "/two", "/three"] {
        let reply = client.reply().await.expect("reply");
        assert!(
            reply.text().contains(&format!("GET {path} HTTP/1.1")),
            "{}",
            reply.text()
        );
    }
    assert!(client.closed().await);
}

/// The last response on a connection goes out with its FIN; bytes the client sent after asking
/// to close (unread when the connection ends, so its close is a reset) must not cost it that
/// response.
#[tokio::test]
async fn the_last_response_reaches_a_client_that_kept_sending() {
    let arrived = Arc::new(tokio::sync::Notify::new());
    let answer = Arc::new(tokio::sync::Notify::new());
    let (on_arrival, on_answer) = (Arc::clone(&arrived), Arc::clone(&answer));
    let backend = Backend::start(move |mut stream| {
        let (arrived, answer) = (Arc::clone(&on_arrival), Arc::clone(&on_answer));
        async move {
            let mut buf = Vec::new();
            while let Some(end) = read_until(&mut stream, &mut buf, b"\r\n\r\n").await {
                buf.drain(..end + 4);
                arrived.notify_one();
                answer.notified().await;
                let body = vec![b'z'; 3000];
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                if stream
                    .write_all(&[head.as_bytes(), &body].concat())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    })
    .await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
    for (asked, version) in [("Connection: close\r\n", "1.1"), ("", "1.0")] {
        let mut stream = tokio::net::TcpStream::connect(proxy.addr("l7"))
            .await
            .expect("connect");
        stream
            .write_all(format!("GET / HTTP/{version}\r\nHost: t\r\n{asked}\r\n").as_bytes())
            .await
            .expect("send");
        // Once the request is at the backend, the client sends more, which the proxy never
        // reads: it is still in the socket when the connection ends.
        arrived.notified().await;
        stream
            .write_all(b"GET /more HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("send more");
        answer.notify_one();
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
                .await
                .expect("the connection ended")
            {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "HTTP/{version}: {text:?}");
        if version == "1.1" {
            assert!(text.contains("connection: close"), "{text:?}");
        }
        assert!(
            got.ends_with(&[b'z'; 3000]),
            "HTTP/{version}: {} bytes: {text:?}",
            got.len()
        );
    }
}

#[tokio::test]
async fn head_requests_and_http10_clients() {
    let (_backend, proxy, mut client) = behind_l7("", "").await;
    client.send(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    // No body follows a HEAD response; the next request on the connection works.
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = client.stream.read(&mut buf).await.expect("read");
        assert!(n > 0);
        raw.extend_from_slice(&buf[..n]);
    }
    assert!(
        raw.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    assert!(raw.ends_with(b"\r\n\r\n"), "a HEAD response carried a body");
    assert_eq!(client.get("/", "").await.status, 200);

    // HTTP/1.0 without keep-alive: one response, then close.
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    client.send(b"GET / HTTP/1.0\r\n\r\n").await;
    let reply = client.reply().await.expect("reply");
    assert_eq!(reply.status, 200);
    assert!(client.closed().await);
}

/// A backend that answers every bodiless request on a connection with `response`, as is.
async fn canned_backend(response: &'static [u8]) -> Backend {
    Backend::start(move |mut stream| async move {
        let mut buf = Vec::new();
        while let Some(end) = read_until(&mut stream, &mut buf, b"\r\n\r\n").await {
            buf.drain(..end + 4);
            if stream.write_all(response).await.is_err() {
                return;
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_204_never_carries_a_content_length_and_a_304_keeps_its_own() {
    let no_content = canned_backend(b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n").await;
    let proxy = Proxy::start(&single_pool(&[no_content.addr], "", ""));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    let head = client.head_of(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(head.starts_with("http/1.1 204"), "{head}");
    // RFC 9110 section 8.6: never in a 204, whatever the backend wrote.
    assert!(!head.contains("content-length"), "{head}");
    let head = client.head_of(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(head.starts_with("http/1.1 204"), "{head}");

    // A 304's Content-Length describes the representation, and it has no body either.
    let not_modified =
        canned_backend(b"HTTP/1.1 304 Not Modified\r\ncontent-length: 50\r\n\r\n").await;
    let proxy = Proxy::start(&single_pool(&[not_modified.addr], "", ""));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    for _ in 0..2 {
        let head = client.head_of(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(head.starts_with("http/1.1 304"), "{head}");
        assert!(head.contains("content-length: 50"), "{head}");
    }
}

#[tokio::test]
async fn an_http10_request_without_host_reaches_the_backend_with_an_empty_host() {
    let (_backend, _proxy, mut client) = behind_l7("", "").await;
    client.send(b"GET /x HTTP/1.0\r\n\r\n").await;
    let reply = client.reply().await.expect("reply");
    // What goes upstream is HTTP/1.1, which must have a Host (RFC 9112 section 3.2): empty,
    // for a target without an authority.
    assert!(
        reply.text().starts_with("b\nGET /x HTTP/1.1\nhost: \n"),
        "{}",
        reply.text()
    );
}

#[tokio::test]
async fn an_http10_client_that_asked_for_keep_alive_is_told_it_is_kept() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&format!(
        "[[listeners]]\nname = \"l7\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\nroutes = [{{ match = {{ path_prefix = \"/api/\" }}, pool = \"p\" }}]\n[pools.p]\nbackends = [\"{}\"]\n",
        backend.addr
    ));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    // An HTTP/1.0 client takes a response without `Connection: keep-alive` as the last one on
    // its connection (RFC 9112 section 9.3), and would wait for a close that never comes.
    for (path, status) in [("/api/x", 200), ("/other", 404), ("/api/y", 200)] {
        client
            .send(format!("GET {path} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").as_bytes())
            .await;
        let reply = client.reply().await.expect("reply");
        assert_eq!(reply.status, status, "{path}");
        assert_eq!(reply.header("connection"), Some("keep-alive"), "{path}");
    }
    // Without keep-alive, the connection closes after the response, which says so.
    client.send(b"GET /api/z HTTP/1.0\r\n\r\n").await;
    let reply = client.reply().await.expect("reply");
    assert_eq!(reply.header("connection"), Some("close"));
    assert!(client.closed().await);
    // HTTP/1.1 clients keep their connection without being told.
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    let reply = client.get("/api/x", "").await;
    assert_eq!(reply.header("connection"), None);
}

#[tokio::test]
async fn early_hints_reach_http11_clients_before_the_response() {
    let backend = canned_backend(
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    )
    .await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    for _ in 0..2 {
        // A proxy forwards the 1xx responses it did not ask for (RFC 9110 section 15.2); the
        // backend's 100 is not one of them, the proxy having dropped the client's expectation.
        let head = client.head_of(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(head.starts_with("http/1.1 103 early hints"), "{head}");
        assert!(head.contains("link: </s.css>; rel=preload"), "{head}");
        let reply = client.reply().await.expect("the final response");
        assert_eq!((reply.status, reply.text().as_str()), (200, "ok"));
    }
    // Never to an HTTP/1.0 client, which would take it for the final response.
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    client.send(b"GET / HTTP/1.0\r\n\r\n").await;
    let reply = client.reply().await.expect("reply");
    assert_eq!((reply.status, reply.text().as_str()), (200, "ok"));
}

/// A status line without a reason phrase (`HTTP/1.1 200`, which RFC 9112 allows), or with one
/// that is not ASCII, is passed on with an empty phrase, connection after connection.
#[tokio::test]
async fn status_lines_without_a_readable_reason_phrase_pass() {
    for canned in [
        &b"HTTP/1.1 200\r\ncontent-length: 2\r\n\r\nok"[..],
        b"HTTP/1.1 200 \xc3\xa9t\xc3\xa9\r\ncontent-length: 2\r\n\r\nok",
    ] {
        let backend = canned_backend(canned).await;
        let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
        let mut client = HttpClient::connect(proxy.addr("l7")).await;
        for _ in 0..2 {
            let reply = client.get("/", "").await;
            assert_eq!((reply.status, reply.text().as_str()), (200, "ok"));
        }
    }
}

#[tokio::test]
async fn every_match_type_and_weighted_splits() {
    let names = [
        "exact",
        "regex",
        "method",
        "query",
        "cookie",
        "hdr-regex",
        "hdr-present",
        "v1",
        "v2",
        "web",
    ];
    let mut backends = Vec::new();
    for name in names {
        backends.push(http_backend(name).await);
    }
    let addr = |name: &str| backends[names.iter().position(|n| *n == name).expect("known")].addr;
    let pools: String = names
        .iter()
        .map(|n| format!("[pools.{n}]\nbackends = [\"{}\"]\n", addr(n)))
        .collect();
    let proxy = Proxy::start(&format!(
        r#"
[[listeners]]
name = "l7"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "web"
routes = [
  {{ match = {{ path = "/exact" }}, pool = "exact" }},
  {{ match = {{ path_regex = "^/items/[0-9]+$" }}, pool = "regex" }},
  {{ match = {{ method = ["DELETE", "PATCH"] }}, pool = "method" }},
  {{ match = {{ query = {{ name = "mode", value = "beta test" }} }}, pool = "query" }},
  {{ match = {{ cookie = {{ name = "canary", value = "yes" }} }}, pool = "cookie" }},
  {{ match = {{ header = {{ name = "User-Agent", regex = "(?i)^curl/" }} }}, pool = "hdr-regex" }},
  {{ match = {{ header = {{ name = "X-Debug", present = true }} }}, pool = "hdr-present" }},
  {{ match = {{ path_prefix = "/split/" }}, pools = [{{ pool = "v1", weight = 3 }}, {{ pool = "v2", weight = 1 }}] }},
]

{pools}
"#
    ));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    let cases = [
        ("GET", "/exact", "", "exact"),
        ("GET", "/exact/not", "", "web"),
        ("GET", "/items/42", "", "regex"),
        ("GET", "/items/42x", "", "web"),
        ("DELETE", "/x", "", "method"),
        ("GET", "/x?a=1&mode=beta%20test", "", "query"),
        ("GET", "/x?mode=beta", "", "web"),
        ("GET", "/x", "Cookie: a=b; canary=yes\r\n", "cookie"),
        ("GET", "/x", "User-Agent: CURL/8.0\r\n", "hdr-regex"),
        ("GET", "/x", "X-Debug: \r\n", "hdr-present"),
    ];
    for (method, path, extra, expected) in cases {
        client
            .send(format!("{method} {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n").as_bytes())
            .await;
        let reply = client.reply().await.expect("reply");
        assert_eq!(
            reply.header("x-backend"),
            Some(expected),
            "{method} {path} {extra}"
        );
    }
    let mut v1 = 0;
    for _ in 0..400 {
        match client.get("/split/x", "").await.header("x-backend") {
            Some("v1") => v1 += 1,
            Some("v2") => {}
            other => panic!("split went to {other:?}"),
        }
    }
    // Expected 300 of 400; 5 standard deviations is about 43.
    assert!((257..=343).contains(&v1), "{v1}");
}

#[tokio::test]
async fn request_ids_are_kept_or_generated_and_returned() {
    let (_backend, _proxy, mut client) = behind_l7("", "").await;
    let reply = client.get("/", "X-Request-ID: abc-123\r\n").await;
    assert_eq!(reply.header("x-request-id"), Some("abc-123"));
    assert!(reply.text().contains("x-request-id: abc-123\n"));
    let reply = client.get("/", "").await;
    let id = reply.header("x-request-id").expect("generated").to_owned();
    assert_eq!(id.len(), 32);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(reply.text().contains(&format!("x-request-id: {id}\n")));
    // An id with a control byte or space is replaced.
    let reply = client.get("/", "X-Request-ID: a b\r\n").await;
    assert_ne!(reply.header("x-request-id"), Some("a b"));
}

#[tokio::test]
async fn bodies_over_max_body_size_get_413() {
    let (backend, proxy, mut client) = behind_l7("max_body_size = \"1k\"", "").await;
    client
        .send(
            format!(
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2000\r\n\r\n{}",
                "x".repeat(2000)
            )
            .as_bytes(),
        )
        .await;
    assert_eq!(client.reply().await.map(|r| r.status), Some(413));
    assert_eq!(backend.accepted(), 0);
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    client
        .send(format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n{}\r\n0\r\n\r\n", "x".repeat(2048)).as_bytes())
        .await;
    assert_eq!(client.reply().await.map(|r| r.status), Some(413));
    // Within the limit all is well.
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    client
        .send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
        .await;
    assert_eq!(client.reply().await.map(|r| r.status), Some(200));
}

#[tokio::test]
async fn websocket_upgrades_are_tunnelled_both_ways() {
    // A backend that accepts the upgrade, then echoes bytes (a stand-in for WebSocket frames).
    let backend = Backend::start(|mut stream| async move {
        let mut buf = Vec::new();
        if read_until(&mut stream, &mut buf, b"\r\n\r\n").await.is_none() {
            return;
        }
        let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
        if !(head.contains("upgrade: websocket") && head.contains("connection: upgrade")) {
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
            return;
        }
        let _ = stream
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n")
            .await;
        let (mut r, mut w) = stream.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    client
        .send(b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        client.stream.read_exact(&mut byte).await.expect("101 head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("upgrade: websocket") && head.contains("sec-websocket-accept: x"),
        "{head}"
    );
    for message in [
        &b"frame one"[..],
        &[0x81, 0x05, b'h', b'e', b'l', b'l', b'o'][..],
    ] {
        client.stream.write_all(message).await.expect("write");
        let mut back = vec![0u8; message.len()];
        client.stream.read_exact(&mut back).await.expect("echo");
        assert_eq!(back, message);
    }
}

/// A backend that answers an upload early (a 413, say) and stops reading: the client gets that
/// answer, as it would without a proxy, not a 502.
#[tokio::test]
async fn an_early_answer_to_an_upload_reaches_the_client() {
    let backend = early_413_backend().await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
    let text = http11_upload_answer(proxy.addr("l7"), "/upload", "too big!").await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("connection: close\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\ntoo big!"), "{text}");
}

/// An upgraded connection whose backend fails ends for the client with a reset, as a tcp
/// listener's does: a FIN would pass for an orderly end of the stream.
#[tokio::test]
async fn an_upgraded_connection_whose_backend_fails_ends_with_a_reset() {
    let backend = Backend::start(|mut stream| async move {
        let mut buf = Vec::new();
        if read_until(&mut stream, &mut buf, b"\r\n\r\n").await.is_none() {
            return;
        }
        let _ = stream
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\npartial")
            .await;
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    })
    .await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
    let mut stream = tokio::net::TcpStream::connect(proxy.addr("l7"))
        .await
        .expect("connect");
    stream
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .expect("send");
    let mut got = Vec::new();
    let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut got))
        .await
        .expect("ended in time");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(text.ends_with("\r\n\r\npartial"), "{text}");
    assert_eq!(
        read.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionReset),
        "{text}"
    );
}

/// A backend that answers with two Set-Cookie fields, a Server field and a header it was asked
/// for, plus the usual report of what it received.
async fn cookie_backend() -> Backend {
    Backend::start(|mut stream| async move {
        let mut buf = Vec::new();
        loop {
            let Some(head_end) = read_until(&mut stream, &mut buf, b"\r\n\r\n").await else {
                return;
            };
            let end = head_end + 4;
            let head: Vec<u8> = buf.drain(..end).collect();
            let body = String::from_utf8_lossy(&head).replace("\r\n", "\n");
            let response = format!(
                "HTTP/1.1 200 OK\r\nServer: secret/1.0\r\nX-Powered-By: php\r\nSet-Cookie: a=1; Path=/\r\nSet-Cookie: b=2; Secure; SameSite=Strict\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if stream.write_all(response.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await
}

#[tokio::test]
async fn header_rules_rewrites_and_cookie_flags() {
    let backend = cookie_backend().await;
    let proxy = Proxy::start(&format!(
        r#"
[[listeners]]
name = "l7"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "p"
request_headers = {{ add = {{ X-Edge = "switchyard" }}, remove = ["X-Internal"] }}
response_headers = {{ set = {{ Strict-Transport-Security = "max-age=63072000", X-Content-Type-Options = "nosniff" }}, remove = ["Server"] }}

  [[listeners.routes]]
  match = {{ path_prefix = "/api/" }}
  pool = "p"
  rewrite = {{ strip_prefix = "/api", add_prefix = "/v1" }}
  host_rewrite = "internal.local"
  request_headers = {{ set = {{ X-Edge = "api" }} }}
  response_headers = {{ remove = ["X-Powered-By"] }}
  cookie_flags = ["Secure", "HttpOnly", "SameSite=Lax"]

  [[listeners.routes]]
  match = {{ path_prefix = "/old/" }}
  pool = "p"
  rewrite = {{ regex = "^/old/([a-z]+)/([0-9]+)$", replace = "/new/$2/$1" }}

[pools.p]
backends = ["{}"]
"#,
        backend.addr
    ));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;

    let reply = client.get("/plain?x=1", "X-Internal: secret\r\n").await;
    let seen = reply.text();
    assert!(seen.starts_with("GET /plain?x=1 HTTP/1.1\n"), "{seen}");
    assert!(seen.contains("X-Edge: switchyard\n"), "{seen}");
    assert!(!seen.contains("X-Internal"), "{seen}");
    assert_eq!(
        reply.header("strict-transport-security"),
        Some("max-age=63072000")
    );
    assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(reply.header("server"), None);
    assert_eq!(reply.header("x-powered-by"), Some("php"));
    assert_eq!(reply.header("set-cookie"), Some("a=1; Path=/"));

    let reply = client.get("/api/users?page=2", "").await;
    let seen = reply.text();
    assert!(
        seen.starts_with("GET /v1/users?page=2 HTTP/1.1\n"),
        "{seen}"
    );
    assert!(seen.contains("host: internal.local\n"), "{seen}");
    assert!(
        seen.contains("X-Edge: api\n") && !seen.contains("switchyard"),
        "{seen}"
    );
    assert_eq!(reply.header("x-powered-by"), None);
    let cookies: Vec<&str> = reply
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("set-cookie"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(
        cookies,
        [
            "a=1; Path=/; Secure; HttpOnly; SameSite=Lax",
            "b=2; Secure; SameSite=Strict; HttpOnly"
        ]
    );

    let seen = client.get("/old/shoes/42", "").await.text();
    assert!(seen.starts_with("GET /new/42/shoes HTTP/1.1\n"), "{seen}");
}

#[tokio::test]
async fn redirects_from_a_listener_and_from_a_route() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&format!(
        r#"
[[listeners]]
name = "plain"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "p"
redirect = {{ to = "https://{{host}}{{path}}", status = 308 }}
response_headers = {{ set = {{ Strict-Transport-Security = "max-age=63072000" }} }}

[[listeners]]
name = "app"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "p"
routes = [{{ match = {{ path = "/old" }}, redirect = {{ to = "/new", status = 302 }} }}]

[pools.p]
backends = ["{}"]
"#,
        backend.addr
    ));
    let mut client = HttpClient::connect(proxy.addr("plain")).await;
    client
        .send(b"GET /a/b?c=d HTTP/1.1\r\nHost: Example.com:80\r\n\r\n")
        .await;
    let reply = client.reply().await.expect("reply");
    assert_eq!(reply.status, 308);
    assert_eq!(
        reply.header("location"),
        Some("https://Example.com/a/b?c=d")
    );
    assert_eq!(
        reply.header("strict-transport-security"),
        Some("max-age=63072000")
    );
    let mut client = HttpClient::connect(proxy.addr("app")).await;
    let reply = client.get("/old", "").await;
    assert_eq!(
        (reply.status, reply.header("location")),
        (302, Some("/new"))
    );
    assert_eq!(client.get("/other", "").await.status, 200);
    assert_eq!(backend.accepted(), 1);
}

/// The Set-Cookie values of an HTTP/1.1 reply, in order.
fn set_cookies(reply: &Reply) -> Vec<String> {
    reply
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("set-cookie"))
        .map(|(_, v)| v.clone())
        .collect()
}

/// The Set-Cookie values of an HTTP/2 response, in order.
fn h2_set_cookies(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap_or("?").to_owned())
        .collect()
}

#[tokio::test]
async fn a_routes_cookie_flags_override_the_listeners_and_reach_every_set_cookie() {
    let backend = cookie_backend().await;
    let h2 = h2_echo_backend().await;
    let proxy = Proxy::start(&format!(
        r#"
[[listeners]]
name = "l7"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "p"
cookie_flags = ["Secure", "SameSite=Lax"]

  [[listeners.routes]]
  match = {{ path_prefix = "/strict/" }}
  pool = "p"
  cookie_flags = ["secure", "SameSite=Strict", "HttpOnly"]

  [[listeners.routes]]
  match = {{ path_prefix = "/grpc/" }}
  pool = "g"

[pools.p]
backends = ["{}"]
sticky = {{ cookie = "SWY" }}

[pools.g]
backends = ["{}"]
upstream_protocol = "h2"
sticky = {{ cookie = "SWY" }}
"#,
        backend.addr, h2.addr
    ));
    // Each attribute once, the route's SameSite in place of the listener's, and the proxy's own
    // sticky cookie flagged like the backend's (it keeps its own SameSite).
    let listener = |sticky: &str| {
        vec![
            "a=1; Path=/; Secure; SameSite=Lax".to_owned(),
            "b=2; Secure; SameSite=Strict".to_owned(),
            format!("{sticky}; Secure"),
        ]
    };
    let route = |sticky: &str| {
        vec![
            "a=1; Path=/; secure; SameSite=Strict; HttpOnly".to_owned(),
            "b=2; Secure; SameSite=Strict; HttpOnly".to_owned(),
            format!("{sticky}; secure"),
        ]
    };
    let sticky_of = |cookies: &[String]| {
        let last = cookies.last().cloned().unwrap_or_default();
        assert!(last.starts_with("SWY="), "{cookies:?}");
        assert!(
            last.contains("; HttpOnly; SameSite=Lax"),
            "the sticky cookie keeps its own attributes: {cookies:?}"
        );
        last.split("; Secure")
            .next()
            .and_then(|c| c.split("; secure").next())
            .unwrap_or_default()
            .to_owned()
    };
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    let cookies = set_cookies(&client.get("/other", "").await);
    assert_eq!(cookies, listener(&sticky_of(&cookies)));
    let cookies = set_cookies(&client.get("/strict/x", "").await);
    assert_eq!(cookies, route(&sticky_of(&cookies)));
    // From an HTTP/2 backend, which sets no cookie of its own.
    let cookies = set_cookies(&client.get("/grpc/x", "").await);
    assert_eq!(cookies, [format!("{}; Secure", sticky_of(&cookies))]);

    let mut sender = h2_connect(proxy.addr("l7")).await;
    let (_, headers, _) = h2_request(&mut sender, "GET", "http://x/other", None).await;
    let cookies = h2_set_cookies(&headers);
    assert_eq!(cookies, listener(&sticky_of(&cookies)));
    let (_, headers, _) = h2_request(&mut sender, "GET", "http://x/strict/x", None).await;
    let cookies = h2_set_cookies(&headers);
    assert_eq!(cookies, route(&sticky_of(&cookies)));
}

#[tokio::test]
async fn a_cookie_match_reads_every_cookie_field_of_an_http2_request() {
    let web = http_backend("web").await;
    let canary = http_backend("canary").await;
    let proxy = Proxy::start(&format!(
        r#"
[[listeners]]
name = "l7"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "web"
routes = [{{ match = {{ cookie = {{ name = "canary", value = "yes" }} }}, pool = "canary" }}]

[pools.web]
backends = ["{}"]

[pools.canary]
backends = ["{}"]
"#,
        web.addr, canary.addr
    ));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    let reply = client.get("/", "Cookie: a=1; canary=yes\r\n").await;
    assert_eq!(reply.header("x-backend"), Some("canary"));

    // Browsers speaking HTTP/2 send each cookie in a field of its own (RFC 9113 section 8.2.3).
    let mut sender = h2_connect(proxy.addr("l7")).await;
    for (fields, expected) in [
        (&["a=1", "canary=yes"][..], "canary"),
        (&["canary=yes; a=1"][..], "canary"),
        (&["a=1", "canary=no"][..], "web"),
    ] {
        let mut request = http::Request::builder().uri("http://x/");
        for field in fields {
            request = request.header("cookie", *field);
        }
        let response = h2_head(&mut sender, request.body(()).expect("request")).await;
        assert_eq!(
            response.headers().get("x-backend").map(|v| v.as_bytes()),
            Some(expected.as_bytes()),
            "{fields:?}"
        );
    }
}

/// An HTTP/2 backend (h2c) that answers every request with what it received: `METHOD URI`,
/// then each field as `name: value`, one a line.
async fn h2_echo_backend() -> Backend {
    Backend::start(|stream| async move {
        let Ok(mut connection) = h2::server::handshake(stream).await else {
            return;
        };
        while let Some(Ok((request, mut respond))) = connection.accept().await {
            let mut seen = format!("{} {}\n", request.method(), request.uri());
            for (name, value) in request.headers() {
                seen.push_str(&format!(
                    "{name}: {}\n",
                    String::from_utf8_lossy(value.as_bytes())
                ));
            }
            let response = h2_ok();
            if let Ok(mut send) = respond.send_response(response, false) {
                let _ = send.send_data(bytes::Bytes::from(seen), true);
            }
        }
    })
    .await
}

/// The config of listener `l7`, with `listener_extra` in its table, whose requests for `/grpc/`
/// go to the HTTP/2 backend `h2` and the others to the HTTP/1.1 backend `h1`: both paths a
/// request can take to a backend.
fn h1_and_h2_paths(
    h1: std::net::SocketAddr,
    h2: std::net::SocketAddr,
    listener_extra: &str,
) -> String {
    format!(
        r#"
[[listeners]]
name = "l7"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "h1"
{listener_extra}
routes = [{{ match = {{ path_prefix = "/grpc/" }}, pool = "h2" }}]

[pools.h1]
backends = ["{h1}"]

[pools.h2]
backends = ["{h2}"]
upstream_protocol = "h2"
"#
    )
}

#[tokio::test]
async fn request_rules_edit_the_forwarding_fields_on_every_path() {
    let h1 = http_backend("b").await;
    let h2 = h2_echo_backend().await;
    // Behind a load balancer that terminated TLS: the scheme the client used is https, and the
    // address X-Real-IP would carry is the other balancer's, so it goes.
    let proxy = Proxy::start(&h1_and_h2_paths(
        h1.addr,
        h2.addr,
        r#"request_headers = { set = { X-Forwarded-Proto = "https" }, remove = ["X-Real-IP"] }
host_rewrite = "internal.local""#,
    ));
    let check = |seen: &str, why: &str| {
        let seen = seen.to_ascii_lowercase();
        assert!(seen.contains("x-forwarded-proto: https\n"), "{why}: {seen}");
        assert!(!seen.contains("x-forwarded-proto: http\n"), "{why}: {seen}");
        assert!(!seen.contains("x-real-ip"), "{why}: {seen}");
        // The Host the client asked for, not the rewritten one.
        assert!(
            seen.contains("x-forwarded-host: edge.example\n"),
            "{why}: {seen}"
        );
        assert!(
            seen.contains("x-forwarded-for: 127.0.0.1\n"),
            "{why}: {seen}"
        );
    };
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    for path in ["/a", "/grpc/a"] {
        client
            .send(format!("GET {path} HTTP/1.1\r\nHost: edge.example\r\n\r\n").as_bytes())
            .await;
        let reply = client.reply().await.expect("a reply");
        check(&reply.text(), &format!("HTTP/1.1 {path}"));
    }
    let mut sender = h2_connect(proxy.addr("l7")).await;
    for path in ["/a", "/grpc/a"] {
        let (status, _, body) = h2_request(
            &mut sender,
            "GET",
            &format!("http://edge.example{path}"),
            None,
        )
        .await;
        assert_eq!(status, 200);
        check(&String::from_utf8_lossy(&body), &format!("HTTP/2 {path}"));
    }
}

#[tokio::test]
async fn dot_segments_are_removed_before_routing_and_never_reach_a_backend() {
    let public = http_backend("public").await;
    let web = http_backend("web").await;
    let proxy = Proxy::start(&format!(
        r#"
[[listeners]]
name = "l7"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "web"

  [[listeners.routes]]
  match = {{ path_prefix = "/internal/" }}
  redirect = {{ to = "/denied", status = 302 }}

  [[listeners.routes]]
  match = {{ path_prefix = "/public/" }}
  pool = "public"

[pools.public]
backends = ["{}"]

[pools.web]
backends = ["{}"]
"#,
        public.addr, web.addr
    ));
    // (target sent, where it goes: a backend and the target it receives, or the redirect)
    let cases = [
        ("/public/../internal/x", None),
        ("/public/%2e%2e/internal/x", None),
        ("/public/%2E./internal/x", None),
        ("/public/.%2e/internal/x", None),
        (
            "/public/./a/../b?q=/../x",
            Some(("public", "/public/b?q=/../x")),
        ),
        ("/public/a/.", Some(("public", "/public/a/"))),
        ("/public/a/..", Some(("public", "/public/"))),
        ("/..", Some(("web", "/"))),
        ("/public/../../../etc/passwd", Some(("web", "/etc/passwd"))),
        // Not dot segments: kept as they are.
        (
            "/public/..%2Finternal",
            Some(("public", "/public/..%2Finternal")),
        ),
        (
            "/public/%252e%252e/x",
            Some(("public", "/public/%252e%252e/x")),
        ),
        ("/public/...", Some(("public", "/public/..."))),
        (
            "/public/.well-known/a",
            Some(("public", "/public/.well-known/a")),
        ),
    ];
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    let mut sender = h2_connect(proxy.addr("l7")).await;
    for (target, expected) in cases {
        let reply = client.get(target, "").await;
        let (status, headers, body) =
            h2_request(&mut sender, "GET", &format!("http://test{target}"), None).await;
        let h2_backend = headers.get("x-backend").map(|v| v.to_str().unwrap_or("?"));
        let h2_seen = String::from_utf8_lossy(&body).into_owned();
        match expected {
            None => {
                assert_eq!(
                    (reply.status, reply.header("location")),
                    (302, Some("/denied")),
                    "{target}"
                );
                assert_eq!(status, 302, "HTTP/2 {target}");
            }
            Some((backend, received)) => {
                let line = format!("GET {received} HTTP/1.1\n");
                assert_eq!(reply.header("x-backend"), Some(backend), "{target}");
                assert!(reply.text().contains(&line), "{target}: {}", reply.text());
                assert_eq!(h2_backend, Some(backend), "HTTP/2 {target}");
                assert!(h2_seen.contains(&line), "HTTP/2 {target}: {h2_seen}");
            }
        }
    }
}

#[tokio::test]
async fn a_rewrite_keeps_the_query_and_never_sends_a_dot_segment_or_an_invalid_target() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&format!(
        r#"
[[listeners]]
name = "l7"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "p"

  [[listeners.routes]]
  match = {{ path_prefix = "/api" }}
  pool = "p"
  rewrite = {{ strip_prefix = "/api", add_prefix = "/v1/public" }}

  [[listeners.routes]]
  match = {{ path_prefix = "/files/" }}
  pool = "p"
  rewrite = {{ regex = '^/files/x(.*)$', replace = '/store/public/$1' }}

  [[listeners.routes]]
  match = {{ path_prefix = "/strip" }}
  pool = "p"
  rewrite = {{ strip_prefix = "/strip" }}

  [[listeners.routes]]
  match = {{ path_prefix = "/broken/" }}
  pool = "p"
  rewrite = {{ regex = '^/broken/(.*)$', replace = 'no-slash/$1' }}

[pools.p]
backends = ["{}"]
"#,
        backend.addr
    ));
    let cases = [
        ("/api/users?page=2", Ok("/v1/public/users?page=2")),
        ("/api", Ok("/v1/public/")),
        ("/strip", Ok("/")),
        ("/strip?x=1", Ok("/?x=1")),
        ("/strip/", Ok("/")),
        ("/files/xa/b", Ok("/store/public/a/b")),
        // Dot segments go before routing: this one no longer matches `/api`.
        ("/api/%2e%2e", Ok("/")),
        ("/api/x/../users", Ok("/v1/public/users")),
        // What the client sent has no dot segment, but what the rewrite made of it does: it
        // would climb out of the prefix the rewrite puts it under.
        ("/api../private", Err(400)),
        ("/files/x../private", Err(400)),
        ("/files/x%2e%2e/private", Err(400)),
        // A rewrite that cannot make a valid target is the configuration's fault.
        ("/broken/a", Err(500)),
    ];
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    let mut sender = h2_connect(proxy.addr("l7")).await;
    for (target, expected) in cases {
        let reply = client.get(target, "").await;
        let (status, _, body) =
            h2_request(&mut sender, "GET", &format!("http://test{target}"), None).await;
        match expected {
            Ok(received) => {
                let line = format!("GET {received} HTTP/1.1\n");
                assert!(reply.text().contains(&line), "{target}: {}", reply.text());
                let seen = String::from_utf8_lossy(&body).into_owned();
                assert!(seen.contains(&line), "HTTP/2 {target}: {seen}");
            }
            Err(code) => {
                assert_eq!(reply.status, code, "{target}");
                assert_eq!(status, code, "HTTP/2 {target}");
            }
        }
    }
}

#[tokio::test]
async fn a_listener_redirect_answers_http2_requests_no_route_matches() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&format!(
        r#"
[[listeners]]
name = "l7"
bind = "127.0.0.1:0"
protocol = "http"
redirect = {{ to = "https://{{host}}{{path}}", status = 308 }}
routes = [{{ match = {{ path_prefix = "/api/" }}, pool = "p" }}]

[pools.p]
backends = ["{}"]
"#,
        backend.addr
    ));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    let reply = client.get("/elsewhere?a=1", "").await;
    assert_eq!(
        (reply.status, reply.header("location")),
        (308, Some("https://test/elsewhere?a=1"))
    );
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let (status, headers, _) =
        h2_request(&mut sender, "GET", "http://test:8080/elsewhere?a=1", None).await;
    assert_eq!(status, 308);
    assert_eq!(
        headers.get("location").map(|v| v.as_bytes()),
        Some(&b"https://test/elsewhere?a=1"[..])
    );
    assert_eq!(backend.accepted(), 0);
}

/// A redirect that starts with the request's path stays on this site whatever the path is:
/// `//evil.example/` would otherwise make the browser leave for another host. One that names
/// the request's host gets 400 from a request that has none, rather than a Location without a
/// host.
#[tokio::test]
async fn redirects_stay_on_the_site_and_need_a_host_to_name_one() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&format!(
        r#"
[[listeners]]
name = "l7"
bind = "127.0.0.1:0"
protocol = "http"
routes = [
  {{ match = {{ path_prefix = "/secure/" }}, redirect = {{ to = "https://{{host}}{{path}}", status = 308 }} }},
  {{ match = {{ path_regex = "^/[^?]*[^/?]$" }}, redirect = {{ to = "{{path}}/", status = 301 }} }},
]
default_pool = "p"

[pools.p]
backends = ["{}"]
"#,
        backend.addr
    ));
    let addr = proxy.addr("l7");
    let mut client = HttpClient::connect(addr).await;
    for (path, location) in [
        ("/docs", "/docs/"),
        ("//evil.example", "/evil.example/"),
        ("///evil.example", "/evil.example/"),
    ] {
        let reply = client.get(path, "").await;
        assert_eq!(
            (reply.status, reply.header("location")),
            (301, Some(location)),
            "{path}"
        );
    }
    let mut sender = h2_connect(addr).await;
    let (status, headers, _) =
        h2_request(&mut sender, "GET", "http://test//evil.example", None).await;
    assert_eq!(status, 301);
    assert_eq!(
        headers.get("location").map(|v| v.as_bytes()),
        Some(&b"/evil.example/"[..])
    );
    let mut client = HttpClient::connect(addr).await;
    client.send(b"GET /secure/x HTTP/1.0\r\n\r\n").await;
    assert_eq!(client.reply().await.expect("reply").status, 400);
    assert_eq!(backend.accepted(), 0);
}

fn big_text() -> Vec<u8> {
    (0..20_000)
        .map(|i| b"the quick brown fox "[i % 20])
        .collect()
}

/// A backend serving fixed content by path, to exercise compression decisions.
async fn content_backend() -> Backend {
    Backend::start(|mut stream| async move {
        let mut buf = Vec::new();
        loop {
            let Some(head_end) = read_until(&mut stream, &mut buf, b"\r\n\r\n").await else {
                return;
            };
            let end = head_end + 4;
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end);
            let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
            let body = big_text();
            let response = match path.as_str() {
                "/big.txt" => [
                    format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\netag: \"v1\"\r\naccept-ranges: bytes\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes(),
                    body,
                ]
                .concat(),
                "/small.txt" => b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nsmall".to_vec(),
                "/image.png" => [
                    format!("HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes(),
                    body,
                ]
                .concat(),
                "/encoded" => [
                    format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-encoding: gzip\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes(),
                    body,
                ]
                .concat(),
                // Cache-Control as a list over two field lines.
                "/no-transform" => [
                    format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncache-control: public\r\ncache-control: no-transform\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes(),
                    body,
                ]
                .concat(),
                // What a conditional GET of /big.txt gets once it is cached.
                "/not-modified" => b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\n\r\n".to_vec(),
                _ => {
                    // Chunked JSON, in two chunks.
                    let half = body.len() / 2;
                    [
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_vec(),
                        format!("{half:x}\r\n").into_bytes(),
                        body[..half].to_vec(),
                        format!("\r\n{:x}\r\n", body.len() - half).into_bytes(),
                        body[half..].to_vec(),
                        b"\r\n0\r\n\r\n".to_vec(),
                    ]
                    .concat()
                }
            };
            // A HEAD gets the head alone.
            let response = if head.starts_with("HEAD ") {
                let end = response.windows(4).position(|w| w == b"\r\n\r\n").expect("head");
                response[..end + 4].to_vec()
            } else {
                response
            };
            if stream.write_all(&response).await.is_err() {
                return;
            }
        }
    })
    .await
}

fn decode(encoding: &str, data: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    match encoding {
        "gzip" => {
            flate2::read::GzDecoder::new(data)
                .read_to_end(&mut out)
                .expect("gzip");
        }
        "br" => {
            brotli::Decompressor::new(data, 4096)
                .read_to_end(&mut out)
                .expect("br");
        }
        "zstd" => out = zstd::decode_all(data).expect("zstd"),
        other => panic!("unexpected encoding {other}"),
    }
    out
}

/// A listener's compression with every algorithm.
const ALL_ALGORITHMS: &str =
    "compression = { algorithms = [\"zstd\", \"br\", \"gzip\"], min_size = 1024 }";

#[tokio::test]
async fn responses_are_compressed_when_accepted_and_worth_it() {
    let backend = content_backend().await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], ALL_ALGORITHMS, ""));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    compression_cases(&mut client, &[]).await;
}

/// The compression decisions an HTTP/1.1 client sees from a backend serving the paths of
/// [`content_backend`]: each algorithm by q-value, for a body of known length and a chunked one
/// (whose trailers must be `trailers`), and the cases left as they are.
async fn compression_cases(client: &mut HttpClient, trailers: &[(&str, &str)]) {
    for (accept, expected) in [
        ("gzip", "gzip"),
        ("br;q=0.9, gzip;q=0.5", "br"),
        ("gzip, br, zstd", "zstd"),
    ] {
        for path in ["/big.txt", "/chunked.json"] {
            let reply = client
                .get(path, &format!("Accept-Encoding: {accept}\r\n"))
                .await;
            let why = format!("{path} {accept}");
            assert_eq!(reply.header("content-encoding"), Some(expected), "{why}");
            assert_eq!(reply.header("vary"), Some("Accept-Encoding"), "{why}");
            assert_eq!(reply.header("content-length"), None, "{why}");
            assert!(
                reply.body.len() < 2_000,
                "{why}: {} bytes",
                reply.body.len()
            );
            assert_eq!(decode(expected, &reply.body), big_text(), "{why}");
            if path == "/big.txt" {
                assert_eq!(reply.header("etag"), Some("W/\"v1\""), "{why}");
                // Byte ranges of the original do not address the compressed bytes (a resumed
                // download would splice the two): not offered, as NGINX's gzip does not.
                assert_eq!(reply.header("accept-ranges"), None, "{why}");
            } else {
                let got: Vec<(&str, &str)> = reply
                    .trailers
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .collect();
                assert_eq!(got, trailers, "{why}");
            }
        }
    }

    // Not accepted, too small, not a compressible type, already encoded, or a range request.
    let cases = [
        ("/big.txt", "", "not accepted"),
        ("/big.txt", "Accept-Encoding: identity\r\n", "identity only"),
        ("/small.txt", "Accept-Encoding: gzip\r\n", "too small"),
        ("/image.png", "Accept-Encoding: gzip\r\n", "not a text type"),
        ("/encoded", "Accept-Encoding: br\r\n", "already encoded"),
        (
            "/big.txt",
            "Accept-Encoding: gzip\r\nRange: bytes=0-99\r\n",
            "range request",
        ),
    ];
    for (path, extra, why) in cases {
        let reply = client.get(path, extra).await;
        let expected = (path == "/encoded").then_some("gzip");
        assert_eq!(reply.header("content-encoding"), expected, "{why}");
        assert_eq!(reply.header("vary"), Some("Accept-Encoding"), "{why}");
        if path != "/small.txt" {
            assert_eq!(reply.body, big_text(), "{why}");
        }
        if path == "/big.txt" {
            assert_eq!(reply.header("accept-ranges"), Some("bytes"), "{why}");
        }
    }
}

/// Sends one HTTP/2 request with prior knowledge and returns status, headers and body.
async fn h2_request(
    sender: &mut h2::client::SendRequest<bytes::Bytes>,
    method: &str,
    uri: &str,
    body: Option<&'static [u8]>,
) -> (u16, http::HeaderMap, Vec<u8>) {
    let request = http::Request::builder()
        .method(method)
        .uri(uri)
        .body(())
        .expect("request");
    let (response, mut stream) = sender.send_request(request, body.is_none()).expect("send");
    if let Some(body) = body {
        stream
            .send_data(bytes::Bytes::from_static(body), true)
            .expect("body");
    }
    let response = tokio::time::timeout(PATIENCE, response)
        .await
        .expect("in time")
        .expect("response");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let data = h2_body(&mut response.into_body()).await;
    (status, headers, data)
}

/// Reads an HTTP/2 body to its end, giving its window back as it goes.
async fn h2_body(body: &mut h2::RecvStream) -> Vec<u8> {
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("data");
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    data
}

/// Sends a bodiless HTTP/2 request and waits for the response head.
async fn h2_head(
    sender: &mut h2::client::SendRequest<bytes::Bytes>,
    request: http::Request<()>,
) -> http::Response<h2::RecvStream> {
    let (response, _) = sender.send_request(request, true).expect("send");
    tokio::time::timeout(PATIENCE, response)
        .await
        .expect("in time")
        .expect("response")
}

/// Sends a bodiless HTTP/2 request and reads the whole response: its head, its body and its
/// trailers.
async fn h2_exchange(
    sender: &mut h2::client::SendRequest<bytes::Bytes>,
    request: http::Request<()>,
) -> (http::response::Parts, Vec<u8>, Option<http::HeaderMap>) {
    let response = h2_head(sender, request).await;
    let (parts, mut body) = response.into_parts();
    let data = h2_body(&mut body).await;
    let trailers = body.trailers().await.expect("trailers");
    (parts, data, trailers)
}

#[tokio::test]
async fn http2_streams_are_logged_when_their_body_is_done() {
    let backend = http_backend("b").await;
    let h2 = h2_backend("g").await;
    let log = fresh_log("h2log");
    let proxy = Proxy::start(&format!(
        r#"
[[listeners]]
name = "l7"
bind = "127.0.0.1:0"
protocol = "http"
{}

  [[listeners.routes]]
  match = {{ path_prefix = "/grpc/" }}
  pool = "g"

  [[listeners.routes]]
  match = {{ path = "/one" }}
  pool = "p"

[pools.p]
backends = ["{}"]

[pools.g]
upstream_protocol = "h2"
backends = ["{}", "{}"]
"#,
        json_access_log(&log),
        backend.addr,
        dead_addr().await,
        h2.addr
    ));
    let mut sender = h2_connect(proxy.addr("l7")).await;

    // To an HTTP/1.1 backend.
    let (status, _, body) = h2_request(&mut sender, "GET", "http://example.com/one", None).await;
    assert_eq!(status, 200);
    let line = &json_lines(&log, 1).await[0];
    assert_eq!(line["protocol"], "HTTP/2");
    assert_eq!(line["path"], "/one");
    assert_eq!(line["status"], 200);
    assert_eq!(line["pool"], "p");
    assert_eq!(line["backend"], backend.addr.to_string());
    assert_eq!(line["bytes"].as_u64(), Some(body.len() as u64));
    assert!(line["upstream_ms"].as_f64().is_some(), "{line}");

    // To an HTTP/2 backend (past a dead one, when round robin starts there).
    let (status, _, body) = h2_request(
        &mut sender,
        "POST",
        "http://example.com/grpc/echo",
        Some(b"ping"),
    )
    .await;
    assert_eq!(status, 200);
    let line = &json_lines(&log, 2).await[1];
    assert_eq!(line["pool"], "g");
    assert_eq!(line["backend"], h2.addr.to_string());
    assert_eq!(line["bytes"].as_u64(), Some(body.len() as u64));

    // A stream with no route: our own 404, logged without a pool.
    let (status, _, body) = h2_request(&mut sender, "GET", "http://example.com/none", None).await;
    assert_eq!(status, 404);
    let line = &json_lines(&log, 3).await[2];
    assert_eq!(line["status"], 404);
    assert!(line.get("pool").is_none(), "{line}");
    assert_eq!(line["bytes"].as_u64(), Some(body.len() as u64));
}

#[tokio::test]
async fn http2_clients_with_prior_knowledge_reach_http11_backends() {
    let (proxy, _backends) = seed().await;
    let mut sender = h2_connect(proxy.addr("public")).await;
    let (status, headers, body) =
        h2_request(&mut sender, "GET", "http://example.com/api/users?x=1", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("x-backend").map(|v| v.as_bytes()),
        Some(&b"api"[..])
    );
    assert!(headers.get("x-request-id").is_some());
    let seen = String::from_utf8_lossy(&body).into_owned();
    assert!(
        seen.starts_with("api\nGET /api/users?x=1 HTTP/1.1\nhost: example.com\n"),
        "{seen}"
    );
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\n"), "{seen}");

    // Host routing from :authority, and a body (sent chunked upstream: no content-length).
    let (status, headers, body) = h2_request(
        &mut sender,
        "POST",
        "http://admin.example.com/form",
        Some(b"a=1&b=2"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("x-backend").map(|v| v.as_bytes()),
        Some(&b"admin"[..])
    );
    assert!(String::from_utf8_lossy(&body).ends_with("\n\na=1&b=2"));

    // Many concurrent streams on one connection.
    let mut streams = Vec::new();
    for i in 0..20 {
        let mut sender = sender.clone();
        streams.push(tokio::spawn(async move {
            let uri = format!("http://x/static/{i}.css");
            h2_request(&mut sender, "GET", &uri, None).await
        }));
    }
    for stream in streams {
        let (status, headers, _) = stream.await.expect("stream");
        assert_eq!(status, 200);
        assert_eq!(
            headers.get("x-backend").map(|v| v.as_bytes()),
            Some(&b"static"[..])
        );
    }
    // Statuses of our own travel as HTTP/2 responses too.
    let api = http_backend("only").await;
    let proxy = Proxy::start(&format!(
        "[[listeners]]\nname = \"l7\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\nroutes = [{{ match = {{ path_prefix = \"/api/\" }}, pool = \"p\" }}]\n[pools.p]\nbackends = [\"{}\"]\n",
        api.addr
    ));
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let (status, _, body) = h2_request(&mut sender, "GET", "http://x/nothing", None).await;
    assert_eq!((status, body.as_slice()), (404, &b"404 Not Found\n"[..]));
}

/// A gRPC-style HTTP/2 backend (h2c): answers each request with the request's body, prefixed by
/// its name, then trailers `grpc-status: 0` and `x-seen-te` (what `te` it received).
async fn h2_backend(name: &'static str) -> Backend {
    h2_backend_with(move |request, mut respond| async move {
        let te = request
            .headers()
            .get("te")
            .map(|v| v.to_str().unwrap_or("?").to_owned())
            .unwrap_or_default();
        let forwarded = request.headers().get("x-forwarded-for").is_some();
        let mut body = request.into_body();
        let mut data = format!("{name}:").into_bytes();
        while let Some(Ok(chunk)) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let response = http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .header("x-forwarded", if forwarded { "yes" } else { "no" })
            .body(())
            .expect("response");
        let Ok(mut send) = respond.send_response(response, false) else {
            return;
        };
        let _ = send.send_data(bytes::Bytes::from(data), false);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        trailers.insert(
            "x-seen-te",
            http::HeaderValue::from_str(&te).unwrap_or(http::HeaderValue::from_static("?")),
        );
        let _ = send.send_trailers(trailers);
    })
    .await
}

#[tokio::test]
async fn grpc_style_http2_backends_keep_trailers_end_to_end() {
    let a = h2_backend("a").await;
    let b = h2_backend("b").await;
    let proxy = Proxy::start(&single_pool(
        &[a.addr, b.addr],
        "",
        "upstream_protocol = \"h2\"",
    ));
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let mut names = Vec::new();
    for i in 0..4 {
        let request = http::Request::builder()
            .method("POST")
            .uri("http://svc/pkg.Service/Method")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("request");
        let (response, mut stream) = sender.send_request(request, false).expect("send");
        stream
            .send_data(bytes::Bytes::from(format!("msg{i}")), true)
            .expect("data");
        let response = tokio::time::timeout(PATIENCE, response)
            .await
            .expect("in time")
            .expect("response");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers().get("x-forwarded").map(|v| v.as_bytes()),
            Some(&b"yes"[..])
        );
        let mut body = response.into_body();
        let text = String::from_utf8(h2_body(&mut body).await).expect("utf-8");
        assert!(text.ends_with(&format!(":msg{i}")), "{text}");
        names.push(text[..1].to_owned());
        let trailers = body
            .trailers()
            .await
            .expect("trailers")
            .expect("some trailers");
        assert_eq!(
            trailers.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"0"[..])
        );
        assert_eq!(
            trailers.get("x-seen-te").map(|v| v.as_bytes()),
            Some(&b"trailers"[..])
        );
    }
    names.sort();
    assert_eq!(
        names,
        ["a", "a", "b", "b"],
        "round robin over the two h2 backends"
    );
    // One multiplexed connection per backend, whatever the number of requests.
    assert_eq!((a.accepted(), b.accepted()), (1, 1));
}

#[tokio::test]
async fn http11_clients_reach_http2_backends_with_trailers_as_chunked_trailers() {
    let backend = h2_backend("h2").await;
    let log = fresh_log("h1h2log");
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        &json_access_log(&log),
        "upstream_protocol = \"h2\"",
    ));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    // A bodiless request on a kept-alive connection, then a chunked one that closes.
    let reply = client.get("/status", "").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-forwarded"), Some("yes"));
    assert_eq!(reply.text(), "h2:");
    client
        .send(b"POST /svc HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        .await;
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, client.stream.read_to_end(&mut raw))
        .await
        .expect("in time")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
    assert!(text.contains("h2:hello world"), "{text}");
    assert!(
        text.ends_with("0\r\ngrpc-status: 0\r\nx-seen-te: \r\n\r\n"),
        "{text:?}"
    );
    // The log counts what the client was sent, head and body.
    let last = &json_lines(&log, 2).await[1];
    assert_eq!(last["bytes"], raw.len());
}

#[tokio::test]
async fn x_forwarded_host_and_the_optional_forwarded_field() {
    let (backend, _proxy, mut client) = behind_l7(
        "forwarded_header = true\ntrusted_proxies = [\"127.0.0.1\"]",
        "",
    )
    .await;
    let seen = client
        .get("/", "Forwarded: for=192.0.2.60;proto=https\r\n")
        .await
        .text();
    assert!(seen.contains("x-forwarded-host: test\n"), "{seen}");
    assert!(
        seen.contains(
            "forwarded: for=192.0.2.60;proto=https, for=127.0.0.1;proto=http;host=\"test\"\n"
        ),
        "{seen}"
    );
    // Without the key, no Forwarded field is written (and a client's is dropped, see
    // `the_forwarded_field_is_the_proxys_on_every_path`).
    let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    let seen = client.get("/", "").await.text();
    assert!(
        !seen.to_ascii_lowercase().contains("forwarded: for="),
        "{seen}"
    );
}

#[tokio::test]
async fn no_usable_backend_is_503_and_a_garbage_answer_is_502() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
    let state = proxy.registry.get("p", backend.addr).expect("state");
    state.set_usable(false);
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    assert_eq!(client.get("/", "").await.status, 503);
    state.set_usable(true);
    assert_eq!(client.get("/", "").await.status, 200);

    let garbage = Backend::start(|mut stream| async move {
        let mut buf = [0u8; 1024];
        let _ = stream.read(&mut buf).await;
        let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.0\r\n\r\n").await;
    })
    .await;
    let proxy = Proxy::start(&single_pool(&[garbage.addr], "", ""));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    assert_eq!(client.get("/", "").await.status, 502);
}

#[tokio::test]
async fn http2_floods_are_cut_off() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));

    // Rapid reset: streams opened and cancelled at once, a thousand of them in one write, as an
    // attacker sends them (a client library that waits for each write would let the proxy
    // take each stream before its reset, and the flood would go unseen, or not, by timing).
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr("l7"))
        .await
        .expect("connect");
    let mut flood = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    flood.extend(h2_frame(4, 0, 0, &[]));
    // `GET http://x/`: `:method`, `:scheme`, `:path` from the static table, `:authority` a
    // literal on its name's index.
    let block = [0x82, 0x86, 0x84, 0x01, 0x01, b'x'];
    for id in (1..2_000u32).step_by(2) {
        flood.extend(h2_frame(1, 0x5, id, &block));
        flood.extend(h2_frame(3, 0, id, &8u32.to_be_bytes()));
    }
    tcp.write_all(&flood).await.expect("flood sent");
    // The proxy says why it gives up (ENHANCE_YOUR_CALM) and closes, or only closes.
    let mut got = Vec::new();
    let goaway = tokio::time::timeout(PATIENCE, async {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(code) = goaway_code(&got) {
                return Some(code);
            }
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("the proxy cuts the connection off");
    assert!(matches!(goaway, None | Some(11)), "GOAWAY {goaway:?}");

    // A header list far over the limit is refused without harm to the connection's neighbours.
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let request = http::Request::builder()
        .uri("http://x/")
        .header("x-big", "a".repeat(60_000))
        .body(())
        .expect("request");
    let outcome = match sender.send_request(request, true) {
        Ok((response, _)) => tokio::time::timeout(PATIENCE, response)
            .await
            .expect("in time"),
        Err(error) => Err(error),
    };
    assert!(
        outcome
            .as_ref()
            .map_or(true, |r| r.status() == 431 || r.status() == 400),
        "{outcome:?}"
    );
    // Other clients are served as usual.
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    assert_eq!(client.get("/", "").await.status, 200);
}

/// One HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, id: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The error code of the first GOAWAY among the whole HTTP/2 frames at the start of `bytes`.
fn goaway_code(mut bytes: &[u8]) -> Option<u32> {
    while bytes.len() >= 9 {
        let length = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        let payload = bytes.get(9..9 + length)?;
        if bytes[3] == 7 {
            return Some(u32::from_be_bytes(payload.get(4..8)?.try_into().ok()?));
        }
        bytes = &bytes[9 + length..];
    }
    None
}

#[tokio::test]
async fn a_client_that_stops_reading_releases_its_backend() {
    let (backend, finished) = huge_answer_backend().await;
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        "",
        "response_timeout = \"300ms\"",
    ));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    client.send(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n").await;
    // The client never reads: the proxy's writes stall, time out, and both sides are closed.
    eventually("backend connection released", || {
        finished.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
}

#[tokio::test]
async fn idle_http2_connections_are_closed_and_http10_gets_no_100_continue() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        "keepalive_timeout = \"300ms\"",
        "",
    ));
    let tcp = tokio::net::TcpStream::connect(proxy.addr("l7"))
        .await
        .expect("connect");
    let (_sender, connection) = h2::client::handshake(tcp).await.expect("handshake");
    let _ = tokio::time::timeout(PATIENCE, connection)
        .await
        .expect("the idle HTTP/2 connection is closed");

    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    client
        .send(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi")
        .await;
    let reply = client.reply().await.expect("reply");
    assert_eq!(reply.status, 200, "an HTTP/1.0 client must not see a 100");
}

#[tokio::test]
async fn cookies_split_by_http2_clients_are_joined_for_http11_backends() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let request = http::Request::builder()
        .uri("http://x/")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(())
        .expect("request");
    let response = h2_head(&mut sender, request).await;
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        data.extend_from_slice(&chunk.expect("data"));
    }
    let seen = String::from_utf8_lossy(&data).into_owned();
    assert!(seen.contains("cookie: a=1; b=2\n"), "{seen}");
}

#[tokio::test]
async fn http2_clients_get_the_content_length_of_http11_responses() {
    let backend = canned_backend(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n0123456789").await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let (status, headers, body) = h2_request(&mut sender, "GET", "http://x/", None).await;
    assert_eq!((status, body.as_slice()), (200, &b"0123456789"[..]));
    assert_eq!(
        headers.get("content-length").map(|v| v.as_bytes()),
        Some(&b"10"[..])
    );
    let (status, headers, body) = h2_request(&mut sender, "HEAD", "http://x/", None).await;
    assert_eq!((status, body.as_slice()), (200, &b""[..]));
    assert_eq!(
        headers.get("content-length").map(|v| v.as_bytes()),
        Some(&b"10"[..]),
        "a HEAD response has the fields a GET would"
    );
}

#[tokio::test]
async fn connect_is_refused_with_501_on_both_protocols() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
    // HTTP/2: a CONNECT stream has no path to send on; it must not reach the backend as some
    // other request, nor become a tunnel.
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let request = http::Request::builder()
        .method("CONNECT")
        .uri("example.com:443")
        .body(())
        .expect("request");
    let (response, _stream) = sender.send_request(request, false).expect("send");
    let response = tokio::time::timeout(PATIENCE, response)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(response.status(), 501);
    // HTTP/1.1: the same status, and the connection closes (tunnel bytes may follow).
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    client
        .send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        .await;
    assert_eq!(client.reply().await.map(|r| r.status), Some(501));
    assert!(client.closed().await);
    assert_eq!(backend.accepted(), 0);
}

#[tokio::test]
async fn modification_rules_apply_to_http2_streams_too() {
    let backend = cookie_backend().await;
    let proxy = Proxy::start(&format!(
        r#"
[[listeners]]
name = "l7"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "p"
request_headers = {{ add = {{ X-Edge = "switchyard" }} }}
response_headers = {{ set = {{ X-Content-Type-Options = "nosniff" }}, remove = ["Server"] }}

  [[listeners.routes]]
  match = {{ path_prefix = "/api/" }}
  pool = "p"
  rewrite = {{ strip_prefix = "/api", add_prefix = "/v1" }}
  host_rewrite = "internal.local"
  cookie_flags = ["HttpOnly"]

  [[listeners.routes]]
  match = {{ path = "/old" }}
  redirect = {{ to = "/new", status = 308 }}

[pools.p]
backends = ["{}"]
"#,
        backend.addr
    ));
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let (status, headers, body) =
        h2_request(&mut sender, "GET", "http://edge/api/users?x=1", None).await;
    assert_eq!(status, 200);
    let seen = String::from_utf8_lossy(&body).into_owned();
    assert!(
        seen.starts_with("GET /v1/users?x=1 HTTP/1.1\nhost: internal.local\n"),
        "{seen}"
    );
    assert!(seen.contains("x-edge: switchyard\n"), "{seen}");
    assert_eq!(
        headers.get("x-content-type-options").map(|v| v.as_bytes()),
        Some(&b"nosniff"[..])
    );
    assert!(headers.get("server").is_none());
    let cookies: Vec<_> = headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap_or(""))
        .collect();
    assert_eq!(
        cookies,
        [
            "a=1; Path=/; HttpOnly",
            "b=2; Secure; SameSite=Strict; HttpOnly"
        ]
    );
    let (status, headers, _) = h2_request(&mut sender, "GET", "http://edge/old", None).await;
    assert_eq!(status, 308);
    assert_eq!(
        headers.get("location").map(|v| v.as_bytes()),
        Some(&b"/new"[..])
    );
}

#[tokio::test]
async fn http2_responses_are_compressed_too() {
    let backend = content_backend().await;
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        "compression = { algorithms = [\"br\", \"gzip\"] }",
        "",
    ));
    let mut sender = h2_connect(proxy.addr("l7")).await;
    for path in ["/big.txt", "/chunked.json"] {
        let request = http::Request::builder()
            .uri(format!("http://x{path}"))
            .header("accept-encoding", "gzip, br")
            .body(())
            .expect("request");
        let (head, data, _) = h2_exchange(&mut sender, request).await;
        assert_eq!(
            head.headers.get("content-encoding").map(|v| v.as_bytes()),
            Some(&b"br"[..]),
            "{path}"
        );
        assert_eq!(
            head.headers.get("vary").map(|v| v.as_bytes()),
            Some(&b"Accept-Encoding"[..])
        );
        assert!(head.headers.get("accept-ranges").is_none(), "{path}");
        assert_eq!(decode("br", &data), big_text(), "{path}");
    }
}

/// An HTTP/2 backend (h2c) serving the paths of [`content_backend`]; `/chunked.json` comes in
/// two data frames without a length, followed by a trailer `x-checksum: ok`.
async fn h2_content_backend() -> Backend {
    Backend::start(|stream| async move {
        let Ok(mut connection) = h2::server::handshake(stream).await else {
            return;
        };
        while let Some(Ok((request, mut respond))) = connection.accept().await {
            let body = bytes::Bytes::from(big_text());
            let (builder, data) = match request.uri().path() {
                "/big.txt" => (
                    http::Response::builder()
                        .header("content-type", "text/plain; charset=utf-8")
                        .header("etag", "\"v1\"")
                        .header("accept-ranges", "bytes")
                        .header("content-length", body.len()),
                    vec![body],
                ),
                "/small.txt" => (
                    http::Response::builder()
                        .header("content-type", "text/plain")
                        .header("content-length", 5),
                    vec![bytes::Bytes::from_static(b"small")],
                ),
                "/image.png" => (
                    http::Response::builder().header("content-type", "image/png"),
                    vec![body],
                ),
                "/encoded" => (
                    http::Response::builder()
                        .header("content-type", "text/plain")
                        .header("content-encoding", "gzip"),
                    vec![body],
                ),
                "/no-transform" => (
                    http::Response::builder()
                        .header("content-type", "text/plain")
                        .header("cache-control", "public")
                        .header("cache-control", "no-transform"),
                    vec![body],
                ),
                "/not-modified" => (
                    http::Response::builder()
                        .status(304)
                        .header("etag", "\"v1\""),
                    vec![],
                ),
                _ => {
                    let half = body.len() / 2;
                    (
                        http::Response::builder().header("content-type", "application/json"),
                        vec![body.slice(..half), body.slice(half..)],
                    )
                }
            };
            let trailed = request.uri().path() == "/chunked.json";
            let empty = data.is_empty() || request.method() == http::Method::HEAD;
            let Ok(mut send) = respond.send_response(builder.body(()).expect("response"), empty)
            else {
                continue;
            };
            if empty {
                continue;
            }
            let last = data.len() - 1;
            for (i, piece) in data.into_iter().enumerate() {
                let _ = send.send_data(piece, i == last && !trailed);
            }
            if trailed {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("x-checksum", http::HeaderValue::from_static("ok"));
                let _ = send.send_trailers(trailers);
            }
        }
    })
    .await
}

#[tokio::test]
async fn responses_from_http2_backends_are_compressed_for_both_kinds_of_client() {
    let backend = h2_content_backend().await;
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        ALL_ALGORITHMS,
        "upstream_protocol = \"h2\"",
    ));

    // HTTP/1.1 clients: chunked, compressed, trailers after the compressed stream's end.
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    compression_cases(&mut client, &[("x-checksum", "ok")]).await;
    // HEAD: the fields of the compressed GET, nothing compressed (see
    // `a_head_answer_has_the_fields_the_compressed_get_answer_has`).
    let head = client
        .head_of(b"HEAD /big.txt HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
        .await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-encoding: gzip"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    // An HTTP/1.0 client: compressed, delimited by the close.
    let mut old = HttpClient::connect(proxy.addr("l7")).await;
    old.send(b"GET /big.txt HTTP/1.0\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
        .await;
    let reply = old.reply().await.expect("a reply");
    assert_eq!(reply.header("content-encoding"), Some("gzip"));
    assert_eq!(reply.header("transfer-encoding"), None);
    assert_eq!(decode("gzip", &reply.body), big_text());

    // HTTP/2 clients: the same, with the trailers as an HTTP/2 trailer section.
    let mut sender = h2_connect(proxy.addr("l7")).await;
    for (path, accept, expected) in [
        ("/big.txt", "gzip, br", Some("br")),
        ("/chunked.json", "gzip", Some("gzip")),
        ("/chunked.json", "identity", None),
        ("/small.txt", "gzip", None),
    ] {
        let request = http::Request::builder()
            .uri(format!("http://x{path}"))
            .header("accept-encoding", accept)
            .body(())
            .expect("request");
        let (head, data, trailers) = h2_exchange(&mut sender, request).await;
        let why = format!("{path} {accept}");
        let header = |name: &str| head.headers.get(name).map(|v| v.as_bytes());
        assert_eq!(
            header("content-encoding"),
            expected.map(str::as_bytes),
            "{why}"
        );
        assert_eq!(header("vary"), Some(&b"Accept-Encoding"[..]), "{why}");
        if expected.is_some() {
            assert_eq!(header("content-length"), None, "{why}");
            assert_eq!(header("accept-ranges"), None, "{why}");
        }
        let data = match expected {
            Some(encoding) => decode(encoding, &data),
            None => data,
        };
        let original = if path == "/small.txt" {
            b"small".to_vec()
        } else {
            big_text()
        };
        assert_eq!(data, original, "{why}");
        let checksum = trailers
            .as_ref()
            .and_then(|t| t.get("x-checksum"))
            .map(|v| v.as_bytes());
        let wanted: Option<&[u8]> = (path == "/chunked.json").then_some(b"ok");
        assert_eq!(checksum, wanted, "{why}");
    }
}

/// The end of what [`h2_cut_backend`] sends before it pauses.
const FIRST_HALF_END: &[u8] = b"<end of the first half>";

/// An HTTP/2 backend that answers every stream with a compressible head and the first 10,000
/// bytes of [`big_text`] followed by [`FIRST_HALF_END`], then pauses, and resets the stream once
/// `cut` is notified.
async fn h2_cut_backend(cut: Arc<tokio::sync::Notify>) -> Backend {
    h2_backend_with(move |_, mut respond| {
        let cut = Arc::clone(&cut);
        async move {
            let head = http::Response::builder()
                .header("content-type", "text/plain")
                .body(())
                .expect("response");
            let Ok(mut send) = respond.send_response(head, false) else {
                return;
            };
            let mut half = big_text()[..10_000].to_vec();
            half.extend_from_slice(FIRST_HALF_END);
            let _ = send.send_data(bytes::Bytes::from(half), false);
            cut.notified().await;
            send.send_reset(h2::Reason::INTERNAL_ERROR);
        }
    })
    .await
}

/// Has the backend of [`h2_cut_backend`] reset its stream, and checks that the HTTP/1.1
/// client's connection then closes without the chunked body's last chunk.
async fn cuts_off(client: &mut HttpClient, cut: &tokio::sync::Notify) {
    cut.notify_one();
    ends_without_its_last_chunk(client).await;
}

/// Reads `client` to its end and checks that the chunked body did not end cleanly.
async fn ends_without_its_last_chunk(client: &mut HttpClient) {
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, client.stream.read_to_end(&mut rest))
        .await
        .expect("closed in time");
    assert!(
        !rest.ends_with(b"0\r\n\r\n"),
        "a cut body must not end cleanly"
    );
}

/// Asks [`h2_cut_backend`]'s `/cut` over HTTP/2, accepting gzip, and returns the response once
/// its head is there.
async fn h2_cut_request(
    sender: &mut h2::client::SendRequest<bytes::Bytes>,
) -> http::Response<h2::RecvStream> {
    let request = http::Request::builder()
        .uri("http://x/cut")
        .header("accept-encoding", "gzip")
        .body(())
        .expect("request");
    let response = h2_head(sender, request).await;
    assert_eq!(
        response
            .headers()
            .get("content-encoding")
            .map(|v| v.as_bytes()),
        Some(&b"gzip"[..])
    );
    response
}

/// Reads an HTTP/2 body and checks that it ends in an error rather than cleanly.
async fn ends_in_an_error(mut body: h2::RecvStream) {
    while let Some(chunk) = tokio::time::timeout(PATIENCE, body.data())
        .await
        .expect("ended in time")
    {
        match chunk {
            Ok(chunk) => {
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            Err(_) => return,
        }
    }
    panic!("a cut body must not end cleanly");
}

#[tokio::test]
async fn an_http2_backend_that_pauses_or_is_cut_off_is_relayed_as_it_goes() {
    let cut = Arc::new(tokio::sync::Notify::new());
    let backend = h2_cut_backend(Arc::clone(&cut)).await;
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        ALL_ALGORITHMS,
        "upstream_protocol = \"h2\"",
    ));
    // What a paused backend sent reaches an HTTP/1.1 client at once, not when more comes.
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    client.send(b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut raw = Vec::new();
    tokio::time::timeout(
        PATIENCE,
        read_until(&mut client.stream, &mut raw, FIRST_HALF_END),
    )
    .await
    .expect("the first half, while the backend pauses")
    .expect("the first half");
    cuts_off(&mut client, &cut).await;

    // Compressed: once the head is out, the connection closes without the last chunk.
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    let head = client
        .head_of(b"GET /cut HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
        .await;
    assert!(head.contains("content-encoding: gzip"), "{head}");
    cuts_off(&mut client, &cut).await;

    // HTTP/1.0: the body ends at the close, so a cut is told by a reset, not a FIN.
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    let head = client
        .head_of(b"GET /cut HTTP/1.0\r\nHost: x\r\n\r\n")
        .await;
    assert!(!head.contains("content-length"), "{head}");
    cut.notify_one();
    ends_with_a_reset(&mut client).await;

    // HTTP/2: the head arrives, then the stream ends in an error.
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let response = h2_cut_request(&mut sender).await;
    cut.notify_one();
    ends_in_an_error(response.into_body()).await;
}

#[tokio::test]
async fn the_drain_deadline_cuts_a_compressed_http2_body_for_both_kinds_of_client() {
    // The backend pauses midway and is never told to go on: only the deadline ends the body.
    let backend = h2_cut_backend(Arc::new(tokio::sync::Notify::new())).await;
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        ALL_ALGORITHMS,
        "upstream_protocol = \"h2\"",
    ));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    let head = client
        .head_of(b"GET /cut HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
        .await;
    assert!(head.contains("content-encoding: gzip"), "{head}");
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let response = h2_cut_request(&mut sender).await;
    let state = proxy.registry.get("p", backend.addr).expect("state");
    state.start_drain(Duration::from_millis(200));
    ends_without_its_last_chunk(&mut client).await;
    ends_in_an_error(response.into_body()).await;
}

/// A backend whose response body (`body`, of `content_type`) runs to the close; with `reset`,
/// it resets the connection instead, as a backend that fails midway does.
async fn until_close_backend(content_type: &'static str, body: Vec<u8>, reset: bool) -> Backend {
    Backend::start(move |mut stream| {
        let body = body.clone();
        async move {
            let mut head = Vec::new();
            if read_until(&mut stream, &mut head, b"\r\n\r\n")
                .await
                .is_none()
            {
                return;
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\nconnection: close\r\n\r\n"
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&body).await;
            if reset {
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            }
        }
    })
    .await
}

/// Reads `client` to its end and checks that it ended with a reset.
async fn ends_with_a_reset(client: &mut HttpClient) {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(PATIENCE, client.stream.read_to_end(&mut rest))
        .await
        .expect("ended in time");
    assert_eq!(
        read.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionReset),
        "a cut body that ends at the close must not look complete"
    );
}

#[tokio::test]
async fn a_compressed_body_that_ends_at_the_close_ends_its_compressed_stream() {
    let backend = until_close_backend("text/plain", big_text(), false).await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], ALL_ALGORITHMS, ""));
    for version in ["1.0", "1.1"] {
        let mut client = HttpClient::connect(proxy.addr("l7")).await;
        client
            .send(format!("GET /x HTTP/{version}\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n").as_bytes())
            .await;
        let reply = client.reply().await.expect("a reply");
        assert_eq!(
            reply.header("content-encoding"),
            Some("gzip"),
            "HTTP/{version}"
        );
        assert_eq!(decode("gzip", &reply.body), big_text(), "HTTP/{version}");
    }
}

#[tokio::test]
async fn a_body_that_ends_at_the_close_and_is_cut_resets_an_http10_client() {
    let backend = until_close_backend("image/png", vec![7; 1000], true).await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    client.send(b"GET /x HTTP/1.0\r\nHost: x\r\n\r\n").await;
    ends_with_a_reset(&mut client).await;
}

#[tokio::test]
async fn compression_follows_the_client_and_survives_header_rules_on_every_path() {
    // The backend is told to send gzip whatever the client said, and Vary is set by a rule:
    // the proxy still decides on the client's own Accept-Encoding, and keeps its Vary.
    let rules = format!(
        "{ALL_ALGORITHMS}\nrequest_headers = {{ set = {{ Accept-Encoding = \"gzip\" }} }}\n\
         response_headers = {{ set = {{ Vary = \"Origin\" }} }}"
    );
    let h1 = content_backend().await;
    let h2 = h2_content_backend().await;
    for (backend, pool) in [(h1.addr, ""), (h2.addr, "upstream_protocol = \"h2\"")] {
        let proxy = Proxy::start(&single_pool(&[backend], &rules, pool));
        let addr = proxy.addr("l7");
        let mut client = HttpClient::connect(addr).await;
        let mut sender = h2_connect(addr).await;
        for (accept, expected) in [("identity", None), ("br", Some("br"))] {
            let why = format!("{pool:?} accepting {accept}");
            let reply = client
                .get("/big.txt", &format!("Accept-Encoding: {accept}\r\n"))
                .await;
            let vary: Vec<&str> = reply
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case("vary"))
                .map(|(_, v)| v.as_str())
                .collect();
            assert_eq!(reply.header("content-encoding"), expected, "HTTP/1.1 {why}");
            assert_eq!(vary, ["Origin", "Accept-Encoding"], "HTTP/1.1 {why}");
            let body = expected.map_or(reply.body.clone(), |e| decode(e, &reply.body));
            assert_eq!(body, big_text(), "HTTP/1.1 {why}");

            let request = http::Request::builder()
                .uri("http://x/big.txt")
                .header("accept-encoding", accept)
                .body(())
                .expect("request");
            let (head, data, _) = h2_exchange(&mut sender, request).await;
            let encoding = head
                .headers
                .get("content-encoding")
                .map(|v| v.to_str().expect("text"));
            let vary: Vec<&[u8]> = head
                .headers
                .get_all("vary")
                .iter()
                .map(|v| v.as_bytes())
                .collect();
            assert_eq!(encoding, expected, "HTTP/2 {why}");
            assert_eq!(vary, [&b"Origin"[..], b"Accept-Encoding"], "HTTP/2 {why}");
            let body = expected.map_or(data.clone(), |e| decode(e, &data));
            assert_eq!(body, big_text(), "HTTP/2 {why}");
        }
    }
}

#[tokio::test]
async fn shutdown_closes_idle_keepalive_connections_and_lets_requests_finish() {
    // A backend that takes a moment to answer.
    let slow = Backend::start(|mut stream| async move {
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ndone")
            .await;
    })
    .await;
    let mut proxy = Proxy::start(&single_pool(&[slow.addr], "", ""));
    let addr = proxy.addr("l7");
    // One idle keep-alive client (it has had a response), one connected that has not sent its
    // first request yet, and one with a request in flight.
    let mut idle = HttpClient::connect(addr).await;
    assert_eq!(idle.get("/first", "").await.status, 200);
    let mut fresh = HttpClient::connect(addr).await;
    // And one that never sends a request (browsers open some ahead of need).
    let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut busy = HttpClient::connect(addr).await;
    busy.send(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n").await;
    // Let the request reach the backend, and every connection be accepted, before the shutdown.
    eventually("request forwarded", || slow.accepted() == 2).await;
    proxy.accepted("l7", 4).await;
    proxy.shutdown.cancel();
    // The connection accepted before the shutdown gets its first request answered.
    fresh.send(b"GET /late HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let reply = fresh
        .reply()
        .await
        .expect("the accepted connection is served");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("connection"), Some("close"));
    let reply = busy.reply().await.expect("the request in flight completes");
    assert_eq!((reply.status, reply.text().as_str()), (200, "done"));
    assert_eq!(reply.header("connection"), Some("close"));
    // The idle one gets a moment for its next request, then is closed; so does the silent one,
    // for its first.
    assert!(idle.closed().await, "the idle connection is closed");
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(PATIENCE, silent.read(&mut buf))
        .await
        .expect("closed by the drain");
    assert!(matches!(read, Ok(0)), "{read:?}");
    // Nothing is left for the drain deadline (30 s by default) to cut.
    assert_eq!(proxy.drained().await, 0);
}

#[tokio::test]
async fn a_request_that_reached_an_idle_connection_as_the_drain_began_is_answered() {
    let backend = http_backend("b").await;
    let mut proxy = Proxy::start(&single_pool(
        &[backend.addr],
        "park_idle_after = \"off\"",
        "",
    ));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    assert_eq!(client.get("/first", "").await.status, 200);
    // The next request is in the proxy's socket buffer when the drain starts, before the
    // runtime has reported it readable: the test's runtime has one thread, and nothing else
    // runs between these lines. It was sent on an open connection before the shutdown, so it
    // is answered (and told to close), not dropped with the idle connection.
    client
        .send(b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n")
        .await;
    proxy.shutdown.cancel();
    let reply = client.reply().await.expect("answered, not dropped");
    assert_eq!(reply.status, 200);
    assert!(reply.text().contains("GET /second"), "{}", reply.text());
    assert_eq!(reply.header("connection"), Some("close"));
    assert!(client.closed().await);
    assert_eq!(proxy.drained().await, 0);
}

#[tokio::test]
async fn a_redirect_answered_while_shutting_down_says_close() {
    let backend = http_backend("b").await;
    let mut proxy = Proxy::start(&single_pool(
        &[backend.addr],
        r#"routes = [{ match = { path = "/old" }, redirect = { to = "/new", status = 302 } }]"#,
        "",
    ));
    let addr = proxy.addr("l7");
    // Accepted before the shutdown, it sends its request after it.
    let mut client = HttpClient::connect(addr).await;
    proxy.accepted("l7", 1).await;
    proxy.shutdown.cancel();
    client.send(b"GET /old HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let reply = client.reply().await.expect("answered");
    assert_eq!(reply.status, 302);
    // Like any other response during the drain: the client must not send another request on
    // a connection the proxy is about to close.
    assert_eq!(reply.header("connection"), Some("close"));
    assert!(client.closed().await);
    assert_eq!(proxy.drained().await, 0);
}

/// A backend that reports each request head it reads, then never answers (it reports its
/// connection closing instead).
async fn silent_backend() -> (Backend, tokio::sync::mpsc::UnboundedReceiver<&'static str>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = Backend::start(move |mut stream| {
        let tx = tx.clone();
        async move {
            let mut buf = Vec::new();
            if read_until(&mut stream, &mut buf, b"\r\n\r\n")
                .await
                .is_some()
            {
                let _ = tx.send("request");
                let _ = stream.read_to_end(&mut buf).await;
                let _ = tx.send("closed");
            }
        }
    })
    .await;
    (backend, rx)
}

/// Opens an HTTP/2 connection to `proxy`'s `l7` listener, sends a request that `backend`
/// (a [`silent_backend`]) never answers, and resets it once the backend has it. Returns the
/// task driving the client connection (it ends when the proxy closes the connection).
async fn reset_before_response(
    proxy: &Proxy,
    events: &mut tokio::sync::mpsc::UnboundedReceiver<&'static str>,
) -> tokio::task::JoinHandle<Result<(), h2::Error>> {
    let tcp = tokio::net::TcpStream::connect(proxy.addr("l7"))
        .await
        .expect("connect");
    let (mut sender, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let connection = tokio::spawn(connection);
    let request = http::Request::builder()
        .uri("http://t/slow")
        .body(())
        .expect("request");
    let (response, mut stream) = sender.send_request(request, true).expect("send");
    assert_eq!(
        tokio::time::timeout(PATIENCE, events.recv()).await,
        Ok(Some("request"))
    );
    // The client gives up (a gRPC deadline, say).
    stream.send_reset(h2::Reason::CANCEL);
    drop(response);
    connection
}

#[tokio::test]
async fn an_http2_stream_reset_before_its_response_is_logged_as_499() {
    let (backend, mut events) = silent_backend().await;
    let log = fresh_log("h2reset");
    let access_log = json_access_log(&log);
    let proxy = Proxy::start(&single_pool(&[backend.addr], &access_log, ""));
    let _connection = reset_before_response(&proxy, &mut events).await;
    // The proxy lets go of the backend, and logs the stream.
    assert_eq!(
        tokio::time::timeout(PATIENCE, events.recv()).await,
        Ok(Some("closed"))
    );
    eventually("a line for the reset stream", || {
        log_text(&log).contains("/slow")
    })
    .await;
    let line: serde_json::Value = serde_json::from_str(log_text(&log).trim()).expect("json");
    assert_eq!(line["status"], 499);
    assert_eq!(line["backend"], backend.addr.to_string());
}

/// Sends `request` from an HTTP/1.1 client of its own, waits until the backend reports it
/// (`events` says `request`), then leaves: for `close` "half-close" by closing its sending side
/// only, which to the proxy, as to NGINX, is the client gone, and seeing the proxy close
/// without a byte; for any other `close` by closing its socket.
async fn leaves_once_it_reached_the_backend(
    proxy: &Proxy,
    events: &mut tokio::sync::mpsc::UnboundedReceiver<&'static str>,
    request: &str,
    close: &str,
) {
    let mut client = tokio::net::TcpStream::connect(proxy.addr("l7"))
        .await
        .expect("connect");
    client.write_all(request.as_bytes()).await.expect("write");
    assert_eq!(
        tokio::time::timeout(PATIENCE, events.recv()).await,
        Ok(Some("request")),
        "{close}"
    );
    if close == "half-close" {
        client.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        let read = tokio::time::timeout(PATIENCE, client.read_to_end(&mut rest)).await;
        assert!(
            matches!(read, Ok(Ok(_)) | Ok(Err(_))),
            "{close}: not closed"
        );
        assert!(rest.is_empty(), "{close}: {rest:?}");
    }
}

#[tokio::test]
async fn an_http11_client_that_leaves_before_its_response_frees_the_backend_and_is_logged_as_499() {
    let (backend, mut events) = silent_backend().await;
    let log = fresh_log("h1gone");
    let access_log = json_access_log(&log);
    // A response timeout far beyond the test's patience: only the client's leaving can end it.
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        &access_log,
        "response_timeout = \"5m\"",
    ));
    for close in ["close", "half-close"] {
        let request = "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n";
        leaves_once_it_reached_the_backend(&proxy, &mut events, request, close).await;
        assert_eq!(
            tokio::time::timeout(PATIENCE, events.recv()).await,
            Ok(Some("closed")),
            "{close}: the backend connection is let go"
        );
    }
    for line in json_lines(&log, 2).await {
        assert_eq!(line["status"], 499);
    }
}

/// An HTTP/2 backend that never answers: it reports each stream it gets (`request`), then how
/// that stream ends (`reset` when the proxy resets it, `failed` when its connection fails).
async fn silent_h2_backend() -> (Backend, tokio::sync::mpsc::UnboundedReceiver<&'static str>) {
    let (events, seen) = tokio::sync::mpsc::unbounded_channel();
    let backend = h2_backend_with(move |request, mut respond| {
        let events = events.clone();
        async move {
            let _held = request;
            let _ = events.send("request");
            let reset = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
            let _ = events.send(if reset.is_ok() { "reset" } else { "failed" });
        }
    })
    .await;
    (backend, seen)
}

#[tokio::test]
async fn an_http11_client_that_leaves_before_an_http2_backends_response_cancels_its_stream_and_is_logged_as_499()
 {
    let (backend, mut events) = silent_h2_backend().await;
    let log = fresh_log("h1gone-h2");
    // A response timeout far beyond the test's patience: only the client's leaving can end it.
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        &json_access_log(&log),
        "upstream_protocol = \"h2\"\nresponse_timeout = \"5m\"",
    ));
    let cases = [
        ("close", "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("half-close", "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"),
        // With a body, all of it sent before the client leaves.
        (
            "close after a body",
            "POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        ),
    ];
    for (close, request) in cases {
        leaves_once_it_reached_the_backend(&proxy, &mut events, request, close).await;
        assert_eq!(
            tokio::time::timeout(PATIENCE, events.recv()).await,
            Ok(Some("reset")),
            "{close}: the backend's stream is cancelled"
        );
    }
    for line in json_lines(&log, cases.len()).await {
        assert_eq!(line["status"], 499);
    }
}

#[tokio::test]
async fn a_client_that_closed_only_its_sending_side_gets_an_http2_backends_answer_with_abort_on_close_off()
 {
    // The backend answers only once it has the request, after the client's end of stream.
    let release = Arc::new(tokio::sync::Notify::new());
    let (events, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let backend = {
        let release = Arc::clone(&release);
        h2_backend_with(move |request, mut respond| {
            let release = Arc::clone(&release);
            let events = events.clone();
            async move {
                let _held = request;
                let _ = events.send("request");
                release.notified().await;
                if let Ok(mut send) = respond.send_response(h2_ok(), false) {
                    let _ = send.send_data(bytes::Bytes::from_static(b"late"), true);
                }
            }
        })
        .await
    };
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        "abort_on_close = false",
        "upstream_protocol = \"h2\"",
    ));
    let mut client = tokio::net::TcpStream::connect(proxy.addr("l7"))
        .await
        .expect("connect");
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    client.shutdown().await.expect("shutdown");
    assert_eq!(
        tokio::time::timeout(PATIENCE, seen.recv()).await,
        Ok(Some("request"))
    );
    release.notify_one();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, client.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("late"),
        "{answer}"
    );
}

#[tokio::test]
async fn a_client_that_closed_only_its_sending_side_is_answered_with_abort_on_close_off() {
    // The backend answers only once the client's end of stream has surely reached the proxy.
    let release = Arc::new(tokio::sync::Notify::new());
    let backend = {
        let release = Arc::clone(&release);
        Backend::start(move |mut stream| {
            let release = Arc::clone(&release);
            async move {
                let mut buf = Vec::new();
                for answer in ["first", "second"] {
                    buf.clear();
                    if read_until(&mut stream, &mut buf, b"\r\n\r\n")
                        .await
                        .is_none()
                    {
                        return;
                    }
                    if answer == "first" {
                        release.notified().await;
                    }
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                }
            }
        })
        .await
    };
    let proxy = Proxy::start(&single_pool(&[backend.addr], "abort_on_close = false", ""));
    let mut client = tokio::net::TcpStream::connect(proxy.addr("l7"))
        .await
        .expect("connect");
    client
        .write_all(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    client.shutdown().await.expect("shutdown");
    eventually("the first request at the backend", || {
        backend.accepted() == 1
    })
    .await;
    release.notify_one();
    let mut answers = Vec::new();
    tokio::time::timeout(PATIENCE, client.read_to_end(&mut answers))
        .await
        .expect("answers in time")
        .expect("read");
    let answers = String::from_utf8_lossy(&answers);
    assert!(
        answers.contains("first") && answers.ends_with("second"),
        "{answers}"
    );
}

#[tokio::test]
async fn an_http2_connection_closes_when_idle_after_a_stream_reset_before_its_response() {
    let (backend, mut events) = silent_backend().await;
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        "keepalive_timeout = \"300ms\"",
        "",
    ));
    let connection = reset_before_response(&proxy, &mut events).await;
    // No stream left: closed after the keep-alive timeout, as without the reset.
    let closed = tokio::time::timeout(PATIENCE, connection).await;
    assert!(closed.is_ok(), "the idle connection was never closed");
}

/// A backend connect that fails because this process is out of descriptors says nothing of the
/// backend: it must not be counted against it, or a burst of clients would eject every healthy
/// backend of the pool and leave it with nothing to serve from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_is_not_blamed_on_the_backends() {
    // The backends hold every answer until released, so each client keeps a backend
    // connection of its own open meanwhile.
    let (release, released) = tokio::sync::watch::channel(false);
    let held = move |name: &'static str| {
        let released = released.clone();
        Backend::start(move |stream| {
            let mut released = released.clone();
            async move {
                let _ = released.wait_for(|r| *r).await;
                serve_http(stream, name).await;
            }
        })
    };
    let (a, b) = (held("a").await, held("b").await);
    // One failure ejects a backend, and every backend may be ejected.
    let config = single_pool(
        &[a.addr, b.addr],
        "",
        "outlier = { consecutive_failures = 1, max_ejected_percent = 100 }",
    );
    let running = spawn_with_fd_limit("http-blame", &config, DESCRIPTORS).await;
    let addr = running.addr;
    // A client answered before the backends are released is one whose backend connection
    // found no descriptor.
    let (early_tx, mut early) = tokio::sync::mpsc::unbounded_channel();
    let clients: Vec<_> = (0..30)
        .map(|_| {
            let early_tx = early_tx.clone();
            tokio::spawn(async move {
                let mut client = HttpClient::connect(addr).await;
                client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
                let reply = tokio::time::timeout(PATIENCE, client.reply()).await;
                if let Ok(Some(reply)) = &reply {
                    let _ = early_tx.send(reply.status);
                }
            })
        })
        .collect();
    let status = tokio::time::timeout(PATIENCE, early.recv())
        .await
        .expect("a client found the proxy out of descriptors")
        .expect("status");
    assert_eq!(status, 503);
    // Every answer goes out now, and the clients leave.
    release.send(true).expect("backends listen");
    for c in clients {
        c.await.expect("client");
    }
    // Descriptors come back, and the backends, which did nothing wrong, still serve.
    served_again(addr).await;
}

/// Waits until a client of `addr` is served a 200 again, every try being answered (a 503 while
/// descriptors are still short).
async fn served_again(addr: std::net::SocketAddr) {
    eventually_async("a client is served again", || async move {
        let mut client = HttpClient::connect(addr).await;
        client.get("/", "").await.status == 200
    })
    .await;
}

/// How many descriptors the binary runs with in the tests of what happens when it runs out.
const DESCRIPTORS: usize = 40;

/// Has idle clients take every descriptor `running` (started with [`DESCRIPTORS`] of them) has
/// left, those it cannot accept waiting in the listen queue, and returns them once it is out.
async fn out_of_descriptors(running: &Running) -> Vec<tokio::net::TcpStream> {
    let pid = running.child.id().expect("running");
    let mut idle = Vec::new();
    for _ in 0..DESCRIPTORS {
        idle.push(
            tokio::net::TcpStream::connect(running.addr)
                .await
                .expect("connect"),
        );
    }
    // Counted below the limit only: a descriptor the child inherited by accident (one another
    // test of this process opened without close-on-exec as the child was spawned) may carry a
    // number above it, and would make the count reach the limit with one slot still free.
    eventually("the proxy out of descriptors", || {
        std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse::<usize>().ok())
                .filter(|&fd| fd < DESCRIPTORS)
                .count()
        }) >= DESCRIPTORS
    })
    .await;
    idle
}

/// The same for HTTP/2 backends, whose connection is opened once and shared: a connect that
/// finds no descriptor left is a 503, not the backend's failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_is_not_blamed_on_http2_backends() {
    let (a, b) = (h2_backend("a").await, h2_backend("b").await);
    let config = single_pool(
        &[a.addr, b.addr],
        "",
        "upstream_protocol = \"h2\"\noutlier = { consecutive_failures = 1, max_ejected_percent = 100 }",
    );
    let running = spawn_with_fd_limit("h2-blame", &config, DESCRIPTORS).await;
    let addr = running.addr;
    let mut first = HttpClient::connect(addr).await;
    let idle = out_of_descriptors(&running).await;
    first.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let reply = tokio::time::timeout(PATIENCE, first.reply())
        .await
        .expect("answered")
        .expect("reply");
    assert_eq!(reply.status, 503);
    drop(idle);
    served_again(addr).await;
}

#[tokio::test]
async fn running_out_of_descriptors_is_not_blamed_on_the_backends_of_http2_clients() {
    let (a, b) = (http_backend("a").await, http_backend("b").await);
    let config = single_pool(
        &[a.addr, b.addr],
        "",
        "outlier = { consecutive_failures = 1, max_ejected_percent = 100 }",
    );
    let running = spawn_with_fd_limit("h2-client-blame", &config, DESCRIPTORS).await;
    let addr = running.addr;
    let mut sender = h2_connect(addr).await;
    let idle = out_of_descriptors(&running).await;
    let status = |sender: &mut h2::client::SendRequest<bytes::Bytes>| {
        let (response, _) = sender
            .send_request(h2_get("GET", "/", &[]), true)
            .expect("send");
        async move {
            tokio::time::timeout(PATIENCE, response)
                .await
                .expect("answered")
                .expect("response")
                .status()
        }
    };
    // Neither backend is at fault: not a 502, and neither is ejected.
    assert_eq!(status(&mut sender).await, 503);
    assert_eq!(status(&mut sender).await, 503);
    drop(idle);
    let served = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    eventually_async("both backends serve again", || {
        let mut sender = sender.clone();
        let served = std::sync::Arc::clone(&served);
        async move {
            let (response, _) = sender
                .send_request(h2_get("GET", "/", &[]), true)
                .expect("send");
            let Ok(Ok(response)) = tokio::time::timeout(PATIENCE, response).await else {
                return false;
            };
            let mut served = served.lock().expect("lock");
            if let Some(name) = response.headers().get("x-backend") {
                served.push(name.as_bytes().to_vec());
            }
            served.contains(&b"a".to_vec()) && served.contains(&b"b".to_vec())
        }
    })
    .await;
}

/// An HTTP/2 request for `path` with `fields` (a name may repeat).
fn h2_get(method: &str, path: &str, fields: &[(&str, &str)]) -> http::Request<()> {
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("http://x{path}"));
    for (name, value) in fields {
        request = request.header(*name, *value);
    }
    request.body(()).expect("request")
}

#[tokio::test]
async fn a_compressed_body_cut_short_of_its_length_never_looks_complete() {
    let backend = Backend::start(|mut stream| async move {
        let mut head = Vec::new();
        if read_until(&mut stream, &mut head, b"\r\n\r\n")
            .await
            .is_none()
        {
            return;
        }
        let body = big_text();
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let _ = stream.write_all(head.as_bytes()).await;
        // Half of it, then the backend goes away.
        let _ = stream.write_all(&body[..body.len() / 2]).await;
    })
    .await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], ALL_ALGORITHMS, ""));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    client
        .send(b"GET / HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
        .await;
    ends_without_its_last_chunk(&mut client).await;
    let mut old = HttpClient::connect(proxy.addr("l7")).await;
    old.send(b"GET / HTTP/1.0\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
        .await;
    ends_with_a_reset(&mut old).await;
    let mut sender = h2_connect(proxy.addr("l7")).await;
    for accept in ["gzip", "identity"] {
        let request = h2_get("GET", "/", &[("accept-encoding", accept)]);
        let response = h2_head(&mut sender, request).await;
        ends_in_an_error(response.into_body()).await;
    }
}

#[tokio::test]
async fn connection_specific_trailers_of_an_http11_backend_are_dropped_for_http2_clients() {
    let backend = canned_backend(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\nx-checksum: ok\r\nkeep-alive: timeout=5\r\nconnection: x-checksum\r\n\r\n",
    )
    .await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
    let mut sender = h2_connect(proxy.addr("l7")).await;
    for _ in 0..2 {
        let (head, data, trailers) = h2_exchange(&mut sender, h2_get("GET", "/", &[])).await;
        assert_eq!(head.status, 200);
        assert_eq!(data, b"hello");
        let trailers = trailers.expect("trailers");
        assert!(trailers.get("keep-alive").is_none(), "{trailers:?}");
        assert!(trailers.get("connection").is_none(), "{trailers:?}");
    }
}

#[tokio::test]
async fn connection_specific_trailers_of_an_http11_client_are_dropped_for_http2_backends() {
    let backend = h2_backend("h2").await;
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        "",
        "upstream_protocol = \"h2\"",
    ));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    client
        .send(b"POST /svc HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-sum: 1\r\nkeep-alive: timeout=5\r\n\r\n")
        .await;
    let reply = client.reply().await.expect("a reply");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "h2:hello");
}

/// A proxy in front of [`content_backend`] (`h2` false) or [`h2_content_backend`], compressing
/// with every algorithm.
async fn compressing_proxy(h2: bool) -> (Proxy, Backend) {
    let (backend, pool) = if h2 {
        (h2_content_backend().await, "upstream_protocol = \"h2\"")
    } else {
        (content_backend().await, "")
    };
    let proxy = Proxy::start(&single_pool(&[backend.addr], ALL_ALGORITHMS, pool));
    (proxy, backend)
}

#[tokio::test]
async fn list_fields_sent_over_several_lines_are_read_as_one_list() {
    for h2 in [false, true] {
        let (proxy, _backend) = compressing_proxy(h2).await;
        let mut client = HttpClient::connect(proxy.addr("l7")).await;
        let mut sender = h2_connect(proxy.addr("l7")).await;
        // Accept-Encoding in two lines is one list: gzip has the higher q-value.
        let reply = client
            .get(
                "/big.txt",
                "Accept-Encoding: br;q=0.5\r\nAccept-Encoding: gzip\r\n",
            )
            .await;
        assert_eq!(reply.header("content-encoding"), Some("gzip"), "h2 {h2}");
        assert_eq!(decode("gzip", &reply.body), big_text(), "h2 {h2}");
        let request = h2_get(
            "GET",
            "/big.txt",
            &[("accept-encoding", "br;q=0.5"), ("accept-encoding", "gzip")],
        );
        let (head, data, _) = h2_exchange(&mut sender, request).await;
        assert_eq!(
            head.headers.get("content-encoding").map(|v| v.as_bytes()),
            Some(&b"gzip"[..]),
            "h2 {h2}"
        );
        assert_eq!(decode("gzip", &data), big_text(), "h2 {h2}");
        // So is a response's Cache-Control: its second line forbids transformation.
        let reply = client
            .get("/no-transform", "Accept-Encoding: gzip\r\n")
            .await;
        assert_eq!(reply.header("content-encoding"), None, "h2 {h2}");
        assert_eq!(reply.body, big_text(), "h2 {h2}");
        let request = h2_get("GET", "/no-transform", &[("accept-encoding", "gzip")]);
        let (head, data, _) = h2_exchange(&mut sender, request).await;
        assert!(head.headers.get("content-encoding").is_none(), "h2 {h2}");
        assert_eq!(data, big_text(), "h2 {h2}");
    }
}

#[tokio::test]
async fn forwarding_fields_sent_over_several_lines_are_all_extended() {
    let h1 = http_backend("b").await;
    let h2 = h2_echo_backend().await;
    let proxy = Proxy::start(&h1_and_h2_paths(
        h1.addr,
        h2.addr,
        "trusted_proxies = [\"127.0.0.0/8\"]\nforwarded_header = true",
    ));
    let chain = "x-forwarded-for: 203.0.113.7, 198.51.100.2, 127.0.0.1\n";
    let forwarded = "forwarded: for=203.0.113.7, for=198.51.100.2, for=127.0.0.1;";
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    for path in ["/a", "/grpc/a"] {
        let seen = client
            .get(
                path,
                "X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: 198.51.100.2\r\n\
                 Forwarded: for=203.0.113.7\r\nForwarded: for=198.51.100.2\r\n",
            )
            .await
            .text()
            .to_ascii_lowercase();
        assert!(seen.contains(chain), "HTTP/1.1 {path}: {seen}");
        assert!(seen.contains(forwarded), "HTTP/1.1 {path}: {seen}");
    }
    let mut sender = h2_connect(proxy.addr("l7")).await;
    for path in ["/a", "/grpc/a"] {
        let request = h2_get(
            "GET",
            path,
            &[
                ("x-forwarded-for", "203.0.113.7"),
                ("x-forwarded-for", "198.51.100.2"),
                ("forwarded", "for=203.0.113.7"),
                ("forwarded", "for=198.51.100.2"),
            ],
        );
        let (_, data, _) = h2_exchange(&mut sender, request).await;
        let seen = String::from_utf8_lossy(&data).to_ascii_lowercase();
        assert!(seen.contains(chain), "HTTP/2 {path}: {seen}");
        assert!(seen.contains(forwarded), "HTTP/2 {path}: {seen}");
    }
}

#[tokio::test]
async fn a_not_modified_answer_carries_the_validator_and_vary_of_the_compressed_answer() {
    for h2 in [false, true] {
        let (proxy, _backend) = compressing_proxy(h2).await;
        let mut client = HttpClient::connect(proxy.addr("l7")).await;
        let mut sender = h2_connect(proxy.addr("l7")).await;
        // The compressed 200 has a weak validator; the 304 that confirms it must name the same
        // one, or a cache cannot match the two.
        let reply = client.get("/big.txt", "Accept-Encoding: gzip\r\n").await;
        assert_eq!(reply.header("etag"), Some("W/\"v1\""), "h2 {h2}");
        for (accept, etag) in [("gzip", "W/\"v1\""), ("identity", "\"v1\"")] {
            let why = format!("h2 {h2}, accepting {accept}");
            let reply = client
                .get(
                    "/not-modified",
                    &format!("Accept-Encoding: {accept}\r\nIf-None-Match: {etag}\r\n"),
                )
                .await;
            assert_eq!(reply.status, 304, "{why}");
            assert_eq!(reply.header("etag"), Some(etag), "{why}");
            assert_eq!(reply.header("vary"), Some("Accept-Encoding"), "{why}");
            let request = h2_get(
                "GET",
                "/not-modified",
                &[("accept-encoding", accept), ("if-none-match", etag)],
            );
            let (head, _, _) = h2_exchange(&mut sender, request).await;
            assert_eq!(head.status, 304, "HTTP/2 client, {why}");
            let header = |name: &str| head.headers.get(name).map(|v| v.as_bytes().to_vec());
            assert_eq!(header("etag"), Some(etag.as_bytes().to_vec()), "{why}");
            assert_eq!(header("vary"), Some(b"Accept-Encoding".to_vec()), "{why}");
        }
    }
}

#[tokio::test]
async fn a_head_answer_has_the_fields_the_compressed_get_answer_has() {
    for h2 in [false, true] {
        let (proxy, _backend) = compressing_proxy(h2).await;
        let mut client = HttpClient::connect(proxy.addr("l7")).await;
        let mut sender = h2_connect(proxy.addr("l7")).await;
        for (accept, encoding) in [("gzip", Some("gzip")), ("identity", None)] {
            let why = format!("h2 {h2}, accepting {accept}");
            let head = client
                .head_of(
                    format!(
                        "HEAD /big.txt HTTP/1.1\r\nHost: x\r\nAccept-Encoding: {accept}\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await;
            let has = |line: &str| head.split("\r\n").any(|l| l == line);
            assert!(head.starts_with("http/1.1 200"), "{why}: {head}");
            assert!(has("vary: accept-encoding"), "{why}: {head}");
            let length = format!("content-length: {}", big_text().len());
            match encoding {
                Some(encoding) => {
                    assert!(
                        has(&format!("content-encoding: {encoding}")),
                        "{why}: {head}"
                    );
                    assert!(has("etag: w/\"v1\""), "{why}: {head}");
                    assert!(!head.contains("content-length"), "{why}: {head}");
                    assert!(!head.contains("accept-ranges"), "{why}: {head}");
                }
                None => {
                    assert!(!head.contains("content-encoding"), "{why}: {head}");
                    assert!(has("etag: \"v1\""), "{why}: {head}");
                    assert!(has(&length), "{why}: {head}");
                }
            }
            // The connection goes on: nothing of a body was sent.
            let reply = client.get("/small.txt", "").await;
            assert_eq!(reply.body, b"small", "{why}");

            let request = h2_get("HEAD", "/big.txt", &[("accept-encoding", accept)]);
            let (head, data, _) = h2_exchange(&mut sender, request).await;
            assert!(data.is_empty(), "{why}");
            let header = |name: &str| {
                head.headers
                    .get(name)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            };
            assert_eq!(
                header("content-encoding").as_deref(),
                encoding,
                "HTTP/2 {why}"
            );
            assert_eq!(
                header("vary").as_deref(),
                Some("Accept-Encoding"),
                "HTTP/2 {why}"
            );
            if encoding.is_some() {
                assert_eq!(header("etag").as_deref(), Some("W/\"v1\""), "HTTP/2 {why}");
                assert_eq!(header("content-length"), None, "HTTP/2 {why}");
                assert_eq!(header("accept-ranges"), None, "HTTP/2 {why}");
            } else {
                assert_eq!(header("etag").as_deref(), Some("\"v1\""), "HTTP/2 {why}");
            }
        }
    }
}

#[tokio::test]
async fn an_answer_with_both_content_length_and_chunked_is_a_502_and_its_connection_is_dropped() {
    // Framed one way it ends after "0", the other way it carries a second answer.
    let backend = canned_backend(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
          HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled",
    )
    .await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    let mut sender = h2_connect(proxy.addr("l7")).await;
    for _ in 0..2 {
        let reply = client.get("/", "").await;
        assert_eq!(reply.status, 502);
        assert!(!reply.text().contains("smuggled"), "{}", reply.text());
        let (status, _, body) = h2_request(&mut sender, "GET", "http://x/", None).await;
        assert_eq!(status, 502);
        assert!(!String::from_utf8_lossy(&body).contains("smuggled"));
    }
}

#[tokio::test]
async fn the_forwarded_field_is_the_proxys_on_every_path() {
    let h1 = http_backend("b").await;
    let h2 = h2_echo_backend().await;
    // A client outside `trusted_proxies` claims to have been forwarded: with the key, the
    // backend sees the proxy's element alone; without it, no Forwarded at all (as it sees no
    // X-Forwarded-For but the proxy's).
    for (extra, expected) in [
        (
            "forwarded_header = true",
            Some("forwarded: for=127.0.0.1;proto=http;host=\"edge.example\"\n"),
        ),
        ("", None),
    ] {
        let proxy = Proxy::start(&h1_and_h2_paths(h1.addr, h2.addr, extra));
        let check = |seen: &str, why: &str| {
            let seen = seen.to_ascii_lowercase();
            assert!(!seen.contains("203.0.113.7"), "{why}: {seen}");
            match expected {
                Some(field) => assert!(seen.contains(field), "{why}: {seen}"),
                None => assert!(!seen.contains("forwarded:"), "{why}: {seen}"),
            }
        };
        let mut client = HttpClient::connect(proxy.addr("l7")).await;
        let mut sender = h2_connect(proxy.addr("l7")).await;
        for path in ["/a", "/grpc/a"] {
            client
                .send(
                    format!(
                        "GET {path} HTTP/1.1\r\nHost: edge.example\r\nForwarded: for=203.0.113.7\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await;
            let reply = client.reply().await.expect("a reply");
            check(&reply.text(), &format!("HTTP/1.1 {path} {extra:?}"));
            let request = http::Request::builder()
                .uri(format!("http://edge.example{path}"))
                .header("forwarded", "for=203.0.113.7")
                .body(())
                .expect("request");
            let (_, data, _) = h2_exchange(&mut sender, request).await;
            check(
                &String::from_utf8_lossy(&data),
                &format!("HTTP/2 {path} {extra:?}"),
            );
        }
    }
}

#[tokio::test]
async fn the_etag_a_rule_leaves_is_the_one_compression_weakens_on_every_path() {
    let h1 = content_backend().await;
    let h2 = h2_content_backend().await;
    for (rule, expected) in [
        (
            r#"response_headers = { set = { ETag = '"r1"' } }"#,
            Some("W/\"r1\""),
        ),
        (r#"response_headers = { remove = ["ETag"] }"#, None),
    ] {
        for (backend, pool) in [(h1.addr, ""), (h2.addr, "upstream_protocol = \"h2\"")] {
            let why = format!("{rule} {pool:?}");
            let rules = format!("{ALL_ALGORITHMS}\n{rule}");
            let proxy = Proxy::start(&single_pool(&[backend], &rules, pool));
            let mut client = HttpClient::connect(proxy.addr("l7")).await;
            let reply = client.get("/big.txt", "Accept-Encoding: gzip\r\n").await;
            assert_eq!(reply.header("content-encoding"), Some("gzip"), "{why}");
            let etags: Vec<&str> = reply
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case("etag"))
                .map(|(_, v)| v.as_str())
                .collect();
            assert_eq!(
                etags,
                expected.into_iter().collect::<Vec<_>>(),
                "HTTP/1.1 {why}"
            );
            let mut sender = h2_connect(proxy.addr("l7")).await;
            let request = h2_get("GET", "/big.txt", &[("accept-encoding", "gzip")]);
            let (head, _, _) = h2_exchange(&mut sender, request).await;
            let etags: Vec<&[u8]> = head
                .headers
                .get_all("etag")
                .iter()
                .map(|v| v.as_bytes())
                .collect();
            let wanted: Vec<&[u8]> = expected.into_iter().map(str::as_bytes).collect();
            assert_eq!(etags, wanted, "HTTP/2 {why}");
        }
    }
}

/// How a test client speaks to the proxy in [`local_answers_carry_the_request_id_and_the_header_rules`].
#[derive(Clone, Copy, Debug, PartialEq)]
enum Speech {
    Http11,
    Http11Tls,
    H2c,
    H2Tls,
}

impl Speech {
    fn tls(self) -> bool {
        matches!(self, Speech::Http11Tls | Speech::H2Tls)
    }

    fn h2(self) -> bool {
        matches!(self, Speech::H2c | Speech::H2Tls)
    }
}

/// One answer the proxy gives itself, and what it must carry.
struct LocalCase {
    /// The kind of listener asked: `main` (routes), `denied` (refuses everyone), `limited`
    /// (one request a day), `redirecting` (a listener-wide redirect).
    listener: &'static str,
    method: &'static str,
    path: &'static str,
    /// Extra request fields.
    fields: &'static [(&'static str, &'static str)],
    /// A declared body of this many bytes, sent whole.
    body: usize,
    /// A Host that is no host: refused before anything else reads the request.
    bad_host: bool,
    /// Sent twice, the second answer checked (the first may pass a limit).
    twice: bool,
    /// The status the proxy answers with (a gRPC client over HTTP/2 gets it as grpc-message).
    status: u16,
    /// Whether the route's rules apply: the route was chosen before the answer.
    route: bool,
}

/// The answer as a test client sees it, whatever the protocol.
struct LocalAnswer {
    status: u16,
    fields: Vec<(String, String)>,
}

impl LocalAnswer {
    fn all(&self, name: &str) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn one(&self, name: &str) -> Option<&str> {
        self.all(name).first().copied()
    }
}

/// Sends `case` once over `speech` to `addr`, carrying `id` as X-Request-ID when given.
async fn ask_locally(
    speech: Speech,
    addr: std::net::SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    case: &LocalCase,
    id: Option<&str>,
) -> LocalAnswer {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    if speech.tls() {
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let stream = tokio::time::timeout(
            PATIENCE,
            tokio_rustls::TlsConnector::from(Arc::clone(tls)).connect(name, tcp),
        )
        .await
        .expect("handshake in time")
        .expect("handshake");
        if speech.h2() {
            ask_h2(stream, case, id).await
        } else {
            ask_h1(stream, case, id).await
        }
    } else if speech.h2() {
        ask_h2(tcp, case, id).await
    } else {
        ask_h1(tcp, case, id).await
    }
}

async fn ask_h1<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    case: &LocalCase,
    id: Option<&str>,
) -> LocalAnswer {
    let host = if case.bad_host { "a b" } else { "svc" };
    let mut request = format!("{} {} HTTP/1.1\r\nHost: {host}\r\n", case.method, case.path);
    for (name, value) in case.fields {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(id) = id {
        request.push_str(&format!("X-Request-ID: {id}\r\n"));
    }
    if case.body > 0 {
        request.push_str(&format!("Content-Length: {}\r\n", case.body));
    }
    request.push_str("\r\n");
    request.push_str(&"x".repeat(case.body));
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut buf = Vec::new();
    let reply = tokio::time::timeout(PATIENCE, read_reply(&mut stream, &mut buf))
        .await
        .expect("an answer in time")
        .expect("an answer");
    LocalAnswer {
        status: reply.status,
        fields: reply.headers,
    }
}

async fn ask_h2<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    case: &LocalCase,
    id: Option<&str>,
) -> LocalAnswer {
    let (mut sender, connection) = h2::client::handshake(stream).await.expect("h2 handshake");
    tokio::spawn(connection);
    let mut request = http::Request::builder()
        .method(case.method)
        .uri(format!("http://svc{}", case.path));
    if case.bad_host {
        request = request.header("host", "a b");
    }
    for (name, value) in case.fields {
        request = request.header(*name, *value);
    }
    if let Some(id) = id {
        request = request.header("x-request-id", id);
    }
    if case.body > 0 {
        request = request.header("content-length", case.body.to_string());
    }
    let request = request.body(()).expect("request");
    let (response, mut stream) = sender.send_request(request, case.body == 0).expect("send");
    if case.body > 0 {
        // The proxy may answer before taking it.
        let _ = stream.send_data(bytes::Bytes::from(vec![b'x'; case.body]), true);
    }
    let response = tokio::time::timeout(PATIENCE, response)
        .await
        .expect("an answer in time")
        .expect("an answer");
    // A gRPC client is told the status in gRPC's terms.
    let status = match response.headers().get("grpc-message") {
        Some(message) => message
            .to_str()
            .ok()
            .and_then(|m| m.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or(0),
        None => response.status().as_u16(),
    };
    LocalAnswer {
        status,
        fields: response
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    }
}

#[tokio::test]
async fn local_answers_carry_the_request_id_and_the_header_rules() {
    // Every answer the proxy gives itself, over HTTP/1.1 and HTTP/2, plain and over TLS: it
    // carries the request's id (the client's, else a fresh one) as its access log line does,
    // and the listener's response rules; the route's too once the route was chosen. The
    // framing stays the proxy's own.
    let up = http_backend("up").await;
    let silent = Backend::start(|mut stream| async move {
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink).await;
    })
    .await;
    let dead = dead_addr().await;
    let dir = temp_dir_for("local-answers");
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).expect("write cert");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).expect("root");
    let mut client_tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![b"h2".to_vec()];
    let h2_tls = Arc::new(client_tls.clone());
    client_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let h1_tls = Arc::new(client_tls);

    let route_rules = r#"response_headers = { set = { X-Route = "r" } }"#;
    let mut toml = String::new();
    let mut logs = Vec::new();
    for kind in ["main", "denied", "limited", "redirecting"] {
        for tls in [false, true] {
            let name = format!("{kind}{}", if tls { "_tls" } else { "" });
            let log = fresh_log(&format!("local-answers-{name}"));
            let own = match kind {
                "main" => String::new(),
                "denied" => "default_pool = \"up\"\ndeny = [\"127.0.0.1\"]".to_owned(),
                "limited" => "default_pool = \"up\"\nrate_limit = { rate = 1, per = \"24h\" }"
                    .to_owned(),
                _ => "default_pool = \"up\"\nredirect = { to = \"https://{host}{path}\", status = 308 }"
                    .to_owned(),
            };
            let tls = if tls {
                format!(
                    "tls = {{ certificates = [{{ cert = \"{}\", key = \"{}\" }}] }}",
                    cert.display(),
                    key.display()
                )
            } else {
                String::new()
            };
            toml.push_str(&format!(
                r#"
[[listeners]]
name = "{name}"
bind = "127.0.0.1:0"
protocol = "http"
max_body_size = 10
{tls}
{own}
{}
response_headers = {{ set = {{ Strict-Transport-Security = "max-age=600" }}, add = {{ X-Content-Type-Options = "nosniff" }} }}

  [[listeners.routes]]
  match = {{ path_prefix = "/ok/" }}
  pool = "up"
  {route_rules}

  [[listeners.routes]]
  match = {{ path_prefix = "/denied/" }}
  pool = "up"
  deny = ["127.0.0.1"]
  {route_rules}

  [[listeners.routes]]
  match = {{ path_prefix = "/limited/" }}
  pool = "up"
  rate_limit = {{ rate = 1, per = "24h" }}
  {route_rules}

  [[listeners.routes]]
  match = {{ path_prefix = "/dead/" }}
  pool = "dead"
  {route_rules}

  [[listeners.routes]]
  match = {{ path_prefix = "/gone/" }}
  pool = "gone"
  {route_rules}

  [[listeners.routes]]
  match = {{ path_prefix = "/silent/" }}
  pool = "silent"
  {route_rules}

  [[listeners.routes]]
  match = {{ path_prefix = "/moved/" }}
  redirect = {{ to = "https://{{host}}/elsewhere" }}
  {route_rules}
"#,
                json_access_log(&log),
            ));
            logs.push((name, log));
        }
    }
    toml.push_str(&format!(
        r#"
[pools.up]
backends = ["{}"]
[pools.dead]
backends = ["{dead}"]
[pools.gone]
backends = ["{}"]
[pools.silent]
backends = ["{}"]
response_timeout = "300ms"
"#,
        up.addr, up.addr, silent.addr
    ));
    let proxy = Proxy::start(&toml);
    // The one backend of `gone` may not be picked: no backend is left for its requests.
    proxy
        .registry
        .get("gone", up.addr)
        .expect("state")
        .set_usable(false);

    const NONE: &[(&str, &str)] = &[];
    let case = |listener, method, path, status, route| LocalCase {
        listener,
        method,
        path,
        fields: NONE,
        body: 0,
        bad_host: false,
        twice: false,
        status,
        route,
    };
    let cases = [
        LocalCase {
            bad_host: true,
            ..case("main", "GET", "/ok/", 400, false)
        },
        case("main", "GET", "/nowhere", 404, false),
        LocalCase {
            fields: &[("content-type", "application/grpc"), ("te", "trailers")],
            ..case("main", "POST", "/nowhere", 404, false)
        },
        case("denied", "GET", "/ok/", 403, false),
        LocalCase {
            twice: true,
            ..case("limited", "GET", "/ok/", 429, false)
        },
        case("redirecting", "GET", "/ok/", 308, false),
        case("main", "GET", "/denied/", 403, true),
        LocalCase {
            twice: true,
            ..case("main", "GET", "/limited/", 429, true)
        },
        LocalCase {
            body: 100,
            ..case("main", "POST", "/ok/", 413, true)
        },
        case("main", "GET", "/dead/", 502, true),
        case("main", "GET", "/gone/", 503, true),
        case("main", "GET", "/silent/", 504, true),
        case("main", "GET", "/moved/", 301, true),
    ];

    // (listener, id, status) of every answer, to be found in the access logs.
    let mut expected: Vec<(String, String, u16)> = Vec::new();
    let mut problems = Vec::new();
    for speech in [
        Speech::Http11,
        Speech::Http11Tls,
        Speech::H2c,
        Speech::H2Tls,
    ] {
        let tls = if speech.h2() { &h2_tls } else { &h1_tls };
        for (i, case) in cases.iter().enumerate() {
            let listener = format!(
                "{}{}",
                case.listener,
                if speech.tls() { "_tls" } else { "" }
            );
            let addr = proxy.addr(&listener);
            let sent = format!("case-{i}-{speech:?}");
            // An HTTP/1.1 head that cannot be parsed has no id the proxy could read.
            let readable = !case.bad_host || speech.h2();
            if case.twice {
                ask_locally(speech, addr, tls, case, None).await;
            }
            let answer = ask_locally(speech, addr, tls, case, Some(&sent)).await;
            let what = format!(
                "{} {} on {listener} over {speech:?}",
                case.method, case.path
            );
            let mut check = |holds: bool, says: String| {
                if !holds {
                    problems.push(format!("{what}: {says}"));
                }
            };
            check(
                answer.status == case.status,
                format!("status {}", answer.status),
            );
            let ids = answer.all("x-request-id");
            check(ids.len() == 1, format!("one request id, not {ids:?}"));
            let id = ids.first().copied().unwrap_or_default().to_owned();
            if readable {
                check(id == sent, format!("the client's id, not {id:?}"));
            } else {
                check(
                    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
                    format!("a fresh id, not {id:?}"),
                );
            }
            check(
                answer.all("strict-transport-security") == ["max-age=600"],
                "the listener's set".to_owned(),
            );
            check(
                answer.all("x-content-type-options") == ["nosniff"],
                "the listener's add".to_owned(),
            );
            check(
                answer.one("x-route").is_some() == case.route,
                format!("the route's rules apply: {}", case.route),
            );
            if !speech.h2() {
                check(
                    answer.all("content-length").len() == 1
                        && answer.all("transfer-encoding").is_empty()
                        && answer.all("connection").len() <= 1,
                    format!("the proxy's own framing, once: {:?}", answer.fields),
                );
            }
            // A head the proxy could not read is no request: it has no log line.
            if readable {
                expected.push((listener, id, case.status));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    for (listener, id, status) in &expected {
        let log = &logs
            .iter()
            .find(|(name, _)| name == listener)
            .expect("log")
            .1;
        let found = || {
            log_text(log).lines().any(|line| {
                let line: serde_json::Value = serde_json::from_str(line).expect("json");
                line["request_id"] == id.as_str() && line["status"] == *status
            })
        };
        eventually(
            &format!("a {status} line with id {id} in {listener}'s log"),
            found,
        )
        .await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_status_code_outside_100_to_599_is_a_502_for_both_kinds_of_client() {
    for answer in [
        &b"HTTP/1.1 000 Zero\r\ncontent-length: 2\r\n\r\nok"[..],
        b"HTTP/1.1 099 Low\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 600 High\r\ncontent-length: 2\r\n\r\nok",
    ] {
        let backend = canned_backend(answer).await;
        let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
        let mut client = HttpClient::connect(proxy.addr("l7")).await;
        let head = client.head_of(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(head.starts_with("http/1.1 502 "), "{head}");
        let mut sender = h2_connect(proxy.addr("l7")).await;
        let (status, _, body) = h2_request(&mut sender, "GET", "http://x/", None).await;
        assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    }
}
