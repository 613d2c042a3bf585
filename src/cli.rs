//! Pieces the three binaries share: argument parsing with a chosen failure status,
//! settings resolution and error printing.

use std::path::PathBuf;

use clap::Parser;

use crate::config::{self, FileConfig};

/// Parses arguments; a usage error exits with `usage_status` rather than clap's 2, so
/// that `walkeep-restore` never reports a misconfiguration as "file absent".
pub fn parse_or_exit<T: Parser>(usage_status: u8) -> T {
    match T::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let status = if e.use_stderr() {
                i32::from(usage_status)
            } else {
                0
            };
            let _ = e.print();
            std::process::exit(status);
        }
    }
}

/// Options every command takes to find the repository.
#[derive(Debug, Clone, clap::Args)]
pub struct RepoArgs {
    /// Repository: a path or file:// URL. Default: $WALKEEP_REPO, else `repo` in the
    /// config file.
    #[arg(long, value_name = "LOCATION")]
    pub repo: Option<String>,

    /// Configuration file. Default: $WALKEEP_CONFIG, else /etc/walkeep/walkeep.toml if
    /// it exists.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl RepoArgs {
    /// The configuration file and the repository location it resolves to.
    pub fn resolve(&self) -> anyhow::Result<(FileConfig, String)> {
        let file = FileConfig::load(self.config.as_deref())?;
        let repo = config::resolve_repo(self.repo.as_deref(), &file)?;
        Ok((file, repo))
    }
}

/// Logs an error with its whole chain of causes, once, where it is handled.
pub fn report(err: &anyhow::Error) {
    tracing::error!("{err:#}");
}
