//! QUIC plumbing shared by the node and the client: TLS configs, the authenticating
//! handshake, and one-frame-per-stream request/response.
//!
//! TLS gives an encrypted channel with a throwaway self-signed certificate; authentication
//! is the cluster secret. Each side proves it knows the secret with an HMAC-SHA256 over
//! keying material exported from *this* TLS session (RFC 5705), so a proof cannot be
//! replayed on another connection and a man in the middle, holding two different
//! sessions, cannot relay one. The opener sends `Hello` with its proof on the first stream;
//! the acceptor answers `Welcome` with its own proof, or `Refused`, and serves nothing
//! before that.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use ring::hmac;
use ringkv::wire::{self, Bytes, Hello, Message, WireError, FRAME_HEADER_BYTES, PROTOCOL_VERSION};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// ALPN protocol name.
const ALPN: &[u8] = b"ringkv/1";
/// Label for the exported keying material the proofs are computed over.
const EKM_LABEL: &[u8] = b"EXPORTER-ringkv-auth";
/// How long the opener of a connection has to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Server name used in TLS (certificates are not checked against it).
pub const SERVER_NAME: &str = "ringkv";

/// Why a connection or request failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot reach {0}: {1}")]
    Connect(String, String),
    #[error("refused by the node: {0}")]
    Refused(String),
    #[error("the node did not prove the cluster secret: wrong cluster or secret on one side")]
    BadServerProof,
    #[error("connection lost: {0}")]
    Lost(String),
    #[error("timed out")]
    Timeout,
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("unexpected answer: {0}")]
    Unexpected(String),
}

impl NetError {
    /// True when the failure says the node is not there (as opposed to a refusal).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, NetError::Connect(..) | NetError::Lost(_) | NetError::Timeout)
    }
}

/// The rustls crypto provider: ring, named explicitly for rustls and quinn alike.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Transport settings tuned for many small requests on few connections (DESIGN.md §5).
fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(4096u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(10)).ok());
    t.stream_receive_window((32u32 * 1024 * 1024).into());
    t.receive_window((64u32 * 1024 * 1024).into());
    t.send_window(64 * 1024 * 1024);
    Arc::new(t)
}

/// A server config with a fresh self-signed certificate.
pub fn server_config() -> anyhow_lite::Result<quinn::ServerConfig> {
    let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()]).map_err(|e| e.to_string())?;
    let cert = CertificateDer::from(ck.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(|e| e.to_string())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config());
    Ok(config)
}

/// A client config that accepts any certificate: the node is authenticated by its proof of
/// the cluster secret, not by a certificate chain.
pub fn client_config() -> anyhow_lite::Result<quinn::ClientConfig> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SecretAuthenticated(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(Arc::new(tls)).map_err(|e| e.to_string())?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config());
    Ok(config)
}

/// Minimal string-error result for setup code.
pub mod anyhow_lite {
    pub type Result<T> = std::result::Result<T, String>;
}

#[derive(Debug)]
struct SecretAuthenticated(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for SecretAuthenticated {
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A UDP socket with large buffers (the default 208 KiB drops packets under load).
pub fn bind_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let domain = if addr.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort: the kernel caps these at net.core.[rw]mem_max.
    let _ = socket.set_recv_buffer_size(4 * 1024 * 1024);
    let _ = socket.set_send_buffer_size(4 * 1024 * 1024);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// An endpoint on `addr`, serving when `server` is given.
pub fn endpoint(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> std::io::Result<quinn::Endpoint> {
    let socket = bind_socket(addr)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    let mut ep = quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)?;
    match client_config() {
        Ok(c) => ep.set_default_client_config(c),
        Err(e) => return Err(std::io::Error::other(e)),
    }
    Ok(ep)
}

/// What a side's proof signs: its role, then keying material exported from this session.
fn signed_message(conn: &quinn::Connection, cluster: &str, side: &[u8]) -> Option<Vec<u8>> {
    let mut ekm = [0u8; 32];
    conn.export_keying_material(&mut ekm, EKM_LABEL, cluster.as_bytes()).ok()?;
    Some([side, ekm.as_slice()].concat())
}

/// The secret-derived proof for one side of one connection.
pub fn proof(conn: &quinn::Connection, secret: &[u8], cluster: &str, side: &[u8]) -> Option<Vec<u8>> {
    let msg = signed_message(conn, cluster, side)?;
    Some(hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), &msg).as_ref().to_vec())
}

/// Constant-time check of a peer's proof.
pub fn verify_proof(conn: &quinn::Connection, secret: &[u8], cluster: &str, side: &[u8], got: &[u8]) -> bool {
    signed_message(conn, cluster, side)
        .is_some_and(|msg| hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, secret), &msg, got).is_ok())
}

pub const OPENER: &[u8] = b"ringkv-opener";
pub const ACCEPTOR: &[u8] = b"ringkv-acceptor";

/// Write one message on a send stream and finish it.
pub async fn write_message(send: &mut quinn::SendStream, msg: &Message) -> Result<(), NetError> {
    let frame = wire::encode_frame(msg)?;
    send.write_all(&frame).await.map_err(|e| NetError::Lost(e.to_string()))?;
    send.finish().map_err(|e| NetError::Lost(e.to_string()))?;
    Ok(())
}

/// Read one whole message (the stream must end after it), at most `max` payload bytes.
pub async fn read_message(recv: &mut quinn::RecvStream, max: usize) -> Result<Message, NetError> {
    let bytes = recv.read_to_end(max + FRAME_HEADER_BYTES).await.map_err(|e| match e {
        quinn::ReadToEndError::TooLong => NetError::Wire(WireError::TooLarge { len: max + 1, max }),
        other => NetError::Lost(other.to_string()),
    })?;
    match wire::decode_frame(&bytes, max)? {
        Some((msg, used)) if used == bytes.len() => Ok(msg),
        Some(_) => Err(NetError::Wire(WireError::Malformed("bytes after the frame".into()))),
        None => Err(NetError::Wire(WireError::Truncated)),
    }
}

/// Send a request on a new stream of `conn` and wait for the one-message answer.
pub async fn call(conn: &quinn::Connection, msg: &Message, max: usize) -> Result<Message, NetError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| NetError::Lost(e.to_string()))?;
    write_message(&mut send, msg).await?;
    read_message(&mut recv, max).await
}

/// Who is authenticating: the cluster and its secret, and our node id (None for a client).
#[derive(Clone, Debug)]
pub struct Credentials {
    pub cluster: String,
    pub secret: Vec<u8>,
    pub node: Option<String>,
}

/// Open an authenticated connection to `addr`.
pub async fn connect(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    creds: &Credentials,
) -> Result<quinn::Connection, NetError> {
    let connecting = ep.connect(addr, SERVER_NAME).map_err(|e| NetError::Connect(addr.to_string(), e.to_string()))?;
    let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
        .await
        .map_err(|_| NetError::Timeout)?
        .map_err(|e| NetError::Connect(addr.to_string(), e.to_string()))?;
    let my_proof =
        proof(&conn, &creds.secret, &creds.cluster, OPENER).ok_or(NetError::Lost("no keying material".into()))?;
    let hello = Message::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        cluster: creds.cluster.clone(),
        node: creds.node.clone(),
        proof: Bytes::from(my_proof),
    });
    let answer = tokio::time::timeout(HANDSHAKE_TIMEOUT, call(&conn, &hello, 64 * 1024))
        .await
        .map_err(|_| NetError::Timeout)??;
    match answer {
        Message::Welcome { proof: p, .. } if verify_proof(&conn, &creds.secret, &creds.cluster, ACCEPTOR, &p) => {
            Ok(conn)
        }
        Message::Welcome { .. } => {
            conn.close(1u32.into(), b"bad proof");
            Err(NetError::BadServerProof)
        }
        Message::Refused { reason } => Err(NetError::Refused(reason)),
        other => Err(NetError::Unexpected(format!("{other:?}").chars().take(80).collect())),
    }
}

/// Accept the handshake on a new incoming connection: the peer's node id (None for a
/// client) once it proved the secret; Err after answering `Refused`.
pub async fn accept_handshake(conn: &quinn::Connection, creds: &Credentials) -> Result<Option<String>, String> {
    let (mut send, mut recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| "no handshake in time".to_string())?
        .map_err(|e| e.to_string())?;
    let msg = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_message(&mut recv, 64 * 1024))
        .await
        .map_err(|_| "no handshake in time".to_string())?
        .map_err(|e| e.to_string())?;
    let refuse = |reason: String| Message::Refused { reason };
    let answer = match &msg {
        Message::Hello(h) if h.protocol != PROTOCOL_VERSION => {
            Err(refuse(format!("protocol {} not spoken here (this node speaks {PROTOCOL_VERSION})", h.protocol)))
        }
        Message::Hello(h) if h.cluster != creds.cluster => {
            Err(refuse(format!("this node belongs to cluster {:?}", creds.cluster)))
        }
        Message::Hello(h) if !verify_proof(conn, &creds.secret, &creds.cluster, OPENER, &h.proof) => {
            Err(refuse("wrong cluster secret".into()))
        }
        Message::Hello(h) => Ok(h.node.clone()),
        _ => Err(refuse("expected a handshake".into())),
    };
    match answer {
        Ok(node) => {
            let p = proof(conn, &creds.secret, &creds.cluster, ACCEPTOR).unwrap_or_default();
            let me = creds.node.clone().unwrap_or_default();
            write_message(&mut send, &Message::Welcome { node: me, proof: Bytes::from(p) })
                .await
                .map_err(|e| e.to_string())?;
            Ok(node)
        }
        Err(refusal) => {
            let reason = match &refusal {
                Message::Refused { reason } => reason.clone(),
                _ => String::new(),
            };
            let _ = write_message(&mut send, &refusal).await;
            // Let the refusal reach the peer before the connection goes.
            let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
            conn.close(2u32.into(), b"refused");
            Err(reason)
        }
    }
}
