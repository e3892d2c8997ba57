//! `artifactd-bench cli`: the `artifact` command line against the server's own rates, on
//! Postgres, in one run (targets: a folder of 10,000 × 4 KiB files pushed at ≥ 1,000
//! files/s; one 1 GiB file pushed and pulled at ≥ 0.9× of this bench's own Push and Pull).
//!
//! It creates a fresh Postgres database, starts `artifactd` on it (local blobs, the
//! enterprise plan, blob fsync as `--fsync` says) and the `artifact` binary built next to
//! this one (`cargo build --release --workspace --bins`), then:
//!
//! - writes `--files` files of `--file-kib` KiB (distinct content) into a scratch folder and
//!   times `artifact push job <folder>` (one process, `--parallel` streams on one
//!   connection, the default 32 unless given), then `artifact pull job <folder>` of it into
//!   an empty folder (every file written to a temporary file, SHA-256 checked, renamed);
//! - per round, times this bench's own Push of `--total-mib` MiB from memory (the throughput
//!   bench's client) and `artifact push` of a file of that size (distinct content per round,
//!   so neither is deduplicated; the file is in the page cache), then this bench's own Pull
//!   (bytes counted and dropped) and `artifact pull` of that file to disk (written, hashed and
//!   checked against its SHA-256, renamed). The bench's Push and the CLI's push run back to
//!   back, as do the two pulls, so each round's ratio compares them on the same disk state
//!   (this VM's durable write rate moves by 2× from minute to minute); the verdict is on the
//!   median of the rounds' ratios, beside the median rates.
//!
//! The CLI's figures include starting the process and connecting.
//!
//! **The pull's ceiling on this machine.** The CLI and the server share the machine's cores,
//! and a CLI pull does more than the bench's Pull (which only counts bytes): it also hashes
//! every byte and copies it into the page cache. So the bench measures, in the same run, the
//! least CPU a pull to disk needs per GiB — the server's and the bench client's CPU during
//! its own Pull, plus one core's SHA-256 and page-cache write of the same bytes — and the
//! rate the cores allow for that work (cores ÷ CPU-s per byte). The CLI's pull is printed
//! against min(bench Pull, that rate) beside the 0.9× of bench Pull target, with the CPU
//! the CLI and the server actually used.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use clap::Args;

use crate::client::{artifact_client, artifact_pull, artifact_push, connect, mb_per_s};
use crate::content::{ChunkPool, pseudo_random};
use crate::measure::cpu_seconds;
use crate::process::{Server, artifactd_exe};
use crate::scratch::{ScratchDatabase, ScratchDir};
use crate::{
    DEFAULT_ADMIN_URL, GIB, JOB, KIB, MAX_ARTIFACT_BYTES, MIB, PROJECT, runtime, warn_if_debug,
};

const FILES_TARGET: f64 = 1000.0;
const RATIO_TARGET: f64 = 0.9;

#[derive(Debug, Clone, Args)]
pub struct CliArgs {
    /// Admin URL of the Postgres server the scratch database is created on.
    #[arg(long, env = "TEST_DATABASE_URL", default_value = DEFAULT_ADMIN_URL, hide_env_values = true)]
    database_admin_url: String,
    /// Files in the pushed folder.
    #[arg(long, default_value_t = 10_000)]
    files: u64,
    /// Size of each of those files, KiB.
    #[arg(long, default_value_t = 4)]
    file_kib: u64,
    /// Size of the large file, MiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=10240))]
    total_mib: u64,
    /// Rounds of the large-file comparison (the median ratio is kept).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Blob fsync on the server.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    fsync: bool,
    /// `--parallel` of the CLI (files in flight); unset: the CLI's default.
    #[arg(long)]
    parallel: Option<usize>,
}

/// The `artifact` binary built alongside this one.
fn artifact_exe() -> anyhow::Result<PathBuf> {
    let server = artifactd_exe()?;
    let exe = server.with_file_name(format!("artifact{}", std::env::consts::EXE_SUFFIX));
    if !exe.is_file() {
        bail!(
            "the artifact command line is missing: {} does not exist; build it with \
             `cargo build --release --workspace --bins`",
            exe.display()
        );
    }
    Ok(exe)
}

/// Runs `artifact ARGS` against the server in `cwd`; returns the seconds it took.
fn run_cli(
    exe: &Path,
    port: u16,
    cwd: &Path,
    args: &[&str],
    parallel: Option<usize>,
) -> anyhow::Result<f64> {
    let mut command = Command::new(exe);
    for (name, _) in std::env::vars_os() {
        let text = name.to_string_lossy();
        if text.starts_with("ARTIFACTD_") || text.starts_with("SEMAPHORE_") {
            command.env_remove(&name);
        }
    }
    command
        .current_dir(cwd)
        .args(args)
        .env("ARTIFACTD_URL", format!("http://127.0.0.1:{port}"))
        .env("ARTIFACTD_PROJECT_ID", PROJECT)
        .env("ARTIFACTD_JOB_ID", JOB)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(parallel) = parallel {
        command.env("ARTIFACTD_PARALLEL", parallel.to_string());
    }
    let started = Instant::now();
    let status = command
        .status()
        .with_context(|| format!("running {}", exe.display()))?;
    let elapsed = started.elapsed().as_secs_f64();
    ensure!(
        status.success(),
        "`artifact {}` failed ({status})",
        args.join(" ")
    );
    Ok(elapsed)
}

pub fn cli(args: &CliArgs) -> anyhow::Result<()> {
    warn_if_debug("cli");
    let server_exe = artifactd_exe()?;
    let cli_exe = artifact_exe()?;
    let runtime = runtime()?;
    let database = runtime.block_on(ScratchDatabase::create(&args.database_admin_url))?;
    let scratch = ScratchDir::create()?;
    let env = [
        ("DATABASE_URL", database.url.clone()),
        (
            "ARTIFACTD_BLOB_URL",
            format!("file://{}", scratch.path().join("blobs").display()),
        ),
        ("ARTIFACTD_BLOB_FSYNC", args.fsync.to_string()),
        (
            "ARTIFACTD_MAX_ARTIFACT_BYTES",
            MAX_ARTIFACT_BYTES.to_string(),
        ),
        ("ARTIFACTD_DEFAULT_PLAN", "enterprise".to_owned()),
    ];
    let server = Server::start(&server_exe, &env)?;
    let port = server.grpc_port;
    let work = scratch.path().join("work");
    std::fs::create_dir_all(work.join("folder")).context("creating the folder")?;

    // A folder of small files.
    let file_bytes = usize::try_from(args.file_kib * KIB).context("--file-kib")?;
    for i in 0..args.files {
        let mut data = pseudo_random(file_bytes, i + 1);
        data[..8].copy_from_slice(&i.to_le_bytes());
        let dir = work.join("folder").join(format!("d{:03}", i % 100));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("f{i:05}")), &data)?;
    }
    let folder_secs = run_cli(
        &cli_exe,
        port,
        &work,
        &["push", "job", "folder"],
        args.parallel,
    )?;
    let files_per_s = args.files as f64 / folder_secs;
    eprintln!(
        "folder: {} files of {} KiB pushed in {folder_secs:.2} s: {files_per_s:.0} files/s",
        args.files, args.file_kib
    );
    let pull_secs = run_cli(
        &cli_exe,
        port,
        &work,
        &["pull", "job", "folder", "-d", "pulled-folder"],
        args.parallel,
    )?;
    let pulled_files = walk_count(&work.join("pulled-folder"))?;
    ensure!(
        pulled_files == args.files,
        "the CLI pulled {pulled_files} of {} files",
        args.files
    );
    let pull_files_per_s = args.files as f64 / pull_secs;
    eprintln!("folder: pulled in {pull_secs:.2} s: {pull_files_per_s:.0} files/s",);

    // One large file, the CLI against the bench's own client.
    let total = args.total_mib * MIB;
    let pool = ChunkPool::new(256 * KIB as usize);
    let big = work.join("big.bin");
    let (mut push, mut pull, mut cli_push, mut cli_pull) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut own_cpu, mut cli_cpu, mut floors) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        // The file the CLI pushes, written and made durable first: its write-back must not
        // compete with the pushes that follow (it stays in the page cache).
        let mut file = std::fs::File::create(&big).context("writing the large file")?;
        for chunk in pool.upload(13_000 + u64::from(round), total) {
            file.write_all(&chunk)?;
        }
        file.sync_all().context("fsync of the large file")?;
        drop(file);
        let own_path = format!("cli/own-{round}.bin");
        let remote = format!("cli/big-{round}.bin");
        // Which of the two goes first alternates, so that neither always meets the disk
        // still writing back the other's push.
        let own_first = round % 2 == 1;
        let own_push = || {
            runtime.block_on(async {
                let mut client = artifact_client(connect(port).await?);
                let variant = 11_000 + u64::from(round);
                artifact_push(&mut client, &pool, variant, total, &own_path).await
            })
        };
        let push_cli = || {
            let secs = run_cli(
                &cli_exe,
                port,
                &work,
                &["push", "job", "big.bin", "-d", &remote],
                args.parallel,
            )?;
            Ok::<_, anyhow::Error>(mb_per_s(total, std::time::Duration::from_secs_f64(secs)))
        };
        if own_first {
            push.push(own_push()?);
            cli_push.push(push_cli()?);
        } else {
            cli_push.push(push_cli()?);
            push.push(own_push()?);
        }
        // The extra work of a pull to disk, measured just before the pulls, on the same
        // disk and memory state (it moves from minute to minute).
        floors.push(PullFloor::measure(&pool, total, &work)?);
        let gib = total as f64 / GIB as f64;
        // CPU-s per GiB: (server, bench client) during the bench's Pull.
        let own_pull = || {
            let (server_before, own_before) =
                (cpu_seconds(server.pid()), rusage_seconds(libc::RUSAGE_SELF));
            let rate = runtime.block_on(async {
                let mut client = artifact_client(connect(port).await?);
                artifact_pull(&mut client, &own_path, total).await
            })?;
            let cpu = (
                (cpu_seconds(server.pid()) - server_before) / gib,
                (rusage_seconds(libc::RUSAGE_SELF) - own_before) / gib,
            );
            Ok::<_, anyhow::Error>((rate, cpu))
        };
        // CPU-s per GiB: (server, CLI) during the CLI's pull.
        let pull_cli = || {
            let _ = std::fs::remove_file(work.join("pulled.bin"));
            let (server_before, cli_before) = (
                cpu_seconds(server.pid()),
                rusage_seconds(libc::RUSAGE_CHILDREN),
            );
            let secs = run_cli(
                &cli_exe,
                port,
                &work,
                &["pull", "job", &remote, "-d", "pulled.bin"],
                args.parallel,
            )?;
            let cpu = (
                (cpu_seconds(server.pid()) - server_before) / gib,
                (rusage_seconds(libc::RUSAGE_CHILDREN) - cli_before) / gib,
            );
            let pulled = std::fs::metadata(work.join("pulled.bin"))?.len();
            ensure!(pulled == total, "the CLI pulled {pulled} of {total} bytes");
            Ok((
                mb_per_s(total, std::time::Duration::from_secs_f64(secs)),
                cpu,
            ))
        };
        let ((own_rate, own), (cli_rate, cli)) = if own_first {
            let own = own_pull()?;
            (own, pull_cli()?)
        } else {
            let cli = pull_cli()?;
            (own_pull()?, cli)
        };
        pull.push(own_rate);
        cli_pull.push(cli_rate);
        own_cpu.push(own);
        cli_cpu.push(cli);
        eprintln!(
            "round {round}/{}: bench Push {:.0} MB/s, artifact push {:.0} MB/s; bench Pull {own_rate:.0} MB/s (CPU-s/GiB server {:.2}, client {:.2}), artifact pull {cli_rate:.0} MB/s (server {:.2}, CLI {:.2})",
            args.rounds,
            push[push.len() - 1],
            cli_push[cli_push.len() - 1],
            own.0,
            own.1,
            cli.0,
            cli.1,
        );
    }
    let ratios = |cli: &[f64], own: &[f64]| -> Vec<f64> {
        cli.iter().zip(own).map(|(cli, own)| cli / own).collect()
    };
    let (push_ratio, pull_ratio) = (
        crate::hash::median(ratios(&cli_push, &push)),
        crate::hash::median(ratios(&cli_pull, &pull)),
    );
    let median = |v: &[f64]| crate::hash::median(v.to_vec());
    // The least CPU a pull to disk needs per GiB, and the rate the cores allow for it.
    let (own_server, own_client) = (
        median(&own_cpu.iter().map(|c| c.0).collect::<Vec<_>>()),
        median(&own_cpu.iter().map(|c| c.1).collect::<Vec<_>>()),
    );
    let (cli_server, cli_client) = (
        median(&cli_cpu.iter().map(|c| c.0).collect::<Vec<_>>()),
        median(&cli_cpu.iter().map(|c| c.1).collect::<Vec<_>>()),
    );
    let floor = PullFloor {
        hash: median(&floors.iter().map(|f| f.hash).collect::<Vec<_>>()),
        write: median(&floors.iter().map(|f| f.write).collect::<Vec<_>>()),
    };
    let least = own_server + own_client + floor.hash + floor.write;
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let cores_rate = cores * GIB as f64 / least / 1e6;
    let ceilings: Vec<f64> = pull.iter().map(|own| own.min(cores_rate)).collect();
    let ceiling_ratio = crate::hash::median(ratios(&cli_pull, &ceilings));
    let (push, pull, cli_push, cli_pull) = (
        median(&push),
        median(&pull),
        median(&cli_push),
        median(&cli_pull),
    );
    let verdict = |pass: bool| if pass { "PASS" } else { "MISS" };
    println!("artifact CLI on Postgres (blob fsync {}):", args.fsync);
    println!(
        "  folder push: {} × {} KiB in {folder_secs:.2} s = {files_per_s:.0} files/s (target ≥ {FILES_TARGET:.0}) {}",
        args.files,
        args.file_kib,
        verdict(files_per_s >= FILES_TARGET)
    );
    println!(
        "  folder pull: {} × {} KiB in {pull_secs:.2} s = {pull_files_per_s:.0} files/s",
        args.files, args.file_kib,
    );
    println!(
        "  {} MiB push, medians of {}: artifact {cli_push:.0} MB/s, bench Push {push:.0} MB/s; median of the rounds' ratios {push_ratio:.2}× (target ≥ {RATIO_TARGET}) {}",
        args.total_mib,
        args.rounds,
        verdict(push_ratio >= RATIO_TARGET)
    );
    println!(
        "  {} MiB pull, medians of {}: artifact {cli_pull:.0} MB/s (to disk, SHA-256 checked), bench Pull {pull:.0} MB/s; median of the rounds' ratios {pull_ratio:.2}× (target ≥ {RATIO_TARGET}) {}",
        args.total_mib,
        args.rounds,
        verdict(pull_ratio >= RATIO_TARGET)
    );
    println!(
        "  pull's ceiling here: least CPU per GiB pulled to disk = server {own_server:.2} + \
         client {own_client:.2} (bench Pull) + SHA-256 {:.2} + page-cache write {:.2} = \
         {least:.2} CPU-s/GiB; {cores:.0} cores allow {cores_rate:.0} MB/s; the CLI used server \
         {cli_server:.2} + CLI {cli_client:.2} = {:.2} CPU-s/GiB ({:.1} cores busy); artifact \
         pull ÷ min(bench Pull, {cores_rate:.0} MB/s), median of the rounds: {ceiling_ratio:.2}×",
        floor.hash,
        floor.write,
        cli_server + cli_client,
        (cli_server + cli_client) * cli_pull * 1e6 / GIB as f64,
    );
    server.stop();
    drop(scratch);
    drop(database);
    Ok(())
}

/// Regular files under `dir`, recursively.
fn walk_count(dir: &Path) -> anyhow::Result<u64> {
    let mut count = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            } else {
                count += 1;
            }
        }
    }
    Ok(count)
}

/// One core's CPU-seconds per GiB for the work a pull to disk adds to the bench's Pull:
/// SHA-256 of the bytes (the server's hasher, aws-lc-rs, as the CLI uses) and their copy
/// into the page cache (a file written and then deleted, so it is never written back; the
/// cheaper of two writes).
struct PullFloor {
    hash: f64,
    write: f64,
}

impl PullFloor {
    fn measure(pool: &ChunkPool, total: u64, work: &Path) -> anyhow::Result<Self> {
        let gib = total as f64 / GIB as f64;
        let started = thread_cpu_seconds();
        let mut hasher = artifactd::domain::Hasher::new();
        for chunk in pool.upload(17_000, total) {
            hasher.update(&chunk);
        }
        std::hint::black_box(hasher.finish());
        let hash = (thread_cpu_seconds() - started) / gib;
        // Written twice, the cheaper kept: on this VM the first large write after the
        // pushes cost 2-5× the next one (kernel time in ext4's block allocation), a one-off
        // the CLI's own write, right after the probe, did not pay.
        let path = work.join("page-cache-write.bin");
        let mut writes = Vec::new();
        for variant in [17_001, 17_002] {
            let mut file = std::fs::File::create(&path).context("creating the write probe")?;
            let started = thread_cpu_seconds();
            for chunk in pool.upload(variant, total) {
                file.write_all(&chunk).context("writing the write probe")?;
            }
            writes.push((thread_cpu_seconds() - started) / gib);
            drop(file);
            std::fs::remove_file(&path).context("removing the write probe")?;
        }
        let write = writes.iter().copied().fold(f64::INFINITY, f64::min);
        eprintln!(
            "  one core, CPU-s per GiB: SHA-256 {hash:.2}, page-cache write {:.2} then {:.2}",
            writes[0], writes[1]
        );
        Ok(Self { hash, write })
    }
}

/// CPU-seconds (user + system) of this thread so far.
fn thread_cpu_seconds() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    #[allow(unsafe_code)]
    let done = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(done, 0, "CLOCK_THREAD_CPUTIME_ID is always there on Linux");
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}

/// CPU-seconds (user + system) of this process (`RUSAGE_SELF`, every thread) or of its
/// children waited for so far (`RUSAGE_CHILDREN`).
fn rusage_seconds(who: libc::c_int) -> f64 {
    // SAFETY: all-zero bytes are a valid `rusage` (integers and timevals).
    #[allow(unsafe_code)]
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage through a valid pointer.
    #[allow(unsafe_code)]
    let done = unsafe { libc::getrusage(who, &mut usage) };
    assert_eq!(done, 0, "getrusage with a valid `who` cannot fail");
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}
