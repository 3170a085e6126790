//! ringkv's transport: QUIC (quinn) plumbing shared by the node and the client library:
//! TLS configs, the authenticating handshake, framed message streams ([`Link`]), and
//! reading config files. No actix and no redb here.
//!
//! After the handshake, each side of a connection sends its messages on one long-lived
//! unidirectional stream of frames (`[version][length][MessagePack]`, see
//! [`ringkv::wire`]); a message larger than [`BULK_BYTES`] goes on a stream of its own, so a
//! large batch never holds up small requests. Requests and answers are matched by the ids
//! they carry, so many requests share a stream. Until a peer has authenticated, its
//! connection may open no stream but the handshake's, and its receive window is small.
//!
//! Two ways to authenticate ([`Auth`]). With certificates (`[tls]`, see [`pki`]), every
//! connection is mutual TLS against the cluster's CA and each side's identity (a node id, or
//! a client's name and role) is the one its certificate names: a peer's `Hello` must claim
//! the id its certificate holds, and a node dialled by id must answer with that id's
//! certificate. In secret-only mode, TLS gives an encrypted channel with a throwaway
//! self-signed certificate and authentication is the cluster secret, which is then the
//! whole trust boundary: whoever holds it may act as any node. Each side proves it knows the secret with an HMAC-SHA256 over
//! keying material exported from *this* TLS session (RFC 5705), so a proof cannot be
//! replayed on another connection and a man in the middle, holding two different
//! sessions, cannot relay one. The opener sends `Hello` with its proof on the first stream;
//! the acceptor answers `Welcome` with its own proof, or `Refused`, and serves nothing
//! before that.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ringkv::access::Identity;
use ringkv::config::{ClientFile, Config, TlsConfig};
use ringkv::wire::FrameDecoder;
use tokio::sync::mpsc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use ring::hmac;
use ringkv::wire::{self, Bytes, Hello, Message, WireError, FRAME_HEADER_BYTES, PROTOCOL_VERSION};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

pub mod pki;

/// ALPN protocol name.
pub(crate) const ALPN: &[u8] = b"ringkv/1";
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
    #[error("reached {got:?} at {addr}, not the node {expected:?}")]
    WrongNode { addr: String, expected: String, got: String },
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
        matches!(self, NetError::Connect(..) | NetError::Lost(_) | NetError::Timeout | NetError::WrongNode { .. })
    }
}

/// The rustls crypto provider: ring, named explicitly for rustls and quinn alike.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Messages whose frame is larger than this travel on a stream of their own.
pub const BULK_BYTES: usize = 256 * 1024;
/// Streams a peer may open once authenticated (one long-lived, the rest bulk messages).
const STREAMS_MAX: u32 = 64;
/// Receive window of a connection before its peer authenticated.
const WINDOW_UNAUTHENTICATED_BYTES: u32 = 256 * 1024;
/// Receive window of an authenticated connection.
const WINDOW_BYTES: u32 = 64 * 1024 * 1024;
/// Frames queued for one connection's writer before senders wait.
const OUTBOX_FRAMES_MAX: usize = 4096;

/// Transport settings: the acceptor lets a new connection open only the handshake's
/// stream, in a small window, and raises both once the peer authenticated
/// ([`authenticated`]); a connection we open trusts its peer's stream limits.
pub(crate) fn transport_config(acceptor: bool) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(if acceptor { 0u32 } else { STREAMS_MAX }.into());
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(10)).ok());
    t.stream_receive_window((32u32 * 1024 * 1024).into());
    t.receive_window(if acceptor { WINDOW_UNAUTHENTICATED_BYTES } else { WINDOW_BYTES }.into());
    t.send_window(64 * 1024 * 1024);
    // Ask the peer (QUIC's ACK frequency extension) to acknowledge every 10th ack-eliciting
    // packet or after 2 ms, not every second one: requests and answers carry the ACKs, and
    // fewer ACK-only packets cost both ends less (about 8% less node CPU per request at 16
    // clients, workload a).
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(10u32.into()).max_ack_delay(Some(Duration::from_millis(2)));
    t.ack_frequency_config(Some(ack));
    Arc::new(t)
}

/// The peer of an accepted connection proved the secret: let it open message streams.
pub fn authenticated(conn: &quinn::Connection) {
    conn.set_max_concurrent_uni_streams(STREAMS_MAX.into());
    conn.set_receive_window(WINDOW_BYTES.into());
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
    config.transport_config(transport_config(true));
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
    config.transport_config(transport_config(false));
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

/// An endpoint on `addr`, serving when `server` is given. [`connect`] dials with the
/// credentials it is given.
pub fn endpoint(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> std::io::Result<quinn::Endpoint> {
    let socket = bind_socket(addr)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)
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

/// How a side authenticates.
#[derive(Clone)]
pub enum Auth {
    /// Secret-only mode: a proof of the cluster secret bound to the TLS session.
    Secret(Vec<u8>),
    /// Mutual TLS against the cluster CA; the identity is the certificate's.
    Tls(pki::Tls),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Secret(_) => write!(f, "Secret(..)"),
            Auth::Tls(t) => write!(f, "Tls({:?})", t.identity()),
        }
    }
}

/// Who is authenticating: the cluster, how, and our node id (None for a client).
#[derive(Clone, Debug)]
pub struct Credentials {
    pub cluster: String,
    pub auth: Auth,
    pub node: Option<String>,
}

impl Credentials {
    /// Secret-only credentials.
    pub fn secret(cluster: impl Into<String>, secret: impl Into<Vec<u8>>, node: Option<String>) -> Credentials {
        Credentials { cluster: cluster.into(), auth: Auth::Secret(secret.into()), node }
    }

    /// The config to dial with.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, String> {
        match &self.auth {
            Auth::Secret(_) => client_config(),
            Auth::Tls(t) => pki::client_config(t),
        }
    }

    /// The config to serve with.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, String> {
        match &self.auth {
            Auth::Secret(_) => server_config(),
            Auth::Tls(t) => pki::server_config(t),
        }
    }

    fn secret_bytes(&self) -> Option<&[u8]> {
        match &self.auth {
            Auth::Secret(s) => Some(s),
            Auth::Tls(_) => None,
        }
    }
}

/// A connection failure: a TLS refusal (bad, unknown or missing certificate) is `Refused`.
fn connection_failed(addr: SocketAddr, e: &quinn::ConnectionError) -> NetError {
    if pki::is_tls_refusal(e) {
        NetError::Refused(format!("TLS: {e} (a certificate from another CA, or none where one is needed)"))
    } else {
        NetError::Connect(addr.to_string(), e.to_string())
    }
}

/// Open an authenticated connection to `addr`: the connection and the node id of the peer.
/// With `expected`, the peer must be that node (with certificates, its certificate must name
/// it).
pub async fn connect(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    creds: &Credentials,
    expected: Option<&str>,
) -> Result<(quinn::Connection, String), NetError> {
    let config = creds.client_config().map_err(|e| NetError::Connect(addr.to_string(), e))?;
    let connecting =
        ep.connect_with(config, addr, SERVER_NAME).map_err(|e| NetError::Connect(addr.to_string(), e.to_string()))?;
    let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
        .await
        .map_err(|_| NetError::Timeout)?
        .map_err(|e| connection_failed(addr, &e))?;
    let wrong = |got: &str| NetError::WrongNode {
        addr: addr.to_string(),
        expected: expected.unwrap_or_default().to_string(),
        got: got.to_string(),
    };
    // With certificates, the peer is who its certificate says, and must be a node.
    let certified = match &creds.auth {
        Auth::Secret(_) => None,
        Auth::Tls(_) => match pki::peer_identity(&conn) {
            Some(Identity::Node(id)) => Some(id),
            _ => {
                conn.close(1u32.into(), b"not a node certificate");
                return Err(NetError::Refused(format!("{addr} did not present a node certificate")));
            }
        },
    };
    if let (Some(e), Some(c)) = (expected, &certified) {
        if e != c {
            conn.close(1u32.into(), b"wrong node");
            return Err(wrong(c));
        }
    }
    let my_proof = match creds.secret_bytes() {
        Some(secret) => {
            proof(&conn, secret, &creds.cluster, OPENER).ok_or(NetError::Lost("no keying material".into()))?
        }
        None => Vec::new(),
    };
    let hello = Message::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        cluster: creds.cluster.clone(),
        node: creds.node.clone(),
        proof: Bytes::from(my_proof),
    });
    let answer = match tokio::time::timeout(HANDSHAKE_TIMEOUT, call(&conn, &hello, 64 * 1024)).await {
        Err(_) => return Err(NetError::Timeout),
        Ok(Err(e)) => {
            return Err(match conn.close_reason() {
                Some(reason) if pki::is_tls_refusal(&reason) => connection_failed(addr, &reason),
                _ => e,
            })
        }
        Ok(Ok(answer)) => answer,
    };
    let node = match answer {
        Message::Welcome { proof: p, node } => {
            let proven = match (creds.secret_bytes(), &certified) {
                (Some(secret), _) => verify_proof(&conn, secret, &creds.cluster, ACCEPTOR, &p),
                (None, Some(c)) => *c == node,
                (None, None) => false,
            };
            if !proven {
                conn.close(1u32.into(), b"bad proof");
                return Err(NetError::BadServerProof);
            }
            node
        }
        Message::Refused { reason } => return Err(NetError::Refused(reason)),
        other => return Err(NetError::Unexpected(format!("{other:?}").chars().take(80).collect())),
    };
    if !ringkv::membership::valid_node_id(&node) {
        conn.close(1u32.into(), b"bad node id");
        return Err(NetError::Unexpected(format!("the node answered with the id {node:?}")));
    }
    if expected.is_some_and(|e| e != node) {
        conn.close(1u32.into(), b"wrong node");
        return Err(wrong(&node));
    }
    Ok((conn, node))
}

/// The identity a `Hello` authenticates, or why it does not.
fn authenticate(conn: &quinn::Connection, creds: &Credentials, h: &Hello) -> Result<Identity, String> {
    if h.protocol != PROTOCOL_VERSION {
        return Err(format!("protocol {} not spoken here (this node speaks {PROTOCOL_VERSION})", h.protocol));
    }
    if h.node.as_deref().is_some_and(|n| !ringkv::membership::valid_node_id(n)) {
        return Err("a node id must be 1..=64 letters, digits, '-', '_' or '.'".into());
    }
    match &creds.auth {
        Auth::Secret(secret) => {
            if h.cluster != creds.cluster {
                return Err(format!("this node belongs to cluster {:?}", creds.cluster));
            }
            if !verify_proof(conn, secret, &creds.cluster, OPENER, &h.proof) {
                return Err("wrong cluster secret".into());
            }
            // The secret is the whole trust boundary: whoever holds it is what it claims.
            Ok(match &h.node {
                Some(n) => Identity::Node(n.clone()),
                None => Identity::Client { name: "secret holder".into(), role: ringkv::access::Role::Admin },
            })
        }
        Auth::Tls(_) => {
            // The CA names the cluster; a name, when given, must still match.
            if !h.cluster.is_empty() && h.cluster != creds.cluster {
                return Err(format!("this node belongs to cluster {:?}", creds.cluster));
            }
            match (pki::peer_identity(conn), &h.node) {
                (None, _) => Err("no client certificate".into()),
                (Some(Identity::Node(id)), Some(claimed)) if id == *claimed => Ok(Identity::Node(id)),
                (Some(Identity::Node(id)), Some(claimed)) => {
                    Err(format!("the certificate is node {id}'s; it cannot join as {claimed}"))
                }
                // A node's certificate used by its operator, not to act as the node.
                (Some(Identity::Node(id)), None) => {
                    Ok(Identity::Client { name: format!("operator of {id}"), role: ringkv::access::Role::Admin })
                }
                (Some(Identity::Client { name, .. }), Some(_)) => {
                    Err(format!("{name} holds a client certificate; only a node certificate may act as a node"))
                }
                (Some(client), None) => Ok(client),
            }
        }
    }
}

/// Accept the handshake on a new incoming connection: who the peer authenticated as; Err
/// after answering `Refused`.
pub async fn accept_handshake(conn: &quinn::Connection, creds: &Credentials) -> Result<Identity, String> {
    let (mut send, mut recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| "no handshake in time".to_string())?
        .map_err(|e| e.to_string())?;
    let msg = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_message(&mut recv, 64 * 1024))
        .await
        .map_err(|_| "no handshake in time".to_string())?
        .map_err(|e| e.to_string())?;
    let answer = match &msg {
        Message::Hello(h) => authenticate(conn, creds, h),
        _ => Err("expected a handshake".into()),
    };
    match answer {
        Ok(identity) => {
            authenticated(conn);
            let p = match creds.secret_bytes() {
                Some(secret) => proof(conn, secret, &creds.cluster, ACCEPTOR).unwrap_or_default(),
                None => Vec::new(),
            };
            let me = creds.node.clone().unwrap_or_default();
            write_message(&mut send, &Message::Welcome { node: me, proof: Bytes::from(p) })
                .await
                .map_err(|e| e.to_string())?;
            Ok(identity)
        }
        Err(reason) => {
            let _ = write_message(&mut send, &Message::Refused { reason: reason.clone() }).await;
            // Let the refusal reach the peer before the connection goes.
            let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
            conn.close(2u32.into(), b"refused");
            Err(reason)
        }
    }
}

/// A connection's message streams: a writer task that sends frames in order on one
/// long-lived stream (bulk frames on streams of their own), and a reader task per incoming
/// stream that decodes frames and hands each message to `deliver`. Dropping every
/// [`LinkSender`] ends the writer; a failed write closes the connection.
#[derive(Clone)]
pub struct LinkSender {
    tx: mpsc::Sender<Vec<u8>>,
    conn: quinn::Connection,
    frame_max: usize,
}

impl LinkSender {
    /// Queue a message; waits while the connection's outbox is full. An error when the
    /// connection is gone or the message cannot be encoded.
    pub async fn send(&self, msg: &Message) -> Result<(), NetError> {
        let frame = self.frame(msg)?;
        self.tx.send(frame).await.map_err(|_| NetError::Lost("connection closed".into()))
    }

    /// Queue a message without waiting: false when the outbox is full or the connection gone.
    pub fn try_send(&self, msg: &Message) -> Result<bool, NetError> {
        let frame = self.frame(msg)?;
        Ok(self.tx.try_send(frame).is_ok())
    }

    /// Encode a message; one larger than the frame limit is never sent (the peer would drop
    /// the stream it came on, and everything behind it).
    fn frame(&self, msg: &Message) -> Result<Vec<u8>, NetError> {
        let frame = wire::encode_frame(msg)?;
        let len = frame.len().saturating_sub(FRAME_HEADER_BYTES);
        if len > self.frame_max {
            return Err(NetError::Wire(WireError::TooLarge { len, max: self.frame_max }));
        }
        Ok(frame)
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed() || self.conn.close_reason().is_some()
    }

    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }
}

/// Frames gathered into one write on the message stream at most (more wait for the next).
const COALESCE_BYTES: usize = 64 * 1024;

/// Start the writer of a connection; messages over `frame_max` payload bytes are refused.
/// Frames queued together leave in one write, so several messages share a packet.
pub fn link_writer(conn: quinn::Connection, frame_max: usize) -> LinkSender {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(OUTBOX_FRAMES_MAX);
    let c = conn.clone();
    tokio::spawn(async move {
        let mut stream: Option<quinn::SendStream> = None;
        // A bulk frame met while gathering small ones: sent after them.
        let mut held: Option<Vec<u8>> = None;
        while let Some(first) = match held.take() {
            Some(f) => Some(f),
            None => rx.recv().await,
        } {
            let res = if first.len() > BULK_BYTES {
                async {
                    let mut s = c.open_uni().await.map_err(|e| e.to_string())?;
                    s.write_all(&first).await.map_err(|e| e.to_string())?;
                    s.finish().map_err(|e| e.to_string())
                }
                .await
            } else {
                let mut batch = first;
                // Let the tasks ready now queue what they have, to leave in the same packet.
                tokio::task::yield_now().await;
                while batch.len() < COALESCE_BYTES {
                    match rx.try_recv() {
                        Ok(f) if f.len() > BULK_BYTES => {
                            held = Some(f);
                            break;
                        }
                        Ok(f) => batch.extend_from_slice(&f),
                        Err(_) => break,
                    }
                }
                async {
                    if stream.is_none() {
                        stream = Some(c.open_uni().await.map_err(|e| e.to_string())?);
                    }
                    match stream.as_mut() {
                        Some(s) => s.write_all(&batch).await.map_err(|e| e.to_string()),
                        None => Err("no stream".to_string()),
                    }
                }
                .await
            };
            if let Err(e) = res {
                tracing::debug!(error = %e, "connection write failed");
                c.close(4u32.into(), b"write failed");
                return;
            }
        }
        if let Some(mut s) = stream {
            let _ = s.finish();
        }
    });
    LinkSender { tx, conn, frame_max }
}

/// Read every incoming stream of `conn` until the connection ends, handing each decoded
/// message to `deliver` (awaited: a slow receiver slows the peer, not memory). A stream that
/// carries bytes that are not frames is dropped; the connection stays. Returns when the
/// connection closes.
pub async fn read_streams<F, Fut>(conn: quinn::Connection, frame_max: usize, deliver: F)
where
    F: Fn(Message) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    while let Ok(mut recv) = conn.accept_uni().await {
        let deliver = deliver.clone();
        tokio::spawn(async move {
            let mut decoder = FrameDecoder::new(frame_max);
            loop {
                match recv.read_chunk(64 * 1024, true).await {
                    Ok(Some(chunk)) => {
                        decoder.push(&chunk.bytes);
                        loop {
                            match decoder.next_message() {
                                Ok(Some(msg)) => deliver(msg).await,
                                Ok(None) => break,
                                Err(e) => {
                                    tracing::debug!(error = %e, "malformed frame; dropping the stream");
                                    let _ = recv.stop(5u32.into());
                                    return;
                                }
                            }
                        }
                    }
                    Ok(None) | Err(_) => return,
                }
            }
        });
    }
}

/// A path a config file gives, relative to the config file's directory.
fn beside(config_path: &Path, file: &str) -> PathBuf {
    config_path.parent().map(|d| d.join(file)).unwrap_or_else(|| PathBuf::from(file))
}

/// Load a config's `[tls]` files.
fn load_tls(t: &TlsConfig, config_path: &Path, section: &str) -> Result<pki::Tls, String> {
    pki::Tls::load(&beside(config_path, &t.ca), &beside(config_path, &t.cert), &beside(config_path, &t.key))
        .map_err(|e| format!("config key {section}: {e}"))
}

/// A node's config file and how the node authenticates: its certificate with `[tls]` (which
/// must name this node), else the cluster secret (`cluster.secret_file` is read relative to
/// the config file's directory).
pub fn load_config(path: &Path) -> Result<(Config, Auth), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let config = Config::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let auth = match &config.tls {
        Some(t) => Auth::Tls(load_tls(t, path, "tls")?),
        None => Auth::Secret(secret_of(&config, path)?),
    };
    Ok((config, auth))
}

/// The cluster secret: `cluster.secret`, or the trimmed contents of `cluster.secret_file`.
pub fn secret_of(config: &Config, config_path: &Path) -> Result<Vec<u8>, String> {
    read_secret(config.cluster.secret.as_deref(), config.cluster.secret_file.as_deref(), config_path, "cluster")
}

fn read_secret(secret: Option<&str>, file: Option<&str>, config_path: &Path, section: &str) -> Result<Vec<u8>, String> {
    match (secret, file) {
        (Some(s), _) => Ok(s.as_bytes().to_vec()),
        (None, Some(f)) => {
            let p = beside(config_path, f);
            let text = std::fs::read_to_string(&p)
                .map_err(|e| format!("config key {section}.secret_file: cannot read {}: {e}", p.display()))?;
            let s = text.trim();
            if s.is_empty() {
                return Err(format!("config key {section}.secret_file: {} is empty", p.display()));
            }
            Ok(s.as_bytes().to_vec())
        }
        (None, None) => Err(format!("config key {section}.secret: give secret or secret_file")),
    }
}

/// What a client needs to reach a cluster: the nodes to try first, credentials, the frame
/// limit.
#[derive(Clone, Debug)]
pub struct ClientSetup {
    pub nodes: Vec<SocketAddr>,
    pub creds: Credentials,
    pub frame_max: usize,
    /// Values larger than this are refused before they are sent (the node's limit when the
    /// file is a node's config, else the default).
    pub value_bytes_max: u64,
}

/// A client's setup from a client file (`[client]`) or, for the operator on a node's
/// machine, from that node's own config (its address first, then its seeds).
pub fn load_client(path: &Path) -> Result<ClientSetup, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !ClientFile::is_client_file(&text) {
        let (config, auth) = load_config(path)?;
        let mut nodes = vec![config.listen_addr()];
        nodes.extend(config.seed_addrs().into_iter().filter(|a| *a != config.listen_addr()));
        let creds = Credentials { cluster: config.cluster.name.clone(), auth, node: None };
        let (frame_max, value_bytes_max) = (config.frame_bytes_max(), config.limits.max_value_bytes);
        return Ok(ClientSetup { nodes, creds, frame_max, value_bytes_max });
    }
    let file = ClientFile::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let c = &file.client;
    let auth = match c.tls() {
        Some(t) => Auth::Tls(load_tls(&t, path, "client")?),
        None => Auth::Secret(read_secret(c.secret.as_deref(), c.secret_file.as_deref(), path, "client")?),
    };
    Ok(ClientSetup {
        nodes: c.node_addrs(),
        creds: Credentials { cluster: c.cluster.clone(), auth, node: None },
        frame_max: c.frame_bytes_max(),
        value_bytes_max: ringkv::config::VALUE_BYTES_DEFAULT,
    })
}
