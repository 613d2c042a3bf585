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

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{Context, Result};

use crate::durable::{self, TempFile};
use crate::object::{self, ObjectMeta};
use crate::repo::{self, Repository};
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
    let wal_name: WalFileName = name.parse()?;
    let key = repo::wal_key(&wal_name);
    let Some(reader) = repo.storage().open(&key)? else {
        return Ok(Fetched::Absent);
    };

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
    let mut temp = TempFile::new_in(dir, file_name)?;
    let meta = object::decode(reader, &key, &mut temp)?;
    if meta.name != name {
        anyhow::bail!("{key} holds {:?}, not {name}", meta.name);
    }

    if let WalFileName::Segment(segment) | WalFileName::Partial(segment) = wal_name {
        let file = temp.file();
        file.seek(SeekFrom::Start(0))?;
        let mut header = [0u8; wal::LONG_PAGE_HEADER_SIZE];
        file.read_exact(&mut header)
            .with_context(|| format!("failed to re-read {name}"))?;
        LongPageHeader::parse(&header)
            .and_then(|h| h.check_segment(&segment, &repo.identity().expectation()))
            .with_context(|| {
                format!("restored {name} does not belong to this repository's cluster")
            })?;
    }

    temp.publish_replace_unsynced(dest)?;
    Ok(Fetched::Restored(Box::new(meta)))
}
