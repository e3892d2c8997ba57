//! What the subcommands measure with: process CPU time and memory from `/proc`, latency
//! percentiles, verdicts.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};

/// How often the memory sampler reads `/proc/<pid>/status`.
pub(crate) const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(20);

pub(crate) fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

/// utime + stime of one process from its `/proc/PID/stat`, in seconds (at 100 ticks/s, the
/// kernel's USER_HZ on Linux).
pub(crate) fn process_cpu_seconds(stat: &std::path::Path) -> Option<f64> {
    let stat = std::fs::read_to_string(stat).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// CPU-seconds per GiB a process spent while `bytes` moved.
pub(crate) fn cpu_per_gib(before: f64, after: f64, bytes: u64) -> f64 {
    (after - before) / (bytes as f64 / crate::GIB as f64)
}

/// CPU seconds of process `pid` so far (0 when it cannot be read, e.g. it has exited).
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    process_cpu_seconds(&Path::new("/proc").join(pid.to_string()).join("stat")).unwrap_or(0.0)
}

/// The machine's CPU time so far, from the first line of `/proc/stat` (in ticks): all of it,
/// and the part the hypervisor gave to other guests (steal).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct HostCpu {
    total: u64,
    steal: u64,
}

impl HostCpu {
    /// Now (zeros when `/proc/stat` cannot be read).
    pub(crate) fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        // cpu user nice system idle iowait irq softirq steal guest guest_nice
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("cpu "))
            .map(|fields| {
                fields
                    .split_whitespace()
                    .filter_map(|f| f.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        // guest and guest_nice are already counted in user and nice.
        Self {
            total: ticks.iter().take(8).sum(),
            steal: ticks.get(7).copied().unwrap_or(0),
        }
    }

    /// The share of the machine's CPU time stolen since `before` (0 to 1).
    pub(crate) fn steal_since(&self, before: &HostCpu) -> f64 {
        let total = self.total.saturating_sub(before.total);
        if total == 0 {
            return 0.0;
        }
        self.steal.saturating_sub(before.steal) as f64 / total as f64
    }
}

/// One field of `/proc/<pid>/status` in KiB, e.g. `VmRSS`.
pub(crate) fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let value = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .ok_or_else(|| anyhow!("no {field} in {path}"))?;
    let kib = value.trim().trim_end_matches("kB").trim();
    kib.parse()
        .with_context(|| format!("parsing {field} {value:?} in {path}"))
}

/// Samples `VmRSS` of `pid` on its own thread until stopped; the thread returns the peak.
pub(crate) struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<u64>>,
}

impl RssSampler {
    pub(crate) fn start(pid: u32) -> anyhow::Result<Self> {
        let first = proc_status_kib(pid, "VmRSS")?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("rss-sampler".into())
            .spawn(move || {
                let mut peak = first;
                while !stopping.load(Ordering::Relaxed) {
                    peak = peak.max(proc_status_kib(pid, "VmRSS")?);
                    std::thread::sleep(RSS_SAMPLE_EVERY);
                }
                Ok(peak)
            })
            .context("starting the memory sampler")?;
        Ok(Self { stop, thread })
    }

    pub(crate) fn finish(self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow!("the memory sampler panicked"))?
    }
}

/// Microseconds since the Unix epoch, now.
pub(crate) fn now_micros() -> anyhow::Result<i64> {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the system clock is before 1970")?;
    i64::try_from(since_epoch.as_micros()).context("the system clock is out of range")
}

pub(crate) fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// The `p`-th percentile (0 < p ≤ 100) of `sorted`, by nearest rank (the median of an even
/// count is the lower middle value).
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1))
        .copied()
        .unwrap_or_default()
}
