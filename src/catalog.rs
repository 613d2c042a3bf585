//! The catalog: an index of what the repository holds, rebuildable from the objects alone.
//!
//! Every archived WAL file gets one JSON record appended to `catalog/wal.jsonl` after its
//! object is durable. The catalog is never the source of truth: each object carries the
//! same facts in its own trailer (see [`crate::object`]), archive and restore of a single
//! file never read the catalog, and `walkeep catalog rebuild` regenerates it from the
//! objects. A record may therefore be missing (a process killed between storing the object
//! and appending the record) or repeated (a segment archived twice); readers fold records
//! by name, the newest winning, and commands that must be exact (verify, expire) rebuild
//! or list instead of trusting the index. A record that cannot be read at all (torn by a
//! crash mid-append, or damaged) is skipped by readers and reported by `walkeep verify`;
//! a rebuild drops it.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::lsn::Lsn;
use crate::object::{self, ObjectMeta};
use crate::repo::{self, Repository};
use crate::wal::WalFileName;
use crate::walscan::SegmentSummary;

/// Record log of archived WAL files.
pub const WAL_LOG: &str = "catalog/wal.jsonl";

/// Version of catalog records this code writes.
pub const RECORD_VERSION: u32 = 1;

/// One archived WAL file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalRecord {
    /// Record format version.
    pub v: u32,
    /// File name as PostgreSQL knows it.
    pub name: String,
    /// `segment`, `partial`, `history` or `backup`.
    pub kind: String,
    /// Timeline of the file.
    pub timeline: u32,
    /// First position covered (segments and partial segments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_lsn: Option<Lsn>,
    /// Position just past the end (segments and partial segments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_lsn: Option<Lsn>,
    /// When PostgreSQL last wrote the segment (segments and partial segments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_written: Option<DateTime<Utc>>,
    /// Transaction ends and restore points in the segment, if it was summarised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<SegmentSummary>,
    /// Original size in bytes.
    pub size: u64,
    /// Size of the stored object in bytes.
    pub stored_size: u64,
    /// SHA-256 of the original bytes.
    pub sha256: String,
    /// Compression codec.
    pub codec: String,
    /// When it was archived.
    pub archived_at: DateTime<Utc>,
}

impl WalRecord {
    /// The record for a stored object of WAL file `name`.
    pub fn new(name: &WalFileName, meta: &ObjectMeta, stored_size: u64) -> WalRecord {
        WalRecord {
            v: RECORD_VERSION,
            name: name.to_string(),
            kind: name.kind().to_string(),
            timeline: name.timeline(),
            start_lsn: meta.wal.as_ref().map(|w| w.start_lsn),
            end_lsn: meta.wal.as_ref().map(|w| w.end_lsn),
            last_written: meta.wal.as_ref().and_then(|w| w.last_written),
            summary: meta.wal.as_ref().and_then(|w| w.summary.clone()),
            size: meta.size,
            stored_size,
            sha256: meta.sha256.clone(),
            codec: meta.codec.clone(),
            archived_at: meta.created_at,
        }
    }
}

/// Appends the record of one archived file.
pub fn append(repo: &Repository, record: &WalRecord) -> Result<()> {
    let line = serde_json::to_vec(record)?;
    repo.storage()
        .append_record(WAL_LOG, &line)
        .context("failed to record the file in the catalog")
}

/// A catalog record that could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreadable {
    /// Its place in the log, counting from 1.
    pub record: usize,
    /// Why it could not be read.
    pub error: String,
}

/// The catalog as read.
#[derive(Debug, Default)]
pub struct Contents {
    /// Records folded by file name, the newest winning.
    pub records: BTreeMap<String, WalRecord>,
    /// Records that are not valid JSON records: torn by a crash, or damaged. `walkeep
    /// catalog rebuild` drops them.
    pub unreadable: Vec<Unreadable>,
}

/// Reads the catalog, folded by file name, keeping apart the records it cannot read.
/// Records of another version (written by a newer walkeep) are skipped with a warning.
pub fn read(repo: &Repository) -> Result<Contents> {
    let mut contents = Contents::default();
    for (i, raw) in repo
        .storage()
        .read_records(WAL_LOG)?
        .into_iter()
        .enumerate()
    {
        match serde_json::from_slice::<WalRecord>(&raw) {
            Ok(record) if record.v == RECORD_VERSION => {
                contents.records.insert(record.name.clone(), record);
            }
            Ok(record) => {
                tracing::warn!("catalog record {} has version {}; skipped", i + 1, record.v)
            }
            Err(e) => contents.unreadable.push(Unreadable {
                record: i + 1,
                error: e.to_string(),
            }),
        }
    }
    Ok(contents)
}

/// Reads the catalog, folded by file name. Records this version cannot read (torn by a
/// crash, or written by a newer walkeep) are skipped with a warning.
pub fn load(repo: &Repository) -> Result<BTreeMap<String, WalRecord>> {
    let contents = read(repo)?;
    for unreadable in &contents.unreadable {
        tracing::warn!(
            "catalog record {} is unreadable ({}); skipped",
            unreadable.record,
            unreadable.error
        );
    }
    Ok(contents.records)
}

/// What a rebuild found.
#[derive(Debug, Default)]
pub struct Rebuilt {
    /// Records written.
    pub records: usize,
    /// Objects left out because their trailer is unreadable, with the reason.
    pub damaged: Vec<(String, String)>,
}

/// Regenerates the catalog from the stored WAL objects' trailers and replaces it. A damaged
/// object is left out and reported rather than stopping the rebuild: the rest of the
/// catalog is still worth having, and `walkeep verify` names the damage.
pub fn rebuild(repo: &Repository) -> Result<Rebuilt> {
    let mut records = Vec::new();
    let mut names = std::collections::HashSet::new();
    let mut damaged = Vec::new();
    for info in repo.storage().list("wal/")? {
        let Some(name) = repo::wal_name_of_key(&info.key) else {
            tracing::warn!("{} is not a WAL object; left out of the catalog", info.key);
            continue;
        };
        let Some(mut reader) = repo.storage().open(&info.key)? else {
            continue;
        };
        match object::read_meta(reader.as_mut(), &info.key) {
            Ok((meta, _)) => {
                names.insert(name.to_string());
                records.push(serde_json::to_vec(&WalRecord::new(
                    &name, &meta, info.size,
                ))?);
            }
            Err(e) if object::is_corrupt(&e) => damaged.push((info.key, format!("{e:#}"))),
            Err(e) => return Err(e),
        }
    }
    let count = records.len();
    repo.storage().rewrite_records(WAL_LOG, &mut |current| {
        // Keep what an archiver appended after the listing above.
        for raw in current {
            let name = serde_json::from_slice::<WalRecord>(&raw).map(|r| r.name);
            if name.is_ok_and(|n| !names.contains(&n)) {
                records.push(raw);
            }
        }
        Ok(std::mem::take(&mut records))
    })?;
    Ok(Rebuilt {
        records: count,
        damaged,
    })
}
