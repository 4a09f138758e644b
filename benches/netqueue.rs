//! Netqueue throughput: push 10k client-bound packets over 64 flows with
//! increasing tags (all held), then release them in 100 committed-vector
//! updates. Reported per packet (push + release) for vectors with 1, 4 and 16
//! non-zero entries.
//!
//! Run: `cargo bench --bench netqueue`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pipecloud_core::netqueue::{FlowId, NetQueue, NetQueueLimits, Push};
use pipecloud_core::{CountVector, Seq};
use std::hint::black_box;
use std::time::Duration;

const PACKETS: u64 = 10_000;
const FLOWS: u64 = 64;
const UPDATES: u64 = 100;

/// Tag of packet `p` with `width` entries: entry `j` grows at rate `1/(j+1)`.
fn tag(p: u64, width: usize) -> CountVector {
    let mut t = CountVector::ZERO;
    for j in 0..width {
        t.set(j, p / (j as Seq + 1) + 1);
    }
    t
}

/// Committed vector after update `u` of `UPDATES`: the last one covers every tag.
fn committed(u: u64, width: usize) -> CountVector {
    let upto = u * (PACKETS / UPDATES);
    let mut c = CountVector::ZERO;
    for j in 0..width {
        c.set(j, upto / (j as Seq + 1) + 1);
    }
    c
}

fn run(width: usize, tags: &[CountVector], updates: &[CountVector], out: &mut Vec<u64>) -> usize {
    let mut q = NetQueue::new(NetQueueLimits {
        max_packets: 1 << 16,
        max_bytes: 1 << 30,
    });
    let zero = CountVector::ZERO;
    for (p, t) in tags.iter().enumerate() {
        let p = p as u64;
        let r = q.push(FlowId(p % FLOWS), t, 1500, p, &zero);
        debug_assert!(matches!(r, Push::Held));
        black_box(r);
    }
    out.clear();
    let mut released = 0;
    for c in updates {
        released += q.release(c, out);
    }
    assert_eq!(released as u64, PACKETS, "width {width}: not all released");
    released
}

fn netqueue(c: &mut Criterion) {
    let mut group = c.benchmark_group("netqueue_push_release");
    group.throughput(Throughput::Elements(PACKETS));
    for width in [1usize, 4, 16] {
        let tags: Vec<CountVector> = (0..PACKETS).map(|p| tag(p, width)).collect();
        let updates: Vec<CountVector> = (1..=UPDATES).map(|u| committed(u, width)).collect();
        let mut out = Vec::with_capacity(PACKETS as usize);
        group.bench_with_input(BenchmarkId::new("entries", width), &width, |b, &w| {
            b.iter(|| run(w, &tags, &updates, &mut out))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20);
    targets = netqueue
}
criterion_main!(benches);
