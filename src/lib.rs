//! walkeep: durable, verified WAL archiving, base backups and point-in-time recovery for
//! PostgreSQL.
//!
//! The binaries are thin: `walkeep-archive` calls [`archive`], `walkeep-restore` calls
//! [`fetch`], and `walkeep` drives the rest. Everything they share lives here:
//!
//! - [`wal`] and [`lsn`]: PostgreSQL's WAL names, segment headers and positions;
//! - [`storage`]: where objects live, behind a trait an object store can implement;
//! - [`durable`]: the one place that writes files crash-safely;
//! - [`object`]: the stored-object format (zstd plus a checksummed trailer);
//! - [`repo`] and [`catalog`]: the repository's identity, layout and index;
//! - [`spool`], [`readahead`] and [`prefetch`]: archiving ahead of PostgreSQL's calls and
//!   fetching ahead of recovery, through a local spool directory.

pub mod archive;
pub mod backup;
pub mod catalog;
pub mod check;
pub mod cli;
pub mod config;
pub mod control;
pub mod durable;
pub mod exit;
pub mod expire;
pub mod fetch;
pub mod logging;
pub mod lsn;
pub mod manifest;
pub mod object;
pub mod parallel;
pub mod pg;
pub mod points;
pub mod prefetch;
pub mod readahead;
pub mod recovery;
pub mod repo;
pub mod restore;
pub mod spool;
pub mod status;
pub mod storage;
pub mod timeline;
pub mod verify;
pub mod wal;
pub mod walscan;
