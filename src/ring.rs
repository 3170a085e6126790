//! Consistent hashing: where a key lives (Dynamo §4.2 and §6.2, strategy 3).
//!
//! A key's position is the MD5 of its bytes read as a 128-bit number. The ring is cut into
//! Q equal partitions (Q a power of two, so a partition is the top log2(Q) bits of the
//! position) and each partition is owned by one node; a node owns about Q/S of them, in
//! proportion to its weight. The preference list of a partition is the first N *distinct
//! physical* nodes met walking the ring from it, spread across zones when there are at
//! least N zones; the nodes after those are the ordered fallbacks of a sloppy quorum.
//!
//! [`Ring::rebalance`] recomputes ownership after members change and moves the fewest
//! partitions it can: survivors keep everything up to their new quota, and a node below its
//! quota only claims partitions from nodes above theirs. Claims prefer partitions with no
//! other partition of the same node (or zone) within N-1 positions, so preference lists stay
//! short walks of distinct nodes.

use std::collections::{BTreeMap, BTreeSet};

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

/// A node's stable name (`node.id` in its config).
pub type NodeId = String;

/// Smallest and largest partition counts a cluster may be created with.
pub const PARTITIONS_MIN: u32 = 8;
pub const PARTITIONS_MAX: u32 = 4096;

/// The MD5 position of a key on the 128-bit ring.
pub fn key_position(key: &[u8]) -> u128 {
    let digest = Md5::digest(key);
    u128::from_be_bytes(digest.into())
}

/// The partition holding a position, for a ring of `q` partitions (a power of two).
pub fn partition_of_position(position: u128, q: u32) -> u32 {
    debug_assert!(q.is_power_of_two());
    let bits = q.trailing_zeros();
    if bits == 0 {
        0
    } else {
        (position >> (128 - bits)) as u32
    }
}

/// A member as the ring sees it: its id, optional zone and relative capacity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub id: NodeId,
    pub zone: Option<String>,
    pub weight: u32,
}

impl NodeSpec {
    pub fn new(id: impl Into<NodeId>) -> Self {
        NodeSpec { id: id.into(), zone: None, weight: 1 }
    }

    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }
}

/// Why a ring cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("partition count {0} must be a power of two in {PARTITIONS_MIN}..={PARTITIONS_MAX}")]
    BadPartitionCount(u32),
    #[error("a ring needs at least one member")]
    NoMembers,
    #[error("member {0:?} appears twice")]
    DuplicateMember(NodeId),
    #[error("member {0:?} has weight 0")]
    ZeroWeight(NodeId),
    #[error("member id must not be empty")]
    EmptyId,
}

/// The preference list of one partition: the N replicas, then the fallbacks in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreferenceList {
    pub primaries: Vec<NodeId>,
    pub fallbacks: Vec<NodeId>,
}

impl PreferenceList {
    /// Primaries followed by fallbacks: the order a sloppy quorum tries nodes in.
    pub fn walk(&self) -> impl Iterator<Item = &NodeId> {
        self.primaries.iter().chain(self.fallbacks.iter())
    }
}

/// Ownership of every partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    /// Members sorted by id; `owners` indexes into this.
    members: Vec<NodeSpec>,
    /// The owner (first replica) of each partition.
    owners: Vec<u16>,
    /// The N the assignment spaces partitions for.
    spacing: u32,
}

impl Ring {
    /// A fresh ring of `q` partitions over `members`, spaced for `n` replicas.
    pub fn new(q: u32, n: u32, members: &[NodeSpec]) -> Result<Ring, RingError> {
        if !q.is_power_of_two() || !(PARTITIONS_MIN..=PARTITIONS_MAX).contains(&q) {
            return Err(RingError::BadPartitionCount(q));
        }
        let members = checked_members(members)?;
        let unassigned = vec![None; q as usize];
        Ok(assign(unassigned, members, n.max(1)))
    }

    /// Ownership for a new member set, moving as few partitions as possible from `self`.
    pub fn rebalance(&self, members: &[NodeSpec]) -> Result<Ring, RingError> {
        let members = checked_members(members)?;
        let index: BTreeMap<&str, u16> = members.iter().enumerate().map(|(i, m)| (m.id.as_str(), i as u16)).collect();
        let kept: Vec<Option<u16>> =
            self.owners.iter().map(|&o| index.get(self.members[o as usize].id.as_str()).copied()).collect();
        Ok(assign(kept, members, self.spacing))
    }

    pub fn partitions(&self) -> u32 {
        self.owners.len() as u32
    }

    pub fn members(&self) -> &[NodeSpec] {
        &self.members
    }

    pub fn is_member(&self, id: &str) -> bool {
        self.member_index(id).is_some()
    }

    fn member_index(&self, id: &str) -> Option<usize> {
        self.members.binary_search_by(|m| m.id.as_str().cmp(id)).ok()
    }

    /// The partition a key belongs to.
    pub fn partition_for_key(&self, key: &[u8]) -> u32 {
        partition_of_position(key_position(key), self.partitions())
    }

    /// The first replica of a partition.
    pub fn owner(&self, partition: u32) -> &NodeId {
        &self.members[self.owners[partition as usize] as usize].id
    }

    /// Number of partitions each member owns (is first in the preference list of).
    pub fn owned_counts(&self) -> BTreeMap<NodeId, u32> {
        let mut counts: BTreeMap<NodeId, u32> = self.members.iter().map(|m| (m.id.clone(), 0)).collect();
        for &o in &self.owners {
            *counts.entry(self.members[o as usize].id.clone()).or_default() += 1;
        }
        counts
    }

    /// Partitions a member owns.
    pub fn owned_by(&self, id: &str) -> Vec<u32> {
        match self.member_index(id) {
            Some(i) => (0..self.partitions()).filter(|&p| self.owners[p as usize] as usize == i).collect(),
            None => Vec::new(),
        }
    }

    /// The preference list of a partition: N distinct nodes walking the ring from it,
    /// chosen to cover as many zones as possible, then every other member as fallbacks.
    pub fn preference_list(&self, partition: u32, n: usize) -> PreferenceList {
        let walk = self.distinct_walk(partition);
        let n = n.min(walk.len());
        let zoned = self.members.iter().any(|m| m.zone.is_some());
        let mut chosen: Vec<bool> = vec![false; walk.len()];
        let mut picked = 0;
        if zoned {
            let mut zones: BTreeSet<Option<&str>> = BTreeSet::new();
            for (i, &m) in walk.iter().enumerate() {
                if picked == n {
                    break;
                }
                if zones.insert(self.members[m].zone.as_deref()) {
                    chosen[i] = true;
                    picked += 1;
                }
            }
        }
        for c in chosen.iter_mut() {
            if picked == n {
                break;
            }
            if !*c {
                *c = true;
                picked += 1;
            }
        }
        let mut primaries = Vec::with_capacity(n);
        let mut fallbacks = Vec::with_capacity(walk.len() - n);
        for (i, &m) in walk.iter().enumerate() {
            let id = self.members[m].id.clone();
            if chosen[i] {
                primaries.push(id);
            } else {
                fallbacks.push(id);
            }
        }
        PreferenceList { primaries, fallbacks }
    }

    /// Whether `node` is among the N replicas of `partition`.
    pub fn is_replica(&self, partition: u32, n: usize, node: &str) -> bool {
        self.preference_list(partition, n).primaries.iter().any(|p| p == node)
    }

    /// Partitions whose N replicas include `node`.
    pub fn replicated_by(&self, node: &str, n: usize) -> Vec<u32> {
        self.replica_sets(node, n).into_iter().map(|(p, _)| p).collect()
    }

    /// Each partition whose N replicas include `node`, with those replicas: what a node
    /// compares with its peers (anti-entropy) and must agree on (reaping).
    pub fn replica_sets(&self, node: &str, n: usize) -> Vec<(u32, Vec<NodeId>)> {
        (0..self.partitions())
            .map(|p| (p, self.preference_list(p, n).primaries))
            .filter(|(_, replicas)| replicas.iter().any(|r| r == node))
            .collect()
    }

    /// Distinct members in ring order starting at `partition`.
    fn distinct_walk(&self, partition: u32) -> Vec<usize> {
        let q = self.owners.len();
        let mut seen = vec![false; self.members.len()];
        let mut walk = Vec::with_capacity(self.members.len());
        for step in 0..q {
            let m = self.owners[(partition as usize + step) % q] as usize;
            if !seen[m] {
                seen[m] = true;
                walk.push(m);
                if walk.len() == self.members.len() {
                    break;
                }
            }
        }
        walk
    }

    /// Each member's share of partitions against its fair (weighted) share; members off by
    /// more than `threshold` (0.15 is the paper's 15%) are flagged.
    pub fn load_report(&self, threshold: f64) -> LoadReport {
        let total_weight: u64 = self.members.iter().map(|m| m.weight as u64).sum();
        let counts = self.owned_counts();
        let q = self.partitions() as f64;
        let members: Vec<MemberLoad> = self
            .members
            .iter()
            .map(|m| {
                let share = counts.get(&m.id).copied().unwrap_or(0) as f64 / q;
                let fair = m.weight as f64 / total_weight as f64;
                MemberLoad { id: m.id.clone(), share, fair_share: fair, imbalance: share / fair - 1.0 }
            })
            .collect();
        let out_of_balance = members.iter().filter(|m| m.imbalance.abs() > threshold).map(|m| m.id.clone()).collect();
        LoadReport { members, out_of_balance }
    }
}

/// One member's load against its fair share.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberLoad {
    pub id: NodeId,
    pub share: f64,
    pub fair_share: f64,
    /// share / fair_share - 1: 0 is perfect, 0.15 is 15% over.
    pub imbalance: f64,
}

/// Load balance of a ring (Dynamo §6.2).
#[derive(Clone, Debug, PartialEq)]
pub struct LoadReport {
    pub members: Vec<MemberLoad>,
    pub out_of_balance: Vec<NodeId>,
}

fn checked_members(members: &[NodeSpec]) -> Result<Vec<NodeSpec>, RingError> {
    if members.is_empty() {
        return Err(RingError::NoMembers);
    }
    if members.len() > u16::MAX as usize {
        return Err(RingError::NoMembers);
    }
    let mut sorted = members.to_vec();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    for w in sorted.windows(2) {
        if w[0].id == w[1].id {
            return Err(RingError::DuplicateMember(w[0].id.clone()));
        }
    }
    for m in &sorted {
        if m.id.is_empty() {
            return Err(RingError::EmptyId);
        }
        if m.weight == 0 {
            return Err(RingError::ZeroWeight(m.id.clone()));
        }
    }
    Ok(sorted)
}

/// Each member's quota of `q` partitions, proportional to weight; the remainder goes to the
/// largest fractional parts (ties to the earlier id), so quotas always sum to `q`.
fn quotas(q: u32, members: &[NodeSpec]) -> Vec<u32> {
    let total: u64 = members.iter().map(|m| m.weight as u64).sum();
    let mut quota: Vec<u32> = Vec::with_capacity(members.len());
    let mut rest: Vec<(u64, usize)> = Vec::with_capacity(members.len());
    for (i, m) in members.iter().enumerate() {
        let exact = q as u64 * m.weight as u64;
        quota.push((exact / total) as u32);
        rest.push((exact % total, i));
    }
    let given: u32 = quota.iter().sum();
    rest.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in rest.iter().take((q - given) as usize) {
        quota[i] += 1;
    }
    quota
}

/// Working state of an assignment.
struct Assigner<'a> {
    members: &'a [NodeSpec],
    owners: Vec<Option<u16>>,
    quota: Vec<u32>,
    count: Vec<u32>,
    window: usize,
    zoned: bool,
}

impl Assigner<'_> {
    fn q(&self) -> usize {
        self.owners.len()
    }

    /// Whether giving partition `p` to member `m` keeps `m` (and, with zones, its zone) out of
    /// the `window` partitions on either side.
    fn spacing_ok(&self, p: usize, m: u16) -> (bool, bool) {
        let q = self.q();
        let zone = self.members[m as usize].zone.as_deref();
        let mut node_ok = true;
        let mut zone_ok = true;
        for d in 1..=self.window.min(q / 2) {
            for nb in [(p + d) % q, (p + q - d) % q] {
                if let Some(o) = self.owners[nb] {
                    if o == m {
                        node_ok = false;
                    }
                    if self.zoned && self.members[o as usize].zone.as_deref() == zone {
                        zone_ok = false;
                    }
                }
            }
        }
        (node_ok, zone_ok && node_ok)
    }

    fn give(&mut self, p: usize, m: u16) {
        if let Some(old) = self.owners[p] {
            self.count[old as usize] -= 1;
        }
        self.owners[p] = Some(m);
        self.count[m as usize] += 1;
    }

    /// Fill every unowned partition with the member below quota that fits best there.
    fn fill_unowned(&mut self) {
        for p in 0..self.q() {
            if self.owners[p].is_some() {
                continue;
            }
            let best = (0..self.members.len() as u16)
                .filter(|&m| self.count[m as usize] < self.quota[m as usize])
                .max_by_key(|&m| {
                    let (node_ok, zone_ok) = self.spacing_ok(p, m);
                    let deficit = self.quota[m as usize] - self.count[m as usize];
                    (zone_ok, node_ok, deficit, std::cmp::Reverse(m))
                });
            // Quotas sum to Q, so a member below quota exists while a partition is unowned.
            if let Some(m) = best {
                self.give(p, m);
            }
        }
    }

    /// Members below quota claim partitions from members above theirs, one at a time,
    /// each claim taking the partition that spaces best for the claimer.
    fn claim_surplus(&mut self) {
        loop {
            let claimer = (0..self.members.len() as u16)
                .filter(|&m| self.count[m as usize] < self.quota[m as usize])
                .max_by_key(|&m| (self.quota[m as usize] - self.count[m as usize], std::cmp::Reverse(m)));
            let Some(claimer) = claimer else { return };
            let own: BTreeSet<usize> = (0..self.q()).filter(|&p| self.owners[p] == Some(claimer)).collect();
            let best = (0..self.q())
                .filter_map(|p| {
                    let donor = self.owners[p]?;
                    (self.count[donor as usize] > self.quota[donor as usize]).then_some((p, donor))
                })
                .max_by_key(|&(p, donor)| {
                    let (node_ok, zone_ok) = self.spacing_ok(p, claimer);
                    let surplus = self.count[donor as usize] - self.quota[donor as usize];
                    (zone_ok, node_ok, circular_gap(&own, p, self.q()), surplus, std::cmp::Reverse(p))
                });
            match best {
                Some((p, _)) => self.give(p, claimer),
                None => return,
            }
        }
    }
}

/// Distance from `p` to the nearest partition in `own` (Q when `own` is empty).
fn circular_gap(own: &BTreeSet<usize>, p: usize, q: usize) -> usize {
    let after = own.range(p..).next().or_else(|| own.iter().next());
    let before = own.range(..=p).next_back().or_else(|| own.iter().next_back());
    let fwd = after.map(|&a| (a + q - p) % q).unwrap_or(q);
    let back = before.map(|&b| (p + q - b) % q).unwrap_or(q);
    fwd.min(back)
}

fn assign(kept: Vec<Option<u16>>, members: Vec<NodeSpec>, spacing: u32) -> Ring {
    let q = kept.len() as u32;
    let quota = quotas(q, &members);
    let mut count = vec![0u32; members.len()];
    for o in kept.iter().flatten() {
        count[*o as usize] += 1;
    }
    let zoned = members.iter().any(|m| m.zone.is_some());
    let window = (spacing as usize).saturating_sub(1).min(members.len().saturating_sub(1));
    let mut a = Assigner { members: &members, owners: kept, quota, count, window, zoned };
    a.fill_unowned();
    a.claim_surplus();
    // Every partition has an owner now: fill_unowned gives each one to some member.
    let owners = a.owners.iter().map(|o| o.unwrap_or(0)).collect();
    Ring { members, owners, spacing }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nodes(s: usize) -> Vec<NodeSpec> {
        (0..s).map(|i| NodeSpec::new(format!("n{i:02}"))).collect()
    }

    fn moved(a: &Ring, b: &Ring) -> u32 {
        (0..a.partitions()).filter(|&p| a.owner(p) != b.owner(p)).count() as u32
    }

    #[test]
    fn position_is_md5_big_endian() {
        // MD5("") = d41d8cd98f00b204e9800998ecf8427e
        assert_eq!(key_position(b""), 0xd41d8cd98f00b204e9800998ecf8427e);
        assert_eq!(partition_of_position(0xd41d8cd98f00b204e9800998ecf8427e, 16), 0xd);
        assert_eq!(partition_of_position(u128::MAX, 4096), 4095);
        assert_eq!(partition_of_position(0, 8), 0);
    }

    #[test]
    fn bad_partition_counts_are_refused() {
        for q in [0, 4, 12, 8192] {
            assert_eq!(Ring::new(q, 3, &nodes(3)), Err(RingError::BadPartitionCount(q)));
        }
        assert_eq!(Ring::new(64, 3, &[]), Err(RingError::NoMembers));
        let dup = vec![NodeSpec::new("a"), NodeSpec::new("a")];
        assert_eq!(Ring::new(64, 3, &dup), Err(RingError::DuplicateMember("a".into())));
        assert_eq!(Ring::new(64, 3, &[NodeSpec::new("a").weight(0)]), Err(RingError::ZeroWeight("a".into())));
    }

    #[test]
    fn equal_nodes_get_equal_shares_and_round_robin_spacing() {
        let ring = Ring::new(64, 3, &nodes(4)).unwrap();
        assert!(ring.owned_counts().values().all(|&c| c == 16));
        for p in 0..64 {
            let pl = ring.preference_list(p, 3);
            assert_eq!(pl.primaries.len(), 3);
            assert_eq!(pl.fallbacks.len(), 1);
            assert_eq!(&pl.primaries[0], ring.owner(p));
        }
    }

    #[test]
    fn weights_scale_shares() {
        let members = vec![NodeSpec::new("a").weight(1), NodeSpec::new("b").weight(3)];
        let ring = Ring::new(64, 2, &members).unwrap();
        let c = ring.owned_counts();
        assert_eq!((c["a"], c["b"]), (16, 48));
    }

    #[test]
    fn zones_spread_replicas() {
        let members = vec![
            NodeSpec::new("a1").zone("a"),
            NodeSpec::new("a2").zone("a"),
            NodeSpec::new("b1").zone("b"),
            NodeSpec::new("b2").zone("b"),
            NodeSpec::new("c1").zone("c"),
            NodeSpec::new("c2").zone("c"),
        ];
        let ring = Ring::new(64, 3, &members).unwrap();
        let zone = |id: &str| members.iter().find(|m| m.id == id).unwrap().zone.clone();
        for p in 0..64 {
            let zones: BTreeSet<_> = ring.preference_list(p, 3).primaries.iter().map(|id| zone(id)).collect();
            assert_eq!(zones.len(), 3, "partition {p}");
        }
    }

    #[test]
    fn replica_sets_cover_each_partition_n_times() {
        let ring = Ring::new(64, 3, &nodes(5)).unwrap();
        let mut seen = vec![0; 64];
        for m in nodes(5) {
            for (p, replicas) in ring.replica_sets(&m.id, 3) {
                assert_eq!(replicas, ring.preference_list(p, 3).primaries);
                assert!(replicas.contains(&m.id));
                seen[p as usize] += 1;
            }
            assert_eq!(ring.replicated_by(&m.id, 3).len(), ring.replica_sets(&m.id, 3).len());
        }
        assert!(seen.iter().all(|&c| c == 3), "{seen:?}");
        assert!(ring.replica_sets("nobody", 3).is_empty());
    }

    #[test]
    fn fewer_nodes_than_n_gives_all_nodes() {
        let ring = Ring::new(16, 3, &nodes(2)).unwrap();
        let pl = ring.preference_list(5, 3);
        assert_eq!(pl.primaries.len(), 2);
        assert!(pl.fallbacks.is_empty());
    }

    #[test]
    fn adding_a_node_moves_about_q_over_s() {
        let ring = Ring::new(256, 3, &nodes(8)).unwrap();
        let bigger = ring.rebalance(&nodes(9)).unwrap();
        let m = moved(&ring, &bigger);
        // The new node's quota is 28 or 29; rounding may move a partition or two more.
        assert!((28..=31).contains(&m), "moved {m}");
        assert_eq!(bigger.owned_counts()["n08"], 28);
    }

    #[test]
    fn rebalance_to_same_members_moves_nothing() {
        let ring = Ring::new(128, 3, &nodes(5)).unwrap();
        assert_eq!(ring.rebalance(&nodes(5)).unwrap(), ring);
    }

    #[test]
    fn load_report_flags_imbalance() {
        let ring = Ring::new(64, 3, &nodes(4)).unwrap();
        assert!(ring.load_report(0.15).out_of_balance.is_empty());
        // Same ownership, but pretend n00 should carry three times the load.
        let mut skewed = ring.clone();
        skewed.members[0].weight = 3;
        let report = skewed.load_report(0.15);
        assert_eq!(report.out_of_balance, vec!["n00", "n01", "n02", "n03"]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn balance_within_one_partition(s in 3usize..=64, qexp in 6u32..=10) {
            let q = 1u32 << qexp;
            prop_assume!(q as usize >= s);
            let ring = Ring::new(q, 3, &nodes(s)).unwrap();
            let counts = ring.owned_counts();
            let (lo, hi) = (q / s as u32, q.div_ceil(s as u32));
            prop_assert!(counts.values().all(|&c| c >= lo && c <= hi), "{counts:?}");
            prop_assert_eq!(counts.values().sum::<u32>(), q);
        }

        #[test]
        fn weighted_balance(weights in proptest::collection::vec(1u32..=4, 3..=24)) {
            let members: Vec<NodeSpec> = weights.iter().enumerate()
                .map(|(i, &w)| NodeSpec::new(format!("n{i:02}")).weight(w)).collect();
            let ring = Ring::new(1024, 3, &members).unwrap();
            let total: u32 = weights.iter().sum();
            for m in &members {
                let fair = 1024.0 * m.weight as f64 / total as f64;
                let got = ring.owned_counts()[&m.id] as f64;
                prop_assert!((got - fair).abs() <= 1.0, "{} got {got} fair {fair}", m.id);
            }
        }

        #[test]
        fn preference_lists_are_distinct(s in 1usize..=20, n in 1usize..=5, p in 0u32..64) {
            let ring = Ring::new(64, n as u32, &nodes(s)).unwrap();
            let pl = ring.preference_list(p, n);
            prop_assert_eq!(pl.primaries.len(), n.min(s));
            prop_assert_eq!(pl.primaries.len() + pl.fallbacks.len(), s);
            let all: BTreeSet<_> = pl.walk().collect();
            prop_assert_eq!(all.len(), s);
        }

        #[test]
        fn zones_distinct_when_enough_zones(zones in 3usize..=5, per_zone in 1usize..=4, p in 0u32..128) {
            let members: Vec<NodeSpec> = (0..zones * per_zone)
                .map(|i| NodeSpec::new(format!("n{i:02}")).zone(format!("z{}", i % zones))).collect();
            let ring = Ring::new(128, 3, &members).unwrap();
            let zone_of: BTreeMap<_, _> = members.iter().map(|m| (m.id.clone(), m.zone.clone())).collect();
            let zs: BTreeSet<_> = ring.preference_list(p, 3).primaries.iter().map(|id| zone_of[id].clone()).collect();
            prop_assert_eq!(zs.len(), 3);
        }

        #[test]
        fn add_moves_close_to_minimum(s in 3usize..=40, qexp in 7u32..=10) {
            let q = 1u32 << qexp;
            let before = Ring::new(q, 3, &nodes(s)).unwrap();
            let after = before.rebalance(&nodes(s + 1)).unwrap();
            let new_quota = after.owned_counts()[&format!("n{s:02}")];
            let m = moved(&before, &after);
            // Only the newcomer's quota moves, plus at most one partition per member whose
            // rounded quota changed.
            prop_assert!(m >= new_quota && m <= new_quota + s as u32 / 2 + 1, "moved {m} quota {new_quota}");
            // Nothing moved between two old members.
            for p in 0..q {
                if before.owner(p) != after.owner(p) {
                    prop_assert_eq!(after.owner(p), &format!("n{s:02}"));
                }
            }
        }

        #[test]
        fn remove_moves_only_the_leavers_partitions(s in 4usize..=40, gone in 0usize..40, qexp in 7u32..=10) {
            let q = 1u32 << qexp;
            let gone = gone % s;
            let before = Ring::new(q, 3, &nodes(s)).unwrap();
            let rest: Vec<NodeSpec> = nodes(s).into_iter().filter(|m| m.id != format!("n{gone:02}")).collect();
            let after = before.rebalance(&rest).unwrap();
            let lost = before.owned_by(&format!("n{gone:02}")).len() as u32;
            let m = moved(&before, &after);
            prop_assert!(m >= lost && m <= lost + s as u32 / 2 + 1, "moved {m}, leaver had {lost}");
            let counts = after.owned_counts();
            let (lo, hi) = (q / (s as u32 - 1), q.div_ceil(s as u32 - 1));
            prop_assert!(counts.values().all(|&c| c >= lo && c <= hi), "{counts:?}");
        }
    }
}
