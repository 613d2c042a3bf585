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

    /// Reads the identity of the cluster in `pgdata`: its major version from `PG_VERSION`,
    /// and system identifier and sizes from the header of a segment in `pg_wal`,
    /// cross-checked against the system identifier at the start of `global/pg_control`.
    pub fn of_data_directory(pgdata: &Path) -> Result<Identity> {
        let (control_sysid, pg_major_version) = control_identity(pgdata)?;
        if wal::magic_of_major_version(pg_major_version).is_none() {
            bail!("PostgreSQL {pg_major_version} is not supported (12 to 18 are)");
        }

        let header = newest_segment_header(&pgdata.join("pg_wal"))?;
        if header.system_identifier != control_sysid {
            bail!(
                "pg_wal and pg_control disagree: system identifier {} in WAL, {} in pg_control",
                header.system_identifier,
                control_sysid
            );
        }
        if header.major_version() != pg_major_version {
            bail!(
                "WAL in {} is from PostgreSQL {}, PG_VERSION says {pg_major_version}",
                pgdata.display(),
                header.major_version()
            );
        }
        Ok(Identity {
            format: REPOSITORY_FORMAT,
            system_identifier: header.system_identifier,
            pg_major_version,
            wal_segment_size: u64::from(header.segment_size),
            wal_block_size: header.block_size,
            created_at: Utc::now(),
        })
    }

    fn same_cluster(&self, other: &Identity) -> bool {
        self.system_identifier == other.system_identifier
            && self.pg_major_version == other.pg_major_version
            && self.wal_segment_size == other.wal_segment_size
            && self.wal_block_size == other.wal_block_size
    }
}

/// True if and only if `pg_wal` holds at least one WAL segment.
fn has_segments(pg_wal: &Path) -> bool {
    fs::read_dir(pg_wal).is_ok_and(|entries| {
        entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .any(|n| n.parse::<SegmentName>().is_ok())
    })
}

/// The system identifier (the first field of `global/pg_control`) and the major version
/// (`PG_VERSION`) of a data directory.
pub fn control_identity(pgdata: &Path) -> Result<(u64, u32)> {
    let version_path = pgdata.join("PG_VERSION");
    let version = fs::read_to_string(&version_path).with_context(|| {
        format!(
            "failed to read {}: is {} a data directory?",
            version_path.display(),
            pgdata.display()
        )
    })?;
    let version: u32 = version.trim().parse().with_context(|| {
        format!(
            "unexpected content in {}: {version:?}",
            version_path.display()
        )
    })?;
    let control_path = pgdata.join("global/pg_control");
    let control = fs::read(&control_path)
        .with_context(|| format!("failed to read {}", control_path.display()))?;
    let sysid = control.get(..8).context("pg_control is too short")?;
    Ok((u64::from_le_bytes(sysid.try_into().unwrap()), version))
}

/// The header of the newest segment in `pg_wal` that has one. PostgreSQL preallocates the
/// next segment zero-filled at a checkpoint, and recycles old ones under future names (their
/// headers are the same cluster's), so a segment whose first page is all zeros is skipped: it
/// says nothing about the cluster until the server writes into it.
fn newest_segment_header(pg_wal: &Path) -> Result<LongPageHeader> {
    let mut segments: Vec<String> = fs::read_dir(pg_wal)
        .with_context(|| format!("failed to list {}", pg_wal.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.parse::<SegmentName>().is_ok())
        .collect();
    segments.sort();
    if segments.is_empty() {
        bail!("no WAL segment in {}", pg_wal.display());
    }
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
            .with_context(|| format!("bad WAL header in {}", path.display()));
    }
    bail!(
        "every segment in {} is zero-filled (preallocated, not written yet)",
        pg_wal.display()
    )
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
        if !has_segments(&pgdata.join("pg_wal")) {
            return Repository::init_without_wal(location, pgdata, config);
        }
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
                        "repository {} already belongs to another cluster: system identifier {}, \
                         PostgreSQL {}; the data directory {} is system identifier {}, \
                         PostgreSQL {}",
                        repo.storage.location(),
                        repo.identity.system_identifier,
                        repo.identity.pg_major_version,
                        pgdata.display(),
                        identity.system_identifier,
                        identity.pg_major_version
                    );
                }
                Ok((repo, false))
            }
        }
    }

    /// A data directory restored but not started yet has no WAL to read the sizes from. It
    /// can still be matched against an existing repository, by the system identifier in
    /// `pg_control` and the major version; a new repository needs the server started once.
    fn init_without_wal(
        location: &str,
        pgdata: &Path,
        config: &FileConfig,
    ) -> Result<(Repository, bool)> {
        let (sysid, version) = control_identity(pgdata)?;
        let repo = Repository::open_with(location, config).with_context(|| {
            format!(
                "{} has no WAL segment yet to take the cluster's identity from; start the \
                 server once, then run walkeep init",
                pgdata.join("pg_wal").display()
            )
        })?;
        let id = &repo.identity;
        if id.system_identifier != sysid || id.pg_major_version != version {
            bail!(
                "repository {location} belongs to system {}, PostgreSQL {}; the data \
                 directory {} is system {sysid}, PostgreSQL {version}",
                id.system_identifier,
                id.pg_major_version,
                pgdata.display()
            );
        }
        Ok((repo, false))
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

    /// Regression: a checkpoint with the current segment more than 75% full preallocates the
    /// next one zero-filled, and `init` used to read only the newest file in `pg_wal`.
    #[test]
    fn identity_skips_a_preallocated_segment() {
        let dir = tempfile::tempdir().unwrap();
        let pgdata = dir.path();
        fs::create_dir_all(pgdata.join("global")).unwrap();
        fs::create_dir_all(pgdata.join("pg_wal")).unwrap();
        fs::write(pgdata.join("PG_VERSION"), "15\n").unwrap();
        let sysid: u64 = 7_300_000_000_000_000_001;
        let mut control = sysid.to_le_bytes().to_vec();
        control.resize(8192, 0);
        fs::write(pgdata.join("global/pg_control"), control).unwrap();

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

        fs::remove_file(pgdata.join("pg_wal/00000001000000000000002F")).unwrap();
        let err = Identity::of_data_directory(pgdata).unwrap_err().to_string();
        assert!(err.contains("zero-filled"), "{err}");
    }
}
