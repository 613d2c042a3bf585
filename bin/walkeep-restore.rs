//! `walkeep-restore %f %p`: PostgreSQL's `restore_command`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use walkeep::cli::{self, RepoArgs};
use walkeep::config::OnError;
use walkeep::exit::{self, RESTORE_ABSENT, RESTORE_FATAL, SUCCESS};
use walkeep::fetch::{restore_file, Fetched};
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
                  anything else - a corrupt object, an unreadable repository, a bad argument - \
                  which makes PostgreSQL stop recovery with FATAL instead of promoting early. \
                  With --on-error absent, errors exit 1 instead: for a standby that should fall \
                  back to streaming replication when the archive fails."
)]
struct Args {
    #[command(flatten)]
    repo: RepoArgs,

    /// What to report when a file cannot be delivered intact: `fatal` (exit 200, stops
    /// recovery) or `absent` (exit 1). Default: restore_on_error in the config file, else
    /// fatal.
    #[arg(long, value_enum, env = "WALKEEP_RESTORE_ON_ERROR")]
    on_error: Option<OnError>,

    /// Log decisions, not just the outcome.
    #[arg(short, long)]
    verbose: bool,

    /// WAL file name PostgreSQL asks for (%f).
    name: String,

    /// Where to put it (%p).
    path: PathBuf,
}

fn run(args: Args) -> u8 {
    if exit::fault("panic") {
        panic!("panic forced by WALKEEP_TEST_FAULT");
    }
    let mut on_error = args.on_error;
    let outcome = args.repo.resolve().and_then(|(file, location)| {
        on_error = on_error.or(file.restore_on_error);
        let repo = Repository::open(&location)?;
        restore_file(&repo, &args.name, &args.path)
    });
    match outcome {
        Ok(Fetched::Restored(meta)) => {
            tracing::info!(
                "restored {} ({} bytes, sha256 verified)",
                args.name,
                meta.size
            );
            SUCCESS
        }
        Ok(Fetched::Absent) => {
            tracing::debug!("{} is not in the repository", args.name);
            RESTORE_ABSENT
        }
        Err(err) => {
            cli::report(&err.context(format!("failed to restore {}", args.name)));
            match on_error.unwrap_or_default() {
                OnError::Fatal => RESTORE_FATAL,
                OnError::Absent => RESTORE_ABSENT,
            }
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
