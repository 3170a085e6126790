//! What a command ends with: its output (a JSON document and a human rendering) and exit
//! status, or a failure with its message and exit status (the contract's exit codes).

use ringkv::wire::ErrorKind;
use ringkv_client::NetError;
use serde_json::Value;

/// Exit statuses.
pub mod exit {
    pub const OK: i32 = 0;
    pub const NOT_FOUND: i32 = 1;
    pub const BAD_INPUT: i32 = 2;
    pub const UNAVAILABLE: i32 = 3;
    pub const REFUSED: i32 = 4;
    pub const OTHER: i32 = 5;
}

/// A failed command: what to print and the exit status.
#[derive(Debug)]
pub struct Failure {
    pub status: i32,
    pub message: String,
}

impl Failure {
    pub fn new(status: i32, message: impl Into<String>) -> Self {
        Failure { status, message: message.into() }
    }
}

impl From<NetError> for Failure {
    fn from(e: NetError) -> Self {
        let status = match &e {
            NetError::Refused(_) | NetError::BadServerProof => exit::REFUSED,
            NetError::Connect(..) | NetError::Lost(_) | NetError::Timeout | NetError::WrongNode { .. } => {
                exit::UNAVAILABLE
            }
            NetError::Wire(_) | NetError::Unexpected(_) => exit::OTHER,
        };
        let hint = match &e {
            NetError::Refused(m) if m.starts_with("TLS") => {
                "; check that --config's certificate was made by this cluster's CA (ringkv-node certs)"
            }
            NetError::Refused(m) if m.starts_with("not permitted") => "",
            NetError::Refused(_) | NetError::BadServerProof => {
                "; check the cluster name and the secret (or certificates) in --config"
            }
            NetError::Connect(..) => "; is the node running? (--node ADDR picks another)",
            NetError::Timeout => "; is the node running? A write may still have been applied: read before retrying",
            _ => "",
        };
        Failure::new(status, format!("{e}{hint}"))
    }
}

pub fn status_of(kind: ErrorKind) -> i32 {
    match kind {
        ErrorKind::BadRequest => exit::BAD_INPUT,
        ErrorKind::Unavailable | ErrorKind::Overloaded => exit::UNAVAILABLE,
        ErrorKind::Refused => exit::REFUSED,
        ErrorKind::Internal => exit::OTHER,
    }
}

/// What a command printed and its status.
pub struct Outcome {
    pub doc: Value,
    pub human: String,
    pub status: i32,
}
