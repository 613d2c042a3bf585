//! What a data directory's `global/pg_control` says about the cluster's build.
//!
//! `pg_control` is a C struct (`ControlFileData`) written in the server's native byte order.
//! Its first field, the system identifier, has been at offset 0 in every release. The sizes a
//! repository must agree with (data block size, WAL block size, WAL segment size) sit further
//! in, and fields have been added before them from one major version to the next, so their
//! offset is not fixed. They follow a marker instead: `floatFormat`, a double PostgreSQL sets
//! to 1234567.0 so that a server built with another float format refuses the file. The layout
//! after it has been the same since PostgreSQL 8.4:
//!
//! ```text
//! double floatFormat      1234567.0, 8-byte aligned
//! uint32 blcksz           data block size (BLCKSZ)
//! uint32 relseg_size      blocks per relation segment file
//! uint32 xlog_blcksz      WAL block size (XLOG_BLCKSZ)
//! uint32 xlog_seg_size    WAL segment size
//! ```
//!
//! The marker is looked for at each 8-byte boundary of the struct's first 512 bytes, and a
//! match counts only when the sizes after it are ones PostgreSQL can be built with.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// `FLOATFORMAT_VALUE` in PostgreSQL's `pg_control.h`.
const FLOAT_FORMAT: f64 = 1_234_567.0;

/// The part of `pg_control` PostgreSQL keeps in one disk sector (`PG_CONTROL_MAX_SAFE_SIZE`);
/// `ControlFileData` fits in it in every release.
const CONTROL_STRUCT_MAX: usize = 512;

/// The cluster facts walkeep takes from `global/pg_control` and `PG_VERSION`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlData {
    /// The cluster's system identifier.
    pub system_identifier: u64,
    /// PostgreSQL major version, from `PG_VERSION`.
    pub pg_major_version: u32,
    /// Data block size in bytes (`BLCKSZ`).
    pub block_size: u32,
    /// WAL block size in bytes (`XLOG_BLCKSZ`).
    pub wal_block_size: u32,
    /// WAL segment size in bytes.
    pub wal_segment_size: u32,
}

impl ControlData {
    /// Reads `PG_VERSION` and `global/pg_control` of the data directory `pgdata`.
    pub fn read(pgdata: &Path) -> Result<ControlData> {
        let version_path = pgdata.join("PG_VERSION");
        let version = fs::read_to_string(&version_path).with_context(|| {
            format!(
                "failed to read {}: is {} a data directory?",
                version_path.display(),
                pgdata.display()
            )
        })?;
        let pg_major_version: u32 = version.trim().parse().with_context(|| {
            format!(
                "unexpected content in {}: {version:?}",
                version_path.display()
            )
        })?;
        let control_path = pgdata.join("global/pg_control");
        let control = fs::read(&control_path)
            .with_context(|| format!("failed to read {}", control_path.display()))?;
        let sizes = parse_sizes(&control)
            .with_context(|| format!("failed to read {}", control_path.display()))?;
        Ok(ControlData {
            pg_major_version,
            ..sizes
        })
    }
}

/// The sizes in a `pg_control` image (system identifier included, version left 0).
fn parse_sizes(control: &[u8]) -> Result<ControlData> {
    if control.len() < 64 {
        bail!("pg_control is {} bytes long, too short", control.len());
    }
    let u32_at = |o: usize| u32::from_le_bytes(control[o..o + 4].try_into().unwrap());
    let marker = FLOAT_FORMAT.to_le_bytes();
    let end = control.len().min(CONTROL_STRUCT_MAX);
    for offset in (8..end.saturating_sub(24)).step_by(8) {
        if control[offset..offset + 8] != marker {
            continue;
        }
        let found = ControlData {
            system_identifier: u64::from_le_bytes(control[..8].try_into().unwrap()),
            pg_major_version: 0,
            block_size: u32_at(offset + 8),
            wal_block_size: u32_at(offset + 16),
            wal_segment_size: u32_at(offset + 20),
        };
        if plausible(&found) {
            return Ok(found);
        }
    }
    bail!(
        "no float-format marker followed by valid block and segment sizes in pg_control: \
         not a PostgreSQL control file of this byte order"
    )
}

/// True if the sizes are ones PostgreSQL can be configured with (`--with-blocksize`,
/// `--with-wal-blocksize`, `initdb --wal-segsize`).
fn plausible(sizes: &ControlData) -> bool {
    let power_of_two_in =
        |v: u32, low: u32, high: u32| v.is_power_of_two() && (low..=high).contains(&v);
    power_of_two_in(sizes.block_size, 1 << 10, 32 << 10)
        && power_of_two_in(sizes.wal_block_size, 1 << 10, 64 << 10)
        && power_of_two_in(sizes.wal_segment_size, 1 << 20, 1 << 30)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A `pg_control` image with the marker and sizes at `marker_offset`, zeros elsewhere.
    pub(crate) fn control_bytes(
        system_identifier: u64,
        marker_offset: usize,
        sizes: [u32; 3],
    ) -> Vec<u8> {
        let mut bytes = vec![0u8; 8192];
        bytes[..8].copy_from_slice(&system_identifier.to_le_bytes());
        bytes[marker_offset..marker_offset + 8].copy_from_slice(&FLOAT_FORMAT.to_le_bytes());
        let [block, wal_block, segment] = sizes;
        for (at, value) in [(8, block), (12, 131_072), (16, wal_block), (20, segment)] {
            let at = marker_offset + at;
            bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
        }
        bytes
    }

    #[test]
    fn sizes_are_found_after_the_marker_wherever_it_sits() {
        for offset in [152, 160, 200] {
            let image = control_bytes(42, offset, [8192, 8192, 16 << 20]);
            let found = parse_sizes(&image).unwrap();
            assert_eq!(found.system_identifier, 42);
            assert_eq!(found.block_size, 8192);
            assert_eq!(found.wal_block_size, 8192);
            assert_eq!(found.wal_segment_size, 16 << 20);
        }
        let image = control_bytes(42, 160, [32768, 16384, 1 << 30]);
        let found = parse_sizes(&image).unwrap();
        assert_eq!(
            (
                found.block_size,
                found.wal_block_size,
                found.wal_segment_size
            ),
            (32768, 16384, 1 << 30)
        );
    }

    #[test]
    fn a_marker_followed_by_impossible_sizes_is_not_taken() {
        // The marker's bytes elsewhere, with no valid sizes after them, are skipped...
        let mut image = control_bytes(42, 200, [8192, 8192, 16 << 20]);
        image[96..104].copy_from_slice(&FLOAT_FORMAT.to_le_bytes());
        assert_eq!(parse_sizes(&image).unwrap().block_size, 8192);
        // ...and without any valid match the file is refused.
        for sizes in [[8000, 8192, 16 << 20], [8192, 8192, 3 << 20], [0, 0, 0]] {
            let image = control_bytes(42, 160, sizes);
            assert!(parse_sizes(&image).is_err(), "{sizes:?}");
        }
        assert!(parse_sizes(&[0u8; 8192]).is_err());
        assert!(parse_sizes(&[1u8; 20]).is_err());
    }

    #[test]
    fn read_takes_the_version_from_pg_version() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("global")).unwrap();
        let image = control_bytes(7, 160, [8192, 8192, 1 << 20]);
        fs::write(dir.path().join("global/pg_control"), image).unwrap();
        assert!(ControlData::read(dir.path()).is_err(), "no PG_VERSION");
        fs::write(dir.path().join("PG_VERSION"), "16\n").unwrap();
        let read = ControlData::read(dir.path()).unwrap();
        assert_eq!(read.pg_major_version, 16);
        assert_eq!(read.system_identifier, 7);
        assert_eq!(read.wal_segment_size, 1 << 20);
    }
}
