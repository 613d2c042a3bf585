//! A repository: the storage, the identity of the cluster it belongs to, and its layout.
//!
//! A repository belongs to exactly one cluster. `walkeep init` records that cluster's
//! identity in `repository.json`; every later command opens the repository through
//! [`Repository::open`], which refuses a location without that file. So an unmounted mount
//! point or a mistyped path can never silently become an archive.
//!
//! Layout (keys below the repository root):
//!
//! ```text
//! repository.json                         identity: format, system identifier, sizes
//! wal/TTTTTTTTXXXXXXXX/<segment>.zst      segments, .partial and .backup files, grouped
//!                                         by timeline and log (256 per folder at 16 MiB)
//! wal/history/TTTTTTTT.history.zst        timeline history files
//! manifests/<id>.json                     a base backup; present only once it is complete
//! backups/<id>/data/<path>.zst            its files, relative to the data directory
//! catalog/wal.jsonl                       one JSON record per archived file (rebuildable)
//! catalog/restore-points.jsonl            named restore points made by `walkeep mark`
//! catalog/wal-horizon.json                where `walkeep expire` deleted WAL up to
//! locks/                                  advisory locks
//! ```

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::FileConfig;
use crate::control::ControlData;
use crate::storage::local::LocalStorage;
use crate::storage::s3::S3Storage;
use crate::storage::{Commit, Committed, Storage};
use crate::wal::{self, LongPageHeader, SegmentExpectation, SegmentName, WalFileName};

/// Key of the identity file.
pub const IDENTITY_KEY: &str = "repository.json";

/// Version of the repository layout this code reads and writes.
pub const REPOSITORY_FORMAT: u32 = 1;

/// The cluster a repository belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Repository layout version.
    pub format: u32,
    /// The cluster's system identifier (`pg_control_system()`).
    pub system_identifier: u64,
    /// PostgreSQL major version.
    pub pg_major_version: u32,
    /// WAL segment size in bytes.
    pub wal_segment_size: u64,
    /// WAL block size in bytes.
    pub wal_block_size: u32,
    /// Data block size in bytes (`BLCKSZ`). Repositories initialised before walkeep
    /// recorded it lack it; it is then not compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    /// When the repository was initialised.
    pub created_at: DateTime<Utc>,
}

impl Identity {
    /// What a segment must match to be archived here.
    pub fn expectation(&self) -> SegmentExpectation {
        SegmentExpectation {
            system_identifier: self.system_identifier,
            segment_size: self.wal_segment_size,
            block_size: self.wal_block_size,
            major_version: self.pg_major_version,
        }
    }

    /// Reads the identity of the cluster in `pgdata` from `PG_VERSION` and
    /// `global/pg_control`, cross-checked against the header of the newest written segment
    /// in `pg_wal` if there is one (a restored data directory not started yet has none).
    pub fn of_data_directory(pgdata: &Path) -> Result<Identity> {
        let control = ControlData::read(pgdata)?;
        let pg_major_version = control.pg_major_version;
        if wal::magic_of_major_version(pg_major_version).is_none() {
            bail!("PostgreSQL {pg_major_version} is not supported (12 to 18 are)");
        }
        if let Some(header) = newest_segment_header(&pgdata.join("pg_wal"))? {
            let disagreements = [
                (
                    "system identifier",
                    header.system_identifier,
                    control.system_identifier,
                ),
                (
                    "WAL segment size",
                    u64::from(header.segment_size),
                    u64::from(control.wal_segment_size),
                ),
                (
                    "WAL block size",
                    u64::from(header.block_size),
                    u64::from(control.wal_block_size),
                ),
            ];
            for (what, in_wal, in_control) in disagreements {
                if in_wal != in_control {
                    bail!(
                        "pg_wal and pg_control in {} disagree: {what} {in_wal} in WAL, \
                         {in_control} in pg_control",
                        pgdata.display()
                    );
                }
            }
            if header.major_version() != pg_major_version {
                bail!(
                    "WAL in {} is from PostgreSQL {}, PG_VERSION says {pg_major_version}",
                    pgdata.display(),
                    header.major_version()
                );
            }
        }
        Ok(Identity {
            format: REPOSITORY_FORMAT,
            system_identifier: control.system_identifier,
            pg_major_version,
            wal_segment_size: u64::from(control.wal_segment_size),
            wal_block_size: control.wal_block_size,
            block_size: Some(control.block_size),
            created_at: Utc::now(),
        })
    }

    /// The cluster in words, for messages.
    pub fn describe(&self) -> String {
        let blocks = match self.block_size {
            Some(size) => format!("{size}-byte data blocks, "),
            None => String::new(),
        };
        format!(
            "system identifier {}, PostgreSQL {}, {blocks}{}-byte WAL blocks, {} MiB WAL segments",
            self.system_identifier,
            self.pg_major_version,
            self.wal_block_size,
            self.wal_segment_size >> 20
        )
    }

    fn same_cluster(&self, other: &Identity) -> bool {
        self.system_identifier == other.system_identifier
            && self.pg_major_version == other.pg_major_version
            && self.wal_segment_size == other.wal_segment_size
            && self.wal_block_size == other.wal_block_size
            && match (self.block_size, other.block_size) {
                (Some(mine), Some(theirs)) => mine == theirs,
                _ => true,
            }
    }
}

/// The header of the newest segment in `pg_wal` that has one, if any. PostgreSQL
/// preallocates the next segment zero-filled at a checkpoint, and recycles old ones under
/// future names (their headers are the same cluster's), so a segment whose first page is all
/// zeros is skipped: it says nothing about the cluster until the server writes into it.
fn newest_segment_header(pg_wal: &Path) -> Result<Option<LongPageHeader>> {
    let mut segments: Vec<String> = fs::read_dir(pg_wal)
        .with_context(|| format!("failed to list {}", pg_wal.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.parse::<SegmentName>().is_ok())
        .collect();
    segments.sort();
    for name in segments.iter().rev() {
        let path = pg_wal.join(name);
        let mut bytes = vec![0u8; wal::LONG_PAGE_HEADER_SIZE];
        use std::io::Read;
        fs::File::open(&path)
            .and_then(|mut f| f.read_exact(&mut bytes))
            .with_context(|| format!("failed to read the header of {}", path.display()))?;
        if bytes.iter().all(|&b| b == 0) {
            continue;
        }
        return LongPageHeader::parse(&bytes)
            .map(Some)
            .with_context(|| format!("bad WAL header in {}", path.display()));
    }
    Ok(None)
}

/// An opened, initialised repository.
#[derive(Debug)]
pub struct Repository {
    storage: Box<dyn Storage>,
    identity: Identity,
}

/// Opens the storage a location names: a path or `file://` URL for a local directory,
/// `s3://bucket/prefix` for object storage (configured by `config` and `AWS_*`).
pub fn storage_for(location: &str, config: &FileConfig) -> Result<Box<dyn Storage>> {
    if let Some(path) = location.strip_prefix("file://") {
        return Ok(Box::new(LocalStorage::new(path)));
    }
    if location.starts_with("s3://") {
        return Ok(Box::new(S3Storage::new(location, config.s3.as_ref())?));
    }
    if let Some((scheme, _)) = location.split_once("://") {
        bail!("repository URL scheme {scheme}:// is not supported; use a path, file:// or s3://");
    }
    if location.is_empty() {
        bail!("empty repository location");
    }
    Ok(Box::new(LocalStorage::new(location)))
}

impl Repository {
    /// Initialises a repository for the cluster in `pgdata`. Initialising again for the same
    /// cluster changes nothing; for another cluster it is refused.
    pub fn init(location: &str, pgdata: &Path, config: &FileConfig) -> Result<(Repository, bool)> {
        let identity = Identity::of_data_directory(pgdata)?;
        if !location.contains("://") || location.starts_with("file://") {
            let path = location.strip_prefix("file://").unwrap_or(location);
            crate::durable::create_dir_all(Path::new(path))?;
        }
        let storage = storage_for(location, config)?;
        let mut writer = storage.create(IDENTITY_KEY, Commit::IfAbsent)?;
        serde_json::to_writer_pretty(&mut writer, &identity)?;
        writer.write_all(b"\n")?;
        match writer.commit()? {
            Committed::Created => Ok((Repository { storage, identity }, true)),
            Committed::AlreadyExists => {
                let repo = Repository::open_storage(storage)?;
                if !repo.identity.same_cluster(&identity) {
                    bail!(
                        "repository {} already belongs to another cluster ({}); the data \
                         directory {} is {}",
                        repo.storage.location(),
                        repo.identity.describe(),
                        pgdata.display(),
                        identity.describe()
                    );
                }
                Ok((repo, false))
            }
        }
    }

    /// Opens the repository at `location`, which must have been initialised, with object
    /// storage settings from `config`.
    pub fn open_with(location: &str, config: &FileConfig) -> Result<Repository> {
        Repository::open_storage(storage_for(location, config)?)
    }

    /// Opens the repository at `location` with the default configuration file's object
    /// storage settings (a local repository needs none).
    pub fn open(location: &str) -> Result<Repository> {
        let config = if location.starts_with("s3://") {
            FileConfig::load(None)?
        } else {
            FileConfig::default()
        };
        Repository::open_with(location, &config)
    }

    /// Opens an initialised repository on `storage`.
    pub fn open_storage(storage: Box<dyn Storage>) -> Result<Repository> {
        let reader = storage.open(IDENTITY_KEY).with_context(|| {
            format!(
                "failed to read the repository identity at {}",
                storage.location()
            )
        })?;
        let Some(reader) = reader else {
            bail!(
                "{} is not an initialised walkeep repository (no {IDENTITY_KEY}); \
                 run `walkeep init` first, and check that the volume is mounted",
                storage.location()
            );
        };
        let identity: Identity = serde_json::from_reader(std::io::BufReader::new(reader))
            .with_context(|| format!("{IDENTITY_KEY} in {} is unreadable", storage.location()))?;
        if identity.format != REPOSITORY_FORMAT {
            bail!(
                "repository {} has format {}, this walkeep handles format {REPOSITORY_FORMAT}",
                storage.location(),
                identity.format
            );
        }
        Ok(Repository { storage, identity })
    }

    /// The storage backend.
    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    /// The cluster this repository belongs to.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The WAL segment size of the cluster, in bytes.
    pub fn segment_size(&self) -> u64 {
        self.identity.wal_segment_size
    }
}

/// Key of a stored WAL file.
pub fn wal_key(name: &WalFileName) -> String {
    match name {
        WalFileName::History(_) => format!("wal/history/{name}.zst"),
        WalFileName::Segment(s) | WalFileName::Partial(s) | WalFileName::BackupHistory(s, _) => {
            format!("wal/{}/{name}.zst", s.log_prefix())
        }
    }
}

/// The WAL file a stored key holds, if it is a WAL key.
pub fn wal_name_of_key(key: &str) -> Option<WalFileName> {
    let rest = key.strip_prefix("wal/")?;
    let file = rest.rsplit('/').next()?.strip_suffix(".zst")?;
    let name: WalFileName = file.parse().ok()?;
    (wal_key(&name) == key).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_keys_round_trip() {
        for text in [
            "000000010000000A000000FF",
            "000000010000000A000000FF.partial",
            "00000002.history",
            "000000010000000A000000FF.00000028.backup",
        ] {
            let name: WalFileName = text.parse().unwrap();
            let key = wal_key(&name);
            assert_eq!(wal_name_of_key(&key), Some(name), "{key}");
        }
        assert_eq!(
            wal_key(&"000000010000000A000000FF".parse().unwrap()),
            "wal/000000010000000A/000000010000000A000000FF.zst"
        );
        assert_eq!(
            wal_name_of_key("wal/00000001000000AB/000000010000000A000000FF.zst"),
            None
        );
        assert_eq!(
            wal_name_of_key("backups/x/data/000000010000000A000000FF.zst"),
            None
        );
    }

    #[test]
    fn open_refuses_uninitialised_directory() {
        let dir = tempfile::tempdir().unwrap();
        let err = Repository::open(dir.path().to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not an initialised walkeep repository"),
            "{err}"
        );
        let missing = dir.path().join("unmounted");
        assert!(Repository::open(missing.to_str().unwrap()).is_err());
    }

    #[test]
    fn unknown_scheme_is_refused() {
        let config = FileConfig::default();
        assert!(storage_for("ftp://host/x", &config).is_err());
        assert!(storage_for("", &config).is_err());
        assert!(storage_for("s3://", &config).is_err());
    }

    /// Makes `pgdata` a PostgreSQL 15 data directory whose `pg_control` says `segment_size`,
    /// with an empty `pg_wal`; returns its system identifier.
    fn standin_data_directory(pgdata: &Path, segment_size: u32) -> u64 {
        let sysid: u64 = 7_300_000_000_000_000_001;
        fs::create_dir_all(pgdata.join("global")).unwrap();
        fs::create_dir_all(pgdata.join("pg_wal")).unwrap();
        fs::write(pgdata.join("PG_VERSION"), "15\n").unwrap();
        let control = crate::control::tests::control_bytes(sysid, 160, [8192, 8192, segment_size]);
        fs::write(pgdata.join("global/pg_control"), control).unwrap();
        sysid
    }

    /// Regression: a checkpoint with the current segment more than 75% full preallocates the
    /// next one zero-filled, and `init` used to read only the newest file in `pg_wal`.
    #[test]
    fn identity_skips_a_preallocated_segment() {
        let dir = tempfile::tempdir().unwrap();
        let pgdata = dir.path();
        let sysid = standin_data_directory(pgdata, 16 << 20);

        let magic = wal::magic_of_major_version(15).unwrap();
        let written = wal::tests::header_bytes(magic, 1, 0x2F00_0000, sysid, 16 << 20);
        fs::write(pgdata.join("pg_wal/00000001000000000000002F"), written).unwrap();
        fs::write(
            pgdata.join("pg_wal/000000010000000000000030"),
            vec![0u8; wal::LONG_PAGE_HEADER_SIZE],
        )
        .unwrap();

        let identity = Identity::of_data_directory(pgdata).unwrap();
        assert_eq!(identity.system_identifier, sysid);
        assert_eq!(identity.wal_segment_size, 16 << 20);
        assert_eq!(identity.wal_block_size, 8192);
        assert_eq!(identity.block_size, Some(8192));

        // With only a preallocated segment, pg_control alone gives the same identity.
        fs::remove_file(pgdata.join("pg_wal/00000001000000000000002F")).unwrap();
        let alone = Identity::of_data_directory(pgdata).unwrap();
        assert!(alone.same_cluster(&identity), "{alone:?}");
    }

    #[test]
    fn wal_disagreeing_with_pg_control_is_refused_naming_both_values() {
        let dir = tempfile::tempdir().unwrap();
        let pgdata = dir.path();
        let sysid = standin_data_directory(pgdata, 1 << 20);
        let magic = wal::magic_of_major_version(15).unwrap();
        let segment = wal::tests::header_bytes(magic, 1, 0x0100_0000, sysid, 16 << 20);
        fs::write(pgdata.join("pg_wal/000000010000000000000001"), segment).unwrap();

        let err = format!("{:#}", Identity::of_data_directory(pgdata).unwrap_err());
        assert!(
            err.contains("WAL segment size 16777216 in WAL, 1048576 in pg_control"),
            "{err}"
        );
    }

    #[test]
    fn an_identity_without_block_size_still_matches_its_cluster() {
        let recorded = r#"{"format": 1, "system_identifier": 9, "pg_major_version": 15,
            "wal_segment_size": 16777216, "wal_block_size": 8192,
            "created_at": "2026-01-01T00:00:00Z"}"#;
        let old: Identity = serde_json::from_str(recorded).unwrap();
        assert_eq!(old.block_size, None);
        let mut now = old.clone();
        now.block_size = Some(8192);
        assert!(old.same_cluster(&now) && now.same_cluster(&old));
        let mut other = now.clone();
        other.block_size = Some(16384);
        assert!(!now.same_cluster(&other));
        assert!(!serde_json::to_string(&old)
            .unwrap()
            .contains("block_size\":null"));
    }
}
