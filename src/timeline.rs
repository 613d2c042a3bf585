//! Timeline history and the WAL file that holds each segment along a timeline.
//!
//! A timeline's history file lists its ancestors and where each one ended:
//!
//! ```text
//! (fields are separated by tabs)
//! 1    0/3000158    no recovery target specified
//! 2    0/5000000    before 2026-12-03 17:55:00+00
//! ```
//!
//! So timeline 3 is timeline 1 up to 0/3000158, then timeline 2 up to 0/5000000, then
//! itself. Reading along timeline 3, PostgreSQL takes each segment from the newest
//! timeline that had begun by that segment: the segment in which a timeline begins is
//! read from the new timeline, whose copy holds the old timeline's records up to the
//! switch and the new timeline's records after it.

use anyhow::{bail, Context, Result};

use crate::lsn::Lsn;
use crate::wal::SegmentName;

/// One timeline along a path: it is in effect from `begin` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// The timeline.
    pub timeline: u32,
    /// Where it begins (0/0 for the first timeline of the path).
    pub begin: Lsn,
}

/// The sequence of timelines that make up one timeline's history, oldest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimelinePath {
    /// Steps, oldest first; the last is the timeline itself.
    pub steps: Vec<Step>,
}

impl TimelinePath {
    /// The path of a timeline with no history file (timeline 1, or a lone timeline).
    pub fn single(timeline: u32) -> TimelinePath {
        TimelinePath {
            steps: vec![Step {
                timeline,
                begin: Lsn(0),
            }],
        }
    }

    /// Parses the history file of `timeline`.
    pub fn parse(timeline: u32, text: &str) -> Result<TimelinePath> {
        let mut steps = Vec::new();
        let mut begin = Lsn(0);
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let parsed = (|| -> Option<(u32, Lsn)> {
                let tli = fields.next()?.parse().ok()?;
                let end = fields.next()?.parse().ok()?;
                Some((tli, end))
            })();
            let (tli, end) = parsed.with_context(|| {
                format!(
                    "history of timeline {timeline}, line {}: cannot parse {line:?}",
                    i + 1
                )
            })?;
            if tli >= timeline || steps.last().is_some_and(|s: &Step| s.timeline >= tli) {
                bail!(
                    "history of timeline {timeline}: timelines out of order at line {}",
                    i + 1
                );
            }
            steps.push(Step {
                timeline: tli,
                begin,
            });
            begin = end;
        }
        steps.push(Step { timeline, begin });
        Ok(TimelinePath { steps })
    }

    /// The timeline this path leads to.
    pub fn target(&self) -> u32 {
        self.steps
            .last()
            .expect("a path has at least one step")
            .timeline
    }

    /// True if and only if `timeline` is on this path and was still current at `lsn`.
    pub fn contains_at(&self, timeline: u32, lsn: Lsn) -> bool {
        self.steps.iter().enumerate().any(|(i, step)| {
            let end = self.steps.get(i + 1).map(|next| next.begin);
            step.timeline == timeline && step.begin <= lsn && end.is_none_or(|end| lsn <= end)
        })
    }

    /// The timeline whose file holds segment `segno` when reading along this path.
    pub fn timeline_of_segment(&self, segno: u64, segment_size: u64) -> u32 {
        self.steps
            .iter()
            .rev()
            .find(|step| step.begin.segment_number(segment_size) <= segno)
            .unwrap_or(&self.steps[0])
            .timeline
    }

    /// The name of segment `segno` along this path.
    pub fn segment(&self, segno: u64, segment_size: u64) -> SegmentName {
        SegmentName::from_segno(
            self.timeline_of_segment(segno, segment_size),
            segno,
            segment_size,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB16: u64 = 16 << 20;

    #[test]
    fn parses_history_and_picks_segment_timelines() {
        let text = "1\t0/3000158\tno recovery target specified\n\n\
                    2\t0/5000000\tbefore 2026-12-03 17:55:00+00\n";
        let path = TimelinePath::parse(3, text).unwrap();
        assert_eq!(path.target(), 3);
        let names: Vec<String> = (1..=6).map(|s| path.segment(s, MB16).to_string()).collect();
        assert_eq!(
            names,
            [
                "000000010000000000000001",
                "000000010000000000000002",
                "000000020000000000000003", // timeline 2 begins inside segment 3
                "000000020000000000000004",
                "000000030000000000000005", // timeline 3 begins at the start of segment 5
                "000000030000000000000006",
            ]
        );
        assert!(path.contains_at(1, "0/3000000".parse().unwrap()));
        assert!(!path.contains_at(1, "0/4000000".parse().unwrap()));
        assert!(path.contains_at(2, "0/4000000".parse().unwrap()));
    }

    #[test]
    fn rejects_malformed_history() {
        assert!(TimelinePath::parse(2, "1\tnot-an-lsn\n").is_err());
        assert!(TimelinePath::parse(2, "3\t0/1\tx\n").is_err());
        assert!(TimelinePath::parse(3, "2\t0/1\tx\n1\t0/2\ty\n").is_err());
    }

    #[test]
    fn single_timeline_path() {
        let path = TimelinePath::single(1);
        assert_eq!(
            path.segment(0x1FF, MB16).to_string(),
            "0000000100000001000000FF"
        );
    }
}
