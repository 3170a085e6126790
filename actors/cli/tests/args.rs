//! The `ringkv` binary's answers to bad arguments, without a cluster: a clear message and
//! exit status 2, nothing contacted. (Building this test also builds the binary that the
//! node package's process tests drive.)

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
