//! `artifactd.v1.ArtifactService`.
//!
//! Streams are bounded here, at the edge: at most `max_streams` Push and Pull streams are
//! open at once (RESOURCE_EXHAUSTED beyond), a Push that sends nothing for the idle timeout
//! is aborted, and a Pull whose client reads nothing for as long is abandoned (see
//! [`IdlePull`]).

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use crate::auth::Authenticator;
use crate::domain::{Access, Error, JobLabel, ProjectId, authorize, scope::parse_prefix};
use crate::metrics::Rejection;
use crate::pb::v1::{
    self as pb, artifact_service_server, pull_archive_request, pull_archive_response,
    pull_response, push_request,
};
use crate::service::{self, ArchiveSpec, PullSpec};

/// Largest chunk a Push message may carry. Pull sends at most this much too.
pub const MAX_CHUNK_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct ArtifactApi {
    artifacts: service::ArtifactService,
    jobs: service::Jobs,
    auth: Authenticator,
    /// A Push that sends nothing for this long is aborted (and its upload removed); a Pull
    /// whose client reads nothing for this long is abandoned.
    idle_timeout: Duration,
    /// One permit per open Push or Pull stream.
    streams: Arc<Semaphore>,
    max_streams: usize,
}

impl ArtifactApi {
    pub fn new(
        artifacts: service::ArtifactService,
        jobs: service::Jobs,
        auth: Authenticator,
        idle_timeout: Duration,
        max_streams: usize,
    ) -> Self {
        Self {
            artifacts,
            jobs,
            auth,
            idle_timeout,
            streams: Arc::new(Semaphore::new(max_streams)),
            max_streams,
        }
    }

    /// A slot for one more stream, or RESOURCE_EXHAUSTED when all are taken. Refusing at
    /// once (rather than queueing) keeps a flood of stalled streams from holding up others
    /// and tells well-behaved clients to back off.
    fn stream_slot(&self) -> Result<OwnedSemaphorePermit, Error> {
        self.streams.clone().try_acquire_owned().map_err(|_| {
            self.artifacts.store().metrics().rejected(
                Rejection::StreamLimit,
                Error::ResourceExhausted(format!(
                    "the server has its maximum of {} Push and Pull streams open \
                     (ARTIFACTD_MAX_STREAMS); retry later",
                    self.max_streams
                )),
            )
        })
    }
}

fn idle(timeout: Duration) -> Error {
    Error::DeadlineExceeded(format!(
        "no message for {}; the push was aborted and nothing was stored",
        humantime::format_duration(timeout)
    ))
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;
type PullResponseStream = ResponseStream<pb::PullResponse>;

#[tonic::async_trait]
impl artifact_service_server::ArtifactService for ArtifactApi {
    async fn push(
        &self,
        request: Request<Streaming<pb::PushRequest>>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        let principal = self.auth.authenticate_grpc(request.metadata())?;
        let _slot = self.stream_slot()?;
        let mut messages = request.into_inner();
        let first = tokio::time::timeout(self.idle_timeout, messages.message())
            .await
            .map_err(|_| idle(self.idle_timeout))?;
        let header = match first? {
            None => {
                return Err(Error::invalid(
                    "header",
                    "missing: the stream ended before a PushHeader was sent",
                )
                .into());
            }
            Some(pb::PushRequest {
                msg: Some(push_request::Msg::Header(header)),
            }) => header,
            Some(pb::PushRequest {
                msg: Some(push_request::Msg::Chunk(_)),
            }) => {
                return Err(Error::invalid(
                    "header",
                    "missing: the first message must be a PushHeader, not a chunk",
                )
                .into());
            }
            Some(pb::PushRequest { msg: None }) => {
                return Err(Error::invalid("msg", "empty message: set header or chunk").into());
            }
        };
        let spec = convert::push_spec(header)?;
        authorize(&principal, Access::WriteArtifacts(&spec.target.scope))?;
        let idle_timeout = self.idle_timeout;
        let chunks = tokio_stream::StreamExt::timeout(messages, idle_timeout).map(move |message| {
            match message {
                Err(_elapsed) => Err(idle(idle_timeout)),
                Ok(message) => push_chunk(message),
            }
        });
        let outcome = self.artifacts.push(spec, Box::pin(chunks)).await?;
        Ok(Response::new(pb::PushResponse {
            artifact: Some(convert::artifact(&outcome.artifact)),
            deduplicated: outcome.deduplicated,
        }))
    }

    type PullStream = PullResponseStream;

    async fn pull(
        &self,
        request: Request<pb::PullRequest>,
    ) -> Result<Response<Self::PullStream>, Status> {
        let principal = self.auth.authenticate_grpc(request.metadata())?;
        let request = request.into_inner();
        let spec = PullSpec {
            target: convert::scoped_path("", request.scope.as_ref(), &request.path)?,
            offset: request.offset,
            length: request.length,
        };
        authorize(&principal, Access::ReadArtifacts(&spec.target.scope))?;
        let slot = self.stream_slot()?;
        let pull = self.artifacts.pull(spec).await?;
        let head = futures::stream::once(futures::future::ready(Ok(pb::PullResponse {
            msg: Some(pull_response::Msg::Artifact(convert::artifact(
                &pull.artifact,
            ))),
        })));
        let body = pull.chunks.map(|chunk: Result<Bytes, Error>| {
            chunk
                .map(|chunk| pb::PullResponse {
                    msg: Some(pull_response::Msg::Chunk(chunk)),
                })
                .map_err(Status::from)
        });
        // Yielding once after the metadata lets the transport send it and come back for
        // content only when the client has room for it (HTTP/2 flow control): a client that
        // opens a Pull and reads nothing then costs no blob read and no buffered chunk.
        let stream: PullResponseStream = Box::pin(head.chain(yield_once()).chain(body));
        Ok(Response::new(Box::pin(IdlePull::new(
            stream,
            slot,
            self.idle_timeout,
        ))))
    }

    type PullArchiveStream = ResponseStream<pb::PullArchiveResponse>;

    async fn pull_archive(
        &self,
        request: Request<pb::PullArchiveRequest>,
    ) -> Result<Response<Self::PullArchiveStream>, Status> {
        let principal = self.auth.authenticate_grpc(request.metadata())?;
        let request = request.into_inner();
        let deflate = request.deflate;
        let spec = match request.source {
            Some(pull_archive_request::Source::Folder(folder)) => {
                let scope = convert::scope("folder.scope", folder.scope.as_ref())?;
                authorize(&principal, Access::ReadArtifacts(&scope))?;
                let prefix = parse_prefix("folder.prefix", &folder.prefix)?;
                ArchiveSpec {
                    scope,
                    prefix,
                    deflate,
                }
            }
            Some(pull_archive_request::Source::LatestJob(latest)) => {
                let project = ProjectId::parse("latest_job.project_id", &latest.project_id)?;
                authorize(&principal, Access::ReadLatestJobs(&project))?;
                let git_ref = JobLabel::parse("latest_job.ref", &latest.r#ref)?;
                let name = JobLabel::parse("latest_job.job_name", &latest.job_name)?;
                ArchiveSpec {
                    scope: self.jobs.latest_scope(&project, &git_ref, &name).await?,
                    prefix: String::new(),
                    deflate,
                }
            }
            None => {
                return Err(Error::invalid("source", "set folder or latest_job").into());
            }
        };
        let slot = self.stream_slot()?;
        let info = pb::ArchiveInfo {
            scope: Some(convert::scope_message(&spec.scope)),
            prefix: spec.prefix.clone(),
            files: 0,
            content_bytes: 0,
        };
        let archive = self.artifacts.archive(spec).await?;
        let info = pb::ArchiveInfo {
            files: i64::try_from(archive.files).unwrap_or(i64::MAX),
            content_bytes: i64::try_from(archive.content_bytes).unwrap_or(i64::MAX),
            ..info
        };
        let head = futures::stream::once(futures::future::ready(Ok(pb::PullArchiveResponse {
            msg: Some(pull_archive_response::Msg::Info(info)),
        })));
        let body = archive.chunks.map(|chunk| {
            chunk
                .map(|chunk| pb::PullArchiveResponse {
                    msg: Some(pull_archive_response::Msg::Chunk(chunk)),
                })
                .map_err(Status::from)
        });
        let stream: ResponseStream<pb::PullArchiveResponse> =
            Box::pin(head.chain(yield_once()).chain(body));
        Ok(Response::new(Box::pin(IdlePull::new(
            stream,
            slot,
            self.idle_timeout,
        ))))
    }

    async fn stat(
        &self,
        request: Request<pb::StatRequest>,
    ) -> Result<Response<pb::Artifact>, Status> {
        let principal = self.auth.authenticate_grpc(request.metadata())?;
        let request = request.into_inner();
        let target = convert::scoped_path("", request.scope.as_ref(), &request.path)?;
        authorize(&principal, Access::ReadArtifacts(&target.scope))?;
        let artifact = self.artifacts.stat(&target.scope, &target.path).await?;
        Ok(Response::new(convert::artifact(&artifact)))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let principal = self.auth.authenticate_grpc(request.metadata())?;
        let request = request.into_inner();
        let scope = convert::scope("scope", request.scope.as_ref())?;
        authorize(&principal, Access::ReadArtifacts(&scope))?;
        let prefix = parse_prefix("prefix", &request.prefix)?;
        let page_size = u32::try_from(request.page_size)
            .map_err(|_| Error::invalid("page_size", "must not be negative"))?;
        let after = convert::decode_page_token(&request.page_token, &prefix)?;
        let page = self
            .artifacts
            .list(&scope, &prefix, after.as_deref(), page_size)
            .await?;
        Ok(Response::new(pb::ListResponse {
            artifacts: page.artifacts.iter().map(convert::artifact).collect(),
            next_page_token: page
                .next_after
                .as_deref()
                .map(convert::encode_page_token)
                .unwrap_or_default(),
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let principal = self.auth.authenticate_grpc(request.metadata())?;
        let request = request.into_inner();
        let target = folder_target(request.scope.as_ref(), &request.path, request.recursive)?;
        authorize(&principal, Access::DeleteArtifacts(&target.scope))?;
        let (deleted_count, deleted_bytes) = self
            .artifacts
            .delete(&target.scope, &target.path, request.recursive)
            .await?;
        Ok(Response::new(pb::DeleteResponse {
            deleted_count,
            deleted_bytes,
        }))
    }

    async fn keep(
        &self,
        request: Request<pb::KeepRequest>,
    ) -> Result<Response<pb::KeepResponse>, Status> {
        let principal = self.auth.authenticate_grpc(request.metadata())?;
        let request = request.into_inner();
        let target = folder_target(request.scope.as_ref(), &request.path, request.recursive)?;
        authorize(&principal, Access::KeepArtifacts(&target.scope))?;
        let kept_count = self
            .artifacts
            .set_keep(&target.scope, &target.path, request.recursive, true)
            .await?;
        Ok(Response::new(pb::KeepResponse { kept_count }))
    }

    async fn unkeep(
        &self,
        request: Request<pb::UnkeepRequest>,
    ) -> Result<Response<pb::UnkeepResponse>, Status> {
        let principal = self.auth.authenticate_grpc(request.metadata())?;
        let request = request.into_inner();
        let target = folder_target(request.scope.as_ref(), &request.path, request.recursive)?;
        authorize(&principal, Access::KeepArtifacts(&target.scope))?;
        let unkept_count = self
            .artifacts
            .set_keep(&target.scope, &target.path, request.recursive, false)
            .await?;
        Ok(Response::new(pb::UnkeepResponse { unkept_count }))
    }
}

/// The target of a Delete, Keep or Unkeep: a folder may be named with a trailing slash
/// ("dist/") when `recursive`.
fn folder_target(
    scope: Option<&pb::Scope>,
    path: &str,
    recursive: bool,
) -> Result<crate::domain::ScopedPath, Error> {
    let path = match path.strip_suffix('/') {
        Some(folder) if recursive => folder,
        _ => path,
    };
    convert::scoped_path("", scope, path)
}

/// An empty stream that is pending once (waking itself at once) before it ends.
fn yield_once<T>() -> impl Stream<Item = T> {
    let mut yielded = false;
    futures::stream::poll_fn(move |cx| {
        if yielded {
            Poll::Ready(None)
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
}

/// One Push message after the header: a chunk, or an error naming what is wrong.
fn push_chunk(message: Result<pb::PushRequest, Status>) -> Result<Bytes, Error> {
    match message {
        Ok(pb::PushRequest {
            msg: Some(push_request::Msg::Chunk(chunk)),
        }) if chunk.len() > MAX_CHUNK_BYTES => Err(Error::invalid(
            "chunk",
            format!(
                "{} bytes is larger than the {MAX_CHUNK_BYTES}-byte chunk limit",
                chunk.len()
            ),
        )),
        Ok(pb::PushRequest {
            msg: Some(push_request::Msg::Chunk(chunk)),
        }) => Ok(chunk),
        Ok(pb::PushRequest {
            msg: Some(push_request::Msg::Header(_)),
        }) => Err(Error::invalid(
            "header",
            "sent twice: only the first message may be a PushHeader",
        )),
        Ok(pb::PushRequest { msg: None }) => {
            Err(Error::invalid("msg", "empty message: set header or chunk"))
        }
        Err(status) => Err(crate::error::from_client_stream(&status)),
    }
}

/// A Pull response stream that gives up on a client which reads nothing for `timeout`.
///
/// The transport asks for the next message only when the client has made room for it
/// (HTTP/2 flow control), so the time since a message was handed out without the next being
/// asked for is the time the client has not read. Past `timeout` a watchdog abandons the
/// stream: the blob reader (open file, read-ahead) and the stream slot are released at once,
/// and the next time the transport asks, the stream ends with DEADLINE_EXCEEDED. What stays
/// until the client reads again or its connection closes is the one message the transport
/// already holds for it.
struct IdlePull<T> {
    shared: Arc<Mutex<PullState<T>>>,
    /// Stops the watchdog when the stream ends or is dropped.
    _watchdog: DropGuard,
    timeout: Duration,
}

struct PullState<T> {
    /// `None` once finished or abandoned.
    inner: Option<ResponseStream<T>>,
    slot: Option<OwnedSemaphorePermit>,
    /// When the last message was handed out, while the next has not been asked for.
    handed_out: Option<Instant>,
    abandoned: bool,
}

impl<T> PullState<T> {
    fn idle_past(&self, timeout: Duration) -> bool {
        self.handed_out
            .is_some_and(|since| since.elapsed() >= timeout)
    }

    fn abandon(&mut self, timeout: Duration) {
        if self.inner.take().is_some() {
            tracing::info!(
                idle = %humantime::format_duration(timeout),
                "pull abandoned: the client read nothing"
            );
        }
        self.slot = None;
        self.handed_out = None;
        self.abandoned = true;
    }
}

fn lock<T>(state: &Mutex<PullState<T>>) -> MutexGuard<'_, PullState<T>> {
    // The state stays consistent under a panic elsewhere (every update is one assignment).
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<T: Send + 'static> IdlePull<T> {
    fn new(inner: ResponseStream<T>, slot: OwnedSemaphorePermit, timeout: Duration) -> Self {
        let shared = Arc::new(Mutex::new(PullState {
            inner: Some(inner),
            slot: Some(slot),
            handed_out: None,
            abandoned: false,
        }));
        let stop = CancellationToken::new();
        tokio::spawn(watchdog(Arc::downgrade(&shared), timeout, stop.clone()));
        Self {
            shared,
            _watchdog: stop.drop_guard(),
            timeout,
        }
    }
}

/// Abandons the stream once its client has read nothing for `timeout`. Holds only a weak
/// reference, so it never keeps a finished stream alive.
async fn watchdog<T>(state: Weak<Mutex<PullState<T>>>, timeout: Duration, stop: CancellationToken) {
    loop {
        let deadline = {
            let Some(state) = state.upgrade() else { return };
            let state = lock(&state);
            if state.inner.is_none() {
                return;
            }
            state.handed_out.unwrap_or_else(Instant::now) + timeout
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(deadline) => {}
        }
        let Some(state) = state.upgrade() else { return };
        let mut state = lock(&state);
        if state.idle_past(timeout) {
            state.abandon(timeout);
            return;
        }
    }
}

impl<T> Stream for IdlePull<T> {
    type Item = Result<T, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let timeout = self.timeout;
        let mut state = lock(&self.shared);
        if state.idle_past(timeout) {
            state.abandon(timeout);
        }
        if state.abandoned {
            state.abandoned = false; // report once, then end
            return Poll::Ready(Some(Err(Error::DeadlineExceeded(format!(
                "the client read nothing for {}; the pull was abandoned",
                humantime::format_duration(timeout)
            ))
            .into())));
        }
        state.handed_out = None;
        let Some(inner) = state.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let next = inner.poll_next_unpin(cx);
        match &next {
            Poll::Ready(Some(_)) => state.handed_out = Some(Instant::now()),
            Poll::Ready(None) => {
                state.inner = None;
                state.slot = None;
            }
            Poll::Pending => {}
        }
        next
    }
}
