use clap::Parser;
use ringkv_node::cli::ClientArgs;

fn main() {
    let _args = ClientArgs::parse();
    eprintln!("ringkv: the node is not built yet");
    std::process::exit(5);
}
