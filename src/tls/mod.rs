//! TLS: termination on listeners (SNI, ALPN, mutual TLS), TLS toward backends, and the
//! ClientHello reader that SNI passthrough routes by.
//!
//! [`TlsStore::build`] reads every certificate, key and CA file the configuration names and
//! compiles them into rustls configurations. It is a pure function of the configuration and the
//! files: starting the server calls it, `switchyard check` calls it to report unreadable files,
//! mismatched keys and certificates close to expiry, and a reload can call it again to pick up
//! renewed certificates (keeping the old store when the new files are bad). Nothing else in the
//! process reads these files.
//!
//! The settings follow Mozilla's "intermediate" profile: TLS 1.2 and 1.3 only, ECDHE with AEAD
//! ciphers only, X25519MLKEM768 (post-quantum hybrid) offered first. Session resumption uses
//! tickets whose keys rotate every six hours (shared by every listener of the process, so a
//! rebuilt store keeps resuming sessions) and, for TLS 1.2 clients without tickets, a bounded
//! session cache.

mod certs;
pub mod client_hello;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs::{self as provider, cipher_suite, kx_group};
use rustls::server::{ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{
    ClientAuth, Config, ListenerKind, ListenerTls, PoolConfig, Problem, UpstreamProtocol,
    UpstreamTls,
};
pub use certs::{ClientCert, TlsFileError};

/// A certificate that expires within this long gets a warning from `check` and at startup.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);
/// TLS 1.2 sessions remembered for resumption by session id, per resumption scope.
const SESSION_CACHE_SIZE: usize = 4096;
/// Makes the scope of a client CA file that could not be read again unique.
static SCOPE_SALT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// ALPN protocol id of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN protocol id of HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
/// ALPN protocol id of HTTP/1.0: offered too, because a client that names only it
/// (`curl --http1.0`) would otherwise have its handshake refused, though it is served.
pub const ALPN_HTTP10: &[u8] = b"http/1.0";

/// Everything TLS the data path needs, compiled from one configuration.
#[derive(Debug, Default)]
pub struct TlsStore {
    /// Server-side TLS by listener name.
    listeners: HashMap<String, Arc<ServerTls>>,
    /// Client-side TLS by pool name.
    pools: HashMap<String, Arc<UpstreamConnector>>,
    /// Things that work but deserve attention: certificates close to expiry, verification off.
    pub warnings: Vec<Problem>,
}

/// TLS termination on one listener.
pub struct ServerTls {
    /// Runs the handshake with the listener's configuration.
    pub acceptor: TlsAcceptor,
    /// Time a client has to complete its handshake.
    pub handshake_timeout: Duration,
    /// Whether client certificates are checked, so that their subject is worth passing on.
    pub mutual: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("handshake_timeout", &self.handshake_timeout)
            .field("mutual", &self.mutual)
            .finish_non_exhaustive()
    }
}

/// TLS toward the backends of one pool.
pub struct UpstreamConnector {
    connector: TlsConnector,
    /// Unique in the process (never reused, unlike an address), see [`UpstreamConnector::key`].
    id: usize,
    /// The name sent as SNI and verified; `None`: the backend's IP address.
    sni: Option<ServerName<'static>>,
}

impl std::fmt::Debug for UpstreamConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConnector")
            .field("sni", &self.sni)
            .finish_non_exhaustive()
    }
}

impl UpstreamConnector {
    /// Runs the client handshake on a connected socket within `limit`.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
        limit: Duration,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = self
            .sni
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        match tokio::time::timeout(limit, self.connector.connect(name, tcp)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake with the backend timed out",
            )),
        }
    }

    /// Identifies this connector among all built in the process (never 0), so that pooled
    /// connections made with one are never handed to a pool with other TLS settings, even
    /// after a reload replaced it.
    pub fn key(&self) -> usize {
        self.id
    }
}

impl TlsStore {
    /// Reads every file the configuration's TLS settings name and builds the rustls
    /// configurations. Returns every problem found (each with its key path), not just the first.
    pub fn build(config: &Config) -> Result<TlsStore, Vec<Problem>> {
        let mut store = TlsStore::default();
        let mut problems = Vec::new();
        let now = SystemTime::now();
        for (index, listener) in config.listeners.iter().enumerate() {
            let Some(tls) = &listener.tls else { continue };
            let (alpn, hosts) = match &listener.kind {
                ListenerKind::Http(settings) => (
                    vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec(), ALPN_HTTP10.to_vec()],
                    settings
                        .routes
                        .iter()
                        .enumerate()
                        .filter_map(|(i, route)| {
                            let path = format!("listeners[{index}].routes[{i}].match.host");
                            route.matcher.host.as_ref().map(|host| (path, host))
                        })
                        .collect(),
                ),
                _ => (Vec::new(), Vec::new()),
            };
            match server_tls(tls, &hosts, alpn, now, &mut store.warnings) {
                Ok(server) => {
                    store
                        .listeners
                        .insert(listener.name.clone(), Arc::new(server));
                }
                Err(mut found) => problems.append(&mut found),
            }
        }
        for pool in config.pools.values() {
            let Some(tls) = &pool.tls else { continue };
            match upstream_tls(pool, tls, now, &mut store.warnings) {
                Ok(connector) => {
                    store.pools.insert(pool.name.clone(), Arc::new(connector));
                }
                Err(mut found) => problems.append(&mut found),
            }
        }
        if problems.is_empty() {
            Ok(store)
        } else {
            Err(problems)
        }
    }

    /// The TLS termination of listener `name`, if it has any.
    pub fn listener(&self, name: &str) -> Option<Arc<ServerTls>> {
        self.listeners.get(name).cloned()
    }

    /// The TLS settings toward pool `name`'s backends, if it has any.
    pub fn pool(&self, name: &str) -> Option<Arc<UpstreamConnector>> {
        self.pools.get(name).cloned()
    }
}

/// The crypto provider with Mozilla's intermediate choices, in its order of preference.
/// Source: <https://ssl-config.mozilla.org/guidelines/5.7.json> ("intermediate": the three TLS
/// 1.3 suites, and for TLS 1.2 ECDHE with AES-GCM or ChaCha20-Poly1305; the DHE suites it also
/// lists are left out, as rustls has none). X25519MLKEM768 comes first, then the classic curves
/// of the profile.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| {
        Arc::new(CryptoProvider {
            cipher_suites: vec![
                cipher_suite::TLS13_AES_128_GCM_SHA256,
                cipher_suite::TLS13_AES_256_GCM_SHA384,
                cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
                cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
                cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                cipher_suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
            ],
            kx_groups: vec![
                kx_group::X25519MLKEM768,
                kx_group::X25519,
                kx_group::SECP256R1,
                kx_group::SECP384R1,
            ],
            ..provider::default_provider()
        })
    }))
}

/// What a resumed session skips, and so what must be the same where it resumes: the check of
/// the client's certificate. A session opened on a listener that asks for no certificate (or
/// trusts other CAs, or makes it optional) must not resume on one that requires it, as a
/// resumed session brings its old certificate, or none, without a new check.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ResumptionScope {
    /// The client CA file's contents (not its path: a reload that changes the file changes
    /// the scope); `None` without mutual TLS.
    client_ca: Option<Vec<u8>>,
    /// Whether a certificate is required (or only checked when given).
    required: bool,
}

/// The host a route matches, said as it is written, when no name of `names` (the DNS names of
/// a listener's certificates, `*.` wildcards as written) covers it: a handshake for it would get
/// the default certificate, which does not name it either. A `prefix.*` pattern, an IP address,
/// and a `*.suffix` pattern that some name under the suffix covers in part, are not judged.
fn uncovered(host: &crate::config::HostPattern, names: &[&str]) -> Option<String> {
    use crate::config::HostPattern;
    match host {
        HostPattern::Exact(host) => {
            if host.parse::<std::net::IpAddr>().is_ok() {
                return None;
            }
            let wildcard = host
                .to_ascii_lowercase()
                .split_once('.')
                .map(|(_, parent)| format!("*.{parent}"));
            let covered = names.iter().any(|n| {
                n.eq_ignore_ascii_case(host)
                    || wildcard
                        .as_deref()
                        .is_some_and(|w| n.eq_ignore_ascii_case(w))
            });
            (!covered).then(|| format!("`{host}`"))
        }
        // Stored as `.example.com`.
        HostPattern::Suffix(suffix) => {
            let covered = names.iter().any(|n| {
                n.to_ascii_lowercase()
                    .ends_with(&suffix.to_ascii_lowercase())
            });
            (!covered).then(|| format!("`*{suffix}`"))
        }
        HostPattern::Prefix(_) => None,
    }
}

/// Session ticket keys and the TLS 1.2 session cache of one [`ResumptionScope`].
#[derive(Clone)]
struct Resumption {
    ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
    sessions: Arc<ServerSessionMemoryCache>,
}

/// The resumption state of `scope`, shared by every listener of that scope and kept across
/// rebuilds of the store, so that a reload does not end resumption (the ticket keys rotate
/// every six hours). A scope no listener uses any more is forgotten at the next lookup.
fn resumption(scope: ResumptionScope) -> Resumption {
    static SCOPES: OnceLock<std::sync::Mutex<HashMap<ResumptionScope, Resumption>>> =
        OnceLock::new();
    let mut scopes = SCOPES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    // Only this map holds it: no configuration in use has it.
    scopes.retain(|_, r| Arc::strong_count(&r.sessions) > 1);
    scopes
        .entry(scope)
        .or_insert_with(|| Resumption {
            ticketer: provider::Ticketer::new().ok(),
            sessions: ServerSessionMemoryCache::new(SESSION_CACHE_SIZE),
        })
        .clone()
}

/// The TLS termination of one listener, whose routes match `hosts` (key path, pattern).
fn server_tls(
    tls: &ListenerTls,
    hosts: &[(String, &crate::config::HostPattern)],
    alpn: Vec<Vec<u8>>,
    now: SystemTime,
    warnings: &mut Vec<Problem>,
) -> Result<ServerTls, Vec<Problem>> {
    let provider = provider();
    let mut problems = Vec::new();
    let mut loaded = Vec::new();
    for (i, files) in tls.certificates.iter().enumerate() {
        let at = format!("{}.certificates[{i}]", tls.at);
        match certs::load_certified_key(files, &provider) {
            Ok(entry) => {
                if let Some(warning) = certs::expiry_warning(&entry, now) {
                    warnings.push(Problem {
                        path: format!("{at}.cert"),
                        reason: warning,
                    });
                }
                loaded.push(entry);
            }
            Err(errors) => problems.extend(errors.iter().map(|e| e.problem(&at, Some(files)))),
        }
    }
    if problems.is_empty() {
        let names: Vec<&str> = loaded
            .iter()
            .flat_map(|l| l.names.iter().map(String::as_str))
            .collect();
        for (path, host) in hosts {
            if let Some(host) = uncovered(host, &names) {
                warnings.push(Problem {
                    path: path.clone(),
                    reason: format!(
                        "warning: no certificate of {} names {host}, so its clients get \
                         certificates[0], which they refuse",
                        tls.at
                    ),
                });
            }
        }
    }
    let mut client_ca_bytes = None;
    let verifier = match &tls.client_ca {
        None => None,
        Some(path) => match certs::load_roots(path) {
            Ok(roots) => {
                // The scope of resumption (see `ResumptionScope`). Read again rather than
                // threaded out of `load_roots`; a file that vanished in between gets a scope
                // of its own that nothing shares.
                client_ca_bytes = Some(std::fs::read(path).unwrap_or_else(|_| {
                    let unique = SCOPE_SALT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    format!("unreadable #{unique}").into_bytes()
                }));
                let builder =
                    WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider));
                let builder = match tls.client_auth {
                    ClientAuth::Required => builder,
                    ClientAuth::Optional => builder.allow_unauthenticated(),
                };
                match builder.build() {
                    Ok(verifier) => Some(verifier),
                    Err(error) => {
                        problems.push(Problem {
                            path: format!("{}.client_ca", tls.at),
                            reason: format!("cannot verify clients with these CAs: {error}"),
                        });
                        None
                    }
                }
            }
            Err(error) => {
                problems.push(Problem {
                    path: format!("{}.client_ca", tls.at),
                    reason: error.to_string(),
                });
                None
            }
        },
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let to_problem = |error: rustls::Error| {
        vec![Problem {
            path: tls.at.clone(),
            reason: format!("cannot build the TLS configuration: {error}"),
        }]
    };
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(to_problem)?;
    let mutual = verifier.is_some();
    let builder = match verifier {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(certs::SniResolver::new(loaded)));
    config.alpn_protocols = alpn;
    let resumption = resumption(ResumptionScope {
        client_ca: client_ca_bytes,
        required: mutual && tls.client_auth == ClientAuth::Required,
    });
    config.session_storage = resumption.sessions;
    if let Some(ticketer) = resumption.ticketer {
        config.ticketer = ticketer;
    }
    Ok(ServerTls {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        handshake_timeout: tls.handshake_timeout,
        mutual,
    })
}

fn upstream_tls(
    pool: &PoolConfig,
    tls: &UpstreamTls,
    now: SystemTime,
    warnings: &mut Vec<Problem>,
) -> Result<UpstreamConnector, Vec<Problem>> {
    let provider = provider();
    let mut problems = Vec::new();
    let roots = match &tls.ca {
        Some(path) => match certs::load_roots(path) {
            Ok(roots) => Some(roots),
            Err(error) => {
                problems.push(Problem {
                    path: format!("{}.ca", tls.at),
                    reason: error.to_string(),
                });
                None
            }
        },
        None => None,
    };
    let client_key = match &tls.client_certificate {
        None => None,
        Some(files) => match certs::load_certified_key(files, &provider) {
            Ok(entry) => {
                if let Some(warning) = certs::expiry_warning(&entry, now) {
                    warnings.push(Problem {
                        path: format!("{}.cert", tls.at),
                        reason: warning,
                    });
                }
                Some((entry.chain, entry.private_key))
            }
            Err(errors) => {
                problems.extend(errors.iter().map(|e| e.problem(&tls.at, Some(files))));
                None
            }
        },
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let to_problem = |error: rustls::Error| {
        vec![Problem {
            path: tls.at.clone(),
            reason: format!("cannot build the TLS configuration: {error}"),
        }]
    };
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(to_problem)?;
    let builder = if tls.verify {
        builder.with_root_certificates(roots.unwrap_or_else(|| Arc::new(RootCertStore::empty())))
    } else {
        warnings.push(Problem {
            path: format!("{}.verify", tls.at),
            reason: "backend certificates are not verified: anyone on the path to the backends \
                     can read and change the traffic"
                .to_owned(),
        });
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(certs::NoVerification(Arc::clone(
                &provider,
            ))))
    };
    let mut config = match client_key {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(to_problem)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = match pool.upstream_protocol {
        UpstreamProtocol::H2 => vec![ALPN_H2.to_vec()],
        UpstreamProtocol::Http1 => vec![ALPN_HTTP11.to_vec()],
    };
    let sni = tls
        .sni
        .as_deref()
        .and_then(|name| ServerName::try_from(name.to_owned()).ok());
    static NEXT_ID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
    Ok(UpstreamConnector {
        connector: TlsConnector::from(Arc::new(config)),
        id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        sni,
    })
}

/// What a finished handshake tells the HTTP layer.
#[derive(Debug, Default, Clone)]
pub struct Negotiated {
    /// The client chose HTTP/2 through ALPN.
    pub h2: bool,
    /// The verified client certificate, on mutual-TLS listeners.
    pub client_cert: Option<Arc<ClientCert>>,
}

/// Reads what the HTTP layer needs from a server connection after its handshake.
pub fn negotiated(conn: &rustls::ServerConnection, mutual: bool) -> Negotiated {
    Negotiated {
        h2: conn.alpn_protocol() == Some(ALPN_H2),
        client_cert: if mutual {
            conn.peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| certs::client_cert(leaf.as_ref()))
                .map(Arc::new)
        } else {
            None
        },
    }
}

/// Why a client's TLS handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The client sent plain text (HTTP, most likely) to a TLS port.
    #[error("plain text sent to a TLS port (first bytes {0:?})")]
    NotTls(String),
    /// The client closed before finishing.
    #[error("client closed during the TLS handshake")]
    Closed,
    /// The handshake did not finish within the listener's `handshake_timeout`.
    #[error("TLS handshake not completed within {0:?}")]
    Timeout(Duration),
    /// The handshake failed (no shared version or cipher, bad client certificate, ...).
    #[error("TLS handshake failed: {0}")]
    Handshake(io::Error),
}

/// Answer to a client that speaks plain HTTP to an HTTPS port.
const PLAIN_HTTP_REPLY: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\n\
connection: close\r\ncontent-length: 44\r\n\r\nThis port expects HTTPS: use an https:// URL\n";

/// Runs the server handshake on an accepted connection. `initial` holds bytes already read
/// (after a PROXY header); when it is empty the first bytes are read here, so that plain text
/// is told apart from a ClientHello before rustls sees it. With `http`, a plain HTTP request
/// gets a 400 that says what went wrong. The whole handshake runs within the listener's
/// `handshake_timeout`.
pub async fn accept(
    server: &ServerTls,
    mut tcp: TcpStream,
    initial: &[u8],
    http: bool,
) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, Negotiated), AcceptError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let limit = server.handshake_timeout;
    let deadline = tokio::time::Instant::now() + limit;
    let mut first = initial.to_vec();
    if first.is_empty() {
        first.resize(2048, 0);
        match tokio::time::timeout_at(deadline, tcp.read(&mut first)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Err(AcceptError::Closed),
            Ok(Ok(n)) => first.truncate(n),
            Err(_) => return Err(AcceptError::Timeout(limit)),
        }
    }
    // A TLS connection starts with a handshake record (22); HTTP starts with a method.
    if first[0] != 22 {
        let shown: String = first
            .iter()
            .take(16)
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        if http && first[0].is_ascii_uppercase() {
            let _ = tokio::time::timeout_at(deadline, tcp.write_all(PLAIN_HTTP_REPLY)).await;
        }
        return Err(AcceptError::NotTls(shown));
    }
    let mut early: Option<(rustls::Error, Vec<u8>)> = None;
    let mut accept = server.acceptor.accept_with(tcp, |conn| {
        // Hand rustls what was already read; the handshake then goes on from the socket.
        let mut rest = &first[..];
        while !rest.is_empty() {
            match conn.read_tls(&mut rest) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        if let Err(error) = conn.process_new_packets() {
            // Refused at the first flight (no common version or cipher, say): take the alert
            // that says why, to send it and close at once rather than wait for the client.
            let mut alert = Vec::new();
            let _ = conn.write_tls(&mut alert);
            early = Some((error, alert));
        }
    });
    if let Some((error, alert)) = early {
        if let Some(tcp) = accept.get_mut() {
            let _ = tokio::time::timeout_at(deadline, tcp.write_all(&alert)).await;
        }
        return Err(AcceptError::Handshake(io::Error::new(
            io::ErrorKind::InvalidData,
            error,
        )));
    }
    match tokio::time::timeout_at(deadline, accept).await {
        Ok(Ok(stream)) => {
            let negotiated = negotiated(stream.get_ref().1, server.mutual);
            Ok((stream, negotiated))
        }
        Ok(Err(error)) if error.kind() == io::ErrorKind::UnexpectedEof => Err(AcceptError::Closed),
        Ok(Err(error)) => Err(AcceptError::Handshake(error)),
        Err(_) => Err(AcceptError::Timeout(limit)),
    }
}
