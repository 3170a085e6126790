//! The node as a staged pipeline (SEDA; the paper's per-concern components, §4): which
//! stages a node has, what flows into and out of each, and where every input goes.
//!
//! Each concern is a [`Stage`]: a state machine that takes an [`Input`] (a message from
//! the network, a timer, a storage result, a signal from another stage) together with the
//! time, and hands back [`Effect`]s to carry out (send a message, run a storage operation,
//! signal other stages). The node runs each stage in its own actor; the simulation runs
//! them all in one thread. Both route with the functions here, [`route`] for messages and
//! [`subscribers`] for signals, so the wiring between stages exists once.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::access::{self, Identity, Role};
use crate::membership::View;
use crate::ring::NodeId;
use crate::store::{StoreError, StoreOp, StoreOutcome};
use crate::wire::{ClientRequest, Message};

/// A connection, as the transport numbers them.
pub type ConnId = u64;

/// The time an input arrives at: monotonic milliseconds for timers, wall-clock
/// milliseconds for versions and ages that other nodes compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Now {
    pub mono_ms: u64,
    pub wall_ms: u64,
}

/// The stages of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StageId {
    /// Client requests: per-request get/put state machines (§4.5, §5).
    Coordinator,
    /// The replica side of requests from coordinators and of handoff and reaping.
    Replica,
    /// Membership and gossip (§4.8).
    Gossip,
    /// Which peers answer (§4.8.3).
    FailureDetector,
    /// Hinted handoff, partition transfer, tombstone reaping, leaving (§4.6, §4.9).
    Handoff,
    /// Merkle-tree exchanges (§4.7).
    AntiEntropy,
    /// Budgets for background work (§6.5).
    Admission,
}

impl StageId {
    pub const ALL: [StageId; 7] = [
        StageId::Coordinator,
        StageId::Replica,
        StageId::Gossip,
        StageId::FailureDetector,
        StageId::Handoff,
        StageId::AntiEntropy,
        StageId::Admission,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StageId::Coordinator => "coordinator",
            StageId::Replica => "replica",
            StageId::Gossip => "gossip",
            StageId::FailureDetector => "failure_detector",
            StageId::Handoff => "handoff",
            StageId::AntiEntropy => "anti_entropy",
            StageId::Admission => "admission",
        }
    }
}

/// Where a message came from: the connection (answers go back on it) and, for a peer
/// node, the id it authenticated as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub conn: ConnId,
    pub node: Option<NodeId>,
    /// What the peer may do ([`crate::access`]): `Node` exactly when `node` is set.
    pub role: Role,
}

impl Origin {
    /// A peer node that authenticated as `node`.
    pub fn node(conn: ConnId, node: NodeId) -> Origin {
        Origin { conn, node: Some(node), role: Role::Node }
    }

    /// A client holding `role`.
    pub fn client(conn: ConnId, role: Role) -> Origin {
        Origin { conn, node: None, role }
    }

    /// Whoever authenticated as `identity`.
    pub fn of(conn: ConnId, identity: &Identity) -> Origin {
        match identity {
            Identity::Node(n) => Origin::node(conn, n.clone()),
            Identity::Client { role, .. } => Origin::client(conn, *role),
        }
    }
}

/// Where a message goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dest {
    /// A member, by id (the transport knows its address).
    Node(NodeId),
    /// An address, for seeds whose id is not known yet.
    Addr(String),
    /// Back on the connection a request came on.
    Conn(ConnId),
}

/// Something one stage tells others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Signal {
    /// The membership changed (from gossip).
    View(Arc<View>),
    /// The peers currently considered down (from the failure detector).
    Down(Arc<BTreeSet<NodeId>>),
    /// Each member's suspicion, phi in hundredths (failure detector to gossip, for status).
    Suspicion(Arc<Vec<(NodeId, u64)>>),
    /// An exchange with `node` succeeded or failed (to the failure detector).
    Report { node: NodeId, ok: bool },
    /// The transport could not reach `node`: every stage gives up what waits on it.
    Unreachable { node: NodeId },
    /// Background budgets in force (from admission).
    Budgets { handoff: u32, anti_entropy: u32, handoff_bytes_per_sec: u64, anti_entropy_bytes_per_sec: u64 },
    /// A client request took this long (to admission's latency feedback).
    Latency { ms: u64 },
    /// What foreground work waited on, in ms, sampled where it was seen (to admission's
    /// feedback): storage operations of client requests and replica writes from issue to
    /// result, and network messages in stage queues before their stage took them.
    Waited { storage: Vec<u64>, queue: Vec<u64> },
    /// This node handed everything away: record it as left (handoff to gossip).
    MarkLeft,
    /// Background work waiting, for `ringkv status` (handoff to gossip).
    Pending { hints: u64, transfers: u64 },
    /// Client requests this node took since it started, for `ringkv status` (coordinator to
    /// gossip): coordinated as a replica of the key, or for a key it does not replicate
    /// (a put forwarded to a replica, a get read from remote replicas only).
    Counters { coordinated: u64, forwarded: u64 },
    /// An anti-entropy exchange this node started completed (anti-entropy to the replica
    /// stage, for `admin partitions`): the partition, the peer, when (wall ms) and the keys
    /// it repaired (sent and received).
    Exchanged { partition: u32, peer: NodeId, wall_ms: u64, keys: u64 },
}

/// An input to a stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Message {
        from: Origin,
        msg: Message,
    },
    /// The stage's timer: called once `now` reaches its `poll_timeout`. `random` is fresh
    /// randomness for the stage (gossip picks peers with it).
    Tick {
        random: u64,
    },
    /// A storage operation this stage asked for finished.
    Stored {
        token: u64,
        result: Result<StoreOutcome, StoreError>,
    },
    /// A coordinated write ([`StoreOp::Coordinate`]) is computed, and its batch is about to
    /// commit: its `Stored` follows (the outcome again, or the error if the commit failed).
    /// A coordinator in `sync` mode starts replicating from here, so the coordinating
    /// replica's commit overlaps its replicas' instead of preceding them.
    Ahead {
        token: u64,
        outcome: StoreOutcome,
    },
    Signal(Signal),
}

/// Something a stage wants done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    Send {
        to: Dest,
        msg: Message,
    },
    /// Run a storage operation; its result comes back to this stage as `Input::Stored`
    /// with the same token, after the batch holding it committed (durably when `durable`,
    /// whatever the node's durability mode).
    Store {
        token: u64,
        op: StoreOp,
        durable: bool,
    },
    Signal(Signal),
    /// The members' addresses changed (for the transport's address book).
    Peers(Vec<(NodeId, String)>),
    /// Fault injection: drop traffic with these peers (None: restore all).
    Block(Option<Vec<NodeId>>),
}

/// A stage's state machine.
pub trait Stage {
    fn id(&self) -> StageId;
    fn handle(&mut self, now: Now, input: Input);
    fn poll_effect(&mut self) -> Option<Effect>;
    /// When the stage next wants `Input::Tick` (monotonic ms), if ever.
    fn poll_timeout(&self) -> Option<u64>;
    /// Add the figures this stage keeps to `out`, for export ([`crate::metrics`]).
    fn report(&self, _out: &mut crate::metrics::Report) {}
}

/// The stage that takes a message arriving from the network.
pub fn route(msg: &Message) -> Option<StageId> {
    use crate::wire::ReplicaRequest;
    Some(match msg {
        Message::Client { request, .. } => match request {
            ClientRequest::Get { .. } | ClientRequest::Put { .. } => StageId::Coordinator,
            ClientRequest::Status
            | ClientRequest::Ring
            | ClientRequest::Leave { .. }
            | ClientRequest::NamespaceCreate { .. }
            | ClientRequest::NamespaceSet { .. }
            | ClientRequest::Namespaces => StageId::Gossip,
            ClientRequest::Partitions
            | ClientRequest::Hints
            | ClientRequest::FaultBlock { .. }
            | ClientRequest::FaultUnblock => StageId::Replica,
            ClientRequest::Limits | ClientRequest::SetLimits { .. } => StageId::Admission,
            ClientRequest::Transfers => StageId::Handoff,
        },
        Message::Replica { request: ReplicaRequest::Forward { .. }, .. } => StageId::Coordinator,
        Message::Replica { .. } | Message::Handoff { .. } | Message::Reap { .. } => StageId::Replica,
        Message::ReplicaReply { .. } => StageId::Coordinator,
        Message::Gossip { .. } | Message::GossipReply { .. } => StageId::Gossip,
        Message::AntiEntropy { .. } => StageId::AntiEntropy,
        Message::HandoffAck { .. } | Message::ReapReply { .. } => StageId::Handoff,
        Message::Ping { .. } | Message::Pong { .. } => StageId::FailureDetector,
        Message::Hello(_)
        | Message::Welcome { .. }
        | Message::Refused { .. }
        | Message::ClientReply { .. }
        | Message::Error { .. } => return None,
    })
}

/// Where a message from the network goes, once the sender's role permits it
/// ([`access::check`]): Err with the refusal to send back, if the message expects an answer,
/// when it does not, or when no stage takes the message.
pub fn admit(from: &Origin, msg: &Message) -> Result<StageId, Option<Message>> {
    access::check(from.role, msg)?;
    route(msg).ok_or(None)
}

/// The stages a signal goes to.
pub fn subscribers(signal: &Signal) -> &'static [StageId] {
    use StageId::*;
    match signal {
        Signal::View(_) => &[Coordinator, Replica, FailureDetector, Handoff, AntiEntropy],
        Signal::Down(_) => &[Coordinator, Gossip, Handoff, AntiEntropy],
        Signal::Report { .. } => &[FailureDetector],
        Signal::Unreachable { .. } => &[Coordinator, Gossip, FailureDetector, Handoff, AntiEntropy],
        Signal::Budgets { .. } => &[Handoff, AntiEntropy],
        Signal::Latency { .. } | Signal::Waited { .. } => &[Admission],
        Signal::Exchanged { .. } => &[Replica],
        Signal::MarkLeft | Signal::Pending { .. } | Signal::Counters { .. } | Signal::Suspicion(_) => &[Gossip],
    }
}

/// Peers believed down, as a stage keeps them, and the success report owed when one of
/// them is heard from again.
#[derive(Clone, Debug, Default)]
pub struct DownSet(Arc<BTreeSet<NodeId>>);

impl DownSet {
    pub fn set(&mut self, down: Arc<BTreeSet<NodeId>>) {
        self.0 = down;
    }

    pub fn contains(&self, node: &str) -> bool {
        self.0.contains(node)
    }

    pub fn is_up(&self, node: &str) -> bool {
        !self.0.contains(node)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &NodeId> {
        self.0.iter()
    }

    /// A message came from `node`: a report for the failure detector if it was down here.
    pub fn heard(&self, node: &str) -> Option<Effect> {
        self.contains(node).then(|| Effect::Signal(Signal::Report { node: node.to_string(), ok: true }))
    }
}

/// Numbers storage operations and requests a stage sends, checked: ids never wrap.
#[derive(Clone, Debug)]
pub struct Ids(u64);

impl Default for Ids {
    fn default() -> Self {
        Ids(1)
    }
}

impl Ids {
    pub fn issue(&mut self) -> u64 {
        let id = self.0;
        self.0 = self.0.checked_add(1).unwrap_or(1);
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ReplicaReply, ReplicaRequest};

    #[test]
    fn every_request_has_one_stage_and_replies_go_to_the_requester() {
        let get = Message::Client { id: 1, request: ClientRequest::Get { key: Default::default(), r: None, ns: None } };
        assert_eq!(route(&get), Some(StageId::Coordinator));
        let fwd = Message::Replica {
            id: 1,
            request: ReplicaRequest::Forward { key: vec![], context: Default::default(), value: None, w: 1 },
        };
        assert_eq!(route(&fwd), Some(StageId::Coordinator));
        let read = Message::Replica { id: 1, request: ReplicaRequest::Read { key: vec![] } };
        assert_eq!(route(&read), Some(StageId::Replica));
        let reply = Message::ReplicaReply { id: 1, reply: ReplicaReply::Written };
        assert_eq!(route(&reply), Some(StageId::Coordinator));
        assert_eq!(route(&Message::HandoffAck { id: 1, ok: true }), Some(StageId::Handoff));
        let transfers = Message::Client { id: 1, request: ClientRequest::Transfers };
        assert_eq!(route(&transfers), Some(StageId::Handoff), "admin transfers: the handoff stage knows");
        assert_eq!(
            route(&Message::ClientReply {
                id: 1,
                response: crate::wire::ClientResponse::Written { context: String::new() },
                epoch: 0,
            }),
            None
        );
    }

    #[test]
    fn every_signal_reaches_someone_but_not_its_sender() {
        let view = Signal::View(Arc::new(View {
            me: "a".into(),
            members: vec![],
            ring: None,
            epoch: 0,
            namespaces: Default::default(),
        }));
        assert!(!subscribers(&view).contains(&StageId::Gossip));
        let down = Signal::Down(Arc::default());
        assert!(!subscribers(&down).contains(&StageId::FailureDetector));
        assert_eq!(subscribers(&Signal::Latency { ms: 1 }), &[StageId::Admission]);
        let exchanged = Signal::Exchanged { partition: 1, peer: "b".into(), wall_ms: 5, keys: 2 };
        assert_eq!(subscribers(&exchanged), &[StageId::Replica], "admin partitions shows exchanges");
    }
}
