//! The sweeper: a background worker that reclaims what the lifecycle leaves behind, one
//! replica at a time. Each run, in batches:
//!
//! 1. marks expired artifacts ended at their expiry (rows stay: they are the billing log,
//!    and billing already stopped at `billing_end`, which does not move), and collects the
//!    content each batch referenced (as in step 4) while the next batch is being ended;
//! 2. removes temporary uploads older than the upload max age (an upload in progress is
//!    written to at least every stream idle timeout, so it is spared);
//! 3. records blob files the database does not know as stored (crash orphans), so the
//!    next step reclaims them once the grace period has passed;
//! 4. collects blobs (files, objects, inline rows) that no artifact has referenced, and no
//!    push has leased, for the grace period — under the row locks that keep a concurrent
//!    push from losing its content (see `store::sweep`);
//! 5. prunes rows of artifacts that ended more than the history retention ago, once every
//!    month they bill is finalized into an invoice (it finalizes a closed month itself
//!    first, and never touches a row an open month still bills).
//!
//! One sweeper at a time: with Redis configured, a lease in Redis ([`SWEEP_LEASE_TTL`],
//! renewed while the sweep runs, so a replica that dies frees it within that time; with
//! Redis down no replica sweeps, and the run counts as failed); otherwise on Postgres a
//! transaction-level advisory lock (released when its connection goes, even if the replica
//! dies); SQLite without Redis runs in one process, where a mutex suffices. Every step is also safe if two ran at once — each end is a conditional update
//! and each collection re-checks under lock — so the lock saves work, it does not carry
//! correctness.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::blob::BlobStore;
use crate::coord::{Counters, Lease};
use crate::domain::metering::Month;
use crate::domain::{Clock, Error, ProjectId, Sha256, Timestamp};
use crate::service::Metering;
use crate::store::{Store, SweepLock};

/// Lifetime of the sweeper's Redis lease; its holder renews it every third of that.
pub const SWEEP_LEASE_TTL: Duration = Duration::from_secs(30);

/// How the sweeper runs (from `ARTIFACTD_SWEEP_*`, `ARTIFACTD_BLOB_GRACE`,
/// `ARTIFACTD_UPLOAD_MAX_AGE`, `ARTIFACTD_HISTORY_RETENTION`).
#[derive(Debug, Clone)]
pub struct SweepSettings {
    /// Time between runs; zero turns the background worker off.
    pub interval: Duration,
    /// Rows (artifacts, blobs) per statement.
    pub batch: u64,
    /// How long content stays after its last reference ended or its last push leased it.
    pub blob_grace: Duration,
    /// Temporary uploads untouched for longer are removed.
    pub upload_max_age: Duration,
    /// Resumable uploads no Push has moved on for longer are removed (service clock).
    pub resumable_upload_max_age: Duration,
    /// Rows of artifacts ended longer ago than this are pruned.
    pub history_retention: Duration,
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// False when another sweeper held the lock and this run did nothing.
    pub ran: bool,
    pub ended_artifacts: u64,
    pub removed_uploads: u64,
    pub adopted_orphans: u64,
    pub collected_blobs: u64,
    pub collected_bytes: u64,
    pub pruned_rows: u64,
}

#[derive(Clone)]
pub struct Sweeper {
    store: Store,
    blobs: BlobStore,
    metering: Metering,
    /// Where the lease lives when they are shared (Redis).
    counters: Counters,
    clock: Arc<dyn Clock>,
    settings: SweepSettings,
    /// One run at a time in this process (and the whole lock on SQLite); also remembers
    /// when blob files were last searched for orphans.
    running: Arc<tokio::sync::Mutex<Option<Timestamp>>>,
}

impl std::fmt::Debug for Sweeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sweeper")
            .field("settings", &self.settings)
            .finish()
    }
}

/// Shortest history retention accepted: late network records correct the three invoiced
/// months before the open one by re-billing them from rows, so rows must outlive that.
pub const MIN_HISTORY_RETENTION: Duration = Duration::from_secs(124 * 86_400);

impl Sweeper {
    pub fn new(
        store: Store,
        blobs: BlobStore,
        metering: Metering,
        counters: Counters,
        clock: Arc<dyn Clock>,
        settings: SweepSettings,
    ) -> Self {
        Self {
            store,
            blobs,
            metering,
            counters,
            clock,
            settings,
            running: Arc::default(),
        }
    }

    pub fn settings(&self) -> &SweepSettings {
        &self.settings
    }

    /// Runs every interval until `stop` is cancelled (the first run one interval after
    /// start-up). A failed run is logged and retried at the next interval.
    pub async fn run(self, stop: CancellationToken) {
        if self.settings.interval.is_zero() {
            return;
        }
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(self.settings.interval) => {}
            }
            tokio::select! {
                () = stop.cancelled() => return,
                result = self.sweep_once() => match result {
                    Ok(report) if report.ran => tracing::info!(
                        ended = report.ended_artifacts,
                        collected_blobs = report.collected_blobs,
                        collected_bytes = report.collected_bytes,
                        removed_uploads = report.removed_uploads,
                        pruned_rows = report.pruned_rows,
                        "sweep done"
                    ),
                    Ok(_) => tracing::debug!("another replica is sweeping"),
                    Err(e) => tracing::warn!(error = %e, "sweep failed; retrying next interval"),
                },
            }
        }
    }

    /// One full run, if no other sweeper holds the lock.
    pub async fn sweep_once(&self) -> Result<SweepReport, Error> {
        let Ok(mut last_orphan_scan) = self.running.try_lock() else {
            return Ok(SweepReport::default());
        };
        let started = Instant::now();
        let metrics = self.store.metrics();
        let lock = match self.try_lock().await {
            Ok(Some(lock)) => lock,
            Ok(None) => return Ok(SweepReport::default()),
            Err(e) => {
                metrics.sweep_failed(started.elapsed());
                return Err(e);
            }
        };
        let result = self.sweep_locked(&mut last_orphan_scan).await;
        lock.release().await;
        match &result {
            Ok(_) => metrics.sweep_finished(started.elapsed()),
            Err(_) => metrics.sweep_failed(started.elapsed()),
        }
        result
    }

    /// Takes the one-sweeper lock this deployment uses (the Redis lease with Redis, else
    /// the store's): `None` when another sweeper holds it. `sweep_once` takes it itself;
    /// tests hold it to keep other sweepers out.
    pub async fn try_lock(&self) -> Result<Option<SweeperLock>, Error> {
        if self.counters.shared() {
            let lease = self.counters.try_lease("sweeper", SWEEP_LEASE_TTL).await?;
            return Ok(lease.map(SweeperLock::Redis));
        }
        Ok(self.store.try_sweep_lock().await?.map(SweeperLock::Store))
    }

    async fn sweep_locked(
        &self,
        last_orphan_scan: &mut Option<Timestamp>,
    ) -> Result<SweepReport, Error> {
        let mut report = SweepReport {
            ran: true,
            ..SweepReport::default()
        };
        let now = self.clock.now();
        (
            report.ended_artifacts,
            report.collected_blobs,
            report.collected_bytes,
        ) = self.end_expired(now).await?;
        report.removed_uploads = self.remove_abandoned_uploads().await?;
        report.removed_uploads += self.remove_abandoned_resumable_uploads().await?;
        let grace = micros(self.settings.blob_grace);
        // Orphans are collected a grace period after they are first seen, so looking for
        // them once per grace period is enough (a listing of every blob is not cheap).
        if last_orphan_scan.is_none_or(|at| now.as_micros() - at.as_micros() >= grace) {
            report.adopted_orphans = self.adopt_orphans(now).await?;
            report.removed_uploads += self.remove_unclaimed_objects().await?;
            *last_orphan_scan = Some(now);
        }
        let (blobs, bytes) = self.collect_blobs(now).await?;
        report.collected_blobs += blobs;
        report.collected_bytes += bytes;
        report.pruned_rows = self.prune_history(now).await?;
        Ok(report)
    }

    /// Ends every artifact expired by now, a batch per statement, and collects the content
    /// each batch referenced while the next batch ends (two connections, so the database
    /// works on both at once): content whose last reference just ended is collected while
    /// its index pages are still in memory, instead of by a later scan of every blob.
    /// Content still referenced elsewhere, or within the grace period, is skipped here (the
    /// collection checks again under lock) and left to [`Self::collect_blobs`]. Returns the
    /// artifacts ended and the blobs and bytes collected.
    async fn end_expired(&self, now: Timestamp) -> Result<(u64, u64, u64), Error> {
        let cutoff = now.saturating_add_micros(-micros(self.settings.blob_grace));
        let (mut ended, mut blobs, mut bytes) = (0u64, 0u64, 0u64);
        let mut ending: Vec<String> = Vec::new();
        let mut from = None;
        loop {
            let (batch, (count, size)) = tokio::try_join!(
                self.store.end_expired(now, from, self.settings.batch),
                self.collect_batch(&ending, cutoff, now),
            )?;
            let last = (batch.len() as u64) < self.settings.batch;
            from = batch
                .iter()
                .map(|artifact| artifact.ended_at)
                .max()
                .or(from);
            ended += batch.len() as u64;
            blobs += count;
            bytes += size;
            self.store.metrics().swept_artifacts(batch.len() as u64);
            // `UNREFERENCED`: an artifact that ended at the cutoff no longer references.
            ending = batch
                .into_iter()
                .filter(|artifact| artifact.ended_at <= cutoff)
                .map(|artifact| artifact.sha256)
                .collect();
            ending.sort_unstable();
            ending.dedup();
            if last {
                let (count, size) = self.collect_batch(&ending, cutoff, now).await?;
                return Ok((ended, blobs + count, bytes + size));
            }
        }
    }

    /// Upload ages come from the blob store's own modification times, so they are compared
    /// with the wall clock, not the service clock.
    async fn remove_abandoned_uploads(&self) -> Result<u64, Error> {
        let before = SystemTime::now()
            .checked_sub(self.settings.upload_max_age)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let (removed, bytes) = self.blobs.remove_uploads_before(before).await?;
        if removed > 0 {
            tracing::info!(removed, bytes, "abandoned uploads removed");
        }
        Ok(removed)
    }

    /// Resumable uploads (see `service::artifacts::resumable`) that no Push has
    /// checkpointed for `ARTIFACTD_RESUMABLE_UPLOAD_MAX_AGE`, completed or not: each file
    /// goes under its lock, so one a Push is writing right now is skipped, and its row only
    /// if still that old. One batch per run (the oldest first): abandoned uploads are few.
    async fn remove_abandoned_resumable_uploads(&self) -> Result<u64, Error> {
        if !self.blobs.supports_resumable() {
            return Ok(0);
        }
        let before = self
            .clock
            .now()
            .saturating_add_micros(-micros(self.settings.resumable_upload_max_age));
        let mut removed = 0;
        for id in self
            .store
            .stale_uploads(before, self.settings.batch)
            .await?
        {
            match self.blobs.open_resumable(&id, false).await? {
                crate::blob::Opened::Busy => {}
                crate::blob::Opened::Locked(file) => {
                    if self.store.remove_stale_upload(&id, before).await? {
                        file.remove().await?;
                        removed += 1;
                    }
                }
                crate::blob::Opened::Missing => {
                    if self.store.remove_stale_upload(&id, before).await? {
                        removed += 1;
                    }
                }
            }
        }
        if removed > 0 {
            tracing::info!(removed, "abandoned resumable uploads removed");
        }
        Ok(removed)
    }

    /// Pushed objects on an object store that no blob names, last modified longer ago than
    /// `ARTIFACTD_UPLOAD_MAX_AGE`: left by a push that died between completing its upload
    /// and claiming it as its blob's location. Each goes under the lock a claim takes (see
    /// `store::locations`); the listing comes with the orphan scan's, once per grace period.
    async fn remove_unclaimed_objects(&self) -> Result<u64, Error> {
        if self.blobs.is_local() {
            return Ok(0);
        }
        let before = SystemTime::now()
            .checked_sub(self.settings.upload_max_age)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut removed = 0;
        let mut keys = self
            .blobs
            .pushed_before(before)
            .chunks(usize::try_from(self.settings.batch).unwrap_or(1000));
        while let Some(chunk) = keys.next().await {
            let keys: Vec<String> = chunk.into_iter().collect::<Result<_, _>>()?;
            let named = self.store.named_locations(&keys).await?;
            for key in keys.iter().filter(|key| !named.contains(*key)) {
                if let Some(lock) = self.store.lock_unclaimed(key).await? {
                    self.blobs.delete_object(key).await?;
                    lock.commit().await?;
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            tracing::info!(removed, "pushed objects no blob names removed");
        }
        Ok(removed)
    }

    async fn adopt_orphans(&self, now: Timestamp) -> Result<u64, Error> {
        let mut adopted = 0;
        let mut files = self
            .blobs
            .list_blobs()
            .chunks(usize::try_from(self.settings.batch).unwrap_or(1000));
        while let Some(chunk) = files.next().await {
            let found: Vec<(Sha256, i64)> = chunk.into_iter().collect::<Result<_, _>>()?;
            adopted += self.store.adopt_blob_files(&found, now).await?;
        }
        if adopted > 0 {
            tracing::info!(
                adopted,
                "blob files without a stored row found; collected after the grace period"
            );
        }
        Ok(adopted)
    }

    /// Collects unreferenced blobs in batches: each batch's rows are marked collected and
    /// stay locked while their bytes are deleted, then the batch commits.
    async fn collect_blobs(&self, now: Timestamp) -> Result<(u64, u64), Error> {
        let cutoff = now.saturating_add_micros(-micros(self.settings.blob_grace));
        let (mut blobs, mut bytes) = (0u64, 0u64);
        let mut after = (i64::MIN, String::new());
        loop {
            let page = self
                .store
                .blob_candidates(cutoff, &after, self.settings.batch)
                .await?;
            if !page.candidates.is_empty() {
                let (count, size) = self.collect_batch(&page.candidates, cutoff, now).await?;
                blobs += count;
                bytes += size;
            }
            match page.next {
                Some(next) => after = next,
                None => return Ok((blobs, bytes)),
            }
        }
    }

    /// Collects one batch: its rows are marked collected and stay locked while their bytes
    /// are deleted, then it commits. Returns the blobs and bytes collected.
    async fn collect_batch(
        &self,
        candidates: &[String],
        cutoff: Timestamp,
        now: Timestamp,
    ) -> Result<(u64, u64), Error> {
        if candidates.is_empty() {
            return Ok((0, 0));
        }
        let collection = self.store.collect_blobs(candidates, cutoff, now).await?;
        self.blobs.delete_blobs(&collection.stored_at).await?;
        let (count, size) = collection
            .stored
            .iter()
            .chain(&collection.inline)
            .fold((0u64, 0u64), |(n, total), (_, size)| {
                (n + 1, total + u64::try_from(*size).unwrap_or(0))
            });
        collection.commit().await?;
        self.store.metrics().swept_blobs(count, size);
        Ok((count, size))
    }

    /// Prunes rows of artifacts ended before now − retention whose every billed month has
    /// an invoice. A closed month without one is finalized first (as its first `GetBill`
    /// would); a row an open month still bills stays.
    async fn prune_history(&self, now: Timestamp) -> Result<u64, Error> {
        let cutoff = now.saturating_add_micros(-micros(self.settings.history_retention));
        let mut invoiced: std::collections::HashMap<String, std::collections::HashSet<String>> =
            std::collections::HashMap::new();
        let mut pruned = 0;
        let mut after = (i64::MIN, i64::MIN);
        loop {
            let rows = self
                .store
                .ended_before(cutoff, after, self.settings.batch)
                .await?;
            let Some(last) = rows.last() else {
                return Ok(pruned);
            };
            after = (last.deleted_at.as_micros(), last.id);
            let mut prunable = Vec::with_capacity(rows.len());
            for row in &rows {
                if self.months_finalized(row, now, &mut invoiced).await? {
                    prunable.push(row.id);
                }
            }
            let batch = self.store.prune_artifacts(&prunable).await?;
            pruned += batch;
            if (rows.len() as u64) < self.settings.batch {
                return Ok(pruned);
            }
        }
    }

    /// Whether every month `row` bills storage in has an invoice, finalizing closed months
    /// that lack one. `invoiced` caches each project's invoiced months for this run.
    async fn months_finalized(
        &self,
        row: &crate::store::EndedRow,
        now: Timestamp,
        invoiced: &mut std::collections::HashMap<String, std::collections::HashSet<String>>,
    ) -> Result<bool, Error> {
        if row.billing_end <= row.created_at {
            return Ok(true); // never billed a microsecond
        }
        let Ok(project) = ProjectId::parse("project_id", &row.project_id) else {
            return Ok(false);
        };
        if !invoiced.contains_key(&row.project_id) {
            let months = self.store.invoiced_months(&row.project_id).await?;
            invoiced.insert(row.project_id.clone(), months);
        }
        let last = Month::containing(row.billing_end.saturating_add_micros(-1));
        let mut month = Month::containing(row.created_at);
        loop {
            let key = month.to_string();
            let known = invoiced
                .get(&row.project_id)
                .is_some_and(|months| months.contains(&key));
            if !known {
                if now < self.metering.finalizes_at(month) {
                    return Ok(false); // an open month still bills this row
                }
                self.metering.finalize(&project, month).await?;
                if let Some(months) = invoiced.get_mut(&row.project_id) {
                    months.insert(key);
                }
            }
            if month == last {
                return Ok(true);
            }
            month = month.next();
        }
    }
}

/// The one-sweeper lock, held while a sweep runs.
pub enum SweeperLock {
    Redis(Lease),
    Store(SweepLock),
}

impl std::fmt::Debug for SweeperLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Redis(_) => "SweeperLock::Redis",
            Self::Store(_) => "SweeperLock::Store",
        })
    }
}

impl SweeperLock {
    /// False once a Redis lease was found taken by another holder (see [`Lease::held`]).
    pub fn held(&self) -> bool {
        match self {
            Self::Redis(lease) => lease.held(),
            Self::Store(_) => true,
        }
    }

    pub async fn release(self) {
        match self {
            Self::Redis(lease) => lease.release().await,
            Self::Store(lock) => lock.release().await,
        }
    }
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}
