//! Mutual TLS with a cluster certificate authority: issuing the CA, node and client
//! certificates (PEM files), loading one side's TLS material, and the quinn configs that
//! require and verify a certificate on both sides of a connection.
//!
//! The identity of a peer is in its certificate, as one `ringkv://` URI in its
//! subjectAltName: `ringkv://node/ID` for a node (which also carries the DNS name
//! [`SERVER_NAME`] and may serve) and `ringkv://client/ROLE/NAME` for a client holding a role
//! (read, write or admin; its certificate is good for client authentication only).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use ringkv::access::{Identity, Role};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName as TlsName, RootCertStore, SignatureScheme};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::extensions::GeneralName;

use crate::{provider, transport_config, ALPN, SERVER_NAME};

/// The CA's certificate file in a certificate directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// The CA's private key file in a certificate directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// Common name of the cluster CA.
const CA_NAME: &str = "ringkv cluster CA";
/// The scheme of identity URIs, and the prefixes of a node's and a client's.
const URI_SCHEME: &str = "ringkv://";
const URI_NODE: &str = "ringkv://node/";
const URI_CLIENT: &str = "ringkv://client/";
/// Years a CA certificate and a leaf certificate are valid for.
const CA_YEARS: i64 = 10;
const LEAF_YEARS: i64 = 5;

/// Writes DIR/ca.crt and DIR/ca.key (creates DIR). Returns the paths written.
pub fn create_ca(dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create directory {}: {e}", dir.display()))?;
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    refuse_existing(&[&cert_path, &key_path])?;
    let key = KeyPair::generate().map_err(|e| format!("cannot generate the CA key: {e}"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, CA_YEARS);
    let cert = params.self_signed(&key).map_err(|e| format!("cannot sign the CA certificate: {e}"))?;
    write_pair(&cert_path, &cert.pem(), &key_path, &key.serialize_pem())
}

/// Reads DIR/ca.crt + DIR/ca.key, writes DIR/ID.crt and DIR/ID.key.
pub fn create_node(dir: &Path, id: &str) -> Result<Vec<PathBuf>, String> {
    if !ringkv::membership::valid_node_id(id) {
        return Err(format!("node id {id:?}: a node id must be 1..=64 letters, digits, '-', '_' or '.'"));
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(id);
    params.subject_alt_names =
        vec![SanType::DnsName(ia5(SERVER_NAME)?), SanType::URI(ia5(&format!("{URI_NODE}{id}"))?)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    issue(dir, id, params, KeyUsage::server_auth())
}

/// Reads the CA from DIR, writes DIR/NAME.crt and DIR/NAME.key.
pub fn create_client(dir: &Path, name: &str, role: Role) -> Result<Vec<PathBuf>, String> {
    if !valid_client_name(name) {
        return Err(format!("client name {name:?}: a client name must be 1..=64 letters, digits, '-', '_' or '.'"));
    }
    if role == Role::Node {
        return Err("role node is not a client's: give read, write or admin (a node gets a node certificate)".into());
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(name);
    params.subject_alt_names = vec![SanType::URI(ia5(&format!("{URI_CLIENT}{}/{name}", role.name()))?)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    issue(dir, name, params, KeyUsage::client_auth())
}

/// The identity a certificate names (from its ringkv:// URI SAN). Err for none / malformed / several.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
    let san =
        x509.subject_alternative_name().map_err(|e| format!("the certificate's subjectAltName is malformed: {e}"))?;
    let uris: Vec<&str> = san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) if u.starts_with(URI_SCHEME) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [uri] => parse_identity_uri(uri),
        [] => Err("the certificate names no ringkv identity (no ringkv:// URI in its subjectAltName): \
                   use a node or client certificate issued by the cluster CA"
            .into()),
        several => Err(format!(
            "the certificate names several ringkv identities ({}): a certificate must name exactly one",
            several.join(", ")
        )),
    }
}

/// A `ringkv://node/ID` or `ringkv://client/ROLE/NAME` URI as an identity.
fn parse_identity_uri(uri: &str) -> Result<Identity, String> {
    if let Some(id) = uri.strip_prefix(URI_NODE) {
        if !ringkv::membership::valid_node_id(id) {
            return Err(format!("identity {uri:?}: not a valid node id"));
        }
        return Ok(Identity::Node(id.to_string()));
    }
    if let Some(rest) = uri.strip_prefix(URI_CLIENT) {
        let (role, name) =
            rest.split_once('/').ok_or_else(|| format!("identity {uri:?}: expected {URI_CLIENT}ROLE/NAME"))?;
        let role = Role::parse_client(role).map_err(|e| format!("identity {uri:?}: {e}"))?;
        if !valid_client_name(name) {
            return Err(format!("identity {uri:?}: not a valid client name"));
        }
        return Ok(Identity::Client { name: name.to_string(), role });
    }
    Err(format!("identity {uri:?}: expected {URI_NODE}ID or {URI_CLIENT}ROLE/NAME"))
}

/// A client name: 1..=64 ASCII letters, digits, '-', '_' and '.'.
fn valid_client_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn ia5(s: &str) -> Result<rcgen::string::Ia5String, String> {
    s.try_into().map_err(|e| format!("{s:?} cannot go in a certificate: {e}"))
}

/// Valid from a day ago (clocks disagree) for `years` years (leap days approximated).
fn set_validity(params: &mut CertificateParams, years: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(365 * years + years / 4);
}

/// Issue a leaf certificate with `params` signed by the CA in `dir`, as `dir/STEM.crt` and
/// `dir/STEM.key`. The new certificate is checked against ca.crt before it is written.
fn issue(dir: &Path, stem: &str, mut params: CertificateParams, usage: KeyUsage) -> Result<Vec<PathBuf>, String> {
    let cert_path = dir.join(format!("{stem}.crt"));
    let key_path = dir.join(format!("{stem}.key"));
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let ca_certs = read_certs(&ca_cert_path)?;
    let ca_cert = ca_certs.first().ok_or_else(|| format!("{}: no certificate in it", ca_cert_path.display()))?;
    let ca_key_pem = std::fs::read_to_string(&ca_key_path)
        .map_err(|e| format!("cannot read {}: {e} (create the CA first)", ca_key_path.display()))?;
    let ca_key =
        KeyPair::from_pem(&ca_key_pem).map_err(|e| format!("{}: not a usable key: {e}", ca_key_path.display()))?;
    let issuer = Issuer::from_ca_cert_der(ca_cert, ca_key)
        .map_err(|e| format!("{}: not a usable CA certificate: {e}", ca_cert_path.display()))?;
    refuse_existing(&[&cert_path, &key_path])?;
    let key = KeyPair::generate().map_err(|e| format!("cannot generate a key: {e}"))?;
    set_validity(&mut params, LEAF_YEARS);
    let cert = params.signed_by(&key, &issuer).map_err(|e| format!("cannot sign the certificate: {e}"))?;
    let roots = root_store(&ca_cert_path, vec![ca_cert.clone()])?;
    verify_chain(&roots, &[cert.der().clone()], usage).map_err(|e| {
        format!(
            "the new certificate does not verify against {}: {e} (does {} belong to it?)",
            ca_cert_path.display(),
            ca_key_path.display()
        )
    })?;
    write_pair(&cert_path, &cert.pem(), &key_path, &key.serialize_pem())
}

/// Err naming the first of `paths` that exists.
fn refuse_existing(paths: &[&Path]) -> Result<(), String> {
    match paths.iter().find(|p| p.symlink_metadata().is_ok()) {
        Some(p) => Err(already_exists(p)),
        None => Ok(()),
    }
}

fn already_exists(p: &Path) -> String {
    format!("{} already exists: refusing to overwrite it (move it away or use another directory)", p.display())
}

/// Write a certificate and its key, each to a new file; the key readable by its owner only.
fn write_pair(cert_path: &Path, cert_pem: &str, key_path: &Path, key_pem: &str) -> Result<Vec<PathBuf>, String> {
    write_new(key_path, key_pem, 0o600)?;
    if let Err(e) = write_new(cert_path, cert_pem, 0o644) {
        // The key is useless without its certificate; leave no half-written pair behind.
        let _ = std::fs::remove_file(key_path);
        return Err(e);
    }
    Ok(vec![cert_path.to_path_buf(), key_path.to_path_buf()])
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), String> {
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            already_exists(path)
        } else {
            format!("cannot create {}: {e}", path.display())
        }
    })?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Every certificate in a PEM file; Err when there is none.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it (expected PEM \"CERTIFICATE\" blocks)", path.display()));
    }
    Ok(certs)
}

fn root_store(path: &Path, certs: Vec<CertificateDer<'static>>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// Check that `chain` (end entity first) chains to one of `roots` for `usage`, now.
fn verify_chain(roots: &RootCertStore, chain: &[CertificateDer<'_>], usage: KeyUsage) -> Result<(), String> {
    let (end, intermediates) = chain.split_first().ok_or("no certificate")?;
    let end = EndEntityCert::try_from(end).map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
    end.verify_for_usage(
        provider().signature_verification_algorithms.all,
        &roots.roots,
        intermediates,
        UnixTime::now(),
        usage,
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// Loaded TLS material of one side: CA roots, own chain and key, own identity.
#[derive(Clone)]
pub struct Tls {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    signer: Arc<EcdsaKeyPair>,
    identity: Identity,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("identity", &self.identity).finish_non_exhaustive()
    }
}

impl Tls {
    /// Load PEM files. Checks the certificate chains to the CA (webpki) and names an identity.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Tls, String> {
        let roots = root_store(ca, read_certs(ca)?)?;
        let chain = read_certs(cert)?;
        let key_der = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
        let PrivateKeyDer::Pkcs8(pkcs8) = &key_der else {
            return Err(format!("{}: expected a PKCS#8 (\"PRIVATE KEY\") ECDSA P-256 key", key.display()));
        };
        let signer =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.secret_pkcs8_der(), &SystemRandom::new())
                .map_err(|e| format!("{}: not a usable ECDSA P-256 key: {e}", key.display()))?;
        let identity = identity_of(&chain[0]).map_err(|e| format!("{}: {e}", cert.display()))?;
        let mut usages = vec![KeyUsage::client_auth()];
        if identity.node().is_some() {
            usages.push(KeyUsage::server_auth());
        }
        for usage in usages {
            verify_chain(&roots, &chain, usage).map_err(|e| {
                format!(
                    "{} is not a valid certificate of the CA in {}: {e} (issue it with that CA)",
                    cert.display(),
                    ca.display()
                )
            })?;
        }
        let tls = Tls {
            roots: Arc::new(roots),
            chain,
            key: Arc::new(key_der.clone_key()),
            signer: Arc::new(signer),
            identity,
        };
        // The key must be the certificate's: a signature by one verifies with the other.
        let probe = b"ringkv key check";
        let sig = tls.sign(probe)?;
        EndEntityCert::try_from(&tls.chain[0])
            .and_then(|ee| ee.verify_signature(webpki::ring::ECDSA_P256_SHA256, probe, &sig))
            .map_err(|_| {
                format!("the key in {} does not belong to the certificate in {}", key.display(), cert.display())
            })?;
        Ok(tls)
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Sign bytes with this side's private key (ECDSA P-256 SHA-256, ASN.1 signature).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, String> {
        self.signer
            .sign(&SystemRandom::new(), msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| "cannot sign: the system random source failed".to_string())
    }

    /// This side's certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        self.chain[0].as_ref()
    }

    /// Verify that `cert_der` chains to this side's CA and is a *node* certificate, and that
    /// `sig` is its key's signature over `msg`: Ok(node id it names).
    pub fn verify_node_signature(&self, cert_der: &[u8], msg: &[u8], sig: &[u8]) -> Result<String, String> {
        let cert = CertificateDer::from(cert_der);
        let id = match identity_of(&cert)? {
            Identity::Node(id) => id,
            Identity::Client { name, .. } => {
                return Err(format!("the certificate is client {name:?}'s, not a node's"));
            }
        };
        verify_chain(&self.roots, std::slice::from_ref(&cert), KeyUsage::server_auth())
            .map_err(|e| format!("node {id:?}'s certificate is not one of the cluster CA: {e}"))?;
        let end = EndEntityCert::try_from(&cert).map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
        end.verify_signature(webpki::ring::ECDSA_P256_SHA256, msg, sig)
            .map_err(|_| format!("the signature is not node {id:?}'s over this message"))?;
        Ok(id)
    }
}

/// quinn server config: TLS 1.3, ALPN as lib.rs's, client certificate REQUIRED and verified against the CA
/// (WebPkiClientVerifier), transport_config(true) like lib.rs's server_config.
pub fn server_config(tls: &Tls) -> Result<quinn::ServerConfig, String> {
    if let Identity::Client { name, .. } = &tls.identity {
        return Err(format!(
            "{name:?} holds a client certificate, which cannot serve: a node serves with its node certificate"
        ));
    }
    build_server_config(tls)
}

/// [`server_config`] without the check that `tls` is a node's.
fn build_server_config(tls: &Tls) -> Result<quinn::ServerConfig, String> {
    let provider = provider();
    let webpki = WebPkiClientVerifier::builder_with_provider(tls.roots.clone(), provider.clone())
        .build()
        .map_err(|e| format!("cannot verify clients with the CA: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(Arc::new(ClusterClient(webpki)))
        .with_single_cert(tls.chain.clone(), tls.key.clone_key())
        .map_err(|e| format!("cannot serve with this certificate and key: {e}"))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(config).map_err(|e| e.to_string())?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config(true));
    Ok(config)
}

/// quinn client config: verifies the server's chain to the CA with server name `ringkv`
/// (WebPkiServerVerifier), presents our certificate, transport_config(false).
pub fn client_config(tls: &Tls) -> Result<quinn::ClientConfig, String> {
    let provider = provider();
    let webpki = WebPkiServerVerifier::builder_with_provider(tls.roots.clone(), provider.clone())
        .build()
        .map_err(|e| format!("cannot verify servers with the CA: {e}"))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ClusterServer(webpki)))
        .with_client_auth_cert(tls.chain.clone(), tls.key.clone_key())
        .map_err(|e| format!("cannot authenticate with this certificate and key: {e}"))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(Arc::new(config)).map_err(|e| e.to_string())?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config(false));
    Ok(config)
}

/// The identity of the peer of an established connection, from its certificate
/// (`conn.peer_identity()` downcast to `Vec<CertificateDer<'static>>`). None without one.
pub fn peer_identity(conn: &quinn::Connection) -> Option<Identity> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    identity_of(certs.first()?).ok()
}

/// True when a connection error is a TLS refusal (a QUIC CONNECTION_CLOSE with a crypto error code
/// 0x100..=0x1ff, on either side: bad certificate, unknown CA, certificate required). Used to tell
/// "refused" (exit 4) from "unreachable".
pub fn is_tls_refusal(e: &quinn::ConnectionError) -> bool {
    let code = match e {
        quinn::ConnectionError::TransportError(t) => u64::from(t.code),
        quinn::ConnectionError::ConnectionClosed(c) => u64::from(c.error_code),
        _ => return false,
    };
    (0x100..=0x1ff).contains(&code)
}

/// The certificate passed webpki's checks but names no ringkv identity (or the wrong kind).
fn no_identity() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

/// The server's verifier of client certificates: webpki's against the CA, and the
/// certificate must name a ringkv identity.
#[derive(Debug)]
struct ClusterClient(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for ClusterClient {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[TlsName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.0.verify_client_cert(end_entity, intermediates, now)?;
        identity_of(end_entity).map_err(|_| no_identity())?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The client's verifier of server certificates: webpki's against the CA for the name
/// [`SERVER_NAME`] whatever name the connection was opened with, and the certificate must
/// name a node.
#[derive(Debug)]
struct ClusterServer(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ClusterServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from(SERVER_NAME).map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified = self.0.verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)?;
        match identity_of(end_entity) {
            Ok(Identity::Node(_)) => Ok(verified),
            _ => Err(no_identity()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[TlsName]> {
        self.0.root_hint_subjects()
    }
}

/// With certificates, a node signs its own member records with its key and checks everyone
/// else's against the cluster CA (the core's membership holds no keys).
impl ringkv::membership::RecordSigner for Tls {
    fn sign(&self, content: &[u8]) -> Option<ringkv::membership::RecordSignature> {
        let sig = Tls::sign(self, content).ok()?;
        Some(ringkv::membership::RecordSignature { cert: self.cert_der().to_vec(), sig })
    }

    fn verify(&self, id: &str, content: &[u8], s: &ringkv::membership::RecordSignature) -> bool {
        self.verify_node_signature(&s.cert, content, &s.sig).is_ok_and(|signer| signer == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    /// A CA with node `n1` and clients `ops` (admin) and `reader` (read) in a new directory.
    fn cluster() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path()).unwrap();
        create_node(dir.path(), "n1").unwrap();
        create_client(dir.path(), "ops", Role::Admin).unwrap();
        create_client(dir.path(), "reader", Role::Read).unwrap();
        dir
    }

    fn load(dir: &Path, who: &str) -> Tls {
        Tls::load(&dir.join(CA_CERT_FILE), &dir.join(format!("{who}.crt")), &dir.join(format!("{who}.key"))).unwrap()
    }

    #[test]
    fn issue_and_load() {
        let dir = cluster();
        let d = dir.path();
        assert_eq!(load(d, "n1").identity(), &Identity::Node("n1".into()));
        assert_eq!(load(d, "ops").identity(), &Identity::Client { name: "ops".into(), role: Role::Admin });
        assert_eq!(load(d, "reader").identity(), &Identity::Client { name: "reader".into(), role: Role::Read });
        // identity_of reads the same from the certificate alone.
        let der = CertificateDer::from(load(d, "n1").cert_der().to_vec());
        assert_eq!(identity_of(&der), Ok(Identity::Node("n1".into())));
        // The CA's certificate names no identity.
        let ca = read_certs(&d.join(CA_CERT_FILE)).unwrap();
        assert!(identity_of(&ca[0]).is_err());

        for f in [CA_KEY_FILE, "n1.key", "ops.key", "reader.key"] {
            let mode = std::fs::metadata(d.join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }

    #[test]
    fn refuses_to_overwrite_and_bad_names() {
        let dir = cluster();
        let d = dir.path();
        let before = std::fs::read(d.join(CA_KEY_FILE)).unwrap();
        let e = create_ca(d).unwrap_err();
        assert!(e.contains("ca.crt") && e.contains("already exists"), "{e}");
        assert_eq!(std::fs::read(d.join(CA_KEY_FILE)).unwrap(), before);
        let e = create_node(d, "n1").unwrap_err();
        assert!(e.contains("n1.crt") && e.contains("already exists"), "{e}");
        let e = create_client(d, "ops", Role::Read).unwrap_err();
        assert!(e.contains("ops.crt"), "{e}");
        // A name taken by a node is taken for a client too (the files would clash).
        assert!(create_client(d, "n1", Role::Read).is_err());
        // Only the certificate left: its key is still not overwritten.
        std::fs::remove_file(d.join("n1.crt")).unwrap();
        let e = create_node(d, "n1").unwrap_err();
        assert!(e.contains("n1.key"), "{e}");

        assert!(create_node(d, "").is_err());
        assert!(create_node(d, "a/b").is_err());
        assert!(create_node(d, &"x".repeat(65)).is_err());
        assert!(create_client(d, "bad name", Role::Read).is_err());
        assert!(create_client(d, "ok", Role::Node).is_err());
        assert!(Role::parse_client("superuser").is_err());
        assert!(!d.join("ok.crt").exists() && !d.join("ok.key").exists());

        // No CA in a directory: a clear error, nothing written.
        let empty = tempfile::tempdir().unwrap();
        let e = create_node(empty.path(), "n2").unwrap_err();
        assert!(e.contains("ca.crt"), "{e}");
        assert!(!empty.path().join("n2.key").exists());
    }

    #[test]
    fn identity_uris() {
        assert_eq!(parse_identity_uri("ringkv://node/n-1.a_b"), Ok(Identity::Node("n-1.a_b".into())));
        assert_eq!(
            parse_identity_uri("ringkv://client/write/w"),
            Ok(Identity::Client { name: "w".into(), role: Role::Write })
        );
        for bad in [
            "ringkv://node/",
            "ringkv://node/a/b",
            "ringkv://client/node/x",
            "ringkv://client/read",
            "ringkv://client/read/",
            "ringkv://client/read/a/b",
            "ringkv://other/x",
        ] {
            assert!(parse_identity_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn load_refuses_mismatches() {
        let a = cluster();
        let b = cluster();
        let (a, b) = (a.path(), b.path());
        // A certificate of another CA.
        let e = Tls::load(&a.join(CA_CERT_FILE), &b.join("n1.crt"), &b.join("n1.key")).unwrap_err();
        assert!(e.contains("n1.crt"), "{e}");
        // A key that is not the certificate's.
        let e = Tls::load(&a.join(CA_CERT_FILE), &a.join("n1.crt"), &a.join("ops.key")).unwrap_err();
        assert!(e.contains("does not belong"), "{e}");
        // Missing files are named.
        let e = Tls::load(&a.join(CA_CERT_FILE), &a.join("nobody.crt"), &a.join("nobody.key")).unwrap_err();
        assert!(e.contains("nobody.crt"), "{e}");
    }

    #[test]
    fn node_signatures() {
        let a = cluster();
        let b = cluster();
        let (n1, ops) = (load(a.path(), "n1"), load(a.path(), "ops"));
        let other = load(b.path(), "n1");
        let sig = n1.sign(b"hello").unwrap();
        assert_eq!(ops.verify_node_signature(n1.cert_der(), b"hello", &sig), Ok("n1".to_string()));
        assert!(ops.verify_node_signature(n1.cert_der(), b"hellO", &sig).is_err());
        // A node of another cluster, though its signature is good.
        let sig_other = other.sign(b"hello").unwrap();
        assert!(other.verify_node_signature(other.cert_der(), b"hello", &sig_other).is_ok());
        assert!(n1.verify_node_signature(other.cert_der(), b"hello", &sig_other).is_err());
        // A client's certificate is no node's.
        let sig_ops = ops.sign(b"hello").unwrap();
        let e = n1.verify_node_signature(ops.cert_der(), b"hello", &sig_ops).unwrap_err();
        assert!(e.contains("not a node"), "{e}");
        assert!(n1.verify_node_signature(b"garbage", b"hello", &sig).is_err());
    }

    /// Run one handshake: the client's outcome (an error when the server refused it, though
    /// the client's side had finished) and the server's.
    async fn handshake(
        server: quinn::ServerConfig,
        client: quinn::ClientConfig,
    ) -> (Result<quinn::Connection, quinn::ConnectionError>, Result<quinn::Connection, quinn::ConnectionError>) {
        let server_ep = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr: SocketAddr = server_ep.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let incoming = server_ep.accept().await.unwrap();
            let result = tokio::time::timeout(Duration::from_secs(5), incoming).await.unwrap();
            (result, server_ep)
        });
        let client_ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let connecting = client_ep.connect_with(client, addr, SERVER_NAME).unwrap();
        let client_result = tokio::time::timeout(Duration::from_secs(5), connecting).await.unwrap();
        let (server_result, _ep) = accept.await.unwrap();
        // In TLS 1.3 the server checks the client's certificate after the client finished:
        // a refused client sees its connection close.
        let client_result = match (client_result, &server_result) {
            (Ok(conn), Err(_)) => Err(tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.unwrap()),
            (result, _) => result,
        };
        (client_result, server_result)
    }

    #[tokio::test]
    async fn mutual_tls_handshake() {
        let dir = cluster();
        let (n1, reader) = (load(dir.path(), "n1"), load(dir.path(), "reader"));
        let (client, server) = handshake(server_config(&n1).unwrap(), client_config(&reader).unwrap()).await;
        let (client, server) = (client.unwrap(), server.unwrap());
        assert_eq!(peer_identity(&server), Some(Identity::Client { name: "reader".into(), role: Role::Read }));
        assert_eq!(peer_identity(&client), Some(Identity::Node("n1".into())));

        // A node connects to a node as well.
        let (client, server) = handshake(server_config(&n1).unwrap(), client_config(&n1).unwrap()).await;
        assert_eq!(peer_identity(&server.unwrap()), Some(Identity::Node("n1".into())));
        assert!(client.is_ok());
    }

    #[tokio::test]
    async fn another_cas_certificates_are_refused() {
        let a = cluster();
        let b = cluster();
        let n1 = load(a.path(), "n1");
        // A client that trusts our CA but holds a certificate of another.
        let mut stranger = load(b.path(), "reader");
        stranger.roots = n1.roots.clone();
        let (client, server) = handshake(server_config(&n1).unwrap(), client_config(&stranger).unwrap()).await;
        let (client, server) = (client.unwrap_err(), server.unwrap_err());
        assert!(is_tls_refusal(&client), "{client:?}");
        assert!(is_tls_refusal(&server), "{server:?}");

        // A client of another CA does not trust our node.
        let other = load(b.path(), "reader");
        let (client, server) = handshake(server_config(&n1).unwrap(), client_config(&other).unwrap()).await;
        let (client, server) = (client.unwrap_err(), server.unwrap_err());
        assert!(is_tls_refusal(&client), "{client:?}");
        assert!(is_tls_refusal(&server), "{server:?}");

        // Not a refusal: other errors.
        assert!(!is_tls_refusal(&quinn::ConnectionError::TimedOut));
        assert!(!is_tls_refusal(&quinn::ConnectionError::Reset));
    }

    #[tokio::test]
    async fn a_client_certificate_cannot_serve() {
        let dir = cluster();
        let (ops, reader) = (load(dir.path(), "ops"), load(dir.path(), "reader"));
        let e = server_config(&ops).unwrap_err();
        assert!(e.contains("client certificate"), "{e}");
        // Served anyway, the client refuses it.
        let (client, _server) = handshake(build_server_config(&ops).unwrap(), client_config(&reader).unwrap()).await;
        let client = client.unwrap_err();
        assert!(is_tls_refusal(&client), "{client:?}");
    }
}
