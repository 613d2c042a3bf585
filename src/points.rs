//! Named restore points: `walkeep mark NAME`.
//!
//! `pg_create_restore_point` writes a named record into the WAL that
//! `recovery_target_name` can stop at. walkeep also records the name with its position
//! and time in `catalog/restore-points.jsonl`, so that the recovery planner can choose a
//! backup that ends before it and check that the archive reaches it.

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::lsn::Lsn;
use crate::pg;
use crate::repo::Repository;

/// Record log of restore points.
pub const POINTS_LOG: &str = "catalog/restore-points.jsonl";

/// A restore point made by `walkeep mark`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePoint {
    /// Record format version.
    pub v: u32,
    /// The name given to `pg_create_restore_point`.
    pub name: String,
    /// Where its WAL record is.
    pub lsn: Lsn,
    /// Timeline it was made on.
    pub timeline: u32,
    /// Server time when it was made.
    pub created_at: DateTime<Utc>,
}

/// Creates a restore point on the server and records it; with `switch_wal`, also ends the
/// current WAL segment so that the point reaches the archive at once.
pub async fn mark(
    repo: &Repository,
    conninfo: Option<&str>,
    name: &str,
    switch_wal: bool,
) -> Result<RestorePoint> {
    if name.is_empty() || name.len() >= 64 {
        bail!(
            "restore point name must be 1 to 63 bytes long, got {} bytes",
            name.len()
        );
    }
    let client = pg::connect(conninfo).await?;
    if pg::system_identifier(&client).await? != repo.identity().system_identifier {
        bail!(
            "the server does not belong to repository {}",
            repo.storage().location()
        );
    }
    let row = client
        .query_one(
            "SELECT pg_create_restore_point($1)::text, \
             (SELECT timeline_id FROM pg_control_checkpoint())::int, \
             to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            &[&name],
        )
        .await
        .context("pg_create_restore_point failed")?;
    let lsn: String = row.get(0);
    let timeline: i32 = row.get(1);
    let created: String = row.get(2);
    if switch_wal {
        client
            .execute("SELECT pg_switch_wal()", &[])
            .await
            .context("pg_switch_wal failed")?;
    }
    let point = RestorePoint {
        v: 1,
        name: name.to_string(),
        lsn: lsn.parse()?,
        timeline: timeline as u32,
        created_at: created.parse()?,
    };
    repo.storage()
        .append_record(POINTS_LOG, &serde_json::to_vec(&point)?)?;
    Ok(point)
}

/// Every recorded restore point, oldest first.
pub fn list(repo: &Repository) -> Result<Vec<RestorePoint>> {
    let mut points = Vec::new();
    for raw in repo.storage().read_records(POINTS_LOG)? {
        match serde_json::from_slice(&raw) {
            Ok(point) => points.push(point),
            Err(e) => tracing::warn!("unreadable restore point record skipped: {e}"),
        }
    }
    Ok(points)
}
