//! Criterion benchmarks of the byte codecs on the data path:
//! - IPv4 option insert / strip per packet (64 B and 1500 B TCP packets),
//! - replication frame encode / decode of a 4 KiB write.
//!
//! Run: `cargo bench --bench codec`.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use etherparse::PacketBuilder;
use pipecloud_core::codec::{decode_frame, encode_frame};
use pipecloud_core::ipopt::{classify, insert_tag, strip_tag, Classify};
use pipecloud_core::wire::{Frame, Write, WriteKind};
use pipecloud_core::{CountVector, WriterId};
use std::time::Duration;

/// An IPv4 + TCP packet of exactly `total` bytes (header 40 + payload).
fn tcp_packet(total: usize) -> Vec<u8> {
    let payload = vec![0x5a; total - 40];
    let b = PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(40000, 5432, 1, 64240)
        .ack(1);
    let mut out = Vec::with_capacity(total + 40);
    b.write(&mut out, &payload).expect("build packet");
    assert_eq!(out.len(), total);
    out
}

/// A tag as a three-tier group would carry it: three writers and no epoch.
fn tag() -> CountVector {
    CountVector::from_slice(&[1_000_017, 52_344, 9_912_001])
}

fn ipopt(c: &mut Criterion) {
    let mut g = c.benchmark_group("ipopt");
    g.measurement_time(Duration::from_secs(3)).sample_size(20);
    let tag = tag();
    for size in [64usize, 1500] {
        let plain = tcp_packet(size);
        let mut tagged = plain.clone();
        insert_tag(&mut tagged, 7, &tag).expect("tag");
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("insert_{size}B"), |b| {
            b.iter_batched_ref(
                || {
                    let mut p = Vec::with_capacity(size + 40);
                    p.extend_from_slice(&plain);
                    p
                },
                |p| insert_tag(p, 7, black_box(&tag)).expect("insert"),
                BatchSize::SmallInput,
            )
        });
        g.bench_function(format!("strip_{size}B"), |b| {
            b.iter_batched_ref(
                || tagged.clone(),
                |p| strip_tag(p).expect("strip"),
                BatchSize::SmallInput,
            )
        });
        g.bench_function(format!("classify_resolve_{size}B"), |b| {
            let local = tag;
            b.iter(|| match classify(black_box(&tagged)) {
                Classify::Tagged { raw, .. } => raw.resolve(&local),
                _ => unreachable!("tagged packet"),
            })
        });
    }
    g.finish();
}

fn write_frame(len: usize) -> Frame {
    let mut vector = CountVector::from_slice(&[10, 20, 30]);
    vector.set(1, 21);
    Frame::Write(Write {
        writer: WriterId(1),
        generation: 2,
        seq: 21,
        disk: 0,
        offset: 1 << 30,
        vector,
        kind: WriteKind::Data((0..len).map(|i| (i * 7) as u8).collect()),
    })
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    g.measurement_time(Duration::from_secs(3)).sample_size(20);
    for len in [4096usize, 64 * 1024] {
        let frame = write_frame(len);
        let mut bytes = Vec::new();
        encode_frame(&frame, &mut bytes).expect("encode");
        g.throughput(Throughput::Bytes(len as u64));
        let mut out = Vec::with_capacity(bytes.len() + 64);
        g.bench_function(format!("encode_write_{}KiB", len / 1024), |b| {
            b.iter(|| {
                out.clear();
                encode_frame(black_box(&frame), &mut out).expect("encode");
                out.len()
            })
        });
        g.bench_function(format!("decode_write_{}KiB", len / 1024), |b| {
            b.iter(|| decode_frame(black_box(&bytes)).expect("decode"))
        });
    }
    g.finish();
}

criterion_group!(benches, ipopt, frames);
criterion_main!(benches);
