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
    /// `O_DIRECT` in 1 MiB blocks from a 4 KiB-aligned buffer, then `fdatasync` for the
    /// file's size.
    Direct,
}

/// Writes `chunks` to a new file at `path` and makes it durable (`fdatasync`), as `mode`
/// says; returns MB/s over the whole write and sync, then removes the file. For
/// [`WriteMode::Direct`] the chunks are copied into an aligned 1 MiB block and written a
/// block at a time, the last one padded and the padding cut off again: the copy and the
/// writes of the server's direct writer, timed together.
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
    let mut block = AlignedBlock::new();
    let started = Instant::now();
    let mut total: u64 = 0;
    for chunk in chunks {
        match mode {
            WriteMode::Buffered => file.write_all(&chunk),
            WriteMode::Direct => block.write(&mut file, &chunk),
        }
        .with_context(|| format!("writing {}", path.display()))?;
        total += chunk.len() as u64;
    }
    if mode == WriteMode::Direct {
        block
            .finish(&mut file)
            .with_context(|| format!("writing {}", path.display()))?;
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

/// Bytes per direct write, as the server's direct writer makes them (`blob::direct`).
const DIRECT_BLOCK: usize = 1024 * 1024;
const DIRECT_ALIGN: usize = 4096;

/// Gathers chunks into [`DIRECT_BLOCK`]s at a 4 KiB-aligned address for `O_DIRECT` writes,
/// as the server does: the same copy and the same writes. Also the buffer of direct reads.
pub(crate) struct AlignedBlock {
    bytes: Vec<u8>,
    start: usize,
    filled: usize,
}

impl AlignedBlock {
    pub(crate) fn new() -> Self {
        let bytes = vec![0; DIRECT_BLOCK + DIRECT_ALIGN];
        let start = bytes.as_ptr().align_offset(DIRECT_ALIGN);
        Self {
            bytes,
            start,
            filled: 0,
        }
    }

    /// The whole aligned block, to read into with `O_DIRECT`.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + DIRECT_BLOCK]
    }

    /// Copies `data` in, writing each block that fills to `file`.
    fn write(&mut self, file: &mut File, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let n = (DIRECT_BLOCK - self.filled).min(data.len());
            let at = self.start + self.filled;
            self.bytes[at..at + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == DIRECT_BLOCK {
                file.write_all(&self.bytes[self.start..self.start + DIRECT_BLOCK])?;
                self.filled = 0;
            }
        }
        Ok(())
    }

    /// Writes what is left, zero-padded to whole 4 KiB blocks.
    fn finish(&mut self, file: &mut File) -> std::io::Result<()> {
        if self.filled == 0 {
            return Ok(());
        }
        let len = self.filled.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let block = &mut self.bytes[self.start..self.start + len];
        block[self.filled..].fill(0);
        self.filled = 0;
        file.write_all(block)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The direct write's blocks hold every byte in order: whole blocks, chunks across a
    /// block's end, and a padded tail that `set_len` cuts back.
    #[test]
    fn aligned_blocks_write_every_byte_in_order() {
        let path = std::env::temp_dir().join(format!("aligned-block-{}", std::process::id()));
        let data: Vec<u8> = (0..2 * DIRECT_BLOCK + 12_345)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut file = File::create(&path).unwrap();
        let mut block = AlignedBlock::new();
        for chunk in data.chunks(300_007) {
            block.write(&mut file, chunk).unwrap();
        }
        block.finish(&mut file).unwrap();
        let padded = file.metadata().unwrap().len();
        assert_eq!(padded, (data.len() as u64).div_ceil(4096) * 4096);
        file.set_len(data.len() as u64).unwrap();
        drop(file);
        let written = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(
            written == data,
            "the blocks' bytes differ from what was written"
        );
    }
}
