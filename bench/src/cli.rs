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

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use clap::Args;

use crate::client::{artifact_client, artifact_pull, artifact_push, connect, mb_per_s};
use crate::content::{ChunkPool, pseudo_random};
use crate::process::{Server, artifactd_exe};
use crate::scratch::{ScratchDatabase, ScratchDir};
use crate::{
    DEFAULT_ADMIN_URL, JOB, KIB, MAX_ARTIFACT_BYTES, MIB, PROJECT, runtime, warn_if_debug,
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
        let own_pull = || {
            runtime.block_on(async {
                let mut client = artifact_client(connect(port).await?);
                artifact_pull(&mut client, &own_path, total).await
            })
        };
        let pull_cli = || {
            let _ = std::fs::remove_file(work.join("pulled.bin"));
            let secs = run_cli(
                &cli_exe,
                port,
                &work,
                &["pull", "job", &remote, "-d", "pulled.bin"],
                args.parallel,
            )?;
            let pulled = std::fs::metadata(work.join("pulled.bin"))?.len();
            ensure!(pulled == total, "the CLI pulled {pulled} of {total} bytes");
            Ok(mb_per_s(total, std::time::Duration::from_secs_f64(secs)))
        };
        if own_first {
            pull.push(own_pull()?);
            cli_pull.push(pull_cli()?);
        } else {
            cli_pull.push(pull_cli()?);
            pull.push(own_pull()?);
        }
        eprintln!(
            "round {round}/{}: bench Push {:.0} MB/s, artifact push {:.0} MB/s; bench Pull {:.0} MB/s, artifact pull {:.0} MB/s",
            args.rounds,
            push[push.len() - 1],
            cli_push[cli_push.len() - 1],
            pull[pull.len() - 1],
            cli_pull[cli_pull.len() - 1],
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
