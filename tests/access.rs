//! Access control by client address (`allow`, `deny`) on tcp, udp and http listeners and on
//! http routes, through the real proxy. Clients come from different loopback addresses
//! (127.0.0.2, 127.0.0.3, ...), which Linux routes to the loopback interface like 127.0.0.1.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::Ordering;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

/// A TCP connection to `to` from loopback address 127.0.0.`last`.
async fn connect_from(last: u8, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)),
            0,
        ))
        .expect("bind a loopback address");
    socket.connect(to).await.expect("connect")
}

/// Sends `message` and reads until the proxy closes: what came back, or `None` on a reset.
async fn exchange(mut stream: TcpStream, message: &[u8]) -> Option<Vec<u8>> {
    // A refused connection may be closed before the write: that is a refusal too.
    if stream.write_all(message).await.is_err() {
        return None;
    }
    let _ = stream.shutdown().await;
    let mut back = Vec::new();
    match tokio::time::timeout(PATIENCE, stream.read_to_end(&mut back))
        .await
        .expect("the proxy answers or closes in time")
    {
        Ok(_) => Some(back),
        Err(_) => None,
    }
}

fn tcp_config(backend: SocketAddr, extra: &str) -> String {
    format!(
        r#"
[[listeners]]
name = "t"
bind = "127.0.0.1:0"
protocol = "tcp"
pool = "p"
{extra}

[pools.p]
backends = ["{backend}"]
"#
    )
}

#[tokio::test]
async fn tcp_clients_outside_allow_or_inside_deny_are_closed_before_a_backend_is_reached() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(&tcp_config(
        backend.addr,
        r#"allow = ["127.0.0.0/30"]
deny = ["127.0.0.2"]"#,
    ));
    let addr = proxy.addr("t");

    let served = exchange(connect_from(1, addr).await, b"hello").await;
    assert_eq!(served.as_deref(), Some(&b"hello"[..]));
    let also = exchange(connect_from(3, addr).await, b"again").await;
    assert_eq!(also.as_deref(), Some(&b"again"[..]));
    // Denied inside the allowed network, and outside it.
    for last in [2, 4] {
        let refused = exchange(connect_from(last, addr).await, b"nope").await;
        assert!(
            refused.is_none_or(|b| b.is_empty()),
            "127.0.0.{last} got an answer"
        );
    }
    assert_eq!(
        backend.accepted(),
        2,
        "refused clients never reach a backend"
    );
    assert_eq!(proxy.stats("t").denied.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn behind_the_proxy_protocol_the_client_it_names_is_checked() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(&tcp_config(
        backend.addr,
        r#"proxy_protocol = "v1"
trusted_proxies = ["127.0.0.1"]
deny = ["203.0.113.0/24"]"#,
    ));
    let addr = proxy.addr("t");
    let refused = exchange(
        TcpStream::connect(addr).await.expect("connect"),
        b"PROXY TCP4 203.0.113.9 198.51.100.1 5555 443\r\nhello",
    )
    .await;
    assert!(refused.is_none_or(|b| b.is_empty()));
    let served = exchange(
        TcpStream::connect(addr).await.expect("connect"),
        b"PROXY TCP4 192.0.2.9 198.51.100.1 5555 443\r\nhello",
    )
    .await;
    assert_eq!(served.as_deref(), Some(&b"hello"[..]));
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn a_denied_client_of_an_sni_routed_listener_is_closed_before_its_hello_is_read() {
    // The connection ends before any byte of a ClientHello is looked at.
    let backend = Backend::echo().await;
    let proxy = Proxy::start(&tcp_config(
        backend.addr,
        r#"deny = ["127.0.0.5"]
sni_routes = [{ sni = "a.example", pool = "p" }]"#,
    ));
    let refused = exchange(connect_from(5, proxy.addr("t")).await, b"\x16\x03\x01").await;
    assert!(refused.is_none_or(|b| b.is_empty()));
    assert_eq!(proxy.stats("t").denied.load(Ordering::SeqCst), 1);
    assert_eq!(backend.accepted(), 0);
}

async fn udp_from(last: u8) -> UdpSocket {
    UdpSocket::bind(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)),
        0,
    ))
    .await
    .expect("bind udp")
}

async fn ask(socket: &UdpSocket, to: SocketAddr, message: &[u8]) -> String {
    socket.send_to(message, to).await.expect("send");
    let mut buf = vec![0u8; 2048];
    let (n, _) = tokio::time::timeout(PATIENCE, socket.recv_from(&mut buf))
        .await
        .expect("reply in time")
        .expect("recv");
    String::from_utf8(buf[..n].to_vec()).expect("utf-8")
}

fn udp_config(backend: SocketAddr, extra: &str) -> String {
    format!(
        r#"
[[listeners]]
name = "u"
bind = "127.0.0.1:0"
protocol = "udp"
pool = "p"
{extra}

[pools.p]
backends = ["{backend}"]
"#
    )
}

#[tokio::test]
async fn udp_datagrams_of_denied_clients_are_dropped_and_a_reload_ends_their_sessions() {
    let (backend, _task) = udp_named("b").await;
    let proxy = Proxy::start(&udp_config(backend, r#"deny = ["127.0.0.6"]"#));
    let addr = proxy.addr("u");
    let denied = udp_from(6).await;
    let allowed = udp_from(7).await;
    denied.send_to(b"first", addr).await.expect("send");
    // The listener reads its socket in order: once the allowed client's answer is back, the
    // denied datagram before it has been dropped.
    assert_eq!(ask(&allowed, addr, b"hi").await, "b: hi");
    let stats = proxy.stats("u");
    assert_eq!(stats.denied.load(Ordering::SeqCst), 1);
    assert_eq!(
        stats.connections.load(Ordering::SeqCst),
        1,
        "one session only"
    );
    let mut buf = [0u8; 64];
    assert!(
        denied.try_recv_from(&mut buf).is_err(),
        "nothing came back to the denied client"
    );

    // A reload that denies the allowed client too: its open session ends at its next datagram.
    proxy
        .reload(&udp_config(backend, r#"deny = ["127.0.0.6", "127.0.0.7"]"#))
        .await
        .expect("reload");
    allowed.send_to(b"again", addr).await.expect("send");
    let other = udp_from(8).await;
    assert_eq!(ask(&other, addr, b"ok").await, "b: ok");
    assert_eq!(stats.denied.load(Ordering::SeqCst), 2);
    assert!(allowed.try_recv_from(&mut buf).is_err());
}

async fn get_from(last: u8, addr: SocketAddr, path: &str) -> Reply {
    let mut client = HttpClient::from_stream(connect_from(last, addr).await);
    client.get(path, "").await
}

#[tokio::test]
async fn http_listener_and_route_lists_answer_403_and_forward_nothing() {
    let backend = http_backend("web").await;
    let proxy = Proxy::start(&single_pool(
        &[backend.addr],
        r#"allow = ["127.0.0.0/29"]
  [[listeners.routes]]
  match = { path_prefix = "/admin/" }
  pool = "p"
  allow = ["127.0.0.1"]"#,
        "",
    ));
    let addr = proxy.addr("l7");
    assert_eq!(get_from(1, addr, "/").await.status, 200);
    assert_eq!(get_from(1, addr, "/admin/x").await.status, 200);
    assert_eq!(get_from(2, addr, "/").await.status, 200);
    let route_refused = get_from(2, addr, "/admin/x").await;
    assert_eq!(route_refused.status, 403);
    assert_eq!(route_refused.text(), "403 Forbidden\n");
    assert_eq!(get_from(9, addr, "/").await.status, 403);
    assert_eq!(
        backend.accepted(),
        1,
        "one pooled backend connection, three requests"
    );
    assert_eq!(proxy.stats("l7").denied.load(Ordering::SeqCst), 2);

    // A refused request leaves the connection usable: the next one on it is answered too.
    let mut client = HttpClient::from_stream(connect_from(2, addr).await);
    assert_eq!(client.get("/admin/", "").await.status, 403);
    assert_eq!(client.get("/", "").await.status, 200);
}

#[tokio::test]
async fn http2_streams_of_denied_clients_get_403() {
    let backend = http_backend("web").await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], r#"deny = ["127.0.0.1"]"#, ""));
    let mut sender = h2_connect(proxy.addr("l7")).await;
    let request = http::Request::get("http://example/")
        .body(())
        .expect("request");
    let (response, _) = sender.send_request(request, true).expect("send");
    let response = tokio::time::timeout(PATIENCE, response)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(response.status(), 403);
    assert_eq!(backend.accepted(), 0);
}

#[tokio::test]
async fn a_reload_s_http_lists_apply_from_the_next_request_of_an_open_connection() {
    let backend = http_backend("web").await;
    let proxy = Proxy::start(&single_pool(&[backend.addr], "", ""));
    let addr = proxy.addr("l7");
    let mut client = HttpClient::from_stream(connect_from(2, addr).await);
    assert_eq!(client.get("/", "").await.status, 200);
    proxy
        .reload(&single_pool(&[backend.addr], r#"deny = ["127.0.0.2"]"#, ""))
        .await
        .expect("reload");
    assert_eq!(client.get("/", "").await.status, 403);
    // And a reload that drops the list serves that client again on the same connection.
    proxy
        .reload(&single_pool(&[backend.addr], "", ""))
        .await
        .expect("reload");
    assert_eq!(client.get("/", "").await.status, 200);
}

fn problems(text: &str) -> Vec<(String, String)> {
    match switchyard::Config::from_toml(text, Path::new("bad.toml")) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(error) => error
            .problems()
            .into_iter()
            .map(|p| (p.path, p.reason))
            .collect(),
    }
}

#[test]
fn bad_lists_are_reported_with_their_key_paths() {
    let found = problems(
        r#"
[[listeners]]
name = "h"
bind = "127.0.0.1:80"
protocol = "http"
default_pool = "p"
allow = []
deny = ["10.0.0.0/8", "10.0.0.0/33", "example.com"]

  [[listeners.routes]]
  match = { path = "/" }
  pool = "p"
  allow = ["::1/129"]

[[listeners]]
name = "u"
bind = "127.0.0.1:53"
protocol = "udp"
pool = "p"
deny = []

[pools.p]
backends = ["127.0.0.1:1"]
"#,
    );
    let paths: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "listeners[0].routes[0].allow[0]",
            "listeners[0].allow",
            "listeners[0].deny[1]",
            "listeners[0].deny[2]",
            "listeners[1].deny",
        ],
        "{found:#?}"
    );
    assert!(found[1].1.contains("empty list"), "{found:#?}");
}
