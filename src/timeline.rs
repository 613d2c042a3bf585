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
//!
//! A history file is valid, as PostgreSQL reads it, when every line other than blanks
//! and `#` comments starts with a timeline and an LSN, and the timelines rise and stay
//! below the file's own. Timeline 1 has no history file and every other one lists at
//! least its parent, since PostgreSQL writes the file by copying the parent's and adding
//! a line. The switch points need not rise: a recovery that follows timeline 2 but stops
//! on timeline 1 before timeline 2 began writes a timeline 3 whose history goes back,
//!
//! ```text
//! 1    0/40000D0    after LSN 0/4000090
//! 2    0/4000000    after LSN 0/3000090
//! ```
//!
//! and PostgreSQL reads it as timeline 3 from 0/4000000 on, timeline 2 nowhere.

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
    ///
    /// # Errors
    ///
    /// A line that does not start with a timeline and an LSN, timelines that do not rise
    /// or reach `timeline`, a file that names no parent, or any file for timeline 1.
    pub fn parse(timeline: u32, text: &str) -> Result<TimelinePath> {
        if timeline <= 1 {
            bail!("timeline {timeline} has no history file: it branched from no other");
        }
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
            let after = steps.last().map_or(0, |s: &Step| s.timeline);
            if tli <= after || tli >= timeline {
                bail!(
                    "history of timeline {timeline}, line {}: timeline {tli} is out of order \
                     (expected above {after} and below {timeline})",
                    i + 1
                );
            }
            steps.push(Step {
                timeline: tli,
                begin,
            });
            begin = end;
        }
        if steps.is_empty() {
            bail!("history of timeline {timeline} names no parent timeline");
        }
        steps.push(Step { timeline, begin });
        Ok(TimelinePath { steps })
    }

    /// Parses the history file of `timeline` from its bytes, which must be UTF-8.
    pub fn parse_bytes(timeline: u32, bytes: &[u8]) -> Result<TimelinePath> {
        let text = std::str::from_utf8(bytes)
            .with_context(|| format!("history of timeline {timeline} is not UTF-8 text"))?;
        TimelinePath::parse(timeline, text)
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
        let cases: &[(u32, &str, &str)] = &[
            (5, "garbage\n", "line 1: cannot parse \"garbage\""),
            (2, "1\tnot-an-lsn\n", "cannot parse"),
            (2, "1\n", "cannot parse"),
            (2, "# comment only\n\n", "names no parent"),
            (2, "", "names no parent"),
            (1, "", "timeline 1 has no history file"),
            (1, "0\t0/1\tx\n", "timeline 1 has no history file"),
            (2, "3\t0/1\tx\n", "line 1: timeline 3 is out of order"),
            (2, "2\t0/1\tx\n", "line 1: timeline 2 is out of order"),
            (2, "0\t0/1\tx\n", "line 1: timeline 0 is out of order"),
            (
                3,
                "2\t0/1\tx\n1\t0/2\ty\n",
                "line 2: timeline 1 is out of order",
            ),
            (
                3,
                "1\t0/1\tx\n1\t0/2\ty\n",
                "line 2: timeline 1 is out of order",
            ),
        ];
        for (timeline, text, expected) in cases {
            let err = match TimelinePath::parse(*timeline, text) {
                Ok(path) => panic!("timeline {timeline}, {text:?}: parsed as {path:?}"),
                Err(e) => format!("{e:#}"),
            };
            assert!(
                err.contains(expected),
                "timeline {timeline}, {text:?}: {err:?} should contain {expected:?}"
            );
        }
        let err = TimelinePath::parse_bytes(2, b"1\t0/1\t\xff\n").unwrap_err();
        assert!(format!("{err:#}").contains("not UTF-8"), "{err:#}");
    }

    #[test]
    fn accepts_what_postgresql_writes() {
        // (timeline, history file, its path as (timeline, where it begins))
        type Case = (u32, &'static str, &'static [(u32, &'static str)]);
        let cases: &[Case] = &[
            // A promotion; the reason is optional to the parser, as to PostgreSQL.
            (
                2,
                "1\t0/3000158\tno recovery target specified\n",
                &[(1, "0/0"), (2, "0/3000158")],
            ),
            (2, "1\t0/3000158\n", &[(1, "0/0"), (2, "0/3000158")]),
            // Comments, blank lines and spaces.
            (
                4,
                "# copied\n\n1 0/3000158 a\n  3\t1/0\tb\n",
                &[(1, "0/0"), (3, "0/3000158"), (4, "1/0")],
            ),
            // Written by PostgreSQL 15: recovery followed timeline 2 but stopped on timeline
            // 1, before timeline 2 began.
            (
                3,
                "1\t0/40000D0\tafter LSN 0/4000090\n\n2\t0/4000000\tafter LSN 0/3000090\n",
                &[(1, "0/0"), (2, "0/40000D0"), (3, "0/4000000")],
            ),
        ];
        for (timeline, text, expected) in cases {
            let path = TimelinePath::parse(*timeline, text)
                .unwrap_or_else(|e| panic!("timeline {timeline}, {text:?}: {e:#}"));
            let expected: Vec<Step> = expected
                .iter()
                .map(|(timeline, begin)| Step {
                    timeline: *timeline,
                    begin: begin.parse().unwrap(),
                })
                .collect();
            assert_eq!(path.steps, expected, "timeline {timeline}, {text:?}");
        }
    }

    #[test]
    fn a_timeline_that_never_began_holds_no_segment() {
        let text = "1\t0/40000D0\tafter LSN 0/4000090\n2\t0/4000000\tafter LSN 0/3000090\n";
        let path = TimelinePath::parse(3, text).unwrap();
        assert_eq!(
            path.segment(3, MB16).to_string(),
            "000000010000000000000003"
        );
        assert_eq!(
            path.segment(4, MB16).to_string(),
            "000000030000000000000004"
        );
        assert!(!path.contains_at(2, "0/4000050".parse().unwrap()));
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
