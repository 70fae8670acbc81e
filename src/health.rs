//! Active health checks: each backend of a pool with `health` is probed every `interval`, and
//! `fall` failures in a row take it down, `rise` successes bring it back.
//!
//! Probes of one pool are spread over the interval (each backend starts at its own offset), so
//! a pool of a thousand backends is a steady trickle of probes, not a burst every interval. A
//! probe is a TCP connect, one GET (over the pool's TLS, if it has some; HTTP/2 on pools that
//! speak it to their backends, HTTP/1.1 otherwise) or one gRPC health check (`Check` of
//! `grpc.health.v1.Health`, over HTTP/2) on a kept or fresh connection; the whole probe, connect
//! included, must finish within `timeout`. State changes are logged at info.
//!
//! An HTTP probe is judged on the status of the response head, as HAProxy judges it: a health
//! endpoint whose body comes late, streams or never ends must not hold the probe until its
//! timeout. The body is never waited for; what the next probe needs of it is taken then.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::backend::{BackendState, DOWN, EJECTED};
use crate::config::{HealthConfig, HealthKind, ProxyProtocolVersion, UpstreamProtocol};
use crate::pool::Pool;
use crate::stream::Stream;
use crate::tls::UpstreamConnector;

/// Granularity of probe start times in milliseconds. A thousand backends every second are
/// then a hundred wake-ups of ten probes, not a thousand of one: waking the thread costs more
/// than a probe on a kept connection.
const SLOT_MS: u64 = 10;
/// The largest response head a probe reads.
const MAX_PROBE_HEAD: usize = 8 * 1024;
/// The largest body a probe lets follow its verdict on a kept HTTP/1.1 connection (the next
/// probe skips it), and the largest gRPC answer read; a larger one closes the connection.
const MAX_PROBE_BODY: usize = 64 * 1024;

/// Starts probing every backend of `pool`, if it has health checks, until `stop`.
///
/// A pool without health checks has nobody left to clear [`DOWN`]: a backend the checks of an
/// earlier configuration took down would stay out of every pick for good. Without checks,
/// backends are up, as they are when a pool starts.
pub fn spawn(pool: &Pool, stop: CancellationToken) {
    let Some(config) = pool.config().health.clone() else {
        for candidate in &pool.candidates {
            if candidate.state.clear_flag(DOWN) {
                info!(pool = %pool.name, backend = %candidate.state.addr, "backend up: no more health checks");
            }
        }
        return;
    };
    let config = Arc::new(config);
    let n = pool.candidates.len().max(1) as f64;
    for (i, candidate) in pool.candidates.iter().enumerate() {
        // Backend i starts in the i-th slice of the interval, at a random place within it,
        // rounded to a multiple of SLOT so that probes due close together share one wake-up.
        let offset = config.interval.mul_f64((i as f64 + fastrand::f64()) / n);
        let offset = Duration::from_millis((offset.as_millis() as u64).div_ceil(SLOT_MS) * SLOT_MS);
        let probe = Probe {
            request: probe_request(&config.kind, candidate.state.addr),
            h2: (pool.upstream_protocol == UpstreamProtocol::H2)
                .then(|| h2_probe_request(&config.kind, candidate.state.addr, pool.tls.is_some())),
            grpc_body: grpc_check_body(&config.kind),
            h2_conn: None,
            state: Arc::clone(&candidate.state),
            config: Arc::clone(&config),
            proxy_protocol: pool.send_proxy_protocol,
            pool: pool.name.clone(),
            conn: None,
            buf: Vec::new(),
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
    /// The HTTP request, built once.
    request: Vec<u8>,
    /// On pools that speak HTTP/2 to their backends, the request as HTTP/2 sends it: such
    /// backends may speak nothing else (gRPC servers), and over TLS their ALPN says `h2`.
    h2: Option<http::Request<()>>,
    /// The framed `HealthCheckRequest` a gRPC check sends as the HTTP/2 request's body.
    grpc_body: Option<bytes::Bytes>,
    /// The HTTP/2 connection kept from the last probe, on those pools.
    h2_conn: Option<h2::client::SendRequest<bytes::Bytes>>,
    /// The connection kept from the last HTTP probe.
    conn: Option<Kept>,
    /// Read buffer, kept between probes.
    buf: Vec<u8>,
    /// The pool's TLS toward its backends: HTTP probes speak it too.
    tls: Option<Arc<UpstreamConnector>>,
}

impl Probe {
    async fn run(mut self, offset: Duration, stop: CancellationToken) {
        // Restarted by a reload: the next probe stays due when it was (at most an interval
        // away), rather than at a new random point: reloads in quick succession would
        // otherwise put it off again and again.
        let now = crate::backend::uptime();
        let offset = match self.state.next_probe() {
            Some(due) => due.saturating_sub(now).min(self.config.interval),
            None => {
                self.state.set_next_probe(now + offset);
                offset
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(offset) => {}
        }
        let mut ticks = tokio::time::interval(self.config.interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut ejection = self.state.ejection_generation();
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            self.state
                .set_next_probe(crate::backend::uptime() + self.config.interval);
            // A probe in flight ends with its checks: finished, it would count for checks that
            // are gone, and could take down a backend that a reload left without checks (and so
            // without anything to bring it back).
            let probe = tokio::time::timeout(self.config.timeout, self.probe());
            let outcome = match tokio::select! {
                biased;
                () = stop.cancelled() => return,
                result = probe => result,
            } {
                Ok(outcome) => outcome,
                Err(_) => {
                    self.conn = None;
                    self.h2_conn = None;
                    Err(ProbeError::Failed(format!(
                        "no answer within {:?}",
                        self.config.timeout
                    )))
                }
            };
            let addr = self.state.addr;
            // The run so far, as this prober or the one a reload replaced left it.
            let (mut successes, mut failures) = self.state.health_streak();
            // A new ejection needs `rise` passes counted from its start to be ended early.
            let generation = self.state.ejection_generation();
            if generation != ejection {
                ejection = generation;
                successes = 0;
            }
            match outcome {
                Ok(()) => {
                    self.state.probes_passed.fetch_add(1, Relaxed);
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
                // Out of descriptors, say: the backend was not asked, and the streak stays.
                Err(ProbeError::NotMade(reason)) => {
                    debug!(pool = %self.pool, backend = %addr, %reason, "health check not made");
                }
                Err(ProbeError::Failed(reason)) => {
                    self.state.probes_failed.fetch_add(1, Relaxed);
                    self.conn = None;
                    self.h2_conn = None;
                    successes = 0;
                    failures = failures.saturating_add(1);
                    debug!(pool = %self.pool, backend = %addr, %reason, "health check failed");
                    if failures >= self.config.fall && self.state.set_flag(DOWN) {
                        info!(pool = %self.pool, backend = %addr, %reason, "backend down: health checks fail");
                    }
                }
            }
            self.state.set_health_streak(successes, failures);
        }
    }

    /// One probe; the reason when it fails. HTTP probes keep their connection open between
    /// probes when the backend allows it (as Envoy does): a new TCP connection per probe costs
    /// several times the probe itself, and a thousand backends probed every second would
    /// otherwise take a tenth of a core.
    async fn probe(&mut self) -> Result<(), ProbeError> {
        let addr = self.state.addr;
        let config = Arc::clone(&self.config);
        let expect = match &config.kind {
            HealthKind::Tcp => {
                let stream = TcpStream::connect(addr).await.map_err(connect_error)?;
                // Closed with a reset, as HAProxy closes its checks: the connect was the check,
                // and a thousand probes a second would otherwise leave thousands of sockets in
                // TIME_WAIT and cost a closing handshake each.
                let _ = stream.set_zero_linger();
                return Ok(());
            }
            HealthKind::Grpc { .. } => {
                let answer = self.exchange_h2().await?;
                return grpc_verdict(&answer).map_err(ProbeError::Failed);
            }
            HealthKind::Http { expect, .. } => expect,
        };
        if self.h2.is_some() {
            let status = self.exchange_h2().await?.status;
            return if expect
                .iter()
                .any(|&(low, high)| (low..=high).contains(&status))
            {
                Ok(())
            } else {
                Err(ProbeError::Failed(format!("status {status}")))
            };
        }
        // The last probe's body, if it had one, came after its verdict: the kept connection
        // carries this probe only once that body is all there (it had an interval to come).
        let kept = match self.conn.take() {
            Some(Kept { mut stream, owed }) => {
                if skip_owed(&mut stream, owed).await {
                    Some(stream)
                } else {
                    debug!(backend = %addr, owed, "kept health check connection still owes a body");
                    None
                }
            }
            None => None,
        };
        // A kept connection the backend closed while idle fails before any response byte: that
        // says nothing of the backend's health, so the probe goes again on a fresh connection.
        let (stream, response) = match kept {
            Some(mut kept) => match self.exchange(&mut kept).await {
                Ok(response) => (kept, response),
                Err(error) => {
                    debug!(backend = %addr, %error, "kept health check connection gone");
                    let mut fresh = self.connect().await?;
                    let response = self.exchange(&mut fresh).await?;
                    (fresh, response)
                }
            },
            None => {
                let mut fresh = self.connect().await?;
                let response = self.exchange(&mut fresh).await?;
                (fresh, response)
            }
        };
        if let Some(owed) = response.owed {
            self.conn = Some(Kept { stream, owed });
        }
        if expect
            .iter()
            .any(|&(low, high)| (low..=high).contains(&response.status))
        {
            Ok(())
        } else {
            Err(ProbeError::Failed(format!("status {}", response.status)))
        }
    }

    /// The HTTP/2 probe: its request on the kept connection, or on a new one when there is
    /// none or the kept one is gone before answering (which says nothing of the backend).
    async fn exchange_h2(&mut self) -> Result<H2Answer, ProbeError> {
        let addr = self.state.addr;
        if let Some(sender) = self.h2_conn.take() {
            match self.request_h2(sender).await {
                Ok(status) => return Ok(status),
                Err(error) => {
                    debug!(backend = %addr, %error, "kept health check connection gone");
                }
            }
        }
        let stream = self.connect().await?;
        let (sender, connection) = h2::client::handshake(stream)
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        // Ends when the probe lets go of the connection (the prober stopped, or the
        // connection failed), or when the backend closes it.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(self.request_h2(sender).await?)
    }

    /// Sends the HTTP/2 probe request on `sender` and returns what came back, and keeps the
    /// connection for the next probe. An HTTP check needs only the head: the part of the body
    /// already there is taken, and a body that goes on is cancelled with its stream (which
    /// leaves the connection as it was). A gRPC check reads its one message and the trailers,
    /// and gives up on an answer that is more than that.
    async fn request_h2(
        &mut self,
        sender: h2::client::SendRequest<bytes::Bytes>,
    ) -> Result<H2Answer, String> {
        let request = match &self.h2 {
            Some(request) => request.clone(),
            None => return Err("not an HTTP/2 pool".into()),
        };
        let mut sender = sender.ready().await.map_err(|e| format!("HTTP/2: {e}"))?;
        let (response, mut upload) = sender
            .send_request(request, self.grpc_body.is_none())
            .map_err(|e| format!("HTTP/2: {e}"))?;
        if let Some(body) = &self.grpc_body {
            // A few bytes, well within the initial window.
            upload
                .send_data(body.clone(), true)
                .map_err(|e| format!("HTTP/2: {e}"))?;
        }
        let response = response.await.map_err(|e| format!("HTTP/2: {e}"))?;
        let status = response.status().as_u16();
        let (parts, mut body) = response.into_parts();
        let mut answer = H2Answer {
            status,
            body: Vec::new(),
            grpc_status: grpc_field(&parts.headers, "grpc-status"),
            grpc_message: grpc_field(&parts.headers, "grpc-message"),
        };
        if self.grpc_body.is_none() {
            // What of the body is already there is taken, so that one that came with the head
            // ends its stream cleanly; a body still to come is not waited for, and its stream
            // is reset as this function returns and drops it.
            let mut taken = 0;
            while taken <= MAX_PROBE_BODY
                && let Some(Some(Ok(chunk))) = ready_now(body.data()).await
            {
                taken += chunk.len();
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            self.h2_conn = Some(sender);
            return Ok(answer);
        }
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| format!("HTTP/2 body: {e}"))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            answer.body.extend_from_slice(&chunk);
            // One message is the whole answer: more, or one longer than any health answer,
            // fails without waiting for the rest.
            if let Err(reason) = grpc_message_so_far(&answer.body) {
                return Err(reason.into());
            }
        }
        if let Some(trailers) = body.trailers().await.map_err(|e| format!("HTTP/2: {e}"))? {
            answer.grpc_status = grpc_field(&trailers, "grpc-status").or(answer.grpc_status);
            answer.grpc_message = grpc_field(&trailers, "grpc-message").or(answer.grpc_message);
        }
        self.h2_conn = Some(sender);
        Ok(answer)
    }

    /// Sends the probe request on `stream` and reads the response.
    async fn exchange(&mut self, stream: &mut Stream) -> Result<ProbeResponse, String> {
        stream
            .write_all_flush(&self.request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        read_response(stream, &mut self.buf).await
    }

    /// A new connection for HTTP probes, with the pool's PROXY header when it sends one and its
    /// TLS when it has some (the PROXY header first, in the clear, as on the data path).
    async fn connect(&self) -> Result<Stream, ProbeError> {
        let addr = self.state.addr;
        let mut stream = TcpStream::connect(addr).await.map_err(connect_error)?;
        let _ = stream.set_nodelay(true);
        if let Some(version) = self.proxy_protocol {
            let local = stream.local_addr().map_err(|e| e.to_string())?;
            let header = crate::proxy_protocol::encode(version, local, addr);
            stream
                .write_all(&header)
                .await
                .map_err(|e| format!("write: {e}"))?;
        }
        Ok(match &self.tls {
            None => Stream::Plain(stream),
            Some(tls) => {
                let tls_stream = tls
                    .connect(stream, addr, self.config.timeout)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                Stream::Tls(Box::new(tls_stream.into()))
            }
        })
    }
}

/// A connection kept from the last HTTP/1.1 probe.
struct Kept {
    stream: Stream,
    /// The bytes of that probe's body that had not come with its head.
    owed: usize,
}

/// Reads and drops the `owed` bytes of the last probe's body, if they are all there, without
/// waiting for any; whether they were. A body still not complete an interval after its head is
/// not worth waiting for: the connection is dropped, and the probe goes on a fresh one.
async fn skip_owed(stream: &mut Stream, mut owed: usize) -> bool {
    let mut chunk = [0u8; 4096];
    while owed > 0 {
        let want = owed.min(chunk.len());
        match ready_now(stream.read(&mut chunk[..want])).await {
            Some(Ok(n)) if n > 0 => owed -= n,
            _ => return false,
        }
    }
    true
}

/// What `future` gives if it is ready now, without waiting for it (it is dropped otherwise, so
/// it must be cancel-safe).
async fn ready_now<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| match future.as_mut().poll(cx) {
        Poll::Ready(output) => Poll::Ready(Some(output)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// Why a probe did not pass.
enum ProbeError {
    /// The backend failed it.
    Failed(String),
    /// It could not be made: this process is out of descriptors or memory. That says nothing
    /// of the backend, so it counts neither as a pass nor as a failure.
    NotMade(String),
}

impl From<String> for ProbeError {
    fn from(reason: String) -> Self {
        ProbeError::Failed(reason)
    }
}

/// A failed connect: the backend's failure, unless the socket could not even be created.
fn connect_error(error: std::io::Error) -> ProbeError {
    let reason = format!("connect: {error}");
    if crate::listener::is_resource_exhaustion(&error) {
        ProbeError::NotMade(reason)
    } else {
        ProbeError::Failed(reason)
    }
}

/// The request an HTTP probe sends.
fn probe_request(kind: &HealthKind, addr: SocketAddr) -> Vec<u8> {
    let HealthKind::Http { path, host, .. } = kind else {
        return Vec::new();
    };
    let host = host.clone().unwrap_or_else(|| addr.to_string());
    format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: switchyard-health-check\r\n\r\n")
        .into_bytes()
}

/// The request an HTTP probe sends over HTTP/2: the same path, `Host` as its authority. For a
/// gRPC check, the `Check` call of the standard health service.
fn h2_probe_request(kind: &HealthKind, addr: SocketAddr, tls: bool) -> http::Request<()> {
    let (path, host, grpc) = match kind {
        HealthKind::Http { path, host, .. } => (path.as_str(), host.clone(), false),
        HealthKind::Grpc { host, .. } => (GRPC_CHECK_PATH, host.clone(), true),
        HealthKind::Tcp => ("/", None, false),
    };
    let host = host.unwrap_or_else(|| addr.to_string());
    let scheme = if tls { "https" } else { "http" };
    let builder = http::Request::builder()
        .uri(format!("{scheme}://{host}{path}"))
        .header(http::header::USER_AGENT, "switchyard-health-check");
    let builder = if grpc {
        builder
            .method(http::Method::POST)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
    } else {
        builder.method(http::Method::GET)
    };
    builder.body(()).unwrap_or_default()
}

/// The method of the gRPC health checking protocol (grpc/grpc, doc/health-checking.md).
const GRPC_CHECK_PATH: &str = "/grpc.health.v1.Health/Check";

/// What an HTTP/2 probe learned: the status, the start of the body, and for gRPC the status
/// and message (from the trailers, or from the head of a trailers-only answer).
struct H2Answer {
    status: u16,
    body: Vec<u8>,
    grpc_status: Option<String>,
    grpc_message: Option<String>,
}

fn grpc_field(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// The body of a gRPC check: `HealthCheckRequest { service }` in protobuf (field 1, a string,
/// left out when empty), behind gRPC's five-byte message prefix (not compressed, length).
fn grpc_check_body(kind: &HealthKind) -> Option<bytes::Bytes> {
    let HealthKind::Grpc { service, .. } = kind else {
        return None;
    };
    let mut message = Vec::with_capacity(service.len() + 8);
    if !service.is_empty() {
        message.push(0x0a);
        let mut len = service.len();
        while len >= 0x80 {
            message.push((len as u8 & 0x7f) | 0x80);
            len >>= 7;
        }
        message.push(len as u8);
        message.extend_from_slice(service.as_bytes());
    }
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    Some(framed.into())
}

/// Whether a gRPC check passed: HTTP 200, `grpc-status: 0`, and a `HealthCheckResponse` whose
/// status is `SERVING`. The reason otherwise.
fn grpc_verdict(answer: &H2Answer) -> Result<(), String> {
    if answer.status != 200 {
        return Err(format!("status {}", answer.status));
    }
    match answer.grpc_status.as_deref() {
        Some("0") => {}
        Some(code) => {
            return Err(format!(
                "grpc-status {code}{}",
                answer
                    .grpc_message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            ));
        }
        None => return Err("no grpc-status".into()),
    }
    match serving_status(&answer.body) {
        Some(1) => Ok(()),
        Some(0) => Err("UNKNOWN".into()),
        Some(2) => Err("NOT_SERVING".into()),
        Some(3) => Err("SERVICE_UNKNOWN".into()),
        Some(other) => Err(format!("serving status {other}")),
        None => Err("not a HealthCheckResponse".into()),
    }
}

/// The `status` (field 1, a varint) of the one `HealthCheckResponse` in a gRPC body; 0, the
/// protobuf default, when the field is left out. `None` for anything that is not exactly one
/// uncompressed, well-formed message.
fn serving_status(body: &[u8]) -> Option<u64> {
    let (&flag, rest) = body.split_first()?;
    if flag != 0 || rest.len() < 4 {
        return None;
    }
    let (length, mut message) = rest.split_at(4);
    let length = u32::from_be_bytes(length.try_into().ok()?) as usize;
    if message.len() != length {
        return None;
    }
    let mut status = 0;
    while !message.is_empty() {
        let key = varint(&mut message)?;
        match key & 7 {
            0 => {
                let value = varint(&mut message)?;
                if key >> 3 == 1 {
                    status = value;
                }
            }
            1 => message = message.get(8..)?,
            2 => {
                let len = usize::try_from(varint(&mut message)?).ok()?;
                message = message.get(len..)?;
            }
            5 => message = message.get(4..)?,
            _ => return None,
        }
    }
    Some(status)
}

/// Checks the part of a gRPC answer's body read so far: an error once it is more than one
/// message, or announces a message larger than [`MAX_PROBE_BODY`] (no health answer is).
fn grpc_message_so_far(body: &[u8]) -> Result<(), &'static str> {
    let Some(length) = body.get(1..5) else {
        return Ok(());
    };
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(length);
    let whole = 5 + u32::from_be_bytes(bytes) as usize;
    if whole > MAX_PROBE_BODY {
        Err("a message too large for a HealthCheckResponse")
    } else if body.len() > whole {
        Err("more than one message")
    } else {
        Ok(())
    }
}

/// Reads one protobuf varint (at most ten bytes) off the front of `data`.
fn varint(data: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let (&byte, rest) = data.split_first()?;
        *data = rest;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// What a probe learns from a response.
struct ProbeResponse {
    status: u16,
    /// When the connection can carry the next probe (nobody asked to close, and the body's end
    /// is known and near), the bytes of the body still to come, which that probe skips first.
    owed: Option<usize>,
}

/// Reads one response head. Its body is not waited for: the status decides. A Content-Length
/// body of up to [`MAX_PROBE_BODY`] leaves the connection to the next probe, which skips what
/// did not come with the head; after anything else (chunked, until-close, larger) the
/// connection is dropped unread.
async fn read_response(stream: &mut Stream, buf: &mut Vec<u8>) -> Result<ProbeResponse, String> {
    buf.clear();
    // Interim responses (103 Early Hints, say) come before the final one and say nothing of
    // health: they are passed over, or the probe would judge the backend by the 1xx and leave
    // the final response to be read as the answer to the next probe. Every head read counts
    // against MAX_PROBE_HEAD together.
    let mut head_start = 0;
    let (head_end, status) = loop {
        let head_end = loop {
            if let Some(i) = memchr::memmem::find(&buf[head_start..], b"\r\n\r\n") {
                break head_start + i + 4;
            }
            if buf.len() >= MAX_PROBE_HEAD {
                return Err("response head too long".into());
            }
            fill(stream, buf).await?;
        };
        let head = &buf[head_start..head_end];
        let line_end = memchr::memchr(b'\n', head).unwrap_or(head.len());
        let status = parse_status_line(&head[..line_end]).ok_or_else(|| {
            format!(
                "no valid status line: {:?}",
                String::from_utf8_lossy(&head[..line_end.min(80)])
            )
        })?;
        // 101 ends the exchange (nothing HTTP follows it), so it is the final status.
        if (100..200).contains(&status) && status != 101 {
            head_start = head_end;
            continue;
        }
        break (head_end, status);
    };
    let head = &buf[head_start..head_end];
    let line_end = memchr::memchr(b'\n', head).unwrap_or(head.len());
    let mut length = None;
    // After a 101 the connection speaks another protocol: it cannot carry the next probe.
    let mut reusable = head.starts_with(b"HTTP/1.1") && status != 101;
    for line in head[line_end..].split(|&b| b == b'\n') {
        let Some(colon) = memchr::memchr(b':', line) else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            length = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<usize>().ok());
        } else if name.eq_ignore_ascii_case(b"connection") && value.eq_ignore_ascii_case(b"close")
            || name.eq_ignore_ascii_case(b"transfer-encoding")
        {
            reusable = false;
        }
    }
    let bodiless = status == 204 || status == 304 || (100..200).contains(&status);
    let body = match (bodiless, length) {
        (true, _) => Some(0),
        (false, Some(n)) if n <= MAX_PROBE_BODY => Some(n),
        _ => None,
    };
    // Bytes past the body's end would be read as the next probe's answer.
    let owed = body
        .filter(|_| reusable)
        .and_then(|n| n.checked_sub(buf.len() - head_end));
    Ok(ProbeResponse { status, owed })
}

async fn fill(stream: &mut Stream, buf: &mut Vec<u8>) -> Result<(), String> {
    let mut chunk = [0u8; 1024];
    match stream.read(&mut chunk).await {
        Ok(0) => Err("closed before a whole response".into()),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Err(e) => Err(format!("read: {e}")),
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

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut body = vec![0];
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(message);
        body
    }

    #[test]
    fn grpc_check_requests_name_their_service() {
        let body = |service: &str| {
            grpc_check_body(&HealthKind::Grpc {
                service: service.into(),
                host: None,
            })
            .expect("a body")
        };
        assert_eq!(&body("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &body("a.B")[..],
            &[0, 0, 0, 0, 5, 0x0a, 3, b'a', b'.', b'B']
        );
        // A name of 200 bytes takes a two-byte length.
        let long = "s".repeat(200);
        assert_eq!(&body(&long)[..8], &[0, 0, 0, 0, 203, 0x0a, 0xc8, 0x01]);
    }

    #[test]
    fn grpc_answers_are_read_no_further_than_one_message() {
        // Not even a length yet, part of a message, the whole message: read on.
        assert_eq!(grpc_message_so_far(&[0, 0, 0]), Ok(()));
        assert_eq!(grpc_message_so_far(&[0, 0, 0, 0, 2, 0x08]), Ok(()));
        assert_eq!(grpc_message_so_far(&framed(&[0x08, 0x01])), Ok(()));
        // A second message, or one announced larger than any health answer: stop.
        let mut two = framed(&[0x08, 0x01]);
        two.push(0);
        assert!(grpc_message_so_far(&two).is_err());
        assert!(grpc_message_so_far(&[0, 0, 1, 0, 0]).is_err());
    }

    #[test]
    fn grpc_check_responses_are_read_strictly() {
        assert_eq!(serving_status(&framed(&[0x08, 0x01])), Some(1));
        assert_eq!(serving_status(&framed(&[0x08, 0x02])), Some(2));
        // The field left out is its default, UNKNOWN; other fields are skipped.
        assert_eq!(serving_status(&framed(&[])), Some(0));
        assert_eq!(
            serving_status(&framed(&[
                0x12, 0x02, b'h', b'i', 0x08, 0x01, 0x1d, 1, 2, 3, 4
            ])),
            Some(1)
        );
        // Compressed, cut short, longer than said, a varint that never ends, a bad wire type.
        assert_eq!(serving_status(&[1, 0, 0, 0, 2, 0x08, 0x01]), None);
        assert_eq!(serving_status(&[0, 0, 0, 0, 3, 0x08, 0x01]), None);
        assert_eq!(serving_status(&[0, 0, 0]), None);
        let mut endless = vec![0x08];
        endless.extend_from_slice(&[0x80; 11]);
        assert_eq!(serving_status(&framed(&endless)), None);
        assert_eq!(serving_status(&framed(&[0x08, 0x80])), None);
        assert_eq!(serving_status(&framed(&[0x0b, 0x01])), None);
        assert_eq!(serving_status(&framed(&[0x12, 0x09, 1])), None);
        let answer = |status: u16, grpc: Option<&str>, body: Vec<u8>| H2Answer {
            status,
            body,
            grpc_status: grpc.map(str::to_owned),
            grpc_message: Some("why".into()),
        };
        assert_eq!(
            grpc_verdict(&answer(200, Some("0"), framed(&[0x08, 0x01]))),
            Ok(())
        );
        assert_eq!(
            grpc_verdict(&answer(200, Some("0"), framed(&[0x08, 0x02]))),
            Err("NOT_SERVING".into())
        );
        assert_eq!(
            grpc_verdict(&answer(200, Some("12"), Vec::new())),
            Err("grpc-status 12: why".into())
        );
        assert_eq!(
            grpc_verdict(&answer(503, None, Vec::new())),
            Err("status 503".into())
        );
        assert_eq!(
            grpc_verdict(&answer(200, None, framed(&[0x08, 0x01]))),
            Err("no grpc-status".into())
        );
    }
}
