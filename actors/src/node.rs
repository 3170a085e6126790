//! Starting and stopping a node: read and check the config, open storage, bind the endpoint,
//! wire the stages together, and run until SIGINT or SIGTERM, then stop accepting work and
//! let in-flight commits finish.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use ringkv::admission::Admission;
use ringkv::anti_entropy::AntiEntropy;
use ringkv::config::{Config, Durability};
use ringkv::failure_detector::FailureDetector;
use ringkv::handoff::Handoff;
use ringkv::membership::{Identity, Membership};
use ringkv::reaper::Reaper;
use ringkv::replica::ReplicaLimits;
use ringkv::version::Actor as DotActor;
use ringkv::wire::FRAME_BYTES_MAX_DEFAULT;

use crate::admission::AdmissionActor;
use crate::anti_entropy::AntiEntropyActor;
use crate::client_api::{ClientApi, SetGossiper};
use crate::coordinator::Stages;
use crate::failure_detector::FailureDetectorActor;
use crate::gossiper::{Gossiper, SetFailureDetector, Subscribe};
use crate::handoff::HandoffActor;
use crate::net::{self, Credentials};
use crate::router::Router;
use crate::storage::{self, Query, Storage, StorageWorker};
use crate::transport::{SetRouter, Transport};

/// Why a node could not start; each maps to an exit status.
#[derive(Debug)]
pub enum StartError {
    /// Bad config (exit 2).
    Config(String),
    /// Anything else: storage, the port (exit 5).
    Other(String),
}

/// Read a config file, and its secret file if it names one.
pub fn load_config(path: &Path) -> Result<(Config, Vec<u8>), StartError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| StartError::Config(format!("cannot read {}: {e}", path.display())))?;
    let config = Config::parse(&text).map_err(|e| StartError::Config(format!("{}: {e}", path.display())))?;
    let secret = secret_of(&config, path)?;
    Ok((config, secret))
}

/// The cluster secret: `cluster.secret`, or the trimmed contents of `cluster.secret_file`
/// (relative to the config file's directory).
pub fn secret_of(config: &Config, config_path: &Path) -> Result<Vec<u8>, StartError> {
    match (&config.cluster.secret, &config.cluster.secret_file) {
        (Some(s), _) => Ok(s.as_bytes().to_vec()),
        (None, Some(f)) => {
            let p = config_path.parent().map(|d| d.join(f)).unwrap_or_else(|| PathBuf::from(f));
            let text = std::fs::read_to_string(&p).map_err(|e| {
                StartError::Config(format!("config key cluster.secret_file: cannot read {}: {e}", p.display()))
            })?;
            let s = text.trim();
            if s.is_empty() {
                return Err(StartError::Config(format!("config key cluster.secret_file: {} is empty", p.display())));
            }
            Ok(s.as_bytes().to_vec())
        }
        (None, None) => Err(StartError::Config("config key cluster.secret: give secret or secret_file".into())),
    }
}

/// Run a node until it is told to stop.
pub fn run(config_path: &Path) -> Result<(), StartError> {
    let (config, secret) = load_config(config_path)?;
    let config = Arc::new(config);
    let data_dir = PathBuf::from(&config.node.data_dir);
    let db_path = data_dir.join("ringkv.redb");
    let limits = ReplicaLimits {
        max_siblings: config.limits.max_siblings as usize,
        prune_threshold: config.cluster.clock_prune_threshold as usize,
    };
    let q = config.cluster.partitions;
    let durability = config.storage.durability;
    let worker = storage::open(&db_path, q, durability, limits).map_err(StartError::Other)?;
    let saved = worker.load_members().map_err(StartError::Other)?;
    if durability == Durability::Buffered {
        tracing::warn!(
            flush_interval_ms = config.storage.flush_interval_ms,
            "storage.durability = \"buffered\": acknowledged writes of the last interval can be lost in a crash"
        );
    }
    let system = System::new();
    system.block_on(async move { start_and_wait(config, secret, worker, saved, db_path).await })
}

async fn start_and_wait(
    config: Arc<Config>,
    secret: Vec<u8>,
    worker: StorageWorker,
    saved: Vec<ringkv::membership::Member>,
    db_path: PathBuf,
) -> Result<(), StartError> {
    let me = config.node.id.clone();
    let listen = config.listen_addr();
    let server = net::server_config().map_err(StartError::Other)?;
    let endpoint = net::endpoint(listen, Some(server)).map_err(|e| {
        StartError::Other(format!("cannot listen on {listen} (node.listen): {e}; is another node using the port?"))
    })?;
    let creds = Credentials { cluster: config.cluster.name.clone(), secret, node: Some(me.clone()) };

    // Storage: the redb worker thread and the group-commit front.
    let slot = Arc::new(Mutex::new(Some(worker)));
    let (q, durability) = (config.cluster.partitions, config.storage.durability);
    let limits = ReplicaLimits {
        max_siblings: config.limits.max_siblings as usize,
        prune_threshold: config.cluster.clock_prune_threshold as usize,
    };
    let worker_addr = SyncArbiter::start(1, move || {
        let taken = slot.lock().ok().and_then(|mut s| s.take());
        match taken {
            Some(w) => w,
            // The worker thread restarted: open the database again.
            None => match storage::open(&db_path, q, durability, limits) {
                Ok(w) => w,
                Err(e) => {
                    tracing::error!(error = %e, "cannot reopen storage; stopping");
                    std::process::exit(5);
                }
            },
        }
    });
    let flush = (durability == Durability::Buffered).then(|| Duration::from_millis(config.storage.flush_interval_ms));
    let dot_actor = DotActor(rand::random());
    let storage = Storage::new(worker_addr, dot_actor, config.storage.commit_batch_max as usize, flush).start();

    let frame_max = FRAME_BYTES_MAX_DEFAULT.max(2 * config.limits.max_value_bytes as usize + 64 * 1024);
    let transport = Transport::new(endpoint.clone(), creds, frame_max).start();
    let admission = AdmissionActor::new(Admission::new(
        config.handoff.max_inflight,
        config.anti_entropy.max_inflight,
        config.admission.latency_target_ms,
        config.admission.latency_window_ms,
    ))
    .start();

    // The failure detector and client API need each other's and the gossiper's addresses:
    // create their contexts first, then start them.
    let fd_ctx = Context::<FailureDetectorActor>::new();
    let fd_addr = fd_ctx.address();
    let stages = Stages { storage: storage.clone(), transport: transport.clone(), failure_detector: fd_addr.clone() };
    let client_api = ClientApi::new(me.clone(), config.clone(), stages, admission.clone()).start();

    let identity = Identity {
        id: me.clone(),
        addr: config.node.listen.clone(),
        zone: config.node.zone.clone(),
        weight: config.node.weight,
    };
    let membership = Membership::new(
        identity,
        config.node.seeds.clone(),
        saved,
        config.cluster.partitions,
        config.cluster.replicas,
        config.gossip.interval_ms,
        crate::clock::mono_ms(),
    );
    let gossiper =
        Gossiper::new(membership, transport.clone(), storage.clone(), vec![client_api.clone().recipient()]).start();
    let now = crate::clock::mono_ms();
    let n = config.cluster.replicas as usize;
    let handoff = HandoffActor::new(
        Handoff::new(config.handoff.interval_ms, 30_000, config.handoff.batch_keys as usize, now),
        Reaper::new(
            config.handoff.interval_ms,
            config.storage.tombstone_grace_ms,
            config.handoff.batch_keys as usize,
            now,
        ),
        me.clone(),
        n,
        storage.clone(),
        transport.clone(),
        admission.clone(),
        gossiper.clone(),
        vec![client_api.clone().recipient()],
    )
    .start();
    let anti_entropy = AntiEntropyActor::new(
        AntiEntropy::new(config.anti_entropy.interval_ms, 30_000, now),
        me.clone(),
        n,
        storage.clone(),
        transport.clone(),
        admission.clone(),
    )
    .start();
    gossiper.do_send(Subscribe(handoff.clone().recipient()));
    gossiper.do_send(Subscribe(anti_entropy.clone().recipient()));
    let fd_core =
        FailureDetector::new(config.failure_detector.probe_interval_ms, config.failure_detector.probe_interval_max_ms);
    fd_ctx.run(FailureDetectorActor::new(
        fd_core,
        transport.clone(),
        vec![
            client_api.clone().recipient(),
            gossiper.clone().recipient(),
            handoff.clone().recipient(),
            anti_entropy.clone().recipient(),
        ],
    ));
    gossiper.do_send(SetFailureDetector(fd_addr.clone()));
    client_api.do_send(SetGossiper(gossiper.clone()));
    transport.do_send(SetRouter(Router {
        client_api: client_api.clone(),
        storage: storage.clone(),
        gossiper: gossiper.clone(),
        failure_detector: fd_addr,
    }));

    tracing::info!(node = %me, %listen, cluster = %config.cluster.name, "node started");
    wait_for_signal().await;
    tracing::info!("stopping: no new connections; finishing in-flight commits");
    endpoint.close(0u32.into(), b"node stopping");
    // A flush queues behind every batch already sent to the worker.
    let _ = tokio::time::timeout(Duration::from_secs(10), storage.send(Query::Flush)).await;
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
