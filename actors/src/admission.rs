//! The Admission stage: holds the core's admission controller, which background stages ask
//! before each unit of work, and which operators read and change with `ringkv admin limits`.

use std::collections::BTreeMap;
use std::time::Duration;

use actix::prelude::*;
use ringkv::admission::{Admission, Work};

use crate::clock::mono_ms;

pub struct AdmissionActor {
    core: Admission,
}

impl AdmissionActor {
    pub fn new(core: Admission) -> Self {
        AdmissionActor { core }
    }
}

impl Actor for AdmissionActor {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(64 * 1024);
        ctx.run_interval(Duration::from_millis(100), |act, _| act.core.handle_tick(mono_ms()));
    }
}

/// Every limit by name.
#[derive(Message)]
#[rtype(result = "BTreeMap<String, i64>")]
pub struct GetLimits;

impl Handler<GetLimits> for AdmissionActor {
    type Result = MessageResult<GetLimits>;
    fn handle(&mut self, _: GetLimits, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.core.limits())
    }
}

/// Change limits; all or nothing.
#[derive(Message)]
#[rtype(result = "Result<BTreeMap<String, i64>, String>")]
pub struct SetLimits(pub Vec<(String, i64)>);

impl Handler<SetLimits> for AdmissionActor {
    type Result = Result<BTreeMap<String, i64>, String>;
    fn handle(&mut self, m: SetLimits, _: &mut Context<Self>) -> Self::Result {
        self.core.set_limits(&m.0).map_err(|e| e.to_string())?;
        tracing::info!(limits = ?m.0, "admission limits changed");
        Ok(self.core.limits())
    }
}

/// A client request's latency, for the foreground feedback.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Latency(pub u64);

impl Handler<Latency> for AdmissionActor {
    type Result = ();
    fn handle(&mut self, m: Latency, _: &mut Context<Self>) {
        self.core.record_latency(mono_ms(), m.0);
    }
}

/// The budget in force now for one kind of work (limits and latency feedback).
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Budget(pub Work);

impl Handler<Budget> for AdmissionActor {
    type Result = usize;
    fn handle(&mut self, m: Budget, _: &mut Context<Self>) -> usize {
        self.core.budget(m.0) as usize
    }
}
