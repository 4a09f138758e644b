//! Partition schedules and the checks on what the clients saw (pure: no I/O,
//! no clock; times are offsets from the schedule's start). The driver is
//! [`crate::partition`]; docs/design.md §7.
//!
//! A schedule is one to three faults, each a set of cuts of one [`Link`]
//! (offset from the schedule's start, length); flapping is several cuts of one
//! link at intervals around the lease time. Overlapping cuts of the same link
//! merge, so the driver gets a plain sequence of cut and heal transitions
//! ([`Schedule::events`]), every cut healed by the end.

use crate::disaster::Rng;
use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

/// What a fault cuts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Link {
    /// The replication link (the primary's agents ↔ the backup server).
    PrimaryBackup,
    /// The primary's host ↔ the other two etcd members.
    PrimaryQuorum,
    /// The backup site ↔ the other two etcd members.
    BackupQuorum,
    /// The witness's etcd member (killed, then restarted on its data).
    Witness,
}

impl Link {
    pub const ALL: [Link; 4] = [
        Link::PrimaryBackup,
        Link::PrimaryQuorum,
        Link::BackupQuorum,
        Link::Witness,
    ];

    /// The fault's name on the command line and in RESULT lines.
    pub fn name(self) -> &'static str {
        match self {
            Link::PrimaryBackup => "primary-backup",
            Link::PrimaryQuorum => "primary-quorum",
            Link::BackupQuorum => "backup-quorum",
            Link::Witness => "witness-down",
        }
    }
}

/// One fault: `cuts` of `link`, as (offset from the schedule's start, length).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    pub link: Link,
    pub flapping: bool,
    pub cuts: Vec<(Duration, Duration)>,
}

/// A cut or a heal of one link, at an offset from the schedule's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub at: Duration,
    pub link: Link,
    pub cut: bool,
}

/// Faults run concurrently from one start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub faults: Vec<Fault>,
}

/// The fault names `--partition` accepts.
pub const NAMES: [&str; 5] = [
    "primary-backup",
    "primary-quorum",
    "backup-quorum",
    "witness-down",
    "flapping",
];

impl Schedule {
    /// The single-fault schedule `--partition NAME` runs: the fault at the
    /// start for `lease × 4` (`primary-quorum`: × 10, so that the takeover
    /// happens while it lasts); `flapping` cuts the primary from the etcd
    /// majority three times (0.7, 1.3, 1.0 × lease) with a lease between.
    pub fn named(name: &str, lease: Duration) -> Option<Schedule> {
        let whole = |link, times: u32| Fault {
            link,
            flapping: false,
            cuts: vec![(Duration::ZERO, lease * times)],
        };
        let fault = match name {
            "primary-backup" => whole(Link::PrimaryBackup, 4),
            "primary-quorum" => whole(Link::PrimaryQuorum, 10),
            "backup-quorum" => whole(Link::BackupQuorum, 4),
            "witness-down" => whole(Link::Witness, 4),
            "flapping" => {
                let mut at = Duration::ZERO;
                let mut cuts = Vec::new();
                for tenths in [7, 13, 10] {
                    let len = lease * tenths / 10;
                    cuts.push((at, len));
                    at += len + lease;
                }
                Fault {
                    link: Link::PrimaryQuorum,
                    flapping: true,
                    cuts,
                }
            }
            _ => return None,
        };
        Some(Schedule {
            faults: vec![fault],
        })
    }

    /// A random schedule: 1–3 faults, each of the five kinds alike, starting
    /// within 2 × lease, lasting 0.5–3 × lease; flapping (of the primary ↔
    /// quorum or the replication link) is 2–4 cuts of 0.5–1.5 × lease with
    /// 0.5–1.5 × lease between.
    pub fn generate(seed: u64, lease: Duration) -> Schedule {
        let mut rng = Rng(seed);
        let scaled = |rng: &mut Rng, lo_tenths: u64, hi_tenths: u64| {
            lease * (lo_tenths + rng.range(0, hi_tenths - lo_tenths)) as u32 / 10
        };
        let n = 1 + rng.range(0, 2);
        let faults = (0..n)
            .map(|_| {
                let kind = rng.range(0, 4) as usize;
                let start = scaled(&mut rng, 0, 20);
                if kind == 4 {
                    let link = if rng.range(0, 1) == 0 {
                        Link::PrimaryQuorum
                    } else {
                        Link::PrimaryBackup
                    };
                    let mut at = start;
                    let cuts = (0..2 + rng.range(0, 2))
                        .map(|_| {
                            let len = scaled(&mut rng, 5, 15);
                            let cut = (at, len);
                            at += len + scaled(&mut rng, 5, 15);
                            cut
                        })
                        .collect();
                    Fault {
                        link,
                        flapping: true,
                        cuts,
                    }
                } else {
                    Fault {
                        link: Link::ALL[kind],
                        flapping: false,
                        cuts: vec![(start, scaled(&mut rng, 5, 30))],
                    }
                }
            })
            .collect();
        Schedule { faults }
    }

    /// The cut and heal transitions in time order: per link, overlapping or
    /// touching cuts merged; at one instant heals come before cuts.
    pub fn events(&self) -> Vec<Event> {
        let mut out = Vec::new();
        for link in Link::ALL {
            let mut cuts: Vec<(Duration, Duration)> = self
                .faults
                .iter()
                .filter(|f| f.link == link)
                .flat_map(|f| f.cuts.iter().map(|&(at, len)| (at, at + len)))
                .collect();
            cuts.sort();
            let mut merged: Vec<(Duration, Duration)> = Vec::new();
            for (a, b) in cuts {
                match merged.last_mut() {
                    Some(last) if a <= last.1 => last.1 = last.1.max(b),
                    _ => merged.push((a, b)),
                }
            }
            for (a, b) in merged {
                out.push(Event {
                    at: a,
                    link,
                    cut: true,
                });
                out.push(Event {
                    at: b,
                    link,
                    cut: false,
                });
            }
        }
        out.sort_by_key(|e| (e.at, e.cut, e.link));
        out
    }
}

impl fmt::Display for Schedule {
    /// `primary-quorum@1.2s+4.5s,flapping(primary-backup)@0.3s+1.5s/2.1s+3.0s`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, fault) in self.faults.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if fault.flapping {
                write!(f, "flapping({})", fault.link.name())?;
            } else {
                f.write_str(fault.link.name())?;
            }
            for (j, (at, len)) in fault.cuts.iter().enumerate() {
                let sep = if j == 0 { "@" } else { "/" };
                write!(f, "{sep}{:.1}s+{:.1}s", at.as_secs_f64(), len.as_secs_f64())?;
            }
        }
        Ok(())
    }
}

/// When the primary is cut from the etcd majority, from `events` as they
/// were applied: the intervals (merged, in order) in which the primary's host
/// reaches fewer than two of the three members (its own, the backup's unless
/// either side is cut from the quorum, the witness's unless the primary is
/// cut or the witness is down). An interval still open at the end of
/// `events` ends at the last event.
pub fn primary_without_quorum(events: &[Event]) -> Vec<(Duration, Duration)> {
    while_cut(events, |cut| {
        let pq = cut.contains(&Link::PrimaryQuorum);
        let backup = !pq && !cut.contains(&Link::BackupQuorum);
        let witness = !pq && !cut.contains(&Link::Witness);
        1 + usize::from(backup) + usize::from(witness) < 2
    })
}

/// The intervals in which `link` was cut, from `events` as applied (an
/// interval still open at the end ends at the last event).
pub fn cut_intervals(events: &[Event], link: Link) -> Vec<(Duration, Duration)> {
    while_cut(events, |cut| cut.contains(&link))
}

/// The intervals (in order, merged) in which `holds` is true of the set of
/// links cut; one still open at the end ends at the last event.
fn while_cut(
    events: &[Event],
    mut holds: impl FnMut(&BTreeSet<Link>) -> bool,
) -> Vec<(Duration, Duration)> {
    let mut cut = BTreeSet::new();
    let mut out = Vec::new();
    let mut since = None;
    for e in events {
        if e.cut {
            cut.insert(e.link);
        } else {
            cut.remove(&e.link);
        }
        match (holds(&cut), since) {
            (true, None) => since = Some(e.at),
            (false, Some(a)) => {
                out.push((a, e.at));
                since = None;
            }
            _ => {}
        }
    }
    if let Some(a) = since {
        out.push((a, events.last().map_or(a, |e| e.at)));
    }
    out
}

/// How many of `acks` fall inside an interval of `cuts` once `grace` of it
/// has passed (replies already released when the cut began may still
/// arrive).
pub fn acked_during(cuts: &[(Duration, Duration)], grace: Duration, acks: &[Duration]) -> usize {
    acks.iter()
        .filter(|&&t| cuts.iter().any(|&(a, b)| t >= a + grace && t <= b))
        .count()
}

/// How often a site released client replies while another site's window was
/// open. Every reply is `(site, when the client got it)`; in time order the
/// replies form runs of one site. Without a failback (not part of these runs)
/// each site serves in one window, so every run beyond one per site means two
/// windows overlap (a site answered again after another had answered); a
/// reply of another site at the very instant a run ends counts too. 0 is the
/// only correct answer.
pub fn overlapping_windows<S: Ord + Clone, T: Ord + Copy>(replies: &[(S, T)]) -> usize {
    // Sites answering at each instant, in time order.
    let mut at: std::collections::BTreeMap<T, BTreeSet<S>> = Default::default();
    for (site, t) in replies {
        at.entry(*t).or_default().insert(site.clone());
    }
    let mut runs = 0;
    let mut ties = 0;
    let mut sites = BTreeSet::new();
    let mut current: Option<S> = None;
    for group in at.into_values() {
        ties += usize::from(group.len() > 1);
        // The current run goes on first; each other site starts a run.
        let continues = current.as_ref().is_some_and(|c| group.contains(c));
        runs += group.len() - usize::from(continues);
        if !continues || group.len() > 1 {
            current = group.iter().find(|s| Some(*s) != current.as_ref()).cloned();
        }
        sites.extend(group);
    }
    runs - sites.len() + ties
}

/// The longest a partitioned primary went on answering: for each interval
/// of `without_quorum`, its last reply (`primary_replies`) within the
/// interval, minus the interval's start (zero when it did not answer).
pub fn primary_stop(
    without_quorum: &[(Duration, Duration)],
    primary_replies: &[Duration],
) -> Duration {
    without_quorum
        .iter()
        .map(|&(a, b)| {
            primary_replies
                .iter()
                .filter(|&&t| t >= a && t <= b)
                .map(|&t| t - a)
                .max()
                .unwrap_or_default()
        })
        .max()
        .unwrap_or_default()
}

/// The longest time in `[from, to]` without a reply (`replies`, any order).
pub fn longest_gap(replies: &[Duration], from: Duration, to: Duration) -> Duration {
    let mut inside: Vec<Duration> = replies
        .iter()
        .copied()
        .filter(|&t| t >= from && t <= to)
        .collect();
    inside.sort();
    inside.push(to);
    let mut prev = from;
    let mut gap = Duration::ZERO;
    for t in inside {
        gap = gap.max(t - prev);
        prev = t;
    }
    gap
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(3);

    fn s(x: f64) -> Duration {
        Duration::from_secs_f64(x)
    }

    fn ev(at: f64, link: Link, cut: bool) -> Event {
        Event {
            at: s(at),
            link,
            cut,
        }
    }

    #[test]
    fn every_name_parses_and_others_do_not() {
        for n in NAMES {
            let sched = Schedule::named(n, LEASE).expect(n);
            assert!(!sched.events().is_empty());
        }
        assert!(Schedule::named("everything", LEASE).is_none());
    }

    #[test]
    fn generated_schedules_are_seeded_bounded_and_healed() {
        assert_eq!(
            Schedule::generate(7, LEASE),
            Schedule::generate(7, LEASE),
            "same seed, same schedule"
        );
        let mut kinds = std::collections::BTreeSet::new();
        let mut differ = false;
        for seed in 0..500 {
            let sched = Schedule::generate(seed, LEASE);
            differ |= sched != Schedule::generate(seed + 1, LEASE);
            assert!((1..=3).contains(&sched.faults.len()), "{sched}");
            for f in &sched.faults {
                kinds.insert((f.link, f.flapping));
                for &(at, len) in &f.cuts {
                    assert!(len >= LEASE / 2 && len <= LEASE * 3, "{sched}");
                    assert!(at <= LEASE * 2 || f.flapping, "{sched}");
                }
            }
            // Every link cut is healed, transitions alternate per link.
            let events = sched.events();
            for link in Link::ALL {
                let mine: Vec<bool> = events
                    .iter()
                    .filter(|e| e.link == link)
                    .map(|e| e.cut)
                    .collect();
                assert_eq!(mine.len() % 2, 0, "{sched}");
                assert!(mine.chunks(2).all(|c| c == [true, false]), "{sched}");
            }
            assert!(events.windows(2).all(|w| w[0].at <= w[1].at));
        }
        assert!(differ);
        assert_eq!(kinds.len(), 6, "all kinds drawn: {kinds:?}");
    }

    #[test]
    fn overlapping_cuts_of_one_link_merge() {
        let sched = Schedule {
            faults: vec![
                Fault {
                    link: Link::Witness,
                    flapping: false,
                    cuts: vec![(s(0.0), s(2.0))],
                },
                Fault {
                    link: Link::Witness,
                    flapping: false,
                    cuts: vec![(s(1.0), s(3.0))],
                },
            ],
        };
        let e = sched.events();
        assert_eq!(e.len(), 2);
        assert_eq!(
            (e[0].at, e[0].cut, e[1].at, e[1].cut),
            (s(0.0), true, s(4.0), false)
        );
        assert_eq!(
            sched.to_string(),
            "witness-down@0.0s+2.0s,witness-down@1.0s+3.0s"
        );
    }

    #[test]
    fn the_primary_loses_the_quorum_only_without_two_members() {
        // Witness down alone, backup cut alone: the primary keeps two members.
        let alone = [
            ev(0.0, Link::Witness, true),
            ev(1.0, Link::Witness, false),
            ev(2.0, Link::BackupQuorum, true),
            ev(3.0, Link::BackupQuorum, false),
            ev(3.5, Link::PrimaryBackup, true),
            ev(3.6, Link::PrimaryBackup, false),
        ];
        assert!(primary_without_quorum(&alone).is_empty());
        // Both at once, then the primary's own cut overlapping: one interval.
        let both = [
            ev(0.0, Link::Witness, true),
            ev(1.0, Link::BackupQuorum, true),
            ev(2.0, Link::PrimaryQuorum, true),
            ev(3.0, Link::Witness, false),
            ev(3.0, Link::BackupQuorum, false),
            ev(5.0, Link::PrimaryQuorum, false),
            ev(6.0, Link::PrimaryQuorum, true),
        ];
        assert_eq!(
            primary_without_quorum(&both),
            vec![(s(1.0), s(5.0)), (s(6.0), s(6.0))]
        );
    }

    #[test]
    fn windows_overlap_whenever_a_site_answers_again() {
        let p = |t| ("primary", t);
        let b = |t| ("backup", t);
        assert_eq!(overlapping_windows::<&str, u32>(&[]), 0);
        assert_eq!(overlapping_windows(&[p(1), p(2), b(3), b(4)]), 0);
        assert_eq!(
            overlapping_windows(&[b(3), p(1), b(4), p(2)]),
            0,
            "order of input"
        );
        // The primary answers after the backup's first reply.
        assert_eq!(overlapping_windows(&[p(1), b(3), p(4), b(5)]), 2);
        // The backup answers before the primary's window (a premature
        // activation), then the primary, then the backup again.
        assert_eq!(overlapping_windows(&[b(1), p(2), p(3), b(4)]), 1);
        // Same instant at two sites.
        assert_eq!(overlapping_windows(&[p(1), p(2), b(2), b(3)]), 1);
        // Three sites (a future multi-site group) each in one window.
        assert_eq!(overlapping_windows(&[p(1), b(2), ("w", 3)]), 0);
    }

    #[test]
    fn acks_during_a_replication_cut_are_counted() {
        let events = [
            ev(1.0, Link::PrimaryBackup, true),
            ev(2.0, Link::Witness, true),
            ev(5.0, Link::PrimaryBackup, false),
            ev(6.0, Link::Witness, false),
            ev(7.0, Link::PrimaryBackup, true),
        ];
        let cuts = cut_intervals(&events, Link::PrimaryBackup);
        assert_eq!(cuts, vec![(s(1.0), s(5.0)), (s(7.0), s(7.0))]);
        let acks = [s(0.5), s(1.2), s(2.5), s(4.9), s(5.5)];
        assert_eq!(acked_during(&cuts, s(0.5), &acks), 2);
        assert_eq!(acked_during(&cuts, s(0.0), &acks), 3);
    }

    #[test]
    fn the_longest_gap_counts_the_edges() {
        let r = [s(3.0), s(1.0), s(1.5), s(9.0)];
        assert_eq!(longest_gap(&r, s(0.0), s(4.0)), s(1.5));
        assert_eq!(longest_gap(&r, s(1.0), s(3.0)), s(1.5));
        assert_eq!(longest_gap(&r, s(0.5), s(10.0)), s(6.0));
        assert_eq!(longest_gap(&[], s(2.0), s(5.0)), s(3.0));
    }

    #[test]
    fn a_primary_stops_within_its_interval() {
        let w = [(s(10.0), s(20.0)), (s(30.0), s(31.0))];
        let replies = [s(5.0), s(12.5), s(19.0), s(25.0), s(30.5)];
        assert_eq!(primary_stop(&w, &replies), s(9.0));
        assert_eq!(primary_stop(&w, &[s(1.0)]), Duration::ZERO);
        assert_eq!(primary_stop(&[], &replies), Duration::ZERO);
    }
}
