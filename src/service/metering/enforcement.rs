//! Admission before any byte moves: artifact size, storage limit or cap (with an atomic
//! reservation), the monthly spend cap, and included egress on BLOCK plans.

use super::Metering;
use super::billing::Extra;
use crate::coord::Reserve;
use crate::domain::plan::GIB;
use crate::domain::{Error, OveragePolicy, ProjectId};
use crate::store::ProjectRecord;

/// Pushes of unknown size reserve storage in steps of this many bytes as they stream.
const RESERVATION_STEP_BYTES: i64 = 8 * 1024 * 1024;

impl Metering {
    /// Admits a push before any byte is read: size limits, storage limit or cap with an
    /// atomic reservation of the expected size, and the spend cap.
    pub async fn admit_push(
        &self,
        record: &ProjectRecord,
        server_max_bytes: i64,
        expected_size: Option<i64>,
    ) -> Result<Reservation, Error> {
        let plan = &record.plan;
        let max_size = server_max_bytes.min(plan.max_artifact_bytes);
        if let Some(expected) = expected_size {
            check_size(
                expected,
                server_max_bytes,
                &plan.id,
                plan.max_artifact_bytes,
            )?;
        }
        if self.enabled
            && plan.overage_policy == OveragePolicy::Bill
            && let Some(cap) = record.controls.spend_cap_micros
        {
            let projected = self
                .projected_total(
                    record,
                    Extra {
                        stored_bytes: expected_size.unwrap_or(0),
                        ..Extra::default()
                    },
                )
                .await?;
            if projected > i128::from(cap) {
                return Err(Error::ResourceExhausted(format!(
                    "monthly spend cap of {} {} would be exceeded: projected month total {} \
                     (plan {})",
                    money(i128::from(cap)),
                    plan.currency,
                    money(projected),
                    plan.id
                )));
            }
        }
        let mut reservation = Reservation {
            metering: self.clone(),
            project: record.project_id.clone(),
            plan_id: plan.id.clone(),
            limit: storage_limit(record).filter(|_| self.enabled),
            max_size,
            server_max_bytes,
            plan_max_bytes: plan.max_artifact_bytes,
            reserved: 0,
            counted: 0,
            settled: false,
        };
        if reservation.limit.is_some() {
            match expected_size {
                // A declared size is counted as stored right away: a successful push then
                // needs no second round trip, a failed one is undone on drop.
                Some(expected) => reservation.reserve(expected, true).await?,
                None => reservation.reserve(0, false).await?,
            }
        }
        Ok(reservation)
    }

    pub(super) async fn rebuild_stored(&self, project: &ProjectId) -> Result<(), Error> {
        let (stored, _) = self.store.stored_at(project, self.clock.now()).await?;
        self.counters.prime_stored(project.as_str(), stored).await;
        Ok(())
    }

    /// Admits a pull of `bytes`: on BLOCK plans the month's egress may not pass the
    /// included quota.
    pub async fn admit_pull(&self, record: &ProjectRecord, bytes: i64) -> Result<(), Error> {
        let plan = &record.plan;
        if !self.enabled || plan.overage_policy != OveragePolicy::Block {
            return Ok(());
        }
        let included = plan.included_egress_gib.saturating_mul(GIB);
        let sent = self.egress_to_date(&record.project_id).await?;
        if sent.saturating_add(bytes) > included {
            return Err(Error::ResourceExhausted(format!(
                "egress quota of {included} bytes this month would be exceeded: {sent} bytes \
                 sent so far, {bytes} requested (plan {})",
                plan.id
            )));
        }
        Ok(())
    }
}

/// The storage limit that applies: the BLOCK plan's, the project's cap, or the lower of both.
pub(super) fn storage_limit(record: &ProjectRecord) -> Option<i64> {
    let plan_limit = match record.plan.overage_policy {
        OveragePolicy::Block => record.plan.storage_limit_bytes,
        OveragePolicy::Bill => None,
    };
    match (plan_limit, record.controls.storage_cap_bytes) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn check_size(size: i64, server_max: i64, plan_id: &str, plan_max: i64) -> Result<(), Error> {
    if size > plan_max {
        return Err(Error::ResourceExhausted(format!(
            "artifact size {size} bytes exceeds the {plan_id} plan's limit of {plan_max} bytes \
             per artifact"
        )));
    }
    if size > server_max {
        return Err(Error::ResourceExhausted(format!(
            "artifact size {size} bytes exceeds the server's limit of {server_max} bytes \
             (ARTIFACTD_MAX_ARTIFACT_BYTES)"
        )));
    }
    Ok(())
}

/// Micro-units as a decimal amount, e.g. `12.500000`.
fn money(micros: i128) -> String {
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

/// Storage reserved for one push; released on drop unless settled.
pub struct Reservation {
    metering: Metering,
    project: ProjectId,
    plan_id: String,
    limit: Option<i64>,
    max_size: i64,
    server_max_bytes: i64,
    plan_max_bytes: i64,
    /// Bytes held in the reserved figure (pushes of unknown size, grown as they stream).
    reserved: i64,
    /// Bytes already counted in the stored figure (a declared size).
    counted: i64,
    settled: bool,
}

impl Reservation {
    async fn reserve(&mut self, bytes: i64, as_stored: bool) -> Result<(), Error> {
        let counters = &self.metering.counters;
        for _ in 0..3 {
            match counters
                .try_reserve(self.project.as_str(), bytes, self.limit, as_stored)
                .await
            {
                Reserve::Granted => {
                    if as_stored {
                        self.counted += bytes;
                    } else {
                        self.reserved += bytes;
                    }
                    return Ok(());
                }
                Reserve::Denied { stored, reserved } => {
                    return Err(Error::ResourceExhausted(format!(
                        "storage limit of {} bytes would be exceeded: {stored} bytes stored, \
                         {reserved} reserved by uploads in progress, {bytes} more requested \
                         (plan {})",
                        self.limit.unwrap_or_default(),
                        self.plan_id
                    )));
                }
                Reserve::Miss => self.metering.rebuild_stored(&self.project).await?,
            }
        }
        Err(Error::Unavailable {
            what: "quota counters",
            cause: "stored bytes could not be loaded".into(),
        })
    }

    /// Called as bytes stream in: enforces the size limits and, under a storage limit,
    /// grows the reservation ahead of the bytes.
    pub async fn received(&mut self, size: i64) -> Result<(), Error> {
        if size > self.max_size {
            return check_size(
                size,
                self.server_max_bytes,
                &self.plan_id,
                self.plan_max_bytes,
            );
        }
        if self.limit.is_some() && size > self.reserved + self.counted {
            // Reserve ahead in steps to keep counter round trips rare; near the limit, fall
            // back to exactly what has arrived.
            let needed = size - self.reserved - self.counted;
            let step = needed.max(RESERVATION_STEP_BYTES);
            if step > needed && self.reserve(step, false).await.is_ok() {
                return Ok(());
            }
            self.reserve(needed, false).await?;
        }
        Ok(())
    }

    /// The push committed `size` bytes: they now count as stored.
    pub async fn settle(mut self, size: i64) {
        self.settled = true;
        if !self.metering.enabled {
            return;
        }
        if self.reserved != 0 || size != self.counted {
            let counters = self.metering.counters.clone();
            counters
                .settle(self.project.as_str(), self.reserved, size - self.counted)
                .await;
        }
        self.metering.after_push(&self.project).await;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.settled || (self.reserved == 0 && self.counted == 0) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let counters = self.metering.counters.clone();
            let project = self.project.as_str().to_owned();
            let (reserved, counted) = (self.reserved, self.counted);
            runtime.spawn(async move { counters.settle(&project, reserved, -counted).await });
        }
    }
}
