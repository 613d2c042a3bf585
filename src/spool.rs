//! The spool: a local, owner-only directory for archive read-ahead markers and restore
//! prefetch.
//!
//! Nothing in the spool is trusted on its own. A read-ahead marker lets `walkeep-archive`
//! skip work only when the file PostgreSQL hands over is provably the file that was pushed
//! (same device, inode, size, mtime and ctime) and the repository still holds its object;
//! a prefetched file is delivered only if it was verified against the checksum its
//! object's trailer recorded and is provably unchanged since (or hashes to it again).
//! Losing the spool loses time, never WAL.
//!
//! Layout:
//!
//! ```text
//! <spool>/<system identifier>-<16 hex digits>/  one per repository and WAL directory
//!     archived/<name>                 read-ahead markers (JSON), see crate::readahead
//!     restore/<name>.<sha256>         prefetched files, see crate::prefetch
//!     restore/<name>.<sha256>.verified  the stamp of a prefetched file once verified
//!     restore/state                   the segments wanted ahead, read and written under flock
//!     restore/worker.lock             held by the running prefetch worker
//!     restore/worker.log              what the last prefetch worker logged
//! ```
//!
//! The hex digits start a SHA-256 of the repository location, the repository's creation
//! time and the canonical WAL directory (`pg_wal`), so two clusters, two repositories or
//! two data directories never share markers or prefetched files, and a repository
//! initialised anew at the same place starts with an empty spool.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::durable;
use crate::repo::Repository;

/// Filesystem types the spool refuses: locks and renames on network filesystems are not
/// what the spool relies on (NFS, SMB, CIFS, SMB2).
const REMOTE_FS_MAGICS: [i64; 4] = [0x6969, 0x517B, 0xFF53_4D42, 0xFE53_4D42];

/// A file's identity on disk: what must not change between checking a file and trusting
/// it later. A write changes the mtime and the ctime, and a ctime cannot be set back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
}

impl Stamp {
    /// The stamp of a file `fstat` or `stat` described as `meta`.
    pub fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }

    /// The stamp of the file at `path`.
    pub fn of_path(path: &Path) -> io::Result<Stamp> {
        fs::metadata(path).map(|m| Stamp::of(&m))
    }
}

/// The spool area of one repository and one WAL directory.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    /// Opens, creating it owner-only if needed, the spool area below `root` for `repo` and
    /// the WAL directory `wal_dir` (the directory of `%p`).
    ///
    /// # Errors
    ///
    /// When `root` cannot be created, is owned by another user, is on a network
    /// filesystem, or lies inside `wal_dir`, where PostgreSQL expects no foreign files.
    pub fn open(root: &Path, repo: &Repository, wal_dir: &Path) -> Result<Spool> {
        let wal_dir = fs::canonicalize(wal_dir)
            .with_context(|| format!("failed to resolve WAL directory {}", wal_dir.display()))?;
        create_dir(root)
            .with_context(|| format!("failed to create spool directory {}", root.display()))?;
        let root = fs::canonicalize(root)
            .with_context(|| format!("failed to resolve spool directory {}", root.display()))?;
        check_root(&root, &wal_dir)?;

        let identity = repo.identity();
        let mut hasher = Sha256::new();
        for part in [
            repo.storage().location(),
            identity.created_at.to_rfc3339(),
            wal_dir.display().to_string(),
        ] {
            hasher.update(part.as_bytes());
            hasher.update([0]);
        }
        let digest = hex::encode(hasher.finalize());
        let dir = root.join(format!("{}-{}", identity.system_identifier, &digest[..16]));
        create_dir(&dir)?;
        Ok(Spool { dir })
    }

    /// The spool area itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<area>/<name>`, created owner-only if missing.
    pub fn subdir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.dir.join(name);
        create_dir(&dir)?;
        Ok(dir)
    }
}

/// Creates `dir` and any missing parents, owner-only. Nothing is synced: the spool is a
/// cache, and a crash that loses part of it loses time, never WAL. Syncing the parent on
/// every `restore_command` call would instead cost a journal commit per call on a busy disk.
pub fn create_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(durable::DIR_MODE)
        .create(dir)
        .with_context(|| format!("failed to create directory {}", dir.display()))
}

fn check_root(root: &Path, wal_dir: &Path) -> Result<()> {
    let meta = fs::metadata(root).with_context(|| format!("failed to stat {}", root.display()))?;
    if !meta.is_dir() {
        bail!("spool {} is not a directory", root.display());
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        bail!(
            "spool directory {} belongs to user id {}, not to this user ({me})",
            root.display(),
            meta.uid()
        );
    }
    if root.starts_with(wal_dir) {
        bail!(
            "spool directory {} is inside the WAL directory {}, where PostgreSQL expects no \
             foreign files; choose a directory outside the data directory",
            root.display(),
            wal_dir.display()
        );
    }
    let fs_type = nix::sys::statfs::statfs(root)
        .with_context(|| format!("failed to statfs {}", root.display()))?
        .filesystem_type();
    #[allow(clippy::unnecessary_cast)] // the field's type differs between targets
    let magic = fs_type.0 as i64;
    if REMOTE_FS_MAGICS.contains(&magic) {
        bail!(
            "spool directory {} is on a network filesystem; it must be local",
            root.display()
        );
    }
    Ok(())
}

/// The largest read-ahead or prefetch width. Each unit is a thread streaming one file with
/// about 3.5 MiB of buffers (measured: read buffer, zstd context, hashing batches), so at
/// this width a call stays well under 64 MiB whatever the backlog or the core count.
pub const MAX_WIDTH: usize = 12;

/// The width used when none is configured: the number of cores, at least 1.
pub fn default_width() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The directory of `path`, `.` when it has none (`%p` is relative to the data directory).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_inside_the_wal_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("pg_wal");
        fs::create_dir(&wal).unwrap();
        let inside = wal.join("spool");
        fs::create_dir(&inside).unwrap();
        let err = check_root(&inside, &wal).unwrap_err().to_string();
        assert!(err.contains("inside the WAL directory"), "{err}");
        check_root(dir.path(), &wal).unwrap();
    }

    #[test]
    fn parent_of_a_bare_name_is_the_current_directory() {
        assert_eq!(parent_dir(Path::new("RECOVERYXLOG")), Path::new("."));
        assert_eq!(parent_dir(Path::new("pg_wal/X")), Path::new("pg_wal"));
    }
}
