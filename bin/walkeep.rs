//! `walkeep`: the companion tool (init, backup, restore, mark, info, catalog).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use walkeep::cli::{self, RepoArgs};
use walkeep::exit::{self, FAILURE, SUCCESS, USAGE};
use walkeep::recovery::{self, parse_target_time, Target, TimelineChoice};
use walkeep::{
    backup, catalog, check, expire, logging, manifest, object, points, repo::Repository, status,
    verify,
};

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
    /// Restore a base backup into a new data directory, set up for point-in-time recovery.
    Restore(RestoreArgs),
    /// List backups and the recovery windows of each timeline.
    Info {
        #[command(flatten)]
        repo: RepoArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Re-read every stored object and check WAL continuity and every backup.
    Verify {
        #[command(flatten)]
        repo: RepoArgs,
        /// Objects read at once. Default: the number of cores.
        #[arg(short, long)]
        jobs: Option<usize>,
        /// Print JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Check the cluster's archiving settings, then prove a segment reaches the repository.
    Check {
        #[command(flatten)]
        repo: RepoArgs,
        /// libpq connection string. Default: conninfo in the config file, else PG* variables.
        #[arg(short = 'd', long = "dbname", value_name = "CONNINFO")]
        conninfo: Option<String>,
        /// Seconds to wait for the switched segment to arrive.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Archiving health: last archived segment, waiting segments, failures, backups.
    Status {
        #[command(flatten)]
        repo: RepoArgs,
        /// libpq connection string. Default: conninfo in the config file, else PG* variables.
        #[arg(short = 'd', long = "dbname", value_name = "CONNINFO")]
        conninfo: Option<String>,
        /// The data directory, to count segments waiting in pg_wal/archive_status.
        /// Default: pgdata in the config file, else PGDATA.
        #[arg(long)]
        pgdata: Option<PathBuf>,
        /// Report from the repository (and data directory) only; do not connect.
        #[arg(long)]
        no_connect: bool,
        /// Print JSON.
        #[arg(long, conflicts_with = "prometheus")]
        json: bool,
        /// Print OpenMetrics text for a node-exporter textfile collector.
        #[arg(long)]
        prometheus: bool,
    },
    /// Delete backups and WAL that the retention policy no longer needs.
    Expire {
        #[command(flatten)]
        repo: RepoArgs,
        /// Keep the newest N backups.
        #[arg(long, value_name = "N")]
        keep: Option<usize>,
        /// Keep every point of the last D days restorable.
        #[arg(long, value_name = "D")]
        keep_days: Option<u32>,
        /// Show what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
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

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("target_kind").multiple(false)))]
struct RestoreArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// The new data directory. It must be empty or absent (see --force).
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    /// Stop at this moment; it must carry a UTC offset ("+01", "-05:00", "Z") or say
    /// "UTC", e.g. "2026-12-03 17:55:00+00".
    #[arg(long, group = "target_kind", value_name = "TIME")]
    target_time: Option<String>,
    /// Stop at this WAL position, e.g. 0/3000158.
    #[arg(long, group = "target_kind", value_name = "LSN")]
    target_lsn: Option<String>,
    /// Stop at the commit of this transaction.
    #[arg(long, group = "target_kind", value_name = "XID")]
    target_xid: Option<u64>,
    /// Stop at this named restore point.
    #[arg(long, group = "target_kind", value_name = "NAME")]
    target_name: Option<String>,
    /// `immediate`: stop as soon as the backup is consistent.
    #[arg(long, group = "target_kind", value_parser = ["immediate"])]
    target: Option<String>,
    /// What PostgreSQL does at the target. Default: PostgreSQL's own (pause).
    #[arg(long, value_enum)]
    target_action: Option<walkeep::restore::TargetAction>,
    /// Timeline to follow: `latest`, `current` or a number. Default: latest.
    #[arg(long, default_value = "latest")]
    target_timeline: String,
    /// Whether to stop just after (true) or just before (false) the target.
    #[arg(long, value_name = "BOOL")]
    inclusive: Option<bool>,
    /// Write standby.signal instead of recovery.signal.
    #[arg(long)]
    standby: bool,
    /// Restore this backup instead of the one the planner picks.
    #[arg(long, value_name = "ID")]
    backup: Option<String>,
    /// Files restored at once. Default: the number of cores.
    #[arg(short, long)]
    jobs: Option<usize>,
    /// Delete the contents of a non-empty target directory first.
    #[arg(long)]
    force: bool,
    /// Restore the tablespace at OLDDIR into NEWDIR instead.
    #[arg(long, value_name = "OLDDIR=NEWDIR")]
    tablespace_mapping: Vec<String>,
    /// Only plan: print what would be restored and check the WAL, write nothing.
    #[arg(long)]
    dry_run: bool,
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

fn jobs(given: Option<usize>) -> usize {
    given.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
}

fn target_of(args: &RestoreArgs) -> Result<Target> {
    Ok(if let Some(t) = &args.target_time {
        let t = parse_target_time(t)?;
        println!(
            "target time resolves to {}",
            t.with_timezone(&chrono::Utc)
                .format("%Y-%m-%d %H:%M:%S%.6f UTC")
        );
        Target::Time(t)
    } else if let Some(l) = &args.target_lsn {
        Target::Lsn(l.parse()?)
    } else if let Some(x) = args.target_xid {
        Target::Xid(x)
    } else if let Some(n) = &args.target_name {
        Target::Name(n.clone())
    } else if args.target.is_some() {
        Target::Immediate
    } else {
        Target::End
    })
}

fn timeline_of(text: &str) -> Result<TimelineChoice> {
    Ok(match text {
        "latest" => TimelineChoice::Latest,
        "current" => TimelineChoice::Current,
        n => TimelineChoice::Id(
            n.parse()
                .with_context(|| format!("invalid timeline {n:?}"))?,
        ),
    })
}

fn restore(args: RestoreArgs) -> Result<()> {
    let config_path = args
        .repo
        .config
        .clone()
        .or_else(|| std::env::var_os("WALKEEP_CONFIG").map(PathBuf::from));
    let (file, location) = args.repo.resolve()?;
    let repo = Repository::open_with(&location, &file)?;
    let target = target_of(&args)?;
    let timeline = timeline_of(&args.target_timeline)?;
    if args.dry_run {
        let request = recovery::Request {
            target,
            timeline,
            backup: args.backup.clone(),
            inclusive: args.inclusive.unwrap_or(true),
        };
        let plan = recovery::plan(&repo, &request)?;
        println!("{}", serde_json::to_string_pretty(&plan)?);
        return Ok(());
    }
    let mut mapping = std::collections::BTreeMap::new();
    for pair in &args.tablespace_mapping {
        let (old, new) = pair
            .split_once('=')
            .with_context(|| format!("expected OLDDIR=NEWDIR, got {pair:?}"))?;
        mapping.insert(old.to_string(), PathBuf::from(new));
    }
    let options = walkeep::restore::RestoreOptions {
        to: args.to,
        target,
        timeline,
        backup: args.backup,
        action: args.target_action,
        inclusive: args.inclusive,
        standby: args.standby,
        force: args.force,
        jobs: jobs(args.jobs),
        tablespace_mapping: mapping,
        restore_command: walkeep::restore::restore_command_for(&location, config_path.as_deref()),
        progress: true,
    };
    let began = std::time::Instant::now();
    let plan = walkeep::restore::run(&repo, &options)?;
    println!(
        "restored backup {} to {} in {:.1} s; on start PostgreSQL replays WAL from {} \
         along timeline {} to {}",
        plan.backup_id,
        options.to.display(),
        began.elapsed().as_secs_f64(),
        plan.first_segment,
        plan.timeline,
        plan.target
    );
    Ok(())
}

fn info(repo: RepoArgs, json: bool) -> Result<()> {
    let (file, location) = repo.resolve()?;
    let repo = Repository::open_with(&location, &file)?;
    let backups = manifest::list(&repo)?;
    let windows = recovery::windows(&repo)?;
    if json {
        let backups: Vec<_> = backups
            .iter()
            .map(|b| {
                serde_json::json!({
                    "id": b.id, "timeline": b.timeline,
                    "start_lsn": b.start_lsn, "stop_lsn": b.stop_lsn,
                    "start_time": b.start_time, "stop_time": b.stop_time,
                    "size": b.size, "stored_size": b.stored_size, "files": b.files.len(),
                })
            })
            .collect();
        let out = serde_json::json!({
            "repository": location,
            "system_identifier": repo.identity().system_identifier,
            "pg_major_version": repo.identity().pg_major_version,
            "backups": backups,
            "recovery_windows": windows,
            "restore_points": points::list(&repo)?,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let id = repo.identity();
    println!(
        "repository {location}: system {}, PostgreSQL {}",
        id.system_identifier, id.pg_major_version
    );
    println!();
    println!(
        "{:<18} {:>3}  {:<12} {:<12} {:<20} {:>10} {:>10}",
        "BACKUP", "TLI", "START LSN", "STOP LSN", "STOPPED (UTC)", "SIZE", "STORED"
    );
    for b in &backups {
        println!(
            "{:<18} {:>3}  {:<12} {:<12} {:<20} {:>10} {:>10}",
            b.id,
            b.timeline,
            b.start_lsn.to_string(),
            b.stop_lsn.to_string(),
            b.stop_time.format("%Y-%m-%d %H:%M:%S"),
            backup::human_bytes(b.size),
            backup::human_bytes(b.stored_size)
        );
    }
    if backups.is_empty() {
        println!("(no backups)");
    }
    println!();
    let marks = points::list(&repo)?;
    if !marks.is_empty() {
        println!("restore points:");
        for p in &marks {
            println!(
                "  {:<30} {:<12} timeline {} {}",
                p.name,
                p.lsn.to_string(),
                p.timeline,
                p.created_at.format("%Y-%m-%d %H:%M:%S UTC")
            );
        }
        println!();
    }
    println!("recovery window:");
    for w in &windows {
        let latest_time = w.latest_time.map_or("?".to_string(), |t| {
            t.format("%Y-%m-%d %H:%M:%S").to_string()
        });
        println!(
            "  timeline {}: from {} ({} UTC, end of backup {}) to {} ({} UTC)",
            w.timeline,
            w.earliest_lsn,
            w.earliest_time.format("%Y-%m-%d %H:%M:%S"),
            w.backup_id,
            w.latest_lsn,
            latest_time
        );
    }
    if windows.is_empty() {
        println!("  (none: no backup with all of its WAL)");
    }
    Ok(())
}

fn print_verify(report: &verify::Report, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    println!(
        "checked {} objects ({} of original data)",
        report.objects_checked,
        backup::human_bytes(report.bytes_checked)
    );
    for p in &report.damaged {
        println!("DAMAGED  {}: {}", p.key, p.detail);
    }
    for key in &report.foreign {
        println!("FOREIGN  {key}: not part of a walkeep repository");
    }
    for gap in &report.gaps {
        let first = &gap.missing[0];
        let last = &gap.missing[gap.missing.len() - 1];
        let range = if first == last {
            first.clone()
        } else {
            format!("{first} to {last}")
        };
        println!(
            "GAP      timeline {}: {range} missing ({} segments) between {} and {}; \
             replay stops at {}",
            gap.timeline,
            gap.missing.len(),
            gap.after,
            gap.before,
            gap.replay_stops_at
        );
        if !gap.breaks_backups.is_empty() {
            println!("         breaks backups: {}", gap.breaks_backups.join(", "));
        }
        if !gap.cuts_window_of.is_empty() {
            println!(
                "         ends the recovery window of backups: {}",
                gap.cuts_window_of.join(", ")
            );
        }
    }
    for name in &report.missing_history {
        println!("MISSING  {name}: its timeline has segments, but where it branched is unknown");
    }
    for name in &report.partial_segments {
        println!("partial  {name} (end of an old timeline; not used in place of the full segment)");
    }
    for b in &report.backups {
        if b.problems.is_empty() {
            println!("backup   {}: ok ({} files)", b.id, b.files);
        } else {
            for p in &b.problems {
                println!("BACKUP   {}: {p}", b.id);
            }
        }
    }
    if report.interrupted_backup_files > 0 {
        println!(
            "note     {} files of interrupted backups (removed by the next backup)",
            report.interrupted_backup_files
        );
    }
    println!(
        "{}",
        if report.is_whole() {
            "repository is whole"
        } else {
            "REPOSITORY IS NOT WHOLE"
        }
    );
    Ok(())
}

fn print_status(status: &status::Status) {
    println!("repository  {}", status.repository);
    match (&status.archiver, &status.server_error) {
        (Some(a), _) => {
            println!(
                "archived    {} segments; last {} at {}",
                a.archived_count,
                a.last_archived_wal.as_deref().unwrap_or("-"),
                a.last_archived_time
                    .map_or("-".to_string(), |t| t.to_rfc3339())
            );
            println!(
                "failures    {}; last {} at {}",
                a.failed_count,
                a.last_failed_wal.as_deref().unwrap_or("-"),
                a.last_failed_time
                    .map_or("-".to_string(), |t| t.to_rfc3339())
            );
        }
        (None, Some(e)) => println!("server      unreachable: {e}"),
        (None, None) => {}
    }
    if let Some(n) = status.ready_count {
        println!("waiting     {n} segments marked .ready in pg_wal/archive_status");
    }
    if let Some(b) = &status.blocked {
        println!(
            "BLOCKED     archiving is stuck on {} since {}; pg_wal grows until this is fixed",
            b.segment,
            b.since.map_or("?".to_string(), |t| t.to_rfc3339())
        );
    }
    match &status.last_backup {
        Some(b) => println!(
            "last backup {} ended {} ({} h ago); {} backups",
            b.id,
            b.stop_time.to_rfc3339(),
            b.age_seconds / 3600,
            status.backup_count
        ),
        None => println!("last backup none"),
    }
    for w in &status.recovery_windows {
        println!(
            "window      timeline {}: {} to {}",
            w.timeline,
            w.earliest_time.to_rfc3339(),
            w.latest_time
                .map_or(w.latest_lsn.to_string(), |t| t.to_rfc3339())
        );
    }
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
            let (repo, created) = Repository::init(&location, &pgdata, &file)?;
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
            let repo = Repository::open_with(&location, &file)?;
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
        Command::Restore(args) => restore(args)?,
        Command::Verify {
            repo,
            jobs: j,
            json,
        } => {
            let (file, location) = repo.resolve()?;
            let repo = Repository::open_with(&location, &file)?;
            let report = verify::run(&repo, jobs(j), !json)?;
            print_verify(&report, json)?;
            if !report.is_whole() {
                anyhow::bail!("the repository is not whole (see above)");
            }
        }
        Command::Check {
            repo,
            conninfo,
            timeout,
            json,
        } => {
            let (file, location) = repo.resolve()?;
            let repo = Repository::open_with(&location, &file)?;
            let conninfo = conninfo.or(file.conninfo.clone());
            let configured = file
                .repo
                .clone()
                .or_else(|| std::env::var("WALKEEP_REPO").ok());
            let report = runtime()?.block_on(check::run(
                &repo,
                &location,
                conninfo.as_deref(),
                configured.as_deref(),
                Duration::from_secs(timeout),
            ))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for v in &report.verdicts {
                    println!(
                        "{:<5} {:<20} {}",
                        v.status.to_uppercase(),
                        v.check,
                        v.detail
                    );
                }
            }
            if !report.passed() {
                anyhow::bail!("check failed");
            }
        }
        Command::Status {
            repo,
            conninfo,
            pgdata,
            no_connect,
            json,
            prometheus,
        } => {
            let (file, location) = repo.resolve()?;
            let repo = Repository::open_with(&location, &file)?;
            let conninfo = conninfo.or(file.conninfo.clone());
            let pgdata = pgdata_of(pgdata, &file).ok();
            let status = runtime()?.block_on(status::gather(
                &repo,
                &location,
                conninfo.as_deref(),
                pgdata.as_deref(),
                !no_connect,
            ))?;
            if prometheus {
                print!("{}", status::openmetrics(&status));
            } else if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
        }
        Command::Expire {
            repo,
            keep,
            keep_days,
            dry_run,
            json,
        } => {
            let (file, location) = repo.resolve()?;
            let repo = Repository::open_with(&location, &file)?;
            let plan = expire::run(&repo, expire::Policy { keep, keep_days }, dry_run)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                let verb = if dry_run { "would expire" } else { "expired" };
                println!("kept backups: {}", plan.kept_backups.join(", "));
                println!(
                    "{verb} backups: {}",
                    if plan.expired_backups.is_empty() {
                        "none".to_string()
                    } else {
                        plan.expired_backups.join(", ")
                    }
                );
                println!(
                    "{verb} {} WAL files (everything before {}), {}",
                    plan.expired_wal.len(),
                    plan.wal_cutoff.as_deref().unwrap_or("-"),
                    backup::human_bytes(plan.freed_bytes)
                );
                if dry_run {
                    for key in &plan.expired_wal {
                        println!("  {key}");
                    }
                }
            }
        }
        Command::Info { repo, json } => info(repo, json)?,
        Command::Mark {
            repo,
            conninfo,
            switch_wal,
            name,
        } => {
            let (file, location) = repo.resolve()?;
            let repo = Repository::open_with(&location, &file)?;
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
            let (file, location) = repo.resolve()?;
            let repo = Repository::open_with(&location, &file)?;
            let rebuilt = catalog::rebuild(&repo)?;
            println!("catalog rebuilt: {} WAL files", rebuilt.records);
            if !rebuilt.damaged.is_empty() {
                for (key, why) in &rebuilt.damaged {
                    eprintln!("left out, damaged: {key}: {why}");
                }
                anyhow::bail!(
                    "{} damaged objects left out of the catalog",
                    rebuilt.damaged.len()
                );
            }
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
