//! Restore prefetch: fetching the next segments of a timeline before PostgreSQL asks.
//!
//! PostgreSQL runs `restore_command` for one file at a time, and recovery waits for each.
//! With a spool configured, a call for segment N also makes sure that a background worker
//! is fetching the next `width` segments of N's timeline into `<spool area>/restore/`,
//! outside `pg_wal` (PostgreSQL and pg_rewind expect no foreign files there). A later call
//! for one of them moves it from the spool to `%p` instead of reading the repository.
//!
//! The invariants:
//!
//! - a spooled file is delivered only once it has hashed to the SHA-256 its object's
//!   trailer recorded (kept in its name, `<segment>.<sha256>`) and its header has named
//!   this repository's cluster. The worker checks both as it writes the file, then records
//!   the file's [`Stamp`] and the boot it was made in beside it (`.verified`); a call that
//!   finds the file with that stamp in that boot moves it into place without reading it
//!   (a write changes the stamp, and an unsynced file is what was written until the
//!   machine restarts; what the disk might garble in between, PostgreSQL's CRC of every
//!   record still catches). Any other file is hashed and checked again, and one that fails is
//!   removed and the segment fetched from the repository as usual. So the spool needs no
//!   fsync and is never trusted blindly;
//! - the spool holds at most `width` segments: those in the *window*, the segments of one
//!   timeline that the last call wants next, kept in `restore/state`. Each call moves the
//!   window to the segments after the one asked for and removes every spooled file outside
//!   it, so the spool is discarded when the timeline changes; it is emptied when a file is
//!   absent or a timeline history file is asked for, which is how recovery ends (and how
//!   it starts);
//! - an absent file is answered as fast as without prefetch: no worker is started for it.
//!
//! Coordination: the window is read and written under an exclusive `flock` of
//! `restore/state`, and the worker publishes a segment under that lock only if the window
//! still wants it. One worker runs at a time, holding `restore/worker.lock`; it fetches in
//! parallel (`width` threads, each streaming one segment in 1 MiB chunks), stops at the
//! first absent segment (the end of the archive), lingers briefly for the window to move,
//! and exits. It gives up its lock under the state lock after finding nothing to do, so a
//! call that moves the window either is seen by the running worker or starts a new one.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fs2::FileExt;
use serde::{Deserialize, Serialize};

use crate::durable::{self, TempFile, FILE_MODE, TEMP_PREFIX};
use crate::fetch::{self, Fetched};
use crate::object;
use crate::repo::Repository;
use crate::spool::{self, Spool, Stamp};
use crate::wal::{SegmentName, WalFileName};

/// The spool subdirectory that holds prefetched segments.
pub const RESTORE_DIR: &str = "restore";

/// The window, read and written under `flock`.
const STATE_FILE: &str = "state";

/// Held by the running worker.
const WORKER_LOCK: &str = "worker.lock";

/// The last worker's log.
const WORKER_LOG: &str = "worker.log";

/// The largest default width: more parallel fetches rarely help one recovery.
pub const MAX_DEFAULT_WIDTH: usize = 8;

/// How long a call waits for the worker to finish the very segment it asks for, before
/// fetching it itself.
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(30);

/// How long an idle worker waits for the window to move before it exits.
const LINGER: Duration = Duration::from_secs(2);

/// How often waiting parties look again.
const POLL: Duration = Duration::from_millis(5);

/// The default width: the number of cores, at most [`MAX_DEFAULT_WIDTH`].
pub fn default_width() -> usize {
    spool::default_width().min(MAX_DEFAULT_WIDTH)
}

/// The width used for a configured `width`: at most [`spool::MAX_WIDTH`].
pub fn width(configured: Option<usize>) -> usize {
    configured
        .unwrap_or_else(default_width)
        .min(spool::MAX_WIDTH)
}

/// The segments wanted in the spool: numbers `from` to `to`, inclusive, of `timeline`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Window {
    timeline: u32,
    from: u64,
    to: u64,
}

impl Window {
    /// The `width` segments from number `from` on.
    fn new(timeline: u32, from: u64, width: usize) -> Window {
        Window {
            timeline,
            from,
            to: from + width.max(1) as u64 - 1,
        }
    }

    fn contains(&self, timeline: u32, segno: u64) -> bool {
        timeline == self.timeline && (self.from..=self.to).contains(&segno)
    }
}

/// A prefetched segment in the spool.
#[derive(Clone, Debug)]
struct Spooled {
    segment: SegmentName,
    segno: u64,
    sha256: String,
    path: PathBuf,
}

/// Suffix of the file that records how a spooled file looked when it was verified.
const VERIFIED_SUFFIX: &str = ".verified";

/// What the worker records beside a spooled file it verified.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Verified {
    stamp: Stamp,
    boot_id: String,
}

/// The file recording the verification of the spooled file at `path`.
fn verified_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(VERIFIED_SUFFIX);
    PathBuf::from(name)
}

/// Records that the spooled file at `path` was verified, as it is now. Not synced: a
/// record lost or torn only costs the next call a hash.
fn record_verified(path: &Path) -> Result<()> {
    let Some(boot_id) = durable::boot_id() else {
        return Ok(());
    };
    let stamp =
        Stamp::of_path(path).with_context(|| format!("failed to stat {}", path.display()))?;
    let record = serde_json::to_vec(&Verified { stamp, boot_id })?;
    let marker = verified_path(path);
    fs::write(&marker, record).with_context(|| format!("failed to write {}", marker.display()))
}

/// True if and only if the worker verified `file` (open at `path`) and it is unchanged
/// since, in this boot.
fn verified_unchanged(path: &Path, file: &File) -> bool {
    let Ok(record) = fs::read(verified_path(path)) else {
        return false;
    };
    let Ok(recorded) = serde_json::from_slice::<Verified>(&record) else {
        return false;
    };
    let now = file.metadata().map(|m| Stamp::of(&m));
    now.is_ok_and(|now| now == recorded.stamp)
        && durable::boot_id().is_some_and(|id| id == recorded.boot_id)
}

/// How a call ended.
#[derive(Debug)]
pub enum Outcome {
    /// The file came from the repository (or is absent), as without prefetch.
    Fetched(Fetched),
    /// The segment came from the spool, verified.
    FromSpool {
        /// Its size in bytes.
        size: u64,
        /// Its SHA-256.
        sha256: String,
    },
}

/// How to start a worker: this program, and the arguments that find the repository.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The program to run (normally this one).
    pub program: PathBuf,
    /// Arguments that select the repository and settings, e.g. `--repo <location>`.
    pub args: Vec<std::ffi::OsString>,
}

/// The prefetch spool of one repository and one WAL directory.
#[derive(Debug)]
struct RestoreSpool {
    dir: PathBuf,
    segment_size: u64,
}

/// What a call found for the segment it asks for.
enum Claim {
    /// In the spool; now the caller's.
    Spooled(Spooled),
    /// Being fetched by the worker.
    InFlight,
    /// Neither.
    Missing,
}

/// Restores WAL file `name` to `dest` like [`fetch::restore_file`], through the spool
/// below `spool_root` with `width` segments fetched ahead, workers started with `launch`.
///
/// Problems with the spool itself are logged and the file is fetched as without prefetch;
/// errors are only those [`fetch::restore_file`] would return.
pub fn restore(
    repo: &Repository,
    name: &str,
    dest: &Path,
    spool_root: &Path,
    width: usize,
    launch: &Launch,
) -> Result<Outcome> {
    let plain = || fetch::restore_file(repo, name, dest).map(Outcome::Fetched);
    let wal_name: WalFileName = name.parse()?;
    let spool = Spool::open(spool_root, repo, spool::parent_dir(dest)).map(|s| RestoreSpool {
        dir: s.dir().join(RESTORE_DIR),
        segment_size: repo.segment_size(),
    });
    let spool = match spool {
        Ok(spool) => spool,
        Err(err) => {
            tracing::warn!("restoring {name} without prefetch: {err:#}");
            return plain();
        }
    };
    let segment = match wal_name {
        WalFileName::Segment(segment) => segment,
        WalFileName::History(_) => {
            // Asked at the start of recovery, at a timeline switch and when recovery ends:
            // nothing prefetched is wanted now. This is also the only sign that recovery
            // ended at its target: one that pauses there keeps the spool until it promotes.
            spool.discard_quietly();
            return plain();
        }
        _ => return plain(),
    };
    let Ok(segno) = segment.segno(repo.segment_size()) else {
        return plain();
    };
    if let Err(err) = crate::spool::create_dir(&spool.dir) {
        tracing::warn!("restoring {name} without prefetch: {err:#}");
        return plain();
    }

    // Take the segment from the spool, or wait while the worker finishes it.
    let deadline = Instant::now() + IN_FLIGHT_WAIT;
    loop {
        let claim = spool.claim(segment, segno, width, launch);
        match claim {
            Ok(Claim::Spooled(spooled)) => match spool.deliver(repo, &spooled, dest) {
                Ok(outcome) => return Ok(outcome),
                Err(err) => {
                    tracing::warn!(
                        "prefetched {name} is not used, fetching it from the repository: {err:#}"
                    );
                    let _ = fs::remove_file(&spooled.path);
                    break;
                }
            },
            Ok(Claim::InFlight) if Instant::now() < deadline => thread::sleep(POLL),
            Ok(Claim::InFlight) | Ok(Claim::Missing) => break,
            Err(err) => {
                tracing::warn!("restoring {name} without prefetch: {err:#}");
                return plain();
            }
        }
    }

    let Some(found) = fetch::find(repo, name)? else {
        // The end of the archive: recovery ends here, or a standby waits for more.
        spool.discard_quietly();
        return Ok(Outcome::Fetched(Fetched::Absent));
    };
    if let Err(err) = spool.advance(segment, segno, width, launch) {
        tracing::warn!("not prefetching after {name}: {err:#}");
    }
    let meta = fetch::restore_found(repo, found, dest)?;
    Ok(Outcome::Fetched(Fetched::Restored(Box::new(meta))))
}

impl RestoreSpool {
    /// Runs `edit` on the window, holding the state lock, and saves the window it leaves.
    fn with_state<T>(&self, edit: impl FnOnce(&mut Option<Window>) -> Result<T>) -> Result<T> {
        let path = self.dir.join(STATE_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&path)
            .with_context(|| format!("failed to open {}", path.display()))?;
        FileExt::lock_exclusive(&file)
            .with_context(|| format!("failed to lock {}", path.display()))?;
        let mut text = Vec::new();
        file.read_to_end(&mut text)
            .with_context(|| format!("failed to read {}", path.display()))?;
        // Unreadable state (say, after a crash) wants nothing; the next call sets it.
        let before: Option<Window> = serde_json::from_slice(&text).unwrap_or(None);
        let mut window = before;
        let outcome = edit(&mut window);
        if window != before {
            let text = serde_json::to_vec(&window)?;
            file.set_len(0)
                .and_then(|()| file.seek(SeekFrom::Start(0)))
                .and_then(|_| file.write_all(&text))
                .with_context(|| format!("failed to write {}", path.display()))?;
        }
        outcome
    }

    /// The prefetched segments in the spool.
    fn spooled(&self) -> Result<Vec<Spooled>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(e).with_context(|| format!("failed to list {}", self.dir.display()))
            }
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("failed to list {}", self.dir.display()))?;
            let file_name = entry.file_name();
            let Some((name, sha256)) = file_name.to_str().and_then(|n| n.split_once('.')) else {
                continue;
            };
            let is_sha256 = sha256.len() == 64
                && sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            let Ok(segment) = name.parse::<SegmentName>() else {
                continue;
            };
            let Ok(segno) = segment.segno(self.segment_size) else {
                continue;
            };
            if is_sha256 {
                out.push(Spooled {
                    segment,
                    segno,
                    sha256: sha256.to_string(),
                    path: entry.path(),
                });
            }
        }
        Ok(out)
    }

    /// Removes spooled segments outside `window` (all of them without one), and temporary
    /// files when no worker is running (a killed worker's).
    fn prune(&self, window: Option<Window>) -> Result<()> {
        for spooled in self.spooled()? {
            let wanted =
                window.is_some_and(|w| w.contains(spooled.segment.timeline, spooled.segno));
            if !wanted {
                tracing::debug!("discarding prefetched {}", spooled.segment);
                let _ = fs::remove_file(&spooled.path);
            }
        }
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let stale = path
                .to_str()
                .and_then(|p| p.strip_suffix(VERIFIED_SUFFIX))
                .is_some_and(|spooled| !Path::new(spooled).exists());
            if stale {
                let _ = fs::remove_file(&path);
            }
        }
        if !self.worker_running() {
            for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }

    /// True if and only if a worker holds the worker lock.
    fn worker_running(&self) -> bool {
        let Ok(file) = File::open(self.dir.join(WORKER_LOCK)) else {
            return false;
        };
        match FileExt::try_lock_exclusive(&file) {
            Ok(()) => {
                let _ = FileExt::unlock(&file);
                false
            }
            Err(_) => true,
        }
    }

    /// True if and only if the worker is writing `segment` now.
    fn in_flight(&self, segment: &SegmentName) -> bool {
        let prefix = format!("{TEMP_PREFIX}{segment}.");
        let temp_exists = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(&prefix));
        temp_exists && self.worker_running()
    }

    /// Moves the window to `segment` and the segments after it, and takes `segment` if it
    /// is spooled; then the window starts after it and a worker is started if needed.
    fn claim(
        &self,
        segment: SegmentName,
        segno: u64,
        width: usize,
        launch: &Launch,
    ) -> Result<Claim> {
        self.with_state(|window| {
            let timeline = segment.timeline;
            *window = Some(Window::new(timeline, segno, width));
            self.prune(*window)?;
            let mine = self.spooled()?.into_iter().find(|s| s.segment == segment);
            if let Some(spooled) = mine {
                *window = Some(Window::new(timeline, segno + 1, width));
                self.ensure_worker_or_warn(*window, launch);
                return Ok(Claim::Spooled(spooled));
            }
            if self.in_flight(&segment) {
                return Ok(Claim::InFlight);
            }
            Ok(Claim::Missing)
        })
    }

    /// Wants the segments after `segment`, which the caller fetches itself.
    fn advance(
        &self,
        segment: SegmentName,
        segno: u64,
        width: usize,
        launch: &Launch,
    ) -> Result<()> {
        self.with_state(|window| {
            *window = Some(Window::new(segment.timeline, segno + 1, width));
            self.prune(*window)?;
            self.ensure_worker_or_warn(*window, launch);
            Ok(())
        })
    }

    /// Empties the spool and wants nothing; a running worker drops what it fetches.
    fn discard(&self) -> Result<()> {
        if !self.dir.is_dir() {
            return Ok(());
        }
        self.with_state(|window| {
            *window = None;
            self.prune(None)
        })
    }

    fn discard_quietly(&self) {
        if let Err(err) = self.discard() {
            tracing::debug!("failed to empty the prefetch spool: {err:#}");
        }
    }

    fn ensure_worker_or_warn(&self, window: Option<Window>, launch: &Launch) {
        if let Err(err) = self.ensure_worker(window, launch) {
            tracing::warn!("not prefetching: {err:#}");
        }
    }

    /// Starts a worker, unless one is running or `window` is spooled already. Called
    /// holding the state lock.
    fn ensure_worker(&self, window: Option<Window>, launch: &Launch) -> Result<()> {
        let Some(window) = window else {
            return Ok(());
        };
        let present: BTreeSet<u64> = self
            .spooled()?
            .into_iter()
            .filter(|s| s.segment.timeline == window.timeline)
            .map(|s| s.segno)
            .collect();
        if (window.from..=window.to).all(|segno| present.contains(&segno)) || self.worker_running()
        {
            return Ok(());
        }
        let log_path = self.dir.join(WORKER_LOG);
        let log = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&log_path)
            .with_context(|| format!("failed to open {}", log_path.display()))?;
        let mut command = Command::new(&launch.program);
        command
            .arg("--prefetch-worker")
            .arg(&self.dir)
            .args(&launch.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // A session of its own: signals PostgreSQL sends to restore_command's process group
        // at shutdown do not reach it, and it outlives this call.
        unsafe {
            command.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(io::Error::from));
        }
        let child = command
            .spawn()
            .with_context(|| format!("failed to start {}", launch.program.display()))?;
        tracing::debug!(
            "started prefetch worker {} for segments {}..={} of timeline {}",
            child.id(),
            window.from,
            window.to,
            window.timeline
        );
        Ok(())
    }

    /// Moves a claimed segment to `dest` once it proves to be what its object held.
    fn deliver(&self, repo: &Repository, spooled: &Spooled, dest: &Path) -> Result<Outcome> {
        let name = spooled.segment.to_string();
        let dest_dir = spool::parent_dir(dest);
        let file_name = dest
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("restore");
        let what = spooled.path.display().to_string();
        let mut file =
            File::open(&spooled.path).with_context(|| format!("failed to open {what}"))?;
        let dest_dev = fs::metadata(dest_dir)
            .with_context(|| format!("failed to stat {}", dest_dir.display()))?
            .dev();
        let same_filesystem = file.metadata()?.dev() == dest_dev;
        let wal_name = WalFileName::Segment(spooled.segment);

        let (sha256, size) = if same_filesystem {
            let (sha256, size) = if verified_unchanged(&spooled.path, &file) {
                (spooled.sha256.clone(), file.metadata()?.len())
            } else {
                let (sha256, size) = object::sha256_of_reader(&mut file, &what)?;
                check(&sha256, &spooled.sha256, &name)?;
                fetch::check_header(repo, &wal_name, &mut file)?;
                (sha256, size)
            };
            // A move, not a write: the verified file keeps its inode, and PostgreSQL
            // fsyncs the restored WAL it keeps (see crate::fetch).
            fs::rename(&spooled.path, dest)
                .with_context(|| format!("failed to move {what} to {}", dest.display()))?;
            let _ = fs::remove_file(verified_path(&spooled.path));
            (sha256, size)
        } else {
            durable::sweep_stale(dest_dir, file_name);
            let mut temp = TempFile::new_in(dest_dir, file_name)?;
            let mut hasher = Hashing::default();
            object::for_each_chunk(&mut file, &what, |piece| {
                hasher.update(piece);
                temp.write_all(piece)
                    .with_context(|| format!("failed to write {}", temp.path().display()))
            })?;
            let (sha256, size) = hasher.finish();
            check(&sha256, &spooled.sha256, &name)?;
            fetch::check_header(repo, &wal_name, temp.file())?;
            temp.publish_replace_unsynced(dest)?;
            let _ = fs::remove_file(&spooled.path);
            let _ = fs::remove_file(verified_path(&spooled.path));
            (sha256, size)
        };
        Ok(Outcome::FromSpool { size, sha256 })
    }
}

fn check(found: &str, recorded: &str, name: &str) -> Result<()> {
    if found != recorded {
        bail!(
            "prefetched {name} is damaged: its object records SHA-256 {recorded}, the spooled \
             file hashes to {found}"
        );
    }
    Ok(())
}

/// SHA-256 and length of bytes fed in pieces.
#[derive(Default)]
struct Hashing {
    hasher: sha2::Sha256,
    size: u64,
}

impl Hashing {
    fn update(&mut self, piece: &[u8]) {
        use sha2::Digest;
        self.hasher.update(piece);
        self.size += piece.len() as u64;
    }

    fn finish(self) -> (String, u64) {
        use sha2::Digest;
        (hex::encode(self.hasher.finalize()), self.size)
    }
}

// ---------------------------------------------------------------------------------------
// The worker
// ---------------------------------------------------------------------------------------

/// Runs the prefetch worker for the spool directory `dir` (a `restore` directory made by
/// [`restore`]): fetches what the window wants with `width` threads until nothing is left
/// or the archive ends. Returns at once if another worker holds the lock.
pub fn run_worker(repo: &Repository, dir: &Path, width: usize) -> Result<()> {
    let spool = RestoreSpool {
        dir: dir.to_path_buf(),
        segment_size: repo.segment_size(),
    };
    let lock_path = dir.join(WORKER_LOCK);
    let lock = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(&lock_path)
        .with_context(|| format!("failed to open {}", lock_path.display()))?;
    if FileExt::try_lock_exclusive(&lock).is_err() {
        tracing::debug!("another prefetch worker is running");
        return Ok(());
    }
    let worker = Worker {
        repo,
        spool: &spool,
        taken: Mutex::new(BTreeSet::new()),
        end_of_archive: AtomicBool::new(false),
    };
    let mut lock = Some(lock);
    loop {
        thread::scope(|scope| {
            for _ in 0..width.max(1) {
                scope.spawn(|| worker.fetch_while_wanted());
            }
        });
        if worker.end_of_archive.load(Ordering::Relaxed) {
            // Give up the lock under the state lock, like an idle worker.
            return spool.with_state(|_| {
                lock.take();
                Ok(())
            });
        }

        // Idle: wait a little for the window to move.
        let idle_since = Instant::now();
        loop {
            let more = spool.with_state(|window| {
                let more = window.is_some() && worker.next_wanted(*window, false)?.is_some();
                if !more && (window.is_none() || idle_since.elapsed() >= LINGER) {
                    lock.take();
                }
                Ok(more)
            })?;
            if more {
                break;
            }
            if lock.is_none() {
                return Ok(());
            }
            thread::sleep(POLL * 4);
        }
    }
}

struct Worker<'a> {
    repo: &'a Repository,
    spool: &'a RestoreSpool,
    /// Segments this worker has fetched or is fetching (timeline, number).
    taken: Mutex<BTreeSet<(u32, u64)>>,
    end_of_archive: AtomicBool,
}

impl Worker<'_> {
    /// The first wanted segment that is neither spooled nor taken; marks it taken if `take`.
    fn next_wanted(&self, window: Option<Window>, take: bool) -> Result<Option<SegmentName>> {
        let Some(window) = window else {
            return Ok(None);
        };
        let present: BTreeSet<u64> = self
            .spool
            .spooled()?
            .into_iter()
            .filter(|s| s.segment.timeline == window.timeline)
            .map(|s| s.segno)
            .collect();
        let mut taken = self.taken.lock().unwrap();
        // What the window has left behind is not wanted again; keeps the set small.
        taken.retain(|&(timeline, segno)| timeline == window.timeline && segno >= window.from);
        for segno in window.from..=window.to {
            let key = (window.timeline, segno);
            if present.contains(&segno) || taken.contains(&key) {
                continue;
            }
            if take {
                taken.insert(key);
            }
            let segment = SegmentName::from_segno(window.timeline, segno, self.spool.segment_size);
            return Ok(Some(segment));
        }
        Ok(None)
    }

    /// One thread's loop: fetch the next wanted segment until none is left or the archive
    /// ends.
    fn fetch_while_wanted(&self) {
        while !self.end_of_archive.load(Ordering::Relaxed) {
            let next = self
                .spool
                .with_state(|window| self.next_wanted(*window, true));
            let segment = match next {
                Ok(Some(segment)) => segment,
                Ok(None) => return,
                Err(err) => {
                    tracing::warn!("prefetch worker stops: {err:#}");
                    return;
                }
            };
            match self.fetch(&segment) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::debug!("{segment} is not in the repository: the end of the archive");
                    self.end_of_archive.store(true, Ordering::Relaxed);
                }
                Err(err) => tracing::warn!("failed to prefetch {segment}: {err:#}"),
            }
        }
    }

    /// Fetches `segment` into the spool if the window still wants it once fetched;
    /// `Ok(false)` if the repository holds no such segment.
    fn fetch(&self, segment: &SegmentName) -> Result<bool> {
        let name = segment.to_string();
        let Some(found) = fetch::find(self.repo, &name)? else {
            return Ok(false);
        };
        let dir = &self.spool.dir;
        let (temp, meta) = fetch::decode_verified(self.repo, found, dir, &name)?;
        let segno = segment.segno(self.spool.segment_size)?;
        let published = self.spool.with_state(|window| {
            if !window.is_some_and(|w| w.contains(segment.timeline, segno)) {
                // Dropping the temporary file removes it.
                return Ok(false);
            }
            let path = dir.join(format!("{name}.{}", meta.sha256));
            // Not synced: see the module's invariants.
            temp.publish_replace_unsynced(&path)?;
            if let Err(err) = record_verified(&path) {
                tracing::debug!("{err:#}; {name} will be hashed again when delivered");
            }
            Ok(true)
        })?;
        if published {
            tracing::debug!("prefetched {name} ({} bytes)", meta.size);
        } else {
            tracing::debug!("prefetched {name}, no longer wanted; dropped");
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verified_file_is_trusted_only_unchanged_and_in_the_same_boot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("000000010000000000000003.abc");
        fs::write(&path, vec![7u8; 4096]).unwrap();
        let open = || File::open(&path).unwrap();
        assert!(
            !verified_unchanged(&path, &open()),
            "trusted without a record"
        );

        record_verified(&path).unwrap();
        assert!(verified_unchanged(&path, &open()));

        // The same size and bytes written again still change the stamp (past the clock
        // tick of the first write, for kernels with coarse file times).
        std::thread::sleep(Duration::from_millis(20));
        fs::write(&path, vec![7u8; 4096]).unwrap();
        assert!(!verified_unchanged(&path, &open()), "trusted after a write");

        // A record from another boot is worth nothing.
        record_verified(&path).unwrap();
        let marker = verified_path(&path);
        let mut record: Verified = serde_json::from_slice(&fs::read(&marker).unwrap()).unwrap();
        record.boot_id = "00000000-0000-0000-0000-000000000000".into();
        fs::write(&marker, serde_json::to_vec(&record).unwrap()).unwrap();
        assert!(
            !verified_unchanged(&path, &open()),
            "trusted across a restart"
        );

        // A torn record too.
        fs::write(&marker, b"{\"stamp\":").unwrap();
        assert!(!verified_unchanged(&path, &open()));
    }

    #[test]
    fn window_holds_width_segments_of_one_timeline() {
        let window = Window::new(2, 10, 3);
        assert_eq!((window.from, window.to), (10, 12));
        assert!(window.contains(2, 10) && window.contains(2, 12));
        assert!(!window.contains(2, 9) && !window.contains(2, 13));
        assert!(!window.contains(1, 11));
        assert_eq!(Window::new(1, 5, 0).to, 5);
    }

    #[test]
    fn state_round_trips_and_garbage_wants_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let spool = RestoreSpool {
            dir: dir.path().to_path_buf(),
            segment_size: 16 << 20,
        };
        let none = spool.with_state(|w| Ok(*w)).unwrap();
        assert_eq!(none, None);
        spool
            .with_state(|w| {
                *w = Some(Window::new(1, 7, 4));
                Ok(())
            })
            .unwrap();
        let back = spool.with_state(|w| Ok(*w)).unwrap();
        assert_eq!(back, Some(Window::new(1, 7, 4)));
        fs::write(dir.path().join(STATE_FILE), b"{garbage").unwrap();
        assert_eq!(spool.with_state(|w| Ok(*w)).unwrap(), None);
    }

    #[test]
    fn prune_keeps_only_wanted_segments() {
        let dir = tempfile::tempdir().unwrap();
        let spool = RestoreSpool {
            dir: dir.path().to_path_buf(),
            segment_size: 16 << 20,
        };
        let sha = "ab".repeat(32);
        for name in [
            "000000010000000000000004",
            "000000010000000000000005",
            "000000010000000000000008",
            "000000020000000000000005",
        ] {
            fs::write(dir.path().join(format!("{name}.{sha}")), b"x").unwrap();
        }
        fs::write(
            dir.path().join(format!("{TEMP_PREFIX}x.99999999.1.0")),
            b"x",
        )
        .unwrap();
        fs::write(dir.path().join("unrelated"), b"x").unwrap();
        spool.prune(Some(Window::new(1, 5, 3))).unwrap();
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                format!("000000010000000000000005.{sha}"),
                "unrelated".to_string()
            ]
        );
    }
}
