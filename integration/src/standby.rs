//! PostgreSQL's own synchronous streaming replication across the emulated WAN:
//! the peer an operator would pick instead of block-level disaster recovery.
//!
//! The primary is an already running [`Postgres`] on a machine of the primary
//! site; the standby is built with `pg_basebackup` (streaming the WAL across the
//! WAN) into a plain directory of the backup namespace and started as a hot
//! standby there. The primary then waits for the standby's WAL flush on every
//! commit (`synchronous_standby_names = '*'`, `synchronous_commit = on`).
//!
//! [`SyncStandby::detach`] (also on drop) turns synchronous replication off again
//! on the primary and stops the standby.

use crate::pg::{pg_bin, psql_at, Postgres};
use crate::sys::{ns_cmd, ns_sh, run, sh, sh_quiet, wait_until};
use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

/// Port of the standby in the backup namespace.
pub const STANDBY_PORT: u16 = 5433;

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
        .args(["-U", "postgres", "-X", "stream", "-R", "-c", "fast", "-D"])
        .arg(&plan.datadir);
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
        }
        sh_quiet(&["rm", "-rf", &self.datadir.to_string_lossy()]);
    }
}

impl Drop for SyncStandby {
    fn drop(&mut self) {
        self.detach();
    }
}
