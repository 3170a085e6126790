//! `ringkv`, the command-line client: the commands of the user contract (README), their
//! output (human or `--json`) and exit statuses, and the `bench` load generator, all on
//! the `ringkv-client` library.

pub mod args;
pub mod bench;
pub mod commands;
pub mod outcome;

use args::{ClientArgs, ClientCommand};
use commands::{execute, target, Client};
use outcome::{exit, Failure, Outcome};

/// The `ringkv` binary: run the command, print, and return the exit status.
pub fn run(args: ClientArgs) -> i32 {
    let json = args.global.json;
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
            execute(&client, args.command, setup.value_bytes_max).await
        })
    })();
    match result {
        Ok(out) => {
            // A closed stdout (`ringkv ... | head`) is not a reason to panic.
            use std::io::Write;
            let mut stdout = std::io::stdout().lock();
            let _ = if json {
                writeln!(stdout, "{}", out.doc)
            } else if !out.human.is_empty() {
                writeln!(stdout, "{}", out.human)
            } else {
                Ok(())
            };
            out.status
        }
        Err(f) => {
            eprintln!("ringkv: {}", f.message);
            f.status
        }
    }
}
