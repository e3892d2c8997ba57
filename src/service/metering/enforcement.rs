//! Admission before any byte moves: artifact size, storage limit or cap, the monthly spend
//! cap, and included egress on BLOCK plans — each held by a reservation that is refreshed
//! while its request lives, settled with what was used and released on every other exit.
//!
//! A push reserves its declared size up front, or grows its reservation step by step as
//! an undeclared stream arrives (so it is cut off mid-stream at the cap). A pull reserves
//! its requested length up front; the egress recorder takes sent bytes out of it and the
//! rest is released when the stream ends. The spend cap prices what is stored, sent and
//! received, plus every reservation in flight.

use super::Metering;
use super::billing::Extra;
use crate::coord::{Pool, Release, Reserve};
use crate::domain::metering::Month;
use crate::domain::plan::GIB;
use crate::domain::{Error, OveragePolicy, ProjectId};
use crate::metrics::{HeldReservation, Rejection};
use crate::store::{ProjectRecord, QuotaBase};

/// Pushes of unknown size reserve storage in steps of this many bytes as they stream.
const RESERVATION_STEP_BYTES: i64 = 8 * 1024 * 1024;

impl Metering {
    /// Admits a push before any byte is read: size limits, then a reservation of the
    /// declared size (nothing yet for an undeclared one) against the storage limit or cap,
    /// and the spend cap with that reservation priced in.
    pub async fn admit_push(
        &self,
        record: &ProjectRecord,
        server_max_bytes: i64,
        expected_size: Option<i64>,
    ) -> Result<Reservation, Error> {
        let plan = &record.plan;
        if let Some(expected) = expected_size {
            check_size(
                expected,
                server_max_bytes,
                &plan.id,
                plan.max_artifact_bytes,
            )
            .map_err(|e| self.metrics().rejected(Rejection::ArtifactSize, e))?;
        }
        let mut reservation = Reservation {
            metering: self.clone(),
            record: record.clone(),
            id: format!("push:{}", uuid::Uuid::new_v4().simple()),
            limit: storage_limit(record).filter(|_| self.enabled),
            spend_capped: self.enabled && spend_cap(record).is_some(),
            declared: expected_size,
            max_size: server_max_bytes.min(plan.max_artifact_bytes),
            server_max_bytes,
            held: 0,
            entry: false,
            refreshed: std::time::Instant::now(),
            settled: false,
            outstanding: None,
        };
        if reservation.reserves() {
            reservation.cover(expected_size.unwrap_or(0), false).await?;
        }
        Ok(reservation)
    }

    /// With Postgres and no Redis, the database coordinates reservations across replicas;
    /// otherwise the counters do (Redis, or in process for a single SQLite process).
    pub(super) fn database_coordinated(&self) -> bool {
        !self.counters.shared() && self.store.coordinates_quota()
    }

    /// A pool's name in `quota_reservations` and the ledger figure it is checked against.
    fn database_pool(&self, pool: Pool<'_>) -> (String, QuotaBase) {
        let now = self.clock.now();
        match pool {
            Pool::Storage => ("stored".to_owned(), QuotaBase::Stored { at: now }),
            Pool::Egress(name) => {
                let month = Month::parse("month", name).unwrap_or_else(|_| Month::containing(now));
                (
                    format!("egress:{name}"),
                    QuotaBase::Egress {
                        from: month.start(),
                        to: month.end(),
                    },
                )
            }
        }
    }

    /// Live reservations in a pool.
    pub(super) async fn reserved_in(
        &self,
        project: &ProjectId,
        pool: Pool<'_>,
    ) -> Result<i64, Error> {
        if self.database_coordinated() {
            let (name, _) = self.database_pool(pool);
            return self.store.reserved_quota(project, &name).await;
        }
        Ok(self.counters.reserved(project.as_str(), pool).await)
    }

    /// Ends (or shrinks) reservation `id`; with the counters, `figure_delta` moves into the
    /// pool's figure in the same step. With the database the ledger rows are the figure.
    pub(super) async fn release(
        &self,
        project: &ProjectId,
        pool: Pool<'_>,
        id: &str,
        release: Release,
        figure_delta: i64,
    ) {
        if self.database_coordinated() {
            let take = match release {
                Release::All => None,
                Release::Part(bytes) => Some(bytes),
            };
            if let Err(e) = self.store.release_quota(id, take).await {
                tracing::warn!(error = %e, "could not release a quota reservation; it lapses at its expiry");
            }
            return;
        }
        self.counters
            .settle(project.as_str(), pool, id, release, figure_delta)
            .await;
    }

    /// Moves a live holder's reservation expiry on (database coordination; the counters
    /// refresh their holders themselves).
    pub(super) async fn refresh_reservation(&self, id: &str) {
        if let Err(e) = self
            .store
            .refresh_quota(id, self.counters.reservation_ttl())
            .await
        {
            tracing::warn!(error = %e, "could not refresh a quota reservation");
        }
    }

    /// Storage bytes held by the project's uploads in progress (live reservations, across
    /// replicas when the counters are shared).
    pub async fn reserved_bytes(&self, project: &ProjectId) -> Result<i64, Error> {
        self.reserved_in(project, Pool::Storage).await
    }

    /// Loads a pool's figure from the database into the counters.
    async fn rebuild(&self, project: &ProjectId, pool: Pool<'_>) -> Result<(), Error> {
        let figure = match pool {
            Pool::Storage => {
                let token = self.counters.token(project.as_str(), pool).await;
                let stored = self.store.stored_at(project, self.clock.now()).await?.0;
                (stored, token)
            }
            Pool::Egress(_) => return self.egress_to_date(project).await.map(|_| ()),
        };
        self.counters
            .prime(project.as_str(), pool, figure.0, figure.1)
            .await;
        Ok(())
    }

    /// Holds `total` bytes for reservation `id` in `pool`, rebuilding the figure on a miss.
    async fn hold(
        &self,
        project: &ProjectId,
        pool: Pool<'_>,
        id: &str,
        total: i64,
        limit: Option<i64>,
    ) -> Result<Reserve, Error> {
        if self.database_coordinated() {
            let (name, base) = self.database_pool(pool);
            let ttl = self.counters.reservation_ttl();
            let check = self
                .store
                .reserve_quota(project, &name, base, id, total, limit, ttl)
                .await?;
            return Ok(if check.granted {
                Reserve::Granted
            } else {
                Reserve::Denied {
                    stored: check.figure,
                    reserved: check.others,
                }
            });
        }
        // A rebuild can be refused when usage is recorded while it reads; a few rounds
        // settle any such race.
        for _ in 0..5 {
            match self
                .counters
                .try_reserve(project.as_str(), pool, id, total, limit)
                .await
            {
                Reserve::Miss => self.rebuild(project, pool).await?,
                Reserve::Unavailable => {
                    return Err(Error::Unavailable {
                        what: "redis",
                        cause: "quota reservations are kept in Redis, which does not answer".into(),
                    });
                }
                other => return Ok(other),
            }
        }
        Err(Error::Unavailable {
            what: "quota counters",
            cause: "figures could not be loaded".into(),
        })
    }

    /// Refuses when the month's projected total — what is stored carried to month end,
    /// network to date, every reservation in flight and `extra` — passes the spend cap.
    async fn check_spend_cap(&self, record: &ProjectRecord, extra: Extra) -> Result<(), Error> {
        let Some(cap) = spend_cap(record).filter(|_| self.enabled) else {
            return Ok(());
        };
        let project = &record.project_id;
        let month = Month::containing(self.clock.now()).to_string();
        let storing = self.reserved_in(project, Pool::Storage).await?;
        let sending = self.reserved_in(project, Pool::Egress(&month)).await?;
        let projected = self
            .projected_total(
                record,
                Extra {
                    stored_bytes: extra.stored_bytes.saturating_add(storing),
                    egress_bytes: extra.egress_bytes.saturating_add(sending),
                    // What is being stored is also received.
                    ingress_bytes: extra.ingress_bytes.saturating_add(storing),
                },
            )
            .await?;
        if projected > i128::from(cap) {
            return Err(Error::ResourceExhausted(format!(
                "monthly spend cap of {} {} would be exceeded: projected month total {} \
                 including transfers in progress (plan {})",
                money(i128::from(cap)),
                record.plan.currency,
                money(projected),
                record.plan.id
            )));
        }
        Ok(())
    }

    /// Admits a pull of `bytes`. On BLOCK plans the request's length is reserved against
    /// the month's included egress before any byte is sent; with a spend cap (BILL plans)
    /// it is reserved too, and the projected total including it must stay under the cap.
    pub async fn admit_pull(
        &self,
        record: &ProjectRecord,
        bytes: i64,
    ) -> Result<PullAdmission, Error> {
        let plan = &record.plan;
        let month = Month::containing(self.clock.now()).to_string();
        let mut admission = PullAdmission {
            metering: self.clone(),
            project: record.project_id.clone(),
            month,
            id: format!("pull:{}", uuid::Uuid::new_v4().simple()),
            held: false,
            outstanding: None,
        };
        if !self.enabled {
            return Ok(admission);
        }
        let limit = match plan.overage_policy {
            OveragePolicy::Block => Some(plan.included_egress_gib.saturating_mul(GIB)),
            OveragePolicy::Bill => None,
        };
        if limit.is_none() && spend_cap(record).is_none() {
            return Ok(admission);
        }
        let pool = Pool::Egress(&admission.month);
        let outcome = self
            .hold(&record.project_id, pool, &admission.id, bytes, limit)
            .await?;
        match outcome {
            Reserve::Denied { stored, reserved } => {
                return Err(self.metrics().rejected(
                    Rejection::EgressQuota,
                    Error::ResourceExhausted(format!(
                        "egress quota of {} bytes this month would be exceeded: {stored} \
                         bytes sent so far, {reserved} reserved by downloads in progress, \
                         {bytes} requested (plan {})",
                        limit.unwrap_or_default(),
                        plan.id
                    )),
                ));
            }
            _ => {
                admission.held = true;
                admission.outstanding = Some(self.metrics().reservation_held());
            }
        }
        // The reservation is already in the figures the spend cap sums.
        self.check_spend_cap(record, Extra::default())
            .await
            .map_err(|e| self.metrics().rejected(Rejection::SpendCap, e))?;
        Ok(admission)
    }
}

/// The spend cap that applies: the project's, on BILL plans (BLOCK plans never bill
/// overage, so their limits are the cap).
fn spend_cap(record: &ProjectRecord) -> Option<i64> {
    match record.plan.overage_policy {
        OveragePolicy::Bill => record.controls.spend_cap_micros,
        OveragePolicy::Block => None,
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

/// Storage reserved for one push: refreshed while the push lives, settled with what it
/// stored, released (through the counters' task tracker) if it is dropped unsettled.
pub struct Reservation {
    metering: Metering,
    record: ProjectRecord,
    id: String,
    /// The storage limit or cap, if any.
    limit: Option<i64>,
    /// The project has a spend cap that prices this push.
    spend_capped: bool,
    declared: Option<i64>,
    max_size: i64,
    server_max_bytes: i64,
    /// Bytes this reservation holds.
    held: i64,
    /// Whether an entry exists in the counters (even of 0 bytes) that must be released.
    entry: bool,
    /// When this holder last moved its entry's expiry (database coordination).
    refreshed: std::time::Instant,
    settled: bool,
    /// Counts this reservation as outstanding while it has an entry.
    outstanding: Option<HeldReservation>,
}

impl Reservation {
    /// Whether this push reserves at all (metering on, and a limit or a spend cap).
    fn reserves(&self) -> bool {
        self.metering.enabled && (self.limit.is_some() || self.spend_capped)
    }

    /// Sets the held total to `total`, or fails naming the limit and figures.
    async fn hold(&mut self, total: i64) -> Result<(), Error> {
        let project = self.record.project_id.clone();
        let outcome = self
            .metering
            .hold(&project, Pool::Storage, &self.id, total, self.limit)
            .await?;
        match outcome {
            Reserve::Denied { stored, reserved } => Err(Error::ResourceExhausted(format!(
                "storage limit of {} bytes would be exceeded: {stored} bytes stored, \
                 {reserved} reserved by uploads in progress, {total} requested by this \
                 upload (plan {})",
                self.limit.unwrap_or_default(),
                self.record.plan.id
            ))),
            _ => {
                if !self.entry {
                    self.outstanding = Some(self.metering.metrics().reservation_held());
                }
                self.entry = true;
                self.held = total;
                self.refreshed = std::time::Instant::now();
                Ok(())
            }
        }
    }

    /// Makes the reservation cover `size` bytes under the limit and the spend cap; with
    /// `ahead`, tries a step more first to keep round trips rare, falling back to exactly
    /// `size` near a limit.
    async fn cover(&mut self, size: i64, ahead: bool) -> Result<(), Error> {
        if ahead {
            let step = size
                .max(self.held.saturating_add(RESERVATION_STEP_BYTES))
                .min(self.max_size);
            if step > size
                && self.hold(step).await.is_ok()
                && self
                    .metering
                    .check_spend_cap(&self.record, Extra::default())
                    .await
                    .is_ok()
            {
                return Ok(());
            }
        }
        // Only these last tries count as refusals (the step ahead above may fail quietly).
        let metrics = self.metering.metrics().clone();
        self.hold(size)
            .await
            .map_err(|e| metrics.rejected(Rejection::StorageQuota, e))?;
        self.metering
            .check_spend_cap(&self.record, Extra::default())
            .await
            .map_err(|e| metrics.rejected(Rejection::SpendCap, e))
    }

    /// Called as bytes stream in: enforces the size limits and, under a limit or spend cap,
    /// grows the reservation ahead of the bytes, so an undeclared push is cut off
    /// mid-stream (RESOURCE_EXHAUSTED) when it reaches the cap.
    pub async fn received(&mut self, size: i64) -> Result<(), Error> {
        if size > self.max_size {
            return check_size(
                size,
                self.server_max_bytes,
                &self.record.plan.id,
                self.record.plan.max_artifact_bytes,
            )
            .map_err(|e| self.metering.metrics().rejected(Rejection::ArtifactSize, e));
        }
        if self.declared.is_some_and(|declared| size > declared) {
            // More than declared: the caller refuses it as INVALID_ARGUMENT.
            return Ok(());
        }
        if self.reserves() && size > self.held {
            self.cover(size, true).await?;
        } else if self.entry
            && self.metering.database_coordinated()
            && self.refreshed.elapsed() >= self.metering.counters.reservation_ttl() / 3
        {
            // Alive: keep the row from lapsing (the counters refresh their own holders).
            self.refreshed = std::time::Instant::now();
            self.metering.refresh_reservation(&self.id).await;
        }
        Ok(())
    }

    /// The push committed `size` bytes, replacing (forced overwrite) an artifact of
    /// `replaced` bytes: the stored figure moves by the difference as the reservation ends.
    pub async fn settle(mut self, size: i64, replaced: i64) {
        self.settled = true;
        if !self.metering.enabled {
            return;
        }
        let project = self.record.project_id.clone();
        self.metering
            .release(
                &project,
                Pool::Storage,
                &self.id,
                Release::All,
                size.saturating_sub(replaced),
            )
            .await;
        self.metering.after_push(&project).await;
    }
}

impl Reservation {
    /// Ends the reservation unused, now rather than through the tracker as a drop would
    /// (a resumable push, before another attempt may reserve the same bytes).
    pub async fn release(mut self) {
        self.settled = true;
        if !self.entry {
            return;
        }
        let project = self.record.project_id.clone();
        let id = std::mem::take(&mut self.id);
        self.metering
            .release(&project, Pool::Storage, &id, Release::All, 0)
            .await;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.settled || !self.entry {
            return;
        }
        // Owned work: shutdown drains the tracker, so the release is not lost.
        let metering = self.metering.clone();
        let project = self.record.project_id.clone();
        let id = std::mem::take(&mut self.id);
        self.metering.counters.spawn(async move {
            metering
                .release(&project, Pool::Storage, &id, Release::All, 0)
                .await;
        });
    }
}

/// A pull's egress reservation (when its plan limits or prices egress), handed to the
/// stream wrapper that records the bytes sent against it.
pub struct PullAdmission {
    pub(super) metering: Metering,
    pub(super) project: ProjectId,
    /// The month the reservation was taken in (`2026-11`).
    pub(super) month: String,
    pub(super) id: String,
    /// Whether an entry exists in the counters.
    pub(super) held: bool,
    /// Counts this reservation as outstanding while it is held.
    pub(super) outstanding: Option<HeldReservation>,
}

impl Drop for PullAdmission {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        // Refused after reserving (spend cap), or never streamed: release through the
        // tracker that shutdown drains.
        let metering = self.metering.clone();
        let project = self.project.clone();
        let (month, id) = (self.month.clone(), std::mem::take(&mut self.id));
        self.metering.counters.spawn(async move {
            metering
                .release(&project, Pool::Egress(&month), &id, Release::All, 0)
                .await;
        });
    }
}
