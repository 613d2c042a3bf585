//! Where settings come from.
//!
//! Each setting is taken from the first of these that gives it:
//!
//! 1. the command line (`--repo`, ...);
//! 2. the environment (`WALKEEP_REPO`, ...);
//! 3. the configuration file: `--config PATH`, else `WALKEEP_CONFIG`, else
//!    `/etc/walkeep/walkeep.toml` if it exists. A file named explicitly must exist.
//!
//! The file is TOML:
//!
//! ```toml
//! repo = "/var/lib/walkeep/repo"    # repository path or file:// URL
//! compress_level = 1                # zstd level for new objects
//! restore_on_error = "fatal"        # or "absent"; see walkeep-restore --help
//! pgdata = "/var/lib/postgresql/15/main"
//! conninfo = "host=/var/run/postgresql user=postgres"
//! spool_dir = "/var/spool/walkeep"  # read-ahead markers and restore prefetch
//! archive_readahead = 2             # segments pushed ahead in parallel (0: off)
//! restore_prefetch = 4              # segments fetched ahead in parallel (0: off)
//!
//! [s3]                              # for repo = "s3://bucket/prefix"
//! endpoint = "http://127.0.0.1:8333"
//! region = "us-east-1"
//! access_key_id = "..."
//! secret_access_key = "..."
//! path_style = true
//! allow_http = true
//! ```

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// The configuration file read when none is named.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/walkeep/walkeep.toml";

/// What `walkeep-restore` reports when it cannot deliver a file that may exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Exit with the fatal status: PostgreSQL stops recovery instead of promoting.
    #[default]
    Fatal,
    /// Exit 1 as if the file were absent: a standby falls back to streaming replication.
    Absent,
}

/// The configuration file's content; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Repository location.
    pub repo: Option<String>,
    /// zstd compression level.
    pub compress_level: Option<i32>,
    /// `walkeep-restore` behaviour on errors.
    pub restore_on_error: Option<OnError>,
    /// The cluster's data directory.
    pub pgdata: Option<PathBuf>,
    /// libpq connection string for the cluster.
    pub conninfo: Option<String>,
    /// Local directory for archive read-ahead markers and restore prefetch.
    pub spool_dir: Option<PathBuf>,
    /// Segments `walkeep-archive` may push ahead in parallel (0 turns read-ahead off).
    pub archive_readahead: Option<usize>,
    /// Segments `walkeep-restore` may fetch ahead in parallel (0 turns prefetch off).
    pub restore_prefetch: Option<usize>,
    /// Object storage settings, for `s3://` repositories.
    pub s3: Option<S3Config>,
}

/// Settings for an S3-compatible object store. Credentials may instead come from the
/// usual `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION` and `AWS_ENDPOINT_URL`
/// variables; they are never taken from the command line and never logged.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL, e.g. `http://127.0.0.1:8333`; default: AWS for the region.
    pub endpoint: Option<String>,
    /// Region name; default `us-east-1`.
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Address buckets as `endpoint/bucket` (most non-AWS servers) rather than
    /// `bucket.endpoint`; default true when an endpoint is given.
    pub path_style: Option<bool>,
    /// Allow plain HTTP endpoints (a server on loopback); default false.
    pub allow_http: Option<bool>,
    /// Retries of a failed request (throttling, timeouts, 5xx) before giving up; default 5.
    pub max_retries: Option<usize>,
    /// Seconds after which a request is no longer retried; default 60.
    pub retry_timeout_secs: Option<u64>,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print credentials, even in debug output.
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field(
                "access_key_id",
                &self.access_key_id.as_ref().map(|_| "<set>"),
            )
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<set>"),
            )
            .field("path_style", &self.path_style)
            .field("allow_http", &self.allow_http)
            .field("max_retries", &self.max_retries)
            .field("retry_timeout_secs", &self.retry_timeout_secs)
            .finish()
    }
}

impl FileConfig {
    /// Loads the configuration file chosen by `explicit`, `WALKEEP_CONFIG` or the default.
    pub fn load(explicit: Option<&Path>) -> Result<FileConfig> {
        let from_env = std::env::var_os("WALKEEP_CONFIG").map(PathBuf::from);
        let (path, must_exist) = match explicit.map(Path::to_path_buf).or(from_env) {
            Some(path) => (path, true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                return Ok(FileConfig::default())
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("failed to read config file {}", path.display()))
            }
        };
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }
}

/// Picks the repository location: command line, then `WALKEEP_REPO`, then the file.
pub fn resolve_repo(cli: Option<&str>, file: &FileConfig) -> Result<String> {
    let env = std::env::var("WALKEEP_REPO").ok().filter(|s| !s.is_empty());
    match cli
        .map(str::to_string)
        .or(env)
        .or_else(|| file.repo.clone())
    {
        Some(repo) => Ok(repo),
        None => bail!(
            "no repository given: pass --repo, set WALKEEP_REPO, or set repo in {}",
            DEFAULT_CONFIG_PATH
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key_and_rejects_unknown_ones() {
        let config: FileConfig = toml::from_str(
            "repo = \"/r\"\ncompress_level = 5\nrestore_on_error = \"absent\"\npgdata = \"/d\"\n",
        )
        .unwrap();
        assert_eq!(config.repo.as_deref(), Some("/r"));
        assert_eq!(config.compress_level, Some(5));
        assert_eq!(config.restore_on_error, Some(OnError::Absent));
        assert!(toml::from_str::<FileConfig>("rep = \"/typo\"").is_err());
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        assert!(FileConfig::load(Some(Path::new("/nonexistent/walkeep.toml"))).is_err());
    }

    #[test]
    fn command_line_wins_over_file() {
        let file = FileConfig {
            repo: Some("/from-file".into()),
            ..Default::default()
        };
        assert_eq!(resolve_repo(Some("/from-cli"), &file).unwrap(), "/from-cli");
    }
}
