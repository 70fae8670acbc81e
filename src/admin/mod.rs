//! The admin listener: a JSON API over the running server, Prometheus metrics and the dashboard.
//!
//! It is a separate HTTP/1.1 server on its own address, off unless `[admin]` is configured.
//! Every API and metrics request needs the bearer token when one is set (the dashboard page
//! itself holds no data and asks for the token). Admin connections are capped and every request
//! has a deadline, so a flood of admin requests costs the data path little: they share the
//! runtime, but never a lock the data path takes per request.
//!
//! Changes made here (drain, enable, weight) are logged at info and override the file until the
//! next reload, which puts the file back in charge. A reload also brings a new `admin.token` in
//! force (while `admin.bind` stays what the listener was bound for).

mod state;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backend::{DISABLED, OVERRIDE_DISABLE, OVERRIDE_DRAIN, OVERRIDE_UNDRAIN};
use crate::config::{AdminConfig, MAX_WEIGHT};
use crate::server::ServerHandle;

/// Admin connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 32;
/// Time an admin request may take, head to response (a reload included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request body accepted (a weight is a few bytes).
const MAX_BODY: usize = 4096;
/// Time a request's body may take to arrive once its head has.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client may take nothing of an answer before its connection is given up.
const WRITE_STALL: Duration = Duration::from_secs(10);

/// The dashboard: one page, no external assets.
const DASHBOARD: &str = include_str!("dashboard.html");
/// What the dashboard may do in a browser: its own inline script and style, requests to this
/// listener only, and no framing (its buttons change the running server).
const DASHBOARD_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; \
    style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Why the admin listener could not start.
/// The reason is part of the message (not a chained source), which names the key to blame as
/// `check` does.
#[derive(Debug, thiserror::Error)]
#[error("admin.bind: {}", crate::listener::bind_failure(*addr, source))]
pub struct AdminError {
    addr: SocketAddr,
    source: std::io::Error,
}

impl AdminError {
    /// Why, without the key (`admin.bind`) it is at.
    pub fn reason(&self) -> String {
        crate::listener::bind_failure(self.addr, &self.source)
    }
}

/// A bound admin listener, not yet serving. Its token is the server's to keep (a reload may
/// bring a new one in force): see [`ServerHandle::admin_token`].
pub struct Admin {
    listener: Arc<TcpListener>,
}

/// The name the admin socket goes by in a binary upgrade's hand-over.
pub const UPGRADE_NAME: &str = "[admin]";

impl Admin {
    /// Binds the admin address.
    pub fn bind(config: &AdminConfig) -> Result<Admin, AdminError> {
        Admin::bind_or_adopt(config, None)
    }

    /// Binds the admin address, or takes the socket an old process handed over.
    pub fn bind_or_adopt(
        config: &AdminConfig,
        inherited: Option<std::os::fd::OwnedFd>,
    ) -> Result<Admin, AdminError> {
        let error = |source| AdminError {
            addr: config.bind,
            source,
        };
        let listener = match inherited {
            None => crate::listener::bind_tcp(config.bind).map_err(error)?,
            Some(fd) => {
                let socket = std::net::TcpListener::from(fd);
                socket.set_nonblocking(true).map_err(error)?;
                TcpListener::from_std(socket).map_err(error)?
            }
        };
        Ok(Admin {
            listener: Arc::new(listener),
        })
    }

    /// The listening socket, for a binary upgrade's hand-over.
    pub fn socket(&self) -> Arc<TcpListener> {
        Arc::clone(&self.listener)
    }

    /// The address it is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown`.
    ///
    /// At the connection cap, a newcomer is not kept waiting by clients that are not in a
    /// request (silent since they connected, part way through a head, or idle between
    /// keep-alive requests): the one connected longest is let go to make room. Only when every
    /// connection is in a request, each bounded by the request deadline, does a newcomer wait.
    ///
    /// At `shutdown` it stops accepting (after a binary upgrade the new process takes the
    /// socket's connections) and closes the connections in no request; a request in service is
    /// answered first, with `Connection: close`. Connections run in `tasks`, which the drain
    /// waits for.
    pub async fn serve(
        self,
        handle: ServerHandle,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let open = Arc::new(Open::default());
        let api = Arc::new(Api { handle });
        match self.listener.local_addr() {
            Ok(addr) => info!(%addr, "admin API listening"),
            Err(error) => info!(%error, "admin API listening (its address is unknown)"),
        }
        loop {
            let (stream, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        debug!(%error, "admin accept failed");
                        continue;
                    }
                },
                () = shutdown.cancelled() => return,
            };
            let permit = loop {
                if let Ok(permit) = Arc::clone(&limit).try_acquire_owned() {
                    break permit;
                }
                let letting_go = open.let_one_go();
                tokio::select! {
                    permit = Arc::clone(&limit).acquire_owned() => match permit {
                        Ok(permit) => break permit,
                        Err(_) => return,
                    },
                    // Every connection was in a request; one has left it since, so it may go.
                    () = open.became_idle.notified(), if !letting_go => continue,
                    () = shutdown.cancelled() => return,
                }
            };
            let conn = open.add();
            let api = Arc::clone(&api);
            let shutdown = shutdown.clone();
            let open = Arc::clone(&open);
            tasks.spawn(async move {
                let _permit = permit;
                let _listed = Listed {
                    open: Arc::clone(&open),
                    id: conn.id,
                };
                let in_service = Arc::clone(&conn);
                let service = hyper::service::service_fn(move |request| {
                    let api = Arc::clone(&api);
                    let guard = InService::start(Arc::clone(&in_service), Arc::clone(&open));
                    async move {
                        let response =
                            tokio::time::timeout(REQUEST_TIMEOUT, api.handle(request)).await;
                        let response = response.unwrap_or_else(|_| {
                            error(StatusCode::GATEWAY_TIMEOUT, "the request took too long")
                        });
                        // In service until hyper has written the body and dropped it.
                        Ok::<_, Infallible>(response.map(|body| Answer {
                            body,
                            _guard: guard,
                        }))
                    }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(WriteStall::new(stream)), service);
                tokio::pin!(connection);
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            debug!(%peer, %error, "admin connection ended");
                        }
                        return;
                    }
                    () = shutdown.cancelled() => {}
                    () = conn.close.cancelled() => {}
                }
                // Let go, for a newcomer or at shutdown. A request in service (one that got in
                // since the connection was chosen, too) is answered first, within its
                // deadline, and the connection closes after it.
                if conn.busy.load(Relaxed) == 0 {
                    debug!(%peer, "admin connection let go");
                    return;
                }
                connection.as_mut().graceful_shutdown();
                if let Err(error) = connection.await {
                    debug!(%peer, %error, "admin connection ended");
                }
            });
        }
    }
}

/// The admin connections open, in the order they came, for the cap to choose one to let go.
#[derive(Default)]
struct Open {
    next: AtomicU64,
    conns: Mutex<BTreeMap<u64, Arc<Conn>>>,
    /// Signalled when a connection leaves its last request: a newcomer waiting at the cap may
    /// take its place.
    became_idle: Notify,
}

/// One admin connection, as the cap sees it.
struct Conn {
    id: u64,
    /// Requests in service on it (one at a time on HTTP/1.1), from the head read to the last
    /// byte of the answer handed to the socket.
    busy: AtomicUsize,
    /// Cancelled to let it go.
    close: CancellationToken,
}

impl Open {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Conn>>> {
        self.conns
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn add(&self) -> Arc<Conn> {
        let id = self.next.fetch_add(1, Relaxed);
        let conn = Arc::new(Conn {
            id,
            busy: AtomicUsize::new(0),
            close: CancellationToken::new(),
        });
        self.lock().insert(id, Arc::clone(&conn));
        conn
    }

    /// Lets go of the oldest connection that is in no request; false when every one is.
    fn let_one_go(&self) -> bool {
        let conns = self.lock();
        let chosen = conns
            .values()
            .find(|c| c.busy.load(Relaxed) == 0 && !c.close.is_cancelled());
        match chosen {
            Some(conn) => {
                conn.close.cancel();
                true
            }
            None => false,
        }
    }
}

/// Takes a connection off [`Open`] when its task ends.
struct Listed {
    open: Arc<Open>,
    id: u64,
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.open.lock().remove(&self.id);
    }
}

/// Counts a request as in service on its connection while it lives.
struct InService {
    conn: Arc<Conn>,
    open: Arc<Open>,
}

impl InService {
    fn start(conn: Arc<Conn>, open: Arc<Open>) -> InService {
        conn.busy.fetch_add(1, Relaxed);
        InService { conn, open }
    }
}

impl Drop for InService {
    fn drop(&mut self) {
        if self.conn.busy.fetch_sub(1, Relaxed) == 1 {
            self.open.became_idle.notify_one();
        }
    }
}

/// An answer's body, which keeps its request counted as in service until hyper has written it.
struct Answer {
    body: Full<Bytes>,
    _guard: InService,
}

impl hyper::body::Body for Answer {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A connection whose writes fail once the client has taken nothing for [`WRITE_STALL`]: a
/// client that asks for a large answer (the metrics of thousands of backends are megabytes) and
/// never reads it must not hold one of the few admin connections, and the answer's memory,
/// for ever. Reads need no such guard: hyper times out a request head, and [`read_body`] a
/// body.
struct WriteStall<S> {
    inner: S,
    /// Armed when a write could not go on, disarmed by any progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteStall<S> {
    fn new(inner: S) -> Self {
        WriteStall {
            inner,
            stalled: None,
        }
    }

    /// What a write that made progress (`Ready`) or none (`Pending`) becomes.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_STALL)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took nothing of the answer",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteStall<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteStall<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, poll)
    }
}

/// The API's state: the server.
struct Api {
    handle: ServerHandle,
}

impl Api {
    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        // The token in force: the one the listener was bound with, or a reload's.
        let token = self.handle.admin_token();
        let path = request.uri().path().to_owned();
        let method = request.method().clone();
        if path == "/" || path == "/index.html" {
            return if method == Method::GET || method == Method::HEAD {
                let mut page =
                    respond(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD.into());
                let headers = page.headers_mut();
                headers.insert(
                    header::CONTENT_SECURITY_POLICY,
                    header::HeaderValue::from_static(DASHBOARD_CSP),
                );
                headers.insert(
                    header::X_CONTENT_TYPE_OPTIONS,
                    header::HeaderValue::from_static("nosniff"),
                );
                page
            } else {
                method_not_allowed("GET, HEAD")
            };
        }
        // Without a token, only names that cannot be rebound to another site's address: a page
        // of a site whose name was pointed at loopback (DNS rebinding) is not served data.
        if token.is_none() && !loopback_host(&request) {
            return error(
                StatusCode::FORBIDDEN,
                "without admin.token, the API answers only to an IP address or localhost in Host",
            );
        }
        if method != Method::GET && method != Method::HEAD && !same_origin(&request) {
            return error(
                StatusCode::FORBIDDEN,
                "a change requested by a page of another origin is refused",
            );
        }
        match authorize(token.as_deref().map(String::as_str), &request) {
            Auth::Granted => {}
            Auth::Missing => {
                return unauthorized(
                    "a bearer token is required: Authorization: Bearer <admin.token>",
                    "Bearer realm=\"switchyard\"",
                );
            }
            Auth::Invalid => {
                return unauthorized(
                    "the bearer token is not admin.token",
                    "Bearer realm=\"switchyard\", error=\"invalid_token\"",
                );
            }
        }
        let segments: Vec<String> = path
            .trim_start_matches('/')
            .split('/')
            .map(percent_decode)
            .collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        match (&method, segments.as_slice()) {
            (&Method::GET | &Method::HEAD, ["metrics"]) => {
                match self.render(crate::metrics::render).await {
                    Some(text) => respond(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        text,
                    ),
                    None => error(StatusCode::INTERNAL_SERVER_ERROR, "no metrics"),
                }
            }
            (&Method::GET | &Method::HEAD, ["api", "state"]) => {
                match self.render(|h| state::state(h).to_string()).await {
                    Some(text) => respond(StatusCode::OK, "application/json", text),
                    None => error(StatusCode::INTERNAL_SERVER_ERROR, "no state"),
                }
            }
            (&Method::POST, ["api", "reload"]) => self.reload().await,
            (&Method::POST, ["api", "pools", pool, "backends", address, action])
                if *action != "weight" =>
            {
                self.backend_action(pool, address, action).await
            }
            (&Method::PUT, ["api", "pools", pool, "backends", address, "weight"]) => {
                if let Some(refused) = not_json(&request) {
                    return refused;
                }
                let body = match read_body(request).await {
                    Ok(body) => body,
                    Err(response) => return response,
                };
                self.set_weight(pool, address, &body).await
            }
            (_, ["metrics"] | ["api", "state"]) => method_not_allowed("GET, HEAD"),
            (_, ["api", "reload"]) => method_not_allowed("POST"),
            (_, ["api", "pools", _, "backends", _, "weight"]) => method_not_allowed("PUT"),
            (_, ["api", "pools", _, "backends", _, _]) => method_not_allowed("POST"),
            _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
        }
    }

    /// Renders an answer that grows with the configuration (megabytes of metrics for thousands
    /// of backends) on a blocking thread, not on one that serves traffic.
    async fn render(&self, render: fn(&ServerHandle) -> String) -> Option<String> {
        let handle = self.handle.clone();
        tokio::task::spawn_blocking(move || render(&handle))
            .await
            .ok()
    }

    async fn reload(&self) -> Response<Full<Bytes>> {
        info!("admin: reload requested");
        // On a task of its own: a client that leaves, or the request deadline, stops only the
        // wait for the answer. Dropped halfway, a reload would never end: never applied nor
        // counted nor logged, and the service manager told RELOADING=1 with no READY=1 after.
        let handle = self.handle.clone();
        let Ok(result) = tokio::spawn(async move { handle.reload_file().await }).await else {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "the reload failed");
        };
        match result {
            Ok(summary) => json(
                StatusCode::OK,
                &serde_json::json!({
                    "generation": summary.generation,
                    "updated": summary.updated,
                    "started": summary.started,
                    "stopped": summary.stopped,
                }),
            ),
            Err(crate::server::ServerError::NoFile) => error(
                StatusCode::CONFLICT,
                "this server was not started from a file, so there is nothing to reload",
            ),
            // Not the file's fault: the process is draining and takes no new configuration.
            Err(crate::server::ServerError::ShuttingDown) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting down: no configuration is applied any more",
            ),
            Err(reason) => error(StatusCode::UNPROCESSABLE_ENTITY, &reason.to_string()),
        }
    }

    /// The state of backend `address` of pool `pool` in the running configuration.
    fn backend(&self, pool: &str, address: &str) -> Result<Found, Box<Response<Full<Bytes>>>> {
        let snapshot = self.handle.snapshot();
        let Some(found) = snapshot.pool(pool) else {
            let mut names: Vec<&str> = snapshot.pools.keys().map(String::as_str).collect();
            names.sort_unstable();
            return Err(Box::new(error(
                StatusCode::NOT_FOUND,
                &format!(
                    "no pool `{pool}` in the running configuration (pools: {})",
                    names.join(", ")
                ),
            )));
        };
        let state = found
            .candidates
            .iter()
            .find(|c| c.state.addr.to_string() == address)
            .map(|c| Arc::clone(&c.state));
        match state {
            Some(state) => Ok((Arc::clone(found), state)),
            None => Err(Box::new(error(
                StatusCode::NOT_FOUND,
                &format!(
                    "pool `{pool}` has no backend `{address}` (backends, as ip:port: {})",
                    found
                        .candidates
                        .iter()
                        .map(|c| c.state.addr.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ))),
        }
    }

    /// Applies `action` between reloads (see [`ServerHandle::between_reloads`]), on a task of
    /// its own so that a client that leaves does not decide whether it happens.
    async fn backend_action(
        &self,
        pool: &str,
        address: &str,
        action: &str,
    ) -> Response<Full<Bytes>> {
        let api = Api {
            handle: self.handle.clone(),
        };
        let (pool, address, action) = (pool.to_owned(), address.to_owned(), action.to_owned());
        let applied = tokio::spawn(async move {
            api.handle
                .between_reloads(|| api.apply_action(&pool, &address, &action))
                .await
        });
        applied
            .await
            .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "the change failed"))
    }

    fn apply_action(&self, pool: &str, address: &str, action: &str) -> Response<Full<Bytes>> {
        let (found, state) = match self.backend(pool, address) {
            Ok(found) => found,
            Err(response) => return *response,
        };
        match action {
            "drain" => {
                state.start_drain(found.drain_timeout);
                state.set_override(OVERRIDE_DRAIN, OVERRIDE_UNDRAIN);
            }
            "undrain" => {
                state.end_drain();
                state.set_override(OVERRIDE_UNDRAIN, OVERRIDE_DRAIN);
            }
            "disable" => {
                state.set_flag(DISABLED);
                state.set_override(OVERRIDE_DISABLE, 0);
            }
            "enable" => {
                state.clear_flag(DISABLED);
                state.set_override(0, OVERRIDE_DISABLE);
            }
            other => {
                return error(
                    StatusCode::NOT_FOUND,
                    &format!("unknown action `{other}` (drain, undrain, enable, disable)"),
                );
            }
        }
        info!(%pool, backend = %address, %action, "admin: backend changed (until the next reload)");
        json(
            StatusCode::OK,
            &state::backend(&found, &state, found_weight(&found, &state)),
        )
    }

    async fn set_weight(&self, pool: &str, address: &str, body: &[u8]) -> Response<Full<Bytes>> {
        let (_, state) = match self.backend(pool, address) {
            Ok(found) => found,
            Err(response) => return *response,
        };
        let weight = match parse_weight(body) {
            Ok(weight) => weight,
            Err(reason) => return error(StatusCode::BAD_REQUEST, &reason),
        };
        // The override and the pool built with it, on a task of its own: a client that leaves
        // halfway must not leave an override that the pool in force does not have.
        let (handle, name, backend) = (self.handle.clone(), pool.to_owned(), Arc::clone(&state));
        let applied = tokio::spawn(async move { handle.set_weight(&name, &backend, weight).await });
        match applied.await {
            Ok(Ok(())) => {}
            Ok(Err(crate::server::ServerError::ShuttingDown)) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting down: no configuration is applied any more",
                );
            }
            Ok(Err(_)) | Err(_) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the weight change failed",
                );
            }
        }
        info!(%pool, backend = %address, weight, "admin: backend weight set (until the next reload)");
        let snapshot = self.handle.snapshot();
        match snapshot.pool(pool) {
            Some(found) => json(
                StatusCode::OK,
                &state::backend(found, &state, found_weight(found, &state)),
            ),
            None => error(StatusCode::NOT_FOUND, "the pool went away"),
        }
    }
}

/// A backend found by the API: its pool in the running configuration, and its state.
type Found = (Arc<crate::pool::Pool>, Arc<crate::backend::BackendState>);

/// The weight a backend has in the pool now.
fn found_weight(pool: &crate::pool::Pool, state: &Arc<crate::backend::BackendState>) -> u32 {
    pool.candidates
        .iter()
        .find(|c| Arc::ptr_eq(&c.state, state))
        .map_or(0, |c| c.weight)
}

/// Whether the request's Host is an IP literal or `localhost` (with or without a port).
fn loopback_host<B>(request: &Request<B>) -> bool {
    let Some(host) = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
    else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => {
            return v6
                .split(']')
                .next()
                .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
        }
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// Whether a request that changes something may come from where it says it comes from: a browser
/// names the page's origin in `Origin`, and a page of another site (which could otherwise post
/// to a loopback admin API without a token) does not get to drain backends. Requests without
/// `Origin` (curl, scripts) pass.
fn same_origin<B>(request: &Request<B>) -> bool {
    let Some(origin) = request.headers().get(header::ORIGIN) else {
        return true;
    };
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    let origin = origin.to_str().ok().and_then(|o| o.strip_prefix("http://"));
    matches!((origin, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

/// Whether the request carries `token` (always granted when there is none). The scheme's name
/// is taken in any case (RFC 9110, section 11.1); the token is compared in constant time.
fn authorize<B>(token: Option<&str>, request: &Request<B>) -> Auth {
    let Some(token) = token else {
        return Auth::Granted;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| {
            let v = v.as_bytes();
            let space = v.iter().position(|&b| b == b' ')?;
            Some((&v[..space], &v[space + 1..]))
        })
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(b"bearer"))
        .map(|(_, credentials)| credentials.trim_ascii());
    match given {
        None => Auth::Missing,
        Some(given) if same_secret(given, token.as_bytes()) => Auth::Granted,
        Some(_) => Auth::Invalid,
    }
}

/// What the `Authorization` header of a request says.
enum Auth {
    /// The token, or no token is configured.
    Granted,
    /// No bearer token (no header, or another scheme).
    Missing,
    /// A bearer token that is not the one configured.
    Invalid,
}

/// Whether `given` is `token`, in a time that depends on the length of `given` (which the
/// client knows) but on nothing of the token's: neither its bytes nor its length.
fn same_secret(given: &[u8], token: &[u8]) -> bool {
    if token.is_empty() {
        return false;
    }
    let mut differ = u8::from(given.len() != token.len());
    for (i, &byte) in given.iter().enumerate() {
        differ |= byte ^ token[i % token.len()];
    }
    std::hint::black_box(differ) == 0
}

/// A 401 with its challenge (RFC 6750, section 3).
fn unauthorized(reason: &str, challenge: &'static str) -> Response<Full<Bytes>> {
    let mut response = error(StatusCode::UNAUTHORIZED, reason);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static(challenge),
    );
    response
}

/// A 415 for a body that says it is something other than JSON. A body without a type is taken
/// as JSON, and so is any `…+json`, and so is `application/x-www-form-urlencoded`, which curl
/// sends for `-d` and `--data-binary` unless told otherwise: refusing it would refuse the
/// commonest way to set a weight by hand, and would guard nothing (a page of another origin is
/// refused already, and a form cannot send PUT).
fn not_json<B>(request: &Request<B>) -> Option<Response<Full<Bytes>>> {
    let value = request.headers().get(header::CONTENT_TYPE)?;
    let media = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media == "application/json"
        || media.ends_with("+json")
        || media == "application/x-www-form-urlencoded"
    {
        return None;
    }
    Some(error(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        &format!(
            "the body is JSON: send it with Content-Type: application/json, not `{}`",
            String::from_utf8_lossy(value.as_bytes())
        ),
    ))
}

/// `{"weight": N}` or a bare `N`, with N from 1 to [`MAX_WEIGHT`]; else why not, in words an
/// operator at a terminal can act on.
pub(crate) fn parse_weight(body: &[u8]) -> Result<u32, String> {
    let shape = || {
        format!("the body must be {{\"weight\": N}} (or a bare N) with N from 1 to {MAX_WEIGHT}")
    };
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| format!("the body is not JSON ({e}); {}", shape()))?;
    let n = match value {
        serde_json::Value::Number(n) => n,
        serde_json::Value::Object(mut object) => {
            if let Some(key) = object.keys().find(|k| *k != "weight") {
                return Err(format!("unknown key `{key}`: {}", shape()));
            }
            match object.remove("weight") {
                Some(serde_json::Value::Number(n)) => n,
                Some(other) => {
                    return Err(format!(
                        "`weight` must be a whole number from 1 to {MAX_WEIGHT}, not {other}"
                    ));
                }
                None => return Err(shape()),
            }
        }
        _ => return Err(shape()),
    };
    let out_of_range = || format!("weight {n} is out of range: a weight is 1 to {MAX_WEIGHT}");
    if let Some(weight) = n.as_u64() {
        return u32::try_from(weight)
            .ok()
            .filter(|w| (1..=MAX_WEIGHT).contains(w))
            .ok_or_else(out_of_range);
    }
    match n.as_f64() {
        // Negative, or too large for u64 (serde_json reads those as floats).
        Some(f) if n.is_i64() || (f.is_finite() && f.fract() == 0.0) => Err(out_of_range()),
        _ => Err(format!(
            "`weight` must be a whole number from 1 to {MAX_WEIGHT}, not {n}"
        )),
    }
}

/// Reads a small request body, within [`BODY_TIMEOUT`]: a client that stops sending it does
/// not hold one of the admin listener's few connections for the whole request deadline.
async fn read_body(request: Request<Incoming>) -> Result<Bytes, Response<Full<Bytes>>> {
    let body = Limited::new(request.into_body(), MAX_BODY).collect();
    match tokio::time::timeout(BODY_TIMEOUT, body).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the body is larger than {MAX_BODY} bytes"),
        )),
        Ok(Err(_)) => Err(error(StatusCode::BAD_REQUEST, "the body is broken")),
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            &format!(
                "the body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// `%XX` escapes decoded (an IPv6 backend address may arrive as `%5B::1%5D:80`).
pub(crate) fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = segment.get(i + 1..i + 3)
            // `from_str_radix` would take a sign too: `%+1` is no escape.
            && hex.bytes().all(|b| b.is_ascii_hexdigit())
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", value.to_string())
}

/// A 405 that names the methods the path takes, in `Allow` (RFC 9110 section 15.5.6) and in
/// the reason, so that a client using the wrong one learns which is right rather than that the
/// path does not exist.
fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("wrong method for this path: use {allow}"),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    response
}

/// An error as JSON: `{"error": reason}`.
fn error(status: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    if status.is_server_error() {
        warn!(%status, reason, "admin request failed");
    }
    json(status, &serde_json::json!({ "error": reason }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_and_paths() {
        assert_eq!(parse_weight(b"{\"weight\": 7}"), Ok(7));
        assert_eq!(parse_weight(b"12"), Ok(12));
        assert!(parse_weight(b"{\"weight\": -1}").is_err());
        assert!(parse_weight(b"nonsense").is_err());
        assert!(same_secret(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same_secret(b"0123456789abcdeF", b"0123456789abcdef"));
        assert!(!same_secret(
            b"0123456789abcdef0123456789abcdef",
            b"0123456789abcdef"
        ));
        assert!(!same_secret(b"", b"0123456789abcdef"));
        assert!(!same_secret(b"", b""));
        assert_eq!(percent_decode("%5B%3A%3A1%5D%3A80"), "[::1]:80");
        assert_eq!(percent_decode("10.0.0.1:80"), "10.0.0.1:80");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        // Two hex digits make an escape; a sign is not one.
        assert_eq!(percent_decode("%+1%-0%+f"), "%+1%-0%+f");
    }

    #[test]
    fn only_address_hosts_without_a_token() {
        let request = |host: &str| {
            Request::builder()
                .header(header::HOST, host)
                .body(())
                .expect("request")
        };
        for good in [
            "127.0.0.1:9901",
            "localhost:9901",
            "localhost",
            "[::1]:9901",
            "10.0.0.1",
        ] {
            assert!(loopback_host(&request(good)), "{good}");
        }
        for bad in [
            "evil.example:9901",
            "evil.example",
            "[evil]:1",
            "127.0.0.1.nip.io",
        ] {
            assert!(!loopback_host(&request(bad)), "{bad}");
        }
    }

    #[test]
    fn changes_from_other_origins_are_refused() {
        let request = |origin: Option<&str>| {
            let mut builder = Request::builder().header(header::HOST, "127.0.0.1:9901");
            if let Some(origin) = origin {
                builder = builder.header(header::ORIGIN, origin);
            }
            builder.body(()).unwrap()
        };
        assert!(same_origin(&request(None)));
        assert!(same_origin(&request(Some("http://127.0.0.1:9901"))));
        assert!(!same_origin(&request(Some("http://127.0.0.1:9902"))));
        assert!(!same_origin(&request(Some("https://evil.example"))));
        assert!(!same_origin(&request(Some("null"))));
    }
}
