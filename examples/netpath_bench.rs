//! Benchmarks of the NFQUEUE network path on emulated hosts (needs root).
//!
//! ```text
//! cargo run --release --example netpath_bench            # everything (~1 min)
//! cargo run --release --example netpath_bench -- latency # or: throughput
//! ```
//!
//! Builds fresh namespaces per scenario (same model as `tests/netns_nfq.rs`:
//! web and app on dom0-a, db on dom0-b, client off dom0-a) and prints:
//!
//! - **latency**: TCP request/response with 1-byte messages (TCP_NODELAY),
//!   mean / p50 / p99 round trip, for: no queue, accept-all (a bare NFQUEUE
//!   accept loop on the same driver), tag (full network path, both hosts,
//!   non-zero vectors), and hold with immediate release (committed already
//!   dominates). "Added per traversal" divides the extra round-trip time by the
//!   queue traversals of one round trip (4 between hosts: tag + strip each way;
//!   1 for the client: only web -> client is queued).
//! - **throughput**: one TCP stream for a few seconds through each path, with and
//!   without GSO where the path allows it (the tag queue never takes GSO
//!   packets, see `pipecloud::netfilter`, "GSO").
//!
//! The machine has 2 cores shared by sender, receiver and agent: figures are
//! indicative, run-to-run variance is large.

#[path = "../tests/support/netns.rs"]
mod netns;

use netns::Netns;
use pipecloud::causal::CausalState;
use pipecloud::core::netqueue::NetQueueLimits;
use pipecloud::core::{CountVector, WriterId};
use pipecloud::netfilter::{
    NetMachine, NetTopology, QueuePlan, RuleConfig, RuleManager, RulesGuard,
};
use pipecloud::netpath::{NetPath, NetPathConfig, LOW_LATENCY_BUSY_POLL};
use pipecloud::nfq::{proto, NfqSocket, QueueConfig, Received, Verdict};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WEB: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 2);
const DB: Ipv4Addr = Ipv4Addr::new(10, 1, 2, 2);
const APP: Ipv4Addr = Ipv4Addr::new(10, 1, 3, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 2);
const ROUND_TRIPS: usize = 20_000;
const WARMUP: usize = 1_000;
const BULK_SECS: u64 = 3;
/// MTU of the jumbo-frame tagger run.
const JUMBO_MTU: u16 = 9000;
/// Queue of the accept-all baseline (outside every group block used here).
const ACCEPT_ALL_QUEUE: u16 = 60_000;

fn topology() -> NetTopology {
    let m = |name: &str, ip, host: &str, outbound, writer| NetMachine {
        name: name.into(),
        ip,
        host: host.into(),
        outbound,
        writer,
    };
    NetTopology {
        group: "bench".into(),
        group_id: 9,
        tag_entries: 2,
        machines: vec![
            m("web", WEB, "a", true, Some(WriterId(0))),
            m("db", DB, "b", false, Some(WriterId(1))),
            m("app", APP, "a", false, None),
        ],
    }
}

struct Site {
    rules: Vec<RulesGuard>,
    extra_rules: Vec<(Arc<Netns>, String)>,
    client: Arc<Netns>,
    web: Arc<Netns>,
    app: Arc<Netns>,
    db: Arc<Netns>,
    dom0a: Arc<Netns>,
    dom0b: Arc<Netns>,
}

impl Drop for Site {
    fn drop(&mut self) {
        self.rules.clear();
        for (ns, rule) in &self.extra_rules {
            let _ = ns
                .command("iptables")
                .args(["-t", "mangle", "-D"])
                .args(rule.split_whitespace())
                .output();
        }
    }
}

impl Site {
    fn build() -> Site {
        let dom0a = Netns::new("d0a");
        let dom0b = Netns::new("d0b");
        let web = Netns::new("web");
        let app = Netns::new("app");
        let db = Netns::new("db");
        let client = Netns::new("cl");
        let link = |dom0: &Netns, dev: &str, guest: &Netns, net: &str| {
            dom0.veth_to(dev, guest, "eth0");
            dom0.addr(dev, &format!("{net}.1/24"));
            guest.addr("eth0", &format!("{net}.2/24"));
            guest.ip(&format!("route add default via {net}.1"));
        };
        link(&dom0a, "vweb", &web, "10.1.1");
        link(&dom0a, "vapp", &app, "10.1.3");
        link(&dom0a, "vcl", &client, "10.2.0");
        link(&dom0b, "vdb", &db, "10.1.2");
        dom0a.veth_to("wire", &dom0b, "wire");
        dom0a.addr("wire", "10.0.0.1/30");
        dom0b.addr("wire", "10.0.0.2/30");
        dom0a.ip("route add 10.1.2.0/24 via 10.0.0.2");
        dom0b.ip("route add default via 10.0.0.1");
        for d in [&dom0a, &dom0b] {
            d.sysctl("net.ipv4.ip_forward", "1");
        }
        Site {
            rules: Vec::new(),
            extra_rules: Vec::new(),
            client: Arc::new(client),
            web: Arc::new(web),
            app: Arc::new(app),
            db: Arc::new(db),
            dom0a: Arc::new(dom0a),
            dom0b: Arc::new(dom0b),
        }
    }

    fn dom0(&self, host: &str) -> &Arc<Netns> {
        if host == "a" {
            &self.dom0a
        } else {
            &self.dom0b
        }
    }

    /// Starts the full network path of `host` and installs its rules.
    fn agent(&mut self, host: &str, state: Arc<CausalState>, gso: bool) -> NetPath {
        self.agent_mtu(host, state, gso, 1500, Duration::ZERO, false)
    }

    /// Starts `host`'s network path with the kernel tagger (eBPF) doing the
    /// cross-host tagging and stripping.
    fn kernel_agent(&mut self, host: &str, state: Arc<CausalState>) -> NetPath {
        self.agent_mtu(host, state, true, 1500, Duration::ZERO, true)
    }

    /// Makes web's stack send single segments (no GSO/TSO super-packets).
    fn no_gso(&self) {
        self.web.ip("link set dev eth0 gso_max_segs 1");
    }

    /// Jumbo frames on every link of the web-db path (web, wire, db).
    fn jumbo(&self) {
        let mtu = JUMBO_MTU.to_string();
        for (ns, dev) in [
            (&self.web, "eth0"),
            (&self.dom0a, "vweb"),
            (&self.dom0a, "wire"),
            (&self.dom0b, "wire"),
            (&self.dom0b, "vdb"),
            (&self.db, "eth0"),
        ] {
            ns.ip(&format!("link set dev {dev} mtu {mtu}"));
        }
    }

    fn agent_mtu(
        &mut self,
        host: &str,
        state: Arc<CausalState>,
        gso: bool,
        mtu: u16,
        busy_poll: Duration,
        kernel: bool,
    ) -> NetPath {
        let topo = topology();
        let mut cfg = NetPathConfig::new(&topo, host, NetQueueLimits::default());
        cfg.netns = Some(self.dom0(host).path());
        cfg.gso = gso;
        cfg.busy_poll = busy_poll;
        let mark = kernel.then_some(pipecloud::ebpf::DEFAULT_HANDLED_MARK);
        cfg.kernel_tagger = mark;
        let np = NetPath::start(&topo, state, cfg).expect("start network path");
        let rm = RuleManager::new(
            &topo,
            RuleConfig {
                host: host.into(),
                queues: QueuePlan::for_group(topo.group_id, 65_536),
                mtu,
                netns: Some(self.dom0(host).path()),
                kernel_tagger_mark: mark,
                links: pipecloud::netfilter::resolve_links(
                    &topo,
                    host,
                    Some(&self.dom0(host).path()),
                )
                .expect("machine interfaces"),
            },
        )
        .expect("rules");
        self.rules.push(rm.install().expect("install rules"));
        np
    }

    /// Queues every forwarded packet of `host` to a bare accept loop.
    fn accept_all(&mut self, host: &str) -> tokio::task::JoinHandle<()> {
        let mut cfg = QueueConfig::new(vec![ACCEPT_ALL_QUEUE]);
        cfg.netns = Some(self.dom0(host).path());
        let sock = NfqSocket::open(&cfg).expect("open accept-all queue");
        self.accept_all_rule(host);
        tokio::spawn(async move {
            let mut buf = vec![0u8; pipecloud::nfq::RECV_BUF_LEN];
            let mut out = Vec::new();
            loop {
                out.clear();
                let Ok(r) = sock.recv(&mut buf).await else {
                    return;
                };
                if accept_burst(&sock, &mut buf, r, &mut out).is_err() {
                    return;
                }
            }
        })
    }
}

impl Site {
    fn accept_all_rule(&mut self, host: &str) {
        let rule = format!("FORWARD -j NFQUEUE --queue-num {ACCEPT_ALL_QUEUE}");
        let ns = self.dom0(host).clone();
        let out = ns
            .command("iptables")
            .args(["-t", "mangle", "-I"])
            .args(rule.split_whitespace())
            .output()
            .expect("iptables");
        assert!(out.status.success(), "accept-all rule");
        self.extra_rules.push((ns, rule));
    }

    /// Accept-all loop on a dedicated OS thread that busy-polls like the
    /// network path's driver: after each datagram it keeps polling up to
    /// `spin` before it sleeps in `poll(2)`.
    fn accept_all_thread(&mut self, host: &str, spin: Duration) -> ThreadLoop {
        let mut cfg = QueueConfig::new(vec![ACCEPT_ALL_QUEUE]);
        cfg.netns = Some(self.dom0(host).path());
        let sock = NfqSocket::open_unregistered(&cfg).expect("open accept-all queue");
        self.accept_all_rule(host);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let mut buf = vec![0u8; pipecloud::nfq::RECV_BUF_LEN];
            let mut out = Vec::new();
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                out.clear();
                let mut got = match sock.try_recv(&mut buf) {
                    Ok(Some(r)) => Some(r),
                    Ok(None) => None,
                    Err(_) => return,
                };
                if got.is_none() && !spin.is_zero() {
                    let t0 = Instant::now();
                    while t0.elapsed() < spin {
                        if let Ok(Some(r)) = sock.try_recv(&mut buf) {
                            got = Some(r);
                            break;
                        }
                        std::hint::spin_loop();
                    }
                }
                let Some(r) = got else {
                    let mut pfd = libc::pollfd {
                        fd: sock.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut pfd, 1, 100) };
                    continue;
                };
                if accept_burst(&sock, &mut buf, r, &mut out).is_err() {
                    return;
                }
            }
        });
        ThreadLoop {
            stop,
            handle: Some(handle),
        }
    }
}

/// A thread that keeps one core busy until dropped.
struct Spinner {
    _running: ThreadLoop,
}

impl Spinner {
    fn start() -> Spinner {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        Spinner {
            _running: ThreadLoop {
                stop,
                handle: Some(handle),
            },
        }
    }
}

struct ThreadLoop {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ThreadLoop {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Accepts every packet of `first` and of up to 63 more datagrams that are
/// ready, in one verdict `sendmsg`.
fn accept_burst(
    sock: &NfqSocket,
    buf: &mut [u8],
    first: Received,
    out: &mut Vec<u8>,
) -> Result<(), pipecloud::nfq::NfqError> {
    let mut r = first;
    for _ in 0..64 {
        if let Received::Datagram(n) = r {
            for m in proto::messages(&buf[..n]).flatten() {
                if let proto::Message::Packet(p) = m {
                    proto::build_verdict(out, p.queue, p.id, Verdict::Accept);
                }
            }
        }
        match sock.try_recv(buf) {
            Ok(Some(next)) => r = next,
            _ => break,
        }
    }
    sock.send(out)
}

fn v(x: &[u64]) -> CountVector {
    CountVector::from_slice(x)
}

struct Rtt {
    mean: f64,
    p50: f64,
    p99: f64,
}

/// 1-byte request/response between `client_ns` and a server at `server` in `server_ns`.
fn request_response(client_ns: &Netns, server_ns: &Netns, server: SocketAddr) -> Rtt {
    let (tx, rx) = std::sync::mpsc::channel();
    let srv = server_ns.spawn(move || {
        let l = TcpListener::bind(server).expect("bind");
        tx.send(()).unwrap();
        let (mut s, _) = l.accept().expect("accept");
        s.set_nodelay(true).unwrap();
        let mut b = [0u8; 1];
        while s.read_exact(&mut b).is_ok() {
            if s.write_all(&b).is_err() {
                break;
            }
        }
    });
    rx.recv().unwrap();
    let mut samples = client_ns.run(move || {
        let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(10)).expect("connect");
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [7u8; 1];
        let mut out = Vec::with_capacity(ROUND_TRIPS);
        for i in 0..WARMUP + ROUND_TRIPS {
            let t = Instant::now();
            s.write_all(&b).expect("write");
            s.read_exact(&mut b).expect("read");
            if i >= WARMUP {
                out.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        out
    });
    let _ = srv.join();
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    Rtt {
        mean: samples.iter().sum::<f64>() / samples.len() as f64,
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

/// One TCP stream from `client_ns` to `server` for BULK_SECS; returns Gb/s at the receiver.
fn bulk(client_ns: &Netns, server_ns: &Netns, server: SocketAddr) -> f64 {
    let (tx, rx) = std::sync::mpsc::channel();
    let srv = server_ns.spawn(move || {
        let l = TcpListener::bind(server).expect("bind");
        tx.send(()).unwrap();
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        let mut start = None;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    start.get_or_insert_with(Instant::now);
                    total += n as u64;
                }
            }
        }
        (total, start.map_or(Duration::ZERO, |t| t.elapsed()))
    });
    rx.recv().unwrap();
    client_ns.run(move || {
        let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(10)).expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let chunk = vec![0x5au8; 256 << 10];
        let end = Instant::now() + Duration::from_secs(BULK_SECS);
        while Instant::now() < end {
            if s.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let (bytes, took) = srv.join().expect("server");
    bytes as f64 * 8.0 / took.as_secs_f64().max(1e-9) / 1e9
}

fn states() -> (Arc<CausalState>, Arc<CausalState>) {
    let machines = topology().machines.len();
    let (a, b) = (
        Arc::new(CausalState::new(machines)),
        Arc::new(CausalState::new(machines)),
    );
    for _ in 0..5 {
        a.issue_write(0, WriterId(0)); // web: [5]
    }
    for _ in 0..3 {
        b.issue_write(1, WriterId(1)); // db: [0,3]
    }
    (a, b)
}

fn print_rtt(name: &str, r: &Rtt, base: Option<(&Rtt, f64)>) {
    let added = base.map_or(String::new(), |(b, traversals)| {
        format!(
            "   added/traversal: mean {:5.1} us, p50 {:5.1} us",
            (r.mean - b.mean) / traversals,
            (r.p50 - b.p50) / traversals
        )
    });
    println!(
        "  {name:<40} mean {:7.1} us  p50 {:7.1} us  p99 {:7.1} us{added}",
        r.mean, r.p50, r.p99
    );
}

fn latency(rt: &tokio::runtime::Runtime) {
    let _e = rt.enter();
    println!("latency: TCP 1-byte request/response, {ROUND_TRIPS} round trips");
    let db = SocketAddr::from((DB, 5001));
    let client = SocketAddr::from((CLIENT, 5001));

    let site = Site::build();
    let base_hosts = request_response(&site.web, &site.db, db);
    print_rtt("web<->db, no queue", &base_hosts, None);
    let base_client = request_response(&site.web, &site.client, client);
    print_rtt("web<->client, no queue", &base_client, None);
    drop(site);

    let mut site = Site::build();
    let ta = site.accept_all("a");
    let tb = site.accept_all("b");
    let r = request_response(&site.web, &site.db, db);
    print_rtt("web<->db, accept-all (4/RTT)", &r, Some((&base_hosts, 4.0)));
    ta.abort();
    tb.abort();
    drop(site);

    let mut site = Site::build();
    let ta = site.accept_all("a");
    let r = request_response(&site.web, &site.client, client);
    print_rtt(
        "web<->client, accept-all (2/RTT)",
        &r,
        Some((&base_client, 2.0)),
    );
    ta.abort();
    drop(site);

    let mut site = Site::build();
    let t = site.accept_all_thread("a", LOW_LATENCY_BUSY_POLL);
    let r = request_response(&site.web, &site.client, client);
    print_rtt(
        "web<->client, accept-all busy-poll",
        &r,
        Some((&base_client, 2.0)),
    );
    drop(t);
    drop(site);

    // Busy polling also keeps a vCPU from going idle, which speeds up the
    // rest of the stack: this baseline spins a core without any queue, so
    // "added vs busy" is what the queue itself costs.
    let site = Site::build();
    let spinner = Spinner::start();
    let busy_hosts = request_response(&site.web, &site.db, db);
    print_rtt("web<->db, no queue, 1 core spinning", &busy_hosts, None);
    let busy_client = request_response(&site.web, &site.client, client);
    print_rtt(
        "web<->client, no queue, 1 core spinning",
        &busy_client,
        None,
    );
    drop(spinner);
    drop(site);

    // The kernel tagger: tag and strip in eBPF, no queue traversal (the
    // agent's default). Its driver sleeps; it only merges new tags.
    let mut site = Site::build();
    let (sa, sb) = states();
    let pa = site.kernel_agent("a", sa);
    let pb = site.kernel_agent("b", sb);
    let r = request_response(&site.web, &site.db, db);
    print_rtt(
        "web<->db, kernel tag+strip (4/RTT)",
        &r,
        Some((&base_hosts, 4.0)),
    );
    print_kernel(&pa, &pb);
    let _ = rt.block_on(async { (pa.stop().await, pb.stop().await) });
    drop(site);

    let mut site = Site::build();
    let (sa, _) = states();
    sa.publish_committed(&v(&[5])); // committed covers web: nothing to hold
    let pa = site.kernel_agent("a", sa);
    let r = request_response(&site.web, &site.client, client);
    print_rtt(
        "web<->client, kernel hold check (1/RTT)",
        &r,
        Some((&base_client, 1.0)),
    );
    let m = pa.metrics().snapshot();
    let k = m.kernel.unwrap_or_default();
    println!(
        "    (passed in the kernel {}, to the hold queue {}, released at once there {})",
        k.hold_passed, k.hold_queued, m.released_immediately
    );
    let _ = rt.block_on(pa.stop());
    drop(site);

    // The agent's default driver sleeps between packets; busy polling
    // (`busy_poll_us = 50`) trades CPU for latency.
    for (how, busy_poll) in [("", Duration::ZERO), (", busy-poll", LOW_LATENCY_BUSY_POLL)] {
        let mut site = Site::build();
        let (sa, sb) = states();
        let pa = site.agent_mtu("a", sa, true, 1500, busy_poll, false);
        let pb = site.agent_mtu("b", sb, true, 1500, busy_poll, false);
        let r = request_response(&site.web, &site.db, db);
        print_rtt(
            &format!("web<->db, tag+strip{how} (4/RTT)"),
            &r,
            Some((&base_hosts, 4.0)),
        );
        print_rtt("  vs 1 core spinning", &r, Some((&busy_hosts, 4.0)));
        let (ma, mb) = (pa.metrics().snapshot(), pb.metrics().snapshot());
        println!(
            "    (a: tagged {} merged {}; b: tagged {} merged {})",
            ma.tagged, ma.merged, mb.tagged, mb.merged
        );
        let _ = rt.block_on(async { (pa.stop().await, pb.stop().await) });
        drop(site);

        let mut site = Site::build();
        let (sa, _) = states();
        sa.publish_committed(&v(&[5])); // committed covers web: immediate release
        let pa = site.agent_mtu("a", sa, true, 1500, busy_poll, false);
        let r = request_response(&site.web, &site.client, client);
        print_rtt(
            &format!("web<->client, hold+release{how} (1/RTT)"),
            &r,
            Some((&base_client, 1.0)),
        );
        print_rtt("  vs 1 core spinning", &r, Some((&busy_client, 1.0)));
        let m = pa.metrics().snapshot();
        println!(
            "    (released at once {}, held {})",
            m.released_immediately, m.held_total
        );
        let _ = rt.block_on(pa.stop());
    }
}

fn throughput(rt: &tokio::runtime::Runtime) {
    let _e = rt.enter();
    println!("throughput: one TCP stream, {BULK_SECS} s");
    let db = SocketAddr::from((DB, 5002));
    let app = SocketAddr::from((APP, 5002));
    let client = SocketAddr::from((CLIENT, 5002));

    let site = Site::build();
    println!(
        "  web->db, no queue                  {:6.2} Gb/s",
        bulk(&site.web, &site.db, db)
    );
    println!(
        "  web->app, no queue                 {:6.2} Gb/s",
        bulk(&site.web, &site.app, app)
    );
    println!(
        "  web->client, no queue              {:6.2} Gb/s",
        bulk(&site.web, &site.client, client)
    );
    site.no_gso();
    println!(
        "  web->db, no queue, no GSO          {:6.2} Gb/s",
        bulk(&site.web, &site.db, db)
    );
    drop(site);

    let mut site = Site::build();
    let (sa, sb) = states();
    let pa = site.agent("a", sa, true);
    let pb = site.agent("b", sb, true);
    let g = bulk(&site.web, &site.db, db);
    let (ma, mb) = (pa.metrics().snapshot(), pb.metrics().snapshot());
    println!(
        "  web->db, tag+strip (segmented)     {g:6.2} Gb/s   (tagged {}, stripped {}, tag failures {})",
        ma.tagged,
        mb.stripped,
        ma.tag_failures + mb.tag_failures
    );
    let _ = rt.block_on(async { (pa.stop().await, pb.stop().await) });
    drop(site);

    for gso in [true, false] {
        let mut site = Site::build();
        if !gso {
            site.no_gso();
        }
        let (sa, sb) = states();
        let pa = site.kernel_agent("a", sa);
        let pb = site.kernel_agent("b", sb);
        let g = bulk(&site.web, &site.db, db);
        let label = if gso { "GSO" } else { "no GSO" };
        println!("  web->db, kernel tag+strip, {label:<7} {g:6.2} Gb/s");
        print_kernel(&pa, &pb);
        let _ = rt.block_on(async { (pa.stop().await, pb.stop().await) });
        drop(site);
    }

    // The tag queue's cost is per packet: with jumbo frames on the web-db path
    // (common inside a data centre) each queued packet carries 6x the data.
    let mut site = Site::build();
    site.jumbo();
    let (sa, sb) = states();
    let pa = site.agent_mtu("a", sa, true, JUMBO_MTU, Duration::ZERO, false);
    let pb = site.agent_mtu("b", sb, true, JUMBO_MTU, Duration::ZERO, false);
    let g = bulk(&site.web, &site.db, db);
    let (ma, mb) = (pa.metrics().snapshot(), pb.metrics().snapshot());
    println!(
        "  web->db, tag+strip, MTU {JUMBO_MTU}        {g:6.2} Gb/s   (tagged {}, stripped {}, tag failures {})",
        ma.tagged,
        mb.stripped,
        ma.tag_failures + mb.tag_failures
    );
    let _ = rt.block_on(async { (pa.stop().await, pb.stop().await) });
    drop(site);

    for gso in [true, false] {
        let label = if gso { "GSO" } else { "no GSO" };
        let mut site = Site::build();
        let (sa, _) = states();
        sa.publish_committed(&v(&[5]));
        let pa = site.agent("a", sa, gso);
        let g = bulk(&site.web, &site.app, app);
        let m = pa.metrics().snapshot();
        println!(
            "  web->app, local merge, {label:<7}     {g:6.2} Gb/s   ({} verdicts)",
            m.merged_local
        );
        let g = bulk(&site.web, &site.client, client);
        let m = pa.metrics().snapshot();
        println!(
            "  web->client, hold+release, {label:<7} {g:6.2} Gb/s   ({} verdicts, drops {})",
            m.released_immediately + m.released,
            m.hold_full_drops + m.nfq_queue_dropped + m.nfq_user_dropped
        );
        let _ = rt.block_on(pa.stop());
    }
}

/// The kernel taggers' counters of both hosts.
fn print_kernel(pa: &NetPath, pb: &NetPath) {
    let (ma, mb) = (pa.metrics().snapshot(), pb.metrics().snapshot());
    let (ka, kb) = (ma.kernel.unwrap_or_default(), mb.kernel.unwrap_or_default());
    println!(
        "    (kernel a: tagged {} stripped {} fallbacks {}; b: tagged {} stripped {} records {} fallbacks {}; tag queue a+b: {} packets, {} tag failures)",
        ka.tagged,
        ka.stripped,
        ka.fallbacks,
        kb.tagged,
        kb.stripped,
        kb.records,
        kb.fallbacks,
        ma.tagged + ma.merged + ma.untagged_zero + ma.pure_acks_untagged + mb.tagged + mb.merged + mb.untagged_zero + mb.pure_acks_untagged,
        ma.tag_failures + mb.tag_failures
    );
}

fn main() {
    let what = std::env::args().nth(1).unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if what.is_empty() || what == "latency" {
        latency(&rt);
    }
    if what.is_empty() || what == "throughput" {
        throughput(&rt);
    }
}
