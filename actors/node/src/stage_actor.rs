//! One actor per stage of the core ([`ringkv::stage::Stage`]): it hands the stage its
//! inputs with the time, and carries out the effects the stage returns, mechanically:
//! messages go to the transport, storage operations to the storage stage (their results
//! come back to this stage), signals to the stages [`ringkv::stage::subscribers`] names.
//! Row reads ([`ringkv::store::StoreOp::reads_rows_only`]) run here, in a redb read
//! snapshot, and their results go back in once the stage has no effect left: a replica read
//! never waits behind a group commit or crosses threads. It keeps the stage's timer. It
//! takes no decision of its own.
//!
//! Sends between actors are bounded: an effect is queued with `try_send`, and when the
//! receiver's mailbox is full this actor waits for room before it takes its next input, so
//! a slow stage slows its producers instead of growing memory.

use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

use actix::prelude::*;
use ringkv::admission::WaitSamples;
use ringkv::stage::{subscribers, Effect, Input, Now, Stage, StageId};
use ringkv::store::{StoreError, StoreOp};
use ringkv_storage::Reader;

use crate::clock::now;
pub use crate::mailbox::Deliver;
use crate::metrics::NodeMetrics;
use crate::storage::{Reply, StorageFront, StoreRequest};
use crate::transport::{Outgoing, TransportActor};

/// Where a stage's effects go: every stage's mailbox, the transport, storage (row reads
/// run here, in a read snapshot; everything else goes to the storage stage).
pub struct Routes {
    pub stages: Vec<(StageId, Recipient<Deliver>)>,
    pub transport: Addr<TransportActor>,
    pub storage: Addr<StorageFront>,
    pub reader: Reader,
    /// Where row reads' durations go.
    pub metrics: NodeMetrics,
}

impl Routes {
    pub fn stage(&self, id: StageId) -> Option<&Recipient<Deliver>> {
        self.stages.iter().find(|(s, _)| *s == id).map(|(_, r)| r)
    }
}

/// Mailbox capacity of every stage actor.
pub const MAILBOX_MAX: usize = 16 * 1024;

pub struct StageActor<S: Stage + Unpin + 'static> {
    stage: S,
    routes: Rc<Routes>,
    timer: Option<(u64, SpawnHandle)>,
    /// How long network messages waited in this actor's mailbox, reported to admission.
    queued: WaitSamples,
}

impl<S: Stage + Unpin + 'static> StageActor<S> {
    pub fn new(stage: S, routes: Rc<Routes>) -> Self {
        StageActor { stage, routes, timer: None, queued: WaitSamples::default() }
    }

    /// A network message waited `waited` in the mailbox: a sample for admission, handed on
    /// in batches.
    fn note_queued(&mut self, t: Now, waited: Duration, ctx: &mut Context<Self>) {
        let now_ms = t.mono_ms;
        self.queued.queue(now_ms, u64::try_from(waited.as_millis()).unwrap_or(u64::MAX));
        if let Some(sig) = self.queued.take_due(now_ms) {
            if let Some(r) = self.routes.stage(StageId::Admission) {
                Self::signal_bounded(r, Input::Signal(sig), ctx);
            }
        }
    }

    fn input(&mut self, input: Input, ctx: &mut Context<Self>) {
        self.input_at(now(), input, ctx);
    }

    /// Hand `input` to the stage at `t`, and carry out what follows. One turn of this actor
    /// reads the clock once: row reads run and their results go in at the same `t`.
    fn input_at(&mut self, t: Now, input: Input, ctx: &mut Context<Self>) {
        let name = self.stage.id().name();
        let span = tracing::trace_span!("stage", stage = name);
        let _e = span.enter();
        self.stage.handle(t, input);
        self.pump_at(t, ctx);
    }

    /// Send `msg` to `to`, waiting (and holding this actor's next input) only when its
    /// mailbox is full.
    fn deliver_bounded<M, A>(addr: &Addr<A>, msg: M, ctx: &mut Context<Self>)
    where
        A: Actor<Context = Context<A>> + Handler<M>,
        M: Message<Result = ()> + Send + 'static,
    {
        if let Err(SendError::Full(msg)) = addr.try_send(msg) {
            ctx.wait(actix::fut::wrap_future::<_, Self>(addr.send(msg)).map(|_, _, _| ()));
        }
    }

    fn signal_bounded(r: &Recipient<Deliver>, input: Input, ctx: &mut Context<Self>) {
        if let Err(SendError::Full(msg)) = r.try_send(Deliver(input, None)) {
            ctx.wait(actix::fut::wrap_future::<_, Self>(r.send(msg)).map(|_, _, _| ()));
        }
    }

    fn pump(&mut self, ctx: &mut Context<Self>) {
        self.pump_at(now(), ctx);
    }

    fn pump_at(&mut self, t: Now, ctx: &mut Context<Self>) {
        // Results of row reads, run on this thread as they come: handed in once the stage
        // has no effect left, so the stage sees them as it would a storage result.
        let mut read = VecDeque::new();
        loop {
            while let Some(effect) = self.stage.poll_effect() {
                self.carry(t, effect, &mut read, ctx);
            }
            let Some(input) = read.pop_front() else { break };
            self.stage.handle(t, input);
        }
        self.arm(t, ctx);
    }

    fn carry(&mut self, t: Now, effect: Effect, read: &mut VecDeque<Input>, ctx: &mut Context<Self>) {
        match effect {
            Effect::Store { token, op, .. } if op.reads_rows_only() => {
                let started = std::time::Instant::now();
                let (mut outcomes, follow) = self.routes.reader.run(vec![op], t.wall_ms);
                self.routes.metrics.read_seconds.observe(started.elapsed().as_secs_f64());
                let result = outcomes.pop().unwrap_or_else(|| Err(StoreError::Io("no outcome".into())));
                read.push_back(Input::Stored { token, result });
                for op in follow {
                    self.routes.storage.do_send(StoreRequest { op, durable: false, reply: Reply::none() });
                }
            }
            Effect::Send { to, msg } => {
                Self::deliver_bounded(&self.routes.transport, Outgoing::Send { to, msg }, ctx);
            }
            Effect::Store { token, op, durable } => {
                // A coordinated write's outcome comes back ahead of its commit as well.
                let ahead = matches!(op, StoreOp::Coordinate { .. });
                let reply = Reply::to(ctx.address().recipient(), token, ahead);
                Self::deliver_bounded(&self.routes.storage, StoreRequest { op, durable, reply }, ctx);
            }
            Effect::Signal(sig) => {
                for &to in subscribers(&sig) {
                    if let Some(r) = self.routes.stage(to) {
                        Self::signal_bounded(r, Input::Signal(sig.clone()), ctx);
                    }
                }
            }
            Effect::Peers(peers) => Self::deliver_bounded(&self.routes.transport, Outgoing::Peers(peers), ctx),
            Effect::Block(peers) => Self::deliver_bounded(&self.routes.transport, Outgoing::Block(peers), ctx),
        }
    }

    /// Keep one timer, at or before the stage's next timeout ([`timer_change`]).
    fn arm(&mut self, t: Now, ctx: &mut Context<Self>) {
        let armed = self.timer.as_ref().map(|(at, _)| *at);
        let at = match timer_change(armed, self.stage.poll_timeout()) {
            TimerChange::Keep => return,
            TimerChange::Cancel => None,
            TimerChange::Arm(at) => Some(at),
        };
        if let Some((_, h)) = self.timer.take() {
            ctx.cancel_future(h);
        }
        let Some(at) = at else { return };
        let wait = Duration::from_millis(at.saturating_sub(t.mono_ms));
        let h = ctx.run_later(wait, |act, ctx| {
            act.timer = None;
            act.input(Input::Tick { random: rand::random() }, ctx);
        });
        self.timer = Some((at, h));
    }
}

/// What becomes of a stage actor's one timer, set for `armed`, when the stage next wants a
/// tick at `next`.
#[derive(Debug, PartialEq, Eq)]
enum TimerChange {
    Keep,
    Cancel,
    Arm(u64),
}

/// A timer set to fire no later than the stage's next timeout is kept. A stage's tick does
/// nothing before its deadlines, so an early one costs one tick; re-arming whenever the next
/// timeout moves later (the coordinator's does with nearly every request it finishes) would
/// cost a timer per request. A timer that would fire late is set again, and one the stage no
/// longer wants is cancelled: the tick is never late.
fn timer_change(armed: Option<u64>, next: Option<u64>) -> TimerChange {
    match (armed, next) {
        (None, None) => TimerChange::Keep,
        (Some(_), None) => TimerChange::Cancel,
        (Some(a), Some(n)) if a <= n => TimerChange::Keep,
        (_, Some(n)) => TimerChange::Arm(n),
    }
}

impl<S: Stage + Unpin + 'static> Actor for StageActor<S> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX_MAX);
        self.pump(ctx);
    }
}

impl<S: Stage + Unpin + 'static> Handler<Deliver> for StageActor<S> {
    type Result = ();

    fn handle(&mut self, Deliver(input, queued_at): Deliver, ctx: &mut Context<Self>) {
        let t = now();
        if let Some(at) = queued_at {
            self.note_queued(t, at.elapsed(), ctx);
        }
        self.input_at(t, input, ctx);
    }
}

/// Ask a stage actor for its stage's figures ([`Stage::report`]).
pub struct Collect;

impl Message for Collect {
    type Result = ringkv::metrics::Report;
}

impl<S: Stage + Unpin + 'static> Handler<Collect> for StageActor<S> {
    type Result = MessageResult<Collect>;

    fn handle(&mut self, _: Collect, _: &mut Context<Self>) -> Self::Result {
        let mut report = ringkv::metrics::Report::default();
        self.stage.report(&mut report);
        MessageResult(report)
    }
}

/// Read something from a stage, between two of its inputs (the cluster page's documents).
pub struct Peek<S, R>(pub Box<dyn FnOnce(&mut S) -> R + Send>);

impl<S: 'static, R: 'static> Message for Peek<S, R> {
    type Result = R;
}

impl<S: Stage + Unpin + 'static, R: 'static> Handler<Peek<S, R>> for StageActor<S> {
    type Result = MessageResult<Peek<S, R>>;

    fn handle(&mut self, Peek(read): Peek<S, R>, ctx: &mut Context<Self>) -> Self::Result {
        let answer = read(&mut self.stage);
        // Reading may not produce effects, but carry out any there are.
        self.pump(ctx);
        MessageResult(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over every pair of small times (and none): the timer after the change fires no later
    /// than the stage's next timeout, exists only while the stage wants a tick, and is
    /// changed only when it would be late or unwanted.
    #[test]
    fn the_timer_is_kept_while_early_enough_and_never_left_late() {
        let times = || std::iter::once(None).chain((0..6).map(Some));
        for armed in times() {
            for next in times() {
                let change = timer_change(armed, next);
                let after = match change {
                    TimerChange::Keep => armed,
                    TimerChange::Cancel => None,
                    TimerChange::Arm(at) => Some(at),
                };
                assert_eq!(after.is_some(), next.is_some(), "{armed:?} {next:?}: {change:?}");
                if let (Some(a), Some(n)) = (after, next) {
                    assert!(a <= n, "{armed:?} {next:?}: fires late at {a}");
                }
                let keepable = match (armed, next) {
                    (Some(a), Some(n)) => a <= n,
                    (None, None) => true,
                    _ => false,
                };
                assert_eq!(change == TimerChange::Keep, keepable, "{armed:?} {next:?}: {change:?}");
            }
        }
        // The coordinator's case: its next timeout moves later as requests finish.
        assert_eq!(timer_change(Some(100), Some(250)), TimerChange::Keep);
        assert_eq!(timer_change(Some(250), Some(100)), TimerChange::Arm(100));
    }
}
