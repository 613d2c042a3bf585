//! `walkeep verify`: proving the repository is whole.
//!
//! Three questions, each answered from the stored objects themselves, not from the
//! catalog:
//!
//! 1. Is every object intact? Each one is decompressed and its SHA-256 compared with its
//!    trailer; WAL segments also get their page header checked against the repository's
//!    cluster, timeline history files must parse, and backup files must match their
//!    manifest.
//! 2. Is the WAL continuous? Along each timeline's history, every segment from the oldest
//!    stored one to the newest must be present. A timeline switch inside a segment is not
//!    a gap (the new timeline's copy of that segment is the one needed), and `.partial`
//!    files are listed but never stand in for a full segment.
//! 3. Is every backup restorable? Its manifest is readable, every file is present with the
//!    recorded checksum, and the WAL from its start to its end is stored.
//!
//! Anything in the repository that fits none of the layout's shapes is reported as foreign,
//! and a catalog record that cannot be read as damage to the catalog: commands that read
//! the catalog skip it, so what it recorded is lost to them until `walkeep catalog
//! rebuild` regenerates the catalog from the objects.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};

use anyhow::Result;
use serde::Serialize;

use crate::backup::progress_bar;
use crate::catalog::{self, WalRecord};
use crate::lsn::Lsn;
use crate::manifest::{self, Manifest};
use crate::object;
use crate::parallel;
use crate::recovery::WalArchive;
use crate::repo::{self, Repository, IDENTITY_KEY};
use crate::timeline::TimelinePath;
use crate::wal::{self, LongPageHeader, WalFileName};

/// A damaged or unexpected object.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// The object's key.
    pub key: String,
    /// What is wrong.
    pub detail: String,
}

/// A run of missing segments along a timeline.
#[derive(Clone, Debug, Serialize)]
pub struct Gap {
    /// The timeline along whose history the segments are missing.
    pub timeline: u32,
    /// The missing segments, in order.
    pub missing: Vec<String>,
    /// The last segment present before the gap.
    pub after: String,
    /// The first segment present after the gap.
    pub before: String,
    /// Where replay along this timeline stops because of the gap.
    pub replay_stops_at: Lsn,
    /// Backups that cannot be restored at all, because the gap lies inside them.
    pub breaks_backups: Vec<String>,
    /// Backups whose recovery window ends at the gap.
    pub cuts_window_of: Vec<String>,
}

/// The verdict on one backup.
#[derive(Clone, Debug, Serialize)]
pub struct BackupVerdict {
    /// Backup id.
    pub id: String,
    /// Files checked.
    pub files: usize,
    /// What is wrong with it; empty when it is restorable.
    pub problems: Vec<String>,
}

/// Everything `verify` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Objects read and checked.
    pub objects_checked: usize,
    /// Original bytes checked.
    pub bytes_checked: u64,
    /// Objects that failed a check, and each unreadable record of the catalog (under the
    /// catalog's key, [`catalog::WAL_LOG`]).
    pub damaged: Vec<Problem>,
    /// Keys that do not belong in a repository.
    pub foreign: Vec<String>,
    /// Files of backups that never completed (harmless; removed by the next backup).
    pub interrupted_backup_files: usize,
    /// Gaps in the WAL.
    pub gaps: Vec<Gap>,
    /// Partial segments (ends of timelines left by promotions).
    pub partial_segments: Vec<String>,
    /// History files missing for timelines that have segments: without them, nothing can
    /// tell which timeline a later one branched from, nor where.
    pub missing_history: Vec<String>,
    /// One verdict per backup.
    pub backups: Vec<BackupVerdict>,
}

impl Report {
    /// True if and only if nothing is damaged, foreign, missing or unrestorable.
    pub fn is_whole(&self) -> bool {
        self.damaged.is_empty()
            && self.foreign.is_empty()
            && self.gaps.is_empty()
            && self.missing_history.is_empty()
            && self.backups.iter().all(|b| b.problems.is_empty())
    }
}

/// The most of a timeline history file that is read; `walkeep-archive` refuses larger
/// ones, and a real one holds a line per ancestor timeline.
const HISTORY_LIMIT: usize = 16 << 20;

/// Keeps the first `limit` bytes written through it and discards the rest.
struct Head {
    bytes: Vec<u8>,
    limit: usize,
}

impl Write for Head {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.limit.saturating_sub(self.bytes.len());
        self.bytes.extend_from_slice(&buf[..room.min(buf.len())]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What an object is expected to hold.
enum Expect {
    Wal(WalFileName),
    BackupFile { sha256: String, size: u64 },
}

/// Verifies the whole repository with `jobs` readers.
pub fn run(repo: &Repository, jobs: usize, progress: bool) -> Result<Report> {
    let _expire_lock = repo.storage().lock("expire", false)?;
    let mut report = Report::default();
    // Manifests first: a backup that completes in between then only adds files that no
    // manifest read here claims, rather than a manifest whose files were not listed.
    let manifest_listing = manifest::list_all(repo)?;
    let listing = repo.storage().list("")?;
    for (key, detail) in &manifest_listing.unreadable {
        report.damaged.push(Problem {
            key: key.clone(),
            detail: detail.clone(),
        });
    }
    let ids = manifest_listing.ids();
    let manifests = manifest_listing.manifests;
    let complete: BTreeSet<&str> = ids.iter().map(String::as_str).collect();

    // Sort every key into its place in the layout.
    let mut checks: Vec<(String, u64, Expect)> = Vec::new();
    let mut backup_files: BTreeMap<String, u64> = BTreeMap::new();
    for info in &listing {
        let key = info.key.as_str();
        if let Some(name) = repo::wal_name_of_key(key) {
            if let WalFileName::Partial(_) = name {
                report.partial_segments.push(name.to_string());
            }
            checks.push((info.key.clone(), info.size, Expect::Wal(name)));
        } else if let Some(rest) = key.strip_prefix("backups/") {
            let id = rest.split('/').next().unwrap_or_default();
            if complete.contains(id) {
                backup_files.insert(info.key.clone(), info.size);
            } else {
                report.interrupted_backup_files += 1;
            }
        } else if !is_metadata_key(key) {
            report.foreign.push(info.key.clone());
        }
    }

    // Backup files are checked against their manifests.
    for m in &manifests {
        let mut verdict = BackupVerdict {
            id: m.id.clone(),
            files: m.files.len(),
            problems: Vec::new(),
        };
        let mut expected_keys = BTreeSet::new();
        for entry in &m.files {
            let key = manifest::file_key(&m.id, &entry.path);
            expected_keys.insert(key.clone());
            match backup_files.get(&key) {
                Some(size) => checks.push((
                    key,
                    *size,
                    Expect::BackupFile {
                        sha256: entry.sha256.clone(),
                        size: entry.size,
                    },
                )),
                None => verdict
                    .problems
                    .push(format!("file {} is missing ({key})", entry.path)),
            }
        }
        let prefix = manifest::data_prefix(&m.id);
        for key in backup_files.keys().filter(|k| k.starts_with(&prefix)) {
            if !expected_keys.contains(key) {
                report.foreign.push(key.clone());
            }
        }
        report.backups.push(verdict);
    }

    // Read everything, in parallel.
    let total: u64 = checks.iter().map(|(_, size, _)| size).sum();
    let bar = progress_bar(total, progress);
    let results = parallel::map(checks, jobs, |(key, stored_size, expect)| {
        let outcome = check_object(repo, &key, &expect);
        bar.inc(stored_size);
        Ok(Some((key, outcome)))
    })?;
    bar.finish_and_clear();
    for (key, outcome) in results {
        report.objects_checked += 1;
        match outcome {
            Ok(size) => report.bytes_checked += size,
            Err(detail) => {
                if let Some(id) = key
                    .strip_prefix("backups/")
                    .and_then(|r| r.split('/').next())
                {
                    if let Some(v) = report.backups.iter_mut().find(|b| b.id == id) {
                        v.problems.push(format!("{key}: {detail}"));
                    }
                }
                report.damaged.push(Problem { key, detail });
            }
        }
    }
    report.damaged.sort();
    report.foreign.sort();

    let catalog = catalog::read(repo)?;
    for unreadable in &catalog.unreadable {
        report.damaged.push(Problem {
            key: catalog::WAL_LOG.to_string(),
            detail: format!(
                "record {} is unreadable ({}); run `walkeep catalog rebuild` to regenerate \
                 the catalog from the objects",
                unreadable.record, unreadable.error
            ),
        });
    }

    check_continuity(repo, &manifests, catalog.records, &mut report)?;
    Ok(report)
}

fn is_metadata_key(key: &str) -> bool {
    key == IDENTITY_KEY
        || (key.starts_with("manifests/") && key.ends_with(".json"))
        || (key.starts_with("catalog/") && key.ends_with(".jsonl"))
        || key.starts_with("locks/")
        || key == crate::expire::HORIZON_KEY
}

/// Decompresses and checks one object; returns its original size or what is wrong.
fn check_object(repo: &Repository, key: &str, expect: &Expect) -> Result<u64, String> {
    let reader = match repo.storage().open(key) {
        Ok(Some(reader)) => reader,
        Ok(None) => return Err("vanished during verification".into()),
        Err(e) => return Err(format!("{e:#}")),
    };
    let limit = match expect {
        Expect::Wal(WalFileName::History(_)) => HISTORY_LIMIT,
        _ => wal::LONG_PAGE_HEADER_SIZE,
    };
    let mut head = Head {
        bytes: Vec::new(),
        limit,
    };
    let meta = object::decode(reader, key, &mut head).map_err(|e| format!("{e:#}"))?;
    match expect {
        Expect::Wal(name) => {
            if meta.name != name.to_string() {
                return Err(format!("holds {:?}, not {name}", meta.name));
            }
            match name {
                WalFileName::Segment(segment) | WalFileName::Partial(segment) => {
                    LongPageHeader::parse(&head.bytes)
                        .and_then(|h| h.check_segment(segment, &repo.identity().expectation()))
                        .map_err(|e| e.to_string())?;
                }
                // Intact as stored, yet useless: no timeline can be followed through it.
                WalFileName::History(timeline) => {
                    TimelinePath::parse_bytes(*timeline, &head.bytes)
                        .map_err(|e| format!("not a valid timeline history: {e:#}"))?;
                }
                WalFileName::BackupHistory(..) => {}
            }
        }
        Expect::BackupFile { sha256, size } => {
            if &meta.sha256 != sha256 || meta.size != *size {
                return Err(format!(
                    "holds SHA-256 {} ({} bytes), the manifest records {sha256} ({size} bytes)",
                    meta.sha256, meta.size
                ));
            }
        }
    }
    Ok(meta.size)
}

/// Finds gaps along every timeline and the backups they break.
fn check_continuity(
    repo: &Repository,
    manifests: &[Manifest],
    records: BTreeMap<String, WalRecord>,
    report: &mut Report,
) -> Result<()> {
    let archive = WalArchive::load_with(repo, records)?;
    let size = archive.segment_size();
    let histories: BTreeSet<u32> = archive.history_timelines().collect();
    for timeline in archive.timelines() {
        if timeline > 1 && !histories.contains(&timeline) {
            report
                .missing_history
                .push(WalFileName::History(timeline).to_string());
        }
    }
    let mut seen = BTreeSet::new();
    for timeline in archive.timelines() {
        let path = match archive.path(repo, timeline) {
            Ok(path) => path,
            Err(e) => {
                // A damaged history file is already listed as damaged; follow the timeline
                // alone rather than not at all.
                tracing::warn!(
                    "history of timeline {timeline} unreadable ({e:#}); following the \
                     timeline alone"
                );
                TimelinePath::single(timeline)
            }
        };
        let present: Vec<u64> = archive.segnos_along(&path);
        let (Some(&first), Some(&last)) = (present.first(), present.last()) else {
            continue;
        };
        let mut segno = first;
        while segno <= last {
            if archive.has(&path.segment(segno, size)) {
                segno += 1;
                continue;
            }
            let start = segno;
            while !archive.has(&path.segment(segno, size)) {
                segno += 1;
            }
            let missing: Vec<String> = (start..segno)
                .map(|n| path.segment(n, size).to_string())
                .collect();
            if !seen.insert(missing.clone()) {
                continue;
            }
            let gap_start = Lsn(start * size);
            let gap_end = Lsn(segno * size);
            let mut gap = Gap {
                timeline,
                after: path.segment(start - 1, size).to_string(),
                before: path.segment(segno, size).to_string(),
                missing,
                replay_stops_at: gap_start,
                breaks_backups: Vec::new(),
                cuts_window_of: Vec::new(),
            };
            for m in manifests
                .iter()
                .filter(|m| path.contains_at(m.timeline, m.stop_lsn))
            {
                if m.start_lsn < gap_end && m.stop_lsn > gap_start {
                    gap.breaks_backups.push(m.id.clone());
                } else if m.stop_lsn <= gap_start {
                    gap.cuts_window_of.push(m.id.clone());
                }
            }
            for id in &gap.breaks_backups {
                if let Some(v) = report.backups.iter_mut().find(|b| &b.id == id) {
                    v.problems.push(format!(
                        "WAL {} to {} is missing, inside the backup",
                        gap.missing[0],
                        gap.missing[gap.missing.len() - 1]
                    ));
                }
            }
            report.gaps.push(gap);
        }
    }

    // A backup's own WAL may be missing at the edges of what is stored, which the walk
    // above (from the oldest to the newest stored segment) cannot see.
    for m in manifests {
        let path = archive
            .path(repo, m.timeline)
            .unwrap_or_else(|_| TimelinePath::single(m.timeline));
        let first = m.start_lsn.segment_number(size);
        let last = Lsn(m.stop_lsn.0.saturating_sub(1)).segment_number(size);
        let missing: Vec<String> = (first..=last)
            .map(|n| path.segment(n, size))
            .filter(|s| !archive.has(s))
            .map(|s| s.to_string())
            .collect();
        if !missing.is_empty() {
            if let Some(v) = report.backups.iter_mut().find(|b| b.id == m.id) {
                let problem = format!("WAL it needs is missing: {}", missing.join(", "));
                if !v.problems.iter().any(|p| p.contains("inside the backup")) {
                    v.problems.push(problem);
                }
            }
        }
    }
    Ok(())
}
