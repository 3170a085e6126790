//! The storage stage: [`StorageWorker`] runs on its own thread (redb blocks; it parks while
//! idle) and executes batches with [`ringkv_storage::Storage`]. [`StorageFront`] hands it
//! the operations the tasks ready now produce, as one job, without waiting for the batch
//! before to finish; the worker joins every job queued while it was busy into its next
//! batch, so concurrent durable writes share one commit (group commit) and the worker never
//! waits for the node's thread between two batches. A stage hears back only after the
//! batch holding its operation was logged: the worker puts the outcome straight into the
//! stage's mailbox ([`Input::Stored`]), so the node's thread is woken once per batch and
//! stage, not once per operation. In `buffered` mode a timer flushes the commit log every
//! `storage.flush_interval_ms`. (Row reads do not come here: stage actors run them.) A
//! coordinated write's outcome also goes in ahead ([`Input::Ahead`]), once computed and
//! before its batch commits.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use ringkv::stage::Input;
use ringkv::store::{StoreError, StoreOp, StoreOutcome};
use ringkv_storage::Storage;
use tokio::sync::{mpsc, oneshot};

use crate::clock::now;
use crate::mailbox::Deliver;
use crate::metrics::NodeMetrics;

/// Where a storage operation's outcome goes: the stage that asked, under its token. A
/// reply dropped unanswered (the worker gone, the node stopping) tells the stage that
/// storage stopped, so no stage waits forever.
pub struct Reply {
    to: Option<Recipient<Deliver>>,
    token: u64,
    /// The stage wants a coordinated write's outcome ahead of the commit as well.
    ahead: bool,
}

impl Reply {
    /// The outcome of operation `token` goes to `to` (and ahead of the commit too, with
    /// `ahead`).
    pub fn to(to: Recipient<Deliver>, token: u64, ahead: bool) -> Reply {
        Reply { to: Some(to), token, ahead }
    }

    /// Nobody waits for this operation's outcome.
    pub fn none() -> Reply {
        Reply { to: None, token: 0, ahead: false }
    }

    /// Put the outcome in the stage's mailbox.
    fn send(mut self, result: Result<StoreOutcome, StoreError>) {
        self.stored(result);
    }

    /// The operation's `Input::Stored`, once: sent whatever the mailbox holds (there are no
    /// more outcomes than operations the stage queued, and those are bounded).
    fn stored(&mut self, result: Result<StoreOutcome, StoreError>) {
        if let Some(to) = self.to.take() {
            to.do_send(Deliver(Input::Stored { token: self.token, result }, None));
        }
    }

    /// A coordinated write's outcome, before its commit, when the stage asked for it.
    fn send_ahead(&mut self, outcome: &StoreOutcome) {
        if let (true, Some(to)) = (std::mem::take(&mut self.ahead), self.to.as_ref()) {
            to.do_send(Deliver(Input::Ahead { token: self.token, outcome: outcome.clone() }, None));
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if self.to.is_some() {
            self.stored(Err(StoreError::Io("storage stopped".into())));
        }
    }
}

/// Run one storage operation; durably when `durable`, whatever the node's mode.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StoreRequest {
    pub op: StoreOp,
    pub durable: bool,
    pub reply: Reply,
}

/// The redb side: a thread of its own (redb blocks) taking jobs in order from a channel,
/// parked while there is none.
pub struct StorageWorker {
    jobs: mpsc::UnboundedSender<Job>,
    /// Operations sent to the thread and not yet answered.
    queued: Arc<AtomicUsize>,
    /// Most operations in one commit: the front's jobs hold no more, and the thread joins
    /// queued jobs up to it.
    batch_max: usize,
}

enum Job {
    /// Operations to run; the worker joins queued batches into one commit.
    Batch(Vec<StoreRequest>),
    /// Flush the commit log (`buffered` mode's timer).
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

/// The disk work of the storage's last batches, into the metrics.
fn observe_timings(storage: &mut Storage, metrics: &NodeMetrics) {
    let timings = storage.take_timings();
    for took in timings.log_appends {
        metrics.log_append_seconds.observe(took.as_secs_f64());
    }
    for took in timings.redb_commits {
        metrics.redb_commit_seconds.observe(took.as_secs_f64());
    }
}

/// Take `first` and the batches queued behind it, up to `batch_max` operations in all; a
/// job that is not a batch, or a batch that would pass the bound, is left in `held` for
/// after this one.
fn gather(
    first: Vec<StoreRequest>,
    rx: &mut mpsc::UnboundedReceiver<Job>,
    batch_max: usize,
    held: &mut Option<Job>,
) -> Vec<StoreRequest> {
    let mut batch = first;
    while batch.len() < batch_max {
        match rx.try_recv() {
            Ok(Job::Batch(next)) if batch.len() + next.len() <= batch_max => batch.extend(next),
            Ok(other) => {
                *held = Some(other);
                break;
            }
            Err(_) => break,
        }
    }
    batch
}

impl StorageWorker {
    /// Start the thread, committing at most `batch_max` operations at once; each batch's
    /// size and commit time go to `metrics`.
    pub fn start(mut storage: Storage, metrics: NodeMetrics, batch_max: usize) -> std::io::Result<StorageWorker> {
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
        let queued = Arc::new(AtomicUsize::new(0));
        let answered = queued.clone();
        let batch_max = batch_max.max(1);
        std::thread::Builder::new().name("ringkv-storage".into()).spawn(move || {
            let _guard = ExitOnPanic;
            let mut held = None;
            while let Some(job) = held.take().or_else(|| rx.blocking_recv()) {
                match job {
                    Job::Batch(first) => {
                        let batch = gather(first, &mut rx, batch_max, &mut held);
                        let n = batch.len();
                        let mut ops = Vec::with_capacity(n);
                        let mut replies = Vec::with_capacity(n);
                        let mut durable = false;
                        for StoreRequest { op, durable: d, reply } in batch {
                            ops.push(op);
                            durable |= d;
                            replies.push(reply);
                        }
                        let mut send_ahead = |k: usize, outcome: &StoreOutcome| {
                            if let Some(reply) = replies.get_mut(k) {
                                reply.send_ahead(outcome);
                            }
                        };
                        let started = std::time::Instant::now();
                        let outcomes = storage.run(ops, durable, now().wall_ms, &mut send_ahead);
                        metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
                        metrics.commit_ops.observe(n as f64);
                        observe_timings(&mut storage, &metrics);
                        for (reply, outcome) in replies.into_iter().zip(outcomes) {
                            reply.send(outcome);
                        }
                        answered.fetch_sub(n, Ordering::Relaxed);
                    }
                    Job::Flush => {
                        if let Err(e) = storage.flush() {
                            tracing::error!(error = %e, "storage flush failed");
                        }
                        observe_timings(&mut storage, &metrics);
                    }
                    Job::Close { reply } => {
                        let _ = reply.send(storage.close(now().wall_ms));
                    }
                }
            }
        })?;
        Ok(StorageWorker { jobs, queued, batch_max })
    }
}

/// Operations waiting for the storage thread at most; more are refused as overloaded.
const PENDING_MAX: usize = 64 * 1024;

/// The front of the storage stage: collects the operations of the tasks ready now and hands
/// them to the worker as one job.
pub struct StorageFront {
    worker: StorageWorker,
    pending: Vec<StoreRequest>,
    kick_scheduled: bool,
    flush_interval: Option<Duration>,
}

impl StorageFront {
    pub fn new(worker: StorageWorker, flush_interval: Option<Duration>) -> Self {
        StorageFront { worker, pending: Vec::new(), kick_scheduled: false, flush_interval }
    }

    /// Hand everything pending to the worker, in jobs of at most `batch_max` operations.
    fn kick(&mut self) {
        while !self.pending.is_empty() {
            let rest = self.pending.split_off(self.pending.len().min(self.worker.batch_max));
            let job = std::mem::replace(&mut self.pending, rest);
            let n = job.len();
            self.worker.queued.fetch_add(n, Ordering::Relaxed);
            // A worker gone drops the job, and with it the replies: their stages hear that
            // storage stopped.
            if self.worker.jobs.send(Job::Batch(job)).is_err() {
                self.worker.queued.fetch_sub(n, Ordering::Relaxed);
            }
        }
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
    type Result = ();

    fn handle(&mut self, request: StoreRequest, ctx: &mut Context<Self>) {
        if self.pending.len() + self.worker.queued.load(Ordering::Relaxed) >= PENDING_MAX {
            return request.reply.send(Err(StoreError::Io("storage overloaded".into())));
        }
        self.pending.push(request);
        // The job leaves once every task ready now has run: what they store joins it.
        if !self.kick_scheduled {
            self.kick_scheduled = true;
            ctx.spawn(actix::fut::wrap_future::<_, Self>(tokio::task::yield_now()).map(|_, act, _| {
                act.kick_scheduled = false;
                act.kick();
            }));
        }
    }
}

/// Wait for every queued batch, then flush and mark the store closed (a clean stop).
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct Drain;

impl Handler<Drain> for StorageFront {
    type Result = ResponseFuture<Result<(), String>>;
    fn handle(&mut self, _: Drain, _: &mut Context<Self>) -> Self::Result {
        // The close (a durable commit) queues behind every batch, the pending one included.
        self.kick();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(keys: &[u8]) -> Job {
        Job::Batch(
            keys.iter()
                .map(|&k| StoreRequest { op: StoreOp::Read { key: vec![k] }, durable: false, reply: Reply::none() })
                .collect(),
        )
    }

    fn keys(batch: &[StoreRequest]) -> Vec<u8> {
        batch
            .iter()
            .map(|q| match &q.op {
                StoreOp::Read { key } => key[0],
                _ => unreachable!("the tests queue reads only"),
            })
            .collect()
    }

    fn first(job: Job) -> Vec<StoreRequest> {
        match job {
            Job::Batch(b) => b,
            _ => panic!("not a batch"),
        }
    }

    /// Records what a stage would be handed.
    struct Inbox(Arc<std::sync::Mutex<Vec<Input>>>);

    impl Actor for Inbox {
        type Context = Context<Self>;
    }

    impl Handler<Deliver> for Inbox {
        type Result = ();
        fn handle(&mut self, Deliver(input, _): Deliver, _: &mut Context<Self>) {
            self.0.lock().unwrap().push(input);
        }
    }

    /// Wait (boundedly) until `seen` holds `n` inputs.
    async fn inputs(seen: &Arc<std::sync::Mutex<Vec<Input>>>, n: usize) -> Vec<Input> {
        for _ in 0..500 {
            if seen.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        std::mem::take(&mut *seen.lock().unwrap())
    }

    /// The worker puts each outcome in the asking stage's mailbox under its token: a
    /// coordinated write's outcome ahead of its commit first, then its `Stored`; an
    /// operation whose reply is dropped unanswered (storage gone) still tells its stage.
    #[test]
    fn outcomes_go_to_the_stage_that_asked_and_a_dropped_reply_says_storage_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let opened = Storage::open(
            &dir.path().join("db.redb"),
            16,
            ringkv::store::StoreLimits::default(),
            ringkv::config::Durability::Sync,
            1,
        )
        .unwrap();
        System::new().block_on(async move {
            let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
            let stage = Inbox(seen.clone()).start().recipient::<Deliver>();
            let worker = StorageWorker::start(opened.storage, NodeMetrics::default(), 64).unwrap();
            let front = StorageFront::new(worker, None).start();
            let op = StoreOp::Coordinate {
                key: b"k".to_vec(),
                context: Default::default(),
                value: Some(b"v".to_vec()),
                hint: None,
                now_wall_ms: 1,
            };
            front.do_send(StoreRequest { op, durable: true, reply: Reply::to(stage.clone(), 7, true) });
            let got = inputs(&seen, 2).await;
            assert!(
                matches!(
                    got.as_slice(),
                    [
                        Input::Ahead { token: 7, outcome: StoreOutcome::Coordinated(Ok(_)) },
                        Input::Stored { token: 7, result: Ok(StoreOutcome::Coordinated(Ok(_))) }
                    ]
                ),
                "{got:?}"
            );
            drop(Reply::to(stage, 8, false));
            let got = inputs(&seen, 1).await;
            assert!(
                matches!(got.as_slice(), [Input::Stored { token: 8, result: Err(StoreError::Io(m)) }] if m == "storage stopped"),
                "{got:?}"
            );
        });
    }

    /// Batches queued while the worker was busy join the next commit, in order, up to the
    /// bound; a batch that would pass it waits for the commit after.
    #[test]
    fn queued_batches_join_one_commit_up_to_the_bound() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        for job in [batch(&[1, 2]), batch(&[3]), batch(&[4, 5, 6]), batch(&[7])] {
            tx.send(job).unwrap_or_else(|_| panic!("channel open"));
        }
        let mut held = None;
        let head = first(rx.try_recv().unwrap_or_else(|_| panic!("queued")));
        assert_eq!(keys(&gather(head, &mut rx, 5, &mut held)), [1, 2, 3]);
        let next = first(held.take().expect("the batch past the bound is held"));
        assert_eq!(keys(&gather(next, &mut rx, 5, &mut held)), [4, 5, 6, 7]);
        assert!(held.is_none() && rx.try_recv().is_err());
    }

    /// A flush or close queued between batches ends the gathering and runs after the
    /// batches before it, before the ones after it.
    #[test]
    fn a_flush_between_batches_keeps_its_place() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        for job in [batch(&[1]), Job::Flush, batch(&[2])] {
            tx.send(job).unwrap_or_else(|_| panic!("channel open"));
        }
        let mut held = None;
        let head = first(rx.try_recv().unwrap_or_else(|_| panic!("queued")));
        assert_eq!(keys(&gather(head, &mut rx, 64, &mut held)), [1]);
        assert!(matches!(held.take(), Some(Job::Flush)));
        let next = first(rx.try_recv().unwrap_or_else(|_| panic!("queued")));
        assert_eq!(keys(&gather(next, &mut rx, 64, &mut held)), [2]);
    }
}
