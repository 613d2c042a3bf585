//! Point-in-time recovery end to end: each kind of recovery target, the planner's choice
//! of backup, and the restores it must refuse, against real PostgreSQL clusters.
//!
//! Each test archives a cluster into a repository of its own with `walkeep-archive`, takes
//! base backups with `walkeep backup` and restores with `walkeep restore`. A restore that
//! should succeed is started as a cluster, promoted at its target, and compared with what
//! the source held at that target: row count and a checksum of every row. A restore that
//! should be refused must say why on stderr and must not create the target directory.
//!
//! Recovery to a time, a transaction or a restore point stops only when PostgreSQL reads
//! a record past the target, and PostgreSQL 15 fails if the archive ends first. So the
//! tests commit more after their targets, switch WAL and wait until that segment is in the
//! repository before restoring (all but the one that pins what happens without that).
//!
//! A test whose doc comment starts with "Regression:" pins a bug walkeep once had, told as
//! it was then.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;

use common::{
    as_cluster_user, bin, pg_command, run, run_ok, walkeep_command, Cluster, InitOptions, Scratch,
};

/// How long a WAL segment may take to reach the repository after a switch.
const ARCHIVE_WAIT: Duration = Duration::from_secs(60);

/// How long a restored cluster may take to replay to its target and promote.
const PROMOTE_WAIT: Duration = Duration::from_secs(90);

/// The server clock in UTC, in a form `--target-time` takes.
const SERVER_TIME_SQL: &str =
    "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US+00')";

/// What `items` holds: row count, a checksum of every row, and the phases present.
const ITEMS_STATE_SQL: &str = "SELECT count(*) || ' rows, md5 ' \
     || coalesce(md5(string_agg(id || ':' || phase || ':' || payload, ',' ORDER BY id)), '-') \
     || ', phases ' || coalesce(string_agg(DISTINCT phase, ',' ORDER BY phase), '-') \
     FROM items";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `walkeep <subcommand> --repo <repo>`, run as the cluster user, who owns the repository.
fn walkeep(subcommand: &str, repo: &Path) -> Command {
    let mut cmd = walkeep_command("walkeep", Path::new("/dev/null"));
    cmd.arg(subcommand).arg("--repo").arg(repo);
    cmd
}

/// A pause that keeps commit timestamps on either side of a target time apart.
fn pause() {
    thread::sleep(Duration::from_millis(20));
}

/// Sleeps into the next second of the wall clock: backup ids have one-second resolution.
fn next_second() {
    thread::sleep(Duration::from_millis(1100));
}

/// Formats an instant the way `--target-time` takes it.
fn target_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()
}

fn parse_target_time(t: &str) -> DateTime<Utc> {
    DateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f%#z")
        .unwrap_or_else(|err| panic!("bad server time {t:?}: {err}"))
        .with_timezone(&Utc)
}

/// What `walkeep backup --json` reports.
#[derive(Debug)]
struct Backup {
    id: String,
    start_time: DateTime<Utc>,
    stop_time: DateTime<Utc>,
    stop_lsn: String,
}

impl Backup {
    fn from_json(json: &Value) -> Backup {
        let field = |name: &str| {
            json[name]
                .as_str()
                .unwrap_or_else(|| panic!("backup summary has no string {name:?}: {json}"))
                .to_string()
        };
        let time = |name: &str| {
            field(name)
                .parse::<DateTime<Utc>>()
                .unwrap_or_else(|err| panic!("backup summary {name:?} is no time: {err}"))
        };
        Backup {
            id: field("id"),
            start_time: time("start_time"),
            stop_time: time("stop_time"),
            stop_lsn: field("stop_lsn"),
        }
    }
}

/// A cluster archiving into a walkeep repository of its own.
struct Source {
    cluster: Cluster,
    repo: PathBuf,
}

impl Source {
    /// Creates, initialises the repository for, and starts a cluster called `name`.
    fn start(scratch: &Scratch, name: &str) -> Source {
        let repo = scratch.path().join(format!("{name}-repo"));
        let archive_command = format!(
            "{} --repo {} %p %f",
            bin("walkeep-archive").display(),
            repo.display()
        );
        let opts = InitOptions::default()
            .with_conf("wal_level = replica")
            .with_conf("archive_mode = on")
            .with_conf(format!("archive_command = '{archive_command}'"));
        let mut cluster = Cluster::init(scratch, name, opts);
        run_ok(walkeep("init", &repo).arg("--pgdata").arg(&cluster.pgdata));
        cluster.start();
        Source { cluster, repo }
    }

    /// Creates the `items` table that [`ITEMS_STATE_SQL`] reads.
    fn create_items(&self) {
        self.cluster.psql(
            "CREATE TABLE items (id int PRIMARY KEY, phase text NOT NULL, payload text NOT NULL)",
        );
    }

    /// Commits phase `n`: 500 rows of `items` with ids `n*1000+1` up, tagged `p<n>`.
    /// A source with the items table, phase 0 committed and backed up, then phase 1
    /// committed and its segment archived.
    fn backed_up_then_one_phase(scratch: &Scratch) -> Source {
        let source = Source::start(scratch, "source");
        source.create_items();
        source.commit_phase(0);
        source.backup();
        source.commit_phase(1);
        source.switch_and_archive();
        source
    }

    fn commit_phase(&self, n: u32) {
        self.cluster.psql(&phase_insert(n));
    }

    fn items_state(&self) -> String {
        self.cluster.psql(ITEMS_STATE_SQL)
    }

    fn server_time(&self) -> String {
        self.cluster.psql(SERVER_TIME_SQL)
    }

    /// Takes a base backup; returns its summary.
    fn backup(&self) -> Backup {
        let output = run_ok(
            walkeep("backup", &self.repo)
                .arg("--pgdata")
                .arg(&self.cluster.pgdata)
                .args(["-d", &self.cluster.conninfo(), "--json"]),
        );
        let json: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
            panic!(
                "walkeep backup --json printed no JSON ({err}):\n{}",
                text(&output.stdout)
            )
        });
        Backup::from_json(&json)
    }

    /// Ends the current WAL segment and waits until it is in the repository; returns its
    /// name.
    fn switch_and_archive(&self) -> String {
        let segment = self.cluster.psql("SELECT pg_walfile_name(pg_switch_wal())");
        self.cluster.wait_archived(&segment, ARCHIVE_WAIT);
        let object = self.segment_object(&segment);
        assert!(object.is_file(), "{} is missing", object.display());
        segment
    }

    /// Where the repository stores WAL segment `segment`.
    fn segment_object(&self, segment: &str) -> PathBuf {
        self.repo
            .join("wal")
            .join(&segment[..16])
            .join(format!("{segment}.zst"))
    }

    /// Runs `walkeep restore --to <to> <args>`; returns its output whatever the outcome.
    fn restore(&self, to: &Path, args: &[&str]) -> Output {
        run(walkeep("restore", &self.repo)
            .arg("--to")
            .arg(to)
            .args(args))
    }

    /// Runs `walkeep restore --dry-run <args>`, which must succeed; returns the plan.
    fn plan(&self, args: &[&str]) -> Value {
        let never = self.repo.with_file_name("dry-run-target");
        let output = run_ok(
            walkeep("restore", &self.repo)
                .arg("--to")
                .arg(&never)
                .arg("--dry-run")
                .args(args),
        );
        assert!(!never.exists(), "--dry-run created {}", never.display());
        let stdout = text(&output.stdout);
        // The plan is the JSON object at the end of stdout (a time target prints how it
        // resolves first).
        let start = stdout
            .find('{')
            .unwrap_or_else(|| panic!("dry run printed no plan:\n{stdout}"));
        serde_json::from_str(&stdout[start..])
            .unwrap_or_else(|err| panic!("dry run printed no JSON plan ({err}):\n{stdout}"))
    }

    /// Restores into `<scratch>/<name>` with `args` and `--target-action promote`, starts
    /// the result with archiving off (so it cannot add a timeline to this repository while
    /// other restores read it), and waits until it has promoted.
    fn restore_and_promote(&self, scratch: &Scratch, name: &str, args: &[&str]) -> Cluster {
        let to = scratch.path().join(name);
        let mut all = args.to_vec();
        all.extend(["--target-action", "promote"]);
        let output = self.restore(&to, &all);
        assert!(
            output.status.success(),
            "walkeep restore {all:?} failed with {}\n--- stdout\n{}\n--- stderr\n{}",
            output.status,
            text(&output.stdout),
            text(&output.stderr)
        );

        let mut restored = Cluster::from_existing(scratch, &to);
        restored.append_conf(&["archive_mode = off"]);
        if let Err(why) = restored.try_start() {
            panic!("the restored cluster {name} ({all:?}) did not start: {why}");
        }
        wait_for_promotion(&restored);
        restored
    }
}

fn wait_for_promotion(restored: &Cluster) {
    restored.wait_for_promotion(PROMOTE_WAIT);
}

fn phase_insert(n: u32) -> String {
    let first = n * 1000 + 1;
    let last = n * 1000 + 500;
    format!(
        "INSERT INTO items SELECT g, 'p{n}', md5(g::text) FROM generate_series({first}, {last}) g"
    )
}

/// Asserts that `output` is a refusal whose stderr contains every one of `needles`.
fn assert_refused(output: &Output, what: &str, needles: &[&str]) {
    let stderr = text(&output.stderr);
    assert!(
        !output.status.success(),
        "{what}: walkeep restore should have refused, but succeeded\n--- stdout\n{}\n\
         --- stderr\n{stderr}",
        text(&output.stdout)
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{what}: the refusal should mention {needle:?}\n--- stderr\n{stderr}"
        );
    }
}

fn assert_absent(dir: &Path, what: &str) {
    assert!(
        !dir.exists(),
        "{what}: a refused restore must not create its target directory, but {} exists",
        dir.display()
    );
}

/// A check to run on a thread of its own; it fails by panicking.
type Check<'a> = Box<dyn FnOnce() + Send + 'a>;

/// Runs each named check on a thread of its own and fails, after all have finished,
/// naming every check that panicked (each panic's message is already on stderr).
fn run_checks(checks: Vec<(&str, Check<'_>)>) {
    let failed: Vec<&str> = thread::scope(|scope| {
        let running: Vec<_> = checks
            .into_iter()
            .map(|(name, check)| (name, scope.spawn(check)))
            .collect();
        running
            .into_iter()
            .filter_map(|(name, handle)| handle.join().is_err().then_some(name))
            .collect()
    });
    assert!(
        failed.is_empty(),
        "failed checks (see their panics above): {}",
        failed.join(", ")
    );
}

// ---------------------------------------------------------------------------------------
// Recovery targets
// ---------------------------------------------------------------------------------------

/// One source, one backup, then phases of commits separated by a target of each kind;
/// every kind is restored into its own directory, in parallel, and must hold exactly the
/// rows committed before its target.
#[test]
fn recovery_stops_exactly_at_each_kind_of_target() {
    let scratch = Scratch::new();
    let source = Source::start(&scratch, "source");
    source.create_items();

    source.commit_phase(0);
    let at_backup = source.items_state();
    let backup = source.backup();

    source.commit_phase(1);
    let at_time = source.items_state();
    pause();
    let time = source.server_time();
    pause();

    source.commit_phase(2);
    let at_lsn = source.items_state();
    let lsn = source.cluster.psql("SELECT pg_current_wal_lsn()");

    source.commit_phase(3);
    let xid = source.cluster.psql(&format!(
        "BEGIN; {}; SELECT pg_current_xact_id(); COMMIT;",
        phase_insert(4)
    ));
    xid.parse::<u64>()
        .unwrap_or_else(|err| panic!("pg_current_xact_id() gave {xid:?}: {err}"));
    let at_xid = source.items_state();

    source.commit_phase(5);
    let at_name = source.items_state();
    run_ok(walkeep("mark", &source.repo).args(["-d", &source.cluster.conninfo(), "after-phase-5"]));

    // Past every target: commits for PostgreSQL to stop at, then all of it archived.
    source.commit_phase(6);
    source.switch_and_archive();

    let cases: [(&str, Vec<&str>, &str, &str); 5] = [
        ("immediate", vec!["--target", "immediate"], &at_backup, "p0"),
        ("time", vec!["--target-time", &time], &at_time, "p0,p1"),
        ("lsn", vec!["--target-lsn", &lsn], &at_lsn, "p0,p1,p2"),
        ("xid", vec!["--target-xid", &xid], &at_xid, "p0,p1,p2,p3,p4"),
        (
            "name",
            vec!["--target-name", "after-phase-5"],
            &at_name,
            "p0,p1,p2,p3,p4,p5",
        ),
    ];
    let checks = cases
        .into_iter()
        .map(|(kind, args, expected, phases)| {
            let (scratch, source, backup) = (&scratch, &source, &backup);
            let check = move || {
                let restored = source.restore_and_promote(scratch, &format!("to-{kind}"), &args);
                let state = restored.psql(ITEMS_STATE_SQL);
                assert!(
                    state.ends_with(&format!("phases {phases}")),
                    "PITR to {kind} {args:?} should keep phases {phases} and no later one; \
                     the restored cluster holds {state}"
                );
                assert_eq!(
                    state, expected,
                    "PITR to {kind} {args:?} must hold exactly the rows committed before \
                     the target (backup {})",
                    backup.id
                );
            };
            (kind, Box::new(check) as Check<'_>)
        })
        .collect();
    run_checks(checks);
}

// ---------------------------------------------------------------------------------------
// Which backup
// ---------------------------------------------------------------------------------------

/// Two backups: a target between the first's end and the second's start, and one inside
/// the second's window, must both be reached from the first; a target after the second's
/// end from the second; a target before the first's end from none.
#[test]
fn target_before_the_newest_backup_ends_is_reached_from_the_older_backup() {
    let scratch = Scratch::new();
    let source = Source::start(&scratch, "source");
    source.create_items();
    source.commit_phase(0);
    let first = source.backup();

    source.commit_phase(1);
    let between_state = source.items_state();
    pause();
    let between = source.server_time();
    next_second();

    let second = source.backup();
    source.commit_phase(2);
    let after_second = source.server_time();
    pause();
    source.commit_phase(3);
    source.switch_and_archive();

    let between_at = parse_target_time(&between);
    assert!(
        first.stop_time < between_at && between_at < second.start_time,
        "setup: {between} should lie between backup {} ending at {} and backup {} starting \
         at {}",
        first.id,
        first.stop_time,
        second.id,
        second.start_time
    );
    assert_ne!(first.id, second.id);

    let plan = source.plan(&["--target-time", &between]);
    assert_eq!(
        plan["backup_id"], first.id,
        "a target between the backups must be reached from the older one: {plan}"
    );

    let inside = inside_window(&second);
    let plan = source.plan(&["--target-time", &inside]);
    assert_eq!(
        plan["backup_id"], first.id,
        "a target inside the newest backup's window ({inside}) must be reached from the \
         older backup: {plan}"
    );

    let never = scratch.path().join("never-inside");
    let output = source.restore(&never, &["--target-time", &inside, "--backup", &second.id]);
    assert_refused(
        &output,
        "a target inside the pinned backup's window",
        &[&format!("inside backup {}'s window", second.id)],
    );
    assert_absent(&never, "a target inside the pinned backup's window");

    let plan = source.plan(&["--target-time", &after_second]);
    assert_eq!(
        plan["backup_id"], second.id,
        "a target after the newest backup's end must be reached from it: {plan}"
    );

    // Before the oldest backup's end: by time, and by LSN.
    let early = target_time(first.start_time - chrono::Duration::seconds(1));
    for (what, args) in [
        ("time before the oldest backup", ["--target-time", &early]),
        ("LSN before the oldest backup", ["--target-lsn", "0/100"]),
    ] {
        let never = scratch.path().join("never-early");
        let output = source.restore(&never, &args);
        assert_refused(
            &output,
            what,
            &[
                "no backup can reach",
                &format!("before the end of backup {}", first.id),
                &format!("before the end of backup {}", second.id),
            ],
        );
        assert_absent(&never, what);
    }

    // And the restore the planner chose really reaches the target.
    let restored = source.restore_and_promote(&scratch, "to-between", &["--target-time", &between]);
    assert_eq!(
        restored.psql(ITEMS_STATE_SQL),
        between_state,
        "restoring to {between} from backup {} must hold exactly the rows committed by then",
        first.id
    );
    let label = fs::read_to_string(restored.pgdata.join("backup_label.old")).unwrap_or_default();
    assert!(
        label.contains(&format!("LABEL: walkeep {}", first.id)),
        "the restored cluster should have recovered from backup {}; its backup label:\n{label}",
        first.id
    );
}

/// A target time strictly inside `backup`'s window: halfway between its start and stop.
fn inside_window(backup: &Backup) -> String {
    let half = (backup.stop_time - backup.start_time) / 2;
    assert!(
        half > chrono::Duration::zero(),
        "backup {} has an empty window",
        backup.id
    );
    target_time(backup.start_time + half)
}

// ---------------------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------------------

/// A time or an LSN beyond the archived WAL is refused before the target directory is
/// created, whether just past the last archived segment or far beyond.
#[test]
fn targets_past_the_end_of_the_archive_are_refused_up_front() {
    let scratch = Scratch::new();
    let source = Source::backed_up_then_one_phase(&scratch);

    // The position the server writes at now lies in a segment not archived yet.
    let current_lsn = source.cluster.psql("SELECT pg_current_wal_lsn()");
    let in_an_hour = source.cluster.psql(
        "SELECT to_char((clock_timestamp() + interval '1 hour') AT TIME ZONE 'UTC', \
         'YYYY-MM-DD HH24:MI:SS.US+00')",
    );
    let cases = [
        ("a time an hour ahead", ["--target-time", &in_an_hour]),
        ("the current LSN", ["--target-lsn", &current_lsn]),
        ("an LSN far ahead", ["--target-lsn", "FF/0"]),
    ];
    for (what, args) in cases {
        let to = scratch.path().join("never");
        let output = source.restore(&to, &args);
        assert_refused(&output, what, &["past the end of the archive"]);
        assert_absent(&to, what);
    }
}

/// Regression: the planner judges that the archive reaches a target time by when its last
/// segment was last written, but PostgreSQL stops at a target time only on reading a
/// commit after it, and ends recovery with FATAL ("recovery ended before configured
/// recovery target was reached") when the archive holds none, as on a quiet database.
///
/// Regression: walkeep then dropped the target and recovered to the end of the archive,
/// the same state as long as the archive stays as it was planned. But the source goes on
/// archiving while the copy replays: here the accident the operator restores to get away
/// from (every row deleted) reaches the repository after the restore and before the copy
/// starts, and a copy without a target replayed it. The target must hold, and the action
/// asked for must happen.
#[test]
fn time_target_with_no_later_commit_holds_when_later_wal_arrives() {
    let scratch = Scratch::new();
    let source = Source::start(&scratch, "source");
    // No autovacuum commit may land after the target by chance.
    source.cluster.psql("ALTER SYSTEM SET autovacuum = off");
    source.cluster.reload();
    source.create_items();
    source.commit_phase(0);
    source.backup();
    source.commit_phase(1);
    let expected = source.items_state();
    pause();
    let time = source.server_time();
    pause();
    // WAL written after the target, but no commit: a checkpoint and a switch.
    source.cluster.psql("CHECKPOINT");
    source.switch_and_archive();

    let to = scratch.path().join("restored");
    let output = source.restore(&to, &["--target-time", &time, "--target-action", "promote"]);
    assert!(
        output.status.success(),
        "walkeep restore refused --target-time {time}, after the archive's last commit:\n{}",
        text(&output.stderr)
    );
    source.cluster.psql("DELETE FROM items");
    source.switch_and_archive();

    let mut restored = Cluster::from_existing(&scratch, &to);
    restored.append_conf(&["archive_mode = off"]);
    if let Err(why) = restored.try_start() {
        panic!(
            "walkeep restore accepted --target-time {time}, after the archive's last commit, \
             and PostgreSQL could not reach it: {why}"
        );
    }
    wait_for_promotion(&restored);
    assert_eq!(
        restored.psql(ITEMS_STATE_SQL),
        expected,
        "the copy replayed WAL archived after its target time:\n{}",
        restored.log()
    );
}

/// A restored copy promoted with archiving on adds its timeline to the repository while
/// the source goes on along the old one. A later restore follows the newest timeline, as
/// PostgreSQL does, but must say that the old timeline went on past the branch and how to
/// follow it instead; --target-timeline 1 then plans to the old timeline's end.
#[test]
fn a_timeline_that_went_on_after_a_newer_one_branched_is_named_in_the_plan() {
    let scratch = Scratch::new();
    let source = Source::start(&scratch, "source");
    source.create_items();
    source.commit_phase(0);
    source.backup();
    source.commit_phase(1);
    source.switch_and_archive();

    let to = scratch.path().join("copy");
    let output = source.restore(&to, &["--target-action", "promote"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let mut copy = Cluster::from_existing(&scratch, &to);
    copy.start(); // archiving on, into the source's repository
    wait_for_promotion(&copy);
    let on_timeline_2 = copy.psql("SELECT pg_walfile_name(pg_switch_wal())");
    assert!(on_timeline_2.starts_with("00000002"), "{on_timeline_2}");
    copy.wait_archived(&on_timeline_2, ARCHIVE_WAIT);
    copy.stop();

    source.commit_phase(2);
    source.switch_and_archive();
    source.commit_phase(3);
    let last_on_timeline_1 = source.switch_and_archive();

    let plan = source.plan(&[]);
    assert_eq!(plan["timeline"], 2, "{plan:#}");
    let warnings = plan["warnings"].to_string();
    assert!(
        warnings.contains("timeline 1 went on")
            && warnings.contains(&last_on_timeline_1)
            && warnings.contains("--target-timeline 1"),
        "the plan along timeline 2 should warn that timeline 1 went on to \
         {last_on_timeline_1}: {plan:#}"
    );
    let plan = source.plan(&["--target-timeline", "1"]);
    assert_eq!(plan["timeline"], 1, "{plan:#}");
    assert!(
        !plan["warnings"].to_string().contains("went on"),
        "{plan:#}"
    );
}

/// A source whose repository lacks one WAL segment between its backup and the targets.
struct WalGap {
    source: Source,
    backup: Backup,
    /// The deleted segment.
    missing: String,
    /// A time and an LSN past the gap, with commits after them in the archive.
    time: String,
    lsn: String,
    /// A time before the gap, with a commit after it in the segment before the gap, and
    /// the rows as they were then.
    before_gap: (String, String),
}

impl WalGap {
    fn new(scratch: &Scratch) -> WalGap {
        let source = Source::start(scratch, "source");
        source.create_items();
        source.commit_phase(0);
        let backup = source.backup();

        let mut segments = Vec::new();
        let mut before_gap = (String::new(), String::new());
        for n in 1..=3 {
            if n == 1 {
                before_gap = (source.server_time(), source.items_state());
                pause();
            }
            source.commit_phase(n);
            segments.push(source.switch_and_archive());
        }
        let time = source.server_time();
        let lsn = source.cluster.psql("SELECT pg_current_wal_lsn()");
        pause();
        source.commit_phase(4);
        source.switch_and_archive();

        let missing = segments[1].clone();
        fs::remove_file(source.segment_object(&missing)).unwrap();
        WalGap {
            source,
            backup,
            missing,
            time,
            lsn,
            before_gap,
        }
    }

    /// Restores with `args` into a directory that must not appear; returns stderr.
    fn refused_restore(&self, scratch: &Scratch, what: &str, args: &[&str]) -> String {
        let to = scratch.path().join("never");
        let output = self.source.restore(&to, args);
        assert_refused(&output, what, &[]);
        assert_absent(&to, what);
        text(&output.stderr)
    }
}

/// Deleting one segment between the backup and the targets makes every restore past it
/// refuse before the target directory is created.
#[test]
fn missing_wal_segment_is_refused_before_the_target_dir_is_touched() {
    let scratch = Scratch::new();
    let gap = WalGap::new(&scratch);
    let (time, lsn, missing) = (&gap.time, &gap.lsn, &gap.missing);
    eprintln!(
        "deleted {missing}; backup {} ends at {}",
        gap.backup.id, gap.backup.stop_lsn
    );

    gap.refused_restore(&scratch, "a time past the gap", &["--target-time", time]);
    gap.refused_restore(
        &scratch,
        "a dry run to a time past the gap",
        &["--target-time", time, "--dry-run"],
    );

    // Where the refusal can name the segment, it must.
    for (what, args) in [
        ("an LSN past the gap", vec!["--target-lsn", lsn.as_str()]),
        ("the end of the archive", vec![]),
    ] {
        let stderr = gap.refused_restore(&scratch, what, &args);
        assert!(
            stderr.contains(missing.as_str()),
            "{what}: the refusal should name the missing segment {missing}\n{stderr}"
        );
    }
}

/// Regression: over a gap, a time target is refused as "past the end of the archive", with
/// advice to switch WAL, and the deleted segment goes unnamed (the LSN refusal names it).
#[test]
fn time_target_past_a_wal_gap_is_refused_naming_the_missing_segment() {
    let scratch = Scratch::new();
    let gap = WalGap::new(&scratch);
    let missing = &gap.missing;
    let stderr = gap.refused_restore(
        &scratch,
        "a time past the gap",
        &["--target-time", &gap.time],
    );
    assert!(
        stderr.contains(missing.as_str()),
        "a time target past a gap should be refused naming the missing segment {missing}\n\
         {stderr}"
    );
}

/// A gap after the target is no obstacle: replay stops at the first commit after the
/// target time, which lies in the WAL before the gap.
#[test]
fn time_target_before_a_wal_gap_is_reached() {
    let scratch = Scratch::new();
    let gap = WalGap::new(&scratch);
    let (time, expected) = &gap.before_gap;
    let to = scratch.path().join("restored");
    let output = gap
        .source
        .restore(&to, &["--target-time", time, "--target-action", "promote"]);
    assert!(
        output.status.success(),
        "a time before the missing segment {} should be restorable\n{}",
        gap.missing,
        text(&output.stderr)
    );
    let mut restored = Cluster::from_existing(&scratch, &to);
    restored.append_conf(&["archive_mode = off"]);
    restored.start();
    wait_for_promotion(&restored);
    assert_eq!(&restored.psql(ITEMS_STATE_SQL), expected);
}

/// Regression: a window that ends at the backup's own last segment was shown ending
/// before it began, that segment having been last written moments before the backup's
/// stop time was read.
#[test]
fn a_recovery_window_never_ends_before_it_begins() {
    let scratch = Scratch::new();
    let source = Source::start(&scratch, "source");
    source.create_items();
    let backup = source.backup();

    let output = run_ok(walkeep("info", &source.repo).arg("--json"));
    let info: Value = serde_json::from_slice(&output.stdout).unwrap();
    let windows = info["recovery_windows"].as_array().unwrap();
    assert_eq!(windows.len(), 1, "{info:#}");
    let time = |name: &str| {
        windows[0][name]
            .as_str()
            .unwrap_or_else(|| panic!("window has no {name}: {info:#}"))
            .parse::<DateTime<Utc>>()
            .unwrap()
    };
    assert_eq!(time("earliest_time"), backup.stop_time, "{info:#}");
    assert!(time("latest_time") >= time("earliest_time"), "{info:#}");
}

/// A gap after the older backup's end and before the newer backup's start leaves two
/// recovery windows; `info` must not join them into one that promises the moments between.
#[test]
fn info_lists_two_windows_where_a_gap_parts_two_backups() {
    let scratch = Scratch::new();
    let gap = WalGap::new(&scratch);
    next_second();
    let newer = gap.source.backup();
    gap.source.commit_phase(5);
    gap.source.switch_and_archive();

    let output = run_ok(walkeep("info", &gap.source.repo).arg("--json"));
    let json: Value = serde_json::from_slice(&output.stdout).unwrap();
    let windows = json["recovery_windows"].as_array().unwrap();
    assert_eq!(windows.len(), 2, "{json:#}");
    // 16 MiB segments: the log and segment parts of the name give the start position.
    let log = u64::from_str_radix(&gap.missing[8..16], 16).unwrap();
    let seg = u64::from_str_radix(&gap.missing[16..24], 16).unwrap();
    let gap_start = format!("{log:X}/{:X}", seg << 24);
    assert_eq!(windows[0]["backup_id"], gap.backup.id.as_str(), "{json:#}");
    assert_eq!(windows[0]["latest_lsn"], gap_start.as_str(), "{json:#}");
    assert_eq!(windows[1]["backup_id"], newer.id.as_str(), "{json:#}");
    assert_eq!(
        windows[1]["earliest_lsn"],
        newer.stop_lsn.as_str(),
        "{json:#}"
    );
}

/// A restore killed before it completes leaves a directory PostgreSQL refuses to start
/// (pg_control comes last), which a second restore refuses to overwrite unless forced, and
/// then completes.
#[test]
fn killed_restore_leaves_a_directory_postgresql_refuses_to_start() {
    let scratch = Scratch::new();
    let source = Source::backed_up_then_one_phase(&scratch);
    let expected = source.items_state();

    let to = scratch.path().join("restored");
    let mut child = walkeep("restore", &source.repo)
        .arg("--to")
        .arg(&to)
        .args(["--target-action", "promote"])
        .env("WALKEEP_TEST_FAULT", "stall-before-control")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    // The riskiest moment: every file but pg_control in place, the backup label, the
    // recovery settings and the signal file written.
    while !to.join("recovery.signal").exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the restore ended early"
        );
        assert!(
            Instant::now() < deadline,
            "the restore never wrote its signal file"
        );
        thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(to.join("backup_label").exists() && to.join("base").is_dir());
    assert!(!to.join("global/pg_control").exists());

    let mut half = Cluster::from_existing(&scratch, &to);
    let refused = half.try_start();
    assert!(
        refused.is_err(),
        "PostgreSQL started a half-restored directory"
    );
    drop(half);

    let output = source.restore(&to, &["--target-action", "promote"]);
    assert_refused(&output, "a restore over the killed one", &["--force"]);
    let output = source.restore(&to, &["--target-action", "promote", "--force"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let mut restored = Cluster::from_existing(&scratch, &to);
    restored.append_conf(&["archive_mode = off"]);
    restored.start();
    wait_for_promotion(&restored);
    assert_eq!(restored.psql(ITEMS_STATE_SQL), expected);
}

/// A bare local time means different instants on different machines.
#[test]
fn bare_local_target_time_is_refused_with_a_hint_about_the_offset() {
    let scratch = Scratch::new();
    let cluster = Cluster::init(&scratch, "source", InitOptions::default());
    let repo = scratch.path().join("repo");
    run_ok(walkeep("init", &repo).arg("--pgdata").arg(&cluster.pgdata));

    let to = scratch.path().join("never");
    let output = run(walkeep("restore", &repo)
        .arg("--to")
        .arg(&to)
        .args(["--target-time", "2026-12-03 17:55:00"]));
    assert_refused(&output, "a bare local time", &["offset"]);
    assert_absent(&to, "a bare local time");
}

/// Restoring into a non-empty directory is refused and leaves it alone; `--force`
/// empties it first.
#[test]
fn non_empty_target_dir_is_refused_without_force() {
    let scratch = Scratch::new();
    let source = Source::start(&scratch, "source");
    source.backup();

    let to = scratch.dir("occupied");
    let stray = to.join("precious.txt");
    fs::write(&stray, "keep me").unwrap();
    let output = source.restore(&to, &["--target", "immediate"]);
    assert_refused(&output, "a non-empty target dir", &["not empty", "--force"]);
    assert_eq!(
        fs::read_to_string(&stray).unwrap(),
        "keep me",
        "a refused restore must leave the target directory alone"
    );

    let output = source.restore(&to, &["--target", "immediate", "--force"]);
    assert!(
        output.status.success(),
        "restore --force into a non-empty dir failed\n{}",
        text(&output.stderr)
    );
    assert!(
        !stray.exists(),
        "--force should have emptied the directory first"
    );
    assert!(to.join("PG_VERSION").is_file() && to.join("recovery.signal").is_file());
}

// ---------------------------------------------------------------------------------------
// A restored cluster is sound
// ---------------------------------------------------------------------------------------

/// The balances and the history pgbench wrote: equal before and after a restore if and
/// only if the same transactions committed.
const PGBENCH_STATE_SQL: &str = "SELECT (SELECT sum(abalance) FROM pgbench_accounts) || ' / ' \
     || (SELECT count(*) || ' ' || coalesce(md5(string_agg( \
             tid || ':' || bid || ':' || aid || ':' || delta || ':' || mtime, ',' \
             ORDER BY mtime, tid, bid, aid, delta)), '-') \
         FROM pgbench_history)";

/// A cluster restored to a moment amid pgbench traffic replays to consistency, holds
/// exactly the transactions committed by then, and its tables and indexes pass amcheck.
#[test]
fn restored_cluster_reaches_consistency_and_passes_amcheck() {
    let scratch = Scratch::new();
    let source = Source::start(&scratch, "source");
    let db = &source.cluster;
    db.pgbench(&["-i", "-s", "2", "-q"]);
    source.backup();

    db.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "300"]);
    let expected = db.psql(PGBENCH_STATE_SQL);
    pause();
    let time = source.server_time();
    pause();
    db.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "100"]);
    source.switch_and_archive();
    assert_ne!(
        db.psql(PGBENCH_STATE_SQL),
        expected,
        "setup: traffic after the target"
    );

    let restored = source.restore_and_promote(&scratch, "restored", &["--target-time", &time]);
    assert!(
        restored.log().contains("consistent recovery state reached"),
        "the restored cluster never reported consistency\n{}",
        restored.log_tail(30)
    );
    assert_eq!(
        restored.psql(PGBENCH_STATE_SQL),
        expected,
        "the restored cluster must hold exactly the pgbench transactions committed by {time}"
    );

    restored.psql("CREATE EXTENSION amcheck");
    let port = restored.port.to_string();
    let mut amcheck = pg_command("pg_amcheck");
    amcheck
        .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
        .args([
            "--heapallindexed",
            "--verbose",
            "--table",
            "public.pgbench_*",
        ])
        .arg("postgres");
    let output = run(as_cluster_user(&mut amcheck));
    let stdout = text(&output.stdout);
    let stderr = text(&output.stderr);
    assert!(
        output.status.success() && stdout.trim().is_empty(),
        "pg_amcheck found problems in the restored cluster ({})\n--- stdout\n{stdout}\n\
         --- stderr\n{stderr}",
        output.status
    );
    for table in ["pgbench_accounts", "pgbench_branches", "pgbench_tellers"] {
        assert!(
            stderr.contains(table),
            "pg_amcheck --verbose does not mention {table}: did it check it?\n{stderr}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// An interrupted backup
// ---------------------------------------------------------------------------------------

/// Names of the regular files below `dir` whose names do not start with a dot (the
/// repository's temporary files do), relative to `dir`.
fn visible_files(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let child = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                walk(&entry.path(), &child, out);
            } else if kind.is_file() && !name.starts_with('.') {
                out.push(child);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out);
    out.sort();
    out
}

fn subdirectories(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn info_backup_ids(repo: &Path) -> Vec<String> {
    let output = run_ok(walkeep("info", repo).arg("--json"));
    let json: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "walkeep info --json printed no JSON ({err}):\n{}",
            text(&output.stdout)
        )
    });
    json["backups"]
        .as_array()
        .unwrap_or_else(|| panic!("walkeep info --json has no backups array: {json}"))
        .iter()
        .map(|b| b["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Starts `walkeep backup` on a pgbench database and SIGKILLs it once it has stored a
/// file and before it publishes a manifest. Returns the source and the killed backup's id.
fn kill_backup_mid_copy(scratch: &Scratch) -> (Source, String) {
    let source = Source::start(scratch, "source");
    source.cluster.pgbench(&["-i", "-s", "2", "-q"]);

    // One worker at the slowest level: seconds of copying to be killed in.
    let stderr_path = scratch.path().join("killed-backup.stderr");
    let stderr_file = fs::File::create(&stderr_path).unwrap();
    let mut backup = walkeep("backup", &source.repo);
    backup
        .arg("--pgdata")
        .arg(&source.cluster.pgdata)
        .args(["-d", &source.cluster.conninfo()])
        .args(["--jobs", "1", "--compress-level", "19"])
        .stdout(Stdio::null())
        .stderr(stderr_file);
    let mut child = backup.spawn().expect("failed to start walkeep backup");

    let backups_dir = source.repo.join("backups");
    let manifests_dir = source.repo.join("manifests");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "walkeep backup ended ({status}) before it could be killed mid-copy\n{}",
                fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        if !visible_files(&backups_dir).is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "walkeep backup stored no file within a minute"
        );
        thread::sleep(Duration::from_millis(10));
    }
    assert!(
        visible_files(&manifests_dir).is_empty(),
        "setup: the backup was published before it could be killed"
    );
    child.kill().unwrap();
    child.wait().unwrap();

    let killed = subdirectories(&backups_dir);
    assert_eq!(
        killed.len(),
        1,
        "one interrupted backup expected: {killed:?}"
    );
    let killed = killed[0].clone();
    assert!(
        !visible_files(&backups_dir.join(&killed)).is_empty(),
        "setup: the killed backup stored no file"
    );
    (source, killed)
}

/// SIGKILL while files are being copied: nothing becomes visible, and the next backup
/// succeeds and removes every object the killed one stored.
#[test]
fn killed_backup_stays_invisible_and_the_next_backup_removes_its_files() {
    let scratch = Scratch::new();
    let (source, killed) = kill_backup_mid_copy(&scratch);
    let manifests_dir = source.repo.join("manifests");
    let backups_dir = source.repo.join("backups");

    assert!(
        visible_files(&manifests_dir).is_empty(),
        "a killed backup must publish no manifest: {:?}",
        visible_files(&manifests_dir)
    );
    assert_eq!(
        info_backup_ids(&source.repo),
        Vec::<String>::new(),
        "walkeep info must not list the killed backup {killed}"
    );
    let output = run(walkeep("restore", &source.repo)
        .arg("--to")
        .arg(scratch.path().join("never"))
        .args(["--target", "immediate", "--dry-run"]));
    assert_refused(
        &output,
        "a restore with only a killed backup",
        &["no complete backup"],
    );

    next_second();
    let next = source.backup();
    assert_ne!(next.id, killed);
    assert_eq!(
        info_backup_ids(&source.repo),
        vec![next.id.clone()],
        "after the next backup, walkeep info must list it alone"
    );
    let left = visible_files(&backups_dir.join(&killed));
    assert!(
        left.is_empty(),
        "the next backup must remove the files of interrupted backup {killed}; left: {left:?}"
    );
    let plan = source.plan(&["--target", "immediate"]);
    assert_eq!(plan["backup_id"], next.id, "{plan}");
}

/// Regression: the next backup deletes the killed backup's objects but leaves `backups/<id>/`
/// behind: its directory tree, and the temporary file of the copy in flight at the kill.
#[test]
fn next_backup_leaves_nothing_of_a_killed_backup() {
    let scratch = Scratch::new();
    let (source, killed) = kill_backup_mid_copy(&scratch);
    next_second();
    let next = source.backup();

    let backups_dir = source.repo.join("backups");
    let left = all_entries(&backups_dir.join(&killed));
    assert!(
        !backups_dir.join(&killed).exists(),
        "the next backup ({}) must remove interrupted backup {killed} entirely, but \
         backups/{killed} is still there, holding {left:?}",
        next.id
    );
    assert_eq!(subdirectories(&backups_dir), vec![next.id]);
}

/// `walkeep backup` copies the directory named by `--pgdata`, so that directory must be the
/// server's: another cluster's, or no data directory at all, is refused before anything is
/// written to the repository.
#[test]
fn backup_refuses_a_pgdata_that_is_not_the_servers() {
    let scratch = Scratch::new();
    let source = Source::start(&scratch, "source");
    let other = Cluster::init(&scratch, "other", InitOptions::default());
    let not_data = scratch.dir("not-a-data-directory");
    // Lock files aside, which any command may create.
    let content = || -> Vec<String> {
        let mut entries = all_entries(&source.repo);
        entries.retain(|e| !e.starts_with("locks/"));
        entries
    };
    let before = content();

    for (pgdata, needle) in [(&other.pgdata, "holds system"), (&not_data, "--pgdata")] {
        let output = run(walkeep("backup", &source.repo)
            .arg("--pgdata")
            .arg(pgdata)
            .args(["-d", &source.cluster.conninfo()]));
        let stderr = text(&output.stderr);
        assert!(
            !output.status.success(),
            "backup of {} succeeded",
            pgdata.display()
        );
        assert!(stderr.contains(needle), "{stderr}");
        assert_eq!(content(), before, "{}", pgdata.display());
    }
}

/// Every entry below `dir`, directories and dot files included, relative to `dir`.
fn all_entries(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let child = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                out.push(format!("{child}/"));
                walk(&entry.path(), &child, out);
            } else {
                out.push(child);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out);
    out.sort();
    out
}

/// A copy restored but not started yet has no WAL in pg_wal, yet belongs to the
/// repository: `walkeep init` on it (as an installer does) must see that and change nothing.
/// A standby restore follows the latest timeline; `info` lists `walkeep mark` points.
#[test]
fn restored_copy_standby_settings_and_listed_restore_points() {
    let scratch = Scratch::new();
    let source = Source::start(&scratch, "source");
    source.backup();
    run_ok(walkeep("mark", &source.repo).args([
        "-d",
        &source.cluster.conninfo(),
        "--switch-wal",
        "before-release",
    ]));

    let to = scratch.path().join("standby");
    let output = source.restore(&to, &["--standby"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(to.join("standby.signal").is_file());
    let conf = fs::read_to_string(to.join("postgresql.auto.conf")).unwrap();
    assert!(
        conf.contains("recovery_target_timeline = 'latest'"),
        "{conf}"
    );

    let identity = fs::read(source.repo.join("repository.json")).unwrap();
    let output = run(walkeep("init", &source.repo).arg("--pgdata").arg(&to));
    assert!(
        output.status.success(),
        "init on a restored copy: {}",
        text(&output.stderr)
    );
    assert!(
        text(&output.stdout).contains("already initialised"),
        "{}",
        text(&output.stdout)
    );
    assert_eq!(
        fs::read(source.repo.join("repository.json")).unwrap(),
        identity
    );

    let info = run_ok(walkeep("info", &source.repo).arg("--json"));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let names: Vec<&str> = info["restore_points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["before-release"]);
}

/// A tablespace outside the data directory is backed up and restored, into a new place
/// with `--tablespace-mapping`, and its rows are back after recovery.
#[test]
fn tablespace_is_restored_where_the_mapping_says() {
    let scratch = Scratch::new();
    let source = Source::start(&scratch, "source");
    let original = scratch.dir("tablespace");
    source.cluster.psql(&format!(
        "CREATE TABLESPACE extra LOCATION '{}'",
        original.display()
    ));
    source.cluster.psql(
        "CREATE TABLE far (n int) TABLESPACE extra; \
         INSERT INTO far SELECT generate_series(1, 5000)",
    );
    source.backup();
    source
        .cluster
        .psql("INSERT INTO far SELECT generate_series(5001, 6000)");
    source.switch_and_archive();

    let moved = scratch.dir("tablespace-moved");
    let to = scratch.path().join("restored");
    let mapping = format!("{}={}", original.display(), moved.display());
    let output = source.restore(
        &to,
        &[
            "--target-action",
            "promote",
            "--tablespace-mapping",
            &mapping,
        ],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let map = fs::read_to_string(to.join("tablespace_map")).unwrap();
    assert!(
        map.contains(&*moved.to_string_lossy()),
        "tablespace_map: {map}"
    );

    let mut restored = Cluster::from_existing(&scratch, &to);
    restored.append_conf(&["archive_mode = off"]);
    restored.start();
    wait_for_promotion(&restored);
    assert_eq!(
        restored.psql("SELECT count(*), sum(n) FROM far"),
        "6000|18003000"
    );
    let location = restored
        .psql("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'extra'");
    assert_eq!(location, moved.to_string_lossy());
}
