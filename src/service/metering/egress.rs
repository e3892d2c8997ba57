//! Egress: a Pull's chunks are wrapped so the bytes handed to the client are recorded,
//! at every checkpoint and when the stream ends, however it ends.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use futures::stream::BoxStream;

use super::Metering;
use crate::domain::metering::{Meter, Month};
use crate::domain::plan::GIB;
use crate::domain::{Error, ProjectId};

/// Egress of a long Pull is recorded at least every this many bytes, so a crash loses at
/// most one checkpoint's worth.
pub const EGRESS_CHECKPOINT_BYTES: i64 = 64 * 1024 * 1024;

impl Metering {
    pub(super) async fn egress_to_date(&self, project: &ProjectId) -> Result<i64, Error> {
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

    pub(super) async fn record_egress(&self, project: ProjectId, id: String, bytes: i64) {
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
