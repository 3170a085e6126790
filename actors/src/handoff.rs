//! The Handoff stage: drives the core's `Handoff` machine. Every tick it asks Admission for
//! the handoff budget, lists the partitions this node holds but no longer replicates
//! (transfers pending after a join or leave), and carries out the machine's actions: scan
//! hints or a foreign partition in storage, send batches to their targets, and drop what was
//! delivered once every target acknowledged. A leaving node that has handed everything away
//! records itself as left.

use std::collections::BTreeSet;
use std::time::Duration;

use actix::prelude::*;
use ringkv::admission::Work;
use ringkv::handoff::{Handoff, HandoffAction};
use ringkv::membership::MemberState;
use ringkv::reaper::{ReapAction, Reaper};
use ringkv::replica::{ReplicaOp, ReplicaOutcome};
use ringkv::ring::{NodeId, Ring};
use ringkv::wire::{Bytes, Message};

use crate::admission::{AdmissionActor, Budget};
use crate::clock::{mono_ms, wall_ms};
use crate::failure_detector::Unreachable;
use crate::gossiper::{Gossiper, MarkLeft, View};
use crate::storage::{self, Answer, Query, Run, Storage};
use crate::transport::{Call, Dest, Transport};

/// Partitions waiting to be transferred away, for `ringkv status`.
#[derive(Message, Clone, Copy, Debug)]
#[rtype(result = "()")]
pub struct PendingTransfers(pub u64);

pub struct HandoffActor {
    core: Handoff,
    reaper: Reaper,
    me: NodeId,
    n: usize,
    ring: Option<Ring>,
    /// The partitions this node replicates, with their replicas (derived from the ring).
    replica_sets: Vec<(u32, Vec<NodeId>)>,
    leaving: bool,
    unreachable: BTreeSet<NodeId>,
    storage: Addr<Storage>,
    transport: Addr<Transport>,
    admission: Addr<AdmissionActor>,
    gossiper: Addr<Gossiper>,
    listeners: Vec<Recipient<PendingTransfers>>,
    tick_busy: bool,
    call_timeout: Duration,
}

impl HandoffActor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        core: Handoff,
        reaper: Reaper,
        me: NodeId,
        n: usize,
        storage: Addr<Storage>,
        transport: Addr<Transport>,
        admission: Addr<AdmissionActor>,
        gossiper: Addr<Gossiper>,
        listeners: Vec<Recipient<PendingTransfers>>,
    ) -> Self {
        HandoffActor {
            core,
            reaper,
            me,
            n,
            ring: None,
            replica_sets: Vec::new(),
            leaving: false,
            unreachable: BTreeSet::new(),
            storage,
            transport,
            admission,
            gossiper,
            listeners,
            tick_busy: false,
            call_timeout: Duration::from_secs(10),
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.tick_busy {
            return;
        }
        self.tick_busy = true;
        let storage = self.storage.clone();
        let admission = self.admission.clone();
        async move {
            let budget = admission.send(Budget(Work::Handoff)).await.unwrap_or(0);
            let held = match storage.send(Query::Held).await {
                Ok(Ok(Answer::Held(h))) => h,
                _ => Vec::new(),
            };
            (budget, held)
        }
        .into_actor(self)
        .map(|(budget, held), act, ctx| {
            act.tick_busy = false;
            if act.ring.is_none() {
                return;
            }
            let mine: BTreeSet<u32> = act.replica_sets.iter().map(|(p, _)| *p).collect();
            let foreign: Vec<u32> = held.iter().copied().filter(|p| !mine.contains(p)).collect();
            for l in &act.listeners {
                l.do_send(PendingTransfers(foreign.len() as u64));
            }
            if act.leaving && held.is_empty() && act.core.inflight() == 0 {
                tracing::info!("every partition handed away: leaving the ring");
                act.gossiper.do_send(MarkLeft);
            }
            let unreachable: Vec<NodeId> = act.unreachable.iter().cloned().collect();
            act.core.handle_tick(mono_ms(), &foreign, budget, &unreachable);
            act.drain(ctx);
            // Tombstones, in partitions whose replicas are all reachable.
            let reapable: Vec<(u32, Vec<NodeId>)> = act
                .replica_sets
                .iter()
                .filter(|(_, ps)| ps.iter().all(|n| !act.unreachable.contains(n)))
                .cloned()
                .collect();
            if budget > 0 {
                act.reaper.handle_tick(mono_ms(), wall_ms(), &reapable);
            }
            act.drain_reaper(ctx);
        })
        .spawn(ctx);
    }

    fn drain_reaper(&mut self, ctx: &mut Context<Self>) {
        while let Some(action) = self.reaper.poll_action() {
            match action {
                ReapAction::Scan { partition, before_wall_ms, limit } => {
                    storage::run(&self.storage, ReplicaOp::Tombstones { partition, before_wall_ms, limit })
                        .into_actor(self)
                        .map(|out, act, ctx| {
                            let found = match out {
                                Some(ReplicaOutcome::Tombstones(t)) => t,
                                _ => Vec::new(),
                            };
                            act.reaper.handle_tombstones(mono_ms(), found);
                            act.drain_reaper(ctx);
                        })
                        .spawn(ctx);
                }
                ReapAction::Send { id, to, step } => {
                    let call = Call {
                        to: Dest::Node(to.clone()),
                        msg: Message::Reap { id, step },
                        timeout: self.call_timeout,
                    };
                    self.transport
                        .send(call)
                        .into_actor(self)
                        .map(move |res, act, ctx| {
                            let yes = matches!(res, Ok(Ok(Message::ReapReply { yes: true, .. })));
                            act.reaper.handle_answer(id, &to, yes);
                            if act.reaper.reaped > 0 {
                                tracing::debug!(reaped = act.reaper.reaped, "tombstones reaped");
                            }
                            act.drain_reaper(ctx);
                        })
                        .spawn(ctx);
                }
            }
        }
    }

    fn drain(&mut self, ctx: &mut Context<Self>) {
        while let Some(action) = self.core.poll_action() {
            match action {
                HandoffAction::ScanHints { limit, exclude } => {
                    storage::run(&self.storage, ReplicaOp::ScanHints { limit, exclude })
                        .into_actor(self)
                        .map(|out, act, ctx| {
                            let hints = match out {
                                Some(ReplicaOutcome::Hints(h)) => h,
                                _ => Vec::new(),
                            };
                            let unreachable = act.unreachable.clone();
                            act.core.handle_hints(mono_ms(), hints, |n| !unreachable.contains(n));
                            act.drain(ctx);
                        })
                        .spawn(ctx);
                }
                HandoffAction::ScanPartition { partition, limit } => {
                    storage::run(&self.storage, ReplicaOp::ReadLeaves { partition, leaves: None, limit })
                        .into_actor(self)
                        .map(move |out, act, ctx| {
                            let objects = match out {
                                Some(ReplicaOutcome::Objects(o)) => o,
                                _ => Vec::new(),
                            };
                            let owners = act
                                .ring
                                .as_ref()
                                .map(|r| r.preference_list(partition, act.n).primaries)
                                .unwrap_or_default();
                            let unreachable = act.unreachable.clone();
                            act.core
                                .handle_foreign(mono_ms(), partition, objects, owners, |n| !unreachable.contains(n));
                            act.drain(ctx);
                        })
                        .spawn(ctx);
                }
                HandoffAction::Send { id, to, objects } => {
                    let objects: Vec<(Bytes, ringkv::version::Object)> =
                        objects.into_iter().map(|(k, o)| (Bytes::from(k), o)).collect();
                    for target in to {
                        let msg = Message::Handoff { id, objects: objects.clone() };
                        self.transport
                            .send(Call { to: Dest::Node(target.clone()), msg, timeout: self.call_timeout })
                            .into_actor(self)
                            .map(move |res, act, ctx| {
                                let ok = matches!(res, Ok(Ok(Message::HandoffAck { ok: true, .. })));
                                act.core.handle_ack(id, &target, ok);
                                act.drain(ctx);
                            })
                            .spawn(ctx);
                    }
                }
                HandoffAction::RemoveHints { intended, keys } => {
                    tracing::info!(%intended, keys = keys.len(), "hints delivered");
                    for (key, digest) in keys {
                        self.storage.do_send(Run(ReplicaOp::RemoveHint { intended: intended.clone(), key, digest }));
                    }
                }
                HandoffAction::RemoveObjects { keys } => {
                    tracing::info!(keys = keys.len(), "keys transferred to their new owners");
                    for (key, digest) in keys {
                        self.storage.do_send(Run(ReplicaOp::RemoveObject { key, digest }));
                    }
                }
                HandoffAction::Finished { .. } => {}
            }
        }
    }
}

impl Actor for HandoffActor {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(64 * 1024);
        ctx.run_interval(Duration::from_millis(100), |act, ctx| act.tick(ctx));
    }
}

impl Handler<View> for HandoffActor {
    type Result = ();
    fn handle(&mut self, v: View, _: &mut Context<Self>) {
        self.leaving = v.members.iter().any(|m| m.id == self.me && m.state == MemberState::Leaving);
        self.replica_sets = v.ring.as_ref().map(|r| r.replica_sets(&self.me, self.n)).unwrap_or_default();
        self.ring = v.ring;
    }
}

impl Handler<Unreachable> for HandoffActor {
    type Result = ();
    fn handle(&mut self, m: Unreachable, _: &mut Context<Self>) {
        self.unreachable = m.0;
    }
}
