//! Egress: a Pull's chunks are wrapped so the bytes handed to the client are recorded,
//! at every checkpoint and when the stream ends, however it ends.
//!
//! Records are durable work, not fire-and-forget: each is a task on the counters' tracker
//! (which shutdown drains) that retries with backoff until the database takes it, under a
//! deterministic id (`pull:<stream>:<seq>`) so a retry after an unseen success inserts
//! nothing twice. Only then are the bytes moved from the pull's reservation to the
//! month's egress figure.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use futures::stream::BoxStream;

use super::Metering;
use super::enforcement::PullAdmission;
use crate::coord::{Counters, Pool, Release};
use crate::domain::metering::{Meter, Month};
use crate::domain::plan::GIB;
use crate::domain::{Error, ProjectId};

/// Egress of a long Pull is recorded at least every this many bytes, so a crash loses at
/// most one checkpoint's worth.
pub const EGRESS_CHECKPOINT_BYTES: i64 = 64 * 1024 * 1024;
/// Attempts to record one egress checkpoint before it is given up (and logged as lost);
/// with the doubling backoff below this spans about a minute of database trouble.
const RECORD_ATTEMPTS: u32 = 10;
const FIRST_RETRY: Duration = Duration::from_millis(100);

impl Metering {
    pub(super) async fn egress_to_date(&self, project: &ProjectId) -> Result<i64, Error> {
        let now = self.clock.now();
        let month = Month::containing(now);
        let key = month.to_string();
        if let Some(sent) = self
            .counters
            .figure(project.as_str(), Pool::Egress(&key))
            .await
        {
            return Ok(sent);
        }
        let token = self
            .counters
            .token(project.as_str(), Pool::Egress(&key))
            .await;
        let sent = self
            .store
            .network_bytes(project, Meter::Egress, month.start(), month.end())
            .await?;
        let sent = i64::try_from(sent).unwrap_or(i64::MAX);
        self.counters
            .prime(project.as_str(), Pool::Egress(&key), sent, token)
            .await;
        Ok(sent)
    }

    /// Wraps a Pull's chunks so the bytes handed to the client are recorded as egress:
    /// at every checkpoint and when the stream ends, however it ends. `admission` is the
    /// pull's egress reservation, which the records draw down and the end releases.
    pub fn meter_pull(
        &self,
        admission: PullAdmission,
        chunks: BoxStream<'static, Result<Bytes, Error>>,
    ) -> BoxStream<'static, Result<Bytes, Error>> {
        if !self.enabled {
            return chunks;
        }
        let meter = Arc::new(Mutex::new(EgressMeter {
            stream_id: uuid::Uuid::new_v4().simple().to_string(),
            admission,
            refreshed: std::time::Instant::now(),
            sent: 0,
            recorded: 0,
            seq: 0,
            closed: false,
        }));
        // At shutdown a pull stuck on a slow client records what it sent so far and is cut:
        // it sends nothing after that, so nothing goes unbilled.
        let weak = Arc::downgrade(&meter);
        let hook = self.counters.on_drain(Arc::new(move || {
            if let Some(meter) = weak.upgrade() {
                let mut meter = lock(&meter);
                // Records what was sent and releases the rest of the reservation while the
                // database is still open.
                meter.flush(true);
                // Nothing more is sent unbilled: the next poll ends the stream UNAVAILABLE
                // (the client resumes from its offset elsewhere).
                meter.closed = true;
            }
        }));
        Box::pin(MeteredPull {
            inner: chunks,
            meter,
            hook,
            counters: self.counters.clone(),
        })
    }

    /// Waits up to `deadline` for owned background work (egress records, reservation
    /// releases) to finish; called by shutdown after the listeners drained.
    pub async fn drain(&self, deadline: Duration) -> bool {
        self.counters.drain(deadline).await
    }

    /// Records one checkpoint, retrying transient failures; then moves the bytes from the
    /// reservation (`id` in the admission month's pool, if one is held) to the figure.
    async fn record_egress(&self, record: EgressRecord) {
        let now = self.clock.now();
        let mut delay = FIRST_RETRY;
        let mut attempt = 1;
        loop {
            match self
                .store
                .record_usage(
                    &record.id,
                    &record.project,
                    Meter::Egress,
                    record.bytes,
                    now,
                )
                .await
            {
                Ok(()) => break,
                Err(e) if attempt < RECORD_ATTEMPTS => {
                    tracing::warn!(error = %e, bytes = record.bytes, attempt, "egress record failed; retrying");
                }
                Err(e) => {
                    tracing::error!(error = %e, bytes = record.bytes, id = %record.id, "egress record lost after retries");
                    return;
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
            attempt += 1;
        }
        match &record.reservation {
            Some((month, id)) => {
                let release = if record.last {
                    Release::All
                } else {
                    Release::Part(record.bytes)
                };
                self.release(
                    &record.project,
                    Pool::Egress(month),
                    id,
                    release,
                    record.bytes,
                )
                .await;
            }
            None => {
                let month = Month::containing(now).to_string();
                self.counters
                    .add(record.project.as_str(), Pool::Egress(&month), record.bytes)
                    .await;
            }
        }
        if let Ok(project_record) = self.project(&record.project).await
            && !project_record.controls.alert_thresholds.is_empty()
            && project_record.plan.included_egress_gib > 0
            && let Ok(sent) = self.egress_to_date(&record.project).await
        {
            let limit = i128::from(project_record.plan.included_egress_gib) * i128::from(GIB);
            self.check_alerts(
                &project_record,
                Meter::Egress.as_str(),
                "included_egress",
                sent.into(),
                limit,
            )
            .await;
        }
    }
}

/// One checkpoint of a pull's egress.
struct EgressRecord {
    id: String,
    project: ProjectId,
    bytes: i64,
    /// (month, id) of the pull's reservation, when it holds one.
    reservation: Option<(String, String)>,
    /// The stream ended: release what is left of the reservation.
    last: bool,
}

struct MeteredPull {
    inner: BoxStream<'static, Result<Bytes, Error>>,
    meter: Arc<Mutex<EgressMeter>>,
    /// This pull's drain hook.
    hook: u64,
    counters: Counters,
}

impl Drop for MeteredPull {
    fn drop(&mut self) {
        self.counters.forget_on_drain(self.hook);
        lock(&self.meter).flush(true);
    }
}

fn lock(meter: &Mutex<EgressMeter>) -> std::sync::MutexGuard<'_, EgressMeter> {
    // A poisoned lock only means a panic mid-update of plain counters.
    meter
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct EgressMeter {
    admission: PullAdmission,
    refreshed: std::time::Instant,
    stream_id: String,
    sent: i64,
    recorded: i64,
    seq: u32,
    /// Shutdown recorded this stream: it may send nothing more.
    closed: bool,
}

impl EgressMeter {
    /// Hands the bytes sent since the last record to a tracked recorder task under the next
    /// deterministic id; `last` also releases the rest of the reservation.
    fn flush(&mut self, last: bool) {
        let bytes = self.sent - self.recorded;
        let held = self.admission.held;
        if bytes == 0 && !(last && held) {
            return;
        }
        let id = format!("pull:{}:{}", self.stream_id, self.seq);
        self.seq += 1;
        self.recorded = self.sent;
        let record = EgressRecord {
            id,
            project: self.admission.project.clone(),
            bytes,
            reservation: held.then(|| (self.admission.month.clone(), self.admission.id.clone())),
            last,
        };
        if last {
            // The recorder releases it now; the admission's own drop must not.
            self.admission.held = false;
            self.admission.outstanding = None;
        }
        let metering = self.admission.metering.clone();
        let counters = metering.counters.clone();
        counters.spawn(async move {
            if record.bytes == 0 {
                if let Some((month, id)) = &record.reservation {
                    metering
                        .release(&record.project, Pool::Egress(month), id, Release::All, 0)
                        .await;
                }
                return;
            }
            metering.record_egress(record).await;
        });
    }
}

impl EgressMeter {
    /// A long pull keeps its database reservation from lapsing (the counters refresh
    /// their own holders).
    fn keep_alive(&mut self) {
        let metering = &self.admission.metering;
        if !self.admission.held
            || !metering.database_coordinated()
            || self.refreshed.elapsed() < metering.counters.reservation_ttl() / 3
        {
            return;
        }
        self.refreshed = std::time::Instant::now();
        let (metering, id) = (metering.clone(), self.admission.id.clone());
        metering
            .counters
            .clone()
            .spawn(async move { metering.refresh_reservation(&id).await });
    }
}

impl Drop for EgressMeter {
    fn drop(&mut self) {
        self.flush(true);
    }
}

impl Stream for MeteredPull {
    type Item = Result<Bytes, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        {
            let mut meter = lock(&self.meter);
            if meter.closed {
                if meter.seq == u32::MAX {
                    return Poll::Ready(None);
                }
                meter.flush(true);
                meter.seq = u32::MAX;
                return Poll::Ready(Some(Err(Error::Unavailable {
                    what: "server",
                    cause: "shutting down".into(),
                })));
            }
        }
        let polled = self.inner.as_mut().poll_next(cx);
        match &polled {
            Poll::Ready(Some(Ok(chunk))) => {
                let mut meter = lock(&self.meter);
                meter.sent += chunk.len() as i64;
                if meter.sent - meter.recorded >= EGRESS_CHECKPOINT_BYTES {
                    meter.flush(false);
                }
                meter.keep_alive();
            }
            Poll::Ready(None) => lock(&self.meter).flush(true),
            _ => {}
        }
        polled
    }
}
