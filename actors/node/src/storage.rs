//! The storage stage: [`StorageWorker`] runs on its own thread (redb blocks; it parks while
//! idle) and executes batches with [`ringkv_storage::Storage`]; [`StorageFront`] collects
//! the operations that arrive while a batch is running, and those the tasks ready now
//! produce, and sends them as the next batch, so concurrent durable writes share one commit
//! (group commit). A caller hears back only after the batch holding its operation
//! committed. In `buffered` mode a timer makes commits durable every
//! `storage.flush_interval_ms`. (Row reads do not come here: stage actors run them.) A
//! coordinated write's outcome is also sent `ahead`, once computed and before its batch
//! commits, to whoever asked for it.

use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

use actix::prelude::*;
use ringkv::store::{StoreError, StoreOp, StoreOutcome};
use ringkv_storage::Storage;
use tokio::sync::{mpsc, oneshot};

use crate::clock::now;
use crate::metrics::NodeMetrics;

type Reply = oneshot::Sender<Result<StoreOutcome, StoreError>>;
/// Where a coordinated write's outcome goes ahead of its commit.
pub type Ahead = oneshot::Sender<StoreOutcome>;

/// Run one storage operation; durably when `durable`, whatever the node's mode.
#[derive(Message)]
#[rtype(result = "Result<StoreOutcome, StoreError>")]
pub struct StoreRequest {
    pub op: StoreOp,
    pub durable: bool,
    /// Hears a coordinated write's outcome before the commit.
    pub ahead: Option<Ahead>,
}

/// The redb side: a thread of its own (redb blocks) taking jobs in order from a channel,
/// parked while there is none.
pub struct StorageWorker {
    jobs: mpsc::UnboundedSender<Job>,
}

enum Job {
    Batch {
        ops: Vec<StoreOp>,
        durable: bool,
        aheads: Vec<Option<Ahead>>,
        reply: oneshot::Sender<Vec<Result<StoreOutcome, StoreError>>>,
    },
    /// Make buffered commits durable.
    Flush,
    /// A clean stop: flush and mark the store closed.
    Close { reply: oneshot::Sender<Result<(), String>> },
}

/// Stops the node when the storage thread dies: nothing could be stored any more.
struct ExitOnPanic;

impl Drop for ExitOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("the storage thread failed; stopping the node");
            std::process::exit(5);
        }
    }
}

impl StorageWorker {
    /// Start the thread; each batch's size and commit time go to `metrics`.
    pub fn start(mut storage: Storage, metrics: NodeMetrics) -> std::io::Result<StorageWorker> {
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
        std::thread::Builder::new().name("ringkv-storage".into()).spawn(move || {
            let _guard = ExitOnPanic;
            while let Some(job) = rx.blocking_recv() {
                match job {
                    Job::Batch { ops, durable, mut aheads, reply } => {
                        let mut send_ahead = |k: usize, outcome: &StoreOutcome| {
                            if let Some(tx) = aheads.get_mut(k).and_then(Option::take) {
                                let _ = tx.send(outcome.clone());
                            }
                        };
                        let (n, started) = (ops.len(), std::time::Instant::now());
                        let outcomes = storage.run(ops, durable, now().wall_ms, &mut send_ahead);
                        metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
                        metrics.commit_ops.observe(n as f64);
                        let _ = reply.send(outcomes);
                    }
                    Job::Flush => {
                        if let Err(e) = storage.flush() {
                            tracing::error!(error = %e, "storage flush failed");
                        }
                    }
                    Job::Close { reply } => {
                        let _ = reply.send(storage.close(now().wall_ms));
                    }
                }
            }
        })?;
        Ok(StorageWorker { jobs })
    }

    /// Run a batch; the outcomes once it committed.
    async fn run(
        &self,
        ops: Vec<StoreOp>,
        durable: bool,
        aheads: Vec<Option<Ahead>>,
    ) -> Vec<Result<StoreOutcome, StoreError>> {
        let n = ops.len();
        let (reply, rx) = oneshot::channel();
        let sent = self.jobs.send(Job::Batch { ops, durable, aheads, reply }).is_ok();
        match rx.await {
            Ok(outcomes) if sent => outcomes,
            _ => (0..n).map(|_| Err(StoreError::Io("storage worker gone".into()))).collect(),
        }
    }
}

/// Operations waiting for the next batch at most; more are refused as overloaded.
const PENDING_MAX: usize = 64 * 1024;

/// The front of the storage stage: group commit.
pub struct StorageFront {
    worker: Rc<StorageWorker>,
    pending: VecDeque<(StoreOp, bool, Option<Ahead>, Reply)>,
    busy: bool,
    kick_scheduled: bool,
    batch_max: usize,
    flush_interval: Option<Duration>,
}

impl StorageFront {
    pub fn new(worker: StorageWorker, batch_max: usize, flush_interval: Option<Duration>) -> Self {
        StorageFront {
            worker: Rc::new(worker),
            pending: VecDeque::new(),
            busy: false,
            kick_scheduled: false,
            batch_max: batch_max.max(1),
            flush_interval,
        }
    }

    fn kick(&mut self, ctx: &mut Context<Self>) {
        if self.busy || self.pending.is_empty() {
            return;
        }
        self.busy = true;
        let n = self.pending.len().min(self.batch_max);
        let mut ops = Vec::with_capacity(n);
        let mut aheads = Vec::with_capacity(n);
        let mut replies = Vec::with_capacity(n);
        let mut durable = false;
        for (op, d, ahead, tx) in self.pending.drain(..n) {
            ops.push(op);
            durable |= d;
            aheads.push(ahead);
            replies.push(tx);
        }
        let worker = self.worker.clone();
        async move { worker.run(ops, durable, aheads).await }
            .into_actor(self)
            .map(move |outcomes, act, ctx| {
                for (tx, out) in replies.into_iter().zip(outcomes) {
                    let _ = tx.send(out);
                }
                act.busy = false;
                act.kick(ctx);
            })
            .spawn(ctx);
    }
}

impl Actor for StorageFront {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(64 * 1024);
        if let Some(every) = self.flush_interval {
            ctx.run_interval(every, |act, _| {
                let _ = act.worker.jobs.send(Job::Flush);
            });
        }
    }
}

impl Handler<StoreRequest> for StorageFront {
    type Result = ResponseFuture<Result<StoreOutcome, StoreError>>;

    fn handle(&mut self, req: StoreRequest, ctx: &mut Context<Self>) -> Self::Result {
        if self.pending.len() >= PENDING_MAX {
            return Box::pin(async { Err(StoreError::Io("storage overloaded".into())) });
        }
        let (tx, rx) = oneshot::channel();
        self.pending.push_back((req.op, req.durable, req.ahead, tx));
        // The batch leaves once every task ready now has run: what they store joins it.
        if !self.busy && !self.kick_scheduled {
            self.kick_scheduled = true;
            ctx.spawn(actix::fut::wrap_future::<_, Self>(tokio::task::yield_now()).map(|_, act, ctx| {
                act.kick_scheduled = false;
                act.kick(ctx);
            }));
        }
        Box::pin(async move { rx.await.unwrap_or_else(|_| Err(StoreError::Io("storage stopped".into()))) })
    }
}

/// Wait for every queued batch, then flush and mark the store closed (a clean stop).
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct Drain;

impl Handler<Drain> for StorageFront {
    type Result = ResponseFuture<Result<(), String>>;
    fn handle(&mut self, _: Drain, _: &mut Context<Self>) -> Self::Result {
        // The close (a durable commit) queues behind every batch already sent to the worker.
        let (reply, rx) = oneshot::channel();
        let sent = self.worker.jobs.send(Job::Close { reply }).is_ok();
        Box::pin(async move {
            match rx.await {
                Ok(r) if sent => r,
                _ => Err("storage worker gone".into()),
            }
        })
    }
}
