//! Namespaces: each application its own N, R, W and reconciliation (Dynamo §2, §4.4 and
//! §6: every service that uses Dynamo configures its own instance; Riak's bucket types).
//!
//! A namespace is defined once, cluster-wide: its definition travels with the membership
//! gossip and is saved beside it. Its N and its reconciliation never change after creation
//! (they decide where keys live and how versions merge); R and W may be changed.
//!
//! Inside the store a namespaced key carries its namespace in a prefix,
//! `[0xFF, version, n, resolution, name length, name]`, so every replica, hint, transfer and
//! anti-entropy exchange knows a key's N and reconciliation from the key alone, without
//! waiting to learn the definition ([`class_of`]). Keys of the default namespace are stored
//! as given; they may not start with `0xFF` (a byte no UTF-8 text holds), so the two never
//! collide. Each namespace has its own Merkle tree per partition ([`KeyClass::prefix`]), so a
//! key is only ever compared with, and copied to, the first N of its preference list.
//!
//! `lww` (the paper's "last write wins"): a put supersedes whatever its coordinating replica
//! holds, whatever context the client sent, and a get answers the newest version only,
//! ordered by the coordinator's timestamp, then dot (actor, counter), which every replica
//! agrees on. Replicas keep concurrent writes from different coordinators as siblings until
//! the next write supersedes them, so replicas still converge as with siblings.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::version::Sibling;

/// The first byte of a namespaced key in the store.
pub const PREFIX_MARK: u8 = 0xFF;
/// The layout version of the prefix.
const PREFIX_VERSION: u8 = 1;
/// A namespace name's bytes at most.
pub const NAME_BYTES_MAX: usize = 32;
/// Namespaces a cluster holds at most.
pub const NAMESPACES_MAX: usize = 64;
/// N of a namespace at most (as for the cluster's `replicas`).
pub const N_MAX: u8 = 16;
/// The name of the namespace that uses the cluster's `[cluster]` settings.
pub const DEFAULT_NAME: &str = "default";

/// How concurrent versions of a key are reconciled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Resolution {
    /// Keep concurrent writes as siblings for the client to reconcile (the default).
    Siblings,
    /// Last write wins by the coordinator's timestamp.
    Lww,
}

impl Resolution {
    pub fn parse(text: &str) -> Result<Resolution, NamespaceError> {
        match text {
            "siblings" => Ok(Resolution::Siblings),
            "lww" => Ok(Resolution::Lww),
            other => Err(NamespaceError::new("resolution", format!("{other:?} is not siblings or lww"))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Siblings => "siblings",
            Resolution::Lww => "lww",
        }
    }

    fn byte(self) -> u8 {
        match self {
            Resolution::Siblings => 0,
            Resolution::Lww => 1,
        }
    }

    fn from_byte(b: u8) -> Option<Resolution> {
        match b {
            0 => Some(Resolution::Siblings),
            1 => Some(Resolution::Lww),
            _ => None,
        }
    }
}

/// A bad namespace definition or request: which field, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {detail}")]
pub struct NamespaceError {
    pub field: &'static str,
    pub detail: String,
}

impl NamespaceError {
    fn new(field: &'static str, detail: impl Into<String>) -> Self {
        NamespaceError { field, detail: detail.into() }
    }
}

/// One namespace's definition, as gossiped and saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    pub n: u8,
    pub r: u8,
    pub w: u8,
    pub resolution: Resolution,
    /// When and where it was created: of two definitions of one name made at once, the
    /// earlier (then the smaller node id) is the one every node keeps.
    pub created_wall_ms: u64,
    pub created_by: String,
    /// Bumped by each change of R or W: the higher wins.
    pub revision: u64,
}

/// Whether `name` may name a namespace: 1 to 32 letters, digits, `-` or `_`, not `default`.
pub fn check_name(name: &str) -> Result<(), NamespaceError> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX {
        return Err(NamespaceError::new("name", format!("must be 1 to {NAME_BYTES_MAX} bytes")));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(NamespaceError::new("name", format!("{name:?} may hold only letters, digits, - and _")));
    }
    if name == DEFAULT_NAME {
        return Err(NamespaceError::new("name", "default is the cluster's own namespace"));
    }
    Ok(())
}

/// Whether `n` may be a namespace's N (the ring's size is checked where it is created).
fn check_n(n: u8) -> Result<(), NamespaceError> {
    if n == 0 || n > N_MAX {
        return Err(NamespaceError::new("n", format!("{n} is not in 1..={N_MAX}")));
    }
    Ok(())
}

fn raw_prefix(name: &str, n: u8, resolution: Resolution) -> Vec<u8> {
    let mut p = Vec::with_capacity(5 + name.len());
    p.extend_from_slice(&[PREFIX_MARK, PREFIX_VERSION, n, resolution.byte(), name.len() as u8]);
    p.extend_from_slice(name.as_bytes());
    p
}

/// The store-key prefix of a namespace known by its name, N and resolution (as
/// `admin namespace list` shows them), when those are valid.
pub fn prefix_of(name: &str, n: u8, resolution: Resolution) -> Result<Vec<u8>, NamespaceError> {
    check_name(name)?;
    check_n(n)?;
    Ok(raw_prefix(name, n, resolution))
}

/// Whether `r` and `w` suit N `n`.
fn check_quorums(n: u8, r: u8, w: u8) -> Result<(), NamespaceError> {
    for (field, q) in [("r", r), ("w", w)] {
        if q == 0 || q > n {
            return Err(NamespaceError::new(field, format!("{q} is not in 1..={n} (the namespace's n)")));
        }
    }
    Ok(())
}

impl Namespace {
    /// A new definition; `members` is how many members the ring has (N may not exceed it).
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        name: &str,
        n: u8,
        r: u8,
        w: u8,
        resolution: Resolution,
        members: usize,
        now_wall_ms: u64,
        me: &str,
    ) -> Result<Namespace, NamespaceError> {
        check_name(name)?;
        if n == 0 || n > N_MAX || n as usize > members {
            return Err(NamespaceError::new(
                "n",
                format!(
                    "{n} is not in 1..={} (at most the {members} members of the ring)",
                    (N_MAX as usize).min(members)
                ),
            ));
        }
        check_quorums(n, r, w)?;
        Ok(Namespace {
            name: name.to_string(),
            n,
            r,
            w,
            resolution,
            created_wall_ms: now_wall_ms,
            created_by: me.to_string(),
            revision: 0,
        })
    }

    /// A received or loaded definition that any node could have made.
    pub fn validate(&self) -> Result<(), NamespaceError> {
        check_name(&self.name)?;
        check_n(self.n)?;
        check_quorums(self.n, self.r, self.w)
    }

    /// The prefix this namespace's keys carry in the store.
    pub fn prefix(&self) -> Vec<u8> {
        raw_prefix(&self.name, self.n, self.resolution)
    }

    /// The key a client's `key` of this namespace is stored under.
    pub fn store_key(&self, key: &[u8]) -> Vec<u8> {
        let mut k = self.prefix();
        k.extend_from_slice(key);
        k
    }

    /// The order two definitions of one name are kept by: the creation (earlier, then the
    /// smaller node id, wins), then the latest change of R and W.
    #[allow(clippy::type_complexity)]
    fn precedence(&self) -> (std::cmp::Reverse<(u64, &str)>, u64, u8, u8, u8, Resolution) {
        let created = std::cmp::Reverse((self.created_wall_ms, self.created_by.as_str()));
        (created, self.revision, self.r, self.w, self.n, self.resolution)
    }
}

/// What a stored key's namespace makes of it: its namespace prefix (empty for the default
/// namespace), its N (None: the cluster's), and its reconciliation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyClass<'k> {
    pub prefix: &'k [u8],
    pub n: Option<usize>,
    pub resolution: Resolution,
}

impl KeyClass<'_> {
    /// The class of the default namespace's keys.
    pub const DEFAULT: KeyClass<'static> = KeyClass { prefix: &[], n: None, resolution: Resolution::Siblings };

    /// N for this key, given the cluster's.
    pub fn n_or(&self, cluster_n: usize) -> usize {
        self.n.unwrap_or(cluster_n)
    }
}

/// The class of a stored key. A key that starts with [`PREFIX_MARK`] but holds no valid
/// prefix is the default namespace's (only keys stored before namespaces existed can).
pub fn class_of(key: &[u8]) -> KeyClass<'_> {
    match key {
        [PREFIX_MARK, PREFIX_VERSION, n, res, len, rest @ ..]
            if *n >= 1
                && *n <= N_MAX
                && *len >= 1
                && (*len as usize) <= NAME_BYTES_MAX
                && rest.len() >= *len as usize =>
        {
            match Resolution::from_byte(*res) {
                Some(resolution) => KeyClass { prefix: &key[..5 + *len as usize], n: Some(*n as usize), resolution },
                None => KeyClass::DEFAULT,
            }
        }
        _ => KeyClass::DEFAULT,
    }
}

/// The name a store-key prefix carries (`default` for the empty prefix).
pub fn name_of_prefix(prefix: &[u8]) -> &str {
    let class = class_of(prefix);
    match class.prefix.get(5..) {
        Some(name) if class.n.is_some() => std::str::from_utf8(name).unwrap_or(DEFAULT_NAME),
        _ => DEFAULT_NAME,
    }
}

/// Whether a client may use `key` in the default namespace.
pub fn check_default_key(key: &[u8]) -> Result<(), String> {
    if key.first() == Some(&PREFIX_MARK) {
        return Err("a key may not start with byte 0xFF (it marks namespaced keys)".into());
    }
    Ok(())
}

/// The version an `lww` get answers: the newest by timestamp, then dot. None when there
/// is none or the newest is a delete.
pub fn newest(siblings: &[Sibling]) -> Option<&Sibling> {
    siblings.iter().max_by_key(|s| (s.timestamp_ms, s.dot)).filter(|s| !s.is_tombstone())
}

/// The cluster's namespaces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespaces {
    by_name: BTreeMap<String, Namespace>,
}

impl Namespaces {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, name: &str) -> Option<&Namespace> {
        self.by_name.get(name)
    }

    pub fn list(&self) -> Vec<Namespace> {
        self.by_name.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Add a namespace created here. An existing name is refused, and so is one past the
    /// cluster's [`NAMESPACES_MAX`].
    pub fn create(&mut self, ns: Namespace) -> Result<(), NamespaceError> {
        if self.by_name.contains_key(&ns.name) {
            return Err(NamespaceError::new("name", format!("{} exists (n, resolution never change)", ns.name)));
        }
        if self.by_name.len() >= NAMESPACES_MAX {
            return Err(NamespaceError::new("name", format!("the cluster holds its maximum of {NAMESPACES_MAX}")));
        }
        self.by_name.insert(ns.name.clone(), ns);
        Ok(())
    }

    /// Change R and/or W of a namespace; the new definition.
    pub fn set_quorums(&mut self, name: &str, r: Option<u8>, w: Option<u8>) -> Result<Namespace, NamespaceError> {
        let ns = self.by_name.get(name).ok_or_else(|| NamespaceError::new("name", format!("no namespace {name}")))?;
        let (r, w) = (r.unwrap_or(ns.r), w.unwrap_or(ns.w));
        check_quorums(ns.n, r, w)?;
        let revision = ns.revision.checked_add(1).ok_or_else(|| NamespaceError::new("revision", "exhausted"))?;
        let changed = Namespace { r, w, revision, ..ns.clone() };
        self.by_name.insert(name.to_string(), changed.clone());
        Ok(changed)
    }

    /// Merge definitions a peer gossiped or the store held: invalid ones are dropped, and
    /// of two of one name the one of higher precedence stays. True when anything changed.
    pub fn merge(&mut self, incoming: &[Namespace]) -> bool {
        let mut changed = false;
        for ns in incoming {
            if ns.validate().is_err() {
                continue;
            }
            match self.by_name.get(&ns.name) {
                Some(held) if held.precedence() >= ns.precedence() => {}
                None if self.by_name.len() >= NAMESPACES_MAX => {}
                _ => {
                    self.by_name.insert(ns.name.clone(), ns.clone());
                    changed = true;
                }
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::{Actor, Dot};
    use proptest::prelude::*;

    fn ns(name: &str, n: u8, res: Resolution) -> Namespace {
        Namespace::create(name, n, 1, 1, res, 5, 10, "n1").unwrap()
    }

    #[test]
    fn store_keys_carry_their_class_and_default_keys_stay_as_given() {
        let a = ns("sessions", 1, Resolution::Lww);
        let k = a.store_key(b"user:1");
        let c = class_of(&k);
        assert_eq!((c.prefix, c.n, c.resolution), (&a.prefix()[..], Some(1), Resolution::Lww));
        assert_eq!(&k[c.prefix.len()..], b"user:1");
        assert_eq!(class_of(b"user:1"), KeyClass::DEFAULT);
        assert_eq!(KeyClass::DEFAULT.n_or(3), 3);
        assert_eq!((name_of_prefix(&a.prefix()), name_of_prefix(b"")), ("sessions", "default"));
        assert_eq!(prefix_of("sessions", 1, Resolution::Lww), Ok(a.prefix()));
        assert!(prefix_of("sessions", 0, Resolution::Lww).is_err() && prefix_of("", 1, Resolution::Lww).is_err());
        // A name that is a prefix of another's is still another namespace.
        let b = ns("sessions2", 1, Resolution::Lww);
        assert_ne!(class_of(&b.store_key(b"x")).prefix, c.prefix);
        assert!(!b.store_key(b"x").starts_with(&a.prefix()));
    }

    #[test]
    fn malformed_prefixes_read_as_the_default_namespace() {
        for k in
            [&[0xFF][..], &[0xFF, 1, 0, 0, 1, b'a'], &[0xFF, 1, 3, 9, 1, b'a'], &[0xFF, 1, 3, 0, 5, b'a'], &[0xFF, 2]]
        {
            assert_eq!(class_of(k), KeyClass::DEFAULT, "{k:?}");
        }
        assert!(check_default_key(&[0xFF, 1]).is_err());
        assert!(check_default_key(b"plain").is_ok());
    }

    #[test]
    fn bad_definitions_are_refused_naming_the_field() {
        let e = |r: Result<Namespace, NamespaceError>| r.unwrap_err().field;
        assert_eq!(e(Namespace::create("", 1, 1, 1, Resolution::Lww, 3, 0, "n1")), "name");
        assert_eq!(e(Namespace::create("default", 1, 1, 1, Resolution::Lww, 3, 0, "n1")), "name");
        assert_eq!(e(Namespace::create("a b", 1, 1, 1, Resolution::Lww, 3, 0, "n1")), "name");
        assert_eq!(e(Namespace::create(&"x".repeat(33), 1, 1, 1, Resolution::Lww, 3, 0, "n1")), "name");
        assert_eq!(e(Namespace::create("a", 0, 1, 1, Resolution::Lww, 3, 0, "n1")), "n");
        assert_eq!(e(Namespace::create("a", 4, 1, 1, Resolution::Lww, 3, 0, "n1")), "n");
        assert_eq!(e(Namespace::create("a", 2, 3, 1, Resolution::Lww, 3, 0, "n1")), "r");
        assert_eq!(e(Namespace::create("a", 2, 1, 0, Resolution::Lww, 3, 0, "n1")), "w");
        assert_eq!(Resolution::parse("lww"), Ok(Resolution::Lww));
        assert!(Resolution::parse("newest").is_err());
    }

    #[test]
    fn a_table_refuses_a_second_create_and_changes_only_quorums() {
        let mut t = Namespaces::new();
        t.create(ns("a", 3, Resolution::Siblings)).unwrap();
        assert!(t.create(ns("a", 1, Resolution::Lww)).is_err());
        let changed = t.set_quorums("a", Some(3), None).unwrap();
        assert_eq!((changed.n, changed.r, changed.w, changed.revision), (3, 3, 1, 1));
        assert!(t.set_quorums("a", Some(4), None).is_err());
        assert!(t.set_quorums("b", Some(1), None).is_err());
        assert_eq!(t.get("a"), Some(&changed));
    }

    #[test]
    fn the_newest_version_wins_and_a_newest_delete_reads_as_missing() {
        let s = |actor, counter, ts, v: Option<&[u8]>| Sibling {
            dot: Dot { actor: Actor(actor), counter },
            timestamp_ms: ts,
            value: v.map(<[u8]>::to_vec),
        };
        let older = s(1, 5, 10, Some(b"old"));
        let newer = s(2, 1, 20, Some(b"new"));
        assert_eq!(newest(&[older.clone(), newer.clone()]), Some(&newer));
        // A tie in time goes to the larger dot, on every replica alike.
        let tie = s(3, 1, 20, Some(b"tie"));
        assert_eq!(newest(&[tie.clone(), newer.clone()]), Some(&tie));
        assert_eq!(newest(&[older, s(2, 2, 30, None)]), None);
        assert_eq!(newest(&[]), None);
    }

    fn arb_ns() -> impl Strategy<Value = Namespace> {
        (0u8..3, 1u8..4, 0u64..3, 0u64..3, 0u8..2, 0u64..3).prop_map(|(name, n, created, by, res, revision)| {
            Namespace {
                name: format!("ns{name}"),
                n,
                r: 1,
                w: n,
                resolution: if res == 0 { Resolution::Siblings } else { Resolution::Lww },
                created_wall_ms: created,
                created_by: format!("n{by}"),
                revision,
            }
        })
    }

    proptest! {
        /// Gossip converges: whatever order definitions arrive in, every node keeps the same.
        #[test]
        fn merges_agree_in_any_order(defs in proptest::collection::vec(arb_ns(), 0..12), seed in any::<u64>()) {
            let mut a = Namespaces::new();
            a.merge(&defs);
            let mut shuffled = defs.clone();
            let len = shuffled.len().max(1);
            shuffled.rotate_left((seed as usize) % len);
            shuffled.reverse();
            let mut b = Namespaces::new();
            for d in &shuffled {
                b.merge(std::slice::from_ref(d));
            }
            prop_assert_eq!(&a, &b);
            // Merging again changes nothing.
            prop_assert!(!b.merge(&defs));
        }
    }
}
