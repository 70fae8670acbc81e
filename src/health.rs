//! Active health checks: each backend of a pool with `health` is probed every `interval`, and
//! `fall` failures in a row take it down, `rise` successes bring it back.
//!
//! Probes of one pool are spread over the interval (each backend starts at its own offset), so
//! a pool of a thousand backends is a steady trickle of probes, not a burst every interval. A
//! probe is a TCP connect or one HTTP/1.1 GET on a fresh connection; the whole probe, connect
//! included, must finish within `timeout`. State changes are logged at info.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::backend::{BackendState, DOWN, EJECTED};
use crate::config::{HealthConfig, HealthKind, ProxyProtocolVersion};
use crate::pool::Pool;
use crate::stream::Stream;

/// The most of a response a probe reads looking for the status line.
const MAX_STATUS_LINE: usize = 1024;

/// Starts probing every backend of `pool`, if it has health checks, until `stop`.
pub fn spawn(pool: &Pool, stop: CancellationToken) {
    let Some(config) = pool.config().health.clone() else {
        return;
    };
    let config = Arc::new(config);
    let n = pool.candidates.len().max(1) as f64;
    for (i, candidate) in pool.candidates.iter().enumerate() {
        // Backend i starts in the i-th slice of the interval, at a random place within it.
        let offset = config.interval.mul_f64((i as f64 + fastrand::f64()) / n);
        let probe = Probe {
            state: Arc::clone(&candidate.state),
            config: Arc::clone(&config),
            proxy_protocol: pool.send_proxy_protocol,
            pool: pool.name.clone(),
            tls: pool.tls.clone(),
        };
        tokio::spawn(probe.run(offset, stop.clone()));
    }
}

/// One backend's prober.
struct Probe {
    state: Arc<BackendState>,
    config: Arc<HealthConfig>,
    proxy_protocol: Option<ProxyProtocolVersion>,
    pool: String,
    /// The pool's TLS toward its backends: HTTP probes speak it too.
    tls: Option<Arc<crate::tls::UpstreamConnector>>,
}

impl Probe {
    async fn run(self, offset: Duration, stop: CancellationToken) {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(offset) => {}
        }
        let mut ticks = tokio::time::interval(self.config.interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let (mut successes, mut failures) = (0u32, 0u32);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let outcome = match tokio::time::timeout(self.config.timeout, self.probe()).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("no answer within {:?}", self.config.timeout)),
            };
            let addr = self.state.addr;
            match outcome {
                Ok(()) => {
                    failures = 0;
                    successes = successes.saturating_add(1);
                    if successes >= self.config.rise {
                        if self.state.flags() & DOWN != 0 && self.state.clear_flag(DOWN) {
                            info!(pool = %self.pool, backend = %addr, "backend up: health checks pass");
                        }
                        if self.state.flags() & EJECTED != 0 {
                            self.state.end_ejection();
                        }
                    }
                }
                Err(reason) => {
                    successes = 0;
                    failures = failures.saturating_add(1);
                    debug!(pool = %self.pool, backend = %addr, %reason, "health check failed");
                    if failures >= self.config.fall && self.state.set_flag(DOWN) {
                        info!(pool = %self.pool, backend = %addr, %reason, "backend down: health checks fail");
                    }
                }
            }
        }
    }

    /// One probe; the reason when it fails.
    async fn probe(&self) -> Result<(), String> {
        let addr = self.state.addr;
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let HealthKind::Http { path, host, expect } = &self.config.kind else {
            return Ok(());
        };
        let _ = stream.set_nodelay(true);
        let mut request = Vec::with_capacity(128);
        if let Some(version) = self.proxy_protocol {
            let local = stream.local_addr().map_err(|e| e.to_string())?;
            request.extend(crate::proxy_protocol::encode(version, local, addr));
        }
        // With TLS, the PROXY header goes first, in the clear, as on the data path.
        let mut stream = match &self.tls {
            None => Stream::Plain(stream),
            Some(tls) => {
                stream
                    .write_all(&request)
                    .await
                    .map_err(|e| format!("write: {e}"))?;
                request.clear();
                let tls_stream = tls
                    .connect(stream, addr, self.config.timeout)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                Stream::Tls(Box::new(tls_stream.into()))
            }
        };
        request.extend_from_slice(b"GET ");
        request.extend_from_slice(path.as_bytes());
        request.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        match host {
            Some(host) => request.extend_from_slice(host.as_bytes()),
            None => request.extend_from_slice(addr.to_string().as_bytes()),
        }
        request.extend_from_slice(
            b"\r\nuser-agent: switchyard-health-check\r\nconnection: close\r\n\r\n",
        );
        stream
            .write_all_flush(&request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let status = read_status(&mut stream, addr).await?;
        if expect
            .iter()
            .any(|&(low, high)| (low..=high).contains(&status))
        {
            Ok(())
        } else {
            Err(format!("status {status}"))
        }
    }
}

/// Reads up to the end of the status line and returns the status code.
async fn read_status(stream: &mut Stream, addr: SocketAddr) -> Result<u16, String> {
    let mut buf = Vec::with_capacity(256);
    loop {
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            return parse_status_line(&buf[..end]).ok_or_else(|| {
                format!(
                    "{addr} sent no valid status line: {:?}",
                    String::from_utf8_lossy(&buf[..end.min(80)])
                )
            });
        }
        if buf.len() >= MAX_STATUS_LINE {
            return Err("status line too long".into());
        }
        let mut chunk = [0u8; 256];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed before a status line".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `HTTP/1.x NNN ...` to NNN.
fn parse_status_line(line: &[u8]) -> Option<u16> {
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5)?;
    if rest.get(1) != Some(&b' ') || !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503"), Some(503));
        assert_eq!(parse_status_line(b"HTTP/2 200"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 2x0 OK"), None);
        assert_eq!(parse_status_line(b"garbage"), None);
    }
}
