//! The tail episodes of a pipelined point set against the database's
//! checkpoints (issue 20, docs/design.md §8): the agent's `ctl tails` ring
//! (held replies beyond one round trip plus 25 ms, grouped into episodes) read
//! after the point, and PostgreSQL's `checkpoint starting` / `checkpoint
//! complete` lines of its log (`log_checkpoints`, each line prefixed with its
//! Unix-epoch time in ms: integration/src/pg.rs). Each episode is classified:
//! inside a checkpoint (between its start and completion), inside its sync
//! phase (the `sync=` seconds before completion: the kernel writes back what
//! the checkpoint wrote), and after a write burst (at least [`BURST_BYTES`]
//! issued in the 200 ms before one of its packets arrived), and across a stall
//! of the WAN emulator's delay thread (`crate::wan::Stalls`: it woke up more
//! than 20 ms late, during the episode).

use pipecloud::netpath::TailEvent;

/// Bytes issued in the 200 ms before an arrival that count as a burst (10 MB/s;
/// TPC-B at 64 clients issues a few MB/s of WAL between checkpoints).
pub(super) const BURST_BYTES: u64 = 2 << 20;

/// One checkpoint of the log (Unix ms); `complete_ms` is `u64::MAX` while running.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Checkpoint {
    pub(super) start_ms: u64,
    pub(super) complete_ms: u64,
    pub(super) sync_ms: u64,
}

fn prefix_ms(line: &str) -> Option<u64> {
    let t: f64 = line.split_whitespace().next()?.parse().ok()?;
    (t.is_finite() && t > 0.0).then(|| (t * 1e3).round() as u64)
}

/// The checkpoints of a PostgreSQL log written with `log_line_prefix = '%n ...'`.
pub(super) fn checkpoints(log: &str) -> Vec<Checkpoint> {
    let mut out: Vec<Checkpoint> = Vec::new();
    for line in log.lines() {
        let Some(at) = prefix_ms(line) else { continue };
        if line.contains("checkpoint starting:") || line.contains("restartpoint starting:") {
            out.push(Checkpoint {
                start_ms: at,
                complete_ms: u64::MAX,
                sync_ms: 0,
            });
        } else if line.contains("checkpoint complete:") || line.contains("restartpoint complete:") {
            let sync_s: f64 = line
                .split("sync=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.trim_end_matches(',').parse().ok())
                .unwrap_or(0.0);
            if let Some(c) = out.iter_mut().rev().find(|c| c.complete_ms == u64::MAX) {
                c.complete_ms = at;
                c.sync_ms = (sync_s * 1e3).round() as u64;
            }
        }
    }
    out
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// Where one episode fell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Placed {
    pub(super) in_checkpoint: bool,
    pub(super) in_sync: bool,
    pub(super) after_burst: bool,
    /// The worst WAN stall inside the episode, µs (0: none).
    pub(super) wan_stall_us: u64,
}

/// A stall `(woke at ms, µs late)` covers `[woke - late, woke]`.
fn stall_span(&(at_ms, late_us): &(u64, u64)) -> (u64, u64) {
    (at_ms.saturating_sub(late_us / 1000), at_ms)
}

pub(super) fn place(e: &TailEvent, cps: &[Checkpoint], stalls: &[(u64, u64)]) -> Placed {
    let span = (e.first_arrived_ms, e.last_released_ms);
    Placed {
        wan_stall_us: stalls
            .iter()
            .filter(|s| overlaps(span, stall_span(s)))
            .map(|s| s.1)
            .max()
            .unwrap_or(0),
        in_checkpoint: cps
            .iter()
            .any(|c| overlaps(span, (c.start_ms, c.complete_ms))),
        in_sync: cps.iter().any(|c| {
            c.complete_ms != u64::MAX
                && overlaps(
                    span,
                    (c.complete_ms.saturating_sub(c.sync_ms), c.complete_ms),
                )
        }),
        after_burst: e.window_bytes >= BURST_BYTES,
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1u32 << 20)
}

/// The lines the harness prints for a point `[from_ms, to_ms]`: a summary and
/// up to `detail` episodes (the worst first).
pub(super) fn lines(
    events: &[TailEvent],
    cps: &[Checkpoint],
    stalls: &[(u64, u64)],
    from_ms: u64,
    to_ms: u64,
    detail: usize,
) -> Vec<String> {
    let mut mine: Vec<&TailEvent> = events
        .iter()
        .filter(|e| overlaps((e.first_arrived_ms, e.last_released_ms), (from_ms, to_ms)))
        .collect();
    let cps: Vec<Checkpoint> = cps
        .iter()
        .filter(|c| overlaps((c.start_ms, c.complete_ms), (from_ms, to_ms)))
        .cloned()
        .collect();
    let placed: Vec<Placed> = mine.iter().map(|e| place(e, &cps, stalls)).collect();
    let stalls_in: Vec<u64> = stalls
        .iter()
        .filter(|s| overlaps(stall_span(s), (from_ms, to_ms)))
        .map(|s| s.1)
        .collect();
    let count = |f: fn(&Placed) -> bool| placed.iter().filter(|p| f(p)).count();
    let packets: u64 = mine.iter().map(|e| e.packets).sum();
    let max = |f: fn(&TailEvent) -> u64| mine.iter().map(|e| f(e)).max().unwrap_or(0);
    let mut out = vec![format!(
        "tails: {} episodes ({packets} packets) over {:.1} s; {} inside a checkpoint ({} in its sync phase), {} after a write burst (>= {:.0} MiB in 200 ms), {} across a WAN emulator stall; max outstanding {:.1} MiB, unsent {:.1} MiB, burst {:.1} MiB; checkpoints overlapping the point: {}; WAN stalls > 20 ms in the point: {} (max {:.0} ms)",
        mine.len(),
        to_ms.saturating_sub(from_ms) as f64 / 1e3,
        count(|p| p.in_checkpoint),
        count(|p| p.in_sync),
        count(|p| p.after_burst),
        mib(BURST_BYTES),
        count(|p| p.wan_stall_us > 0),
        mib(max(|e| e.outstanding_bytes)),
        mib(max(|e| e.unsent_bytes)),
        mib(max(|e| e.window_bytes)),
        cps.len(),
        stalls_in.len(),
        stalls_in.iter().max().copied().unwrap_or(0) as f64 / 1e3,
    )];
    mine.sort_by_key(|e| std::cmp::Reverse(e.hold_us));
    for e in mine.iter().take(detail) {
        let p = place(e, &cps, stalls);
        out.push(format!(
            "  tail at +{:.1} s: {} packets over {} ms, worst {:.1} ms ({}: send {:.1} + round {:.1} + release {:.1}, rtt {:.1}); outstanding {:.2} MiB, unsent {:.2} MiB, issued in 200 ms before {:.2} MiB;{}{}{}{}",
            e.first_arrived_ms.saturating_sub(from_ms) as f64 / 1e3,
            e.packets,
            e.last_released_ms.saturating_sub(e.first_arrived_ms),
            e.hold_us as f64 / 1e3,
            e.kind,
            e.dep_send_us as f64 / 1e3,
            e.round_us as f64 / 1e3,
            e.release_us as f64 / 1e3,
            e.rtt_us as f64 / 1e3,
            mib(e.outstanding_bytes),
            mib(e.unsent_bytes),
            mib(e.window_bytes),
            if p.in_checkpoint { " in a checkpoint" } else { " no checkpoint" },
            if p.in_sync { " (sync phase)" } else { "" },
            if p.after_burst { ", after a burst" } else { "" },
            if p.wan_stall_us > 0 {
                format!(", WAN emulator stalled {:.0} ms", p.wan_stall_us as f64 / 1e3)
            } else {
                String::new()
            },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_parse_and_episodes_are_placed() {
        let log = "1700000000.000 [10] LOG:  database system is ready\n\
                   1700000010.500 [11] LOG:  checkpoint starting: time\n\
                   1700000040.500 [11] LOG:  checkpoint complete: wrote 300 buffers (1.8%); 0 WAL file(s) added, 0 removed, 1 recycled; write=29.700 s, sync=0.250 s, total=30.000 s; sync files=12, longest=0.200 s, average=0.020 s; distance=9000 kB, estimate=9000 kB\n\
                   1700000100.000 [11] LOG:  checkpoint starting: wal\n";
        let cps = checkpoints(log);
        assert_eq!(
            cps,
            vec![
                Checkpoint {
                    start_ms: 1_700_000_010_500,
                    complete_ms: 1_700_000_040_500,
                    sync_ms: 250
                },
                Checkpoint {
                    start_ms: 1_700_000_100_000,
                    complete_ms: u64::MAX,
                    sync_ms: 0
                }
            ]
        );
        let ev = |from: u64, to: u64, burst: u64| TailEvent {
            first_arrived_ms: 1_700_000_000_000 + from,
            last_released_ms: 1_700_000_000_000 + to,
            packets: 3,
            hold_us: 140_000,
            window_bytes: burst,
            kind: "split".into(),
            ..TailEvent::default()
        };
        let base = 1_700_000_000_000;
        assert_eq!(place(&ev(5_000, 5_200, 0), &cps, &[]), Placed::default());
        let p = place(
            &ev(40_300, 40_400, 3 << 20),
            &cps,
            &[(base + 40_500, 150_000)],
        );
        assert!(p.in_checkpoint && p.in_sync && p.after_burst);
        assert_eq!(p.wan_stall_us, 150_000);
        let p = place(&ev(120_000, 120_100, 0), &cps, &[(base + 40_500, 150_000)]);
        assert!(p.in_checkpoint && !p.in_sync && p.wan_stall_us == 0);
        let events = [ev(5_000, 5_200, 0), ev(40_300, 40_400, 3 << 20)];
        let l = lines(
            &events,
            &cps,
            &[(base + 40_500, 150_000)],
            base,
            base + 60_000,
            5,
        );
        assert!(
            l[0].starts_with("tails: 2 episodes (6 packets)")
                && l[0].contains("1 inside a checkpoint (1 in its sync phase), 1 after"),
            "{}",
            l[0]
        );
        assert_eq!(l.len(), 3);
        // Equal holds: both listed; the one in the checkpoint carries its places.
        let placed = l.iter().find(|x| x.contains("in a checkpoint")).unwrap();
        assert!(
            placed.contains(
                "in a checkpoint (sync phase), after a burst, WAN emulator stalled 150 ms"
            ),
            "{placed}"
        );
        assert!(
            l[0].contains("1 across a WAN emulator stall")
                && l[0].contains("in the point: 1 (max 150 ms)"),
            "{}",
            l[0]
        );
        // Outside the point: not counted.
        assert!(
            lines(&events, &cps, &[], base + 50_000, base + 60_000, 5)[0]
                .starts_with("tails: 0 episodes")
        );
    }
}
