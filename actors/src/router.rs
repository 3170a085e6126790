//! Hands each incoming message to the stage that owns it and turns the stage's answer into
//! the reply message.

use actix::prelude::*;
use ringkv::coordinator::{ReplicaReply, ReplicaRequest};
use ringkv::ring::NodeId;
use ringkv::wire::{ClientResponse, ErrorKind, Message};

use crate::client_api::{ClientApi, ClientCall, Forwarded};
use crate::failure_detector::{FailureDetectorActor, Report};
use crate::gossiper::{Gossiper, IncomingGossip};
use crate::storage::{Execute, Run, Storage};
use ringkv::anti_entropy::AeMessage;
use ringkv::merkle::respond;
use ringkv::replica::{ReplicaOp, ReplicaOutcome};

#[derive(Clone)]
pub struct Router {
    pub client_api: Addr<ClientApi>,
    pub storage: Addr<Storage>,
    pub gossiper: Addr<Gossiper>,
    pub failure_detector: Addr<FailureDetectorActor>,
}

fn internal(id: u64, e: impl ToString) -> Message {
    Message::Error { id, kind: ErrorKind::Internal, message: e.to_string() }
}

impl Router {
    /// Serve one request from `peer` (None: a client).
    pub async fn dispatch(&self, peer: Option<NodeId>, msg: Message) -> Message {
        if let Some(p) = &peer {
            self.failure_detector.do_send(Report { peer: p.clone(), ok: true });
        }
        match msg {
            Message::Client { id, request } => match self.client_api.send(ClientCall(request)).await {
                Ok(response) => Message::ClientReply { id, response },
                Err(e) => internal(id, e),
            },
            Message::Replica { id, request: ReplicaRequest::Forward { key, context, value, w } } => {
                match self.client_api.send(Forwarded { key, context, value, w }).await {
                    Ok(response) => Message::ReplicaReply { id, reply: ReplicaReply::Forwarded(response) },
                    Err(e) => Message::ReplicaReply {
                        id,
                        reply: ReplicaReply::Forwarded(ClientResponse::Error {
                            kind: ErrorKind::Internal,
                            message: e.to_string(),
                        }),
                    },
                }
            }
            Message::Replica { id, request } => match self.storage.send(Execute(request)).await {
                Ok(Ok(outcome)) => Message::ReplicaReply { id, reply: ReplicaReply::Outcome(outcome) },
                Ok(Err(e)) => internal(id, e),
                Err(e) => internal(id, e),
            },
            Message::Gossip { members } => match self.gossiper.send(IncomingGossip { members }).await {
                Ok(members) => Message::GossipReply { members },
                Err(e) => internal(0, e),
            },
            Message::Ping { id } => Message::Pong { id },
            Message::Handoff { id, objects } => {
                // Merge every object as owned data; acknowledge once all are durable.
                let writes = objects.into_iter().map(|(key, object)| {
                    self.storage.send(Run(ReplicaOp::Write { key: key.into_vec(), object, hint: None }))
                });
                let results = futures::future::join_all(writes).await;
                let ok = results.iter().all(|r| matches!(r, Ok(Ok(ReplicaOutcome::Written { .. }))));
                Message::HandoffAck { id, ok }
            }
            Message::Reap { id, step } => {
                let yes = matches!(
                    self.storage.send(Run(ReplicaOp::Reap(step))).await,
                    Ok(Ok(ReplicaOutcome::Reaped { yes: true, .. }))
                );
                Message::ReapReply { id, yes }
            }
            Message::AntiEntropy { id, msg: AeMessage::Diff { partition, request } } => {
                match self.storage.send(Run(ReplicaOp::Tree { partition })).await {
                    Ok(Ok(ReplicaOutcome::Tree(tree))) => {
                        Message::AntiEntropy { id, msg: AeMessage::DiffReply { reply: respond(&tree, &request) } }
                    }
                    other => internal(id, format!("{other:?}")),
                }
            }
            Message::AntiEntropy { id, msg: AeMessage::Exchange { partition, leaves, objects } } => {
                match self.storage.send(Run(ReplicaOp::Exchange { partition, leaves, objects })).await {
                    Ok(Ok(ReplicaOutcome::Objects(objects))) => {
                        Message::AntiEntropy { id, msg: AeMessage::ExchangeReply { objects } }
                    }
                    other => internal(id, format!("{other:?}")),
                }
            }
            other => Message::Error {
                id: 0,
                kind: ErrorKind::BadRequest,
                message: format!("not a request: {}", format!("{other:?}").chars().take(40).collect::<String>()),
            },
        }
    }
}
