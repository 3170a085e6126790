//! Versioning: causality between writes of one key (Dynamo §4.4), with dotted version
//! vectors as in Riak 2.0's dvvset (Preguiça et al., "Dotted Version Vectors").
//!
//! An [`Object`] is a key's state on one replica: the siblings (concurrent values, each with
//! its own *dot*, the unique event that wrote it) and a causal context (a version vector
//! summarising every dot this state has seen, live or superseded). A sibling is dropped only
//! when a state that has seen its dot no longer holds it: that is, some write superseded it.
//!
//! The rules the rest of ringkv relies on:
//! - a put supersedes exactly the siblings its context covers; a put with an empty context
//!   supersedes nothing, so two blind writes both survive even from the same coordinator;
//! - [`Object::merge`] is commutative, associative and idempotent;
//! - a tombstone (a sibling with no value) is a sibling like any other;
//! - pruning drops the oldest clock entries past a threshold, never one that covers a live
//!   sibling; it can only make old siblings reappear as concurrent, never make a newer
//!   sibling vanish.
//!
//! Dots are issued by an [`Actor`]. A node never issues a dot that some copy of the key
//! might already hold, nor a clock entry that claims dots its state has not seen: each
//! *local copy* of a key (its owned row, or a hinted row held for another node) carries the
//! actor that coordinates writes into it, drawn fresh when the row is created locally and
//! abandoned when the row is removed (handed off, transferred, reaped, quarantined). So all
//! of an actor's dots for a key were issued on one row that still holds them, and its next
//! counter is simply one past what that row has seen; a restart changes nothing, and a
//! dropped row never lends its actor to a new one (the rule of Riak's fix for kv679).
//!
//! Counters are bounded by [`COUNTER_MAX`]: a context or object naming a larger one is
//! refused when decoded, and issuing checks for overflow, so a crafted context cannot make
//! a counter wrap into one every merge treats as already seen.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

use crate::membership::valid_node_id;

/// Default number of clock entries past which a put prunes the oldest.
pub const PRUNE_THRESHOLD_DEFAULT: usize = 10;

/// Largest encoded context accepted from a client.
pub const CONTEXT_BYTES_MAX: usize = 16 * 1024;

/// The version byte at the start of an encoded context.
const CONTEXT_FORMAT: u8 = 1;

/// Largest dot counter accepted or issued: far beyond any real write count, and far below
/// `u64::MAX`, so a hostile context that names it leaves 2^62 writes of headroom.
pub const COUNTER_MAX: u64 = 1 << 62;

/// Most clock entries a context or stored clock may carry.
pub const CLOCK_ENTRIES_MAX: usize = 1024;

/// Why a version could not be issued, or a decoded version is not well formed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("the key's version counter for this coordinator is exhausted")]
    CounterExhausted,
    #[error("a counter is 0 or above {COUNTER_MAX}")]
    CounterOutOfRange,
    #[error("more than {CLOCK_ENTRIES_MAX} clock entries")]
    TooManyEntries,
    #[error("siblings are not in strictly increasing dot order")]
    SiblingsUnordered,
    #[error("a sibling's dot is not covered by the object's clock")]
    DotNotInClock,
}

/// The issuer of dots: one epoch of one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Actor(pub u64);

/// One write event: the `counter`-th write coordinated by `actor` for this key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    pub actor: Actor,
    pub counter: u64,
}

/// A clock entry: the highest counter seen from an actor, and when it was last advanced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockEntry {
    pub counter: u64,
    pub timestamp_ms: u64,
}

/// A version vector: actor -> highest counter seen (every dot up to it is covered).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionVector {
    entries: BTreeMap<Actor, ClockEntry>,
}

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn get(&self, actor: Actor) -> u64 {
        self.entries.get(&actor).map_or(0, |e| e.counter)
    }

    pub fn iter(&self) -> impl Iterator<Item = (Actor, ClockEntry)> + '_ {
        self.entries.iter().map(|(a, e)| (*a, *e))
    }

    /// Whether this clock has seen `dot`.
    pub fn covers(&self, dot: Dot) -> bool {
        self.get(dot.actor) >= dot.counter
    }

    /// Whether this clock has seen everything `other` has.
    pub fn descends(&self, other: &VersionVector) -> bool {
        other.entries.iter().all(|(a, e)| self.get(*a) >= e.counter)
    }

    /// Raise an actor's entry to at least `counter`.
    pub fn witness(&mut self, actor: Actor, counter: u64, timestamp_ms: u64) {
        let e = self.entries.entry(actor).or_insert(ClockEntry { counter: 0, timestamp_ms });
        if counter > e.counter || (counter == e.counter && timestamp_ms > e.timestamp_ms) {
            *e = ClockEntry { counter, timestamp_ms };
        }
    }

    /// Pointwise maximum.
    pub fn merge(&mut self, other: &VersionVector) {
        for (a, e) in &other.entries {
            self.witness(*a, e.counter, e.timestamp_ms);
        }
    }

    /// Drop the oldest entries (by timestamp, then actor) until at most `threshold` remain,
    /// never dropping those of the actors in `keep`.
    pub fn prune(&mut self, threshold: usize, keep: &BTreeSet<Actor>) {
        if self.entries.len() <= threshold {
            return;
        }
        let mut by_age: Vec<(u64, Actor)> =
            self.entries.iter().filter(|(a, _)| !keep.contains(a)).map(|(a, e)| (e.timestamp_ms, *a)).collect();
        by_age.sort();
        let excess = self.entries.len() - threshold;
        for (_, a) in by_age.into_iter().take(excess) {
            self.entries.remove(&a);
        }
    }

    /// Check a decoded clock: every counter in 1..=COUNTER_MAX, a bounded number of entries.
    pub fn validate(&self) -> Result<(), VersionError> {
        if self.entries.len() > CLOCK_ENTRIES_MAX {
            return Err(VersionError::TooManyEntries);
        }
        if self.entries.values().any(|e| e.counter == 0 || e.counter > COUNTER_MAX) {
            return Err(VersionError::CounterOutOfRange);
        }
        Ok(())
    }

    /// The opaque context a client carries: a format byte and MessagePack of
    /// (actor, counter) pairs, in base64 (URL-safe, unpadded).
    pub fn encode_context(&self) -> String {
        self.encode_context_from(None)
    }

    /// [`encode_context`](Self::encode_context), naming the replica that answered the read
    /// fastest: that node coordinates the write back (the paper's section 6.4), which a
    /// client learns from the context (`CLOCK.NODE`; base64url has no '.').
    pub fn encode_context_from(&self, fastest: Option<&str>) -> String {
        // The MessagePack of a list of (actor, counter) pairs, written as rmp_serde writes
        // one (each integer in its shortest form); writes to a Vec cannot fail.
        let mut bytes = Vec::with_capacity(6 + self.entries.len() * 20);
        bytes.push(CONTEXT_FORMAT);
        let _ = rmp::encode::write_array_len(&mut bytes, self.entries.len() as u32);
        for (a, e) in &self.entries {
            let _ = rmp::encode::write_array_len(&mut bytes, 2);
            let _ = rmp::encode::write_uint(&mut bytes, a.0);
            let _ = rmp::encode::write_uint(&mut bytes, e.counter);
        }
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4 + fastest.map_or(0, |n| n.len() + 1));
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(&bytes, &mut out);
        if let Some(node) = fastest {
            out.push('.');
            out.push_str(node);
        }
        out
    }

    /// Parse a context produced by [`encode_context`](Self::encode_context) or
    /// [`encode_context_from`](Self::encode_context_from). Timestamps are not carried by
    /// contexts; entries get `now_ms`.
    pub fn decode_context(text: &str, now_ms: u64) -> Result<VersionVector, ContextError> {
        if text.is_empty() {
            return Err(ContextError::Empty);
        }
        let (text, fastest) = split_context(text);
        if fastest.is_some_and(|n| !valid_node_id(n)) {
            return Err(ContextError::Malformed);
        }
        if text.len() > CONTEXT_BYTES_MAX * 4 / 3 + 4 {
            return Err(ContextError::TooLarge);
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .map_err(|_| ContextError::NotBase64)?;
        Self::decode_context_bytes(&bytes, now_ms)
    }

    fn decode_context_bytes(bytes: &[u8], now_ms: u64) -> Result<VersionVector, ContextError> {
        match bytes.split_first() {
            Some((&CONTEXT_FORMAT, body)) => {
                let pairs: Vec<(u64, u64)> = rmp_serde::from_slice(body).map_err(|_| ContextError::Malformed)?;
                if pairs.len() > CLOCK_ENTRIES_MAX {
                    return Err(ContextError::Malformed);
                }
                let mut vv = VersionVector::new();
                for (a, c) in pairs {
                    if c == 0 || c > COUNTER_MAX {
                        return Err(ContextError::Malformed);
                    }
                    vv.witness(Actor(a), c, now_ms);
                }
                Ok(vv)
            }
            Some((v, _)) => Err(ContextError::UnknownFormat(*v)),
            None => Err(ContextError::Empty),
        }
    }
}

/// Why a client's context was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("the context is empty")]
    Empty,
    #[error("the context is larger than {CONTEXT_BYTES_MAX} bytes")]
    TooLarge,
    #[error("the context is not base64: pass back the context a get returned, untouched")]
    NotBase64,
    #[error("the context has unknown format {0}: it was made by a newer ringkv or altered")]
    UnknownFormat(u8),
    #[error("the context is malformed: pass back the context a get returned, untouched")]
    Malformed,
}

/// A context's clock part and the node it names as the fastest replica of its read, if any.
/// The node is not checked here ([`VersionVector::decode_context`] checks it).
pub fn split_context(text: &str) -> (&str, Option<&str>) {
    match text.split_once('.') {
        Some((clock, node)) => (clock, Some(node)),
        None => (text, None),
    }
}

/// One concurrent version of a key: a value, or a tombstone (`value: None`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sibling {
    pub dot: Dot,
    pub timestamp_ms: u64,
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
}

impl Sibling {
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }
}

/// A key's state on one replica: siblings sorted by dot, and the causal context.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    clock: VersionVector,
    siblings: Vec<Sibling>,
}

impl Object {
    pub fn new() -> Self {
        Self::default()
    }

    /// A state with this clock and no siblings: merging it into another state drops what
    /// the clock covers (a reaped tombstone's memory).
    pub fn from_clock(clock: VersionVector) -> Object {
        Object { clock, siblings: Vec::new() }
    }

    pub fn clock(&self) -> &VersionVector {
        &self.clock
    }

    pub fn siblings(&self) -> &[Sibling] {
        &self.siblings
    }

    /// The context a get returns: the clock, covering every sibling.
    pub fn context(&self) -> VersionVector {
        self.clock.clone()
    }

    /// Live values (tombstones left out), in dot order.
    pub fn values(&self) -> impl Iterator<Item = &[u8]> {
        self.siblings.iter().filter_map(|s| s.value.as_deref())
    }

    /// The live values, taken out (tombstones left out), in dot order.
    pub fn into_values(self) -> impl Iterator<Item = Vec<u8>> {
        self.siblings.into_iter().filter_map(|s| s.value)
    }

    /// True when nothing but tombstones (or nothing at all) is left: the key reads as missing.
    pub fn is_deleted(&self) -> bool {
        self.siblings.iter().all(Sibling::is_tombstone)
    }

    /// The newest write time among siblings.
    pub fn last_modified_ms(&self) -> u64 {
        self.siblings.iter().map(|s| s.timestamp_ms).max().unwrap_or(0)
    }

    /// The dot a write coordinated by `actor` on this state after `context` gets: its
    /// counter exceeds every counter of `actor` this state and the context have seen. An
    /// error when that would pass [`COUNTER_MAX`] (only a crafted context gets there; the
    /// caller then coordinates under a fresh actor).
    pub fn next_dot(&self, context: &VersionVector, actor: Actor) -> Result<Dot, VersionError> {
        let seen = self.clock.get(actor).max(context.get(actor));
        let counter = seen.checked_add(1).filter(|c| *c <= COUNTER_MAX).ok_or(VersionError::CounterExhausted)?;
        Ok(Dot { actor, counter })
    }

    /// Coordinate a write on this replica's state under `dot` (from [`next_dot`](Self::next_dot)):
    /// supersede the siblings `context` covers, add `value` (None: a tombstone), prune the
    /// clock past `prune_threshold` entries.
    pub fn apply_write(
        &mut self,
        context: &VersionVector,
        dot: Dot,
        value: Option<Vec<u8>>,
        now_ms: u64,
        prune_threshold: usize,
    ) {
        self.siblings.retain(|s| !context.covers(s.dot));
        self.clock.merge(context);
        self.clock.witness(dot.actor, dot.counter, now_ms);
        self.siblings.push(Sibling { dot, timestamp_ms: now_ms, value });
        self.siblings.sort_by_key(|s| s.dot);
        // Never the entry of a live sibling's actor (the writer's among them): the clock must
        // keep covering every sibling, or the state is invalid and no context can supersede it.
        let live: BTreeSet<Actor> = self.siblings.iter().map(|s| s.dot.actor).collect();
        self.clock.prune(prune_threshold.max(1), &live);
    }

    /// [`next_dot`](Self::next_dot), then [`apply_write`](Self::apply_write):
    /// for tests and tools that number their own writes. Panics if the counter is exhausted,
    /// which a node never risks: it issues through `next_dot` and refuses the write instead.
    pub fn update(
        &mut self,
        context: &VersionVector,
        actor: Actor,
        value: Option<Vec<u8>>,
        now_ms: u64,
        prune_threshold: usize,
    ) -> Dot {
        let dot = self.next_dot(context, actor).expect("counter below COUNTER_MAX in a test history");
        self.apply_write(context, dot, value, now_ms, prune_threshold);
        dot
    }

    /// Check a decoded object: a valid clock that covers every sibling's dot, siblings in
    /// strictly increasing dot order. Merges rely on all three.
    pub fn validate(&self) -> Result<(), VersionError> {
        self.clock.validate()?;
        if self.siblings.windows(2).any(|w| w[0].dot >= w[1].dot) {
            return Err(VersionError::SiblingsUnordered);
        }
        if self.siblings.iter().any(|s| !self.clock.covers(s.dot)) {
            return Err(VersionError::DotNotInClock);
        }
        if self.siblings.iter().any(|s| s.dot.counter == 0 || s.dot.counter > COUNTER_MAX) {
            return Err(VersionError::CounterOutOfRange);
        }
        Ok(())
    }

    /// Bytes of values and keys of clock entries: a bound on the encoded size, for limits.
    pub fn size_bytes(&self) -> usize {
        self.value_bytes() + self.siblings.len() * 40 + self.clock.len() * 32 + 16
    }

    /// The state that has seen everything both have seen: a sibling survives unless the
    /// other side has seen its dot and dropped it.
    pub fn merge(&self, other: &Object) -> Object {
        let mut siblings: Vec<Sibling> = Vec::with_capacity(self.siblings.len() + other.siblings.len());
        let (mut i, mut j) = (0, 0);
        let (a, b) = (&self.siblings, &other.siblings);
        while i < a.len() || j < b.len() {
            let next = match (a.get(i), b.get(j)) {
                (Some(x), Some(y)) if x.dot == y.dot => {
                    i += 1;
                    j += 1;
                    // The same dot is the same write; pick deterministically should they differ.
                    Some(if (x.timestamp_ms, &x.value) >= (y.timestamp_ms, &y.value) { x } else { y })
                }
                (Some(x), Some(y)) if x.dot < y.dot => {
                    i += 1;
                    (!other.clock.covers(x.dot)).then_some(x)
                }
                (Some(x), None) => {
                    i += 1;
                    (!other.clock.covers(x.dot)).then_some(x)
                }
                (_, Some(y)) => {
                    j += 1;
                    (!self.clock.covers(y.dot)).then_some(y)
                }
                (None, None) => None,
            };
            if let Some(s) = next {
                siblings.push(s.clone());
            }
        }
        let mut clock = self.clock.clone();
        clock.merge(&other.clock);
        Object { clock, siblings }
    }

    /// Merge `other` into this state; true when this state changed.
    pub fn merge_from(&mut self, other: &Object) -> bool {
        let merged = self.merge(other);
        let changed = merged != *self;
        *self = merged;
        changed
    }

    /// Whether this state has seen everything `other` has (merging it changes nothing).
    pub fn descends(&self, other: &Object) -> bool {
        self.merge(other) == *self
    }

    /// A digest of the live contents (clock, dots, timestamps, values, tombstones); equal
    /// states have equal digests. Used by Merkle trees and anti-entropy.
    pub fn digest(&self) -> [u8; 16] {
        let mut h = Md5::new();
        for (a, e) in self.clock.iter() {
            h.update(a.0.to_be_bytes());
            h.update(e.counter.to_be_bytes());
        }
        h.update([0xff]);
        for s in &self.siblings {
            h.update(s.dot.actor.0.to_be_bytes());
            h.update(s.dot.counter.to_be_bytes());
            h.update(s.timestamp_ms.to_be_bytes());
            match &s.value {
                Some(v) => {
                    h.update([1]);
                    h.update((v.len() as u64).to_be_bytes());
                    h.update(v);
                }
                None => h.update([0]),
            }
        }
        h.finalize().into()
    }

    /// The encoded size, for limits.
    pub fn value_bytes(&self) -> usize {
        self.siblings.iter().map(|s| s.value.as_ref().map_or(0, Vec::len)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: Actor = Actor(1);
    const B: Actor = Actor(2);
    const C: Actor = Actor(3);

    fn vals(o: &Object) -> Vec<&[u8]> {
        o.values().collect()
    }

    #[test]
    fn blind_writes_from_one_coordinator_are_siblings() {
        let mut o = Object::new();
        o.update(&VersionVector::new(), A, Some(b"x".to_vec()), 1, 10);
        o.update(&VersionVector::new(), A, Some(b"y".to_vec()), 2, 10);
        assert_eq!(vals(&o), vec![b"x".as_slice(), b"y"]);
    }

    /// Taking the values out gives what reading them gives: live values in dot order.
    #[test]
    fn into_values_takes_the_live_values_in_order() {
        let mut o = Object::new();
        o.update(&VersionVector::new(), A, Some(b"x".to_vec()), 1, 10);
        o.update(&VersionVector::new(), B, None, 2, 10);
        o.update(&VersionVector::new(), A, Some(b"y".to_vec()), 3, 10);
        let read: Vec<Vec<u8>> = o.values().map(<[u8]>::to_vec).collect();
        assert_eq!(read, vec![b"x".to_vec(), b"y".to_vec()]);
        assert_eq!(o.into_values().collect::<Vec<_>>(), read);
    }

    #[test]
    fn put_with_context_supersedes_exactly_what_it_covers() {
        let mut o = Object::new();
        o.update(&VersionVector::new(), A, Some(b"x".to_vec()), 1, 10);
        let ctx = o.context();
        // A concurrent blind write the client has not seen.
        o.update(&VersionVector::new(), B, Some(b"y".to_vec()), 2, 10);
        o.update(&ctx, A, Some(b"z".to_vec()), 3, 10);
        let mut v = vals(&o);
        v.sort();
        assert_eq!(v, vec![b"y".as_slice(), b"z"]);
        let ctx = o.context();
        o.update(&ctx, C, Some(b"w".to_vec()), 4, 10);
        assert_eq!(vals(&o), vec![b"w".as_slice()]);
    }

    #[test]
    fn replicas_that_diverge_merge_to_siblings() {
        let mut base = Object::new();
        base.update(&VersionVector::new(), A, Some(b"v0".to_vec()), 1, 10);
        let ctx = base.context();
        let (mut r1, mut r2) = (base.clone(), base.clone());
        r1.update(&ctx, A, Some(b"left".to_vec()), 2, 10);
        r2.update(&ctx, B, Some(b"right".to_vec()), 3, 10);
        let m = r1.merge(&r2);
        assert_eq!(vals(&m), vec![b"left".as_slice(), b"right"]);
        let mut after = m.clone();
        after.update(&m.context(), A, Some(b"fixed".to_vec()), 4, 10);
        // The resolved state wins over both stale replicas.
        assert_eq!(vals(&after.merge(&r1).merge(&r2)), vec![b"fixed".as_slice()]);
    }

    #[test]
    fn tombstones_are_siblings_and_hide_the_key() {
        let mut o = Object::new();
        o.update(&VersionVector::new(), A, Some(b"x".to_vec()), 1, 10);
        let stale = o.clone();
        o.update(&o.context(), A, None, 2, 10);
        assert!(o.is_deleted());
        assert_eq!(o.siblings().len(), 1);
        // A replica that missed the delete does not bring the value back.
        assert!(o.merge(&stale).is_deleted());
        // A blind delete leaves the value as a sibling of the tombstone.
        let mut p = stale.clone();
        p.update(&VersionVector::new(), B, None, 3, 10);
        assert_eq!(vals(&p), vec![b"x".as_slice()]);
        assert!(!p.is_deleted());
    }

    #[test]
    fn pruning_drops_the_oldest_entries_but_keeps_the_writer() {
        let mut o = Object::new();
        for i in 0..12u64 {
            let ctx = o.context();
            o.update(&ctx, Actor(100 + i), Some(vec![i as u8]), 1000 + i, 10);
        }
        assert_eq!(o.clock().len(), 10);
        assert_eq!(o.clock().get(Actor(100)), 0);
        assert_eq!(o.clock().get(Actor(101)), 0);
        assert_eq!(o.clock().get(Actor(111)), 1);
        // The newest value is the only one, pruning did not bring anything back.
        assert_eq!(vals(&o), vec![[11u8].as_slice()]);
        // The writer's own entry survives even when it is the oldest.
        let mut p = o.clone();
        let mut vv = VersionVector::new();
        vv.witness(Actor(1), 5, 0);
        p.clock.merge(&vv);
        p.update(&p.context(), Actor(1), Some(vec![1]), 2000, 10);
        assert_eq!(p.clock().get(Actor(1)), 6);
    }

    #[test]
    fn pruning_keeps_the_entries_of_live_siblings() {
        // Found by fuzzing: concurrent blind writes from more actors than the threshold used
        // to prune the entries of live siblings, leaving a state that fails `validate` (its
        // row read back as corrupt) and a context that cannot supersede those siblings.
        let mut o = Object::new();
        for a in 1..=3u64 {
            o.update(&VersionVector::new(), Actor(a), Some(vec![a as u8]), a, 2);
        }
        assert_eq!(o.siblings().len(), 3);
        assert_eq!(o.validate(), Ok(()));
        assert_eq!(o.clock().len(), 3, "one entry per live sibling, past the threshold");
        // A write with the context resolves them all, and then the clock is pruned again.
        o.update(&o.context(), Actor(4), Some(b"merged".to_vec()), 4, 2);
        assert_eq!(vals(&o), vec![b"merged".as_slice()]);
        assert_eq!(o.validate(), Ok(()));
        assert_eq!(o.clock().len(), 2);
    }

    #[test]
    fn pruning_may_revive_an_old_sibling_but_never_hides_a_new_one() {
        // r_old still holds v1; the live replica superseded it, then pruned v1's actor.
        let mut live = Object::new();
        live.update(&VersionVector::new(), Actor(100), Some(b"v1".to_vec()), 1, 2);
        let r_old = live.clone();
        for i in 1..4u64 {
            let ctx = live.context();
            live.update(&ctx, Actor(100 + i), Some(format!("v{}", i + 1).into_bytes()), 1 + i, 2);
        }
        let merged = live.merge(&r_old);
        assert!(merged.values().any(|v| v == b"v4"), "the newest value survives");
    }

    #[test]
    fn context_round_trip_and_garbage() {
        let mut vv = VersionVector::new();
        vv.witness(A, 3, 9);
        vv.witness(Actor(u64::MAX), 1, 9);
        let text = vv.encode_context();
        let back = VersionVector::decode_context(&text, 0).unwrap();
        assert_eq!(back.get(A), 3);
        assert_eq!(back.get(Actor(u64::MAX)), 1);
        assert_eq!(VersionVector::decode_context("%%not-a-context%%", 0), Err(ContextError::NotBase64));
        assert_eq!(VersionVector::decode_context("", 0), Err(ContextError::Empty));
        assert_eq!(VersionVector::decode_context("AA", 0), Err(ContextError::UnknownFormat(0)));
        assert_eq!(VersionVector::decode_context("AQ", 0), Err(ContextError::Malformed));
        let huge = "A".repeat(100_000);
        assert_eq!(VersionVector::decode_context(&huge, 0), Err(ContextError::TooLarge));
        // A context may name the fastest replica of its read; the clock is the same, and a
        // name that is no node id is refused.
        let named = vv.encode_context_from(Some("n2.east"));
        assert_eq!(split_context(&named), (text.as_str(), Some("n2.east")));
        assert_eq!(VersionVector::decode_context(&named, 0).unwrap(), back);
        assert_eq!(VersionVector::decode_context(&format!("{text}.bad node"), 0), Err(ContextError::Malformed));
        assert_eq!(VersionVector::decode_context(&format!("{text}."), 0), Err(ContextError::Malformed));
        // A counter past the limit (a forged context) is refused, not wrapped.
        for c in [COUNTER_MAX + 1, u64::MAX] {
            let mut forged = VersionVector::new();
            forged.entries.insert(A, ClockEntry { counter: c, timestamp_ms: 0 });
            assert_eq!(VersionVector::decode_context(&forged.encode_context(), 0), Err(ContextError::Malformed));
        }
        let mut at_limit = VersionVector::new();
        at_limit.witness(A, COUNTER_MAX, 0);
        let mut o = Object::new();
        assert_eq!(o.next_dot(&at_limit, A), Err(VersionError::CounterExhausted));
        o.update(&VersionVector::new(), B, Some(vec![1]), 1, 10);
        assert!(o.validate().is_ok());
    }

    #[test]
    fn digest_tracks_contents() {
        let mut a = Object::new();
        a.update(&VersionVector::new(), A, Some(b"x".to_vec()), 1, 10);
        let b = a.clone();
        assert_eq!(a.digest(), b.digest());
        a.update(&VersionVector::new(), A, None, 2, 10);
        assert_ne!(a.digest(), b.digest());
    }

    /// A random history of writes on a few replicas, each replica coordinating with its own
    /// actor, syncing with others now and then.
    #[derive(Clone, Debug)]
    enum Op {
        Blind { replica: usize, value: u8 },
        ReadModifyWrite { replica: usize, value: u8 },
        Delete { replica: usize },
        Sync { from: usize, to: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..3, any::<u8>()).prop_map(|(replica, value)| Op::Blind { replica, value }),
            (0usize..3, any::<u8>()).prop_map(|(replica, value)| Op::ReadModifyWrite { replica, value }),
            (0usize..3).prop_map(|replica| Op::Delete { replica }),
            (0usize..3, 0usize..3).prop_map(|(from, to)| Op::Sync { from, to }),
        ]
    }

    /// Runs ops; returns the replicas and, for every acknowledged write, its dot and the
    /// context it was written with.
    fn run(ops: &[Op]) -> (Vec<Object>, Vec<(Dot, VersionVector)>) {
        let mut reps = vec![Object::new(); 3];
        let mut writes = Vec::new();
        for (t, op) in ops.iter().enumerate() {
            let now = t as u64;
            match *op {
                Op::Blind { replica, value } => {
                    let ctx = VersionVector::new();
                    let d = reps[replica].update(&ctx, Actor(replica as u64), Some(vec![value]), now, 64);
                    writes.push((d, ctx));
                }
                Op::ReadModifyWrite { replica, value } => {
                    let ctx = reps[replica].context();
                    let d = reps[replica].update(&ctx, Actor(replica as u64), Some(vec![value]), now, 64);
                    writes.push((d, ctx));
                }
                Op::Delete { replica } => {
                    let ctx = reps[replica].context();
                    let d = reps[replica].update(&ctx, Actor(replica as u64), None, now, 64);
                    writes.push((d, ctx));
                }
                Op::Sync { from, to } => {
                    let src = reps[from].clone();
                    reps[to].merge_from(&src);
                }
            }
        }
        (reps, writes)
    }

    fn arb_object() -> impl Strategy<Value = Object> {
        proptest::collection::vec(op(), 0..20).prop_map(|ops| {
            let (reps, _) = run(&ops);
            reps[0].merge(&reps[1])
        })
    }

    proptest! {
        #[test]
        fn merge_is_commutative_associative_idempotent(ops in proptest::collection::vec(op(), 0..40)) {
            let (r, _) = run(&ops);
            prop_assert_eq!(r[0].merge(&r[1]), r[1].merge(&r[0]));
            prop_assert_eq!(r[0].merge(&r[1]).merge(&r[2]), r[0].merge(&r[1].merge(&r[2])));
            prop_assert_eq!(r[0].merge(&r[0]), r[0].clone());
            let m = r[0].merge(&r[1]);
            prop_assert!(m.descends(&r[0]) && m.descends(&r[1]));
        }

        #[test]
        fn no_acknowledged_write_is_lost(ops in proptest::collection::vec(op(), 0..60)) {
            let (r, writes) = run(&ops);
            let all = r[0].merge(&r[1]).merge(&r[2]);
            let live: Vec<Dot> = all.siblings().iter().map(|s| s.dot).collect();
            for (dot, _) in &writes {
                // Present, or superseded by a later write whose context covered it.
                let superseded = writes.iter().any(|(_, ctx)| ctx.covers(*dot));
                prop_assert!(live.contains(dot) || superseded, "{dot:?} lost");
            }
            // And nothing the clients never superseded is missing.
            for s in all.siblings() {
                prop_assert!(writes.iter().any(|(d, _)| *d == s.dot));
            }
        }

        #[test]
        fn siblings_are_never_superseded_without_a_covering_context(ops in proptest::collection::vec(op(), 0..60)) {
            let (r, writes) = run(&ops);
            let all = r[0].merge(&r[1]).merge(&r[2]);
            for (dot, _) in &writes {
                let covered = writes.iter().any(|(_, ctx)| ctx.covers(*dot));
                if !covered {
                    prop_assert!(all.siblings().iter().any(|s| s.dot == *dot));
                }
            }
        }

        #[test]
        fn serde_round_trip(o in arb_object()) {
            let bytes = rmp_serde::to_vec(&o).unwrap();
            let back: Object = rmp_serde::from_slice(&bytes).unwrap();
            prop_assert_eq!(back.digest(), o.digest());
            prop_assert_eq!(back, o);
        }

        /// Contexts are written as they always were (rmp_serde's MessagePack of a list of
        /// pairs), so contexts clients hold stay valid, and they read back.
        #[test]
        fn contexts_are_encoded_as_before(
            pairs in proptest::collection::btree_map(any::<u64>(), 1..=COUNTER_MAX, 0..12),
            fastest in proptest::option::of("[a-z0-9]{1,8}"),
        ) {
            let mut vv = VersionVector::new();
            for (&a, &c) in &pairs {
                vv.witness(Actor(a), c, 5);
            }
            let list: Vec<(u64, u64)> = pairs.iter().map(|(&a, &c)| (a, c)).collect();
            let mut bytes = vec![CONTEXT_FORMAT];
            bytes.extend(rmp_serde::to_vec(&list).unwrap());
            let mut before = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
            if let Some(n) = &fastest {
                before = format!("{before}.{n}");
            }
            prop_assert_eq!(vv.encode_context_from(fastest.as_deref()), before);
            let back = VersionVector::decode_context(&vv.encode_context(), 5).unwrap();
            prop_assert_eq!(back.encode_context(), vv.encode_context());
        }

        #[test]
        fn context_decoder_never_panics(s in "\\PC{0,200}") {
            let _ = VersionVector::decode_context(&s, 0);
        }

        #[test]
        fn context_bytes_decoder_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = VersionVector::decode_context_bytes(&b, 0);
        }
    }
}
