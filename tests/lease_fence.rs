//! The lease fences the real network path (docs/design.md §7; needs root and
//! Debian `etcd-server`): a protected machine `web` streams datagrams to a
//! client through its host's NFQUEUE hold, gated by a real lease on a real
//! three-member etcd cluster.
//!
//! 1. While the lease is held, datagrams flow.
//! 2. The quorum is lost (two members killed): the gate closes within the
//!    lease time on its own clock and from then on **no datagram is
//!    released** (they wait in the kernel queue, fail-closed).
//! 3. The quorum returns: the home site re-acquires its own generation without
//!    an operator and the flow resumes.
//! 4. Another site's higher generation appears in etcd: the flow stops again,
//!    before the lease would have expired.
//!
//! The same scenario with the gate not wired into the network path (the
//! injected fault: an agent that forgets the lease) must fail check 2, or the
//! check proves nothing.

#[path = "support/netns.rs"]
mod netns;

use netns::Netns;
use pipecloud::causal::CausalState;
use pipecloud::core::lease::{Ambition, LeaseConfig};
use pipecloud::core::netqueue::NetQueueLimits;
use pipecloud::core::WriterId;
use pipecloud::netfilter::{NetMachine, NetTopology, QueuePlan, RuleConfig, RuleManager};
use pipecloud::netpath::{NetPath, NetPathConfig};
use pipecloud_quorum::etcd::{Etcd, EtcdConfig};
use pipecloud_quorum::records::{encode_record, GroupRecords};
use pipecloud_quorum::testkit::EtcdCluster;
use pipecloud_quorum::{LeaseGate, LeaseKeeper};
use std::net::{Ipv4Addr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WEB: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 2);
const GROUP: &str = "leasetest";
const LEASE_MS: u64 = 2000;
/// Slack for one driver pass and the datagram's trip after the gate closed.
const AFTER_CLOSE: Duration = Duration::from_millis(50);

fn topology() -> NetTopology {
    NetTopology {
        group: GROUP.into(),
        group_id: 43,
        tag_entries: 1,
        machines: vec![NetMachine {
            name: "web".into(),
            ip: WEB,
            host: "a".into(),
            outbound: true,
            writer: Some(WriterId(0)),
        }],
    }
}

/// client <-> dom0 <-> web; torn down on drop (namespaces last).
struct Site {
    dom0: Netns,
    web: Netns,
    client: Netns,
}

impl Site {
    fn build() -> Site {
        let (dom0, web, client) = (Netns::new("ld0"), Netns::new("lweb"), Netns::new("lcl"));
        for (ns, dev, net) in [(&web, "vweb", "10.1.1"), (&client, "vcl", "10.2.0")] {
            dom0.veth_to(dev, ns, "eth0");
            dom0.addr(dev, &format!("{net}.1/24"));
            ns.addr("eth0", &format!("{net}.2/24"));
            ns.ip(&format!("route add default via {net}.1"));
        }
        dom0.sysctl("net.ipv4.ip_forward", "1");
        Site { dom0, web, client }
    }
}

/// Datagrams sent by web every 10 ms; arrival times at the client.
struct Flow {
    stop: Arc<AtomicBool>,
    arrivals: Arc<Mutex<Vec<Instant>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Flow {
    fn start(site: &Site) -> Flow {
        let stop = Arc::new(AtomicBool::new(false));
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let rx = site
            .client
            .run(|| UdpSocket::bind((CLIENT, 6100)).expect("bind client"));
        rx.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let (s, a) = (stop.clone(), arrivals.clone());
        let recv = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) {
                if rx.recv(&mut buf).is_ok() {
                    a.lock().unwrap().push(Instant::now());
                }
            }
        });
        let s = stop.clone();
        let send = site.web.spawn(move || {
            let u = UdpSocket::bind((WEB, 0)).expect("bind web");
            while !s.load(Ordering::Relaxed) {
                let _ = u.send_to(b"reply", (CLIENT, 6100));
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Flow {
            stop,
            arrivals,
            threads: vec![recv, send],
        }
    }

    fn arrived_after(&self, t: Instant) -> usize {
        self.arrivals
            .lock()
            .unwrap()
            .iter()
            .filter(|&&a| a > t)
            .count()
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Instant {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    Instant::now()
}

/// What the scenario observed at the quorum loss.
struct Outcome {
    gate_closed_after: Duration,
    released_after_close: usize,
}

/// Runs the scenario; `wire_gate = false` is the injected fault.
fn scenario(wire_gate: bool) -> Outcome {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let _enter = rt.enter();
    let mut cluster = EtcdCluster::start_local("fence").expect("etcd cluster (Debian etcd-server)");
    let etcd = Arc::new(
        Etcd::new(&EtcdConfig {
            endpoints: cluster.endpoints(),
            tls: None,
            attempt_timeout: Duration::from_millis(200),
        })
        .expect("etcd client"),
    );
    let lease = LeaseConfig::new(LEASE_MS).unwrap();
    let records = GroupRecords::new(etcd.clone(), GROUP, "primary", LEASE_MS).unwrap();
    let (keeper, _events) = LeaseKeeper::start(records, lease, "primary", Ambition::Hold).unwrap();
    let gate: Arc<LeaseGate> = keeper.gate();

    let site = Site::build();
    let topo = topology();
    let limits = NetQueueLimits {
        max_packets: 65_536,
        ..NetQueueLimits::default()
    };
    let mut cfg = NetPathConfig::new(&topo, "a", limits);
    cfg.netns = Some(site.dom0.path());
    let links = pipecloud::netfilter::resolve_links(&topo, "a", Some(&site.dom0.path()))
        .expect("machine interfaces");
    cfg.links = links.clone();
    if wire_gate {
        cfg.lease_gate = Some(gate.clone());
    }
    let state = Arc::new(CausalState::new(1));
    let path = NetPath::start(&topo, state, cfg).expect("network path");
    let rules = RuleManager::new(
        &topo,
        RuleConfig {
            host: "a".into(),
            queues: QueuePlan::for_group(topo.group_id, 65_536),
            mtu: 1500,
            netns: Some(site.dom0.path()),
            kernel_tagger_mark: None,
            links,
        },
    )
    .expect("rule manager")
    .install()
    .expect("install rules");
    let flow = Flow::start(&site);

    // 1. Held lease: the flow passes.
    wait_until("lease acquired", Duration::from_secs(10), || gate.is_open());
    let t = Instant::now();
    wait_until("datagrams flow", Duration::from_secs(5), || {
        flow.arrived_after(t) >= 10
    });

    // 2. Quorum lost.
    let lost = Instant::now();
    cluster.kill(1);
    cluster.kill(2);
    let closed = wait_until("gate closed", Duration::from_millis(LEASE_MS + 500), || {
        !gate.is_open()
    });
    std::thread::sleep(Duration::from_millis(800));
    let outcome = Outcome {
        gate_closed_after: closed - lost,
        released_after_close: flow.arrived_after(closed + AFTER_CLOSE),
    };
    println!(
        "gate wired={wire_gate}: closed {:?} after the quorum was lost (lease {LEASE_MS} ms); \
         {} datagrams released after that; {}",
        outcome.gate_closed_after,
        outcome.released_after_close,
        path.metrics().snapshot()
    );

    if wire_gate && outcome.released_after_close == 0 {
        // 3. The quorum returns: the home site takes its own generation again.
        cluster.restart(1).expect("restart member");
        cluster.restart(2).expect("restart member");
        let t = Instant::now();
        wait_until("lease re-acquired", Duration::from_secs(20), || {
            gate.is_open()
        });
        wait_until("flow resumes", Duration::from_secs(5), || {
            flow.arrived_after(t) >= 10
        });
        assert_eq!(keeper.status().generation, 2, "{:?}", keeper.status());

        // 4. Another site's higher generation: fenced before the lease ends.
        let renewed = Instant::now();
        etcd.put(
            &format!("/pipecloud/group/{GROUP}/generation"),
            &encode_record(3, "backup"),
        )
        .expect("write a higher generation");
        let closed = wait_until(
            "fenced by generation 3",
            Duration::from_millis(LEASE_MS),
            || !gate.is_open(),
        );
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            flow.arrived_after(closed + AFTER_CLOSE),
            0,
            "released after fencing"
        );
        let st = keeper.status();
        println!(
            "fenced {:?} after generation 3 appeared: {st:?}",
            closed - renewed
        );
        assert_eq!((st.role, st.known_generation), ("fenced", 3));
    }
    drop(flow);
    rules.remove().expect("remove rules");
    rt.block_on(path.stop()).expect("stop network path");
    outcome
}

#[test]
fn lease_loss_stops_releases_and_higher_generation_fences() {
    let o = scenario(true);
    assert!(
        o.gate_closed_after <= Duration::from_millis(LEASE_MS),
        "{:?}",
        o.gate_closed_after
    );
    assert_eq!(o.released_after_close, 0, "a fenced site released packets");
}

/// The injected fault: the same network path without the gate keeps releasing
/// after the lease is gone, and the check above sees it.
#[test]
fn an_ungated_network_path_is_caught() {
    let o = scenario(false);
    assert!(
        o.released_after_close > 0,
        "the check cannot fail: nothing flowed after the close"
    );
}
