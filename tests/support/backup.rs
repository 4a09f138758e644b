//! A real `backup-server` for integration tests: its test PKI (`backup-server certs`),
//! the server process (killed on drop), signals to stall or crash it, and failover
//! to read a volume image back. Include it with
//!
//! ```ignore
//! #[path = "support/backup.rs"]
//! mod backup;
//! ```
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Generous bound for conditions that must eventually hold.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Path of the backup-server binary: `$PIPECLOUD_BACKUP_SERVER_BIN` when set
/// (scripts/test.sh points it at the binary its workspace build just made, so the
/// suite does not rebuild it with other features), else built once per test run.
pub fn backup_server_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("PIPECLOUD_BACKUP_SERVER_BIN") {
            let bin = PathBuf::from(bin);
            assert!(
                bin.exists(),
                "PIPECLOUD_BACKUP_SERVER_BIN={} does not exist",
                bin.display()
            );
            return bin;
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // A release test run (figures) uses a release server too.
        let release = !cfg!(debug_assertions);
        let mut args = vec!["build", "-p", "backup-server", "--bin", "backup-server"];
        if release {
            args.push("--release");
        }
        let status = Command::new(cargo)
            .args(&args)
            .current_dir(root)
            .stdin(Stdio::null())
            .status()
            .expect("running cargo build -p backup-server");
        assert!(status.success(), "cargo build -p backup-server failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let bin = target
            .join(if release { "release" } else { "debug" })
            .join("backup-server");
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
}

/// A unique scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pipecloud-repl-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running backup server with its test PKI; killed on drop.
pub struct Backup {
    pub dir: PathBuf,
    pub port: u16,
    group: String,
    child: Option<Child>,
}

impl Backup {
    /// Test PKI for `group` (server name `localhost`) and a server on a free loopback port.
    pub fn start(scratch: &Scratch, group: &str) -> Backup {
        let dir = scratch.0.join("backup");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("probe port");
            l.local_addr().expect("probe addr").port()
        };
        let out = Command::new(backup_server_bin())
            .arg("certs")
            .arg("--dir")
            .arg(&dir)
            .args(["--server-name", "localhost", "--group", group, "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .output()
            .expect("backup-server certs");
        assert!(
            out.status.success(),
            "backup-server certs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut b = Backup {
            dir,
            port,
            group: group.to_owned(),
            child: None,
        };
        b.spawn();
        b
    }

    pub fn config(&self) -> PathBuf {
        self.dir.join("backup-server.toml")
    }

    pub fn spawn(&mut self) {
        self.spawn_with(&[]);
    }

    /// Starts `backup-server serve --config ... EXTRA...` (e.g. `--metrics-listen ADDR`).
    pub fn spawn_with(&mut self, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("server log");
        let child = Command::new(backup_server_bin())
            .arg("serve")
            .arg("--config")
            .arg(self.config())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawning backup-server serve");
        self.child = Some(child);
        // Wait until it accepts connections.
        let deadline = std::time::Instant::now() + PATIENCE;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("backup-server exited early ({st}); log:\n{}", self.log());
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "backup-server never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    pub fn signal(&self, sig: libc::c_int) {
        let pid = self.child.as_ref().expect("server running").id();
        // SAFETY: plain kill(2) on our own child's pid.
        let r = unsafe { libc::kill(pid as libc::pid_t, sig) };
        assert_eq!(r, 0, "kill({pid}, {sig})");
    }

    /// SIGSTOP, then waits until every thread of the server is seen stopped
    /// (`T` in /proc), so that nothing it does afterwards can be mistaken for
    /// a reply of a running server.
    pub fn stop(&self) {
        self.signal(libc::SIGSTOP);
        let pid = self.child.as_ref().expect("server running").id();
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
                .expect("listing the server's threads")
                .filter_map(|e| e.ok())
                .map(|e| std::fs::read_to_string(e.path().join("stat")).unwrap_or_default())
                .collect::<Vec<_>>();
            // Field 3 of /proc/*/stat (after the parenthesised name) is the state.
            let all_stopped = tasks.iter().all(|stat| {
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('T'))
            });
            if all_stopped {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "backup-server threads never stopped: {tasks:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn cont(&self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGKILL (a crash) and wait for the process to be gone.
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// CA, agent certificate and key (the files `backup-server certs` wrote).
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn agent_cert(&self) -> PathBuf {
        self.dir.join(format!("{}-agent.pem", self.group))
    }
    pub fn agent_key(&self) -> PathBuf {
        self.dir.join(format!("{}-agent.key", self.group))
    }

    /// Fails the group over into `out`; returns the command's output (panics on failure).
    pub fn failover(&self, out: &Path) -> String {
        let o = Command::new(backup_server_bin())
            .args(["failover", "--group", &self.group, "--out"])
            .arg(out)
            .arg("--config")
            .arg(self.config())
            .stdin(Stdio::null())
            .output()
            .expect("backup-server failover");
        let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "failover failed: {}\n{}",
            stdout,
            String::from_utf8_lossy(&o.stderr)
        );
        stdout
    }

    /// A replication client configuration for this server's group (its PKI,
    /// `localhost`); the caller fills in the rest.
    pub fn client_config(&self) -> pipecloud::replication::ReplicationConfig {
        pipecloud::replication::ReplicationConfig {
            endpoint: format!("127.0.0.1:{}", self.port),
            server_name: "localhost".into(),
            tls: pipecloud::replication::TlsFiles {
                ca: self.ca(),
                cert: self.agent_cert(),
                key: self.agent_key(),
            },
            group: self.group.clone(),
            ..Default::default()
        }
    }

    /// Fails the group over and returns the bytes of `disk`'s volume image.
    pub fn failover_image(&self, out: &Path, disk: &str) -> Vec<u8> {
        let stdout = self.failover(out);
        let image = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("image: "))
            .find(|p| Path::new(p).file_stem().is_some_and(|s| s == disk))
            .unwrap_or_else(|| panic!("no image of {disk} in failover output:\n{stdout}"));
        std::fs::read(image).expect("reading failover image")
    }

    /// Fails the group over (volumes into `out`) and panics unless `disk`'s volume
    /// equals the image file `local` byte for byte; returns the local image's bytes.
    pub fn assert_volume_equals(&self, out: &Path, disk: &str, local: &Path) -> Vec<u8> {
        let remote = self.failover_image(out, disk);
        let local = std::fs::read(local).expect("reading the local image");
        assert_eq!(remote.len(), local.len(), "image sizes differ");
        if let Some(i) = remote.iter().zip(&local).position(|(a, b)| a != b) {
            panic!("backup image of {disk} differs from the local image at byte {i}");
        }
        local
    }
}

impl Drop for Backup {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child (continue it first: a stopped child
            // still dies on SIGKILL, this only keeps its shutdown tidy).
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGCONT);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
