//! The lease against a real three-member etcd cluster (Debian `etcd-server`):
//! the records, the conditioned acquire, expiry, fencing by a higher
//! generation, and the gate closing within the lease time when the quorum is
//! lost. Nothing is mocked.

use pipecloud_core::lease::{Ambition, Event, FenceReason, LeaseConfig, Reply, Request};
use pipecloud_quorum::etcd::{Etcd, EtcdConfig};
use pipecloud_quorum::records::GroupRecords;
use pipecloud_quorum::testkit::EtcdCluster;
use pipecloud_quorum::LeaseKeeper;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn client(cluster: &EtcdCluster) -> Arc<Etcd> {
    let cfg = EtcdConfig {
        endpoints: cluster.endpoints(),
        tls: None,
        attempt_timeout: Duration::from_millis(1000),
    };
    Arc::new(Etcd::new(&cfg).expect("etcd client"))
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

/// Starts site `site`'s `Hold` keeper and waits until it is active; returns
/// it, its events and its activation.
fn start_active(
    etcd: &Arc<Etcd>,
    lease: LeaseConfig,
    site: &str,
) -> (LeaseKeeper, std::sync::mpsc::Receiver<Event>, Event) {
    let records = GroupRecords::new(etcd.clone(), "shop", site, lease.lease_ms).unwrap();
    let (keeper, events) = LeaseKeeper::start(records, lease, site, Ambition::Hold).unwrap();
    let gate = keeper.gate();
    wait_for("active", Duration::from_secs(10), || gate.is_open());
    let activated = events.recv().unwrap();
    (keeper, events, activated)
}

#[test]
fn acquire_is_conditioned_on_generation_and_lease() {
    let cluster = EtcdCluster::start_local("records").expect("etcd cluster");
    let etcd = client(&cluster);
    let mut a = GroupRecords::new(etcd.clone(), "shop", "a", 2000).unwrap();
    let mut b = GroupRecords::new(etcd.clone(), "shop", "b", 2000).unwrap();
    let Reply::Observed(obs) = a.execute(Request::Observe) else {
        panic!("observe failed")
    };
    assert_eq!((obs.generation, obs.holder), (None, None));
    assert_eq!(
        a.execute(Request::Acquire { expected: 0 }),
        Reply::Acquired { generation: 1 }
    );
    // b cannot take generation 1 while a's lease key exists, nor with a stale expectation.
    let Reply::AcquireLost(obs) = b.execute(Request::Acquire { expected: 1 }) else {
        panic!()
    };
    assert_eq!(obs.holder.as_deref(), Some("a"));
    assert!(matches!(
        b.execute(Request::Acquire { expected: 0 }),
        Reply::AcquireLost(_)
    ));
    assert_eq!(
        a.execute(Request::Renew),
        Reply::Renewed {
            alive: true,
            generation: 1
        }
    );
    // a resigns (revokes its lease): the key goes, the generation stays.
    a.resign().unwrap();
    let Reply::Observed(obs) = b.execute(Request::Observe) else {
        panic!()
    };
    assert_eq!(obs.holder, None);
    assert_eq!(
        obs.generation.as_ref().map(|g| (g.number, g.site.as_str())),
        Some((1, "a"))
    );
    assert!(matches!(
        b.execute(Request::Acquire { expected: 0 }),
        Reply::AcquireLost(_)
    ));
    assert_eq!(
        b.execute(Request::Acquire { expected: 1 }),
        Reply::Acquired { generation: 2 }
    );
    // a's decisions are refused from now on; b's run.
    let op = [pipecloud_quorum::etcd::Op::Put {
        key: "/pipecloud/group/shop/degraded".into(),
        value: b"1".to_vec(),
        lease: 0,
    }];
    assert!(!a.decide(&op).unwrap());
    assert!(b.decide(&op).unwrap());
    // One member down: the others still answer.
    let mut cluster = cluster;
    cluster.kill(0);
    assert_eq!(
        b.execute(Request::Renew),
        Reply::Renewed {
            alive: true,
            generation: 2
        }
    );
}

#[test]
fn keeper_fences_on_quorum_loss_and_backup_takes_over() {
    let mut cluster = EtcdCluster::start_local("keeper").expect("etcd cluster");
    let etcd = client(&cluster);
    let lease = LeaseConfig::new(2000).unwrap();
    let (keeper_a, events_a, activated) = start_active(&etcd, lease, "a");
    let gate_a = keeper_a.gate();
    assert!(matches!(
        activated,
        Event::Activated {
            generation: 1,
            previous: None
        }
    ));
    // Renewals keep the gate open well past one lease.
    std::thread::sleep(Duration::from_millis(3 * lease.lease_ms));
    assert!(
        gate_a.is_open(),
        "renewals must keep the lease: {:?}",
        keeper_a.status()
    );
    assert_eq!(keeper_a.status().role, "active");

    // The quorum is lost (two of three members down): a's gate must close
    // within the lease time, on its own clock.
    let lost = Instant::now();
    cluster.kill(1);
    cluster.kill(2);
    let took = wait_for(
        "a fenced",
        Duration::from_millis(lease.lease_ms + 500),
        || !gate_a.is_open(),
    );
    println!(
        "gate closed {took:?} after the quorum was lost (lease {} ms)",
        lease.lease_ms
    );
    assert!(lost.elapsed() <= Duration::from_millis(lease.lease_ms + 500));
    assert!(matches!(
        events_a.recv_timeout(Duration::from_secs(2)).unwrap(),
        Event::Fenced {
            generation: 1,
            reason: FenceReason::Expired
        }
    ));
    assert_eq!(keeper_a.status().role, "fenced");
    drop(keeper_a); // the primary site is gone for good (the disaster)

    // The quorum returns; the backup's controller takes over once, with generation 2.
    cluster.restart(1).unwrap();
    cluster.restart(2).unwrap();
    let b = GroupRecords::new(etcd.clone(), "shop", "b", lease.lease_ms).unwrap();
    let (keeper_b, events_b) =
        LeaseKeeper::start(b, lease, "b", Ambition::TakeOverOnExpiry).unwrap();
    let ev = events_b
        .recv_timeout(Duration::from_secs(20))
        .expect("b takes over");
    let Event::Activated {
        generation: 2,
        previous: Some(prev),
    } = ev
    else {
        panic!("{ev:?}")
    };
    assert_eq!((prev.number, prev.site.as_str()), (1, "a"));
    assert!(keeper_b.gate().is_open());

    // The old primary comes back: it sees generation 2 and never opens its gate.
    let a = GroupRecords::new(etcd.clone(), "shop", "a", lease.lease_ms).unwrap();
    let (keeper_a, _events) = LeaseKeeper::start(a, lease, "a", Ambition::Hold).unwrap();
    std::thread::sleep(Duration::from_millis(2 * lease.lease_ms));
    assert!(!keeper_a.gate().is_open());
    assert_eq!(keeper_a.status().known_generation, 2);
    assert!(events_b.try_recv().is_err(), "the takeover fires once");
}

#[test]
fn higher_generation_fences_the_holder_before_its_deadline() {
    let cluster = EtcdCluster::start_local("fence").expect("etcd cluster");
    let etcd = client(&cluster);
    let lease = LeaseConfig::new(3000).unwrap();
    let a = GroupRecords::new(etcd.clone(), "shop", "a", lease.lease_ms).unwrap();
    let (keeper_a, events_a) = LeaseKeeper::start(a, lease, "a", Ambition::Hold).unwrap();
    wait_for("a active", Duration::from_secs(10), || {
        keeper_a.gate().is_open()
    });
    let _ = events_a.recv();
    // An operator (or a buggy peer) records generation 2 for another site.
    etcd.put(
        "/pipecloud/group/shop/generation",
        &pipecloud_quorum::records::encode_record(2, "b"),
    )
    .unwrap();
    let took = wait_for("a fenced", Duration::from_millis(lease.lease_ms), || {
        !keeper_a.gate().is_open()
    });
    println!("fenced {took:?} after a higher generation was recorded");
    assert!(matches!(
        events_a.recv_timeout(Duration::from_secs(1)).unwrap(),
        Event::Fenced {
            generation: 1,
            reason: FenceReason::Superseded { by: 2 }
        }
    ));
}

/// The switch-back's generation bump (docs/design.md §15): refused while the
/// active site holds the lease and for a site that is not the generation's;
/// once the active site resigned, one transaction gives the next generation to
/// the home site, whose keeper (`Hold`) then acquires and whose old holder
/// could not re-acquire.
#[test]
fn hand_over_needs_the_generation_and_no_lease() {
    let cluster = EtcdCluster::start_local("handover").expect("etcd cluster");
    let etcd = client(&cluster);
    let mut b = GroupRecords::new(etcd.clone(), "shop", "b", 2000).unwrap();
    let a = GroupRecords::new(etcd.clone(), "shop", "a", 2000).unwrap();
    // b is the active site (it took generation 1, e.g. after a failover).
    assert_eq!(
        b.execute(Request::Acquire { expected: 0 }),
        Reply::Acquired { generation: 1 }
    );
    assert_eq!(
        b.hand_over("a").unwrap(),
        None,
        "handed over under a held lease"
    );
    b.resign().unwrap();
    assert_eq!(
        a.hand_over("b").unwrap(),
        None,
        "a site handed over what it does not hold"
    );
    assert_eq!(b.hand_over("b").unwrap(), None);
    assert_eq!(b.hand_over("a").unwrap(), Some(2));
    assert_eq!(b.hand_over("a").unwrap(), None, "handed over twice");
    // The home site's keeper acquires the next generation; b's would not.
    let lease = LeaseConfig::new(2000).unwrap();
    let (keeper_a, events_a) = LeaseKeeper::start(a, lease, "a", Ambition::Hold).unwrap();
    wait_for("a active", Duration::from_secs(10), || {
        keeper_a.gate().is_open()
    });
    assert!(matches!(
        events_a.recv_timeout(Duration::from_secs(1)).unwrap(),
        Event::Activated { generation: 3, .. }
    ));
}

/// A planned stop (docs/design.md §7): the holder's keeper resigns, its gate
/// closes before the revoke, the lease key is gone at once while the
/// generation stays, and the other site's keeper acquires without waiting out
/// the lease (20 s here: the takeover must come well before it could lapse).
/// The resigned keeper never acquires again, though the lease key is absent
/// and, after a second resign, the generation is its own.
#[test]
fn resign_lets_the_other_site_acquire_without_waiting_out_the_lease() {
    let cluster = EtcdCluster::start_local("resign").expect("etcd cluster");
    let etcd = client(&cluster);
    let lease = LeaseConfig::new(20_000).unwrap();
    let (keeper_a, events_a, activated) = start_active(&etcd, lease, "a");
    let gate_a = keeper_a.gate();
    assert!(matches!(activated, Event::Activated { generation: 1, .. }));
    let b = GroupRecords::new(etcd.clone(), "shop", "b", lease.lease_ms).unwrap();
    let (keeper_b, events_b) =
        LeaseKeeper::start(b, lease, "b", Ambition::TakeOverOnExpiry).unwrap();
    let gate_b = keeper_b.gate();
    let watcher = GroupRecords::new(etcd.clone(), "shop", "w", lease.lease_ms).unwrap();
    // While a holds the lease, b only watches.
    std::thread::sleep(Duration::from_millis(lease.renew_every_ms + 500));
    assert!(!gate_b.is_open() && gate_a.is_open());

    assert!(keeper_a.resign(), "the revoke was not confirmed");
    assert!(!gate_a.is_open(), "the gate is open after the resign");
    let obs = watcher.observe().unwrap();
    assert_eq!(obs.holder, None, "the lease key outlived the resign");
    assert_eq!(
        obs.generation.map(|g| (g.number, g.site)),
        Some((1, "a".to_string())),
        "the generation must stay"
    );
    let st = keeper_a.status();
    assert_eq!(st.role, "fenced");
    assert_eq!(st.fence_reason.as_deref(), Some("resigned (planned stop)"));
    assert!(matches!(
        events_a.recv_timeout(Duration::from_secs(1)).unwrap(),
        Event::Fenced {
            generation: 1,
            reason: FenceReason::Resigned
        }
    ));

    // b observes every renew interval (5 s): it takes over long before the
    // 20 s lease could have lapsed.
    let took = wait_for(
        "b acquires after a's resign",
        Duration::from_millis(lease.lease_ms - lease.margin_ms),
        || gate_b.is_open(),
    );
    assert!(matches!(
        events_b.recv_timeout(Duration::from_secs(1)).unwrap(),
        Event::Activated {
            generation: 2,
            previous: Some(ref p)
        } if p.number == 1 && p.site == "a"
    ));
    println!(
        "resign: b active {:.3} s after a's resign (lease {} s)",
        took.as_secs_f64(),
        lease.lease_ms / 1000
    );

    // b resigns too, then hands the generation back to a (as a switch-back
    // does): a's resigned keeper still never acquires; a fresh one does.
    assert!(keeper_b.resign());
    assert!(!gate_b.is_open());
    let b2 = GroupRecords::new(etcd.clone(), "shop", "b", lease.lease_ms).unwrap();
    assert_eq!(b2.hand_over("a").unwrap(), Some(3));
    std::thread::sleep(Duration::from_millis(lease.renew_every_ms + 500));
    assert!(!gate_a.is_open(), "a resigned keeper acquired again");
    assert_eq!(watcher.observe().unwrap().holder, None);
    drop(keeper_a);
    let (keeper_a2, _events, _) = start_active(&etcd, lease, "a");
    assert_eq!(keeper_a2.status().generation, 4);
}
