//! Admission control for background work (Dynamo §6.5): hinted handoff, partition transfer
//! and anti-entropy each ask before starting a unit of work, so that they never starve
//! client traffic.
//!
//! The controller holds run-time limits an operator can read and change
//! (`handoff.max_inflight`, `anti_entropy.max_inflight`, `admission.latency_target_ms`;
//! 0 pauses a kind of work; `handoff.bytes_per_sec`, `anti_entropy.bytes_per_sec`, 0
//! meaning unlimited, paced by a [`RateLimiter`] in the stage doing the work). It also watches foreground latency: every client request's
//! latency is a sample in a sliding window, and while the window's p99 is above the target
//! the effective budget of every background kind is halved (down to one unit, never zero
//! unless paused by the operator), growing back by one unit per window once latency
//! recovers. Besides the requests' own latency it watches what they wait on (§6.5: "the
//! latencies of disk operations, failed database access attempts due to lock-contention and
//! transaction timeouts, and request queue wait times"): storage operations of foreground
//! work and the time network messages wait in stage queues, each as a p99 over the same
//! trailing window ([`Signal::Waited`], gathered in batches by [`WaitSamples`]); any of
//! the three over the target counts. Time comes in as arguments.

use std::collections::{BTreeMap, VecDeque};

use crate::stage::{Dest, Effect, Input, Now, Signal, Stage, StageId};
use crate::wire::{ClientRequest, ClientResponse, ErrorKind, Message};

/// Kinds of background work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Work {
    Handoff,
    AntiEntropy,
}

impl Work {
    pub const ALL: [Work; 2] = [Work::Handoff, Work::AntiEntropy];

    fn limit_name(self) -> &'static str {
        match self {
            Work::Handoff => "handoff.max_inflight",
            Work::AntiEntropy => "anti_entropy.max_inflight",
        }
    }

    fn rate_name(self) -> &'static str {
        match self {
            Work::Handoff => "handoff.bytes_per_sec",
            Work::AntiEntropy => "anti_entropy.bytes_per_sec",
        }
    }
}

/// A token bucket in bytes, refilled at `rate` bytes a second up to one second's worth; 0
/// means unlimited. Work may go while the bucket is not in debt, and what it sends is taken
/// from the bucket afterwards (a batch larger than a second's worth still goes, then waits
/// it off), so pacing holds for any batch size. Time comes in as arguments.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RateLimiter {
    rate: u64,
    /// Bytes available (negative: owed).
    tokens: i64,
    last_ms: u64,
}

impl RateLimiter {
    pub fn new(rate: u64) -> Self {
        RateLimiter { rate, tokens: rate.min(i64::MAX as u64) as i64, last_ms: 0 }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    pub fn set_rate(&mut self, rate: u64) {
        if rate != self.rate {
            self.rate = rate;
            self.tokens = self.tokens.min(rate.min(i64::MAX as u64) as i64);
        }
    }

    fn refill(&mut self, now_ms: u64) {
        if self.rate == 0 {
            return;
        }
        let elapsed = now_ms.saturating_sub(self.last_ms);
        let added = (self.rate as u128 * elapsed as u128 / 1000).min(i64::MAX as u128) as i64;
        let cap = self.rate.min(i64::MAX as u64) as i64;
        self.tokens = self.tokens.saturating_add(added).min(cap);
        self.last_ms = now_ms.max(self.last_ms);
    }

    /// Whether work may go now.
    pub fn ready(&mut self, now_ms: u64) -> bool {
        self.refill(now_ms);
        self.rate == 0 || self.tokens >= 0
    }

    /// `bytes` went out.
    pub fn spend(&mut self, now_ms: u64, bytes: u64) {
        if self.rate == 0 {
            return;
        }
        self.refill(now_ms);
        self.tokens = self.tokens.saturating_sub(bytes.min(i64::MAX as u64) as i64);
    }

    /// When work may go again, if it may not now.
    pub fn ready_at(&self, now_ms: u64) -> Option<u64> {
        if self.rate == 0 || self.tokens >= 0 {
            return None;
        }
        let owed = self.tokens.unsigned_abs() as u128;
        Some(now_ms.saturating_add((owed * 1000).div_ceil(self.rate as u128).min(u64::MAX as u128) as u64))
    }
}

/// Most samples the latency window keeps.
pub const LATENCY_SAMPLES_MAX: usize = 4096;
/// Samples a [`WaitSamples`] batch holds before it is handed on.
pub const WAIT_BATCH_MAX: usize = 64;
/// Age of a batch's first sample at which it is handed on.
pub const WAIT_BATCH_MS: u64 = 100;

/// What foreground work waited on, as the stage that saw it gathers it: samples handed to
/// admission in batches (one signal per batch, not one per request).
#[derive(Clone, Debug, Default)]
pub struct WaitSamples {
    storage: Vec<u64>,
    queue: Vec<u64>,
    first_ms: Option<u64>,
}

impl WaitSamples {
    pub fn storage(&mut self, now_ms: u64, ms: u64) {
        self.storage.push(ms);
        self.first_ms.get_or_insert(now_ms);
    }

    pub fn queue(&mut self, now_ms: u64, ms: u64) {
        self.queue.push(ms);
        self.first_ms.get_or_insert(now_ms);
    }

    /// When the batch held is due to be handed on (a stage's timer should wake it then).
    pub fn due_at(&self) -> Option<u64> {
        self.first_ms.map(|t| t.saturating_add(WAIT_BATCH_MS))
    }

    /// The batch, once it is full or old enough.
    pub fn take_due(&mut self, now_ms: u64) -> Option<Signal> {
        let full = self.storage.len() + self.queue.len() >= WAIT_BATCH_MAX;
        let old = self.first_ms.is_some_and(|t| now_ms >= t.saturating_add(WAIT_BATCH_MS));
        if !(full || old) {
            return None;
        }
        self.first_ms = None;
        Some(Signal::Waited { storage: std::mem::take(&mut self.storage), queue: std::mem::take(&mut self.queue) })
    }
}

/// A trailing window of samples (ms) and its p99.
#[derive(Clone, Debug, Default)]
struct Window {
    samples: VecDeque<(u64, u64)>,
}

impl Window {
    fn record(&mut self, now_ms: u64, ms: u64) {
        if self.samples.len() == LATENCY_SAMPLES_MAX {
            self.samples.pop_front();
        }
        self.samples.push_back((now_ms, ms));
    }

    fn expire(&mut self, now_ms: u64, window_ms: u64) {
        while self.samples.front().is_some_and(|s| s.0.saturating_add(window_ms) < now_ms) {
            self.samples.pop_front();
        }
    }

    fn p99(&self) -> Option<u64> {
        let mut v: Vec<u64> = self.samples.iter().map(|s| s.1).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        Some(v[(v.len() * 99).div_ceil(100).saturating_sub(1)])
    }
}
/// Largest value any limit may be set to.
pub const LIMIT_MAX: i64 = 1_000_000;

/// Why a limit change was refused; nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("unknown limit {0:?}; known limits: handoff.max_inflight, anti_entropy.max_inflight, handoff.bytes_per_sec, anti_entropy.bytes_per_sec, admission.latency_target_ms")]
    Unknown(String),
    #[error("limit {name} cannot be {value}: use 0..={LIMIT_MAX}{extra}")]
    Invalid { name: String, value: i64, extra: &'static str },
}

/// The admission controller.
#[derive(Clone, Debug)]
pub struct Admission {
    max_inflight: BTreeMap<Work, u32>,
    /// Bytes a second each kind of work may move (0: unlimited), as configured and as in
    /// force under latency feedback.
    bytes_per_sec: BTreeMap<Work, u64>,
    rate_effective: BTreeMap<Work, u64>,
    /// Effective budget under latency feedback.
    budget: BTreeMap<Work, u32>,
    inflight: BTreeMap<Work, u32>,
    latency_target_ms: u64,
    window_ms: u64,
    /// Client requests' latency, and what foreground work waited on.
    requests: Window,
    storage: Window,
    queue: Window,
    next_adjust_ms: u64,
}

impl Admission {
    pub fn new(handoff_max: u32, anti_entropy_max: u32, latency_target_ms: u64, window_ms: u64) -> Self {
        let max_inflight: BTreeMap<Work, u32> =
            [(Work::Handoff, handoff_max), (Work::AntiEntropy, anti_entropy_max)].into();
        Admission {
            budget: max_inflight.clone(),
            max_inflight,
            bytes_per_sec: Work::ALL.iter().map(|w| (*w, 0)).collect(),
            rate_effective: Work::ALL.iter().map(|w| (*w, 0)).collect(),
            inflight: Work::ALL.iter().map(|w| (*w, 0)).collect(),
            latency_target_ms: latency_target_ms.max(1),
            window_ms: window_ms.max(1),
            requests: Window::default(),
            storage: Window::default(),
            queue: Window::default(),
            next_adjust_ms: 0,
        }
    }

    /// Every limit by name, as `ringkv admin limits` prints them.
    pub fn limits(&self) -> BTreeMap<String, i64> {
        let mut out: BTreeMap<String, i64> =
            self.max_inflight.iter().map(|(w, v)| (w.limit_name().to_string(), *v as i64)).collect();
        for w in Work::ALL {
            out.insert(w.rate_name().into(), self.rate(w).min(i64::MAX as u64) as i64);
        }
        out.insert("admission.latency_target_ms".into(), self.latency_target_ms as i64);
        out
    }

    /// Start with these byte rates (0: unlimited), as configured.
    pub fn with_rates(mut self, handoff: u64, anti_entropy: u64) -> Self {
        self.bytes_per_sec.insert(Work::Handoff, handoff);
        self.bytes_per_sec.insert(Work::AntiEntropy, anti_entropy);
        self.rate_effective = self.bytes_per_sec.clone();
        self
    }

    /// The byte rate configured for `work` (0: unlimited).
    pub fn rate(&self, work: Work) -> u64 {
        self.bytes_per_sec.get(&work).copied().unwrap_or(0)
    }

    /// The byte rate in force for `work` now: a configured rate is halved each window the
    /// foreground p99 is over the target (down to an eighth) and doubles back after.
    pub fn rate_effective(&self, work: Work) -> u64 {
        self.rate_effective.get(&work).copied().unwrap_or(0)
    }

    /// `admin limits`: every limit by its flat name as configured, and beside them what is
    /// in force now under latency feedback (`effective`) and the p99 it reacts to.
    pub fn limits_doc(&self) -> serde_json::Value {
        let mut doc = serde_json::json!(self.limits());
        let effective: BTreeMap<String, i64> = Work::ALL
            .iter()
            .flat_map(|w| {
                [
                    (w.limit_name().to_string(), self.budget(*w) as i64),
                    (w.rate_name().to_string(), self.rate_effective(*w).min(i64::MAX as u64) as i64),
                ]
            })
            .collect();
        if let Some(d) = doc.as_object_mut() {
            d.insert("effective".into(), serde_json::json!(effective));
            d.insert("latency_p99_ms".into(), serde_json::json!(self.p99_ms()));
            let waits = serde_json::json!({"storage": self.storage.p99(), "queue": self.queue.p99()});
            d.insert("waits_p99_ms".into(), waits);
        }
        doc
    }

    /// The budgets in force now (after latency feedback).
    pub fn budgets(&self) -> BTreeMap<String, i64> {
        self.budget
            .iter()
            .map(|(w, v)| (format!("{}.budget", w.limit_name().trim_end_matches(".max_inflight")), *v as i64))
            .collect()
    }

    /// Change several limits at once: all are checked first, and none is applied unless all
    /// are valid.
    pub fn set_limits(&mut self, pairs: &[(String, i64)]) -> Result<(), LimitError> {
        for (name, value) in pairs {
            let known = self.limits().contains_key(name.as_str());
            if !known {
                return Err(LimitError::Unknown(name.clone()));
            }
            let (lo, extra) = if name == "admission.latency_target_ms" { (1, " (at least 1)") } else { (0, "") };
            if *value < lo || *value > LIMIT_MAX {
                return Err(LimitError::Invalid { name: name.clone(), value: *value, extra });
            }
        }
        for (name, value) in pairs {
            if let Some(w) = Work::ALL.iter().find(|w| w.rate_name() == name) {
                self.bytes_per_sec.insert(*w, *value as u64);
                self.rate_effective.insert(*w, *value as u64);
                continue;
            }
            match Work::ALL.iter().find(|w| w.limit_name() == name) {
                Some(w) => {
                    self.max_inflight.insert(*w, *value as u32);
                    self.budget.insert(*w, *value as u32);
                }
                None => self.latency_target_ms = *value as u64,
            }
        }
        Ok(())
    }

    /// The number of units of `work` that may run at once now.
    pub fn budget(&self, work: Work) -> u32 {
        self.budget.get(&work).copied().unwrap_or(0)
    }

    /// Ask to start one unit of `work`; true means go, and [`release`](Self::release) when done.
    pub fn try_admit(&mut self, work: Work) -> bool {
        let budget = self.budget.get(&work).copied().unwrap_or(0);
        let n = self.inflight.entry(work).or_default();
        if *n < budget {
            *n += 1;
            true
        } else {
            false
        }
    }

    pub fn release(&mut self, work: Work) {
        let n = self.inflight.entry(work).or_default();
        *n = n.saturating_sub(1);
    }

    pub fn inflight(&self, work: Work) -> u32 {
        self.inflight.get(&work).copied().unwrap_or(0)
    }

    /// A client request took `latency_ms`.
    pub fn record_latency(&mut self, now_ms: u64, latency_ms: u64) {
        self.requests.record(now_ms, latency_ms);
    }

    /// Foreground work waited this long on storage (`storage`) or in stage queues.
    pub fn record_waits(&mut self, now_ms: u64, storage: &[u64], queue: &[u64]) {
        for ms in storage {
            self.storage.record(now_ms, *ms);
        }
        for ms in queue {
            self.queue.record(now_ms, *ms);
        }
    }

    /// p99 of the client requests' latency in the window, if any.
    pub fn p99_ms(&self) -> Option<u64> {
        self.requests.p99()
    }

    /// Whether foreground work suffers: the p99 of request latency, of storage waits or of
    /// queue waits over the target.
    pub fn suffering(&self) -> bool {
        [self.requests.p99(), self.storage.p99(), self.queue.p99()]
            .into_iter()
            .any(|p| p.is_some_and(|p| p > self.latency_target_ms))
    }

    /// When the next window adjustment is due.
    pub fn poll_timeout(&self) -> u64 {
        self.next_adjust_ms
    }

    /// Time passed: drop old samples and, once per window, adjust budgets.
    pub fn handle_tick(&mut self, now_ms: u64) {
        for w in [&mut self.requests, &mut self.storage, &mut self.queue] {
            w.expire(now_ms, self.window_ms);
        }
        if now_ms < self.next_adjust_ms {
            return;
        }
        self.next_adjust_ms = now_ms.saturating_add(self.window_ms);
        let suffering = self.suffering();
        for w in Work::ALL {
            let max = self.max_inflight[&w];
            let b = self.budget.entry(w).or_insert(max);
            *b = if max == 0 {
                0
            } else if suffering {
                (*b / 2).max(1)
            } else {
                b.saturating_add(1).min(max)
            };
            let rate = self.rate(w);
            let r = self.rate_effective.entry(w).or_insert(rate);
            *r = if rate == 0 {
                0
            } else if suffering {
                (*r / 2).max(rate / 8).max(1)
            } else {
                r.saturating_mul(2).min(rate)
            };
        }
    }
}

/// The admission stage: holds the controller, hears every client request's latency,
/// answers `admin limits`, and tells the background stages their budgets whenever they
/// change.
pub struct AdmissionStage {
    admission: Admission,
    told: Option<(u32, u32, u64, u64)>,
    effects: VecDeque<Effect>,
}

impl AdmissionStage {
    pub fn new(admission: Admission) -> Self {
        let mut a = AdmissionStage { admission, told: None, effects: VecDeque::new() };
        a.tell();
        a
    }

    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    fn tell(&mut self) {
        let a = &self.admission;
        let now = (
            a.budget(Work::Handoff),
            a.budget(Work::AntiEntropy),
            a.rate_effective(Work::Handoff),
            a.rate_effective(Work::AntiEntropy),
        );
        if self.told != Some(now) {
            self.told = Some(now);
            self.effects.push_back(Effect::Signal(Signal::Budgets {
                handoff: now.0,
                anti_entropy: now.1,
                handoff_bytes_per_sec: now.2,
                anti_entropy_bytes_per_sec: now.3,
            }));
        }
    }

    fn reply(&mut self, conn: u64, id: u64, response: ClientResponse) {
        self.effects
            .push_back(Effect::Send { to: Dest::Conn(conn), msg: Message::ClientReply { id, response, epoch: 0 } });
    }
}

fn limits_doc(doc: serde_json::Value) -> ClientResponse {
    ClientResponse::Document { json: doc.to_string() }
}

impl Stage for AdmissionStage {
    fn id(&self) -> StageId {
        StageId::Admission
    }

    fn handle(&mut self, now: Now, input: Input) {
        match input {
            // Only a coordinator replicates ahead of a commit.
            Input::Ahead { .. } => {}
            Input::Tick { .. } => self.admission.handle_tick(now.mono_ms),
            Input::Signal(Signal::Latency { ms }) => self.admission.record_latency(now.mono_ms, ms),
            Input::Signal(Signal::Waited { storage, queue }) => {
                self.admission.record_waits(now.mono_ms, &storage, &queue)
            }
            Input::Message { from, msg: Message::Client { id, request: ClientRequest::Limits } } => {
                self.reply(from.conn, id, limits_doc(self.admission.limits_doc()));
            }
            Input::Message { from, msg: Message::Client { id, request: ClientRequest::SetLimits { pairs } } } => {
                let response = match self.admission.set_limits(&pairs) {
                    Ok(()) => {
                        tracing::info!(limits = ?pairs, "admission limits changed");
                        limits_doc(self.admission.limits_doc())
                    }
                    Err(e) => ClientResponse::Error { kind: ErrorKind::BadRequest, message: e.to_string() },
                };
                self.reply(from.conn, id, response);
            }
            Input::Message { .. } | Input::Stored { .. } | Input::Signal(_) => {}
        }
        self.tell();
    }

    fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    fn poll_timeout(&self) -> Option<u64> {
        Some(self.admission.poll_timeout())
    }

    fn report(&self, out: &mut crate::metrics::Report) {
        const LIMIT: &str = "Run-time admission limits as configured, by name (as ringkv admin limits shows them)";
        for (name, v) in self.admission.limits() {
            out.gauge("ringkv_admission_limit", LIMIT, &[("limit", &name)], v as f64);
        }
        const EFFECTIVE: &str = "Background budgets and byte rates in force now under latency feedback, by limit name";
        for w in Work::ALL {
            let budget = self.admission.budget(w) as f64;
            out.gauge("ringkv_admission_effective", EFFECTIVE, &[("limit", w.limit_name())], budget);
            let rate = self.admission.rate_effective(w) as f64;
            out.gauge("ringkv_admission_effective", EFFECTIVE, &[("limit", w.rate_name())], rate);
        }
        if let Some(p99) = self.admission.p99_ms() {
            out.gauge(
                "ringkv_admission_latency_p99_seconds",
                "Client requests' p99 latency over the admission window, which background budgets react to",
                &[],
                p99 as f64 / 1000.0,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_bound_inflight_and_zero_pauses() {
        let mut a = Admission::new(2, 0, 50, 1000);
        assert!(a.try_admit(Work::Handoff));
        assert!(a.try_admit(Work::Handoff));
        assert!(!a.try_admit(Work::Handoff));
        assert!(!a.try_admit(Work::AntiEntropy), "0 pauses");
        a.release(Work::Handoff);
        assert!(a.try_admit(Work::Handoff));
        a.set_limits(&[("anti_entropy.max_inflight".into(), 1)]).unwrap();
        assert!(a.try_admit(Work::AntiEntropy));
    }

    #[test]
    fn invalid_changes_change_nothing() {
        let mut a = Admission::new(2, 1, 50, 1000);
        let before = a.limits();
        assert!(matches!(
            a.set_limits(&[("handoff.max_inflight".into(), 5), ("nope".into(), 1)]),
            Err(LimitError::Unknown(_))
        ));
        assert!(matches!(a.set_limits(&[("handoff.max_inflight".into(), -1)]), Err(LimitError::Invalid { .. })));
        assert!(matches!(a.set_limits(&[("admission.latency_target_ms".into(), 0)]), Err(LimitError::Invalid { .. })));
        assert_eq!(a.limits(), before);
        a.set_limits(&[("handoff.max_inflight".into(), 3), ("admission.latency_target_ms".into(), 20)]).unwrap();
        assert_eq!(a.limits()["handoff.max_inflight"], 3);
        assert_eq!(a.limits()["admission.latency_target_ms"], 20);
    }

    #[test]
    fn slow_foreground_shrinks_budgets_and_recovery_grows_them() {
        let mut a = Admission::new(8, 4, 50, 1000);
        a.handle_tick(0);
        for t in 0..100 {
            a.record_latency(t, 200);
        }
        a.handle_tick(1000);
        assert_eq!(a.budgets()["handoff.budget"], 4);
        a.handle_tick(2000);
        a.record_latency(2000, 300);
        a.handle_tick(3000);
        assert_eq!(a.budgets()["anti_entropy.budget"], 1, "never below one");
        // Latency recovers: the old samples age out and budgets grow back one per window.
        for w in 4..20u64 {
            a.record_latency(w * 1000, 5);
            a.handle_tick(w * 1000);
        }
        assert_eq!(a.budgets()["handoff.budget"], 8);
        assert_eq!(a.budgets()["anti_entropy.budget"], 4);
    }

    #[test]
    fn slow_storage_or_long_queues_shrink_budgets_though_requests_look_fast() {
        for (storage, queue) in [(&[120u64][..], &[][..]), (&[][..], &[120u64][..])] {
            let mut a = Admission::new(8, 4, 50, 1000);
            a.handle_tick(0);
            for t in 0..100 {
                a.record_latency(t, 5);
                a.record_waits(t, storage, queue);
            }
            assert!(a.suffering());
            a.handle_tick(1000);
            assert_eq!(a.budgets()["handoff.budget"], 4, "storage {storage:?} queue {queue:?}");
            let doc = a.limits_doc();
            assert_eq!(doc["latency_p99_ms"], 5);
            assert_eq!(doc["waits_p99_ms"]["storage"], serde_json::json!(storage.first()));
            assert_eq!(doc["waits_p99_ms"]["queue"], serde_json::json!(queue.first()));
            // Fast waits again: the old samples age out and the budgets grow back.
            for w in 2..12u64 {
                a.record_waits(w * 1000, &[1], &[1]);
                a.handle_tick(w * 1000);
            }
            assert!(!a.suffering());
            assert_eq!(a.budgets()["handoff.budget"], 8);
        }
    }

    #[test]
    fn wait_samples_are_handed_on_in_batches() {
        let mut w = WaitSamples::default();
        assert_eq!(w.take_due(0), None);
        w.storage(10, 3);
        w.queue(20, 4);
        assert_eq!(w.take_due(50), None, "neither full nor old");
        assert_eq!(w.take_due(110), Some(Signal::Waited { storage: vec![3], queue: vec![4] }));
        assert_eq!(w.take_due(500), None, "emptied");
        for i in 0..WAIT_BATCH_MAX as u64 {
            w.storage(1000, i);
        }
        assert!(matches!(w.take_due(1000), Some(Signal::Waited { storage, .. }) if storage.len() == WAIT_BATCH_MAX));
    }

    #[test]
    fn the_stage_hears_waits_from_other_stages() {
        let mut s = AdmissionStage::new(Admission::new(8, 4, 50, 1000));
        let now = |ms| Now { mono_ms: ms, wall_ms: ms };
        while s.poll_effect().is_some() {}
        s.handle(now(0), Input::Tick { random: 0 });
        s.handle(now(1), Input::Signal(Signal::Waited { storage: vec![500; 10], queue: vec![] }));
        s.handle(now(1000), Input::Tick { random: 0 });
        let told = std::iter::from_fn(|| s.poll_effect()).collect::<Vec<_>>();
        assert!(told.iter().any(|e| matches!(e, Effect::Signal(Signal::Budgets { handoff: 4, anti_entropy: 2, .. }))));
    }

    #[test]
    fn a_rate_limiter_paces_bytes_and_zero_is_unlimited() {
        let mut r = RateLimiter::new(1000);
        assert!(r.ready(0));
        r.spend(0, 3000);
        assert!(!r.ready(0), "in debt after a large batch");
        assert_eq!(r.ready_at(0), Some(2000), "2000 bytes owed at 1000 bytes a second");
        assert!(!r.ready(1999));
        assert!(r.ready(2000));
        // Idle time refills at most one second's worth.
        assert!(r.ready(100_000));
        r.spend(100_000, 1500);
        assert_eq!(r.ready_at(100_000), Some(100_500));
        let mut free = RateLimiter::new(0);
        free.spend(0, u64::MAX);
        assert!(free.ready(0) && free.ready_at(0).is_none());
        free.set_rate(10);
        free.spend(0, 20);
        assert!(!free.ready(0), "a rate set at run time applies at once");
    }

    #[test]
    fn byte_rates_are_limits_an_operator_sets_and_reads() {
        let mut a = Admission::new(2, 1, 50, 1000).with_rates(0, 4096);
        assert_eq!(a.limits().get("handoff.bytes_per_sec"), Some(&0));
        assert_eq!(a.limits().get("anti_entropy.bytes_per_sec"), Some(&4096));
        a.set_limits(&[("handoff.bytes_per_sec".into(), 1_000_000)]).unwrap();
        assert_eq!(a.rate(Work::Handoff), 1_000_000);
        assert!(a.set_limits(&[("handoff.bytes_per_sec".into(), -1)]).is_err());
        let doc = a.limits_doc();
        assert_eq!(doc["handoff.max_inflight"], 2, "the flat names stay as they were");
        assert_eq!(doc["effective"]["handoff.bytes_per_sec"], 1_000_000);
        assert_eq!(doc["effective"]["anti_entropy.max_inflight"], 1);
        // Latency over the target halves the effective budget; the configured value stays.
        for t in 0..100 {
            a.record_latency(t, 500);
        }
        a.handle_tick(100);
        let doc = a.limits_doc();
        assert_eq!(doc["handoff.max_inflight"], 2);
        assert_eq!(doc["effective"]["handoff.max_inflight"], 1);
        assert_eq!(doc["latency_p99_ms"], 500);
        assert_eq!(doc["handoff.bytes_per_sec"], 1_000_000);
        assert_eq!(doc["effective"]["handoff.bytes_per_sec"], 500_000, "a configured rate is halved too");
        for k in 2..6 {
            a.record_latency(k * 1000, 500);
            a.handle_tick(k * 1000 + 100);
        }
        assert_eq!(a.rate_effective(Work::Handoff), 125_000, "down to an eighth at most");
        assert_eq!(a.rate_effective(Work::AntiEntropy), 4096 / 8);
        // Latency recovers: the rate doubles back each window, up to the configured rate.
        for k in 8..14 {
            a.handle_tick(k * 1000 + 100);
        }
        assert_eq!(a.rate_effective(Work::Handoff), 1_000_000);
        assert_eq!(a.rate_effective(Work::AntiEntropy), 4096);
    }
}
