//! The storage stage: [`StorageWorker`] runs on its own thread (a `SyncArbiter`, since redb
//! blocks) and executes batches with [`ringkv_storage::Storage`]; [`StorageFront`] collects
//! the operations that arrive while a batch is running and sends them as the next batch,
//! so concurrent durable writes share one commit (group commit). A caller hears back only
//! after the batch holding its operation committed. In `buffered` mode a timer makes
//! commits durable every `storage.flush_interval_ms`.

use std::collections::VecDeque;
use std::time::Duration;

use actix::prelude::*;
use ringkv::store::{StoreError, StoreOp, StoreOutcome};
use ringkv_storage::Storage;
use tokio::sync::oneshot;

use crate::clock::now;

type Reply = oneshot::Sender<Result<StoreOutcome, StoreError>>;

/// Run one storage operation; durably when `durable`, whatever the node's mode.
#[derive(Message)]
#[rtype(result = "Result<StoreOutcome, StoreError>")]
pub struct StoreRequest {
    pub op: StoreOp,
    pub durable: bool,
}

/// The redb side.
pub struct StorageWorker {
    storage: Storage,
}

impl StorageWorker {
    pub fn new(storage: Storage) -> Self {
        StorageWorker { storage }
    }
}

impl Actor for StorageWorker {
    type Context = SyncContext<Self>;
}

#[derive(Message)]
#[rtype(result = "Vec<Result<StoreOutcome, StoreError>>")]
struct Batch {
    ops: Vec<StoreOp>,
    durable: bool,
}

impl Handler<Batch> for StorageWorker {
    type Result = MessageResult<Batch>;
    fn handle(&mut self, b: Batch, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.storage.run(b.ops, b.durable, now().wall_ms))
    }
}

/// Make buffered commits durable.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct Flush;

impl Handler<Flush> for StorageWorker {
    type Result = Result<(), String>;
    fn handle(&mut self, _: Flush, _: &mut Self::Context) -> Self::Result {
        self.storage.flush()
    }
}

/// A clean stop: flush and mark the store closed.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
struct Close;

impl Handler<Close> for StorageWorker {
    type Result = Result<(), String>;
    fn handle(&mut self, _: Close, _: &mut Self::Context) -> Self::Result {
        self.storage.close(now().wall_ms)
    }
}

/// Operations waiting for the next batch at most; more are refused as overloaded.
const PENDING_MAX: usize = 64 * 1024;

/// The front of the storage stage: group commit.
pub struct StorageFront {
    worker: Addr<StorageWorker>,
    pending: VecDeque<(StoreOp, bool, Reply)>,
    busy: bool,
    batch_max: usize,
    flush_interval: Option<Duration>,
}

impl StorageFront {
    pub fn new(worker: Addr<StorageWorker>, batch_max: usize, flush_interval: Option<Duration>) -> Self {
        StorageFront { worker, pending: VecDeque::new(), busy: false, batch_max: batch_max.max(1), flush_interval }
    }

    fn kick(&mut self, ctx: &mut Context<Self>) {
        if self.busy || self.pending.is_empty() {
            return;
        }
        self.busy = true;
        let n = self.pending.len().min(self.batch_max);
        let mut ops = Vec::with_capacity(n);
        let mut replies = Vec::with_capacity(n);
        let mut durable = false;
        for (op, d, tx) in self.pending.drain(..n) {
            ops.push(op);
            durable |= d;
            replies.push(tx);
        }
        self.worker
            .send(Batch { ops, durable })
            .into_actor(self)
            .map(move |res, act, ctx| {
                let outcomes = res.unwrap_or_else(|e| {
                    (0..replies.len()).map(|_| Err(StoreError::Io(format!("storage worker gone: {e}")))).collect()
                });
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
            ctx.run_interval(every, |act, _| act.worker.do_send(Flush));
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
        self.pending.push_back((req.op, req.durable, tx));
        self.kick(ctx);
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
        let worker = self.worker.clone();
        Box::pin(async move { worker.send(Close).await.map_err(|e| e.to_string())? })
    }
}
