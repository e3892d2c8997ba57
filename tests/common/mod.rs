//! Test harness: a real server on 127.0.0.1:0 over a real database (a fresh SQLite file, or a
//! freshly created Postgres database that is dropped afterwards) and a real blob directory.
//!
//! Postgres comes from `TEST_DATABASE_URL` (an admin URL), else from the default local
//! server (`postgres://postgres@127.0.0.1:5432/postgres`) when it answers, else from
//! testcontainers when Docker is reachable. Redis likewise: `TEST_REDIS_URL`, else
//! `redis://127.0.0.1:6379` when it answers PING. Without Postgres, each Postgres test says
//! on the terminal (not in captured output) that it was SKIPPED, with the running count for
//! its test binary and how to enable it; `ARTIFACTD_REQUIRE_POSTGRES=1` (and
//! `ARTIFACTD_REQUIRE_REDIS=1`) turn a missing server into a failure instead.

#![allow(dead_code, clippy::unwrap_used)]

pub mod archive;
pub mod billing;
pub mod binary;
pub mod blobs;
pub mod http;

use std::net::SocketAddr;
use std::sync::Arc;

use artifactd::config::Config;
use artifactd::domain::{ManualClock, Timestamp};
use artifactd::pb::v1::artifact_service_client::ArtifactServiceClient;
use artifactd::pb::v1::{self as pb, PushHeader, PushRequest, pull_response, push_request};
use artifactd::server::{self, App};
use sea_orm::{ConnectionTrait, Database};
use tokio::sync::{OnceCell, oneshot};
use tonic::transport::Channel;

/// 2026-11-01T00:00:00Z, where every test clock starts.
pub const TEST_EPOCH_SECONDS: i64 = 1_793_491_200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// One test's own database.
pub struct TestDb {
    pub url: String,
    postgres: Option<(String, String)>, // (admin URL, database name) to drop
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// Migrates this (empty) database up to migration `version` only, as a deployment of an
    /// earlier release left it; the previous-schema tests then write it with that schema.
    pub async fn migrate_to(&self, version: u32) {
        let _ = self.connect_migrated_to(version).await.close().await;
    }

    /// [`Self::migrate_to`], keeping the connection open for the test to write rows under
    /// that schema (close it before a server starts on the database).
    pub async fn connect_migrated_to(&self, version: u32) -> sea_orm::DatabaseConnection {
        use migrations::{Migrator, MigratorTrait};
        let url = if self.postgres.is_some() {
            self.url.clone()
        } else {
            format!("{}?mode=rwc", self.url)
        };
        let conn = sea_orm::Database::connect(url.as_str()).await.unwrap();
        Migrator::up(&conn, Some(version)).await.unwrap();
        conn
    }

    /// How many migrations come before the one named `name`: the version to migrate to for
    /// the schema an earlier release had just before that migration.
    pub fn version_before(name: &str) -> u32 {
        use migrations::{Migrator, MigratorTrait};
        let position = Migrator::migrations()
            .iter()
            .position(|m| m.name() == name)
            .unwrap_or_else(|| panic!("no migration named {name}"));
        u32::try_from(position).unwrap()
    }

    pub async fn create(backend: Backend) -> Option<Self> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("artifactd.db").display());
                Some(Self {
                    url,
                    postgres: None,
                    _dir: Some(dir),
                })
            }
            Backend::Postgres => {
                let admin = postgres_admin_url().await?;
                let name = format!("artifactd_test_{}", uuid::Uuid::new_v4().simple());
                let db = Database::connect(admin.as_str())
                    .await
                    .expect("connect to the Postgres admin database");
                db.execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
                    .await
                    .expect("create the test database");
                let _ = db.close().await;
                let base = admin.split('?').next().unwrap_or(&admin);
                let base = &base[..base.rfind('/').expect("admin URL has a database path")];
                Some(Self {
                    url: format!("{base}/{name}"),
                    postgres: Some((admin, name)),
                    _dir: None,
                })
            }
        }
    }
}

impl TestDb {
    /// A handle on the same database that does not drop it: for a second server on one
    /// database. The owner must outlive it.
    pub fn shared(&self) -> Self {
        Self {
            url: self.url.clone(),
            postgres: None,
            _dir: None,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((admin, name)) = self.postgres.take() else {
            return;
        };
        // Drop runs outside async; a thread with its own runtime can still await.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                if let Ok(db) = Database::connect(admin.as_str()).await {
                    let _ = db
                        .execute_unprepared(&format!(
                            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                        ))
                        .await;
                    let _ = db.close().await;
                }
            });
        })
        .join();
    }
}

/// Where tests look for Postgres and Redis when no variable names one.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Redis for tests: `TEST_REDIS_URL`, else the default local server when it answers PING;
/// required when `ARTIFACTD_REQUIRE_REDIS=1`. Without it, metered tests keep their figures
/// in process (and say so once on the terminal).
pub fn redis_url() -> Option<String> {
    static REDIS: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    REDIS
        .get_or_init(|| {
            if let Ok(url) = std::env::var("TEST_REDIS_URL") {
                return Some(url);
            }
            if redis_answers("127.0.0.1:6379") {
                return Some(DEFAULT_REDIS_URL.to_owned());
            }
            if std::env::var("ARTIFACTD_REQUIRE_REDIS").as_deref() == Ok("1") {
                panic!(
                    "ARTIFACTD_REQUIRE_REDIS=1 but TEST_REDIS_URL is unset and nothing answers \
                     on 127.0.0.1:6379"
                );
            }
            to_terminal(
                "NOTE: no Redis (TEST_REDIS_URL unset, nothing on 127.0.0.1:6379): metered tests \
                 keep their quota figures in process. Start redis-server or set TEST_REDIS_URL \
                 to test them on Redis.",
            );
            None
        })
        .clone()
}

/// Whether a Redis server at `addr` answers PING within half a second.
fn redis_answers(addr: &str) -> bool {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_millis(500);
    let Ok(addr) = addr.parse() else {
        return false;
    };
    let Ok(mut tcp) = std::net::TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(timeout));
    let mut reply = [0u8; 5];
    tcp.write_all(b"PING\r\n").is_ok() && tcp.read_exact(&mut reply).is_ok() && &reply == b"+PONG"
}

/// A line on the terminal even while libtest captures the test's output (it captures
/// `print!`/`eprint!`, not writes to the stderr handle), so a skip is never silent.
fn to_terminal(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Postgres tests skipped in this test binary so far.
static SKIPPED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Says loudly that the running test is skipped for want of Postgres.
fn skipped_for_postgres(why: &str) {
    let n = SKIPPED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    let test = std::thread::current()
        .name()
        .unwrap_or("a Postgres test")
        .to_owned();
    let binary = std::env::args()
        .next()
        .and_then(|path| {
            std::path::Path::new(&path)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    to_terminal(&format!(
        "SKIPPED (not passed) {test} [{binary}]: {why}. {n} Postgres test(s) skipped in this \
         binary so far. Start Postgres on 127.0.0.1:5432 or set TEST_DATABASE_URL to run them; \
         ARTIFACTD_REQUIRE_POSTGRES=1 makes this a failure."
    ));
}

static POSTGRES: OnceCell<Result<String, String>> = OnceCell::const_new();

async fn postgres_admin_url() -> Option<String> {
    let found = POSTGRES
        .get_or_init(|| async {
            let required = std::env::var("ARTIFACTD_REQUIRE_POSTGRES").as_deref() == Ok("1");
            if let Ok(url) = std::env::var("TEST_DATABASE_URL") {
                return Ok(url);
            }
            if postgres_answers(DEFAULT_POSTGRES_URL).await {
                return Ok(DEFAULT_POSTGRES_URL.to_owned());
            }
            match start_postgres_container().await {
                Ok(url) => Ok(url),
                Err(why) if required => {
                    panic!("ARTIFACTD_REQUIRE_POSTGRES=1 but no Postgres: {why}")
                }
                Err(why) => Err(format!(
                    "no Postgres (TEST_DATABASE_URL unset, nothing on 127.0.0.1:5432, and \
                     testcontainers could not start one: {why})"
                )),
            }
        })
        .await;
    match found {
        Ok(url) => Some(url.clone()),
        Err(why) => {
            skipped_for_postgres(why);
            None
        }
    }
}

/// Whether Postgres at `url` accepts a connection within a few seconds.
async fn postgres_answers(url: &str) -> bool {
    let mut options = sea_orm::ConnectOptions::new(url.to_owned());
    options
        .connect_timeout(std::time::Duration::from_secs(3))
        .sqlx_logging(false);
    match tokio::time::timeout(
        std::time::Duration::from_secs(5),
        Database::connect(options),
    )
    .await
    {
        Ok(Ok(db)) => {
            let _ = db.close().await;
            true
        }
        _ => false,
    }
}

async fn start_postgres_container() -> Result<String, String> {
    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::AsyncRunner;
    use testcontainers::{GenericImage, ImageExt};

    let container = GenericImage::new("postgres", "16-alpine")
        .with_exposed_port(5432.tcp())
        .with_wait_for(WaitFor::message_on_stderr(
            "database system is ready to accept connections",
        ))
        .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
        .start()
        .await
        .map_err(|e| e.to_string())?;
    let port = container
        .get_host_port_ipv4(5432)
        .await
        .map_err(|e| e.to_string())?;
    // The container lives as long as the test binary; testcontainers' reaper removes it.
    std::mem::forget(container);
    Ok(format!("postgres://postgres@127.0.0.1:{port}/postgres"))
}

/// A running server and what it stands on.
pub struct TestServer {
    pub config: Config,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub clock: ManualClock,
    pub app: App,
    pub blob_dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub db: TestDb,
}

impl TestServer {
    /// Starts a server on `backend`, or returns `None` (after saying why) when that backend
    /// is not available here.
    pub async fn start(backend: Backend) -> Option<Self> {
        Self::start_with(backend, |_| {}).await
    }

    pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Option<Self> {
        let db = TestDb::create(backend).await?;
        Some(Self::start_on(db, tweak).await)
    }

    /// Starts a server on an existing database (one prepared by the test, or another
    /// server's, through [`TestDb::shared`]), with a blob directory of its own.
    pub async fn start_on(db: TestDb, tweak: impl FnOnce(&mut Config)) -> Self {
        // Server logs go to the test's captured output (shown when it fails).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "artifactd=info".into()),
            )
            .with_test_writer()
            .try_init();
        let blob_dir = tempfile::tempdir().expect("blob dir");
        let mut config =
            Config::with_stores(&db.url, &format!("file://{}", blob_dir.path().display()));
        // Durability is not under test here, and fsync per blob slows thousands of pushes.
        config.blob_fsync = false;
        // `TEST_BLOB_URL=s3://bucket/prefix` (with the AWS_* variables): blobs go to that
        // object store instead, under a prefix of this server's own.
        if let Ok(url) = std::env::var("TEST_BLOB_URL") {
            config.blob_url = format!(
                "{}/{}",
                url.trim_end_matches('/'),
                uuid::Uuid::new_v4().simple()
            );
        }
        tweak(&mut config);
        let clock = ManualClock::new(Timestamp::from_seconds(TEST_EPOCH_SECONDS));
        let app = App::build(&config, Arc::new(clock.clone()))
            .await
            .expect("build the app");
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let http = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let grpc_addr = grpc.local_addr().expect("addr");
        let http_addr = http.local_addr().expect("addr");
        let (shutdown, stop) = oneshot::channel::<()>();
        let served = app.clone();
        let task = tokio::spawn(async move {
            server::serve(served, grpc, http, async {
                let _ = stop.await;
            })
            .await
            .expect("serve");
        });
        Self {
            config,
            grpc_addr,
            http_addr,
            clock,
            app,
            blob_dir,
            shutdown: Some(shutdown),
            task: Some(task),
            db,
        }
    }

    /// A server whose hot quota figures live in Redis when `TEST_REDIS_URL` is set (with a
    /// key prefix of its own), in process otherwise.
    pub async fn start_metered(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Option<Self> {
        let redis = redis_url();
        Self::start_with(backend, |config| {
            if let Some(url) = redis {
                config.redis_url = Some(url);
                config.redis_prefix = format!("test-{}:", uuid::Uuid::new_v4().simple());
                // A loaded CI machine once held a Redis call past the default 500 ms (see
                // replicas.rs); tests of a Redis that stops answering set their own.
                config.redis_timeout = std::time::Duration::from_secs(5);
            }
            tweak(config);
        })
        .await
    }

    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc_addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn client(&self) -> ArtifactServiceClient<Channel> {
        ArtifactServiceClient::new(self.channel().await)
    }

    /// Tells the server to shut down (as SIGTERM would) without waiting for it.
    pub fn trigger_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Stops the server and waits for it to drain, keeping its database (and this handle)
    /// for a look at what it left behind.
    pub async fn shut_down(&mut self) {
        self.trigger_shutdown();
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }

    /// Stops the server and waits for it to drain.
    pub async fn stop(mut self) {
        self.trigger_shutdown();
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }

    /// Files left under the blob store's temporary-upload prefix.
    pub async fn leftover_uploads(&self) -> Vec<String> {
        self.app
            .artifacts
            .blobs()
            .list_uploads()
            .await
            .expect("list uploads")
    }
}

pub fn job(project: &str, job: &str) -> pb::Scope {
    pb::Scope {
        project_id: project.into(),
        kind: pb::ScopeKind::Job as i32,
        id: job.into(),
    }
}

pub fn workflow(project: &str, workflow: &str) -> pb::Scope {
    pb::Scope {
        project_id: project.into(),
        kind: pb::ScopeKind::Workflow as i32,
        id: workflow.into(),
    }
}

pub fn project(project: &str) -> pb::Scope {
    pb::Scope {
        project_id: project.into(),
        kind: pb::ScopeKind::Project as i32,
        id: String::new(),
    }
}

pub fn header(scope: pb::Scope, path: &str) -> PushHeader {
    PushHeader {
        scope: Some(scope),
        path: path.into(),
        ..Default::default()
    }
}

/// The messages of a push: the header, then `data` in `chunk`-byte chunks.
pub fn push_messages(header: PushHeader, data: &[u8], chunk: usize) -> Vec<PushRequest> {
    let mut messages = vec![PushRequest {
        msg: Some(push_request::Msg::Header(header)),
    }];
    messages.extend(data.chunks(chunk.max(1)).map(|c| PushRequest {
        msg: Some(push_request::Msg::Chunk(bytes::Bytes::copy_from_slice(c))),
    }));
    messages
}

pub async fn push(
    client: &mut ArtifactServiceClient<Channel>,
    header: PushHeader,
    data: &[u8],
) -> Result<pb::PushResponse, tonic::Status> {
    let messages = push_messages(header, data, 256 * 1024);
    client
        .push(tokio_stream::iter(messages))
        .await
        .map(tonic::Response::into_inner)
}

pub struct Pulled {
    pub artifact: pb::Artifact,
    pub data: Vec<u8>,
    pub chunk_sizes: Vec<usize>,
}

pub async fn pull(
    client: &mut ArtifactServiceClient<Channel>,
    scope: pb::Scope,
    path: &str,
    offset: i64,
    length: i64,
) -> Result<Pulled, tonic::Status> {
    let mut stream = client
        .pull(pb::PullRequest {
            scope: Some(scope),
            path: path.into(),
            offset,
            length,
        })
        .await?
        .into_inner();
    let first = stream.message().await?.expect("a first message");
    let Some(pull_response::Msg::Artifact(artifact)) = first.msg else {
        panic!("the first Pull message must be the artifact, got {first:?}");
    };
    let mut data = Vec::new();
    let mut chunk_sizes = Vec::new();
    while let Some(message) = stream.message().await? {
        match message.msg {
            Some(pull_response::Msg::Chunk(chunk)) => {
                chunk_sizes.push(chunk.len());
                data.extend_from_slice(&chunk);
            }
            other => panic!("expected a chunk, got {other:?}"),
        }
    }
    Ok(Pulled {
        artifact,
        data,
        chunk_sizes,
    })
}

pub async fn stat(
    client: &mut ArtifactServiceClient<Channel>,
    scope: pb::Scope,
    path: &str,
) -> Result<pb::Artifact, tonic::Status> {
    client
        .stat(pb::StatRequest {
            scope: Some(scope),
            path: path.into(),
        })
        .await
        .map(tonic::Response::into_inner)
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

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Runs each named scenario once on SQLite and once on Postgres, as `sqlite::name` and
/// `postgres::name`. A scenario is `async fn name(backend: Backend)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await;
                }
            )*
        }
    };
}

/// `GET path` over HTTP/1.0 on the server's HTTP port: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample `name{labels}` in a Prometheus text scrape (labels given in any
/// order must be exactly the sample's), or `None` when there is no such sample.
pub fn sample(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    wanted.sort();
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, mut have) = match series.split_once('{') {
                Some((metric, rest)) => (
                    metric,
                    rest.trim_end_matches('}')
                        .split(',')
                        .filter(|l| !l.is_empty())
                        .map(str::to_owned)
                        .collect::<Vec<_>>(),
                ),
                None => (series, Vec::new()),
            };
            have.sort();
            (metric == name && have == wanted).then(|| value.parse().ok())?
        })
}

/// Scrapes `/metrics` until the sample `name{labels}` (0 when absent) satisfies `ready`, and
/// returns it; panics after ten seconds. For tests that must know the server has reached a
/// state (a call in flight, a reservation held) before they act, without guessing a sleep.
pub async fn await_sample(
    http: SocketAddr,
    name: &str,
    labels: &[(&str, &str)],
    ready: impl Fn(f64) -> bool,
) -> f64 {
    let mut value = 0.0;
    for _ in 0..400 {
        value = sample(&http_get(http, "/metrics").await.1, name, labels).unwrap_or(0.0);
        if ready(value) {
            return value;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("{name}{labels:?} stayed at {value}");
}
