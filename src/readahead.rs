//! Archive read-ahead: pushing files PostgreSQL has marked `.ready` before it asks.
//!
//! PostgreSQL runs `archive_command` for one file at a time and waits. When it asks for
//! file N and others are already waiting (their `.ready` files are in
//! `<dir of %p>/archive_status`), [`archive`] stores up to `width` of them alongside N, each
//! on a thread of its own and each through [`archive::archive_opened`]: the same checks,
//! checksum, compression and durability as a call from PostgreSQL. After a pushed file's
//! object is durable it writes a marker, `<spool area>/archived/<name>`, recording the
//! file's device, inode, size, mtime and ctime as `fstat` gave them before and after
//! reading, the SHA-256 and the stored size.
//!
//! When PostgreSQL later asks for a pushed file, the call returns at once without reading
//! it, but only if `stat` of `%p` matches the marker exactly and the repository still holds
//! an object of the recorded size. A write to the file changes its mtime and ctime, and a
//! ctime cannot be set back, so a file changed since it was pushed, even with its mtime
//! restored, is archived in full (and refused, as usual, if its bytes differ).
//!
//! The invariants:
//!
//! - a call reports success only for a file whose object is durable in the repository;
//! - only files PostgreSQL has marked `.ready` are read, and nothing in `pg_wal` is ever
//!   written, renamed or removed;
//! - a failure of a file pushed ahead never fails the call for N: it is logged, and
//!   PostgreSQL offers the file again later, which then takes the full path;
//! - memory is bounded by `width`: at most `width + 1` files stream at once, in 1 MiB
//!   chunks, and choosing what to push keeps `width` names whatever the backlog.
//!
//! The call for N waits for the files pushed with it, so no temporary object is abandoned
//! and a call takes about as long as the slowest file of its batch.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::archive::{self, Archived};
use crate::durable::{self, TEMP_PREFIX};
use crate::object::Compression;
use crate::repo::{self, Repository};
use crate::spool::{self, Spool, Stamp};
use crate::wal::WalFileName;

/// The spool subdirectory that holds read-ahead markers.
pub const MARKERS_DIR: &str = "archived";

/// The read-ahead width for a configured `width`: the number of cores when none is, and
/// at most [`spool::MAX_WIDTH`].
pub fn width(configured: Option<usize>) -> usize {
    configured
        .unwrap_or_else(spool::default_width)
        .min(spool::MAX_WIDTH)
}

/// What a call may hold in memory for objects uploaded whole (see
/// [`crate::storage::Storage::buffers_conditional_creates`]), this file's included.
const BUFFERED_OBJECTS_BUDGET: u64 = 48 << 20;

/// `width`, lowered where each object in flight is held in memory until uploaded, so that
/// the call's objects fit [`BUFFERED_OBJECTS_BUDGET`] even if the WAL does not compress.
fn bounded_by_memory(repo: &Repository, width: usize) -> usize {
    if !repo.storage().buffers_conditional_creates() {
        return width;
    }
    let in_flight = (BUFFERED_OBJECTS_BUDGET / repo.segment_size()).max(1) as usize;
    width.min(in_flight - 1)
}

/// How a call for one file ended.
#[derive(Debug)]
pub enum Outcome {
    /// This call archived the file (or found it already archived with identical content).
    Archived(Archived),
    /// An earlier call pushed this very file ahead; it was not read again.
    PushedEarlier {
        /// SHA-256 of the file, as recorded when it was pushed.
        sha256: String,
        /// When it was pushed.
        pushed_at: DateTime<Utc>,
    },
}

/// What is recorded once a file pushed ahead is durable in the repository.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    /// The WAL file name.
    name: String,
    /// The object's key in the repository.
    key: String,
    /// The file as `fstat` saw it before and after it was read.
    stamp: Stamp,
    /// SHA-256 of the file.
    sha256: String,
    /// Size of the stored object.
    stored_size: u64,
    /// When it was pushed.
    pushed_at: DateTime<Utc>,
}

/// Archives `path` as `name` like [`archive::archive_file`], with read-ahead through the
/// spool below `spool_root`: returns at once for a file pushed ahead earlier, and pushes up
/// to `width` other `.ready` files alongside this one.
///
/// A spool that cannot be used (see [`Spool::open`]) is logged and the file is archived
/// without read-ahead.
pub fn archive(
    repo: &Repository,
    path: &Path,
    name: &str,
    level: i32,
    spool_root: &Path,
    width: usize,
) -> Result<Outcome> {
    let wal_dir = spool::parent_dir(path);
    let markers = Spool::open(spool_root, repo, wal_dir).and_then(|s| s.subdir(MARKERS_DIR));
    let markers = match markers {
        Ok(markers) => markers,
        Err(err) => {
            tracing::warn!("archiving {name} without read-ahead: {err:#}");
            let alone = Compression::parallel(level);
            return archive::archive_file(repo, path, name, alone).map(Outcome::Archived);
        }
    };
    let Ok(wal_name) = name.parse::<WalFileName>() else {
        // Not a WAL name: the full path refuses it with the usual message.
        let alone = Compression::parallel(level);
        return archive::archive_file(repo, path, name, alone).map(Outcome::Archived);
    };

    if let Some(outcome) = pushed_earlier(repo, &markers, path, &wal_name) {
        return Ok(outcome);
    }

    let width = bounded_by_memory(repo, width);
    let status_dir = wal_dir.join("archive_status");
    let ahead = if width > 0 {
        choose_ahead(wal_dir, &status_dir, &markers, &wal_name, width)
    } else {
        Vec::new()
    };
    prune_markers(&markers, &status_dir);
    std::thread::scope(|scope| {
        let pushes: Vec<_> = ahead
            .iter()
            .map(|ahead| {
                let (wal_dir, status_dir, markers) = (wal_dir, &status_dir, &markers);
                scope.spawn(move || push_ahead(repo, wal_dir, status_dir, markers, ahead, level))
            })
            .collect();
        // With pushes in flight the cores are taken: each file compresses on its own thread.
        let compression = if ahead.is_empty() {
            Compression::parallel(level)
        } else {
            Compression::single(level)
        };
        let outcome = archive::archive_file(repo, path, name, compression);
        for (push, ahead) in pushes.into_iter().zip(&ahead) {
            match push.join() {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => tracing::debug!("{ahead} was no longer waiting; not pushed"),
                Ok(Err(err)) => tracing::warn!(
                    "pushing {ahead} ahead failed; it is archived when PostgreSQL offers it: \
                     {err:#}"
                ),
                Err(_) => tracing::warn!("pushing {ahead} ahead panicked"),
            }
        }
        outcome.map(Outcome::Archived)
    })
}

/// The outcome for a file pushed ahead earlier, if and only if its marker proves `path` is
/// that file and the repository still holds its object. The marker is removed either way.
fn pushed_earlier(
    repo: &Repository,
    markers: &Path,
    path: &Path,
    name: &WalFileName,
) -> Option<Outcome> {
    let marker_path = markers.join(name.to_string());
    let text = match fs::read(&marker_path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::debug!("ignoring marker {}: {e}", marker_path.display());
            return None;
        }
    };
    let proof = serde_json::from_slice::<Marker>(&text)
        .context("unreadable marker")
        .and_then(|marker| prove(repo, &marker, path, name).map(|()| marker));
    // A marker serves once: PostgreSQL marks the file done after this call.
    let _ = fs::remove_file(&marker_path);
    match proof {
        Ok(marker) => Some(Outcome::PushedEarlier {
            sha256: marker.sha256,
            pushed_at: marker.pushed_at,
        }),
        Err(why) => {
            tracing::debug!("{name} was pushed ahead but is archived again: {why:#}");
            None
        }
    }
}

/// Succeeds if and only if `marker` proves that `path` is the file it records and that the
/// repository holds that object.
fn prove(repo: &Repository, marker: &Marker, path: &Path, name: &WalFileName) -> Result<()> {
    let key = repo::wal_key(name);
    if marker.name != name.to_string() || marker.key != key {
        bail!("the marker is for {} ({})", marker.name, marker.key);
    }
    if path.file_name().and_then(|n| n.to_str()) != Some(marker.name.as_str()) {
        bail!("{} is not the file that was pushed", path.display());
    }
    let now = Stamp::of_path(path).with_context(|| format!("failed to stat {}", path.display()))?;
    if now != marker.stamp {
        bail!(
            "{} changed since it was pushed: recorded {:?}, now {now:?}",
            path.display(),
            marker.stamp
        );
    }
    // Only the object's presence and size are checked, not its content: reading it back
    // would cost what read-ahead saves. `walkeep verify` reads every object.
    match repo.storage().size(&key)? {
        Some(size) if size == marker.stored_size => Ok(()),
        Some(size) => bail!(
            "{key} is {size} bytes, {} when it was pushed",
            marker.stored_size
        ),
        None => bail!("{key} is no longer in the repository"),
    }
}

/// The order in which PostgreSQL archives waiting files: timeline history files first,
/// then by name.
fn archive_order(name: &WalFileName) -> (u8, String) {
    let rank = u8::from(!matches!(name, WalFileName::History(_)));
    (rank, name.to_string())
}

/// Up to `width` files marked `.ready`, other than `current`, in PostgreSQL's order, that
/// have no marker matching the file already. Keeps `width` names, whatever the backlog.
fn choose_ahead(
    wal_dir: &Path,
    status_dir: &Path,
    markers: &Path,
    current: &WalFileName,
    width: usize,
) -> Vec<WalFileName> {
    let entries = match fs::read_dir(status_dir) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::debug!("no read-ahead: cannot list {}: {e}", status_dir.display());
            return Vec::new();
        }
    };
    let mut chosen: BTreeSet<((u8, String), WalFileName)> = BTreeSet::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(name) = file_name
            .to_str()
            .and_then(|n| n.strip_suffix(".ready"))
            .and_then(|n| n.parse::<WalFileName>().ok())
        else {
            continue;
        };
        if name == *current {
            continue;
        }
        let order = archive_order(&name);
        if chosen.len() == width && chosen.last().is_some_and(|(last, _)| order >= *last) {
            continue;
        }
        if already_pushed(wal_dir, markers, &name) {
            continue;
        }
        chosen.insert((order, name));
        if chosen.len() > width {
            chosen.pop_last();
        }
    }
    chosen.into_iter().map(|(_, name)| name).collect()
}

/// True if and only if a marker for `name` matches the file in `wal_dir` as it is now.
fn already_pushed(wal_dir: &Path, markers: &Path, name: &WalFileName) -> bool {
    let name = name.to_string();
    let Ok(text) = fs::read(markers.join(&name)) else {
        return false;
    };
    let Ok(marker) = serde_json::from_slice::<Marker>(&text) else {
        return false;
    };
    Stamp::of_path(&wal_dir.join(&name)).is_ok_and(|now| now == marker.stamp)
}

/// Removes markers of files no longer waiting (PostgreSQL has archived them, or they are
/// gone), and temporary files left by killed processes.
fn prune_markers(markers: &Path, status_dir: &Path) {
    if !status_dir.is_dir() {
        return;
    }
    let Ok(entries) = fs::read_dir(markers) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        if file_name.starts_with(TEMP_PREFIX) {
            if let Some((final_name, _, _)) = durable::parse_temp_name(file_name) {
                durable::sweep_stale(markers, final_name);
            }
            continue;
        }
        if !status_dir.join(format!("{file_name}.ready")).exists() {
            tracing::debug!("removing marker of {file_name}, which is no longer waiting");
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Pushes `name` from `wal_dir` into the repository and records a marker once its object
/// is durable. `Ok(false)` if the file is no longer waiting (not marked `.ready`, or gone).
fn push_ahead(
    repo: &Repository,
    wal_dir: &Path,
    status_dir: &Path,
    markers: &Path,
    name: &WalFileName,
    level: i32,
) -> Result<bool> {
    // Only what PostgreSQL has marked ready; it never takes the mark back before the
    // archiver has been called for the file, which is after this call.
    if !status_dir.join(format!("{name}.ready")).exists() {
        return Ok(false);
    }
    let path: PathBuf = wal_dir.join(name.to_string());
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("failed to open {}", path.display())),
    };
    let stat = |file: &File| -> Result<Stamp> {
        let meta = file
            .metadata()
            .with_context(|| format!("failed to stat {}", path.display()))?;
        Ok(Stamp::of(&meta))
    };
    let before = stat(&file)?;
    let reader = file
        .try_clone()
        .with_context(|| format!("failed to duplicate the handle of {}", path.display()))?;

    let single = Compression::single(level);
    let archived = archive::archive_opened(repo, reader, &path, *name, single)?;

    // The marker must describe the bytes that were stored: the file may not have changed
    // while it was read, and the name must still lead to it.
    let after = stat(&file)?;
    let named = Stamp::of_path(&path).ok();
    if after != before || named != Some(before) {
        bail!(
            "{} changed while it was read; stored, but it will be archived again when \
             PostgreSQL offers it",
            path.display()
        );
    }
    let key = repo::wal_key(name);
    let (meta, stored_size) = match archived {
        Archived::Stored { meta, stored_size } => (meta, stored_size),
        Archived::AlreadyStored { meta } => {
            let size = repo.storage().size(&key)?;
            (meta, size.with_context(|| format!("{key} vanished"))?)
        }
    };
    let marker = Marker {
        name: name.to_string(),
        key,
        stamp: before,
        sha256: meta.sha256,
        stored_size,
        pushed_at: Utc::now(),
    };
    durable::write_replace(
        &markers.join(name.to_string()),
        &serde_json::to_vec_pretty(&marker)?,
    )?;
    tracing::info!(
        "pushed {name} ahead ({} bytes, stored {stored_size} bytes, sha256 {})",
        meta.size,
        &marker.sha256[..16]
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_files_come_first_then_names() {
        let mut names: Vec<WalFileName> = [
            "000000010000000000000007",
            "00000002.history",
            "000000010000000000000005",
            "000000010000000000000005.00000028.backup",
        ]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
        names.sort_by_key(archive_order);
        let sorted: Vec<String> = names.iter().map(ToString::to_string).collect();
        assert_eq!(
            sorted,
            [
                "00000002.history",
                "000000010000000000000005",
                "000000010000000000000005.00000028.backup",
                "000000010000000000000007"
            ]
        );
    }

    #[test]
    fn choice_is_bounded_and_skips_the_current_file() {
        let dir = tempfile::tempdir().unwrap();
        let status = dir.path().join("archive_status");
        let markers = dir.path().join("markers");
        fs::create_dir(&status).unwrap();
        fs::create_dir(&markers).unwrap();
        for seg in 1..=9u32 {
            fs::write(
                status.join(format!("0000000100000000000000{seg:02X}.ready")),
                "",
            )
            .unwrap();
        }
        fs::write(status.join("000000010000000000000001.done"), "").unwrap();
        fs::write(status.join("garbage.ready"), "").unwrap();
        let current: WalFileName = "000000010000000000000003".parse().unwrap();
        let chosen = choose_ahead(dir.path(), &status, &markers, &current, 3);
        let chosen: Vec<String> = chosen.iter().map(ToString::to_string).collect();
        assert_eq!(
            chosen,
            [
                "000000010000000000000001",
                "000000010000000000000002",
                "000000010000000000000004"
            ]
        );
    }

    #[test]
    fn markers_of_files_no_longer_waiting_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let status = dir.path().join("archive_status");
        let markers = dir.path().join("markers");
        fs::create_dir(&status).unwrap();
        fs::create_dir(&markers).unwrap();
        fs::write(status.join("000000010000000000000002.ready"), "").unwrap();
        fs::write(status.join("000000010000000000000001.done"), "").unwrap();
        fs::write(markers.join("000000010000000000000001"), "{}").unwrap();
        fs::write(markers.join("000000010000000000000002"), "{}").unwrap();
        let dead_temp = format!("{TEMP_PREFIX}000000010000000000000003.99999999.1.0");
        fs::write(markers.join(&dead_temp), "{").unwrap();
        prune_markers(&markers, &status);
        let mut left: Vec<String> = fs::read_dir(&markers)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["000000010000000000000002"]);
    }
}
