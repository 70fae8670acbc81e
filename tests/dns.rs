//! Backends discovered through the DNS: a pool whose backend is a host name with
//! `resolve = true` follows what a (test) DNS server answers for it, without a reload.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard::server::ServerHandle;
use switchyard::{Config, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// How long a condition may take to hold: a few refresh intervals of one second.
const PATIENCE: Duration = Duration::from_secs(15);

/// Waits until `condition` holds, checking every few milliseconds, up to [`PATIENCE`].
async fn eventually<F, Fut>(what: &str, mut condition: F)
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A query a [`DnsServer`] holds, and who sent it.
type Held = (Vec<u8>, SocketAddr);

/// What a [`DnsServer`] with a zone answers for one name of it.
#[derive(Clone)]
enum Rule {
    /// These A records, and no AAAA record.
    Addrs(Vec<Ipv4Addr>),
    /// SERVFAIL.
    Fail,
}

/// The names a [`DnsServer`] knows, when it knows some and not every name.
type Zone = Arc<Mutex<Option<HashMap<String, Rule>>>>;

/// A DNS server on 127.0.0.1:0 that answers A queries for any name with the addresses the
/// test sets, AAAA queries with none, and stays silent while `silent` is set. Once given a
/// zone, it answers only for the names of it, and NXDOMAIN for any other.
struct DnsServer {
    addr: SocketAddr,
    answers: Arc<Mutex<Vec<Ipv4Addr>>>,
    zone: Zone,
    /// The names of the A queries received so far, in order.
    asked: Arc<Mutex<Vec<String>>>,
    silent: Arc<AtomicBool>,
    /// While set, queries wait here, with whom to answer, until [`DnsServer::release`].
    held: Arc<Mutex<Option<Vec<Held>>>>,
    /// Queries received so far.
    queries: Arc<AtomicUsize>,
    socket: Arc<UdpSocket>,
    task: JoinHandle<()>,
}

impl DnsServer {
    async fn start(answers: &[Ipv4Addr]) -> DnsServer {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = socket.local_addr().unwrap();
        let shared = Arc::new(Mutex::new(answers.to_vec()));
        let silent = Arc::new(AtomicBool::new(false));
        let held: Arc<Mutex<Option<Vec<Held>>>> = Arc::new(Mutex::new(None));
        let queries = Arc::new(AtomicUsize::new(0));
        let zone: Zone = Arc::new(Mutex::new(None));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let queries = Arc::clone(&queries);
            let zone = Arc::clone(&zone);
            let asked = Arc::clone(&asked);
            let answers = Arc::clone(&shared);
            let silent = Arc::clone(&silent);
            let held = Arc::clone(&held);
            let socket = Arc::clone(&socket);
            async move {
                let mut buf = [0u8; 512];
                loop {
                    let Ok((len, from)) = socket.recv_from(&mut buf).await else {
                        return;
                    };
                    queries.fetch_add(1, Ordering::SeqCst);
                    if let Some((name, 1)) = question(&buf[..len]) {
                        asked.lock().unwrap().push(name);
                    }
                    if silent.load(Ordering::SeqCst) {
                        continue;
                    }
                    if let Some(queue) = held.lock().unwrap().as_mut() {
                        queue.push((buf[..len].to_vec(), from));
                        continue;
                    }
                    let reply = respond(&buf[..len], &answers, &zone);
                    if let Some(reply) = reply {
                        let _ = socket.send_to(&reply, from).await;
                    }
                }
            }
        });
        DnsServer {
            addr,
            answers: shared,
            zone,
            asked,
            silent,
            held,
            queries,
            socket,
            task,
        }
    }

    fn set(&self, answers: &[Ipv4Addr]) {
        *self.answers.lock().unwrap() = answers.to_vec();
    }

    /// Answers from now on for the names of `zone` only, NXDOMAIN for any other.
    fn set_zone(&self, zone: &[(&str, Rule)]) {
        let zone = zone
            .iter()
            .map(|(name, rule)| ((*name).to_owned(), rule.clone()))
            .collect();
        *self.zone.lock().unwrap() = Some(zone);
    }

    /// The names of the A queries received so far, in order.
    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }

    /// Keeps the queries from now on unanswered, until [`DnsServer::release`].
    fn hold(&self) {
        *self.held.lock().unwrap() = Some(Vec::new());
    }

    fn held(&self) -> usize {
        self.held.lock().unwrap().as_ref().map_or(0, Vec::len)
    }

    /// Answers the queries held, with the addresses set now, and those that come after.
    async fn release(&self) {
        let queued = self.held.lock().unwrap().take().unwrap_or_default();
        for (query, from) in queued {
            if let Some(reply) = respond(&query, &self.answers, &self.zone) {
                let _ = self.socket.send_to(&reply, from).await;
            }
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The name `query` asks about (dotted, without the root's dot) and its type.
fn question(query: &[u8]) -> Option<(String, u16)> {
    let mut labels = Vec::new();
    let mut at = 12;
    while *query.get(at)? != 0 {
        let len = usize::from(query[at]);
        labels.push(String::from_utf8_lossy(query.get(at + 1..at + 1 + len)?).into_owned());
        at += 1 + len;
    }
    let qtype = u16::from_be_bytes([*query.get(at + 1)?, *query.get(at + 2)?]);
    Some((labels.join("."), qtype))
}

/// The reply to `query` from the addresses set for every name, or from the zone once set.
fn respond(query: &[u8], answers: &Mutex<Vec<Ipv4Addr>>, zone: &Zone) -> Option<Vec<u8>> {
    let Some(zone) = zone.lock().unwrap().clone() else {
        return answer(query, &answers.lock().unwrap(), 0);
    };
    let (name, _) = question(query)?;
    match zone.get(&name) {
        Some(Rule::Addrs(addrs)) => answer(query, addrs, 0),
        Some(Rule::Fail) => answer(query, &[], 2),
        None => answer(query, &[], 3),
    }
}

/// The reply to `query` with `rcode`: its header and question back, with one A record per
/// address (through a pointer to the question's name) when it asks for A records.
fn answer(query: &[u8], addrs: &[Ipv4Addr], rcode: u8) -> Option<Vec<u8>> {
    let mut end = 12;
    while *query.get(end)? != 0 {
        end += 1 + usize::from(query[end]);
    }
    let question_end = end + 5;
    let qtype = u16::from_be_bytes([*query.get(end + 1)?, *query.get(end + 2)?]);
    let mut reply = query.get(..question_end)?.to_vec();
    reply[2] |= 0x80; // a response
    reply[3] = 0x80 | rcode; // recursion available
    let records: &[Ipv4Addr] = if qtype == 1 { addrs } else { &[] };
    reply[6..8].copy_from_slice(&(records.len() as u16).to_be_bytes());
    reply[8..12].fill(0);
    for ip in records {
        reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4]);
        reply.extend_from_slice(&ip.octets());
    }
    Some(reply)
}

/// A TCP backend on `ip`:`port` that counts its connections, writes its name first, then
/// echoes.
struct TcpBackend {
    port: u16,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl TcpBackend {
    async fn start(ip: Ipv4Addr, port: u16, name: &'static str, http: bool) -> Option<TcpBackend> {
        let listener = TcpListener::bind((ip, port)).await.ok()?;
        let port = listener.local_addr().ok()?.port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(if http {
                    Box::pin(serve_http(stream, name))
                        as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
                } else {
                    Box::pin(serve_echo(stream, name))
                });
            }
        });
        Some(TcpBackend {
            port,
            accepted,
            task,
        })
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_echo(mut stream: TcpStream, name: &str) {
    if stream
        .write_all(format!("{name}\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let mut buf = [0u8; 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Answers every request head with `200` and the backend's name as the body.
async fn serve_http(mut stream: TcpStream, name: &str) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{name}",
                name.len()
            );
            if stream.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Backends on 127.0.0.1, 127.0.0.2, … that share one port, as the addresses of one name do.
async fn backends(names: &[&'static str], http: bool) -> (u16, Vec<TcpBackend>) {
    for _ in 0..20 {
        let Some(first) = TcpBackend::start(Ipv4Addr::new(127, 0, 0, 1), 0, names[0], http).await
        else {
            continue;
        };
        let port = first.port;
        let mut all = vec![first];
        for (i, name) in names.iter().enumerate().skip(1) {
            let ip = Ipv4Addr::new(127, 0, 0, 1 + i as u8);
            match TcpBackend::start(ip, port, name, http).await {
                Some(backend) => all.push(backend),
                None => break,
            }
        }
        if all.len() == names.len() {
            return (port, all);
        }
    }
    panic!("no port free on every loopback address");
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// Loads `toml` (its names looked up, off the runtime's threads) and runs it.
async fn start(toml: String) -> (ServerHandle, tokio_util::sync::CancellationToken) {
    let config = tokio::task::spawn_blocking(move || {
        Config::from_toml(&toml, Path::new("dns.toml")).expect("test config is valid")
    })
    .await
    .unwrap();
    let server = Server::bind(config).expect("binds");
    let handle = server.handle();
    let shutdown = server.shutdown_token();
    tokio::spawn(server.run());
    (handle, shutdown)
}

fn config(protocol: &str, dns: SocketAddr, port: u16, pool_extra: &str) -> String {
    format!(
        r#"
[global]
resolvers = ["{dns}"]
resolve_interval = "1s"
search = []

[[listeners]]
name = "front"
bind = "127.0.0.1:0"
protocol = "{protocol}"
{pool}

[pools.app]
backends = [{{ address = "app.test:{port}", resolve = true }}]
{pool_extra}
"#,
        pool = if protocol == "http" {
            "default_pool = \"app\""
        } else {
            "pool = \"app\""
        }
    )
}

/// The first line a tcp backend writes through the proxy: its name.
async fn tcp_name(front: SocketAddr) -> (String, TcpStream) {
    let mut stream = TcpStream::connect(front).await.unwrap();
    let mut name = Vec::new();
    let mut byte = [0u8; 1];
    while name.len() < 16 {
        match stream.read(&mut byte).await {
            Ok(1) if byte[0] != b'\n' => name.push(byte[0]),
            _ => break,
        }
    }
    (String::from_utf8_lossy(&name).into_owned(), stream)
}

/// The body of one GET through the proxy: the name of the backend that answered.
async fn http_name(front: SocketAddr) -> String {
    let mut stream = TcpStream::connect(front).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply).into_owned();
    reply
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// The names of the backends that answered `n` requests.
async fn http_names(front: SocketAddr, n: usize) -> std::collections::BTreeSet<String> {
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..n {
        seen.insert(http_name(front).await);
    }
    seen
}

fn set(names: &[&str]) -> std::collections::BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_traffic_follows_the_addresses_a_name_resolves_to() {
    let (port, b) = backends(&["a", "b", "c"], false).await;
    let dns = DnsServer::start(&[ip(1), ip(2)]).await;
    let (handle, shutdown) = start(config("tcp", dns.addr, port, "")).await;
    let front = handle.local_addr("front").unwrap();

    // Both addresses are backends: round robin takes turns.
    let mut seen = std::collections::BTreeSet::new();
    let mut held = None;
    for _ in 0..4 {
        let (name, stream) = tcp_name(front).await;
        if name == "b" {
            held = Some(stream);
        }
        seen.insert(name);
    }
    assert_eq!(seen, set(&["a", "b"]));
    let mut held = held.expect("a connection to b");

    // The name moves from b to c: c takes new connections, b none, without a reload.
    dns.set(&[ip(1), ip(3)]);
    eventually("a connection reaches c", || async {
        tcp_name(front).await.0 == "c"
    })
    .await;
    let b_before = b[1].accepted();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        seen.insert(tcp_name(front).await.0);
    }
    assert_eq!(seen, set(&["a", "c"]));
    assert_eq!(b[1].accepted(), b_before, "b got a new connection");

    // The connection open to b when it left the pool goes on.
    held.write_all(b"still here").await.unwrap();
    let mut echo = [0u8; 10];
    tokio::time::timeout(PATIENCE, held.read_exact(&mut echo))
        .await
        .expect("b still echoes")
        .unwrap();
    assert_eq!(&echo, b"still here");

    let [_, changed, _] = handle.resolutions();
    assert!(changed >= 1);
    let metrics = switchyard::metrics::render(&handle);
    assert!(
        metrics.contains("switchyard_dns_resolutions_total{result=\"changed\"}"),
        "{metrics}"
    );
    assert_eq!(b[0].port, port);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_traffic_follows_the_name_and_keeps_it_while_the_resolver_is_silent() {
    let (port, _b) = backends(&["a", "b", "c"], true).await;
    let dns = DnsServer::start(&[ip(1), ip(2)]).await;
    let (handle, shutdown) = start(config(
        "http",
        dns.addr,
        port,
        r#"health = { kind = "tcp", interval = "1s", timeout = "1s" }"#,
    ))
    .await;
    let front = handle.local_addr("front").unwrap();
    assert_eq!(http_names(front, 6).await, set(&["a", "b"]));

    dns.set(&[ip(1), ip(3)]);
    eventually("a request reaches c", || async {
        http_name(front).await == "c"
    })
    .await;
    assert_eq!(http_names(front, 6).await, set(&["a", "c"]));

    // The new address is health-checked, the one that left is not.
    let c = format!("backend=\"{}\"", SocketAddr::from((ip(3), port)));
    let b = format!("backend=\"{}\"", SocketAddr::from((ip(2), port)));
    eventually("c is probed", || {
        let metrics = switchyard::metrics::render(&handle);
        let probed = metrics
            .lines()
            .any(|l| l.starts_with("switchyard_backend_health_checks_total") && l.contains(&c));
        async move { probed }
    })
    .await;
    let metrics = switchyard::metrics::render(&handle);
    assert!(!metrics.contains(&b), "{metrics}");

    // The resolver stops answering: the pool keeps the addresses it had.
    dns.silent.store(true, Ordering::SeqCst);
    let [_, _, failed] = handle.resolutions();
    eventually("a lookup fails", || {
        let now = handle.resolutions()[2];
        async move { now > failed }
    })
    .await;
    assert_eq!(http_names(front, 6).await, set(&["a", "c"]));
    let addrs: Vec<IpAddr> = handle.config().pools["app"]
        .backends
        .iter()
        .map(|b| b.addr.ip())
        .collect();
    assert_eq!(addrs, [IpAddr::from(ip(1)), IpAddr::from(ip(3))]);

    // It answers again, with b back.
    dns.silent.store(false, Ordering::SeqCst);
    dns.set(&[ip(1), ip(2), ip(3)]);
    eventually("a request reaches b again", || async {
        http_name(front).await == "b"
    })
    .await;
    shutdown.cancel();
}

fn load(toml: &str) -> Result<Config, String> {
    Config::from_toml(toml, Path::new("dns.toml")).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_what_is_wrong_with_resolved_backends() {
    let dns = DnsServer::start(&[]).await;
    let addr = dns.addr;
    let errors = tokio::task::spawn_blocking(move || {
        let on_ip = load(&format!(
            "[global]\nresolvers = [\"{addr}\"]\n[[listeners]]\nname = \"f\"\nbind = \"127.0.0.1:0\"\n\
             protocol = \"tcp\"\npool = \"p\"\n[pools.p]\n\
             backends = [{{ address = \"127.0.0.1:80\", resolve = true }}]\n"
        ))
        .unwrap_err();
        let too_often = load(&format!(
            "[global]\nresolvers = [\"{addr}\"]\nresolve_interval = \"500ms\"\n[[listeners]]\n\
             name = \"f\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"p\"\n[pools.p]\n\
             backends = [\"127.0.0.1:80\"]\n"
        ))
        .unwrap_err();
        let nothing = load(&format!(
            "[global]\nresolvers = [\"{addr}\"]\n[[listeners]]\nname = \"f\"\nbind = \"127.0.0.1:0\"\n\
             protocol = \"tcp\"\npool = \"p\"\n[pools.p]\n\
             backends = [{{ address = \"app.test:80\", resolve = true }}]\n"
        ))
        .unwrap_err();
        (on_ip, too_often, nothing)
    })
    .await
    .unwrap();
    assert!(
        errors
            .0
            .contains("pools.p.backends[0].resolve: applies only to a host name"),
        "{}",
        errors.0
    );
    assert!(
        errors
            .1
            .contains("global.resolve_interval: must be at least"),
        "{}",
        errors.1
    );
    assert!(
        errors
            .2
            .contains("pools.p.backends[0]: cannot resolve `app.test`"),
        "{}",
        errors.2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_follows_the_names_with_the_new_files_resolvers() {
    let (port, _b) = backends(&["a", "b", "c"], true).await;
    let first = DnsServer::start(&[ip(1)]).await;
    let second = DnsServer::start(&[ip(2)]).await;
    let path = std::env::temp_dir().join(format!(
        "switchyard-dns-test-{}-reload.toml",
        std::process::id()
    ));
    std::fs::write(&path, config("http", first.addr, port, "")).unwrap();
    let loaded = path.clone();
    let loaded = tokio::task::spawn_blocking(move || Config::load(&loaded).unwrap())
        .await
        .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = Server::bind_from(loaded, Some(path.clone()), shutdown.clone()).unwrap();
    let handle = server.handle();
    tokio::spawn(server.run());
    let front = handle.local_addr("front").unwrap();
    assert_eq!(http_names(front, 4).await, set(&["a"]));

    // The file now names the second resolver: its answer is in force after the reload, and
    // it is the one asked from then on.
    std::fs::write(&path, config("http", second.addr, port, "")).unwrap();
    handle.reload_file().await.unwrap();
    assert_eq!(http_names(front, 4).await, set(&["b"]));
    second.set(&[ip(3)]);
    eventually("a request reaches c", || async {
        http_name(front).await == "c"
    })
    .await;
    assert_eq!(http_names(front, 4).await, set(&["c"]));
    shutdown.cancel();
    let _ = std::fs::remove_file(&path);
}

/// One request to the admin API; the whole answer, head and body.
async fn admin(addr: SocketAddr, method: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut reply)).await;
    String::from_utf8_lossy(&reply).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_sees_the_addresses_and_its_drain_outlasts_a_change_of_them() {
    let (port, _b) = backends(&["a", "b", "c"], true).await;
    let dns = DnsServer::start(&[ip(1), ip(2)]).await;
    let (handle, shutdown) = start(config(
        "http",
        dns.addr,
        port,
        "\n[admin]\nbind = \"127.0.0.1:0\"",
    ))
    .await;
    let front = handle.local_addr("front").unwrap();
    let api = handle.admin_addr().unwrap();
    let a = SocketAddr::from((ip(1), port));
    let drained = admin(api, "POST", &format!("/api/pools/app/backends/{a}/drain")).await;
    assert!(drained.starts_with("HTTP/1.1 200"), "{drained}");
    assert_eq!(http_names(front, 4).await, set(&["b"]));

    dns.set(&[ip(1), ip(3)]);
    eventually("a request reaches c", || async {
        http_name(front).await == "c"
    })
    .await;
    // a stayed in the pool, drained as the API asked; b left it.
    assert_eq!(http_names(front, 4).await, set(&["c"]));
    let state = admin(api, "GET", "/api/state").await;
    assert!(state.contains(&format!("\"{a}\"")), "{state}");
    assert!(
        state.contains(&format!("\"{}\"", SocketAddr::from((ip(3), port)))),
        "{state}"
    );
    assert!(
        !state.contains(&format!("\"{}\"", SocketAddr::from((ip(2), port)))),
        "{state}"
    );
    shutdown.cancel();
}

/// Every lookup of `handle`'s names so far, whatever its result.
fn lookups(handle: &ServerHandle) -> u64 {
    handle.resolutions().iter().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolver_that_does_not_answer_costs_one_timeout_not_one_for_each_name() {
    let (port, _b) = backends(&["a"], false).await;
    let dns = DnsServer::start(&[ip(1)]).await;
    // Asked first, and never answers: each name waits out its timeout (2 s) on it.
    let dead = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dead = dead.local_addr().unwrap();
    let names: Vec<String> = (0..6)
        .map(|i| format!("{{ address = \"n{i}.test:{port}\", resolve = true }}"))
        .collect();
    let toml = format!(
        r#"
[global]
resolvers = ["{dead}", "{}"]
resolve_interval = "1s"

[[listeners]]
name = "front"
bind = "127.0.0.1:0"
protocol = "tcp"
pool = "app"

[pools.app]
backends = [{}]
"#,
        dns.addr,
        names.join(", ")
    );
    // Six names one after another would take 12 s; together, one timeout.
    let started = std::time::Instant::now();
    let (handle, shutdown) = start(toml).await;
    let loading = started.elapsed();
    assert!(loading < Duration::from_secs(6), "loading took {loading:?}");
    assert_eq!(tcp_name(handle.local_addr("front").unwrap()).await.0, "a");

    // A round of lookups too: from the end of one to the end of the next is the interval
    // and one timeout, not six.
    let before = lookups(&handle);
    eventually("a round ends", || {
        let now = lookups(&handle);
        async move { now > before }
    })
    .await;
    let round_ended = std::time::Instant::now();
    let before = lookups(&handle);
    eventually("another round ends", || {
        let now = lookups(&handle);
        async move { now > before }
    })
    .await;
    let round = round_ended.elapsed();
    assert!(round < Duration::from_secs(6), "a round took {round:?}");
    assert_eq!(
        lookups(&handle) % 6,
        0,
        "every name is looked up each round"
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_in_another_order_or_with_repeats_leave_the_pool_as_it_is() {
    let (port, _b) = backends(&["a", "b"], false).await;
    let dns = DnsServer::start(&[ip(1), ip(2)]).await;
    let (handle, shutdown) = start(config("tcp", dns.addr, port, "")).await;
    let config = handle.config();

    // The same two addresses, the other way round and one of them twice.
    dns.set(&[ip(2), ip(1), ip(2)]);
    let before = lookups(&handle);
    eventually("two rounds of lookups", || {
        let now = lookups(&handle);
        async move { now >= before + 2 }
    })
    .await;
    let [same, changed, failed] = handle.resolutions();
    assert_eq!((changed, failed), (0, 0));
    assert!(same >= 2);
    assert!(
        std::sync::Arc::ptr_eq(&config, &handle.config()),
        "the pool was rebuilt"
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_a_reload_overtook_are_not_put_in_force_after_it() {
    let (port, _b) = backends(&["a", "b", "c"], false).await;
    let first = DnsServer::start(&[ip(1)]).await;
    let second = DnsServer::start(&[ip(2)]).await;
    let path = std::env::temp_dir().join(format!(
        "switchyard-dns-test-{}-overtaken.toml",
        std::process::id()
    ));
    std::fs::write(&path, config("tcp", first.addr, port, "")).unwrap();
    let loaded = path.clone();
    let loaded = tokio::task::spawn_blocking(move || Config::load(&loaded).unwrap())
        .await
        .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = Server::bind_from(loaded, Some(path.clone()), shutdown.clone()).unwrap();
    let handle = server.handle();
    tokio::spawn(server.run());
    let front = handle.local_addr("front").unwrap();
    assert_eq!(tcp_name(front).await.0, "a");

    // A lookup of the first resolver is in flight, and will come back with c...
    first.set(&[ip(3)]);
    first.hold();
    eventually("a lookup waits on the first resolver", || {
        let held = first.held();
        async move { held >= 2 }
    })
    .await;
    // ...when a reload has put the second resolver, and its answer b, in force.
    std::fs::write(&path, config("tcp", second.addr, port, "")).unwrap();
    handle.reload_file().await.unwrap();
    let [same, changed, _] = handle.resolutions();
    first.release().await;

    // The overtaken answer is counted, and then a round with the second resolver ends: it
    // finds b's address in force, as it never left, rather than c's.
    eventually("the overtaken answer comes back", || {
        let now = handle.resolutions()[1];
        async move { now > changed }
    })
    .await;
    eventually("a round with the second resolver ends", || {
        let now = handle.resolutions()[0];
        async move { now > same }
    })
    .await;
    assert_eq!(
        handle.resolutions()[1],
        changed + 1,
        "the pool changed for the overtaken answer, and back"
    );
    let addrs: Vec<SocketAddr> = handle.config().pools["app"]
        .backends
        .iter()
        .map(|b| b.addr)
        .collect();
    assert_eq!(addrs, [SocketAddr::from((ip(2), port))]);
    for _ in 0..3 {
        assert_eq!(tcp_name(front).await.0, "b");
    }
    shutdown.cancel();
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_written_twice_is_asked_once_a_round() {
    let (port, _a) = backends(&["a"], false).await;
    let (other, _b) = backends(&["b"], false).await;
    let dns = DnsServer::start(&[ip(1)]).await;
    let toml = config("tcp", dns.addr, port, "").replace(
        "resolve = true }]",
        &format!("resolve = true }}, {{ address = \"app.test:{other}\", resolve = true }}]"),
    );
    let (handle, shutdown) = start(toml).await;
    assert_eq!(handle.config().pools["app"].backends.len(), 2);
    assert_eq!(
        dns.queries.load(Ordering::SeqCst),
        2,
        "the load asks for A and AAAA once"
    );

    // From the end of one round to the end of the next: one A and one AAAA query.
    let before = lookups(&handle);
    eventually("a round ends", || {
        let now = lookups(&handle);
        async move { now > before }
    })
    .await;
    let queries = dns.queries.load(Ordering::SeqCst);
    let before = lookups(&handle);
    eventually("another round ends", || {
        let now = lookups(&handle);
        async move { now > before }
    })
    .await;
    assert_eq!(dns.queries.load(Ordering::SeqCst) - queries, 2);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_no_backend_can_have_are_passed_over() {
    let (port, _b) = backends(&["a", "b"], false).await;
    let unusable = [
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::new(224, 0, 0, 1),
        Ipv4Addr::BROADCAST,
    ];
    let dns = DnsServer::start(&[&unusable[..], &[ip(1)]].concat()).await;
    let (handle, shutdown) = start(config("tcp", dns.addr, port, "")).await;
    let addrs = |handle: &ServerHandle| -> Vec<SocketAddr> {
        handle.config().pools["app"]
            .backends
            .iter()
            .map(|b| b.addr)
            .collect()
    };
    assert_eq!(addrs(&handle), [SocketAddr::from((ip(1), port))]);

    // Later answers too; and one with nothing else keeps the last usable addresses.
    dns.set(&[&unusable[..], &[ip(2)]].concat());
    eventually("the name moves to b", || {
        let now = addrs(&handle);
        async move { now == [SocketAddr::from((ip(2), port))] }
    })
    .await;
    let [_, _, failed] = handle.resolutions();
    dns.set(&unusable);
    eventually("a lookup finds nothing usable", || {
        let now = handle.resolutions()[2];
        async move { now > failed }
    })
    .await;
    assert_eq!(addrs(&handle), [SocketAddr::from((ip(2), port))]);
    for _ in 0..3 {
        assert_eq!(tcp_name(handle.local_addr("front").unwrap()).await.0, "b");
    }
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_shorter_than_the_interval_brings_the_next_lookup_forward() {
    let (port, _b) = backends(&["a", "b"], false).await;
    // The test server's records live for one second; the file asks every minute.
    let dns = DnsServer::start(&[ip(1)]).await;
    let toml = config("tcp", dns.addr, port, "")
        .replace("resolve_interval = \"1s\"", "resolve_interval = \"60s\"");
    let (handle, shutdown) = start(toml).await;
    let front = handle.local_addr("front").unwrap();
    assert_eq!(tcp_name(front).await.0, "a");
    dns.set(&[ip(2)]);
    eventually("a connection reaches b", || async {
        tcp_name(front).await.0 == "b"
    })
    .await;
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_the_resolvers_say_has_no_address_leaves_the_pool_after_the_hold() {
    let (port, _b) = backends(&["a", "b"], true).await;
    let dns = DnsServer::start(&[ip(1)]).await;
    let toml = config("http", dns.addr, port, "").replace(
        "resolve_interval = \"1s\"",
        "resolve_interval = \"1s\"\nresolve_hold = \"3s\"",
    );
    let (handle, shutdown) = start(toml).await;
    let front = handle.local_addr("front").unwrap();
    assert_eq!(http_names(front, 2).await, set(&["a"]));
    let backends = |handle: &ServerHandle| handle.config().pools["app"].backends.len();

    // The name is gone from the DNS (an answer without records): its address stays for the
    // hold, then leaves, and the pool has no backend to offer.
    let [_, _, failed] = handle.resolutions();
    dns.set(&[]);
    eventually("a lookup finds no address", || {
        let now = handle.resolutions()[2];
        async move { now > failed }
    })
    .await;
    assert_eq!(
        backends(&handle),
        1,
        "the address left before the hold ended"
    );
    eventually("the address leaves", || {
        let now = backends(&handle);
        async move { now == 0 }
    })
    .await;
    let mut stream = TcpStream::connect(front).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");

    // It comes back with another address.
    dns.set(&[ip(2)]);
    eventually("a request reaches b", || async {
        http_name(front).await == "b"
    })
    .await;
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_hold_must_be_a_duration() {
    let dns = DnsServer::start(&[ip(1)]).await;
    let toml = config("tcp", dns.addr, 80, "")
        .replace("resolve_interval = \"1s\"", "resolve_hold = \"soon\"");
    let error = tokio::task::spawn_blocking(move || load(&toml).unwrap_err())
        .await
        .unwrap();
    assert!(error.contains("global.resolve_hold"), "{error}");
    let toml = config("tcp", dns.addr, 80, "")
        .replace("resolve_interval = \"1s\"", "resolve_hold = \"0s\"");
    let loaded = tokio::task::spawn_blocking(move || load(&toml))
        .await
        .unwrap();
    assert_eq!(
        loaded.unwrap().global.resolve_hold,
        Duration::ZERO,
        "0 drops a name's addresses at the first answer without any"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_name_that_does_not_resolve_is_said_to_need_writing_in_full() {
    let dns = DnsServer::start(&[]).await;
    let toml = config("tcp", dns.addr, 80, "").replace("app.test:80", "app:80");
    let error = tokio::task::spawn_blocking(move || load(&toml).unwrap_err())
        .await
        .unwrap();
    assert!(
        error.contains("pools.app.backends[0]: cannot resolve `app`")
            && error.contains("search domains"),
        "{error}"
    );
}

/// The file of [`config`] with `search` and `ndots` in `[global]`, and `name` as the host
/// name of the backend.
fn searched(protocol: &str, dns: SocketAddr, port: u16, name: &str, global: &str) -> String {
    config(protocol, dns, port, "")
        .replace("search = []", global)
        .replace("app.test:", &format!("{name}:"))
}

/// The addresses of pool `app`.
fn pool_addrs(handle: &ServerHandle) -> Vec<SocketAddr> {
    handle.config().pools["app"]
        .backends
        .iter()
        .map(|b| b.addr)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_name_resolves_through_the_search_list() {
    let (port, _b) = backends(&["a", "b"], false).await;
    let dns = DnsServer::start(&[]).await;
    dns.set_zone(&[("app.svc.test", Rule::Addrs(vec![ip(1)]))]);
    let toml = searched(
        "tcp",
        dns.addr,
        port,
        "app",
        "search = [\"other.test\", \"svc.test\"]\nndots = 1",
    );
    let (handle, shutdown) = start(toml).await;
    assert_eq!(tcp_name(handle.local_addr("front").unwrap()).await.0, "a");
    // Completed in the order of the list, and the name as written never asked: a domain
    // had it.
    assert_eq!(dns.asked(), ["app.other.test", "app.svc.test"]);
    let names = handle.config().pools["app"]
        .discovery
        .clone()
        .unwrap()
        .names;
    assert_eq!(
        (names[0].host.as_str(), names[0].answered.as_str()),
        ("app", "app.svc.test")
    );

    // Every round asks in the same order again.
    let before = lookups(&handle);
    eventually("a round ends", || {
        let now = lookups(&handle);
        async move { now > before }
    })
    .await;
    assert_eq!(
        dns.asked()[..4],
        [
            "app.other.test",
            "app.svc.test",
            "app.other.test",
            "app.svc.test"
        ]
    );
    assert_eq!(handle.resolutions()[2], 0, "no lookup failed");
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndots_decides_whether_a_name_is_asked_as_written_first() {
    let dns = DnsServer::start(&[]).await;
    let resolved = |ndots: u8| {
        let toml = searched(
            "tcp",
            dns.addr,
            80,
            "app.prod",
            &format!("search = [\"svc.test\"]\nndots = {ndots}"),
        );
        async move {
            let config = tokio::task::spawn_blocking(move || load(&toml))
                .await
                .unwrap()
                .unwrap();
            config.pools["app"]
                .backends
                .iter()
                .map(|b| b.addr.ip())
                .collect::<Vec<_>>()
        }
    };
    dns.set_zone(&[
        ("app.prod", Rule::Addrs(vec![ip(1)])),
        ("app.prod.svc.test", Rule::Addrs(vec![ip(2)])),
    ]);
    // One dot, ndots 1: as written first.
    assert_eq!(resolved(1).await, [IpAddr::from(ip(1))]);
    assert_eq!(dns.asked(), ["app.prod"]);
    // ndots 2: completed first.
    assert_eq!(resolved(2).await, [IpAddr::from(ip(2))]);
    assert_eq!(dns.asked()[1..], ["app.prod.svc.test"]);
    // And as written once no completion has an address.
    dns.set_zone(&[("app.prod", Rule::Addrs(vec![ip(1)]))]);
    assert_eq!(resolved(2).await, [IpAddr::from(ip(1))]);
    assert_eq!(dns.asked()[2..], ["app.prod.svc.test", "app.prod"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_ending_in_a_dot_is_asked_only_as_written() {
    let dns = DnsServer::start(&[]).await;
    dns.set_zone(&[("app.svc.test", Rule::Addrs(vec![ip(1)]))]);
    let toml = searched("tcp", dns.addr, 80, "app.", "search = [\"svc.test\"]");
    let error = tokio::task::spawn_blocking(move || load(&toml).unwrap_err())
        .await
        .unwrap();
    assert!(
        error.contains(
            "pools.app.backends[0]: cannot resolve `app.`: `app.` resolves to no address"
        ),
        "{error}"
    );
    assert_eq!(dns.asked(), ["app"]);

    dns.set_zone(&[("app", Rule::Addrs(vec![ip(2)]))]);
    let toml = searched("tcp", dns.addr, 80, "app.", "search = [\"svc.test\"]");
    let config = tokio::task::spawn_blocking(move || load(&toml))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        config.pools["app"].backends[0].addr,
        SocketAddr::from((ip(2), 80))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_of_a_name_of_the_search_list_keeps_the_addresses_rather_than_take_the_next() {
    let (port, _b) = backends(&["a", "b"], false).await;
    let dns = DnsServer::start(&[]).await;
    let global = "search = [\"one.test\", \"two.test\"]\nndots = 1";
    dns.set_zone(&[
        ("app.one.test", Rule::Addrs(vec![ip(1)])),
        ("app.two.test", Rule::Addrs(vec![ip(2)])),
    ]);
    let (handle, shutdown) = start(searched("tcp", dns.addr, port, "app", global)).await;
    let front = handle.local_addr("front").unwrap();
    assert_eq!(tcp_name(front).await.0, "a");

    // The first name fails (SERVFAIL): the pool keeps its address, round after round, and
    // never takes the second name's.
    dns.set_zone(&[
        ("app.one.test", Rule::Fail),
        ("app.two.test", Rule::Addrs(vec![ip(2)])),
    ]);
    let [_, _, failed] = handle.resolutions();
    eventually("two lookups fail", || {
        let now = handle.resolutions()[2];
        async move { now >= failed + 2 }
    })
    .await;
    assert_eq!(pool_addrs(&handle), [SocketAddr::from((ip(1), port))]);
    assert_eq!(tcp_name(front).await.0, "a");
    assert!(
        !dns.asked()
            .iter()
            .skip(1)
            .any(|name| name == "app.two.test"),
        "{:?}",
        dns.asked()
    );

    // The first name is gone (NXDOMAIN): the second answers, as for any stub resolver.
    dns.set_zone(&[("app.two.test", Rule::Addrs(vec![ip(2)]))]);
    eventually("a connection reaches b", || async {
        tcp_name(front).await.0 == "b"
    })
    .await;
    assert_eq!(pool_addrs(&handle), [SocketAddr::from((ip(2), port))]);

    // At load, the failure is the error, naming the name that failed.
    dns.set_zone(&[
        ("app.one.test", Rule::Fail),
        ("app.two.test", Rule::Addrs(vec![ip(2)])),
    ]);
    let toml = searched("tcp", dns.addr, port, "app", global);
    let error = tokio::task::spawn_blocking(move || load(&toml).unwrap_err())
        .await
        .unwrap();
    assert!(
        error.contains(
            "pools.app.backends[0]: cannot resolve `app`: asking for `app.one.test` failed, \
             which ends the search (no resolver answered"
        ),
        "{error}"
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_name_of_the_search_list_with_an_address_is_an_answer_of_none() {
    let (port, _b) = backends(&["a"], false).await;
    let dns = DnsServer::start(&[]).await;
    let global = "search = [\"one.test\", \"two.test\"]\nndots = 1\nresolve_hold = \"0s\"";
    // At load, the error names every name asked.
    let toml = searched("tcp", dns.addr, port, "app", global);
    dns.set_zone(&[]);
    let error = tokio::task::spawn_blocking(move || load(&toml).unwrap_err())
        .await
        .unwrap();
    assert!(
        error.contains(
            "pools.app.backends[0]: cannot resolve `app`: no name of the search list has an \
             address (asked `app.one.test`, `app.two.test`, `app`)"
        ),
        "{error}"
    );

    // Later, it is an answer of no address, which ends the hold (none here).
    dns.set_zone(&[("app.two.test", Rule::Addrs(vec![ip(1)]))]);
    let (handle, shutdown) = start(searched("tcp", dns.addr, port, "app", global)).await;
    assert_eq!(pool_addrs(&handle), [SocketAddr::from((ip(1), port))]);
    dns.set_zone(&[]);
    eventually("the address leaves", || {
        let now = pool_addrs(&handle);
        async move { now.is_empty() }
    })
    .await;
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_and_ndots_are_checked_at_their_keys() {
    let dns = DnsServer::start(&[ip(1)]).await;
    let toml = config("tcp", dns.addr, 80, "").replace(
        "search = []",
        "search = [\"bad..test\", \"ok.test\", \"OK.test.\", \"-\", \"\"]\nndots = 16",
    );
    let error = tokio::task::spawn_blocking(move || load(&toml).unwrap_err())
        .await
        .unwrap();
    for expected in [
        "global.search[0]: `bad..test` is not a domain name",
        "global.search[2]: `OK.test.` is also global.search[1]",
        "global.search[4]: `` is not a domain name",
        "global.ndots: 16 is out of range: ndots is 0 to 15",
    ] {
        assert!(error.contains(expected), "{expected}\n{error}");
    }
    assert!(!error.contains("global.search[1]:"), "{error}");
    let toml = config("tcp", dns.addr, 80, "").replace("search = []", "ndots = -1");
    let error = tokio::task::spawn_blocking(move || load(&toml).unwrap_err())
        .await
        .unwrap();
    assert!(
        error.contains("global.ndots: -1 is out of range"),
        "{error}"
    );
    // The trailing dot of a domain goes; the bounds are allowed.
    for ndots in [0, 15] {
        let toml = config("tcp", dns.addr, 80, "").replace(
            "search = []",
            &format!("search = [\"svc.test.\"]\nndots = {ndots}"),
        );
        let config = tokio::task::spawn_blocking(move || load(&toml))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(config.global.search.domains, ["svc.test"]);
        assert_eq!(config.global.search.ndots, ndots);
    }
}
