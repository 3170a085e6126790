//! Membership and gossip (Dynamo §4.8): who is in the cluster and which ring they agree on.
//!
//! Each node holds a table of member records. A record changes only by its owner (or an
//! admin acting for it) raising its `incarnation`; merging two tables keeps, per member, the
//! greatest record in one total order, so the merge is commutative, associative and
//! idempotent and any gossip order converges. Departed members stay as `Left` tombstones so
//! an old record cannot bring them back.
//!
//! With certificates, a record is signed by its owner's key ([`RecordSigner`]) and a record
//! whose signature does not check is dropped like a malformed one, on receipt and on load: no
//! other node, and no client, can change where a node's traffic goes. A record also may not
//! jump more than [`INCARNATION_STEP_MAX`] past the one it replaces.
//!
//! The ring is not gossiped: every node derives it from the table. Each join and leave is an
//! event stamped with a Lamport sequence number; the ring is the fold of those events in
//! (sequence, id) order, each step a minimal-movement [`Ring::rebalance`]. Nodes with the
//! same table therefore compute the same ring, and the *epoch* is the number of events.
//!
//! A node with no saved membership that is one of its own seeds founds (or re-founds) the
//! cluster at once; any other new node waits until gossip from a seed shows it the cluster,
//! then joins with a sequence number after every event it has seen, so its join moves only
//! the partitions it takes. Every interval a node gossips with one random live peer, and
//! every few rounds with a seed as well, so no logical partition of the ring persists.

use crate::namespace::Namespaces;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ring::{NodeId, NodeSpec, Ring, RingError};

/// A member's state as the cluster records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum MemberState {
    /// In the ring; receiving the partitions it now owns.
    Joining,
    Up,
    /// Out of the ring; handing its data to the new owners.
    Leaving,
    /// Gone. Kept as a tombstone.
    Left,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Joining => "joining",
            MemberState::Up => "up",
            MemberState::Leaving => "leaving",
            MemberState::Left => "left",
        }
    }

    /// Whether a member in this state owns partitions.
    pub fn in_ring(self) -> bool {
        matches!(self, MemberState::Joining | MemberState::Up)
    }
}

/// One member's record. Field order is the merge order: the greatest record wins.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Member {
    pub incarnation: u64,
    pub state: MemberState,
    /// Lamport stamp of the join event.
    pub join_seq: u64,
    /// Lamport stamp of the leave event, once leaving.
    pub leave_seq: Option<u64>,
    pub id: NodeId,
    pub addr: String,
    pub zone: Option<String>,
    pub weight: u32,
    /// The owner's signature over every other field, with certificates; None in secret-only
    /// mode (and in records of earlier versions, read as None).
    #[serde(default)]
    pub signature: Option<RecordSignature>,
}

/// A member record's signature by its owner's key, with the owner's certificate (DER): opaque
/// here; a [`RecordSigner`] makes and checks them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RecordSignature {
    #[serde(with = "serde_bytes")]
    pub cert: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub sig: Vec<u8>,
}

/// Signs this node's own member records and checks everyone's: the node's certificate and
/// key, handed in like time and randomness (the core holds no keys and does no crypto).
pub trait RecordSigner: Send + Sync {
    /// This node's signature over a record's content; None when it cannot sign.
    fn sign(&self, content: &[u8]) -> Option<RecordSignature>;
    /// Whether `signature` is node `id`'s over `content`.
    fn verify(&self, id: &str, content: &[u8], signature: &RecordSignature) -> bool;
}

/// A shared [`RecordSigner`], for settings that compare and print.
#[derive(Clone)]
pub struct Signer(pub Arc<dyn RecordSigner>);

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer")
    }
}

impl PartialEq for Signer {
    fn eq(&self, other: &Signer) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Signer {}

/// Most a member's incarnation may rise in one step: an owner raises it by one per change,
/// so a record far past the one held is forged or corrupt.
pub const INCARNATION_STEP_MAX: u64 = 1 << 20;

impl Member {
    /// The bytes a signature covers: every field but the signature.
    pub fn signed_content(&self) -> Vec<u8> {
        let fields = (
            self.incarnation,
            self.state,
            self.join_seq,
            self.leave_seq,
            &self.id,
            &self.addr,
            &self.zone,
            self.weight,
        );
        rmp_serde::to_vec(&fields).unwrap_or_default()
    }

    pub fn spec(&self) -> NodeSpec {
        NodeSpec { id: self.id.clone(), zone: self.zone.clone(), weight: self.weight }
    }

    /// Check a record received by gossip or read from disk: a usable id, address, zone and
    /// weight (the bounds a node's config is held to). A bad record is dropped, never merged.
    pub fn validate(&self) -> Result<(), String> {
        if !valid_node_id(&self.id) {
            return Err(format!("member id {:?} is not 1..=64 letters, digits, '-', '_' or '.'", self.id));
        }
        if self.addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!("member {} has address {:?}, not IP:port", self.id, self.addr));
        }
        if matches!(&self.zone, Some(z) if z.is_empty() || z.len() > 64) {
            return Err(format!("member {} has an empty or overlong zone", self.id));
        }
        if self.weight == 0 || self.weight > 1000 {
            return Err(format!("member {} has weight {}, not in 1..=1000", self.id, self.weight));
        }
        if self.incarnation > SEQ_MAX || self.join_seq > SEQ_MAX || self.leave_seq.is_some_and(|s| s > SEQ_MAX) {
            return Err(format!("member {} has an incarnation or sequence number past {SEQ_MAX}", self.id));
        }
        Ok(())
    }
}

/// Largest incarnation or event sequence number a record may carry: far beyond any real
/// count and far below `u64::MAX`, so a node can always raise its own record or stamp an
/// event past every one it has seen.
pub const SEQ_MAX: u64 = 1 << 62;

/// Whether `id` can name a node: 1..=64 ASCII letters, digits, '-', '_' or '.'.
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A member record for tests of the stages: `id` in `state`, joined as the `seq`-th event
/// (a leaving member asked to leave after everyone joined), on a made-up address.
#[cfg(test)]
pub(crate) fn test_member(id: &str, seq: u64, state: MemberState) -> Member {
    Member {
        incarnation: 1,
        state,
        join_seq: seq,
        leave_seq: (state == MemberState::Leaving).then_some(100),
        id: id.into(),
        addr: format!("10.0.0.{seq}:1"),
        zone: None,
        weight: 1,
        signature: None,
    }
}

/// The membership as one node sees it, published to the stages that route by it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub me: NodeId,
    pub members: Vec<Member>,
    /// The ring, once this node knows the cluster.
    pub ring: Option<Arc<Ring>>,
    pub epoch: u64,
    /// The cluster's namespaces (gossiped beside the members).
    pub namespaces: Arc<Namespaces>,
}

impl View {
    pub fn member(&self, id: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    /// This node's own state, once it is a member.
    pub fn my_state(&self) -> Option<MemberState> {
        self.member(&self.me).map(|m| m.state)
    }
}

/// How this node stands in its own table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinStatus {
    /// Not yet a member: waiting to hear the cluster from a seed.
    Waiting,
    Member,
}

/// Something the gossiper wants done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GossipAction {
    /// Send our table to this address (a member's, or a seed's).
    Send { to_addr: String, to: Option<NodeId>, members: Vec<Member> },
    /// The table changed: persist it, and the ring may have changed.
    Changed,
}

/// The membership state machine of one node.
#[derive(Clone, Debug)]
pub struct Membership {
    me: Member,
    seeds: Vec<String>,
    members: BTreeMap<NodeId, Member>,
    status: JoinStatus,
    partitions: u32,
    replicas: u32,
    interval_ms: u64,
    next_round_ms: u64,
    round: u64,
    /// The ring of the current table; dropped whenever the table changes.
    ring: Option<Arc<Ring>>,
    outbox: VecDeque<GossipAction>,
    /// With certificates: signs our records, checks everyone's.
    signer: Option<Signer>,
}

/// Every how many rounds a node also gossips with a seed.
const SEED_EVERY_ROUNDS: u64 = 3;

/// A node's identity as its config gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub id: NodeId,
    pub addr: String,
    pub zone: Option<String>,
    pub weight: u32,
    /// With certificates: signs this node's records and checks everyone's.
    pub signer: Option<Signer>,
}

impl Membership {
    /// A node starting with `saved` (its persisted table, empty when new). A new node that is
    /// one of its own seeds founds the cluster; other new nodes wait to learn it.
    pub fn new(
        identity: Identity,
        seeds: Vec<String>,
        saved: Vec<Member>,
        partitions: u32,
        replicas: u32,
        interval_ms: u64,
        now_ms: u64,
    ) -> Membership {
        let Identity { id, addr, zone, weight, signer } = identity;
        let me = Member {
            incarnation: 0,
            state: MemberState::Up,
            join_seq: 0,
            leave_seq: None,
            id: id.clone(),
            addr,
            zone,
            weight,
            signature: None,
        };
        let mut m = Membership {
            me,
            seeds,
            members: BTreeMap::new(),
            status: JoinStatus::Waiting,
            partitions,
            replicas,
            interval_ms,
            next_round_ms: now_ms,
            round: 0,
            ring: None,
            outbox: VecDeque::new(),
            signer,
        };
        // A saved record is checked as a gossiped one is: a bad one is dropped, never merged.
        for rec in saved.into_iter().filter(|r| r.validate().is_ok()) {
            m.absorb(rec);
        }
        if m.members.contains_key(&id) {
            m.status = JoinStatus::Member;
            m.reassert();
        } else if m.seeds.contains(&m.me.addr) && m.members.is_empty() {
            m.join();
        }
        m
    }

    pub fn id(&self) -> &NodeId {
        &self.me.id
    }

    pub fn status(&self) -> JoinStatus {
        self.status
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub fn member(&self, id: &str) -> Option<&Member> {
        self.members.get(id)
    }

    /// The table as gossiped and persisted.
    pub fn table(&self) -> Vec<Member> {
        self.members.values().cloned().collect()
    }

    fn max_seq(&self) -> u64 {
        self.members.values().map(|m| m.join_seq.max(m.leave_seq.unwrap_or(0))).max().unwrap_or(0)
    }

    /// Sign one of our own records (with certificates).
    fn seal(&self, mut rec: Member) -> Member {
        rec.signature = None;
        rec.signature = self.signer.as_ref().and_then(|s| s.0.sign(&rec.signed_content()));
        rec
    }

    /// Whether a record is its owner's: always in secret-only mode; with certificates, when
    /// its signature checks against the owner's certificate.
    fn authentic(&self, rec: &Member) -> bool {
        match &self.signer {
            None => true,
            Some(s) => rec.signature.as_ref().is_some_and(|sig| s.0.verify(&rec.id, &rec.signed_content(), sig)),
        }
    }

    fn join(&mut self) {
        let mut rec = self.me.clone();
        rec.join_seq = self.max_seq() + 1;
        rec.state = MemberState::Up;
        let rec = self.seal(rec);
        self.members.insert(rec.id.clone(), rec);
        self.status = JoinStatus::Member;
        self.changed();
    }

    /// Our own record came back with an older address or a state we did not choose (a
    /// restart, a wiped disk): take the cluster's record and raise it past what was seen.
    fn reassert(&mut self) {
        let Some(cur) = self.members.get(&self.me.id).cloned() else { return };
        let state = match cur.state {
            MemberState::Leaving | MemberState::Left => cur.state,
            _ => MemberState::Up,
        };
        if cur.addr != self.me.addr || cur.zone != self.me.zone || cur.weight != self.me.weight || cur.state != state {
            let rec = Member {
                incarnation: cur.incarnation + 1,
                state,
                addr: self.me.addr.clone(),
                zone: self.me.zone.clone(),
                weight: self.me.weight,
                ..cur
            };
            let rec = self.seal(rec);
            self.members.insert(rec.id.clone(), rec);
            self.changed();
        }
    }

    fn changed(&mut self) {
        self.ring = None;
        if !self.outbox.contains(&GossipAction::Changed) {
            self.outbox.push_back(GossipAction::Changed);
        }
    }

    /// Merge one record; true when the table changed.
    fn absorb(&mut self, rec: Member) -> bool {
        match self.members.get(&rec.id) {
            Some(cur) if *cur >= rec => false,
            Some(cur) if rec.incarnation > cur.incarnation.saturating_add(INCARNATION_STEP_MAX) => false,
            _ if !self.authentic(&rec) => false,
            _ => {
                self.members.insert(rec.id.clone(), rec);
                true
            }
        }
    }

    /// Merge a table received by gossip. Returns whether anything changed; a node that was
    /// waiting joins once it sees another member.
    pub fn handle_gossip(&mut self, _now_ms: u64, members: Vec<Member>) -> bool {
        let mut changed = false;
        for rec in members {
            if rec.validate().is_ok() {
                changed |= self.absorb(rec);
            }
        }
        if changed {
            self.changed();
        }
        match self.status {
            JoinStatus::Waiting if self.members.keys().any(|k| *k != self.me.id) => {
                if self.members.contains_key(&self.me.id) {
                    self.status = JoinStatus::Member;
                    self.reassert();
                } else {
                    self.join();
                }
                true
            }
            JoinStatus::Member => {
                self.reassert();
                changed
            }
            JoinStatus::Waiting => changed,
        }
    }

    /// Mark `node` as leaving (an admin's `leave`, on any node). Its partitions go to others.
    pub fn leave(&mut self, node: &str) -> Result<(), MembershipError> {
        let seq = self.max_seq() + 1;
        let cur = self.members.get(node).cloned().ok_or_else(|| MembershipError::NotMember(node.to_string()))?;
        if !cur.state.in_ring() {
            return Ok(());
        }
        let others = self.members.values().filter(|m| m.state.in_ring() && m.id != node).count();
        if others == 0 {
            return Err(MembershipError::LastMember(node.to_string()));
        }
        if self.signer.is_some() && node != self.me.id {
            return Err(MembershipError::NotOwner(node.to_string()));
        }
        let rec = Member { incarnation: cur.incarnation + 1, state: MemberState::Leaving, leave_seq: Some(seq), ..cur };
        let rec = self.seal(rec);
        self.members.insert(rec.id.clone(), rec);
        self.changed();
        Ok(())
    }

    /// A leaving node has handed everything away: record it as gone.
    pub fn mark_left(&mut self, node: &str) {
        if let Some(cur) = self.members.get(node).cloned() {
            if cur.state == MemberState::Leaving && (self.signer.is_none() || node == self.me.id) {
                let rec = Member { incarnation: cur.incarnation + 1, state: MemberState::Left, ..cur };
                let rec = self.seal(rec);
                self.members.insert(rec.id.clone(), rec);
                self.changed();
            }
        }
    }

    /// Time passed: one gossip round when due. `random` picks the peer.
    pub fn handle_tick(&mut self, now_ms: u64, random: u64, is_live: impl Fn(&str) -> bool) {
        if now_ms < self.next_round_ms {
            return;
        }
        self.next_round_ms = now_ms + self.interval_ms;
        self.round += 1;
        let table = self.table();
        let peers: Vec<&Member> = self
            .members
            .values()
            .filter(|m| m.id != self.me.id && m.state != MemberState::Left && is_live(&m.id))
            .collect();
        let mut sent_to: Option<String> = None;
        if !peers.is_empty() {
            let p = peers[(random % peers.len() as u64) as usize];
            sent_to = Some(p.addr.clone());
            self.outbox.push_back(GossipAction::Send {
                to_addr: p.addr.clone(),
                to: Some(p.id.clone()),
                members: table.clone(),
            });
        }
        let seeds: Vec<&String> = self.seeds.iter().filter(|s| **s != self.me.addr).collect();
        let want_seed = self.status == JoinStatus::Waiting || self.round % SEED_EVERY_ROUNDS == 0 || peers.is_empty();
        if want_seed && !seeds.is_empty() {
            let s = seeds[((random >> 32) % seeds.len() as u64) as usize];
            if sent_to.as_deref() != Some(s.as_str()) {
                let to = self.members.values().find(|m| m.addr == *s).map(|m| m.id.clone());
                self.outbox.push_back(GossipAction::Send { to_addr: s.clone(), to, members: table });
            }
        }
    }

    pub fn poll_action(&mut self) -> Option<GossipAction> {
        self.outbox.pop_front()
    }

    pub fn poll_timeout(&self) -> u64 {
        self.next_round_ms
    }

    /// The ring epoch: the number of join and leave events in the table.
    pub fn epoch(&self) -> u64 {
        self.members.values().map(|m| 1 + m.leave_seq.is_some() as u64).sum()
    }

    /// The view other stages route by.
    pub fn view(&mut self) -> View {
        let namespaces = Arc::default();
        View { me: self.me.id.clone(), members: self.table(), ring: self.ring(), epoch: self.epoch(), namespaces }
    }

    /// The ring every node with this table computes, or None before this node knows any.
    pub fn ring(&mut self) -> Option<Arc<Ring>> {
        if let Some(ring) = &self.ring {
            return Some(ring.clone());
        }
        let ring = Arc::new(ring_of(&self.table(), self.partitions, self.replicas).ok()?);
        self.ring = Some(ring.clone());
        Some(ring)
    }
}

/// Why a membership change was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("{0} is not a member of this cluster")]
    NotMember(NodeId),
    #[error("{0} is the last member: a cluster cannot be left empty")]
    LastMember(NodeId),
    #[error(
        "with certificates only {0} itself may change its record: send `admin leave {0}` to {0} (ringkv --node ITS_ADDRESS ...)"
    )]
    NotOwner(NodeId),
}

/// The ring a member table describes: join and leave events folded in (sequence, id) order.
pub fn ring_of(members: &[Member], partitions: u32, replicas: u32) -> Result<Ring, RingError> {
    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    enum Ev {
        Join,
        Leave,
    }
    let mut events: Vec<(u64, &str, Ev, &Member)> = Vec::new();
    for m in members {
        events.push((m.join_seq, &m.id, Ev::Join, m));
        if let Some(l) = m.leave_seq {
            events.push((l, &m.id, Ev::Leave, m));
        }
    }
    events.sort_by(|a, b| (a.0, a.1, &a.2).cmp(&(b.0, b.1, &b.2)));
    let mut current: Vec<NodeSpec> = Vec::new();
    let mut ring: Option<Ring> = None;
    for (_, id, ev, m) in events {
        match ev {
            Ev::Join => current.push(m.spec()),
            Ev::Leave => current.retain(|s| s.id != id),
        }
        if current.is_empty() {
            continue;
        }
        ring = Some(match ring {
            None => Ring::new(partitions, replicas, &current)?,
            Some(r) => r.rebalance(&current)?,
        });
    }
    ring.ok_or(RingError::NoMembers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(i: u32, seeds: &[u32]) -> Membership {
        Membership::new(
            Identity {
                id: format!("n{i}"),
                addr: format!("127.0.0.1:{}", 7100 + i),
                zone: None,
                weight: 1,
                signer: None,
            },
            seeds.iter().map(|s| format!("127.0.0.1:{}", 7100 + s)).collect(),
            Vec::new(),
            64,
            3,
            100,
            0,
        )
    }

    /// Deliver every pending gossip send among `nodes` (push and pull).
    fn exchange(nodes: &mut [Membership], now: u64, random: u64) {
        for i in 0..nodes.len() {
            nodes[i].handle_tick(now, random.wrapping_mul(i as u64 + 1), |_| true);
            while let Some(a) = nodes[i].poll_action() {
                if let GossipAction::Send { to_addr, members, .. } = a {
                    if let Some(j) = nodes.iter().position(|n| n.me.addr == to_addr) {
                        nodes[j].handle_gossip(now, members);
                        let back = nodes[j].table();
                        nodes[i].handle_gossip(now, back);
                    }
                }
            }
        }
    }

    #[test]
    fn records_past_the_sequence_limit_are_dropped_from_gossip_and_disk() {
        // Found by fuzzing: a record with an incarnation or sequence number of u64::MAX, from
        // a peer or the saved table (which was not checked at all), overflowed `+ 1` when the
        // node raised its own record past it or stamped its join after it.
        let bad = |id: &str, port: u16| Member {
            incarnation: u64::MAX,
            state: MemberState::Up,
            join_seq: u64::MAX,
            leave_seq: Some(u64::MAX),
            id: id.into(),
            addr: format!("127.0.0.1:{port}"),
            zone: None,
            weight: 1,
            signature: None,
        };
        assert!(bad("n1", 1).validate().is_err());
        let saved = vec![bad("n1", 9), Member { weight: 0, ..bad("n2", 7102) }];
        let mut m = Membership::new(
            Identity { id: "n1".into(), addr: "127.0.0.1:7101".into(), zone: None, weight: 1, signer: None },
            vec!["127.0.0.1:7101".into()],
            saved,
            64,
            3,
            100,
            0,
        );
        assert_eq!(m.member("n1").map(|r| r.incarnation), Some(0), "the bad saved record was dropped");
        assert!(m.member("n2").is_none());
        assert!(!m.handle_gossip(1, vec![bad("n1", 9), bad("n3", 7103)]));
        assert_eq!(m.table().len(), 1);
        assert!(m.table().iter().all(|r| r.validate().is_ok()));
    }

    #[test]
    fn seeds_found_and_others_join_then_all_agree() {
        let mut nodes: Vec<Membership> = (1..=5).map(|i| node(i, &[1, 2])).collect();
        assert_eq!(nodes[0].status(), JoinStatus::Member);
        assert_eq!(nodes[1].status(), JoinStatus::Member);
        assert_eq!(nodes[2].status(), JoinStatus::Waiting);
        assert!(nodes[2].ring().is_none());
        for round in 0..20 {
            exchange(&mut nodes, round * 100, round * 7919 + 13);
        }
        let epoch = nodes[0].epoch();
        assert_eq!(epoch, 5);
        let ring = nodes[0].ring().unwrap();
        for n in nodes.iter_mut() {
            assert_eq!(n.status(), JoinStatus::Member);
            assert_eq!(n.epoch(), epoch);
            assert_eq!(n.ring().unwrap(), ring);
        }
        assert_eq!(ring.members().len(), 5);
    }

    #[test]
    fn a_late_joiner_moves_only_its_share() {
        let mut nodes: Vec<Membership> = (1..=4).map(|i| node(i, &[1])).collect();
        for round in 0..20 {
            exchange(&mut nodes, round * 100, round * 31 + 1);
        }
        let before = nodes[0].ring().unwrap();
        nodes.push(node(5, &[1]));
        for round in 20..40 {
            exchange(&mut nodes, round * 100, round * 31 + 1);
        }
        let after = nodes[0].ring().unwrap();
        let moved = (0..64).filter(|&p| before.owner(p) != after.owner(p)).count();
        assert!(moved <= 14, "moved {moved}, n5's share is ~13");
        assert!((0..64).filter(|&p| before.owner(p) != after.owner(p)).all(|p| after.owner(p) == "n5"));
    }

    #[test]
    fn leave_removes_from_ring_and_left_is_final() {
        let mut nodes: Vec<Membership> = (1..=3).map(|i| node(i, &[1])).collect();
        for round in 0..20 {
            exchange(&mut nodes, round * 100, round + 5);
        }
        nodes[0].leave("n3").unwrap();
        assert_eq!(nodes[0].leave("n9"), Err(MembershipError::NotMember("n9".into())));
        for round in 20..40 {
            exchange(&mut nodes, round * 100, round + 5);
        }
        for n in nodes.iter_mut() {
            assert_eq!(n.member("n3").unwrap().state, MemberState::Leaving);
            assert!(!n.ring().unwrap().is_member("n3"));
        }
        nodes[2].mark_left("n3");
        // An old record of n3 as up does not bring it back.
        let stale = nodes[1].table();
        for round in 40..60 {
            exchange(&mut nodes, round * 100, round + 5);
        }
        nodes[0].handle_gossip(0, stale);
        assert_eq!(nodes[0].member("n3").unwrap().state, MemberState::Left);
        let mut solo = node(1, &[1]);
        assert_eq!(solo.leave("n1"), Err(MembershipError::LastMember("n1".into())));
    }

    #[test]
    fn restart_with_wiped_table_rejoins_under_same_id() {
        let mut nodes: Vec<Membership> = (1..=3).map(|i| node(i, &[1])).collect();
        for round in 0..20 {
            exchange(&mut nodes, round * 100, round + 3);
        }
        let ring = nodes[0].ring().unwrap();
        nodes[2] = node(3, &[1]); // data dir wiped
        for round in 20..40 {
            exchange(&mut nodes, round * 100, round + 3);
        }
        assert_eq!(nodes[2].ring().unwrap(), ring, "same ring: the id kept its place");
        assert_eq!(nodes[2].epoch(), 3);
    }

    fn arb_member() -> impl Strategy<Value = Member> {
        (0u64..3, 0usize..4, 0u64..4, proptest::option::of(0u64..4), 0u32..3, 0u32..2).prop_map(
            |(inc, st, js, ls, id, a)| Member {
                incarnation: inc,
                state: [MemberState::Joining, MemberState::Up, MemberState::Leaving, MemberState::Left][st],
                join_seq: js,
                leave_seq: ls,
                id: format!("n{id}"),
                addr: format!("a{a}"),
                zone: None,
                weight: 1,
                signature: None,
            },
        )
    }

    fn merged(tables: &[&Vec<Member>]) -> Vec<Member> {
        let mut m = node(9, &[]);
        for t in tables {
            for r in t.iter() {
                m.absorb(r.clone());
            }
        }
        m.table()
    }

    proptest! {
        #[test]
        fn merge_is_a_join(a in proptest::collection::vec(arb_member(), 0..6),
                           b in proptest::collection::vec(arb_member(), 0..6),
                           c in proptest::collection::vec(arb_member(), 0..6)) {
            prop_assert_eq!(merged(&[&a, &b]), merged(&[&b, &a]));
            prop_assert_eq!(merged(&[&merged(&[&a, &b]), &c]), merged(&[&a, &merged(&[&b, &c])]));
            prop_assert_eq!(merged(&[&a, &a]), merged(&[&a]));
        }
    }

    /// A stand-in for certificates: node X's "signature" is an MD5 of X's secret and the
    /// content; the "certificate" names X.
    struct FakeSigner(String);

    fn fake_sig(id: &str, content: &[u8]) -> Vec<u8> {
        use md5::{Digest, Md5};
        Md5::new().chain_update(b"key of ").chain_update(id).chain_update(content).finalize().to_vec()
    }

    impl RecordSigner for FakeSigner {
        fn sign(&self, content: &[u8]) -> Option<RecordSignature> {
            Some(RecordSignature { cert: self.0.as_bytes().to_vec(), sig: fake_sig(&self.0, content) })
        }
        fn verify(&self, id: &str, content: &[u8], s: &RecordSignature) -> bool {
            s.cert == id.as_bytes() && s.sig == fake_sig(id, content)
        }
    }

    fn signed_node(i: u32, seeds: &[u32]) -> Membership {
        let id = format!("n{i}");
        Membership::new(
            Identity {
                id: id.clone(),
                addr: format!("127.0.0.1:{}", 7100 + i),
                zone: None,
                weight: 1,
                signer: Some(Signer(Arc::new(FakeSigner(id.clone())))),
            },
            seeds.iter().map(|s| format!("127.0.0.1:{}", 7100 + s)).collect(),
            Vec::new(),
            64,
            3,
            100,
            0,
        )
    }

    #[test]
    fn with_signatures_only_a_records_owner_can_change_it() {
        let mut a = signed_node(1, &[1]);
        let mut b = signed_node(2, &[1]);
        b.handle_gossip(0, a.table());
        a.handle_gossip(0, b.table());
        assert!(a.member("n2").is_some_and(|m| m.signature.is_some()), "b's own signed record is taken");
        let n2 = a.member("n2").cloned().unwrap();
        // n1 (or anyone) forging n2's record: unsigned, signed by n1, or n2's signature over
        // other content. None is taken.
        let moved =
            Member { incarnation: n2.incarnation + 1, addr: "127.0.0.1:9".into(), signature: None, ..n2.clone() };
        let by_n1 = Member { signature: FakeSigner("n1".into()).sign(&moved.signed_content()), ..moved.clone() };
        let replayed = Member { signature: n2.signature.clone(), ..moved.clone() };
        for forged in [moved, by_n1, replayed] {
            assert!(!a.handle_gossip(1, vec![forged.clone()]), "{forged:?}");
            assert_eq!(a.member("n2"), Some(&n2));
        }
        // A leave of another node is refused; the node itself may leave.
        assert_eq!(a.leave("n2"), Err(MembershipError::NotOwner("n2".into())));
        assert_eq!(b.leave("n2"), Ok(()));
        assert!(a.handle_gossip(2, b.table()));
        assert_eq!(a.member("n2").map(|m| m.state), Some(MemberState::Leaving));
        // Saved records are held to the same rule.
        let mut saved = a.table();
        saved.iter_mut().for_each(|m| m.signature = None);
        let c = Membership::new(
            Identity {
                id: "n3".into(),
                addr: "127.0.0.1:7103".into(),
                zone: None,
                weight: 1,
                signer: Some(Signer(Arc::new(FakeSigner("n3".into())))),
            },
            vec!["127.0.0.1:7101".into()],
            saved,
            64,
            3,
            100,
            0,
        );
        assert_eq!(c.members().count(), 0);
    }

    #[test]
    fn a_record_may_not_jump_far_past_the_one_it_replaces() {
        let mut a = node(1, &[1]);
        let mut b = node(2, &[1]);
        b.handle_gossip(0, a.table());
        a.handle_gossip(0, b.table());
        let n2 = a.member("n2").cloned().unwrap();
        let far = Member { incarnation: n2.incarnation + INCARNATION_STEP_MAX + 1, weight: 5, ..n2.clone() };
        assert!(!a.handle_gossip(1, vec![far]));
        let near = Member { incarnation: n2.incarnation + 2, weight: 5, ..n2.clone() };
        assert!(a.handle_gossip(1, vec![near]));
    }
}
