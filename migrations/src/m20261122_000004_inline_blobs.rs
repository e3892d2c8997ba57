//! Small blobs kept in the database: `blobs.content` holds the bytes of a blob small enough
//! to live in its row (NULL: the blob is in the blob store). A push of a few KiB then costs
//! one database commit instead of a file (or an object) of its own, its directories and two
//! fsyncs (or a PUT), and the row and its content become durable together.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261122_000004_inline_blobs"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        match manager.get_database_backend() {
            // A row up to 8 KiB stays whole in its heap page: no TOAST table and TOAST index
            // insert, and no compression attempt, for the commonest small files.
            DbBackend::Postgres => {
                crate::run_script(
                    manager,
                    "ALTER TABLE blobs ADD COLUMN content BYTEA; \
                     ALTER TABLE blobs SET (toast_tuple_target = 8160)",
                )
                .await
            }
            DbBackend::Sqlite => {
                crate::run_script(manager, "ALTER TABLE blobs ADD COLUMN content BLOB").await
            }
            other => Err(DbErr::Migration(format!(
                "unsupported database backend {other:?}"
            ))),
        }
    }
}
