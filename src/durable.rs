//! Crash-safe file writes: the one place that renames files into place.
//!
//! The protocol, for every file walkeep publishes on a local filesystem:
//!
//! 1. create a temporary file with a unique name in the destination directory, opened with
//!    `O_CREAT | O_EXCL` and owner-only permissions;
//! 2. write the content and `fsync` the file;
//! 3. publish it under its final name, either with `link(2)`, which fails if the name
//!    already exists (no-clobber), or with `rename(2)`, which replaces atomically;
//! 4. `fsync` the directory, so that the new name itself survives a crash.
//!
//! Until step 4 completes a reader sees either nothing or the old file, never part of the
//! new one. A temporary file left behind by a killed process has a name no reader looks at
//! (it starts with [`TEMP_PREFIX`]) and never blocks a later write, because every temporary
//! name is unique.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// Names of temporary files start with this; listings skip them.
pub const TEMP_PREFIX: &str = ".walkeep-tmp.";

/// Permissions for files walkeep creates: owner read and write only.
pub const FILE_MODE: u32 = 0o600;

/// Permissions for directories walkeep creates: owner only.
pub const DIR_MODE: u32 = 0o700;

/// `fsync`s a directory, making the names created or removed in it durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let handle =
        File::open(dir).with_context(|| format!("failed to open directory {}", dir.display()))?;
    handle
        .sync_all()
        .with_context(|| format!("failed to fsync directory {}", dir.display()))
}

/// Creates `dir` and any missing parents with owner-only permissions, and makes each entry
/// durable by syncing the directory that holds it. The parent of `dir` is synced even when
/// `dir` already exists: whoever created it (another process, or an earlier run killed
/// between `mkdir` and the sync) may not have synced it yet, and what is stored below it
/// would be lost with it in a crash.
pub fn create_dir_all(dir: &Path) -> Result<()> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    if dir.is_dir() {
        // A directory made by someone else may sit in a parent this user cannot open
        // (mode 0711, say) or on a read-only mount: that parent was never ours to sync.
        return match parent.map(fsync_dir) {
            Some(Err(e)) if !is_not_ours(&e) => Err(e),
            _ => Ok(()),
        };
    }
    if let Some(parent) = parent {
        create_dir_all(parent)?;
    }
    match fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => {}
        // Another process made it meanwhile; it may not have synced it yet.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => {
            return Err(e).with_context(|| format!("failed to create directory {}", dir.display()))
        }
    }
    if let Some(parent) = parent {
        fsync_dir(parent)?;
    }
    Ok(())
}

/// True if and only if `err` says the directory may not be opened or written by this user.
fn is_not_ours(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause.downcast_ref::<io::Error>().is_some_and(|e| {
            matches!(
                e.kind(),
                io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
            )
        })
    })
}

/// How publishing a file ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    /// The file is now durable under its final name.
    Created,
    /// A no-clobber publish found the name taken; nothing was changed.
    AlreadyExists,
}

/// A file being written under a unique temporary name, removed unless published.
#[derive(Debug)]
pub struct TempFile {
    file: Option<File>,
    path: PathBuf,
    dir: PathBuf,
}

impl TempFile {
    /// Creates a new temporary file in `dir`, for content that will be published as
    /// `final_name` in that directory.
    pub fn new_in(dir: &Path, final_name: &str) -> Result<TempFile> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let unique = format!(
            "{TEMP_PREFIX}{final_name}.{}.{nanos}.{}.{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            host_tag()
        );
        let path = dir.join(unique);
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&path)
            .with_context(|| format!("failed to create temporary file {}", path.display()))?;
        Ok(TempFile {
            file: Some(file),
            path,
            dir: dir.to_path_buf(),
        })
    }

    /// The temporary path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&mut self) -> &mut File {
        self.file
            .as_mut()
            .expect("temporary file is open until published")
    }

    /// Flushes the content to stable storage and publishes it as `final_path` without ever
    /// replacing an existing file. `final_path` must be in the temporary file's directory.
    pub fn publish_no_clobber(mut self, final_path: &Path) -> Result<Published> {
        self.sync()?;
        let outcome = match fs::hard_link(&self.path, final_path) {
            Ok(()) => Published::Created,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Published::AlreadyExists,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "failed to publish {} as {}",
                        self.path.display(),
                        final_path.display()
                    )
                })
            }
        };
        self.remove_temp()?;
        fsync_dir(&self.dir)?;
        Ok(outcome)
    }

    /// Flushes the content to stable storage and publishes it as `final_path`, atomically
    /// replacing any file of that name.
    pub fn publish_replace(mut self, final_path: &Path) -> Result<()> {
        self.sync()?;
        fs::rename(&self.path, final_path).with_context(|| {
            format!(
                "failed to rename {} to {}",
                self.path.display(),
                final_path.display()
            )
        })?;
        self.file = None;
        fsync_dir(&self.dir)
    }

    /// Publishes as `final_path` by rename without any fsync. Only for files whose
    /// durability another party guarantees (PostgreSQL syncs the WAL it restores and keeps).
    pub fn publish_replace_unsynced(mut self, final_path: &Path) -> Result<()> {
        self.file().flush()?;
        fs::rename(&self.path, final_path).with_context(|| {
            format!(
                "failed to rename {} to {}",
                self.path.display(),
                final_path.display()
            )
        })?;
        self.file = None;
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        let path = self.path.clone();
        let file = self.file();
        file.flush()
            .with_context(|| format!("failed to write {}", path.display()))?;
        file.sync_all()
            .with_context(|| format!("failed to fsync {}", path.display()))
    }

    fn remove_temp(&mut self) -> Result<()> {
        self.file = None;
        fs::remove_file(&self.path)
            .with_context(|| format!("failed to remove temporary file {}", self.path.display()))
    }
}

impl Write for TempFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file().flush()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// This boot's identity (`/proc/sys/kernel/random/boot_id`), `None` where unreadable. A
/// file written without fsync is what was written only until the machine restarts.
pub fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().to_string())
        .filter(|id| !id.is_empty())
}

/// How long a temporary file written from another host, PID namespace or boot is left alone:
/// its writer's process cannot be looked up from here, and no single file takes this long.
const FOREIGN_TEMP_AGE: Duration = Duration::from_secs(24 * 3600);

/// A tag for this host, PID namespace and boot, ending every temporary name: a process id
/// means something only where and while it was issued, and a repository on shared storage
/// may be written from several places (a primary and a standby with `archive_mode =
/// always`, containers with PID namespaces of their own, pods sharing a host name). The
/// tag is the first 48 bits of a SHA-256 of the full host name, the inode of
/// `/proc/self/ns/pid` and the boot id.
fn host_tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        use sha2::{Digest, Sha256};
        use std::os::unix::fs::MetadataExt;
        let mut hasher = Sha256::new();
        let host = nix::unistd::gethostname().unwrap_or_default();
        hasher.update(host.as_encoded_bytes());
        let namespace = fs::metadata("/proc/self/ns/pid").map_or(0, |m| m.ino());
        hasher.update(namespace.to_le_bytes());
        hasher.update(boot_id().unwrap_or_default());
        // The leading letter keeps the tag from ever reading as one of the numbers.
        format!("h{}", hex::encode(&hasher.finalize()[..6]))
    })
}

/// The parts of a temporary file's name: the final name it was for, the writer's process
/// id, and the writer's host tag (absent in names written before hosts were recorded).
/// `None` for a name that is not a temporary file's.
pub fn parse_temp_name(file_name: &str) -> Option<(&str, i32, Option<&str>)> {
    let rest = file_name.strip_prefix(TEMP_PREFIX)?;
    // <final name>.<pid>.<nanos>.<counter>[.<host tag>]
    let (before, last) = rest.rsplit_once('.')?;
    let (numbers, host) = if last.starts_with('h') {
        (before, Some(last))
    } else {
        (rest, None)
    };
    let mut parts = numbers.rsplitn(4, '.');
    let (_counter, _nanos, pid) = (parts.next()?, parts.next()?, parts.next()?);
    let final_name = parts.next()?;
    Some((final_name, pid.parse().ok()?, host))
}

/// Removes temporary files for `final_name` in `dir` that were left by processes which no
/// longer exist (killed before they could clean up). Files of live processes, including
/// this one, are left alone; so are files written from another host, until they are older
/// than [`FOREIGN_TEMP_AGE`]. Returns how many were removed.
pub fn sweep_stale(dir: &Path, final_name: &str) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((for_name, pid, host)) = name.to_str().and_then(parse_temp_name) else {
            continue;
        };
        if for_name != final_name {
            continue;
        }
        let gone = if host.is_none_or(|h| h == host_tag()) {
            pid != std::process::id() as i32
                && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                    == Err(nix::errno::Errno::ESRCH)
        } else {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > FOREIGN_TEMP_AGE)
        };
        if gone && fs::remove_file(entry.path()).is_ok() {
            tracing::debug!(
                "removed {} left by exited process {pid}",
                entry.path().display()
            );
            removed += 1;
        }
    }
    removed
}

/// Writes `content` to `path` durably, replacing any existing file.
pub fn write_replace(path: &Path, content: &[u8]) -> Result<()> {
    let (dir, name) = split(path)?;
    let mut temp = TempFile::new_in(dir, name)?;
    temp.write_all(content)
        .with_context(|| format!("failed to write {}", temp.path().display()))?;
    temp.publish_replace(path)
}

/// Writes `content` to `path` durably unless `path` exists already.
pub fn write_no_clobber(path: &Path, content: &[u8]) -> Result<Published> {
    let (dir, name) = split(path)?;
    let mut temp = TempFile::new_in(dir, name)?;
    temp.write_all(content)
        .with_context(|| format!("failed to write {}", temp.path().display()))?;
    temp.publish_no_clobber(path)
}

fn split(path: &Path) -> Result<(&Path, &str)> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no file name", path.display()))?;
    Ok((dir, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(TEMP_PREFIX))
            .collect()
    }

    #[test]
    fn no_clobber_keeps_the_first_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        assert_eq!(write_no_clobber(&path, b"one").unwrap(), Published::Created);
        assert_eq!(
            write_no_clobber(&path, b"two").unwrap(),
            Published::AlreadyExists
        );
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn replace_swaps_content_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        write_replace(&path, b"one").unwrap();
        write_replace(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn dropped_temp_file_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut temp = TempFile::new_in(dir.path(), "a").unwrap();
        temp.write_all(b"partial").unwrap();
        drop(temp);
        assert!(leftovers(dir.path()).is_empty());
        assert!(!dir.path().join("a").exists());
    }

    #[test]
    fn stale_temp_file_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(format!("{TEMP_PREFIX}a.1.2.0")), b"junk").unwrap();
        write_no_clobber(&dir.path().join("a"), b"one").unwrap();
        assert_eq!(fs::read(dir.path().join("a")).unwrap(), b"one");
    }

    #[test]
    fn sweep_removes_temps_of_dead_processes_only() {
        let dir = tempfile::tempdir().unwrap();
        // PIDs above the kernel's maximum (4194304) never exist.
        let dead = dir.path().join(format!("{TEMP_PREFIX}seg.99999999.1.0"));
        let other_name = dir.path().join(format!("{TEMP_PREFIX}other.99999999.1.0"));
        fs::write(&dead, b"x").unwrap();
        fs::write(&other_name, b"x").unwrap();
        let mut live = TempFile::new_in(dir.path(), "seg").unwrap();
        live.write_all(b"y").unwrap();
        assert_eq!(sweep_stale(dir.path(), "seg"), 1);
        assert!(!dead.exists());
        assert!(other_name.exists());
        assert!(live.path().exists());
    }

    #[test]
    fn temp_names_carry_the_host_and_foreign_ones_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mine = TempFile::new_in(dir.path(), "a.b.backup").unwrap();
        let name = mine
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let (final_name, pid, host) = parse_temp_name(&name).unwrap();
        assert_eq!(final_name, "a.b.backup");
        assert_eq!(pid, std::process::id() as i32);
        assert_eq!(host, Some(host_tag()));

        for (name, expected) in [
            (".walkeep-tmp.seg.12.34.5", Some(("seg", 12, None))),
            (
                ".walkeep-tmp.x.y.12.34.5.hnode-2",
                Some(("x.y", 12, Some("hnode-2"))),
            ),
            (".walkeep-tmp.seg.12.34", None),
            (".walkeep-tmp.seg.pid.34.5", None),
            ("seg.12.34.5", None),
        ] {
            assert_eq!(parse_temp_name(name), expected, "{name}");
        }

        // A dead process id on another host means nothing here: its file stays until it
        // is older than a day.
        let foreign = dir
            .path()
            .join(format!("{TEMP_PREFIX}seg.99999999.1.0.hother-host"));
        fs::write(&foreign, b"x").unwrap();
        assert_eq!(sweep_stale(dir.path(), "seg"), 0);
        assert!(foreign.exists());
        let old = SystemTime::now() - FOREIGN_TEMP_AGE - Duration::from_secs(60);
        File::options()
            .write(true)
            .open(&foreign)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(sweep_stale(dir.path(), "seg"), 1);
        assert!(!foreign.exists());
    }

    #[test]
    fn files_and_dirs_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("x/y");
        create_dir_all(&sub).unwrap();
        write_replace(&sub.join("f"), b"1").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&sub), DIR_MODE);
        assert_eq!(mode(&sub.join("f")), FILE_MODE);
    }
}
