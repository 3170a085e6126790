//! ringkv's core: the algorithms of Amazon's Dynamo (DeCandia et al., SOSP 2007) as pure
//! code. Nothing here opens a socket, touches a disk, reads the clock or draws randomness:
//! time and random numbers are arguments, and protocol state machines take inputs and hand
//! back the actions to carry out. The node in `actors/` moves bytes and time in and out.

pub mod admission;
pub mod anti_entropy;
pub mod config;
pub mod coordinator;
pub mod failure_detector;
pub mod gossip;
pub mod handoff;
pub mod membership;
pub mod merkle;
pub mod node;
pub mod reaper;
pub mod replica;
pub mod ring;
pub mod stage;
pub mod store;
pub mod version;
pub mod wire;
