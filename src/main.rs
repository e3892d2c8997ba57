//! The `artifactd` binary: wiring only. Parse the command line, set up logging, run the
//! subcommand ([`artifactd::cli`]) and map its outcome to an exit code.

use std::process::ExitCode;

use artifactd::config::{Cli, LogFormat};
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// The server's allocator. jemalloc returns the pages a burst of streams freed to the OS on
/// its own, a second or two after they were freed; glibc's malloc kept them in its arenas
/// (see the README's "Memory goes back").
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once when it starts (`MALLOC_CONF` in the environment overrides
/// them; `_RJEM_MALLOC_CONF` where jemalloc is prefixed): a background thread purges freed
/// pages, dirty pages are returned after 1 s unused, and `muzzy_decay_ms:0` makes that
/// return an `MADV_DONTNEED` (RSS drops at once) rather than a lazy `MADV_FREE`, which the
/// kernel reclaims only under pressure. On Linux jemalloc is also the C `malloc` (the crate's
/// unprefixed feature), so SQLite's and aws-lc's allocations return their pages the same way
/// instead of staying in glibc arenas.
#[cfg(not(target_env = "msvc"))]
#[allow(unsafe_code)]
// SAFETY: jemalloc reads this symbol as a `const char *` to a NUL-terminated string; a
// `&u8` to the first byte of a static byte string is exactly that, and nothing else
// exports the name.
#[cfg_attr(target_os = "linux", unsafe(export_name = "malloc_conf"))]
#[cfg_attr(not(target_os = "linux"), unsafe(export_name = "_rjem_malloc_conf"))]
static MALLOC_CONF: Option<&u8> =
    Some(&b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0"[0]);

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match cli.config.log_format {
        LogFormat::Text => logs.init(),
        // One JSON object per line, carrying the fields of the span an event belongs to
        // (an RPC's service, method, project, code, duration and bytes).
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    match artifactd::cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}
