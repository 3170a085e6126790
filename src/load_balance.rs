//! Load balance (Dynamo §6.2): how evenly the ring spreads data and requests.
//!
//! The paper calls a node in balance when its load deviates from the average by less than
//! 15%. Two loads are measured here. Data: each member's share of the partitions it is
//! first in the preference list for, against its fair share by weight
//! ([`crate::ring::Ring::load_report`]). Requests: each member counts the client requests it
//! served over the last minute ([`RequestWindow`]) and gossips that figure, stamped with
//! its own clock ([`LoadStat`]); every node merges the newest figure of each member
//! ([`LoadTable`]) and compares each member's share of all requests with its fair share.
//! The figures are informational: nothing routes by them, so they are not signed.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::ring::{NodeId, Ring};

/// A member off its fair share by more than this is out of balance (the paper's 15%).
pub const IMBALANCE_THRESHOLD: f64 = 0.15;
/// The window request loads are counted over.
pub const WINDOW_MS: u64 = 60_000;
/// Samples a window keeps at most (one a second is plenty).
const SAMPLES_MAX: usize = 128;

/// Requests this node served, as a running total sampled over time: the count over the
/// last [`WINDOW_MS`].
#[derive(Clone, Debug, Default)]
pub struct RequestWindow {
    samples: VecDeque<(u64, u64)>,
}

impl RequestWindow {
    /// The running total was `total` at `now_ms`.
    pub fn record(&mut self, now_ms: u64, total: u64) {
        if self.samples.back().is_some_and(|&(t, _)| now_ms < t.saturating_add(500)) {
            if let Some(last) = self.samples.back_mut() {
                last.1 = total.max(last.1);
            }
        } else {
            self.samples.push_back((now_ms, total));
        }
        // Keep one sample at or before the window's start, to count from.
        while self.samples.len() > 1
            && (self.samples.len() > SAMPLES_MAX
                || self.samples.get(1).is_some_and(|&(t, _)| t.saturating_add(WINDOW_MS) <= now_ms))
        {
            self.samples.pop_front();
        }
    }

    /// Requests over the last minute (or since the first sample, when younger).
    pub fn last_minute(&self) -> u64 {
        match (self.samples.front(), self.samples.back()) {
            (Some(first), Some(last)) => last.1.saturating_sub(first.1),
            _ => 0,
        }
    }
}

/// One member's request load as it last told it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadStat {
    pub node: NodeId,
    pub requests_last_minute: u64,
    /// The member's own wall clock when it measured: newer replaces older.
    pub stamp_ms: u64,
}

/// The newest [`LoadStat`] of each member.
#[derive(Clone, Debug, Default)]
pub struct LoadTable {
    stats: BTreeMap<NodeId, LoadStat>,
}

impl LoadTable {
    /// Merge received figures, keeping the newest per member; only members in `known` are
    /// kept, so the table is bounded by the membership.
    pub fn merge(&mut self, stats: Vec<LoadStat>, known: impl Fn(&str) -> bool) {
        for s in stats {
            if !known(&s.node) {
                continue;
            }
            match self.stats.get(&s.node) {
                Some(cur) if cur.stamp_ms >= s.stamp_ms => {}
                _ => {
                    self.stats.insert(s.node.clone(), s);
                }
            }
        }
        self.stats.retain(|id, _| known(id));
    }

    pub fn get(&self, node: &str) -> Option<&LoadStat> {
        self.stats.get(node)
    }

    /// Every figure, for gossip.
    pub fn all(&self) -> Vec<LoadStat> {
        self.stats.values().cloned().collect()
    }
}

/// One member's balance, as `ringkv status` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberBalance {
    pub id: NodeId,
    /// Share of partitions and fair share by weight.
    pub partition_share: f64,
    pub fair_share: f64,
    /// partition_share / fair_share - 1.
    pub imbalance: f64,
    pub requests_last_minute: Option<u64>,
    /// Share of all members' requests over the last minute, when any were served.
    pub request_share: Option<f64>,
    /// request_share / fair_share - 1.
    pub request_imbalance: Option<f64>,
    pub out_of_balance: bool,
}

/// Each ring member's balance of data and requests.
pub fn balance(ring: &Ring, loads: &LoadTable) -> Vec<MemberBalance> {
    let report = ring.load_report(IMBALANCE_THRESHOLD);
    let total: u64 = report.members.iter().filter_map(|m| loads.get(&m.id)).map(|s| s.requests_last_minute).sum();
    report
        .members
        .into_iter()
        .map(|m| {
            let requests = loads.get(&m.id).map(|s| s.requests_last_minute);
            let request_share = requests.filter(|_| total > 0).map(|r| r as f64 / total as f64);
            let request_imbalance = request_share.map(|s| s / m.fair_share - 1.0);
            let out_of_balance = m.imbalance.abs() > IMBALANCE_THRESHOLD
                || request_imbalance.is_some_and(|i| i.abs() > IMBALANCE_THRESHOLD);
            MemberBalance {
                id: m.id,
                partition_share: m.share,
                fair_share: m.fair_share,
                imbalance: m.imbalance,
                requests_last_minute: requests,
                request_share,
                request_imbalance,
                out_of_balance,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::NodeSpec;

    fn ring(n: usize) -> Ring {
        let nodes: Vec<NodeSpec> = (0..n).map(|i| NodeSpec { id: format!("n{i}"), zone: None, weight: 1 }).collect();
        Ring::new(64, 3, &nodes).unwrap()
    }

    #[test]
    fn a_window_counts_the_last_minute() {
        let mut w = RequestWindow::default();
        assert_eq!(w.last_minute(), 0);
        for s in 0..=120u64 {
            w.record(s * 1000, s * 10);
        }
        assert_eq!(w.last_minute(), 600, "ten a second over sixty seconds");
        w.record(121_000, 1210);
        assert_eq!(w.last_minute(), 600);
        w.record(200_000, 1210);
        assert_eq!(w.last_minute(), 0, "nothing served for a minute");
        assert!(w.samples.len() <= SAMPLES_MAX);
    }

    #[test]
    fn the_newest_figure_wins_and_strangers_are_dropped() {
        let mut t = LoadTable::default();
        let stat = |n: &str, r, s| LoadStat { node: n.into(), requests_last_minute: r, stamp_ms: s };
        t.merge(vec![stat("n0", 5, 10), stat("zz", 9, 10)], |id| id.starts_with('n'));
        t.merge(vec![stat("n0", 7, 5)], |_| true);
        assert_eq!(t.get("n0").map(|s| s.requests_last_minute), Some(5), "an older figure is ignored");
        t.merge(vec![stat("n0", 7, 11)], |_| true);
        assert_eq!(t.get("n0").map(|s| s.requests_last_minute), Some(7));
        assert!(t.get("zz").is_none());
    }

    #[test]
    fn members_off_their_fair_share_of_requests_are_out_of_balance() {
        let r = ring(4);
        let mut t = LoadTable::default();
        let even: Vec<LoadStat> =
            (0..4).map(|i| LoadStat { node: format!("n{i}"), requests_last_minute: 100, stamp_ms: 1 }).collect();
        t.merge(even, |_| true);
        let b = balance(&r, &t);
        assert_eq!(b.len(), 4);
        assert!(b.iter().all(|m| !m.out_of_balance), "{b:?}");
        assert!(b.iter().all(|m| m.request_share == Some(0.25)));
        t.merge(vec![LoadStat { node: "n0".into(), requests_last_minute: 200, stamp_ms: 2 }], |_| true);
        let b = balance(&r, &t);
        let hot = b.iter().find(|m| m.id == "n0").unwrap();
        assert!(hot.out_of_balance && hot.request_imbalance.unwrap() > 0.5, "{hot:?}");
        assert!(b.iter().filter(|m| m.id != "n0").all(|m| m.request_imbalance.unwrap() < 0.0));
        // No figures yet: judged by partitions alone.
        let b = balance(&r, &LoadTable::default());
        assert!(b.iter().all(|m| m.request_share.is_none() && !m.out_of_balance));
    }
}
