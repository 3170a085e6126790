//! Command-line arguments of `ringkv`, as the user contract (README) fixes them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// ringkv: the client of a ringkv cluster.
#[derive(Debug, Parser)]
#[command(name = "ringkv", version, about = "Read, write and administer a ringkv cluster")]
pub struct ClientArgs {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: ClientCommand,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// A client file ([client]: node addresses and certificates or the secret), or a node's own config.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The node to talk to, overriding the config's address.
    #[arg(long, global = true, value_name = "ADDR")]
    pub node: Option<String>,
    /// Print one JSON document.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Read a key: every concurrent value and the context to write back with.
    Get {
        key: String,
        /// Read quorum for this request (1..=N).
        #[arg(long)]
        r: Option<u8>,
        /// The namespace (default: the cluster's own).
        #[arg(long, value_name = "NAME")]
        ns: Option<String>,
    },
    /// Write a value; VALUE `-` reads standard input.
    Put {
        key: String,
        value: String,
        /// The context of the read this write supersedes.
        #[arg(long)]
        context: Option<String>,
        /// Write quorum for this request (1..=N).
        #[arg(long)]
        w: Option<u8>,
        /// The namespace (default: the cluster's own).
        #[arg(long, value_name = "NAME")]
        ns: Option<String>,
    },
    /// Write a tombstone (reads the context first when none is given).
    Delete {
        key: String,
        #[arg(long)]
        context: Option<String>,
        #[arg(long)]
        w: Option<u8>,
        /// The namespace (default: the cluster's own).
        #[arg(long, value_name = "NAME")]
        ns: Option<String>,
    },
    /// This node's view of the cluster.
    Status,
    /// Each partition's preference list.
    Ring,
    /// Operator commands.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Load generator: YCSB-style workloads against the cluster.
    Bench(BenchArgs),
    /// Print a shell completion script, e.g. `source <(ringkv completions bash)` (needs no
    /// --config or cluster).
    Completions {
        /// The shell: bash, zsh or fish (also elvish, powershell).
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Partitions this node stores, with key counts and Merkle roots.
    Partitions,
    /// Hints this node holds, by intended node.
    Hints,
    /// Make NODE_ID hand its partitions away, then leave the ring.
    Leave {
        node_id: String,
        /// Follow its transfers until it has left (a progress bar on a terminal, JSON lines
        /// with --json); exit status 3 if it has not left by --timeout.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds (exit status 3).
        #[arg(long, value_name = "SECONDS", default_value_t = 600, requires = "wait")]
        timeout: u64,
    },
    /// Every member's hinted handoff and partition transfers: hints held and delivered,
    /// partitions pending with their keys left, keys and bytes moved.
    Transfers {
        /// Ask again every second until nothing is pending (a progress bar on a terminal, one
        /// JSON line per update with --json); exit status 3 at --timeout.
        #[arg(long)]
        watch: bool,
        /// With --watch: give up after this many seconds (exit status 3).
        #[arg(long, value_name = "SECONDS", default_value_t = 600, requires = "watch")]
        timeout: u64,
    },
    /// Read background admission limits, or change them: `limits set NAME=VALUE ...`.
    Limits {
        #[command(subcommand)]
        command: Option<LimitsCommand>,
    },
    /// Namespaces: each application its own N, R, W and reconciliation.
    Namespace {
        #[command(subcommand)]
        command: NamespaceCommand,
    },
    /// Fault injection (needs testing.fault_injection): drop traffic with peers.
    Fault {
        #[command(subcommand)]
        command: FaultCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum LimitsCommand {
    /// Change limits at once, e.g. `anti_entropy.max_inflight=0`.
    Set {
        /// On every member (each node that is up), not only the node talked to.
        #[arg(long)]
        all: bool,
        #[arg(required = true, value_name = "NAME=VALUE")]
        pairs: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum NamespaceCommand {
    /// Define a namespace on the whole cluster (N and the resolution never change after).
    Create {
        name: String,
        /// Replicas of each key (default: the cluster's replicas).
        #[arg(long)]
        n: Option<u8>,
        /// Read quorum (default: a majority of N).
        #[arg(long)]
        r: Option<u8>,
        /// Write quorum (default: a majority of N).
        #[arg(long)]
        w: Option<u8>,
        /// How concurrent writes are reconciled.
        #[arg(long, value_parser = ["siblings", "lww"])]
        resolution: Option<String>,
    },
    /// Change a namespace's read and write quorums.
    Set {
        name: String,
        #[arg(long)]
        r: Option<u8>,
        #[arg(long)]
        w: Option<u8>,
    },
    /// The cluster's namespaces.
    List,
}

#[derive(Debug, Subcommand)]
pub enum FaultCommand {
    /// Drop all traffic to and from these peers.
    Block {
        #[arg(required = true)]
        peers: Vec<String>,
    },
    /// Restore traffic with every peer.
    Unblock,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// a: 50/50 read/blind update; b: 95/5; c: read only; f: 50/50 read/read-modify-write.
    #[arg(long, default_value = "a", value_parser = ["a", "b", "c", "f"])]
    pub workload: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub clients: u32,
    /// Operations in all.
    #[arg(long, default_value_t = 20000)]
    pub ops: u64,
    /// Run for this many seconds instead of a number of operations.
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    pub value_size: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub keys: u64,
    /// The keys were loaded by an earlier run: do not write them first.
    #[arg(long)]
    pub no_preload: bool,
    /// Spread the clients over these nodes, each sending every request to its node
    /// (server-driven coordination; default: each request to a node of its key's
    /// preference list).
    #[arg(long, value_name = "ADDR", conflicts_with = "pin")]
    pub nodes: Vec<String>,
    /// Send every request to this node (server-driven coordination).
    #[arg(long, value_name = "ADDR")]
    pub pin: Option<String>,
    /// Routed puts go to the first node of the preference list, not to the replica that
    /// answered the read before fastest (workload f).
    #[arg(long)]
    pub no_fastest: bool,
    /// Also print progress on standard output, one JSON line a second and one at the end of
    /// each phase (`{"progress": "preload"|"run", "done", "total", "elapsed_ms"}`), before the
    /// result.
    #[arg(long)]
    pub progress_json: bool,
}
