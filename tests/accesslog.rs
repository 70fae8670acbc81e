//! How an http exchange ended, as its access log line says it (`end` in JSON, appended to a
//! combined line) and `switchyard_http_incomplete_total` counts it: for HTTP/1.1 and HTTP/2
//! clients, HTTP/1.1 and HTTP/2 backends.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use switchyard::access_log::End;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// A proxy with two http listeners on pool `p`: `json` logs JSON lines, `clf` combined ones.
struct Logged {
    proxy: Proxy,
    json: PathBuf,
    clf: PathBuf,
}

impl Logged {
    /// `global` goes into `[global]`, `listener_extra` into both listeners, `pool_extra` into
    /// `[pools.p]`.
    fn start(
        name: &str,
        backend: SocketAddr,
        global: &str,
        listener_extra: &str,
        pool_extra: &str,
    ) -> Logged {
        let json = fresh_log(&format!("end-{name}-json"));
        let clf = fresh_log(&format!("end-{name}-clf"));
        let listener = |name: &str, path: &PathBuf, format: &str| {
            format!(
                "[[listeners]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"p\"\naccess_log = {{ path = \"{}\", format = \"{format}\" }}\n{listener_extra}\n",
                path.display()
            )
        };
        let toml = format!(
            "[global]\n{global}\n[admin]\nbind = \"127.0.0.1:0\"\n{}{}[pools.p]\nbackends = [\"{backend}\"]\n{pool_extra}\n",
            listener("json", &json, "json"),
            listener("clf", &clf, "combined"),
        );
        Logged {
            proxy: Proxy::start(&toml),
            json,
            clf,
        }
    }

    /// The listeners, JSON first.
    fn addrs(&self) -> [SocketAddr; 2] {
        [self.proxy.addr("json"), self.proxy.addr("clf")]
    }

    /// Waits for `count` lines in each log and returns the last of each: the JSON line parsed,
    /// and the combined one.
    async fn last(&self, count: usize) -> (serde_json::Value, String) {
        let json = json_lines(&self.json, count).await.pop().expect("a line");
        eventually("combined lines", || {
            log_text(&self.clf).lines().count() == count
        })
        .await;
        let clf = log_text(&self.clf)
            .lines()
            .last()
            .expect("a line")
            .to_owned();
        (json, clf)
    }

    /// Checks that the last lines say the exchange ended as `end` (`None`: normally), with
    /// `status`, and counts it for both listeners.
    async fn expect(&self, count: usize, status: u16, end: End) {
        let (json, clf) = self.last(count).await;
        assert_eq!(json["status"], status, "{json}");
        let last = clf.rsplit(' ').next().expect("a field");
        match end.name() {
            Some(name) => {
                assert_eq!(json["end"], name, "{json}");
                assert_eq!(last, name, "{clf}");
                assert!(clf.contains(&format!("\" {status} ")), "{clf}");
            }
            None => {
                assert!(json.get("end").is_none(), "{json}");
                // The time in milliseconds ends a complete exchange's line, as before.
                assert!(last.parse::<f64>().is_ok(), "{clf}");
            }
        }
        if let Some(index) = End::INCOMPLETE.iter().position(|e| *e == end) {
            for listener in ["json", "clf"] {
                let stats = self.proxy.stats(listener);
                eventually("the exchange counted", || {
                    stats.incomplete[index].load(Ordering::SeqCst) > 0
                })
                .await;
            }
        }
    }
}

/// How an HTTP/1.1 test backend ends the body it promised 100,000 bytes of, after 1,000.
#[derive(Clone, Copy)]
enum Cut {
    /// A FIN: a body short of its Content-Length.
    Close,
    /// A reset.
    Reset,
    /// Chunked, and closed without the last chunk.
    NoLastChunk,
    /// Nothing more, the connection kept open until the proxy lets go.
    Stall,
}

/// An HTTP/1.1 backend that answers every request with a 200 whose body it ends as `cut` says.
async fn cut_backend(cut: Cut) -> Backend {
    Backend::start(move |mut stream| async move {
        let mut buf = Vec::new();
        if read_until(&mut stream, &mut buf, b"\r\n\r\n")
            .await
            .is_none()
        {
            return;
        }
        let answer = match cut {
            Cut::NoLastChunk => {
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n3e8\r\n{}\r\n",
                    "x".repeat(1000)
                )
            }
            _ => format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 100000\r\n\r\n{}",
                "x".repeat(1000)
            ),
        };
        let _ = stream.write_all(answer.as_bytes()).await;
        match cut {
            Cut::Reset => {
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            }
            Cut::Stall => {
                let mut sink = Vec::new();
                let _ = stream.read_to_end(&mut sink).await;
            }
            Cut::Close | Cut::NoLastChunk => {}
        }
    })
    .await
}

/// An HTTP/1.1 GET of `/` through `proxy`, read until the proxy closes: the status and how many
/// body bytes came.
async fn h1_get(proxy: SocketAddr) -> (u16, usize) {
    let (status, body, _) = h1_get_with(proxy, "").await;
    (status, body)
}

/// [`h1_get`] with `extra` header lines (each ended by CRLF); the response head too.
async fn h1_get_with(proxy: SocketAddr, extra: &str) -> (u16, usize, String) {
    let mut stream = TcpStream::connect(proxy).await.expect("connect");
    stream
        .write_all(format!("GET / HTTP/1.1\r\nHost: a\r\n{extra}\r\n").as_bytes())
        .await
        .expect("send");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got);
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let end = text.find("\r\n\r\n").map_or(got.len(), |i| i + 4);
    (status, got.len() - end, text[..end].to_ascii_lowercase())
}

/// An HTTP/2 GET of `/` through `proxy`: the status, the body bytes, and whether the body ended
/// in an error (a reset) rather than cleanly.
async fn h2_get(proxy: SocketAddr) -> (u16, usize, bool) {
    h2_get_with(proxy, None).await
}

/// [`h2_get`] with an `accept-encoding` field.
async fn h2_get_with(proxy: SocketAddr, accept_encoding: Option<&str>) -> (u16, usize, bool) {
    let mut sender = h2_connect(proxy).await;
    let mut request = http::Request::get(format!("http://{proxy}/"));
    if let Some(coding) = accept_encoding {
        request = request.header("accept-encoding", coding);
    }
    let request = request.body(()).expect("request");
    let (response, _) = sender.send_request(request, true).expect("send");
    let response = tokio::time::timeout(PATIENCE, response)
        .await
        .expect("a head in time")
        .expect("a head");
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut len = 0;
    let failed = tokio::time::timeout(PATIENCE, async {
        while let Some(chunk) = body.data().await {
            match chunk {
                Ok(chunk) => {
                    len += chunk.len();
                    let _ = body.flow_control().release_capacity(chunk.len());
                }
                Err(_) => return true,
            }
        }
        false
    })
    .await
    .expect("the body ends in time");
    (status, len, failed)
}

#[tokio::test]
async fn a_complete_exchange_has_no_end() {
    let backend = http_backend("a").await;
    let logged = Logged::start("complete", backend.addr, "", "", "");
    let [json, clf] = logged.addrs();
    let mut count = 0;
    for addr in [json, clf] {
        assert_eq!(
            HttpClient::connect(addr).await.get("/", "").await.status,
            200
        );
    }
    count += 1;
    logged.expect(count, 200, End::Complete).await;
    for addr in [json, clf] {
        let (status, _, failed) = h2_get(addr).await;
        assert_eq!((status, failed), (200, false));
    }
    count += 1;
    logged.expect(count, 200, End::Complete).await;
    for listener in ["json", "clf"] {
        let stats = logged.proxy.stats(listener);
        assert!(
            stats
                .incomplete
                .iter()
                .all(|c| c.load(Ordering::SeqCst) == 0)
        );
    }
}

#[tokio::test]
async fn a_body_the_backend_cuts_is_backend_cut_for_both_kinds_of_client() {
    for (name, cut) in [
        ("close", Cut::Close),
        ("reset", Cut::Reset),
        ("chunks", Cut::NoLastChunk),
    ] {
        let backend = cut_backend(cut).await;
        let logged = Logged::start(&format!("cut-{name}"), backend.addr, "", "", "");
        for addr in logged.addrs() {
            let (status, body) = h1_get(addr).await;
            assert_eq!(status, 200);
            assert!((1000..100_000).contains(&body), "{body}");
        }
        logged.expect(1, 200, End::BackendCut).await;
        let (json, _) = logged.last(1).await;
        // The bytes that did go out, head included, not none.
        assert!(json["bytes"].as_u64().is_some_and(|b| b > 1000), "{json}");
        for addr in logged.addrs() {
            let (status, _, failed) = h2_get(addr).await;
            assert_eq!((status, failed), (200, true), "{name}");
        }
        logged.expect(2, 200, End::BackendCut).await;
    }
}

#[tokio::test]
async fn a_compressed_body_the_backend_cuts_is_backend_cut_for_both_kinds_of_client() {
    let backend = cut_backend(Cut::Close).await;
    let logged = Logged::start(
        "cut-gzip",
        backend.addr,
        "",
        "compression = { algorithms = [\"gzip\"] }",
        "",
    );
    for addr in logged.addrs() {
        let (status, _, head) = h1_get_with(addr, "Accept-Encoding: gzip\r\n").await;
        assert_eq!(status, 200);
        assert!(head.contains("content-encoding: gzip"), "{head}");
    }
    logged.expect(1, 200, End::BackendCut).await;
    for addr in logged.addrs() {
        let (status, _, failed) = h2_get_with(addr, Some("gzip")).await;
        assert_eq!((status, failed), (200, true));
    }
    logged.expect(2, 200, End::BackendCut).await;
}

#[tokio::test]
async fn a_body_the_backend_stalls_is_backend_timeout_for_both_kinds_of_client() {
    let backend = cut_backend(Cut::Stall).await;
    let logged = Logged::start(
        "timeout",
        backend.addr,
        "",
        "",
        "response_timeout = \"200ms\"",
    );
    for addr in logged.addrs() {
        assert_eq!(h1_get(addr).await.0, 200);
    }
    logged.expect(1, 200, End::BackendTimeout).await;
    for addr in logged.addrs() {
        let (status, _, failed) = h2_get(addr).await;
        assert_eq!((status, failed), (200, true));
    }
    logged.expect(2, 200, End::BackendTimeout).await;
    // The same count in /metrics, by listener and end, and a row for every other end.
    let api = logged.proxy.handle.admin_addr().expect("admin");
    let mut client = HttpClient::connect(api).await;
    client
        .send(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let metrics = client.reply().await.expect("an answer").text();
    for listener in ["json", "clf"] {
        let row = format!(
            "switchyard_http_incomplete_total{{listener=\"{listener}\",end=\"backend_timeout\"}} 2"
        );
        assert!(metrics.contains(&row), "{metrics}");
        let row = format!(
            "switchyard_http_incomplete_total{{listener=\"{listener}\",end=\"client_gone\"}} 0"
        );
        assert!(metrics.contains(&row), "{metrics}");
    }
}

/// An HTTP/2 backend that answers with a 200 and 1,000 bytes, then, once `go` is notified (the
/// client has them), resets its stream.
async fn h2_resetting_backend(go: Arc<Notify>) -> Backend {
    h2_backend_with(move |_request, mut respond| {
        let go = Arc::clone(&go);
        async move {
            let Ok(mut stream) = respond.send_response(h2_ok(), false) else {
                return;
            };
            stream.reserve_capacity(1000);
            let _ = stream.send_data(Bytes::from(vec![b'x'; 1000]), false);
            go.notified().await;
            stream.send_reset(h2::Reason::INTERNAL_ERROR);
        }
    })
    .await
}

#[tokio::test]
async fn an_http2_backend_resetting_its_stream_mid_body_is_backend_cut() {
    let go = Arc::new(Notify::new());
    let backend = h2_resetting_backend(Arc::clone(&go)).await;
    let logged = Logged::start(
        "h2-reset",
        backend.addr,
        "",
        "",
        "upstream_protocol = \"h2\"",
    );
    for addr in logged.addrs() {
        let mut client = HttpClient::connect(addr).await;
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") || got.len() < 1000 {
            assert!(
                tokio::time::timeout(PATIENCE, fill(&mut client.stream, &mut got))
                    .await
                    .expect("the head and the first bytes in time"),
                "closed early"
            );
        }
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        go.notify_one();
        assert!(client.closed().await);
    }
    logged.expect(1, 200, End::BackendCut).await;
    for addr in logged.addrs() {
        let mut sender = h2_connect(addr).await;
        let request = http::Request::get(format!("http://{addr}/"))
            .body(())
            .expect("request");
        let (response, _) = sender.send_request(request, true).expect("send");
        let response = response.await.expect("a head");
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let first = body.data().await.expect("data").expect("data");
        assert!(!first.is_empty());
        go.notify_one();
        let mut failed = false;
        while let Some(chunk) = tokio::time::timeout(PATIENCE, body.data())
            .await
            .expect("the end in time")
        {
            if chunk.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "a body cut short ends in a reset");
    }
    logged.expect(2, 200, End::BackendCut).await;
}

#[tokio::test]
async fn a_client_that_leaves_mid_body_is_client_gone() {
    let (backend, _) = huge_answer_backend().await;
    let logged = Logged::start("gone", backend.addr, "", "", "");
    for addr in logged.addrs() {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("send");
        let mut buf = vec![0u8; 64 * 1024];
        let n = stream.read(&mut buf).await.expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        // Closed with bytes unread: a reset.
        drop(stream);
    }
    logged.expect(1, 200, End::ClientGone).await;
    for addr in logged.addrs() {
        let mut sender = h2_connect(addr).await;
        let request = http::Request::get(format!("http://{addr}/"))
            .body(())
            .expect("request");
        let (response, _) = sender.send_request(request, true).expect("send");
        let response = response.await.expect("a head");
        let mut body = response.into_body();
        body.data().await.expect("data").expect("data");
        // The stream is reset (CANCEL) as its body is dropped unread.
        drop(body);
    }
    logged.expect(2, 200, End::ClientGone).await;
}

#[tokio::test]
async fn a_client_gone_before_the_head_is_a_499_client_gone() {
    // The backend never answers: its head is waited for until the client leaves.
    let silent = Backend::start(|mut stream| async move {
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink).await;
    })
    .await;
    let logged = Logged::start("499", silent.addr, "", "", "");
    for addr in logged.addrs() {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("send");
        eventually("the request reached the backend", || silent.accepted() > 0).await;
        drop(stream);
    }
    logged.expect(1, 499, End::ClientGone).await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_client_stalled() {
    let (backend, finished) = huge_answer_backend().await;
    let logged = Logged::start(
        "stalled",
        backend.addr,
        "",
        "",
        "response_timeout = \"300ms\"",
    );
    let mut held = Vec::new();
    for addr in logged.addrs() {
        finished.store(false, Ordering::SeqCst);
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("send");
        // Nothing is read: the proxy's writes wait, then give up.
        eventually("the proxy let go of the backend", || {
            finished.load(Ordering::SeqCst)
        })
        .await;
        held.push(stream);
    }
    logged.expect(1, 200, End::ClientStalled).await;
    for addr in logged.addrs() {
        finished.store(false, Ordering::SeqCst);
        let mut sender = h2_connect(addr).await;
        let request = http::Request::get(format!("http://{addr}/"))
            .body(())
            .expect("request");
        let (response, _) = sender.send_request(request, true).expect("send");
        let response = response.await.expect("a head");
        // The body is never read, and its window never released.
        eventually("the proxy let go of the backend", || {
            finished.load(Ordering::SeqCst)
        })
        .await;
        // The line is written once the stream goes, and says why the body stopped.
        drop(response);
        drop(sender);
    }
    logged.expect(2, 200, End::ClientStalled).await;
}

#[tokio::test]
async fn a_body_the_drain_deadline_cuts_is_drained() {
    for client in ["h1", "h2"] {
        let backend = cut_backend(Cut::Stall).await;
        let mut logged = Logged::start(
            &format!("drained-{client}"),
            backend.addr,
            "drain_timeout = \"200ms\"",
            "",
            "",
        );
        let mut bodies = Vec::new();
        let mut h1 = Vec::new();
        for addr in logged.addrs() {
            if client == "h1" {
                let mut stream = TcpStream::connect(addr).await.expect("connect");
                stream
                    .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                    .await
                    .expect("send");
                let mut got = Vec::new();
                while got.len() < 1000 {
                    assert!(fill(&mut stream, &mut got).await, "closed early");
                }
                h1.push(stream);
            } else {
                let mut sender = h2_connect(addr).await;
                let request = http::Request::get(format!("http://{addr}/"))
                    .body(())
                    .expect("request");
                let (response, _) = sender.send_request(request, true).expect("send");
                let mut body = response.await.expect("a head").into_body();
                body.data().await.expect("data").expect("data");
                bodies.push((sender, body));
            }
        }
        logged.proxy.shutdown.cancel();
        logged.proxy.drained().await;
        logged.expect(1, 200, End::Drained).await;
    }
}

#[tokio::test]
async fn an_http2_backend_stalling_mid_body_is_backend_timeout() {
    // Never notified: the backend holds its stream after the first bytes.
    let backend = h2_resetting_backend(Arc::new(Notify::new())).await;
    let logged = Logged::start(
        "h2-stall",
        backend.addr,
        "",
        "",
        "upstream_protocol = \"h2\"\nresponse_timeout = \"200ms\"",
    );
    for addr in logged.addrs() {
        let (status, body) = h1_get(addr).await;
        assert_eq!((status, body >= 1000), (200, true));
    }
    logged.expect(1, 200, End::BackendTimeout).await;
    for addr in logged.addrs() {
        let (status, _, failed) = h2_get(addr).await;
        assert_eq!((status, failed), (200, true));
    }
    logged.expect(2, 200, End::BackendTimeout).await;
}

#[tokio::test]
async fn a_spliced_body_the_backend_cuts_logs_the_bytes_that_went_out() {
    // 1,000 bytes with the head; once the client has them (the proxy is past the head, into
    // the body, which it splices), 50,000 more, and a close short of the 100,000 announced.
    let go = Arc::new(Notify::new());
    let more = Arc::clone(&go);
    let backend = Backend::start(move |mut stream| {
        let more = Arc::clone(&more);
        async move {
            let mut buf = Vec::new();
            if read_until(&mut stream, &mut buf, b"\r\n\r\n")
                .await
                .is_none()
            {
                return;
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n{}",
                "x".repeat(1000)
            );
            let _ = stream.write_all(head.as_bytes()).await;
            more.notified().await;
            let _ = stream.write_all(&[b'y'; 50_000]).await;
        }
    })
    .await;
    let logged = Logged::start("cut-spliced", backend.addr, "", "splice = true", "");
    for addr in logged.addrs() {
        let mut client = HttpClient::connect(addr).await;
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
        let mut got = Vec::new();
        while !got.ends_with(b"x") || got.len() < 1000 {
            assert!(
                tokio::time::timeout(PATIENCE, fill(&mut client.stream, &mut got))
                    .await
                    .expect("the head and the first bytes in time"),
                "closed early"
            );
        }
        go.notify_one();
        while tokio::time::timeout(PATIENCE, fill(&mut client.stream, &mut got))
            .await
            .expect("the close in time")
        {}
        let body = got.len() - got.windows(4).position(|w| w == b"\r\n\r\n").expect("head") - 4;
        assert_eq!(body, 51_000);
    }
    logged.expect(1, 200, End::BackendCut).await;
    let (json, _) = logged.last(1).await;
    assert!(json["bytes"].as_u64().is_some_and(|b| b > 51_000), "{json}");
}
