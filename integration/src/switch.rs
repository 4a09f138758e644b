//! The run-time switch end to end (issue 22 "Done when"; docs/design.md §17).
//!
//! - `disaster --topology topology/guest.toml --mode switch --phase P`: the
//!   agent starts the guest group in `pipelined` (QEMU with the capture shim),
//!   one client connection keeps sending requests, `ctl mode checkpoint`
//!   switches the group in (and for `leaving`, once in, `ctl mode pipelined`
//!   switches it out), and the whole primary site dies at a random instant
//!   inside the named phase, found by polling the agent's `switch` status line.
//!   Then the check that fits what the backup did: it wrote `checkpoint.toml`
//!   (a full-state failover) → `vm restore`, the same connection must continue
//!   the counter and no reply may be unknown to the resumed guest; no
//!   `checkpoint.toml` (disk-only) → the disk-only check below.
//! - `disaster --topology topology/guest.toml --mode pipelined` (or `sync`): the
//!   same site, never switched: the disk-only check alone.
//! - `switch-load`: clients on the guest's service while the group goes
//!   pipelined → checkpoint → pipelined, no disaster; every broken connection
//!   counts in `switch_drops`, and the reply latency per second goes to a CSV.
//!
//! **The disk-only check.** The backup failed over to the disk-only causal cut
//! (no RAM, no device state): the harness cold-boots the guest at the backup
//! site from the failed-over disk (`pipecloud vm start --disk`; the guest's init
//! mounts the ext4, replaying its journal), moves the client's route there and
//! asks the new service one `probe` request on a new connection, then powers
//! the guest off cleanly and reads the disk: every request the client got a
//! reply for (before the disaster, and the probe) must be a line of the
//! guest's on-disk log (CV ⊆ SV), and `e2fsck -fn` must be clean. The client's
//! old connection is gone with the primary's guest (that is what disk-only
//! protection promises; the harness hangs it up), and the new guest's counter
//! starts afresh: the check is the log, not the counter.

use crate::disaster::{point_dir, Rng};
use crate::fullstate::{
    build_guest, failover, move_route, power_off, read_disk, restore, Client, GuestOptions,
    GuestSite, Reply, PATIENCE, REPLIES_AFTER,
};
use crate::run::bin;
use crate::sys::{ns_cmd, run, wait_until};
use anyhow::{bail, Context, Result};
use pipecloud_core::topology::{Mode, Topology};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The switch phase a disaster point aims at (`--phase`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// Pre-copy of the guest's RAM: output still released by the disk rule.
    Seeding,
    /// The first stop-and-copy epoch is captured, not yet acknowledged.
    FirstEpoch,
    /// `ctl mode pipelined` after a full switch in: the Leave is under way (or
    /// just done).
    Leaving,
    /// One of the three, drawn per point.
    Any,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Seeding => "seeding",
            Target::FirstEpoch => "first-epoch",
            Target::Leaving => "leaving",
            Target::Any => "any",
        }
    }
}

/// The agent's view of a switch: the `phase=` and `acked=` fields of its
/// `epochs GROUP:` status line (`phase=off|seeding:S|on|leaving:E`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SwitchStatus {
    /// `off`, `seeding`, `on` or `leaving` (empty: no epochs line).
    pub phase: String,
    /// The epoch the phase names: the seeded epoch `S` while seeding, the
    /// closed epoch `E` while leaving.
    pub epoch: Option<u64>,
    /// The backup's last acknowledged epoch as the agent knows it.
    pub acked: Option<u64>,
    /// The epochs line as printed (for the point's report).
    pub line: String,
}

/// The number after `key` in `line` (`acked=12 …`).
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))?
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .ok()
}

impl SwitchStatus {
    /// Parses the agent's status table.
    pub fn parse(table: &str) -> SwitchStatus {
        let line = table
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("epochs "))
            .unwrap_or("");
        // The free text of `last_switch="…"` comes last; the fields before it.
        let fields = line.split(" last_switch=").next().unwrap_or("");
        let phase = fields
            .split_whitespace()
            .find_map(|w| w.strip_prefix("phase="))
            .unwrap_or("");
        let (phase, epoch) = match phase.split_once(':') {
            Some((p, e)) => (p, e.parse().ok()),
            None => (phase, None),
        };
        SwitchStatus {
            phase: phase.to_owned(),
            epoch,
            acked: field(fields, "acked="),
            line: line.to_owned(),
        }
    }

    /// Whether the agent is inside `target`'s phase (`seed`: the seeded epoch
    /// seen earlier in this switch). `Any` never matches: it is drawn first.
    fn inside(&self, target: Target, seed: Option<u64>) -> bool {
        match target {
            Target::Seeding => self.phase == "seeding",
            Target::FirstEpoch => {
                self.phase == "on" && seed.is_some_and(|s| self.acked.is_none_or(|a| a < s))
            }
            Target::Leaving => self.phase == "leaving",
            Target::Any => false,
        }
    }
}

/// The agent's control socket in the run's topology.
fn ctl_socket(run_topo: &Path) -> Result<PathBuf> {
    let t = Topology::parse(&std::fs::read_to_string(run_topo)?, "run topology")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(t.hosts.first().context("no host")?.ctl_socket.clone())
}

/// One `status` request (in-process: polling must be fast enough to land
/// inside a first epoch of a few tens of milliseconds).
fn poll(sock: &Path) -> Result<SwitchStatus> {
    let table = pipecloud::ctl::status(sock, false).context("ctl status")?;
    Ok(SwitchStatus::parse(&table))
}

/// `ctl mode MODE` on a thread of its own (the request may answer only when
/// the switch is done): joined by [`ModeRequest::answer`].
struct ModeRequest(std::thread::JoinHandle<Result<String>>);

impl ModeRequest {
    fn send(sock: &Path, mode: Mode) -> ModeRequest {
        let sock = sock.to_owned();
        ModeRequest(std::thread::spawn(move || {
            pipecloud::ctl::set_mode(&sock, mode, None)
                .map_err(|e| anyhow::anyhow!("ctl mode {mode}: {e}"))
        }))
    }
    fn answer(self) -> Result<String> {
        self.0
            .join()
            .map_err(|_| anyhow::anyhow!("the ctl mode thread panicked"))?
    }
}

/// Waits until `f(status)` holds; fails after `PATIENCE` or on a status error.
fn wait_status(
    sock: &Path,
    what: &str,
    mut f: impl FnMut(&SwitchStatus) -> bool,
) -> Result<SwitchStatus> {
    let t0 = Instant::now();
    loop {
        let s = poll(sock)?;
        if f(&s) {
            return Ok(s);
        }
        if t0.elapsed() > PATIENCE {
            bail!("timed out after {PATIENCE:?} waiting for {what}; last epochs line: {s:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What one switch disaster point found.
#[derive(Debug, Default)]
pub struct SwitchPoint {
    /// The phase the agent was in at the last poll before the kill.
    pub killed_in: String,
    /// The agent's epochs line at that poll.
    pub status: String,
    pub replies_before: usize,
    pub replies_after: usize,
    /// The backup failed over to a checkpoint (`checkpoint.toml`) at this epoch.
    pub epoch: Option<u64>,
    pub resumed: bool,
    pub survived: bool,
    pub counter_gaps: usize,
    /// Replies the recovered site does not know: full-state, a counter value the
    /// resumed guest reached again; disk-only, a reply whose log line is missing.
    pub unsafe_replies: usize,
    /// Acknowledged requests missing from the recovered disk's log.
    pub lost_acked: usize,
    pub fsck_clean: bool,
    pub failover_ms: u128,
    /// `vm restore` (full-state) or the cold boot to a first probe reply (disk-only).
    pub recover_ms: u128,
    pub notes: Vec<String>,
}

impl SwitchPoint {
    pub fn disk_only(&self) -> bool {
        self.epoch.is_none()
    }

    /// Why the point broke the guarantee (empty: it held).
    pub fn failures(&self) -> Vec<String> {
        let mut w = self.notes.clone();
        if self.replies_before == 0 {
            w.push("no reply before the disaster: the point proves nothing".into());
        }
        if !self.resumed {
            w.push("the guest did not come back at the backup site".into());
        }
        if !self.disk_only() && !self.survived {
            w.push("full-state failover but the client's connection did not survive".into());
        }
        if self.counter_gaps > 0 {
            w.push(format!("{} counter gaps", self.counter_gaps));
        }
        if self.unsafe_replies > 0 {
            w.push(format!(
                "{} replies the recovered site does not know",
                self.unsafe_replies
            ));
        }
        if self.lost_acked > 0 {
            w.push(format!(
                "{} acknowledged requests missing from the on-disk log",
                self.lost_acked
            ));
        }
        if !self.fsck_clean {
            w.push("e2fsck -fn of the recovered disk is not clean".into());
        }
        w
    }
}

/// How a point drives the group before the disaster.
#[derive(Clone, Copy, Debug)]
pub enum Plan {
    /// Never switched (`--mode pipelined|sync|async` on a guest topology).
    Stay,
    /// Switch, and kill inside this phase (never `Target::Any`), at a delay
    /// drawn from 0 to this many milliseconds after the phase was first seen
    /// (a phase that ends before it: the point is retried with less).
    Switch(Target, u64),
}

/// Runs one point: site up in `mode` (with the capture shim), client, the
/// plan's switch and kill, failover and the check for what the backup did.
pub fn run_point(
    topo_path: &Path,
    work: &Path,
    prefix: &str,
    mode: Mode,
    plan: Plan,
    run_for: Duration,
    rng: &mut Rng,
) -> Result<SwitchPoint> {
    let opts = GuestOptions {
        mode,
        preload_shim: true,
        ..GuestOptions::default()
    };
    let mut site = GuestSite::up(topo_path, work, prefix, &opts)?;
    let sock = ctl_socket(&site.run_topo)?;
    let t0 = Instant::now();
    let mut client = Client::start(&site.client_ns.name, site.target, "req", t0);
    wait_until(PATIENCE, "the first reply of the guest", || {
        client.count() > 0 || client.ended()
    })?;
    std::thread::sleep(run_for);
    let mut p = SwitchPoint::default();

    // The switch, and the kill inside the target phase.
    let mut last = poll(&sock)?;
    let mut request = None;
    if let Plan::Switch(target, max_delay_ms) = plan {
        let mut seed = None;
        if target == Target::Leaving {
            ModeRequest::send(&sock, Mode::Checkpoint).answer()?;
            let s = wait_status(&sock, "a full switch in", |s| {
                if s.phase == "seeding" {
                    seed = s.epoch.or(seed);
                }
                s.phase == "on" && seed.zip(s.acked).is_some_and(|(e, a)| a >= e)
            })?;
            p.notes.extend(
                seed.is_none()
                    .then(|| format!("no seeded epoch seen before `on`: {}", s.line)),
            );
            std::thread::sleep(Duration::from_millis(rng.range(200, 1500)));
            request = Some(ModeRequest::send(&sock, Mode::Pipelined));
        } else {
            request = Some(ModeRequest::send(&sock, Mode::Checkpoint));
        }
        // A Leave that ends before the kill is "just after it" and kills at once.
        let t_sw = Instant::now();
        let mut kill_at = None;
        loop {
            let s = poll(&sock)?;
            if s.phase == "seeding" {
                seed = s.epoch.or(seed);
            }
            let inside = s.inside(target, seed);
            let done = match target {
                Target::Seeding => s.phase == "on" || s.phase == "off" && seed.is_some(),
                Target::FirstEpoch => {
                    s.phase == "on" && !inside || s.phase == "off" && seed.is_some()
                }
                Target::Leaving => s.phase == "off",
                Target::Any => true,
            };
            last = s;
            if inside {
                let at = *kill_at.get_or_insert_with(|| {
                    Instant::now() + Duration::from_millis(rng.range(0, max_delay_ms))
                });
                if Instant::now() >= at {
                    break;
                }
            }
            if done {
                if target == Target::Leaving {
                    break; // just after the Leave: still the point of the phase
                }
                bail!(
                    "the switch passed the {} phase before the kill (last: {:?}); retry the point",
                    target.name(),
                    last.line
                );
            }
            if t_sw.elapsed() > PATIENCE {
                bail!(
                    "the switch never reached {}: {:?}",
                    target.name(),
                    last.line
                );
            }
        }
    }

    if let Plan::Stay = plan {
        // Right after a reply reached the client: the write behind it must be
        // at the backup (the most demanding instant for the disk rule).
        let seen = client.count();
        let deadline = Instant::now() + PATIENCE;
        while client.count() == seen && !client.ended() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    // The disaster: the whole primary site dies.
    site.qemu.kill();
    site.agent.kill();
    p.replies_before = client.count();
    drop(site.host_ns.take());
    p.killed_in = if last.phase.is_empty() {
        "-".into()
    } else {
        last.phase.clone()
    };
    p.status = last.line.clone();
    if let Some(r) = request {
        // The request's answer does not matter (the agent is dead); a refusal
        // before the kill would, but then the phase was never reached.
        let _ = r.answer();
    }
    let fo = failover(&site, work)?;
    p.failover_ms = fo.ms;
    p.epoch = fo.epoch;
    move_route(&site)?;
    let t1 = Instant::now();
    let mut expected = Vec::new();
    if fo.epoch.is_some() {
        // Full state: the same connection continues.
        let restored = restore(&site, &fo);
        p.recover_ms = t1.elapsed().as_millis();
        if let Err(e) = &restored {
            p.notes.push(format!("restore failed: {e:#}"));
        }
        p.resumed = restored.is_ok();
        if p.resumed {
            let _ = wait_until(PATIENCE, "replies from the resumed guest", || {
                client.count() >= p.replies_before + REPLIES_AFTER || client.ended()
            });
        }
        if !p.resumed {
            client.hang_up();
        }
        match client.finish() {
            Ok(()) => p.survived = p.resumed,
            Err(e) => p.notes.push(format!("client: {e:#}")),
        }
        let got = client.replies();
        p.replies_after = got.len().saturating_sub(p.replies_before);
        p.counter_gaps = got
            .windows(2)
            .filter(|w| w[1].value != w[0].value + 1)
            .count();
        if let Some(first_after) = got.get(p.replies_before) {
            p.unsafe_replies = got[..p.replies_before]
                .iter()
                .filter(|x| x.value >= first_after.value)
                .count();
        }
    } else {
        // Disk only: the connection died with the primary's guest; a cold
        // boot from the failed-over disk, and one probe on a new connection.
        client.hang_up();
        let _ = client.finish();
        let booted = run(
            ns_cmd(&site.backup_ns.name, &bin("pipecloud").to_string_lossy())
                .args(["vm", "start", "--topology"])
                .arg(&site.run_topo)
                .args(["--machine", &site.machine, "--disk"])
                .arg(format!("{}={}", site.disk, fo.image.display())),
        );
        if let Err(e) = &booted {
            p.notes.push(format!("cold boot failed: {e:#}"));
        } else {
            let t = Instant::now();
            let mut probe = Client::start(&site.client_ns.name, site.target, "probe", t);
            let _ = wait_until(PATIENCE, "the cold-booted guest's first reply", || {
                probe.count() > 0 || probe.ended()
            });
            let _ = probe.finish();
            p.recover_ms = t1.elapsed().as_millis();
            p.resumed = probe.count() > 0;
            if !p.resumed {
                p.notes
                    .push("the cold-booted guest never answered a probe".into());
            }
            p.replies_after = probe.count();
            expected.extend(probe.log_lines());
        }
    }
    if p.resumed {
        if let Err(e) = power_off(&site) {
            p.notes.push(format!("{e:#}"));
        }
    }
    site.qemu.kill();
    let (clean, lines) = read_disk(&fo.image);
    p.fsck_clean = clean;
    let before: Vec<String> = client.log_lines();
    p.lost_acked = before
        .iter()
        .chain(&expected)
        .filter(|l| !lines.contains(*l))
        .count();
    if fo.epoch.is_none() {
        // Disk-only: a reply is "known" to the recovered site iff its line is on disk.
        p.unsafe_replies = before[..p.replies_before.min(before.len())]
            .iter()
            .filter(|l| !lines.contains(*l))
            .count();
    }
    Ok(p)
}

/// A `disaster` run on a guest topology.
pub struct DisasterRun<'a> {
    pub topology: &'a Path,
    /// The run's work directory (a directory per point in it).
    pub base: &'a Path,
    /// Namespace prefix.
    pub prefix: &'a str,
    /// The disk-only mode of a point that is never switched (`target` None).
    pub mode: Mode,
    /// `--mode switch --phase`.
    pub target: Option<Target>,
    pub points: usize,
    pub seed: u64,
    /// Shortest and longest run before the switch (or the disaster), ms.
    pub run_ms: (u64, u64),
}

/// `disaster` on a guest topology in `--mode switch` (`target`) or, with
/// `target` None, in the disk-only `mode` never switched.
pub fn disaster(a: &DisasterRun) -> Result<()> {
    let DisasterRun {
        topology,
        base,
        prefix,
        mode,
        target,
        points,
        seed,
        run_ms: (min_ms, max_ms),
    } = *a;
    let name = topology
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    build_guest()?;
    let mut rng = Rng(seed);
    let mut t = Tally::default();
    for i in 0..points {
        let run_for = Duration::from_millis(rng.range(min_ms, max_ms));
        let aim = match target {
            None => None,
            Some(Target::Any) => Some(
                [Target::Seeding, Target::FirstEpoch, Target::Leaving][rng.range(0, 2) as usize],
            ),
            Some(x) => Some(x),
        };
        // The first epoch lasts a few polls: kill at once; a Leave about one
        // round trip and an fsync; seeding seconds.
        let max_delay = |t: Target| match t {
            Target::Seeding => 1000,
            Target::Leaving => 20,
            Target::FirstEpoch | Target::Any => 0,
        };
        let start_mode = if aim.is_some() { Mode::Pipelined } else { mode };
        let dir = point_dir(base, i);
        let t_point = Instant::now();
        // A switch that ran through the phase between two polls is retried
        // (at most 3 times): the point is about that phase.
        let mut attempt = 0;
        let r = loop {
            let plan = aim.map_or(Plan::Stay, |t| Plan::Switch(t, max_delay(t) >> attempt));
            let r = run_point(topology, &dir, prefix, start_mode, plan, run_for, &mut rng);
            match r {
                Err(e) if attempt < 3 && format!("{e:#}").contains("retry the point") => {
                    attempt += 1;
                    t.missed += 1;
                    println!("point {i}: {e:#}");
                    let _ = std::fs::remove_dir_all(&dir);
                }
                r => break r,
            }
        }
        .with_context(|| format!("switch point {i} (work dir {})", dir.display()))?;
        println!(
            "point {i}: aim={} killed_in={} run {run_for:?} replies before={} after={} failover={} resumed={} survived={} gaps={} unsafe={} lost_acked={} fsck_clean={} failover={}ms recover={}ms point={:.1}s load={}",
            aim.map_or("none", Target::name),
            r.killed_in,
            r.replies_before,
            r.replies_after,
            r.epoch.map_or_else(|| "disk-only".to_owned(), |e| format!("epoch-{e}")),
            r.resumed,
            r.survived,
            r.counter_gaps,
            r.unsafe_replies,
            r.lost_acked,
            r.fsck_clean,
            r.failover_ms,
            r.recover_ms,
            t_point.elapsed().as_secs_f64(),
            loadavg()
        );
        if !r.status.is_empty() {
            println!("point {i}: agent before the disaster: {}", r.status);
        }
        let why = r.failures();
        for w in &why {
            println!("point {i}: FAIL: {w}");
        }
        t.add(&r, !why.is_empty());
        if std::env::var_os("PIPECLOUD_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let _ = std::fs::remove_dir(base);
    let (mode_s, phase_s) = match target {
        Some(x) => ("switch".to_owned(), format!(" phase={}", x.name())),
        None => (mode.to_string(), String::new()),
    };
    println!(
        "RESULT topology={name} mode={mode_s}{phase_s} points={points} unsafe_replies={} lost_acked={} resumed={} disk_only={} connections_survived={} counter_gaps={} fsck_clean={} missed_phase={} failed_points={}",
        t.unsafe_replies, t.lost_acked, t.resumed, t.disk_only, t.survived, t.gaps, t.fsck, t.missed, t.failed
    );
    if t.failed > 0 {
        bail!(
            "{} of {points} points failed (the FAIL lines say why)",
            t.failed
        );
    }
    Ok(())
}

/// The sums over a run's points.
#[derive(Default)]
struct Tally {
    unsafe_replies: usize,
    lost_acked: usize,
    /// Full-state failovers (the guest resumed from a checkpoint).
    resumed: usize,
    disk_only: usize,
    survived: usize,
    gaps: usize,
    fsck: usize,
    /// Attempts whose switch ran through the phase before the kill (retried).
    missed: usize,
    failed: usize,
}

impl Tally {
    fn add(&mut self, r: &SwitchPoint, failed: bool) {
        self.unsafe_replies += r.unsafe_replies;
        self.lost_acked += r.lost_acked;
        self.resumed += usize::from(!r.disk_only() && r.resumed);
        self.disk_only += usize::from(r.disk_only());
        self.survived += usize::from(r.survived);
        self.gaps += r.counter_gaps;
        self.fsck += usize::from(r.fsck_clean);
        self.failed += usize::from(failed);
    }
}

/// The load average (first three fields of /proc/loadavg).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split(' ')
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// What one `switch-load` run measured.
#[derive(Clone, Debug, PartialEq)]
pub struct SwitchLoad {
    /// Client connections broken across the two switches.
    pub drops: usize,
    /// The per-second timeline (also the CSV), and the switch instants (s).
    pub rows: Vec<TimelineRow>,
    pub events: Vec<(f64, String)>,
}

/// One second of a `switch-load` run.
#[derive(Clone, Debug, PartialEq)]
pub struct TimelineRow {
    pub second: u64,
    pub replies: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Checkpoint page bytes the agent shipped in this second (after compression).
    pub shipped_bytes: u64,
    pub phase: String,
    pub event: String,
}

/// `switch-load`: clients on the guest service across pipelined → checkpoint →
/// pipelined; `switch_drops` and the per-second latency CSV (module doc).
pub fn load(
    topology: &Path,
    work: &Path,
    prefix: &str,
    clients: usize,
    hold: Duration,
    csv: &Path,
    rtt: Option<Duration>,
) -> Result<SwitchLoad> {
    build_guest()?;
    let opts = GuestOptions {
        mode: Mode::Pipelined,
        preload_shim: true,
        rtt,
        ..GuestOptions::default()
    };
    let site = GuestSite::up(topology, work, prefix, &opts)?;
    let sock = ctl_socket(&site.run_topo)?;
    let t0 = Instant::now();
    let mut cs: Vec<Client> = (0..clients)
        .map(|i| Client::start(&site.client_ns.name, site.target, &format!("c{i}"), t0))
        .collect();
    wait_until(PATIENCE, "a first reply on every connection", || {
        cs.iter().all(|c| c.count() > 0 || c.ended())
    })?;
    let load0 = loadavg();
    // The agent's phase (and shipped checkpoint bytes) once per 100 ms, and the
    // switch instants.
    let mut phases: Vec<Sample> = Vec::new();
    let mut events: Vec<(Duration, String)> = Vec::new();
    let sample = |until: Instant, phases: &mut Vec<Sample>| -> Result<()> {
        while Instant::now() < until {
            let s = poll(&sock)?;
            phases.push((t0.elapsed(), s.phase, field(&s.line, "shipped_bytes=")));
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    };
    sample(Instant::now() + hold, &mut phases)?;
    events.push((t0.elapsed(), "ctl mode checkpoint".into()));
    let t_in = Instant::now();
    let answer_in = ModeRequest::send(&sock, Mode::Checkpoint).answer()?;
    let mut seed = None;
    let s = wait_status(&sock, "the switch in (first epoch acknowledged)", |s| {
        phases.push((
            t0.elapsed(),
            s.phase.clone(),
            field(&s.line, "shipped_bytes="),
        ));
        if s.phase == "seeding" {
            seed = s.epoch.or(seed);
        }
        s.phase == "on" && seed.zip(s.acked).is_some_and(|(e, a)| a >= e)
    })?;
    let switch_in = t_in.elapsed();
    events.push((t0.elapsed(), format!("checkpointing ({})", s.line)));
    sample(Instant::now() + hold, &mut phases)?;
    events.push((t0.elapsed(), "ctl mode pipelined".into()));
    let t_out = Instant::now();
    let answer_out = ModeRequest::send(&sock, Mode::Pipelined).answer()?;
    wait_status(&sock, "the switch out", |s| {
        phases.push((
            t0.elapsed(),
            s.phase.clone(),
            field(&s.line, "shipped_bytes="),
        ));
        s.phase == "off"
    })?;
    let switch_out = t_out.elapsed();
    events.push((t0.elapsed(), "disk-only again".into()));
    sample(Instant::now() + hold, &mut phases)?;
    let mut drops = 0;
    let mut why = Vec::new();
    for c in &mut cs {
        if let Err(e) = c.finish() {
            drops += 1;
            why.push(format!("{}: {e:#}", c.name));
        }
    }
    let all: Vec<Reply> = cs.iter().flat_map(Client::replies).collect();
    let rows = timeline(&all, &phases, &events);
    std::fs::write(csv, timeline_csv(&rows))
        .with_context(|| format!("writing {}", csv.display()))?;
    let p50 = |from: Duration, to: Duration| {
        let mut l: Vec<f64> = all
            .iter()
            .filter(|r| r.at >= from && r.at < to)
            .map(|r| r.latency.as_secs_f64() * 1e3)
            .collect();
        percentile(&mut l, 0.5)
    };
    let ev = |i: usize| events.get(i).map_or(Duration::ZERO, |e| e.0);
    for w in &why {
        println!("switch-load: FAIL: connection {w}");
    }
    println!("switch-load: ctl mode checkpoint answered {answer_in:?}; ctl mode pipelined answered {answer_out:?}");
    println!(
        "RESULT topology=guest mode=switch-load clients={clients} switch_drops={drops} replies={} switch_in_ms={} switch_out_ms={} p50_ms_pipelined={:.2} p50_ms_checkpoint={:.2} p50_ms_after={:.2} csv={} load={} load_end={}",
        all.len(),
        switch_in.as_millis(),
        switch_out.as_millis(),
        p50(Duration::ZERO, ev(0)),
        p50(ev(1), ev(2)),
        p50(ev(3), Duration::MAX),
        csv.display(),
        load0.replace(' ', "/"),
        loadavg().replace(' ', "/")
    );
    drop(site);
    Ok(SwitchLoad {
        drops,
        rows,
        events: events
            .iter()
            .map(|(t, e)| {
                (
                    t.as_secs_f64(),
                    e.split(" (").next().unwrap_or("").to_owned(),
                )
            })
            .collect(),
    })
}

/// One sample of the agent's status: when, phase, shipped checkpoint bytes so far.
type Sample = (Duration, String, Option<u64>);

/// The `q` quantile of `v` (sorted in place); NaN when empty.
fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// The per-second timeline: one row per second of the run (from the clients'
/// start: the first rows, while the guest boots, have no replies); `phase`: the
/// agent's switch phase last sampled in that second; `event`: the switch
/// instants in it, `;`-separated; `shipped_bytes`: checkpoint page bytes the
/// agent shipped in that second.
fn timeline(
    replies: &[Reply],
    phases: &[Sample],
    events: &[(Duration, String)],
) -> Vec<TimelineRow> {
    let secs = replies
        .iter()
        .map(|r| r.at)
        .chain(phases.iter().map(|p| p.0))
        .max()
        .map_or(0, |d| d.as_secs() + 1);
    let mut rows = Vec::new();
    let mut shipped_before = 0;
    for s in 0..secs {
        let mut l: Vec<f64> = replies
            .iter()
            .filter(|r| r.at.as_secs() == s)
            .map(|r| r.latency.as_secs_f64() * 1e3)
            .collect();
        let n = l.len();
        let (p50, p99) = (percentile(&mut l, 0.5), percentile(&mut l, 0.99));
        let max = l.last().copied().unwrap_or(f64::NAN);
        let in_s: Vec<&Sample> = phases.iter().filter(|p| p.0.as_secs() == s).collect();
        let phase = in_s.last().map_or("", |p| p.1.as_str());
        let shipped_now = in_s
            .iter()
            .filter_map(|p| p.2)
            .max()
            .unwrap_or(shipped_before)
            .max(shipped_before);
        let ev: Vec<&str> = events
            .iter()
            .filter(|e| e.0.as_secs() == s)
            .map(|e| e.1.split(" (").next().unwrap_or(""))
            .collect();
        rows.push(TimelineRow {
            second: s,
            replies: n,
            p50_ms: p50,
            p99_ms: p99,
            max_ms: max,
            shipped_bytes: shipped_now - shipped_before,
            phase: phase.to_owned(),
            event: ev.join(";"),
        });
        shipped_before = shipped_now;
    }
    rows
}

/// The timeline as CSV: `second,replies,p50_ms,p99_ms,max_ms,shipped_bytes,phase,event`.
pub fn timeline_csv(rows: &[TimelineRow]) -> String {
    let mut out = String::from("second,replies,p50_ms,p99_ms,max_ms,shipped_bytes,phase,event\n");
    for r in rows {
        out.push_str(&format!(
            "{},{},{:.3},{:.3},{:.3},{},{},{}\n",
            r.second, r.replies, r.p50_ms, r.p99_ms, r.max_ms, r.shipped_bytes, r.phase, r.event
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_epochs_line() {
        let t = "group guest: mode=pipelined\n  epochs guest: phase=seeding:8 open=8 shipped=7 acked=7 lag=0 pauses=3 stalled=0 last_pause=- seed_round=2 seed_pages=512 seed_last_dirty=9 last_switch=\"x acked=99\"\n";
        let s = SwitchStatus::parse(t);
        assert_eq!(
            (s.phase.as_str(), s.epoch, s.acked),
            ("seeding", Some(8), Some(7))
        );
        assert!(s.inside(Target::Seeding, None));
        let on = SwitchStatus::parse("epochs guest: phase=on open=9 acked=7\n");
        assert!(on.inside(Target::FirstEpoch, Some(8)));
        assert!(!on.inside(Target::FirstEpoch, None));
        let acked = SwitchStatus::parse("epochs guest: phase=on open=10 acked=8\n");
        assert!(!acked.inside(Target::FirstEpoch, Some(8)));
        let leaving = SwitchStatus::parse("epochs guest: phase=leaving:12 acked=11\n");
        assert_eq!(
            (leaving.phase.as_str(), leaving.epoch),
            ("leaving", Some(12))
        );
        assert!(leaving.inside(Target::Leaving, None));
        assert_eq!(SwitchStatus::parse("nothing").phase, "");
    }

    #[test]
    fn timeline_has_a_row_per_second() {
        let r = |at: u64, ms: u64| Reply {
            n: 1,
            value: 1,
            at: Duration::from_millis(at),
            latency: Duration::from_millis(ms),
        };
        let csv = timeline_csv(&timeline(
            &[r(100, 2), r(900, 4), r(2100, 8)],
            &[(Duration::from_millis(1500), "seeding".into(), Some(1000))],
            &[(
                Duration::from_millis(1400),
                "ctl mode checkpoint (x)".into(),
            )],
        ));
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(rows.len(), 4, "{csv}");
        assert_eq!(rows[1], "0,2,4.000,4.000,4.000,0,,");
        assert_eq!(rows[2], "1,0,NaN,NaN,NaN,1000,seeding,ctl mode checkpoint");
        assert_eq!(rows[3], "2,1,8.000,8.000,8.000,0,,");
    }
}
