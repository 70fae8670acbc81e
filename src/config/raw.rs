//! The file as written: serde structs that mirror the TOML one to one.
//!
//! Nothing here is trusted yet. Every field is optional where the file may omit it, strings stay
//! strings, and `deny_unknown_fields` turns a typo into an error instead of a silently ignored key.
//! [`super::validate`] turns these into the runtime types.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Process-wide settings (drain deadline and the like).
    #[serde(default)]
    pub global: RawGlobal,
    /// Listeners in file order; the order is kept so errors can name `listeners[i]`.
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    /// Named pools of backends, shared by any number of listeners.
    #[serde(default)]
    pub pools: BTreeMap<String, RawPool>,
    /// The admin API, metrics and dashboard.
    pub admin: Option<RawAdmin>,
}

/// `[admin]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub bind: Option<String>,
    pub token: Option<String>,
}

/// `access_log = { path, format }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccessLog {
    pub path: Option<String>,
    pub format: Option<String>,
}

/// `[global]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGlobal {
    /// How long open connections may keep running after SIGTERM/SIGINT.
    pub drain_timeout: Option<String>,
    /// Where backends with `resolve = true` are looked up.
    pub resolvers: Option<Vec<String>>,
    /// How often backends with `resolve = true` are looked up again.
    pub resolve_interval: Option<String>,
    /// How long a name the resolvers say has no address keeps its last addresses.
    pub resolve_hold: Option<String>,
    /// The domains short `resolve = true` names are completed with, instead of resolv.conf's.
    pub search: Option<Vec<String>>,
    /// The dots a `resolve = true` name needs to be asked as written first, instead of
    /// resolv.conf's `ndots`.
    pub ndots: Option<i64>,
}

/// One `[[listeners]]` entry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: Option<String>,
    pub bind: Option<String>,
    pub protocol: Option<String>,
    /// The one pool of a tcp/udp listener.
    pub pool: Option<String>,
    /// http: where requests go when no route matches.
    pub default_pool: Option<String>,
    /// http: routes, first match wins.
    pub routes: Option<Vec<RawRoute>>,
    pub max_connections: Option<i64>,
    pub idle_timeout: Option<String>,
    /// tcp: forward with splice(2) instead of copying through user space; http: the same for
    /// long `Content-Length` bodies.
    pub splice: Option<bool>,
    /// udp: upper bound on concurrent client sessions.
    pub max_sessions: Option<i64>,
    /// Accept a PROXY protocol header from trusted peers: "v1", "v2" or "any".
    pub proxy_protocol: Option<String>,
    /// How long a peer may take to send its PROXY protocol header.
    pub proxy_protocol_timeout: Option<String>,
    /// CIDRs allowed to send a PROXY protocol header (and, on http, whose X-Forwarded-For is
    /// believed).
    pub trusted_proxies: Option<Vec<String>>,
    /// Clients served (addresses or CIDRs); empty or absent: everyone not denied.
    pub allow: Option<Vec<String>>,
    /// Clients refused (addresses or CIDRs), checked before `allow`.
    pub deny: Option<Vec<String>>,
    /// http: time a client has to send a whole request head once it started.
    pub client_header_timeout: Option<String>,
    /// http: how long an idle keep-alive client connection is kept.
    pub keepalive_timeout: Option<String>,
    /// tcp and http: how long an idle connection keeps its own task before it is parked, or
    /// "off".
    pub park_idle_after: Option<String>,
    /// http: add an RFC 7239 `Forwarded` field to requests.
    pub forwarded_header: Option<bool>,
    /// http: give up a request whose client closed its connection while the response was
    /// awaited.
    pub abort_on_close: Option<bool>,
    /// http: largest request body accepted, `1048576` or `"1m"`.
    pub max_body_size: Option<toml::Value>,
    /// http: header changes on requests before they go upstream.
    pub request_headers: Option<RawHeaderRules>,
    /// http: header changes on responses before they go to the client.
    pub response_headers: Option<RawHeaderRules>,
    /// http: path rewrite.
    pub rewrite: Option<RawRewrite>,
    /// http: Host sent upstream instead of the client's.
    pub host_rewrite: Option<String>,
    /// http: answer with a redirect instead of proxying.
    pub redirect: Option<RawRedirect>,
    /// http: attributes added to every Set-Cookie of responses.
    pub cookie_flags: Option<Vec<String>>,
    /// http: response compression.
    pub compression: Option<RawCompression>,
    /// tcp and http: terminate TLS with these certificates.
    pub tls: Option<RawListenerTls>,
    /// tcp: pick the pool by the SNI of the ClientHello, passing TLS through untouched.
    pub sni_routes: Option<Vec<RawSniRoute>>,
    /// http: one line per request.
    pub access_log: Option<RawAccessLog>,
    /// tcp with sni_routes: time a client has to send its whole ClientHello.
    pub client_hello_timeout: Option<String>,
    /// tcp: new connections per client address; http: requests per client.
    pub rate_limit: Option<RawRateLimit>,
}

/// `rate_limit = { rate = 100, per = "1s", burst = 20, key = "client_ip" }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub rate: Option<i64>,
    pub per: Option<String>,
    pub burst: Option<i64>,
    /// http: `"client_ip"` or `{ header = "X-API-Key" }`.
    pub key: Option<RawRateKey>,
}

/// `"client_ip"` or `{ header = "NAME" }`.
///
/// Deserialized by hand, as backends are, so that a typo inside the table form is reported as
/// the unknown key it is.
#[derive(Debug)]
pub enum RawRateKey {
    Name(String),
    Table(RawRateKeyTable),
}

impl<'de> Deserialize<'de> for RawRateKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl<'de> serde::de::Visitor<'de> for KeyVisitor {
            type Value = RawRateKey;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#""client_ip" or { header = "NAME" }"#)
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawRateKey, E> {
                Ok(RawRateKey::Name(v.to_owned()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawRateKey, A::Error> {
                RawRateKeyTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawRateKey::Table)
            }
        }

        deserializer.deserialize_any(KeyVisitor)
    }
}

/// The table form of a rate limit's key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateKeyTable {
    pub header: Option<String>,
}

/// `tls = { certificates = [...], client_ca, client_auth, handshake_timeout }` on a listener.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListenerTls {
    pub certificates: Option<Vec<RawCertificate>>,
    /// PEM file of the CAs that sign client certificates (mutual TLS).
    pub client_ca: Option<String>,
    /// "required" or "optional".
    pub client_auth: Option<String>,
    /// Time a client has to complete its handshake.
    pub handshake_timeout: Option<String>,
}

/// `{ cert = "site.pem", key = "site.key" }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert: Option<String>,
    pub key: Option<String>,
}

/// `{ sni = "a.example.com", pool = "a" }` in a tcp listener's `sni_routes`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSniRoute {
    pub sni: Option<String>,
    pub pool: Option<String>,
}

/// `tls = { sni, ca, verify, cert, key }` on a pool: TLS toward its backends.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    /// Server name sent and verified; defaults to the backend's IP address.
    pub sni: Option<String>,
    /// PEM file of the CAs trusted for backends (required unless verify = false).
    pub ca: Option<String>,
    pub verify: Option<bool>,
    /// Client certificate presented to backends.
    pub cert: Option<String>,
    pub key: Option<String>,
}

/// One `[[listeners.routes]]` entry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// A name for metrics, access logs and the admin API, kept across reloads that move the
    /// route; without one, the route is known by its position.
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub match_: Option<RawMatch>,
    /// The one pool matching requests go to...
    pub pool: Option<String>,
    /// ...or a weighted split over several (canary, A/B).
    pub pools: Option<Vec<RawWeightedPool>>,
    /// Clients this route serves; others get 403.
    pub allow: Option<Vec<String>>,
    /// Clients this route refuses with 403, checked before `allow`.
    pub deny: Option<Vec<String>>,
    /// http: header changes on requests before they go upstream.
    pub request_headers: Option<RawHeaderRules>,
    /// http: header changes on responses before they go to the client.
    pub response_headers: Option<RawHeaderRules>,
    /// http: path rewrite.
    pub rewrite: Option<RawRewrite>,
    /// http: Host sent upstream instead of the client's.
    pub host_rewrite: Option<String>,
    /// http: answer with a redirect instead of proxying.
    pub redirect: Option<RawRedirect>,
    /// http: attributes added to every Set-Cookie of responses.
    pub cookie_flags: Option<Vec<String>>,
    /// http: response compression.
    pub compression: Option<RawCompression>,
    /// Requests per client for this route, on top of the listener's limit.
    pub rate_limit: Option<RawRateLimit>,
}

/// `{ add = { NAME = "value" }, set = { ... }, remove = ["NAME"] }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderRules {
    pub add: Option<BTreeMap<String, String>>,
    pub set: Option<BTreeMap<String, String>>,
    pub remove: Option<Vec<String>>,
}

/// `{ strip_prefix, add_prefix }` or `{ regex, replace }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRewrite {
    pub strip_prefix: Option<String>,
    pub add_prefix: Option<String>,
    pub regex: Option<String>,
    pub replace: Option<String>,
}

/// `{ algorithms = ["zstd", "br", "gzip"], min_size = 1024, types = ["text/*"] }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCompression {
    pub algorithms: Option<Vec<String>>,
    pub min_size: Option<i64>,
    pub types: Option<Vec<String>>,
}

/// `{ to = "https://{host}{path}", status = 301 }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedirect {
    pub to: Option<String>,
    pub status: Option<i64>,
}

/// `{ pool = "v2", weight = 5 }` in a route's `pools`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWeightedPool {
    pub pool: Option<String>,
    pub weight: Option<i64>,
}

/// The `match` table of a route; every key present must hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    pub path_prefix: Option<String>,
    pub path: Option<String>,
    pub path_regex: Option<String>,
    pub host: Option<String>,
    pub header: Option<RawHeaderMatch>,
    pub method: Option<StringOrList>,
    pub query: Option<RawNameValue>,
    pub cookie: Option<RawNameValue>,
}

/// `header = { name = "...", value = "..." | regex = "..." | present = true }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderMatch {
    pub name: Option<String>,
    pub value: Option<String>,
    pub regex: Option<String>,
    pub present: Option<bool>,
}

/// `{ name = "...", value = "..." }` for query parameters and cookies.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNameValue {
    pub name: Option<String>,
    pub value: Option<String>,
}

/// `"GET"` or `["GET", "HEAD"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

/// One `[pools.NAME]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub backends: Option<Vec<RawBackend>>,
    pub balance: Option<String>,
    pub connect_timeout: Option<String>,
    /// How many backends one client connection may try before giving up.
    pub connect_attempts: Option<i64>,
    /// Send a PROXY protocol header to each backend: "v1" or "v2".
    pub send_proxy_protocol: Option<String>,
    /// http: time a backend has to start its response once the request is sent.
    pub response_timeout: Option<String>,
    /// http: idle keep-alive connections kept per backend.
    pub keepalive_connections: Option<i64>,
    /// http: how long an idle keep-alive connection to a backend is kept.
    pub keepalive_timeout: Option<String>,
    /// http: the protocol spoken to backends, "http1" or "h2".
    pub upstream_protocol: Option<String>,
    /// http: TLS toward the backends.
    pub tls: Option<RawUpstreamTls>,
    /// What consistent hashing keys on: "source_ip", "header:NAME", "cookie:NAME", "path",
    /// "query:NAME".
    pub hash_key: Option<String>,
    /// maglev: lookup table size, a prime.
    pub maglev_table_size: Option<i64>,
    /// ring_hash: points on the ring per backend at average weight.
    pub ring_vnodes: Option<i64>,
    /// http: cookie-based persistence.
    pub sticky: Option<RawSticky>,
    /// Active health checks.
    pub health: Option<RawHealth>,
    /// Passive health: ejection after consecutive failures.
    pub outlier: Option<RawOutlier>,
    /// Use every backend when none is usable, rather than refusing.
    pub panic_mode: Option<bool>,
    /// Ramp-up time of a backend that becomes usable again.
    pub slow_start: Option<String>,
    /// Waiting room when every backend is at its `max_connections`.
    pub queue: Option<RawQueue>,
    /// http: answers and timeouts that send a request to another backend.
    pub retry: Option<RawRetry>,
    /// How long work in flight on a draining backend may go on before it is closed.
    pub drain_timeout: Option<String>,
}

/// `sticky = { cookie, ttl, secret }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSticky {
    pub cookie: Option<String>,
    pub ttl: Option<String>,
    pub secret: Option<String>,
}

/// `health = { kind, path, service, expect_status, interval, timeout, rise, fall, host }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub kind: Option<String>,
    pub service: Option<String>,
    pub path: Option<String>,
    pub expect_status: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub rise: Option<i64>,
    pub fall: Option<i64>,
    pub host: Option<String>,
}

/// `outlier = { consecutive_failures, base_ejection_time, max_ejection_time, max_ejected_percent }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutlier {
    pub consecutive_failures: Option<i64>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_time: Option<String>,
    pub max_ejected_percent: Option<i64>,
}

/// `queue = { size, timeout }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueue {
    pub size: Option<i64>,
    pub timeout: Option<String>,
}

/// `retry = { on, attempts }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    /// Statuses (`"503"`), `"5xx"`, `"timeout"`.
    pub on: Option<Vec<String>>,
    pub attempts: Option<i64>,
}

/// A backend: `"host:port"` or `{ address = "host:port", weight = N }`.
///
/// Deserialized by hand rather than with `#[serde(untagged)]` so that a typo inside the table form
/// is reported as the unknown key it is, not as "matched no variant".
#[derive(Debug)]
pub enum RawBackend {
    Address(String),
    Table(RawBackendTable),
}

impl<'de> Deserialize<'de> for RawBackend {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BackendVisitor;

        impl<'de> serde::de::Visitor<'de> for BackendVisitor {
            type Value = RawBackend;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#""host:port" or { address = "host:port", weight = N }"#)
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawBackend, E> {
                Ok(RawBackend::Address(v.to_owned()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawBackend, A::Error> {
                RawBackendTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawBackend::Table)
            }
        }

        deserializer.deserialize_any(BackendVisitor)
    }
}

/// The table form of a backend.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackendTable {
    pub address: Option<String>,
    pub weight: Option<i64>,
    pub backup: Option<bool>,
    pub drain: Option<bool>,
    pub max_connections: Option<i64>,
    pub resolve: Option<bool>,
}
