//! Test helpers: the real proxy, in-process, on 127.0.0.1:0, and small real backends.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use switchyard::backend::Registry;
use switchyard::{Config, Server};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The compiled binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// Writes `text` to a file of its own in the temp directory.
pub fn temp_config(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "switchyard-test-{}-{name}.toml",
        std::process::id()
    ));
    std::fs::write(&path, text).expect("write temp config");
    path
}

/// The binary, running a configuration of its own; killed when dropped.
pub struct Running {
    pub child: tokio::process::Child,
    /// The first listener's address, from its "listening" log line.
    pub addr: SocketAddr,
    pub config: std::path::PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// Starts the binary on `toml` (written to a temp file named after `name`) and waits until its
/// first listener is up.
pub async fn spawn_binary(name: &str, toml: &str) -> Running {
    spawn_binary_with(name, toml, &[]).await
}

/// Like [`spawn_binary`], with more arguments for `run`.
pub async fn spawn_binary_with(name: &str, toml: &str, args: &[&std::ffi::OsStr]) -> Running {
    let config = temp_config(name, toml);
    let mut command = tokio::process::Command::new(BIN);
    command.arg("run").args(args);
    spawn_run(command, config).await
}

/// Like [`spawn_binary`], with at most `limit` open descriptors (soft and hard), set by
/// `prlimit`: for what happens when the process runs out of them.
pub async fn spawn_with_fd_limit(name: &str, toml: &str, limit: usize) -> Running {
    let config = temp_config(&format!("{name}-fd-limit-{limit}"), toml);
    let mut command = tokio::process::Command::new("prlimit");
    command
        .arg(format!("--nofile={limit}:{limit}"))
        .arg(BIN)
        .arg("run");
    spawn_run(command, config).await
}

/// Finishes `command` (a `run` of the binary) with two threads and `config`, starts it and
/// waits until its first listener is up.
async fn spawn_run(mut command: tokio::process::Command, config: std::path::PathBuf) -> Running {
    use tokio::io::AsyncBufReadExt;
    let mut child = command
        .args(["--threads", "2", "--config"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starts");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let addr = listening_addr(&mut lines).await;
    // Keep draining the log so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Running {
        child,
        addr,
        config,
    }
}

/// The address in the first "listening" line of a process's log (its first listener's).
pub async fn listening_addr(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
) -> SocketAddr {
    tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.expect("read log") {
            if line.contains("listening") {
                let addr = line.split("addr=").nth(1).expect("addr field");
                return addr
                    .split_whitespace()
                    .next()
                    .expect("addr")
                    .parse()
                    .expect("socket addr");
            }
        }
        panic!("exited before listening");
    })
    .await
    .expect("listening in time")
}

/// Upper bound for anything a test waits on; reaching it is a failure, not synchronisation.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A running proxy.
pub struct Proxy {
    pub server_addrs: Vec<(String, SocketAddr)>,
    pub handle: switchyard::server::ServerHandle,
    pub registry: Arc<Registry>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<usize>,
}

impl Proxy {
    /// Loads `toml`, binds and runs it.
    pub fn start(toml: &str) -> Proxy {
        let config = Config::from_toml(toml, Path::new("test.toml")).expect("test config is valid");
        let names: Vec<String> = config.listeners.iter().map(|l| l.name.clone()).collect();
        let server = Server::bind(config).expect("binds");
        let server_addrs = names
            .iter()
            .map(|n| (n.clone(), server.local_addr(n).expect("bound")))
            .collect();
        let registry = server.registry();
        let shutdown = server.shutdown_token();
        let handle = server.handle();
        let task = tokio::spawn(server.run());
        Proxy {
            handle,
            server_addrs,
            registry,
            shutdown,
            task,
        }
    }

    /// The address of listener `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.handle.local_addr(name).expect("listener exists")
    }

    /// Waits until listener `name` has accepted `count` connections in all.
    pub async fn accepted(&self, name: &str, count: u64) {
        let stats = self.handle.metrics().listener(name);
        eventually("connections accepted", || {
            stats.connections.load(Ordering::SeqCst) == count
        })
        .await;
    }

    /// Waits for the server to finish after a shutdown (well before any drain deadline a test
    /// would set) and returns how many connections the deadline cut.
    pub async fn drained(&mut self) -> usize {
        tokio::time::timeout(PATIENCE, &mut self.task)
            .await
            .expect("drained well before the deadline")
            .expect("server task")
    }

    /// Loads `toml` and reloads the running proxy with it.
    pub async fn reload(
        &self,
        toml: &str,
    ) -> Result<switchyard::server::ReloadSummary, switchyard::ServerError> {
        let config = Config::from_toml(toml, Path::new("test.toml")).expect("test config is valid");
        self.handle.reload(config).await
    }

    /// The counters of listener `name` (for udp: sessions opened and open, datagrams dropped).
    pub fn stats(&self, name: &str) -> Arc<switchyard::metrics::ListenerStats> {
        self.handle.metrics().listener(name)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.task.abort();
    }
}

/// A TCP backend that counts its connections and runs `handler` on each.
pub struct Backend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    /// Starts a backend; `handler` gets each accepted stream.
    pub async fn start<F, Fut>(handler: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(handler(stream));
            }
        });
        Backend {
            addr,
            accepted,
            task,
        }
    }

    /// Echoes every byte back, then shuts down its write side after the client's EOF.
    pub async fn echo() -> Backend {
        Backend::start(|mut stream| async move {
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        })
        .await
    }

    /// Writes `name` and a newline, then waits for the client's EOF and closes.
    pub async fn named(name: &'static str) -> Backend {
        Backend::start(move |mut stream| async move {
            let _ = stream.write_all(format!("{name}\n").as_bytes()).await;
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink).await;
        })
        .await
    }

    /// How many connections it accepted.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// An address nobody listens on (bound, then closed), so connects are refused.
pub async fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}

/// Connects through the proxy and reads the first line the backend sends.
pub async fn first_line(proxy: SocketAddr) -> String {
    let mut stream = TcpStream::connect(proxy).await.expect("connect to proxy");
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut byte))
            .await
            .expect("backend answers in time")
            .expect("read");
        if n == 0 || byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    String::from_utf8(line).expect("utf-8")
}

/// A UDP backend answering each datagram with `name: datagram`.
pub async fn udp_named(name: &'static str) -> (SocketAddr, JoinHandle<()>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
    let addr = socket.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let mut reply = format!("{name}: ").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, from).await;
        }
    });
    (addr, task)
}

/// Waits until `condition` holds, checking every few milliseconds, up to [`PATIENCE`].
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Like [`eventually`], with a condition that has to await (a connect, say).
pub async fn eventually_async<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A small HTTP/1.1 backend, written independently of the proxy's parser: it answers every
/// request with `200`, header `x-backend: NAME`, and a body that reports what it received:
/// `NAME\nMETHOD TARGET\n` then each header line as received, a blank line, and the body.
/// It keeps connections alive and understands Content-Length and chunked request bodies.
pub async fn http_backend(name: &'static str) -> Backend {
    Backend::start(move |stream| serve_http(stream, name)).await
}

/// Serves [`http_backend`]'s answers on one connection, plain or TLS.
pub async fn serve_http<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, name: &str) {
    {
        let mut buf = Vec::new();
        loop {
            let Some(head_end) = read_until(&mut stream, &mut buf, b"\r\n\r\n").await else {
                return;
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            buf.drain(..head_end + 4);
            let mut lines = head.split("\r\n");
            let request_line = lines.next().unwrap_or("").to_owned();
            let headers: Vec<String> = lines.map(str::to_owned).collect();
            let value = |name: &str| {
                headers.iter().find_map(|h| {
                    let (n, v) = h.split_once(':')?;
                    n.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| v.trim().to_owned())
                })
            };
            let mut body = Vec::new();
            if let Some(length) = value("content-length") {
                let length: usize = length.parse().unwrap_or(0);
                while buf.len() < length {
                    if !fill(&mut stream, &mut buf).await {
                        return;
                    }
                }
                body = buf.drain(..length).collect();
            } else if value("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
            {
                loop {
                    let Some(line_end) = read_until(&mut stream, &mut buf, b"\r\n").await else {
                        return;
                    };
                    let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
                    buf.drain(..line_end + 2);
                    let size =
                        usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                            .unwrap_or(0);
                    if size == 0 {
                        // Trailers until the empty line.
                        loop {
                            let Some(end) = read_until(&mut stream, &mut buf, b"\r\n").await else {
                                return;
                            };
                            let empty = end == 0;
                            buf.drain(..end + 2);
                            if empty {
                                break;
                            }
                        }
                        break;
                    }
                    while buf.len() < size + 2 {
                        if !fill(&mut stream, &mut buf).await {
                            return;
                        }
                    }
                    body.extend(buf.drain(..size));
                    buf.drain(..2);
                }
            }
            let mut reply = format!("{name}\n{request_line}\n").into_bytes();
            for h in &headers {
                reply.extend_from_slice(h.as_bytes());
                reply.push(b'\n');
            }
            reply.push(b'\n');
            reply.extend_from_slice(&body);
            let response = format!(
                "HTTP/1.1 200 OK\r\nx-backend: {name}\r\ncontent-length: {}\r\n\r\n",
                reply.len()
            );
            // One write: two small ones would meet Nagle's algorithm and a delayed ACK.
            let mut whole = response.into_bytes();
            whole.extend_from_slice(&reply);
            if stream.write_all(&whole).await.is_err() || stream.flush().await.is_err() {
                return;
            }
        }
    }
}

/// Reads into `buf` until `pattern` appears; its offset, or `None` at EOF.
pub async fn read_until<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    pattern: &[u8],
) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(pattern.len()).position(|w| w == pattern) {
            return Some(i);
        }
        if !fill(stream, buf).await {
            return None;
        }
    }
}

pub async fn fill<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 8192];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// A parsed response, as a test client sees it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The trailer fields of a chunked body.
    pub trailers: Vec<(String, String)>,
}

impl Reply {
    /// The first header called `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A keep-alive HTTP/1.1 test client on one connection, independent of the proxy's parser.
pub struct HttpClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl HttpClient {
    /// A client on a stream already connected.
    pub fn from_stream(stream: TcpStream) -> HttpClient {
        HttpClient {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn connect(addr: SocketAddr) -> HttpClient {
        HttpClient {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    /// Sends raw bytes.
    pub async fn send(&mut self, raw: &[u8]) {
        self.stream.write_all(raw).await.expect("send");
    }

    /// Sends raw bytes and reads only the response head, lower-cased, without its blank line;
    /// what came after it stays in the client's buffer.
    pub async fn head_of(&mut self, raw: &[u8]) -> String {
        self.send(raw).await;
        let end = tokio::time::timeout(
            PATIENCE,
            read_until(&mut self.stream, &mut self.buf, b"\r\n\r\n"),
        )
        .await
        .expect("a head in time")
        .expect("a head");
        let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
        self.buf.drain(..end + 4);
        head
    }

    /// Sends a GET with `extra` header lines (each ending in \r\n) and reads the reply.
    pub async fn get(&mut self, path: &str, extra: &str) -> Reply {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n").as_bytes())
            .await;
        self.reply().await.expect("a reply")
    }

    /// Reads one response (Content-Length, chunked, or until close). `None` if the connection
    /// closed before a status line.
    pub async fn reply(&mut self) -> Option<Reply> {
        tokio::time::timeout(PATIENCE, self.reply_inner())
            .await
            .expect("reply in time")
    }

    async fn reply_inner(&mut self) -> Option<Reply> {
        read_reply(&mut self.stream, &mut self.buf).await
    }

    /// Whether the proxy closed the connection (reads EOF or an error).
    pub async fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(PATIENCE, self.stream.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }
}

/// Reads one response from `stream` (Content-Length, chunked, or until close); `buf` keeps
/// what was read past it.
pub async fn read_reply<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> Option<Reply> {
    let head_end = read_until(stream, buf, b"\r\n\r\n").await?;
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut reply = Reply {
        status,
        headers,
        body: Vec::new(),
        trailers: Vec::new(),
    };
    if let Some(length) = reply.header("content-length") {
        let length: usize = length.parse().ok()?;
        while buf.len() < length {
            if !fill(stream, buf).await {
                return None;
            }
        }
        reply.body = buf.drain(..length).collect();
    } else if reply.header("transfer-encoding").is_some() {
        loop {
            let line_end = read_until(stream, buf, b"\r\n").await?;
            let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
            buf.drain(..line_end + 2);
            let size = usize::from_str_radix(size_text.trim(), 16).ok()?;
            if size == 0 {
                // Trailer fields, up to an empty line.
                loop {
                    let end = read_until(stream, buf, b"\r\n").await?;
                    let line = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 2);
                    match line.split_once(':') {
                        Some((n, v)) => reply
                            .trailers
                            .push((n.trim().to_owned(), v.trim().to_owned())),
                        None => break,
                    }
                }
                break;
            }
            while buf.len() < size + 2 {
                if !fill(stream, buf).await {
                    return None;
                }
            }
            reply.body.extend(buf.drain(..size));
            buf.drain(..2);
        }
    } else if !(status == 204 || status == 304 || (100..200).contains(&status)) {
        while fill(stream, buf).await {}
        reply.body = std::mem::take(buf);
    }
    Some(reply)
}

/// The config of one http listener `l7` whose default pool `p` has `backends`, with
/// `listener_extra` and `pool_extra` added to their tables.
pub fn single_pool(backends: &[SocketAddr], listener_extra: &str, pool_extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"
[[listeners]]
name = "l7"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "p"
{listener_extra}

[pools.p]
backends = [{}]
{pool_extra}
"#,
        list.join(", ")
    )
}

/// An HTTP/2 connection with prior knowledge to `addr`, driven by a task of its own.
pub async fn h2_connect(addr: SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(connection);
    sender
}

/// A directory of its own in the temp directory for test `name` (created if missing): tests of
/// one binary run in one process, so the process id alone would not keep their files apart.
pub fn temp_dir_for(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("switchyard-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A log file path of its own for test `name`, with no file there yet: a line left by an
/// earlier run must not be counted as this run's.
pub fn fresh_log(name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("switchyard-{name}-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// The `access_log` key of a listener writing JSON lines to `path`, the format tests read back.
pub fn json_access_log(path: &Path) -> String {
    format!(
        "access_log = {{ path = \"{}\", format = \"json\" }}",
        path.display()
    )
}

/// What the log at `path` holds so far; empty before the proxy first writes to it.
pub fn log_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until the JSON log at `path` holds `count` lines, then parses them: lines are written
/// off the request path, after the client has its answer.
pub async fn json_lines(path: &Path, count: usize) -> Vec<serde_json::Value> {
    eventually(&format!("{count} log lines"), || {
        log_text(path).lines().count() == count
    })
    .await;
    log_text(path)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect()
}

/// Measures the longest stall of the runtime it runs on, for checks that some heavy work is
/// kept off the threads that serve traffic: a task that wakes every 2 ms and notes the longest
/// gap between two wakes.
pub struct StallTicker {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<Duration>,
}

impl StallTicker {
    /// Starts ticking on the current runtime.
    pub fn start() -> StallTicker {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = Arc::clone(&stop);
            async move {
                let mut longest = Duration::ZERO;
                let mut last = std::time::Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    longest = longest.max(last.elapsed());
                    last = std::time::Instant::now();
                }
                longest
            }
        });
        StallTicker { stop, task }
    }

    /// Stops ticking and returns the longest stall seen.
    pub async fn stop(self) -> Duration {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("ticker")
    }
}

/// The head of a plain `200` answer, which most HTTP/2 test backends send.
pub fn h2_ok() -> http::Response<()> {
    http::Response::builder()
        .status(200)
        .body(())
        .expect("response")
}

/// An HTTP/2 backend (h2c, prior knowledge) that runs `handler` on each stream in a task of its
/// own, so that a stream held open never holds up the connection's others.
pub async fn h2_backend_with<F, Fut>(handler: F) -> Backend
where
    F: Fn(http::Request<h2::RecvStream>, h2::server::SendResponse<bytes::Bytes>) -> Fut
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let handler = Arc::new(handler);
    Backend::start(move |stream| {
        let handler = Arc::clone(&handler);
        async move {
            let Ok(mut connection) = h2::server::handshake(stream).await else {
                return;
            };
            while let Some(Ok((request, respond))) = connection.accept().await {
                tokio::spawn(handler(request, respond));
            }
        }
    })
    .await
}

/// An HTTP/1.1 backend that answers each request as soon as its head is read, with a 413 and
/// the body `too big!`, and closes with the body unread, so that the proxy's next writes fail:
/// an early answer to an upload.
pub async fn early_413_backend() -> Backend {
    Backend::start(|mut stream| async move {
        let mut buf = Vec::new();
        if read_until(&mut stream, &mut buf, b"\r\n\r\n")
            .await
            .is_none()
        {
            return;
        }
        let _ = stream
            .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\n\r\ntoo big!")
            .await;
    })
    .await
}

/// An HTTP/1.1 backend that answers the first request of each connection with a 64 MiB body,
/// and a flag it sets once that write ends, which it does (with an error) only when the proxy
/// lets go of the connection: for clients that stop reading.
pub async fn huge_answer_backend() -> (Backend, Arc<std::sync::atomic::AtomicBool>) {
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&finished);
    let backend = Backend::start(move |mut stream| {
        let flag = Arc::clone(&flag);
        async move {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let body = vec![b'x'; 64 * 1024 * 1024];
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&body).await;
            flag.store(true, Ordering::SeqCst);
        }
    })
    .await;
    (backend, finished)
}

/// Sends a large upload (16 MiB) to `path` from an HTTP/1.1 client and returns what came back
/// before the proxy closed, or once `until` arrived: for answers given before the body is read,
/// which must reach a client still busy sending.
pub async fn http11_upload_answer(proxy: std::net::SocketAddr, path: &str, until: &str) -> String {
    let stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let size = 16 << 20;
    let head = format!("PUT {path} HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\n\r\n");
    let upload = tokio::spawn(async move {
        if writer.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = vec![b'u'; 64 << 10];
        for _ in 0..size / chunk.len() {
            if writer.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(until.as_bytes()) {
        match tokio::time::timeout(PATIENCE, reader.read(&mut buf))
            .await
            .expect("an answer in time")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    upload.abort();
    String::from_utf8_lossy(&got).into_owned()
}

/// The config of one tcp listener `l4` forwarding to pool `p`, whose table is `pool` (its
/// `backends` line and any more keys), with `listener_extra` added to the listener's table.
pub fn tcp_config(pool: &str, listener_extra: &str) -> String {
    format!(
        r#"
[[listeners]]
name = "l4"
bind = "127.0.0.1:0"
protocol = "tcp"
pool = "p"
{listener_extra}

[pools.p]
{pool}
"#
    )
}

/// [`tcp_config`] for a pool of `backends` with `pool_extra` added to its table: the layer 4
/// counterpart of [`single_pool`].
pub fn single_tcp_pool(backends: &[SocketAddr], listener_extra: &str, pool_extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    tcp_config(
        &format!("backends = [{}]\n{pool_extra}", list.join(", ")),
        listener_extra,
    )
}
