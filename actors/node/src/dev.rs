//! `ringkv-node dev`: the one-command local cluster. Writes one config per node into a
//! directory (with a cluster CA, a certificate per node and an admin client file, unless
//! asked for secret-only mode), starts one node process per config on loopback, prints how
//! to use the CLI against them, and stops every node it started on Ctrl-C (or SIGTERM).

use std::io::Write;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A free loopback UDP port (QUIC listens on UDP).
fn free_port() -> std::io::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
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

/// The text of node `i`'s config.
pub fn config_text(i: u32, nodes: u32, ports: &[u16], dir: &Path, auth: &DevAuth, durability: &str) -> String {
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
{tls_section}"#,
        port = ports[(i - 1) as usize],
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
            eprintln!("{name} did not stop in 5 s; killing it");
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

/// Run the dev cluster; returns the exit status.
pub fn run(nodes: u32, dir: Option<PathBuf>, durability: &str, secret_only: bool) -> i32 {
    let dir = dir.unwrap_or_else(fresh_dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("ringkv-node dev: cannot create {}: {e}", dir.display());
        return 5;
    }
    let dir = dir.canonicalize().unwrap_or(dir);
    let Ok(exe) = std::env::current_exe() else {
        eprintln!("ringkv-node dev: cannot find this program's path");
        return 5;
    };
    let mut ports = Vec::new();
    for _ in 0..nodes {
        match free_port() {
            Ok(p) if !ports.contains(&p) => ports.push(p),
            _ => {
                eprintln!("ringkv-node dev: no free loopback port");
                return 5;
            }
        }
    }
    let auth = if secret_only {
        DevAuth::Secret(format!("dev-{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>()))
    } else {
        let admin = dir.join("admin.toml");
        let made = make_certs(&dir, nodes)
            .and_then(|()| std::fs::write(&admin, admin_file_text(&ports)).map_err(|e| e.to_string()));
        if let Err(e) = made {
            eprintln!("ringkv-node dev: cannot make the cluster's certificates in {}: {e}", dir.display());
            return 5;
        }
        DevAuth::Tls
    };
    let mut children: Vec<(String, Child)> = Vec::new();
    for i in 1..=nodes {
        let cfg = dir.join(format!("n{i}.toml"));
        let log = dir.join(format!("n{i}.log"));
        let written = std::fs::File::create(&cfg)
            .and_then(|mut f| f.write_all(config_text(i, nodes, &ports, &dir, &auth, durability).as_bytes()));
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log);
        let (Ok(()), Ok(log_file)) = (written, log_file) else {
            eprintln!("ringkv-node dev: cannot write into {}", dir.display());
            stop(&mut children);
            return 5;
        };
        let err_file = log_file.try_clone();
        let mut cmd = Command::new(&exe);
        cmd.arg("--config").arg(&cfg).stdin(Stdio::null()).stdout(log_file);
        if let Ok(e) = err_file {
            cmd.stderr(e);
        }
        match cmd.spawn() {
            Ok(c) => children.push((format!("n{i}"), c)),
            Err(e) => {
                eprintln!("ringkv-node dev: cannot start node n{i}: {e}");
                stop(&mut children);
                return 5;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let cli = exe.with_file_name("ringkv");
    if !cli.exists() {
        println!("(the ringkv CLI is not built yet next to this program: `cargo build --release` builds both)");
    }
    let (c1, cn) = match auth {
        DevAuth::Tls => (dir.join("admin.toml"), dir.join("admin.toml")),
        DevAuth::Secret(_) => (dir.join("n1.toml"), dir.join(format!("n{nodes}.toml"))),
    };
    let mode = match auth {
        DevAuth::Tls => format!("mutual TLS, certificates in {}", dir.join(CERTS).display()),
        DevAuth::Secret(_) => "secret-only: the secret in the configs is the whole trust boundary".to_string(),
    };
    println!("ringkv dev cluster: {nodes} node(s) on 127.0.0.1 ports {ports:?} ({mode})");
    println!("configs, data and logs in {}", dir.display());
    println!();
    println!("try, in another terminal:");
    println!("  {} --config {} status", cli.display(), c1.display());
    println!("  {} --config {} put hello world", cli.display(), c1.display());
    println!("  {} --config {} get hello", cli.display(), cn.display());
    println!();
    println!("Ctrl-C stops every node.");

    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ringkv-node dev: {e}");
            stop(&mut children);
            return 5;
        }
    };
    let status = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return 0,
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => return 0,
                _ = tick.tick() => {
                    for (name, c) in children.iter_mut() {
                        if let Ok(Some(st)) = c.try_wait() {
                            eprintln!("node {name} exited ({st}); see {}", dir.join(format!("{name}.log")).display());
                            return 5;
                        }
                    }
                }
            }
        }
    });
    println!("stopping {} node(s)", children.len());
    stop(&mut children);
    status
}
