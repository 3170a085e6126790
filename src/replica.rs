//! The replica stage (Dynamo §4.5-4.6): what a node does when another node asks it about
//! its own copies. It answers coordinators' reads, writes and coordinated writes, merges
//! handoff and transfer batches durably before acknowledging them, takes part in tombstone
//! reaping, and answers the admin questions about local data (`admin partitions`,
//! `admin hints`) and fault injection.
//!
//! Every request is checked first ([`crate::coordinator::RequestLimits::replica`], the
//! checks a client's request gets) and only peers (connections that authenticated as a
//! node) are served node-to-node requests. The work itself is a storage operation
//! ([`crate::store`]); the answer goes out once its batch committed.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::json;

use crate::admission::WaitSamples;
use crate::coordinator::{replica_reply, store_op, RequestLimits};
use crate::membership::View;
use crate::ring::NodeId;
use crate::stage::{ConnId, Dest, Effect, Ids, Input, Now, Origin, Signal, Stage, StageId};
use crate::store::{StoreError, StoreOp, StoreOutcome};
use crate::wire::{ClientRequest, ClientResponse, ErrorKind, Message, ReapStep, ReplicaReply};

/// How the replica stage is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaSettings {
    pub me: NodeId,
    pub limits: RequestLimits,
    /// `testing.fault_injection`: whether `admin fault` may block peers.
    pub fault_injection: bool,
}

/// What answers a storage result.
#[derive(Clone, Debug)]
enum Answer {
    Replica { conn: ConnId, id: u64 },
    Handoff { conn: ConnId, id: u64 },
    Reap { conn: ConnId, id: u64 },
    Partitions { conn: ConnId, id: u64 },
    Hints { conn: ConnId, id: u64 },
}

/// The replica stage.
pub struct ReplicaStage {
    settings: ReplicaSettings,
    view: Option<Arc<View>>,
    waiting: BTreeMap<u64, Answer>,
    /// When each coordinator's request went to storage, for admission's feedback.
    issued_ms: BTreeMap<u64, u64>,
    waits: WaitSamples,
    ids: Ids,
    effects: VecDeque<Effect>,
    /// Requests from other nodes taken, by kind ([`ReplicaStage::count`]).
    taken: BTreeMap<&'static str, u64>,
    /// Anti-entropy exchanges this node started and completed, by partition and peer (from
    /// [`Signal::Exchanged`]), for `admin partitions`.
    exchanges: BTreeMap<(u32, NodeId), Exchanged>,
}

/// A partition's exchanges with one peer, as `admin partitions` shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Exchanged {
    /// When the last one completed (wall ms).
    last_wall_ms: u64,
    /// Keys repaired (sent and received) by the last one, and by all since the node started.
    last_keys: u64,
    keys: u64,
}

fn document(v: serde_json::Value) -> ClientResponse {
    ClientResponse::Document { json: v.to_string() }
}

fn error(kind: ErrorKind, message: impl Into<String>) -> ClientResponse {
    ClientResponse::Error { kind, message: message.into() }
}

impl ReplicaStage {
    pub fn new(settings: ReplicaSettings) -> Self {
        ReplicaStage {
            settings,
            view: None,
            waiting: BTreeMap::new(),
            issued_ms: BTreeMap::new(),
            waits: WaitSamples::default(),
            ids: Ids::default(),
            effects: VecDeque::new(),
            taken: BTreeMap::new(),
            exchanges: BTreeMap::new(),
        }
    }

    /// Count a request from another node: `read`, `write` or `coordinate` (a coordinator's),
    /// `handoff` (a batch of hints or transferred keys) or `reap`.
    fn count(&mut self, kind: &'static str) {
        let n = self.taken.entry(kind).or_default();
        *n = n.saturating_add(1);
    }

    fn leaving(&self) -> bool {
        use crate::membership::MemberState;
        matches!(self.view.as_ref().and_then(|v| v.my_state()), Some(MemberState::Leaving | MemberState::Left))
    }

    fn store(&mut self, op: StoreOp, durable: bool, answer: Answer) -> u64 {
        let token = self.ids.issue();
        self.waiting.insert(token, answer);
        self.effects.push_back(Effect::Store { token, op, durable });
        token
    }

    fn send(&mut self, conn: ConnId, msg: Message) {
        self.effects.push_back(Effect::Send { to: Dest::Conn(conn), msg });
    }

    fn client(&mut self, conn: ConnId, id: u64, response: ClientResponse) {
        self.send(conn, Message::ClientReply { id, response, epoch: 0 });
    }

    fn handle_message(&mut self, now: Now, from: Origin, msg: Message) {
        let conn = from.conn;
        let from_node = from.node.is_some();
        match msg {
            Message::Replica { id, request } => {
                self.count(match request {
                    crate::wire::ReplicaRequest::Read { .. } => "read",
                    crate::wire::ReplicaRequest::ReadDigest { .. } => "digest",
                    crate::wire::ReplicaRequest::Write { .. } => "write",
                    crate::wire::ReplicaRequest::Coordinate { .. } => "coordinate",
                    crate::wire::ReplicaRequest::Forward { .. } => "forward",
                });
                if !from_node {
                    let reply = ReplicaReply::Failed {
                        kind: ErrorKind::Refused,
                        message: "only nodes send replica requests".into(),
                    };
                    return self.send(conn, Message::ReplicaReply { id, reply });
                }
                let writes = !matches!(
                    request,
                    crate::wire::ReplicaRequest::Read { .. } | crate::wire::ReplicaRequest::ReadDigest { .. }
                );
                if writes && self.leaving() {
                    // A leaving node takes no new data: the coordinator picks another replica,
                    // so nothing acknowledged is left behind when it goes.
                    let message = "this node is leaving the cluster".to_string();
                    let reply = ReplicaReply::Failed { kind: ErrorKind::Unavailable, message };
                    return self.send(conn, Message::ReplicaReply { id, reply });
                }
                if let Err(message) = self.settings.limits.replica(&request) {
                    let reply = ReplicaReply::Failed { kind: ErrorKind::BadRequest, message };
                    return self.send(conn, Message::ReplicaReply { id, reply });
                }
                // A coordinated write is stamped with the time this replica took it.
                let op = store_op(request, now.wall_ms);
                match op {
                    Some(op) => {
                        let durable = crate::coordinator::durable_writer(&op);
                        let token = self.store(op, durable, Answer::Replica { conn, id });
                        self.issued_ms.insert(token, now.mono_ms);
                    }
                    None => {
                        let reply = ReplicaReply::Failed {
                            kind: ErrorKind::BadRequest,
                            message: "not a replica request".into(),
                        };
                        self.send(conn, Message::ReplicaReply { id, reply });
                    }
                }
            }
            Message::Handoff { id, objects } => {
                self.count("handoff");
                let keys_ok = objects.iter().all(|(k, _)| {
                    let user = k.len().saturating_sub(crate::namespace::class_of(k).prefix.len());
                    user > 0 && user <= self.settings.limits.key_bytes_max
                });
                // A leaving node takes no hints or transfers: it may already count itself left
                // and be stopped with them (its peers may not know yet); the sender keeps
                // them and sends them on to the key's replicas once it hears of the leave
                // (sim seed 2367 with signed records).
                if !from_node || !keys_ok || self.leaving() {
                    return self.send(conn, Message::HandoffAck { id, ok: false });
                }
                let objects = objects.into_iter().map(|(k, o)| (k.into_vec(), o)).collect();
                // Durable whatever the node's mode: the sender deletes its copy on our ack.
                self.store(StoreOp::Merge { objects }, true, Answer::Handoff { conn, id });
            }
            Message::Reap { id, step } => {
                self.count("reap");
                if !from_node {
                    return self.send(conn, Message::ReapReply { id, yes: false });
                }
                let op = match step {
                    ReapStep::Check { key, digest } => StoreOp::ReapCheck { key, digest },
                    ReapStep::Remove { key, digest } => StoreOp::ReapRemove { key, digest },
                };
                self.store(op, false, Answer::Reap { conn, id });
            }
            Message::Client { id, request: ClientRequest::Partitions } => {
                let Some(ring) = self.view.as_ref().and_then(|v| v.ring.clone()) else {
                    return self.client(
                        conn,
                        id,
                        error(ErrorKind::Unavailable, "this node has not joined a cluster yet"),
                    );
                };
                let partitions = ring.replicated_by(&self.settings.me, self.settings.limits.replicas);
                self.store(StoreOp::Summaries { partitions }, false, Answer::Partitions { conn, id });
            }
            Message::Client { id, request: ClientRequest::Hints } => {
                self.store(StoreOp::Inventory, false, Answer::Hints { conn, id });
            }
            Message::Client { id, request: ClientRequest::FaultBlock { .. } | ClientRequest::FaultUnblock }
                if !self.settings.fault_injection =>
            {
                let e = "fault injection is off on this node (testing.fault_injection = false)";
                self.client(conn, id, error(ErrorKind::Refused, e));
            }
            Message::Client { id, request: ClientRequest::FaultBlock { peers } } => {
                tracing::warn!(?peers, "fault injection: blocking traffic");
                self.effects.push_back(Effect::Block(Some(peers.clone())));
                self.client(conn, id, document(json!({"node": self.settings.me, "blocked": peers})));
            }
            Message::Client { id, request: ClientRequest::FaultUnblock } => {
                tracing::warn!("fault injection: unblocking all traffic");
                self.effects.push_back(Effect::Block(None));
                self.client(conn, id, document(json!({"node": self.settings.me, "blocked": []})));
            }
            _ => {}
        }
    }

    /// A partition's exchanges, by peer, for `admin partitions`.
    fn exchanges_of(&self, partition: u32, now_wall_ms: u64) -> Vec<serde_json::Value> {
        self.exchanges
            .range((partition, NodeId::new())..)
            .take_while(|((p, _), _)| *p == partition)
            .map(|((_, peer), x)| {
                json!({
                    "peer": peer,
                    "last_completed_ms_ago": now_wall_ms.saturating_sub(x.last_wall_ms),
                    "keys_repaired": x.keys,
                    "last_keys_repaired": x.last_keys,
                })
            })
            .collect()
    }

    fn handle_stored(&mut self, now: Now, token: u64, result: Result<StoreOutcome, StoreError>) {
        let Some(answer) = self.waiting.remove(&token) else { return };
        if let Err(e) = &result {
            tracing::warn!(error = %e, "storage operation failed");
        }
        match answer {
            Answer::Replica { conn, id } => {
                self.send(conn, Message::ReplicaReply { id, reply: replica_reply(result) });
            }
            Answer::Handoff { conn, id } => {
                let ok = matches!(result, Ok(StoreOutcome::Merged { .. }));
                self.send(conn, Message::HandoffAck { id, ok });
            }
            Answer::Reap { conn, id } => {
                let yes = matches!(result, Ok(StoreOutcome::Reaped { yes: true }));
                self.send(conn, Message::ReapReply { id, yes });
            }
            Answer::Partitions { conn, id } => {
                let response = match result {
                    Ok(StoreOutcome::Summaries(ps)) => {
                        let list: Vec<serde_json::Value> = ps
                            .into_iter()
                            .map(|s| {
                                let exchanges = self.exchanges_of(s.partition, now.wall_ms);
                                let mut part = json!({
                                    "partition": s.partition,
                                    "keys": s.keys,
                                    "merkle_root": s.root,
                                    "exchanges": exchanges,
                                });
                                if !s.namespaces.is_empty() {
                                    let others: Vec<serde_json::Value> = s
                                        .namespaces
                                        .into_iter()
                                        .map(|(name, keys, root)| json!({"name": name, "keys": keys, "merkle_root": root}))
                                        .collect();
                                    part["namespaces"] = json!(others);
                                }
                                part
                            })
                            .collect();
                        document(json!({"node": self.settings.me, "partitions": list}))
                    }
                    other => error(ErrorKind::Internal, format!("storage: {other:?}")),
                };
                self.client(conn, id, response);
            }
            Answer::Hints { conn, id } => {
                let response = match result {
                    Ok(StoreOutcome::Inventory { hints, .. }) => {
                        let list: Vec<serde_json::Value> =
                            hints.into_iter().map(|(n, count)| json!({"for": n, "count": count})).collect();
                        document(json!({"node": self.settings.me, "hints": list}))
                    }
                    other => error(ErrorKind::Internal, format!("storage: {other:?}")),
                };
                self.client(conn, id, response);
            }
        }
    }
}

impl Stage for ReplicaStage {
    fn id(&self) -> StageId {
        StageId::Replica
    }

    fn handle(&mut self, now: Now, input: Input) {
        match input {
            // Only a coordinator replicates ahead of a commit.
            Input::Ahead { .. } => {}
            Input::Message { from, msg } => self.handle_message(now, from, msg),
            Input::Stored { token, result } => {
                if let Some(issued) = self.issued_ms.remove(&token) {
                    self.waits.storage(now.mono_ms, now.mono_ms.saturating_sub(issued));
                }
                self.handle_stored(now, token, result)
            }
            Input::Signal(Signal::View(v)) => self.view = Some(v),
            Input::Signal(Signal::Exchanged { partition, peer, wall_ms, keys }) => {
                let x = self.exchanges.entry((partition, peer)).or_default();
                x.last_wall_ms = x.last_wall_ms.max(wall_ms);
                x.last_keys = keys;
                x.keys = x.keys.saturating_add(keys);
            }
            Input::Signal(_) | Input::Tick { .. } => {}
        }
        if let Some(waited) = self.waits.take_due(now.mono_ms) {
            self.effects.push_back(Effect::Signal(waited));
        }
    }

    fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    fn poll_timeout(&self) -> Option<u64> {
        self.waits.due_at()
    }

    fn report(&self, out: &mut crate::metrics::Report) {
        const HELP: &str = "Requests other nodes sent this node as a replica, by kind (read: in full, digest: a \
                            get's digest read, write, coordinate: a coordinator's; handoff: a batch of hints or \
                            transferred keys; reap)";
        for kind in ["read", "digest", "write", "coordinate", "handoff", "reap"] {
            let n = self.taken.get(kind).copied().unwrap_or(0);
            out.counter("ringkv_replica_requests", HELP, &[("kind", kind)], n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::{Actor, Object, VersionVector};
    use crate::wire::Bytes;

    fn stage() -> ReplicaStage {
        let limits =
            RequestLimits { replicas: 3, read_quorum: 2, write_quorum: 2, key_bytes_max: 64, value_bytes_max: 1024 };
        ReplicaStage::new(ReplicaSettings { me: "n1".into(), limits, fault_injection: false })
    }

    fn now() -> Now {
        Now { mono_ms: 1, wall_ms: 1 }
    }

    fn peer() -> Origin {
        Origin::node(7, "n2".into())
    }

    #[test]
    fn a_handoff_batch_is_merged_durably_whatever_the_mode_and_acked_after() {
        let mut s = stage();
        let mut o = Object::new();
        o.update(&VersionVector::new(), Actor(1), Some(b"v".to_vec()), 1, 10);
        s.handle(
            now(),
            Input::Message {
                from: peer(),
                msg: Message::Handoff { id: 3, objects: vec![(Bytes::from(b"k".to_vec()), o)] },
            },
        );
        let token = match s.poll_effect() {
            Some(Effect::Store { token, op: StoreOp::Merge { .. }, durable: true }) => token,
            other => panic!("{other:?}"),
        };
        assert!(s.poll_effect().is_none(), "no ack before the merge committed");
        s.handle(now(), Input::Stored { token, result: Ok(StoreOutcome::Merged { changed: 1, reaped: vec![] }) });
        assert_eq!(
            s.poll_effect(),
            Some(Effect::Send { to: Dest::Conn(7), msg: Message::HandoffAck { id: 3, ok: true } })
        );
    }

    #[test]
    fn admin_partitions_joins_in_each_partitions_exchanges_by_peer() {
        use crate::membership::{ring_of, test_member, Member, MemberState, View};
        let mut s = stage();
        let members: Vec<Member> = (1..=3).map(|i| test_member(&format!("n{i}"), i, MemberState::Up)).collect();
        let ring = ring_of(&members, 8, 3).unwrap();
        let view =
            View { me: "n1".into(), members, ring: Some(Arc::new(ring)), epoch: 1, namespaces: Default::default() };
        s.handle(now(), Input::Signal(Signal::View(Arc::new(view))));
        let exchanged = |peer: &str, wall_ms, keys| {
            Input::Signal(Signal::Exchanged { partition: 2, peer: peer.into(), wall_ms, keys })
        };
        s.handle(now(), exchanged("n2", 1000, 5));
        s.handle(now(), exchanged("n2", 3000, 0));
        s.handle(now(), exchanged("n3", 2000, 1));
        let at = Now { mono_ms: 5, wall_ms: 4000 };
        let msg = Message::Client { id: 6, request: ClientRequest::Partitions };
        s.handle(at, Input::Message { from: Origin::client(9, crate::access::Role::Admin), msg });
        let token = match s.poll_effect() {
            Some(Effect::Store { token, op: StoreOp::Summaries { partitions }, .. }) if partitions.len() == 8 => token,
            other => panic!("{other:?}"),
        };
        let summary =
            |partition| crate::store::PartitionSummary { partition, keys: 4, root: "ab".into(), namespaces: vec![] };
        let result = Ok(StoreOutcome::Summaries(vec![summary(1), summary(2)]));
        s.handle(at, Input::Stored { token, result });
        let json = match s.poll_effect() {
            Some(Effect::Send {
                msg: Message::ClientReply { response: ClientResponse::Document { json }, .. },
                ..
            }) => json,
            other => panic!("{other:?}"),
        };
        let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
        let parts = doc["partitions"].as_array().unwrap();
        assert_eq!(parts[0], json!({"partition": 1, "keys": 4, "merkle_root": "ab", "exchanges": []}));
        assert_eq!(
            parts[1]["exchanges"],
            json!([
                {"peer": "n2", "last_completed_ms_ago": 1000, "keys_repaired": 5, "last_keys_repaired": 0},
                {"peer": "n3", "last_completed_ms_ago": 2000, "keys_repaired": 1, "last_keys_repaired": 1},
            ])
        );
    }

    #[test]
    fn a_leaving_node_takes_no_new_writes() {
        use crate::membership::{test_member, MemberState, View};
        let mut s = stage();
        let me = test_member("n1", 1, MemberState::Leaving);
        let view = View { me: "n1".into(), members: vec![me], ring: None, epoch: 2, namespaces: Default::default() };
        s.handle(now(), Input::Signal(Signal::View(std::sync::Arc::new(view))));
        let write = crate::wire::ReplicaRequest::Write { key: b"k".to_vec(), object: Object::new(), hint: None };
        s.handle(now(), Input::Message { from: peer(), msg: Message::Replica { id: 1, request: write } });
        assert!(matches!(
            s.poll_effect(),
            Some(Effect::Send {
                msg: Message::ReplicaReply { reply: ReplicaReply::Failed { kind: ErrorKind::Unavailable, .. }, .. },
                ..
            })
        ));
        let read = crate::wire::ReplicaRequest::Read { key: b"k".to_vec() };
        s.handle(now(), Input::Message { from: peer(), msg: Message::Replica { id: 2, request: read } });
        assert!(
            matches!(s.poll_effect(), Some(Effect::Store { op: StoreOp::Read { .. }, .. })),
            "reads are still served"
        );
        let hint = vec![(Bytes::from(b"k".to_vec()), Object::new())];
        s.handle(now(), Input::Message { from: peer(), msg: Message::Handoff { id: 3, objects: hint } });
        assert!(
            matches!(s.poll_effect(), Some(Effect::Send { msg: Message::HandoffAck { id: 3, ok: false }, .. })),
            "nor hints and transfers"
        );
        assert!(s.poll_effect().is_none());
    }

    #[test]
    fn clients_may_not_send_node_requests_and_bad_requests_change_nothing() {
        let mut s = stage();
        let client = Origin::client(9, crate::access::Role::Admin);
        let read = Message::Replica { id: 1, request: crate::wire::ReplicaRequest::Read { key: b"k".to_vec() } };
        s.handle(now(), Input::Message { from: client.clone(), msg: read });
        assert!(matches!(
            s.poll_effect(),
            Some(Effect::Send {
                msg: Message::ReplicaReply { reply: ReplicaReply::Failed { kind: ErrorKind::Refused, .. }, .. },
                ..
            })
        ));
        s.handle(now(), Input::Message { from: client, msg: Message::Handoff { id: 2, objects: vec![] } });
        assert!(matches!(s.poll_effect(), Some(Effect::Send { msg: Message::HandoffAck { ok: false, .. }, .. })));
        let long_key = Message::Replica { id: 3, request: crate::wire::ReplicaRequest::Read { key: vec![0; 65] } };
        s.handle(now(), Input::Message { from: peer(), msg: long_key });
        assert!(matches!(
            s.poll_effect(),
            Some(Effect::Send {
                msg: Message::ReplicaReply { reply: ReplicaReply::Failed { kind: ErrorKind::BadRequest, .. }, .. },
                ..
            })
        ));
        assert!(s.poll_effect().is_none(), "no storage operation for a refused request");
    }

    #[test]
    fn a_coordinated_write_is_durable_and_a_replicated_one_follows_the_mode() {
        let mut s = stage();
        let coordinate = crate::wire::ReplicaRequest::Coordinate {
            key: b"k".to_vec(),
            context: crate::version::VersionVector::new(),
            value: Some(b"v".to_vec()),
            hint: None,
        };
        s.handle(now(), Input::Message { from: peer(), msg: Message::Replica { id: 1, request: coordinate } });
        assert!(matches!(s.poll_effect(), Some(Effect::Store { op: StoreOp::Coordinate { .. }, durable: true, .. })));
        let write = crate::wire::ReplicaRequest::Write { key: b"k".to_vec(), object: Object::new(), hint: None };
        s.handle(now(), Input::Message { from: peer(), msg: Message::Replica { id: 2, request: write } });
        assert!(matches!(s.poll_effect(), Some(Effect::Store { op: StoreOp::Write { .. }, durable: false, .. })));
    }
}
