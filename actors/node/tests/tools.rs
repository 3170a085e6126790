//! Process tests of the binaries as command-line tools: a closed stdout ends their output
//! quietly (`ringkv ring | head -1`), `ringkv-node check-config` says what a start would,
//! `--log-format json` logs JSON lines, and `ringkv-node dev` serves the commands it prints
//! and stops every node it started on Ctrl-C.

mod common;

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{closed_stdout, http_get, pids_mentioning, run_bounded, run_bounded_with, wait_until, Cluster, CLI, NODE};

const BOUND: Duration = Duration::from_secs(60);

/// Every complete non-empty line of `text` (a log still being written), parsed as a JSON
/// object.
fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text[..text.rfind('\n').map_or(0, |i| i + 1)]
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
            Ok(v) if v.is_object() => v,
            _ => panic!("not a JSON object line: {l:?}\nin:\n{text}"),
        })
        .collect()
}

/// The CLI against node 0 of `c` with a stdout whose reader is gone: (status, stderr).
fn cli_closed(c: &Cluster, args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(&*CLI);
    cmd.arg("--config").arg(&c.nodes[0].config).args(args).stdout(closed_stdout());
    let (code, _, err) = run_bounded_with(&mut cmd, BOUND);
    (code, err)
}

#[test]
fn a_closed_stdout_ends_the_output_quietly() {
    let mut c = Cluster::new(1, 1, 1, 1, "");
    c.start_all();
    c.wait_settled(&[0], BOUND);

    // Each command's output meets a broken pipe on its first write: the status is the
    // command's own, and nothing is said on stderr.
    for (args, status) in [
        (&["ring"][..], 0),
        (&["--json", "ring"], 0),
        (&["status"], 0),
        (&["--json", "status"], 0),
        (&["put", "k", "v"], 0),
        (&["get", "k"], 0),
        (&["--json", "get", "missing"], 1),
        (&["admin", "partitions"], 0),
        (&["bench", "--ops", "50", "--keys", "10", "--clients", "2"], 0),
        (&["--json", "bench", "--ops", "50", "--keys", "10", "--clients", "2", "--no-preload"], 0),
        (&["completions", "bash"], 0),
        (&["--help"], 0),
    ] {
        let (code, err) = cli_closed(&c, args);
        assert_eq!(code, Some(status), "ringkv {args:?}: {err}");
        assert_eq!(err, "", "ringkv {args:?} said something on stderr");
    }
    // The put went through although its output had nowhere to go.
    assert_eq!(c.values(0, "k"), Some(vec!["v".to_string()]));

    // A real pipeline: `ringkv ring | head -1`.
    let mut ring = Command::new(&*CLI)
        .arg("--config")
        .arg(&c.nodes[0].config)
        .arg("ring")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let head = Command::new("head").arg("-1").stdin(Stdio::from(ring.stdout.take().unwrap())).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&head.stdout).trim(), "{");
    assert!(wait_until(BOUND, || matches!(ring.try_wait(), Ok(Some(_)))), "ringkv ring did not end");
    let out = ring.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");

    // The node binary's commands that print: certs and check-config.
    let certs = c.dir.path().join("closed-certs");
    let mut cmd = Command::new(NODE);
    cmd.args(["certs", "create-ca", "--dir"]).arg(&certs).stdout(closed_stdout());
    let (code, _, err) = run_bounded_with(&mut cmd, BOUND);
    assert_eq!((code, err.as_str()), (Some(0), ""));
    assert!(certs.join("ca.crt").exists() && certs.join("ca.key").exists(), "the CA was written all the same");
    let mut cmd = Command::new(NODE);
    cmd.arg("check-config").arg(&c.nodes[0].config).stdout(closed_stdout());
    let (code, _, err) = run_bounded_with(&mut cmd, BOUND);
    assert_eq!((code, err.as_str()), (Some(0), ""));
}

/// What a process did: its status (None when killed), stdout and stderr.
type Ran = (Option<i32>, String, String);

/// `ringkv-node check-config FILE` and `ringkv-node --config FILE`.
fn check_and_start(config: &Path) -> (Ran, Ran) {
    let check = run_bounded(Command::new(NODE).arg("check-config").arg(config), BOUND);
    let start = run_bounded(Command::new(NODE).arg("--config").arg(config), BOUND);
    (check, start)
}

#[test]
fn check_config_says_what_a_start_would() {
    let mut c = Cluster::new(2, 2, 1, 1, "");
    let dir = c.dir.path().to_path_buf();

    // Good configs, with a secret and with certificates: one line, exit 0, nothing started.
    let (code, out, err) = run_bounded(Command::new(NODE).arg("check-config").arg(&c.nodes[0].config), BOUND);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(err, "");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains(": ok: node n1 on 127.0.0.1:") && out.contains("secret-only"), "{out}");
    assert!(!c.nodes[0].data.exists(), "check-config opened no storage");

    // Bad configs: the messages and status of a start, each one line.
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let good = std::fs::read_to_string(&c.nodes[0].config).unwrap();
    c.write_config(0, "short");
    let short_secret = write("short-secret.toml", &std::fs::read_to_string(&c.nodes[0].config).unwrap());
    let syntax = write("syntax.toml", &good.replacen("[cluster]", "[cluster", 1));
    let unknown_key = write("unknown-key.toml", &good.replacen("[gossip]", "[gossip]\nintervl_ms = 5", 1));
    let quorum = write("quorum.toml", &good.replacen("read_quorum = 1", "read_quorum = 3", 1));
    c.use_tls();
    let tls_good = c.nodes[0].config.clone();
    let other_node_cert = write(
        "other-node-cert.toml",
        &std::fs::read_to_string(&tls_good).unwrap().replace("n1.crt", "n2.crt").replace("n1.key", "n2.key"),
    );
    for (config, says) in [
        (&short_secret, "cluster.secret"),
        (&syntax, "line"),
        (&unknown_key, "intervl_ms"),
        (&quorum, "read_quorum"),
        (&other_node_cert, "tls.cert"),
    ] {
        let ((check, check_out, check_err), (start, start_out, start_err)) = check_and_start(config);
        assert_eq!(start, Some(2), "{}: a start refuses it: {start_err}", config.display());
        assert_eq!(check, Some(2), "{}: {check_err}", config.display());
        assert_eq!(check_err, start_err, "{}: the same message", config.display());
        assert_eq!((check_out.as_str(), start_out.as_str()), ("", ""));
        assert_eq!(check_err.lines().count(), 1, "one line: {check_err}");
        assert!(check_err.starts_with("ringkv-node: ") && check_err.contains(says), "{check_err}");
    }
    let (code, out, err) = run_bounded(Command::new(NODE).arg("check-config").arg(&tls_good), BOUND);
    assert_eq!((code, err.as_str()), (Some(0), ""));
    assert!(out.contains("mutual TLS"), "{out}");
}

#[test]
fn log_format_json_logs_json_lines() {
    let mut c = Cluster::new(1, 1, 1, 1, "");
    c.node_args = vec!["--log-format".into(), "json".into()];
    c.start_all();
    c.wait_settled(&[0], BOUND);
    assert!(
        wait_until(BOUND, || std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default().contains("node started")),
        "{}",
        c.logs()
    );
    let lines = json_lines(&std::fs::read_to_string(&c.nodes[0].log).unwrap());
    let started = lines.iter().find(|l| l["fields"]["message"] == "node started").expect("a start event");
    assert_eq!(started["level"], "INFO");
    assert_eq!(started["fields"]["node"], "n1");
    assert!(started["timestamp"].is_string() && started["target"].is_string(), "{started}");
}

/// A `ringkv-node dev` child: stopped, with every process that mentions its directory,
/// when dropped (a test that fails half way leaves nothing running).
struct Dev {
    child: std::process::Child,
    dir: String,
}

impl Drop for Dev {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
            }
            if !wait_until(Duration::from_secs(10), || matches!(self.child.try_wait(), Ok(Some(_)))) {
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
        }
        for pid in pids_mentioning(&self.dir) {
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

impl Dev {
    fn start(dir: &Path, args: &[&str], stdout: Stdio) -> Dev {
        let child = Command::new(NODE)
            .arg("dev")
            .arg("--dir")
            .arg(dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(std::fs::File::create(dir.with_extension("stderr")).unwrap())
            .spawn()
            .unwrap();
        Dev { child, dir: dir.display().to_string() }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(Path::new(&self.dir).with_extension("stderr")).unwrap_or_default()
    }

    /// The node processes it started (their command lines name configs in its directory).
    fn nodes(&self) -> Vec<i32> {
        let me = self.child.id() as i32;
        pids_mentioning(&format!("{}/n", self.dir)).into_iter().filter(|&p| p != me).collect()
    }

    /// Ctrl-C: dev exits 0, and every node it started is gone.
    fn interrupt_and_check_all_stopped(&mut self) {
        assert_eq!(self.nodes().len(), self.node_count(), "node processes before Ctrl-C");
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGINT);
        }
        assert!(wait_until(BOUND, || matches!(self.child.try_wait(), Ok(Some(_)))), "dev did not exit on Ctrl-C");
        let status = self.child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.code(), Some(0), "dev's status (signal {:?}); stderr: {}", status.signal(), self.stderr());
        assert!(wait_until(BOUND, || pids_mentioning(&self.dir).is_empty()), "left running: {:?}", self.nodes());
    }

    fn node_count(&self) -> usize {
        (1..=16).filter(|i| Path::new(&self.dir).join(format!("n{i}.toml")).exists()).count()
    }
}

/// Run a command line that dev printed, exactly (its paths hold no spaces): (status,
/// stdout, stderr).
fn run_printed(line: &str) -> Ran {
    let words: Vec<&str> = line.split_whitespace().collect();
    run_bounded(Command::new(words[0]).args(&words[1..]), BOUND)
}

#[test]
fn dev_serves_the_commands_it_prints_and_ctrl_c_stops_every_node() {
    let _ = &*CLI; // dev points at the CLI next to it: build it if this package runs alone
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut dev = Dev::start(&dir, &["--nodes", "3", "--log-format", "json"], Stdio::piped());
    let (tx, rx) = mpsc::channel();
    let stdout = dev.child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // Wait (bounded) for the commands it prints.
    let mut printed = Vec::new();
    let deadline = Instant::now() + BOUND;
    while !printed.iter().any(|l: &String| l.contains(" get hello")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => printed.push(line),
            Err(e) => panic!("dev printed no commands ({e}): {printed:?}\nstderr: {}", dev.stderr()),
        }
    }
    let command =
        |what: &str| printed.iter().find(|l| l.contains(what)).map(|l| l.trim().to_string()).expect("printed");
    let (put, get) = (command(" put hello world"), command(" get hello"));
    assert!(put.contains(&format!("--config {}", dir.display())), "{put}");

    // Through the exact commands printed: the put once the cluster takes writes, then the get.
    let mut last = String::new();
    let put_done = wait_until(BOUND, || {
        let (code, _, err) = run_printed(&put);
        last = err;
        code == Some(0)
    });
    assert!(put_done, "{put}: {last}");
    let mut got = String::new();
    let get_done = wait_until(BOUND, || {
        let (code, out, _) = run_printed(&get);
        got = out;
        code == Some(0) && got.lines().next() == Some("world")
    });
    assert!(get_done, "{get}: {got}");

    // Each node's metrics and cluster page, at the URLs printed: the put counted on n1.
    let urls: Vec<String> = printed
        .iter()
        .flat_map(|l| l.split_whitespace())
        .map(|w| w.trim_end_matches(')'))
        .filter(|w| w.starts_with("http://127.0.0.1:") && w.ends_with("/metrics"))
        .map(String::from)
        .collect();
    assert_eq!(urls.len(), 3, "{printed:?}");
    for url in &urls {
        let port: u16 = url["http://127.0.0.1:".len()..].trim_end_matches("/metrics").parse().expect("a port");
        let (status, _, body) = http_get(port, "/metrics");
        assert_eq!(status, 200, "{url}");
        assert!(body.contains("# TYPE ringkv_requests_total counter"), "{url}: {body}");
        assert_eq!(http_get(port, "/").0, 200, "{url}");
    }
    let first = urls[0]["http://127.0.0.1:".len()..].trim_end_matches("/metrics").parse().expect("a port");
    assert!(http_get(first, "/metrics").2.contains("ringkv_requests_total{op=\"put\",result=\"ok\"}"));

    // The nodes log as dev was told.
    let n1 = std::fs::read_to_string(dir.join("n1.log")).unwrap();
    assert!(json_lines(&n1).iter().any(|l| l["fields"]["message"] == "node started"), "{n1}");

    dev.interrupt_and_check_all_stopped();
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(rest.iter().any(|l| l == "stopping 3 node(s)"), "{rest:?}");
    assert_eq!(dev.stderr(), "");
}

#[test]
fn dev_with_a_closed_stdout_runs_on_quietly_and_ctrl_c_still_stops_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut dev = Dev::start(&dir, &["--nodes", "1"], closed_stdout());
    let admin = dir.join("admin.toml");
    let answered = wait_until(BOUND, || {
        admin.exists()
            && Command::new(&*CLI).arg("--config").arg(&admin).arg("status").output().is_ok_and(|o| o.status.success())
    });
    assert!(answered, "the cluster answers; stderr: {}", dev.stderr());
    dev.interrupt_and_check_all_stopped();
    assert_eq!(dev.stderr(), "");
}
