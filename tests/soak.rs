//! What operators saw under load, reduced: nothing a client sent on an open connection is lost
//! to a reload, a drain, an upgrade or a shutdown.

mod common;

use common::*;
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
