//! The fuzz targets of ringkv's decoders: every decoder of bytes that come from the network
//! or the disk, and the config parser. Each target is one function of arbitrary bytes, with
//! the valid encodings that seed its corpus, and is written once: `tests/decoders.rs` runs
//! it on the stable toolchain over a generated and mutated corpus, and the cargo-fuzz crate
//! in `tests/fuzz/` runs the same function coverage-guided on nightly.
//!
//! A target asserts only that nothing panics and that whatever a decoder accepts round-trips
//! or satisfies its invariants (a decoded object is valid, an accepted frame re-encodes to a
//! frame that decodes to the same message, an opened store holds only readable rows, ...).

use std::collections::BTreeMap;

use base64::Engine as _;
use md5::{Digest, Md5};
use ringkv::config::Config;
use ringkv::membership::{Identity, Member, MemberState, Membership};
use ringkv::merkle::{DiffReply, DiffRequest, MerkleTree};
use ringkv::node::NodeSettings;
use ringkv::store::{
    decode_hint_row, decode_members, decode_object_row, decode_reaped_row, partition_of, seal, unseal, HintRow,
    MemEngine, MemStore, ObjectRow, ReapedRow, StoreError, StoreLimits, StoreOp, StoreOutcome, StoreState, Table,
    TreeId,
};
use ringkv::version::{split_context, Actor, ContextError, Object, VersionVector, CLOCK_ENTRIES_MAX, COUNTER_MAX};
use ringkv::wire::{
    decode_frame, decode_payload, encode_frame, AeMessage, Bytes, ClientRequest, ClientResponse, ErrorKind,
    FrameDecoder, Hello, Message, ReapStep, ReplicaReply, ReplicaRequest, WireError, FRAME_BYTES_MAX_DEFAULT,
    FRAME_HEADER_BYTES, PROTOCOL_VERSION,
};

/// A target: its name (the cargo-fuzz target's too), the function, and its seed inputs.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    pub seeds: fn() -> Vec<Vec<u8>>,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target { name: "frame", run: frame, seeds: frame_seeds },
    Target { name: "payload", run: payload, seeds: payload_seeds },
    Target { name: "frame_stream", run: frame_stream, seeds: frame_stream_seeds },
    Target { name: "context_text", run: context_text, seeds: context_text_seeds },
    Target { name: "context_bytes", run: context_bytes, seeds: context_bytes_seeds },
    Target { name: "object_row", run: object_row, seeds: object_row_seeds },
    Target { name: "object_row_body", run: object_row_body, seeds: object_row_body_seeds },
    Target { name: "hint_row", run: hint_row, seeds: hint_row_seeds },
    Target { name: "hint_row_body", run: hint_row_body, seeds: hint_row_body_seeds },
    Target { name: "reaped_row", run: reaped_row, seeds: reaped_row_seeds },
    Target { name: "reaped_row_body", run: reaped_row_body, seeds: reaped_row_body_seeds },
    Target { name: "members", run: members, seeds: members_seeds },
    Target { name: "members_body", run: members_body, seeds: members_body_seeds },
    Target { name: "store_open", run: store_open, seeds: store_open_seeds },
    Target { name: "config", run: config, seeds: config_seeds },
];

/// The frame limit the wire targets decode with: small, so length checks are exercised.
pub const FRAME_MAX: usize = 1 << 16;

/// "Now" for decoders that take the time.
const NOW_MS: u64 = 1_700_000_000_000;

// ---------------------------------------------------------------------------------------
// Wire: frames, payloads, a stream in chunks.

/// One frame at the start of `data`, as a connection reads it.
pub fn frame(data: &[u8]) {
    match decode_frame(data, FRAME_MAX) {
        Ok(Some((msg, used))) => {
            let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
            assert_eq!(data[0], PROTOCOL_VERSION);
            assert!(len <= FRAME_MAX);
            assert_eq!(used, FRAME_HEADER_BYTES + len);
            assert!(used <= data.len());
            assert_eq!(decode_payload(&data[FRAME_HEADER_BYTES..used]).as_ref(), Ok(&msg));
            check_message(&msg);
        }
        Ok(None) => {
            // Only a frame still incomplete asks for more bytes.
            if let Some(h) = data.get(1..FRAME_HEADER_BYTES) {
                let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
                assert!(data.len() < FRAME_HEADER_BYTES + len, "a whole frame is there");
            }
        }
        Err(WireError::BadVersion(v)) => assert!(v == data[0] && v != PROTOCOL_VERSION),
        Err(WireError::TooLarge { len, max }) => assert!(len > max && max == FRAME_MAX),
        Err(WireError::Malformed(_)) => {}
        Err(WireError::Truncated) => panic!("decode_frame never reports a truncated stream"),
    }
}

/// A payload (the bytes after a frame header).
pub fn payload(data: &[u8]) {
    if let Ok(msg) = decode_payload(data) {
        check_message(&msg);
    }
}

/// A stream cut into chunks, fed to a [`FrameDecoder`]: it yields exactly what decoding the
/// whole stream frame by frame yields, and the same first error. The first byte shapes the
/// chunk sizes.
pub fn frame_stream(data: &[u8]) {
    let Some((&shape, stream)) = data.split_first() else { return };
    // Reference: the whole stream at once.
    let mut expected = Vec::new();
    let mut expected_err = None;
    let mut at = 0;
    loop {
        match decode_frame(&stream[at..], FRAME_MAX) {
            Ok(Some((msg, used))) => {
                assert!(used > 0);
                at += used;
                expected.push(msg);
            }
            Ok(None) => break,
            Err(e) => {
                expected_err = Some(e);
                break;
            }
        }
    }
    // The same stream in chunks.
    let mut dec = FrameDecoder::new(FRAME_MAX);
    let mut got = Vec::new();
    let mut got_err = None;
    let mut rest = stream;
    let mut i = 0usize;
    'feed: while !rest.is_empty() {
        let size = chunk_size(shape, i).min(rest.len());
        i += 1;
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        dec.push(chunk);
        loop {
            match dec.next_message() {
                Ok(Some(msg)) => got.push(msg),
                Ok(None) => break,
                Err(e) => {
                    got_err = Some(e);
                    break 'feed;
                }
            }
        }
    }
    assert_eq!(got, expected, "a chunked stream decodes to the same messages");
    assert_eq!(got_err, expected_err, "a chunked stream fails the same way");
    if got_err.is_none() {
        let whole = at == stream.len();
        assert_eq!(dec.finish().is_ok(), whole, "finish reports exactly a partial frame left");
    }
    for msg in &got {
        check_message(msg);
    }
}

/// Chunk sizes: 1..=32 bytes in a pattern the shape byte picks, or one byte at a time.
fn chunk_size(shape: u8, i: usize) -> usize {
    if shape == 0 {
        return 1;
    }
    let x = (shape as usize).wrapping_mul(i.wrapping_mul(2654435761).wrapping_add(1)) >> 3;
    1 + x % 32
}

/// An accepted message is valid, and re-encodes to a frame that decodes to it again.
fn check_message(msg: &Message) {
    msg.validate().expect("a decoded message is valid");
    let frame = encode_frame(msg).expect("a decoded message encodes");
    let (back, used) = decode_frame(&frame, u32::MAX as usize).expect("re-encoded frame decodes").expect("whole");
    assert_eq!(used, frame.len());
    assert_eq!(&back, msg, "the message round-trips");
    assert_eq!(encode_frame(&back).ok(), Some(frame), "the encoding is stable");
}

fn b(s: &[u8]) -> Bytes {
    Bytes::from(s.to_vec())
}

/// Objects of a few shapes: values, siblings, a tombstone, a pruned clock, big counters.
fn sample_objects() -> Vec<Object> {
    let empty = VersionVector::new();
    let mut one = Object::new();
    one.update(&empty, Actor(7), Some(b"value".to_vec()), 5, 10);
    let mut siblings = one.clone();
    siblings.update(&empty, Actor(9), Some(vec![0xff; 40]), 6, 10);
    siblings.update(&empty, Actor(u64::MAX), None, 7, 10);
    let mut resolved = siblings.clone();
    resolved.update(&siblings.context(), Actor(7), Some(b"fixed".to_vec()), 8, 10);
    let mut tomb = resolved.clone();
    tomb.update(&resolved.context(), Actor(3), None, 9, 10);
    let mut high = Object::new();
    let mut ctx = VersionVector::new();
    ctx.witness(Actor(1), COUNTER_MAX - 1, 0);
    high.update(&ctx, Actor(1), Some(vec![1]), 10, 10);
    let mut pruned = Object::new();
    for i in 0..5u64 {
        let c = pruned.context();
        pruned.update(&c, Actor(100 + i), Some(vec![i as u8]), 11 + i, 3);
    }
    let reaped = Object::from_clock(tomb.clock().clone());
    vec![Object::new(), one, siblings, resolved, tomb, high, pruned, reaped]
}

fn sample_members() -> Vec<Member> {
    let m = |i: u64, state, zone: Option<&str>| Member {
        incarnation: i,
        state,
        join_seq: i + 1,
        leave_seq: matches!(state, MemberState::Leaving | MemberState::Left).then_some(i + 5),
        id: format!("n{i}"),
        addr: format!("127.0.0.1:{}", 7100 + i),
        zone: zone.map(str::to_string),
        weight: 1 + i as u32,
        signature: None,
    };
    vec![
        m(1, MemberState::Up, None),
        m(2, MemberState::Joining, Some("z1")),
        m(3, MemberState::Leaving, Some("z2")),
        m(4, MemberState::Left, None),
        Member { addr: "[::1]:7105".into(), ..m(5, MemberState::Up, Some("z1")) },
    ]
}

/// One message of every kind.
pub fn sample_messages() -> Vec<Message> {
    let objects = sample_objects();
    let o = objects[2].clone();
    let ctx = objects[3].context();
    let pairs: Vec<(Bytes, Object)> =
        objects.iter().enumerate().map(|(i, o)| (b(&[b'k', i as u8]), o.clone())).collect();
    let mut msgs = vec![
        Message::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            cluster: "dev".into(),
            node: Some("n1".into()),
            proof: b(&[1; 32]),
        }),
        Message::Hello(Hello { protocol: PROTOCOL_VERSION, cluster: String::new(), node: None, proof: b(&[]) }),
        Message::Welcome { node: "n2".into(), proof: b(&[2; 32]) },
        Message::Refused { reason: "bad proof".into() },
        Message::ClientReply {
            id: 2,
            response: ClientResponse::Values { values: vec![b(b"a"), b(b"")], context: Some(ctx.encode_context()) },
            epoch: 7,
        },
        Message::ClientReply { id: 3, response: ClientResponse::Written { context: ctx.encode_context() }, epoch: 0 },
        Message::ClientReply { id: 4, response: ClientResponse::Document { json: "{\"a\":1}".into() }, epoch: 1 },
        Message::ClientReply {
            id: 5,
            response: ClientResponse::Error { kind: ErrorKind::Overloaded, message: "busy".into() },
            epoch: u64::MAX,
        },
        Message::Replica { id: 6, request: ReplicaRequest::Read { key: b"k".to_vec() } },
        Message::Replica {
            id: 7,
            request: ReplicaRequest::Write { key: b"k".to_vec(), object: o.clone(), hint: Some("n3".into()) },
        },
        Message::Replica {
            id: 8,
            request: ReplicaRequest::Coordinate {
                key: b"k".to_vec(),
                context: ctx.clone(),
                value: Some(b"v".to_vec()),
                hint: None,
            },
        },
        Message::Replica {
            id: 9,
            request: ReplicaRequest::Forward { key: b"k".to_vec(), context: ctx.clone(), value: None, w: 2 },
        },
        Message::ReplicaReply { id: 10, reply: ReplicaReply::State(Some((o.clone(), o.digest()))) },
        Message::ReplicaReply { id: 10, reply: ReplicaReply::State(None) },
        Message::ReplicaReply { id: 11, reply: ReplicaReply::Written },
        Message::ReplicaReply { id: 12, reply: ReplicaReply::Coordinated(objects[4].clone()) },
        Message::ReplicaReply {
            id: 13,
            reply: ReplicaReply::Failed { kind: ErrorKind::Internal, message: "x".into() },
        },
        Message::ReplicaReply {
            id: 14,
            reply: ReplicaReply::Forwarded(ClientResponse::Written { context: ctx.encode_context() }),
        },
        Message::Replica { id: 6, request: ReplicaRequest::ReadDigest { key: b"k".to_vec() } },
        Message::ReplicaReply { id: 14, reply: ReplicaReply::Digest(Some(o.digest())) },
        Message::ReplicaReply { id: 14, reply: ReplicaReply::Digest(None) },
        Message::ReplicaReply { id: 14, reply: ReplicaReply::State(Some((objects[4].clone(), objects[4].digest()))) },
        Message::ReplicaReply { id: 14, reply: ReplicaReply::State(None) },
        Message::Gossip { members: sample_members(), loads: Vec::new(), namespaces: Vec::new() },
        Message::GossipReply { members: Vec::new(), loads: Vec::new(), namespaces: Vec::new() },
        Message::AntiEntropy {
            id: 15,
            msg: AeMessage::Diff {
                partition: 3,
                request: DiffRequest { level: 1, nodes: vec![(0, 1), (31, u128::MAX)] },
                ns: Vec::new(),
            },
        },
        Message::AntiEntropy {
            id: 16,
            msg: AeMessage::DiffReply { reply: DiffReply { level: 2, differing: vec![5, 1023] } },
        },
        Message::AntiEntropy { id: 17, msg: AeMessage::Push { partition: 3, objects: pairs.clone(), ns: Vec::new() } },
        Message::AntiEntropy {
            id: 18,
            msg: AeMessage::PushAck {
                reaped: vec![(
                    Bytes::from(b"k".to_vec()),
                    {
                        let mut vv = VersionVector::new();
                        vv.witness(Actor(4), 2, 1);
                        vv
                    },
                    Some([3; 16]),
                )],
            },
        },
        Message::AntiEntropy {
            id: 19,
            msg: AeMessage::Pull {
                partition: 63,
                leaves: vec![0, 7, 1023],
                after: Some(b(b"k")),
                bytes_max: 1 << 20,
                ns: Vec::new(),
            },
        },
        Message::AntiEntropy { id: 20, msg: AeMessage::Page { objects: pairs.clone(), next: Some(b(b"k9")) } },
        Message::AntiEntropy { id: 21, msg: AeMessage::Failed { message: "busy".into() } },
        Message::Handoff { id: 22, objects: pairs },
        Message::HandoffAck { id: 23, ok: true },
        Message::Reap { id: 24, step: ReapStep::Check { key: b"k".to_vec(), digest: objects[4].digest() } },
        Message::Reap { id: 25, step: ReapStep::Remove { key: b"k".to_vec(), digest: [0xab; 16] } },
        Message::ReapReply { id: 26, yes: false },
        Message::Ping { id: u64::MAX },
        Message::Pong { id: 0 },
        Message::Error { id: 27, kind: ErrorKind::BadRequest, message: "no".into() },
    ];
    let requests = vec![
        ClientRequest::Get { key: b(b"k"), r: Some(2), ns: None },
        ClientRequest::Put {
            key: b(b"k"),
            context: Some(ctx.encode_context()),
            value: Some(b(b"v")),
            w: None,
            ns: None,
        },
        ClientRequest::Put { key: b(b""), context: None, value: None, w: Some(3), ns: None },
        ClientRequest::Status,
        ClientRequest::Ring,
        ClientRequest::Partitions,
        ClientRequest::Hints,
        ClientRequest::Transfers,
        ClientRequest::Limits,
        ClientRequest::SetLimits { pairs: vec![("handoff".into(), 2), ("anti_entropy".into(), -1)] },
        ClientRequest::Leave { node: "n2".into() },
        ClientRequest::FaultBlock { peers: vec!["n1".into(), "n3".into()] },
        ClientRequest::FaultUnblock,
    ];
    msgs.extend(requests.into_iter().enumerate().map(|(i, request)| Message::Client { id: 100 + i as u64, request }));
    msgs
}

pub fn frame_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = sample_messages().iter().map(|m| encode_frame(m).unwrap()).collect();
    // A frame followed by the start of another.
    let two: Vec<u8> = seeds[0].iter().chain(&seeds[1]).copied().collect();
    seeds.push(two);
    seeds.push(vec![PROTOCOL_VERSION, 0, 0, 0, 0]);
    seeds
}

pub fn payload_seeds() -> Vec<Vec<u8>> {
    sample_messages().iter().map(|m| rmp_serde::to_vec(m).unwrap()).collect()
}

pub fn frame_stream_seeds() -> Vec<Vec<u8>> {
    let frames = frame_seeds();
    let mut seeds = Vec::new();
    for (i, shape) in [0u8, 1, 7, 200].into_iter().enumerate() {
        let mut s = vec![shape];
        for f in frames.iter().skip(i * 5).take(6) {
            s.extend(f);
        }
        seeds.push(s);
    }
    // A stream that ends inside a frame.
    let mut cut = vec![3u8];
    cut.extend(&frames[9]);
    cut.extend(&frames[10][..frames[10].len() / 2]);
    seeds.push(cut);
    seeds
}

// ---------------------------------------------------------------------------------------
// Client contexts.

/// A context as a client sends it: any text.
pub fn context_text(data: &[u8]) {
    check_context(&String::from_utf8_lossy(data));
}

/// A context's bytes (mutated valid encodings), in base64 as a client sends them.
pub fn context_bytes(data: &[u8]) {
    check_context(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data));
}

fn check_context(text: &str) {
    match VersionVector::decode_context(text, NOW_MS) {
        Ok(vv) => {
            vv.validate().expect("a decoded context is a valid clock");
            assert!(vv.len() <= CLOCK_ENTRIES_MAX);
            assert!(vv.iter().all(|(_, e)| e.timestamp_ms == NOW_MS && (1..=COUNTER_MAX).contains(&e.counter)));
            let again = vv.encode_context_from(split_context(text).1);
            assert_eq!(VersionVector::decode_context(&again, NOW_MS).as_ref(), Ok(&vv), "the context round-trips");
            // And what the node does with it: coordinate a write after it on some state.
            let mut o = Object::new();
            o.update(&VersionVector::new(), Actor(1), Some(vec![1]), 1, 10);
            if let Ok(dot) = o.next_dot(&vv, Actor(1)) {
                assert!(!vv.covers(dot), "a new dot is not already seen");
                o.apply_write(&vv, dot, Some(vec![2]), NOW_MS, 10);
                o.validate().expect("a write after a decoded context leaves a valid object");
            }
        }
        // Empty: no clock before the node a context may name.
        Err(ContextError::Empty) => assert!(split_context(text).0.trim_end_matches('=').is_empty()),
        Err(_) => {}
    }
}

fn contexts() -> Vec<VersionVector> {
    let mut out = vec![VersionVector::new()];
    for o in sample_objects() {
        out.push(o.context());
    }
    let mut wide = VersionVector::new();
    for i in 0..40u64 {
        wide.witness(Actor(i.wrapping_mul(0x9e3779b97f4a7c15)), i + 1, 0);
    }
    wide.witness(Actor(u64::MAX), COUNTER_MAX, 0);
    out.push(wide);
    out
}

pub fn context_text_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = contexts().iter().map(|c| c.encode_context().into_bytes()).collect();
    seeds.extend(contexts().iter().map(|c| c.encode_context_from(Some("n1.zone-a")).into_bytes()));
    seeds.push(b"AQ==".to_vec());
    seeds
}

pub fn context_bytes_seeds() -> Vec<Vec<u8>> {
    contexts()
        .iter()
        .map(|c| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(c.encode_context()).unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------
// Stored rows: as read from the disk, and their bodies behind a valid checksum.

/// Row bytes around an arbitrary body, in the format rows are written in: format byte 2,
/// the CRC32 of the body, the body.
pub fn row_around(body: &[u8]) -> Vec<u8> {
    let mut out = vec![2u8];
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Row bytes in the first format (still read): format byte 1, the first 8 bytes of the
/// body's MD5, the body.
pub fn row_around_md5(body: &[u8]) -> Vec<u8> {
    let digest: [u8; 16] = Md5::digest(body).into();
    let mut out = vec![1u8];
    out.extend_from_slice(&digest[..8]);
    out.extend_from_slice(body);
    out
}

/// The body of a sealed row of either format.
fn body_of(row: &[u8]) -> Vec<u8> {
    let header = if row.first() == Some(&1) { 9 } else { 5 };
    row.get(header..).unwrap_or_default().to_vec()
}

pub fn object_row(data: &[u8]) {
    check_object_row(data);
}

pub fn object_row_body(data: &[u8]) {
    check_object_row(&row_around(data));
    check_object_row(&row_around_md5(data));
}

fn check_object_row(bytes: &[u8]) {
    if let Ok(row) = decode_object_row(bytes) {
        check_object(&row.object);
        assert_eq!(decode_object_row(&seal(&row).unwrap()).as_ref(), Ok(&row), "the row round-trips");
    }
}

pub fn hint_row(data: &[u8]) {
    check_hint_row(data);
}

pub fn hint_row_body(data: &[u8]) {
    check_hint_row(&row_around(data));
}

fn check_hint_row(bytes: &[u8]) {
    if let Ok(row) = decode_hint_row(bytes) {
        check_object(&row.object);
        assert_eq!(decode_hint_row(&seal(&row).unwrap()).as_ref(), Ok(&row), "the row round-trips");
    }
}

pub fn reaped_row(data: &[u8]) {
    check_reaped_row(data);
}

pub fn reaped_row_body(data: &[u8]) {
    check_reaped_row(&row_around(data));
}

fn check_reaped_row(bytes: &[u8]) {
    if let Ok(row) = unseal::<ReapedRow>(bytes) {
        assert_eq!(unseal::<ReapedRow>(&seal(&row).unwrap()).as_ref(), Ok(&row), "the row round-trips");
    }
    // What the store reads: the record filters every later merge of its key, so what it
    // leaves must still be a valid object.
    if let Ok(row) = decode_reaped_row(bytes) {
        assert_eq!(unseal::<ReapedRow>(bytes).as_ref(), Ok(&row));
        let reaped = Object::from_clock(row.clock.clone());
        for o in sample_objects() {
            let merged = o.merge(&reaped);
            merged.validate().expect("merging a reaped record leaves a valid object");
        }
    }
}

/// What the store and the replica protocol rely on for an object they decoded.
fn check_object(o: &Object) {
    o.validate().expect("a decoded object is valid");
    assert_eq!(&o.merge(o), o, "merge is idempotent");
    assert_eq!(&o.merge(&Object::new()), o);
    assert_eq!(o.merge(&Object::new()).digest(), o.digest());
    assert!(o.descends(o));
    let encoded = rmp_serde::to_vec(o).unwrap();
    let back: Object = rmp_serde::from_slice(&encoded).unwrap();
    assert_eq!(&back, o);
    // Merging with another valid state, and coordinating a write on it, stay valid.
    for other in sample_objects().iter().take(4) {
        let m = o.merge(other);
        m.validate().expect("a merge of valid objects is valid");
        assert_eq!(m, other.merge(o), "merge commutes");
    }
    // A blind write and a read-modify-write, at the smallest prune threshold a config allows
    // and at the default.
    for threshold in [2, 10] {
        for context in [VersionVector::new(), o.context()] {
            let mut w = o.clone();
            if let Ok(dot) = w.next_dot(&context, Actor(42)) {
                w.apply_write(&context, dot, Some(b"w".to_vec()), NOW_MS, threshold);
                w.validate().expect("a coordinated write on a decoded object leaves a valid object");
            }
        }
    }
}

fn object_rows() -> Vec<ObjectRow> {
    sample_objects()
        .into_iter()
        .enumerate()
        .map(|(i, object)| {
            let digest = (i % 2 == 1).then(|| u128::from_be_bytes(object.digest()));
            ObjectRow {
                actor: (i % 2 == 0).then_some(Actor(i as u64 * 77)),
                object,
                generation: i as u64 % 3,
                stored_digest: digest,
            }
        })
        .collect()
}

fn hint_rows() -> Vec<HintRow> {
    object_rows()
        .into_iter()
        .map(|r| HintRow { written_wall_ms: NOW_MS, actor: r.actor, object: r.object, generation: r.generation })
        .collect()
}

fn reaped_rows() -> Vec<ReapedRow> {
    sample_objects()
        .into_iter()
        .enumerate()
        .map(|(i, o)| ReapedRow {
            reaped_wall_ms: NOW_MS,
            clock: o.clock().clone(),
            digest: (i % 2 == 0).then(|| o.digest()),
        })
        .collect()
}

fn sealed_all<T: serde::Serialize>(rows: &[T]) -> Vec<Vec<u8>> {
    rows.iter().map(|r| seal(r).unwrap()).collect()
}

fn bodies_all<T: serde::Serialize>(rows: &[T]) -> Vec<Vec<u8>> {
    rows.iter().map(|r| body_of(&seal(r).unwrap())).collect()
}

pub fn object_row_seeds() -> Vec<Vec<u8>> {
    sealed_all(&object_rows())
}

pub fn object_row_body_seeds() -> Vec<Vec<u8>> {
    bodies_all(&object_rows())
}

pub fn hint_row_seeds() -> Vec<Vec<u8>> {
    sealed_all(&hint_rows())
}

pub fn hint_row_body_seeds() -> Vec<Vec<u8>> {
    bodies_all(&hint_rows())
}

pub fn reaped_row_seeds() -> Vec<Vec<u8>> {
    sealed_all(&reaped_rows())
}

pub fn reaped_row_body_seeds() -> Vec<Vec<u8>> {
    bodies_all(&reaped_rows())
}

// ---------------------------------------------------------------------------------------
// The saved member table.

pub fn members(data: &[u8]) {
    check_members(data);
}

pub fn members_body(data: &[u8]) {
    check_members(&row_around(data));
}

fn check_members(bytes: &[u8]) {
    let Ok(list) = decode_members(bytes) else { return };
    assert_eq!(decode_members(&seal(&list).unwrap()).as_ref(), Ok(&list), "the table round-trips");
    // What a node does with its saved table: start from it and route by it. A bad record is
    // dropped, never merged (as gossip does).
    for me in ["n1", "n9"] {
        let identity =
            Identity { id: me.into(), addr: "127.0.0.1:7101".into(), zone: Some("z1".into()), weight: 2, signer: None };
        let mut m = Membership::new(identity, vec!["127.0.0.1:7101".into()], list.clone(), 64, 3, 1000, 0);
        for rec in m.table().iter().filter(|r| list.contains(r)) {
            rec.validate().expect("a saved record the node keeps is valid");
        }
        let view = m.view();
        if let Some(ring) = view.ring {
            assert_eq!(ring.partitions(), 64);
        }
        m.handle_tick(0, 12345, |_| true);
        while m.poll_action().is_some() {}
        // The same records gossiped by a peer.
        m.handle_gossip(1, list.clone());
        let table = m.table();
        m.handle_gossip(2, table);
        let _ = m.leave(me);
        m.mark_left(me);
        let _ = m.view();
    }
}

pub fn members_seeds() -> Vec<Vec<u8>> {
    let all = sample_members();
    // Numbers at the edge of what a record may carry.
    let big: Vec<Member> = all
        .iter()
        .map(|m| Member {
            incarnation: ringkv::membership::SEQ_MAX,
            join_seq: ringkv::membership::SEQ_MAX - 1,
            leave_seq: m.leave_seq.map(|_| ringkv::membership::SEQ_MAX),
            ..m.clone()
        })
        .collect();
    vec![
        seal(&all).unwrap(),
        seal(&all[..1].to_vec()).unwrap(),
        seal(&Vec::<Member>::new()).unwrap(),
        seal(&big).unwrap(),
    ]
}

pub fn members_body_seeds() -> Vec<Vec<u8>> {
    members_seeds().iter().map(|s| body_of(s)).collect()
}

// ---------------------------------------------------------------------------------------
// Opening a store over arbitrary rows.

/// Parse a store's rows from fuzz bytes: the first byte picks Q (1..=64), then records of
/// `[flags][table][key length][key][value length: u16 LE][value]`; flag bit 0 seals the value
/// as a row body behind a valid checksum.
fn engine_from(data: &[u8]) -> Option<(u32, MemEngine)> {
    let (&q_byte, mut rest) = data.split_first()?;
    let q = 1u32 << (q_byte % 7);
    let mut engine = MemEngine::new();
    while rest.len() >= 3 {
        let (flags, table, klen) = (rest[0], Table::ALL[rest[1] as usize % Table::ALL.len()], rest[2] as usize);
        rest = &rest[3..];
        let Some(key) = rest.get(..klen) else { break };
        rest = &rest[klen..];
        let Some(len) = rest.get(..2) else { break };
        let vlen = u16::from_le_bytes([len[0], len[1]]) as usize;
        rest = &rest[2..];
        let value = &rest[..vlen.min(rest.len())];
        rest = &rest[value.len()..];
        let value = if flags & 1 == 1 { row_around(value) } else { value.to_vec() };
        engine.poke(table, key, value);
    }
    Some((q, engine))
}

fn engine_to(q: u32, engine: &MemEngine, seal_bodies: bool) -> Vec<u8> {
    let mut out = vec![q.trailing_zeros() as u8];
    for (t, table) in Table::ALL.iter().enumerate() {
        for (k, v) in engine.rows(*table) {
            let sealed = seal_bodies && v.len() >= 5 && row_around(&v[5..]) == v;
            let v = if sealed { &v[5..] } else { v };
            if k.len() > 255 || v.len() > u16::MAX as usize {
                continue;
            }
            out.extend([sealed as u8, t as u8, k.len() as u8]);
            out.extend(k);
            out.extend((v.len() as u16).to_le_bytes());
            out.extend(v);
        }
    }
    out
}

fn object_row_key(key: &[u8], q: u32) -> Vec<u8> {
    let mut out = partition_of(key, q).to_be_bytes().to_vec();
    out.extend_from_slice(key);
    out
}

fn split_hint_row_key(row: &[u8]) -> Option<(&[u8], &str)> {
    let len = u32::from_be_bytes(row.get(..4)?.try_into().ok()?) as usize;
    let key = row.get(4..4usize.checked_add(len)?)?;
    Some((key, std::str::from_utf8(row.get(4 + len..)?).ok()?))
}

fn index_key(intended: &str, key: &[u8]) -> Vec<u8> {
    let mut out = (intended.len().min(u16::MAX as usize) as u16).to_be_bytes().to_vec();
    out.extend_from_slice(intended.as_bytes());
    out.extend_from_slice(key);
    out
}

fn rows_of(engine: &MemEngine, table: Table) -> BTreeMap<Vec<u8>, Vec<u8>> {
    engine.rows(table).map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
}

/// `StoreState::open` over arbitrary rows never panics; it fails only on an unreadable epoch
/// or actor count, and otherwise leaves exactly the readable rows (the others quarantined
/// with their bytes), an index naming exactly the readable hints, trees and counts that match
/// the rows, and a store that opens again unchanged and serves every key it holds.
pub fn store_open(data: &[u8]) {
    let Some((q, mut engine)) = engine_from(data) else { return };
    let before = engine.clone();
    let meta_ok = |k: &[u8]| before.rows(Table::Meta).all(|(rk, v)| rk != k || v.len() == 8);
    let fresh = !before.rows(Table::Meta).any(|(k, _)| k == b"epoch");
    let mut txn = engine.begin();
    let (state, report) = match StoreState::open(&mut txn, q, StoreLimits::default(), 42) {
        Ok(x) => x,
        Err(e) => {
            assert!(matches!(&e, StoreError::Corrupt { table, .. } if table == "meta"), "{e:?}");
            assert!(!meta_ok(b"epoch") || !meta_ok(b"actors"), "open failed on readable meta rows: {e:?}");
            return;
        }
    };
    txn.commit();
    assert!(meta_ok(b"epoch") && meta_ok(b"actors"));
    assert_eq!(report.fresh, fresh);

    // Exactly the readable rows remain; the others are quarantined with their bytes.
    let objects = rows_of(&engine, Table::Objects);
    let hints = rows_of(&engine, Table::Hints);
    let quarantine = rows_of(&engine, Table::Quarantine);
    let (mut moved, mut mended) = (0u64, 0u64);
    for (table, tag) in [(Table::Objects, 0u8), (Table::Hints, 1u8)] {
        for (k, v) in before.rows(table) {
            let readable = match table {
                Table::Objects => k.len() >= 4 && object_row_key(&k[4..], q) == k && decode_object_row(v).is_ok(),
                _ => split_hint_row_key(k).is_some() && decode_hint_row(v).is_ok(),
            };
            let kept = if table == Table::Objects { objects.get(k) } else { hints.get(k) };
            let digest_wrong = table == Table::Objects
                && decode_object_row(v)
                    .is_ok_and(|r| r.stored_digest.is_some_and(|d| d != u128::from_be_bytes(r.object.digest())));
            if readable && digest_wrong {
                // Written again with its object's digest, the rest as it was.
                let (was, now) = (decode_object_row(v).unwrap(), decode_object_row(kept.unwrap()).unwrap());
                assert_eq!(now.stored_digest, Some(u128::from_be_bytes(was.object.digest())));
                assert_eq!((now.actor, now.object, now.generation), (was.actor, was.object, was.generation));
                mended += 1;
            } else if readable {
                assert_eq!(kept.map(Vec::as_slice), Some(v), "a readable row stays as it was");
            } else {
                assert!(kept.is_none(), "an unreadable row is not left in place");
                let mut qk = vec![tag];
                qk.extend_from_slice(k);
                assert_eq!(quarantine.get(&qk).map(Vec::as_slice), Some(v), "an unreadable row keeps its bytes");
                moved += 1;
            }
        }
    }
    assert_eq!(report.quarantined, moved);
    assert_eq!(report.digests_mended, mended);
    assert_eq!(report.objects, objects.len() as u64);
    assert_eq!(report.hints, hints.len() as u64);
    assert_eq!(before.len(Table::Reaped), engine.len(Table::Reaped));

    // The hint index names exactly the readable hints; the counts match.
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut index = BTreeMap::new();
    for k in hints.keys() {
        let (key, intended) = split_hint_row_key(k).unwrap();
        *counts.entry(intended.to_string()).or_default() += 1;
        index.insert(index_key(intended, key), Vec::new());
    }
    assert_eq!(state.hint_counts(), &counts);
    assert_eq!(rows_of(&engine, Table::HintIndex), index);

    // The trees are those of the rows.
    let mut trees = vec![MerkleTree::new(); q as usize];
    for (k, v) in &objects {
        trees[partition_of(&k[4..], q) as usize].insert(&k[4..], &decode_object_row(v).unwrap().object.digest());
    }
    for (p, t) in trees.iter().enumerate() {
        assert_eq!(state.tree(p as u32), Some(t), "the tree of partition {p}");
    }

    // Opening again finds nothing to quarantine and changes nothing.
    let after = engine.clone();
    let mut txn = engine.begin();
    let (state2, report2) = StoreState::open(&mut txn, q, StoreLimits::default(), 43).expect("a store reopens");
    txn.commit();
    assert_eq!(
        (report2.objects, report2.hints, report2.quarantined, report2.fresh),
        (report.objects, report.hints, 0, false)
    );
    assert_eq!(engine, after, "reopening changes nothing");
    assert_eq!(state2.hint_counts(), state.hint_counts());

    // Every key it holds can be served: read, paged, handed off.
    let mut store = MemStore { engine, state };
    let quarantined = store.engine.len(Table::Quarantine);
    let mut ops: Vec<StoreOp> = objects.keys().map(|k| StoreOp::Read { key: k[4..].to_vec() }).collect();
    ops.extend(hints.keys().map(|k| StoreOp::Read { key: split_hint_row_key(k).unwrap().0.to_vec() }));
    ops.extend((0..q).map(|partition| StoreOp::Page {
        tree: TreeId::default_of(partition),
        leaves: None,
        after: None,
        bytes_max: 1 << 20,
    }));
    ops.extend(counts.keys().map(|i| StoreOp::HintPage { intended: i.clone(), after: None, bytes_max: 1 << 20 }));
    for out in store.run_batch(ops) {
        match out {
            Ok(StoreOutcome::State(o)) => assert!(o.is_some()),
            Ok(StoreOutcome::Page { .. } | StoreOutcome::Hints { .. }) => {}
            other => panic!("an opened store fails to serve what it holds: {other:?}"),
        }
    }
    // Reaped records are read lazily, so a write may still quarantine one; nothing else goes.
    let reaped_before = store.engine.len(Table::Reaped);
    let ops: Vec<StoreOp> = objects
        .keys()
        .take(8)
        .map(|k| StoreOp::Coordinate {
            key: k[4..].to_vec(),
            context: VersionVector::new(),
            value: Some(b"x".to_vec()),
            hint: None,
            now_wall_ms: NOW_MS,
        })
        .collect();
    for out in store.run_batch(ops) {
        assert!(matches!(out, Ok(StoreOutcome::Coordinated(_))), "{out:?}");
    }
    let newly = store.engine.len(Table::Quarantine) - quarantined;
    assert_eq!(newly, reaped_before - store.engine.len(Table::Reaped), "only unreadable reaped records go");
}

pub fn store_open_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for q in [1u32, 16, 64] {
        let mut s = MemStore::new(q, StoreLimits::default(), 7);
        let objects = sample_objects();
        for i in 0..6u8 {
            let key = vec![b'k', i];
            let op = |hint: Option<&str>| StoreOp::Coordinate {
                key: key.clone(),
                context: VersionVector::new(),
                value: Some(vec![i; 3]),
                hint: hint.map(str::to_string),
                now_wall_ms: 5,
            };
            s.run(op(None)).unwrap();
            if i % 2 == 0 {
                s.run(op(Some("n2"))).unwrap();
            }
            s.run(StoreOp::Write { key: vec![b'h', i], object: objects[2].clone(), hint: Some("n3".into()) }).unwrap();
        }
        // A reaped key.
        let del = StoreOp::Coordinate {
            key: b"gone".to_vec(),
            context: VersionVector::new(),
            value: None,
            hint: None,
            now_wall_ms: 5,
        };
        if let Ok(StoreOutcome::Coordinated(Ok(tomb))) = s.run(del) {
            s.run(StoreOp::ReapRemove { key: b"gone".to_vec(), digest: tomb.digest() }).unwrap();
        }
        s.run(StoreOp::SaveMembers { members: sample_members() }).unwrap();
        seeds.push(engine_to(q, &s.engine, false));
        seeds.push(engine_to(q, &s.engine, true));
    }
    seeds
}

// ---------------------------------------------------------------------------------------
// The config parser.

/// A config file's text: an accepted config is valid, round-trips through TOML, and makes a
/// node whose own member record passes the checks peers apply to it.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(c) = Config::parse(&text) else { return };
    c.validate().expect("an accepted config is valid");
    let again = toml::to_string(&c).expect("an accepted config serializes");
    assert_eq!(Config::parse(&again).as_ref(), Ok(&c), "the config round-trips:\n{again}");
    let settings = NodeSettings::from_config(&c);
    let me = Member {
        incarnation: 0,
        state: MemberState::Up,
        join_seq: 1,
        leave_seq: None,
        id: settings.identity.id.clone(),
        addr: settings.identity.addr.clone(),
        zone: settings.identity.zone.clone(),
        weight: settings.identity.weight,
        signature: None,
    };
    me.validate().expect("the node's own member record is valid");
    assert_eq!(c.listen_addr().to_string().parse::<std::net::SocketAddr>().ok(), c.node.listen.parse().ok());
    assert_eq!(c.seed_addrs().len(), c.node.seeds.len());
    let frame_max = c.frame_bytes_max();
    assert!(frame_max >= FRAME_BYTES_MAX_DEFAULT && frame_max <= u32::MAX as usize, "frames fit the length field");
    assert!(frame_max as u64 >= 2 * c.limits.object_bytes_max, "a frame holds two objects at their limit");
    // A coordinated write's clock keeps at most max(threshold, live siblings) entries: it
    // must stay within what the decoders accept.
    assert!(
        c.cluster.clock_prune_threshold as usize <= CLOCK_ENTRIES_MAX
            && c.limits.max_siblings as usize <= CLOCK_ENTRIES_MAX,
        "clocks of coordinated writes stay within what the decoders accept"
    );
}

pub fn config_seeds() -> Vec<Vec<u8>> {
    let files = [
        include_str!("../../config/node.toml"),
        include_str!("../../config/cluster/n1.toml"),
        include_str!("../../config/cluster/n2.toml"),
        include_str!("../../config/cluster/n3.toml"),
    ];
    let mut seeds: Vec<Vec<u8>> = files.iter().map(|f| f.as_bytes().to_vec()).collect();
    // Every key written out, so mutations reach every one.
    let mut full = Config::parse(files[1]).unwrap();
    full.node.zone = Some("z1".into());
    seeds.push(toml::to_string(&full).unwrap().into_bytes());
    full.cluster.secret = None;
    full.cluster.secret_file = Some("secret.txt".into());
    seeds.push(toml::to_string(&full).unwrap().into_bytes());
    // Values at their limits.
    full.node.zone = Some("z".repeat(64));
    full.node.id = "n".repeat(64);
    full.node.weight = 1000;
    full.cluster.clock_prune_threshold = CLOCK_ENTRIES_MAX as u32;
    full.limits.max_siblings = CLOCK_ENTRIES_MAX as u32;
    full.limits.object_bytes_max = ringkv::config::OBJECT_BYTES_LIMIT;
    full.limits.max_value_bytes = ringkv::config::VALUE_BYTES_LIMIT;
    seeds.push(toml::to_string(&full).unwrap().into_bytes());
    seeds
}
