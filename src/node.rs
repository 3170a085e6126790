//! A whole node (Dynamo §4's components together): its settings, derived from its config
//! in one place, the stages built from them, and [`LocalNode`], which runs every stage of
//! one node in one thread with the same routing the actor shell uses
//! ([`crate::stage::route`], [`crate::stage::subscribers`]). The simulation runs clusters
//! of `LocalNode`s; the node process runs the same [`Stages`], one actor each.

use std::collections::VecDeque;

use crate::admission::{Admission, AdmissionStage};
use crate::anti_entropy::{AntiEntropySettings, AntiEntropyStage};
use crate::config::Config;
use crate::coordinator::{CoordinatorSettings, CoordinatorStage, RequestLimits};
use crate::failure_detector::{DetectorSettings, FailureDetector, FailureDetectorStage};
use crate::gossip::GossipStage;
use crate::handoff::{HandoffSettings, HandoffStage, Planted};
use crate::membership::{Identity, Membership};
use crate::replica::{ReplicaSettings, ReplicaStage};
use crate::ring::NodeId;
use crate::stage::{admit, route, subscribers, Dest, Effect, Input, Now, Origin, Signal, Stage, StageId};
use crate::store::Saved;
use crate::store::StoreLimits;
use crate::wire::Message;

/// Everything a node's stages are built from.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeSettings {
    pub identity: Identity,
    pub seeds: Vec<String>,
    pub partitions: u32,
    pub replicas: usize,
    pub gossip_interval_ms: u64,
    pub detector: DetectorSettings,
    pub coordinator: CoordinatorSettings,
    pub replica: ReplicaSettings,
    pub handoff: HandoffSettings,
    pub anti_entropy: AntiEntropySettings,
    pub handoff_inflight: u32,
    pub anti_entropy_inflight: u32,
    /// Initial byte rates of handoff and anti-entropy (0: unlimited).
    pub handoff_bytes_per_sec: u64,
    pub anti_entropy_bytes_per_sec: u64,
    pub latency_target_ms: u64,
    pub latency_window_ms: u64,
    pub store: StoreLimits,
    pub frame_bytes_max: usize,
}

/// How long a handoff batch or reaping step may wait for its acknowledgements.
const BACKGROUND_TIMEOUT_MS: u64 = 30_000;

impl NodeSettings {
    pub fn from_config(c: &Config) -> NodeSettings {
        let me: NodeId = c.node.id.clone();
        let replicas = c.cluster.replicas as usize;
        let limits = RequestLimits {
            replicas,
            read_quorum: c.cluster.read_quorum as usize,
            write_quorum: c.cluster.write_quorum as usize,
            key_bytes_max: c.limits.max_key_bytes as usize,
            value_bytes_max: c.limits.max_value_bytes as usize,
        };
        NodeSettings {
            identity: Identity {
                id: me.clone(),
                addr: c.node.listen.clone(),
                zone: c.node.zone.clone(),
                weight: c.node.weight,
                signer: None,
            },
            seeds: c.node.seeds.clone(),
            partitions: c.cluster.partitions,
            replicas,
            gossip_interval_ms: c.gossip.interval_ms,
            detector: DetectorSettings {
                heartbeat_interval_ms: c.failure_detector.heartbeat_interval_ms,
                phi_threshold: c.failure_detector.phi_threshold,
                probe_interval_ms: c.failure_detector.probe_interval_ms,
                probe_interval_max_ms: c.failure_detector.probe_interval_max_ms,
            },
            coordinator: CoordinatorSettings {
                me: me.clone(),
                limits,
                request_timeout_ms: c.coordinator.request_timeout_ms,
                replica_timeout_ms: c.coordinator.replica_timeout_ms,
                requests_max: c.coordinator.max_inflight as usize,
                read_repair_percent: c.coordinator.read_repair_percent,
                replicate_ahead: c.storage.durability == crate::config::Durability::Sync,
            },
            replica: ReplicaSettings { me: me.clone(), limits, fault_injection: c.testing.fault_injection },
            handoff: HandoffSettings {
                me: me.clone(),
                replicas,
                interval_ms: c.handoff.interval_ms,
                timeout_ms: BACKGROUND_TIMEOUT_MS,
                batch_bytes: c.handoff.batch_bytes as usize,
                reaped_retention_ms: c.storage.reaped_retention_ms,
                tombstone_grace_ms: c.storage.tombstone_grace_ms,
                reap_batch: c.handoff.batch_keys as usize,
                planted: Planted::None,
            },
            anti_entropy: AntiEntropySettings {
                me,
                replicas,
                interval_ms: c.anti_entropy.interval_ms,
                step_timeout_ms: BACKGROUND_TIMEOUT_MS,
                page_bytes: c.anti_entropy.page_bytes as usize,
            },
            handoff_inflight: c.handoff.max_inflight,
            anti_entropy_inflight: c.anti_entropy.max_inflight,
            handoff_bytes_per_sec: c.handoff.bytes_per_sec,
            anti_entropy_bytes_per_sec: c.anti_entropy.bytes_per_sec,
            latency_target_ms: c.admission.latency_target_ms,
            latency_window_ms: c.admission.latency_window_ms,
            store: StoreLimits {
                siblings_max: c.limits.max_siblings as usize,
                prune_threshold: c.cluster.clock_prune_threshold as usize,
                object_bytes_max: c.limits.object_bytes_max as usize,
            },
            frame_bytes_max: c.frame_bytes_max(),
        }
    }
}

/// One node's stages.
pub struct Stages {
    pub coordinator: CoordinatorStage,
    pub replica: ReplicaStage,
    pub gossip: GossipStage,
    pub failure_detector: FailureDetectorStage,
    pub handoff: HandoffStage,
    pub anti_entropy: AntiEntropyStage,
    pub admission: AdmissionStage,
}

impl Stages {
    /// Build every stage; `saved` is the member table and namespaces read from storage.
    pub fn new(s: &NodeSettings, saved: Saved, now: Now) -> Stages {
        let membership = Membership::new(
            s.identity.clone(),
            s.seeds.clone(),
            saved.members,
            s.partitions,
            s.replicas as u32,
            s.gossip_interval_ms,
            now.mono_ms,
        );
        let me = s.identity.id.clone();
        Stages {
            coordinator: CoordinatorStage::new(s.coordinator.clone()),
            replica: ReplicaStage::new(s.replica.clone()),
            gossip: GossipStage::new(membership, s.replicas, &saved.namespaces),
            failure_detector: FailureDetectorStage::new(FailureDetector::new(s.detector), me),
            handoff: HandoffStage::new(s.handoff.clone(), now.mono_ms),
            anti_entropy: AntiEntropyStage::new(s.anti_entropy.clone(), now.mono_ms),
            admission: AdmissionStage::new(
                Admission::new(s.handoff_inflight, s.anti_entropy_inflight, s.latency_target_ms, s.latency_window_ms)
                    .with_rates(s.handoff_bytes_per_sec, s.anti_entropy_bytes_per_sec),
            ),
        }
    }

    pub fn get_mut(&mut self, id: StageId) -> &mut dyn Stage {
        match id {
            StageId::Coordinator => &mut self.coordinator,
            StageId::Replica => &mut self.replica,
            StageId::Gossip => &mut self.gossip,
            StageId::FailureDetector => &mut self.failure_detector,
            StageId::Handoff => &mut self.handoff,
            StageId::AntiEntropy => &mut self.anti_entropy,
            StageId::Admission => &mut self.admission,
        }
    }

    pub fn get(&self, id: StageId) -> &dyn Stage {
        match id {
            StageId::Coordinator => &self.coordinator,
            StageId::Replica => &self.replica,
            StageId::Gossip => &self.gossip,
            StageId::FailureDetector => &self.failure_detector,
            StageId::Handoff => &self.handoff,
            StageId::AntiEntropy => &self.anti_entropy,
            StageId::Admission => &self.admission,
        }
    }
}

/// Most inputs one call may process before giving up: signals between stages always settle
/// well below it, so reaching it is a bug in the stages, reported rather than spun on.
const SETTLE_STEPS_MAX: usize = 1_000_000;

/// Every stage of one node in one thread: inputs in, effects for the outside world out
/// (messages to send, storage operations to run, address book and fault changes). Signals
/// between stages are delivered here, in order.
pub struct LocalNode {
    pub stages: Stages,
    queue: VecDeque<(StageId, Input)>,
    out: VecDeque<(StageId, Effect)>,
}

impl LocalNode {
    pub fn new(settings: &NodeSettings, saved: Saved, now: Now) -> LocalNode {
        let mut node =
            LocalNode { stages: Stages::new(settings, saved, now), queue: VecDeque::new(), out: VecDeque::new() };
        for id in StageId::ALL {
            node.collect(id);
        }
        node.settle(now);
        node
    }

    fn collect(&mut self, id: StageId) {
        let stage = self.stages.get_mut(id);
        while let Some(e) = stage.poll_effect() {
            match e {
                Effect::Signal(sig) => {
                    for &to in subscribers(&sig) {
                        self.queue.push_back((to, Input::Signal(sig.clone())));
                    }
                }
                other => self.out.push_back((id, other)),
            }
        }
    }

    fn settle(&mut self, now: Now) {
        for _ in 0..SETTLE_STEPS_MAX {
            let Some((id, input)) = self.queue.pop_front() else { return };
            self.stages.get_mut(id).handle(now, input);
            self.collect(id);
        }
        tracing::error!("stage signals did not settle");
    }

    /// Give one stage an input and run until every signal it caused is delivered.
    pub fn input(&mut self, now: Now, stage: StageId, input: Input) {
        self.queue.push_back((stage, input));
        self.settle(now);
    }

    /// A message from the network, to the stage that takes it.
    pub fn message(&mut self, now: Now, from: Origin, msg: Message) {
        match admit(&from, &msg) {
            Ok(stage) => self.input(now, stage, Input::Message { from, msg }),
            Err(Some(refusal)) => {
                let stage = route(&msg).unwrap_or(StageId::Gossip);
                self.out.push_back((stage, Effect::Send { to: Dest::Conn(from.conn), msg: refusal }));
            }
            Err(None) => {}
        }
    }

    /// The transport could not reach `node`.
    pub fn unreachable(&mut self, now: Now, node: NodeId) {
        let sig = Signal::Unreachable { node };
        for &to in subscribers(&sig) {
            self.queue.push_back((to, Input::Signal(sig.clone())));
        }
        self.settle(now);
    }

    /// Tick every stage whose timer is due.
    pub fn tick(&mut self, now: Now, random: &mut dyn FnMut() -> u64) {
        self.tick_where(now, random, true);
    }

    /// Tick the stages whose timers are not due, or not set. A shell may fire a timer early
    /// (the node keeps a timer that fires before a stage's next timeout rather than set it
    /// again), so a stage acts on a tick only for what is due by then; the simulation calls
    /// this to hold the stages to that.
    pub fn tick_early(&mut self, now: Now, random: &mut dyn FnMut() -> u64) {
        self.tick_where(now, random, false);
    }

    /// Tick every stage whose timer is due (`due`), or every other stage (`!due`).
    fn tick_where(&mut self, now: Now, random: &mut dyn FnMut() -> u64, due: bool) {
        for id in StageId::ALL {
            if self.stages.get(id).poll_timeout().is_some_and(|t| t <= now.mono_ms) == due {
                self.input(now, id, Input::Tick { random: random() });
            }
        }
    }

    /// The earliest timer of any stage.
    pub fn poll_timeout(&self) -> Option<u64> {
        StageId::ALL.iter().filter_map(|id| self.stages.get(*id).poll_timeout()).min()
    }

    /// The next effect for the outside world, and the stage it came from (storage results
    /// go back to it).
    pub fn poll_effect(&mut self) -> Option<(StageId, Effect)> {
        self.out.pop_front()
    }
}

#[cfg(test)]
mod tests {
    //! Small clusters of `LocalNode`s over a perfect in-memory network: the stages wired as
    //! a node wires them, checked end to end. The simulation (`tests/simulation.rs`) does
    //! the same under faults.

    use super::*;
    use crate::access::Role;
    use crate::store::{MemStore, StoreOp, StoreOutcome};
    use crate::version::VersionVector;
    use crate::wire::{Bytes, ClientRequest, ClientResponse, ReplicaRequest};
    use std::collections::BTreeMap;

    const CLIENT_CONN: u64 = 1 << 40;

    struct Peer {
        settings: NodeSettings,
        node: Option<LocalNode>,
        store: MemStore,
    }

    struct Mini {
        now: u64,
        peers: Vec<Peer>,
        inbox: BTreeMap<u64, ClientResponse>,
        /// The ring epoch each answer told.
        epochs: BTreeMap<u64, u64>,
        /// Puts forwarded: (from node index, to node id).
        forwards: Vec<(usize, String)>,
        next_id: u64,
        rng: u64,
    }

    /// Node `i`'s config: fast timers, and `extra` merged over it.
    fn config(i: usize, extra: &str) -> Config {
        let base = format!(
            "[node]\nid = \"n{i}\"\nlisten = \"10.0.0.{i}:1\"\ndata_dir = \"x\"\nseeds = [\"10.0.0.1:1\"]\n\
             [cluster]\nname = \"t\"\nsecret = \"s\"\npartitions = 16\n\
             [gossip]\ninterval_ms = 100\n[handoff]\ninterval_ms = 200\n[anti_entropy]\ninterval_ms = 300\n"
        );
        fn merge(into: &mut toml::Value, from: toml::Value) {
            match (into, from) {
                (toml::Value::Table(a), toml::Value::Table(b)) => {
                    for (k, v) in b {
                        match a.get_mut(&k) {
                            Some(existing) => merge(existing, v),
                            None => {
                                a.insert(k, v);
                            }
                        }
                    }
                }
                (slot, v) => *slot = v,
            }
        }
        let mut v: toml::Value = toml::from_str(&base).unwrap();
        merge(&mut v, toml::from_str(extra).unwrap());
        Config::parse(&toml::to_string(&v).unwrap()).unwrap()
    }

    impl Mini {
        fn new(n: usize, extra: &str) -> Mini {
            let mut m = Mini {
                now: 1,
                peers: Vec::new(),
                inbox: BTreeMap::new(),
                epochs: BTreeMap::new(),
                forwards: Vec::new(),
                next_id: 1,
                rng: 7,
            };
            for i in 1..=n {
                m.add(&config(i, extra));
            }
            m.run(2000);
            m
        }

        fn add(&mut self, c: &Config) -> usize {
            let settings = NodeSettings::from_config(c);
            let store = MemStore::new(16, settings.store, self.peers.len() as u64 + 100);
            self.peers.push(Peer { settings, node: None, store });
            let i = self.peers.len() - 1;
            self.boot(i);
            i
        }

        fn now(&self) -> Now {
            Now { mono_ms: self.now, wall_ms: 1_000_000 + self.now }
        }

        fn boot(&mut self, i: usize) {
            let saved = crate::store::StoreState::load_saved(&self.peers[i].store.engine).unwrap();
            let now = self.now();
            self.peers[i].node = Some(LocalNode::new(&self.peers[i].settings, saved, now));
        }

        fn index(&self, id: &str) -> Option<usize> {
            self.peers.iter().position(|p| p.settings.identity.id == id)
        }

        /// Deliver every effect until nothing moves.
        fn settle(&mut self) {
            for _ in 0..100_000 {
                let mut moved = false;
                for i in 0..self.peers.len() {
                    let now = self.now();
                    let Some(node) = self.peers[i].node.as_mut() else { continue };
                    let Some((stage, effect)) = node.poll_effect() else { continue };
                    moved = true;
                    match effect {
                        Effect::Store { token, op, .. } => {
                            let result = self.peers[i].store.run_batch_at(vec![op], now.wall_ms).pop().unwrap();
                            let node = self.peers[i].node.as_mut().unwrap();
                            node.input(now, stage, Input::Stored { token, result });
                        }
                        Effect::Send { to, msg } => {
                            let me = self.peers[i].settings.identity.id.clone();
                            if let (Dest::Node(n), Message::Replica { request: ReplicaRequest::Forward { .. }, .. }) =
                                (&to, &msg)
                            {
                                self.forwards.push((i, n.clone()));
                            }
                            let target = match &to {
                                Dest::Node(id) => self.index(id),
                                Dest::Addr(a) => self.peers.iter().position(|p| p.settings.identity.addr == *a),
                                Dest::Conn(c) if *c >= CLIENT_CONN => {
                                    if let Message::ClientReply { id, response, epoch } = msg.clone() {
                                        self.inbox.insert(id, response);
                                        self.epochs.insert(id, epoch);
                                    }
                                    None
                                }
                                Dest::Conn(c) => Some(*c as usize),
                            };
                            // Every message goes through the real codec.
                            let frame = crate::wire::encode_frame(&msg).unwrap();
                            let (msg, _) = crate::wire::decode_frame(&frame, 1 << 30).unwrap().unwrap();
                            match target.and_then(|t| self.peers[t].node.as_mut().map(|n| (t, n))) {
                                Some((_, n)) => n.message(now, Origin::node(i as u64, me), msg),
                                None if matches!(to, Dest::Node(_)) => {
                                    let to_id = match &to {
                                        Dest::Node(id) => id.clone(),
                                        _ => unreachable!(),
                                    };
                                    self.peers[i].node.as_mut().unwrap().unreachable(now, to_id);
                                }
                                None => {}
                            }
                        }
                        Effect::Signal(_) | Effect::Peers(_) | Effect::Block(_) => {}
                    }
                }
                if !moved {
                    return;
                }
            }
            panic!("the cluster does not settle");
        }

        /// Let `ms` pass in 10 ms steps, ticking every node.
        fn run(&mut self, ms: u64) {
            let end = self.now + ms;
            while self.now < end {
                self.now += 10;
                for i in 0..self.peers.len() {
                    let now = self.now();
                    let mut rng = self.rng;
                    if let Some(n) = self.peers[i].node.as_mut() {
                        n.tick(now, &mut || {
                            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                            rng >> 11
                        });
                    }
                    self.rng = rng;
                }
                self.settle();
            }
        }

        fn client(&mut self, i: usize, request: ClientRequest) -> ClientResponse {
            let id = self.next_id;
            self.next_id += 1;
            let now = self.now();
            let origin = Origin::client(CLIENT_CONN + id, Role::Admin);
            self.peers[i].node.as_mut().unwrap().message(now, origin, Message::Client { id, request });
            for _ in 0..1000 {
                self.settle();
                if let Some(r) = self.inbox.remove(&id) {
                    return r;
                }
                self.run(10);
            }
            panic!("no answer");
        }

        fn put(&mut self, i: usize, key: &str, value: Vec<u8>, context: Option<String>) -> ClientResponse {
            let request = ClientRequest::Put {
                key: Bytes::from(key.as_bytes().to_vec()),
                context,
                value: Some(Bytes::from(value)),
                w: None,
                ns: None,
            };
            self.client(i, request)
        }

        fn get(&mut self, i: usize, key: &str) -> (Vec<Vec<u8>>, Option<String>) {
            match self.client(i, ClientRequest::Get { key: Bytes::from(key.as_bytes().to_vec()), r: None, ns: None }) {
                ClientResponse::Values { values, context } => {
                    (values.into_iter().map(Bytes::into_vec).collect(), context)
                }
                other => panic!("{other:?}"),
            }
        }

        fn down(&mut self, i: usize) {
            self.peers[i].node = None;
        }

        fn view(&self, i: usize) -> crate::membership::View {
            let mut m = self.peers[i].node.as_ref().unwrap().stages.gossip.membership().clone();
            m.view()
        }
    }

    #[test]
    fn three_nodes_form_a_ring_and_serve_puts_and_gets_with_siblings() {
        let mut m = Mini::new(3, "");
        for i in 0..3 {
            let v = m.view(i);
            assert_eq!(v.members.len(), 3, "node {i}: {:?}", v.members);
            assert!(v.ring.is_some());
        }
        assert!(matches!(m.put(0, "k", b"a".to_vec(), None), ClientResponse::Written { .. }));
        assert!(matches!(m.put(1, "k", b"b".to_vec(), None), ClientResponse::Written { .. }));
        let (mut values, ctx) = m.get(2, "k");
        values.sort();
        assert_eq!(values, vec![b"a".to_vec(), b"b".to_vec()], "siblings, in dot order");
        assert!(matches!(m.put(2, "k", b"c".to_vec(), ctx), ClientResponse::Written { .. }));
        assert_eq!(m.get(0, "k").0, vec![b"c".to_vec()]);
        let bad = m.put(0, "k", b"x".to_vec(), Some("%%".into()));
        assert!(matches!(bad, ClientResponse::Error { kind: crate::wire::ErrorKind::BadRequest, .. }));
    }

    #[test]
    fn status_counts_requests_for_keys_this_node_does_not_replicate() {
        let mut m = Mini::new(5, "");
        let ring = m.view(0).ring.clone().unwrap();
        let keys: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
        let elsewhere = keys
            .iter()
            .filter(|k| !ring.preference_list(ring.partition_for_key(k.as_bytes()), 3).primaries.contains(&"n1".into()))
            .count() as u64;
        assert!(elsewhere > 0 && elsewhere < 20, "a 5-node ring with N=3 replicates some keys elsewhere");
        for k in &keys {
            assert!(matches!(m.put(0, k, b"v".to_vec(), None), ClientResponse::Written { .. }));
        }
        m.get(0, "k0");
        let answer = m.next_id - 1;
        assert_eq!(m.epochs.get(&answer).copied(), Some(m.view(0).epoch), "answers tell the ring epoch");
        m.run(1500);
        let doc = document(&mut m, 0, ClientRequest::Status);
        let replicated_k0 = ring.preference_list(ring.partition_for_key(b"k0"), 3).primaries.contains(&"n1".into());
        assert_eq!(doc["counters"]["forwarded"], elsewhere + u64::from(!replicated_k0), "{doc}");
        assert_eq!(doc["counters"]["coordinated"], 20 - elsewhere + u64::from(replicated_k0), "{doc}");
    }

    /// Every stage's report on node `i`.
    fn report(m: &Mini, i: usize) -> crate::metrics::Report {
        let node = m.peers[i].node.as_ref().unwrap();
        let mut r = crate::metrics::Report::default();
        for id in StageId::ALL {
            node.stages.get(id).report(&mut r);
        }
        r
    }

    #[test]
    fn stages_report_requests_replica_work_and_hints() {
        let mut m = Mini::new(4, "");
        m.down(3);
        for i in 0..10 {
            assert!(matches!(m.put(0, &format!("r{i}"), b"v".to_vec(), None), ClientResponse::Written { .. }));
        }
        for i in 0..10 {
            assert_eq!(m.get(0, &format!("r{i}")).0, vec![b"v".to_vec()]);
        }
        assert!(m.get(0, "never-written").0.is_empty());
        let bad = m.put(0, "r0", b"x".to_vec(), Some("%%".into()));
        assert!(matches!(bad, ClientResponse::Error { .. }));
        m.run(6000);
        let r = report(&m, 0);
        let n = |name: &str, labels: crate::metrics::Labels| r.count(name, labels);
        assert_eq!(n("ringkv_requests", &[("op", "put"), ("result", "ok")]), 10);
        assert_eq!(n("ringkv_requests", &[("op", "get"), ("result", "ok")]), 10);
        assert_eq!(n("ringkv_requests", &[("op", "get"), ("result", "not_found")]), 1);
        assert_eq!(n("ringkv_requests", &[("op", "put"), ("result", "bad_request")]), 1);
        match r.get("ringkv_request_duration_seconds", &[("op", "get")]) {
            Some(crate::metrics::Value::Histogram(h)) => assert_eq!(h.count(), 11),
            other => panic!("{other:?}"),
        }
        // n2 and n3 served replica reads and writes for them.
        let others: Vec<crate::metrics::Report> = (1..3).map(|i| report(&m, i)).collect();
        let kind = |k: &str| -> u64 { others.iter().map(|r| r.count("ringkv_replica_requests", &[("kind", k)])).sum() };
        assert!(kind("write") > 0 && kind("read") > 0);
        // n4 was down: its copies are hints on the others, reported by intended node.
        let held: f64 = (0..3)
            .map(|i| match report(&m, i).get("ringkv_hints_held", &[("node", "n4")]) {
                Some(crate::metrics::Value::Level(v)) => *v,
                _ => 0.0,
            })
            .sum();
        let stored: usize = m.peers.iter().take(3).map(|p| p.store.hints().len()).sum();
        assert!(stored > 0);
        assert_eq!(held, stored as f64, "hints held as the last round found them");
        m.boot(3);
        m.run(10_000);
        let delivered: u64 = (0..3).map(|i| report(&m, i).count("ringkv_hints_delivered", &[])).sum();
        assert_eq!(delivered, stored as u64, "every hint delivered and counted once");
        let n4 = report(&m, 3);
        assert!(n4.count("ringkv_replica_requests", &[("kind", "handoff")]) > 0);
    }

    #[test]
    fn a_put_goes_back_to_the_replica_that_answered_its_read_fastest() {
        let mut m = Mini::new(5, "");
        let ring = m.view(0).ring.clone().unwrap();
        let owners = |k: &str| ring.preference_list(ring.partition_for_key(k.as_bytes()), 3).primaries;
        let key = (0..100).map(|i| format!("f{i}")).find(|k| owners(k).contains(&"n1".into())).unwrap();
        let other = owners(&key).into_iter().find(|n| n != "n1").unwrap();
        let j = m.index(&other).unwrap();
        assert!(matches!(m.put(0, &key, b"v1".to_vec(), None), ClientResponse::Written { .. }));
        // n1 coordinates the read: its own replica answers first, and the context says so.
        let (_, ctx) = m.get(0, &key);
        let ctx = ctx.unwrap();
        assert_eq!(crate::version::split_context(&ctx).1, Some("n1"));
        // The write back with that context, sent to another replica, is forwarded to n1.
        m.forwards.clear();
        assert!(matches!(m.put(j, &key, b"v2".to_vec(), Some(ctx)), ClientResponse::Written { .. }));
        assert_eq!(m.forwards, vec![(j, "n1".to_string())]);
        assert_eq!(m.get(2, &key).0, vec![b"v2".to_vec()], "the write superseded what was read");
        // A blind put, or one naming this node, is coordinated where it arrives.
        m.forwards.clear();
        assert!(matches!(m.put(j, &key, b"v3".to_vec(), None), ClientResponse::Written { .. }));
        assert!(m.forwards.is_empty());
    }

    /// Coordinators and replicas report what their storage operations waited to admission.
    #[test]
    fn admission_hears_the_storage_waits_of_foreground_work() {
        let mut m = Mini::new(3, "");
        let waits = |m: &Mini, i: usize| {
            let doc = m.peers[i].node.as_ref().unwrap().stages.admission.admission().limits_doc();
            doc["waits_p99_ms"]["storage"].clone()
        };
        assert!(waits(&m, 0).is_null());
        for k in 0..20 {
            assert!(matches!(m.put(0, &format!("w{k}"), b"v".to_vec(), None), ClientResponse::Written { .. }));
        }
        m.run(500);
        assert!((0..3).all(|i| waits(&m, i).is_u64()), "{:?}", (0..3).map(|i| waits(&m, i)).collect::<Vec<_>>());
    }

    /// Namespaces end to end: created on one node, known to all by gossip and after a
    /// restart; an N=1 namespace's keys live on one node only, even after anti-entropy and
    /// handoff rounds; an lww namespace answers one value where the default keeps siblings.
    #[test]
    fn namespaces_have_their_own_n_and_reconciliation() {
        let mut m = Mini::new(3, "");
        let create = |name: &str, n: u8, res: &str| ClientRequest::NamespaceCreate {
            name: name.into(),
            n: Some(n),
            r: Some(1),
            w: Some(1),
            resolution: Some(res.into()),
        };
        assert!(matches!(m.client(0, create("one", 1, "siblings")), ClientResponse::Document { .. }));
        assert!(matches!(m.client(0, create("last", 3, "lww")), ClientResponse::Document { .. }));
        m.run(1000);
        // Bad definitions change nothing: N over the members, a second create, a bad name.
        for bad in [create("big", 4, "lww"), create("one", 2, "lww"), create("default", 1, "lww")] {
            let answer = m.client(1, bad);
            assert!(matches!(answer, ClientResponse::Error { kind: crate::wire::ErrorKind::BadRequest, .. }));
        }
        let doc = document(&mut m, 2, ClientRequest::Namespaces);
        assert_eq!(doc["namespaces"].as_array().map(Vec::len), Some(2), "{doc}");
        assert_eq!(doc["namespaces"][0]["name"], "last");
        assert_eq!(doc["namespaces"][1]["n"], 1);

        let put = |ns: &str, key: &str, v: &[u8]| ClientRequest::Put {
            key: Bytes::from(key.as_bytes().to_vec()),
            context: None,
            value: Some(Bytes::from(v.to_vec())),
            w: None,
            ns: Some(ns.into()),
        };
        let get = |ns: &str, key: &str| ClientRequest::Get {
            key: Bytes::from(key.as_bytes().to_vec()),
            r: Some(1),
            ns: Some(ns.into()),
        };
        let keys: Vec<String> = (0..12).map(|i| format!("s{i}")).collect();
        for (i, k) in keys.iter().enumerate() {
            assert!(matches!(m.client(i % 3, put("one", k, b"v")), ClientResponse::Written { .. }));
        }
        // Blind writes from two coordinators: lww answers the later one only.
        assert!(matches!(m.client(0, put("last", "k", b"first")), ClientResponse::Written { .. }));
        m.run(5);
        assert!(matches!(m.client(1, put("last", "k", b"second")), ClientResponse::Written { .. }));
        let ClientResponse::Values { values, .. } = m.client(2, get("last", "k")) else { panic!() };
        assert_eq!(values, vec![Bytes::from(b"second".to_vec())]);
        // The same key in the default namespace is another key.
        assert_eq!(m.get(0, "k").0, Vec::<Vec<u8>>::new());
        // An unknown namespace is a bad request, and so is a default key that looks namespaced.
        let unknown = m.client(0, get("nope", "k"));
        assert!(matches!(unknown, ClientResponse::Error { kind: crate::wire::ErrorKind::BadRequest, .. }));
        let raw = ClientRequest::Get { key: Bytes::from(vec![0xFF, 1, 1, 0, 3, b'o', b'n', b'e']), r: None, ns: None };
        assert!(matches!(m.client(0, raw), ClientResponse::Error { kind: crate::wire::ErrorKind::BadRequest, .. }));

        // Anti-entropy and handoff rounds copy no N=1 key to a second node.
        m.run(6000);
        let one = m.peers[0].node.as_ref().unwrap().stages.gossip.namespaces().get("one").cloned().unwrap();
        let ring = m.view(0).ring.clone().unwrap();
        for k in &keys {
            let store_key = one.store_key(k.as_bytes());
            let owner = ring.preference_list(ring.partition_for_key(&store_key), 1).primaries;
            let holders: Vec<String> = (0..3)
                .filter(|&i| {
                    let read = m.peers[i].store.run(StoreOp::Read { key: store_key.clone() });
                    matches!(read, Ok(StoreOutcome::State(Some(_))))
                })
                .map(|i| format!("n{}", i + 1))
                .collect();
            assert_eq!(holders, owner, "{k}");
            let ClientResponse::Values { values, .. } = m.client(0, get("one", k)) else { panic!() };
            assert_eq!(values.len(), 1, "{k}");
        }
        // admin partitions shows the namespaces' trees beside the default one.
        let doc = document(&mut m, 0, ClientRequest::Partitions);
        let names: Vec<&serde_json::Value> = doc["partitions"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|p| p["namespaces"].as_array())
            .flatten()
            .collect();
        assert!(names.iter().any(|n| n["name"] == "last"), "{doc}");
        // A restarted node knows the namespaces from its own disk.
        m.down(2);
        m.boot(2);
        assert_eq!(m.peers[2].node.as_ref().unwrap().stages.gossip.namespaces().len(), 2);
    }

    #[test]
    fn a_wiped_node_is_refilled_page_by_page() {
        // Pages of about one object: a partition takes many pages each way.
        let mut m = Mini::new(3, "[anti_entropy]\nmax_inflight = 2\npage_bytes = 200\n");
        let keys: Vec<String> = (0..60).map(|i| format!("key{i}")).collect();
        for k in &keys {
            assert!(matches!(m.put(0, k, vec![7; 150], None), ClientResponse::Written { .. }));
        }
        m.run(1000);
        let full = m.peers[2].store.objects().len();
        assert_eq!(full, 60, "N=3 of 3 nodes: every node holds every key");
        m.down(2);
        m.peers[2].store = MemStore::new(16, m.peers[2].settings.store, 555);
        // The wiped node keeps its saved membership out of this test: it re-learns it.
        m.boot(2);
        m.run(20_000);
        assert_eq!(m.peers[2].store.objects().len(), 60, "anti-entropy refilled the wiped node");
        let moved: u64 = m
            .peers
            .iter()
            .map(|p| p.node.as_ref().unwrap().stages.anti_entropy.stats.clone())
            .map(|s| s.keys_sent + s.keys_received)
            .sum();
        assert!(moved >= 60, "{moved}");
    }

    fn document(m: &mut Mini, i: usize, request: ClientRequest) -> serde_json::Value {
        let ClientResponse::Document { json } = m.client(i, request) else { panic!("not a document") };
        serde_json::from_str(&json).unwrap()
    }

    #[test]
    fn admin_partitions_shows_each_partitions_exchanges_with_its_peers() {
        let mut m = Mini::new(3, "");
        for i in 0..40 {
            assert!(matches!(m.put(0, &format!("key{i}"), vec![7; 20], None), ClientResponse::Written { .. }));
        }
        m.run(1000);
        m.down(2);
        m.peers[2].store = MemStore::new(16, m.peers[2].settings.store, 556);
        m.boot(2);
        m.run(20_000);
        assert_eq!(m.peers[2].store.objects().len(), 40, "anti-entropy refilled the wiped node");
        let mut repaired = 0;
        for i in 0..3 {
            let doc = document(&mut m, i, ClientRequest::Partitions);
            let parts = doc["partitions"].as_array().unwrap();
            assert_eq!(parts.len(), 16, "N=3 of 3 nodes: every node replicates every partition");
            for part in parts {
                assert!(part["merkle_root"].is_string() && part["keys"].is_u64(), "{part}");
                let exchanges = part["exchanges"].as_array().unwrap();
                let me = format!("n{}", i + 1);
                assert!(!exchanges.is_empty(), "20 s of anti-entropy: {part}");
                for x in exchanges {
                    assert_ne!(x["peer"], me.as_str());
                    assert!(x["last_completed_ms_ago"].as_u64().unwrap() <= 20_000, "{x}");
                    repaired += x["keys_repaired"].as_u64().unwrap();
                }
            }
        }
        assert!(repaired >= 40, "every key the wiped node lost was repaired by some exchange: {repaired}");
    }

    #[test]
    fn admin_transfers_follows_a_leaving_node_until_it_holds_nothing() {
        let mut m = Mini::new(4, "");
        for i in 0..40 {
            assert!(matches!(m.put(0, &format!("t{i}"), vec![3; 50], None), ClientResponse::Written { .. }));
        }
        m.run(500);
        let idle = document(&mut m, 3, ClientRequest::Transfers);
        assert_eq!(idle["pending"], false, "{idle}");
        let id = m.peers[3].settings.identity.id.clone();
        let r = m.client(3, ClientRequest::Leave { node: id.clone() });
        assert!(matches!(r, ClientResponse::Document { .. }), "{r:?}");
        let mut saw_pending = false;
        let mut done = None;
        for _ in 0..2000 {
            m.run(10);
            let doc = document(&mut m, 3, ClientRequest::Transfers);
            if doc["transfers"]["partitions_pending"].as_u64().unwrap() > 0 {
                assert_eq!(doc["pending"], true);
                // Keys acknowledged are taken off at once; the partition goes at the next round.
                saw_pending |= doc["transfers"]["keys_left"].as_u64().unwrap() > 0;
            }
            if doc["state"] == "left" {
                done = Some(doc);
                break;
            }
        }
        assert!(saw_pending, "the leaver held partitions with keys left to transfer");
        let doc = done.expect("the leaver finished");
        assert_eq!(doc["pending"], false, "{doc}");
        assert_eq!(doc["transfers"]["keys_left"], 0);
        assert!(doc["transfers"]["keys_moved"].as_u64().unwrap() > 0, "{doc}");
        assert!(doc["transfers"]["bytes_moved"].as_u64().unwrap() > 0, "{doc}");
        assert!(m.peers[3].store.objects().is_empty());
    }

    #[test]
    fn hints_reach_their_node_in_batches_bounded_by_bytes() {
        let mut m = Mini::new(4, "[handoff]\nbatch_bytes = 1000\n");
        m.down(3);
        let mut written = Vec::new();
        for i in 0..40 {
            let k = format!("h{i}");
            if let ClientResponse::Written { .. } = m.put(0, &k, vec![1; 600], None) {
                written.push(k);
            }
        }
        m.run(1500);
        let held: usize = m.peers.iter().take(3).map(|p| p.store.hints().len()).sum();
        assert!(held > 0, "n4 was down: some writes went to fallbacks as hints");
        m.boot(3);
        m.run(10_000);
        let held: usize = m.peers.iter().take(3).map(|p| p.store.hints().len()).sum();
        assert_eq!(held, 0, "every hint was delivered");
        let n4 = m.peers[3].store.objects().len();
        assert!(n4 > 0);
        for k in &written {
            assert_eq!(m.get(3, k).0, vec![vec![1u8; 600]]);
        }
    }

    #[test]
    fn a_leaving_node_hands_away_its_hints_and_partitions_before_it_is_left() {
        let mut m = Mini::new(5, "");
        m.down(4);
        for i in 0..30 {
            m.put(0, &format!("x{i}"), vec![2; 10], None);
        }
        let hints_on_0 = m.peers[0].store.hints().len();
        let leaver = (0..4).max_by_key(|&i| m.peers[i].store.hints().len()).unwrap();
        assert!(m.peers[leaver].store.hints().len() + hints_on_0 > 0);
        let id = m.peers[leaver].settings.identity.id.clone();
        let r = m.client(0, ClientRequest::Leave { node: id.clone() });
        assert!(matches!(r, ClientResponse::Document { .. }), "{r:?}");
        m.run(500);
        // The partitions it must hand over include n5's: bring n5 back for them.
        m.boot(4);
        let left = |m: &Mini| m.view(leaver).member(&id).unwrap().state == crate::membership::MemberState::Left;
        for _ in 0..1000 {
            if left(&m) {
                break;
            }
            m.run(10);
        }
        assert!(left(&m), "the leaver finished");
        // At the moment it counts itself left, it holds nothing.
        assert!(m.peers[leaver].store.hints().is_empty(), "hints were handed to the keys' replicas");
        assert!(m.peers[leaver].store.objects().is_empty());
        m.run(2000);
        assert_eq!(m.view(0).member(&id).unwrap().state, crate::membership::MemberState::Left);
        for i in 0..30 {
            assert_eq!(m.get(0, &format!("x{i}")).0, vec![vec![2u8; 10]]);
        }
    }

    #[test]
    fn restarts_and_hint_deliveries_do_not_grow_clocks() {
        let mut m = Mini::new(4, "");
        let mut ctx = None;
        for round in 0..20 {
            // A restart of every node...
            for i in 0..4 {
                m.down(i);
                m.boot(i);
            }
            m.run(300);
            // ...and a replica down for a write, whose hint is then delivered.
            let victim = 1 + round % 3;
            m.down(victim);
            m.run(300);
            match m.put(0, "hot", vec![round as u8], ctx.clone()) {
                ClientResponse::Written { context } => ctx = Some(context),
                other => panic!("{other:?}"),
            }
            m.boot(victim);
            m.run(1500);
        }
        let clock_len = m.peers.iter().filter_map(|p| p.store.object(b"hot")).map(|o| o.clock().len()).max().unwrap();
        assert!(clock_len <= 3 + 2, "clock has {clock_len} entries");
        let ctx = VersionVector::decode_context(ctx.as_deref().unwrap(), 0).unwrap();
        assert!(ctx.len() <= 5);
    }

    #[test]
    fn a_corrupt_row_is_refilled_by_anti_entropy() {
        let mut m = Mini::new(3, "[anti_entropy]\nmax_inflight = 2\n");
        m.put(0, "c", b"v".to_vec(), None);
        m.run(500);
        let rows: Vec<Vec<u8>> =
            m.peers[1].store.engine.rows(crate::store::Table::Objects).map(|(k, _)| k.to_vec()).collect();
        assert_eq!(rows.len(), 1);
        m.peers[1].store.engine.poke(crate::store::Table::Objects, &rows[0], vec![1, 2, 3]);
        // A read meets it: an error, never "absent"; the row is quarantined and refilled.
        let r = m.peers[1].store.run(StoreOp::Read { key: b"c".to_vec() });
        assert!(r.is_err());
        let q =
            m.peers[1].store.run(StoreOp::Quarantine { table: crate::store::Table::Objects, row_key: rows[0].clone() });
        assert_eq!(q, Ok(StoreOutcome::Done));
        m.run(5000);
        assert_eq!(m.peers[1].store.object(b"c").map(|o| o.values().count()), Some(1));
    }
}
