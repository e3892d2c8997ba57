//! `artifactd.bench.v1.BareStream`: the transport alone, with no storage and no hashing
//! (the hidden `serve-bare` subcommand `throughput` starts).

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{Context, ensure};
use artifactd::pb::bench::bare_stream_client::BareStreamClient;
use artifactd::pb::bench::bare_stream_server::{BareStream, BareStreamServer};
use artifactd::pb::bench::{Chunk, SinkResult, SourceRequest};
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use tonic::transport::Channel;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use crate::client::mb_per_s;
use crate::content::{chunk_lengths, pseudo_random};
use crate::{MAX_CHUNK_KIB, MAX_MESSAGE_BYTES, runtime};

/// `artifactd.bench.v1.BareStream`: the transport alone, with no storage and no hashing.
#[derive(Debug, Default)]
struct Bare;

#[tonic::async_trait]
impl BareStream for Bare {
    async fn sink(
        &self,
        request: Request<Streaming<Chunk>>,
    ) -> Result<Response<SinkResult>, Status> {
        let mut chunks = request.into_inner();
        let mut bytes: i64 = 0;
        while let Some(chunk) = chunks.message().await? {
            bytes += chunk.data.len() as i64;
        }
        Ok(Response::new(SinkResult { bytes }))
    }

    type SourceStream = BoxStream<'static, Result<Chunk, Status>>;

    async fn source(
        &self,
        request: Request<SourceRequest>,
    ) -> Result<Response<Self::SourceStream>, Status> {
        let SourceRequest { bytes, chunk_size } = request.into_inner();
        let total = u64::try_from(bytes)
            .map_err(|_| Status::invalid_argument("bytes must not be negative"))?;
        let chunk_size = usize::try_from(chunk_size)
            .ok()
            .filter(|size| (1..=MAX_CHUNK_KIB * 1024).contains(size))
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "chunk_size must be between 1 and {} bytes",
                    MAX_CHUNK_KIB * 1024
                ))
            })?;
        // One allocation per request; every chunk is a reference-counted view of it.
        let data = Bytes::from(pseudo_random(chunk_size, 1));
        let chunks = chunk_lengths(total, chunk_size).map(move |len| {
            Ok(Chunk {
                data: data.slice(..len),
            })
        });
        Ok(Response::new(stream::iter(chunks).boxed()))
    }
}

pub(crate) fn serve_bare(listen: SocketAddr) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        // Stop when stdin closes (the parent benchmark went away) or on Ctrl-C.
        let (closed, stdin_closed) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("stdin-watch".into())
            .spawn(move || {
                let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
                let _ = closed.send(());
            })
            .context("watching stdin")?;
        let shutdown = async {
            tokio::select! {
                _ = stdin_closed => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        let service = BareStreamServer::new(Bare)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        // The same transport setup as artifactd's gRPC listener (src/server.rs).
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .max_frame_size(Some(artifactd::server::HTTP2_MAX_FRAME_BYTES))
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .context("serving the bare stream")
    })
}

/// A pull of `total` bytes from the bare stream server, in chunks of `chunk_size`. Returns MB/s.
pub(crate) async fn bare_pull(
    client: &mut BareStreamClient<Channel>,
    chunk_size: i32,
    total: u64,
) -> anyhow::Result<f64> {
    let request = SourceRequest {
        bytes: i64::try_from(total).context("size")?,
        chunk_size,
    };
    let started = Instant::now();
    let mut chunks = client.source(request).await?.into_inner();
    let mut received: u64 = 0;
    while let Some(chunk) = chunks.message().await? {
        received += chunk.data.len() as u64;
    }
    let elapsed = started.elapsed();
    ensure!(
        received == total,
        "received {received} bytes from the bare server, asked for {total}"
    );
    Ok(mb_per_s(total, elapsed))
}
