//! Layer 4 TCP through the real proxy and real backends on loopback.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `data` through, half-closes, and returns everything that comes back.
async fn round_trip(proxy: std::net::SocketAddr, data: &[u8]) -> Vec<u8> {
    let stream = TcpStream::connect(proxy).await.expect("connect");
    let (mut r, mut w) = stream.into_split();
    let data = data.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.expect("write");
        w.shutdown().await.expect("shutdown");
    });
    let mut back = Vec::new();
    tokio::time::timeout(PATIENCE, r.read_to_end(&mut back))
        .await
        .expect("reply in time")
        .expect("read");
    writer.await.expect("writer");
    back
}

/// Like [`round_trip`], but a reset or a failed write is an answer too: `Err`.
async fn try_round_trip(proxy: std::net::SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(proxy).await?;
    let _ = stream.write_all(data).await;
    let _ = stream.shutdown().await;
    let mut back = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut back))
        .await
        .expect("answer in time")?;
    Ok(back)
}

#[tokio::test]
async fn one_mebibyte_each_way_arrives_intact_with_splice_and_copy() {
    let backend = Backend::echo().await;
    let data: Vec<u8> = (0..1024 * 1024).map(|_| fastrand::u8(..)).collect();
    for splice in [true, false] {
        let proxy = Proxy::start(&tcp_config(
            &format!("backends = [\"{}\"]", backend.addr),
            &format!("splice = {splice}"),
        ));
        let back = round_trip(proxy.addr("l4"), &data).await;
        assert_eq!(back.len(), data.len(), "splice = {splice}");
        assert!(back == data, "bytes differ with splice = {splice}");
        let state = proxy.registry.get("p", backend.addr).expect("state");
        eventually("byte counters", || {
            state.bytes_sent.load(Ordering::Relaxed) == data.len() as u64
                && state.bytes_received.load(Ordering::Relaxed) == data.len() as u64
        })
        .await;
    }
}

async fn distribution(proxy: std::net::SocketAddr, connections: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..connections {
        *counts.entry(first_line(proxy).await).or_insert(0) += 1;
    }
    counts
}

#[tokio::test]
async fn round_robin_spreads_evenly() {
    let a = Backend::named("a").await;
    let b = Backend::named("b").await;
    let proxy = Proxy::start(&tcp_config(
        &format!("backends = [\"{}\", \"{}\"]", a.addr, b.addr),
        "",
    ));
    let counts = distribution(proxy.addr("l4"), 20).await;
    assert_eq!(counts.get("a"), Some(&10));
    assert_eq!(counts.get("b"), Some(&10));
}

#[tokio::test]
async fn weights_three_to_one() {
    let a = Backend::named("a").await;
    let b = Backend::named("b").await;
    let proxy = Proxy::start(&tcp_config(
        &format!(
            "backends = [{{ address = \"{}\", weight = 3 }}, {{ address = \"{}\", weight = 1 }}]",
            a.addr, b.addr
        ),
        "",
    ));
    let counts = distribution(proxy.addr("l4"), 20).await;
    assert_eq!(counts.get("a"), Some(&15));
    assert_eq!(counts.get("b"), Some(&5));
}

#[tokio::test]
async fn least_conn_prefers_the_idle_backend() {
    let a = Backend::named("a").await;
    let b = Backend::named("b").await;
    let proxy = Proxy::start(&tcp_config(
        &format!(
            "balance = \"least_conn\"\nbackends = [\"{}\", \"{}\"]",
            a.addr, b.addr
        ),
        "",
    ));
    let addr = proxy.addr("l4");
    // Hold one connection open; its backend is busy from now on.
    let mut held = TcpStream::connect(addr).await.expect("connect");
    let mut first = [0u8; 2];
    held.read_exact(&mut first).await.expect("greeting");
    let busy = String::from_utf8_lossy(&first[..1]).into_owned();
    let states = [
        proxy.registry.get("p", a.addr).expect("state"),
        proxy.registry.get("p", b.addr).expect("state"),
    ];
    let active = || -> u64 {
        states
            .iter()
            .map(|s| s.active.load(Ordering::Relaxed))
            .sum()
    };
    let mut counts = HashMap::new();
    for _ in 0..6 {
        *counts.entry(first_line(addr).await).or_insert(0) += 1;
        // Only the held connection remains before the next pick.
        eventually("previous connection closed", || active() == 1).await;
    }
    assert_eq!(counts.get(&busy), None, "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 6);
}

#[tokio::test]
async fn dead_backend_is_skipped_without_the_client_noticing() {
    let dead = dead_addr().await;
    let live = Backend::named("live").await;
    let proxy = Proxy::start(&tcp_config(
        &format!("backends = [\"{dead}\", \"{}\"]", live.addr),
        "",
    ));
    let counts = distribution(proxy.addr("l4"), 10).await;
    assert_eq!(counts.get("live"), Some(&10));
    let dead_state = proxy.registry.get("p", dead).expect("state");
    assert!(dead_state.connect_failures.load(Ordering::Relaxed) >= 5);
}

#[tokio::test]
async fn no_backend_left_closes_the_client() {
    let dead = dead_addr().await;
    let proxy = Proxy::start(&tcp_config(&format!("backends = [\"{dead}\"]"), ""));
    let mut stream = TcpStream::connect(proxy.addr("l4")).await.expect("connect");
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)));
}

#[tokio::test]
async fn half_close_keeps_the_other_direction_flowing() {
    // Reads everything until EOF, then answers with how much it got.
    let backend = Backend::start(|mut stream| async move {
        let mut got = Vec::new();
        let _ = stream.read_to_end(&mut got).await;
        let reply = format!("got {} bytes", got.len()).repeat(1000);
        let _ = stream.write_all(reply.as_bytes()).await;
    })
    .await;
    for splice in [true, false] {
        let proxy = Proxy::start(&tcp_config(
            &format!("backends = [\"{}\"]", backend.addr),
            &format!("splice = {splice}"),
        ));
        let back = round_trip(proxy.addr("l4"), &[7u8; 100_000]).await;
        assert_eq!(
            back,
            "got 100000 bytes".repeat(1000).as_bytes(),
            "splice = {splice}"
        );
    }
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(&tcp_config(
        &format!("backends = [\"{}\"]", backend.addr),
        "idle_timeout = \"200ms\"",
    ));
    let mut stream = TcpStream::connect(proxy.addr("l4")).await.expect("connect");
    // Activity keeps it open...
    for _ in 0..3 {
        stream.write_all(b"x").await.expect("write");
        let mut one = [0u8; 1];
        stream.read_exact(&mut one).await.expect("echo");
    }
    // ...silence closes it.
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
        .await
        .expect("closed by the idle timeout");
    assert!(matches!(n, Ok(0) | Err(_)));
    let state = proxy.registry.get("p", backend.addr).expect("state");
    eventually("active back to 0", || {
        state.active.load(Ordering::Relaxed) == 0
    })
    .await;
}

#[tokio::test]
async fn max_connections_holds_new_clients_until_one_leaves() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(&tcp_config(
        &format!("backends = [\"{}\"]", backend.addr),
        "max_connections = 2",
    ));
    let addr = proxy.addr("l4");
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"a").await.expect("write");
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.expect("echo");
        held.push(s);
    }
    // The third connects (the kernel queues it) but is not served while two are open.
    let mut third = TcpStream::connect(addr).await.expect("connect");
    third.write_all(b"b").await.expect("write");
    let mut one = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read_exact(&mut one)).await;
    assert!(
        early.is_err(),
        "third connection served past max_connections"
    );
    assert_eq!(backend.accepted(), 2);
    drop(held.pop());
    tokio::time::timeout(PATIENCE, third.read_exact(&mut one))
        .await
        .expect("served once a slot frees")
        .expect("echo");
    assert_eq!(&one, b"b");
}

/// Opens `count` connections to `addr` and has each echo a byte, so all are being served.
async fn served(addr: std::net::SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut open = Vec::new();
    for _ in 0..count {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"a").await.expect("write");
        let mut one = [0u8; 1];
        tokio::time::timeout(PATIENCE, s.read_exact(&mut one))
            .await
            .expect("served")
            .expect("echo");
        open.push(s);
    }
    open
}

#[tokio::test]
async fn max_connections_changed_by_reloads_while_connections_are_open_ends_as_the_file_says() {
    let backend = Backend::echo().await;
    let config = |n: usize| {
        tcp_config(
            &format!("backends = [\"{}\"]", backend.addr),
            &format!("max_connections = {n}"),
        )
    };
    // From more than 2^32 (no limit to speak of) down to six, with four open...
    let proxy = Proxy::start(&config(5_000_000_000));
    let addr = proxy.addr("l4");
    let held = served(addr, 4).await;
    proxy.reload(&config(6)).await.expect("reloads");
    // ...then below what is open and back before any connection ends: two slots are free.
    proxy.reload(&config(1)).await.expect("reloads");
    proxy.reload(&config(6)).await.expect("reloads");
    let more = served(addr, 2).await;
    // Lowered for good while six are open: once they end, two at a time.
    proxy.reload(&config(2)).await.expect("reloads");
    drop((held, more));
    let _two = served(addr, 2).await;
    let mut third = TcpStream::connect(addr).await.expect("connect");
    third.write_all(b"b").await.expect("write");
    let mut one = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read_exact(&mut one)).await;
    assert!(
        early.is_err(),
        "a third connection served past max_connections = 2"
    );
}

#[tokio::test]
async fn silent_clients_and_hanging_backends_do_not_affect_others() {
    // A backend that accepts and never answers (and never reads).
    let hang = Backend::start(|stream| async move {
        tokio::time::sleep(PATIENCE * 2).await;
        drop(stream);
    })
    .await;
    let echo = Backend::echo().await;
    let proxy = Proxy::start(&format!(
        r#"
[[listeners]]
name = "hang"
bind = "127.0.0.1:0"
protocol = "tcp"
pool = "hang"

[[listeners]]
name = "echo"
bind = "127.0.0.1:0"
protocol = "tcp"
pool = "echo"

[pools.hang]
backends = ["{}"]

[pools.echo]
backends = ["{}"]
"#,
        hang.addr, echo.addr
    ));
    // Silent clients on both listeners, and a client stuck on the hanging backend.
    let _silent: Vec<_> = futures_connect(proxy.addr("echo"), 50).await;
    let mut stuck = TcpStream::connect(proxy.addr("hang"))
        .await
        .expect("connect");
    stuck.write_all(b"anyone?").await.expect("write");
    // Everyone else is served normally.
    for _ in 0..20 {
        assert_eq!(round_trip(proxy.addr("echo"), b"hello").await, b"hello");
    }
}

async fn futures_connect(addr: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        streams.push(TcpStream::connect(addr).await.expect("connect"));
    }
    streams
}

#[tokio::test]
async fn a_resetting_backend_closes_only_its_connection() {
    let reset = Backend::start(|stream| async move {
        // SO_LINGER 0 turns close into a reset.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        drop(stream);
    })
    .await;
    let echo = Backend::echo().await;
    let proxy = Proxy::start(&tcp_config(
        &format!(
            "balance = \"round_robin\"\nbackends = [\"{}\", \"{}\"]",
            reset.addr, echo.addr
        ),
        "",
    ));
    let addr = proxy.addr("l4");
    let mut echoed = 0;
    for _ in 0..10 {
        match try_round_trip(addr, b"ping").await {
            Ok(back) if back == b"ping" => echoed += 1,
            Ok(back) => assert!(back.is_empty(), "{back:?}"),
            Err(_) => {}
        }
    }
    assert_eq!(echoed, 5);
}

#[tokio::test]
async fn a_backend_reset_midway_reaches_the_client_as_a_reset() {
    // The backend sends part of its answer, then fails.
    let failing = Backend::start(|mut stream| async move {
        let _ = stream.write_all(b"partial").await;
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        drop(stream);
    })
    .await;
    for splice in [true, false] {
        let proxy = Proxy::start(&tcp_config(
            &format!("backends = [\"{}\"]", failing.addr),
            &format!("splice = {splice}"),
        ));
        let mut stream = TcpStream::connect(proxy.addr("l4")).await.expect("connect");
        let mut got = Vec::new();
        let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut got))
            .await
            .expect("ended in time");
        // What arrived is there; the end is a reset, not a FIN that would pass for the end of
        // the answer.
        assert_eq!(got, b"partial", "splice = {splice}");
        assert_eq!(
            read.map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::ConnectionReset),
            "splice = {splice}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_connections_at_once_then_back_to_baseline() {
    let _ = switchyard::sys::raise_fd_limit();
    // The backend runs on a runtime of its own, so that the tasks counted below are the
    // proxy's (and this test's), not the backend's 2000 connections winding down.
    let backend = EchoElsewhere::start();
    let proxy = Proxy::start(&tcp_config(
        &format!("backends = [\"{}\"]", backend.addr),
        "",
    ));
    let addr = proxy.addr("l4");
    // One connection first, so the accept loop and the worker threads' pipe pools exist.
    assert_eq!(round_trip(addr, b"warm").await, b"warm");
    let state = proxy.registry.get("p", backend.addr).expect("state");
    eventually("warm-up closed", || {
        state.active.load(Ordering::Relaxed) == 0
    })
    .await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let tasks_before = metrics.num_alive_tasks();
    let fds_before = open_descriptors();
    let clients: Vec<_> = (0..2000u32)
        .map(|i| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await?;
                s.write_all(&i.to_be_bytes()).await?;
                let mut back = [0u8; 4];
                s.read_exact(&mut back).await?;
                assert_eq!(back, i.to_be_bytes());
                Ok::<_, std::io::Error>(s)
            })
        })
        .collect();
    let mut open = Vec::new();
    for c in clients {
        open.push(
            tokio::time::timeout(PATIENCE * 3, c)
                .await
                .expect("in time")
                .expect("task")
                .expect("echo"),
        );
    }
    assert_eq!(state.active.load(Ordering::Relaxed), 2000);
    drop(open);
    eventually("every connection closed", || {
        state.active.load(Ordering::Relaxed) == 0
    })
    .await;
    assert_eq!(state.total.load(Ordering::Relaxed), 2001);
    // Tasks and descriptors return to where they were (the backend's per-connection tasks end
    // when they see EOF, so allow for those still finishing). The server's own tasks were all
    // running before the warm-up was served, so they are in the baseline.
    tasks_back_to(tasks_before, &proxy, &backend).await;
    // A few descriptors of slack: splice pipes pooled per worker thread.
    eventually("descriptors back to baseline", || {
        open_descriptors() <= fds_before + 2 * 64 * 2
    })
    .await;
}

/// Waits until the runtime has no more tasks alive than `before`, and says what was still
/// open when it does not come to that.
async fn tasks_back_to(before: usize, proxy: &Proxy, backend: &EchoElsewhere) {
    let metrics = tokio::runtime::Handle::current().metrics();
    let settled = tokio::time::timeout(PATIENCE, async {
        while metrics.num_alive_tasks() > before {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "tasks back to baseline: {} alive, {before} before; {} parked, {} open at the \
         listener, {} open at the backend",
        metrics.num_alive_tasks(),
        proxy.handle.parked_connections(),
        proxy.stats("l4").open.load(Ordering::Relaxed),
        backend.open.load(Ordering::Relaxed),
    );
}

/// An echo backend on a runtime (and thread) of its own, which ends when this is dropped.
struct EchoElsewhere {
    addr: std::net::SocketAddr,
    /// Connections accepted and not yet closed.
    open: Arc<std::sync::atomic::AtomicUsize>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl EchoElsewhere {
    fn start() -> EchoElsewhere {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind backend");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("addr");
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let counted = Arc::clone(&open);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("backend runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let accepting = async {
                    while let Ok((mut stream, _)) = listener.accept().await {
                        counted.fetch_add(1, Ordering::Relaxed);
                        let counted = Arc::clone(&counted);
                        tokio::spawn(async move {
                            let (mut r, mut w) = stream.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                            let _ = w.shutdown().await;
                            counted.fetch_sub(1, Ordering::Relaxed);
                        });
                    }
                };
                tokio::select! {
                    () = accepting => {}
                    _ = stopped => {}
                }
            });
        });
        EchoElsewhere {
            addr,
            open,
            _stop: stop,
        }
    }
}

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Listener `l4`'s connections open now.
fn open_connections(proxy: &Proxy) -> u64 {
    proxy.stats("l4").open.load(Ordering::Relaxed)
}

/// Reads until EOF or an error; `Err` carries the error's kind.
async fn read_to_end_or_error(
    stream: &mut TcpStream,
    within: Duration,
) -> (Vec<u8>, Result<(), std::io::ErrorKind>) {
    let mut got = Vec::new();
    let result = tokio::time::timeout(within, stream.read_to_end(&mut got))
        .await
        .expect("the end arrives in time");
    (got, result.map(|_| ()).map_err(|e| e.kind()))
}

#[tokio::test]
async fn silent_clients_and_silent_backends_are_closed_at_the_idle_timeout() {
    // A backend that accepts and never answers or reads.
    let mute = Backend::start(|stream| async move {
        tokio::time::sleep(PATIENCE * 2).await;
        drop(stream);
    })
    .await;
    for park in ["\"50ms\"", "\"off\""] {
        let proxy = Proxy::start(&tcp_config(
            &format!("backends = [\"{}\"]", mute.addr),
            &format!("idle_timeout = \"300ms\"\npark_idle_after = {park}"),
        ));
        let addr = proxy.addr("l4");
        // One client that sends nothing, one whose request the backend never answers.
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        let mut asking = TcpStream::connect(addr).await.expect("connect");
        asking.write_all(b"anyone there?").await.expect("write");
        let started = tokio::time::Instant::now();
        for stream in [&mut silent, &mut asking] {
            let (got, _) = read_to_end_or_error(stream, PATIENCE).await;
            assert!(got.is_empty(), "park = {park}");
        }
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "closed by the idle timeout, not before (park = {park})"
        );
        let state = proxy.registry.get("p", mute.addr).expect("state");
        eventually("both connections let go", || {
            state.active.load(Ordering::Relaxed) == 0 && open_connections(&proxy) == 0
        })
        .await;
    }
}

/// A backend that reads `before_reset` bytes, then resets the connection.
async fn resetting_after(before_reset: usize) -> Backend {
    Backend::start(move |mut stream| async move {
        let mut buf = vec![0u8; before_reset];
        let _ = stream.read_exact(&mut buf).await;
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        drop(stream);
    })
    .await
}

#[tokio::test]
async fn a_backend_reset_during_an_upload_reaches_the_client_promptly() {
    let backend = resetting_after(64 * 1024).await;
    let dir = temp_dir_for("upload-reset");
    for splice in [true, false] {
        let log = dir.join(format!("splice-{splice}.log"));
        let _ = std::fs::remove_file(&log);
        let proxy = Proxy::start(&tcp_config(
            &format!("backends = [\"{}\"]", backend.addr),
            &format!(
                "splice = {splice}\nidle_timeout = \"1h\"\n{}",
                json_access_log(&log)
            ),
        ));
        let stream = TcpStream::connect(proxy.addr("l4")).await.expect("connect");
        let (mut r, mut w) = stream.into_split();
        // The client uploads far more than the backend reads before it fails.
        let writer = tokio::spawn(async move {
            let chunk = vec![1u8; 64 * 1024];
            for _ in 0..1024 {
                if let Err(error) = w.write_all(&chunk).await {
                    return Some(error.kind());
                }
            }
            None
        });
        // Reading and writing both end within seconds, not at the idle timeout. Which of the
        // two takes the reset depends on timing: the other then sees the end or a broken pipe.
        let mut got = Vec::new();
        let read = tokio::time::timeout(PATIENCE, r.read_to_end(&mut got))
            .await
            .expect("the end reaches the reading client in time");
        assert!(got.is_empty(), "splice = {splice}");
        let write = tokio::time::timeout(PATIENCE, writer)
            .await
            .expect("the upload ends in time")
            .expect("writer");
        let read = read.map_err(|e| e.kind()).err();
        assert!(
            read == Some(std::io::ErrorKind::ConnectionReset)
                || write == Some(std::io::ErrorKind::ConnectionReset),
            "a reset, not a clean close (read {read:?}, write {write:?}, splice = {splice})"
        );
        let state = proxy.registry.get("p", backend.addr).expect("state");
        eventually("the connection let go", || {
            state.active.load(Ordering::Relaxed) == 0 && open_connections(&proxy) == 0
        })
        .await;
        // The proxy saw a failure, and passed it on as one.
        eventually("the connection's line", || {
            log_text(&log).lines().count() == 1
        })
        .await;
        let text = std::fs::read_to_string(&log).expect("log");
        assert!(text.contains("\"outcome\":\"error\""), "{text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_backend_reset_after_the_client_half_closed_reaches_it_as_a_reset() {
    // Reads the whole request, answers part of it, then fails.
    let backend = Backend::start(|mut stream| async move {
        let mut request = Vec::new();
        let _ = stream.read_to_end(&mut request).await;
        let _ = stream.write_all(b"partial").await;
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        drop(stream);
    })
    .await;
    for splice in [true, false] {
        let proxy = Proxy::start(&tcp_config(
            &format!("backends = [\"{}\"]", backend.addr),
            &format!("splice = {splice}\nidle_timeout = \"1h\""),
        ));
        let mut stream = TcpStream::connect(proxy.addr("l4")).await.expect("connect");
        stream.write_all(b"request").await.expect("write");
        stream.shutdown().await.expect("half-close");
        let (got, end) = read_to_end_or_error(&mut stream, Duration::from_secs(3)).await;
        assert_eq!(got, b"partial", "splice = {splice}");
        assert_eq!(
            end,
            Err(std::io::ErrorKind::ConnectionReset),
            "splice = {splice}"
        );
    }
}

#[tokio::test]
async fn a_parked_connection_whose_backend_resets_is_told_at_once() {
    // Greets, waits for one byte from the client, then resets after a pause.
    let reset = Backend::start(|mut stream| async move {
        let _ = stream.write_all(b"hi").await;
        let mut one = [0u8; 1];
        let _ = stream.read_exact(&mut one).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        drop(stream);
    })
    .await;
    for splice in [true, false] {
        let proxy = Proxy::start(&tcp_config(
            &format!("backends = [\"{}\"]", reset.addr),
            &format!("splice = {splice}\nidle_timeout = \"1h\"\npark_idle_after = \"20ms\""),
        ));
        let mut stream = TcpStream::connect(proxy.addr("l4")).await.expect("connect");
        let mut hi = [0u8; 2];
        stream.read_exact(&mut hi).await.expect("greeting");
        stream.write_all(b"x").await.expect("write");
        // Idle while the backend waits: parked, then the backend fails.
        eventually("the idle connection is parked", || {
            proxy.handle.parked_connections() == 1
        })
        .await;
        let (got, end) = read_to_end_or_error(&mut stream, Duration::from_secs(3)).await;
        assert!(got.is_empty());
        assert_eq!(
            end,
            Err(std::io::ErrorKind::ConnectionReset),
            "splice = {splice}"
        );
    }
}

#[tokio::test]
async fn a_backend_that_closes_first_still_receives_what_the_client_sends() {
    // Greets and closes its write side at once, then reads the client's bytes to the end and
    // reports how many arrived.
    let (counted, mut counts) = tokio::sync::mpsc::unbounded_channel();
    let backend = Backend::start(move |mut stream| {
        let counted = counted.clone();
        async move {
            let _ = stream.write_all(b"bye").await;
            let _ = stream.shutdown().await;
            let mut got = Vec::new();
            let _ = stream.read_to_end(&mut got).await;
            let _ = counted.send(got.len());
        }
    })
    .await;
    for splice in [true, false] {
        let proxy = Proxy::start(&tcp_config(
            &format!("backends = [\"{}\"]", backend.addr),
            &format!("splice = {splice}\npark_idle_after = \"20ms\""),
        ));
        let mut stream = TcpStream::connect(proxy.addr("l4")).await.expect("connect");
        // The backend's side ends first...
        let (got, end) = read_to_end_or_error(&mut stream, PATIENCE).await;
        assert_eq!(got, b"bye", "splice = {splice}");
        assert_eq!(end, Ok(()), "splice = {splice}");
        // ...and, after a pause longer than the parking threshold, the client's side still
        // flows the other way until the client closes it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let data = vec![9u8; 300_000];
        stream
            .write_all(&data)
            .await
            .expect("write after the backend's FIN");
        stream.shutdown().await.expect("half-close");
        let arrived = tokio::time::timeout(PATIENCE, counts.recv())
            .await
            .expect("the backend reports in time")
            .expect("a count");
        assert_eq!(arrived, data.len(), "splice = {splice}");
        let state = proxy.registry.get("p", backend.addr).expect("state");
        eventually("the connection let go", || {
            state.active.load(Ordering::Relaxed) == 0 && open_connections(&proxy) == 0
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_max_connections_is_served_in_turn_and_everything_returns_to_baseline() {
    let backend = EchoElsewhere::start();
    let proxy = Proxy::start(&tcp_config(
        &format!("backends = [\"{}\"]", backend.addr),
        "max_connections = 20",
    ));
    let addr = proxy.addr("l4");
    assert_eq!(round_trip(addr, b"warm").await, b"warm");
    let state = proxy.registry.get("p", backend.addr).expect("state");
    eventually("warm-up closed", || {
        state.active.load(Ordering::Relaxed) == 0 && open_connections(&proxy) == 0
    })
    .await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let tasks_before = metrics.num_alive_tasks();
    let fds_before = open_descriptors();
    // Clients that give up while they wait past the cap: the proxy accepts them later and must
    // let go of them as well.
    let impatient: Vec<_> = futures_connect(addr, 20).await;
    // Ten times the cap at once, each echoing a few bytes.
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watcher = {
        let (peak, stats) = (Arc::clone(&peak), proxy.stats("l4"));
        tokio::spawn(async move {
            loop {
                peak.fetch_max(stats.open.load(Ordering::Relaxed), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    drop(impatient);
    let clients: Vec<_> = (0..200u32)
        .map(|i| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await?;
                s.write_all(&i.to_be_bytes()).await?;
                let mut back = [0u8; 4];
                s.read_exact(&mut back).await?;
                assert_eq!(back, i.to_be_bytes());
                s.shutdown().await?;
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).await?;
                Ok::<_, std::io::Error>(())
            })
        })
        .collect();
    for c in clients {
        tokio::time::timeout(PATIENCE * 3, c)
            .await
            .expect("in time")
            .expect("task")
            .expect("echo");
    }
    eventually("every connection closed", || {
        state.active.load(Ordering::Relaxed) == 0 && open_connections(&proxy) == 0
    })
    .await;
    watcher.abort();
    let peak = peak.load(Ordering::Relaxed);
    assert!(peak <= 20, "{peak} open at once past max_connections = 20");
    assert_eq!(proxy.stats("l4").connections.load(Ordering::Relaxed), 221);
    tasks_back_to(tasks_before, &proxy, &backend).await;
    eventually("descriptors back to baseline", || {
        open_descriptors() <= fds_before + 2 * 64 * 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_is_not_blamed_on_the_backends() {
    let a = Backend::echo().await;
    let b = Backend::echo().await;
    // One failure ejects a backend, and every backend may be ejected: a connect failure the
    // proxy caused itself would leave the pool with nothing to serve from.
    let config = format!(
        r#"
[[listeners]]
name = "l4"
bind = "127.0.0.1:0"
protocol = "tcp"
pool = "p"
splice = false

[pools.p]
backends = ["{}", "{}"]
outlier = {{ consecutive_failures = 1, max_ejected_percent = 100 }}
"#,
        a.addr, b.addr
    );
    // Each connection served takes two descriptors; with an odd number left, the last client
    // accepted finds none for its backend connection. One of two neighbouring limits has that.
    for limit in [40, 41] {
        let running = spawn_with_fd_limit("blame", &config, limit).await;
        exhaust_then_recover(running.addr).await;
        drop(running);
    }
}

/// Sends more clients to `addr` than the process has descriptors for, each asking for an echo,
/// keeps them connected for a second (what is being tested: a second without descriptors, in
/// which health probes run five times), then lets them go and waits until a client is served
/// again.
async fn exhaust_then_recover(addr: std::net::SocketAddr) {
    let clients: Vec<_> = (0..30)
        .map(|_| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.ok()?;
                s.write_all(b"x").await.ok()?;
                let mut one = [0u8; 1];
                // Served, refused, or still waiting in the backlog after a second.
                let _ = tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut one)).await;
                Some(s)
            })
        })
        .collect();
    let mut held = Vec::new();
    for c in clients {
        held.push(c.await.expect("client"));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Descriptors come back; the backends, which did nothing wrong, still serve.
    drop(held);
    eventually_async("a client is served again", || async move {
        let Ok(Ok(mut s)) = tokio::time::timeout(PATIENCE, TcpStream::connect(addr)).await else {
            return false;
        };
        if s.write_all(b"again").await.is_err() {
            return false;
        }
        let mut back = [0u8; 5];
        matches!(
            tokio::time::timeout(PATIENCE, s.read_exact(&mut back)).await,
            Ok(Ok(_))
        ) && &back == b"again"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_does_not_fail_health_checks() {
    let a = Backend::echo().await;
    // One failed probe takes the backend down, and it takes 100 passes (twenty seconds) to come
    // back: a probe the proxy could not make must count as neither.
    let config = format!(
        r#"
[[listeners]]
name = "l4"
bind = "127.0.0.1:0"
protocol = "tcp"
pool = "p"
splice = false

[pools.p]
backends = ["{}"]
health = {{ kind = "tcp", interval = "200ms", timeout = "100ms", fall = 1, rise = 100 }}
"#,
        a.addr
    );
    // With an even number of descriptors left, the served connections take them all.
    for limit in [40, 41] {
        let running = spawn_with_fd_limit("health", &config, limit).await;
        exhaust_then_recover(running.addr).await;
        drop(running);
    }
}

#[tokio::test]
async fn a_backend_that_never_completes_a_connect_is_given_up_at_connect_timeout() {
    // A listener with a backlog of one, never accepting, whose backlog is already taken: the
    // kernel drops further SYNs, so a connect to it neither succeeds nor fails.
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .expect("addr")
                .into(),
        )
        .expect("bind");
    socket.listen(0).expect("listen");
    let stuck = socket
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("inet");
    let _queued = tokio::time::timeout(PATIENCE, TcpStream::connect(stuck))
        .await
        .expect("the first connect is queued")
        .expect("queued");
    let live = Backend::named("live").await;
    let proxy = Proxy::start(&tcp_config(
        &format!(
            "connect_timeout = \"200ms\"\nbackends = [\"{stuck}\", \"{}\"]",
            live.addr
        ),
        "",
    ));
    let started = tokio::time::Instant::now();
    let counts = distribution(proxy.addr("l4"), 4).await;
    assert_eq!(counts.get("live"), Some(&4));
    let state = proxy.registry.get("p", stuck).expect("state");
    let failures = state.connect_failures.load(Ordering::Relaxed);
    assert!(failures >= 1, "{failures}");
    // Each try of the stuck backend cost one connect_timeout, no more.
    assert!(
        started.elapsed() < Duration::from_millis(200) * (failures as u32 + 4),
        "{:?} for {failures} timeouts",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_client_reset_reaches_the_backend_as_a_reset_with_splice_and_copy() {
    // Reports how its connection ended: after the client's first bytes, reading on to the end.
    let (ends, mut end_rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = Backend::start(move |mut stream| {
        let ends = ends.clone();
        async move {
            let mut first = [0u8; 7];
            if stream.read_exact(&mut first).await.is_err() {
                return;
            }
            // Something for the client to read while it is still there.
            let _ = stream.write_all(&[5u8; 2000]).await;
            let mut rest = Vec::new();
            let _ = ends.send(stream.read_to_end(&mut rest).await.map_err(|e| e.kind()));
        }
    })
    .await;
    for splice in [true, false] {
        let proxy = Proxy::start(&tcp_config(
            &format!("backends = [\"{}\"]", backend.addr),
            &format!("splice = {splice}\nidle_timeout = \"1h\""),
        ));
        let mut stream = TcpStream::connect(proxy.addr("l4")).await.expect("connect");
        stream.write_all(b"partial").await.expect("write");
        let mut some = [0u8; 1000];
        stream.read_exact(&mut some).await.expect("a first part");
        // The client fails mid-answer.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        drop(stream);
        let end = tokio::time::timeout(PATIENCE, end_rx.recv())
            .await
            .expect("the backend hears of it in time")
            .expect("an end");
        // Not a FIN, which the backend would take for the end of what the client meant to send.
        assert_eq!(
            end.err(),
            Some(std::io::ErrorKind::ConnectionReset),
            "splice = {splice}"
        );
    }
}
