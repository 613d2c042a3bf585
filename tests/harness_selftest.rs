//! Proves the test harness itself: a real cluster comes up as the right OS user, answers
//! queries, takes a pgbench load and stops; the binaries and scratch directories are usable
//! by that user; a copied data directory starts as a cluster of its own.
//!
//! Every other integration test stands on these, so when this fails, fix it first.

mod common;

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

use common::{as_cluster_user, bin, cluster_user, run_ok, Cluster, InitOptions, Scratch};

/// The OS uid that clusters should run as: the cluster user's as root, else our own.
fn expected_server_uid() -> u32 {
    match cluster_user() {
        Some(user) => user.uid.as_raw(),
        None => nix::unistd::geteuid().as_raw(),
    }
}

/// The real uid of the postmaster, read from /proc through the pid in postmaster.pid.
fn postmaster_uid(cluster: &Cluster) -> u32 {
    let pid_file = fs::read_to_string(cluster.pgdata.join("postmaster.pid")).unwrap();
    let pid = pid_file.lines().next().unwrap().trim();
    fs::metadata(format!("/proc/{pid}")).unwrap().uid()
}

#[test]
fn cluster_starts_answers_queries_takes_pgbench_and_stops() {
    let scratch = Scratch::new();
    let mut cluster = Cluster::init(&scratch, "primary", InitOptions::default());
    cluster.start();
    assert!(cluster.is_running());
    assert_eq!(postmaster_uid(&cluster), expected_server_uid());

    assert_eq!(cluster.psql("SELECT 1"), "1");
    assert!(cluster.psql("SHOW server_version_num").starts_with("15"));
    assert_eq!(cluster.psql("SHOW data_checksums"), "on");
    assert_eq!(cluster.psql("SHOW fsync"), "on");
    assert_eq!(cluster.psql("SHOW port"), cluster.port.to_string());

    cluster.psql(
        "CREATE TABLE notes (id int PRIMARY KEY, body text);
         INSERT INTO notes VALUES (1, 'one'), (2, 'two');",
    );
    assert_eq!(
        cluster.psql("SELECT id, body FROM notes ORDER BY id"),
        "1|one\n2|two"
    );
    let err = cluster.try_psql("SELECT * FROM no_such_table").unwrap_err();
    assert!(
        err.contains("does not exist"),
        "unexpected psql error: {err}"
    );

    cluster.pgbench(&["-i", "-s", "1", "-q"]);
    assert_eq!(
        cluster.psql("SELECT count(*) FROM pgbench_accounts"),
        "100000"
    );

    cluster.stop();
    assert!(!cluster.is_running());
    assert!(cluster.log().contains("database system is shut down"));
}

#[test]
fn cluster_user_can_run_the_walkeep_binaries() {
    for name in ["walkeep", "walkeep-archive", "walkeep-restore"] {
        let path = bin(name);
        let mode = fs::metadata(&path).unwrap().mode();
        assert_eq!(mode & 0o777, 0o755, "{} has mode {mode:o}", path.display());

        let mut check = Command::new("sh");
        check
            .args(["-c", r#"test -r "$1" && test -x "$1""#, "sh"])
            .arg(&path);
        run_ok(as_cluster_user(&mut check));
    }
}

#[test]
fn cluster_user_owns_scratch_and_keeps_no_root_groups() {
    let scratch = Scratch::new();
    let repo = scratch.dir("repo/segments");
    let meta = fs::metadata(&repo).unwrap();
    assert_eq!(meta.uid(), expected_server_uid());
    assert_eq!(meta.mode() & 0o777, 0o700);

    let mut touch = Command::new("touch");
    touch.arg(repo.join("written-by-cluster-user"));
    run_ok(as_cluster_user(&mut touch));

    // As root, std's uid/gid drop leaves the primary group alone: no root, no ssl-cert.
    if let Some(user) = cluster_user() {
        let mut id = Command::new("id");
        id.arg("-G");
        let groups = String::from_utf8(run_ok(as_cluster_user(&mut id)).stdout).unwrap();
        assert_eq!(groups.trim(), user.gid.as_raw().to_string());
    }
}

#[test]
fn copied_data_directory_starts_as_its_own_cluster() {
    let scratch = Scratch::new();
    let mut primary = Cluster::init(&scratch, "primary", InitOptions::default());
    primary.start();
    primary.psql("CREATE TABLE kept AS SELECT g AS id FROM generate_series(1, 1000) g");
    primary.stop();

    // Copied as whoever runs the tests (root in CI): from_existing must hand it over.
    let copy = scratch.path().join("copy");
    run_ok(Command::new("cp").arg("-a").arg(&primary.pgdata).arg(&copy));
    fix_owner_probe(&copy);
    let mut restored = Cluster::from_existing(&scratch, &copy);
    assert_ne!(restored.port, primary.port);
    restored.start();
    assert_eq!(postmaster_uid(&restored), expected_server_uid());
    assert_eq!(restored.psql("SELECT count(*) FROM kept"), "1000");
    assert_eq!(restored.psql("SHOW port"), restored.port.to_string());
}

/// Makes the copy root-owned when running as root, so the test proves that
/// `Cluster::from_existing` fixes ownership rather than `cp -a` preserving it.
fn fix_owner_probe(path: &std::path::Path) {
    if cluster_user().is_some() {
        run_ok(Command::new("chown").args(["-R", "0:0"]).arg(path));
    }
}

#[test]
fn start_moves_to_a_new_port_when_its_port_is_taken() {
    let scratch = Scratch::new();
    let mut cluster = Cluster::init(&scratch, "primary", InitOptions::default());
    let squatter = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().port();
    cluster.port = taken;

    cluster.start();
    assert_ne!(cluster.port, taken);
    assert_eq!(cluster.psql("SELECT 1"), "1");
}

#[test]
fn try_start_reports_why_the_server_refused() {
    let scratch = Scratch::new();
    let opts = InitOptions::default().with_conf("shared_buffers = 'plenty'");
    let mut cluster = Cluster::init(&scratch, "primary", opts);

    let err = cluster.try_start().unwrap_err();
    assert!(
        err.contains("shared_buffers"),
        "unexpected failure report: {err}"
    );
    assert!(!cluster.is_running());
}
