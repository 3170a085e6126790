//! The ringkv node: the actor shell around the core's stages ([`ringkv::stage`]).
//!
//! Each stage of the core (coordinator, replica, gossip, failure detector, handoff,
//! anti-entropy, admission) runs in its own actix actor ([`stage_actor::StageActor`]),
//! which only moves inputs and time into the stage and carries out the effects it returns.
//! Two more stages do the I/O: [`transport`] (the QUIC endpoint: connections, handshakes,
//! framed streams, the address book) and [`storage`] (redb on its own thread, with group
//! commit). [`http`] serves metrics and the cluster page ([`metrics`]: the
//! encoding). [`start`] wires them together from a config file; [`dev`] runs a local cluster.

pub mod args;
pub mod clock;
pub mod dev;
pub mod http;
pub mod mailbox;
pub mod metrics;
pub mod stage_actor;
pub mod start;
pub mod storage;
pub mod transport;
