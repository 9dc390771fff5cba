//! Decode-stage benchmark: our borrowed decoder against the alternatives, on the
//! good vectors: a small system event, a ~1 KB deployment event, an ~8 KB
//! event, and 17 KB and 67 KB events whose `data` is mostly long log strings
//! (non-ASCII, an escape every ~120 bytes).
//!
//! `cargo bench --bench decode`

use std::borrow::Cow;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use serde::Deserialize;
use serde_json::value::RawValue;
use xzepr_consumer::decode::{CloudEventData, CloudEventMessage, Decoder, DecoderConfig};

const VECTORS: [&str; 5] = [
    "system-small.json",
    "deployment-1k.json",
    "large-8k.json",
    "large-16k-strings.json",
    "large-64k-strings.json",
];

fn vector(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The usual borrowed serde_json envelope: `Cow` attributes, `data` as a raw slice.
#[allow(dead_code)]
#[derive(Deserialize)]
struct SerdeBorrowed<'a> {
    success: bool,
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    specversion: Cow<'a, str>,
    #[serde(borrow, rename = "type")]
    ty: Cow<'a, str>,
    #[serde(borrow)]
    source: Cow<'a, str>,
    #[serde(borrow)]
    api_version: Cow<'a, str>,
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow)]
    version: Cow<'a, str>,
    #[serde(borrow)]
    release: Cow<'a, str>,
    #[serde(borrow)]
    platform_id: Cow<'a, str>,
    #[serde(borrow)]
    package: Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for name in VECTORS {
        let bytes = vector(name);
        let label = format!("{name} ({} B)", bytes.len());
        g.throughput(Throughput::Bytes(bytes.len() as u64));

        let dec = Decoder::new(DecoderConfig::default()).unwrap();
        g.bench_with_input(
            BenchmarkId::new("ours_envelope", &label),
            &bytes,
            |b, bytes| {
                b.iter(|| {
                    let ev = dec.decode(black_box(bytes)).unwrap();
                    black_box(ev.event_type().len())
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("ours_envelope_plus_entities", &label),
            &bytes,
            |b, bytes| {
                b.iter(|| {
                    let ev = dec.decode(black_box(bytes)).unwrap();
                    let ents = ev.entities().unwrap();
                    black_box(ents.events.len() + ents.event_receivers.len())
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("serde_json_borrowed_envelope", &label),
            &bytes,
            |b, bytes| {
                b.iter(|| {
                    let ev: SerdeBorrowed<'_> = serde_json::from_slice(black_box(bytes)).unwrap();
                    black_box(ev.ty.len())
                })
            },
        );
        let mut buffers = simd_json::Buffers::default();
        g.bench_with_input(
            BenchmarkId::new("simd_json_owned_serde", &label),
            &bytes,
            |b, bytes| {
                b.iter_batched_ref(
                    || bytes.clone(),
                    |copy| {
                        let msg: CloudEventMessage =
                            simd_json::serde::from_slice_with_buffers(copy, &mut buffers).unwrap();
                        black_box(msg.event_type.len())
                    },
                    BatchSize::SmallInput,
                )
            },
        );
        let mut buffers = simd_json::Buffers::default();
        g.bench_with_input(
            BenchmarkId::new("simd_json_tape", &label),
            &bytes,
            |b, bytes| {
                b.iter_batched_ref(
                    || bytes.clone(),
                    |copy| {
                        let tape = simd_json::to_tape_with_buffers(copy, &mut buffers).unwrap();
                        black_box(tape.0.len())
                    },
                    BatchSize::SmallInput,
                )
            },
        );
        g.bench_with_input(
            BenchmarkId::new("plan_serde_json_owned", &label),
            &bytes,
            |b, bytes| {
                b.iter(|| {
                    let msg: CloudEventMessage = serde_json::from_slice(black_box(bytes)).unwrap();
                    black_box(msg.event_type.len())
                })
            },
        );
    }
    g.finish();
}

/// Where simd-json starts to beat serde_json for decoding `data` into owned types:
/// the crossover behind `DecoderConfig::simd_min_bytes`.
fn data_crossover(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_data");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for name in VECTORS {
        let bytes = vector(name);
        let mut serde_dec =
            Decoder::new(DecoderConfig::default().simd_min_bytes(usize::MAX)).unwrap();
        let mut simd_dec = Decoder::new(DecoderConfig::default().simd_min_bytes(0)).unwrap();
        let data_len = serde_dec
            .decode(&bytes)
            .unwrap()
            .data()
            .raw()
            .unwrap()
            .len();
        let label = format!("{name} (data {data_len} B)");
        g.throughput(Throughput::Bytes(data_len as u64));
        g.bench_with_input(
            BenchmarkId::new("serde_json", &label),
            &bytes,
            |b, bytes| {
                b.iter(|| {
                    let ev = serde_dec.decode(bytes).unwrap();
                    let data = *ev.data();
                    let d: CloudEventData = serde_dec.decode_data(&data).unwrap();
                    black_box(d.events.len())
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("simd_json_reused_buffers", &label),
            &bytes,
            |b, bytes| {
                b.iter(|| {
                    let ev = simd_dec.decode(bytes).unwrap();
                    let data = *ev.data();
                    let d: CloudEventData = simd_dec.decode_data(&data).unwrap();
                    black_box(d.events.len())
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, decode, data_crossover);
criterion_main!(benches);
