//! `walkeep status`: archiving health at a glance.
//!
//! From the server (when reachable): `pg_stat_archiver`'s last success and last failure.
//! From the data directory (when given): how many segments wait in
//! `pg_wal/archive_status` as `.ready`, and since when the oldest waits. From the
//! repository: the last backup and the recovery window. Archiving is *blocked* when
//! segments wait and the last attempt failed after the last success: PostgreSQL retries the
//! oldest segment forever, and `pg_wal` grows until the disk is full.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::manifest;
use crate::recovery::{self, Window};
use crate::repo::Repository;

/// What the server's archiver reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Archiver {
    /// Segments archived since statistics were reset.
    pub archived_count: i64,
    /// The last one archived.
    pub last_archived_wal: Option<String>,
    /// When.
    pub last_archived_time: Option<DateTime<Utc>>,
    /// Failed attempts since statistics were reset.
    pub failed_count: i64,
    /// The last one that failed.
    pub last_failed_wal: Option<String>,
    /// When.
    pub last_failed_time: Option<DateTime<Utc>>,
}

/// A segment the archiver keeps failing on.
#[derive(Clone, Debug, Serialize)]
pub struct Blocked {
    /// The segment at the head of the queue.
    pub segment: String,
    /// Since when it has been waiting.
    pub since: Option<DateTime<Utc>>,
}

/// The last complete backup.
#[derive(Clone, Debug, Serialize)]
pub struct LastBackup {
    /// Its id.
    pub id: String,
    /// When it ended.
    pub stop_time: DateTime<Utc>,
    /// Seconds since then.
    pub age_seconds: i64,
}

/// Everything `status` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// The repository.
    pub repository: String,
    /// The archiver's statistics, if the server was reachable.
    pub archiver: Option<Archiver>,
    /// Why the server was not reachable, if it was not.
    pub server_error: Option<String>,
    /// Segments waiting as `.ready`, if the data directory was given.
    pub ready_count: Option<usize>,
    /// The oldest waiting segment and since when, if any.
    pub oldest_ready: Option<Blocked>,
    /// Set when archiving is stuck.
    pub blocked: Option<Blocked>,
    /// The last backup.
    pub last_backup: Option<LastBackup>,
    /// Number of complete backups.
    pub backup_count: usize,
    /// The recovery windows of each timeline, one per range no gap interrupts.
    pub recovery_windows: Vec<Window>,
}

/// Reads `.ready` files in `pg_wal/archive_status`: how many, and the oldest.
fn ready_files(pgdata: &Path) -> Result<(usize, Option<Blocked>)> {
    let dir = pgdata.join("pg_wal/archive_status");
    let mut count = 0;
    let mut oldest: Option<(String, Option<DateTime<Utc>>)> = None;
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(segment) = name.strip_suffix(".ready") else {
            continue;
        };
        count += 1;
        let since = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .map(DateTime::<Utc>::from);
        if oldest.as_ref().is_none_or(|(o, _)| segment < o.as_str()) {
            oldest = Some((segment.to_string(), since));
        }
    }
    Ok((
        count,
        oldest.map(|(segment, since)| Blocked { segment, since }),
    ))
}

async fn archiver(conninfo: Option<&str>) -> Result<Archiver> {
    let client = crate::pg::connect(conninfo).await?;
    let row = client
        .query_one(
            "SELECT archived_count, last_archived_wal, \
             extract(epoch FROM last_archived_time)::float8, failed_count, last_failed_wal, \
             extract(epoch FROM last_failed_time)::float8 FROM pg_stat_archiver",
            &[],
        )
        .await?;
    let time = |i: usize| {
        row.get::<_, Option<f64>>(i)
            .and_then(|s| DateTime::from_timestamp_micros((s * 1e6) as i64))
    };
    Ok(Archiver {
        archived_count: row.get(0),
        last_archived_wal: row.get(1),
        last_archived_time: time(2),
        failed_count: row.get(3),
        last_failed_wal: row.get(4),
        last_failed_time: time(5),
    })
}

/// Gathers the status; the server and the data directory are optional sources.
pub async fn gather(
    repo: &Repository,
    location: &str,
    conninfo: Option<&str>,
    pgdata: Option<&Path>,
    connect: bool,
) -> Result<Status> {
    let (archiver, server_error) = if connect {
        match archiver(conninfo).await {
            Ok(a) => (Some(a), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        }
    } else {
        (None, None)
    };
    let (ready_count, oldest_ready) = match pgdata {
        Some(pgdata) => {
            let (count, oldest) = ready_files(pgdata)?;
            (Some(count), oldest)
        }
        None => (None, None),
    };
    let failing = archiver
        .as_ref()
        .is_some_and(|a| a.last_failed_time.is_some() && a.last_failed_time > a.last_archived_time);
    let blocked = match (&oldest_ready, &archiver) {
        (Some(oldest), Some(_)) if failing => Some(oldest.clone()),
        (None, Some(a)) if failing && pgdata.is_none() => {
            a.last_failed_wal.clone().map(|segment| Blocked {
                segment,
                since: a.last_failed_time,
            })
        }
        _ => None,
    };
    let backups = manifest::list(repo)?;
    let now = Utc::now();
    Ok(Status {
        repository: location.to_string(),
        archiver,
        server_error,
        ready_count,
        oldest_ready,
        blocked,
        last_backup: backups.last().map(|b| LastBackup {
            id: b.id.clone(),
            stop_time: b.stop_time,
            age_seconds: (now - b.stop_time).num_seconds(),
        }),
        backup_count: backups.len(),
        recovery_windows: recovery::windows(repo)?,
    })
}

/// Renders the status as OpenMetrics text for a node-exporter textfile collector.
pub fn openmetrics(status: &Status) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: Option<f64>| {
        if let Some(value) = value {
            let _ = writeln!(
                out,
                "# TYPE {name} gauge\n# HELP {name} {help}\n{name} {value}"
            );
        }
    };
    let ts = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp_micros() as f64 / 1e6);
    let a = status.archiver.as_ref();
    gauge(
        "walkeep_server_up",
        "1 if the server answered.",
        Some(if a.is_some() { 1.0 } else { 0.0 }),
    );
    gauge(
        "walkeep_archive_last_success_timestamp_seconds",
        "When the last segment was archived.",
        ts(a.and_then(|a| a.last_archived_time)),
    );
    gauge(
        "walkeep_archive_last_failure_timestamp_seconds",
        "When archiving last failed.",
        ts(a.and_then(|a| a.last_failed_time)),
    );
    gauge(
        "walkeep_archive_ready_segments",
        "Segments waiting to be archived.",
        status.ready_count.map(|n| n as f64),
    );
    gauge(
        "walkeep_archive_blocked",
        "1 if archiving is stuck on a segment.",
        Some(if status.blocked.is_some() { 1.0 } else { 0.0 }),
    );
    gauge(
        "walkeep_backup_last_completion_timestamp_seconds",
        "When the last backup ended.",
        ts(status.last_backup.as_ref().map(|b| b.stop_time)),
    );
    gauge(
        "walkeep_backups",
        "Complete backups in the repository.",
        Some(status.backup_count as f64),
    );
    if let Some(a) = a {
        let _ = writeln!(
            out,
            "# TYPE walkeep_archive_failures counter\n# HELP walkeep_archive_failures Failed \
             archive attempts since statistics were reset.\nwalkeep_archive_failures_total {}",
            a.failed_count
        );
    }
    // One series per timeline: its last window, which ends where the timeline's archive
    // ends or at its first gap after the newest backup (earlier windows, cut off by a gap,
    // are in the human and JSON output).
    let mut current: BTreeMap<u32, &Window> = BTreeMap::new();
    for w in &status.recovery_windows {
        current.insert(w.timeline, w);
    }
    if !current.is_empty() {
        out.push_str("# TYPE walkeep_recovery_window_start_timestamp_seconds gauge\n");
        out.push_str(
            "# HELP walkeep_recovery_window_start_timestamp_seconds Earliest moment of the last \
             continuous recovery window.\n",
        );
        for w in current.values() {
            let _ = writeln!(
                out,
                "walkeep_recovery_window_start_timestamp_seconds{{timeline=\"{}\"}} {}",
                w.timeline,
                w.earliest_time.timestamp_micros() as f64 / 1e6
            );
        }
        out.push_str("# TYPE walkeep_recovery_window_end_timestamp_seconds gauge\n");
        out.push_str(
            "# HELP walkeep_recovery_window_end_timestamp_seconds Latest restorable moment.\n",
        );
        for w in current.values().filter(|w| w.latest_time.is_some()) {
            let _ = writeln!(
                out,
                "walkeep_recovery_window_end_timestamp_seconds{{timeline=\"{}\"}} {}",
                w.timeline,
                ts(w.latest_time).unwrap_or_default()
            );
        }
    }
    out.push_str("# EOF\n");
    out
}
