//! What the local blob path asks of the kernel's page cache: that an upload written with
//! fsync on is written back as it goes rather than all at its final `fdatasync`, and what of
//! a pulled blob it already holds, read without waiting for the disk; and, for tests and
//! diagnostics, whether a file's first page is cached.
//! (`posix_fadvise(SEQUENTIAL)` on pulled blobs, and a `WILLNEED` of the next 16 MiB from
//! each read that missed the cache, were measured and dropped: neither moved a cold Pull's
//! median past this VM's 8 MiB default read-ahead; see the README.)
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

/// Appends to `buf` up to `want` bytes of `file` from `offset`, but only what the page cache
/// already holds (`preadv2(RWF_NOWAIT)`): it never waits for the disk, so it may run on an
/// async runtime thread. `None` when not even the first page is cached (the kernel starts
/// reading it ahead) or the filesystem cannot tell; `Some(0)` at the end of the file.
pub(super) fn read_cached(
    file: &File,
    offset: u64,
    buf: &mut Vec<u8>,
    want: usize,
) -> std::io::Result<Option<usize>> {
    let offset = libc::off64_t::try_from(offset).map_err(std::io::Error::other)?;
    buf.reserve(want);
    let spare = buf.spare_capacity_mut();
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: want.min(spare.len()),
    };
    // SAFETY: the kernel writes at most `iov_len` bytes into `buf`'s spare capacity, which
    // `iov` points at and which outlives the call; `file` keeps the descriptor open.
    #[allow(unsafe_code)]
    let read = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
    if read < 0 {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => Ok(None),
            _ => Err(err),
        };
    }
    let read = usize::try_from(read).map_err(std::io::Error::other)?;
    // SAFETY: the kernel initialised the first `read` bytes of the spare capacity.
    #[allow(unsafe_code)]
    unsafe {
        buf.set_len(buf.len() + read)
    };
    Ok(Some(read))
}

/// Whether the first page of the file at `path` is in the page cache, from `mincore` on a
/// mapping of it: asking does not read it in, as a `preadv2(RWF_NOWAIT)` would (that read
/// starts read-ahead, which on a fast virtual disk sometimes completed in time to answer with
/// data). For tests and diagnostics: whether an upload went past the page cache. An empty file
/// has no page, so none cached.
pub fn first_page_cached(path: &std::path::Path) -> std::io::Result<bool> {
    const PAGE: usize = 4096;
    let file = File::open(path)?;
    if file.metadata()?.len() == 0 {
        return Ok(false);
    }
    // SAFETY: a fresh read-only shared mapping of one page of a file `file` keeps open; it is
    // only passed to mincore and unmapped, never dereferenced.
    #[allow(unsafe_code)]
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if page == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let mut resident = [0u8; 1];
    // SAFETY: `page` is the one-page mapping above; mincore writes one byte per page.
    #[allow(unsafe_code)]
    let done = unsafe { libc::mincore(page, PAGE, resident.as_mut_ptr()) };
    let error = std::io::Error::last_os_error();
    // SAFETY: unmaps the mapping made above, which nothing else refers to.
    #[allow(unsafe_code)]
    unsafe {
        libc::munmap(page, PAGE)
    };
    if done != 0 {
        return Err(error);
    }
    Ok(resident[0] & 1 == 1)
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
    evict_range(file, 0, 0)
}

/// Drops the clean pages of `len` bytes of `file` from `offset` (0: to the end) from the page
/// cache.
#[cfg(test)]
pub(super) fn evict_range(file: &File, offset: i64, len: i64) -> std::io::Result<()> {
    file.sync_data()?;
    // SAFETY: a system call on a descriptor `file` keeps open for the call.
    #[allow(unsafe_code)]
    let done =
        unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED) };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(done))
    }
}
