//! The kernel's own account of a point's network path (issue 20, the tail of
//! the held replies): TCP loss recovery in the site's host and backup
//! namespaces (`/proc/net/snmp`, `/proc/net/netstat`: retransmitted
//! segments, retransmission timeouts, tail-loss probes, fast retransmits,
//! duplicate-SACKed segments) and the WAN router's queue drops
//! (`/proc/net/netfilter/nfnetlink_queue`: packets the emulator's queue
//! dropped, full or unread). Read before and after a point and subtracted: a
//! round of several RTTs with little data outstanding is loss recovery if these
//! moved, and not if they did not.

use crate::sys::ns_sh;
use std::collections::BTreeMap;

/// The counters printed, as `(file section, name)`: loss recovery, then the
/// receive window (a receiver that advertised a zero window, and the sender's
/// zero-window probes, which wait a retransmission timeout each).
const KEYS: [(&str, &str); 11] = [
    ("Tcp", "RetransSegs"),
    ("TcpExt", "TCPTimeouts"),
    ("TcpExt", "TCPLossProbes"),
    ("TcpExt", "TCPFastRetrans"),
    ("TcpExt", "TCPDSACKRecv"),
    ("TcpExt", "TCPSpuriousRTOs"),
    ("TcpExt", "TCPWantZeroWindowAdv"),
    ("TcpExt", "TCPToZeroWindowAdv"),
    ("TcpExt", "TCPFromZeroWindowAdv"),
    ("TcpExt", "TCPRcvQDrop"),
    ("TcpExt", "TCPRcvCollapsed"),
];

/// Counters per namespace role (`host`, `backup`: summed over its
/// namespaces), plus the WAN queue's drops.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct PathCounters {
    tcp: BTreeMap<(String, &'static str), u64>,
    wan_dropped: u64,
}

/// `Section: name name ...` / `Section: value value ...` line pairs.
fn parse_pairs(text: &str) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.windows(2) {
        let (Some((s1, names)), Some((s2, vals))) =
            (pair[0].split_once(':'), pair[1].split_once(':'))
        else {
            continue;
        };
        if s1 != s2
            || names
                .split_whitespace()
                .next()
                .and_then(|w| w.parse::<i64>().ok())
                .is_some()
        {
            continue;
        }
        for (n, v) in names.split_whitespace().zip(vals.split_whitespace()) {
            if let Ok(v) = v.parse::<u64>() {
                out.insert((s1.to_string(), n.to_string()), v);
            }
        }
    }
    out
}

/// Dropped packets of `/proc/net/netfilter/nfnetlink_queue` (queue_dropped + user_dropped).
fn parse_nfq_dropped(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            Some(f.get(5)? + f.get(6)?)
        })
        .sum()
}

impl PathCounters {
    /// Reads the TCP counters of `tcp_ns` (`(role, namespace)`) and the queue
    /// drops of `wan_ns`; what cannot be read is said and counted as 0.
    pub(super) fn read(tcp_ns: &[(String, String)], wan_ns: &str) -> PathCounters {
        let mut c = PathCounters::default();
        for (role, ns) in tcp_ns {
            match ns_sh(ns, &["cat", "/proc/net/snmp", "/proc/net/netstat"]) {
                Ok(text) => {
                    let m = parse_pairs(&text);
                    for (sec, name) in KEYS {
                        let v = m
                            .get(&(sec.to_string(), name.to_string()))
                            .copied()
                            .unwrap_or(0);
                        *c.tcp.entry((role.clone(), name)).or_default() += v;
                    }
                }
                Err(e) => eprintln!("figures: TCP counters of {ns}: {e:#}"),
            }
        }
        match ns_sh(wan_ns, &["cat", "/proc/net/netfilter/nfnetlink_queue"]) {
            Ok(text) => c.wan_dropped = parse_nfq_dropped(&text),
            Err(e) => eprintln!("figures: WAN queue counters of {wan_ns}: {e:#}"),
        }
        c
    }

    /// What moved after `before`, one line (counters that did not move are left out).
    pub(super) fn line_since(&self, before: &PathCounters) -> String {
        let mut s = String::from("path:");
        for (k, v) in &self.tcp {
            let d = v.saturating_sub(before.tcp.get(k).copied().unwrap_or(0));
            if d > 0 {
                s.push_str(&format!(" {}.{}={d}", k.0, k.1));
            }
        }
        if s == "path:" {
            s.push_str(" no TCP loss recovery or zero window");
        }
        s.push_str(&format!(
            " wan_queue_dropped={}",
            self.wan_dropped.saturating_sub(before.wan_dropped)
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse_and_subtract() {
        let snmp = "Tcp: RtoAlgorithm RtoMin RetransSegs InErrs\nTcp: 1 200 17 0\n\
                    TcpExt: SyncookiesSent TCPTimeouts TCPLossProbes\nTcpExt: 0 3 5\n";
        let m = parse_pairs(snmp);
        assert_eq!(m.get(&("Tcp".into(), "RetransSegs".into())), Some(&17));
        assert_eq!(m.get(&("TcpExt".into(), "TCPTimeouts".into())), Some(&3));
        let nfq = "    7  12345     0 2 65531     4     1   99 1\n";
        assert_eq!(parse_nfq_dropped(nfq), 5);
        let mut a = PathCounters::default();
        a.tcp.insert(("host".into(), "RetransSegs"), 10);
        assert_eq!(
            a.line_since(&a),
            "path: no TCP loss recovery or zero window wan_queue_dropped=0"
        );
        let mut b = a.clone();
        b.tcp.insert(("host".into(), "RetransSegs"), 14);
        b.tcp.insert(("backup".into(), "TCPToZeroWindowAdv"), 1);
        b.wan_dropped = 2;
        assert_eq!(
            b.line_since(&a),
            "path: backup.TCPToZeroWindowAdv=1 host.RetransSegs=4 wan_queue_dropped=2"
        );
    }
}
