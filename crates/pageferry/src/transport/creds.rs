//! Credentials: rustls configurations built from QEMU-style x509 directories and PSK files.
//!
//! x509 (`--tls-creds DIR`, QEMU's `tls-creds-x509` layout): `ca-cert.pem`, and
//! `server-cert.pem` + `server-key.pem` on the destination, `client-cert.pem` +
//! `client-key.pem` on the source. The destination verifies the source's certificate
//! against the CA unless peer verification is turned off, and optionally checks it against
//! an authorization list (subject DN, common name or DNS/IP subject alternative name).
//!
//! PSK (`--tls-psk FILE`, QEMU's `keys.psk`: `identity:hexkey` lines). rustls has no API for
//! TLS 1.3 external pre-shared keys (RFC 8446 §2.2 "external PSK"), so pageferry turns the
//! key into an authentication credential instead: both sides derive an Ed25519 key pair from
//! `HKDF-SHA256(salt = "pageferry tls-psk v1", ikm = key, info = "ed25519:" ‖ identity)`, each
//! presents a self-signed certificate for that key, and each accepts the peer only if the
//! peer's certificate carries exactly the public key derived from a key it knows. TLS 1.3
//! then proves possession (CertificateVerify signs the handshake transcript) and encrypts
//! with fresh (EC)DHE keys. What this is and is not:
//! - Mutual authentication by knowledge of the key, forward secrecy (like `psk_dhe_ke`), the
//!   full TLS 1.3 record protection; a peer without the key cannot complete the handshake.
//! - Not RFC 8446 external PSK on the wire: it does not interoperate with QEMU's or GnuTLS's
//!   PSK mode. The identity travels in the clear in SNI (as RFC 8446 PSK identities do in
//!   the ClientHello). As with any PSK, a low-entropy key can be attacked offline (here from
//!   the public key a peer presents), so keys shorter than 16 bytes are refused.

use super::TransportError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The crypto provider: aws-lc-rs, TLS 1.3 suites only, AES-128-GCM first (the cheapest per
/// byte measured on this project's machines, see docs/BENCHMARKS.md).
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = vec![cs::TLS13_AES_128_GCM_SHA256, cs::TLS13_AES_256_GCM_SHA384, cs::TLS13_CHACHA20_POLY1305_SHA256];
    Arc::new(p)
}

fn cred_err(path: &Path, what: impl std::fmt::Display) -> TransportError {
    TransportError::Credentials(format!("{}: {what}", path.display()))
}

/// Certificates of a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| cred_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cred_err(path, e))?;
    if certs.is_empty() {
        return Err(cred_err(path, "no certificate in this PEM file"));
    }
    Ok(certs)
}

/// The private key of a PEM file. Never included in any message.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TransportError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| cred_err(path, format!("no usable private key ({e})")))
}

/// A warning when a key file can be read by group or others (like ssh), else None.
pub fn key_permission_warning(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o077 != 0).then(|| format!("{} is readable by group or others (mode {:o}); it should be 0600", path.display(), mode & 0o777))
}

/// What loading credentials produced: the configuration and any warnings for the operator.
pub struct Loaded<T> {
    /// The configuration (or keys) loaded.
    pub config: T,
    /// For the operator: key files readable by others, and the like.
    pub warnings: Vec<String>,
}

/// A source's TLS settings: the rustls client configuration and the name to verify the
/// destination's certificate against (None: the host part of the address connected to).
#[derive(Clone, Debug)]
pub struct TlsClient {
    /// The rustls client configuration (TLS 1.3 only when built by this module).
    pub config: Arc<ClientConfig>,
    /// The name the destination's certificate must carry; None: the host connected to.
    pub server_name: Option<String>,
}

fn client_builder() -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, TransportError> {
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Credentials(e.to_string()))
}

fn server_builder() -> Result<rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>, TransportError> {
    ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Credentials(e.to_string()))
}

fn finish_client(mut c: ClientConfig) -> Arc<ClientConfig> {
    c.resumption = rustls::client::Resumption::disabled();
    // The record layer after the handshake is ours (transport::tls): it needs the keys.
    c.enable_secret_extraction = true;
    Arc::new(c)
}

fn finish_server(mut c: ServerConfig) -> Arc<ServerConfig> {
    c.send_tls13_tickets = 0;
    c.enable_secret_extraction = true;
    Arc::new(c)
}

fn roots(dir: &Path) -> Result<rustls::RootCertStore, TransportError> {
    let path = dir.join("ca-cert.pem");
    let mut store = rustls::RootCertStore::empty();
    for c in load_certs(&path)? {
        store.add(c).map_err(|e| cred_err(&path, e))?;
    }
    Ok(store)
}

/// Source side of `--tls-creds DIR`: trust `ca-cert.pem`; present `client-cert.pem` /
/// `client-key.pem` when they exist (a destination verifying peers requires them).
pub fn x509_client(dir: &Path, server_name: Option<String>) -> Result<Loaded<TlsClient>, TransportError> {
    let builder = client_builder()?.with_root_certificates(roots(dir)?);
    let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
    let mut warnings = Vec::new();
    let config = if cert.exists() || key.exists() {
        warnings.extend(key_permission_warning(&key));
        builder.with_client_auth_cert(load_certs(&cert)?, load_key(&key)?).map_err(|e| cred_err(&key, e))?
    } else {
        builder.with_no_client_auth()
    };
    Ok(Loaded { config: TlsClient { config: finish_client(config), server_name }, warnings })
}

/// Destination side of `--tls-creds DIR`: present `server-cert.pem` / `server-key.pem`;
/// with `verify_peer`, require a client certificate signed by `ca-cert.pem` and, when
/// `authz` is not empty, one whose subject DN, common name or a SAN is in it.
pub fn x509_server(dir: &Path, verify_peer: bool, authz: &[String]) -> Result<Loaded<Arc<ServerConfig>>, TransportError> {
    let (cert, key) = (dir.join("server-cert.pem"), dir.join("server-key.pem"));
    let mut warnings = Vec::new();
    warnings.extend(key_permission_warning(&key));
    let (certs, key_der) = (load_certs(&cert)?, load_key(&key)?);
    let builder = server_builder()?;
    let builder = if verify_peer {
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(dir)?), provider())
            .build()
            .map_err(|e| TransportError::Credentials(format!("{}: {e}", dir.join("ca-cert.pem").display())))?;
        builder.with_client_cert_verifier(Arc::new(AuthzVerifier { inner, authz: authz.to_vec() }))
    } else {
        if !authz.is_empty() {
            return Err(TransportError::Credentials("--tls-authz needs peer verification (--tls-verify-peer)".into()));
        }
        builder.with_no_client_auth()
    };
    let config = builder.with_single_cert(certs, key_der).map_err(|e| cred_err(&key, e))?;
    Ok(Loaded { config: finish_server(config), warnings })
}

/// The names a certificate answers to, for authorization and messages: subject DN (as
/// `CN=a,O=b`), common names, DNS and IP subject alternative names.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, cert)) = X509Certificate::from_der(der) else { return Vec::new() };
    let mut names = vec![normalize_dn(&cert.subject().to_string())];
    names.extend(cert.subject().iter_common_name().filter_map(|a| a.as_str().ok()).map(str::to_string));
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => names.push(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap()).to_string()),
                    16 => names.push(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap()).to_string()),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    names
}

fn normalize_dn(dn: &str) -> String {
    dn.split(',').map(|p| p.trim()).collect::<Vec<_>>().join(",")
}

/// A short description of a certificate for messages: its subject.
pub fn certificate_subject(der: &[u8]) -> String {
    certificate_names(der).into_iter().next().unwrap_or_else(|| "(unparsable certificate)".into())
}

#[derive(Debug)]
struct AuthzVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    authz: Vec<String>,
}

thread_local! {
    /// Why the authorization list refused the certificate this thread's handshake verified
    /// last (rustls verifies on the thread that drives the handshake).
    static AUTHZ_DENIAL: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// The explanation of an authorization refusal in this thread's last handshake, taken.
pub(crate) fn take_authz_denial() -> Option<String> {
    AUTHZ_DENIAL.with(|d| d.borrow_mut().take())
}

#[derive(Debug)]
struct Denied(String);
impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Denied {}

fn denied(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(Denied(msg)))))
}

impl ClientCertVerifier for AuthzVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(&self, end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>], now: UnixTime) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        if self.authz.is_empty() {
            return Ok(ok);
        }
        let names = certificate_names(end_entity);
        let allowed = self.authz.iter().map(|a| normalize_dn(a)).collect::<Vec<_>>();
        if names.iter().any(|n| allowed.contains(n)) {
            Ok(ok)
        } else {
            // ApplicationVerificationFailure is the one certificate error rustls answers with
            // an access_denied alert, so the source can tell "not authorized" from a bad
            // certificate; the subject goes to this side's message through AUTHZ_DENIAL.
            let who = names.first().map(String::as_str).unwrap_or("?");
            AUTHZ_DENIAL.with(|d| *d.borrow_mut() = Some(format!("the source's certificate {who} is not in the --tls-authz list")));
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
        }
    }
    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// ---------------------------------------------------------------------------------------
// PSK

/// One `identity:hexkey` entry of a keys.psk file.
#[derive(Clone)]
pub struct PskKey {
    /// The identity (the part before `:` in keys.psk).
    pub identity: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for PskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PskKey {{ identity: {:?}, key: <{} bytes, not shown> }}", self.identity, self.key.len())
    }
}

const MIN_PSK_BYTES: usize = 16;
const MAX_IDENTITY: usize = 96;

impl PskKey {
    /// A key for `identity`; refused when shorter than 16 bytes or the identity is unusable.
    pub fn new(identity: &str, key: Vec<u8>) -> Result<Self, TransportError> {
        if identity.is_empty() || identity.len() > MAX_IDENTITY || identity.contains(':') || identity.chars().any(|c| c.is_control()) {
            return Err(TransportError::Credentials(format!("PSK identity {identity:?}: 1 to {MAX_IDENTITY} printable characters without ':'")));
        }
        if key.len() < MIN_PSK_BYTES {
            return Err(TransportError::Credentials(format!(
                "PSK for identity {identity:?} is {} bytes; at least {MIN_PSK_BYTES} random bytes are required (e.g. `openssl rand -hex 32`)",
                key.len()
            )));
        }
        Ok(Self { identity: identity.to_string(), key })
    }

    /// The Ed25519 key pair (PKCS#8) both sides derive from this key and identity.
    fn derived_pkcs8(&self) -> Result<Vec<u8>, TransportError> {
        use aws_lc_rs::hkdf;
        struct Len(usize);
        impl hkdf::KeyType for Len {
            fn len(&self) -> usize {
                self.0
            }
        }
        let info = format!("ed25519:{}", self.identity);
        let mut seed = [0u8; 32];
        hkdf::Salt::new(hkdf::HKDF_SHA256, b"pageferry tls-psk v1")
            .extract(&self.key)
            .expand(&[info.as_bytes()], Len(32))
            .and_then(|okm| okm.fill(&mut seed))
            .map_err(|_| TransportError::Credentials("PSK key derivation failed".into()))?;
        let kp = aws_lc_rs::signature::Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|e| TransportError::Credentials(format!("PSK key derivation: {e}")))?;
        let doc = kp.to_pkcs8().map_err(|_| TransportError::Credentials("PSK key derivation: PKCS#8".into()))?;
        Ok(doc.as_ref().to_vec())
    }

    /// The derived public key and a self-signed certificate carrying it.
    fn certified(&self) -> Result<(Vec<u8>, Arc<CertifiedKey>), TransportError> {
        let pkcs8 = self.derived_pkcs8()?;
        let der = PrivatePkcs8KeyDer::from(pkcs8.clone());
        let kp = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519).map_err(|e| TransportError::Credentials(format!("PSK certificate: {e}")))?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| TransportError::Credentials(e.to_string()))?;
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("pageferry-psk:{}", self.identity));
        let cert = params.self_signed(&kp).map_err(|e| TransportError::Credentials(format!("PSK certificate: {e}")))?;
        let signing = provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(der))
            .map_err(|e| TransportError::Credentials(format!("PSK signing key: {e}")))?;
        Ok((kp.public_key_raw().to_vec(), Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing))))
    }
}

/// Parse a QEMU keys.psk file (`identity:hexkey` per line; `#` comments and blank lines
/// ignored). `path` may also be a directory holding `keys.psk`, as QEMU's `dir=`.
pub fn load_psk_file(path: &Path) -> Result<Loaded<Vec<PskKey>>, TransportError> {
    let path: PathBuf = if path.is_dir() { path.join("keys.psk") } else { path.to_path_buf() };
    let text = std::fs::read_to_string(&path).map_err(|e| cred_err(&path, e))?;
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (id, hex) = line.rsplit_once(':').ok_or_else(|| cred_err(&path, format!("line {}: expected identity:hexkey", n + 1)))?;
        let key = decode_hex(hex.trim()).ok_or_else(|| cred_err(&path, format!("line {}: the key is not hexadecimal", n + 1)))?;
        keys.push(PskKey::new(id.trim(), key).map_err(|e| cred_err(&path, format!("line {}: {e}", n + 1)))?);
    }
    if keys.is_empty() {
        return Err(cred_err(&path, "no identity:hexkey line"));
    }
    Ok(Loaded { config: keys, warnings: key_permission_warning(&path).into_iter().collect() })
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// The SNI name that carries a PSK identity (hex, in DNS labels).
fn psk_server_name(identity: &str) -> String {
    let hex: String = identity.bytes().map(|b| format!("{b:02x}")).collect();
    let labels: Vec<&str> = hex.as_bytes().chunks(60).map(|c| std::str::from_utf8(c).unwrap()).collect();
    format!("{}.psk.pageferry.invalid", labels.join("."))
}

fn identity_from_server_name(name: &str) -> Option<String> {
    let hex: String = name.strip_suffix(".psk.pageferry.invalid")?.split('.').collect();
    String::from_utf8(decode_hex(&hex)?).ok()
}

/// The raw Ed25519 public key a certificate carries.
fn cert_public_key(der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(cert.public_key().subject_public_key.data.to_vec())
}

/// Source side of `--tls-psk FILE --tls-psk-identity ID`.
pub fn psk_client(keys: &[PskKey], identity: &str) -> Result<TlsClient, TransportError> {
    let key = keys
        .iter()
        .find(|k| k.identity == identity)
        .ok_or_else(|| TransportError::Credentials(format!("no key for PSK identity {identity:?} in the PSK file")))?;
    let (public, certified) = key.certified()?;
    let verifier = Arc::new(PskPeerVerifier { keys: vec![(key.identity.clone(), public)], schemes: provider().signature_verification_algorithms });
    let config = client_builder()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    Ok(TlsClient { config: finish_client(config), server_name: Some(psk_server_name(identity)) })
}

/// Destination side of `--tls-psk FILE`: any identity of the file (or, when `authz` is not
/// empty, only those listed) may connect.
pub fn psk_server(keys: &[PskKey], authz: &[String]) -> Result<Arc<ServerConfig>, TransportError> {
    let mut peers = Vec::new();
    let mut certs = Vec::new();
    for k in keys {
        let (public, certified) = k.certified()?;
        if authz.is_empty() || authz.contains(&k.identity) {
            peers.push((k.identity.clone(), public));
        }
        certs.push((k.identity.clone(), certified));
    }
    if peers.is_empty() {
        return Err(TransportError::Credentials("--tls-authz allows none of the PSK file's identities".into()));
    }
    let verifier = Arc::new(PskPeerVerifier { keys: peers, schemes: provider().signature_verification_algorithms });
    let config = server_builder()?.with_client_cert_verifier(verifier).with_cert_resolver(Arc::new(PskResolver { certs }));
    Ok(finish_server(config))
}

/// The PSK identity whose derived key a peer certificate carries, if any.
pub fn psk_identity_of(keys: &[PskKey], cert: &[u8]) -> Option<String> {
    let public = cert_public_key(cert)?;
    keys.iter().find(|k| k.certified().map(|(p, _)| p == public).unwrap_or(false)).map(|k| k.identity.clone())
}

#[derive(Debug)]
struct PskResolver {
    certs: Vec<(String, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for PskResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let id = identity_from_server_name(hello.server_name()?)?;
        self.certs.iter().find(|(i, _)| *i == id).map(|(_, c)| c.clone())
    }
}

/// Accepts a peer whose certificate carries the public key derived from one of `keys`.
#[derive(Debug)]
struct PskPeerVerifier {
    keys: Vec<(String, Vec<u8>)>,
    schemes: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl PskPeerVerifier {
    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let public = cert_public_key(end_entity).ok_or_else(|| denied("the peer's certificate cannot be parsed".into()))?;
        if self.keys.iter().any(|(_, k)| *k == public) {
            Ok(())
        } else {
            Err(denied("the peer does not hold the pre-shared key (wrong key or identity)".into()))
        }
    }
}

impl ServerCertVerifier for PskPeerVerifier {
    fn verify_server_cert(&self, end_entity: &CertificateDer<'_>, _: &[CertificateDer<'_>], _: &ServerName<'_>, _: &[u8], _: UnixTime) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity).map(|_| ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, _: &[u8], _: &CertificateDer<'_>, _: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
    }
    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.schemes)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.supported_schemes()
    }
}

impl ClientCertVerifier for PskPeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(&self, end_entity: &CertificateDer<'_>, _: &[CertificateDer<'_>], _: UnixTime) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity).map(|_| ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, _: &[u8], _: &CertificateDer<'_>, _: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
    }
    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.schemes)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------
// Throwaway credentials (demo, bench, tests)

/// A throwaway CA with a server certificate (for `names`) and a client certificate, written
/// in the `--tls-creds` layout to `dir` (keys mode 0600). For demos, benchmarks and tests.
pub fn write_throwaway_x509(dir: &Path, names: &[&str]) -> Result<(), TransportError> {
    let io = |p: &Path, e: std::io::Error| cred_err(p, e);
    let gen = |e: rcgen::Error| TransportError::Credentials(format!("generating credentials: {e}"));
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let ca_key = rcgen::KeyPair::generate().map_err(gen)?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    ca.distinguished_name.push(rcgen::DnType::CommonName, "pageferry throwaway CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).map_err(gen)?;
    let write = |name: &str, text: String, private: bool| -> Result<(), TransportError> {
        use std::os::unix::fs::OpenOptionsExt;
        let p = dir.join(name);
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(if private { 0o600 } else { 0o644 }).open(&p).map_err(|e| io(&p, e))?;
        std::io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| io(&p, e))
    };
    write("ca-cert.pem", ca_cert.pem(), false)?;
    for (role, cn) in [("server", names.first().copied().unwrap_or("localhost")), ("client", "pageferry-source")] {
        let key = rcgen::KeyPair::generate().map_err(gen)?;
        let sans: Vec<String> = if role == "server" { names.iter().map(|s| s.to_string()).collect() } else { vec![cn.to_string()] };
        let mut p = rcgen::CertificateParams::new(sans).map_err(gen)?;
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let cert = p.signed_by(&key, &ca_cert, &ca_key).map_err(gen)?;
        write(&format!("{role}-cert.pem"), cert.pem(), false)?;
        write(&format!("{role}-key.pem"), key.serialize_pem(), true)?;
    }
    Ok(())
}
