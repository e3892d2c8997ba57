//! Resumable pushes, with the semantics of Google's ByteStream Write and QueryWriteStatus:
//! a Push whose header names an `upload_id` keeps what it received when its connection
//! drops, and a later Push with the same header and `write_offset` = the committed offset
//! continues from there.
//!
//! - The upload's header and committed offset are a row of `uploads` (so a restarted
//!   server, or another replica on the same database and blob directory, resumes it); its
//!   bytes are a file of the blob directory (see `blob::resumable`). The committed offset
//!   moves only after the bytes below it are synced (fsync with ARTIFACTD_BLOB_FSYNC on),
//!   every [`CHECKPOINT_BYTES`] and when the stream ends, cleanly or not: a dropped
//!   connection keeps every byte that arrived, a crash keeps those up to the last
//!   checkpoint.
//! - The SHA-256 state is rebuilt by hashing the durable prefix again on resume (see
//!   `blob::resumable` for why).
//! - One writer at a time: the file lock. A second Push resuming the same upload while one
//!   is writing is ABORTED at once; one that finds the upload completed answers its
//!   artifact, as an idempotent retry does.
//! - Billing: the artifact row and its ingress record are written by the ordinary commit,
//!   once, for the artifact's size; bytes resent after a cut are never counted twice, and
//!   an unfinished upload bills nothing. Each attempt holds its own storage reservation
//!   (covering the whole file), released when the attempt ends, so nothing leaks across a
//!   cut.

use bytes::Bytes;
use futures::stream::{Stream, StreamExt};

use super::{ArtifactService, PushOutcome, PushSpec, ResumeSpec, verify};
use crate::blob::{Opened, ResumableFile, ResumableWriter};
use crate::domain::{Artifact, Error, Scope, Sha256, UploadId};
use crate::service::metering::Reservation;
use crate::store::UploadRecord;

/// Bytes received between two checkpoints (sync, then the committed offset recorded).
pub const CHECKPOINT_BYTES: u64 = 8 * 1024 * 1024;

/// Where a resumable upload stands (QueryUpload).
#[derive(Debug, Clone)]
pub struct UploadStatus {
    /// Bytes held durably; the artifact's size once complete.
    pub committed_offset: i64,
    /// The artifact the upload stored, once it completed.
    pub artifact: Option<Artifact>,
}

pub(super) enum Begun {
    /// The upload already completed: its artifact.
    Completed(PushOutcome),
    /// The upload to write to, locked, with its committed offset checked.
    Open(Box<LockedUpload>),
}

/// An upload this Push holds the lock of, at its committed offset.
pub(super) struct LockedUpload {
    pub record: UploadRecord,
    file: ResumableFile,
    committed: i64,
}

/// Every byte of a resumable upload is in, synced and verified; `file` holds the lock
/// until the commit.
pub(super) struct Received {
    pub size: i64,
    pub sha256: Sha256,
    pub file: ResumableFile,
    pub reservation: Reservation,
}

fn not_resumable_here() -> Error {
    Error::FailedPrecondition(
        "header.upload_id: resumable pushes need a local blob directory, and this server keeps \
         blobs in an object store (ARTIFACTD_BLOB_URL); push without upload_id"
            .to_owned(),
    )
}

fn busy(upload_id: &UploadId) -> Error {
    Error::Aborted(format!(
        "upload {:?} is being written by another Push; ask QueryUpload where it stands once \
         that Push ends, then resume from there",
        upload_id.as_str()
    ))
}

fn completed(artifact: Artifact) -> PushOutcome {
    PushOutcome {
        artifact,
        // Not recorded per upload: this answer wrote no blob either way.
        deduplicated: false,
    }
}

impl ArtifactService {
    /// Where upload `upload_id` of `scope` stands: NOT_FOUND when the scope has none.
    pub async fn query_upload(
        &self,
        scope: &Scope,
        upload_id: &UploadId,
    ) -> Result<UploadStatus, Error> {
        if !self.blobs.supports_resumable() {
            return Err(not_resumable_here());
        }
        let upload = self
            .store
            .find_upload(scope, upload_id)
            .await?
            .ok_or_else(|| no_upload(scope, upload_id))?;
        if let Some(artifact) = self.store.artifact_of_upload(&upload.internal_id).await? {
            return Ok(UploadStatus {
                committed_offset: artifact.size,
                artifact: Some(artifact),
            });
        }
        // Bytes a crash took (fsync off) are not there to resume from.
        let on_disk = self.blobs.resumable_len(&upload.internal_id).await?;
        Ok(UploadStatus {
            committed_offset: upload
                .committed_offset
                .min(i64::try_from(on_disk).unwrap_or(i64::MAX)),
            artifact: None,
        })
    }

    /// Finds (or, at offset 0, records) the upload a resumable push names, and checks that
    /// the header repeats the first Push's.
    pub(super) async fn begin_resumable(
        &self,
        spec: &PushSpec,
        resume: &ResumeSpec,
    ) -> Result<Begun, Error> {
        if !self.blobs.supports_resumable() {
            return Err(not_resumable_here());
        }
        let scope = &spec.target.scope;
        let upload = match self.store.find_upload(scope, &resume.upload_id).await? {
            Some(upload) => upload,
            None if resume.write_offset != 0 => {
                return Err(Error::NotFound(format!(
                    "{}; to start it, push with write_offset 0",
                    no_upload(scope, &resume.upload_id)
                )));
            }
            None => {
                let now = self.clock.now();
                let new = UploadRecord {
                    scope: scope.clone(),
                    upload_id: resume.upload_id.clone(),
                    internal_id: uuid::Uuid::new_v4().simple().to_string(),
                    path: spec.target.path.clone(),
                    mode: spec.mode,
                    force: spec.force,
                    expected_size: spec.expected_size,
                    expected_sha256: spec.expected_sha256.clone(),
                    expire_in_micros: spec.expire_in_micros,
                    idempotency_key: spec.idempotency_key.clone(),
                    committed_offset: 0,
                    created_at: now,
                    updated_at: now,
                };
                if self.store.insert_upload(&new).await? {
                    tracing::info!(
                        project = %scope.project(),
                        scope = scope.kind().as_str(),
                        "resumable upload started"
                    );
                    new
                } else {
                    // A concurrent first Push of the same id recorded it first.
                    self.store
                        .find_upload(scope, &resume.upload_id)
                        .await?
                        .ok_or_else(|| busy(&resume.upload_id))?
                }
            }
        };
        same_header(spec, &upload)?;
        if let Some(artifact) = self.store.artifact_of_upload(&upload.internal_id).await? {
            return Ok(Begun::Completed(completed(artifact)));
        }
        // Locked before admission: a Push racing one still writing is ABORTED here, and the
        // writer it waits for has released its reservation before its lock.
        self.lock_upload(spec, upload).await
    }

    /// Locks the upload's file and checks `write_offset` against the committed offset.
    async fn lock_upload(&self, spec: &PushSpec, upload: UploadRecord) -> Result<Begun, Error> {
        let write_offset = spec.resume.as_ref().map_or(0, |r| r.write_offset);
        let id = upload.internal_id.clone();
        let file = match self
            .blobs
            .open_resumable(&id, upload.committed_offset == 0)
            .await?
        {
            Opened::Locked(file) => file,
            Opened::Busy => return Err(busy(&upload.upload_id)),
            Opened::Missing => {
                // Promoted to a blob by a Push that completed it meanwhile, or lost.
                if let Some(artifact) = self.store.artifact_of_upload(&id).await? {
                    return Ok(Begun::Completed(completed(artifact)));
                }
                tracing::warn!(
                    committed = upload.committed_offset,
                    "resumable upload's bytes are missing; it starts again from 0"
                );
                self.store
                    .checkpoint_upload(&id, 0, self.clock.now())
                    .await?;
                match self.blobs.open_resumable(&id, true).await? {
                    Opened::Locked(file) => file,
                    Opened::Busy | Opened::Missing => return Err(busy(&upload.upload_id)),
                }
            }
        };
        // Under the lock: where the upload stands now.
        let Some(current) = self
            .store
            .find_upload(&upload.scope, &upload.upload_id)
            .await?
        else {
            return Err(no_upload(&upload.scope, &upload.upload_id));
        };
        if let Some(artifact) = self.store.artifact_of_upload(&id).await? {
            return Ok(Begun::Completed(completed(artifact)));
        }
        let on_disk = i64::try_from(file.stored_len().await?).unwrap_or(i64::MAX);
        let mut committed = current.committed_offset;
        if on_disk < committed {
            // Synced bytes cannot go missing; unsynced ones (fsync off) can in a power cut.
            tracing::warn!(
                committed,
                on_disk,
                "resumable upload holds fewer bytes than committed; resuming from what it holds"
            );
            committed = on_disk;
            self.store
                .checkpoint_upload(&id, committed, self.clock.now())
                .await?;
        }
        if write_offset != committed {
            return Err(Error::FailedPrecondition(format!(
                "header.write_offset is {write_offset}, but upload {:?} has {committed} bytes \
                 committed: push again with write_offset {committed} and the content from \
                 byte {committed} on",
                upload.upload_id.as_str()
            )));
        }
        Ok(Begun::Open(Box::new(LockedUpload {
            record: current,
            file,
            committed,
        })))
    }

    /// Receives the rest of the content into a locked upload. The receiving runs on a task
    /// of its own (on the tracker shutdown drains), so the final checkpoint is taken even
    /// when the request is dropped with its connection; the lock is held until then, so a
    /// resume cannot start before it.
    pub(super) async fn receive_resumable<S>(
        &self,
        spec: &PushSpec,
        upload: LockedUpload,
        mut reservation: Reservation,
        chunks: S,
    ) -> Result<Received, Error>
    where
        S: Stream<Item = Result<Bytes, Error>> + Send + Unpin + 'static,
    {
        let LockedUpload {
            record,
            file,
            committed,
        } = upload;
        let id = record.internal_id;
        let writer = file.resume_at(committed as u64).await?;
        reservation.received(committed).await?;

        let (sender, result) = tokio::sync::oneshot::channel();
        let service = self.clone();
        let spec = spec.clone();
        self.metering.spawn_tracked(async move {
            let received = service
                .receive_into(&spec, &id, file, writer, reservation, chunks)
                .await;
            let _ = sender.send(received);
        });
        result
            .await
            .map_err(|_| Error::Internal("resumable receive task ended without a result".into()))?
    }

    /// Appends the stream to the upload, checkpointing as it goes and when it ends.
    async fn receive_into<S>(
        &self,
        spec: &PushSpec,
        id: &str,
        file: ResumableFile,
        mut writer: ResumableWriter,
        mut reservation: Reservation,
        mut chunks: S,
    ) -> Result<Received, Error>
    where
        S: Stream<Item = Result<Bytes, Error>> + Send + Unpin,
    {
        // A checkpoint's fsync and database write run while the next bytes arrive (waiting
        // for them stalled the stream every few MiB); one at a time, so the committed offset
        // only moves forward, and each starts once the previous one is done.
        let mut checkpointed = writer.written();
        let mut in_flight: Option<tokio::task::JoinHandle<Result<u64, Error>>> = None;
        let streamed: Result<(), Error> = async {
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk?;
                let size = (writer.written() + chunk.len() as u64) as i64;
                reservation.received(size).await?;
                if let Some(expected) = spec.expected_size
                    && size > expected
                {
                    return Err(Error::invalid(
                        "header.expected_size",
                        format!("{expected} bytes expected, but more were sent"),
                    ));
                }
                if chunk.is_empty() {
                    continue;
                }
                writer.write(chunk).await?;
                if writer.written() - checkpointed >= CHECKPOINT_BYTES
                    && in_flight
                        .as_ref()
                        .is_none_or(tokio::task::JoinHandle::is_finished)
                {
                    if let Some(previous) = in_flight.take() {
                        joined(previous).await?;
                    }
                    in_flight = Some(self.checkpoint_later(id, &mut writer).await?);
                    checkpointed = writer.written();
                }
            }
            Ok(())
        }
        .await;
        // Before any later checkpoint: an earlier one finishing after it would move the
        // committed offset back.
        let earlier = match in_flight.take() {
            Some(previous) => joined(previous).await.map(drop),
            None => Ok(()),
        };
        let streamed = streamed.and(earlier);
        if let Err(err) = streamed {
            // Keep what arrived: the client resumes from there.
            match self.checkpoint(id, &mut writer).await {
                Ok(durable) => tracing::info!(
                    committed = durable,
                    error = %err,
                    "resumable upload interrupted"
                ),
                Err(e) => tracing::warn!(error = %e, "resumable upload: last checkpoint failed"),
            }
            // Before the lock goes: a resume must find this attempt's quota free.
            reservation.release().await;
            return Err(err);
        }
        let size = writer.written() as i64;
        if let Some(expected) = spec.expected_size
            && size < expected
        {
            // Ended early: a partial write, kept for a later Push to continue.
            let durable = self.checkpoint(id, &mut writer).await?;
            reservation.release().await;
            return Err(Error::invalid(
                "header.expected_size",
                format!(
                    "{expected} bytes expected, the stream ended at {size}; the upload keeps                      them: push the rest with write_offset {durable}"
                ),
            ));
        }
        let sha256 = writer.finish().await?;
        self.store
            .checkpoint_upload(id, size, self.clock.now())
            .await?;
        if let Err(err) = verify(spec, size, &sha256) {
            // Whole but not what the header promised: the upload starts again from 0.
            file.resume_at(0).await?;
            self.store
                .checkpoint_upload(id, 0, self.clock.now())
                .await?;
            return Err(err);
        }
        Ok(Received {
            size,
            sha256,
            file,
            reservation,
        })
    }

    /// Starts a checkpoint of what was written so far: its sync and the record of the
    /// committed offset go on on a task of their own.
    async fn checkpoint_later(
        &self,
        id: &str,
        writer: &mut ResumableWriter,
    ) -> Result<tokio::task::JoinHandle<Result<u64, Error>>, Error> {
        let sync = writer.sync_later().await?;
        let (store, clock, id) = (self.store.clone(), self.clock.clone(), id.to_owned());
        Ok(tokio::spawn(async move {
            let durable = sync.await?;
            store
                .checkpoint_upload(&id, durable as i64, clock.now())
                .await?;
            Ok(durable)
        }))
    }

    /// Makes what was written durable and records it as committed.
    async fn checkpoint(&self, id: &str, writer: &mut ResumableWriter) -> Result<u64, Error> {
        let durable = writer.sync().await?;
        self.store
            .checkpoint_upload(id, durable as i64, self.clock.now())
            .await?;
        Ok(durable)
    }
}

/// The outcome of a checkpoint started with `checkpoint_later`.
async fn joined(checkpoint: tokio::task::JoinHandle<Result<u64, Error>>) -> Result<u64, Error> {
    checkpoint
        .await
        .map_err(|e| Error::Internal(format!("a resumable upload's checkpoint failed: {e}")))?
}

fn no_upload(scope: &Scope, upload_id: &UploadId) -> Error {
    Error::NotFound(format!(
        "no upload {:?} in {scope} (never started, or collected after \
         ARTIFACTD_RESUMABLE_UPLOAD_MAX_AGE without progress)",
        upload_id.as_str()
    ))
}

/// A resumed Push must repeat the first Push's header: INVALID_ARGUMENT naming the first
/// field that differs.
fn same_header(spec: &PushSpec, first: &UploadRecord) -> Result<(), Error> {
    fn shown<T: std::fmt::Display>(value: Option<T>) -> String {
        value.map_or_else(|| "unset".to_owned(), |v| format!("{v}"))
    }
    let differences = [
        (
            "path",
            format!("{:?}", spec.target.path.as_str()),
            format!("{:?}", first.path.as_str()),
        ),
        (
            "mode",
            format!("{:o}", spec.mode),
            format!("{:o}", first.mode),
        ),
        ("force", spec.force.to_string(), first.force.to_string()),
        (
            "expected_size",
            shown(spec.expected_size),
            shown(first.expected_size),
        ),
        (
            "expected_sha256",
            shown(spec.expected_sha256.as_ref()),
            shown(first.expected_sha256.as_ref()),
        ),
        (
            "expire_in",
            shown(spec.expire_in_micros.map(|us| format!("{us}µs"))),
            shown(first.expire_in_micros.map(|us| format!("{us}µs"))),
        ),
        (
            "idempotency_key",
            shown(spec.idempotency_key.as_ref().map(|k| format!("{k:?}"))),
            shown(first.idempotency_key.as_ref().map(|k| format!("{k:?}"))),
        ),
    ];
    for (field, now, was) in differences {
        if now != was {
            return Err(Error::invalid(
                format!("header.{field}"),
                format!(
                    "{now} differs from the first Push of upload {:?} ({was}); a resumed \
                     Push repeats the first header (or starts a new upload_id)",
                    first.upload_id.as_str()
                ),
            ));
        }
    }
    Ok(())
}
