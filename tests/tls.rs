//! TLS: termination with SNI and ALPN, resumption, mutual TLS, TLS to backends, SNI passthrough,
//! and bad input. Certificates are made for each test with rcgen.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use switchyard::Config;
use switchyard::tls::TlsStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A directory of PEM files for one test, removed when dropped.
struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static DIRS: AtomicUsize = AtomicUsize::new(0);

impl Pki {
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "switchyard-tls-{}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Switchyard Test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca");
        let pki = Pki { dir, ca };
        std::fs::write(pki.path("ca.pem"), pki.ca.pem()).expect("write ca");
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Issues a certificate for `names` (CN `cn`), writes `{file}.pem` and `{file}.key`, and
    /// returns their paths.
    fn issue(&self, file: &str, cn: &str, names: &[&str], expired: bool) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca).expect("sign");
        let (cert_path, key_path) = (
            self.path(&format!("{file}.pem")),
            self.path(&format!("{file}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }

    /// The `tls` table of a pool reaching its backends as `sni` and trusting this CA, with
    /// `more` keys of that table (each starting with a comma).
    fn pool_tls(&self, sni: &str, more: &str) -> String {
        format!(
            r#"tls = {{ sni = "{sni}", ca = "{}"{more} }}"#,
            p(&self.path("ca.pem"))
        )
    }

    /// The keys of a listener's `tls` table (each starting with a comma) that ask its clients
    /// for a certificate this CA issued, as `auth` (required or optional) says.
    fn client_auth(&self, auth: &str) -> String {
        format!(
            r#", client_ca = "{}", client_auth = "{auth}""#,
            p(&self.path("ca.pem"))
        )
    }

    fn ca_roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("root");
        roots
    }

    /// A client configuration trusting this CA, offering `alpn`.
    fn client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(self.ca_roots())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A client configuration presenting `cert` / `key`.
    fn client_with_cert(&self, cert: &Path, key: &Path) -> Arc<rustls::ClientConfig> {
        let (chain, key) = load_pair(cert, key);
        Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(self.ca_roots())
                .with_client_auth_cert(chain, key)
                .expect("client cert"),
        )
    }

    /// A server configuration for a test backend with `cert` / `key`.
    fn server(&self, cert: &Path, key: &Path, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let (chain, key) = load_pair(cert, key);
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// The certificate chain at `cert` and the private key at `key`, as rustls takes them.
fn load_pair(cert: &Path, key: &Path) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = CertificateDer::pem_file_iter(cert)
        .expect("cert file")
        .collect::<Result<_, _>>()
        .expect("certs");
    (chain, PrivateKeyDer::from_pem_file(key).expect("key"))
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// The `tls` table of a listener serving the one certificate `cert` with its `key`, and `more`
/// keys of that table (each starting with a comma): most listeners here need no more.
fn one_certificate(cert: &Path, key: &Path, more: &str) -> String {
    format!(
        r#"tls = {{ certificates = [{{ cert = "{}", key = "{}" }}]{more} }}"#,
        p(cert),
        p(key)
    )
}

/// A listener `name` of `protocol` (http or tcp) sending everything to pool `pool`, with
/// `extra` lines in its table (its `tls` table, say).
fn listener_toml(name: &str, protocol: &str, pool: &str, extra: &str) -> String {
    let pool_key = if protocol == "tcp" {
        "pool"
    } else {
        "default_pool"
    };
    format!(
        r#"
        [[listeners]]
        name = "{name}"
        bind = "127.0.0.1:0"
        protocol = "{protocol}"
        {pool_key} = "{pool}"
        {extra}
        "#
    )
}

/// Pool `name` of the one `backend`, with `extra` lines in its table.
fn pool_toml(name: &str, backend: impl std::fmt::Display, extra: &str) -> String {
    format!(
        r#"
        [pools.{name}]
        backends = ["{backend}"]
        {extra}
        "#
    )
}

/// The `https` listener of a config only checked, never run, with `tls` as its table, in front
/// of a pool nobody connects to.
fn checked_https(tls: &str) -> String {
    listener_toml("https", "http", "web", tls) + &pool_toml("web", "127.0.0.1:9", "")
}

/// What `check` makes of the certificates and keys `toml` names.
fn tls_store(toml: &str) -> Result<TlsStore, Vec<switchyard::config::Problem>> {
    let config = Config::from_toml(toml, Path::new("t.toml")).expect("valid");
    TlsStore::build(&config)
}

/// The `(path, reason)` of each of `problems`, for asserting on them and printing them.
fn found(problems: &[switchyard::config::Problem]) -> Vec<(&str, &str)> {
    problems
        .iter()
        .map(|p| (p.path.as_str(), p.reason.as_str()))
        .collect()
}

/// Whether the stream is closed (EOF or an error) within [`PATIENCE`], whatever came before.
async fn closes<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> bool {
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest))
        .await
        .is_ok()
}

/// Connects with TLS, naming `sni`.
async fn tls_connect(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_owned()).expect("name");
    tokio::time::timeout(PATIENCE, TlsConnector::from(config).connect(name, tcp))
        .await
        .expect("handshake in time")
}

/// Connects to `addr` as a.example.com with `config` and sends a request: an error if the
/// handshake fails or the connection closes before an answer (TLS 1.3 reports a refused client
/// certificate on the first read), else how the handshake went.
async fn served(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<Option<rustls::HandshakeKind>> {
    let mut stream = tls_connect(addr, config, "a.example.com").await?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await?;
    let mut byte = [0u8; 1];
    match stream.read(&mut byte).await? {
        0 => Err(std::io::Error::other("closed")),
        _ => Ok(stream.get_ref().1.handshake_kind()),
    }
}

/// Sends `request` (a GET without a body) over HTTP/2 on `stream`, a TLS connection that
/// negotiated h2, and returns the answer's status and body.
async fn h2_exchange(
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    request: http::request::Builder,
) -> (http::StatusCode, String) {
    let (mut sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake::<_, http_body_util::Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(
                stream,
            ))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    let request = request.body(http_body_util::Empty::new()).expect("request");
    let response = tokio::time::timeout(PATIENCE, sender.send_request(request))
        .await
        .expect("in time")
        .expect("response");
    let status = response.status();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Sends `message` over `stream`, to an echoing backend, and checks that it comes back whole.
async fn echoed<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    message: &[u8],
) {
    stream.write_all(message).await.expect("write");
    stream.flush().await.expect("flush");
    let mut back = vec![0u8; message.len()];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut back))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(back, message);
}

/// The subject CN of the certificate the server showed.
fn peer_cn(stream: &tokio_rustls::client::TlsStream<TcpStream>) -> String {
    let chain = stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("certificates");
    let (_, cert) = x509_parser::parse_x509_certificate(chain[0].as_ref()).expect("parse");
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// Sends a GET over `stream` and reads the reply.
async fn get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    path: &str,
    extra: &str,
) -> Reply {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n").as_bytes())
        .await
        .expect("send");
    stream.flush().await.expect("flush");
    let mut buf = Vec::new();
    tokio::time::timeout(PATIENCE, read_reply(stream, &mut buf))
        .await
        .expect("reply in time")
        .expect("a reply")
}

/// An https listener with three certificates: an exact name, a wildcard, and a default.
fn terminating(pki: &Pki, backend: std::net::SocketAddr) -> Proxy {
    let (default_cert, default_key) = pki.issue("default", "default", &["default.test"], false);
    let (exact_cert, exact_key) = pki.issue("exact", "exact", &["a.example.com"], false);
    let (wild_cert, wild_key) = pki.issue("wild", "wild", &["*.example.com"], false);
    Proxy::start(&format!(
        r#"
        [[listeners]]
        name = "https"
        bind = "127.0.0.1:0"
        protocol = "http"
        default_pool = "web"
        tls = {{ certificates = [
            {{ cert = "{}", key = "{}" }},
            {{ cert = "{}", key = "{}" }},
            {{ cert = "{}", key = "{}" }},
        ] }}

        [pools.web]
        backends = ["{backend}"]
        "#,
        p(&default_cert),
        p(&default_key),
        p(&wild_cert),
        p(&wild_key),
        p(&exact_cert),
        p(&exact_key),
    ))
}

#[tokio::test]
async fn sni_picks_the_exact_then_wildcard_then_default_certificate() {
    let pki = Pki::new();
    let backend = http_backend("web").await;
    let proxy = terminating(&pki, backend.addr);
    let addr = proxy.addr("https");
    let mut config = (*pki.client(&[])).clone();
    // The default certificate does not name what the client asked for: accept it anyway here,
    // the point is which one is shown.
    config
        .dangerous()
        .set_certificate_verifier(Arc::new(AnyCert(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))));
    let config = Arc::new(config);
    for (sni, cn) in [
        ("a.example.com", "exact"),
        ("b.example.com", "wild"),
        ("x.b.example.com", "default"),
        ("other.test", "default"),
    ] {
        let stream = tls_connect(addr, Arc::clone(&config), sni)
            .await
            .expect("handshake");
        assert_eq!(peer_cn(&stream), cn, "certificate for {sni}");
    }
    // Verified for real: the exact and the wildcard names.
    for sni in ["a.example.com", "www.example.com"] {
        let mut stream = tls_connect(addr, pki.client(&[]), sni)
            .await
            .expect("verified handshake");
        let reply = get(&mut stream, "/", "").await;
        assert_eq!(reply.status, 200);
        assert!(
            reply.text().contains("x-forwarded-proto: https"),
            "{}",
            reply.text()
        );
    }
}

#[tokio::test]
async fn alpn_negotiates_http11_and_h2() {
    let pki = Pki::new();
    let backend = http_backend("web").await;
    let proxy = terminating(&pki, backend.addr);
    let addr = proxy.addr("https");

    let mut h1 = tls_connect(addr, pki.client(&[b"http/1.1"]), "a.example.com")
        .await
        .expect("handshake");
    assert_eq!(h1.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    // Keep-alive over TLS: several requests on one connection.
    for _ in 0..3 {
        assert_eq!(get(&mut h1, "/", "").await.status, 200);
    }

    let h2 = tls_connect(addr, pki.client(&[b"h2", b"http/1.1"]), "a.example.com")
        .await
        .expect("handshake");
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let request = http::Request::builder().uri("https://a.example.com/over-h2");
    let (status, text) = h2_exchange(h2, request).await;
    assert_eq!(status, 200);
    assert!(text.contains("GET /over-h2"), "{text}");
    assert!(text.contains("x-forwarded-proto: https"), "{text}");
}

/// A ClientHello offering at most TLS 1.1 (no supported_versions extension), with SNI.
fn tls11_client_hello() -> Vec<u8> {
    tls11_client_hello_naming(b"a.example.com")
}

/// [`tls11_client_hello`] with `name` as its server name, whatever it is.
fn tls11_client_hello_naming(name: &[u8]) -> Vec<u8> {
    let mut sni = Vec::new();
    sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name);
    let mut extensions = Vec::new();
    extensions.extend_from_slice(&[0, 0]);
    extensions.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    extensions.extend_from_slice(&sni);
    let mut body = vec![3, 2];
    body.extend_from_slice(&[7; 32]);
    body.push(0);
    // TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA and TLS_RSA_WITH_AES_128_CBC_SHA.
    body.extend_from_slice(&[0, 4, 0xc0, 0x13, 0x00, 0x2f, 1, 0]);
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend_from_slice(&extensions);
    let mut hello = vec![1, 0];
    hello.extend_from_slice(&(body.len() as u16).to_be_bytes());
    hello.extend_from_slice(&body);
    let mut record = vec![22, 3, 1];
    record.extend_from_slice(&(hello.len() as u16).to_be_bytes());
    record.extend_from_slice(&hello);
    record
}

/// The TLS library warns about what a peer sent (here an IP address as the server name, as
/// `wrk` sends it): a line per handshake that any client could repeat at will. Such lines are
/// for `debug` logs only, like every other per-connection event.
#[tokio::test]
async fn the_tls_librarys_warnings_about_a_peer_are_logged_at_debug_only() {
    use tokio::io::AsyncBufReadExt;
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "server", &["a.example.com"], false);
    let config = pki.path("quiet.toml");
    std::fs::write(
        &config,
        format!(
            "[[listeners]]\nname = \"https\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\n\
             default_pool = \"web\"\ntls = {{ certificates = [{{ cert = \"{}\", key = \"{}\" }}] }}\n\
             [pools.web]\nbackends = [\"127.0.0.1:9\"]\n",
            p(&cert),
            p(&key)
        ),
    )
    .expect("write config");
    for (level, shown) in [("info", false), ("debug", true)] {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["run", "--threads", "1", "--log-level", level, "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starts");
        let mut lines = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
        let addr = listening_addr(&mut lines).await;
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(&tls11_client_hello_naming(b"127.0.0.1"))
            .await
            .expect("send");
        let mut reply = Vec::new();
        tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut reply))
            .await
            .expect("the handshake is refused in time")
            .expect("read");
        // The library's line, if any, was written before the refusal reached the client.
        child.start_kill().expect("kill");
        let mut rest = String::new();
        while let Ok(Ok(Some(line))) = tokio::time::timeout(PATIENCE, lines.next_line()).await {
            rest.push_str(&line);
            rest.push('\n');
        }
        assert_eq!(
            rest.contains("IP address presented as hostname"),
            shown,
            "--log-level {level}: {rest}"
        );
    }
}

#[tokio::test]
async fn tls11_and_below_are_refused() {
    let pki = Pki::new();
    let backend = http_backend("web").await;
    let proxy = terminating(&pki, backend.addr);
    let mut tcp = TcpStream::connect(proxy.addr("https"))
        .await
        .expect("connect");
    tcp.write_all(&tls11_client_hello()).await.expect("send");
    let mut reply = Vec::new();
    let read = tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut reply)).await;
    assert!(read.is_ok(), "the connection is closed");
    // A fatal alert record (type 21), never a ServerHello (22).
    assert!(
        reply.first() == Some(&21),
        "answered a TLS 1.1 ClientHello with {reply:?}"
    );
    // A client limited to TLS 1.2 is served.
    let config = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
        .with_root_certificates(pki.ca_roots())
        .with_no_client_auth();
    let mut stream = tls_connect(proxy.addr("https"), Arc::new(config), "a.example.com")
        .await
        .expect("TLS 1.2 handshake");
    assert_eq!(get(&mut stream, "/", "").await.status, 200);
}

#[tokio::test]
async fn sessions_resume() {
    let pki = Pki::new();
    let backend = http_backend("web").await;
    let proxy = terminating(&pki, backend.addr);
    let addr = proxy.addr("https");
    for versions in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let config = Arc::new(
            rustls::ClientConfig::builder_with_protocol_versions(&[versions])
                .with_root_certificates(pki.ca_roots())
                .with_no_client_auth(),
        );
        let mut first = tls_connect(addr, Arc::clone(&config), "a.example.com")
            .await
            .expect("handshake");
        // A request, so that TLS 1.3 tickets (sent after the handshake) are read.
        assert_eq!(get(&mut first, "/", "").await.status, 200);
        let second = tls_connect(addr, config, "a.example.com")
            .await
            .expect("handshake");
        assert_eq!(
            second.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "{versions:?}"
        );
    }
}

#[tokio::test]
async fn check_reports_expired_and_mismatched_certificates_and_missing_files() {
    let pki = Pki::new();
    let (expired_cert, expired_key) = pki.issue("expired", "old", &["old.test"], true);
    let (good_cert, _) = pki.issue("good", "good", &["good.test"], false);
    let (_, other_key) = pki.issue("other", "other", &["other.test"], false);
    let garbage = pki.path("garbage.pem");
    std::fs::write(&garbage, "this is not PEM").expect("write");
    let store = tls_store(&checked_https(&one_certificate(
        &expired_cert,
        &expired_key,
        "",
    )))
    .expect("an expired certificate is only a warning");
    assert_eq!(store.warnings.len(), 1, "{:?}", store.warnings);
    assert_eq!(
        store.warnings[0].path,
        "listeners[0].tls.certificates[0].cert"
    );
    assert!(store.warnings[0].reason.contains("expired"));

    let problems = tls_store(&checked_https(&format!(
        r#"tls = {{ certificates = [{{ cert = "{}", key = "{}" }}, {{ cert = "{}", key = "{}" }}, {{ cert = "{}", key = "{}" }}] }}"#,
        p(&good_cert),
        p(&other_key),
        p(&pki.path("missing.pem")),
        p(&other_key),
        p(&garbage),
        p(&other_key),
    )))
    .expect_err("bad files");
    let text: Vec<String> = problems
        .iter()
        .map(|p| format!("{}: {}", p.path, p.reason))
        .collect();
    assert_eq!(problems.len(), 3, "{text:?}");
    assert!(
        text[0].starts_with("listeners[0].tls.certificates[0].key:")
            && text[0].contains("does not match"),
        "{text:?}"
    );
    assert!(
        text[1].starts_with("listeners[0].tls.certificates[1].cert:")
            && text[1].contains("cannot read"),
        "{text:?}"
    );
    assert!(
        text[2].starts_with("listeners[0].tls.certificates[2].cert:")
            && text[2].contains("no PEM certificate"),
        "{text:?}"
    );
}

#[test]
fn a_missing_certificate_and_its_missing_key_are_both_reported() {
    let pki = Pki::new();
    let (good_cert, _) = pki.issue("good", "good", &["good.test"], false);
    let garbage = pki.path("garbage.key");
    std::fs::write(&garbage, "this is not PEM").expect("write");
    let problems = tls_store(&checked_https(&format!(
        r#"tls = {{ certificates = [{{ cert = "{}", key = "{}" }}, {{ cert = "{}", key = "{}" }}, {{ cert = "{}", key = "{}" }}] }}"#,
        p(&pki.path("missing.pem")),
        p(&pki.path("missing.key")),
        p(&pki.path("missing.pem")),
        p(&garbage),
        p(&good_cert),
        p(&pki.path("missing.key")),
    )))
    .expect_err("bad files");
    let found = found(&problems);
    let has =
        |path: &str, reason: &str| found.iter().any(|(p, r)| *p == path && r.contains(reason));
    assert!(
        has("listeners[0].tls.certificates[0].cert", "cannot read"),
        "{found:#?}"
    );
    assert!(
        has("listeners[0].tls.certificates[0].key", "cannot read"),
        "{found:#?}"
    );
    assert!(
        has("listeners[0].tls.certificates[1].cert", "cannot read"),
        "{found:#?}"
    );
    assert!(
        has("listeners[0].tls.certificates[1].key", "no PEM private key"),
        "{found:#?}"
    );
    assert!(
        has("listeners[0].tls.certificates[2].key", "cannot read"),
        "{found:#?}"
    );
    assert_eq!(found.len(), 5, "{found:#?}");
}

#[test]
fn an_encrypted_key_or_one_of_an_unusable_kind_is_said_as_such_not_as_no_key() {
    let pki = Pki::new();
    let (cert, _) = pki.issue("good", "good", &["good.test"], false);
    let pkcs8 = pki.path("pkcs8-encrypted.key");
    std::fs::write(
        &pkcs8,
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
    )
    .expect("write");
    let legacy = pki.path("legacy-encrypted.key");
    std::fs::write(
        &legacy,
        "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n",
    )
    .expect("write");
    // A PKCS#8 section the crypto library cannot load (a curve or size it does not take).
    let unusable = pki.path("unusable.key");
    std::fs::write(
        &unusable,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    let problems = tls_store(&checked_https(&format!(
        r#"tls = {{ certificates = [{{ cert = "{0}", key = "{1}" }}, {{ cert = "{0}", key = "{2}" }}, {{ cert = "{0}", key = "{3}" }}] }}"#,
        p(&cert),
        p(&pkcs8),
        p(&legacy),
        p(&unusable),
    )))
    .expect_err("bad keys");
    let found = found(&problems);
    let has =
        |path: &str, reason: &str| found.iter().any(|(p, r)| *p == path && r.contains(reason));
    for i in 0..2 {
        assert!(
            has(
                &format!("listeners[0].tls.certificates[{i}].key"),
                "holds an encrypted private key"
            ),
            "{found:#?}"
        );
    }
    assert!(
        has(
            "listeners[0].tls.certificates[2].key",
            "holds a private key that cannot be used"
        ),
        "{found:#?}"
    );
    assert!(
        found.iter().all(|(_, r)| !r.contains("no PEM private key")),
        "{found:#?}"
    );
    assert_eq!(found.len(), 3, "{found:#?}");
}

/// A backend that terminates TLS with `config` and answers as [`http_backend`] does.
async fn https_backend(name: &'static str, config: Arc<rustls::ServerConfig>) -> Backend {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    Backend::start(move |tcp| {
        let acceptor = acceptor.clone();
        async move {
            if let Ok(stream) = acceptor.accept(tcp).await {
                serve_http(stream, name).await;
            }
        }
    })
    .await
}

/// A backend that speaks only HTTP/2 over TLS with `config` (ALPN h2, as gRPC servers do) and
/// answers every request with the body `answer` makes of it.
async fn h2_tls_backend<F>(config: Arc<rustls::ServerConfig>, answer: F) -> Backend
where
    F: Fn(&http::Request<hyper::body::Incoming>) -> String + Send + Sync + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let answer = Arc::new(answer);
    Backend::start(move |tcp| {
        let acceptor = acceptor.clone();
        let answer = Arc::clone(&answer);
        async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper::service::service_fn(move |request| {
                let body = answer(&request);
                async move {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from(body)),
                    ))
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        }
    })
    .await
}

#[tokio::test]
async fn upstream_tls_verifies_the_backend_and_a_wrong_ca_gives_502() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("backend", "backend", &["internal.example"], false);
    let backend = https_backend("secure", pki.server(&cert, &key, &[b"http/1.1"])).await;
    let other = Pki::new();
    let routes = r#"routes = [{ match = { path_prefix = "/wrong/" }, pool = "wrong" }]"#;
    let proxy = Proxy::start(
        &(listener_toml("plain", "http", "good", routes)
            + &pool_toml("good", backend.addr, &pki.pool_tls("internal.example", ""))
            + &pool_toml(
                "wrong",
                backend.addr,
                &other.pool_tls("internal.example", ""),
            )),
    );
    let mut client = HttpClient::connect(proxy.addr("plain")).await;
    for _ in 0..3 {
        let reply = client.get("/ok", "").await;
        assert_eq!(reply.status, 200);
        assert!(reply.text().starts_with("secure\n"), "{}", reply.text());
    }
    // Pooled: three requests, one TLS connection to the backend.
    assert_eq!(backend.accepted(), 1);
    let reply = client.get("/wrong/", "").await;
    assert_eq!(reply.status, 502);
}

#[tokio::test]
async fn upstream_h2_over_tls_with_alpn() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("backend", "backend", &["grpc.internal"], false);
    let backend = h2_tls_backend(pki.server(&cert, &key, &[b"h2"]), |request| {
        let proto = request
            .headers()
            .get("x-forwarded-proto")
            .map(|v| v.to_str().unwrap_or("").to_owned())
            .unwrap_or_default();
        format!("h2 backend {:?} {proto}", request.version())
    })
    .await;
    let pool_extra = format!(
        "upstream_protocol = \"h2\"\n{}",
        pki.pool_tls("grpc.internal", "")
    );
    let proxy = Proxy::start(
        &(listener_toml("plain", "http", "grpc", "")
            + &pool_toml("grpc", backend.addr, &pool_extra)),
    );
    let mut client = HttpClient::connect(proxy.addr("plain")).await;
    let reply = client.get("/", "").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "h2 backend HTTP/2.0 http");
}

#[tokio::test]
async fn mutual_tls_requires_a_certificate_and_forwards_its_subject() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "server", &["a.example.com"], false);
    let (client_cert, client_key) = pki.issue("alice", "alice", &["alice.clients.example"], false);
    let backend = http_backend("web").await;
    let listener = |name: &str, auth: &str| {
        let tls = one_certificate(&cert, &key, &pki.client_auth(auth));
        listener_toml(name, "http", "web", &tls)
    };
    let proxy = Proxy::start(
        &(listener("required", "required")
            + &listener("optional", "optional")
            + &listener_toml("plain", "http", "web", "")
            + &pool_toml("web", backend.addr, "")),
    );
    let forged = "X-Client-Cert-Subject: CN=mallory\r\nx-client-cert-san: DNS:evil\r\n";

    // Required: no certificate, no service.
    assert!(
        served(proxy.addr("required"), pki.client(&[]))
            .await
            .is_err(),
        "served a client without a certificate"
    );

    // With a certificate: its subject and SAN reach the backend, the forged ones do not.
    let config = pki.client_with_cert(&client_cert, &client_key);
    let mut stream = tls_connect(proxy.addr("required"), config, "a.example.com")
        .await
        .expect("handshake");
    let text = get(&mut stream, "/", forged).await.text();
    assert!(text.contains("x-client-cert-subject: CN=alice"), "{text}");
    assert!(
        text.contains("x-client-cert-san: DNS:alice.clients.example"),
        "{text}"
    );
    assert!(
        !text.contains("mallory") && !text.contains("evil"),
        "{text}"
    );

    // Optional: served without a certificate, and the forged fields are still dropped.
    let mut stream = tls_connect(proxy.addr("optional"), pki.client(&[]), "a.example.com")
        .await
        .expect("handshake");
    let text = get(&mut stream, "/", forged).await.text();
    assert!(
        !text.to_ascii_lowercase().contains("x-client-cert"),
        "{text}"
    );

    // Over HTTP/2 (ALPN) the same: the certificate's fields, never the client's.
    let mut h2_config = (*pki.client_with_cert(&client_cert, &client_key)).clone();
    h2_config.alpn_protocols = vec![b"h2".to_vec()];
    let stream = tls_connect(proxy.addr("required"), Arc::new(h2_config), "a.example.com")
        .await
        .expect("handshake");
    let request = http::Request::builder()
        .uri("https://a.example.com/h2")
        .header("x-client-cert-subject", "CN=mallory");
    let (_, text) = h2_exchange(stream, request).await;
    assert!(text.contains("x-client-cert-subject: CN=alice"), "{text}");
    assert!(!text.contains("mallory"), "{text}");

    // Plain listeners drop them too.
    let mut client = HttpClient::connect(proxy.addr("plain")).await;
    let text = client.get("/", forged).await.text();
    assert!(
        !text.to_ascii_lowercase().contains("x-client-cert"),
        "{text}"
    );
}

#[tokio::test]
async fn sni_passthrough_lands_each_name_on_its_pool() {
    let pki = Pki::new();
    let (a_cert, a_key) = pki.issue("a", "a", &["a.example.com"], false);
    let (b_cert, b_key) = pki.issue("b", "b", &["*.b.example.com"], false);
    let (d_cert, d_key) = pki.issue("d", "d", &["default.example.com"], false);
    let a = https_backend("pool-a", pki.server(&a_cert, &a_key, &[])).await;
    let b = https_backend("pool-b", pki.server(&b_cert, &b_key, &[])).await;
    let d = https_backend("pool-default", pki.server(&d_cert, &d_key, &[])).await;
    let proxy = Proxy::start(&format!(
        r#"
        [[listeners]]
        name = "pass"
        bind = "127.0.0.1:0"
        protocol = "tcp"
        pool = "default"
        sni_routes = [
            {{ sni = "a.example.com", pool = "a" }},
            {{ sni = "*.b.example.com", pool = "b" }},
        ]
        client_hello_timeout = "500ms"

        [pools.a]
        backends = ["{}"]
        [pools.b]
        backends = ["{}"]
        [pools.default]
        backends = ["{}"]
        "#,
        a.addr, b.addr, d.addr
    ));
    let addr = proxy.addr("pass");
    for (sni, expected) in [
        ("a.example.com", "pool-a"),
        ("x.b.example.com", "pool-b"),
        ("default.example.com", "pool-default"),
    ] {
        // The backend's own certificate verifies: the TLS went through untouched.
        let mut stream = tls_connect(addr, pki.client(&[]), sni)
            .await
            .expect("handshake with the backend");
        let reply = get(&mut stream, "/", "").await;
        assert!(
            reply.text().starts_with(&format!("{expected}\n")),
            "{sni}: {}",
            reply.text()
        );
    }

    // A truncated ClientHello, then silence: closed after the timeout; others are served
    // meanwhile.
    let hello = tls11_client_hello();
    let mut stalled = TcpStream::connect(addr).await.expect("connect");
    stalled.write_all(&hello[..20]).await.expect("send");
    let mut served = tls_connect(addr, pki.client(&[]), "a.example.com")
        .await
        .expect("handshake");
    assert!(
        get(&mut served, "/", "")
            .await
            .text()
            .starts_with("pool-a\n")
    );
    assert!(
        closes(&mut stalled).await,
        "a stalled ClientHello is cut off"
    );

    // Garbage and an oversized record close only their own connection.
    let mut garbage = TcpStream::connect(addr).await.expect("connect");
    garbage
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .await
        .expect("send");
    assert!(closes(&mut garbage).await);
    let mut huge = TcpStream::connect(addr).await.expect("connect");
    let _ = huge.write_all(&[22, 3, 1, 0xff, 0xff]).await;
    assert!(closes(&mut huge).await);
    assert_eq!(a.accepted() + b.accepted() + d.accepted(), 4);
}

#[tokio::test]
async fn plain_http_and_stalled_handshakes_on_a_tls_port() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "server", &["a.example.com"], false);
    let backend = http_backend("web").await;
    let tls = one_certificate(&cert, &key, r#", handshake_timeout = "300ms""#);
    let proxy = Proxy::start(
        &(listener_toml("https", "http", "web", &tls) + &pool_toml("web", backend.addr, "")),
    );
    let addr = proxy.addr("https");
    // Plain HTTP gets a 400 that says why.
    let mut client = HttpClient::connect(addr).await;
    let reply = client.get("/", "").await;
    assert_eq!(reply.status, 400);
    assert!(reply.text().contains("HTTPS"), "{}", reply.text());

    // A handshake that stops halfway (part of a ClientHello) is cut off at the timeout,
    // and one that never starts too; a real client is served meanwhile.
    let hello = tls11_client_hello();
    let mut half = TcpStream::connect(addr).await.expect("connect");
    half.write_all(&hello[..30]).await.expect("send");
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let mut stream = tls_connect(addr, pki.client(&[]), "a.example.com")
        .await
        .expect("handshake");
    assert_eq!(get(&mut stream, "/", "").await.status, 200);
    for stalled in [&mut half, &mut silent] {
        assert!(closes(stalled).await, "stalled handshake closed");
    }
    assert_eq!(backend.accepted(), 1);
    // Each failed handshake is counted: the plain request and the two stalled ones.
    let failures = &proxy.handle.metrics().listener("https").tls_failures;
    eventually("three failed handshakes counted", || {
        failures.load(std::sync::atomic::Ordering::SeqCst) == 3
    })
    .await;
}

/// Accepts any certificate, for tests that look at which one is shown.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[tokio::test]
async fn http_health_checks_speak_the_pools_tls() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("backend", "backend", &["internal.example"], false);
    let backend = https_backend("secure", pki.server(&cert, &key, &[b"http/1.1"])).await;
    let pool_extra = format!(
        "{}\n{}",
        pki.pool_tls("internal.example", ""),
        r#"health = { kind = "http", interval = "200ms", timeout = "200ms", rise = 1, fall = 2 }"#
    );
    let proxy = Proxy::start(
        &(listener_toml("plain", "http", "secure", "")
            + &pool_toml("secure", backend.addr, &pool_extra)),
    );
    // Several probes pass: the backend speaks only TLS.
    let state = proxy
        .registry
        .get("secure", backend.addr)
        .expect("backend state");
    eventually("probes pass", || {
        state
            .probes_passed
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3
    })
    .await;
    assert_eq!(
        state.flags() & switchyard::backend::DOWN,
        0,
        "a TLS backend passes HTTP probes made over TLS"
    );
    let mut client = HttpClient::connect(proxy.addr("plain")).await;
    assert_eq!(client.get("/", "").await.status, 200);
}

#[tokio::test]
async fn a_tcp_listener_terminates_tls_and_forwards_the_plain_bytes() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "server", &["db.example.com"], false);
    let backend = Backend::echo().await;
    let proxy = Proxy::start(
        &(listener_toml("tls-tcp", "tcp", "echo", &one_certificate(&cert, &key, ""))
            + &pool_toml("echo", backend.addr, "")),
    );
    // Plain bytes where a ClientHello belongs: refused, and counted.
    let mut plain = TcpStream::connect(proxy.addr("tls-tcp"))
        .await
        .expect("connect");
    plain.write_all(b"HELLO?\r\n").await.expect("send");
    let mut nothing = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, plain.read_to_end(&mut nothing))
        .await
        .expect("closed in time");
    let failures = &proxy.handle.metrics().listener("tls-tcp").tls_failures;
    eventually("the failed handshake counted", || {
        failures.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    let mut stream = tls_connect(proxy.addr("tls-tcp"), pki.client(&[]), "db.example.com")
        .await
        .expect("handshake");
    for message in [&b"hello"[..], &[7u8; 40_000][..]] {
        echoed(&mut stream, message).await;
    }
    // Half-close: the client's close_notify ends the backend's input; the connection closes.
    stream.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest))
        .await
        .expect("closed in time");
}

#[tokio::test]
async fn websocket_upgrades_work_over_tls() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "server", &["a.example.com"], false);
    let backend = Backend::start(|mut stream| async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let _ = stream
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            .await;
        let (mut r, mut w) = stream.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await;
    let proxy = Proxy::start(
        &(listener_toml("https", "http", "ws", &one_certificate(&cert, &key, ""))
            + &pool_toml("ws", backend.addr, "")),
    );
    let mut stream = tls_connect(
        proxy.addr("https"),
        pki.client(&[b"http/1.1"]),
        "a.example.com",
    )
    .await
    .expect("handshake");
    stream
        .write_all(b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .expect("send");
    stream.flush().await.expect("flush");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.expect("101 head");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    echoed(&mut stream, b"frame").await;
}

#[tokio::test]
async fn a_reload_rereads_certificates_and_refuses_garbage_keeping_the_old_one() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "first", &["a.example.com"], false);
    let backend = http_backend("web").await;
    let toml = listener_toml("https", "http", "web", &one_certificate(&cert, &key, ""))
        + &pool_toml("web", backend.addr, "");
    let proxy = Proxy::start(&toml);
    let addr = proxy.addr("https");
    let resuming = pki.client(&[]);
    let mut stream = tls_connect(addr, Arc::clone(&resuming), "a.example.com")
        .await
        .expect("handshake");
    assert_eq!(peer_cn(&stream), "first");
    assert_eq!(get(&mut stream, "/", "").await.status, 200);

    // A renewed certificate at the same paths: a reload reads it, new handshakes show it.
    pki.issue("server", "renewed", &["a.example.com"], false);
    proxy.reload(&toml).await.expect("reloads");
    // Ticket keys outlive the reload: the session from before resumes.
    let resumed = tls_connect(addr, resuming, "a.example.com")
        .await
        .expect("handshake");
    assert_eq!(
        resumed.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    let stream = tls_connect(addr, pki.client(&[]), "a.example.com")
        .await
        .expect("handshake");
    assert_eq!(peer_cn(&stream), "renewed");

    // Garbage in its place: the reload is refused, naming the file, and the certificate
    // already loaded keeps serving.
    std::fs::write(
        &cert,
        b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    )
    .expect("overwrite");
    let error = proxy.reload(&toml).await.expect_err("garbage is refused");
    let text = error.to_string();
    assert!(
        text.contains("listeners[0].tls.certificates[0].cert") && text.contains(&p(&cert)),
        "{text}"
    );
    assert!(tls_store(&toml).is_err(), "check reports it too");
    let mut stream = tls_connect(addr, pki.client(&[]), "a.example.com")
        .await
        .expect("the old certificate still serves");
    assert_eq!(peer_cn(&stream), "renewed");
    assert_eq!(get(&mut stream, "/", "").await.status, 200);
}

#[tokio::test]
async fn a_flood_of_stalled_handshakes_is_bounded_and_drains() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "server", &["a.example.com"], false);
    let backend = http_backend("web").await;
    let tls = one_certificate(&cert, &key, r#", handshake_timeout = "200ms""#);
    let proxy = Proxy::start(
        &(listener_toml(
            "https",
            "http",
            "web",
            &format!("max_connections = 4\n{tls}"),
        ) + &pool_toml("web", backend.addr, "")),
    );
    let addr = proxy.addr("https");
    // Twelve clients that connect and never send a byte: at most four hold a slot at a time,
    // the others wait in the kernel's backlog, and each is cut off at the handshake timeout.
    let mut flood = Vec::new();
    for _ in 0..12 {
        flood.push(TcpStream::connect(addr).await.expect("connect"));
    }
    let mut stream = tls_connect(addr, pki.client(&[]), "a.example.com")
        .await
        .expect("served once the stalled handshakes time out");
    assert_eq!(get(&mut stream, "/", "").await.status, 200);
    for mut stalled in flood {
        assert!(closes(&mut stalled).await);
    }
}

#[tokio::test]
async fn a_pool_presents_its_client_certificate_to_backends_that_require_one() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("backend", "backend", &["internal.example"], false);
    let (client_cert, client_key) = pki.issue("lb", "lb", &["lb.internal.example"], false);
    let (chain, key) = load_pair(&cert, &key);
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(pki.ca_roots()))
        .build()
        .expect("verifier");
    let config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server config");
    let backend = https_backend("mutual", Arc::new(config)).await;
    let routes = r#"routes = [{ match = { path_prefix = "/without/" }, pool = "without-cert" }]"#;
    let presented = format!(
        r#", cert = "{}", key = "{}""#,
        p(&client_cert),
        p(&client_key)
    );
    let proxy = Proxy::start(
        &(listener_toml("plain", "http", "with-cert", routes)
            + &pool_toml(
                "with-cert",
                backend.addr,
                &pki.pool_tls("internal.example", &presented),
            )
            + &pool_toml(
                "without-cert",
                backend.addr,
                &pki.pool_tls("internal.example", ""),
            )),
    );
    let mut client = HttpClient::connect(proxy.addr("plain")).await;
    let reply = client.get("/", "").await;
    assert_eq!(reply.status, 200);
    assert!(reply.text().starts_with("mutual\n"));
    let reply = client.get("/without/", "").await;
    assert_eq!(reply.status, 502);
}

#[test]
fn switchyard_check_warns_about_expiry_and_fails_on_a_mismatched_key() {
    let pki = Pki::new();
    let (expired_cert, expired_key) = pki.issue("expired", "old", &["old.test"], true);
    let (_, other_key) = pki.issue("other", "other", &["other.test"], false);
    let write = |name: &str, cert: &Path, key: &Path| {
        let path = pki.path(name);
        std::fs::write(
            &path,
            format!(
                "[[listeners]]\nname = \"https\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\n\
                 default_pool = \"web\"\ntls = {{ certificates = [{{ cert = \"{}\", key = \"{}\" }}] }}\n\
                 [pools.web]\nbackends = [\"127.0.0.1:9\"]\n",
                p(cert),
                p(key)
            ),
        )
        .expect("write config");
        path
    };
    let check = |config: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["check", "--config"])
            .arg(config)
            .output()
            .expect("runs")
    };
    let out = check(&write("expired.toml", &expired_cert, &expired_key));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("listeners[0].tls.certificates[0].cert: warning: the certificate expired"),
        "{stderr}"
    );
    let out = check(&write("mismatch.toml", &expired_cert, &other_key));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("listeners[0].tls.certificates[0].key: the key in"),
        "{stderr}"
    );
}

/// Both ends stream at once, and the backend reads only once it has written everything (as a
/// server that sends a whole response before reading what else came does): the proxy must
/// keep the backend-to-client direction moving while the backend does not read, or each side
/// ends up waiting for the other to read.
#[tokio::test]
async fn a_tls_terminated_tcp_connection_moves_both_ways_at_once() {
    // More than the socket buffers along the way can hold.
    const TOTAL: usize = 32 << 20;
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "server", &["db.example.com"], false);
    let backend = Backend::start(|mut stream| async move {
        let chunk = vec![5u8; 1 << 16];
        for _ in 0..TOTAL / chunk.len() {
            if stream.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let mut sink = vec![0u8; 1 << 16];
        let mut got = 0;
        while got < TOTAL {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
        let _ = stream.write_all(b"all read").await;
    })
    .await;
    let proxy = Proxy::start(
        &(listener_toml("tls-tcp", "tcp", "p", &one_certificate(&cert, &key, ""))
            + &pool_toml("p", backend.addr, "")),
    );
    let stream = tls_connect(proxy.addr("tls-tcp"), pki.client(&[]), "db.example.com")
        .await
        .expect("handshake");
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 1 << 16];
        for _ in 0..TOTAL / chunk.len() {
            w.write_all(&chunk).await.expect("write");
        }
        w.flush().await.expect("flush");
        w
    });
    let mut got = 0usize;
    let mut received = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = tokio::time::timeout(PATIENCE, r.read(&mut buf))
            .await
            .expect("the backend's bytes keep coming")
            .expect("read");
        if n == 0 {
            break;
        }
        // Only the count of the stream and its last bytes matter.
        received.extend_from_slice(&buf[..n]);
        if received.len() > 64 {
            let keep = received.split_off(received.len() - 64);
            received = keep;
        }
        got += n;
    }
    assert_eq!(got, TOTAL + b"all read".len());
    assert!(received.ends_with(b"all read"), "the backend read it all");
    tokio::time::timeout(PATIENCE, writer)
        .await
        .expect("the client's bytes all went")
        .expect("writer");
}

/// A tcp listener that terminates TLS, with an access log, in front of `backend`.
fn terminating_tcp(pki: &Pki, backend: std::net::SocketAddr, log: &Path) -> Proxy {
    let (cert, key) = pki.issue("server", "server", &["db.example.com"], false);
    let tls = one_certificate(&cert, &key, "");
    let log = format!(r#"access_log = {{ path = "{}" }}"#, p(log));
    Proxy::start(
        &(listener_toml("tls-tcp", "tcp", "p", &format!("{tls}\n{log}"))
            + &pool_toml("p", backend, "")),
    )
}

#[tokio::test]
async fn a_tls_terminated_tcp_connection_gets_its_access_log_line() {
    let pki = Pki::new();
    let backend = Backend::echo().await;
    let log = pki.path("access.log");
    let proxy = terminating_tcp(&pki, backend.addr, &log);
    let mut stream = tls_connect(proxy.addr("tls-tcp"), pki.client(&[]), "db.example.com")
        .await
        .expect("handshake");
    echoed(&mut stream, b"hello").await;
    stream.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest))
        .await
        .expect("closed in time");
    let line = json_lines(&log, 1).await.remove(0);
    assert_eq!(line["protocol"], "tcp");
    assert_eq!(line["listener"], "tls-tcp");
    assert_eq!(line["backend"], backend.addr.to_string());
    assert_eq!(line["bytes_sent"], 5);
    assert_eq!(line["bytes_received"], 5);
    assert_eq!(line["outcome"], "closed");
}

#[tokio::test]
async fn a_client_reset_on_a_tls_terminated_tcp_listener_reaches_the_backend_as_a_reset() {
    let (seen_tx, seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let (end_tx, mut end_rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = Backend::start(move |mut stream| {
        let (seen_tx, end_tx) = (seen_tx.clone(), end_tx.clone());
        async move {
            let mut first = [0u8; 7];
            if stream.read_exact(&mut first).await.is_err() {
                return;
            }
            let _ = seen_tx.send(());
            let mut rest = Vec::new();
            let end = stream.read_to_end(&mut rest).await.map_err(|e| e.kind());
            let _ = end_tx.send(end);
        }
    })
    .await;
    let mut seen_rx = seen_rx;
    let pki = Pki::new();
    let log = pki.path("access.log");
    let proxy = terminating_tcp(&pki, backend.addr, &log);
    let mut stream = tls_connect(proxy.addr("tls-tcp"), pki.client(&[]), "db.example.com")
        .await
        .expect("handshake");
    stream.write_all(b"partial").await.expect("write");
    stream.flush().await.expect("flush");
    tokio::time::timeout(PATIENCE, seen_rx.recv())
        .await
        .expect("the backend got the bytes in time");
    // The client fails: its socket is reset.
    let _ = socket2::SockRef::from(stream.get_ref().0).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
    let end = tokio::time::timeout(PATIENCE, end_rx.recv())
        .await
        .expect("the backend's connection ended in time")
        .expect("an end");
    // Not a FIN, which the backend would take for the end of what the client meant to send.
    assert_eq!(end.err(), Some(std::io::ErrorKind::ConnectionReset));
    let line = json_lines(&log, 1).await.remove(0);
    assert_eq!(line["outcome"], "error");
    assert_eq!(line["bytes_sent"], 7);
}

#[tokio::test]
async fn a_tls_client_that_closes_without_close_notify_ends_with_a_fin_and_loses_nothing() {
    let (end_tx, mut end_rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = Backend::start(move |mut stream| {
        let end_tx = end_tx.clone();
        async move {
            // A greeting first: once the client has read it, it has read everything the proxy
            // sent before (its session tickets), and its close is a FIN, not a reset for
            // unread bytes.
            let _ = stream.write_all(b"ready\n").await;
            let mut got = Vec::new();
            let end = stream.read_to_end(&mut got).await.map_err(|e| e.kind());
            let _ = end_tx.send((end.map(|_| ()), got.len()));
        }
    })
    .await;
    let pki = Pki::new();
    let log = pki.path("access.log");
    let proxy = terminating_tcp(&pki, backend.addr, &log);
    let mut stream = tls_connect(proxy.addr("tls-tcp"), pki.client(&[]), "db.example.com")
        .await
        .expect("handshake");
    let mut greeting = [0u8; 6];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut greeting))
        .await
        .expect("greeting in time")
        .expect("greeting");
    // Many clients end so: the last bytes, then the TCP connection closed, no close_notify.
    let data = vec![b'x'; 256 * 1024];
    stream.write_all(&data).await.expect("write");
    stream.flush().await.expect("flush");
    let (tcp, _) = stream.into_inner();
    drop(tcp);
    let (end, received) = tokio::time::timeout(PATIENCE, end_rx.recv())
        .await
        .expect("the backend's connection ended in time")
        .expect("an end");
    assert_eq!(end, Ok(()), "an end of stream, not a reset");
    assert_eq!(received, data.len());
    let line = json_lines(&log, 1).await.remove(0);
    assert_eq!(line["outcome"], "closed");
}

#[tokio::test]
async fn an_sni_route_written_with_a_trailing_dot_matches_its_name() {
    let pki = Pki::new();
    let (a_cert, a_key) = pki.issue("a", "a", &["a.example.com", "x.b.example.com"], false);
    let a = https_backend("pool-a", pki.server(&a_cert, &a_key, &[])).await;
    let d = https_backend("pool-default", pki.server(&a_cert, &a_key, &[])).await;
    let proxy = Proxy::start(&format!(
        r#"
        [[listeners]]
        name = "pass"
        bind = "127.0.0.1:0"
        protocol = "tcp"
        pool = "default"
        sni_routes = [
            {{ sni = "A.Example.com.", pool = "a" }},
            {{ sni = "*.b.example.com.", pool = "a" }},
        ]

        [pools.a]
        backends = ["{}"]
        [pools.default]
        backends = ["{}"]
        "#,
        a.addr, d.addr
    ));
    for name in ["a.example.com", "x.b.example.com"] {
        let mut stream = tls_connect(proxy.addr("pass"), pki.client(&[]), name)
            .await
            .expect("handshake with the backend");
        let reply = get(&mut stream, "/", "").await;
        assert!(
            reply.text().starts_with("pool-a\n"),
            "{name}: {}",
            reply.text()
        );
    }
}

#[tokio::test]
async fn a_backend_reset_during_an_upload_reaches_a_tls_client_as_a_failure() {
    // Reads a little of the upload, then resets.
    let backend = Backend::start(|mut stream| async move {
        let mut some = vec![0u8; 64 * 1024];
        let _ = stream.read_exact(&mut some).await;
        let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
        drop(stream);
    })
    .await;
    let pki = Pki::new();
    let log = pki.path("access.log");
    let proxy = terminating_tcp(&pki, backend.addr, &log);
    for _ in 0..5 {
        let stream = tls_connect(proxy.addr("tls-tcp"), pki.client(&[]), "db.example.com")
            .await
            .expect("handshake");
        let (mut r, mut w) = tokio::io::split(stream);
        let writer = tokio::spawn(async move {
            let chunk = vec![1u8; 64 * 1024];
            for _ in 0..1024 {
                if w.write_all(&chunk).await.is_err() || w.flush().await.is_err() {
                    return;
                }
            }
        });
        let mut got = Vec::new();
        let end = tokio::time::timeout(PATIENCE, r.read_to_end(&mut got))
            .await
            .expect("the end reaches the client in time");
        // A close_notify would tell the client the stream ended as the backend meant it to.
        assert!(end.is_err(), "a clean TLS close after a backend's reset");
        let _ = writer.await;
    }
}

#[tokio::test]
async fn an_http10_client_that_offers_only_http10_through_alpn_is_served() {
    // `curl --http1.0` offers ALPN "http/1.0" alone; a server that refuses a protocol it
    // speaks would end the handshake with no_application_protocol.
    let pki = Pki::new();
    let backend = http_backend("web").await;
    let proxy = terminating(&pki, backend.addr);
    let mut stream = tls_connect(
        proxy.addr("https"),
        pki.client(&[b"http/1.0"]),
        "a.example.com",
    )
    .await
    .expect("handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.0"[..]));
    stream
        .write_all(b"GET /old HTTP/1.0\r\nHost: test\r\n\r\n")
        .await
        .expect("send");
    let mut buf = Vec::new();
    let reply = tokio::time::timeout(PATIENCE, read_reply(&mut stream, &mut buf))
        .await
        .expect("reply in time")
        .expect("a reply");
    assert_eq!(reply.status, 200);
    assert!(reply.text().contains("GET /old"), "{}", reply.text());
}

#[test]
fn a_certificate_not_valid_yet_gets_a_warning() {
    // Issued with a wrong clock, or installed ahead of its start: every client would refuse
    // it, so `check` and the start say so, as they do for an expired one.
    let pki = Pki::new();
    let mut params = CertificateParams::new(vec!["early.test".to_owned()]).expect("params");
    params.distinguished_name.push(DnType::CommonName, "early");
    params.not_before = rcgen::date_time_ymd(2099, 1, 1);
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &pki.ca).expect("sign");
    let (cert_path, key_path) = (pki.path("early.pem"), pki.path("early.key"));
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    let store = tls_store(&checked_https(&one_certificate(&cert_path, &key_path, "")))
        .expect("only a warning");
    assert_eq!(store.warnings.len(), 1, "{:?}", store.warnings);
    assert_eq!(
        store.warnings[0].path,
        "listeners[0].tls.certificates[0].cert"
    );
    assert!(
        store.warnings[0]
            .reason
            .contains("not valid before 2099-01-01"),
        "{:?}",
        store.warnings[0]
    );
}

#[tokio::test]
async fn http_health_checks_of_an_h2_pool_speak_http2() {
    // A backend that speaks only HTTP/2 (ALPN h2, as gRPC servers do): a probe must use the
    // protocol the pool's ALPN chose, or it fails on every backend.
    let pki = Pki::new();
    let (cert, key) = pki.issue("backend", "backend", &["grpc.internal"], false);
    let probes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&probes);
    let backend = h2_tls_backend(pki.server(&cert, &key, &[b"h2"]), move |request| {
        if let Ok(mut seen) = seen.lock() {
            seen.push(format!(
                "{} {} {:?}",
                request.method(),
                request.uri(),
                request.version()
            ));
        }
        "ok".to_owned()
    })
    .await;
    let pool_extra = format!(
        "upstream_protocol = \"h2\"\n{}\n{}",
        pki.pool_tls("grpc.internal", ""),
        r#"health = { kind = "http", path = "/healthz", host = "grpc.internal", interval = "200ms", timeout = "200ms", rise = 1, fall = 1 }"#
    );
    let proxy = Proxy::start(
        &(listener_toml("plain", "http", "grpc", "")
            + &pool_toml("grpc", backend.addr, &pool_extra)),
    );
    let state = proxy.registry.get("grpc", backend.addr).expect("known");
    let count = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed);
    eventually("three probes", || {
        count(&state.probes_passed) + count(&state.probes_failed) >= 3
    })
    .await;
    assert_eq!(count(&state.probes_failed), 0, "{:?}", probes.lock().ok());
    assert!(state.is_usable(), "flags {}", state.flags());
    let seen = probes.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(
        seen.iter()
            .all(|p| p == "GET https://grpc.internal/healthz HTTP/2.0"),
        "{seen:?}"
    );
    // One connection carries the probes.
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn a_session_of_another_listener_does_not_resume_past_a_client_certificate_requirement() {
    // Resumption skips the client's certificate: a session from a listener that asks for none
    // must not open one that requires it (the same name, the same process).
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "server", &["a.example.com"], false);
    let backend = http_backend("web").await;
    let required = one_certificate(&cert, &key, &pki.client_auth("required"));
    let proxy = Proxy::start(
        &(listener_toml("open", "http", "web", &one_certificate(&cert, &key, ""))
            + &listener_toml("required", "http", "web", &required)
            + &pool_toml("web", backend.addr, "")),
    );
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let client = Arc::new(
            rustls::ClientConfig::builder_with_protocol_versions(&[version])
                .with_root_certificates(pki.ca_roots())
                .with_no_client_auth(),
        );
        let mut stream = tls_connect(proxy.addr("open"), Arc::clone(&client), "a.example.com")
            .await
            .expect("handshake");
        assert_eq!(get(&mut stream, "/", "").await.status, 200);
        drop(stream);
        // The same client session store offers that session to the other listener.
        let outcome = served(proxy.addr("required"), Arc::clone(&client)).await;
        assert!(
            outcome.is_err(),
            "{version:?}: served without a certificate ({outcome:?})"
        );
    }
}

#[tokio::test]
async fn a_reload_that_changes_the_client_ca_ends_the_sessions_it_vouched_for() {
    let pki = Pki::new();
    let other = Pki::new();
    let (cert, key) = pki.issue("server", "server", &["a.example.com"], false);
    let (client_cert, client_key) = pki.issue("alice", "alice", &["alice.clients.example"], false);
    let backend = http_backend("web").await;
    let config = |ca: &Pki| {
        let tls = one_certificate(&cert, &key, &ca.client_auth("required"));
        listener_toml("required", "http", "web", &tls) + &pool_toml("web", backend.addr, "")
    };
    let proxy = Proxy::start(&config(&pki));
    let addr = proxy.addr("required");
    let alice = pki.client_with_cert(&client_cert, &client_key);
    let mut stream = tls_connect(addr, Arc::clone(&alice), "a.example.com")
        .await
        .expect("handshake");
    assert_eq!(get(&mut stream, "/", "").await.status, 200);
    drop(stream);

    // The same file again: sessions resume (the ticket keys and session cache are kept).
    proxy.reload(&config(&pki)).await.expect("reload");
    let mut stream = tls_connect(addr, Arc::clone(&alice), "a.example.com")
        .await
        .expect("handshake");
    assert_eq!(
        stream.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    assert_eq!(get(&mut stream, "/", "").await.status, 200);
    drop(stream);

    // Alice's CA is no longer trusted: her session must not carry her in.
    proxy.reload(&config(&other)).await.expect("reload");
    let outcome = served(addr, Arc::clone(&alice)).await;
    assert!(
        outcome.is_err(),
        "served after the CA changed ({outcome:?})"
    );
}

#[test]
fn a_route_host_that_no_certificate_of_its_listener_names_gets_a_warning() {
    // Clients asking for such a host get the first certificate, which does not name it, and
    // refuse the connection: `check` says so, though a start serves it.
    let pki = Pki::new();
    let (a_cert, a_key) = pki.issue("a", "a", &["a.test", "*.wild.test"], false);
    let (b_cert, b_key) = pki.issue("b", "b", &["b.test"], false);
    let store = tls_store(
        &format!(
            r#"
            [[listeners]]
            name = "https"
            bind = "127.0.0.1:0"
            protocol = "http"
            default_pool = "web"
            tls = {{ certificates = [{{ cert = "{}", key = "{}" }}, {{ cert = "{}", key = "{}" }}] }}
            routes = [
                {{ match = {{ host = "b.test" }}, pool = "web" }},
                {{ match = {{ host = "x.wild.test" }}, pool = "web" }},
                {{ match = {{ host = "*.wild.test" }}, pool = "web" }},
                {{ match = {{ host = "missing.test" }}, pool = "web" }},
                {{ match = {{ host = "*.other.test" }}, pool = "web" }},
                {{ match = {{ host = "admin.*" }}, pool = "web" }},
            ]

            [[listeners]]
            name = "plain"
            bind = "127.0.0.1:0"
            protocol = "http"
            routes = [{{ match = {{ host = "missing.test" }}, pool = "web" }}]

            [pools.web]
            backends = ["127.0.0.1:9"]
            "#,
            p(&a_cert),
            p(&a_key),
            p(&b_cert),
            p(&b_key)
        ),
    )
    .expect("only warnings");
    let paths: Vec<&str> = store.warnings.iter().map(|w| w.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "listeners[0].routes[3].match.host",
            "listeners[0].routes[4].match.host"
        ],
        "{:#?}",
        store.warnings
    );
    assert!(
        store.warnings[0].reason.contains("missing.test")
            && store.warnings[0].reason.contains("certificates[0]"),
        "{:#?}",
        store.warnings
    );
}

#[test]
fn a_certificate_that_is_not_x509_is_named_by_its_place_in_the_file() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("good", "good", &["good.test"], false);
    // A good leaf, then a block that is PEM but not a certificate.
    let chain = pki.path("chain.pem");
    let mut text = std::fs::read_to_string(&cert).expect("read");
    text.push_str("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
    std::fs::write(&chain, text).expect("write");
    let problems = tls_store(&checked_https(&one_certificate(&chain, &key, "")))
        .expect_err("a bad certificate");
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!(problems[0].path, "listeners[0].tls.certificates[0].cert");
    assert!(
        problems[0]
            .reason
            .contains("certificate 2 of the file is not an X.509 certificate"),
        "{problems:#?}"
    );
}
