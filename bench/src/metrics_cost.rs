//! # `metrics-cost`
//!
//! `artifactd-bench metrics-cost` measures what the per-call gRPC metrics layer costs (the
//! `artifactd_grpc_*` families, the DATA_LOSS count, the per-call span and its log line):
//! two `artifactd` processes of the same binary, one with the layer and one with
//! `ARTIFACTD_GRPC_METRICS=false`, each on a fresh Postgres database, a Redis key prefix and
//! a local blob directory of its own, metering on (`enterprise` plan). Each round measures,
//! on one server and then the other (the order alternates between rounds):
//!
//! - **small pushes**: `--clients` clients pushing `--size`-byte artifacts back to back for
//!   `--seconds` after a 1 s warm-up (as `pushrate`), pushes/s and the server's CPU-seconds
//!   per 1,000 pushes;
//! - **Pull** of one `--pull-mib` artifact pushed once beforehand, MB/s and the server's
//!   CPU-seconds per GiB.
//!
//! Printed: the medians over `--rounds`, and each figure with the layer as a fraction of the
//! figure without it.

use clap::Args;

use crate::client::{artifact_client, artifact_pull, artifact_push, connect};
use crate::content::ChunkPool;
use crate::measure::cpu_seconds;
use crate::process::{Server, artifactd_exe};
use crate::pushrate::measure_pushes;
use crate::scratch::{ScratchDatabase, ScratchDir, ScratchRedisPrefix, ScratchServices};
use crate::{KIB, MAX_ARTIFACT_BYTES, MIB, runtime, warn_if_debug};

const PULL_PATH: &str = "metrics-cost/pull.bin";

#[derive(Debug, Clone, Args)]
pub(crate) struct MetricsCostArgs {
    /// Where the scratch databases and Redis key prefixes go.
    #[command(flatten)]
    services: ScratchServices,

    /// Concurrent pushing clients, each with its own connection.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    clients: u32,

    /// Length of each push window, after a 1 s warm-up.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,

    /// Bytes per small push.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(8..=1024 * 1024))]
    size: u64,

    /// Size of the pulled artifact, in MiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=10240))]
    pull_mib: u64,

    /// Rounds (each measures both servers); the medians are printed.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=99))]
    rounds: u32,
}

/// One server's figures over the rounds.
#[derive(Debug, Default)]
struct Figures {
    pushes_per_s: Vec<f64>,
    cpu_per_1k_pushes: Vec<f64>,
    pull_mb_per_s: Vec<f64>,
    cpu_per_gib_pulled: Vec<f64>,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or_default()
}

pub(crate) fn metrics_cost(args: &MetricsCostArgs) -> anyhow::Result<()> {
    warn_if_debug("metrics-cost");
    let exe = artifactd_exe()?;
    let runtime = runtime()?;
    let pull_bytes = args.pull_mib * MIB;
    // Declared before the servers so that they are removed after the servers stop.
    let mut scratch = Vec::new();
    let mut servers = Vec::new();
    for layer in [true, false] {
        let database =
            runtime.block_on(ScratchDatabase::create(&args.services.database_admin_url))?;
        let redis = runtime.block_on(ScratchRedisPrefix::create(&args.services.redis_url))?;
        let dir = ScratchDir::create()?;
        let env = [
            ("DATABASE_URL", database.url.clone()),
            ("REDIS_URL", args.services.redis_url.clone()),
            ("ARTIFACTD_REDIS_PREFIX", redis.prefix.clone()),
            ("ARTIFACTD_GRPC_METRICS", layer.to_string()),
            ("ARTIFACTD_DEFAULT_PLAN", "enterprise".to_owned()),
            (
                "ARTIFACTD_MAX_ARTIFACT_BYTES",
                MAX_ARTIFACT_BYTES.to_string(),
            ),
            (
                "ARTIFACTD_BLOB_URL",
                format!("file://{}", dir.path().join("blobs").display()),
            ),
        ];
        servers.push((layer, Server::start(&exe, &env)?));
        scratch.push((database, redis, dir));
    }
    let pool = ChunkPool::new(256 * KIB as usize);
    for (n, (_, server)) in (0u64..).zip(&servers) {
        runtime.block_on(async {
            let mut client = artifact_client(connect(server.grpc_port).await?);
            artifact_push(&mut client, &pool, 11_000 + n, pull_bytes, PULL_PATH).await
        })?;
    }
    let mut figures = [Figures::default(), Figures::default()];
    for round in 1..=args.rounds {
        // Alternate which server goes first.
        let order: [usize; 2] = if round % 2 == 1 { [0, 1] } else { [1, 0] };
        for i in order {
            let (layer, server) = &servers[i];
            let pid = server.pid();
            let before = cpu_seconds(pid);
            let tally = runtime.block_on(measure_pushes(
                server.grpc_port,
                args.clients,
                args.seconds,
                args.size,
                u64::from(round) * u64::from(args.clients),
            ))?;
            // The warm-up second's pushes are not counted but cost CPU: the window's share.
            let used =
                (cpu_seconds(pid) - before) * args.seconds as f64 / (args.seconds + 1) as f64;
            if tally.errors > 0 {
                eprintln!(
                    "metrics-cost: {} push errors; first: {}",
                    tally.errors,
                    tally.first_error.as_deref().unwrap_or("")
                );
            }
            let rate = tally.pushes as f64 / args.seconds as f64;
            let f = &mut figures[i];
            f.pushes_per_s.push(rate);
            f.cpu_per_1k_pushes
                .push(used / (tally.pushes.max(1) as f64) * 1000.0);

            let before = cpu_seconds(pid);
            let mb_per_s = runtime.block_on(async {
                let mut client = artifact_client(connect(server.grpc_port).await?);
                artifact_pull(&mut client, PULL_PATH, pull_bytes).await
            })?;
            let used = cpu_seconds(pid) - before;
            f.pull_mb_per_s.push(mb_per_s);
            f.cpu_per_gib_pulled
                .push(used / (pull_bytes as f64 / (1u64 << 30) as f64));
            eprintln!(
                "metrics-cost: round {round}, layer {}: {rate:.0} pushes/s, Pull {mb_per_s:.0} MB/s",
                if *layer { "on" } else { "off" }
            );
        }
    }
    drop(runtime);
    for (_, server) in servers {
        server.stop();
    }
    drop(scratch);
    let [on, off] = figures.map(|f| {
        [
            median(f.pushes_per_s),
            median(f.cpu_per_1k_pushes),
            median(f.pull_mb_per_s),
            median(f.cpu_per_gib_pulled),
        ]
    });
    println!(
        "gRPC metrics layer, median of {} rounds ({} clients × {} B pushes for {} s; Pull of {} MiB):",
        args.rounds, args.clients, args.size, args.seconds, args.pull_mib
    );
    println!(
        "{:<22} {:>12} {:>12} {:>8}",
        "", "layer on", "layer off", "on ÷ off"
    );
    for (i, (what, digits)) in [
        ("pushes/s", 0),
        ("server CPU-s/1k pushes", 3),
        ("Pull MB/s", 0),
        ("server CPU-s/GiB pulled", 3),
    ]
    .into_iter()
    .enumerate()
    {
        println!(
            "{what:<22} {:>12.digits$} {:>12.digits$} {:>7.3}×",
            on[i],
            off[i],
            on[i] / off[i]
        );
    }
    Ok(())
}
