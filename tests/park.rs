//! Parking of idle keep-alive client connections: a parked connection still counts, is answered
//! when its client speaks again, closes at its keep-alive deadline and at shutdown, and follows
//! a reload.

mod common;

use std::net::SocketAddr;

use common::*;

fn web(backend: SocketAddr, listener_extra: &str) -> String {
    format!(
        r#"
[[listeners]]
name = "web"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "app"
park_idle_after = "10ms"
{listener_extra}

[pools.app]
backends = ["{backend}"]
"#
    )
}

fn active(proxy: &Proxy) -> u64 {
    proxy
        .handle
        .listener_stats()
        .iter()
        .find(|l| l.name == "web")
        .map_or(0, |l| l.active)
}

#[tokio::test]
async fn a_parked_connection_still_counts_and_is_answered_when_its_client_speaks() {
    let backend = http_backend("a").await;
    let proxy = Proxy::start(&web(backend.addr, ""));
    let mut client = HttpClient::connect(proxy.addr("web")).await;
    for round in 0..3 {
        let reply = client.get(&format!("/round/{round}"), "").await;
        assert_eq!(reply.status, 200);
        assert!(reply.text().contains(&format!("GET /round/{round}")));
        eventually("the idle connection is parked", || {
            proxy.handle.parked_connections() == 1
        })
        .await;
        // Parked, it keeps its place under max_connections.
        assert_eq!(active(&proxy), 1);
    }
    // A client that pipelines two requests after a pause gets both answers.
    client
        .send(b"GET /one HTTP/1.1\r\nHost: t\r\n\r\nGET /two HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    assert!(client.reply().await.expect("first").text().contains("/one"));
    assert!(
        client
            .reply()
            .await
            .expect("second")
            .text()
            .contains("/two")
    );
}

#[tokio::test]
async fn a_parked_connection_closes_at_its_keepalive_deadline() {
    let backend = http_backend("a").await;
    let proxy = Proxy::start(&web(backend.addr, r#"keepalive_timeout = "300ms""#));
    let mut client = HttpClient::connect(proxy.addr("web")).await;
    assert_eq!(client.get("/", "").await.status, 200);
    eventually("the idle connection is parked", || {
        proxy.handle.parked_connections() == 1
    })
    .await;
    assert!(client.closed().await, "closed at the keep-alive deadline");
    eventually("the parked connection is gone", || {
        proxy.handle.parked_connections() == 0 && active(&proxy) == 0
    })
    .await;
}

#[tokio::test]
async fn a_client_that_hangs_up_while_parked_is_forgotten() {
    let backend = http_backend("a").await;
    let proxy = Proxy::start(&web(backend.addr, ""));
    let mut client = HttpClient::connect(proxy.addr("web")).await;
    assert_eq!(client.get("/", "").await.status, 200);
    eventually("the idle connection is parked", || {
        proxy.handle.parked_connections() == 1
    })
    .await;
    drop(client);
    eventually("the connection is gone", || {
        proxy.handle.parked_connections() == 0 && active(&proxy) == 0
    })
    .await;
}

#[tokio::test]
async fn a_shutdown_closes_parked_connections_at_once() {
    let backend = http_backend("a").await;
    let mut proxy = Proxy::start(&web(backend.addr, ""));
    let mut client = HttpClient::connect(proxy.addr("web")).await;
    assert_eq!(client.get("/", "").await.status, 200);
    eventually("the idle connection is parked", || {
        proxy.handle.parked_connections() == 1
    })
    .await;
    proxy.shutdown.cancel();
    assert!(client.closed().await);
    let cut_off = tokio::time::timeout(PATIENCE, &mut proxy.task)
        .await
        .expect("the server stops without waiting for the drain deadline")
        .expect("the server task ends");
    assert_eq!(cut_off, 0, "nothing was left for the drain deadline");
}

#[tokio::test]
async fn a_parked_connection_follows_a_reload() {
    let a = http_backend("a").await;
    let b = http_backend("b").await;
    let proxy = Proxy::start(&web(a.addr, ""));
    let mut client = HttpClient::connect(proxy.addr("web")).await;
    assert!(client.get("/", "").await.text().starts_with("a\n"));
    eventually("the idle connection is parked", || {
        proxy.handle.parked_connections() == 1
    })
    .await;
    proxy.reload(&web(b.addr, "")).await.expect("reloads");
    let reply = client.get("/", "").await;
    assert!(reply.text().starts_with("b\n"), "{}", reply.text());
}

#[tokio::test]
async fn parking_can_be_turned_off() {
    let backend = http_backend("a").await;
    let config =
        web(backend.addr, "").replace(r#"park_idle_after = "10ms""#, r#"park_idle_after = "off""#);
    let proxy = Proxy::start(&config);
    let mut client = HttpClient::connect(proxy.addr("web")).await;
    assert_eq!(client.get("/", "").await.status, 200);
    // Idle for ten times the other tests' threshold: the point of the test is the idle time.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(proxy.handle.parked_connections(), 0);
    assert_eq!(active(&proxy), 1);
    assert_eq!(client.get("/", "").await.status, 200);
}
