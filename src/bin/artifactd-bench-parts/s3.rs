//! `artifactd-bench s3`: Push and Pull of one large artifact through artifactd on an
//! S3-compatible server, against a direct `object_store` multipart PUT and streamed GET of the
//! same number of bytes to the same server, in one run (target: ≥ 0.8× both ways).
//!
//! The S3 server, its bucket and credentials come from the usual variables
//! (`AWS_ENDPOINT`, `AWS_ALLOW_HTTP=true`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`); the bucket must exist. With moto, for example:
//!
//! ```sh
//! moto_server -H 127.0.0.1 -p 5000 & curl -X PUT http://127.0.0.1:5000/bench
//! AWS_ENDPOINT=http://127.0.0.1:5000 AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
//!   AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x target/release/artifactd-bench s3 --bucket bench
//! ```
//!
//! artifactd runs as its own process (SQLite metadata in a scratch directory, blobs under a
//! fresh prefix of the bucket). Each round pushes distinct content (no deduplication), pulls
//! it back whole, then PUTs and GETs the same number of bytes directly; medians are reported.

use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, WriteMultipart};

use super::{
    ChunkPool, KIB, MAX_ARTIFACT_BYTES, MIB, ScratchDir, Server, artifact_client, artifact_pull,
    artifact_push, artifactd_exe, connect, mb_per_s, random_tag, runtime, warn_if_debug,
};

/// Part size of the direct multipart upload: the server's own (S3's minimum).
const PART_BYTES: usize = 5 * 1024 * 1024;
const TARGET: f64 = 0.8;

#[derive(Debug, Clone, Args)]
pub struct S3Args {
    /// Bucket on the S3 server (must exist).
    #[arg(long)]
    bucket: String,

    /// Bytes per transfer, in MiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=10240))]
    total_mib: u64,

    /// Rounds; the median of each figure is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
}

fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

pub fn s3(args: &S3Args) -> anyhow::Result<()> {
    warn_if_debug("s3");
    let total = args.total_mib * MIB;
    let prefix = format!("bench-{}", random_tag());
    let scratch = ScratchDir::create()?;
    let env = [
        (
            "DATABASE_URL",
            format!("sqlite://{}", scratch.path().join("artifactd.db").display()),
        ),
        (
            "ARTIFACTD_BLOB_URL",
            format!("s3://{}/{prefix}/artifactd", args.bucket),
        ),
        (
            "ARTIFACTD_MAX_ARTIFACT_BYTES",
            MAX_ARTIFACT_BYTES.to_string(),
        ),
        ("ARTIFACTD_DEFAULT_PLAN", "enterprise".to_owned()),
    ];
    let direct = AmazonS3Builder::from_env()
        .with_bucket_name(&args.bucket)
        .build()
        .context("the S3 server from AWS_* variables")?;
    let server = Server::start(&artifactd_exe()?, &env)?;
    let pool = ChunkPool::new(256 * KIB as usize);
    let runtime = runtime()?;
    let (mut push, mut pull, mut put, mut get) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    runtime.block_on(async {
        let mut client = artifact_client(connect(server.grpc_port).await?);
        for round in 1..=args.rounds {
            let path = format!("s3/round-{round}.bin");
            push.push(artifact_push(&mut client, &pool, 7_000 + u64::from(round), total, &path).await?);
            pull.push(artifact_pull(&mut client, &path, total).await?);

            let key = ObjectPath::from(format!("{prefix}/direct/round-{round}.bin"));
            let started = Instant::now();
            let mut upload = WriteMultipart::new_with_chunk_size(
                direct.put_multipart(&key).await?,
                PART_BYTES,
            );
            for chunk in pool.upload(9_000 + u64::from(round), total) {
                upload.wait_for_capacity(2).await?;
                upload.put(chunk);
            }
            upload.finish().await?;
            put.push(mb_per_s(total, started.elapsed()));

            let started = Instant::now();
            let mut stream = direct.get(&key).await?.into_stream();
            let mut received = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk: Bytes = chunk?;
                received += chunk.len() as u64;
            }
            anyhow::ensure!(received == total, "GET returned {received} of {total} bytes");
            get.push(mb_per_s(total, started.elapsed()));
            direct.delete(&key).await?;
            eprintln!(
                "round {round}/{}: Push {:.0} MB/s, Pull {:.0} MB/s; direct PUT {:.0} MB/s, GET {:.0} MB/s",
                args.rounds,
                push[push.len() - 1],
                pull[pull.len() - 1],
                put[put.len() - 1],
                get[get.len() - 1]
            );
        }
        anyhow::Ok(())
    })?;
    drop(runtime);
    server.stop();
    drop(scratch);
    let (push, pull, put, get) = (median(push), median(pull), median(put), median(get));
    let verdict = |ratio: f64| if ratio >= TARGET { "pass" } else { "FAIL" };
    println!(
        "S3, {} MiB, median of {}: Push {push:.0} MB/s vs direct PUT {put:.0} MB/s = {:.2}× \
         (target ≥ {TARGET}) {}; Pull {pull:.0} MB/s vs direct GET {get:.0} MB/s = {:.2}× {}",
        args.total_mib,
        args.rounds,
        push / put,
        verdict(push / put),
        pull / get,
        verdict(pull / get)
    );
    println!(
        "(artifactd's blobs are left under s3://{}/{prefix}/)",
        args.bucket
    );
    Ok(())
}
