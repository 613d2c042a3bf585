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
use crate::walscan::{xid_follows, NamedPoint};

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

/// What the operator asks for.
#[derive(Clone, Debug)]
pub struct Request {
    /// Where recovery should stop.
    pub target: Target,
    /// Which timeline to follow.
    pub timeline: TimelineChoice,
    /// A backup to use instead of the newest that fits.
    pub backup: Option<String>,
    /// Whether recovery stops just after the target (PostgreSQL's default) or before it.
    pub inclusive: bool,
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
    /// The target to write into the recovery settings: the one asked for, or a position
    /// that provably gives the same state (see `warnings`).
    #[serde(skip)]
    pub recovery_target: Target,
    /// `recovery_target_inclusive` that `recovery_target` needs, overriding the operator's.
    #[serde(skip)]
    pub recovery_inclusive: Option<bool>,
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
    /// Lists the repository's WAL and reads the catalog.
    pub fn load(repo: &Repository) -> Result<WalArchive> {
        WalArchive::load_with(repo, catalog::load(repo)?)
    }

    /// Lists the repository's WAL, given the catalog's records.
    pub fn load_with(
        repo: &Repository,
        records: BTreeMap<String, WalRecord>,
    ) -> Result<WalArchive> {
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
            records,
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
        TimelinePath::parse_bytes(timeline, &text)
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

    /// A warning for each timeline on `path` that the repository holds WAL of after a
    /// newer timeline branched from it: recovery along `path` leaves that WAL out. After a
    /// failover it is what the old primary wrote before it stopped; it is also what a
    /// server writes on after a restored copy of it was promoted with archiving on, when
    /// the newest timeline, the copy's, is not the one wanted.
    pub fn abandoned_branches(&self, path: &TimelinePath) -> Vec<String> {
        path.steps
            .windows(2)
            .filter_map(|pair| {
                let (older, newer) = (pair[0], pair[1]);
                let branch = newer.begin.segment_number(self.segment_size);
                let (_, last) = self
                    .segments
                    .range((older.timeline, branch + 1)..=(older.timeline, u64::MAX))
                    .next_back()?;
                Some(format!(
                    "timeline {} went on after timeline {} branched from it at {}: the \
                     repository holds its WAL up to {}, which recovery along timeline {} \
                     leaves out; if timeline {} is not the server's (a restored copy that \
                     archived, say), pass --target-timeline {}",
                    older.timeline,
                    newer.timeline,
                    newer.begin,
                    SegmentName::from_segno(older.timeline, *last, self.segment_size),
                    path.target(),
                    newer.timeline,
                    older.timeline
                ))
            })
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

    /// What the segments along `path` from `from` up to (not including) `to` hold for
    /// recovery targets, from the catalog or, failing that, from the objects' trailers.
    pub fn reach(
        &self,
        repo: &Repository,
        path: &TimelinePath,
        from: u64,
        to: u64,
    ) -> Result<Reach> {
        let mut reach = Reach {
            complete: true,
            ..Reach::default()
        };
        for segno in from..to {
            let segment = path.segment(segno, self.segment_size);
            let summary = match self.records.get(&segment.to_string()) {
                Some(record) if record.summary.is_some() => record.summary.clone(),
                _ => {
                    let key = repo::wal_key(&WalFileName::Segment(segment));
                    match repo.storage().open(&key)? {
                        Some(mut reader) => object::read_meta(reader.as_mut(), &key)?
                            .0
                            .wal
                            .and_then(|w| w.summary),
                        None => None,
                    }
                }
            };
            let Some(summary) = summary else {
                reach.complete = false;
                continue;
            };
            reach.complete &= summary.complete;
            if let Some(end) = summary.last_xact_end {
                reach.last_xact_end = Some(reach.last_xact_end.map_or(end, |e| e.max(end)));
            }
            if let Some(xid) = summary.newest_xid {
                if reach.newest_xid.is_none_or(|n| xid_follows(xid, n)) {
                    reach.newest_xid = Some(xid);
                }
            }
            reach.restore_points.extend(summary.restore_points);
            // Summaries written before positions were recorded lack one: a stop before
            // such a segment would be safe only if it ended no transaction.
            reach.last_record = match summary.last_record {
                Some(lsn) => Some(lsn),
                None if summary.xact_ends > 0 => None,
                None => reach.last_record,
            };
        }
        Ok(reach)
    }

    /// The newest restore point named `name` in any summarised segment, and whether every
    /// segment was summarised (so that "not found" means absent).
    pub fn find_restore_point(&self, name: &str) -> (Option<NamedPoint>, bool) {
        let mut all_summarised = true;
        let mut found: Option<NamedPoint> = None;
        for record in self.records.values().filter(|r| r.kind == "segment") {
            let Some(summary) = &record.summary else {
                all_summarised = false;
                continue;
            };
            for point in summary.restore_points.iter().filter(|p| p.name == name) {
                if found.as_ref().is_none_or(|f| point.lsn > f.lsn) {
                    found = Some(point.clone());
                }
            }
        }
        (found, all_summarised)
    }

    /// The segment size in bytes.
    pub fn segment_size(&self) -> u64 {
        self.segment_size
    }
}

/// What a stretch of archived WAL holds that recovery targets depend on.
#[derive(Clone, Debug, Default)]
pub struct Reach {
    /// The latest transaction end (commit or abort) time.
    pub last_xact_end: Option<DateTime<Utc>>,
    /// The newest transaction id that ended.
    pub newest_xid: Option<u32>,
    /// Restore points, in WAL order.
    pub restore_points: Vec<NamedPoint>,
    /// The start of the last record that ends in these segments: stopping just after it
    /// leaves out no transaction end (unknown for summaries that predate positions).
    pub last_record: Option<Lsn>,
    /// True if and only if every segment was summarised completely.
    pub complete: bool,
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

/// The position of a named restore point: one recorded by `walkeep mark`, else one found
/// in the summaries of the archived segments.
fn resolve_name(repo: &Repository, archive: &WalArchive, name: &str) -> Result<Option<Lsn>> {
    if let Some(point) = points::list(repo)?
        .into_iter()
        .rev()
        .find(|p| p.name == name)
    {
        return Ok(Some(point.lsn));
    }
    match archive.find_restore_point(name) {
        (Some(point), _) => Ok(Some(point.lsn)),
        (None, true) => bail!("there is no restore point named {name:?} in the archived WAL"),
        (None, false) => Ok(None),
    }
}

/// Plans recovery as `request` asks: which backup, which timeline, and a check that the
/// archive holds what PostgreSQL will need to reach the target.
pub fn plan(repo: &Repository, request: &Request) -> Result<Plan> {
    let target = &request.target;
    let mut backups = manifest::list(repo)?;
    if backups.is_empty() {
        bail!(
            "the repository {} holds no complete backup",
            repo.storage().location()
        );
    }
    if let Some(id) = &request.backup {
        backups.retain(|b| &b.id == id);
        if backups.is_empty() {
            bail!("no complete backup with id {id} (see `walkeep info`)");
        }
    }
    let archive = WalArchive::load(repo)?;
    let size = archive.segment_size();

    let mut warnings = Vec::new();
    let histories: BTreeSet<u32> = archive.history_timelines().collect();
    for timeline in archive
        .timelines()
        .into_iter()
        .filter(|t| *t > 1 && !histories.contains(t))
    {
        warnings.push(format!(
            "timeline {timeline} has segments but no history file, so it cannot be followed; \
             archive {} to recover along it",
            WalFileName::History(timeline)
        ));
    }
    let target_lsn = match target {
        Target::Lsn(lsn) => Some(*lsn),
        Target::Name(name) => {
            let lsn = resolve_name(repo, &archive, name)?;
            if lsn.is_none() {
                warnings.push(format!(
                    "the position of restore point {name:?} is unknown (older segments were \
                     archived without summaries): the newest backup is used, and PostgreSQL \
                     stops with an error if the name is not in the WAL"
                ));
            }
            lsn
        }
        _ => None,
    };

    let mut reasons = Vec::new();
    // Newest backup first.
    for backup in backups.iter().rev() {
        let Some(path) = path_for(repo, &archive, backup, request.timeline)? else {
            reasons.push(format!(
                "backup {} is on timeline {}, which the requested timeline does not descend \
                 from after the backup's end",
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
                    "{target} lies inside backup {}'s window ({} to {}, {} to {}); recovery \
                     can stop only after a backup's end",
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
        let gap_refusal = |after: &SegmentName| {
            anyhow::anyhow!(
                "WAL segment {} is missing: replay along timeline {} would stop at \
                 {archive_end}, before {target}, although the repository holds later WAL (from \
                 {after}); restore the missing segment or choose a target before {archive_end}",
                path.segment(missing, size),
                path.target(),
            )
        };
        let mut last_needed = last_present;
        let mut recovery_target = target.clone();
        let mut inclusive = None;
        match target {
            Target::Immediate => last_needed = path.segment(stop, size),
            Target::Lsn(_) | Target::Name(_) if target_lsn.is_some() => {
                let lsn = target_lsn.expect("checked");
                if lsn >= archive_end {
                    if let Some(after) = &gap_then_more {
                        return Err(gap_refusal(after));
                    }
                    bail!(
                        "{target} is past the end of the archive: the WAL stored along \
                         timeline {} ends at {archive_end} (segment {} is not in the \
                         repository yet)",
                        path.target(),
                        path.segment(missing, size),
                    );
                }
                last_needed = path.segment(lsn.segment_number(size), size);
            }
            Target::Time(t) => {
                let t = t.with_timezone(&Utc);
                let reach = archive.reach(repo, &path, first, missing)?;
                let ends_after = reach.last_xact_end.is_some_and(|end| {
                    if request.inclusive {
                        end > t
                    } else {
                        end >= t
                    }
                });
                // A transaction that ended after the target, in the WAL before the gap, is
                // where replay stops: the gap is never reached.
                if let (false, Some(after)) = (ends_after, &gap_then_more) {
                    return Err(gap_refusal(after));
                }
                let written = archive.last_written(repo, &last_present)?;
                match written {
                    _ if ends_after => {}
                    Some(written) if written < t => bail!(
                        "{target} is past the end of the archive: the last stored segment \
                         along timeline {}, {last_present}, was last written at {written}; WAL \
                         after that is not in the repository yet (switch WAL with \
                         pg_switch_wal() or wait for archive_timeout)",
                        path.target(),
                    ),
                    Some(_) if reach.complete => {
                        // PostgreSQL stops at a time only on seeing a transaction end after
                        // it, and fails if there is none. Nothing stored ended after the
                        // target, so the last stored record holds the state at the target:
                        // stop just after it. Dropping the target instead would let recovery
                        // run on into WAL archived later, past the target.
                        match reach.last_record.filter(|l| *l >= backup.stop_lsn) {
                            Some(last) => {
                                warnings.push(format!(
                                    "no transaction ended after {target} in the archived WAL \
                                     (the last ended at {}); recovery stops at LSN {last}, the \
                                     last record archived, which holds the same committed state",
                                    reach
                                        .last_xact_end
                                        .map_or("-".to_string(), |e| e.to_string())
                                ));
                                recovery_target = Target::Lsn(last);
                                inclusive = Some(true);
                            }
                            None => warnings.push(format!(
                                "no transaction ended after {target} in the archived WAL; \
                                 PostgreSQL stops with an error unless WAL archived later holds \
                                 one"
                            )),
                        }
                    }
                    Some(_) => warnings.push(format!(
                        "some segments were archived without summaries, so walkeep cannot tell \
                         whether a transaction ended after {target}; PostgreSQL stops with an \
                         error if none did"
                    )),
                    None => warnings.push(format!(
                        "cannot tell when {last_present} was written; PostgreSQL stops with an \
                         error if the archive ends before {target}"
                    )),
                }
            }
            Target::Xid(x) => {
                let wanted = (*x & 0xFFFF_FFFF) as u32;
                let reach = archive.reach(repo, &path, first, missing)?;
                let ended = reach
                    .newest_xid
                    .is_some_and(|n| n == wanted || xid_follows(n, wanted));
                if !ended && reach.complete {
                    bail!(
                        "{target} has not ended in the WAL archived after backup {} (the newest \
                         transaction that ended is {}); PostgreSQL could not stop there",
                        backup.id,
                        reach
                            .newest_xid
                            .map_or("none".to_string(), |n| n.to_string())
                    );
                }
                if let Some(after) = &gap_then_more {
                    warnings.push(format!(
                        "WAL segment {} is missing although later WAL exists (from {after}); \
                         replay cannot go past {archive_end}",
                        path.segment(missing, size)
                    ));
                }
            }
            Target::End => {
                if let Some(after) = &gap_then_more {
                    return Err(gap_refusal(after));
                }
            }
            Target::Lsn(_) | Target::Name(_) => {
                if let Some(after) = &gap_then_more {
                    warnings.push(format!(
                        "WAL segment {} is missing although later WAL exists (from {after}); \
                         replay cannot go past {archive_end}",
                        path.segment(missing, size)
                    ));
                }
            }
        }
        if request.timeline == TimelineChoice::Latest {
            warnings.extend(archive.abandoned_branches(&path));
        }

        return Ok(Plan {
            backup_id: backup.id.clone(),
            backup: backup.clone(),
            timeline: path.target(),
            target: target.to_string(),
            recovery_target,
            recovery_inclusive: inclusive,
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
    /// When PostgreSQL last wrote the last contiguous segment, if known (never before
    /// `earliest_time`).
    pub latest_time: Option<DateTime<Utc>>,
}

/// The recovery windows of every timeline that some backup can reach, in order of
/// timeline and then position. A timeline has more than one when a gap in its WAL cuts
/// the range an older backup reaches off from the range of a newer one: the moments in
/// between cannot be restored to.
pub fn windows(repo: &Repository) -> Result<Vec<Window>> {
    let backups = manifest::list(repo)?;
    let archive = WalArchive::load(repo)?;
    let size = archive.segment_size();
    let mut out = Vec::new();
    for timeline in archive.timelines() {
        let path = archive.path(repo, timeline)?;
        // (earliest, latest, backup) of each backup that reaches past its own end.
        let mut reaches = Vec::new();
        for backup in backups
            .iter()
            .filter(|b| path.contains_at(b.timeline, b.stop_lsn))
        {
            let missing = archive.first_missing(&path, backup.start_lsn);
            if Lsn(missing * size) > backup.stop_lsn {
                reaches.push((backup.stop_lsn, missing, backup));
            }
        }
        reaches.sort_by_key(|(earliest, _, _)| *earliest);
        let mut merged: Vec<(Lsn, u64, &Manifest)> = Vec::new();
        for (earliest, missing, backup) in reaches {
            match merged.last_mut() {
                Some(last) if earliest <= Lsn(last.1 * size) => last.1 = last.1.max(missing),
                _ => merged.push((earliest, missing, backup)),
            }
        }
        for (earliest, missing, backup) in merged {
            let last = path.segment(missing - 1, size);
            out.push(Window {
                timeline,
                backup_id: backup.id.clone(),
                earliest_lsn: earliest,
                earliest_time: backup.stop_time,
                latest_lsn: Lsn(missing * size),
                // The file's last write can precede the backup's stop time by moments
                // when the backup's own last segment ends the window.
                latest_time: archive
                    .last_written(repo, &last)?
                    .map(|t| t.max(backup.stop_time)),
            });
        }
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
