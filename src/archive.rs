//! `archive_command`: taking one WAL file from PostgreSQL into the repository.
//!
//! The invariant: [`archive_file`] returns `Ok` only when an object holding exactly the
//! offered bytes is durable in the repository under the file's name. Before anything is
//! written the file is checked: its name must be a WAL name, a segment's header must
//! belong to the repository's cluster, timeline and position, and a timeline history file
//! must parse as one. An existing object is never replaced by different bytes; offering
//! identical bytes again succeeds without rewriting.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};

use crate::catalog::{self, WalRecord};
use crate::exit;
use crate::object::{self, Compression, ObjectMeta, WalMeta};
use crate::repo::{self, Repository};
use crate::storage::{Commit, Committed};
use crate::timeline::TimelinePath;
use crate::wal::{self, LongPageHeader, SegmentName, WalFileName};
use crate::walscan::Scanner;

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

/// A file PostgreSQL offers, checked and ready to store.
struct Offer<'a> {
    repo: &'a Repository,
    name: WalFileName,
    key: String,
    path: &'a Path,
    file: File,
    wal_meta: Option<WalMeta>,
    compression: Compression,
}

/// Archives the file at `path` under the WAL name `name`, compressed as `compression` says.
pub fn archive_file(
    repo: &Repository,
    path: &Path,
    name: &str,
    compression: Compression,
) -> Result<Archived> {
    let wal_name: WalFileName = name.parse()?;
    if let Some(given) = path.file_name().and_then(|n| n.to_str()) {
        if given != name && given.parse::<WalFileName>().is_ok() {
            bail!(
                "misnamed file: asked to archive {} as {name}",
                path.display()
            );
        }
    }
    let file = File::open(path).with_context(|| format!("failed to open {}", path.display()))?;
    archive_opened(repo, file, path, wal_name, compression)
}

/// Archives `file`, already opened from `path`, under `wal_name`: [`archive_file`] after
/// its check of the name against `path`, for a caller that needs the open file (read-ahead
/// `fstat`s it before and after).
pub fn archive_opened(
    repo: &Repository,
    mut file: File,
    path: &Path,
    wal_name: WalFileName,
    compression: Compression,
) -> Result<Archived> {
    let wal_meta = check_content(repo, &wal_name, &mut file, path)?;
    let mut offer = Offer {
        repo,
        key: repo::wal_key(&wal_name),
        name: wal_name,
        path,
        file,
        wal_meta,
        compression,
    };

    let storage = repo.storage();
    if storage.size(&offer.key)?.is_some() {
        return offer.compare_with_stored();
    }

    let mut writer = storage.create(&offer.key, Commit::IfAbsent)?;
    let meta = offer.store(&mut writer)?;
    // Lets a test kill the process, or the storage, while the object is written but not
    // yet published.
    exit::stall("stall-before-commit");
    match writer.commit()? {
        Committed::Created => offer.record(meta),
        // Another archiver (a standby with archive_mode=always) stored it meanwhile.
        Committed::AlreadyExists => offer.compare_with_stored(),
    }
}

impl Offer<'_> {
    /// Streams the file into `writer`, summarising a segment's records on the way.
    fn store(&mut self, writer: &mut dyn std::io::Write) -> Result<ObjectMeta> {
        self.file.seek(SeekFrom::Start(0))?;
        let mut encoder = object::Encoder::new(writer, self.compression)?;
        let identity = self.repo.identity();
        let mut scanner = self.wal_meta.as_ref().map(|w| {
            Scanner::new(
                w.start_lsn,
                identity.wal_block_size,
                identity.pg_major_version,
            )
        });
        let name = self.name.to_string();
        object::for_each_chunk(BufReader::new(&mut self.file), &name, |piece| {
            if let Some(scanner) = scanner.as_mut() {
                scanner.feed(piece);
            }
            encoder.write(piece)
        })?;
        let wal_meta = self.wal_meta.clone().map(|mut w| {
            w.summary = scanner.map(Scanner::finish);
            w
        });
        encoder.finish(&name, wal_meta)
    }

    /// Catalogs a newly stored object.
    fn record(&self, meta: ObjectMeta) -> Result<Archived> {
        let stored_size = self.stored_size()?;
        catalog::append(self.repo, &WalRecord::new(&self.name, &meta, stored_size))?;
        Ok(Archived::Stored { meta, stored_size })
    }

    /// The size of the stored object, which must exist.
    fn stored_size(&self) -> Result<u64> {
        self.repo
            .storage()
            .size(&self.key)?
            .with_context(|| format!("{} vanished after it was stored", self.key))
    }

    fn conflict(&self, stored: String, offered: String) -> anyhow::Error {
        ConflictError {
            name: self.name.to_string(),
            stored,
            offered,
        }
        .into()
    }

    /// The key is taken: succeed if the stored content is the offered content, else refuse.
    fn compare_with_stored(&mut self) -> Result<Archived> {
        self.file.seek(SeekFrom::Start(0))?;
        let what = self.path.display().to_string();
        let storage = self.repo.storage();
        let key = self.key.as_str();
        let reader = storage
            .open(key)?
            .with_context(|| format!("{key} vanished while comparing"))?;
        // The offered file hashes on a thread of its own while the stored copy is
        // decompressed and hashed: a segment offered again costs about as much as a fresh one.
        let file = &mut self.file;
        let (offered, stored) = std::thread::scope(|scope| {
            let offered =
                scope.spawn(move || object::sha256_of_reader(BufReader::new(file), &what));
            let stored = object::decode(reader, key, &mut std::io::sink());
            let offered = offered.join().expect("hashing the offered file panicked");
            (offered, stored)
        });
        let (offered, _) = offered?;
        let err = match stored {
            Ok(meta) if meta.sha256 == offered => {
                // PostgreSQL recycles the segment on exit 0, so the stored copy must be
                // durable, whoever published it.
                storage.sync(key)?;
                // Its archiver may have died between storing and cataloging it; readers
                // fold a repeated record away.
                let stored_size = self.stored_size()?;
                catalog::append(self.repo, &WalRecord::new(&self.name, &meta, stored_size))?;
                return Ok(Archived::AlreadyStored { meta });
            }
            Ok(meta) => return Err(self.conflict(meta.sha256, offered)),
            Err(e) if object::is_corrupt(&e) => e,
            Err(e) => return Err(e),
        };

        // The stored copy is damaged. Replace it only when its trailer proves the offered
        // bytes are the ones it was meant to hold.
        let mut reader = storage
            .open(key)?
            .with_context(|| format!("{key} vanished"))?;
        match object::read_meta(reader.as_mut(), key).map(|(m, _)| m.sha256) {
            Ok(recorded) if recorded == offered => {
                tracing::warn!(
                    "{key} is corrupt ({err:#}); replacing it with the offered {}, whose \
                     checksum matches the recorded one",
                    self.name
                );
                let mut writer = storage.create(key, Commit::Replace)?;
                let meta = self.store(&mut writer)?;
                writer.commit()?;
                self.record(meta)
            }
            Ok(recorded) => Err(self.conflict(recorded, offered)),
            Err(_) => Err(err.context(format!(
                "{} is already stored but unreadable; inspect {key} in {} by hand",
                self.name,
                storage.location()
            ))),
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
            match name {
                // Every reader of the repository follows timelines through these, and a
                // stored object is never replaced by other bytes: one that does not parse
                // would stop info, status and restore for good.
                WalFileName::History(timeline) => {
                    TimelinePath::parse(*timeline, &text)
                        .with_context(|| format!("refusing {name}"))?;
                }
                _ => {
                    let start = "START WAL LOCATION:";
                    if !text.starts_with(start) {
                        bail!("{name} does not look like a backup history file (no {start:?})");
                    }
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
        summary: None,
    })
}
