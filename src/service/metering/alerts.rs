//! Usage alerts: each threshold of a meter is recorded once per month when the figure
//! reaches it.

use super::Metering;
use super::billing::Extra;
use super::enforcement::storage_limit;
use crate::domain::metering::{MICROS, Meter, Month};
use crate::domain::plan::GIB;
use crate::domain::{Error, ProjectId};
use crate::store::{ProjectRecord, UsageAlert};

impl Metering {
    /// Records each threshold the figure has reached, once per meter per month.
    pub(super) async fn check_alerts(
        &self,
        record: &ProjectRecord,
        meter: &str,
        basis: &str,
        figure: i128,
        limit: i128,
    ) {
        if limit <= 0 {
            return;
        }
        let now = self.clock.now();
        let period = Month::containing(now).to_string();
        for &threshold in &record.controls.alert_thresholds {
            if figure * 100 < i128::from(threshold) * limit {
                continue;
            }
            let key = format!("{}|{period}|{meter}|{threshold}", record.project_id);
            let seen = self
                .alerted
                .lock()
                .map(|mut set| {
                    // Bounded: forgetting only costs a redundant (idempotent) insert.
                    if set.len() >= 100_000 {
                        set.clear();
                    }
                    !set.insert(key)
                })
                .unwrap_or(false);
            if seen {
                continue;
            }
            let alert = UsageAlert {
                period: period.clone(),
                meter: meter.to_owned(),
                threshold,
                basis: basis.to_owned(),
                figure: figure.to_string(),
                limit: limit.to_string(),
                crossed_at: now,
            };
            match self.store.record_alert(&record.project_id, &alert).await {
                Ok(true) => tracing::info!(
                    project = %record.project_id, meter, threshold, "usage alert threshold crossed"
                ),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "could not record a usage alert"),
            }
        }
    }

    /// After a push commits: storage and spend alerts.
    pub(super) async fn after_push(&self, project: &ProjectId) {
        let Ok(record) = self.project(project).await else {
            return;
        };
        if record.controls.alert_thresholds.is_empty() {
            return;
        }
        // Like with like: bytes stored now against a limit in bytes; without one, the
        // month's projected storage (byte-microseconds, stored bytes carried to month end)
        // against the included GiB-months in the same unit.
        let now = self.clock.now();
        let figures = match storage_limit(&record) {
            Some(limit) => self
                .store
                .stored_at(project, now)
                .await
                .map(|(stored, _)| ("storage_limit", i128::from(stored), i128::from(limit))),
            None => {
                let month = Month::containing(now);
                let month_micros = i128::from(month.seconds()) * MICROS;
                let so_far = self
                    .store
                    .storage_byte_micros(project, month.start(), now, now)
                    .await;
                let future = self
                    .store
                    .future_storage_byte_micros(project, now, month.end())
                    .await;
                so_far.and_then(|a| future.map(|b| a + b)).map(|projected| {
                    (
                        "included_storage",
                        projected,
                        i128::from(record.plan.included_storage_gib_months)
                            * i128::from(GIB)
                            * month_micros,
                    )
                })
            }
        };
        if let Ok((basis, figure, limit)) = figures {
            self.check_alerts(&record, Meter::Storage.as_str(), basis, figure, limit)
                .await;
        }
        if let Some(cap) = record.controls.spend_cap_micros
            && let Ok(projected) = self.projected_total(&record, Extra::default()).await
        {
            self.check_alerts(&record, "spend", "spend_cap", projected, cap.into())
                .await;
        }
    }

    pub async fn alerts(
        &self,
        project: &ProjectId,
        month: Month,
    ) -> Result<Vec<UsageAlert>, Error> {
        self.store.list_alerts(project, &month.to_string()).await
    }
}
