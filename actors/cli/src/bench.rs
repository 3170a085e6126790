//! `ringkv bench`: a YCSB-style load generator. Workload a is 50% reads and 50% blind
//! updates, b 95/5, c read-only, f 50% reads and 50% read-modify-writes (a get, then a put
//! with the context it returned: the honest update for a store that keeps concurrent
//! writes as siblings, where blind updates to the same keys pile siblings up). Keys are
//! drawn uniformly from `--keys` and preloaded first (unless `--no-preload`). Each client
//! issues one request at a time. By default they share one partition-aware
//! [`ringkv_client::Client`] (each request goes to a node of its key's preference list, one
//! connection per node); `--pin ADDR` sends everything to one node and `--nodes` spreads the
//! clients over the nodes listed (server-driven coordination, for comparison). The run ends after `--ops` operations, or after
//! `--duration` seconds when given. Latencies go into an HDR histogram (microseconds) per kind
//! of operation (read, update, read-modify-write: YCSB's report), and together; on a
//! terminal a progress line on standard error shows what is done; standard output gets only
//! the result, and with `--progress-json` a JSON line of progress each second before it.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::Rng;
use ringkv::wire::{Bytes, ClientRequest, ClientResponse};
use serde_json::json;

use crate::args::BenchArgs;
use crate::outcome::{exit, Failure, Outcome};
use ringkv_client::{Client, Credentials};

/// Preload writes each client keeps in flight on its connection.
const PRELOAD_DEPTH: usize = 16;
/// Latencies recorded up to this many microseconds (a minute); longer ones count as it.
const LATENCY_US_MAX: u64 = 60_000_000;

fn key(i: u64) -> Bytes {
    Bytes::from(format!("bench:{i:010}").into_bytes())
}

/// What each operation of a workload is.
#[derive(Clone, Copy)]
enum Mix {
    /// Reads with this probability, else blind updates.
    Blind { read_share: f64 },
    /// Reads with this probability, else read-modify-writes.
    ReadModifyWrite { read_share: f64 },
}

impl Mix {
    fn of(workload: &str) -> Mix {
        match workload {
            "a" => Mix::Blind { read_share: 0.5 },
            "b" => Mix::Blind { read_share: 0.95 },
            "f" => Mix::ReadModifyWrite { read_share: 0.5 },
            _ => Mix::Blind { read_share: 1.0 },
        }
    }
}

/// A progress line on a terminal (hidden otherwise, or when progress goes out as JSON lines:
/// a hidden bar still counts).
fn progress(total: Option<u64>, what: &str, json_lines: bool) -> ProgressBar {
    if json_lines || !std::io::stderr().is_terminal() {
        return ProgressBar::with_draw_target(total, ProgressDrawTarget::hidden());
    }
    let bar = match total {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template("{msg} {wide_bar} {pos}/{len} ({per_sec}, {eta} left)")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{msg} {spinner} {pos} ops ({per_sec}), {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// `--progress-json`: a line on standard output each second while a phase runs, and one
/// when it ends.
struct JsonProgress {
    phase: &'static str,
    bar: ProgressBar,
    started: Instant,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl JsonProgress {
    fn line(phase: &str, bar: &ProgressBar, started: Instant) -> String {
        let elapsed_ms = started.elapsed().as_millis() as u64;
        json!({"progress": phase, "done": bar.position(), "total": bar.length(), "elapsed_ms": elapsed_ms}).to_string()
    }

    fn start(on: bool, phase: &'static str, bar: &ProgressBar) -> JsonProgress {
        let started = Instant::now();
        let ticker = on.then(|| {
            let bar = bar.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                every.tick().await;
                loop {
                    every.tick().await;
                    // A failing stdout is reported by the result's own output.
                    let _ = ringkv_console::print_line(&JsonProgress::line(phase, &bar, started));
                }
            })
        });
        JsonProgress { phase, bar: bar.clone(), started, ticker }
    }

    fn end(self) {
        if let Some(t) = self.ticker {
            t.abort();
            let _ = ringkv_console::print_line(&JsonProgress::line(self.phase, &self.bar, self.started));
        }
    }
}

/// Write every key once, `PRELOAD_DEPTH` writes in flight per client. What the failed
/// writes failed with.
async fn preload(clients: &[Client], keys: u64, value: &Bytes, json_lines: bool) -> Failures {
    let next = Arc::new(AtomicU64::new(0));
    let bar = progress(Some(keys), "preloading", json_lines);
    let lines = JsonProgress::start(json_lines, "preload", &bar);
    let loaders = clients.iter().flat_map(|client| (0..PRELOAD_DEPTH).map(move |_| client)).map(|client| {
        let (next, value, bar) = (next.clone(), value.clone(), bar.clone());
        async move {
            let mut failures = Failures::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= keys {
                    return failures;
                }
                let req =
                    ClientRequest::Put { key: key(i), context: None, value: Some(value.clone()), w: None, ns: None };
                if let Err(what) = written(client.request(req).await) {
                    failures.record(what, 1);
                }
                bar.inc(1);
            }
        }
    });
    let failures = loaders
        .collect::<FuturesUnordered<_>>()
        .fold(Failures::default(), |mut all, f| async move {
            all.add(f);
            all
        })
        .await;
    bar.finish_and_clear();
    lines.end();
    failures
}

/// Distinct failure descriptions a run tells apart; further ones are counted together.
const ERROR_KINDS_MAX: usize = 16;

/// What failed operations failed with: a count per description, for `error_kinds`.
#[derive(Default)]
struct Failures {
    counts: BTreeMap<String, u64>,
}

impl Failures {
    /// Count `n` failures described as `what`.
    fn record(&mut self, what: String, n: u64) {
        let key = if self.counts.len() < ERROR_KINDS_MAX || self.counts.contains_key(&what) {
            what
        } else {
            "(other errors)".to_string()
        };
        let count = self.counts.entry(key).or_insert(0);
        *count = count.saturating_add(n);
    }

    fn add(&mut self, other: Failures) {
        for (what, n) in other.counts {
            self.record(what, n);
        }
    }

    fn total(&self) -> u64 {
        self.counts.values().fold(0u64, |t, n| t.saturating_add(*n))
    }

    /// The descriptions, most frequent first, each with its count.
    fn summary(&self) -> String {
        let mut by_count: Vec<(&String, &u64)> = self.counts.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        by_count.iter().map(|(what, n)| format!("{n} x {what}")).collect::<Vec<_>>().join("; ")
    }
}

/// Why an answer is not the one an operation wanted.
fn failure(answer: Result<ClientResponse, ringkv_client::NetError>) -> String {
    match answer {
        Err(e) => e.to_string(),
        Ok(ClientResponse::Error { kind, message }) => format!("{kind:?}: {message}"),
        Ok(_) => "an answer of the wrong kind".to_string(),
    }
}

/// A put's answer: written, or what it failed with.
fn written(answer: Result<ClientResponse, ringkv_client::NetError>) -> Result<(), String> {
    match answer {
        Ok(ClientResponse::Written { .. }) => Ok(()),
        other => Err(failure(other)),
    }
}

/// The kinds of operation a workload mixes, as YCSB reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// A get.
    Read,
    /// A put without a context.
    Update,
    /// A get, then a put with the context it returned (timed together).
    ReadModifyWrite,
}

impl Op {
    const ALL: [Op; 3] = [Op::Read, Op::Update, Op::ReadModifyWrite];

    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Update => "update",
            Op::ReadModifyWrite => "read_modify_write",
        }
    }
}

/// An empty histogram of latencies in microseconds, up to [`LATENCY_US_MAX`].
fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

/// Quantile `q` of a histogram of microseconds, in milliseconds.
fn quantile_ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// A latency histogram per kind of operation (microseconds), in [`Op::ALL`]'s order.
struct Latencies([Histogram<u64>; 3]);

impl Latencies {
    fn new() -> Latencies {
        Latencies([histogram(), histogram(), histogram()])
    }

    fn record(&mut self, op: Op, took: Duration) {
        self.0[op as usize].saturating_record((took.as_micros() as u64).clamp(1, LATENCY_US_MAX));
    }

    fn add(&mut self, other: &Latencies) {
        for (mine, theirs) in self.0.iter_mut().zip(&other.0) {
            // Same bounds on both sides: adding cannot fail.
            let _ = mine.add(theirs);
        }
    }

    /// Every operation's latencies together.
    fn all(&self) -> Histogram<u64> {
        let mut all = histogram();
        for h in &self.0 {
            let _ = all.add(h);
        }
        all
    }

    /// The kinds that ran, each with its histogram.
    fn ran(&self) -> impl Iterator<Item = (Op, &Histogram<u64>)> {
        Op::ALL.into_iter().zip(&self.0).filter(|(_, h)| !h.is_empty())
    }

    /// `{"read": {"ops", "p50", "p99", "p999", "max"}, ...}` in milliseconds, for the kinds
    /// that ran.
    fn by_op(&self) -> serde_json::Value {
        let doc: serde_json::Map<String, serde_json::Value> = self
            .ran()
            .map(|(op, h)| {
                let mut summary = summary_ms(h);
                summary["ops"] = json!(h.len());
                (op.name().to_string(), summary)
            })
            .collect();
        serde_json::Value::Object(doc)
    }

    /// `read p50 0.412 ms, p99 1.930 ms | update ...`: the kinds that ran, when more than one did.
    fn human(&self) -> Option<String> {
        (self.ran().count() > 1).then(|| {
            self.ran()
                .map(|(op, h)| {
                    let (p50, p99) = (quantile_ms(h, 0.5), quantile_ms(h, 0.99));
                    format!("{} {} ops, p50 {p50:.3} ms, p99 {p99:.3} ms", op.name(), h.len())
                })
                .collect::<Vec<_>>()
                .join(" | ")
        })
    }
}

/// `{"p50", "p99", "p999", "max"}` of a histogram of microseconds, in milliseconds.
fn summary_ms(h: &Histogram<u64>) -> serde_json::Value {
    let ms = |q: f64| quantile_ms(h, q);
    json!({"p50": ms(0.5), "p99": ms(0.99), "p999": ms(0.999), "max": h.max() as f64 / 1000.0})
}

/// One operation: which kind it was, and what it failed with, if it did.
async fn operation(client: &Client, mix: Mix, k: Bytes, value: &Bytes, rng: &mut impl Rng) -> (Op, Result<(), String>) {
    let get = |k: Bytes| client.request(ClientRequest::Get { key: k, r: None, ns: None });
    let put = |k: Bytes, context: Option<String>| {
        client.request(ClientRequest::Put { key: k, context, value: Some(value.clone()), w: None, ns: None })
    };
    match mix {
        Mix::Blind { read_share } | Mix::ReadModifyWrite { read_share } if rng.gen_bool(read_share) => {
            let read = match get(k).await {
                Ok(ClientResponse::Values { .. }) => Ok(()),
                other => Err(failure(other)),
            };
            (Op::Read, read)
        }
        Mix::Blind { .. } => (Op::Update, written(put(k, None).await)),
        Mix::ReadModifyWrite { .. } => {
            let done = match get(k.clone()).await {
                Ok(ClientResponse::Values { context, .. }) => written(put(k, context).await),
                other => Err(failure(other)),
            };
            (Op::ReadModifyWrite, done)
        }
    }
}

pub async fn run(args: BenchArgs, addr: SocketAddr, creds: &Credentials, frame_max: usize) -> Result<Outcome, Failure> {
    if args.keys == 0 || args.ops == 0 {
        return Err(Failure::new(exit::BAD_INPUT, "--keys and --ops must be at least 1"));
    }
    let duration = match args.duration {
        Some(s) if !(s.is_finite() && s > 0.0 && s <= 86_400.0) => {
            return Err(Failure::new(exit::BAD_INPUT, "--duration must be more than 0 and at most 86400 seconds"));
        }
        Some(s) => Some(Duration::from_secs_f64(s)),
        None => None,
    };
    let mix = Mix::of(&args.workload);
    // Routed by default (each request to a node of its key's preference list); --pin sends
    // everything to one node, --nodes spreads the clients over nodes (server-driven).
    let (clients, routing) = if let Some(pin) = &args.pin {
        let pin: SocketAddr = pin
            .parse()
            .map_err(|_| Failure::new(exit::BAD_INPUT, format!("--pin {pin:?} is not an IP:port address")))?;
        let c = Client::pinned(pin, creds, frame_max).await?;
        ((0..args.clients).map(|_| c.clone()).collect::<Vec<_>>(), format!("pinned to {pin}"))
    } else if !args.nodes.is_empty() {
        let mut pinned = Vec::new();
        for n in &args.nodes {
            let a: SocketAddr = n
                .parse()
                .map_err(|_| Failure::new(exit::BAD_INPUT, format!("--nodes {n:?} is not an IP:port address")))?;
            pinned.push(Client::pinned(a, creds, frame_max).await?);
        }
        let spread = (0..args.clients as usize).map(|i| pinned[i % pinned.len()].clone()).collect();
        (spread, format!("spread over {} nodes", pinned.len()))
    } else {
        let c = Client::connect(addr, creds, frame_max).await?.with_fastest_replica(!args.no_fastest);
        ((0..args.clients).map(|_| c.clone()).collect(), "routed".to_string())
    };
    let value = Bytes::from(vec![b'x'; args.value_size]);

    let preload_started = Instant::now();
    if !args.no_preload {
        let failures = preload(&clients, args.keys, &value, args.progress_json).await;
        let failed = failures.total();
        if failed > 0 {
            return Err(Failure::new(
                exit::UNAVAILABLE,
                format!("{failed} preload writes failed: {}", failures.summary()),
            ));
        }
    }
    let preload_s = preload_started.elapsed().as_secs_f64();

    // Operations are drawn from one budget (none with --duration), so fast clients do more.
    let budget = Arc::new(AtomicU64::new(if duration.is_some() { u64::MAX } else { args.ops }));
    let total = if duration.is_some() { None } else { Some(args.ops) };
    let bar = progress(total, &format!("workload {}", args.workload), args.progress_json);
    let lines = JsonProgress::start(args.progress_json, "run", &bar);
    let started = Instant::now();
    let runs = clients.iter().map(|client| {
        let (budget, value, bar) = (budget.clone(), value.clone(), bar.clone());
        async move {
            let mut latencies = Latencies::new();
            let (mut failures, mut done) = (Failures::default(), 0u64);
            let mut rng = rand::thread_rng();
            while budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1)).is_ok() {
                if duration.is_some_and(|d| started.elapsed() >= d) {
                    break;
                }
                let k = key(rng.gen_range(0..args.keys));
                let t = Instant::now();
                let (op, outcome) = operation(client, mix, k, &value, &mut rng).await;
                latencies.record(op, t.elapsed());
                if let Err(what) = outcome {
                    failures.record(what, 1);
                }
                done += 1;
                bar.inc(1);
            }
            (latencies, failures, done)
        }
    });
    // Polled as they wake (not all of them on every wake, as join_all does below 30).
    let results: Vec<_> = runs.collect::<FuturesUnordered<_>>().collect().await;
    let elapsed = started.elapsed().as_secs_f64();
    // Nodes the requests went to.
    let nodes = match (&args.pin, args.nodes.len()) {
        (Some(_), _) => 1,
        (None, 0) => clients.first().map(Client::connected).unwrap_or(0),
        (None, n) => n,
    };
    bar.finish_and_clear();
    lines.end();
    let mut latencies = Latencies::new();
    let (mut failures, mut ops) = (Failures::default(), 0u64);
    for (l, f, n) in results {
        latencies.add(&l);
        failures.add(f);
        ops = ops.saturating_add(n);
    }
    let errors = failures.total();
    let hist = latencies.all();
    let ms = |q: f64| quantile_ms(&hist, q);
    let doc = json!({
        "workload": args.workload, "ops": ops, "errors": errors, "clients": args.clients,
        "value_size": args.value_size, "keys": if args.no_preload { 0 } else { args.keys }, "key_space": args.keys,
        "routing": routing, "nodes": nodes, "ops_per_sec": ops as f64 / elapsed.max(1e-9), "duration_s": elapsed,
        "preload_s": preload_s,
        "latency_ms": summary_ms(&hist), "latency_ms_by_op": latencies.by_op(),
        "error_kinds": failures.counts,
    });
    let human = format!(
        "workload {} | {} ops, {} errors, {} clients ({}), {} keys | {:.0} ops/s | p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms",
        args.workload,
        ops,
        errors,
        args.clients,
        routing,
        args.keys,
        ops as f64 / elapsed.max(1e-9),
        ms(0.5),
        ms(0.99),
        ms(0.999)
    );
    let human = match latencies.human() {
        Some(by_op) => format!("{human}\n{by_op}"),
        None => human,
    };
    let human = if errors > 0 { format!("{human}\nerrors: {}", failures.summary()) } else { human };
    Ok(Outcome { doc, human, status: if errors > 0 { exit::UNAVAILABLE } else { exit::OK } })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Latencies are kept per kind of operation: the summary names the kinds that ran, with
    /// their counts and quantiles, all of them together make the overall figures, and the
    /// human line lists them only when there are several.
    #[test]
    fn latencies_are_reported_by_kind_of_operation() {
        let mut one = Latencies::new();
        for ms in 1..=100 {
            one.record(Op::Read, Duration::from_millis(ms));
        }
        one.record(Op::Update, Duration::from_millis(500));
        let by_op = one.by_op();
        assert_eq!(
            by_op.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()),
            Some(vec!["read".into(), "update".into()])
        );
        assert_eq!(by_op["read"]["ops"], 100);
        assert_eq!(by_op["update"]["ops"], 1);
        assert!((by_op["read"]["p50"].as_f64().unwrap_or(0.0) - 50.0).abs() < 0.1, "{by_op}");
        assert!((by_op["update"]["max"].as_f64().unwrap_or(0.0) - 500.0).abs() < 0.5, "{by_op}");
        let human = one.human().unwrap_or_default();
        assert!(human.starts_with("read 100 ops, p50 ") && human.contains(" | update 1 ops, "), "{human}");

        let mut merged = Latencies::new();
        merged.record(Op::ReadModifyWrite, Duration::from_millis(7));
        merged.add(&one);
        assert_eq!(merged.all().len(), 102);
        assert_eq!(merged.by_op()["read_modify_write"]["ops"], 1);

        let mut reads_only = Latencies::new();
        reads_only.record(Op::Read, Duration::from_micros(300));
        assert_eq!(reads_only.human(), None, "one kind: the overall line says it all");
        assert_eq!(reads_only.by_op().as_object().map(|o| o.len()), Some(1));
    }

    /// Failures are counted per description, at most `ERROR_KINDS_MAX` descriptions (the
    /// rest together), and merged runs add up.
    #[test]
    fn failures_are_counted_by_description_within_a_bound() {
        let mut one = Failures::default();
        for i in 0..ERROR_KINDS_MAX + 5 {
            one.record(format!("cause {i:02}"), 2);
        }
        one.record("cause 00".to_string(), 1);
        assert_eq!(one.counts.len(), ERROR_KINDS_MAX + 1);
        assert_eq!(one.counts["cause 00"], 3);
        assert_eq!(one.counts["(other errors)"], 10);
        assert_eq!(one.total(), 2 * (ERROR_KINDS_MAX as u64 + 5) + 1);
        let mut all = Failures::default();
        all.record("cause 00".to_string(), 4);
        all.add(one);
        assert_eq!(all.counts["cause 00"], 7);
        assert_eq!(all.total(), 2 * (ERROR_KINDS_MAX as u64 + 5) + 5);
        // Merged in order, "(other errors)" first: cause 15 no longer fits beside it.
        assert_eq!(all.counts.len(), ERROR_KINDS_MAX);
        assert!(all.summary().starts_with("12 x (other errors); 7 x cause 00; 2 x cause 01"), "{}", all.summary());
    }
}
