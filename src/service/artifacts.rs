//! Push, Pull, Stat, List, Delete, Keep, Unkeep and archives (zips of a folder, built as
//! they stream).
//!
//! Push follows the crash-safe order of DESIGN.md: the header is checked before any byte is
//! read; bytes stream into a temporary upload while pipeline stages hash and write them;
//! size and digest are verified; the upload is promoted to its content address; and only
//! then one transaction writes the artifact row. The database therefore never references a
//! missing blob, and a push that fails at any step leaves no visible artifact.
//!
//! A small push that declares its size (at most `ARTIFACTD_INLINE_BLOB_BYTES`) skips the
//! blob store: its content goes into the blob's database row in the same transaction as the
//! artifact row, so content and artifact become durable together in one commit.
//!
//! Content kept in the blob store is leased in the database before its bytes are checked or
//! written, and the commit requires the lease intact, so the sweeper can never delete bytes
//! a committing push relies on (see `store::sweep`).

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{BoxStream, Stream, StreamExt};

use crate::blob::{BlobStore, Promoted};
use crate::domain::retention::resolve_lifetime;
use crate::domain::{
    Artifact, ArtifactPath, Clock, Error, Hasher, Scope, ScopedPath, Sha256, Timestamp,
};
use crate::metrics::PushStorage;
use crate::service::archive::{ArchiveEntry, archive_size_bound, stream_archive};
use crate::service::metering::{Metering, Reservation};
use crate::service::retention::Retention;
use crate::store::{BlobLease, NewArtifact, PushCommit, PushedBlob, Store};

mod resumable;
pub use resumable::{CHECKPOINT_BYTES, UploadStatus};

/// Pushes declaring at most this many bytes are received into memory and stored in one
/// step (see `receive_small`); larger ones stream through a temporary upload.
pub const SMALL_PUSH_BYTES: i64 = 64 * 1024;
/// List page size when the client sends 0, and the largest it may ask for.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Times a small push stores its content again when the sweeper collected it between the
/// push's lease and its commit (only possible when a push outlasts the blob grace period).
const COLLECTED_RETRIES: u32 = 3;

/// Times a push reads its retention rules when they keep changing before its commit.
const RULES_READS: u32 = 3;

/// A push whose retention rules changed before each of its commit attempts.
fn rules_changed() -> Error {
    Error::Aborted(
        "the project's retention rules changed while this push committed; nothing was stored, \
         retry the push"
            .to_owned(),
    )
}

/// A validated Push header.
#[derive(Debug, Clone)]
pub struct PushSpec {
    pub target: ScopedPath,
    pub mode: u32,
    pub force: bool,
    pub expected_size: Option<i64>,
    pub expected_sha256: Option<Sha256>,
    /// Lifetime from creation, in microseconds.
    pub expire_in_micros: Option<i64>,
    pub idempotency_key: Option<String>,
    /// Set when the header names an upload id: a resumable push (see `resumable`).
    pub resume: Option<ResumeSpec>,
}

/// Where a resumable push goes: its upload, and the offset its first chunk is at.
#[derive(Debug, Clone)]
pub struct ResumeSpec {
    pub upload_id: crate::domain::UploadId,
    pub write_offset: i64,
}

#[derive(Debug, Clone)]
pub struct PushOutcome {
    pub artifact: Artifact,
    pub deduplicated: bool,
}

/// A validated Pull request.
#[derive(Debug, Clone)]
pub struct PullSpec {
    pub target: ScopedPath,
    pub offset: i64,
    /// 0 means to the end.
    pub length: i64,
}

pub struct PullStream {
    pub artifact: Artifact,
    pub chunks: BoxStream<'static, Result<Bytes, Error>>,
}

/// A validated archive request: every file live now under `prefix` in `scope`.
#[derive(Debug, Clone)]
pub struct ArchiveSpec {
    pub scope: Scope,
    /// A folder prefix ("" for the whole scope).
    pub prefix: String,
    /// Deflate the entries instead of storing them.
    pub deflate: bool,
}

/// A zip on its way out: what it holds, then its bytes.
pub struct ArchiveDownload {
    pub files: u64,
    /// Total size of the files (the zip adds headers, or deflate shrinks it).
    pub content_bytes: u64,
    pub chunks: BoxStream<'static, Result<Bytes, Error>>,
}

/// Where an artifact's bytes are.
enum Content {
    /// In its blob's database row.
    Inline(Bytes),
    /// In the blob store, at this location (`None`: the content address).
    Stored(Option<String>),
}

/// Artifacts read from the database per page while an archive is written.
const ARCHIVE_PAGE: u64 = 500;

pub struct ListPage {
    pub artifacts: Vec<Artifact>,
    /// The last path of this page when more may follow.
    pub next_after: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ArtifactService {
    store: Store,
    blobs: BlobStore,
    clock: Arc<dyn Clock>,
    metering: Metering,
    retention: Retention,
    max_artifact_bytes: i64,
    /// Declared pushes of at most this many bytes keep their content in the database.
    inline_blob_bytes: i64,
}

impl ArtifactService {
    pub fn new(
        store: Store,
        blobs: BlobStore,
        clock: Arc<dyn Clock>,
        metering: Metering,
        max_artifact_bytes: i64,
        inline_blob_bytes: i64,
    ) -> Self {
        Self {
            retention: Retention::new(store.clone(), metering.clone(), clock.clone()),
            store,
            blobs,
            clock,
            metering,
            max_artifact_bytes,
            inline_blob_bytes: inline_blob_bytes.min(SMALL_PUSH_BYTES),
        }
    }

    pub fn metering(&self) -> &Metering {
        &self.metering
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// Stores one file from `chunks`. Checks that need no bytes happen first, so a push that
    /// cannot succeed is refused before the client sends its content.
    pub async fn push<S>(&self, spec: PushSpec, chunks: S) -> Result<PushOutcome, Error>
    where
        S: Stream<Item = Result<Bytes, Error>> + Send + Unpin + 'static,
    {
        let project = spec.target.scope.project();
        if let Some(key) = &spec.idempotency_key
            && let Some((artifact, deduplicated)) =
                self.store.find_idempotent(&spec.target.scope, key).await?
        {
            return self.replayed(replay(&spec, artifact, deduplicated));
        }
        // A resumable push that already completed answers its artifact again, before the
        // checks below (its own artifact holds the path now).
        let resumable = match &spec.resume {
            Some(resume) => match self.begin_resumable(&spec, resume).await? {
                resumable::Begun::Completed(outcome) => return self.replayed(Ok(outcome)),
                resumable::Begun::Open(locked) => Some(*locked),
            },
            None => None,
        };
        let record = self.metering.project_for_push(project).await?;
        // The push's own expire_in (within the plan's maximum), else the first matching
        // retention rule, else the project's setting, else the plan's maximum: nothing
        // outlives its plan.
        let kind = spec.target.scope.kind();
        // A push that commits with a group has its rules checked by its commit, so it may
        // take them from the cache (see `service::retention`).
        let grouped = resumable.is_none()
            && !spec.force
            && spec.idempotency_key.is_none()
            && spec
                .expected_size
                .is_some_and(|size| size <= self.inline_blob_bytes)
            && self.store.commits_in_groups();
        let mut rules_stamp = None;
        let rule_age = match spec.expire_in_micros {
            Some(_) => None,
            None if grouped => {
                let (age, stamp) = self
                    .retention
                    .rule_age_stamped(project, kind, spec.target.path.as_str(), false)
                    .await?;
                rules_stamp = Some(stamp);
                age
            }
            None => {
                self.retention
                    .rule_age(project, kind, spec.target.path.as_str())
                    .await?
            }
        };
        let lifetime = resolve_lifetime(
            spec.expire_in_micros,
            rule_age,
            &record.controls,
            kind,
            &record.plan,
        )?;
        // A small push is refused by its commit as cheaply as by a lookup now; a large one
        // is checked before its bytes are read.
        let small = resumable.is_none()
            && spec
                .expected_size
                .is_some_and(|size| size <= SMALL_PUSH_BYTES);
        if !spec.force
            && !small
            && self
                .store
                .find_live(&spec.target.scope, &spec.target.path, self.clock.now())
                .await?
                .is_some()
        {
            return Err(crate::store::already_exists(
                &spec.target.scope,
                &spec.target.path,
            ));
        }
        let mut reservation = self
            .metering
            .admit_push(&record, self.max_artifact_bytes, spec.expected_size)
            .await?;

        // A resumable push's artifact carries its upload's internal id: the artifact row is
        // then the record that the upload completed.
        let upload_id = match &resumable {
            Some(locked) => locked.record.internal_id.clone(),
            None => uuid::Uuid::new_v4().simple().to_string(),
        };
        // The lock on a resumable upload's file, held until the commit is done.
        let mut _resumable_file = None;
        // A blob in the blob store is leased before its bytes are checked or written, so
        // the sweeper cannot collect it between that check and the commit unnoticed (see
        // `store::sweep`). Inline content travels in the commit itself.
        let is_resumable = resumable.is_some();
        let (size, sha256, mut blob, retry_with) = if let Some(locked) = resumable {
            let received = self
                .receive_resumable(&spec, locked, reservation, chunks)
                .await?;
            let resumable::Received {
                size,
                sha256,
                file,
                reservation: held,
            } = received;
            reservation = held;
            let lease = self
                .store
                .lease_blob_at(&sha256, size, self.clock.now())
                .await?;
            let promoted = self
                .blobs
                .promote(
                    file.to_temp(),
                    &sha256,
                    size as u64,
                    lease.location.as_deref(),
                )
                .await?;
            let deduplicated = self.claim(&sha256, &lease, promoted).await?;
            _resumable_file = Some(file);
            (
                size,
                sha256,
                PushedBlob::Stored {
                    deduplicated,
                    epoch: lease.epoch,
                },
                None,
            )
        } else if small {
            let (data, sha256) = self.receive_small(&spec, &mut reservation, chunks).await?;
            let size = data.len() as i64;
            if size <= self.inline_blob_bytes {
                (size, sha256, PushedBlob::Inline(data), None)
            } else {
                let blob = self.store_small(&upload_id, data.clone(), &sha256).await?;
                (size, sha256, blob, Some(data))
            }
        } else {
            let (size, sha256, temp) = self
                .receive(&spec, &upload_id, &mut reservation, chunks)
                .await?;
            let lease = self
                .store
                .lease_blob_at(&sha256, size, self.clock.now())
                .await?;
            let promoted = self
                .blobs
                .promote(temp, &sha256, size as u64, lease.location.as_deref())
                .await?;
            let deduplicated = self.claim(&sha256, &lease, promoted).await?;
            (
                size,
                sha256,
                PushedBlob::Stored {
                    deduplicated,
                    epoch: lease.epoch,
                },
                None,
            )
        };

        let created_at = self.clock.now();
        let mut new = NewArtifact {
            scope: spec.target.scope.clone(),
            path: spec.target.path.clone(),
            size,
            sha256,
            mode: spec.mode,
            created_at,
            expires_at: Some(created_at.saturating_add_micros(lifetime)),
            upload_id,
            record_ingress: self.metering.enabled(),
        };
        // Content collected between the lease and the commit: a small push still holds its
        // bytes and stores them again; a large one has handed its upload over and fails
        // with ABORTED (nothing stored), for the client to retry.
        let mut attempts = 1;
        let mut rule_reads = 1;
        let commit = loop {
            let committed = self
                .store
                .commit_push_stamped(
                    &new,
                    spec.force,
                    spec.idempotency_key.as_deref(),
                    &blob,
                    rules_stamp.as_ref(),
                )
                .await;
            let committed = match committed {
                // Another Push of this resumable upload committed it first (possible only
                // for one racing past the file lock, see `resumable`): answer its result.
                Err(Error::AlreadyExists(message)) if is_resumable => {
                    match self.store.artifact_of_upload(&new.upload_id).await? {
                        Some(artifact) => {
                            return self.replayed(Ok(PushOutcome {
                                artifact,
                                deduplicated: false,
                            }));
                        }
                        None => return Err(Error::AlreadyExists(message)),
                    }
                }
                other => other?,
            };
            match committed {
                PushCommit::ContentCollected => match &retry_with {
                    Some(data) if attempts < COLLECTED_RETRIES => {
                        attempts += 1;
                        blob = self
                            .store_small(&new.upload_id, data.clone(), &new.sha256)
                            .await?;
                    }
                    _ => return Err(crate::store::content_collected(&new.sha256)),
                },
                // The rules changed since they were read (or cached): the lifetime comes
                // from the rules stored now.
                PushCommit::RulesChanged if rule_reads < RULES_READS => {
                    rule_reads += 1;
                    let (age, stamp) = self
                        .retention
                        .rule_age_stamped(project, kind, new.path.as_str(), true)
                        .await?;
                    let lifetime =
                        resolve_lifetime(None, age, &record.controls, kind, &record.plan)?;
                    new.expires_at = Some(created_at.saturating_add_micros(lifetime));
                    rules_stamp = Some(stamp);
                }
                PushCommit::RulesChanged => return Err(rules_changed()),
                commit => break commit,
            }
        };
        match commit {
            PushCommit::Created {
                artifact,
                replaced,
                replaced_bytes,
                deduplicated,
            } => {
                reservation.settle(artifact.size, replaced_bytes).await;
                let metrics = self.store.metrics();
                let storage = match blob {
                    PushedBlob::Inline(_) => PushStorage::Inline,
                    PushedBlob::Stored { .. } => PushStorage::BlobStore,
                };
                metrics.push_committed(storage, deduplicated);
                if new.record_ingress {
                    metrics.usage_recorded("ingress", true);
                }
                tracing::info!(
                    project = %artifact.scope.project(),
                    scope = artifact.scope.kind().as_str(),
                    size = artifact.size,
                    deduplicated,
                    replaced,
                    "artifact pushed"
                );
                Ok(PushOutcome {
                    artifact,
                    deduplicated,
                })
            }
            PushCommit::Replayed {
                artifact,
                deduplicated,
            } => self.replayed(replay(&spec, artifact, deduplicated)),
            PushCommit::ContentCollected => Err(crate::store::content_collected(&new.sha256)),
            PushCommit::RulesChanged => Err(rules_changed()),
        }
    }

    /// A push answered from its idempotency key: its ingress record is not written again.
    fn replayed(&self, outcome: Result<PushOutcome, Error>) -> Result<PushOutcome, Error> {
        if outcome.is_ok() && self.metering.enabled() {
            self.store.metrics().usage_recorded("ingress", false);
        }
        outcome
    }

    /// Stores a small blob held in memory in the blob store under a fresh lease.
    async fn store_small(
        &self,
        upload_id: &str,
        data: Bytes,
        sha256: &Sha256,
    ) -> Result<PushedBlob, Error> {
        let lease = self
            .store
            .lease_blob_at(sha256, data.len() as i64, self.clock.now())
            .await?;
        let promoted = self
            .blobs
            .put_small(upload_id, data, sha256, lease.location.as_deref())
            .await?;
        let deduplicated = self.claim(sha256, &lease, promoted).await?;
        Ok(PushedBlob::Stored {
            deduplicated,
            epoch: lease.epoch,
        })
    }

    /// Makes stored content the blob's: an object of its own (object stores) is named as
    /// the blob's location, under the lock the sweeper's removal of unnamed objects takes
    /// (see `store::locations`). Returns whether the content was stored before this push.
    async fn claim(
        &self,
        sha256: &Sha256,
        lease: &BlobLease,
        promoted: Promoted,
    ) -> Result<bool, Error> {
        let object = match promoted {
            Promoted::Deduplicated => return Ok(true),
            Promoted::AtAddress => return Ok(false),
            Promoted::Unclaimed(object) => object,
        };
        let key = object.key();
        if !self
            .store
            .claim_location(sha256, lease.epoch, lease.location.as_deref(), &key)
            .await?
        {
            // Another push of this content named its own (complete) object first, or the
            // content was collected since the lease, which the commit reports. Either way
            // this object is not needed: dropping it deletes it.
            return Ok(true);
        }
        object.keep();
        // The sweeper removed it as unnamed just before the claim (only possible for an
        // upload older than ARTIFACTD_UPLOAD_MAX_AGE): nothing references it yet, and the
        // next push of this content finds it missing and stores its own.
        if !self.blobs.object_exists(&key).await? {
            return Err(Error::blob_store(format!(
                "pushed object {key} was removed before its blob named it"
            )));
        }
        Ok(false)
    }

    /// Receives a push of a declared small size into memory (bounded by that size) and
    /// hashes it in place: no upload thread, one blob write.
    async fn receive_small<S>(
        &self,
        spec: &PushSpec,
        reservation: &mut Reservation,
        mut chunks: S,
    ) -> Result<(Bytes, Sha256), Error>
    where
        S: Stream<Item = Result<Bytes, Error>> + Send + Unpin,
    {
        let expected = spec.expected_size.unwrap_or(0);
        let mut data = bytes::BytesMut::with_capacity(expected as usize);
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            let size = (data.len() + chunk.len()) as i64;
            reservation.received(size).await?;
            if size > expected {
                return Err(Error::invalid(
                    "header.expected_size",
                    format!("{expected} bytes expected, but more were sent"),
                ));
            }
            data.extend_from_slice(&chunk);
        }
        let data = data.freeze();
        let sha256 = Hasher::digest(&data);
        verify(spec, data.len() as i64, &sha256)?;
        Ok((data, sha256))
    }

    /// Streams the content into a temporary upload, which hashes it on a blocking task.
    /// Returns the size, the digest and the finished upload, verified against the header.
    async fn receive<S>(
        &self,
        spec: &PushSpec,
        upload_id: &str,
        reservation: &mut Reservation,
        mut chunks: S,
    ) -> Result<(i64, Sha256, crate::blob::TempBlob), Error>
    where
        S: Stream<Item = Result<Bytes, Error>> + Send + Unpin,
    {
        // The upload hashes and writes on stages of their own while this loop receives.
        let mut upload = self.blobs.begin_upload(upload_id).await?;

        let mut size: i64 = 0;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            size += chunk.len() as i64;
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
            upload.write(chunk).await?;
        }
        let (temp, sha256) = upload.finish().await?;

        verify(spec, size, &sha256)?;
        Ok((size, sha256, temp))
    }

    /// Metadata first, then the requested range in chunks.
    pub async fn pull(&self, spec: PullSpec) -> Result<PullStream, Error> {
        if spec.offset < 0 {
            return Err(Error::invalid("offset", "must not be negative"));
        }
        if spec.length < 0 {
            return Err(Error::invalid(
                "length",
                "must not be negative (0 means to the end)",
            ));
        }
        let artifact = self.stat(&spec.target.scope, &spec.target.path).await?;
        if spec.offset > artifact.size {
            return Err(Error::OutOfRange(format!(
                "offset {} is past the end of {:?} ({} bytes)",
                spec.offset,
                artifact.path.as_str(),
                artifact.size
            )));
        }
        let end = match spec.length {
            0 => artifact.size,
            length => spec.offset.saturating_add(length).min(artifact.size),
        };
        let record = self.metering.project(artifact.scope.project()).await?;
        let admission = self.metering.admit_pull(&record, end - spec.offset).await?;
        let range = spec.offset as u64..end as u64;
        let chunks = match self.content(&artifact).await? {
            Content::Inline(content) => {
                let part = content.slice(range.start as usize..range.end as usize);
                futures::stream::iter((!part.is_empty()).then_some(Ok(part))).boxed()
            }
            Content::Stored(location) => {
                self.blobs
                    .read(&artifact.sha256, location.as_deref(), range)
                    .await?
            }
        };
        let chunks = self.metering.meter_pull(admission, chunks);
        Ok(PullStream { artifact, chunks })
    }

    /// A zip of every file live now under a prefix, streamed as it is built; NOT_FOUND when
    /// there is none (as GitLab answers 404 for a job without artifacts). Egress is metered
    /// as the zip's bytes handed to the client, reserved up front at the zip's largest size.
    pub async fn archive(&self, spec: ArchiveSpec) -> Result<ArchiveDownload, Error> {
        let now = self.clock.now();
        let (files, content_bytes, path_bytes) = self
            .store
            .archive_summary(&spec.scope, &spec.prefix, now)
            .await?;
        if files == 0 {
            return Err(Error::NotFound(format!(
                "no artifact under {:?} in {}",
                spec.prefix, spec.scope
            )));
        }
        let record = self.metering.project(spec.scope.project()).await?;
        let bound = archive_size_bound(files, content_bytes, path_bytes, spec.deflate);
        let admission = self
            .metering
            .admit_pull(&record, i64::try_from(bound).unwrap_or(i64::MAX))
            .await?;
        let entries = self.archive_entries(spec.scope, spec.prefix, now);
        let chunks = stream_archive(entries, spec.deflate);
        Ok(ArchiveDownload {
            files,
            content_bytes,
            chunks: self.metering.meter_pull(admission, chunks),
        })
    }

    /// The entries of an archive, read a page at a time (files live at `now`, path order),
    /// each opened only when the archive reaches it.
    fn archive_entries(
        &self,
        scope: Scope,
        prefix: String,
        now: Timestamp,
    ) -> BoxStream<'static, Result<ArchiveEntry, Error>> {
        struct Pages {
            service: ArtifactService,
            scope: Scope,
            prefix: String,
            now: Timestamp,
            page: std::collections::VecDeque<Artifact>,
            after: Option<String>,
            done: bool,
        }
        let pages = Pages {
            service: self.clone(),
            scope,
            prefix,
            now,
            page: Default::default(),
            after: None,
            done: false,
        };
        futures::stream::unfold(pages, |mut p| async move {
            if p.page.is_empty() && !p.done {
                let fetched = p
                    .service
                    .store
                    .list_live(&p.scope, &p.prefix, p.after.as_deref(), ARCHIVE_PAGE, p.now)
                    .await;
                match fetched {
                    Ok(page) => {
                        p.done = (page.len() as u64) < ARCHIVE_PAGE;
                        p.after = page.last().map(|a| a.path.as_str().to_owned());
                        p.page = page.into();
                    }
                    Err(e) => {
                        p.done = true;
                        return Some((Err(e), p));
                    }
                }
            }
            let artifact = p.page.pop_front()?;
            let entry = p.service.archive_entry(artifact).await;
            if entry.is_err() {
                p.done = true;
                p.page.clear();
            }
            Some((entry, p))
        })
        .boxed()
    }

    async fn archive_entry(&self, artifact: Artifact) -> Result<ArchiveEntry, Error> {
        let content = match self.content(&artifact).await? {
            Content::Inline(content) => {
                futures::stream::iter((!content.is_empty()).then_some(Ok(content))).boxed()
            }
            Content::Stored(location) => {
                self.blobs
                    .read(
                        &artifact.sha256,
                        location.as_deref(),
                        0..artifact.size as u64,
                    )
                    .await?
            }
        };
        Ok(ArchiveEntry {
            path: artifact.path.as_str().to_owned(),
            mode: artifact.mode,
            modified: artifact.created_at,
            content,
        })
    }

    /// Where an artifact's content is: in its blob's database row, or in the blob store at
    /// the blob's location. Only artifacts small enough to have been inlined (under any
    /// setting), or kept in an object store (where blobs have locations), need the lookup;
    /// a large one in a local directory is at its content address.
    async fn content(&self, artifact: &Artifact) -> Result<Content, Error> {
        if artifact.size > SMALL_PUSH_BYTES && self.blobs.is_local() {
            return Ok(Content::Stored(None));
        }
        let (content, location) = self.store.blob_source(&artifact.sha256).await?;
        match content {
            Some(content) if content.len() as i64 != artifact.size => {
                Err(Error::DataLoss(format!(
                    "blob {} holds {} bytes in the database, its artifact {}",
                    artifact.sha256.as_str(),
                    content.len(),
                    artifact.size
                )))
            }
            Some(content) => Ok(Content::Inline(content)),
            None => Ok(Content::Stored(location)),
        }
    }

    pub async fn stat(&self, scope: &Scope, path: &ArtifactPath) -> Result<Artifact, Error> {
        self.store
            .find_live(scope, path, self.clock.now())
            .await?
            .ok_or_else(|| Error::NotFound(format!("no artifact {:?} in {scope}", path.as_str())))
    }

    /// One page of a listing; `after` is the previous page's last path.
    pub async fn list(
        &self,
        scope: &Scope,
        prefix: &str,
        after: Option<&str>,
        page_size: u32,
    ) -> Result<ListPage, Error> {
        let page_size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        // One extra row tells whether another page follows without a second query.
        let mut artifacts = self
            .store
            .list_live(
                scope,
                prefix,
                after,
                u64::from(page_size) + 1,
                self.clock.now(),
            )
            .await?;
        let next_after = if artifacts.len() > page_size as usize {
            artifacts.truncate(page_size as usize);
            artifacts.last().map(|a| a.path.as_str().to_owned())
        } else {
            None
        };
        Ok(ListPage {
            artifacts,
            next_after,
        })
    }

    /// Ends one artifact, or a folder's worth with `recursive`. NOT_FOUND when nothing ended.
    pub async fn delete(
        &self,
        scope: &Scope,
        path: &ArtifactPath,
        recursive: bool,
    ) -> Result<(i64, i64), Error> {
        let (count, bytes) = self
            .store
            .end_live(scope, Some(path), recursive, self.clock.now())
            .await?;
        if count == 0 {
            let hint = if recursive {
                ""
            } else {
                " (to delete a folder, set recursive)"
            };
            return Err(Error::NotFound(format!(
                "no artifact {:?} in {scope}{hint}",
                path.as_str()
            )));
        }
        self.metering.on_deleted(scope.project(), bytes).await;
        tracing::info!(project = %scope.project(), scope = scope.kind().as_str(), count, bytes, "artifacts deleted");
        Ok((count, bytes))
    }

    /// Pins (`keep`) or releases the artifacts live at `path`, and under it as a folder with
    /// `recursive`. Returns how many changed; NOT_FOUND when nothing live is there (an
    /// artifact that ended stays ended). Idempotent: keeping a kept artifact changes nothing.
    pub async fn set_keep(
        &self,
        scope: &Scope,
        path: &ArtifactPath,
        recursive: bool,
        keep: bool,
    ) -> Result<i64, Error> {
        let change = self
            .store
            .set_keep(scope, path, recursive, keep, self.clock.now())
            .await?;
        if !change.found {
            return Err(Error::NotFound(format!(
                "no live artifact {:?} in {scope}{}",
                path.as_str(),
                if recursive {
                    ""
                } else {
                    " (for a folder, set recursive)"
                }
            )));
        }
        if !keep && change.changed > 0 {
            // An unkept artifact past its expiry ends now: let the stored figure be rebuilt.
            self.metering.forget(scope.project()).await;
        }
        tracing::info!(
            project = %scope.project(),
            scope = scope.kind().as_str(),
            keep,
            changed = change.changed,
            "artifact pins changed"
        );
        Ok(change.changed)
    }

    /// Ends every live artifact of a scope (GitLab's DELETE of a job's artifacts); NOT_FOUND
    /// when it had none.
    pub async fn delete_scope(&self, scope: &Scope) -> Result<(i64, i64), Error> {
        let (count, bytes) = self
            .store
            .end_live(scope, None, true, self.clock.now())
            .await?;
        if count == 0 {
            return Err(Error::NotFound(format!("no artifact in {scope}")));
        }
        self.metering.on_deleted(scope.project(), bytes).await;
        tracing::info!(project = %scope.project(), scope = scope.kind().as_str(), count, bytes, "artifacts deleted");
        Ok((count, bytes))
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }
}

/// Checks what was received against the header's declared size and digest.
fn verify(spec: &PushSpec, size: i64, sha256: &Sha256) -> Result<(), Error> {
    if let Some(expected) = spec.expected_size
        && size != expected
    {
        return Err(Error::invalid(
            "header.expected_size",
            format!("{expected} bytes expected, {size} received; nothing was stored"),
        ));
    }
    if let Some(expected) = &spec.expected_sha256
        && expected != sha256
    {
        return Err(Error::invalid(
            "header.expected_sha256",
            format!("{expected} expected, content hashes to {sha256}; nothing was stored"),
        ));
    }
    Ok(())
}

/// A retried push returns the first result, provided it is the same push: same path (the
/// key is already scoped to the artifact's scope), and the size and digest it declares, if
/// any, are those of the recorded artifact.
fn replay(spec: &PushSpec, artifact: Artifact, deduplicated: bool) -> Result<PushOutcome, Error> {
    if artifact.scope != spec.target.scope || artifact.path != spec.target.path {
        return Err(Error::invalid(
            "header.idempotency_key",
            format!(
                "already used for {:?} in {}; use a new key for a different push",
                artifact.path.as_str(),
                artifact.scope
            ),
        ));
    }
    if let Some(expected) = spec.expected_size
        && expected != artifact.size
    {
        return Err(Error::invalid(
            "header.expected_size",
            format!(
                "{expected} bytes declared, but this idempotency key recorded a push of {} \
                 bytes; use a new key for a different push",
                artifact.size
            ),
        ));
    }
    if let Some(expected) = &spec.expected_sha256
        && *expected != artifact.sha256
    {
        return Err(Error::invalid(
            "header.expected_sha256",
            format!(
                "{expected} declared, but this idempotency key recorded content {}; use a new \
                 key for a different push",
                artifact.sha256
            ),
        ));
    }
    Ok(PushOutcome {
        artifact,
        deduplicated,
    })
}
