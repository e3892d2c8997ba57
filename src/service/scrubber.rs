//! The scrubber: a background worker that re-reads every blob kept in the blob store (a local
//! directory or an object store) at a bounded byte rate, re-hashes it, and quarantines one
//! whose size or digest is wrong (see `blob::scrub`), so bit rot and damage behind the
//! service's back turn into DATA_LOSS on Pull — and are repaired by the next push of that
//! content — instead of wrong bytes served. Pulls do not verify digests themselves (that
//! would cap Pull at the hash rate); this is where digests are checked after the push.
//!
//! The walk goes through the blob index in digest order, a page of up to [`PAGE_BLOBS`]
//! blobs (or [`PAGE_BYTES`]) at a time. Its place, and when the last pass ended, are saved in
//! the blob store (`scrub/state.json`) after every page, so a restart resumes the walk and
//! replicas share it. A pass starts [`ScrubSettings::interval`] after the previous one
//! started (the first one an interval after the state is first written, i.e. after the
//! first start), or at once if the previous pass took longer.
//!
//! One replica scrubs at a time, with the sweeper's mechanism: the Redis lease with Redis
//! configured, else a Postgres advisory lock, else (SQLite, one process) a mutex. The lock is
//! taken per page, so a replica that dies hands over within a page.
//!
//! Inline blobs (content in the database row) are not walked: the database has its own
//! checksums.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::blob::{BlobStore, Pace, Scrubbed};
use crate::coord::Counters;
use crate::domain::{Error, Sha256};
use crate::service::sweeper::SweeperLock;
use crate::store::Store;

/// Blobs per page of the walk.
pub const PAGE_BLOBS: u64 = 100;
/// A page ends early once it has read this many bytes, so the lock changes hands and the
/// place is saved at least this often.
pub const PAGE_BYTES: u64 = 256 * 1024 * 1024;
/// Lifetime of the scrubber's Redis lease; renewed while a page is scrubbed.
const SCRUB_LEASE_TTL: Duration = Duration::from_secs(30);
/// How long the worker waits before it tries again when another replica holds the lock or a
/// page failed.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// How the scrubber runs (from `ARTIFACTD_SCRUB_*`).
#[derive(Debug, Clone)]
pub struct ScrubSettings {
    /// Bytes read per second at most; zero turns the scrubber off on this replica.
    pub bytes_per_second: u64,
    /// From the start of one pass to the start of the next.
    pub interval: Duration,
}

/// What one step of the walk did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// False when another scrubber held the lock and this step did nothing.
    pub ran: bool,
    pub blobs: u64,
    pub bytes: u64,
    /// Blobs found damaged and quarantined.
    pub corrupt: u64,
    /// The walk reached the last blob: the pass is over.
    pub completed_pass: bool,
}

/// The walk's place, saved in the blob store.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ScrubState {
    /// The last blob checked in the pass under way (`None`: no pass under way).
    after: Option<String>,
    /// Unix seconds at which the current (or last) pass started.
    pass_started: u64,
}

#[derive(Clone)]
pub struct Scrubber {
    store: Store,
    blobs: BlobStore,
    counters: Counters,
    settings: ScrubSettings,
    /// One step at a time in this process (and the whole lock on SQLite).
    running: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scrubber")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Scrubber {
    pub fn new(
        store: Store,
        blobs: BlobStore,
        counters: Counters,
        settings: ScrubSettings,
    ) -> Self {
        Self {
            store,
            blobs,
            counters,
            settings,
            running: Arc::default(),
        }
    }

    /// Walks the blobs, pass after pass, until `stop` is cancelled. A failed page is logged
    /// and tried again a little later.
    pub async fn run(self, stop: CancellationToken) {
        if self.settings.bytes_per_second == 0 {
            return;
        }
        loop {
            let wait = match self.due_in().await {
                Ok(Duration::ZERO) => match self.scrub_step(PAGE_BLOBS, &stop).await {
                    Ok(report) if report.ran => {
                        if report.completed_pass {
                            tracing::info!("scrub pass done");
                        }
                        Duration::ZERO
                    }
                    Ok(_) => RETRY_AFTER,
                    Err(e) => {
                        tracing::warn!(error = %e, "scrub failed; retrying");
                        RETRY_AFTER
                    }
                },
                Ok(wait) => wait.min(RETRY_AFTER * 6),
                Err(e) => {
                    tracing::warn!(error = %e, "scrub state unreadable; retrying");
                    RETRY_AFTER
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// How long until the walk should go on: zero during a pass, else until the next pass
    /// is due. The first call on a blob store without state starts the clock.
    async fn due_in(&self) -> Result<Duration, Error> {
        let state = match self.read_state().await? {
            Some(state) => state,
            None => {
                let state = ScrubState {
                    after: None,
                    pass_started: unix_now(),
                };
                self.write_state(&state).await?;
                state
            }
        };
        if state.after.is_some() {
            return Ok(Duration::ZERO);
        }
        let next = state
            .pass_started
            .saturating_add(self.settings.interval.as_secs());
        Ok(Duration::from_secs(next.saturating_sub(unix_now())))
    }

    /// Checks up to `max_blobs` blobs (and about [`PAGE_BYTES`]) from where the walk is,
    /// starting a new pass if none is under way, and saves the new place. Does nothing when
    /// another scrubber holds the lock. Paced at the configured rate; with the scrubber off
    /// (rate 0), not paced: a step asked for explicitly runs at full speed.
    pub async fn scrub_step(
        &self,
        max_blobs: u64,
        stop: &CancellationToken,
    ) -> Result<ScrubReport, Error> {
        let Ok(_running) = self.running.try_lock() else {
            return Ok(ScrubReport::default());
        };
        let Some(lock) = self.try_lock().await? else {
            return Ok(ScrubReport::default());
        };
        let result = self.scrub_locked(max_blobs, &lock, stop).await;
        lock.release().await;
        result
    }

    async fn try_lock(&self) -> Result<Option<SweeperLock>, Error> {
        if self.counters.shared() {
            let lease = self.counters.try_lease("scrubber", SCRUB_LEASE_TTL).await?;
            return Ok(lease.map(SweeperLock::Redis));
        }
        Ok(self.store.try_scrub_lock().await?.map(SweeperLock::Store))
    }

    async fn scrub_locked(
        &self,
        max_blobs: u64,
        lock: &SweeperLock,
        stop: &CancellationToken,
    ) -> Result<ScrubReport, Error> {
        let mut report = ScrubReport {
            ran: true,
            ..ScrubReport::default()
        };
        let mut state = self.read_state().await?.unwrap_or_default();
        let after = match &state.after {
            Some(after) => Some(Sha256::parse("scrub state", after)?),
            None => {
                state.pass_started = unix_now();
                None
            }
        };
        let page = self
            .store
            .stored_blobs_after(after.as_ref(), max_blobs)
            .await?;
        let metrics = self.store.metrics();
        let mut pace = Pace::new(self.settings.bytes_per_second);
        let mut last = after;
        let mut finished_page = true;
        for blob in &page {
            if stop.is_cancelled() || !lock.held() || report.bytes >= PAGE_BYTES {
                finished_page = false;
                break;
            }
            let size = u64::try_from(blob.size).unwrap_or(0);
            let found = self
                .blobs
                .scrub(
                    &blob.sha256,
                    size,
                    blob.location.as_deref(),
                    &mut pace,
                    |n| {
                        report.bytes += n;
                        metrics.scrubbed_bytes(n);
                    },
                )
                .await?;
            report.blobs += 1;
            metrics.scrubbed_blob(matches!(found, Scrubbed::Quarantined(_)));
            if let Scrubbed::Quarantined(damage) = found {
                report.corrupt += 1;
                tracing::error!(
                    sha256 = %blob.sha256,
                    %damage,
                    "stored blob damaged: quarantined; pulls of its artifacts fail DATA_LOSS \
                     until its content is pushed again"
                );
            }
            last = Some(blob.sha256.clone());
        }
        report.completed_pass = finished_page && (page.len() as u64) < max_blobs;
        state.after = if report.completed_pass {
            metrics.scrub_pass_completed();
            None
        } else {
            last.map(|sha| sha.as_str().to_owned())
        };
        self.write_state(&state).await?;
        Ok(report)
    }

    async fn read_state(&self) -> Result<Option<ScrubState>, Error> {
        let Some(bytes) = self.blobs.read_scrub_state().await? else {
            return Ok(None);
        };
        // A state that cannot be read restarts the walk rather than stopping it.
        Ok(Some(serde_json::from_slice(&bytes).unwrap_or_default()))
    }

    async fn write_state(&self, state: &ScrubState) -> Result<(), Error> {
        let bytes =
            serde_json::to_vec(state).map_err(|e| Error::Internal(format!("scrub state: {e}")))?;
        self.blobs.write_scrub_state(bytes.into()).await
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
