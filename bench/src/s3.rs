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
//!
//! A Pull cannot send a byte before the S3 server sends its first one, and then cannot move
//! the bytes faster than a gRPC stream alone does on this machine. Each round also pulls the
//! same number of bytes from a bare gRPC stream (this binary's `serve-bare`, no storage, no
//! S3), so the run prints that ceiling of the Pull ratio: the GET's time over its first byte's
//! wait plus the bare stream's time. Some S3 servers (moto) read an object's whole value
//! before they answer, so their first byte is most of a GET's time.

use std::time::Instant;

use anyhow::Context;
use artifactd::pb::bench::bare_stream_client::BareStreamClient;
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, WriteMultipart};

use crate::bare::bare_pull;
use crate::client::{
    PullTimes, artifact_client, artifact_pull_timed, artifact_push, connect, mb_per_s,
};
use crate::content::ChunkPool;
use crate::measure::cpu_seconds;
use crate::process::{Server, artifactd_exe, free_port, spawn_bare, wait_ready_tcp};
use crate::scratch::{ScratchDir, random_tag};
use crate::{KIB, MAX_ARTIFACT_BYTES, MAX_MESSAGE_BYTES, MIB, runtime, warn_if_debug};

/// Part size of the direct multipart upload: the server's own (S3's minimum).
const PART_BYTES: usize = 5 * 1024 * 1024;
/// Chunk size of the bare stream: what artifactd sends from an S3 body at most.
const BARE_CHUNK_BYTES: i32 = 256 * 1024;
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

/// CPU seconds of the three processes a transfer runs through: the S3 server, artifactd
/// (zero for a direct transfer, which does not go through it) and this process (the client).
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    s3_server: f64,
    artifactd: f64,
    client: f64,
}

impl Cpu {
    fn now(s3_server: Option<u32>, artifactd: u32) -> Self {
        Self {
            s3_server: s3_server.map_or(0.0, cpu_seconds),
            artifactd: cpu_seconds(artifactd),
            client: cpu_seconds(std::process::id()),
        }
    }

    fn since(self, before: Self) -> Self {
        Self {
            s3_server: self.s3_server - before.s3_server,
            artifactd: self.artifactd - before.artifactd,
            client: self.client - before.client,
        }
    }

    fn total(self) -> f64 {
        self.s3_server + self.artifactd + self.client
    }

    /// Core-seconds per GiB moved, by process.
    fn describe(self, gib: f64) -> String {
        format!(
            "S3 server {:.2} + artifactd {:.2} + client {:.2} = {:.2} core-s/GiB",
            self.s3_server / gib,
            self.artifactd / gib,
            self.client / gib,
            self.total() / gib
        )
    }
}

/// The process listening on 127.0.0.1/0.0.0.0 `port` (the S3 server), found through the
/// socket inodes of `/proc/net/tcp*` and `/proc/*/fd`; `None` if it cannot be seen (another
/// user's process, another machine).
fn listener_pid(port: u16) -> Option<u32> {
    let inodes: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let local_port = fields.get(1)?.rsplit_once(':')?.1;
                    let listening = *fields.get(3)? == "0A";
                    let inode = fields.get(9)?;
                    (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                        .then(|| format!("socket:[{inode}]"))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    if inodes.is_empty() {
        return None;
    }
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let fds = std::fs::read_dir(entry.path().join("fd")).ok()?;
            fds.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .any(|target| {
                    inodes
                        .iter()
                        .any(|inode| target.as_os_str() == inode.as_str())
                })
                .then_some(pid)
        })
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
    let artifactd_pid = server.pid();
    let bare_port = free_port()?;
    let mut bare_server = spawn_bare(bare_port)?;
    wait_ready_tcp(&mut bare_server, bare_port)?;
    let s3_server_pid = std::env::var("AWS_ENDPOINT")
        .ok()
        .and_then(|endpoint| {
            endpoint
                .rsplit(':')
                .next()?
                .trim_end_matches('/')
                .parse()
                .ok()
        })
        .and_then(listener_pid);
    let (mut pull_cpu, mut get_cpu) = (Cpu::default(), Cpu::default());
    let pool = ChunkPool::new(256 * KIB as usize);
    let runtime = runtime()?;
    let (mut push, mut pull, mut put, mut get) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // Per round: seconds to the Pull's first chunk and to the GET's first byte, MB/s after
    // them, the bare stream's MB/s, and the ceiling of Pull/GET they give.
    let (mut pull_first, mut get_first) = (Vec::new(), Vec::new());
    let (mut pull_after, mut get_after) = (Vec::new(), Vec::new());
    let (mut bare, mut ceiling) = (Vec::new(), Vec::new());
    runtime.block_on(async {
        let mut client = artifact_client(connect(server.grpc_port).await?);
        let mut bare_client = BareStreamClient::new(connect(bare_port).await?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        for round in 1..=args.rounds {
            let path = format!("s3/round-{round}.bin");
            push.push(
                artifact_push(&mut client, &pool, 7_000 + u64::from(round), total, &path).await?,
            );
            let before = Cpu::now(s3_server_pid, artifactd_pid);
            let PullTimes { whole, first_chunk } =
                artifact_pull_timed(&mut client, &path, total).await?;
            pull.push(mb_per_s(total, whole));
            pull_first.push(first_chunk.as_secs_f64());
            pull_after.push(mb_per_s(total, whole - first_chunk));
            let used = Cpu::now(s3_server_pid, artifactd_pid).since(before);
            pull_cpu = Cpu {
                s3_server: pull_cpu.s3_server + used.s3_server,
                artifactd: pull_cpu.artifactd + used.artifactd,
                client: pull_cpu.client + used.client,
            };

            let key = ObjectPath::from(format!("{prefix}/direct/round-{round}.bin"));
            let started = Instant::now();
            let mut upload =
                WriteMultipart::new_with_chunk_size(direct.put_multipart(&key).await?, PART_BYTES);
            for chunk in pool.upload(9_000 + u64::from(round), total) {
                upload.wait_for_capacity(2).await?;
                upload.put(chunk);
            }
            upload.finish().await?;
            put.push(mb_per_s(total, started.elapsed()));

            let before = Cpu::now(s3_server_pid, artifactd_pid);
            let started = Instant::now();
            let mut stream = direct.get(&key).await?.into_stream();
            let mut received = 0u64;
            let mut first_byte = None;
            while let Some(chunk) = stream.next().await {
                let chunk: Bytes = chunk?;
                first_byte.get_or_insert_with(|| started.elapsed());
                received += chunk.len() as u64;
            }
            let whole = started.elapsed();
            anyhow::ensure!(
                received == total,
                "GET returned {received} of {total} bytes"
            );
            let first_byte = first_byte.unwrap_or(whole);
            get.push(mb_per_s(total, whole));
            get_first.push(first_byte.as_secs_f64());
            get_after.push(mb_per_s(total, whole - first_byte));
            let used = Cpu::now(s3_server_pid, artifactd_pid).since(before);
            get_cpu = Cpu {
                s3_server: get_cpu.s3_server + used.s3_server,
                artifactd: 0.0,
                client: get_cpu.client + used.client,
            };
            direct.delete(&key).await?;

            // The gRPC stream alone, while the S3 server and artifactd are idle.
            let bare_rate = bare_pull(&mut bare_client, BARE_CHUNK_BYTES, total).await?;
            bare.push(bare_rate);
            let bare_seconds = total as f64 / 1e6 / bare_rate;
            ceiling.push(whole.as_secs_f64() / (first_byte.as_secs_f64() + bare_seconds));
            eprintln!(
                "round {round}/{}: Push {:.0} MB/s, Pull {:.0} MB/s (first chunk after {:.2} s); \
                 direct PUT {:.0} MB/s, GET {:.0} MB/s (first byte after {:.2} s); bare stream \
                 {bare_rate:.0} MB/s",
                args.rounds,
                push[push.len() - 1],
                pull[pull.len() - 1],
                first_chunk.as_secs_f64(),
                put[put.len() - 1],
                get[get.len() - 1],
                first_byte.as_secs_f64(),
            );
        }
        anyhow::Ok(())
    })?;
    drop(runtime);
    server.stop();
    drop(bare_server);
    // Seconds spent in each kind of transfer, over every round.
    let seconds =
        |rates: &[f64]| -> f64 { rates.iter().map(|rate| total as f64 / 1e6 / rate).sum() };
    let (pull_seconds, get_seconds) = (seconds(&pull), seconds(&get));
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
    // Where the cores went: on a machine where the S3 server, artifactd and the client share
    // the cores, a Pull is bound by the CPU all three spend per byte, and the direct GET by
    // what two of them spend.
    let gib = total as f64 * f64::from(args.rounds) / (1u64 << 30) as f64;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    println!(
        "CPU: Pull {} ({:.2} of {cores} cores busy); direct GET {} ({:.2} cores busy){}",
        pull_cpu.describe(gib),
        pull_cpu.total() / pull_seconds,
        get_cpu.describe(gib),
        get_cpu.total() / get_seconds,
        if s3_server_pid.is_none() {
            "; the S3 server's process was not found"
        } else {
            ""
        }
    );
    // The most a Pull could do if it kept every core busy at its measured CPU per byte.
    let cpu_ceiling = (pull_cpu.total() > 0.0)
        .then(|| cores as f64 * gib / pull_cpu.total() * f64::from(1u32 << 30) / 1e6 / get);
    if let Some(cpu_ceiling) = cpu_ceiling {
        println!(
            "  with every core busy at that CPU per byte, a Pull could reach {:.0} MB/s = \
             {cpu_ceiling:.2}× the direct GET",
            cpu_ceiling * get
        );
    }
    let stream_ceiling = median(ceiling);
    println!(
        "First byte: the Pull's first chunk after {:.2} s, the GET's first byte after {:.2} s; \
         after it, Pull {:.0} MB/s vs GET {:.0} MB/s (medians)",
        median(pull_first),
        median(get_first),
        median(pull_after),
        median(get_after)
    );
    println!(
        "  a bare gRPC stream of the same bytes (no storage, no S3) ran at {:.0} MB/s: a Pull \
         cannot end before the S3 server's first byte plus that stream, so it can reach at \
         most {stream_ceiling:.2}× the direct GET (median of the rounds)",
        median(bare)
    );
    let (bound, why) = match cpu_ceiling {
        Some(cpu) if cpu < stream_ceiling => (cpu, "every core busy"),
        _ => (stream_ceiling, "first byte + bare stream"),
    };
    println!(
        "Ceiling of Pull/GET on this machine and S3 server: {bound:.2}× ({why}); target {TARGET}×{}",
        if bound < TARGET {
            ": out of reach here"
        } else {
            ""
        }
    );
    println!(
        "(artifactd's blobs are left under s3://{}/{prefix}/)",
        args.bucket
    );
    Ok(())
}
