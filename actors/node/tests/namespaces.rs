//! Namespaces through real node processes and the CLI (issue 13 item 1): created on one
//! node and known on all, an N=1 namespace's keys on one node only, lww answering one
//! value, bad definitions exiting 2 and changing nothing, and definitions kept over a
//! restart.

mod common;

use std::time::Duration;

use common::{wait_until, Cluster};

/// Keys each node holds in namespace `name`, from its `admin partitions`.
fn held_in(c: &Cluster, i: usize, name: &str) -> u64 {
    let (code, doc) = c.json(i, &["admin", "partitions"]);
    assert_eq!(code, 0, "{doc}");
    let parts = doc["partitions"].as_array().cloned().unwrap_or_default();
    parts
        .iter()
        .flat_map(|p| p["namespaces"].as_array().cloned().unwrap_or_default())
        .filter(|ns| ns["name"] == name)
        .map(|ns| ns["keys"].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn namespaces_carry_their_own_n_and_reconciliation() {
    let mut c = Cluster::new(3, 3, 2, 2, "[anti_entropy]\ninterval_ms = 300\n");
    c.start_all();
    c.wait_settled(&[0, 1, 2], Duration::from_secs(30));

    let (code, doc) = c.json(0, &["admin", "namespace", "create", "cache", "--n", "1", "--r", "1", "--w", "1"]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["n"], 1);
    assert_eq!(c.json(0, &["admin", "namespace", "create", "sessions", "--resolution", "lww"]).0, 0);
    // Every node learns both by gossip; the list has the contract's shape.
    let listed = wait_until(Duration::from_secs(20), || {
        (0..3).all(|i| c.json(i, &["admin", "namespace", "list"]).1["namespaces"].as_array().map(Vec::len) == Some(2))
    });
    assert!(listed, "every node lists both namespaces");
    let (_, doc) = c.json(2, &["admin", "namespace", "list"]);
    let sessions = &doc["namespaces"][1];
    assert_eq!(
        (sessions["name"].as_str(), sessions["n"].as_u64(), sessions["r"].as_u64(), sessions["w"].as_u64()),
        (Some("sessions"), Some(3), Some(2), Some(2)),
        "{doc}"
    );
    assert_eq!(sessions["resolution"], "lww");

    // Bad definitions exit 2 and change nothing.
    for bad in [
        vec!["admin", "namespace", "create", "big", "--n", "4"],
        vec!["admin", "namespace", "create", "cache", "--n", "2"],
        vec!["admin", "namespace", "create", "a b"],
        vec!["admin", "namespace", "create", "q", "--n", "2", "--r", "3"],
        vec!["admin", "namespace", "set", "cache", "--w", "2"],
    ] {
        assert_eq!(c.json(1, &bad).0, 2, "{bad:?}");
    }
    assert_eq!(c.json(1, &["get", "k", "--ns", "nope"]).0, 2, "an unknown namespace");
    let (_, doc) = c.json(1, &["admin", "namespace", "list"]);
    assert_eq!(doc["namespaces"].as_array().map(Vec::len), Some(2), "{doc}");

    // N=1: each key on exactly one node, through anti-entropy rounds.
    let keys: Vec<String> = (0..20).map(|i| format!("c{i}")).collect();
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(c.json(i % 3, &["put", k, "v", "--ns", "cache"]).0, 0, "{k}");
    }
    std::thread::sleep(Duration::from_secs(2));
    let held: u64 = (0..3).map(|i| held_in(&c, i, "cache")).sum();
    assert_eq!(held, keys.len() as u64, "one copy of each key in all");
    for k in &keys {
        let (code, doc) = c.json(0, &["get", k, "--ns", "cache"]);
        assert_eq!((code, doc["values"].as_array().map(Vec::len)), (0, Some(1)), "{k}: {doc}");
    }
    // The same key in the default namespace is another key.
    assert_eq!(c.json(0, &["get", "c0"]).0, 1);

    // lww: two blind writes from two coordinators, one value; the default keeps both.
    assert_eq!(c.json(0, &["put", "u", "first", "--ns", "sessions"]).0, 0);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(c.json(1, &["put", "u", "second", "--ns", "sessions"]).0, 0);
    let (_, doc) = c.json(2, &["get", "u", "--ns", "sessions"]);
    assert_eq!(doc["values"], serde_json::json!(["second"]), "{doc}");
    assert_eq!(c.json(0, &["put", "u", "first"]).0, 0);
    assert_eq!(c.json(1, &["put", "u", "second"]).0, 0);
    assert_eq!(c.values(2, "u").map(|v| v.len()), Some(2));
    // A delete in an lww namespace wins over the value before it.
    assert_eq!(c.json(2, &["delete", "u", "--ns", "sessions"]).0, 0);
    assert_eq!(c.json(0, &["get", "u", "--ns", "sessions"]).0, 1);

    // R and W change; the definitions outlive a restart.
    assert_eq!(c.json(0, &["admin", "namespace", "set", "sessions", "--r", "1"]).0, 0);
    c.kill(2);
    c.start(2);
    c.wait_settled(&[0, 1, 2], Duration::from_secs(30));
    let kept = wait_until(Duration::from_secs(20), || {
        let (_, doc) = c.json(2, &["admin", "namespace", "list"]);
        doc["namespaces"][1]["r"] == 1 && doc["namespaces"].as_array().map(Vec::len) == Some(2)
    });
    assert!(kept, "the restarted node lists the namespaces with the changed R");
}
