//! The FailureDetector stage: drives the core's `FailureDetector` with reports from every
//! stage that talks to peers, probes unreachable peers with backoff, and tells the client
//! API and the gossiper whenever the set of unreachable peers changes.

use std::collections::BTreeSet;
use std::time::Duration;

use actix::prelude::*;
use ringkv::failure_detector::FailureDetector;
use ringkv::ring::NodeId;
use ringkv::wire::Message;

use crate::clock::mono_ms;
use crate::transport::{Call, Dest, Transport};

/// A call to `peer` succeeded (`ok`) or found it unreachable.
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub struct Report {
    pub peer: NodeId,
    pub ok: bool,
}

/// The unreachable set changed.
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub struct Unreachable(pub BTreeSet<NodeId>);

pub struct FailureDetectorActor {
    core: FailureDetector,
    transport: Addr<Transport>,
    listeners: Vec<Recipient<Unreachable>>,
    probe_timeout: Duration,
}

impl FailureDetectorActor {
    pub fn new(core: FailureDetector, transport: Addr<Transport>, listeners: Vec<Recipient<Unreachable>>) -> Self {
        FailureDetectorActor { core, transport, listeners, probe_timeout: Duration::from_secs(1) }
    }

    fn publish(&self) {
        let set: BTreeSet<NodeId> = self.core.unreachable().into_iter().collect();
        for l in &self.listeners {
            l.do_send(Unreachable(set.clone()));
        }
    }
}

impl Actor for FailureDetectorActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(64 * 1024);
        ctx.run_interval(Duration::from_millis(50), |act, ctx| {
            for peer in act.core.poll_probes(mono_ms()) {
                let call =
                    Call { to: Dest::Node(peer.clone()), msg: Message::Ping { id: 0 }, timeout: act.probe_timeout };
                act.transport
                    .send(call)
                    .into_actor(act)
                    .map(move |res, act, ctx| {
                        let ok = matches!(res, Ok(Ok(Message::Pong { .. })));
                        ctx.notify(Report { peer, ok });
                        let _ = act;
                    })
                    .spawn(ctx);
            }
        });
    }
}

impl Handler<Report> for FailureDetectorActor {
    type Result = ();
    fn handle(&mut self, r: Report, _: &mut Context<Self>) {
        let now = mono_ms();
        let changed =
            if r.ok { self.core.handle_success(now, &r.peer) } else { self.core.handle_failure(now, &r.peer) };
        if changed {
            if r.ok {
                tracing::info!(peer = %r.peer, "peer reachable again");
            } else {
                tracing::warn!(peer = %r.peer, "peer unreachable");
            }
            self.publish();
        }
    }
}
