//! The usage ledger: usage events (ingress, egress) and storage integrated from the artifact
//! log. Storage sums are exact: Postgres sums `numeric` products; SQLite (whose integers
//! would overflow into floats) streams the few columns and sums in i128.

use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter,
    QueryOrder, Statement, Value,
};

use super::entities::{usage_alert, usage_event};
use super::{Store, db_error};
use crate::domain::metering::{Meter, StorageInterval, byte_micros};
use crate::domain::{Error, ProjectId, Timestamp};

/// A recorded threshold crossing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageAlert {
    pub period: String,
    pub meter: String,
    pub threshold: u32,
    pub basis: String,
    pub figure: String,
    pub limit: String,
    pub crossed_at: Timestamp,
}

impl Store {
    /// Records a usage event once: a replay of the same id inserts nothing.
    pub async fn record_usage(
        &self,
        id: &str,
        project: &ProjectId,
        meter: Meter,
        bytes: i64,
        at: Timestamp,
    ) -> Result<(), Error> {
        usage_event::Entity::insert(usage_event::ActiveModel {
            id: Set(id.to_owned()),
            project_id: Set(project.as_str().to_owned()),
            meter: Set(meter.as_str().to_owned()),
            bytes: Set(bytes),
            occurred_at: Set(at.as_micros()),
        })
        .on_conflict(
            OnConflict::column(usage_event::Column::Id)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&self.db)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    /// Bytes of a network meter in `[from, to)`.
    pub async fn network_bytes(
        &self,
        project: &ProjectId,
        meter: Meter,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<i128, Error> {
        let row = self
            .query_one(
                "SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM usage_events \
                 WHERE project_id = ? AND meter = ? AND occurred_at >= ? AND occurred_at < ?",
                vec![
                    project.as_str().into(),
                    meter.as_str().into(),
                    from.as_micros().into(),
                    to.as_micros().into(),
                ],
            )
            .await?;
        Ok(i128::from(row))
    }

    /// Bytes of a network meter per UTC day in `[from, to)` (days without traffic omitted),
    /// as (day index from `from`, bytes).
    pub async fn network_bytes_daily(
        &self,
        project: &ProjectId,
        meter: Meter,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<(i64, i64)>, Error> {
        let day = crate::domain::metering::DAY_MICROS;
        let sql = format!(
            "SELECT (occurred_at - ?) / {day} AS day, CAST(SUM(bytes) AS BIGINT) FROM usage_events \
             WHERE project_id = ? AND meter = ? AND occurred_at >= ? AND occurred_at < ? \
             GROUP BY 1 ORDER BY 1"
        );
        let rows = self
            .db
            .query_all_raw(self.statement(
                &sql,
                vec![
                    from.as_micros().into(),
                    project.as_str().into(),
                    meter.as_str().into(),
                    from.as_micros().into(),
                    to.as_micros().into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get_by_index::<i64>(0).map_err(db_error)?,
                    r.try_get_by_index::<i64>(1).map_err(db_error)?,
                ))
            })
            .collect()
    }

    /// Σ size × |[created_at, billing_end) ∩ [from, to)| over the project's artifacts, in
    /// byte-microseconds.
    pub async fn storage_byte_micros(
        &self,
        project: &ProjectId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<i128, Error> {
        if self.db.get_database_backend() == DbBackend::Postgres {
            let row = self
                .db
                .query_one_raw(self.statement(
                    "SELECT COALESCE(SUM(size::numeric * (LEAST(COALESCE(billing_end, $1), $1) \
                     - GREATEST(created_at, $2))), 0)::text FROM artifacts \
                     WHERE project_id = $3 AND created_at < $1 \
                     AND (billing_end IS NULL OR billing_end > $2)",
                    vec![
                        to.as_micros().into(),
                        from.as_micros().into(),
                        project.as_str().into(),
                    ],
                ))
                .await
                .map_err(db_error)?
                .ok_or_else(|| Error::Internal("SUM returned no row".into()))?;
            let text: String = row.try_get_by_index(0).map_err(db_error)?;
            return text
                .parse()
                .map_err(|_| Error::Internal(format!("storage sum {text:?} is not an integer")));
        }
        let intervals = self.storage_intervals(project, from, to).await?;
        Ok(byte_micros(&intervals, from, to))
    }

    /// The storage intervals of the project's artifacts that overlap `[from, to)`.
    pub async fn storage_intervals(
        &self,
        project: &ProjectId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<StorageInterval>, Error> {
        let rows = self
            .db
            .query_all_raw(self.statement(
                "SELECT size, created_at, billing_end FROM artifacts \
                 WHERE project_id = ? AND created_at < ? AND (billing_end IS NULL OR billing_end > ?)",
                vec![
                    project.as_str().into(),
                    to.as_micros().into(),
                    from.as_micros().into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                Ok(StorageInterval {
                    size: r.try_get_by_index(0).map_err(db_error)?,
                    start: Timestamp::from_micros(r.try_get_by_index(1).map_err(db_error)?),
                    end: r
                        .try_get_by_index::<Option<i64>>(2)
                        .map_err(db_error)?
                        .map(Timestamp::from_micros),
                })
            })
            .collect()
    }

    /// Bytes and number of artifacts costing storage at `at`.
    pub async fn stored_at(&self, project: &ProjectId, at: Timestamp) -> Result<(i64, i64), Error> {
        let row = self
            .db
            .query_one_raw(self.statement(
                "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT), COUNT(*) FROM artifacts \
                 WHERE project_id = ? AND created_at <= ? AND (billing_end IS NULL OR billing_end > ?)",
                vec![
                    project.as_str().into(),
                    at.as_micros().into(),
                    at.as_micros().into(),
                ],
            ))
            .await
            .map_err(db_error)?
            .ok_or_else(|| Error::Internal("SUM returned no row".into()))?;
        Ok((
            row.try_get_by_index(0).map_err(db_error)?,
            row.try_get_by_index(1).map_err(db_error)?,
        ))
    }

    /// Records a threshold crossing; `false` when it was already recorded.
    pub async fn record_alert(
        &self,
        project: &ProjectId,
        alert: &UsageAlert,
    ) -> Result<bool, Error> {
        let inserted = usage_alert::Entity::insert(usage_alert::ActiveModel {
            project_id: Set(project.as_str().to_owned()),
            period: Set(alert.period.clone()),
            meter: Set(alert.meter.clone()),
            threshold: Set(alert.threshold as i32),
            basis: Set(alert.basis.clone()),
            figure: Set(alert.figure.clone()),
            limit_value: Set(alert.limit.clone()),
            crossed_at: Set(alert.crossed_at.as_micros()),
        })
        .on_conflict(
            OnConflict::columns([
                usage_alert::Column::ProjectId,
                usage_alert::Column::Period,
                usage_alert::Column::Meter,
                usage_alert::Column::Threshold,
            ])
            .do_nothing()
            .to_owned(),
        )
        .exec_without_returning(&self.db)
        .await
        .map_err(db_error)?;
        Ok(inserted > 0)
    }

    pub async fn list_alerts(
        &self,
        project: &ProjectId,
        period: &str,
    ) -> Result<Vec<UsageAlert>, Error> {
        Ok(usage_alert::Entity::find()
            .filter(usage_alert::Column::ProjectId.eq(project.as_str()))
            .filter(usage_alert::Column::Period.eq(period))
            .order_by_asc(usage_alert::Column::CrossedAt)
            .order_by_asc(usage_alert::Column::Meter)
            .order_by_asc(usage_alert::Column::Threshold)
            .all(&self.db)
            .await
            .map_err(db_error)?
            .into_iter()
            .map(|a| UsageAlert {
                period: a.period,
                meter: a.meter,
                threshold: a.threshold.max(0) as u32,
                basis: a.basis,
                figure: a.figure,
                limit: a.limit_value,
                crossed_at: Timestamp::from_micros(a.crossed_at),
            })
            .collect())
    }

    async fn query_one(&self, sql: &str, values: Vec<Value>) -> Result<i64, Error> {
        let row = self
            .db
            .query_one_raw(self.statement(sql, values))
            .await
            .map_err(db_error)?
            .ok_or_else(|| Error::Internal("aggregate returned no row".into()))?;
        row.try_get_by_index(0).map_err(db_error)
    }

    /// A statement written with `?` placeholders (or `$n` for Postgres-only SQL), numbered
    /// for Postgres.
    fn statement(&self, sql: &str, values: Vec<Value>) -> Statement {
        let backend = self.db.get_database_backend();
        let sql = if backend == DbBackend::Postgres && sql.contains('?') {
            let mut numbered = String::with_capacity(sql.len() + 8);
            let mut n = 0;
            for c in sql.chars() {
                if c == '?' {
                    n += 1;
                    numbered.push_str(&format!("${n}"));
                } else {
                    numbered.push(c);
                }
            }
            numbered
        } else {
            sql.to_owned()
        };
        Statement::from_sql_and_values(backend, sql, values)
    }
}
