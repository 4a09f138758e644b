//! A real three-member etcd cluster for tests, the harness and the demo
//! (Debian `etcd-server`).
//!
//! Members listen on loopback ports chosen by the kernel (bound, released, then
//! handed to etcd: a port taken in between makes the start fail loudly), or on
//! the addresses a caller gives (one per site namespace); each has its own
//! data directory under a fresh temporary directory. With [`ServerTls`] the
//! members serve their clients over TLS (`https://`), optionally requiring
//! client certificates. A member can be stopped
//! (SIGKILL: a crashed site) and started again on its data. Everything is torn
//! down on drop: members killed and reaped, directories removed.

use crate::etcd::{Etcd, EtcdConfig, EtcdTls};
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

/// TLS on the members' client port.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The members' certificate (its SANs must name the members' addresses) and key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA clients' certificates must chain to; `Some` turns on
    /// `--client-cert-auth`.
    pub client_ca: Option<PathBuf>,
    /// What the cluster's own readiness check connects with.
    pub client: EtcdTls,
}

/// A running etcd cluster, torn down on drop.
pub struct EtcdCluster {
    dir: PathBuf,
    token: String,
    members: Vec<Member>,
    tls: Option<ServerTls>,
}

/// A port the kernel considers free on `ip` right now.
fn free_port(ip: Ipv4Addr) -> Result<u16> {
    let l = TcpListener::bind((ip, 0)).with_context(|| format!("binding a free port on {ip}"))?;
    Ok(l.local_addr()?.port())
}

impl EtcdCluster {
    /// Three members on 127.0.0.1, on free ports.
    pub fn start_local(tag: &str) -> Result<EtcdCluster> {
        EtcdCluster::start_local_with(tag, None)
    }

    /// As [`EtcdCluster::start_local`], with TLS on the client port.
    pub fn start_local_with(tag: &str, tls: Option<ServerTls>) -> Result<EtcdCluster> {
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
        EtcdCluster::start(tag, addrs, tls)
    }

    /// One member per address, all started and answering before this returns.
    pub fn start(tag: &str, addrs: Vec<MemberAddr>, tls: Option<ServerTls>) -> Result<EtcdCluster> {
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
            tls,
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
        let client = self.client_url(i);
        let tls = self.tls.clone();
        let m = &mut self.members[i];
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
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        if let Some(t) = &tls {
            cmd.arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key);
            if let Some(ca) = &t.client_ca {
                cmd.arg("--client-cert-auth")
                    .arg("--trusted-ca-file")
                    .arg(ca);
            }
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting etcd member {}", m.name))?;
        m.child = Some(child);
        Ok(())
    }

    fn wait_ready(&mut self, i: usize) -> Result<()> {
        let deadline = Instant::now() + START_WAIT;
        // A linearizable read answers only once the member has joined a
        // cluster with a leader.
        let probe = Etcd::new(&EtcdConfig {
            endpoints: vec![self.client_url(i)],
            tls: self.tls.as_ref().map(|t| t.client.clone()),
            attempt_timeout: Duration::from_millis(500),
        })?;
        let netns = self.members[i].addr.netns.clone();
        loop {
            if in_netns(netns.as_deref(), || {
                probe.get("/pipecloud/ready-probe").is_ok()
            }) {
                return Ok(());
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

    /// `http://ip:port` (`https://` with TLS) of member `i`.
    pub fn client_url(&self, i: usize) -> String {
        let m = &self.members[i];
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", m.addr.ip, m.addr.client_port)
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

/// Runs `f` in network namespace `ns` (`/run/netns/NAME`) on a scoped thread;
/// `None`: here. A namespace that cannot be entered counts as `false`.
fn in_netns(ns: Option<&str>, f: impl FnOnce() -> bool + Send) -> bool {
    let Some(ns) = ns else {
        return f();
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsRawFd;
            let Ok(file) = std::fs::File::open(format!("/run/netns/{ns}")) else {
                return false;
            };
            // SAFETY: setns(2) on a namespace fd we opened; affects this thread only.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return false;
            }
            f()
        })
        .join()
        .unwrap_or(false)
    })
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
