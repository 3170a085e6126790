//! Values near the 1 MiB limit on real node processes: partitions of tens of MiB must still
//! move whole when a node joins, refill a wiped node, and move away when a node leaves
//! (handoff batches and anti-entropy pages are bounded in bytes; one large object travels
//! alone). Every key reads back after each step; the convergence times are printed.
//!
//! `cargo test` runs a small version (a debug build moves large values slowly);
//! `RINGKV_LARGE_KEYS=240 cargo test --release -p ringkv-node --test large -- --nocapture`
//! runs partitions of about 26 MiB.

mod common;

use std::time::{Duration, Instant};

use common::Cluster;

const KEYS_DEFAULT: usize = 24;
const VALUE_BYTES: usize = 900 * 1024;

fn value(key: &str) -> String {
    let unit = format!("{key}:");
    unit.repeat(VALUE_BYTES / unit.len() + 1)[..VALUE_BYTES].to_string()
}

fn all_read_back(c: &Cluster, via: usize, keys: &[String]) {
    for k in keys {
        let (code, doc) = c.json(via, &["get", k]);
        assert_eq!(code, 0, "{k}");
        let got: Vec<&str> = doc["values"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
        assert_eq!(got, vec![value(k).as_str()], "{k}");
    }
}

fn settled_and_converged(c: &Cluster, live: &[usize]) -> Result<(), String> {
    for &i in live {
        let (hints, transfers) = c.status_pending(i);
        if hints != 0 || transfers != 0 {
            return Err(format!("{} pending hints {hints} transfers {transfers}", c.nodes[i].id));
        }
    }
    c.converged(live)
}

#[test]
fn large_values_join_refill_and_leave() {
    let extra = "[anti_entropy]\ninterval_ms = 500\nmax_inflight = 2\n[handoff]\ninterval_ms = 300\nmax_inflight = 4\n";
    let mut c = Cluster::new(5, 3, 2, 2, extra);
    c.set_partitions(8, (20_000, 5000));
    for i in 0..4 {
        c.start(i);
    }
    c.wait_settled(&[0, 1, 2, 3], Duration::from_secs(30));
    let n = std::env::var("RINGKV_LARGE_KEYS").ok().and_then(|v| v.parse().ok()).unwrap_or(KEYS_DEFAULT);
    let keys: Vec<String> = (0..n).map(|i| format!("big{i}")).collect();
    let started = Instant::now();
    for (n, k) in keys.iter().enumerate() {
        let out = c.cli_with(&c.nodes[n % 4].config, &["put", k, "-"], Some(value(k).as_bytes()));
        assert_eq!(out.status.code(), Some(0), "{k}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mib = (n * VALUE_BYTES) as f64 / (1 << 20) as f64;
    println!(
        "wrote {n} values of {VALUE_BYTES} bytes ({mib:.0} MiB, ~{:.0} MiB per partition) in {:?}",
        mib / 8.0,
        started.elapsed()
    );

    c.start(4);
    c.wait_settled(&[0, 1, 2, 3, 4], Duration::from_secs(30));
    let took = c.wait_for("join", Duration::from_secs(300), || settled_and_converged(&c, &[0, 1, 2, 3, 4]));
    println!("join: converged {took:?} after n5 was up");
    all_read_back(&c, 4, &keys);

    c.kill(1);
    std::fs::remove_dir_all(&c.nodes[1].data).unwrap();
    c.start(1);
    c.wait_settled(&[0, 1, 2, 3, 4], Duration::from_secs(30));
    let took =
        c.wait_for("wiped n2 refilled", Duration::from_secs(300), || settled_and_converged(&c, &[0, 1, 2, 3, 4]));
    println!("wipe: n2 refilled {took:?} after its restart");
    let (_, parts) = c.json(1, &["admin", "partitions"]);
    let held: u64 = parts["partitions"].as_array().unwrap().iter().map(|p| p["keys"].as_u64().unwrap()).sum();
    assert!(held > 0);

    let (code, _) = c.json(0, &["admin", "leave", "n5"]);
    assert_eq!(code, 0);
    let took = c.wait_for("leave", Duration::from_secs(300), || {
        let (_, st) = c.json(0, &["status"]);
        if st["members"].as_array().unwrap().iter().any(|m| m["id"] == "n5") {
            return Err("n5 still listed".into());
        }
        settled_and_converged(&c, &[0, 1, 2, 3])
    });
    println!("leave: converged {took:?} after the command");
    c.kill(4);
    all_read_back(&c, 0, &keys);
}
