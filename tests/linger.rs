//! Lingering close of HTTP/1.1 connections: an answer the proxy gives before it has read the
//! request's body, and then closes on, reaches a client that is still sending; and the proxy
//! does not wait on such a client for long.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// What an upload declares: far more than any `max_body_size` here.
const DECLARED: usize = 10_000_000;
/// The pieces the client sends it in, and how much it sends at most before an answer: less
/// than the proxy reads at most while it waits for the client to close.
const PIECE: usize = 64 << 10;
const SENT_AT_MOST: usize = 640 << 10;
/// The size of the first request's echoed body: its answer fills the client's small receive
/// window and waits in part in the proxy's socket, and the next answer waits behind it.
const FIRST: usize = 12_000;

/// A connection to `addr` with a small receive buffer, so that answers it has not read yet
/// wait in the proxy's socket, where a reset would throw them away.
async fn small_window_client(addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("receive buffer");
    socket.connect(addr).await.expect("connect")
}

/// Requests the listener `l7` of `proxy` has answered, by the counters of its routes.
fn answered(proxy: &Proxy) -> u64 {
    let stats = proxy.stats("l7");
    ["default", "unrouted", "up"]
        .iter()
        .map(|label| {
            let route = stats.route(label);
            route
                .responses
                .iter()
                .map(|c| c.load(std::sync::atomic::Ordering::SeqCst))
                .sum::<u64>()
        })
        .sum()
}

/// On one connection: a POST whose answer (an echo of [`FIRST`] bytes) the client does not
/// read yet, then `PUT /up` declaring [`DECLARED`] bytes and sending pieces of them until it
/// was answered too, and another piece after that. Then it reads: both whole answers must arrive,
/// ending with the proxy's FIN. Returns what came after the first answer and whether the read
/// ended with an error (a reset).
async fn answered_while_sending(proxy: &Proxy) -> (Vec<u8>, bool) {
    let mut stream = small_window_client(proxy.addr("l7")).await;
    let before = answered(proxy);
    let first = format!("POST /first HTTP/1.1\r\nHost: a\r\nContent-Length: {FIRST}\r\n\r\n");
    stream.write_all(first.as_bytes()).await.expect("head");
    stream.write_all(&[b'f'; FIRST]).await.expect("body");
    eventually("the first answer written", || answered(proxy) == before + 1).await;
    let head = format!("PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: {DECLARED}\r\n\r\n");
    stream
        .write_all(head.as_bytes())
        .await
        .expect("upload head");
    let piece = vec![b'u'; PIECE];
    // A backend's early answer comes once the proxy finds it no longer takes the body: the
    // body goes on until the answer was given, up to a bound.
    let mut sent = 0;
    while answered(proxy) < before + 2 && sent < SENT_AT_MOST {
        match tokio::time::timeout(PATIENCE, stream.write_all(&piece)).await {
            Ok(Ok(())) => sent += PIECE,
            Ok(Err(_)) => break,
            Err(_) => panic!("a write blocked for {PATIENCE:?}"),
        }
        // The proxy runs on this thread too.
        tokio::task::yield_now().await;
    }
    eventually("the upload answered", || answered(proxy) == before + 2).await;
    // Still sending as the answer is on its way.
    let _ = tokio::time::timeout(PATIENCE, stream.write_all(&piece)).await;
    let mut buf = Vec::new();
    let reply = read_reply(&mut stream, &mut buf)
        .await
        .expect("the whole first answer, not cut by a reset");
    assert_eq!(reply.status, 200);
    assert!(reply.body.len() > FIRST, "the whole echo");
    let mut got = buf;
    let mut scratch = [0u8; 4096];
    let mut reset = false;
    loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut scratch))
            .await
            .expect("the proxy closes in time")
        {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&scratch[..n]),
            Err(_) => {
                reset = true;
                break;
            }
        }
    }
    (got, reset)
}

/// Asserts that `got` is one whole answer with `status` and a body of its Content-Length.
fn assert_whole_answer(got: &[u8], reset: bool, status: u16) {
    let text = String::from_utf8_lossy(got);
    assert!(
        text.starts_with(&format!("HTTP/1.1 {status} ")),
        "a {status} (reset: {reset}): {text:?}"
    );
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole head");
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .expect("a content-length");
    assert_eq!(
        body.len(),
        length,
        "the whole body (reset: {reset}): {text:?}"
    );
    assert!(!reset, "ended with the proxy's FIN, not a reset");
}

fn limited(backend: SocketAddr, listener_extra: &str) -> String {
    single_pool(&[backend], listener_extra, "")
}

#[tokio::test]
async fn a_413_for_a_declared_length_reaches_a_client_still_sending() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&limited(backend.addr, "max_body_size = \"1m\""));
    for _ in 0..3 {
        let (got, reset) = answered_while_sending(&proxy).await;
        assert_whole_answer(&got, reset, 413);
    }
}

#[tokio::test]
async fn a_403_of_the_access_list_reaches_a_client_still_sending() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&limited(
        backend.addr,
        r#"routes = [{ match = { path_prefix = "/up" }, pool = "p", name = "up", deny = ["127.0.0.1"] }]"#,
    ));
    for _ in 0..3 {
        let (got, reset) = answered_while_sending(&proxy).await;
        assert_whole_answer(&got, reset, 403);
    }
}

#[tokio::test]
async fn a_backends_early_413_reaches_a_client_still_sending() {
    // Echoes POSTs; answers a PUT with a 413 as soon as its head is read, and closes.
    let backend = Backend::start(|mut stream| async move {
        let mut buf = Vec::new();
        while let Some(end) = read_until(&mut stream, &mut buf, b"\r\n\r\n").await {
            if buf.starts_with(b"PUT") {
                let answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\n\r\ntoo big!";
                let _ = stream.write_all(answer).await;
                return;
            }
            buf.drain(..end + 4);
            while buf.len() < FIRST {
                if !fill(&mut stream, &mut buf).await {
                    return;
                }
            }
            let body = buf.split_off(FIRST);
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", FIRST + 1);
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&buf).await;
            let _ = stream.write_all(b"\n").await;
            buf = body;
        }
    })
    .await;
    let proxy = Proxy::start(&limited(backend.addr, ""));
    for _ in 0..3 {
        let (got, reset) = answered_while_sending(&proxy).await;
        assert_whole_answer(&got, reset, 413);
    }
}

#[tokio::test]
async fn a_client_that_never_stops_sending_is_closed_on_soon() {
    let backend = http_backend("b").await;
    let proxy = Proxy::start(&limited(backend.addr, "max_body_size = \"1m\""));
    let stream = TcpStream::connect(proxy.addr("l7")).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let head = format!("PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: {DECLARED}\r\n\r\n");
    writer.write_all(head.as_bytes()).await.expect("head");
    // Reads the answer and then waits for the end, as a client does that reads and writes at
    // once.
    let reading = tokio::spawn(async move {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, reader.read_to_end(&mut got)).await;
        got
    });
    let began = Instant::now();
    let piece = vec![b'u'; 1024];
    let mut closed = false;
    // Paced, so that the byte bound is not what ends it: the time bound is.
    let mut pace = tokio::time::interval(Duration::from_millis(5));
    while began.elapsed() < Duration::from_secs(5) {
        pace.tick().await;
        match tokio::time::timeout(Duration::from_secs(5), writer.write_all(&piece)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                closed = true;
                break;
            }
            Err(_) => break,
        }
    }
    assert!(closed, "the proxy closed on a client that kept sending");
    assert!(
        began.elapsed() < Duration::from_secs(4),
        "within the bound: {:?}",
        began.elapsed()
    );
    let got = reading.await.expect("reader");
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 413 "),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
}
