//! Proves the contract of `walkeep-archive` and `walkeep-restore` as PostgreSQL sees it.
//!
//! Archive exits 0 only once the file is durable and byte-identical in the repository, and
//! 1 on every failure; it never replaces a stored object with different bytes and never
//! leaves part of an object under a final name. Restore exits 0 with the complete file at
//! `%p`, 1 only when the repository truly lacks the file, and 200 for anything else.
//!
//! One test drives a real cluster whose `archive_command` is `walkeep-archive`. The others
//! call the binaries directly with real segments, taken once from a throw-away cluster
//! with 1 MiB segments (see [`fixture`]), against repositories made by `walkeep init`.
//! Every command that touches a repository runs as the cluster user, as the server would.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    as_cluster_user, bin, cluster_user, expect_status, fix_ownership, pg_command, run, run_ok,
    stderr_text, walkeep_command, Cluster, InitOptions, Scratch,
};
use sha2::{Digest, Sha256};

/// `walkeep-archive`: every failure.
const ARCHIVE_FAILED: i32 = 1;

/// `walkeep-restore`: the repository holds no such file.
const RESTORE_ABSENT: i32 = 1;

/// `walkeep-restore`: the file could not be delivered intact; PostgreSQL stops recovery.
const RESTORE_FATAL: i32 = 200;

/// Names of temporary files in the repository and beside restored files.
const TEMP_PREFIX: &str = ".walkeep-tmp.";

/// WAL segment size of the fixture cluster, in MiB: small, so tests copy little.
const FIXTURE_SEGSIZE_MB: u32 = 1;

/// A timeline history file as PostgreSQL writes it when timeline 2 begins.
const HISTORY_TEXT: &str = "1\t0/3000158\tno recovery target specified\n";

// ---------------------------------------------------------------------------------------
// Running the binaries
// ---------------------------------------------------------------------------------------

/// A walkeep binary run as the cluster user, with no configuration file.
fn walkeep(name: &str) -> Command {
    walkeep_command(name, Path::new("/dev/null"))
}

fn archive_cmd(repo: &Path, path: &Path, name: &str) -> Command {
    let mut cmd = walkeep("walkeep-archive");
    cmd.arg("--repo").arg(repo).arg(path).arg(name);
    cmd
}

fn restore_cmd(repo: &Path, name: &str, dest: &Path) -> Command {
    let mut cmd = walkeep("walkeep-restore");
    cmd.arg("--repo").arg(repo).arg(name).arg(dest);
    cmd
}

fn archive(repo: &Path, path: &Path, name: &str) -> Output {
    run(&mut archive_cmd(repo, path, name))
}

fn restore(repo: &Path, name: &str, dest: &Path) -> Output {
    run(&mut restore_cmd(repo, name, dest))
}

fn stderr(output: &Output) -> String {
    stderr_text(output)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

// ---------------------------------------------------------------------------------------
// Real segments, taken once
// ---------------------------------------------------------------------------------------

/// Real WAL, read once from throw-away clusters and shared by the tests.
struct Fixture {
    /// `PG_VERSION` of the fixture cluster.
    pg_version: Vec<u8>,
    /// Its `global/pg_control`.
    pg_control: Vec<u8>,
    /// Its system identifier, as pg_controldata reports it.
    system_identifier: u64,
    /// Consecutive complete segments of timeline 1 (name, bytes), each ended by
    /// `pg_switch_wal()`.
    segments: Vec<(String, Vec<u8>)>,
    /// A segment (name, bytes) from another initdb with the same segment size.
    foreign_segment: (String, Vec<u8>),
    /// The system identifier of that other cluster.
    foreign_system_identifier: u64,
}

impl Fixture {
    fn segment(&self, i: usize) -> (&str, &[u8]) {
        let (name, bytes) = &self.segments[i];
        (name, bytes)
    }
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(make_fixture)
}

fn make_fixture() -> Fixture {
    let scratch = Scratch::new();
    let options = InitOptions::default()
        .with_wal_segsize_mb(FIXTURE_SEGSIZE_MB)
        .with_conf("wal_keep_size = '64MB'");
    let mut cluster = Cluster::init(&scratch, "fixture", options);
    cluster.start();

    // Each switch ends the segment that holds the switch record; that segment is complete
    // and, with wal_keep_size, stays in pg_wal under its name while it is read.
    cluster.psql("CREATE TABLE marks (n int)");
    let mut segments = Vec::new();
    for n in 0..4 {
        let name = cluster.psql(&format!(
            "INSERT INTO marks SELECT generate_series(1, 2000) + {n};
             SELECT pg_walfile_name(pg_switch_wal());"
        ));
        let bytes = fs::read(cluster.pgdata.join("pg_wal").join(&name)).unwrap();
        assert_eq!(bytes.len(), (FIXTURE_SEGSIZE_MB as usize) << 20, "{name}");
        segments.push((name, bytes));
    }
    for pair in segments.windows(2) {
        let next = u64::from_str_radix(&pair[0].0[16..], 16).unwrap() + 1;
        assert_eq!(
            pair[1].0,
            format!("{}{next:08X}", &pair[0].0[..16]),
            "switches must give consecutive segments"
        );
    }
    cluster.stop();

    // initdb alone leaves WAL in pg_wal; a server is not needed for a foreign segment.
    let other = Cluster::init(
        &scratch,
        "other",
        InitOptions::default().with_wal_segsize_mb(FIXTURE_SEGSIZE_MB),
    );
    let foreign_name = newest_segment(&other.pgdata.join("pg_wal"));
    let foreign_bytes = fs::read(other.pgdata.join("pg_wal").join(&foreign_name)).unwrap();

    let fixture = Fixture {
        pg_version: fs::read(cluster.pgdata.join("PG_VERSION")).unwrap(),
        pg_control: fs::read(cluster.pgdata.join("global/pg_control")).unwrap(),
        system_identifier: system_identifier(&cluster.pgdata),
        segments,
        foreign_segment: (foreign_name, foreign_bytes),
        foreign_system_identifier: system_identifier(&other.pgdata),
    };
    assert_ne!(
        fixture.system_identifier, fixture.foreign_system_identifier,
        "two initdb runs gave one system identifier"
    );
    fixture
}

fn newest_segment(pg_wal: &Path) -> String {
    let mut names: Vec<String> = fs::read_dir(pg_wal)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    names.sort();
    names
        .pop()
        .unwrap_or_else(|| panic!("no segment in {}", pg_wal.display()))
}

/// The system identifier of the cluster in `pgdata`, from pg_controldata.
fn system_identifier(pgdata: &Path) -> u64 {
    controldata(pgdata, "Database system identifier")
}

/// The value `pg_controldata` prints for `label` on the data directory `pgdata`.
fn controldata(pgdata: &Path, label: &str) -> u64 {
    let mut cmd = pg_command("pg_controldata");
    cmd.arg("-D").arg(pgdata);
    let output = run_ok(as_cluster_user(&mut cmd));
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{label}:")))
        .unwrap_or_else(|| panic!("pg_controldata printed no {label}:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Initialises a repository at `<scratch>/repo` for the fixture cluster and returns it.
///
/// `walkeep init` reads the identity from PG_VERSION, global/pg_control and the newest
/// segment in pg_wal, so a stand-in data directory holding only those serves.
fn init_repo(scratch: &Scratch) -> PathBuf {
    init_repo_at(scratch, &scratch.path().join("repo"))
}

fn init_repo_at(scratch: &Scratch, repo: &Path) -> PathBuf {
    let fx = fixture();
    let pgdata = scratch.path().join("pgdata-standin");
    if !pgdata.exists() {
        fs::create_dir_all(pgdata.join("global")).unwrap();
        fs::create_dir_all(pgdata.join("pg_wal")).unwrap();
        fs::write(pgdata.join("PG_VERSION"), &fx.pg_version).unwrap();
        fs::write(pgdata.join("global/pg_control"), &fx.pg_control).unwrap();
        let (name, bytes) = fx.segments.last().unwrap();
        fs::write(pgdata.join("pg_wal").join(name), bytes).unwrap();
        fs::set_permissions(&pgdata, fs::Permissions::from_mode(0o700)).unwrap();
        fix_ownership(&pgdata);
    }
    let mut init = walkeep("walkeep");
    init.args(["init", "--repo"])
        .arg(repo)
        .arg("--pgdata")
        .arg(&pgdata);
    run_ok(&mut init);
    assert!(repo.join("repository.json").is_file());
    repo.to_path_buf()
}

/// Writes `bytes` to `<scratch>/<dir>/<file_name>`, readable by the cluster user, and
/// returns the path: a file as PostgreSQL would offer it to `archive_command`.
fn offer(scratch: &Scratch, dir: &str, file_name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch.dir(dir).join(file_name);
    fs::write(&path, bytes).unwrap();
    fix_ownership(&path);
    path
}

/// A new repository in a scratch directory, holding segment 0 of the fixture: the
/// repository, the segment's name and bytes, and where it was offered from.
fn archived_first_segment(scratch: &Scratch) -> (PathBuf, &'static str, &'static [u8], PathBuf) {
    let repo = init_repo(scratch);
    let (name, bytes) = fixture().segment(0);
    let path = offer(scratch, "pg_wal", name, bytes);
    expect_status(&archive(&repo, &path, name), 0, "first archive");
    (repo, name, bytes, path)
}

// ---------------------------------------------------------------------------------------
// Looking at a repository
// ---------------------------------------------------------------------------------------

/// Where the repository layout keeps WAL file `name`.
fn object_path(repo: &Path, name: &str) -> PathBuf {
    if name.ends_with(".history") {
        repo.join("wal/history").join(format!("{name}.zst"))
    } else {
        repo.join("wal")
            .join(&name[..16])
            .join(format!("{name}.zst"))
    }
}

/// What a "nothing changed" comparison looks at for one directory entry.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Dir {
        mode: u32,
    },
    File {
        sha256: String,
        ino: u64,
        mtime_ns: i128,
    },
}

/// Every entry below `root` (temporary files included) with content, inode and mtime, so
/// that a rewritten or added file shows.
fn tree(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return,
        Err(e) => panic!("failed to list {}: {e}", dir.display()),
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let meta = fs::symlink_metadata(&path).unwrap();
        let relative = path.strip_prefix(root).unwrap().to_path_buf();
        if meta.is_dir() {
            out.insert(
                relative,
                Entry::Dir {
                    mode: meta.mode() & 0o7777,
                },
            );
            walk(root, &path, out);
        } else {
            let entry = Entry::File {
                sha256: sha256_hex(&fs::read(&path).unwrap()),
                ino: meta.ino(),
                mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            };
            out.insert(relative, entry);
        }
    }
}

/// The files (not directories) of a [`tree`].
fn files(tree: &BTreeMap<PathBuf, Entry>) -> Vec<&PathBuf> {
    tree.iter()
        .filter(|(_, e)| matches!(e, Entry::File { .. }))
        .map(|(p, _)| p)
        .collect()
}

/// Temporary files anywhere below `root`.
fn temp_files(root: &Path) -> Vec<PathBuf> {
    tree(root)
        .into_keys()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(TEMP_PREFIX))
        })
        .collect()
}

/// Stored objects below `<repo>/wal`, temporary files left out.
fn stored_objects(repo: &Path) -> Vec<PathBuf> {
    let wal = repo.join("wal");
    files(&tree(&wal))
        .into_iter()
        .filter(|p| !p.file_name().unwrap().to_str().unwrap().starts_with('.'))
        .cloned()
        .collect()
}

/// The (name, sha256) pairs in catalog/wal.jsonl.
fn catalog_entries(repo: &Path) -> BTreeSet<(String, String)> {
    let text = fs::read_to_string(repo.join("catalog/wal.jsonl")).unwrap();
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let record: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("catalog line {line:?} is not JSON: {e}"));
            let field = |key: &str| {
                record[key]
                    .as_str()
                    .unwrap_or_else(|| panic!("catalog line {line:?} has no {key}"))
                    .to_string()
            };
            (field("name"), field("sha256"))
        })
        .collect()
}

/// Restores `name` into `<scratch>/restored` and returns the bytes, panicking unless
/// restore exits 0 and leaves no temporary file.
fn restored_bytes(scratch: &Scratch, repo: &Path, name: &str) -> Vec<u8> {
    let dir = scratch.dir("restored");
    let dest = dir.join(name);
    expect_status(&restore(repo, name, &dest), 0, &format!("restore {name}"));
    let bytes = fs::read(&dest).unwrap();
    fs::remove_file(&dest).unwrap();
    assert_eq!(temp_files(&dir), Vec::<PathBuf>::new());
    bytes
}

// ---------------------------------------------------------------------------------------
// A real server archiving through walkeep-archive
// ---------------------------------------------------------------------------------------

#[test]
fn every_segment_the_server_reports_archived_restores_byte_identical() {
    let scratch = Scratch::new();
    let repo = scratch.path().join("repo");
    let archive_command = format!(
        "archive_command = '\"{}\" --repo \"{}\" %p %f'",
        bin("walkeep-archive").display(),
        repo.display()
    );
    let options = InitOptions::default()
        .with_conf("wal_level = replica")
        .with_conf("archive_mode = on")
        .with_conf(archive_command)
        // Keeps every original in pg_wal, to compare the restored copies with.
        .with_conf("wal_keep_size = '1GB'");
    let mut cluster = Cluster::init(&scratch, "primary", options);
    let mut init = walkeep("walkeep");
    init.args(["init", "--repo"])
        .arg(&repo)
        .arg("--pgdata")
        .arg(&cluster.pgdata);
    run_ok(&mut init);
    cluster.start();

    cluster.pgbench(&["-i", "-s", "1", "-q"]);
    cluster.pgbench(&["-T", "3", "-c", "2", "-j", "2"]);
    cluster.psql("CREATE TABLE switches (n int)");
    let mut last = String::new();
    for n in 0..3 {
        last = cluster.psql(&format!(
            "INSERT INTO switches VALUES ({n});
             SELECT pg_walfile_name(pg_switch_wal());"
        ));
    }
    cluster.wait_for(
        &format!("the archiver to report {last} archived"),
        Duration::from_secs(120),
        || cluster.psql("SELECT last_archived_wal FROM pg_stat_archiver") == last,
    );

    let stats = cluster.psql("SELECT archived_count, failed_count FROM pg_stat_archiver");
    let (archived_count, failed_count) = stats.split_once('|').unwrap();
    assert_eq!(
        failed_count,
        "0",
        "the archiver saw failures:\n{}",
        cluster.log()
    );

    // Timeline 1 starts at segment 1, and every segment completed while archive_mode was
    // on is archived; so the archive is every segment from the first to the last.
    // 16 MiB segments: 256 to a log.
    assert_eq!(&last[..8], "00000001");
    let hex = |text: &str| u64::from_str_radix(text, 16).unwrap();
    let last_segno = hex(&last[8..16]) * 256 + hex(&last[16..]);
    let expected: Vec<String> = (1..=last_segno)
        .map(|segno| format!("00000001{:08X}{:08X}", segno / 256, segno % 256))
        .collect();
    // Three switches end three different segments, whatever the load wrote before.
    assert!(expected.len() >= 3, "too little WAL: {expected:?}");
    assert_eq!(
        archived_count,
        expected.len().to_string(),
        "pg_stat_archiver counts another number of segments than 1..={last}"
    );
    let expected_objects: Vec<PathBuf> = expected
        .iter()
        .map(|name| {
            object_path(&repo, name)
                .strip_prefix(repo.join("wal"))
                .unwrap()
                .to_path_buf()
        })
        .collect();
    assert_eq!(stored_objects(&repo), expected_objects);
    assert_eq!(temp_files(&repo), Vec::<PathBuf>::new());

    for name in &expected {
        let original = fs::read(cluster.pgdata.join("pg_wal").join(name))
            .unwrap_or_else(|e| panic!("original {name} is gone from pg_wal: {e}"));
        let restored = restored_bytes(&scratch, &repo, name);
        assert!(
            restored == original,
            "restored {name} differs from the original in pg_wal"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Archive: what is stored, and what is refused
// ---------------------------------------------------------------------------------------

#[test]
fn identical_rearchive_succeeds_without_rewriting_and_different_content_is_refused() {
    let scratch = Scratch::new();
    let (repo, name, bytes, path) = archived_first_segment(&scratch);
    let object = object_path(&repo, name);
    let stored = fs::read(&object).unwrap();
    let before = fs::metadata(&object).unwrap();

    // A rewrite would show as a new inode or mtime; give the clock time to move.
    thread::sleep(Duration::from_millis(20));
    expect_status(&archive(&repo, &path, name), 0, "identical re-archive");
    let after = fs::metadata(&object).unwrap();
    assert_eq!(after.ino(), before.ino(), "the object was replaced");
    assert_eq!(after.modified().unwrap(), before.modified().unwrap());
    assert!(fs::read(&object).unwrap() == stored);

    // Same header, one byte of the body flipped.
    let mut changed = bytes.to_vec();
    changed[bytes.len() / 2] ^= 0x01;
    let changed_path = offer(&scratch, "other_pg_wal", name, &changed);
    let snapshot = tree(&repo);
    let output = archive(&repo, &changed_path, name);
    expect_status(&output, ARCHIVE_FAILED, "archive of different content");
    assert_eq!(
        tree(&repo),
        snapshot,
        "a refused archive changed the repository"
    );
    assert!(fs::read(&object).unwrap() == stored);
    let message = stderr(&output);
    for checksum in [sha256_hex(bytes), sha256_hex(&changed)] {
        assert!(
            message.contains(&checksum),
            "stderr does not name checksum {checksum}:\n{message}"
        );
    }
}

/// An archiver killed after publishing an object but before cataloging it leaves the
/// catalog without the record; PostgreSQL's retry finds the object stored and must
/// catalog it then.
#[test]
fn rearchive_catalogs_a_segment_whose_first_archiver_died_before_cataloging() {
    let scratch = Scratch::new();
    let (repo, name, _, path) = archived_first_segment(&scratch);
    let catalog = repo.join("catalog/wal.jsonl");
    assert!(fs::read_to_string(&catalog).unwrap().contains(name));

    // As if the first archiver had been killed before appending its record.
    fs::write(&catalog, "").unwrap();
    expect_status(&archive(&repo, &path, name), 0, "identical re-archive");
    let records = fs::read_to_string(&catalog).unwrap();
    assert!(
        records.contains(&format!("\"name\":\"{name}\"")),
        "the re-archive did not catalog {name}: {records:?}"
    );
}

#[test]
fn segment_from_another_cluster_is_refused_naming_both_system_identifiers() {
    let fx = fixture();
    let scratch = Scratch::new();
    let repo = init_repo(&scratch);
    let (name, bytes) = &fx.foreign_segment;
    let path = offer(&scratch, "pg_wal", name, bytes);

    let snapshot = tree(&repo);
    let output = archive(&repo, &path, name);
    expect_status(&output, ARCHIVE_FAILED, "archive of a foreign segment");
    assert_eq!(
        tree(&repo),
        snapshot,
        "a refused archive changed the repository"
    );

    let message = stderr(&output);
    for (what, id) in [
        ("expected", fx.system_identifier),
        ("found", fx.foreign_system_identifier),
    ] {
        assert!(
            message.contains(&id.to_string()),
            "stderr does not show the {what} system identifier {id}:\n{message}"
        );
    }
}

#[test]
fn misnamed_truncated_and_garbage_files_are_refused_leaving_repository_unchanged() {
    let fx = fixture();
    let scratch = Scratch::new();
    let repo = init_repo(&scratch);
    let (first, first_bytes) = fx.segment(0);
    let (second, _) = fx.segment(1);

    // Each case: (what, directory, file name on disk, %f, content).
    let cases: [(&str, &str, &str, &str, &[u8]); 4] = [
        (
            "a valid segment saved under the next segment's name",
            "renamed",
            second,
            second,
            first_bytes,
        ),
        (
            "a valid segment offered as another segment (%p and %f disagree)",
            "misnamed",
            first,
            second,
            first_bytes,
        ),
        (
            "a segment cut to half its size",
            "truncated",
            first,
            first,
            &first_bytes[..first_bytes.len() / 2],
        ),
        (
            "a file whose name is no WAL name",
            "garbage",
            "foo",
            "foo",
            first_bytes,
        ),
    ];
    for (what, dir, file_name, name, bytes) in cases {
        let path = offer(&scratch, dir, file_name, bytes);
        let snapshot = tree(&repo);
        let output = archive(&repo, &path, name);
        expect_status(&output, ARCHIVE_FAILED, what);
        assert_eq!(tree(&repo), snapshot, "{what}: the repository changed");
    }
    assert_eq!(stored_objects(&repo), Vec::<PathBuf>::new());
}

/// `walkeep init` must record what `pg_controldata` reads from the same data directory, on a
/// cluster whose sizes are not the defaults' everywhere, and must get the same identity from
/// `pg_control` alone when `pg_wal` holds no segment (a restored copy not started yet).
#[test]
fn init_records_the_identity_pg_controldata_reports_with_or_without_wal() {
    let scratch = Scratch::new();
    let cluster = Cluster::init(
        &scratch,
        "identity",
        InitOptions::default().with_wal_segsize_mb(2),
    );
    // `walkeep init` into a new repository `name`; returns the identity it recorded.
    let init = |name: &str| -> serde_json::Value {
        let repo = scratch.path().join(name);
        run_ok(
            walkeep("walkeep")
                .args(["init", "--repo"])
                .arg(&repo)
                .arg("--pgdata")
                .arg(&cluster.pgdata),
        );
        serde_json::from_slice(&fs::read(repo.join("repository.json")).unwrap()).unwrap()
    };
    let identity = init("repo");
    for (field, label) in [
        ("system_identifier", "Database system identifier"),
        ("block_size", "Database block size"),
        ("wal_block_size", "WAL block size"),
        ("wal_segment_size", "Bytes per WAL segment"),
    ] {
        assert_eq!(
            identity[field].as_u64(),
            Some(controldata(&cluster.pgdata, label)),
            "{field} in {identity}"
        );
    }
    assert_eq!(identity["wal_segment_size"].as_u64(), Some(2 << 20));

    let pg_wal = cluster.pgdata.join("pg_wal");
    for entry in fs::read_dir(&pg_wal).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            fs::remove_file(path).unwrap();
        }
    }
    let mut again = init("repo-without-wal");
    again["created_at"] = identity["created_at"].clone();
    assert_eq!(again, identity);
}

#[test]
fn archive_refuses_a_directory_that_is_not_an_initialised_repository() {
    let fx = fixture();
    let scratch = Scratch::new();
    let (name, bytes) = fx.segment(0);
    let path = offer(&scratch, "pg_wal", name, bytes);

    let empty = scratch.dir("empty");
    let output = archive(&empty, &path, name);
    expect_status(&output, ARCHIVE_FAILED, "archive into an empty directory");
    assert_eq!(
        tree(&empty),
        BTreeMap::new(),
        "archive wrote into a non-repository"
    );

    let missing = scratch.path().join("not-mounted");
    let output = archive(&missing, &path, name);
    expect_status(&output, ARCHIVE_FAILED, "archive into a missing directory");
    assert!(
        !missing.exists(),
        "archive created the missing repository directory"
    );
}

#[test]
fn history_file_round_trips_and_different_content_is_refused() {
    let scratch = Scratch::new();
    let repo = init_repo(&scratch);
    let name = "00000002.history";
    let path = offer(&scratch, "pg_wal", name, HISTORY_TEXT.as_bytes());

    expect_status(&archive(&repo, &path, name), 0, "archive of a history file");
    let object = object_path(&repo, name);
    assert!(object.is_file(), "{} is missing", object.display());
    assert_eq!(
        restored_bytes(&scratch, &repo, name),
        HISTORY_TEXT.as_bytes()
    );

    let other = "1\t0/4000000\tno recovery target specified\n";
    let other_path = offer(&scratch, "other_pg_wal", name, other.as_bytes());
    let snapshot = tree(&repo);
    let output = archive(&repo, &other_path, name);
    expect_status(
        &output,
        ARCHIVE_FAILED,
        "archive of a different history file",
    );
    assert_eq!(
        tree(&repo),
        snapshot,
        "a refused archive changed the repository"
    );
    assert_eq!(
        restored_bytes(&scratch, &repo, name),
        HISTORY_TEXT.as_bytes()
    );
}

/// Regression: `walkeep-archive` stores any bytes offered as a timeline history file, and
/// `00000001.history` too, though timeline 1 has none. Since a stored object is never
/// replaced by other bytes, a history file that does not parse makes `info`, `status` and
/// `restore` fail for good ("history of timeline 5, line 1: cannot parse \"garbage\"").
#[test]
fn history_file_that_does_not_parse_is_refused_and_nothing_is_stored() {
    let scratch = Scratch::new();
    let repo = init_repo(&scratch);
    let cases = [
        (
            "00000005.history",
            "garbage\n",
            "history of timeline 5, line 1: cannot parse \"garbage\"",
        ),
        ("00000002.history", "", "names no parent timeline"),
        (
            "00000002.history",
            "# only a comment\n\n",
            "names no parent timeline",
        ),
        (
            "00000001.history",
            HISTORY_TEXT,
            "timeline 1 has no history file",
        ),
        (
            "00000003.history",
            "2\t0/3000158\tx\n1\t0/4000000\ty\n",
            "line 2: timeline 1 is out of order",
        ),
        (
            "00000002.history",
            "2\t0/3000158\tx\n",
            "line 1: timeline 2 is out of order",
        ),
    ];
    for (name, text, expected) in cases {
        let what = format!("archive of {name} holding {text:?}");
        let path = offer(&scratch, "pg_wal", name, text.as_bytes());
        let snapshot = tree(&repo);
        let output = archive(&repo, &path, name);
        expect_status(&output, ARCHIVE_FAILED, &what);
        let message = stderr(&output);
        assert!(
            message.contains(&format!("refusing {name}")) && message.contains(expected),
            "{what}: stderr should name {name} and say {expected:?}\n--- stderr\n{message}"
        );
        assert_eq!(tree(&repo), snapshot, "{what}: the repository changed");
    }
    assert_eq!(stored_objects(&repo), Vec::<PathBuf>::new());

    // PostgreSQL 15 wrote this on ending a recovery that followed timeline 2 but stopped on
    // timeline 1, before timeline 2 began: the switch points go back, and it is valid.
    let name = "00000003.history";
    let text = "1\t0/40000D0\tafter LSN 0/4000090\n\n2\t0/4000000\tafter LSN 0/3000090\n";
    let path = offer(&scratch, "pg_wal", name, text.as_bytes());
    expect_status(
        &archive(&repo, &path, name),
        0,
        "archive of a real history file",
    );
    assert_eq!(restored_bytes(&scratch, &repo, name), text.as_bytes());
}

#[test]
fn two_archivers_racing_on_one_segment_both_succeed_and_store_one_object() {
    let fx = fixture();
    let scratch = Scratch::new();
    for round in 0..6 {
        let (name, bytes) = fx.segment(round % fx.segments.len());
        let repo = init_repo_at(&scratch, &scratch.path().join(format!("repo{round}")));
        let path = offer(&scratch, "pg_wal", name, bytes);

        let children: Vec<_> = (0..2)
            .map(|_| {
                archive_cmd(&repo, &path, name)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            let output = child.wait_with_output().unwrap();
            expect_status(&output, 0, &format!("round {round}: racing archiver"));
        }

        let object = object_path(&repo, name);
        let expected = object.strip_prefix(repo.join("wal")).unwrap().to_path_buf();
        assert_eq!(stored_objects(&repo), vec![expected], "round {round}");
        assert_eq!(temp_files(&repo), Vec::<PathBuf>::new(), "round {round}");
        let content = zstd::decode_all(&fs::read(&object).unwrap()[..]).unwrap();
        assert!(content == bytes, "round {round}: stored content differs");
    }
}

#[test]
fn archiver_killed_before_publishing_leaves_nothing_under_the_name_and_retry_succeeds() {
    let fx = fixture();
    let scratch = Scratch::new();
    let repo = init_repo(&scratch);
    let (name, bytes) = fx.segment(1);
    let path = offer(&scratch, "pg_wal", name, bytes);

    let mut stalled = archive_cmd(&repo, &path, name);
    stalled
        .env("WALKEEP_TEST_FAULT", "stall-before-commit")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = stalled.spawn().unwrap();

    // Wait until the whole object, trailer included, is in the temporary file: the
    // process is then between writing and publishing.
    let deadline = Instant::now() + Duration::from_secs(30);
    let temp = loop {
        let written = temp_files(&repo)
            .into_iter()
            .find(|p| fs::read(repo.join(p)).is_ok_and(|content| content.ends_with(b"WALKEEP1")));
        if let Some(temp) = written {
            break repo.join(temp);
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the stalled archiver exited on its own with {status}");
        }
        assert!(
            Instant::now() < deadline,
            "no complete temporary object appeared"
        );
        thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "archiver ended with {status}");

    assert!(
        temp.exists(),
        "the killed archiver's temporary file vanished"
    );
    let object = object_path(&repo, name);
    assert!(!object.exists(), "a killed archiver published {name}");
    let dest = scratch.dir("restored").join(name);
    expect_status(
        &restore(&repo, name, &dest),
        RESTORE_ABSENT,
        "restore after the kill",
    );
    assert!(!dest.exists());

    expect_status(&archive(&repo, &path, name), 0, "retry after the kill");
    assert_eq!(restored_bytes(&scratch, &repo, name), bytes);
}

#[test]
fn read_only_repository_fails_the_archive_without_a_partial_object() {
    let fx = fixture();
    let scratch = Scratch::new();
    let repo = init_repo(&scratch);
    let (first, first_bytes) = fx.segment(0);
    let (second, second_bytes) = fx.segment(1);
    let first_path = offer(&scratch, "pg_wal", first, first_bytes);
    let second_path = offer(&scratch, "pg_wal", second, second_bytes);
    expect_status(
        &archive(&repo, &first_path, first),
        0,
        "archive before chmod",
    );

    // Root ignores modes, but the archiver runs as the cluster user.
    let wal_dirs = [
        repo.join("wal"),
        object_path(&repo, second).parent().unwrap().into(),
    ];
    let set_mode = |mode| {
        for dir in &wal_dirs {
            fs::set_permissions(dir, fs::Permissions::from_mode(mode)).unwrap();
        }
    };
    set_mode(0o500);
    let snapshot = tree(&repo);
    let output = archive(&repo, &second_path, second);
    let after = tree(&repo);
    set_mode(0o700);

    expect_status(
        &output,
        ARCHIVE_FAILED,
        "archive into a read-only repository",
    );
    assert_eq!(after, snapshot, "a failed archive changed the repository");
    assert!(!object_path(&repo, second).exists());
}

/// A tmpfs mounted for one test, unmounted on drop.
struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    /// Mounts a tmpfs of `size` at `path`, owned by the cluster user; `Err` says why not.
    fn new(path: &Path, size: &str) -> Result<TmpfsMount, String> {
        let Some(user) = cluster_user() else {
            return Err("the tests do not run as root, so they cannot mount".into());
        };
        let options = format!(
            "size={size},mode=0700,uid={},gid={}",
            user.uid.as_raw(),
            user.gid.as_raw()
        );
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &options, "walkeep-test"])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(TmpfsMount {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.path).status();
        if !unmounted.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Writes to `path` until the filesystem refuses more.
fn fill(path: &Path) {
    let mut file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(path)
        .unwrap();
    let chunk = vec![0x5Au8; 4096];
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::StorageFull => break,
            Err(e) => panic!("failed to fill {}: {e}", path.display()),
        }
    }
}

#[test]
fn full_filesystem_fails_the_archive_without_partial_object_or_temp_file() {
    let fx = fixture();
    let scratch = Scratch::new();
    let mount_point = scratch.dir("mnt");
    let mount = match TmpfsMount::new(&mount_point, "8m") {
        Ok(mount) => mount,
        Err(reason) => {
            eprintln!("SKIPPED full_filesystem test: cannot mount a small tmpfs: {reason}");
            return;
        }
    };
    let repo = init_repo_at(&scratch, &mount.path.join("repo"));
    let (name, bytes) = fx.segment(2);
    let path = offer(&scratch, "pg_wal", name, bytes);

    let filler = mount.path.join("filler");
    fill(&filler);
    let before = tree(&repo);
    let output = archive(&repo, &path, name);
    let after = tree(&repo);
    expect_status(&output, ARCHIVE_FAILED, "archive onto a full filesystem");
    assert_eq!(
        files(&after),
        files(&before),
        "a failed archive left files behind"
    );
    assert_eq!(temp_files(&mount.path), Vec::<PathBuf>::new());
    assert!(!object_path(&repo, name).exists());

    // Once there is room again, the retry PostgreSQL makes succeeds.
    fs::remove_file(&filler).unwrap();
    expect_status(&archive(&repo, &path, name), 0, "retry with free space");
    assert_eq!(restored_bytes(&scratch, &repo, name), bytes);
}

#[test]
fn panic_exits_1_from_archive_and_200_from_restore_never_101() {
    let fx = fixture();
    let scratch = Scratch::new();
    let repo = init_repo(&scratch);
    let (stored, stored_bytes) = fx.segment(0);
    let (other, other_bytes) = fx.segment(1);
    let stored_path = offer(&scratch, "pg_wal", stored, stored_bytes);
    let other_path = offer(&scratch, "pg_wal", other, other_bytes);
    expect_status(&archive(&repo, &stored_path, stored), 0, "archive");

    let mut archive = archive_cmd(&repo, &other_path, other);
    let output = run(archive.env("WALKEEP_TEST_FAULT", "panic"));
    expect_status(&output, ARCHIVE_FAILED, "panicking archive");
    assert!(stderr(&output).contains("panic"), "{}", stderr(&output));
    assert!(!object_path(&repo, other).exists());

    let dest = scratch.dir("restored").join(stored);
    let mut restore = restore_cmd(&repo, stored, &dest);
    let output = run(restore.env("WALKEEP_TEST_FAULT", "panic"));
    expect_status(&output, RESTORE_FATAL, "panicking restore");
    assert!(stderr(&output).contains("panic"), "{}", stderr(&output));
    assert!(!dest.exists());

    // With stderr on a full disk the report of the panic fails too; that must not turn
    // into a second panic and Rust's status 101 ("absent" to PostgreSQL).
    for (mut command, expected, what) in [
        (
            archive_cmd(&repo, &other_path, other),
            ARCHIVE_FAILED,
            "archive",
        ),
        (restore_cmd(&repo, stored, &dest), RESTORE_FATAL, "restore"),
    ] {
        let full = fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let output = run(command.env("WALKEEP_TEST_FAULT", "panic").stderr(full));
        expect_status(&output, expected, &format!("panicking {what}, stderr full"));
    }
    assert!(!object_path(&repo, other).exists());
    assert!(!dest.exists());
}

// ---------------------------------------------------------------------------------------
// Restore: absent versus fatal
// ---------------------------------------------------------------------------------------

/// The offset at which the metadata trailer of a stored object begins, read from its end.
fn trailer_start(object: &[u8]) -> usize {
    assert!(object.ends_with(b"WALKEEP1"), "no trailer magic");
    let len_at = object.len() - 12;
    let json_len = u32::from_le_bytes(object[len_at..len_at + 4].try_into().unwrap()) as usize;
    object.len() - 20 - json_len - 8
}

#[test]
fn corrupt_or_truncated_object_is_fatal_and_leaves_nothing_at_the_destination() {
    let fx = fixture();
    let scratch = Scratch::new();
    let repo = init_repo(&scratch);
    let (flipped, flipped_bytes) = fx.segment(0);
    let (truncated, truncated_bytes) = fx.segment(1);
    for (name, bytes) in [(flipped, flipped_bytes), (truncated, truncated_bytes)] {
        let path = offer(&scratch, "pg_wal", name, bytes);
        expect_status(&archive(&repo, &path, name), 0, "archive");
    }

    // One byte in the middle of the compressed content.
    let object = object_path(&repo, flipped);
    let mut stored = fs::read(&object).unwrap();
    let at = trailer_start(&stored) / 2;
    stored[at] ^= 0x40;
    fs::write(&object, &stored).unwrap();

    // Half the object, trailer gone.
    let object = object_path(&repo, truncated);
    let len = fs::metadata(&object).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&object)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    for (what, name) in [("flipped byte", flipped), ("truncated object", truncated)] {
        let dir = scratch.dir(&format!("dest-{name}"));
        let dest = dir.join("RECOVERYXLOG");
        let output = restore(&repo, name, &dest);
        expect_status(&output, RESTORE_FATAL, what);
        assert!(!dest.exists(), "{what}: restore left {}", dest.display());
        assert_eq!(
            tree(&dir),
            BTreeMap::new(),
            "{what}: restore left files behind"
        );
    }
}

#[test]
fn missing_segment_or_history_file_is_absent_quickly_and_quietly() {
    let fx = fixture();
    let scratch = Scratch::new();
    let repo = init_repo(&scratch);
    let (stored, stored_bytes) = fx.segment(0);
    let (missing, _) = fx.segment(1);
    let path = offer(&scratch, "pg_wal", stored, stored_bytes);
    expect_status(&archive(&repo, &path, stored), 0, "archive");

    for name in [missing, "00000002.history"] {
        let dest = scratch.dir("restored").join("RECOVERYXLOG");
        let started = Instant::now();
        let output = restore(&repo, name, &dest);
        let elapsed = started.elapsed();
        expect_status(
            &output,
            RESTORE_ABSENT,
            &format!("restore of missing {name}"),
        );
        assert!(!dest.exists());
        // Not a speed test (scripts/bench.sh measures that): it catches a wait or a retry
        // on the absent path, with room for a loaded machine.
        assert!(
            elapsed < Duration::from_secs(5),
            "answering that {name} is absent took {elapsed:?}"
        );
        let message = stderr(&output);
        assert!(
            !message.lines().any(|line| line.contains("ERROR")),
            "an absent {name} was reported as an error:\n{message}"
        );
    }
}

#[test]
fn restore_from_missing_or_uninitialised_repository_is_fatal_unless_absent_on_a_standby() {
    let fx = fixture();
    let scratch = Scratch::new();
    let (name, _) = fx.segment(0);
    let dest = scratch.dir("restored").join("RECOVERYXLOG");
    let missing = scratch.path().join("not-mounted");
    let empty = scratch.dir("empty");

    for (what, repo) in [("missing", &missing), ("uninitialised", &empty)] {
        for history in [false, true] {
            let name = if history { "00000002.history" } else { name };
            let output = restore(repo, name, &dest);
            expect_status(
                &output,
                RESTORE_FATAL,
                &format!("{what} repository, {name}"),
            );
            assert!(!dest.exists());

            // `absent` holds for a standby only (restore_command runs in the data
            // directory); in archive recovery, 1 would end recovery early.
            for standby in [false, true] {
                let data_dir = scratch.dir(if standby { "standby" } else { "pitr" });
                if standby {
                    fs::write(data_dir.join("standby.signal"), "").unwrap();
                }
                let mut lenient = restore_cmd(repo, name, &dest);
                let output = run(lenient
                    .args(["--on-error", "absent"])
                    .current_dir(&data_dir));
                let expected = if standby {
                    RESTORE_ABSENT
                } else {
                    RESTORE_FATAL
                };
                expect_status(
                    &output,
                    expected,
                    &format!("{what} repository, {name}, --on-error absent, standby {standby}"),
                );
                assert!(!dest.exists());
            }
        }
    }
    assert!(!missing.exists(), "restore created the missing repository");
    assert_eq!(
        tree(&empty),
        BTreeMap::new(),
        "restore wrote into a non-repository"
    );
}

// ---------------------------------------------------------------------------------------
// Catalog
// ---------------------------------------------------------------------------------------

#[test]
fn catalog_rebuild_lists_the_same_names_and_checksums() {
    let fx = fixture();
    let scratch = Scratch::new();
    let repo = init_repo(&scratch);
    let mut archived = BTreeSet::new();
    for (name, bytes) in &fx.segments[..3] {
        let path = offer(&scratch, "pg_wal", name, bytes);
        expect_status(&archive(&repo, &path, name), 0, "archive");
        archived.insert((name.clone(), sha256_hex(bytes)));
    }
    let history = "00000002.history";
    let path = offer(&scratch, "pg_wal", history, HISTORY_TEXT.as_bytes());
    expect_status(&archive(&repo, &path, history), 0, "archive");
    archived.insert((history.to_string(), sha256_hex(HISTORY_TEXT.as_bytes())));

    let catalog = repo.join("catalog/wal.jsonl");
    let before = catalog_entries(&repo);
    assert_eq!(
        before, archived,
        "the catalog does not list what was archived"
    );

    fs::remove_file(&catalog).unwrap();
    let mut rebuild = walkeep("walkeep");
    rebuild.args(["catalog", "rebuild", "--repo"]).arg(&repo);
    run_ok(&mut rebuild);
    assert_eq!(catalog_entries(&repo), before);
}

#[test]
fn catalog_rebuild_skips_a_damaged_object_and_fails_loudly() {
    let fx = fixture();
    let scratch = Scratch::new();
    let repo = init_repo(&scratch);
    for (name, bytes) in &fx.segments[..3] {
        let path = offer(&scratch, "pg_wal", name, bytes);
        expect_status(&archive(&repo, &path, name), 0, "archive");
    }
    // Damage the metadata trailer of the middle segment.
    let (damaged, _) = fx.segment(1);
    let object = object_path(&repo, damaged);
    let mut stored = fs::read(&object).unwrap();
    let at = stored.len() - 30;
    stored[at] ^= 0x01;
    fs::write(&object, &stored).unwrap();
    fs::remove_file(repo.join("catalog/wal.jsonl")).unwrap();

    let mut rebuild = walkeep("walkeep");
    rebuild.args(["catalog", "rebuild", "--repo"]).arg(&repo);
    let output = run(&mut rebuild);
    expect_status(&output, 1, "rebuild with a damaged object");
    assert!(stderr(&output).contains(damaged), "{}", stderr(&output));
    let names: BTreeSet<String> = catalog_entries(&repo).into_iter().map(|(n, _)| n).collect();
    let expected: BTreeSet<String> = [fx.segment(0).0, fx.segment(2).0]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        names, expected,
        "the intact objects must still be cataloged"
    );
}

#[test]
fn restore_removes_a_temp_file_left_in_pg_wal_by_a_killed_restore() {
    let scratch = Scratch::new();
    let (repo, name, bytes, _) = archived_first_segment(&scratch);

    // What a restore stopped by SIGTERM at shutdown leaves: its temporary file, named with
    // its process id (one above the kernel's limit, so surely not alive).
    let dir = scratch.dir("standby-pg_wal");
    let stale = dir.join(format!("{TEMP_PREFIX}RECOVERYXLOG.99999999.1.0"));
    fs::write(&stale, &bytes[..4096]).unwrap();
    fix_ownership(&stale);

    let dest = dir.join("RECOVERYXLOG");
    expect_status(&restore(&repo, name, &dest), 0, "restore");
    assert_eq!(fs::read(&dest).unwrap(), bytes);
    assert!(
        !stale.exists(),
        "the dead restore's temporary file is still in pg_wal"
    );
    assert_eq!(temp_files(&dir), Vec::<PathBuf>::new());
}

#[test]
fn rearchiving_identical_bytes_repairs_a_corrupt_stored_copy() {
    let scratch = Scratch::new();
    let (repo, name, bytes, path) = archived_first_segment(&scratch);

    let object = object_path(&repo, name);
    let mut stored = fs::read(&object).unwrap();
    let at = trailer_start(&stored) / 2;
    stored[at] ^= 0x40;
    fs::write(&object, &stored).unwrap();
    let dest = scratch.dir("restored").join("RECOVERYXLOG");
    expect_status(
        &restore(&repo, name, &dest),
        RESTORE_FATAL,
        "restore of damaged copy",
    );

    // PostgreSQL offers the segment again (say, after a crash): the trailer proves the
    // offered bytes are the ones the damaged copy was meant to hold.
    let output = archive(&repo, &path, name);
    expect_status(&output, 0, "re-archive over a damaged copy");
    assert!(stderr(&output).contains("corrupt"), "{}", stderr(&output));
    assert_eq!(restored_bytes(&scratch, &repo, name), bytes);

    // Different bytes never replace even a damaged copy.
    let mut other = bytes.to_vec();
    other[bytes.len() - 1] ^= 0x01;
    fs::write(&object, &stored).unwrap();
    let path = offer(&scratch, "pg_wal2", name, &other);
    expect_status(
        &archive(&repo, &path, name),
        ARCHIVE_FAILED,
        "different bytes",
    );
    assert_eq!(
        fs::read(&object).unwrap(),
        stored,
        "the damaged copy was replaced"
    );
}
