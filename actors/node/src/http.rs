//! The node's HTTP listener (`[metrics] listen`), beside the QUIC endpoint: `GET /metrics`
//! (Prometheus text: every stage's figures, collected from the stage actors on each scrape,
//! and the shell's), `GET /api/cluster` (this node's view of the cluster as JSON: its
//! `status` document, the ring, and a few minutes of history) and `GET /` (the cluster page,
//! static HTML and JavaScript compiled into the binary, which polls `/api/cluster`).
//!
//! hyper serves HTTP/1.1 on the node's actix system thread. At most
//! [`CONNECTIONS_MAX`] connections are served at once (more are closed at once), and a
//! request's headers must arrive within [`HEADER_TIMEOUT`].

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use actix::prelude::*;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use ringkv::admission::AdmissionStage;
use ringkv::coordinator::CoordinatorStage;
use ringkv::gossip::GossipStage;
use ringkv::handoff::HandoffStage;
use ringkv::metrics::Report;
use serde_json::json;

use crate::clock::wall_ms;
use crate::metrics::{render, NodeMetrics, CONTENT_TYPE as METRICS_TYPE};
use crate::stage_actor::{Collect, Peek, StageActor};

/// The cluster page.
const PAGE: &str = include_str!("page.html");

/// HTTP connections served at once.
pub const CONNECTIONS_MAX: usize = 64;

/// How long a request's headers may take to arrive.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the history behind the page's charts takes a sample.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// Samples kept: ten minutes.
pub const SAMPLES_MAX: usize = 120;

/// Where the listener's answers come from: every stage actor (figures), and the few whose
/// state the page shows.
pub struct Sources {
    pub stages: Vec<Recipient<Collect>>,
    pub gossip: Addr<StageActor<GossipStage>>,
    pub coordinator: Addr<StageActor<CoordinatorStage>>,
    pub admission: Addr<StageActor<AdmissionStage>>,
    pub handoff: Addr<StageActor<HandoffStage>>,
    pub shell: NodeMetrics,
}

/// One point of the page's charts.
#[derive(Clone, Debug)]
struct Point {
    wall_ms: u64,
    requests: u64,
    /// Client requests a second since the point before.
    rate: Option<f64>,
    p99_ms: Option<u64>,
    hints: u64,
    transfers: u64,
}

/// The listener's state.
struct Server {
    sources: Sources,
    history: RefCell<VecDeque<Point>>,
    connections: Cell<usize>,
}

/// Bind the listener (before the node starts anything else, so a bad address stops it at
/// once).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serve `listener` from the current actix system, and sample the history.
pub fn serve(listener: std::net::TcpListener, sources: Sources) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let server = Rc::new(Server { sources, history: RefCell::default(), connections: Cell::new(0) });
    let sampler = server.clone();
    actix::spawn(async move {
        let mut every = tokio::time::interval(SAMPLE_INTERVAL);
        loop {
            every.tick().await;
            sampler.sample().await;
        }
    });
    actix::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::debug!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if server.connections.get() >= CONNECTIONS_MAX {
                drop(stream);
                continue;
            }
            server.connections.set(server.connections.get() + 1);
            let server = server.clone();
            actix::spawn(async move {
                let answer = server.clone();
                let service = hyper::service::service_fn(move |req| {
                    let server = answer.clone();
                    async move { Ok::<_, Infallible>(server.answer(req).await) }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                if let Err(e) = served {
                    tracing::debug!(error = %e, "metrics listener: connection ended");
                }
                server.connections.set(server.connections.get().saturating_sub(1));
            });
        }
    });
    Ok(())
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

impl Server {
    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut r = respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", "only GET\n");
            r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        match req.uri().path() {
            "/metrics" => respond(StatusCode::OK, METRICS_TYPE, render(self.report().await, &self.sources.shell)),
            "/api/cluster" => {
                let doc = self.cluster().await;
                respond(StatusCode::OK, "application/json", doc.to_string())
            }
            "/" | "/index.html" => respond(StatusCode::OK, "text/html; charset=utf-8", PAGE),
            _ => respond(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "not found: try /metrics, /api/cluster or /\n",
            ),
        }
    }

    /// Every stage's figures.
    async fn report(&self) -> Report {
        let answers = futures::future::join_all(self.sources.stages.iter().map(|s| s.send(Collect))).await;
        let mut all = Report::default();
        for r in answers.into_iter().flatten() {
            all.extend(r);
        }
        all
    }

    /// `/api/cluster`: the `status` document, the ring (`null` before joining), the history.
    async fn cluster(&self) -> serde_json::Value {
        let status = self.sources.gossip.send(Peek(Box::new(|g: &mut GossipStage| (g.status_json(), g.ring_json()))));
        let (mut doc, ring) = match status.await {
            Ok(both) => both,
            Err(e) => return json!({"error": format!("the gossip stage did not answer: {e}")}),
        };
        let history: Vec<serde_json::Value> = self
            .history
            .borrow()
            .iter()
            .map(|p| {
                json!({"wall_ms": p.wall_ms, "requests": p.requests, "rate": p.rate, "p99_ms": p.p99_ms,
                       "hints": p.hints, "transfers": p.transfers})
            })
            .collect();
        if let Some(d) = doc.as_object_mut() {
            d.insert("ring".into(), ring.unwrap_or(serde_json::Value::Null));
            d.insert("history".into(), json!(history));
            d.insert("sample_interval_ms".into(), json!(SAMPLE_INTERVAL.as_millis() as u64));
        }
        doc
    }

    /// Take one point of history.
    async fn sample(&self) {
        let s = &self.sources;
        let requests = s.coordinator.send(Peek(Box::new(|c: &mut CoordinatorStage| c.answered_total())));
        let p99 = s.admission.send(Peek(Box::new(|a: &mut AdmissionStage| a.admission().p99_ms())));
        let pending = s.handoff.send(Peek(Box::new(|h: &mut HandoffStage| h.pending())));
        let (Ok(requests), Ok(p99_ms), Ok((hints, transfers))) = (requests.await, p99.await, pending.await) else {
            return;
        };
        let wall_ms = wall_ms();
        let mut history = self.history.borrow_mut();
        let rate = history.back().and_then(|prev| {
            let secs = wall_ms.saturating_sub(prev.wall_ms) as f64 / 1000.0;
            (secs > 0.0).then(|| requests.saturating_sub(prev.requests) as f64 / secs)
        });
        if history.len() >= SAMPLES_MAX {
            history.pop_front();
        }
        history.push_back(Point { wall_ms, requests, rate, p99_ms, hints, transfers });
    }
}
