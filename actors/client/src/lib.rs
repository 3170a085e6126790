//! ringkv-client: talk to a ringkv cluster from Rust. One authenticated QUIC connection to a
//! node carries many requests at once (each answer is matched to its request by id), so a
//! [`Client`] can be cloned and shared by many tasks. No actix and no redb in its tree.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ringkv_client::Error> {
//! let client = ringkv_client::Client::from_config_file("config/cluster/n1.toml").await?;
//! client.put("cart:alice", b"apple".to_vec(), None).await?;
//! let read = client.get("cart:alice").await?;
//! assert!(read.values.iter().any(|v| v.as_slice() == b"apple"));
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringkv::config::Config;
use ringkv::wire::{Bytes, ClientRequest, ClientResponse, ErrorKind, Message};
use ringkv_transport::{connect, endpoint, link_writer, read_streams, LinkSender};
pub use ringkv_transport::{Credentials, NetError};
use tokio::sync::oneshot;

/// How long a request may wait for its answer (the node answers within its own request
/// timeout; this bounds a node that vanished).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What went wrong, and which kind of failure it is (the CLI's exit statuses).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: a malformed key, context or parameter, a value over the limits (exit 2).
    #[error("{0}")]
    BadRequest(String),
    /// The cluster could not be reached or the quorum did not answer in time (exit 3).
    #[error("{0}")]
    Unavailable(String),
    /// Authentication failed or the operation is not permitted (exit 4).
    #[error("{0}")]
    Refused(String),
    /// Anything else (exit 5).
    #[error("{0}")]
    Other(String),
}

impl From<NetError> for Error {
    fn from(e: NetError) -> Self {
        match &e {
            NetError::Refused(_) | NetError::BadServerProof => {
                Error::Refused(format!("{e}; check cluster.name and the secret in the config"))
            }
            NetError::Connect(..) | NetError::Timeout => {
                Error::Unavailable(format!("{e}; is the node running? (--node ADDR picks another)"))
            }
            NetError::Lost(_) => Error::Unavailable(e.to_string()),
            NetError::Wire(_) | NetError::Unexpected(_) => Error::Other(e.to_string()),
        }
    }
}

impl Error {
    /// A node's error answer as a client error.
    pub fn from_response(kind: ErrorKind, message: String) -> Error {
        match kind {
            ErrorKind::BadRequest => Error::BadRequest(message),
            ErrorKind::Unavailable | ErrorKind::Overloaded => Error::Unavailable(message),
            ErrorKind::Refused => Error::Refused(message),
            ErrorKind::Internal => Error::Other(message),
        }
    }
}

/// What a get returns: every concurrent value, and the context to write back with (None
/// when the key was never written; a deleted key has its tombstone's context).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Read {
    pub values: Vec<Vec<u8>>,
    pub context: Option<String>,
}

type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<ClientResponse>>>>;

struct Inner {
    _endpoint: quinn::Endpoint,
    link: LinkSender,
    waiting: Waiting,
    next_id: AtomicU64,
}

/// Removes a request's entry from the waiting map when dropped.
struct Forget<'a> {
    waiting: &'a Waiting,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.waiting.lock() {
            m.remove(&self.id);
        }
    }
}

/// A connection to one node of a cluster.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// A local QUIC endpoint (one UDP socket and its driver) that many [`Client`]s can share:
/// a program talking to several nodes, or opening many connections, pays for one socket.
#[derive(Clone)]
pub struct Connector {
    endpoint: quinn::Endpoint,
}

impl Connector {
    /// An endpoint on an ephemeral port of every IPv4 (or, with `ipv6`, IPv6) address.
    pub fn new(ipv6: bool) -> Result<Connector, NetError> {
        let local: SocketAddr =
            if ipv6 { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() } else { ([0, 0, 0, 0], 0).into() };
        let endpoint = endpoint(local, None).map_err(|e| NetError::Connect(local.to_string(), e.to_string()))?;
        Ok(Connector { endpoint })
    }

    /// Connect and authenticate to the node at `addr`.
    pub async fn connect(&self, addr: SocketAddr, creds: &Credentials, frame_max: usize) -> Result<Client, NetError> {
        let (conn, _node) = connect(&self.endpoint, addr, creds).await?;
        let waiting: Waiting = Arc::default();
        let w = waiting.clone();
        let reader = read_streams(conn.clone(), frame_max, move |msg| {
            let (id, response) = match msg {
                Message::ClientReply { id, response } => (id, response),
                Message::Error { id, kind, message } => (id, ClientResponse::Error { kind, message }),
                _ => return std::future::ready(()),
            };
            let tx = w.lock().ok().and_then(|mut m| m.remove(&id));
            if let Some(tx) = tx {
                let _ = tx.send(response);
            }
            std::future::ready(())
        });
        // When the connection ends, every request still waiting fails at once.
        let w = waiting.clone();
        tokio::spawn(async move {
            reader.await;
            if let Ok(mut m) = w.lock() {
                m.clear();
            }
        });
        let link = link_writer(conn, frame_max);
        Ok(Client {
            inner: Arc::new(Inner { _endpoint: self.endpoint.clone(), link, waiting, next_id: AtomicU64::new(1) }),
        })
    }
}

impl Client {
    /// Connect and authenticate to the node at `addr`, on an endpoint of its own.
    pub async fn connect(addr: SocketAddr, creds: &Credentials, frame_max: usize) -> Result<Client, NetError> {
        Connector::new(addr.is_ipv6())?.connect(addr, creds, frame_max).await
    }

    /// Connect to the node a config file names (its `node.listen`), with the cluster secret
    /// it holds.
    pub async fn from_config_file(path: impl AsRef<Path>) -> Result<Client, Error> {
        let (config, secret) = ringkv_transport::load_config(path.as_ref()).map_err(Error::BadRequest)?;
        let creds = Credentials { cluster: config.cluster.name.clone(), secret, node: None };
        Ok(Client::connect(config.listen_addr(), &creds, config.frame_bytes_max()).await?)
    }

    /// Send one request and wait for its answer.
    pub async fn request(&self, request: ClientRequest) -> Result<ClientResponse, NetError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if self.inner.link.is_closed() {
            return Err(NetError::Lost("the connection is closed".into()));
        }
        if let Ok(mut m) = self.inner.waiting.lock() {
            m.insert(id, tx);
        }
        // However this request ends (answered, failed, timed out, or the caller gave up),
        // its entry goes.
        let _forget = Forget { waiting: &self.inner.waiting, id };
        self.inner.link.send(&Message::Client { id, request }).await?;
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(NetError::Lost("the connection closed before the answer".into())),
            Err(_) => Err(NetError::Timeout),
        }
    }

    /// Every concurrent value of `key` and the context to write back with.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Read, Error> {
        let request = ClientRequest::Get { key: Bytes::from(key.as_ref().to_vec()), r: None };
        match self.request(request).await? {
            ClientResponse::Values { values, context } => {
                Ok(Read { values: values.into_iter().map(Bytes::into_vec).collect(), context })
            }
            ClientResponse::Error { kind, message } => Err(Error::from_response(kind, message)),
            other => Err(Error::Other(format!("unexpected answer {other:?}"))),
        }
    }

    /// Write `value`, superseding what `context` (from a get) covers; None writes blind.
    /// Returns the new context.
    pub async fn put(&self, key: impl AsRef<[u8]>, value: Vec<u8>, context: Option<&str>) -> Result<String, Error> {
        self.write(key.as_ref(), Some(value), context).await
    }

    /// Delete `key`: a tombstone superseding what `context` covers; without a context the
    /// key is read first.
    pub async fn delete(&self, key: impl AsRef<[u8]>, context: Option<&str>) -> Result<String, Error> {
        let read;
        let context = match context {
            Some(c) => Some(c),
            None => {
                read = self.get(key.as_ref()).await?;
                read.context.as_deref()
            }
        };
        self.write(key.as_ref(), None, context).await
    }

    async fn write(&self, key: &[u8], value: Option<Vec<u8>>, context: Option<&str>) -> Result<String, Error> {
        let request = ClientRequest::Put {
            key: Bytes::from(key.to_vec()),
            context: context.map(str::to_string),
            value: value.map(Bytes::from),
            w: None,
        };
        match self.request(request).await? {
            ClientResponse::Written { context } => Ok(context),
            ClientResponse::Error { kind, message } => Err(Error::from_response(kind, message)),
            other => Err(Error::Other(format!("unexpected answer {other:?}"))),
        }
    }
}

/// The address and credentials a node config file gives a client.
pub fn target_of(config: &Config, secret: Vec<u8>) -> (SocketAddr, Credentials) {
    (config.listen_addr(), Credentials { cluster: config.cluster.name.clone(), secret, node: None })
}
