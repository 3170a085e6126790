use clap::Parser;
use ringkv_node::cli::NodeArgs;

fn main() {
    let _args = NodeArgs::parse();
    eprintln!("ringkv-node: the node is not built yet");
    std::process::exit(5);
}
