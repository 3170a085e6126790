//! `ringkv-node dev`: the one-command local cluster. Writes one config per node into a
//! directory (with a cluster CA, a certificate per node and an admin client file, unless
//! asked for secret-only mode), starts one node process per config on loopback, prints how
//! to use the CLI against them, and stops every node it started on Ctrl-C (or SIGTERM).
//! Its output is for a person: when its reader goes away (`ringkv-node dev | head`), it
//! stops printing and the cluster runs on until Ctrl-C as usual.

use std::io::Write;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::args::LogFormat;

/// What dev says to its user, on standard output: quiet once the reader is gone, and only
/// reported (once per message) if standard output fails otherwise.
fn say(text: &str) {
    if let Err(e) = ringkv_console::write_stdout(text.as_bytes()) {
        fail(&format!("cannot write to standard output: {e}"));
    }
}

/// One line on standard error.
fn fail(message: &str) {
    ringkv_console::print_error("ringkv-node dev", message);
}

/// The lowest port [`free_loopback_port`] hands out.
const LOOPBACK_PORT_MIN: u32 = 10_000;

/// The first port of the kernel's ephemeral range (what a bind to port 0 hands out).
pub fn ephemeral_port_min() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|w| w.parse().ok()))
        .unwrap_or(32_768)
}

/// How many ports this process has handed out; the next pick starts after them.
static LOOPBACK_PORTS_TAKEN: AtomicU32 = AtomicU32::new(0);

/// Where this process's picks start, chosen at random once.
static LOOPBACK_PORT_OFFSET: OnceLock<u32> = OnceLock::new();

/// A loopback port that is free for both UDP (a node's QUIC listener) and TCP (its metrics
/// listener), from below the kernel's ephemeral range, and never the same one twice in this
/// process. A port found by binding to port 0 and letting go is an ephemeral one: until the
/// node binds it, the kernel may hand it to any other socket bound to port 0 (a client's,
/// say), and the node then cannot listen. Below the ephemeral range only an explicit bind
/// takes a port.
pub fn free_loopback_port() -> std::io::Result<u16> {
    let high = ephemeral_port_min().min(u32::from(u16::MAX));
    let Some(span) = high.checked_sub(LOOPBACK_PORT_MIN).filter(|s| *s >= 1000) else {
        // No room below the ephemeral range: an ephemeral port it is.
        return Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port());
    };
    let offset = *LOOPBACK_PORT_OFFSET.get_or_init(|| rand::random::<u32>() % span);
    for _ in 0..span {
        let taken = LOOPBACK_PORTS_TAKEN.fetch_add(1, Ordering::Relaxed);
        let candidate = LOOPBACK_PORT_MIN + offset.wrapping_add(taken) % span;
        let Ok(port) = u16::try_from(candidate) else { continue };
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "no free loopback port"))
}

/// How a dev cluster authenticates.
pub enum DevAuth {
    /// Mutual TLS with the certificates in `DIR/certs`.
    Tls,
    /// Secret-only mode with this secret.
    Secret(String),
}

/// Where a dev cluster's certificates live, relative to its directory.
const CERTS: &str = "certs";

/// The text of node `i`'s config: QUIC on `ports[i - 1]`, metrics on `metrics_ports[i - 1]`.
pub fn config_text(
    i: u32,
    nodes: u32,
    ports: &[u16],
    metrics_ports: &[u16],
    dir: &Path,
    auth: &DevAuth,
    durability: &str,
) -> String {
    let auth_text = match auth {
        DevAuth::Tls => {
            format!("\n[tls]\nca = \"{CERTS}/ca.crt\"\ncert = \"{CERTS}/n{i}.crt\"\nkey = \"{CERTS}/n{i}.key\"\n")
        }
        DevAuth::Secret(s) => format!("secret = \"{s}\"\n"),
    };
    let (secret_line, tls_section) = match auth {
        DevAuth::Tls => (String::new(), auth_text),
        DevAuth::Secret(_) => (auth_text, String::new()),
    };
    let n = nodes.min(3);
    let quorum = n / 2 + 1;
    let seeds: Vec<String> = ports.iter().take(2).map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    format!(
        r#"# Node n{i} of a local ringkv dev cluster, written by `ringkv-node dev`.
[node]
id = "n{i}"
listen = "127.0.0.1:{port}"
data_dir = "{data}"
seeds = [{seeds}]

[cluster]
name = "dev"
{secret_line}partitions = 64
replicas = {n}
read_quorum = {quorum}
write_quorum = {quorum}

[storage]
durability = "{durability}"

[gossip]
interval_ms = 500

[handoff]
interval_ms = 2000
max_inflight = 2

[anti_entropy]
interval_ms = 10000
max_inflight = 1

[metrics]
listen = "127.0.0.1:{metrics_port}"
{tls_section}"#,
        port = ports[(i - 1) as usize],
        metrics_port = metrics_ports[(i - 1) as usize],
        data = dir.join("data").join(format!("n{i}")).display(),
        seeds = seeds.join(", "),
    )
}

fn fresh_dir() -> PathBuf {
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    std::env::temp_dir().join(format!("ringkv-dev-{}-{stamp}", std::process::id()))
}

fn stop(children: &mut [(String, Child)]) {
    for (_, c) in children.iter() {
        // SIGTERM lets each node finish in-flight commits.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    for (name, c) in children.iter_mut() {
        let mut waited = 0;
        while waited < 100 {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            waited += 1;
        }
        if waited == 100 {
            fail(&format!("node {name} did not stop in 5 s; killing it"));
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The admin client file of a dev cluster with certificates.
fn admin_file_text(ports: &[u16]) -> String {
    let nodes: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    format!(
        "# The dev cluster's administrator, written by `ringkv-node dev`: ringkv --config THIS_FILE ...\n\
         [client]\nnodes = [{}]\ncluster = \"dev\"\nca = \"{CERTS}/ca.crt\"\ncert = \"{CERTS}/admin.crt\"\nkey = \"{CERTS}/admin.key\"\n",
        nodes.join(", ")
    )
}

/// The dev cluster's CA, node certificates and admin certificate, made unless already there
/// (a dev directory given again keeps its CA).
fn make_certs(dir: &Path, nodes: u32) -> Result<(), String> {
    use ringkv_transport::pki;
    let certs = dir.join(CERTS);
    if !certs.join(pki::CA_CERT_FILE).exists() {
        pki::create_ca(&certs)?;
    }
    for i in 1..=nodes {
        if !certs.join(format!("n{i}.crt")).exists() {
            pki::create_node(&certs, &format!("n{i}"))?;
        }
    }
    if !certs.join("admin.crt").exists() {
        pki::create_client(&certs, "admin", ringkv::access::Role::Admin)?;
    }
    Ok(())
}

/// SIGINT (Ctrl-C) and SIGTERM, each registered once (a signal between two waits is not
/// missed).
struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl StopSignals {
    /// Listen for both, from now on, on `rt`.
    fn listen(rt: &tokio::runtime::Runtime) -> std::io::Result<StopSignals> {
        let _in_rt = rt.enter();
        Ok(StopSignals { interrupt: signal(SignalKind::interrupt())?, terminate: signal(SignalKind::terminate())? })
    }

    /// Until either has come.
    async fn received(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// Run the dev cluster, each node logging in `log_format`; returns the exit status.
pub fn run(nodes: u32, dir: Option<PathBuf>, durability: &str, secret_only: bool, log_format: LogFormat) -> i32 {
    let dir = dir.unwrap_or_else(fresh_dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        fail(&format!("cannot create {}: {e}; give another --dir", dir.display()));
        return 5;
    }
    let dir = dir.canonicalize().unwrap_or(dir);
    let Ok(exe) = std::env::current_exe() else {
        fail("cannot find this program's path");
        return 5;
    };
    let picked: std::io::Result<Vec<u16>> = (0..nodes.saturating_mul(2)).map(|_| free_loopback_port()).collect();
    let Ok(picked) = picked else {
        fail("no free loopback port");
        return 5;
    };
    let (ports, metrics_ports) = picked.split_at(picked.len() / 2);
    let auth = if secret_only {
        DevAuth::Secret(format!("dev-{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>()))
    } else {
        let admin = dir.join("admin.toml");
        let made = make_certs(&dir, nodes)
            .and_then(|()| std::fs::write(&admin, admin_file_text(ports)).map_err(|e| e.to_string()));
        if let Err(e) = made {
            fail(&format!("cannot make the cluster's certificates in {}: {e}", dir.display()));
            return 5;
        }
        DevAuth::Tls
    };
    // Ctrl-C and SIGTERM are listened for before the first node starts: a stop at any point
    // stops every node started so far.
    let listening = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .and_then(|rt| StopSignals::listen(&rt).map(|signals| (rt, signals)));
    let (rt, mut signals) = match listening {
        Ok(both) => both,
        Err(e) => {
            fail(&format!("cannot listen for Ctrl-C: {e}"));
            return 5;
        }
    };
    let mut children: Vec<(String, Child)> = Vec::new();
    for i in 1..=nodes {
        let cfg = dir.join(format!("n{i}.toml"));
        let log = dir.join(format!("n{i}.log"));
        let written = std::fs::File::create(&cfg).and_then(|mut f| {
            f.write_all(config_text(i, nodes, ports, metrics_ports, &dir, &auth, durability).as_bytes())
        });
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log);
        let (Ok(()), Ok(log_file)) = (written, log_file) else {
            fail(&format!("cannot write into {}; give another --dir", dir.display()));
            stop(&mut children);
            return 5;
        };
        let err_file = log_file.try_clone();
        let mut cmd = Command::new(&exe);
        cmd.arg("--config").arg(&cfg).arg("--log-format").arg(log_format.as_arg());
        cmd.stdin(Stdio::null()).stdout(log_file);
        if let Ok(e) = err_file {
            cmd.stderr(e);
        }
        match cmd.spawn() {
            Ok(c) => children.push((format!("n{i}"), c)),
            Err(e) => {
                fail(&format!("cannot start node n{i}: {e}"));
                stop(&mut children);
                return 5;
            }
        }
        let stopped =
            rt.block_on(async { tokio::time::timeout(Duration::from_millis(200), signals.received()).await.is_ok() });
        if stopped {
            say(&format!("stopping {} node(s)\n", children.len()));
            stop(&mut children);
            return 0;
        }
    }
    let cli = exe.with_file_name("ringkv");
    if !cli.exists() {
        say("(the ringkv CLI is not built yet next to this program: `cargo build --release` builds both)\n");
    }
    let (c1, cn) = match auth {
        DevAuth::Tls => (dir.join("admin.toml"), dir.join("admin.toml")),
        DevAuth::Secret(_) => (dir.join("n1.toml"), dir.join(format!("n{nodes}.toml"))),
    };
    let mode = match auth {
        DevAuth::Tls => format!("mutual TLS, certificates in {}", dir.join(CERTS).display()),
        DevAuth::Secret(_) => "secret-only: the secret in the configs is the whole trust boundary".to_string(),
    };
    let pages: String = metrics_ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("\x20 n{}: http://127.0.0.1:{p}/ (metrics: http://127.0.0.1:{p}/metrics)\n", i + 1))
        .collect();
    say(&format!(
        "ringkv dev cluster: {nodes} node(s) on 127.0.0.1 ports {ports:?} ({mode})\n\
         configs, data and logs in {}\n\n\
         the cluster page and Prometheus metrics of each node:\n{pages}\n\
         try, in another terminal:\n\
         \x20 {cli} --config {c1} status\n\
         \x20 {cli} --config {c1} put hello world\n\
         \x20 {cli} --config {cn} get hello\n\n\
         Ctrl-C stops every node.\n",
        dir.display(),
        cli = cli.display(),
        c1 = c1.display(),
        cn = cn.display(),
    ));

    let status = rt.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = signals.received() => return 0,
                _ = tick.tick() => {
                    for (name, c) in children.iter_mut() {
                        if let Ok(Some(st)) = c.try_wait() {
                            fail(&format!("node {name} exited ({st}); see {}", dir.join(format!("{name}.log")).display()));
                            return 5;
                        }
                    }
                }
            }
        }
    });
    say(&format!("stopping {} node(s)\n", children.len()));
    stop(&mut children);
    status
}
