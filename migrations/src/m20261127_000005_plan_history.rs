//! Plan history and finalized invoices, so the past is never repriced.
//!
//! - `plan_versions`: every version a plan has had, each effective from an instant until the
//!   next version's. `UpdatePlan` appends one; `plans` keeps the current version's figures
//!   (and its number) for `PlanService` answers. Existing plans become version 1, effective
//!   since the beginning of time, so bills computed before this migration read the same.
//! - `project_plans`: which plan each project was on, from an instant until the next row's.
//!   A project's first row starts at 0 (it covers everything before), so existing projects
//!   carry their current plan over their whole history, as bills did before.
//! - `invoices` and `invoice_lines`: a month's bill frozen once the month has ended plus a
//!   grace for late records; served from here ever after. Quantities are exact fractions
//!   (numerator / denominator as decimal text, since they exceed int64), money integer
//!   micro-units.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261127_000005_plan_history"
    }
}

const COMMON: &str = r#"
CREATE TABLE plan_versions (
    plan_id                     TEXT NOT NULL REFERENCES plans (id),
    version                     INTEGER NOT NULL CHECK (version >= 1),
    effective_from              BIGINT NOT NULL,
    name                        TEXT NOT NULL,
    currency                    TEXT NOT NULL,
    included_storage_gib_months BIGINT NOT NULL CHECK (included_storage_gib_months >= 0),
    included_egress_gib         BIGINT NOT NULL CHECK (included_egress_gib >= 0),
    storage_price_micros        BIGINT NOT NULL CHECK (storage_price_micros >= 0),
    egress_price_micros         BIGINT NOT NULL CHECK (egress_price_micros >= 0),
    ingress_price_micros        BIGINT NOT NULL CHECK (ingress_price_micros >= 0),
    storage_limit_bytes         BIGINT CHECK (storage_limit_bytes >= 0),
    max_artifact_bytes          BIGINT NOT NULL CHECK (max_artifact_bytes >= 0),
    max_retention_days          INTEGER NOT NULL CHECK (max_retention_days >= 1),
    overage_policy              TEXT NOT NULL CHECK (overage_policy IN ('block', 'bill')),
    created_at                  BIGINT NOT NULL,
    PRIMARY KEY (plan_id, version)
);
CREATE UNIQUE INDEX plan_versions_effective ON plan_versions (plan_id, effective_from);
INSERT INTO plan_versions (plan_id, version, effective_from, name, currency,
    included_storage_gib_months, included_egress_gib, storage_price_micros,
    egress_price_micros, ingress_price_micros, storage_limit_bytes, max_artifact_bytes,
    max_retention_days, overage_policy, created_at)
SELECT id, 1, 0, name, currency, included_storage_gib_months, included_egress_gib,
    storage_price_micros, egress_price_micros, ingress_price_micros, storage_limit_bytes,
    max_artifact_bytes, max_retention_days, overage_policy, updated_at
FROM plans;
ALTER TABLE plans ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
CREATE TABLE project_plans (
    project_id   TEXT NOT NULL,
    valid_from   BIGINT NOT NULL,
    plan_id      TEXT NOT NULL REFERENCES plans (id),
    assigned_at  BIGINT NOT NULL,
    PRIMARY KEY (project_id, valid_from)
);
INSERT INTO project_plans (project_id, valid_from, plan_id, assigned_at)
SELECT project_id, 0, plan_id, updated_at FROM projects;
CREATE TABLE invoices (
    project_id           TEXT NOT NULL,
    month                TEXT NOT NULL,
    period_start         BIGINT NOT NULL,
    period_end           BIGINT NOT NULL,
    finalized_at         BIGINT NOT NULL,
    plan_id              TEXT NOT NULL,
    plan_version         INTEGER NOT NULL,
    currency             TEXT NOT NULL,
    total_micros         BIGINT NOT NULL,
    storage_byte_micros  TEXT NOT NULL,
    egress_bytes         BIGINT NOT NULL,
    ingress_bytes        BIGINT NOT NULL,
    PRIMARY KEY (project_id, month)
);
CREATE INDEX invoices_month_total ON invoices (month, total_micros DESC, project_id);
CREATE TABLE invoice_lines (
    project_id           TEXT NOT NULL,
    month                TEXT NOT NULL,
    line_no              INTEGER NOT NULL,
    meter                TEXT NOT NULL CHECK (meter IN ('storage', 'egress', 'ingress')),
    plan_id              TEXT NOT NULL,
    plan_version         INTEGER NOT NULL,
    period_start         BIGINT NOT NULL,
    period_end           BIGINT NOT NULL,
    correction_for       TEXT,
    usage_numerator      TEXT NOT NULL,
    usage_denominator    TEXT NOT NULL,
    included_numerator   TEXT NOT NULL,
    included_denominator TEXT NOT NULL,
    unit_price_micros    BIGINT NOT NULL,
    amount_micros        BIGINT NOT NULL,
    PRIMARY KEY (project_id, month, line_no)
)
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
