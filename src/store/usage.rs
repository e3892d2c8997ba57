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
use crate::domain::metering::{DAY_MICROS, Meter, StorageInterval, byte_micros, day_start};
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

/// The network bytes of one meter in one piece of a day (a UTC day, cut where a plan
/// segment starts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkPiece {
    pub meter: Meter,
    pub start: Timestamp,
    pub bytes: i64,
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
        let written = usage_event::Entity::insert(usage_event::ActiveModel {
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
        self.metrics.usage_recorded(meter.as_str(), written == 1);
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

    /// Network bytes of `[from, to)` (`from` a UTC midnight) per meter and piece of a day:
    /// each record falls in the piece that starts at the later of its day's start and the
    /// last of `cuts` (plan segment starts, ascending) at or before it; records before the
    /// first cut are in no piece. One query, so every figure is from one snapshot.
    pub async fn network_pieces(
        &self,
        project: &ProjectId,
        from: Timestamp,
        to: Timestamp,
        cuts: &[Timestamp],
    ) -> Result<Vec<NetworkPiece>, Error> {
        let day = crate::domain::metering::DAY_MICROS;
        let segment = if cuts.is_empty() {
            "0".to_owned()
        } else {
            cuts.iter()
                .map(|_| "CASE WHEN occurred_at >= ? THEN 1 ELSE 0 END")
                .collect::<Vec<_>>()
                .join(" + ")
        };
        let sql = format!(
            "SELECT meter, (occurred_at - ?) / {day}, CAST({segment} AS BIGINT), \
             CAST(SUM(bytes) AS BIGINT) FROM usage_events \
             WHERE project_id = ? AND occurred_at >= ? AND occurred_at < ? GROUP BY 1, 2, 3"
        );
        let mut values: Vec<Value> = vec![from.as_micros().into()];
        values.extend(cuts.iter().map(|c| Value::from(c.as_micros())));
        values.extend([
            project.as_str().into(),
            from.as_micros().into(),
            to.as_micros().into(),
        ]);
        let rows = self
            .db
            .query_all_raw(self.statement(&sql, values))
            .await
            .map_err(db_error)?;
        let mut pieces: Vec<NetworkPiece> = Vec::with_capacity(rows.len());
        for r in &rows {
            let meter: String = r.try_get_by_index(0).map_err(db_error)?;
            let meter = match meter.as_str() {
                "egress" => Meter::Egress,
                "ingress" => Meter::Ingress,
                other => return Err(Error::Internal(format!("usage event meter {other:?}"))),
            };
            let days: i64 = r.try_get_by_index(1).map_err(db_error)?;
            let segment: i64 = r.try_get_by_index(2).map_err(db_error)?;
            let Some(cut) = usize::try_from(segment)
                .ok()
                .and_then(|s| s.checked_sub(1))
                .and_then(|s| cuts.get(s))
            else {
                continue;
            };
            let start = from.saturating_add_micros(days * day).max(*cut);
            let bytes: i64 = r.try_get_by_index(3).map_err(db_error)?;
            pieces.push(NetworkPiece {
                meter,
                start,
                bytes,
            });
        }
        pieces.sort_by_key(|p| (p.start, p.meter.as_str()));
        Ok(pieces)
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
    /// byte-microseconds. `now` bounds what may be cached (only the past).
    ///
    /// On Postgres, whole past days come from `storage_days` (computed once), and partial or
    /// current days from the snapshot at the day's start plus that day's creations and
    /// endings, so the cost follows recent activity, not the project's history. SQLite scans
    /// the overlapping rows and sums in i128.
    pub async fn storage_byte_micros(
        &self,
        project: &ProjectId,
        from: Timestamp,
        to: Timestamp,
        now: Timestamp,
    ) -> Result<i128, Error> {
        if to <= from {
            return Ok(0);
        }
        if self.db.get_database_backend() != DbBackend::Postgres {
            return self.storage_byte_micros_scan(project, from, to).await;
        }
        let first_day = day_start(from);
        let mut total = 0i128;
        // The head: from `from` to the end of its day (or `to`).
        let head_end = first_day.saturating_add_micros(DAY_MICROS).min(to);
        total += self
            .byte_micros_since(project, first_day, head_end, now)
            .await?
            - self
                .byte_micros_since(project, first_day, from, now)
                .await?;
        // Whole days after it.
        let mut day = head_end;
        let whole_end = day_start(to);
        if day < whole_end {
            let cached = self.cached_days(project, day, whole_end).await?;
            while day < whole_end {
                let next = day.saturating_add_micros(DAY_MICROS);
                total += match cached.iter().find(|(d, _)| *d == day.as_micros()) {
                    Some((_, value)) => *value,
                    None => self.whole_day(project, day, now).await?,
                };
                day = next;
            }
        }
        // The tail: the start of `to`'s day up to `to`.
        if day < to {
            total += self.byte_micros_since(project, day, to, now).await?;
        }
        Ok(total)
    }

    /// Σ size × |[created_at, billing_end) ∩ [from, to)| straight from the artifact log, in
    /// one query and without touching the rollups: for finalizing a month, done once. On
    /// Postgres the products are split at 2^21 so each stays in int8 while the sum is
    /// exact numeric; SQLite streams the rows and sums in i128.
    pub async fn storage_byte_micros_scan(
        &self,
        project: &ProjectId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<i128, Error> {
        if to <= from {
            return Ok(0);
        }
        if self.db.get_database_backend() != DbBackend::Postgres {
            let intervals = self.storage_intervals(project, from, to).await?;
            return Ok(byte_micros(&intervals, from, to));
        }
        let row = self
            .db
            .query_one_raw(self.statement(
                "SELECT (COALESCE(SUM((size >> 21) * (LEAST(COALESCE(billing_end, $3), $3) \
                   - GREATEST(created_at, $2))) * 2097152 \
                   + SUM((size & 2097151) * (LEAST(COALESCE(billing_end, $3), $3) \
                   - GREATEST(created_at, $2))), 0))::text \
                 FROM artifacts WHERE project_id = $1 AND created_at < $3 \
                 AND (billing_end IS NULL OR billing_end > $2)",
                vec![
                    project.as_str().into(),
                    from.as_micros().into(),
                    to.as_micros().into(),
                ],
            ))
            .await
            .map_err(db_error)?
            .ok_or_else(|| Error::Internal("storage sum returned no row".into()))?;
        parse_integer(&row.try_get_by_index::<String>(0).map_err(db_error)?)
    }

    async fn cached_days(
        &self,
        project: &ProjectId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<(i64, i128)>, Error> {
        let rows = self
            .db
            .query_all_raw(self.statement(
                "SELECT day, byte_micros FROM storage_days WHERE project_id = ? AND day >= ? AND day < ?",
                vec![project.as_str().into(), from.as_micros().into(), to.as_micros().into()],
            ))
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                let day: i64 = r.try_get_by_index(0).map_err(db_error)?;
                let text: String = r.try_get_by_index(1).map_err(db_error)?;
                Ok((day, parse_integer(&text)?))
            })
            .collect()
    }

    /// Byte-microseconds of one whole day, remembered once the day is over.
    async fn whole_day(
        &self,
        project: &ProjectId,
        day: Timestamp,
        now: Timestamp,
    ) -> Result<i128, Error> {
        let end = day.saturating_add_micros(DAY_MICROS);
        let value = self.byte_micros_since(project, day, end, now).await?;
        if end <= rollup_cutoff(now) {
            self.note_rollup(end);
            self.db
                .execute_raw(self.statement(
                    "INSERT INTO storage_days (project_id, day, byte_micros) VALUES (?, ?, ?) \
                     ON CONFLICT DO NOTHING",
                    vec![
                        project.as_str().into(),
                        day.as_micros().into(),
                        value.to_string().into(),
                    ],
                ))
                .await
                .map_err(db_error)?;
        }
        Ok(value)
    }

    /// Byte-microseconds over `[anchor, to)` from the snapshot at `anchor` (a day start):
    /// B(anchor)·(to − anchor) − Σ size·(to − end) of rows stored at the anchor that ended
    /// before `to` + Σ size·(min(end, to) − created) of rows created after the anchor.
    /// Products are split at 2^21 so each stays in int8 while Postgres sums them exactly.
    async fn byte_micros_since(
        &self,
        project: &ProjectId,
        anchor: Timestamp,
        to: Timestamp,
        now: Timestamp,
    ) -> Result<i128, Error> {
        if to <= anchor {
            return Ok(0);
        }
        let (stored, _) = self.snapshot(project, anchor, now).await?;
        let row = self
            .db
            .query_one_raw(self.statement(
                "SELECT \
                   (SELECT COALESCE(SUM((size >> 21) * ($3 - billing_end)) * 2097152 \
                     + SUM((size & 2097151) * ($3 - billing_end)), 0) FROM artifacts \
                    WHERE project_id = $1 AND billing_end > $2 AND billing_end < $3 \
                    AND created_at <= $2)::text, \
                   (SELECT COALESCE(SUM((size >> 21) * (LEAST(COALESCE(billing_end, $3), $3) - created_at)) * 2097152 \
                     + SUM((size & 2097151) * (LEAST(COALESCE(billing_end, $3), $3) - created_at)), 0) \
                    FROM artifacts WHERE project_id = $1 AND created_at > $2 AND created_at < $3)::text",
                vec![
                    project.as_str().into(),
                    anchor.as_micros().into(),
                    to.as_micros().into(),
                ],
            ))
            .await
            .map_err(db_error)?
            .ok_or_else(|| Error::Internal("storage sums returned no row".into()))?;
        let ended = parse_integer(&row.try_get_by_index::<String>(0).map_err(db_error)?)?;
        let created = parse_integer(&row.try_get_by_index::<String>(1).map_err(db_error)?)?;
        let span = i128::from(to.as_micros() - anchor.as_micros());
        Ok(i128::from(stored) * span - ended + created)
    }

    /// Bytes and artifacts stored at `at` (created at or before it, not ended by it). Day
    /// starts not after `now` are remembered; a new one is derived from the latest earlier
    /// snapshot plus the activity in between, so only the first ever scans the history.
    async fn snapshot(
        &self,
        project: &ProjectId,
        at: Timestamp,
        now: Timestamp,
    ) -> Result<(i64, i64), Error> {
        let cacheable = at <= rollup_cutoff(now) && day_start(at) == at;
        let previous = if cacheable {
            self.db
                .query_one_raw(self.statement(
                    "SELECT at, bytes, artifacts FROM storage_snapshots \
                     WHERE project_id = ? AND at <= ? ORDER BY at DESC LIMIT 1",
                    vec![project.as_str().into(), at.as_micros().into()],
                ))
                .await
                .map_err(db_error)?
                .map(|row| -> Result<(i64, i64, i64), Error> {
                    Ok((
                        row.try_get_by_index(0).map_err(db_error)?,
                        row.try_get_by_index(1).map_err(db_error)?,
                        row.try_get_by_index(2).map_err(db_error)?,
                    ))
                })
                .transpose()?
        } else {
            None
        };
        let figures = match previous {
            Some((prev, bytes, count)) if prev == at.as_micros() => return Ok((bytes, count)),
            Some((prev, bytes, count)) if at.as_micros() - prev <= 62 * DAY_MICROS => {
                let (added, added_n, ended, ended_n) = self
                    .stored_delta(project, Timestamp::from_micros(prev), at)
                    .await?;
                (bytes + added - ended, count + added_n - ended_n)
            }
            _ => self.stored_by_scan(project, at).await?,
        };
        if cacheable {
            self.note_rollup(at);
            self.db
                .execute_raw(self.statement(
                    "INSERT INTO storage_snapshots (project_id, at, bytes, artifacts) \
                     VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    vec![
                        project.as_str().into(),
                        at.as_micros().into(),
                        figures.0.into(),
                        figures.1.into(),
                    ],
                ))
                .await
                .map_err(db_error)?;
        }
        Ok(figures)
    }

    /// Bytes and artifacts stored at `at`, summed over the project's whole history.
    async fn stored_by_scan(
        &self,
        project: &ProjectId,
        at: Timestamp,
    ) -> Result<(i64, i64), Error> {
        let row = self
            .db
            .query_one_raw(self.statement(
                "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT), COUNT(*) FROM artifacts \
                 WHERE project_id = ? AND created_at <= ? \
                 AND (billing_end IS NULL OR billing_end > ?)",
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

    /// Between two instants: bytes and artifacts created after `from` and still stored at
    /// `to`, and bytes and artifacts stored at `from` that ended by `to`.
    async fn stored_delta(
        &self,
        project: &ProjectId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<(i64, i64, i64, i64), Error> {
        let row = self
            .db
            .query_one_raw(self.statement(
                "SELECT \
                   (SELECT COALESCE(SUM(size), 0)::bigint FROM artifacts WHERE project_id = $1 \
                    AND created_at > $2 AND created_at <= $3 \
                    AND (billing_end IS NULL OR billing_end > $3)), \
                   (SELECT COUNT(*) FROM artifacts WHERE project_id = $1 \
                    AND created_at > $2 AND created_at <= $3 \
                    AND (billing_end IS NULL OR billing_end > $3)), \
                   (SELECT COALESCE(SUM(size), 0)::bigint FROM artifacts WHERE project_id = $1 \
                    AND billing_end > $2 AND billing_end <= $3 AND created_at <= $2), \
                   (SELECT COUNT(*) FROM artifacts WHERE project_id = $1 \
                    AND billing_end > $2 AND billing_end <= $3 AND created_at <= $2)",
                vec![
                    project.as_str().into(),
                    from.as_micros().into(),
                    to.as_micros().into(),
                ],
            ))
            .await
            .map_err(db_error)?
            .ok_or_else(|| Error::Internal("stored sums returned no row".into()))?;
        let get = |i| row.try_get_by_index::<i64>(i).map_err(db_error);
        Ok((get(0)?, get(1)?, get(2)?, get(3)?))
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

    /// Bytes and number of artifacts costing storage at `at` (normally now). On Postgres:
    /// the snapshot at the start of `at`'s day plus that day's creations, minus its endings.
    pub async fn stored_at(&self, project: &ProjectId, at: Timestamp) -> Result<(i64, i64), Error> {
        if self.db.get_database_backend() != DbBackend::Postgres {
            return self.stored_by_scan(project, at).await;
        }
        let anchor = day_start(at);
        let (bytes, count) = self.snapshot(project, anchor, at).await?;
        let (added, added_n, ended, ended_n) = self.stored_delta(project, anchor, at).await?;
        Ok((bytes + added - ended, count + added_n - ended_n))
    }

    /// Byte-microseconds the artifacts stored at `now` will cost until `end`, each until its
    /// billing end if that comes first: stored(now) × (end − now) − Σ size × (end −
    /// billing_end) over those ending before `end`.
    pub async fn future_storage_byte_micros(
        &self,
        project: &ProjectId,
        now: Timestamp,
        end: Timestamp,
    ) -> Result<i128, Error> {
        if end <= now {
            return Ok(0);
        }
        let (stored, _) = self.stored_at(project, now).await?;
        let rows = self
            .db
            .query_all_raw(self.statement(
                "SELECT size, billing_end FROM artifacts WHERE project_id = ? \
                 AND billing_end > ? AND billing_end < ? AND created_at <= ?",
                vec![
                    project.as_str().into(),
                    now.as_micros().into(),
                    end.as_micros().into(),
                    now.as_micros().into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        let mut ending = 0i128;
        for r in &rows {
            let size: i64 = r.try_get_by_index(0).map_err(db_error)?;
            let billing_end: i64 = r.try_get_by_index(1).map_err(db_error)?;
            ending += i128::from(size) * i128::from(end.as_micros() - billing_end);
        }
        Ok(i128::from(stored) * i128::from(end.as_micros() - now.as_micros()) - ending)
    }

    fn note_rollup(&self, at: Timestamp) {
        self.rollup_horizon
            .fetch_max(at.as_micros(), std::sync::atomic::Ordering::SeqCst);
    }

    /// Forgets rollups a write at `from` may change: snapshots at or after it and days
    /// ending after it. Rollups only cover instants at least [`ROLLUP_MARGIN_MICROS`] in the
    /// past, so a write dated "now" cannot precede one and this returns at once; it deletes
    /// only when the clock went back.
    pub(crate) async fn forget_snapshots<C: ConnectionTrait>(
        &self,
        db: &C,
        project: &ProjectId,
        from: Timestamp,
    ) -> Result<(), sea_orm::DbErr> {
        if from.as_micros()
            >= self
                .rollup_horizon
                .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(());
        }
        db.execute_raw(self.statement(
            "DELETE FROM storage_snapshots WHERE project_id = ? AND at >= ?",
            vec![project.as_str().into(), from.as_micros().into()],
        ))
        .await?;
        db.execute_raw(self.statement(
            "DELETE FROM storage_days WHERE project_id = ? AND day > ?",
            vec![
                project.as_str().into(),
                (from.as_micros() - DAY_MICROS).into(),
            ],
        ))
        .await
        .map(|_| ())
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
    pub(crate) fn statement(&self, sql: &str, values: Vec<Value>) -> Statement {
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

/// Rollups are cached only for instants at least this far in the past, so replicas whose
/// clocks differ by less can never write behind one another's rollups.
pub const ROLLUP_MARGIN_MICROS: i64 = 60 * 1_000_000;

fn rollup_cutoff(now: Timestamp) -> Timestamp {
    now.saturating_add_micros(-ROLLUP_MARGIN_MICROS)
}

fn parse_integer(text: &str) -> Result<i128, Error> {
    // numeric sums of integers print without a fractional part.
    text.parse()
        .map_err(|_| Error::Internal(format!("storage sum {text:?} is not an integer")))
}
