//! Certificate files: reading PEM, matching keys to certificates, names and expiry from the
//! certificates themselves, and the choice of certificate by SNI.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use x509_parser::extensions::GeneralName;

use crate::config::{CertificateFiles, Problem};

/// The largest PEM file read: certificate chains and keys are a few kilobytes, so anything
/// this large is not one.
const MAX_PEM_FILE: u64 = 1 << 20;

/// Why a certificate, key or CA file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    /// The file cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than any PEM file of certificates or keys should be.
    #[error("{} is larger than 1 MiB: not a PEM certificate or key", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file holds no PEM certificate.
    #[error("{} holds no PEM certificate ({reason})", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
        /// What the PEM reader said.
        reason: String,
    },
    /// A certificate of the file is not valid DER/X.509.
    #[error(
        "{}: certificate {} of the file is not an X.509 certificate ({reason})",
        path.display(),
        index + 1
    )]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// Position in the file, from 0 (said from 1).
        index: usize,
        /// What the parser said.
        reason: String,
    },
    /// The file holds no usable private key.
    #[error("{} holds no PEM private key ({reason})", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
        /// What the PEM reader or the crypto provider said.
        reason: String,
    },
    /// The file holds a private key under a passphrase, which a start could not ask for.
    #[error(
        "{} holds an encrypted private key, which cannot be read without its passphrase: \
         write it out unencrypted (openssl pkey -in KEY -out KEY.plain) and keep that file private",
        path.display()
    )]
    EncryptedKey {
        /// The file.
        path: PathBuf,
    },
    /// The file holds a private key the crypto library cannot sign with (an RSA key under 2048
    /// bits, a curve it does not take, a DER it cannot parse).
    #[error(
        "{} holds a private key that cannot be used ({reason}): TLS here takes RSA keys of \
         2048 bits or more, ECDSA keys on P-256, P-384 or P-521, and Ed25519 keys",
        path.display()
    )]
    UnusableKey {
        /// The file.
        path: PathBuf,
        /// What the crypto library said.
        reason: String,
    },
    /// The key is not the certificate's.
    #[error("the key in {} does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
}

impl TlsFileError {
    /// The problem as `check` reports it: at the key that names the offending file (`files`
    /// tells a certificate from a key when both could be meant).
    pub(super) fn problem(&self, at: &str, files: Option<&CertificateFiles>) -> Problem {
        let key_file = |path: &PathBuf| files.is_some_and(|f| &f.key == path && f.cert != f.key);
        let key = match self {
            TlsFileError::NoKey { .. }
            | TlsFileError::EncryptedKey { .. }
            | TlsFileError::UnusableKey { .. }
            | TlsFileError::KeyMismatch { .. } => "key",
            TlsFileError::Read { path, .. } | TlsFileError::TooLarge { path } if key_file(path) => {
                "key"
            }
            _ => "cert",
        };
        Problem {
            path: format!("{at}.{key}"),
            reason: self.to_string(),
        }
    }
}

/// A certificate chain with its key, and what was read from the leaf.
pub(super) struct Loaded {
    /// What rustls serves.
    pub key: Arc<CertifiedKey>,
    /// The chain as read, leaf first (for client certificates toward backends).
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key as read.
    pub private_key: PrivateKeyDer<'static>,
    /// DNS names of the leaf's subjectAltName extension, lower-cased (`*.example.com` kept as
    /// written).
    pub names: Vec<String>,
    /// The leaf's notBefore, in seconds since the Unix epoch.
    pub not_before: i64,
    /// The leaf's notAfter, in seconds since the Unix epoch.
    pub not_after: i64,
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    let read = |source| TlsFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read)?.len();
    if size > MAX_PEM_FILE {
        return Err(TlsFileError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    std::fs::read(path).map_err(read)
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let pem = read_pem(path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsFileError::NoCertificate {
            path: path.to_path_buf(),
            reason: error.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsFileError::NoCertificate {
            path: path.to_path_buf(),
            reason: "no CERTIFICATE section".to_owned(),
        });
    }
    for (index, cert) in chain.iter().enumerate() {
        if let Err(error) = x509_parser::parse_x509_certificate(cert.as_ref()) {
            return Err(TlsFileError::BadCertificate {
                path: path.to_path_buf(),
                index,
                reason: error.to_string(),
            });
        }
    }
    Ok(chain)
}

/// Reads a private key and loads it into the crypto provider.
fn read_key(
    path: &Path,
    provider: &CryptoProvider,
) -> Result<(PrivateKeyDer<'static>, Arc<dyn rustls::sign::SigningKey>), TlsFileError> {
    let pem = read_pem(path)?;
    let no_key = |reason: String| TlsFileError::NoKey {
        path: path.to_path_buf(),
        reason,
    };
    // Encrypted keys come as a section of their own (PKCS#8), which the PEM reader passes
    // over, or as an older section with headers, which it cannot decode: either way it would
    // say that there is no key at all.
    let text = String::from_utf8_lossy(&pem);
    if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || text.contains("Proc-Type: 4,ENCRYPTED")
    {
        return Err(TlsFileError::EncryptedKey {
            path: path.to_path_buf(),
        });
    }
    let private_key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| no_key(e.to_string()))?;
    let signing_key = provider
        .key_provider
        .load_private_key(private_key.clone_key())
        .map_err(|error| TlsFileError::UnusableKey {
            path: path.to_path_buf(),
            reason: match error {
                rustls::Error::General(reason) => reason,
                other => other.to_string(),
            },
        })?;
    Ok((private_key, signing_key))
}

/// Reads a chain and its key, checks that they belong together, and reads the leaf's names and
/// expiry. The certificate and the key are both read even when one fails, so that `check`
/// reports what is wrong with each at once (a file holding both is reported once).
pub(super) fn load_certified_key(
    files: &CertificateFiles,
    provider: &CryptoProvider,
) -> Result<Loaded, Vec<TlsFileError>> {
    let (chain, (private_key, signing_key)) = match (
        read_certificates(&files.cert),
        read_key(&files.key, provider),
    ) {
        (Ok(chain), Ok(key)) => (chain, key),
        (Err(cert), Err(_)) if files.cert == files.key => return Err(vec![cert]),
        (chain, key) => return Err(chain.err().into_iter().chain(key.err()).collect()),
    };
    let key = CertifiedKey::new(chain.clone(), signing_key);
    match key.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(vec![TlsFileError::KeyMismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
            }]);
        }
        // The provider cannot tell (an unusual key type): the handshake will show.
        Err(_) => {}
    }
    let (names, not_before, not_after) =
        match x509_parser::parse_x509_certificate(chain[0].as_ref()) {
            Ok((_, leaf)) => {
                let mut names = Vec::new();
                if let Ok(Some(san)) = leaf.subject_alternative_name() {
                    for name in &san.value.general_names {
                        if let GeneralName::DNSName(dns) = name {
                            names.push(dns.to_ascii_lowercase());
                        }
                    }
                }
                let validity = leaf.validity();
                (
                    names,
                    validity.not_before.timestamp(),
                    validity.not_after.timestamp(),
                )
            }
            Err(error) => {
                return Err(vec![TlsFileError::BadCertificate {
                    path: files.cert.clone(),
                    index: 0,
                    reason: error.to_string(),
                }]);
            }
        };
    Ok(Loaded {
        key: Arc::new(key),
        chain,
        private_key,
        names,
        not_before,
        not_after,
    })
}

/// A warning when the leaf is not valid yet, has expired or expires within
/// [`super::EXPIRY_WARNING`]: clients refuse it, or soon will.
pub(super) fn expiry_warning(loaded: &Loaded, now: SystemTime) -> Option<String> {
    let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs() as i64;
    if loaded.not_before > now {
        let (year, month, day) = crate::access_log::civil(loaded.not_before.div_euclid(86_400));
        return Some(format!(
            "warning: the certificate is not valid before {year}-{month:02}-{day:02}"
        ));
    }
    let left = loaded.not_after - now;
    let days = left / 86_400;
    if left <= 0 {
        Some(format!(
            "warning: the certificate expired {} day(s) ago",
            -days
        ))
    } else if left <= super::EXPIRY_WARNING.as_secs() as i64 {
        Some(format!("warning: the certificate expires in {days} day(s)"))
    } else {
        None
    }
}

/// Reads a CA file into a root store.
pub(super) fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsFileError> {
    let mut roots = RootCertStore::empty();
    for (index, cert) in read_certificates(path)?.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|error| TlsFileError::BadCertificate {
                path: path.to_path_buf(),
                index,
                reason: error.to_string(),
            })?;
    }
    Ok(Arc::new(roots))
}

/// Chooses the certificate for a handshake: an exact SAN name first, then a wildcard SAN
/// (`*.example.com` covers one label), else the listener's first certificate. When two
/// certificates name the same host, the first in the file wins.
#[derive(Debug)]
pub(super) struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by what follows `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl SniResolver {
    pub(super) fn new(loaded: Vec<Loaded>) -> SniResolver {
        let mut resolver = SniResolver {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            default: loaded.first().map(|l| Arc::clone(&l.key)),
        };
        for entry in loaded {
            for name in entry.names {
                match name.strip_prefix("*.") {
                    Some(suffix) => resolver
                        .wildcard
                        .entry(suffix.to_owned())
                        .or_insert_with(|| Arc::clone(&entry.key)),
                    None => resolver
                        .exact
                        .entry(name)
                        .or_insert_with(|| Arc::clone(&entry.key)),
                };
            }
        }
        resolver
    }

    fn pick(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = name {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(key) = self.exact.get(&name) {
                return Some(Arc::clone(key));
            }
            if let Some((_, parent)) = name.split_once('.')
                && let Some(key) = self.wildcard.get(parent)
            {
                return Some(Arc::clone(key));
            }
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

/// What a verified client certificate says about its holder, as passed to backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// The subject, its attributes in the order of the certificate (`C=FR, O=Example, CN=alice`).
    pub subject: String,
    /// The subjectAltName entries, `DNS:…`, `URI:…`, `email:…`, `IP:…`, comma-separated; empty
    /// when there are none (the field is then not sent).
    pub san: String,
}

/// Reads subject and SAN from a verified client certificate; control characters are dropped,
/// so that the values can always be sent as header fields. Values are escaped, so that no
/// value passes for more of them: a CA that signs the names it is asked for would otherwise
/// let a common name `mallory, CN=admin` read as two, or a DNS name `a, DNS:b` as two names.
pub(super) fn client_cert(der: &[u8]) -> Option<ClientCert> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let clean = |text: String| -> String { text.chars().filter(|c| !c.is_control()).collect() };
    // In a SAN entry, the separator and the escape character are escaped.
    let entry = |kind: &str, value: &str| -> String {
        let mut out = String::with_capacity(kind.len() + value.len() + 1);
        out.push_str(kind);
        out.push(':');
        for c in value.chars() {
            if c == ',' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out
    };
    let mut san = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(dns) => san.push(entry("DNS", dns)),
                GeneralName::URI(uri) => san.push(entry("URI", uri)),
                GeneralName::RFC822Name(mail) => san.push(entry("email", mail)),
                GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes)
                            .ok()
                            .map(|b| std::net::IpAddr::from(b).to_string()),
                        16 => <[u8; 16]>::try_from(*bytes)
                            .ok()
                            .map(|b| std::net::IpAddr::from(b).to_string()),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        san.push(format!("IP:{ip}"));
                    }
                }
                _ => {}
            }
        }
    }
    Some(ClientCert {
        subject: clean(subject_text(cert.subject())),
        san: clean(san.join(", ")),
    })
}

/// A distinguished name as RFC 4514 writes it, in the certificate's order: attributes
/// `TYPE=value` joined by `, `, those of one multi-valued RDN by ` + `, with the characters that
/// would end a value escaped (section 2.4). A type without a short name is its dotted OID; a
/// value that is not text is `#` and its bytes in hex.
fn subject_text(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let mut out = String::new();
    for (i, rdn) in name.iter_rdn().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        for (j, attribute) in rdn.iter().enumerate() {
            if j > 0 {
                out.push_str(" + ");
            }
            match x509_parser::objects::oid2abbrev(attribute.attr_type(), registry) {
                Ok(short) => out.push_str(short),
                Err(_) => out.push_str(&attribute.attr_type().to_id_string()),
            }
            out.push('=');
            let text = attribute
                .as_str()
                .ok()
                .or_else(|| std::str::from_utf8(attribute.as_slice()).ok());
            match text {
                Some(text) => escape_dn_value(text, &mut out),
                None => {
                    out.push('#');
                    for byte in attribute.as_slice() {
                        out.push_str(&format!("{byte:02X}"));
                    }
                }
            }
        }
    }
    out
}

/// Appends an attribute value with RFC 4514's escapes: `"+,;<>\` anywhere, `#` or a space at
/// the start, a space at the end.
fn escape_dn_value(value: &str, out: &mut String) {
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, '"' | '+' | ',' | ';' | '<' | '>' | '\\')
            || (i == 0 && matches!(c, '#' | ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
}

/// Accepts any backend certificate (`verify = false`), while still checking that the backend
/// holds the key of the certificate it shows.
#[derive(Debug)]
pub(super) struct NoVerification(pub Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &str, names: &[&str]) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn client_certificate_values_cannot_pass_for_more_attributes_or_names() {
        let plain = client_cert(&cert("alice", &["alice.example"])).expect("parsed");
        assert_eq!(plain.subject, "CN=alice, O=Example");
        assert_eq!(plain.san, "DNS:alice.example");

        // A CA that signs the names it is asked for must not let a holder claim others.
        let forged = client_cert(&cert(
            "mallory, CN=admin",
            &["mallory.example, DNS:admin.example"],
        ))
        .expect("parsed");
        assert_eq!(forged.subject, r"CN=mallory\, CN=admin, O=Example");
        assert_eq!(forged.san, r"DNS:mallory.example\, DNS:admin.example");
        let odd = client_cert(&cert(r#"#a+b;c<d>e"f\g "#, &[])).expect("parsed");
        assert_eq!(odd.subject, r#"CN=\#a\+b\;c\<d\>e\"f\\g\ , O=Example"#);
        let spaced = client_cert(&cert(" a", &[])).expect("parsed");
        assert_eq!(spaced.subject, r"CN=\ a, O=Example");
    }
}
