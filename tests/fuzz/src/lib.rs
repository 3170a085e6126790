//! The fuzz targets of `tests/decoders/targets.rs`, shared with the stable test
//! `tests/decoders.rs`: one function per target, called by each `fuzz_targets/*.rs`.

#[path = "../../decoders/targets.rs"]
mod targets;

pub use targets::*;
