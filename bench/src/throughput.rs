//! # `throughput`
//!
//! `artifactd-bench throughput` starts two child processes on 127.0.0.1:
//!
//! - the real `artifactd` binary (built next to this one) over a fresh SQLite database and a
//!   local blob directory in a scratch directory under the system temp dir (`TMPDIR`);
//! - a *bare* stream server (this binary's hidden `serve-bare` subcommand) that speaks
//!   `artifactd.bench.v1.BareStream`: the same tonic server setup and the same chunked
//!   streaming, but no database, no hashing and no disk — it counts bytes and drops them, or
//!   sends one preallocated chunk over and over.
//!
//! It then measures, with identical chunking, interleaved over several rounds and reporting the
//! median of each (with the server's CPU-seconds per GiB from `/proc/<pid>/stat`), beside one
//! core's SHA-256 rate of the server's hasher over 1 GiB in memory:
//!
//! - **bare push** (`Sink`) against **Push**: artifactd streams to a temporary upload,
//!   hashes on the side, fsyncs (unless `--fsync false`), promotes and commits a row;
//! - **bare pull** (`Source`) against **Pull**: artifactd reads the blob from disk (usually
//!   from the page cache, as it was just written).
//!
//! Push's ceiling is min(bare push, SHA-256 rate): one artifact's digest is sequential. The
//! targets are Push ≥ 0.85× of that ceiling, its server CPU per GiB ≤ 1.2× (bare + hash),
//! and Pull ≥ 0.90× of bare. Running both sides in
//! separate processes on the same machine keeps the comparison fair: each measurement pays
//! for the same client, the same loopback TCP and the same HTTP/2 framing.
//!
//! Finally it pushes many large files at once (64 × 256 MiB by default, one connection each,
//! like 64 CI jobs uploading together) while sampling the server's resident memory from
//! `/proc/<pid>/status`, to check that memory per upload stays a few chunks however large
//! the file (target: peak RSS ≤ 200 MiB). This part needs Linux.
//!
//! Upload content comes from a pool of 16 distinct pseudo-random chunks, so the client spends
//! no time generating data; each upload starts at its own place in the pool and has its own
//! first chunk, so every upload has a distinct digest and none is deduplicated.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, ensure};
use artifactd::pb::bench::bare_stream_client::BareStreamClient;
use artifactd::pb::bench::{Chunk, SourceRequest};
use clap::{ArgAction, Args};
use futures::stream;
use tonic::transport::Channel;

use crate::client::{artifact_client, artifact_pull, artifact_push, connect, mb_per_s};
use crate::content::ChunkPool;
use crate::measure::{RSS_SAMPLE_EVERY, RssSampler, cpu_seconds, proc_status_kib, verdict};
use crate::process::{
    artifactd_exe, free_port, spawn_artifactd, spawn_bare, wait_ready_http, wait_ready_tcp,
};
use crate::scratch::ScratchDir;
use crate::{GIB, KIB, MAX_ARTIFACT_BYTES, MAX_MESSAGE_BYTES, MIB, runtime, warn_if_debug};

/// Targets: Push as a fraction of its ceiling (min of the bare push and one core's SHA-256),
/// Pull of the bare pull, and Push's server CPU per GiB as a multiple of the bare server's
/// plus the hash's own.
const PUSH_TARGET: f64 = 0.85;
const PULL_TARGET: f64 = 0.90;
const PUSH_CPU_TARGET: f64 = 1.2;
/// Target for the server's peak resident memory during the concurrent pushes.
const RSS_TARGET_MIB: f64 = 200.0;
/// Free disk space wanted before the memory phase, relative to what it writes.
const DISK_HEADROOM: f64 = 1.25;

const THROUGHPUT_PATH: &str = "throughput/1gib.bin";

#[derive(Debug, Clone, Args)]
pub(crate) struct ThroughputArgs {
    /// Bytes per throughput measurement, in MiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=10240))]
    total_mib: u64,

    /// Chunk size of every stream, in KiB (artifactd accepts at most 1024).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1024))]
    chunk_kib: u64,

    /// Rounds of the four throughput measurements; the best of each is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,

    /// Have artifactd fsync each upload before committing it (ARTIFACTD_BLOB_FSYNC).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    fsync: bool,

    /// Size of each file of the concurrent-push memory phase, in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=10240))]
    mem_file_mib: u64,

    /// Concurrent pushes in the memory phase, each over its own connection; 0 skips it.
    #[arg(long, default_value_t = 64)]
    mem_pushes: u32,
}

pub(crate) fn throughput(args: &ThroughputArgs) -> anyhow::Result<()> {
    warn_if_debug("throughput");
    let total = args.total_mib * MIB;
    let chunk_size = usize::try_from(args.chunk_kib * KIB).context("chunk size")?;
    let server_exe = artifactd_exe()?;

    // Declared first so it is removed last, after both children are gone.
    let scratch = ScratchDir::create()?;
    eprintln!("scratch data in {}", scratch.path().display());

    let grpc_port = free_port()?;
    let http_port = free_port()?;
    let bare_port = free_port()?;

    let env = [
        (
            "DATABASE_URL",
            format!("sqlite://{}", scratch.path().join("artifactd.db").display()),
        ),
        (
            "ARTIFACTD_BLOB_URL",
            format!("file://{}", scratch.path().join("blobs").display()),
        ),
        (
            "ARTIFACTD_MAX_ARTIFACT_BYTES",
            MAX_ARTIFACT_BYTES.to_string(),
        ),
        ("ARTIFACTD_BLOB_FSYNC", args.fsync.to_string()),
        // The bench moves tens of GiB: the enterprise plan's limits let it, `free` would not.
        ("ARTIFACTD_DEFAULT_PLAN", "enterprise".to_owned()),
    ];
    let mut server = spawn_artifactd(&server_exe, grpc_port, http_port, &env)?;
    let mut bare = spawn_bare(bare_port)?;
    wait_ready_http(&mut server, http_port)?;
    wait_ready_tcp(&mut bare, bare_port)?;

    let pool = ChunkPool::new(chunk_size);
    let runtime = runtime()?;
    let hash = hash_rate(args.rounds);
    let pids = (server.pid(), bare.pid());
    let best = runtime.block_on(measure_throughput(
        args, &pool, total, grpc_port, bare_port, pids,
    ))?;
    print_throughput(args, &best, hash);

    if args.mem_pushes > 0 {
        let file_bytes = memory_file_size(args, scratch.path())?;
        let memory = runtime.block_on(measure_memory(
            &pool,
            args.mem_pushes,
            file_bytes,
            u64::from(args.rounds),
            grpc_port,
            server.pid(),
        ))?;
        print_memory(args.mem_pushes, file_bytes, &memory);
    }

    drop(runtime);
    drop(bare);
    drop(server);
    drop(scratch);
    Ok(())
}

/// Median of each measurement over the rounds: MB/s, and the server's CPU-seconds per GiB.
#[derive(Debug, Default)]
struct Best {
    bare_push: f64,
    push: f64,
    bare_pull: f64,
    pull: f64,
    bare_push_cpu: f64,
    push_cpu: f64,
    bare_pull_cpu: f64,
    pull_cpu: f64,
}

/// Single-core rate (MB/s, median of `rounds`) of the server's own hasher over 1 GiB held in
/// memory, in 256 KiB updates: the ceiling of one Push, whose digest is sequential.
fn hash_rate(rounds: u32) -> (f64, f64) {
    let chunk: Vec<u8> = (0..256 * KIB).map(|i| (i * 31 % 251) as u8).collect();
    let chunks = GIB / (256 * KIB);
    let mut rates = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        let mut hasher = artifactd::domain::Hasher::new();
        for _ in 0..chunks {
            hasher.update(&chunk);
        }
        std::hint::black_box(hasher.finish());
        rates.push(mb_per_s(GIB, started.elapsed()));
    }
    let rate = crate::hash::median(rates);
    // CPU-seconds per GiB of hashing alone (one core busy for the duration).
    (rate, GIB as f64 / 1e6 / rate)
}

/// CPU-seconds per GiB a process spent while `bytes` moved.
fn cpu_per_gib(before: f64, after: f64, bytes: u64) -> f64 {
    (after - before) / (bytes as f64 / GIB as f64)
}

async fn measure_throughput(
    args: &ThroughputArgs,
    pool: &ChunkPool,
    total: u64,
    grpc_port: u16,
    bare_port: u16,
    (server_pid, bare_pid): (u32, u32),
) -> anyhow::Result<Best> {
    let mut bare = BareStreamClient::new(connect(bare_port).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut artifacts = artifact_client(connect(grpc_port).await?);
    let chunk_size = i32::try_from(pool.chunk_size).context("chunk size")?;

    let mut rounds: [Vec<f64>; 8] = Default::default();
    for round in 0..args.rounds {
        // Each round pushes different content, so no push is answered by deduplication.
        let variant = u64::from(round);
        let cpu = cpu_seconds(bare_pid);
        let bare_push = bare_push(&mut bare, pool, variant, total)
            .await
            .context("bare push")?;
        let bare_push_cpu = cpu_per_gib(cpu, cpu_seconds(bare_pid), total);
        let cpu = cpu_seconds(server_pid);
        let push = artifact_push(&mut artifacts, pool, variant, total, THROUGHPUT_PATH)
            .await
            .context("Push")?;
        let push_cpu = cpu_per_gib(cpu, cpu_seconds(server_pid), total);
        let cpu = cpu_seconds(bare_pid);
        let bare_pull = bare_pull(&mut bare, chunk_size, total)
            .await
            .context("bare pull")?;
        let bare_pull_cpu = cpu_per_gib(cpu, cpu_seconds(bare_pid), total);
        let cpu = cpu_seconds(server_pid);
        let pull = artifact_pull(&mut artifacts, THROUGHPUT_PATH, total)
            .await
            .context("Pull")?;
        let pull_cpu = cpu_per_gib(cpu, cpu_seconds(server_pid), total);
        eprintln!(
            "round {}/{}: bare push {bare_push:.1}, Push {push:.1}, bare pull {bare_pull:.1}, \
             Pull {pull:.1} MB/s; server CPU-s/GiB: bare push {bare_push_cpu:.2}, Push \
             {push_cpu:.2}, bare pull {bare_pull_cpu:.2}, Pull {pull_cpu:.2}",
            round + 1,
            args.rounds
        );
        for (series, value) in rounds.iter_mut().zip([
            bare_push,
            push,
            bare_pull,
            pull,
            bare_push_cpu,
            push_cpu,
            bare_pull_cpu,
            pull_cpu,
        ]) {
            series.push(value);
        }
    }
    let [a, b, c, d, e, f, g, h] = rounds.map(crate::hash::median);
    Ok(Best {
        bare_push: a,
        push: b,
        bare_pull: c,
        pull: d,
        bare_push_cpu: e,
        push_cpu: f,
        bare_pull_cpu: g,
        pull_cpu: h,
    })
}

async fn bare_push(
    client: &mut BareStreamClient<Channel>,
    pool: &ChunkPool,
    variant: u64,
    total: u64,
) -> anyhow::Result<f64> {
    let chunks = stream::iter(pool.upload(variant, total).map(|data| Chunk { data }));
    let started = Instant::now();
    let received = client.sink(chunks).await?.into_inner().bytes;
    let elapsed = started.elapsed();
    ensure!(
        u64::try_from(received) == Ok(total),
        "the bare server counted {received} bytes, {total} were sent"
    );
    Ok(mb_per_s(total, elapsed))
}

async fn bare_pull(
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

fn print_throughput(args: &ThroughputArgs, best: &Best, (hash, hash_cpu): (f64, f64)) {
    let ceiling = best.bare_push.min(hash);
    let push_ratio = best.push / ceiling;
    let pull_ratio = best.pull / best.bare_pull;
    let cpu_bound = PUSH_CPU_TARGET * (best.bare_push_cpu + hash_cpu);
    println!(
        "artifactd throughput — {} MiB, {} KiB chunks, median of {}, fsync={}",
        args.total_mib, args.chunk_kib, args.rounds, args.fsync
    );
    println!("{:<14} {:>8} {:>9}   target", "", "MB/s", "ratio");
    println!("{:<14} {:>8.1}", "SHA-256 1 core", hash);
    println!("{:<14} {:>8.1}", "bare push", best.bare_push);
    println!(
        "{:<14} {:>8.1}   min(bare push, SHA-256)",
        "ceiling", ceiling
    );
    println!(
        "{:<14} {:>8.1} {:>8.2}×   ≥ {PUSH_TARGET:.2}× ceiling  {}",
        "Push",
        best.push,
        push_ratio,
        verdict(push_ratio >= PUSH_TARGET)
    );
    println!("{:<14} {:>8.1}", "bare pull", best.bare_pull);
    println!(
        "{:<14} {:>8.1} {:>8.2}×   ≥ {PULL_TARGET:.2}× bare (warm)  {}",
        "Pull",
        best.pull,
        pull_ratio,
        verdict(pull_ratio >= PULL_TARGET)
    );
    println!(
        "server CPU-s/GiB: Push {:.2} (bare {:.2} + hash {hash_cpu:.2}; target ≤ {cpu_bound:.2}) {}; \
         Pull {:.2} (bare {:.2})",
        best.push_cpu,
        best.bare_push_cpu,
        verdict(best.push_cpu <= cpu_bound),
        best.pull_cpu,
        best.bare_pull_cpu
    );
}

struct MemoryResult {
    /// Highest VmRSS seen by the sampler during the pushes.
    sampled_peak_kib: u64,
    /// VmHWM at the end: the peak over the server's whole life, between samples included.
    hwm_kib: u64,
    /// VmRSS when the phase started.
    before_kib: u64,
    elapsed: Duration,
    bytes: u64,
}

/// The per-push file size: `--mem-file-mib`, scaled down when the scratch filesystem cannot
/// hold every file with some headroom.
fn memory_file_size(args: &ThroughputArgs, dir: &Path) -> anyhow::Result<u64> {
    let pushes = u64::from(args.mem_pushes);
    let wanted = args.mem_file_mib * MIB;
    let needed = (wanted * pushes) as f64 * DISK_HEADROOM;
    let available = match available_bytes(dir) {
        Ok(available) => available,
        Err(e) => {
            eprintln!("warning: cannot tell free disk space ({e:#}); assuming it suffices");
            return Ok(wanted);
        }
    };
    if available as f64 >= needed {
        return Ok(wanted);
    }
    let fits_mib = (available as f64 / DISK_HEADROOM / pushes as f64 / MIB as f64) as u64;
    ensure!(
        fits_mib >= 1,
        "only {:.1} GiB free in {}: not enough for the memory phase \
         (use --mem-pushes 0 to skip it, or TMPDIR to put scratch data elsewhere)",
        available as f64 / GIB as f64,
        dir.display()
    );
    println!(
        "note: only {:.1} GiB free in {} ({:.1} GiB wanted): memory phase scaled down from \
         {} to {fits_mib} MiB per push",
        available as f64 / GIB as f64,
        dir.display(),
        needed / GIB as f64,
        args.mem_file_mib
    );
    Ok(fits_mib * MIB)
}

/// Free bytes in the filesystem holding `dir`, from `df`.
fn available_bytes(dir: &Path) -> anyhow::Result<u64> {
    let output = Command::new("df")
        .args(["-k", "--output=avail"])
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .context("running df")?;
    ensure!(
        output.status.success(),
        "df failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let kib: u64 = stdout
        .lines()
        .last()
        .map(str::trim)
        .ok_or_else(|| anyhow!("df printed nothing"))?
        .parse()
        .with_context(|| format!("parsing df output {stdout:?}"))?;
    Ok(kib * KIB)
}

async fn measure_memory(
    pool: &ChunkPool,
    pushes: u32,
    file_bytes: u64,
    first_variant: u64,
    grpc_port: u16,
    pid: u32,
) -> anyhow::Result<MemoryResult> {
    eprintln!(
        "memory: {pushes} concurrent × {} MiB pushes…",
        file_bytes / MIB
    );
    let before_kib = proc_status_kib(pid, "VmRSS")?;
    let sampler = RssSampler::start(pid)?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..pushes {
        let pool = pool.clone();
        tasks.spawn(async move {
            // Its own connection, as a separate CI job would have.
            let mut client = artifact_client(connect(grpc_port).await?);
            let path = format!("memory/{n}.bin");
            artifact_push(
                &mut client,
                &pool,
                first_variant + u64::from(n),
                file_bytes,
                &path,
            )
            .await
            .with_context(|| format!("Push of {path}"))
        });
    }
    let mut outcome = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let pushed = joined
            .context("a push task panicked")
            .and_then(|result| result);
        if let (Ok(()), Err(e)) = (&outcome, pushed) {
            outcome = Err(e);
            tasks.abort_all();
        }
    }
    let elapsed = started.elapsed();
    let sampled_peak_kib = sampler.finish();
    outcome?;
    let sampled_peak_kib = sampled_peak_kib?;
    let hwm_kib = proc_status_kib(pid, "VmHWM")?;
    Ok(MemoryResult {
        sampled_peak_kib,
        hwm_kib,
        before_kib,
        elapsed,
        bytes: file_bytes * u64::from(pushes),
    })
}

fn print_memory(pushes: u32, file_bytes: u64, memory: &MemoryResult) {
    let mib = |kib: u64| kib as f64 / KIB as f64;
    // VmHWM catches spikes between samples; it also spans the throughput phase before.
    let peak = mib(memory.sampled_peak_kib.max(memory.hwm_kib));
    println!(
        "memory: {pushes} concurrent × {} MiB pushes: peak server RSS {peak:.0} MiB \
         (target ≤ {RSS_TARGET_MIB:.0} MiB) {}, {:.1} s, {:.0} MB/s",
        file_bytes / MIB,
        verdict(peak <= RSS_TARGET_MIB),
        memory.elapsed.as_secs_f64(),
        mb_per_s(memory.bytes, memory.elapsed)
    );
    println!(
        "        RSS before {:.0} MiB, sampled peak {:.0} MiB (every {} ms), VmHWM {:.0} MiB \
         (whole run)",
        mib(memory.before_kib),
        mib(memory.sampled_peak_kib),
        RSS_SAMPLE_EVERY.as_millis(),
        mib(memory.hwm_kib)
    );
}
