//! What the sweeper needs to reclaim space without ever deleting content a push is about to
//! reference:
//!
//! - `blobs.last_ref_at`: the last instant a push referenced the blob (or took a lease on it
//!   before checking its bytes). Content is collected only once the grace period has passed
//!   since then and since the end of the last artifact that used it. Existing rows take the
//!   creation instant of their newest artifact (or their own), which is exactly when they
//!   were last referenced.
//! - `blobs.epoch`: incremented each time the blob's content is collected. A push records
//!   the epoch its lease saw and its commit requires it unchanged, so content collected
//!   between a push's check of the bytes and its commit fails the commit instead of
//!   committing a row that points at missing bytes.
//! - `blobs.collected_at`: when the content (file, object or inline bytes) was deleted;
//!   NULL while it is stored. The row stays as long as artifact rows (the billing log) name
//!   it; a later push of the same content revives it.
//! - Indexes for the sweeper's scans: ended artifacts by their end (history pruning), stored
//!   blobs by their last reference (collection). Expired live artifacts are found through
//!   `artifacts_live_expiry` (migration 8).

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261127_000010_blob_lifecycle"
    }
}

const SCRIPT: &str = r#"
ALTER TABLE blobs ADD COLUMN last_ref_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE blobs ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE blobs ADD COLUMN collected_at BIGINT;
UPDATE blobs SET last_ref_at = COALESCE(
    (SELECT MAX(a.created_at) FROM artifacts a WHERE a.sha256 = blobs.sha256),
    blobs.created_at);
CREATE INDEX blobs_stored_last_ref ON blobs (last_ref_at, sha256) WHERE collected_at IS NULL;
CREATE INDEX artifacts_ended ON artifacts (deleted_at, id) WHERE deleted_at IS NOT NULL
"#;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        match manager.get_database_backend() {
            DbBackend::Postgres | DbBackend::Sqlite => crate::run_script(manager, SCRIPT).await,
            other => Err(DbErr::Migration(format!(
                "unsupported database backend {other:?}"
            ))),
        }
    }
}
