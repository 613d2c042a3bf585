//! The stored-object format: zstd-compressed content followed by a metadata trailer.
//!
//! Every file walkeep stores (WAL segments, history files, backup files) is one object:
//!
//! ```text
//! +------------------------------+
//! | zstd frame: the file content |
//! +------------------------------+
//! | zstd skippable frame         |  magic 0x184D2A5E, length
//! |   metadata (JSON)            |  name, size, SHA-256 of the original bytes, codec, ...
//! |   metadata checksum          |  first 8 bytes of the SHA-256 of the JSON
//! |   metadata length (u32 LE)   |
//! |   "WALKEEP1"                 |
//! +------------------------------+
//! ```
//!
//! The metadata sits at the end so that an object can be written in one streaming pass
//! (the checksum is known only once all bytes went through), and it sits inside a
//! skippable frame so that every object is still a plain `.zst` file: in an emergency,
//! `zstd -d` restores the original without walkeep. The metadata alone can be read from
//! the last bytes, which is how the catalog is rebuilt without decompressing anything.
//!
//! An object is trusted only after decompression and a SHA-256 comparison against its
//! metadata: any difference is [`ObjectError::Corrupt`], never a silent success.

use std::cell::RefCell;
use std::io::{self, Read, SeekFrom, Write};
use std::rc::Rc;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::lsn::Lsn;
use crate::storage::ObjectRead;
use crate::walscan::SegmentSummary;

/// Version of the object format this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Marks the end of every object.
const TRAILER_MAGIC: &[u8; 8] = b"WALKEEP1";

/// The zstd skippable-frame magic walkeep uses for its metadata frame.
const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;

/// Bytes after the metadata JSON: its checksum, its length and the trailer magic.
const TRAILER_TAIL: u64 = 8 + 4 + 8;

/// Largest metadata walkeep will read; anything bigger is corruption.
const MAX_META_LEN: u32 = 1 << 20;

/// Chunk size for streaming content through hash and compressor.
const CHUNK: usize = 1 << 20;

/// The compression level used when none is configured. Level 1 compresses WAL nearly
/// as well as level 3 at a fraction of the cost; see `benches/pipeline.rs`.
pub const DEFAULT_LEVEL: i32 = 1;

/// How a new object is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compression {
    /// zstd level.
    pub level: i32,
    /// zstd worker threads. 0 compresses on the calling thread; more split the content
    /// into jobs compressed side by side, for a caller that has the cores to itself (one
    /// segment archived with nothing else in flight). The output stays one ordinary zstd
    /// frame, a few tenths of a percent larger.
    pub workers: u32,
}

impl Compression {
    /// Compression at `level` on the calling thread.
    pub fn single(level: i32) -> Compression {
        Compression { level, workers: 0 }
    }

    /// Compression at `level` on every core: one worker a core when there are two or more.
    pub fn parallel(level: i32) -> Compression {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let workers = if cores > 1 { cores.min(8) as u32 } else { 0 };
        Compression { level, workers }
    }
}

/// Content compressed by one zstd worker at a time, when compressing on several.
const PARALLEL_JOB: u32 = 1 << 20;

/// WAL facts recorded for segments and partial segments.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalMeta {
    /// Timeline of the file name.
    pub timeline: u32,
    /// First position the segment covers.
    pub start_lsn: Lsn,
    /// Position just past the segment.
    pub end_lsn: Lsn,
    /// System identifier from the segment header.
    pub system_identifier: u64,
    /// When PostgreSQL last wrote the file: every WAL record written before this instant
    /// lies in this segment or an earlier one. The recovery planner uses it to tell
    /// whether the archive reaches a target time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_written: Option<DateTime<Utc>>,
    /// What the segment's records hold for recovery targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<SegmentSummary>,
}

/// What an object's trailer says about its content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    /// Object format version.
    pub format: u32,
    /// The original file name (WAL) or path relative to the data directory (backups).
    pub name: String,
    /// Size of the original content in bytes.
    pub size: u64,
    /// SHA-256 of the original content, lowercase hex.
    pub sha256: String,
    /// Compression codec of the content frame.
    pub codec: String,
    /// When the object was written.
    pub created_at: DateTime<Utc>,
    /// Present for WAL segments and partial segments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal: Option<WalMeta>,
}

/// Reading an object found it damaged.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The object is not what its trailer promises, or has no valid trailer.
    #[error("stored object {key} is corrupt: {reason}")]
    Corrupt {
        /// The object's key.
        key: String,
        /// What was found wrong.
        reason: String,
    },
}

fn corrupt(key: &str, reason: impl Into<String>) -> anyhow::Error {
    ObjectError::Corrupt {
        key: key.to_string(),
        reason: reason.into(),
    }
    .into()
}

/// Hex SHA-256 of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// SHA-256 computed on a thread of its own, so that hashing overlaps the compression or
/// decompression on the calling thread: on two cores a segment takes about as long as the
/// slower of the two instead of their sum. Bytes are copied into batches of [`HASH_BATCH`]
/// bytes, at most [`BATCHES_IN_FLIGHT`] queued, and the hashing thread hands the buffers
/// back for reuse, so memory stays bounded and no batch costs a fresh allocation.
pub struct BackgroundSha {
    batch: Vec<u8>,
    to_hasher: Option<SyncSender<Vec<u8>>>,
    recycled: Receiver<Vec<u8>>,
    hasher: Option<JoinHandle<String>>,
}

/// Batches queued for the hashing thread at most.
const BATCHES_IN_FLIGHT: usize = 2;

/// Size of a batch handed to the hashing thread: large enough that the hand-over costs
/// nothing measurable, small enough to keep a few in flight per stream.
const HASH_BATCH: usize = 256 << 10;

impl BackgroundSha {
    /// Starts the hashing thread.
    pub fn new() -> BackgroundSha {
        let (to_hasher, batches) = sync_channel::<Vec<u8>>(BATCHES_IN_FLIGHT);
        let (give_back, recycled) = sync_channel::<Vec<u8>>(BATCHES_IN_FLIGHT + 2);
        let hasher = std::thread::spawn(move || {
            let mut sha = Sha256::new();
            for mut batch in batches {
                sha.update(&batch);
                batch.clear();
                let _ = give_back.try_send(batch);
            }
            hex::encode(sha.finalize())
        });
        BackgroundSha {
            batch: Vec::with_capacity(HASH_BATCH),
            to_hasher: Some(to_hasher),
            recycled,
            hasher: Some(hasher),
        }
    }

    /// Adds bytes to the hash.
    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let take = (HASH_BATCH - self.batch.len()).min(bytes.len());
            self.batch.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.batch.len() == HASH_BATCH {
                self.send();
            }
        }
    }

    fn send(&mut self) {
        let next = self
            .recycled
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(HASH_BATCH));
        let full = std::mem::replace(&mut self.batch, next);
        if let Some(to_hasher) = &self.to_hasher {
            // The thread only stops when the sender is dropped, so a send cannot fail
            // unless it panicked, which finish() reports.
            let _ = to_hasher.send(full);
        }
    }

    /// The hex SHA-256 of everything added.
    pub fn finish(mut self) -> String {
        if !self.batch.is_empty() {
            self.send();
        }
        drop(self.to_hasher.take());
        self.hasher
            .take()
            .expect("joined once")
            .join()
            .expect("hashing thread panicked")
    }
}

impl Default for BackgroundSha {
    fn default() -> Self {
        BackgroundSha::new()
    }
}

/// Hex SHA-256 and length of everything `reader` yields.
pub fn sha256_of_reader(reader: impl Read, what: &str) -> Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    for_each_chunk(reader, what, |piece| {
        hasher.update(piece);
        total += piece.len() as u64;
        Ok(())
    })?;
    Ok((hex::encode(hasher.finalize()), total))
}

/// Compresses content fed to it in pieces into one object.
pub struct Encoder<'a> {
    zstd: zstd::stream::write::Encoder<'static, &'a mut dyn Write>,
    hasher: BackgroundSha,
    size: u64,
}

impl<'a> Encoder<'a> {
    /// Starts an object written to `sink`, compressed as `compression` says.
    pub fn new(sink: &'a mut dyn Write, compression: Compression) -> Result<Encoder<'a>> {
        let mut zstd = zstd::stream::write::Encoder::new(sink, compression.level)
            .context("failed to start zstd compressor")?;
        zstd.include_checksum(true)
            .context("failed to configure zstd")?;
        if compression.workers > 0 {
            zstd.multithread(compression.workers)
                .context("failed to start zstd worker threads")?;
            // Small jobs: the content arrives at the pace of the hash, and a job starts
            // only once full, so large ones would leave the last of it to one core after
            // the end. 1 MiB jobs keep every worker busy and cost under 0.1% in size.
            zstd.set_parameter(zstd::zstd_safe::CParameter::JobSize(PARALLEL_JOB))
                .context("failed to configure zstd")?;
        }
        Ok(Encoder {
            zstd,
            hasher: BackgroundSha::new(),
            size: 0,
        })
    }

    /// Adds the next piece of content.
    pub fn write(&mut self, piece: &[u8]) -> Result<()> {
        self.hasher.update(piece);
        self.size += piece.len() as u64;
        self.zstd
            .write_all(piece)
            .context("failed to write compressed data")
    }

    /// Ends the content and writes the trailer, with `name` and `wal` in it.
    pub fn finish(self, name: &str, wal: Option<WalMeta>) -> Result<ObjectMeta> {
        let sink = self
            .zstd
            .finish()
            .context("failed to write compressed data")?;
        let meta = ObjectMeta {
            format: FORMAT_VERSION,
            name: name.to_string(),
            size: self.size,
            sha256: self.hasher.finish(),
            codec: "zstd".to_string(),
            created_at: Utc::now(),
            wal,
        };
        write_trailer(sink, &meta)?;
        Ok(meta)
    }
}

/// Reads `source` to its end in chunks, handing each to `each`.
pub fn for_each_chunk(
    mut source: impl Read,
    what: &str,
    mut each: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match source.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => each(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("failed to read {what}")),
        }
    }
}

/// Compresses everything from `source` into `sink` as one object, returning its metadata.
/// `name` and `wal` go into the trailer unchanged.
pub fn encode(
    source: impl Read,
    sink: &mut dyn Write,
    level: i32,
    name: &str,
    wal: Option<WalMeta>,
) -> Result<ObjectMeta> {
    let mut encoder = Encoder::new(sink, Compression::single(level))?;
    for_each_chunk(source, name, |piece| encoder.write(piece))?;
    encoder.finish(name, wal)
}

fn write_trailer(sink: &mut dyn Write, meta: &ObjectMeta) -> Result<()> {
    let json = serde_json::to_vec(meta)?;
    let frame_len = json.len() as u64 + TRAILER_TAIL;
    let mut trailer = Vec::with_capacity(json.len() + 20);
    trailer.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    trailer.extend_from_slice(&(frame_len as u32).to_le_bytes());
    trailer.extend_from_slice(&json);
    trailer.extend_from_slice(&Sha256::digest(&json)[..8]);
    trailer.extend_from_slice(&(json.len() as u32).to_le_bytes());
    trailer.extend_from_slice(TRAILER_MAGIC);
    sink.write_all(&trailer)
        .context("failed to write object trailer")
}

/// Reads the metadata of an object from its last bytes. Returns the metadata and the
/// length of the compressed content that precedes the trailer.
pub fn read_meta(reader: &mut dyn ObjectRead, key: &str) -> Result<(ObjectMeta, u64)> {
    let total = reader
        .seek(SeekFrom::End(0))
        .with_context(|| format!("failed to read {key}"))?;
    if total < TRAILER_TAIL + 8 {
        return Err(corrupt(
            key,
            format!("{total} bytes is too short to be an object"),
        ));
    }
    reader.seek(SeekFrom::Start(total - TRAILER_TAIL))?;
    let mut tail = [0u8; TRAILER_TAIL as usize];
    reader
        .read_exact(&mut tail)
        .with_context(|| format!("failed to read {key}"))?;
    if &tail[12..] != TRAILER_MAGIC {
        return Err(corrupt(
            key,
            "trailer magic missing (truncated or not a walkeep object)",
        ));
    }
    let json_len = u32::from_le_bytes(tail[8..12].try_into().unwrap());
    let frame_start = total
        .checked_sub(TRAILER_TAIL + u64::from(json_len) + 8)
        .filter(|_| json_len <= MAX_META_LEN)
        .ok_or_else(|| corrupt(key, format!("metadata length {json_len} does not fit")))?;
    reader.seek(SeekFrom::Start(frame_start))?;
    let mut frame = vec![0u8; 8 + json_len as usize];
    reader
        .read_exact(&mut frame)
        .with_context(|| format!("failed to read {key}"))?;
    let magic = u32::from_le_bytes(frame[..4].try_into().unwrap());
    let frame_len = u32::from_le_bytes(frame[4..8].try_into().unwrap());
    if magic != SKIPPABLE_MAGIC || u64::from(frame_len) != u64::from(json_len) + TRAILER_TAIL {
        return Err(corrupt(key, "metadata frame header damaged"));
    }
    if Sha256::digest(&frame[8..])[..8] != tail[..8] {
        return Err(corrupt(key, "metadata checksum mismatch"));
    }
    let meta: ObjectMeta = serde_json::from_slice(&frame[8..])
        .map_err(|e| corrupt(key, format!("metadata unreadable: {e}")))?;
    if meta.format != FORMAT_VERSION {
        anyhow::bail!(
            "object {key} has format version {}, this walkeep reads version {FORMAT_VERSION}",
            meta.format
        );
    }
    Ok((meta, frame_start))
}

/// A reader that keeps a copy of the first error its source returned, so that a failure of
/// the storage is not mistaken for damage once zstd has wrapped it.
struct NoticingReader<R> {
    inner: R,
    failure: Rc<RefCell<Option<io::Error>>>,
}

impl<R: Read> Read for NoticingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            if e.kind() != io::ErrorKind::Interrupted {
                let copy = io::Error::new(e.kind(), e.to_string());
                self.failure.borrow_mut().get_or_insert(copy);
            }
        })
    }
}

/// Decompresses an object into `out`, checking size and SHA-256 against its metadata.
/// On any mismatch the error is [`ObjectError::Corrupt`]; `out` may then hold garbage
/// and must be discarded by the caller.
pub fn decode(
    mut reader: Box<dyn ObjectRead>,
    key: &str,
    out: &mut dyn Write,
) -> Result<ObjectMeta> {
    let (meta, content_len) = read_meta(reader.as_mut(), key)?;
    if meta.codec != "zstd" {
        anyhow::bail!(
            "object {key} uses codec {:?}, which this walkeep cannot read",
            meta.codec
        );
    }
    reader.seek(SeekFrom::Start(0))?;
    let read_failure = Rc::new(RefCell::new(None));
    let source = NoticingReader {
        inner: reader.take(content_len),
        failure: Rc::clone(&read_failure),
    };
    let limited = io::BufReader::with_capacity(CHUNK, source);
    let mut decoder = zstd::stream::read::Decoder::with_buffer(limited)
        .context("failed to start zstd decompressor")?;
    let mut hasher = BackgroundSha::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => match read_failure.borrow_mut().take() {
                // The storage failed (a timeout, EIO): not evidence against the object.
                Some(cause) => {
                    return Err(cause).with_context(|| format!("failed to read object {key}"))
                }
                None => return Err(corrupt(key, format!("content does not decompress: {e}"))),
            },
        };
        hasher.update(&buf[..n]);
        size += n as u64;
        if size > meta.size {
            return Err(corrupt(
                key,
                format!("content is longer than the {} bytes recorded", meta.size),
            ));
        }
        out.write_all(&buf[..n])
            .context("failed to write restored data")?;
    }
    if size != meta.size {
        return Err(corrupt(
            key,
            format!("content is {size} bytes, metadata records {}", meta.size),
        ));
    }
    let found = hasher.finish();
    if found != meta.sha256 {
        return Err(corrupt(
            key,
            format!(
                "SHA-256 mismatch: metadata records {}, content hashes to {found}",
                meta.sha256
            ),
        ));
    }
    Ok(meta)
}

/// True if and only if `err` (or a cause of it) is [`ObjectError::Corrupt`].
pub fn is_corrupt(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|cause| cause.downcast_ref::<ObjectError>().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn object(content: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(content, &mut out, 3, "f", None).unwrap();
        out
    }

    fn decode_bytes(bytes: Vec<u8>) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        decode(Box::new(Cursor::new(bytes)), "k", &mut out)?;
        Ok(out)
    }

    #[test]
    fn round_trip_keeps_bytes_and_checksum() {
        let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let bytes = object(&content);
        assert!(bytes.len() < content.len() / 10);
        let (meta, _) = read_meta(&mut Cursor::new(bytes.clone()), "k").unwrap();
        assert_eq!(meta.size, content.len() as u64);
        assert_eq!(meta.sha256, sha256_hex(&content));
        assert_eq!(decode_bytes(bytes).unwrap(), content);
    }

    #[test]
    fn parallel_compression_round_trips_as_one_plain_frame() {
        let content: Vec<u8> = (0..9_000_000u32)
            .map(|i| (i / 7 % 251) as u8 ^ (i % 13) as u8)
            .collect();
        let mut bytes = Vec::new();
        let compression = Compression {
            level: 1,
            workers: 2,
        };
        let mut encoder = Encoder::new(&mut bytes, compression).unwrap();
        for piece in content.chunks(CHUNK) {
            encoder.write(piece).unwrap();
        }
        let meta = encoder.finish("f", None).unwrap();
        assert_eq!(meta.sha256, sha256_hex(&content));
        assert!(zstd::decode_all(&bytes[..]).unwrap() == content);
        assert!(decode_bytes(bytes).unwrap() == content);
    }

    #[test]
    fn empty_content_round_trips() {
        assert_eq!(decode_bytes(object(b"")).unwrap(), b"");
    }

    #[test]
    fn object_is_a_plain_zstd_stream() {
        let bytes = object(b"hello wal");
        assert_eq!(zstd::decode_all(&bytes[..]).unwrap(), b"hello wal");
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let content =
            b"some WAL-ish content that compresses a little, a little, a little".repeat(50);
        let bytes = object(&content);
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x01;
            match decode_bytes(damaged) {
                Err(err) => assert!(is_corrupt(&err), "byte {i}: {err:#}"),
                // Some frame-header bits do not change what zstd decodes (a window-size
                // hint); the output was still verified, so it must be exactly right.
                Ok(out) => assert!(out == content, "byte {i} corrupted the output silently"),
            }
        }
    }

    #[test]
    fn truncation_is_detected() {
        let bytes = object(&b"abc".repeat(10_000));
        for cut in [1, 10, bytes.len() / 2, bytes.len() - 1] {
            let err = decode_bytes(bytes[..cut].to_vec()).unwrap_err();
            assert!(is_corrupt(&err), "cut at {cut}: {err:#}");
        }
    }

    /// A source whose reads fail inside `bad`, as a storage timeout or EIO would.
    struct FailingInside {
        bytes: Cursor<Vec<u8>>,
        bad: std::ops::Range<u64>,
    }

    impl Read for FailingInside {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let at = self.bytes.position();
            if self.bad.contains(&at) {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "storage timed out"));
            }
            let room = if at < self.bad.start {
                (self.bad.start - at) as usize
            } else {
                buf.len()
            };
            let n = buf.len().min(room);
            self.bytes.read(&mut buf[..n])
        }
    }

    impl io::Seek for FailingInside {
        fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
            self.bytes.seek(to)
        }
    }

    #[test]
    fn a_failing_read_is_an_error_but_not_damage() {
        let content: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let bytes = object(&content);
        let len = bytes.len() as u64;
        // The trailer, read first, stays readable; the compressed content fails midway.
        let reader = FailingInside {
            bad: len / 3..len / 2,
            bytes: Cursor::new(bytes),
        };
        let err = decode(Box::new(reader), "k", &mut io::sink()).unwrap_err();
        assert!(!is_corrupt(&err), "{err:#}");
        assert!(format!("{err:#}").contains("storage timed out"), "{err:#}");
    }
}
