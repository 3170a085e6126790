//! The `ringkv-node` binary: parse the command line (a usage error is one line, exit 2),
//! set up logging (`--log-format text|json`), then run a node, a dev cluster, `certs` or
//! `check-config`, and exit with the contract's status.

use std::path::Path;

/// mimalloc: a node and the bench allocate many small short-lived buffers per request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use ringkv_node::args::{CertsCommand, LogFormat, NodeArgs, NodeCommand};
use ringkv_node::start::{self, StartError};
use ringkv_transport::Auth;

fn main() {
    let args: NodeArgs = ringkv_console::parse_args();
    init_logs(args.log_format);
    let status = match (args.command, args.config) {
        (Some(NodeCommand::Dev { nodes, dir, durability, secret_only }), _) => {
            ringkv_node::dev::run(nodes, dir, &durability, secret_only, args.log_format)
        }
        (Some(NodeCommand::Certs { command }), _) => certs(command),
        (Some(NodeCommand::CheckConfig { file }), _) => check_config(&file),
        (None, Some(config)) => match start::run(&config) {
            Ok(()) => 0,
            Err(e) => failed(e),
        },
        (None, None) => {
            ringkv_console::print_error(
                "ringkv-node",
                "give --config FILE to run a node, or `dev` to run a local cluster (see ringkv-node --help)",
            );
            2
        }
    };
    std::process::exit(status);
}

/// Logs on standard error, filtered by RUST_LOG (default info), as text or JSON lines. A
/// panic is logged as one error event in the same format (Rust's own report with
/// RUST_BACKTRACE set).
fn init_logs(format: LogFormat) {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let rust_report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if ringkv_console::backtrace_wanted() {
            rust_report(info);
        } else {
            tracing::error!("{}", ringkv_console::panic_line(info));
        }
    }));
}

/// A node that could not start, or a config that would not let it: one line, and the status.
fn failed(e: StartError) -> i32 {
    ringkv_console::print_error("ringkv-node", e.message());
    e.status()
}

/// `ringkv-node check-config FILE`: the checks a node makes of its config at start, and
/// nothing else; one line saying what the node would be.
fn check_config(file: &Path) -> i32 {
    let (config, auth) = match start::load_config(file) {
        Ok(loaded) => loaded,
        Err(e) => return failed(e),
    };
    let auth = match auth {
        Auth::Tls(_) => "mutual TLS",
        Auth::Secret(_) => "secret-only",
    };
    let line = format!(
        "{}: ok: node {} on {} in cluster {:?} ({auth})",
        file.display(),
        config.node.id,
        config.node.listen,
        config.cluster.name
    );
    match ringkv_console::print_line(&line) {
        Ok(()) => 0,
        Err(e) => output_failed(e),
    }
}

/// Standard output failed other than by its reader going away (which ends it quietly).
fn output_failed(e: std::io::Error) -> i32 {
    ringkv_console::print_error("ringkv-node", &format!("cannot write to standard output: {e}"));
    5
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
            let lines: String = paths.iter().map(|p| format!("wrote {}\n", p.display())).collect();
            match ringkv_console::write_stdout(lines.as_bytes()) {
                Ok(()) => 0,
                Err(e) => output_failed(e),
            }
        }
        Err(e) => {
            ringkv_console::print_error("ringkv-node certs", &e);
            2
        }
    }
}
