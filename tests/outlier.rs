//! Passive health (a pool's `outlier`) and responses whose body the backend fails after its
//! head: a reset, a stall, fewer bytes than announced. Such a backend is failing, whatever the
//! status its head gave, on every path: HTTP/1.1 and HTTP/2 clients, HTTP/1.1 and HTTP/2
//! backends, compressed or spliced. A client that leaves is not the backend's failure.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

/// The length every failing backend announces, of which it sends [`SENT`] bytes: what is left
/// is long enough to be spliced.
const ANNOUNCED: usize = 100_000;
const SENT: usize = 40_000;

/// One http listener `l7` (with `listener_extra`) on pool `p`: `bad` as its one primary,
/// `good` as a backup that serves once `bad` is ejected, after two failures in a row.
fn config(bad: SocketAddr, good: SocketAddr, listener_extra: &str, pool_extra: &str) -> String {
    format!(
        r#"
[admin]
bind = "127.0.0.1:0"

[[listeners]]
name = "l7"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "p"
{listener_extra}

[pools.p]
backends = ["{bad}", {{ address = "{good}", backup = true }}]
outlier = {{ consecutive_failures = 2, base_ejection_time = "1m" }}
{pool_extra}
"#
    )
}

/// What `/api/state` says of backend `addr`.
async fn backend_state(proxy: &Proxy, addr: SocketAddr) -> serde_json::Value {
    let api = proxy.handle.admin_addr().expect("admin configured");
    let mut client = HttpClient::connect(api).await;
    client
        .send(
            format!("GET /api/state HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
    let mut rest = Vec::new();
    let reply = tokio::time::timeout(PATIENCE, read_reply(&mut client.stream, &mut rest))
        .await
        .expect("an answer in time")
        .expect("an answer");
    let state: serde_json::Value = serde_json::from_slice(&reply.body).expect("json");
    state["pools"][0]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .find(|b| b["address"] == addr.to_string())
        .cloned()
        .expect("the backend is listed")
}

/// How an HTTP/1.1 backend fails a body.
#[derive(Clone, Copy)]
enum Cut {
    /// It resets the connection.
    Reset,
    /// It closes the connection cleanly, short of the length it announced.
    Short,
    /// It sends nothing more, holding the connection until the proxy closes it.
    Stall,
}

/// An HTTP/1.1 backend that answers each request with a 200 announcing [`ANNOUNCED`] bytes of
/// text, sends [`SENT`] of them, and fails the rest as `how` says once `cut` is notified.
async fn cutting_h1(cut: Arc<Notify>, how: Cut) -> Backend {
    Backend::start(move |mut stream| {
        let cut = Arc::clone(&cut);
        async move {
            let mut buf = Vec::new();
            if read_until(&mut stream, &mut buf, b"\r\n\r\n")
                .await
                .is_none()
            {
                return;
            }
            let mut answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {ANNOUNCED}\r\n\r\n"
            )
            .into_bytes();
            answer.extend(std::iter::repeat_n(b'x', SENT));
            if stream.write_all(&answer).await.is_err() {
                return;
            }
            cut.notified().await;
            match how {
                Cut::Reset => {
                    let _ =
                        socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
                }
                Cut::Short => {
                    let _ = stream.shutdown().await;
                }
                Cut::Stall => {
                    let mut rest = Vec::new();
                    let _ = stream.read_to_end(&mut rest).await;
                }
            }
        }
    })
    .await
}

/// An HTTP/2 backend that answers each stream with a 200, sends [`SENT`] bytes of text, and
/// resets the stream once `cut` is notified.
async fn cutting_h2(cut: Arc<Notify>) -> Backend {
    h2_backend_with(move |_request, mut respond| {
        let cut = Arc::clone(&cut);
        async move {
            let head = http::Response::builder()
                .status(200)
                .header("content-type", "text/plain")
                .body(())
                .expect("response");
            let Ok(mut body) = respond.send_response(head, false) else {
                return;
            };
            if body
                .send_data(bytes::Bytes::from(vec![b'x'; SENT]), false)
                .is_err()
            {
                return;
            }
            cut.notified().await;
            body.send_reset(h2::Reason::INTERNAL_ERROR);
        }
    })
    .await
}

/// An HTTP/2 backend that answers `good`.
async fn good_h2() -> Backend {
    h2_backend_with(|_request, mut respond| async move {
        let head = http::Response::builder()
            .status(200)
            .header("x-backend", "good")
            .body(())
            .expect("response");
        if let Ok(mut body) = respond.send_response(head, false) {
            let _ = body.send_data(bytes::Bytes::from_static(b"good"), true);
        }
    })
    .await
}

/// How a test client asks.
#[derive(Clone, Copy)]
enum Client {
    Http1,
    Http2,
}

/// One GET through the proxy whose backend fails the body: the head comes (200), then the
/// backend is told to cut, and the client's body ends in an error, never complete.
async fn cut_request(client: Client, proxy: SocketAddr, cut: &Notify, gzip: bool) {
    let encoding = if gzip { "gzip" } else { "identity" };
    match client {
        Client::Http1 => {
            let mut stream = tokio::net::TcpStream::connect(proxy)
                .await
                .expect("connect");
            stream
                .write_all(
                    format!("GET / HTTP/1.1\r\nHost: t\r\nAccept-Encoding: {encoding}\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .expect("write");
            let mut got = Vec::new();
            let head = read_until(&mut stream, &mut got, b"\r\n\r\n")
                .await
                .expect("a head");
            let head = String::from_utf8_lossy(&got[..head]).into_owned();
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            cut.notify_one();
            let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut got))
                .await
                .expect("the connection ends");
            if !gzip {
                assert!(got.len() < head.len() + ANNOUNCED, "the body was cut");
            }
        }
        Client::Http2 => {
            let mut sender = h2_connect(proxy).await;
            let request = http::Request::builder()
                .uri(format!("http://{proxy}/"))
                .header("accept-encoding", encoding)
                .body(())
                .expect("request");
            let (response, _) = sender.send_request(request, true).expect("send");
            let response = tokio::time::timeout(PATIENCE, response)
                .await
                .expect("a head in time")
                .expect("a head");
            assert_eq!(response.status(), 200);
            cut.notify_one();
            let mut body = response.into_body();
            let failed = tokio::time::timeout(PATIENCE, async {
                loop {
                    match body.data().await {
                        Some(Ok(_)) => {}
                        Some(Err(_)) => return true,
                        None => return false,
                    }
                }
            })
            .await
            .expect("the body ends");
            assert!(failed, "the stream ends in an error, not cleanly");
        }
    }
}

/// A GET through the proxy; the `x-backend` of its answer.
async fn served_by(client: Client, proxy: SocketAddr) -> String {
    match client {
        Client::Http1 => {
            let mut c = HttpClient::connect(proxy).await;
            c.get("/", "")
                .await
                .header("x-backend")
                .unwrap_or("none")
                .to_owned()
        }
        Client::Http2 => {
            let mut sender = h2_connect(proxy).await;
            let request = http::Request::builder()
                .uri(format!("http://{proxy}/"))
                .body(())
                .expect("request");
            let (response, _) = sender.send_request(request, true).expect("send");
            let response = tokio::time::timeout(PATIENCE, response)
                .await
                .expect("an answer in time")
                .expect("an answer");
            response
                .headers()
                .get("x-backend")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_owned()
        }
    }
}

/// Two requests whose body the primary fails eject it (with `consecutive_failures = 2`), as
/// `/api/state` shows, and the next request goes to the backup.
async fn two_cut_bodies_eject(client: Client, h2_pool: bool, listener_extra: &str, gzip: bool) {
    two_failed_bodies_eject(client, h2_pool, listener_extra, "", gzip, Cut::Reset).await;
}

/// [`two_cut_bodies_eject`] with more keys for the pool, and HTTP/1.1 backends that fail their
/// bodies as `how` says.
async fn two_failed_bodies_eject(
    client: Client,
    h2_pool: bool,
    listener_extra: &str,
    more_pool: &str,
    gzip: bool,
    how: Cut,
) {
    let cut = Arc::new(Notify::new());
    let (bad, good) = if h2_pool {
        (cutting_h2(Arc::clone(&cut)).await, good_h2().await)
    } else {
        (
            cutting_h1(Arc::clone(&cut), how).await,
            http_backend("good").await,
        )
    };
    let pool_extra = if h2_pool {
        format!("upstream_protocol = \"h2\"\n{more_pool}")
    } else {
        more_pool.to_owned()
    };
    let proxy = Proxy::start(&config(bad.addr, good.addr, listener_extra, &pool_extra));
    let addr = proxy.addr("l7");
    for _ in 0..2 {
        cut_request(client, addr, &cut, gzip).await;
        // The request is over on its backend once the proxy has seen the end of the body.
        eventually_async("the cut request over", || async {
            backend_state(&proxy, bad.addr).await["active"] == 0
        })
        .await;
    }
    let state = backend_state(&proxy, bad.addr).await;
    assert_eq!(state["ejected"], true, "{state}");
    assert_eq!(state["ejections"], 1, "{state}");
    assert_eq!(state["body_failures"], 2, "{state}");
    assert_eq!(served_by(client, addr).await, "good");
}

#[tokio::test]
async fn an_http1_backend_that_cuts_its_spliced_bodies_is_ejected() {
    two_cut_bodies_eject(Client::Http1, false, "", false).await;
}

#[tokio::test]
async fn an_http1_backend_whose_bodies_end_short_of_their_length_is_ejected() {
    two_failed_bodies_eject(
        Client::Http1,
        false,
        "splice = false",
        "",
        false,
        Cut::Short,
    )
    .await;
    two_failed_bodies_eject(Client::Http2, false, "", "", false, Cut::Short).await;
}

#[tokio::test]
async fn an_http1_backend_whose_bodies_stall_past_the_response_timeout_is_ejected() {
    let timeout = "response_timeout = \"200ms\"";
    two_failed_bodies_eject(Client::Http1, false, "", timeout, false, Cut::Stall).await;
    two_failed_bodies_eject(Client::Http2, false, "", timeout, false, Cut::Stall).await;
}

#[tokio::test]
async fn an_http1_backend_that_cuts_its_bodies_is_ejected_when_compressing() {
    two_cut_bodies_eject(
        Client::Http1,
        false,
        "splice = false\ncompression = { algorithms = [\"gzip\"] }",
        true,
    )
    .await;
}

#[tokio::test]
async fn an_http1_backend_that_cuts_its_bodies_to_http2_clients_is_ejected() {
    two_cut_bodies_eject(Client::Http2, false, "", false).await;
}

#[tokio::test]
async fn an_http1_backend_that_cuts_compressed_bodies_to_http2_clients_is_ejected() {
    two_cut_bodies_eject(
        Client::Http2,
        false,
        "compression = { algorithms = [\"gzip\"] }",
        true,
    )
    .await;
}

#[tokio::test]
async fn an_http2_backend_that_resets_its_streams_mid_body_is_ejected() {
    two_cut_bodies_eject(Client::Http1, true, "", false).await;
}

#[tokio::test]
async fn an_http2_backend_that_resets_its_streams_mid_body_to_http2_clients_is_ejected() {
    two_cut_bodies_eject(Client::Http2, true, "", false).await;
}

#[tokio::test]
async fn an_http2_backend_that_resets_compressed_streams_mid_body_is_ejected() {
    two_cut_bodies_eject(
        Client::Http2,
        true,
        "compression = { algorithms = [\"gzip\"] }",
        true,
    )
    .await;
}

/// A backend that streams a long body, counting the bodies it could not finish (the proxy let
/// go of it).
async fn streaming(ended: Arc<AtomicUsize>) -> Backend {
    Backend::start(move |mut stream| {
        let ended = Arc::clone(&ended);
        async move {
            let mut buf = Vec::new();
            if read_until(&mut stream, &mut buf, b"\r\n\r\n")
                .await
                .is_none()
            {
                return;
            }
            let head =
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000000000\r\n\r\n";
            if stream.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let piece = vec![b'x'; 64 << 10];
            // Bounded: the proxy lets go long before this much.
            for _ in 0..(1_000_000_000 / piece.len()) {
                if stream.write_all(&piece).await.is_err() {
                    break;
                }
            }
            ended.fetch_add(1, SeqCst);
        }
    })
    .await
}

/// Clients that leave in the middle of a body are no failure of the backend's: after two, it
/// is neither ejected nor charged with a failed body, and still serves.
#[tokio::test]
async fn clients_that_leave_mid_body_do_not_eject_the_backend() {
    for client in [Client::Http1, Client::Http2] {
        let ended = Arc::new(AtomicUsize::new(0));
        let backend = streaming(Arc::clone(&ended)).await;
        let good = http_backend("good").await;
        let proxy = Proxy::start(&config(backend.addr, good.addr, "", ""));
        let addr = proxy.addr("l7");
        for n in 1..=2 {
            match client {
                Client::Http1 => {
                    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
                    stream
                        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                        .await
                        .expect("write");
                    let mut got = Vec::new();
                    read_until(&mut stream, &mut got, b"\r\n\r\n")
                        .await
                        .expect("a head");
                    // Gone, with the body still coming.
                    let _ =
                        socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
                }
                Client::Http2 => {
                    let mut sender = h2_connect(addr).await;
                    let request = http::Request::builder()
                        .uri(format!("http://{addr}/"))
                        .body(())
                        .expect("request");
                    let (response, _) = sender.send_request(request, true).expect("send");
                    let response = tokio::time::timeout(PATIENCE, response)
                        .await
                        .expect("a head in time")
                        .expect("a head");
                    assert_eq!(response.status(), 200);
                }
            }
            eventually("the proxy let go of the backend", || {
                ended.load(SeqCst) == n
            })
            .await;
        }
        let state = backend_state(&proxy, backend.addr).await;
        assert_eq!(state["ejected"], false, "{state}");
        assert_eq!(state["body_failures"], 0, "{state}");
        // It still serves (the backup would say who it is).
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("write");
        let mut got = Vec::new();
        let end = read_until(&mut stream, &mut got, b"\r\n\r\n")
            .await
            .expect("a head");
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("x-backend"), "{head}");
    }
}
