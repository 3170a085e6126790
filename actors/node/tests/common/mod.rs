//! Real node processes on loopback for process-level tests: configs in a temp dir, one
//! child process per node, every process killed when the harness is dropped.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const NODE: &str = env!("CARGO_BIN_EXE_ringkv-node");

/// The `ringkv` CLI: built by the workspace next to `ringkv-node` (package ringkv-cli);
/// built here if this package's tests run alone.
pub static CLI: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let path = Path::new(NODE).with_file_name("ringkv");
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "ringkv-cli", "--bin", "ringkv"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "cannot build the ringkv CLI");
    }
    path.display().to_string()
});

pub struct Node {
    pub id: String,
    pub port: u16,
    pub config: PathBuf,
    pub data: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
    /// The TCP port of its metrics listener, written into its config once
    /// [`Cluster::enable_metrics`] was called.
    pub metrics_port: u16,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub secret: String,
    pub replicas: u32,
    pub quorum: (u32, u32),
    pub extra: String,
    /// Q.
    pub partitions: u32,
    /// coordinator.request_timeout_ms and replica_timeout_ms.
    pub timeouts_ms: (u64, u64),
    /// Mutual TLS with certificates in `dir/certs` (see [`Cluster::use_tls`]).
    pub tls: bool,
    /// More arguments for every node started, after `--config FILE`.
    pub node_args: Vec<String>,
    /// Every node has `[metrics] listen` on its `metrics_port`.
    pub metrics: bool,
}

/// A few random bits for names and secrets (no rand dependency in the tests).
fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos() as u64).unwrap_or(0)
}

/// A loopback port for a node, from below the kernel's ephemeral range (see
/// [`ringkv_node::dev::free_loopback_port`]).
pub fn free_port() -> u16 {
    ringkv_node::dev::free_loopback_port().expect("a free loopback port")
}

impl Cluster {
    /// `n` nodes (not started), N = `replicas`, R and W as given.
    pub fn new(n: usize, replicas: u32, r: u32, w: u32, extra: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cluster {
            dir,
            nodes: Vec::new(),
            secret: format!("test-secret-{}-{:x}", std::process::id(), rand_suffix()),
            replicas,
            quorum: (r, w),
            extra: extra.to_string(),
            partitions: 16,
            timeouts_ms: (3000, 500),
            tls: false,
            node_args: Vec::new(),
            metrics: false,
        };
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        for (i, port) in ports.iter().enumerate() {
            let id = format!("n{}", i + 1);
            let node = Node {
                config: c.dir.path().join(format!("{id}.toml")),
                data: c.dir.path().join("data").join(&id),
                log: c.dir.path().join(format!("{id}.log")),
                id,
                port: *port,
                child: None,
                metrics_port: free_port(),
            };
            c.nodes.push(node);
        }
        for i in 0..n {
            c.write_config(i, &c.secret.clone());
        }
        c
    }

    /// Change Q and the coordinator's timeouts (before the nodes first start).
    pub fn set_partitions(&mut self, q: u32, timeouts_ms: (u64, u64)) {
        self.partitions = q;
        self.timeouts_ms = timeouts_ms;
        for i in 0..self.nodes.len() {
            self.write_config(i, &self.secret.clone());
        }
    }

    /// Switch to mutual TLS (before the nodes first start): a CA and a certificate per node
    /// in `dir/certs`, and configs with `[tls]` and no secret.
    pub fn use_tls(&mut self) {
        let certs = self.certs();
        ringkv_transport::pki::create_ca(&certs).unwrap();
        for n in &self.nodes {
            ringkv_transport::pki::create_node(&certs, &n.id).unwrap();
        }
        self.tls = true;
        for i in 0..self.nodes.len() {
            self.write_config(i, &self.secret.clone());
        }
    }

    /// Give every node a metrics listener (before the nodes start).
    pub fn enable_metrics(&mut self) {
        self.metrics = true;
        for i in 0..self.nodes.len() {
            self.write_config(i, &self.secret.clone());
        }
    }

    /// `GET path` on node `i`'s metrics listener: the status code, the Content-Type and the body.
    pub fn http_get(&self, i: usize, path: &str) -> (u16, String, String) {
        http_get(self.nodes[i].metrics_port, path)
    }

    pub fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// A client file for a new client certificate `name` with `role`, reaching node 0.
    pub fn client_file(&self, name: &str, role: ringkv::access::Role) -> PathBuf {
        ringkv_transport::pki::create_client(&self.certs(), name, role).unwrap();
        self.client_file_for(name, &self.certs().join("ca.crt"))
    }

    /// A client file using `certs/NAME.crt` and `.key`, trusting the CA at `ca`.
    pub fn client_file_for(&self, name: &str, ca: &Path) -> PathBuf {
        let path = self.dir.path().join(format!("client-{name}.toml"));
        let certs = self.certs();
        let text = format!(
            "[client]\nnodes = [\"127.0.0.1:{}\"]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            self.nodes[0].port,
            ca.display(),
            certs.join(format!("{name}.crt")).display(),
            certs.join(format!("{name}.key")).display()
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn write_config(&self, i: usize, secret: &str) {
        let seeds: Vec<String> = self.nodes.iter().take(2).map(|n| format!("\"127.0.0.1:{}\"", n.port)).collect();
        let n = &self.nodes[i];
        let text = format!(
            r#"[node]
id = "{id}"
listen = "127.0.0.1:{port}"
data_dir = "{data}"
seeds = [{seeds}]

[cluster]
name = "test"
{secret_line}partitions = {partitions}
replicas = {replicas}
read_quorum = {r}
write_quorum = {w}

[gossip]
interval_ms = 100

[failure_detector]
probe_interval_ms = 100
probe_interval_max_ms = 500

[coordinator]
request_timeout_ms = {request_ms}
replica_timeout_ms = {replica_ms}

{extra}
{metrics}
{tls}"#,
            metrics = if self.metrics {
                format!("[metrics]\nlisten = \"127.0.0.1:{}\"\n", n.metrics_port)
            } else {
                String::new()
            },
            secret_line = if self.tls { String::new() } else { format!("secret = \"{secret}\"\n") },
            tls = if self.tls {
                let c = self.certs();
                format!(
                    "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                    c.join("ca.crt").display(),
                    c.join(format!("{}.crt", n.id)).display(),
                    c.join(format!("{}.key", n.id)).display()
                )
            } else {
                String::new()
            },
            id = n.id,
            port = n.port,
            data = n.data.display(),
            seeds = seeds.join(", "),
            replicas = self.replicas,
            r = self.quorum.0,
            w = self.quorum.1,
            extra = self.extra,
            partitions = self.partitions,
            request_ms = self.timeouts_ms.0,
            replica_ms = self.timeouts_ms.1,
        );
        std::fs::write(&n.config, text).unwrap();
    }

    pub fn start(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&n.log).unwrap();
        let child = Command::new(NODE)
            .arg("--config")
            .arg(&n.config)
            .args(&self.node_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        n.child = Some(child);
    }

    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.start(i);
        }
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, i: usize, sig: i32) {
        if let Some(c) = &self.nodes[i].child {
            unsafe {
                libc::kill(c.id() as libc::pid_t, sig);
            }
        }
    }

    pub fn cli(&self, i: usize, args: &[&str]) -> Output {
        self.cli_with(&self.nodes[i].config, args, None)
    }

    pub fn cli_with(&self, config: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = Command::new(&*CLI);
        cmd.arg("--config").arg(config).arg("--json").args(args);
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(bytes) = stdin {
            use std::io::Write;
            let mut s = child.stdin.take().unwrap();
            let _ = s.write_all(bytes);
        }
        child.wait_with_output().unwrap()
    }

    pub fn json(&self, i: usize, args: &[&str]) -> (i32, serde_json::Value) {
        let out = self.cli(i, args);
        let doc = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        (out.status.code().unwrap_or(-1), doc)
    }

    /// Sorted string values of a key through node `i`; None when the get failed.
    pub fn values(&self, i: usize, key: &str) -> Option<Vec<String>> {
        let (code, doc) = self.json(i, &["get", key]);
        match code {
            0 => {
                let mut v: Vec<String> =
                    doc["values"].as_array()?.iter().map(|v| v.as_str().unwrap_or("?").to_string()).collect();
                v.sort();
                Some(v)
            }
            1 => Some(Vec::new()),
            _ => None,
        }
    }

    /// Wait until every listed node sees all of them up with one ring epoch.
    pub fn wait_settled(&self, which: &[usize], timeout: Duration) {
        let ids: Vec<String> = which.iter().map(|&i| self.nodes[i].id.clone()).collect();
        let ok = wait_until(timeout, || {
            let mut epochs = Vec::new();
            for &i in which {
                let (code, st) = self.json(i, &["status"]);
                if code != 0 {
                    return false;
                }
                let up: Vec<&str> = st["members"]
                    .as_array()
                    .map(|ms| ms.iter().filter(|m| m["state"] == "up").filter_map(|m| m["id"].as_str()).collect())
                    .unwrap_or_default();
                if ids.iter().any(|id| !up.contains(&id.as_str())) {
                    return false;
                }
                epochs.push(st["ring_epoch"].clone());
            }
            epochs.windows(2).all(|w| w[0] == w[1])
        });
        assert!(ok, "cluster did not settle:\n{}", self.logs());
    }

    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let t = std::fs::read_to_string(&n.log).unwrap_or_default();
                let tail: Vec<&str> = t.lines().rev().take(15).collect();
                format!("--- {} ---\n{}", n.id, tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.signal(i, libc::SIGCONT);
            self.kill(i);
        }
    }
}

/// The processes (other than this one) whose command line mentions `needle`, e.g. a temp
/// dir's path: what `pgrep -f` finds, read from /proc.
pub fn pids_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).replace('\0', " ").contains(needle)
        })
        .collect()
}

/// A standard output whose reader is already gone: the first write gets a broken pipe, as
/// in `... | head` once head has exited.
pub fn closed_stdout() -> Stdio {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0, "pipe2");
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    Stdio::from(write)
}

/// Run `cmd` (stdout and stderr piped unless set otherwise) to its end, killing it after
/// `timeout`: its status code (None when killed or signalled), stdout and stderr.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> (Option<i32>, String, String) {
    run_bounded_with(cmd.stdout(Stdio::piped()), timeout)
}

/// [`run_bounded`] with the stdout `cmd` has (stderr piped).
pub fn run_bounded_with(cmd: &mut Command, timeout: Duration) -> (Option<i32>, String, String) {
    let mut child = cmd.stdin(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    // Readers on threads, so a full pipe never stalls the child.
    fn read(r: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    }
    let (out, err) = (read(child.stdout.take()), read(child.stderr.take()));
    let exited = wait_until(timeout, || matches!(child.try_wait(), Ok(Some(_))));
    if !exited {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    (if exited { status.code() } else { None }, out.join().unwrap(), err.join().unwrap())
}

/// A plain HTTP/1.1 `GET path` to 127.0.0.1:`port`: the status code, the Content-Type and
/// the body (the server closes the connection after the answer).
pub fn http_get(port: u16, path: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("the metrics listener accepts");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("an answer");
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let content_type = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-type")))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    (status, content_type, body.to_string())
}

/// Poll `f` every 100 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

impl Cluster {
    /// Each partition's replicas (as node `via` sees the ring), among `live`, list it with
    /// one Merkle root. Returns why not, when not.
    pub fn converged(&self, live: &[usize]) -> Result<(), String> {
        let (code, ring) = self.json(live[0], &["ring"]);
        if code != 0 {
            return Err("no ring".into());
        }
        let mut roots: std::collections::BTreeMap<u64, std::collections::BTreeMap<String, String>> = Default::default();
        for &i in live {
            let (code, doc) = self.json(i, &["admin", "partitions"]);
            if code != 0 {
                return Err(format!("{}: admin partitions failed", self.nodes[i].id));
            }
            for p in doc["partitions"].as_array().into_iter().flatten() {
                let part = p["partition"].as_u64().unwrap_or(u64::MAX);
                let root = p["merkle_root"].as_str().unwrap_or_default().to_string();
                roots.entry(part).or_default().insert(self.nodes[i].id.clone(), root);
            }
        }
        let live_ids: Vec<String> = live.iter().map(|&i| self.nodes[i].id.clone()).collect();
        for p in ring["partitions"].as_array().into_iter().flatten() {
            let part = p["partition"].as_u64().unwrap_or(u64::MAX);
            let want: Vec<String> = p["preference_list"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str().map(String::from))
                .filter(|x| live_ids.contains(x))
                .collect();
            let have = roots.get(&part).cloned().unwrap_or_default();
            let rs: BTreeSet<Option<&String>> = want.iter().map(|n| have.get(n)).collect();
            if rs.len() != 1 || rs.contains(&None) {
                return Err(format!("partition {part}: roots differ across {want:?}"));
            }
        }
        Ok(())
    }

    pub fn status_pending(&self, i: usize) -> (u64, u64) {
        let (_, st) = self.json(i, &["status"]);
        (st["pending"]["hints"].as_u64().unwrap_or(u64::MAX), st["pending"]["transfers"].as_u64().unwrap_or(u64::MAX))
    }

    /// Wait for `cond`, failing with the logs and the last reason.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut cond: impl FnMut() -> Result<(), String>) -> Duration {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < timeout {
            match cond() {
                Ok(()) => return start.elapsed(),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("{what} not reached in {timeout:?}: {last}\n{}", self.logs());
    }

    /// Write keys `prefix0..prefixN` through rotating nodes in `via`; returns the acknowledged ones.
    /// Values are `v-{prefix}{k}{tag}`; failures are printed with their error.
    pub fn write_keys(&self, via: &[usize], prefix: &str, n: usize, tag: &str) -> Vec<(String, String)> {
        let mut acked = Vec::new();
        for k in 0..n {
            let (key, value) = (format!("{prefix}{k}"), format!("v-{prefix}{k}{tag}"));
            let i = via[k % via.len()];
            let out = self.cli(i, &["put", &key, &value]);
            if out.status.code() == Some(0) {
                acked.push((key, value));
            } else {
                eprintln!(
                    "put {key} via {} failed ({:?}): {}",
                    self.nodes[i].id,
                    out.status.code(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        acked
    }
}

use std::collections::BTreeSet;
