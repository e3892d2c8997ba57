//! Cold reads: dropping a file from the page cache, and reading it straight from the disk as
//! the ceiling of a Pull that finds nothing cached.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, ensure};

use crate::client::mb_per_s;

/// Drops `path`'s pages from the page cache: written back first (`fdatasync`), since dirty
/// pages stay, then `posix_fadvise(DONTNEED)`. Only this file's pages go, so other work on
/// the machine keeps its cache (unlike writing to `/proc/sys/vm/drop_caches`).
pub(crate) fn evict(path: &Path) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    file.sync_data()
        .with_context(|| format!("fdatasync of {}", path.display()))?;
    // SAFETY: a plain system call on a descriptor `file` owns for the whole call.
    #[allow(unsafe_code)]
    let advised = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    ensure!(
        advised == 0,
        "posix_fadvise(DONTNEED) on {}: {}",
        path.display(),
        std::io::Error::from_raw_os_error(advised)
    );
    Ok(())
}

/// Drops `path` from the page cache, then reads it whole in `chunk`-byte reads with no hint
/// but the kernel's default read-ahead, as `cat` would: the disk's rate for this file, the
/// ceiling of a cold Pull. Returns MB/s.
pub(crate) fn read_cold(path: &Path, chunk: usize) -> anyhow::Result<f64> {
    evict(path)?;
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; chunk];
    let started = Instant::now();
    let mut total: u64 = 0;
    loop {
        let read = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if read == 0 {
            break;
        }
        total += read as u64;
    }
    Ok(mb_per_s(total, started.elapsed()))
}
