//! Running under an operator's tools: `run --watch` reloads on a file change and waits out a
//! broken file; the service manager is told of readiness, reloads and the drain (sd_notify).

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

/// A directory of the test's own, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("switchyard-ops-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The binary running `run`, with its log lines to wait on.
struct Started {
    child: tokio::process::Child,
    addr: std::net::SocketAddr,
    log: mpsc::UnboundedReceiver<String>,
}

impl Started {
    async fn new(config: &Path, extra: &[&str], env: &[(&str, &Path)]) -> Started {
        let mut command = tokio::process::Command::new(BIN);
        command
            .args(["run", "--threads", "2", "--config"])
            .arg(config)
            .args(extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("starts");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let (tx, log) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line);
            }
        });
        let mut started = Started {
            child,
            addr: "0.0.0.0:0".parse().expect("addr"),
            log,
        };
        let line = started.wait_for("listening").await;
        started.addr = line
            .split("addr=")
            .nth(1)
            .and_then(|a| a.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .expect("the listening line names the address");
        started
    }

    /// The next log line containing `needle`.
    async fn wait_for(&mut self, needle: &str) -> String {
        tokio::time::timeout(PATIENCE, async {
            while let Some(line) = self.log.recv().await {
                if line.contains(needle) {
                    return line;
                }
            }
            panic!("exited before logging `{needle}`");
        })
        .await
        .unwrap_or_else(|_| panic!("no `{needle}` in the log in time"))
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = self.child.id().expect("running") as libc::pid_t;
        // SAFETY: kill(2) with a pid we started and a valid signal number.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }
}

fn l4_config(backend: std::net::SocketAddr) -> String {
    single_tcp_pool(&[backend], "", "")
}

/// Replaces `path` the way editors do: a new file renamed over the old one.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[tokio::test]
async fn watch_reloads_a_changed_file_and_waits_out_a_broken_or_missing_one() {
    let a = Backend::named("a").await;
    let b = Backend::named("b").await;
    let dir = TempDir::new("watch");
    let path = dir.0.join("switchyard.toml");
    std::fs::write(&path, l4_config(a.addr)).expect("write");
    let mut proxy = Started::new(&path, &["--watch"], &[]).await;
    assert_eq!(first_line(proxy.addr).await, "a");

    // An editor's save: written elsewhere, renamed over the file.
    replace(&path, &l4_config(b.addr));
    let line = proxy.wait_for("configuration reloaded").await;
    assert!(line.contains("generation=2"), "{line}");
    assert_eq!(first_line(proxy.addr).await, "b");

    // Half written in place: refused, and the running configuration stays.
    let text = l4_config(a.addr);
    std::fs::write(&path, &text[..text.len() / 2]).expect("write");
    proxy.wait_for("reload refused").await;
    assert_eq!(first_line(proxy.addr).await, "b");

    // Gone: nothing is reloaded until it is back.
    std::fs::remove_file(&path).expect("remove");
    proxy.wait_for("configuration file is gone").await;
    assert_eq!(first_line(proxy.addr).await, "b");
    std::fs::write(&path, &text).expect("write");
    let line = proxy.wait_for("configuration reloaded").await;
    assert!(
        line.contains("generation=3"),
        "one reload per change, none for the broken file: {line}"
    );
    assert_eq!(first_line(proxy.addr).await, "a");
}

#[tokio::test]
async fn watch_follows_a_symlink_swapped_like_a_kubernetes_config_map() {
    use std::os::unix::fs::symlink;
    let a = Backend::named("a").await;
    let b = Backend::named("b").await;
    let dir = TempDir::new("configmap");
    // switchyard.toml -> ..data/switchyard.toml, ..data -> v1; an update writes v2 and renames
    // a new ..data link over the old one.
    for (version, backend) in [("v1", a.addr), ("v2", b.addr)] {
        std::fs::create_dir(dir.0.join(version)).expect("dir");
        std::fs::write(
            dir.0.join(version).join("switchyard.toml"),
            l4_config(backend),
        )
        .expect("write");
    }
    symlink("v1", dir.0.join("..data")).expect("symlink");
    let path = dir.0.join("switchyard.toml");
    symlink("..data/switchyard.toml", &path).expect("symlink");
    let mut proxy = Started::new(&path, &["--watch"], &[]).await;
    assert_eq!(first_line(proxy.addr).await, "a");

    symlink("v2", dir.0.join("..data_tmp")).expect("symlink");
    std::fs::rename(dir.0.join("..data_tmp"), dir.0.join("..data")).expect("rename");
    proxy.wait_for("configuration reloaded").await;
    assert_eq!(first_line(proxy.addr).await, "b");
}

/// The next message the service manager would get, as its lines.
async fn next_message(socket: &tokio::net::UnixDatagram) -> Vec<String> {
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(PATIENCE, socket.recv(&mut buf))
        .await
        .expect("a notification in time")
        .expect("recv");
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn the_service_manager_hears_ready_reloading_and_stopping() {
    let backend = Backend::named("a").await;
    let dir = TempDir::new("notify");
    let socket_path = dir.0.join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).expect("bind");
    let path = dir.0.join("switchyard.toml");
    std::fs::write(&path, l4_config(backend.addr)).expect("write");
    let mut proxy = Started::new(&path, &[], &[("NOTIFY_SOCKET", &socket_path)]).await;

    let ready = next_message(&socket).await;
    assert!(ready.contains(&"READY=1".to_owned()), "{ready:?}");
    assert_eq!(first_line(proxy.addr).await, "a", "serving once ready");

    for (text, outcome) in [
        (l4_config(backend.addr), "STATUS=serving"),
        ("[[".to_owned(), "STATUS=reload refused"),
    ] {
        std::fs::write(&path, text).expect("write");
        let before = switchyard::sys::monotonic_usec();
        proxy.signal(libc::SIGHUP);
        let reloading = next_message(&socket).await;
        let after = switchyard::sys::monotonic_usec();
        assert_eq!(reloading[0], "RELOADING=1", "{reloading:?}");
        let usec: u64 = reloading
            .iter()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .and_then(|v| v.parse().ok())
            .expect("MONOTONIC_USEC with RELOADING=1");
        assert!(
            before <= usec && usec <= after,
            "{before} <= {usec} <= {after}"
        );
        let done = next_message(&socket).await;
        assert_eq!(done[0], "READY=1", "{done:?}");
        assert!(done.iter().any(|l| l.starts_with(outcome)), "{done:?}");
    }

    proxy.signal(libc::SIGTERM);
    let stopping = next_message(&socket).await;
    assert_eq!(stopping[0], "STOPPING=1", "{stopping:?}");
    let status = tokio::time::timeout(PATIENCE, proxy.child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert!(status.success(), "{status}");
    proxy.wait_for("switchyard stopped").await;
}

#[tokio::test]
async fn a_sighup_during_the_drain_is_refused_with_a_reason_in_the_log() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::echo().await;
    let dir = TempDir::new("hup-drain");
    let path = dir.0.join("switchyard.toml");
    std::fs::write(&path, l4_config(backend.addr)).expect("write");
    let mut proxy = Started::new(&path, &[], &[]).await;
    // An open connection keeps the drain going.
    let mut open = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    open.write_all(b"x").await.expect("write");
    let mut one = [0u8; 1];
    open.read_exact(&mut one).await.expect("echo");

    proxy.signal(libc::SIGTERM);
    proxy.wait_for("shutting down").await;
    proxy.signal(libc::SIGHUP);
    let refused = proxy.wait_for("reload refused").await;
    assert!(refused.contains("shutting down"), "{refused}");
    // The drain goes on: the connection still works, and its end lets the process exit.
    open.write_all(b"y").await.expect("write");
    open.read_exact(&mut one).await.expect("echo");
    drop(open);
    let status = tokio::time::timeout(PATIENCE, proxy.child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert!(status.success(), "{status}");
}

/// A running binary with an admin API, told to notify a socket of ours (it has said READY=1),
/// whose configuration file has become a FIFO: a reload waits in reading it until something
/// writes it, as on a hung network mount.
struct Held {
    dir: TempDir,
    socket: tokio::net::UnixDatagram,
    /// The FIFO.
    path: PathBuf,
    /// The configuration to write into it.
    text: String,
    proxy: Started,
    admin: std::net::SocketAddr,
}

async fn held_reloads(name: &str, backend: std::net::SocketAddr) -> Held {
    let dir = TempDir::new(name);
    let socket_path = dir.0.join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).expect("bind");
    let path = dir.0.join("switchyard.toml");
    let text = format!("[admin]\nbind = \"127.0.0.1:0\"\n\n{}", l4_config(backend));
    std::fs::write(&path, &text).expect("write");
    let mut proxy = Started::new(&path, &[], &[("NOTIFY_SOCKET", &socket_path)]).await;
    let admin = proxy
        .wait_for("admin API listening")
        .await
        .split("addr=")
        .nth(1)
        .and_then(|a| a.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .expect("the admin address");
    let ready = next_message(&socket).await;
    assert!(ready.contains(&"READY=1".to_owned()), "{ready:?}");
    std::fs::remove_file(&path).expect("remove");
    let fifo = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: mkfifo(3) with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    Held {
        dir,
        socket,
        path,
        text,
        proxy,
        admin,
    }
}

#[tokio::test]
async fn a_reload_through_the_api_finishes_even_when_its_client_gives_up() {
    use tokio::io::AsyncWriteExt;
    let backend = Backend::named("a").await;
    let Held {
        dir: _dir,
        socket,
        path,
        text,
        mut proxy,
        admin,
    } = held_reloads("api-reload-left", backend.addr).await;

    // A client asks for a reload and gives up before it is done.
    let mut client = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect");
    client
        .write_all(b"POST /api/reload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
        .await
        .expect("send");
    let reloading = next_message(&socket).await;
    assert_eq!(reloading[0], "RELOADING=1", "{reloading:?}");
    drop(client);
    // Time for the admin listener to see the client go (it does at once, on the FIN).
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    // The file arrives: the reload goes on to its end, and the service manager hears of it.
    let writer = tokio::task::spawn_blocking(move || std::fs::write(&path, text));
    let done = next_message(&socket).await;
    assert_eq!(done[0], "READY=1", "{done:?}");
    assert!(
        done.iter()
            .any(|l| l.starts_with("STATUS=serving configuration generation 2")),
        "{done:?}"
    );
    proxy.wait_for("configuration reloaded").await;
    writer.await.expect("writer").expect("written");
}

/// Two reloads at once (a SIGHUP while one the API asked for waits on the file): the service
/// manager hears RELOADING=1 once, and READY=1 only when both are over, never READY=1 while
/// the second still runs.
#[tokio::test]
async fn overlapping_reloads_are_one_reload_to_the_service_manager() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::AsyncWriteExt;
    let backend = Backend::named("a").await;
    let Held {
        dir: _dir,
        socket,
        path,
        text,
        mut proxy,
        admin,
    } = held_reloads("overlapping-reloads", backend.addr).await;

    let mut client = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect");
    client
        .write_all(b"POST /api/reload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
        .await
        .expect("send");
    let reloading = next_message(&socket).await;
    assert_eq!(reloading[0], "RELOADING=1", "{reloading:?}");
    proxy.signal(libc::SIGHUP);
    proxy.wait_for("SIGHUP received").await;

    // The file, for every reload that opens it: a FIFO opened for writing without blocking
    // fails while no reader has it open. Bounded by the flag and by time.
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let done = Arc::clone(&done);
        let path = path.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let until = std::time::Instant::now() + PATIENCE;
            while !done.load(Ordering::Relaxed) && std::time::Instant::now() < until {
                match std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&path)
                {
                    Ok(mut file) => {
                        let _ = file.write_all(text.as_bytes());
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        })
    };
    let next = next_message(&socket).await;
    done.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    assert_eq!(next[0], "READY=1", "{next:?}");
    drop(client);
}

#[tokio::test]
async fn sigusr1_reopens_the_access_log_that_logrotate_moved() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::echo().await;
    let dir = TempDir::new("usr1");
    let log = dir.0.join("access.log");
    let path = dir.0.join("switchyard.toml");
    std::fs::write(
        &path,
        single_tcp_pool(&[backend.addr], &json_access_log(&log), ""),
    )
    .expect("write");
    let mut proxy = Started::new(&path, &[], &[]).await;
    let lines = |path: &Path| {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let addr = proxy.addr;
    let connect = || async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.expect("echo");
    };
    connect().await;
    eventually("the first line", || lines(&log) == 1).await;

    // logrotate: move the file, then SIGUSR1 (postrotate); the file is opened again at once,
    // before any new line, and new lines go there.
    let rotated = dir.0.join("access.log.1");
    std::fs::rename(&log, &rotated).expect("rotate");
    proxy.signal(libc::SIGUSR1);
    proxy.wait_for("reopening access logs").await;
    eventually("the log file opened again", || log.exists()).await;
    connect().await;
    eventually("the second line in the new file", || lines(&log) == 1).await;
    assert_eq!(lines(&rotated), 1);
}

/// The body of `GET path` on the admin API at `admin`.
async fn admin_get(admin: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect to the admin API");
    // HTTP/1.0: the body comes as it is, not in chunks, and ends with the connection.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {admin}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// Connections to a backend that a reload took out of its pool are no longer among the
/// backends the registry lists, but the process's drain deadline still closes them, parked or
/// not, each with its `drained` line, and the process exits then rather than losing their lines.
#[tokio::test]
async fn the_drain_deadline_closes_and_logs_connections_to_a_backend_a_reload_removed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = Backend::echo().await;
    let b = Backend::echo().await;
    let dir = TempDir::new("deadline-removed");
    let log = dir.0.join("access.log");
    let path = dir.0.join("switchyard.toml");
    let config = |backend: std::net::SocketAddr| {
        format!(
            "[global]\ndrain_timeout = \"300ms\"\n[admin]\nbind = \"127.0.0.1:0\"\n{}",
            single_tcp_pool(&[backend], &json_access_log(&log), "")
        )
    };
    std::fs::write(&path, config(a.addr)).expect("write");
    let mut proxy = Started::new(&path, &[], &[]).await;
    let admin: std::net::SocketAddr = proxy
        .wait_for("admin API listening")
        .await
        .split("addr=")
        .nth(1)
        .and_then(|a| a.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .expect("the admin address");
    let addr = proxy.addr;
    let open = || async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.expect("echo");
        stream
    };
    // Two connections to `a`, left idle until both are parked.
    let mut busy = open().await;
    let mut parked = open().await;
    eventually_async("both connections parked", || async {
        admin_get(admin, "/metrics")
            .await
            .lines()
            .any(|l| l == "switchyard_connections_parked 2")
    })
    .await;

    // The reload takes `a` out of the pool; its connections go on.
    std::fs::write(&path, config(b.addr)).expect("write");
    proxy.signal(libc::SIGHUP);
    proxy.wait_for("configuration reloaded").await;
    let mut to_b = open().await;
    busy.write_all(b"more").await.expect("write");
    let mut buf = [0u8; 4];
    busy.read_exact(&mut buf)
        .await
        .expect("echo after the reload");

    proxy.signal(libc::SIGTERM);
    let status = tokio::time::timeout(PATIENCE, proxy.child.wait())
        .await
        .expect("exits at the drain deadline")
        .expect("status");
    assert!(status.success(), "{status}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines.len(), 3, "a line for every connection: {lines:?}");
    assert!(lines.iter().all(|l| l["outcome"] == "drained"), "{lines:?}");
    let on_a = lines
        .iter()
        .filter(|l| l["backend"] == a.addr.to_string())
        .count();
    assert_eq!(on_a, 2, "{lines:?}");
    // Every client is told: its connection ends.
    for stream in [&mut busy, &mut parked, &mut to_b] {
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest)).await;
        assert!(ended.is_ok(), "the connection was closed");
    }
}

/// A request waiting for its answer from a backend a reload removed is answered 504 and logged
/// at the process's drain deadline, as one on a backend the pool still lists is.
#[tokio::test]
async fn a_request_on_a_removed_backend_is_answered_at_the_drain_deadline() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let removed = silent.local_addr().expect("addr");
    let other = http_backend("other").await;
    let dir = TempDir::new("deadline-removed-http");
    let log = dir.0.join("http.log");
    let config = |backend: std::net::SocketAddr| {
        format!(
            "[global]\ndrain_timeout = \"200ms\"\n{}",
            single_pool(&[backend], &json_access_log(&log), "")
        )
    };
    let mut proxy = Proxy::start(&config(removed));
    let mut client = HttpClient::connect(proxy.addr("l7")).await;
    client.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
    // The backend takes the request and never answers.
    let (_held, _) = tokio::time::timeout(PATIENCE, silent.accept())
        .await
        .expect("the request reached the backend")
        .expect("accept");
    proxy.reload(&config(other.addr)).await.expect("reload");
    proxy.shutdown.cancel();
    let reply = client.reply().await.expect("an answer");
    assert_eq!(reply.status, 504);
    proxy.drained().await;
    let line = &json_lines(&log, 1).await[0];
    assert_eq!(line["status"], 504);
    assert_eq!(line["backend"], removed.to_string());
}

/// A udp session on a backend a reload removed, still open at the process's drain deadline,
/// ends there with its line, as every session does.
#[tokio::test]
async fn a_udp_session_on_a_removed_backend_ends_at_the_drain_deadline_with_its_line() {
    let (removed, _a) = udp_named("a").await;
    let (other, _b) = udp_named("b").await;
    let dir = TempDir::new("deadline-removed-udp");
    let log = dir.0.join("udp.log");
    let config = |backend: std::net::SocketAddr| {
        format!(
            "[global]\ndrain_timeout = \"200ms\"\n[[listeners]]\nname = \"dns\"\nbind = \"127.0.0.1:0\"\nprotocol = \"udp\"\npool = \"p\"\nidle_timeout = \"1h\"\n{}\n[pools.p]\nbackends = [\"{backend}\"]\n",
            json_access_log(&log)
        )
    };
    let mut proxy = Proxy::start(&config(removed));
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    client.send_to(b"q", proxy.addr("dns")).await.expect("send");
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(PATIENCE, client.recv_from(&mut buf))
        .await
        .expect("a reply in time")
        .expect("recv");
    assert_eq!(&buf[..n], b"a: q");
    proxy.reload(&config(other)).await.expect("reload");
    proxy.shutdown.cancel();
    proxy.drained().await;
    let line = &json_lines(&log, 1).await[0];
    assert_eq!(line["backend"], removed.to_string());
    assert_eq!(line["outcome"], "closed");
}
