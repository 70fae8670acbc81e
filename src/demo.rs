//! `switchyard demo`: built-in backends and listeners to try the proxy without writing a config.
//!
//! The demo goes through the same path as a real run: it writes a TOML configuration naming its
//! backends, loads it with [`Config::from_toml`] and serves it with [`Server`].

use std::io;
use std::net::SocketAddr;
use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use crate::config::Config;
use crate::server::{Server, ServerError};

/// Ports the demo tries first; when one is taken, every listener moves to a free port and the
/// printed help shows where.
const HTTP_PORT: u16 = 8080;
const TCP_PORT: u16 = 7000;
const UDP_PORT: u16 = 7001;
/// Silence after which a demo TCP backend says goodbye and closes.
const IDLE: std::time::Duration = std::time::Duration::from_secs(1);
/// The demo's HTTP pools and how many backends each has, as in the seed's routing table.
const HTTP_POOLS: [(&str, usize); 5] = [
    ("web", 2),
    ("api", 2),
    ("static", 1),
    ("admin", 1),
    ("v2", 1),
];

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A demo backend could not be started.
    #[error("starting demo backends: {0}")]
    Backend(#[from] io::Error),
    /// The generated configuration did not load (a bug: the demo writes it itself).
    #[error("demo configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// The proxy could not bind its listeners.
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// The demo's backend addresses.
struct Backends {
    http: Vec<(&'static str, Vec<SocketAddr>)>,
    tcp: Vec<SocketAddr>,
    udp: Vec<SocketAddr>,
}

/// Starts the demo backends, binds the demo listeners and returns the server (not yet running)
/// with the text that tells a user what to try.
/// With `any_port`, the listeners take free ports rather than trying 8080/7000/7001 first.
pub async fn start(any_port: bool) -> Result<(Server, String), DemoError> {
    let mut backends = Backends {
        http: Vec::new(),
        tcp: Vec::new(),
        udp: Vec::new(),
    };
    for (pool, count) in HTTP_POOLS {
        let mut addrs = Vec::new();
        for i in 1..=count {
            addrs.push(http_backend(format!("{pool}-{i}")).await?);
        }
        backends.http.push((pool, addrs));
    }
    for i in 1..=3 {
        backends
            .tcp
            .push(tcp_backend(format!("tcp-backend-{i}")).await?);
    }
    for i in 1..=2 {
        backends
            .udp
            .push(udp_backend(format!("udp-backend-{i}")).await?);
    }
    let preferred = if any_port {
        (0, 0, 0)
    } else {
        (HTTP_PORT, TCP_PORT, UDP_PORT)
    };
    let server = match Server::bind(config(preferred, &backends)?) {
        Ok(server) => server,
        // A preferred port is taken: any free ones will do.
        Err(ServerError::Bind { .. }) => Server::bind(config((0, 0, 0), &backends)?)?,
        Err(error) => return Err(error.into()),
    };
    let addr = |name| {
        server
            .local_addr(name)
            .unwrap_or_else(|| ([127, 0, 0, 1], 0).into())
    };
    let (http, tcp, udp) = (addr("http-demo"), addr("tcp-demo"), addr("udp-demo"));
    let moved = if any_port || (http.port(), tcp.port(), udp.port()) == preferred {
        String::new()
    } else {
        format!(
            "\n(one of the ports {HTTP_PORT}/{TCP_PORT}/{UDP_PORT} was taken, so the demo \
             listens on free ports instead)\n"
        )
    };
    let help = format!(
        "Switchyard demo is running.{moved}\n\
         \nLayer 7, http-demo on {http}: each backend answers with its name.\n\
         \n  curl -s http://{http}/                                  # web pool (web-1, web-2)\n\
         \x20 curl -s http://{http}/api/users                         # api pool (api-1, api-2)\n\
         \x20 curl -s http://{http}/static/app.css                    # static pool\n\
         \x20 curl -s -H 'Host: admin.example.com' http://{http}/     # admin pool (Host admin.*)\n\
         \x20 curl -s -H 'X-API-Version: v2' http://{http}/           # v2 pool (header)\n\
         \x20 curl -s -i 'http://{http}/api/x' -H 'Transfer-Encoding: chunked' -H 'Content-Length: 1'\n\
         \x20                                                         # ambiguous framing: 400\n\
         \nLayer 4, round robin (run each a few times to watch the rotation):\n\
         \n  curl -s telnet://{tcp} </dev/null       # tcp-demo: tcp-backend-1..3 greet, echo, close\n\
         \x20 echo hello | nc -u -w1 {} {}         # udp-demo: udp-backend-1..2 answer\n\
         \nPress Ctrl-C to stop.",
        udp.ip(),
        udp.port(),
    );
    Ok((server, help))
}

fn config(
    ports: (u16, u16, u16),
    backends: &Backends,
) -> Result<Config, crate::config::ConfigError> {
    let list = |addrs: &[SocketAddr]| {
        addrs
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (http_port, tcp_port, udp_port) = ports;
    let mut text = format!(
        r#"
[global]
drain_timeout = "2s"

[[listeners]]
name = "http-demo"
bind = "127.0.0.1:{http_port}"
protocol = "http"
default_pool = "web"

  [[listeners.routes]]
  match = {{ path_prefix = "/api/" }}
  pool = "api"

  [[listeners.routes]]
  match = {{ path_prefix = "/static/" }}
  pool = "static"

  [[listeners.routes]]
  match = {{ host = "admin.*" }}
  pool = "admin"

  [[listeners.routes]]
  match = {{ header = {{ name = "X-API-Version", value = "v2" }} }}
  pool = "v2"

[[listeners]]
name = "tcp-demo"
bind = "127.0.0.1:{tcp_port}"
protocol = "tcp"
pool = "tcp-demo"

[[listeners]]
name = "udp-demo"
bind = "127.0.0.1:{udp_port}"
protocol = "udp"
pool = "udp-demo"

[pools.tcp-demo]
backends = [{}]

[pools.udp-demo]
backends = [{}]
"#,
        list(&backends.tcp),
        list(&backends.udp),
    );
    for (pool, addrs) in &backends.http {
        text.push_str(&format!("\n[pools.{pool}]\nbackends = [{}]\n", list(addrs)));
    }
    Config::from_toml(&text, Path::new("<demo>"))
}

/// An HTTP/1.1 backend that answers every request with `hello from NAME`, keeping the
/// connection alive. Deliberately small: request bodies are read and dropped, heads over
/// 16 KiB or bodies over 1 MiB end the connection.
async fn http_backend(name: String) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let body = format!("hello from {name}\n");
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(1024);
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        let n = stream.read(&mut chunk).await?;
                        if n == 0 || buf.len() > 16 * 1024 {
                            return Ok::<_, io::Error>(());
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if length > 1024 * 1024 {
                        return Ok(());
                    }
                    let mut rest = buf.split_off(end + 4);
                    while rest.len() < length {
                        let n = stream.read(&mut chunk).await?;
                        if n == 0 {
                            return Ok(());
                        }
                        rest.extend_from_slice(&chunk[..n]);
                    }
                    buf = rest.split_off(length);
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    stream.write_all(response.as_bytes()).await?;
                }
            });
        }
    });
    Ok(addr)
}

/// A TCP backend that greets each client with its name, then echoes lines until EOF.
async fn tcp_backend(name: String) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let name = name.clone();
            tokio::spawn(async move {
                let (mut read, mut write) = stream.into_split();
                write
                    .write_all(format!("hello from {name}\n").as_bytes())
                    .await?;
                // Echo in bounded chunks: whatever a client sends, memory stays at 4 KiB. A
                // second of silence ends the conversation, so `curl telnet://` returns.
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = tokio::time::timeout(IDLE, read.read(&mut chunk)).await else {
                        break;
                    };
                    let n = n?;
                    if n == 0 {
                        break;
                    }
                    write.write_all(format!("{name}: ").as_bytes()).await?;
                    write.write_all(&chunk[..n]).await?;
                }
                write.shutdown().await
            });
        }
    });
    Ok(addr)
}

/// A UDP backend that answers each datagram with its name and the datagram.
async fn udp_backend(name: String) -> io::Result<SocketAddr> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    let addr = socket.local_addr()?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let reply = format!("{name}: {}", String::from_utf8_lossy(&buf[..n]));
            let _ = socket.send_to(reply.as_bytes(), from).await;
        }
    });
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quick start tells a stranger where each demo listener is; it must be where the demo
    /// puts it.
    #[test]
    fn the_readme_names_the_demo_ports() {
        let readme = include_str!("../README.md");
        for (name, port) in [
            ("http-demo", HTTP_PORT),
            ("tcp-demo", TCP_PORT),
            ("udp-demo", UDP_PORT),
        ] {
            let said = format!("`{name}` on `127.0.0.1:{port}`");
            assert!(readme.contains(&said), "README lacks {said}");
        }
    }
}
