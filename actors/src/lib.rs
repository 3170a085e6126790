//! The ringkv node: the actor shell around the core. Each concern is an actix actor that
//! moves bytes and time into a state machine from the `ringkv` core and carries out the
//! actions it returns; QUIC (quinn) between nodes and clients, redb on disk.
//!
//! Stages: [`transport`] (QUIC endpoint, authentication, framing), [`client_api`]
//! (admission of client requests, admin answers), [`coordinator`] (one actor per request),
//! [`storage`] (redb, group commit), [`gossiper`] (membership and ring),
//! [`failure_detector`], [`admission`] (background limits). [`client`] is the client side
//! the CLI uses, [`dev`] the one-command local cluster.

pub mod admission;
pub mod anti_entropy;
pub mod bench;
pub mod cli;
pub mod client;
pub mod client_api;
pub mod clock;
pub mod coordinator;
pub mod dev;
pub mod failure_detector;
pub mod gossiper;
pub mod handoff;
pub mod net;
pub mod node;
pub mod router;
pub mod storage;
pub mod transport;
