//! The wire format: every message nodes and clients exchange, as one serde enum in
//! MessagePack (rmp-serde), carried in length-prefixed frames.
//!
//! A frame is `[PROTOCOL_VERSION: u8][length: u32 big-endian][payload: length bytes]`. The
//! decoder checks the version and the length against a maximum before it buffers anything,
//! and a payload that is not a valid message is an error value: random, truncated or
//! oversized bytes never panic and never allocate more than the limit.
//!
//! The message set follows the paper's roles: client requests to any node; the replica
//! protocol a coordinator speaks with the preference list (§4.5, with hints for sloppy
//! quorum §4.6); membership gossip (§4.8); Merkle exchanges for anti-entropy (§4.7).

use serde::{Deserialize, Serialize};

use crate::load_balance::LoadStat;
use crate::membership::Member;
use crate::merkle::{DiffReply, DiffRequest};
use crate::namespace::Namespace;
use crate::ring::NodeId;
use crate::version::{Object, VersionVector};

/// The protocol version every frame starts with.
pub const PROTOCOL_VERSION: u8 = 2;
/// Bytes before the payload: version and length.
pub const FRAME_HEADER_BYTES: usize = 5;
/// Default maximum payload of one frame.
pub const FRAME_BYTES_MAX_DEFAULT: usize = 16 * 1024 * 1024;

/// A byte string (keys, values): MessagePack bin, not an array of integers.
pub type Bytes = serde_bytes::ByteBuf;

/// Why bytes could not be read as a message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame has protocol version {0}, this node speaks {PROTOCOL_VERSION}")]
    BadVersion(u8),
    #[error("frame of {len} bytes is over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("stream ended inside a frame")]
    Truncated,
}

/// How a request failed, as clients see it (the CLI maps these to exit codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Malformed request, oversized value, bad context, bad parameter (exit 2).
    BadRequest,
    /// The quorum was not reached in time (exit 3).
    Unavailable,
    /// Authentication failed or the operation is not permitted (exit 4).
    Refused,
    /// Too many requests in flight; try again (exit 3).
    Overloaded,
    /// Anything else (exit 5).
    Internal,
}

/// First message on every connection, from the side that opened it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u8,
    pub cluster: String,
    /// The connecting node's id; None for a client.
    pub node: Option<NodeId>,
    /// Proof of the cluster secret bound to this TLS session.
    pub proof: Bytes,
}

/// A client's request to any node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    Get {
        key: Bytes,
        r: Option<u8>,
        /// The namespace (None: the default one). Absent from earlier versions' frames.
        #[serde(default)]
        ns: Option<String>,
    },
    /// `value` None writes a tombstone (delete). `context` is the client's opaque context.
    Put {
        key: Bytes,
        context: Option<String>,
        value: Option<Bytes>,
        w: Option<u8>,
        #[serde(default)]
        ns: Option<String>,
    },
    Status,
    Ring,
    Partitions,
    Hints,
    Limits,
    SetLimits {
        pairs: Vec<(String, i64)>,
    },
    Leave {
        node: NodeId,
    },
    FaultBlock {
        peers: Vec<NodeId>,
    },
    FaultUnblock,
    /// Define a namespace cluster-wide (`resolution`: siblings or lww). Without N: the
    /// cluster's; without R or W: a majority of N; without a resolution: siblings.
    NamespaceCreate {
        name: String,
        n: Option<u8>,
        r: Option<u8>,
        w: Option<u8>,
        resolution: Option<String>,
    },
    /// Change a namespace's R and/or W.
    NamespaceSet {
        name: String,
        r: Option<u8>,
        w: Option<u8>,
    },
    /// The cluster's namespaces, as JSON.
    Namespaces,
    /// What this node's hinted handoff and partition transfers hold and have moved, as JSON
    /// (`admin transfers`).
    Transfers,
}

/// A node's answer to a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientResponse {
    /// Values of a get (empty when not found) and the context to write back with.
    Values {
        values: Vec<Bytes>,
        context: Option<String>,
    },
    /// A put or delete was acknowledged by W replicas.
    Written {
        context: String,
    },
    /// An admin answer, as a JSON document the CLI prints.
    Document {
        json: String,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

/// What a coordinator asks a replica to do (Dynamo §4.5-4.6).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaRequest {
    /// The replica's state of a key: its owned and hinted copies merged.
    Read {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Merge this state; with `hint`, keep it for that node (a sloppy-quorum fallback).
    Write {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        object: Object,
        hint: Option<NodeId>,
    },
    /// Apply a client's write here under a new version, and answer with the result.
    Coordinate {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        context: VersionVector,
        #[serde(with = "serde_bytes")]
        value: Option<Vec<u8>>,
        hint: Option<NodeId>,
    },
    /// Run a whole put here: sent by a node that is not among the key's targets.
    Forward {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        context: VersionVector,
        #[serde(with = "serde_bytes")]
        value: Option<Vec<u8>>,
        w: u8,
    },
    /// Only the digest of what `Read` would answer: a get reads one replica in full and
    /// the others by digest, and fetches in full only a replica whose digest differs.
    ReadDigest {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
}

impl ReplicaRequest {
    pub fn key(&self) -> &[u8] {
        match self {
            ReplicaRequest::Read { key }
            | ReplicaRequest::ReadDigest { key }
            | ReplicaRequest::Write { key, .. }
            | ReplicaRequest::Coordinate { key, .. }
            | ReplicaRequest::Forward { key, .. } => key,
        }
    }
}

/// A replica's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaReply {
    /// A write is merged and as durable as the replica's storage mode makes writes.
    Written,
    /// A coordinated write: the new state to replicate.
    Coordinated(Object),
    /// The replica could not or would not carry out the request.
    Failed { kind: ErrorKind, message: String },
    /// The answer to a forwarded put.
    Forwarded(ClientResponse),
    /// A digest read: the digest of the replica's state, None when it holds nothing.
    Digest(Option<[u8; 16]>),
    /// A read: the replica's state and its digest, None when it holds nothing.
    State(Option<(Object, [u8; 16])>),
}

/// Anti-entropy (Dynamo §4.7): the steps of a Merkle exchange between two replicas of a
/// partition, initiator first. After the diff, the initiator pushes its objects in the
/// differing leaves page by page, then pulls the responder's, page by page; every page is
/// bounded in bytes and resumes after a key (a cursor), so no partition is too big to repair.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AeMessage {
    Diff {
        partition: u32,
        request: DiffRequest,
        /// The namespace's store-key prefix: which of the partition's trees (empty: the
        /// default namespace's; absent from earlier versions' frames).
        #[serde(default, with = "serde_bytes")]
        ns: Vec<u8>,
    },
    DiffReply {
        reply: DiffReply,
    },
    /// Merge these objects of `partition`.
    Push {
        partition: u32,
        objects: Vec<(Bytes, Object)>,
        #[serde(default, with = "serde_bytes")]
        ns: Vec<u8>,
    },
    /// The push is merged. `reaped` names pushed keys whose tombstone the responder reaped
    /// (its reaped record's clock and digest covered everything pushed): the initiator,
    /// which missed that reaping, adopts the records and drops what they cover.
    PushAck {
        reaped: Vec<(Bytes, VersionVector, Option<[u8; 16]>)>,
    },
    /// A page of the responder's objects of `partition` in `leaves`, after key `after`,
    /// of at most `bytes_max` bytes (one larger object travels alone).
    Pull {
        partition: u32,
        leaves: Vec<u32>,
        after: Option<Bytes>,
        bytes_max: u32,
        #[serde(default, with = "serde_bytes")]
        ns: Vec<u8>,
    },
    /// A page; `next` is the cursor to pull from next, None at the end.
    Page {
        objects: Vec<(Bytes, Object)>,
        next: Option<Bytes>,
    },
    /// The responder could not serve a step.
    Failed {
        message: String,
    },
}

/// Tombstone reaping: one step for one replica of a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReapStep {
    /// Do you hold exactly this state of the key?
    Check {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        digest: [u8; 16],
    },
    /// Remove the key if you still hold exactly this state.
    Remove {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        digest: [u8; 16],
    },
}

/// One message, any direction. Requests carry an id chosen by their sender; the answer
/// carries the same id, so many requests can share one stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    Hello(Hello),
    /// The acceptor's answer to `Hello`, with its own proof of the secret.
    Welcome {
        node: NodeId,
        proof: Bytes,
    },
    Refused {
        reason: String,
    },

    Client {
        id: u64,
        request: ClientRequest,
    },
    ClientReply {
        id: u64,
        response: ClientResponse,
        /// The ring epoch the answering node knows (0 when it has none or does not say): a
        /// client routing by an older view learns the ring again. Absent from the frames of
        /// earlier versions, read as 0.
        #[serde(default)]
        epoch: u64,
    },

    /// Coordinator to replica (Dynamo §4.5): read, merge, coordinate or forward.
    Replica {
        id: u64,
        request: ReplicaRequest,
    },
    ReplicaReply {
        id: u64,
        reply: ReplicaReply,
    },

    /// Gossip (push): the sender's member table; answered with `GossipReply` (pull). With
    /// them, the request loads the sender knows (absent from earlier versions' frames).
    Gossip {
        members: Vec<Member>,
        #[serde(default)]
        loads: Vec<LoadStat>,
        /// The namespaces the sender knows (absent from earlier versions' frames).
        #[serde(default)]
        namespaces: Vec<Namespace>,
    },
    GossipReply {
        members: Vec<Member>,
        #[serde(default)]
        loads: Vec<LoadStat>,
        #[serde(default)]
        namespaces: Vec<Namespace>,
    },

    /// Anti-entropy (Dynamo §4.7): one step of an exchange, and its answer.
    AntiEntropy {
        id: u64,
        msg: AeMessage,
    },
    /// Hinted handoff or partition transfer: merge these objects as owned data, durably.
    Handoff {
        id: u64,
        objects: Vec<(Bytes, Object)>,
    },
    HandoffAck {
        id: u64,
        ok: bool,
    },
    /// Tombstone reaping: check or remove one key's tombstone; `yes` answers.
    Reap {
        id: u64,
        step: ReapStep,
    },
    ReapReply {
        id: u64,
        yes: bool,
    },

    /// A probe of liveness and its answer.
    Ping {
        id: u64,
    },
    Pong {
        id: u64,
    },
    /// The answer to bytes that are not a message.
    Error {
        id: u64,
        kind: ErrorKind,
        message: String,
    },
}

impl Message {
    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome { .. } => "welcome",
            Message::Refused { .. } => "refused",
            Message::Client { .. } => "client",
            Message::ClientReply { .. } => "client-reply",
            Message::Replica { .. } => "replica",
            Message::ReplicaReply { .. } => "replica-reply",
            Message::Gossip { .. } => "gossip",
            Message::GossipReply { .. } => "gossip-reply",
            Message::AntiEntropy { .. } => "anti-entropy",
            Message::Handoff { .. } => "handoff",
            Message::HandoffAck { .. } => "handoff-ack",
            Message::Reap { .. } => "reap",
            Message::ReapReply { .. } => "reap-reply",
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
            Message::Error { .. } => "error",
        }
    }
}

impl Message {
    /// Check what serde cannot: every object and clock inside is well formed (counters in
    /// range, siblings ordered and covered by their clock). The decoder refuses anything
    /// else, so no crafted frame reaches the version rules.
    pub fn validate(&self) -> Result<(), WireError> {
        let bad = |e: crate::version::VersionError| WireError::Malformed(e.to_string());
        let objects = |list: &[(Bytes, Object)]| list.iter().try_for_each(|(_, o)| o.validate());
        match self {
            Message::Replica { request, .. } => match request {
                ReplicaRequest::Read { .. } | ReplicaRequest::ReadDigest { .. } => Ok(()),
                ReplicaRequest::Write { object, .. } => object.validate(),
                ReplicaRequest::Coordinate { context, .. } | ReplicaRequest::Forward { context, .. } => {
                    context.validate()
                }
            },
            Message::ReplicaReply {
                reply: ReplicaReply::State(Some((o, _))) | ReplicaReply::Coordinated(o), ..
            } => o.validate(),
            Message::AntiEntropy { msg: AeMessage::PushAck { reaped }, .. } => {
                reaped.iter().try_for_each(|(_, clock, _)| clock.validate())
            }
            Message::Handoff { objects: list, .. }
            | Message::AntiEntropy {
                msg: AeMessage::Push { objects: list, .. } | AeMessage::Page { objects: list, .. },
                ..
            } => objects(list),
            _ => Ok(()),
        }
        .map_err(bad)
    }
}

/// The encoded size of a message's frame, for byte budgets.
pub fn frame_bytes(msg: &Message) -> usize {
    encode_frame(msg).map_or(usize::MAX, |f| f.len())
}

/// Encoded bytes of one (key, object) pair in a batch, for byte budgets: the object's
/// encoding plus the key and a little framing.
pub fn entry_bytes(key: &[u8], object: &Object) -> usize {
    rmp_serde::to_vec(object).map_or(usize::MAX, |v| v.len()).saturating_add(key.len() + 8)
}

/// A cheap bound on the bytes a batch of (key, object) pairs moves, for pacing background
/// work by its byte rate (no encoding, unlike [`entry_bytes`]).
pub fn batch_bytes_bound<K: AsRef<[u8]>>(entries: &[(K, Object)]) -> u64 {
    entries.iter().map(|(k, o)| (k.as_ref().len() + o.size_bytes()) as u64).sum()
}

/// Room a frame's encoding starts with.
const FRAME_BYTES_GUESS: usize = 512;

/// Encode one message as a frame.
pub fn encode_frame(msg: &Message) -> Result<Vec<u8>, WireError> {
    // Room most frames fit in, so that encoding does not grow the buffer step by step.
    let mut out = Vec::with_capacity(FRAME_BYTES_GUESS);
    out.extend_from_slice(&[PROTOCOL_VERSION, 0, 0, 0, 0]);
    rmp_serde::encode::write(&mut out, msg).map_err(|e| WireError::Malformed(e.to_string()))?;
    let len = out.len() - FRAME_HEADER_BYTES;
    let len32 = u32::try_from(len).map_err(|_| WireError::TooLarge { len, max: u32::MAX as usize })?;
    out[1..5].copy_from_slice(&len32.to_be_bytes());
    Ok(out)
}

/// Read the header of a frame: its payload length, checked against `max`.
pub fn frame_length(header: &[u8; FRAME_HEADER_BYTES], max: usize) -> Result<usize, WireError> {
    if header[0] != PROTOCOL_VERSION {
        return Err(WireError::BadVersion(header[0]));
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decode a payload (the bytes after a frame header).
pub fn decode_payload(payload: &[u8]) -> Result<Message, WireError> {
    let msg: Message = rmp_serde::from_slice(payload).map_err(|e| WireError::Malformed(e.to_string()))?;
    msg.validate()?;
    Ok(msg)
}

/// Decode one whole frame from the start of `bytes`: the message and the bytes it used, or
/// `Ok(None)` when more bytes are needed.
pub fn decode_frame(bytes: &[u8], max: usize) -> Result<Option<(Message, usize)>, WireError> {
    let Some(header) = bytes.get(..FRAME_HEADER_BYTES) else { return Ok(None) };
    let mut h = [0u8; FRAME_HEADER_BYTES];
    h.copy_from_slice(header);
    let len = frame_length(&h, max)?;
    let Some(payload) = bytes.get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len) else { return Ok(None) };
    Ok(Some((decode_payload(payload)?, FRAME_HEADER_BYTES + len)))
}

/// Buffers a byte stream and yields whole messages.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
}

impl FrameDecoder {
    pub fn new(max: usize) -> Self {
        FrameDecoder { buf: Vec::new(), max }
    }

    /// Append bytes from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, if one is buffered. After an error the stream is unusable.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        match decode_frame(&self.buf, self.max)? {
            Some((msg, used)) => {
                self.buf.drain(..used);
                Ok(Some(msg))
            }
            None => Ok(None),
        }
    }

    /// Call at end of stream: an error if a partial frame is left.
    pub fn finish(&self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Truncated)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::{Actor, VersionVector};
    use proptest::prelude::*;

    fn b(s: &[u8]) -> Bytes {
        Bytes::from(s.to_vec())
    }

    fn object() -> Object {
        let mut o = Object::new();
        o.update(&VersionVector::new(), Actor(7), Some(vec![0; 100]), 5, 10);
        o
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello(Hello { protocol: 1, cluster: "dev".into(), node: Some("n1".into()), proof: b(&[1, 2]) }),
            Message::Client { id: 1, request: ClientRequest::Get { key: b(b"k"), r: Some(2), ns: None } },
            Message::Client {
                id: 2,
                request: ClientRequest::Put { key: b(b"k"), context: None, value: Some(b(b"v")), w: None, ns: None },
            },
            Message::ClientReply {
                id: 2,
                response: ClientResponse::Values { values: vec![b(b"a"), b(b"b")], context: Some("AQ".into()) },
                epoch: 12,
            },
            Message::Replica {
                id: 3,
                request: ReplicaRequest::Write { key: b"k".to_vec(), object: object(), hint: Some("n3".into()) },
            },
            Message::ReplicaReply { id: 3, reply: ReplicaReply::State(Some((object(), object().digest()))) },
            Message::AntiEntropy {
                id: 4,
                msg: AeMessage::Diff {
                    partition: 9,
                    request: crate::merkle::DiffRequest { level: 1, nodes: vec![(3, 77)] },
                    ns: Vec::new(),
                },
            },
            Message::Handoff { id: 5, objects: vec![(b(b"k"), object())] },
            Message::Error { id: 6, kind: ErrorKind::Unavailable, message: "no quorum".into() },
        ]
    }

    #[test]
    fn a_client_reply_of_an_earlier_version_without_an_epoch_reads_as_epoch_0() {
        // The message as earlier versions wrote it: the same variants in the same order, and
        // no epoch in the answer.
        #[derive(Serialize)]
        enum Earlier {
            #[allow(dead_code)]
            Hello(Hello),
            #[allow(dead_code)]
            Welcome {
                node: NodeId,
                proof: Bytes,
            },
            #[allow(dead_code)]
            Refused {
                reason: String,
            },
            #[allow(dead_code)]
            Client {
                id: u64,
                request: ClientRequest,
            },
            ClientReply {
                id: u64,
                response: ClientResponse,
            },
        }
        let response = ClientResponse::Written { context: "AQ".into() };
        let mut frame = vec![PROTOCOL_VERSION, 0, 0, 0, 0];
        frame.extend(rmp_serde::to_vec(&Earlier::ClientReply { id: 9, response: response.clone() }).unwrap());
        let len = (frame.len() - FRAME_HEADER_BYTES) as u32;
        frame[1..5].copy_from_slice(&len.to_be_bytes());
        let (msg, _) = decode_frame(&frame, FRAME_BYTES_MAX_DEFAULT).unwrap().unwrap();
        assert_eq!(msg, Message::ClientReply { id: 9, response, epoch: 0 });
    }

    #[test]
    fn round_trip_through_a_stream_in_pieces() {
        let msgs = samples();
        let mut bytes = Vec::new();
        for m in &msgs {
            bytes.extend(encode_frame(m).unwrap());
        }
        let mut dec = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
        let mut got = Vec::new();
        for chunk in bytes.chunks(7) {
            dec.push(chunk);
            while let Some(m) = dec.next_message().unwrap() {
                got.push(m);
            }
        }
        dec.finish().unwrap();
        assert_eq!(got, msgs);
    }

    #[test]
    fn values_are_binary_not_integer_arrays() {
        let msg = Message::Replica {
            id: 1,
            request: ReplicaRequest::Write { key: b"k".to_vec(), object: object(), hint: None },
        };
        // 100 value bytes as msgpack bin cost ~102 bytes; as an integer array they would cost 100+.
        assert!(encode_frame(&msg).unwrap().len() < 100 + 80);
    }

    #[test]
    fn oversized_and_wrong_version_frames_are_refused_before_buffering() {
        let mut frame = encode_frame(&samples()[0]).unwrap();
        assert!(matches!(decode_frame(&frame, 4), Err(WireError::TooLarge { .. })));
        frame[0] = 9;
        assert_eq!(decode_frame(&frame, 1 << 20), Err(WireError::BadVersion(9)));
        let huge = [PROTOCOL_VERSION, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(decode_frame(&huge, FRAME_BYTES_MAX_DEFAULT), Err(WireError::TooLarge { .. })));
    }

    #[test]
    fn truncated_stream_is_reported() {
        let frame = encode_frame(&samples()[1]).unwrap();
        let mut dec = FrameDecoder::new(1 << 20);
        dec.push(&frame[..frame.len() - 1]);
        assert_eq!(dec.next_message(), Ok(None));
        assert_eq!(dec.finish(), Err(WireError::Truncated));
    }

    #[test]
    fn malformed_payload_is_an_error() {
        let mut frame = vec![PROTOCOL_VERSION, 0, 0, 0, 3];
        frame.extend([0xc1, 0xc1, 0xc1]);
        assert!(matches!(decode_frame(&frame, 1 << 20), Err(WireError::Malformed(_))));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame(&bytes, 1 << 16);
            let _ = decode_payload(&bytes);
        }

        #[test]
        fn random_payload_in_valid_frame_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut frame = vec![PROTOCOL_VERSION];
            frame.extend((payload.len() as u32).to_be_bytes());
            frame.extend(&payload);
            let _ = decode_frame(&frame, 1 << 16);
        }

        #[test]
        fn mutated_frames_never_panic(which in 0usize..9, pos in any::<usize>(), byte in any::<u8>()) {
            let mut frame = encode_frame(&samples()[which]).unwrap();
            let i = pos % frame.len();
            frame[i] = byte;
            let _ = decode_frame(&frame, 1 << 16);
        }

        #[test]
        fn put_round_trips(key in proptest::collection::vec(any::<u8>(), 0..64),
                           value in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..256)),
                           w in proptest::option::of(1u8..5), id in any::<u64>()) {
            let msg = Message::Client { id, request: ClientRequest::Put {
                key: Bytes::from(key), context: None, value: value.map(Bytes::from), w, ns: None } };
            let frame = encode_frame(&msg).unwrap();
            let (back, used) = decode_frame(&frame, 1 << 20).unwrap().unwrap();
            prop_assert_eq!(used, frame.len());
            prop_assert_eq!(back, msg);
        }
    }
}
