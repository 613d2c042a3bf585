//! Reading the records of a WAL segment for what recovery targets need.
//!
//! PostgreSQL stops recovery at a target time, transaction or restore point only when it
//! reads the matching record: the first transaction end (commit or abort) after the target
//! time, the end of the target transaction, the named restore point. If the archive holds
//! no such record, recovery replays everything and then stops with FATAL ("recovery ended
//! before configured recovery target was reached"). To refuse such a target before
//! anything is restored, the archiver summarises each segment as it streams through:
//! the earliest and latest transaction end times, the newest transaction that ended, and
//! the restore points, each with its position.
//!
//! The scanner walks the segment page by page. Each page starts with a header (a long one
//! on the segment's first page); records are 8-byte aligned, may cross page boundaries,
//! and a page that continues a record says so (`XLP_FIRST_IS_CONTRECORD`). Only
//! transaction and restore-point records are assembled; the others are skipped by length.
//! The summary is best effort and never fails an archive: a record that starts in one
//! segment and ends in the next is not seen, and anything unexpected ends the scan with
//! what was found so far (`complete` false).

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::lsn::Lsn;

/// Size of a record header (`SizeOfXLogRecord`).
const RECORD_HEADER: usize = 24;
/// Size of a short page header (`SizeOfXLogShortPHD`).
const SHORT_PAGE_HEADER: usize = 24;
/// Size of a long page header (`SizeOfXLogLongPHD`).
const LONG_PAGE_HEADER: usize = 40;
/// `XLP_FIRST_IS_CONTRECORD`.
const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
/// `RM_XLOG_ID` and `RM_XACT_ID`.
const RM_XLOG: u8 = 0;
const RM_XACT: u8 = 1;
/// Record kinds of the XLOG resource manager (`xl_info & 0xF0`).
const XLOG_SWITCH: u8 = 0x40;
const XLOG_RESTORE_POINT: u8 = 0x70;
/// Transaction record kinds (`xl_info & XLOG_XACT_OPMASK`).
const XACT_OPMASK: u8 = 0x70;
const XACT_COMMIT: u8 = 0x00;
const XACT_ABORT: u8 = 0x20;
const XACT_COMMIT_PREPARED: u8 = 0x30;
const XACT_ABORT_PREPARED: u8 = 0x40;
/// Block ids that introduce something other than a block reference.
const BLOCK_ID_DATA_SHORT: u8 = 255;
const BLOCK_ID_DATA_LONG: u8 = 254;
const BLOCK_ID_ORIGIN: u8 = 253;
const BLOCK_ID_TOPLEVEL_XID: u8 = 252;
const MAX_BLOCK_ID: u8 = 32;
/// Block reference flags.
const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
const BKPBLOCK_SAME_REL: u8 = 0x80;
const BKPIMAGE_HAS_HOLE: u8 = 0x01;

/// A named restore point found in a segment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedPoint {
    /// The name given to `pg_create_restore_point`.
    pub name: String,
    /// Where its record starts.
    pub lsn: Lsn,
    /// When it was made.
    pub time: DateTime<Utc>,
}

/// What a segment holds that recovery targets depend on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentSummary {
    /// Transaction ends (commits and aborts) seen.
    pub xact_ends: u64,
    /// The earliest transaction end time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_xact_end: Option<DateTime<Utc>>,
    /// The latest transaction end time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_xact_end: Option<DateTime<Utc>>,
    /// The newest (in wraparound order) transaction id that ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest_xid: Option<u32>,
    /// Restore points.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restore_points: Vec<NamedPoint>,
    /// Where the last record that ends in this segment starts: a position recovery can
    /// stop at with every record before it replayed, using this segment and those before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_record: Option<Lsn>,
    /// True if and only if the scan reached the end of the segment's records.
    pub complete: bool,
}

/// True if and only if `a` is newer than `b` in PostgreSQL's circular xid order.
pub fn xid_follows(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// PostgreSQL timestamps count microseconds from 2000-01-01 UTC.
fn pg_time(micros: i64) -> Option<DateTime<Utc>> {
    let epoch = Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).single()?;
    epoch.checked_add_signed(Duration::microseconds(micros))
}

/// Where the scanner is between bytes.
#[derive(Debug)]
enum State {
    /// Skipping the tail of a record that began in the previous segment.
    SkipContinuation,
    /// Expecting a record header at the next aligned position.
    Between,
    /// Assembling a record header that crosses a page boundary.
    Header(Vec<u8>),
    /// Inside a record: `left` bytes to go, kept when `keep` holds the record so far.
    Body {
        left: usize,
        keep: Option<Vec<u8>>,
        start: Lsn,
    },
    /// No more records to read.
    Done,
}

/// Summarises a segment from its bytes, fed in chunks of any size.
#[derive(Debug)]
pub struct Scanner {
    page_size: usize,
    major_version: u32,
    segment_start: Lsn,
    page: Vec<u8>,
    page_index: u64,
    state: State,
    failed: bool,
    summary: SegmentSummary,
}

impl Scanner {
    /// A scanner for the segment starting at `segment_start`.
    pub fn new(segment_start: Lsn, page_size: u32, major_version: u32) -> Scanner {
        Scanner {
            page_size: page_size as usize,
            major_version,
            segment_start,
            page: Vec::with_capacity(page_size as usize),
            page_index: 0,
            state: State::SkipContinuation,
            failed: false,
            summary: SegmentSummary::default(),
        }
    }

    /// Feeds the next bytes of the segment.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !matches!(self.state, State::Done) {
            let take = (self.page_size - self.page.len()).min(bytes.len());
            self.page.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.page.len() == self.page_size {
                let page = std::mem::take(&mut self.page);
                self.scan_page(&page);
                self.page = page;
                self.page.clear();
                self.page_index += 1;
            }
        }
    }

    /// The summary of what was fed. It is complete when every page was read without
    /// surprise, whether the records ended (a switch, zeroed space) or the last one runs
    /// on into the next segment.
    pub fn finish(mut self) -> SegmentSummary {
        let stopped_clean = matches!(self.state, State::Done) && !self.failed;
        let read_through =
            !matches!(self.state, State::Done) && self.page.is_empty() && self.page_index > 0;
        self.summary.complete = stopped_clean || read_through;
        self.summary
    }

    fn stop(&mut self, clean: bool) {
        self.state = State::Done;
        self.failed = !clean;
    }

    fn scan_page(&mut self, page: &[u8]) {
        let u16_at = |o: usize| u16::from_le_bytes([page[o], page[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(page[o..o + 4].try_into().unwrap());
        let info = u16_at(2);
        let page_lsn = Lsn(u64::from_le_bytes(page[8..16].try_into().unwrap()));
        let expected = Lsn(self.segment_start.0 + self.page_index * self.page_size as u64);
        if page_lsn != expected {
            // A recycled page from an older incarnation: the valid WAL ended before it.
            return self.stop(true);
        }
        let mut offset = if self.page_index == 0 {
            LONG_PAGE_HEADER
        } else {
            SHORT_PAGE_HEADER
        };
        let continues = info & XLP_FIRST_IS_CONTRECORD != 0;
        let rem_len = u32_at(16) as usize;

        match &mut self.state {
            State::SkipContinuation => {
                if continues {
                    let here = rem_len.min(self.page_size - offset);
                    if here < rem_len {
                        return; // the continuation runs on into the next page
                    }
                    offset = align(offset + here);
                }
                self.state = State::Between;
            }
            State::Between => {}
            State::Header(_) | State::Body { .. } => {
                if !continues {
                    return self.stop(false);
                }
            }
            State::Done => return,
        }

        while offset < self.page_size {
            match std::mem::replace(&mut self.state, State::Done) {
                State::Between => {
                    self.state = State::Header(Vec::with_capacity(RECORD_HEADER));
                }
                State::Header(mut header) => {
                    let take = (RECORD_HEADER - header.len()).min(self.page_size - offset);
                    header.extend_from_slice(&page[offset..offset + take]);
                    offset += take;
                    if header.len() < RECORD_HEADER {
                        self.state = State::Header(header);
                        continue;
                    }
                    let total = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
                    if total == 0 {
                        return self.stop(true); // zeroed space: the end of the records
                    }
                    if total < RECORD_HEADER {
                        return self.stop(false);
                    }
                    let start = self.record_start(offset, RECORD_HEADER);
                    let wanted = matches!(header[17], RM_XLOG | RM_XACT);
                    let keep = wanted.then(|| {
                        let mut record = Vec::with_capacity(total);
                        record.extend_from_slice(&header);
                        record
                    });
                    self.state = State::Body {
                        left: total - RECORD_HEADER,
                        keep,
                        start,
                    };
                    if total == RECORD_HEADER {
                        offset = self.end_record(offset);
                    }
                }
                State::Body {
                    left,
                    mut keep,
                    start,
                } => {
                    let take = left.min(self.page_size - offset);
                    if let Some(record) = keep.as_mut() {
                        record.extend_from_slice(&page[offset..offset + take]);
                    }
                    offset += take;
                    self.state = State::Body {
                        left: left - take,
                        keep,
                        start,
                    };
                    if left == take {
                        offset = self.end_record(offset);
                    }
                }
                done @ State::Done => {
                    self.state = done;
                    return;
                }
                State::SkipContinuation => unreachable!("resolved above"),
            }
        }
    }

    /// The position of a record whose header ended at `offset` on the current page,
    /// `header_len` bytes ago (the header may have begun on an earlier page).
    fn record_start(&self, offset: usize, header_len: usize) -> Lsn {
        let here = self.segment_start.0 + self.page_index * self.page_size as u64 + offset as u64;
        Lsn(here.saturating_sub(header_len as u64))
    }

    /// Handles a finished record and returns the aligned offset of the next one.
    fn end_record(&mut self, offset: usize) -> usize {
        let finished = std::mem::replace(&mut self.state, State::Between);
        if let State::Body { keep, start, .. } = finished {
            self.summary.last_record = Some(start);
            if keep.is_some_and(|record| self.record(&record, start)) {
                self.stop(true);
                return self.page_size;
            }
        }
        align(offset)
    }

    /// Looks at one assembled record; true if and only if it is a WAL switch (nothing
    /// follows it in this segment).
    fn record(&mut self, record: &[u8], start: Lsn) -> bool {
        let xid = u32::from_le_bytes(record[4..8].try_into().unwrap());
        let info = record[16];
        let rmid = record[17];
        if rmid == RM_XLOG && info & 0xF0 == XLOG_SWITCH {
            return true;
        }
        let Some(main) = main_data(record, self.major_version) else {
            return false;
        };
        let time = || {
            main.get(..8)
                .and_then(|b| pg_time(i64::from_le_bytes(b.try_into().unwrap())))
        };
        if rmid == RM_XLOG && info & 0xF0 == XLOG_RESTORE_POINT {
            if let (Some(time), Some(name)) = (time(), main.get(8..)) {
                let name = name.split(|b| *b == 0).next().unwrap_or_default();
                let name = String::from_utf8_lossy(name).into_owned();
                self.summary.restore_points.push(NamedPoint {
                    name,
                    lsn: start,
                    time,
                });
            }
        } else if rmid == RM_XACT
            && matches!(
                info & XACT_OPMASK,
                XACT_COMMIT | XACT_ABORT | XACT_COMMIT_PREPARED | XACT_ABORT_PREPARED
            )
        {
            if let Some(time) = time() {
                let s = &mut self.summary;
                s.xact_ends += 1;
                s.first_xact_end = Some(s.first_xact_end.map_or(time, |t| t.min(time)));
                s.last_xact_end = Some(s.last_xact_end.map_or(time, |t| t.max(time)));
                if xid != 0 && s.newest_xid.is_none_or(|n| xid_follows(xid, n)) {
                    s.newest_xid = Some(xid);
                }
            }
        }
        false
    }
}

fn align(offset: usize) -> usize {
    (offset + 7) & !7
}

/// The main data of a record: its last bytes, of the length its block headers announce.
/// The headers before it are walked as PostgreSQL's `DecodeXLogRecord` does.
fn main_data(record: &[u8], major_version: u32) -> Option<&[u8]> {
    let total = record.len();
    let mut pos = RECORD_HEADER;
    let mut data_total = 0usize;
    let u16_at = |o: usize| {
        record
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |o: usize| {
        record
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    let mut main_len = 0usize;
    while total.checked_sub(pos)? > data_total {
        let id = *record.get(pos)?;
        pos += 1;
        match id {
            BLOCK_ID_DATA_SHORT => {
                main_len = *record.get(pos)? as usize;
                pos += 1;
                data_total += main_len;
            }
            BLOCK_ID_DATA_LONG => {
                main_len = u32_at(pos)?;
                pos += 4;
                data_total += main_len;
            }
            BLOCK_ID_ORIGIN => pos += 2,
            BLOCK_ID_TOPLEVEL_XID => pos += 4,
            id if id <= MAX_BLOCK_ID => {
                let fork_flags = *record.get(pos)?;
                data_total += u16_at(pos + 1)?;
                pos += 3;
                if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
                    let image_len = u16_at(pos)?;
                    let bimg_info = *record.get(pos + 4)?;
                    pos += 5;
                    data_total += image_len;
                    // Before PostgreSQL 15 one bit said "compressed"; since then one per method.
                    let compressed = if major_version >= 15 {
                        bimg_info & 0x1C != 0
                    } else {
                        bimg_info & 0x02 != 0
                    };
                    if bimg_info & BKPIMAGE_HAS_HOLE != 0 && compressed {
                        pos += 2;
                    }
                }
                if fork_flags & BKPBLOCK_SAME_REL == 0 {
                    pos += 12;
                }
                pos += 4;
            }
            _ => return None,
        }
    }
    record.get(total.checked_sub(main_len)?..)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 8192;

    /// Builds a segment of `pages` pages holding `records` back to back, with page headers
    /// and continuation flags as PostgreSQL writes them.
    fn segment(pages: usize, records: &[Vec<u8>], start: u64) -> Vec<u8> {
        let mut logical = Vec::new();
        for r in records {
            logical.extend_from_slice(r);
            while logical.len() % 8 != 0 {
                logical.push(0);
            }
        }
        let mut out = Vec::new();
        let mut cursor = 0usize;
        let mut record_ends: Vec<usize> = Vec::new();
        let mut acc = 0;
        for r in records {
            acc += r.len();
            record_ends.push(acc);
            acc = align(acc);
        }
        for page in 0..pages {
            let header = if page == 0 {
                LONG_PAGE_HEADER
            } else {
                SHORT_PAGE_HEADER
            };
            let mut p = vec![0u8; PAGE];
            p[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
            let inside = record_ends.iter().position(|&end| end > cursor);
            let starts_here = record_ends.iter().any(|&end| align(end) == cursor) || cursor == 0;
            let mut info = if page == 0 { 0x0002u16 } else { 0 };
            if let (Some(i), false) = (inside, starts_here) {
                info |= XLP_FIRST_IS_CONTRECORD;
                p[16..20].copy_from_slice(&((record_ends[i] - cursor) as u32).to_le_bytes());
            }
            p[2..4].copy_from_slice(&info.to_le_bytes());
            p[8..16].copy_from_slice(&(start + (page * PAGE) as u64).to_le_bytes());
            let room = PAGE - header;
            let take = room.min(logical.len().saturating_sub(cursor));
            p[header..header + take].copy_from_slice(&logical[cursor..cursor + take]);
            cursor += take;
            out.extend_from_slice(&p);
        }
        out
    }

    fn record(rmid: u8, info: u8, xid: u32, main: &[u8]) -> Vec<u8> {
        let mut r = vec![0u8; RECORD_HEADER];
        r[4..8].copy_from_slice(&xid.to_le_bytes());
        r[16] = info;
        r[17] = rmid;
        if main.len() < 256 {
            r.push(BLOCK_ID_DATA_SHORT);
            r.push(main.len() as u8);
        } else {
            r.push(BLOCK_ID_DATA_LONG);
            r.extend_from_slice(&(main.len() as u32).to_le_bytes());
        }
        r.extend_from_slice(main);
        let total = r.len() as u32;
        r[..4].copy_from_slice(&total.to_le_bytes());
        r
    }

    fn commit(xid: u32, micros: i64) -> Vec<u8> {
        let mut main = micros.to_le_bytes().to_vec();
        main.extend_from_slice(&[0u8; 4]);
        record(RM_XACT, XACT_COMMIT, xid, &main)
    }

    fn filler(len: usize) -> Vec<u8> {
        record(10, 0, 0, &vec![0xAB; len])
    }

    #[test]
    fn finds_transaction_ends_across_page_boundaries() {
        let records = vec![
            commit(700, 1_000_000),
            filler(8100), // pushes the next commit across the first page boundary
            commit(701, 3_000_000),
            filler(20_000), // spans several pages
            commit(699, 2_000_000),
            record(RM_XLOG, XLOG_SWITCH, 0, &[]),
            commit(999, 9_000_000), // after the switch: never read
        ];
        let bytes = segment(6, &records, 0x3000000);
        for chunk in [1, 100, 4096, PAGE, 1 << 20] {
            let mut scanner = Scanner::new(Lsn(0x3000000), PAGE as u32, 15);
            for piece in bytes.chunks(chunk) {
                scanner.feed(piece);
            }
            let s = scanner.finish();
            assert!(s.complete, "chunk {chunk}");
            assert_eq!(s.xact_ends, 3, "chunk {chunk}");
            assert_eq!(s.first_xact_end, pg_time(1_000_000));
            assert_eq!(s.last_xact_end, pg_time(3_000_000));
            assert_eq!(s.newest_xid, Some(701));
        }
    }

    #[test]
    fn restore_points_carry_name_and_position() {
        let mut main = 5_000_000i64.to_le_bytes().to_vec();
        let mut name = b"before-release".to_vec();
        name.resize(64, 0);
        main.extend_from_slice(&name);
        let records = vec![filler(100), record(RM_XLOG, XLOG_RESTORE_POINT, 0, &main)];
        let bytes = segment(2, &records, 0x1000000);
        let mut scanner = Scanner::new(Lsn(0x1000000), PAGE as u32, 15);
        scanner.feed(&bytes);
        let s = scanner.finish();
        assert_eq!(s.restore_points.len(), 1);
        assert_eq!(s.restore_points[0].name, "before-release");
        let first_len = align(filler(100).len()) as u64;
        assert_eq!(
            s.restore_points[0].lsn,
            Lsn(0x1000000 + LONG_PAGE_HEADER as u64 + first_len)
        );
        assert_eq!(s.restore_points[0].time, pg_time(5_000_000).unwrap());
        assert_eq!(s.last_record, Some(s.restore_points[0].lsn));
    }

    #[test]
    fn skips_the_tail_of_a_record_from_the_previous_segment() {
        // The first page continues a 10000-byte record, then a commit follows.
        let mut bytes = segment(3, &[commit(5, 7)], 0x2000000);
        // Rewrite: continuation of 10000 bytes across page 0 and into page 1.
        let tail = 10_000usize;
        let mut page0 = vec![0u8; PAGE];
        page0[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        page0[2..4].copy_from_slice(&(0x0002u16 | XLP_FIRST_IS_CONTRECORD).to_le_bytes());
        page0[8..16].copy_from_slice(&0x2000000u64.to_le_bytes());
        page0[16..20].copy_from_slice(&(tail as u32).to_le_bytes());
        let mut page1 = vec![0u8; PAGE];
        page1[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        page1[2..4].copy_from_slice(&XLP_FIRST_IS_CONTRECORD.to_le_bytes());
        page1[8..16].copy_from_slice(&(0x2000000u64 + PAGE as u64).to_le_bytes());
        let left = tail - (PAGE - LONG_PAGE_HEADER);
        page1[16..20].copy_from_slice(&(left as u32).to_le_bytes());
        let c = commit(42, 123);
        let at = align(SHORT_PAGE_HEADER + left);
        page1[at..at + c.len()].copy_from_slice(&c);
        bytes[..PAGE].copy_from_slice(&page0);
        bytes[PAGE..2 * PAGE].copy_from_slice(&page1);
        bytes[2 * PAGE..].fill(0);
        bytes[2 * PAGE + 8..2 * PAGE + 16]
            .copy_from_slice(&(0x2000000u64 + 2 * PAGE as u64).to_le_bytes());
        let mut scanner = Scanner::new(Lsn(0x2000000), PAGE as u32, 15);
        scanner.feed(&bytes);
        let s = scanner.finish();
        assert_eq!(s.xact_ends, 1);
        assert_eq!(s.newest_xid, Some(42));
        assert_eq!(s.last_record, Some(Lsn(0x2000000 + (PAGE + at) as u64)));
        assert!(s.complete);
    }

    #[test]
    fn a_stale_page_ends_the_scan() {
        let mut bytes = segment(3, &[commit(1, 1)], 0x5000000);
        // Page 1 claims an address from another incarnation of the file.
        bytes[PAGE + 8..PAGE + 16].copy_from_slice(&0x9000000u64.to_le_bytes());
        let mut scanner = Scanner::new(Lsn(0x5000000), PAGE as u32, 15);
        scanner.feed(&bytes);
        let s = scanner.finish();
        assert_eq!(s.xact_ends, 1);
        assert_eq!(
            s.last_record,
            Some(Lsn(0x5000000 + LONG_PAGE_HEADER as u64))
        );
    }

    #[test]
    fn xid_order_wraps_around() {
        assert!(xid_follows(10, 5));
        assert!(xid_follows(3, u32::MAX - 10));
        assert!(!xid_follows(u32::MAX - 10, 3));
    }
}
