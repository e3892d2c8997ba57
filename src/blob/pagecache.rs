//! What the local blob path asks of the kernel's page cache: that an upload written with
//! fsync on is written back as it goes rather than all at its final `fdatasync`.
//! (`posix_fadvise(SEQUENTIAL)` on pulled blobs was measured and dropped: this VM's 8 MiB
//! default read-ahead already keeps a cold Pull ahead of the network.)
//!
//! Linux-only system calls through `libc`; each is a plain call on a descriptor the caller
//! owns, so the `unsafe` blocks hold no invariant beyond the descriptor being open.

use std::fs::File;
use std::os::fd::AsRawFd;

/// Starts writing back the dirty pages of `file` in `range` without waiting for them
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`).
pub(super) fn start_writeback(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    sync_file_range(file, offset, len, libc::SYNC_FILE_RANGE_WRITE)
}

/// Waits until the pages of `file` in `range` are written back, starting the writes of any
/// not yet under way. Data only: the file's size and extents still need an `fdatasync`.
pub(super) fn wait_writeback(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    sync_file_range(
        file,
        offset,
        len,
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
    )
}

fn sync_file_range(file: &File, offset: u64, len: u64, flags: libc::c_uint) -> std::io::Result<()> {
    let offset = libc::off64_t::try_from(offset).map_err(std::io::Error::other)?;
    let len = libc::off64_t::try_from(len).map_err(std::io::Error::other)?;
    // SAFETY: a system call on a descriptor `file` keeps open for the call.
    #[allow(unsafe_code)]
    let done = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Drops `file`'s clean pages from the page cache, so the next read comes from the disk.
#[cfg(test)]
pub(super) fn evict(file: &File) -> std::io::Result<()> {
    file.sync_data()?;
    // SAFETY: a system call on a descriptor `file` keeps open for the call.
    #[allow(unsafe_code)]
    let done = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(done))
    }
}
