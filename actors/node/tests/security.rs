//! Identities and roles on real node processes: mutual TLS with a cluster CA, the role a
//! client's certificate holds enforced by the node for every message, no client acting as a
//! node, and member records that cannot be forged into the ring.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{wait_until, Cluster};
use ringkv::access::Role;
use ringkv::membership::{Member, MemberState};
use ringkv::version::VersionVector;
use ringkv::wire::{Bytes, ErrorKind, Message, ReplicaRequest};
use ringkv_transport::{connect, endpoint, link_writer, read_streams, Auth, Credentials, NetError};

fn code(out: &std::process::Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn tls_cluster() -> Cluster {
    let mut c = Cluster::new(3, 3, 2, 2, "");
    c.use_tls();
    c.start_all();
    c.wait_settled(&[0, 1, 2], Duration::from_secs(30));
    c
}

fn status_members(c: &Cluster, config: &std::path::Path) -> Vec<(String, String)> {
    let out = c.cli_with(config, &["status"], None);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    doc["members"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    let field = |k: &str| m[k].as_str().unwrap_or("").to_string();
                    (field("id"), format!("{} {}", field("addr"), field("state")))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn each_role_does_what_it_may_and_is_refused_the_rest() {
    let c = tls_cluster();
    let admin = c.client_file("ops", Role::Admin);
    let reader = c.client_file("reader", Role::Read);
    let writer = c.client_file("app", Role::Write);

    let out = c.cli_with(&admin, &["put", "k", "v1"], None);
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    // read: get, status and ring; not put or delete.
    let out = c.cli_with(&reader, &["get", "k"], None);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(code(&c.cli_with(&reader, &["status"], None)), 0);
    assert_eq!(code(&c.cli_with(&reader, &["ring"], None)), 0);
    let out = c.cli_with(&reader, &["put", "k", "by-reader"], None);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("write role"), "the refusal names the role needed: {}", stderr(&out));
    assert_eq!(code(&c.cli_with(&reader, &["delete", "k"], None)), 4);

    // write: also put; not the admin commands.
    let out = c.cli_with(&writer, &["put", "k2", "by-writer"], None);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = c.cli_with(&writer, &["admin", "leave", "n3"], None);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("admin role"), "{}", stderr(&out));
    assert_eq!(code(&c.cli_with(&writer, &["admin", "limits", "set", "handoff.max_inflight=5"], None)), 4);
    assert_eq!(code(&c.cli_with(&writer, &["admin", "partitions"], None)), 4);

    // Nothing the refused commands asked for happened.
    assert_eq!(c.values(0, "k"), Some(vec!["v1".to_string()]));
    let limits = c.json(0, &["admin", "limits"]).1;
    assert_ne!(limits["handoff.max_inflight"], 5, "{limits}");
    assert!(status_members(&c, &admin).iter().all(|(id, _)| ["n1", "n2", "n3"].contains(&id.as_str())));

    // admin: everything.
    let out = c.cli_with(&admin, &["admin", "limits", "set", "handoff.max_inflight=5"], None);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(code(&c.cli_with(&admin, &["admin", "partitions"], None)), 0);
    // With certificates only n3 may change n3's record: the leave goes to n3 itself.
    let out = c.cli_with(&admin, &["admin", "leave", "n3"], None);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("send `admin leave n3` to n3"), "{}", stderr(&out));
    let n3 = format!("127.0.0.1:{}", c.nodes[2].port);
    let out = c.cli_with(&admin, &["--node", &n3, "admin", "leave", "n3"], None);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(wait_until(Duration::from_secs(10), || {
        let doc = c.json(0, &["status"]).1;
        doc["members"].as_array().is_some_and(|ms| ms.iter().any(|m| m["id"] == "n3" && m["state"] != "up"))
    }));
    // The node's operator, with the node's own config, may do what an admin does.
    assert_eq!(c.json(0, &["admin", "limits"]).0, 0);
}

#[test]
fn certificates_from_another_ca_or_for_another_node_are_refused() {
    let mut c = Cluster::new(4, 3, 2, 2, "");
    c.use_tls();
    for i in 0..3 {
        c.start(i);
    }
    c.wait_settled(&[0, 1, 2], Duration::from_secs(30));

    // A client certificate of another CA: refused, exit 4, nothing stored.
    let other = c.dir.path().join("other-ca");
    ringkv_transport::pki::create_ca(&other).unwrap();
    ringkv_transport::pki::create_client(&other, "mallory", Role::Admin).unwrap();
    for f in ["mallory.crt", "mallory.key"] {
        std::fs::copy(other.join(f), c.certs().join(f)).unwrap();
    }
    let foreign = c.client_file_for("mallory", &other.join("ca.crt"));
    let out = c.cli_with(&foreign, &["put", "foreign", "x"], None);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert_eq!(c.values(0, "foreign"), Some(vec![]), "not found");
    let logs = c.logs();
    assert!(logs.contains("refused a connection"), "the node logs the refusal");

    // Node n4's config with n2's certificate: it refuses to start (exit 2, naming tls.cert) ...
    let n4 = c.nodes[3].config.clone();
    let text = std::fs::read_to_string(&n4).unwrap().replace("n4.crt", "n2.crt").replace("n4.key", "n2.key");
    std::fs::write(&n4, text).unwrap();
    let out = std::process::Command::new(common::NODE).arg("--config").arg(&n4).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("tls.cert"), "{}", stderr(&out));

    // ... and a peer that holds n2's certificate but claims to be n4 is refused by the
    // cluster, and n4 never becomes a member.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let certs = c.certs();
        let tls = ringkv_transport::pki::Tls::load(&certs.join("ca.crt"), &certs.join("n2.crt"), &certs.join("n2.key"))
            .unwrap();
        let creds = Credentials { cluster: "test".into(), auth: Auth::Tls(tls), node: Some("n4".into()) };
        let ep = endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", c.nodes[0].port).parse().unwrap();
        match connect(&ep, addr, &creds, None).await {
            Err(NetError::Refused(reason)) => assert!(reason.contains("n2"), "{reason}"),
            other => panic!("expected a refusal, got {:?}", other.map(|(_, n)| n)),
        }
        // Dialling n1's address expecting n2: the answer's certificate is n1's.
        let creds = Credentials { node: Some("n2".into()), ..creds };
        match connect(&ep, addr, &creds, Some("n2")).await {
            Err(NetError::WrongNode { got, .. }) => assert_eq!(got, "n1"),
            other => panic!("expected the wrong node, got {:?}", other.map(|(_, n)| n)),
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    let ids: Vec<String> = status_members(&c, &c.nodes[0].config).into_iter().map(|(id, _)| id).collect();
    assert!(!c.logs().contains("panicked"));
    assert_eq!(ids, vec!["n1", "n2", "n3"]);
}

/// Send node-to-node messages on a client connection; the answers that came back.
async fn send_as(creds: &Credentials, addr: SocketAddr, msgs: Vec<Message>) -> Vec<Message> {
    let ep = endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let (conn, _) = connect(&ep, addr, creds, None).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(read_streams(conn.clone(), 1 << 20, move |m| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(m).await;
        }
    }));
    let link = link_writer(conn.clone(), 1 << 20);
    let n = msgs.len();
    for m in msgs {
        link.send(&m).await.unwrap();
    }
    let mut answers = Vec::new();
    // One deadline for all the answers: the node's own requests keep arriving meanwhile.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while answers.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(m)) if is_answer(&m) => answers.push(m),
            // The node's own requests to the node we speak as (a failure detector's ping on
            // this connection, say) are not answers to ours.
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    answers
}

/// Whether a message answers a request (rather than being a request of its own).
fn is_answer(m: &Message) -> bool {
    matches!(
        m,
        Message::ClientReply { .. }
            | Message::ReplicaReply { .. }
            | Message::GossipReply { .. }
            | Message::HandoffAck { .. }
            | Message::ReapReply { .. }
            | Message::Pong { .. }
            | Message::Error { .. }
            | Message::Refused { .. }
    )
}

/// A forged table: n2 at another address with a higher incarnation, a weight-0 record and one
/// with an empty id.
fn forged_members(c: &Cluster) -> Vec<Member> {
    let record = |id: &str, addr: String, weight: u32| Member {
        incarnation: 1000,
        state: MemberState::Up,
        join_seq: 2,
        leave_seq: None,
        id: id.to_string(),
        addr,
        zone: None,
        weight,
        signature: None,
    };
    vec![
        record("n2", "127.0.0.1:9".to_string(), 1),
        record("n3", format!("127.0.0.1:{}", c.nodes[2].port), 0),
        record("", "127.0.0.1:9".to_string(), 1),
    ]
}

fn node_to_node_messages(c: &Cluster) -> Vec<Message> {
    vec![
        Message::Gossip { members: forged_members(c), loads: vec![], namespaces: Vec::new() },
        Message::Replica {
            id: 11,
            request: ReplicaRequest::Coordinate {
                key: b"planted".to_vec(),
                context: VersionVector::new(),
                value: Some(b"by a client".to_vec()),
                hint: None,
            },
        },
        Message::Handoff { id: 12, objects: vec![(Bytes::from(b"planted2".to_vec()), ringkv::version::Object::new())] },
    ]
}

#[test]
fn a_client_cannot_act_as_a_node() {
    let c = tls_cluster();
    let before = status_members(&c, &c.nodes[0].config);
    let writer = c.client_file("app", Role::Write);
    let setup = ringkv_transport::load_client(&writer).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let answers = rt.block_on(send_as(&setup.creds, setup.nodes[0], node_to_node_messages(&c)));
    assert_eq!(answers.len(), 3, "every message was answered: {answers:?}");
    for a in &answers {
        assert!(
            matches!(a, Message::Error { kind: ErrorKind::Refused, message, .. } if message.contains("node-to-node")),
            "{a:?}"
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(status_members(&c, &c.nodes[0].config), before, "the member table is unchanged");
    assert_eq!(c.values(0, "planted"), Some(vec![]), "not found");
    assert_eq!(c.values(0, "planted2"), Some(vec![]), "not found");
}

#[test]
fn a_node_cannot_change_another_nodes_record() {
    let c = tls_cluster();
    let before = status_members(&c, &c.nodes[2].config);
    let certs = c.certs();
    let tls =
        ringkv_transport::pki::Tls::load(&certs.join("ca.crt"), &certs.join("n1.crt"), &certs.join("n1.key")).unwrap();
    // n1's key signs a record that says n2 left (which n2 could not undo: a departed member
    // stays departed); and the same record unsigned.
    let mut moved = Member {
        state: MemberState::Left,
        leave_seq: Some(100),
        addr: format!("127.0.0.1:{}", c.nodes[1].port),
        ..forged_members(&c).remove(0)
    };
    let unsigned = moved.clone();
    moved.signature = ringkv::membership::RecordSigner::sign(&tls, &moved.signed_content());
    assert!(moved.signature.is_some());
    let creds = Credentials { cluster: "test".into(), auth: Auth::Tls(tls), node: Some("n1".into()) };
    let addr: SocketAddr = format!("127.0.0.1:{}", c.nodes[2].port).parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let answers = rt.block_on(send_as(
        &creds,
        addr,
        vec![Message::Gossip { members: vec![moved, unsigned], loads: vec![], namespaces: Vec::new() }],
    ));
    assert!(matches!(answers.first(), Some(Message::GossipReply { .. })), "n1 may gossip: {answers:?}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(status_members(&c, &c.nodes[2].config), before, "n2's record is unchanged on n3");
    assert_eq!(c.values(2, "k-after"), Some(vec![]));
    assert_eq!(code(&c.cli(2, &["put", "k-after", "v"])), 0);
}

#[test]
fn invalid_gossip_records_change_nothing() {
    // Secret-only mode: whoever holds the secret may speak as a node; even so, records that
    // would make the ring uncomputable are dropped.
    let mut c = Cluster::new(3, 3, 2, 2, "");
    c.start_all();
    c.wait_settled(&[0, 1, 2], Duration::from_secs(30));
    let before = status_members(&c, &c.nodes[0].config);
    let creds = Credentials::secret("test", c.secret.as_bytes().to_vec(), Some("n9".to_string()));
    let addr: SocketAddr = format!("127.0.0.1:{}", c.nodes[0].port).parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut bad = forged_members(&c);
    bad.remove(0); // keep only the weight-0 and empty-id records
    bad.push(Member { incarnation: u64::MAX, ..bad[0].clone() });
    rt.block_on(send_as(&creds, addr, vec![Message::Gossip { members: bad, loads: vec![], namespaces: Vec::new() }]));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(status_members(&c, &c.nodes[0].config), before);
    let (rc, ring) = c.json(0, &["ring"]);
    assert_eq!(rc, 0);
    assert_eq!(ring["partitions"].as_array().map(Vec::len), Some(16));
    assert!(wait_until(Duration::from_secs(5), || c.cli(0, &["put", "after", "x"]).status.success()));
}
