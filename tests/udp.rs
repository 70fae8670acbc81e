//! Layer 4 UDP through the real proxy and real backends on loopback.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use common::*;
use tokio::net::UdpSocket;

async fn ask(socket: &UdpSocket, proxy: std::net::SocketAddr, message: &[u8]) -> String {
    socket.send_to(message, proxy).await.expect("send");
    let mut buf = vec![0u8; 65_536];
    let (n, from) = tokio::time::timeout(PATIENCE, socket.recv_from(&mut buf))
        .await
        .expect("reply in time")
        .expect("recv");
    assert_eq!(
        from, proxy,
        "the reply comes from the address the client wrote to"
    );
    String::from_utf8(buf[..n].to_vec()).expect("utf-8")
}

fn udp_config(backends: &[std::net::SocketAddr], extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"
[[listeners]]
name = "dns"
bind = "127.0.0.1:0"
protocol = "udp"
pool = "p"
{extra}

[pools.p]
backends = [{}]
"#,
        list.join(", ")
    )
}

#[tokio::test]
async fn datagrams_go_both_ways_over_two_backends() {
    let (a, _ta) = udp_named("a").await;
    let (b, _tb) = udp_named("b").await;
    let proxy = Proxy::start(&udp_config(&[a, b], ""));
    let addr = proxy.addr("dns");
    let mut seen = HashMap::new();
    for i in 0..10 {
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        // Several datagrams of one client stay in its session, on one backend.
        let first = ask(&client, addr, format!("q{i}").as_bytes()).await;
        let (name, rest) = first.split_once(": ").expect("name: payload");
        assert_eq!(rest, format!("q{i}"));
        for j in 0..3 {
            let again = ask(&client, addr, format!("r{j}").as_bytes()).await;
            assert_eq!(again, format!("{name}: r{j}"));
        }
        *seen.entry(name.to_owned()).or_insert(0) += 1;
    }
    assert_eq!(seen.get("a"), Some(&5));
    assert_eq!(seen.get("b"), Some(&5));
    let state = proxy.registry.get("p", a).expect("state");
    assert_eq!(state.total.load(Ordering::Relaxed), 5);
}

/// A fresh access log file for one test, and a reader of its JSON lines.
fn session_log(test: &str) -> (std::path::PathBuf, impl Fn() -> Vec<serde_json::Value>) {
    let path = fresh_log(&format!("udplog-{test}"));
    let read = path.clone();
    let lines = move || {
        log_text(&read)
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect()
    };
    (path, lines)
}

#[tokio::test]
async fn sessions_expire_when_idle() {
    let (a, _ta) = udp_named("a").await;
    let (log, lines) = session_log("expire");
    let proxy = Proxy::start(&udp_config(
        &[a],
        &format!("idle_timeout = \"100ms\"\n{}", json_access_log(&log)),
    ));
    let addr = proxy.addr("dns");
    let stats = proxy.stats("dns");
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    ask(&client, addr, b"hello").await;
    assert_eq!(stats.open.load(Ordering::Relaxed), 1);
    let state = proxy.registry.get("p", a).expect("state");
    eventually("session expired", || {
        stats.open.load(Ordering::Relaxed) == 0
    })
    .await;
    assert_eq!(state.active.load(Ordering::Relaxed), 0);
    // The session's line: its bytes each way ("hello" out, "a: hello" back) and why it ended.
    eventually("the session's line", || lines().len() == 1).await;
    let line = &lines()[0];
    assert_eq!(line["protocol"], "udp");
    assert_eq!(line["listener"], "dns");
    assert_eq!(
        line["client"],
        client.local_addr().expect("addr").to_string()
    );
    assert_eq!(line["backend"], a.to_string());
    assert_eq!(line["bytes_sent"], 5);
    assert_eq!(line["bytes_received"], 8);
    assert_eq!(line["outcome"], "idle_timeout");
    // The same client is welcome again, in a new session.
    assert_eq!(ask(&client, addr, b"again").await, "a: again");
    assert_eq!(state.total.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn a_flood_from_many_ports_is_capped_and_returns_to_baseline() {
    let (a, _ta) = udp_named("a").await;
    // Long beside the time the flood takes to arrive on a loaded machine: a session that
    // expired meanwhile would free a place, and the count of those dropped would not be 250.
    let proxy = Proxy::start(&udp_config(
        &[a],
        "idle_timeout = \"2s\"\nmax_sessions = 50",
    ));
    let addr = proxy.addr("dns");
    let stats = proxy.stats("dns");
    let mut clients = Vec::new();
    for _ in 0..300 {
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        client.send_to(b"flood", addr).await.expect("send");
        clients.push(client);
    }
    eventually("all 300 datagrams handled", || {
        stats.open.load(Ordering::Relaxed) + stats.datagrams_dropped.load(Ordering::Relaxed) >= 300
    })
    .await;
    assert_eq!(stats.open.load(Ordering::Relaxed), 50);
    assert_eq!(stats.datagrams_dropped.load(Ordering::Relaxed), 250);
    // Operators see the drops.
    let metrics = switchyard::metrics::render(&proxy.handle);
    assert!(
        metrics.contains("switchyard_udp_datagrams_dropped_total{listener=\"dns\"} 250"),
        "{metrics}"
    );
    eventually("sessions expired", || {
        stats.open.load(Ordering::Relaxed) == 0
    })
    .await;
    let state = proxy.registry.get("p", a).expect("state");
    assert_eq!(state.active.load(Ordering::Relaxed), 0);
    // Service is back for a new client.
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    assert_eq!(ask(&client, addr, b"ok?").await, "a: ok?");
}

#[tokio::test]
async fn a_refusing_backend_does_not_trap_a_client_that_keeps_its_port() {
    let dead = {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        socket.local_addr().expect("addr")
    };
    let (live, _task) = udp_named("live").await;
    let (log, lines) = session_log("refused");
    let proxy = Proxy::start(&udp_config(&[dead, live], &json_access_log(&log)));
    let addr = proxy.addr("dns");
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let mut buf = vec![0u8; 1024];
    let mut answer = None;
    // The first datagram lands on the dead backend and is lost (UDP); a retry from the same
    // port must reach the live one.
    for _ in 0..20 {
        client.send_to(b"retry", addr).await.expect("send");
        if let Ok(Ok((n, _))) = tokio::time::timeout(
            std::time::Duration::from_millis(250),
            client.recv_from(&mut buf),
        )
        .await
        {
            answer = Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            break;
        }
    }
    assert_eq!(answer.as_deref(), Some("live: retry"));
    let dead_state = proxy.registry.get("p", dead).expect("state");
    assert_eq!(dead_state.connect_failures.load(Ordering::Relaxed), 1);
    // The refused session has its line, with nothing received.
    eventually("the refused session's line", || !lines().is_empty()).await;
    let line = &lines()[0];
    assert_eq!(line["backend"], dead.to_string());
    assert_eq!(line["outcome"], "refused");
    assert_eq!(line["bytes_received"], 0);
}

#[tokio::test]
async fn a_refused_session_whose_client_moves_on_is_logged_as_refused() {
    let dead = {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        socket.local_addr().expect("addr")
    };
    let (log, lines) = session_log("moved-on");
    let proxy = Proxy::start(&udp_config(
        &[dead],
        &format!("idle_timeout = \"100ms\"\n{}", json_access_log(&log)),
    ));
    // One query from a port that is never used again, as DNS clients do.
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    client
        .send_to(b"query", proxy.addr("dns"))
        .await
        .expect("send");
    let state = proxy.registry.get("p", dead).expect("state");
    // The refusal is seen without another datagram, and the session ends as refused.
    eventually("the refusal", || {
        state.connect_failures.load(Ordering::Relaxed) == 1
    })
    .await;
    eventually("the session's line", || lines().len() == 1).await;
    assert_eq!(lines()[0]["outcome"], "refused");
    assert_eq!(lines()[0]["bytes_sent"], 5);
}

#[tokio::test]
async fn sessions_open_at_the_drain_deadline_are_logged_as_closed() {
    let (a, _ta) = udp_named("a").await;
    let (log, _) = session_log("deadline");
    let mut proxy = Proxy::start(&format!(
        "[global]\ndrain_timeout = \"100ms\"\n\n{}",
        udp_config(
            &[a],
            &format!(
                "idle_timeout = \"1h\"\naccess_log = {{ path = \"{}\", format = \"combined\" }}",
                log.display()
            ),
        )
    ));
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    assert_eq!(ask(&client, proxy.addr("dns"), b"hi").await, "a: hi");
    proxy.shutdown.cancel();
    tokio::time::timeout(PATIENCE, &mut proxy.task)
        .await
        .expect("the drain ends at its deadline")
        .expect("the server ran");
    // Written before the server returned: nothing more to wait for.
    let text = std::fs::read_to_string(&log).expect("the log");
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains(&format!("\"UDP {a}\" closed 5 2 ")), "{text}");
}

/// The value of `series` (`name{labels}`) in a metrics exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
}

/// `GET /api/state` from the admin listener, as JSON.
async fn api_state(proxy: &Proxy) -> serde_json::Value {
    let api = proxy.handle.admin_addr().expect("admin configured");
    let mut client = HttpClient::connect(api).await;
    client
        .send(b"GET /api/state HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await;
    let reply = client.reply().await.expect("an answer");
    assert_eq!(reply.status, 200, "{}", reply.text());
    serde_json::from_slice(&reply.body).expect("json")
}

#[tokio::test]
async fn sessions_count_as_accepted_and_active_connections() {
    let (a, _ta) = udp_named("a").await;
    let proxy = Proxy::start(&format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n{}",
        udp_config(&[a], "idle_timeout = \"300ms\"\nmax_sessions = 3")
    ));
    let addr = proxy.addr("dns");
    let mut clients = Vec::new();
    for i in 0..3 {
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        // Several datagrams of one client are one session: one connection.
        for j in 0..3 {
            assert_eq!(
                ask(&client, addr, format!("{i}.{j}").as_bytes()).await,
                format!("a: {i}.{j}")
            );
        }
        clients.push(client);
    }
    // A client past max_sessions opens no session: its datagram is dropped, not accepted.
    let late = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    late.send_to(b"late", addr).await.expect("send");
    let accepted = "switchyard_connections_total{listener=\"dns\"}";
    let active = "switchyard_connections_active{listener=\"dns\"}";
    let dropped = "switchyard_udp_datagrams_dropped_total{listener=\"dns\"}";
    eventually("the late datagram is dropped", || {
        sample(&switchyard::metrics::render(&proxy.handle), dropped) == Some(1.0)
    })
    .await;
    let text = switchyard::metrics::render(&proxy.handle);
    assert_eq!(sample(&text, accepted), Some(3.0), "{text}");
    assert_eq!(sample(&text, active), Some(3.0), "{text}");
    let state = api_state(&proxy).await;
    let listener = &state["listeners"][0];
    assert_eq!(listener["protocol"], "udp");
    assert_eq!(listener["connections"], 3, "{listener}");
    assert_eq!(listener["active"], 3, "{listener}");
    assert_eq!(listener["max_sessions"], 3, "{listener}");
    assert_eq!(listener["datagrams_dropped"], 1, "{listener}");
    // Sessions that expire are no longer active; they stay counted as accepted.
    eventually("the sessions expire", || {
        sample(&switchyard::metrics::render(&proxy.handle), active) == Some(0.0)
    })
    .await;
    let text = switchyard::metrics::render(&proxy.handle);
    assert_eq!(sample(&text, accepted), Some(3.0), "{text}");
    let state = api_state(&proxy).await;
    assert_eq!(state["listeners"][0]["active"], 0);
    assert_eq!(state["listeners"][0]["connections"], 3);
}

#[tokio::test]
async fn counters_survive_a_reload_that_rebinds_the_listener() {
    let (a, _ta) = udp_named("a").await;
    let config = |bind: &str| {
        udp_config(&[a], "idle_timeout = \"1h\"\nmax_sessions = 1").replace("127.0.0.1:0", bind)
    };
    let proxy = Proxy::start(&format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n{}",
        config("127.0.0.1:0")
    ));
    let before = proxy.addr("dns");
    let first = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    assert_eq!(ask(&first, before, b"one").await, "a: one");
    // Past max_sessions: dropped.
    let second = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    second.send_to(b"two", before).await.expect("send");
    let accepted = "switchyard_connections_total{listener=\"dns\"}";
    let active = "switchyard_connections_active{listener=\"dns\"}";
    let dropped = "switchyard_udp_datagrams_dropped_total{listener=\"dns\"}";
    eventually("the second client's datagram is dropped", || {
        sample(&switchyard::metrics::render(&proxy.handle), dropped) == Some(1.0)
    })
    .await;

    // The listener moves to another address: a new socket and a new receive loop; the old
    // loop serves its session on.
    let summary = proxy
        .reload(&format!(
            "[admin]\nbind = \"127.0.0.1:0\"\n\n{}",
            config("127.0.0.2:0")
        ))
        .await
        .expect("reloads");
    assert_eq!(summary.started, ["dns"]);
    let after = proxy.addr("dns");
    assert_ne!(after, before);
    let text = switchyard::metrics::render(&proxy.handle);
    assert_eq!(sample(&text, dropped), Some(1.0), "{text}");
    assert_eq!(sample(&text, accepted), Some(1.0), "{text}");
    assert_eq!(sample(&text, active), Some(1.0), "{text}");

    // The new loop counts on from there.
    let third = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    assert_eq!(ask(&third, after, b"three").await, "a: three");
    let fourth = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    fourth.send_to(b"four", after).await.expect("send");
    eventually("the fourth client's datagram is dropped", || {
        sample(&switchyard::metrics::render(&proxy.handle), dropped) == Some(2.0)
    })
    .await;
    let text = switchyard::metrics::render(&proxy.handle);
    assert_eq!(sample(&text, accepted), Some(2.0), "{text}");
    assert_eq!(sample(&text, active), Some(2.0), "{text}");
    let state = api_state(&proxy).await;
    assert_eq!(state["listeners"][0]["datagrams_dropped"], 2);
    assert_eq!(state["listeners"][0]["connections"], 2);
    assert_eq!(state["listeners"][0]["active"], 2);
}

/// UDP sockets on this host connected to `backend` (on 127.0.0.1), as the kernel lists them:
/// the sessions' sockets. Unlike a count of the process's descriptors, the other tests that run
/// meanwhile in this process do not change it.
fn sockets_connected_to(backend: std::net::SocketAddr) -> usize {
    let table = std::fs::read_to_string("/proc/net/udp").expect("the kernel's UDP table");
    let remote = format!("0100007F:{:04X}", backend.port());
    table
        .lines()
        .skip(1)
        .filter(|line| line.split_whitespace().nth(2) == Some(remote.as_str()))
        .count()
}

#[tokio::test]
async fn a_client_in_session_keeps_its_answers_through_a_flood_past_the_cap() {
    let (a, _ta) = udp_named("a").await;
    // Long beside a pause between two questions on a loaded machine: a regular client whose
    // session expired would find every place taken by the flood.
    let proxy = Proxy::start(&udp_config(
        &[a],
        "idle_timeout = \"2s\"\nmax_sessions = 20",
    ));
    let addr = proxy.addr("dns");
    let stats = proxy.stats("dns");
    let regular = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    assert_eq!(ask(&regular, addr, b"before").await, "a: before");
    // A thousand source ports, a few datagrams each, while the regular client goes on asking.
    let flood = tokio::spawn(async move {
        let mut sockets = Vec::new();
        for _ in 0..1000 {
            let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
            for _ in 0..3 {
                let _ = socket.send_to(b"flood", addr).await;
            }
            sockets.push(socket);
            tokio::task::yield_now().await;
        }
        sockets
    });
    let mut asked = 0;
    while !flood.is_finished() || asked < 20 {
        let question = format!("q{asked}");
        assert_eq!(
            ask(&regular, addr, question.as_bytes()).await,
            format!("a: {question}")
        );
        assert!(stats.open.load(Ordering::Relaxed) <= 20, "past the cap");
        asked += 1;
    }
    let sockets = flood.await.expect("flood");
    assert!(stats.datagrams_dropped.load(Ordering::Relaxed) > 0);
    assert!(stats.open.load(Ordering::Relaxed) <= 20, "past the cap");
    assert!(sockets_connected_to(a) > 0, "no session's socket listed");
    drop(sockets);
    // Every session ends at its idle timeout; what they held is given back.
    eventually("sessions expired", || {
        stats.open.load(Ordering::Relaxed) == 0
    })
    .await;
    let state = proxy.registry.get("p", a).expect("state");
    assert_eq!(state.active.load(Ordering::Relaxed), 0);
    eventually("every session's socket closed", || {
        sockets_connected_to(a) == 0
    })
    .await;
    assert_eq!(ask(&regular, addr, b"after").await, "a: after");
}

#[tokio::test]
async fn a_draining_backend_keeps_its_sessions_until_the_deadline_then_they_move() {
    let (a, _ta) = udp_named("a").await;
    let (b, _tb) = udp_named("b").await;
    let (log, lines) = session_log("drain");
    let proxy = Proxy::start(&udp_config(
        &[a, b],
        &format!("idle_timeout = \"1h\"\n{}", json_access_log(&log)),
    ));
    let addr = proxy.addr("dns");
    // Two clients in session, one on each backend (round robin).
    let on_a = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let on_b = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let first = ask(&on_a, addr, b"1").await;
    let second = ask(&on_b, addr, b"2").await;
    let (on_a, on_b) = if first.starts_with("a:") {
        (on_a, on_b)
    } else {
        (on_b, on_a)
    };
    assert_ne!(first[..1], second[..1]);
    let state = proxy.registry.get("p", a).expect("state");
    state.start_drain(std::time::Duration::from_millis(400));
    // New clients go elsewhere; the session on the draining backend stays where it is.
    for _ in 0..3 {
        let newcomer = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        assert_eq!(ask(&newcomer, addr, b"new").await, "b: new");
    }
    assert_eq!(ask(&on_a, addr, b"still").await, "a: still");
    // At the deadline its session ends, logged as drained, and the client's next datagram
    // opens one on another backend.
    eventually("the drained session's line", || {
        lines().iter().any(|l| l["outcome"] == "drained")
    })
    .await;
    let drained: Vec<_> = lines()
        .into_iter()
        .filter(|l| l["outcome"] == "drained")
        .collect();
    assert_eq!(drained.len(), 1, "{drained:?}");
    assert_eq!(drained[0]["backend"], a.to_string());
    assert_eq!(state.active.load(Ordering::Relaxed), 0);
    assert_eq!(ask(&on_a, addr, b"moved").await, "b: moved");
    assert_eq!(ask(&on_b, addr, b"same").await, "b: same");
    assert_eq!(proxy.stats("dns").open.load(Ordering::Relaxed), 5);
}

/// A drain, or a reload that removes a backend, lets its sessions finish; one that has gone idle
/// has finished, and ends at the listener's idle timeout rather than at the drain's deadline.
#[tokio::test]
async fn idle_sessions_on_a_draining_or_removed_backend_end_at_the_idle_timeout() {
    let (a, _ta) = udp_named("a").await;
    let (b, _tb) = udp_named("b").await;
    let (c, _tc) = udp_named("c").await;
    let (log, lines) = session_log("idle-drain");
    let extra = format!("idle_timeout = \"500ms\"\n{}", json_access_log(&log));
    let proxy = Proxy::start(&udp_config(&[a, b, c], &extra));
    let addr = proxy.addr("dns");
    // One client on each backend (round robin); the one on `a` is kept.
    let mut on_a = None;
    for _ in 0..3 {
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        if ask(&client, addr, b"hi").await.starts_with("a:") {
            on_a = Some(client);
        }
    }
    let on_a = on_a.expect("a client on a");
    let (state_a, state_b) = (
        proxy.registry.get("p", a).expect("state"),
        proxy.registry.get("p", b).expect("state"),
    );
    // `b` leaves the pool; `a` drains with an hour to go (after the reload, which would end a
    // drain of the admin API's). Both still have their session.
    proxy
        .reload(&udp_config(&[a, c], &extra))
        .await
        .expect("reloads");
    assert!(state_b.is_removed());
    assert_eq!(state_b.active.load(Ordering::Relaxed), 1);
    state_a.start_drain(std::time::Duration::from_secs(3600));
    assert_eq!(ask(&on_a, addr, b"still").await, "a: still");
    eventually("the three sessions' lines", || lines().len() == 3).await;
    for line in lines() {
        assert_eq!(line["outcome"], "idle_timeout", "{line}");
    }
    assert_eq!(state_a.active.load(Ordering::Relaxed), 0);
    assert_eq!(state_b.active.load(Ordering::Relaxed), 0);
    assert_eq!(proxy.stats("dns").open.load(Ordering::Relaxed), 0);
}

/// A shutdown serves the sessions that are open until they go idle; those that are idle
/// already do not keep the process until the drain's deadline.
#[tokio::test]
async fn a_shutdown_waits_for_idle_sessions_only_up_to_the_idle_timeout() {
    let (a, _ta) = udp_named("a").await;
    let (b, _tb) = udp_named("b").await;
    let (log, lines) = session_log("idle-shutdown");
    let mut proxy = Proxy::start(&format!(
        "[global]\ndrain_timeout = \"1h\"\n\n{}",
        udp_config(
            &[a, b],
            &format!("idle_timeout = \"300ms\"\n{}", json_access_log(&log)),
        )
    ));
    let addr = proxy.addr("dns");
    let (on_a, _on_b) = one_client_on_each(addr).await;
    // One of the two backends drains too, as an operator would have it before a stop.
    proxy
        .registry
        .get("p", a)
        .expect("state")
        .start_drain(std::time::Duration::from_secs(3600));
    assert_eq!(ask(&on_a, addr, b"last").await, "a: last");
    proxy.shutdown.cancel();
    assert_eq!(
        proxy.drained().await,
        0,
        "nothing was left for the deadline"
    );
    let lines = lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in lines {
        assert_eq!(line["outcome"], "idle_timeout", "{line}");
    }
}

#[tokio::test]
async fn a_refused_session_whose_backend_a_reload_removed_opens_again_elsewhere() {
    let (live, _task) = udp_named("live").await;
    let dead = {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        socket.local_addr().expect("addr")
    };
    let proxy = Proxy::start(&udp_config(&[live, dead], ""));
    let addr = proxy.addr("dns");
    // Round robin: the first client lands on `live`, the second on `dead`, which refuses.
    let first = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    assert_eq!(ask(&first, addr, b"one").await, "live: one");
    let second = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    second.send_to(b"two", addr).await.expect("send");
    let state = proxy.registry.get("p", dead).expect("state");
    eventually("the refusal", || {
        state.connect_failures.load(Ordering::Relaxed) == 1
    })
    .await;
    // The refusing backend leaves the pool; its session is still in the table, broken.
    proxy
        .reload(&udp_config(&[live], ""))
        .await
        .expect("reloads");
    // The client's next datagram opens a session on what the pool has now.
    assert_eq!(ask(&second, addr, b"again").await, "live: again");
    let third = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    assert_eq!(ask(&third, addr, b"three").await, "live: three");
}

/// Two clients in session, one on each backend of `proxy` (round robin), returned as the one on
/// `a` and the one on the other.
async fn one_client_on_each(addr: std::net::SocketAddr) -> (UdpSocket, UdpSocket) {
    let first = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let second = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let one = ask(&first, addr, b"1").await;
    let two = ask(&second, addr, b"2").await;
    assert_ne!(one[..1], two[..1]);
    if one.starts_with("a:") {
        (first, second)
    } else {
        (second, first)
    }
}

#[tokio::test]
async fn sessions_on_a_backend_a_reload_removed_move_at_their_next_datagram() {
    let (a, _ta) = udp_named("a").await;
    let (b, _tb) = udp_named("b").await;
    let (log, lines) = session_log("removed");
    let extra = format!("idle_timeout = \"1h\"\n{}", json_access_log(&log));
    let proxy = Proxy::start(&udp_config(&[a, b], &extra));
    let addr = proxy.addr("dns");
    let (on_a, on_b) = one_client_on_each(addr).await;
    let state = proxy.registry.get("p", a).expect("state");
    // `a` leaves the pool, though it still runs and answers.
    proxy
        .reload(&udp_config(&[b], &extra))
        .await
        .expect("reloads");
    assert_eq!(ask(&on_a, addr, b"after").await, "b: after");
    assert_eq!(ask(&on_a, addr, b"again").await, "b: again");
    assert_eq!(ask(&on_b, addr, b"same").await, "b: same");
    // The old session let go of `a` and was logged.
    assert_eq!(state.active.load(Ordering::Relaxed), 0);
    eventually("the moved session's line", || {
        lines().iter().any(|l| l["outcome"] == "moved")
    })
    .await;
    let moved: Vec<_> = lines()
        .into_iter()
        .filter(|l| l["outcome"] == "moved")
        .collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(moved[0]["backend"], a.to_string());
    assert_eq!(proxy.stats("dns").open.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn sessions_on_a_disabled_or_ejected_backend_move_at_their_next_datagram() {
    let (a, _ta) = udp_named("a").await;
    let (b, _tb) = udp_named("b").await;
    let proxy = Proxy::start(&udp_config(&[a, b], "idle_timeout = \"1h\""));
    let addr = proxy.addr("dns");
    let (on_a, on_b) = one_client_on_each(addr).await;
    let state_a = proxy.registry.get("p", a).expect("state");
    let state_b = proxy.registry.get("p", b).expect("state");
    // Disabled as the admin API does it: the session moves.
    state_a.set_usable(false);
    assert_eq!(ask(&on_a, addr, b"x").await, "b: x");
    assert_eq!(state_a.active.load(Ordering::Relaxed), 0);
    state_a.set_usable(true);
    // Ejected: both clients now on `b`, which is ejected while `a` is usable again.
    state_b.eject(std::time::Duration::from_secs(3600));
    assert_eq!(ask(&on_a, addr, b"y").await, "a: y");
    assert_eq!(ask(&on_b, addr, b"z").await, "a: z");
    assert_eq!(state_b.active.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn sessions_stay_on_an_ejected_backend_when_no_other_is_usable() {
    let (a, _ta) = udp_named("a").await;
    let proxy = Proxy::start(&udp_config(&[a], "idle_timeout = \"1h\""));
    let addr = proxy.addr("dns");
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    assert_eq!(ask(&client, addr, b"1").await, "a: 1");
    let state = proxy.registry.get("p", a).expect("state");
    state.eject(std::time::Duration::from_secs(3600));
    // Nowhere to go: the session stays rather than the client losing its answers.
    for i in 0..3 {
        let question = format!("q{i}");
        assert_eq!(
            ask(&client, addr, question.as_bytes()).await,
            format!("a: {question}")
        );
    }
    assert_eq!(proxy.stats("dns").connections.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn at_the_cap_sessions_a_backend_refused_make_room_for_new_clients() {
    let (live, _task) = udp_named("live").await;
    let dead = {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        socket.local_addr().expect("addr")
    };
    let proxy = Proxy::start(&udp_config(
        &[live, dead],
        "idle_timeout = \"1h\"\nmax_sessions = 2",
    ));
    let addr = proxy.addr("dns");
    // Round robin: the first client lands on `live`, the second on `dead`, which refuses; its
    // client, as DNS clients do, asks again from another port.
    let first = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    assert_eq!(ask(&first, addr, b"one").await, "live: one");
    let second = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    second.send_to(b"two", addr).await.expect("send");
    let state = proxy.registry.get("p", dead).expect("state");
    eventually("the refusal", || {
        state.connect_failures.load(Ordering::Relaxed) == 1
    })
    .await;
    // The table is full, one of its two sessions dead: a new client takes its place.
    let third = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    assert_eq!(ask(&third, addr, b"three").await, "live: three");
    assert_eq!(ask(&first, addr, b"again").await, "live: again");
    assert_eq!(proxy.stats("dns").open.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn sessions_follow_a_reload_that_points_their_listener_at_another_pool() {
    let (a, _ta) = udp_named("a").await;
    let (b, _tb) = udp_named("b").await;
    let text = |pool: &str| {
        format!(
            "[[listeners]]\nname = \"dns\"\nbind = \"127.0.0.1:0\"\nprotocol = \"udp\"\npool = \"{pool}\"\nidle_timeout = \"1h\"\n\n[pools.p]\nbackends = [\"{a}\"]\n\n[pools.q]\nbackends = [\"{b}\"]\n"
        )
    };
    let proxy = Proxy::start(&text("p"));
    let addr = proxy.addr("dns");
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    assert_eq!(ask(&client, addr, b"1").await, "a: 1");
    proxy.reload(&text("q")).await.expect("reloads");
    assert_eq!(ask(&client, addr, b"2").await, "b: 2");
    let state = proxy.registry.get("p", a).expect("state");
    assert_eq!(state.active.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_reload_that_shortens_the_idle_timeout_sweeps_at_the_new_pace() {
    let (a, _ta) = udp_named("a").await;
    // An hour: the sweep runs every second, the slowest it goes.
    let proxy = Proxy::start(&udp_config(&[a], "idle_timeout = \"1h\""));
    proxy
        .reload(&udp_config(&[a], "idle_timeout = \"50ms\""))
        .await
        .expect("reloads");
    let addr = proxy.addr("dns");
    let stats = proxy.stats("dns");
    // The first session ends at some sweep; the second opens right after it, a whole sweep
    // interval of the old pace before the next one would come.
    for round in 0..2 {
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let sent = std::time::Instant::now();
        assert_eq!(ask(&client, addr, b"hello").await, "a: hello");
        eventually("the idle session is gone", || {
            stats.open.load(Ordering::Relaxed) == 0
        })
        .await;
        let lasted = sent.elapsed();
        assert!(
            lasted >= std::time::Duration::from_millis(50),
            "round {round}: {lasted:?}"
        );
        if round == 1 {
            assert!(
                lasted < std::time::Duration::from_millis(600),
                "gone {lasted:?} after its last datagram, not about the 50 ms idle timeout"
            );
        }
    }
}
