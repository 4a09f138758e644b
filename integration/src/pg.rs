//! A stock PostgreSQL server inside a machine's network namespace, with its data
//! directory on a protected disk (or on a recovered image after failover).

use crate::sys::{ns_cmd, run, sh, wait_until, Guarded};
use anyhow::{Context, Result};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Where PostgreSQL 15 binaries live on Debian.
pub fn pg_bin(name: &str) -> String {
    let debian = format!("/usr/lib/postgresql/15/bin/{name}");
    if Path::new(&debian).exists() {
        debian
    } else {
        name.to_string()
    }
}

fn as_postgres(cmd: &mut Command) -> &mut Command {
    cmd.args([
        "setpriv",
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        "--",
    ])
}

/// A running PostgreSQL server.
#[allow(dead_code)] // name/ns/datadir describe the instance
pub struct Postgres {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub datadir: PathBuf,
    pub sockdir: PathBuf,
    pub proc: Guarded,
    /// Its log (stderr): checkpoints are logged with a Unix-epoch ms prefix.
    pub log: PathBuf,
}

/// psql flags for scripted use: no psqlrc, quiet, unaligned tuples only, stop on error.
pub const PSQL_FLAGS: [&str; 5] = ["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"];

/// Runs SQL as `postgres` against the server listening in `sockdir` on `port`.
pub fn psql_at(sockdir: &Path, port: u16, sql: &str) -> Result<String> {
    let mut c = Command::new(pg_bin("psql"));
    c.args(PSQL_FLAGS)
        .args(["-U", "postgres", "-h"])
        .arg(sockdir)
        .args(["-p", &port.to_string(), "-d", "postgres", "-c", sql]);
    run(&mut c)
}

/// `chown -R postgres:postgres path`.
pub fn chown_postgres(path: &Path) -> Result<()> {
    sh(&["chown", "-R", "postgres:postgres", &path.to_string_lossy()]).map(drop)
}

/// Creates a fresh cluster in `datadir` (must be empty or absent), owned by postgres.
pub fn initdb(datadir: &Path) -> Result<()> {
    std::fs::create_dir_all(datadir)?;
    chown_postgres(datadir)?;
    sh(&["chmod", "700", &datadir.to_string_lossy()])?;
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        "--",
    ])
    .arg(pg_bin("initdb"))
    .args([
        "-A",
        "trust",
        "-U",
        "postgres",
        "-E",
        "UTF8",
        "--locale=C",
        "-D",
    ])
    .arg(datadir);
    run(&mut c).context("initdb")?;
    let conf = datadir.join("postgresql.auto.conf");
    // Dynamic shared memory in files under the data directory (`pg_dynshmem`), not
    // in /dev/shm: a server killed by a disaster leaves its POSIX segments behind,
    // files in the data directory go with the run's work directory.
    std::fs::write(
        &conf,
        "fsync = on\nsynchronous_commit = on\nfull_page_writes = on\n\
         shared_buffers = 32MB\nmax_connections = 300\nwal_level = replica\n\
         max_wal_senders = 4\nlogging_collector = off\ncheckpoint_timeout = 300\n\
         dynamic_shared_memory_type = mmap\n\
         log_checkpoints = on\nlog_line_prefix = '%n [%p] '\n",
    )?;
    std::fs::write(
        datadir.join("pg_hba.conf"),
        "local all all trust\nhost all all 0.0.0.0/0 trust\nhost replication all 0.0.0.0/0 trust\n\
         host all all ::/0 trust\nhost replication all ::/0 trust\n",
    )?;
    chown_postgres(datadir)?;
    Ok(())
}

impl Postgres {
    /// Starts `postgres` in namespace `ns` listening on `ip:port`; waits until it
    /// accepts connections (crash recovery, if any, happens before that).
    pub fn start(
        name: &str,
        ns: &str,
        ip: Ipv4Addr,
        port: u16,
        datadir: &Path,
        log: &Path,
        extra: &[String],
    ) -> Result<Postgres> {
        // Unix socket paths are limited to 107 bytes: keep the directory short.
        let sockdir = PathBuf::from(format!("/tmp/pcs-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&sockdir)?;
        sh(&["chown", "postgres:postgres", &sockdir.to_string_lossy()])?;
        let mut cmd = ns_cmd(ns, "setpriv");
        cmd.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(pg_bin("postgres"))
        .arg("-D")
        .arg(datadir)
        .args(["-c", &format!("listen_addresses={ip}")])
        .args(["-c", &format!("port={port}")])
        .args([
            "-c",
            &format!("unix_socket_directories={}", sockdir.display()),
        ]);
        for e in extra {
            cmd.args(["-c", e]);
        }
        let _ = as_postgres;
        let proc = Guarded::spawn(&format!("postgres-{name}"), &mut cmd, log)?;
        let mut pg = Postgres {
            name: name.to_string(),
            ns: ns.to_string(),
            ip,
            port,
            datadir: datadir.to_path_buf(),
            sockdir,
            proc,
            log: log.to_path_buf(),
        };
        let mut died = false;
        let r = wait_until(
            Duration::from_secs(120),
            "postgres to accept connections",
            || {
                if pg.proc.exited() {
                    died = true;
                    return true;
                }
                pg.psql("select 1").is_ok()
            },
        )
        .and_then(|()| {
            if died {
                anyhow::bail!("postgres exited during start-up")
            }
            Ok(())
        });
        if let Err(e) = r {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            pg.proc.kill();
            return Err(e.context(format!("postgres {name} log:\n{tail}")));
        }
        Ok(pg)
    }

    /// Runs SQL over the unix socket; returns unaligned tuples-only output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        psql_at(&self.sockdir, self.port, sql)
    }

    /// Connection string for clients in other namespaces.
    #[allow(dead_code)]
    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres connect_timeout=10",
            self.ip, self.port
        )
    }

    /// Fast, clean shutdown (SIGINT), falling back to SIGKILL.
    pub fn stop(&mut self) {
        self.proc.signal(libc::SIGINT);
        let _ = wait_until(Duration::from_secs(20), "postgres shutdown", || {
            self.proc.exited()
        });
        self.proc.kill();
    }

    /// The disaster: SIGKILL the postmaster and every backend.
    pub fn crash(&mut self) {
        if let Some(pid) = self.proc.pid() {
            // Backends are children of the postmaster: kill the whole session tree.
            let _ = sh(&["pkill", "-9", "-P", &pid.to_string()]);
        }
        self.proc.kill();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.crash();
        let _ = std::fs::remove_dir_all(&self.sockdir);
    }
}
