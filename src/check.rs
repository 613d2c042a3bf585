//! `walkeep check`: is the cluster set up to archive into this repository, and does a
//! segment actually arrive?
//!
//! Each setting gets its own verdict, so that an operator sees exactly which one is wrong.
//! The settings can look right and archiving still fail (a wrong binary path, a permission),
//! so the check ends by proving the path: it writes a WAL record, switches segments, and
//! waits, bounded, until that segment is stored in the repository.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio_postgres::Client;

use crate::pg;
use crate::repo::{self, Repository};
use crate::wal::{SegmentName, WalFileName};

/// One verdict.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    /// What was checked.
    pub check: String,
    /// `ok`, `warn` or `fail`.
    pub status: &'static str,
    /// What was found, and what to do about it.
    pub detail: String,
}

/// All verdicts.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    /// Verdicts in the order they were made.
    pub verdicts: Vec<Verdict>,
}

impl CheckReport {
    fn push(&mut self, check: &str, status: &'static str, detail: impl Into<String>) {
        self.verdicts.push(Verdict {
            check: check.to_string(),
            status,
            detail: detail.into(),
        });
    }

    /// True if and only if no verdict failed.
    pub fn passed(&self) -> bool {
        self.verdicts.iter().all(|v| v.status != "fail")
    }
}

async fn setting(client: &Client, name: &str) -> Result<String> {
    let row = client
        .query_one("SELECT current_setting($1)", &[&name])
        .await?;
    Ok(row.get(0))
}

/// Splits a command line into words as `sh` would for plain words, quotes and
/// backslashes (enough for an `archive_command`; no expansions).
fn shell_words(command: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = command.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                word.extend(chars.by_ref().take_while(|&c| c != '\''));
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => word.extend(chars.next()),
                        c => word.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.extend(chars.next());
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// The value of `flag` (`--flag VALUE` or `--flag=VALUE`) in a shell command line.
fn flag_in_command(command: &str, flag: &str) -> Option<String> {
    let words = shell_words(command);
    let mut iter = words.iter();
    while let Some(word) = iter.next() {
        if word == flag {
            return iter.next().cloned();
        }
        if let Some(value) = word.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            return Some(value.to_string());
        }
    }
    None
}

/// Where `archive_command` stores, as far as can be told from here: its `--repo`, else
/// the `repo` of the configuration file it names with `--config` (relative to
/// `data_directory`, where PostgreSQL runs the command), else of the default file. `Err`
/// says why it cannot be told (the named file unreadable by this user).
fn repo_of_command(
    command: &str,
    configured: Option<&str>,
    data_directory: Option<&Path>,
) -> Result<Option<String>, String> {
    if let Some(repo) = flag_in_command(command, "--repo") {
        return Ok(Some(repo));
    }
    if let Some(config) = flag_in_command(command, "--config") {
        let config = match data_directory {
            Some(dir) => dir.join(config),
            None => PathBuf::from(config),
        };
        return match crate::config::FileConfig::load(Some(&config)) {
            Ok(file) => Ok(file.repo),
            Err(e) => Err(format!("{e:#}")),
        };
    }
    // Without either, walkeep-archive reads WALKEEP_CONFIG from the server's environment
    // (not visible from here) or the default file.
    let default = Path::new(crate::config::DEFAULT_CONFIG_PATH);
    match crate::config::FileConfig::load(Some(default)) {
        Ok(file) if file.repo.is_some() => Ok(file.repo),
        _ => Ok(configured.map(str::to_string)),
    }
}

fn same_location(a: &str, b: &str) -> bool {
    let canonical = |s: &str| {
        let s = s.strip_prefix("file://").unwrap_or(s);
        Path::new(s)
            .canonicalize()
            .unwrap_or_else(|_| Path::new(s).to_path_buf())
    };
    canonical(a) == canonical(b)
}

/// Runs every check against the server at `conninfo`; `configured_repo` is the repository
/// walkeep-archive would use without `--repo` (from its environment or config file).
pub async fn run(
    repo: &Repository,
    location: &str,
    conninfo: Option<&str>,
    configured_repo: Option<&str>,
    timeout: Duration,
) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let client = pg::connect(conninfo).await?;

    let wal_level = setting(&client, "wal_level").await?;
    match wal_level.as_str() {
        "replica" | "logical" => report.push("wal_level", "ok", wal_level),
        _ => report.push(
            "wal_level",
            "fail",
            format!("{wal_level}: must be replica or logical (restart needed)"),
        ),
    }
    let archive_mode = setting(&client, "archive_mode").await?;
    match archive_mode.as_str() {
        "on" | "always" => report.push("archive_mode", "ok", archive_mode.clone()),
        _ => report.push(
            "archive_mode",
            "fail",
            format!("{archive_mode}: must be on or always (restart needed)"),
        ),
    }
    let command = setting(&client, "archive_command").await?;
    if !matches!(archive_mode.as_str(), "on" | "always") {
        // PostgreSQL shows "(disabled)" instead of the command while archiving is off.
        report.push(
            "archive_command",
            "warn",
            "not checked: archive_mode is off",
        );
    } else if !command.contains("walkeep-archive") {
        report.push(
            "archive_command",
            "fail",
            format!("{command:?} does not call walkeep-archive"),
        );
    } else {
        // Readable by superusers and pg_read_all_settings only; without it a relative
        // --config is read from here.
        let data_directory = setting(&client, "data_directory").await.ok();
        match repo_of_command(
            &command,
            configured_repo,
            data_directory.as_deref().map(Path::new),
        ) {
            Ok(Some(named)) if same_location(&named, location) => {
                report.push("archive_command", "ok", command.clone());
            }
            Ok(Some(named)) => report.push(
                "archive_command",
                "fail",
                format!("{command:?} archives into {named}, not into {location}"),
            ),
            Ok(None) => report.push(
                "archive_command",
                "warn",
                format!("{command:?} names no repository; the end-to-end check below decides"),
            ),
            Err(why) => report.push(
                "archive_command",
                "warn",
                format!(
                    "cannot tell where {command:?} archives ({why}); the end-to-end check \
                     below decides"
                ),
            ),
        }
    }
    let timeout_setting = setting(&client, "archive_timeout").await?;
    if timeout_setting == "0" {
        report.push(
            "archive_timeout",
            "warn",
            "0: on a quiet server a finished transaction may wait in pg_wal indefinitely; \
             set it (e.g. 60s) to bound what losing the server loses",
        );
    } else {
        report.push(
            "archive_timeout",
            "ok",
            format!("{timeout_setting}: at most this much committed work is lost with the server"),
        );
    }

    let sysid = pg::system_identifier(&client).await?;
    if sysid == repo.identity().system_identifier {
        report.push("system identifier", "ok", sysid.to_string());
    } else {
        report.push(
            "system identifier",
            "fail",
            format!(
                "server is {sysid}, repository {location} belongs to {}",
                repo.identity().system_identifier
            ),
        );
    }
    match repo.storage().check_writable() {
        Ok(()) => report.push("repository writable", "ok", location.to_string()),
        Err(e) => report.push("repository writable", "fail", format!("{e:#}")),
    }

    if !report.passed() {
        report.push(
            "end to end",
            "fail",
            "skipped: fix the failures above first",
        );
        return Ok(report);
    }
    // A record guarantees the switch below has something to end.
    client
        .execute(
            "SELECT pg_logical_emit_message(false, 'walkeep', 'check')",
            &[],
        )
        .await
        .context("failed to write a WAL record")?;
    // pg_walfile_name names the segment the switch ended, on the timeline the server
    // writes now (the last checkpoint's timeline lags behind right after a promotion).
    let name: String = client
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
        .context("failed to switch WAL")?
        .get(0);
    let segment: SegmentName = name.parse()?;
    let key = repo::wal_key(&WalFileName::Segment(segment));
    let began = Instant::now();
    loop {
        if repo.storage().size(&key)?.is_some() {
            report.push(
                "end to end",
                "ok",
                format!(
                    "segment {segment} reached the repository in {:.1} s",
                    began.elapsed().as_secs_f64()
                ),
            );
            break;
        }
        if began.elapsed() > timeout {
            let failed: Option<String> = client
                .query_one("SELECT last_failed_wal FROM pg_stat_archiver", &[])
                .await
                .ok()
                .and_then(|r| r.get(0));
            report.push(
                "end to end",
                "fail",
                format!(
                    "segment {segment} did not reach the repository within {} s{}; see the \
                     server log",
                    timeout.as_secs(),
                    failed
                        .map(|f| format!(" (last failed: {f})"))
                        .unwrap_or_default()
                ),
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_repository_in_archive_command() {
        let cases = [
            ("walkeep-archive --repo /r %p %f", Some("/r")),
            (
                "/usr/bin/walkeep-archive --repo='/my r' %p %f",
                Some("/my r"),
            ),
            ("walkeep-archive --repo=/r %p %f", Some("/r")),
            ("walkeep-archive %p %f", None),
            ("'/opt/walkeep-archive' --repo \"/a b\" %p %f", Some("/a b")),
            ("walkeep-archive --repo /a\\ b %p %f", Some("/a b")),
        ];
        for (command, repo) in cases {
            assert_eq!(
                flag_in_command(command, "--repo").as_deref(),
                repo,
                "{command}"
            );
        }
    }

    #[test]
    fn follows_the_config_file_that_archive_command_names() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("walkeep.toml");
        std::fs::write(&config, "repo = \"/srv/elsewhere\"\n").unwrap();
        let command = format!("walkeep-archive --config {} %p %f", config.display());
        assert_eq!(
            repo_of_command(&command, Some("/srv/mine"), None),
            Ok(Some("/srv/elsewhere".to_string()))
        );
        let command = format!("walkeep-archive --config={} %p %f", config.display());
        assert_eq!(
            repo_of_command(&command, None, Some(Path::new("/elsewhere"))),
            Ok(Some("/srv/elsewhere".to_string()))
        );
        let missing = "walkeep-archive --config /nonexistent/walkeep.toml %p %f";
        assert!(repo_of_command(missing, Some("/srv/mine"), None).is_err());
        // --repo wins over --config, as in walkeep-archive.
        let both = format!(
            "walkeep-archive --config {} --repo /r %p %f",
            config.display()
        );
        assert_eq!(
            repo_of_command(&both, None, None),
            Ok(Some("/r".to_string()))
        );
        // A relative --config is found where PostgreSQL runs the command.
        let relative = "walkeep-archive --config walkeep.toml %p %f";
        assert_eq!(
            repo_of_command(relative, None, Some(dir.path())),
            Ok(Some("/srv/elsewhere".to_string()))
        );
    }
}
