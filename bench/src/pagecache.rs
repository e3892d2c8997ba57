//! The disk's own rates, the ceilings of what a push or pull through the local blob store can
//! reach: a durable write of a file (as a push with fsync on must make), and a cold read of
//! one straight from the disk (as a Pull that finds nothing cached must make). Also dropping
//! a file from the page cache.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, ensure};
use bytes::Bytes;

use crate::client::mb_per_s;

/// How a durable write reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteMode {
    /// Through the page cache, then one `fdatasync`: what `dd conv=fdatasync` does.
    Buffered,
    /// `O_DIRECT` from 4 KiB-aligned buffers, then `fdatasync` for the file's size.
    Direct,
}

/// Writes `chunks` to a new file at `path` and makes it durable (`fdatasync`), as `mode`
/// says; returns MB/s over the whole write and sync, then removes the file. For
/// [`WriteMode::Direct`] every chunk but the last must be a multiple of 4 KiB; each is
/// copied into an aligned buffer first (the copy is timed too, as a direct write path in the
/// server would have to make it).
pub(crate) fn write_durable(
    path: &Path,
    chunks: impl Iterator<Item = Bytes>,
    mode: WriteMode,
) -> anyhow::Result<f64> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    if mode == WriteMode::Direct {
        options.custom_flags(libc::O_DIRECT);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let mut aligned = AlignedBuf::default();
    let started = Instant::now();
    let mut total: u64 = 0;
    for chunk in chunks {
        match mode {
            WriteMode::Buffered => file.write_all(&chunk),
            WriteMode::Direct => {
                let block = aligned.fill(&chunk);
                file.write_all(block)
            }
        }
        .with_context(|| format!("writing {}", path.display()))?;
        total += chunk.len() as u64;
    }
    // A direct write is in whole blocks: cut the padding of the last one off again.
    file.set_len(total)
        .with_context(|| format!("truncating {}", path.display()))?;
    file.sync_data()
        .with_context(|| format!("fdatasync of {}", path.display()))?;
    let rate = mb_per_s(total, started.elapsed());
    drop(file);
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    Ok(rate)
}

/// A 4 KiB-aligned buffer for `O_DIRECT` writes, grown as needed: a plain vector with room
/// to start at an aligned address inside it.
#[derive(Default)]
struct AlignedBuf {
    bytes: Vec<u8>,
}

const DIRECT_ALIGN: usize = 4096;

impl AlignedBuf {
    /// Copies `data` in, zero-padded to a whole number of 4 KiB blocks; returns those blocks.
    fn fill(&mut self, data: &[u8]) -> &[u8] {
        let len = data.len().div_ceil(DIRECT_ALIGN).max(1) * DIRECT_ALIGN;
        if self.bytes.len() < len + DIRECT_ALIGN {
            self.bytes = vec![0; len + DIRECT_ALIGN];
        }
        let start = self.bytes.as_ptr().align_offset(DIRECT_ALIGN);
        let block = &mut self.bytes[start..start + len];
        block[..data.len()].copy_from_slice(data);
        block[data.len()..].fill(0);
        block
    }
}

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
    read_through(path, chunk)
}

/// Reads `path` whole in `chunk`-byte reads through the page cache, which then holds it (a
/// blob pushed with direct writes is not cached until read). Returns MB/s.
pub(crate) fn read_through(path: &Path, chunk: usize) -> anyhow::Result<f64> {
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
