//! ringkv-client: talk to a ringkv cluster from Rust. No actix and no redb in its tree.
//!
//! [`Client`] is partition-aware (the Dynamo paper's client-driven coordination): it learns
//! the ring from any node it reaches, sends each request straight to a node of the key's
//! preference list, and keeps one connection per node, shared by concurrent requests; it is
//! cheap to clone. [`Connection`] is one connection to one node (status and admin commands
//! go to a particular node); [`Connector`] is the local endpoint connections share.
//!
//! ```no_run
//! use ringkv_client::{Client, Error};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Error> {
//!     // A client file ([client]: nodes and certificates) or a node config reaches the cluster.
//!     let client = Client::from_config_file("config/cluster/n1.toml").await?;
//!     client.put("cart:alice", b"apple".to_vec(), None).await?; // blind write
//!     let read = client.get("cart:alice").await?; // every sibling + context
//!     assert!(read.values.iter().any(|v| v.as_slice() == b"apple"));
//!     let ctx = read.context.expect("a stored key has a context");
//!     client.put("cart:alice", b"apple,pear".to_vec(), Some(&ctx)).await?; // supersedes what was read
//!     client.delete("cart:alice", None).await?; // reads the context first
//!     Ok(())
//! }
//! ```
//!
//! Per-request R and W: [`Client::get_with`] and [`Client::put_with`]. A get of an absent
//! key returns empty `values` (with the tombstone's context if it was deleted). Every
//! [`Error`] has a kind matching the CLI's exit statuses.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringkv::version::split_context;
use ringkv::wire::{Bytes, ClientRequest, ClientResponse, ErrorKind, Message};
use ringkv_transport::{connect, endpoint, link_writer, read_streams, LinkSender};
pub use ringkv_transport::{Credentials, NetError};
use tokio::sync::oneshot;

/// How long a request may wait for its answer (the node answers within its own request
/// timeout; this bounds a node that vanished). A request fails with [`NetError::Timeout`]
/// at most [`TIMEOUT_SWEEP_INTERVAL`] after it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a connection fails the requests that waited longer than [`REQUEST_TIMEOUT`]
/// (one sweep per connection, instead of a timer per request).
pub const TIMEOUT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

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
            NetError::Refused(m) if m.starts_with("not permitted") => Error::Refused(m.clone()),
            NetError::Refused(_) | NetError::BadServerProof => {
                Error::Refused(format!("{e}; check the cluster name and the secret or certificates in the config"))
            }
            NetError::Connect(..) | NetError::Timeout => {
                Error::Unavailable(format!("{e}; is the node running? (--node ADDR picks another)"))
            }
            NetError::Lost(_) | NetError::WrongNode { .. } => Error::Unavailable(e.to_string()),
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

/// A request waiting for its answer: when it times out, and where its answer goes.
struct Pending {
    deadline: Instant,
    tx: oneshot::Sender<Result<ClientResponse, NetError>>,
}

type Waiting = Arc<Mutex<HashMap<u64, Pending>>>;

/// Fail every request of `waiting` whose deadline is past `now` with [`NetError::Timeout`];
/// the others wait on.
fn expire(waiting: &Mutex<HashMap<u64, Pending>>, now: Instant) {
    let expired: Vec<Pending> = match waiting.lock() {
        Ok(mut m) => {
            let ids: Vec<u64> = m.iter().filter(|(_, p)| p.deadline <= now).map(|(id, _)| *id).collect();
            ids.into_iter().filter_map(|id| m.remove(&id)).collect()
        }
        Err(_) => return,
    };
    for p in expired {
        let _ = p.tx.send(Err(NetError::Timeout));
    }
}

struct Inner {
    _endpoint: quinn::Endpoint,
    link: LinkSender,
    waiting: Waiting,
    next_id: AtomicU64,
    /// The newest ring epoch the node told in its answers.
    epoch: Arc<AtomicU64>,
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

/// One authenticated QUIC connection to one node: many requests in flight, each answer
/// matched to its request by id. Cheap to clone. [`Client`] keeps one per node it talks to;
/// use a `Connection` directly to ask one particular node (status, admin commands).
#[derive(Clone)]
pub struct Connection {
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
    pub async fn connect(
        &self,
        addr: SocketAddr,
        creds: &Credentials,
        frame_max: usize,
    ) -> Result<Connection, NetError> {
        let (conn, _node) = connect(&self.endpoint, addr, creds, None).await?;
        let waiting: Waiting = Arc::default();
        let epoch = Arc::new(AtomicU64::new(0));
        let (w, seen) = (waiting.clone(), epoch.clone());
        let reader = read_streams(conn.clone(), frame_max, move |msg| {
            let (id, response) = match msg {
                Message::ClientReply { id, response, epoch } => {
                    seen.fetch_max(epoch, Ordering::Relaxed);
                    (id, response)
                }
                Message::Error { id, kind, message } => (id, ClientResponse::Error { kind, message }),
                _ => return std::future::ready(()),
            };
            let pending = w.lock().ok().and_then(|mut m| m.remove(&id));
            if let Some(p) = pending {
                let _ = p.tx.send(Ok(response));
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
        // Requests that waited too long fail, swept once a second while the connection
        // lives (the reader's end above empties the map and lets go of the last strong
        // reference but the connection's own).
        let swept = Arc::downgrade(&waiting);
        let watched = conn.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TIMEOUT_SWEEP_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = watched.closed() => break,
                    _ = tick.tick() => {}
                }
                let Some(waiting) = swept.upgrade() else { break };
                expire(&waiting, Instant::now());
            }
        });
        let link = link_writer(conn, frame_max);
        Ok(Connection {
            inner: Arc::new(Inner {
                _endpoint: self.endpoint.clone(),
                link,
                waiting,
                next_id: AtomicU64::new(1),
                epoch,
            }),
        })
    }
}

impl Connection {
    /// Connect and authenticate to the node at `addr`, on an endpoint of its own.
    pub async fn connect(addr: SocketAddr, creds: &Credentials, frame_max: usize) -> Result<Connection, NetError> {
        Connector::new(addr.is_ipv6())?.connect(addr, creds, frame_max).await
    }

    /// Send one request and wait for its answer.
    pub async fn request(&self, request: ClientRequest) -> Result<ClientResponse, NetError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if self.inner.link.is_closed() {
            return Err(NetError::Lost("the connection is closed".into()));
        }
        if let Ok(mut m) = self.inner.waiting.lock() {
            m.insert(id, Pending { deadline: Instant::now() + REQUEST_TIMEOUT, tx });
        }
        // However this request ends (answered, failed, timed out, or the caller gave up),
        // its entry goes.
        let _forget = Forget { waiting: &self.inner.waiting, id };
        self.inner.link.send(&Message::Client { id, request }).await?;
        match rx.await {
            Ok(answer) => answer,
            Err(_) => Err(NetError::Lost("the connection closed before the answer".into())),
        }
    }

    /// The newest ring epoch the node has told this connection (0: none yet).
    pub fn epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::Relaxed)
    }

    /// Whether the connection has ended (a new one must be made).
    pub fn is_closed(&self) -> bool {
        self.inner.link.is_closed()
    }
}

/// How often at least a [`Client`] refreshes its view of the ring (the paper's clients poll
/// every 10 seconds).
pub const VIEW_REFRESH: Duration = Duration::from_secs(10);

/// A newer ring epoch in an answer refreshes a view at most this often.
pub const EPOCH_REFRESH_MIN: Duration = Duration::from_secs(1);

/// How long a node that could not be reached is tried only after the others.
pub const UNREACHABLE_FOR: Duration = Duration::from_secs(5);

/// Per-request read options.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// Answers to wait for (default: the namespace's R, the cluster's `read_quorum`).
    pub r: Option<u8>,
    /// The namespace (default: the cluster's own).
    pub ns: Option<String>,
}

/// Per-request write options.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Durable writes to wait for (default: the namespace's W, the cluster's `write_quorum`).
    pub w: Option<u8>,
    /// The namespace (default: the cluster's own).
    pub ns: Option<String>,
}

/// Where each partition's requests go: the addresses of its preference list.
struct View {
    epoch: u64,
    partitions: u32,
    lists: Vec<Vec<SocketAddr>>,
    addrs: HashMap<String, SocketAddr>,
    fetched: Instant,
}

struct Shared {
    connector: Connector,
    creds: Credentials,
    frame_max: usize,
    /// Where to learn the ring: the address given, then a config's seeds.
    seeds: Vec<SocketAddr>,
    /// Send everything to this node (server-driven coordination).
    pin: Option<SocketAddr>,
    pool: Mutex<HashMap<SocketAddr, Connection>>,
    /// Nodes that could not be reached lately: tried last until [`UNREACHABLE_FOR`] passed.
    unreachable: Mutex<HashMap<SocketAddr, Instant>>,
    view: Mutex<Option<Arc<View>>>,
    /// Each namespace's store-key prefix, which places its keys on the ring.
    namespaces: Mutex<HashMap<String, Vec<u8>>>,
    /// One refresh at a time.
    refreshing: tokio::sync::Mutex<()>,
    /// One connection attempt at a time to each node.
    connecting: Gates,
}

/// A gate per address: concurrent first requests to a node wait for one connection
/// attempt instead of each opening a connection of its own (which the node refuses past
/// a few, and a refusal would mark the node unreachable).
type Gates = Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<()>>>>;

/// `pooled()` if it has something, else `connect()`, one caller at a time per `addr`: a
/// caller that waited on another's attempt takes what it pooled.
async fn connect_once<T, E, Fut>(
    gates: &Gates,
    addr: SocketAddr,
    pooled: impl Fn() -> Option<T>,
    connect: impl FnOnce() -> Fut,
) -> Result<T, E>
where
    Fut: std::future::Future<Output = Result<T, E>>,
{
    if let Some(c) = pooled() {
        return Ok(c);
    }
    let gate = gates.lock().ok().map(|mut g| g.entry(addr).or_default().clone());
    let _turn = match &gate {
        Some(gate) => Some(gate.lock().await),
        None => None,
    };
    if let Some(c) = pooled() {
        return Ok(c);
    }
    connect().await
}

/// A client of a ringkv cluster, partition-aware (the paper's client-driven coordination):
/// it learns the ring from any node it reaches, sends each request straight to the first
/// reachable node of the key's preference list (falling down the list when a node cannot be
/// reached), refreshes its view at least every [`VIEW_REFRESH`], after a failure, and when
/// a node answers with a newer ring epoch than its view's, and
/// keeps one pooled connection per node, shared by concurrent requests. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    /// Send a put to the replica its context names as the fastest of the read before.
    fastest_replica: bool,
}

fn document(r: ClientResponse) -> Option<serde_json::Value> {
    match r {
        ClientResponse::Document { json } => serde_json::from_str(&json).ok(),
        _ => None,
    }
}

impl Client {
    /// A client that learns the cluster from the node at `addr` (reached now, to fail early).
    pub async fn connect(addr: SocketAddr, creds: &Credentials, frame_max: usize) -> Result<Client, NetError> {
        Client::start(vec![addr], None, creds, frame_max).await
    }

    /// A client that sends every request to the node at `addr`, which coordinates it or
    /// forwards it (server-driven coordination).
    pub async fn pinned(addr: SocketAddr, creds: &Credentials, frame_max: usize) -> Result<Client, NetError> {
        Client::start(vec![addr], Some(addr), creds, frame_max).await
    }

    /// A client of the cluster a config file names: a client file (`[client]`: the nodes to
    /// reach and certificates or the secret), or a node's own config (its address, then its
    /// seeds, and its credentials).
    pub async fn from_config_file(path: impl AsRef<Path>) -> Result<Client, Error> {
        let setup = ringkv_transport::load_client(path.as_ref()).map_err(Error::BadRequest)?;
        Ok(Client::start(setup.nodes, None, &setup.creds, setup.frame_max).await?)
    }

    async fn start(
        seeds: Vec<SocketAddr>,
        pin: Option<SocketAddr>,
        creds: &Credentials,
        frame_max: usize,
    ) -> Result<Client, NetError> {
        let ipv6 = seeds.first().is_some_and(SocketAddr::is_ipv6);
        let client = Client {
            shared: Arc::new(Shared {
                connector: Connector::new(ipv6)?,
                creds: creds.clone(),
                frame_max,
                seeds,
                pin,
                pool: Mutex::default(),
                unreachable: Mutex::default(),
                view: Mutex::default(),
                namespaces: Mutex::new(HashMap::new()),
                refreshing: tokio::sync::Mutex::new(()),
                connecting: Mutex::default(),
            }),
            fastest_replica: true,
        };
        let mut last = NetError::Connect("no address".into(), "give a node address".into());
        for addr in client.shared.seeds.clone() {
            match client.connection(addr).await {
                Ok(_) => return Ok(client),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Whether a put goes first to the replica its context names as the one that answered
    /// the read before fastest (the paper's section 6.4; on by default), or like any request
    /// to the first node of the preference list.
    pub fn with_fastest_replica(mut self, on: bool) -> Client {
        self.fastest_replica = on;
        self
    }

    /// How many nodes this client holds a live connection to.
    pub fn connected(&self) -> usize {
        self.shared.pool.lock().map(|p| p.values().filter(|c| !c.is_closed()).count()).unwrap_or(0)
    }

    /// The pooled connection to the node at `addr`, made when there is none.
    pub async fn connection(&self, addr: SocketAddr) -> Result<Connection, NetError> {
        let pooled = || self.shared.pool.lock().ok().and_then(|p| p.get(&addr).cloned()).filter(|c| !c.is_closed());
        connect_once(&self.shared.connecting, addr, pooled, || async {
            let c = self.shared.connector.connect(addr, &self.shared.creds, self.shared.frame_max).await?;
            if let Ok(mut p) = self.shared.pool.lock() {
                p.insert(addr, c.clone());
            }
            Ok(c)
        })
        .await
    }

    /// Send a request: one for a key to the first reachable node of its preference list
    /// (or to the pinned node), anything else to the first reachable seed.
    pub async fn request(&self, request: ClientRequest) -> Result<ClientResponse, NetError> {
        // A put that may have reached its node is not sent twice (a blind write would land
        // twice, as two siblings): it moves to the first node reached, uncopied.
        let retry_after_send = !matches!(request, ClientRequest::Put { .. });
        let targets = match (&request, self.shared.pin) {
            (_, Some(pin)) => vec![pin],
            (ClientRequest::Get { key, ns, .. }, None) => self.targets(&self.placed(ns, key).await, None).await,
            (ClientRequest::Put { key, context, ns, .. }, None) => {
                let fastest = context.as_deref().filter(|_| self.fastest_replica).and_then(|c| split_context(c).1);
                self.targets(&self.placed(ns, key).await, fastest).await
            }
            (_, None) => self.shared.seeds.clone(),
        };
        let targets = self.reachable_first(targets);
        let mut request = Some(request);
        let mut last = None;
        for addr in targets {
            let conn = match self.connection(addr).await {
                Ok(c) => c,
                Err(e) => {
                    if let Ok(mut u) = self.shared.unreachable.lock() {
                        u.insert(addr, Instant::now());
                    }
                    self.stale();
                    last = Some(e);
                    continue;
                }
            };
            let attempt = if retry_after_send { request.clone() } else { request.take() };
            let Some(attempt) = attempt else { break };
            match conn.request(attempt).await {
                Err(e) if e.is_unreachable() && retry_after_send => {
                    self.stale();
                    last = Some(e);
                }
                other => {
                    // The node knows a newer ring than the view it was chosen by: learn it (at
                    // most once a second, in case the nodes asked still know the older one).
                    let view = self.shared.view.lock().ok().and_then(|v| v.as_ref().map(|v| (v.epoch, v.fetched)));
                    if view.is_some_and(|(e, at)| conn.epoch() > e && at.elapsed() >= EPOCH_REFRESH_MIN) {
                        self.stale();
                    }
                    return other;
                }
            }
        }
        Err(last.unwrap_or_else(|| NetError::Connect("no node".into(), "the cluster has no reachable member".into())))
    }

    /// Where a key's request goes, in order: the `fastest` replica when it is in the key's
    /// preference list, the preference list as last learned, then the seeds (any node
    /// coordinates or forwards).
    /// The key the ring places `key` of namespace `ns` by: its store key, once the
    /// namespace's definition is known (asked of the cluster the first time). Unknown
    /// namespaces place by the key as given; the node that takes the request refuses it.
    async fn placed(&self, ns: &Option<String>, key: &[u8]) -> Vec<u8> {
        let Some(name) = ns.as_deref().filter(|n| *n != ringkv::namespace::DEFAULT_NAME) else { return key.to_vec() };
        let known = |c: &Client| c.shared.namespaces.lock().ok().and_then(|m| m.get(name).cloned());
        let prefix = match known(self) {
            Some(p) => Some(p),
            None => {
                if let Ok(ClientResponse::Document { json }) = Box::pin(self.request(ClientRequest::Namespaces)).await {
                    self.learn_namespaces(&json);
                }
                known(self)
            }
        };
        match prefix {
            Some(p) => [&p[..], key].concat(),
            None => key.to_vec(),
        }
    }

    /// Keep the prefixes of the namespaces `admin namespace list` answered with.
    fn learn_namespaces(&self, json: &str) {
        let Ok(doc) = serde_json::from_str::<serde_json::Value>(json) else { return };
        let Some(list) = doc["namespaces"].as_array() else { return };
        let Ok(mut known) = self.shared.namespaces.lock() else { return };
        for ns in list {
            let (Some(name), Some(n), Some(res)) = (ns["name"].as_str(), ns["n"].as_u64(), ns["resolution"].as_str())
            else {
                continue;
            };
            let (Ok(n), Ok(resolution)) = (u8::try_from(n), ringkv::namespace::Resolution::parse(res)) else {
                continue;
            };
            if let Ok(prefix) = ringkv::namespace::prefix_of(name, n, resolution) {
                known.insert(name.to_string(), prefix);
            }
        }
    }

    async fn targets(&self, key: &[u8], fastest: Option<&str>) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        if let Some(view) = self.view().await {
            let p = ringkv::ring::partition_of_position(ringkv::ring::key_position(key), view.partitions);
            if let Some(list) = view.lists.get(p as usize) {
                if let Some(f) = fastest.and_then(|n| view.addrs.get(n)).filter(|a| list.contains(a)) {
                    out.push(*f);
                }
                for a in list {
                    if !out.contains(a) {
                        out.push(*a);
                    }
                }
            }
        }
        for s in &self.shared.seeds {
            if !out.contains(s) {
                out.push(*s);
            }
        }
        out
    }

    /// `targets` with the nodes that could not be reached lately moved last (a dead node
    /// costs a connection timeout once, not on every request).
    fn reachable_first(&self, targets: Vec<SocketAddr>) -> Vec<SocketAddr> {
        match self.shared.unreachable.lock() {
            Ok(mut u) => reachable_first(targets, &mut u, Instant::now()),
            Err(_) => targets,
        }
    }

    /// Forget the view: the next request learns the ring again.
    fn stale(&self) {
        if let Ok(mut v) = self.shared.view.lock() {
            *v = None;
        }
    }

    /// The current view of the ring, refreshed when it is older than [`VIEW_REFRESH`].
    async fn view(&self) -> Option<Arc<View>> {
        let current = self.shared.view.lock().ok().and_then(|v| v.clone());
        if let Some(v) = current.as_ref().filter(|v| v.fetched.elapsed() < VIEW_REFRESH) {
            return Some(v.clone());
        }
        let _one = self.shared.refreshing.lock().await;
        if let Some(v) = self.shared.view.lock().ok().and_then(|v| v.clone()) {
            if v.fetched.elapsed() < VIEW_REFRESH {
                return Some(v);
            }
        }
        let mut sources: Vec<SocketAddr> =
            self.shared.pool.lock().map(|p| p.keys().copied().collect()).unwrap_or_default();
        sources.extend(self.shared.seeds.iter().copied());
        for addr in sources {
            if let Some(view) = self.fetch_view(addr).await {
                let view = Arc::new(view);
                if let Ok(mut v) = self.shared.view.lock() {
                    *v = Some(view.clone());
                }
                return Some(view);
            }
        }
        // No node answered: keep routing by the last view, if any.
        current
    }

    /// The ring and the members' addresses, from the node at `addr`.
    async fn fetch_view(&self, addr: SocketAddr) -> Option<View> {
        let conn = self.connection(addr).await.ok()?;
        let ring = document(conn.request(ClientRequest::Ring).await.ok()?)?;
        let status = document(conn.request(ClientRequest::Status).await.ok()?)?;
        let addrs: HashMap<String, SocketAddr> = status["members"]
            .as_array()?
            .iter()
            .filter(|m| m["state"] == "up" || m["state"] == "joining")
            .filter_map(|m| Some((m["id"].as_str()?.to_string(), m["addr"].as_str()?.parse().ok()?)))
            .collect();
        let lists: Vec<Vec<SocketAddr>> = ring["partitions"]
            .as_array()?
            .iter()
            .map(|p| {
                p["preference_list"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|n| n.as_str().and_then(|n| addrs.get(n)).copied())
                    .collect()
            })
            .collect();
        let partitions = u32::try_from(lists.len()).ok().filter(|q| q.is_power_of_two())?;
        let epoch = ring["epoch"].as_u64().unwrap_or(0);
        Some(View { epoch, partitions, lists, addrs, fetched: Instant::now() })
    }

    /// Every concurrent value of `key` and the context to write back with.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Read, Error> {
        self.get_with(key, ReadOptions::default()).await
    }

    /// [`get`](Self::get) with per-request options.
    pub async fn get_with(&self, key: impl AsRef<[u8]>, options: ReadOptions) -> Result<Read, Error> {
        let request = ClientRequest::Get { key: Bytes::from(key.as_ref().to_vec()), r: options.r, ns: options.ns };
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
        self.put_with(key, value, context, WriteOptions::default()).await
    }

    /// [`put`](Self::put) with per-request options.
    pub async fn put_with(
        &self,
        key: impl AsRef<[u8]>,
        value: Vec<u8>,
        context: Option<&str>,
        options: WriteOptions,
    ) -> Result<String, Error> {
        self.write(key.as_ref(), Some(value), context, options).await
    }

    /// Delete `key`: a tombstone superseding what `context` covers; without a context the
    /// key is read first.
    pub async fn delete(&self, key: impl AsRef<[u8]>, context: Option<&str>) -> Result<String, Error> {
        self.delete_with(key, context, WriteOptions::default()).await
    }

    /// [`delete`](Self::delete) with per-request options (the read before, if any, is in
    /// the same namespace).
    pub async fn delete_with(
        &self,
        key: impl AsRef<[u8]>,
        context: Option<&str>,
        options: WriteOptions,
    ) -> Result<String, Error> {
        let read;
        let context = match context {
            Some(c) => Some(c),
            None => {
                read = self.get_with(key.as_ref(), ReadOptions { r: None, ns: options.ns.clone() }).await?;
                read.context.as_deref()
            }
        };
        self.write(key.as_ref(), None, context, options).await
    }

    async fn write(
        &self,
        key: &[u8],
        value: Option<Vec<u8>>,
        context: Option<&str>,
        options: WriteOptions,
    ) -> Result<String, Error> {
        let request = ClientRequest::Put {
            key: Bytes::from(key.to_vec()),
            context: context.map(str::to_string),
            value: value.map(Bytes::from),
            w: options.w,
            ns: options.ns,
        };
        match self.request(request).await? {
            ClientResponse::Written { context } => Ok(context),
            ClientResponse::Error { kind, message } => Err(Error::from_response(kind, message)),
            other => Err(Error::Other(format!("unexpected answer {other:?}"))),
        }
    }
}

/// `targets` in order, but those that failed within [`UNREACHABLE_FOR`] of `now` last;
/// older failures are forgotten.
fn reachable_first(
    targets: Vec<SocketAddr>,
    unreachable: &mut HashMap<SocketAddr, Instant>,
    now: Instant,
) -> Vec<SocketAddr> {
    unreachable.retain(|_, at| now.saturating_duration_since(*at) < UNREACHABLE_FOR);
    if unreachable.is_empty() {
        return targets;
    }
    let (late, ok): (Vec<SocketAddr>, Vec<SocketAddr>) = targets.into_iter().partition(|a| unreachable.contains_key(a));
    ok.into_iter().chain(late).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sweep fails exactly the requests whose deadline has passed, with a timeout, and
    /// leaves the others waiting for their answers.
    #[test]
    fn a_sweep_times_out_only_the_requests_past_their_deadline() {
        let now = Instant::now();
        let waiting = Mutex::new(HashMap::new());
        let mut receivers = Vec::new();
        for (id, deadline) in [(1, now - Duration::from_secs(1)), (2, now), (3, now + Duration::from_secs(1))] {
            let (tx, rx) = oneshot::channel();
            waiting.lock().unwrap().insert(id, Pending { deadline, tx });
            receivers.push((id, rx));
        }
        expire(&waiting, now);
        let left: Vec<u64> = waiting.lock().unwrap().keys().copied().collect();
        assert_eq!(left, vec![3]);
        for (id, mut rx) in receivers {
            match rx.try_recv() {
                Ok(Err(NetError::Timeout)) => assert!(id < 3, "request {id} timed out early"),
                Err(oneshot::error::TryRecvError::Empty) => assert_eq!(id, 3, "request {id} was not timed out"),
                other => panic!("request {id}: unexpected {other:?}"),
            }
        }
    }

    /// Sixteen requests that all find no connection to a node open one between them (they
    /// opened sixteen, and the node refused some, which sent the client's traffic elsewhere).
    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_first_requests_to_a_node_open_one_connection() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let (gates, pool, attempts) = (Gates::default(), Mutex::new(None::<u32>), AtomicU64::new(0));
        let one = || {
            connect_once(
                &gates,
                addr,
                || *pool.lock().unwrap(),
                || async {
                    let n = attempts.fetch_add(1, Ordering::Relaxed) as u32;
                    tokio::task::yield_now().await;
                    *pool.lock().unwrap() = Some(n);
                    Ok::<u32, ()>(n)
                },
            )
        };
        let got = futures::future::join_all((0..16).map(|_| one())).await;
        assert_eq!(attempts.load(Ordering::Relaxed), 1);
        assert!(got.iter().all(|c| *c == Ok(0)), "{got:?}");
        let other: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let fresh = connect_once(&gates, other, || None, || async { Ok::<u32, ()>(7) }).await;
        assert_eq!(fresh, Ok(7), "each address has its own gate");
    }

    #[test]
    fn a_node_that_could_not_be_reached_is_tried_last_for_a_while() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let c: SocketAddr = "127.0.0.1:3".parse().unwrap();
        let t0 = Instant::now();
        let mut failed = HashMap::from([(a, t0)]);
        assert_eq!(reachable_first(vec![a, b, c], &mut failed, t0), vec![b, c, a]);
        assert_eq!(reachable_first(vec![c, a], &mut failed, t0 + UNREACHABLE_FOR / 2), vec![c, a]);
        assert_eq!(reachable_first(vec![a, b], &mut failed, t0 + UNREACHABLE_FOR), vec![a, b], "then first again");
        assert!(failed.is_empty());
    }
}
