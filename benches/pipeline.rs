//! The per-segment pipeline on real WAL: scan, hash, compress, decompress and verify.
//!
//! This is the floor the binaries are measured against: everything `walkeep-archive` and
//! `walkeep-restore` do per segment besides process start and file I/O. Each iteration
//! handles one whole segment, taking the chosen segments in turn, so a figure is the mean
//! cost of one segment of the corpus, not of one lucky segment.
//!
//! - `sha256`: the checksum alone.
//! - `walscan`: the record summary `walkeep-archive` keeps for recovery targets, alone.
//! - `encode/N`: checksum and zstd at level N into a stored object (no record summary).
//! - `archive`: what `walkeep-archive` does in memory: record summary, checksum and zstd
//!   at the default level, fed in the same 1 MiB pieces.
//! - `restore`: what `walkeep-restore` does in memory: decompress, checksum and compare,
//!   and check the segment header.
//!
//! Point `WALKEEP_BENCH_WAL` at a directory of WAL segments (a copy of a busy cluster's
//! `pg_wal`, or the corpus `scripts/bench.sh` builds). `WALKEEP_BENCH_SEGMENTS` (default 8)
//! segments are taken, evenly spread over the sorted directory. Without a directory the
//! benchmark runs on a synthetic segment and says so; numbers from that are not
//! representative, and `walscan` and `archive` are skipped.

use std::io::Cursor;
use std::path::PathBuf;

use criterion::{
    criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use walkeep::object::{self, Compression, WalMeta};
use walkeep::wal::{LongPageHeader, SegmentName};
use walkeep::walscan::Scanner;

/// One segment of the corpus, with what the archive path needs to scan it.
struct Segment {
    bytes: Vec<u8>,
    /// Start position, block size and major version, for the record summary; `None` for
    /// the synthetic segment.
    scan: Option<(walkeep::lsn::Lsn, u32, u32)>,
}

fn corpus() -> (Vec<Segment>, &'static str) {
    if let Some(dir) = std::env::var_os("WALKEEP_BENCH_WAL").map(PathBuf::from) {
        let wanted: usize = std::env::var("WALKEEP_BENCH_SEGMENTS")
            .ok()
            .and_then(|n| n.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(8);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .expect("WALKEEP_BENCH_WAL is not a readable directory")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.parse::<SegmentName>().is_ok())
            .collect();
        names.sort();
        assert!(!names.is_empty(), "no WAL segments in WALKEEP_BENCH_WAL");
        let step = names.len() as f64 / wanted.min(names.len()) as f64;
        let chosen: Vec<&String> = (0..wanted.min(names.len()))
            .map(|i| &names[(i as f64 * step) as usize])
            .collect();
        let segments = chosen
            .iter()
            .map(|name| {
                let bytes = std::fs::read(dir.join(name)).unwrap();
                let header = LongPageHeader::parse(&bytes).expect("not a WAL segment");
                let start = name
                    .parse::<SegmentName>()
                    .unwrap()
                    .start_lsn(bytes.len() as u64)
                    .unwrap();
                let scan = Some((start, header.block_size, header.major_version()));
                Segment { bytes, scan }
            })
            .collect::<Vec<_>>();
        eprintln!(
            "real WAL: {} segments of {} MiB from {} ({} .. {})",
            segments.len(),
            segments[0].bytes.len() >> 20,
            dir.display(),
            chosen[0],
            chosen[chosen.len() - 1]
        );
        return (segments, "real WAL");
    }
    eprintln!("WALKEEP_BENCH_WAL not set: benchmarking a synthetic segment, not real WAL");
    let mut bytes = vec![0u8; 16 << 20];
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for (i, chunk) in bytes.chunks_mut(64).enumerate().take((10 << 20) / 64) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk[..8].copy_from_slice(&state.to_le_bytes());
        chunk[8..16].copy_from_slice(&(i as u64).to_le_bytes());
    }
    (vec![Segment { bytes, scan: None }], "synthetic")
}

/// What `walkeep-archive` does to a segment in memory (see `archive::Offer::store`).
fn archive(segment: &Segment, compression: Compression) -> Vec<u8> {
    let mut out = Vec::with_capacity(segment.bytes.len() / 2);
    let mut encoder = object::Encoder::new(&mut out, compression).unwrap();
    let mut scanner = segment
        .scan
        .map(|(start, block, version)| Scanner::new(start, block, version));
    object::for_each_chunk(&segment.bytes[..], "bench", |piece| {
        if let Some(scanner) = scanner.as_mut() {
            scanner.feed(piece);
        }
        encoder.write(piece)
    })
    .unwrap();
    let wal = segment.scan.map(|(start, _, _)| WalMeta {
        timeline: 1,
        start_lsn: start,
        end_lsn: walkeep::lsn::Lsn(start.0 + segment.bytes.len() as u64),
        system_identifier: 0,
        last_written: None,
        summary: scanner.map(Scanner::finish),
    });
    encoder.finish("bench", wal).unwrap();
    out
}

fn pipeline(c: &mut Criterion) {
    let (segments, kind) = corpus();
    let n = segments.len();
    let mut group = c.benchmark_group(format!("segment ({kind})"));
    group.throughput(Throughput::Bytes(segments[0].bytes.len() as u64));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);

    let mut i = 0;
    group.bench_function("sha256", |b| {
        b.iter(|| {
            i += 1;
            object::sha256_hex(&segments[i % n].bytes)
        })
    });
    if segments[0].scan.is_some() {
        group.bench_function("walscan", |b| {
            b.iter(|| {
                i += 1;
                let segment = &segments[i % n];
                let (start, block, version) = segment.scan.unwrap();
                let mut scanner = Scanner::new(start, block, version);
                for piece in segment.bytes.chunks(1 << 20) {
                    scanner.feed(piece);
                }
                scanner.finish()
            })
        });
    }
    for level in [1, 3] {
        group.bench_with_input(BenchmarkId::new("encode", level), &level, |b, &level| {
            b.iter(|| {
                i += 1;
                let segment = &segments[i % n].bytes;
                let mut out = Vec::with_capacity(segment.len() / 2);
                object::encode(&segment[..], &mut out, level, "bench", None).unwrap();
                out
            })
        });
    }
    // "archive": a segment archived alone, zstd on every core (the serial floor);
    // "archive-single": zstd on one thread, as each file of a read-ahead call.
    let alone = Compression::parallel(object::DEFAULT_LEVEL);
    let single = Compression::single(object::DEFAULT_LEVEL);
    if segments[0].scan.is_some() {
        for (label, compression) in [("archive", alone), ("archive-single", single)] {
            group.bench_function(label, |b| {
                b.iter(|| {
                    i += 1;
                    archive(&segments[i % n], compression)
                })
            });
        }
    }

    let stored: Vec<Vec<u8>> = segments.iter().map(|s| archive(s, alone)).collect();
    group.bench_function("restore", |b| {
        b.iter_batched(
            || {
                i += 1;
                Cursor::new(stored[i % n].clone())
            },
            |object| {
                let mut out = Vec::with_capacity(16 << 20);
                object::decode(Box::new(object), "bench", &mut out).unwrap();
                if segments[0].scan.is_some() {
                    LongPageHeader::parse(&out).unwrap();
                }
                out
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();

    // Compression ratio per level over the chosen segments, for choosing the default
    // (pgBackRest's default zst level is 3).
    let total: usize = segments.iter().map(|s| s.bytes.len()).sum();
    for level in [1, 3, 6] {
        for compression in [Compression::single(level), Compression::parallel(level)] {
            let stored: usize = segments.iter().map(|s| archive(s, compression).len()).sum();
            eprintln!(
                "zstd level {level}, {} workers: {kind} stored at {:.2}% of its size",
                compression.workers,
                100.0 * stored as f64 / total as f64
            );
        }
    }
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
