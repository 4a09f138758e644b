//! PostgreSQL's own synchronous streaming replication across the emulated WAN:
//! the peer an operator would pick instead of block-level disaster recovery.
//!
//! The primary is an already running [`Postgres`] on a machine of the primary
//! site; the standby is built with `pg_basebackup` (streaming the WAL across the
//! WAN) into a plain directory of the backup namespace and started as a hot
//! standby there. The primary then waits for the standby's WAL flush on every
//! commit (`synchronous_standby_names = '*'`, `synchronous_commit = on`).
//!
//! [`SyncStandby::pause`] and [`SyncStandby::resume`] let the figures interleave
//! standby points with the agent's (a ratio counts only when both sides ran in
//! the same run, interleaved): paused, the primary no longer waits and the
//! standby's WAL receiver is off (no WAN traffic, no CPU of its own); the
//! standby's replication slot keeps the WAL it has not received, and `resume`
//! waits until it has caught up and is synchronous again.
//!
//! [`SyncStandby::detach`] (also on drop) turns synchronous replication off again
//! on the primary, stops the standby and drops its slot.

use crate::pg::{pg_bin, psql_at, Postgres};
use crate::sys::{ns_cmd, ns_sh, run, sh, sh_quiet, wait_until};
use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

/// Port of the standby in the backup namespace.
pub const STANDBY_PORT: u16 = 5433;

/// The standby's replication slot on the primary (keeps its WAL while paused).
const SLOT: &str = "pipecloud_figures_standby";

/// How long `resume` waits for the standby to catch up and be synchronous.
const RESUME_TIMEOUT: Duration = Duration::from_secs(120);

/// Where things are.
#[derive(Clone, Debug)]
pub struct StandbyPlan {
    /// Backup namespace (runs the standby).
    pub backup_ns: String,
    /// The standby's listen address in the backup namespace.
    pub backup_ip: Ipv4Addr,
    /// WAN router namespace and the LAN address of the primary's host: the WAN
    /// router learns a route back to the primary machine (the block-level
    /// replication only ever talks host-to-backup, so the site does not need it).
    pub wan_ns: String,
    pub primary_host_lan_ip: Ipv4Addr,
    /// Empty directory (created) for the standby's data.
    pub datadir: PathBuf,
    pub log: PathBuf,
}

/// A running synchronous standby of `primary`.
pub struct SyncStandby {
    pub standby: Option<Postgres>,
    /// Unix socket directory and port of the primary (to undo the settings).
    primary_sock: PathBuf,
    primary_port: u16,
    datadir: PathBuf,
    attached: bool,
    /// The standby's `primary_conninfo` as `pg_basebackup -R` wrote it.
    conninfo: String,
    paused: bool,
}

impl SyncStandby {
    /// Builds the standby of `primary` across the WAN and makes replication
    /// synchronous. Returns once the primary reports the standby as `sync`.
    pub fn attach(primary: &Postgres, plan: &StandbyPlan) -> Result<SyncStandby> {
        ns_sh(
            &plan.wan_ns,
            &[
                "ip",
                "route",
                "replace",
                &format!("{}/32", primary.ip),
                "via",
                &plan.primary_host_lan_ip.to_string(),
                "dev",
                "lan0",
            ],
        )
        .context("route from the WAN router back to the primary machine")?;
        sh_quiet(&["rm", "-rf", &plan.datadir.to_string_lossy()]);
        std::fs::create_dir_all(&plan.datadir)?;
        sh(&[
            "chown",
            "postgres:postgres",
            &plan.datadir.to_string_lossy(),
        ])?;
        sh(&["chmod", "700", &plan.datadir.to_string_lossy()])?;
        let mut me = SyncStandby {
            standby: None,
            primary_sock: primary.sockdir.clone(),
            primary_port: primary.port,
            datadir: plan.datadir.clone(),
            attached: false,
            conninfo: String::new(),
            paused: false,
        };
        // pg_basebackup from the backup namespace: the base backup and its WAL
        // cross the emulated WAN. -R writes standby.signal and primary_conninfo.
        let mut c = ns_cmd(&plan.backup_ns, "setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(pg_bin("pg_basebackup"))
        .args([
            "-h",
            &primary.ip.to_string(),
            "-p",
            &primary.port.to_string(),
        ])
        .args(["-U", "postgres", "-X", "stream", "-R", "-c", "fast"]);
        // Keeps the WAL it misses while its receiver is off.
        c.args(["-C", "-S", SLOT]);
        c.arg("-D").arg(&plan.datadir);
        run(&mut c).context("pg_basebackup across the WAN")?;
        let standby = Postgres::start(
            "standby",
            &plan.backup_ns,
            plan.backup_ip,
            STANDBY_PORT,
            &plan.datadir,
            &plan.log,
            &["hot_standby=on".to_string()],
        )
        .context("starting the standby")?;
        me.conninfo = standby
            .psql("SHOW primary_conninfo")
            .context("the standby's primary_conninfo")?
            .trim()
            .to_string();
        if me.conninfo.is_empty() {
            bail!("pg_basebackup -R wrote no primary_conninfo");
        }
        me.standby = Some(standby);
        me.attached = true;
        psql_at(
            &me.primary_sock,
            me.primary_port,
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
        )?;
        psql_at(&me.primary_sock, me.primary_port, "SELECT pg_reload_conf()")?;
        let sock = me.primary_sock.clone();
        let port = me.primary_port;
        wait_until(
            Duration::from_secs(60),
            "the standby to become synchronous",
            || {
                psql_at(&sock, port, "SELECT sync_state FROM pg_stat_replication")
                    .map(|s| s.lines().any(|l| l.trim() == "sync"))
                    .unwrap_or(false)
            },
        )?;
        // A commit must now wait for the standby: check the setting took.
        let v = psql_at(
            &me.primary_sock,
            me.primary_port,
            "SHOW synchronous_standby_names",
        )?;
        if v.trim() != "*" {
            bail!("synchronous_standby_names is {v:?} after reload");
        }
        Ok(me)
    }

    fn primary(&self, sql: &str) -> Result<String> {
        psql_at(&self.primary_sock, self.primary_port, sql)
    }

    fn standby(&self, sql: &str) -> Result<String> {
        self.standby
            .as_ref()
            .context("the standby is not running")?
            .psql(sql)
    }

    /// The primary stops waiting for the standby, and the standby stops
    /// receiving WAL (module docs). Returns once the primary shows no WAL
    /// sender.
    pub fn pause(&mut self) -> Result<()> {
        if self.paused {
            return Ok(());
        }
        self.primary("ALTER SYSTEM SET synchronous_standby_names = ''")?;
        self.primary("SELECT pg_reload_conf()")?;
        // Its WAL receiver off too: a standby streaming between its points
        // would cost the other variants WAN traffic and CPU.
        self.standby("ALTER SYSTEM SET primary_conninfo = ''")?;
        self.standby("SELECT pg_reload_conf()")?;
        wait_until(
            Duration::from_secs(30),
            "the standby's WAL sender to stop",
            || {
                self.primary("SELECT count(*) FROM pg_stat_replication")
                    .map(|s| s.trim() == "0")
                    .unwrap_or(false)
            },
        )?;
        self.paused = true;
        Ok(())
    }

    /// Undoes [`SyncStandby::pause`]: the standby receives again, and once it
    /// has replayed everything the primary had written when `resume` began
    /// (so its catching up does not run inside the measured point), commits
    /// wait for it again (checked: `sync_state = sync`).
    pub fn resume(&mut self) -> Result<()> {
        if !self.paused {
            return Ok(());
        }
        let target = self
            .primary("SELECT pg_current_wal_lsn()")?
            .trim()
            .to_string();
        let quoted = self.conninfo.replace('\'', "''");
        self.standby(&format!("ALTER SYSTEM SET primary_conninfo = '{quoted}'"))?;
        self.standby("SELECT pg_reload_conf()")?;
        let caught_up = format!(
            "SELECT count(*) FROM pg_stat_replication \
             WHERE state = 'streaming' AND replay_lsn >= '{target}'::pg_lsn"
        );
        wait_until(RESUME_TIMEOUT, "the standby to catch up", || {
            self.primary(&caught_up)
                .map(|s| s.trim() == "1")
                .unwrap_or(false)
        })?;
        self.primary("ALTER SYSTEM SET synchronous_standby_names = '*'")?;
        self.primary("SELECT pg_reload_conf()")?;
        wait_until(
            RESUME_TIMEOUT,
            "the standby to be synchronous again",
            || {
                self.primary("SELECT sync_state FROM pg_stat_replication")
                    .map(|s| s.lines().any(|l| l.trim() == "sync"))
                    .unwrap_or(false)
            },
        )?;
        let v = self.primary("SHOW synchronous_standby_names")?;
        if v.trim() != "*" {
            bail!("synchronous_standby_names is {v:?} after resume");
        }
        self.paused = false;
        Ok(())
    }

    /// Turns synchronous replication off on the primary and stops the standby.
    pub fn detach(&mut self) {
        if self.attached {
            let _ = psql_at(
                &self.primary_sock,
                self.primary_port,
                "ALTER SYSTEM RESET synchronous_standby_names",
            );
            let _ = psql_at(
                &self.primary_sock,
                self.primary_port,
                "SELECT pg_reload_conf()",
            );
            self.attached = false;
        }
        if let Some(mut s) = self.standby.take() {
            s.stop();
            // Its slot would keep WAL on the primary for good.
            let _ = self.primary(&format!(
                "SELECT pg_drop_replication_slot('{SLOT}') FROM pg_replication_slots \
                 WHERE slot_name = '{SLOT}'"
            ));
        }
        sh_quiet(&["rm", "-rf", &self.datadir.to_string_lossy()]);
    }
}

impl Drop for SyncStandby {
    fn drop(&mut self) {
        self.detach();
    }
}
