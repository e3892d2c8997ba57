//! Child processes: the `artifactd` binary built next to this one, the bare stream server,
//! and waiting for either to be ready.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};

use crate::STARTUP_TIMEOUT;

/// The `artifactd` binary built alongside this one.
pub(crate) fn artifactd_exe() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("locating this executable")?;
    let dir = me
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", me.display()))?;
    let exe = dir.join(format!("artifactd{}", std::env::consts::EXE_SUFFIX));
    if !exe.is_file() {
        bail!(
            "the artifactd server binary is missing: {} does not exist.\n\
             `cargo run --bin artifactd-bench` builds only the benchmark; build both with\n\n    \
             cargo build --release --workspace --bins && target/release/artifactd-bench throughput\n",
            exe.display()
        );
    }
    // A server binary much older than this one was probably not rebuilt with it.
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    if let (Some(server), Some(bench)) = (modified(&exe), modified(&me))
        && bench
            .duration_since(server)
            .is_ok_and(|age| age > Duration::from_secs(60))
    {
        eprintln!(
            "warning: {} is older than this benchmark and may be stale; \
             `cargo build --release --workspace --bins` rebuilds both",
            exe.display()
        );
    }
    Ok(exe)
}

/// A port that was free a moment ago: bound to 127.0.0.1:0, read, released.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr().context("finding a free port")?.port())
}

/// A child process that is killed (and reaped) when this guard is dropped, on success and on
/// every error path alike.
pub(crate) struct ChildGuard {
    name: &'static str,
    child: Child,
}

impl ChildGuard {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the child has already exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!("{} exited early ({status}); see its log above", self.name),
            Err(e) => Err(e).with_context(|| format!("checking on {}", self.name)),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Settings an `artifactd` child takes from this process's environment: cleared, so that
/// only what a benchmark passes explicitly applies.
fn is_artifactd_setting(name: &std::ffi::OsStr) -> bool {
    let name = name.to_string_lossy();
    name.starts_with("ARTIFACTD_") || name == "DATABASE_URL" || name == "REDIS_URL"
}

/// The `artifactd` binary configured by `env` alone (on top of its defaults): inherited
/// artifactd settings are removed, logs go to this process's stderr at `warn`.
fn artifactd_command(exe: &Path, env: &[(&str, String)]) -> Command {
    let mut command = Command::new(exe);
    for (name, _) in std::env::vars_os() {
        if is_artifactd_setting(&name) {
            command.env_remove(name);
        }
    }
    command
        .envs(env.iter().map(|(name, value)| (*name, value.as_str())))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    command
}

/// Starts the `artifactd` server on 127.0.0.1 (`grpc_port`, `http_port`), configured by
/// `env` (database, blob store, plan, …) on top of its defaults.
pub(crate) fn spawn_artifactd(
    exe: &Path,
    grpc_port: u16,
    http_port: u16,
    env: &[(&str, String)],
) -> anyhow::Result<ChildGuard> {
    let child = artifactd_command(exe, env)
        .env("ARTIFACTD_GRPC_LISTEN", format!("127.0.0.1:{grpc_port}"))
        .env("ARTIFACTD_HTTP_LISTEN", format!("127.0.0.1:{http_port}"))
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    Ok(ChildGuard {
        name: "artifactd",
        child,
    })
}

/// An `artifactd` server child, ready to serve, and the port of its gRPC API.
pub(crate) struct Server {
    child: ChildGuard,
    pub(crate) grpc_port: u16,
}

impl Server {
    /// Starts `artifactd` with `env` on free ports and waits until /readyz answers 200.
    pub(crate) fn start(exe: &Path, env: &[(&str, String)]) -> anyhow::Result<Self> {
        let grpc_port = free_port()?;
        let http_port = free_port()?;
        let mut child = spawn_artifactd(exe, grpc_port, http_port, env)?;
        wait_ready_http(&mut child, http_port)?;
        Ok(Self { child, grpc_port })
    }

    /// Kills the server now and waits for it to be gone.
    pub(crate) fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub(crate) fn stop(self) {
        drop(self.child);
    }
}

/// Runs `artifactd migrate` with `env` and waits for it to finish.
pub(crate) fn migrate_with_artifactd(exe: &Path, env: &[(&str, String)]) -> anyhow::Result<()> {
    let status = artifactd_command(exe, env)
        .arg("migrate")
        .status()
        .with_context(|| format!("running {} migrate", exe.display()))?;
    ensure!(
        status.success(),
        "`artifactd migrate` failed ({status}); see its log above"
    );
    Ok(())
}

pub(crate) fn spawn_bare(port: u16) -> anyhow::Result<ChildGuard> {
    let me = std::env::current_exe().context("locating this executable")?;
    let child = Command::new(&me)
        .args(["serve-bare", "--listen", &format!("127.0.0.1:{port}")])
        // Held open by the guard: the bare server exits when it sees EOF, so it does not
        // outlive this process even if this one is killed outright.
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {} serve-bare", me.display()))?;
    Ok(ChildGuard {
        name: "the bare stream server",
        child,
    })
}

/// Polls `GET /readyz` (plain HTTP/1.0 over a TcpStream) until it answers 200.
pub(crate) fn wait_ready_http(child: &mut ChildGuard, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        child.check_running()?;
        if readyz(port).unwrap_or(false) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{} was not ready after {STARTUP_TIMEOUT:?} (http://127.0.0.1:{port}/readyz)",
            child.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn readyz(port: u16) -> std::io::Result<bool> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    // "HTTP/1.x 200 OK": the status is the second word of the first line.
    let status = response
        .split(|&b| b == b' ')
        .nth(1)
        .unwrap_or_default()
        .to_vec();
    Ok(status == b"200")
}

/// Waits until something accepts connections on `port`.
pub(crate) fn wait_ready_tcp(child: &mut ChildGuard, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        child.check_running()?;
        if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{} was not listening on {addr} after {STARTUP_TIMEOUT:?}",
            child.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
