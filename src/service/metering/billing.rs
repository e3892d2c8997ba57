//! Usage and bills: figures over a range, a month's bill with its projection, daily usage
//! and every project's totals.

use super::{Bill, DailyUsage, Metering, UsageReport};
use crate::domain::metering::{
    self, DAY_MICROS, Meter, Month, MonthUsage, bill_lines, byte_micros, split_by_month,
};
use crate::domain::{Error, ProjectId, Timestamp};
use crate::store::ProjectRecord;

/// Longest range ListDailyUsage answers in one call.
pub const MAX_DAILY_RANGE_DAYS: i64 = 366;

/// Usage not yet recorded that a spend-cap check adds to the projection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extra {
    /// Bytes that will be stored from now until month end (or their expiry).
    pub stored_bytes: i64,
    pub egress_bytes: i64,
    pub ingress_bytes: i64,
}

impl Metering {
    /// The current month's projected total (what is stored carried to month end, network to
    /// date) with `extra` on top: what the spend cap is checked against.
    pub(super) async fn projected_total(
        &self,
        record: &ProjectRecord,
        extra: Extra,
    ) -> Result<i128, Error> {
        let now = self.clock.now();
        let month = Month::containing(now);
        let usage = self.month_usage(&record.project_id, month, now).await?;
        let (stored, _) = self.store.stored_at(&record.project_id, now).await?;
        let mut projected =
            project_to_month_end(usage, month, now, stored.saturating_add(extra.stored_bytes));
        projected.egress_bytes += i128::from(extra.egress_bytes);
        projected.ingress_bytes += i128::from(extra.ingress_bytes);
        Ok(bill_lines(&record.plan, month, &projected).1)
    }

    /// Usage of `month` up to `until` (the whole month when it has passed).
    pub(super) async fn month_usage(
        &self,
        project: &ProjectId,
        month: Month,
        until: Timestamp,
    ) -> Result<MonthUsage, Error> {
        let end = month.end().min(until).max(month.start());
        Ok(MonthUsage {
            storage_byte_micros: self
                .store
                .storage_byte_micros(project, month.start(), end, self.clock.now())
                .await?,
            egress_bytes: self
                .store
                .network_bytes(project, Meter::Egress, month.start(), end)
                .await?,
            ingress_bytes: self
                .store
                .network_bytes(project, Meter::Ingress, month.start(), end)
                .await?,
        })
    }

    pub async fn usage(
        &self,
        project: &ProjectId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<UsageReport, Error> {
        if to <= from {
            return Err(Error::invalid("end", "must be after start"));
        }
        let mut parts = Vec::new();
        let mut total = 0i128;
        for (month, start, end) in split_by_month(from, to) {
            let bm = self
                .store
                .storage_byte_micros(project, start, end, self.clock.now())
                .await?;
            total += bm;
            parts.push((month, bm));
        }
        let now = self.clock.now();
        let (stored_bytes, live_artifacts) = self.store.stored_at(project, now).await?;
        Ok(UsageReport {
            storage_byte_micros: total,
            storage_gib_months: metering::gib_months_over(&parts),
            egress_bytes: self
                .store
                .network_bytes(project, Meter::Egress, from, to)
                .await?,
            ingress_bytes: self
                .store
                .network_bytes(project, Meter::Ingress, from, to)
                .await?,
            stored_bytes,
            live_artifacts,
        })
    }

    pub async fn bill(&self, project: &ProjectId, month: Month) -> Result<Bill, Error> {
        let record = self.project(project).await?;
        let now = self.clock.now();
        let usage = self.month_usage(project, month, now).await?;
        let (lines, total_micros) = bill_lines(&record.plan, month, &usage);
        let closed = now >= month.end();
        let projected = if !closed && now >= month.start() {
            let (stored, _) = self.store.stored_at(project, now).await?;
            let projected = project_to_month_end(usage, month, now, stored);
            Some(bill_lines(&record.plan, month, &projected))
        } else {
            None
        };
        Ok(Bill {
            project_id: project.clone(),
            plan: record.plan,
            month,
            lines,
            total_micros,
            closed,
            projected,
        })
    }

    pub async fn daily(
        &self,
        project: &ProjectId,
        first_day: Timestamp,
        last_day: Timestamp,
    ) -> Result<Vec<DailyUsage>, Error> {
        if last_day < first_day {
            return Err(Error::invalid("end_day", "must not be before start_day"));
        }
        let to = last_day.saturating_add_micros(DAY_MICROS);
        let days = (to.as_micros() - first_day.as_micros()) / DAY_MICROS;
        if days > MAX_DAILY_RANGE_DAYS {
            return Err(Error::invalid(
                "end_day",
                format!("the range is {days} days; at most {MAX_DAILY_RANGE_DAYS} per call"),
            ));
        }
        let intervals = self.store.storage_intervals(project, first_day, to).await?;
        let egress = self
            .store
            .network_bytes_daily(project, Meter::Egress, first_day, to)
            .await?;
        let ingress = self
            .store
            .network_bytes_daily(project, Meter::Ingress, first_day, to)
            .await?;
        let lookup =
            |rows: &[(i64, i64)], day: i64| rows.iter().find(|r| r.0 == day).map_or(0, |r| r.1);
        Ok((0..days)
            .map(|d| {
                let start = first_day.saturating_add_micros(d * DAY_MICROS);
                let end = start.saturating_add_micros(DAY_MICROS);
                let last_instant = Timestamp::from_micros(end.as_micros() - 1);
                DailyUsage {
                    day: start,
                    storage_byte_micros: byte_micros(&intervals, start, end),
                    stored_bytes_at_end: intervals
                        .iter()
                        .filter(|i| {
                            i.start <= last_instant && i.end.is_none_or(|e| e > last_instant)
                        })
                        .map(|i| i.size)
                        .sum(),
                    egress_bytes: lookup(&egress, d),
                    ingress_bytes: lookup(&ingress, d),
                }
            })
            .collect())
    }

    /// Every project's bill for `month`, largest total first.
    pub async fn projects_usage(&self, month: Month) -> Result<Vec<Bill>, Error> {
        let mut bills = Vec::new();
        for id in self.store.list_project_ids().await? {
            let project = ProjectId::parse("project_id", &id)
                .map_err(|_| Error::Internal(format!("bad project id {id:?} in projects")))?;
            bills.push(self.bill(&project, month).await?);
        }
        bills.sort_by(|a, b| {
            b.total_micros
                .cmp(&a.total_micros)
                .then_with(|| a.project_id.cmp(&b.project_id))
        });
        Ok(bills)
    }
}

/// Current stored bytes carried from `now` to month end, plus network to date.
fn project_to_month_end(
    usage: MonthUsage,
    month: Month,
    now: Timestamp,
    stored: i64,
) -> MonthUsage {
    let remaining = (month.end().as_micros() - now.as_micros()).max(0);
    MonthUsage {
        storage_byte_micros: usage.storage_byte_micros + i128::from(stored) * i128::from(remaining),
        ..usage
    }
}
