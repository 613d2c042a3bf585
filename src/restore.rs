//! Restoring a base backup into a new data directory, set up for point-in-time recovery.
//!
//! The plan ([`crate::recovery::plan`]) is made and checked before the first byte is
//! written. Then every file is decompressed and checked against its SHA-256 in parallel,
//! and the directory is completed with what PostgreSQL needs to recover: the
//! `backup_label` and `tablespace_map` exactly as the backup recorded them, the recovery
//! settings in `postgresql.auto.conf` (with `restore_command` pointing at
//! `walkeep-restore` and this repository) and `recovery.signal` or `standby.signal`.
//!
//! Durability: each file is renamed into place from a temporary name once complete, but
//! not synced one by one (two flushes per file made a restore of a thousand files spend
//! seconds waiting on the disk). Once all are in place, each filesystem holding the data
//! directory or a tablespace is synced whole (`syncfs`), and only then are the backup
//! label, the recovery settings, the signal file and last `global/pg_control` written
//! and synced. A restore cut short before that leaves a directory without `pg_control`,
//! which PostgreSQL refuses to start (a data directory started without its backup label
//! would be silently corrupt), and which `walkeep restore` refuses to overwrite without
//! `--force`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use chrono::Utc;

use crate::backup::{human_bytes, progress_bar};
use crate::durable::{self, TempFile};
use crate::manifest::{self, FileEntry, Manifest};
use crate::object;
use crate::parallel;
use crate::recovery::{self, Plan, Request, Target, TimelineChoice};
use crate::repo::Repository;

/// The file whose absence keeps PostgreSQL from starting a data directory.
const PG_CONTROL: &str = "global/pg_control";

/// `recovery_target_action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetAction {
    /// Pause at the target so the result can be inspected (PostgreSQL's default).
    Pause,
    /// End recovery and open for writes on a new timeline.
    Promote,
    /// Stop the server at the target.
    Shutdown,
}

impl TargetAction {
    fn as_str(self) -> &'static str {
        match self {
            TargetAction::Pause => "pause",
            TargetAction::Promote => "promote",
            TargetAction::Shutdown => "shutdown",
        }
    }
}

/// What to restore, where, and how to recover.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// The new data directory.
    pub to: PathBuf,
    /// Where recovery stops.
    pub target: Target,
    /// Timeline to follow.
    pub timeline: TimelineChoice,
    /// A backup to use instead of the planner's choice.
    pub backup: Option<String>,
    /// What PostgreSQL does at the target.
    pub action: Option<TargetAction>,
    /// Whether the target itself is included (PostgreSQL's default: yes).
    pub inclusive: Option<bool>,
    /// Start as a standby (`standby.signal`) instead of a recovering primary.
    pub standby: bool,
    /// Empty a non-empty target directory first.
    pub force: bool,
    /// Files restored at once.
    pub jobs: usize,
    /// Tablespace locations to use instead of the original ones, by original location.
    pub tablespace_mapping: BTreeMap<String, PathBuf>,
    /// The `restore_command` to write.
    pub restore_command: String,
    /// Show progress on a terminal.
    pub progress: bool,
}

/// Quotes `text` for `sh` if it needs it.
pub fn shell_quote(text: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-:=@%+,".contains(c);
    if !text.is_empty() && text.chars().all(safe) {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// Quotes `text` as a `postgresql.conf` string value.
pub fn conf_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The `restore_command` for a repository: the `walkeep-restore` next to the running
/// binary (else the one on PATH), with the repository given explicitly, and the
/// configuration file when one was named (object storage settings live there).
pub fn restore_command_for(location: &str, config: Option<&Path>) -> String {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("walkeep-restore")))
        .filter(|p| p.is_file())
        .map_or_else(
            || "walkeep-restore".to_string(),
            |p| p.display().to_string(),
        );
    let config = config
        .and_then(|c| c.canonicalize().ok())
        .map(|c| format!(" --config {}", shell_quote(&c.display().to_string())))
        .unwrap_or_default();
    format!(
        "{} --repo {}{config} %f %p",
        shell_quote(&exe),
        shell_quote(&absolute_location(location))
    )
}

/// `location` as `restore_command` must name it: PostgreSQL runs the command in the data
/// directory, where a relative path means something else. URLs are kept as they are.
fn absolute_location(location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let path = Path::new(location);
    path.canonicalize()
        .or_else(|_| std::path::absolute(path))
        .map_or_else(|_| location.to_string(), |p| p.display().to_string())
}

/// Plans, checks and restores. Returns the plan followed.
pub fn run(repo: &Repository, options: &RestoreOptions) -> Result<Plan> {
    // Expiry must not delete the backup or WAL while they are being read.
    let _expire_lock = repo.storage().lock("expire", false)?;
    let request = Request {
        target: options.target.clone(),
        timeline: options.timeline,
        backup: options.backup.clone(),
        inclusive: options.inclusive.unwrap_or(true),
    };
    let plan = recovery::plan(repo, &request)?;
    for warning in &plan.warnings {
        tracing::warn!("{warning}");
    }
    let backup = &plan.backup;
    let tablespace_dirs = tablespace_targets(backup, options)?;
    prepare_directory(&options.to, options.force)?;
    for (oid, dir) in &tablespace_dirs {
        let mapped = options.tablespace_mapping.values().any(|d| d == dir);
        prepare_tablespace_directory(*oid, dir, options.force, mapped)?;
    }
    tracing::info!(
        "restoring backup {} ({}) to {}, then replaying WAL from {} along timeline {}",
        backup.id,
        human_bytes(backup.size),
        options.to.display(),
        plan.first_segment,
        plan.timeline
    );

    for dir in &backup.directories {
        let path = destination(&options.to, &tablespace_dirs, &dir.path);
        fs::create_dir_all(&path)
            .with_context(|| format!("failed to create {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(dir.mode & 0o7777 | 0o700))?;
    }
    // Opened before the first write: syncfs reports a writeback error only to handles
    // opened before it happened (Linux 5.8 and later; earlier kernels report none).
    let filesystems =
        FilesystemSync::open(std::iter::once(&options.to).chain(tablespace_dirs.values()))?;

    // pg_control last: without it PostgreSQL refuses to start, so a directory whose
    // restore was cut short cannot be started by mistake.
    let (control, files): (Vec<FileEntry>, Vec<FileEntry>) = backup
        .files
        .iter()
        .cloned()
        .partition(|f| f.path == PG_CONTROL);
    let bar = progress_bar(backup.size, options.progress);
    parallel::map(files, options.jobs, |entry| {
        let path = destination(&options.to, &tablespace_dirs, &entry.path);
        // Synced with the rest of the filesystem once every file is in place.
        restore_one(repo, backup, &entry, &path)?.publish_replace_unsynced(&path)?;
        bar.inc(entry.size);
        Ok(Some(()))
    })?;
    bar.finish_and_clear();
    filesystems.sync()?;

    write_recovery_files(&plan, options, &tablespace_dirs)?;
    crate::exit::stall("stall-before-control");
    for entry in &control {
        let path = options.to.join(&entry.path);
        restore_one(repo, backup, entry, &path)?.publish_replace(&path)?;
    }
    durable::fsync_dir(&options.to)?;
    Ok(plan)
}

/// Where each tablespace goes, by OID.
fn tablespace_targets(
    backup: &Manifest,
    options: &RestoreOptions,
) -> Result<BTreeMap<u32, PathBuf>> {
    let mut out = BTreeMap::new();
    for ts in &backup.tablespaces {
        let dir = options
            .tablespace_mapping
            .get(&ts.location)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(&ts.location));
        if dir.starts_with(&options.to) {
            bail!(
                "tablespace {} would be restored inside the data directory ({})",
                ts.oid,
                dir.display()
            );
        }
        out.insert(ts.oid, dir);
    }
    Ok(out)
}

fn destination(to: &Path, tablespaces: &BTreeMap<u32, PathBuf>, rel: &str) -> PathBuf {
    if let Some(rest) = rel.strip_prefix("pg_tblspc/") {
        if let Some((oid, inner)) = rest.split_once('/') {
            if let Some(dir) = oid.parse().ok().and_then(|oid: u32| tablespaces.get(&oid)) {
                return dir.join(inner);
            }
        }
    }
    to.join(rel)
}

/// Makes sure `dir` exists, is empty (emptying it with `force`) and is owner-only.
fn prepare_directory(dir: &Path, force: bool) -> Result<()> {
    if dir.exists() {
        let mut entries =
            fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
        if entries.next().is_some() {
            if !force {
                bail!(
                    "{} is not empty; restore into an empty directory, or pass --force to \
                     delete its contents",
                    dir.display()
                );
            }
            if let Some(pid) = running_postmaster(dir) {
                bail!(
                    "{} belongs to a running PostgreSQL server (postmaster.pid names process \
                     {pid}); stop it before restoring over it, even with --force",
                    dir.display()
                );
            }
            for entry in fs::read_dir(dir)? {
                let path = entry?.path();
                if path.is_dir() && !path.is_symlink() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                }
                .with_context(|| format!("failed to remove {}", path.display()))?;
            }
        }
    } else {
        durable::create_dir_all(dir)?;
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("failed to set permissions on {}", dir.display()))
}

/// [`prepare_directory`] for tablespace `oid`'s directory. Unmapped, a tablespace goes
/// back where the backed-up cluster kept it, which may be that very cluster's, in use: so
/// `force` empties only a directory given with `--tablespace-mapping` (`mapped`).
fn prepare_tablespace_directory(oid: u32, dir: &Path, force: bool, mapped: bool) -> Result<()> {
    let in_use = fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some());
    if in_use && force && !mapped {
        bail!(
            "tablespace {oid} would be restored into {}, which is not empty and may be a \
             running cluster's; --force empties only tablespace directories given with \
             --tablespace-mapping OLD=NEW",
            dir.display()
        );
    }
    prepare_directory(dir, force)
}

/// The process id in `dir/postmaster.pid` if that process is alive: the directory is a
/// running server's data directory.
fn running_postmaster(dir: &Path) -> Option<i32> {
    let text = fs::read_to_string(dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    let alive = match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(errno) => errno == nix::errno::Errno::EPERM,
    };
    (pid > 0 && alive).then_some(pid)
}

/// Decompresses `entry` of `backup` into a temporary file beside `path`, checked against
/// the manifest and with the file's mode; the caller publishes it.
fn restore_one(
    repo: &Repository,
    backup: &Manifest,
    entry: &FileEntry,
    path: &Path,
) -> Result<TempFile> {
    let key = manifest::file_key(&backup.id, &entry.path);
    let reader = repo.storage().open(&key)?.with_context(|| {
        format!(
            "backup {} is damaged: {} is missing from the repository",
            backup.id, entry.path
        )
    })?;
    let dir = path.parent().context("file without a directory")?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let mut temp = TempFile::new_in(dir, name)?;
    let meta = object::decode(reader, &key, &mut temp)?;
    if meta.sha256 != entry.sha256 || meta.size != entry.size {
        bail!(
            "backup {} is damaged: {} holds SHA-256 {} ({} bytes), the manifest records {} \
             ({} bytes)",
            backup.id,
            entry.path,
            meta.sha256,
            meta.size,
            entry.sha256,
            entry.size
        );
    }
    temp.file()
        .set_permissions(fs::Permissions::from_mode(entry.mode & 0o7777))?;
    Ok(temp)
}

/// One open directory on each filesystem a restore writes to, to sync them at the end.
struct FilesystemSync(Vec<(PathBuf, fs::File)>);

impl FilesystemSync {
    /// Opens the first of `dirs` on each filesystem.
    fn open<'a>(dirs: impl Iterator<Item = &'a PathBuf>) -> Result<FilesystemSync> {
        use std::os::unix::fs::MetadataExt;
        let mut devices = std::collections::BTreeSet::new();
        let mut handles = Vec::new();
        for dir in dirs {
            let handle =
                fs::File::open(dir).with_context(|| format!("failed to open {}", dir.display()))?;
            if devices.insert(handle.metadata()?.dev()) {
                handles.push((dir.clone(), handle));
            }
        }
        Ok(FilesystemSync(handles))
    }

    /// Flushes each filesystem to stable storage (`syncfs`).
    fn sync(&self) -> Result<()> {
        use std::os::fd::AsRawFd;
        for (dir, handle) in &self.0 {
            nix::unistd::syncfs(handle.as_raw_fd())
                .with_context(|| format!("failed to sync the filesystem of {}", dir.display()))?;
        }
        Ok(())
    }
}

/// Keys of `postgresql.auto.conf` that walkeep owns during a restore; earlier values (from
/// the backed-up cluster, perhaps itself restored by walkeep) are dropped, since two
/// recovery targets make PostgreSQL refuse to start.
fn is_recovery_key(key: &str) -> bool {
    key == "restore_command" || key.starts_with("recovery_target")
}

fn write_recovery_files(
    plan: &Plan,
    options: &RestoreOptions,
    tablespaces: &BTreeMap<u32, PathBuf>,
) -> Result<()> {
    let backup = &plan.backup;
    let to = &options.to;
    durable::write_replace(&to.join("backup_label"), backup.backup_label.as_bytes())?;
    if !backup.tablespace_map.is_empty() {
        // Each line is "<oid> <location>"; point moved tablespaces at their new place.
        let mut map = String::new();
        for line in backup.tablespace_map.lines() {
            let oid = line.split(' ').next().and_then(|o| o.parse::<u32>().ok());
            match oid.and_then(|oid| tablespaces.get(&oid).map(|d| (oid, d))) {
                Some((oid, dir)) => map.push_str(&format!("{oid} {}\n", dir.display())),
                None => map.push_str(&format!("{line}\n")),
            }
        }
        durable::write_replace(&to.join("tablespace_map"), map.as_bytes())?;
    }

    let auto_conf = to.join("postgresql.auto.conf");
    let existing = fs::read_to_string(&auto_conf).unwrap_or_default();
    let mut conf: String = existing
        .lines()
        .filter(|line| {
            let key = line.split('=').next().unwrap_or("").trim();
            !is_recovery_key(key)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    conf.push_str(&format!(
        "# Recovery settings written by walkeep restore at {} from backup {}.\n",
        Utc::now().format("%Y-%m-%d %H:%M:%S UTC"),
        backup.id
    ));
    let mut set =
        |key: &str, value: &str| conf.push_str(&format!("{key} = {}\n", conf_quote(value)));
    set("restore_command", &options.restore_command);
    match &plan.recovery_target {
        Target::End => {}
        Target::Immediate => set("recovery_target", "immediate"),
        Target::Time(t) => set(
            "recovery_target_time",
            &t.with_timezone(&Utc)
                .format("%Y-%m-%d %H:%M:%S%.6f+00")
                .to_string(),
        ),
        Target::Lsn(lsn) => set("recovery_target_lsn", &lsn.to_string()),
        Target::Xid(xid) => set("recovery_target_xid", &xid.to_string()),
        Target::Name(name) => set("recovery_target_name", name),
    }
    // A standby must follow its primary onto new timelines; a one-off recovery is pinned to
    // the timeline it was planned along, so that a timeline that branched before the
    // backup cannot be picked by mistake.
    if options.standby && options.timeline == TimelineChoice::Latest {
        set("recovery_target_timeline", "latest");
    } else {
        set("recovery_target_timeline", &plan.timeline.to_string());
    }
    if let Some(inclusive) = plan.recovery_inclusive.or(options.inclusive) {
        set(
            "recovery_target_inclusive",
            if inclusive { "on" } else { "off" },
        );
    }
    if let Some(action) = options.action {
        set("recovery_target_action", action.as_str());
    }
    durable::write_replace(&auto_conf, conf.as_bytes())?;

    let signal = if options.standby {
        "standby.signal"
    } else {
        "recovery.signal"
    };
    let mut file = TempFile::new_in(to, signal)?;
    file.write_all(b"")?;
    file.publish_replace(&to.join(signal))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(
            shell_quote("/usr/bin/walkeep-restore"),
            "/usr/bin/walkeep-restore"
        );
        assert_eq!(shell_quote("/my repo/it's"), "'/my repo/it'\\''s'");
        assert_eq!(conf_quote("a 'b' %f"), "'a ''b'' %f'");
    }

    #[test]
    fn restore_command_names_the_repository_absolutely() {
        let cwd = std::env::current_dir().unwrap();
        let command = restore_command_for("relative/repo", None);
        let expected = shell_quote(&cwd.join("relative/repo").display().to_string());
        assert!(
            command.contains(&format!("--repo {expected} ")),
            "{command}"
        );
        let command = restore_command_for("s3://bucket/prefix", None);
        assert!(command.contains("--repo s3://bucket/prefix "), "{command}");
    }

    #[test]
    fn force_empties_only_a_mapped_tablespace_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("PG_15_202209061");
        fs::write(&file, "in use").unwrap();
        let err = prepare_tablespace_directory(16385, dir.path(), true, false).unwrap_err();
        assert!(
            format!("{err:#}").contains("--tablespace-mapping"),
            "{err:#}"
        );
        assert!(file.exists());
        prepare_tablespace_directory(16385, dir.path(), true, true).unwrap();
        assert!(!file.exists());
    }

    #[test]
    fn force_never_empties_a_running_servers_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("PG_VERSION");
        fs::write(&file, "15\n").unwrap();
        // This test process stands in for a live postmaster.
        fs::write(
            dir.path().join("postmaster.pid"),
            format!("{}\n/some/pgdata\n", std::process::id()),
        )
        .unwrap();
        let err = prepare_directory(dir.path(), true).unwrap_err();
        assert!(
            format!("{err:#}").contains("running PostgreSQL server"),
            "{err:#}"
        );
        assert!(file.exists());

        // A stale pid file (its process gone) is only a leftover.
        fs::write(dir.path().join("postmaster.pid"), "99999999\n").unwrap();
        prepare_directory(dir.path(), true).unwrap();
        assert!(!file.exists());
    }
}
