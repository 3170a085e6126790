//! The transport stage: the node's quinn endpoint, for peers and clients alike.
//!
//! Incoming: every connection must pass the handshake ([`ringkv_transport::accept_handshake`])
//! before it may open a stream; at most [`HANDSHAKES_MAX`] connections may be handshaking at
//! once, and refusals are logged at most once a second. Then every message read from the
//! connection goes to the stage [`ringkv::stage::admit`] names, with its origin (the
//! connection, and the identity the peer authenticated as), or, when the peer's role does
//! not permit it, the refusal `admit` gives goes back. Outgoing: a message goes back on
//! a connection, or to a member by id (through the address book the gossip stage keeps
//! current) or to an address, on a pooled connection dialled on demand. A peer that cannot
//! be dialled, or whose connection fails, is reported to every stage that waits on peers
//! ([`Signal::Unreachable`]). With fault injection, traffic with blocked peers is dropped.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use ringkv::access::Identity;
use ringkv::ring::NodeId;
use ringkv::stage::{admit, subscribers, ConnId, Dest, Input, Origin, Signal, StageId};
use ringkv::wire::Message;
use ringkv_transport::{self as net, Credentials, LinkSender};

use crate::mailbox::Deliver;
use crate::metrics::NodeMetrics;

/// Connections that may be in their handshake at once; more are refused.
pub const HANDSHAKES_MAX: usize = 64;

/// What the stages ask of the transport.
#[derive(Message)]
#[rtype(result = "()")]
pub enum Outgoing {
    Send {
        to: Dest,
        msg: Message,
    },
    /// Every member's address.
    Peers(Vec<(NodeId, String)>),
    /// Fault injection: drop traffic with these peers (None: unblock all).
    Block(Option<Vec<NodeId>>),
}

/// The stages' mailboxes, for incoming messages and unreachable peers.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetStages(pub Vec<(StageId, Recipient<Deliver>)>);

#[derive(Default)]
struct Shared {
    /// Every live connection, by id.
    conns: HashMap<ConnId, LinkSender>,
    /// Dialled connections by address.
    pool: HashMap<SocketAddr, ConnId>,
    /// Connections other nodes dialled, by node: to a node whose id sorts before this
    /// node's, messages go on the connection that node dialled (see [`TransportActor::me`]).
    accepted: HashMap<NodeId, ConnId>,
    /// Dials in progress: messages wait for them.
    dialing: HashMap<SocketAddr, Vec<Message>>,
    /// Read by the connections' readers, on the runtime.
    blocked: Arc<Mutex<HashSet<NodeId>>>,
    stages: Vec<(StageId, Recipient<Deliver>)>,
    next_conn: ConnId,
    handshaking: usize,
    last_refusal_log: Option<Instant>,
    /// Open connections by role go here.
    metrics: NodeMetrics,
}

impl Shared {
    fn conn_id(&mut self) -> ConnId {
        self.next_conn = self.next_conn.wrapping_add(1);
        self.next_conn
    }

    /// The connection `id`, while it is open.
    fn live(&self, id: Option<&ConnId>) -> Option<LinkSender> {
        id.and_then(|id| self.conns.get(id)).filter(|l| !l.is_closed()).cloned()
    }

    fn stage(&self, id: StageId) -> Option<Recipient<Deliver>> {
        self.stages.iter().find(|(s, _)| *s == id).map(|(_, r)| r.clone())
    }
}

pub struct TransportActor {
    endpoint: quinn::Endpoint,
    /// This node's id. Two nodes each dial the other, but send on one connection between
    /// them, the one the node whose id sorts first dialled: requests and answers both ways
    /// then share its packets.
    me: Option<NodeId>,
    creds: Credentials,
    frame_max: usize,
    book: HashMap<NodeId, SocketAddr>,
    shared: Rc<RefCell<Shared>>,
}

impl TransportActor {
    /// The transport on `endpoint`; open connections are counted in `metrics`.
    pub fn new(endpoint: quinn::Endpoint, creds: Credentials, frame_max: usize, metrics: NodeMetrics) -> Self {
        let shared = Rc::new(RefCell::new(Shared { metrics, ..Shared::default() }));
        TransportActor { endpoint, me: creds.node.clone(), creds, frame_max, book: HashMap::new(), shared }
    }

    fn is_blocked(&self, node: &NodeId) -> bool {
        self.shared.borrow().blocked.lock().is_ok_and(|b| b.contains(node))
    }

    fn node_of(&self, addr: SocketAddr) -> Option<NodeId> {
        self.book.iter().find(|(_, a)| **a == addr).map(|(n, _)| n.clone())
    }
}

/// Tell every stage that waits on peers that `node` cannot be reached.
fn unreachable(shared: &Rc<RefCell<Shared>>, node: NodeId) {
    let sig = Signal::Unreachable { node };
    let targets: Vec<Recipient<Deliver>> = subscribers(&sig).iter().filter_map(|s| shared.borrow().stage(*s)).collect();
    for r in targets {
        let input = Input::Signal(sig.clone());
        actix::spawn(async move {
            let _ = r.send(Deliver(input, None)).await;
        });
    }
}

/// Serve a connection that passed its handshake: register it and read its streams.
fn serve(
    shared: Rc<RefCell<Shared>>,
    conn: quinn::Connection,
    peer: Identity,
    frame_max: usize,
    dialled: bool,
) -> ConnId {
    let link = net::link_writer(conn.clone(), frame_max);
    let id = {
        let mut s = shared.borrow_mut();
        let id = s.conn_id();
        s.conns.insert(id, link.clone());
        if let Some(n) = peer.node().filter(|_| !dialled) {
            s.accepted.insert(n.clone(), id);
        }
        s.metrics.connection(peer.role().name(), 1);
        id
    };
    let role = peer.role().name();
    let node = peer.node().cloned();
    let origin = Origin::of(id, &peer);
    let stages: Vec<(StageId, Recipient<Deliver>)> = shared.borrow().stages.clone();
    let blocked = shared.borrow().blocked.clone();
    // Each message goes straight from the connection's reader to its stage's mailbox; only
    // a full mailbox makes the reader wait (a slow stage slows this connection, not memory).
    actix::spawn(net::read_streams(conn.clone(), frame_max, move |msg| {
        let is_blocked = origin.node.as_ref().is_some_and(|n| blocked.lock().is_ok_and(|b| b.contains(n)));
        let target = match admit(&origin, &msg) {
            _ if is_blocked => None,
            Err(refusal) => {
                tracing::debug!(kind = msg.kind(), role = origin.role.name(), "not permitted or not served; dropped");
                if let Some(r) = refusal {
                    let _ = link.try_send(&r);
                }
                None
            }
            Ok(stage) => stages.iter().find(|(s, _)| *s == stage).map(|(_, r)| r),
        };
        // Queued here; only a full mailbox needs the stage's address in the future to wait on.
        let full = target.and_then(|r| {
            let input = Input::Message { from: origin.clone(), msg };
            match r.try_send(Deliver(input, Some(Instant::now()))) {
                Err(SendError::Full(deliver)) => Some((r.clone(), deliver)),
                _ => None,
            }
        });
        async move {
            if let Some((r, deliver)) = full {
                let _ = r.send(deliver).await;
            }
        }
    }));
    let sh = shared.clone();
    actix::spawn(async move {
        let reason = conn.closed().await;
        tracing::debug!(%reason, ?node, "connection closed");
        let mut s = sh.borrow_mut();
        s.conns.remove(&id);
        s.metrics.connection(role, -1);
        s.pool.retain(|_, c| *c != id);
        s.accepted.retain(|_, c| *c != id);
        drop(s);
        if let Some(n) = node {
            unreachable(&sh, n);
        }
    });
    id
}

impl Actor for TransportActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(64 * 1024);
        let ep = self.endpoint.clone();
        let creds = self.creds.clone();
        let shared = self.shared.clone();
        let frame_max = self.frame_max;
        actix::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                if shared.borrow().handshaking >= HANDSHAKES_MAX {
                    incoming.refuse();
                    continue;
                }
                shared.borrow_mut().handshaking += 1;
                let (creds, shared) = (creds.clone(), shared.clone());
                actix::spawn(async move {
                    let remote = incoming.remote_address();
                    let accepted = async {
                        let conn = incoming.await.map_err(|e| e.to_string())?;
                        let peer = net::accept_handshake(&conn, &creds).await?;
                        Ok::<_, String>((conn, peer))
                    }
                    .await;
                    shared.borrow_mut().handshaking -= 1;
                    match accepted {
                        Ok((conn, peer)) => {
                            tracing::debug!(%remote, ?peer, "accepted a connection");
                            serve(shared, conn, peer, frame_max, false);
                        }
                        Err(reason) => {
                            let mut s = shared.borrow_mut();
                            let quiet = s.last_refusal_log.is_some_and(|t| t.elapsed() < Duration::from_secs(1));
                            if quiet {
                                tracing::debug!(%remote, %reason, "refused a connection");
                            } else {
                                s.last_refusal_log = Some(Instant::now());
                                tracing::warn!(%remote, %reason, "refused a connection (further refusals within a second are logged at debug)");
                            }
                        }
                    }
                });
            }
        });
    }
}

impl Handler<SetStages> for TransportActor {
    type Result = ();
    fn handle(&mut self, m: SetStages, _: &mut Context<Self>) {
        self.shared.borrow_mut().stages = m.0;
    }
}

impl TransportActor {
    /// [`write`] `msg` on `link`; the transport sends nothing else until a full outbox
    /// takes it.
    fn write_on(&self, link: LinkSender, msg: Message, node: Option<NodeId>, ctx: &mut Context<Self>) {
        if let Some(wait) = write(link, msg, node, self.shared.clone()) {
            ctx.wait(actix::fut::wrap_future(wait));
        }
    }

    /// Send on the connection the node at `addr` shares with this one: the one it dialled
    /// when its id sorts first, else this node's own, dialled first if need be.
    fn send_to_addr(&mut self, addr: SocketAddr, node: Option<NodeId>, msg: Message, ctx: &mut Context<Self>) {
        let existing = {
            let s = self.shared.borrow();
            let theirs = node.as_ref().filter(|n| self.me.as_ref().is_some_and(|me| me > *n));
            theirs.and_then(|n| s.live(s.accepted.get(n))).or_else(|| s.live(s.pool.get(&addr)))
        };
        if let Some(link) = existing {
            self.write_on(link, msg, node, ctx);
            return;
        }
        {
            let mut s = self.shared.borrow_mut();
            if let Some(queue) = s.dialing.get_mut(&addr) {
                if queue.len() < 4096 {
                    queue.push(msg);
                }
                return;
            }
            s.dialing.insert(addr, vec![msg]);
        }
        let (ep, creds, shared, frame_max) =
            (self.endpoint.clone(), self.creds.clone(), self.shared.clone(), self.frame_max);
        actix::spawn(async move {
            let dialled = net::connect(&ep, addr, &creds, node.as_deref()).await;
            let queued = shared.borrow_mut().dialing.remove(&addr).unwrap_or_default();
            match dialled {
                Ok((conn, peer)) => {
                    let id = serve(shared.clone(), conn, Identity::Node(peer), frame_max, true);
                    shared.borrow_mut().pool.insert(addr, id);
                    let link = shared.borrow().conns.get(&id).cloned();
                    if let Some(link) = link {
                        for m in queued {
                            if let Some(wait) = write(link.clone(), m, node.clone(), shared.clone()) {
                                wait.await;
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "cannot reach peer");
                    if let Some(n) = node {
                        unreachable(&shared, n);
                    }
                }
            }
        });
    }
}

/// Queue `msg` on a connection. When its outbox is full, the future to wait on before
/// anything else is sent (the transport holds its next message until then, so producers
/// slow down instead of memory growing); a closed connection is reported.
fn write(
    link: LinkSender,
    msg: Message,
    node: Option<NodeId>,
    shared: Rc<RefCell<Shared>>,
) -> Option<impl std::future::Future<Output = ()>> {
    match link.try_send(&msg) {
        Ok(true) => None,
        Ok(false) if !link.is_closed() => Some(async move {
            if link.send(&msg).await.is_err() {
                if let Some(n) = node {
                    unreachable(&shared, n);
                }
            }
        }),
        Ok(false) => {
            if let Some(n) = node {
                unreachable(&shared, n);
            }
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, kind = msg.kind(), "a message cannot be sent");
            None
        }
    }
}

impl Handler<Outgoing> for TransportActor {
    type Result = ();

    fn handle(&mut self, out: Outgoing, ctx: &mut Context<Self>) {
        match out {
            Outgoing::Send { to, msg } => match to {
                Dest::Conn(id) => {
                    let link = self.shared.borrow().conns.get(&id).cloned();
                    if let Some(link) = link {
                        self.write_on(link, msg, None, ctx);
                    }
                }
                Dest::Node(node) => {
                    if self.is_blocked(&node) {
                        return;
                    }
                    match self.book.get(&node).copied() {
                        Some(addr) => self.send_to_addr(addr, Some(node), msg, ctx),
                        None => unreachable(&self.shared, node),
                    }
                }
                Dest::Addr(a) => match a.parse::<SocketAddr>() {
                    Ok(addr) => {
                        let node = self.node_of(addr);
                        if node.as_ref().is_some_and(|n| self.is_blocked(n)) {
                            return;
                        }
                        self.send_to_addr(addr, node, msg, ctx)
                    }
                    Err(_) => tracing::debug!(addr = %a, "not an address"),
                },
            },
            Outgoing::Peers(peers) => {
                self.book = peers.into_iter().filter_map(|(n, a)| a.parse().ok().map(|a| (n, a))).collect();
            }
            Outgoing::Block(peers) => {
                let addrs: Vec<SocketAddr> = {
                    let s = self.shared.borrow();
                    let Ok(mut blocked) = s.blocked.lock() else { return };
                    match peers {
                        Some(p) => blocked.extend(p),
                        None => blocked.clear(),
                    }
                    self.book.iter().filter(|(n, _)| blocked.contains(*n)).map(|(_, a)| *a).collect()
                };
                // Close connections to blocked peers so nothing in flight slips through.
                let mut s = self.shared.borrow_mut();
                for a in addrs {
                    if let Some(id) = s.pool.remove(&a) {
                        if let Some(link) = s.conns.remove(&id) {
                            link.connection().close(3u32.into(), b"blocked");
                        }
                    }
                }
            }
        }
    }
}
