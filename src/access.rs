//! Who may send what: the roles a connection's peer holds and the role each message needs.
//!
//! The paper's Dynamo ran in a trusted network and left security out (§4: "no security
//! related requirements"); a store exposed beyond one team cannot. A connection
//! authenticates as one identity (a node, or a client with a role, from its certificate; in
//! secret-only mode every client is an admin), and the node checks every message against the
//! table here before any stage sees it, so a client can never act as a node: replica writes,
//! gossip, handoff, reaping and anti-entropy come from node identities only.
//!
//! Roles are ordered: `read` (get, status, ring) < `write` (adds put and delete) < `admin`
//! (adds every `admin` command) < `node` (adds the node-to-node protocol; an operator on a
//! node's machine may use the node's own credentials for anything).

use serde::{Deserialize, Serialize};

use crate::ring::NodeId;
use crate::wire::{ClientRequest, ClientResponse, ErrorKind, Message};

/// What an authenticated peer may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    Read,
    Write,
    Admin,
    Node,
}

impl Role {
    pub const CLIENT_ROLES: [Role; 3] = [Role::Read, Role::Write, Role::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
            Role::Node => "node",
        }
    }

    /// A client role by name (`read`, `write`, `admin`); `node` is not a client's role.
    pub fn parse_client(name: &str) -> Result<Role, String> {
        Role::CLIENT_ROLES
            .into_iter()
            .find(|r| r.name() == name)
            .ok_or_else(|| format!("role {name:?} is not one of read, write, admin"))
    }

    /// Whether this role covers `need`.
    pub fn permits(self, need: Role) -> bool {
        self >= need
    }
}

/// Who a connection's peer authenticated as.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A member node, by the id its certificate (or, in secret-only mode, its handshake)
    /// names.
    Node(NodeId),
    /// A client or operator: a name for the logs and the role it holds.
    Client { name: String, role: Role },
}

impl Identity {
    pub fn role(&self) -> Role {
        match self {
            Identity::Node(_) => Role::Node,
            Identity::Client { role, .. } => *role,
        }
    }

    pub fn node(&self) -> Option<&NodeId> {
        match self {
            Identity::Node(n) => Some(n),
            Identity::Client { .. } => None,
        }
    }
}

/// The role a client request needs.
pub fn client_role(request: &ClientRequest) -> Role {
    match request {
        ClientRequest::Get { .. } | ClientRequest::Status | ClientRequest::Ring | ClientRequest::Namespaces => {
            Role::Read
        }
        ClientRequest::Put { .. } => Role::Write,
        ClientRequest::Partitions
        | ClientRequest::Hints
        | ClientRequest::Transfers
        | ClientRequest::Limits
        | ClientRequest::SetLimits { .. }
        | ClientRequest::Leave { .. }
        | ClientRequest::FaultBlock { .. }
        | ClientRequest::FaultUnblock
        | ClientRequest::NamespaceCreate { .. }
        | ClientRequest::NamespaceSet { .. } => Role::Admin,
    }
}

/// What a command is called in a refusal.
fn client_command(request: &ClientRequest) -> &'static str {
    match request {
        ClientRequest::Get { .. } => "get",
        ClientRequest::Put { value: Some(_), .. } => "put",
        ClientRequest::Put { value: None, .. } => "delete",
        ClientRequest::Status => "status",
        ClientRequest::Ring => "ring",
        ClientRequest::Partitions => "admin partitions",
        ClientRequest::Hints => "admin hints",
        ClientRequest::Transfers => "admin transfers",
        ClientRequest::Limits => "admin limits",
        ClientRequest::SetLimits { .. } => "admin limits set",
        ClientRequest::Leave { .. } => "admin leave",
        ClientRequest::FaultBlock { .. } | ClientRequest::FaultUnblock => "admin fault",
        ClientRequest::NamespaceCreate { .. } => "admin namespace create",
        ClientRequest::NamespaceSet { .. } => "admin namespace set",
        ClientRequest::Namespaces => "admin namespace list",
    }
}

/// The role a message arriving from the network needs; None for messages no stage serves
/// (the handshake's, and answers meant for clients).
pub fn required(msg: &Message) -> Option<Role> {
    Some(match msg {
        Message::Client { request, .. } => client_role(request),
        Message::Replica { .. }
        | Message::ReplicaReply { .. }
        | Message::Gossip { .. }
        | Message::GossipReply { .. }
        | Message::AntiEntropy { .. }
        | Message::Handoff { .. }
        | Message::HandoffAck { .. }
        | Message::Reap { .. }
        | Message::ReapReply { .. }
        | Message::Ping { .. }
        | Message::Pong { .. } => Role::Node,
        Message::Hello(_)
        | Message::Welcome { .. }
        | Message::Refused { .. }
        | Message::ClientReply { .. }
        | Message::Error { .. } => return None,
    })
}

/// Check a message against the sender's role: Ok when permitted; otherwise the answer to
/// send back, if the message expects one (a refusal naming the role it needs).
pub fn check(have: Role, msg: &Message) -> Result<(), Option<Message>> {
    let Some(need) = required(msg) else { return Err(None) };
    if have.permits(need) {
        return Ok(());
    }
    let reply = match msg {
        Message::Client { id, request } => Some(Message::ClientReply {
            id: *id,
            response: ClientResponse::Error {
                kind: ErrorKind::Refused,
                message: format!(
                    "not permitted: {} needs the {} role; these credentials hold {}",
                    client_command(request),
                    need.name(),
                    have.name()
                ),
            },
            epoch: 0,
        }),
        other => Some(Message::Error {
            id: message_id(other),
            kind: ErrorKind::Refused,
            message: format!("not permitted: {} is node-to-node; only a node identity may send it", other.kind()),
        }),
    };
    Err(reply)
}

fn message_id(msg: &Message) -> u64 {
    match msg {
        Message::Replica { id, .. }
        | Message::ReplicaReply { id, .. }
        | Message::AntiEntropy { id, .. }
        | Message::Handoff { id, .. }
        | Message::HandoffAck { id, .. }
        | Message::Reap { id, .. }
        | Message::ReapReply { id, .. }
        | Message::Ping { id }
        | Message::Pong { id } => *id,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Bytes, ReplicaRequest};

    fn client(request: ClientRequest) -> Message {
        Message::Client { id: 9, request }
    }

    fn put() -> Message {
        let value = Some(Bytes::default());
        client(ClientRequest::Put { key: Bytes::default(), context: None, value, w: None, ns: None })
    }

    #[test]
    fn the_role_table() {
        let get = client(ClientRequest::Get { key: Bytes::from(b"k".to_vec()), r: None, ns: None });
        let put = put();
        let delete =
            client(ClientRequest::Put { key: Bytes::default(), context: None, value: None, w: None, ns: None });
        let leave = client(ClientRequest::Leave { node: "n1".into() });
        let set = client(ClientRequest::SetLimits { pairs: vec![] });
        let gossip = Message::Gossip { members: vec![], loads: vec![], namespaces: Vec::new() };
        let write = Message::Replica { id: 3, request: ReplicaRequest::Read { key: vec![] } };
        let handoff = Message::Handoff { id: 4, objects: vec![] };
        let transfers = client(ClientRequest::Transfers);
        let table: [(&Message, Role); 9] = [
            (&get, Role::Read),
            (&transfers, Role::Admin),
            (&client(ClientRequest::Status), Role::Read),
            (&put, Role::Write),
            (&delete, Role::Write),
            (&leave, Role::Admin),
            (&set, Role::Admin),
            (&gossip, Role::Node),
            (&handoff, Role::Node),
        ];
        for (msg, need) in table {
            assert_eq!(required(msg), Some(need), "{msg:?}");
            for have in [Role::Read, Role::Write, Role::Admin, Role::Node] {
                assert_eq!(check(have, msg).is_ok(), have >= need, "{have:?} sending {msg:?}");
            }
        }
        assert!(check(Role::Admin, &write).is_err());
        assert!(check(Role::Node, &write).is_ok());
        assert_eq!(required(&Message::Refused { reason: String::new() }), None);
    }

    #[test]
    fn a_refusal_names_the_role_needed_and_answers_the_request() {
        let put = put();
        match check(Role::Read, &put) {
            Err(Some(Message::ClientReply { id: 9, response: ClientResponse::Error { kind, message }, .. })) => {
                assert_eq!(kind, ErrorKind::Refused);
                assert!(message.contains("put needs the write role"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let handoff = Message::Handoff { id: 4, objects: vec![] };
        match check(Role::Admin, &handoff) {
            Err(Some(Message::Error { id: 4, kind: ErrorKind::Refused, .. })) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn client_roles_parse_and_node_is_not_one() {
        assert_eq!(Role::parse_client("write"), Ok(Role::Write));
        assert!(Role::parse_client("node").is_err());
        assert!(Role::parse_client("").is_err());
    }
}
