#![allow(clippy::unwrap_used)]
//! Faults and hostile load against the real server: blobs removed, truncated or corrupted
//! behind the server's back (DATA_LOSS, quarantine), the global stream bound, the Pull idle
//! timeout, and a flood of stalled and trickling streams that must not starve other clients
//! (that one runs the real binary and measures its memory; it takes about half a minute).

mod common;

use std::time::{Duration, Instant};

use artifactd::pb::v1::artifact_service_client::ArtifactServiceClient;
use artifactd::pb::v1::{self as pb, PushRequest, pull_response, push_request};
use common::*;
use tonic::Code;
use tonic::transport::Channel;

on_both_backends!(
    pull_of_a_removed_blob_is_data_loss,
    pull_of_a_truncated_blob_is_data_loss,
    damaged_blobs_are_quarantined_and_replaced_not_reused,
);

const MIB: usize = 1024 * 1024;

/// A pull read to its end: the bytes received and how the stream ended.
async fn pull_all(
    client: &mut ArtifactServiceClient<Channel>,
    path: &str,
    offset: i64,
) -> (Vec<u8>, Result<(), tonic::Status>) {
    let mut data = Vec::new();
    let request = pb::PullRequest {
        scope: Some(job("p", "j")),
        path: path.into(),
        offset,
        length: 0,
    };
    let mut stream = match client.pull(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return (data, Err(status)),
    };
    loop {
        match stream.message().await {
            Ok(Some(pb::PullResponse {
                msg: Some(pull_response::Msg::Chunk(chunk)),
            })) => data.extend_from_slice(&chunk),
            Ok(Some(_)) => {}
            Ok(None) => return (data, Ok(())),
            Err(status) => return (data, Err(status)),
        }
    }
}

fn code(result: &Result<(), tonic::Status>) -> Code {
    match result {
        Ok(()) => Code::Ok,
        Err(status) => status.code(),
    }
}

async fn pull_of_a_removed_blob_is_data_loss(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut client = server.client().await;
    let data = content(MIB, 1);
    push(&mut client, header(job("p", "j"), "gone.bin"), &data)
        .await
        .unwrap();
    server.remove_blob(&sha256_hex(&data)).await;
    for offset in [0, 1000] {
        let (received, end) = pull_all(&mut client, "gone.bin", offset).await;
        assert_eq!(code(&end), Code::DataLoss, "{end:?}");
        assert!(received.is_empty());
        let message = end.unwrap_err().message().to_owned();
        assert!(
            !message.contains(&sha256_hex(&data)) && !message.contains("blobs/"),
            "no internals in the message: {message}"
        );
    }
    server.stop().await;
}

async fn pull_of_a_truncated_blob_is_data_loss(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut client = server.client().await;
    // Truncated before the pull: refused before any byte is sent.
    let data = content(MIB, 2);
    push(&mut client, header(job("p", "j"), "short.bin"), &data)
        .await
        .unwrap();
    server
        .truncate_blob(&sha256_hex(&data), MIB as u64 / 2)
        .await;
    let (received, end) = pull_all(&mut client, "short.bin", 0).await;
    assert_eq!(code(&end), Code::DataLoss, "{end:?}");
    assert!(received.is_empty());
    // A range inside what is left is still served: the file is not read past it.
    let mut ranged = client
        .pull(pb::PullRequest {
            scope: Some(job("p", "j")),
            path: "short.bin".into(),
            offset: 0,
            length: 1000,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(message) = ranged.message().await.unwrap() {
        if let Some(pull_response::Msg::Chunk(chunk)) = message.msg {
            got.extend_from_slice(&chunk);
        }
    }
    assert!(got == data[..1000]);

    // Truncated while a pull is under way: whatever was sent, the stream ends DATA_LOSS. An
    // object store replaces an object whole, and a GET under way keeps reading the one it
    // started on (S3's semantics; moto's too): there the pull ends OK with every old byte,
    // which are the artifact's.
    let data = content(16 * MIB, 3);
    push(&mut client, header(job("p", "j"), "torn.bin"), &data)
        .await
        .unwrap();
    let mut stream = client
        .pull(pb::PullRequest {
            scope: Some(job("p", "j")),
            path: "torn.bin".into(),
            offset: 0,
            length: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut received = Vec::new();
    // The artifact, then a first chunk.
    for _ in 0..2 {
        let message = stream.message().await.unwrap().unwrap();
        if let Some(pull_response::Msg::Chunk(chunk)) = message.msg {
            received.extend_from_slice(&chunk);
        }
    }
    assert!(!received.is_empty());
    server.truncate_blob(&sha256_hex(&data), 0).await;
    let end = loop {
        match stream.message().await {
            Ok(Some(message)) => {
                if let Some(pull_response::Msg::Chunk(chunk)) = message.msg {
                    received.extend_from_slice(&chunk);
                }
            }
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        }
    };
    if blobs::blobs_on_object_store() {
        assert_eq!(
            code(&end),
            Code::Ok,
            "{end:?} after {} bytes",
            received.len()
        );
        assert!(received == data, "the object the GET started on, whole");
    } else {
        assert_eq!(
            code(&end),
            Code::DataLoss,
            "{end:?} after {} bytes",
            received.len()
        );
        assert!(received.len() < data.len());
    }
    server.stop().await;
}

/// With `ARTIFACTD_BLOB_FSYNC=false` (the harness default) a crash can leave a torn blob at
/// a content address. A later push of the same content must not trust it: a blob of the
/// wrong size or with the wrong content is moved to quarantine and replaced by the upload,
/// and every artifact of that content reads whole again. On an object store (where an
/// object appears whole or not at all, so only the size is checked, and no write can tear
/// one in place) the torn blob is the case: a rewritten shorter object.
async fn damaged_blobs_are_quarantined_and_replaced_not_reused(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    assert!(!server.config.blob_fsync);
    let corrupt_in_place = !blobs::blobs_on_object_store();
    let per_case = if corrupt_in_place { 2 } else { 1 };
    let mut client = server.client().await;
    let quarantined = || async {
        server
            .app
            .artifacts
            .blobs()
            .list_quarantined()
            .await
            .unwrap()
    };
    // A large push (temporary upload, promoted) and a small file-backed one (declared size
    // above the inline limit: written in one step).
    let mut small = header(job("p", "j"), "small-1");
    small.expected_size = Some(40_000);
    let cases: [(&str, Vec<u8>, pb::PushHeader); 2] = [
        ("big", content(3 * MIB, 4), header(job("p", "j"), "big-1")),
        ("small", content(40_000, 5), small),
    ];
    for (n, (name, data, first)) in cases.into_iter().enumerate() {
        let sha = sha256_hex(&data);
        let pushed = push(&mut client, first.clone(), &data).await.unwrap();
        assert!(!pushed.deduplicated);
        assert!(server.blob_exists(&sha).await, "{name}: stored as a blob");

        // Torn: shorter than its content.
        server.truncate_blob(&sha, data.len() as u64 / 3).await;
        let second = pb::PushHeader {
            path: format!("{name}-2"),
            ..first.clone()
        };
        let pushed = push(&mut client, second, &data).await.unwrap();
        assert!(!pushed.deduplicated, "{name}: a torn blob is not reused");
        assert_eq!(quarantined().await.len(), per_case * n + 1);
        for path in [first.path.as_str(), &format!("{name}-2")] {
            let (got, end) = pull_all(&mut client, path, 0).await;
            assert_eq!(code(&end), Code::Ok, "{name}: {path}: {end:?}");
            assert!(got == data, "{name}: {path} reads whole again");
        }

        if corrupt_in_place {
            // Corrupted in place: right size, wrong bytes.
            let file = server.blob_dir.path().join(server.blob_key(&sha).await);
            let mut bytes = std::fs::read(&file).unwrap();
            bytes[10] ^= 0xff;
            std::fs::write(&file, &bytes).unwrap();
            let third = pb::PushHeader {
                path: format!("{name}-3"),
                ..first.clone()
            };
            let pushed = push(&mut client, third, &data).await.unwrap();
            assert!(!pushed.deduplicated, "{name}: a corrupt blob is not reused");
            assert_eq!(quarantined().await.len(), 2 * n + 2);
            let (got, end) = pull_all(&mut client, &first.path, 0).await;
            assert_eq!(code(&end), Code::Ok);
            assert!(got == data, "{name}: repaired");
        }

        // Intact content is deduplicated as before.
        let fourth = pb::PushHeader {
            path: format!("{name}-4"),
            ..first
        };
        assert!(push(&mut client, fourth, &data).await.unwrap().deduplicated);
        assert_eq!(quarantined().await.len(), per_case * (n + 1));
    }
    assert!(server.leftover_uploads().await.is_empty());
    server.stop().await;
}

/// Opens a Pull and reads only its first message (the artifact), leaving the content unread.
async fn stalled_pull(
    client: &mut ArtifactServiceClient<Channel>,
    path: &str,
) -> Result<tonic::Streaming<pb::PullResponse>, tonic::Status> {
    let mut stream = client
        .pull(pb::PullRequest {
            scope: Some(job("p", "j")),
            path: path.into(),
            offset: 0,
            length: 0,
        })
        .await?
        .into_inner();
    let first = stream.message().await?.expect("the artifact");
    assert!(matches!(first.msg, Some(pull_response::Msg::Artifact(_))));
    Ok(stream)
}

/// Beyond `ARTIFACTD_MAX_STREAMS` open Push and Pull streams, new ones are refused with
/// RESOURCE_EXHAUSTED; a slot frees as soon as a stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_bound_are_resource_exhausted() {
    let server = TestServer::start_with(Backend::Sqlite, |c| c.max_streams = 2)
        .await
        .unwrap();
    let mut client = server.client().await;
    let data = content(16 * MIB, 6);
    push(&mut client, header(job("p", "j"), "big.bin"), &data)
        .await
        .unwrap();
    let first = stalled_pull(&mut client, "big.bin").await.unwrap();
    let _second = stalled_pull(&mut client, "big.bin").await.unwrap();
    let refused = stalled_pull(&mut client, "big.bin").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("ARTIFACTD_MAX_STREAMS"));
    let refused = push(&mut client, header(job("p", "j"), "x"), b"x")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        stat(&mut client, job("p", "j"), "big.bin").await.is_ok(),
        "unary calls are not streams"
    );

    drop(first); // the client resets the stream; its slot comes back
    let mut pushed = Err(tonic::Status::unknown("not tried"));
    for _ in 0..200 {
        pushed = push(&mut client, header(job("p", "j"), "x"), b"x").await;
        if !matches!(&pushed, Err(s) if s.code() == Code::ResourceExhausted) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pushed.unwrap();
    server.stop().await;
}

/// Beyond `ARTIFACTD_MAX_CONNECTIONS` client connections, calls on a new connection answer
/// RESOURCE_EXHAUSTED naming the limit and the connection is closed shortly after; when a
/// connection closes its place goes to the next one. The gauge and counter say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_bound_are_refused() {
    let server = TestServer::start_with(Backend::Sqlite, |c| c.max_connections = 2)
        .await
        .unwrap();
    let mut first = server.client().await;
    let mut second = server.client().await;
    push(&mut first, header(job("p", "j"), "a.txt"), b"a")
        .await
        .unwrap();
    stat(&mut second, job("p", "j"), "a.txt").await.unwrap();

    let mut third = server.client().await;
    for _ in 0..3 {
        let refused = stat(&mut third, job("p", "j"), "a.txt").await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert!(
            refused.message().contains("ARTIFACTD_MAX_CONNECTIONS")
                && refused.message().contains("maximum of 2"),
            "{refused:?}"
        );
    }
    let scrape = http_get(server.http_addr, "/metrics").await.1;
    assert_eq!(
        sample(&scrape, "artifactd_grpc_connections_open", &[]),
        Some(2.0)
    );
    assert!(sample(&scrape, "artifactd_grpc_connections_refused_total", &[]).unwrap() >= 1.0);

    // The refused connection is closed by the server: the next call on it fails as a lost
    // connection would (UNAVAILABLE), or is refused again on a reconnection that is itself
    // beyond the limit — never served.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = stat(&mut third, job("p", "j"), "a.txt").await.unwrap_err();
    assert!(
        matches!(after.code(), Code::Unavailable | Code::ResourceExhausted),
        "{after:?}"
    );

    // The established ones are unaffected; when one goes, a new connection is served.
    stat(&mut first, job("p", "j"), "a.txt").await.unwrap();
    drop(second);
    drop(third);
    let mut served = Err(tonic::Status::unknown("not tried"));
    for _ in 0..100 {
        let mut fresh = server.client().await;
        served = stat(&mut fresh, job("p", "j"), "a.txt").await.map(|_| ());
        if served.is_ok() {
            break;
        }
        assert_eq!(served.as_ref().unwrap_err().code(), Code::ResourceExhausted);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    served.unwrap();
    server.stop().await;
}

/// A Pull whose client reads nothing for the idle timeout is abandoned: its stream slot is
/// released (another stream fits under a bound of one), and when the client reads again the
/// stream ends DEADLINE_EXCEEDED instead of resuming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_that_read_nothing_are_abandoned() {
    let server = TestServer::start_with(Backend::Sqlite, |c| {
        c.max_streams = 1;
        c.stream_idle_timeout = Duration::from_millis(500);
    })
    .await
    .unwrap();
    let mut client = server.client().await;
    let data = content(16 * MIB, 7);
    push(&mut client, header(job("p", "j"), "big.bin"), &data)
        .await
        .unwrap();
    let mut stalled = stalled_pull(&mut client, "big.bin").await.unwrap();
    let mut other = server.client().await;
    let mut second = Err(tonic::Status::unknown("not tried"));
    for _ in 0..100 {
        second = pull_all(&mut other, "big.bin", 0).await.1;
        if code(&second) != Code::ResourceExhausted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(code(&second), Code::Ok, "{second:?}");

    let mut received = 0;
    let end = loop {
        match stalled.message().await {
            Ok(Some(message)) => {
                if let Some(pull_response::Msg::Chunk(chunk)) = message.msg {
                    received += chunk.len();
                }
            }
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        }
    };
    assert_eq!(code(&end), Code::DeadlineExceeded, "{end:?}");
    assert!(
        end.unwrap_err()
            .message()
            .contains("read nothing for 500ms")
    );
    assert!(received < data.len());
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Hostile load against the real binary
// ---------------------------------------------------------------------------------------------

const STALLED_PULLS: usize = 600;
const TRICKLING_PUSHES: usize = 600;
/// Streams per hostile connection (the server allows 256 per connection).
const STREAMS_PER_CONNECTION: usize = 100;
const RSS_LIMIT_KIB: u64 = 250 * 1024;
const FLOODS: usize = 2;
/// How long RSS must stop falling before the test takes it as settled after a flood: longer
/// than the 10 s idle blocking threads linger.
const SETTLE: Duration = Duration::from_secs(12);

/// The spawned server, killed if the test fails before it is stopped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `VmRSS` and `VmHWM` (peak) of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn connect(addr: std::net::SocketAddr) -> ArtifactServiceClient<Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    ArtifactServiceClient::new(endpoint.connect().await.unwrap())
}

/// 600 Pulls that read nothing and 600 Pushes that send a byte a second, all from one client
/// on a handful of connections, while another client pushes and pulls 1 MiB: each of those
/// completes in under 2 s and the server's peak RSS stays under 250 MiB. When the hostile
/// streams are gone their uploads are removed and RSS comes back within 20 % of where it
/// started (the server's allocator, jemalloc, hands freed pages back; see `main.rs`), and a
/// second flood leaves it where the first did.
///
/// Runs the real binary (default settings but the plan, so egress quotas do not interfere,
/// and a long idle timeout, so nothing is abandoned during the test) and reads its memory
/// from /proc. About a minute and a half.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_trickling_streams_starve_no_one() {
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (grpc, http) = (free(), free());
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_artifactd"))
            .env("ARTIFACTD_GRPC_LISTEN", grpc.to_string())
            .env("ARTIFACTD_HTTP_LISTEN", http.to_string())
            .env(
                "DATABASE_URL",
                format!("sqlite://{}", dir.path().join("db.sqlite").display()),
            )
            .env(
                "ARTIFACTD_BLOB_URL",
                format!("file://{}", dir.path().join("blobs").display()),
            )
            .env("ARTIFACTD_DEFAULT_PLAN", "enterprise")
            .env("ARTIFACTD_STREAM_IDLE_TIMEOUT", "10m")
            .env("RUST_LOG", "warn")
            .env("ARTIFACTD_DB_IDLE_TIMEOUT", "3s")
            .stderr(log)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{grpc}")).unwrap();
    let mut victim = None;
    for _ in 0..400 {
        if let Ok(channel) = endpoint.connect().await {
            victim = Some(ArtifactServiceClient::new(channel));
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut victim = victim.expect("the server came up");

    // What the hostile pulls stall on, and a warm-up round of what the victim does.
    let big = content(8 * MIB, 10);
    push(&mut victim, header(job("p", "j"), "big.bin"), &big)
        .await
        .unwrap();
    let warm = content(MIB, 11);
    push(&mut victim, header(job("v", "j"), "warm.bin"), &warm)
        .await
        .unwrap();
    assert!(
        pull(&mut victim, job("v", "j"), "warm.bin", 0, 0)
            .await
            .unwrap()
            .data
            == warm
    );
    let (start_kib, _) = memory_kib(pid);
    // jemalloc took its options from the binary (`MALLOC_CONF` in main.rs): its background
    // thread, which returns freed pages without waiting for the next allocation, runs.
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    let purgers = threads
        .filter(|task| {
            let comm = task.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|name| name.trim() == "jemalloc_bg_thd")
        })
        .count();
    // (one per CPU at most, started as arenas are used).
    assert!(purgers >= 1, "{purgers} jemalloc background threads");
    let mut settled = Vec::new();

    for round in 0..FLOODS {
        // The flood: pulls that read nothing (not even the artifact message: with the client's
        // default HTTP/2 windows, unread data of the first streams blocks the connection's later
        // streams anyway)...
        let mut stalled = Vec::new();
        let mut connections = Vec::new();
        for _ in 0..STALLED_PULLS / STREAMS_PER_CONNECTION {
            let mut client = connect(grpc).await;
            for _ in 0..STREAMS_PER_CONNECTION {
                let request = pb::PullRequest {
                    scope: Some(job("p", "j")),
                    path: "big.bin".into(),
                    offset: 0,
                    length: 0,
                };
                stalled.push(client.pull(request).await.unwrap().into_inner());
            }
            connections.push(client);
        }
        // ...and pushes of undeclared size that trickle a byte at a time.
        let mut trickles = Vec::new();
        let mut pushes = Vec::new();
        for c in 0..TRICKLING_PUSHES / STREAMS_PER_CONNECTION {
            let client = connect(grpc).await;
            connections.push(client.clone());
            for i in 0..STREAMS_PER_CONNECTION {
                let (tx, rx) = tokio::sync::mpsc::channel::<PushRequest>(2);
                tx.send(PushRequest {
                    msg: Some(push_request::Msg::Header(header(
                        job("p", "j"),
                        &format!("trickle/{round}/{c}/{i}"),
                    ))),
                })
                .await
                .unwrap();
                let mut client = client.clone();
                pushes.push(tokio::spawn(async move {
                    client
                        .push(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await
                }));
                trickles.push(tx);
            }
        }
        let trickler = {
            let trickles = trickles.clone();
            tokio::spawn(async move {
                loop {
                    for tx in &trickles {
                        let _ = tx.try_send(PushRequest {
                            msg: Some(push_request::Msg::Chunk(bytes::Bytes::from_static(b"x"))),
                        });
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        };
        drop(trickles);
        // Every push has its upload open once its first byte arrived.
        let uploads = dir.path().join("blobs/uploads");
        let count_uploads = || std::fs::read_dir(&uploads).unwrap().count();
        for _ in 0..600 {
            if count_uploads() >= TRICKLING_PUSHES {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(count_uploads(), TRICKLING_PUSHES, "all pushes under way");
        let (under_load_kib, _) = memory_kib(pid);

        // Another client is served as if nothing were going on.
        let data = content(MIB, 12);
        let started = Instant::now();
        push(
            &mut victim,
            header(job("v", "j"), &format!("victim-{round}.bin")),
            &data,
        )
        .await
        .unwrap();
        let push_time = started.elapsed();
        let started = Instant::now();
        let pulled = pull(
            &mut victim,
            job("v", "j"),
            &format!("victim-{round}.bin"),
            0,
            0,
        )
        .await
        .unwrap();
        let pull_time = started.elapsed();
        assert!(pulled.data == data);
        let (_, peak_kib) = memory_kib(pid);
        eprintln!(
            "RSS: start {start_kib} KiB, under load {under_load_kib} KiB, peak {peak_kib} KiB; \
             victim push {push_time:?}, pull {pull_time:?}"
        );
        assert!(
            push_time < Duration::from_secs(2),
            "push took {push_time:?}"
        );
        assert!(
            pull_time < Duration::from_secs(2),
            "pull took {pull_time:?}"
        );
        assert!(peak_kib <= RSS_LIMIT_KIB, "peak RSS {peak_kib} KiB");

        // The flood ends: pulls and pushes reset by the client, connections closed.
        trickler.abort();
        drop(stalled);
        for push in &pushes {
            push.abort();
        }
        for push in pushes {
            assert!(push.await.unwrap_err().is_cancelled());
        }
        drop(connections);
        // What the flood freed goes back in steps: jemalloc's background thread returns
        // freed pages after 1 s unused, idle database connections close after 3 s here and
        // idle blocking threads exit after 10 s. Wait until RSS has stopped falling (no new
        // low by more than 1 % for SETTLE) and the uploads are gone, within a minute.
        let waiting = Instant::now();
        let mut settled_kib = memory_kib(pid).0;
        let mut fell_at = Instant::now();
        while waiting.elapsed() < Duration::from_secs(60)
            && (fell_at.elapsed() < SETTLE || count_uploads() > 0)
        {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now_kib = memory_kib(pid).0;
            if now_kib * 100 < settled_kib * 99 {
                fell_at = Instant::now();
            }
            settled_kib = settled_kib.min(now_kib);
        }
        eprintln!(
            "round {round}: RSS after the flood: {settled_kib} KiB (start {start_kib} KiB, \
             {:.2}×), settled {:?} after the streams closed",
            settled_kib as f64 / start_kib as f64,
            fell_at.duration_since(waiting)
        );
        assert_eq!(count_uploads(), 0, "abandoned uploads are removed");
        // The flood's memory goes back to the OS: within 20 % of the start.
        assert!(
            settled_kib * 5 <= start_kib * 6,
            "RSS {settled_kib} KiB after flood {round}: not back within 20 % of the \
             {start_kib} KiB it started at"
        );
        // And what stays is reused, not added to, by the next flood.
        if let Some(first) = settled.first() {
            assert!(
                settled_kib * 4 <= first * 5,
                "RSS {settled_kib} KiB after flood {round}, {first} KiB after the first"
            );
        }
        settled.push(settled_kib);
    }
    // Still serving.
    assert!(
        pull(&mut victim, job("v", "j"), "warm.bin", 0, 0)
            .await
            .unwrap()
            .data
            == warm
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let mut child = child;
    assert!(child.0.wait().unwrap().success(), "clean exit on SIGTERM");
}
