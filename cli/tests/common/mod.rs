//! Harness for the `artifact` binary: a real artifactd server on 127.0.0.1:0 (in process, on
//! a SQLite file and a blob directory of its own, with a manual clock), the real binary run
//! as a child process in a scratch directory with a clean environment, and a TCP proxy the
//! test controls that cuts a connection mid-stream.

#![allow(dead_code, clippy::unwrap_used)]

pub mod process;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use artifactd::config::Config;
use artifactd::domain::{ManualClock, Timestamp};
use artifactd::server::{self, App};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, oneshot};

/// 2026-11-01T00:00:00Z, where the server's clock starts.
pub const EPOCH_SECONDS: i64 = 1_793_491_200;
pub const SECRET: &str = "test-secret-that-is-at-least-32-bytes-long";

pub struct Server {
    pub addr: SocketAddr,
    /// The HTTP port (probes, downloads, the usage export).
    pub http: SocketAddr,
    pub clock: ManualClock,
    pub config: Config,
    pub app: App,
    dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::with_stores(
            &format!("sqlite://{}", dir.path().join("db.sqlite").display()),
            &format!("file://{}", dir.path().join("blobs").display()),
        );
        config.blob_fsync = false;
        tweak(&mut config);
        let clock = ManualClock::new(Timestamp::from_seconds(EPOCH_SECONDS));
        let app = App::build(&config, Arc::new(clock.clone())).await.unwrap();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let http_addr = http.local_addr().unwrap();
        let (shutdown, stop) = oneshot::channel::<()>();
        let served = app.clone();
        let task = tokio::spawn(async move {
            server::serve(served, grpc, http, async {
                let _ = stop.await;
            })
            .await
            .unwrap();
        });
        Self {
            addr,
            http: http_addr,
            clock,
            config,
            app,
            dir,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

/// A token signed with [`SECRET`].
pub fn token(role: &str, project: Option<&str>, job: Option<&str>) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    artifactd::auth::Authenticator::shared_secret(SECRET.as_bytes())
        .unwrap()
        .issue(&artifactd::auth::Claims {
            sub: format!("test-{role}"),
            role: role.into(),
            project_id: project.map(Into::into),
            workflow_id: job.map(|_| "w1".into()),
            job_id: job.map(Into::into),
            exp: now + 3600,
            iat: Some(now),
            ..Default::default()
        })
        .unwrap()
}

/// A scratch directory to run `artifact` in, against `url`, as job `j1` of workflow `w1`
/// of project `p1` (through Semaphore's variables unless the test says otherwise).
pub struct Cli {
    pub url: String,
    pub dir: tempfile::TempDir,
    pub env: Vec<(String, String)>,
}

impl Cli {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            dir: tempfile::tempdir().unwrap(),
            env: vec![
                ("SEMAPHORE_PROJECT_ID".into(), "p1".into()),
                ("SEMAPHORE_WORKFLOW_ID".into(), "w1".into()),
                ("SEMAPHORE_JOB_ID".into(), "j1".into()),
                ("ARTIFACTD_RETRIES".into(), "3".into()),
            ],
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, data: &[u8], mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, data).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    pub fn read(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.path(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
    }

    pub fn set(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
    }

    pub fn unset(&mut self, key: &str) {
        self.env.retain(|(k, _)| k != key);
    }

    /// Runs `artifact ARGS` in the scratch directory.
    pub async fn run(&self, args: &[&str]) -> Run {
        self.run_with_stdin(args, None).await
    }

    pub async fn run_with_stdin(&self, args: &[&str], stdin: Option<Vec<u8>>) -> Run {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_artifact"));
        command.current_dir(self.dir.path()).args(args);
        for (key, _) in std::env::vars() {
            if key.starts_with("ARTIFACTD_") || key.starts_with("SEMAPHORE_") {
                command.env_remove(key);
            }
        }
        command.env("ARTIFACTD_URL", &self.url);
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let label = format!("artifact {}", args.join(" "));
        let output = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            use std::process::Stdio;
            command
                .stdin(if stdin.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = command.spawn().unwrap();
            if let Some(data) = stdin {
                let mut pipe = child.stdin.take().unwrap();
                std::thread::spawn(move || {
                    let _ = pipe.write_all(&data);
                });
            }
            child.wait_with_output().unwrap()
        })
        .await
        .unwrap();
        Run { label, output }
    }

    /// `artifact ARGS`, which must succeed; its stdout.
    pub async fn ok(&self, args: &[&str]) -> String {
        let run = self.run(args).await;
        run.assert_code(0);
        run.stdout()
    }

    /// `artifact ARGS --json`, which must succeed; its stdout parsed.
    pub async fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.push("--json");
        serde_json::from_str(&self.ok(&args).await).unwrap()
    }

    /// The sorted remote paths of a scope.
    pub async fn remote_paths(&self, scope: &str) -> Vec<String> {
        let listed = self.json(&["list", scope]).await;
        let mut paths: Vec<String> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["path"].as_str().unwrap().to_owned())
            .collect();
        paths.sort();
        paths
    }
}

pub struct Run {
    pub label: String,
    pub output: Output,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.output.status.code().unwrap_or(-1)
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    pub fn assert_code(&self, code: i32) {
        assert_eq!(
            self.code(),
            code,
            "{}\nstdout: {}\nstderr: {}",
            self.label,
            self.stdout(),
            self.stderr()
        );
    }

    /// Asserts the exit code and that stderr is exactly `artifact: <message>` on one line.
    pub fn assert_error(&self, code: i32, message: &str) {
        self.assert_code(code);
        assert_eq!(
            self.stderr(),
            format!("artifact: {message}\n"),
            "{}",
            self.label
        );
    }
}

/// Every file under `root` as (relative path, content, mode & 0o7777), links as
/// (path, target, 0o120000).
pub fn tree(root: &Path) -> Vec<(String, Vec<u8>, u32)> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                out.push((rel, target.as_os_str().as_bytes().to_vec(), 0o120_000));
            } else if meta.is_dir() {
                stack.push(path);
            } else {
                out.push((
                    rel,
                    std::fs::read(&path).unwrap(),
                    meta.permissions().mode() & 0o7777,
                ));
            }
        }
    }
    out.sort();
    out
}

/// Deterministic pseudo-random bytes (xorshift), different per seed.
pub fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Which way a [`CutProxy`] counts the bytes it cuts after.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Server to client (a download).
    Down,
    /// Client to server (an upload).
    Up,
}

/// A TCP proxy in front of `target` that cuts the first connection (both directions, at
/// once) after it has forwarded `cut_after` bytes in `direction`; later connections pass
/// through untouched.
pub struct CutProxy {
    pub addr: SocketAddr,
    /// Connections cut so far.
    pub cuts: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    pub async fn start(target: SocketAddr, direction: Direction, cut_after: u64) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cuts = Arc::new(AtomicUsize::new(0));
        let counted = cuts.clone();
        let task = tokio::spawn(async move {
            let mut first = true;
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(target).await.unwrap();
                let limit = first.then_some((direction, cut_after));
                first = false;
                tokio::spawn(relay(client, server, limit, counted.clone()));
            }
        });
        Self { addr, cuts, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    limit: Option<(Direction, u64)>,
    cuts: Arc<AtomicUsize>,
) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let down = limit.filter(|(d, _)| *d == Direction::Down).map(|(_, n)| n);
    let up = limit.filter(|(d, _)| *d == Direction::Up).map(|(_, n)| n);
    // When either direction ends (or is cut) both sockets are dropped, so both ends see
    // the connection die.
    let cut = tokio::select! {
        cut = pump(server_read, client_write, down) => cut,
        cut = pump(client_read, server_write, up) => cut,
    };
    if cut {
        cuts.fetch_add(1, Ordering::SeqCst);
    }
}

/// Copies `from` to `to`, up to `limit` bytes when there is one; true if it stopped there.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    limit: Option<u64>,
) -> bool {
    let mut sent = 0u64;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        if let Some(limit) = limit
            && sent + n as u64 >= limit
        {
            let keep = usize::try_from(limit - sent).unwrap();
            let _ = to.write_all(&buffer[..keep]).await;
            return true;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return false;
        }
        sent += n as u64;
    }
}

/// A TCP proxy in front of `target` that, on its first connection, forwards `hold_after`
/// bytes in `direction` and then holds that direction (forwards nothing more of it) until
/// [`HoldProxy::release`]; then it passes on whatever comes, including the end of a killed
/// server's connection. It pins a transfer mid-way while the test kills the server. Later
/// connections pass through; one the target refuses (a server restarting) is dropped, so
/// the client sees it reset.
pub struct HoldProxy {
    pub addr: SocketAddr,
    held: Arc<Notify>,
    release: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

struct Hold {
    after: u64,
    held: Arc<Notify>,
    release: Arc<Notify>,
}

impl HoldProxy {
    pub async fn start(target: SocketAddr, direction: Direction, hold_after: u64) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (held, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let (h, r) = (held.clone(), release.clone());
        let task = tokio::spawn(async move {
            let mut first = true;
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let hold = first.then(|| Hold {
                    after: hold_after,
                    held: h.clone(),
                    release: r.clone(),
                });
                first = false;
                tokio::spawn(relay_holding(client, server, direction, hold));
            }
        });
        Self {
            addr,
            held,
            release,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until the first connection has forwarded its `hold_after` bytes and holds.
    pub async fn held(&self) {
        self.held.notified().await;
    }

    /// Lets the held direction flow again.
    pub fn release(&self) {
        self.release.notify_one();
    }
}

impl Drop for HoldProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay_holding(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    direction: Direction,
    hold: Option<Hold>,
) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let (down, up) = match direction {
        Direction::Down => (hold, None),
        Direction::Up => (None, hold),
    };
    // When either direction ends, both sockets are dropped (both ends see it die).
    tokio::select! {
        () = pump_holding(server_read, client_write, down) => {}
        () = pump_holding(client_read, server_write, up) => {}
    }
}

async fn pump_holding(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut hold: Option<Hold>,
) {
    let mut sent = 0u64;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut start = 0;
        if let Some(h) = hold.take_if(|h| sent + n as u64 >= h.after) {
            start = usize::try_from(h.after - sent).unwrap();
            if to.write_all(&buffer[..start]).await.is_err() {
                return;
            }
            h.held.notify_one();
            h.release.notified().await;
        }
        if to.write_all(&buffer[start..n]).await.is_err() {
            return;
        }
        sent += n as u64;
    }
}

/// `DATABASE_URL` and `ARTIFACTD_BLOB_URL` for a SQLite file and a blob directory in `dir`.
pub fn local_stores(dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        (
            "DATABASE_URL",
            format!("sqlite://{}", dir.join("db.sqlite").display()),
        ),
        (
            "ARTIFACTD_BLOB_URL",
            format!("file://{}", dir.join("blobs").display()),
        ),
    ]
}

/// The main crate's throwaway test CA and the localhost / 127.0.0.1 certificate it issued
/// (tests/fixtures; valid until 2036).
pub fn tls_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}
