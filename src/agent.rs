//! `pipecloud agent`: the host agent, wired from the topology (docs/design.md, the agent).
//!
//! For one primary host of one protection group it starts, in this order:
//! 1. the causal state of the group's machines;
//! 2. the replication client (mutual TLS to the backup server; on its own thread
//!    unless `--replication-thread false`) and waits for its first welcome, which
//!    tells where this generation's numbering continues;
//! 3. one NBD export per protected disk on this host (`<nbd_dir>/<disk>.sock`),
//!    each a [`ReplicatedDisk`] over a [`LocalImage`];
//! 4. the network path (NFQUEUE tag and hold queues) and only then its netfilter
//!    rules (queues first, or the kernel drops what arrives in between);
//! 5. the control socket (`pipecloud ctl`) and, with `[[host]] metrics_listen`, the
//!    Prometheus `/metrics` endpoint (its address is bound first of all).
//!
//! It runs until SIGINT/SIGTERM, then removes its rules, stops the network path
//! and the NBD server. A crash (SIGKILL) leaves the hold rules in place without
//! a listener: client-bound packets are dropped (fail-closed) until the next
//! start, which cleans the stale rules up before installing its own.

use crate::causal::CausalState;
use crate::ctl::{Control, ControlGroup, CtlServer};
use crate::disk::ReplicatedDisk;
use crate::image::LocalImage;
use crate::nbd::NbdServer;
use crate::netfilter::{NetTopology, RuleConfig, RuleManager, DEFAULT_MTU};
use crate::netpath::{NetPath, NetPathConfig};
use crate::replication::{
    fresh_generation, DiskSpec, ModeSwitch, ReplicationClient, ReplicationConfig,
    ReplicationRuntime, TlsFiles,
};
use anyhow::{anyhow, bail, Context, Result};
use pipecloud_core::netqueue::NetQueueLimits;
use pipecloud_core::topology::{self, Topology};
use pipecloud_core::CountVector;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What `pipecloud agent` was asked to do.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub topology: PathBuf,
    pub host: String,
    /// Do not touch netfilter (block path only; e.g. a host without protected
    /// network traffic, or block-path tests).
    pub no_network: bool,
    /// How long to wait for the backup server's first welcome before giving up.
    pub connect_wait: Duration,
    /// Run the replication session (TLS, TCP, acks) on its own thread instead of
    /// the runtime that serves the NBD requests ([`ReplicationRuntime`]).
    pub replication_thread: bool,
    /// Start *detached* (docs/design.md §15, the activation): serve the disks
    /// without the backup (writes complete locally, nothing is buffered for
    /// it, no reply is held) until `ctl attach`. The lease still gates
    /// everything.
    pub detached: bool,
}

/// Why a detached agent cannot run a group's epoch loop.
pub const DETACHED_NO_CHECKPOINT: &str = "a detached agent (--detached) replicates nothing until `ctl attach`; the full-state epoch loop needs the backup from the start";

/// Why `pipelined` (and `checkpoint`) cannot run without the network path:
/// their promise rests on holding every client-bound packet until the backup
/// holds the writes it depends on, while the disks acknowledge writes at once.
/// With nothing held, an acknowledged write is lost in a disaster.
pub const PIPELINED_NEEDS_NETWORK: &str = "mode `pipelined` needs the network path, which holds \
     client-bound packets until the backup holds the writes they depend on; this agent runs \
     without it (--no-network), so writes would be acknowledged that the backup may not hold. \
     Use mode `sync` for a pure block client (a write completes once the backup holds it), \
     or `async` if losing the last acknowledged writes in a disaster is acceptable";

/// Whether `mode`'s guarantee rests on the network path holding output
/// (`pipelined`, `checkpoint`): the one home of that rule, used at start and by
/// `ctl mode` ([`PIPELINED_NEEDS_NETWORK`] says why).
pub fn needs_network_path(mode: topology::Mode) -> bool {
    matches!(mode, topology::Mode::Pipelined | topology::Mode::Checkpoint)
}

/// Refuses a mode whose guarantee needs the network path when the agent runs
/// without one (`--no-network`).
pub fn check_mode_without_network(mode: topology::Mode, no_network: bool) -> Result<()> {
    if no_network && needs_network_path(mode) {
        bail!("cannot start in mode `{mode}`: {PIPELINED_NEEDS_NETWORK}");
    }
    Ok(())
}

/// The mode the agent runs for `m` (topology loading). `checkpoint` runs the
/// full-state epoch loop (docs/design.md §9) next to the block and network paths,
/// whose disk writes complete as in `pipelined`.
pub fn block_mode(m: topology::Mode) -> Result<crate::replication::Mode> {
    Ok(m)
}

/// Why the control socket refuses a run-time switch into or out of `checkpoint`
/// when the agent has no epoch loop for the group to do it with.
pub const CHECKPOINT_SWITCH_REFUSED: &str = "switching into or out of mode `checkpoint` at run \
     time goes through the group's epoch loop (docs/design.md §13), which this agent does not run \
     for the group";

/// The mode a run-time switch (`ctl mode`) from `from` to `to` may set without
/// the epoch loop: switches into or out of `checkpoint` go through
/// [`crate::fullstate::driver::EpochDriver::request`] instead.
pub fn switch_mode(from: topology::Mode, to: topology::Mode) -> Result<crate::replication::Mode> {
    if from != to && (from == topology::Mode::Checkpoint || to == topology::Mode::Checkpoint) {
        bail!("{CHECKPOINT_SWITCH_REFUSED}");
    }
    block_mode(to)
}

/// Whether this host's agent can checkpoint the group (and so switch it into
/// `checkpoint` at run time): every machine is a guest (`[machine.vm]`) on
/// this host, and the network path runs. `Err`: why not, in words for the
/// operator.
pub fn checkpoint_capable(topo: &Topology, host: &str, no_network: bool) -> Result<(), String> {
    if no_network {
        return Err(format!("mode `checkpoint`: {PIPELINED_NEEDS_NETWORK}"));
    }
    for m in &topo.machines {
        if m.vm.is_none() {
            return Err(format!(
                "mode `checkpoint` needs every machine of the group to be a guest the product starts \
                 ([machine.vm]); machine {} is not",
                m.name
            ));
        }
        if m.host != host {
            return Err(format!(
                "mode `checkpoint`: machine {} runs on host {}, not {host}; in this version every \
                 machine of a checkpoint group runs on one host (one epoch loop pauses them all)",
                m.name, m.host
            ));
        }
    }
    Ok(())
}

/// Time between two checkpoint pauses of a group (docs/results.md: ~48 pauses/s
/// of a 256 MiB TCG guest fit at this interval on this machine).
pub const EPOCH_INTERVAL: Duration = Duration::from_millis(20);

/// Starts the epoch loop of a group this host can checkpoint
/// ([`checkpoint_capable`]): checkpointing now in mode `checkpoint`, else
/// disk-only until `ctl mode checkpoint` (docs/design.md §13).
fn start_epochs(
    topo: &Topology,
    host: &str,
    link: Arc<crate::replication::checkpoint::CheckpointLink>,
    causal: &Arc<CausalState>,
    mode: &ModeSwitch,
) -> Result<crate::fullstate::driver::EpochDriver> {
    use crate::fullstate::capture::GuestSpec;
    use crate::fullstate::driver::{DriverConfig, EpochDriver};
    checkpoint_capable(topo, host, false).map_err(|e| anyhow!("{e}"))?;
    let mut specs = Vec::new();
    let mut writers = Vec::new();
    for (i, m) in topo.machines.iter().enumerate() {
        let vm = m.vm.as_ref().with_context(|| {
            format!("mode `checkpoint`: machine {} has no [machine.vm]", m.name)
        })?;
        specs.push(GuestSpec {
            name: m.name.clone(),
            qmp: vm.qmp.clone(),
            ram_file: vm.ram_file.clone(),
            device_file: format!("{}.devstate", vm.ram_file.display()).into(),
        });
        if let Some(w) = m.writer {
            writers.push((i, w));
        }
    }
    let cfg = DriverConfig {
        interval: EPOCH_INTERVAL,
        qmp_timeout: Duration::from_secs(5),
        limits: pipecloud_core::epoch::EpochLimits::default(),
        writers,
        machines: (0..topo.machines.len()).collect(),
    };
    tracing::info!(group = %topo.group.name, guests = specs.len(), ?EPOCH_INTERVAL, mode = %mode.get(),
        "starting the epoch loop (checkpointing in mode checkpoint; else idle until `ctl mode checkpoint`)");
    EpochDriver::start_switchable(
        &topo.group.name,
        specs,
        cfg,
        Arc::clone(causal),
        link,
        mode.clone(),
    )
}

/// Loads and validates a topology file.
pub fn load_topology(path: &Path) -> Result<Topology> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Topology::parse(&text, &path.display().to_string()).map_err(|e| anyhow!("{e}"))
}

/// Runs the agent until a termination signal.
pub async fn run(opts: AgentOptions) -> Result<()> {
    let topo = load_topology(&opts.topology)?;
    check_mode_without_network(topo.group.mode, opts.no_network)?;
    // Whether this agent runs the group's epoch loop (checkpointing now, or
    // ready for a run-time switch).
    let capable = if opts.detached {
        Err(DETACHED_NO_CHECKPOINT.to_owned())
    } else {
        checkpoint_capable(&topo, &opts.host, opts.no_network)
    };
    if topo.group.mode == topology::Mode::Checkpoint {
        capable.clone().map_err(|e| anyhow!("{e}"))?;
    }
    let host = topo
        .host(&opts.host)
        .with_context(|| format!("host `{}` is not in {}", opts.host, opts.topology.display()))?
        .clone();
    let base_dir = opts
        .topology
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    // Fail-closed, and before anything is served: a local machine whose
    // interface cannot be found could send IPv6 (or from another address)
    // unheld, so the agent does not start.
    let nt = NetTopology::from_topology(&topo);
    let links = if opts.no_network {
        Vec::new()
    } else {
        crate::netfilter::resolve_links(&nt, &host.name, None)
            .context("finding the interface of each local protected machine")?
    };
    // Bound first: a taken address fails the start before anything is installed.
    let metrics_listener = match host.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics endpoint {addr} (metrics_listen)"))?,
        ),
        None => None,
    };
    let causal = Arc::new(CausalState::new(topo.machines.len()));
    let mode = ModeSwitch::new(block_mode(topo.group.mode)?);
    // With [quorum]: nothing is released and no write completes until this
    // site holds the group's lease (docs/design.md §7).
    let lease = crate::lease::start(&topo, &base_dir)?;
    let lease_gate = lease.as_ref().and_then(crate::lease::data_path_gate);

    // Replication client.
    let mut disks = Vec::new();
    for d in topo.disks_on(&host.name) {
        let (idx, m) = topo
            .machines
            .iter()
            .enumerate()
            .find(|(_, m)| m.name == d.machine)
            .with_context(|| format!("disk {} on unknown machine {}", d.name, d.machine))?;
        let writer = m
            .writer
            .with_context(|| format!("machine {} owns disk {} but is no writer", m.name, d.name))?;
        disks.push(DiskSpec {
            name: d.name.clone(),
            size: d.size,
            writer,
            machine: idx,
        });
    }
    std::fs::create_dir_all(&host.nbd_dir)
        .with_context(|| format!("creating {}", host.nbd_dir.display()))?;
    let generation = fresh_generation(Some(&host.nbd_dir.join("generation")))
        .context("choosing this run's writer generation")?;
    let (ca, cert, key) = topo.backup.credentials_in(&base_dir);
    let cfg = ReplicationConfig {
        endpoint: topo.backup.endpoint.to_string(),
        server_name: topo.backup.server_name.clone(),
        tls: TlsFiles { ca, cert, key },
        group: topo.group.name.clone(),
        group_id: topo.group.id,
        agent: host.name.clone(),
        disks: disks.clone(),
        generation,
        max_inflight_bytes: topo.policy.max_inflight_bytes,
        coalesce: crate::replication::Coalesce {
            delay: std::time::Duration::from_micros(topo.policy.replication_coalesce_us),
            bytes: crate::replication::DEFAULT_COALESCE.bytes,
            async_delay: std::time::Duration::from_micros(topo.policy.replication_async_batch_us),
        },
        backup_loss: topo.policy.on_backup_loss,
        mode: mode.clone(),
        // Checkpoint mode: the epoch loop's frames share the connection (set before
        // it connects, so the backup's acked epoch on connecting is not missed).
        checkpoint: capable.is_ok().then(|| {
            Arc::new(crate::replication::checkpoint::CheckpointLink::new(
                16 << 20,
            ))
        }),
        heartbeat_interval: Duration::from_millis(topo.policy.heartbeat_interval_ms),
        heartbeat_timeout: Duration::from_millis(topo.policy.heartbeat_timeout_ms),
        detached: opts.detached,
        ..ReplicationConfig::default()
    };
    let repl_runtime = if opts.replication_thread {
        Some(
            ReplicationRuntime::start("pc-replication")
                .context("starting the replication thread")?,
        )
    } else {
        None
    };
    let on = repl_runtime
        .as_ref()
        .map_or_else(tokio::runtime::Handle::current, |r| r.handle().clone());
    let client = Arc::new(
        ReplicationClient::start_on(cfg, Arc::clone(&causal), &on)
            .context("starting replication")?,
    );
    if opts.detached {
        tracing::error!(group = %topo.group.name, host = %host.name, endpoint = %topo.backup.endpoint,
            "DETACHED: serving without the backup, nothing is replicated (protection=detached) \
             until `pipecloud ctl attach`");
    } else {
        tracing::info!(group = %topo.group.name, host = %host.name, endpoint = %topo.backup.endpoint,
            "waiting for the backup server's welcome");
        tokio::time::timeout(opts.connect_wait, client.wait_ready())
            .await
            .map_err(|_| {
                anyhow!(
                    "no welcome from the backup server {} within {:?}",
                    topo.backup.endpoint,
                    opts.connect_wait
                )
            })?
            .context("replication client")?;
    }

    // Block path: one export per disk, one socket per disk.
    let nbd: NbdServer<ReplicatedDisk<LocalImage>> = NbdServer::new();
    let mut nbd_handles = Vec::new();
    for d in topo.disks_on(&host.name) {
        let img = LocalImage::open(&d.image, d.size)
            .with_context(|| format!("opening image {}", d.image.display()))?;
        let mut rd = ReplicatedDisk::new(img, Arc::clone(&client), &d.name, mode.clone())
            .with_context(|| format!("disk {}", d.name))?;
        if let Some(g) = &lease_gate {
            rd = rd.with_lease_gate(Arc::clone(g));
        }
        nbd.add_export(d.name.clone(), Arc::new(rd))
            .with_context(|| format!("export {}", d.name))?;
    }
    for d in topo.disks_on(&host.name) {
        let sock = topology::nbd_socket_path(&host.nbd_dir, &d.name);
        let _ = std::fs::remove_file(&sock);
        nbd_handles.push(
            nbd.serve_unix(&sock)
                .await
                .with_context(|| format!("serving NBD on {}", sock.display()))?,
        );
        tracing::info!(disk = %d.name, socket = %sock.display(), "NBD export ready");
    }

    // Network path.
    let mut net = None;
    let mut rules = None;
    if !opts.no_network && nt.local_machines(&host.name).next().is_some() {
        let limits = NetQueueLimits {
            max_packets: usize::try_from(topo.policy.netqueue_max_packets).unwrap_or(65_536),
            max_bytes: usize::try_from(topo.policy.netqueue_max_bytes).unwrap_or(usize::MAX),
        };
        let mut ncfg = NetPathConfig::new(&nt, &host.name, limits);
        ncfg.links = links.clone();
        ncfg.busy_poll = std::time::Duration::from_micros(host.busy_poll_us);
        ncfg.priority = host.netpath_priority;
        ncfg.lease_gate = lease_gate.clone();
        let queues = ncfg.queues;
        // The eBPF fast path releases packets without asking the lease gate.
        let kernel_tagger = host.kernel_tagger && lease_gate.is_none();
        if host.kernel_tagger && !kernel_tagger {
            tracing::info!(
                "kernel tagger off: with [quorum] every release goes through the lease gate"
            );
        }
        let np = if kernel_tagger {
            ncfg.kernel_tagger = Some(crate::ebpf::DEFAULT_HANDLED_MARK);
            match NetPath::start(&nt, Arc::clone(&causal), ncfg.clone()) {
                Ok(np) => np,
                Err(e @ crate::netpath::NetPathError::Kernel(_)) => {
                    tracing::warn!(
                        "{e:#}; cross-host packets go through the NFQUEUE tag queue instead \
                         (slower, same guarantees); set kernel_tagger = false to silence this"
                    );
                    ncfg.kernel_tagger = None;
                    NetPath::start(&nt, Arc::clone(&causal), ncfg.clone())
                        .context("opening NFQUEUE")?
                }
                Err(e) => return Err(e).context("opening NFQUEUE"),
            }
        } else {
            NetPath::start(&nt, Arc::clone(&causal), ncfg.clone()).context("opening NFQUEUE")?
        };
        let kernel_tagger_mark = np
            .kernel_tagger()
            .map(|_| crate::ebpf::DEFAULT_HANDLED_MARK);
        np.metrics().attach_timeline(client.timeline());
        net_mode_bridge(&np, &mode, &client, &causal, lease.clone());
        net = Some(np);
        let rm = RuleManager::new(
            &nt,
            RuleConfig {
                host: host.name.clone(),
                queues,
                mtu: DEFAULT_MTU,
                netns: None,
                kernel_tagger_mark,
                links,
            },
        )?;
        rules = Some(rm.install().context("installing netfilter rules")?);
        tracing::info!(chain = %rm.chain(), "netfilter rules installed");
    }

    // Full-state epochs (checkpoint mode).
    let epochs = match &client.config().checkpoint {
        Some(link) => Some(Arc::new(start_epochs(
            &topo,
            &host.name,
            Arc::clone(link),
            &causal,
            &mode,
        )?)),
        None => None,
    };

    // Control socket.
    let mut control = Control::new(vec![ControlGroup {
        client: Arc::clone(&client),
        mode: mode.clone(),
        net: net.as_ref().map(|n: &NetPath| Arc::clone(n.metrics())),
    }]);
    if let Some(d) = &epochs {
        let w = Arc::downgrade(d);
        let group = topo.group.name.clone();
        control = control.with_epochs(Arc::new(move || {
            Some((group.clone(), w.upgrade()?.status()))
        }));
    }
    let switch: Result<crate::ctl::CheckpointSwitchFn, String> = match (&epochs, capable) {
        (Some(d), _) => {
            let w = Arc::downgrade(d);
            Ok(Arc::new(move |to| {
                w.upgrade()
                    .ok_or_else(|| "the agent is stopping".to_owned())?
                    .request(to)
            }))
        }
        (None, Err(why)) => Err(why),
        (None, Ok(())) => Err(CHECKPOINT_SWITCH_REFUSED.to_owned()),
    };
    control = control.with_checkpoint_switch(&topo.group.name, switch);
    if let Some(k) = &lease {
        control = control.with_lease(&topo.group.name, Arc::clone(k));
    }
    let control = Arc::new(control);
    let metrics_task =
        metrics_listener.map(|l| tokio::spawn(crate::metrics::serve(l, Arc::clone(&control))));
    let ctl = CtlServer::bind(&host.ctl_socket, control)
        .with_context(|| format!("control socket {}", host.ctl_socket.display()))?;
    let ctl_task = tokio::spawn(async move {
        if let Err(e) = ctl.run().await {
            tracing::error!("control socket: {e}");
        }
    });
    tracing::info!(group = %topo.group.name, host = %host.name, mode = %topo.group.mode, "agent running");
    println!(
        "pipecloud agent: running (group {}, host {})",
        topo.group.name, host.name
    );

    wait_for_signal().await?;
    tracing::info!("stopping");
    ctl_task.abort();
    if let Some(t) = &metrics_task {
        t.abort();
    }
    if let Some(r) = rules.take() {
        if let Err(e) = r.remove() {
            tracing::error!("removing netfilter rules: {e}");
        }
    }
    if let Some(n) = net.take() {
        if let Err(e) = n.stop().await {
            tracing::error!("network path: {e}");
        }
    }
    drop(epochs);
    for h in nbd_handles {
        h.shutdown().await;
    }
    // Stopped acting (no release, no write completes): give the lease up.
    crate::lease::resign(lease.clone()).await;
    client.shutdown();
    // Stops the replication thread (after the client: its tasks end on shutdown).
    drop(repl_runtime);
    Ok(())
}

/// Tells the network path when client-bound packets need not wait (the hold
/// bypass), keeping the release rule safe across mode switches:
/// - `pipelined`: hold (bypass off), unless degraded to async by the policy;
/// - `async` or degraded: bypass at once (no zero-RPO promise in that state);
/// - `sync`: bypass only once the committed vector dominates every local pending
///   vector as of the switch. Writes completed before the switch (under
///   pipelined) may not be acked yet, and packets depending on them must keep
///   waiting; writes completed after it were acked before completing;
/// - detached (whatever the mode): bypass, there is no backup to wait for
///   (and no write was issued to wait on); from the attach on, the mode rules.
///
/// With a lease (docs/design.md §7), degraded counts only once the lease holder
/// recorded it in etcd; until then (no lease, no quorum) the hold stays.
fn net_mode_bridge(
    np: &NetPath,
    mode: &ModeSwitch,
    client: &Arc<ReplicationClient>,
    causal: &Arc<CausalState>,
    lease: Option<Arc<pipecloud_quorum::LeaseKeeper>>,
) {
    use crate::replication::Mode as M;
    let bypass = np.bypass_switch();
    let mode = mode.clone();
    let causal = Arc::clone(causal);
    let mut degraded = client.subscribe_degraded();
    let mut mode_rx = mode.subscribe();
    let mut committed = causal.subscribe_committed();
    let mut attached = client.subscribe_attached();
    tokio::spawn(async move {
        let mut sync_barrier: Option<CountVector> = None;
        let mut last_mode = None;
        // Whether this degrade episode was recorded by the lease holder.
        let mut degrade_recorded = false;
        loop {
            let m = mode.get();
            if last_mode != Some(m) {
                sync_barrier = None;
                if m == M::Sync {
                    let mut snap = CountVector::ZERO;
                    for i in 0..causal.machines() {
                        snap.merge(&causal.sync_pending(i));
                    }
                    sync_barrier = Some(snap);
                }
                last_mode = Some(m);
            }
            let mut deg = *degraded.borrow_and_update();
            if !deg {
                degrade_recorded = false;
            } else if let (Some(k), false) = (&lease, degrade_recorded) {
                let k = Arc::clone(k);
                degrade_recorded = tokio::task::spawn_blocking(move || k.record_degraded())
                    .await
                    .unwrap_or(false);
                if !degrade_recorded {
                    tracing::error!("degrade-to-async refused: this site does not hold the lease; holding output");
                }
                deg = degrade_recorded;
            }
            let sync_safe = sync_barrier
                .map(|b| causal.committed().dominates(&b))
                .unwrap_or(false);
            let detached = !*attached.borrow_and_update();
            let on = detached
                || match m {
                    M::Async => true,
                    M::Pipelined => deg,
                    M::Sync => deg || sync_safe,
                    // Never set (`block_mode` refuses it); hold, as the safe side.
                    M::Checkpoint => deg,
                };
            bypass.set(on);
            tokio::select! {
                r = degraded.changed() => if r.is_err() { return },
                r = mode_rx.changed() => if r.is_err() { return },
                r = committed.changed(), if m == M::Sync && !on => if r.is_err() { return },
                r = attached.changed(), if detached => if r.is_err() { return },
                // A refused degrade is asked again.
                _ = tokio::time::sleep(Duration::from_millis(500)), if deg != *degraded.borrow() => {}
            }
        }
    });
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}
