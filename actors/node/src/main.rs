use clap::Parser;

/// mimalloc: a node and the bench allocate many small short-lived buffers per request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use ringkv_node::args::{NodeArgs, NodeCommand};
use ringkv_node::start::{self, StartError};

fn main() {
    let args = NodeArgs::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let status = match (args.command, args.config) {
        (Some(NodeCommand::Dev { nodes, dir, durability }), _) => ringkv_node::dev::run(nodes, dir, &durability),
        (None, Some(config)) => match start::run(&config) {
            Ok(()) => 0,
            Err(StartError::Config(m)) => {
                eprintln!("ringkv-node: {m}");
                2
            }
            Err(StartError::Other(m)) => {
                eprintln!("ringkv-node: {m}");
                5
            }
        },
        (None, None) => {
            eprintln!("ringkv-node: give --config FILE to run a node, or `dev` to run a local cluster");
            2
        }
    };
    std::process::exit(status);
}
