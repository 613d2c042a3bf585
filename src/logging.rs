//! Logging to stderr, which PostgreSQL puts in its server log.
//!
//! `info` is one line per file archived or restored, `debug` explains decisions, `warn`
//! marks work that went on anyway, `error` is printed once, where an error is handled.
//! `RUST_LOG` overrides the level; `--verbose` raises it to `debug`.

use tracing_subscriber::EnvFilter;

/// Installs the stderr logger for a binary named `program`.
pub fn init(verbose: bool) {
    let default = if verbose { "debug" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .try_init();
}
