//! The backup site's controller against a real three-member etcd cluster
//! (Debian `etcd-server`) and the real, unprivileged `backup-server` binary:
//! when the home site's lease lapses, the controller wins the next generation,
//! fences the group, fails over to the cut and runs the activation hook,
//! exactly once (also across a controller restart); the home site's renewal
//! then reports its lease gone and the higher generation. With policy
//! `alarm-only` nothing happens until an operator confirms.

mod common;

use common::*;
use pipecloud_core::lease::{Reply, Request};
use pipecloud_core::wire::Frame;
use pipecloud_core::CountVector;
use pipecloud_quorum::etcd::{Etcd, EtcdConfig};
use pipecloud_quorum::records::GroupRecords;
use pipecloud_quorum::testkit::EtcdCluster;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: u64 = 64 * 1024;
const LEASE_MS: u64 = 2000;

/// The controller process; killed on drop.
struct Controller {
    child: Child,
    log: PathBuf,
}

impl Controller {
    fn start(env: &Env, topology: &Path, out: &Path, n: u32) -> Controller {
        let log = env.dir.join(format!("controller-{n}.log"));
        let f = std::fs::File::create(&log).expect("log");
        let child = env
            .command(&[
                "controller",
                "--topology",
                topology.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--config",
                env.config.to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("spawn controller");
        Controller { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit; returns whether it exited 0.
    fn exit_success(&mut self, limit: Duration) -> bool {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st.success();
            }
            assert!(
                start.elapsed() < limit,
                "the controller did not exit within {limit:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn topology(env: &Env, endpoints: &[String], policy: &str, hook: &Path) -> PathBuf {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    let text = format!(
        r#"[group]
name = "shop"
id = 7
mode = "pipelined"

[backup]
endpoint = "127.0.0.1:7070"
ca = "pki/ca.pem"
cert = "pki/shop-agent.pem"
key = "pki/shop-agent.key"

[quorum]
endpoints = [{}]
lease_ms = {LEASE_MS}
failover = "{policy}"
activate = "{}"

[[host]]
name = "dom0-a"
nbd_dir = "/run/pipecloud/ctl-test"

[[machine]]
name = "db"
ip = "10.10.0.3"
host = "dom0-a"
outbound = true

[[disk]]
name = "d"
machine = "db"
image = "/var/lib/pipecloud/d.img"
size = {SIZE}
"#,
        eps.join(", "),
        hook.display()
    );
    let path = env.dir.join(format!("topology-{policy}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// An activation hook that appends one line per run.
fn hook(env: &Env) -> PathBuf {
    let path = env.dir.join("activate.sh");
    std::fs::write(
        &path,
        "#!/bin/sh\necho \"$PIPECLOUD_GROUP $PIPECLOUD_GENERATION $PIPECLOUD_PREVIOUS_SITE $PIPECLOUD_IMAGES\" \
         >> \"$PIPECLOUD_VOLUMES/../hook.log\"\n",
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("755")
        .arg(&path)
        .status()
        .unwrap();
    path
}

fn chown_for_server(env: &Env) {
    if is_root() {
        let st = std::process::Command::new("chown")
            .args(["-R", &format!("{NOBODY}:{NOBODY}")])
            .arg(&env.dir)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool, log: impl Fn() -> String) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?}; log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hook_runs(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("hook.log"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

async fn journal_some_writes(env: &Env, server: &Server) {
    let tls = env.client_tls("shop");
    let h = hello("shop", "host-a", vec![disk("d", SIZE, 0, 1)]);
    let (mut wr, mut rd, _) = connect(server.addr(), tls, &h).await.expect("connect");
    let frames: Vec<Frame> = (1..=8)
        .map(|k| {
            write(
                0,
                1,
                k,
                0,
                (k % 4) * 4096,
                CountVector::from_slice(&[k]),
                payload(0, k, 4096),
            )
        })
        .collect();
    wr.send(&frames).await.unwrap();
    let mut acked = 0;
    while acked < 8 {
        match rd.recv().await.expect("recv") {
            Some(Frame::Ack(a)) => acked += a.last - a.first + 1,
            Some(_) => {}
            None => panic!("closed"),
        }
    }
}

fn etcd_client(cluster: &EtcdCluster) -> Arc<Etcd> {
    let cfg = EtcdConfig {
        endpoints: cluster.endpoints(),
        tls: None,
        attempt_timeout: Duration::from_millis(1000),
    };
    Arc::new(Etcd::new(&cfg).unwrap())
}

/// A site whose backup server journaled some writes of group `shop`, an etcd
/// cluster, and the home site holding generation 1 there, its keeper gone
/// (it never renews: the disaster), plus the controller's topology and --out.
struct Scene {
    env: Env,
    server: Server,
    _cluster: EtcdCluster,
    home: GroupRecords,
    topo: PathBuf,
    out: PathBuf,
}

async fn scene(tag: &str, policy: &str) -> Scene {
    let mut env = Env::new(&["shop"], "");
    let server = env.start();
    journal_some_writes(&env, &server).await;
    let cluster = EtcdCluster::start_local(tag).expect("etcd cluster (Debian etcd-server)");
    let mut home = GroupRecords::new(etcd_client(&cluster), "shop", "primary", LEASE_MS).unwrap();
    assert!(matches!(home.execute(Request::Observe), Reply::Observed(_)));
    assert_eq!(
        home.execute(Request::Acquire { expected: 0 }),
        Reply::Acquired { generation: 1 }
    );
    let hook = hook(&env);
    let topo = topology(&env, &cluster.endpoints(), policy, &hook);
    let out = env.out_dir("takeover");
    chown_for_server(&env);
    Scene {
        env,
        server,
        _cluster: cluster,
        home,
        topo,
        out,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_takes_over_once_when_the_home_lease_lapses() {
    let Scene {
        env,
        server,
        _cluster,
        mut home,
        topo,
        out,
    } = scene("ctl", "automatic").await;
    let lapsed_from = Instant::now();
    let mut ctl = Controller::start(&env, &topo, &out, 1);
    wait_until(
        "takeover",
        Duration::from_secs(30),
        || out.join("activated-2").exists(),
        || ctl.log(),
    );
    // The lease went to the activated site: the controller resigned it
    // before the hook and exits once the marker is written.
    assert!(ctl.exit_success(Duration::from_secs(10)), "{}", ctl.log());
    assert!(ctl.log().contains("resigning"), "{}", ctl.log());
    println!(
        "takeover complete {:.3} s after the home site's last renewal (lease {LEASE_MS} ms)",
        lapsed_from.elapsed().as_secs_f64()
    );
    let runs = hook_runs(&out);
    assert_eq!(runs.len(), 1, "{runs:?}");
    let fields: Vec<&str> = runs[0].split(' ').collect();
    assert_eq!(&fields[..3], ["shop", "2", "primary"], "{runs:?}");
    let image = std::fs::metadata(fields[3]).expect("failed-over image");
    assert_eq!(image.len(), SIZE);
    // The home site learns it lost: its lease is gone and generation 2 is recorded.
    assert_eq!(
        home.execute(Request::Renew),
        Reply::Renewed {
            alive: false,
            generation: 2
        }
    );
    // The group is fenced at the backup server.
    let (ok, status, err) = env.cli(&["status", "--config", env.config.to_str().unwrap()]);
    assert!(
        ok && status.contains("group shop (FENCED)"),
        "{status}{err}"
    );

    // Fires once: more leases pass, then a restarted controller re-acquires
    // (generation 3, previous = its own completed takeover) without a second one.
    std::thread::sleep(Duration::from_millis(2 * LEASE_MS));
    drop(ctl);
    let ctl = Controller::start(&env, &topo, &out, 2);
    let gen_is_3 =
        || matches!(home.observe(), Ok(o) if o.generation.as_ref().is_some_and(|g| g.number == 3));
    wait_until("re-acquired", Duration::from_secs(30), gen_is_3, || {
        ctl.log()
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        hook_runs(&out).len(),
        1,
        "the takeover ran twice: {:?}",
        hook_runs(&out)
    );
    // A planned stop (SIGTERM) resigns: the lease key is gone when the
    // process has exited (a kill, as above, leaves it to lapse).
    let mut ctl = ctl;
    // SAFETY: kill(2) on our child.
    unsafe {
        libc::kill(ctl.child.id() as i32, libc::SIGTERM);
    }
    let st = ctl.child.wait().expect("controller exit");
    assert!(
        st.success(),
        "controller after SIGTERM: {st}\n{}",
        ctl.log()
    );
    assert!(
        ctl.log()
            .contains("controller: stopping: lease resigned (revoked)"),
        "{}",
        ctl.log()
    );
    let obs = home.observe().expect("observe");
    assert_eq!(
        obs.holder, None,
        "the lease key outlived the controller's resign"
    );
    assert_eq!(obs.generation.map(|g| g.number), Some(3));
    drop(ctl);
    server.kill();
}

/// A failing activation hook is visible: the controller logs it, writes no
/// marker and exits with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_hook_leaves_no_marker_and_fails_the_controller() {
    let Scene {
        env,
        server,
        _cluster,
        topo,
        out,
        ..
    } = scene("hookfail", "automatic").await;
    std::fs::write(
        env.dir.join("activate.sh"),
        "#!/bin/sh\necho 'orchestrator unreachable' >&2\nexit 3\n",
    )
    .unwrap();
    let mut ctl = Controller::start(&env, &topo, &out, 1);
    assert!(
        !ctl.exit_success(Duration::from_secs(30)),
        "the controller succeeded with a failing hook: {}",
        ctl.log()
    );
    let log = ctl.log();
    assert!(
        log.contains("ACTIVATION FAILED") && log.contains("orchestrator unreachable"),
        "{log}"
    );
    assert!(!out.join("activated-2").exists(), "marker written: {log}");
    drop(ctl);
    server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarm_only_waits_for_the_operator() {
    let Scene {
        env,
        server,
        _cluster,
        topo,
        out,
        ..
    } = scene("alarm", "alarm-only").await;
    let ctl = Controller::start(&env, &topo, &out, 1);
    wait_until(
        "alarm",
        Duration::from_secs(30),
        || ctl.log().contains("ALARM"),
        || ctl.log(),
    );
    std::thread::sleep(Duration::from_millis(LEASE_MS));
    assert!(
        !out.join("activated-2").exists() && hook_runs(&out).is_empty(),
        "{}",
        ctl.log()
    );
    let (ok, stdout, stderr) = env.cli(&["confirm-takeover", "--out", out.to_str().unwrap()]);
    assert!(ok, "{stdout}{stderr}");
    wait_until(
        "takeover after confirmation",
        Duration::from_secs(30),
        || out.join("activated-2").exists(),
        || ctl.log(),
    );
    assert_eq!(hook_runs(&out).len(), 1);
    drop(ctl);
    server.kill();
}
