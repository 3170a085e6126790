//! The request coordinator (Dynamo §4.5, §4.6, §5): one state machine per client request,
//! on the node that received it, in the style of riak_kv's get/put FSMs, and the stage that
//! hosts them.
//!
//! Targets are the first N *healthy* nodes of the key's preference list (sloppy quorum): an
//! unreachable primary is replaced by the next fallback, and the replica sent there carries
//! a hint naming the primary it stands in for. A replica that fails or times out is replaced
//! the same way. No node ever fills two slots, so W acknowledgements are W distinct copies.
//! A get reads one replica in full (this node when it is one) and the others by digest,
//! as Cassandra's digest reads do: a digest equal to a full answer's counts without its
//! object, and a replica whose digest differs is read in full. Most gets read R replicas
//! (this node first, then in preference order); a share of them
//! (`coordinator.read_repair_percent`) reads all N, as the paper's coordinator does, and a
//! replica that fails or is late is replaced by one not yet read before any fallback. The
//! get replies once R replicas' states are known, with every concurrent value merged, then
//! waits briefly for the other replicas it read and sends the merged state to any that
//! were stale (read repair). Replicas a get did not read are left to the next full read and
//! to anti-entropy.
//! A put is coordinated on a replica: that replica applies the write under a new version
//! (so it must hold the key's state) and the result goes to the other targets; the client
//! hears back after W acknowledgements, the coordinating replica's own included, and that
//! one is always durable ([`durable_writer`]: with buffered storage the others may still
//! be in memory). A node outside the targets forwards the put to one inside. A replica
//! slower than the replica timeout is late: a spare takes over its work, but its answer
//! still counts until the request's deadline.
//!
//! [`Coordinator`] is one request: inputs [`Coordinator::handle_reply`],
//! [`Coordinator::handle_failure`], [`Coordinator::handle_timeout`], each with the current
//! time; outputs [`Coordinator::poll_action`] and [`Coordinator::poll_timeout`].
//! [`CoordinatorStage`] admits client and forwarded requests (checked by [`RequestLimits`]),
//! holds every live request in a table keyed by request id with one timer index, runs the
//! requests' replica operations for this node on local storage, and sends the others.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use crate::admission::WaitSamples;
use crate::metrics::{Histogram, Kind, Report, LATENCY_BUCKETS_S};
use crate::namespace::{check_default_key, class_of, newest, Namespace, Namespaces, Resolution, DEFAULT_NAME};
use crate::ring::{NodeId, PreferenceList, Ring};
use crate::stage::{Dest, DownSet, Effect, Ids, Input, Now, Origin, Signal, Stage, StageId};
use crate::store::{StoreError, StoreOp, StoreOutcome};
use crate::version::{split_context, Object, VersionVector};
use crate::wire::{Bytes, ClientRequest, ClientResponse, ErrorKind, Message, ReplicaReply, ReplicaRequest};

/// Whether a replica operation commits durably whatever the node's durability mode: a
/// put's coordinating replica is its one durable writer (the paper's §6.1). With
/// `storage.durability = "buffered"` the other replicas buffer, but no put is acknowledged
/// before its coordinating replica (always among the W) has it on disk, so a cluster that
/// loses every node at once still has every acknowledged write on one disk.
pub fn durable_writer(op: &StoreOp) -> bool {
    matches!(op, StoreOp::Coordinate { .. })
}

/// Something a request wants done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send a request to a replica (possibly this node itself); its answer comes back through
    /// `handle_reply`, a failure through `handle_failure`.
    Send { to: NodeId, request: ReplicaRequest },
    /// Answer the client. Happens exactly once.
    Reply(ClientResponse),
    /// A replica did not answer in time: the failure detector should hear of it.
    Suspect(NodeId),
}

/// What the client asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operation {
    Get {
        r: usize,
    },
    /// A put or (value None) a delete. `forwarded` puts are coordinated here whatever the
    /// local view of the targets, so that two nodes with different views cannot bounce a put.
    Put {
        w: usize,
        context: VersionVector,
        value: Option<Vec<u8>>,
        forwarded: bool,
    },
}

/// What a node accepts in a request (from its config). Client requests, puts forwarded by
/// other nodes and replica requests all pass the same checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// N: quorum overrides must be in 1..=N.
    pub replicas: usize,
    pub read_quorum: usize,
    pub write_quorum: usize,
    pub key_bytes_max: usize,
    pub value_bytes_max: usize,
}

impl RequestLimits {
    /// A key as stored: its namespace prefix does not count against the limit.
    fn key(&self, key: &[u8]) -> Result<(), String> {
        let key = &key[class_of(key).prefix.len()..];
        if key.is_empty() {
            return Err("the key is empty".into());
        }
        if key.len() > self.key_bytes_max {
            return Err(format!("the key is over limits.max_key_bytes ({})", self.key_bytes_max));
        }
        Ok(())
    }

    fn value(&self, value: Option<&[u8]>) -> Result<(), String> {
        match value {
            Some(v) if v.len() > self.value_bytes_max => Err(format!(
                "the value is {} bytes, over limits.max_value_bytes ({}); nothing was stored",
                v.len(),
                self.value_bytes_max
            )),
            _ => Ok(()),
        }
    }

    fn quorum(&self, given: Option<u8>, default: usize, what: &str) -> Result<usize, String> {
        match given {
            None => Ok(default),
            Some(q) if q >= 1 && (q as usize) <= self.replicas => Ok(q as usize),
            Some(q) => Err(format!("--{what} {q} is not in 1..={}", self.replicas)),
        }
    }

    /// Check a client's get; the operation to coordinate, or why it is a bad request.
    pub fn get(&self, key: &[u8], r: Option<u8>) -> Result<Operation, String> {
        self.key(key)?;
        Ok(Operation::Get { r: self.quorum(r, self.read_quorum, "r")? })
    }

    /// Check a client's put (a delete when `value` is None), decoding its context;
    /// the operation to coordinate, or why it is a bad request. Nothing is stored on error.
    pub fn put(
        &self,
        key: &[u8],
        context: Option<&str>,
        value: Option<Vec<u8>>,
        w: Option<u8>,
        now_ms: u64,
    ) -> Result<Operation, String> {
        self.key(key)?;
        self.value(value.as_deref())?;
        let w = self.quorum(w, self.write_quorum, "w")?;
        let context = match context {
            None => VersionVector::new(),
            Some(text) => VersionVector::decode_context(text, now_ms).map_err(|e| e.to_string())?,
        };
        Ok(Operation::Put { w, context, value, forwarded: false })
    }

    /// The limits of a namespace's requests: its N, R and W.
    pub fn of_namespace(&self, ns: &Namespace) -> RequestLimits {
        let (replicas, read_quorum, write_quorum) = (ns.n as usize, ns.r as usize, ns.w as usize);
        RequestLimits { replicas, read_quorum, write_quorum, ..*self }
    }

    /// The limits of requests for a stored key: N of its namespace (R and W are given).
    pub fn of_key(&self, key: &[u8]) -> RequestLimits {
        RequestLimits { replicas: class_of(key).n_or(self.replicas), ..*self }
    }

    /// Check a put another node forwarded: the same bounds as a client's.
    pub fn forwarded(
        &self,
        key: &[u8],
        context: VersionVector,
        value: Option<Vec<u8>>,
        w: u8,
    ) -> Result<Operation, String> {
        self.key(key)?;
        self.value(value.as_deref())?;
        context.validate().map_err(|e| e.to_string())?;
        let w = self.quorum(Some(w), self.write_quorum, "w")?;
        Ok(Operation::Put { w, context, value, forwarded: true })
    }

    /// Check a coordinator's request to this replica.
    pub fn replica(&self, request: &ReplicaRequest) -> Result<(), String> {
        self.key(request.key())?;
        match request {
            ReplicaRequest::Read { .. } | ReplicaRequest::ReadDigest { .. } => Ok(()),
            ReplicaRequest::Write { object, hint, .. } => {
                object.validate().map_err(|e| e.to_string())?;
                hint_ok(hint.as_deref())
            }
            ReplicaRequest::Coordinate { context, value, hint, .. } => {
                self.value(value.as_deref())?;
                context.validate().map_err(|e| e.to_string())?;
                hint_ok(hint.as_deref())
            }
            ReplicaRequest::Forward { .. } => Err("a forwarded put is not a replica operation".into()),
        }
    }
}

fn hint_ok(hint: Option<&str>) -> Result<(), String> {
    match hint {
        Some(h) if !crate::membership::valid_node_id(h) => Err(format!("hint names {h:?}, not a node id")),
        _ => Ok(()),
    }
}

/// One client request: the key, what to do, and its timing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub key: Vec<u8>,
    pub op: Operation,
    pub timeouts: Timeouts,
    /// For a get: read every target (and repair any stale one), not only R of them.
    pub read_all: bool,
}

/// Timing of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Absolute time by which the client must have an answer.
    pub deadline_ms: u64,
    /// How long one replica may take before the next fallback is tried.
    pub replica_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum SlotState {
    /// Chosen, nothing sent yet.
    Idle,
    Waiting {
        since_ms: u64,
    },
    /// Took longer than the replica timeout: a spare (when one was free) took over its work,
    /// but its answer still counts until the request's deadline. A replica that is merely
    /// slow is not a failed one.
    Late,
    Answered,
    Failed,
}

#[derive(Clone, Debug)]
struct Slot {
    node: NodeId,
    /// The primary this node stands in for, when it is a fallback.
    hint: Option<NodeId>,
    state: SlotState,
    /// For gets: whether the replica was asked for its whole state, else for its digest.
    full: bool,
    /// For gets: what the replica returned in full.
    object: Option<Object>,
    /// For gets: the digest of the replica's state (inner None: it holds nothing), from its
    /// digest answer or computed from its full one.
    digest: Option<Option<[u8; 16]>>,
}

impl Slot {
    fn new(node: NodeId, hint: Option<NodeId>) -> Slot {
        Slot { node, hint, state: SlotState::Idle, full: false, object: None, digest: None }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// Get: reading; put: the coordinating replica is applying the write.
    Started,
    /// Put: waiting for the forwarded coordinator's answer.
    Forwarding,
    /// Put: the write is applied locally; replicating.
    Replicating,
    /// The client has its answer; a get still collects replies for read repair.
    Replied,
    Finished,
}

/// Why a slot is given up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cause {
    /// The replica answered that it failed: nothing was stored there.
    Failed,
    /// No answer in time: the replica may or may not have applied the request.
    Timeout,
}

/// One request's state machine.
#[derive(Debug)]
pub struct Coordinator {
    me: NodeId,
    key: Vec<u8>,
    op: Operation,
    timeouts: Timeouts,
    slots: Vec<Slot>,
    /// Fallbacks not yet used, in preference order; never a node that holds a slot.
    spare: VecDeque<NodeId>,
    /// Put: the object the coordinating replica produced.
    object: Option<Object>,
    phase: Phase,
    outbox: VecDeque<Action>,
    /// The node that answered a get first (§6.4: a later put may prefer it).
    pub fastest: Option<NodeId>,
    /// Read repairs sent: replicas that answered a get with an older state.
    pub repairs: u64,
    /// A get reads every target, not only R of them.
    read_all: bool,
}

impl Coordinator {
    /// Start a request on node `me`. `plan` is the key's preference list (N primaries, then
    /// fallbacks); `reachable` is this node's current view of which nodes answer.
    pub fn new(
        now_ms: u64,
        me: NodeId,
        request: Request,
        plan: &PreferenceList,
        reachable: impl Fn(&str) -> bool,
    ) -> Coordinator {
        let Request { key, op, timeouts, read_all } = request;
        let mut spare: VecDeque<NodeId> = plan.fallbacks.iter().filter(|f| reachable(f)).cloned().collect();
        let mut slots = Vec::with_capacity(plan.primaries.len());
        let mut missing = Vec::new();
        for p in &plan.primaries {
            if reachable(p) {
                slots.push(Slot::new(p.clone(), None));
            } else {
                missing.push(p.clone());
            }
        }
        for p in missing {
            if let Some(f) = spare.pop_front() {
                slots.push(Slot::new(f, Some(p)));
            }
        }
        let mut c = Coordinator {
            me,
            key,
            op,
            timeouts,
            slots,
            spare,
            object: None,
            phase: Phase::Started,
            outbox: VecDeque::new(),
            fastest: None,
            repairs: 0,
            read_all,
        };
        c.start(now_ms);
        c
    }

    fn quorum(&self) -> usize {
        match &self.op {
            Operation::Get { r } => *r,
            Operation::Put { w, .. } => *w,
        }
    }

    fn start(&mut self, now_ms: u64) {
        if self.slots.len() + self.spare.len() < self.quorum() {
            self.fail(ErrorKind::Unavailable, "not enough reachable replicas for the quorum");
            return;
        }
        let forwarded = match self.op {
            Operation::Get { .. } => None,
            Operation::Put { forwarded, .. } => Some(forwarded),
        };
        match forwarded {
            None => {
                // One replica is read in full, this node when it holds a slot (a local read),
                // the others by digest: R replicas, or every one. The rest stay idle, first
                // in line to stand in for one that fails or is late.
                let first = self.slots.iter().position(|s| s.node == self.me).unwrap_or(0);
                if first < self.slots.len() {
                    self.send_read(first, now_ms);
                }
                let reads = if self.read_all { self.slots.len() } else { self.quorum() };
                for i in (0..self.slots.len()).filter(|&i| i != first).take(reads.saturating_sub(1)) {
                    self.send_read(i, now_ms);
                }
            }
            Some(forwarded) => {
                match self.slots.iter().position(|s| s.node == self.me) {
                    Some(i) => self.send_coordinate(i, now_ms),
                    None if forwarded => {
                        // Coordinate here anyway, standing in as an extra replica; this node
                        // is then no spare for another slot.
                        self.spare.retain(|n| *n != self.me);
                        self.slots.insert(0, Slot::new(self.me.clone(), None));
                        self.send_coordinate(0, now_ms);
                    }
                    None => {
                        self.phase = Phase::Forwarding;
                        // Forward to the first target; on failure, the next.
                        if !self.slots.is_empty() {
                            self.send_forward(0, now_ms);
                        } else {
                            self.fail(ErrorKind::Unavailable, "no reachable replica to coordinate the write");
                        }
                    }
                }
            }
        }
    }

    /// Read replica `i`: in full when no full answer is in hand or expected in time, else
    /// by digest. A replica that already answered by digest is read in full first, rather
    /// than a stand-in that may hold nothing of the key.
    fn send_read(&mut self, i: usize, now_ms: u64) {
        self.cover_full_read(now_ms);
        let full = !self.full_read_covered();
        self.send_read_as(i, now_ms, full);
    }

    /// When no full answer is in hand or expected in time, read in full a replica that
    /// already answered by digest (if one has).
    fn cover_full_read(&mut self, now_ms: u64) {
        if self.full_read_covered() {
            return;
        }
        if let Some(j) = self.slots.iter().position(|s| !s.full && s.state == SlotState::Answered) {
            self.send_read_as(j, now_ms, true);
        }
    }

    fn send_read_as(&mut self, i: usize, now_ms: u64, full: bool) {
        let slot = &mut self.slots[i];
        slot.state = SlotState::Waiting { since_ms: now_ms };
        (slot.full, slot.object, slot.digest) = (full, None, None);
        let key = self.key.clone();
        let request = if full { ReplicaRequest::Read { key } } else { ReplicaRequest::ReadDigest { key } };
        self.outbox.push_back(Action::Send { to: slot.node.clone(), request });
    }

    /// Whether a replica's whole state is in hand or asked for and not yet late.
    fn full_read_covered(&self) -> bool {
        self.slots.iter().any(|s| s.full && matches!(s.state, SlotState::Waiting { .. } | SlotState::Answered))
    }

    /// The state of an answered slot: its own full answer, or the full answer its digest
    /// matches (None when it holds nothing, or when no full answer matches).
    fn state_of<'a>(&'a self, slot: &'a Slot) -> Option<&'a Object> {
        if slot.full {
            return slot.object.as_ref();
        }
        self.slots
            .iter()
            .find(|t| t.full && t.state == SlotState::Answered && t.digest == slot.digest)
            .and_then(|t| t.object.as_ref())
    }

    fn send_coordinate(&mut self, i: usize, now_ms: u64) {
        let Operation::Put { context, value, .. } = &self.op else { return };
        let request = ReplicaRequest::Coordinate {
            key: self.key.clone(),
            context: context.clone(),
            value: value.clone(),
            hint: self.slots[i].hint.clone(),
        };
        self.slots[i].state = SlotState::Waiting { since_ms: now_ms };
        self.outbox.push_back(Action::Send { to: self.slots[i].node.clone(), request });
    }

    fn send_forward(&mut self, i: usize, now_ms: u64) {
        let Operation::Put { context, value, w, .. } = &self.op else { return };
        let request = ReplicaRequest::Forward {
            key: self.key.clone(),
            context: context.clone(),
            value: value.clone(),
            w: u8::try_from(*w).unwrap_or(u8::MAX),
        };
        self.slots[i].state = SlotState::Waiting { since_ms: now_ms };
        self.outbox.push_back(Action::Send { to: self.slots[i].node.clone(), request });
    }

    fn send_write(&mut self, i: usize, now_ms: u64) {
        let Some(object) = self.object.clone() else { return };
        self.slots[i].state = SlotState::Waiting { since_ms: now_ms };
        let request = ReplicaRequest::Write { key: self.key.clone(), object, hint: self.slots[i].hint.clone() };
        self.outbox.push_back(Action::Send { to: self.slots[i].node.clone(), request });
    }

    fn reply(&mut self, response: ClientResponse) {
        if matches!(self.phase, Phase::Replied | Phase::Finished) {
            return;
        }
        self.outbox.push_back(Action::Reply(response));
        self.phase = Phase::Replied;
    }

    fn fail(&mut self, kind: ErrorKind, message: &str) {
        self.reply(ClientResponse::Error { kind, message: message.to_string() });
        self.phase = Phase::Finished;
    }

    fn answered(&self) -> usize {
        self.slots.iter().filter(|s| s.state == SlotState::Answered).count()
    }

    fn waiting(&self) -> usize {
        self.slots.iter().filter(|s| matches!(s.state, SlotState::Waiting { .. })).count()
    }

    /// Slots that may still answer: waiting, or late.
    fn pending(&self) -> usize {
        self.slots.iter().filter(|s| matches!(s.state, SlotState::Waiting { .. } | SlotState::Late)).count()
    }

    fn slot_of(&self, from: &str) -> Option<usize> {
        self.slots.iter().position(|s| s.node == from && matches!(s.state, SlotState::Waiting { .. } | SlotState::Late))
    }

    /// A replica answered.
    pub fn handle_reply(&mut self, now_ms: u64, from: &str, reply: ReplicaReply) {
        let Some(i) = self.slot_of(from) else { return };
        match (reply, self.phase.clone()) {
            (ReplicaReply::Forwarded(response), Phase::Forwarding) => match &response {
                ClientResponse::Error { kind: ErrorKind::Internal, .. } => self.give_up(i, now_ms, Cause::Failed),
                _ => {
                    self.slots[i].state = SlotState::Answered;
                    self.reply(response);
                    self.phase = Phase::Finished;
                }
            },
            (ReplicaReply::State(state), Phase::Started | Phase::Replied) => {
                let (object, digest) = state.map_or((None, None), |(o, d)| (Some(o), Some(d)));
                let slot = &mut self.slots[i];
                slot.state = SlotState::Answered;
                slot.full = true;
                slot.digest = Some(digest);
                slot.object = object;
                self.fastest.get_or_insert_with(|| from.to_string());
                self.after_read(now_ms);
            }
            (ReplicaReply::Digest(digest), Phase::Started | Phase::Replied) if !self.slots[i].full => {
                self.slots[i].state = SlotState::Answered;
                self.slots[i].digest = Some(digest);
                self.fastest.get_or_insert_with(|| from.to_string());
                self.after_read(now_ms);
            }
            (ReplicaReply::Coordinated(object), Phase::Started) => {
                self.slots[i].state = SlotState::Answered;
                self.object = Some(object);
                self.phase = Phase::Replicating;
                for j in 0..self.slots.len() {
                    if j != i {
                        self.send_write(j, now_ms);
                    }
                }
                self.after_write();
            }
            (ReplicaReply::Failed { kind: ErrorKind::BadRequest, message }, Phase::Started)
                if matches!(self.op, Operation::Put { .. }) =>
            {
                // The coordinating replica refused the write itself (sibling or size limits).
                self.fail(ErrorKind::BadRequest, &message);
            }
            (ReplicaReply::Failed { .. }, _) => self.give_up(i, now_ms, Cause::Failed),
            // This node's write, replicated ahead of its commit, is now durable here too.
            (ReplicaReply::Coordinated(_), Phase::Replicating | Phase::Replied) if self.object.is_some() => {
                self.slots[i].state = SlotState::Answered;
                self.after_write();
            }
            (ReplicaReply::Written, Phase::Replicating | Phase::Replied) => {
                self.slots[i].state = SlotState::Answered;
                self.after_write();
            }
            _ => {}
        }
    }

    /// This node's write is computed (not yet durable): send it to the other replicas now;
    /// this node's own acknowledgement still waits for its commit (`handle_reply`).
    pub fn handle_ahead(&mut self, now_ms: u64, object: Object) {
        if self.phase != Phase::Started || !matches!(self.op, Operation::Put { .. }) {
            return;
        }
        let Some(i) = self.slot_of(&self.me) else { return };
        self.object = Some(object);
        self.phase = Phase::Replicating;
        for j in 0..self.slots.len() {
            if j != i {
                self.send_write(j, now_ms);
            }
        }
    }

    /// A replica could not be reached: try the next fallback in its place (a late one was
    /// already replaced).
    pub fn handle_failure(&mut self, now_ms: u64, from: &str) {
        let Some(i) = self.slot_of(from) else { return };
        self.give_up(i, now_ms, Cause::Timeout);
    }

    /// Slot `i` will not answer: a late one already has its stand-in, any other is replaced.
    fn give_up(&mut self, i: usize, now_ms: u64, cause: Cause) {
        if self.slots[i].state == SlotState::Late {
            self.slots[i].state = SlotState::Failed;
            self.check_hopeless();
            self.after_read(now_ms);
        } else {
            self.replace(i, now_ms, cause);
        }
    }

    /// Time passed: replicas that took too long are replaced; past the deadline the request
    /// fails (or, after replying, ends).
    pub fn handle_timeout(&mut self, now_ms: u64) {
        if self.phase == Phase::Finished {
            return;
        }
        if now_ms >= self.timeouts.deadline_ms {
            match self.phase {
                Phase::Replied => self.finish_get(),
                Phase::Started if self.local_write_pending() => self.fail(
                    ErrorKind::Unavailable,
                    "this node's replica did not answer in time; the write may still have been applied",
                ),
                Phase::Replicating => self.fail(
                    ErrorKind::Unavailable,
                    "fewer than W replicas acknowledged in time; the write is stored on some and may still reach the others",
                ),
                _ => self.fail(ErrorKind::Unavailable, "the quorum did not answer in time"),
            }
            self.phase = Phase::Finished;
            return;
        }
        // The coordinating replica's own write is never replaced: it may still commit, and
        // only the deadline decides the request.
        let local_put = self.phase == Phase::Started && matches!(self.op, Operation::Put { .. });
        let late: Vec<usize> = (0..self.slots.len())
            .filter(|&i| !(local_put && self.slots[i].node == self.me))
            .filter(|&i| matches!(self.slots[i].state, SlotState::Waiting { since_ms } if now_ms >= self.slot_deadline(since_ms)))
            .collect();
        for i in late {
            if self.slots[i].node != self.me {
                self.outbox.push_back(Action::Suspect(self.slots[i].node.clone()));
            }
            // Still in the running: its answer counts if it comes before the deadline.
            self.slots[i].state = SlotState::Late;
            self.stand_in(i, now_ms);
            self.after_read(now_ms);
        }
    }

    fn local_write_pending(&self) -> bool {
        matches!(self.op, Operation::Put { .. })
            && self.slots.iter().any(|s| s.node == self.me && matches!(s.state, SlotState::Waiting { .. }))
    }

    /// When a slot that has waited since `since_ms` counts as failed. A forwarded put runs a
    /// whole put remotely (which may itself wait out a replica), so it gets half of what is
    /// left of the request's time, leaving the other half for one retry elsewhere.
    fn slot_deadline(&self, since_ms: u64) -> u64 {
        let wait = match self.phase {
            Phase::Forwarding => self.timeouts.replica_ms.max(self.timeouts.deadline_ms.saturating_sub(since_ms) / 2),
            _ => self.timeouts.replica_ms,
        };
        since_ms.saturating_add(wait)
    }

    /// Slot `i` failed: mark it and send its work to the next spare node.
    fn replace(&mut self, i: usize, now_ms: u64, cause: Cause) {
        self.slots[i].state = SlotState::Failed;
        if self.slots[i].node == self.me && self.phase == Phase::Started && matches!(self.op, Operation::Put { .. }) {
            match cause {
                Cause::Failed => {
                    self.fail(ErrorKind::Internal, "this node's replica could not apply the write; nothing was stored")
                }
                // The local write may still commit: only the deadline may say the request failed.
                Cause::Timeout => {}
            }
            return;
        }
        self.stand_in(i, now_ms);
        // A get may now have to read another replica in full.
        self.after_read(now_ms);
    }

    /// Slot `i` failed or is late: send its work to the next chosen target or spare node.
    fn stand_in(&mut self, i: usize, now_ms: u64) {
        let get = matches!(self.op, Operation::Get { .. });
        if self.phase == Phase::Forwarding || (get && matches!(self.phase, Phase::Started | Phase::Replied)) {
            // Forward to, or read, the next chosen target before any fallback.
            if let Some(j) = self.slots.iter().position(|s| s.state == SlotState::Idle) {
                if get {
                    self.send_read(j, now_ms);
                } else {
                    self.send_forward(j, now_ms);
                }
                return;
            }
        }
        // The next spare that holds no slot yet: one node, one copy, one acknowledgement.
        let next = loop {
            match self.spare.pop_front() {
                Some(n) if self.slots.iter().any(|s| s.node == n) => continue,
                other => break other,
            }
        };
        let Some(next) = next else {
            self.check_hopeless();
            return;
        };
        let hint = self.slots[i].hint.clone().or_else(|| Some(self.slots[i].node.clone()));
        self.slots.push(Slot::new(next, hint));
        let j = self.slots.len() - 1;
        match self.phase {
            Phase::Started | Phase::Replied if matches!(self.op, Operation::Get { .. }) => self.send_read(j, now_ms),
            Phase::Replicating | Phase::Replied => self.send_write(j, now_ms),
            Phase::Forwarding => self.send_forward(j, now_ms),
            _ => {}
        }
    }

    /// When even every outstanding reply could not make the quorum, fail now.
    fn check_hopeless(&mut self) {
        if matches!(self.phase, Phase::Replied | Phase::Finished) {
            if self.waiting() == 0 && matches!(self.op, Operation::Get { .. }) {
                self.finish_get();
            }
            if self.waiting() == 0 {
                self.phase = Phase::Finished;
            }
            return;
        }
        if self.answered() + self.pending() < self.quorum() || (self.phase == Phase::Forwarding && self.pending() == 0)
        {
            self.fail(ErrorKind::Unavailable, "too many replicas failed to reach the quorum");
        }
    }

    fn after_write(&mut self) {
        let w = self.quorum();
        if self.phase == Phase::Replicating && self.answered() >= w {
            let context = self.object.as_ref().map(|o| o.context().encode_context()).unwrap_or_default();
            self.reply(ClientResponse::Written { context });
        }
        if self.phase == Phase::Replied && self.waiting() == 0 {
            self.phase = Phase::Finished;
        }
    }

    fn merged(&self) -> Option<Object> {
        self.merged_view().map(Cow::into_owned)
    }

    /// The answered replicas' states merged: the one full answer itself when there is only
    /// one (the usual get: one replica read in full, the others by matching digests).
    fn merged_view(&self) -> Option<Cow<'_, Object>> {
        let mut full = self.slots.iter().filter(|s| s.state == SlotState::Answered).filter_map(|s| s.object.as_ref());
        let first = full.next()?;
        Some(full.fold(Cow::Borrowed(first), |acc, o| Cow::Owned(acc.merge(o))))
    }

    /// A get's answers changed: read in full every replica whose digest no full answer
    /// accounts for (or one, when no full answer is in hand or coming), then reply once R
    /// replicas' states are known, and repair once every replica it read answered.
    fn after_read(&mut self, now_ms: u64) {
        if !matches!(self.op, Operation::Get { .. }) || !matches!(self.phase, Phase::Started | Phase::Replied) {
            return;
        }
        let known: Vec<Option<[u8; 16]>> =
            self.slots.iter().filter(|s| s.full && s.state == SlotState::Answered).filter_map(|s| s.digest).collect();
        let by_digest = |s: &Slot| !s.full && s.state == SlotState::Answered;
        if known.is_empty() {
            self.cover_full_read(now_ms);
        } else {
            let differ: Vec<usize> = (0..self.slots.len())
                .filter(|&i| by_digest(&self.slots[i]) && self.slots[i].digest.is_some_and(|d| !known.contains(&d)))
                .collect();
            for i in differ {
                self.send_read_as(i, now_ms, true);
            }
        }
        // Every answered slot now has a known state (digest answers left match a full one).
        let states_known = if known.is_empty() { 0 } else { self.answered() };
        if self.phase == Phase::Started && states_known >= self.quorum() {
            let lww = class_of(&self.key).resolution == Resolution::Lww;
            let response = match self.merged_view() {
                Some(o) => {
                    let context =
                        (!o.clock().is_empty()).then(|| o.clock().encode_context_from(self.fastest.as_deref()));
                    let values: Vec<Bytes> = match (lww, o) {
                        (true, o) => {
                            newest(o.siblings()).and_then(|s| s.value.clone()).map(Bytes::from).into_iter().collect()
                        }
                        (false, Cow::Borrowed(o)) => o.values().map(|v| Bytes::from(v.to_vec())).collect(),
                        (false, Cow::Owned(o)) => o.into_values().map(Bytes::from).collect(),
                    };
                    ClientResponse::Values { values, context }
                }
                None => ClientResponse::Values { values: Vec::new(), context: None },
            };
            self.reply(response);
        }
        if self.phase == Phase::Replied && self.waiting() == 0 {
            self.finish_get();
        }
    }

    /// Read repair: every replica that answered with a state older than the merged one gets
    /// the merged state (hinted if it is a fallback).
    fn finish_get(&mut self) {
        if self.phase == Phase::Finished {
            return;
        }
        self.phase = Phase::Finished;
        // Every replica that answered holds the same state: nobody is stale.
        let mut answered = self.slots.iter().filter(|s| s.state == SlotState::Answered).map(|s| s.digest);
        if let Some(first) = answered.next() {
            if first.is_some() && answered.all(|d| d == first) {
                return;
            }
        }
        let Some(merged) = self.merged() else { return };
        let stale: Vec<(NodeId, Option<NodeId>)> = self
            .slots
            .iter()
            .filter(|s| s.state == SlotState::Answered)
            .filter(|s| self.state_of(s).is_none_or(|o| !o.descends(&merged)))
            .map(|s| (s.node.clone(), s.hint.clone()))
            .collect();
        self.repairs = self.repairs.saturating_add(stale.len() as u64);
        for (to, hint) in stale {
            let request = ReplicaRequest::Write { key: self.key.clone(), object: merged.clone(), hint };
            self.outbox.push_back(Action::Send { to, request });
        }
    }

    /// The next action to carry out.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.outbox.pop_front()
    }

    /// When the coordinator next wants `handle_timeout`; None once it is finished.
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.phase == Phase::Finished {
            return None;
        }
        // The coordinating replica's own write is never replaced (see `handle_timeout`): only
        // the request's deadline ends waiting for it, so its slot sets no earlier timer.
        let local_put = self.phase == Phase::Started && matches!(self.op, Operation::Put { .. });
        let replica = self
            .slots
            .iter()
            .filter(|s| !(local_put && s.node == self.me))
            .filter_map(|s| match s.state {
                SlotState::Waiting { since_ms } => Some(self.slot_deadline(since_ms)),
                _ => None,
            })
            .min();
        Some(replica.map_or(self.timeouts.deadline_ms, |r| r.min(self.timeouts.deadline_ms)))
    }

    /// True once the client has its answer and no more actions will come.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished && self.outbox.is_empty()
    }

    /// Whether the client has had its answer.
    pub fn has_replied(&self) -> bool {
        matches!(self.phase, Phase::Replied | Phase::Finished)
    }

    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The nodes holding a slot, for tests and logs.
    pub fn slot_nodes(&self) -> Vec<&str> {
        self.slots.iter().map(|s| s.node.as_str()).collect()
    }
}

/// Who waits for a request's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Waiter {
    Client {
        conn: u64,
        id: u64,
        /// "get", "put" or "delete", for the figures.
        op: &'static str,
    },
    /// Another node forwarded the put; it waits under its own request id.
    Forwarded { conn: u64, id: u64 },
}

/// How the coordinator stage is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoordinatorSettings {
    pub me: NodeId,
    pub limits: RequestLimits,
    pub request_timeout_ms: u64,
    pub replica_timeout_ms: u64,
    /// Requests alive on this node at once (read repair included); more are refused.
    pub requests_max: usize,
    /// Replicate a put as soon as this node's write is computed, before it commits
    /// (`sync` mode, where every replica's write is durable). In `buffered` mode this node is
    /// the put's one durable writer and replicates only after its commit.
    pub replicate_ahead: bool,
    /// The share of gets, in percent, that read every replica rather than R of them.
    pub read_repair_percent: u8,
}

struct Entry {
    core: Coordinator,
    waiter: Waiter,
    started_ms: u64,
    span: tracing::Span,
    deadline: Option<u64>,
}

/// The coordinator stage: every live request of this node.
pub struct CoordinatorStage {
    settings: CoordinatorSettings,
    ring: Option<Arc<Ring>>,
    /// The cluster's namespaces, from the same view.
    namespaces: Arc<Namespaces>,
    /// The ring epoch of the view `ring` came with, told to clients in every answer.
    epoch: u64,
    /// This node is leaving (or left): it coordinates no forwarded put here.
    leaving: bool,
    down: DownSet,
    requests: BTreeMap<u64, Entry>,
    timers: BTreeSet<(u64, u64)>,
    /// Local storage operations in flight: token -> request.
    local: BTreeMap<u64, (u64, u64)>,
    /// How long local storage operations took, for admission's feedback.
    waits: WaitSamples,
    ids: Ids,
    effects: VecDeque<Effect>,
    /// Client requests taken: coordinated as a replica of the key, and for keys this node
    /// does not replicate. Reported to gossip (for `status`) at most every
    /// [`COUNTERS_INTERVAL_MS`], when they changed.
    counters: (u64, u64),
    counters_due_ms: Option<u64>,
    /// Client requests answered, by operation and result ([`result_label`]).
    answered: BTreeMap<(&'static str, &'static str), u64>,
    /// How long client requests took to their answer, by operation.
    durations: BTreeMap<&'static str, Histogram>,
    /// Puts other nodes forwarded here to coordinate.
    forwarded_in: u64,
    /// Read repairs sent.
    read_repairs: u64,
    /// Gets started, modulo 100: picks the evenly spread share that reads every replica.
    gets: u64,
}

/// A client answer's result, as the figures label it.
pub fn result_label(response: &ClientResponse) -> &'static str {
    match response {
        ClientResponse::Values { values, .. } if values.is_empty() => "not_found",
        ClientResponse::Values { .. } | ClientResponse::Written { .. } | ClientResponse::Document { .. } => "ok",
        ClientResponse::Error { kind, .. } => match kind {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Refused => "refused",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Internal => "internal",
        },
    }
}

/// How often at most the coordinator reports its counters.
pub const COUNTERS_INTERVAL_MS: u64 = 1000;

/// A replica's answer to a request, from the storage result (this node's own, or a peer's).
pub fn replica_reply(result: Result<StoreOutcome, StoreError>) -> ReplicaReply {
    match result {
        Ok(StoreOutcome::Digest(d)) => ReplicaReply::Digest(d),
        Ok(StoreOutcome::State(s)) => ReplicaReply::State(s),
        Ok(StoreOutcome::Written { .. }) => ReplicaReply::Written,
        Ok(StoreOutcome::Coordinated(Ok(o))) => ReplicaReply::Coordinated(o),
        Ok(StoreOutcome::Coordinated(Err(refusal))) => {
            ReplicaReply::Failed { kind: ErrorKind::BadRequest, message: refusal.to_string() }
        }
        Ok(other) => ReplicaReply::Failed { kind: ErrorKind::Internal, message: format!("unexpected {other:?}") },
        Err(e) => ReplicaReply::Failed { kind: ErrorKind::Internal, message: e.to_string() },
    }
}

/// The storage operation that carries out a replica request on this node, if it is one.
pub fn store_op(request: ReplicaRequest, now_wall_ms: u64) -> Option<StoreOp> {
    Some(match request {
        ReplicaRequest::Read { key } => StoreOp::Read { key },
        ReplicaRequest::ReadDigest { key } => StoreOp::ReadDigest { key },
        ReplicaRequest::Write { key, object, hint } => StoreOp::Write { key, object, hint },
        ReplicaRequest::Coordinate { key, context, value, hint } => {
            StoreOp::Coordinate { key, context, value, hint, now_wall_ms }
        }
        ReplicaRequest::Forward { .. } => return None,
    })
}

impl CoordinatorStage {
    pub fn new(settings: CoordinatorSettings) -> Self {
        CoordinatorStage {
            settings,
            ring: None,
            namespaces: Arc::default(),
            epoch: 0,
            leaving: false,
            down: DownSet::default(),
            requests: BTreeMap::new(),
            timers: BTreeSet::new(),
            local: BTreeMap::new(),
            waits: WaitSamples::default(),
            ids: Ids::default(),
            effects: VecDeque::new(),
            counters: (0, 0),
            counters_due_ms: None,
            answered: BTreeMap::new(),
            durations: BTreeMap::new(),
            forwarded_in: 0,
            read_repairs: 0,
            gets: 0,
        }
    }

    /// Client requests answered so far (every operation and result).
    pub fn answered_total(&self) -> u64 {
        self.answered.values().sum()
    }

    /// Requests alive now.
    pub fn live(&self) -> usize {
        self.requests.len()
    }

    fn answer(&mut self, waiter: &Waiter, response: ClientResponse) {
        let (to, msg) = match waiter {
            Waiter::Client { conn, id, op } => {
                let n = self.answered.entry((op, result_label(&response))).or_default();
                *n = n.saturating_add(1);
                (Dest::Conn(*conn), Message::ClientReply { id: *id, response, epoch: self.epoch })
            }
            Waiter::Forwarded { conn, id } => {
                (Dest::Conn(*conn), Message::ReplicaReply { id: *id, reply: ReplicaReply::Forwarded(response) })
            }
        };
        self.effects.push_back(Effect::Send { to, msg });
    }

    /// Start coordinating a request. A client's put whose context names another replica of
    /// the key that is up (the one that answered the read before fastest, the paper's
    /// section 6.4) is forwarded to it first, then down the list as any forward.
    fn start(&mut self, now: Now, key: Vec<u8>, op: Operation, waiter: Waiter, fastest: Option<NodeId>) {
        let Some(ring) = self.ring.clone() else {
            let e = "this node has not joined a cluster yet: check its seeds";
            return self.answer(&waiter, ClientResponse::Error { kind: ErrorKind::Unavailable, message: e.into() });
        };
        if self.requests.len() >= self.settings.requests_max {
            let e = "too many requests in flight on this node; retry";
            return self.answer(&waiter, ClientResponse::Error { kind: ErrorKind::Overloaded, message: e.into() });
        }
        let n = class_of(&key).n_or(self.settings.limits.replicas);
        let mut plan = ring.preference_list(ring.partition_for_key(&key), n);
        if plan.primaries.contains(&self.settings.me) {
            self.counters.0 = self.counters.0.saturating_add(1);
        } else {
            self.counters.1 = self.counters.1.saturating_add(1);
        }
        if self.counters_due_ms.is_none() {
            self.counters_due_ms = Some(now.mono_ms.saturating_add(COUNTERS_INTERVAL_MS));
        }
        let me = &self.settings.me;
        let client_put = matches!(op, Operation::Put { forwarded: false, .. });
        if let Some(x) = fastest.filter(|x| client_put && x != me && plan.primaries.contains(x) && self.down.is_up(x)) {
            // Without this node among the targets the request forwards: to `x` first.
            let mut primaries = vec![x.clone()];
            primaries.extend(plan.primaries.iter().filter(|p| **p != x && *p != me).cloned());
            let fallbacks = plan.fallbacks.iter().filter(|f| *f != me).cloned().collect();
            plan = PreferenceList { primaries, fallbacks };
        }
        let timeouts = Timeouts {
            deadline_ms: now.mono_ms.saturating_add(self.settings.request_timeout_ms),
            replica_ms: self.settings.replica_timeout_ms,
        };
        let read_all = matches!(op, Operation::Get { .. }) && self.read_all_next();
        let id = self.ids.issue();
        let span = tracing::debug_span!("request", id, key = %String::from_utf8_lossy(&key));
        let core = {
            let _e = span.enter();
            tracing::debug!(?op, "start");
            let down = &self.down;
            Coordinator::new(
                now.mono_ms,
                self.settings.me.clone(),
                Request { key, op, timeouts, read_all },
                &plan,
                |n| down.is_up(n),
            )
        };
        self.requests.insert(id, Entry { core, waiter, started_ms: now.mono_ms, span, deadline: None });
        self.pump(now, id);
    }

    /// Whether the next get reads every replica: `read_repair_percent` of gets, evenly
    /// spread (the gets whose count crosses the next whole share).
    fn read_all_next(&mut self) -> bool {
        let p = u64::from(self.settings.read_repair_percent.min(100));
        let n = self.gets;
        self.gets = n.wrapping_add(1) % 100;
        (n + 1) * p / 100 > n * p / 100
    }

    /// A client's key in namespace `ns` (None: the default one): the limits its requests
    /// have (the namespace's N, R and W) and the key it is stored under.
    fn namespace(&self, ns: Option<&str>, key: &[u8]) -> Result<(RequestLimits, Vec<u8>), String> {
        match ns {
            None | Some(DEFAULT_NAME) => {
                check_default_key(key)?;
                Ok((self.settings.limits, key.to_vec()))
            }
            Some(name) => match self.namespaces.get(name) {
                Some(def) => Ok((self.settings.limits.of_namespace(def), def.store_key(key))),
                None => Err(format!(
                    "no namespace {name:?} (ringkv admin namespace list shows them; admin namespace create makes one)"
                )),
            },
        }
    }

    /// Carry out a request's actions, re-arm its timer, and drop it once finished.
    fn pump(&mut self, now: Now, id: u64) {
        let Some(entry) = self.requests.get_mut(&id) else { return };
        let span = entry.span.clone();
        let _e = span.enter();
        let mut actions = Vec::new();
        while let Some(a) = entry.core.poll_action() {
            actions.push(a);
        }
        let waiter = entry.waiter.clone();
        let started = entry.started_ms;
        for action in actions {
            match action {
                // A node leaving the ring (or left) stores nothing new, as its replica stage
                // refuses other coordinators' writes: a request started before the leave
                // writes to a fallback instead.
                Action::Send { to, request } if to == self.settings.me => match store_op(request, now.wall_ms) {
                    Some(op) if !self.leaving || op.is_read_only() => {
                        let token = self.ids.issue();
                        self.local.insert(token, (id, now.mono_ms));
                        let durable = durable_writer(&op);
                        self.effects.push_back(Effect::Store { token, op, durable });
                    }
                    _ => {
                        if let Some(e) = self.requests.get_mut(&id) {
                            e.core.handle_failure(now.mono_ms, &to);
                        }
                    }
                },
                Action::Send { to, request } => {
                    self.effects.push_back(Effect::Send { to: Dest::Node(to), msg: Message::Replica { id, request } });
                }
                Action::Reply(response) => {
                    tracing::debug!(?response, "reply");
                    if let Waiter::Client { op, .. } = waiter {
                        let ms = now.mono_ms.saturating_sub(started);
                        self.effects.push_back(Effect::Signal(Signal::Latency { ms }));
                        let h = self.durations.entry(op).or_insert_with(|| Histogram::new(LATENCY_BUCKETS_S));
                        h.observe(ms as f64 / 1000.0);
                    }
                    self.answer(&waiter, response);
                }
                Action::Suspect(node) => {
                    self.effects.push_back(Effect::Signal(Signal::Report { node, ok: false }));
                }
            }
        }
        let Some(entry) = self.requests.get_mut(&id) else { return };
        // Failures handled above may have produced more actions.
        if entry.core.poll_action_pending() {
            return self.pump(now, id);
        }
        if let Some(d) = entry.deadline.take() {
            self.timers.remove(&(d, id));
        }
        if entry.core.is_finished() {
            if let Some(done) = self.requests.remove(&id) {
                self.read_repairs = self.read_repairs.saturating_add(done.core.repairs);
            }
            return;
        }
        if let Some(d) = entry.core.poll_timeout() {
            entry.deadline = Some(d);
            self.timers.insert((d, id));
        }
    }

    fn handle_message(&mut self, now: Now, from: Origin, msg: Message) {
        if let Some(node) = &from.node {
            if let Some(e) = self.down.heard(node) {
                self.effects.push_back(e);
            }
        }
        match msg {
            Message::Client { id, request: ClientRequest::Get { key, r, ns } } => {
                let waiter = Waiter::Client { conn: from.conn, id, op: "get" };
                let checked = self
                    .namespace(ns.as_deref(), &key)
                    .and_then(|(limits, store_key)| limits.get(&key, r).map(|op| (op, store_key)));
                match checked {
                    Ok((op, store_key)) => self.start(now, store_key, op, waiter, None),
                    Err(e) => self.answer(&waiter, ClientResponse::Error { kind: ErrorKind::BadRequest, message: e }),
                }
            }
            Message::Client { id, request: ClientRequest::Put { key, context, value, w, ns } } => {
                let op = if value.is_some() { "put" } else { "delete" };
                let waiter = Waiter::Client { conn: from.conn, id, op };
                let value = value.map(Bytes::into_vec);
                // The replica the context names as the fastest of the read before.
                let fastest = context.as_deref().and_then(|c| split_context(c).1).map(str::to_string);
                let checked = self.namespace(ns.as_deref(), &key).and_then(|(limits, store_key)| {
                    limits.put(&key, context.as_deref(), value, w, now.wall_ms).map(|op| (op, store_key))
                });
                match checked {
                    Ok((op, store_key)) => self.start(now, store_key, op, waiter, fastest),
                    Err(e) => self.answer(&waiter, ClientResponse::Error { kind: ErrorKind::BadRequest, message: e }),
                }
            }
            Message::Replica { id, request: ReplicaRequest::Forward { .. } } if self.leaving => {
                // A leaving node stores nothing new: the forwarder tries the next target.
                let waiter = Waiter::Forwarded { conn: from.conn, id };
                let message = "this node is leaving the cluster".to_string();
                self.answer(&waiter, ClientResponse::Error { kind: ErrorKind::Internal, message });
            }
            Message::Replica { id, request: ReplicaRequest::Forward { key, context, value, w } } => {
                self.forwarded_in = self.forwarded_in.saturating_add(1);
                let waiter = Waiter::Forwarded { conn: from.conn, id };
                match self.settings.limits.of_key(&key).forwarded(&key, context, value, w) {
                    Ok(op) => self.start(now, key, op, waiter, None),
                    Err(e) => self.answer(&waiter, ClientResponse::Error { kind: ErrorKind::BadRequest, message: e }),
                }
            }
            Message::ReplicaReply { id, reply } => {
                let Some(node) = from.node else { return };
                if let Some(e) = self.requests.get_mut(&id) {
                    e.core.handle_reply(now.mono_ms, &node, reply);
                    self.pump(now, id);
                }
            }
            _ => {}
        }
    }
}

impl Coordinator {
    fn poll_action_pending(&self) -> bool {
        !self.outbox.is_empty()
    }
}

impl Stage for CoordinatorStage {
    fn id(&self) -> StageId {
        StageId::Coordinator
    }

    fn handle(&mut self, now: Now, input: Input) {
        match input {
            Input::Message { from, msg } => self.handle_message(now, from, msg),
            Input::Stored { token, result } => {
                let Some((id, issued_ms)) = self.local.remove(&token) else { return };
                self.waits.storage(now.mono_ms, now.mono_ms.saturating_sub(issued_ms));
                if let Some(e) = self.requests.get_mut(&id) {
                    let me = self.settings.me.clone();
                    e.core.handle_reply(now.mono_ms, &me, replica_reply(result));
                    self.pump(now, id);
                }
            }
            Input::Ahead { token, outcome: StoreOutcome::Coordinated(Ok(object)) } if self.settings.replicate_ahead => {
                let Some(&(id, _)) = self.local.get(&token) else { return };
                if let Some(e) = self.requests.get_mut(&id) {
                    e.core.handle_ahead(now.mono_ms, object);
                    self.pump(now, id);
                }
            }
            Input::Ahead { .. } => {}
            Input::Tick { .. } => {
                if self.counters_due_ms.is_some_and(|d| d <= now.mono_ms) {
                    self.counters_due_ms = None;
                    let (coordinated, forwarded) = self.counters;
                    self.effects.push_back(Effect::Signal(Signal::Counters { coordinated, forwarded }));
                }
                let due: Vec<u64> =
                    self.timers.iter().take_while(|(d, _)| *d <= now.mono_ms).map(|(_, id)| *id).collect();
                for id in due {
                    if let Some(e) = self.requests.get_mut(&id) {
                        e.core.handle_timeout(now.mono_ms);
                    }
                    self.pump(now, id);
                }
            }
            Input::Signal(Signal::View(v)) => {
                self.ring = v.ring.clone();
                self.namespaces = v.namespaces.clone();
                self.epoch = v.epoch;
                self.leaving = matches!(
                    v.my_state(),
                    Some(crate::membership::MemberState::Leaving | crate::membership::MemberState::Left)
                );
            }
            Input::Signal(Signal::Down(d)) => self.down.set(d),
            Input::Signal(Signal::Unreachable { node }) => {
                let ids: Vec<u64> = self.requests.keys().copied().collect();
                for id in ids {
                    if let Some(e) = self.requests.get_mut(&id) {
                        e.core.handle_failure(now.mono_ms, &node);
                    }
                    self.pump(now, id);
                }
            }
            Input::Signal(_) => {}
        }
        if let Some(waited) = self.waits.take_due(now.mono_ms) {
            self.effects.push_back(Effect::Signal(waited));
        }
    }

    fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    fn report(&self, out: &mut Report) {
        const REQUESTS: &str = "Client requests answered by this node, by operation (get, put, delete) and result \
                                (ok, not_found, bad_request, unavailable, refused, overloaded, internal)";
        out.declare("ringkv_requests", REQUESTS, Kind::Counter);
        for ((op, result), n) in &self.answered {
            out.counter("ringkv_requests", REQUESTS, &[("op", op), ("result", result)], *n);
        }
        const DURATIONS: &str = "Time from a client request's arrival to its answer, by operation";
        out.declare("ringkv_request_duration_seconds", DURATIONS, Kind::Histogram);
        for (op, h) in &self.durations {
            out.histogram("ringkv_request_duration_seconds", DURATIONS, &[("op", op)], h);
        }
        const FORWARDED: &str = "Client requests for keys this node does not replicate (direction out: a put \
                                 forwarded to a replica, a get read from remote replicas only), and puts other \
                                 nodes forwarded here (direction in)";
        out.counter("ringkv_forwarded_requests", FORWARDED, &[("direction", "out")], self.counters.1);
        out.counter("ringkv_forwarded_requests", FORWARDED, &[("direction", "in")], self.forwarded_in);
        out.counter(
            "ringkv_read_repairs",
            "Replicas sent the merged state after answering a get with an older one",
            &[],
            self.read_repairs,
        );
        out.gauge("ringkv_requests_in_flight", "Requests being coordinated now", &[], self.requests.len() as f64);
    }

    fn poll_timeout(&self) -> Option<u64> {
        let request = self.timers.first().map(|(d, _)| *d);
        [request, self.counters_due_ms, self.waits.due_at()].into_iter().flatten().min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::Actor;

    const T: Timeouts = Timeouts { deadline_ms: 1000, replica_ms: 100 };

    fn ids(v: &[&str]) -> Vec<NodeId> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn drain(c: &mut Coordinator) -> Vec<Action> {
        std::iter::from_fn(|| c.poll_action()).collect()
    }

    fn sends(actions: &[Action]) -> Vec<(String, Option<String>)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { to, request } => Some((
                    to.clone(),
                    match request {
                        ReplicaRequest::Write { hint, .. } | ReplicaRequest::Coordinate { hint, .. } => hint.clone(),
                        _ => None,
                    },
                )),
                _ => None,
            })
            .collect()
    }

    fn obj(actor: u64, v: &[u8]) -> Object {
        let mut o = Object::new();
        o.update(&VersionVector::new(), Actor(actor), Some(v.to_vec()), 1, 10);
        o
    }

    fn plan() -> PreferenceList {
        PreferenceList { primaries: ids(&["a", "b", "c"]), fallbacks: ids(&["d", "e"]) }
    }

    fn start(me: &str, op: Operation, down: &[&str]) -> Coordinator {
        start_reading(me, op, down, true)
    }

    fn start_reading(me: &str, op: Operation, down: &[&str], read_all: bool) -> Coordinator {
        let down = ids(down);
        let request = Request { key: b"k".to_vec(), op, timeouts: T, read_all };
        Coordinator::new(0, me.into(), request, &plan(), |n| !down.iter().any(|d| d == n))
    }

    fn put(me: &str, w: usize, down: &[&str]) -> Coordinator {
        let op = Operation::Put { w, context: VersionVector::new(), value: Some(b"v".to_vec()), forwarded: false };
        start(me, op, down)
    }

    /// A put coordinated on a, whose local write is applied: replicating to the others.
    fn put_applied_on_a(w: usize, down: &[&str]) -> Coordinator {
        let mut c = put("a", w, down);
        drain(&mut c);
        c.handle_reply(1, "a", coordinated(&obj(1, b"v")));
        drain(&mut c);
        c
    }

    /// A get on a that reads every replica.
    fn get(r: usize, down: &[&str]) -> Coordinator {
        start("a", Operation::Get { r }, down)
    }

    /// A get on a that reads R replicas.
    fn get_r(r: usize, down: &[&str]) -> Coordinator {
        start_reading("a", Operation::Get { r }, down, false)
    }

    fn replies(actions: &[Action]) -> Vec<ClientResponse> {
        actions.iter().filter_map(|a| if let Action::Reply(r) = a { Some(r.clone()) } else { None }).collect()
    }

    fn written() -> ReplicaReply {
        ReplicaReply::Written
    }

    fn coordinated(o: &Object) -> ReplicaReply {
        ReplicaReply::Coordinated(o.clone())
    }

    /// Table of write quorums: (W, acks from other replicas, whether the client hears "written").
    #[test]
    fn client_requests_are_checked() {
        let l = RequestLimits { replicas: 3, read_quorum: 2, write_quorum: 2, key_bytes_max: 8, value_bytes_max: 4 };
        assert_eq!(l.get(b"k", None), Ok(Operation::Get { r: 2 }));
        assert_eq!(l.get(b"k", Some(3)), Ok(Operation::Get { r: 3 }));
        for (key, r) in [(&b""[..], None), (b"123456789", None), (b"k", Some(0)), (b"k", Some(4))] {
            assert!(l.get(key, r).is_err(), "{key:?} {r:?}");
        }
        assert!(matches!(l.put(b"k", None, Some(b"v".to_vec()), None, 0), Ok(Operation::Put { w: 2, .. })));
        assert!(matches!(l.put(b"k", None, None, Some(1), 0), Ok(Operation::Put { w: 1, value: None, .. })));
        let ctx = {
            let mut o = Object::new();
            o.update(&VersionVector::new(), crate::version::Actor(1), Some(vec![1]), 1, 10);
            o.context().encode_context()
        };
        assert!(
            matches!(l.put(b"k", Some(&ctx), None, None, 0), Ok(Operation::Put { context, .. }) if context.len() == 1)
        );
        assert!(l.put(b"k", None, Some(b"12345".to_vec()), None, 0).unwrap_err().contains("max_value_bytes"));
        assert!(l.put(b"k", Some("%%"), Some(b"v".to_vec()), None, 0).is_err());
        assert!(l.put(b"k", None, Some(b"v".to_vec()), Some(4), 0).is_err());
        assert!(l.put(b"", None, Some(b"v".to_vec()), None, 0).is_err());
    }

    #[test]
    fn put_acks_after_exactly_w() {
        for (w, others_acking, acked) in [(1, 0, true), (2, 0, false), (2, 1, true), (3, 1, false), (3, 2, true)] {
            let mut c = put("a", w, &[]);
            assert_eq!(sends(&drain(&mut c)), vec![("a".into(), None)], "coordinates locally first");
            c.handle_reply(1, "a", coordinated(&obj(1, b"v")));
            let fanout = drain(&mut c);
            let mut out = replies(&fanout);
            assert_eq!(sends(&fanout).len(), 2);
            for n in ["b", "c"].iter().take(others_acking) {
                c.handle_reply(2, n, written());
                out.extend(replies(&drain(&mut c)));
            }
            assert_eq!(!out.is_empty(), acked, "W={w} acks={others_acking}");
            assert!(out.len() <= 1);
        }
    }

    #[test]
    fn a_put_replicates_ahead_of_its_local_commit_which_still_counts_once_durable() {
        for (w, others_acking, acked_before_local, acked_after_local) in
            [(1, 1, true, true), (2, 1, false, true), (2, 2, true, true), (3, 2, false, true), (3, 1, false, false)]
        {
            let mut c = put("a", w, &[]);
            drain(&mut c);
            c.handle_ahead(1, obj(1, b"v"));
            let fanout = drain(&mut c);
            assert_eq!(sends(&fanout), vec![("b".into(), None), ("c".into(), None)], "replicated before the commit");
            assert!(replies(&fanout).is_empty(), "a computed write is no acknowledgement");
            let mut out = Vec::new();
            for n in ["b", "c"].iter().take(others_acking) {
                c.handle_reply(2, n, written());
                out.extend(replies(&drain(&mut c)));
            }
            assert_eq!(!out.is_empty(), acked_before_local, "W={w} acks={others_acking}");
            // The local commit: its own acknowledgement, and nothing sent twice.
            c.handle_reply(3, "a", coordinated(&obj(1, b"v")));
            let after = drain(&mut c);
            assert!(sends(&after).is_empty());
            out.extend(replies(&after));
            assert_eq!(!out.is_empty(), acked_after_local, "W={w} acks={others_acking} and the local commit");
            assert!(out.len() <= 1);
        }
        // A local commit that fails after the write went ahead: a fallback takes its place.
        let mut c = put("a", 2, &[]);
        drain(&mut c);
        c.handle_ahead(1, obj(1, b"v"));
        drain(&mut c);
        c.handle_reply(2, "a", ReplicaReply::Failed { kind: ErrorKind::Internal, message: "commit failed".into() });
        assert_eq!(sends(&drain(&mut c)), vec![("d".into(), Some("a".into()))], "a hint for this node");
        c.handle_reply(3, "b", written());
        c.handle_reply(3, "d", written());
        assert_eq!(replies(&drain(&mut c)).len(), 1, "two durable copies elsewhere");
    }

    #[test]
    fn unreachable_primary_is_replaced_by_hinted_fallback() {
        let mut c = put("a", 2, &["b"]);
        drain(&mut c);
        c.handle_reply(1, "a", coordinated(&obj(1, b"v")));
        let s = sends(&drain(&mut c));
        assert_eq!(s, vec![("c".into(), None), ("d".into(), Some("b".into()))]);
    }

    #[test]
    fn timed_out_replica_is_replaced_and_its_late_reply_still_counts() {
        let mut c = put("a", 3, &[]);
        drain(&mut c);
        c.handle_reply(1, "a", coordinated(&obj(1, b"v")));
        drain(&mut c);
        c.handle_reply(2, "b", written());
        assert_eq!(c.poll_timeout(), Some(101));
        c.handle_timeout(101);
        assert_eq!(sends(&drain(&mut c)), vec![("d".into(), Some("c".into()))]);
        // Late, but c is a replica that has the write: the third acknowledgement.
        c.handle_reply(102, "c", written());
        assert!(matches!(replies(&drain(&mut c))[..], [ClientResponse::Written { .. }]));
        // The stand-in's copy is one more; the client heard once.
        c.handle_reply(103, "d", written());
        assert!(replies(&drain(&mut c)).is_empty());
        assert!(c.is_finished());
    }

    /// A replica slower than the replica timeout, with no spare to stand in, is waited for
    /// until the request's deadline: slow is not failed (CI saw puts fail on a loaded machine
    /// while every replica was up and acknowledged a moment later).
    #[test]
    fn slow_replicas_with_no_spare_count_until_the_deadline() {
        let mut c = put_applied_on_a(2, &["d", "e"]);
        c.handle_timeout(101);
        let out = drain(&mut c);
        assert!(sends(&out).is_empty() && replies(&out).is_empty(), "{out:?}");
        assert!(!c.is_finished());
        assert_eq!(c.poll_timeout(), Some(1000), "only the deadline is left to wait for");
        c.handle_reply(500, "c", written());
        assert!(matches!(replies(&drain(&mut c))[..], [ClientResponse::Written { .. }]));

        let mut c = get(2, &["d", "e"]);
        drain(&mut c);
        c.handle_reply(1, "a", read(Some(obj(1, b"v"))));
        c.handle_timeout(101);
        assert!(replies(&drain(&mut c)).is_empty());
        c.handle_reply(500, "b", read(Some(obj(1, b"v"))));
        let out = replies(&drain(&mut c));
        assert!(matches!(&out[..], [ClientResponse::Values { values, .. }] if values.len() == 1), "{out:?}");

        // A late replica whose connection then fails is given up at once.
        let mut c = put_applied_on_a(2, &["d", "e"]);
        c.handle_timeout(101);
        drain(&mut c);
        c.handle_failure(102, "b");
        assert!(replies(&drain(&mut c)).is_empty());
        c.handle_failure(103, "c");
        let out = replies(&drain(&mut c));
        assert!(matches!(out[..], [ClientResponse::Error { kind: ErrorKind::Unavailable, .. }]), "{out:?}");
        assert!(c.is_finished());
    }

    #[test]
    fn put_fails_unavailable_when_replicas_run_out() {
        let mut c = put("a", 3, &["d", "e"]);
        drain(&mut c);
        c.handle_reply(1, "a", coordinated(&obj(1, b"v")));
        drain(&mut c);
        c.handle_failure(2, "b");
        let out = replies(&drain(&mut c));
        assert!(matches!(out[..], [ClientResponse::Error { kind: ErrorKind::Unavailable, .. }]), "{out:?}");
        assert!(c.is_finished());
    }

    #[test]
    fn deadline_fails_a_put_without_quorum() {
        let mut c = put("a", 2, &[]);
        drain(&mut c);
        c.handle_reply(1, "a", coordinated(&obj(1, b"v")));
        drain(&mut c);
        // b and c are replaced by d and e on timeouts; nobody ever answers.
        for t in [100, 200, 300, 1000] {
            c.handle_timeout(t);
            drain(&mut c);
        }
        assert!(c.is_finished());
        let mut c = put("a", 2, &[]);
        drain(&mut c);
        c.handle_timeout(1000);
        let out = replies(&drain(&mut c));
        assert!(matches!(out[..], [ClientResponse::Error { kind: ErrorKind::Unavailable, .. }]));
    }

    #[test]
    fn non_replica_forwards_and_passes_the_answer_back() {
        let mut c = put("z", 2, &[]);
        let a = drain(&mut c);
        assert!(matches!(&a[..], [Action::Send { to, request: ReplicaRequest::Forward { w: 2, .. } }] if to == "a"));
        c.handle_failure(1, "a");
        let a = drain(&mut c);
        assert!(matches!(&a[..], [Action::Send { to, request: ReplicaRequest::Forward { .. } }] if to == "b"));
        let ok = ClientResponse::Written { context: "x".into() };
        c.handle_reply(2, "b", ReplicaReply::Forwarded(ok.clone()));
        assert_eq!(replies(&drain(&mut c)), vec![ok]);
        assert!(c.is_finished());
    }

    #[test]
    fn a_slow_forward_gets_half_the_remaining_time_before_a_retry() {
        let mut c = put("z", 2, &[]);
        drain(&mut c);
        // The replica timeout (100) is not enough for a whole remote put.
        c.handle_timeout(100);
        assert!(drain(&mut c).is_empty());
        assert_eq!(c.poll_timeout(), Some(500));
        c.handle_timeout(500);
        let a: Vec<Action> = drain(&mut c).into_iter().filter(|a| !matches!(a, Action::Suspect(_))).collect();
        assert!(matches!(&a[..], [Action::Send { to, request: ReplicaRequest::Forward { .. } }] if to == "b"));
        c.handle_reply(600, "b", ReplicaReply::Forwarded(ClientResponse::Written { context: "x".into() }));
        assert!(matches!(replies(&drain(&mut c))[..], [ClientResponse::Written { .. }]));
    }

    #[test]
    fn forwarded_put_is_coordinated_here_even_off_the_list() {
        let op = Operation::Put { w: 2, context: VersionVector::new(), value: Some(b"v".to_vec()), forwarded: true };
        let mut c = start("z", op, &[]);
        assert_eq!(sends(&drain(&mut c)), vec![("z".into(), None)]);
    }

    fn read(o: Option<Object>) -> ReplicaReply {
        ReplicaReply::State(o.map(|o| {
            let digest = o.digest();
            (o, digest)
        }))
    }

    #[test]
    fn get_replies_after_r_then_repairs_stale_replicas() {
        let mut c = get(2, &[]);
        assert_eq!(sends(&drain(&mut c)).len(), 3);
        let new = obj(1, b"new");
        c.handle_reply(1, "a", read(Some(new.clone())));
        assert!(replies(&drain(&mut c)).is_empty());
        c.handle_reply(2, "b", read(None));
        let out = replies(&drain(&mut c));
        assert!(matches!(&out[..], [ClientResponse::Values { values, context: Some(_) }] if values.len() == 1));
        assert_eq!(c.fastest.as_deref(), Some("a"));
        // The context names the fastest replica: the client sends the write back there.
        let [ClientResponse::Values { context: Some(ctx), .. }] = &out[..] else { panic!() };
        assert_eq!(crate::version::split_context(ctx).1, Some("a"));
        let mut older = Object::new();
        older.update(&VersionVector::new(), Actor(7), Some(b"old".to_vec()), 0, 10);
        c.handle_reply(3, "c", read(Some(older)));
        let repairs = drain(&mut c);
        // a and c each had one of the two siblings and b had nothing: all get the merged state.
        assert_eq!(sends(&repairs), vec![("a".into(), None), ("b".into(), None), ("c".into(), None)]);
        assert!(c.is_finished());
    }

    fn digest(o: Option<&Object>) -> ReplicaReply {
        ReplicaReply::Digest(o.map(Object::digest))
    }

    /// The reads among `actions`: (to, true when in full, false when by digest).
    fn reads(actions: &[Action]) -> Vec<(String, bool)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { to, request: ReplicaRequest::Read { .. } } => Some((to.clone(), true)),
                Action::Send { to, request: ReplicaRequest::ReadDigest { .. } } => Some((to.clone(), false)),
                _ => None,
            })
            .collect()
    }

    /// A get reads this node in full and the other replicas by digest; equal digests count
    /// towards R without their objects, and nobody is repaired or read again.
    #[test]
    fn get_reads_one_replica_in_full_and_the_others_by_digest() {
        let mut c = get(2, &[]);
        assert_eq!(reads(&drain(&mut c)), vec![("a".into(), true), ("b".into(), false), ("c".into(), false)]);
        let o = obj(1, b"x");
        // A digest before any full answer waits for it.
        c.handle_reply(1, "b", digest(Some(&o)));
        assert!(drain(&mut c).is_empty());
        c.handle_reply(2, "a", read(Some(o.clone())));
        let out = drain(&mut c);
        assert!(reads(&out).is_empty(), "{out:?}");
        assert!(
            matches!(&replies(&out)[..], [ClientResponse::Values { values, .. }] if values == &vec![Bytes::from(b"x".to_vec())])
        );
        c.handle_reply(3, "c", digest(Some(&o)));
        assert!(drain(&mut c).is_empty());
        assert!(c.is_finished());
        // Nothing anywhere: empty, without a context.
        let mut c = get(2, &[]);
        drain(&mut c);
        c.handle_reply(1, "a", read(None));
        c.handle_reply(2, "c", digest(None));
        assert_eq!(replies(&drain(&mut c)), vec![ClientResponse::Values { values: vec![], context: None }]);
    }

    /// Most gets read R replicas, this node first: the others are not asked, and the get
    /// ends once those R answered.
    #[test]
    fn a_get_reads_r_replicas_this_node_first() {
        let o = obj(1, b"x");
        let mut c = get_r(2, &[]);
        assert_eq!(reads(&drain(&mut c)), vec![("a".into(), true), ("b".into(), false)]);
        c.handle_reply(1, "a", read(Some(o.clone())));
        c.handle_reply(2, "b", digest(Some(&o)));
        let out = drain(&mut c);
        assert!(matches!(&replies(&out)[..], [ClientResponse::Values { values, .. }] if values.len() == 1));
        assert!(reads(&out).is_empty(), "c is not read: {out:?}");
        assert!(c.is_finished());
        // Off the list, this node reads the first R targets: the first in full.
        let mut c = start_reading("z", Operation::Get { r: 2 }, &[], false);
        assert_eq!(reads(&drain(&mut c)), vec![("a".into(), true), ("b".into(), false)]);
        // R = N reads every replica anyway; a down primary's fallback is read last.
        let mut c = get_r(3, &["b"]);
        assert_eq!(reads(&drain(&mut c)), vec![("a".into(), true), ("c".into(), false), ("d".into(), false)]);
    }

    /// A replica read that fails or is late is taken over by a target not read yet before
    /// any fallback; a stale replica among those read is repaired.
    #[test]
    fn an_unread_target_stands_in_before_a_fallback() {
        let (x, y) = (obj(1, b"x"), obj(2, b"y"));
        let mut c = get_r(2, &[]);
        drain(&mut c);
        c.handle_failure(1, "b");
        assert_eq!(reads(&drain(&mut c)), vec![("c".into(), false)]);
        c.handle_reply(2, "a", read(Some(x.clone())));
        c.handle_reply(3, "c", digest(Some(&y)));
        assert_eq!(reads(&drain(&mut c)), vec![("c".into(), true)]);
        c.handle_reply(4, "c", read(Some(y.clone())));
        let out = drain(&mut c);
        assert!(matches!(&replies(&out)[..], [ClientResponse::Values { values, .. }] if values.len() == 2));
        // a and c each missed the other's write: both repaired; b, failed, is not.
        assert_eq!(sends(&out), vec![("a".into(), None), ("c".into(), None)]);
        assert!(c.is_finished());
        // Late: c takes over, and b's late answer still counts.
        let mut c = get_r(2, &[]);
        drain(&mut c);
        c.handle_reply(1, "a", read(Some(x.clone())));
        c.handle_timeout(100);
        let out = drain(&mut c);
        assert_eq!(reads(&out), vec![("c".into(), false)]);
        assert!(out.contains(&Action::Suspect("b".into())));
        c.handle_reply(101, "b", digest(Some(&x)));
        assert!(matches!(&replies(&drain(&mut c))[..], [ClientResponse::Values { .. }]));
        // With every target read, a late one is replaced by a fallback.
        let mut c = get_r(3, &[]);
        drain(&mut c);
        c.handle_failure(1, "c");
        assert_eq!(reads(&drain(&mut c)), vec![("d".into(), false)]);
    }

    /// `read_repair_percent` of gets read every replica, evenly spread.
    #[test]
    fn read_repair_percent_of_gets_read_every_replica() {
        for (percent, every) in [(0u8, 0usize), (10, 10), (25, 25), (100, 100)] {
            let mut stage = CoordinatorStage::new(CoordinatorSettings {
                me: "a".into(),
                limits: RequestLimits {
                    replicas: 3,
                    read_quorum: 2,
                    write_quorum: 2,
                    key_bytes_max: 64,
                    value_bytes_max: 64,
                },
                request_timeout_ms: 1000,
                replica_timeout_ms: 100,
                requests_max: 16,
                replicate_ahead: true,
                read_repair_percent: percent,
            });
            let picks: Vec<bool> = (0..300).map(|_| stage.read_all_next()).collect();
            for chunk in picks.chunks(100) {
                assert_eq!(chunk.iter().filter(|&&p| p).count(), every, "percent {percent}");
            }
            if percent == 10 {
                assert!(picks[..20].iter().enumerate().all(|(i, &p)| p == (i % 10 == 9)), "spread: {picks:?}");
            }
        }
    }

    /// A replica whose digest differs is read in full before it counts, and repaired when stale.
    #[test]
    fn a_differing_digest_is_read_in_full_then_merged_and_repaired() {
        let mut c = get(2, &[]);
        drain(&mut c);
        let (x, y) = (obj(1, b"x"), obj(2, b"y"));
        c.handle_reply(1, "a", read(Some(x.clone())));
        c.handle_reply(2, "b", digest(Some(&y)));
        let out = drain(&mut c);
        assert_eq!(reads(&out), vec![("b".into(), true)]);
        assert!(replies(&out).is_empty(), "b's state is unknown yet: R is not met");
        c.handle_reply(3, "b", read(Some(y.clone())));
        let out = drain(&mut c);
        assert!(matches!(&replies(&out)[..], [ClientResponse::Values { values, .. }] if values.len() == 2));
        // c matches a's old state: it is repaired with a and b, without a read of its own.
        c.handle_reply(4, "c", digest(Some(&x)));
        let out = drain(&mut c);
        assert!(reads(&out).is_empty());
        assert_eq!(sends(&out), vec![("a".into(), None), ("b".into(), None), ("c".into(), None)]);
        assert!(c.is_finished());
    }

    /// When the replica read in full fails, another one is read in full: a stand-in if
    /// there is one, else a replica that answered by digest.
    #[test]
    fn a_failed_full_read_moves_to_another_replica() {
        let o = obj(1, b"x");
        let mut c = get(2, &[]);
        drain(&mut c);
        c.handle_failure(1, "a");
        assert_eq!(reads(&drain(&mut c)), vec![("d".into(), true)]);
        c.handle_reply(2, "b", digest(Some(&o)));
        c.handle_reply(3, "d", read(Some(o.clone())));
        assert!(matches!(&replies(&drain(&mut c))[..], [ClientResponse::Values { .. }]));
        // A primary that answered by digest is read in full before the stand-in, which may
        // hold nothing of the key (a fallback): the stand-in is asked for a digest.
        let mut c = get(2, &[]);
        drain(&mut c);
        c.handle_reply(1, "b", digest(Some(&o)));
        c.handle_failure(2, "a");
        assert_eq!(reads(&drain(&mut c)), vec![("b".into(), true), ("d".into(), false)]);
        c.handle_reply(3, "b", read(Some(o.clone())));
        c.handle_reply(4, "c", digest(Some(&o)));
        assert!(matches!(&replies(&drain(&mut c))[..], [ClientResponse::Values { .. }]));

        let mut c = get(2, &["d", "e"]);
        drain(&mut c);
        c.handle_reply(1, "b", digest(Some(&o)));
        c.handle_reply(2, "c", digest(Some(&o)));
        assert!(drain(&mut c).is_empty());
        c.handle_failure(3, "a");
        assert_eq!(reads(&drain(&mut c)), vec![("b".into(), true)]);
        c.handle_reply(4, "b", read(Some(o.clone())));
        let out = drain(&mut c);
        assert!(matches!(&replies(&out)[..], [ClientResponse::Values { values, .. }] if values.len() == 1), "{out:?}");
        // A late full read hands over too: a's read times out, b is read in full.
        let mut c = get(2, &["d", "e"]);
        drain(&mut c);
        c.handle_reply(1, "b", digest(Some(&o)));
        c.handle_timeout(101);
        let out = drain(&mut c);
        assert!(reads(&out).contains(&("b".into(), true)), "{out:?}");
    }

    #[test]
    fn get_does_not_repair_up_to_date_replicas() {
        let mut c = get(2, &[]);
        drain(&mut c);
        let o = obj(1, b"x");
        for n in ["a", "b", "c"] {
            c.handle_reply(1, n, read(Some(o.clone())));
        }
        let actions = drain(&mut c);
        assert_eq!(replies(&actions).len(), 1);
        assert!(sends(&actions).is_empty());
        assert!(c.is_finished());
    }

    #[test]
    fn get_merges_siblings_from_replicas() {
        let mut c = get(2, &[]);
        drain(&mut c);
        c.handle_reply(1, "a", read(Some(obj(1, b"x"))));
        c.handle_reply(1, "c", read(Some(obj(2, b"y"))));
        let out = replies(&drain(&mut c));
        let ClientResponse::Values { values, .. } = &out[0] else { panic!() };
        assert_eq!(values.len(), 2);
    }

    #[test]
    fn get_of_missing_key_is_empty_without_context() {
        let mut c = get(1, &[]);
        drain(&mut c);
        c.handle_reply(1, "b", read(None));
        assert_eq!(replies(&drain(&mut c)), vec![ClientResponse::Values { values: vec![], context: None }]);
    }

    #[test]
    fn get_repairs_after_deadline_with_what_it_has() {
        let mut c = get(1, &[]);
        drain(&mut c);
        c.handle_reply(1, "a", read(Some(obj(1, b"x"))));
        drain(&mut c);
        c.handle_reply(2, "b", read(None));
        c.handle_timeout(1000);
        assert_eq!(sends(&drain(&mut c)), vec![("b".into(), None)]);
        assert!(c.is_finished());
    }

    #[test]
    fn sibling_limit_is_bad_request() {
        let mut c = put("a", 2, &[]);
        drain(&mut c);
        c.handle_reply(1, "a", ReplicaReply::Failed { kind: ErrorKind::BadRequest, message: "too many".into() });
        let out = replies(&drain(&mut c));
        assert!(matches!(out[..], [ClientResponse::Error { kind: ErrorKind::BadRequest, .. }]));
        assert!(c.is_finished());
    }

    #[test]
    fn no_node_fills_two_slots() {
        // z is not a target but coordinates a forwarded put; it is also a fallback of the key.
        let plan = PreferenceList { primaries: ids(&["a", "b", "c"]), fallbacks: ids(&["d", "z"]) };
        let op = Operation::Put { w: 2, context: VersionVector::new(), value: Some(b"v".to_vec()), forwarded: true };
        let request = Request { key: b"k".to_vec(), op, timeouts: T, read_all: true };
        let mut c = Coordinator::new(0, "z".into(), request, &plan, |_| true);
        assert_eq!(sends(&drain(&mut c)), vec![("z".into(), None)]);
        c.handle_reply(1, "z", coordinated(&obj(1, b"v")));
        drain(&mut c);
        // Every other target times out: d stands in for one, and z must not take another slot.
        c.handle_timeout(101);
        let mut actions = drain(&mut c);
        c.handle_timeout(202);
        actions.extend(drain(&mut c));
        c.handle_timeout(1000);
        actions.extend(drain(&mut c));
        let targets: Vec<String> = sends(&actions).into_iter().map(|(to, _)| to).collect();
        assert_eq!(targets, vec!["d".to_string()], "z's own copy is one acknowledgement, never two");
        let out = replies(&actions);
        assert!(matches!(out[..], [ClientResponse::Error { kind: ErrorKind::Unavailable, .. }]), "{out:?}");
        let mut counts = std::collections::BTreeMap::new();
        for n in c.slot_nodes() {
            *counts.entry(n.to_string()).or_insert(0) += 1;
        }
        assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    }

    #[test]
    fn a_local_write_that_times_out_may_have_been_applied() {
        let mut c = put("a", 2, &[]);
        drain(&mut c);
        c.handle_timeout(100);
        assert!(replies(&drain(&mut c)).is_empty(), "the local write may still commit");
        c.handle_timeout(1000);
        let out = replies(&drain(&mut c));
        assert!(
            matches!(&out[..], [ClientResponse::Error { kind: ErrorKind::Unavailable, message }] if message.contains("may still have been applied")),
            "{out:?}"
        );
        // An answer that the local write failed says nothing was stored.
        let mut c = put("a", 2, &[]);
        drain(&mut c);
        c.handle_reply(1, "a", ReplicaReply::Failed { kind: ErrorKind::Internal, message: "disk".into() });
        let out = replies(&drain(&mut c));
        assert!(
            matches!(&out[..], [ClientResponse::Error { kind: ErrorKind::Internal, message }] if message.contains("nothing was stored"))
        );
    }

    #[test]
    fn a_slow_local_write_sets_no_timer_before_the_deadline() {
        // Its slot is never replaced, so a timer at its slot deadline would fire again and
        // again with nothing to do until the request's deadline.
        let mut c = put("a", 2, &[]);
        drain(&mut c);
        assert_eq!(c.poll_timeout(), Some(1000));
        c.handle_timeout(1000);
        assert!(c.is_finished() || c.poll_timeout().is_none());
    }

    #[test]
    fn a_replica_that_times_out_is_reported_to_the_failure_detector() {
        let mut c = get(2, &[]);
        drain(&mut c);
        c.handle_timeout(100);
        let actions = drain(&mut c);
        let suspects: Vec<&Action> = actions.iter().filter(|a| matches!(a, Action::Suspect(_))).collect();
        assert_eq!(suspects.len(), 2, "b and c, never the coordinating node itself");
    }

    #[test]
    fn forwarded_and_replica_requests_pass_the_client_checks() {
        let l = RequestLimits { replicas: 3, read_quorum: 2, write_quorum: 2, key_bytes_max: 8, value_bytes_max: 4 };
        assert!(l.forwarded(b"k", VersionVector::new(), Some(vec![0; 5]), 2).is_err());
        assert!(l.forwarded(b"k", VersionVector::new(), Some(vec![0; 4]), 9).is_err());
        assert!(l.forwarded(b"", VersionVector::new(), None, 2).is_err());
        let mut huge = VersionVector::new();
        huge.witness(Actor(1), u64::MAX, 0);
        assert!(l.forwarded(b"k", huge.clone(), None, 2).is_err(), "a crafted counter is refused");
        let coord = ReplicaRequest::Coordinate { key: b"k".to_vec(), context: huge, value: None, hint: None };
        assert!(l.replica(&coord).is_err());
        let bad_hint = ReplicaRequest::Write { key: b"k".to_vec(), object: Object::new(), hint: Some("".into()) };
        assert!(l.replica(&bad_hint).is_err());
        assert!(l.replica(&ReplicaRequest::Read { key: b"k".to_vec() }).is_ok());
    }

    /// A late replica whose Failed answer comes after a spare already took its work over is
    /// not stood in for a second time (found in review: an extra hinted copy, a spare spent).
    #[test]
    fn a_late_replica_that_answers_failed_is_not_stood_in_for_twice() {
        let plan = PreferenceList { primaries: ids(&["a", "b", "c"]), fallbacks: ids(&["d", "e", "f"]) };
        let op = Operation::Put { w: 3, context: VersionVector::new(), value: Some(b"v".to_vec()), forwarded: false };
        let request = Request { key: b"k".to_vec(), op, timeouts: T, read_all: true };
        let mut c = Coordinator::new(0, "a".into(), request, &plan, |_| true);
        drain(&mut c);
        c.handle_reply(1, "a", coordinated(&obj(1, b"v")));
        drain(&mut c);
        c.handle_reply(50, "c", written());
        c.handle_timeout(101);
        assert_eq!(sends(&drain(&mut c)), vec![("d".into(), Some("b".into()))]);
        c.handle_reply(102, "b", ReplicaReply::Failed { kind: ErrorKind::Internal, message: "disk".into() });
        let out = drain(&mut c);
        assert!(sends(&out).is_empty(), "d already stands in for b: {out:?}");
    }

    /// A late forward that answers an internal error starts no third coordination while its
    /// stand-in's forward still runs (found in review: two could apply the write, and the
    /// key would hold the value twice).
    #[test]
    fn a_late_forward_that_fails_starts_no_second_forward() {
        let mut c = put("z", 2, &[]);
        drain(&mut c);
        c.handle_timeout(500);
        let out = drain(&mut c);
        assert!(reads(&out).is_empty());
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::Send { to, request: ReplicaRequest::Forward { .. } } if to == "b")));
        let err = ClientResponse::Error { kind: ErrorKind::Internal, message: "leaving".into() };
        c.handle_reply(600, "a", ReplicaReply::Forwarded(err));
        let out = drain(&mut c);
        let forwards: Vec<&Action> =
            out.iter().filter(|a| matches!(a, Action::Send { request: ReplicaRequest::Forward { .. }, .. })).collect();
        assert!(forwards.is_empty(), "b is still coordinating the put: {out:?}");
    }

    /// A get of R = 2 on a with five primaries and no fallback, reading R of them.
    fn get_r_of_five() -> Coordinator {
        let plan = PreferenceList { primaries: ids(&["a", "b", "c", "d", "e"]), fallbacks: vec![] };
        let request = Request { key: b"k".to_vec(), op: Operation::Get { r: 2 }, timeouts: T, read_all: false };
        Coordinator::new(0, "a".into(), request, &plan, |_| true)
    }

    fn failed() -> ReplicaReply {
        ReplicaReply::Failed { kind: ErrorKind::Internal, message: "disk".into() }
    }

    /// A get reading R replicas gives up only once every target was tried: a failure, a
    /// late replica, a late one that then fails or answers Failed each leave an unread
    /// target to read, and the get replies with R known states.
    #[test]
    fn a_get_of_r_fails_only_once_every_unread_target_was_tried() {
        let o = obj(1, b"x");
        let mut c = get_r_of_five();
        assert_eq!(reads(&drain(&mut c)), vec![("a".into(), true), ("b".into(), false)]);
        c.handle_reply(1, "b", failed());
        assert_eq!(reads(&drain(&mut c)), vec![("c".into(), false)]);
        // a (since 0) is late: d takes over in full; c (since 1) not yet.
        c.handle_timeout(100);
        let out = drain(&mut c);
        assert_eq!(reads(&out), vec![("d".into(), true)]);
        c.handle_timeout(101);
        assert_eq!(reads(&drain(&mut c)), vec![("e".into(), false)]);
        // The late ones fail: their stand-ins are already out, nothing fails the get.
        c.handle_reply(102, "a", failed());
        c.handle_failure(103, "c");
        assert!(replies(&drain(&mut c)).is_empty());
        assert_eq!(c.poll_timeout(), Some(200));
        c.handle_reply(104, "d", read(Some(o.clone())));
        assert!(replies(&drain(&mut c)).is_empty(), "one state known of R = 2");
        c.handle_reply(105, "e", digest(Some(&o)));
        let out = drain(&mut c);
        assert!(matches!(&replies(&out)[..], [ClientResponse::Values { values, .. }] if values.len() == 1), "{out:?}");
        assert!(c.is_finished() && c.poll_timeout().is_none());
        // With every target and spare used, the get fails as soon as R cannot be reached.
        let mut c = get_r(2, &["d", "e"]);
        drain(&mut c);
        c.handle_failure(1, "b");
        assert_eq!(reads(&drain(&mut c)), vec![("c".into(), false)]);
        assert!(replies(&drain(&mut c)).is_empty());
        c.handle_failure(2, "c");
        assert!(matches!(&replies(&drain(&mut c))[..], [ClientResponse::Error { kind: ErrorKind::Unavailable, .. }]));
        assert!(c.is_finished());
    }

    /// After the reply, a stand-in that fails is replaced by an unread target, which the get
    /// then waits for (and repairs if stale) before it ends; it never hangs past its deadline.
    #[test]
    fn after_the_reply_an_unread_target_stands_in_and_the_get_still_ends() {
        let (x, y) = (obj(1, b"x"), obj(2, b"y"));
        let mut c = get_r_of_five();
        drain(&mut c);
        c.handle_reply(1, "a", read(Some(x.clone())));
        c.handle_timeout(100);
        assert_eq!(reads(&drain(&mut c)), vec![("c".into(), false)]);
        c.handle_reply(101, "b", digest(Some(&x)));
        assert!(matches!(&replies(&drain(&mut c))[..], [ClientResponse::Values { .. }]));
        assert!(!c.is_finished(), "c is still read");
        c.handle_failure(102, "c");
        assert_eq!(reads(&drain(&mut c)), vec![("d".into(), false)]);
        c.handle_reply(103, "d", digest(Some(&y)));
        assert_eq!(reads(&drain(&mut c)), vec![("d".into(), true)]);
        c.handle_reply(104, "d", read(Some(y.clone())));
        // a, b and d hold one write each side: all three get the merged state; e, unread, not.
        assert_eq!(sends(&drain(&mut c)), vec![("a".into(), None), ("b".into(), None), ("d".into(), None)]);
        assert!(c.is_finished());
        // A stand-in that never answers ends at the deadline.
        let mut c = get_r_of_five();
        drain(&mut c);
        c.handle_reply(1, "a", read(Some(x.clone())));
        c.handle_timeout(100);
        c.handle_reply(101, "b", digest(Some(&x)));
        drain(&mut c);
        let mut t = 101;
        for _ in 0..16 {
            let Some(next) = c.poll_timeout() else { break };
            assert!(next > t || next == T.deadline_ms, "timer moves on: {next} after {t}");
            t = next;
            c.handle_timeout(t);
            drain(&mut c);
        }
        assert!(t <= T.deadline_ms && c.is_finished());
    }

    /// A get's reply from one full answer or from several merged, under last-write-wins and
    /// for a tombstone-only state: the newest value (or none) and the merged clock.
    #[test]
    fn get_replies_from_one_or_several_full_answers_in_every_resolution() {
        let lww = crate::namespace::prefix_of("t", 3, Resolution::Lww).unwrap();
        let lww_key = [lww.as_slice(), b"k"].concat();
        let (x, y) = (obj(1, b"x"), {
            let mut o = Object::new();
            o.update(&VersionVector::new(), Actor(2), Some(b"y".to_vec()), 20, 10);
            o
        });
        let mut tomb = Object::new();
        tomb.update(&VersionVector::new(), Actor(3), None, 5, 10);
        let values = |out: &[Action]| match &replies(out)[..] {
            [ClientResponse::Values { values, context }] => {
                (values.iter().map(|v| v.to_vec()).collect::<Vec<_>>(), context.clone())
            }
            other => panic!("{other:?}"),
        };
        let ctx = |o: &Object| Some(o.clock().encode_context_from(Some("a")));
        for (key, several) in [(b"k".to_vec(), vec![b"x".to_vec(), b"y".to_vec()]), (lww_key, vec![b"y".to_vec()])] {
            // A get of `key` on a that reads R = 2 replicas, its reads sent.
            let get = || {
                let request = Request { key: key.clone(), op: Operation::Get { r: 2 }, timeouts: T, read_all: false };
                let mut c = Coordinator::new(0, "a".into(), request, &plan(), |_| true);
                drain(&mut c);
                c
            };
            // One full answer, a matching digest.
            let mut c = get();
            c.handle_reply(1, "a", read(Some(y.clone())));
            c.handle_reply(2, "b", digest(Some(&y)));
            assert_eq!(values(&drain(&mut c)), (vec![b"y".to_vec()], ctx(&y)));
            // Two full answers merged.
            let mut c = get();
            c.handle_reply(1, "a", read(Some(x.clone())));
            c.handle_reply(2, "b", digest(Some(&y)));
            drain(&mut c);
            c.handle_reply(3, "b", read(Some(y.clone())));
            assert_eq!(values(&drain(&mut c)), (several, ctx(&x.merge(&y))));
            // A tombstone alone, and merged with nothing.
            let mut c = get();
            c.handle_reply(1, "a", read(Some(tomb.clone())));
            c.handle_reply(2, "b", read(None));
            assert_eq!(values(&drain(&mut c)), (vec![], ctx(&tomb)));
        }
    }
}
