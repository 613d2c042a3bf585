//! WAL file names and segment headers.
//!
//! PostgreSQL hands `archive_command` four kinds of file, told apart by name alone:
//!
//! | kind | example |
//! |---|---|
//! | segment | `000000010000000A000000FF` |
//! | partial segment (an old timeline's end) | `000000010000000A000000FF.partial` |
//! | timeline history | `00000002.history` |
//! | backup history | `000000010000000A000000FF.00000028.backup` |
//!
//! A segment name is `TTTTTTTTXXXXXXXXYYYYYYYY`: timeline, then the segment number split
//! into a "log" part and an in-log part. How many segments make one log depends on the
//! WAL segment size (256 for 16 MiB), so the segment number can only be computed once that
//! size is known; [`SegmentName`] keeps the raw fields and checks the in-log part against
//! the size when asked.
//!
//! Every segment starts with a long page header that names the cluster (system identifier),
//! the segment size, the block size and the address of the page. [`LongPageHeader`] parses
//! it, and [`LongPageHeader::check_segment`] is the one place that decides whether a
//! segment's bytes belong under its name and in a repository.

use std::fmt;
use std::str::FromStr;

use crate::lsn::Lsn;

/// Size of PostgreSQL's long page header (`SizeOfXLogLongPHD`).
pub const LONG_PAGE_HEADER_SIZE: usize = 40;

/// `XLP_LONG_HEADER`: set in `xlp_info` on the first page of every segment.
const XLP_LONG_HEADER: u16 = 0x0002;

/// WAL page magic numbers (`XLOG_PAGE_MAGIC`) and the major version that writes each.
const PAGE_MAGICS: [(u16, u32); 7] = [
    (0xD101, 12),
    (0xD106, 13),
    (0xD10D, 14),
    (0xD110, 15),
    (0xD113, 16),
    (0xD116, 17),
    (0xD118, 18),
];

/// The PostgreSQL major version whose WAL carries this page magic, if walkeep knows it.
pub fn major_version_of_magic(magic: u16) -> Option<u32> {
    PAGE_MAGICS
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|(_, v)| *v)
}

/// The WAL page magic written by a PostgreSQL major version, if walkeep knows it.
pub fn magic_of_major_version(version: u32) -> Option<u16> {
    PAGE_MAGICS
        .iter()
        .find(|(_, v)| *v == version)
        .map(|(m, _)| *m)
}

/// True if and only if `size` is a WAL segment size PostgreSQL accepts: a power of two
/// from 1 MiB to 1 GiB.
pub fn is_valid_segment_size(size: u64) -> bool {
    size.is_power_of_two() && (1 << 20..=1 << 30).contains(&size)
}

/// How many segments of `segment_size` bytes make up one 4 GiB "log" (`XLogSegmentsPerXLogId`).
pub fn segments_per_log(segment_size: u64) -> u64 {
    0x1_0000_0000 / segment_size
}

/// The name of a WAL segment: timeline plus the two halves of the segment number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentName {
    /// Timeline the segment belongs to.
    pub timeline: u32,
    /// High part of the segment number ("log id").
    pub log: u32,
    /// Low part of the segment number, below [`segments_per_log`].
    pub seg: u32,
}

impl SegmentName {
    /// The segment with number `segno` on `timeline`.
    pub fn from_segno(timeline: u32, segno: u64, segment_size: u64) -> SegmentName {
        let per_log = segments_per_log(segment_size);
        SegmentName {
            timeline,
            log: (segno / per_log) as u32,
            seg: (segno % per_log) as u32,
        }
    }

    /// The segment holding `lsn` on `timeline`.
    pub fn containing(timeline: u32, lsn: Lsn, segment_size: u64) -> SegmentName {
        SegmentName::from_segno(timeline, lsn.segment_number(segment_size), segment_size)
    }

    /// The segment number, or an error when the in-log part is out of range for the size
    /// (such a name cannot come from a cluster with that segment size).
    pub fn segno(&self, segment_size: u64) -> Result<u64, WalError> {
        let per_log = segments_per_log(segment_size);
        if u64::from(self.seg) >= per_log {
            return Err(WalError::SegmentOutOfRange {
                name: self.to_string(),
                segment_size,
            });
        }
        Ok(u64::from(self.log) * per_log + u64::from(self.seg))
    }

    /// The first byte position of this segment.
    pub fn start_lsn(&self, segment_size: u64) -> Result<Lsn, WalError> {
        Ok(Lsn(self.segno(segment_size)? * segment_size))
    }

    /// The segment that follows this one on the same timeline.
    pub fn next(&self, segment_size: u64) -> Result<SegmentName, WalError> {
        let segno = self.segno(segment_size)?;
        Ok(SegmentName::from_segno(
            self.timeline,
            segno + 1,
            segment_size,
        ))
    }

    /// The first 16 characters of the name (timeline and log); the repository groups
    /// segments in one folder per such prefix.
    pub fn log_prefix(&self) -> String {
        format!("{:08X}{:08X}", self.timeline, self.log)
    }
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}{:08X}{:08X}", self.timeline, self.log, self.seg)
    }
}

impl FromStr for SegmentName {
    type Err = WalError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 24 || !is_upper_hex(s) {
            return Err(WalError::BadName(s.to_string()));
        }
        let part = |i: usize| u32::from_str_radix(&s[i..i + 8], 16).expect("checked hex");
        let name = SegmentName {
            timeline: part(0),
            log: part(8),
            seg: part(16),
        };
        if name.timeline == 0 {
            return Err(WalError::BadName(s.to_string()));
        }
        Ok(name)
    }
}

/// A file name PostgreSQL may pass to `archive_command` or ask of `restore_command`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WalFileName {
    /// A complete WAL segment.
    Segment(SegmentName),
    /// The last, incomplete segment of a timeline that ended in a promotion.
    Partial(SegmentName),
    /// The history file of a timeline (`TTTTTTTT.history`).
    History(u32),
    /// A backup history file: the segment where a backup started and the offset in it.
    BackupHistory(SegmentName, u32),
}

impl WalFileName {
    /// The timeline this file belongs to.
    pub fn timeline(&self) -> u32 {
        match self {
            WalFileName::Segment(s) | WalFileName::Partial(s) => s.timeline,
            WalFileName::BackupHistory(s, _) => s.timeline,
            WalFileName::History(tli) => *tli,
        }
    }

    /// A short word for the kind of file, as used in logs and the catalog.
    pub fn kind(&self) -> &'static str {
        match self {
            WalFileName::Segment(_) => "segment",
            WalFileName::Partial(_) => "partial",
            WalFileName::History(_) => "history",
            WalFileName::BackupHistory(..) => "backup",
        }
    }
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalFileName::Segment(s) => write!(f, "{s}"),
            WalFileName::Partial(s) => write!(f, "{s}.partial"),
            WalFileName::History(tli) => write!(f, "{tli:08X}.history"),
            WalFileName::BackupHistory(s, offset) => write!(f, "{s}.{offset:08X}.backup"),
        }
    }
}

impl FromStr for WalFileName {
    type Err = WalError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || WalError::BadName(s.to_string());
        if let Some(tli) = s.strip_suffix(".history") {
            if tli.len() != 8 || !is_upper_hex(tli) {
                return Err(bad());
            }
            let tli = u32::from_str_radix(tli, 16).map_err(|_| bad())?;
            return if tli == 0 {
                Err(bad())
            } else {
                Ok(WalFileName::History(tli))
            };
        }
        if let Some(seg) = s.strip_suffix(".partial") {
            return Ok(WalFileName::Partial(seg.parse().map_err(|_| bad())?));
        }
        if let Some(rest) = s.strip_suffix(".backup") {
            let (seg, offset) = rest.split_once('.').ok_or_else(bad)?;
            if offset.len() != 8 || !is_upper_hex(offset) {
                return Err(bad());
            }
            let offset = u32::from_str_radix(offset, 16).map_err(|_| bad())?;
            return Ok(WalFileName::BackupHistory(
                seg.parse().map_err(|_| bad())?,
                offset,
            ));
        }
        Ok(WalFileName::Segment(s.parse().map_err(|_| bad())?))
    }
}

fn is_upper_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

/// What a WAL name or header check found wrong.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// Not a name PostgreSQL gives WAL files.
    #[error(
        "{0:?} is not a WAL file name: expected a segment (24 hex digits), \
         TTTTTTTT.history, <segment>.partial or <segment>.XXXXXXXX.backup"
    )]
    BadName(String),
    /// The in-log part of a segment name cannot exist with this segment size.
    #[error("segment name {name} is out of range for a WAL segment size of {segment_size} bytes")]
    SegmentOutOfRange {
        /// The segment name.
        name: String,
        /// The segment size it was checked against.
        segment_size: u64,
    },
    /// The bytes do not start with a long page header walkeep can read.
    #[error("{0}")]
    BadHeader(String),
    /// The header belongs to another cluster.
    #[error(
        "WAL belongs to another cluster: system identifier {found} in the segment header, \
         expected {expected}"
    )]
    ForeignSystem {
        /// System identifier of the repository.
        expected: u64,
        /// System identifier in the segment.
        found: u64,
    },
    /// The header is readable but disagrees with the name or the repository.
    #[error("{what}: expected {expected}, found {found}")]
    Mismatch {
        /// What was compared.
        what: &'static str,
        /// The value the name or repository requires.
        expected: String,
        /// The value in the segment.
        found: String,
    },
}

/// The long page header at the start of every WAL segment (`XLogLongPageHeaderData`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongPageHeader {
    /// `xlp_magic`: identifies the WAL format, and so the PostgreSQL major version.
    pub magic: u16,
    /// `xlp_info` flag bits.
    pub info: u16,
    /// `xlp_tli`: timeline of the first record on this page.
    pub timeline: u32,
    /// `xlp_pageaddr`: WAL position of this page.
    pub page_address: Lsn,
    /// `xlp_sysid`: system identifier of the cluster that wrote it.
    pub system_identifier: u64,
    /// `xlp_seg_size`: WAL segment size in bytes.
    pub segment_size: u32,
    /// `xlp_xlog_blcksz`: WAL block size in bytes.
    pub block_size: u32,
}

/// What a segment must agree with to be accepted into a repository.
#[derive(Clone, Copy, Debug)]
pub struct SegmentExpectation {
    /// The cluster's system identifier.
    pub system_identifier: u64,
    /// The cluster's WAL segment size in bytes.
    pub segment_size: u64,
    /// The cluster's WAL block size in bytes.
    pub block_size: u32,
    /// The PostgreSQL major version the repository was made for.
    pub major_version: u32,
}

impl LongPageHeader {
    /// Parses the header from the first bytes of a segment (WAL is little-endian on every
    /// platform walkeep runs on).
    pub fn parse(bytes: &[u8]) -> Result<LongPageHeader, WalError> {
        if bytes.len() < LONG_PAGE_HEADER_SIZE {
            return Err(WalError::BadHeader(format!(
                "segment is {} bytes long, too short for a WAL page header ({} bytes)",
                bytes.len(),
                LONG_PAGE_HEADER_SIZE
            )));
        }
        let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        let header = LongPageHeader {
            magic: u16_at(0),
            info: u16_at(2),
            timeline: u32_at(4),
            page_address: Lsn(u64_at(8)),
            system_identifier: u64_at(24),
            segment_size: u32_at(32),
            block_size: u32_at(36),
        };
        if major_version_of_magic(header.magic).is_none() {
            return Err(WalError::BadHeader(format!(
                "not a WAL segment of a supported PostgreSQL version: page magic {:#06X} \
                 (known: 12 to 18)",
                header.magic
            )));
        }
        if header.info & XLP_LONG_HEADER == 0 {
            return Err(WalError::BadHeader(format!(
                "first page has no long header (xlp_info {:#06X}); the file does not start \
                 at a segment boundary",
                header.info
            )));
        }
        Ok(header)
    }

    /// The PostgreSQL major version that wrote this header.
    pub fn major_version(&self) -> u32 {
        major_version_of_magic(self.magic).expect("checked when parsed")
    }

    /// Checks that this header opens the segment `name` of the cluster described by
    /// `expect`: same cluster, same sizes and version, and a page address and timeline
    /// that fit the name.
    ///
    /// The header's timeline may be lower than the name's: the first segment of a new
    /// timeline starts as a copy of the old timeline's segment, first page included.
    pub fn check_segment(
        &self,
        name: &SegmentName,
        expect: &SegmentExpectation,
    ) -> Result<(), WalError> {
        if self.system_identifier != expect.system_identifier {
            return Err(WalError::ForeignSystem {
                expected: expect.system_identifier,
                found: self.system_identifier,
            });
        }
        let mismatch = |what, expected: String, found: String| {
            Err(WalError::Mismatch {
                what,
                expected,
                found,
            })
        };
        if u64::from(self.segment_size) != expect.segment_size {
            return mismatch(
                "WAL segment size in header",
                expect.segment_size.to_string(),
                self.segment_size.to_string(),
            );
        }
        if self.block_size != expect.block_size {
            return mismatch(
                "WAL block size in header",
                expect.block_size.to_string(),
                self.block_size.to_string(),
            );
        }
        if self.major_version() != expect.major_version {
            return mismatch(
                "PostgreSQL major version of the WAL",
                expect.major_version.to_string(),
                self.major_version().to_string(),
            );
        }
        let start = name.start_lsn(expect.segment_size)?;
        if self.page_address != start {
            return mismatch(
                "page address in header (segment number)",
                format!("{start} for {name}"),
                self.page_address.to_string(),
            );
        }
        if self.timeline == 0 || self.timeline > name.timeline {
            return mismatch(
                "timeline in header",
                format!("at most {} for {name}", name.timeline),
                self.timeline.to_string(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const MB16: u64 = 16 << 20;

    /// Builds the first bytes of a segment with the given header fields.
    pub(crate) fn header_bytes(magic: u16, tli: u32, addr: u64, sysid: u64, seg: u32) -> Vec<u8> {
        let mut b = vec![0u8; LONG_PAGE_HEADER_SIZE];
        b[0..2].copy_from_slice(&magic.to_le_bytes());
        b[2..4].copy_from_slice(&XLP_LONG_HEADER.to_le_bytes());
        b[4..8].copy_from_slice(&tli.to_le_bytes());
        b[8..16].copy_from_slice(&addr.to_le_bytes());
        b[24..32].copy_from_slice(&sysid.to_le_bytes());
        b[32..36].copy_from_slice(&seg.to_le_bytes());
        b[36..40].copy_from_slice(&8192u32.to_le_bytes());
        b
    }

    fn expectation() -> SegmentExpectation {
        SegmentExpectation {
            system_identifier: 7,
            segment_size: MB16,
            block_size: 8192,
            major_version: 15,
        }
    }

    #[test]
    fn names_round_trip() {
        let cases = [
            "000000010000000000000001",
            "0000000A00000003000000FF",
            "000000010000000000000001.partial",
            "00000002.history",
            "000000010000000000000002.00000028.backup",
        ];
        for text in cases {
            let name: WalFileName = text.parse().unwrap();
            assert_eq!(name.to_string(), text);
        }
    }

    #[test]
    fn rejects_names_postgres_never_uses() {
        let cases = [
            "",
            "00000001000000000000001",
            "0000000100000000000000011",
            "00000001000000000000000g",
            "00000001000000000000000a",
            "000000000000000000000001",
            "00000000.history",
            "0000001.history",
            "000000010000000000000001.backup",
            "000000010000000000000001.0028.backup",
            "000000010000000000000001.zst",
            "../000000010000000000000001",
            "RECOVERYXLOG",
        ];
        for text in cases {
            assert!(
                text.parse::<WalFileName>().is_err(),
                "{text:?} should be rejected"
            );
        }
    }

    #[test]
    fn succession_crosses_log_boundary_for_each_size() {
        // (segment size, last segment of log 0, first of log 1)
        let cases = [
            (
                1u64 << 20,
                "000000010000000000000FFF",
                "000000010000000100000000",
            ),
            (MB16, "0000000100000000000000FF", "000000010000000100000000"),
            (
                64 << 20,
                "00000001000000000000003F",
                "000000010000000100000000",
            ),
            (
                1 << 30,
                "000000010000000000000003",
                "000000010000000100000000",
            ),
        ];
        for (size, last, first) in cases {
            let last: SegmentName = last.parse().unwrap();
            assert_eq!(last.next(size).unwrap().to_string(), first, "size {size}");
            let segno = last.segno(size).unwrap();
            assert_eq!(
                SegmentName::from_segno(1, segno + 1, size).to_string(),
                first
            );
        }
    }

    #[test]
    fn in_log_part_is_checked_against_segment_size() {
        let name: SegmentName = "000000010000000000000100".parse().unwrap();
        assert!(name.segno(MB16).is_err());
        assert_eq!(name.segno(1 << 20).unwrap(), 0x100);
    }

    #[test]
    fn valid_segment_sizes() {
        for mb in [1u64, 2, 16, 64, 1024] {
            assert!(is_valid_segment_size(mb << 20), "{mb} MiB");
        }
        for size in [0u64, 512 << 10, 3 << 20, 2 << 30] {
            assert!(!is_valid_segment_size(size), "{size}");
        }
    }

    #[test]
    fn header_check_accepts_matching_segment() {
        let name: SegmentName = "000000010000000000000003".parse().unwrap();
        let h = LongPageHeader::parse(&header_bytes(0xD110, 1, 3 * MB16, 7, MB16 as u32)).unwrap();
        h.check_segment(&name, &expectation()).unwrap();
        // First segment of timeline 2, copied from timeline 1.
        let name: SegmentName = "000000020000000000000003".parse().unwrap();
        h.check_segment(&name, &expectation()).unwrap();
    }

    #[test]
    fn header_check_names_what_differs() {
        let name: SegmentName = "000000010000000000000003".parse().unwrap();
        let cases: [(Vec<u8>, &str); 5] = [
            (
                header_bytes(0xD110, 1, 3 * MB16, 8, MB16 as u32),
                "another cluster",
            ),
            (
                header_bytes(0xD110, 1, 4 * MB16, 7, MB16 as u32),
                "page address",
            ),
            (
                header_bytes(0xD110, 2, 3 * MB16, 7, MB16 as u32),
                "timeline",
            ),
            (
                header_bytes(0xD110, 1, 3 * MB16, 7, 1 << 20),
                "segment size",
            ),
            (
                header_bytes(0xD113, 1, 3 * MB16, 7, MB16 as u32),
                "major version",
            ),
        ];
        for (bytes, what) in cases {
            let h = LongPageHeader::parse(&bytes).unwrap();
            let err = h
                .check_segment(&name, &expectation())
                .unwrap_err()
                .to_string();
            assert!(err.contains(what), "{err:?} should mention {what:?}");
        }
    }

    #[test]
    fn header_parse_rejects_garbage() {
        assert!(LongPageHeader::parse(&[0u8; 10]).is_err());
        assert!(LongPageHeader::parse(&[0u8; 64]).is_err());
        let mut short_header = header_bytes(0xD110, 1, 0, 7, MB16 as u32);
        short_header[2] = 0;
        assert!(LongPageHeader::parse(&short_header).is_err());
    }
}
