//! Hot reload: new settings take effect, listeners come and go, a bad configuration changes
//! nothing, and what is open (TCP streams, WebSockets, keep-alive clients, requests in flight)
//! goes on untouched.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn web(default_pool: &str, extra_listener: &str, pools: &str) -> String {
    format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"{default_pool}\"\n{extra_listener}\n{pools}"
    )
}

/// Pools `a` and `b` of one backend each, for reloads that move [`web`] from one to the other.
fn two_pools(a: std::net::SocketAddr, b: std::net::SocketAddr) -> String {
    format!("[pools.a]\nbackends = [\"{a}\"]\n[pools.b]\nbackends = [\"{b}\"]\n")
}

#[tokio::test]
async fn a_reload_changes_routes_and_keeps_the_socket() {
    let a = http_backend("a").await;
    let b = http_backend("b").await;
    let pools = two_pools(a.addr, b.addr);
    let proxy = Proxy::start(&web("a", "", &pools));
    let addr = proxy.addr("web");
    let mut kept = HttpClient::connect(addr).await;
    assert_eq!(kept.get("/", "").await.header("x-backend"), Some("a"));

    let summary = proxy.reload(&web("b", "", &pools)).await.expect("reloads");
    assert_eq!(summary.updated, ["web"]);
    assert_eq!(summary.generation, 2);
    assert_eq!(proxy.addr("web"), addr, "same socket");
    let mut fresh = HttpClient::connect(addr).await;
    assert_eq!(fresh.get("/", "").await.header("x-backend"), Some("b"));
    // The client that stayed connected gets the new settings from its next request on, even
    // when the pool it used is gone.
    let reply = kept.get("/", "").await;
    assert_eq!(reply.header("x-backend"), Some("b"));
    assert_eq!(reply.header("connection"), None);
    let renamed = pools.replace("[pools.a]", "[pools.c]");
    proxy
        .reload(&web("b", "", &renamed))
        .await
        .expect("reloads");
    assert_eq!(kept.get("/", "").await.header("x-backend"), Some("b"));
}

#[tokio::test]
async fn listeners_are_added_and_removed() {
    let a = Backend::named("a").await;
    let pools = format!("[pools.a]\nbackends = [\"{}\"]\n", a.addr);
    let l4 =
        "[[listeners]]\nname = \"l4\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"a\"\n";
    let proxy = Proxy::start(&web("a", "", &pools));
    assert!(proxy.handle.local_addr("l4").is_none());

    let summary = proxy.reload(&web("a", l4, &pools)).await.expect("reloads");
    assert_eq!(summary.started, ["l4"]);
    let l4_addr = proxy.addr("l4");
    assert_eq!(first_line(l4_addr).await, "a");
    // An open stream on it survives its removal.
    let mut open = TcpStream::connect(l4_addr).await.expect("connect");
    let mut line = [0u8; 2];
    open.read_exact(&mut line).await.expect("greeting");

    let summary = proxy.reload(&web("a", "", &pools)).await.expect("reloads");
    assert_eq!(summary.stopped, ["l4"]);
    eventually_async("removed listener refuses", || async move {
        TcpStream::connect(l4_addr).await.is_err()
    })
    .await;
    open.write_all(b"still open")
        .await
        .expect("the stream goes on");
}

#[tokio::test]
async fn a_failing_reload_changes_nothing() {
    let a = http_backend("a").await;
    let pools = format!("[pools.a]\nbackends = [\"{}\"]\n", a.addr);
    let proxy = Proxy::start(&web("a", "", &pools));
    let addr = proxy.addr("web");
    // Another process holds the address a new listener wants.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = format!(
        "[[listeners]]\nname = \"busy\"\nbind = \"{}\"\nprotocol = \"tcp\"\npool = \"a\"\n",
        taken.local_addr().expect("addr")
    );
    let error = proxy
        .reload(&web("a", &busy, &pools))
        .await
        .expect_err("the address is taken");
    assert!(error.to_string().contains("cannot bind"), "{error}");
    // At the key to blame, as `check` and a start say it.
    assert!(
        error.to_string().starts_with("listeners[1].bind: "),
        "{error}"
    );
    // A certificate that is garbage.
    let garbage =
        std::env::temp_dir().join(format!("switchyard-garbage-{}.pem", std::process::id()));
    std::fs::write(&garbage, "not a certificate").expect("write");
    let tls = format!(
        "tls = {{ certificates = [{{ cert = \"{0}\", key = \"{0}\" }}] }}",
        garbage.display()
    );
    let bad = web("a", "", &pools).replace(
        "default_pool = \"a\"",
        &format!("default_pool = \"a\"\n{tls}"),
    );
    assert!(proxy.reload(&bad).await.is_err());
    let _ = std::fs::remove_file(&garbage);

    assert_eq!(proxy.handle.generation(), 1);
    assert_eq!(proxy.handle.reload_counts(), (0, 2));
    assert!(proxy.handle.local_addr("busy").is_none());
    let mut client = HttpClient::connect(addr).await;
    assert_eq!(client.get("/", "").await.header("x-backend"), Some("a"));
}

#[tokio::test]
async fn backend_state_survives_a_reload() {
    let a = http_backend("a").await;
    let b = http_backend("b").await;
    // Health checks are configured (so that their verdict has an owner across the reload), but
    // spread over an hour: the test sets their verdict itself.
    let config = |balance: &str| {
        web(
            "p",
            "",
            &format!(
                "[pools.p]\nbackends = [\"{}\", \"{}\"]\nbalance = \"{balance}\"\nhealth = {{ kind = \"tcp\", interval = \"1h\" }}\n",
                a.addr, b.addr
            ),
        )
    };
    let proxy = Proxy::start(&config("round_robin"));
    let addr = proxy.addr("web");
    let mut client = HttpClient::connect(addr).await;
    client.get("/", "").await;
    let state = proxy.registry.get("p", a.addr).expect("known");
    state.set_flag(switchyard::backend::DOWN);
    let total = state.total.load(SeqCst);
    proxy.reload(&config("least_conn")).await.expect("reloads");
    let after = proxy.registry.get("p", a.addr).expect("kept");
    assert!(Arc::ptr_eq(&state, &after), "the same state");
    assert_eq!(after.total.load(SeqCst), total);
    for _ in 0..4 {
        let mut client = HttpClient::connect(addr).await;
        assert_eq!(client.get("/", "").await.header("x-backend"), Some("b"));
    }
}

#[tokio::test]
async fn twenty_reloads_under_load_fail_no_request_and_keep_streams_open() {
    let a = http_backend("a").await;
    let echo = Backend::echo().await;
    let ws = Backend::start(|mut stream| async move {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read_exact(&mut byte).await.is_err() {
                return;
            }
            head.push(byte[0]);
        }
        let _ = stream
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            .await;
        let (mut r, mut w) = stream.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await;
    let config = |n: usize| {
        format!(
            "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"a\"\nrequest_headers = {{ set = {{ x-generation = \"{n}\" }} }}\n  [[listeners.routes]]\n  match = {{ path = \"/ws\" }}\n  pool = \"ws\"\n[[listeners]]\nname = \"l4\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"echo\"\n[pools.a]\nbackends = [\"{}\"]\n[pools.ws]\nbackends = [\"{}\"]\n[pools.echo]\nbackends = [\"{}\"]\n",
            a.addr, ws.addr, echo.addr
        )
    };
    let proxy = Proxy::start(&config(0));
    let web_addr = proxy.addr("web");

    let mut stream = TcpStream::connect(proxy.addr("l4")).await.expect("connect");
    let mut socket = HttpClient::connect(web_addr).await;
    socket
        .send(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await;
    assert_eq!(socket.reply().await.expect("101").status, 101);

    // Steady load: clients on fresh connections and on kept ones, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for worker in 0..4 {
        let (stop, ok, failed) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        load.push(tokio::spawn(async move {
            let mut client = None;
            for _ in 0..100_000 {
                if stop.load(SeqCst) {
                    break;
                }
                let conn = match client.take() {
                    Some(conn) if worker % 2 == 0 => conn,
                    _ => HttpClient::connect(web_addr).await,
                };
                let mut conn = conn;
                conn.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
                match conn.reply().await {
                    Some(reply) if reply.status == 200 => {
                        ok.fetch_add(1, SeqCst);
                        if reply.header("connection") != Some("close") {
                            client = Some(conn);
                        }
                    }
                    _ => {
                        failed.fetch_add(1, SeqCst);
                    }
                }
            }
        }));
    }
    for n in 1..=20 {
        proxy.reload(&config(n)).await.expect("reloads");
        // Some traffic between reloads.
        let before = ok.load(SeqCst);
        eventually("requests flow", || ok.load(SeqCst) > before + 5).await;
        stream.write_all(b"ping").await.expect("stream alive");
        let mut echo = [0u8; 4];
        stream.read_exact(&mut echo).await.expect("echo");
        socket
            .stream
            .write_all(b"ws")
            .await
            .expect("websocket alive");
        let mut back = [0u8; 2];
        socket.stream.read_exact(&mut back).await.expect("ws echo");
    }
    stop.store(true, SeqCst);
    for worker in load {
        worker.await.expect("joins");
    }
    assert_eq!(failed.load(SeqCst), 0, "{} ok", ok.load(SeqCst));
    assert_eq!(proxy.handle.generation(), 21);
    let mut client = HttpClient::connect(web_addr).await;
    let reply = client.get("/", "").await;
    assert!(
        reply.text().contains("x-generation: 20"),
        "{}",
        reply.text()
    );
}

#[tokio::test]
async fn sighup_reloads_the_file_even_after_a_half_written_one() {
    let a = http_backend("a").await;
    let b = http_backend("b").await;
    let text = |pool: &str| {
        format!(
            "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"{pool}\"\n[pools.a]\nbackends = [\"{}\"]\n[pools.b]\nbackends = [\"{}\"]\n",
            a.addr, b.addr
        )
    };
    let running = spawn_binary("sighup", &text("a")).await;
    let addr = running.addr;
    let served = || async move {
        let mut client = HttpClient::connect(addr).await;
        client
            .get("/", "")
            .await
            .header("x-backend")
            .map(str::to_owned)
    };
    assert_eq!(served().await.as_deref(), Some("a"));
    let hup = |child: &tokio::process::Child| {
        let pid = child.id().expect("running") as libc::pid_t;
        // SAFETY: kill(2) with a pid we started and a valid signal number.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    };
    // A half-written file: refused, the old configuration serves on.
    std::fs::write(&running.config, "[[listeners]]\nname = ").expect("write");
    hup(&running.child);
    std::fs::write(&running.config, text("b")).expect("write");
    hup(&running.child);
    eventually_async("the new file is in force", || async move {
        served().await.as_deref() == Some("b")
    })
    .await;
}

#[tokio::test]
async fn a_backend_down_by_health_checks_comes_back_when_a_reload_removes_them() {
    let a = http_backend("a").await;
    // The backend answers 200, which this check does not accept: one probe takes it down.
    let checked = "health = { kind = \"http\", expect_status = \"500\", interval = \"50ms\", timeout = \"50ms\", fall = 1 }\n";
    let config = |health: &str| {
        web(
            "p",
            "",
            &format!("[pools.p]\nbackends = [\"{}\"]\n{health}", a.addr),
        )
    };
    let proxy = Proxy::start(&config(checked));
    let addr = proxy.addr("web");
    let state = proxy.registry.get("p", a.addr).expect("known");
    eventually("the backend is down", || {
        state.flags() & switchyard::backend::DOWN != 0
    })
    .await;
    let mut client = HttpClient::connect(addr).await;
    assert_eq!(client.get("/", "").await.status, 503);

    // Without health checks nothing would ever bring it back: the reload does.
    proxy.reload(&config("")).await.expect("reloads");
    assert!(state.is_usable(), "flags {}", state.flags());
    let mut client = HttpClient::connect(addr).await;
    assert_eq!(client.get("/", "").await.header("x-backend"), Some("a"));
}

#[tokio::test]
async fn http2_clients_of_a_removed_listener_get_goaway_after_their_streams() {
    // A backend that answers each request only when the test lets it.
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let (heads, mut head_read) = tokio::sync::mpsc::unbounded_channel();
    let gate = Arc::clone(&release);
    let slow = Backend::start(move |mut stream| {
        let (gate, heads) = (Arc::clone(&gate), heads.clone());
        async move {
            let mut buf = Vec::new();
            if read_until(&mut stream, &mut buf, b"\r\n\r\n")
                .await
                .is_none()
            {
                return;
            }
            let _ = heads.send(());
            if let Ok(permit) = gate.acquire().await {
                permit.forget();
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ndone")
                .await;
        }
    })
    .await;
    let pools = format!("[pools.p]\nbackends = [\"{}\"]\n", slow.addr);
    let old = "[[listeners]]\nname = \"old\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"p\"\n";
    let proxy = Proxy::start(&web("p", old, &pools));

    let tcp = TcpStream::connect(proxy.addr("old"))
        .await
        .expect("connect");
    let (mut sender, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let connection = tokio::spawn(connection);
    let request = http::Request::get("http://t/slow")
        .body(())
        .expect("request");
    let (response, _) = sender.send_request(request, true).expect("send");
    tokio::time::timeout(PATIENCE, head_read.recv())
        .await
        .expect("the request reaches the backend");

    let summary = proxy.reload(&web("p", "", &pools)).await.expect("reloads");
    assert_eq!(summary.stopped, ["old"]);
    // The stream in flight finishes...
    release.add_permits(1);
    let response = tokio::time::timeout(PATIENCE, response)
        .await
        .expect("in time")
        .expect("the stream in flight is answered");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        data.extend_from_slice(&chunk.expect("data"));
    }
    assert_eq!(data, b"done");
    // ...and the client is told to go elsewhere (GOAWAY), as HTTP/1.1 clients get
    // `Connection: close`, rather than being served by a listener that no longer exists.
    tokio::time::timeout(PATIENCE, connection)
        .await
        .expect("the connection ends after GOAWAY")
        .expect("joins")
        .expect("a clean end");
}

/// A connection opened before many reloads keeps only its own settings and the newest, not
/// every generation in between: frequent reloads must not pile up memory behind one long-lived
/// client.
#[tokio::test]
async fn a_long_lived_client_keeps_no_settings_between_its_own_and_the_newest() {
    let a = http_backend("a").await;
    let b = http_backend("b").await;
    let pools = two_pools(a.addr, b.addr);
    let proxy = Proxy::start(&web("a", "", &pools));
    let older = || {
        proxy
            .handle
            .listener_stats()
            .iter()
            .find(|l| l.name == "web")
            .map(|l| l.older_settings)
    };
    let mut kept = HttpClient::connect(proxy.addr("web")).await;
    assert_eq!(kept.get("/", "").await.header("x-backend"), Some("a"));
    for pool in ["b", "a", "b", "a"] {
        proxy.reload(&web(pool, "", &pools)).await.expect("reloads");
    }
    // Four reloads: the client's settings are all that is left of the four earlier ones.
    assert_eq!(older(), Some(1));
    // Its next request follows to the newest, and nothing old is left.
    assert_eq!(kept.get("/", "").await.header("x-backend"), Some("a"));
    eventually("the first settings are released", || older() == Some(0)).await;
}

#[tokio::test]
async fn a_reload_builds_its_pools_off_the_data_path() {
    let a = http_backend("a").await;
    // A pool whose balancer takes long to build: a maglev table of four million slots.
    let toml = single_pool(&[a.addr], "", "")
        + &format!(
            "\n[pools.big]\nbalance = \"maglev\"\nmaglev_table_size = 4000037\nbackends = [\"{}\"]\n",
            a.addr
        );
    let proxy = Proxy::start(&toml);
    // A ticker on this test's one runtime thread, which also serves the proxy, measures the
    // longest stall while the reload runs.
    let ticker = StallTicker::start();
    let config =
        switchyard::Config::from_toml(&toml, std::path::Path::new("test.toml")).expect("valid");
    // The ticker ticks before the reload starts.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let started = std::time::Instant::now();
    let summary = proxy.handle.reload(config).await.expect("reloads");
    let took = started.elapsed();
    let stalled = ticker.stop().await;
    assert_eq!(summary.generation, 2);
    assert!(
        stalled < took / 2,
        "traffic stalled {stalled:?} during a reload that took {took:?}"
    );
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    assert_eq!(client.get("/", "").await.status, 200);
}
