//! artifactd's schema, forward only. Each migration is plain SQL per backend (Postgres and
//! SQLite) written against the schema as it was, never against the live entities, so old
//! migrations keep meaning what they meant.

pub use sea_orm_migration::prelude::*;

mod m20261122_000001_core;
mod m20261122_000002_metering;
mod m20261122_000003_storage_snapshots;
mod m20261122_000004_inline_blobs;
mod m20261127_000005_plan_history;
mod m20261127_000006_scoped_idempotency;
mod m20261127_000007_quota_reservations;
mod m20261127_000008_retention_rules;
mod m20261127_000009_jobs;
mod m20261127_000010_blob_lifecycle;
mod m20261127_000011_blob_locations;
mod m20261127_000012_resumable_uploads;
mod m20261127_000013_trim_artifact_indexes;
mod m20261128_000014_live_artifacts_by_size;
mod m20261128_000015_invoice_network;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261122_000001_core::Migration),
            Box::new(m20261122_000002_metering::Migration),
            Box::new(m20261122_000003_storage_snapshots::Migration),
            Box::new(m20261122_000004_inline_blobs::Migration),
            Box::new(m20261127_000005_plan_history::Migration),
            Box::new(m20261127_000006_scoped_idempotency::Migration),
            Box::new(m20261127_000007_quota_reservations::Migration),
            Box::new(m20261127_000008_retention_rules::Migration),
            Box::new(m20261127_000009_jobs::Migration),
            Box::new(m20261127_000010_blob_lifecycle::Migration),
            Box::new(m20261127_000011_blob_locations::Migration),
            Box::new(m20261127_000012_resumable_uploads::Migration),
            Box::new(m20261127_000013_trim_artifact_indexes::Migration),
            Box::new(m20261128_000014_live_artifacts_by_size::Migration),
            Box::new(m20261128_000015_invoice_network::Migration),
        ]
    }
}

/// Runs each statement of a `;`-separated script (no `;` inside statements).
pub(crate) async fn run_script(manager: &SchemaManager<'_>, script: &str) -> Result<(), DbErr> {
    let db = manager.get_connection();
    for statement in script.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        db.execute_unprepared(statement).await?;
    }
    Ok(())
}
