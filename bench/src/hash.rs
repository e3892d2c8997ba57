//! `artifactd-bench hash`: single-core SHA-256 rate of the hasher the server uses
//! (`artifactd::domain::Hasher`, aws-lc-rs) against the `sha2` crate, over the same bytes in
//! memory, in one run. One artifact's digest is sequential, so this rate is Push's ceiling
//! whenever it is below the bare stream's.

use std::time::Instant;

use clap::Args;
use sha2::Digest;

#[derive(Debug, Clone, Args)]
pub struct HashArgs {
    /// Bytes hashed per measurement, in MiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=16384))]
    total_mib: u64,

    /// Bytes per update call, in KiB (a Push chunk is 64 KiB–1 MiB).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
    chunk_kib: u64,

    /// Rounds; the median of each is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
}

pub(crate) fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

pub fn hash(args: &HashArgs) -> anyhow::Result<()> {
    let chunk: Vec<u8> = (0..args.chunk_kib * 1024)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let chunks = (args.total_mib * 1024 / args.chunk_kib).max(1);
    let bytes = chunks * chunk.len() as u64;
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> = ["sha_ni", "avx512f", "avx2"]
        .into_iter()
        .filter(|flag| cpu.split_whitespace().any(|word| word == *flag))
        .collect();
    let model = cpu
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']))
        .unwrap_or("unknown CPU");
    println!("CPU: {model}; features: {}", flags.join(", "));
    println!(
        "hashing {} MiB in {} KiB updates, median of {} rounds",
        bytes >> 20,
        args.chunk_kib,
        args.rounds
    );

    let mut server = Vec::new();
    let mut sha2_crate = Vec::new();
    let mut digests = (String::new(), String::new());
    for _ in 0..args.rounds {
        let started = Instant::now();
        let mut hasher = artifactd::domain::Hasher::new();
        for _ in 0..chunks {
            hasher.update(&chunk);
        }
        digests.0 = hasher.finish().as_str().to_owned();
        server.push(bytes as f64 / started.elapsed().as_secs_f64() / 1e6);

        let started = Instant::now();
        let mut hasher = sha2::Sha256::new();
        for _ in 0..chunks {
            hasher.update(&chunk);
        }
        digests.1 = hex::encode(hasher.finalize());
        sha2_crate.push(bytes as f64 / started.elapsed().as_secs_f64() / 1e6);
    }
    anyhow::ensure!(digests.0 == digests.1, "the two SHA-256s disagree");
    let (server, sha2_crate) = (median(server), median(sha2_crate));
    println!("server hasher (aws-lc-rs): {server:>8.0} MB/s");
    println!("sha2 crate:                {sha2_crate:>8.0} MB/s");
    println!("ratio server / sha2:       {:>8.2}×", server / sha2_crate);
    Ok(())
}
