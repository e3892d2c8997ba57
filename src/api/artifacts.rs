//! `artifactd.v1.ArtifactService`.
//!
//! Streams are bounded here, at the edge: every Push, Pull and PullArchive takes a slot of
//! the server's [`StreamLimit`] (RESOURCE_EXHAUSTED beyond `ARTIFACTD_MAX_STREAMS`), a Push
//! that sends nothing for the idle timeout is aborted, and a Pull whose client reads nothing
//! for as long is abandoned (see [`super::streams::IdleStream`]).

use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use super::streams::{BoxedStream, StreamLimit};
use crate::auth::Authenticator;
use crate::domain::{Access, Error, JobLabel, ProjectId, UploadId, authorize, scope::parse_prefix};
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
    /// Slots for open streams (shared with the HTTP downloads) and the idle timeout: a Push
    /// that sends nothing for it is aborted (and its upload removed); a Pull whose client
    /// reads nothing for it is abandoned.
    streams: StreamLimit,
}

impl ArtifactApi {
    pub fn new(
        artifacts: service::ArtifactService,
        jobs: service::Jobs,
        auth: Authenticator,
        streams: StreamLimit,
    ) -> Self {
        Self {
            artifacts,
            jobs,
            auth,
            streams,
        }
    }
}

fn idle(timeout: Duration) -> Error {
    Error::DeadlineExceeded(format!(
        "no message for {}; the push was aborted and nothing was stored",
        humantime::format_duration(timeout)
    ))
}

type ResponseStream<T> = BoxedStream<T, Status>;
type PullResponseStream = ResponseStream<pb::PullResponse>;

#[tonic::async_trait]
impl artifact_service_server::ArtifactService for ArtifactApi {
    async fn push(
        &self,
        request: Request<Streaming<pb::PushRequest>>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        let principal = self.auth.authenticate_grpc(request.metadata())?;
        let _slot = self.streams.slot()?;
        let mut messages = request.into_inner();
        let idle_timeout = self.streams.idle_timeout();
        let first = tokio::time::timeout(idle_timeout, messages.message())
            .await
            .map_err(|_| idle(idle_timeout))?;
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

    async fn query_upload(
        &self,
        request: Request<pb::QueryUploadRequest>,
    ) -> Result<Response<pb::QueryUploadResponse>, Status> {
        let principal = self.auth.authenticate_grpc(request.metadata())?;
        let request = request.into_inner();
        let scope = convert::scope("scope", request.scope.as_ref())?;
        // Whoever may push to the scope may ask how its uploads stand.
        authorize(&principal, Access::WriteArtifacts(&scope))?;
        let upload_id = UploadId::parse("upload_id", &request.upload_id)?;
        let status = self.artifacts.query_upload(&scope, &upload_id).await?;
        Ok(Response::new(pb::QueryUploadResponse {
            committed_offset: status.committed_offset,
            complete: status.artifact.is_some(),
            artifact: status.artifact.as_ref().map(convert::artifact),
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
        let slot = self.streams.slot()?;
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
        Ok(Response::new(Box::pin(self.streams.watch(stream, slot))))
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
        let slot = self.streams.slot()?;
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
        Ok(Response::new(Box::pin(self.streams.watch(stream, slot))))
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
