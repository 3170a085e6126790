//! The ClientApi stage: admits client requests. It checks them (key and value sizes, quorum
//! overrides, the context), bounds how many are in flight (more are refused as overloaded,
//! not queued), starts one Coordinator actor per get or put with the current ring and
//! reachability, and answers admin requests from the other stages' state.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use ringkv::config::Config;
use ringkv::coordinator::{Coordinator, Operation, Request, RequestLimits, Timeouts};
use ringkv::membership::{Member, MemberState};
use ringkv::ring::{NodeId, Ring};
use ringkv::version::VersionVector;
use ringkv::wire::{Bytes, ClientRequest, ClientResponse, ErrorKind};
use serde_json::json;
use tokio::sync::oneshot;

use crate::admission::{AdmissionActor, GetLimits, Latency, SetLimits};
use crate::clock::{mono_ms, wall_ms};
use crate::coordinator::{CoordinatorActor, Stages};
use crate::failure_detector::Unreachable;
use crate::gossiper::{Gossiper, Leave, View};
use crate::handoff::PendingTransfers;
use crate::storage::{Answer, Query};
use crate::transport::Block;

type Response = ResponseFuture<ClientResponse>;

fn error(kind: ErrorKind, message: impl Into<String>) -> ClientResponse {
    ClientResponse::Error { kind, message: message.into() }
}

fn ready(r: ClientResponse) -> Response {
    Box::pin(async move { r })
}

fn document(v: serde_json::Value) -> ClientResponse {
    ClientResponse::Document { json: v.to_string() }
}

pub struct ClientApi {
    me: NodeId,
    config: Arc<Config>,
    stages: Stages,
    admission: Addr<AdmissionActor>,
    gossiper: Option<Addr<Gossiper>>,
    members: Vec<Member>,
    ring: Option<Ring>,
    epoch: u64,
    unreachable: BTreeSet<NodeId>,
    inflight: Rc<Cell<u32>>,
    next_id: u64,
    transfers: u64,
}

impl ClientApi {
    pub fn new(me: NodeId, config: Arc<Config>, stages: Stages, admission: Addr<AdmissionActor>) -> Self {
        ClientApi {
            me,
            config,
            stages,
            admission,
            gossiper: None,
            members: Vec::new(),
            ring: None,
            epoch: 0,
            unreachable: BTreeSet::new(),
            inflight: Rc::new(Cell::new(0)),
            next_id: 1,
            transfers: 0,
        }
    }

    fn n(&self) -> usize {
        self.config.cluster.replicas as usize
    }

    fn limits(&self) -> RequestLimits {
        let (c, l) = (&self.config.cluster, &self.config.limits);
        RequestLimits {
            replicas: c.replicas as usize,
            read_quorum: c.read_quorum as usize,
            write_quorum: c.write_quorum as usize,
            max_key_bytes: l.max_key_bytes as usize,
            max_value_bytes: l.max_value_bytes as usize,
        }
    }

    /// Start a coordinator for `key` and wait for its answer.
    fn coordinate(&mut self, key: Vec<u8>, op: Operation) -> Response {
        let Some(ring) = &self.ring else {
            return ready(error(ErrorKind::Unavailable, "this node has not joined a cluster yet: check its seeds"));
        };
        if self.inflight.get() >= self.config.coordinator.max_inflight {
            return ready(error(ErrorKind::Overloaded, "too many requests in flight on this node; retry"));
        }
        let plan = ring.preference_list(ring.partition_for_key(&key), self.n());
        let now = mono_ms();
        let c = &self.config.coordinator;
        let timeouts = Timeouts { deadline_ms: now + c.request_timeout_ms, replica_ms: c.replica_timeout_ms };
        let unreachable = &self.unreachable;
        let core =
            Coordinator::new(now, self.me.clone(), Request { key, op, timeouts }, &plan, |n| !unreachable.contains(n));
        let (tx, rx) = oneshot::channel();
        let id = self.next_id;
        self.next_id += 1;
        CoordinatorActor::new(
            core,
            self.me.clone(),
            id,
            self.stages.clone(),
            tx,
            Duration::from_millis(c.replica_timeout_ms),
            Duration::from_millis(c.request_timeout_ms),
        )
        .start();
        let inflight = self.inflight.clone();
        inflight.set(inflight.get() + 1);
        let admission = self.admission.clone();
        Box::pin(async move {
            let r = rx.await.unwrap_or_else(|_| error(ErrorKind::Internal, "the request's coordinator stopped"));
            inflight.set(inflight.get().saturating_sub(1));
            admission.do_send(Latency(mono_ms().saturating_sub(now)));
            r
        })
    }

    fn status(&self) -> Response {
        let ring = self.ring.clone();
        let counts = ring.as_ref().map(|r| r.owned_counts()).unwrap_or_default();
        let members: Vec<serde_json::Value> = self
            .members
            .iter()
            .filter(|m| m.state != MemberState::Left)
            .map(|m| {
                let state = if m.state == MemberState::Up && self.unreachable.contains(&m.id) { "down" } else { m.state.as_str() };
                json!({"id": m.id, "addr": m.addr, "state": state, "partitions": counts.get(&m.id).copied().unwrap_or(0),
                       "zone": m.zone, "weight": m.weight})
            })
            .collect();
        let head = json!({"node": self.me, "ring_epoch": self.epoch, "members": members});
        let storage = self.stages.storage.clone();
        let transfers = self.transfers;
        Box::pin(async move {
            let hints = match storage.send(Query::HintCounts).await {
                Ok(Ok(Answer::HintCounts(c))) => c.values().sum::<u64>(),
                _ => 0,
            };
            let mut doc = head;
            doc["pending"] = json!({"hints": hints, "transfers": transfers});
            document(doc)
        })
    }

    fn ring_doc(&self) -> ClientResponse {
        let Some(ring) = &self.ring else {
            return error(ErrorKind::Unavailable, "this node has not joined a cluster yet");
        };
        let parts: Vec<serde_json::Value> = (0..ring.partitions())
            .map(|p| json!({"partition": p, "preference_list": ring.preference_list(p, self.n()).primaries}))
            .collect();
        document(json!({"epoch": self.epoch, "partitions": parts}))
    }

    fn partitions(&self) -> Response {
        let Some(ring) = &self.ring else {
            return ready(error(ErrorKind::Unavailable, "this node has not joined a cluster yet"));
        };
        let mine = ring.replicated_by(&self.me, self.n());
        let storage = self.stages.storage.clone();
        let me = self.me.clone();
        Box::pin(async move {
            match storage.send(Query::Partitions(mine)).await {
                Ok(Ok(Answer::Partitions(ps))) => {
                    let list: Vec<serde_json::Value> = ps
                        .into_iter()
                        .map(|(p, keys, root)| json!({"partition": p, "keys": keys, "merkle_root": root}))
                        .collect();
                    document(json!({"node": me, "partitions": list}))
                }
                other => error(ErrorKind::Internal, format!("storage: {other:?}")),
            }
        })
    }

    fn hints(&self) -> Response {
        let storage = self.stages.storage.clone();
        let me = self.me.clone();
        Box::pin(async move {
            match storage.send(Query::HintCounts).await {
                Ok(Ok(Answer::HintCounts(c))) => {
                    let list: Vec<serde_json::Value> =
                        c.into_iter().map(|(n, count)| json!({"for": n, "count": count})).collect();
                    document(json!({"node": me, "hints": list}))
                }
                other => error(ErrorKind::Internal, format!("storage: {other:?}")),
            }
        })
    }
}

impl Actor for ClientApi {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(64 * 1024);
    }
}

/// A client's request.
#[derive(Message)]
#[rtype(result = "ClientResponse")]
pub struct ClientCall(pub ClientRequest);

impl Handler<ClientCall> for ClientApi {
    type Result = Response;

    fn handle(&mut self, ClientCall(req): ClientCall, _: &mut Context<Self>) -> Response {
        match req {
            ClientRequest::Get { key, r } => match self.limits().get(&key, r) {
                Ok(op) => self.coordinate(key.into_vec(), op),
                Err(e) => ready(error(ErrorKind::BadRequest, e)),
            },
            ClientRequest::Put { key, context, value, w } => {
                match self.limits().put(&key, context.as_deref(), value.map(Bytes::into_vec), w, wall_ms()) {
                    Ok(op) => self.coordinate(key.into_vec(), op),
                    Err(e) => ready(error(ErrorKind::BadRequest, e)),
                }
            }
            ClientRequest::Status => self.status(),
            ClientRequest::Ring => ready(self.ring_doc()),
            ClientRequest::Partitions => self.partitions(),
            ClientRequest::Hints => self.hints(),
            ClientRequest::Limits => {
                let a = self.admission.clone();
                Box::pin(async move {
                    match a.send(GetLimits).await {
                        Ok(l) => document(json!(l)),
                        Err(e) => error(ErrorKind::Internal, e.to_string()),
                    }
                })
            }
            ClientRequest::SetLimits { pairs } => {
                let a = self.admission.clone();
                Box::pin(async move {
                    match a.send(SetLimits(pairs)).await {
                        Ok(Ok(l)) => document(json!(l)),
                        Ok(Err(e)) => error(ErrorKind::BadRequest, e),
                        Err(e) => error(ErrorKind::Internal, e.to_string()),
                    }
                })
            }
            ClientRequest::Leave { node } => {
                let Some(g) = self.gossiper.clone() else { return ready(error(ErrorKind::Internal, "no gossiper")) };
                Box::pin(async move {
                    match g.send(Leave(node.clone())).await {
                        Ok(Ok(())) => document(json!({"leaving": node})),
                        Ok(Err(e)) => error(ErrorKind::BadRequest, e.to_string()),
                        Err(e) => error(ErrorKind::Internal, e.to_string()),
                    }
                })
            }
            ClientRequest::FaultBlock { .. } | ClientRequest::FaultUnblock if !self.config.testing.fault_injection => {
                ready(error(
                    ErrorKind::Refused,
                    "fault injection is off on this node (testing.fault_injection = false)",
                ))
            }
            ClientRequest::FaultBlock { peers } => {
                self.stages.transport.do_send(Block(Some(peers.clone())));
                ready(document(json!({"node": self.me, "blocked": peers})))
            }
            ClientRequest::FaultUnblock => {
                self.stages.transport.do_send(Block(None));
                ready(document(json!({"node": self.me, "blocked": []})))
            }
        }
    }
}

/// A put another node forwarded here to coordinate.
#[derive(Message)]
#[rtype(result = "ClientResponse")]
pub struct Forwarded {
    pub key: Vec<u8>,
    pub context: VersionVector,
    pub value: Option<Vec<u8>>,
    pub w: u8,
}

impl Handler<Forwarded> for ClientApi {
    type Result = Response;
    fn handle(&mut self, f: Forwarded, _: &mut Context<Self>) -> Response {
        let w = (f.w as usize).clamp(1, self.n());
        self.coordinate(f.key, Operation::Put { w, context: f.context, value: f.value, forwarded: true })
    }
}

impl Handler<View> for ClientApi {
    type Result = ();
    fn handle(&mut self, v: View, _: &mut Context<Self>) {
        self.members = v.members;
        self.ring = v.ring;
        self.epoch = v.epoch;
    }
}

impl Handler<Unreachable> for ClientApi {
    type Result = ();
    fn handle(&mut self, m: Unreachable, _: &mut Context<Self>) {
        self.unreachable = m.0;
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct SetGossiper(pub Addr<Gossiper>);

impl Handler<SetGossiper> for ClientApi {
    type Result = ();
    fn handle(&mut self, m: SetGossiper, _: &mut Context<Self>) {
        self.gossiper = Some(m.0);
    }
}

impl Handler<PendingTransfers> for ClientApi {
    type Result = ();
    fn handle(&mut self, m: PendingTransfers, _: &mut Context<Self>) {
        self.transfers = m.0;
    }
}
