//! A month's usage as records a billing system ingests: one per project × meter × UTC day,
//! split where a plan version starts within the day, each with an id that depends only on
//! what the record is about (so a re-export, or a retried upload, is ingested once).
//!
//! The pieces partition each plan segment of the month exactly as a bill does (storage
//! integrated up to now, network records up to and including now), so the records of one
//! (meter, plan version) add up to that bill line's usage, to the byte-microsecond.
//!
//! A closed month's network records are the bytes its invoice billed, kept with the invoice
//! per piece of a day (migration 15), so re-exporting a closed month is the same bytes
//! however many late records arrive. A late network record is billed on the open month as
//! a correction line; it is exported there as a record of its own, one per (meter, month
//! corrected) per month billed, with an id of its own: an ingester that already took the
//! closed month's records takes the correction as new usage.

use super::Metering;
use super::billing::network_end;
use crate::domain::metering::{DAY_MICROS, LineItem, Meter, Month, day_start};
use crate::domain::plan::GIB;
use crate::domain::{Error, ProjectId, Timestamp};
use crate::store::{StoredArtifact, StoredFolder, StoredScope};

/// The namespace of export ids (UUIDv5): fixed forever, or every id would change.
const EVENT_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6a1f_3c2e_8d4b_5e07_9b61_2f0c_47d8_a913);

/// One record of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    pub event_id: uuid::Uuid,
    pub project_id: ProjectId,
    pub meter: Meter,
    /// The UTC day (its first instant).
    pub day: Timestamp,
    /// The part of the day the record covers: the day cut by its plan segment.
    pub from: Timestamp,
    pub to: Timestamp,
    pub plan_id: String,
    pub plan_version: i32,
    /// Storage: byte-microseconds; network: bytes.
    pub quantity: i128,
    /// The month's bill is closed (finalized): these figures are its invoice's.
    pub closed: bool,
    /// A correction: network bytes of this earlier month that arrived after its invoice,
    /// billed in the month exported (the record covers that whole month).
    pub correction_for: Option<Month>,
}

impl UsageRecord {
    /// The id of a record about (project, meter, piece of a day, plan version): the same
    /// record always has the same id, whatever its quantity so far.
    fn id(
        project: &ProjectId,
        meter: Meter,
        from: Timestamp,
        plan: &str,
        version: i32,
    ) -> uuid::Uuid {
        let name = format!(
            "artifactd usage\n{project}\n{}\n{}\n{plan}\n{version}",
            meter.as_str(),
            from.as_micros()
        );
        uuid::Uuid::new_v5(&EVENT_ID_NAMESPACE, name.as_bytes())
    }

    /// The id of the correction billed in `month` for `meter`'s late records of
    /// `corrected`: one per bill line, never an ordinary record's.
    fn correction_id(
        project: &ProjectId,
        meter: Meter,
        month: Month,
        corrected: Month,
    ) -> uuid::Uuid {
        let name = format!(
            "artifactd usage correction\n{project}\n{}\n{month}\n{corrected}",
            meter.as_str()
        );
        uuid::Uuid::new_v5(&EVENT_ID_NAMESPACE, name.as_bytes())
    }
}

/// What holds a project's stored bytes at an instant, largest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBreakdown {
    pub artifacts: Vec<StoredArtifact>,
    pub scopes: Vec<StoredScope>,
    pub folders: Vec<StoredFolder>,
}

/// Projects read per page of an export of every project.
pub const EXPORT_PROJECTS_PAGE: u64 = 100;

impl Metering {
    /// One project's records for `month`, day by day up to now (a later day has none yet),
    /// then the month's corrections. At most 3 × (days + plan changes) + 2 × 3 records:
    /// bounded by the month, not the history. NOT_FOUND for a project never seen.
    pub async fn usage_records(
        &self,
        project: &ProjectId,
        month: Month,
    ) -> Result<Vec<UsageRecord>, Error> {
        self.project(project).await?;
        let now = self.clock.now();
        let closed = now >= self.finalizes_at(month);
        let segments = self
            .store
            .plan_segments(project, month.start(), month.end())
            .await?;
        // A closed month: its invoice's network pieces and correction lines (finalized on
        // first read, as GetBill does). An invoice from before the pieces were kept reads
        // its network from the rows, as it always did.
        let (frozen, corrections) = if closed {
            let invoice = self.finalize(project, month).await?;
            let corrections: Vec<LineItem> = invoice
                .lines
                .into_iter()
                .filter(|l| l.correction_for.is_some())
                .collect();
            (
                self.store.invoice_network(project, month).await?,
                corrections,
            )
        } else if month.start() <= now {
            (None, self.corrections(project, month).await?)
        } else {
            (None, Vec::new())
        };
        let network = match frozen {
            Some(pieces) => pieces,
            None => {
                let cuts: Vec<Timestamp> = segments.iter().map(|s| s.from).collect();
                self.store
                    .network_pieces(project, month.start(), network_end(month.end(), now), &cuts)
                    .await?
            }
        };
        let network_bytes = |meter: Meter, from: Timestamp| -> i128 {
            network
                .iter()
                .find(|p| p.meter == meter && p.start == from)
                .map_or(0, |p| i128::from(p.bytes))
        };
        let mut records = Vec::new();
        for segment in &segments {
            let mut day = day_start(segment.from);
            while day < segment.to {
                let next = day.saturating_add_micros(DAY_MICROS);
                let (from, to) = (segment.from.max(day), segment.to.min(next));
                if from > now {
                    break;
                }
                let storage_to = to.min(now);
                let storage = if storage_to > from {
                    self.store
                        .storage_byte_micros(project, from, storage_to, now)
                        .await?
                } else {
                    0
                };
                for (meter, quantity) in [
                    (Meter::Storage, storage),
                    (Meter::Egress, network_bytes(Meter::Egress, from)),
                    (Meter::Ingress, network_bytes(Meter::Ingress, from)),
                ] {
                    records.push(UsageRecord {
                        event_id: UsageRecord::id(
                            project,
                            meter,
                            from,
                            &segment.plan.id,
                            segment.plan.version,
                        ),
                        project_id: project.clone(),
                        meter,
                        day,
                        from,
                        to,
                        plan_id: segment.plan.id.clone(),
                        plan_version: segment.plan.version,
                        quantity,
                        closed,
                        correction_for: None,
                    });
                }
                day = next;
            }
        }
        for line in corrections {
            let Some(corrected) = line.correction_for else {
                continue;
            };
            records.push(UsageRecord {
                event_id: UsageRecord::correction_id(project, line.meter, month, corrected),
                project_id: project.clone(),
                meter: line.meter,
                day: month.start(),
                from: month.start(),
                to: month.end(),
                plan_id: line.plan_id.clone(),
                plan_version: line.plan_version,
                // The line's usage is these bytes in GiB, exactly.
                quantity: line.usage.numerator * i128::from(GIB) / line.usage.denominator,
                closed,
                correction_for: Some(corrected),
            });
        }
        Ok(records)
    }

    /// The `limit` largest artifacts stored at `at`, and the `limit` scopes and top-level
    /// folders holding the most bytes then: what the usage page shows under "what is
    /// stored".
    pub async fn stored_breakdown(
        &self,
        project: &ProjectId,
        at: Timestamp,
        limit: u64,
    ) -> Result<StoredBreakdown, Error> {
        Ok(StoredBreakdown {
            artifacts: self.store.largest_artifacts(project, at, limit).await?,
            scopes: self.store.largest_scopes(project, at, limit).await?,
            folders: self.store.largest_folders(project, at, limit).await?,
        })
    }

    /// A page of the projects an export of every project covers: those that existed before
    /// `month` ended, by id, after `after`.
    pub async fn export_projects(
        &self,
        month: Month,
        after: Option<&ProjectId>,
    ) -> Result<Vec<ProjectId>, Error> {
        self.store
            .project_ids_page(month.end(), after, EXPORT_PROJECTS_PAGE)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_depend_on_what_the_record_is_about_only() {
        let p = ProjectId::parse("p", "web").unwrap();
        let t = Timestamp::from_seconds(1_793_491_200);
        let a = UsageRecord::id(&p, Meter::Storage, t, "team", 2);
        assert_eq!(a, UsageRecord::id(&p, Meter::Storage, t, "team", 2));
        for other in [
            UsageRecord::id(&p, Meter::Egress, t, "team", 2),
            UsageRecord::id(&p, Meter::Storage, t.saturating_add_micros(1), "team", 2),
            UsageRecord::id(&p, Meter::Storage, t, "team", 3),
            UsageRecord::id(&p, Meter::Storage, t, "pro", 2),
            UsageRecord::id(
                &ProjectId::parse("p", "web2").unwrap(),
                Meter::Storage,
                t,
                "team",
                2,
            ),
        ] {
            assert_ne!(a, other);
        }
        assert_eq!(a.get_version_num(), 5);
        // Fixed forever: finance systems deduplicate on these (the README's example).
        let day = Timestamp::from_seconds(1_793_491_200 + 9 * 86_400);
        assert_eq!(
            UsageRecord::id(&p, Meter::Storage, day, "team", 2).to_string(),
            "1295c399-fba4-5491-90a4-3e50564e2a6c"
        );
    }
}
