//! The request coordinator (Dynamo §4.5, §4.6, §5): one state machine per client request,
//! on the node that received it, in the style of riak_kv's get/put FSMs.
//!
//! Targets are the first N *healthy* nodes of the key's preference list (sloppy quorum): an
//! unreachable primary is replaced by the next fallback, and the replica sent there carries
//! a hint naming the primary it stands in for. A replica that fails or times out is replaced
//! the same way. A get waits for R answers, replies with every concurrent value merged, then
//! waits briefly for the other replicas and sends the merged state to any that were stale
//! (read repair). A put is coordinated on a replica: that replica applies the write under a
//! new version (so it must hold the key's state) and the result goes to the other targets;
//! the client hears back after W durable acknowledgements, the coordinating replica's own
//! included. A node outside the targets forwards the put to one inside.
//!
//! Inputs: [`Coordinator::handle_reply`], [`Coordinator::handle_failure`],
//! [`Coordinator::handle_timeout`], each with the current time. Outputs:
//! [`Coordinator::poll_action`] and [`Coordinator::poll_timeout`].

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::replica::{ReplicaError, ReplicaOp, ReplicaOutcome};
use crate::ring::{NodeId, PreferenceList};
use crate::version::{Actor, Object, VersionVector};
use crate::wire::{ClientResponse, ErrorKind};

/// What a coordinator asks a replica to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaRequest {
    Read {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    Write {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        object: Object,
        hint: Option<NodeId>,
    },
    Coordinate {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        context: VersionVector,
        #[serde(with = "serde_bytes")]
        value: Option<Vec<u8>>,
        hint: Option<NodeId>,
    },
    /// Run a whole put here: sent by a node that is not among the key's targets.
    Forward {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        context: VersionVector,
        #[serde(with = "serde_bytes")]
        value: Option<Vec<u8>>,
        w: u8,
    },
}

impl ReplicaRequest {
    /// The storage operation a replica runs for this request, issuing any new dot from
    /// `actor` at `now_ms`; None for `Forward`, which runs a whole put instead.
    pub fn into_op(self, actor: Actor, now_ms: u64) -> Option<ReplicaOp> {
        match self {
            ReplicaRequest::Read { key } => Some(ReplicaOp::Read { key }),
            ReplicaRequest::Write { key, object, hint } => Some(ReplicaOp::Write { key, object, hint }),
            ReplicaRequest::Coordinate { key, context, value, hint } => {
                Some(ReplicaOp::Coordinate { key, context, value, hint, actor, now_ms })
            }
            ReplicaRequest::Forward { .. } => None,
        }
    }
}

/// A replica's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaReply {
    Outcome(ReplicaOutcome),
    /// The answer to a forwarded put.
    Forwarded(ClientResponse),
}

/// Something the coordinator wants done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send a request to a replica (possibly this node itself); its answer comes back through
    /// `handle_reply` under the coordinator's id, a failure through `handle_failure`.
    Send { to: NodeId, request: ReplicaRequest },
    /// Answer the client. Happens exactly once.
    Reply(ClientResponse),
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

/// What a node accepts from a client (from its config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// N: quorum overrides must be in 1..=N.
    pub replicas: usize,
    pub read_quorum: usize,
    pub write_quorum: usize,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
}

impl RequestLimits {
    fn key(&self, key: &[u8]) -> Result<(), String> {
        if key.is_empty() {
            return Err("the key is empty".into());
        }
        if key.len() > self.max_key_bytes {
            return Err(format!("the key is over limits.max_key_bytes ({})", self.max_key_bytes));
        }
        Ok(())
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
        if let Some(v) = &value {
            if v.len() > self.max_value_bytes {
                return Err(format!(
                    "the value is {} bytes, over limits.max_value_bytes ({}); nothing was stored",
                    v.len(),
                    self.max_value_bytes
                ));
            }
        }
        let w = self.quorum(w, self.write_quorum, "w")?;
        let context = match context {
            None => VersionVector::new(),
            Some(text) => VersionVector::decode_context(text, now_ms).map_err(|e| e.to_string())?,
        };
        Ok(Operation::Put { w, context, value, forwarded: false })
    }
}

/// One client request: the key, what to do, and its timing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub key: Vec<u8>,
    pub op: Operation,
    pub timeouts: Timeouts,
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
    Answered,
    Failed,
}

#[derive(Clone, Debug)]
struct Slot {
    node: NodeId,
    /// The primary this node stands in for, when it is a fallback.
    hint: Option<NodeId>,
    state: SlotState,
    /// For gets: what the replica returned.
    object: Option<Object>,
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

/// One request's state machine.
#[derive(Debug)]
pub struct Coordinator {
    me: NodeId,
    key: Vec<u8>,
    op: Operation,
    timeouts: Timeouts,
    slots: Vec<Slot>,
    /// Fallbacks not yet used, in preference order.
    spare: VecDeque<NodeId>,
    /// Put: the object the coordinating replica produced.
    object: Option<Object>,
    phase: Phase,
    outbox: VecDeque<Action>,
    /// The node that answered a get first (§6.4: a later put may prefer it).
    pub fastest: Option<NodeId>,
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
        let Request { key, op, timeouts } = request;
        let mut spare: VecDeque<NodeId> = plan.fallbacks.iter().filter(|f| reachable(f)).cloned().collect();
        let mut slots = Vec::with_capacity(plan.primaries.len());
        let mut missing = Vec::new();
        for p in &plan.primaries {
            if reachable(p) {
                slots.push(Slot { node: p.clone(), hint: None, state: SlotState::Idle, object: None });
            } else {
                missing.push(p.clone());
            }
        }
        for p in missing {
            if let Some(f) = spare.pop_front() {
                slots.push(Slot { node: f, hint: Some(p), state: SlotState::Idle, object: None });
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
        if self.slots.len() < self.quorum() && !self.can_replace() {
            self.fail(ErrorKind::Unavailable, "not enough reachable replicas for the quorum");
            return;
        }
        let forwarded = match self.op {
            Operation::Get { .. } => None,
            Operation::Put { forwarded, .. } => Some(forwarded),
        };
        match forwarded {
            None => {
                for i in 0..self.slots.len() {
                    self.send_read(i, now_ms);
                }
            }
            Some(forwarded) => {
                match self.slots.iter().position(|s| s.node == self.me) {
                    Some(i) => self.send_coordinate(i, now_ms),
                    None if forwarded => {
                        // Coordinate here anyway, standing in as an extra replica.
                        self.slots.insert(
                            0,
                            Slot { node: self.me.clone(), hint: None, state: SlotState::Idle, object: None },
                        );
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

    fn can_replace(&self) -> bool {
        !self.spare.is_empty()
    }

    fn send_read(&mut self, i: usize, now_ms: u64) {
        self.slots[i].state = SlotState::Waiting { since_ms: now_ms };
        let to = self.slots[i].node.clone();
        self.outbox.push_back(Action::Send { to, request: ReplicaRequest::Read { key: self.key.clone() } });
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
            w: *w as u8,
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

    fn slot_of(&self, from: &str) -> Option<usize> {
        self.slots.iter().position(|s| s.node == from && matches!(s.state, SlotState::Waiting { .. }))
    }

    /// A replica answered.
    pub fn handle_reply(&mut self, now_ms: u64, from: &str, reply: ReplicaReply) {
        let Some(i) = self.slot_of(from) else { return };
        match (reply, self.phase.clone()) {
            (ReplicaReply::Forwarded(response), Phase::Forwarding) => {
                self.slots[i].state = SlotState::Answered;
                match &response {
                    ClientResponse::Error { kind: ErrorKind::Internal, .. } => self.replace(i, now_ms),
                    _ => {
                        self.reply(response);
                        self.phase = Phase::Finished;
                    }
                }
            }
            (ReplicaReply::Outcome(ReplicaOutcome::Read(object)), Phase::Started | Phase::Replied) => {
                self.slots[i].state = SlotState::Answered;
                self.slots[i].object = object;
                self.fastest.get_or_insert_with(|| from.to_string());
                self.after_read(now_ms);
            }
            (ReplicaReply::Outcome(ReplicaOutcome::Coordinated(result)), Phase::Started) => match result {
                Ok(object) => {
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
                Err(ReplicaError::TooManySiblings(n)) => {
                    self.fail(ErrorKind::BadRequest, &ReplicaError::TooManySiblings(n).to_string());
                }
            },
            (ReplicaReply::Outcome(ReplicaOutcome::Written { .. }), Phase::Replicating | Phase::Replied) => {
                self.slots[i].state = SlotState::Answered;
                self.after_write();
            }
            _ => {}
        }
    }

    /// A replica could not be reached or refused: try the next fallback in its place.
    pub fn handle_failure(&mut self, now_ms: u64, from: &str) {
        if let Some(i) = self.slot_of(from) {
            self.replace(i, now_ms);
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
                _ => self.fail(ErrorKind::Unavailable, "the quorum did not answer in time"),
            }
            self.phase = Phase::Finished;
            return;
        }
        let late: Vec<usize> = (0..self.slots.len())
            .filter(|&i| matches!(self.slots[i].state, SlotState::Waiting { since_ms } if now_ms >= self.slot_deadline(since_ms)))
            .collect();
        for i in late {
            self.replace(i, now_ms);
        }
    }

    /// When a slot that has waited since `since_ms` counts as failed. A forwarded put runs a
    /// whole put remotely (which may itself wait out a replica), so it gets half of what is
    /// left of the request's time, leaving the other half for one retry elsewhere.
    fn slot_deadline(&self, since_ms: u64) -> u64 {
        let wait = match self.phase {
            Phase::Forwarding => self.timeouts.replica_ms.max(self.timeouts.deadline_ms.saturating_sub(since_ms) / 2),
            _ => self.timeouts.replica_ms,
        };
        since_ms + wait
    }

    /// Slot `i` failed: mark it and send its work to the next spare node.
    fn replace(&mut self, i: usize, now_ms: u64) {
        self.slots[i].state = SlotState::Failed;
        if self.slots[i].node == self.me && self.phase == Phase::Started && matches!(self.op, Operation::Put { .. }) {
            // The local write failed: nothing was stored, so nothing can be acknowledged.
            self.fail(ErrorKind::Internal, "the local replica could not apply the write");
            return;
        }
        if self.phase == Phase::Forwarding {
            // Forward to the next chosen target before any fallback.
            if let Some(j) = self.slots.iter().position(|s| s.state == SlotState::Idle) {
                self.send_forward(j, now_ms);
                return;
            }
        }
        let Some(next) = self.spare.pop_front() else {
            self.check_hopeless();
            return;
        };
        let hint = self.slots[i].hint.clone().or_else(|| Some(self.slots[i].node.clone()));
        self.slots.push(Slot { node: next, hint, state: SlotState::Idle, object: None });
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
            return;
        }
        if self.answered() + self.waiting() < self.quorum() || (self.phase == Phase::Forwarding && self.waiting() == 0)
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
        self.slots
            .iter()
            .filter(|s| s.state == SlotState::Answered)
            .filter_map(|s| s.object.as_ref())
            .fold(None, |acc: Option<Object>, o| Some(acc.map_or_else(|| o.clone(), |a| a.merge(o))))
    }

    fn after_read(&mut self, _now_ms: u64) {
        if self.phase == Phase::Started && self.answered() >= self.quorum() {
            let merged = self.merged();
            let response = match &merged {
                Some(o) => ClientResponse::Values {
                    values: o.values().map(|v| serde_bytes::ByteBuf::from(v.to_vec())).collect(),
                    context: (!o.clock().is_empty()).then(|| o.context().encode_context()),
                },
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
        let Some(merged) = self.merged() else { return };
        let stale: Vec<(NodeId, Option<NodeId>)> = self
            .slots
            .iter()
            .filter(|s| s.state == SlotState::Answered)
            .filter(|s| s.object.as_ref().is_none_or(|o| !o.descends(&merged)))
            .map(|s| (s.node.clone(), s.hint.clone()))
            .collect();
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
        let replica = self
            .slots
            .iter()
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

    pub fn key(&self) -> &[u8] {
        &self.key
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
        let down = ids(down);
        let request = Request { key: b"k".to_vec(), op, timeouts: T };
        Coordinator::new(0, me.into(), request, &plan(), |n| !down.iter().any(|d| d == n))
    }

    fn put(me: &str, w: usize, down: &[&str]) -> Coordinator {
        let op = Operation::Put { w, context: VersionVector::new(), value: Some(b"v".to_vec()), forwarded: false };
        start(me, op, down)
    }

    fn get(r: usize, down: &[&str]) -> Coordinator {
        start("a", Operation::Get { r }, down)
    }

    fn replies(actions: &[Action]) -> Vec<ClientResponse> {
        actions.iter().filter_map(|a| if let Action::Reply(r) = a { Some(r.clone()) } else { None }).collect()
    }

    fn written() -> ReplicaReply {
        ReplicaReply::Outcome(ReplicaOutcome::Written { changed: true })
    }

    fn coordinated(o: &Object) -> ReplicaReply {
        ReplicaReply::Outcome(ReplicaOutcome::Coordinated(Ok(o.clone())))
    }

    /// Table of write quorums: (W, acks from other replicas, whether the client hears "written").
    #[test]
    fn client_requests_are_checked() {
        let l = RequestLimits { replicas: 3, read_quorum: 2, write_quorum: 2, max_key_bytes: 8, max_value_bytes: 4 };
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
    fn unreachable_primary_is_replaced_by_hinted_fallback() {
        let mut c = put("a", 2, &["b"]);
        drain(&mut c);
        c.handle_reply(1, "a", coordinated(&obj(1, b"v")));
        let s = sends(&drain(&mut c));
        assert_eq!(s, vec![("c".into(), None), ("d".into(), Some("b".into()))]);
    }

    #[test]
    fn timed_out_replica_is_replaced_and_late_reply_ignored() {
        let mut c = put("a", 3, &[]);
        drain(&mut c);
        c.handle_reply(1, "a", coordinated(&obj(1, b"v")));
        drain(&mut c);
        c.handle_reply(2, "b", written());
        assert_eq!(c.poll_timeout(), Some(101));
        c.handle_timeout(101);
        assert_eq!(sends(&drain(&mut c)), vec![("d".into(), Some("c".into()))]);
        c.handle_reply(102, "c", written()); // too late: c's slot failed
        assert!(replies(&drain(&mut c)).is_empty());
        c.handle_reply(103, "d", written());
        assert!(matches!(replies(&drain(&mut c))[..], [ClientResponse::Written { .. }]));
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
        let a = drain(&mut c);
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
        ReplicaReply::Outcome(ReplicaOutcome::Read(o))
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
        let mut older = Object::new();
        older.update(&VersionVector::new(), Actor(7), Some(b"old".to_vec()), 0, 10);
        c.handle_reply(3, "c", read(Some(older)));
        let repairs = drain(&mut c);
        // a and c each had one of the two siblings and b had nothing: all get the merged state.
        assert_eq!(sends(&repairs), vec![("a".into(), None), ("b".into(), None), ("c".into(), None)]);
        assert!(c.is_finished());
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
        c.handle_reply(
            1,
            "a",
            ReplicaReply::Outcome(ReplicaOutcome::Coordinated(Err(ReplicaError::TooManySiblings(100)))),
        );
        let out = replies(&drain(&mut c));
        assert!(matches!(out[..], [ClientResponse::Error { kind: ErrorKind::BadRequest, .. }]));
        assert!(c.is_finished());
    }
}
