//! The ringkv node: the actor shell around the core. Each concern is an actix actor that
//! moves bytes and time into a state machine from the `ringkv` core and carries out the
//! actions it returns; QUIC (quinn) between nodes and clients, redb on disk.

pub mod cli;
