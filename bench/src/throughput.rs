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
//! - **bare pull** (`Source`) against **Pull**: artifactd reads the blob from the page cache
//!   (this process reads the file once first: a push with direct writes leaves it uncached);
//! - **cold Pull** against a **disk read**: the blob file is dropped from the page cache
//!   (`fdatasync`, then `posix_fadvise(DONTNEED)` on that file only) before artifactd pulls it,
//!   and before this process reads the same file straight from the disk in chunk-sized reads
//!   (the kernel's default read-ahead, as `cat` does), which is the cold Pull's ceiling. The
//!   two alternate which goes first from round to round, after one unmeasured cold read
//!   (the first read after a write was the slowest here, whichever it was).
//!
//! - **disk write**: the same bytes written by this process to a file beside the blob
//!   directory and made durable (`fdatasync`), once through the page cache and once with
//!   `O_DIRECT` in the server's 1 MiB blocks, alternating which goes first — what a push
//!   with fsync on must do.
//!
//! Two more lines say where Push stands against the machine itself. This process's CPU per
//! GiB during Push (the client's) plus the server's, against the cores (less what the
//! hypervisor stole meanwhile, from `/proc/stat`), is the rate the two sides could reach at
//! that cost with every core busy. The **server floor** adds the bare server's CPU, the
//! hash's and this process's CPU for the direct write (the copy into an aligned block and the
//! kernel's write, which a direct Push makes too): what a Push cannot cost less than.
//!
//! Push's ceiling is min(bare push, SHA-256 rate, and with fsync on the faster disk write):
//! one artifact's digest is sequential, and a durable push cannot beat the disk. The targets
//! are Push ≥ 0.85× of that ceiling, its server CPU per GiB ≤ 1.2× (bare + hash), Pull ≥
//! 0.90× of bare warm and ≥ 0.85× of min(disk read, bare pull) cold (a cold Pull can beat
//! neither the disk nor the stream). Running both sides in
//! separate processes on the same machine keeps the comparison fair: each measurement pays
//! for the same client, the same loopback TCP and the same HTTP/2 framing.
//!
//! Then, for concurrency, one 256 MiB push alternates with 4 concurrent 256 MiB pushes (each
//! on its own connection), over the same rounds: their aggregate MB/s against the one push
//! (target ≥ 1.6× when the hash is the ceiling: the pushes' hashing spreads over the cores)
//! and the server's CPU-seconds per GiB.
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
use artifactd::pb::bench::Chunk;
use artifactd::pb::bench::bare_stream_client::BareStreamClient;
use clap::{ArgAction, Args};
use futures::stream;
use tonic::transport::Channel;

use crate::bare::bare_pull;
use crate::client::{
    artifact_client, artifact_pull, artifact_push, connect, mb_per_s, push_artifact,
};
use crate::content::ChunkPool;
use crate::measure::{
    HostCpu, RSS_SAMPLE_EVERY, RssSampler, cpu_per_gib, cpu_seconds, proc_status_kib, verdict,
};
use crate::pagecache::{self, WriteMode};
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
/// Target for a cold Pull, as a fraction of a direct read of the same file from the disk.
const COLD_PULL_TARGET: f64 = 0.85;
/// Target for concurrent pushes' aggregate rate, as a multiple of one push, when one core's
/// hash is the ceiling.
const CONCURRENT_TARGET: f64 = 1.6;
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

    /// Rounds of the throughput measurements; the median of each is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,

    /// Have artifactd fsync each upload before committing it (ARTIFACTD_BLOB_FSYNC).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    fsync: bool,

    /// Have artifactd write durable uploads past the page cache
    /// (ARTIFACTD_BLOB_DIRECT_WRITES; only with fsync on).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    direct_writes: bool,

    /// Size of each file of the concurrent-push memory phase, in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=10240))]
    mem_file_mib: u64,

    /// Concurrent pushes in the memory phase, each over its own connection; 0 skips it.
    #[arg(long, default_value_t = 64)]
    mem_pushes: u32,

    /// Pushes at once in the concurrency phase, each over its own connection; 0 skips it.
    #[arg(long, default_value_t = 4)]
    concurrent_pushes: u32,

    /// Size of each push of the concurrency phase (and of the one push it is set against),
    /// in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=10240))]
    concurrent_file_mib: u64,

    /// Run the throughput measurements; `false` skips them and the concurrency phase set
    /// against them, leaving the memory phase on a fresh server (its peak RSS alone).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    throughput: bool,
}

pub(crate) fn throughput(args: &ThroughputArgs) -> anyhow::Result<()> {
    warn_if_debug("throughput");
    let total = args.total_mib * MIB;
    let chunk_size = usize::try_from(args.chunk_kib * KIB).context("chunk size")?;
    let server_exe = artifactd_exe()?;

    // Declared first so it is removed last, after both children are gone.
    let scratch = ScratchDir::create()?;
    eprintln!("scratch data in {}", scratch.path().display());

    let blob_dir = scratch.path().join("blobs");
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
            format!("file://{}", blob_dir.display()),
        ),
        (
            "ARTIFACTD_MAX_ARTIFACT_BYTES",
            MAX_ARTIFACT_BYTES.to_string(),
        ),
        ("ARTIFACTD_BLOB_FSYNC", args.fsync.to_string()),
        (
            "ARTIFACTD_BLOB_DIRECT_WRITES",
            args.direct_writes.to_string(),
        ),
        // The bench moves tens of GiB: the enterprise plan's limits let it, `free` would not.
        ("ARTIFACTD_DEFAULT_PLAN", "enterprise".to_owned()),
    ];
    let mut server = spawn_artifactd(&server_exe, grpc_port, http_port, &env)?;
    wait_ready_http(&mut server, http_port)?;
    let pool = ChunkPool::new(chunk_size);
    let runtime = runtime()?;

    // The throughput measurements, and the concurrency phase set against them.
    let mut measured = None;
    if args.throughput {
        let mut bare = spawn_bare(bare_port)?;
        wait_ready_tcp(&mut bare, bare_port)?;
        let hash = hash_rate(args.rounds);
        let pids = (server.pid(), bare.pid());
        eprintln!("load average at start: {}", load_average());
        let medians = runtime.block_on(measure_throughput(
            args, &pool, total, &blob_dir, grpc_port, bare_port, pids,
        ))?;
        print_throughput(args, &medians, hash);
        measured = Some((medians, hash));
    }

    if let Some((medians, hash)) = &measured
        && args.concurrent_pushes > 0
    {
        let concurrent =
            runtime.block_on(measure_concurrent(args, &pool, grpc_port, server.pid()))?;
        let (_, bound) = medians.push_ceiling(args.fsync, hash.0);
        print_concurrent(args, &concurrent, bound == "SHA-256");
    }

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

    println!("load average at the end: {}", load_average());
    drop(runtime);
    drop(server);
    drop(scratch);
    Ok(())
}

/// Median of each measurement over the rounds: MB/s, and the server's CPU-seconds per GiB.
#[derive(Debug, Default)]
struct Medians {
    bare_push: f64,
    push: f64,
    bare_pull: f64,
    pull: f64,
    bare_push_cpu: f64,
    push_cpu: f64,
    bare_pull_cpu: f64,
    pull_cpu: f64,
    disk_read: f64,
    /// This process's CPU-seconds per GiB for the disk read.
    disk_read_cpu: f64,
    cold_pull: f64,
    cold_pull_cpu: f64,
    disk_write: f64,
    disk_write_direct: f64,
    /// This process's CPU-seconds per GiB for the direct write: the copy into an aligned
    /// block and the kernel's write past the page cache, which a direct Push pays too.
    direct_write_cpu: f64,
    /// This process's CPU-seconds per GiB during Push: the client's.
    client_push_cpu: f64,
    /// Share of the machine's CPU time the hypervisor stole during Push.
    push_steal: f64,
}

impl Medians {
    /// The disk's durable write rate: the faster of a buffered and a direct write.
    fn disk_write_ceiling(&self) -> f64 {
        self.disk_write.max(self.disk_write_direct)
    }

    /// What bounds Push: the bare push, one core's hash and, when uploads are fsynced, the
    /// disk's durable write rate; with the name of the lowest.
    fn push_ceiling(&self, fsync: bool, hash: f64) -> (f64, &'static str) {
        let mut ceiling = (self.bare_push, "bare push");
        if hash < ceiling.0 {
            ceiling = (hash, "SHA-256");
        }
        if fsync && self.disk_write_ceiling() < ceiling.0 {
            ceiling = (self.disk_write_ceiling(), "disk write");
        }
        ceiling
    }
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

async fn measure_throughput(
    args: &ThroughputArgs,
    pool: &ChunkPool,
    total: u64,
    blob_dir: &Path,
    grpc_port: u16,
    bare_port: u16,
    (server_pid, bare_pid): (u32, u32),
) -> anyhow::Result<Medians> {
    let mut bare = BareStreamClient::new(connect(bare_port).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut artifacts = artifact_client(connect(grpc_port).await?);
    let chunk_size = i32::try_from(pool.chunk_size).context("chunk size")?;

    let mut rounds: [Vec<f64>; 17] = Default::default();
    for round in 0..args.rounds {
        // Each round pushes different content, so no push is answered by deduplication.
        let variant = u64::from(round);
        let cpu = cpu_seconds(bare_pid);
        let bare_push = bare_push(&mut bare, pool, variant, total)
            .await
            .context("bare push")?;
        let bare_push_cpu = cpu_per_gib(cpu, cpu_seconds(bare_pid), total);
        let me = std::process::id();
        let (cpu, client_cpu, host) = (cpu_seconds(server_pid), cpu_seconds(me), HostCpu::now());
        let (push, sha256) = push_artifact(&mut artifacts, pool, variant, total, THROUGHPUT_PATH)
            .await
            .context("Push")?;
        let push_cpu = cpu_per_gib(cpu, cpu_seconds(server_pid), total);
        let client_push_cpu = cpu_per_gib(client_cpu, cpu_seconds(me), total);
        let push_steal = HostCpu::now().steal_since(&host);
        // The disk's durable write rate for the same bytes, buffered and direct, first one
        // then the other, beside the Push that had to make them durable.
        let scratch_file = blob_dir.with_file_name("disk-write.bin");
        // With this process's CPU per GiB: the cost of the write itself.
        let write = |mode| -> anyhow::Result<(f64, f64)> {
            let cpu = cpu_seconds(me);
            let rate = pagecache::write_durable(&scratch_file, pool.upload(variant, total), mode)
                .with_context(|| format!("{mode:?} disk write"))?;
            Ok((rate, cpu_per_gib(cpu, cpu_seconds(me), total)))
        };
        let ((disk_write, _), (disk_write_direct, direct_write_cpu)) = if round % 2 == 0 {
            let buffered = write(WriteMode::Buffered)?;
            (buffered, write(WriteMode::Direct)?)
        } else {
            let direct = write(WriteMode::Direct)?;
            (write(WriteMode::Buffered)?, direct)
        };
        let cpu = cpu_seconds(bare_pid);
        let bare_pull = bare_pull(&mut bare, chunk_size, total)
            .await
            .context("bare pull")?;
        let bare_pull_cpu = cpu_per_gib(cpu, cpu_seconds(bare_pid), total);
        let blob = blob_file(blob_dir, &sha256)?;
        let chunk = pool.chunk_size;
        // A warm Pull: the page cache holds the blob (which a direct-write push leaves out).
        pagecache::read_through(&blob, chunk).context("warming the blob")?;
        let cpu = cpu_seconds(server_pid);
        let pull = artifact_pull(&mut artifacts, THROUGHPUT_PATH, total)
            .await
            .context("Pull")?;
        let pull_cpu = cpu_per_gib(cpu, cpu_seconds(server_pid), total);
        // The first cold read after a push ran at a fraction of later ones here (the VM's
        // disk still settling the write), whichever read it was: one unmeasured read first,
        // so that the disk read and the cold Pull meet the same disk.
        pagecache::read_cold(&blob, chunk).context("settling read")?;
        let disk_first = round % 2 == 0;
        // Its CPU shows whether the VM's host had to fault the page-cache pages in (see
        // `coldread`): a cold Pull can meet the same.
        let read_disk = || -> anyhow::Result<(f64, f64)> {
            let cpu = cpu_seconds(me);
            let rate = pagecache::read_cold(&blob, chunk).context("disk read")?;
            Ok((rate, cpu_per_gib(cpu, cpu_seconds(me), total)))
        };
        let (mut disk_read, mut disk_read_cpu) = (0.0, 0.0);
        if disk_first {
            (disk_read, disk_read_cpu) = read_disk()?;
        }
        pagecache::evict(&blob)?;
        let cpu = cpu_seconds(server_pid);
        let cold_pull = artifact_pull(&mut artifacts, THROUGHPUT_PATH, total)
            .await
            .context("cold Pull")?;
        let cold_pull_cpu = cpu_per_gib(cpu, cpu_seconds(server_pid), total);
        if !disk_first {
            (disk_read, disk_read_cpu) = read_disk()?;
        }
        eprintln!(
            "round {}/{}: bare push {bare_push:.1}, Push {push:.1}, disk write {disk_write:.1} \
             (direct {disk_write_direct:.1}), bare pull {bare_pull:.1}, Pull {pull:.1}, disk \
             read {disk_read:.1}, cold Pull {cold_pull:.1} MB/s; server \
             CPU-s/GiB: bare push {bare_push_cpu:.2}, Push {push_cpu:.2}, bare pull \
             {bare_pull_cpu:.2}, Pull {pull_cpu:.2}, cold Pull {cold_pull_cpu:.2}; this \
             process: disk read {disk_read_cpu:.2}, direct write {direct_write_cpu:.2}, Push \
             client {client_push_cpu:.2}; {:.0}% stolen during Push (load {})",
            round + 1,
            args.rounds,
            push_steal * 100.0,
            load_average()
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
            disk_read,
            disk_read_cpu,
            cold_pull,
            cold_pull_cpu,
            disk_write,
            disk_write_direct,
            direct_write_cpu,
            client_push_cpu,
            push_steal,
        ]) {
            series.push(value);
        }
    }
    let [a, b, c, d, e, f, g, h, i, n, j, k, l, m, o, p, q] = rounds.map(crate::hash::median);
    Ok(Medians {
        bare_push: a,
        push: b,
        bare_pull: c,
        pull: d,
        bare_push_cpu: e,
        push_cpu: f,
        bare_pull_cpu: g,
        pull_cpu: h,
        disk_read: i,
        disk_read_cpu: n,
        cold_pull: j,
        cold_pull_cpu: k,
        disk_write: l,
        disk_write_direct: m,
        direct_write_cpu: o,
        client_push_cpu: p,
        push_steal: q,
    })
}

/// Where the local blob store keeps the blob with digest `sha256` (hex).
fn blob_file(blob_dir: &Path, sha256: &str) -> anyhow::Result<std::path::PathBuf> {
    ensure!(
        sha256.len() == 64,
        "Push returned {sha256:?}, not a SHA-256 in hex"
    );
    let path = blob_dir
        .join("blobs/sha256")
        .join(&sha256[0..2])
        .join(&sha256[2..4])
        .join(sha256);
    ensure!(path.is_file(), "no blob file at {}", path.display());
    Ok(path)
}

/// The 1, 5 and 15 minute load averages, as `uptime` prints them.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
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

fn print_throughput(args: &ThroughputArgs, medians: &Medians, (hash, hash_cpu): (f64, f64)) {
    let (ceiling, bound) = medians.push_ceiling(args.fsync, hash);
    let push_ratio = medians.push / ceiling;
    let pull_ratio = medians.pull / medians.bare_pull;
    let cpu_bound = PUSH_CPU_TARGET * (medians.bare_push_cpu + hash_cpu);
    println!(
        "artifactd throughput — {} MiB, {} KiB chunks, median of {}, fsync={}, direct writes={}",
        args.total_mib, args.chunk_kib, args.rounds, args.fsync, args.direct_writes
    );
    println!("{:<14} {:>8} {:>9}   target", "", "MB/s", "ratio");
    println!("{:<14} {:>8.1}", "SHA-256 1 core", hash);
    println!("{:<14} {:>8.1}", "bare push", medians.bare_push);
    println!(
        "{:<14} {:>8.1}   the same bytes written through the page cache, then fdatasync",
        "disk write", medians.disk_write
    );
    println!(
        "{:<14} {:>8.1}   the same with O_DIRECT",
        "direct write", medians.disk_write_direct
    );
    let parts = if args.fsync {
        "bare push, SHA-256, disk write"
    } else {
        "bare push, SHA-256; no fsync, so not the disk"
    };
    println!("{:<14} {:>8.1}   min({parts}): {bound}", "ceiling", ceiling);
    println!(
        "{:<14} {:>8.1} {:>8.2}×   ≥ {PUSH_TARGET:.2}× ceiling  {}",
        "Push",
        medians.push,
        push_ratio,
        verdict(push_ratio >= PUSH_TARGET)
    );
    println!("{:<14} {:>8.1}", "bare pull", medians.bare_pull);
    println!(
        "{:<14} {:>8.1} {:>8.2}×   ≥ {PULL_TARGET:.2}× bare (warm)  {}",
        "Pull",
        medians.pull,
        pull_ratio,
        verdict(pull_ratio >= PULL_TARGET)
    );
    // A cold Pull can go no faster than the disk reads or the bare stream pulls.
    let cold_ceiling = medians.disk_read.min(medians.bare_pull);
    let cold_ratio = medians.cold_pull / cold_ceiling;
    // Fast rounds cost 0.1 CPU-s/GiB here; slow ones, whose page-cache pages the host had to
    // fault in, 0.5–2.7 (README, "Cold reads on a VM that gives its free memory back").
    let faulted = if medians.disk_read_cpu > 0.3 {
        "; the host faulted its page-cache pages in, see `artifactd-bench coldread`"
    } else {
        ""
    };
    println!(
        "{:<14} {:>8.1}   cold, straight from the file ({:.2} CPU-s/GiB{faulted})",
        "disk read", medians.disk_read, medians.disk_read_cpu
    );
    println!(
        "{:<14} {:>8.1} {:>8.2}×   ≥ {COLD_PULL_TARGET:.2}× min(disk read, bare pull) (cold; {:.2}× \
         the disk read alone)  {}",
        "cold Pull",
        medians.cold_pull,
        cold_ratio,
        medians.cold_pull / medians.disk_read,
        verdict(cold_ratio >= COLD_PULL_TARGET)
    );
    println!(
        "server CPU-s/GiB: Push {:.2} (bare {:.2} + hash {hash_cpu:.2}; target ≤ {cpu_bound:.2}) {}; \
         Pull {:.2} (bare {:.2}); cold Pull {:.2}",
        medians.push_cpu,
        medians.bare_push_cpu,
        verdict(medians.push_cpu <= cpu_bound),
        medians.pull_cpu,
        medians.bare_pull_cpu,
        medians.cold_pull_cpu
    );
    // What this machine's cores allow: Push, its client and everything else share them, so
    // at the CPU a GiB costs both sides, they carry at most this rate.
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let per_gib = medians.push_cpu + medians.client_push_cpu;
    let cpu_ceiling = cores * (1.0 - medians.push_steal) / per_gib * GIB as f64 / 1e6;
    println!(
        "Push on {cores} cores: server {:.2} + client {:.2} = {per_gib:.2} core-s/GiB; with \
         {:.0}% of the time stolen they carry {cpu_ceiling:.1} MB/s at that cost (Push at \
         {:.2}× of it)",
        medians.push_cpu,
        medians.client_push_cpu,
        medians.push_steal * 100.0,
        medians.push / cpu_ceiling
    );
    let floor = medians.bare_push_cpu + hash_cpu + medians.direct_write_cpu;
    if args.fsync && args.direct_writes {
        println!(
            "server floor: bare {:.2} + hash {hash_cpu:.2} + the direct write's own {:.2} = \
             {floor:.2} core-s/GiB (Push at {:.2}× of it)",
            medians.bare_push_cpu,
            medians.direct_write_cpu,
            medians.push_cpu / floor
        );
    }
}

/// Medians of the concurrency phase.
struct Concurrent {
    one: f64,
    one_cpu: f64,
    aggregate: f64,
    aggregate_cpu: f64,
}

/// One push, then `--concurrent-pushes` at once, each round (see the module documentation).
async fn measure_concurrent(
    args: &ThroughputArgs,
    pool: &ChunkPool,
    grpc_port: u16,
    server_pid: u32,
) -> anyhow::Result<Concurrent> {
    let size = args.concurrent_file_mib * MIB;
    let pushes = u64::from(args.concurrent_pushes);
    let mut client = artifact_client(connect(grpc_port).await?);
    let mut clients = Vec::new();
    for _ in 0..pushes {
        clients.push(artifact_client(connect(grpc_port).await?));
    }
    // Variants past the throughput phase's and the memory phase's.
    let mut variant = 1_000_000;
    let mut rounds: [Vec<f64>; 4] = Default::default();
    for round in 0..args.rounds {
        let cpu = cpu_seconds(server_pid);
        let one = artifact_push(&mut client, pool, variant, size, "concurrent/one.bin")
            .await
            .context("the single push")?;
        let one_cpu = cpu_per_gib(cpu, cpu_seconds(server_pid), size);
        variant += 1;

        let cpu = cpu_seconds(server_pid);
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for (n, mut client) in clients.drain(..).enumerate() {
            let pool = pool.clone();
            let variant = variant + n as u64;
            tasks.spawn(async move {
                let path = format!("concurrent/{n}.bin");
                artifact_push(&mut client, &pool, variant, size, &path)
                    .await
                    .with_context(|| format!("concurrent Push of {path}"))?;
                anyhow::Ok(client)
            });
        }
        while let Some(joined) = tasks.join_next().await {
            clients.push(joined.context("a push task panicked")??);
        }
        let aggregate = mb_per_s(size * pushes, started.elapsed());
        let aggregate_cpu = cpu_per_gib(cpu, cpu_seconds(server_pid), size * pushes);
        variant += pushes;
        eprintln!(
            "concurrency round {}/{}: one push {one:.1} MB/s ({one_cpu:.2} CPU-s/GiB), {pushes} \
             at once {aggregate:.1} MB/s ({aggregate_cpu:.2} CPU-s/GiB) (load {})",
            round + 1,
            args.rounds,
            load_average()
        );
        for (series, value) in rounds
            .iter_mut()
            .zip([one, one_cpu, aggregate, aggregate_cpu])
        {
            series.push(value);
        }
    }
    let [one, one_cpu, aggregate, aggregate_cpu] = rounds.map(crate::hash::median);
    Ok(Concurrent {
        one,
        one_cpu,
        aggregate,
        aggregate_cpu,
    })
}

fn print_concurrent(args: &ThroughputArgs, concurrent: &Concurrent, hash_is_ceiling: bool) {
    let ratio = concurrent.aggregate / concurrent.one;
    let verdict = if hash_is_ceiling {
        verdict(ratio >= CONCURRENT_TARGET)
    } else {
        "(no target: the bare stream, not the hash, is the ceiling)"
    };
    println!(
        "concurrency: {} × {} MiB pushes at once {:.1} MB/s aggregate, one push {:.1} MB/s: \
         {ratio:.2}× (target ≥ {CONCURRENT_TARGET:.1}×) {verdict}; server CPU-s/GiB {:.2} \
         (one push {:.2})",
        args.concurrent_pushes,
        args.concurrent_file_mib,
        concurrent.aggregate,
        concurrent.one,
        concurrent.aggregate_cpu,
        concurrent.one_cpu
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
