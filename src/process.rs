//! Process resources: the open-files limit.
//!
//! Handing a burst's freed memory back to the OS is the allocator's job: the server binary
//! runs on jemalloc, configured in `main.rs` (see the README's "Memory goes back").

/// Raises the soft limit on open files to the hard limit (as Go's runtime does at start) and
/// returns the limit now in force, if known.
pub fn raise_open_files_limit() -> Option<u64> {
    imp::raise_open_files_limit()
}

/// The one place the crate calls C directly: the open-files limit. Each call has no
/// preconditions beyond valid pointers to local structs.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod imp {
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
}

#[cfg(not(target_os = "linux"))]
mod imp {
    pub fn raise_open_files_limit() -> Option<u64> {
        None
    }
}
