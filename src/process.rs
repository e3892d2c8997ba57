//! Process resources: handing freed memory back to the operating system, and the open-files
//! limit.
//!
//! A flood of streams (hundreds of stalled pulls and trickling pushes) makes the process
//! allocate tens of MiB of per-stream buffers across glibc's per-thread arenas. When the
//! streams end that memory is free inside the allocator but stays resident: glibc trims only
//! the top of the main heap on its own, so RSS stays at the flood's level (measured: 24 MiB at
//! start, 67 MiB at the peak, still 67 MiB after the streams closed). `malloc_trim(0)` walks
//! every arena and returns each whole free page with `MADV_DONTNEED`.
//!
//! [`return_free_memory`] runs on the server: every few seconds it asks the allocator how
//! much it holds free (`mallinfo2`, summed over arenas) and trims when that is more than a
//! few MiB *and* a few MiB more than right after the last trim. A trimmed page stays counted
//! as free by the allocator, so the second condition is what keeps a quiet server from
//! trimming again and again: an idle or steady server never pays for a trim, and a burst's
//! memory goes back within seconds of the burst ending. On other allocators and platforms
//! it does nothing.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the allocator's free total is looked at.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Free bytes the allocator may keep before a trim: enough for steady traffic's churn.
const KEEP_FREE_BYTES: u64 = 8 * 1024 * 1024;

/// Bytes the allocator holds free (allocated from the OS but not in use), if known.
pub fn free_bytes() -> Option<u64> {
    imp::free_bytes()
}

/// Returns free allocator memory to the OS; `true` if anything was released.
pub fn trim() -> bool {
    imp::trim()
}

/// Raises the soft limit on open files to the hard limit (as Go's runtime does at start) and
/// returns the limit now in force, if known.
pub fn raise_open_files_limit() -> Option<u64> {
    imp::raise_open_files_limit()
}

/// The process's resident set, in bytes, if known.
pub fn resident_bytes() -> Option<u64> {
    imp::resident_bytes()
}

/// Trims whenever the allocator holds more than [`KEEP_FREE_BYTES`] free and half that has
/// been freed since the last trim, until `stop`.
pub async fn return_free_memory(stop: CancellationToken) {
    let Some(mut trimmed_at) = free_bytes() else {
        return; // not glibc on Linux: nothing to ask, nothing to trim
    };
    let mut ticks = tokio::time::interval(CHECK_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let Some(free) = free_bytes() else { return };
        // Free memory reused since the last trim is resident again, and counts anew once
        // freed: follow the free total down.
        trimmed_at = trimmed_at.min(free);
        if free <= KEEP_FREE_BYTES || free < trimmed_at + KEEP_FREE_BYTES / 2 {
            continue;
        }
        let before = resident_bytes();
        // A walk over the arenas' free chunks: milliseconds at most, off the async workers.
        let released = tokio::task::spawn_blocking(trim).await.unwrap_or(false);
        trimmed_at = free;
        tracing::debug!(
            released,
            free,
            resident_before = before,
            resident_after = resident_bytes(),
            "returned free allocator memory to the OS"
        );
    }
}

/// The one place the crate calls C directly: glibc's allocator statistics and trim, and the
/// open-files limit. Each call has no preconditions beyond valid pointers to local structs.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod imp {
    pub fn free_bytes() -> Option<u64> {
        // SAFETY: mallinfo2 only reads the allocator's statistics (glibc ≥ 2.33).
        let info = unsafe { libc::mallinfo2() };
        // fordblks: free bytes in the arenas' chunks; fsmblks: free fastbin blocks.
        Some((info.fordblks + info.fsmblks) as u64)
    }

    pub fn trim() -> bool {
        // SAFETY: malloc_trim has no preconditions; 0 keeps no padding at the heap top.
        unsafe { libc::malloc_trim(0) == 1 }
    }

    pub fn raise_open_files_limit() -> Option<u64> {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit read and write the struct passed by pointer.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return None;
            }
            if limit.rlim_cur < limit.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: limit.rlim_max,
                    rlim_max: limit.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    limit = raised;
                }
            }
        }
        Some(limit.rlim_cur)
    }

    pub fn resident_bytes() -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub fn free_bytes() -> Option<u64> {
        None
    }

    pub fn trim() -> bool {
        false
    }

    pub fn raise_open_files_limit() -> Option<u64> {
        None
    }

    pub fn resident_bytes() -> Option<u64> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_memory_is_seen_and_trimmed() {
        // Many mid-sized blocks (below the mmap threshold, so they live in the arena), then
        // all but the last freed: the arena holds them free until a trim.
        // The last block stays, so the freed ones are not at the top of the heap, where glibc
        // would give them back by itself.
        let mut blocks: Vec<Vec<u8>> = (0..256).map(|i| vec![i as u8; 64 * 1024]).collect();
        let keep = blocks.pop().unwrap();
        let before = free_bytes().unwrap();
        drop(blocks);
        let after_free = free_bytes().unwrap();
        assert!(
            after_free >= before + 8 * 1024 * 1024,
            "free {before} → {after_free} bytes after freeing 16 MiB"
        );
        assert!(trim(), "the freed pages went back to the OS");
        assert!(resident_bytes().unwrap() > 0);
        assert_eq!(keep[0], 255);
    }
}
