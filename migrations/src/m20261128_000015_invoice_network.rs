//! Freezes the network figures a finalized invoice billed, per piece of a day, so a month's
//! export reads the same forever: `invoice_network (project_id, month, meter, piece_start,
//! bytes)` holds, for an invoice finalized from now on, the egress and ingress bytes of each
//! UTC day (cut where a plan version starts) exactly as the invoice summed them; a network
//! record that arrives later is billed as a correction on the open month, and exported there.
//! `invoices.network_frozen` says an invoice has them: existing invoices keep `false`, and
//! their months are exported from the usage rows as before. No row changes.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261128_000015_invoice_network"
    }
}

const SCRIPT: &str = "
CREATE TABLE invoice_network (
    project_id  TEXT NOT NULL,
    month       TEXT NOT NULL,
    meter       TEXT NOT NULL CHECK (meter IN ('ingress', 'egress')),
    piece_start BIGINT NOT NULL,
    bytes       BIGINT NOT NULL CHECK (bytes >= 0),
    PRIMARY KEY (project_id, month, meter, piece_start)
);
ALTER TABLE invoices ADD COLUMN network_frozen BOOLEAN NOT NULL DEFAULT FALSE
";

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
