//! The program, run by the kernel on crafted frames (`BPF_PROG_TEST_RUN`),
//! against the userspace codec: a kernel-tagged packet must be byte-identical
//! to what `ipopt::insert_tag` makes, a stripped one to the original.
//! Needs root (CAP_BPF), like the rest of the network tests.

use super::*;
use crate::causal::CausalState;
use crate::netfilter::NetMachine;
use etherparse::PacketBuilder;
use pipecloud_core::ipopt;
use pipecloud_core::WriterId;
use std::sync::Arc;

const WEB: [u8; 4] = [10, 1, 1, 2];
const APP: [u8; 4] = [10, 1, 1, 3];
const DB: [u8; 4] = [10, 1, 2, 2];
const CLIENT: [u8; 4] = [10, 9, 0, 2];
const WEB_IDX: usize = 0;
const DB_IDX: usize = 2;
const GROUP: u16 = 0x0107;

fn topo() -> NetTopology {
    let m = |name: &str, ip: [u8; 4], host: &str, w: Option<u8>| NetMachine {
        name: name.into(),
        ip: Ipv4Addr::from(ip),
        host: host.into(),
        outbound: name == "web",
        writer: w.map(WriterId),
    };
    NetTopology {
        group: "shop".into(),
        group_id: GROUP,
        tag_entries: 2,
        machines: vec![
            m("web", WEB, "a", None),
            m("app", APP, "a", Some(0)),
            m("db", DB, "b", Some(1)),
        ],
    }
}

fn tagger(host: &str) -> KernelTagger {
    KernelTagger::load(&topo(), host, DEFAULT_HANDLED_MARK).expect("load the kernel tagger")
}

fn tcp(src: [u8; 4], dst: [u8; 4], payload: &[u8], ack_only: bool) -> Vec<u8> {
    let mut b = PacketBuilder::ipv4(src, dst, 64)
        .tcp(40000, 5432, 1, 1000)
        .ack(9);
    if !ack_only {
        b = b.psh();
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

fn frame(ip: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    f.extend_from_slice(ip);
    f
}

/// What the program did to one packet: the packet afterwards, and whether
/// it marked it handled (unmarked packets of a pair go to the tag queue).
#[derive(Debug, PartialEq, Eq)]
struct Out {
    ip: Vec<u8>,
    handled: bool,
    /// Counted on its way to the hold queue.
    counted: bool,
}

fn run(t: &KernelTagger, ip: &[u8]) -> Out {
    let r = sys::test_run(t.program_fd(), &frame(ip)).expect("test run");
    assert_eq!(
        r.retval,
        prog::TCX_NEXT,
        "always continues (or drops on errors)"
    );
    assert_eq!(r.mark & !(DEFAULT_HANDLED_MARK | COUNTED_MARK), 0);
    Out {
        ip: r.data[14..].to_vec(),
        handled: r.mark & DEFAULT_HANDLED_MARK != 0,
        counted: r.mark & COUNTED_MARK != 0,
    }
}

fn handled(ip: &[u8]) -> Out {
    Out {
        ip: ip.to_vec(),
        handled: true,
        counted: false,
    }
}

fn queued(ip: &[u8]) -> Out {
    Out {
        ip: ip.to_vec(),
        handled: false,
        counted: false,
    }
}

fn held(ip: &[u8]) -> Out {
    Out {
        ip: ip.to_vec(),
        handled: false,
        counted: true,
    }
}

fn v(x: &[u64]) -> CountVector {
    CountVector::from_slice(x)
}

#[test]
fn tags_exactly_like_the_userspace_codec() {
    let t = tagger("a");
    let vectors = [
        v(&[1]),
        v(&[3, 2]),
        v(&[(7 << 32) + 5, 0, 9]),
        v(&[1, 2, 3, 4, 5, 6, 7, 8]),
    ];
    for (i, vec) in vectors.iter().enumerate() {
        t.publish(WEB_IDX, vec);
        for len in [1usize, 100, 1400] {
            let payload: Vec<u8> = (0..len).map(|b| (b * 7 + i) as u8).collect();
            let p = tcp(WEB, DB, &payload, false);
            let got = run(&t, &p);
            let mut want = p.clone();
            ipopt::insert_tag(&mut want, GROUP, vec).unwrap();
            assert_eq!(got, handled(&want), "vector {vec}, payload {len}");
        }
    }
    let s = t.stats();
    assert_eq!(s.tagged, 12, "{s:?}");
    assert_eq!(s.fallbacks + s.errors, 0, "{s:?}");
}

#[test]
fn leaves_untagged_what_it_should_and_falls_back_otherwise() {
    let t = tagger("a");
    // Zero vector: untagged.
    let p = tcp(WEB, DB, b"hello", false);
    assert_eq!(run(&t, &p), handled(&p));
    t.publish(WEB_IDX, &v(&[4]));
    // Pure ACK: untagged.
    let ack = tcp(WEB, DB, b"", true);
    assert_eq!(run(&t, &ack), handled(&ack));
    // Same-host pair: untouched, unmarked (the local queue's business).
    let local = tcp(WEB, APP, b"x", false);
    assert_eq!(run(&t, &local), queued(&local));
    // A fragment and a packet with other options: unchanged, to the tag queue.
    let mut frag = tcp(WEB, DB, b"frag", false);
    frag[6] |= 0x20; // MF
    assert_eq!(run(&t, &frag), queued(&frag));
    let mut tagged = tcp(WEB, DB, b"again", false);
    ipopt::insert_tag(&mut tagged, GROUP, &v(&[1])).unwrap();
    assert_eq!(run(&t, &tagged), queued(&tagged));
    // A vector too wide for the option: to the tag queue (which drops it).
    t.publish(WEB_IDX, &v(&[1, 1, 1, 1, 1, 1, 1, 1, 1]));
    assert_eq!(run(&t, &p), queued(&p));
    let s = t.stats();
    assert_eq!(
        (s.untagged_zero, s.pure_acks, s.fallbacks, s.tagged),
        (1, 1, 3, 0),
        "{s:?}"
    );
}

#[test]
fn strips_records_and_holds_back_tags_until_merged() {
    let t = Arc::new(tagger("b"));
    let state = CausalState::new(3);
    state.attach_kernel(t.clone());
    // db sent before: its slot carries its own write.
    state.issue_write(DB_IDX, WriterId(1));

    let inner = tcp(WEB, DB, b"query", false);
    let mut wire = inner.clone();
    ipopt::insert_tag(&mut wire, GROUP, &v(&[5])).unwrap();
    assert_eq!(
        run(&t, &wire),
        handled(&inner),
        "stripped back to the original bytes"
    );
    assert_eq!(t.stats().records, 1);

    // db answers before the agent merged: the program must not tag with the
    // stale vector; it hands the packet to the tag queue.
    let reply = tcp(DB, WEB, b"result", false);
    assert_eq!(run(&t, &reply), queued(&reply));
    assert_eq!(t.stats().fallbacks, 1);

    // Any access to the causal state merges first.
    assert_eq!(state.sync_pending(DB_IDX), v(&[5, 1]));
    let mut want = reply.clone();
    ipopt::insert_tag(&mut want, GROUP, &v(&[5, 1])).unwrap();
    assert_eq!(
        run(&t, &reply),
        handled(&want),
        "tagged with the merged vector"
    );

    // The same tag again (same CPU, most likely): stripped; recorded at most once more.
    assert_eq!(run(&t, &wire), handled(&inner));
    let s = t.stats();
    assert_eq!(s.stripped, 2, "{s:?}");
    assert!(s.records <= 2, "{s:?}");
    state.drain_kernel();
    assert!(!t.needs_drain());
}

#[test]
fn foreign_or_odd_options_go_to_the_tag_queue() {
    let t = tagger("b");
    let inner = tcp(WEB, DB, b"q", false);
    let mut foreign = inner.clone();
    ipopt::insert_tag(&mut foreign, GROUP + 1, &v(&[5])).unwrap();
    assert_eq!(run(&t, &foreign), queued(&foreign));
    let mut bad_len = inner.clone();
    ipopt::insert_tag(&mut bad_len, GROUP, &v(&[5])).unwrap();
    bad_len[23] += 4; // option length disagrees with the header
    assert_eq!(run(&t, &bad_len), queued(&bad_len));
    // Untagged arrival: passed and counted.
    assert_eq!(run(&t, &inner), handled(&inner));
    let s = t.stats();
    assert_eq!(
        (s.fallbacks, s.arrived_untagged, s.records),
        (2, 1, 0),
        "{s:?}"
    );
}

#[test]
fn client_bound_packets_pass_only_when_nothing_needs_holding() {
    let t = Arc::new(tagger("a"));
    let state = CausalState::new(3);
    state.attach_kernel(t.clone());
    let p = tcp(WEB, CLIENT, b"reply", false);
    // Nothing written yet: the committed vector (zero) dominates web's.
    assert_eq!(run(&t, &p), handled(&p));
    // web depends on app's write 3: held (counted for the agent).
    state.merge(WEB_IDX, &v(&[3]));
    assert_eq!(run(&t, &p), held(&p));
    // Committed catches up, but the counted packet is still with the agent:
    // passing now could overtake it.
    state.publish_committed(&v(&[3]));
    assert_eq!(run(&t, &p), held(&p));
    // The agent decided both and holds nothing: pass.
    t.hold_progress(0, 2);
    assert_eq!(run(&t, &p), handled(&p));
    // The agent holds a packet (of any machine): to the hold queue.
    t.hold_progress(1, 0);
    assert_eq!(run(&t, &p), held(&p));
    t.hold_progress(0, 1);
    assert_eq!(run(&t, &p), handled(&p));
    // Bypass (async/sync): pass even though web's vector is ahead.
    state.merge(WEB_IDX, &v(&[9]));
    assert_eq!(run(&t, &p), held(&p));
    t.hold_progress(0, 1);
    t.set_bypass(true);
    assert_eq!(run(&t, &p), handled(&p));
    t.set_bypass(false);
    assert_eq!(run(&t, &p), held(&p));
    // Between machines of the group: not the hold path.
    let to_db = tcp(WEB, DB, b"q", false);
    assert!(!run(&t, &to_db).counted);
    let s = t.stats();
    assert_eq!((s.hold_passed, s.hold_queued), (4, 5), "{s:?}");
}

#[test]
fn a_pending_kernel_merge_holds_client_bound_packets() {
    // db (host b) receives a tag; until the agent merges it, db's
    // client-bound packets cannot be judged by its published vector.
    let t = Arc::new(tagger("b"));
    let state = CausalState::new(3);
    state.attach_kernel(t.clone());
    let mut wire = tcp(WEB, DB, b"query", false);
    ipopt::insert_tag(&mut wire, GROUP, &v(&[5])).unwrap();
    assert!(run(&t, &wire).handled);
    let reply = tcp(DB, CLIENT, b"rows", false);
    assert_eq!(run(&t, &reply), held(&reply), "merge pending");
    // Merged: db now depends on write 5, not committed: still held.
    state.drain_kernel();
    t.hold_progress(0, 1);
    assert_eq!(run(&t, &reply), held(&reply));
    t.hold_progress(0, 1);
    state.publish_committed(&v(&[5]));
    assert_eq!(run(&t, &reply), handled(&reply));
}

mod prop {
    use super::*;
    use pipecloud_core::vector::VECTOR_LEN;
    use proptest::prelude::*;

    /// A vector with up to 8 non-zero entries anywhere (any 64-bit values).
    fn vector() -> impl Strategy<Value = CountVector> {
        proptest::collection::vec((0..VECTOR_LEN, 1u64..u64::MAX), 0..=8).prop_map(|entries| {
            let mut v = CountVector::ZERO;
            for (i, x) in entries {
                v.set(i, x);
            }
            v
        })
    }

    fn packet(udp: bool, len: usize, seed: u8) -> Vec<u8> {
        let payload: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        let b = PacketBuilder::ipv4(WEB, DB, 64);
        let mut out = Vec::new();
        if udp {
            b.udp(5000, 6000).write(&mut out, &payload).unwrap();
        } else {
            b.tcp(40000, 5432, 77, 1000)
                .ack(5)
                .psh()
                .write(&mut out, &payload)
                .unwrap();
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// The kernel tags exactly as `insert_tag`, strips back to the
        /// original bytes, and records exactly the tag the packet carried.
        #[test]
        fn kernel_and_userspace_agree(
            vec in vector(),
            udp in any::<bool>(),
            len in 1usize..1400,
            seed in any::<u8>(),
        ) {
            let a = tagger("a");
            let b = tagger("b");
            a.publish(WEB_IDX, &vec);
            let p = packet(udp, len, seed);
            let out = run(&a, &p);
            let mut want = p.clone();
            if vec.is_zero() {
                prop_assert_eq!(out, handled(&p));
                return Ok(());
            }
            ipopt::insert_tag(&mut want, GROUP, &vec).unwrap();
            prop_assert_eq!(out, handled(&want));
            prop_assert_eq!(run(&b, &want), handled(&p));
            let mut got = Vec::new();
            b.drain(&mut |m, raw| got.push((m, *raw)));
            let raw = ipopt::RawTag::from_vector(&vec).unwrap();
            prop_assert_eq!(got, vec![(DB_IDX, raw)]);
            prop_assert!(!b.needs_drain());
        }
    }
}

/// IPv6 is never marked handled (the program continues at once for anything
/// but IPv4), and neither is IPv4 from an address that is no machine's: both
/// meet the interface catch-all rules and the hold queue, even while the hold
/// is bypassed and nothing is pending (when web's IPv4 would pass).
#[test]
fn never_marks_ipv6_or_unknown_sources() {
    let t = Arc::new(tagger("a"));
    let state = CausalState::new(3);
    state.attach_kernel(t.clone());
    t.set_bypass(true);
    let web4 = tcp(WEB, CLIENT, b"reply", false);
    assert_eq!(run(&t, &web4), handled(&web4), "the IPv4 baseline passes");
    let other = tcp([10, 1, 1, 20], CLIENT, b"reply", false);
    assert_eq!(run(&t, &other), queued(&other));
    let mut ip6 = Vec::new();
    PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64)
        .tcp(40000, 5432, 1, 1000)
        .ack(9)
        .write(&mut ip6, b"reply")
        .unwrap();
    let mut f = frame(&ip6);
    f[12..14].copy_from_slice(&[0x86, 0xdd]);
    let r = sys::test_run(t.program_fd(), &f).expect("test run");
    assert_eq!(r.retval, prog::TCX_NEXT);
    assert_eq!(r.mark, 0, "an IPv6 packet is never marked");
    assert_eq!(&r.data[..], &f[..], "nor changed");
}
