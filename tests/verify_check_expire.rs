//! Proves what `walkeep verify`, `check`, `status` and `expire` find and do, against
//! repositories filled by real PostgreSQL 15 clusters through `walkeep-archive`.
//!
//! `verify` must exit 0 only for a whole repository and name exactly what is wrong
//! otherwise: the damaged object, the missing segment and its neighbours, the missing
//! backup file, the foreign key. It must follow timeline history (a switch inside a
//! segment is no gap) and WAL names across the end of a log (`...FF` to the next log at
//! 16 MiB, `...FFF` at 1 MiB, `...3F` at 64 MiB). `check` must fail naming the setting that
//! is wrong; `status` must see archiving blocked; `expire` must delete exactly what its
//! policy and its own dry run say, and leave the retained window restorable.
//!
//! The damage tests share intact repositories made once and held in memory (one timeline,
//! [`image`]; two, [`timelines`]); each test writes its own copy and breaks it. Every
//! command that touches a repository runs as the cluster user, who owns it.
//!
//! A test whose doc comment starts with "Regression:" pins a bug walkeep once had, told as
//! it was then.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

use common::{
    as_cluster_user, bin, fix_ownership, pg_command, run, run_ok, walkeep_command, Cluster,
    InitOptions, Scratch,
};

/// How long a WAL segment may take to reach the repository after a switch.
const ARCHIVE_WAIT: Duration = Duration::from_secs(60);

/// How long a restored cluster may take to replay to its target and promote.
const PROMOTE_WAIT: Duration = Duration::from_secs(90);

/// WAL segment size, in MiB, of the clusters whose segment size does not matter: small,
/// so that every switch archives little.
const SMALL_SEGSIZE_MB: u32 = 1;

/// The server clock in UTC, in a form `--target-time` takes.
const SERVER_TIME_SQL: &str =
    "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US+00')";

// ---------------------------------------------------------------------------------------
// Running walkeep
// ---------------------------------------------------------------------------------------

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `walkeep <subcommand> --repo <repo>`, run as the cluster user and untouched by the
/// caller's walkeep settings (no repository from the environment, an empty config file).
fn walkeep(subcommand: &str, repo: &Path) -> Command {
    let mut cmd = walkeep_command("walkeep", Path::new("/dev/null"));
    cmd.arg(subcommand).arg("--repo").arg(repo);
    cmd
}

/// `walkeep-restore --repo <repo> <name> <dest>`, run as the cluster user.
fn walkeep_restore(repo: &Path, name: &str, dest: &Path) -> Command {
    let mut cmd = walkeep_command("walkeep-restore", Path::new("/dev/null"));
    cmd.arg("--repo").arg(repo).arg(name).arg(dest);
    cmd
}

/// Runs `cmd`, which must print JSON on stdout whatever its exit status; returns both.
fn run_json(cmd: &mut Command) -> (Output, Value) {
    let output = run(cmd);
    let json = serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "expected JSON on stdout ({err}), got\n--- stdout\n{}\n--- stderr\n{}",
            text(&output.stdout),
            text(&output.stderr)
        )
    });
    (output, json)
}

/// Runs `walkeep verify --json`; returns whether it exited 0, and its report.
fn verify(repo: &Path) -> (bool, Value) {
    let (output, report) = run_json(walkeep("verify", repo).arg("--json"));
    let whole = output.status.success();
    assert!(
        whole || output.status.code() == Some(1),
        "verify exited with {}, expected 0 or 1\n--- stderr\n{}",
        output.status,
        text(&output.stderr)
    );
    (whole, report)
}

/// Asserts that `report` finds nothing wrong and that verify exited 0.
fn assert_whole(whole: bool, report: &Value, what: &str) {
    for list in ["damaged", "foreign", "gaps"] {
        assert_eq!(
            report[list],
            Value::Array(vec![]),
            "{what}: {list}\n{report:#}"
        );
    }
    for backup in array(&report["backups"]) {
        assert_eq!(
            backup["problems"],
            Value::Array(vec![]),
            "{what}: backup {}\n{report:#}",
            backup["id"]
        );
    }
    assert!(whole, "{what}: verify exited non-zero\n{report:#}");
}

fn array(value: &Value) -> &Vec<Value> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("expected a JSON array, got {value}"))
}

fn strings(value: &Value) -> Vec<String> {
    array(value)
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("expected a string, got {v}"))
                .to_string()
        })
        .collect()
}

fn field(value: &Value, name: &str) -> String {
    value[name]
        .as_str()
        .unwrap_or_else(|| panic!("no string {name:?} in {value:#}"))
        .to_string()
}

// ---------------------------------------------------------------------------------------
// WAL names
// ---------------------------------------------------------------------------------------

/// Segments per log (the `XXXXXXXX` before the last eight digits) at `segsize` bytes.
fn segments_per_log(segsize: u64) -> u64 {
    0x1_0000_0000 / segsize
}

/// The segment number of a WAL segment name.
fn segno(name: &str, segsize: u64) -> u64 {
    let log = u64::from_str_radix(&name[8..16], 16).unwrap();
    let seg = u64::from_str_radix(&name[16..24], 16).unwrap();
    log * segments_per_log(segsize) + seg
}

/// The name of segment `segno` on `timeline`.
fn segment_name(timeline: u32, segno: u64, segsize: u64) -> String {
    let per_log = segments_per_log(segsize);
    format!(
        "{timeline:08X}{:08X}{:08X}",
        segno / per_log,
        segno % per_log
    )
}

/// Parses an LSN printed as `X/X`.
fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// Where an LSN prints for the start of segment `name`.
fn start_lsn(name: &str, segsize: u64) -> String {
    let lsn = segno(name, segsize) * segsize;
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Where the repository keeps WAL file `name`.
fn object_path(repo: &Path, name: &str) -> PathBuf {
    if name.ends_with(".history") {
        repo.join("wal/history").join(format!("{name}.zst"))
    } else {
        repo.join("wal")
            .join(&name[..16])
            .join(format!("{name}.zst"))
    }
}

/// Names of the complete segments stored in `repo`, sorted.
fn stored_segments(repo: &Path) -> Vec<String> {
    tree(repo)
        .into_keys()
        .filter_map(|key| {
            let name = key.strip_prefix("wal/")?.split('/').nth(1)?;
            let name = name.strip_suffix(".zst")?;
            (name.len() == 24).then(|| name.to_string())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Looking at a repository
// ---------------------------------------------------------------------------------------

/// What a "nothing changed" comparison looks at for one file.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileState {
    size: u64,
    sha256: String,
    mtime_ns: i128,
}

/// Every file below `root`, by path relative to it (with `/` separators).
fn tree(root: &Path) -> BTreeMap<String, FileState> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, FileState>) {
        for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                walk(root, &path, out);
            } else {
                let relative = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                let bytes = fs::read(&path).unwrap();
                out.insert(
                    relative,
                    FileState {
                        size: meta.len(),
                        sha256: hex::encode(Sha256::digest(&bytes)),
                        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000
                            + i128::from(meta.mtime_nsec()),
                    },
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// A [`tree`] without the advisory lock files, which any command may create.
fn content(root: &Path) -> BTreeMap<String, FileState> {
    let mut all = tree(root);
    all.retain(|key, _| !key.starts_with("locks/"));
    all
}

/// Panics, naming every file added, removed or changed, unless `root` still holds exactly
/// the [`content`] recorded in `before`.
fn assert_unchanged(root: &Path, before: &BTreeMap<String, FileState>, what: &str) {
    let now = content(root);
    let keys: BTreeSet<&String> = now.keys().chain(before.keys()).collect();
    let changed: Vec<String> = keys
        .into_iter()
        .filter_map(|key| match (before.get(key), now.get(key)) {
            (Some(old), Some(new)) if old == new => None,
            (Some(old), Some(new)) => Some(format!("changed {key}: {old:?} -> {new:?}")),
            (Some(_), None) => Some(format!("removed {key}")),
            _ => Some(format!("added {key}")),
        })
        .collect();
    assert!(changed.is_empty(), "{what}:\n{}", changed.join("\n"));
}

// ---------------------------------------------------------------------------------------
// Clusters that archive into a repository
// ---------------------------------------------------------------------------------------

/// The `archive_command` line that stores into `repo`.
fn archive_command(repo: &Path) -> String {
    format!(
        "archive_command = '{} --repo {} %p %f'",
        bin("walkeep-archive").display(),
        repo.display()
    )
}

/// Options for a cluster that archives into `repo` through walkeep-archive.
fn archiving_into(repo: &Path) -> InitOptions {
    InitOptions::default()
        .with_conf("wal_level = replica")
        .with_conf("archive_mode = on")
        .with_conf(archive_command(repo))
}

/// A cluster archiving into a walkeep repository of its own.
struct Source {
    cluster: Cluster,
    repo: PathBuf,
    segsize: u64,
}

impl Source {
    /// Creates the cluster `name` with `opts` on top of archiving into `<name>-repo`, runs
    /// `prepare` on its stopped data directory, initialises the repository and starts it.
    fn start_with(
        scratch: &Scratch,
        name: &str,
        segsize_mb: u32,
        opts: &[&str],
        prepare: impl FnOnce(&Cluster),
    ) -> Source {
        let repo = scratch.path().join(format!("{name}-repo"));
        let mut options = archiving_into(&repo).with_wal_segsize_mb(segsize_mb);
        for line in opts {
            options = options.with_conf(*line);
        }
        let mut cluster = Cluster::init(scratch, name, options);
        prepare(&cluster);
        run_ok(walkeep("init", &repo).arg("--pgdata").arg(&cluster.pgdata));
        cluster.start();
        Source {
            cluster,
            repo,
            segsize: u64::from(segsize_mb) << 20,
        }
    }

    /// A started cluster with small segments and a table `t (n int)`.
    fn start(scratch: &Scratch, name: &str) -> Source {
        let source = Source::start_with(scratch, name, SMALL_SEGSIZE_MB, &[], |_| {});
        source.cluster.psql("CREATE TABLE t (n int)");
        source
    }

    /// Commits `rows` rows tagged `tag` into `t`.
    fn commit(&self, tag: u32, rows: u32) {
        self.cluster.psql(&format!(
            "INSERT INTO t SELECT {tag} FROM generate_series(1, {rows})"
        ));
    }

    /// Takes a base backup; returns `walkeep backup --json`'s summary.
    fn backup(&self) -> Value {
        let (output, json) = run_json(
            walkeep("backup", &self.repo)
                .arg("--pgdata")
                .arg(&self.cluster.pgdata)
                .args(["-d", &self.cluster.conninfo(), "--json"]),
        );
        assert!(
            output.status.success(),
            "walkeep backup failed\n{}",
            text(&output.stderr)
        );
        json
    }

    /// Commits a row, ends the current segment and waits until it is in the repository;
    /// returns its name.
    fn switch_and_archive(&self) -> String {
        switch_and_archive(&self.cluster, &self.repo)
    }
}

/// Commits a row into `t` on `cluster`, ends the segment and waits until `repo` stores it.
fn switch_and_archive(cluster: &Cluster, repo: &Path) -> String {
    let segment = cluster.psql(
        "INSERT INTO t VALUES (0);
         SELECT pg_walfile_name(pg_switch_wal());",
    );
    cluster.wait_archived(&segment, ARCHIVE_WAIT);
    let object = object_path(repo, &segment);
    assert!(object.is_file(), "{} is missing", object.display());
    segment
}

fn wait_for_promotion(restored: &Cluster) {
    restored.wait_for_promotion(PROMOTE_WAIT);
}

/// Restores `repo` into `<scratch>/<name>` with `args` and `--target-action promote`,
/// starts it with archiving off and waits until it has promoted.
fn restore_and_promote(scratch: &Scratch, repo: &Path, name: &str, args: &[&str]) -> Cluster {
    let to = scratch.path().join(name);
    run_ok(
        walkeep("restore", repo)
            .arg("--to")
            .arg(&to)
            .args(args)
            .args(["--target-action", "promote"]),
    );
    let mut restored = Cluster::from_existing(scratch, &to);
    restored.append_conf(&["archive_mode = off"]);
    restored.start();
    wait_for_promotion(&restored);
    restored
}

// ---------------------------------------------------------------------------------------
// verify: one intact repository, broken in a different way by each test
// ---------------------------------------------------------------------------------------

/// A repository's files, held in memory: relative path, bytes, mode.
struct Snapshot(BTreeMap<String, (Vec<u8>, u32)>);

impl Snapshot {
    /// Reads every file below `repo`.
    fn of(repo: &Path) -> Snapshot {
        let files = tree(repo)
            .into_keys()
            .map(|relative| {
                let path = repo.join(&relative);
                let mode = fs::metadata(&path).unwrap().mode() & 0o7777;
                (relative, (fs::read(&path).unwrap(), mode))
            })
            .collect();
        Snapshot(files)
    }

    /// Writes a copy into `<scratch>/repo`, owned by the cluster user, and returns it.
    fn copy(&self, scratch: &Scratch) -> PathBuf {
        let repo = scratch.path().join("repo");
        for (relative, (bytes, mode)) in &self.0 {
            let path = repo.join(relative);
            let mut dir = path.parent().unwrap();
            let mut missing = Vec::new();
            while !dir.exists() {
                missing.push(dir.to_path_buf());
                dir = dir.parent().unwrap();
            }
            for dir in missing.iter().rev() {
                fs::create_dir(dir).unwrap();
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).unwrap();
            }
            fs::write(&path, bytes).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(*mode)).unwrap();
        }
        fix_ownership(&repo);
        repo
    }
}

/// An intact repository with one backup on one timeline, and what it holds.
struct Image {
    files: Snapshot,
    /// The backup's summary.
    backup: Value,
    /// Segments switched and archived after the backup, in order.
    after_backup: Vec<String>,
}

impl Image {
    fn backup_id(&self) -> String {
        field(&self.backup, "id")
    }

    fn copy(&self, scratch: &Scratch) -> PathBuf {
        self.files.copy(scratch)
    }
}

/// The shared intact repository, made once: a cluster with 1 MiB segments, one backup,
/// then four segments each ended by a switch.
fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let scratch = Scratch::new();
        let source = Source::start(&scratch, "image");
        source.commit(1, 1000);
        let backup = source.backup();
        let after_backup: Vec<String> = (0..4).map(|_| source.switch_and_archive()).collect();
        source.cluster.stop();
        Image {
            files: Snapshot::of(&source.repo),
            backup,
            after_backup,
        }
    })
}

#[test]
fn verify_passes_an_intact_repository() {
    let scratch = Scratch::new();
    let image = image();
    let repo = image.copy(&scratch);

    let (whole, report) = verify(&repo);
    assert_whole(whole, &report, "intact repository");
    let backups = array(&report["backups"]);
    assert_eq!(backups.len(), 1, "{report:#}");
    assert_eq!(field(&backups[0], "id"), image.backup_id());
    assert!(backups[0]["files"].as_u64().unwrap() > 0, "{report:#}");
    assert_eq!(report["partial_segments"], Value::Array(vec![]));
}

#[test]
fn verify_names_a_segment_with_one_flipped_byte_as_damaged() {
    let scratch = Scratch::new();
    let image = image();
    let repo = image.copy(&scratch);
    let segment = &image.after_backup[1];
    let object = object_path(&repo, segment);
    let mut bytes = fs::read(&object).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    fs::write(&object, &bytes).unwrap();

    let (whole, report) = verify(&repo);
    assert!(!whole, "verify passed a flipped byte\n{report:#}");
    let damaged = array(&report["damaged"]);
    let key = format!("wal/{}/{segment}.zst", &segment[..16]);
    assert_eq!(damaged.len(), 1, "{report:#}");
    assert_eq!(field(&damaged[0], "key"), key);
    assert!(!field(&damaged[0], "detail").is_empty());
    // The damage is not mistaken for anything else.
    assert_eq!(report["foreign"], Value::Array(vec![]), "{report:#}");
    assert_eq!(report["gaps"], Value::Array(vec![]), "{report:#}");
}

#[test]
fn verify_names_a_missing_middle_segment_and_its_neighbours() {
    let scratch = Scratch::new();
    let image = image();
    let repo = image.copy(&scratch);
    let segsize = u64::from(SMALL_SEGSIZE_MB) << 20;
    let [before, missing, after] = [0, 1, 2].map(|i| image.after_backup[i].clone());
    fs::remove_file(object_path(&repo, &missing)).unwrap();

    let (whole, report) = verify(&repo);
    assert!(!whole, "verify passed a gap\n{report:#}");
    let gaps = array(&report["gaps"]);
    assert_eq!(gaps.len(), 1, "{report:#}");
    let gap = &gaps[0];
    assert_eq!(gap["timeline"], 1);
    assert_eq!(strings(&gap["missing"]), [missing.as_str()]);
    assert_eq!(field(gap, "after"), before);
    assert_eq!(field(gap, "before"), after);
    assert_eq!(field(gap, "replay_stops_at"), start_lsn(&missing, segsize));
    // The backup ended before the gap: still restorable, but its window ends there.
    assert_eq!(strings(&gap["breaks_backups"]), Vec::<String>::new());
    assert_eq!(strings(&gap["cuts_window_of"]), [image.backup_id()]);
    assert_eq!(
        array(&report["backups"])[0]["problems"],
        Value::Array(vec![])
    );
    assert_eq!(report["damaged"], Value::Array(vec![]), "{report:#}");
}

#[test]
fn verify_reports_a_gap_inside_a_backup_as_breaking_it() {
    let scratch = Scratch::new();
    let image = image();
    let repo = image.copy(&scratch);
    let start = field(&image.backup, "start_segment");
    fs::remove_file(object_path(&repo, &start)).unwrap();

    let (whole, report) = verify(&repo);
    assert!(!whole, "{report:#}");
    let gaps = array(&report["gaps"]);
    assert_eq!(gaps.len(), 1, "{report:#}");
    assert_eq!(strings(&gaps[0]["missing"]), [start.as_str()]);
    assert_eq!(strings(&gaps[0]["breaks_backups"]), [image.backup_id()]);
    let problems = strings(&array(&report["backups"])[0]["problems"]);
    assert!(
        problems.iter().any(|p| p.contains(&start)),
        "the backup's problems should name {start}: {problems:?}"
    );
}

#[test]
fn verify_names_a_deleted_backup_file_in_the_backups_problems() {
    let scratch = Scratch::new();
    let image = image();
    let repo = image.copy(&scratch);
    let id = image.backup_id();
    fs::remove_file(repo.join(format!("backups/{id}/data/global/pg_control.zst"))).unwrap();

    let (whole, report) = verify(&repo);
    assert!(
        !whole,
        "verify passed a backup without pg_control\n{report:#}"
    );
    let backups = array(&report["backups"]);
    assert_eq!(field(&backups[0], "id"), id);
    let problems = strings(&backups[0]["problems"]);
    assert_eq!(problems.len(), 1, "{report:#}");
    assert!(
        problems[0].contains("global/pg_control"),
        "the problem should name global/pg_control: {problems:?}"
    );
    assert_eq!(report["gaps"], Value::Array(vec![]), "{report:#}");
}

#[test]
fn verify_names_a_changed_backup_file_as_damaged_and_the_backup_as_broken() {
    let scratch = Scratch::new();
    let image = image();
    let repo = image.copy(&scratch);
    let id = image.backup_id();
    let key = format!("backups/{id}/data/PG_VERSION.zst");
    // A valid object with other content: only the manifest's checksum can tell.
    let other = format!("backups/{id}/data/global/pg_filenode.map.zst");
    fs::copy(repo.join(&other), repo.join(&key)).unwrap();

    let (whole, report) = verify(&repo);
    assert!(!whole, "{report:#}");
    let damaged = array(&report["damaged"]);
    assert_eq!(damaged.len(), 1, "{report:#}");
    assert_eq!(field(&damaged[0], "key"), key);
    let problems = strings(&array(&report["backups"])[0]["problems"]);
    assert!(
        problems.iter().any(|p| p.contains(&key)),
        "the backup's problems should name {key}: {problems:?}"
    );
}

/// Regression: a manifest that is not valid JSON makes `verify` stop with "backup manifest ...
/// is unreadable" before it reports anything (`manifest::list` fails on the first bad
/// manifest), although checking that each manifest is readable is part of its job. The
/// other backups and the WAL go unchecked, and `--json` prints nothing.
#[test]
fn verify_reports_an_unreadable_manifest_instead_of_giving_up() {
    let scratch = Scratch::new();
    let image = image();
    let repo = image.copy(&scratch);
    let key = format!("manifests/{}.json", image.backup_id());
    let bytes = fs::read(repo.join(&key)).unwrap();
    fs::write(repo.join(&key), &bytes[..bytes.len() / 2]).unwrap();

    let output = run(walkeep("verify", &repo).arg("--json"));
    assert!(!output.status.success());
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!(
            "verify printed no report for a truncated manifest\n--- stderr\n{}",
            text(&output.stderr)
        )
    });
    assert!(
        report.to_string().contains(&key),
        "the report should name {key}\n{report:#}"
    );
}

#[test]
fn verify_lists_stray_files_as_foreign() {
    let scratch = Scratch::new();
    let image = image();
    let repo = image.copy(&scratch);
    let segment = &image.after_backup[0];
    let strays = [
        "wal/0000000100000000/junk.txt".to_string(),
        "notes.txt".to_string(),
        // A segment under the wrong timeline's folder, and one not compressed.
        format!("wal/0000000200000000/{segment}.zst"),
        format!("wal/0000000100000000/{segment}"),
    ];
    for stray in &strays {
        let path = repo.join(stray);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"not walkeep's\n").unwrap();
    }
    fix_ownership(&repo);

    let (whole, report) = verify(&repo);
    assert!(!whole, "verify passed stray files\n{report:#}");
    let mut expected = strays.to_vec();
    expected.sort();
    assert_eq!(strings(&report["foreign"]), expected, "{report:#}");
    assert_eq!(report["gaps"], Value::Array(vec![]), "{report:#}");
}

/// Regression: records appended to `catalog/wal.jsonl` that cannot be read (a garbage line,
/// a record cut short) are only logged, "WARN catalog record N is unreadable; skipped",
/// and `verify` says "repository is whole" and exits 0, though every command that reads
/// the catalog has lost what they recorded.
#[test]
fn verify_reports_unreadable_catalog_records_until_the_catalog_is_rebuilt() {
    let image = image();
    for cut_short in [false, true] {
        let what = if cut_short {
            "the last record cut short"
        } else {
            "a garbage line appended"
        };
        let scratch = Scratch::new();
        let repo = image.copy(&scratch);
        let catalog = repo.join("catalog/wal.jsonl");
        let mut bytes = fs::read(&catalog).unwrap();
        let records = bytes.iter().filter(|b| **b == b'\n').count();
        // The record that cannot be read, counting from 1.
        let bad = if cut_short {
            bytes.truncate(bytes.len() - 20);
            records
        } else {
            bytes.extend_from_slice(b"garbage\n");
            records + 1
        };
        fs::write(&catalog, &bytes).unwrap();

        let (whole, report) = verify(&repo);
        assert!(!whole, "{what}: verify passed\n{report:#}");
        let damaged = array(&report["damaged"]);
        assert_eq!(damaged.len(), 1, "{what}\n{report:#}");
        assert_eq!(field(&damaged[0], "key"), "catalog/wal.jsonl");
        let detail = field(&damaged[0], "detail");
        assert!(
            detail.contains(&format!("record {bad} is unreadable"))
                && detail.contains("walkeep catalog rebuild"),
            "{what}: {detail:?}"
        );
        // Nothing else is blamed.
        assert_eq!(report["gaps"], Value::Array(vec![]), "{what}\n{report:#}");
        assert_eq!(
            report["foreign"],
            Value::Array(vec![]),
            "{what}\n{report:#}"
        );

        let output = run(&mut walkeep("verify", &repo));
        assert_eq!(
            output.status.code(),
            Some(1),
            "{what}: verify's exit status"
        );
        let stdout = text(&output.stdout);
        assert!(
            stdout.contains(&format!(
                "DAMAGED  catalog/wal.jsonl: record {bad} is unreadable"
            )) && stdout.contains("REPOSITORY IS NOT WHOLE"),
            "{what}\n--- stdout\n{stdout}"
        );

        // The advice works.
        let mut rebuild = walkeep_command("walkeep", Path::new("/dev/null"));
        run_ok(rebuild.args(["catalog", "rebuild", "--repo"]).arg(&repo));
        let (whole, report) = verify(&repo);
        assert_whole(whole, &report, &format!("{what}, then the catalog rebuilt"));
    }
}

/// A repository that holds two timelines, and what it holds.
struct Timelines {
    files: Snapshot,
    /// The backup, on timeline 1.
    backup: Value,
    /// The segment in which timeline 2 begins, on timeline 1 (complete: the original
    /// cluster went on writing it).
    switch_segment: String,
    /// The same segment on timeline 2: its first.
    first_on_tl2: String,
    /// The `.partial` file of the switch segment.
    partial: String,
}

/// The shared two-timeline repository, made once: a backup, then a restore of it promoted
/// to timeline 2 that archives two segments into the same repository while the original
/// cluster goes on along timeline 1 for two more.
fn timelines() -> &'static Timelines {
    static TIMELINES: OnceLock<Timelines> = OnceLock::new();
    TIMELINES.get_or_init(|| {
        let scratch = Scratch::new();
        let source = Source::start(&scratch, "tl1");
        source.commit(1, 100);
        let backup = source.backup();
        source.commit(2, 100);
        source.switch_and_archive();

        // The restored cluster keeps the source's archive_command, so it archives
        // timeline 2 into the same repository.
        let to = scratch.path().join("tl2");
        run_ok(walkeep("restore", &source.repo).arg("--to").arg(&to).args([
            "--target",
            "immediate",
            "--target-action",
            "promote",
        ]));
        let mut tl2 = Cluster::from_existing(&scratch, &to);
        tl2.start();
        wait_for_promotion(&tl2);
        let history = object_path(&source.repo, "00000002.history");
        tl2.wait_for("00000002.history in the repository", ARCHIVE_WAIT, || {
            history.is_file()
        });
        let first_on_tl2 = switch_and_archive(&tl2, &source.repo);
        assert!(first_on_tl2.starts_with("00000002"), "{first_on_tl2}");
        switch_and_archive(&tl2, &source.repo);
        tl2.stop();

        // A promoted streaming standby leaves the old timeline's copy of the switch
        // segment as .partial; a promotion at the end of archive recovery, as here, does
        // not. So offer the repository one as PostgreSQL would: timeline 1's switch
        // segment, renamed.
        let switch_segment = format!("00000001{}", &first_on_tl2[8..]);
        let partial = format!("{switch_segment}.partial");
        let offered = scratch.dir("offered").join(&partial);
        run_ok(&mut walkeep_restore(
            &source.repo,
            &switch_segment,
            &offered,
        ));
        let mut archive = Command::new(bin("walkeep-archive"));
        archive
            .env("WALKEEP_CONFIG", "/dev/null")
            .arg("--repo")
            .arg(&source.repo)
            .arg(&offered)
            .arg(&partial);
        run_ok(as_cluster_user(&mut archive));
        assert!(object_path(&source.repo, &partial).is_file());

        // Timeline 1 goes on past the switch.
        for _ in 0..2 {
            source.switch_and_archive();
        }
        source.cluster.stop();
        let stored = stored_segments(&source.repo);
        assert!(stored.contains(&switch_segment), "{stored:?}");
        assert!(stored.contains(&first_on_tl2), "{stored:?}");

        Timelines {
            files: Snapshot::of(&source.repo),
            backup,
            switch_segment,
            first_on_tl2,
            partial,
        }
    })
}

#[test]
fn verify_passes_across_a_timeline_switch_and_lists_the_partial_segment_apart() {
    let scratch = Scratch::new();
    let timelines = timelines();
    let repo = timelines.files.copy(&scratch);

    let (whole, report) = verify(&repo);
    assert_whole(whole, &report, "repository with timelines 1 and 2");
    assert_eq!(
        strings(&report["partial_segments"]),
        [timelines.partial.as_str()],
        "{report:#}"
    );
    let ids: Vec<String> = array(&report["backups"])
        .iter()
        .map(|b| field(b, "id"))
        .collect();
    assert_eq!(ids, [field(&timelines.backup, "id")]);
}

#[test]
fn verify_finds_a_gap_in_timeline_2_that_timeline_1_and_the_partial_do_not_fill() {
    let scratch = Scratch::new();
    let timelines = timelines();
    let repo = timelines.files.copy(&scratch);
    // Timeline 1's copy of the switch segment and its .partial stay; neither may stand in.
    fs::remove_file(object_path(&repo, &timelines.first_on_tl2)).unwrap();
    assert!(object_path(&repo, &timelines.switch_segment).is_file());

    let (whole, report) = verify(&repo);
    assert!(!whole, "{report:#}");
    let gaps = array(&report["gaps"]);
    assert_eq!(gaps.len(), 1, "{report:#}");
    assert_eq!(gaps[0]["timeline"], 2);
    assert_eq!(
        strings(&gaps[0]["missing"]),
        [timelines.first_on_tl2.as_str()]
    );
    let segsize = u64::from(SMALL_SEGSIZE_MB) << 20;
    let n = segno(&timelines.first_on_tl2, segsize);
    assert_eq!(field(&gaps[0], "after"), segment_name(1, n - 1, segsize));
    assert_eq!(field(&gaps[0], "before"), segment_name(2, n + 1, segsize));
}

/// Regression: without `00000002.history` PostgreSQL cannot follow timeline 2 (recovery asks for
/// it and, not finding it, stays on timeline 1), and `walkeep restore` plans along
/// timeline 1 without a word. But `verify` follows timeline 2 as a lone timeline, finds its
/// segments contiguous and calls the repository whole.
#[test]
fn verify_reports_a_missing_history_file_of_a_timeline_with_segments() {
    let scratch = Scratch::new();
    let timelines = timelines();
    let repo = timelines.files.copy(&scratch);
    fs::remove_file(object_path(&repo, "00000002.history")).unwrap();

    let (whole, report) = verify(&repo);
    assert!(
        !whole,
        "verify calls a repository whole whose timeline 2 has no history file\n{report:#}"
    );
    assert!(
        report.to_string().contains("00000002.history"),
        "the report should name 00000002.history\n{report:#}"
    );
}

/// Regression: a stored `00000002.history` whose bytes decode intact but do not parse as a
/// timeline history makes `info`, `status` and `restore` fail ("history of timeline 2,
/// line 1: cannot parse"), yet `verify` only logs "WARN history of timeline 2 unreadable",
/// says "repository is whole" and exits 0.
#[test]
fn verify_reports_a_history_file_that_does_not_parse_and_checks_the_rest() {
    let scratch = Scratch::new();
    let timelines = timelines();
    let repo = timelines.files.copy(&scratch);
    let (_, intact) = verify(&repo);
    // `walkeep-archive` refuses such a file now, so the object is written directly.
    let name = "00000002.history";
    let object = object_path(&repo, name);
    let mut stored = Vec::new();
    walkeep::object::encode(&b"garbage\n"[..], &mut stored, 1, name, None).unwrap();
    fs::write(&object, &stored).unwrap();

    let (whole, report) = verify(&repo);
    assert!(
        !whole,
        "verify passed an unparseable history file\n{report:#}"
    );
    let damaged = array(&report["damaged"]);
    assert_eq!(damaged.len(), 1, "{report:#}");
    assert_eq!(
        field(&damaged[0], "key"),
        "wal/history/00000002.history.zst"
    );
    let detail = field(&damaged[0], "detail");
    assert!(
        detail.contains("history of timeline 2, line 1: cannot parse \"garbage\""),
        "{detail:?}"
    );
    // Everything else is still checked, and nothing else is blamed.
    assert_eq!(
        report["objects_checked"], intact["objects_checked"],
        "{report:#}"
    );
    assert_eq!(report["gaps"], Value::Array(vec![]), "{report:#}");
    assert_eq!(report["foreign"], Value::Array(vec![]), "{report:#}");
    for backup in array(&report["backups"]) {
        assert_eq!(backup["problems"], Value::Array(vec![]), "{report:#}");
    }

    let output = run(&mut walkeep("verify", &repo));
    assert_eq!(output.status.code(), Some(1), "verify's exit status");
    let stdout = text(&output.stdout);
    assert!(
        stdout.contains("DAMAGED  wal/history/00000002.history.zst: not a valid timeline history")
            && stdout.contains("REPOSITORY IS NOT WHOLE"),
        "--- stdout\n{stdout}"
    );
}

// ---------------------------------------------------------------------------------------
// verify and restore across the end of a log
// ---------------------------------------------------------------------------------------

/// A cluster with `segsize_mb` segments whose WAL `pg_resetwal -l` moves to three segments
/// before the end of the first log. The backup's start switches to the next segment, two
/// before the end; three more switches cross into the next log. Verify finds no gap,
/// walkeep-restore returns the segments on both sides of the boundary byte for byte, a
/// restored cluster replays across it, and deleting the first segment of the next log is
/// reported as exactly that gap.
fn wal_crosses_the_end_of_a_log(segsize_mb: u32) {
    let segsize = u64::from(segsize_mb) << 20;
    let last_of_log = segments_per_log(segsize) - 1;
    let expected: Vec<String> = (last_of_log - 2..last_of_log + 3)
        .map(|n| segment_name(1, n, segsize))
        .collect();
    let [reset_to, in_backup, before, after, next] =
        <[String; 5]>::try_from(expected.clone()).unwrap();
    assert!(before.ends_with(&format!("{last_of_log:X}")) && after.ends_with("0100000000"));

    let scratch = Scratch::new();
    let name = format!("wrap{segsize_mb}");
    // wal_keep_size keeps the completed segments in pg_wal to compare with.
    let source = Source::start_with(
        &scratch,
        &name,
        segsize_mb,
        &["wal_keep_size = '1GB'"],
        |cluster| {
            let mut reset = pg_command("pg_resetwal");
            reset
                .arg("-l")
                .arg(&reset_to)
                .arg("-D")
                .arg(&cluster.pgdata);
            run_ok(as_cluster_user(&mut reset));
        },
    );
    source.cluster.psql("CREATE TABLE t (n int)");
    let backup = source.backup();
    assert_eq!(field(&backup, "start_segment"), in_backup, "{backup:#}");
    let switched: Vec<String> = (0..3).map(|_| source.switch_and_archive()).collect();
    assert_eq!(
        switched,
        expected[2..],
        "switches must cross into the next log"
    );
    assert_eq!(stored_segments(&source.repo), expected);

    let (whole, report) = verify(&source.repo);
    assert_whole(
        whole,
        &report,
        &format!("{segsize_mb} MiB segments across a log"),
    );

    for segment in [&before, &after] {
        let restored = scratch.path().join(format!("restored-{segment}"));
        run_ok(&mut walkeep_restore(&source.repo, segment, &restored));
        let original = fs::read(source.cluster.pgdata.join("pg_wal").join(segment)).unwrap();
        let bytes = fs::read(&restored).unwrap();
        assert_eq!(bytes.len() as u64, segsize, "{segment}");
        assert!(
            bytes == original,
            "{segment}: restored bytes differ from pg_wal's"
        );
        fs::remove_file(&restored).unwrap();
    }

    // PostgreSQL itself replays across the boundary from the repository.
    let rows = source.cluster.psql("SELECT count(*) FROM t");
    let restored = restore_and_promote(&scratch, &source.repo, &format!("{name}-restored"), &[]);
    assert_eq!(restored.psql("SELECT count(*) FROM t"), rows);
    let replayed = restored.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    assert!(
        segno(&replayed, segsize) > segno(&after, segsize),
        "replay should end past {after}, ended in {replayed}"
    );
    drop(restored);

    fs::remove_file(object_path(&source.repo, &after)).unwrap();
    let (whole, report) = verify(&source.repo);
    assert!(!whole, "{report:#}");
    let gaps = array(&report["gaps"]);
    assert_eq!(gaps.len(), 1, "{report:#}");
    assert_eq!(strings(&gaps[0]["missing"]), [after.as_str()]);
    assert_eq!(field(&gaps[0], "after"), before);
    assert_eq!(field(&gaps[0], "before"), next);
    assert_eq!(field(&gaps[0], "replay_stops_at"), "1/0");
    assert_eq!(strings(&gaps[0]["cuts_window_of"]), [field(&backup, "id")]);
}

#[test]
fn wal_with_16_mib_segments_crosses_ff_into_the_next_log() {
    wal_crosses_the_end_of_a_log(16);
}

#[test]
fn wal_with_1_mib_segments_crosses_fff_into_the_next_log() {
    wal_crosses_the_end_of_a_log(1);
}

#[test]
fn wal_with_64_mib_segments_crosses_3f_into_the_next_log() {
    wal_crosses_the_end_of_a_log(64);
}

// ---------------------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------------------

/// Runs `walkeep check --json`; returns whether it exited 0 and the verdicts by name.
fn check(repo: &Path, cluster: &Cluster) -> (bool, BTreeMap<String, (String, String)>) {
    check_within(repo, cluster, 30)
}

/// Like [`check`], waiting at most `timeout` seconds for the switched segment.
fn check_within(
    repo: &Path,
    cluster: &Cluster,
    timeout: u32,
) -> (bool, BTreeMap<String, (String, String)>) {
    let timeout = timeout.to_string();
    let (output, report) = run_json(walkeep("check", repo).args([
        "-d",
        &cluster.conninfo(),
        "--json",
        "--timeout",
        &timeout,
    ]));
    let verdicts = array(&report["verdicts"])
        .iter()
        .map(|v| (field(v, "check"), (field(v, "status"), field(v, "detail"))))
        .collect();
    (output.status.success(), verdicts)
}

#[test]
fn check_passes_on_a_cluster_that_archives_into_the_repository() {
    let scratch = Scratch::new();
    let source = Source::start(&scratch, "checked");

    let (passed, verdicts) = check(&source.repo, &source.cluster);
    for (name, (status, detail)) in &verdicts {
        assert!(
            status == "ok" || status == "warn",
            "{name}: {status}: {detail}"
        );
    }
    for name in ["wal_level", "archive_mode", "archive_command", "end to end"] {
        assert_eq!(verdicts[name].0, "ok", "{name}: {:?}", verdicts[name]);
    }
    assert!(passed, "check exited non-zero: {verdicts:?}");

    // The segment the check switched to is really in the repository.
    let detail = &verdicts["end to end"].1;
    let segment = detail
        .split_whitespace()
        .find(|w| w.len() == 24 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("end to end names no segment: {detail}"));
    assert!(object_path(&source.repo, segment).is_file(), "{segment}");
}

/// `walkeep check`, which connects as `walkeep backup` does, takes the password from the
/// password file the way libpq does: a private file with a matching line logs in, the same
/// file readable by others is ignored with a warning, and a wrong password is refused by
/// the server.
#[test]
fn check_logs_in_with_the_password_file_as_libpq_does() {
    let scratch = Scratch::new();
    let source = Source::start(&scratch, "password");
    let cluster = &source.cluster;
    cluster.psql("CREATE ROLE operator LOGIN SUPERUSER PASSWORD 'correct horse'");
    // pg_hba.conf takes the first match: the operator must use SCRAM, the harness stays
    // trusted.
    let hba = cluster.pgdata.join("pg_hba.conf");
    let rest = fs::read_to_string(&hba).unwrap();
    fs::write(
        &hba,
        format!("host all operator 127.0.0.1/32 scram-sha-256\n{rest}"),
    )
    .unwrap();
    cluster.reload();

    let port = cluster.port;
    let conninfo = format!("host=127.0.0.1 port={port} user=operator dbname=postgres");
    let pgpass = scratch.path().join("pgpass");
    let check_with = |line: String, mode: u32| -> (Output, String) {
        fs::write(&pgpass, line).unwrap();
        fs::set_permissions(&pgpass, fs::Permissions::from_mode(mode)).unwrap();
        fix_ownership(&pgpass);
        let output = run(walkeep("check", &source.repo)
            .args(["-d", &conninfo, "--timeout", "60"])
            .env("PGPASSFILE", &pgpass)
            .env_remove("PGPASSWORD"));
        let said = format!("{}{}", text(&output.stdout), text(&output.stderr));
        (output, said)
    };

    let (output, said) = check_with(
        format!("# ours\n127.0.0.1:{port}:postgres:operator:correct horse\n"),
        0o600,
    );
    assert!(
        output.status.success(),
        "check with a private password file:\n{said}"
    );

    let (output, said) = check_with(
        format!("127.0.0.1:{port}:postgres:operator:correct horse\n"),
        0o644,
    );
    assert!(
        !output.status.success(),
        "an open password file was used:\n{said}"
    );
    assert!(said.contains("group or world access"), "{said}");

    let (output, said) = check_with(format!("127.0.0.1:{port}:*:operator:wrong\n"), 0o600);
    assert!(
        !output.status.success(),
        "a wrong password logged in:\n{said}"
    );
    assert!(said.contains("password authentication failed"), "{said}");
}

/// Regression: `walkeep check` names the segment it switched with the timeline of the last
/// checkpoint (`pg_control_checkpoint()`), which after a standby's promotion stays the old
/// one until the first checkpoint on the new timeline completes: PostgreSQL promotes a
/// standby without waiting for one, and that checkpoint is spread. So right after a
/// failover, check waits for a segment of the old timeline that never comes and fails
/// "end to end" while the new timeline's segment is archived. `pg_walfile_name()` of the
/// switch position names the segment on the timeline being written.
#[test]
fn check_end_to_end_follows_the_new_timeline_right_after_a_promotion() {
    let scratch = Scratch::new();
    let source = Source::start(&scratch, "primary");
    source.commit(1, 5000);
    source.backup();
    source.commit(2, 5000);
    source.switch_and_archive();
    let rows = source.cluster.psql("SELECT count(*) FROM t");
    source.cluster.stop();

    // A standby fed from the repository alone, which keeps the primary's archive_command.
    let to = scratch.path().join("standby");
    run_ok(
        walkeep("restore", &source.repo)
            .arg("--to")
            .arg(&to)
            .arg("--standby"),
    );
    let mut standby = Cluster::from_existing(&scratch, &to);
    standby.start();
    standby.wait_for("the standby to replay the archive", PROMOTE_WAIT, || {
        standby.try_psql("SELECT count(*) FROM t").ok() == Some(rows.clone())
    });
    assert_eq!(standby.psql("SELECT pg_promote()"), "t");
    let checkpoint_timeline = standby.psql("SELECT timeline_id FROM pg_control_checkpoint()");
    eprintln!("timeline of the last checkpoint just after promotion: {checkpoint_timeline}");

    // The old timeline's segment never comes: with the bug, check fails however long it
    // waits, so the wait can leave room for a loaded machine.
    let (_, verdicts) = check_within(&source.repo, &standby, 60);
    assert_eq!(
        verdicts["end to end"].0, "ok",
        "the promoted server archives fine: {:?}",
        verdicts["end to end"]
    );
    let detail = &verdicts["end to end"].1;
    assert!(
        detail.contains(" 00000002"),
        "check did not wait for a segment of the new timeline: {detail}"
    );
}

/// Runs `walkeep check` against a cluster whose `archive_command` is right but whose
/// `archive_mode` is off.
fn check_with_archive_mode_off() -> (bool, BTreeMap<String, (String, String)>) {
    let scratch = Scratch::new();
    let source = Source::start_with(
        &scratch,
        "off",
        SMALL_SEGSIZE_MB,
        &["archive_mode = off"],
        |_| {},
    );
    check(&source.repo, &source.cluster)
}

#[test]
fn check_fails_naming_archive_mode_when_archiving_is_off() {
    let (passed, verdicts) = check_with_archive_mode_off();
    assert!(
        !passed,
        "check passed with archive_mode = off: {verdicts:?}"
    );
    assert_eq!(verdicts["archive_mode"].0, "fail", "{verdicts:?}");
    assert!(
        verdicts["archive_mode"].1.starts_with("off"),
        "{verdicts:?}"
    );
    assert_eq!(verdicts["wal_level"].0, "ok", "{verdicts:?}");
    assert_eq!(verdicts["end to end"].0, "fail", "{verdicts:?}");
}

/// Regression: with `archive_mode = off`, PostgreSQL shows `archive_command` as "(disabled)"
/// (its show hook), and `walkeep check` reads it with `current_setting`, so it fails a
/// correct `archive_command` with "\"(disabled)\" does not call walkeep-archive" and
/// sends the operator to fix the wrong setting. The configured value is in
/// `pg_settings.reset_val`.
#[test]
fn check_does_not_blame_a_correct_archive_command_when_archive_mode_is_off() {
    let (_, verdicts) = check_with_archive_mode_off();
    let (status, detail) = &verdicts["archive_command"];
    assert!(
        status != "fail" && !detail.contains("(disabled)"),
        "archive_command is right, archive_mode is what is wrong: {status}: {detail}"
    );
}

#[test]
fn check_fails_naming_an_archive_command_that_stores_elsewhere() {
    let scratch = Scratch::new();
    let source = Source::start(&scratch, "elsewhere");
    let other_repo = scratch.path().join("other-repo");
    let copy_dir = scratch.dir("copies");
    let commands = [
        format!("cp %p {}/%f", copy_dir.display()),
        format!(
            "{} --repo {} %p %f",
            bin("walkeep-archive").display(),
            other_repo.display()
        ),
    ];
    for command in &commands {
        source.cluster.psql(&format!(
            "ALTER SYSTEM SET archive_command = '{command}'; SELECT pg_reload_conf();"
        ));
        source
            .cluster
            .wait_for("the new archive_command", Duration::from_secs(10), || {
                source.cluster.psql("SHOW archive_command") == *command
            });

        let (passed, verdicts) = check(&source.repo, &source.cluster);
        assert!(!passed, "check passed with {command:?}: {verdicts:?}");
        let (status, detail) = &verdicts["archive_command"];
        assert_eq!(status, "fail", "{command}: {verdicts:?}");
        assert!(detail.contains(command.as_str()), "{detail}");
        if command.contains("--repo") {
            assert!(detail.contains(&*other_repo.to_string_lossy()), "{detail}");
        }
        assert_eq!(verdicts["archive_mode"].0, "ok", "{verdicts:?}");
    }
}

// ---------------------------------------------------------------------------------------
// status
// ---------------------------------------------------------------------------------------

fn status(source: &Source, format: &str) -> Output {
    run_ok(
        walkeep("status", &source.repo)
            .args(["-d", &source.cluster.conninfo(), format])
            .arg("--pgdata")
            .arg(&source.cluster.pgdata),
    )
}

fn archiver_counts(cluster: &Cluster) -> (String, i64) {
    let row = cluster.psql(
        "SELECT coalesce(last_archived_wal, '') || '|' || failed_count FROM pg_stat_archiver",
    );
    let (last, failed) = row.split_once('|').unwrap();
    (last.to_string(), failed.parse().unwrap())
}

#[test]
fn status_reports_the_last_archived_segment_then_archiving_blocked() {
    let scratch = Scratch::new();
    let source = Source::start(&scratch, "status");
    let archived = source.switch_and_archive();
    source.cluster.wait_for(
        "pg_stat_archiver to record the segment",
        ARCHIVE_WAIT,
        || archiver_counts(&source.cluster).0 == archived,
    );

    let json: Value = serde_json::from_slice(&status(&source, "--json").stdout).unwrap();
    assert_eq!(field(&json["archiver"], "last_archived_wal"), archived);
    assert_eq!(json["ready_count"], 0, "{json:#}");
    assert_eq!(json["blocked"], Value::Null, "{json:#}");
    let metrics = text(&status(&source, "--prometheus").stdout);
    assert!(
        metrics.contains("\nwalkeep_archive_blocked 0\n"),
        "{metrics}"
    );

    // Break archiving: PostgreSQL keeps the segment and retries it.
    source.cluster.psql(
        "ALTER SYSTEM SET archive_command = 'false';
         SELECT pg_reload_conf();",
    );
    source
        .cluster
        .wait_for("archive_command = false", Duration::from_secs(10), || {
            source.cluster.psql("SHOW archive_command") == "false"
        });
    let failed_before = archiver_counts(&source.cluster).1;
    let stuck = source.cluster.psql(
        "INSERT INTO t VALUES (1);
         SELECT pg_walfile_name(pg_switch_wal());",
    );
    source
        .cluster
        .wait_for("archiving to fail", ARCHIVE_WAIT, || {
            archiver_counts(&source.cluster).1 > failed_before
        });

    let json: Value = serde_json::from_slice(&status(&source, "--json").stdout).unwrap();
    assert_eq!(field(&json["blocked"], "segment"), stuck, "{json:#}");
    assert_eq!(field(&json["archiver"], "last_archived_wal"), archived);
    assert!(json["ready_count"].as_u64().unwrap() >= 1, "{json:#}");
    let metrics = text(&status(&source, "--prometheus").stdout);
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");
    assert!(
        metrics.contains("\nwalkeep_archive_blocked 1\n"),
        "{metrics}"
    );
    assert!(!object_path(&source.repo, &stuck).exists());
}

// ---------------------------------------------------------------------------------------
// expire
// ---------------------------------------------------------------------------------------

/// Runs `walkeep expire --keep 2 --json` with `extra` arguments; returns its plan.
fn expire_keep_2(repo: &Path, extra: &[&str]) -> Value {
    let (output, plan) = run_json(
        walkeep("expire", repo)
            .args(["--keep", "2", "--json"])
            .args(extra),
    );
    assert!(
        output.status.success(),
        "expire failed\n{}",
        text(&output.stderr)
    );
    plan
}

/// Three backups with commits and switches between; `--keep 2` must expire the oldest and
/// exactly the WAL before the second's start, as its dry run says, and a time between the
/// second and third backups must stay restorable.
#[test]
fn expire_keeps_the_newest_backups_and_their_wal_as_its_dry_run_says() {
    let scratch = Scratch::new();
    let source = Source::start(&scratch, "expiring");
    let next_second = || thread::sleep(Duration::from_millis(1100));

    source.commit(1, 100);
    let b1 = source.backup();
    source.commit(2, 100);
    source.switch_and_archive();
    next_second();
    let b2 = source.backup();
    source.commit(3, 100);
    thread::sleep(Duration::from_millis(20));
    let target = source.cluster.psql(SERVER_TIME_SQL);
    thread::sleep(Duration::from_millis(20));
    source.commit(4, 100);
    source.switch_and_archive();
    next_second();
    let b3 = source.backup();
    source.commit(5, 100);
    source.switch_and_archive();
    let ids = [&b1, &b2, &b3].map(|b| field(b, "id"));

    // What --keep 2 must delete, worked out from the layout alone: the oldest backup and
    // every WAL file (segments and .backup files) before the second backup's start.
    let cutoff = field(&b2, "start_segment");
    let before = content(&source.repo);
    let old_wal: BTreeSet<String> = before
        .keys()
        .filter(|key| key.starts_with("wal/0") && key.split('/').nth(2).unwrap()[..24] < *cutoff)
        .cloned()
        .collect();
    let old_backup: BTreeSet<String> = before
        .keys()
        .filter(|key| key.starts_with(&format!("backups/{}/", ids[0])))
        .cloned()
        .collect();
    let b1_label = format!(
        "{}.{:08X}.backup.zst",
        field(&b1, "start_segment"),
        parse_lsn(&field(&b1, "start_lsn")) % source.segsize
    );
    assert!(
        old_wal.iter().any(|k| k.ends_with(&b1_label)),
        "the oldest backup's .backup file {b1_label} should be among {old_wal:?}"
    );
    assert!(old_wal.len() >= 2 && !old_backup.is_empty());

    // The dry run changes nothing and lists exactly that.
    let dry = expire_keep_2(&source.repo, &["--dry-run"]);
    assert_unchanged(&source.repo, &before, "--dry-run changed the repository");
    assert_eq!(strings(&dry["kept_backups"]), ids[1..]);
    assert_eq!(strings(&dry["expired_backups"]), ids[..1]);
    assert_eq!(field(&dry, "wal_cutoff"), cutoff);
    let listed: BTreeSet<String> = strings(&dry["expired_wal"]).into_iter().collect();
    assert_eq!(listed, old_wal);

    // A backup in progress holds the backup lock: expire waits for it, touching nothing.
    let lock_path = source.repo.join("locks/backup.lock");
    let backup_lock = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .unwrap();
    fix_ownership(&lock_path);
    fs2::FileExt::lock_exclusive(&backup_lock).unwrap();
    let mut waiting = walkeep("expire", &source.repo)
        .args(["--keep", "2", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(1500));
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "expire ran while a backup held the backup lock"
    );
    assert_unchanged(
        &source.repo,
        &before,
        "expire changed the repository while a backup held the lock",
    );
    fs2::FileExt::unlock(&backup_lock).unwrap();
    let output = waiting.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "expire failed\n{}",
        text(&output.stderr)
    );
    let done: Value = serde_json::from_slice(&output.stdout).unwrap();
    for key in [
        "kept_backups",
        "expired_backups",
        "wal_cutoff",
        "expired_wal",
        "freed_bytes",
    ] {
        assert_eq!(
            done[key], dry[key],
            "{key}: the real run differs from the dry run"
        );
    }
    let after = content(&source.repo);
    let gone: BTreeSet<String> = before
        .keys()
        .filter(|key| !after.contains_key(*key))
        .cloned()
        .collect();
    let mut expected_gone = old_wal.clone();
    expected_gone.extend(old_backup.iter().cloned());
    expected_gone.insert(format!("manifests/{}.json", ids[0]));
    assert_eq!(gone, expected_gone, "expire deleted something else");
    let added: Vec<&String> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    assert_eq!(
        added,
        ["catalog/wal-horizon.json"],
        "expire should add its horizon and nothing else"
    );
    let freed: u64 = gone
        .iter()
        .filter(|key| !key.starts_with("manifests/"))
        .map(|key| before[key].size)
        .sum();
    assert_eq!(done["freed_bytes"], freed, "freed_bytes");
    let catalog = fs::read_to_string(source.repo.join("catalog/wal.jsonl")).unwrap();
    for key in &old_wal {
        let name = key.rsplit('/').next().unwrap().trim_end_matches(".zst");
        assert!(
            !catalog.contains(&format!("\"{name}\"")),
            "catalog still lists {name}"
        );
    }

    let (whole, report) = verify(&source.repo);
    assert_whole(whole, &report, "after expire");
    assert_eq!(array(&report["backups"]).len(), 2, "{report:#}");

    // A recovery still asking for expired WAL stops (fatal), never reads it as absent; a
    // segment past the end of the archive is absent as ever.
    let expired = old_wal
        .iter()
        .map(|key| key.rsplit('/').next().unwrap().trim_end_matches(".zst"))
        .find(|name| name.len() == 24)
        .unwrap()
        .to_string();
    let dest = scratch.dir("late-recovery").join("RECOVERYXLOG");
    let output = run(&mut walkeep_restore(&source.repo, &expired, &dest));
    assert_eq!(output.status.code(), Some(200), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("walkeep expire"));
    assert!(!dest.exists());
    let output = run(&mut walkeep_restore(
        &source.repo,
        "0000000100000000000000FE",
        &dest,
    ));
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));

    // A time between the second and third backups is reached from the second.
    let restored = restore_and_promote(&scratch, &source.repo, "pitr", &["--target-time", &target]);
    assert_eq!(
        restored
            .psql("SELECT string_agg(DISTINCT n::text, ',' ORDER BY n::text) FROM t WHERE n > 0"),
        "1,2,3"
    );
    assert_eq!(restored.psql("SELECT count(*) FROM t WHERE n > 0"), "300");
}
