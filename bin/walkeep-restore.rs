//! `walkeep-restore %f %p`: PostgreSQL's `restore_command`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use walkeep::cli::{self, RepoArgs};
use walkeep::config::OnError;
use walkeep::exit::{self, RESTORE_ABSENT, RESTORE_FATAL, SUCCESS};
use walkeep::fetch::{restore_file, Fetched};
use walkeep::prefetch::{self, Launch, Outcome};
use walkeep::{logging, repo::Repository};

/// Delivers one WAL file from a walkeep repository, verified, to PostgreSQL.
///
/// Set for recovery:  restore_command = 'walkeep-restore %f %p'
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Exit status: 0 with the complete, verified file at the destination; 1 only \
                  when the repository holds no such file (PostgreSQL asks for files past the \
                  end of the archive, and for .history files, as a matter of course); 200 for \
                  anything else - a corrupt object, an unreadable repository, a segment that \
                  walkeep expire deleted, a bad argument - \
                  which makes PostgreSQL stop recovery with FATAL instead of promoting early. \
                  With --on-error absent, errors exit 1 instead on a standby (standby.signal \
                  in the data directory, the working directory of restore_command), which \
                  then falls back to streaming replication; archive recovery (PITR) stays \
                  fatal, since there 1 ends recovery early. Prefetching never \
                  changes the status: a spool problem is logged and the file fetched directly."
)]
struct Args {
    #[command(flatten)]
    repo: RepoArgs,

    /// What to report when a file cannot be delivered intact: `fatal` (exit 200, stops
    /// recovery) or `absent` (exit 1, on a standby only). Default: restore_on_error in the
    /// config file, else fatal.
    #[arg(long, value_enum, env = "WALKEEP_RESTORE_ON_ERROR")]
    on_error: Option<OnError>,

    /// Local directory, outside the data directory, to prefetch segments into; prefetch
    /// is on only when one is set. Default: spool_dir in the config file.
    #[arg(long, value_name = "DIR", env = "WALKEEP_SPOOL_DIR")]
    spool_dir: Option<PathBuf>,

    /// Segments of the same timeline to fetch ahead, in parallel, in the background (0:
    /// none; at most 12). Default: restore_prefetch in the config file, else the number of
    /// cores, at most 8.
    #[arg(long, value_name = "N")]
    prefetch: Option<usize>,

    /// Runs the background prefetch worker for a spool directory (started by this program).
    #[arg(long, value_name = "DIR", hide = true)]
    prefetch_worker: Option<PathBuf>,

    /// Log decisions, not just the outcome.
    #[arg(short, long)]
    verbose: bool,

    /// WAL file name PostgreSQL asks for (%f).
    #[arg(required_unless_present = "prefetch_worker")]
    name: Option<String>,

    /// Where to put it (%p).
    #[arg(required_unless_present = "prefetch_worker")]
    path: Option<PathBuf>,
}

fn run(args: Args) -> u8 {
    if exit::fault("panic") {
        panic!("panic forced by WALKEEP_TEST_FAULT");
    }
    if let Some(dir) = &args.prefetch_worker {
        return run_worker(&args, dir);
    }
    let (Some(name), Some(path)) = (args.name.as_deref(), args.path.as_deref()) else {
        unreachable!("clap requires both outside worker mode");
    };
    let mut on_error = args.on_error;
    let outcome = args.repo.resolve().and_then(|(file, location)| {
        on_error = on_error.or(file.restore_on_error);
        let width = prefetch::width(args.prefetch.or(file.restore_prefetch));
        let repo = Repository::open_with(&location, &file)?;
        match args.spool_dir.as_ref().or(file.spool_dir.as_ref()) {
            Some(spool) if width > 0 => match worker_launch(&args, &location, width) {
                Ok(launch) => prefetch::restore(&repo, name, path, spool, width, &launch),
                Err(err) => {
                    tracing::warn!("restoring {name} without prefetch: {err:#}");
                    restore_file(&repo, name, path).map(Outcome::Fetched)
                }
            },
            _ => restore_file(&repo, name, path).map(Outcome::Fetched),
        }
    });
    match outcome {
        Ok(Outcome::Fetched(Fetched::Restored(meta))) => {
            tracing::info!("restored {name} ({} bytes, sha256 verified)", meta.size);
            SUCCESS
        }
        Ok(Outcome::FromSpool { size, .. }) => {
            tracing::info!(
                "restored {name} from the prefetch spool ({size} bytes, sha256 verified)"
            );
            SUCCESS
        }
        Ok(Outcome::Fetched(Fetched::Absent)) => {
            tracing::debug!("{name} is not in the repository");
            RESTORE_ABSENT
        }
        Err(err) => {
            cli::report(&err.context(format!("failed to restore {name}")));
            match on_error.unwrap_or_default() {
                OnError::Fatal => RESTORE_FATAL,
                OnError::Absent if is_standby() => RESTORE_ABSENT,
                OnError::Absent => {
                    tracing::warn!(
                        "restore_on_error = absent applies to standbys only; without \
                         standby.signal this is archive recovery, which 'absent' would end \
                         early: stopping recovery instead"
                    );
                    RESTORE_FATAL
                }
            }
        }
    }
}

/// True if and only if PostgreSQL runs this as a standby: `restore_command` runs in the
/// data directory, which then holds `standby.signal`.
fn is_standby() -> bool {
    Path::new("standby.signal").exists()
}

/// How to start the prefetch worker: this program, with the repository already resolved.
fn worker_launch(args: &Args, location: &str, width: usize) -> anyhow::Result<Launch> {
    let program = std::env::current_exe().context("cannot find this program to start a worker")?;
    let mut worker_args: Vec<OsString> = vec![
        "--repo".into(),
        location.into(),
        "--prefetch".into(),
        width.to_string().into(),
    ];
    if let Some(config) = &args.repo.config {
        worker_args.extend(["--config".into(), config.clone().into_os_string()]);
    }
    if args.verbose {
        worker_args.push("--verbose".into());
    }
    Ok(Launch {
        program,
        args: worker_args,
    })
}

fn run_worker(args: &Args, dir: &Path) -> u8 {
    let outcome = args.repo.resolve().and_then(|(file, location)| {
        let width = prefetch::width(args.prefetch.or(file.restore_prefetch));
        let repo = Repository::open_with(&location, &file)?;
        prefetch::run_worker(&repo, dir, width)
    });
    match outcome {
        Ok(()) => SUCCESS,
        Err(err) => {
            cli::report(&err.context("prefetch worker failed"));
            RESTORE_FATAL
        }
    }
}

fn main() -> ExitCode {
    exit::guard(RESTORE_FATAL, || {
        let args: Args = cli::parse_or_exit(RESTORE_FATAL);
        logging::init(args.verbose);
        run(args)
    })
}
