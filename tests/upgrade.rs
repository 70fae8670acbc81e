//! Zero-downtime binary upgrade: a new process takes the listening sockets of the running one,
//! which then drains and exits, and no connection is refused meanwhile.

mod common;

use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

use common::*;

#[tokio::test]
async fn the_hand_over_under_load_refuses_no_connection() {
    let backend = http_backend("a").await;
    let dir = temp_dir_for("upgrade");
    let socket = dir.join("upgrade.sock");
    // A free port for the admin listener, which is handed over too.
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let config = format!(
        "[admin]\nbind = \"127.0.0.1:{admin_port}\"\n[global]\ndrain_timeout = \"10s\"\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"p\"\n[[listeners]]\nname = \"l4\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"p\"\n[pools.p]\nbackends = [\"{}\"]\n",
        backend.addr
    );
    let offer: [&OsStr; 2] = ["--upgrade-socket".as_ref(), socket.as_os_str()];
    let mut old = spawn_binary_with("upgrade-old", &config, &offer).await;
    let addr = old.addr;
    eventually("the upgrade socket exists", || socket.exists()).await;

    // Steady load: a new connection per request, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        load.push(tokio::spawn(async move {
            for _ in 0..1_000_000 {
                if stop.load(SeqCst) {
                    break;
                }
                let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
                    failed.fetch_add(1, SeqCst);
                    continue;
                };
                let mut client = HttpClient::from_stream(stream);
                client
                    .send(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                    .await;
                match client.reply().await {
                    Some(reply) if reply.status == 200 => ok.fetch_add(1, SeqCst),
                    _ => failed.fetch_add(1, SeqCst),
                };
            }
        }));
    }
    eventually("load flows", || ok.load(SeqCst) > 50).await;

    let take: [&OsStr; 4] = [
        "--upgrade-from".as_ref(),
        socket.as_os_str(),
        "--upgrade-socket".as_ref(),
        socket.as_os_str(),
    ];
    let new = spawn_binary_with("upgrade-new", &config, &take).await;
    assert_eq!(new.addr, addr, "the same socket");
    let status = tokio::time::timeout(PATIENCE, old.child.wait())
        .await
        .expect("the old process drains and exits")
        .expect("status");
    assert!(status.success(), "{status}");
    let after = ok.load(SeqCst);
    eventually("the new process serves", || ok.load(SeqCst) > after + 50).await;
    stop.store(true, SeqCst);
    for worker in load {
        worker.await.expect("joins");
    }
    assert_eq!(failed.load(SeqCst), 0, "{} served", ok.load(SeqCst));
    // The admin API came along: the new process answers on the same address.
    let mut admin = HttpClient::connect(([127, 0, 0, 1], admin_port).into()).await;
    admin
        .send(b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await;
    let reply = admin.reply().await.expect("an answer");
    assert_eq!(reply.status, 200);
    assert!(
        reply.text().contains("\"generation\":1"),
        "{}",
        reply.text()
    );
    drop(new);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A new process that connects to the upgrade socket and then goes quiet leaves the old one's
/// hand-over waiting (for up to a minute); a SIGTERM meanwhile still ends the old process as
/// soon as it has drained.
#[tokio::test]
async fn a_sigterm_during_a_stalled_hand_over_exits_without_waiting_for_it() {
    let backend = http_backend("a").await;
    let dir = temp_dir_for("stalled");
    let socket = dir.join("upgrade.sock");
    let config = format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"p\"\n[pools.p]\nbackends = [\"{}\"]\n",
        backend.addr
    );
    let offer: [&OsStr; 2] = ["--upgrade-socket".as_ref(), socket.as_os_str()];
    let mut old = spawn_binary_with("upgrade-stalled", &config, &offer).await;
    eventually("the upgrade socket exists", || socket.exists()).await;
    // The would-be new process: it takes the sockets' descriptions and never says READY.
    let mut quiet = tokio::net::UnixStream::connect(&socket)
        .await
        .expect("connect");
    let mut first = [0u8; 4];
    tokio::time::timeout(
        PATIENCE,
        tokio::io::AsyncReadExt::read_exact(&mut quiet, &mut first),
    )
    .await
    .expect("the hand-over started")
    .expect("read");
    let pid = old.child.id().expect("pid") as libc::pid_t;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(PATIENCE, old.child.wait())
        .await
        .expect("exits without waiting out the hand-over")
        .expect("status");
    assert!(status.success(), "{status}");
    drop(quiet);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The answer to `GET /api/state` on an admin address, or `None` when nothing serves there.
async fn admin_state(addr: std::net::SocketAddr) -> Option<String> {
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut client = HttpClient::from_stream(stream);
    client
        .send(b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await;
    client.reply().await.map(|reply| reply.text())
}

/// A reload that moves `[admin]` leaves the admin listener where it was until the next start.
/// An upgrade is that start: the new process serves the admin API at the address its file
/// names, not on the old process's socket for the address it was started with.
#[tokio::test]
async fn an_upgrade_binds_the_admin_address_a_reload_moved() {
    let backend = http_backend("a").await;
    let dir = temp_dir_for("upgrade-admin-moved");
    let socket = dir.join("upgrade.sock");
    // Two free ports, held together so that they differ.
    let (first, second) = {
        let a = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let b = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        (a.local_addr().expect("addr"), b.local_addr().expect("addr"))
    };
    let config = |admin: std::net::SocketAddr| {
        format!(
            "[admin]\nbind = \"{admin}\"\n[global]\ndrain_timeout = \"2s\"\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"p\"\n[pools.p]\nbackends = [\"{}\"]\n",
            backend.addr
        )
    };
    let offer: [&OsStr; 2] = ["--upgrade-socket".as_ref(), socket.as_os_str()];
    let mut old = spawn_binary_with("upgrade-admin-old", &config(first), &offer).await;
    eventually("the upgrade socket exists", || socket.exists()).await;

    // The file moves the admin listener; the reload applies, the admin API stays put.
    std::fs::write(&old.config, config(second)).expect("write");
    let pid = old.child.id().expect("pid") as libc::pid_t;
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    eventually_async("the reload is in force", || async move {
        admin_state(first)
            .await
            .is_some_and(|state| state.contains("\"generation\":2"))
    })
    .await;

    let take: [&OsStr; 2] = ["--upgrade-from".as_ref(), socket.as_os_str()];
    let new = spawn_binary_with("upgrade-admin-new", &config(second), &take).await;
    let status = tokio::time::timeout(PATIENCE, old.child.wait())
        .await
        .expect("the old process drains and exits")
        .expect("status");
    assert!(status.success(), "{status}");
    let state = admin_state(second).await;
    assert!(
        state
            .as_deref()
            .is_some_and(|s| s.contains("\"generation\":1")),
        "the new process's admin API at {second}: {state:?}"
    );
    assert_eq!(
        admin_state(first).await,
        None,
        "nothing serves the old admin address"
    );
    drop(new);
    let _ = std::fs::remove_dir_all(&dir);
}
