//! Metering and billing: plans (seeded with `free`, `team`, `enterprise`), projects with their
//! plan and usage controls, the usage event ledger (ingress and egress, one row per event with
//! a deterministic id so replays insert nothing), threshold alerts, and `billing_end` on
//! artifacts: the instant an artifact stops costing storage (the earliest of deleted_at and,
//! unless kept, expires_at), maintained with those columns so storage is one range query.
//!
//! Money is integer micro-units of the plan's currency; quantities are integer bytes or
//! whole GiB / GiB-months as named.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261122_000002_metering"
    }
}

const COMMON: &str = r#"
CREATE TABLE plans (
    id                          TEXT PRIMARY KEY,
    name                        TEXT NOT NULL,
    currency                    TEXT NOT NULL,
    included_storage_gib_months BIGINT NOT NULL CHECK (included_storage_gib_months >= 0),
    included_egress_gib         BIGINT NOT NULL CHECK (included_egress_gib >= 0),
    storage_price_micros        BIGINT NOT NULL CHECK (storage_price_micros >= 0),
    egress_price_micros         BIGINT NOT NULL CHECK (egress_price_micros >= 0),
    ingress_price_micros        BIGINT NOT NULL DEFAULT 0 CHECK (ingress_price_micros >= 0),
    storage_limit_bytes         BIGINT CHECK (storage_limit_bytes >= 0),
    max_artifact_bytes          BIGINT NOT NULL CHECK (max_artifact_bytes >= 0),
    max_retention_days          INTEGER NOT NULL CHECK (max_retention_days >= 1),
    overage_policy              TEXT NOT NULL CHECK (overage_policy IN ('block', 'bill')),
    created_at                  BIGINT NOT NULL,
    updated_at                  BIGINT NOT NULL
);
INSERT INTO plans VALUES
    ('free', 'Free', 'USD', 2, 1, 0, 0, 0, 2147483648, 1073741824, 30, 'block', 0, 0),
    ('team', 'Team', 'USD', 100, 100, 70000, 350000, 0, NULL, 10737418240, 90, 'bill', 0, 0),
    ('enterprise', 'Enterprise', 'USD', 1024, 1024, 50000, 100000, 0, NULL, 53687091200, 400, 'bill', 0, 0);
CREATE TABLE projects (
    project_id              TEXT PRIMARY KEY,
    plan_id                 TEXT NOT NULL REFERENCES plans (id),
    retention_job_days      INTEGER,
    retention_workflow_days INTEGER,
    retention_project_days  INTEGER,
    spend_cap_micros        BIGINT,
    storage_cap_bytes       BIGINT,
    alert_thresholds        TEXT NOT NULL DEFAULT '',
    created_at              BIGINT NOT NULL,
    updated_at              BIGINT NOT NULL
);
CREATE TABLE usage_events (
    id           TEXT PRIMARY KEY,
    project_id   TEXT NOT NULL,
    meter        TEXT NOT NULL CHECK (meter IN ('ingress', 'egress')),
    bytes        BIGINT NOT NULL CHECK (bytes >= 0),
    occurred_at  BIGINT NOT NULL
);
CREATE INDEX usage_events_project_time ON usage_events (project_id, occurred_at);
CREATE TABLE usage_alerts (
    project_id  TEXT NOT NULL,
    period      TEXT NOT NULL,
    meter       TEXT NOT NULL,
    threshold   INTEGER NOT NULL,
    basis       TEXT NOT NULL,
    figure      TEXT NOT NULL,
    limit_value TEXT NOT NULL,
    crossed_at  BIGINT NOT NULL,
    PRIMARY KEY (project_id, period, meter, threshold)
);
ALTER TABLE artifacts ADD COLUMN billing_end BIGINT;
UPDATE artifacts SET billing_end = CASE
    WHEN deleted_at IS NULL THEN (CASE WHEN keep THEN NULL ELSE expires_at END)
    WHEN expires_at IS NULL OR keep THEN deleted_at
    WHEN expires_at < deleted_at THEN expires_at
    ELSE deleted_at END;
CREATE INDEX artifacts_project_billing ON artifacts (project_id, created_at, billing_end, size)
"#;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        match manager.get_database_backend() {
            DbBackend::Postgres | DbBackend::Sqlite => crate::run_script(manager, COMMON).await,
            other => Err(DbErr::Migration(format!(
                "unsupported database backend {other:?}"
            ))),
        }
    }
}
