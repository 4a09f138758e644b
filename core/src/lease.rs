//! The group's lease and generation: which site may be the active one
//! (docs/design.md §7).
//!
//! A protection group is active at one site at a time. Who that is, is decided
//! by a quorum store (etcd, three members in three failure domains) that this
//! module never talks to: it is a sans-I/O state machine in the style of
//! quinn-proto. Time comes in as an argument (`now`, a local monotonic clock in
//! milliseconds), the requests to make come out of [`LeaseState::poll_request`],
//! their replies go in through [`LeaseState::handle_reply`], and the decisions the
//! driver must carry out come out of [`LeaseState::poll_event`].
//!
//! # The store's records (kept by the driver, described here)
//!
//! * the **generation record** `(number, site)`: the fencing token. Every
//!   site-level decision is one transaction conditioned on it; the number only
//!   grows, by one per successful [`Request::Acquire`];
//! * the **lease key** `(site, generation)`, attached to a store lease of
//!   `lease_ms`: present while its holder keeps renewing, deleted by the store
//!   when the holder stops.
//!
//! [`Request::Acquire`] `{ expected }` succeeds only if the generation record
//! still says `expected` **and** the lease key is absent; it then writes
//! `expected + 1` with this site's name and creates the lease key.
//!
//! # The rule
//!
//! A site releases client-bound output and completes guest writes only while
//! [`LeaseState::may_release`]`(now)`: it is [`Role::Active`] and
//! `now < valid_until`, where `valid_until = sent_at + lease_ms - margin_ms` for
//! the latest grant or renewal the store confirmed, `sent_at` being the local
//! time at which that request was **sent**.
//!
//! # Why no two sites release at the same instant
//!
//! The store starts a lease's countdown when it *processes* a grant or renewal,
//! which is after the request was sent, so in the store's time the lease key
//! lives until at least `sent_at + lease_ms`. `margin_ms` covers the difference
//! of clock rates over one lease (a tenth of the lease: far above any crystal's
//! drift) and the store's rounding. So a site stops releasing before the store
//! can delete its key. Another site becomes active only through an `Acquire`
//! that requires the key to be absent: after the deletion, so after the first
//! site stopped. A stale site that sees a higher generation (in a renewal reply
//! or an observation) stops at once, without waiting for its deadline.
//! A late reply is never taken for a fresh one: one request is in flight at a
//! time and `sent_at` is the local time at which it left.
//!
//! The deadline is also published ([`LeaseState::release_deadline`]) so that
//! the data path can check it on its own clock: a driver stuck in a request
//! cannot keep the gate open past the deadline.
//!
//! # Fencing and re-acquiring
//!
//! A site that loses its lease is [`Role::Fenced`] with the reason. Whether it
//! may become active again depends on its [`Ambition`]:
//! * [`Ambition::Hold`] (the group's home site): acquires at start when nobody
//!   holds the lease and the generation record is absent or its own; after its
//!   own lease lapsed it re-acquires if the record is still its own (nobody took
//!   over: e.g. the quorum was briefly unreachable). Once another site's
//!   generation is recorded it stays fenced: coming back is a failback, an
//!   operator's decision (docs/design.md §7).
//! * [`Ambition::TakeOverOnExpiry`] (the backup site's controller with policy
//!   `automatic`): acquires whenever the lease key is absent and a generation
//!   was recorded (the first generation is the home site's to take).
//! * [`Ambition::Watch`] (policy `alarm-only`): never acquires; raises
//!   [`Event::Alarm`] once per lapsed generation, until an operator confirms
//!   ([`LeaseState::confirm_takeover`]).
//!
//! # Resigning (a planned stop)
//!
//! A site that stops on purpose (its agent or controller shut down cleanly)
//! gives its lease up at once instead of leaving it to lapse, so that the next
//! site acquires without waiting out `lease_ms` ([`LeaseState::resign`]). The
//! generation record stays; only the lease key goes. **The order is
//! fail-closed**: the owner first stops acting (no output released, no write
//! completed: its data path is stopped), then calls `resign`, which closes the
//! gate at once ([`LeaseState::release_deadline`] is `None` from that call
//! on) and only then makes [`Request::Resign`] due; the driver publishes the
//! closed gate before it sends any request. A store that deleted the key can
//! let another site acquire at once, so a gate still open at that moment
//! would be two sites releasing (the model test's injected `ResignBeforeFence`).
//! A resigned site requests nothing more and never acquires again: it is
//! stopping. A crash resigns nothing: the lease lapses as before.

use std::collections::VecDeque;
use std::fmt;

/// Milliseconds of a local monotonic clock.
pub type Millis = u64;

/// A generation number (fencing token). 0: no generation was ever recorded.
pub type Generation = u64;

/// Shortest lease: the store counts leases in whole seconds.
pub const LEASE_MS_MIN: Millis = 1_000;
/// Longest lease accepted (10 min): a longer one only delays failover.
pub const LEASE_MS_MAX: Millis = 600_000;
/// At most this many undelivered [`Event`]s are kept; beyond that the oldest
/// [`Event::Alarm`] is dropped (every other event is at most one per transition,
/// and the driver polls after each call).
pub const EVENTS_MAX: usize = 16;

/// The timing of one group's lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The store lease's time to live (a whole number of seconds).
    pub lease_ms: Millis,
    /// How often the holder renews and a non-holder observes.
    pub renew_every_ms: Millis,
    /// Subtracted from every deadline: clock-rate difference and rounding.
    pub margin_ms: Millis,
    /// A request unanswered after this long counts as failed.
    pub request_timeout_ms: Millis,
}

/// Why a [`LeaseConfig`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseConfigError {
    #[error(
        "lease_ms = {0}: must be a whole number of seconds (etcd leases count seconds) \
         between {LEASE_MS_MIN} and {LEASE_MS_MAX}"
    )]
    OutOfRange(Millis),
}

impl LeaseConfig {
    /// The timing derived from the lease length: renew four times per lease,
    /// a tenth of it as margin (at least 100 ms), requests time out after a
    /// quarter.
    pub fn new(lease_ms: Millis) -> Result<LeaseConfig, LeaseConfigError> {
        if !(LEASE_MS_MIN..=LEASE_MS_MAX).contains(&lease_ms) || !lease_ms.is_multiple_of(1_000) {
            return Err(LeaseConfigError::OutOfRange(lease_ms));
        }
        Ok(LeaseConfig {
            lease_ms,
            renew_every_ms: lease_ms / 4,
            margin_ms: (lease_ms / 10).max(100),
            request_timeout_ms: lease_ms / 4,
        })
    }

    /// The local deadline of a grant or renewal sent at `sent_at`.
    fn deadline(&self, sent_at: Millis) -> Millis {
        sent_at + self.lease_ms - self.margin_ms
    }
}

/// What a site wants from the lease (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ambition {
    /// The group's home site: hold the lease, re-acquire only its own generation.
    Hold,
    /// A standby site with policy `automatic`: take over whenever the lease lapses.
    TakeOverOnExpiry,
    /// A standby site with policy `alarm-only`: report a lapsed lease, never act.
    Watch,
}

/// The generation record as the store holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenerationRecord {
    pub number: Generation,
    pub site: String,
}

/// What the store holds for the group, as one consistent read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observation {
    /// `None`: no generation was ever recorded.
    pub generation: Option<GenerationRecord>,
    /// The lease key: `Some(site)` while someone's lease is alive.
    pub holder: Option<String>,
}

impl Observation {
    fn number(&self) -> Generation {
        self.generation.as_ref().map_or(0, |g| g.number)
    }
}

/// A request the driver must make to the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Read the generation record and the lease key.
    Observe,
    /// One transaction: if the generation record says `expected` (0: absent)
    /// and the lease key is absent, record `expected + 1` for this site and
    /// create the lease key with a fresh lease of `lease_ms`.
    Acquire { expected: Generation },
    /// Renew this site's lease, then read the generation record.
    Renew,
    /// Revoke this site's lease (the lease key goes, the generation record
    /// stays): sent only after the gate was closed ([`LeaseState::resign`]).
    Resign,
}

/// The store's answer to the request in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Observed(Observation),
    /// The acquire transaction succeeded: this site holds `generation`.
    Acquired {
        generation: Generation,
    },
    /// The acquire transaction's condition failed; what the store holds now.
    AcquireLost(Observation),
    /// The renewal: `alive` is false when the store no longer knows the lease.
    Renewed {
        alive: bool,
        generation: Generation,
    },
    /// The lease was revoked (or the store no longer knew it).
    Resigned,
    /// No answer (transport error, timeout, store without quorum).
    Failed,
}

/// Why a site stopped being active.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceReason {
    /// Its deadline passed without a confirmed renewal.
    Expired,
    /// The store no longer knew its lease when it renewed.
    LeaseLost,
    /// The store records a higher generation.
    Superseded { by: Generation },
    /// This site stopped on purpose and gave its lease up ([`LeaseState::resign`]).
    Resigned,
}

impl fmt::Display for FenceReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FenceReason::Expired => f.write_str("lease expired (no renewal confirmed in time)"),
            FenceReason::LeaseLost => f.write_str("the quorum store no longer knows our lease"),
            FenceReason::Superseded { by } => write!(f, "superseded by generation {by}"),
            FenceReason::Resigned => f.write_str("resigned (planned stop)"),
        }
    }
}

/// A site's role for the group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Never held the lease (since start).
    Standby,
    /// Holds `generation` until `valid_until` unless renewed.
    Active {
        generation: Generation,
        valid_until: Millis,
    },
    /// Held `generation` and lost it.
    Fenced {
        generation: Generation,
        reason: FenceReason,
    },
}

impl Role {
    /// `standby`, `active` or `fenced`: the name `status` and metrics show.
    pub fn name(&self) -> &'static str {
        match self {
            Role::Standby => "standby",
            Role::Active { .. } => "active",
            Role::Fenced { .. } => "fenced",
        }
    }
}

/// A decision for the driver to carry out (in order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// This site became active with `generation`; `previous` is the generation
    /// record it replaced. When `previous` names another site this is a
    /// takeover: fence that site's group, fail over to the cut, activate.
    Activated {
        generation: Generation,
        previous: Option<GenerationRecord>,
    },
    /// This site stopped being active: hold output, stall guest writes.
    Fenced {
        generation: Generation,
        reason: FenceReason,
    },
    /// The lease of `generation` lapsed and this site only watches
    /// (policy `alarm-only`): an operator must confirm a takeover.
    Alarm { generation: GenerationRecord },
}

/// The lease state machine of one site for one group.
#[derive(Debug)]
pub struct LeaseState {
    cfg: LeaseConfig,
    site: String,
    ambition: Ambition,
    role: Role,
    /// The highest generation seen in the store.
    known: Generation,
    /// The request in flight and the local time it was sent.
    in_flight: Option<(Request, Millis)>,
    /// When the next request is due.
    next_at: Millis,
    /// An acquire decided by the last observation, sent next.
    pending_acquire: Option<Generation>,
    /// The record the pending acquire would replace.
    pending_previous: Option<GenerationRecord>,
    /// The last generation an alarm was raised for (one alarm per lapse).
    alarmed: Option<Generation>,
    /// Stopping (see "Resigning"): `Some(until)` while the revoke is still to
    /// be confirmed, retried until the local time `until` (past it the store's
    /// key has lapsed on its own); `Some(0)` once done or given up.
    resigning: Option<Millis>,
    events: VecDeque<Event>,
}

impl LeaseState {
    /// A site that has not yet talked to the store; it observes at once.
    pub fn new(cfg: LeaseConfig, site: impl Into<String>, ambition: Ambition, now: Millis) -> Self {
        LeaseState {
            cfg,
            site: site.into(),
            ambition,
            role: Role::Standby,
            known: 0,
            in_flight: None,
            next_at: now,
            pending_acquire: None,
            pending_previous: None,
            alarmed: None,
            resigning: None,
            events: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    pub fn site(&self) -> &str {
        &self.site
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn ambition(&self) -> Ambition {
        self.ambition
    }

    /// The highest generation this site has seen recorded.
    pub fn known_generation(&self) -> Generation {
        self.known
    }

    /// **The gate**: whether this site may release output and complete writes
    /// at local time `now` (see "The rule").
    pub fn may_release(&self, now: Millis) -> bool {
        matches!(self.role, Role::Active { valid_until, .. } if now < valid_until)
    }

    /// The local time until which the data path may release (exclusive), or
    /// `None` when it must hold everything. Publish it after every call.
    pub fn release_deadline(&self) -> Option<Millis> {
        match self.role {
            Role::Active { valid_until, .. } => Some(valid_until),
            _ => None,
        }
    }

    /// The operator confirmed a takeover (policy `alarm-only`): from now on
    /// this site behaves as [`Ambition::TakeOverOnExpiry`].
    pub fn confirm_takeover(&mut self, now: Millis) {
        self.ambition = Ambition::TakeOverOnExpiry;
        self.next_at = self.next_at.min(now);
    }

    /// A planned stop: call only once the owner stopped releasing output and
    /// completing writes. Closes the gate now (fenced with
    /// [`FenceReason::Resigned`] if active) and, if this site holds a lease,
    /// makes [`Request::Resign`] the next request, retried on failure until
    /// the lease would have lapsed anyway. From now on nothing else is
    /// requested: a resigned site never acquires again. Idempotent.
    pub fn resign(&mut self, now: Millis) {
        if self.resigning.is_some() {
            return;
        }
        self.pending_acquire = None;
        self.pending_previous = None;
        // Until when the store may still hold a key of ours: the local
        // deadline plus the margin, or a lease from a request in flight (a
        // renewal or an acquire landing after this call).
        let in_flight_until = match self.in_flight {
            Some((Request::Acquire { .. } | Request::Renew, sent_at)) => {
                sent_at + self.cfg.lease_ms + self.cfg.margin_ms
            }
            _ => 0,
        };
        let until = match self.role {
            Role::Active {
                generation,
                valid_until,
            } => {
                self.fence(generation, FenceReason::Resigned);
                (valid_until + self.cfg.margin_ms).max(in_flight_until)
            }
            // Never held, or already lost: nothing to give up unless an
            // acquire in flight lands.
            _ => in_flight_until,
        };
        self.resigning = Some(until);
        self.next_at = now;
        debug_assert!(self.release_deadline().is_none());
    }

    /// Whether [`LeaseState::resign`] was called.
    pub fn resigned(&self) -> bool {
        self.resigning.is_some()
    }

    /// Resigned, and nothing more is to be sent (the revoke was confirmed,
    /// or given up because the lease has lapsed by now).
    pub fn resign_done(&self, now: Millis) -> bool {
        matches!(self.resigning, Some(until) if now >= until) && self.in_flight.is_none()
    }

    /// The next decision for the driver, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The request to send now, if one is due; the driver sends it and later
    /// answers with [`LeaseState::handle_reply`] (or [`Reply::Failed`]).
    pub fn poll_request(&mut self, now: Millis) -> Option<Request> {
        self.handle_timeout(now);
        if self.in_flight.is_some() || now < self.next_at {
            return None;
        }
        if let Some(until) = self.resigning {
            if now >= until {
                return None;
            }
            // The gate closed when `resign` was called (before this request).
            assert!(
                self.release_deadline().is_none(),
                "resign with the gate open"
            );
            self.in_flight = Some((Request::Resign, now));
            return Some(Request::Resign);
        }
        let request = if matches!(self.role, Role::Active { .. }) {
            Request::Renew
        } else if let Some(expected) = self.pending_acquire.take() {
            Request::Acquire { expected }
        } else {
            Request::Observe
        };
        self.in_flight = Some((request, now));
        Some(request)
    }

    /// When to call again at the latest ([`LeaseState::poll_request`] or
    /// [`LeaseState::handle_timeout`]).
    pub fn next_timeout(&self) -> Millis {
        let mut t = match self.in_flight {
            Some((_, sent_at)) => sent_at + self.cfg.request_timeout_ms,
            // Resigned with nothing more to send: nothing is ever due.
            None if matches!(self.resigning, Some(until) if self.next_at >= until) => Millis::MAX,
            None => self.next_at,
        };
        if let Role::Active { valid_until, .. } = self.role {
            t = t.min(valid_until);
        }
        t
    }

    /// Deadlines: the lease (fence) and the request in flight (failed).
    pub fn handle_timeout(&mut self, now: Millis) {
        if let Some((_, sent_at)) = self.in_flight {
            if now >= sent_at + self.cfg.request_timeout_ms {
                self.handle_reply(Reply::Failed, now);
            }
        }
        if let Role::Active {
            generation,
            valid_until,
        } = self.role
        {
            if now >= valid_until {
                self.fence(generation, FenceReason::Expired);
            }
        }
    }

    /// The answer to the request in flight. A reply with nothing in flight
    /// (late, after its timeout) is ignored: the driver drops late replies.
    pub fn handle_reply(&mut self, reply: Reply, now: Millis) {
        let Some((request, sent_at)) = self.in_flight.take() else {
            return;
        };
        self.next_at = now + self.cfg.renew_every_ms;
        if self.resigning.is_some() {
            return self.resign_reply(request, reply, now);
        }
        match reply {
            Reply::Failed => {
                self.next_at = now + self.cfg.renew_every_ms / 2;
            }
            Reply::Resigned => {}
            Reply::Observed(obs) | Reply::AcquireLost(obs) => self.observed(obs, now),
            Reply::Acquired { generation } => {
                debug_assert!(matches!(request, Request::Acquire { .. }));
                assert!(
                    generation > self.known,
                    "an acquired generation must be new"
                );
                self.known = generation;
                self.alarmed = None;
                self.role = Role::Active {
                    generation,
                    valid_until: self.cfg.deadline(sent_at),
                };
                let previous = self.pending_previous.take();
                self.events.push_back(Event::Activated {
                    generation,
                    previous,
                });
                self.next_at = sent_at + self.cfg.renew_every_ms;
                self.handle_timeout(now);
            }
            Reply::Renewed { alive, generation } => {
                self.known = self.known.max(generation);
                let Role::Active {
                    generation: mine,
                    valid_until,
                } = self.role
                else {
                    return;
                };
                if generation > mine {
                    self.fence(mine, FenceReason::Superseded { by: generation });
                } else if !alive {
                    self.fence(mine, FenceReason::LeaseLost);
                } else {
                    let valid_until = valid_until.max(self.cfg.deadline(sent_at));
                    self.role = Role::Active {
                        generation: mine,
                        valid_until,
                    };
                    self.next_at = sent_at + self.cfg.renew_every_ms;
                    self.handle_timeout(now);
                }
            }
        }
    }

    /// A reply while stopping: only the revoke matters. An acquire that
    /// landed after `resign` won a lease this site will not use: revoke it
    /// too, without ever opening the gate.
    fn resign_reply(&mut self, request: Request, reply: Reply, now: Millis) {
        match reply {
            Reply::Resigned => self.resigning = Some(0),
            Reply::Acquired { generation } => {
                self.known = self.known.max(generation);
                self.resigning = Some(now + self.cfg.lease_ms + self.cfg.margin_ms);
                self.next_at = now;
            }
            Reply::Failed if request == Request::Resign => {
                self.next_at = now + self.cfg.renew_every_ms / 4;
            }
            // An observation or renewal that was in flight: the revoke is next
            // (or was not needed: nothing held).
            _ => self.next_at = now,
        }
    }

    fn fence(&mut self, generation: Generation, reason: FenceReason) {
        self.role = Role::Fenced { generation, reason };
        self.events.push_back(Event::Fenced { generation, reason });
    }

    fn push_alarm(&mut self, generation: GenerationRecord) {
        if self.events.len() >= EVENTS_MAX {
            if let Some(i) = self
                .events
                .iter()
                .position(|e| matches!(e, Event::Alarm { .. }))
            {
                self.events.remove(i);
            }
        }
        self.events.push_back(Event::Alarm { generation });
    }

    /// A consistent read of the store: fence on a higher generation, decide
    /// whether to acquire.
    fn observed(&mut self, obs: Observation, now: Millis) {
        let number = obs.number();
        self.known = self.known.max(number);
        if let Role::Active { generation, .. } = self.role {
            if number > generation {
                self.fence(generation, FenceReason::Superseded { by: number });
            }
            return;
        }
        if obs.holder.is_some() {
            return;
        }
        let own = obs.generation.as_ref().is_none_or(|g| g.site == self.site);
        let eligible = match self.ambition {
            Ambition::Hold => match self.role {
                Role::Standby => own,
                Role::Fenced { generation, .. } => own && number == generation,
                Role::Active { .. } => false,
            },
            Ambition::TakeOverOnExpiry => obs.generation.is_some(),
            Ambition::Watch => {
                if let Some(g) = obs.generation.clone() {
                    if self.alarmed != Some(g.number) && g.site != self.site {
                        self.alarmed = Some(g.number);
                        self.push_alarm(g);
                    }
                }
                false
            }
        };
        if eligible {
            self.pending_acquire = Some(number);
            self.pending_previous = obs.generation;
            self.next_at = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(generation: Option<(u64, &str)>, holder: Option<&str>) -> Observation {
        Observation {
            generation: generation.map(|(number, site)| GenerationRecord {
                number,
                site: site.into(),
            }),
            holder: holder.map(String::from),
        }
    }

    #[test]
    fn config_rejects_fractional_seconds() {
        assert!(LeaseConfig::new(1500).is_err());
        assert!(LeaseConfig::new(0).is_err());
        let c = LeaseConfig::new(3000).unwrap();
        assert_eq!((c.renew_every_ms, c.margin_ms), (750, 300));
    }

    #[test]
    fn home_site_acquires_renews_and_fences_on_expiry() {
        let cfg = LeaseConfig::new(3000).unwrap();
        let mut s = LeaseState::new(cfg, "a", Ambition::Hold, 0);
        assert_eq!(s.poll_request(0), Some(Request::Observe));
        s.handle_reply(Reply::Observed(obs(None, None)), 5);
        assert_eq!(s.poll_request(5), Some(Request::Acquire { expected: 0 }));
        s.handle_reply(Reply::Acquired { generation: 1 }, 10);
        assert_eq!(
            s.poll_event(),
            Some(Event::Activated {
                generation: 1,
                previous: None
            })
        );
        // Deadline from the *send* time of the acquire: 5 + 3000 - 300.
        assert_eq!(s.release_deadline(), Some(2705));
        assert!(s.may_release(2704) && !s.may_release(2705));
        assert_eq!(s.poll_request(755), Some(Request::Renew));
        s.handle_reply(
            Reply::Renewed {
                alive: true,
                generation: 1,
            },
            800,
        );
        assert_eq!(s.release_deadline(), Some(755 + 2700));
        // No confirmed renewal: fenced at the deadline even with a request hanging.
        assert_eq!(s.poll_request(1505), Some(Request::Renew));
        s.handle_timeout(3455);
        assert_eq!(s.role().name(), "fenced");
        assert!(!s.may_release(3455));
        assert_eq!(
            s.poll_event(),
            Some(Event::Fenced {
                generation: 1,
                reason: FenceReason::Expired
            })
        );
    }

    #[test]
    fn higher_generation_fences_at_once_and_home_site_stays_fenced() {
        let cfg = LeaseConfig::new(2000).unwrap();
        let mut s = LeaseState::new(cfg, "a", Ambition::Hold, 0);
        s.poll_request(0);
        s.handle_reply(Reply::Observed(obs(Some((4, "a")), None)), 0);
        s.poll_request(0);
        s.handle_reply(Reply::Acquired { generation: 5 }, 0);
        s.poll_request(500);
        s.handle_reply(
            Reply::Renewed {
                alive: true,
                generation: 6,
            },
            510,
        );
        assert_eq!(
            s.role(),
            Role::Fenced {
                generation: 5,
                reason: FenceReason::Superseded { by: 6 }
            }
        );
        // The lease key is absent but generation 6 is another site's: never re-acquire.
        s.poll_request(2000);
        s.handle_reply(Reply::Observed(obs(Some((6, "b")), None)), 2000);
        assert_eq!(s.poll_request(2000), None);
        assert_eq!(s.poll_request(10_000), Some(Request::Observe));
    }

    #[test]
    fn watcher_alarms_once_and_acquires_after_confirmation() {
        let cfg = LeaseConfig::new(1000).unwrap();
        let mut s = LeaseState::new(cfg, "b", Ambition::Watch, 0);
        for t in [0, 300, 600] {
            s.poll_request(t);
            s.handle_reply(Reply::Observed(obs(Some((3, "a")), None)), t);
        }
        assert!(matches!(s.poll_event(), Some(Event::Alarm { .. })));
        assert_eq!(s.poll_event(), None);
        s.confirm_takeover(700);
        assert_eq!(s.poll_request(900), Some(Request::Observe));
        s.handle_reply(Reply::Observed(obs(Some((3, "a")), None)), 900);
        assert_eq!(s.poll_request(900), Some(Request::Acquire { expected: 3 }));
        s.handle_reply(Reply::Acquired { generation: 4 }, 920);
        assert!(matches!(
            s.poll_event(),
            Some(Event::Activated {
                generation: 4,
                previous: Some(GenerationRecord { number: 3, .. })
            })
        ));
    }

    #[test]
    fn resign_closes_the_gate_before_the_revoke_and_never_reacquires() {
        let cfg = LeaseConfig::new(3000).unwrap();
        let mut s = LeaseState::new(cfg, "a", Ambition::Hold, 0);
        s.poll_request(0);
        s.handle_reply(Reply::Observed(obs(Some((1, "a")), None)), 0);
        s.poll_request(0);
        s.handle_reply(Reply::Acquired { generation: 2 }, 10);
        assert!(matches!(s.poll_event(), Some(Event::Activated { .. })));
        // A renewal in flight when the owner stops: the gate closes at once,
        // the revoke waits for the renewal's answer.
        assert_eq!(s.poll_request(750), Some(Request::Renew));
        s.resign(800);
        assert!(!s.may_release(800) && s.release_deadline().is_none());
        assert_eq!(
            s.poll_event(),
            Some(Event::Fenced {
                generation: 2,
                reason: FenceReason::Resigned
            })
        );
        assert_eq!(s.poll_request(800), None);
        s.handle_reply(
            Reply::Renewed {
                alive: true,
                generation: 2,
            },
            820,
        );
        assert_eq!(
            s.release_deadline(),
            None,
            "a renewal after resign reopened the gate"
        );
        assert_eq!(s.poll_request(820), Some(Request::Resign));
        s.handle_reply(Reply::Failed, 900);
        assert_eq!(s.poll_request(900), None);
        assert_eq!(s.poll_request(1100), Some(Request::Resign));
        s.handle_reply(Reply::Resigned, 1110);
        assert!(s.resign_done(1110));
        // The lease key is gone and the generation is its own: a Hold site
        // would re-acquire, a resigned one never does.
        for t in [2000, 10_000, 100_000] {
            assert_eq!(s.poll_request(t), None);
        }
        assert_eq!(s.role().name(), "fenced");
    }

    #[test]
    fn resign_gives_up_once_the_lease_lapsed_and_revokes_a_late_acquire() {
        let cfg = LeaseConfig::new(1000).unwrap();
        let mut s = LeaseState::new(cfg, "b", Ambition::TakeOverOnExpiry, 0);
        s.poll_request(0);
        s.handle_reply(Reply::Observed(obs(Some((1, "a")), None)), 0);
        assert_eq!(s.poll_request(0), Some(Request::Acquire { expected: 1 }));
        s.resign(5);
        assert!(!s.resign_done(5));
        // The acquire won after the stop: never active, revoked.
        s.handle_reply(Reply::Acquired { generation: 2 }, 20);
        assert_eq!(s.poll_event(), None);
        assert!(!s.may_release(20));
        assert_eq!(s.poll_request(20), Some(Request::Resign));
        s.handle_reply(Reply::Failed, 30);
        // Past the lease (1000) plus the margin (100): it lapsed by itself.
        assert_eq!(s.poll_request(1120), None);
        assert!(s.resign_done(1120));
        // A site that never held anything resigns at once.
        let mut w = LeaseState::new(cfg, "c", Ambition::Watch, 0);
        w.resign(0);
        assert!(w.resign_done(0) && w.poll_request(0).is_none());
    }

    #[test]
    fn late_reply_is_ignored() {
        let cfg = LeaseConfig::new(1000).unwrap();
        let mut s = LeaseState::new(cfg, "a", Ambition::Hold, 0);
        s.poll_request(0);
        s.handle_timeout(250); // timed out: counted as failed
        s.handle_reply(Reply::Observed(obs(None, None)), 260);
        assert_eq!(s.poll_request(260), None);
    }
}
