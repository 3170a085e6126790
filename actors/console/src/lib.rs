//! How ringkv's binaries (`ringkv`, `ringkv-node`) behave as command-line tools, in one
//! place: standard output that ends quietly when its reader goes away (`ringkv ring |
//! head -1`), errors as one line on standard error, usage errors from clap as one line
//! with exit status 2, and panics (bugs) as one line too.
//!
//! Rust ignores SIGPIPE, so a write to a closed pipe fails with `BrokenPipe` instead of
//! killing the process; `print!`/`println!` turn that into a panic. The binaries write
//! through [`write_stdout`] instead, which takes a closed pipe as the end of the output (the
//! reader has all it wanted) and reports any other failure, and keep running to their
//! normal exit: `ringkv-node dev` still stops the nodes it started.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once standard output's reader has gone away: later output is skipped.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Write `bytes` to standard output and flush them. A reader that has gone away (a broken
/// pipe) is not an error: the output ends there, quietly, and later writes are skipped.
/// Any other failure (a full disk, a revoked terminal) is returned.
pub fn write_stdout(bytes: &[u8]) -> io::Result<()> {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut out = io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            STDOUT_CLOSED.store(true, Ordering::Relaxed);
            Ok(())
        }
        other => other,
    }
}

/// [`write_stdout`] of `text` and a newline.
pub fn print_line(text: &str) -> io::Result<()> {
    let mut line = String::with_capacity(text.len() + 1);
    line.push_str(text);
    line.push('\n');
    write_stdout(line.as_bytes())
}

/// Whether standard output's reader has gone away (seen by an earlier write).
pub fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(Ordering::Relaxed)
}

/// `message` as one line: its lines trimmed, the empty ones dropped, the rest joined with
/// "; " (a TOML parser's or an I/O library's message may span lines).
pub fn one_line(message: &str) -> String {
    message.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}

/// Print `program: message` on standard error as one line. A failure to write there is
/// ignored: there is nowhere left to report it.
pub fn print_error(program: &str, message: &str) {
    let _ = writeln!(io::stderr().lock(), "{program}: {}", one_line(message));
}

/// Parse the command line of `P`. `--help` and `--version` print as usual (exit 0, quiet
/// on a closed pipe); a usage error prints as one line on standard error, saying what is
/// wrong, the usage and where help is, and exits with clap's status (2).
pub fn parse_args<P: clap::Parser>() -> P {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match try_parse_from::<P>(&args) {
        Ok(parsed) => parsed,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let program = P::command().get_name().to_string();
            print_error(&program, &usage_error(&e, &command_path(&P::command(), &args)));
            std::process::exit(e.exit_code())
        }
    }
}

/// Parse `args` (the program's name first) as `P` does, except that a missing subcommand
/// is an error like any other instead of the whole help on standard error.
pub fn try_parse_from<P: clap::Parser>(args: &[std::ffi::OsString]) -> Result<P, clap::Error> {
    let mut cmd = no_help_for_missing(P::command());
    let mut matches = cmd.try_get_matches_from_mut(args)?;
    P::from_arg_matches_mut(&mut matches).map_err(|e| e.format(&mut cmd))
}

/// `cmd` and its subcommands, none printing its help for a missing argument or subcommand.
fn no_help_for_missing(cmd: clap::Command) -> clap::Command {
    let names: Vec<String> = cmd.get_subcommands().map(|s| s.get_name().to_string()).collect();
    names.into_iter().fold(cmd.arg_required_else_help(false), |cmd, name| cmd.mut_subcommand(name, no_help_for_missing))
}

/// The subcommands named in `args`, e.g. `ringkv admin limits`: whose `--help` to point to.
pub fn command_path(cmd: &clap::Command, args: &[std::ffi::OsString]) -> String {
    let mut path = vec![cmd.get_name().to_string()];
    let mut current = cmd;
    for arg in args.iter().skip(1) {
        let Some(arg) = arg.to_str() else { continue };
        if arg == "--" {
            break;
        }
        if let Some(sub) = current.find_subcommand(arg) {
            path.push(sub.get_name().to_string());
            current = sub;
        }
    }
    path.join(" ")
}

/// A clap usage error as one line: what is wrong (with clap's tips and possible values),
/// the usage when clap gives one, and the `--help` of the command at `path`.
pub fn usage_error(e: &clap::Error, path: &str) -> String {
    let rendered = e.to_string();
    let mut what = Vec::new();
    let mut usage = None;
    for line in rendered.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(u) = line.strip_prefix("Usage:") {
            usage = Some(u.trim().to_string());
        } else if line.starts_with("For more information") {
            continue;
        } else {
            what.push(line.strip_prefix("error:").map_or(line, str::trim));
        }
    }
    // Clap's bracketed lists ("[possible values: a, b]") go with the line before them.
    let mut out = String::new();
    for part in what {
        if !out.is_empty() {
            out.push_str(if part.starts_with('[') { " " } else { "; " });
        }
        out.push_str(part);
    }
    if let Some(u) = usage {
        out.push_str(&format!("; usage: {u}"));
    }
    out.push_str(&format!("; see `{path} --help`"));
    out
}

/// A panic's message and place as one line: a bug, to report.
pub fn panic_line(info: &std::panic::PanicHookInfo<'_>) -> String {
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_string());
    let place = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
    format!(
        "internal error (a bug, please report it): {}{place}; RUST_BACKTRACE=1 shows where it came from",
        one_line(&message)
    )
}

/// Whether the user asked for Rust's own panic output (`RUST_BACKTRACE` set and not 0).
pub fn backtrace_wanted() -> bool {
    std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser, Subcommand};

    #[derive(Debug, Parser)]
    #[command(name = "tool")]
    struct Tool {
        #[arg(long, global = true)]
        config: Option<String>,
        #[command(subcommand)]
        command: Cmd,
    }

    #[derive(Debug, Subcommand)]
    enum Cmd {
        Get {
            key: String,
        },
        Admin {
            #[command(subcommand)]
            command: Admin,
        },
    }

    #[derive(Debug, Subcommand)]
    enum Admin {
        Hints,
        Mode {
            #[arg(long, value_parser = ["a", "b"])]
            kind: String,
        },
    }

    fn error_of(args: &[&str]) -> (i32, String) {
        let args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        match try_parse_from::<Tool>(&args) {
            Ok(t) => panic!("parsed: {t:?}"),
            Err(e) => (e.exit_code(), usage_error(&e, &command_path(&Tool::command(), &args))),
        }
    }

    #[test]
    fn usage_errors_are_one_line_with_the_way_to_help() {
        for (args, says) in [
            (&["tool"][..], "requires a subcommand"),
            (&["tool", "get"], "<KEY>"),
            (&["tool", "admin"], "[subcommands: hints, mode"),
            (&["tool", "admin", "mode", "--kind", "c"], "[possible values: a, b]"),
            (&["tool", "gte", "k"], "unrecognized subcommand 'gte'"),
            (&["tool", "get", "k", "--nope"], "found; tip: to pass '--nope' as a value"),
        ] {
            let (status, line) = error_of(args);
            assert_eq!(status, 2, "{args:?}: {line}");
            assert!(!line.contains('\n'), "{args:?}: {line}");
            assert!(line.contains(says), "{args:?}: {line}");
            assert!(!line.starts_with("error"), "{args:?}: {line}");
        }
        assert!(error_of(&["tool", "get"]).1.contains("usage: tool get"));
        assert!(error_of(&["tool", "--config", "x", "admin", "mode", "--kind", "c"])
            .1
            .ends_with("`tool admin mode --help`"));
        assert!(error_of(&["tool", "gte", "k"]).1.ends_with("`tool --help`"));
    }

    #[test]
    fn help_and_version_are_not_usage_errors() {
        let args: Vec<std::ffi::OsString> = ["tool", "admin", "--help"].iter().map(Into::into).collect();
        let e = try_parse_from::<Tool>(&args).expect_err("help is shown by clap");
        assert!(!e.use_stderr());
        assert_eq!(e.exit_code(), 0);
    }

    #[test]
    fn messages_fold_into_one_line() {
        assert_eq!(
            one_line("invalid table header\n  expected `.`, `]`\n\n"),
            "invalid table header; expected `.`, `]`"
        );
        assert_eq!(one_line("plain"), "plain");
    }
}
