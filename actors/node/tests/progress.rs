//! Progress of long work on real node processes: `admin transfers` while a node joins a
//! loaded cluster (pending while handoff is paused, then nothing pending once it runs, with
//! `--watch --json` printing a line per update), `admin leave NODE --wait --json` following
//! the leaver until it has left, and `admin partitions` showing each partition's
//! anti-entropy exchanges with its peers.

mod common;

use std::time::Duration;

use common::Cluster;
use serde_json::Value;

const FAST: &str = "[anti_entropy]\ninterval_ms = 500\nmax_inflight = 2\n[handoff]\ninterval_ms = 300\n";

/// Each line of a command's stdout as JSON (a line that is not JSON fails the test).
fn json_lines(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect()
}

fn set_handoff_everywhere(c: &Cluster, inflight: u32) {
    let pair = format!("handoff.max_inflight={inflight}");
    let (code, doc) = c.json(0, &["admin", "limits", "set", "--all", &pair]);
    assert_eq!(code, 0, "{doc}");
}

#[test]
fn transfers_leave_wait_and_exchanges_show_progress() {
    let mut c = Cluster::new(4, 3, 2, 2, FAST);
    for i in 0..3 {
        c.start(i);
    }
    c.wait_settled(&[0, 1, 2], Duration::from_secs(30));
    let acked = c.write_keys(&[0, 1, 2], "p", 60, "");
    assert_eq!(acked.len(), 60);

    // Nothing moves yet: a quiet cluster has nothing pending.
    let (code, doc) = c.json(0, &["admin", "transfers"]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["nodes"].as_array().map(Vec::len), Some(3), "{doc}");
    c.wait_for("nothing pending before the join", Duration::from_secs(30), || {
        let (_, doc) = c.json(0, &["admin", "transfers"]);
        if doc["pending"] == false {
            Ok(())
        } else {
            Err(doc.to_string())
        }
    });

    // n4 joins with handoff paused everywhere: the partitions it takes over stay pending on
    // their old holders.
    set_handoff_everywhere(&c, 0);
    c.start(3);
    c.wait_settled(&[0, 1, 2, 3], Duration::from_secs(30));
    let mut pending = Value::Null;
    c.wait_for("transfers pending after the join", Duration::from_secs(30), || {
        let (code, doc) = c.json(0, &["admin", "transfers"]);
        pending = doc.clone();
        let partitions = doc["total"]["partitions_pending"].as_u64().unwrap_or(0);
        if code == 0 && doc["pending"] == true && partitions > 0 && doc["total"]["keys_left"].as_u64() > Some(0) {
            Ok(())
        } else {
            Err(doc.to_string())
        }
    });
    assert_eq!(pending["nodes"].as_array().map(Vec::len), Some(4), "{pending}");
    let holders: Vec<&Value> = pending["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["transfers"]["partitions_pending"].as_u64() > Some(0))
        .collect();
    assert!(!holders.is_empty() && holders.iter().all(|n| n["node"] != "n4"), "{pending}");

    // While nothing can move, a watch gives up at its timeout with exit status 3 and one line
    // on stderr, its updates printed.
    let out = c.cli(0, &["admin", "transfers", "--watch", "--timeout", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("still pending"), "{err}");
    assert!(json_lines(&out.stdout).iter().all(|l| l["pending"] == true));

    // Handoff on again: --watch follows until nothing is pending, a JSON line per update.
    set_handoff_everywhere(&c, 2);
    let out = c.cli(0, &["admin", "transfers", "--watch", "--timeout", "120"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&out.stdout);
    assert!(!lines.is_empty());
    let last = lines.last().unwrap();
    assert_eq!(last["pending"], false, "{last}");
    assert_eq!(last["total"]["partitions_pending"], 0, "{last}");
    assert!(last["total"]["keys_moved"].as_u64() > Some(0), "the join moved keys: {last}");
    assert!(last["total"]["bytes_moved"].as_u64() > Some(0), "{last}");
    assert!(lines.iter().all(|l| l["elapsed_ms"].is_u64() && l["nodes"].is_array()), "{lines:?}");
    println!("transfers --watch: {} updates", lines.len());
    let (code, doc) = c.json(1, &["admin", "transfers"]);
    assert_eq!((code, &doc["pending"]), (0, &Value::Bool(false)), "{doc}");

    // n4 leaves, followed to the end.
    let out = c.cli(0, &["admin", "leave", "n4", "--wait", "--timeout", "120"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&out.stdout);
    let progress: Vec<&Value> = lines.iter().filter(|l| l["node"] == "n4" && l["transfers"].is_object()).collect();
    assert!(!progress.is_empty(), "at least one progress line: {lines:?}");
    println!("leave --wait: {} progress lines, first {}", progress.len(), progress[0]);
    assert_eq!(lines.last().unwrap()["leaving"], "n4");
    assert_eq!(lines.last().unwrap()["left"], true);
    c.wait_for("n4 gone from n1's status", Duration::from_secs(30), || {
        let (_, st) = c.json(0, &["status"]);
        match st["members"].as_array().unwrap().iter().any(|m| m["id"] == "n4") {
            false => Ok(()),
            true => Err(st.to_string()),
        }
    });
    c.kill(3);
    for (k, v) in &acked {
        assert!(c.values(0, k).is_some_and(|vals| vals.contains(v)), "{k}");
    }

    // Anti-entropy ran all along: each node's partitions list their exchanges with peers.
    let mut repaired = 0;
    for i in 0..3 {
        let (code, doc) = c.json(i, &["admin", "partitions"]);
        assert_eq!(code, 0);
        let me = c.nodes[i].id.clone();
        let parts = doc["partitions"].as_array().unwrap();
        assert!(!parts.is_empty());
        for p in parts {
            assert!(p["keys"].is_u64() && p["merkle_root"].is_string(), "{p}");
            for x in p["exchanges"].as_array().unwrap() {
                assert_ne!(x["peer"], me.as_str(), "{p}");
                assert!(x["last_completed_ms_ago"].is_u64() && x["last_keys_repaired"].is_u64(), "{x}");
                repaired += x["keys_repaired"].as_u64().unwrap();
            }
        }
        assert!(parts.iter().any(|p| !p["exchanges"].as_array().unwrap().is_empty()), "{me}: {doc}");
    }
    assert!(repaired > 0, "anti-entropy copied keys to n4 while handoff was paused");

    // The bench: with --json and no terminal, stdout holds its one document and nothing else;
    // --progress-json adds JSON lines of progress before it. The timed run updates by
    // read-modify-write (workload f): blind updates (a) for a time pile up siblings on its 20
    // keys until the store refuses more, after a number of writes that depends on speed.
    let (code, doc) = c.json(0, &["bench", "--ops", "200", "--keys", "50", "--clients", "2"]);
    assert_eq!((code, doc["ops"].as_u64()), (0, Some(200)), "one document: {doc}");
    let args = ["bench", "--progress-json", "--workload", "f", "--duration", "2.5", "--keys", "20", "--clients", "2"];
    let out = c.cli(0, &args);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&out.stdout);
    let (result, progress) = lines.split_last().expect("lines");
    assert!(result["ops"].as_u64() > Some(0) && result["progress"].is_null(), "{result}");
    assert!(progress.iter().all(|l| l["progress"] == "preload" || l["progress"] == "run"), "{progress:?}");
    let last_run = progress.iter().rev().find(|l| l["progress"] == "run").expect("a line for the run");
    assert_eq!(last_run["done"], result["ops"], "the run's last line counts every operation");
    assert!(progress.iter().any(|l| l["progress"] == "preload" && l["done"] == 20 && l["total"] == 20));
}
