use clap::Parser;

/// mimalloc: a node and the bench allocate many small short-lived buffers per request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use ringkv_cli::args::ClientArgs;

fn main() {
    let args = ClientArgs::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    std::process::exit(ringkv_cli::run(args));
}
