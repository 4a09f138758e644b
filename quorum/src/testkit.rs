//! A real three-member etcd cluster for tests, the harness and the demo
//! (Debian `etcd-server`).
//!
//! Members listen on loopback ports chosen by the kernel (bound, released, then
//! handed to etcd: a port taken in between makes the start fail loudly), or on
//! the addresses a caller gives (one per site namespace); each has its own
//! data directory under a fresh temporary directory. A member can be stopped
//! (SIGKILL: a crashed site) and started again on its data. Everything is torn
//! down on drop: members killed and reaped, directories removed.

use anyhow::{bail, Context, Result};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The etcd binary (Debian `etcd-server`).
pub const ETCD_BIN: &str = "etcd";
/// How long a member may take to answer after it was started.
const START_WAIT: Duration = Duration::from_secs(20);

/// Where one member listens.
#[derive(Clone, Debug)]
pub struct MemberAddr {
    pub ip: Ipv4Addr,
    pub client_port: u16,
    pub peer_port: u16,
    /// Run the member inside this network namespace (`/run/netns/NAME`).
    pub netns: Option<String>,
}

struct Member {
    name: String,
    addr: MemberAddr,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster, torn down on drop.
pub struct EtcdCluster {
    dir: PathBuf,
    token: String,
    members: Vec<Member>,
}

/// A port the kernel considers free on `ip` right now.
fn free_port(ip: Ipv4Addr) -> Result<u16> {
    let l = TcpListener::bind((ip, 0)).with_context(|| format!("binding a free port on {ip}"))?;
    Ok(l.local_addr()?.port())
}

impl EtcdCluster {
    /// Three members on 127.0.0.1, on free ports.
    pub fn start_local(tag: &str) -> Result<EtcdCluster> {
        let lo = Ipv4Addr::LOCALHOST;
        let mut addrs = Vec::new();
        for _ in 0..3 {
            addrs.push(MemberAddr {
                ip: lo,
                client_port: free_port(lo)?,
                peer_port: free_port(lo)?,
                netns: None,
            });
        }
        EtcdCluster::start(tag, addrs)
    }

    /// One member per address, all started and answering before this returns.
    pub fn start(tag: &str, addrs: Vec<MemberAddr>) -> Result<EtcdCluster> {
        if Command::new(ETCD_BIN)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            bail!("`{ETCD_BIN}` not found: install the Debian package etcd-server (scripts/install-deps.sh)");
        }
        let token = format!("pipecloud-{tag}-{}-{}", std::process::id(), nanos());
        let dir = std::env::temp_dir().join(&token);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut cluster = EtcdCluster {
            members: addrs
                .into_iter()
                .enumerate()
                .map(|(i, addr)| Member {
                    name: format!("m{i}"),
                    addr,
                    data_dir: dir.join(format!("m{i}.etcd")),
                    log: dir.join(format!("m{i}.log")),
                    child: None,
                })
                .collect(),
            dir,
            token,
        };
        for i in 0..cluster.members.len() {
            cluster.spawn(i)?;
        }
        for i in 0..cluster.members.len() {
            cluster.wait_ready(i)?;
        }
        Ok(cluster)
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://{}:{}", m.name, m.addr.ip, m.addr.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let initial = self.initial_cluster();
        let token = self.token.clone();
        let m = &mut self.members[i];
        let client = format!("http://{}:{}", m.addr.ip, m.addr.client_port);
        let peer = format!("http://{}:{}", m.addr.ip, m.addr.peer_port);
        let mut cmd = match &m.addr.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}"))
                    .arg("--")
                    .arg(ETCD_BIN);
                c
            }
            None => Command::new(ETCD_BIN),
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .with_context(|| format!("opening {}", m.log.display()))?;
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args([
                "--initial-cluster",
                &initial,
                "--initial-cluster-token",
                &token,
            ])
            .args(["--initial-cluster-state", "new"])
            // Fast failure detection inside the cluster: a new leader within ~1 s.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting etcd member {}", m.name))?;
        m.child = Some(child);
        Ok(())
    }

    fn wait_ready(&mut self, i: usize) -> Result<()> {
        let deadline = Instant::now() + START_WAIT;
        let url = self.client_url(i);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(500)))
            .http_status_as_error(false)
            .build()
            .new_agent();
        loop {
            if let Ok(mut r) = agent.get(format!("{url}/health")).call() {
                if r.body_mut()
                    .read_to_string()
                    .is_ok_and(|b| b.contains("\"true\""))
                {
                    return Ok(());
                }
            }
            let m = &mut self.members[i];
            if let Some(Ok(Some(status))) = m.child.as_mut().map(|c| c.try_wait()) {
                bail!(
                    "etcd member {} exited ({status}); log: {}",
                    m.name,
                    tail(&m.log)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd member {} not healthy after {START_WAIT:?}; log: {}",
                    m.name,
                    tail(&m.log)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `http://ip:port` of member `i`.
    pub fn client_url(&self, i: usize) -> String {
        let m = &self.members[i];
        format!("http://{}:{}", m.addr.ip, m.addr.client_port)
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len())
            .map(|i| self.client_url(i))
            .collect()
    }

    /// Kills member `i` (SIGKILL, as a crashed site).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data and waits until it answers.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_ready(i)
    }

    /// The directory holding the members' data and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}
