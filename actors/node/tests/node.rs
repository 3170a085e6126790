//! Process-level tests of the node and the CLI: real `ringkv-node` processes on loopback.

mod common;

use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

use common::{wait_until, Cluster, CLI, NODE};

#[test]
fn three_nodes_put_get_delete_and_siblings() {
    let mut c = Cluster::new(3, 3, 2, 2, "");
    c.start_all();
    c.wait_settled(&[0, 1, 2], Duration::from_secs(30));

    let (code, doc) = c.json(0, &["put", "k1", "v1"]);
    assert_eq!(code, 0, "{doc}");
    assert!(doc["context"].is_string());
    assert_eq!(c.values(1, "k1"), Some(vec!["v1".to_string()]));
    assert_eq!(c.values(2, "nope"), Some(vec![]));

    // Two blind writes, coordinated by different nodes and by the same node, stay siblings.
    assert_eq!(c.json(0, &["put", "s", "a"]).0, 0);
    assert_eq!(c.json(0, &["put", "s", "b"]).0, 0);
    assert_eq!(c.json(2, &["put", "s", "c"]).0, 0);
    assert_eq!(c.values(1, "s"), Some(vec!["a".into(), "b".into(), "c".into()]));
    let (_, doc) = c.json(1, &["get", "s"]);
    let ctx = doc["context"].as_str().unwrap().to_string();
    assert_eq!(c.json(2, &["put", "s", "resolved", "--context", &ctx]).0, 0);
    assert_eq!(c.values(0, "s"), Some(vec!["resolved".into()]));

    // Delete without a context reads it first; the key is then missing everywhere.
    assert_eq!(c.json(1, &["delete", "s"]).0, 0);
    for i in 0..3 {
        assert_eq!(c.values(i, "s"), Some(vec![]), "node {i}");
    }
    assert_eq!(c.json(1, &["delete", "s"]).0, 1, "deleting a missing key is not found");

    // Values from stdin; binary values come back as base64.
    let out = c.cli_with(&c.nodes[0].config, &["put", "bin", "-"], Some(&[0xff, 0x00, 0x01]));
    assert_eq!(out.status.code(), Some(0));
    let (_, doc) = c.json(2, &["get", "bin"]);
    assert_eq!(doc["values"][0]["base64"], "/wAB");

    // Bad input changes nothing and exits 2.
    let big = vec![b'x'; (1 << 20) + 1];
    assert_eq!(c.cli_with(&c.nodes[0].config, &["put", "big", "-"], Some(&big)).status.code(), Some(2));
    assert_eq!(c.values(0, "big"), Some(vec![]));
    assert_eq!(c.json(0, &["put", "k1", "x", "--context", "%%"]).0, 2);
    assert_eq!(c.json(0, &["get", "k1", "--r", "4"]).0, 2);
    // A crafted context whose counter would wrap is refused, not stored under a dot every
    // merge treats as already seen.
    let (_, doc) = c.json(0, &["get", "k1"]);
    let ctx = ringkv::version::VersionVector::decode_context(doc["context"].as_str().unwrap(), 0).unwrap();
    let mut forged = ringkv::version::VersionVector::new();
    for (actor, _) in ctx.iter() {
        forged.witness(actor, u64::MAX, 0);
    }
    let out = c.cli(0, &["put", "k1", "forged", "--context", &forged.encode_context()]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(c.values(0, "k1"), Some(vec!["v1".to_string()]));

    // Every partition has N distinct replicas and the replicas of k1's partition agree.
    let (_, ring) = c.json(0, &["ring"]);
    assert_eq!(ring["partitions"].as_array().unwrap().len(), 16);
    let roots: Vec<serde_json::Value> = (0..3).map(|i| c.json(i, &["admin", "partitions"]).1).collect();
    for p in 0..16u64 {
        let rs: Vec<&serde_json::Value> = roots
            .iter()
            .filter_map(|d| d["partitions"].as_array().unwrap().iter().find(|e| e["partition"] == p))
            .map(|e| &e["merkle_root"])
            .collect();
        assert_eq!(rs.len(), 3, "partition {p} listed by all three");
    }
}

#[test]
fn durable_node_killed_mid_writes_keeps_every_acknowledged_write() {
    let mut c = Cluster::new(1, 1, 1, 1, "");
    c.start(0);
    c.wait_settled(&[0], Duration::from_secs(20));
    // A writer in the background; kill the node while it runs.
    let config = c.nodes[0].config.clone();
    let writer = std::thread::spawn(move || {
        let mut acked = Vec::new();
        for i in 0..400 {
            let out = Command::new(&*CLI)
                .arg("--config")
                .arg(&config)
                .args(["put", &format!("key{i}"), &format!("value{i}")])
                .output()
                .unwrap();
            match out.status.code() {
                Some(0) => acked.push(i),
                _ => break,
            }
        }
        acked
    });
    wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(&c.nodes[0].log).is_ok() && c.values(0, "key20").is_some_and(|v| !v.is_empty())
    });
    c.kill(0);
    let acked = writer.join().unwrap();
    assert!(acked.len() >= 20, "the writer got some writes in before the kill");
    c.start(0);
    c.wait_settled(&[0], Duration::from_secs(20));
    for i in acked {
        assert_eq!(c.values(0, &format!("key{i}")), Some(vec![format!("value{i}")]), "acked write {i} lost");
    }
}

#[test]
fn wrong_secret_is_refused_and_garbage_does_not_stop_the_node() {
    let mut c = Cluster::new(1, 1, 1, 1, "");
    c.start(0);
    c.wait_settled(&[0], Duration::from_secs(20));

    let bad = c.dir.path().join("bad.toml");
    std::fs::write(&bad, std::fs::read_to_string(&c.nodes[0].config).unwrap().replace(&c.secret, "wrong")).unwrap();
    let out = c.cli_with(&bad, &["get", "k"], None);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("secret"));

    // Random datagrams at the QUIC port.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for len in [1usize, 20, 1200, 1500, 60000] {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _ = sock.send_to(&bytes, ("127.0.0.1", c.nodes[0].port));
    }
    // Malformed and oversized frames on an authenticated connection drop their stream;
    // the connection and the node keep serving.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let setup = ringkv_transport::load_client(&c.nodes[0].config).unwrap();
        let ep = ringkv_transport::endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let (conn, _) = ringkv_transport::connect(&ep, setup.nodes[0], &setup.creds, None).await.unwrap();
        for garbage in [&[2u8, 0, 0, 0, 3, 0xc1, 0xc1, 0xc1][..], &[2, 0xff, 0xff, 0xff, 0xff], &[9, 0, 0, 0, 1, 0]] {
            let mut send = conn.open_uni().await.unwrap();
            send.write_all(garbage).await.unwrap();
            send.finish().unwrap();
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(ringkv_transport::read_streams(conn.clone(), 1 << 20, move |m| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(m).await;
            }
        }));
        let link = ringkv_transport::link_writer(conn.clone(), 1 << 20);
        let status = ringkv::wire::Message::Client { id: 7, request: ringkv::wire::ClientRequest::Status };
        link.send(&status).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
        assert!(matches!(reply, ringkv::wire::Message::ClientReply { id: 7, .. }), "{reply:?}");
    });
    assert_eq!(c.json(0, &["put", "after", "garbage"]).0, 0);
    assert_eq!(c.values(0, "after"), Some(vec!["garbage".to_string()]));
}

#[test]
fn bad_config_exits_non_zero_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("partitions = 64", "partitions = 48", "cluster.partitions"),
        ("read_quorum = 2", "read_quorum = 5", "cluster.read_quorum"),
        ("name = \"dev\"", "name = \"dev\"\nbogus = 1", "cluster.bogus"),
    ];
    let base = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/cluster/n1.toml")).unwrap();
    for (from, to, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, base.replace(from, to)).unwrap();
        let out = Command::new(NODE).arg("--config").arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{key}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{key} not named in: {err}");
    }
    // The client refuses the same file the same way.
    let out = Command::new(&*CLI).arg("--config").arg(dir.path().join("bad.toml")).args(["get", "k"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    // A port in use is a clear error, not a panic.
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = base.replace("listen = \"127.0.0.1:7101\"", &format!("listen = \"127.0.0.1:{port}\""));
    let cfg = cfg.replace("data_dir = \"data/n1\"", &format!("data_dir = \"{}\"", dir.path().join("d").display()));
    let path = dir.path().join("port.toml");
    std::fs::write(&path, cfg).unwrap();
    let out = Command::new(NODE).arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn buffered_node_flushes_on_graceful_stop() {
    let mut c = Cluster::new(1, 1, 1, 1, "[storage]\ndurability = \"buffered\"\nflush_interval_ms = 50\n");
    c.start(0);
    c.wait_settled(&[0], Duration::from_secs(20));
    let acked = c.write_keys(&[0], "b", 30, "");
    assert_eq!(acked.len(), 30);
    // SIGTERM: the node stops taking work and makes buffered commits durable before exiting.
    c.signal(0, libc::SIGTERM);
    let exited = wait_until(Duration::from_secs(15), || {
        c.nodes[0].child.as_mut().map(|ch| ch.try_wait().ok().flatten().is_some()).unwrap_or(true)
    });
    assert!(exited, "the node stops on SIGTERM");
    let first_run = std::fs::read_to_string(&c.nodes[0].log).unwrap();
    assert!(first_run.contains("buffered"), "the start-up log says writes are buffered");
    c.start(0);
    c.wait_settled(&[0], Duration::from_secs(20));
    for (k, v) in &acked {
        assert_eq!(c.values(0, k), Some(vec![v.clone()]), "{k}");
    }
    // The writes would survive the process without the clean stop too (the commit log is
    // in the page cache): what shows the stop was clean is that the restart finds the store
    // closed and nothing to replay.
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap();
    let second_run = log.get(first_run.len()..).unwrap_or_default();
    assert!(!second_run.contains("did not stop cleanly"), "{second_run}");
    assert!(!second_run.contains("commit log replayed"), "{second_run}");
}

#[test]
fn a_buffered_cluster_killed_at_once_keeps_every_acknowledged_write_on_one_disk() {
    // Buffered commits are flushed only once a minute, and the SIGKILLs lose no write: the
    // commit logs are in the page cache. The one durable writer per put, which covers a
    // machine that dies with its page cache, is checked where that can be done: in the
    // storage (`buffered_mode_flushes_the_log_for_every_durable_batch_and_only_for_those`)
    // and in the simulation, which loses what a crashed node did not flush.
    let mut c = Cluster::new(3, 3, 2, 2, "[storage]\ndurability = \"buffered\"\nflush_interval_ms = 60000\n");
    c.start_all();
    c.wait_settled(&[0, 1, 2], Duration::from_secs(30));
    let acked = c.write_keys(&[0, 1, 2], "k", 30, "");
    assert_eq!(acked.len(), 30);
    for i in 0..3 {
        c.kill(i);
    }
    c.start_all();
    c.wait_settled(&[0, 1, 2], Duration::from_secs(30));
    for (k, v) in &acked {
        // R = N: every replica answers, so the one durable copy is among them (retried while
        // the restarted nodes still find each other: unavailable is not lost).
        let mut last = serde_json::Value::Null;
        let found = wait_until(Duration::from_secs(20), || {
            let (code, doc) = c.json(0, &["get", k, "--r", "3"]);
            let has = code == 0 && doc["values"].as_array().is_some_and(|vs| vs.iter().any(|x| x == v.as_str()));
            last = doc;
            has || code == 1
        });
        assert!(found, "{k}: no answer: {last}");
        assert!(
            last["values"].as_array().is_some_and(|vs| vs.iter().any(|x| x == v.as_str())),
            "acknowledged write {k} lost: {last}"
        );
    }
}

/// The counters of every node's `status`: (coordinated, forwarded), summed.
fn counters(c: &Cluster) -> (u64, u64) {
    (0..c.nodes.len()).fold((0, 0), |(co, fw), i| {
        let (_, doc) = c.json(i, &["status"]);
        (
            co + doc["counters"]["coordinated"].as_u64().unwrap_or(0),
            fw + doc["counters"]["forwarded"].as_u64().unwrap_or(0),
        )
    })
}

#[test]
fn a_routing_client_reaches_a_replica_directly_and_a_pinned_one_is_forwarded() {
    let mut c = Cluster::new(5, 3, 2, 2, "");
    c.start_all();
    c.wait_settled(&[0, 1, 2, 3, 4], Duration::from_secs(30));
    let bench = |extra: &[&str]| {
        let mut args = vec!["bench", "--workload", "a", "--keys", "100", "--ops", "300", "--clients", "4"];
        args.extend(extra);
        let (code, doc) = c.json(0, &args);
        assert_eq!((code, doc["errors"].as_u64()), (0, Some(0)), "{doc}");
        doc
    };
    let doc = bench(&[]);
    assert_eq!(doc["error_kinds"], serde_json::json!({}), "no failures, none described: {doc}");
    assert_eq!(doc["routing"], "routed");
    assert!(doc["nodes"].as_u64().unwrap_or(0) > 1, "routed requests reach several nodes: {doc}");
    // Workload a's latencies by kind of operation: reads and blind updates, all counted.
    let by_op = doc["latency_ms_by_op"].as_object().cloned().unwrap_or_default();
    assert_eq!(by_op.keys().collect::<Vec<_>>(), ["read", "update"], "{doc}");
    let counted: u64 = by_op.values().map(|kind| kind["ops"].as_u64().unwrap_or(0)).sum();
    assert_eq!(Some(counted), doc["ops"].as_u64(), "every operation in one kind: {doc}");
    assert!(by_op.values().all(|kind| kind["p99"].as_f64().unwrap_or(0.0) > 0.0), "{doc}");
    // Counters reach status within a second.
    let mut seen = (0, 0);
    assert!(
        wait_until(Duration::from_secs(10), || {
            seen = counters(&c);
            seen.0 >= 400
        }),
        "the 100 preload writes and 300 operations are counted: {seen:?}"
    );
    assert_eq!(seen.1, 0, "routed requests all went to a replica of their key");

    // Pinned to one node, requests for keys it does not replicate take the extra hop.
    let pin = format!("127.0.0.1:{}", c.nodes[4].port);
    bench(&["--pin", &pin, "--no-preload"]);
    assert!(
        wait_until(Duration::from_secs(10), || {
            seen = counters(&c);
            seen.1 > 0
        }),
        "with 5 nodes and N=3, a pinned node gets keys it does not replicate: {seen:?}"
    );
    // Load balance (§6.2): the node that took every pinned request is out of balance by
    // requests, as another node sees it through gossip.
    let mut status = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(15), || {
            status = c.json(0, &["status"]).1;
            let n5 = status["members"].as_array().and_then(|ms| ms.iter().find(|m| m["id"] == "n5")).cloned();
            n5.is_some_and(|m| {
                m["requests_last_minute"].as_u64().unwrap_or(0) >= 300
                    && m["request_imbalance"].as_f64().unwrap_or(0.0) > 0.5
                    && m["out_of_balance"] == true
            })
        }),
        "n5 took the pinned requests: {status}"
    );
    assert!(status["out_of_balance"].as_array().is_some_and(|o| o.iter().any(|id| id == "n5")), "{status}");
    assert!(status["members"][0]["fair_share"].as_f64().is_some_and(|f| (f - 0.2).abs() < 1e-9), "{status}");
    let out = Command::new(&*CLI).arg("--config").arg(&c.nodes[0].config).arg("status").output().unwrap();
    let human = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(human.lines().any(|l| l.starts_with("* n5 ")), "the table marks n5's line: {human}");

    // The library's example runs against the cluster.
    let example = std::path::Path::new(NODE).with_file_name("examples").join("quickstart");
    if !example.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "ringkv-client", "--example", "quickstart"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
            .status()
            .unwrap();
        assert!(status.success(), "cannot build the client example");
    }
    let out = Command::new(&example).arg(&c.nodes[2].config).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));

    // A reader that goes away (`ringkv ring | head -1`) does not make the CLI panic.
    let mut child = Command::new(&*CLI)
        .arg("--config")
        .arg(&c.nodes[0].config)
        .arg("ring")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_routing_client_follows_the_ring_when_a_node_joins_mid_run() {
    // N=2 over 3 nodes, then a 4th joins while one routed client runs: answers tell the
    // new ring epoch and the client learns the ring again at once, well before its
    // 10-second refresh, so requests keep reaching a replica of their key. Updates are
    // read-modify-write (workload f): 16 seconds of blind updates pile more siblings on the
    // busiest of 200 keys than the store takes, once the cluster is fast enough. The run is
    // long beside the moments the ring takes to settle after the join (longer on a loaded
    // machine), so that the requests sent meanwhile stay a small part of it.
    let mut c = Cluster::new(4, 2, 1, 1, "");
    for i in 0..3 {
        c.start(i);
    }
    c.wait_settled(&[0, 1, 2], Duration::from_secs(30));
    let config = c.nodes[0].config.clone();
    let bench = std::thread::spawn(move || {
        let out = Command::new(&*CLI)
            .arg("--config")
            .arg(&config)
            .args(["--json", "bench", "--workload", "f", "--keys", "200", "--duration", "16", "--clients", "2"])
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or(serde_json::Value::Null)
    });
    std::thread::sleep(Duration::from_millis(1500));
    c.start(3);
    c.wait_settled(&[0, 1, 2, 3], Duration::from_secs(30));
    let doc = bench.join().unwrap();
    assert_eq!(doc["errors"], 0, "{doc}");
    let ops = doc["ops"].as_u64().unwrap() + doc["keys"].as_u64().unwrap();
    let (_, st) = c.json(3, &["status"]);
    let n4 = st["members"].as_array().unwrap().iter().find(|m| m["id"] == "n4").cloned().unwrap();
    assert!(n4["partitions"].as_u64().unwrap() > 0, "the ring moved: n4 owns partitions: {st}");
    let mut seen = (0, 0);
    assert!(wait_until(Duration::from_secs(10), || {
        seen = counters(&c);
        seen.0 + seen.1 >= ops
    }));
    // A client that kept its first view would send about a quarter of the requests after
    // the join to nodes that no longer replicate their keys.
    assert!(seen.1 * 20 < ops, "{} of {ops} requests reached a node off the key's preference list", seen.1);
}

/// The harness's node ports come from below the kernel's ephemeral range, so a client's
/// socket bound to port 0 can never take one between its pick and its node's start (which
/// failed a CI run: "cannot listen on 127.0.0.1:48161 ... Address already in use"), and no
/// port is handed out twice in one test process.
#[test]
fn harness_ports_are_below_the_ephemeral_range_and_never_repeat() {
    let ephemeral = ringkv_node::dev::ephemeral_port_min();
    let ports: Vec<u16> = (0..200).map(|_| common::free_port()).collect();
    for p in &ports {
        assert!(u32::from(*p) < ephemeral, "port {p} is in the ephemeral range from {ephemeral}");
    }
    let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
}

/// `ringkv bench` says what its failed operations failed with: `error_kinds` counts them by
/// description (they add up to `errors`), the human line lists them, and a failed preload
/// names its cause. Here every put is refused for a value over the cluster's limit.
#[test]
fn bench_reports_what_its_failed_operations_failed_with() {
    let mut c = Cluster::new(3, 3, 2, 2, "[limits]\nmax_value_bytes = 64\n");
    c.start_all();
    c.wait_settled(&[0, 1, 2], Duration::from_secs(30));
    let run = ["bench", "--workload", "a", "--keys", "50", "--ops", "200", "--clients", "2", "--value-size", "100"];
    let (code, doc) = c.json(0, &[&run[..], &["--no-preload"]].concat());
    assert_eq!(code, 3, "failed operations exit 3 (unavailable): {doc}");
    let errors = doc["errors"].as_u64().unwrap_or(0);
    assert!(errors > 0 && errors < 200, "the puts fail, the gets do not: {doc}");
    let kinds = doc["error_kinds"].as_object().cloned().unwrap_or_default();
    assert_eq!(kinds.len(), 1, "one cause: {doc}");
    let (what, count) = kinds.iter().next().map(|(k, v)| (k.clone(), v.as_u64())).unwrap_or_default();
    assert!(what.starts_with("BadRequest"), "the refusal's kind and message: {what}");
    assert_eq!(count, Some(errors), "the kinds add up to the errors: {doc}");
    let human = std::process::Command::new(&*CLI)
        .arg("--config")
        .arg(&c.nodes[0].config)
        .args(run)
        .arg("--no-preload")
        .output()
        .expect("the CLI runs");
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("errors: ") && text.contains("x BadRequest"), "{text}");
    let preloaded = c.cli(0, &run);
    let stderr = String::from_utf8_lossy(&preloaded.stderr);
    assert_eq!(preloaded.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("50 preload writes failed: 50 x BadRequest"), "{stderr}");
}
