//! Durable uploads written past the page cache (`O_DIRECT`).
//!
//! With fsync on, every byte of an upload must reach the disk before its push is answered.
//! Written through the page cache, each byte is first copied into a cache page, then
//! written back, then waited for; written with `O_DIRECT`, the disk takes it straight from
//! the process's memory. On the VM measured (README, "Direct writes for durable uploads") a
//! durable push through the CLI ran 2.2–2.5× faster with it, at a third to a half of the
//! server CPU (no page-cache copy, no reclaim, no writeback). The price: a blob just pushed
//! is not in the page cache, so the first Pull of it reads the disk.
//!
//! `O_DIRECT` needs the memory, file offset and length of each write aligned to the device.
//! Chunks arrive at any size and address, so the write stage copies them into an aligned
//! [`BLOCK_BYTES`] block and writes whole blocks; the tail that does not fill a block is
//! written in its aligned part directly and the rest through the page cache (the descriptor's
//! `O_DIRECT` cleared with `fcntl`), and the `fdatasync` before commit covers both. Blocks
//! come from a pool of the store's ([`BlockPool`], at most [`POOL_BLOCKS`]), so memory stays
//! bounded however many pushes run: an upload that finds the pool empty is written through
//! the page cache as before. A filesystem that refuses `O_DIRECT` (at open or at the first
//! write) gets the page cache too, without error.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::pipeline;

/// Bytes per direct write: the disk here takes 1 MiB direct writes at 1.4 GB/s, 256 KiB ones
/// at 0.8 GB/s (`dd oflag=direct`), as each write waits for the device.
pub(super) const BLOCK_BYTES: usize = 1024 * 1024;
/// Memory, offset and length alignment of direct writes: a page, which covers devices with
/// 512-byte and 4 KiB sectors alike.
const ALIGN: usize = 4096;
/// Blocks a store lends at once: uploads beyond this many at a time are written through the
/// page cache. Four keep a few large pushes at once direct (the disk is the limit beyond
/// that) and the 64 × 256 MiB bench's peak RSS within its 200 MiB: with 16 blocks it
/// measured 196–341 MiB, with 8 161–265, with 4 158–188, all through the page cache 148–189
/// (README, "Direct writes for durable uploads").
pub(super) const POOL_BLOCKS: usize = 4;

/// One aligned block of [`BLOCK_BYTES`]: a vector with room to start at an aligned address.
struct Block {
    buf: Vec<u8>,
    start: usize,
}

impl Block {
    fn new() -> Self {
        let buf = vec![0u8; BLOCK_BYTES + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN);
        Self { buf, start }
    }

    fn bytes(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + BLOCK_BYTES]
    }
}

/// The store's aligned blocks: lent to one upload each, returned when dropped.
pub(super) struct BlockPool {
    state: Mutex<PoolState>,
}

impl std::fmt::Debug for BlockPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("BlockPool")
            .field("made", &state.made)
            .field("free", &state.free.len())
            .finish()
    }
}

struct PoolState {
    free: Vec<Block>,
    /// Blocks that exist, lent or free.
    made: usize,
}

impl BlockPool {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(PoolState {
                free: Vec::new(),
                made: 0,
            }),
        })
    }

    /// A block, or `None` when [`POOL_BLOCKS`] are lent.
    pub(super) fn lend(self: &Arc<Self>) -> Option<LentBlock> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let block = match state.free.pop() {
            Some(block) => block,
            None if state.made == POOL_BLOCKS => return None,
            None => {
                state.made += 1;
                drop(state);
                Block::new()
            }
        };
        Some(LentBlock {
            block,
            pool: self.clone(),
        })
    }

    /// Blocks lent right now.
    #[cfg(test)]
    pub(super) fn lent(&self) -> usize {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.made - state.free.len()
    }
}

/// A block lent by a [`BlockPool`]: it goes back to the pool when dropped.
pub(super) struct LentBlock {
    block: Block,
    pool: Arc<BlockPool>,
}

impl LentBlock {
    fn bytes(&mut self) -> &mut [u8] {
        self.block.bytes()
    }
}

impl Drop for LentBlock {
    fn drop(&mut self) {
        let block = Block {
            buf: std::mem::take(&mut self.block.buf),
            start: self.block.start,
        };
        let mut state = self.pool.state.lock().unwrap_or_else(|e| e.into_inner());
        state.free.push(block);
    }
}

/// Creates (truncating) an upload's file, with `O_DIRECT` when `direct` and the filesystem
/// takes it. Returns the file and whether it is open for direct writes.
pub(super) fn create(path: &Path, direct: bool) -> std::io::Result<(File, bool)> {
    let open = |flags: i32| {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(flags)
            .open(path)
    };
    if direct {
        match open(libc::O_DIRECT) {
            Ok(file) => return Ok((file, true)),
            // tmpfs before Linux 6.6 and some FUSE filesystems refuse O_DIRECT.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    open(0).map(|file| (file, false))
}

/// The write stage of a direct upload (see the module documentation).
pub(super) struct DirectWriter {
    file: Arc<File>,
    block: LentBlock,
    /// Bytes in the block, not yet written directly.
    filled: usize,
    /// Where the block starts in the file: a multiple of [`ALIGN`].
    at: u64,
    /// Whether the descriptor has `O_DIRECT` (false once the filesystem refused a write).
    direct: bool,
}

impl DirectWriter {
    /// A writer appending to `file`, opened by [`create`] with `O_DIRECT`.
    pub(super) fn new(file: Arc<File>, block: LentBlock) -> Self {
        Self {
            file,
            block,
            filled: 0,
            at: 0,
            direct: true,
        }
    }

    /// A writer appending to `file` (open for reading and writing, without `O_DIRECT`) from
    /// byte `offset`, its end: the bytes between the aligned place before it and `offset` are
    /// read into the block (a direct write must start aligned, so they are written again),
    /// then the descriptor is switched to `O_DIRECT`. `None` when the filesystem refuses
    /// `O_DIRECT`; the descriptor is then as it was.
    pub(super) fn resume(
        file: Arc<File>,
        mut block: LentBlock,
        offset: u64,
    ) -> std::io::Result<Option<Self>> {
        let at = offset / ALIGN as u64 * ALIGN as u64;
        let filled = usize::try_from(offset - at).map_err(std::io::Error::other)?;
        file.read_exact_at(&mut block.bytes()[..filled], at)?;
        match set_direct(&file, true) {
            Ok(()) => Ok(Some(Self {
                file,
                block,
                filled,
                at,
                direct: true,
            })),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `range` of the block at its place in the file. A direct write the filesystem
    /// refuses (EINVAL) is made through the page cache instead, and so is every later one.
    fn write(&mut self, range: std::ops::Range<usize>) -> std::io::Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        let at = self.at + range.start as u64;
        let bytes = &self.block.bytes()[range];
        match self.file.write_all_at(bytes, at) {
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                set_direct(&self.file, false)?;
                self.direct = false;
                self.file.write_all_at(bytes, at)
            }
            other => other,
        }
    }
}

impl pipeline::Work for DirectWriter {
    fn chunk(&mut self, mut chunk: &[u8]) -> std::io::Result<()> {
        while !chunk.is_empty() {
            let n = (BLOCK_BYTES - self.filled).min(chunk.len());
            self.block.bytes()[self.filled..self.filled + n].copy_from_slice(&chunk[..n]);
            self.filled += n;
            chunk = &chunk[n..];
            if self.filled == BLOCK_BYTES {
                self.write(0..BLOCK_BYTES)?;
                self.at += BLOCK_BYTES as u64;
                self.filled = 0;
            }
        }
        Ok(())
    }

    /// Puts every byte handed over into the file, for an `fdatasync` to make durable: the
    /// block's aligned part directly, the rest through the page cache. That rest stays at
    /// the start of the block, to be written again, directly, as part of the next block.
    fn flush(&mut self) -> std::io::Result<()> {
        let aligned = self.filled / ALIGN * ALIGN;
        self.write(0..aligned)?;
        if self.filled > aligned {
            let bytes = self.block.bytes();
            let rest = &bytes[aligned..self.filled];
            let at = self.at + aligned as u64;
            if self.direct {
                set_direct(&self.file, false)?;
                let written = self.file.write_all_at(rest, at);
                set_direct(&self.file, true)?;
                written?;
            } else {
                self.file.write_all_at(rest, at)?;
            }
            bytes.copy_within(aligned..self.filled, 0);
        }
        self.at += aligned as u64;
        self.filled -= aligned;
        Ok(())
    }
}

/// Sets or clears `O_DIRECT` on `file`'s open description.
pub(super) fn set_direct(file: &File, on: bool) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor `file` keeps open for the call; F_GETFL takes no pointer.
    #[allow(unsafe_code)]
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: as above; F_SETFL takes an integer.
    #[allow(unsafe_code)]
    let done = unsafe { libc::fcntl(fd, libc::F_SETFL, flags) };
    if done < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
