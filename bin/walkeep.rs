//! `walkeep`: the companion tool (init, backup, restore, mark, info, catalog).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use walkeep::cli::{self, RepoArgs};
use walkeep::exit::{self, FAILURE, SUCCESS, USAGE};
use walkeep::{backup, catalog, logging, object, points, repo::Repository};

/// Base backups, point-in-time recovery and repository care for PostgreSQL.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Exit status: 0 on success, 1 on failure, 2 on a usage error."
)]
struct Args {
    /// Log decisions, not just outcomes.
    #[arg(short, long, global = true)]
    verbose: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a repository bound to one cluster (idempotent for the same cluster).
    Init {
        #[command(flatten)]
        repo: RepoArgs,
        /// The cluster's data directory. Default: pgdata in the config file.
        #[arg(long)]
        pgdata: Option<PathBuf>,
    },
    /// Take a physical base backup of a running cluster.
    Backup(BackupArgs),
    /// Create a named restore point and record it.
    Mark {
        #[command(flatten)]
        repo: RepoArgs,
        /// libpq connection string. Default: conninfo in the config file, else PG* variables.
        #[arg(short = 'd', long = "dbname", value_name = "CONNINFO")]
        conninfo: Option<String>,
        /// Also switch to a new WAL segment so the point is archived at once.
        #[arg(long)]
        switch_wal: bool,
        /// Name of the restore point.
        name: String,
    },
    /// The repository's catalog.
    Catalog {
        #[command(subcommand)]
        action: CatalogAction,
    },
}

#[derive(Subcommand, Debug)]
enum CatalogAction {
    /// Regenerate the catalog from the stored objects alone.
    Rebuild {
        #[command(flatten)]
        repo: RepoArgs,
    },
}

#[derive(clap::Args, Debug)]
struct BackupArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// The cluster's data directory. Default: pgdata in the config file.
    #[arg(long)]
    pgdata: Option<PathBuf>,
    /// libpq connection string. Default: conninfo in the config file, else PG* variables.
    #[arg(short = 'd', long = "dbname", value_name = "CONNINFO")]
    conninfo: Option<String>,
    /// Files copied at once. Default: the number of cores.
    #[arg(short, long)]
    jobs: Option<usize>,
    /// zstd compression level (1 to 19). Default: compress_level in the config file, else 1.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=19))]
    compress_level: Option<i32>,
    /// Checkpoint at the start: `fast` (immediate) or `spread` (paced like a normal
    /// checkpoint, gentler on a busy server but may take minutes).
    #[arg(long, value_enum, default_value = "fast")]
    checkpoint: Checkpoint,
    /// Seconds to wait for the backup's last WAL segment to reach the repository.
    #[arg(long, default_value_t = 300)]
    archive_timeout: u64,
    /// Print the manifest summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Checkpoint {
    Fast,
    Spread,
}

fn pgdata_of(given: Option<PathBuf>, file: &walkeep::config::FileConfig) -> Result<PathBuf> {
    given
        .or_else(|| file.pgdata.clone())
        .or_else(|| std::env::var_os("PGDATA").map(PathBuf::from))
        .context(
            "no data directory given: pass --pgdata, set PGDATA, or set pgdata in the config file",
        )
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("failed to start the async runtime")
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Init { repo, pgdata } => {
            let (file, location) = repo.resolve()?;
            let pgdata = pgdata_of(pgdata, &file)?;
            let (repo, created) = Repository::init(&location, &pgdata)?;
            let id = repo.identity();
            let verb = if created {
                "initialised"
            } else {
                "already initialised"
            };
            println!(
                "repository {location} {verb} for system {} (PostgreSQL {}, {} MiB WAL segments)",
                id.system_identifier,
                id.pg_major_version,
                id.wal_segment_size >> 20
            );
        }
        Command::Backup(args) => {
            let (file, location) = args.repo.resolve()?;
            let repo = Repository::open(&location)?;
            let options = backup::BackupOptions {
                pgdata: pgdata_of(args.pgdata, &file)?,
                conninfo: args.conninfo.or(file.conninfo.clone()),
                jobs: args
                    .jobs
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
                level: args
                    .compress_level
                    .or(file.compress_level)
                    .unwrap_or(object::DEFAULT_LEVEL),
                fast_checkpoint: matches!(args.checkpoint, Checkpoint::Fast),
                archive_timeout: Duration::from_secs(args.archive_timeout),
                progress: true,
            };
            let manifest = runtime()?.block_on(backup::run(&repo, &options))?;
            if args.json {
                let mut summary = serde_json::to_value(&manifest)?;
                if let Some(map) = summary.as_object_mut() {
                    map.remove("files");
                    map.remove("directories");
                }
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                println!(
                    "backup {}: {} files, {} (stored {}), WAL {} to {}",
                    manifest.id,
                    manifest.files.len(),
                    backup::human_bytes(manifest.size),
                    backup::human_bytes(manifest.stored_size),
                    manifest.start_lsn,
                    manifest.stop_lsn
                );
            }
        }
        Command::Mark {
            repo,
            conninfo,
            switch_wal,
            name,
        } => {
            let (file, location) = repo.resolve()?;
            let repo = Repository::open(&location)?;
            let conninfo = conninfo.or(file.conninfo.clone());
            let point =
                runtime()?.block_on(points::mark(&repo, conninfo.as_deref(), &name, switch_wal))?;
            println!(
                "restore point {:?} at {} on timeline {}, {}",
                point.name,
                point.lsn,
                point.timeline,
                point.created_at.to_rfc3339()
            );
        }
        Command::Catalog {
            action: CatalogAction::Rebuild { repo },
        } => {
            let (_, location) = repo.resolve()?;
            let repo = Repository::open(&location)?;
            let count = catalog::rebuild(&repo)?;
            println!("catalog rebuilt: {count} WAL files");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    exit::guard(FAILURE, || {
        let args: Args = cli::parse_or_exit(USAGE);
        logging::init(args.verbose);
        match run(args.command) {
            Ok(()) => SUCCESS,
            Err(err) => {
                cli::report(&err);
                FAILURE
            }
        }
    })
}
