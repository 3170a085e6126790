//! `ringkv`, the command-line client: the commands of the user contract (README), their
//! output (human or `--json`) and exit statuses, and the `bench` load generator, all on
//! the `ringkv-client` library. Output goes through `ringkv-console`: a closed pipe ends
//! it quietly, and every error is one line on standard error.

pub mod args;
pub mod bench;
pub mod commands;
pub mod outcome;
pub mod progress;

use args::{ClientArgs, ClientCommand};
use commands::{execute, target, Client};
use outcome::{exit, Failure, Outcome};

/// The `ringkv` binary: run the command, print, and return the exit status.
pub fn run(args: ClientArgs) -> i32 {
    let json = args.global.json;
    if let ClientCommand::Completions { shell } = args.command {
        return finish(completions(shell));
    }
    let result = (|| -> Result<Outcome, Failure> {
        let (addr, setup) = target(args.global.config.as_deref(), args.global.node.as_deref())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Failure::new(exit::OTHER, format!("cannot start the runtime: {e}")))?;
        rt.block_on(async {
            if let ClientCommand::Bench(b) = &args.command {
                return bench::run(b.clone(), addr, &setup.creds, setup.frame_max).await;
            }
            // The CLI talks to the node it is given (--node, else the config's address).
            let client = Client::pinned(addr, &setup.creds, setup.frame_max).await?;
            execute(&client, args.command, setup.value_bytes_max, json).await
        })
    })();
    finish(result.and_then(|out| {
        // A watch that printed its updates as it went has no document left to print.
        let text = match json {
            true if out.doc.is_null() => String::new(),
            true => out.doc.to_string(),
            false => out.human,
        };
        if !text.is_empty() {
            ringkv_console::print_line(&text).map_err(output_failed)?;
        }
        Ok(out.status)
    }))
}

/// `ringkv completions SHELL`: the script on standard output.
fn completions(shell: clap_complete::Shell) -> Result<i32, Failure> {
    use clap::CommandFactory;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut ClientArgs::command(), "ringkv", &mut script);
    ringkv_console::write_stdout(&script).map_err(output_failed)?;
    Ok(exit::OK)
}

/// Standard output failed other than by its reader going away (which ends the output
/// quietly): a full disk, a revoked terminal.
pub(crate) fn output_failed(e: std::io::Error) -> Failure {
    Failure::new(exit::OTHER, format!("cannot write to standard output: {e}; check where the output goes"))
}

/// The exit status, a failure printed first as one line on standard error.
fn finish(result: Result<i32, Failure>) -> i32 {
    match result {
        Ok(status) => status,
        Err(f) => {
            ringkv_console::print_error("ringkv", &f.message);
            f.status
        }
    }
}
