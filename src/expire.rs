//! `walkeep expire`: retention.
//!
//! Backups are kept by count (`--keep N`, the newest N) and by age (`--keep-days D`: every
//! point of the last D days stays restorable, which keeps the backups that ended within D
//! days plus the newest one that ended before). A backup either policy keeps is kept, and
//! the newest backup is never expired. Then WAL older than the oldest kept backup's start
//! goes: nothing a kept backup or the kept recovery window needs. History files stay (they
//! are tiny and every later timeline's history depends on them).
//!
//! Before deleting WAL, expiry records its *horizon* (`catalog/wal-horizon.json`): the
//! segment number below which WAL is gone. `walkeep-restore` reports a segment below it as
//! expired, a fatal error, never as absent: a recovery still replaying from an expired
//! backup must stop, not end early and promote.
//!
//! Expiry holds the repository's backup lock (no backup runs meanwhile) and the expire lock
//! exclusively (restore and verify hold it shared). Archivers need no lock: they only add
//! segments newer than anything expire removes. `walkeep-restore`, one process per file,
//! holds no lock: a recovery replaying from a backup that expiry removes stops at the
//! horizon. A manifest is deleted before its files, so an interrupted expiry leaves at
//! worst the files of an invisible backup, which the next backup or expiry removes.

use std::collections::BTreeSet;
use std::io::Write;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::catalog::{self, WalRecord};
use crate::manifest::{self, Manifest};
use crate::repo::{self, Repository};
use crate::storage::Commit;
use crate::wal::{SegmentName, WalFileName};

/// Key of the expiry horizon.
pub const HORIZON_KEY: &str = "catalog/wal-horizon.json";

/// Where expiry has deleted WAL up to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Horizon {
    /// Segment number (timeline aside) below which WAL files were deleted.
    pub below_segno: u64,
    /// The segment that number starts, as its name on the kept backup's timeline.
    pub below: String,
    /// When the horizon was last raised.
    pub raised_at: DateTime<Utc>,
}

/// The expiry horizon, if WAL was ever expired.
pub fn horizon(repo: &Repository) -> Result<Option<Horizon>> {
    let Some(reader) = repo.storage().open(HORIZON_KEY)? else {
        return Ok(None);
    };
    let horizon = serde_json::from_reader(std::io::BufReader::new(reader))
        .with_context(|| format!("{HORIZON_KEY} is unreadable"))?;
    Ok(Some(horizon))
}

/// Raises the horizon to the segment `below` starts, durably; never lowers it.
fn raise_horizon(repo: &Repository, below: &str) -> Result<()> {
    let segment: SegmentName = below.parse()?;
    let below_segno = segment.segno(repo.segment_size())?;
    if horizon(repo)?.is_some_and(|h| h.below_segno >= below_segno) {
        return Ok(());
    }
    let record = Horizon {
        below_segno,
        below: below.to_string(),
        raised_at: Utc::now(),
    };
    let mut writer = repo.storage().create(HORIZON_KEY, Commit::Replace)?;
    writer
        .write_all(&serde_json::to_vec(&record)?)
        .with_context(|| format!("failed to write {HORIZON_KEY}"))?;
    writer.commit()?;
    Ok(())
}

/// How much to keep.
#[derive(Clone, Copy, Debug, Default)]
pub struct Policy {
    /// Keep the newest this many backups.
    pub keep: Option<usize>,
    /// Keep every point of the last this many days restorable.
    pub keep_days: Option<u32>,
}

/// What an expiry removes and keeps.
#[derive(Clone, Debug, Serialize)]
pub struct ExpirePlan {
    /// Backups kept, oldest first.
    pub kept_backups: Vec<String>,
    /// Backups removed, oldest first.
    pub expired_backups: Vec<String>,
    /// WAL segments (and .partial and .backup files) before this one are removed.
    pub wal_cutoff: Option<String>,
    /// The WAL files removed.
    pub expired_wal: Vec<String>,
    /// Stored bytes freed.
    pub freed_bytes: u64,
}

/// Decides what to keep, given the backups oldest first.
fn kept(backups: &[Manifest], policy: Policy, now: DateTime<Utc>) -> BTreeSet<String> {
    let mut keep = BTreeSet::new();
    if let Some(newest) = backups.last() {
        keep.insert(newest.id.clone());
    }
    if let Some(n) = policy.keep {
        keep.extend(backups.iter().rev().take(n).map(|b| b.id.clone()));
    }
    if let Some(days) = policy.keep_days {
        let horizon = now - Duration::days(i64::from(days));
        keep.extend(
            backups
                .iter()
                .filter(|b| b.stop_time >= horizon)
                .map(|b| b.id.clone()),
        );
        // The window must reach back to the horizon itself: keep the backup it starts from.
        if let Some(before) = backups.iter().rev().find(|b| b.stop_time < horizon) {
            keep.insert(before.id.clone());
        }
    }
    keep
}

/// Works out what `policy` expires, without changing anything.
pub fn plan(repo: &Repository, policy: Policy, now: DateTime<Utc>) -> Result<ExpirePlan> {
    if policy.keep.is_none() && policy.keep_days.is_none() {
        bail!("give a retention policy: --keep N, --keep-days D, or both");
    }
    if policy.keep == Some(0) {
        bail!("--keep 0 would expire every backup; the newest is always kept, use --keep 1");
    }
    let listing = manifest::list_all(repo)?;
    if let Some((key, err)) = listing.unreadable.first() {
        bail!(
            "backup manifest {key} is unreadable ({err}); expiring without knowing what that \
             backup needs could delete it - repair or remove the manifest first"
        );
    }
    let backups = listing.manifests;
    let keep = kept(&backups, policy, now);
    let (kept_backups, expired): (Vec<&Manifest>, Vec<&Manifest>) =
        backups.iter().partition(|b| keep.contains(&b.id));

    let size = repo.segment_size();
    let cutoff = kept_backups
        .iter()
        .map(|b| b.start_lsn.segment_number(size))
        .min();
    let mut expired_wal = Vec::new();
    let mut freed_bytes = expired.iter().map(|b| b.stored_size).sum::<u64>();
    if let Some(cutoff) = cutoff {
        for info in repo.storage().list("wal/")? {
            let segment = match repo::wal_name_of_key(&info.key) {
                Some(
                    WalFileName::Segment(s)
                    | WalFileName::Partial(s)
                    | WalFileName::BackupHistory(s, _),
                ) => s,
                _ => continue,
            };
            if segment.segno(size)? < cutoff {
                freed_bytes += info.size;
                expired_wal.push(info.key);
            }
        }
    }
    let cutoff_name = kept_backups
        .iter()
        .min_by_key(|b| b.start_lsn)
        .map(|b| b.start_segment.clone());
    Ok(ExpirePlan {
        kept_backups: kept_backups.iter().map(|b| b.id.clone()).collect(),
        expired_backups: expired.iter().map(|b| b.id.clone()).collect(),
        wal_cutoff: cutoff_name,
        expired_wal,
        freed_bytes,
    })
}

/// Expires according to `policy`; with `dry_run`, only plans.
pub fn run(repo: &Repository, policy: Policy, dry_run: bool) -> Result<ExpirePlan> {
    let _backup_lock = repo.storage().lock("backup", true)?;
    let _expire_lock = repo.storage().lock("expire", true)?;
    let plan = plan(repo, policy, Utc::now())?;
    if dry_run {
        return Ok(plan);
    }
    crate::backup::remove_interrupted(repo)?;
    let storage = repo.storage();
    for id in &plan.expired_backups {
        storage.delete(&manifest::manifest_key(id))?;
        storage.delete_prefix(&format!("backups/{id}/"))?;
        tracing::info!("expired backup {id}");
    }
    if let (Some(below), false) = (&plan.wal_cutoff, plan.expired_wal.is_empty()) {
        raise_horizon(repo, below)?;
    }
    let mut expired_names = BTreeSet::new();
    for key in &plan.expired_wal {
        storage.delete(key)?;
        if let Some(name) = repo::wal_name_of_key(key) {
            expired_names.insert(name.to_string());
        }
    }
    if !expired_names.is_empty() {
        tracing::info!(
            "expired {} WAL files before {}",
            expired_names.len(),
            plan.wal_cutoff.as_deref().unwrap_or("?")
        );
        storage.rewrite_records(catalog::WAL_LOG, &mut |records| {
            Ok(records
                .into_iter()
                .filter(|raw| {
                    let name = serde_json::from_slice::<WalRecord>(raw).map(|r| r.name);
                    !name.is_ok_and(|n| expired_names.contains(&n))
                })
                .collect())
        })?;
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;

    fn backup(id: &str, days_ago: i64, now: DateTime<Utc>) -> Manifest {
        Manifest {
            format: 1,
            id: id.to_string(),
            system_identifier: 1,
            pg_major_version: 15,
            timeline: 1,
            start_lsn: Lsn(0),
            stop_lsn: Lsn(0),
            start_time: now - Duration::days(days_ago),
            stop_time: now - Duration::days(days_ago),
            start_segment: String::new(),
            stop_segment: String::new(),
            xmax_at_stop: None,
            backup_label: String::new(),
            tablespace_map: String::new(),
            tablespaces: vec![],
            directories: vec![],
            files: vec![],
            size: 0,
            stored_size: 0,
        }
    }

    #[test]
    fn policies_keep_the_union_and_always_the_newest() {
        let now = Utc::now();
        let backups: Vec<_> = [("a", 30), ("b", 20), ("c", 10), ("d", 5), ("e", 1)]
            .iter()
            .map(|(id, days)| backup(id, *days, now))
            .collect();
        let ids = |p: Policy| kept(&backups, p, now).into_iter().collect::<Vec<_>>();
        assert_eq!(
            ids(Policy {
                keep: Some(2),
                keep_days: None
            }),
            ["d", "e"]
        );
        // 7 days: d and e ended within; c is the one the window starts from.
        assert_eq!(
            ids(Policy {
                keep: None,
                keep_days: Some(7)
            }),
            ["c", "d", "e"]
        );
        // Whichever keeps more wins.
        assert_eq!(
            ids(Policy {
                keep: Some(4),
                keep_days: Some(7)
            }),
            ["b", "c", "d", "e"]
        );
        assert_eq!(
            ids(Policy {
                keep: Some(1),
                keep_days: Some(25)
            }),
            ["a", "b", "c", "d", "e"]
        );
        assert_eq!(
            ids(Policy {
                keep: None,
                keep_days: Some(0)
            }),
            ["e"]
        );
    }
}
