//! Command-line arguments of `ringkv-node`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// ringkv-node: one node of a ringkv cluster.
#[derive(Debug, Parser)]
#[command(name = "ringkv-node", version, about = "Run a ringkv node, or a local dev cluster")]
pub struct NodeArgs {
    /// The node's TOML config.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// How the node logs on standard error: text, or json (one JSON object per line).
    /// `dev` passes it on to the nodes it starts.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Option<NodeCommand>,
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Write configs for a local cluster, start one node per config on loopback, stop them on Ctrl-C.
    Dev {
        /// Number of nodes.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
        nodes: u32,
        /// Directory for configs and data (default: a fresh temporary directory).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// storage.durability of every node: sync (a write is on disk before it is
        /// acknowledged) or buffered (flushed every storage.flush_interval_ms).
        #[arg(long, default_value = "sync", value_parser = ["sync", "buffered"])]
        durability: String,
        /// Authenticate with a shared cluster secret instead of certificates (the secret is
        /// then the whole trust boundary).
        #[arg(long)]
        secret_only: bool,
    },
    /// Make the cluster's certificates: a CA, then one certificate per node and per client.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Check a node config as `--config FILE` does at start (its secret or certificates
    /// too), without starting: exit 0 when the node could start with it, else 2.
    CheckConfig {
        /// The node's TOML config.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// The format of a node's log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// For people: time, level, where, message and fields.
    Text,
    /// One JSON object per line (timestamp, level, fields, target, spans).
    Json,
}

impl LogFormat {
    /// The value of `--log-format` that selects this format.
    pub fn as_arg(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Write DIR/ca.crt and DIR/ca.key: the cluster's certificate authority (keep ca.key offline).
    CreateCa {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Write DIR/ID.crt and DIR/ID.key: node ID's certificate, signed by DIR's CA.
    CreateNode {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The node's id (node.id in its config).
        #[arg(long)]
        id: String,
    },
    /// Write DIR/NAME.crt and DIR/NAME.key: a client's certificate with its role, signed by DIR's CA.
    CreateClient {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A name for the client or operator (in the node's logs).
        #[arg(long)]
        name: String,
        /// read: get, status, ring; write: also put and delete; admin: also every admin command.
        #[arg(long, value_parser = ["read", "write", "admin"])]
        role: String,
    },
}
