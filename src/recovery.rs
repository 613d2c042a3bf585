//! The recovery planner: which backup, which timeline, and whether the archive reaches
//! the target, all decided before anything is written.
//!
//! PostgreSQL can stop replay at a target only after the restored backup is consistent,
//! that is after the backup's stop position. So the planner takes the newest backup that
//! ends before the target, on a timeline the target timeline descends from, and checks
//! that every WAL segment from the backup's start to the target is in the repository.
//! Whatever it cannot promise it refuses, saying why: a target before every backup's end,
//! a target inside a backup's window, a gap in the WAL, a target past the end of the
//! archive.
//!
//! Whether the archive reaches a target time is judged from the time PostgreSQL last
//! wrote each segment, recorded when it was archived: every record written before that
//! instant lies in that segment or an earlier one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, FixedOffset, NaiveDateTime, Utc};
use serde::Serialize;

use crate::catalog::{self, WalRecord};
use crate::lsn::Lsn;
use crate::manifest::{self, Manifest};
use crate::object;
use crate::points;
use crate::repo::{self, Repository};
use crate::timeline::TimelinePath;
use crate::wal::{SegmentName, WalFileName};

/// Where recovery should stop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Replay everything the archive holds.
    End,
    /// Stop as soon as the backup is consistent.
    Immediate,
    /// Stop at a moment (`recovery_target_time`).
    Time(DateTime<FixedOffset>),
    /// Stop at a WAL position (`recovery_target_lsn`).
    Lsn(Lsn),
    /// Stop at a transaction's commit (`recovery_target_xid`).
    Xid(u64),
    /// Stop at a named restore point (`recovery_target_name`).
    Name(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::End => write!(f, "the end of the archive"),
            Target::Immediate => write!(f, "the end of the backup (immediate)"),
            Target::Time(t) => write!(
                f,
                "time {}",
                t.with_timezone(&Utc).format("%Y-%m-%d %H:%M:%S%.6f UTC")
            ),
            Target::Lsn(l) => write!(f, "LSN {l}"),
            Target::Xid(x) => write!(f, "transaction {x}"),
            Target::Name(n) => write!(f, "restore point {n:?}"),
        }
    }
}

/// Parses a target time. It must name its offset or zone (`+02`, `+05:30`, `Z`, `UTC`):
/// a bare local time means different instants on different machines and is refused.
pub fn parse_target_time(text: &str) -> Result<DateTime<FixedOffset>> {
    let trimmed = text.trim();
    let normalized = match trimmed
        .strip_suffix(" UTC")
        .or_else(|| trimmed.strip_suffix(" GMT"))
    {
        Some(rest) => format!("{rest}+00:00"),
        None => trimmed.to_string(),
    };
    let normalized = normalized.replacen('T', " ", 1);
    let normalized = match normalized.strip_suffix('Z') {
        Some(rest) => format!("{rest}+00:00"),
        None => normalized,
    };
    for format in [
        "%Y-%m-%d %H:%M:%S%.f%:z",
        "%Y-%m-%d %H:%M:%S%.f%#z",
        "%Y-%m-%d %H:%M%:z",
    ] {
        if let Ok(t) = DateTime::parse_from_str(&normalized, format) {
            return Ok(t);
        }
    }
    if NaiveDateTime::parse_from_str(&normalized, "%Y-%m-%d %H:%M:%S%.f").is_ok() {
        bail!(
            "target time {text:?} has no UTC offset or zone; write it as e.g. \
             \"{trimmed}+00\" or \"{trimmed} UTC\" so it means one instant"
        );
    }
    bail!("cannot read target time {text:?}: expected e.g. 2026-12-03 17:55:00+00")
}

/// Which timeline to recover along.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimelineChoice {
    /// The newest timeline in the archive that descends from the chosen backup.
    Latest,
    /// The backup's own timeline.
    Current,
    /// A given timeline.
    Id(u32),
}

/// The chosen way to reach a target.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// The backup to restore.
    #[serde(skip)]
    pub backup: Manifest,
    /// Its id, for JSON output.
    pub backup_id: String,
    /// Timeline to recover along.
    pub timeline: u32,
    /// The target, for messages.
    pub target: String,
    /// Position the target resolves to, when known (LSN targets, recorded restore points).
    pub target_lsn: Option<Lsn>,
    /// First WAL segment needed.
    pub first_segment: String,
    /// Last WAL segment known to be needed.
    pub last_segment: String,
    /// Where the contiguous archive along the timeline ends.
    pub archive_end: Lsn,
    /// Things the operator should know that did not stop the plan.
    pub warnings: Vec<String>,
}

/// What the repository holds of WAL: segments by timeline and the catalog.
pub struct WalArchive {
    segments: BTreeSet<(u32, u64)>,
    histories: BTreeSet<u32>,
    records: BTreeMap<String, WalRecord>,
    segment_size: u64,
}

impl WalArchive {
    /// Lists the repository's WAL.
    pub fn load(repo: &Repository) -> Result<WalArchive> {
        let size = repo.segment_size();
        let mut segments = BTreeSet::new();
        let mut histories = BTreeSet::new();
        for info in repo.storage().list("wal/")? {
            match repo::wal_name_of_key(&info.key) {
                Some(WalFileName::Segment(s)) => {
                    segments.insert((s.timeline, s.segno(size)?));
                }
                Some(WalFileName::History(tli)) => {
                    histories.insert(tli);
                }
                _ => {}
            }
        }
        Ok(WalArchive {
            segments,
            histories,
            records: catalog::load(repo)?,
            segment_size: size,
        })
    }

    /// True if and only if the segment is stored.
    pub fn has(&self, segment: &SegmentName) -> bool {
        segment
            .segno(self.segment_size)
            .is_ok_and(|n| self.segments.contains(&(segment.timeline, n)))
    }

    /// Timelines with a history file.
    pub fn history_timelines(&self) -> impl Iterator<Item = u32> + '_ {
        self.histories.iter().copied()
    }

    /// Every timeline that has segments or a history file.
    pub fn timelines(&self) -> BTreeSet<u32> {
        self.segments
            .iter()
            .map(|(t, _)| *t)
            .chain(self.histories.iter().copied())
            .collect()
    }

    /// The history path of a timeline, read from its history file.
    pub fn path(&self, repo: &Repository, timeline: u32) -> Result<TimelinePath> {
        if !self.histories.contains(&timeline) {
            return Ok(TimelinePath::single(timeline));
        }
        let key = repo::wal_key(&WalFileName::History(timeline));
        let reader = repo
            .storage()
            .open(&key)?
            .with_context(|| format!("{key} vanished"))?;
        let mut text = Vec::new();
        object::decode(reader, &key, &mut text)?;
        TimelinePath::parse(
            timeline,
            std::str::from_utf8(&text).context("history file is not UTF-8")?,
        )
    }

    /// Walks the path from `from` (a position) and returns the first segment number that
    /// is missing, i.e. where the contiguous archive ends.
    pub fn first_missing(&self, path: &TimelinePath, from: Lsn) -> u64 {
        let mut segno = from.segment_number(self.segment_size);
        while self
            .segments
            .contains(&(path.timeline_of_segment(segno, self.segment_size), segno))
        {
            segno += 1;
        }
        segno
    }

    /// Segment numbers stored along `path` (each from the timeline the path reads it from).
    pub fn segnos_along(&self, path: &TimelinePath) -> Vec<u64> {
        self.segments
            .iter()
            .filter(|(t, n)| path.timeline_of_segment(*n, self.segment_size) == *t)
            .map(|(_, n)| *n)
            .collect()
    }

    /// True if and only if some segment along `path` lies at or after `segno`.
    pub fn has_any_after(&self, path: &TimelinePath, segno: u64) -> Option<SegmentName> {
        self.segments
            .iter()
            .filter(|(_, n)| *n > segno)
            .find(|(t, n)| path.timeline_of_segment(*n, self.segment_size) == *t)
            .map(|(t, n)| SegmentName::from_segno(*t, *n, self.segment_size))
    }

    /// When PostgreSQL last wrote a stored segment, from the catalog or, failing that,
    /// from the object's own trailer.
    pub fn last_written(
        &self,
        repo: &Repository,
        segment: &SegmentName,
    ) -> Result<Option<DateTime<Utc>>> {
        if let Some(t) = self
            .records
            .get(&segment.to_string())
            .and_then(|r| r.last_written)
        {
            return Ok(Some(t));
        }
        let key = repo::wal_key(&WalFileName::Segment(*segment));
        let Some(mut reader) = repo.storage().open(&key)? else {
            return Ok(None);
        };
        let (meta, _) = object::read_meta(reader.as_mut(), &key)?;
        Ok(meta.wal.and_then(|w| w.last_written))
    }

    /// The segment size in bytes.
    pub fn segment_size(&self) -> u64 {
        self.segment_size
    }
}

/// Chooses the timeline path for `backup` under `choice`.
fn path_for(
    repo: &Repository,
    archive: &WalArchive,
    backup: &Manifest,
    choice: TimelineChoice,
) -> Result<Option<TimelinePath>> {
    let candidates: Vec<u32> = match choice {
        TimelineChoice::Current => vec![backup.timeline],
        TimelineChoice::Id(t) => vec![t],
        TimelineChoice::Latest => {
            let mut all: Vec<u32> = archive
                .timelines()
                .into_iter()
                .filter(|t| *t >= backup.timeline)
                .collect();
            all.push(backup.timeline);
            all.sort_unstable_by(|a, b| b.cmp(a));
            all.dedup();
            all
        }
    };
    for timeline in candidates {
        let path = archive.path(repo, timeline)?;
        if path.contains_at(backup.timeline, backup.stop_lsn) {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Plans recovery to `target`, optionally from a pinned backup.
pub fn plan(
    repo: &Repository,
    target: &Target,
    timeline: TimelineChoice,
    pinned: Option<&str>,
) -> Result<Plan> {
    let mut backups = manifest::list(repo)?;
    if backups.is_empty() {
        bail!(
            "the repository {} holds no complete backup",
            repo.storage().location()
        );
    }
    if let Some(id) = pinned {
        backups.retain(|b| b.id == id);
        if backups.is_empty() {
            bail!("no complete backup with id {id} (see `walkeep info`)");
        }
    }
    let archive = WalArchive::load(repo)?;
    let size = archive.segment_size();

    let mut warnings = Vec::new();
    let target_lsn = match target {
        Target::Lsn(lsn) => Some(*lsn),
        Target::Name(name) => {
            let found = points::list(repo)?
                .into_iter()
                .rev()
                .find(|p| &p.name == name);
            if found.is_none() {
                warnings.push(format!(
                    "restore point {name:?} was not made by `walkeep mark`, so its position is \
                     unknown: the newest backup is used and PostgreSQL stops if it finds the name"
                ));
            }
            found.map(|p| p.lsn)
        }
        _ => None,
    };

    let mut reasons = Vec::new();
    // Newest backup first.
    for backup in backups.iter().rev() {
        let Some(path) = path_for(repo, &archive, backup, timeline)? else {
            reasons.push(format!(
                "backup {} is on timeline {}, which the requested timeline does not descend from \
                 after the backup's end",
                backup.id, backup.timeline
            ));
            continue;
        };

        // Does the backup end before the target?
        let before = match target {
            Target::End | Target::Immediate => true,
            Target::Time(t) => backup.stop_time <= t.with_timezone(&Utc),
            Target::Lsn(_) | Target::Name(_) => target_lsn.is_none_or(|l| backup.stop_lsn <= l),
            Target::Xid(x) => backup.xmax_at_stop.is_some_and(|m| m <= *x),
        };
        if !before {
            let inside = match target {
                Target::Time(t) => backup.start_time <= t.with_timezone(&Utc),
                Target::Lsn(_) | Target::Name(_) => {
                    target_lsn.is_some_and(|l| backup.start_lsn <= l)
                }
                _ => false,
            };
            reasons.push(if inside {
                format!(
                    "{target} lies inside backup {}'s window ({} to {}, {} to {}); recovery can \
                     stop only after a backup's end",
                    backup.id,
                    backup.start_lsn,
                    backup.stop_lsn,
                    backup.start_time,
                    backup.stop_time
                )
            } else {
                format!(
                    "{target} is before the end of backup {} ({} at {})",
                    backup.id, backup.stop_lsn, backup.stop_time
                )
            });
            continue;
        }

        // Is all WAL from the backup's start to its end, and on to the target, stored?
        let first = backup.start_lsn.segment_number(size);
        let stop = Lsn(backup.stop_lsn.0.saturating_sub(1)).segment_number(size);
        let missing = archive.first_missing(&path, backup.start_lsn);
        let archive_end = Lsn(missing * size);
        if missing <= stop {
            reasons.push(format!(
                "WAL segment {} is missing from the repository, and backup {} needs {} to {}",
                path.segment(missing, size),
                backup.id,
                path.segment(first, size),
                path.segment(stop, size)
            ));
            continue;
        }
        let last_present = path.segment(missing - 1, size);
        let gap_then_more = archive.has_any_after(&path, missing);
        let mut last_needed = last_present;
        match target {
            Target::Immediate => last_needed = path.segment(stop, size),
            Target::Lsn(_) | Target::Name(_) if target_lsn.is_some() => {
                let lsn = target_lsn.expect("checked");
                if lsn >= archive_end {
                    bail!(
                        "{target} is past the end of the archive: the WAL stored along timeline {} \
                         ends at {archive_end} (segment {} is not in the repository){}",
                        path.target(),
                        path.segment(missing, size),
                        gap_note(&gap_then_more)
                    );
                }
                last_needed = path.segment(lsn.segment_number(size), size);
            }
            Target::Time(_) if gap_then_more.is_some() => bail!(
                "WAL segment {} is missing: replay along timeline {} would stop at {archive_end}, \
                 before {target}, although the repository holds later WAL (from {}); restore \
                 the missing segment or choose a target before {archive_end}",
                path.segment(missing, size),
                path.target(),
                gap_then_more.expect("checked")
            ),
            Target::Time(t) => {
                let t = t.with_timezone(&Utc);
                match archive.last_written(repo, &last_present)? {
                    Some(written) if written < t => bail!(
                        "{target} is past the end of the archive: the last stored segment along \
                         timeline {}, {last_present}, was last written at {written}; WAL after \
                         that is not in the repository yet (switch WAL with pg_switch_wal() or \
                         wait for archive_timeout){}",
                        path.target(),
                        gap_note(&gap_then_more)
                    ),
                    Some(_) => {}
                    None => warnings.push(format!(
                        "cannot tell when {last_present} was written; PostgreSQL stops with an \
                         error if the archive ends before {target}"
                    )),
                }
            }
            Target::End => {
                if let Some(after) = gap_then_more {
                    bail!(
                        "WAL segment {} is missing: replay would stop there although the \
                         repository holds later WAL (from {after}); restore the missing segment \
                         or choose a target before {archive_end}",
                        path.segment(missing, size)
                    );
                }
            }
            _ => {
                if let Some(after) = gap_then_more {
                    warnings.push(format!(
                        "WAL segment {} is missing although later WAL exists (from {after}); \
                         replay cannot go past {archive_end}",
                        path.segment(missing, size)
                    ));
                }
            }
        }

        return Ok(Plan {
            backup_id: backup.id.clone(),
            backup: backup.clone(),
            timeline: path.target(),
            target: target.to_string(),
            target_lsn,
            first_segment: path.segment(first, size).to_string(),
            last_segment: last_needed.to_string(),
            archive_end,
            warnings,
        });
    }
    bail!(
        "no backup can reach {target}:\n  - {}",
        reasons.join("\n  - ")
    )
}

fn gap_note(after: &Option<SegmentName>) -> String {
    match after {
        Some(after) => format!("; later WAL exists from {after}, so this is a gap"),
        None => String::new(),
    }
}

/// What one timeline of the repository can be restored to.
#[derive(Clone, Debug, Serialize)]
pub struct Window {
    /// The timeline.
    pub timeline: u32,
    /// The oldest backup that can start this window.
    pub backup_id: String,
    /// The earliest position and time recovery can stop at (the backup's end).
    pub earliest_lsn: Lsn,
    /// Time of the earliest position.
    pub earliest_time: DateTime<Utc>,
    /// Where the contiguous archive ends.
    pub latest_lsn: Lsn,
    /// When PostgreSQL last wrote the last contiguous segment, if known.
    pub latest_time: Option<DateTime<Utc>>,
}

/// The recovery window of every timeline that some backup can reach.
pub fn windows(repo: &Repository) -> Result<Vec<Window>> {
    let backups = manifest::list(repo)?;
    let archive = WalArchive::load(repo)?;
    let size = archive.segment_size();
    let mut out = Vec::new();
    for timeline in archive.timelines() {
        let path = archive.path(repo, timeline)?;
        let mut best: Option<Window> = None;
        for backup in backups
            .iter()
            .filter(|b| path.contains_at(b.timeline, b.stop_lsn))
        {
            let missing = archive.first_missing(&path, backup.start_lsn);
            if Lsn(missing * size) <= backup.stop_lsn {
                continue;
            }
            let last = path.segment(missing - 1, size);
            let window = Window {
                timeline,
                backup_id: backup.id.clone(),
                earliest_lsn: backup.stop_lsn,
                earliest_time: backup.stop_time,
                latest_lsn: Lsn(missing * size),
                latest_time: archive.last_written(repo, &last)?,
            };
            best = match best {
                None => Some(window),
                Some(mut b) => {
                    if window.latest_lsn > b.latest_lsn {
                        b.latest_lsn = window.latest_lsn;
                        b.latest_time = window.latest_time;
                    }
                    Some(b)
                }
            };
        }
        out.extend(best);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_times_need_an_offset() {
        let ok = [
            ("2026-12-03 17:55:00+00", "2026-12-03T17:55:00+00:00"),
            (
                "2026-12-03 17:55:00.123456+01:00",
                "2026-12-03T16:55:00.123456+00:00",
            ),
            ("2026-12-03T17:55:00Z", "2026-12-03T17:55:00+00:00"),
            ("2026-12-03 17:55:00 UTC", "2026-12-03T17:55:00+00:00"),
            ("2026-12-03 17:55:00-0530", "2026-12-03T23:25:00+00:00"),
        ];
        for (text, utc) in ok {
            let t = parse_target_time(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(t.with_timezone(&Utc).to_rfc3339(), utc, "{text}");
        }
        let err = parse_target_time("2026-12-03 17:55:00")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no UTC offset"), "{err}");
        assert!(parse_target_time("yesterday").is_err());
    }
}
