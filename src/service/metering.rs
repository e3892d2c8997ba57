//! Metering, bills and real-time enforcement.
//!
//! Every figure here is computed from rows in the database (the artifact log and the usage
//! events) with integer arithmetic; the hot figures in [`Counters`] only make enforcement
//! fast and are rebuilt from the same rows when missing.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use futures::stream::BoxStream;

use crate::coord::{Counters, Reserve};
use crate::domain::metering::{
    self, DAY_MICROS, LineItem, Meter, Month, MonthUsage, bill_lines, byte_micros, split_by_month,
};
use crate::domain::plan::GIB;
use crate::domain::{Clock, Error, OveragePolicy, Plan, ProjectId, Timestamp};
use crate::store::{ProjectRecord, Store, UsageAlert};

/// Egress of a long Pull is recorded at least every this many bytes, so a crash loses at
/// most one checkpoint's worth.
pub const EGRESS_CHECKPOINT_BYTES: i64 = 64 * 1024 * 1024;
/// Pushes of unknown size reserve storage in steps of this many bytes as they stream.
const RESERVATION_STEP_BYTES: i64 = 8 * 1024 * 1024;
/// Longest range ListDailyUsage answers in one call.
pub const MAX_DAILY_RANGE_DAYS: i64 = 366;

#[derive(Clone)]
pub struct Metering {
    store: Store,
    counters: Counters,
    clock: Arc<dyn Clock>,
    default_plan: String,
    /// Off: no usage is recorded and no quota enforced (plans still set size and retention
    /// limits). For benchmarks and deployments that bill elsewhere.
    enabled: bool,
    /// Alerts already recorded by this process, to skip re-inserting them on every push.
    alerted: Arc<Mutex<HashSet<String>>>,
    /// Recently read project records (plan and controls), so a push costs no lookup.
    projects: Arc<Mutex<HashMap<ProjectId, (ProjectRecord, Instant)>>>,
}

/// How long a project's plan and controls are reused. Changes made through this process
/// apply at once; other replicas see them within this time.
pub const PROJECT_CACHE_TTL: Duration = Duration::from_secs(5);

impl std::fmt::Debug for Metering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metering")
            .field("counters", &self.counters)
            .field("default_plan", &self.default_plan)
            .finish()
    }
}

/// Usage of one project over a range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageReport {
    pub storage_byte_micros: i128,
    /// GiB-months, six decimals, each calendar month weighted by its own length.
    pub storage_gib_months: String,
    pub egress_bytes: i128,
    pub ingress_bytes: i128,
    pub stored_bytes: i64,
    pub live_artifacts: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bill {
    pub project_id: ProjectId,
    pub plan: Plan,
    pub month: Month,
    pub lines: Vec<LineItem>,
    pub total_micros: i128,
    pub closed: bool,
    /// For the current month: current stored bytes carried to month end plus egress and
    /// ingress to date.
    pub projected: Option<(Vec<LineItem>, i128)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyUsage {
    pub day: Timestamp,
    pub storage_byte_micros: i128,
    pub stored_bytes_at_end: i64,
    pub egress_bytes: i64,
    pub ingress_bytes: i64,
}

impl Metering {
    pub fn new(
        store: Store,
        counters: Counters,
        clock: Arc<dyn Clock>,
        default_plan: String,
        enabled: bool,
    ) -> Self {
        Self {
            store,
            counters,
            clock,
            default_plan,
            enabled,
            alerted: Arc::default(),
            projects: Arc::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// The project's plan and controls; a project seen for the first time gets the default
    /// plan.
    pub async fn project(&self, project: &ProjectId) -> Result<ProjectRecord, Error> {
        if let Ok(cache) = self.projects.lock()
            && let Some((record, read_at)) = cache.get(project)
            && read_at.elapsed() < PROJECT_CACHE_TTL
        {
            return Ok(record.clone());
        }
        let record = self
            .store
            .ensure_project(project, &self.default_plan, self.clock.now())
            .await?;
        if let Ok(mut cache) = self.projects.lock() {
            cache.insert(project.clone(), (record.clone(), Instant::now()));
        }
        Ok(record)
    }

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
                .projected_total(record, expected_size.unwrap_or(0))
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

    async fn rebuild_stored(&self, project: &ProjectId) -> Result<(), Error> {
        let (stored, _) = self.store.stored_at(project, self.clock.now()).await?;
        self.counters.prime_stored(project.as_str(), stored).await;
        Ok(())
    }

    /// Artifacts ended by a delete stop counting against limits at once.
    pub async fn on_deleted(&self, project: &ProjectId, bytes: i64) {
        if !self.enabled {
            return;
        }
        self.counters.settle(project.as_str(), 0, -bytes).await;
    }

    /// The project's plan, controls or stored figures changed outside the counters (plan
    /// assigned, controls updated, expirations recomputed).
    pub async fn forget(&self, project: &ProjectId) {
        if let Ok(mut cache) = self.projects.lock() {
            cache.remove(project);
        }
        self.counters.forget_stored(project.as_str()).await;
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

    async fn egress_to_date(&self, project: &ProjectId) -> Result<i64, Error> {
        let now = self.clock.now();
        let month = Month::containing(now);
        let key = month.to_string();
        if let Some(sent) = self.counters.egress(project.as_str(), &key).await {
            return Ok(sent);
        }
        let sent = self
            .store
            .network_bytes(project, Meter::Egress, month.start(), month.end())
            .await?;
        let sent = i64::try_from(sent).unwrap_or(i64::MAX);
        self.counters
            .prime_egress(project.as_str(), &key, sent)
            .await;
        Ok(sent)
    }

    /// Wraps a Pull's chunks so the bytes handed to the client are recorded as egress:
    /// at every checkpoint and when the stream ends, however it ends.
    pub fn meter_pull(
        &self,
        project: &ProjectId,
        chunks: BoxStream<'static, Result<Bytes, Error>>,
    ) -> BoxStream<'static, Result<Bytes, Error>> {
        if !self.enabled {
            return chunks;
        }
        Box::pin(MeteredPull {
            inner: chunks,
            meter: EgressMeter {
                metering: self.clone(),
                project: project.clone(),
                stream_id: uuid::Uuid::new_v4().simple().to_string(),
                sent: 0,
                recorded: 0,
                seq: 0,
            },
        })
    }

    async fn record_egress(&self, project: ProjectId, id: String, bytes: i64) {
        let now = self.clock.now();
        if let Err(e) = self
            .store
            .record_usage(&id, &project, Meter::Egress, bytes, now)
            .await
        {
            tracing::error!(error = %e, bytes, "could not record egress");
            return;
        }
        let month = Month::containing(now).to_string();
        self.counters
            .add_egress(project.as_str(), &month, bytes)
            .await;
        if let Ok(record) = self.project(&project).await
            && !record.controls.alert_thresholds.is_empty()
            && record.plan.included_egress_gib > 0
            && let Ok(sent) = self.egress_to_date(&project).await
        {
            let limit = i128::from(record.plan.included_egress_gib) * i128::from(GIB);
            self.check_alerts(
                &record,
                Meter::Egress.as_str(),
                "included_egress",
                sent.into(),
                limit,
            )
            .await;
        }
    }

    /// Records each threshold the figure has reached, once per meter per month.
    async fn check_alerts(
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
    async fn after_push(&self, project: &ProjectId) {
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
            && let Ok(projected) = self.projected_total(&record, 0).await
        {
            self.check_alerts(&record, "spend", "spend_cap", projected, cap.into())
                .await;
        }
    }

    /// The current month's projected total with `extra_bytes` more stored from now on.
    async fn projected_total(
        &self,
        record: &ProjectRecord,
        extra_bytes: i64,
    ) -> Result<i128, Error> {
        let now = self.clock.now();
        let month = Month::containing(now);
        let usage = self.month_usage(&record.project_id, month, now).await?;
        let (stored, _) = self.store.stored_at(&record.project_id, now).await?;
        let projected = project_to_month_end(usage, month, now, stored.saturating_add(extra_bytes));
        Ok(bill_lines(&record.plan, month, &projected).1)
    }

    /// Usage of `month` up to `until` (the whole month when it has passed).
    async fn month_usage(
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

    pub async fn alerts(
        &self,
        project: &ProjectId,
        month: Month,
    ) -> Result<Vec<UsageAlert>, Error> {
        self.store.list_alerts(project, &month.to_string()).await
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

/// The storage limit that applies: the BLOCK plan's, the project's cap, or the lower of both.
fn storage_limit(record: &ProjectRecord) -> Option<i64> {
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

struct MeteredPull {
    inner: BoxStream<'static, Result<Bytes, Error>>,
    meter: EgressMeter,
}

struct EgressMeter {
    metering: Metering,
    project: ProjectId,
    stream_id: String,
    sent: i64,
    recorded: i64,
    seq: u32,
}

impl EgressMeter {
    /// Records the bytes sent since the last record under the next deterministic id.
    fn flush(&mut self) {
        let bytes = self.sent - self.recorded;
        if bytes == 0 {
            return;
        }
        let id = format!("pull:{}:{}", self.stream_id, self.seq);
        self.seq += 1;
        self.recorded = self.sent;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let metering = self.metering.clone();
            let project = self.project.clone();
            runtime.spawn(async move { metering.record_egress(project, id, bytes).await });
        }
    }
}

impl Drop for EgressMeter {
    fn drop(&mut self) {
        self.flush();
    }
}

impl Stream for MeteredPull {
    type Item = Result<Bytes, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = self.inner.as_mut().poll_next(cx);
        match &polled {
            Poll::Ready(Some(Ok(chunk))) => {
                self.meter.sent += chunk.len() as i64;
                if self.meter.sent - self.meter.recorded >= EGRESS_CHECKPOINT_BYTES {
                    self.meter.flush();
                }
            }
            Poll::Ready(None) => self.meter.flush(),
            _ => {}
        }
        polled
    }
}
