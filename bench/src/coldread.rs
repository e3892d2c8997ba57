//! `artifactd-bench coldread`: what a cold read costs on this machine, with no artifactd in
//! it — the same file dropped from the page cache (`posix_fadvise(DONTNEED)`) and read whole
//! in 256 KiB reads, as the throughput bench's "disk read" does, after a pause of each given
//! length, alternating; and, for the disk alone, read with `O_DIRECT` into one reused 1 MiB
//! buffer (no page cache). It prints the rates and this process's CPU seconds per GiB.
//!
//! Why: on the Firecracker VMs here the guest reports freed memory to the host
//! (`page_reporting.page_reporting_order=11` on the kernel command line, `virtio_balloon`),
//! which drops it; the guest's next touch of such a page faults in the host. Page-cache pages
//! for a cold read come from free memory, so how long ago the evicted pages were freed
//! decides whether the copy into them runs at memory speed or at the host's fault rate. That
//! makes both a cold Pull and the disk read it is measured against bimodal (README,
//! "Cold reads on a VM that gives its free memory back").

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use crate::client::mb_per_s;
use crate::hash::median;
use crate::measure::{cpu_per_gib, cpu_seconds};
use crate::scratch::ScratchDir;
use crate::{MIB, pagecache};

#[derive(Debug, Clone, Args)]
pub struct ColdReadArgs {
    /// Size of the file read, in MiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65536))]
    total_mib: u64,

    /// Rounds per pause; the median of each is reported.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,

    /// Seconds to wait between dropping the file from the page cache and reading it, one
    /// series per value, alternating round by round.
    #[arg(long, value_delimiter = ',', default_values_t = [0.0, 4.0])]
    pauses: Vec<f64>,
}

/// Bytes per read, as the throughput bench's disk read and a Pull's largest chunk.
const READ_BYTES: usize = 256 * 1024;

pub fn coldread(args: &ColdReadArgs) -> anyhow::Result<()> {
    crate::warn_if_debug("coldread");
    let scratch = ScratchDir::create()?;
    let path = scratch.path().join("cold.bin");
    let mut file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut block: Vec<u8> = (0..MIB).map(|i| (i * 131 % 251) as u8).collect();
    for i in 0..args.total_mib {
        // A different first byte per MiB keeps the file from being all one block.
        block[0] = i as u8;
        file.write_all(&block)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    drop(file);
    let bytes = args.total_mib * MIB;
    println!(
        "cold reads of {} MiB in {} KiB reads after each pause, median of {} rounds",
        args.total_mib,
        READ_BYTES / 1024,
        args.rounds
    );
    let me = std::process::id();
    let mut series: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); args.pauses.len()];
    let mut direct: (Vec<f64>, Vec<f64>) = Default::default();
    for round in 1..=args.rounds {
        let cpu = cpu_seconds(me);
        let rate = read_direct(&path)?;
        let cpu_gib = cpu_per_gib(cpu, cpu_seconds(me), bytes);
        println!(
            "round {round}/{}: O_DIRECT: {rate:.0} MB/s, {cpu_gib:.2} CPU-s/GiB",
            args.rounds
        );
        direct.0.push(rate);
        direct.1.push(cpu_gib);
        for (pause, (rates, cpus)) in args.pauses.iter().zip(&mut series) {
            pagecache::evict(&path)?;
            std::thread::sleep(Duration::from_secs_f64(*pause));
            let cpu = cpu_seconds(me);
            let rate = pagecache::read_through(&path, READ_BYTES)?;
            let cpu_gib = cpu_per_gib(cpu, cpu_seconds(me), bytes);
            println!(
                "round {round}/{}: pause {pause} s: {rate:.0} MB/s, {cpu_gib:.2} CPU-s/GiB",
                args.rounds
            );
            rates.push(rate);
            cpus.push(cpu_gib);
        }
    }
    let labels = args
        .pauses
        .iter()
        .map(|pause| format!("through the page cache, pause {pause} s"));
    for (label, (rates, cpus)) in labels
        .chain(["O_DIRECT, no page cache".to_owned()])
        .zip(series.into_iter().chain([direct]))
    {
        println!(
            "{label}: {:.0} MB/s (range {:.0}–{:.0}), {:.2} CPU-s/GiB (range {:.2}–{:.2})",
            median(rates.clone()),
            rates.iter().copied().fold(f64::INFINITY, f64::min),
            rates.iter().copied().fold(0.0, f64::max),
            median(cpus.clone()),
            cpus.iter().copied().fold(f64::INFINITY, f64::min),
            cpus.iter().copied().fold(0.0, f64::max),
        );
    }
    Ok(())
}

/// Reads `path` whole with `O_DIRECT` into one reused 4 KiB-aligned 1 MiB buffer: the disk's
/// rate with no page-cache page allocated. Returns MB/s.
fn read_direct(path: &Path) -> anyhow::Result<f64> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("opening {} with O_DIRECT", path.display()))?;
    let mut buf = pagecache::AlignedBlock::new();
    let block = buf.bytes_mut();
    let started = Instant::now();
    let mut total: u64 = 0;
    loop {
        let read = file
            .read(block)
            .with_context(|| format!("reading {} with O_DIRECT", path.display()))?;
        if read == 0 {
            break;
        }
        total += read as u64;
    }
    Ok(mb_per_s(total, started.elapsed()))
}
