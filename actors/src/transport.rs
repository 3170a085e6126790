//! The Transport stage: the node's quinn endpoint, for peers and clients alike.
//!
//! Outgoing: [`Call`] sends one message to a node (by id, through the address book the
//! gossiper keeps current) or an address, on a new stream of a pooled, authenticated
//! connection, and returns the one-message answer. Incoming: every connection must pass the
//! handshake of [`crate::net`] before any stream is served; each stream then carries one
//! request, which the [`Router`] hands to the stage that owns it. Malformed frames are
//! answered with an error and the node keeps serving. With fault injection on, traffic to
//! and from blocked peers is dropped here.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use actix::prelude::*;
use ringkv::ring::NodeId;
use ringkv::wire::{ErrorKind, Message};

use crate::net::{self, Credentials, NetError};
use crate::router::Router;

/// Where a call goes.
#[derive(Clone, Debug)]
pub enum Dest {
    Node(NodeId),
    Addr(SocketAddr),
}

/// Send one message and wait for the answer.
#[derive(Message)]
#[rtype(result = "Result<Message, NetError>")]
pub struct Call {
    pub to: Dest,
    pub msg: Message,
    pub timeout: Duration,
}

/// The current address of every member.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetBook(pub HashMap<NodeId, SocketAddr>);

#[derive(Message)]
#[rtype(result = "()")]
pub struct SetRouter(pub Router);

/// Fault injection: drop traffic with these peers (None: unblock all).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Block(pub Option<Vec<NodeId>>);

type Pool = Rc<RefCell<HashMap<SocketAddr, quinn::Connection>>>;

pub struct Transport {
    endpoint: quinn::Endpoint,
    creds: Credentials,
    pool: Pool,
    book: HashMap<NodeId, SocketAddr>,
    blocked: Rc<RefCell<HashSet<NodeId>>>,
    router: Rc<RefCell<Option<Router>>>,
    frame_max: usize,
}

impl Transport {
    pub fn new(endpoint: quinn::Endpoint, creds: Credentials, frame_max: usize) -> Self {
        Transport {
            endpoint,
            creds,
            pool: Rc::default(),
            book: HashMap::new(),
            blocked: Rc::default(),
            router: Rc::default(),
            frame_max,
        }
    }

    fn node_of(&self, addr: SocketAddr) -> Option<&NodeId> {
        self.book.iter().find(|(_, a)| **a == addr).map(|(n, _)| n)
    }
}

impl Actor for Transport {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(64 * 1024);
        let ep = self.endpoint.clone();
        let creds = self.creds.clone();
        let router = self.router.clone();
        let blocked = self.blocked.clone();
        let max = self.frame_max;
        actix::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let (creds, router, blocked) = (creds.clone(), router.clone(), blocked.clone());
                actix::spawn(async move {
                    let remote = incoming.remote_address();
                    let conn = match incoming.await {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::debug!(%remote, error = %e, "incoming connection failed");
                            return;
                        }
                    };
                    let peer = match net::accept_handshake(&conn, &creds).await {
                        Ok(p) => p,
                        Err(reason) => {
                            tracing::warn!(%remote, %reason, "refused a connection");
                            return;
                        }
                    };
                    serve_connection(conn, peer, router, blocked, max).await;
                });
            }
        });
    }
}

async fn serve_connection(
    conn: quinn::Connection,
    peer: Option<NodeId>,
    router: Rc<RefCell<Option<Router>>>,
    blocked: Rc<RefCell<HashSet<NodeId>>>,
    max: usize,
) {
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let (peer, router, blocked) = (peer.clone(), router.clone(), blocked.clone());
        actix::spawn(async move {
            let is_blocked = |p: &Option<NodeId>| p.as_ref().is_some_and(|p| blocked.borrow().contains(p));
            if is_blocked(&peer) {
                return;
            }
            let reply = match net::read_message(&mut recv, max).await {
                Ok(msg) => {
                    let Some(r) = router.borrow().clone() else { return };
                    r.dispatch(peer.clone(), msg).await
                }
                Err(e) => {
                    tracing::debug!(error = %e, "malformed request");
                    Message::Error { id: 0, kind: ErrorKind::BadRequest, message: e.to_string() }
                }
            };
            if is_blocked(&peer) {
                return;
            }
            let _ = net::write_message(&mut send, &reply).await;
        });
    }
}

impl Handler<Call> for Transport {
    type Result = ResponseFuture<Result<Message, NetError>>;

    fn handle(&mut self, call: Call, _: &mut Context<Self>) -> Self::Result {
        let (addr, node) = match &call.to {
            Dest::Node(n) => match self.book.get(n) {
                Some(a) => (*a, Some(n.clone())),
                None => {
                    let n = n.clone();
                    return Box::pin(async move { Err(NetError::Connect(n, "no known address".into())) });
                }
            },
            Dest::Addr(a) => (*a, self.node_of(*a).cloned()),
        };
        if node.as_ref().is_some_and(|n| self.blocked.borrow().contains(n)) {
            // A blocked peer looks exactly like an unreachable one: no answer until the deadline.
            return Box::pin(async move {
                tokio::time::sleep(call.timeout).await;
                Err(NetError::Timeout)
            });
        }
        let pool = self.pool.clone();
        let ep = self.endpoint.clone();
        let creds = self.creds.clone();
        let max = self.frame_max;
        Box::pin(async move {
            let work = async {
                let existing = pool.borrow().get(&addr).filter(|c| c.close_reason().is_none()).cloned();
                let conn = match existing {
                    Some(c) => c,
                    None => {
                        let c = net::connect(&ep, addr, &creds).await?;
                        pool.borrow_mut().insert(addr, c.clone());
                        c
                    }
                };
                let res = net::call(&conn, &call.msg, max).await;
                if matches!(res, Err(NetError::Lost(_))) {
                    pool.borrow_mut().remove(&addr);
                }
                res
            };
            tokio::time::timeout(call.timeout, work).await.unwrap_or(Err(NetError::Timeout))
        })
    }
}

impl Handler<SetBook> for Transport {
    type Result = ();
    fn handle(&mut self, msg: SetBook, _: &mut Context<Self>) {
        self.book = msg.0;
    }
}

impl Handler<SetRouter> for Transport {
    type Result = ();
    fn handle(&mut self, msg: SetRouter, _: &mut Context<Self>) {
        *self.router.borrow_mut() = Some(msg.0);
    }
}

impl Handler<Block> for Transport {
    type Result = ();
    fn handle(&mut self, msg: Block, _: &mut Context<Self>) {
        let mut b = self.blocked.borrow_mut();
        match msg.0 {
            Some(peers) => {
                tracing::warn!(?peers, "fault injection: blocking traffic");
                b.extend(peers);
            }
            None => {
                tracing::warn!("fault injection: unblocking all traffic");
                b.clear();
            }
        }
        // Drop pooled connections to blocked peers so nothing in flight slips through.
        let blocked_addrs: Vec<SocketAddr> =
            self.book.iter().filter(|(n, _)| b.contains(*n)).map(|(_, a)| *a).collect();
        let mut pool = self.pool.borrow_mut();
        for a in blocked_addrs {
            if let Some(c) = pool.remove(&a) {
                c.close(3u32.into(), b"blocked");
            }
        }
    }
}
