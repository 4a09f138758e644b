//! Deterministic model test of the lease and generation rules
//! (`docs/design.md §7`, `pipecloud_core::lease`).
//!
//! Every schedule is a pure function of one `u64` seed. Two sites run the real
//! [`LeaseState`]: the home site `a` ([`Ambition::Hold`]) and the backup site's
//! controller `b` ([`Ambition::TakeOverOnExpiry`]). A model of the quorum store
//! (one linearizable register for the generation record and one lease key with
//! an expiry in true time, as etcd keeps them) answers their requests. Each site
//! has its own clock (random offset, rate off by up to ±0.2 %), every message a
//! random delay, and links (site ↔ store) and the store itself go down for
//! random intervals: requests and replies are lost. The site's driver is the
//! blocking one of the agent: while a request is in flight it wakes only when
//! the reply arrives or the request times out.
//!
//! At random instants of true time both sites' data-path gates are probed, and
//! every open gate is checked:
//!
//! * **at most one site releases at any instant** (no two gates open at once);
//! * a site releasing holds the store's lease key at that instant, with the
//!   generation it believes it holds (so a release after the lease lapsed in
//!   the store, or under a generation it did not win, fails).
//!
//! Planned stops: in some schedules a site stops on purpose at a random instant
//! and resigns ([`LeaseState::resign`]: its gate closes, then the store's lease
//! key is revoked), and restarts (a fresh state machine) a while later.
//!
//! Across all schedules both sites must have released, takeovers must have
//! happened and some acquire must have come early thanks to a resign (before
//! the revoked key would have lapsed), or the check proves nothing. Injected
//! bugs it must catch:
//! `BlindAcquire` (the acquire is not conditioned on the generation and the lease
//! key: two sites believe they hold the lease), `ReleaseAfterExpiry` (the data
//! path's gate is an "active" flag, not the deadline) and
//! `FailoverWithoutGeneration` (the controller takes over on seeing the lease
//! lapse, without winning the transaction) and `ResignBeforeFence` (a stopping
//! site revokes its lease while its data path still releases: the gate closes
//! only when the revoke's answer comes back).
//!
//! Environment: `PIPECLOUD_LEASE_SCHEDULES` (default 2 000), `PIPECLOUD_LEASE_SEED`
//! (first seed, default 0).

use pipecloud_core::lease::{
    Ambition, Event, Generation, GenerationRecord, LeaseConfig, LeaseState, Millis, Observation,
    Reply, Request, Role,
};
use std::cmp::Reverse;
use std::collections::BinaryHeap;

type Time = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bug {
    None,
    BlindAcquire,
    ReleaseAfterExpiry,
    FailoverWithoutGeneration,
    ResignBeforeFence,
}

/// splitmix64: deterministic, no dependencies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

/// A local clock: `offset + t * (1e6 + ppm) / 1e6`.
#[derive(Clone, Copy)]
struct Clock {
    offset: u64,
    ppm: i64,
}

impl Clock {
    fn local(&self, t: Time) -> Millis {
        let scaled = (t as i128 * (1_000_000 + self.ppm as i128)) / 1_000_000;
        self.offset + scaled as u64
    }
    /// The first true time at which the local clock reads at least `l`.
    fn true_at(&self, l: Millis) -> Time {
        if l <= self.offset {
            return 0;
        }
        let d = (l - self.offset) as i128;
        let rate = 1_000_000 + self.ppm as i128;
        let mut t = ((d * 1_000_000 + rate - 1) / rate) as u64;
        while self.local(t) < l {
            t += 1;
        }
        t
    }
}

/// Intervals of true time during which something is down.
#[derive(Default)]
struct Outages(Vec<(Time, Time)>);

impl Outages {
    fn random(rng: &mut Rng, horizon: Time, lease: Millis) -> Outages {
        let n = rng.below(4);
        Outages(
            (0..n)
                .map(|_| {
                    let start = rng.below(horizon);
                    (start, start + rng.range(1, 3 * lease))
                })
                .collect(),
        )
    }
    fn down(&self, t: Time) -> bool {
        self.0.iter().any(|&(s, e)| s <= t && t < e)
    }
}

/// The quorum store (etcd) as the model keeps it: linearizable, in true time.
#[derive(Default)]
struct Store {
    generation: Option<GenerationRecord>,
    /// Lease key: (site, generation, expires at in true time, the holder's
    /// incarnation: a restarted site's requests never touch the lease of its
    /// previous process, as etcd's lease ids keep them apart).
    lease: Option<(usize, Generation, Time, u64)>,
    /// When the last revoked key would have lapsed had it not been revoked.
    revoked_until: Time,
    /// Acquires that succeeded before a revoked key would have lapsed.
    early_acquires: u64,
}

impl Store {
    fn expire(&mut self, t: Time) {
        if matches!(self.lease, Some((_, _, exp, _)) if exp <= t) {
            self.lease = None;
        }
    }
    fn observation(&self) -> Observation {
        Observation {
            generation: self.generation.clone(),
            holder: self.lease.map(|(s, _, _, _)| SITES[s].to_string()),
        }
    }
    fn number(&self) -> Generation {
        self.generation.as_ref().map_or(0, |g| g.number)
    }
    fn apply(
        &mut self,
        (site, inc): (usize, u64),
        req: Request,
        t: Time,
        lease_ms: Millis,
        bug: Bug,
    ) -> Reply {
        self.expire(t);
        match req {
            Request::Observe => Reply::Observed(self.observation()),
            Request::Acquire { expected } => {
                let free = self.lease.is_none() && self.number() == expected;
                if free || bug == Bug::BlindAcquire {
                    if t < self.revoked_until {
                        self.early_acquires += 1;
                    }
                    let number = self.number() + 1;
                    self.generation = Some(GenerationRecord {
                        number,
                        site: SITES[site].into(),
                    });
                    self.lease = Some((site, number, t + lease_ms, inc));
                    Reply::Acquired { generation: number }
                } else {
                    Reply::AcquireLost(self.observation())
                }
            }
            Request::Renew => {
                let alive = match &mut self.lease {
                    Some((s, _, exp, i)) if *s == site && *i == inc => {
                        *exp = t + lease_ms;
                        true
                    }
                    _ => false,
                };
                Reply::Renewed {
                    alive,
                    generation: self.number(),
                }
            }
            Request::Resign => {
                if let Some((s, _, exp, i)) = self.lease {
                    if s == site && i == inc {
                        self.revoked_until = exp;
                        self.lease = None;
                    }
                }
                Reply::Resigned
            }
        }
    }
    /// Who holds the lease key at true time `t` (without mutating).
    fn holder_at(&self, t: Time) -> Option<(usize, Generation)> {
        match self.lease {
            Some((s, g, exp, _)) if t < exp => Some((s, g)),
            _ => None,
        }
    }
}

const SITES: [&str; 2] = ["a", "b"];

#[derive(Clone, Debug)]
enum Ev {
    /// A request arrives at the store.
    ToStore {
        site: usize,
        inc: u64,
        id: u64,
        req: Request,
    },
    /// A reply arrives at the site.
    ToSite { site: usize, id: u64, reply: Reply },
    /// The site's driver wakes up.
    Wake { site: usize, token: u64 },
    /// Probe both gates.
    Probe,
    /// A planned stop of the site: it resigns.
    Stop { site: usize },
    /// The stopped site starts again (a fresh process).
    Restart { site: usize },
}

struct Site {
    sm: LeaseState,
    clock: Clock,
    link: Outages,
    /// The id of the request in flight (a reply with another id is late: dropped).
    in_flight: Option<(u64, Millis)>,
    /// What the data path sees: the deadline (correct) or an "active" flag (bug).
    gate_deadline: Option<Millis>,
    gate_flag: bool,
    gate_generation: Generation,
    wake_token: u64,
    releases: u64,
    /// Stopped on purpose (resigning, or resigned): restarts later.
    stopped: bool,
    /// How many times the site was restarted.
    incarnation: u64,
}

struct World {
    rng: Rng,
    bug: Bug,
    now: Time,
    seq: u64,
    queue: BinaryHeap<Reverse<(Time, u64, usize)>>,
    events: Vec<Option<Ev>>,
    store: Store,
    store_down: Outages,
    sites: Vec<Site>,
    max_delay: Time,
    lease_ms: Millis,
    next_id: u64,
    takeovers: u64,
    trace: Vec<String>,
}

impl World {
    fn new(seed: u64, bug: Bug) -> World {
        let mut rng = Rng(seed);
        let lease_ms = [1_000, 2_000, 3_000][rng.below(3) as usize];
        let horizon = 40 * lease_ms;
        let max_delay = [2, 20, 100, 400][rng.below(4) as usize];
        let cfg = LeaseConfig::new(lease_ms).expect("valid lease");
        let mut sites = Vec::new();
        for (i, name) in SITES.iter().enumerate() {
            let clock = Clock {
                offset: rng.below(1_000_000),
                ppm: rng.range(0, 4000) as i64 - 2000,
            };
            let ambition = if i == 0 {
                Ambition::Hold
            } else {
                Ambition::TakeOverOnExpiry
            };
            let link = Outages::random(&mut rng, horizon, lease_ms);
            sites.push(Site {
                sm: LeaseState::new(cfg, *name, ambition, clock.local(0)),
                clock,
                link,
                in_flight: None,
                gate_deadline: None,
                gate_flag: false,
                gate_generation: 0,
                wake_token: 0,
                releases: 0,
                stopped: false,
                incarnation: 0,
            });
        }
        let store_down = Outages::random(&mut rng, horizon, lease_ms);
        let mut w = World {
            rng,
            bug,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: Vec::new(),
            store: Store::default(),
            store_down,
            sites,
            max_delay,
            lease_ms,
            next_id: 0,
            takeovers: 0,
            trace: Vec::new(),
        };
        w.schedule(0, Ev::Wake { site: 0, token: 0 });
        let b_starts = w.rng.below(lease_ms);
        w.schedule(b_starts, Ev::Wake { site: 1, token: 0 });
        w.schedule(1, Ev::Probe);
        // Planned stops: none in half the schedules, else one or two.
        let stops = [0, 0, 1, 2][w.rng.below(4) as usize];
        for _ in 0..stops {
            let site = w.rng.below(2) as usize;
            let at = w.rng.below(horizon);
            let back = at + w.rng.range(1, 3 * lease_ms);
            w.schedule(at, Ev::Stop { site });
            w.schedule(back, Ev::Restart { site });
        }
        w
    }

    fn schedule(&mut self, at: Time, ev: Ev) {
        self.seq += 1;
        self.events.push(Some(ev));
        self.queue
            .push(Reverse((at, self.seq, self.events.len() - 1)));
    }

    fn horizon(&self) -> Time {
        40 * self.lease_ms
    }

    fn run(&mut self) -> Result<(), String> {
        while let Some(Reverse((t, _, idx))) = self.queue.pop() {
            if t > self.horizon() {
                break;
            }
            self.now = t;
            let ev = self.events[idx].take().expect("each event runs once");
            match ev {
                Ev::ToStore { site, inc, id, req } => {
                    if self.store_down.down(t) {
                        continue;
                    }
                    let reply = self
                        .store
                        .apply((site, inc), req, t, self.lease_ms, self.bug);
                    self.trace.push(format!(
                        "{t}: store <- {} {req:?} => {reply:?}",
                        SITES[site]
                    ));
                    let delay = self.rng.below(self.max_delay + 1);
                    if !self.sites[site].link.down(t) {
                        self.schedule(t + delay, Ev::ToSite { site, id, reply });
                    }
                }
                Ev::ToSite { site, id, reply } => {
                    if self.sites[site].link.down(t)
                        || self.sites[site].in_flight.map(|f| f.0) != Some(id)
                    {
                        continue;
                    }
                    self.sites[site].in_flight = None;
                    let local = self.sites[site].clock.local(t);
                    self.sites[site].sm.handle_reply(reply, local);
                    self.step(site)?;
                }
                Ev::Wake { site, token } => {
                    if token == self.sites[site].wake_token {
                        self.step(site)?;
                    }
                }
                Ev::Probe => {
                    self.probe()?;
                    let next = t + self.rng.range(1, 30);
                    self.schedule(next, Ev::Probe);
                }
                Ev::Stop { site } => {
                    if self.sites[site].stopped {
                        continue;
                    }
                    self.sites[site].stopped = true;
                    let local = self.sites[site].clock.local(t);
                    self.trace
                        .push(format!("{t}: {} stops: resign", SITES[site]));
                    self.sites[site].sm.resign(local);
                    self.step(site)?;
                }
                Ev::Restart { site } => {
                    if !self.sites[site].stopped {
                        continue;
                    }
                    let s = &mut self.sites[site];
                    let local = s.clock.local(t);
                    let (cfg, ambition) = (*s.sm.config(), s.sm.ambition());
                    s.sm = LeaseState::new(cfg, SITES[site], ambition, local);
                    s.stopped = false;
                    s.incarnation += 1;
                    s.in_flight = None;
                    s.gate_deadline = None;
                    s.gate_flag = false;
                    self.trace.push(format!("{t}: {} restarts", SITES[site]));
                    self.step(site)?;
                }
            }
        }
        Ok(())
    }

    /// The driver of one site: timeouts, requests, events, then the gate.
    fn step(&mut self, i: usize) -> Result<(), String> {
        let t = self.now;
        let local = self.sites[i].clock.local(t);
        let site = &mut self.sites[i];
        let timeout = site.sm.config().request_timeout_ms;
        if matches!(site.in_flight, Some((_, sent)) if local >= sent + timeout) {
            // The blocking request timed out: the driver gives up on it.
            site.in_flight = None;
        }
        site.sm.handle_timeout(local);
        if site.in_flight.is_none() {
            if let Some(req) = site.sm.poll_request(local) {
                self.next_id += 1;
                let id = self.next_id;
                if self.bug == Bug::FailoverWithoutGeneration && i == 1 {
                    if let Request::Acquire { expected } = req {
                        // The bug: seeing the lease lapse is taken for winning it.
                        self.sites[i].sm.handle_reply(
                            Reply::Acquired {
                                generation: expected + 1,
                            },
                            local,
                        );
                        return self.after_step(i);
                    }
                }
                self.sites[i].in_flight = Some((id, local));
                let delay = self.rng.below(self.max_delay + 1);
                if !self.sites[i].link.down(t) {
                    let inc = self.sites[i].incarnation;
                    self.schedule(
                        t + delay,
                        Ev::ToStore {
                            site: i,
                            inc,
                            id,
                            req,
                        },
                    );
                }
            }
        }
        self.after_step(i)
    }

    fn after_step(&mut self, i: usize) -> Result<(), String> {
        let t = self.now;
        let site = &mut self.sites[i];
        while let Some(ev) = site.sm.poll_event() {
            self.trace.push(format!("{t}: {} event {ev:?}", SITES[i]));
            match ev {
                Event::Activated {
                    generation,
                    previous,
                } => {
                    site.gate_flag = true;
                    site.gate_generation = generation;
                    if previous.is_some_and(|p| p.site != SITES[i]) {
                        self.takeovers += 1;
                    }
                }
                Event::Fenced { .. } => site.gate_flag = false,
                Event::Alarm { .. } => return Err("alarm from a site that does not watch".into()),
            }
        }
        // The injected bug: a stopping site's data path goes on releasing
        // until the revoke's answer is back (it resigned before fencing).
        let releasing_while_resigning = self.bug == Bug::ResignBeforeFence
            && site.sm.resigned()
            && !site.sm.resign_done(site.clock.local(t));
        if !releasing_while_resigning {
            site.gate_deadline = site.sm.release_deadline();
        }
        if let Role::Active { generation, .. } = site.sm.role() {
            site.gate_generation = generation;
        }
        // Wake at the state machine's deadline, or, while a request is in
        // flight, when it times out (the blocking driver cannot wake earlier).
        let local = site.clock.local(t);
        let cfg = *site.sm.config();
        let wake_local = match (self.bug, site.in_flight) {
            // The flag-gated driver blocks in its request, then sleeps a fixed
            // interval: nothing closes the gate at the deadline.
            (Bug::ReleaseAfterExpiry, Some((_, sent))) => sent + cfg.request_timeout_ms,
            (Bug::ReleaseAfterExpiry, None) => local + cfg.renew_every_ms / 2,
            _ => site.sm.next_timeout(),
        };
        site.wake_token += 1;
        if wake_local == Millis::MAX {
            // Resigned with nothing left to send: asleep until restarted.
            return Ok(());
        }
        let at = site.clock.true_at(wake_local).max(t + 1);
        let token = site.wake_token;
        self.schedule(at, Ev::Wake { site: i, token });
        Ok(())
    }

    fn gate_open(&self, i: usize, t: Time) -> bool {
        let site = &self.sites[i];
        if self.bug == Bug::ReleaseAfterExpiry {
            site.gate_flag
        } else {
            matches!(site.gate_deadline, Some(d) if site.clock.local(t) < d)
        }
    }

    fn probe(&mut self) -> Result<(), String> {
        let t = self.now;
        let open: Vec<usize> = (0..self.sites.len())
            .filter(|&i| self.gate_open(i, t))
            .collect();
        if open.len() > 1 {
            return Err(format!("{t}: sites {open:?} release at the same instant"));
        }
        for &i in &open {
            self.sites[i].releases += 1;
            let want = (i, self.sites[i].gate_generation);
            let holder = self.store.holder_at(t);
            if holder != Some(want) {
                return Err(format!(
                    "{t}: site {} releases under generation {} but the store's lease key is {holder:?}",
                    SITES[i], want.1
                ));
            }
        }
        Ok(())
    }
}

#[derive(Default, Debug)]
struct Totals {
    releases: [u64; 2],
    takeovers: u64,
    early_acquires: u64,
}

fn run_one(seed: u64, bug: Bug, totals: &mut Totals) -> Result<(), String> {
    let mut w = World::new(seed, bug);
    let result = w.run();
    for i in 0..2 {
        totals.releases[i] += w.sites[i].releases;
    }
    totals.takeovers += w.takeovers;
    totals.early_acquires += w.store.early_acquires;
    if result.is_err() && std::env::var_os("PIPECLOUD_LEASE_TRACE").is_some() {
        for line in w.trace.iter().rev().take(60).rev() {
            eprintln!("  {line}");
        }
    }
    result.map_err(|e| format!("seed {seed}: {e}"))
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?}: not a number")),
        Err(_) => default,
    }
}

#[test]
fn lease_model_never_releases_at_two_sites() {
    let start = env_u64("PIPECLOUD_LEASE_SEED", 0);
    let count = env_u64("PIPECLOUD_LEASE_SCHEDULES", 2_000);
    assert!(count > 0, "PIPECLOUD_LEASE_SCHEDULES must be at least 1");
    let mut totals = Totals::default();
    for seed in start..start + count {
        if let Err(e) = run_one(seed, Bug::None, &mut totals) {
            panic!("{e} (replay: PIPECLOUD_LEASE_SEED={seed} PIPECLOUD_LEASE_SCHEDULES=1 PIPECLOUD_LEASE_TRACE=1)");
        }
    }
    println!(
        "lease model: {count} schedules, releases a={} b={}, takeovers={}, acquires before a revoked lease would have lapsed={}",
        totals.releases[0], totals.releases[1], totals.takeovers, totals.early_acquires
    );
    // A model in which nobody ever released, or the backup never took over,
    // proves nothing.
    assert!(
        totals.releases[0] > 0 && totals.releases[1] > 0,
        "{totals:?}"
    );
    assert!(totals.takeovers > 0, "{totals:?}");
    // Resigning must let the next acquire come before the lease would lapse.
    assert!(totals.early_acquires > 0, "{totals:?}");
}

fn assert_caught(bug: Bug) {
    let mut totals = Totals::default();
    for seed in 0..2_000 {
        if let Err(e) = run_one(seed, bug, &mut totals) {
            println!("{bug:?} caught: {e}");
            return;
        }
    }
    panic!("injected bug {bug:?} was not caught in 2000 schedules");
}

#[test]
fn catches_blind_acquire() {
    assert_caught(Bug::BlindAcquire);
}

#[test]
fn catches_release_after_expiry() {
    assert_caught(Bug::ReleaseAfterExpiry);
}

#[test]
fn catches_failover_without_generation() {
    assert_caught(Bug::FailoverWithoutGeneration);
}

#[test]
fn catches_resign_before_fence() {
    assert_caught(Bug::ResignBeforeFence);
}
