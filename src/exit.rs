//! Exit statuses, decided in one place.
//!
//! PostgreSQL reads the status of `archive_command` and `restore_command` as follows:
//!
//! | status | archive_command | restore_command |
//! |---|---|---|
//! | 0 | the file is safely stored; the segment may be recycled | the file is at `%p` |
//! | 1 to 125 | failure: retry later | "not available": recovery may end here |
//! | above 125, or a signal | the archiver process exits FATAL | the startup process exits FATAL |
//!
//! So `walkeep-archive` uses 1 for every failure and never exceeds 125, and
//! `walkeep-restore` uses 1 only when the file is truly absent and [`RESTORE_FATAL`] for
//! everything else, so that corruption or an unreachable repository stops recovery instead
//! of letting PostgreSQL promote on a short archive.

use std::io::Write;
use std::process::ExitCode;

/// Success for every binary.
pub const SUCCESS: u8 = 0;

/// `walkeep-archive` failed; PostgreSQL keeps the segment and retries.
pub const ARCHIVE_FAILED: u8 = 1;

/// `walkeep-restore`: the requested file is not in the repository.
pub const RESTORE_ABSENT: u8 = 1;

/// `walkeep-restore`: the file may exist but could not be delivered intact. Above 125, so
/// PostgreSQL stops recovery with FATAL; 200 is clear of the shell's 126 and 127 and of
/// 128 + N, which reads as death by signal N.
pub const RESTORE_FATAL: u8 = 200;

// PostgreSQL's contract, checked when compiling.
const _: () = assert!(ARCHIVE_FAILED > 0 && ARCHIVE_FAILED <= 125);
const _: () = assert!(RESTORE_ABSENT > 0 && RESTORE_ABSENT <= 125);
const _: () = assert!(RESTORE_FATAL > 192);

/// `walkeep` subcommands: the command failed or found a problem.
pub const FAILURE: u8 = 1;

/// `walkeep` subcommands: the command line was not understood.
pub const USAGE: u8 = 2;

/// Runs `body`, turning a panic into `on_panic` instead of Rust's default status 101,
/// which PostgreSQL would read as "file not available".
pub fn guard(on_panic: u8, body: impl FnOnce() -> u8 + std::panic::UnwindSafe) -> ExitCode {
    match std::panic::catch_unwind(body) {
        Ok(code) => ExitCode::from(code),
        Err(_) => {
            // The panic hook already printed the message and location to stderr. Not
            // `eprintln!`, which panics when stderr fails (a full log disk), and that
            // second panic would exit 101 after all.
            let _ = writeln!(
                std::io::stderr(),
                "walkeep: internal error (panic); exiting with status {on_panic}"
            );
            ExitCode::from(on_panic)
        }
    }
}

/// Test-only fault injection: the fault named by `WALKEEP_TEST_FAULT`, if it is `point`.
/// Integration tests use it to panic or stall at a chosen step; it is never set in
/// production and costs one environment lookup.
pub fn fault(point: &str) -> bool {
    std::env::var("WALKEEP_TEST_FAULT").is_ok_and(|v| v == point)
}

/// Test-only: sleeps at `point` when `WALKEEP_TEST_FAULT` is `point` (for an hour: the
/// test kills the process) or `point:SECONDS`.
pub fn stall(point: &str) {
    let Ok(value) = std::env::var("WALKEEP_TEST_FAULT") else {
        return;
    };
    let seconds = match value.strip_prefix(point) {
        Some("") => 3600,
        Some(rest) => match rest.strip_prefix(':').and_then(|s| s.parse().ok()) {
            Some(seconds) => seconds,
            None => return,
        },
        None => return,
    };
    std::thread::sleep(std::time::Duration::from_secs(seconds));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_becomes_chosen_status() {
        let code = guard(RESTORE_FATAL, || panic!("boom"));
        assert_eq!(
            format!("{code:?}"),
            format!("{:?}", ExitCode::from(RESTORE_FATAL))
        );
    }
}
