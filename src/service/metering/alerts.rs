//! Usage alerts: each threshold of a meter is recorded once per month when the figure
//! reaches it.

use super::Metering;
use super::billing::Extra;
use super::enforcement::storage_limit;
use crate::domain::metering::{Meter, Month};
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
                .map(|mut set| !set.insert(key))
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
        if let Ok((stored, _)) = self.store.stored_at(project, self.clock.now()).await {
            let (basis, limit) = match storage_limit(&record) {
                Some(limit) => ("storage_limit", i128::from(limit)),
                None => (
                    "included_storage",
                    i128::from(record.plan.included_storage_gib_months) * i128::from(GIB),
                ),
            };
            self.check_alerts(
                &record,
                Meter::Storage.as_str(),
                basis,
                stored.into(),
                limit,
            )
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
