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
//! TLS gives an encrypted channel with a throwaway self-signed certificate; authentication
//! is the cluster secret. Each side proves it knows the secret with an HMAC-SHA256 over
//! keying material exported from *this* TLS session (RFC 5705), so a proof cannot be
//! replayed on another connection and a man in the middle, holding two different
//! sessions, cannot relay one. The opener sends `Hello` with its proof on the first stream;
//! the acceptor answers `Welcome` with its own proof, or `Refused`, and serves nothing
//! before that.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ringkv::config::Config;
use ringkv::wire::FrameDecoder;
use tokio::sync::mpsc;

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
fn transport_config(acceptor: bool) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(if acceptor { 0u32 } else { STREAMS_MAX }.into());
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(10)).ok());
    t.stream_receive_window((32u32 * 1024 * 1024).into());
    t.receive_window(if acceptor { WINDOW_UNAUTHENTICATED_BYTES } else { WINDOW_BYTES }.into());
    t.send_window(64 * 1024 * 1024);
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

/// Open an authenticated connection to `addr`: the connection and the node id the peer
/// gave.
pub async fn connect(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    creds: &Credentials,
) -> Result<(quinn::Connection, String), NetError> {
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
        Message::Welcome { proof: p, node } if verify_proof(&conn, &creds.secret, &creds.cluster, ACCEPTOR, &p) => {
            Ok((conn, node))
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
        Message::Hello(h) if h.node.as_deref().is_some_and(|n| !ringkv::membership::valid_node_id(n)) => {
            Err(refuse("a node id must be 1..=64 letters, digits, '-', '_' or '.'".into()))
        }
        Message::Hello(h) => Ok(h.node.clone()),
        _ => Err(refuse("expected a handshake".into())),
    };
    match answer {
        Ok(node) => {
            authenticated(conn);
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

/// Who to authenticate as and how, read from a node config file: the cluster name and
/// secret. `cluster.secret_file` is read relative to the config file's directory.
pub fn load_config(path: &Path) -> Result<(Config, Vec<u8>), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let config = Config::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let secret = secret_of(&config, path)?;
    Ok((config, secret))
}

/// The cluster secret: `cluster.secret`, or the trimmed contents of `cluster.secret_file`.
pub fn secret_of(config: &Config, config_path: &Path) -> Result<Vec<u8>, String> {
    match (&config.cluster.secret, &config.cluster.secret_file) {
        (Some(s), _) => Ok(s.as_bytes().to_vec()),
        (None, Some(f)) => {
            let p = config_path.parent().map(|d| d.join(f)).unwrap_or_else(|| PathBuf::from(f));
            let text = std::fs::read_to_string(&p)
                .map_err(|e| format!("config key cluster.secret_file: cannot read {}: {e}", p.display()))?;
            let s = text.trim();
            if s.is_empty() {
                return Err(format!("config key cluster.secret_file: {} is empty", p.display()));
            }
            Ok(s.as_bytes().to_vec())
        }
        (None, None) => Err("config key cluster.secret: give secret or secret_file".into()),
    }
}
