//! What operators saw under load, reduced: nothing a client sent on an open connection is lost
//! to a reload, a drain, an upgrade or a shutdown.

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Waits until `addr` refuses connections: the accept loop has seen the shutdown. Every task the
/// same cancellation woke (the connections') has run by then, since the test's runtime has one
/// thread and a refusal takes a turn of its reactor.
async fn refused(addr: std::net::SocketAddr) {
    eventually_async("the listener closes", || async {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
}

#[tokio::test]
async fn a_request_sent_on_a_kept_alive_connection_just_after_the_drain_began_is_answered() {
    // A client in the middle of a burst: it has had its response and sends the next request at
    // once, which crosses the start of the drain. Closing the connection under it would lose the
    // request (wrk counts one read error per connection at every upgrade); it is answered with
    // `Connection: close` instead, and the client reconnects, to the new process after an
    // upgrade.
    let backend = http_backend("b").await;
    let mut proxy = Proxy::start(&single_pool(
        &[backend.addr],
        "park_idle_after = \"off\"",
        "",
    ));
    let addr = proxy.addr("l7");
    let mut client = HttpClient::connect(addr).await;
    assert_eq!(client.get("/first", "").await.status, 200);
    proxy.shutdown.cancel();
    refused(addr).await;
    client
        .send(b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n")
        .await;
    let reply = client.reply().await.expect("answered, not dropped");
    assert_eq!(reply.status, 200);
    assert!(reply.text().contains("GET /second"), "{}", reply.text());
    assert_eq!(reply.header("connection"), Some("close"));
    assert!(client.closed().await);
    assert_eq!(proxy.drained().await, 0);
}

/// Size of the body [`big_body_backend`] answers with.
const BIG: usize = 4 << 20;

/// An HTTP/1.1 backend that answers every request with [`BIG`] bytes.
async fn big_body_backend() -> Backend {
    Backend::start(|mut stream| async move {
        let mut buf = Vec::new();
        while read_until(&mut stream, &mut buf, b"\r\n\r\n")
            .await
            .is_some()
        {
            buf.clear();
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n");
            if stream.write_all(head.as_bytes()).await.is_err()
                || stream.write_all(&vec![b'x'; BIG]).await.is_err()
            {
                return;
            }
        }
    })
    .await
}

/// An HTTP/2 frame of `kind` with `flags` on `stream`.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_response_finished_in_the_drain_reaches_a_client_that_still_sends() {
    // A client that reads slower than the proxy writes, and keeps sending frames (window updates,
    // pings) as it reads, as curl and browsers do. At the drain the proxy finishes the stream,
    // sends its GOAWAY and is done with the connection while the end of the response still sits
    // in its socket's send queue; a frame that arrives after the socket is closed makes the
    // kernel answer with a reset and throw that queue away, so the client got a response cut
    // short (curl: "HTTP/2 stream was not closed cleanly", "Connection reset by peer") that the
    // access log counts as complete. The proxy reads on until the client closes.
    let backend = big_body_backend().await;
    let mut proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    // A small receive buffer, so that most of the response waits in the proxy's send queue.
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut client = socket.connect(proxy.addr("l7")).await.expect("connect");
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS_INITIAL_WINDOW_SIZE at its largest, and as much for the connection: flow control
    // never holds the proxy back, only the socket does.
    hello.extend(frame(0x4, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]));
    hello.extend(frame(0x8, 0, 0, &(0x7fff_ffff_u32 - 65_535).to_be_bytes()));
    // GET / on stream 1: :method GET, :path /, :scheme http (static table), :authority a.
    hello.extend(frame(0x1, 0x5, 1, &[0x82, 0x84, 0x86, 0x41, 0x01, b'a']));
    client.write_all(&hello).await.expect("send the request");
    let ping = frame(0x6, 0, 0, &[0; 8]);
    let mut buf = Vec::new();
    let mut body = 0usize;
    let mut ended = false;
    let mut draining = false;
    let outcome = tokio::time::timeout(PATIENCE, async {
        loop {
            // Whole frames first.
            while buf.len() >= 9 {
                let len =
                    usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
                if buf.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (buf[3], buf[4]);
                let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
                match (kind, stream) {
                    // DATA of the response.
                    (0x0, 1) => {
                        body += len;
                        ended |= flags & 0x1 != 0;
                        // The drain starts once the response is under way.
                        if !draining {
                            proxy.shutdown.cancel();
                            draining = true;
                        }
                    }
                    // The server's PINGs (its graceful shutdown sends one), answered.
                    (0x6, 0) if flags & 0x1 == 0 => {
                        let pong = frame(0x6, 0x1, 0, &buf[9..9 + len]);
                        client.write_all(&pong).await?;
                    }
                    // The server's SETTINGS, acknowledged.
                    (0x4, 0) if flags & 0x1 == 0 => {
                        client.write_all(&frame(0x4, 0x1, 0, &[])).await?;
                    }
                    _ => {}
                }
                buf.drain(..9 + len);
            }
            if ended {
                return Ok::<_, std::io::Error>(());
            }
            let mut chunk = [0u8; 8192];
            let n = client.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
            // A frame for each read, as a client that acknowledges what it takes.
            client.write_all(&ping).await?;
        }
    })
    .await
    .expect("the response in time");
    assert!(
        outcome.is_ok() && body == BIG,
        "{outcome:?} after {body} of {BIG} bytes"
    );
    drop(client);
    assert_eq!(proxy.drained().await, 0);
}

#[tokio::test]
async fn a_request_sent_on_a_parked_connection_just_after_the_drain_began_is_answered() {
    // The same for a client that pauses between requests long enough to be parked (a page's
    // polling, an API client): its next request may cross the start of the drain too.
    let backend = http_backend("b").await;
    let mut proxy = Proxy::start(&single_pool(
        &[backend.addr],
        "park_idle_after = \"10ms\"",
        "",
    ));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    assert_eq!(client.get("/first", "").await.status, 200);
    eventually("the idle connection is parked", || {
        proxy.handle.parked_connections() == 1
    })
    .await;
    proxy.shutdown.cancel();
    eventually("the lot lets go of it", || {
        proxy.handle.parked_connections() == 0
    })
    .await;
    client
        .send(b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n")
        .await;
    let reply = client.reply().await.expect("answered, not dropped");
    assert_eq!(reply.status, 200);
    assert!(reply.text().contains("GET /second"), "{}", reply.text());
    assert_eq!(reply.header("connection"), Some("close"));
    assert!(client.closed().await);
    assert_eq!(proxy.drained().await, 0);
}
