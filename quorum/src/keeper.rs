//! The lease keeper: the thread that runs one site's lease state machine
//! against etcd for one group (docs/design.md §7).
//!
//! It is the driver of `pipecloud_core::lease::LeaseState`: it feeds it the
//! gate's clock, carries out its requests on the group's records (blocking
//! calls, each bounded by the etcd client's attempt timeout), publishes the
//! release deadline to the [`LeaseGate`] after every step and hands the
//! decisions ([`Event`]s) to its owner through a bounded channel, so that long
//! work (a failover) never delays a renewal. At the bound
//! ([`EVENTS_QUEUED_MAX`]) an event is dropped and logged; the gate and
//! [`LeaseKeeper::status`] stay exact either way.
//!
//! A planned stop ([`LeaseKeeper::resign`]) closes the gate and then revokes
//! the lease, so the next site need not wait for it to lapse; dropping the
//! keeper without it (or a crash) leaves the lease to lapse.

use crate::gate::LeaseGate;
use crate::records::GroupRecords;
use pipecloud_core::lease::{Ambition, Event, FenceReason, LeaseConfig, LeaseState, Role};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Events waiting for the owner; beyond this they are dropped (logged).
pub const EVENTS_QUEUED_MAX: usize = 64;
/// The keeper looks at its stop flag at least this often.
const IDLE_MAX: Duration = Duration::from_millis(50);
/// How often [`LeaseKeeper::resign`] looks whether the revoke is done.
const RESIGN_POLL: Duration = Duration::from_millis(10);

/// What `status` and the metrics show about the lease.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseStatus {
    /// `standby`, `active` or `fenced`.
    pub role: &'static str,
    /// The generation held (active) or last held (fenced); 0 if never.
    pub generation: u64,
    /// The highest generation seen in etcd.
    pub known_generation: u64,
    /// Milliseconds the gate stays open without a renewal (0: closed).
    pub time_left_ms: u64,
    /// Why this site is fenced, when it is.
    pub fence_reason: Option<String>,
}

/// One site's lease on one group, kept alive by a thread.
pub struct LeaseKeeper {
    records: Arc<Mutex<GroupRecords>>,
    gate: Arc<LeaseGate>,
    status: Arc<Mutex<LeaseStatus>>,
    stop: Arc<AtomicBool>,
    confirm: Arc<AtomicBool>,
    /// Set by [`LeaseKeeper::resign`]; the thread sets `resigned` when done.
    resign: Arc<AtomicBool>,
    resigned: Arc<AtomicBool>,
    /// The lease's timing (bounds the wait in [`LeaseKeeper::resign`]).
    lease: LeaseConfig,
    thread: Option<JoinHandle<()>>,
}

impl LeaseKeeper {
    /// Starts the keeper; the gate stays closed until the lease is won.
    pub fn start(
        records: GroupRecords,
        lease: LeaseConfig,
        site: &str,
        ambition: Ambition,
    ) -> std::io::Result<(LeaseKeeper, Receiver<Event>)> {
        let gate = LeaseGate::new();
        let status = Arc::new(Mutex::new(LeaseStatus {
            role: "standby",
            ..Default::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let confirm = Arc::new(AtomicBool::new(false));
        let resign = Arc::new(AtomicBool::new(false));
        let resigned = Arc::new(AtomicBool::new(false));
        let (tx, rx) = sync_channel(EVENTS_QUEUED_MAX);
        let mut sm = LeaseState::new(lease, site, ambition, gate.now_ms());
        let records = Arc::new(Mutex::new(records));
        let (g, st, sp, cf) = (gate.clone(), status.clone(), stop.clone(), confirm.clone());
        let (rs, rsd) = (resign.clone(), resigned.clone());
        let recs = records.clone();
        let thread = std::thread::Builder::new()
            .name(format!("lease-{site}"))
            .spawn(move || {
                while !sp.load(Ordering::Relaxed) {
                    if cf.swap(false, Ordering::Relaxed) {
                        sm.confirm_takeover(g.now_ms());
                    }
                    if rs.load(Ordering::Relaxed) && !sm.resigned() {
                        sm.resign(g.now_ms());
                    }
                    // Fail-closed: the gate as the state machine has it now
                    // (closed after a resign) is published before any request
                    // goes out, so the revoke never precedes the closing.
                    g.publish(sm.release_deadline());
                    if let Some(req) = sm.poll_request(g.now_ms()) {
                        let reply = recs.lock().unwrap_or_else(|p| p.into_inner()).execute(req);
                        sm.handle_reply(reply, g.now_ms());
                    }
                    sm.handle_timeout(g.now_ms());
                    g.publish(sm.release_deadline());
                    // Status first: an owner reacting to an event sees it.
                    *st.lock().unwrap_or_else(|p| p.into_inner()) = status_of(&sm, &g);
                    while let Some(ev) = sm.poll_event() {
                        log_event(&ev, sm.site());
                        if let Err(TrySendError::Full(ev)) = tx.try_send(ev) {
                            tracing::error!("lease: event queue full, dropped {ev:?}");
                        }
                    }
                    if sm.resign_done(g.now_ms()) {
                        rsd.store(true, Ordering::Release);
                    }
                    let wait = sm.next_timeout().saturating_sub(g.now_ms());
                    std::thread::sleep(Duration::from_millis(wait).min(IDLE_MAX));
                }
                g.publish(None);
            })?;
        Ok((
            LeaseKeeper {
                records,
                gate,
                status,
                stop,
                confirm,
                resign,
                resigned,
                lease,
                thread: Some(thread),
            },
            rx,
        ))
    }

    /// The gate the data path checks.
    pub fn gate(&self) -> Arc<LeaseGate> {
        self.gate.clone()
    }

    pub fn status(&self) -> LeaseStatus {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        s.time_left_ms = self.gate.time_left().map_or(0, |d| d.as_millis() as u64);
        s
    }

    /// Degrade to async only as the lease holder: one etcd transaction
    /// conditioned on this site's generation and lease. Blocking.
    pub fn record_degraded(&self) -> bool {
        if !self.gate.is_open() {
            return false;
        }
        match self
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record_degraded()
        {
            Ok(done) => done,
            Err(e) => {
                tracing::warn!("lease: recording degrade-to-async failed: {e}");
                false
            }
        }
    }

    /// An operator confirmed a takeover (policy `alarm-only`).
    pub fn confirm_takeover(&self) {
        self.confirm.store(true, Ordering::Relaxed);
    }

    /// A planned stop: call once the owner stopped releasing output and
    /// completing writes. The gate closes at once (here, and again by the
    /// keeper before it sends anything), then the keeper revokes the lease
    /// (`GroupRecords::resign`; the generation stays) and from then on
    /// requests nothing. Blocks until the revoke is confirmed or given up
    /// (the lease has lapsed by then), at most the lease plus its margin.
    /// Returns whether it finished in that time.
    pub fn resign(&self) -> bool {
        self.gate.publish(None);
        self.resign.store(true, Ordering::Relaxed);
        let bound = Duration::from_millis(self.lease.lease_ms + self.lease.margin_ms);
        let t0 = std::time::Instant::now();
        while t0.elapsed() < bound {
            if self.resigned.load(Ordering::Acquire) {
                return true;
            }
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                return false;
            }
            std::thread::sleep(RESIGN_POLL);
        }
        false
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.gate.publish(None);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn status_of(sm: &LeaseState, gate: &LeaseGate) -> LeaseStatus {
    let (generation, fence_reason) = match sm.role() {
        Role::Standby => (0, None),
        Role::Active { generation, .. } => (generation, None),
        Role::Fenced { generation, reason } => (generation, Some(reason.to_string())),
    };
    LeaseStatus {
        role: sm.role().name(),
        generation,
        known_generation: sm.known_generation(),
        time_left_ms: gate.time_left().map_or(0, |d| d.as_millis() as u64),
        fence_reason,
    }
}

fn log_event(ev: &Event, site: &str) {
    match ev {
        Event::Activated {
            generation,
            previous,
        } => {
            tracing::info!("lease: site {site} is active with generation {generation} (previous: {previous:?})")
        }
        Event::Fenced {
            generation,
            reason: FenceReason::Resigned,
        } => tracing::info!(
            "lease: site {site} resigned generation {generation} (planned stop): \
             revoking the lease; the gate is closed"
        ),
        Event::Fenced { generation, reason } => tracing::error!(
            "lease: site {site} FENCED (generation {generation}): {reason}; \
             holding all client-bound output and stalling guest writes"
        ),
        Event::Alarm { generation } => tracing::error!(
            "lease: ALARM: the lease of generation {} (site {}) lapsed; policy alarm-only: \
             confirm a takeover by hand",
            generation.number,
            generation.site
        ),
    }
}
