//! HTTP/2 edge cases through the real proxy: gRPC-style streaming, HTTP/2 backends that go away
//! or limit their streams, and HTTP/2 clients that give up half-way.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use tokio::sync::Notify;

/// A proxy listener "l7" in front of `backends`, with `pool_extra` in the pool's table.
fn proxy_for(backends: &[std::net::SocketAddr], pool_extra: &str) -> Proxy {
    proxy_with(backends, "", pool_extra)
}

/// Like [`proxy_for`], with `listener_extra` in the listener's table.
fn proxy_with(backends: &[std::net::SocketAddr], listener_extra: &str, pool_extra: &str) -> Proxy {
    Proxy::start(&single_pool(backends, listener_extra, pool_extra))
}

/// A gRPC-style request head for `path`.
fn grpc_request(path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://svc{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request")
}

/// Waits for a response head, within [`PATIENCE`].
async fn head_of(
    response: h2::client::ResponseFuture,
) -> Result<http::Response<h2::RecvStream>, h2::Error> {
    tokio::time::timeout(PATIENCE, response)
        .await
        .expect("a response head in time")
}

/// Reads a body until it ends or fails, within [`PATIENCE`]: what came, and how it ended.
async fn read_to_its_end(body: &mut h2::RecvStream) -> (Vec<u8>, Result<(), h2::Error>) {
    let mut data = Vec::new();
    loop {
        match tokio::time::timeout(PATIENCE, body.data())
            .await
            .expect("data in time")
        {
            Some(Ok(chunk)) => data.extend_from_slice(&chunk),
            Some(Err(error)) => return (data, Err(error)),
            None => return (data, Ok(())),
        }
    }
}

/// Sends `request` from an HTTP/1.1 client of listener `l7` and returns what came back, up to
/// the end of the proxy's own 502 or the close.
async fn answer_until_a_502_or_the_close(proxy: &Proxy, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(proxy.addr("l7"))
        .await
        .expect("connect");
    stream.write_all(request).await.expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"502 Bad Gateway\n") {
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("an answer or a close in time")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Sends a bodiless GET for `uri` on `sender` and waits for its response head, keeping the
/// stream's sending half: for a client that resets the stream later.
async fn opened(
    sender: &mut h2::client::SendRequest<Bytes>,
    uri: &str,
) -> (http::Response<h2::RecvStream>, h2::SendStream<Bytes>) {
    let request = http::Request::builder().uri(uri).body(()).expect("request");
    let (response, stream) = sender.send_request(request, true).expect("send");
    (head_of(response).await.expect("response"), stream)
}

/// Sends a bodiless GET for `uri` on `sender` and waits for its response head, within
/// [`PATIENCE`].
async fn head_for(
    sender: &mut h2::client::SendRequest<Bytes>,
    uri: &str,
) -> Result<http::Response<h2::RecvStream>, h2::Error> {
    let request = http::Request::builder().uri(uri).body(()).expect("request");
    let (response, _) = sender.send_request(request, true).expect("send");
    head_of(response).await
}

/// Reads a body to its end, then its trailers.
async fn read_all(body: &mut h2::RecvStream) -> (Vec<u8>, Option<http::HeaderMap>) {
    let mut data = Vec::new();
    while let Some(chunk) = tokio::time::timeout(PATIENCE, body.data())
        .await
        .expect("data in time")
    {
        let chunk = chunk.expect("data");
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = tokio::time::timeout(PATIENCE, body.trailers())
        .await
        .expect("trailers in time")
        .expect("trailers");
    (data, trailers)
}

/// The status of one of the proxy's own errors: a gRPC call gets it as a gRPC status whose
/// message starts with the HTTP status it stands for; anything else as the HTTP status.
fn error_status(response: &http::Response<h2::RecvStream>) -> u16 {
    match response.headers().get("grpc-message") {
        Some(message) if response.headers().contains_key("grpc-status") => message
            .to_str()
            .ok()
            .and_then(|m| m.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or(0),
        _ => response.status().as_u16(),
    }
}

/// gRPC trailers with `grpc-status: 0`.
fn ok_trailers() -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    trailers
}

/// An HTTP/2 backend for streaming: `/sum` reads the whole request body and answers its length
/// (client streaming); `/echo` answers at once and echoes each piece of the body as it comes
/// (bidirectional streaming); `/only` answers with a trailers-only response (`grpc-status: 5`
/// in a head that ends the stream).
async fn streaming_backend() -> Backend {
    h2_backend_with(move |request, mut respond| async move {
        let path = request.uri().path().to_owned();
        let mut body = request.into_body();
        let head = |status: u16| {
            http::Response::builder()
                .status(status)
                .header("content-type", "application/grpc")
                .body(())
                .expect("response")
        };
        match path.as_str() {
            "/only" => {
                let response = http::Response::builder()
                    .status(200)
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "5")
                    .header("grpc-message", "not found")
                    .body(())
                    .expect("response");
                let _ = respond.send_response(response, true);
            }
            "/echo" => {
                let Ok(mut send) = respond.send_response(head(200), false) else {
                    return;
                };
                while let Some(Ok(chunk)) = body.data().await {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    if send.send_data(chunk, false).is_err() {
                        return;
                    }
                }
                let _ = send.send_trailers(ok_trailers());
            }
            _ => {
                let mut total = 0usize;
                while let Some(Ok(chunk)) = body.data().await {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    total += chunk.len();
                }
                let Ok(mut send) = respond.send_response(head(200), false) else {
                    return;
                };
                let _ = send.send_data(Bytes::from(total.to_string()), false);
                let _ = send.send_trailers(ok_trailers());
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_client_stream_that_outlasts_the_response_timeout_is_not_cut() {
    let backend = streaming_backend().await;
    let proxy = proxy_for(
        &[backend.addr],
        "upstream_protocol = \"h2\"\nresponse_timeout = \"300ms\"",
    );
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let (response, mut stream) = sender
        .send_request(grpc_request("/sum"), false)
        .expect("send");
    // The client keeps sending for well over the response timeout; the backend answers only
    // at the end of the stream, as a client-streaming call does.
    for _ in 0..8 {
        stream
            .send_data(Bytes::from_static(b"0123456789"), false)
            .expect("data");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stream.send_data(Bytes::new(), true).expect("end");
    let response = head_of(response).await.expect("response");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let (data, trailers) = read_all(&mut body).await;
    assert_eq!(data, b"80");
    assert_eq!(
        trailers.and_then(|t| t.get("grpc-status").cloned()),
        Some(http::HeaderValue::from_static("0"))
    );
}

#[tokio::test]
async fn a_backend_that_stops_answering_a_finished_request_still_times_out() {
    let backend = Backend::start(|stream| async move {
        let Ok(mut connection) = h2::server::handshake(stream).await else {
            return;
        };
        // Takes requests, never answers them.
        let mut held = Vec::new();
        while let Some(Ok(exchange)) = connection.accept().await {
            held.push(exchange);
        }
    })
    .await;
    let proxy = proxy_for(
        &[backend.addr],
        "upstream_protocol = \"h2\"\nresponse_timeout = \"300ms\"",
    );
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let (response, mut stream) = sender
        .send_request(grpc_request("/sum"), false)
        .expect("send");
    stream
        .send_data(Bytes::from_static(b"x"), true)
        .expect("end");
    let response = head_of(response).await.expect("response");
    assert_eq!(error_status(&response), 504);
    let (response, _) = sender
        .send_request(grpc_request("/sum"), true)
        .expect("send");
    assert_eq!(
        error_status(&head_of(response).await.expect("response")),
        504
    );
}

#[tokio::test]
async fn bidirectional_streams_flow_both_ways_through_the_proxy() {
    let backend = streaming_backend().await;
    let proxy = proxy_for(&[backend.addr], "upstream_protocol = \"h2\"");
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let (response, mut stream) = sender
        .send_request(grpc_request("/echo"), false)
        .expect("send");
    // The head comes before the request body ends.
    let response = head_of(response).await.expect("response");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    for i in 0..5 {
        let message = format!("ping {i}");
        stream
            .send_data(Bytes::from(message.clone()), false)
            .expect("data");
        // Each message is echoed before the next one is sent: nothing waits for the end.
        let chunk = tokio::time::timeout(PATIENCE, body.data())
            .await
            .expect("echo in time")
            .expect("a chunk")
            .expect("data");
        let _ = body.flow_control().release_capacity(chunk.len());
        assert_eq!(chunk, message.as_bytes());
    }
    stream.send_data(Bytes::new(), true).expect("end");
    let (rest, trailers) = read_all(&mut body).await;
    assert!(rest.is_empty());
    assert!(trailers.is_some_and(|t| t.get("grpc-status").is_some()));
}

#[tokio::test]
async fn a_trailers_only_response_reaches_both_kinds_of_client() {
    let backend = streaming_backend().await;
    let proxy = proxy_for(&[backend.addr], "upstream_protocol = \"h2\"");
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let (response, _) = sender
        .send_request(grpc_request("/only"), true)
        .expect("send");
    let response = head_of(response).await.expect("response");
    assert_eq!(response.status(), 200);
    let status = response.headers().get("grpc-status").cloned();
    let message = response.headers().get("grpc-message").cloned();
    let mut body = response.into_body();
    let (data, _) = read_all(&mut body).await;
    assert!(data.is_empty());
    assert_eq!(status, Some(http::HeaderValue::from_static("5")));
    assert_eq!(message, Some(http::HeaderValue::from_static("not found")));

    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    let reply = client.get("/only", "TE: trailers\r\n").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("grpc-status"), Some("5"));
}

/// An HTTP/2 backend whose `/hold` streams send a head and a first piece of body, then stay
/// open until `release` is notified; `/bye` is answered, then the connection is shut down
/// gracefully (GOAWAY, in-flight streams finish); anything else is answered at once.
async fn goaway_backend(release: Arc<Notify>, max_streams: Option<u32>) -> Backend {
    Backend::start(move |stream| {
        let release = Arc::clone(&release);
        async move {
            let mut builder = h2::server::Builder::new();
            if let Some(max) = max_streams {
                builder.max_concurrent_streams(max);
            }
            let Ok(mut connection) = builder.handshake::<_, Bytes>(stream).await else {
                return;
            };
            while let Some(Ok((request, mut respond))) = connection.accept().await {
                let path = request.uri().path().to_owned();
                let head = h2_ok();
                let Ok(mut send) = respond.send_response(head, false) else {
                    continue;
                };
                match path.as_str() {
                    "/hold" => {
                        let release = Arc::clone(&release);
                        let _ = send.send_data(Bytes::from_static(b"first"), false);
                        tokio::spawn(async move {
                            release.notified().await;
                            let _ = send.send_data(Bytes::from_static(b"last"), true);
                        });
                    }
                    "/bye" => {
                        let _ = send.send_data(Bytes::from_static(b"bye"), true);
                        connection.graceful_shutdown();
                    }
                    _ => {
                        let _ = send.send_data(Bytes::from_static(b"ok"), true);
                    }
                }
            }
        }
    })
    .await
}

/// Opens a `/hold` stream of [`goaway_backend`] and returns its body once the head is there:
/// a stream in flight until the backend is released.
async fn held(sender: &mut h2::client::SendRequest<Bytes>) -> h2::RecvStream {
    head_for(sender, "http://svc/hold")
        .await
        .expect("response")
        .into_body()
}

/// Sends a bodiless GET for `path` and returns the status and, for a 200, the whole body.
async fn get(sender: &mut h2::client::SendRequest<Bytes>, path: &str) -> (u16, Vec<u8>) {
    let response = head_for(sender, &format!("http://svc{path}"))
        .await
        .expect("response");
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let (data, _) = read_all(&mut body).await;
    (status, data)
}

/// Has [`goaway_backend`] go away gracefully with a stream in flight, then sends requests:
/// the first from an HTTP/1.1 client when `http1_first`, else from an HTTP/2 one.
async fn requests_after_a_graceful_goaway(http1_first: bool) {
    let release = Arc::new(Notify::new());
    let backend = goaway_backend(Arc::clone(&release), None).await;
    let proxy = proxy_for(&[backend.addr], "upstream_protocol = \"h2\"");
    let mut sender = h2_connect(proxy.addr("l7")).await;
    // A long stream in flight keeps the backend's connection open after its GOAWAY.
    let mut held = held(&mut sender).await;
    let first = tokio::time::timeout(PATIENCE, held.data())
        .await
        .expect("first piece in time");
    assert!(first.is_some());
    assert_eq!(get(&mut sender, "/bye").await, (200, b"bye".to_vec()));
    // The connection no longer takes streams: later requests go to a new one.
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    if http1_first {
        let reply = client.get("/next", "").await;
        assert_eq!((reply.status, reply.body), (200, b"ok".to_vec()));
    }
    for _ in 0..3 {
        assert_eq!(get(&mut sender, "/next").await, (200, b"ok".to_vec()));
    }
    let reply = client.get("/next", "").await;
    assert_eq!((reply.status, reply.body), (200, b"ok".to_vec()));
    assert_eq!(backend.accepted(), 2);
    // The stream in flight finishes on the old connection.
    release.notify_one();
    let (rest, _) = read_all(&mut held).await;
    assert_eq!(rest, b"last");
}

#[tokio::test]
async fn a_backend_going_away_gracefully_does_not_fail_the_next_http2_streams() {
    requests_after_a_graceful_goaway(false).await;
}

#[tokio::test]
async fn a_backend_going_away_gracefully_does_not_fail_the_next_http11_requests() {
    requests_after_a_graceful_goaway(true).await;
}

#[tokio::test]
async fn requests_over_a_backends_stream_limit_wait_for_a_free_stream() {
    let release = Arc::new(Notify::new());
    let backend = goaway_backend(Arc::clone(&release), Some(1)).await;
    let proxy = proxy_for(&[backend.addr], "upstream_protocol = \"h2\"");
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let mut held = held(&mut sender).await;
    // The backend's only stream is taken; the next request is answered once it is free.
    let mut second = sender.clone();
    let waiting = tokio::spawn(async move { get(&mut second, "/next").await });
    release.notify_one();
    let (rest, _) = read_all(&mut held).await;
    assert_eq!(rest, b"firstlast");
    let answered = tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("answered in time")
        .expect("task");
    assert_eq!(answered, (200, b"ok".to_vec()));
}

#[tokio::test]
async fn an_upload_reset_half_way_does_not_leave_its_backend_connection_in_the_pool() {
    let backend = http_backend("b").await;
    let proxy = proxy_for(&[backend.addr], "");
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let request = http::Request::builder()
        .method("POST")
        .uri("http://svc/upload")
        .header("content-length", "100")
        .body(())
        .expect("request");
    let (response, mut stream) = sender.send_request(request, false).expect("send");
    stream
        .send_data(Bytes::from_static(b"half of it"), false)
        .expect("data");
    eventually("backend connected", || backend.accepted() == 1).await;
    stream.send_reset(h2::Reason::CANCEL);
    drop(response);
    // The next requests are answered whole, on a connection that did not carry the cut upload.
    for _ in 0..3 {
        let (status, body) = get(&mut sender, "/after").await;
        assert_eq!(status, 200);
        let text = String::from_utf8(body).expect("utf-8");
        assert!(text.starts_with("b\nGET /after "), "{text}");
    }
    // A request without a length goes chunked and arrives whole.
    let request = http::Request::builder()
        .method("POST")
        .uri("http://svc/chunked")
        .body(())
        .expect("request");
    let (response, mut stream) = sender.send_request(request, false).expect("send");
    stream
        .send_data(Bytes::from_static(b"one,"), false)
        .expect("data");
    stream.send_data(Bytes::new(), false).expect("empty data");
    stream
        .send_data(Bytes::from_static(b"two"), true)
        .expect("data");
    let response = head_of(response).await.expect("response");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let (data, _) = read_all(&mut body).await;
    let text = String::from_utf8(data).expect("utf-8");
    assert!(text.ends_with("\n\none,two"), "{text}");
}

/// Opens a stream for `path` on `sender` and returns the response once its head is there,
/// without reading any of its body: the client's window for it fills and stays full.
async fn stalled(sender: &mut h2::client::SendRequest<Bytes>, path: &str) -> h2::RecvStream {
    let response = head_for(sender, &format!("http://svc{path}"))
        .await
        .expect("response");
    assert_eq!(response.status(), 200);
    response.into_body()
}

#[tokio::test]
async fn an_http2_client_that_stops_reading_releases_its_http11_backend() {
    let (backend, finished) = huge_answer_backend().await;
    let proxy = proxy_for(&[backend.addr], "response_timeout = \"300ms\"");
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let body = stalled(&mut sender, "/big").await;
    eventually("backend connection released", || {
        finished.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    // The stream does not look complete.
    let mut body = body;
    let mut ended_cleanly = true;
    loop {
        match tokio::time::timeout(PATIENCE, body.data())
            .await
            .expect("data in time")
        {
            Some(Ok(chunk)) => {
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            Some(Err(_)) => {
                ended_cleanly = false;
                break;
            }
            None => break,
        }
    }
    assert!(!ended_cleanly, "a cut body must not end cleanly");
}

/// Bytes [`big_h2_backend`] has sent in all.
type Sent = Arc<std::sync::atomic::AtomicUsize>;

/// An HTTP/2 backend whose `/big` streams send 8 MiB as fast as flow control lets them,
/// counting what went out in `sent` and the streams ended by a reset (given up by the proxy)
/// in `given_up`, and whose other paths answer "ok".
async fn big_h2_backend(sent: Sent, given_up: Arc<tokio::sync::watch::Sender<usize>>) -> Backend {
    h2_backend_with(move |request, mut respond| {
        let sent = Arc::clone(&sent);
        let given_up = Arc::clone(&given_up);
        async move {
            let head = h2_ok();
            let Ok(mut send) = respond.send_response(head, false) else {
                return;
            };
            if request.uri().path() != "/big" {
                let _ = send.send_data(Bytes::from_static(b"ok"), true);
                return;
            }
            let mut left = 8 * 1024 * 1024usize;
            while left > 0 {
                send.reserve_capacity(left.min(64 * 1024));
                let Some(Ok(n)) = std::future::poll_fn(|cx| send.poll_capacity(cx)).await else {
                    given_up.send_modify(|n| *n += 1);
                    return;
                };
                if n == 0 {
                    continue;
                }
                if send.send_data(Bytes::from(vec![b'x'; n]), false).is_err() {
                    return;
                }
                sent.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                left -= n;
            }
            let _ = send.send_data(Bytes::new(), true);
        }
    })
    .await
}

#[tokio::test]
async fn clients_that_stop_reading_do_not_stall_a_shared_http2_backend_connection() {
    let sent: Sent = Arc::default();
    let (given_up, mut streams_given_up) = tokio::sync::watch::channel(0);
    let backend = big_h2_backend(Arc::clone(&sent), Arc::new(given_up)).await;
    let proxy = proxy_for(
        &[backend.addr],
        "upstream_protocol = \"h2\"\nresponse_timeout = \"300ms\"",
    );
    // Clients that read nothing of big responses, enough of them to fill the whole window of
    // the backend connection they share with everyone else.
    let mut stalled_bodies = Vec::new();
    for _ in 0..4 {
        let mut sender = h2_connect(proxy.addr("l7")).await;
        stalled_bodies.push(stalled(&mut sender, "/big").await);
        stalled_bodies.push(stalled(&mut sender, "/big").await);
    }
    // The proxy gives them up (their backend streams are reset), which frees the window of
    // the shared connection: waited for here rather than raced, as a loaded machine may give
    // the next request's own pause limit no more slack than theirs.
    tokio::time::timeout(PATIENCE, streams_given_up.wait_for(|n| *n >= 8))
        .await
        .expect("the stalled streams are given up in time")
        .expect("backend alive");
    // Another client is still served on that connection.
    let mut sender = h2_connect(proxy.addr("l7")).await;
    assert_eq!(get(&mut sender, "/small").await, (200, b"ok".to_vec()));
    assert!(sent.load(std::sync::atomic::Ordering::SeqCst) >= 5 * 1024 * 1024);
    drop(stalled_bodies);
}

#[tokio::test]
async fn informational_answers_head_and_large_fields_pass_from_http11_backends_to_http2() {
    let backend = Backend::start(|mut stream| async move {
        use tokio::io::AsyncWriteExt;
        let mut buf = Vec::new();
        loop {
            let Some(end) = read_until(&mut stream, &mut buf, b"\r\n\r\n").await else {
                return;
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            let big = "v".repeat(20_000);
            let reply = if head.starts_with("HEAD ") {
                "HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n".to_owned()
            } else {
                format!(
                    "HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n\
                     HTTP/1.1 100 Continue\r\n\r\n\
                     HTTP/1.1 200 OK\r\nx-big: {big}\r\ncontent-length: 5\r\n\r\nhello"
                )
            };
            if stream.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    let proxy = proxy_for(&[backend.addr], "");
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let (status, body) = get(&mut sender, "/hints").await;
    assert_eq!((status, body), (200, b"hello".to_vec()));
    let request = http::Request::builder()
        .method("HEAD")
        .uri("http://svc/head")
        .body(())
        .expect("request");
    let (response, _) = sender.send_request(request, true).expect("send");
    let response = head_of(response).await.expect("response");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("content-length")
            .map(|v| v.as_bytes()),
        Some(&b"1000"[..])
    );
    let mut body = response.into_body();
    let (data, _) = read_all(&mut body).await;
    assert!(data.is_empty());
    // The connection is still in step afterwards.
    let response = head_for(&mut sender, "http://svc/hints")
        .await
        .expect("response");
    assert_eq!(
        response.headers().get("x-big").map(|v| v.len()),
        Some(20_000)
    );
}

#[tokio::test]
async fn a_client_reset_reaches_the_http2_backend_during_the_upload_and_during_the_response() {
    let (events, mut seen) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    let backend = h2_backend_with(move |request, mut respond| {
        let events = events.clone();
        async move {
            if request.uri().path() == "/upload" {
                let mut body = request.into_body();
                while let Some(chunk) = body.data().await {
                    if chunk.is_err() {
                        let _ = events.send("upload reset");
                        return;
                    }
                }
                let _ = events.send("upload ended");
                return;
            }
            let head = h2_ok();
            let Ok(mut send) = respond.send_response(head, false) else {
                return;
            };
            let _ = send.send_data(Bytes::from_static(b"first"), false);
            // A quiet server stream: only the client's reset ends it.
            let reset = std::future::poll_fn(|cx| send.poll_reset(cx)).await;
            let _ = events.send(if reset.is_ok() {
                "response reset"
            } else {
                "response failed"
            });
        }
    })
    .await;
    let proxy = proxy_for(&[backend.addr], "upstream_protocol = \"h2\"");
    let mut sender = h2_connect(proxy.addr("l7")).await;

    let (response, mut stream) = sender
        .send_request(grpc_request("/upload"), false)
        .expect("send");
    stream
        .send_data(Bytes::from_static(b"part"), false)
        .expect("data");
    eventually("backend connected", || backend.accepted() == 1).await;
    stream.send_reset(h2::Reason::CANCEL);
    drop(response);
    let event = tokio::time::timeout(PATIENCE, seen.recv())
        .await
        .expect("in time");
    assert_eq!(event, Some("upload reset"));

    let (response, mut stream) = opened(&mut sender, "http://svc/watch").await;
    let mut body = response.into_body();
    let first = tokio::time::timeout(PATIENCE, body.data())
        .await
        .expect("first piece in time");
    assert!(first.is_some());
    stream.send_reset(h2::Reason::CANCEL);
    drop(body);
    let event = tokio::time::timeout(PATIENCE, seen.recv())
        .await
        .expect("in time");
    assert_eq!(event, Some("response reset"));
}

#[tokio::test]
async fn a_connection_whose_response_still_streams_is_not_idle() {
    let release = Arc::new(Notify::new());
    let backend = goaway_backend(Arc::clone(&release), None).await;
    let proxy = proxy_with(
        &[backend.addr],
        "keepalive_timeout = \"200ms\"",
        "upstream_protocol = \"h2\"",
    );
    let tcp = tokio::net::TcpStream::connect(proxy.addr("l7"))
        .await
        .expect("connect");
    let (mut sender, mut connection) = h2::client::handshake(tcp).await.expect("handshake");
    let request = http::Request::builder()
        .uri("http://svc/hold")
        .body(())
        .expect("request");
    let (held, _) = sender.send_request(request, true).expect("send");
    let driven = async {
        let held = head_of(held).await.expect("response");
        let mut held = held.into_body();
        let first = tokio::time::timeout(PATIENCE, held.data())
            .await
            .expect("first piece in time");
        assert!(first.is_some());
        // The response streams on for several keepalive timeouts (a server stream that
        // pauses between messages): the connection is in use, not idle.
        tokio::time::sleep(Duration::from_millis(800)).await;
        release.notify_one();
        let (rest, _) = read_all(&mut held).await;
        assert_eq!(rest, b"last");
        // New streams are still taken on the same connection.
        assert_eq!(get(&mut sender, "/next").await, (200, b"ok".to_vec()));
    };
    tokio::select! {
        () = driven => {}
        ended = &mut connection => panic!("the connection ended: {ended:?}"),
    }
}

/// A bare HTTP/2 backend that, when a request's HEADERS arrive, either sends a GOAWAY that
/// takes none of the streams (`last-stream-id` 0) and keeps the connection open, or closes the
/// connection (`close`).
async fn refusing_h2_backend(close: bool) -> Backend {
    if close {
        raw_h2_backend(|_| Vec::new()).await
    } else {
        raw_h2_backend(|_| frame(7, 0, 0, &[0; 8])).await
    }
}

#[tokio::test]
async fn requests_an_http2_backend_refuses_or_drops_are_answered_not_hung() {
    for close in [false, true] {
        let backend = refusing_h2_backend(close).await;
        let proxy = proxy_for(&[backend.addr], "upstream_protocol = \"h2\"");
        let mut sender = h2_connect(proxy.addr("l7")).await;
        let (status, _) = get(&mut sender, "/refused").await;
        assert!(status == 502 || status == 503, "close {close}: {status}");
        let mut client = HttpClient::connect(proxy.addr("l7")).await;
        let status = tokio::time::timeout(PATIENCE, client.get("/refused", ""))
            .await
            .expect("answered in time")
            .status;
        assert!(status == 502 || status == 503, "close {close}: {status}");
    }
}

#[tokio::test]
async fn streams_reset_by_either_side_after_their_head_get_one_log_line_each() {
    let cut_now = Arc::new(Notify::new());
    let trigger = Arc::clone(&cut_now);
    let backend = h2_backend_with(move |request, mut respond| {
        let cut_now = Arc::clone(&trigger);
        async move {
            let head = h2_ok();
            let Ok(mut send) = respond.send_response(head, false) else {
                return;
            };
            let _ = send.send_data(Bytes::from_static(b"first"), false);
            if request.uri().path() == "/cut" {
                cut_now.notified().await;
                send.send_reset(h2::Reason::INTERNAL_ERROR);
            } else {
                let _ = std::future::poll_fn(|cx| send.poll_reset(cx)).await;
            }
        }
    })
    .await;
    let log = fresh_log("h2resets");
    let proxy = proxy_with(
        &[backend.addr],
        &json_access_log(&log),
        "upstream_protocol = \"h2\"",
    );
    let mut sender = h2_connect(proxy.addr("l7")).await;
    // The backend resets its stream after the head: the client's ends in an error.
    let mut cut = stalled(&mut sender, "/cut").await;
    cut_now.notify_one();
    let mut failed = false;
    while let Some(chunk) = tokio::time::timeout(PATIENCE, cut.data())
        .await
        .expect("in time")
    {
        if chunk.is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "a reset body must not end cleanly");
    // The client resets its stream after the head.
    let (response, mut stream) = opened(&mut sender, "http://svc/watch").await;
    let mut body = response.into_body();
    assert!(
        tokio::time::timeout(PATIENCE, body.data())
            .await
            .expect("in time")
            .is_some()
    );
    stream.send_reset(h2::Reason::CANCEL);
    drop(body);
    eventually("a line for each stream", || {
        log_text(&log).lines().count() >= 2
    })
    .await;
    let mut paths = Vec::new();
    for line in log_text(&log).lines() {
        let line: serde_json::Value = serde_json::from_str(line).expect("json");
        assert_eq!(line["status"], 200);
        assert_eq!(line["backend"], backend.addr.to_string());
        paths.push(line["path"].as_str().unwrap_or("").to_owned());
    }
    paths.sort();
    assert_eq!(paths, ["/cut", "/watch"]);
    let _ = std::fs::remove_file(&log);
}

#[tokio::test]
async fn a_client_reset_during_a_quiet_http11_response_releases_the_backend_at_once() {
    let (events, mut seen) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    let backend = Backend::start(move |mut stream| {
        let events = events.clone();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = Vec::new();
            if read_until(&mut stream, &mut buf, b"\r\n\r\n").await.is_none() {
                return;
            }
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n";
            if stream.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            // A quiet stream of events: only the proxy letting go ends it.
            let mut rest = [0u8; 64];
            while let Ok(n) = stream.read(&mut rest).await {
                if n == 0 {
                    break;
                }
            }
            let _ = events.send("closed");
        }
    })
    .await;
    // The default response timeout (30 s) is far longer than the test's patience.
    let proxy = proxy_for(&[backend.addr], "");
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let (response, mut stream) = opened(&mut sender, "http://svc/events").await;
    let mut body = response.into_body();
    let first = tokio::time::timeout(PATIENCE, body.data())
        .await
        .expect("first event in time")
        .expect("a chunk")
        .expect("data");
    assert_eq!(first, b"first"[..]);
    stream.send_reset(h2::Reason::CANCEL);
    drop(body);
    let event = tokio::time::timeout(PATIENCE, seen.recv())
        .await
        .expect("released in time");
    assert_eq!(event, Some("closed"));
}

/// Sends the HTTP/2 preface and empty SETTINGS on a raw connection to the proxy, then `frame`
/// over and over until the proxy closes the connection; whether it did within a million frames.
async fn flood_is_cut_off(proxy: std::net::SocketAddr, first: &[u8], frame: &[u8]) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let (mut read, mut write) = stream.into_split();
    let reader = tokio::spawn(async move {
        let mut sink = vec![0u8; 64 * 1024];
        while let Ok(n) = read.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    });
    let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    opening.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    opening.extend_from_slice(first);
    if write.write_all(&opening).await.is_err() {
        return true;
    }
    let batch: Vec<u8> = frame.repeat(1000);
    for _ in 0..1000 {
        if write.write_all(&batch).await.is_err() {
            return true;
        }
        if reader.is_finished() {
            return true;
        }
    }
    tokio::time::timeout(PATIENCE, reader).await.is_ok()
}

#[tokio::test]
async fn continuation_and_window_update_floods_are_cut_off() {
    let backend = http_backend("b").await;
    let proxy = proxy_for(&[backend.addr], "");
    // HEADERS without END_HEADERS (`:method: GET`), then empty CONTINUATION frames forever.
    let headers = [0, 0, 1, 1, 0, 0, 0, 0, 1, 0x82];
    let continuation = [0, 0, 0, 9, 0, 0, 0, 0, 1];
    assert!(flood_is_cut_off(proxy.addr("l7"), &headers, &continuation).await);
    // A storm of connection window updates overflows the window (a flow-control error).
    let update = [0, 0, 4, 8, 0, 0, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff];
    assert!(flood_is_cut_off(proxy.addr("l7"), &[], &update).await);
    // The proxy serves others as usual.
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let (status, _) = get(&mut sender, "/").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_http11_upload_cut_short_never_reaches_an_http2_backend_as_complete() {
    let (events, mut seen) = tokio::sync::mpsc::unbounded_channel::<String>();
    let backend = h2_backend_with(move |request, mut respond| {
        let events = events.clone();
        async move {
            // `/early` answers with its head at once, before it reads the body.
            let _send = if request.uri().path() == "/early" {
                let head = h2_ok();
                respond.send_response(head, false).ok()
            } else {
                None
            };
            let mut body = request.into_body();
            let mut got = Vec::new();
            loop {
                match body.data().await {
                    Some(Ok(chunk)) => {
                        let _ = body.flow_control().release_capacity(chunk.len());
                        got.extend_from_slice(&chunk);
                    }
                    Some(Err(_)) => {
                        let _ = events.send("reset".to_owned());
                        return;
                    }
                    None => {
                        let text = String::from_utf8_lossy(&got).into_owned();
                        let _ = events.send(format!("complete: {text}"));
                        return;
                    }
                }
            }
        }
    })
    .await;
    let proxy = proxy_for(&[backend.addr], "upstream_protocol = \"h2\"");
    for path in ["/upload", "/early"] {
        for (framing, first) in [
            ("Transfer-Encoding: chunked", "5\r\nhello\r\n"),
            ("Content-Length: 100", "hello"),
        ] {
            let mut client = HttpClient::connect(proxy.addr("l7")).await;
            let head = format!("POST {path} HTTP/1.1\r\nHost: a\r\n{framing}\r\n\r\n{first}");
            client.send(head.as_bytes()).await;
            eventually("the backend has the stream", || backend.accepted() == 1).await;
            if path == "/early" {
                // The answer's head has reached the proxy.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // The client goes away half-way through its body.
            drop(client);
            let event = tokio::time::timeout(PATIENCE, seen.recv())
                .await
                .expect("the backend hears of it in time");
            assert_eq!(event.as_deref(), Some("reset"), "{path} {framing}");
        }
    }
}

#[tokio::test]
async fn a_burst_of_first_requests_shares_one_connection_to_an_http2_backend() {
    let backend = streaming_backend().await;
    let proxy = proxy_for(&[backend.addr], "upstream_protocol = \"h2\"");
    let sender = h2_connect(proxy.addr("l7")).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut sender = sender.clone();
        tasks.push(tokio::spawn(async move {
            let (response, _) = sender
                .send_request(grpc_request("/sum"), true)
                .expect("send");
            head_of(response).await.expect("response").status()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.expect("task"), 200);
    }
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn max_body_size_holds_for_http2_clients_of_http2_backends() {
    let backend = streaming_backend().await;
    let proxy = proxy_with(
        &[backend.addr],
        "max_body_size = 10",
        "upstream_protocol = \"h2\"",
    );
    let mut sender = h2_connect(proxy.addr("l7")).await;
    // A declared length over the limit: refused before any backend is contacted.
    let request = http::Request::builder()
        .method("POST")
        .uri("http://svc/sum")
        .header("content-length", "100")
        .body(())
        .expect("request");
    let (response, mut stream) = sender.send_request(request, false).expect("send");
    let _ = stream.send_data(Bytes::from(vec![b'x'; 100]), true);
    assert_eq!(head_of(response).await.expect("response").status(), 413);
    assert_eq!(backend.accepted(), 0);
    // A streamed body that grows past it.
    let (response, mut stream) = sender
        .send_request(grpc_request("/sum"), false)
        .expect("send");
    let _ = stream.send_data(Bytes::from(vec![b'x'; 100]), true);
    assert_eq!(
        error_status(&head_of(response).await.expect("response")),
        413
    );
    // Within the limit, as usual.
    let (response, mut stream) = sender
        .send_request(grpc_request("/sum"), false)
        .expect("send");
    let _ = stream.send_data(Bytes::from_static(b"12345"), true);
    let response = head_of(response).await.expect("response");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    assert_eq!(read_all(&mut body).await.0, b"5");
}

/// An HTTP/2 backend that answers before it has read any of the request body, as RFC 9113
/// section 8.1 allows: `/reset` with a 413, then RST_STREAM(NO_ERROR) (the h2 crate's reset of a
/// stream whose request body is dropped unread once the response is sent); `/end` with a 200
/// whose stream ends, the request body left unread and its stream open (neither read nor reset).
async fn early_answer_backend() -> Backend {
    h2_backend_with(move |request, mut respond| async move {
        let reset = request.uri().path() == "/reset";
        let (status, text) = if reset {
            (413, "too big!")
        } else {
            (200, "early")
        };
        let head = http::Response::builder()
            .status(status)
            .header("content-length", text.len())
            .body(())
            .expect("response");
        let Ok(mut send) = respond.send_response(head, false) else {
            return;
        };
        let _ = send.send_data(Bytes::from_static(text.as_bytes()), true);
        if !reset {
            let _unread = request.into_body();
            tokio::time::sleep(PATIENCE).await;
        }
    })
    .await
}

#[tokio::test]
async fn an_early_answer_from_an_http2_backend_reaches_both_kinds_of_client() {
    let backend = early_answer_backend().await;
    let proxy = proxy_for(&[backend.addr], "upstream_protocol = \"h2\"");
    let mut sender = h2_connect(proxy.addr("l7")).await;
    for (path, status, text) in [("/reset", 413, "too big!"), ("/end", 200, "early")] {
        // An HTTP/2 client, its body still coming (more than the backend's windows).
        let request = http::Request::builder()
            .method("PUT")
            .uri(format!("http://svc{path}"))
            .body(())
            .expect("request");
        let (response, mut stream) = sender.send_request(request, false).expect("send");
        let _ = stream.send_data(Bytes::from(vec![b'u'; 1 << 20]), false);
        let response = head_of(response).await.expect("response");
        assert_eq!(response.status(), status, "{path}");
        let mut body = response.into_body();
        let mut data = Vec::new();
        while let Some(chunk) = tokio::time::timeout(PATIENCE, body.data())
            .await
            .expect("data in time")
        {
            data.extend_from_slice(&chunk.expect("data"));
        }
        assert_eq!(data, text.as_bytes(), "{path}");
        drop(stream);

        // An HTTP/1.1 client: the answer, then the connection closes (the rest of the body
        // is not read).
        let answer = http11_upload_answer(proxy.addr("l7"), path, text).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{path}: {answer}"
        );
        assert!(answer.contains("connection: close\r\n"), "{path}: {answer}");
        assert!(
            answer.ends_with(&format!("\r\n\r\n{text}")),
            "{path}: {answer}"
        );
    }
}

/// An HTTP/2 backend for uploads: `/ack` answers with its head at once, then reads the whole
/// body and sends its length; `/deaf` neither reads the body nor answers; `/te` answers at once
/// with the `te` fields it got (comma-separated, `none` without one).
async fn upload_backend() -> Backend {
    h2_backend_with(move |request, mut respond| async move {
        let head = h2_ok();
        match request.uri().path() {
            "/deaf" => {
                let _unread = request.into_body();
                tokio::time::sleep(PATIENCE).await;
            }
            "/te" => {
                let te: Vec<&str> = request
                    .headers()
                    .get_all("te")
                    .iter()
                    .map(|v| v.to_str().unwrap_or("?"))
                    .collect();
                let text = if te.is_empty() {
                    "none".to_owned()
                } else {
                    te.join(",")
                };
                let Ok(mut send) = respond.send_response(head, false) else {
                    return;
                };
                let _ = send.send_data(Bytes::from(text), true);
            }
            _ => {
                let Ok(mut send) = respond.send_response(head, false) else {
                    return;
                };
                let mut body = request.into_body();
                let mut total = 0usize;
                while let Some(Ok(chunk)) = body.data().await {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    total += chunk.len();
                }
                let _ = send.send_data(Bytes::from(format!("got {total}")), true);
            }
        }
    })
    .await
}

#[tokio::test]
async fn an_http11_upload_to_an_http2_backend_that_answers_first_goes_through_whole() {
    let backend = upload_backend().await;
    let proxy = proxy_for(&[backend.addr], "upstream_protocol = \"h2\"");
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    let size = 1 << 20;
    let head = format!("PUT /ack HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\n\r\n");
    client.send(head.as_bytes()).await;
    client.send(&vec![b'u'; size]).await;
    let reply = tokio::time::timeout(PATIENCE, client.reply())
        .await
        .expect("answered in time")
        .expect("a reply");
    assert_eq!((reply.status, reply.text()), (200, format!("got {size}")));
    // The whole body was read: the connection goes on.
    assert_ne!(reply.header("connection"), Some("close"));
    let reply = client.get("/te", "").await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn an_upload_an_http2_backend_does_not_take_times_out() {
    let backend = upload_backend().await;
    let proxy = proxy_for(
        &[backend.addr],
        "upstream_protocol = \"h2\"\nresponse_timeout = \"300ms\"",
    );
    let answer = http11_upload_answer(proxy.addr("l7"), "/deaf", "\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    // From an HTTP/2 client, whose body is still coming: the backend's stall, not the client's.
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let request = http::Request::builder()
        .method("PUT")
        .uri("http://svc/deaf")
        .body(())
        .expect("request");
    let (response, mut stream) = sender.send_request(request, false).expect("send");
    let _ = stream.send_data(Bytes::from(vec![b'u'; 4 << 20]), false);
    assert_eq!(head_of(response).await.expect("response").status(), 504);
}

#[tokio::test]
async fn te_trailers_and_nothing_else_reaches_an_http2_backend() {
    let backend = upload_backend().await;
    let proxy = proxy_for(&[backend.addr], "upstream_protocol = \"h2\"");
    // From an HTTP/2 client (where `trailers` is the only value TE may have).
    let mut sender = h2_connect(proxy.addr("l7")).await;
    for te in [Some("trailers"), None] {
        let mut request = http::Request::builder().uri("http://svc/te");
        if let Some(te) = te {
            request = request.header("te", te);
        }
        let request = request.body(()).expect("request");
        let (response, _) = sender.send_request(request, true).expect("send");
        let response = head_of(response).await.expect("response");
        let mut body = response.into_body();
        let (data, _) = read_all(&mut body).await;
        assert_eq!(
            String::from_utf8_lossy(&data),
            te.unwrap_or("none"),
            "{te:?}"
        );
    }
    // From HTTP/1.1 clients, whose TE may list transfer codings as well.
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    for (te, expected) in [
        ("TE: trailers\r\nConnection: TE\r\n", "trailers"),
        ("TE: gzip, Trailers\r\n", "trailers"),
        ("TE: deflate;q=0.5\r\nTE: trailers\r\n", "trailers"),
        ("TE: gzip\r\n", "none"),
        ("TE: trailersx\r\n", "none"),
        ("", "none"),
    ] {
        let reply = client.get("/te", te).await;
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (200, expected),
            "{te}"
        );
    }
}

#[tokio::test]
async fn a_burst_after_a_graceful_goaway_opens_one_new_connection_not_one_each() {
    let release = Arc::new(Notify::new());
    let backend = goaway_backend(Arc::clone(&release), None).await;
    let proxy = proxy_for(&[backend.addr], "upstream_protocol = \"h2\"");
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let mut held = held(&mut sender).await;
    assert_eq!(get(&mut sender, "/bye").await, (200, b"bye".to_vec()));
    // Every request of the burst finds the old connection, which takes none of them.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let mut sender = sender.clone();
        tasks.push(tokio::spawn(async move { get(&mut sender, "/next").await }));
    }
    for task in tasks {
        assert_eq!(task.await.expect("task"), (200, b"ok".to_vec()));
    }
    assert_eq!(backend.accepted(), 2);
    release.notify_one();
    let (rest, _) = read_all(&mut held).await;
    assert_eq!(rest, b"firstlast");
}

#[tokio::test]
async fn an_http2_client_that_stalls_or_resets_its_upload_is_not_held_against_the_backend() {
    let backend = streaming_backend().await;
    let proxy = proxy_for(
        &[backend.addr],
        "upstream_protocol = \"h2\"\nresponse_timeout = \"300ms\"\noutlier = { consecutive_failures = 1, max_ejected_percent = 100 }",
    );
    let state = proxy.registry.get("p", backend.addr).expect("known");
    let mut sender = h2_connect(proxy.addr("l7")).await;
    // A client stream whose body stops coming half-way: the client's fault, not the backend's.
    let (response, mut stalled) = sender
        .send_request(grpc_request("/sum"), false)
        .expect("send");
    stalled
        .send_data(Bytes::from_static(b"part"), false)
        .expect("data");
    let response = head_of(response).await.expect("response");
    assert_eq!(error_status(&response), 408);
    // One that resets its stream half-way.
    let (response, mut reset) = sender
        .send_request(grpc_request("/sum"), false)
        .expect("send");
    reset
        .send_data(Bytes::from_static(b"part"), false)
        .expect("data");
    eventually("the backend has both streams", || {
        backend.accepted() == 1 && state.active.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    reset.send_reset(h2::Reason::CANCEL);
    let _ = tokio::time::timeout(PATIENCE, response).await;
    // The backend was not blamed, and its connection is still the pooled one.
    assert_eq!(
        state
            .consecutive_failures
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert!(state.is_usable());
    let (response, mut whole) = sender
        .send_request(grpc_request("/sum"), false)
        .expect("send");
    whole
        .send_data(Bytes::from_static(b"12345"), true)
        .expect("data");
    let response = head_of(response).await.expect("response");
    assert_eq!(response.status(), 200);
    assert_eq!(backend.accepted(), 1);
}

/// An HTTP/2 backend written frame by frame, to send what the h2 crate would not: it answers
/// the preface with its SETTINGS and acknowledges the proxy's, then each request's HEADERS with
/// `frames(stream_id)`, as they are; no frames at all close the connection.
async fn raw_h2_backend(frames: fn(u32) -> Vec<u8>) -> Backend {
    raw_h2_backend_seeing(frames).await.0
}

/// The frames a [`raw_h2_backend_seeing`] got from the proxy: type, stream id and payload.
type Seen = Arc<std::sync::Mutex<Vec<(u8, u32, Vec<u8>)>>>;

/// Like [`raw_h2_backend`], and keeps every frame it gets after the preface.
async fn raw_h2_backend_seeing(frames: fn(u32) -> Vec<u8>) -> (Backend, Seen) {
    let seen = Seen::default();
    let log = Arc::clone(&seen);
    let backend = Backend::start(move |mut stream| {
        let log = Arc::clone(&log);
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut preface = [0u8; 24];
            if stream.read_exact(&mut preface).await.is_err() {
                return;
            }
            let settings = [0, 0, 0, 4, 0, 0, 0, 0, 0];
            let ack = [0, 0, 0, 4, 1, 0, 0, 0, 0];
            if stream.write_all(&settings).await.is_err() || stream.write_all(&ack).await.is_err() {
                return;
            }
            loop {
                let mut head = [0u8; 9];
                if stream.read_exact(&mut head).await.is_err() {
                    return;
                }
                let length =
                    usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
                let mut payload = vec![0u8; length];
                if stream.read_exact(&mut payload).await.is_err() {
                    return;
                }
                let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                let kind = head[3];
                log.lock().expect("log").push((kind, id, payload));
                if kind != 1 {
                    continue;
                }
                let answer = frames(id);
                if answer.is_empty() || stream.write_all(&answer).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (backend, seen)
}

/// Whether the proxy reset stream `id` with CANCEL, in what `seen` holds.
fn cancelled(seen: &Seen, id: u32) -> bool {
    seen.lock()
        .expect("log")
        .iter()
        .any(|(kind, of, payload)| *kind == 3 && *of == id && payload[..] == [0, 0, 0, 8])
}

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, id: u32, payload: &[u8]) -> Vec<u8> {
    let length = payload.len() as u32;
    let mut out = length.to_be_bytes()[1..].to_vec();
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A 200 (with `content-length: 100` when `declared`) whose body stops after five bytes with
/// RST_STREAM(NO_ERROR): not a complete response, whatever the error code says.
fn cut_with_no_error(id: u32, declared: bool) -> Vec<u8> {
    // `:status: 200` (static index 8), then `content-length: 100` (a literal on index 28).
    let block: &[u8] = if declared {
        &[0x88, 0x5c, 3, b'1', b'0', b'0']
    } else {
        &[0x88]
    };
    let mut out = frame(1, 0x4, id, block);
    out.extend(frame(0, 0, id, b"short"));
    out.extend(frame(3, 0, id, &[0, 0, 0, 0]));
    out
}

#[tokio::test]
async fn a_body_an_http2_backend_resets_with_no_error_half_way_is_not_complete() {
    let declared = raw_h2_backend(|id| cut_with_no_error(id, true)).await;
    let undeclared = raw_h2_backend(|id| cut_with_no_error(id, false)).await;
    for (backend, length) in [(declared.addr, true), (undeclared.addr, false)] {
        let proxy = proxy_for(&[backend], "upstream_protocol = \"h2\"");
        // An HTTP/2 client: the stream ends in a reset, not with the body's end.
        let mut sender = h2_connect(proxy.addr("l7")).await;
        let response = head_for(&mut sender, "http://svc/cut")
            .await
            .expect("response");
        let (data, ended) = read_to_its_end(&mut response.into_body()).await;
        // What came before the reset may or may not reach the client before the reset does.
        assert!(b"short".starts_with(&data), "length {length}: {data:?}");
        assert!(
            ended.is_err(),
            "length {length}: the cut body ended cleanly"
        );
        // An HTTP/1.1 client: a 502 when none of the answer had been written yet; else what
        // came, and the connection closes with the body not ended (no keep-alive on a body
        // shorter than its Content-Length, no last chunk).
        let text =
            answer_until_a_502_or_the_close(&proxy, b"GET /cut HTTP/1.1\r\nHost: a\r\n\r\n").await;
        let tail = if length {
            "\r\n\r\nshort"
        } else {
            "\r\n\r\n5\r\nshort\r\n"
        };
        assert!(
            text.starts_with("HTTP/1.1 502")
                || (text.starts_with("HTTP/1.1 200") && text.ends_with(tail)),
            "{text}"
        );
    }
}

#[tokio::test]
async fn an_upload_an_http2_client_resets_with_no_error_half_way_is_not_complete() {
    // An HTTP/1.1 backend that tells whether the chunked body it got was ended or cut.
    let (events, mut seen) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    let h1 = {
        let events = events.clone();
        Backend::start(move |mut stream| {
            let events = events.clone();
            async move {
                let mut buf = Vec::new();
                if read_until(&mut stream, &mut buf, b"part\r\n")
                    .await
                    .is_none()
                {
                    return;
                }
                let _ = events.send("data");
                let ended = read_until(&mut stream, &mut buf, b"0\r\n\r\n").await;
                let _ = events.send(if ended.is_some() { "complete" } else { "cut" });
            }
        })
        .await
    };
    // An HTTP/2 one.
    let h2 = h2_backend_with(move |request, _respond| {
        let events = events.clone();
        async move {
            let mut body = request.into_body();
            let mut reported = false;
            loop {
                match body.data().await {
                    Some(Ok(chunk)) => {
                        let _ = body.flow_control().release_capacity(chunk.len());
                        if !std::mem::replace(&mut reported, true) {
                            let _ = events.send("data");
                        }
                    }
                    Some(Err(_)) => {
                        let _ = events.send("cut");
                        return;
                    }
                    None => {
                        let _ = events.send("complete");
                        return;
                    }
                }
            }
        }
    })
    .await;
    for (backend, extra) in [(h1.addr, ""), (h2.addr, "upstream_protocol = \"h2\"")] {
        let proxy = proxy_for(&[backend], extra);
        let mut sender = h2_connect(proxy.addr("l7")).await;
        let request = http::Request::builder()
            .method("POST")
            .uri("http://svc/upload")
            .body(())
            .expect("request");
        let (_response, mut stream) = sender.send_request(request, false).expect("send");
        stream
            .send_data(Bytes::from_static(b"part"), false)
            .expect("data");
        let event = tokio::time::timeout(PATIENCE, seen.recv()).await;
        assert_eq!(event.expect("in time"), Some("data"), "{extra}");
        // A reset is a reset, whatever its code: the rest of the body is not coming.
        stream.send_reset(h2::Reason::NO_ERROR);
        let event = tokio::time::timeout(PATIENCE, seen.recv()).await;
        assert_eq!(event.expect("in time"), Some("cut"), "{extra}");
    }
}

#[tokio::test]
async fn requests_queued_for_a_stream_when_the_backend_goes_away_are_answered_by_a_new_connection()
{
    let release = Arc::new(Notify::new());
    let bye = Arc::new(Notify::new());
    let backend = {
        let (release, bye) = (Arc::clone(&release), Arc::clone(&bye));
        Backend::start(move |stream| {
            let (release, bye) = (Arc::clone(&release), Arc::clone(&bye));
            async move {
                let mut builder = h2::server::Builder::new();
                builder.max_concurrent_streams(1);
                let Ok(mut connection) = builder.handshake::<_, Bytes>(stream).await else {
                    return;
                };
                let mut leaving = false;
                loop {
                    let accepted = tokio::select! {
                        accepted = connection.accept() => accepted,
                        () = bye.notified(), if !leaving => {
                            leaving = true;
                            connection.graceful_shutdown();
                            continue;
                        }
                    };
                    let Some(Ok((request, mut respond))) = accepted else {
                        return;
                    };
                    let head = h2_ok();
                    let Ok(mut send) = respond.send_response(head, false) else {
                        continue;
                    };
                    if request.uri().path() == "/hold" {
                        let release = Arc::clone(&release);
                        tokio::spawn(async move {
                            release.notified().await;
                            let _ = send.send_data(Bytes::from_static(b"held"), true);
                        });
                    } else {
                        let _ = send.send_data(Bytes::from_static(b"ok"), true);
                    }
                }
            }
        })
        .await
    };
    let proxy = proxy_for(&[backend.addr], "upstream_protocol = \"h2\"");
    let state = proxy.registry.get("p", backend.addr).expect("known");
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let mut held = held(&mut sender).await;
    // The backend's only stream is taken: the next requests wait for one at the proxy.
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let mut h2 = sender.clone();
        waiting.push(tokio::spawn(async move { get(&mut h2, "/next").await }));
    }
    let mut h1 = HttpClient::connect(proxy.addr("l7")).await;
    h1.send(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n").await;
    eventually("the requests wait for a stream", || {
        state.active.load(std::sync::atomic::Ordering::SeqCst) == 4
    })
    .await;
    // The backend goes away gracefully: the waiting streams were never sent, and go on a new
    // connection rather than fail.
    bye.notify_one();
    for task in waiting {
        let answer = tokio::time::timeout(PATIENCE, task)
            .await
            .expect("answered in time")
            .expect("task");
        assert_eq!(answer, (200, b"ok".to_vec()));
    }
    let reply = tokio::time::timeout(PATIENCE, h1.reply())
        .await
        .expect("answered in time")
        .expect("a reply");
    assert_eq!((reply.status, reply.text().as_str()), (200, "ok"));
    release.notify_one();
    let (rest, _) = read_all(&mut held).await;
    assert_eq!(rest, b"held");
    assert_eq!(backend.accepted(), 2);
}

#[tokio::test]
async fn an_http2_backend_that_resets_right_after_its_head_is_a_502_for_http11_clients() {
    // `:status: 200`, then RST_STREAM(CANCEL) before any of the body.
    let backend = raw_h2_backend(|id| {
        let mut out = frame(1, 0x4, id, &[0x88]);
        out.extend(frame(3, 0, id, &[0, 0, 0, 8]));
        out
    })
    .await;
    let proxy = proxy_for(&[backend.addr], "upstream_protocol = \"h2\"");
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    client.send(b"GET /cut HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let reply = tokio::time::timeout(PATIENCE, client.reply())
        .await
        .expect("answered in time")
        .expect("a reply, not an empty close");
    assert_eq!(reply.status, 502);
}

/// Stream 1 is reset before its head (INTERNAL_ERROR), stream 3 gets no answer at all (the
/// backend sends a PING instead), and every other stream gets a 200 with `ok`.
fn one_reset_one_silent(id: u32) -> Vec<u8> {
    match id {
        1 => frame(3, 0, id, &[0, 0, 0, 2]),
        3 => frame(6, 0, 0, &[0; 8]),
        _ => {
            let mut out = frame(1, 0x4, id, &[0x88]);
            out.extend(frame(0, 0x1, id, b"ok"));
            out
        }
    }
}

/// Sends a bodiless GET for `path` from an HTTP/1.1 client on a connection of its own, or from
/// `sender`'s HTTP/2 one, and returns the status and the body.
async fn get_either(
    http1: bool,
    proxy: std::net::SocketAddr,
    sender: &mut h2::client::SendRequest<Bytes>,
    path: &str,
) -> (u16, Vec<u8>) {
    if !http1 {
        return get(sender, path).await;
    }
    let mut client = HttpClient::connect(proxy).await;
    let reply = tokio::time::timeout(PATIENCE, client.get(path, ""))
        .await
        .expect("answered in time");
    (reply.status, reply.body)
}

#[tokio::test]
async fn a_stream_that_fails_on_a_shared_http2_backend_connection_fails_alone() {
    for http1 in [false, true] {
        let (backend, seen) = raw_h2_backend_seeing(one_reset_one_silent).await;
        let proxy = proxy_for(
            &[backend.addr],
            "upstream_protocol = \"h2\"\nresponse_timeout = \"300ms\"",
        );
        let addr = proxy.addr("l7");
        let mut sender = h2_connect(addr).await;
        // The backend resets one stream: that request fails alone.
        let (status, _) = get_either(http1, addr, &mut sender, "/reset").await;
        assert_eq!(status, 502, "http1 {http1}");
        // Another one times out: its stream is cancelled at the backend, and only it.
        let (status, _) = get_either(http1, addr, &mut sender, "/silent").await;
        assert_eq!(status, 504, "http1 {http1}");
        eventually("the silent stream is cancelled", || cancelled(&seen, 3)).await;
        // The connection goes on serving the next requests.
        for _ in 0..2 {
            let answer = get_either(http1, addr, &mut sender, "/next").await;
            assert_eq!(answer, (200, b"ok".to_vec()), "http1 {http1}");
        }
        assert_eq!(backend.accepted(), 1, "http1 {http1}");
        assert!(!cancelled(&seen, 5), "http1 {http1}");
    }
}

/// Stream 1 gets a 200 head and five bytes of body, then nothing more (no end, no reset); every
/// other stream gets a 200 with `ok`.
fn stalls_after_its_head(id: u32) -> Vec<u8> {
    let mut out = frame(1, 0x4, id, &[0x88]);
    if id == 1 {
        out.extend(frame(0, 0, id, b"first"));
    } else {
        out.extend(frame(0, 0x1, id, b"ok"));
    }
    out
}

#[tokio::test]
async fn a_body_an_http2_backend_stops_sending_is_cut_after_the_response_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for http1 in [false, true] {
        let (backend, seen) = raw_h2_backend_seeing(stalls_after_its_head).await;
        let proxy = proxy_for(
            &[backend.addr],
            "upstream_protocol = \"h2\"\nresponse_timeout = \"300ms\"",
        );
        let addr = proxy.addr("l7");
        let mut sender = h2_connect(addr).await;
        if http1 {
            // The head is out: the connection closes with the body not ended.
            let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            stream
                .write_all(b"GET /stall HTTP/1.1\r\nHost: a\r\n\r\n")
                .await
                .expect("send");
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match tokio::time::timeout(PATIENCE, stream.read(&mut buf))
                    .await
                    .expect("a close in time")
                {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&got);
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
            assert!(text.ends_with("\r\n\r\n5\r\nfirst\r\n"), "{text}");
        } else {
            // The client's stream ends in a reset.
            let response = head_for(&mut sender, "http://svc/stall")
                .await
                .expect("response");
            assert_eq!(response.status(), 200);
            let mut body = response.into_body();
            let mut data = Vec::new();
            let ended = loop {
                match tokio::time::timeout(PATIENCE, body.data())
                    .await
                    .expect("data or a reset in time")
                {
                    Some(Ok(chunk)) => data.extend_from_slice(&chunk),
                    Some(Err(error)) => break Err(error),
                    None => break Ok(()),
                }
            };
            assert_eq!(data, b"first");
            assert!(ended.is_err(), "the stalled body ended cleanly");
        }
        // The backend's stream is reset, and its connection serves the next request.
        eventually("the stalled stream is cancelled", || cancelled(&seen, 1)).await;
        let answer = get_either(http1, addr, &mut sender, "/next").await;
        assert_eq!(answer, (200, b"ok".to_vec()), "http1 {http1}");
        assert_eq!(backend.accepted(), 1, "http1 {http1}");
    }
}

#[tokio::test]
async fn a_stream_its_client_resets_before_the_head_frees_its_backend_stream() {
    // A backend that takes one stream at a time: `/hold` gets no answer (until it is reset),
    // anything else a 200 with `ok`.
    let (resets, mut reset) = tokio::sync::mpsc::unbounded_channel::<()>();
    let backend = Backend::start(move |stream| {
        let resets = resets.clone();
        async move {
            let mut builder = h2::server::Builder::new();
            builder.max_concurrent_streams(1);
            let Ok(mut connection) = builder.handshake::<_, Bytes>(stream).await else {
                return;
            };
            while let Some(Ok((request, mut respond))) = connection.accept().await {
                if request.uri().path() == "/hold" {
                    let resets = resets.clone();
                    tokio::spawn(async move {
                        if std::future::poll_fn(|cx| respond.poll_reset(cx))
                            .await
                            .is_ok()
                        {
                            let _ = resets.send(());
                        }
                    });
                    continue;
                }
                let head = h2_ok();
                if let Ok(mut send) = respond.send_response(head, false) {
                    let _ = send.send_data(Bytes::from_static(b"ok"), true);
                }
            }
        }
    })
    .await;
    let proxy = proxy_for(&[backend.addr], "upstream_protocol = \"h2\"");
    let state = proxy.registry.get("p", backend.addr).expect("known");
    let mut sender = h2_connect(proxy.addr("l7")).await;
    for round in 0..3 {
        let request = http::Request::builder()
            .uri("http://svc/hold")
            .body(())
            .expect("request");
        let (response, mut stream) = sender.send_request(request, true).expect("send");
        eventually("the backend has the stream", || {
            state.active.load(std::sync::atomic::Ordering::SeqCst) == 1
        })
        .await;
        stream.send_reset(h2::Reason::CANCEL);
        drop(response);
        // The backend's stream is reset, and its only slot serves the next request.
        let event = tokio::time::timeout(PATIENCE, reset.recv()).await;
        assert_eq!(event.expect("reset in time"), Some(()), "round {round}");
        assert_eq!(get(&mut sender, "/next").await, (200, b"ok".to_vec()));
        eventually("no request in flight", || {
            state.active.load(std::sync::atomic::Ordering::SeqCst) == 0
        })
        .await;
    }
    assert_eq!(backend.accepted(), 1);
}

/// An HTTP/2 backend whose every answer is a 200 with a body of `size` bytes, sent as fast as
/// flow control lets it; it counts the bytes of body it has sent.
async fn bulk_h2_backend(size: usize) -> (Backend, Arc<std::sync::atomic::AtomicUsize>) {
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = Arc::clone(&sent);
    let backend = h2_backend_with(move |_request, mut respond| {
        let count = Arc::clone(&count);
        async move {
            let head = http::Response::builder()
                .status(200)
                .header("content-length", size.to_string())
                .body(())
                .expect("response");
            let Ok(mut send) = respond.send_response(head, false) else {
                return;
            };
            let mut left = size;
            while left > 0 {
                send.reserve_capacity(left.min(64 * 1024));
                let Some(Ok(room)) = std::future::poll_fn(|cx| send.poll_capacity(cx)).await else {
                    return;
                };
                let n = room.min(left);
                left -= n;
                if send
                    .send_data(Bytes::from(vec![b'x'; n]), left == 0)
                    .is_err()
                {
                    return;
                }
                count.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
            }
        }
    })
    .await;
    (backend, sent)
}

#[tokio::test]
async fn clients_that_go_away_mid_body_give_back_the_backend_connections_window() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Each answer is larger than a stream's window, and a few of them larger than the whole
    // connection's: the data of abandoned streams must be given back to the backend.
    const SIZE: usize = 4 << 20;
    // Nearly a stream's whole window (hyper's default, 2 MiB) of data the proxy holds.
    const HELD: usize = 2_000_000;
    let (backend, sent) = bulk_h2_backend(SIZE).await;
    let sent_since = |before: usize| sent.load(std::sync::atomic::Ordering::SeqCst) - before;
    let proxy = proxy_for(&[backend.addr], "upstream_protocol = \"h2\"");
    let addr = proxy.addr("l7");
    for round in 0..4 {
        // An HTTP/2 client that takes a piece, then resets its stream.
        let mut sender = h2_connect(addr).await;
        let request = http::Request::builder()
            .uri("http://svc/big")
            .body(())
            .expect("request");
        let before = sent.load(std::sync::atomic::Ordering::SeqCst);
        let (response, mut stream) = sender.send_request(request, true).expect("send");
        let mut body = head_of(response).await.expect("response").into_body();
        let piece = tokio::time::timeout(PATIENCE, body.data())
            .await
            .expect("data in time");
        assert!(matches!(piece, Some(Ok(_))), "round {round}");
        eventually("the backend filled the stream's window", || {
            sent_since(before) >= HELD
        })
        .await;
        stream.send_reset(h2::Reason::CANCEL);
        drop(body);
        // An HTTP/1.1 client that reads a piece, then closes its connection.
        let before = sent.load(std::sync::atomic::Ordering::SeqCst);
        let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        client
            .write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("send");
        let mut buf = vec![0u8; 64 * 1024];
        let n = tokio::time::timeout(PATIENCE, client.read(&mut buf))
            .await
            .expect("a piece in time")
            .expect("read");
        assert!(n > 0, "round {round}");
        eventually("the backend filled the stream's window", || {
            sent_since(before) >= HELD
        })
        .await;
        drop(client);
    }
    // The connection still has the window for whole answers.
    let mut sender = h2_connect(addr).await;
    let (status, data) = get(&mut sender, "/big").await;
    assert_eq!((status, data.len()), (200, SIZE));
    let mut client = HttpClient::connect(addr).await;
    let reply = tokio::time::timeout(PATIENCE, client.get("/big", ""))
        .await
        .expect("answered in time");
    assert_eq!((reply.status, reply.body.len()), (200, SIZE));
    assert_eq!(backend.accepted(), 1);
}

/// Stream 1 gets no answer and no window for its body (the backend sends a PING instead);
/// every other stream gets a 200 with `ok`.
fn silent_first(id: u32) -> Vec<u8> {
    if id == 1 {
        return frame(6, 0, 0, &[0; 8]);
    }
    let mut out = frame(1, 0x4, id, &[0x88]);
    out.extend(frame(0, 0x1, id, b"ok"));
    out
}

#[tokio::test]
async fn an_upload_an_http2_backend_stops_taking_fails_alone() {
    // Far more than the backend's window for the stream (65,535 bytes), and than the proxy
    // holds on its way: the rest is never taken.
    const UPLOAD: usize = 2_000_000;
    for http1 in [false, true] {
        let (backend, seen) = raw_h2_backend_seeing(silent_first).await;
        let proxy = proxy_for(
            &[backend.addr],
            "upstream_protocol = \"h2\"\nresponse_timeout = \"300ms\"",
        );
        let addr = proxy.addr("l7");
        let mut sender = h2_connect(addr).await;
        let status = if http1 {
            use tokio::io::AsyncWriteExt;
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (mut read, mut write) = stream.into_split();
            let mut request =
                format!("POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {UPLOAD}\r\n\r\n")
                    .into_bytes();
            request.extend(std::iter::repeat_n(b'x', UPLOAD));
            // Not all of it is read: the writer stops when the proxy answers and closes.
            let writer = tokio::spawn(async move {
                let _ = write.write_all(&request).await;
                write
            });
            let mut buf = Vec::new();
            let reply = tokio::time::timeout(PATIENCE, read_reply(&mut read, &mut buf))
                .await
                .expect("answered in time")
                .expect("a reply");
            writer.abort();
            reply.status
        } else {
            let request = http::Request::builder()
                .method("POST")
                .uri("http://svc/upload")
                .body(())
                .expect("request");
            let (response, mut stream) = sender.send_request(request, false).expect("send");
            stream
                .send_data(Bytes::from(vec![b'x'; UPLOAD]), true)
                .expect("data");
            head_of(response).await.expect("response").status().as_u16()
        };
        assert_eq!(status, 504, "http1 {http1}");
        // The stream is cancelled at the backend, and the connection serves the next request.
        eventually("the upload's stream is cancelled", || cancelled(&seen, 1)).await;
        let answer = get_either(http1, addr, &mut sender, "/next").await;
        assert_eq!(answer, (200, b"ok".to_vec()), "http1 {http1}");
        assert_eq!(backend.accepted(), 1, "http1 {http1}");
    }
}

#[tokio::test]
async fn grpc_calls_get_the_proxys_own_errors_as_grpc_statuses() {
    let dead = dead_addr().await;
    let proxy = Proxy::start(&format!(
        r#"
[[listeners]]
name = "l7"
bind = "127.0.0.1:0"
protocol = "http"

  [[listeners.routes]]
  match = {{ path_prefix = "/svc." }}
  pool = "p"

[pools.p]
upstream_protocol = "h2"
backends = ["{dead}"]
"#
    ));
    let mut sender = h2_connect(proxy.addr("l7")).await;
    // (path, content type, expected HTTP status, expected grpc-status)
    let cases = [
        ("/svc.Echo/Call", "application/grpc", 200, Some("14")),
        ("/svc.Echo/Call", "application/grpc+proto", 200, Some("14")),
        ("/other.Echo/Call", "application/grpc", 200, Some("12")),
        // Not gRPC: the plain HTTP error, gRPC-Web included (it carries its status otherwise).
        ("/svc.Echo/Call", "application/grpc-web", 502, None),
        ("/svc.Echo/Call", "application/json", 502, None),
        ("/other.Echo/Call", "text/plain", 404, None),
    ];
    for (path, content_type, status, code) in cases {
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://svc{path}"))
            .header("content-type", content_type)
            .header("te", "trailers")
            .body(())
            .expect("request");
        let (response, _) = sender.send_request(request, true).expect("send");
        let response = head_of(response).await.expect("response");
        let what = format!("{path} as {content_type}");
        assert_eq!(response.status(), status, "{what}");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(header("grpc-status").as_deref(), code, "{what}");
        if code.is_some() {
            assert_eq!(header("content-type").as_deref(), Some("application/grpc"));
            let message = header("grpc-message").expect("grpc-message");
            assert!(
                message.starts_with(if path.starts_with("/svc.") {
                    "502 "
                } else {
                    "404 "
                }),
                "{what}: {message}"
            );
            // Trailers-only: the head ends the stream.
            assert!(response.body().is_end_stream(), "{what}");
        }
        let mut body = response.into_body();
        let (data, _) = read_all(&mut body).await;
        assert_eq!(data.is_empty(), code.is_some(), "{what}");
    }
}

/// An HTTP/2 backend whose `/hold` streams get no answer and whose `/trickle` streams get a 200
/// and a piece of body every 10 ms (for a minute at most), both until the proxy resets them,
/// which `resets` counts; anything else gets a 200 with `ok`.
async fn cancelled_backend(resets: Arc<std::sync::atomic::AtomicUsize>) -> Backend {
    h2_backend_with(move |request, mut respond| {
        let resets = Arc::clone(&resets);
        async move {
            let path = request.uri().path().to_owned();
            let reset = match path.as_str() {
                "/hold" => std::future::poll_fn(|cx| respond.poll_reset(cx)).await,
                "/trickle" => {
                    let Ok(mut send) = respond.send_response(h2_ok(), false) else {
                        return;
                    };
                    let mut ticks = tokio::time::interval(Duration::from_millis(10));
                    let mut reset = None;
                    for _ in 0..6000 {
                        tokio::select! {
                            r = std::future::poll_fn(|cx| send.poll_reset(cx)) => {
                                reset = Some(r);
                                break;
                            }
                            _ = ticks.tick() => {
                                let _ = send.send_data(Bytes::from_static(b"tick\n"), false);
                            }
                        }
                    }
                    match reset {
                        Some(reset) => reset,
                        None => return,
                    }
                }
                _ => {
                    if let Ok(mut send) = respond.send_response(h2_ok(), false) {
                        let _ = send.send_data(Bytes::from_static(b"ok"), true);
                    }
                    return;
                }
            };
            if reset.is_ok() {
                resets.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    })
    .await
}

/// A client that gives its request up (an HTTP/2 stream reset before or after the response
/// head, an HTTP/1.1 client that leaves) has the backend's stream cancelled: the backend did
/// nothing wrong, and outlier detection must not count it, or impatient clients would get
/// healthy backends ejected. A stream the backend leaves unanswered past `response_timeout` is
/// the backend's failure, and counts.
#[tokio::test]
async fn streams_their_clients_cancel_are_not_held_against_an_http2_backend() {
    use std::sync::atomic::Ordering::SeqCst;
    let resets = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let backend = cancelled_backend(Arc::clone(&resets)).await;
    // One failure would eject the backend, and it may be ejected.
    let outlier = "outlier = { consecutive_failures = 1, max_ejected_percent = 100 }";
    let proxy = proxy_for(
        &[backend.addr],
        &format!("upstream_protocol = \"h2\"\nresponse_timeout = \"1m\"\n{outlier}"),
    );
    let addr = proxy.addr("l7");
    let state = proxy.registry.get("p", backend.addr).expect("known");
    let mut sender = h2_connect(addr).await;
    let request = |path: &str| {
        http::Request::builder()
            .uri(format!("http://svc{path}"))
            .body(())
            .expect("request")
    };
    let mut cancelled = 0;
    for round in 0..3 {
        // An HTTP/2 client resets its stream before the response head.
        let (response, mut stream) = sender.send_request(request("/hold"), true).expect("send");
        eventually("the backend has the stream", || {
            state.active.load(SeqCst) == 1
        })
        .await;
        stream.send_reset(h2::Reason::CANCEL);
        drop(response);
        cancelled += 1;
        eventually("the backend's stream reset", || {
            resets.load(SeqCst) == cancelled
        })
        .await;
        // One resets its stream while the body comes.
        let (response, mut stream) = sender
            .send_request(request("/trickle"), true)
            .expect("send");
        let mut body = head_of(response).await.expect("response").into_body();
        let first = tokio::time::timeout(PATIENCE, body.data()).await;
        assert!(matches!(first, Ok(Some(Ok(_)))), "round {round}");
        stream.send_reset(h2::Reason::CANCEL);
        drop(body);
        cancelled += 1;
        eventually("the backend's stream reset", || {
            resets.load(SeqCst) == cancelled
        })
        .await;
        // An HTTP/1.1 client leaves while its answer is awaited, and one while the body comes.
        let mut client = HttpClient::connect(addr).await;
        client
            .send(b"GET /hold HTTP/1.1\r\nHost: svc\r\n\r\n")
            .await;
        eventually("the backend has the stream", || {
            state.active.load(SeqCst) == 1
        })
        .await;
        drop(client);
        cancelled += 1;
        eventually("the backend's stream reset", || {
            resets.load(SeqCst) == cancelled
        })
        .await;
        let mut client = HttpClient::connect(addr).await;
        let head = client
            .head_of(b"GET /trickle HTTP/1.1\r\nHost: svc\r\n\r\n")
            .await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        drop(client);
        cancelled += 1;
        eventually("the backend's stream reset", || {
            resets.load(SeqCst) == cancelled
        })
        .await;
    }
    assert_eq!(state.consecutive_failures.load(SeqCst), 0);
    assert_eq!(state.ejections.load(SeqCst), 0);
    assert!(state.is_usable());
    assert_eq!(get(&mut sender, "/next").await, (200, b"ok".to_vec()));
    // Every stream went on the one connection: no cancel was taken for its failure.
    assert_eq!(backend.accepted(), 1);

    // The same backend, left without an answer past the response timeout: that counts.
    let impatient = proxy_for(
        &[backend.addr],
        &format!("upstream_protocol = \"h2\"\nresponse_timeout = \"100ms\"\n{outlier}"),
    );
    let state = impatient.registry.get("p", backend.addr).expect("known");
    let mut sender = h2_connect(impatient.addr("l7")).await;
    assert_eq!(get(&mut sender, "/hold").await.0, 504);
    assert_eq!(state.consecutive_failures.load(SeqCst), 1);
    assert_eq!(state.ejections.load(SeqCst), 1);
}

/// An HTTP/2 backend whose answers end with trailers carrying fields a trailer section may not
/// (RFC 9110 section 6.5.1: framing and Host), beside one it may.
async fn forbidden_trailers_backend() -> Backend {
    h2_backend_with(|_request, mut respond| async move {
        let Ok(mut stream) = respond.send_response(h2_ok(), false) else {
            return;
        };
        let _ = stream.send_data(Bytes::from_static(b"hello"), false);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", http::HeaderValue::from_static("ok"));
        trailers.insert("content-length", http::HeaderValue::from_static("99"));
        trailers.insert("host", http::HeaderValue::from_static("elsewhere.example"));
        trailers.insert(
            "x-forwarded-for",
            http::HeaderValue::from_static("192.0.2.1"),
        );
        let _ = stream.send_trailers(trailers);
    })
    .await
}

#[tokio::test]
async fn framing_and_host_trailers_of_an_http2_backend_reach_no_client() {
    let backend = forbidden_trailers_backend().await;
    let proxy = proxy_for(&[backend.addr], "upstream_protocol = \"h2\"");

    let mut sender = h2_connect(proxy.addr("l7")).await;
    for _ in 0..2 {
        let (response, _) = sender
            .send_request(grpc_request("/svc"), true)
            .expect("send");
        let response = head_of(response).await.expect("a response");
        assert_eq!(response.status(), 200);
        let (data, trailers) = read_all(&mut response.into_body()).await;
        assert_eq!(data, b"hello");
        let trailers = trailers.expect("trailers");
        assert_eq!(
            trailers.get("x-checksum").map(|v| v.as_bytes()),
            Some(&b"ok"[..])
        );
        for name in ["content-length", "host", "x-forwarded-for"] {
            assert!(trailers.get(name).is_none(), "{name}: {trailers:?}");
        }
    }

    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    for _ in 0..2 {
        client
            .send(b"GET /svc HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n")
            .await;
        let reply = client.reply().await.expect("a reply");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), "hello");
        let names: Vec<String> = reply
            .trailers
            .iter()
            .map(|(name, _)| name.to_ascii_lowercase())
            .collect();
        assert!(names.iter().any(|n| n == "x-checksum"), "{names:?}");
        for name in ["content-length", "host", "x-forwarded-for"] {
            assert!(!names.iter().any(|n| n == name), "{name}: {names:?}");
        }
    }
}

/// An HTTP/1.1 backend that answers an upload at once with a 413 and closes with the body
/// unread: an HTTP/2 client gets that answer, as an HTTP/1.1 client does, and the backend is not
/// held to have failed.
#[tokio::test]
async fn an_early_answer_of_an_http11_backend_to_an_upload_reaches_http2_clients() {
    let backend = early_413_backend().await;
    let proxy = proxy_for(&[backend.addr], "");
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let request = http::Request::builder()
        .method("PUT")
        .uri("http://a/upload")
        .body(())
        .expect("request");
    let (response, mut upload) = sender.send_request(request, false).expect("send");
    // Queued whole; the h2 crate sends it as the windows allow.
    let _ = upload.send_data(Bytes::from(vec![b'u'; 16 << 20]), true);
    let response = head_of(response).await.expect("a response");
    assert_eq!(response.status(), 413);
    let (data, _) = read_all(&mut response.into_body()).await;
    assert_eq!(data, b"too big!");
    let state = proxy.registry.get("p", backend.addr).expect("state");
    assert_eq!(
        state
            .consecutive_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// Checks that a GET from an HTTP/2 client, then one from an HTTP/1.1 client, are answered 502.
async fn a_502_for_both_kinds_of_client(proxy: &Proxy) {
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let response = head_for(&mut sender, "http://a/")
        .await
        .expect("a response");
    assert_eq!(response.status(), 502);
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    assert_eq!(client.get("/", "").await.status, 502);
}

/// A 101 to a request that asked for no upgrade leaves the backend's connection in a protocol
/// the proxy does not speak: an HTTP/2 client gets a 502 at once, as an HTTP/1.1 client does,
/// rather than waiting out the response timeout for a response that will never come.
#[tokio::test]
async fn a_101_nobody_asked_for_is_a_502_for_http2_clients_at_once() {
    use tokio::io::AsyncWriteExt;
    let backend = Backend::start(|mut stream| async move {
        let mut buf = Vec::new();
        if read_until(&mut stream, &mut buf, b"\r\n\r\n")
            .await
            .is_none()
        {
            return;
        }
        let _ = stream
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
            .await;
        // Waits for the other protocol's bytes until the proxy closes.
        while fill(&mut stream, &mut buf).await {}
    })
    .await;
    let proxy = proxy_for(&[backend.addr], "response_timeout = \"60s\"");
    a_502_for_both_kinds_of_client(&proxy).await;
}

#[tokio::test]
async fn a_status_code_over_599_from_an_http2_backend_is_a_502_for_both_kinds_of_client() {
    let backend = h2_backend_with(|_request, mut respond| async move {
        let response = http::Response::builder()
            .status(600)
            .body(())
            .expect("response");
        if let Ok(mut stream) = respond.send_response(response, false) {
            let _ = stream.send_data(Bytes::from_static(b"ok"), true);
        }
    })
    .await;
    let proxy = proxy_for(&[backend.addr], "upstream_protocol = \"h2\"");
    a_502_for_both_kinds_of_client(&proxy).await;
}

/// A head with `connection: close`, which HTTP/2 forbids (RFC 9113 section 8.2.2).
fn connection_field(id: u32) -> Vec<u8> {
    let mut block = vec![0x88, 0x00, 10];
    block.extend_from_slice(b"connection");
    block.push(5);
    block.extend_from_slice(b"close");
    frame(1, 0x5, id, &block)
}

/// A head with `content-length: 10` and a body of five bytes that ends the stream.
fn short_of_its_length(id: u32) -> Vec<u8> {
    let mut out = frame(1, 0x4, id, &[0x88, 0x5c, 2, b'1', b'0']);
    out.extend(frame(0, 0x1, id, b"short"));
    out
}

#[tokio::test]
async fn malformed_answers_of_http2_backends_never_reach_a_client_as_valid() {
    let forbidden = raw_h2_backend(connection_field).await;
    let proxy = proxy_for(&[forbidden.addr], "upstream_protocol = \"h2\"");
    a_502_for_both_kinds_of_client(&proxy).await;
    let state = proxy.registry.get("p", forbidden.addr).expect("state");
    assert!(
        state
            .consecutive_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );

    let short = raw_h2_backend(short_of_its_length).await;
    let proxy = proxy_for(&[short.addr], "upstream_protocol = \"h2\"");
    let mut sender = h2_connect(proxy.addr("l7")).await;
    match head_for(&mut sender, "http://a/").await {
        Ok(response) if response.status() == 200 => {
            let (_, ended) = read_to_its_end(&mut response.into_body()).await;
            assert!(ended.is_err(), "a body short of its length ended cleanly");
        }
        Ok(response) => assert_eq!(response.status(), 502),
        Err(_) => {}
    }
    let text = answer_until_a_502_or_the_close(&proxy, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    // A 502, or the head with its length and less than that: never ten bytes of body.
    assert!(
        text.starts_with("HTTP/1.1 502")
            || (text.starts_with("HTTP/1.1 200")
                && text.contains("content-length: 10\r\n")
                && text
                    .split_once("\r\n\r\n")
                    .is_some_and(|(_, body)| body.len() < 10)),
        "{text}"
    );
}

/// A 204 with `content-length: 4` that goes on with a DATA frame, neither of which a response
/// without content may have (RFC 9110 sections 6.4.1 and 8.6).
fn no_content_with_data(id: u32) -> Vec<u8> {
    let mut out = frame(1, 0x4, id, &[0x89, 0x5c, 1, b'4']);
    out.extend(frame(0, 0x1, id, b"oops"));
    out
}

#[tokio::test]
async fn content_an_http2_backend_sends_with_a_204_reaches_no_client() {
    let backend = raw_h2_backend(no_content_with_data).await;
    let proxy = proxy_for(&[backend.addr], "upstream_protocol = \"h2\"");
    let mut sender = h2_connect(proxy.addr("l7")).await;
    for _ in 0..2 {
        let response = head_for(&mut sender, "http://a/")
            .await
            .expect("a response");
        assert_eq!(response.status(), 204);
        assert!(
            response.headers().get("content-length").is_none(),
            "{:?}",
            response.headers()
        );
        let (data, _) = read_all(&mut response.into_body()).await;
        assert!(data.is_empty(), "{data:?}");
    }
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    for _ in 0..2 {
        let head = client.head_of(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(head.starts_with("http/1.1 204"), "{head}");
        assert!(!head.contains("content-length"), "{head}");
    }
}
