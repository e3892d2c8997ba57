//! Where a blob's bytes are: `blobs.location`, the key of the object that holds them in the
//! blob store, or NULL for the content address `blobs/sha256/ab/cd/<hex>`.
//!
//! On an object store a push's upload stays where it was written (`blobs/pushed/<upload
//! id>`) and becomes the blob's location, instead of being copied to its content address:
//! one upload per push, no CopyObject (capped at 5 GB on S3) and no DELETE. A local directory
//! keeps renaming to the content address (NULL). Every existing row is at its content
//! address, which NULL already says, so no row changes. The partial index serves the
//! sweeper's question "is this pushed object some blob's location?".

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261127_000011_blob_locations"
    }
}

const SCRIPT: &str = r#"
ALTER TABLE blobs ADD COLUMN location TEXT;
CREATE INDEX blobs_location ON blobs (location) WHERE location IS NOT NULL
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
