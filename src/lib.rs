//! ringkv's core: the algorithms of Amazon's Dynamo (DeCandia et al., SOSP 2007) as pure
//! code. Nothing here opens a socket, touches a disk, reads the clock or draws randomness:
//! time and random numbers are arguments, and protocol state machines take inputs and hand
//! back the effects to carry out. The node (`actors/node`) only moves bytes and time in and
//! carries effects out; the simulation (`tests/simulation.rs`) does the same in one thread.
//!
//! # Architecture
//!
//! **Data and rules** (leaves: they import no stage):
//! - [`ring`]: consistent hashing with MD5 over Q equal partitions, ownership by the
//!   paper's strategy 3, preference lists of N distinct nodes and their fallbacks (§4.2, §6.2).
//! - [`version`]: dotted version vectors, siblings, contexts; how dots are issued (§4.4).
//! - [`merkle`]: one fixed-shape Merkle tree per partition and the level-by-level diff (§4.7).
//! - [`membership`]: the member table, its gossip merge, the ring as a fold of join and
//!   leave events (§4.8).
//! - [`store`]: a replica's local store over any ordered key-value engine: row layout,
//!   checksums, merges, coordinated writes, hints, reaped records, quarantine (§4, §4.6).
//! - [`wire`]: every message and the frame codec; [`config`]: the node's TOML.
//! - [`access`]: identities, roles, and the role each message needs.
//! - [`load_balance`]: data and request load against each member's fair share (§6.2).
//! - [`namespace`]: namespaces, each with its own N, R, W and reconciliation; how a
//!   stored key names its namespace.
//!
//! **Stages** (SEDA; each one concern of the paper, each a [`stage::Stage`]: inputs with
//! the time in, effects out):
//! - [`coordinator`]: client requests, one get/put state machine each (§4.5, §4.6, §5);
//! - [`replica`]: the replica side of coordinators', handoff's and reaping's requests;
//! - [`gossip`]: membership gossip, join, leave (§4.8);
//! - [`failure_detector`]: which peers answer (§4.8.3);
//! - [`handoff`]: hinted handoff, partition transfer, leaving, and [`reaper`] (§4.6, §4.9);
//! - [`anti_entropy`]: Merkle exchanges (§4.7);
//! - [`admission`]: background budgets under foreground latency feedback (§6.5).
//!
//! Each stage also keeps plain counters for operators and reports them on request
//! ([`metrics`]: data only; the node exports them in the Prometheus format).
//!
//! [`stage`] holds what flows between them and the routing ([`stage::route`] for messages,
//! [`stage::subscribers`] for signals), used alike by the node's actors and by
//! [`node::LocalNode`], which runs a whole node in one thread. [`node::NodeSettings`]
//! derives every stage's settings from a [`config::Config`] in one place.
//!
//! Storage operations are effects too ([`stage::Effect::Store`]): a stage hears the result
//! only after the batch holding the operation committed, so every answer that promises
//! durability (a replica's acknowledgement, a handoff ack) waits for the disk.

pub mod access;
pub mod admission;
pub mod anti_entropy;
pub mod config;
pub mod coordinator;
pub mod failure_detector;
pub mod gossip;
pub mod handoff;
pub mod load_balance;
pub mod membership;
pub mod merkle;
pub mod metrics;
pub mod namespace;
pub mod node;
pub mod reaper;
pub mod replica;
pub mod ring;
pub mod stage;
pub mod store;
pub mod version;
pub mod wire;
