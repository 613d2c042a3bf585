//! Where repository objects live.
//!
//! The repository above this layer speaks only of *objects* named by keys such as
//! `wal/0000000100000000/000000010000000000000001.zst`: it creates them whole, reads them,
//! lists them by prefix and deletes them. Nothing above this layer renames files, relies on
//! the order of a directory listing or assumes a filesystem at all, so an object store
//! (where "create if absent" is a conditional PUT and there is no rename) can stand in for
//! the local directory without touching archive, restore or backup logic.
//!
//! The contract every backend keeps:
//!
//! - An object becomes visible only when [`ObjectWriter::commit`] returns, complete and
//!   durable; a writer dropped without committing leaves nothing visible.
//! - [`Commit::IfAbsent`] never replaces an existing object, even against a concurrent
//!   writer of the same key: exactly one of them creates it.
//! - Record logs ([`Storage::append_record`]) take whole records only, serialise
//!   concurrent appends, and are durable when the call returns.

pub mod local;
pub mod s3;

use std::io::{Read, Seek, Write};

use anyhow::{bail, Result};

/// An object opened for reading.
pub trait ObjectRead: Read + Seek + Send {}

impl<T: Read + Seek + Send> ObjectRead for T {}

/// How a new object is published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commit {
    /// Create the object only if no object has that key.
    IfAbsent,
    /// Create the object, replacing any object with that key.
    Replace,
}

/// How a commit ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Committed {
    /// The object is now visible and durable.
    Created,
    /// `Commit::IfAbsent` found the key taken; the existing object is unchanged.
    AlreadyExists,
}

/// An object being written. Nothing is visible before [`ObjectWriter::commit`].
pub trait ObjectWriter: Write + Send {
    /// Makes the written bytes durable and visible under the key, as the [`Commit`] mode
    /// given to [`Storage::create`] says.
    fn commit(self: Box<Self>) -> Result<Committed>;
}

/// A listed object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The object's key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
}

/// An edit of a whole record log: current records in, new records out.
pub type RecordEdit<'a> = dyn FnMut(Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> + 'a;

/// A held lock; released when dropped.
pub trait LockGuard: Send {}

/// A place to keep repository objects.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Where the objects are, for messages (a path or URL).
    fn location(&self) -> String;

    /// Opens an object, or `Ok(None)` if there is no object with that key. Any other
    /// failure (unreadable, unreachable) is an error, never `None`.
    fn open(&self, key: &str) -> Result<Option<Box<dyn ObjectRead>>>;

    /// The size of an object, or `Ok(None)` if absent.
    fn size(&self, key: &str) -> Result<Option<u64>>;

    /// Makes an existing object durable, for a caller about to rely on an object it did not
    /// publish itself: its writer may have been killed after making it visible and before
    /// making it durable. An object store acknowledges an object only once it is durable,
    /// so there this does nothing.
    fn sync(&self, key: &str) -> Result<()>;

    /// True if and only if an object created with [`Commit::IfAbsent`] is held in memory
    /// whole until committed (an object store's conditional create is one request), so
    /// that a caller creating several at once must bound how many.
    fn buffers_conditional_creates(&self) -> bool {
        false
    }

    /// Starts a new object under `key`, to be published as `mode` says. The mode is fixed
    /// up front because an object store must know it before the upload starts: a
    /// conditional create is one request, a large replaceable object a multipart upload.
    fn create(&self, key: &str, mode: Commit) -> Result<Box<dyn ObjectWriter>>;

    /// Removes an object; removing an absent object is not an error.
    fn delete(&self, key: &str) -> Result<()>;

    /// Every object whose key starts with `prefix`, sorted by key.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;

    /// The names directly below `prefix` (empty, or ending with `/`): objects and the first
    /// part of longer keys, each once, sorted. Like an object store's delimiter listing.
    fn list_children(&self, prefix: &str) -> Result<Vec<String>>;

    /// Removes everything whose key starts with `prefix` (which ends with `/`), including
    /// what an interrupted writer left there (temporary files, unfinished uploads).
    fn delete_prefix(&self, prefix: &str) -> Result<()>;

    /// Appends one record to the record log `log`, creating the log if needed.
    fn append_record(&self, log: &str, record: &[u8]) -> Result<()>;

    /// Every whole record of `log`, oldest first; an absent log has none.
    fn read_records(&self, log: &str) -> Result<Vec<Vec<u8>>>;

    /// Rewrites `log` as `edit` returns it, given the current records. Appends wait while
    /// the edit runs, so none is lost: each lands either in what `edit` sees or after the
    /// rewrite.
    fn rewrite_records(&self, log: &str, edit: &mut RecordEdit<'_>) -> Result<()>;

    /// Takes the named advisory lock, shared or exclusive, waiting for it.
    fn lock(&self, name: &str, exclusive: bool) -> Result<Box<dyn LockGuard>>;

    /// Checks that new objects can be created here, leaving nothing behind.
    fn check_writable(&self) -> Result<()>;
}

/// Checks that `key` is a relative, slash-separated key whose parts are plain names.
pub fn validate_key(key: &str) -> Result<()> {
    let plain = |part: &str| {
        !part.is_empty() && !part.starts_with('.') && !part.contains('\\') && !part.contains('\0')
    };
    if key.is_empty() || !key.split('/').all(plain) {
        bail!("invalid object key {key:?}: expected slash-separated names, none starting with '.'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_plain_relative_paths() {
        for ok in ["a", "wal/00000001.history", "backups/x/data/base/1/1259"] {
            validate_key(ok).unwrap();
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "../a",
            "a/../b",
            ".hidden",
            "a/.walkeep-tmp.x",
        ] {
            assert!(validate_key(bad).is_err(), "{bad:?}");
        }
    }
}
