use clap::Parser;

/// mimalloc: a node and the bench allocate many small short-lived buffers per request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use ringkv_node::args::{CertsCommand, NodeArgs, NodeCommand};
use ringkv_node::start::{self, StartError};

fn main() {
    let args = NodeArgs::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let status = match (args.command, args.config) {
        (Some(NodeCommand::Dev { nodes, dir, durability, secret_only }), _) => {
            ringkv_node::dev::run(nodes, dir, &durability, secret_only)
        }
        (Some(NodeCommand::Certs { command }), _) => certs(command),
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

/// `ringkv-node certs ...`: print the files written; exit 2 on bad input.
fn certs(command: CertsCommand) -> i32 {
    use ringkv_transport::pki;
    let written = match command {
        CertsCommand::CreateCa { dir } => pki::create_ca(&dir),
        CertsCommand::CreateNode { dir, id } => pki::create_node(&dir, &id),
        CertsCommand::CreateClient { dir, name, role } => {
            ringkv::access::Role::parse_client(&role).and_then(|role| pki::create_client(&dir, &name, role))
        }
    };
    match written {
        Ok(paths) => {
            for p in paths {
                println!("wrote {}", p.display());
            }
            0
        }
        Err(e) => {
            eprintln!("ringkv-node certs: {e}");
            2
        }
    }
}
