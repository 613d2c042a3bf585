//! Physical base backups through PostgreSQL's non-exclusive low-level API.
//!
//! The procedure, over one connection held open for the whole backup (closing it aborts
//! the backup on the server):
//!
//! 1. `pg_backup_start` (`pg_start_backup` before 15): a checkpoint, and the WAL position
//!    from which the copy must be replayed;
//! 2. copy the data directory and every tablespace in parallel, each file checksummed and
//!    compressed into the repository, skipping what a base backup must not contain;
//! 3. `pg_backup_stop` (`pg_stop_backup`): the `backup_label` and `tablespace_map` to
//!    restore with, and the position from which a restored copy is consistent;
//! 4. wait until the WAL segment holding that position is in the repository;
//! 5. publish the manifest, which makes the backup visible.
//!
//! A backup interrupted anywhere before step 5 is invisible, and the next backup removes
//! what it left.

use std::collections::HashSet;
use std::fs;
use std::io::BufReader;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_postgres::Client;

use crate::control::ControlData;
use crate::lsn::Lsn;
use crate::manifest::{self, DirEntry, FileEntry, Manifest, Tablespace, MANIFEST_FORMAT};
use crate::object;
use crate::parallel;
use crate::pg;
use crate::repo::{self, Repository};
use crate::storage::Commit;
use crate::wal::{SegmentName, WalFileName};

/// What to back up and how.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    /// The cluster's data directory, as seen from this machine.
    pub pgdata: PathBuf,
    /// libpq connection string (PG* variables fill what it leaves out).
    pub conninfo: Option<String>,
    /// Files copied at once.
    pub jobs: usize,
    /// zstd level.
    pub level: i32,
    /// Ask for an immediate checkpoint instead of a spread one.
    pub fast_checkpoint: bool,
    /// How long to wait for the last WAL segment to reach the repository.
    pub archive_timeout: Duration,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

/// Directories whose contents a base backup leaves out (the directory itself is kept).
const EXCLUDED_DIR_CONTENTS: [&str; 8] = [
    "pg_wal",
    "pg_dynshmem",
    "pg_notify",
    "pg_replslot",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
];

/// Top-level files a base backup leaves out: they describe the running server, or would
/// confuse recovery of the copy.
const EXCLUDED_TOP_FILES: [&str; 8] = [
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "backup_label.old",
    "tablespace_map",
    "backup_manifest",
    "recovery.signal",
    "standby.signal",
];

/// True if and only if the file at `rel` (relative to the data directory) is left out of
/// a base backup wherever it is: temporary files and relation cache init files.
fn excluded_anywhere(name: &str) -> bool {
    name.starts_with("pgsql_tmp") || name == "pg_internal.init" || name.ends_with(".tmp")
}

/// A file to copy: where it is and what it is called in the backup.
struct Source {
    path: PathBuf,
    rel: String,
    mode: u32,
}

/// Walks the data directory and tablespaces, returning files to copy and directories to
/// recreate.
fn collect(pgdata: &Path) -> Result<(Vec<Source>, Vec<DirEntry>, Vec<Tablespace>)> {
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    let mut tablespaces = Vec::new();
    walk(pgdata, "", &mut files, &mut dirs, &mut tablespaces)?;
    Ok((files, dirs, tablespaces))
}

fn walk(
    dir: &Path,
    rel: &str,
    files: &mut Vec<Source>,
    dirs: &mut Vec<DirEntry>,
    tablespaces: &mut Vec<Tablespace>,
) -> Result<()> {
    let mut entries: Vec<_> = match fs::read_dir(dir) {
        Ok(entries) => entries.collect::<Result<_, _>>()?,
        // A database or relation directory dropped during the backup.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("failed to list {}", dir.display())),
    };
    entries.sort_by_key(|e| e.file_name());

    // Unlogged relations: only their init fork is backed up; recovery resets the rest.
    let unlogged: HashSet<String> = entries
        .iter()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix("_init")
                .map(str::to_string)
        })
        .filter(|stem| stem.bytes().all(|b| b.is_ascii_digit()))
        .collect();

    for entry in entries {
        let name = entry
            .file_name()
            .into_string()
            .map_err(|n| anyhow::anyhow!("file name {n:?} in {} is not UTF-8", dir.display()))?;
        let child_rel = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        // Follow symbolic links: tablespaces are links in pg_tblspc, and pg_wal may be one.
        let meta = match fs::metadata(entry.path()) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("failed to stat {child_rel}")),
        };
        let link_meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("failed to stat {child_rel}")),
        };
        if excluded_anywhere(&name)
            || (rel.is_empty() && EXCLUDED_TOP_FILES.contains(&name.as_str()))
        {
            continue;
        }
        if !unlogged.is_empty() && !name.ends_with("_init") {
            let stem = name.split(['_', '.']).next().unwrap_or("");
            if unlogged.contains(stem) {
                continue;
            }
        }
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            dirs.push(DirEntry {
                path: child_rel.clone(),
                mode,
            });
            if rel.is_empty() && EXCLUDED_DIR_CONTENTS.contains(&name.as_str()) {
                if name == "pg_wal" {
                    dirs.push(DirEntry {
                        path: "pg_wal/archive_status".into(),
                        mode,
                    });
                }
                continue;
            }
            if rel == "pg_tblspc" && link_meta.file_type().is_symlink() {
                let target = fs::read_link(entry.path())?;
                let oid = name
                    .parse()
                    .with_context(|| format!("unexpected entry pg_tblspc/{name}"))?;
                tablespaces.push(Tablespace {
                    oid,
                    location: target.display().to_string(),
                });
                // The directory itself is recreated by PostgreSQL from tablespace_map.
                dirs.pop();
            }
            walk(&entry.path(), &child_rel, files, dirs, tablespaces)?;
        } else if meta.is_file() {
            files.push(Source {
                path: entry.path(),
                rel: child_rel,
                mode,
            });
        }
    }
    Ok(())
}

/// What `pg_backup_stop` returned.
struct StopInfo {
    lsn: Lsn,
    label: String,
    spcmap: String,
}

async fn start(client: &Client, version: u32, label: &str, fast: bool) -> Result<Lsn> {
    let sql = if version >= 15 {
        "SELECT pg_backup_start($1, $2)::text"
    } else {
        "SELECT pg_start_backup($1, $2, false)::text"
    };
    let row = client
        .query_one(sql, &[&label, &fast])
        .await
        .context("failed to start the backup")?;
    let text: String = row.get(0);
    Ok(text.parse()?)
}

async fn stop(client: &Client, version: u32) -> Result<StopInfo> {
    // The WAL is waited for below, in the repository itself, with our own timeout.
    let sql = if version >= 15 {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)"
    } else {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)"
    };
    let row = client
        .query_one(sql, &[])
        .await
        .context("failed to stop the backup")?;
    let lsn: String = row.get(0);
    let spcmap: Option<String> = row.get(2);
    Ok(StopInfo {
        lsn: lsn.parse()?,
        label: row.get(1),
        spcmap: spcmap.unwrap_or_default(),
    })
}

async fn server_time(client: &Client) -> Result<DateTime<Utc>> {
    let row = client
        .query_one(
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', \
             'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            &[],
        )
        .await?;
    let text: String = row.get(0);
    text.parse::<DateTime<Utc>>()
        .with_context(|| format!("bad server time {text:?}"))
}

async fn xmax(client: &Client, version: u32) -> Result<u64> {
    let sql = if version >= 13 {
        "SELECT pg_snapshot_xmax(pg_current_snapshot())::text"
    } else {
        "SELECT txid_snapshot_xmax(txid_current_snapshot())::text"
    };
    let text: String = client.query_one(sql, &[]).await?.get(0);
    Ok(text.parse()?)
}

/// The value of a `KEY: value` line in a backup label.
pub fn label_field<'a>(label: &'a str, key: &str) -> Option<&'a str> {
    label
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':').map(str::trim))
}

/// Removes the files of backups that never published a manifest, temporary files of a
/// killed copy included. Only called while the backup lock is held, so no such backup is
/// still running.
pub fn remove_interrupted(repo: &Repository) -> Result<()> {
    // A backup whose manifest exists but is unreadable is damaged, not interrupted.
    let complete = manifest::list_all(repo)?.ids();
    for id in repo.storage().list_children("backups/")? {
        if !complete.contains(&id) {
            repo.storage().delete_prefix(&format!("backups/{id}/"))?;
            tracing::warn!("removed the files of interrupted backup {id}");
        }
    }
    Ok(())
}

/// Takes a base backup; returns its published manifest.
pub async fn run(repo: &Repository, options: &BackupOptions) -> Result<Manifest> {
    let _lock = repo.storage().lock("backup", true)?;
    remove_interrupted(repo)?;

    let client = pg::connect(options.conninfo.as_deref()).await?;
    let version = pg::major_version(&client).await?;
    let sysid = pg::system_identifier(&client).await?;
    let identity = repo.identity();
    if sysid != identity.system_identifier || version != identity.pg_major_version {
        bail!(
            "the server is system {sysid}, PostgreSQL {version}; repository {} belongs to \
             system {}, PostgreSQL {}",
            repo.storage().location(),
            identity.system_identifier,
            identity.pg_major_version
        );
    }
    let local_sysid = ControlData::read(&options.pgdata)
        .context("is --pgdata right?")?
        .system_identifier;
    if local_sysid != sysid {
        bail!(
            "--pgdata {} holds system {local_sysid}, but the server connected to is system {sysid}",
            options.pgdata.display()
        );
    }

    let start_time = server_time(&client).await?;
    let id = start_time.format("%Y%m%dT%H%M%SZ").to_string();
    if repo.storage().size(&manifest::manifest_key(&id))?.is_some() {
        bail!("a backup with id {id} exists already; wait a second and retry");
    }
    let began = Instant::now();
    let start_lsn = start(
        &client,
        version,
        &format!("walkeep {id}"),
        options.fast_checkpoint,
    )
    .await?;
    tracing::info!("backup {id} started at {start_lsn}");

    let (sources, directories, tablespaces) = collect(&options.pgdata)?;
    // Copying is blocking work; move it off the runtime's scheduling so the connection
    // task keeps being served meanwhile.
    let files = tokio::task::block_in_place(|| copy_files(repo, &id, sources, options))?;

    let stopped = stop(&client, version).await?;
    let stop_time = server_time(&client).await?;
    let xmax_at_stop = xmax(&client, version).await.ok();
    drop(client);

    let timeline: u32 = label_field(&stopped.label, "START TIMELINE")
        .and_then(|t| t.parse().ok())
        .context("backup_label has no START TIMELINE")?;
    let size = repo.segment_size();
    let start_segment = SegmentName::containing(timeline, start_lsn, size);
    // The backup ends inside the segment holding the byte just before the stop position.
    let stop_segment =
        SegmentName::containing(timeline, Lsn(stopped.lsn.0.saturating_sub(1)), size);
    wait_for_segment(repo, &stop_segment, options.archive_timeout)?;

    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        id: id.clone(),
        system_identifier: sysid,
        pg_major_version: version,
        timeline,
        start_lsn,
        stop_lsn: stopped.lsn,
        start_time,
        stop_time,
        start_segment: start_segment.to_string(),
        stop_segment: stop_segment.to_string(),
        xmax_at_stop,
        backup_label: stopped.label,
        tablespace_map: stopped.spcmap,
        tablespaces,
        directories,
        size: files.iter().map(|f| f.size).sum(),
        stored_size: files.iter().map(|f| f.stored_size).sum(),
        files,
    };
    manifest::publish(repo, &manifest)?;
    let secs = began.elapsed().as_secs_f64();
    tracing::info!(
        "backup {id} complete: {} files, {}, stored {}, {:.1} s, {}/s, WAL {}..{}",
        manifest.files.len(),
        human_bytes(manifest.size),
        human_bytes(manifest.stored_size),
        secs,
        human_bytes((manifest.size as f64 / secs.max(0.001)) as u64),
        manifest.start_segment,
        manifest.stop_segment,
    );
    Ok(manifest)
}

fn wait_for_segment(repo: &Repository, segment: &SegmentName, timeout: Duration) -> Result<()> {
    let key = repo::wal_key(&WalFileName::Segment(*segment));
    let deadline = Instant::now() + timeout;
    let mut logged = false;
    loop {
        if repo.storage().size(&key)?.is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "WAL segment {segment}, which ends the backup, did not reach the repository \
                 within {} s: check archive_command and pg_stat_archiver",
                timeout.as_secs()
            );
        }
        if !logged {
            tracing::info!("waiting for WAL segment {segment} to be archived");
            logged = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Copies `sources` into the repository with `options.jobs` workers.
fn copy_files(
    repo: &Repository,
    id: &str,
    sources: Vec<Source>,
    options: &BackupOptions,
) -> Result<Vec<FileEntry>> {
    let total: u64 = sources
        .iter()
        .filter_map(|s| fs::metadata(&s.path).ok())
        .map(|m| m.len())
        .sum();
    let bar = progress_bar(total, options.progress);
    let mut files = parallel::map(sources, options.jobs, |source| {
        let entry = copy_one(repo, id, &source, options.level)?;
        if let Some(entry) = &entry {
            bar.inc(entry.size);
        }
        Ok(entry)
    })?;
    bar.finish_and_clear();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

fn copy_one(repo: &Repository, id: &str, source: &Source, level: i32) -> Result<Option<FileEntry>> {
    let file = match fs::File::open(&source.path) {
        Ok(f) => f,
        // Dropped during the backup; WAL replay removes it from the restored copy too.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| format!("failed to open {}", source.path.display()))
        }
    };
    let key = manifest::file_key(id, &source.rel);
    let mut writer = repo.storage().create(&key, Commit::Replace)?;
    let meta = object::encode(
        BufReader::with_capacity(1 << 20, file),
        &mut writer,
        level,
        &source.rel,
        None,
    )?;
    writer.commit()?;
    let stored_size = repo.storage().size(&key)?.unwrap_or(0);
    Ok(Some(FileEntry {
        path: source.rel.clone(),
        size: meta.size,
        sha256: meta.sha256,
        stored_size,
        mode: source.mode,
    }))
}

/// A byte-count progress bar drawn on stderr when it is a terminal, hidden otherwise.
pub fn progress_bar(total: u64, enabled: bool) -> ProgressBar {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

/// Formats a byte count with a binary unit.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collect_skips_what_a_base_backup_must_not_contain() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in [
            "base/1",
            "pg_wal/archive_status",
            "pg_stat_tmp",
            "global",
            "base/pgsql_tmp",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in [
            "PG_VERSION",
            "postmaster.pid",
            "backup_label",
            "global/pg_control",
            "pg_wal/000000010000000000000001",
            "pg_stat_tmp/db_1.stat",
            "base/1/1259",
            "base/1/pg_internal.init",
            "base/1/16384",
            "base/1/16384_init",
            "base/1/16384_fsm",
            "base/1/16384.1",
            "base/pgsql_tmp/pgsql_tmp123.0",
        ] {
            fs::write(root.join(f), b"x").unwrap();
        }
        let (files, dirs, _) = collect(root).unwrap();
        let files: Vec<_> = files.iter().map(|f| f.rel.as_str()).collect();
        assert_eq!(
            files,
            [
                "PG_VERSION",
                "base/1/1259",
                "base/1/16384_init",
                "global/pg_control"
            ]
        );
        let dirs: Vec<_> = dirs.iter().map(|d| d.path.as_str()).collect();
        assert!(dirs.contains(&"pg_wal") && dirs.contains(&"pg_wal/archive_status"));
        assert!(dirs.contains(&"pg_stat_tmp"));
        assert!(!dirs.iter().any(|d| d.contains("pgsql_tmp")));
    }

    #[test]
    fn label_fields() {
        let label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
                     START TIMELINE: 1\n";
        assert_eq!(label_field(label, "START TIMELINE"), Some("1"));
        assert_eq!(label_field(label, "STOP"), None);
    }
}
