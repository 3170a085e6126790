//! The Gossiper stage: drives the core's `Membership` machine. Every tick it lets the machine
//! run a gossip round (push our table, pull the peer's), merges tables that arrive, saves the
//! table in redb whenever it changes, and publishes the resulting view (members, ring,
//! epoch, addresses) to the stages that route by it.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use actix::prelude::*;
use ringkv::membership::{GossipAction, Member, Membership, MembershipError};
use ringkv::ring::{NodeId, Ring};
use ringkv::wire::Message;

use crate::clock::mono_ms;
use crate::failure_detector::{FailureDetectorActor, Report, Unreachable};
use crate::storage::{Query, Storage};
use crate::transport::{Call, Dest, SetBook, Transport};

/// The membership as this node sees it now.
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub struct View {
    pub members: Vec<Member>,
    pub ring: Option<Ring>,
    pub epoch: u64,
}

pub struct Gossiper {
    core: Membership,
    transport: Addr<Transport>,
    storage: Addr<Storage>,
    failure_detector: Option<Addr<FailureDetectorActor>>,
    listeners: Vec<Recipient<View>>,
    unreachable: BTreeSet<NodeId>,
    call_timeout: Duration,
}

impl Gossiper {
    pub fn new(
        core: Membership,
        transport: Addr<Transport>,
        storage: Addr<Storage>,
        listeners: Vec<Recipient<View>>,
    ) -> Self {
        Gossiper {
            core,
            transport,
            storage,
            failure_detector: None,
            listeners,
            unreachable: BTreeSet::new(),
            call_timeout: Duration::from_secs(2),
        }
    }

    fn publish(&mut self) {
        let view = View { members: self.core.table(), ring: self.core.ring(), epoch: self.core.epoch() };
        let book: HashMap<NodeId, SocketAddr> =
            view.members.iter().filter_map(|m| m.addr.parse().ok().map(|a| (m.id.clone(), a))).collect();
        self.transport.do_send(SetBook(book));
        for l in &self.listeners {
            l.do_send(view.clone());
        }
    }

    fn drain(&mut self, ctx: &mut Context<Self>) {
        let mut changed = false;
        while let Some(action) = self.core.poll_action() {
            match action {
                GossipAction::Changed => changed = true,
                GossipAction::Send { to_addr, to, members } => {
                    let Ok(addr) = to_addr.parse::<SocketAddr>() else { continue };
                    let msg = Message::Gossip { members };
                    self.transport
                        .send(Call { to: Dest::Addr(addr), msg, timeout: self.call_timeout })
                        .into_actor(self)
                        .map(move |res, act, ctx| {
                            let ok = match res {
                                Ok(Ok(Message::GossipReply { members })) => {
                                    act.core.handle_gossip(mono_ms(), members);
                                    act.drain(ctx);
                                    true
                                }
                                Ok(Err(e)) => {
                                    tracing::debug!(%addr, error = %e, "gossip failed");
                                    !e.is_unreachable()
                                }
                                _ => false,
                            };
                            if let (Some(fd), Some(peer)) = (&act.failure_detector, to) {
                                fd.do_send(Report { peer, ok });
                            }
                        })
                        .spawn(ctx);
                }
            }
        }
        if changed {
            self.storage.do_send(Query::SaveMembers(self.core.table()));
            self.publish();
        }
    }
}

impl Actor for Gossiper {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(64 * 1024);
        self.publish();
        self.drain(ctx);
        ctx.run_interval(Duration::from_millis(50), |act, ctx| {
            let unreachable = &act.unreachable;
            act.core.handle_tick(mono_ms(), rand::random(), |id| !unreachable.contains(id));
            act.drain(ctx);
        });
    }
}

/// The failure detector to report gossip outcomes to (it is started after the gossiper).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetFailureDetector(pub Addr<FailureDetectorActor>);

impl Handler<SetFailureDetector> for Gossiper {
    type Result = ();
    fn handle(&mut self, m: SetFailureDetector, _: &mut Context<Self>) {
        self.failure_detector = Some(m.0);
    }
}

/// A peer's gossip; answered with our table.
#[derive(Message)]
#[rtype(result = "Vec<Member>")]
pub struct IncomingGossip {
    pub members: Vec<Member>,
}

impl Handler<IncomingGossip> for Gossiper {
    type Result = MessageResult<IncomingGossip>;
    fn handle(&mut self, m: IncomingGossip, ctx: &mut Context<Self>) -> Self::Result {
        self.core.handle_gossip(mono_ms(), m.members);
        self.drain(ctx);
        MessageResult(self.core.table())
    }
}

impl Handler<Unreachable> for Gossiper {
    type Result = ();
    fn handle(&mut self, m: Unreachable, _: &mut Context<Self>) {
        self.unreachable = m.0;
    }
}

/// An admin's `leave NODE_ID`.
#[derive(Message)]
#[rtype(result = "Result<(), MembershipError>")]
pub struct Leave(pub NodeId);

impl Handler<Leave> for Gossiper {
    type Result = Result<(), MembershipError>;
    fn handle(&mut self, m: Leave, ctx: &mut Context<Self>) -> Self::Result {
        self.core.leave(&m.0)?;
        self.drain(ctx);
        Ok(())
    }
}

/// This node handed every partition away: record it as left.
#[derive(Message)]
#[rtype(result = "()")]
pub struct MarkLeft;

impl Handler<MarkLeft> for Gossiper {
    type Result = ();
    fn handle(&mut self, _: MarkLeft, ctx: &mut Context<Self>) {
        let me = self.core.id().clone();
        self.core.mark_left(&me);
        self.drain(ctx);
    }
}

/// Another stage that routes by the view.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Subscribe(pub Recipient<View>);

impl Handler<Subscribe> for Gossiper {
    type Result = ();
    fn handle(&mut self, m: Subscribe, _: &mut Context<Self>) {
        self.listeners.push(m.0);
        self.publish();
    }
}
