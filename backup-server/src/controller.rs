//! The backup site's controller: automatic failover on the group's lease
//! (docs/design.md §7).
//!
//! `backup-server controller --topology FILE (--config | --data-dir) --out DIR`
//! watches the group's lease on etcd as the backup site (`[quorum]
//! backup_site`), unprivileged like the rest of the backup server. It is a
//! driver of the pure lease state machine (`pipecloud_core::lease`) through a
//! [`LeaseKeeper`]:
//!
//! * policy `automatic`: when the home site's lease key is gone (its holder
//!   stopped renewing: disaster, or cut off from the quorum), the keeper tries
//!   the one conditioned transaction that takes generation `n + 1` for this
//!   site. Only a win is a takeover. Then, once per generation, the controller
//! * **fences** the group at this backup server and **fails over** to the
//!   largest causally closed cut (the same operation as `backup-server
//!   failover`, into `<out>/generation-<n>`),
//! * runs the group's **activation hook** (`[quorum] activate`) with
//!   `PIPECLOUD_GROUP`, `PIPECLOUD_GENERATION`, `PIPECLOUD_PREVIOUS_SITE`,
//!   `PIPECLOUD_VOLUMES` (the directory) and `PIPECLOUD_IMAGES` (the images,
//!   `:`-separated) in its environment,
//! * and writes `<out>/activated-<n>`, which also makes a restarted
//!   controller skip a takeover it already carried out (fires once).
//! * policy `alarm-only`: it logs an alarm once per lapsed generation and
//!   takes over only after an operator runs `backup-server confirm-takeover
//!   --out DIR` (which creates `<out>/confirm-takeover`).
//!
//! **Handing the lease to the activated site.** With a hook, the controller
//! resigns the lease it won (stops renewing, etcd revokes it) *before*
//! running the hook: the hook starts the group's agent at this site, whose
//! keeper (`Hold`, `home_site` = this site in its reversed topology) acquires
//! generation `n + 1` once the lease key is gone (at once after the revoke;
//! after the lapse if etcd could not be told): until then the agent
//! completes no write and releases nothing. Meanwhile no site holds the lease, and none other can
//! take it: the generation is this site's (the home site's `Hold` acquires
//! only its own or no generation). When the hook succeeded the controller
//! writes the marker and exits: the group is the activated agent's. A failing
//! hook (non-zero exit: the orchestrator could not activate) ends the
//! controller with an error and no marker. Without a hook the controller keeps
//! renewing: the backup site holds the group, fenced everywhere else, until an
//! operator activates it. A restarted controller does not take over from its
//! own site again once a takeover at or before that generation completed (the
//! later generations are the activated agent's).

use anyhow::{bail, Context, Result};
use pipecloud_core::lease::{Ambition, Event, GenerationRecord};
use pipecloud_core::topology::{FailoverPolicy, Topology};
use pipecloud_quorum::records::GroupRecords;
use pipecloud_quorum::LeaseKeeper;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::volume::Materialised;

/// The file an operator creates to confirm a takeover (policy `alarm-only`).
pub const CONFIRM_FILE: &str = "confirm-takeover";
/// How often the controller looks for events and the confirmation file.
const POLL: Duration = Duration::from_millis(50);

/// What one takeover did.
#[derive(Debug)]
pub struct Takeover {
    pub generation: u64,
    pub previous: GenerationRecord,
    pub materialised: Materialised,
    /// From winning the generation to the hook's exit.
    pub took: Duration,
}

/// `<out>/activated-<generation>`: written once the takeover is complete.
pub fn marker(out: &Path, generation: u64) -> PathBuf {
    out.join(format!("activated-{generation}"))
}

/// Runs the controller until the process ends. `failover` fences the group and
/// materialises its volumes at the cut into the directory it is given.
pub fn run(
    topology: &Path,
    out: &Path,
    mut failover: impl FnMut(&str, &Path) -> Result<Materialised>,
) -> Result<()> {
    let text = std::fs::read_to_string(topology)
        .with_context(|| format!("reading {}", topology.display()))?;
    let topo = Topology::parse(&text, &topology.display().to_string())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let Some(q) = topo.quorum.clone() else {
        bail!(
            "{}: no [quorum] section: the group has no lease to watch",
            topology.display()
        );
    };
    let base_dir = topology.parent().map(Path::to_path_buf).unwrap_or_default();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let etcd = pipecloud_quorum::connect(&q, &base_dir).context("etcd client ([quorum])")?;
    let group = topo.group.name.clone();
    let site = q.backup_site.clone();
    let records = GroupRecords::new(etcd, &group, &site, q.lease_ms)?;
    let ambition = match q.failover {
        FailoverPolicy::Automatic => Ambition::TakeOverOnExpiry,
        FailoverPolicy::AlarmOnly => Ambition::Watch,
    };
    let (keeper, events) = LeaseKeeper::start(records, q.lease(), &site, ambition)
        .context("starting the lease keeper")?;
    // Taken (renewals stop) when the lease goes to the activated site.
    let mut keeper = Some(keeper);
    tracing::info!(%group, %site, policy = q.failover.as_str(), endpoints = ?q.endpoints,
        lease_ms = q.lease_ms, "controller watching the group's lease");
    println!(
        "controller: watching group {group} as site {site} (failover {})",
        q.failover.as_str()
    );
    loop {
        let confirm = out.join(CONFIRM_FILE);
        if confirm.exists() {
            let _ = std::fs::remove_file(&confirm);
            tracing::warn!(%group, "takeover confirmed by an operator");
            if let Some(k) = &keeper {
                k.confirm_takeover();
            }
        }
        let ev = match events.recv_timeout(POLL) {
            Ok(ev) => ev,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                bail!("the lease keeper stopped")
            }
        };
        match ev {
            // A takeover: from another site, or one of ours that never completed.
            Event::Activated {
                generation,
                previous: Some(previous),
            } if previous.site != site || !completed_by(out, previous.number)? => {
                if marker(out, generation).exists() {
                    tracing::info!(
                        generation,
                        "takeover of this generation already carried out"
                    );
                    continue;
                }
                let hook = q.activate.as_deref();
                let t = takeover(
                    &group,
                    generation,
                    previous,
                    out,
                    hook,
                    &mut failover,
                    || {
                        if let Some(k) = keeper.take() {
                            tracing::warn!(%group, generation,
                            "handing the lease to the activated site: resigning it");
                            k.resign();
                        }
                    },
                )?;
                println!(
                    "controller: took over group {group} at generation {} from site {} (generation {}); \
                     cut {}; {} images in {}; activated in {:.3} s",
                    t.generation,
                    t.previous.site,
                    t.previous.number,
                    t.materialised.cut,
                    t.materialised.images.len(),
                    out.join(format!("generation-{}", t.generation)).display(),
                    t.took.as_secs_f64()
                );
                if keeper.is_none() {
                    println!(
                        "controller: group {group} activated through the hook; its agent at this \
                         site holds the lease from now on; exiting"
                    );
                    return Ok(());
                }
            }
            Event::Activated { generation, .. } => {
                tracing::info!(generation, "controller holds the lease (no takeover)")
            }
            Event::Fenced { generation, reason } => {
                tracing::error!(generation, %reason, "controller lost the lease")
            }
            Event::Alarm { generation } => println!(
                "controller: ALARM: group {group}: the lease of site {} (generation {}) lapsed; \
                 policy alarm-only: confirm with `backup-server confirm-takeover --out {}`",
                generation.site,
                generation.number,
                out.display()
            ),
        }
    }
}

/// The switch-back's generation bump (`backup-server hand-over`): from the
/// topology's `[quorum] home_site` (the site now active) to `to`, refused
/// while any site holds the lease (`GroupRecords::hand_over`). Returns the
/// new generation.
pub fn hand_over(topology: &Path, to: &str) -> Result<u64> {
    let text = std::fs::read_to_string(topology)
        .with_context(|| format!("reading {}", topology.display()))?;
    let topo = Topology::parse(&text, &topology.display().to_string())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let Some(q) = topo.quorum.clone() else {
        bail!("{}: no [quorum] section", topology.display());
    };
    let base_dir = topology.parent().map(Path::to_path_buf).unwrap_or_default();
    let etcd = pipecloud_quorum::connect(&q, &base_dir).context("etcd client ([quorum])")?;
    let records = GroupRecords::new(etcd, &topo.group.name, &q.home_site, q.lease_ms)?;
    match records.hand_over(to)? {
        Some(n) => Ok(n),
        None => bail!(
            "group {}: refused: the generation is not site {}'s, or a site still holds the lease \
             (stop the active site's agent first)",
            topo.group.name,
            q.home_site
        ),
    }
}

/// Whether a takeover at generation `number` or before completed (a marker
/// `activated-<n>`, `n <= number`, in `out`).
fn completed_by(out: &Path, number: u64) -> Result<bool> {
    let entries = std::fs::read_dir(out).with_context(|| format!("reading {}", out.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("reading {}", out.display()))?;
        let name = e.file_name();
        let n = name
            .to_str()
            .and_then(|n| n.strip_prefix("activated-"))
            .and_then(|n| n.parse::<u64>().ok());
        if n.is_some_and(|n| n <= number) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Fence + failover, then (with a hook) `release_lease` and the activation
/// hook, then the marker.
fn takeover(
    group: &str,
    generation: u64,
    previous: GenerationRecord,
    out: &Path,
    hook: Option<&Path>,
    failover: &mut impl FnMut(&str, &Path) -> Result<Materialised>,
    release_lease: impl FnOnce(),
) -> Result<Takeover> {
    let started = Instant::now();
    tracing::warn!(group, generation, from = %previous.site, "taking over: fencing and failing over");
    let volumes = out.join(format!("generation-{generation}"));
    let materialised = failover(group, &volumes).context("fence and failover")?;
    if let Some(hook) = hook {
        // The activated site's agent takes the lease over (module docs).
        release_lease();
        let images: Vec<String> = materialised
            .images
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let status = Command::new(hook)
            .env("PIPECLOUD_GROUP", group)
            .env("PIPECLOUD_GENERATION", generation.to_string())
            .env("PIPECLOUD_PREVIOUS_SITE", &previous.site)
            .env("PIPECLOUD_VOLUMES", &volumes)
            .env("PIPECLOUD_IMAGES", images.join(":"))
            .status()
            .with_context(|| format!("running the activation hook {}", hook.display()))?;
        if !status.success() {
            tracing::error!(group, generation, hook = %hook.display(), %status,
                "ACTIVATION FAILED: the hook exited non-zero; no marker written");
            bail!("activation hook {} failed: {status}", hook.display());
        }
    }
    let took = started.elapsed();
    let summary = format!(
        "generation={generation}\nprevious_site={}\nprevious_generation={}\ncut={}\ntook_ms={}\n",
        previous.site,
        previous.number,
        materialised.cut,
        took.as_millis()
    );
    std::fs::write(marker(out, generation), summary)
        .with_context(|| format!("writing {}", marker(out, generation).display()))?;
    Ok(Takeover {
        generation,
        previous,
        materialised,
        took,
    })
}
