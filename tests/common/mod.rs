//! Test harness: throw-away PostgreSQL 15 clusters for the integration tests.
//!
//! Each integration test includes this module with `mod common;`. It owns three things:
//! copies of the walkeep binaries that the server can run, scratch directories that the
//! server can write, and [`Cluster`], a real server driven through initdb, pg_ctl, psql and
//! pgbench.
//!
//! PostgreSQL refuses to run as root, and CI runs the tests as root. So when the tests run
//! as root, every command that touches a data directory runs as the `postgres` OS user, and
//! everything the tests hand to a server (scratch directories, restored data directories,
//! the binaries in `archive_command`) must be reachable by that user. As any other user,
//! everything simply runs as that user.
//!
//! Helpers panic instead of returning errors: a failed step is a failed test, and the panic
//! message carries what was run, its output and the tail of the server log.

// Each test binary includes this module and uses only part of it.
#![allow(dead_code)]

pub mod s3;

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::{chown, lchown, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::{geteuid, Pid, User};
use tempfile::TempDir;

/// The OS user that runs clusters when the tests run as root.
const CLUSTER_USER: &str = "postgres";

/// Where Debian installs the PostgreSQL 15 server programs.
const DEBIAN_PG15_BINDIR: &str = "/usr/lib/postgresql/15/bin";

/// How long pg_ctl waits for a server to start or stop, in seconds.
const PG_CTL_TIMEOUT_SECS: &str = "120";

/// How many lines of the server log a failure message quotes.
const LOG_TAIL_LINES: usize = 40;

/// Prefix of the per-process directories that hold copies of the binaries.
const BIN_COPY_PREFIX: &str = "walkeep-bin-";

/// The binaries this package builds: name, and where cargo built it.
const BINARIES: [(&str, &str); 3] = [
    ("walkeep", env!("CARGO_BIN_EXE_walkeep")),
    ("walkeep-archive", env!("CARGO_BIN_EXE_walkeep-archive")),
    ("walkeep-restore", env!("CARGO_BIN_EXE_walkeep-restore")),
];

/// Unwraps `result`, or panics with its whole cause chain.
fn must<T>(result: Result<T>) -> T {
    result.unwrap_or_else(|err| panic!("{err:#}"))
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Returns the last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// Who runs the clusters
// ---------------------------------------------------------------------------------------

/// Returns the OS user that clusters run as: `Some(postgres)` if and only if the tests run
/// as root; `None` means clusters run as the current user.
///
/// Panics when running as root and no `postgres` user exists (.ci/run creates it).
pub fn cluster_user() -> Option<User> {
    static USER: OnceLock<Option<User>> = OnceLock::new();
    USER.get_or_init(|| {
        if !geteuid().is_root() {
            return None;
        }
        match User::from_name(CLUSTER_USER) {
            Ok(Some(user)) => Some(user),
            Ok(None) => panic!(
                "the tests run as root, so clusters must run as OS user {CLUSTER_USER:?}, \
                 which does not exist (.ci/run creates it)"
            ),
            Err(err) => panic!("failed to look up OS user {CLUSTER_USER:?}: {err}"),
        }
    })
    .clone()
}

/// Makes `cmd` run as the cluster user when the tests run as root; otherwise leaves it be.
///
/// Sets HOME, USER and LOGNAME to that user's, and, unless `cmd` already has one, a working
/// directory the user can enter (the test's own may be a private clone).
///
/// Supplementary groups: std's `uid`/`gid` set the group, then, because no explicit group
/// list is given, clear the supplementary groups (root's included), then set the user.
/// A `pre_exec` hook would run only after the user change, too late for `setgroups`, so
/// none is used. The child ends up with the user's primary group alone.
pub fn as_cluster_user(cmd: &mut Command) -> &mut Command {
    let Some(user) = cluster_user() else {
        return cmd;
    };
    cmd.gid(user.gid.as_raw()).uid(user.uid.as_raw());

    let home = if user.dir.is_dir() {
        user.dir.clone()
    } else {
        PathBuf::from("/tmp")
    };
    cmd.env("HOME", &home)
        .env("USER", &user.name)
        .env("LOGNAME", &user.name);
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(&home);
    }
    cmd
}

/// Gives `path` (not its contents) to the cluster user when running as root.
fn hand_over(path: &Path) -> Result<()> {
    let Some(user) = cluster_user() else {
        return Ok(());
    };
    chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
        .with_context(|| format!("failed to chown {} to {}", path.display(), user.name))
}

/// Gives `path` and everything below it to the cluster user when running as root; does
/// nothing otherwise. Symbolic links are changed themselves, never followed.
///
/// Use it on anything a test wrote as root that a server must own, such as a data
/// directory restored from a backup.
pub fn fix_ownership(path: &Path) {
    if let Some(user) = cluster_user() {
        must(chown_tree(path, &user));
    }
}

fn chown_tree(path: &Path, user: &User) -> Result<()> {
    lchown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
        .with_context(|| format!("failed to chown {} to {}", path.display(), user.name))?;

    let meta =
        fs::symlink_metadata(path).with_context(|| format!("failed to stat {}", path.display()))?;
    if meta.is_dir() {
        let entries =
            fs::read_dir(path).with_context(|| format!("failed to list {}", path.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("failed to list {}", path.display()))?;
            chown_tree(&entry.path(), user)?;
        }
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("failed to chmod {mode:o} {}", path.display()))
}

/// The directory that scratch directories and binary copies go in.
///
/// `WALKEEP_TEST_TMPDIR` overrides it. As root it is `/tmp` rather than `$TMPDIR`, because
/// the cluster user must be able to pass through it.
fn scratch_base() -> PathBuf {
    if let Some(dir) = env::var_os("WALKEEP_TEST_TMPDIR") {
        return PathBuf::from(dir);
    }
    if cluster_user().is_some() {
        PathBuf::from("/tmp")
    } else {
        env::temp_dir()
    }
}

// ---------------------------------------------------------------------------------------
// walkeep binaries
// ---------------------------------------------------------------------------------------

/// Returns the path of the walkeep binary `name` ("walkeep", "walkeep-archive" or
/// "walkeep-restore"), in a place the cluster user can read and run it.
///
/// The server runs `archive_command` and `restore_command` as the cluster user, who may not
/// be able to enter cargo's target directory. So the first call in a test process copies
/// all three binaries into a new directory under the scratch base (mode 0755, files 0755);
/// every call returns a path in that copy.
pub fn bin(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    assert!(
        BINARIES.iter().any(|(known, _)| *known == name),
        "no walkeep binary is called {name:?}"
    );
    DIR.get_or_init(|| must(copy_binaries())).join(name)
}

/// The walkeep binary `name`, run as the cluster user and untouched by the caller's walkeep
/// settings: no `WALKEEP_*` variable and no `RUST_LOG` from the environment, and settings
/// from the configuration file `config` alone (`/dev/null` for none).
pub fn walkeep_command(name: &str, config: &Path) -> Command {
    let mut cmd = Command::new(bin(name));
    for (var, _) in env::vars_os() {
        if var.to_string_lossy().starts_with("WALKEEP_") || var == "RUST_LOG" {
            cmd.env_remove(var);
        }
    }
    cmd.env("WALKEEP_CONFIG", config);
    as_cluster_user(&mut cmd);
    cmd
}

fn copy_binaries() -> Result<PathBuf> {
    let base = scratch_base();
    remove_stale_binary_copies(&base);

    let dir = tempfile::Builder::new()
        .prefix(&format!("{BIN_COPY_PREFIX}{}-", std::process::id()))
        .tempdir_in(&base)
        .with_context(|| format!("failed to create a directory in {}", base.display()))?
        .keep();
    set_mode(&dir, 0o755)?;

    for (name, source) in BINARIES {
        let target = dir.join(name);
        fs::copy(source, &target)
            .with_context(|| format!("failed to copy {source} to {}", target.display()))?;
        set_mode(&target, 0o755)?;
    }
    Ok(dir)
}

/// Removes binary copies left by test processes that have exited.
///
/// A copy lives in a static, which is never dropped, so no process removes its own; the
/// next one does, by the process id in the directory name.
fn remove_stale_binary_copies(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|name| name.strip_prefix(BIN_COPY_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok());
        if let Some(pid) = pid.filter(|pid| *pid > 0) {
            // Signal 0 only checks: ESRCH means no such process (EPERM means another
            // user's process, which is alive).
            if kill(Pid::from_raw(pid), None) == Err(Errno::ESRCH) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Scratch directories
// ---------------------------------------------------------------------------------------

/// A temporary directory owned by the cluster user (mode 0700), removed on drop.
///
/// Set `WALKEEP_KEEP_SCRATCH=1` to keep it for a look after the test.
pub struct Scratch {
    dir: Option<TempDir>,
    path: PathBuf,
}

impl Scratch {
    /// Creates a scratch directory under `/tmp` (as root) or `$TMPDIR`.
    pub fn new() -> Scratch {
        let base = scratch_base();
        let dir = tempfile::Builder::new()
            .prefix("walkeep-test-")
            .tempdir_in(&base)
            .unwrap_or_else(|err| {
                panic!(
                    "failed to create a scratch directory in {}: {err}",
                    base.display()
                )
            });
        let path = dir.path().to_path_buf();
        must(set_mode(&path, 0o700));
        must(hand_over(&path));
        Scratch {
            dir: Some(dir),
            path,
        }
    }

    /// The scratch directory itself.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns `<scratch>/<name>`, creating it and any missing parents (mode 0700, owned by
    /// the cluster user). `name` is relative and may have several components.
    pub fn dir(&self, name: &str) -> PathBuf {
        assert!(
            Path::new(name).is_relative(),
            "scratch subdirectory {name:?} must be relative"
        );
        let mut path = self.path.clone();
        for component in Path::new(name).components() {
            path.push(component);
            if !path.exists() {
                must(make_private_dir(&path));
            }
        }
        path
    }
}

impl Default for Scratch {
    fn default() -> Scratch {
        Scratch::new()
    }
}

fn make_private_dir(path: &Path) -> Result<()> {
    fs::create_dir(path).with_context(|| format!("failed to create {}", path.display()))?;
    set_mode(path, 0o700)?;
    hand_over(path)
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let keep = env::var_os("WALKEEP_KEEP_SCRATCH").is_some_and(|v| !v.is_empty());
        if keep {
            if let Some(dir) = self.dir.take() {
                eprintln!("keeping scratch directory {}", dir.keep().display());
            }
        } else if thread::panicking() {
            eprintln!(
                "removing scratch directory {}; set WALKEEP_KEEP_SCRATCH=1 to keep it",
                self.path.display()
            );
        }
    }
}

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// Another process may take it before the server binds it; [`Cluster::start`] retries
/// once on a new port when that happens.
pub fn free_port() -> u16 {
    let listener =
        TcpListener::bind("127.0.0.1:0").expect("failed to bind a TCP port on 127.0.0.1");
    listener
        .local_addr()
        .expect("failed to read the address of a bound socket")
        .port()
}

// ---------------------------------------------------------------------------------------
// Running programs
// ---------------------------------------------------------------------------------------

/// Runs `cmd` to completion with no standard input, logging it first, and returns its
/// output whatever the exit status. Panics only if it cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    eprintln!("+ {}", describe(cmd));
    cmd.output()
        .unwrap_or_else(|err| panic!("failed to start {}: {err}", describe(cmd)))
}

/// Like [`run`], but panics with stdout and stderr unless `cmd` exits with status 0.
pub fn run_ok(cmd: &mut Command) -> Output {
    let output = run(cmd);
    if !output.status.success() {
        panic!(
            "{} failed with {}\n--- stdout\n{}\n--- stderr\n{}",
            describe(cmd),
            output.status,
            lossy(&output.stdout),
            lossy(&output.stderr)
        );
    }
    output
}

/// Renders a command as program and arguments, for logs and failure messages.
fn describe(cmd: &Command) -> String {
    let words = std::iter::once(cmd.get_program()).chain(cmd.get_args());
    words
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Returns the path of the PostgreSQL program `name` (initdb, pg_ctl, psql, pgbench,
/// pg_waldump, pg_basebackup, ...).
///
/// The directory is, in order: `WALKEEP_PG_BINDIR`; `pg_config --bindir`, if it holds
/// initdb; Debian's `/usr/lib/postgresql/15/bin`; otherwise the bare name, found on PATH.
pub fn pg_bin(name: &str) -> PathBuf {
    static BINDIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    match BINDIR.get_or_init(find_pg_bindir) {
        Some(dir) => dir.join(name),
        None => PathBuf::from(name),
    }
}

fn find_pg_bindir() -> Option<PathBuf> {
    if let Some(dir) = env::var_os("WALKEEP_PG_BINDIR") {
        return Some(PathBuf::from(dir));
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(lossy(&output.stdout).trim()));
    let found = from_pg_config
        .into_iter()
        .chain([PathBuf::from(DEBIAN_PG15_BINDIR)])
        .find(|dir| dir.join("initdb").is_file());

    // The project targets PostgreSQL 15; another major version may work, but say so.
    let postgres = found
        .as_ref()
        .map_or(PathBuf::from("postgres"), |d| d.join("postgres"));
    if let Ok(output) = Command::new(&postgres).arg("--version").output() {
        let version = lossy(&output.stdout);
        if !version.contains(") 15.") {
            eprintln!(
                "warning: tests expect PostgreSQL 15, found {}",
                version.trim()
            );
        }
    }
    found
}

/// Returns a command for the PostgreSQL program `name`, without the caller's `PG*`
/// environment variables and with untranslated messages (`LC_ALL=C`).
pub fn pg_command(name: &str) -> Command {
    let mut cmd = Command::new(pg_bin(name));
    for (key, _) in env::vars_os() {
        if key.to_str().is_some_and(|key| key.starts_with("PG")) {
            cmd.env_remove(key);
        }
    }
    cmd.env("LC_ALL", "C");
    cmd
}

// ---------------------------------------------------------------------------------------
// Clusters
// ---------------------------------------------------------------------------------------

/// How [`Cluster::init`] creates a cluster.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// WAL segment size in MB (`initdb --wal-segsize`); `None` keeps the default, 16 MB.
    pub wal_segsize_mb: Option<u32>,
    /// Whether initdb enables data checksums; true by default.
    pub data_checksums: bool,
    /// Lines appended to postgresql.conf after the harness's own, so they win; for example
    /// `archive_mode = on` and an `archive_command`.
    pub conf: Vec<String>,
}

impl Default for InitOptions {
    fn default() -> InitOptions {
        InitOptions {
            wal_segsize_mb: None,
            data_checksums: true,
            conf: Vec::new(),
        }
    }
}

impl InitOptions {
    /// Adds one line for postgresql.conf.
    pub fn with_conf(mut self, line: impl Into<String>) -> InitOptions {
        self.conf.push(line.into());
        self
    }

    /// Sets the WAL segment size in MB.
    pub fn with_wal_segsize_mb(mut self, mb: u32) -> InitOptions {
        self.wal_segsize_mb = Some(mb);
        self
    }
}

/// A PostgreSQL server in a scratch directory, listening on 127.0.0.1 only, with trust
/// authentication for the superuser `postgres`.
///
/// Its data directory is `<scratch>/<name>`, its log `<scratch>/<name>.log` and its Unix
/// socket directory `<scratch>/<name>.sock`. Dropping it stops a running server with
/// `pg_ctl stop -m immediate`; drop it before its [`Scratch`] (declaring the cluster after
/// the scratch does that).
pub struct Cluster {
    /// Name given at creation; the last component of `pgdata`.
    pub name: String,
    /// The data directory.
    pub pgdata: PathBuf,
    /// TCP port on 127.0.0.1; changes if [`Cluster::start`] finds it taken.
    pub port: u16,
    /// Directory of the server's Unix socket.
    pub socket_dir: PathBuf,
    /// The server log (pg_ctl -l), outside the data directory so backups leave it alone.
    pub log_file: PathBuf,
}

impl Cluster {
    /// Creates a cluster with initdb as the cluster user, and configures it; does not start
    /// it.
    ///
    /// initdb runs with `-U postgres --auth=trust --no-sync --encoding=UTF8 --locale=C`,
    /// plus `--data-checksums` and `--wal-segsize` as `opts` says. postgresql.conf gets the
    /// harness's settings (fsync stays on: tests check what survives a crash), then
    /// `opts.conf`.
    pub fn init(scratch: &Scratch, name: &str, opts: InitOptions) -> Cluster {
        let pgdata = scratch.path().join(name);
        assert!(!pgdata.exists(), "{} already exists", pgdata.display());

        let mut initdb = pg_command("initdb");
        initdb.arg("-D").arg(&pgdata).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "--no-instructions",
            "--encoding=UTF8",
            "--locale=C",
        ]);
        if opts.data_checksums {
            initdb.arg("--data-checksums");
        }
        if let Some(mb) = opts.wal_segsize_mb {
            initdb.arg(format!("--wal-segsize={mb}"));
        }
        run_ok(as_cluster_user(&mut initdb));

        let cluster = Cluster::in_scratch(scratch, pgdata);
        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("port = {}", cluster.port),
            format!(
                "unix_socket_directories = '{}'",
                cluster.socket_dir.display()
            ),
            "shared_buffers = 32MB".to_string(),
            "max_wal_size = 256MB".to_string(),
            "logging_collector = off".to_string(),
            "log_min_messages = info".to_string(),
            "log_line_prefix = '%m [%p] '".to_string(),
            "lc_messages = 'C'".to_string(),
        ];
        conf.extend(opts.conf);
        cluster.append_conf(&conf);
        cluster
    }

    /// Adopts an existing data directory, such as one restored from a backup, as a
    /// cluster with a new port and socket directory; does not start it.
    ///
    /// Gives the directory to the cluster user and sets its mode to 0700, as the server
    /// requires. The name is the directory's last component.
    pub fn from_existing(scratch: &Scratch, pgdata: impl Into<PathBuf>) -> Cluster {
        let pgdata = pgdata.into();
        assert!(
            pgdata.join("PG_VERSION").is_file(),
            "{} is not a data directory: it has no PG_VERSION",
            pgdata.display()
        );
        fix_ownership(&pgdata);
        must(set_mode(&pgdata, 0o700));

        let cluster = Cluster::in_scratch(scratch, pgdata);
        cluster.append_conf(&[
            format!("port = {}", cluster.port),
            format!(
                "unix_socket_directories = '{}'",
                cluster.socket_dir.display()
            ),
        ]);
        cluster
    }

    fn in_scratch(scratch: &Scratch, pgdata: PathBuf) -> Cluster {
        let name = pgdata
            .file_name()
            .unwrap_or_else(|| panic!("{} has no last component", pgdata.display()))
            .to_string_lossy()
            .into_owned();
        Cluster {
            socket_dir: scratch.dir(&format!("{name}.sock")),
            log_file: scratch.path().join(format!("{name}.log")),
            port: free_port(),
            name,
            pgdata,
        }
    }

    /// Appends `lines` to postgresql.conf; later lines win over earlier ones. A running
    /// server sees them after [`Cluster::reload`] or a restart.
    pub fn append_conf<S: AsRef<str>>(&self, lines: &[S]) {
        let path = self.pgdata.join("postgresql.conf");
        let mut text = String::from("\n# added by the walkeep test harness\n");
        for line in lines {
            text.push_str(line.as_ref());
            text.push('\n');
        }
        must(append_to(&path, &text));
    }

    /// Writes `contents` to `<pgdata>/<relative>`, owned by the cluster user; for example
    /// `recovery.signal`.
    pub fn write_file(&self, relative: &str, contents: &str) {
        let path = self.pgdata.join(relative);
        fs::write(&path, contents)
            .unwrap_or_else(|err| panic!("failed to write {}: {err}", path.display()));
        must(hand_over(&path));
    }

    /// Starts the server with `pg_ctl start -w`, as the cluster user; panics with pg_ctl's
    /// output and the server log if it does not come up.
    pub fn start(&mut self) {
        if let Err(message) = self.try_start() {
            panic!("{message}");
        }
    }

    /// Starts the server like [`Cluster::start`], or returns why it did not come up: for
    /// tests in which the server is expected to refuse.
    ///
    /// If the port turns out to be taken, retries once on a new one.
    pub fn try_start(&mut self) -> Result<(), String> {
        let offset = self.log_len();
        let output = self.pg_ctl_start();
        if output.status.success() {
            return Ok(());
        }
        let log = self.log_since(offset);
        if !log.contains("Address already in use") {
            return Err(self.start_failure(&output, &log));
        }

        let taken = self.port;
        self.port = free_port();
        eprintln!(
            "port {taken} was taken; starting {} on {}",
            self.name, self.port
        );
        self.append_conf(&[format!("port = {}", self.port)]);
        let offset = self.log_len();
        let output = self.pg_ctl_start();
        if output.status.success() {
            Ok(())
        } else {
            Err(self.start_failure(&output, &self.log_since(offset)))
        }
    }

    fn pg_ctl_start(&self) -> Output {
        // Port and socket directory go on the command line, so they win over a
        // postgresql.auto.conf or a configuration restored from another cluster.
        let options = format!("-p {} -k '{}'", self.port, self.socket_dir.display());
        let mut pg_ctl = self.pg_ctl();
        pg_ctl.arg("-l").arg(&self.log_file).args([
            "-w",
            "-t",
            PG_CTL_TIMEOUT_SECS,
            "-o",
            &options,
            "start",
        ]);
        run(as_cluster_user(&mut pg_ctl))
    }

    fn start_failure(&self, output: &Output, log: &str) -> String {
        format!(
            "cluster {} did not start ({})\n--- pg_ctl stdout\n{}\n--- pg_ctl stderr\n{}\n\
             --- server log since the start (last {LOG_TAIL_LINES} lines)\n{}",
            self.name,
            output.status,
            lossy(&output.stdout),
            lossy(&output.stderr),
            tail(log, LOG_TAIL_LINES)
        )
    }

    /// Stops the server in fast mode and waits for it to exit.
    pub fn stop(&self) {
        self.pg_ctl_stop("fast");
    }

    /// Stops the server in immediate mode: no shutdown checkpoint, so the next start
    /// performs crash recovery, as after a power cut.
    pub fn stop_immediate(&self) {
        self.pg_ctl_stop("immediate");
    }

    fn pg_ctl_stop(&self, mode: &str) {
        let mut pg_ctl = self.pg_ctl();
        pg_ctl.args(["-m", mode, "-w", "-t", PG_CTL_TIMEOUT_SECS, "stop"]);
        let output = run(as_cluster_user(&mut pg_ctl));
        if !output.status.success() {
            panic!(
                "cluster {} did not stop ({})\n--- pg_ctl stderr\n{}\n--- server log\n{}",
                self.name,
                output.status,
                lossy(&output.stderr),
                self.log_tail(LOG_TAIL_LINES)
            );
        }
    }

    /// Stops the server (fast) and starts it again.
    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    /// Makes the running server reread its configuration files.
    pub fn reload(&self) {
        let mut pg_ctl = self.pg_ctl();
        pg_ctl.arg("reload");
        run_ok(as_cluster_user(&mut pg_ctl));
    }

    /// True if and only if a server is running on this data directory (`pg_ctl status`).
    pub fn is_running(&self) -> bool {
        let mut pg_ctl = self.pg_ctl();
        pg_ctl.arg("status");
        run(as_cluster_user(&mut pg_ctl)).status.success()
    }

    fn pg_ctl(&self) -> Command {
        let mut pg_ctl = pg_command("pg_ctl");
        pg_ctl.arg("-D").arg(&self.pgdata);
        pg_ctl
    }

    /// Runs `sql` with psql and returns its trimmed output: unaligned, tuples only, columns
    /// separated by `|`. Panics with psql's stderr if any statement fails.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql).unwrap_or_else(|stderr| {
            panic!(
                "psql on cluster {} failed\n--- sql\n{sql}\n--- stderr\n{stderr}",
                self.name
            )
        })
    }

    /// Runs `sql` like [`Cluster::psql`]; returns psql's stderr if it fails.
    ///
    /// The script goes through standard input, so statements run one by one in autocommit
    /// mode (VACUUM and CREATE DATABASE work) and the first error stops it.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        let port = self.port.to_string();
        let mut psql = pg_command("psql");
        psql.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        eprintln!("+ psql -p {port} <<< {sql}");
        let mut child = psql
            .spawn()
            .unwrap_or_else(|err| panic!("failed to start {}: {err}", describe(&psql)));

        // Write from another thread, so a long result cannot block psql while the script
        // is still being written. A write error means psql exited early; its stderr says why.
        let mut stdin = child.stdin.take().expect("psql's stdin is piped");
        let script = sql.to_owned();
        let writer = thread::spawn(move || stdin.write_all(script.as_bytes()));
        let output = child
            .wait_with_output()
            .unwrap_or_else(|err| panic!("failed to wait for psql: {err}"));
        let _ = writer.join();

        if output.status.success() {
            Ok(lossy(&output.stdout).trim().to_string())
        } else {
            Err(lossy(&output.stderr))
        }
    }

    /// Runs pgbench against the `postgres` database with `args` (which must not name a
    /// database) and returns its stdout; panics if it fails.
    pub fn pgbench(&self, args: &[&str]) -> String {
        let port = self.port.to_string();
        let mut pgbench = pg_command("pgbench");
        pgbench
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
            .args(args)
            .arg("postgres");
        lossy(&run_ok(&mut pgbench).stdout)
    }

    /// A libpq connection string for the superuser and the `postgres` database.
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// The whole server log; empty if the server never started.
    pub fn log(&self) -> String {
        fs::read(&self.log_file)
            .map(|bytes| lossy(&bytes))
            .unwrap_or_default()
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log(), lines)
    }

    fn log_len(&self) -> usize {
        fs::metadata(&self.log_file).map_or(0, |meta| meta.len() as usize)
    }

    fn log_since(&self, offset: usize) -> String {
        let bytes = fs::read(&self.log_file).unwrap_or_default();
        lossy(bytes.get(offset..).unwrap_or_default())
    }

    /// Waits until a restored cluster has replayed to its target and promoted; panics with
    /// its log if the server stops meanwhile, as it does when recovery fails.
    pub fn wait_for_promotion(&self, timeout: Duration) {
        self.wait_for(
            &format!("{} to reach its target and promote", self.name),
            timeout,
            || match self.try_psql("SELECT pg_is_in_recovery()") {
                Ok(in_recovery) => in_recovery == "f",
                Err(_) if !self.is_running() => panic!(
                    "the restored cluster {} stopped during recovery\n{}",
                    self.name,
                    self.log_tail(15)
                ),
                Err(_) => false,
            },
        );
    }

    /// Waits until PostgreSQL's archiver reports `name`, or a file that sorts after it, as
    /// archived: only then has `archive_command` returned for it, so everything the command
    /// writes (the stored object and its catalog entry) is in place. Seeing the object alone
    /// is not enough; the command may still be cataloging it.
    pub fn wait_archived(&self, name: &str, timeout: Duration) {
        let sql = format!(
            "SELECT coalesce(last_archived_wal, '') COLLATE \"C\" >= '{name}' \
             FROM pg_stat_archiver"
        );
        self.wait_for(
            &format!("the archiver to report {name} archived"),
            timeout,
            || self.psql(&sql) == "t",
        );
    }

    /// Calls `done` every 100 ms until it returns true; panics after `timeout`, naming
    /// `what` and quoting the server log.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done() {
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n\
                     --- server log of {} (last {LOG_TAIL_LINES} lines)\n{}",
                    self.name,
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

fn append_to(path: &Path, text: &str) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| format!("failed to open {} for appending", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("failed to append to {}", path.display()))?;
    hand_over(path)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- server log of cluster {} (last {LOG_TAIL_LINES} lines)\n{}",
                self.name,
                self.log_tail(LOG_TAIL_LINES)
            );
        }

        // No panics here: this may run while a test is already panicking.
        if self.pgdata.join("postmaster.pid").exists() {
            let mut pg_ctl = self.pg_ctl();
            pg_ctl.args(["-m", "immediate", "-w", "stop"]);
            let _ = as_cluster_user(&mut pg_ctl).output();
        }
    }
}

/// A command's standard error as text.
pub fn stderr_text(output: &Output) -> String {
    lossy(&output.stderr)
}

/// Panics, quoting stderr, unless `output` ended with exit status `expected`.
pub fn expect_status(output: &Output, expected: i32, what: &str) {
    assert_eq!(
        output.status.code(),
        Some(expected),
        "{what}: expected exit status {expected}, got {}\n--- stderr\n{}",
        output.status,
        stderr_text(output)
    );
}
