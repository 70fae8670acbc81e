//! Configuration: the TOML file in, a validated [`Config`] out.
//!
//! Loading happens in two stages. [`raw`] holds serde structs that mirror the file; `validate`
//! turns them into the runtime types below (`SocketAddr`, `Duration`, enums) and collects *every*
//! problem it finds, each with the key path that caused it, so one run of `switchyard check`
//! shows all that is wrong. Only this module knows TOML; everything after it sees typed values.

mod error;
mod raw;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::{ConfigError, Problem};
pub use ipnet::IpNet;

/// How long open connections may run on after a shutdown signal before they are closed.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent connections one listener accepts before it stops accepting.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Idle time after which a forwarded TCP connection is closed (NGINX stream uses 10 minutes).
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Idle time after which a UDP session is forgotten.
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent UDP sessions (distinct client addresses) one listener keeps.
pub const DEFAULT_MAX_SESSIONS: usize = 10_000;
/// Time allowed for a TCP connect to a backend.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Backends one client connection may try before the proxy gives up on it.
pub const DEFAULT_CONNECT_ATTEMPTS: usize = 3;
/// The most backends one connection may try; `connect_attempts` above it is an error.
pub const MAX_CONNECT_ATTEMPTS: usize = 16;
/// Time a peer has to deliver its PROXY protocol header.
pub const DEFAULT_PROXY_PROTOCOL_TIMEOUT: Duration = Duration::from_secs(5);
/// Whether tcp listeners forward with splice(2), and http listeners move long bodies with it.
/// On loopback splice moved as much as copying through user space at less CPU: see
/// bench/README.md.
pub const DEFAULT_SPLICE: bool = true;
/// Time an http client has to send a whole request head, once its first byte arrived
/// (slowloris defence).
pub const DEFAULT_CLIENT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle keep-alive http client connection is kept.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an idle connection (http client, or forwarded tcp) keeps its own task before it is
/// parked: long enough that a client in the middle of a page load (requests a few milliseconds
/// apart) is never parked, short enough that most idle connections cost a slot of about a
/// hundred bytes rather than a task and poller registrations (1.3–1.4 KiB).
pub const DEFAULT_PARK_IDLE_AFTER: Duration = Duration::from_millis(250);
/// Time a backend has to start its response (and the most it may pause within one).
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle keep-alive connections kept per backend of an http pool.
pub const DEFAULT_KEEPALIVE_CONNECTIONS: usize = 128;
/// How long an idle keep-alive connection to a backend is kept.
pub const DEFAULT_UPSTREAM_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time a client has to complete a TLS handshake (a stalled one is closed after it).
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client of an SNI-routed tcp listener has to send its whole ClientHello.
pub const DEFAULT_CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest weight of one pool in a route's weighted split.
pub const MAX_SPLIT_WEIGHT: u32 = 10_000;
/// Default maglev table size (a prime; the Maglev paper's own example size).
pub const DEFAULT_MAGLEV_TABLE_SIZE: usize = 65_537;
/// The most points a ring may hold (16 bytes each).
pub const MAX_RING_POINTS: u64 = 1 << 22;
/// Default ring_hash points per backend (ketama places 160 per server).
pub const DEFAULT_RING_VNODES: u32 = 160;
/// The largest maglev table: 2^24 entries of 4 bytes each.
pub const MAX_MAGLEV_TABLE_SIZE: usize = 1 << 24;
/// Default sticky cookie lifetime.
pub const DEFAULT_STICKY_TTL: Duration = Duration::from_secs(3600);
/// Default time between health probes of one backend.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Default time one health probe may take.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Default consecutive successes that bring a backend back (HAProxy's default).
pub const DEFAULT_HEALTH_RISE: u32 = 2;
/// Default consecutive failures that take a backend down (HAProxy's default).
pub const DEFAULT_HEALTH_FALL: u32 = 3;
/// Default failures in a row that eject a backend (Envoy's default).
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
/// Default length of a first ejection (Envoy's default).
pub const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
/// Default cap on one ejection (Envoy's default).
pub const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
/// Default share of a pool that may be ejected at once.
pub const DEFAULT_MAX_EJECTED_PERCENT: u32 = 50;
/// Default longest wait in a pool's queue.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time to finish work on a backend that is drained.
pub const DEFAULT_BACKEND_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often host names of backends with `resolve = true` are looked up again (HAProxy's
/// resolvers hold answers for 10s, Envoy's STRICT_DNS refreshes every 5s; names behind a
/// deployment change less often than that, and each lookup is a query to every resolver).
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// The shortest `resolve_interval`: more often would only load the resolvers.
pub const MIN_RESOLVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a name keeps its addresses once the resolvers say it has none (HAProxy's `hold nx`
/// default): long enough to ride out a record that is briefly missing while it is replaced,
/// short enough that addresses a deleted service left, which may soon belong to something
/// else, stop taking traffic.
pub const DEFAULT_RESOLVE_HOLD: Duration = Duration::from_secs(30);
/// The largest backend weight. It bounds the precomputed smooth round-robin sequence.
pub const MAX_WEIGHT: u32 = 256;

/// A validated configuration: every name resolved, every value typed.
#[derive(Debug, Clone)]
pub struct Config {
    /// Process-wide settings.
    pub global: GlobalConfig,
    /// Listeners in file order.
    pub listeners: Vec<ListenerConfig>,
    /// Pools by name; every pool a listener or route names is here.
    pub pools: BTreeMap<String, PoolConfig>,
    /// The admin API, metrics and dashboard; off when absent.
    pub admin: Option<AdminConfig>,
}

/// `[admin]`: where the admin API listens and the token it wants.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Where to listen.
    pub bind: SocketAddr,
    /// Bearer token every API and metrics request must carry; required off loopback.
    pub token: Option<String>,
}

/// Without the token: a configuration printed into a log or a panic message must not hand out
/// the key to the admin API.
impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("bind", &self.bind)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// `access_log = { path, format }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogConfig {
    /// Where lines go.
    pub target: AccessLogTarget,
    /// How they are written.
    pub format: AccessLogFormat,
}

/// An access log's destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AccessLogTarget {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// A file, appended to and reopened on SIGUSR1.
    File(std::path::PathBuf),
}

/// An access log's line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// One JSON object per line.
    Json,
    /// The NGINX/Apache combined format, plus the request id and the time in milliseconds.
    Combined,
}

/// `[global]`: settings that belong to the process, not to a listener.
#[derive(Debug, Clone)]
pub struct GlobalConfig {
    /// How long open connections may finish after SIGTERM/SIGINT.
    pub drain_timeout: Duration,
    /// Where `resolve = true` names are looked up: the file's `resolvers`, else the system's
    /// (empty when no backend needs them).
    pub resolvers: Vec<SocketAddr>,
    /// How often `resolve = true` names are looked up again.
    pub resolve_interval: Duration,
    /// How long a `resolve = true` name keeps its last addresses once the resolvers answer
    /// that it has none (no such name, no record, or only addresses no backend can have).
    pub resolve_hold: Duration,
    /// How `resolve = true` names are completed: the file's `search` and `ndots`, else those
    /// of the system's resolv.conf (no search when no backend needs it), so that short names
    /// resolve as they do for the host's other programs.
    pub search: crate::dns::Search,
}

/// One listener: an address, a protocol and where its traffic goes.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Unique name, used in logs and (later) metrics.
    pub name: String,
    /// Where to listen. Port 0 asks the kernel for a free port (tests and demos use it).
    pub bind: SocketAddr,
    /// Cap on concurrent connections; past it the listener stops accepting until one closes.
    pub max_connections: usize,
    /// Whether (and from whom) a PROXY protocol header is expected before the payload.
    pub proxy_protocol: Option<ProxyProtocolAccept>,
    /// TLS terminated on this listener (tcp and http), if any.
    pub tls: Option<ListenerTls>,
    /// Which clients are served: a tcp connection from others is closed at once, a udp
    /// datagram dropped, an http request answered 403.
    pub access: crate::access::AccessList,
    /// What kind of listener this is, with the settings that only make sense for that kind.
    pub kind: ListenerKind,
}

/// The protocol-specific part of a listener.
#[derive(Debug, Clone)]
pub enum ListenerKind {
    /// Layer 4 TCP: bytes forwarded to one pool.
    Tcp(TcpSettings),
    /// Layer 4 UDP: datagrams forwarded per client session to one pool.
    Udp(UdpSettings),
    /// Layer 7 HTTP: requests routed by content (boxed: it is by far the largest variant).
    Http(Box<HttpSettings>),
}

/// Settings of a `protocol = "tcp"` listener.
#[derive(Debug, Clone)]
pub struct TcpSettings {
    /// The pool every connection goes to.
    pub pool: String,
    /// A connection with no bytes moving either way for this long is closed.
    pub idle_timeout: Duration,
    /// Forward with splice(2) (kernel-side, no copy through user space) instead of read/write.
    pub splice: bool,
    /// TLS passthrough: the pool is chosen by the ClientHello's server name, first match wins;
    /// `pool` is the default. Empty: no ClientHello is read.
    pub sni_routes: Vec<SniRoute>,
    /// Time a client of an SNI-routed listener has to send its whole ClientHello.
    pub client_hello_timeout: Duration,
    /// How long no byte moves either way before a forwarded connection is parked; `None`:
    /// never parked.
    pub park_idle_after: Option<Duration>,
    /// One line per connection, when configured.
    pub access_log: Option<AccessLogConfig>,
    /// New connections per client address; past it a connection is closed as it is accepted.
    pub rate_limit: Option<RateLimit>,
}

/// `rate_limit`: how often one client may be served, as a token bucket (GCRA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests (or connections) per `per` at the sustained rate.
    pub rate: u32,
    /// The period `rate` is counted over.
    pub per: Duration,
    /// How many more a client that has been quiet may send at once, beyond the first.
    pub burst: u32,
    /// What one bucket belongs to.
    pub key: RateKey,
}

/// Whose bucket a request is counted in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateKey {
    /// The client's address (the one a PROXY protocol header names, when there is one).
    ClientIp,
    /// The value of this request header (lower-cased name); requests without it are counted by
    /// their client's address.
    Header(String),
}

/// The largest `rate_limit.rate`.
pub const MAX_RATE_LIMIT_RATE: u32 = 1_000_000;
/// The largest `rate_limit.burst`.
pub const MAX_RATE_LIMIT_BURST: u32 = 100_000;
/// The shortest `rate_limit.per`: with `MAX_RATE_LIMIT_RATE`, one request a nanosecond.
pub const MIN_RATE_LIMIT_PER: Duration = Duration::from_millis(1);
/// The longest `rate_limit.per`.
pub const MAX_RATE_LIMIT_PER: Duration = Duration::from_secs(86_400);
/// Default `rate_limit.per`.
pub const DEFAULT_RATE_LIMIT_PER: Duration = Duration::from_secs(1);

/// One entry of a tcp listener's `sni_routes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniRoute {
    /// The server name: exact or `*.suffix` (a prefix wildcard means nothing for names).
    pub sni: HostPattern,
    /// Where connections naming it go.
    pub pool: String,
}

/// TLS termination on a listener. Only paths are kept here: the files are read by
/// `tls::TlsStore::build`, so that a reload can read them again.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    /// Key path of this table in the file (`listeners[0].tls`), for problems found in the files.
    pub at: String,
    /// Certificate chains with their keys; the first is the default when SNI names none.
    pub certificates: Vec<CertificateFiles>,
    /// CAs that sign client certificates: mutual TLS.
    pub client_ca: Option<PathBuf>,
    /// Whether a client certificate is required or only verified when given.
    pub client_auth: ClientAuth,
    /// Time a client has to complete its handshake.
    pub handshake_timeout: Duration,
}

/// A certificate chain and its private key, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    /// Leaf first, then intermediates.
    pub cert: PathBuf,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Whether clients of a mutual-TLS listener must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// The handshake fails without a valid client certificate.
    Required,
    /// A certificate, when given, must be valid; clients without one are served too.
    Optional,
}

/// TLS toward a pool's backends.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// Key path of this table in the file (`pools.web.tls`).
    pub at: String,
    /// Name sent as SNI and checked against the backend's certificate; `None`: the backend's IP.
    pub sni: Option<String>,
    /// CAs trusted for the backends' certificates.
    pub ca: Option<PathBuf>,
    /// Verify the backend's certificate (only `verify = false` written out turns it off).
    pub verify: bool,
    /// A client certificate presented to the backends.
    pub client_certificate: Option<CertificateFiles>,
}

/// Settings of a `protocol = "udp"` listener.
#[derive(Debug, Clone)]
pub struct UdpSettings {
    /// The pool every session goes to.
    pub pool: String,
    /// A session with no datagram either way for this long is forgotten.
    pub idle_timeout: Duration,
    /// Cap on concurrent sessions; datagrams from new clients past it are dropped.
    pub max_sessions: usize,
    /// Where a line goes for each session that ends.
    pub access_log: Option<AccessLogConfig>,
}

/// Settings of a `protocol = "http"` listener.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Routes in file order; the first that matches wins.
    pub routes: Vec<RouteConfig>,
    /// Where requests go when no route matches; without it, no match is a 404.
    pub default_pool: Option<String>,
    /// Peers whose X-Forwarded-For is extended rather than replaced.
    pub trusted_proxies: Vec<IpNet>,
    /// Time a client has to send a whole request head once it started.
    pub client_header_timeout: Duration,
    /// How long an idle keep-alive client connection is kept.
    pub keepalive_timeout: Duration,
    /// How long an idle plain client connection waits in its own task before it is parked;
    /// `None`: never parked.
    pub park_idle_after: Option<Duration>,
    /// Largest request body accepted (413 beyond it); `None`: no limit.
    pub max_body_size: Option<u64>,
    /// Add an RFC 7239 `Forwarded` field to requests (the X-Forwarded-* fields are always set).
    pub forwarded_header: bool,
    /// An HTTP/1.1 client whose connection ends (end of stream or reset) while its response is
    /// awaited has its request given up (499): a client that left would otherwise hold a
    /// backend connection, and the backend's work, up to the response timeout.
    pub abort_on_close: bool,
    /// Move long `Content-Length` bodies between plain TCP sockets with splice(2) rather than
    /// through a user-space buffer.
    pub splice: bool,
    /// Modification rules for every request of the listener (applied before a route's own).
    pub rules: Rules,
    /// One line per request, when configured.
    pub access_log: Option<AccessLogConfig>,
    /// Requests per client for the whole listener (429 past it), checked before routing.
    pub rate_limit: Option<RateLimit>,
}

/// Changes made to requests and responses on the way through, parsed at load time.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// Header changes on the request sent upstream.
    pub request_headers: HeaderRules,
    /// Header changes on the response sent to the client.
    pub response_headers: HeaderRules,
    /// Path rewrite (the query is kept).
    pub rewrite: Option<Rewrite>,
    /// Host sent upstream instead of the client's.
    pub host_rewrite: Option<String>,
    /// Answer with a redirect instead of proxying.
    pub redirect: Option<Redirect>,
    /// Attributes added to each Set-Cookie that lacks them (`Secure`, `HttpOnly`, `SameSite=Lax`).
    pub cookie_flags: Vec<String>,
    /// Response compression; a route's replaces the listener's.
    pub compression: Option<Compression>,
}

/// Response compression settings.
#[derive(Debug, Clone)]
pub struct Compression {
    /// Encodings offered, in order of preference (ties in Accept-Encoding go to the first).
    pub algorithms: Vec<Encoding>,
    /// Responses with a known length below this are sent as they are.
    pub min_size: u64,
    /// Content types compressed: `text/html` or `text/*`.
    pub types: Vec<String>,
}

/// Default `compression.min_size`: below about a kilobyte, headers outweigh the savings.
pub const DEFAULT_COMPRESSION_MIN_SIZE: u64 = 1024;
/// Default `compression.types`: text formats that compress well.
pub const DEFAULT_COMPRESSION_TYPES: [&str; 7] = [
    "text/*",
    "application/json",
    "application/javascript",
    "application/xml",
    "application/wasm",
    "image/svg+xml",
    "application/manifest+json",
];

/// A content coding the proxy can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `gzip`.
    Gzip,
    /// `br`.
    Brotli,
    /// `zstd`.
    Zstd,
}

impl Encoding {
    /// The token used in Accept-Encoding and Content-Encoding.
    pub fn token(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Brotli => "br",
            Encoding::Zstd => "zstd",
        }
    }
}

impl Rules {
    /// Whether no rule is set (the common case, which then costs nothing per request).
    pub fn is_empty(&self) -> bool {
        self.request_headers.is_empty()
            && self.response_headers.is_empty()
            && self.rewrite.is_none()
            && self.host_rewrite.is_none()
            && self.redirect.is_none()
            && self.cookie_flags.is_empty()
            && self.compression.is_none()
    }
}

/// Header changes: `remove` drops fields, `set` replaces them, `add` appends.
#[derive(Debug, Clone, Default)]
pub struct HeaderRules {
    /// Fields appended, keeping any of the same name.
    pub add: Vec<(String, String)>,
    /// Fields replacing all of the same name.
    pub set: Vec<(String, String)>,
    /// Lower-cased names of fields removed.
    pub remove: Vec<String>,
}

impl HeaderRules {
    /// Whether there is nothing to change.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.set.is_empty() && self.remove.is_empty()
    }
}

/// A rewrite of the request path.
#[derive(Debug, Clone)]
pub enum Rewrite {
    /// Remove `strip` from the front (when present), then put `add` in front.
    Prefix {
        /// Prefix removed.
        strip: Option<String>,
        /// Prefix added.
        add: Option<String>,
    },
    /// Replace the first match of `regex` with `replace` (`$1`, `${name}` refer to groups).
    Regex {
        /// What to find.
        regex: regex::Regex,
        /// What to put instead.
        replace: String,
    },
}

/// A redirect answered by the proxy itself.
#[derive(Debug, Clone)]
pub struct Redirect {
    /// Location template; `{host}` is the request's host (without port), `{path}` its path and
    /// query.
    pub to: String,
    /// 301, 302, 307 or 308.
    pub status: u16,
}

/// One route of an http listener.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// The route's `name`, when the file gives one.
    pub name: Option<String>,
    /// Conditions that must all hold.
    pub matcher: RouteMatch,
    /// Where matching requests go; `None` only for a route that redirects.
    pub target: Option<RouteTarget>,
    /// Modification rules of this route, applied after the listener's.
    pub rules: Rules,
    /// Clients this route serves (others get 403), on top of the listener's list.
    pub access: crate::access::AccessList,
    /// Requests per client for this route, on top of the listener's limit.
    pub rate_limit: Option<RateLimit>,
}

impl RouteConfig {
    /// What metrics, access logs and the admin API call the route at position `index`: its
    /// name, or else its position. A named route's counters follow it when a reload moves it.
    pub fn label(&self, index: usize) -> String {
        self.name.clone().unwrap_or_else(|| index.to_string())
    }
}

/// Where a route sends requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteTarget {
    /// Always this pool.
    Pool(String),
    /// A weighted split: each request goes to one of these pools with probability
    /// weight / total (canary releases, A/B tests).
    Split(Vec<(String, u32)>),
}

/// The conditions of a route, parsed once at load time.
#[derive(Debug, Clone, Default)]
pub struct RouteMatch {
    /// The request path (without the query) starts with this.
    pub path_prefix: Option<String>,
    /// The request path is exactly this.
    pub path: Option<String>,
    /// The request path matches this regular expression.
    pub path_regex: Option<regex::Regex>,
    /// The Host (port ignored, case-insensitive) is this, `*.suffix` or `prefix.*`.
    pub host: Option<HostPattern>,
    /// A request header holds a condition.
    pub header: Option<HeaderMatch>,
    /// The method is one of these (empty: any method).
    pub methods: Vec<String>,
    /// A query parameter (percent-decoded) has exactly this value.
    pub query: Option<(String, String)>,
    /// A cookie has exactly this value.
    pub cookie: Option<(String, String)>,
}

impl RouteMatch {
    /// What tells this route apart from its listener's others whatever its place in the file:
    /// its conditions, with regular expressions by their text. A reload that inserts or
    /// reorders routes keeps what belongs to a route (its rate limit's buckets) by it, not by
    /// its index, which may now be another route's.
    pub fn identity(&self) -> RouteIdentity {
        let mut methods = self.methods.clone();
        methods.sort();
        RouteIdentity {
            path_prefix: self.path_prefix.clone(),
            path: self.path.clone(),
            path_regex: self.path_regex.as_ref().map(|r| r.as_str().to_owned()),
            host: self.host.clone(),
            header: self.header.as_ref().map(|h| {
                let condition = match &h.condition {
                    ValueMatch::Exact(value) => Condition::Exact(value.clone()),
                    ValueMatch::Regex(regex) => Condition::Regex(regex.as_str().to_owned()),
                    ValueMatch::Present => Condition::Present,
                };
                (h.name.clone(), condition)
            }),
            methods,
            query: self.query.clone(),
            cookie: self.cookie.clone(),
        }
    }
}

/// A route's conditions as a value that can be compared and hashed (see
/// [`RouteMatch::identity`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteIdentity {
    path_prefix: Option<String>,
    path: Option<String>,
    path_regex: Option<String>,
    host: Option<HostPattern>,
    header: Option<(String, Condition)>,
    /// Sorted: the order they are listed in matches the same requests.
    methods: Vec<String>,
    query: Option<(String, String)>,
    cookie: Option<(String, String)>,
}

/// A [`ValueMatch`] by its text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Condition {
    Exact(String),
    Regex(String),
    Present,
}

/// A condition on one request header.
#[derive(Debug, Clone)]
pub struct HeaderMatch {
    /// Lower-cased header name.
    pub name: String,
    /// What its (first) value must satisfy.
    pub condition: ValueMatch,
}

/// What a header value must satisfy.
#[derive(Debug, Clone)]
pub enum ValueMatch {
    /// Exactly this value.
    Exact(String),
    /// A match of this regular expression somewhere in the value (anchor it for a whole match).
    Regex(regex::Regex),
    /// Only that the header is present.
    Present,
}

/// A host name pattern, lower-cased at load time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// `admin.example.com`
    Exact(String),
    /// `*.example.com`: stored as `.example.com`.
    Suffix(String),
    /// `admin.*`: stored as `admin.`.
    Prefix(String),
}

/// Which PROXY protocol versions a listener takes, and from whom.
#[derive(Debug, Clone)]
pub struct ProxyProtocolAccept {
    /// Versions accepted.
    pub version: ProxyProtocolVersions,
    /// Only peers inside these networks may send a header; others are refused.
    pub trusted: Vec<IpNet>,
    /// Time the peer has to send the whole header.
    pub timeout: Duration,
}

/// The PROXY protocol versions a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocolVersions {
    /// Only the text form.
    V1,
    /// Only the binary form.
    V2,
    /// Either, told apart by the signature.
    Any,
}

/// A PROXY protocol version to send to backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocolVersion {
    /// The text form (`PROXY TCP4 ...\r\n`).
    V1,
    /// The binary form.
    V2,
}

/// A named pool of backends.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The name listeners and routes refer to it by.
    pub name: String,
    /// At least one backend.
    pub backends: Vec<BackendConfig>,
    /// How a backend is chosen for each connection or request.
    pub balance: BalanceKind,
    /// Time allowed for a TCP connect to one backend.
    pub connect_timeout: Duration,
    /// How many distinct backends one connection may try (never more than the pool has).
    pub connect_attempts: usize,
    /// Prepend a PROXY protocol header to what is sent to each backend.
    pub send_proxy_protocol: Option<ProxyProtocolVersion>,
    /// http: time a backend has to start its response, and the longest pause within one.
    pub response_timeout: Duration,
    /// http: the protocol spoken to the backends.
    pub upstream_protocol: UpstreamProtocol,
    /// http: idle keep-alive connections kept per backend (0: none, a connection per request).
    pub keepalive_connections: usize,
    /// http: how long an idle keep-alive connection to a backend is kept.
    pub keepalive_timeout: Duration,
    /// http: TLS toward the backends.
    pub tls: Option<UpstreamTls>,
    /// maglev and ring_hash: what the hash is computed from.
    pub hash_key: HashKey,
    /// maglev: the lookup table's size, a prime at least 100 times the number of backends.
    pub maglev_table_size: usize,
    /// ring_hash: points on the ring per backend of average weight.
    pub ring_vnodes: u32,
    /// http: persistence by a cookie that names the backend.
    pub sticky: Option<StickyConfig>,
    /// Active health checks.
    pub health: Option<HealthConfig>,
    /// Passive health: ejection of backends that keep failing.
    pub outlier: Option<OutlierConfig>,
    /// When no backend is usable, use them all (except drained and disabled ones) anyway.
    pub panic_mode: bool,
    /// A backend that becomes usable again takes this long to reach its full share.
    pub slow_start: Option<Duration>,
    /// Where requests wait when every backend is at its `max_connections`.
    pub queue: Option<QueueConfig>,
    /// http: what besides a failed connect or a reset sends a request to another backend.
    pub retry: Option<RetryConfig>,
    /// How long connections and requests on a draining backend may go on before they are closed.
    pub drain_timeout: Duration,
    /// Backends given by a host name with `resolve = true`, whose addresses follow the DNS.
    pub discovery: Option<Discovery>,
}

/// The backends of a pool that come from the DNS, and what is needed to recompute the pool when
/// their names resolve to other addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    /// The `resolve = true` entries, in file order.
    pub names: Vec<ResolvedName>,
    /// `backends[..fixed]` are the file's own addresses; the rest came from `names`, in their
    /// order, an address already in the pool left out.
    pub fixed: usize,
    /// The file's `connect_attempts`, before it was lowered to the pool's size.
    pub connect_attempts: usize,
    /// Whether `maglev_table_size` is the default, which grows with the pool.
    pub default_table: bool,
}

/// One backend entry with `resolve = true`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedName {
    /// The host name to look up, as written.
    pub host: String,
    /// The name that answered at load: `host`, or `host` completed by a search domain.
    pub answered: String,
    /// The port every address gets.
    pub port: u16,
    /// Weight, backup, drain and connection limit of every address (its `addr` is the first).
    pub template: BackendConfig,
    /// The addresses in force, sorted: the last lookup that found some; none once the
    /// resolvers have said for `resolve_hold` that the name has none.
    pub addrs: Vec<SocketAddr>,
    /// How long the answer looked up at load may be kept (the shortest TTL of its records),
    /// which brings the first lookup after it forward when shorter than `resolve_interval`.
    pub ttl: Duration,
}

impl PoolConfig {
    /// This pool with `answers[i]` as the addresses of `discovery.names[i]` (`None` keeps what
    /// the name had; an empty list takes them all out), and the settings that follow from the
    /// pool's size.
    pub fn with_answers(&self, answers: &[Option<Vec<SocketAddr>>]) -> PoolConfig {
        let mut pool = self.clone();
        let Some(discovery) = pool.discovery.as_mut() else {
            return pool;
        };
        for (name, answer) in discovery.names.iter_mut().zip(answers) {
            if let Some(answer) = answer {
                let mut addrs = answer.clone();
                addrs.sort();
                addrs.dedup();
                name.addrs = addrs;
            }
        }
        pool.backends.truncate(discovery.fixed);
        expand_names(&mut pool.backends, &discovery.names);
        pool.connect_attempts = discovery.connect_attempts.min(pool.backends.len());
        if discovery.default_table {
            pool.maglev_table_size = default_maglev_size(pool.backends.len());
        }
        pool
    }
}

impl PoolConfig {
    /// Why this pool, grown by the addresses its names resolved to, cannot be built as the
    /// file asks: a ring over [`MAX_RING_POINTS`] points, or a maglev table the file sized
    /// below 100 slots per backend. Load-time validation says the same of the file's pools.
    pub fn too_large(&self) -> Option<String> {
        let points: u64 = self
            .backends
            .iter()
            .map(|b| u64::from(b.weight) * u64::from(self.ring_vnodes))
            .sum();
        match self.balance {
            BalanceKind::RingHash if points > MAX_RING_POINTS => Some(format!(
                "the ring would hold {points} points, more than {MAX_RING_POINTS}"
            )),
            BalanceKind::Maglev if self.maglev_table_size < 100 * self.backends.len() => {
                Some(format!(
                    "maglev_table_size {} is under 100 slots for each of {} backends",
                    self.maglev_table_size,
                    self.backends.len()
                ))
            }
            _ => None,
        }
    }
}

/// Appends every address of `names` to `backends`, with its entry's settings, passing over
/// addresses already there.
pub(crate) fn expand_names(backends: &mut Vec<BackendConfig>, names: &[ResolvedName]) {
    for name in names {
        for &addr in &name.addrs {
            if !backends.iter().any(|b| b.addr == addr) {
                backends.push(BackendConfig {
                    addr,
                    ..name.template.clone()
                });
            }
        }
    }
}

/// The default maglev table for a pool of `backends`: the default size, or the first prime of
/// at least 100 slots per backend for larger pools.
pub(crate) fn default_maglev_size(backends: usize) -> usize {
    let minimum = (100 * backends).max(DEFAULT_MAGLEV_TABLE_SIZE);
    (minimum..)
        .find(|&n| validate::is_prime(n))
        .unwrap_or(minimum)
}

impl PoolConfig {
    /// A pool with every setting at its default, as a file that names only the backends would
    /// give; for code that builds pools without a file (benchmarks, tests).
    pub fn with_defaults(name: &str, backends: Vec<BackendConfig>) -> PoolConfig {
        PoolConfig {
            name: name.to_owned(),
            connect_attempts: DEFAULT_CONNECT_ATTEMPTS.min(backends.len().max(1)),
            backends,
            balance: BalanceKind::RoundRobin,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            send_proxy_protocol: None,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            keepalive_connections: DEFAULT_KEEPALIVE_CONNECTIONS,
            keepalive_timeout: DEFAULT_UPSTREAM_KEEPALIVE_TIMEOUT,
            upstream_protocol: UpstreamProtocol::Http1,
            hash_key: HashKey::SourceIp,
            maglev_table_size: DEFAULT_MAGLEV_TABLE_SIZE,
            ring_vnodes: DEFAULT_RING_VNODES,
            sticky: None,
            health: None,
            outlier: None,
            panic_mode: false,
            slow_start: None,
            queue: None,
            retry: None,
            drain_timeout: DEFAULT_BACKEND_DRAIN_TIMEOUT,
            tls: None,
            discovery: None,
        }
    }
}

/// What consistent hashing keys on. A request without the key falls back to round robin.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HashKey {
    /// The client's address (after the PROXY protocol); the only key Layer 4 has.
    #[default]
    SourceIp,
    /// The value of a request header (http).
    Header(http::HeaderName),
    /// The value of a request cookie (http).
    Cookie(String),
    /// The request path without the query (http).
    Path,
    /// The value of a query parameter (http).
    Query(String),
}

/// `sticky = { cookie, ttl, secret }`.
#[derive(Clone)]
pub struct StickyConfig {
    /// The cookie's name.
    pub cookie: String,
    /// The cookie's lifetime (Max-Age, and the signed expiry inside it).
    pub ttl: Duration,
    /// Key for signing; instances that share it honour each other's cookies. Without it each
    /// process draws a random key.
    pub secret: Option<String>,
}

/// Without the secret: with it, anyone who reads a log line or a panic message could sign
/// cookies that pick a backend.
impl fmt::Debug for StickyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StickyConfig")
            .field("cookie", &self.cookie)
            .field("ttl", &self.ttl)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// `health = { ... }`: how and how often each backend is probed.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// What one probe does.
    pub kind: HealthKind,
    /// Time between probes of one backend.
    pub interval: Duration,
    /// Time one probe may take.
    pub timeout: Duration,
    /// Consecutive successes that bring a down backend back.
    pub rise: u32,
    /// Consecutive failures that take a backend down.
    pub fall: u32,
}

/// The kind of probe.
#[derive(Debug, Clone)]
pub enum HealthKind {
    /// A TCP connect.
    Tcp,
    /// An HTTP/1.1 GET whose status must fall in one of `expect`.
    Http {
        /// Request path.
        path: String,
        /// Host header; the backend's address when absent.
        host: Option<String>,
        /// Accepted status ranges, inclusive.
        expect: Vec<(u16, u16)>,
    },
    /// The gRPC health checking protocol (`grpc.health.v1.Health/Check`), over the HTTP/2 a
    /// pool with `upstream_protocol = "h2"` speaks: gRPC servers answer it with their own view
    /// of whether they serve, where an HTTP GET gets nothing useful from them.
    Grpc {
        /// The service asked about; empty for the server as a whole.
        service: String,
        /// The request's authority; the backend's address when absent.
        host: Option<String>,
    },
}

/// `outlier = { ... }`: passive health.
#[derive(Debug, Clone)]
pub struct OutlierConfig {
    /// Connect failures or 5xx answers in a row that eject a backend.
    pub consecutive_failures: u32,
    /// The first ejection's length; each further ejection multiplies it.
    pub base_ejection_time: Duration,
    /// The longest ejection.
    pub max_ejection_time: Duration,
    /// The most of the pool's backends that may be ejected at once.
    pub max_ejected_percent: u32,
}

/// `queue = { size, timeout }`.
#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    /// Requests or connections that may wait at once; beyond it they are refused.
    pub size: usize,
    /// The longest wait.
    pub timeout: Duration,
}

/// `retry = { on, attempts }`: answers and timeouts that send a replayable request (idempotent,
/// without a body) to another backend, as NGINX's `proxy_next_upstream` and Envoy's `retry_on`
/// do. A failed connect, and a reset before any answer, are retried without it, as always.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryConfig {
    /// Statuses 400 to 655 whose answers are retried, a bit each from 400 (a set, so that a
    /// response is looked up in constant time).
    statuses: [u64; 4],
    /// A backend that does not start its answer within `response_timeout` is retried.
    pub timeout: bool,
    /// Backends one request may try in all, replacing `connect_attempts` for http requests.
    pub attempts: usize,
}

impl RetryConfig {
    /// The lowest status a condition may name: below it an answer is a success or a redirect,
    /// which another backend has no reason to answer differently.
    pub const LOWEST_STATUS: u16 = 400;

    /// Retries on nothing beyond connects and resets, over `attempts` backends.
    pub fn new(attempts: usize) -> RetryConfig {
        RetryConfig {
            statuses: [0; 4],
            timeout: false,
            attempts,
        }
    }

    /// Adds `status` (400 to 599) to the statuses retried.
    pub fn add_status(&mut self, status: u16) {
        if let Some(bit) = status.checked_sub(Self::LOWEST_STATUS)
            && bit < 200
        {
            self.statuses[usize::from(bit / 64)] |= 1 << (bit % 64);
        }
    }

    /// Whether an answer with `status` is retried.
    pub fn retries_status(&self, status: u16) -> bool {
        match status.checked_sub(Self::LOWEST_STATUS) {
            Some(bit) if bit < 200 => self.statuses[usize::from(bit / 64)] & (1 << (bit % 64)) != 0,
            _ => false,
        }
    }
}

/// The protocol an http listener speaks to a pool's backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 over pooled keep-alive connections.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c), one multiplexed connection per backend: gRPC.
    H2,
}

/// One backend of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Where to connect; host names are resolved once, at load time.
    pub addr: SocketAddr,
    /// Relative share of new connections, 1..=[`MAX_WEIGHT`].
    pub weight: u32,
    /// Used only when no primary backend is usable.
    pub backup: bool,
    /// Takes no new connections; work in flight finishes.
    pub drain: bool,
    /// Concurrent connections (L4) or requests (http) it takes; `None` is unlimited.
    pub max_connections: Option<u64>,
}

/// The balancing algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalanceKind {
    /// Smooth weighted round robin (the NGINX order).
    RoundRobin,
    /// Fewest active connections relative to weight.
    LeastConn,
    /// Weighted random.
    Random,
    /// Power of two random choices on active connections.
    P2c,
    /// Power of two choices on peak-EWMA latency times outstanding requests.
    P2cEwma,
    /// Maglev consistent hashing.
    Maglev,
    /// Ketama-style consistent hashing on a ring with virtual nodes.
    RingHash,
}

impl BalanceKind {
    /// Whether the algorithm picks by a hash of [`HashKey`].
    pub fn is_hashing(self) -> bool {
        matches!(self, BalanceKind::Maglev | BalanceKind::RingHash)
    }
}

/// The largest configuration file read: far beyond any real one (thousands of backends take
/// a few hundred KiB).
pub const MAX_FILE: u64 = 64 << 20;

/// The bytes of a configuration file, refused past [`MAX_FILE`]: a file that never ends (a
/// device, a mistyped path) is an error rather than read until memory runs out.
pub fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_FILE + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB, the most a configuration file may be",
            MAX_FILE >> 20
        )));
    }
    Ok(bytes)
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes = read_file(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|error| {
            // Where the first byte that is not UTF-8 is, so that an editor can find it.
            let bytes = error.as_bytes();
            let at = error.utf8_error().valid_up_to();
            let before = std::str::from_utf8(&bytes[..at]).unwrap_or_default();
            let (line, column) = validate::line_column(before, at);
            ConfigError::Syntax {
                file: path.to_path_buf(),
                path: String::new(),
                line,
                column,
                reason: format!(
                    "not UTF-8 text: byte 0x{:02X} here (save the file as UTF-8)",
                    bytes[at]
                ),
            }
        })?;
        Config::from_toml(&text, path)
    }

    /// Parses and validates configuration text; `file` is only used to name it in errors.
    pub fn from_toml(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let raw = validate::parse(text, file)?;
        validate::validate(raw, file)
    }
}

/// Parses a duration written as a number and a unit: `250ms`, `5s`, `2m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.starts_with('-') {
        return Err(format!("`{text}`: a duration cannot be negative"));
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{text}` has no unit (use ms, s, m or h, e.g. \"5s\")"))?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!("`{text}` does not start with a whole number"));
    }
    // The digits are all digits: only a number too large for u64 fails here.
    let too_large = || format!("`{text}` is too large");
    let value: u64 = digits.parse().map_err(|_| too_large())?;
    let Some(millis_per_unit) = unit_millis(unit) else {
        return Err(misspelt_duration(text, digits, unit));
    };
    value
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(too_large)
}

/// Milliseconds in one `unit` of a duration.
fn unit_millis(unit: &str) -> Option<u64> {
    match unit {
        "ms" => Some(1),
        "s" => Some(1_000),
        "m" => Some(60_000),
        "h" => Some(3_600_000),
        _ => None,
    }
}

/// Why `text` (`digits` then `unit`, which is not a unit) is not a duration, with the way to
/// write what it likely means: a fraction as the whole number of a smaller unit, a number and
/// unit without the space between them.
fn misspelt_duration(text: &str, digits: &str, unit: &str) -> String {
    if let Some(rest) = unit.strip_prefix('.') {
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (fraction, unit) = rest.split_at(end);
        if let (Some(per_unit), Ok(whole), Ok(part)) = (
            unit_millis(unit.trim_start()),
            digits.parse::<u128>(),
            fraction.parse::<u128>(),
        ) && let Some(scale) = 10u128.checked_pow(fraction.len() as u32)
            && let Some(millis) = whole
                .checked_mul(scale)
                .and_then(|n| n.checked_add(part))
                .and_then(|n| n.checked_mul(u128::from(per_unit)))
        {
            if millis % scale == 0 {
                let millis = millis / scale;
                let written = [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)]
                    .into_iter()
                    .find(|(_, size)| millis % size == 0 && millis > 0)
                    .map_or("0ms".to_owned(), |(name, size)| {
                        format!("{}{name}", millis / size)
                    });
                return format!(
                    "`{text}`: a duration is a whole number of one unit; write \"{written}\""
                );
            }
            return format!(
                "`{text}`: a duration is a whole number of one unit, and this is not a whole \
                 number of milliseconds"
            );
        }
    }
    if unit.starts_with(char::is_whitespace) && unit_millis(unit.trim_start()).is_some() {
        return format!(
            "`{text}`: no space between the number and its unit; write \"{digits}{}\"",
            unit.trim_start()
        );
    }
    format!("`{text}` has unknown unit `{unit}` (use ms, s, m or h)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
    }

    fn backend(last: u8, weight: u32) -> BackendConfig {
        BackendConfig {
            addr: ([10, 0, 0, last], 80).into(),
            weight,
            backup: false,
            drain: false,
            max_connections: None,
        }
    }

    /// A pool of the fixed backend .1 and a name that resolved to .2 and .3 (weight 2).
    fn discovered() -> PoolConfig {
        let addrs = vec![backend(2, 2).addr, backend(3, 2).addr];
        let mut pool = PoolConfig::with_defaults("p", vec![backend(1, 1)]);
        pool.connect_attempts = 3;
        pool.discovery = Some(Discovery {
            names: vec![ResolvedName {
                host: "app".into(),
                answered: "app.example".into(),
                port: 80,
                template: backend(2, 2),
                addrs,
                ttl: Duration::from_secs(30),
            }],
            fixed: 1,
            connect_attempts: 3,
            default_table: true,
        });
        let names = pool.discovery.as_ref().unwrap().names.clone();
        expand_names(&mut pool.backends, &names);
        pool
    }

    #[test]
    fn answers_replace_a_names_addresses_and_keep_the_files_own() {
        let pool = discovered();
        assert_eq!(pool.backends, [backend(1, 1), backend(2, 2), backend(3, 2)]);

        // .1 is the file's own backend already: one backend, with the file's weight.
        let next = pool.with_answers(&[Some(vec![backend(4, 1).addr, backend(1, 1).addr])]);
        assert_eq!(next.backends, [backend(1, 1), backend(4, 2)]);
        assert_eq!(next.connect_attempts, 2);
        assert_eq!(
            next.discovery.as_ref().unwrap().names[0].addrs,
            [backend(1, 1).addr, backend(4, 1).addr]
        );

        // No answer keeps what the name had; an empty one takes its addresses out, and the
        // file's own backend stays.
        assert_eq!(next.with_answers(&[None]).backends, next.backends);
        let gone = next.with_answers(&[Some(vec![])]);
        assert_eq!(gone.backends, [backend(1, 1)]);
        assert_eq!(gone.connect_attempts, 1);
        assert!(gone.discovery.as_ref().unwrap().names[0].addrs.is_empty());
        // The maglev table the file left at its default grows with the pool.
        let many: Vec<SocketAddr> = (0..1000u16)
            .map(|i| SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 80)))
            .collect();
        let big = pool.with_answers(&[Some(many)]);
        assert_eq!(big.backends.len(), 1001);
        assert!(big.maglev_table_size >= 100_100);
        assert_eq!(big.connect_attempts, 3);
    }

    #[test]
    fn a_pool_the_answers_grow_too_far_is_said_to_be() {
        let mut pool = discovered();
        pool.balance = BalanceKind::RingHash;
        pool.ring_vnodes = 10_000;
        assert_eq!(pool.too_large(), None);
        let many: Vec<SocketAddr> = (0..300u16)
            .map(|i| SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 80)))
            .collect();
        assert!(
            pool.with_answers(&[Some(many.clone())])
                .too_large()
                .is_some()
        );
        pool.balance = BalanceKind::Maglev;
        pool.maglev_table_size = 1009;
        pool.discovery.as_mut().unwrap().default_table = false;
        assert_eq!(pool.too_large(), None);
        assert!(pool.with_answers(&[Some(many)]).too_large().is_some());
    }
}
