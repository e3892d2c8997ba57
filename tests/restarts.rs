//! Restarts of what the service stands on, under the real binary: a private Redis (never
//! the shared one) killed and started again while pushes hold reservations in it, and a
//! private Postgres cluster stopped and started again under load. While a dependency is
//! down the calls that need it answer UNAVAILABLE (and nothing else); when it is back the
//! same process carries on, with nothing lost or counted twice.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use artifactd::pb::v1::{self as pb, PushRequest, push_request};
use common::binary::{BinaryServer, local_stores};
use common::{await_sample, content, header, job, pull, push, push_messages, stat};
use tonic::Code;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private redis-server on `port`, its append-only file in `dir` (fsynced on every write,
/// so a kill loses nothing), killed when dropped.
struct PrivateRedis(Child);

impl PrivateRedis {
    fn start(port: u16, dir: &Path) -> Self {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server; .ci/run installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self(child)
    }

    fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A push whose header (declaring `size`) and first chunk are sent, holding its reservation
/// until [`finish`] sends the rest.
async fn push_in_flight(
    server: &BinaryServer,
    path: &str,
    data: &[u8],
) -> (
    tokio::sync::mpsc::Sender<PushRequest>,
    tokio::task::JoinHandle<Result<pb::PushResponse, tonic::Status>>,
) {
    let mut client =
        pb::artifact_service_client::ArtifactServiceClient::new(server.channel().await);
    let mut h = header(job("r", "j"), path);
    h.expected_size = Some(data.len() as i64);
    let held = reservations(server).await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut messages = push_messages(h, data, data.len() / 2).into_iter();
    tx.send(messages.next().unwrap()).await.unwrap();
    tx.send(messages.next().unwrap()).await.unwrap();
    let call = tokio::spawn(async move {
        client
            .push(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(tonic::Response::into_inner)
    });
    // The reservation is taken before the first chunk is read: wait until this one is held.
    await_sample(
        server.http,
        "artifactd_quota_reservations_outstanding",
        &[],
        |n| n > held,
    )
    .await;
    (tx, call)
}

async fn reservations(server: &BinaryServer) -> f64 {
    await_sample(
        server.http,
        "artifactd_quota_reservations_outstanding",
        &[],
        |_| true,
    )
    .await
}

async fn finish(
    tx: tokio::sync::mpsc::Sender<PushRequest>,
    call: tokio::task::JoinHandle<Result<pb::PushResponse, tonic::Status>>,
    data: &[u8],
) -> Result<pb::PushResponse, tonic::Status> {
    let half = data.len() / 2;
    tx.send(PushRequest {
        msg: Some(push_request::Msg::Chunk(data[half..].to_vec().into())),
    })
    .await
    .unwrap();
    drop(tx);
    call.await.unwrap()
}

fn declared(path: &str, data: &[u8]) -> pb::PushHeader {
    let mut h = header(job("r", "j"), path);
    h.expected_size = Some(data.len() as i64);
    h
}

/// Redis is killed (SIGKILL) while two pushes hold reservations in it, and started again.
/// While it is down, pushes and pulls (which reserve) answer UNAVAILABLE and Stat still
/// answers; a push in flight finishes and commits. Once it is back the same process serves
/// again within seconds, and a storage cap of ten artifacts' worth admits exactly ten: the
/// reservation that outlived the outage still counts, and the one settled during it is
/// neither lost from the figure nor counted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarts_mid_run_and_nothing_is_lost_or_counted_twice() {
    const SIZE: usize = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let redis_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let redis = PrivateRedis::start(port, redis_dir.path());
    let mut env = local_stores(dir.path());
    env.push(("REDIS_URL", format!("redis://127.0.0.1:{port}")));
    let server = BinaryServer::start(&env).await;
    let mut client =
        pb::artifact_service_client::ArtifactServiceClient::new(server.channel().await);
    let mut controls =
        pb::usage_control_service_client::UsageControlServiceClient::new(server.channel().await);
    controls
        .update_usage_controls(pb::UpdateUsageControlsRequest {
            project_id: "r".into(),
            controls: Some(pb::UsageControls {
                storage_cap_bytes: Some(10 * SIZE as i64),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["storage_cap_bytes".into()],
            }),
            apply_to_existing: false,
        })
        .await
        .unwrap();
    let data = |i: u64| content(SIZE, 1000 + i);
    for i in 0..3 {
        push(
            &mut client,
            declared(&format!("{i}.bin"), &data(i)),
            &data(i),
        )
        .await
        .unwrap();
    }
    // Two reservations in Redis: one settled while it is down, one after it is back.
    let (during_tx, during) = push_in_flight(&server, "during.bin", &data(100)).await;
    let (after_tx, after) = push_in_flight(&server, "after.bin", &data(101)).await;

    redis.kill();
    let err = push(&mut client, declared("down.bin", &data(50)), &data(50))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let err = pull(&mut client, job("r", "j"), "0.bin", 0, 0)
        .await
        .err()
        .expect("a pull reserves egress");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(
        stat(&mut client, job("r", "j"), "0.bin")
            .await
            .unwrap()
            .size,
        SIZE as i64,
        "what needs no reservation still answers"
    );
    finish(during_tx, during, &data(100)).await.unwrap();

    let redis = PrivateRedis::start(port, redis_dir.path());
    let back = Instant::now();
    let mut codes = Vec::new();
    loop {
        match push(&mut client, declared("back.bin", &data(60)), &data(60)).await {
            Ok(_) => break,
            Err(status) => codes.push(status.code()),
        }
        assert!(back.elapsed() < Duration::from_secs(10), "{codes:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(codes.iter().all(|c| *c == Code::Unavailable), "{codes:?}");
    finish(after_tx, after, &data(101)).await.unwrap();
    // Committed: 0..3, during, back, after = 6. Exactly four more fit under the cap.
    let mut committed = 6;
    for i in 200..210 {
        match push(
            &mut client,
            declared(&format!("{i}.bin"), &data(i)),
            &data(i),
        )
        .await
        {
            Ok(_) => committed += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                break;
            }
        }
    }
    assert_eq!(committed, 10, "the cap admits exactly ten artifacts' worth");
    let pulled = pull(&mut client, job("r", "j"), "during.bin", 0, 0)
        .await
        .unwrap();
    assert_eq!(pulled.data, data(100));
    drop(redis);
}

/// A private Postgres cluster in a temporary directory, run as the `postgres` user when
/// this test runs as root (initdb refuses root).
struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PrivatePostgres {
    fn bin_dir() -> Option<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .collect();
        found.sort();
        found.pop()
    }

    fn run(&self, program: &str, args: &[&str]) {
        let status = as_postgres(&self.bin.join(program), args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "{program} {args:?}: {status:?}");
    }

    fn start_new() -> Option<Self> {
        let bin = Self::bin_dir()?;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let port = free_port();
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status();
        let pg = Self {
            bin,
            data,
            port,
            _dir: dir,
        };
        let data = pg.data.to_string_lossy().into_owned();
        pg.run(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "-N"],
        );
        pg.start();
        Some(pg)
    }

    fn start(&self) {
        let data = self.data.to_string_lossy().into_owned();
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port, data
        );
        self.run("pg_ctl", &["-D", &data, "-o", &options, "-w", "start"]);
    }

    /// An immediate stop: every connection is cut, as in a crash.
    fn stop(&self) {
        let data = self.data.to_string_lossy().into_owned();
        self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.data.to_string_lossy().into_owned();
        let _ = as_postgres(
            &self.bin.join("pg_ctl"),
            &["-D", &data, "-m", "immediate", "stop"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    }
}

fn as_postgres(program: &Path, args: &[&str]) -> Command {
    // SAFETY-free check of the effective user: root has uid 0 in /proc/self/status.
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if root {
        let mut command = Command::new("runuser");
        command
            .args(["-u", "postgres", "--"])
            .arg(program)
            .args(args);
        command
    } else {
        let mut command = Command::new(program);
        command.args(args);
        command
    }
}

/// Postgres is stopped (immediate: every connection cut) under a steady stream of pushes
/// and stats, then started again. Every call answers OK or UNAVAILABLE — no other code —
/// UNAVAILABLE only from the stop until it is back, and the same server process then
/// serves again; every push that answered OK pulls back byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_under_load_and_the_server_recovers() {
    let Some(pg) = PrivatePostgres::start_new() else {
        assert_ne!(
            std::env::var("ARTIFACTD_REQUIRE_POSTGRES").as_deref(),
            Ok("1"),
            "ARTIFACTD_REQUIRE_POSTGRES=1 but no /usr/lib/postgresql/*/bin/initdb"
        );
        eprintln!("skipping: no Postgres server binaries under /usr/lib/postgresql");
        return;
    };
    let blobs = tempfile::tempdir().unwrap();
    let server = BinaryServer::start(&[
        ("DATABASE_URL", pg.url()),
        (
            "ARTIFACTD_BLOB_URL",
            format!("file://{}", blobs.path().display()),
        ),
    ])
    .await;
    let channel = server.channel().await;
    let mut client = pb::artifact_service_client::ArtifactServiceClient::new(channel.clone());
    push(
        &mut client,
        header(job("pg", "j"), "0.bin"),
        &content(30_000, 0),
    )
    .await
    .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Every call: (when it started, when it ended, its code).
    type Log = Vec<(Instant, Instant, Code)>;
    let log = std::sync::Arc::new(std::sync::Mutex::new(Log::new()));
    let pushed = std::sync::Arc::new(std::sync::Mutex::new(vec![0u64]));
    let mut load = Vec::new();
    for worker in 0..2u64 {
        let (channel, stop, log, pushed) =
            (channel.clone(), stop.clone(), log.clone(), pushed.clone());
        load.push(tokio::spawn(async move {
            let mut client = pb::artifact_service_client::ArtifactServiceClient::new(channel);
            let mut i = worker + 1;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let data = content(30_000, i);
                let begun = Instant::now();
                let code = match push(
                    &mut client,
                    header(job("pg", "j"), &format!("{i}.bin")),
                    &data,
                )
                .await
                {
                    Ok(_) => {
                        pushed.lock().unwrap().push(i);
                        Code::Ok
                    }
                    Err(status) => status.code(),
                };
                log.lock().unwrap().push((begun, Instant::now(), code));
                let begun = Instant::now();
                let code = match stat(&mut client, job("pg", "j"), "0.bin").await {
                    Ok(_) => Code::Ok,
                    Err(status) => status.code(),
                };
                log.lock().unwrap().push((begun, Instant::now(), code));
                i += 2;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stopping = Instant::now();
    tokio::task::block_in_place(|| pg.stop());
    let stopped = Instant::now();
    // Longer than the 5 s a call waits for a connection, so calls end during the outage.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let starting = Instant::now();
    tokio::task::block_in_place(|| pg.start());
    let started = Instant::now();
    // Recovery: wait for an OK push after the restart, then a little more load.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let recovered = log
            .lock()
            .unwrap()
            .iter()
            .any(|(begun, _, code)| *begun > started && *code == Code::Ok);
        if recovered {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no call succeeded after Postgres came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for worker in load {
        worker.await.unwrap();
    }
    let log = log.lock().unwrap().clone();
    let down: Vec<_> = log
        .iter()
        .filter(|(_, ended, _)| *ended > stopped + Duration::from_millis(50) && *ended < starting)
        .collect();
    let timeline: Vec<_> = log
        .iter()
        .map(|(begun, ended, code)| {
            (
                begun.saturating_duration_since(stopping).as_millis(),
                ended.saturating_duration_since(stopping).as_millis(),
                *code,
            )
        })
        .collect();
    assert!(
        !down.is_empty(),
        "calls ended during the outage: stopped at {:?}, started at {:?}..{:?}: {timeline:?}",
        stopped - stopping,
        starting - stopping,
        started - stopping
    );
    assert!(
        down.iter().all(|(_, _, code)| *code == Code::Unavailable),
        "only UNAVAILABLE while Postgres is down: {timeline:?}"
    );
    for (begun, ended, code) in &log {
        assert!(
            matches!(code, Code::Ok | Code::Unavailable),
            "{code:?} ending {:?} after the stop began",
            ended.saturating_duration_since(stopping)
        );
        if *ended < stopping {
            assert_eq!(*code, Code::Ok, "before the outage");
        }
        if *begun > started + Duration::from_secs(5) {
            assert_eq!(*code, Code::Ok, "recovered");
        }
    }
    let pushed = pushed.lock().unwrap().clone();
    assert!(pushed.len() > 10);
    for i in pushed {
        let pulled = pull(&mut client, job("pg", "j"), &format!("{i}.bin"), 0, 0)
            .await
            .unwrap();
        assert_eq!(pulled.data, content(30_000, i), "{i}.bin");
    }
}
