//! Archive read-ahead and restore prefetch, against real PostgreSQL 15 WAL.
//!
//! Read-ahead: a server with a backlog drains it and every segment is in the repository
//! byte-identical; a later call for a pushed file returns at once only when the file is
//! provably the one pushed and its object is still there; files not marked `.ready` are
//! never touched; a failed push never fails the call.
//!
//! Prefetch: later calls are served from the spool byte-identical; a damaged spooled file
//! is never delivered; a timeline change, an absent segment and a history probe discard
//! the spool; an absent file is answered quickly without starting a worker; and point-in-
//! time recovery with prefetch in `restore_command` recovers exactly.
//!
//! Segments come from a throw-away cluster with 1 MiB segments that ran on timeline 1 and
//! then, after an archive recovery, on timeline 2 (see [`fixture`]). Every walkeep command
//! runs as the cluster user, as the server would run it.

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File, FileTimes, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    bin, expect_status, fix_ownership, run, run_ok, walkeep_command, Cluster, InitOptions, Scratch,
};
use fs2::FileExt;

/// `walkeep-archive`: every failure.
const ARCHIVE_FAILED: i32 = 1;

/// `walkeep-restore`: the repository holds no such file.
const RESTORE_ABSENT: i32 = 1;

/// Names of temporary files.
const TEMP_PREFIX: &str = ".walkeep-tmp.";

/// WAL segment size of the fixture cluster, in MiB.
const SEGSIZE_MB: u32 = 1;

/// How long the spool may take to fill, a backlog to drain, a recovery to end.
const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Running the binaries
// ---------------------------------------------------------------------------------------

/// A walkeep binary run as the cluster user, with no configuration file.
fn walkeep(name: &str) -> Command {
    walkeep_command(name, Path::new("/dev/null"))
}

/// `walkeep-archive -v --repo <repo> --spool-dir <spool> --readahead <width> <path> <name>`.
fn archive_ahead(repo: &Path, spool: &Path, width: usize, path: &Path, name: &str) -> Output {
    let mut cmd = walkeep("walkeep-archive");
    cmd.arg("-v")
        .arg("--repo")
        .arg(repo)
        .arg("--spool-dir")
        .arg(spool)
        .arg("--readahead")
        .arg(width.to_string())
        .arg(path)
        .arg(name);
    run(&mut cmd)
}

fn archive_plain(repo: &Path, path: &Path, name: &str) -> Output {
    let mut cmd = walkeep("walkeep-archive");
    cmd.arg("--repo").arg(repo).arg(path).arg(name);
    run(&mut cmd)
}

/// `walkeep-restore -v --repo <repo> --spool-dir <spool> --prefetch <width> <name> <dest>`.
fn restore_ahead(repo: &Path, spool: &Path, width: usize, name: &str, dest: &Path) -> Output {
    let mut cmd = walkeep("walkeep-restore");
    cmd.arg("-v")
        .arg("--repo")
        .arg(repo)
        .arg("--spool-dir")
        .arg(spool)
        .arg("--prefetch")
        .arg(width.to_string())
        .arg(name)
        .arg(dest);
    run(&mut cmd)
}

fn restore_plain(repo: &Path, name: &str, dest: &Path) -> Output {
    let mut cmd = walkeep("walkeep-restore");
    cmd.arg("--repo").arg(repo).arg(name).arg(dest);
    run(&mut cmd)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Calls `done` every 20 ms until it returns true; panics after [`WAIT`], naming `what`.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------
// Real segments, taken once
// ---------------------------------------------------------------------------------------

struct Fixture {
    pg_version: Vec<u8>,
    pg_control: Vec<u8>,
    /// Consecutive complete segments of timeline 1 (name, bytes).
    tl1: Vec<(String, Vec<u8>)>,
    /// Consecutive complete segments of timeline 2, which branched off timeline 1 after
    /// its last segment here.
    tl2: Vec<(String, Vec<u8>)>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(make_fixture)
}

/// Ends the current segment `count` times, each after some writes; returns the ended
/// segments' names and bytes.
fn switch_segments(cluster: &Cluster, count: usize) -> Vec<(String, Vec<u8>)> {
    let mut segments = Vec::new();
    for n in 0..count {
        let name = cluster.psql(&format!(
            "INSERT INTO marks SELECT generate_series(1, 2000) + {n};
             SELECT pg_walfile_name(pg_switch_wal());"
        ));
        let bytes = fs::read(cluster.pgdata.join("pg_wal").join(&name)).unwrap();
        assert_eq!(bytes.len(), (SEGSIZE_MB as usize) << 20, "{name}");
        segments.push((name, bytes));
    }
    for pair in segments.windows(2) {
        let next = u64::from_str_radix(&pair[0].0[16..], 16).unwrap() + 1;
        assert_eq!(pair[1].0, format!("{}{next:08X}", &pair[0].0[..16]));
    }
    segments
}

fn make_fixture() -> Fixture {
    let scratch = Scratch::new();
    let options = InitOptions::default()
        .with_wal_segsize_mb(SEGSIZE_MB)
        .with_conf("wal_keep_size = '64MB'");
    let mut cluster = Cluster::init(&scratch, "fixture", options);
    cluster.start();
    cluster.psql("CREATE TABLE marks (n int)");
    let tl1 = switch_segments(&cluster, 8);
    cluster.stop();

    // An archive recovery that finds no archive ends at the end of pg_wal and starts
    // timeline 2.
    cluster.append_conf(&["restore_command = 'false'"]);
    cluster.write_file("recovery.signal", "");
    cluster.start();
    cluster.wait_for("the promotion to timeline 2", WAIT, || {
        cluster.try_psql("SELECT pg_is_in_recovery()").as_deref() == Ok("f")
    });
    let tl2 = switch_segments(&cluster, 4);
    assert!(tl2[0].0.starts_with("00000002"), "{:?}", tl2[0].0);
    cluster.stop();

    Fixture {
        pg_version: fs::read(cluster.pgdata.join("PG_VERSION")).unwrap(),
        pg_control: fs::read(cluster.pgdata.join("global/pg_control")).unwrap(),
        tl1,
        tl2,
    }
}

/// Initialises a repository at `<scratch>/repo` for the fixture cluster.
fn init_repo(scratch: &Scratch) -> PathBuf {
    let fx = fixture();
    let repo = scratch.path().join("repo");
    let pgdata = scratch.path().join("pgdata-standin");
    fs::create_dir_all(pgdata.join("global")).unwrap();
    fs::create_dir_all(pgdata.join("pg_wal")).unwrap();
    fs::write(pgdata.join("PG_VERSION"), &fx.pg_version).unwrap();
    fs::write(pgdata.join("global/pg_control"), &fx.pg_control).unwrap();
    let (name, bytes) = fx.tl1.last().unwrap();
    fs::write(pgdata.join("pg_wal").join(name), bytes).unwrap();
    fs::set_permissions(&pgdata, fs::Permissions::from_mode(0o700)).unwrap();
    fix_ownership(&pgdata);
    let mut init = walkeep("walkeep");
    init.args(["init", "--repo"])
        .arg(&repo)
        .arg("--pgdata")
        .arg(&pgdata);
    run_ok(&mut init);
    repo
}

/// A repository holding every fixture segment, archived without read-ahead.
fn full_repo(scratch: &Scratch) -> PathBuf {
    let fx = fixture();
    let repo = init_repo(scratch);
    for (name, bytes) in fx.tl1.iter().chain(&fx.tl2) {
        let path = offer(scratch, "source-pg_wal", name, bytes, false);
        expect_status(&archive_plain(&repo, &path, name), 0, "archive");
    }
    repo
}

/// Writes `bytes` to `<scratch>/<dir>/<file_name>` for the cluster user, with
/// `archive_status/<file_name>.ready` beside it if `ready`; returns the file's path.
fn offer(scratch: &Scratch, dir: &str, file_name: &str, bytes: &[u8], ready: bool) -> PathBuf {
    let path = scratch.dir(dir).join(file_name);
    fs::write(&path, bytes).unwrap();
    fix_ownership(&path);
    if ready {
        let status = scratch.dir(&format!("{dir}/archive_status"));
        let mark = status.join(format!("{file_name}.ready"));
        fs::write(&mark, "").unwrap();
        fix_ownership(&mark);
    }
    path
}

/// What PostgreSQL does once a file is archived: `.ready` becomes `.done`.
fn mark_done(wal_dir: &Path, name: &str) {
    let status = wal_dir.join("archive_status");
    fs::rename(
        status.join(format!("{name}.ready")),
        status.join(format!("{name}.done")),
    )
    .unwrap();
}

fn object_path(repo: &Path, name: &str) -> PathBuf {
    repo.join("wal")
        .join(&name[..16])
        .join(format!("{name}.zst"))
}

/// Restores `name` without prefetch and returns its bytes.
fn restored_bytes(scratch: &Scratch, repo: &Path, name: &str) -> Vec<u8> {
    let dest = scratch.dir("check").join(name);
    expect_status(
        &restore_plain(repo, name, &dest),
        0,
        &format!("restore {name}"),
    );
    let bytes = fs::read(&dest).unwrap();
    fs::remove_file(&dest).unwrap();
    bytes
}

/// Every regular file below `dir`, relative to it.
fn files_below(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The one spool area below `spool` (`<system identifier>-<hash>`).
fn spool_area(spool: &Path) -> PathBuf {
    let areas: Vec<PathBuf> = fs::read_dir(spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(areas.len(), 1, "expected one spool area: {areas:?}");
    areas.into_iter().next().unwrap()
}

/// Names of the read-ahead markers in the spool.
fn markers(spool: &Path) -> Vec<String> {
    let dir = spool_area(spool).join("archived");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The segments in the prefetch spool (the part of each file name before the checksum).
fn spooled(spool: &Path) -> BTreeSet<String> {
    let dir = spool_area(spool).join("restore");
    fs::read_dir(&dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.len() == 24 + 1 + 64)
                .map(|n| n[..24].to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn spooled_path(spool: &Path, name: &str) -> PathBuf {
    let dir = spool_area(spool).join("restore");
    fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let file = p.file_name().unwrap().to_str().unwrap();
            file.starts_with(name) && file.len() == 24 + 1 + 64
        })
        .unwrap_or_else(|| panic!("{name} is not in the spool"))
}

/// True if and only if a prefetch worker holds the spool's worker lock.
fn worker_running(spool: &Path) -> bool {
    let Ok(file) = File::open(spool_area(spool).join("restore/worker.lock")) else {
        return false;
    };
    match FileExt::try_lock_exclusive(&file) {
        Ok(()) => {
            FileExt::unlock(&file).unwrap();
            false
        }
        Err(_) => true,
    }
}

// ---------------------------------------------------------------------------------------
// Read-ahead with a real server
// ---------------------------------------------------------------------------------------

#[test]
fn backlog_drains_with_readahead_and_every_segment_restores_byte_identical() {
    let scratch = Scratch::new();
    let repo = scratch.path().join("repo");
    let spool = scratch.dir("spool");
    let options = InitOptions::default()
        .with_wal_segsize_mb(SEGSIZE_MB)
        .with_conf("wal_level = replica")
        .with_conf("archive_mode = on")
        // Nothing is archived until walkeep takes over: a backlog builds up.
        .with_conf("archive_command = 'false'")
        .with_conf("wal_keep_size = '1GB'");
    let mut cluster = Cluster::init(&scratch, "primary", options);
    let mut init = walkeep("walkeep");
    init.args(["init", "--repo"])
        .arg(&repo)
        .arg("--pgdata")
        .arg(&cluster.pgdata);
    run_ok(&mut init);
    cluster.start();

    cluster.psql("CREATE TABLE marks (n int)");
    let mut last = String::new();
    for n in 0..20 {
        last = cluster.psql(&format!(
            "INSERT INTO marks SELECT generate_series(1, 1000) + {n};
             SELECT pg_walfile_name(pg_switch_wal());"
        ));
    }
    let status = cluster.pgdata.join("pg_wal/archive_status");
    let ready: BTreeSet<String> = fs::read_dir(&status)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".ready").map(str::to_string)
        })
        .collect();
    assert!(
        ready.len() >= 20,
        "expected a backlog of 20 or more, found {ready:?}"
    );
    // initdb's own WAL was never marked ready: the archive starts at the first ready file.
    let first = ready.first().unwrap().clone();

    cluster.append_conf(&[format!(
        "archive_command = '\"{}\" --repo \"{}\" --spool-dir \"{}\" --readahead 4 %p %f'",
        bin("walkeep-archive").display(),
        repo.display(),
        spool.display()
    )]);
    cluster.reload();
    cluster.wait_for(
        &format!("the archiver to report {last} archived"),
        WAIT,
        || cluster.psql("SELECT last_archived_wal FROM pg_stat_archiver") == last,
    );

    let log = cluster.log();
    assert!(
        !log.contains("failed to archive"),
        "walkeep-archive failed:\n{log}"
    );
    let pushed = log.matches("ahead (").count();
    let skipped = log.matches("pushed ahead at").count();
    assert!(
        pushed > 0 && skipped > 0,
        "read-ahead did not work: {pushed} files pushed ahead, {skipped} calls answered \
         from markers\n{log}"
    );

    // Every segment from the first to the last, byte-identical to the original.
    let hex = |text: &str| u64::from_str_radix(text, 16).unwrap();
    let segno_of = |name: &str| hex(&name[8..16]) * 4096 + hex(&name[16..]);
    for segno in segno_of(&first)..=segno_of(&last) {
        let name = format!("00000001{:08X}{:08X}", segno / 4096, segno % 4096);
        let original = fs::read(cluster.pgdata.join("pg_wal").join(&name))
            .unwrap_or_else(|e| panic!("original {name} is gone from pg_wal: {e}"));
        assert!(
            restored_bytes(&scratch, &repo, &name) == original,
            "restored {name} differs from the original"
        );
    }

    // Each pushed file was asked for later and its marker used.
    assert_eq!(markers(&spool), Vec::<String>::new());
    let temps: Vec<String> = files_below(&repo)
        .into_iter()
        .chain(files_below(&spool))
        .filter(|p| p.contains(TEMP_PREFIX))
        .collect();
    assert_eq!(temps, Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------
// Read-ahead: what a marker proves
// ---------------------------------------------------------------------------------------

#[test]
fn pushed_file_is_trusted_only_while_unchanged_and_files_not_ready_are_untouched() {
    let fx = fixture();
    let scratch = Scratch::new();
    let repo = init_repo(&scratch);
    let spool = scratch.dir("spool");
    let seg = |i: usize| (fx.tl1[i].0.as_str(), fx.tl1[i].1.as_slice());
    let mut paths = Vec::new();
    for i in 0..4 {
        let (name, bytes) = seg(i);
        paths.push(offer(&scratch, "pg_wal", name, bytes, true));
    }
    let (not_ready, not_ready_bytes) = seg(4);
    offer(&scratch, "pg_wal", not_ready, not_ready_bytes, false);
    let wal_dir = scratch.path().join("pg_wal");

    // The call for the first pushes the next three, and nothing else.
    let output = archive_ahead(&repo, &spool, 3, &paths[0], seg(0).0);
    expect_status(&output, 0, "archive with read-ahead");
    mark_done(&wal_dir, seg(0).0);
    for i in 0..4 {
        assert!(
            object_path(&repo, seg(i).0).is_file(),
            "{} not stored",
            seg(i).0
        );
    }
    assert!(
        !object_path(&repo, not_ready).exists(),
        "a file without .ready was archived"
    );
    assert_eq!(markers(&spool), [seg(1).0, seg(2).0, seg(3).0]);

    // Unchanged: answered from the marker, which is then gone.
    let output = archive_ahead(&repo, &spool, 3, &paths[1], seg(1).0);
    expect_status(&output, 0, "archive of an unchanged pushed file");
    assert!(
        stderr(&output).contains("pushed ahead at"),
        "{}",
        stderr(&output)
    );
    mark_done(&wal_dir, seg(1).0);
    assert_eq!(markers(&spool), [seg(2).0, seg(3).0]);

    // Same bytes, another mtime: archived in full (and found identical).
    let file = OpenOptions::new().write(true).open(&paths[2]).unwrap();
    let touched = fs::metadata(&paths[2]).unwrap().modified().unwrap() + Duration::from_secs(7);
    file.set_times(FileTimes::new().set_modified(touched))
        .unwrap();
    let output = archive_ahead(&repo, &spool, 3, &paths[2], seg(2).0);
    expect_status(&output, 0, "archive of a touched pushed file");
    let message = stderr(&output);
    assert!(!message.contains("pushed ahead at"), "{message}");
    assert!(
        message.contains("already archived with identical content"),
        "{message}"
    );
    mark_done(&wal_dir, seg(2).0);

    // Other bytes with the mtime set back: only the ctime tells, and it must.
    let (name, bytes) = seg(3);
    let recorded = fs::metadata(&paths[3]).unwrap().modified().unwrap();
    let mut file = OpenOptions::new().write(true).open(&paths[3]).unwrap();
    file.seek(SeekFrom::Start(bytes.len() as u64 / 2)).unwrap();
    file.write_all(&[bytes[bytes.len() / 2] ^ 0x01]).unwrap();
    file.set_times(FileTimes::new().set_modified(recorded))
        .unwrap();
    drop(file);
    assert_eq!(
        fs::metadata(&paths[3]).unwrap().modified().unwrap(),
        recorded
    );
    let output = archive_ahead(&repo, &spool, 3, &paths[3], name);
    expect_status(
        &output,
        ARCHIVE_FAILED,
        "archive of a rewritten pushed file",
    );
    let message = stderr(&output);
    assert!(!message.contains("pushed ahead at"), "{message}");
    assert!(message.contains("different content"), "{message}");
    assert_eq!(restored_bytes(&scratch, &repo, name), bytes);
}

#[test]
fn marker_whose_object_was_deleted_is_not_trusted() {
    let fx = fixture();
    let scratch = Scratch::new();
    let repo = init_repo(&scratch);
    let spool = scratch.dir("spool");
    let (first, first_bytes) = (&fx.tl1[0].0, &fx.tl1[0].1);
    let (second, second_bytes) = (&fx.tl1[1].0, &fx.tl1[1].1);
    let first_path = offer(&scratch, "pg_wal", first, first_bytes, true);
    let second_path = offer(&scratch, "pg_wal", second, second_bytes, true);

    expect_status(
        &archive_ahead(&repo, &spool, 2, &first_path, first),
        0,
        "archive with read-ahead",
    );
    assert_eq!(markers(&spool), [second.as_str()]);
    fs::remove_file(object_path(&repo, second)).unwrap();

    let output = archive_ahead(&repo, &spool, 2, &second_path, second);
    expect_status(&output, 0, "archive after the object was deleted");
    let message = stderr(&output);
    assert!(!message.contains("pushed ahead at"), "{message}");
    assert!(message.contains("no longer in the repository"), "{message}");
    assert_eq!(restored_bytes(&scratch, &repo, second), *second_bytes);
}

#[test]
fn failed_push_ahead_does_not_fail_the_call_and_leaves_no_marker() {
    let fx = fixture();
    let scratch = Scratch::new();
    let repo = init_repo(&scratch);
    let spool = scratch.dir("spool");
    let (first, first_bytes) = (&fx.tl1[0].0, &fx.tl1[0].1);
    let (second, second_bytes) = (&fx.tl1[1].0, &fx.tl1[1].1);
    let first_path = offer(&scratch, "pg_wal", first, first_bytes, true);
    // Truncated: refused by the checks every archived file goes through.
    offer(&scratch, "pg_wal", second, &second_bytes[..4096], true);

    let output = archive_ahead(&repo, &spool, 2, &first_path, first);
    expect_status(&output, 0, "archive with a broken file waiting");
    let message = stderr(&output);
    assert!(message.contains("WARN"), "{message}");
    assert!(message.contains(second.as_str()), "{message}");
    assert!(object_path(&repo, first).is_file());
    assert!(!object_path(&repo, second).exists());
    assert_eq!(markers(&spool), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------
// Prefetch
// ---------------------------------------------------------------------------------------

#[test]
fn prefetched_segments_are_served_from_the_spool_byte_identical() {
    let fx = fixture();
    let scratch = Scratch::new();
    let repo = full_repo(&scratch);
    let spool = scratch.dir("spool");
    let dest = scratch.dir("standby/pg_wal").join("RECOVERYXLOG");
    let names: Vec<&str> = fx.tl1.iter().map(|(n, _)| n.as_str()).collect();

    let output = restore_ahead(&repo, &spool, 3, names[0], &dest);
    expect_status(&output, 0, "first restore");
    assert!(
        stderr(&output).contains("started prefetch worker"),
        "{}",
        stderr(&output)
    );
    assert!(fs::read(&dest).unwrap() == fx.tl1[0].1);
    wait_until("the spool to hold the next three segments", || {
        spooled(&spool) == names[1..4].iter().map(|n| n.to_string()).collect()
    });

    for (i, (name, bytes)) in fx.tl1.iter().enumerate().skip(1) {
        // Let the worker get ahead, as it does while PostgreSQL replays a segment.
        wait_until(&format!("{name} in the spool"), || {
            spooled(&spool).contains(name)
        });
        let output = restore_ahead(&repo, &spool, 3, name, &dest);
        expect_status(&output, 0, &format!("restore {name}"));
        assert!(
            stderr(&output).contains("from the prefetch spool"),
            "{name}: {}",
            stderr(&output)
        );
        assert!(fs::read(&dest).unwrap() == *bytes, "{name} differs");
        let spooled = spooled(&spool);
        assert!(
            spooled.len() <= 3,
            "the spool outgrew its width: {spooled:?}"
        );
        assert!(
            spooled.iter().all(|s| s.as_str() > name.as_str()),
            "{i}: the spool keeps segments already delivered: {spooled:?}"
        );
    }
    let leftovers: Vec<String> = files_below(dest.parent().unwrap())
        .into_iter()
        .filter(|f| f != "RECOVERYXLOG")
        .collect();
    assert_eq!(leftovers, Vec::<String>::new(), "foreign files in pg_wal");
}

#[test]
fn damaged_spooled_segment_is_fetched_again_never_delivered() {
    let fx = fixture();
    let scratch = Scratch::new();
    let repo = full_repo(&scratch);
    let spool = scratch.dir("spool");
    let dest = scratch.dir("standby/pg_wal").join("RECOVERYXLOG");
    let (first, second) = (&fx.tl1[0].0, &fx.tl1[1]);

    expect_status(&restore_ahead(&repo, &spool, 2, first, &dest), 0, "restore");
    wait_until("the next segment in the spool", || {
        spooled(&spool).contains(&second.0)
    });
    // The worker publishes a file and records its stamp under the state lock: holding it
    // means both are done. The damaged copy replaces the file under a new inode, so the
    // recorded stamp cannot match it even within one tick of the file clock.
    let state = fs::File::open(spool_area(&spool).join("restore/state")).unwrap();
    state.lock_exclusive().unwrap();
    let damaged = spooled_path(&spool, &second.0);
    let mut bytes = fs::read(&damaged).unwrap();
    bytes[100_000] ^= 0x01;
    let sibling = damaged.with_extension("damaged");
    fs::write(&sibling, &bytes).unwrap();
    fix_ownership(&sibling);
    fs::rename(&sibling, &damaged).unwrap();
    FileExt::unlock(&state).unwrap();

    let output = restore_ahead(&repo, &spool, 2, &second.0, &dest);
    expect_status(&output, 0, "restore of a damaged spooled segment");
    let message = stderr(&output);
    assert!(message.contains("damaged"), "{message}");
    assert!(!message.contains("from the prefetch spool"), "{message}");
    assert!(
        fs::read(&dest).unwrap() == second.1,
        "a damaged segment was delivered"
    );
    assert!(!damaged.exists(), "the damaged file stayed in the spool");
}

/// A spool on another filesystem than pg_wal (a tmpfs): segments are copied, not moved,
/// verified on the way, and a damaged one leaves nothing in pg_wal.
#[test]
fn spool_on_another_filesystem_is_copied_and_verified() {
    use std::os::unix::fs::MetadataExt;
    let fx = fixture();
    let scratch = Scratch::new();
    let repo = full_repo(&scratch);
    let dest_dir = scratch.dir("standby/pg_wal");
    let dest = dest_dir.join("RECOVERYXLOG");
    let shm = Path::new("/dev/shm");
    let other_fs =
        fs::metadata(shm).is_ok_and(|m| m.dev() != fs::metadata(&dest_dir).unwrap().dev());
    if !other_fs {
        eprintln!("SKIPPED: no tmpfs at /dev/shm on another filesystem than the scratch directory");
        return;
    }
    let spool_dir = tempfile::Builder::new()
        .prefix("walkeep-test-")
        .tempdir_in(shm)
        .unwrap();
    let spool = spool_dir.path();
    fs::set_permissions(spool, fs::Permissions::from_mode(0o700)).unwrap();
    fix_ownership(spool);

    expect_status(
        &restore_ahead(&repo, spool, 2, &fx.tl1[0].0, &dest),
        0,
        "restore",
    );
    let (name, bytes) = &fx.tl1[1];
    wait_until("the next segment in the spool", || {
        spooled(spool).contains(name)
    });
    let output = restore_ahead(&repo, spool, 2, name, &dest);
    expect_status(&output, 0, "restore from a spool on another filesystem");
    assert!(
        stderr(&output).contains("from the prefetch spool"),
        "{}",
        stderr(&output)
    );
    assert!(fs::read(&dest).unwrap() == *bytes);

    let (name, bytes) = &fx.tl1[2];
    wait_until("the next segment in the spool", || {
        spooled(spool).contains(name)
    });
    let damaged = spooled_path(spool, name);
    let mut content = fs::read(&damaged).unwrap();
    content[4096] ^= 0x01;
    fs::write(&damaged, &content).unwrap();
    let output = restore_ahead(&repo, spool, 2, name, &dest);
    expect_status(
        &output,
        0,
        "restore of a damaged segment on another filesystem",
    );
    assert!(stderr(&output).contains("damaged"), "{}", stderr(&output));
    assert!(
        fs::read(&dest).unwrap() == *bytes,
        "a damaged segment was delivered"
    );
    assert_eq!(
        files_below(&dest_dir),
        ["RECOVERYXLOG"],
        "files left in pg_wal"
    );
    wait_until("the worker to exit", || !worker_running(spool));
}

#[test]
fn timeline_change_end_of_archive_and_history_probe_discard_the_spool() {
    let fx = fixture();
    let scratch = Scratch::new();
    let repo = full_repo(&scratch);
    let spool = scratch.dir("spool");
    let dest = scratch.dir("standby/pg_wal").join("RECOVERYXLOG");

    // Timeline 1 fills the spool; asking for a timeline 2 segment discards it.
    expect_status(
        &restore_ahead(&repo, &spool, 3, &fx.tl1[0].0, &dest),
        0,
        "restore",
    );
    wait_until("timeline 1 segments in the spool", || {
        spooled(&spool).len() == 3
    });
    let (name, bytes) = &fx.tl2[1];
    let output = restore_ahead(&repo, &spool, 3, name, &dest);
    expect_status(&output, 0, "restore on timeline 2");
    assert!(fs::read(&dest).unwrap() == *bytes);
    let left: Vec<String> = spooled(&spool)
        .into_iter()
        .filter(|s| s.starts_with("00000001"))
        .collect();
    assert_eq!(
        left,
        Vec::<String>::new(),
        "timeline 1 segments survived the switch"
    );
    wait_until("timeline 2 segments in the spool", || {
        spooled(&spool).contains(&fx.tl2[2].0)
    });

    // Past the end of the archive: absent, quickly, no worker, and the spool emptied.
    let last = &fx.tl2.last().unwrap().0;
    let next = format!(
        "{}{:08X}",
        &last[..16],
        u64::from_str_radix(&last[16..], 16).unwrap() + 1
    );
    let probes = [next.as_str(), "00000003.history"];
    for probe in probes {
        wait_until("the worker to exit", || !worker_running(&spool));
        let started = Instant::now();
        let output = restore_ahead(&repo, &spool, 3, probe, &dest);
        let elapsed = started.elapsed();
        expect_status(
            &output,
            RESTORE_ABSENT,
            &format!("restore of missing {probe}"),
        );
        // Far below the in-flight wait a probe must not fall into; speed is the bench's.
        assert!(
            elapsed < Duration::from_secs(5),
            "{probe}: absent took {elapsed:?}"
        );
        let message = stderr(&output);
        assert!(!message.contains("started prefetch worker"), "{message}");
        assert!(
            !message.contains("ERROR") && !message.contains("WARN"),
            "{message}"
        );
        assert!(!worker_running(&spool), "{probe}: a worker runs");
        assert_eq!(
            spooled(&spool),
            BTreeSet::new(),
            "{probe}: the spool was kept"
        );
    }

    // A history probe while the spool is full empties it too.
    expect_status(
        &restore_ahead(&repo, &spool, 3, &fx.tl1[0].0, &dest),
        0,
        "restore",
    );
    wait_until("the spool to fill again", || spooled(&spool).len() == 3);
    let output = restore_ahead(&repo, &spool, 3, "00000002.history", &dest);
    expect_status(&output, RESTORE_ABSENT, "history probe");
    assert_eq!(spooled(&spool), BTreeSet::new());
}

// ---------------------------------------------------------------------------------------
// Point-in-time recovery with prefetch
// ---------------------------------------------------------------------------------------

const ITEMS_STATE_SQL: &str = "SELECT count(*) || ' rows, md5 ' \
     || coalesce(md5(string_agg(id || ':' || payload, ',' ORDER BY id)), '-') FROM items";

#[test]
fn point_in_time_recovery_with_prefetch_and_readahead_recovers_exactly() {
    let scratch = Scratch::new();
    let repo = scratch.path().join("repo");
    let archive_spool = scratch.dir("archive-spool");
    let restore_spool = scratch.dir("restore-spool");
    let archive_command = format!(
        "archive_command = '{} --repo {} --spool-dir {} --readahead 2 %p %f'",
        bin("walkeep-archive").display(),
        repo.display(),
        archive_spool.display()
    );
    let options = InitOptions::default()
        .with_wal_segsize_mb(SEGSIZE_MB)
        .with_conf("wal_level = replica")
        .with_conf("archive_mode = on")
        .with_conf(archive_command);
    let mut source = Cluster::init(&scratch, "source", options);
    let mut init = walkeep("walkeep");
    init.args(["init", "--repo"])
        .arg(&repo)
        .arg("--pgdata")
        .arg(&source.pgdata);
    run_ok(&mut init);
    source.start();
    source.psql("CREATE TABLE items (id int PRIMARY KEY, payload text NOT NULL)");
    let insert = |phase: u32| {
        source.psql(&format!(
            "INSERT INTO items SELECT g, md5(g::text) FROM generate_series({}, {}) g;
             SELECT pg_switch_wal();",
            phase * 1000 + 1,
            phase * 1000 + 500
        ));
    };
    insert(0);
    let mut backup = walkeep("walkeep");
    backup
        .args(["backup", "--repo"])
        .arg(&repo)
        .arg("--pgdata")
        .arg(&source.pgdata)
        .args(["-d", &source.conninfo()]);
    run_ok(&mut backup);

    // Many segments before the target, for prefetch to work on, and some after it.
    for phase in 1..=12 {
        insert(phase);
    }
    let expected = source.psql(ITEMS_STATE_SQL);
    thread::sleep(Duration::from_millis(20));
    let target = source.psql(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US+00')",
    );
    thread::sleep(Duration::from_millis(20));
    for phase in 13..=15 {
        insert(phase);
    }
    let last = source.psql("SELECT pg_walfile_name(pg_switch_wal())");
    source.wait_archived(&last, WAIT);

    let to = scratch.path().join("restored");
    let mut restore = walkeep("walkeep");
    restore
        .args(["restore", "--repo"])
        .arg(&repo)
        .arg("--to")
        .arg(&to)
        .args(["--target-time", &target, "--target-action", "promote"]);
    run_ok(&mut restore);
    let mut restored = Cluster::from_existing(&scratch, &to);
    restored.append_conf(&["archive_mode = off"]);
    // postgresql.auto.conf is read last: this restore_command wins over walkeep's own.
    let auto_conf = to.join("postgresql.auto.conf");
    let mut conf = fs::read_to_string(&auto_conf).unwrap();
    conf.push_str(&format!(
        "restore_command = '{} --repo {} --spool-dir {} --prefetch 3 %f %p'\n",
        bin("walkeep-restore").display(),
        repo.display(),
        restore_spool.display()
    ));
    fs::write(&auto_conf, conf).unwrap();
    fix_ownership(&auto_conf);
    restored.start();
    restored.wait_for_promotion(WAIT);

    assert_eq!(restored.psql(ITEMS_STATE_SQL), expected);
    let log = restored.log();
    assert!(
        log.contains("from the prefetch spool"),
        "no segment came from the spool\n{log}"
    );
    // Recovery ended, so the spool is discarded once the worker is done.
    wait_until("the prefetch worker to exit", || {
        !worker_running(&restore_spool)
    });
    assert_eq!(spooled(&restore_spool), BTreeSet::new());
    let pg_wal_foreign: Vec<String> = fs::read_dir(to.join("pg_wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(TEMP_PREFIX))
        .collect();
    assert_eq!(pg_wal_foreign, Vec::<String>::new());
}
