//! Balancing, persistence, health and draining, through real sockets: consistent hashing across
//! two processes, sticky cookies, active and passive health, backups, connection limits with a
//! queue, and backend drains with their deadline.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// What a test can change in a running [`controlled`] backend.
struct Control {
    /// Status of `/healthz`.
    health: AtomicU16,
    /// Status of every other request.
    status: AtomicU16,
    /// `/slow` requests wait for this.
    gate: Notify,
    /// `/slow` requests and WebSockets in progress.
    busy: AtomicUsize,
    /// Close each connection after one response, without saying so (as a server with a very
    /// short keep-alive timeout does).
    one_shot: std::sync::atomic::AtomicBool,
}

impl Control {
    fn new() -> Arc<Control> {
        Arc::new(Control {
            health: AtomicU16::new(200),
            status: AtomicU16::new(200),
            gate: Notify::new(),
            busy: AtomicUsize::new(0),
            one_shot: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

/// An HTTP/1.1 backend (GET only, keep-alive) answering with its name in `x-backend` and the
/// body; `/healthz` and other paths answer with the statuses in `control`, `/slow` waits for
/// the gate, `/ws` upgrades and then echoes.
async fn controlled(name: &'static str, control: Arc<Control>) -> Backend {
    Backend::start(move |stream| serve(name, Arc::clone(&control), stream)).await
}

async fn serve(name: &'static str, control: Arc<Control>, mut stream: TcpStream) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end + 4);
        let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
        if path == "/ws" {
            control.busy.fetch_add(1, SeqCst);
            let _ = stream
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                .await;
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            control.busy.fetch_sub(1, SeqCst);
            return;
        }
        let status = if path == "/healthz" {
            control.health.load(SeqCst)
        } else {
            if path == "/slow" {
                let opened = control.gate.notified();
                control.busy.fetch_add(1, SeqCst);
                opened.await;
                control.busy.fetch_sub(1, SeqCst);
            }
            control.status.load(SeqCst)
        };
        let response = format!(
            "HTTP/1.1 {status} X\r\nx-backend: {name}\r\ncontent-length: {}\r\n\r\n{name}",
            name.len()
        );
        if stream.write_all(response.as_bytes()).await.is_err() || control.one_shot.load(SeqCst) {
            return;
        }
    }
}

/// One GET on a fresh connection.
async fn get(addr: SocketAddr, path: &str, extra: &str) -> Reply {
    HttpClient::connect(addr).await.get(path, extra).await
}

/// The backend that served one GET.
async fn served_by(addr: SocketAddr, path: &str, extra: &str) -> String {
    get(addr, path, extra)
        .await
        .header("x-backend")
        .unwrap_or("none")
        .to_owned()
}

fn http_config(pool: &str) -> String {
    format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"p\"\n\n[pools.p]\n{pool}\n"
    )
}

/// Waits until `f` is true of backend `addr` of pool `p`.
async fn backend_becomes(
    proxy: &Proxy,
    addr: SocketAddr,
    what: &str,
    f: impl Fn(&switchyard::backend::BackendState) -> bool,
) {
    let state = proxy.registry.get("p", addr).expect("backend known");
    eventually(what, || f(&state)).await;
}

#[tokio::test]
async fn hashing_on_a_header_agrees_across_two_processes() {
    let names = ["a", "b", "c", "d"];
    let mut backends = Vec::new();
    for name in names {
        backends.push(controlled(name, Control::new()).await);
    }
    let list: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    for algorithm in ["maglev", "ring_hash"] {
        let config = http_config(&format!(
            "backends = [{}]\nbalance = \"{algorithm}\"\nhash_key = \"header:x-user\"",
            list.join(", ")
        ));
        let first = spawn_binary(&format!("hash-1-{algorithm}"), &config).await;
        let second = spawn_binary(&format!("hash-2-{algorithm}"), &config).await;
        let mut seen = std::collections::HashSet::new();
        for user in 0..40 {
            let header = format!("x-user: user-{user}\r\n");
            let one = served_by(first.addr, "/", &header).await;
            let again = served_by(first.addr, "/", &header).await;
            let other = served_by(second.addr, "/", &header).await;
            assert_eq!(one, again, "{algorithm}: a key stays on its backend");
            assert_eq!(one, other, "{algorithm}: both processes agree");
            seen.insert(one);
        }
        assert!(seen.len() >= 3, "{algorithm}: keys spread: {seen:?}");
        // Without the key: round robin.
        let mut rotation = std::collections::HashSet::new();
        for _ in 0..4 {
            rotation.insert(served_by(first.addr, "/", "").await);
        }
        assert_eq!(rotation.len(), 4, "{algorithm}: {rotation:?}");
    }
}

#[tokio::test]
async fn sticky_cookies_persist_survive_a_second_instance_and_repick_when_the_backend_is_down() {
    let controls = [Control::new(), Control::new(), Control::new()];
    let a = controlled("a", Arc::clone(&controls[0])).await;
    let b = controlled("b", Arc::clone(&controls[1])).await;
    let c = controlled("c", Arc::clone(&controls[2])).await;
    let config = http_config(&format!(
        "backends = [\"{}\", \"{}\", \"{}\"]\nsticky = {{ cookie = \"SWY\", ttl = \"1h\", secret = \"a secret both instances share\" }}\nhealth = {{ kind = \"http\", path = \"/healthz\", interval = \"100ms\", timeout = \"100ms\", rise = 1, fall = 1 }}",
        a.addr, b.addr, c.addr
    ));
    let proxy = Proxy::start(&config);
    let twin = Proxy::start(&config);
    let addr = proxy.addr("web");

    let first = get(addr, "/", "").await;
    let chosen = first.header("x-backend").expect("served").to_owned();
    let set_cookie = first
        .header("set-cookie")
        .expect("a sticky cookie")
        .to_owned();
    assert!(set_cookie.contains("Max-Age=3600") && set_cookie.contains("HttpOnly"));
    for backend in [&a, &b, &c] {
        assert!(
            !set_cookie.contains(&backend.addr.port().to_string()),
            "opaque: {set_cookie}"
        );
    }
    let cookie = set_cookie.split(';').next().expect("name=value").to_owned();
    let header = format!("Cookie: other=1; {cookie}\r\n");
    for _ in 0..6 {
        let reply = get(addr, "/", &header).await;
        assert_eq!(reply.header("x-backend"), Some(chosen.as_str()));
        assert_eq!(reply.header("set-cookie"), None, "not set again");
    }
    let reply = get(twin.addr("web"), "/", &header).await;
    assert_eq!(
        reply.header("x-backend"),
        Some(chosen.as_str()),
        "the twin honours it"
    );

    // Its backend fails its health checks: the request goes elsewhere and the cookie follows.
    let index = ["a", "b", "c"]
        .iter()
        .position(|n| *n == chosen)
        .expect("known");
    let chosen_addr = [a.addr, b.addr, c.addr][index];
    controls[index].health.store(503, SeqCst);
    backend_becomes(&proxy, chosen_addr, "sticky backend down", |s| {
        !s.is_usable()
    })
    .await;
    let reply = get(addr, "/", &header).await;
    let now = reply.header("x-backend").expect("served").to_owned();
    assert_ne!(now, chosen);
    let renewed = reply.header("set-cookie").expect("a new cookie");
    let renewed = renewed.split(';').next().expect("name=value").to_owned();
    let reply = get(addr, "/", &format!("Cookie: {renewed}\r\n")).await;
    assert_eq!(reply.header("x-backend"), Some(now.as_str()));
}

#[tokio::test]
async fn a_sticky_cookie_yields_while_its_backend_drains_and_after_a_reload_removes_it() {
    let a = http_backend("a").await;
    let b = http_backend("b").await;
    let c = http_backend("c").await;
    let pool = |backends: &[SocketAddr]| {
        let list: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
        http_config(&format!(
            "backends = [{}]\nsticky = {{ cookie = \"SWY\" }}",
            list.join(", ")
        ))
    };
    let proxy = Proxy::start(&pool(&[a.addr, b.addr, c.addr]));
    let addr = proxy.addr("web");
    // A cookie for each backend.
    let mut cookies = std::collections::HashMap::new();
    while cookies.len() < 3 {
        let reply = get(addr, "/", "").await;
        let cookie = reply.header("set-cookie").expect("a sticky cookie");
        let cookie = cookie.split(';').next().expect("name=value").to_owned();
        cookies.insert(
            reply.header("x-backend").expect("served").to_owned(),
            cookie,
        );
    }
    let with = |name: &str| format!("Cookie: {}\r\n", cookies[name]);

    // Draining: the cookie's requests go elsewhere, with a new cookie; once the drain ends, the
    // old cookie is honoured again.
    let state = proxy.registry.get("p", a.addr).expect("known");
    state.start_drain(Duration::from_secs(30));
    let reply = get(addr, "/", &with("a")).await;
    let elsewhere = reply.header("x-backend").expect("served").to_owned();
    assert_ne!(elsewhere, "a");
    let renewed = reply.header("set-cookie").expect("a new cookie");
    assert!(renewed.starts_with("SWY="), "{renewed}");
    state.end_drain();
    assert_eq!(served_by(addr, "/", &with("a")).await, "a");

    // A reload that removes `b`: its cookie's requests go elsewhere, with a new cookie; the
    // cookies of the backends that stay still hold.
    proxy
        .reload(&pool(&[a.addr, c.addr]))
        .await
        .expect("reloads");
    let reply = get(addr, "/", &with("b")).await;
    let now = reply.header("x-backend").expect("served").to_owned();
    assert!(now == "a" || now == "c", "{now}");
    assert!(reply.header("set-cookie").is_some());
    for name in ["a", "c"] {
        let reply = get(addr, "/", &with(name)).await;
        assert_eq!(reply.header("x-backend"), Some(name));
        assert_eq!(reply.header("set-cookie"), None, "{name}: not set again");
    }
}

#[tokio::test]
async fn health_checks_take_a_failing_backend_out_and_bring_it_back() {
    let (ca, cb) = (Control::new(), Control::new());
    let a = controlled("a", Arc::clone(&ca)).await;
    let b = controlled("b", Arc::clone(&cb)).await;
    let proxy = Proxy::start(&http_config(&format!(
        "backends = [\"{}\", \"{}\"]\nhealth = {{ kind = \"http\", path = \"/healthz\", expect_status = \"200-299\", interval = \"100ms\", timeout = \"100ms\", rise = 2, fall = 2 }}",
        a.addr, b.addr
    )));
    let addr = proxy.addr("web");
    ca.health.store(500, SeqCst);
    let failed_at = Instant::now();
    backend_becomes(&proxy, a.addr, "a down", |s| !s.is_usable()).await;
    // fall x interval, plus one probe's timeout and the start offset: well under a second.
    assert!(
        failed_at.elapsed() < Duration::from_secs(2),
        "{:?}",
        failed_at.elapsed()
    );
    for _ in 0..6 {
        assert_eq!(served_by(addr, "/", "").await, "b");
    }
    ca.health.store(200, SeqCst);
    backend_becomes(&proxy, a.addr, "a back", |s| s.is_usable()).await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(served_by(addr, "/", "").await);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[tokio::test]
async fn tcp_health_checks_notice_a_dead_backend() {
    let alive = Backend::named("alive").await;
    let dying = Backend::named("dying").await;
    let dying_addr = dying.addr;
    let proxy = Proxy::start(&single_tcp_pool(
        &[alive.addr, dying_addr],
        "",
        "health = { kind = \"tcp\", interval = \"100ms\", timeout = \"100ms\", fall = 2, rise = 2 }",
    ));
    drop(dying);
    backend_becomes(&proxy, dying_addr, "dead backend down", |s| !s.is_usable()).await;
    let state = proxy.registry.get("p", dying_addr).expect("known");
    let failures_before = state.connect_failures.load(SeqCst);
    for _ in 0..4 {
        assert_eq!(first_line(proxy.addr("l4")).await, "alive");
    }
    assert_eq!(
        state.connect_failures.load(SeqCst),
        failures_before,
        "no connection is tried on a backend that is down"
    );
}

/// Reloads restart the health probers; reloads more frequent than `interval` × `fall` must not
/// keep a dead backend up by starting its count of failures over each time.
#[tokio::test]
async fn frequent_reloads_do_not_keep_a_dead_backend_up() {
    let alive = Backend::named("alive").await;
    let dead = dead_addr().await;
    let config = |listener: &str| {
        format!(
            "[[listeners]]\nname = \"{listener}\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"p\"\n[pools.p]\nbackends = [\"{}\", \"{}\"]\nhealth = {{ kind = \"tcp\", interval = \"100ms\", timeout = \"100ms\", fall = 3, rise = 2 }}\n",
            alive.addr, dead
        )
    };
    let proxy = Proxy::start(&config("a"));
    let state = proxy.registry.get("p", dead).expect("known");
    // A reload every few milliseconds (each a new listener, so that each is a real change),
    // for a bounded while: three failures take 300 ms of probing in all.
    let started = std::time::Instant::now();
    let mut reloads = 0u32;
    while state.is_usable() && started.elapsed() < PATIENCE {
        let name = if reloads.is_multiple_of(2) { "b" } else { "a" };
        proxy.reload(&config(name)).await.expect("reloads");
        reloads += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !state.is_usable(),
        "still up after {reloads} reloads in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn consecutive_failures_eject_a_backend_until_its_time_is_up() {
    let (ca, cb) = (Control::new(), Control::new());
    let a = controlled("a", Arc::clone(&ca)).await;
    let b = controlled("b", Arc::clone(&cb)).await;
    let proxy = Proxy::start(&http_config(&format!(
        "backends = [\"{}\", \"{}\"]\noutlier = {{ consecutive_failures = 3, base_ejection_time = \"300ms\", max_ejected_percent = 50 }}",
        a.addr, b.addr
    )));
    let addr = proxy.addr("web");
    ca.status.store(500, SeqCst);
    let state = proxy.registry.get("p", a.addr).expect("known");
    for _ in 0..20 {
        if !state.is_usable() {
            break;
        }
        get(addr, "/", "").await;
    }
    assert!(!state.is_usable(), "ejected after three 5xx in a row");
    assert_eq!(state.ejections.load(SeqCst), 1);
    for _ in 0..4 {
        assert_eq!(served_by(addr, "/", "").await, "b");
    }
    ca.status.store(200, SeqCst);
    backend_becomes(&proxy, a.addr, "a returns", |s| s.is_usable()).await;
    // b never failed, so it was never ejected.
    assert!(proxy.registry.get("p", b.addr).expect("known").is_usable());
}

#[tokio::test]
async fn backups_serve_only_while_no_primary_is_usable() {
    let (cp, cb) = (Control::new(), Control::new());
    let primary = controlled("primary", Arc::clone(&cp)).await;
    let backup = controlled("backup", Arc::clone(&cb)).await;
    let proxy = Proxy::start(&http_config(&format!(
        "backends = [\"{}\", {{ address = \"{}\", backup = true }}]\nhealth = {{ kind = \"http\", path = \"/healthz\", interval = \"100ms\", timeout = \"100ms\", rise = 1, fall = 1 }}",
        primary.addr, backup.addr
    )));
    let addr = proxy.addr("web");
    for _ in 0..4 {
        assert_eq!(served_by(addr, "/", "").await, "primary");
    }
    cp.health.store(503, SeqCst);
    backend_becomes(&proxy, primary.addr, "primary down", |s| !s.is_usable()).await;
    for _ in 0..4 {
        assert_eq!(served_by(addr, "/", "").await, "backup");
    }
    cp.health.store(200, SeqCst);
    backend_becomes(&proxy, primary.addr, "primary back", |s| s.is_usable()).await;
    assert_eq!(served_by(addr, "/", "").await, "primary");
}

#[tokio::test]
async fn all_backends_down_is_503_unless_panic_mode() {
    let control = Control::new();
    control.health.store(500, SeqCst);
    let only = controlled("only", Arc::clone(&control)).await;
    for (panic, expected) in [(false, 503), (true, 200)] {
        let proxy = Proxy::start(&http_config(&format!(
            "backends = [\"{}\"]\npanic_mode = {panic}\nhealth = {{ kind = \"http\", path = \"/healthz\", interval = \"100ms\", timeout = \"100ms\", fall = 1 }}",
            only.addr
        )));
        backend_becomes(&proxy, only.addr, "down", |s| !s.is_usable()).await;
        assert_eq!(get(proxy.addr("web"), "/", "").await.status, expected);
    }
}

#[tokio::test]
async fn a_full_backend_queues_requests_then_refuses_with_503() {
    let control = Control::new();
    let backend = controlled("only", Arc::clone(&control)).await;
    let proxy = Proxy::start(&http_config(&format!(
        "backends = [{{ address = \"{}\", max_connections = 1 }}]\nqueue = {{ size = 1, timeout = \"500ms\" }}",
        backend.addr
    )));
    let addr = proxy.addr("web");
    let held = tokio::spawn(get(addr, "/slow", ""));
    eventually("the slow request holds the slot", || {
        control.busy.load(SeqCst) == 1
    })
    .await;
    // Two more: one waits in the queue, the other finds it full and gets 503 at once.
    let mut second = tokio::spawn(get(addr, "/", ""));
    let mut third = tokio::spawn(get(addr, "/", ""));
    let (refused, second_first) = tokio::select! {
        r = &mut second => (r.expect("joins"), true),
        r = &mut third => (r.expect("joins"), false),
    };
    assert_eq!(refused.status, 503);
    assert!(refused.text().contains("503"));
    control.gate.notify_waiters();
    assert_eq!(held.await.expect("joins").status, 200);
    let queued = if second_first {
        third.await
    } else {
        second.await
    };
    assert_eq!(
        queued.expect("joins").status,
        200,
        "the queued request got the freed slot"
    );

    // A slot that is never freed: the queued request gives up at the timeout.
    let held = tokio::spawn(get(addr, "/slow", ""));
    eventually("the slot is held again", || control.busy.load(SeqCst) == 1).await;
    let waited = Instant::now();
    assert_eq!(get(addr, "/", "").await.status, 503);
    assert!(
        waited.elapsed() >= Duration::from_millis(400),
        "{:?}",
        waited.elapsed()
    );
    control.gate.notify_waiters();
    assert_eq!(held.await.expect("joins").status, 200);
}

#[tokio::test]
async fn a_draining_backend_finishes_its_requests_and_websockets_and_takes_no_new_ones() {
    let (ca, cb) = (Control::new(), Control::new());
    let a = controlled("a", Arc::clone(&ca)).await;
    let b = controlled("b", Arc::clone(&cb)).await;
    let proxy = Proxy::start(&http_config(&format!(
        "backends = [\"{}\", \"{}\"]",
        a.addr, b.addr
    )));
    let addr = proxy.addr("web");
    // A long request, then WebSockets until one is on the same backend; that one is drained.
    let long = tokio::spawn(get(addr, "/slow", ""));
    eventually("the long request is on a backend", || {
        ca.busy.load(SeqCst) + cb.busy.load(SeqCst) == 1
    })
    .await;
    let (drained, drained_addr, other) = if ca.busy.load(SeqCst) == 1 {
        (&ca, a.addr, "b")
    } else {
        (&cb, b.addr, "a")
    };
    let mut ws_on_drained = None;
    let mut elsewhere = Vec::new();
    for _ in 0..4 {
        let mut ws = HttpClient::connect(addr).await;
        ws.send(
            b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await;
        assert_eq!(ws.reply().await.expect("101").status, 101);
        // The backend counts the WebSocket before it answers 101.
        if drained.busy.load(SeqCst) == 2 {
            ws_on_drained = Some(ws);
            break;
        }
        elsewhere.push(ws);
    }
    let mut ws = ws_on_drained.expect("a WebSocket on the backend to drain");
    let state = proxy.registry.get("p", drained_addr).expect("known");
    state.start_drain(Duration::from_secs(30));

    for _ in 0..6 {
        assert_eq!(
            served_by(addr, "/", "").await,
            other,
            "new requests go elsewhere"
        );
    }
    ws.stream.write_all(b"ping").await.expect("write");
    let mut echo = [0u8; 4];
    ws.stream
        .read_exact(&mut echo)
        .await
        .expect("the WebSocket still works");
    assert_eq!(&echo, b"ping");
    drained.gate.notify_waiters();
    let reply = long.await.expect("joins");
    assert_eq!(reply.status, 200, "the request in flight finished");
    assert_eq!(
        reply.header("connection"),
        Some("close"),
        "its client is told to go"
    );
}

#[tokio::test]
async fn the_drain_deadline_closes_streams_that_are_left() {
    let a = Backend::start(|mut stream| async move {
        let _ = stream.write_all(b"a\n").await;
        let (mut r, mut w) = stream.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await;
    let b = Backend::named("b").await;
    let proxy = Proxy::start(&single_tcp_pool(&[a.addr, b.addr], "", ""));
    let l4 = proxy.addr("l4");
    // Connections until one is on a.
    let mut stream = loop {
        let mut stream = TcpStream::connect(l4).await.expect("connect");
        let mut line = [0u8; 2];
        stream.read_exact(&mut line).await.expect("greeting");
        if &line == b"a\n" {
            break stream;
        }
    };
    let state = proxy.registry.get("p", a.addr).expect("known");
    state.start_drain(Duration::from_millis(300));
    for _ in 0..4 {
        assert_eq!(first_line(l4).await, "b");
    }
    stream.write_all(b"still here").await.expect("write");
    let mut echo = [0u8; 10];
    stream
        .read_exact(&mut echo)
        .await
        .expect("echo while draining");
    // The deadline closes it.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "closed at the deadline");
    assert_eq!(state.active.load(SeqCst), 0);
    // Ending the drain brings it back.
    state.end_drain();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(l4).await.expect("connect");
        let mut line = [0u8; 2];
        s.read_exact(&mut line).await.expect("greeting");
        seen.insert(line);
    }
    assert_eq!(seen.len(), 2);
}

#[tokio::test]
async fn l4_hashing_keeps_a_client_on_one_backend() {
    let a = Backend::named("a").await;
    let b = Backend::named("b").await;
    let c = Backend::named("c").await;
    let proxy = Proxy::start(&single_tcp_pool(
        &[a.addr, b.addr, c.addr],
        "",
        "balance = \"maglev\"",
    ));
    let first = first_line(proxy.addr("l4")).await;
    for _ in 0..6 {
        assert_eq!(first_line(proxy.addr("l4")).await, first);
    }
}

#[tokio::test]
async fn a_backend_drained_in_the_file_gets_nothing() {
    let a = controlled("a", Control::new()).await;
    let b = controlled("b", Control::new()).await;
    let proxy = Proxy::start(&http_config(&format!(
        "backends = [\"{}\", {{ address = \"{}\", drain = true }}]",
        a.addr, b.addr
    )));
    backend_becomes(&proxy, b.addr, "b draining", |s| !s.is_usable()).await;
    for _ in 0..6 {
        assert_eq!(served_by(proxy.addr("web"), "/", "").await, "a");
    }
}

#[tokio::test]
async fn a_request_waiting_on_a_draining_backend_ends_at_the_deadline() {
    let control = Control::new();
    let a = controlled("a", Arc::clone(&control)).await;
    let proxy = Proxy::start(&http_config(&format!("backends = [\"{}\"]", a.addr)));
    let waiting = tokio::spawn(get(proxy.addr("web"), "/slow", ""));
    eventually("the request is at the backend", || {
        control.busy.load(SeqCst) == 1
    })
    .await;
    let state = proxy.registry.get("p", a.addr).expect("known");
    state.start_drain(Duration::from_millis(200));
    let reply = waiting.await.expect("joins");
    assert_eq!(reply.status, 504, "no response head before the deadline");
    control.gate.notify_waiters();
}

#[tokio::test]
async fn a_kept_probe_connection_the_backend_closed_is_not_a_failure() {
    let control = Control::new();
    control.one_shot.store(true, SeqCst);
    let a = controlled("a", Arc::clone(&control)).await;
    let proxy = Proxy::start(&http_config(&format!(
        "backends = [\"{}\"]\nhealth = {{ kind = \"http\", path = \"/healthz\", interval = \"50ms\", timeout = \"50ms\", rise = 1, fall = 1 }}",
        a.addr
    )));
    let state = proxy.registry.get("p", a.addr).expect("known");
    eventually("probes pass", || state.probes_passed.load(SeqCst) >= 6).await;
    assert_eq!(state.probes_failed.load(SeqCst), 0);
    assert!(state.is_usable());
}

#[tokio::test]
async fn an_http_health_check_reads_past_interim_responses() {
    // A backend that sends 103 Early Hints before every final response, on a kept connection.
    let backend = Backend::start(|mut stream| async move {
        let mut buf = Vec::new();
        while let Some(end) = read_until(&mut stream, &mut buf, b"\r\n\r\n").await {
            buf.drain(..end + 4);
            let reply = b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n\
                          HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            if stream.write_all(reply).await.is_err() {
                return;
            }
        }
    })
    .await;
    let proxy = Proxy::start(&http_config(&format!(
        "backends = [\"{}\"]\nhealth = {{ kind = \"http\", interval = \"100ms\", timeout = \"100ms\", rise = 1, fall = 1 }}",
        backend.addr
    )));
    let state = proxy.registry.get("p", backend.addr).expect("known");
    let probes = || state.probes_passed.load(SeqCst) + state.probes_failed.load(SeqCst);
    eventually("five probes", || probes() >= 5).await;
    assert_eq!(
        state.probes_failed.load(SeqCst),
        0,
        "the 200 counts, not the 103"
    );
    assert!(state.is_usable());
    // The kept connection stays in step: one connection carried every probe.
    assert_eq!(backend.accepted(), 1);
}

/// HTTP probes are judged on the response's status: a body that comes late, never, or for ever
/// must not hold a probe until its timeout (and fail it), as a health endpoint that streams
/// would otherwise be taken down by the checks themselves.
#[tokio::test]
async fn http_health_checks_judge_the_status_without_waiting_for_the_body() {
    // Says 200 with a body of 1000 bytes, then sends none of it.
    let held = Backend::start(|mut stream| async move {
        let mut buf = Vec::new();
        if read_until(&mut stream, &mut buf, b"\r\n\r\n")
            .await
            .is_some()
        {
            let head = b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n";
            if stream.write_all(head).await.is_ok() {
                let mut sink = Vec::new();
                let _ = stream.read_to_end(&mut sink).await;
            }
        }
    })
    .await;
    // Says 200, then streams chunks until the prober leaves (a minute's worth at most).
    let endless = Backend::start(|mut stream| async move {
        let mut buf = Vec::new();
        if read_until(&mut stream, &mut buf, b"\r\n\r\n")
            .await
            .is_some()
        {
            let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
            if stream.write_all(head).await.is_err() {
                return;
            }
            let mut ticks = tokio::time::interval(Duration::from_millis(10));
            for _ in 0..6000 {
                ticks.tick().await;
                if stream.write_all(b"5\r\nevent\r\n").await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    // Keeps its connections; each body follows its head a moment later, in a write of its own.
    let late = Backend::start(|mut stream| async move {
        let mut buf = Vec::new();
        while let Some(end) = read_until(&mut stream, &mut buf, b"\r\n\r\n").await {
            buf.drain(..end + 4);
            let head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n";
            if stream.write_all(head).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            if stream.write_all(b"ok").await.is_err() {
                return;
            }
        }
    })
    .await;
    let proxy = Proxy::start(&http_config(&format!(
        "backends = [\"{}\", \"{}\", \"{}\"]\nhealth = {{ kind = \"http\", interval = \"100ms\", timeout = \"100ms\", rise = 1, fall = 1 }}",
        held.addr, endless.addr, late.addr
    )));
    for (name, addr) in [
        ("held", held.addr),
        ("endless", endless.addr),
        ("late", late.addr),
    ] {
        let state = proxy.registry.get("p", addr).expect("known");
        let probes = || state.probes_passed.load(SeqCst) + state.probes_failed.load(SeqCst);
        eventually("four probes", || probes() >= 4).await;
        assert_eq!(state.probes_failed.load(SeqCst), 0, "{name}");
        assert!(state.is_usable(), "{name}");
    }
    // A body that came after the verdict, before the next probe, lets the connection carry it.
    assert_eq!(late.accepted(), 1);
}

#[tokio::test]
async fn a_probe_in_flight_when_a_reload_removes_the_checks_ends_with_them() {
    // Connections opened while `answer` is on are served; later ones (a probe of the second
    // configuration) are handed to the test and never answered.
    let answer = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (held_tx, mut held_rx) = tokio::sync::mpsc::unbounded_channel::<TcpStream>();
    let backend = {
        let answer = Arc::clone(&answer);
        Backend::start(move |stream| {
            let answer = answer.load(SeqCst);
            let held_tx = held_tx.clone();
            async move {
                if answer {
                    serve_http(stream, "a").await;
                } else {
                    let _ = held_tx.send(stream);
                }
            }
        })
        .await
    };
    let config =
        |health: &str| http_config(&format!("backends = [\"{}\"]\n{health}", backend.addr));
    let proxy = Proxy::start(&config(
        "health = { kind = \"http\", interval = \"50ms\", timeout = \"50ms\", rise = 1, fall = 1 }",
    ));
    let state = proxy.registry.get("p", backend.addr).expect("known");
    eventually("a probe passes", || state.probes_passed.load(SeqCst) >= 1).await;

    // Checks with a long timeout: their first probe (due within 50 ms) waits on its answer.
    answer.store(false, SeqCst);
    proxy
        .reload(&config(
            "health = { kind = \"http\", interval = \"1m\", timeout = \"1m\", rise = 1, fall = 1 }",
        ))
        .await
        .expect("reloads");
    let mut held = tokio::time::timeout(PATIENCE, held_rx.recv())
        .await
        .expect("a probe in time")
        .expect("held");

    // The checks go: the probe in flight goes with them, rather than outliving them and
    // taking down a backend that nothing would ever bring back.
    proxy.reload(&config("")).await.expect("reloads");
    let mut sink = Vec::new();
    let ended = tokio::time::timeout(PATIENCE, held.read_to_end(&mut sink)).await;
    assert!(ended.is_ok(), "the probe's connection is still open");
    assert!(state.is_usable(), "flags {}", state.flags());
    assert_eq!(state.probes_failed.load(SeqCst), 0);
}

#[tokio::test]
async fn http_health_checks_of_an_h2c_pool_speak_http2_with_prior_knowledge() {
    // An h2c backend (gRPC without TLS) answers HTTP/2 only.
    let backend = Backend::start(|stream| async move {
        let service = hyper::service::service_fn(|request: http::Request<_>| async move {
            let status = if request.uri().path() == "/healthz" {
                200
            } else {
                404
            };
            let mut response = http::Response::new(http_body_util::Empty::<bytes::Bytes>::new());
            *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
            Ok::<_, std::convert::Infallible>(response)
        });
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
    })
    .await;
    let proxy = Proxy::start(&http_config(&format!(
        "backends = [\"{}\"]\nupstream_protocol = \"h2\"\nhealth = {{ kind = \"http\", path = \"/healthz\", interval = \"100ms\", timeout = \"100ms\", rise = 1, fall = 1 }}",
        backend.addr
    )));
    let state = proxy.registry.get("p", backend.addr).expect("known");
    eventually("three probes pass", || {
        state.probes_passed.load(SeqCst) >= 3
    })
    .await;
    assert_eq!(state.probes_failed.load(SeqCst), 0);
    assert!(state.is_usable());
    assert_eq!(backend.accepted(), 1, "one connection carries the probes");
}

/// HTTP/2 probes too are judged on the status: a health endpoint whose body goes on has its
/// stream cancelled once the head is in, and the connection carries the next probe.
#[tokio::test]
async fn http_health_checks_of_an_h2_pool_do_not_wait_for_a_body_that_goes_on() {
    let resets = Arc::new(AtomicUsize::new(0));
    let backend = h2_backend_with({
        let resets = Arc::clone(&resets);
        move |_request, mut respond| {
            let resets = Arc::clone(&resets);
            async move {
                let Ok(mut stream) = respond.send_response(h2_ok(), false) else {
                    return;
                };
                let _ = stream.send_data(bytes::Bytes::from_static(b"streaming"), false);
                // Nothing more: the stream stays open until the prober resets it.
                if std::future::poll_fn(|cx| stream.poll_reset(cx))
                    .await
                    .is_ok()
                {
                    resets.fetch_add(1, SeqCst);
                }
            }
        }
    })
    .await;
    let proxy = Proxy::start(&http_config(&format!(
        "backends = [\"{}\"]\nupstream_protocol = \"h2\"\nhealth = {{ kind = \"http\", interval = \"100ms\", timeout = \"100ms\", rise = 1, fall = 1 }}",
        backend.addr
    )));
    let state = proxy.registry.get("p", backend.addr).expect("known");
    let probes = || state.probes_passed.load(SeqCst) + state.probes_failed.load(SeqCst);
    eventually("four probes", || probes() >= 4).await;
    assert_eq!(state.probes_failed.load(SeqCst), 0);
    assert!(state.is_usable());
    // Each probe let go of its stream, and one connection carried them all.
    eventually("the probes' streams reset", || resets.load(SeqCst) >= 3).await;
    assert_eq!(backend.accepted(), 1);
}

/// A gRPC server (h2c) with the standard health service: `Check` answers with the serving
/// status `serving` holds (1 SERVING, 2 NOT_SERVING) for the service `svc`, SERVICE_UNKNOWN
/// (as `grpc-status: 5`, NOT_FOUND) for any other; the service names it was asked about are
/// recorded.
async fn grpc_health_backend(
    serving: Arc<std::sync::atomic::AtomicU8>,
    asked: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
) -> Backend {
    h2_backend_with(move |request, mut respond| {
        let (serving, asked) = (Arc::clone(&serving), Arc::clone(&asked));
        async move {
            let ok = request.uri().path() == "/grpc.health.v1.Health/Check"
                && request.method() == http::Method::POST
                && request.headers().get("content-type").map(|v| v.as_bytes())
                    == Some(b"application/grpc");
            let mut body = request.into_body();
            let mut message = Vec::new();
            while let Some(Ok(chunk)) = body.data().await {
                let _ = body.flow_control().release_capacity(chunk.len());
                message.extend_from_slice(&chunk);
            }
            // The service name: after the 5-byte prefix, field 1 (0x0a, a one-byte length).
            let service = message.get(7..).unwrap_or_default().to_vec();
            asked.lock().expect("lock").push(service.clone());
            let head = http::Response::builder()
                .status(if ok { 200 } else { 404 })
                .header("content-type", "application/grpc")
                .body(())
                .expect("head");
            let Ok(mut stream) = respond.send_response(head, false) else {
                return;
            };
            let mut trailers = http::HeaderMap::new();
            if service == b"svc" {
                let status = serving.load(SeqCst);
                let _ =
                    stream.send_data(bytes::Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]), false);
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            } else {
                trailers.insert("grpc-status", http::HeaderValue::from_static("5"));
                trailers.insert(
                    "grpc-message",
                    http::HeaderValue::from_static("unknown service"),
                );
            }
            let _ = stream.send_trailers(trailers);
        }
    })
    .await
}

#[tokio::test]
async fn grpc_health_checks_follow_the_servers_own_serving_status() {
    let serving = Arc::new(std::sync::atomic::AtomicU8::new(1));
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let backend = grpc_health_backend(Arc::clone(&serving), Arc::clone(&asked)).await;
    let other = grpc_health_backend(
        Arc::new(std::sync::atomic::AtomicU8::new(1)),
        Arc::new(std::sync::Mutex::new(Vec::new())),
    )
    .await;
    let proxy = Proxy::start(&format!(
        r#"
[[listeners]]
name = "l7"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "p"

[pools.p]
upstream_protocol = "h2"
backends = ["{}"]
health = {{ kind = "grpc", service = "svc", interval = "100ms", timeout = "100ms", rise = 1, fall = 1 }}

[pools.q]
upstream_protocol = "h2"
backends = ["{}"]
health = {{ kind = "grpc", service = "other", interval = "100ms", timeout = "100ms", rise = 1, fall = 1 }}
"#,
        backend.addr, other.addr
    ));
    let state = proxy.registry.get("p", backend.addr).expect("known");
    eventually("probes pass while the server serves", || {
        state.probes_passed.load(SeqCst) >= 2
    })
    .await;
    assert!(state.is_usable());
    assert_eq!(asked.lock().expect("lock")[0], b"svc");
    assert_eq!(backend.accepted(), 1, "one connection carries the probes");
    // The server says it no longer serves: down, though it answers every probe.
    serving.store(2, SeqCst);
    eventually("down on NOT_SERVING", || !state.is_usable()).await;
    serving.store(1, SeqCst);
    eventually("up again on SERVING", || state.is_usable()).await;
    // A service the server does not know fails by its grpc-status.
    let unknown = proxy.registry.get("q", other.addr).expect("known");
    eventually("down for an unknown service", || !unknown.is_usable()).await;
    assert_eq!(unknown.probes_passed.load(SeqCst), 0);
}
