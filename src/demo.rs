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

/// Ports the demo tries first; when one is taken, both listeners move to free ports and the
/// printed help shows where.
const TCP_PORT: u16 = 7000;
const UDP_PORT: u16 = 7001;
/// Silence after which a demo TCP backend says goodbye and closes.
const IDLE: std::time::Duration = std::time::Duration::from_secs(1);

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

/// Starts the demo backends, binds the demo listeners and returns the server (not yet running)
/// with the text that tells a user what to try.
pub async fn start() -> Result<(Server, String), DemoError> {
    let mut tcp_backends = Vec::new();
    for i in 1..=3 {
        tcp_backends.push(tcp_backend(format!("tcp-backend-{i}")).await?);
    }
    let mut udp_backends = Vec::new();
    for i in 1..=2 {
        udp_backends.push(udp_backend(format!("udp-backend-{i}")).await?);
    }
    let server = match Server::bind(config(TCP_PORT, UDP_PORT, &tcp_backends, &udp_backends)?) {
        Ok(server) => server,
        // The preferred ports are taken: any free ones will do.
        Err(ServerError::Bind { .. }) => Server::bind(config(0, 0, &tcp_backends, &udp_backends)?)?,
    };
    let tcp = server
        .local_addr("tcp-demo")
        .unwrap_or_else(|| ([127, 0, 0, 1], 0).into());
    let udp = server
        .local_addr("udp-demo")
        .unwrap_or_else(|| ([127, 0, 0, 1], 0).into());
    let moved = if tcp.port() == TCP_PORT && udp.port() == UDP_PORT {
        ""
    } else {
        "\n(ports 7000/7001 were taken, so the demo listens on free ports instead)\n"
    };
    let help = format!(
        "Switchyard demo is running. Layer 4 listeners, round robin over the demo backends:\n{moved}\
         \n  tcp-demo  {tcp}  -> tcp-backend-1..3 (each greets with its name, echoes what you\n\
         \x20                             send, and closes after a second of silence)\n\
         \x20 udp-demo  {udp}  -> udp-backend-1..2 (each answers with its name)\n\
         \nTry (run each a few times to watch the rotation):\n\
         \n  curl -s telnet://{tcp} </dev/null\n\
         \x20 printf 'ping\\n' | nc {} {}\n\
         \x20 echo hello | nc -u -w1 {} {}\n\
         \nPress Ctrl-C to stop.",
        tcp.ip(),
        tcp.port(),
        udp.ip(),
        udp.port(),
    );
    Ok((server, help))
}

fn config(
    tcp_port: u16,
    udp_port: u16,
    tcp_backends: &[SocketAddr],
    udp_backends: &[SocketAddr],
) -> Result<Config, crate::config::ConfigError> {
    let list = |addrs: &[SocketAddr]| {
        addrs
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = format!(
        r#"
[global]
drain_timeout = "2s"

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
        list(tcp_backends),
        list(udp_backends),
    );
    Config::from_toml(&text, Path::new("<demo>"))
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
