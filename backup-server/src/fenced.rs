//! The fetcher's fence check (issue 23 §4, docs/design.md §15): before
//! `resync-fetch` writes a single block of the old primary's image, etcd must
//! say that the group's generation is held by *another* site. Then this site
//! is fenced (its agent may never serve again as it is: §7, a home site that
//! sees another site's generation stays fenced), and overwriting its disk
//! with the active site's is a failback. Any other answer refuses:
//!
//! - no generation recorded: no takeover ever happened, there is nothing to
//!   fail back from (this site's disk may be the only good copy);
//! - the generation is this site's: it is the active site (or is again,
//!   after a switch-back), and its disk is the one others copy;
//! - etcd unreachable or without quorum: unknown, so no.
//!
//! The read is linearizable (etcd's default range): a stale member's answer
//! could show an older generation. The check is made once, before the first
//! block; the generation can only return to this site through a planned
//! switch-back, which needs this resync to have finished.
//!
//! [`verdict`] is the pure rule; [`check`] reads the records on etcd.

use anyhow::{bail, Context, Result};
use pipecloud_core::lease::{GenerationRecord, Observation};
use pipecloud_quorum::etcd::{Etcd, EtcdConfig};
use pipecloud_quorum::records::GroupRecords;
use std::sync::Arc;

/// Whether the records in `obs` say that `site` is fenced: `Ok` with the
/// generation that fences it, or why not.
pub fn verdict(site: &str, obs: &Observation) -> Result<GenerationRecord, String> {
    match &obs.generation {
        None => Err(format!(
            "no generation is recorded for the group: no takeover happened, so site {site:?} \
             is not fenced and its disk must not be overwritten"
        )),
        Some(g) if g.site == site => Err(format!(
            "site {site:?} holds the group's generation {}: it is the active site, not a fenced one",
            g.number
        )),
        Some(g) => Ok(g.clone()),
    }
}

/// Reads the group's records on etcd and applies [`verdict`] for `site`.
pub fn check(cfg: &EtcdConfig, group: &str, site: &str) -> Result<GenerationRecord> {
    let etcd = Arc::new(Etcd::new(cfg).context("etcd client")?);
    // The lease length does not matter to a read.
    let records = GroupRecords::new(etcd, group, site, 1000)?;
    let obs = records
        .observe()
        .with_context(|| format!("reading group {group:?}'s generation on etcd"))?;
    match verdict(site, &obs) {
        Ok(g) => Ok(g),
        Err(why) => bail!("refusing to resync: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(generation: Option<(u64, &str)>) -> Observation {
        Observation {
            generation: generation.map(|(number, site)| GenerationRecord {
                number,
                site: site.into(),
            }),
            holder: None,
        }
    }

    #[test]
    fn only_another_sites_generation_fences() {
        assert!(verdict("primary", &obs(None)).is_err());
        let own = verdict("primary", &obs(Some((3, "primary")))).unwrap_err();
        assert!(own.contains("active site"), "{own}");
        let g = verdict("primary", &obs(Some((2, "backup")))).unwrap();
        assert_eq!((g.number, g.site.as_str()), (2, "backup"));
        // The lease holder does not matter: a lapsed lease leaves the generation.
        let mut o = obs(Some((2, "backup")));
        o.holder = Some("backup".into());
        assert!(verdict("primary", &o).is_ok());
        assert!(verdict("backup", &o).is_err());
    }
}
