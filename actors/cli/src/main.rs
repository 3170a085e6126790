//! The `ringkv` binary: parse the command line (a usage error is one line, exit 2), set
//! up logging on standard error, run the command and exit with its status.

/// mimalloc: a node and the bench allocate many small short-lived buffers per request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use ringkv_cli::args::ClientArgs;
use ringkv_cli::outcome::exit;

fn main() {
    // A panic is a bug: one line on standard error and the contract's "other error" status,
    // not Rust's report (unless RUST_BACKTRACE asks for it).
    let rust_report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if ringkv_console::backtrace_wanted() {
            rust_report(info);
        } else {
            ringkv_console::print_error("ringkv", &ringkv_console::panic_line(info));
        }
        std::process::exit(exit::OTHER);
    }));
    let args: ClientArgs = ringkv_console::parse_args();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    std::process::exit(ringkv_cli::run(args));
}
