//! Both daemons' `/metrics` endpoints, live: a real `backup-server serve
//! --metrics-listen` and a real `pipecloud agent` with `[[host]] metrics_listen`
//! (sync mode, block path only), scraped over HTTP before and after writes sent
//! through the agent's NBD export. The output must parse as the Prometheus text
//! format, carry the names operators alert on, and move: the disk's written and
//! acked seq, the backup's journal counters and committed seq; and once the
//! backup is stopped, the time since it was last heard from.
//!
//! No timing is asserted; polls only bound how long a condition may take.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/agent_topology.rs"]
mod agent_topology;
#[path = "support/backup.rs"]
mod backup;
#[path = "support/metrics.rs"]
mod metrics;
#[path = "support/nbd_raw.rs"]
mod nbd_raw;

use agent_topology::OneDisk;
use backup::{Backup, Scratch, PATIENCE};
use metrics::{free_port, parse_exposition, scrape, value};
use nbd_raw::Raw;
use pipecloud::nbd::proto::{CMD_FLUSH, CMD_WRITE};

const GROUP: &str = "obs";
const DISK: &str = "disk0";
const SIZE: u64 = 16 << 20;

/// The agent process; killed on drop (also when the test fails).
struct AgentProc(Child);

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn topology(work: &Path, backup: &Backup, metrics: &str) -> String {
    OneDisk {
        group: GROUP,
        id: 12,
        mode: "sync",
        endpoint: format!("127.0.0.1:{}", backup.port),
        ca: &backup.ca(),
        cert: &backup.agent_cert(),
        key: &backup.agent_key(),
        work,
        disk: DISK,
        size: SIZE,
        policy: "heartbeat_interval_ms = 200\nheartbeat_timeout_ms = 2000",
        host: &format!("metrics_listen = \"{metrics}\""),
    }
    .toml()
}

/// Scrapes `addr` until it answers, then parses strictly.
fn scrape_parsed(addr: &str, log: impl Fn() -> String) -> std::collections::BTreeMap<String, f64> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match scrape(addr) {
            Ok(body) => {
                return parse_exposition(&body)
                    .unwrap_or_else(|e| panic!("{addr}: not Prometheus text: {e}\n{body}"))
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "{addr} never answered: {e}; log:\n{}",
                log()
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn both_daemons_serve_metrics_that_move_with_writes() {
    let scratch = Scratch::new("metrics");
    let mut backup = Backup::start(&scratch, GROUP);
    // Again with the endpoint given on the command line.
    let backup_metrics = format!("127.0.0.1:{}", free_port());
    backup.crash();
    backup.spawn_with(&["--metrics-listen", &backup_metrics]);

    let work = scratch.0.join("agent");
    std::fs::create_dir_all(work.join("nbd")).expect("agent dirs");
    let agent_metrics = format!("127.0.0.1:{}", free_port());
    let topo = work.join("topology.toml");
    std::fs::write(&topo, topology(&work, &backup, &agent_metrics)).expect("topology");
    let log = work.join("agent.log");
    let log_file = std::fs::File::create(&log).expect("agent log");
    let _agent = AgentProc(
        Command::new(env!("CARGO_BIN_EXE_pipecloud"))
            .args(["agent", "--topology"])
            .arg(&topo)
            .args(["--host", "h", "--no-network"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file)
            .spawn()
            .expect("spawning pipecloud agent"),
    );
    let agent_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let backup_log = || backup.log();

    // Labels in the order the endpoints write them.
    let disk = format!("{{group=\"{GROUP}\",disk=\"{DISK}\",writer=\"0\"}}");
    let group = format!("{{group=\"{GROUP}\"}}");
    let bwriter = format!("{{group=\"{GROUP}\",writer=\"0\"}}");
    let a0 = scrape_parsed(&agent_metrics, agent_log);
    let b0 = scrape_parsed(&backup_metrics, backup_log);
    let key = |name: &str, labels: &str| format!("{name}{labels}");
    // The names an operator alerts on are there from the start.
    for k in [
        key("pipecloud_disk_lag_writes", &disk),
        key("pipecloud_disk_lag_bytes", &disk),
        key("pipecloud_disk_oldest_unacked_age_seconds", &disk),
        key("pipecloud_disk_peak_lag_writes", &disk),
        key("pipecloud_replication_last_heard_seconds", &group),
        key("pipecloud_replication_connected", &group),
        key("pipecloud_group_degraded", &group),
        format!("pipecloud_group_mode{{group=\"{GROUP}\",mode=\"sync\"}}"),
    ] {
        assert!(a0.contains_key(&k), "agent lacks {k}: {a0:#?}");
    }
    assert_eq!(
        value(
            &a0,
            &format!("pipecloud_group_mode{{group=\"{GROUP}\",mode=\"sync\"}}")
        ),
        1.0
    );
    assert_eq!(
        value(
            &a0,
            &format!("pipecloud_group_mode{{group=\"{GROUP}\",mode=\"pipelined\"}}")
        ),
        0.0
    );
    for k in [
        "pipecloud_backup_writes_total{}",
        "pipecloud_backup_acks_total{}",
        "pipecloud_backup_fsyncs_total{}",
        "pipecloud_backup_ack_latency_seconds_count{}",
    ] {
        assert!(b0.contains_key(k), "backup lacks {k}: {b0:#?}");
    }
    let written0 = value(&a0, &key("pipecloud_disk_written_seq", &disk));

    // Writes through the agent's NBD export; sync: each reply waits for the ack.
    let sock = work.join("nbd").join(format!("{DISK}.sock"));
    let (mut nbd, size) = Raw::go(&sock, DISK);
    assert_eq!(size, SIZE);
    const WRITES: u64 = 20;
    for i in 0..WRITES {
        let err = nbd.call(CMD_WRITE, 0, i, i * 8192, 4096, &vec![i as u8 + 1; 4096]);
        assert_eq!(err, 0, "NBD write {i}; log:\n{}", agent_log());
    }
    assert_eq!(nbd.call(CMD_FLUSH, 0, WRITES, 0, 0, &[]), 0, "NBD flush");

    let a1 = scrape_parsed(&agent_metrics, agent_log);
    let b1 = scrape_parsed(&backup_metrics, backup_log);
    let written1 = value(&a1, &key("pipecloud_disk_written_seq", &disk));
    let acked1 = value(&a1, &key("pipecloud_disk_acked_seq", &disk));
    assert!(
        written1 >= written0 + WRITES as f64,
        "written seq moved: {written0} -> {written1}"
    );
    // Sync mode: every completed write was acked before its reply.
    assert_eq!(acked1, written1, "acked seq caught up");
    assert_eq!(value(&a1, &key("pipecloud_disk_lag_writes", &disk)), 0.0);
    assert_eq!(
        value(&a1, &key("pipecloud_replication_connected", &group)),
        1.0
    );
    for (name, at_least) in [
        ("pipecloud_backup_writes_total{}", WRITES as f64),
        ("pipecloud_backup_acks_total{}", WRITES as f64),
        (
            "pipecloud_backup_write_bytes_total{}",
            (WRITES * 4096) as f64,
        ),
        ("pipecloud_backup_fsyncs_total{}", 1.0),
        (
            "pipecloud_backup_ack_latency_seconds_count{}",
            WRITES as f64,
        ),
    ] {
        let (before, after) = (value(&b0, name), value(&b1, name));
        assert!(
            after >= before + at_least,
            "{name} moved by at least {at_least}: {before} -> {after}"
        );
    }
    assert!(
        value(&b1, &key("pipecloud_backup_committed_seq", &bwriter)) >= written1,
        "the backup's committed seq covers what the agent wrote: {b1:#?}"
    );
    assert_eq!(
        value(&b1, &key("pipecloud_backup_connected_agents", &group)),
        1.0
    );
    assert_eq!(value(&b1, &key("pipecloud_backup_fenced", &group)), 0.0);

    // A silent backup (SIGSTOP) shows on the agent's endpoint: the time since it
    // was last heard from grows past two heartbeat intervals (200 ms here) and the
    // connection reads late (or is dropped at the heartbeat timeout).
    let heard = key("pipecloud_replication_last_heard_seconds", &group);
    let heard1 = value(&a1, &heard);
    backup.stop();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let a = scrape_parsed(&agent_metrics, agent_log);
        let h = value(&a, &heard);
        let late = value(&a, &key("pipecloud_replication_late", &group)) == 1.0;
        let down = value(&a, &key("pipecloud_replication_connected", &group)) == 0.0;
        if h > 0.4 && h > heard1 && (late || down) {
            break;
        }
        assert!(Instant::now() < deadline, "silence never showed: {a:#?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    backup.cont();
}
