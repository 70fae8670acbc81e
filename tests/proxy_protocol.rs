//! The PROXY protocol, received from trusted peers and sent to backends, end to end.

mod common;

use std::net::SocketAddr;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A backend that parses the PROXY header it is sent and answers
/// `"<version> <source> <destination> | <payload>"`, the payload being what followed the header.
async fn header_reporter() -> Backend {
    Backend::start(|mut stream| async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let reply = match ppp::HeaderResult::parse(&buf) {
            ppp::HeaderResult::V1(Ok(h)) => {
                format!(
                    "v1 {} | {}",
                    h.addresses_str(),
                    String::from_utf8_lossy(&buf[h.header.len()..])
                )
            }
            ppp::HeaderResult::V2(Ok(h)) => {
                let (src, dst) = match h.addresses {
                    ppp::v2::Addresses::IPv4(a) => (
                        SocketAddr::from((a.source_address, a.source_port)),
                        SocketAddr::from((a.destination_address, a.destination_port)),
                    ),
                    ppp::v2::Addresses::IPv6(a) => (
                        SocketAddr::from((a.source_address, a.source_port)),
                        SocketAddr::from((a.destination_address, a.destination_port)),
                    ),
                    _ => panic!("unexpected address family"),
                };
                format!(
                    "v2 {src} {dst} | {}",
                    String::from_utf8_lossy(&buf[h.len()..])
                )
            }
            _ => format!("none | {}", String::from_utf8_lossy(&buf)),
        };
        let _ = stream.write_all(reply.as_bytes()).await;
    })
    .await
}

async fn exchange(proxy: SocketAddr, bytes: &[u8]) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(proxy).await?;
    stream.write_all(bytes).await?;
    stream.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut back))
        .await
        .expect("answer or close in time")?;
    Ok(String::from_utf8_lossy(&back).into_owned())
}

/// A tcp listener `edge` that takes PROXY headers `accept` from `trusted`, in front of `backend`,
/// to which it sends `send` headers. The header's deadline is the default one, a bound no
/// header sent in pieces on a loaded machine comes near.
fn config(accept: &str, trusted: &str, send: &str, backend: SocketAddr) -> String {
    config_with(accept, trusted, send, backend, "")
}

/// [`config`] with `listener_extra` in the listener's table.
fn config_with(
    accept: &str,
    trusted: &str,
    send: &str,
    backend: SocketAddr,
    listener_extra: &str,
) -> String {
    format!(
        r#"
[[listeners]]
name = "edge"
bind = "127.0.0.1:0"
protocol = "tcp"
pool = "p"
proxy_protocol = "{accept}"
trusted_proxies = [{trusted}]
{listener_extra}

[pools.p]
backends = ["{backend}"]
send_proxy_protocol = "{send}"
"#
    )
}

const V1_HEADER: &[u8] = b"PROXY TCP4 203.0.113.9 198.51.100.1 5555 443\r\n";

fn v2_header() -> Vec<u8> {
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (
            "[2001:db8::9]:6666".parse::<SocketAddr>().expect("addr"),
            "[2001:db8::1]:443".parse::<SocketAddr>().expect("addr"),
        ),
    )
    .build()
    .expect("header")
}

#[tokio::test]
async fn v1_and_v2_from_a_trusted_peer_carry_the_client_to_the_backend() {
    let backend = header_reporter().await;
    for send in ["v1", "v2"] {
        let proxy = Proxy::start(&config("any", "\"127.0.0.0/8\"", send, backend.addr));
        let addr = proxy.addr("edge");

        let mut v1 = V1_HEADER.to_vec();
        v1.extend_from_slice(b"hello");
        let reply = exchange(addr, &v1).await.expect("served");
        let expected = if send == "v1" {
            "v1 203.0.113.9 198.51.100.1 5555 443 | hello"
        } else {
            "v2 203.0.113.9:5555 198.51.100.1:443 | hello"
        };
        assert_eq!(reply, expected);

        let mut v2 = v2_header();
        v2.extend_from_slice(b"world");
        let reply = exchange(addr, &v2).await.expect("served");
        let expected = if send == "v1" {
            "v1 2001:db8::9 2001:db8::1 6666 443 | world"
        } else {
            "v2 [2001:db8::9]:6666 [2001:db8::1]:443 | world"
        };
        assert_eq!(reply, expected);
    }
}

#[tokio::test]
async fn a_listener_takes_only_the_versions_it_names() {
    let backend = header_reporter().await;
    let proxy = Proxy::start(&config("v2", "\"127.0.0.1\"", "v2", backend.addr));
    let addr = proxy.addr("edge");
    let refused = exchange(addr, V1_HEADER).await.unwrap_or_default();
    assert_eq!(refused, "");
    let served = exchange(addr, &v2_header()).await.expect("served");
    assert!(served.starts_with("v2 [2001:db8::9]:6666"), "{served}");
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn an_untrusted_peer_is_refused() {
    let backend = header_reporter().await;
    let proxy = Proxy::start(&config("any", "\"10.0.0.0/8\"", "v2", backend.addr));
    let reply = exchange(proxy.addr("edge"), V1_HEADER)
        .await
        .unwrap_or_default();
    assert_eq!(reply, "");
    assert_eq!(backend.accepted(), 0);
}

#[tokio::test]
async fn without_a_header_the_peer_address_is_sent() {
    let backend = header_reporter().await;
    for send in ["v1", "v2"] {
        let proxy = Proxy::start(&format!(
            r#"
[[listeners]]
name = "edge"
bind = "127.0.0.1:0"
protocol = "tcp"
pool = "p"

[pools.p]
backends = ["{}"]
send_proxy_protocol = "{send}"
"#,
            backend.addr
        ));
        let addr = proxy.addr("edge");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let me = client.local_addr().expect("addr");
        client.write_all(b"hi").await.expect("write");
        client.shutdown().await.expect("shutdown");
        let mut back = String::new();
        client.read_to_string(&mut back).await.expect("read");
        let expected = if send == "v1" {
            format!(
                "v1 {} {} {} {} | hi",
                me.ip(),
                addr.ip(),
                me.port(),
                addr.port()
            )
        } else {
            format!("v2 {me} {addr} | hi")
        };
        assert_eq!(back, expected);
    }
}

#[tokio::test]
async fn garbage_truncated_and_slow_headers_close_only_that_connection() {
    let backend = header_reporter().await;
    // A short deadline, for the client below that stalls.
    let proxy = Proxy::start(&config_with(
        "any",
        "\"127.0.0.1/32\"",
        "v1",
        backend.addr,
        "proxy_protocol_timeout = \"300ms\"",
    ));
    let addr = proxy.addr("edge");
    // A good client stays connected throughout.
    let mut good = TcpStream::connect(addr).await.expect("connect");
    good.write_all(V1_HEADER).await.expect("write");

    let garbage = exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap_or_default();
    assert_eq!(garbage, "");
    let truncated = exchange(addr, b"PROXY TCP4 203.0.113")
        .await
        .unwrap_or_default();
    assert_eq!(truncated, "");
    let mut signature_only = v2_header();
    signature_only.truncate(14);
    assert_eq!(
        exchange(addr, &signature_only).await.unwrap_or_default(),
        ""
    );
    let too_long = vec![b'P'; 2000];
    assert_eq!(exchange(addr, &too_long).await.unwrap_or_default(), "");

    // A client that sends half a header and stalls is cut off by proxy_protocol_timeout.
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"PROXY TCP4 ").await.expect("write");
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(PATIENCE, slow.read(&mut buf))
        .await
        .expect("cut off in time");
    assert!(matches!(closed, Ok(0) | Err(_)));

    good.write_all(b"still here").await.expect("write");
    good.shutdown().await.expect("shutdown");
    let mut back = String::new();
    good.read_to_string(&mut back).await.expect("read");
    assert_eq!(back, "v1 203.0.113.9 198.51.100.1 5555 443 | still here");
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn a_v1_header_split_before_its_last_port_is_read_whole() {
    let backend = header_reporter().await;
    let proxy = Proxy::start(&config("v1", "\"127.0.0.1\"", "v1", backend.addr));
    let mut stream = TcpStream::connect(proxy.addr("edge"))
        .await
        .expect("connect");
    // Two segments, the first ending where every field but the last port has arrived.
    let (first, rest) = V1_HEADER.split_at(V1_HEADER.len() - 5);
    assert!(first.ends_with(b"5555 "));
    stream.write_all(first).await.expect("write");
    stream.flush().await.expect("flush");
    // Not a synchronisation: the split is likely, not certain, and any split must work (the
    // unit tests of `proxy_protocol::parse` try every cut).
    tokio::task::yield_now().await;
    stream.write_all(rest).await.expect("write");
    stream.write_all(b"after").await.expect("write");
    stream.shutdown().await.expect("shutdown");
    let mut back = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut back))
        .await
        .expect("answer in time")
        .expect("read");
    assert_eq!(back, "v1 203.0.113.9 198.51.100.1 5555 443 | after");
}

#[tokio::test]
async fn an_ipv4_mapped_client_in_a_header_is_treated_as_ipv4() {
    // A dual-stack proxy in front states an IPv4 client as ::ffff:a.b.c.d.
    let backend = http_backend("web").await;
    let proxy = Proxy::start(&format!(
        r#"
[[listeners]]
name = "web"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "p"
proxy_protocol = "v2"
trusted_proxies = ["127.0.0.1"]

[pools.p]
backends = ["{}"]
"#,
        backend.addr
    ));
    let mut header = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (
            "[::ffff:203.0.113.9]:5555"
                .parse::<SocketAddr>()
                .expect("addr"),
            "[::ffff:198.51.100.1]:80"
                .parse::<SocketAddr>()
                .expect("addr"),
        ),
    )
    .build()
    .expect("header");
    header.extend_from_slice(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
    let mut client = HttpClient::connect(proxy.addr("web")).await;
    client.send(&header).await;
    let reply = client.reply().await.expect("a reply");
    assert_eq!(reply.status, 200);
    let text = reply.text().to_ascii_lowercase();
    assert!(text.contains("x-forwarded-for: 203.0.113.9\n"), "{text}");
    assert!(text.contains("x-real-ip: 203.0.113.9\n"), "{text}");
}

/// A v2 header from `203.0.113.9:5555` with a TLV of `tlv_len` bytes (a NOOP, as padding).
fn v2_header_with_tlv(tlv_len: usize) -> Vec<u8> {
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (
            "203.0.113.9:5555".parse::<SocketAddr>().expect("addr"),
            "198.51.100.1:443".parse::<SocketAddr>().expect("addr"),
        ),
    )
    .write_tlv(ppp::v2::Type::NoOp, &vec![0u8; tlv_len])
    .expect("tlv")
    .build()
    .expect("header")
}

#[tokio::test]
async fn a_v2_header_with_tlvs_sent_a_few_bytes_at_a_time_then_data_is_read_whole() {
    let backend = header_reporter().await;
    let proxy = Proxy::start(&config("v2", "\"127.0.0.1\"", "v1", backend.addr));
    // Longer than one read of the header (256 bytes), shorter than the cap.
    let mut bytes = v2_header_with_tlv(600);
    assert!(bytes.len() > 600 && bytes.len() < 1024);
    bytes.extend_from_slice(b"payload");
    let mut stream = TcpStream::connect(proxy.addr("edge"))
        .await
        .expect("connect");
    for piece in bytes.chunks(7) {
        stream.write_all(piece).await.expect("write");
        stream.flush().await.expect("flush");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    stream.shutdown().await.expect("shutdown");
    let mut back = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut back))
        .await
        .expect("answer in time")
        .expect("read");
    assert_eq!(back, "v1 203.0.113.9 198.51.100.1 5555 443 | payload");
}

#[tokio::test]
async fn a_header_followed_at_once_by_a_long_payload_loses_nothing_with_splice_and_copy() {
    let echo = Backend::echo().await;
    let payload: Vec<u8> = (0..300_000).map(|_| fastrand::u8(..)).collect();
    for splice in [true, false] {
        let proxy = Proxy::start(&format!(
            r#"
[[listeners]]
name = "edge"
bind = "127.0.0.1:0"
protocol = "tcp"
pool = "p"
proxy_protocol = "any"
trusted_proxies = ["127.0.0.1"]
splice = {splice}

[pools.p]
backends = ["{}"]
"#,
            echo.addr
        ));
        for header in [V1_HEADER.to_vec(), v2_header_with_tlv(300)] {
            // Header and payload in one write: the first read takes the header and the start
            // of the payload together.
            let mut bytes = header;
            bytes.extend_from_slice(&payload);
            let stream = TcpStream::connect(proxy.addr("edge"))
                .await
                .expect("connect");
            let (mut r, mut w) = stream.into_split();
            let writer = tokio::spawn(async move {
                w.write_all(&bytes).await.expect("write");
                w.shutdown().await.expect("shutdown");
            });
            let mut back = Vec::new();
            tokio::time::timeout(PATIENCE, r.read_to_end(&mut back))
                .await
                .expect("echoed in time")
                .expect("read");
            writer.await.expect("writer");
            assert_eq!(back.len(), payload.len(), "splice = {splice}");
            assert!(back == payload, "bytes differ (splice = {splice})");
        }
    }
}

#[tokio::test]
async fn x_forwarded_for_is_extended_only_for_a_client_the_header_names_as_trusted() {
    // The balancer in front (127.0.0.1) sends PROXY headers but writes no HTTP: the request's
    // X-Forwarded-For is the client's own claim, kept only when that client is trusted.
    let backend = http_backend("web").await;
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        "proxy_protocol = \"v1\"\ntrusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\"]",
        "",
    ));
    let request = "GET / HTTP/1.1\r\nHost: test\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n";
    for (header, expected) in [
        // An Internet client: whatever it claims is replaced by its address.
        (
            "PROXY TCP4 203.0.113.9 198.51.100.1 5555 80\r\n",
            "x-forwarded-for: 203.0.113.9\n",
        ),
        // A trusted proxy of its own (behind the balancer): its list is extended.
        (
            "PROXY TCP4 10.1.2.3 198.51.100.1 5555 80\r\n",
            "x-forwarded-for: 6.6.6.6, 10.1.2.3\n",
        ),
        // No client named: the peer itself is the client, and it is trusted.
        ("PROXY UNKNOWN\r\n", "x-forwarded-for: 6.6.6.6, 127.0.0.1\n"),
    ] {
        let mut client = HttpClient::connect(proxy.addr("l7")).await;
        client.send(format!("{header}{request}").as_bytes()).await;
        let reply = client.reply().await.expect("a reply");
        assert_eq!(reply.status, 200, "{header:?}");
        let text = reply.text().to_ascii_lowercase();
        assert!(text.contains(expected), "{header:?}: {text}");
    }
}

/// An HTTP backend that answers each connection's first request with the PROXY header line
/// the connection started with, then closes.
async fn proxy_line_reporter() -> Backend {
    Backend::start(|mut stream| async move {
        let mut buf = Vec::new();
        if read_until(&mut stream, &mut buf, b"\r\n\r\n")
            .await
            .is_none()
        {
            return;
        }
        let end = buf.windows(2).position(|w| w == b"\r\n").unwrap_or(0);
        let line = String::from_utf8_lossy(&buf[..end]).into_owned();
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{line}",
            line.len()
        );
        let _ = stream.write_all(reply.as_bytes()).await;
    })
    .await
}

#[tokio::test]
async fn http_listeners_pass_on_the_destination_the_received_header_names() {
    // What the client connected to is the balancer's address, which only the received header
    // knows; HTTP/1.1 and HTTP/2 clients alike.
    let backend = proxy_line_reporter().await;
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        "proxy_protocol = \"v1\"\ntrusted_proxies = [\"127.0.0.1\"]",
        "send_proxy_protocol = \"v1\"",
    ));
    let received = b"PROXY TCP4 203.0.113.9 198.51.100.1 5555 80\r\n";
    let expected = "PROXY TCP4 203.0.113.9 198.51.100.1 5555 80";

    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    let mut bytes = received.to_vec();
    bytes.extend_from_slice(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
    client.send(&bytes).await;
    let reply = client.reply().await.expect("a reply");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), expected, "HTTP/1.1");

    let mut tcp = TcpStream::connect(proxy.addr("l7")).await.expect("connect");
    tcp.write_all(received).await.expect("header");
    let (mut sender, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(connection);
    let request = http::Request::builder()
        .uri("http://test/")
        .body(())
        .expect("request");
    let (response, _) = sender.send_request(request, true).expect("send");
    let response = tokio::time::timeout(PATIENCE, response)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = tokio::time::timeout(PATIENCE, body.data())
        .await
        .expect("data in time")
    {
        data.extend_from_slice(&chunk.expect("data"));
    }
    assert_eq!(String::from_utf8_lossy(&data), expected, "HTTP/2");
}
