//! The `ringkv` binary without a cluster: bad arguments get a one-line message and exit
//! status 2, nothing contacted; shell completions; an output that fails. (Building this
//! test also builds the binary that the node package's process tests drive.)

use std::process::Command;

const CLI: &str = env!("CARGO_BIN_EXE_ringkv");

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(CLI).args(args).output().expect("the CLI runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn help_succeeds_and_bad_arguments_exit_2_with_a_reason() {
    assert_eq!(run(&["--help"]).0, 0);
    let (code, err) = run(&["get", "k"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--config"), "says what is missing: {err}");
    let (code, err) = run(&["bench", "--workload", "x"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("workload"), "{err}");
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("missing.toml");
    let (code, err) = run(&["--config", missing.to_str().expect("utf-8 path"), "status"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("missing.toml"), "names the file: {err}");
    let (code, err) = run(&["bench", "--pin", "not-an-address", "--config", missing.to_str().expect("utf-8 path")]);
    assert_eq!(code, 2, "{err}");
}

/// Standard output and error of the CLI with `args`, and its status.
fn output(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(CLI).args(args).output().expect("the CLI runs");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[test]
fn usage_errors_are_one_line_exit_2_and_point_to_help() {
    for (args, says) in [
        (&[][..], "requires a subcommand"),
        (&["get"], "<KEY>"),
        (&["admin"], "'ringkv admin' requires a subcommand"),
        (&["gte", "k"], "unrecognized subcommand 'gte'"),
        (&["bench", "--workload", "x"], "[possible values: a, b, c, f]"),
        (&["get", "k", "--nope"], "--nope"),
        (&["completions", "tcsh"], "tcsh"),
        (&["get", "k", "--r", "many"], "--r"),
        (&["admin", "transfers", "--timeout", "5"], "--watch"),
        (&["admin", "leave", "n1", "--timeout", "5"], "--wait"),
        (&["admin", "transfers", "--watch", "--timeout", "soon"], "--timeout"),
    ] {
        let (code, out, err) = output(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(out, "", "{args:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(err.starts_with("ringkv: ") && err.contains(says), "{args:?}: {err}");
        assert!(err.contains("--help`"), "{args:?}: says where help is: {err}");
    }
    // Help and the version are not errors.
    let (code, out, err) = output(&["admin", "--help"]);
    assert_eq!((code, err.as_str()), (0, ""));
    assert!(out.contains("partitions") && out.contains("transfers"), "{out}");
    let (code, out, _) = output(&["admin", "leave", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--wait") && out.contains("--timeout"), "{out}");
    assert_eq!(output(&["--version"]).0, 0);
}

#[test]
fn completions_need_no_config_or_cluster() {
    for (shell, has) in [("bash", "complete -F _ringkv"), ("zsh", "#compdef ringkv"), ("fish", "complete -c ringkv")] {
        let (code, out, err) = output(&["completions", shell]);
        assert_eq!((code, err.as_str()), (0, ""), "{shell}");
        assert!(out.contains(has), "{shell}: {out}");
        for command in ["get", "put", "bench", "completions"] {
            assert!(out.contains(command), "{shell} completes {command}");
        }
    }
    // The bash script is valid bash, where bash is installed.
    let (_, script, _) = output(&["completions", "bash"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("ringkv.bash");
    std::fs::write(&file, script).expect("write the script");
    if let Ok(check) = Command::new("bash").arg("-n").arg(&file).output() {
        assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    }
}

#[test]
fn an_output_that_fails_otherwise_than_by_a_closed_pipe_is_an_error() {
    // /dev/full: every write fails with "no space left on device".
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else { return };
    let out = Command::new(CLI).args(["completions", "bash"]).stdout(full).output().expect("the CLI runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("ringkv: cannot write to standard output"), "{err}");
}
