//! The local-filesystem backend: a repository in a directory.
//!
//! Keys map to paths below the root. Objects are written through [`crate::durable`], so an
//! object appears under its key only once its bytes and its directory entry are on disk,
//! and `Commit::IfAbsent` uses `link(2)`, which the kernel refuses when the name exists.
//! Record logs are append-only files guarded by `flock(2)`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fs2::FileExt;

use super::{
    validate_key, Commit, Committed, LockGuard, ObjectInfo, ObjectRead, ObjectWriter, RecordEdit,
    Storage,
};
use crate::durable::{self, Published, TempFile, FILE_MODE};

/// A repository directory on a local (or locally mounted) filesystem.
#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    /// Storage rooted at `root`, which must exist.
    pub fn new(root: impl Into<PathBuf>) -> LocalStorage {
        LocalStorage { root: root.into() }
    }

    /// The repository directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    fn list_into(&self, dir: &Path, key_prefix: &str, out: &mut Vec<ObjectInfo>) -> Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("failed to list {}", dir.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("failed to list {}", dir.display()))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let key = if key_prefix.is_empty() {
                name
            } else {
                format!("{key_prefix}/{name}")
            };
            let meta = entry
                .metadata()
                .with_context(|| format!("failed to stat {key}"))?;
            if meta.is_dir() {
                self.list_into(&entry.path(), &key, out)?;
            } else if meta.is_file() {
                out.push(ObjectInfo {
                    key,
                    size: meta.len(),
                });
            }
        }
        Ok(())
    }

    /// Opens the record log for appending, locked, and checks that the locked file is
    /// still the one under the name (a rewrite may have replaced it while we waited).
    fn open_log_locked(&self, path: &Path) -> Result<File> {
        loop {
            let existed = path.exists();
            let file = OpenOptions::new()
                .append(true)
                .read(true)
                .create(true)
                .mode(FILE_MODE)
                .open(path)
                .with_context(|| format!("failed to open record log {}", path.display()))?;
            if !existed {
                durable::fsync_dir(path.parent().expect("log has a parent"))?;
            }
            FileExt::lock_exclusive(&file)
                .with_context(|| format!("failed to lock {}", path.display()))?;
            if still_named(&file, path)? {
                return Ok(file);
            }
        }
    }

    /// Opens the record log for reading under a shared lock, which waits out an append in
    /// progress (appends hold the exclusive lock while they write), and checks that the
    /// locked file is still the one under the name. `None` if there is no log.
    fn open_log_shared(&self, path: &Path) -> Result<Option<File>> {
        loop {
            let file = match File::open(path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => {
                    return Err(e).with_context(|| format!("failed to open {}", path.display()))
                }
            };
            FileExt::lock_shared(&file)
                .with_context(|| format!("failed to lock {}", path.display()))?;
            if still_named(&file, path)? {
                return Ok(Some(file));
            }
        }
    }
}

/// True if and only if `file` is still the file under `path`: a rewrite renames a new log
/// over the old one, so a lock taken on the old file after waiting protects nothing.
fn still_named(file: &File, path: &Path) -> Result<bool> {
    let current = fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    let locked = file.metadata()?;
    Ok(current == Some((locked.dev(), locked.ino())))
}

/// The non-empty lines of a record log, read from its start.
fn read_lines(mut file: &File, path: &Path) -> Result<Vec<Vec<u8>>> {
    file.seek(SeekFrom::Start(0))
        .with_context(|| format!("failed to read {}", path.display()))?;
    let mut records = Vec::new();
    for line in BufReader::new(file).split(b'\n') {
        let line = line.with_context(|| format!("failed to read {}", path.display()))?;
        if !line.is_empty() {
            records.push(line);
        }
    }
    Ok(records)
}

struct LocalWriter {
    temp: TempFile,
    final_path: PathBuf,
    mode: Commit,
}

impl Write for LocalWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.temp.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.temp.flush()
    }
}

impl ObjectWriter for LocalWriter {
    fn commit(self: Box<Self>) -> Result<Committed> {
        let LocalWriter {
            temp,
            final_path,
            mode,
        } = *self;
        match mode {
            Commit::IfAbsent => Ok(match temp.publish_no_clobber(&final_path)? {
                Published::Created => Committed::Created,
                Published::AlreadyExists => Committed::AlreadyExists,
            }),
            Commit::Replace => {
                temp.publish_replace(&final_path)?;
                Ok(Committed::Created)
            }
        }
    }
}

struct FileLock(#[allow(dead_code)] File);

impl LockGuard for FileLock {}

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = FileExt::unlock(&self.0);
    }
}

impl Storage for LocalStorage {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn open(&self, key: &str) -> Result<Option<Box<dyn ObjectRead>>> {
        let path = self.path(key)?;
        match File::open(&path) {
            Ok(file) => Ok(Some(Box::new(file))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // An absent object is only "absent" if the repository itself is there;
                // a missing or unmounted root must never read as "no such WAL".
                if !self.root.is_dir() {
                    anyhow::bail!(
                        "repository directory {} is not accessible",
                        self.root.display()
                    );
                }
                Ok(None)
            }
            Err(e) => Err(e).with_context(|| format!("failed to open {}", path.display())),
        }
    }

    fn size(&self, key: &str) -> Result<Option<u64>> {
        let path = self.path(key)?;
        match fs::metadata(&path) {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("failed to stat {}", path.display())),
        }
    }

    fn sync(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        File::open(&path)
            .and_then(|file| file.sync_all())
            .with_context(|| format!("failed to fsync {}", path.display()))?;
        // Every directory from the object's up to the root holds a name it depends on.
        let mut dir = path.parent();
        while let Some(d) = dir.filter(|d| d.starts_with(&self.root)) {
            durable::fsync_dir(d)?;
            dir = d.parent();
        }
        Ok(())
    }

    fn create(&self, key: &str, mode: Commit) -> Result<Box<dyn ObjectWriter>> {
        let final_path = self.path(key)?;
        let dir = final_path
            .parent()
            .expect("keys have a parent")
            .to_path_buf();
        durable::create_dir_all(&dir)?;
        let name = final_path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("validated key");
        durable::sweep_stale(&dir, name);
        let temp = TempFile::new_in(&dir, name)?;
        Ok(Box::new(LocalWriter {
            temp,
            final_path,
            mode,
        }))
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => durable::fsync_dir(path.parent().expect("keys have a parent")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("failed to remove {}", path.display())),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        // Walk the deepest directory the prefix names, then filter by the rest of it.
        let dir_part = prefix.rsplit_once('/').map_or("", |(dir, _)| dir);
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else {
            self.path(dir_part)?
        };
        let mut out = Vec::new();
        self.list_into(&start, dir_part, &mut out)?;
        out.retain(|o| o.key.starts_with(prefix));
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn list_children(&self, prefix: &str) -> Result<Vec<String>> {
        let dir = match prefix {
            "" => "",
            _ => prefix
                .strip_suffix('/')
                .context("a prefix to list is empty or ends with '/'")?,
        };
        let path = if dir.is_empty() {
            self.root.clone()
        } else {
            self.path(dir)?
        };
        let entries = match fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("failed to list {}", path.display())),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("failed to list {}", path.display()))?;
            if let Some(name) = entry.file_name().to_str().filter(|n| !n.starts_with('.')) {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    fn delete_prefix(&self, prefix: &str) -> Result<()> {
        let dir = prefix
            .strip_suffix('/')
            .context("a prefix to delete ends with '/'")?;
        let path = self.path(dir)?;
        match fs::remove_dir_all(&path) {
            Ok(()) => durable::fsync_dir(path.parent().expect("keys have a parent")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("failed to remove {}", path.display())),
        }
    }

    fn append_record(&self, log: &str, record: &[u8]) -> Result<()> {
        let path = self.path(log)?;
        durable::create_dir_all(path.parent().expect("keys have a parent"))?;
        let mut file = self.open_log_locked(&path)?;

        // A writer killed mid-record leaves a line without its newline; end it, so that
        // the torn record stays alone on its line and is skipped by readers.
        let len = file.metadata()?.len();
        let mut line = Vec::with_capacity(record.len() + 2);
        if len > 0 {
            let mut last = [0u8];
            file.seek(SeekFrom::Start(len - 1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                line.push(b'\n');
            }
        }
        line.extend_from_slice(record);
        line.push(b'\n');
        file.write_all(&line)
            .with_context(|| format!("failed to append to {}", path.display()))?;
        file.sync_data()
            .with_context(|| format!("failed to fsync {}", path.display()))
    }

    fn read_records(&self, log: &str) -> Result<Vec<Vec<u8>>> {
        let path = self.path(log)?;
        match self.open_log_shared(&path)? {
            Some(file) => read_lines(&file, &path),
            None => Ok(Vec::new()),
        }
    }

    fn rewrite_records(&self, log: &str, edit: &mut RecordEdit<'_>) -> Result<()> {
        let path = self.path(log)?;
        durable::create_dir_all(path.parent().expect("keys have a parent"))?;
        // Hold the log's lock from the read to the rename, so no append slips in between.
        // Appenders waiting on the old file notice the replacement and retry on the new one.
        let locked = self.open_log_locked(&path)?;
        let records = edit(read_lines(&locked, &path)?)?;
        let mut content = Vec::new();
        for record in &records {
            content.extend_from_slice(record);
            content.push(b'\n');
        }
        durable::write_replace(&path, &content)
    }

    fn lock(&self, name: &str, exclusive: bool) -> Result<Box<dyn LockGuard>> {
        let path = self.path(&format!("locks/{name}.lock"))?;
        durable::create_dir_all(path.parent().expect("keys have a parent"))?;
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&path)
            .with_context(|| format!("failed to open lock file {}", path.display()))?;
        let locked = if exclusive {
            FileExt::lock_exclusive(&file)
        } else {
            FileExt::lock_shared(&file)
        };
        locked.with_context(|| format!("failed to lock {}", path.display()))?;
        Ok(Box::new(FileLock(file)))
    }

    fn check_writable(&self) -> Result<()> {
        let mut temp = TempFile::new_in(&self.root, "write-check")
            .with_context(|| format!("repository {} is not writable", self.root.display()))?;
        temp.write_all(b"walkeep write check\n")?;
        temp.file()
            .sync_all()
            .with_context(|| format!("failed to fsync in {}", self.root.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage() -> (tempfile::TempDir, LocalStorage) {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::new(dir.path());
        (dir, storage)
    }

    fn put(s: &LocalStorage, key: &str, data: &[u8], mode: Commit) -> Committed {
        let mut w = s.create(key, mode).unwrap();
        w.write_all(data).unwrap();
        w.commit().unwrap()
    }

    fn get(s: &LocalStorage, key: &str) -> Option<Vec<u8>> {
        s.open(key).unwrap().map(|mut r| {
            let mut v = Vec::new();
            r.read_to_end(&mut v).unwrap();
            v
        })
    }

    #[test]
    fn sync_takes_an_existing_object_and_refuses_an_absent_one() {
        let (_dir, s) = storage();
        put(&s, "wal/x/seg", b"content", Commit::IfAbsent);
        s.sync("wal/x/seg").unwrap();
        assert_eq!(get(&s, "wal/x/seg").as_deref(), Some(&b"content"[..]));
        let err = s.sync("wal/x/other").unwrap_err();
        assert!(format!("{err:#}").contains("failed to fsync"), "{err:#}");
    }

    #[test]
    fn objects_are_invisible_until_committed() {
        let (_dir, s) = storage();
        let mut w = s.create("a/b", Commit::IfAbsent).unwrap();
        w.write_all(b"x").unwrap();
        assert_eq!(get(&s, "a/b"), None);
        assert!(s.list("").unwrap().is_empty());
        drop(w);
        assert!(s.list("").unwrap().is_empty());
    }

    #[test]
    fn if_absent_never_replaces() {
        let (_dir, s) = storage();
        assert_eq!(put(&s, "k/v", b"1", Commit::IfAbsent), Committed::Created);
        assert_eq!(
            put(&s, "k/v", b"2", Commit::IfAbsent),
            Committed::AlreadyExists
        );
        assert_eq!(get(&s, "k/v").unwrap(), b"1");
        assert_eq!(put(&s, "k/v", b"3", Commit::Replace), Committed::Created);
        assert_eq!(get(&s, "k/v").unwrap(), b"3");
    }

    #[test]
    fn list_filters_by_prefix_and_sorts() {
        let (_dir, s) = storage();
        for key in ["wal/b/2", "wal/a/1", "wal/ab/3", "backups/x/m"] {
            put(&s, key, b"x", Commit::IfAbsent);
        }
        let keys: Vec<_> = s
            .list("wal/a")
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, ["wal/a/1", "wal/ab/3"]);
        let keys: Vec<_> = s.list("wal/").unwrap().into_iter().map(|o| o.key).collect();
        assert_eq!(keys, ["wal/a/1", "wal/ab/3", "wal/b/2"]);
        assert_eq!(s.list("").unwrap().len(), 4);
    }

    #[test]
    fn children_and_prefix_deletion_include_what_listing_skips() {
        let (dir, s) = storage();
        for key in ["b/x/1", "b/x/2", "b/y/1", "c"] {
            put(&s, key, b"x", Commit::IfAbsent);
        }
        // An interrupted writer's temporary file, which list() never shows.
        fs::write(dir.path().join("b/x/.walkeep-tmp.3.1.2.0"), b"partial").unwrap();
        assert_eq!(s.list_children("").unwrap(), ["b", "c"]);
        assert_eq!(s.list_children("b/").unwrap(), ["x", "y"]);
        s.delete_prefix("b/x/").unwrap();
        assert!(!dir.path().join("b/x").exists());
        assert_eq!(s.list_children("b/").unwrap(), ["y"]);
        s.delete_prefix("b/nothing/").unwrap();
    }

    #[test]
    fn missing_root_is_an_error_not_absence() {
        let (dir, _) = storage();
        let s = LocalStorage::new(dir.path().join("not-mounted"));
        assert!(s.open("wal/x").is_err());
    }

    #[test]
    fn torn_record_is_isolated() {
        let (dir, s) = storage();
        s.append_record("log/c", b"{\"a\":1}").unwrap();
        let path = dir.path().join("log/c");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"torn").unwrap();
        s.append_record("log/c", b"{\"b\":2}").unwrap();
        let records = s.read_records("log/c").unwrap();
        assert_eq!(
            records,
            vec![
                b"{\"a\":1}".to_vec(),
                b"{\"torn".to_vec(),
                b"{\"b\":2}".to_vec()
            ]
        );
        s.rewrite_records("log/c", &mut |all| Ok(all[2..].to_vec()))
            .unwrap();
        assert_eq!(
            s.read_records("log/c").unwrap(),
            vec![b"{\"b\":2}".to_vec()]
        );
    }

    #[test]
    fn a_record_being_appended_is_read_whole_or_not_at_all() {
        let (dir, s) = storage();
        s.append_record("log/c", b"{\"a\":1}").unwrap();
        // An appender midway: it holds the lock and has written half of its record.
        let mut appender = s.open_log_locked(&dir.path().join("log/c")).unwrap();
        appender.write_all(b"{\"b\":").unwrap();
        let reader = std::thread::spawn({
            let s = s.clone();
            move || s.read_records("log/c").unwrap()
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            !reader.is_finished(),
            "the read did not wait for the append"
        );
        appender.write_all(b"2}\n").unwrap();
        drop(appender);
        assert_eq!(
            reader.join().unwrap(),
            vec![b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]
        );
    }
}
