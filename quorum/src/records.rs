//! The group's two records in etcd, and the lease requests carried out on them
//! (docs/design.md §7).
//!
//! Under `/pipecloud/group/<group>/`:
//! * `generation`: `"<number, 20 digits> <site>"`, no lease. The fencing token.
//!   Zero-padded so that etcd's byte-wise comparisons order it like numbers:
//!   "the generation is `n`" is the compare `pad(n) < value < pad(n + 1)`.
//! * `lease`: the same text, attached to the holder's etcd lease; etcd deletes
//!   it when the holder stops renewing.
//!
//! [`GroupRecords::execute`] turns a [`Request`] of the pure state machine
//! (`pipecloud_core::lease`) into etcd calls and the answer into a [`Reply`]:
//! an observation is one transaction (one revision: both keys read together),
//! an acquire is a lease grant plus one transaction conditioned on the
//! generation and on the lease key being absent, a renewal is a keepalive plus
//! a read of the generation. Every other site-level decision goes through
//! [`GroupRecords::decide`]: one transaction conditioned on this site still
//! holding its generation.

use crate::etcd::{Compare, Etcd, EtcdError, KeyValue, Op};
use pipecloud_core::lease::{Generation, GenerationRecord, Millis, Observation, Reply, Request};
use std::sync::Arc;

/// Why a record in etcd could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("etcd key {key}: not a generation record (\"<number> <site>\"): {value:?}")]
    Malformed { key: String, value: String },
}

/// Whether `name` can be a site or group name in the records.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// `"<number, 20 digits> <site>"`.
pub fn encode_record(number: Generation, site: &str) -> Vec<u8> {
    format!("{number:020} {site}").into_bytes()
}

fn decode_record(kv: &KeyValue) -> Result<GenerationRecord, RecordError> {
    let malformed = || RecordError::Malformed {
        key: String::from_utf8_lossy(&kv.key).into_owned(),
        value: String::from_utf8_lossy(&kv.value).into_owned(),
    };
    let text = std::str::from_utf8(&kv.value).map_err(|_| malformed())?;
    let (number, site) = text.split_once(' ').ok_or_else(malformed)?;
    if number.len() != 20 || !valid_name(site) {
        return Err(malformed());
    }
    let number = number.parse().map_err(|_| malformed())?;
    Ok(GenerationRecord {
        number,
        site: site.to_string(),
    })
}

/// The compares meaning "the generation record says `n`" (0: absent).
fn generation_is(key: &str, n: Generation) -> Vec<Compare> {
    if n == 0 {
        return vec![Compare::Absent(key.to_string())];
    }
    vec![
        Compare::ValueAbove(key.to_string(), format!("{n:020}").into_bytes()),
        Compare::ValueBelow(key.to_string(), format!("{:020}", n + 1).into_bytes()),
    ]
}

/// One site's view of one group's records.
pub struct GroupRecords {
    etcd: Arc<Etcd>,
    site: String,
    generation_key: String,
    lease_key: String,
    degraded_key: String,
    lease_ttl_s: i64,
    /// The etcd lease this site holds the group with, and its generation.
    held: Option<(i64, Generation)>,
}

impl GroupRecords {
    /// `group` and `site` must be [`valid_name`]s; `lease_ms` a whole number
    /// of seconds (checked by `LeaseConfig`).
    pub fn new(etcd: Arc<Etcd>, group: &str, site: &str, lease_ms: Millis) -> anyhow::Result<Self> {
        for (what, n) in [("group", group), ("site", site)] {
            anyhow::ensure!(
                valid_name(n),
                "{what} name {n:?}: use 1..=64 of [A-Za-z0-9._-]"
            );
        }
        Ok(GroupRecords {
            etcd,
            site: site.to_string(),
            generation_key: format!("/pipecloud/group/{group}/generation"),
            lease_key: format!("/pipecloud/group/{group}/lease"),
            degraded_key: format!("/pipecloud/group/{group}/degraded"),
            lease_ttl_s: (lease_ms / 1000).max(1) as i64,
            held: None,
        })
    }

    pub fn etcd(&self) -> &Arc<Etcd> {
        &self.etcd
    }

    /// Carries out `req`; any failure (etcd unreachable, no quorum) is
    /// [`Reply::Failed`] and logged.
    pub fn execute(&mut self, req: Request) -> Reply {
        let r = match req {
            Request::Observe => self.observe().map(Reply::Observed),
            Request::Acquire { expected } => self.acquire(expected),
            Request::Renew => self.renew(),
            Request::Resign => self.resign().map(|()| Reply::Resigned),
        };
        r.unwrap_or_else(|e| {
            tracing::warn!("lease: {req:?} failed: {e}");
            Reply::Failed
        })
    }

    /// Both records, read at one revision.
    pub fn observe(&self) -> Result<Observation, RecordError> {
        let gets = [
            Op::Get(self.generation_key.clone()),
            Op::Get(self.lease_key.clone()),
        ];
        let out = self.etcd.txn(&[], &gets, &[])?;
        self.observation(&out.gets)
    }

    fn observation(&self, gets: &[Option<KeyValue>]) -> Result<Observation, RecordError> {
        let generation = match gets.first() {
            Some(Some(kv)) => Some(decode_record(kv)?),
            _ => None,
        };
        let holder = match gets.get(1) {
            Some(Some(kv)) => Some(decode_record(kv)?.site),
            _ => None,
        };
        Ok(Observation { generation, holder })
    }

    fn acquire(&mut self, expected: Generation) -> Result<Reply, RecordError> {
        let lease = self.etcd.lease_grant(self.lease_ttl_s)?;
        let number = expected + 1;
        let record = encode_record(number, &self.site);
        let mut compares = generation_is(&self.generation_key, expected);
        compares.push(Compare::Absent(self.lease_key.clone()));
        let success = [
            Op::Put {
                key: self.generation_key.clone(),
                value: record.clone(),
                lease: 0,
            },
            Op::Put {
                key: self.lease_key.clone(),
                value: record,
                lease,
            },
        ];
        let failure = [
            Op::Get(self.generation_key.clone()),
            Op::Get(self.lease_key.clone()),
        ];
        let out = match self.etcd.txn(&compares, &success, &failure) {
            Ok(out) => out,
            Err(e) => {
                // The transaction may or may not have run: the lease expires
                // on its own if we cannot revoke it.
                let _ = self.etcd.lease_revoke(lease);
                return Err(e.into());
            }
        };
        if out.succeeded {
            self.held = Some((lease, number));
            return Ok(Reply::Acquired { generation: number });
        }
        let _ = self.etcd.lease_revoke(lease);
        Ok(Reply::AcquireLost(self.observation(&out.gets)?))
    }

    fn renew(&mut self) -> Result<Reply, RecordError> {
        let Some((lease, _)) = self.held else {
            return Ok(Reply::Renewed {
                alive: false,
                generation: 0,
            });
        };
        let ttl = self.etcd.lease_keepalive(lease)?;
        let generation = match self.etcd.get(&self.generation_key)? {
            Some(kv) => decode_record(&kv)?.number,
            None => 0,
        };
        if ttl <= 0 {
            self.held = None;
        }
        Ok(Reply::Renewed {
            alive: ttl > 0,
            generation,
        })
    }

    /// A site-level decision (degrade, failback, ...): runs `ops` in one
    /// transaction only if this site still holds its generation with its
    /// lease. Returns whether it ran.
    pub fn decide(&self, ops: &[Op]) -> Result<bool, RecordError> {
        let Some((lease, generation)) = self.held else {
            return Ok(false);
        };
        let mut compares = generation_is(&self.generation_key, generation);
        compares.push(Compare::LeaseIs(self.lease_key.clone(), lease));
        Ok(self.etcd.txn(&compares, ops, &[])?.succeeded)
    }

    /// Records that this site runs the group degraded to async (its backup is
    /// lost): allowed only to the lease holder (docs/design.md §4, §7).
    pub fn record_degraded(&self) -> Result<bool, RecordError> {
        let Some((_, generation)) = self.held else {
            return Ok(false);
        };
        let value = encode_record(generation, &self.site);
        self.decide(&[Op::Put {
            key: self.degraded_key.clone(),
            value,
            lease: 0,
        }])
    }

    /// The planned switch-back's generation bump (docs/design.md §15): once
    /// this site (the active one) has stopped serving and no longer holds the
    /// lease, one transaction writes generation `n + 1` for site `to`,
    /// conditioned on the generation still being this site's `n` and on the
    /// lease key being absent. `to`'s keeper ([`Ambition::Hold`] at its home)
    /// then acquires, as after its own lapse. `Ok(None)`: refused (the
    /// generation is not this site's, or a lease is still held); `Ok(Some(n +
    /// 1))`: done.
    ///
    /// [`Ambition::Hold`]: pipecloud_core::lease::Ambition::Hold
    pub fn hand_over(&self, to: &str) -> Result<Option<Generation>, RecordError> {
        if !valid_name(to) || to == self.site {
            return Ok(None);
        }
        let obs = self.observe()?;
        let Some(g) = obs.generation.filter(|g| g.site == self.site) else {
            return Ok(None);
        };
        if obs.holder.is_some() {
            return Ok(None);
        }
        let mut compares = generation_is(&self.generation_key, g.number);
        compares.push(Compare::Absent(self.lease_key.clone()));
        let put = [Op::Put {
            key: self.generation_key.clone(),
            value: encode_record(g.number + 1, to),
            lease: 0,
        }];
        let out = self.etcd.txn(&compares, &put, &[])?;
        Ok(out.succeeded.then_some(g.number + 1))
    }

    /// Gives the lease up at once (a planned stop): revokes this site's etcd
    /// lease, so etcd deletes the lease key and another site may acquire
    /// without waiting for it to lapse; the generation record stays. Call it
    /// only once this site stopped releasing and completing writes (the
    /// keeper's [`Request::Resign`] comes after its gate closed). A lease etcd
    /// no longer knows counts as revoked; on an error the lease is kept, to be
    /// revoked by a retry (or to lapse).
    pub fn resign(&mut self) -> Result<(), RecordError> {
        if let Some((lease, _)) = self.held {
            self.etcd.lease_revoke(lease)?;
            self.held = None;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_order_like_numbers() {
        let a = encode_record(9, "a");
        let b = encode_record(10, "b");
        assert!(a < b);
        assert!(format!("{:020}", 9).into_bytes() < a && a < format!("{:020}", 10).into_bytes());
        let kv = KeyValue {
            key: b"k".to_vec(),
            value: b,
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease: 0,
        };
        assert_eq!(
            decode_record(&kv).unwrap(),
            GenerationRecord {
                number: 10,
                site: "b".into()
            }
        );
        let bad = KeyValue {
            value: b"7 a".to_vec(),
            ..kv
        };
        assert!(decode_record(&bad).is_err());
        assert!(!valid_name("a b") && !valid_name("") && valid_name("site-1.x"));
    }
}
