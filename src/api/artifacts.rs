//! `artifactd.v1.ArtifactService`.

use std::pin::Pin;

use bytes::Bytes;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use crate::auth::Authenticator;
use crate::domain::{Access, Error, authorize, scope::parse_prefix};
use crate::pb::v1::{self as pb, artifact_service_server, pull_response, push_request};
use crate::service::{self, PullSpec};

/// Largest chunk a Push message may carry. Pull sends at most this much too.
pub const MAX_CHUNK_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct ArtifactApi {
    artifacts: service::ArtifactService,
    auth: Authenticator,
    /// A Push that sends nothing for this long is aborted (and its upload removed).
    idle_timeout: Duration,
}

impl ArtifactApi {
    pub fn new(
        artifacts: service::ArtifactService,
        auth: Authenticator,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            artifacts,
            auth,
            idle_timeout,
        }
    }
}

fn idle(timeout: Duration) -> Error {
    Error::DeadlineExceeded(format!(
        "no message for {}; the push was aborted and nothing was stored",
        humantime::format_duration(timeout)
    ))
}

type PullResponseStream = Pin<Box<dyn Stream<Item = Result<pb::PullResponse, Status>> + Send>>;

#[tonic::async_trait]
impl artifact_service_server::ArtifactService for ArtifactApi {
    async fn push(
        &self,
        request: Request<Streaming<pb::PushRequest>>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        let principal = self.auth.authenticate_grpc(request.metadata())?;
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
        Ok(Response::new(Box::pin(head.chain(body))))
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
        // A folder may be named with a trailing slash ("dist/") when deleting recursively.
        let path = match request.path.strip_suffix('/') {
            Some(folder) if request.recursive => folder,
            _ => request.path.as_str(),
        };
        let target = convert::scoped_path("", request.scope.as_ref(), path)?;
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
