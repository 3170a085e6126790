//! `ringkv bench`: a YCSB-style load generator. Workload a is 50% reads and 50% updates, b
//! 95/5, c read-only; keys are drawn uniformly from `--keys` and preloaded first. Each client
//! is one connection, spread round-robin over the cluster's nodes, issuing one request at a
//! time. Latencies go into an HDR histogram (microseconds).

use std::net::SocketAddr;
use std::time::Instant;

use hdrhistogram::Histogram;
use rand::Rng;
use ringkv::wire::{ClientRequest, ClientResponse};
use serde_json::json;

use crate::args::BenchArgs;
use crate::outcome::{exit, Failure, Outcome};
use ringkv_client::Client;
use ringkv_client::Credentials;

fn key(i: u64) -> Vec<u8> {
    format!("bench:{i:010}").into_bytes()
}

/// Addresses to spread clients over: `--nodes`, else every member the node reports.
async fn node_addrs(args: &BenchArgs, first: &Client, addr: SocketAddr) -> Vec<SocketAddr> {
    if !args.nodes.is_empty() {
        return args.nodes.iter().filter_map(|n| n.parse().ok()).collect();
    }
    let mut out = vec![addr];
    if let Ok(ClientResponse::Document { json }) = first.request(ClientRequest::Status).await {
        if let Ok(doc) = serde_json::from_str::<serde_json::Value>(&json) {
            for m in doc["members"].as_array().into_iter().flatten() {
                if m["state"] == "up" {
                    if let Some(a) = m["addr"].as_str().and_then(|a| a.parse().ok()) {
                        if !out.contains(&a) {
                            out.push(a);
                        }
                    }
                }
            }
        }
    }
    out
}

pub async fn run(args: BenchArgs, addr: SocketAddr, creds: &Credentials, frame_max: usize) -> Result<Outcome, Failure> {
    if args.keys == 0 || args.ops == 0 {
        return Err(Failure::new(exit::BAD_INPUT, "--keys and --ops must be at least 1"));
    }
    let read_share = match args.workload.as_str() {
        "a" => 0.5,
        "b" => 0.95,
        _ => 1.0,
    };
    let first = Client::connect(addr, creds, frame_max).await?;
    let addrs = node_addrs(&args, &first, addr).await;
    let mut clients = Vec::with_capacity(args.clients as usize);
    for i in 0..args.clients as usize {
        clients.push(Client::connect(addrs[i % addrs.len()], creds, frame_max).await?);
    }
    let value = vec![b'x'; args.value_size];

    // Preload every key, spread over the clients.
    let per = args.keys.div_ceil(clients.len() as u64);
    let loads = clients.iter().enumerate().map(|(c, client)| {
        let value = value.clone();
        async move {
            let mut errors = 0u64;
            for i in (c as u64 * per)..((c as u64 + 1) * per).min(args.keys) {
                let req = ClientRequest::Put {
                    key: key(i).into(),
                    context: None,
                    value: Some(value.clone().into()),
                    w: None,
                };
                if !matches!(client.request(req).await, Ok(ClientResponse::Written { .. })) {
                    errors += 1;
                }
            }
            errors
        }
    });
    let load_errors: u64 = futures::future::join_all(loads).await.into_iter().sum();
    if load_errors > 0 {
        return Err(Failure::new(exit::UNAVAILABLE, format!("{load_errors} preload writes failed")));
    }

    let ops_per = args.ops.div_ceil(clients.len() as u64);
    let started = Instant::now();
    let runs = clients.iter().enumerate().map(|(c, client)| {
        let value = value.clone();
        let n = ops_per.min(args.ops.saturating_sub(c as u64 * ops_per));
        async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
            let mut errors = 0u64;
            let mut rng = rand::thread_rng();
            for _ in 0..n {
                let k = key(rng.gen_range(0..args.keys));
                let read = rng.gen_bool(read_share);
                let t = Instant::now();
                let ok = if read {
                    matches!(
                        client.request(ClientRequest::Get { key: k.into(), r: None }).await,
                        Ok(ClientResponse::Values { .. })
                    )
                } else {
                    let req =
                        ClientRequest::Put { key: k.into(), context: None, value: Some(value.clone().into()), w: None };
                    matches!(client.request(req).await, Ok(ClientResponse::Written { .. }))
                };
                let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                if !ok {
                    errors += 1;
                }
            }
            (hist, errors, n)
        }
    });
    let results = futures::future::join_all(runs).await;
    let elapsed = started.elapsed().as_secs_f64();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
    let (mut errors, mut ops) = (0, 0);
    for (h, e, n) in results {
        let _ = hist.add(h);
        errors += e;
        ops += n;
    }
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let doc = json!({
        "workload": args.workload, "ops": ops, "errors": errors, "clients": args.clients,
        "value_size": args.value_size, "keys": args.keys, "nodes": addrs.len(),
        "ops_per_sec": ops as f64 / elapsed.max(1e-9),
        "latency_ms": {"p50": ms(0.5), "p99": ms(0.99), "p999": ms(0.999), "max": hist.max() as f64 / 1000.0},
    });
    let human = format!(
        "workload {} | {} ops, {} errors, {} clients over {} nodes | {:.0} ops/s | p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms",
        args.workload,
        ops,
        errors,
        args.clients,
        addrs.len(),
        ops as f64 / elapsed.max(1e-9),
        ms(0.5),
        ms(0.99),
        ms(0.999)
    );
    Ok(Outcome { doc, human, status: if errors > 0 { exit::UNAVAILABLE } else { exit::OK } })
}
