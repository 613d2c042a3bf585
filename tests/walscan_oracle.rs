//! The WAL record scanner against PostgreSQL's own reader.
//!
//! `walkeep-archive` summarises each segment's transaction ends and restore points so that
//! `walkeep restore` can refuse a target PostgreSQL would never reach. This test makes real
//! WAL (pgbench traffic, an abort, a prepared transaction, restore points, full-page
//! images) and compares the scanner's summary of every complete segment with what
//! `pg_waldump` reports for the same segment.

mod common;

use std::collections::BTreeMap;
use std::fs;

use chrono::NaiveDateTime;
use common::{pg_command, run_ok, Cluster, InitOptions, Scratch};
use walkeep::lsn::Lsn;
use walkeep::walscan::{xid_follows, Scanner, SegmentSummary};

const SEGMENT: u64 = 1 << 20;
const PAGE: u64 = 8192;

/// What pg_waldump says about one segment, restricted to records that lie wholly inside
/// it (the scanner cannot see a record that crosses a segment boundary).
#[derive(Clone, Debug, Default, PartialEq)]
struct Expected {
    xact_ends: u64,
    first: Option<NaiveDateTime>,
    last: Option<NaiveDateTime>,
    newest_xid: Option<u32>,
    restore_points: Vec<(String, Lsn)>,
}

/// Where a record of `total` bytes starting at `lsn` ends, page headers included.
fn record_end(lsn: u64, total: u64) -> u64 {
    let mut pos = lsn;
    let mut left = total;
    loop {
        let page_end = (pos / PAGE + 1) * PAGE;
        let take = left.min(page_end - pos);
        left -= take;
        pos += take;
        if left == 0 {
            return pos;
        }
        let header = if pos % SEGMENT == 0 { 40 } else { 24 };
        pos += header;
    }
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?} in {line}"))
        + key.len();
    line[start..]
        .split([',', ' '])
        .find(|s| !s.is_empty())
        .unwrap()
}

/// The transaction end time in a description such as "COMMIT 2026-12-03 17:57:07.5895 UTC;
/// inval msgs: ..." or "COMMIT_PREPARED 5: 2026-12-03 17:57:07 UTC".
fn timestamp(desc: &str) -> NaiveDateTime {
    let before_zone = &desc[..desc.find(" UTC").expect("a time in UTC")];
    let mut words = before_zone.rsplit(' ');
    let (time, date) = (words.next().unwrap(), words.next().unwrap());
    NaiveDateTime::parse_from_str(&format!("{date} {time}"), "%Y-%m-%d %H:%M:%S%.f").unwrap()
}

fn expected_by_segment(waldump: &str) -> BTreeMap<u64, Expected> {
    let mut out: BTreeMap<u64, Expected> = BTreeMap::new();
    for line in waldump.lines().filter(|l| l.starts_with("rmgr:")) {
        let rmgr = field(line, "rmgr:");
        let lsn: Lsn = field(line, "lsn:").parse().unwrap();
        let total: u64 = line
            .split("len (rec/tot):")
            .nth(1)
            .unwrap()
            .split('/')
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let end = record_end(lsn.0, total);
        let segment = lsn.0 / SEGMENT;
        if (end - 1) / SEGMENT != segment {
            continue;
        }
        let desc = line.split("desc: ").nth(1).unwrap();
        let e = out.entry(segment).or_default();
        let is_end = ["COMMIT ", "ABORT ", "COMMIT_PREPARED ", "ABORT_PREPARED "]
            .iter()
            .any(|k| desc.starts_with(k));
        if rmgr == "Transaction" && is_end {
            let time = timestamp(desc);
            e.xact_ends += 1;
            e.first = Some(e.first.map_or(time, |f| f.min(time)));
            e.last = Some(e.last.map_or(time, |l| l.max(time)));
            let xid: u32 = field(line, "tx:").parse().unwrap();
            if xid != 0 && e.newest_xid.is_none_or(|n| xid_follows(xid, n)) {
                e.newest_xid = Some(xid);
            }
        } else if rmgr == "XLOG" && desc.starts_with("RESTORE_POINT ") {
            e.restore_points
                .push((desc["RESTORE_POINT ".len()..].trim().to_string(), lsn));
        }
    }
    out
}

fn as_expected(s: &SegmentSummary) -> Expected {
    Expected {
        xact_ends: s.xact_ends,
        first: s.first_xact_end.map(|t| t.naive_utc()),
        last: s.last_xact_end.map(|t| t.naive_utc()),
        newest_xid: s.newest_xid,
        restore_points: s
            .restore_points
            .iter()
            .map(|p| (p.name.clone(), p.lsn))
            .collect(),
    }
}

#[test]
fn scanner_agrees_with_pg_waldump_on_real_wal() {
    let scratch = Scratch::new();
    let options = InitOptions::default()
        .with_wal_segsize_mb(1)
        .with_conf("wal_keep_size = '1GB'")
        .with_conf("max_prepared_transactions = 5")
        .with_conf("full_page_writes = on");
    let mut cluster = Cluster::init(&scratch, "source", options);
    cluster.start();
    cluster.pgbench(&["-i", "-s", "1", "-q"]);
    cluster.psql("SELECT pg_create_restore_point('after-init')");
    cluster.pgbench(&["-t", "300", "-c", "2"]);
    cluster.psql("CREATE TABLE t (n int); BEGIN; INSERT INTO t VALUES (1); ROLLBACK;");
    cluster.psql("BEGIN; INSERT INTO t VALUES (2); PREPARE TRANSACTION 'p1';");
    cluster.psql("COMMIT PREPARED 'p1'");
    cluster.psql("BEGIN; INSERT INTO t VALUES (3); PREPARE TRANSACTION 'p2';");
    cluster.psql("ROLLBACK PREPARED 'p2'");
    cluster.psql("CHECKPOINT");
    cluster.pgbench(&["-t", "200", "-c", "2"]);
    cluster.psql("SELECT pg_create_restore_point('the-end')");
    let last = cluster.psql("SELECT pg_walfile_name(pg_switch_wal())");
    cluster.stop();

    let pg_wal = cluster.pgdata.join("pg_wal");
    let mut names: Vec<String> = fs::read_dir(&pg_wal)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.len() == 24 && n.as_str() <= last.as_str())
        .collect();
    names.sort();
    let first = names[0].clone();
    let mut waldump = pg_command("pg_waldump");
    waldump.arg("-p").arg(&pg_wal).arg(&first).arg(&last);
    let dump = String::from_utf8(run_ok(&mut waldump).stdout).unwrap();
    let expected = expected_by_segment(&dump);

    let mut compared = 0;
    let mut ends = 0;
    let mut points = 0;
    for name in &names {
        let segno = u64::from_str_radix(&name[16..], 16).unwrap();
        let bytes = fs::read(pg_wal.join(name)).unwrap();
        let mut scanner = Scanner::new(Lsn(segno * SEGMENT), 8192, 15);
        for piece in bytes.chunks(100_000) {
            scanner.feed(piece);
        }
        let summary = scanner.finish();
        let want = expected.get(&segno).cloned().unwrap_or_default();
        assert_eq!(as_expected(&summary), want, "segment {name}");
        assert!(
            summary.complete,
            "segment {name}: scan did not reach the end"
        );
        compared += 1;
        ends += summary.xact_ends;
        points += summary.restore_points.len();
    }
    assert!(
        compared >= 3,
        "too little WAL to compare: {compared} segments"
    );
    assert!(ends > 500, "expected the pgbench commits, saw {ends}");
    assert_eq!(points, 2, "both restore points must be found");
}
