//! How long the threads on a held reply's way waited for a CPU during a point
//! (issue 20, the tail of the held replies): the run-queue wait of every thread
//! of the agents, the backup server and the WAN emulator's delay thread
//! (`/proc/PID/task/TID/schedstat`, second field), the kernel's softirq
//! threads (`ksoftirqd/N`: under load they carry the emulated network's packet
//! processing, veth to veth, at normal priority), and the time the
//! hypervisor took the machine's virtual CPUs away (`steal` of `/proc/stat`).
//! Read before and after a point and subtracted, grouped by thread name. A
//! round of several RTTs with little data outstanding and no loss recovery is
//! a thread of that way waiting for a core (or the whole machine stolen).

use std::collections::BTreeMap;

/// Run-queue wait (ns) per `process/thread-name`, and the machine's steal (ms).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct CpuWait {
    wait_ns: BTreeMap<String, u64>,
    steal_ms: u64,
}

/// Thread names that start alike (`netpath-0`, `netpath-1`) are summed.
fn group_name(comm: &str) -> String {
    comm.trim()
        .trim_end_matches(|c: char| c.is_ascii_digit() || c == '-' || c == '/')
        .to_string()
}

/// The machine's steal time in ms (`cpu` line of `/proc/stat`, 8th value, in
/// USER_HZ = 100 ticks a second).
fn parse_steal_ms(stat: &str) -> u64 {
    stat.lines()
        .find(|l| l.starts_with("cpu "))
        .and_then(|l| l.split_whitespace().nth(8)?.parse::<u64>().ok())
        .map_or(0, |ticks| ticks * 10)
}

impl CpuWait {
    /// Reads the threads of `procs` (`(label, pid)`) and, when `own` names a
    /// thread of this process (the WAN delay thread), that one as `wan/NAME`.
    pub(super) fn read(procs: &[(String, u32)], own: &str) -> CpuWait {
        let mut c = CpuWait {
            steal_ms: std::fs::read_to_string("/proc/stat").map_or(0, |s| parse_steal_ms(&s)),
            ..CpuWait::default()
        };
        let mut add = |label: &str, task: &std::path::Path, only: Option<&str>| {
            let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
            if only.is_some_and(|o| comm.trim() != o) {
                return;
            }
            let wait = std::fs::read_to_string(task.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
                .unwrap_or(0);
            *c.wait_ns
                .entry(format!("{label}/{}", group_name(&comm)))
                .or_default() += wait;
        };
        let tasks = |pid: &str| {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .collect::<Vec<_>>()
        };
        for (label, pid) in procs {
            for t in tasks(&pid.to_string()) {
                add(label, &t, None);
            }
        }
        for t in tasks("self") {
            add("wan", &t, Some(own));
        }
        // The softirq threads: kernel threads named ksoftirqd/N.
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let p = e.path();
            let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
            if comm.starts_with("ksoftirqd/") {
                add("kernel", &p, None);
            }
        }
        c
    }

    /// The waits after `before`, largest first (those over 1 ms), one line.
    pub(super) fn line_since(&self, before: &CpuWait, secs: f64) -> String {
        let mut d: Vec<(&String, u64)> = self
            .wait_ns
            .iter()
            .map(|(k, v)| {
                (
                    k,
                    v.saturating_sub(before.wait_ns.get(k).copied().unwrap_or(0)),
                )
            })
            .filter(|(_, v)| *v >= 1_000_000)
            .collect();
        d.sort_by_key(|(_, v)| std::cmp::Reverse(*v));
        let mut s = format!(
            "cpu wait over {secs:.1} s: steal {} ms;",
            self.steal_ms.saturating_sub(before.steal_ms)
        );
        for (k, v) in d.iter().take(10) {
            s.push_str(&format!(" {k} {:.0} ms", *v as f64 / 1e6));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_group_and_subtract() {
        assert_eq!(group_name("netpath-1\n"), "netpath");
        assert_eq!(group_name("ksoftirqd/1\n"), "ksoftirqd");
        assert_eq!(group_name("pc-replication"), "pc-replication");
        assert_eq!(
            parse_steal_ms(
                "cpu  2645254 2886340 1025171 2022247 272593 0 92561 16783 0 0\ncpu0 1 2\n"
            ),
            167_830
        );
        let me = CpuWait::read(&[("me".into(), std::process::id())], "no-such-thread");
        assert!(
            me.wait_ns
                .keys()
                .all(|k| k.starts_with("me/") || k == "kernel/ksoftirqd"),
            "{me:?}"
        );
        let mut a = CpuWait::default();
        a.wait_ns.insert("agent/pc-replication".into(), 1_000_000);
        let mut b = a.clone();
        b.wait_ns.insert("agent/pc-replication".into(), 301_000_000);
        b.wait_ns.insert("backup/tokio-runtime-w".into(), 500_000);
        b.steal_ms = 20;
        let l = b.line_since(&a, 20.0);
        assert_eq!(
            l,
            "cpu wait over 20.0 s: steal 20 ms; agent/pc-replication 300 ms"
        );
    }
}
