//! Metering, bills and real-time enforcement, one concern per module:
//!
//! - [`billing`]: usage over a range, bills, daily usage and the admin listing — every figure
//!   computed from rows in the database with integer arithmetic.
//! - [`enforcement`]: admission of pushes and pulls against plan limits, caps and the spend
//!   cap, with reservations that are released exactly.
//! - [`egress`]: the Pull stream wrapper that records the bytes handed to clients.
//! - [`alerts`]: threshold crossings, recorded once per meter and month.
//! - [`export`]: a month's usage as per-day records with deterministic ids, for finance.
//!
//! The hot figures in [`Counters`] only make enforcement fast and are rebuilt from the same
//! rows when missing.

mod alerts;
mod billing;
mod egress;
mod enforcement;
mod export;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::coord::Counters;
use crate::domain::metering::{LineItem, Month};
use crate::domain::{Clock, Error, Plan, ProjectId, Timestamp};
use crate::store::{ProjectRecord, Store};

pub use billing::MAX_DAILY_RANGE_DAYS;
pub use egress::EGRESS_CHECKPOINT_BYTES;
pub use enforcement::Reservation;
pub use export::{EXPORT_PROJECTS_PAGE, StoredBreakdown, UsageRecord};

#[derive(Clone)]
pub struct Metering {
    store: Store,
    counters: Counters,
    clock: Arc<dyn Clock>,
    default_plan: String,
    /// Off: no usage is recorded and no quota enforced (plans still set size and retention
    /// limits). For benchmarks and deployments that bill elsewhere.
    enabled: bool,
    /// How long after a month's end its bill is finalized (late records still count).
    invoice_grace_micros: i64,
    /// Alerts already recorded by this process, to skip re-inserting them on every push.
    alerted: Arc<Mutex<HashSet<String>>>,
    /// Months being finalized in the background because a listing asked for them.
    finalizing: Arc<Mutex<HashSet<Month>>>,
    /// Recently read project records (plan and controls), so a push costs no lookup.
    projects: Arc<Mutex<HashMap<ProjectId, (ProjectRecord, Instant)>>>,
}

/// How long a project's plan and controls are reused. Changes made through this process
/// apply at once; other replicas see them within this time.
pub const PROJECT_CACHE_TTL: Duration = Duration::from_secs(5);
/// How long after a month ends its bill is finalized, by default.
pub const DEFAULT_INVOICE_GRACE: Duration = Duration::from_secs(3600);
/// Most project records cached at once.
const PROJECT_CACHE_ENTRIES: usize = 10_000;

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
    /// The end the figures were computed to: the requested end, or now if that is earlier.
    pub end: Timestamp,
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
    /// Finalized: served from its invoice, never to change.
    pub closed: bool,
    pub finalized_at: Option<Timestamp>,
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
    /// The server's metrics (they come with its store).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        self.store.metrics()
    }

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
            invoice_grace_micros: DEFAULT_INVOICE_GRACE.as_micros() as i64,
            alerted: Arc::default(),
            finalizing: Arc::default(),
            projects: Arc::default(),
        }
    }

    /// Sets how long after a month's end its bill is finalized.
    pub fn with_invoice_grace(mut self, grace: Duration) -> Self {
        self.invoice_grace_micros = i64::try_from(grace.as_micros()).unwrap_or(i64::MAX);
        self
    }

    /// Runs `task` on the tracker shutdown drains: work that must finish even when the
    /// request that started it is dropped (a resumable push's last checkpoint).
    pub fn spawn_tracked<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.counters.spawn(task);
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// The project's plan and controls, for a push: a project seen for the first time is
    /// created on the default plan. Only pushes (and admin calls) create projects.
    pub async fn project_for_push(&self, project: &ProjectId) -> Result<ProjectRecord, Error> {
        if let Some(record) = self.cached(project) {
            return Ok(record);
        }
        let record = self
            .store
            .ensure_project(project, &self.default_plan, self.clock.now())
            .await?;
        self.remember(&record);
        Ok(record)
    }

    /// The project's plan and controls; NOT_FOUND for a project never seen. Never writes.
    pub async fn project(&self, project: &ProjectId) -> Result<ProjectRecord, Error> {
        if let Some(record) = self.cached(project) {
            return Ok(record);
        }
        let record = self
            .store
            .get_project(project)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no project {project}")))?;
        self.remember(&record);
        Ok(record)
    }

    fn cached(&self, project: &ProjectId) -> Option<ProjectRecord> {
        let cache = self.projects.lock().ok()?;
        let (record, read_at) = cache.get(project)?;
        (read_at.elapsed() < PROJECT_CACHE_TTL).then(|| record.clone())
    }

    /// Caches a record; the cache is bounded (entries older than the TTL are dropped when it
    /// fills, and if all are fresh it is cleared), so a flood of project ids cannot grow it.
    fn remember(&self, record: &ProjectRecord) {
        if let Ok(mut cache) = self.projects.lock() {
            if cache.len() >= PROJECT_CACHE_ENTRIES {
                cache.retain(|_, (_, read_at)| read_at.elapsed() < PROJECT_CACHE_TTL);
                if cache.len() >= PROJECT_CACHE_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(record.project_id.clone(), (record.clone(), Instant::now()));
        }
    }

    /// A plan changed: every cached project record may be stale.
    pub async fn forget_all(&self) {
        if let Ok(mut cache) = self.projects.lock() {
            cache.clear();
        }
    }

    /// Artifacts ended by a delete stop counting against limits at once.
    pub async fn on_deleted(&self, project: &ProjectId, bytes: i64) {
        if !self.enabled {
            return;
        }
        (self.counters)
            .add(project.as_str(), crate::coord::Pool::Storage, -bytes)
            .await;
    }

    /// The project's plan, controls or stored figures changed outside the counters (plan
    /// assigned, controls updated, expirations recomputed).
    pub async fn forget(&self, project: &ProjectId) {
        if let Ok(mut cache) = self.projects.lock() {
            cache.remove(project);
        }
        self.counters.forget_stored(project.as_str()).await;
    }
}
