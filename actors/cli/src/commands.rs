//! The `ringkv` commands, built on `ringkv-client`, with the output shapes and exit
//! statuses of the user contract (README).

use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;

use base64::Engine;
use ringkv::wire::{Bytes, ClientRequest, ClientResponse};
use serde_json::{json, Value};

use crate::args::{AdminCommand, ClientCommand, FaultCommand, LimitsCommand, NamespaceCommand};
use crate::outcome::{exit, status_of, Failure, Outcome};
pub use ringkv_client::Client;
use ringkv_transport::ClientSetup;

/// Where to connect and how to authenticate, from `--config` (a client file, or a node's own
/// config) and `--node`.
pub fn target(config: Option<&Path>, node: Option<&str>) -> Result<(SocketAddr, ClientSetup), Failure> {
    let Some(path) = config else {
        return Err(Failure::new(
            exit::BAD_INPUT,
            "give --config FILE (a client file with [client], or a node's config on its machine)",
        ));
    };
    let setup = ringkv_transport::load_client(path).map_err(|m| Failure::new(exit::BAD_INPUT, m))?;
    let addr = match node {
        Some(n) => {
            n.parse().map_err(|_| Failure::new(exit::BAD_INPUT, format!("--node {n:?} is not an IP:port address")))?
        }
        None => match setup.nodes.first() {
            Some(a) => *a,
            None => return Err(Failure::new(exit::BAD_INPUT, format!("{} names no node", path.display()))),
        },
    };
    Ok((addr, setup))
}

/// A value as JSON: a string when it is UTF-8, else `{"base64": ...}`.
pub fn value_json(v: &[u8]) -> Value {
    match std::str::from_utf8(v) {
        Ok(s) => json!(s),
        Err(_) => json!({"base64": base64::engine::general_purpose::STANDARD.encode(v)}),
    }
}

fn expect_values(r: ClientResponse) -> Result<(Vec<Bytes>, Option<String>), Failure> {
    match r {
        ClientResponse::Values { values, context } => Ok((values, context)),
        ClientResponse::Error { kind, message } => Err(Failure::new(status_of(kind), message)),
        other => Err(Failure::new(exit::OTHER, format!("unexpected answer {other:?}"))),
    }
}

fn expect_written(r: ClientResponse) -> Result<String, Failure> {
    match r {
        ClientResponse::Written { context } => Ok(context),
        ClientResponse::Error { kind, message } => Err(Failure::new(status_of(kind), message)),
        other => Err(Failure::new(exit::OTHER, format!("unexpected answer {other:?}"))),
    }
}

pub fn expect_document(r: ClientResponse) -> Result<Value, Failure> {
    match r {
        ClientResponse::Document { json } => {
            serde_json::from_str(&json).map_err(|e| Failure::new(exit::OTHER, format!("bad document from node: {e}")))
        }
        ClientResponse::Error { kind, message } => Err(Failure::new(status_of(kind), message)),
        other => Err(Failure::new(exit::OTHER, format!("unexpected answer {other:?}"))),
    }
}

/// `ringkv status` for people: one line per member.
fn status_table(doc: &Value) -> String {
    let mut out = format!(
        "node {}  ring epoch {}  pending: {} hints, {} transfers\n",
        doc["node"].as_str().unwrap_or("?"),
        doc["ring_epoch"],
        doc["pending"]["hints"],
        doc["pending"]["transfers"]
    );
    out.push_str(&format!(
        "  {:<12} {:<22} {:<8} {:>6} {:>10} {:>8} {:>10} {:>8}  {}\n",
        "ID", "ADDRESS", "STATE", "PHI", "PARTITIONS", "VS FAIR", "REQ/MIN", "VS FAIR", "ZONE"
    ));
    let pct = |v: &Value| v.as_f64().map_or("-".to_string(), |f| format!("{:+.0}%", f * 100.0));
    let mut marked = false;
    for m in doc["members"].as_array().into_iter().flatten() {
        let out_of_balance = m["out_of_balance"].as_bool().unwrap_or(false);
        marked |= out_of_balance;
        out.push_str(&format!(
            "{} {:<12} {:<22} {:<8} {:>6} {:>10} {:>8} {:>10} {:>8}  {}\n",
            if out_of_balance { "*" } else { " " },
            m["id"].as_str().unwrap_or("?"),
            m["addr"].as_str().unwrap_or("?"),
            m["state"].as_str().unwrap_or("?"),
            m["phi"].as_f64().map_or("-".to_string(), |p| format!("{p:.1}")),
            m["partitions"].as_u64().unwrap_or(0),
            pct(&m["imbalance"]),
            m["requests_last_minute"].as_u64().map_or("-".to_string(), |r| r.to_string()),
            pct(&m["request_imbalance"]),
            m["zone"].as_str().unwrap_or("-")
        ));
    }
    if marked {
        out.push_str(
            "* out of balance: partitions or requests off the member's fair share (by weight) by more than 15%\n",
        );
    }
    out.trim_end().to_string()
}

/// `admin limits set --all`: the change on every member that is up, one at a time; the
/// first refusal stops it (the members before it keep the change, and the output says which).
/// Prints `{"nodes": {"ID": LIMITS, ...}}`.
async fn set_limits_everywhere(client: &Client, pairs: Vec<(String, i64)>) -> Result<Outcome, Failure> {
    let status = expect_document(client.request(ClientRequest::Status).await?)?;
    let members: Vec<(String, String)> = status["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["state"] == "up" || m["state"] == "joining")
        .map(|m| (m["id"].as_str().unwrap_or("").to_string(), m["addr"].as_str().unwrap_or("").to_string()))
        .collect();
    let mut done = serde_json::Map::new();
    for (id, addr) in members {
        let parsed: std::net::SocketAddr = addr
            .parse()
            .map_err(|_| Failure::new(exit::OTHER, format!("member {id} has address {addr:?}, not IP:port")))?;
        let changed = async {
            let conn = client.connection(parsed).await?;
            conn.request(ClientRequest::SetLimits { pairs: pairs.clone() }).await
        }
        .await;
        let doc = changed.map_err(Failure::from).and_then(expect_document).map_err(|f| {
            let changed: Vec<&String> = done.keys().collect();
            Failure::new(f.status, format!("{id}: {} (changed so far: {changed:?})", f.message))
        })?;
        done.insert(id, doc);
    }
    Ok(doc_outcome(json!({ "nodes": done })))
}

fn doc_outcome(doc: Value) -> Outcome {
    let human = serde_json::to_string_pretty(&doc).unwrap_or_default();
    Outcome { doc, human, status: exit::OK }
}

fn parse_pair(p: &str) -> Result<(String, i64), Failure> {
    let (name, value) =
        p.split_once('=').ok_or_else(|| Failure::new(exit::BAD_INPUT, format!("{p:?}: write NAME=VALUE")))?;
    let v: i64 = value
        .trim()
        .parse()
        .map_err(|_| Failure::new(exit::BAD_INPUT, format!("{p:?}: {value:?} is not an integer")))?;
    Ok((name.trim().to_string(), v))
}

/// Run one command against the connected node.
/// `json`: the output is JSON (commands that print progress as they go print JSON lines).
pub async fn execute(
    client: &Client,
    command: ClientCommand,
    value_bytes_max: u64,
    json: bool,
) -> Result<Outcome, Failure> {
    match command {
        ClientCommand::Get { key, r, ns } => {
            let (values, context) = expect_values(
                client.request(ClientRequest::Get { key: key.clone().into_bytes().into(), r, ns }).await?,
            )?;
            let status = if values.is_empty() { exit::NOT_FOUND } else { exit::OK };
            let doc = json!({"key": key, "values": values.iter().map(|v| value_json(v)).collect::<Vec<_>>(), "context": context});
            let mut human: Vec<String> = values.iter().map(|v| String::from_utf8_lossy(v).into_owned()).collect();
            if values.is_empty() {
                human.push(format!("{key}: not found"));
            } else if values.len() > 1 {
                human.push(format!("({} siblings: write back with the context to resolve them)", values.len()));
            }
            if let Some(c) = &context {
                human.push(format!("context: {c}"));
            }
            Ok(Outcome { doc, human: human.join("\n"), status })
        }
        ClientCommand::Put { key, value, context, w, ns } => {
            let bytes = if value == "-" {
                let mut buf = Vec::new();
                let limit = value_bytes_max;
                std::io::stdin()
                    .take(limit + 1)
                    .read_to_end(&mut buf)
                    .map_err(|e| Failure::new(exit::BAD_INPUT, format!("cannot read the value from stdin: {e}")))?;
                buf
            } else {
                value.into_bytes()
            };
            if bytes.len() as u64 > value_bytes_max {
                return Err(Failure::new(
                    exit::BAD_INPUT,
                    format!("the value is over limits.max_value_bytes ({} bytes); nothing was stored", value_bytes_max),
                ));
            }
            let req =
                ClientRequest::Put { key: key.clone().into_bytes().into(), context, value: Some(bytes.into()), w, ns };
            let context = expect_written(client.request(req).await?)?;
            Ok(Outcome {
                doc: json!({"key": key, "context": context}),
                human: format!("ok\ncontext: {context}"),
                status: exit::OK,
            })
        }
        ClientCommand::Delete { key, context, w, ns } => {
            let context = match context {
                Some(c) => Some(c),
                None => {
                    let read = ClientRequest::Get { key: key.clone().into_bytes().into(), r: None, ns: ns.clone() };
                    let (values, ctx) = expect_values(client.request(read).await?)?;
                    if values.is_empty() {
                        return Ok(Outcome {
                            doc: json!({"key": key, "context": ctx}),
                            human: format!("{key}: not found"),
                            status: exit::NOT_FOUND,
                        });
                    }
                    ctx
                }
            };
            let req = ClientRequest::Put { key: key.clone().into_bytes().into(), context, value: None, w, ns };
            let context = expect_written(client.request(req).await?)?;
            Ok(Outcome { doc: json!({"key": key, "context": context}), human: "deleted".into(), status: exit::OK })
        }
        ClientCommand::Status => {
            let doc = expect_document(client.request(ClientRequest::Status).await?)?;
            let human = status_table(&doc);
            Ok(Outcome { doc, human, status: exit::OK })
        }
        ClientCommand::Ring => Ok(doc_outcome(expect_document(client.request(ClientRequest::Ring).await?)?)),
        ClientCommand::Admin { command } => {
            let req = match command {
                AdminCommand::Partitions => ClientRequest::Partitions,
                AdminCommand::Hints => ClientRequest::Hints,
                AdminCommand::Leave { node_id, wait: true, timeout } => {
                    return crate::progress::leave_and_wait(client, node_id, timeout, json).await;
                }
                AdminCommand::Leave { node_id, wait: false, .. } => ClientRequest::Leave { node: node_id },
                AdminCommand::Transfers { watch, timeout } => {
                    return crate::progress::transfers(client, watch, timeout, json).await;
                }
                AdminCommand::Limits { command: None } => ClientRequest::Limits,
                AdminCommand::Limits { command: Some(LimitsCommand::Set { all: true, pairs }) } => {
                    let pairs = pairs.iter().map(|p| parse_pair(p)).collect::<Result<Vec<_>, _>>()?;
                    return set_limits_everywhere(client, pairs).await;
                }
                AdminCommand::Limits { command: Some(LimitsCommand::Set { all: false, pairs }) } => {
                    ClientRequest::SetLimits { pairs: pairs.iter().map(|p| parse_pair(p)).collect::<Result<_, _>>()? }
                }
                AdminCommand::Namespace { command: NamespaceCommand::Create { name, n, r, w, resolution } } => {
                    ClientRequest::NamespaceCreate { name, n, r, w, resolution }
                }
                AdminCommand::Namespace { command: NamespaceCommand::Set { name, r, w } } => {
                    ClientRequest::NamespaceSet { name, r, w }
                }
                AdminCommand::Namespace { command: NamespaceCommand::List } => ClientRequest::Namespaces,
                AdminCommand::Fault { command: FaultCommand::Block { peers } } => ClientRequest::FaultBlock { peers },
                AdminCommand::Fault { command: FaultCommand::Unblock } => ClientRequest::FaultUnblock,
            };
            Ok(doc_outcome(expect_document(client.request(req).await?)?))
        }
        ClientCommand::Bench(_) | ClientCommand::Completions { .. } => {
            Err(Failure::new(exit::OTHER, "bench and completions are run by ringkv_cli::run"))
        }
    }
}
