//! Backup manifests: what a base backup contains, and the rule that makes it visible.
//!
//! A backup's files are stored under `backups/<id>/data/`; its manifest is written last,
//! to `manifests/<id>.json`, only after every file is durable. A backup without a manifest
//! is an interrupted one: nothing lists or restores it, and the next `walkeep backup`
//! removes its files.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::lsn::Lsn;
use crate::repo::Repository;
use crate::storage::{Commit, Committed};

/// Version of the manifest format this code writes.
pub const MANIFEST_FORMAT: u32 = 1;

/// One file of a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the data directory (`pg_tblspc/<oid>/...` for tablespaces).
    pub path: String,
    /// Size in bytes as copied.
    pub size: u64,
    /// SHA-256 of the bytes as copied.
    pub sha256: String,
    /// Size of the stored object.
    pub stored_size: u64,
    /// Permission bits.
    pub mode: u32,
}

/// One directory of a backup (recreated even when empty, like `pg_wal`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// Path relative to the data directory.
    pub path: String,
    /// Permission bits.
    pub mode: u32,
}

/// A tablespace: its OID and where it lived on the backed-up server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tablespace {
    /// Tablespace OID (its name under `pg_tblspc`).
    pub oid: u32,
    /// Its directory on the server that was backed up.
    pub location: String,
}

/// Everything known about one complete base backup.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version.
    pub format: u32,
    /// Backup id, `YYYYMMDDTHHMMSSZ` of its start.
    pub id: String,
    /// System identifier of the cluster.
    pub system_identifier: u64,
    /// PostgreSQL major version.
    pub pg_major_version: u32,
    /// Timeline the backup started on.
    pub timeline: u32,
    /// WAL position where the backup started (redo point of its checkpoint).
    pub start_lsn: Lsn,
    /// WAL position where the backup ended; recovery is consistent from here.
    pub stop_lsn: Lsn,
    /// Server time when the backup started.
    pub start_time: DateTime<Utc>,
    /// Server time just after the backup ended.
    pub stop_time: DateTime<Utc>,
    /// First WAL segment the backup needs.
    pub start_segment: String,
    /// Last WAL segment the backup needs.
    pub stop_segment: String,
    /// Transaction ids at or above this were not yet assigned when the backup ended.
    #[serde(default)]
    pub xmax_at_stop: Option<u64>,
    /// `backup_label` exactly as the server returned it.
    pub backup_label: String,
    /// `tablespace_map` exactly as the server returned it (empty without tablespaces).
    pub tablespace_map: String,
    /// Tablespaces outside the data directory.
    pub tablespaces: Vec<Tablespace>,
    /// Directories to recreate.
    pub directories: Vec<DirEntry>,
    /// Files to restore.
    pub files: Vec<FileEntry>,
    /// Sum of file sizes.
    pub size: u64,
    /// Sum of stored object sizes.
    pub stored_size: u64,
}

/// Key of a backup's manifest.
pub fn manifest_key(id: &str) -> String {
    format!("manifests/{id}.json")
}

/// Prefix of a backup's stored files.
pub fn data_prefix(id: &str) -> String {
    format!("backups/{id}/data/")
}

/// Key of one stored file of a backup. Path parts that start with a dot, which object
/// keys may not, are escaped as `+2E`; a literal `+` becomes `+2B`. (`%` would be
/// re-encoded by object-store clients; `+` passes through unchanged.)
pub fn file_key(id: &str, path: &str) -> String {
    let escaped: Vec<String> = path
        .split('/')
        .map(|part| {
            let part = part.replace('+', "+2B");
            match part.strip_prefix('.') {
                Some(rest) => format!("+2E{rest}"),
                None => part,
            }
        })
        .collect();
    format!("{}{}.zst", data_prefix(id), escaped.join("/"))
}

/// Publishes a manifest, which makes the backup visible.
pub fn publish(repo: &Repository, manifest: &Manifest) -> Result<()> {
    let key = manifest_key(&manifest.id);
    let mut writer = repo.storage().create(&key, Commit::IfAbsent)?;
    serde_json::to_writer_pretty(&mut writer, manifest)?;
    match writer.commit()? {
        Committed::Created => Ok(()),
        Committed::AlreadyExists => {
            anyhow::bail!("a backup with id {} exists already", manifest.id)
        }
    }
}

/// Every complete backup, oldest first.
///
/// A manifest that cannot be read is left out with a warning: one damaged backup must not
/// keep the others from being listed or restored. Commands that delete (backup, expire)
/// use [`list_all`] instead, so that a damaged manifest never makes its backup look
/// interrupted.
pub fn list(repo: &Repository) -> Result<Vec<Manifest>> {
    let listing = list_all(repo)?;
    for (key, err) in &listing.unreadable {
        tracing::warn!("backup manifest {key} is unreadable and left out: {err}");
    }
    Ok(listing.manifests)
}

/// Every manifest, readable ones and the keys of unreadable ones.
#[derive(Debug, Default)]
pub struct Listing {
    /// Readable manifests, oldest first.
    pub manifests: Vec<Manifest>,
    /// Keys of unreadable manifests, with the reason.
    pub unreadable: Vec<(String, String)>,
}

impl Listing {
    /// The ids of every backup that has a manifest, readable or not.
    pub fn ids(&self) -> std::collections::HashSet<String> {
        let damaged = self.unreadable.iter().filter_map(|(key, _)| {
            key.strip_prefix("manifests/")?
                .strip_suffix(".json")
                .map(str::to_string)
        });
        self.manifests
            .iter()
            .map(|m| m.id.clone())
            .chain(damaged)
            .collect()
    }
}

/// Reads every manifest, keeping apart those that cannot be read.
pub fn list_all(repo: &Repository) -> Result<Listing> {
    let mut listing = Listing::default();
    for info in repo.storage().list("manifests/")? {
        if !info.key.ends_with(".json") {
            continue;
        }
        match load_key(repo, &info.key) {
            Ok(manifest) => listing.manifests.push(manifest),
            Err(e) => listing
                .unreadable
                .push((info.key.clone(), format!("{e:#}"))),
        }
    }
    listing
        .manifests
        .sort_by(|a, b| a.stop_lsn.cmp(&b.stop_lsn).then(a.id.cmp(&b.id)));
    Ok(listing)
}

/// The manifest of backup `id`.
pub fn load(repo: &Repository, id: &str) -> Result<Manifest> {
    load_key(repo, &manifest_key(id))
}

fn load_key(repo: &Repository, key: &str) -> Result<Manifest> {
    let reader = repo
        .storage()
        .open(key)?
        .with_context(|| format!("no backup manifest {key}"))?;
    let manifest: Manifest = serde_json::from_reader(std::io::BufReader::new(reader))
        .with_context(|| format!("backup manifest {key} is unreadable"))?;
    if manifest.format != MANIFEST_FORMAT {
        anyhow::bail!(
            "manifest {key} has format {}, expected {MANIFEST_FORMAT}",
            manifest.format
        );
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_keys_escape_dot_names() {
        assert_eq!(
            file_key("B", "base/1/1259"),
            "backups/B/data/base/1/1259.zst"
        );
        assert_eq!(file_key("B", ".hidden/x"), "backups/B/data/+2Ehidden/x.zst");
        assert_eq!(file_key("B", "a+b"), "backups/B/data/a+2Bb.zst");
        crate::storage::validate_key(&file_key("B", "dir/.x/.y")).unwrap();
    }
}
