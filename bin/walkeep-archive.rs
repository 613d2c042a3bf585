//! `walkeep-archive %p %f`: PostgreSQL's `archive_command`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use walkeep::archive::{archive_file, Archived};
use walkeep::cli::{self, RepoArgs};
use walkeep::exit::{self, ARCHIVE_FAILED, SUCCESS};
use walkeep::object::{self, Compression};
use walkeep::readahead::{self, Outcome};
use walkeep::{logging, repo::Repository};

/// Stores one WAL file durably in a walkeep repository.
///
/// Set in postgresql.conf:  archive_command = 'walkeep-archive %p %f'
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Exit status: 0 once the file is durable in the repository (PostgreSQL may \
                  then recycle it); 1 on any failure (PostgreSQL keeps the file and retries). \
                  Never above 125, which would make PostgreSQL's archiver exit FATAL. \
                  Files pushed ahead never change the status of the call for %f."
)]
struct Args {
    #[command(flatten)]
    repo: RepoArgs,

    /// zstd compression level (1 to 19). Default: compress_level in the config file, else 1.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=19))]
    compress_level: Option<i32>,

    /// Local directory for read-ahead markers, outside the data directory; read-ahead is
    /// on only when one is set. Default: spool_dir in the config file.
    #[arg(long, value_name = "DIR", env = "WALKEEP_SPOOL_DIR")]
    spool_dir: Option<PathBuf>,

    /// Other files marked .ready to store alongside this one, in parallel (0: none; at
    /// most 64). Default: archive_readahead in the config file, else the number of cores.
    #[arg(long, value_name = "N")]
    readahead: Option<usize>,

    /// Log decisions, not just the outcome.
    #[arg(short, long)]
    verbose: bool,

    /// Path of the file to archive (%p).
    path: PathBuf,

    /// Its WAL file name (%f).
    name: String,
}

fn run(args: Args) -> u8 {
    if exit::fault("panic") {
        panic!("panic forced by WALKEEP_TEST_FAULT");
    }
    let outcome = args.repo.resolve().and_then(|(file, location)| {
        let level = args
            .compress_level
            .or(file.compress_level)
            .unwrap_or(object::DEFAULT_LEVEL);
        let width = readahead::width(args.readahead.or(file.archive_readahead));
        let repo = Repository::open_with(&location, &file)?;
        match args.spool_dir.as_ref().or(file.spool_dir.as_ref()) {
            Some(spool) if width > 0 => {
                readahead::archive(&repo, &args.path, &args.name, level, spool, width)
            }
            // Alone, the one segment may use every core.
            _ => archive_file(&repo, &args.path, &args.name, Compression::parallel(level))
                .map(Outcome::Archived),
        }
    });
    match outcome {
        Ok(Outcome::Archived(Archived::Stored { meta, stored_size })) => {
            tracing::info!(
                "archived {} ({} bytes, stored {} bytes, sha256 {})",
                args.name,
                meta.size,
                stored_size,
                &meta.sha256[..16]
            );
            SUCCESS
        }
        Ok(Outcome::Archived(Archived::AlreadyStored { .. })) => {
            tracing::info!("{} was already archived with identical content", args.name);
            SUCCESS
        }
        Ok(Outcome::PushedEarlier { sha256, pushed_at }) => {
            tracing::info!(
                "archived {}: pushed ahead at {}, unchanged since (sha256 {})",
                args.name,
                pushed_at.format("%H:%M:%S%.3f"),
                sha256.get(..16).unwrap_or(&sha256)
            );
            SUCCESS
        }
        Err(err) => {
            cli::report(&err.context(format!("failed to archive {}", args.name)));
            ARCHIVE_FAILED
        }
    }
}

fn main() -> ExitCode {
    exit::guard(ARCHIVE_FAILED, || {
        let args: Args = cli::parse_or_exit(ARCHIVE_FAILED);
        logging::init(args.verbose);
        run(args)
    })
}
