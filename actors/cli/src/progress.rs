//! Progress of long background work: `admin transfers [--watch]` (every member's hinted
//! handoff and partition transfers: what is held, moved and left) and `admin leave NODE_ID
//! --wait` (the leaving node's transfers until it has left). Updates come once a second: a
//! progress bar on a terminal, one JSON line each with `--json`, one text line otherwise;
//! a watch that outlives `--timeout` ends with exit status 3.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use ringkv::wire::{ClientRequest, ClientResponse};
use serde_json::{json, Value};

use crate::commands::{expect_document, Client};
use crate::outcome::{exit, Failure, Outcome};

/// How often a watch asks again.
const POLL: Duration = Duration::from_secs(1);
/// How long one member may take to answer one question.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// One question to the member at `addr`, bounded by [`ASK_TIMEOUT`].
async fn ask(client: &Client, addr: SocketAddr, request: ClientRequest) -> Result<Value, Failure> {
    let answer = tokio::time::timeout(ASK_TIMEOUT, async {
        let conn = client.connection(addr).await?;
        conn.request(request).await
    })
    .await
    .map_err(|_| Failure::new(exit::UNAVAILABLE, format!("{addr} did not answer within {ASK_TIMEOUT:?}")))?;
    let response: ClientResponse = answer?;
    expect_document(response)
}

/// The members the node talked to lists (every state it shows), as (id, address).
async fn members(client: &Client) -> Result<Vec<(String, String)>, Failure> {
    let status = expect_document(client.request(ClientRequest::Status).await?)?;
    Ok(status["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| (m["id"].as_str().unwrap_or("").to_string(), m["addr"].as_str().unwrap_or("").to_string()))
        .collect())
}

/// Every member's `admin transfers` document (a member that does not answer is listed with
/// `error` and counts as not pending), and their totals.
pub async fn snapshot(client: &Client) -> Result<Value, Failure> {
    let mut nodes = Vec::new();
    for (id, addr) in members(client).await? {
        let doc = match addr.parse::<SocketAddr>() {
            Ok(a) => ask(client, a, ClientRequest::Transfers).await,
            Err(_) => Err(Failure::new(exit::OTHER, format!("address {addr:?} is not IP:port"))),
        };
        nodes.push(doc.unwrap_or_else(|f| json!({"node": id, "error": f.message})));
    }
    Ok(totals(nodes))
}

/// `{"pending", "total": {...}, "nodes": [...]}` from each member's document.
fn totals(nodes: Vec<Value>) -> Value {
    let sum = |f: &dyn Fn(&Value) -> &Value| nodes.iter().filter_map(|n| f(n).as_u64()).sum::<u64>();
    let estimates: Vec<u64> = nodes.iter().filter_map(|n| n["transfers"]["bytes_left_estimate"].as_u64()).collect();
    json!({
        "pending": nodes.iter().any(|n| n["pending"] == true),
        "total": {
            "hints_held": sum(&|n| &n["hints"]["held"]),
            "hints_delivered": sum(&|n| &n["hints"]["delivered"]),
            "partitions_pending": sum(&|n| &n["transfers"]["partitions_pending"]),
            "keys_left": sum(&|n| &n["transfers"]["keys_left"]),
            "keys_moved": sum(&|n| &n["transfers"]["keys_moved"]),
            "bytes_moved": sum(&|n| &n["transfers"]["bytes_moved"]),
            "bytes_left_estimate": (!estimates.is_empty()).then(|| estimates.iter().sum::<u64>()),
        },
        "nodes": nodes,
    })
}

/// A count as text (a JSON value does not pad to a width), `-` when absent.
fn count(v: &Value) -> String {
    v.as_u64().map_or_else(|| "-".to_string(), |n| n.to_string())
}

/// The `admin transfers` table: one line per member and the totals.
pub fn table(doc: &Value) -> String {
    let mut out = format!(
        "{:<12} {:<8} {:<8} {:>6} {:>10} {:>10} {:>10} {:>12}\n",
        "NODE", "STATE", "PENDING", "HINTS", "PARTITIONS", "KEYS LEFT", "KEYS MOVED", "BYTES MOVED"
    );
    for n in doc["nodes"].as_array().into_iter().flatten() {
        let id = n["node"].as_str().unwrap_or("?");
        if let Some(e) = n["error"].as_str() {
            out.push_str(&format!("{id:<12} unreachable: {e}\n"));
            continue;
        }
        out.push_str(&format!(
            "{:<12} {:<8} {:<8} {:>6} {:>10} {:>10} {:>10} {:>12}\n",
            id,
            n["state"].as_str().unwrap_or("-"),
            if n["pending"] == true { "yes" } else { "no" },
            count(&n["hints"]["held"]),
            count(&n["transfers"]["partitions_pending"]),
            count(&n["transfers"]["keys_left"]),
            count(&n["transfers"]["keys_moved"]),
            count(&n["transfers"]["bytes_moved"]),
        ));
    }
    let t = &doc["total"];
    out.push_str(&format!(
        "{:<12} {:<8} {:<8} {:>6} {:>10} {:>10} {:>10} {:>12}",
        "total",
        "",
        if doc["pending"] == true { "yes" } else { "no" },
        count(&t["hints_held"]),
        count(&t["partitions_pending"]),
        count(&t["keys_left"]),
        count(&t["keys_moved"]),
        count(&t["bytes_moved"]),
    ));
    out
}

/// How updates are shown: a bar on a terminal, JSON lines with `--json`, else text lines.
pub struct Display {
    json: bool,
    bar: Option<ProgressBar>,
    /// Keys and hints moved when the watch began (the counters run since each node started).
    base: Option<u64>,
}

impl Display {
    pub fn new(json: bool) -> Display {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(0).with_style(
                ProgressStyle::with_template("{msg} {wide_bar} {pos}/{len} keys ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Display { json, bar, base: None }
    }

    /// Show one update: `moved` (keys and hints moved so far, as the nodes count them),
    /// `left` (keys and hints still held), `what` (a short description), `doc` (the JSON
    /// line).
    fn update(&mut self, moved: u64, left: u64, what: &str, doc: &Value) -> Result<(), Failure> {
        let base = *self.base.get_or_insert(moved);
        let done = moved.saturating_sub(base);
        match &self.bar {
            Some(bar) => {
                bar.set_length(done.saturating_add(left));
                bar.set_position(done);
                bar.set_message(what.to_string());
                Ok(())
            }
            None if self.json => ringkv_console::print_line(&doc.to_string()).map_err(crate::output_failed),
            None => ringkv_console::print_line(&format!("{what}; {done} keys moved, {left} left"))
                .map_err(crate::output_failed),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn moved_and_left(t: &Value) -> (u64, u64) {
    let n = |k: &str| t[k].as_u64().unwrap_or(0);
    (n("keys_moved") + n("hints_delivered"), n("keys_left") + n("hints_held"))
}

/// `admin transfers [--watch]`: once, or every second until nothing is pending anywhere.
pub async fn transfers(client: &Client, watch: bool, timeout_s: u64, json: bool) -> Result<Outcome, Failure> {
    if !watch {
        let doc = snapshot(client).await?;
        let human = table(&doc);
        return Ok(Outcome { doc, human, status: exit::OK });
    }
    let started = Instant::now();
    let mut display = Display::new(json);
    loop {
        let mut doc = snapshot(client).await?;
        doc["elapsed_ms"] = json!(started.elapsed().as_millis() as u64);
        let (moved, left) = moved_and_left(&doc["total"]);
        let what =
            format!("{} partitions, {} hints pending", doc["total"]["partitions_pending"], doc["total"]["hints_held"]);
        display.update(moved, left, &what, &doc)?;
        if doc["pending"] != true {
            display.finish();
            let human = if display.json || display.bar.is_none() { String::new() } else { table(&doc) };
            return Ok(Outcome { doc: Value::Null, human, status: exit::OK });
        }
        if started.elapsed() >= Duration::from_secs(timeout_s) {
            display.finish();
            return Err(Failure::new(
                exit::UNAVAILABLE,
                format!(
                    "transfers still pending after {timeout_s} s ({what}); see `ringkv admin transfers`, \
                     or watch longer with --timeout"
                ),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `admin leave NODE_ID --wait`: ask for the leave, then follow the leaving node's transfers
/// every second until it has left: its own document says `left`, the node talked to no
/// longer lists it, or it stops answering after saying it was leaving with nothing pending.
pub async fn leave_and_wait(client: &Client, node: String, timeout_s: u64, json: bool) -> Result<Outcome, Failure> {
    let listed = members(client).await?;
    let addr = listed
        .iter()
        .find(|(id, _)| *id == node)
        .and_then(|(_, a)| a.parse::<SocketAddr>().ok())
        .ok_or_else(|| Failure::new(exit::BAD_INPUT, format!("{node} is not a member (see `ringkv status`)")))?;
    expect_document(client.request(ClientRequest::Leave { node: node.clone() }).await?)?;
    let started = Instant::now();
    let mut display = Display::new(json);
    // Whether its last answer said it was leaving with nothing left to hand away (the leave
    // reaches it by gossip: its first answers may still say `up`).
    let mut handed_away = false;
    loop {
        let done = match ask(client, addr, ClientRequest::Transfers).await {
            Ok(mut doc) => {
                doc["elapsed_ms"] = json!(started.elapsed().as_millis() as u64);
                handed_away = doc["state"] == "leaving" && doc["pending"] == false;
                let t = &doc["transfers"];
                let n = |v: &Value| v.as_u64().unwrap_or(0);
                let moved = n(&t["keys_moved"]) + n(&doc["hints"]["delivered"]);
                let left = n(&t["keys_left"]) + n(&doc["hints"]["held"]);
                let what = format!(
                    "{node} {}: {} partitions, {} hints pending",
                    doc["state"].as_str().unwrap_or("?"),
                    t["partitions_pending"],
                    doc["hints"]["held"]
                );
                display.update(moved, left, &what, &doc)?;
                doc["state"] == "left"
            }
            // Gone quiet: done if it had nothing left, or once the node talked to no longer
            // lists it (a member that has left).
            Err(_) => handed_away || members(client).await.is_ok_and(|m| !m.iter().any(|(id, _)| *id == node)),
        };
        if done {
            display.finish();
            let doc = json!({"leaving": node, "left": true, "elapsed_ms": started.elapsed().as_millis() as u64});
            return Ok(Outcome { human: format!("{node} has left"), doc, status: exit::OK });
        }
        if started.elapsed() >= Duration::from_secs(timeout_s) {
            display.finish();
            return Err(Failure::new(
                exit::UNAVAILABLE,
                format!(
                    "{node} has not left after {timeout_s} s (it is still handing its data away); \
                     follow it with `ringkv admin transfers --watch`"
                ),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_the_members_and_the_table_lines_up() {
        let node = |id: &str, pending: bool, partitions: u64, left: u64, moved: u64| {
            json!({"node": id, "state": "up", "pending": pending,
                   "hints": {"held": 1, "delivered": 2, "by_node": [], "expired": 0},
                   "transfers": {"partitions_pending": partitions, "keys_left": left, "keys_moved": moved,
                                 "bytes_moved": moved * 10, "bytes_left_estimate": left * 10, "partitions": []}})
        };
        let doc = totals(vec![
            node("n1", true, 2, 30, 5),
            node("n2", false, 0, 0, 7),
            json!({"node": "n3", "error": "did not answer"}),
        ]);
        assert_eq!(doc["pending"], true);
        assert_eq!(
            doc["total"],
            json!({"hints_held": 2, "hints_delivered": 4, "partitions_pending": 2, "keys_left": 30,
                   "keys_moved": 12, "bytes_moved": 120, "bytes_left_estimate": 300})
        );
        assert_eq!(moved_and_left(&doc["total"]), (16, 32));
        let text = table(&doc);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[1].starts_with("n1") && lines[1].ends_with("           50"), "{text}");
        assert!(lines[3].starts_with("n3") && lines[3].contains("unreachable: did not answer"), "{text}");
        assert!(lines[4].starts_with("total") && lines[4].ends_with("          120"), "{text}");
        let quiet = totals(vec![node("n1", false, 0, 0, 0)]);
        assert_eq!(quiet["pending"], false);
    }
}
