//! The paper's failure handling on real node processes: sloppy quorum and hinted handoff,
//! anti-entropy refilling a wiped node, join and leave moving partitions, a network
//! partition healed, a paused node. Each scenario checks data, and prints how long
//! convergence took.

mod common;

use std::time::Duration;

use common::{wait_until, Cluster};

const AE_PAUSED: &str = "[anti_entropy]\ninterval_ms = 500\nmax_inflight = 0\n[handoff]\ninterval_ms = 300\n";
const AE_ON: &str = "[anti_entropy]\ninterval_ms = 500\nmax_inflight = 2\n[handoff]\ninterval_ms = 300\n";

fn all_read_back(c: &Cluster, via: usize, acked: &[(String, String)]) -> Result<(), String> {
    for (k, v) in acked {
        match c.values(via, k) {
            Some(vals) if vals.contains(v) => {}
            other => return Err(format!("{k}: expected {v}, read {other:?}")),
        }
    }
    Ok(())
}

#[test]
fn killed_node_gets_its_writes_back_through_hinted_handoff() {
    let mut c = Cluster::new(5, 3, 2, 3, AE_PAUSED);
    c.start_all();
    c.wait_settled(&[0, 1, 2, 3, 4], Duration::from_secs(30));
    let before = c.write_keys(&[0, 1, 2, 3], "pre", 30, "");
    assert_eq!(before.len(), 30);
    c.kill(4);
    // W=3 with a primary down: fallbacks take hinted replicas and the writes succeed.
    let during = c.write_keys(&[0, 1, 2, 3], "during", 40, "");
    assert_eq!(during.len(), 40, "every write succeeded through fallbacks\n{}", c.logs());
    let hinted: u64 = (0..4)
        .map(|i| {
            let (_, doc) = c.json(i, &["admin", "hints"]);
            doc["hints"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|h| h["for"] == "n5")
                .map(|h| h["count"].as_u64().unwrap())
                .sum::<u64>()
        })
        .sum();
    assert!(hinted > 0, "hints for n5 are listed");
    c.start(4);
    let took = c.wait_for("hints drained and replicas equal", Duration::from_secs(60), || {
        for i in 0..5 {
            let (hints, _) = c.status_pending(i);
            if hints != 0 {
                return Err(format!("{} holds {hints} hints", c.nodes[i].id));
            }
        }
        c.converged(&[0, 1, 2, 3, 4])
    });
    println!("hinted handoff: converged {took:?} after the restart");
    all_read_back(&c, 4, &before).unwrap();
    all_read_back(&c, 4, &during).unwrap();
}

#[test]
fn wiped_node_is_refilled_by_anti_entropy_once_allowed() {
    let mut c = Cluster::new(4, 3, 2, 2, AE_PAUSED);
    c.start_all();
    c.wait_settled(&[0, 1, 2, 3], Duration::from_secs(30));
    let acked = c.write_keys(&[0, 1, 2, 3], "k", 60, "");
    assert_eq!(acked.len(), 60);
    c.kill(3);
    std::fs::remove_dir_all(&c.nodes[3].data).unwrap();
    c.start(3);
    c.wait_settled(&[0, 1, 2, 3], Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    assert!(c.converged(&[0, 1, 2, 3]).is_err(), "with anti-entropy paused the wiped replica stays empty");
    for i in 0..4 {
        let (code, doc) = c.json(i, &["admin", "limits", "set", "anti_entropy.max_inflight=2"]);
        assert_eq!((code, doc["anti_entropy.max_inflight"].as_i64()), (0, Some(2)));
    }
    let took = c.wait_for("anti-entropy convergence", Duration::from_secs(60), || c.converged(&[0, 1, 2, 3]));
    println!("anti-entropy: converged {took:?} after the limit was raised");
    // Read with R=1 from the wiped node's point of view: every key is there.
    for (k, v) in &acked {
        let (code, doc) = c.json(3, &["get", k, "--r", "3"]);
        assert_eq!(code, 0, "{k}");
        assert!(doc["values"].as_array().unwrap().iter().any(|x| x == v.as_str()));
    }
}

#[test]
fn a_node_joins_a_loaded_cluster_and_later_leaves() {
    let mut c = Cluster::new(5, 3, 2, 2, AE_ON);
    for i in 0..4 {
        c.start(i);
    }
    c.wait_settled(&[0, 1, 2, 3], Duration::from_secs(30));
    let acked = c.write_keys(&[0, 1, 2, 3], "j", 80, "");
    assert_eq!(acked.len(), 80);
    c.start(4);
    c.wait_settled(&[0, 1, 2, 3, 4], Duration::from_secs(30));
    let took = c.wait_for("join: transfers done and replicas equal", Duration::from_secs(90), || {
        for i in 0..5 {
            let (hints, transfers) = c.status_pending(i);
            if transfers != 0 || hints != 0 {
                return Err(format!("{} pending hints {hints} transfers {transfers}", c.nodes[i].id));
            }
        }
        c.converged(&[0, 1, 2, 3, 4])
    });
    println!("join: converged {took:?} after n5 was up");
    let (_, st) = c.json(4, &["admin", "partitions"]);
    assert!(st["partitions"].as_array().unwrap().iter().any(|p| p["keys"].as_u64().unwrap() > 0), "n5 received data");
    all_read_back(&c, 4, &acked).unwrap();

    // n5 leaves: it hands everything away, then is recorded as left.
    let (code, _) = c.json(0, &["admin", "leave", "n5"]);
    assert_eq!(code, 0);
    let took = c.wait_for("leave: n5 left and the rest converged", Duration::from_secs(90), || {
        let (_, st) = c.json(0, &["status"]);
        let n5 = st["members"].as_array().unwrap().iter().find(|m| m["id"] == "n5").cloned();
        if n5.is_some() {
            return Err(format!("n5 still listed: {n5:?}"));
        }
        c.converged(&[0, 1, 2, 3])
    });
    println!("leave: converged {took:?} after the command");
    c.kill(4);
    all_read_back(&c, 0, &acked).unwrap();
}

#[test]
fn partitioned_cluster_keeps_every_acknowledged_write_after_healing() {
    let mut c = Cluster::new(5, 3, 2, 2, &format!("{AE_ON}[testing]\nfault_injection = true\n"));
    c.start_all();
    c.wait_settled(&[0, 1, 2, 3, 4], Duration::from_secs(30));
    let (left, right) = (["n1", "n2"], ["n3", "n4", "n5"]);
    for i in 0..2 {
        let mut args = vec!["admin", "fault", "block"];
        args.extend(right);
        assert_eq!(c.json(i, &args).0, 0);
    }
    for i in 2..5 {
        let mut args = vec!["admin", "fault", "block"];
        args.extend(left);
        assert_eq!(c.json(i, &args).0, 0);
    }
    // Blind writes to the same keys on both sides.
    let mut acked = c.write_keys(&[0, 1], "p", 30, "-left");
    acked.extend(c.write_keys(&[2, 3, 4], "p", 30, "-right"));
    assert!(acked.len() >= 30, "writes succeed on both sides (sloppy quorum): {}", acked.len());
    for i in 0..5 {
        assert_eq!(c.json(i, &["admin", "fault", "unblock"]).0, 0);
    }
    let took = c.wait_for("healed partition converges", Duration::from_secs(90), || {
        for i in 0..5 {
            if c.status_pending(i).0 != 0 {
                return Err("hints pending".into());
            }
        }
        c.converged(&[0, 1, 2, 3, 4])
    });
    println!("partition: converged {took:?} after healing");
    all_read_back(&c, 0, &acked).unwrap();
}

#[test]
fn a_paused_node_does_not_stall_requests_and_catches_up() {
    let mut c = Cluster::new(4, 3, 2, 2, AE_ON);
    c.start_all();
    c.wait_settled(&[0, 1, 2, 3], Duration::from_secs(30));
    c.signal(3, libc::SIGSTOP);
    let start = std::time::Instant::now();
    let acked = c.write_keys(&[0, 1, 2], "s", 40, "");
    assert_eq!(acked.len(), 40, "every write succeeded with a node paused");
    for (k, v) in &acked {
        assert_eq!(c.values(0, k), Some(vec![v.clone()]));
    }
    println!("40 writes and 40 reads with a paused node took {:?}", start.elapsed());
    c.signal(3, libc::SIGCONT);
    let took = c.wait_for("paused node catches up", Duration::from_secs(90), || {
        for i in 0..4 {
            if c.status_pending(i).0 != 0 {
                return Err("hints pending".into());
            }
        }
        c.converged(&[0, 1, 2, 3])
    });
    println!("SIGSTOP: converged {took:?} after SIGCONT");
}

#[test]
fn tombstones_are_reaped_after_the_grace_period() {
    let mut c = Cluster::new(3, 3, 2, 2, "[storage]\ntombstone_grace_ms = 500\n[handoff]\ninterval_ms = 200\n");
    c.start_all();
    c.wait_settled(&[0, 1, 2], Duration::from_secs(30));
    let acked = c.write_keys(&[0, 1, 2], "t", 10, "");
    assert_eq!(acked.len(), 10);
    for (k, _) in acked.iter().take(5) {
        assert_eq!(c.json(0, &["delete", k]).0, 0);
    }
    let keys_held = |i: usize| -> u64 {
        let (_, doc) = c.json(i, &["admin", "partitions"]);
        doc["partitions"].as_array().unwrap().iter().map(|p| p["keys"].as_u64().unwrap()).sum()
    };
    let took = c.wait_for("tombstones reaped on every replica", Duration::from_secs(60), || {
        let held: Vec<u64> = (0..3).map(keys_held).collect();
        if held.iter().all(|&h| h == 5) {
            Ok(())
        } else {
            Err(format!("keys held {held:?}"))
        }
    });
    println!("reaping: done {took:?} after the deletes");
    for (k, v) in &acked[5..] {
        assert_eq!(c.values(1, k), Some(vec![v.clone()]));
    }
    for (k, _) in &acked[..5] {
        assert_eq!(c.values(2, k), Some(vec![]));
    }
}

/// The partition of `key` among 16, as the ring places it.
fn partition_of(key: &str) -> u64 {
    ringkv::ring::partition_of_position(ringkv::ring::key_position(key.as_bytes()), 16) as u64
}

#[test]
fn a_reaped_delete_stays_deleted_when_an_old_hint_arrives() {
    let extra = "[storage]\ntombstone_grace_ms = 500\n[handoff]\ninterval_ms = 200\n\
                 [anti_entropy]\ninterval_ms = 300\nmax_inflight = 2\n[testing]\nfault_injection = true\n";
    let mut c = Cluster::new(4, 3, 2, 2, extra);
    c.start_all();
    c.wait_settled(&[0, 1, 2, 3], Duration::from_secs(30));
    let (_, ring) = c.json(0, &["ring"]);
    let key = "ghost";
    let list: Vec<String> = ring["partitions"][partition_of(key) as usize]["preference_list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let index = |id: &str| c.nodes.iter().position(|n| n.id == id).unwrap();
    let (a, victim) = (index(&list[0]), index(&list[2]));
    let fallback = (0..4).find(|i| !list.contains(&c.nodes[*i].id)).unwrap();
    // The third replica is down: the write lands on the fallback as a hint for it.
    c.kill(victim);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.json(a, &["put", key, "old"]).0, 0);
    c.wait_for("the fallback holds a hint for the replica", Duration::from_secs(10), || {
        let (_, hints) = c.json(fallback, &["admin", "hints"]);
        (hints["hints"][0]["for"] == c.nodes[victim].id.as_str()).then_some(()).ok_or(format!("{hints}"))
    });
    // The fallback is cut off, so the hint stays undelivered; the replica comes back.
    let others: Vec<&str> = (0..4).filter(|i| *i != fallback).map(|i| c.nodes[i].id.as_str()).collect();
    let mut block = vec!["admin", "fault", "block"];
    block.extend(others.iter().copied());
    let out = c.cli(fallback, &block);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let cut_off =
        |c: &Cluster, i: usize| assert_eq!(c.json(i, &["admin", "fault", "block", &c.nodes[fallback].id]).0, 0);
    for i in (0..4).filter(|i| *i != fallback && *i != victim) {
        cut_off(&c, i);
    }
    c.start(victim);
    c.wait_settled(&[victim], Duration::from_secs(30));
    cut_off(&c, victim);
    let mut ctx = String::new();
    c.wait_for("every replica answers with the value", Duration::from_secs(30), || {
        let (code, doc) = c.json(a, &["get", key, "--r", "3"]);
        ctx = doc["context"].as_str().unwrap_or_default().to_string();
        (code == 0).then_some(()).ok_or(format!("{code} {doc}"))
    });
    // Delete on all three replicas, and wait until the tombstone is reaped everywhere.
    assert_eq!(c.json(a, &["delete", key, "--context", &ctx, "--w", "3"]).0, 0);
    c.wait_for("the tombstone reaped on every replica", Duration::from_secs(60), || {
        let (code, doc) = c.json(a, &["get", key, "--r", "3"]);
        (code == 1 && doc["context"].is_null()).then_some(()).ok_or(format!("{code} {doc}"))
    });
    // The old hint is delivered now: the deleted value must not come back.
    for i in 0..4 {
        assert_eq!(c.json(i, &["admin", "fault", "unblock"]).0, 0);
    }
    c.wait_for("the fallback's hint handed over", Duration::from_secs(30), || {
        let (hints, _) = c.status_pending(fallback);
        (hints == 0).then_some(()).ok_or(format!("{hints} hints"))
    });
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..4 {
        assert_eq!(c.values(i, key), Some(vec![]), "the reaped delete was undone via {}", c.nodes[i].id);
    }
}

fn member_status(c: &Cluster, via: usize, id: &str) -> serde_json::Value {
    let doc = c.json(via, &["status"]).1;
    doc["members"].as_array().and_then(|ms| ms.iter().find(|m| m["id"] == id).cloned()).unwrap_or_default()
}

#[test]
fn phi_accrual_rides_out_a_short_pause_and_convicts_a_dead_node() {
    let mut c = Cluster::new(3, 3, 2, 2, "");
    c.start_all();
    c.wait_settled(&[0, 1, 2], Duration::from_secs(30));
    // Heartbeats flow: every peer has a small phi.
    assert!(wait_until(Duration::from_secs(10), || {
        ["n2", "n3"].iter().all(|id| member_status(&c, 0, id)["phi"].as_f64().is_some_and(|p| p < 2.0))
    }));
    // A pause of a second (a few lost heartbeats) is not a failure.
    c.signal(1, libc::SIGSTOP);
    let paused = std::time::Instant::now();
    let mut max_phi: f64 = 0.0;
    while paused.elapsed() < Duration::from_millis(1200) {
        let n2 = member_status(&c, 0, "n2");
        assert_eq!(n2["state"], "up", "a short pause marked n2 down: {n2}");
        max_phi = max_phi.max(n2["phi"].as_f64().unwrap_or(0.0));
        std::thread::sleep(Duration::from_millis(100));
    }
    c.signal(1, libc::SIGCONT);
    assert!(max_phi > 0.5, "suspicion rose during the pause: {max_phi}");
    // A dead node is convicted in bounded time (phi 8: about 18 heartbeat intervals).
    c.kill(2);
    let killed = std::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || member_status(&c, 0, "n3")["state"] == "down"),
        "n3 never marked down"
    );
    let took = killed.elapsed();
    println!("phi-accrual: a SIGKILLed node marked down after {took:?}");
    assert!(member_status(&c, 0, "n3")["phi"].as_f64().is_some_and(|p| p > 8.0));
    assert_eq!(member_status(&c, 0, "n2")["state"], "up");
}

fn hints_held(c: &Cluster, live: &[usize]) -> u64 {
    live.iter().map(|&i| c.status_pending(i).0).sum()
}

#[test]
fn hinted_handoff_keeps_to_its_byte_rate_and_the_rate_changes_on_every_member_at_run_time() {
    let extra = "[anti_entropy]\ninterval_ms = 500\nmax_inflight = 0\n\
                 [handoff]\ninterval_ms = 200\nbatch_bytes = 4096\nbytes_per_sec = 500\n";
    let mut c = Cluster::new(4, 3, 2, 2, extra);
    c.start_all();
    c.wait_settled(&[0, 1, 2, 3], Duration::from_secs(30));
    let (rc, limits) = c.json(0, &["admin", "limits"]);
    assert_eq!(rc, 0);
    assert_eq!(limits["handoff.bytes_per_sec"], 500, "from the config: {limits}");
    assert_eq!(limits["effective"]["handoff.bytes_per_sec"], 500, "{limits}");
    c.kill(3);
    // Once n4 is known down, its writes go to a fallback as hints.
    assert!(wait_until(Duration::from_secs(20), || { (0..3).all(|i| member_status(&c, i, "n4")["state"] == "down") }));
    let value = "x".repeat(2000);
    let mut acked = Vec::new();
    for k in 0..20 {
        let key = format!("paced{k}");
        if c.cli(k % 3, &["put", &key, &value]).status.success() {
            acked.push((key, value.clone()));
        }
    }
    assert_eq!(acked.len(), 20);
    let mut held = 0;
    assert!(
        wait_until(Duration::from_secs(10), || {
            held = hints_held(&c, &[0, 1, 2]);
            held >= 10
        }),
        "writes for n4 wait as hints: {held}"
    );
    c.start(3);
    c.wait_settled(&[0, 1, 2, 3], Duration::from_secs(30));
    // At 500 bytes a second, 2 KB values move one 4 KB batch every ~8 s.
    std::thread::sleep(Duration::from_secs(4));
    let still = hints_held(&c, &[0, 1, 2]);
    assert!(still * 2 >= held, "paced: {still} of {held} hints still held after 4 s");
    // Unlimited on every member at once: the rest drains.
    let out = c.cli(0, &["admin", "limits", "set", "--all", "handoff.bytes_per_sec=0"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(doc["nodes"].as_object().map(|n| n.len()), Some(4), "every member changed: {doc}");
    for i in 0..4 {
        assert_eq!(c.json(i, &["admin", "limits"]).1["handoff.bytes_per_sec"], 0);
    }
    assert!(wait_until(Duration::from_secs(30), || hints_held(&c, &[0, 1, 2]) == 0), "hints drain once unlimited");
    all_read_back(&c, 3, &acked).unwrap();
}

/// Admission feedback (§6.5) on a real flood: a wiped node refilled by anti-entropy with a
/// large budget while clients read and write. With a latency target no foreground work can
/// meet, every node cuts its effective anti-entropy budget below the configured one while
/// the refill runs, and shows the p99 it reacts to; the configured value stays, and the
/// refill still completes.
#[test]
fn a_refill_flood_runs_on_a_cut_budget_while_foreground_latency_is_over_the_target() {
    let extra = "[anti_entropy]\ninterval_ms = 300\nmax_inflight = 0\npage_bytes = 4096\n\
                 [admission]\nlatency_target_ms = 1\nlatency_window_ms = 500\n";
    let mut c = Cluster::new(3, 3, 2, 2, extra);
    c.start_all();
    c.wait_settled(&[0, 1, 2], Duration::from_secs(30));
    let acked = c.write_keys(&[0, 1, 2], "flood", 150, &"f".repeat(1500));
    assert_eq!(acked.len(), 150);
    c.kill(2);
    std::fs::remove_dir_all(&c.nodes[2].data).unwrap();
    c.start(2);
    c.wait_settled(&[0, 1, 2], Duration::from_secs(30));
    // Foreground traffic for the whole refill.
    let bench = std::process::Command::new(&*common::CLI)
        .args(["--config", c.nodes[0].config.to_str().unwrap_or_default()])
        .args(["bench", "--workload", "a", "--clients", "4", "--duration", "10", "--keys", "100"])
        .args(["--value-size", "1500", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the bench starts");
    let out = c.cli(0, &["admin", "limits", "set", "--all", "anti_entropy.max_inflight=8"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // While the refill runs, each node's effective budget is cut, with a p99 over the target.
    let mut cut = [false; 3];
    let refilled = wait_until(Duration::from_secs(60), || {
        for (i, seen) in cut.iter_mut().enumerate() {
            let (_, doc) = c.json(i, &["admin", "limits"]);
            let over = [&doc["latency_p99_ms"], &doc["waits_p99_ms"]["storage"], &doc["waits_p99_ms"]["queue"]]
                .iter()
                .any(|p| p.as_u64().is_some_and(|p| p > 1));
            let effective = doc["effective"]["anti_entropy.max_inflight"].as_u64().unwrap_or(8);
            assert_eq!(doc["anti_entropy.max_inflight"], 8, "the configured value stays: {doc}");
            *seen |= over && effective < 8;
        }
        cut.iter().all(|s| *s) && c.converged(&[0, 1, 2]).is_ok()
    });
    let out = bench.wait_with_output().expect("the bench ends");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    println!("foreground during the refill: {}", doc["latency_ms"]);
    assert!(refilled, "every node cut its budget ({cut:?}) and the refill completed");
    all_read_back(&c, 2, &acked).unwrap();
}
