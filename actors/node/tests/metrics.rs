//! The metrics listener of real node processes (`[metrics] listen`): `/metrics` moves by
//! what a known workload must make it move, the cluster page draws every member and the
//! ring in a real headless browser (Debian's chromium), and a metrics address the node
//! cannot take stops its start with the contract's status.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::*;

/// One scrape: each series (`name{label="value",...}` with labels sorted) and its value.
struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut series = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let Some((name_labels, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            let (name, labels) = match name_labels.split_once('{') {
                Some((n, rest)) => {
                    let mut labels: Vec<&str> =
                        rest.trim_end_matches('}').split(',').filter(|l| !l.is_empty()).collect();
                    labels.sort();
                    (n, labels.join(","))
                }
                None => (name_labels, String::new()),
            };
            series.insert(format!("{name}{{{labels}}}"), value);
        }
        Scrape(series)
    }

    /// A series' value (0 when absent); `labels` in any order, as `key="value"`.
    fn get(&self, name: &str, labels: &[&str]) -> f64 {
        let mut labels = labels.to_vec();
        labels.sort();
        self.0.get(&format!("{name}{{{}}}", labels.join(","))).copied().unwrap_or(0.0)
    }

    /// The sum of every series of `name` whose labels include all of `labels`.
    fn sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| {
                k.split_once('{').is_some_and(|(n, rest)| n == name && labels.iter().all(|l| rest.contains(l)))
            })
            .map(|(_, v)| v)
            .sum()
    }
}

fn scrape(c: &Cluster, i: usize) -> Scrape {
    let (status, content_type, body) = c.http_get(i, "/metrics");
    assert_eq!(status, 200, "GET /metrics on {}: {body}", c.nodes[i].id);
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    Scrape::parse(&body)
}

fn cluster_with_metrics() -> Cluster {
    let mut c = Cluster::new(3, 3, 2, 2, "");
    // The counts below need every request to succeed: on a loaded machine a replica may
    // answer after its replica timeout (it is then late, not failed), and the request's own
    // deadline is generous.
    c.set_partitions(16, (20_000, 500));
    c.enable_metrics();
    // No peer may count as down for a moment (early phi estimates rest on few heartbeats, and
    // this test may run beside others on two cores): a put would then write to one replica
    // fewer than the counts below expect.
    for n in &c.nodes {
        let text = std::fs::read_to_string(&n.config).unwrap();
        let text = text.replacen("[failure_detector]\n", "[failure_detector]\nphi_threshold = 32.0\n", 1);
        std::fs::write(&n.config, text).unwrap();
    }
    c.start_all();
    c.wait_settled(&[0, 1, 2], Duration::from_secs(60));
    // Settled members may still be dialling each other (a dial made before its peer listened
    // waits for QUIC to retransmit, and messages to that peer wait behind it): the counts
    // below need every node to reach both others. A put through each node that both of its
    // peers acknowledge (W = 3) shows it does. (Two nodes send on one connection between
    // them, so how many connections a node holds does not tell.)
    c.wait_for("every node reaches both others", Duration::from_secs(60), || {
        for i in 0..3 {
            let out = c.cli(i, &["put", "--w", "3", &format!("warm-up-{i}"), "x"]);
            if out.status.code() != Some(0) {
                return Err(format!("{}: {}", c.nodes[i].id, String::from_utf8_lossy(&out.stderr)));
            }
        }
        Ok(())
    });
    c
}

#[test]
fn metrics_move_by_a_known_workload() {
    let c = cluster_with_metrics();
    let before: Vec<Scrape> = (0..3).map(|i| scrape(&c, i)).collect();
    for k in 0..20 {
        let out = c.cli(0, &["put", &format!("m{k}"), &format!("v{k}")]);
        assert_eq!(out.status.code(), Some(0), "put m{k}: {}", String::from_utf8_lossy(&out.stderr));
    }
    for k in 0..20 {
        assert_eq!(c.values(0, &format!("m{k}")), Some(vec![format!("v{k}")]), "get m{k}");
    }
    let after: Vec<Scrape> = (0..3).map(|i| scrape(&c, i)).collect();
    let d = |i: usize, name: &str, labels: &[&str]| after[i].get(name, labels) - before[i].get(name, labels);
    let dsum = |i: usize, name: &str, labels: &[&str]| after[i].sum(name, labels) - before[i].sum(name, labels);

    // Client requests: n1 took all 40 (every node replicates every key: N = 3 of 3).
    assert_eq!(d(0, "ringkv_requests_total", &["op=\"put\"", "result=\"ok\""]), 20.0);
    assert_eq!(d(0, "ringkv_requests_total", &["op=\"get\"", "result=\"ok\""]), 20.0);
    assert_eq!(dsum(0, "ringkv_requests_total", &[]), 40.0, "no other result on n1");
    for i in 1..3 {
        assert_eq!(dsum(i, "ringkv_requests_total", &[]), 0.0, "{} took no client request", c.nodes[i].id);
    }
    assert_eq!(d(0, "ringkv_request_duration_seconds_count", &["op=\"put\""]), 20.0);
    assert_eq!(d(0, "ringkv_request_duration_seconds_count", &["op=\"get\""]), 20.0);
    assert_eq!(
        d(0, "ringkv_request_duration_seconds_bucket", &["op=\"put\"", "le=\"+Inf\""]),
        20.0,
        "the +Inf bucket counts every put"
    );
    assert!(d(0, "ringkv_request_duration_seconds_sum", &["op=\"put\""]) >= 0.0);
    assert_eq!(d(0, "ringkv_forwarded_requests_total", &["direction=\"out\""]), 0.0);

    // Replica requests: n1 coordinates each put on itself and writes it to n2 and n3; each
    // get reads n1 in full and R - 1 = 1 other by digest, except read_repair_percent (10%
    // by default: 2 of 20 consecutive gets) that read both n2 and n3; a replica whose digest
    // differed is read in full too, and a read repair would be one more write.
    let repairs = d(0, "ringkv_read_repairs_total", &[]);
    let writes: f64 = (1..3).map(|i| d(i, "ringkv_replica_requests_total", &["kind=\"write\""])).sum();
    let seen = |k: &str| -> Vec<f64> { (0..3).map(|i| d(i, "ringkv_replica_requests_total", &[k])).collect() };
    let (w, r) = (seen("kind=\"write\""), seen("kind=\"read\""));
    assert_eq!(writes, 40.0 + repairs, "writes to n2 and n3 (read repairs: {repairs}; writes {w:?}, reads {r:?})");
    let digests: Vec<f64> = (0..3).map(|i| d(i, "ringkv_replica_requests_total", &["kind=\"digest\""])).collect();
    assert_eq!(digests[1] + digests[2], 22.0, "digests on n2 and n3: {digests:?}");
    for i in 1..3 {
        // In full only after a differing digest (a write still on its way): once per get at most.
        let full = d(i, "ringkv_replica_requests_total", &["kind=\"read\""]);
        assert!(full <= 20.0, "{} read in full {full} times", c.nodes[i].id);
        assert_eq!(d(i, "ringkv_replica_requests_total", &["kind=\"coordinate\""]), 0.0);
    }
    for kind in ["kind=\"read\"", "kind=\"digest\""] {
        assert_eq!(dsum(0, "ringkv_replica_requests_total", &[kind]), 0.0, "n1 reads its own copy");
    }

    // Storage: every node committed at least the 20 writes (in batches of any size); n1 read
    // rows for at least the 20 gets and n2 and n3 together for at least their 22 digests.
    for (i, now) in after.iter().enumerate() {
        let id = &c.nodes[i].id;
        assert!(d(i, "ringkv_storage_commit_batch_ops_sum", &[]) >= 20.0, "operations committed on {id}");
        let batches = d(i, "ringkv_storage_commit_batch_ops_count", &[]);
        assert!(batches >= 1.0, "commits on {id}");
        assert_eq!(d(i, "ringkv_storage_commit_duration_seconds_count", &[]), batches, "one latency per commit");
        // At most one log append per commit (reads and empty batches append none); the
        // worker counts a batch just before its append, so the window may cut between them.
        let appends = d(i, "ringkv_storage_log_append_duration_seconds_count", &[]);
        assert!(appends >= 1.0 && appends <= batches + 1.0, "log appends on {id}: {appends} for {batches} commits");
        assert!(now.get("ringkv_connections", &["role=\"node\""]) >= 1.0, "peer connections of {id}");
        assert_eq!(now.get("ringkv_members", &["state=\"up\""]), 3.0);
        assert_eq!(now.get("ringkv_admission_limit", &["limit=\"handoff.max_inflight\""]), 2.0);
        assert_eq!(now.get("ringkv_admission_effective", &["limit=\"anti_entropy.max_inflight\""]), 1.0);
    }

    let row_reads: Vec<f64> = (0..3).map(|i| d(i, "ringkv_storage_read_duration_seconds_count", &[])).collect();
    assert!(row_reads[0] >= 20.0 && row_reads[1] + row_reads[2] >= 22.0, "row reads: {row_reads:?}");

    // Other paths: the page's JSON, not found, a method other than GET.
    let (status, content_type, body) = c.http_get(0, "/api/cluster");
    assert_eq!((status, content_type.as_str()), (200, "application/json"));
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["node"], "n1");
    assert_eq!(doc["members"].as_array().map(Vec::len), Some(3));
    assert_eq!(doc["ring"]["partitions"].as_array().map(Vec::len), Some(c.partitions as usize));
    assert!(doc["history"].as_array().is_some_and(|h| !h.is_empty()), "{doc}");
    assert_eq!(c.http_get(0, "/nothing-here").0, 404);
}

#[test]
fn the_cluster_page_shows_every_member_and_the_ring_in_a_browser() {
    let Some(chromium) = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
    else {
        panic!("no chromium on this machine: apt-get install -y chromium (.ci/run installs it)");
    };
    let c = cluster_with_metrics();
    let profile = c.dir.path().join("chromium-profile");
    let url = format!("http://127.0.0.1:{}/", c.nodes[0].metrics_port);
    let (code, dom, err) = run_bounded(
        Command::new(chromium)
            .env("HOME", c.dir.path())
            .arg("--headless")
            .arg("--no-sandbox")
            .arg("--disable-gpu")
            .arg("--disable-breakpad")
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("--virtual-time-budget=5000")
            .arg("--dump-dom")
            .arg(&url),
        Duration::from_secs(120),
    );
    assert_eq!(code, Some(0), "chromium failed: {err}");
    for n in &c.nodes {
        let row = format!("<tr class=\"member\" data-id=\"{}\">", n.id);
        assert!(dom.contains(&row), "no row for {} in the page:\n{dom}", n.id);
    }
    let drawn = dom.matches("class=\"partition\"").count();
    assert_eq!(drawn, c.partitions as usize, "the ring's partitions drawn:\n{dom}");
    for n in &c.nodes {
        assert!(dom.contains(&format!("data-owner=\"{}\"", n.id)), "{} owns no partition drawn", n.id);
    }
    assert!(dom.contains("node n1's view"), "{dom}");
    assert!(dom.contains("<span id=\"error\"></span>"), "the page shows an error:\n{dom}");
}

#[test]
fn a_metrics_address_the_node_cannot_take_stops_its_start() {
    let c = Cluster::new(1, 1, 1, 1, "");
    let config = c.nodes[0].config.clone();
    let text = std::fs::read_to_string(&config).unwrap();
    let start = |extra: &str| {
        std::fs::write(&config, format!("{text}\n{extra}")).unwrap();
        run_bounded(Command::new(NODE).arg("--config").arg(&config), Duration::from_secs(30))
    };
    // Not an address: refused by the config's checks (check-config says the same).
    let (code, _, err) = start("[metrics]\nlisten = \"localhost:9100\"");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("metrics.listen"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // An address of no interface here (TEST-NET-1): exit 2, naming the key.
    let (code, _, err) = start("[metrics]\nlisten = \"192.0.2.1:9100\"");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("metrics.listen") && err.contains("192.0.2.1:9100"), "{err}");
    // A port in use: exit 5, naming the key.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (code, _, err) = start(&format!("[metrics]\nlisten = \"127.0.0.1:{port}\""));
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("metrics.listen"), "{err}");
    assert!(!c.nodes[0].data.join("ringkv.redb").exists(), "nothing opened before the listener was bound");
}
