//! `restore_command`: delivering one WAL file from the repository to PostgreSQL.
//!
//! The invariant: [`restore_file`] returns [`Fetched::Restored`] only when the complete
//! file, decompressed and checked against its SHA-256 (and, for segments, its header
//! against the repository's cluster), is at the destination path. It returns
//! [`Fetched::Absent`] only when the repository is readable and holds no such file; every
//! other outcome is an error, which the binary reports as fatal so that PostgreSQL does
//! not end recovery early.
//!
//! The file is written under a temporary name beside the destination and renamed into
//! place, so the destination never holds part of a file. It is not fsynced: PostgreSQL
//! fsyncs the restored WAL it keeps (and reads the rest once, from the page cache).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::durable::{self, TempFile};
use crate::expire;
use crate::object::{self, ObjectMeta};
use crate::repo::{self, Repository};
use crate::storage::ObjectRead;
use crate::wal::{self, LongPageHeader, WalFileName};

/// How a restore call ended.
#[derive(Debug)]
pub enum Fetched {
    /// The file is at the destination.
    Restored(Box<ObjectMeta>),
    /// The repository has no such file.
    Absent,
}

/// Restores WAL file `name` from the repository to `dest`.
pub fn restore_file(repo: &Repository, name: &str, dest: &Path) -> Result<Fetched> {
    let Some(found) = find(repo, name)? else {
        return Ok(Fetched::Absent);
    };
    let meta = restore_found(repo, found, dest)?;
    Ok(Fetched::Restored(Box::new(meta)))
}

/// A WAL file found in the repository, opened but not read yet.
pub struct Found {
    name: WalFileName,
    key: String,
    reader: Box<dyn ObjectRead>,
}

/// Opens WAL file `name` in the repository; `None` if and only if the repository is
/// readable and holds no such file, and `walkeep expire` did not delete it (a file below
/// the expiry horizon is an error: the recovery asking for it cannot be completed).
pub fn find(repo: &Repository, name: &str) -> Result<Option<Found>> {
    let wal_name: WalFileName = name.parse()?;
    let key = repo::wal_key(&wal_name);
    if let Some(reader) = repo.storage().open(&key)? {
        return Ok(Some(Found {
            name: wal_name,
            key,
            reader,
        }));
    }
    if let WalFileName::Segment(s) | WalFileName::Partial(s) | WalFileName::BackupHistory(s, _) =
        &wal_name
    {
        if let Some(horizon) = expire::horizon(repo)? {
            if s.segno(repo.segment_size())? < horizon.below_segno {
                bail!(
                    "{name} was deleted by walkeep expire ({}: WAL before {} is gone); \
                     this recovery started from an expired backup and cannot go on: restore \
                     from a retained backup",
                    horizon.raised_at,
                    horizon.below
                );
            }
        }
    }
    Ok(None)
}

/// Restores a found file to `dest`, with the guarantees of [`restore_file`].
pub fn restore_found(repo: &Repository, found: Found, dest: &Path) -> Result<ObjectMeta> {
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("restore");
    // A restore killed earlier (PostgreSQL stops restore_command with SIGTERM at shutdown)
    // leaves its temporary file here, in pg_wal, where nobody else would remove it.
    durable::sweep_stale(dir, file_name);
    let (temp, meta) = decode_verified(repo, found, dir, file_name)?;
    temp.publish_replace_unsynced(dest)?;
    Ok(meta)
}

/// Decompresses a found file into a new temporary file in `dir` (named for `final_name`),
/// checking its SHA-256 and, for segments, its header; the caller publishes it.
pub fn decode_verified(
    repo: &Repository,
    found: Found,
    dir: &Path,
    final_name: &str,
) -> Result<(TempFile, ObjectMeta)> {
    let Found { name, key, reader } = found;
    let mut temp = TempFile::new_in(dir, final_name)?;
    let meta = object::decode(reader, &key, &mut temp)?;
    if meta.name != name.to_string() {
        anyhow::bail!("{key} holds {:?}, not {name}", meta.name);
    }
    check_header(repo, &name, temp.file())?;
    Ok((temp, meta))
}

/// Checks that a segment (or partial segment) in `file` belongs to the repository's
/// cluster under `name`; other kinds of file pass.
pub fn check_header(repo: &Repository, name: &WalFileName, file: &mut File) -> Result<()> {
    if let WalFileName::Segment(segment) | WalFileName::Partial(segment) = name {
        file.seek(SeekFrom::Start(0))?;
        let mut header = [0u8; wal::LONG_PAGE_HEADER_SIZE];
        file.read_exact(&mut header)
            .with_context(|| format!("failed to re-read {name}"))?;
        LongPageHeader::parse(&header)
            .and_then(|h| h.check_segment(segment, &repo.identity().expectation()))
            .with_context(|| {
                format!("restored {name} does not belong to this repository's cluster")
            })?;
    }
    Ok(())
}
