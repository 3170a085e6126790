//! The Coordinator stage: one actor per in-flight request (the paper's per-request state
//! machine), driving the core's `Coordinator`. Requests to this node itself go straight to
//! Storage; requests to peers go through Transport, and their outcomes feed the failure
//! detector. The actor lives until the core says it is finished (read repair included).

use std::time::Duration;

use actix::prelude::*;
use ringkv::coordinator::{Action, Coordinator, ReplicaReply, ReplicaRequest};
use ringkv::ring::NodeId;
use ringkv::wire::{ClientResponse, Message};
use tokio::sync::oneshot;

use crate::clock::mono_ms;
use crate::failure_detector::{FailureDetectorActor, Report};
use crate::storage::{Execute, Storage};
use crate::transport::{Call, Dest, Transport};

pub struct CoordinatorActor {
    core: Coordinator,
    me: NodeId,
    id: u64,
    storage: Addr<Storage>,
    transport: Addr<Transport>,
    failure_detector: Addr<FailureDetectorActor>,
    reply: Option<oneshot::Sender<ClientResponse>>,
    timer: Option<SpawnHandle>,
    outstanding: usize,
    replica_timeout: Duration,
    forward_timeout: Duration,
    span: tracing::Span,
}

/// Stages a coordinator talks to.
#[derive(Clone)]
pub struct Stages {
    pub storage: Addr<Storage>,
    pub transport: Addr<Transport>,
    pub failure_detector: Addr<FailureDetectorActor>,
}

impl CoordinatorActor {
    pub fn new(
        core: Coordinator,
        me: NodeId,
        id: u64,
        stages: Stages,
        reply: oneshot::Sender<ClientResponse>,
        replica_timeout: Duration,
        forward_timeout: Duration,
    ) -> Self {
        let span = tracing::debug_span!("request", id, key = %String::from_utf8_lossy(core.key()));
        CoordinatorActor {
            core,
            me,
            id,
            storage: stages.storage,
            transport: stages.transport,
            failure_detector: stages.failure_detector,
            reply: Some(reply),
            timer: None,
            outstanding: 0,
            replica_timeout,
            forward_timeout,
            span,
        }
    }

    fn pump(&mut self, ctx: &mut Context<Self>) {
        let _e = self.span.clone().entered();
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Reply(response) => {
                    tracing::debug!(?response, "reply");
                    if let Some(tx) = self.reply.take() {
                        let _ = tx.send(response);
                    }
                }
                Action::Send { to, request } => self.send(to, request, ctx),
            }
        }
        if let Some(t) = self.timer.take() {
            ctx.cancel_future(t);
        }
        if let Some(at) = self.core.poll_timeout() {
            let wait = Duration::from_millis(at.saturating_sub(mono_ms()));
            self.timer = Some(ctx.run_later(wait, |act, ctx| {
                act.timer = None;
                act.core.handle_timeout(mono_ms());
                act.pump(ctx);
            }));
        }
        if self.core.is_finished() && self.outstanding == 0 {
            ctx.stop();
        }
    }

    fn send(&mut self, to: NodeId, request: ReplicaRequest, ctx: &mut Context<Self>) {
        self.outstanding += 1;
        if to == self.me {
            self.storage
                .send(Execute(request))
                .into_actor(self)
                .map(|res, act, ctx| {
                    act.outstanding -= 1;
                    let me = act.me.clone();
                    match res {
                        Ok(Ok(outcome)) => act.core.handle_reply(mono_ms(), &me, ReplicaReply::Outcome(outcome)),
                        other => {
                            tracing::error!(?other, "local storage failed");
                            act.core.handle_failure(mono_ms(), &me);
                        }
                    }
                    act.pump(ctx);
                })
                .spawn(ctx);
            return;
        }
        let timeout =
            if matches!(request, ReplicaRequest::Forward { .. }) { self.forward_timeout } else { self.replica_timeout };
        let msg = Message::Replica { id: self.id, request };
        self.transport
            .send(Call { to: Dest::Node(to.clone()), msg, timeout })
            .into_actor(self)
            .map(move |res, act, ctx| {
                act.outstanding -= 1;
                let now = mono_ms();
                match res {
                    Ok(Ok(Message::ReplicaReply { reply, .. })) => {
                        act.failure_detector.do_send(Report { peer: to.clone(), ok: true });
                        act.core.handle_reply(now, &to, reply);
                    }
                    Ok(Err(e)) if e.is_unreachable() => {
                        tracing::debug!(peer = %to, error = %e, "replica unreachable");
                        act.failure_detector.do_send(Report { peer: to.clone(), ok: false });
                        act.core.handle_failure(now, &to);
                    }
                    other => {
                        tracing::debug!(peer = %to, ?other, "replica failed");
                        act.core.handle_failure(now, &to);
                    }
                }
                act.pump(ctx);
            })
            .spawn(ctx);
    }
}

impl Actor for CoordinatorActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.pump(ctx);
    }
}
