//! The per-segment pipeline on real WAL: hash, compress, decompress and verify.
//!
//! This is the floor the binaries are measured against: everything `walkeep-archive` and
//! `walkeep-restore` do per segment besides process start and file I/O.
//!
//! Point `WALKEEP_BENCH_WAL` at a directory of WAL segments (for example a copy of a busy
//! cluster's `pg_wal`, or the corpus `scripts/bench.sh` builds). Without it, the benchmark
//! runs on a synthetic segment and says so; numbers from that are not representative.

use std::io::Cursor;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use walkeep::object;

fn corpus() -> (Vec<Vec<u8>>, &'static str) {
    if let Some(dir) = std::env::var_os("WALKEEP_BENCH_WAL").map(PathBuf::from) {
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .expect("WALKEEP_BENCH_WAL is not a readable directory")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().len() == 24)
            .map(|e| e.path())
            .collect();
        names.sort();
        names.truncate(8);
        let segments: Vec<_> = names.iter().map(|p| std::fs::read(p).unwrap()).collect();
        assert!(!segments.is_empty(), "no WAL segments in WALKEEP_BENCH_WAL");
        return (segments, "real WAL");
    }
    eprintln!("WALKEEP_BENCH_WAL not set: benchmarking a synthetic segment, not real WAL");
    let mut segment = vec![0u8; 16 << 20];
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for (i, chunk) in segment.chunks_mut(64).enumerate().take((10 << 20) / 64) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk[..8].copy_from_slice(&state.to_le_bytes());
        chunk[8..16].copy_from_slice(&(i as u64).to_le_bytes());
    }
    (vec![segment], "synthetic")
}

fn pipeline(c: &mut Criterion) {
    let (segments, kind) = corpus();
    let segment = &segments[segments.len() / 2];
    let mut group = c.benchmark_group(format!("segment ({kind})"));
    group.throughput(Throughput::Bytes(segment.len() as u64));
    group.sample_size(10);

    group.bench_function("sha256", |b| b.iter(|| object::sha256_hex(segment)));
    for level in [1, 3] {
        group.bench_with_input(BenchmarkId::new("encode", level), &level, |b, &level| {
            b.iter(|| {
                let mut out = Vec::with_capacity(segment.len() / 2);
                object::encode(&segment[..], &mut out, level, "bench", None).unwrap();
                out
            })
        });
    }
    let mut stored = Vec::new();
    object::encode(
        &segment[..],
        &mut stored,
        object::DEFAULT_LEVEL,
        "bench",
        None,
    )
    .unwrap();
    group.bench_function("decode+verify", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(segment.len());
            object::decode(Box::new(Cursor::new(stored.clone())), "bench", &mut out).unwrap();
            out
        })
    });
    group.finish();

    // Compression ratio per level over the whole corpus, for choosing the default.
    let total: usize = segments.iter().map(Vec::len).sum();
    for level in [1, 3, 6] {
        let stored: usize = segments
            .iter()
            .map(|s| {
                let mut out = Vec::new();
                object::encode(&s[..], &mut out, level, "bench", None).unwrap();
                out.len()
            })
            .sum();
        eprintln!(
            "zstd level {level}: {kind} corpus stored at {:.1}% of its size",
            100.0 * stored as f64 / total as f64
        );
    }
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
