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
async fn a_shutdown_closes_parked_connections_that_stay_silent() {
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
    assert_eq!(
        proxy.drained().await,
        0,
        "nothing was left for the drain deadline"
    );
}

#[tokio::test]
async fn a_request_that_reached_a_parked_connection_as_the_drain_began_is_answered() {
    let backend = http_backend("a").await;
    let mut proxy = Proxy::start(&web(backend.addr, ""));
    let mut client = HttpClient::connect(proxy.addr("web")).await;
    assert_eq!(client.get("/", "").await.status, 200);
    eventually("the idle connection is parked", || {
        proxy.handle.parked_connections() == 1
    })
    .await;
    // The request is in the proxy's socket buffer when the drain starts, before the lot has
    // seen it: the test's runtime has one thread, and nothing else runs between these lines.
    client.send(b"GET /late HTTP/1.1\r\nHost: t\r\n\r\n").await;
    proxy.shutdown.cancel();
    let reply = client.reply().await.expect("answered, not dropped");
    assert_eq!(reply.status, 200);
    assert!(reply.text().contains("GET /late"), "{}", reply.text());
    assert_eq!(reply.header("connection"), Some("close"));
    assert!(client.closed().await);
    assert_eq!(proxy.drained().await, 0);
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

// Layer 4: forwarded connections with no bytes moving are parked too.

fn l4(backend: SocketAddr, listener_extra: &str) -> String {
    single_tcp_pool(
        &[backend],
        &format!("park_idle_after = \"10ms\"\n{listener_extra}"),
        "",
    )
}

async fn echo_round(stream: &mut tokio::net::TcpStream, message: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(message).await.expect("write");
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back).await.expect("echo");
    assert_eq!(back, message);
}

#[tokio::test]
async fn an_idle_forwarded_connection_is_parked_and_resumed_from_either_side() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The backend echoes, and on "push" waits for the test's signal before writing first.
    let signal = std::sync::Arc::new(tokio::sync::Notify::new());
    let gate = std::sync::Arc::clone(&signal);
    let backend = Backend::start(move |mut stream| {
        let gate = std::sync::Arc::clone(&gate);
        async move {
            let mut buf = [0u8; 64];
            loop {
                let n = match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if &buf[..n] == b"push" {
                    gate.notified().await;
                    let _ = stream.write_all(b"pushed").await;
                } else if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let proxy = Proxy::start(&l4(backend.addr, ""));
    let state = proxy.registry.get("p", backend.addr).expect("known");
    let mut stream = tokio::net::TcpStream::connect(proxy.addr("l4"))
        .await
        .expect("connect");
    for round in 0..3u8 {
        echo_round(&mut stream, &[b'a' + round; 5]).await;
        eventually("the idle connection is parked", || {
            proxy.handle.parked_connections() == 1
        })
        .await;
        assert_eq!(
            state.active.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "still counted on its backend"
        );
    }
    // The backend speaks first: the connection resumes from the backend's side.
    stream.write_all(b"push").await.expect("write");
    eventually("parked again after the request", || {
        proxy.handle.parked_connections() == 1
    })
    .await;
    signal.notify_one();
    let mut pushed = [0u8; 6];
    stream.read_exact(&mut pushed).await.expect("pushed");
    assert_eq!(&pushed, b"pushed");
    // Half-close after parking still reaches the backend, whose EOF comes back.
    eventually("parked", || proxy.handle.parked_connections() == 1).await;
    stream.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.expect("read to end");
    assert!(rest.is_empty());
    eventually("the connection is gone", || {
        proxy.handle.parked_connections() == 0
            && state.active.load(std::sync::atomic::Ordering::SeqCst) == 0
    })
    .await;
}

#[tokio::test]
async fn a_parked_forwarded_connection_ends_at_its_idle_timeout_with_a_log_line() {
    use tokio::io::AsyncReadExt;
    let backend = Backend::echo().await;
    let log = temp_config("park-l4.log", "");
    std::fs::write(&log, "").expect("truncate");
    let proxy = Proxy::start(&l4(
        backend.addr,
        &format!(
            "idle_timeout = \"300ms\"\naccess_log = {{ path = \"{}\" }}",
            log.display()
        ),
    ));
    let mut stream = tokio::net::TcpStream::connect(proxy.addr("l4"))
        .await
        .expect("connect");
    echo_round(&mut stream, b"hello").await;
    eventually("the idle connection is parked", || {
        proxy.handle.parked_connections() == 1
    })
    .await;
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest))
        .await
        .expect("closed at the idle timeout")
        .expect("read");
    eventually("the log line is written", || {
        std::fs::read_to_string(&log).is_ok_and(|text| {
            text.contains("\"outcome\":\"idle_timeout\"")
                && text.contains("\"bytes_sent\":5")
                && text.contains("\"bytes_received\":5")
        })
    })
    .await;
}

#[tokio::test]
async fn a_drain_deadline_closes_parked_forwarded_connections() {
    use tokio::io::AsyncReadExt;
    let backend = Backend::echo().await;
    let proxy = Proxy::start(&l4(backend.addr, ""));
    let state = proxy.registry.get("p", backend.addr).expect("known");
    let mut stream = tokio::net::TcpStream::connect(proxy.addr("l4"))
        .await
        .expect("connect");
    echo_round(&mut stream, b"hello").await;
    eventually("the idle connection is parked", || {
        proxy.handle.parked_connections() == 1
    })
    .await;
    state.start_drain(std::time::Duration::from_millis(100));
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest))
        .await
        .expect("closed after the drain deadline")
        .expect("read");
    eventually("the connection is gone", || {
        proxy.handle.parked_connections() == 0
            && state.active.load(std::sync::atomic::Ordering::SeqCst) == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_lets_parked_forwarded_connections_run_until_they_end() {
    let backend = Backend::echo().await;
    // Several rounds on two threads: the lot resumes its connections on one thread while the
    // server starts waiting for its tasks on another.
    for _ in 0..10 {
        let mut proxy = Proxy::start(&l4(backend.addr, ""));
        let mut stream = tokio::net::TcpStream::connect(proxy.addr("l4"))
            .await
            .expect("connect");
        echo_round(&mut stream, b"hello").await;
        eventually("the idle connection is parked", || {
            proxy.handle.parked_connections() == 1
        })
        .await;
        proxy.shutdown.cancel();
        // Forwarded connections run on through the drain, as they would have unparked, and
        // the server waits for them.
        echo_round(&mut stream, b"still").await;
        assert!(
            !proxy.task.is_finished(),
            "the server stopped while a forwarded connection was open"
        );
        assert_eq!(proxy.handle.parked_connections(), 0);
        drop(stream);
        assert_eq!(proxy.drained().await, 0);
    }
}
