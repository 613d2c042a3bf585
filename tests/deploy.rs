//! Proves the deployment pieces: `scripts/install.sh`, the scheduled backup and the units
//! that run it, the procedures of `docs/RUNBOOK.md`, the Docker Compose example and its
//! release script.
//!
//! The runbook is run as written: [`Runbook`] extracts the fenced `sh` blocks of a
//! procedure from `docs/RUNBOOK.md` and runs them one by one with bash, as the cluster
//! user, with the runbook's variables (`$REPO`, `$PGDATA`, `$TARGET_TIME`, ...) pointing at
//! a throw-away "production" cluster that `scripts/install.sh` set up. Then the test checks
//! the outcome: the rows are back. A block marked `sh when=NAME` runs only when the test
//! sets NAME. The Compose example cannot be run (no Docker engine on these machines), so
//! its settings are checked against `postgres-conf/walkeep.conf` and each other, and
//! `release.sh` runs against a stand-in `docker` that records its calls.
//!
//! Every command that touches a cluster or a repository runs as the cluster user, except
//! `install.sh` in [`Site::install`], which runs as the test's own user (root in CI), the
//! way an operator runs it.

mod common;

use std::collections::BTreeMap;
use std::env;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

use common::{
    as_cluster_user, bin, fix_ownership, free_port, pg_bin, pg_command, run, run_ok, Cluster,
    InitOptions, Scratch,
};

/// The checkout: where the scripts, the snippets and the runbook are.
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// How long a WAL segment may take to reach the repository after a switch.
const ARCHIVE_WAIT: Duration = Duration::from_secs(60);

/// WAL segment size of the test clusters, in MiB: small, so that archiving is quick.
const SEGSIZE_MB: u32 = 1;

/// `install.sh`'s exit status when PostgreSQL must be restarted.
const INSTALL_RESTART_NEEDED: i32 = 3;

/// The settings `postgres-conf/walkeep.conf` makes, which compose must make alike.
const ARCHIVE_SETTINGS: [&str; 4] = [
    "wal_level",
    "archive_mode",
    "archive_command",
    "archive_timeout",
];

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A file of the checkout.
fn checkout(relative: &str) -> PathBuf {
    Path::new(ROOT).join(relative)
}

fn read(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("failed to read {}: {err}", path.display()))
}

/// Panics with the command's output unless it exited with `code`.
fn expect_code(output: &Output, code: i32, what: &str) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "{what}: expected exit status {code}\n--- stdout\n{}\n--- stderr\n{}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

/// Copies `from` to `to` with `mode`, creating `to`'s directory.
fn copy_file(from: &Path, to: &Path, mode: u32) {
    fs::create_dir_all(to.parent().unwrap()).unwrap();
    fs::copy(from, to).unwrap_or_else(|err| {
        panic!(
            "failed to copy {} to {}: {err}",
            from.display(),
            to.display()
        )
    });
    fs::set_permissions(to, fs::Permissions::from_mode(mode)).unwrap();
}

/// The directory of PostgreSQL's programs the harness uses.
fn pg_bindir() -> PathBuf {
    pg_bin("pg_ctl")
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The directory of the walkeep binaries the cluster user can run.
fn bin_dir() -> PathBuf {
    bin("walkeep").parent().unwrap().to_path_buf()
}

/// A command with nothing of the caller's environment but PATH, untranslated messages,
/// and no walkeep or libpq settings.
fn clean_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("PATH", env::var_os("PATH").unwrap_or_default())
        .env("LC_ALL", "C");
    cmd
}

/// `walkeep ARGS...` as the cluster user, with settings from `config` alone.
fn walkeep(config: &Path, args: &[&str]) -> Command {
    let mut cmd = clean_command(bin("walkeep"));
    cmd.args(args).arg("--config").arg(config);
    as_cluster_user(&mut cmd);
    cmd
}

/// Where the repository keeps WAL segment `name`.
fn segment_object(repo: &Path, name: &str) -> PathBuf {
    repo.join("wal")
        .join(&name[..16])
        .join(format!("{name}.zst"))
}

/// Writes a WAL record, switches segments, and waits until the finished segment is stored
/// in `repo`; returns its name.
fn switch_and_archive(cluster: &Cluster, repo: &Path) -> String {
    let segment = cluster.psql(
        "SELECT pg_logical_emit_message(false, 'deploy-test', 'switch');
         SELECT pg_walfile_name(pg_switch_wal())",
    );
    let segment = segment.lines().last().unwrap().to_string();
    cluster.wait_archived(&segment, ARCHIVE_WAIT);
    let object = segment_object(repo, &segment);
    assert!(object.is_file(), "{} is missing", object.display());
    segment
}

/// `walkeep info --json`.
fn info(config: &Path) -> Value {
    let output = run_ok(&mut walkeep(config, &["info", "--json"]));
    serde_json::from_slice(&output.stdout).expect("walkeep info --json prints JSON")
}

fn backups(info: &Value) -> &Vec<Value> {
    info["backups"].as_array().expect("info lists backups")
}

/// Stops a server on a data directory when dropped, if one runs there: for the copies the
/// runbook starts, so that a failing test leaves no server behind.
struct StopServerOnDrop(PathBuf);

impl Drop for StopServerOnDrop {
    fn drop(&mut self) {
        if self.0.join("postmaster.pid").exists() {
            let mut pg_ctl = pg_command("pg_ctl");
            pg_ctl
                .arg("-D")
                .arg(&self.0)
                .args(["-m", "immediate", "-w", "stop"]);
            let _ = as_cluster_user(&mut pg_ctl).output();
        }
    }
}

// ---------------------------------------------------------------------------------------
// A site: where install.sh puts walkeep on a scratch "machine"
// ---------------------------------------------------------------------------------------

/// What `install.sh` installs and where: programs, config file, repository, each in the
/// scratch directory; and `src`, a copy of the parts of a built checkout that the runbook
/// uses (the cluster user may not be able to read the real one).
struct Site {
    src: PathBuf,
    prefix: PathBuf,
    config: PathBuf,
    repo: PathBuf,
}

impl Site {
    fn new(scratch: &Scratch) -> Site {
        let src = scratch.path().join("src");
        for script in ["scripts/install.sh", "scripts/scheduled-backup.sh"] {
            copy_file(&checkout(script), &src.join(script), 0o755);
        }
        let snippet = "postgres-conf/walkeep.conf";
        copy_file(&checkout(snippet), &src.join(snippet), 0o644);
        for program in ["walkeep", "walkeep-archive", "walkeep-restore"] {
            copy_file(
                &bin(program),
                &src.join("target/release").join(program),
                0o755,
            );
        }
        fix_ownership(&src);
        Site {
            src,
            prefix: scratch.path().join("prefix"),
            config: scratch.path().join("etc/walkeep.toml"),
            repo: scratch.path().join("repo"),
        }
    }

    /// `scripts/install.sh` of the checkout for `cluster`, as the test's own user, with
    /// every path in the scratch directory, and `extra` options.
    fn install_command(&self, cluster: &Cluster, extra: &[&str]) -> Command {
        let mut cmd = clean_command("bash");
        cmd.arg(checkout("scripts/install.sh"))
            .arg("--pgdata")
            .arg(&cluster.pgdata)
            .arg("--prefix")
            .arg(&self.prefix)
            .arg("--config")
            .arg(&self.config)
            .arg("--repo")
            .arg(&self.repo)
            .arg("--from")
            .arg(bin_dir())
            .arg("--pg-bindir")
            .arg(pg_bindir())
            .args(["--conninfo", &cluster.conninfo()])
            .arg("--server-log")
            .arg(&cluster.log_file)
            .args(extra);
        cmd
    }

    /// Installs for `cluster`, restarting it for archive_mode; panics unless it succeeds.
    fn install(&self, cluster: &Cluster) -> Output {
        run_ok(&mut self.install_command(cluster, &["--restart"]))
    }
}

/// What a second install run must leave byte-identical: content, mode and owner of each
/// file install.sh writes or edits.
fn snapshot(site: &Site, cluster: &Cluster) -> BTreeMap<PathBuf, (Vec<u8>, u32, u32)> {
    let mut files = vec![
        site.config.clone(),
        cluster.pgdata.join("conf.d/walkeep.conf"),
        cluster.pgdata.join("postgresql.conf"),
        site.repo.join("repository.json"),
    ];
    for program in [
        "walkeep",
        "walkeep-archive",
        "walkeep-restore",
        "walkeep-scheduled-backup",
    ] {
        files.push(site.prefix.join(program));
    }
    files
        .into_iter()
        .map(|path| {
            let meta =
                fs::metadata(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
            let bytes = fs::read(&path).unwrap();
            (path, (bytes, meta.mode() & 0o7777, meta.uid()))
        })
        .collect()
}

fn new_cluster(scratch: &Scratch, name: &str) -> Cluster {
    Cluster::init(
        scratch,
        name,
        InitOptions::default().with_wal_segsize_mb(SEGSIZE_MB),
    )
}

// ---------------------------------------------------------------------------------------
// install.sh
// ---------------------------------------------------------------------------------------

#[test]
fn install_sets_up_archiving_and_a_second_run_changes_nothing() {
    let scratch = Scratch::new();
    let site = Site::new(&scratch);
    // Started with archive_mode off (initdb's default): turning it on needs a restart.
    let mut cluster = new_cluster(&scratch, "primary");
    cluster.start();

    // Without --restart: everything written, then a distinct status and what to do.
    let first = run(&mut site.install_command(&cluster, &[]));
    expect_code(
        &first,
        INSTALL_RESTART_NEEDED,
        "install.sh without --restart",
    );
    let stderr = text(&first.stderr);
    assert!(
        stderr.contains("must be restarted for archive_mode"),
        "{stderr}"
    );
    assert_eq!(cluster.psql("SHOW archive_mode"), "off");
    assert_eq!(
        cluster.psql("SHOW archive_timeout"),
        "1min",
        "reloadable settings are in force"
    );

    // With --restart: restarted, checked end to end.
    let second = site.install(&cluster);
    let stdout = text(&second.stdout);
    assert!(
        stdout.contains("restarting PostgreSQL for archive_mode"),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("OK") && l.contains("end to end")),
        "walkeep check did not pass end to end:\n{stdout}"
    );
    assert_eq!(cluster.psql("SHOW archive_mode"), "on");
    let before = snapshot(&site, &cluster);
    let started = cluster.psql("SELECT pg_postmaster_start_time()");

    // Again: nothing written, nothing restarted.
    let third = site.install(&cluster);
    let stdout = text(&third.stdout);
    assert!(stdout.contains("done; nothing changed"), "{stdout}");
    assert!(
        !stdout.contains("reloading"),
        "a needless reload:\n{stdout}"
    );
    assert_eq!(
        snapshot(&site, &cluster),
        before,
        "the second run changed a file"
    );
    assert_eq!(cluster.psql("SELECT pg_postmaster_start_time()"), started);

    // The config file: owner-only, the cluster user's (archive_command reads it).
    let meta = fs::metadata(&site.config).unwrap();
    assert_eq!(
        meta.mode() & 0o7777,
        0o600,
        "mode of {}",
        site.config.display()
    );
    assert_eq!(meta.uid(), fs::metadata(&cluster.pgdata).unwrap().uid());
    let config = read(&site.config);
    for line in [
        format!("repo = \"{}\"", site.repo.display()),
        format!("pgdata = \"{}\"", cluster.pgdata.display()),
        format!("conninfo = \"{}\"", cluster.conninfo()),
    ] {
        assert!(
            config.lines().any(|l| l == line),
            "{line:?} not in\n{config}"
        );
    }

    // The conf.d snippet is postgres-conf/walkeep.conf with this site's paths.
    let template = read(&checkout("postgres-conf/walkeep.conf"));
    let expected = template
        .replace("/usr/local/bin/", &format!("{}/", site.prefix.display()))
        .replace(
            "/etc/walkeep/walkeep.toml",
            &site.config.display().to_string(),
        );
    assert_eq!(read(&cluster.pgdata.join("conf.d/walkeep.conf")), expected);
    assert_eq!(
        cluster.psql("SHOW archive_command"),
        format!(
            "{}/walkeep-archive --config {} %p %f",
            site.prefix.display(),
            site.config.display()
        )
    );
    let include = read(&cluster.pgdata.join("postgresql.conf"));
    assert_eq!(
        include.matches("include_dir = 'conf.d'").count(),
        1,
        "{include}"
    );

    // A setting the operator added by hand survives a later run, which then still finds
    // nothing to change.
    fs::write(&site.config, format!("{config}restore_prefetch = 2\n")).unwrap();
    let fourth = site.install(&cluster);
    let stdout = text(&fourth.stdout);
    assert!(stdout.contains("done; nothing changed"), "{stdout}");
    let kept = read(&site.config);
    assert!(
        kept.starts_with(&config) && kept.ends_with("restore_prefetch = 2\n"),
        "the hand-added setting was not kept as written:\n{kept}"
    );

    // WAL reaches the repository, and walkeep check agrees on its own.
    switch_and_archive(&cluster, &site.repo);
    run_ok(&mut walkeep(&site.config, &["check", "--timeout", "60"]));
}

#[test]
fn install_refuses_a_setting_that_a_later_file_overrides() {
    let scratch = Scratch::new();
    let site = Site::new(&scratch);
    let mut cluster = new_cluster(&scratch, "overridden");
    cluster.start();
    // postgresql.auto.conf comes after conf.d, so this wins over walkeep.conf.
    cluster.psql("ALTER SYSTEM SET archive_command = 'cp %p /nowhere/%f'");

    let output = run(&mut site.install_command(&cluster, &["--restart"]));
    expect_code(
        &output,
        1,
        "install.sh with archive_command set by ALTER SYSTEM",
    );
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("archive_command: elsewhere") && stderr.contains("postgresql.auto.conf"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------
// The scheduled backup
// ---------------------------------------------------------------------------------------

/// A cluster archiving into a repository, set up by install.sh, with a table of orders,
/// ids 1 to `rows`.
struct Production {
    site: Site,
    cluster: Cluster,
}

impl Production {
    fn start(scratch: &Scratch, rows: u32) -> Production {
        let site = Site::new(scratch);
        let mut cluster = new_cluster(scratch, "production");
        cluster.start();
        site.install(&cluster);
        cluster.psql(&format!(
            "CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL,
                                  amount numeric(10,2) NOT NULL);
             INSERT INTO orders
             SELECT g, 'customer-' || g % 7, g * 1.25 FROM generate_series(1, {rows}) g"
        ));
        Production { site, cluster }
    }

    /// Row count and checksum of the orders whose id is in `ids` (SQL, e.g. "<= 100").
    fn orders(&self, ids: &str) -> String {
        self.cluster.psql(&format!(
            "SELECT count(*) || ' rows, md5 ' || coalesce(md5(string_agg(
                        id || ':' || customer || ':' || amount, ',' ORDER BY id)), '-')
             FROM orders WHERE id {ids}"
        ))
    }

    fn backup(&self) {
        run_ok(&mut walkeep(&self.site.config, &["backup"]));
    }

    /// The variables of the runbook for this site, its cluster and a restored copy.
    fn runbook(&self, scratch: &Scratch) -> Runbook {
        let mut vars = BTreeMap::new();
        let mut set = |name: &str, value: &Path| {
            vars.insert(name.to_string(), value.display().to_string());
        };
        set("WALKEEP_SRC", &self.site.src);
        set("PREFIX", &self.site.prefix);
        set("CONFIG", &self.site.config);
        set("REPO", &self.site.repo);
        set("PGBIN", &pg_bindir());
        set("PGDATA", &self.cluster.pgdata);
        set("PGLOG", &self.cluster.log_file);
        set("RESTORE_DIR", &scratch.path().join("restored"));
        // The runbook's prerequisite: the checkout's built programs on PATH.
        let path = format!(
            "{}:{}",
            self.site.src.join("target/release").display(),
            env::var("PATH").unwrap_or_default()
        );
        vars.insert("PATH".to_string(), path);
        let port = self.cluster.port.to_string();
        for (name, value) in [
            ("PGHOST", "127.0.0.1"),
            ("PGPORT", &port),
            ("PGUSER", "postgres"),
            ("PGDATABASE", "postgres"),
            ("RESTORE_PORT", &free_port().to_string()),
        ] {
            vars.insert(name.to_string(), value.to_string());
        }
        Runbook { vars }
    }
}

/// Runs the installed walkeep-scheduled-backup as the cluster user.
fn scheduled_backup(site: &Site, args: &[&str]) -> Output {
    let mut cmd = clean_command(site.prefix.join("walkeep-scheduled-backup"));
    cmd.args(args);
    run(as_cluster_user(&mut cmd))
}

#[test]
fn scheduled_backup_leaves_a_verified_backup() {
    let scratch = Scratch::new();
    let production = Production::start(&scratch, 1000);
    let log = scratch.dir("log").join("backup.log");
    let config = production.site.config.display().to_string();

    let output = scheduled_backup(
        &production.site,
        &[
            "--config",
            &config,
            "--keep",
            "2",
            "--keep-days",
            "1",
            "--verify",
            "--log",
            &log.display().to_string(),
        ],
    );
    expect_code(&output, 0, "walkeep-scheduled-backup");
    assert_eq!(
        text(&output.stderr),
        "",
        "nothing on stderr when it succeeds with --log"
    );

    let log = read(&log);
    for step in ["backup: ok", "expire: ok", "verify: ok", "finished"] {
        assert!(log.contains(step), "{step:?} not in the log:\n{log}");
    }
    // Every line starts with a time: 2026-12-03T18:23:35+0000.
    for line in log.lines() {
        let stamp = line.split(' ').next().unwrap_or_default();
        assert!(
            stamp.len() == 24 && stamp.as_bytes()[10] == b'T' && stamp[..4].parse::<u32>().is_ok(),
            "log line without a time: {line}"
        );
    }
    assert!(log.contains("repository is whole"), "{log}");

    run_ok(&mut walkeep(&production.site.config, &["verify"]));
    let info = info(&production.site.config);
    let listed = backups(&info);
    assert_eq!(listed.len(), 1, "{info:#}");
    let id = listed[0]["id"].as_str().unwrap();
    assert!(
        log.contains(&format!("backup {id}:")),
        "backup {id} not in the log:\n{log}"
    );
}

#[test]
fn scheduled_backup_fails_with_the_server_down_or_a_bad_repository() {
    let scratch = Scratch::new();
    let site = Site::new(&scratch);
    // An initialised repository and a config file naming it, for a server that is down.
    let cluster = new_cluster(&scratch, "down");
    run_ok(&mut walkeep(
        Path::new("/dev/null"),
        &[
            "init",
            "--repo",
            &site.repo.display().to_string(),
            "--pgdata",
            &cluster.pgdata.display().to_string(),
        ],
    ));
    let config = scratch.path().join("walkeep.toml");
    fs::write(
        &config,
        format!(
            "repo = \"{}\"\npgdata = \"{}\"\nconninfo = \"{}\"\n",
            site.repo.display(),
            cluster.pgdata.display(),
            cluster.conninfo()
        ),
    )
    .unwrap();
    fix_ownership(&config);
    let script = site.src.join("scripts/scheduled-backup.sh");
    let walkeep_bin = bin("walkeep").display().to_string();
    let log = scratch.dir("log").join("backup.log");
    let log_arg = log.display().to_string();
    let run_script = |config: &Path| {
        let mut cmd = clean_command("bash");
        cmd.arg(&script)
            .args(["--walkeep", &walkeep_bin, "--log", &log_arg, "--config"])
            .arg(config);
        run(as_cluster_user(&mut cmd))
    };

    // The server is down.
    let output = run_script(&config);
    expect_code(&output, 1, "scheduled backup with the server down");
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("FAILED: backup") && stderr.contains("failed to connect"),
        "the failure line on stderr names the step and walkeep's error: {stderr}"
    );
    assert!(read(&log).contains("FAILED: backup"), "{}", read(&log));

    // A repository location that is not a repository (an unmounted volume, say).
    let empty = scratch.dir("not-a-repository");
    let bad = scratch.path().join("bad.toml");
    fs::write(&bad, format!("repo = \"{}\"\n", empty.display())).unwrap();
    fix_ownership(&bad);
    let output = run_script(&bad);
    expect_code(
        &output,
        1,
        "scheduled backup into a directory that is no repository",
    );
    assert!(text(&output.stderr).contains("not an initialised walkeep repository"));

    // A usage error is not a failed backup.
    let mut cmd = clean_command("bash");
    cmd.arg(&script).args(["--keep", "0"]);
    expect_code(&run(&mut cmd), 2, "--keep 0");
}

/// Parses `KEY=VALUE` lines (systemd's `Environment=`, cron's variables).
fn assignments<'a>(lines: impl Iterator<Item = &'a str>) -> BTreeMap<String, String> {
    lines
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_string(), value.trim().to_string()))
        .collect()
}

#[test]
fn systemd_and_cron_run_the_same_daily_scheduled_backup() {
    let service = read(&checkout("deploy/systemd/walkeep-backup.service"));
    let timer = read(&checkout("deploy/systemd/walkeep-backup.timer"));
    let cron = read(&checkout("deploy/cron/walkeep-backup"));
    let keys = |unit: &str, key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .collect()
    };

    assert_eq!(
        keys(&service, "Type"),
        ["oneshot"],
        "a failure must fail the unit"
    );
    let service_env = assignments(keys(&service, "Environment").iter().map(String::as_str));
    let exec = keys(&service, "ExecStart");
    assert_eq!(exec.len(), 1);
    let exec: Vec<&str> = exec[0].split_whitespace().collect();

    let cron_env = assignments(
        cron.lines()
            .filter(|l| !l.starts_with('#') && !l.contains(' ')),
    );
    let job: Vec<&str> = cron
        .lines()
        .find(|l| !l.starts_with('#') && l.contains(' '))
        .expect("a cron job line")
        .split_whitespace()
        .collect();
    let (schedule, user, command) = (&job[..5], job[5], &job[6..]);

    // Both run the installed script (install.sh's default prefix), as postgres, with the
    // same settings; cron adds a log file, systemd has the journal.
    assert_eq!(exec[0], "/usr/local/bin/walkeep-scheduled-backup");
    assert_eq!(command[0], exec[0]);
    assert_eq!(keys(&service, "User"), ["postgres"]);
    assert_eq!(user, "postgres");
    assert_eq!(&exec[1..], ["--verify"]);
    assert_eq!(
        &command[1..],
        ["--verify", "--log", "/var/log/walkeep/backup.log"]
    );
    for key in ["WALKEEP_CONFIG", "WALKEEP_KEEP", "WALKEEP_KEEP_DAYS"] {
        assert_eq!(service_env.get(key), cron_env.get(key), "{key}");
        assert!(service_env.contains_key(key), "{key}");
    }
    assert_eq!(service_env["WALKEEP_CONFIG"], "/etc/walkeep/walkeep.toml");

    // Daily: a fixed minute and hour, every day.
    assert!(schedule[0].parse::<u8>().is_ok() && schedule[1].parse::<u8>().is_ok());
    assert_eq!(&schedule[2..], ["*", "*", "*"]);
    assert!(
        keys(&timer, "OnCalendar")[0].starts_with("*-*-* "),
        "{timer}"
    );
    assert_eq!(keys(&timer, "Persistent"), ["true"]);
}

// ---------------------------------------------------------------------------------------
// The runbook, run as written
// ---------------------------------------------------------------------------------------

/// A fenced code block of the runbook.
#[derive(Debug)]
struct Block {
    /// The `##` heading it is under.
    section: String,
    /// The fence's info string: `sh`, `sh when=NAME`, `text`, ...
    info: String,
    /// Its lines.
    body: String,
}

/// Every fenced block of `docs/RUNBOOK.md`, in order.
fn runbook_blocks() -> Vec<Block> {
    let runbook = read(&checkout("docs/RUNBOOK.md"));
    let mut blocks = Vec::new();
    let mut section = String::new();
    let mut open: Option<Block> = None;
    for line in runbook.lines() {
        if let Some(block) = open.as_mut() {
            if line.trim_end() == "```" {
                blocks.push(open.take().unwrap());
            } else {
                block.body.push_str(line);
                block.body.push('\n');
            }
        } else if let Some(info) = line.strip_prefix("```") {
            open = Some(Block {
                section: section.clone(),
                info: info.trim().to_string(),
                body: String::new(),
            });
        } else if let Some(heading) = line.strip_prefix("## ") {
            section = heading.trim().to_string();
        }
    }
    assert!(open.is_none(), "docs/RUNBOOK.md ends inside a code block");
    blocks
}

/// Runs procedures of `docs/RUNBOOK.md` with a set of variables.
struct Runbook {
    vars: BTreeMap<String, String>,
}

impl Runbook {
    fn set(&mut self, name: &str, value: impl Into<String>) -> &mut Runbook {
        self.vars.insert(name.to_string(), value.into());
        self
    }

    /// Runs every `sh` block of procedure `number` whose title contains `title`, in order,
    /// each after the runbook's variables block, as the cluster user; panics at the first
    /// block that fails. Returns the blocks' standard output.
    fn run(&self, number: &str, title: &str) -> String {
        let blocks = runbook_blocks();
        let variables: Vec<&Block> = blocks
            .iter()
            .filter(|b| b.section == "Variables" && b.info == "sh")
            .collect();
        assert_eq!(variables.len(), 1, "the runbook has one variables block");
        let procedure: Vec<&Block> = blocks
            .iter()
            .filter(|b| b.section.starts_with(&format!("{number}. ")))
            .collect();
        assert!(
            procedure.iter().any(|b| b.section.contains(title)),
            "no procedure {number} titled {title:?} in docs/RUNBOOK.md"
        );

        let mut ran = 0;
        let mut stdout = String::new();
        for block in procedure {
            let mut info = block.info.split_whitespace();
            match info.next() {
                Some("sh") => {}
                Some("text") => continue,
                other => panic!(
                    "procedure {number} has a {other:?} block, which this test would not \
                     run; use sh (run) or text (not a command)"
                ),
            }
            if let Some(condition) = info.next() {
                let name = condition
                    .strip_prefix("when=")
                    .unwrap_or_else(|| panic!("unknown fence option {condition:?}"));
                if self.vars.get(name).is_none_or(|v| v.is_empty()) {
                    continue;
                }
            }
            stdout.push_str(&self.run_block(&variables[0].body, &block.body));
            ran += 1;
        }
        assert!(ran >= 3, "procedure {number} ran only {ran} blocks");
        stdout
    }

    fn run_block(&self, variables: &str, block: &str) -> String {
        let script = format!("set -euo pipefail\n{variables}set -x\n{block}");
        let mut bash = clean_command("bash");
        bash.arg("-c").arg(&script).envs(&self.vars);
        let began = Instant::now();
        let output = run(as_cluster_user(&mut bash));
        let stdout = text(&output.stdout);
        let stderr = text(&output.stderr);
        eprintln!(
            "--- runbook block ({:.1} s)\n{block}--- stdout\n{stdout}--- stderr\n{stderr}",
            began.elapsed().as_secs_f64()
        );
        assert!(
            output.status.success(),
            "runbook block failed ({})\n{block}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            output.status
        );
        stdout
    }
}

/// What the PITR tests target.
enum Target {
    Time,
    RestorePoint,
}

/// Procedure 3 against a cluster with deleted and overwritten rows, to `target`.
fn pitr_brings_the_rows_back(target: Target) {
    let scratch = Scratch::new();
    let production = Production::start(&scratch, 1000);
    production.backup();
    // Committed after the backup: only WAL replay brings these back.
    production.cluster.psql(
        "INSERT INTO orders SELECT g, 'customer-' || g % 7, g * 1.25
         FROM generate_series(1001, 1500) g",
    );
    let good = production.orders("<= 1500");

    let mut runbook = production.runbook(&scratch);
    match target {
        Target::Time => {
            thread::sleep(Duration::from_millis(50));
            let time = production.cluster.psql(
                "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC',
                                'YYYY-MM-DD HH24:MI:SS.US+00')",
            );
            thread::sleep(Duration::from_millis(50));
            runbook.set("TARGET_TIME", time);
        }
        Target::RestorePoint => {
            run_ok(&mut walkeep(
                &production.site.config,
                &["mark", "--switch-wal", "before-cleanup"],
            ));
            runbook.set("TARGET_NAME", "before-cleanup");
        }
    }

    // The mistakes, then legitimate orders that must survive the repair.
    production
        .cluster
        .psql("DELETE FROM orders WHERE customer = 'customer-3'");
    production.cluster.psql("UPDATE orders SET amount = 0");
    production
        .cluster
        .psql("INSERT INTO orders SELECT g, 'late-' || g, g FROM generate_series(2001, 2010) g");
    let later = production.orders("> 2000");
    assert_ne!(production.orders("<= 1500"), good, "the damage is done");

    runbook
        .set("TABLE", "orders")
        .set("KEY", "id")
        .set("COLUMN", "amount");
    let restored = PathBuf::from(&runbook.vars["RESTORE_DIR"]);
    let _copy = StopServerOnDrop(restored.clone());
    let stdout = runbook.run("3", "accidental delete or bad update");

    assert!(stdout.contains("replay: paused"), "{stdout}");
    assert_eq!(
        production.orders("<= 1500"),
        good,
        "the deleted and overwritten rows are back"
    );
    assert_eq!(production.orders("> 2000"), later, "later orders are kept");
    assert_eq!(
        production
            .cluster
            .psql("SELECT count(*) FROM pg_namespace WHERE nspname = 'recovered'"),
        "0"
    );
    assert!(!restored.exists(), "the copy is cleaned up");
    // The copy archived nothing: the repository has one timeline.
    let info = info(&production.site.config);
    let windows = info["recovery_windows"].as_array().unwrap();
    assert!(windows.iter().all(|w| w["timeline"] == 1), "{info:#}");
}

#[test]
fn runbook_pitr_to_a_time_brings_the_rows_back() {
    pitr_brings_the_rows_back(Target::Time);
}

#[test]
fn runbook_pitr_to_a_restore_point_brings_the_rows_back() {
    pitr_brings_the_rows_back(Target::RestorePoint);
}

#[test]
fn runbook_rebuild_restores_every_archived_commit() {
    let scratch = Scratch::new();
    let production = Production::start(&scratch, 1000);
    production.backup();
    production.cluster.psql(
        "INSERT INTO orders SELECT g, 'customer-' || g % 7, g * 1.25
         FROM generate_series(1001, 1500) g",
    );
    switch_and_archive(&production.cluster, &production.site.repo);
    let archived = production.orders("<= 1500");
    // Committed in a segment that is never finished: within archive_timeout of the loss.
    production
        .cluster
        .psql("INSERT INTO orders VALUES (9999, 'unarchived', 1)");

    // The server is lost: its data directory, its programs and its config file.
    production.cluster.stop_immediate();
    let site = &production.site;
    fs::remove_dir_all(&production.cluster.pgdata).unwrap();
    fs::remove_dir_all(&site.prefix).unwrap();
    fs::remove_dir_all(site.config.parent().unwrap()).unwrap();

    let mut runbook = production.runbook(&scratch);
    runbook.set("CHECK_SQL", "SELECT count(*) AS orders FROM orders");
    let stdout = runbook.run("4", "Rebuild a lost server");

    assert!(stdout.contains("in recovery: false"), "{stdout}");
    assert!(stdout.contains("(--offline)"), "{stdout}");
    assert!(stdout.contains("done; nothing changed"), "{stdout}");
    assert!(production.cluster.is_running());
    assert_eq!(
        production.orders("<= 1500"),
        archived,
        "every archived commit is back"
    );
    assert_eq!(
        production.orders("= 9999"),
        "0 rows, md5 -",
        "the unarchived tail is lost"
    );
    assert_eq!(
        production
            .cluster
            .psql("SELECT timeline_id FROM pg_control_checkpoint()"),
        "2"
    );
    // Archiving and backups work again: the config is back, owner-only, and the new
    // backup is on the new timeline.
    assert_eq!(fs::metadata(&site.config).unwrap().mode() & 0o7777, 0o600);
    let info = info(&site.config);
    let listed = backups(&info);
    assert_eq!(listed.len(), 2, "{info:#}");
    assert_eq!(listed.last().unwrap()["timeline"], 2, "{info:#}");
    switch_and_archive(&production.cluster, &site.repo);
}

#[test]
fn runbook_rollback_returns_to_the_restore_point_before_the_release() {
    let scratch = Scratch::new();
    let production = Production::start(&scratch, 1000);
    production.backup();
    // What release.sh does before deploying version 2.0.0.
    run_ok(&mut walkeep(
        &production.site.config,
        &["mark", "--switch-wal", "before-2.0.0"],
    ));
    let before = production.orders("> 0");

    // The bad release: a migration, rewritten amounts, new rows.
    production.cluster.psql(
        "ALTER TABLE orders ADD COLUMN discount numeric;
         UPDATE orders SET amount = amount * 100, discount = 1;
         INSERT INTO orders SELECT g, 'v2-' || g, g, 0 FROM generate_series(3001, 3010) g",
    );

    let mut runbook = production.runbook(&scratch);
    runbook
        .set("RESTORE_POINT", "before-2.0.0")
        .set("PREVIOUS_VERSION", "1.0.0");
    let _copy = StopServerOnDrop(PathBuf::from(&runbook.vars["RESTORE_DIR"]));
    let stdout = runbook.run("6", "Roll back a release");

    assert!(stdout.contains("in recovery: false"), "{stdout}");
    assert_eq!(
        production.orders("> 0"),
        before,
        "the data is as it was before the release"
    );
    assert_eq!(
        production.cluster.psql(
            "SELECT count(*) FROM information_schema.columns
             WHERE table_name = 'orders' AND column_name = 'discount'"
        ),
        "0",
        "the release's migration is undone"
    );
    assert_eq!(
        production
            .cluster
            .psql("SELECT timeline_id FROM pg_control_checkpoint()"),
        "2"
    );
    let kept: Vec<_> = fs::read_dir(scratch.path())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("production.before-rollback-")
        })
        .collect();
    assert_eq!(kept.len(), 1, "the old data directory is kept aside");
    assert_eq!(backups(&info(&production.site.config)).len(), 2);
}

// ---------------------------------------------------------------------------------------
// Docker Compose
// ---------------------------------------------------------------------------------------

/// The `name = value` settings of a postgresql.conf file, quotes removed.
fn conf_settings(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(name, value)| {
            let value = value.trim();
            let value = value
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .unwrap_or(value);
            (name.trim().to_string(), value.to_string())
        })
        .collect()
}

fn yaml_str<'a>(node: &'a Yaml, what: &str) -> &'a str {
    node.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {node:?}"))
}

/// A service's environment, in either of compose's forms (mapping or `KEY=VALUE` list).
fn service_env(service: &Yaml) -> BTreeMap<String, String> {
    match &service["environment"] {
        Yaml::Hash(map) => map
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Yaml::String(s) | Yaml::Real(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    other => panic!("environment value {other:?}"),
                };
                (yaml_str(k, "environment key").to_string(), value)
            })
            .collect(),
        Yaml::Array(list) => assignments(list.iter().map(|l| yaml_str(l, "environment"))),
        Yaml::BadValue => BTreeMap::new(),
        other => panic!("environment: {other:?}"),
    }
}

/// A service's volume mounts: mount path to (volume or host path, read-only).
fn service_mounts(service: &Yaml) -> BTreeMap<String, (String, bool)> {
    service["volumes"]
        .as_vec()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|v| {
            let parts: Vec<&str> = yaml_str(v, "volume").split(':').collect();
            let read_only = parts
                .get(2)
                .is_some_and(|mode| mode.split(',').any(|m| m == "ro"));
            (parts[1].to_string(), (parts[0].to_string(), read_only))
        })
        .collect()
}

/// The named volume mounted at `path` or above it in `service`, and whether read-only.
fn volume_holding(service: &Yaml, path: &str) -> Option<(String, bool)> {
    service_mounts(service)
        .into_iter()
        .filter(|(mount, _)| Path::new(path).starts_with(mount))
        .max_by_key(|(mount, _)| mount.len())
        .map(|(_, volume)| volume)
}

#[test]
fn compose_archives_with_the_snippets_settings_into_the_repository_volume() {
    let snippet = conf_settings(&read(&checkout("postgres-conf/walkeep.conf")));
    let compose_text = read(&checkout("deploy/compose/docker-compose.yml"));
    let docs = YamlLoader::load_from_str(&compose_text).expect("docker-compose.yml is YAML");
    let compose = &docs[0];
    let services = &compose["services"];
    let (db, backup, app) = (&services["db"], &services["backup"], &services["app"]);
    for (name, service) in [("db", db), ("backup", backup), ("app", app)] {
        assert!(service.is_hash(), "no service {name}");
    }

    // The server's archive settings are the snippet's, given as `-c name=value`.
    let command: Vec<&str> = db["command"]
        .as_vec()
        .expect("db has a command list")
        .iter()
        .map(|w| yaml_str(w, "command"))
        .collect();
    assert_eq!(command[0], "postgres");
    let mut settings = BTreeMap::new();
    for pair in command[1..].chunks(2) {
        assert_eq!(pair[0], "-c", "{command:?}");
        let (name, value) = pair[1].split_once('=').unwrap();
        settings.insert(name.to_string(), value.to_string());
    }
    for name in ARCHIVE_SETTINGS {
        assert_eq!(
            settings.get(name),
            snippet.get(name),
            "{name}: compose vs postgres-conf"
        );
        assert!(
            snippet.contains_key(name),
            "postgres-conf/walkeep.conf sets no {name}"
        );
    }

    // archive_command names a config file, which the image holds and the backup service
    // reads too.
    let archive_command: Vec<&str> = settings["archive_command"].split_whitespace().collect();
    assert_eq!(archive_command[0], "/usr/local/bin/walkeep-archive");
    let config_path = archive_command[archive_command
        .iter()
        .position(|w| *w == "--config")
        .unwrap()
        + 1];
    let dockerfile = read(&checkout("deploy/compose/Dockerfile"));
    let copies_config = dockerfile.lines().any(|l| {
        l.starts_with("COPY")
            && l.contains("--chown=postgres:postgres")
            && l.contains("--chmod=0600")
            && l.ends_with(&format!("deploy/compose/walkeep.toml {config_path}"))
    });
    assert!(
        copies_config,
        "the Dockerfile copies walkeep.toml to {config_path}, 0600, postgres"
    );
    assert_eq!(service_env(backup)["WALKEEP_CONFIG"], config_path);

    // The repository in that file is the repository volume's mount path, in both services.
    let config: toml::Table =
        toml::from_str(&read(&checkout("deploy/compose/walkeep.toml"))).unwrap();
    let repo = config["repo"].as_str().unwrap();
    let pgdata = config["pgdata"].as_str().unwrap();
    let declared = compose["volumes"].as_hash().expect("top-level volumes");
    let db_repo = volume_holding(db, repo).expect("db mounts the repository");
    let backup_repo = volume_holding(backup, repo).expect("backup mounts the repository");
    assert_eq!(
        service_mounts(db)[repo].0,
        db_repo.0,
        "mounted at the repository path itself"
    );
    assert_eq!(
        db_repo, backup_repo,
        "the same volume, writable, in db and backup"
    );
    assert!(!db_repo.1, "the repository is writable");
    assert!(
        declared.contains_key(&Yaml::String(db_repo.0.clone())),
        "{} is a named volume",
        db_repo.0
    );
    assert!(dockerfile.contains(&format!("-o postgres -g postgres -m 0700 {repo}")));

    // The data directory: the server's PGDATA, in the data volume, readable by backup.
    assert_eq!(service_env(db)["PGDATA"], pgdata);
    let db_data = volume_holding(db, pgdata).expect("db mounts the data volume");
    let backup_data = volume_holding(backup, pgdata).expect("backup mounts the data volume");
    assert_eq!(db_data.0, backup_data.0);
    assert!(declared.contains_key(&Yaml::String(db_data.0.clone())));
    assert_ne!(
        db_data.0, db_repo.0,
        "data and repository on different volumes"
    );

    // The backup service runs the scheduled backup against the db service.
    let backup_env = service_env(backup);
    assert_eq!(backup_env["PGHOST"], "db");
    assert_eq!(yaml_str(&backup["user"], "user"), "postgres");
    assert_eq!(
        yaml_str(&backup["entrypoint"][0], "entrypoint"),
        "/usr/local/bin/walkeep-backup-loop"
    );
    for (from, to) in [
        (
            "scripts/scheduled-backup.sh",
            "/usr/local/bin/walkeep-scheduled-backup",
        ),
        (
            "deploy/compose/backup-loop.sh",
            "/usr/local/bin/walkeep-backup-loop",
        ),
    ] {
        assert!(
            dockerfile
                .lines()
                .any(|l| l.starts_with("COPY") && l.ends_with(&format!("{from} {to}"))),
            "{from}"
        );
    }
    assert_eq!(
        db["image"], backup["image"],
        "db and backup run the same image"
    );
    assert!(!db["build"].is_badvalue() && db["build"] == backup["build"]);
    let initdb = read(&checkout("deploy/compose/initdb/10-walkeep.sh"));
    let init = "walkeep init --config /etc/walkeep/walkeep.toml --pgdata \"$PGDATA\"";
    assert!(initdb.contains(init), "{initdb}");

    // The image: walkeep built in a Rust stage, added to PostgreSQL 16.
    assert!(dockerfile.contains("ARG PG_MAJOR=16"));
    assert!(dockerfile
        .lines()
        .any(|l| l.starts_with("FROM rust:") && l.ends_with(" AS build")));
    assert!(dockerfile
        .lines()
        .any(|l| l == "FROM postgres:${PG_MAJOR}-bookworm"));

    // The application runs a version, never `latest`.
    let image = yaml_str(&app["image"], "app image");
    assert!(
        image.ends_with(":${APP_VERSION:?set APP_VERSION in .env}"),
        "{image}"
    );

    // No password anywhere: compose takes them from .env, whose example leaves them empty.
    for (name, service) in [("db", db), ("backup", backup), ("app", app)] {
        for (key, value) in service_env(service) {
            if key.contains("PASSWORD") {
                assert!(
                    value.starts_with("${") && value.contains(":?"),
                    "{name}.{key} = {value}"
                );
            }
        }
    }
    let example = read(&checkout("deploy/compose/.env.example"));
    let example_vars = assignments(example.lines().filter(|l| !l.starts_with('#')));
    for (key, value) in &example_vars {
        if key.contains("PASSWORD") {
            assert_eq!(value, "", "{key} in .env.example must be empty");
        }
    }
    assert!(example_vars.contains_key("APP_VERSION"));

    let readme = read(&checkout("deploy/compose/README.md"));
    assert!(
        readme.contains("Docker engine does not run"),
        "the README says it is not run here"
    );
}

#[test]
fn release_marks_a_restore_point_before_deploying() {
    let scratch = Scratch::new();
    let dir = scratch.path().join("compose");
    copy_file(
        &checkout("deploy/compose/release.sh"),
        &dir.join("release.sh"),
        0o755,
    );
    let env_file = dir.join(".env");
    let example = read(&checkout("deploy/compose/.env.example"));
    fs::write(
        &env_file,
        example.replace("PASSWORD=\n", "PASSWORD=generated\n"),
    )
    .unwrap();
    // A stand-in for docker: records its arguments; `exec` exits with $EXEC_STATUS.
    let fake = scratch.path().join("fake-bin/docker");
    fs::create_dir_all(fake.parent().unwrap()).unwrap();
    fs::write(
        &fake,
        "#!/bin/sh\nprintf '%s\\n' \"$*\" >>\"$DOCKER_LOG\"\n\
         case \" $* \" in *\" exec \"*) exit \"${EXEC_STATUS:-0}\" ;; esac\nexit 0\n",
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let calls_log = scratch.path().join("docker.log");
    let release = |version: &str, exec_status: &str| {
        let _ = fs::remove_file(&calls_log);
        let path = format!(
            "{}:{}",
            fake.parent().unwrap().display(),
            env::var("PATH").unwrap()
        );
        let mut cmd = clean_command("bash");
        cmd.arg(dir.join("release.sh"))
            .arg(version)
            .env("PATH", path)
            .env("DOCKER_LOG", &calls_log)
            .env("EXEC_STATUS", exec_status);
        let output = run(&mut cmd);
        let calls = fs::read_to_string(&calls_log).unwrap_or_default();
        (
            output,
            calls.lines().map(str::to_string).collect::<Vec<_>>(),
        )
    };
    let app_version = || {
        assignments(read(&env_file).lines().filter(|l| !l.starts_with('#')))["APP_VERSION"].clone()
    };
    assert_eq!(app_version(), "1.0.0");

    // A release: the restore point is made after the old version stopped, before the new
    // one starts, and recorded with the version to go back to.
    let (output, calls) = release("1.1.0", "0");
    expect_code(&output, 0, "release.sh 1.1.0");
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert_eq!(calls[0], "compose pull app");
    assert_eq!(calls[1], "compose stop app");
    let mark = calls[2]
        .strip_prefix("compose exec -T -u postgres db walkeep mark --switch-wal ")
        .unwrap_or_else(|| panic!("third call is not the mark: {calls:?}"));
    assert!(
        mark.starts_with("before-1.1.0-") && mark.len() <= 63,
        "{mark}"
    );
    assert_eq!(calls[3], "compose up -d app");
    assert_eq!(app_version(), "1.1.0");
    let releases = read(&dir.join("releases.log"));
    let record: Vec<&str> = releases.lines().last().unwrap().split('\t').collect();
    assert_eq!(&record[1..], ["1.1.0", "1.0.0", mark]);

    // No restore point, no release: the old version runs again, nothing recorded.
    let (output, calls) = release("1.2.0", "1");
    expect_code(&output, 1, "release.sh 1.2.0 with the mark failing");
    assert!(text(&output.stderr).contains("was not deployed"));
    assert_eq!(
        calls.last().map(String::as_str),
        Some("compose start app"),
        "{calls:?}"
    );
    assert!(
        !calls.iter().any(|c| c.starts_with("compose up")),
        "{calls:?}"
    );
    assert_eq!(app_version(), "1.1.0");
    assert_eq!(read(&dir.join("releases.log")), releases);
}

#[test]
fn runbook_guarantees_cite_tests_that_exist() {
    let runbook = read(&checkout("docs/RUNBOOK.md"));
    let table = &runbook[runbook
        .find("## What walkeep guarantees")
        .expect("a guarantees section")..];
    let table = &table[..table[3..].find("\n## ").map_or(table.len(), |end| end + 3)];
    let mut cited = 0;
    for reference in table
        .split('`')
        .filter(|s| s.starts_with("tests/") && s.contains("::"))
    {
        let (file, function) = reference.split_once("::").unwrap();
        let source = read(&checkout(file));
        let lines: Vec<&str> = source.lines().collect();
        let at = lines
            .iter()
            .position(|l| *l == format!("fn {function}() {{"))
            .unwrap_or_else(|| panic!("{reference}: no such test function"));
        assert!(
            at > 0
                && lines[..at]
                    .iter()
                    .rev()
                    .take(3)
                    .any(|l| l.trim() == "#[test]"),
            "{reference} is not a #[test]"
        );
        cited += 1;
    }
    assert!(cited >= 20, "only {cited} tests cited");
}
