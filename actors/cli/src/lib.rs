//! `ringkv`, the command-line client: the commands of the user contract (README), their
//! output (human or `--json`) and exit statuses, and the `bench` load generator, all on
//! the `ringkv-client` library.

pub mod args;
pub mod bench;
pub mod commands;
