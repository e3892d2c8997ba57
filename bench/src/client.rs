//! The gRPC client side every subcommand shares: connecting, one Push, one Pull.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use artifactd::pb::v1::artifact_service_client::ArtifactServiceClient;
use artifactd::pb::v1::{
    PullRequest, PushHeader, PushRequest, Scope, ScopeKind, pull_response, push_request,
};
use futures::stream::{self, StreamExt};
use tonic::transport::{Channel, Endpoint};

use crate::content::ChunkPool;
use crate::{JOB, MAX_MESSAGE_BYTES, PROJECT};

pub(crate) async fn connect(port: u16) -> anyhow::Result<Channel> {
    let url = format!("http://127.0.0.1:{port}");
    Endpoint::from_shared(url.clone())
        .with_context(|| format!("endpoint {url}"))?
        .tcp_nodelay(true)
        // As the `artifact` CLI does: whole chunks in one HTTP/2 frame when pulling.
        .max_frame_size(artifactd::server::HTTP2_CLIENT_MAX_FRAME_BYTES)
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

pub(crate) fn artifact_client(channel: Channel) -> ArtifactServiceClient<Channel> {
    ArtifactServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

pub(crate) fn bench_scope() -> Scope {
    Scope {
        project_id: PROJECT.into(),
        kind: ScopeKind::Job.into(),
        id: JOB.into(),
    }
}

pub(crate) fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE) / 1e6
}

/// One Push of upload `variant` to `path` (replacing what is there). Returns MB/s.
pub(crate) async fn artifact_push(
    client: &mut ArtifactServiceClient<Channel>,
    pool: &ChunkPool,
    variant: u64,
    total: u64,
    path: &str,
) -> anyhow::Result<f64> {
    Ok(push_artifact(client, pool, variant, total, path).await?.0)
}

/// [`artifact_push`], returning the stored blob's SHA-256 (hex) beside the MB/s.
pub(crate) async fn push_artifact(
    client: &mut ArtifactServiceClient<Channel>,
    pool: &ChunkPool,
    variant: u64,
    total: u64,
    path: &str,
) -> anyhow::Result<(f64, String)> {
    let header = PushHeader {
        scope: Some(bench_scope()),
        path: path.into(),
        force: true,
        expected_size: Some(i64::try_from(total).context("size")?),
        ..Default::default()
    };
    let messages = stream::once(async move {
        PushRequest {
            msg: Some(push_request::Msg::Header(header)),
        }
    })
    .chain(stream::iter(pool.upload(variant, total).map(|chunk| {
        PushRequest {
            msg: Some(push_request::Msg::Chunk(chunk)),
        }
    })));
    let started = Instant::now();
    let response = client.push(messages).await?.into_inner();
    let elapsed = started.elapsed();
    let (size, sha256) = response
        .artifact
        .map(|a| (a.size, a.sha256))
        .unwrap_or_default();
    ensure!(
        u64::try_from(size) == Ok(total),
        "artifactd stored {size} bytes, {total} were sent"
    );
    ensure!(
        !response.deduplicated,
        "the push was deduplicated, so it measured no blob write"
    );
    Ok((mb_per_s(total, elapsed), sha256))
}

/// Pulls `path` whole and checks its size. Returns MB/s.
pub(crate) async fn artifact_pull(
    client: &mut ArtifactServiceClient<Channel>,
    path: &str,
    total: u64,
) -> anyhow::Result<f64> {
    let times = artifact_pull_timed(client, path, total).await?;
    Ok(mb_per_s(total, times.whole))
}

/// How long a Pull took, whole and until its first content chunk arrived.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PullTimes {
    pub(crate) whole: Duration,
    pub(crate) first_chunk: Duration,
}

/// Pulls `path` whole and checks its size.
pub(crate) async fn artifact_pull_timed(
    client: &mut ArtifactServiceClient<Channel>,
    path: &str,
    total: u64,
) -> anyhow::Result<PullTimes> {
    let request = PullRequest {
        scope: Some(bench_scope()),
        path: path.into(),
        offset: 0,
        length: 0,
    };
    let started = Instant::now();
    let mut messages = client.pull(request).await?.into_inner();
    let first = messages
        .message()
        .await?
        .ok_or_else(|| anyhow!("Pull ended before sending the artifact"))?;
    let Some(pull_response::Msg::Artifact(artifact)) = first.msg else {
        bail!("the first Pull message was not the artifact");
    };
    let mut received: u64 = 0;
    let mut first_chunk = None;
    while let Some(message) = messages.message().await? {
        match message.msg {
            Some(pull_response::Msg::Chunk(chunk)) => {
                first_chunk.get_or_insert_with(|| started.elapsed());
                received += chunk.len() as u64;
            }
            _ => bail!("a Pull message after the first was not a chunk"),
        }
    }
    let whole = started.elapsed();
    ensure!(
        u64::try_from(artifact.size) == Ok(total) && received == total,
        "pulled {received} bytes of a {}-byte artifact, expected {total}",
        artifact.size
    );
    Ok(PullTimes {
        whole,
        first_chunk: first_chunk.unwrap_or(whole),
    })
}
