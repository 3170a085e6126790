//! The AntiEntropy stage: drives the core's `AntiEntropy` scheduler. Every tick it asks
//! Admission for the anti-entropy budget, lists (partition, peer replica) pairs from the ring
//! and the failure detector's view, and carries out the machine's actions: read trees and
//! leaves from storage, exchange with peers through Transport, merge what comes back.

use std::collections::BTreeSet;
use std::time::Duration;

use actix::prelude::*;
use ringkv::admission::Work;
use ringkv::anti_entropy::{AeAction, AntiEntropy};
use ringkv::replica::{ReplicaOp, ReplicaOutcome};
use ringkv::ring::NodeId;
use ringkv::wire::Message;

use crate::admission::{AdmissionActor, Budget};
use crate::clock::mono_ms;
use crate::failure_detector::Unreachable;
use crate::gossiper::View;
use crate::storage::{self, Run, Storage};
use crate::transport::{Call, Dest, Transport};

pub struct AntiEntropyActor {
    core: AntiEntropy,
    me: NodeId,
    n: usize,
    /// The partitions this node replicates, with their replicas (derived from the ring).
    replica_sets: Vec<(u32, Vec<NodeId>)>,
    unreachable: BTreeSet<NodeId>,
    storage: Addr<Storage>,
    transport: Addr<Transport>,
    admission: Addr<AdmissionActor>,
    call_timeout: Duration,
}

impl AntiEntropyActor {
    pub fn new(
        core: AntiEntropy,
        me: NodeId,
        n: usize,
        storage: Addr<Storage>,
        transport: Addr<Transport>,
        admission: Addr<AdmissionActor>,
    ) -> Self {
        AntiEntropyActor {
            core,
            me,
            n,
            replica_sets: Vec::new(),
            unreachable: BTreeSet::new(),
            storage,
            transport,
            admission,
            call_timeout: Duration::from_secs(10),
        }
    }

    fn drain(&mut self, ctx: &mut Context<Self>) {
        while let Some(action) = self.core.poll_action() {
            match action {
                AeAction::ReadTree { id, partition } => {
                    storage::run(&self.storage, ReplicaOp::Tree { partition })
                        .into_actor(self)
                        .map(move |out, act, ctx| {
                            match out {
                                Some(ReplicaOutcome::Tree(t)) => act.core.handle_tree(id, t),
                                _ => act.core.handle_failure(id),
                            }
                            act.drain(ctx);
                        })
                        .spawn(ctx);
                }
                AeAction::ReadLeaves { id, partition, leaves } => {
                    storage::run(
                        &self.storage,
                        ReplicaOp::ReadLeaves { partition, leaves: Some(leaves), limit: usize::MAX },
                    )
                    .into_actor(self)
                    .map(move |out, act, ctx| {
                        match out {
                            Some(ReplicaOutcome::Objects(o)) => act.core.handle_leaves(id, o),
                            _ => act.core.handle_failure(id),
                        }
                        act.drain(ctx);
                    })
                    .spawn(ctx);
                }
                AeAction::Send { id, to, msg } => {
                    let call =
                        Call { to: Dest::Node(to), msg: Message::AntiEntropy { id, msg }, timeout: self.call_timeout };
                    self.transport
                        .send(call)
                        .into_actor(self)
                        .map(move |res, act, ctx| {
                            match res {
                                Ok(Ok(Message::AntiEntropy { msg, .. })) => act.core.handle_reply(id, msg),
                                _ => act.core.handle_failure(id),
                            }
                            act.drain(ctx);
                        })
                        .spawn(ctx);
                }
                AeAction::Merge { objects } => {
                    for (key, object) in objects {
                        self.storage.do_send(Run(ReplicaOp::Write { key, object, hint: None }));
                    }
                }
                AeAction::Finished { partition, peer, differing_leaves, .. } => match differing_leaves {
                    Some(0) => tracing::trace!(partition, %peer, "replicas agree"),
                    Some(n) => tracing::info!(partition, %peer, leaves = n, "anti-entropy repaired differing leaves"),
                    None => tracing::debug!(partition, %peer, "anti-entropy exchange failed"),
                },
            }
        }
    }
}

impl Actor for AntiEntropyActor {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(64 * 1024);
        ctx.run_interval(Duration::from_millis(100), |act, ctx| {
            act.admission
                .send(Budget(Work::AntiEntropy))
                .into_actor(act)
                .map(|budget, act, ctx| {
                    let budget = budget.unwrap_or(0);
                    let pairs: Vec<(u32, NodeId)> = act
                        .replica_sets
                        .iter()
                        .flat_map(|(p, replicas)| replicas.iter().map(move |x| (*p, x.clone())))
                        .filter(|(_, x)| *x != act.me && !act.unreachable.contains(x))
                        .collect();
                    act.core.handle_tick(mono_ms(), &pairs, budget);
                    act.drain(ctx);
                })
                .spawn(ctx);
        });
    }
}

impl Handler<View> for AntiEntropyActor {
    type Result = ();
    fn handle(&mut self, v: View, _: &mut Context<Self>) {
        self.replica_sets = v.ring.as_ref().map(|r| r.replica_sets(&self.me, self.n)).unwrap_or_default();
    }
}

impl Handler<Unreachable> for AntiEntropyActor {
    type Result = ();
    fn handle(&mut self, m: Unreachable, _: &mut Context<Self>) {
        self.unreachable = m.0;
    }
}
