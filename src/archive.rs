//! `archive_command`: taking one WAL file from PostgreSQL into the repository.
//!
//! The invariant: [`archive_file`] returns `Ok` only when an object holding exactly the
//! offered bytes is durable in the repository under the file's name. Before anything is
//! written the file is checked: its name must be a WAL name, and a segment's header must
//! belong to the repository's cluster, timeline and position. An existing object is never
//! replaced by different bytes; offering identical bytes again succeeds without rewriting.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};

use crate::catalog::{self, WalRecord};
use crate::exit;
use crate::object::{self, ObjectMeta, WalMeta};
use crate::repo::{self, Repository};
use crate::storage::{Commit, Committed};
use crate::wal::{self, LongPageHeader, SegmentName, WalFileName};

/// How a successful archive call ended.
#[derive(Debug)]
pub enum Archived {
    /// The file was stored now.
    Stored {
        /// Metadata of the new object.
        meta: ObjectMeta,
        /// Size of the stored object in bytes.
        stored_size: u64,
    },
    /// An object with identical content was already stored; nothing was rewritten.
    AlreadyStored {
        /// Metadata of the existing object.
        meta: ObjectMeta,
    },
}

/// The offered content differs from the object already stored under that name.
#[derive(Debug, thiserror::Error)]
#[error(
    "{name} is already archived with different content: stored SHA-256 {stored}, offered \
     SHA-256 {offered}; the stored copy is kept. Two clusters may be archiving into one \
     repository, or the server was restored without a new timeline"
)]
pub struct ConflictError {
    /// The WAL file name.
    pub name: String,
    /// SHA-256 of the stored object's content.
    pub stored: String,
    /// SHA-256 of the offered file.
    pub offered: String,
}

/// Archives the file at `path` under the WAL name `name`, compressing at `level`.
pub fn archive_file(repo: &Repository, path: &Path, name: &str, level: i32) -> Result<Archived> {
    let wal_name: WalFileName = name.parse()?;
    if let Some(given) = path.file_name().and_then(|n| n.to_str()) {
        if given != name && given.parse::<WalFileName>().is_ok() {
            bail!(
                "misnamed file: asked to archive {} as {name}",
                path.display()
            );
        }
    }
    let mut file =
        File::open(path).with_context(|| format!("failed to open {}", path.display()))?;
    let wal_meta = check_content(repo, &wal_name, &mut file, path)?;

    let key = repo::wal_key(&wal_name);
    let storage = repo.storage();
    if storage.size(&key)?.is_some() {
        return compare_with_stored(repo, &wal_name, &key, &mut file, path, level);
    }

    file.seek(SeekFrom::Start(0))?;
    let mut writer = storage.create(&key)?;
    let meta = object::encode(
        BufReader::new(&mut file),
        &mut writer,
        level,
        name,
        wal_meta,
    )?;
    if exit::fault("stall-before-commit") {
        // Lets a test kill the process while the object is written but not published.
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
    match writer.commit(Commit::IfAbsent)? {
        Committed::Created => {
            let stored_size = storage.size(&key)?.unwrap_or(0);
            catalog::append(repo, &WalRecord::new(&wal_name, &meta, stored_size))?;
            Ok(Archived::Stored { meta, stored_size })
        }
        // Another archiver (a standby with archive_mode=always) stored it meanwhile.
        Committed::AlreadyExists => {
            compare_with_stored(repo, &wal_name, &key, &mut file, path, level)
        }
    }
}

/// Checks the file's content against its name and the repository, returning the WAL facts
/// to record for segments.
fn check_content(
    repo: &Repository,
    name: &WalFileName,
    file: &mut File,
    path: &Path,
) -> Result<Option<WalMeta>> {
    let size = file
        .metadata()
        .with_context(|| format!("failed to stat {}", path.display()))?
        .len();
    match name {
        WalFileName::Segment(segment) | WalFileName::Partial(segment) => {
            let expected = repo.segment_size();
            if size != expected {
                bail!(
                    "{name} is {size} bytes, expected a full segment of {expected} bytes \
                     (truncated, or from a cluster with another WAL segment size)"
                );
            }
            let mut header = [0u8; wal::LONG_PAGE_HEADER_SIZE];
            file.read_exact(&mut header)
                .with_context(|| format!("failed to read {}", path.display()))?;
            let header =
                LongPageHeader::parse(&header).with_context(|| format!("refusing {name}"))?;
            header
                .check_segment(segment, &repo.identity().expectation())
                .with_context(|| format!("refusing {name}"))?;
            let modified = file
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .map(DateTime::<Utc>::from);
            Ok(Some(segment_meta(segment, &header, expected, modified)?))
        }
        WalFileName::History(_) | WalFileName::BackupHistory(..) => {
            // Both are short text files written by PostgreSQL itself.
            if size > 16 << 20 {
                bail!(
                    "{name} is {size} bytes, too large for a {} file",
                    name.kind()
                );
            }
            let mut text = String::new();
            file.read_to_string(&mut text)
                .with_context(|| format!("{name} is not a text file"))?;
            let expected_start = match name {
                WalFileName::BackupHistory(..) => Some("START WAL LOCATION:"),
                _ => None,
            };
            if let Some(start) = expected_start {
                if !text.starts_with(start) {
                    bail!("{name} does not look like a backup history file (no {start:?})");
                }
            }
            Ok(None)
        }
    }
}

fn segment_meta(
    segment: &SegmentName,
    header: &LongPageHeader,
    size: u64,
    last_written: Option<DateTime<Utc>>,
) -> Result<WalMeta> {
    let start = segment.start_lsn(size)?;
    Ok(WalMeta {
        timeline: segment.timeline,
        start_lsn: start,
        end_lsn: crate::lsn::Lsn(start.0 + size),
        system_identifier: header.system_identifier,
        last_written,
    })
}

/// The key is taken: succeed if the stored content is the offered content, else refuse.
fn compare_with_stored(
    repo: &Repository,
    name: &WalFileName,
    key: &str,
    file: &mut File,
    path: &Path,
    level: i32,
) -> Result<Archived> {
    file.seek(SeekFrom::Start(0))?;
    let (offered, _) = object::sha256_of_reader(BufReader::new(&mut *file))
        .with_context(|| format!("failed to read {}", path.display()))?;
    let storage = repo.storage();
    let reader = storage
        .open(key)?
        .with_context(|| format!("{key} vanished while comparing"))?;
    match object::decode(reader, key, &mut std::io::sink()) {
        Ok(meta) if meta.sha256 == offered => Ok(Archived::AlreadyStored { meta }),
        Ok(meta) => Err(ConflictError {
            name: name.to_string(),
            stored: meta.sha256,
            offered,
        }
        .into()),
        Err(e) if object::is_corrupt(&e) => {
            // The stored copy is damaged. Replace it only when its trailer proves the
            // offered bytes are the ones it was meant to hold.
            let mut reader = storage
                .open(key)?
                .with_context(|| format!("{key} vanished"))?;
            let recorded = object::read_meta(reader.as_mut(), key).map(|(m, _)| m.sha256);
            match recorded {
                Ok(recorded) if recorded == offered => {
                    tracing::warn!("{key} is corrupt ({e:#}); replacing it with the offered {name}, whose checksum matches the recorded one");
                    file.seek(SeekFrom::Start(0))?;
                    let mut writer = storage.create(key)?;
                    let wal_meta = object::read_meta(reader.as_mut(), key)?.0.wal;
                    let meta = object::encode(
                        BufReader::new(&mut *file),
                        &mut writer,
                        level,
                        &name.to_string(),
                        wal_meta,
                    )?;
                    writer.commit(Commit::Replace)?;
                    let stored_size = storage.size(key)?.unwrap_or(0);
                    catalog::append(repo, &WalRecord::new(name, &meta, stored_size))?;
                    Ok(Archived::Stored { meta, stored_size })
                }
                Ok(recorded) => Err(ConflictError {
                    name: name.to_string(),
                    stored: recorded,
                    offered,
                }
                .into()),
                Err(_) => Err(e.context(format!(
                    "{name} is already stored but unreadable; inspect {key} in {} by hand",
                    storage.location()
                ))),
            }
        }
        Err(e) => Err(e),
    }
}
