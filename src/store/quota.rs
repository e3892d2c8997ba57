//! The database as quota coordinator, for Postgres deployments without Redis: reservations
//! are rows of `quota_reservations`, each with its own expiry (on the database's clock, so
//! replicas agree), and a check-and-reserve runs under a row lock on the project
//! (`SELECT … FOR UPDATE` on `projects`), which serialises reservers of one project across
//! every replica. The figure a reservation is checked against is read from the ledger in
//! the same transaction, after the lock: bytes stored from the artifact log, egress from the
//! usage events. Correct first; Redis, when configured, is the fast path.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait, Value};

use super::{Store, db_error};
use crate::domain::{Error, ProjectId, Timestamp};

/// The figure a reservation pool is checked against.
#[derive(Debug, Clone, Copy)]
pub enum QuotaBase {
    /// Bytes stored at this instant.
    Stored { at: Timestamp },
    /// Egress recorded in `[from, to)` (a calendar month).
    Egress { from: Timestamp, to: Timestamp },
}

/// The outcome of a check-and-reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaCheck {
    pub granted: bool,
    /// The base figure it was checked against.
    pub figure: i64,
    /// Live reservations of other holders.
    pub others: i64,
}

/// Now on the database's clock, in unix microseconds.
const DB_NOW: &str = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)";

impl Store {
    /// Whether reservations can be coordinated by this database across processes.
    pub fn coordinates_quota(&self) -> bool {
        self.db.get_database_backend() == DbBackend::Postgres
    }

    /// Sets reservation `id`'s bytes to `total` in `pool` if `figure + others + total <=
    /// limit`, where lapsed reservations of the project are purged first. Holds the
    /// project's row lock for the check, so concurrent reservers take turns.
    #[allow(clippy::too_many_arguments)]
    pub async fn reserve_quota(
        &self,
        project: &ProjectId,
        pool: &str,
        base: QuotaBase,
        id: &str,
        total: i64,
        limit: Option<i64>,
        ttl: Duration,
    ) -> Result<QuotaCheck, Error> {
        let txn = self.db.begin().await.map_err(db_error)?;
        let p = project.as_str();
        let locked = txn
            .query_one_raw(pg(
                "SELECT project_id FROM projects WHERE project_id = $1 FOR UPDATE",
                vec![p.into()],
            ))
            .await
            .map_err(db_error)?;
        if locked.is_none() {
            return Err(Error::Internal(format!(
                "no project row {p:?} to reserve quota against"
            )));
        }
        txn.execute_raw(pg(
            &format!(
                "DELETE FROM quota_reservations WHERE project_id = $1 AND expires_at <= {DB_NOW}"
            ),
            vec![p.into()],
        ))
        .await
        .map_err(db_error)?;
        let figure = match base {
            QuotaBase::Stored { at } => {
                scalar(
                    &txn,
                    "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM artifacts \
                     WHERE project_id = $1 AND created_at <= $2 \
                     AND (billing_end IS NULL OR billing_end > $2)",
                    vec![p.into(), at.as_micros().into()],
                )
                .await?
            }
            QuotaBase::Egress { from, to } => {
                scalar(
                    &txn,
                    "SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM usage_events \
                     WHERE project_id = $1 AND meter = 'egress' \
                     AND occurred_at >= $2 AND occurred_at < $3",
                    vec![p.into(), from.as_micros().into(), to.as_micros().into()],
                )
                .await?
            }
        };
        let others = scalar(
            &txn,
            "SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM quota_reservations \
             WHERE project_id = $1 AND pool = $2 AND id <> $3",
            vec![p.into(), pool.into(), id.into()],
        )
        .await?;
        let granted =
            limit.is_none_or(|limit| figure.saturating_add(others).saturating_add(total) <= limit);
        if granted {
            txn.execute_raw(pg(
                &format!(
                    "INSERT INTO quota_reservations (id, project_id, pool, bytes, expires_at) \
                     VALUES ($1, $2, $3, $4, {DB_NOW} + $5) \
                     ON CONFLICT (id) DO UPDATE SET bytes = EXCLUDED.bytes, \
                     expires_at = EXCLUDED.expires_at"
                ),
                vec![
                    id.into(),
                    p.into(),
                    pool.into(),
                    total.into(),
                    micros(ttl).into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        }
        txn.commit().await.map_err(db_error)?;
        Ok(QuotaCheck {
            granted,
            figure,
            others,
        })
    }

    /// Ends reservation `id` (`take: None`) or takes `take` bytes out of it (recorded
    /// meanwhile). The ledger rows themselves are the figure, so nothing else moves.
    pub async fn release_quota(&self, id: &str, take: Option<i64>) -> Result<(), Error> {
        let statement = match take {
            None => pg(
                "DELETE FROM quota_reservations WHERE id = $1",
                vec![id.into()],
            ),
            Some(bytes) => pg(
                "UPDATE quota_reservations SET bytes = GREATEST(bytes - $2, 0) WHERE id = $1",
                vec![id.into(), bytes.into()],
            ),
        };
        self.db.execute_raw(statement).await.map_err(db_error)?;
        Ok(())
    }

    /// Bytes held by live reservations of a project's pool.
    pub async fn reserved_quota(&self, project: &ProjectId, pool: &str) -> Result<i64, Error> {
        scalar(
            &self.db,
            &format!(
                "SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM quota_reservations \
                 WHERE project_id = $1 AND pool = $2 AND expires_at > {DB_NOW}"
            ),
            vec![project.as_str().into(), pool.into()],
        )
        .await
    }

    /// Moves the expiry of reservation `id` to `ttl` from now (its holder is alive).
    pub async fn refresh_quota(&self, id: &str, ttl: Duration) -> Result<(), Error> {
        self.db
            .execute_raw(pg(
                &format!("UPDATE quota_reservations SET expires_at = {DB_NOW} + $2 WHERE id = $1"),
                vec![id.into(), micros(ttl).into()],
            ))
            .await
            .map_err(db_error)?;
        Ok(())
    }
}

fn pg(sql: &str, values: Vec<Value>) -> Statement {
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

async fn scalar<C: ConnectionTrait>(db: &C, sql: &str, values: Vec<Value>) -> Result<i64, Error> {
    let row = db
        .query_one_raw(pg(sql, values))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::Internal("an aggregate returned no row".into()))?;
    row.try_get_by_index(0).map_err(db_error)
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}
