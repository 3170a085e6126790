//! Starting and stopping a node: read and check the config, open storage, bind the
//! endpoint, build the core's stages and start one actor for each, wire them together, and
//! run until SIGINT or SIGTERM, then stop accepting work and let in-flight commits finish.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use ringkv::access::Identity;
use ringkv::config::{Config, Durability};
use ringkv::node::{NodeSettings, Stages};
use ringkv::stage::{Stage, StageId};
use ringkv_storage::Storage;
use ringkv_transport::{self as net, Auth, Credentials};

use crate::clock::now;
use crate::metrics::NodeMetrics;
use crate::stage_actor::{Collect, Deliver, Routes, StageActor};
use crate::storage::{Drain, StorageFront, StorageWorker};
use crate::transport::{SetStages, TransportActor};

/// Why a node could not start; each maps to an exit status.
#[derive(Debug)]
pub enum StartError {
    /// Bad config (exit 2).
    Config(String),
    /// Anything else: storage, the port (exit 5).
    Other(String),
}

impl StartError {
    /// The exit status of the contract: 2 for a bad config, 5 for anything else.
    pub fn status(&self) -> i32 {
        match self {
            StartError::Config(_) => 2,
            StartError::Other(_) => 5,
        }
    }

    /// What went wrong and what to do.
    pub fn message(&self) -> &str {
        match self {
            StartError::Config(m) | StartError::Other(m) => m,
        }
    }
}

/// Read a config file and the credentials it names (its secret file, or its `[tls]` files),
/// and hold them to what a node needs: a secret of at least
/// [`ringkv::config::SECRET_BYTES_MIN`] bytes, or a certificate that names this node. Every
/// check of a config happens here: [`run`] starts with it and `ringkv-node check-config`
/// runs only it.
pub fn load_config(path: &Path) -> Result<(Config, Auth), StartError> {
    let (config, auth) = net::load_config(path).map_err(StartError::Config)?;
    let fail = |e: String| StartError::Config(format!("{}: {e}", path.display()));
    match &auth {
        Auth::Secret(secret) => {
            let key = if config.cluster.secret.is_some() { "cluster.secret" } else { "cluster.secret_file" };
            ringkv::config::check_secret(key, secret).map_err(|e| fail(e.to_string()))?;
        }
        Auth::Tls(tls) => match tls.identity() {
            Identity::Node(id) if *id == config.node.id => {}
            other => {
                return Err(fail(format!(
                    "config key tls.cert: the certificate is {other:?}, not node {:?}'s; \
                     make one with `ringkv-node certs create-node --id {}`",
                    config.node.id, config.node.id
                )))
            }
        },
    }
    Ok((config, auth))
}

/// Bind `[metrics] listen`, if set: an address this machine does not have is a config error
/// (exit 2), a port in use is not (exit 5, as for `node.listen`).
fn bind_metrics(config_path: &Path, config: &Config) -> Result<Option<std::net::TcpListener>, StartError> {
    use std::io::ErrorKind;
    let Some(addr) = config.metrics_addr() else { return Ok(None) };
    crate::http::bind(addr).map(Some).map_err(|e| match e.kind() {
        ErrorKind::AddrInUse => StartError::Other(format!(
            "cannot listen on {addr} (metrics.listen): {e}; is another process using the port?"
        )),
        _ => StartError::Config(format!(
            "{}: config key metrics.listen: cannot listen on {addr}: {e}; give an address of this machine",
            config_path.display()
        )),
    })
}

/// Run a node until it is told to stop.
pub fn run(config_path: &Path) -> Result<(), StartError> {
    let (config, auth) = load_config(config_path)?;
    let metrics_listener = bind_metrics(config_path, &config)?;
    let mut settings = NodeSettings::from_config(&config);
    if let Auth::Tls(tls) = &auth {
        settings.identity.signer = Some(ringkv::membership::Signer(Arc::new(tls.clone())));
    }
    let db_path = PathBuf::from(&config.node.data_dir).join("ringkv.redb");
    let opened =
        Storage::open(&db_path, config.cluster.partitions, settings.store, config.storage.durability, rand::random())
            .map_err(StartError::Other)?;
    if config.storage.durability == Durability::Buffered {
        tracing::warn!(
            flush_interval_ms = config.storage.flush_interval_ms,
            "storage.durability = \"buffered\": acknowledged writes of the last interval can be lost if the machine crashes"
        );
    }
    tracing::info!(
        objects = opened.report.objects,
        hints = opened.report.hints,
        fresh = opened.report.fresh,
        "storage open"
    );
    let system = System::new();
    system.block_on(async move {
        let config = Arc::new(config);
        start_and_wait(config, settings, auth, opened.storage, opened.saved, metrics_listener).await
    })
}

/// Start one stage's actor in a context made earlier (so every address exists first).
fn start_stage<S: Stage + Unpin + 'static>(ctx: Context<StageActor<S>>, stage: S, routes: &Rc<Routes>) {
    ctx.run(StageActor::new(stage, routes.clone()));
}

async fn start_and_wait(
    config: Arc<Config>,
    settings: NodeSettings,
    auth: Auth,
    storage: Storage,
    saved: ringkv::store::Saved,
    metrics_listener: Option<std::net::TcpListener>,
) -> Result<(), StartError> {
    let metrics = NodeMetrics::default();
    let me = config.node.id.clone();
    let listen = config.listen_addr();
    match &auth {
        Auth::Tls(_) => tracing::info!("mutual TLS: peers and clients are who their certificates say"),
        Auth::Secret(_) => tracing::warn!(
            "secret-only mode: the cluster secret is the whole trust boundary (whoever holds it may act as any \
             node or administrator); set up [tls] to tell nodes, clients and operators apart"
        ),
    }
    let creds = Credentials { cluster: config.cluster.name.clone(), auth, node: Some(me.clone()) };
    let server = creds.server_config().map_err(StartError::Other)?;
    let endpoint = net::endpoint(listen, Some(server)).map_err(|e| {
        StartError::Other(format!("cannot listen on {listen} (node.listen): {e}; is another node using the port?"))
    })?;

    // Storage: the redb worker thread and the group-commit front; row reads run on this
    // thread in read snapshots.
    let reader = storage.reader();
    let worker = StorageWorker::start(storage, metrics.clone(), config.storage.commit_batch_max as usize)
        .map_err(|e| StartError::Other(format!("cannot start the storage thread: {e}")))?;
    let flush = (config.storage.durability == Durability::Buffered)
        .then(|| Duration::from_millis(config.storage.flush_interval_ms));
    let storage = StorageFront::new(worker, flush).start();
    let transport = TransportActor::new(endpoint.clone(), creds, settings.frame_bytes_max, metrics.clone()).start();

    // Every stage's context first, so every stage knows every other's address.
    let stages = Stages::new(&settings, saved, now());
    let c_coordinator = Context::new();
    let c_replica = Context::new();
    let c_gossip = Context::new();
    let c_fd = Context::new();
    let c_handoff = Context::new();
    let c_ae = Context::new();
    let c_admission = Context::new();
    let recipients: Vec<(StageId, Recipient<Deliver>)> = vec![
        (StageId::Coordinator, c_coordinator.address().recipient()),
        (StageId::Replica, c_replica.address().recipient()),
        (StageId::Gossip, c_gossip.address().recipient()),
        (StageId::FailureDetector, c_fd.address().recipient()),
        (StageId::Handoff, c_handoff.address().recipient()),
        (StageId::AntiEntropy, c_ae.address().recipient()),
        (StageId::Admission, c_admission.address().recipient()),
    ];
    transport.do_send(SetStages(recipients.clone()));
    if let Some(listener) = metrics_listener {
        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let sources = crate::http::Sources {
            stages: vec![
                c_coordinator.address().recipient::<Collect>(),
                c_replica.address().recipient(),
                c_gossip.address().recipient(),
                c_fd.address().recipient(),
                c_handoff.address().recipient(),
                c_ae.address().recipient(),
                c_admission.address().recipient(),
            ],
            gossip: c_gossip.address(),
            coordinator: c_coordinator.address(),
            admission: c_admission.address(),
            handoff: c_handoff.address(),
            shell: metrics.clone(),
        };
        crate::http::serve(listener, sources)
            .map_err(|e| StartError::Other(format!("cannot serve metrics on {addr}: {e}")))?;
        tracing::info!(%addr, "metrics on http://{addr}/metrics, the cluster page on http://{addr}/");
    }
    let routes = Rc::new(Routes {
        stages: recipients,
        transport: transport.clone(),
        storage: storage.clone(),
        reader,
        metrics: metrics.clone(),
    });
    let Stages { coordinator, replica, gossip, failure_detector, handoff, anti_entropy, admission } = stages;
    start_stage(c_coordinator, coordinator, &routes);
    start_stage(c_replica, replica, &routes);
    start_stage(c_gossip, gossip, &routes);
    start_stage(c_fd, failure_detector, &routes);
    start_stage(c_handoff, handoff, &routes);
    start_stage(c_ae, anti_entropy, &routes);
    start_stage(c_admission, admission, &routes);

    tracing::info!(node = %me, %listen, cluster = %config.cluster.name, "node started");
    wait_for_signal().await;
    tracing::info!("stopping: no new connections; finishing in-flight commits");
    endpoint.close(0u32.into(), b"node stopping");
    let _ = tokio::time::timeout(Duration::from_secs(10), storage.send(Drain)).await;
    System::current().stop();
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
