//! The repository in S3-compatible object storage, against a real server on loopback
//! (SeaweedFS, see `common/s3.rs`): the same archive and restore contract as a local
//! directory, the race between two archivers decided by the store's conditional create,
//! a server that dies mid-archive, and a whole point-in-time recovery.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::s3::S3Server;
use common::{
    bin, expect_status, fix_ownership, run, run_ok, stderr_text, walkeep_command, Cluster,
    InitOptions, Scratch,
};
use walkeep::storage::{Commit, Committed, Storage};

const RESTORE_FATAL: i32 = 200;

/// A prefix no other test uses.
fn prefix(test: &str) -> String {
    format!("{test}-{}", std::process::id())
}

/// A walkeep binary run as the cluster user; the configuration file names the repository
/// and the server.
fn walkeep(name: &str, config: &Path) -> Command {
    walkeep_command(name, config)
}

/// Asserts that an archive call failed as PostgreSQL retries it: a status of 1 to 125,
/// not death by a signal.
fn expect_archive_failure(output: &Output, what: &str) {
    let status = output.status.code();
    assert!(
        status.is_some_and(|s| (1..=125).contains(&s)),
        "{what}: {:?}\n{}",
        output.status,
        stderr(output)
    );
}

fn stderr(output: &Output) -> String {
    stderr_text(output)
}

fn read_object(storage: &dyn Storage, key: &str) -> Option<Vec<u8>> {
    storage.open(key).unwrap().map(|mut r| {
        let mut bytes = Vec::new();
        r.read_to_end(&mut bytes).unwrap();
        bytes
    })
}

fn put_object(storage: &dyn Storage, key: &str, bytes: &[u8]) {
    let mut w = storage.create(key, Commit::Replace).unwrap();
    w.write_all(bytes).unwrap();
    w.commit().unwrap();
}

fn segment_key(name: &str) -> String {
    format!("wal/{}/{name}.zst", &name[..16])
}

/// Real segments from a throw-away cluster with 1 MiB segments, plus a stand-in data
/// directory (what `walkeep init` reads) for that cluster.
struct Fixture {
    _scratch: Scratch,
    pgdata: PathBuf,
    segments: Vec<(String, Vec<u8>)>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let scratch = Scratch::new();
        let options = InitOptions::default()
            .with_wal_segsize_mb(1)
            .with_conf("wal_keep_size = '64MB'");
        let mut cluster = Cluster::init(&scratch, "fixture", options);
        cluster.start();
        cluster.psql("CREATE TABLE marks (n int)");
        let mut segments = Vec::new();
        for n in 0..3 {
            let name = cluster.psql(&format!(
                "INSERT INTO marks SELECT generate_series(1, 3000) + {n};
                 SELECT pg_walfile_name(pg_switch_wal());"
            ));
            let bytes = fs::read(cluster.pgdata.join("pg_wal").join(&name)).unwrap();
            segments.push((name, bytes));
        }
        cluster.stop();
        let pgdata = cluster.pgdata.clone();
        std::mem::forget(cluster);
        Fixture {
            _scratch: scratch,
            pgdata,
            segments,
        }
    })
}

/// Makes a repository at a fresh prefix; returns its config file.
fn init_repo(server: &S3Server, scratch: &Scratch, test: &str) -> PathBuf {
    let config = scratch.dir("etc").join("walkeep.toml");
    server.write_config(&config, &prefix(test));
    let mut init = walkeep("walkeep", &config);
    init.args(["init", "--pgdata"]).arg(&fixture().pgdata);
    run_ok(&mut init);
    config
}

fn offer(scratch: &Scratch, name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch.dir("pg_wal").join(name);
    fs::write(&path, bytes).unwrap();
    fix_ownership(&path);
    path
}

fn archive(config: &Path, path: &Path, name: &str) -> Output {
    run(walkeep("walkeep-archive", config).arg(path).arg(name))
}

fn restore(config: &Path, name: &str, dest: &Path) -> Output {
    run(walkeep("walkeep-restore", config).arg(name).arg(dest))
}

#[test]
fn conditional_create_lets_exactly_one_of_two_writers_win() {
    let Some(server) = S3Server::shared() else {
        return;
    };
    let storage = server.storage(&prefix("conditional"));
    let mut first = storage.create("wal/x/seg.zst", Commit::IfAbsent).unwrap();
    let mut second = storage.create("wal/x/seg.zst", Commit::IfAbsent).unwrap();
    first.write_all(b"first").unwrap();
    second.write_all(b"second").unwrap();
    assert_eq!(first.commit().unwrap(), Committed::Created);
    assert_eq!(second.commit().unwrap(), Committed::AlreadyExists);
    assert_eq!(read_object(&storage, "wal/x/seg.zst").unwrap(), b"first");
}

/// Takers of one lock, each with a client of its own, never hold it exclusively at the same
/// time, and shared holders exclude an exclusive one.
#[test]
fn lock_leases_never_let_two_conflicting_holders_in() {
    use std::sync::atomic::{AtomicI32, Ordering};
    use std::sync::Arc;
    let Some(server) = S3Server::shared() else {
        return;
    };
    let prefix = prefix("lock");
    // Positive: shared holders; -1: one exclusive holder.
    let state = Arc::new(AtomicI32::new(0));
    let overlaps = Arc::new(AtomicI32::new(0));
    let takers: Vec<_> = (0..4)
        .map(|i| {
            let storage = server.storage(&prefix);
            let (state, overlaps) = (state.clone(), overlaps.clone());
            std::thread::spawn(move || {
                let exclusive = i % 2 == 0;
                for _ in 0..3 {
                    let _guard = storage.lock("expire", exclusive).unwrap();
                    let entered = if exclusive {
                        state.compare_exchange(0, -1, Ordering::SeqCst, Ordering::SeqCst)
                    } else {
                        state.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                            (n >= 0).then_some(n + 1)
                        })
                    };
                    if entered.is_err() {
                        overlaps.fetch_add(1, Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    if entered.is_ok() {
                        let back = if exclusive { 1 } else { -1 };
                        state.fetch_add(back, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for taker in takers {
        taker.join().unwrap();
    }
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "conflicting holders overlapped"
    );
    assert_eq!(state.load(Ordering::SeqCst), 0);
    // Every lease was withdrawn or released.
    let storage = server.storage(&prefix);
    let leases = storage.list_children("locks/expire/").unwrap();
    assert!(leases.is_empty(), "leases left behind: {leases:?}");
}

#[test]
fn abandoned_multipart_upload_leaves_nothing_visible() {
    let Some(server) = S3Server::shared() else {
        return;
    };
    let storage = server.storage(&prefix("multipart"));
    let mut writer = storage
        .create("backups/b/data/big.zst", Commit::Replace)
        .unwrap();
    // Large enough to start a multipart upload (parts of 8 MiB).
    writer.write_all(&vec![7u8; 20 << 20]).unwrap();
    drop(writer);
    assert_eq!(storage.size("backups/b/data/big.zst").unwrap(), None);
    assert!(storage.list("backups/").unwrap().is_empty());

    // The same, committed, is complete and byte-identical.
    let content: Vec<u8> = (0..(20u32 << 20)).map(|i| (i % 251) as u8).collect();
    let mut writer = storage
        .create("backups/b/data/big.zst", Commit::Replace)
        .unwrap();
    for piece in content.chunks(1 << 20) {
        writer.write_all(piece).unwrap();
    }
    writer.commit().unwrap();
    assert!(read_object(&storage, "backups/b/data/big.zst").unwrap() == content);
}

#[test]
fn record_logs_keep_every_append_across_rewrites() {
    let Some(server) = S3Server::shared() else {
        return;
    };
    let storage = server.storage(&prefix("records"));
    for i in 0..5 {
        storage
            .append_record("catalog/wal.jsonl", format!("{{\"n\":{i}}}").as_bytes())
            .unwrap();
    }
    storage
        .rewrite_records("catalog/wal.jsonl", &mut |all| {
            Ok(all.into_iter().skip(2).collect())
        })
        .unwrap();
    storage
        .append_record("catalog/wal.jsonl", b"{\"n\":5}")
        .unwrap();
    let records: Vec<String> = storage
        .read_records("catalog/wal.jsonl")
        .unwrap()
        .into_iter()
        .map(|r| String::from_utf8(r).unwrap())
        .collect();
    assert_eq!(
        records,
        ["{\"n\":2}", "{\"n\":3}", "{\"n\":4}", "{\"n\":5}"]
    );
    // The bookkeeping objects are not listed as repository content.
    assert_eq!(
        storage
            .list("catalog/")
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect::<Vec<_>>(),
        ["catalog/wal.jsonl"]
    );
}

#[test]
fn archive_and_restore_keep_the_contract_on_s3() {
    let Some(server) = S3Server::shared() else {
        return;
    };
    let fx = fixture();
    let scratch = Scratch::new();
    let config = init_repo(server, &scratch, "contract");
    let storage = server.storage(&prefix("contract"));

    // Every segment goes in and comes back byte-identical.
    for (name, bytes) in &fx.segments {
        let path = offer(&scratch, name, bytes);
        expect_status(&archive(&config, &path, name), 0, "archive");
        let dest = scratch.dir("restored").join(name);
        expect_status(&restore(&config, name, &dest), 0, "restore");
        assert!(
            fs::read(&dest).unwrap() == *bytes,
            "{name} came back different"
        );
    }

    // Identical bytes again: success, object untouched.
    let (name, bytes) = &fx.segments[0];
    let key = segment_key(name);
    let stored = read_object(&storage, &key).unwrap();
    let path = offer(&scratch, name, bytes);
    expect_status(&archive(&config, &path, name), 0, "identical re-archive");
    assert_eq!(read_object(&storage, &key).unwrap(), stored);

    // Different bytes under the same name: refused, stored copy untouched.
    let mut other = bytes.clone();
    other[bytes.len() - 100] ^= 0x01;
    let path = offer(&scratch, name, &other);
    let output = archive(&config, &path, name);
    expect_status(&output, 1, "different content");
    assert!(
        stderr(&output).contains("different content"),
        "{}",
        stderr(&output)
    );
    assert_eq!(read_object(&storage, &key).unwrap(), stored);

    // A corrupt object is fatal, never "absent", and leaves nothing at the destination.
    let (name, _) = &fx.segments[1];
    let key = segment_key(name);
    let mut damaged = read_object(&storage, &key).unwrap();
    let middle = damaged.len() / 3;
    damaged[middle] ^= 0x40;
    put_object(&storage, &key, &damaged);
    let dir = scratch.dir("corrupt");
    let dest = dir.join("RECOVERYXLOG");
    expect_status(
        &restore(&config, name, &dest),
        RESTORE_FATAL,
        "corrupt object",
    );
    assert!(
        fs::read_dir(&dir).unwrap().next().is_none(),
        "restore left files behind"
    );

    // Missing segment and history file: exit 1, quickly, and nothing written.
    for missing in ["0000000100000000000000F0", "00000005.history"] {
        let dest = scratch.dir("missing").join("RECOVERYXLOG");
        let began = Instant::now();
        let output = restore(&config, missing, &dest);
        expect_status(&output, 1, missing);
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "{missing}: {:?}",
            began.elapsed()
        );
        assert!(!dest.exists());
        assert!(!stderr(&output).contains("ERROR"), "{}", stderr(&output));
    }
}

#[test]
fn racing_archivers_store_one_object_on_s3() {
    let Some(server) = S3Server::shared() else {
        return;
    };
    let fx = fixture();
    for round in 0..4 {
        let scratch = Scratch::new();
        let config = init_repo(server, &scratch, &format!("race{round}"));
        let (name, bytes) = &fx.segments[round % fx.segments.len()];
        let path = offer(&scratch, name, bytes);
        let children: Vec<_> = (0..2)
            .map(|_| {
                walkeep("walkeep-archive", &config)
                    .arg(&path)
                    .arg(name)
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            let output = child.wait_with_output().unwrap();
            expect_status(&output, 0, &format!("round {round}"));
        }
        let storage = server.storage(&prefix(&format!("race{round}")));
        let objects: Vec<String> = storage
            .list("wal/")
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(objects, [segment_key(name)], "round {round}");
        let dest = scratch.dir("restored").join(name);
        expect_status(&restore(&config, name, &dest), 0, "restore");
        assert!(fs::read(&dest).unwrap() == *bytes);
    }
}

#[test]
fn server_stopped_mid_archive_fails_and_the_retry_succeeds() {
    let Some(mut server) = S3Server::start() else {
        return;
    };
    let fx = fixture();
    let scratch = Scratch::new();
    let config = init_repo(&server, &scratch, "stopped");
    let (name, bytes) = &fx.segments[0];
    let path = offer(&scratch, name, bytes);

    // The archiver has compressed the segment and pauses before the upload; the server
    // dies meanwhile.
    let child = walkeep("walkeep-archive", &config)
        .env("WALKEEP_TEST_FAULT", "stall-before-commit:3")
        .arg(&path)
        .arg(name)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    server.stop();
    let output = child.wait_with_output().unwrap();
    expect_archive_failure(&output, "archive with the server stopped");

    // An unreachable repository is not an absent file: recovery must stop, not promote.
    let dest = scratch.dir("while-down").join(name);
    let began = Instant::now();
    let output = restore(&config, name, &dest);
    expect_status(&output, RESTORE_FATAL, "restore with the server down");
    assert!(!dest.exists());
    assert!(
        began.elapsed() < Duration::from_secs(60),
        "the retries are not bounded: {:?}",
        began.elapsed()
    );

    server.restart();
    let storage = server.storage(&prefix("stopped"));
    assert_eq!(
        storage.size(&segment_key(name)).unwrap(),
        None,
        "a partial object is visible"
    );
    expect_status(&archive(&config, &path, name), 0, "retry after restart");
    let dest = scratch.dir("restored").join(name);
    expect_status(&restore(&config, name, &dest), 0, "restore");
    assert!(fs::read(&dest).unwrap() == *bytes);

    // Credentials the server refuses fail loudly, and never read as "absent".
    let wrong = scratch.path().join("wrong-secret.toml");
    let text = fs::read_to_string(&config).unwrap();
    fs::write(
        &wrong,
        text.replace(common::s3::SECRET_KEY, "not-the-secret"),
    )
    .unwrap();
    fix_ownership(&wrong);
    let dest = scratch.dir("refused").join(name);
    let output = restore(&wrong, name, &dest);
    expect_status(&output, RESTORE_FATAL, "restore with a wrong secret key");
    assert!(!dest.exists());
    assert!(
        !stderr(&output).contains("not-the-secret"),
        "a credential was logged"
    );
    expect_archive_failure(
        &archive(&wrong, &path, name),
        "archive with a wrong secret key",
    );
}

#[test]
fn point_in_time_recovery_with_the_repository_in_s3() {
    let Some(server) = S3Server::shared() else {
        return;
    };
    let scratch = Scratch::new();
    let config = scratch.dir("etc").join("walkeep.toml");
    server.write_config(&config, &prefix("pitr"));
    let archive_command = format!(
        "archive_command = '{} --config {} %p %f'",
        bin("walkeep-archive").display(),
        config.display()
    );
    let options = InitOptions::default()
        .with_conf("wal_level = replica")
        .with_conf("archive_mode = on")
        .with_conf(archive_command);
    let mut cluster = Cluster::init(&scratch, "source", options);
    let mut init = walkeep("walkeep", &config);
    init.args(["init", "--pgdata"]).arg(&cluster.pgdata);
    run_ok(&mut init);
    cluster.start();

    cluster.pgbench(&["-i", "-s", "1", "-q"]);
    let mut backup = walkeep("walkeep", &config);
    backup
        .args(["backup", "--pgdata"])
        .arg(&cluster.pgdata)
        .args(["-d", &cluster.conninfo()]);
    run_ok(&mut backup);

    cluster.psql(
        "CREATE TABLE orders AS SELECT g AS id, md5(g::text) AS note \
         FROM generate_series(1, 2000) g",
    );
    let good = cluster.psql("SELECT count(*), md5(string_agg(note, ',' ORDER BY id)) FROM orders");
    let target = cluster.psql(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US+00')",
    );
    std::thread::sleep(Duration::from_millis(200));
    cluster.psql("DROP TABLE orders");
    cluster.psql("CREATE TABLE after_disaster (n int); INSERT INTO after_disaster VALUES (1)");
    let last = cluster.psql("SELECT pg_walfile_name(pg_switch_wal())");
    cluster.wait_for(
        "the last segment to be archived",
        Duration::from_secs(60),
        || {
            let archived =
                cluster.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
            archived.as_str() >= last.as_str()
        },
    );

    let to = scratch.path().join("restored");
    let mut restore = walkeep("walkeep", &config);
    restore.args(["restore", "--to"]).arg(&to).args([
        "--target-time",
        &target,
        "--target-action",
        "promote",
    ]);
    run_ok(&mut restore);
    let conf = fs::read_to_string(to.join("postgresql.auto.conf")).unwrap();
    assert!(
        conf.contains("--config"),
        "restore_command must name the config:\n{conf}"
    );
    let mut restored = Cluster::from_existing(&scratch, &to);
    restored.append_conf(&["archive_mode = off"]);
    restored.start();
    restored.wait_for_promotion(Duration::from_secs(120));
    assert_eq!(
        restored.psql("SELECT count(*), md5(string_agg(note, ',' ORDER BY id)) FROM orders"),
        good
    );
    assert!(restored.try_psql("SELECT 1 FROM after_disaster").is_err());

    // verify, info and expire work the same on object storage.
    let mut verify = walkeep("walkeep", &config);
    run_ok(verify.arg("verify"));
    let mut info = walkeep("walkeep", &config);
    let info = run_ok(info.args(["info", "--json"]));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["backups"].as_array().unwrap().len(), 1);
    let mut expire = walkeep("walkeep", &config);
    run_ok(expire.args(["expire", "--keep", "1", "--dry-run"]));
}
