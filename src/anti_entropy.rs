//! Anti-entropy (Dynamo §4.7): replicas of a partition compare Merkle trees and repair the
//! keys on which they differ, in both directions, so a replica that missed writes (or lost
//! its disk) converges without any client reading its keys.
//!
//! [`AntiEntropyStage`] is both sides. As initiator, each round it walks the (partition,
//! peer replica) pairs of the partitions this node replicates, starting exchanges while the
//! admission budget allows. An exchange: read our tree; walk the peer's tree level by level
//! ([`crate::merkle::DiffInitiator`]) to the differing leaves; *push* our objects in those
//! leaves page by page (the peer merges each page); then *pull* the peer's objects in the
//! same leaves page by page and merge them. Pages are bounded in bytes and resume after a
//! key, reads run in read transactions, and merges are bounded batches, so a partition of
//! any size is repaired, and client writes never wait behind a whole partition. Merging
//! uses the version rules, so repair never loses a write. As responder it answers diffs
//! from its tree ([`crate::merkle::respond`]), merges pushed pages and serves pulled ones,
//! for partitions it replicates.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use crate::admission::RateLimiter;
use crate::membership::View;
use crate::merkle::{respond, DiffInitiator, DiffStep, LEAVES};
use crate::ring::NodeId;
use crate::stage::{ConnId, Dest, DownSet, Effect, Ids, Input, Now, Origin, Signal, Stage, StageId};
use crate::store::{ReapedRow, StoreError, StoreOp, StoreOutcome, TreeId};
use crate::version::Object;
use crate::wire::{AeMessage, Bytes, Message};

/// How soon a pass that waits for budget looks again.
const PASS_RETRY_MS: u64 = 100;

/// How the anti-entropy stage is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AntiEntropySettings {
    pub me: NodeId,
    pub replicas: usize,
    pub interval_ms: u64,
    /// How long one step of an exchange may wait for its answer.
    pub step_timeout_ms: u64,
    /// Encoded bytes in one pushed or pulled page.
    pub page_bytes: usize,
}

#[derive(Debug)]
enum Step {
    /// Reading our tree.
    Tree,
    /// Walking the trees.
    Diff(DiffInitiator),
    /// Reading our next page to push.
    Read,
    /// A pushed page is being merged by the peer; `next` is where our pages resume.
    Pushed { next: Option<Vec<u8>> },
    /// Waiting for the peer's page.
    Pull,
    /// Merging the peer's page; `next` is where its pages resume.
    Merging { next: Option<Vec<u8>> },
}

#[derive(Debug)]
struct Exchange {
    tree: TreeId,
    peer: NodeId,
    step: Step,
    leaves: Vec<u32>,
    deadline_ms: u64,
    keys_sent: u64,
    keys_received: u64,
}

/// How an exchange went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AeStats {
    pub completed: u64,
    pub failed: u64,
    /// Exchanges that found differing leaves.
    pub repaired: u64,
    pub keys_sent: u64,
    pub keys_received: u64,
}

/// A responder's storage operation in flight, and what answers it.
#[derive(Debug)]
enum Serving {
    Diff { conn: ConnId, id: u64, request: crate::merkle::DiffRequest },
    Push { conn: ConnId, id: u64 },
    Pull { conn: ConnId, id: u64 },
}

/// The anti-entropy stage.
pub struct AntiEntropyStage {
    settings: AntiEntropySettings,
    view: Option<Arc<View>>,
    down: DownSet,
    budget: u32,
    /// Paces the bytes exchanges move (`anti_entropy.bytes_per_sec`): a new exchange starts
    /// only while the bucket is not in debt.
    rate: RateLimiter,
    next_round_ms: u64,
    cursor: usize,
    /// Pairs this pass has yet to visit.
    pass_left: usize,
    exchanges: BTreeMap<u64, Exchange>,
    /// Namespaces whose keys this node holds (by store-key prefix), as the store last said:
    /// their trees are exchanged even when no definition is known here any more (every
    /// node that knew it lost its disk), so their replicas still converge.
    held_namespaces: BTreeSet<Vec<u8>>,
    /// The store's inventory in flight, asked at the start of each pass.
    inventory: Option<u64>,
    /// Our storage operations: token -> exchange.
    reads: BTreeMap<u64, u64>,
    serving: BTreeMap<u64, Serving>,
    ids: Ids,
    effects: VecDeque<Effect>,
    pub stats: AeStats,
    /// The wall time of the input being handled (an exchange completes at it).
    wall_ms: u64,
}

impl AntiEntropyStage {
    pub fn new(settings: AntiEntropySettings, now_ms: u64) -> Self {
        AntiEntropyStage {
            next_round_ms: now_ms.saturating_add(settings.interval_ms),
            settings,
            view: None,
            down: DownSet::default(),
            budget: 0,
            rate: RateLimiter::default(),
            cursor: 0,
            pass_left: 0,
            exchanges: BTreeMap::new(),
            held_namespaces: BTreeSet::new(),
            inventory: None,
            reads: BTreeMap::new(),
            serving: BTreeMap::new(),
            ids: Ids::default(),
            effects: VecDeque::new(),
            stats: AeStats::default(),
            wall_ms: 0,
        }
    }

    pub fn inflight(&self) -> usize {
        self.exchanges.len()
    }

    /// The trees this node replicates, with their replicas: each partition's tree of the
    /// default namespace among the partition's N, and of every other namespace among the
    /// first N of that namespace.
    fn replica_sets(&self) -> Vec<(TreeId, Vec<NodeId>)> {
        let Some(view) = self.view.as_ref() else { return Vec::new() };
        let Some(ring) = view.ring.clone() else { return Vec::new() };
        let me = &self.settings.me;
        let mut sets: Vec<(TreeId, Vec<NodeId>)> = ring
            .replica_sets(me, self.settings.replicas)
            .into_iter()
            .map(|(p, rs)| (TreeId::default_of(p), rs))
            .collect();
        let defined = view.namespaces.list().into_iter().map(|ns| ns.prefix());
        let prefixes: BTreeSet<Vec<u8>> = defined.chain(self.held_namespaces.iter().cloned()).collect();
        for prefix in prefixes {
            let n = crate::namespace::class_of(&prefix).n_or(self.settings.replicas);
            let mine = ring.replica_sets(me, n).into_iter();
            sets.extend(mine.map(|(partition, rs)| (TreeId { partition, ns: prefix.clone() }, rs)));
        }
        sets
    }

    fn store(&mut self, exchange: u64, op: StoreOp, durable: bool) {
        let token = self.ids.issue();
        self.reads.insert(token, exchange);
        self.effects.push_back(Effect::Store { token, op, durable });
    }

    fn send(&mut self, id: u64, msg: AeMessage) {
        let Some(e) = self.exchanges.get_mut(&id) else { return };
        let to = Dest::Node(e.peer.clone());
        self.effects.push_back(Effect::Send { to, msg: Message::AntiEntropy { id, msg } });
    }

    fn touch(&mut self, id: u64, now_ms: u64, step: Step) {
        let timeout = self.settings.step_timeout_ms;
        if let Some(e) = self.exchanges.get_mut(&id) {
            e.step = step;
            e.deadline_ms = now_ms.saturating_add(timeout);
        }
    }

    fn finish(&mut self, id: u64, ok: bool) {
        let Some(e) = self.exchanges.remove(&id) else { return };
        if ok {
            self.stats.completed += 1;
            // For `admin partitions` (the replica stage keeps them): when this partition last
            // completed an exchange with this peer, and the keys it repaired.
            self.effects.push_back(Effect::Signal(Signal::Exchanged {
                partition: e.tree.partition,
                peer: e.peer.clone(),
                wall_ms: self.wall_ms,
                keys: e.keys_sent.saturating_add(e.keys_received),
            }));
            if !e.leaves.is_empty() {
                self.stats.repaired += 1;
                tracing::info!(
                    partition = e.tree.partition,
                    namespace = e.tree.namespace_name(),
                    peer = %e.peer,
                    leaves = e.leaves.len(),
                    sent = e.keys_sent,
                    received = e.keys_received,
                    "anti-entropy repaired differing leaves"
                );
            }
        } else {
            self.stats.failed += 1;
            tracing::debug!(partition = e.tree.partition, peer = %e.peer, "anti-entropy exchange failed");
        }
        self.stats.keys_sent += e.keys_sent;
        self.stats.keys_received += e.keys_received;
    }

    fn round(&mut self, now: Now) {
        let expired: Vec<u64> =
            self.exchanges.iter().filter(|(_, e)| now.mono_ms >= e.deadline_ms).map(|(id, _)| *id).collect();
        for id in expired {
            if let Some(e) = self.exchanges.get(&id) {
                let node = e.peer.clone();
                self.effects.push_back(Effect::Signal(Signal::Report { node, ok: false }));
            }
            self.finish(id, false);
        }
        if now.mono_ms < self.next_round_ms {
            return;
        }
        let pairs: Vec<(TreeId, NodeId)> = self
            .replica_sets()
            .into_iter()
            .flat_map(|(t, rs)| rs.into_iter().map(move |r| (t.clone(), r)))
            .filter(|(_, r)| *r != self.settings.me && self.down.is_up(r))
            .collect();
        if pairs.is_empty() {
            self.next_round_ms = now.mono_ms.saturating_add(self.settings.interval_ms);
            return;
        }
        // A pass visits every pair once, starting exchanges as the budget frees up; the next
        // pass starts an interval after this one ended.
        if self.pass_left == 0 {
            self.pass_left = pairs.len();
            if self.inventory.is_none() {
                let token = self.ids.issue();
                self.inventory = Some(token);
                self.effects.push_back(Effect::Store { token, op: StoreOp::Inventory, durable: false });
            }
        }
        while self.exchanges.len() < self.budget as usize && self.pass_left > 0 && self.rate.ready(now.mono_ms) {
            let (tree, peer) = pairs[self.cursor % pairs.len()].clone();
            self.cursor = self.cursor.wrapping_add(1);
            self.pass_left -= 1;
            if self.exchanges.values().any(|e| e.tree == tree && e.peer == peer) {
                continue;
            }
            let id = self.ids.issue();
            let deadline_ms = now.mono_ms.saturating_add(self.settings.step_timeout_ms);
            let e = Exchange {
                tree: tree.clone(),
                peer,
                step: Step::Tree,
                leaves: Vec::new(),
                deadline_ms,
                keys_sent: 0,
                keys_received: 0,
            };
            self.exchanges.insert(id, e);
            self.store(id, StoreOp::Tree { tree }, false);
        }
        let wait = if self.pass_left == 0 { self.settings.interval_ms } else { PASS_RETRY_MS };
        self.next_round_ms = now.mono_ms.saturating_add(wait);
        if self.pass_left > 0 {
            if let Some(at) = self.rate.ready_at(now.mono_ms) {
                self.next_round_ms = self.next_round_ms.max(at);
            }
        }
    }

    fn read_page(&mut self, id: u64, now: Now, after: Option<Vec<u8>>) {
        let Some(e) = self.exchanges.get(&id) else { return };
        let op = StoreOp::Page {
            tree: e.tree.clone(),
            leaves: Some(e.leaves.clone()),
            after,
            bytes_max: self.settings.page_bytes,
        };
        self.touch(id, now.mono_ms, Step::Read);
        self.store(id, op, false);
    }

    fn pull(&mut self, id: u64, now: Now, after: Option<Vec<u8>>) {
        let Some(e) = self.exchanges.get(&id) else { return };
        let msg = AeMessage::Pull {
            partition: e.tree.partition,
            leaves: e.leaves.clone(),
            after: after.map(Bytes::from),
            bytes_max: u32::try_from(self.settings.page_bytes).unwrap_or(u32::MAX),
            ns: e.tree.ns.clone(),
        };
        self.touch(id, now.mono_ms, Step::Pull);
        self.send(id, msg);
    }

    /// Our own storage answered a step of exchange `id`.
    fn handle_read(&mut self, now: Now, id: u64, result: Result<StoreOutcome, StoreError>) {
        let Some(e) = self.exchanges.get_mut(&id) else { return };
        match (&e.step, result) {
            (Step::Tree, Ok(StoreOutcome::Tree(tree))) => {
                let TreeId { partition, ns } = e.tree.clone();
                let mut diff = DiffInitiator::new(tree);
                match diff.start() {
                    DiffStep::Send(request) => {
                        self.touch(id, now.mono_ms, Step::Diff(diff));
                        self.send(id, AeMessage::Diff { partition, request, ns });
                    }
                    DiffStep::Done(_) => self.finish(id, true),
                }
            }
            (Step::Read, Ok(StoreOutcome::Page { objects, next })) => {
                if objects.is_empty() {
                    return self.pull(id, now, None);
                }
                e.keys_sent += objects.len() as u64;
                let TreeId { partition, ns } = e.tree.clone();
                self.rate.spend(now.mono_ms, crate::wire::batch_bytes_bound(&objects));
                let objects = objects.into_iter().map(|(k, o)| (Bytes::from(k), o)).collect();
                self.touch(id, now.mono_ms, Step::Pushed { next });
                self.send(id, AeMessage::Push { partition, objects, ns });
            }
            (Step::Merging { next }, Ok(StoreOutcome::Merged { .. })) => match next.clone() {
                Some(after) => self.pull(id, now, Some(after)),
                None => self.finish(id, true),
            },
            _ => self.finish(id, false),
        }
    }

    /// The peer answered a step of exchange `id`.
    fn handle_reply(&mut self, now: Now, id: u64, msg: AeMessage) {
        let Some(e) = self.exchanges.get_mut(&id) else { return };
        match (&mut e.step, msg) {
            (Step::Diff(diff), AeMessage::DiffReply { reply }) => match diff.handle_reply(&reply) {
                Ok(DiffStep::Send(request)) => {
                    let TreeId { partition, ns } = e.tree.clone();
                    self.touch_keep(id, now.mono_ms);
                    self.send(id, AeMessage::Diff { partition, request, ns });
                }
                Ok(DiffStep::Done(leaves)) if leaves.is_empty() => self.finish(id, true),
                Ok(DiffStep::Done(leaves)) => {
                    e.leaves = leaves;
                    self.read_page(id, now, None);
                }
                Err(_) => self.finish(id, false),
            },
            (Step::Pushed { next }, AeMessage::PushAck { reaped }) => {
                let next = next.clone();
                if !reaped.is_empty() {
                    // The peer reaped keys this node still holds: adopt its records.
                    let entries = reaped
                        .into_iter()
                        .map(|(k, clock, digest)| {
                            (k.into_vec(), ReapedRow { reaped_wall_ms: now.wall_ms, clock, digest })
                        })
                        .collect();
                    let token = self.ids.issue();
                    self.effects.push_back(Effect::Store {
                        token,
                        op: StoreOp::AdoptReaped { entries },
                        durable: false,
                    });
                }
                match next {
                    Some(after) => self.read_page(id, now, Some(after)),
                    None => self.pull(id, now, None),
                }
            }
            (Step::Pull, AeMessage::Page { objects, next }) => {
                let next = next.map(Bytes::into_vec);
                if objects.is_empty() {
                    return match next {
                        Some(after) => self.pull(id, now, Some(after)),
                        None => self.finish(id, true),
                    };
                }
                e.keys_received += objects.len() as u64;
                self.rate.spend(now.mono_ms, crate::wire::batch_bytes_bound(&objects));
                let objects: Vec<(Vec<u8>, Object)> = objects.into_iter().map(|(k, o)| (k.into_vec(), o)).collect();
                self.touch(id, now.mono_ms, Step::Merging { next });
                self.store(id, StoreOp::Merge { objects }, false);
            }
            _ => self.finish(id, false),
        }
    }

    fn touch_keep(&mut self, id: u64, now_ms: u64) {
        let timeout = self.settings.step_timeout_ms;
        if let Some(e) = self.exchanges.get_mut(&id) {
            e.deadline_ms = now_ms.saturating_add(timeout);
        }
    }

    /// Whether this node replicates `tree` (a responder serves only those): it is among
    /// the first N of the partition's preference list, N the tree's namespace's.
    fn replicates(&self, tree: &TreeId) -> bool {
        let n = tree.n_or(self.settings.replicas);
        self.view
            .as_ref()
            .and_then(|v| v.ring.clone())
            .is_some_and(|r| tree.partition < r.partitions() && r.is_replica(tree.partition, n, &self.settings.me))
    }

    fn serve(&mut self, op: StoreOp, durable: bool, serving: Serving) {
        let token = self.ids.issue();
        self.serving.insert(token, serving);
        self.effects.push_back(Effect::Store { token, op, durable });
    }

    fn answer(&mut self, conn: ConnId, id: u64, msg: AeMessage) {
        self.effects.push_back(Effect::Send { to: Dest::Conn(conn), msg: Message::AntiEntropy { id, msg } });
    }

    /// A peer's request, as responder.
    fn handle_request(&mut self, conn: ConnId, id: u64, msg: AeMessage) {
        let tree = match &msg {
            AeMessage::Diff { partition, ns, .. }
            | AeMessage::Push { partition, ns, .. }
            | AeMessage::Pull { partition, ns, .. } => TreeId { partition: *partition, ns: ns.clone() },
            _ => return,
        };
        if !self.replicates(&tree) {
            let message =
                format!("this node does not replicate partition {} of {}", tree.partition, tree.namespace_name());
            return self.answer(conn, id, AeMessage::Failed { message });
        }
        match msg {
            AeMessage::Diff { request, .. } => {
                self.serve(StoreOp::Tree { tree }, false, Serving::Diff { conn, id, request })
            }
            AeMessage::Push { objects, .. } => {
                let q = self.partitions();
                let ok =
                    objects.iter().all(|(k, _)| crate::store::partition_of(k, q) == tree.partition && tree.holds(k));
                if !ok {
                    let message = "pushed keys outside the tree".to_string();
                    return self.answer(conn, id, AeMessage::Failed { message });
                }
                let objects = objects.into_iter().map(|(k, o)| (k.into_vec(), o)).collect();
                self.serve(StoreOp::Merge { objects }, false, Serving::Push { conn, id });
            }
            AeMessage::Pull { leaves, after, bytes_max, .. } => {
                if leaves.iter().any(|l| *l as usize >= LEAVES) || leaves.len() > LEAVES {
                    let message = "no such leaf".to_string();
                    return self.answer(conn, id, AeMessage::Failed { message });
                }
                let bytes_max = (bytes_max as usize).clamp(1, self.settings.page_bytes);
                let op = StoreOp::Page { tree, leaves: Some(leaves), after: after.map(Bytes::into_vec), bytes_max };
                self.serve(op, false, Serving::Pull { conn, id });
            }
            _ => {}
        }
    }

    fn partitions(&self) -> u32 {
        self.view.as_ref().and_then(|v| v.ring.as_ref()).map_or(0, |r| r.partitions())
    }

    fn handle_served(&mut self, serving: Serving, result: Result<StoreOutcome, StoreError>) {
        let failed = |e: String| AeMessage::Failed { message: e };
        match (serving, result) {
            (Serving::Diff { conn, id, request }, Ok(StoreOutcome::Tree(tree))) => {
                self.answer(conn, id, AeMessage::DiffReply { reply: respond(&tree, &request) })
            }
            (Serving::Push { conn, id }, Ok(StoreOutcome::Merged { reaped, .. })) => {
                let reaped = reaped.into_iter().map(|(k, r)| (Bytes::from(k), r.clock, r.digest)).collect();
                self.answer(conn, id, AeMessage::PushAck { reaped })
            }
            (Serving::Pull { conn, id }, Ok(StoreOutcome::Page { objects, next })) => {
                let objects = objects.into_iter().map(|(k, o)| (Bytes::from(k), o)).collect();
                self.answer(conn, id, AeMessage::Page { objects, next: next.map(Bytes::from) })
            }
            (Serving::Diff { conn, id, .. } | Serving::Push { conn, id } | Serving::Pull { conn, id }, other) => {
                self.answer(conn, id, failed(format!("{other:?}")))
            }
        }
    }
}

impl Stage for AntiEntropyStage {
    fn id(&self) -> StageId {
        StageId::AntiEntropy
    }

    fn handle(&mut self, now: Now, input: Input) {
        self.wall_ms = now.wall_ms;
        match input {
            // Only a coordinator replicates ahead of a commit.
            Input::Ahead { .. } => {}
            Input::Message { from: Origin { conn, node: Some(node), .. }, msg: Message::AntiEntropy { id, msg } } => {
                if let Some(e) = self.down.heard(&node) {
                    self.effects.push_back(e);
                }
                match msg {
                    AeMessage::Diff { .. } | AeMessage::Push { .. } | AeMessage::Pull { .. } => {
                        self.handle_request(conn, id, msg)
                    }
                    reply => {
                        if self.exchanges.get(&id).is_some_and(|e| e.peer == node) {
                            self.handle_reply(now, id, reply);
                        }
                    }
                }
            }
            Input::Message { .. } => {}
            Input::Stored { token, result } if self.inventory == Some(token) => {
                self.inventory = None;
                if let Ok(StoreOutcome::Inventory { held, .. }) = result {
                    self.held_namespaces = held.into_iter().filter(|t| !t.ns.is_empty()).map(|t| t.ns).collect();
                }
            }
            Input::Stored { token, result } => {
                if let Some(id) = self.reads.remove(&token) {
                    self.handle_read(now, id, result);
                } else if let Some(serving) = self.serving.remove(&token) {
                    self.handle_served(serving, result);
                }
            }
            Input::Tick { .. } => self.round(now),
            Input::Signal(Signal::View(v)) => self.view = Some(v),
            Input::Signal(Signal::Down(d)) => self.down.set(d),
            Input::Signal(Signal::Budgets { anti_entropy, anti_entropy_bytes_per_sec, .. }) => {
                self.budget = anti_entropy;
                self.rate.set_rate(anti_entropy_bytes_per_sec);
            }
            Input::Signal(Signal::Unreachable { node }) => {
                let failed: Vec<u64> =
                    self.exchanges.iter().filter(|(_, e)| e.peer == node).map(|(id, _)| *id).collect();
                for id in failed {
                    self.finish(id, false);
                }
            }
            Input::Signal(_) => {}
        }
    }

    fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    fn poll_timeout(&self) -> Option<u64> {
        let expiry = self.exchanges.values().map(|e| e.deadline_ms).min();
        Some(expiry.map_or(self.next_round_ms, |x| x.min(self.next_round_ms)))
    }

    fn report(&self, out: &mut crate::metrics::Report) {
        const EXCHANGES: &str = "Merkle exchanges this node started, by outcome (completed, failed)";
        out.counter("ringkv_anti_entropy_exchanges", EXCHANGES, &[("result", "completed")], self.stats.completed);
        out.counter("ringkv_anti_entropy_exchanges", EXCHANGES, &[("result", "failed")], self.stats.failed);
        out.counter(
            "ringkv_anti_entropy_repairs",
            "Merkle exchanges that found differing leaves and repaired them",
            &[],
            self.stats.repaired,
        );
        const KEYS: &str = "Keys anti-entropy moved to repair replicas, by direction (sent, received)";
        out.counter("ringkv_anti_entropy_keys", KEYS, &[("direction", "sent")], self.stats.keys_sent);
        out.counter("ringkv_anti_entropy_keys", KEYS, &[("direction", "received")], self.stats.keys_received);
        out.gauge(
            "ringkv_anti_entropy_exchanges_in_flight",
            "Merkle exchanges this node is running now",
            &[],
            self.exchanges.len() as f64,
        );
    }
}
