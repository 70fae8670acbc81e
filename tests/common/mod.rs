//! Test helpers: the real proxy, in-process, on 127.0.0.1:0, and small real backends.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use switchyard::backend::Registry;
use switchyard::{Config, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Upper bound for anything a test waits on; reaching it is a failure, not synchronisation.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A running proxy.
pub struct Proxy {
    pub server_addrs: Vec<(String, SocketAddr)>,
    pub registry: Arc<Registry>,
    pub shutdown: CancellationToken,
    pub udp_stats: Vec<(String, Arc<switchyard::l4::udp::UdpStats>)>,
    pub task: JoinHandle<usize>,
}

impl Proxy {
    /// Loads `toml`, binds and runs it.
    pub fn start(toml: &str) -> Proxy {
        let config = Config::from_toml(toml, Path::new("test.toml")).expect("test config is valid");
        let names: Vec<(String, bool)> = config
            .listeners
            .iter()
            .map(|l| {
                (
                    l.name.clone(),
                    matches!(l.kind, switchyard::config::ListenerKind::Udp(_)),
                )
            })
            .collect();
        let server = Server::bind(config).expect("binds");
        let server_addrs = names
            .iter()
            .map(|(n, _)| (n.clone(), server.local_addr(n).expect("bound")))
            .collect();
        let udp_stats = names
            .iter()
            .filter(|(_, udp)| *udp)
            .map(|(n, _)| (n.clone(), server.udp_stats(n).expect("udp")))
            .collect();
        let registry = server.registry();
        let shutdown = server.shutdown_token();
        let task = tokio::spawn(server.run());
        Proxy {
            server_addrs,
            registry,
            shutdown,
            udp_stats,
            task,
        }
    }

    /// The address of listener `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.server_addrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .expect("listener exists")
    }

    /// UDP counters of listener `name`.
    pub fn udp(&self, name: &str) -> Arc<switchyard::l4::udp::UdpStats> {
        self.udp_stats
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| Arc::clone(s))
            .expect("udp listener exists")
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
