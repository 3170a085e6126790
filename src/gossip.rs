//! The gossip stage (Dynamo §4.8): drives this node's [`Membership`]. Every round it pushes
//! its member table to a random live peer (and now and then to a seed) and merges the
//! table that comes back; it merges tables other nodes push to it and answers with its own;
//! it saves the table durably whenever it changes and publishes the new view (members,
//! ring, epoch) to the stages that route by it, and the members' addresses to the
//! transport. It also carries out `admin leave` and a leaving node's final step (marking
//! itself left), and answers `status` and `ring`. Gossip also carries each member's request
//! load over the last minute, for the load balance `status` reports (§6.2), and the
//! cluster's namespaces ([`crate::namespace`]): this stage creates them, merges and saves
//! them, and publishes them in the view.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::json;

use crate::load_balance::{balance, LoadStat, LoadTable, RequestWindow};
use crate::membership::{GossipAction, Member, MemberState, Membership};
use crate::namespace::{Namespace, Namespaces, Resolution};
use crate::stage::{ConnId, Dest, DownSet, Effect, Ids, Input, Now, Origin, Signal, Stage, StageId};
use crate::wire::{ClientRequest, ClientResponse, ErrorKind, Message};

/// The gossip stage.
pub struct GossipStage {
    membership: Membership,
    replicas: usize,
    down: DownSet,
    pending: (u64, u64),
    /// Client requests coordinated here, and for keys this node does not replicate.
    counters: (u64, u64),
    /// Requests served here over the last minute, and every member's as gossiped.
    window: RequestWindow,
    loads: LoadTable,
    /// Each member's phi in hundredths, from the failure detector.
    suspicion: Arc<Vec<(crate::ring::NodeId, u64)>>,
    namespaces: Namespaces,
    ids: Ids,
    effects: VecDeque<Effect>,
}

fn document(v: serde_json::Value) -> ClientResponse {
    ClientResponse::Document { json: v.to_string() }
}

/// A namespace as `admin namespace` shows it.
fn namespace_json(ns: &Namespace) -> serde_json::Value {
    json!({"name": ns.name, "n": ns.n, "r": ns.r, "w": ns.w, "resolution": ns.resolution.as_str()})
}

impl GossipStage {
    /// `membership` holds the saved table and `saved` the saved namespaces; the first view
    /// is published at once.
    pub fn new(membership: Membership, replicas: usize, saved: &[Namespace]) -> Self {
        let mut namespaces = Namespaces::new();
        namespaces.merge(saved);
        let mut g = GossipStage {
            membership,
            replicas,
            down: DownSet::default(),
            pending: (0, 0),
            counters: (0, 0),
            window: RequestWindow::default(),
            loads: LoadTable::default(),
            suspicion: Arc::default(),
            namespaces,
            ids: Ids::default(),
            effects: VecDeque::new(),
        };
        g.publish();
        g.drain();
        g
    }

    pub fn namespaces(&self) -> &Namespaces {
        &self.namespaces
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    pub fn membership_mut(&mut self) -> &mut Membership {
        &mut self.membership
    }

    fn publish(&mut self) {
        let mut view = self.membership.view();
        view.namespaces = Arc::new(self.namespaces.clone());
        let peers =
            view.members.iter().filter(|m| m.state != MemberState::Left).map(|m| (m.id.clone(), m.addr.clone()));
        self.effects.push_back(Effect::Peers(peers.collect()));
        self.effects.push_back(Effect::Signal(Signal::View(Arc::new(view))));
    }

    fn drain(&mut self) {
        let mut changed = false;
        while let Some(action) = self.membership.poll_action() {
            match action {
                GossipAction::Changed => changed = true,
                GossipAction::Send { to_addr, to, members } => {
                    let dest = match to {
                        Some(id) => Dest::Node(id),
                        None => Dest::Addr(to_addr),
                    };
                    let (loads, namespaces) = (self.loads.all(), self.namespaces.list());
                    let msg = Message::Gossip { members, loads, namespaces };
                    self.effects.push_back(Effect::Send { to: dest, msg });
                }
            }
        }
        if changed {
            let token = self.ids.issue();
            self.effects.push_back(Effect::Store {
                token,
                op: crate::store::StoreOp::SaveMembers { members: self.membership.table() },
                durable: true,
            });
            self.publish();
        }
    }

    /// Namespaces a peer gossiped: merged, and if that changed any, saved and published.
    fn merge_namespaces(&mut self, incoming: &[Namespace]) {
        if self.namespaces.merge(incoming) {
            self.namespaces_changed();
        }
    }

    fn namespaces_changed(&mut self) {
        let token = self.ids.issue();
        let op = crate::store::StoreOp::SaveNamespaces { namespaces: self.namespaces.list() };
        self.effects.push_back(Effect::Store { token, op, durable: true });
        self.publish();
    }

    fn reply(&mut self, conn: ConnId, id: u64, response: ClientResponse) {
        self.effects.push_back(Effect::Send {
            to: Dest::Conn(conn),
            msg: Message::ClientReply { id, response, epoch: self.membership.epoch() },
        });
    }

    /// This node's request count: recorded over time, and its figure in the load table.
    fn note_load(&mut self, now: Now) {
        self.window.record(now.mono_ms, self.counters.0.saturating_add(self.counters.1));
        let me = LoadStat {
            node: self.membership.id().clone(),
            requests_last_minute: self.window.last_minute(),
            stamp_ms: now.wall_ms,
        };
        self.loads.merge(vec![me], |_| true);
    }

    /// Merge the loads a peer gossiped, for members of the table only.
    fn merge_loads(&mut self, loads: Vec<LoadStat>) {
        let m = &self.membership;
        self.loads.merge(loads, |id| m.member(id).is_some_and(|r| r.state != MemberState::Left));
    }

    /// A member's state as `status` shows it: `down` for a member up in the table that the
    /// failure detector finds down.
    fn state_of(&self, m: &Member) -> &'static str {
        if m.state == MemberState::Up && self.down.contains(&m.id) {
            "down"
        } else {
            m.state.as_str()
        }
    }

    fn status(&mut self) -> ClientResponse {
        document(self.status_json())
    }

    /// `ringkv status`'s document: this node's view of the members, pending work, counters.
    pub fn status_json(&mut self) -> serde_json::Value {
        let ring = self.membership.ring();
        let counts = ring.as_ref().map(|r| r.owned_counts()).unwrap_or_default();
        let balances = ring.as_ref().map(|r| balance(r, &self.loads)).unwrap_or_default();
        let members: Vec<serde_json::Value> = self
            .membership
            .members()
            .filter(|m| m.state != MemberState::Left)
            .map(|m: &Member| {
                let state = self.state_of(m);
                let phi = self.suspicion.iter().find(|(id, _)| *id == m.id).map(|(_, c)| *c as f64 / 100.0);
                let mut doc = json!({"id": m.id, "addr": m.addr, "state": state,
                       "partitions": counts.get(&m.id).copied().unwrap_or(0), "zone": m.zone, "weight": m.weight,
                       "phi": phi});
                if let Some(b) = balances.iter().find(|b| b.id == m.id) {
                    let fields = json!({
                        "partition_share": b.partition_share, "fair_share": b.fair_share, "imbalance": b.imbalance,
                        "requests_last_minute": b.requests_last_minute, "request_share": b.request_share,
                        "request_imbalance": b.request_imbalance, "out_of_balance": b.out_of_balance,
                    });
                    if let (Some(d), Some(f)) = (doc.as_object_mut(), fields.as_object()) {
                        d.extend(f.clone());
                    }
                }
                doc
            })
            .collect();
        let out: Vec<&str> = balances.iter().filter(|b| b.out_of_balance).map(|b| b.id.as_str()).collect();
        json!({
            "node": self.membership.id(),
            "ring_epoch": self.membership.epoch(),
            "members": members,
            "pending": {"hints": self.pending.0, "transfers": self.pending.1},
            "counters": {"coordinated": self.counters.0, "forwarded": self.counters.1},
            "out_of_balance": out,
        })
    }

    fn ring_doc(&mut self) -> ClientResponse {
        match self.ring_json() {
            Some(doc) => document(doc),
            None => ClientResponse::Error {
                kind: ErrorKind::Unavailable,
                message: "this node has not joined a cluster yet".into(),
            },
        }
    }

    /// `ringkv ring`'s document: each partition's preference list; None before joining.
    pub fn ring_json(&mut self) -> Option<serde_json::Value> {
        let ring = self.membership.ring()?;
        let parts: Vec<serde_json::Value> = (0..ring.partitions())
            .map(|p| json!({"partition": p, "preference_list": ring.preference_list(p, self.replicas).primaries}))
            .collect();
        Some(json!({"epoch": self.membership.epoch(), "partitions": parts}))
    }

    fn handle_message(&mut self, now: Now, from: Origin, msg: Message) {
        if let Some(node) = &from.node {
            if let Some(e) = self.down.heard(node) {
                self.effects.push_back(e);
            }
        }
        match msg {
            // Only nodes gossip: a client's table is never merged.
            Message::Gossip { members, loads, namespaces } if from.node.is_some() => {
                self.membership.handle_gossip(now.mono_ms, members);
                self.merge_loads(loads);
                self.merge_namespaces(&namespaces);
                let members = self.membership.table();
                let (loads, namespaces) = (self.loads.all(), self.namespaces.list());
                self.effects.push_back(Effect::Send {
                    to: Dest::Conn(from.conn),
                    msg: Message::GossipReply { members, loads, namespaces },
                });
                self.drain();
            }
            Message::GossipReply { members, loads, namespaces } if from.node.is_some() => {
                self.membership.handle_gossip(now.mono_ms, members);
                self.merge_loads(loads);
                self.merge_namespaces(&namespaces);
                self.drain();
            }
            Message::Client { id, request: ClientRequest::NamespaceCreate { name, n, r, w, resolution } } => {
                let members = self.membership.ring().map_or(0, |ring| ring.members().len());
                let me = self.membership.id().clone();
                let n = n.unwrap_or(u8::try_from(self.replicas).unwrap_or(u8::MAX));
                let majority = n / 2 + 1;
                let (r, w) = (r.unwrap_or(majority), w.unwrap_or(majority));
                let created = Resolution::parse(resolution.as_deref().unwrap_or("siblings"))
                    .and_then(|res| Namespace::create(&name, n, r, w, res, members, now.wall_ms, &me))
                    .and_then(|ns| self.namespaces.create(ns.clone()).map(|()| ns));
                let response = match created {
                    Ok(ns) => {
                        tracing::info!(namespace = %ns.name, n = ns.n, resolution = ns.resolution.as_str(), "namespace created");
                        self.namespaces_changed();
                        document(namespace_json(&ns))
                    }
                    Err(e) => ClientResponse::Error { kind: ErrorKind::BadRequest, message: e.to_string() },
                };
                self.reply(from.conn, id, response);
            }
            Message::Client { id, request: ClientRequest::NamespaceSet { name, r, w } } => {
                let response = match self.namespaces.set_quorums(&name, r, w) {
                    Ok(ns) => {
                        tracing::info!(namespace = %ns.name, r = ns.r, w = ns.w, "namespace quorums changed");
                        self.namespaces_changed();
                        document(namespace_json(&ns))
                    }
                    Err(e) => ClientResponse::Error { kind: ErrorKind::BadRequest, message: e.to_string() },
                };
                self.reply(from.conn, id, response);
            }
            Message::Client { id, request: ClientRequest::Namespaces } => {
                let list: Vec<serde_json::Value> = self.namespaces.list().iter().map(namespace_json).collect();
                self.reply(from.conn, id, document(json!({ "namespaces": list })));
            }
            Message::Client { id, request: ClientRequest::Status } => {
                let doc = self.status();
                self.reply(from.conn, id, doc);
            }
            Message::Client { id, request: ClientRequest::Ring } => {
                let doc = self.ring_doc();
                self.reply(from.conn, id, doc);
            }
            Message::Client { id, request: ClientRequest::Leave { node } } => {
                let response = match self.membership.leave(&node) {
                    Ok(()) => {
                        tracing::info!(%node, "leave requested");
                        document(json!({"leaving": node}))
                    }
                    Err(e) => ClientResponse::Error { kind: ErrorKind::BadRequest, message: e.to_string() },
                };
                self.reply(from.conn, id, response);
                self.drain();
            }
            _ => {}
        }
    }
}

impl Stage for GossipStage {
    fn id(&self) -> StageId {
        StageId::Gossip
    }

    fn handle(&mut self, now: Now, input: Input) {
        match input {
            // Only a coordinator replicates ahead of a commit.
            Input::Ahead { .. } => {}
            Input::Message { from, msg } => self.handle_message(now, from, msg),
            Input::Tick { random } => {
                self.note_load(now);
                let down = &self.down;
                self.membership.handle_tick(now.mono_ms, random, |id| down.is_up(id));
                self.drain();
            }
            Input::Stored { result: Err(e), .. } => {
                tracing::error!(error = %e, "cannot save the member table");
            }
            Input::Stored { .. } => {}
            Input::Signal(Signal::Down(d)) => self.down.set(d),
            Input::Signal(Signal::Suspicion(s)) => self.suspicion = s,
            Input::Signal(Signal::Pending { hints, transfers }) => self.pending = (hints, transfers),
            Input::Signal(Signal::Counters { coordinated, forwarded }) => {
                self.counters = (coordinated, forwarded);
                self.note_load(now);
            }
            Input::Signal(Signal::MarkLeft) => {
                let me = self.membership.id().clone();
                if self.membership.member(&me).is_some_and(|m| m.state == MemberState::Leaving) {
                    tracing::info!("every partition and hint handed away: leaving the ring");
                }
                self.membership.mark_left(&me);
                self.drain();
            }
            Input::Signal(_) => {}
        }
    }

    fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    fn poll_timeout(&self) -> Option<u64> {
        Some(self.membership.poll_timeout())
    }

    fn report(&self, out: &mut crate::metrics::Report) {
        const MEMBERS: &str = "Members as this node sees them, by state (up, down, joining, leaving)";
        let mut states: BTreeMap<&str, u64> =
            ["up", "down", "joining", "leaving"].into_iter().map(|s| (s, 0)).collect();
        for m in self.membership.members().filter(|m| m.state != MemberState::Left) {
            *states.entry(self.state_of(m)).or_default() += 1;
        }
        for (state, n) in states {
            out.gauge("ringkv_members", MEMBERS, &[("state", state)], n as f64);
        }
        out.gauge("ringkv_ring_epoch", "The ring epoch this node holds", &[], self.membership.epoch() as f64);
    }
}
