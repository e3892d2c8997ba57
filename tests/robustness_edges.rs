#![allow(clippy::unwrap_used)]
//! Hostile edges (issue 9): names that would display as something else, timestamps at the
//! int64 limits, recursive deletes larger than one batch, tokens outside their audience or
//! lifetime, health that tells the truth through shutdown, and durable pushes written past
//! the page cache that survive a kill.

mod common;

use artifactd::pb::v1::artifact_service_client::ArtifactServiceClient;
use common::*;
use tonic::Code;

/// A bidi override would make `a\u{202e}txt.exe` display as `aexe.txt`: refused before any
/// byte is stored, naming the field and the code point.
async fn bidi_override_in_a_path_is_refused(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut client = server.client().await;
    let err = push(
        &mut client,
        header(job("p", "j"), "a\u{202e}txt.exe"),
        b"MZ",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("header.path: ") && err.message().contains("U+202E"),
        "{}",
        err.message()
    );
    let err = stat(&mut client, job("p", "j\u{200b}"), "a.txt")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("U+200B"), "{}", err.message());
    assert!(server.leftover_uploads().await.is_empty());
    // The richer error model: a BadRequest detail names the field for programs.
    let err = push(&mut client, header(job("p", "j"), "a/../b"), b"x")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let details = tonic_types::StatusExt::get_details_bad_request(&err)
        .expect("a google.rpc.BadRequest detail");
    assert_eq!(details.field_violations.len(), 1);
    assert_eq!(details.field_violations[0].field, "header.path");
    assert!(
        details.field_violations[0].description.contains("'..'"),
        "{details:?}"
    );
    server.stop().await;
}

/// A bug on the database side (here: a table dropped behind the server's back) is
/// INTERNAL with a generic message — not UNAVAILABLE "retry later", which would have
/// clients retry forever — and the cause stays in the log.
async fn database_bugs_are_internal_not_unavailable(backend: Backend) {
    use sea_orm::ConnectionTrait;
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut client = server.client().await;
    push(&mut client, header(job("p", "j"), "f.txt"), b"hello")
        .await
        .unwrap();
    let db = sea_orm::Database::connect(server.db.url.as_str())
        .await
        .unwrap();
    let drop = match backend {
        Backend::Sqlite => "DROP TABLE artifacts",
        Backend::Postgres => "DROP TABLE artifacts CASCADE",
    };
    db.execute_unprepared(drop).await.unwrap();
    db.close().await.unwrap();
    let err = stat(&mut client, job("p", "j"), "f.txt").await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert_eq!(err.message(), "internal error");
    server.stop().await;
}

/// GetUsage with `start`/`end` at or near the int64 limits: INVALID_ARGUMENT naming the
/// field, never a panic (debug) or a wrapped month (release). The server still answers
/// afterwards.
async fn usage_ranges_at_the_int64_limits_are_invalid(backend: Backend) {
    use artifactd::pb::v1::{GetUsageRequest, usage_service_client::UsageServiceClient};
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut usage = UsageServiceClient::new(server.channel().await);
    let at = |seconds: i64, nanos: i32| Some(prost_types::Timestamp { seconds, nanos });
    let ok = at(TEST_EPOCH_SECONDS, 0);
    let near_max = i64::MAX / 1_000_000 - 1; // fits in i64 microseconds, year ≈ 294,000
    let near_min = i64::MIN / 1_000_000 + 1;
    for (start, end, field) in [
        (at(near_max - 10, 0), at(near_max, 999_999_999), "start"),
        (ok, at(near_max, 0), "end"),
        (ok, at(i64::MAX, 999_999_999), "end"),
        (at(i64::MIN, 0), ok, "start"),
        (at(near_min, 0), ok, "start"),
        (at(near_min, 0), at(near_max, 0), "start"),
        (at(253_402_300_800, 0), at(253_402_300_801, 0), "start"),
        (ok, at(TEST_EPOCH_SECONDS + 1, -1), "end"),
    ] {
        let err = usage
            .get_usage(GetUsageRequest {
                project_id: "p".into(),
                start,
                end,
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{start:?}..{end:?}: {err:?}"
        );
        assert!(
            err.message().starts_with(&format!("{field}: ")),
            "{start:?}..{end:?}: {}",
            err.message()
        );
    }
    // A sane range of a project that exists (reads never create projects) is answered.
    let mut artifacts = server.client().await;
    push(&mut artifacts, header(job("p", "j"), "a.txt"), b"a")
        .await
        .unwrap();
    let fine = usage
        .get_usage(GetUsageRequest {
            project_id: "p".into(),
            start: ok,
            end: at(TEST_EPOCH_SECONDS + 86_400, 0),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fine.egress_bytes, 0);
    server.stop().await;
}

/// A recursive delete ends more files than one batch (1,000 per statement) holds: every
/// one, counted once, with the right total size, and nothing outside the folder.
async fn recursive_delete_ends_files_in_batches(backend: Backend) {
    use artifactd::pb::v1::{DeleteRequest, ListRequest};
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    const FILES: usize = 2_500;
    let channel = server.channel().await;
    let pushes = (0..FILES).map(|i| {
        let mut client =
            artifactd::pb::v1::artifact_service_client::ArtifactServiceClient::new(channel.clone());
        async move {
            // Sizes 1..=7 bytes, so a wrong count shows in the total too.
            let data = vec![b'x'; 1 + i % 7];
            let mut h = header(job("p", "j"), &format!("out/{:02}/f{i:05}.txt", i % 40));
            h.expected_size = Some(data.len() as i64);
            push(&mut client, h, &data).await.unwrap();
        }
    });
    use futures::StreamExt;
    let mut pending = futures::stream::iter(pushes).buffer_unordered(32);
    while pending.next().await.is_some() {}
    let mut client = server.client().await;
    push(&mut client, header(job("p", "j"), "out.txt"), b"sibling")
        .await
        .unwrap();
    push(&mut client, header(job("p", "j"), "out0/keep"), b"sibling")
        .await
        .unwrap();
    let expected_bytes: i64 = (0..FILES).map(|i| 1 + (i % 7) as i64).sum();

    let deleted = client
        .delete(DeleteRequest {
            scope: Some(job("p", "j")),
            path: "out".into(),
            recursive: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (deleted.deleted_count, deleted.deleted_bytes),
        (FILES as i64, expected_bytes)
    );
    let left = client
        .list(ListRequest {
            scope: Some(job("p", "j")),
            prefix: String::new(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let paths: Vec<_> = left.artifacts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(paths, ["out.txt", "out0/keep"]);
    // Nothing left to end: a second delete finds nothing.
    let again = client
        .delete(DeleteRequest {
            scope: Some(job("p", "j")),
            path: "out".into(),
            recursive: true,
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound, "{again:?}");
    server.stop().await;
}

/// The database going away (here: the server's Postgres database dropped, its connections
/// terminated) is UNAVAILABLE "retry later" — the one class worth retrying — and `/readyz`
/// turns 503. Postgres only: a SQLite file cannot be taken away from an open pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_went_away_is_unavailable() {
    use sea_orm::ConnectionTrait;
    let Some(server) = TestServer::start(Backend::Postgres).await else {
        return;
    };
    let mut client = server.client().await;
    push(&mut client, header(job("p", "j"), "f.txt"), b"hello")
        .await
        .unwrap();
    let admin_url = std::env::var("TEST_DATABASE_URL").unwrap_or_default();
    if admin_url.is_empty() {
        eprintln!("skipping: the database can only be dropped with TEST_DATABASE_URL");
        server.stop().await;
        return;
    }
    let name = server.db.url.rsplit('/').next().unwrap().to_owned();
    let admin = sea_orm::Database::connect(admin_url.as_str())
        .await
        .unwrap();
    admin
        .execute_unprepared(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
        .await
        .unwrap();
    admin.close().await.unwrap();
    let err = stat(&mut client, job("p", "j"), "f.txt").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), "database unavailable, retry later");
    assert_eq!(
        try_http_get(server.http_addr, "/readyz").await,
        Some((503, "database unavailable\n".into()))
    );
    server.stop().await;
}

on_both_backends!(
    bidi_override_in_a_path_is_refused,
    database_bugs_are_internal_not_unavailable,
    usage_ranges_at_the_int64_limits_are_invalid,
    recursive_delete_ends_files_in_batches
);

const SECRET: &str = "robustness-test-secret-at-least-32-bytes";

fn now_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// With `ARTIFACTD_JWT_AUDIENCE`, `ARTIFACTD_JWT_ISSUER` and `ARTIFACTD_JWT_MAX_TTL` set,
/// a token is accepted only with that audience and issuer, after its `nbf`, with an `iat`
/// and a lifetime within the maximum; everything else is UNAUTHENTICATED. Tokens the
/// server issues itself (IssueJobToken) and the CLI issues (`token issue`) pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_for_audience_issuer_nbf_and_lifetime() {
    use artifactd::auth::{Audience, Authenticator, Claims};
    use artifactd::config::{AuthMode, Secret};
    use artifactd::domain::Timestamp;
    use artifactd::pb::v1::{
        IssueJobTokenRequest, StatRequest, artifact_service_client::ArtifactServiceClient,
        token_service_client::TokenServiceClient,
    };
    let server = TestServer::start_with(Backend::Sqlite, |c| {
        c.auth = AuthMode::Jwt;
        c.jwt_secret = Some(SECRET.parse::<Secret>().unwrap());
        c.jwt_audience = Some("artifactd".into());
        c.jwt_issuer = Some("https://ci.example".into());
        c.jwt_max_ttl = std::time::Duration::from_secs(2 * 3600);
    })
    .await
    .unwrap();
    // Tokens are checked against the wall clock: issue on it too.
    server
        .clock
        .set(Timestamp::from_seconds(now_seconds() as i64));
    let mut artifacts = ArtifactServiceClient::new(server.channel().await);
    let signer = Authenticator::shared_secret(SECRET.as_bytes()).unwrap();
    let now = now_seconds();
    let good = Claims {
        sub: "ops".into(),
        role: "admin".into(),
        exp: now + 3600,
        iat: Some(now),
        iss: Some("https://ci.example".into()),
        aud: Some(Audience::One("artifactd".into())),
        ..Claims::default()
    };
    let stat = || StatRequest {
        scope: Some(job("p", "j")),
        path: "f".into(),
    };
    let token = signer.issue(&good).unwrap();
    let err = artifacts.stat(bearer(stat(), &token)).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::NotFound,
        "a good token gets through: {err:?}"
    );

    let cases = [
        (
            "no aud",
            Claims {
                aud: None,
                ..good.clone()
            },
            "no aud claim",
        ),
        (
            "other aud",
            Claims {
                aud: Some(Audience::Many(vec!["billing".into()])),
                ..good.clone()
            },
            "not meant for this service",
        ),
        (
            "no iss",
            Claims {
                iss: None,
                ..good.clone()
            },
            "no iss claim",
        ),
        (
            "other iss",
            Claims {
                iss: Some("https://evil.example".into()),
                ..good.clone()
            },
            "issuer is not trusted",
        ),
        (
            "nbf ahead",
            Claims {
                nbf: Some(now + 3600),
                ..good.clone()
            },
            "not valid yet",
        ),
        (
            "no iat",
            Claims {
                iat: None,
                ..good.clone()
            },
            "no iat claim",
        ),
        (
            "iat ahead",
            Claims {
                iat: Some(now + 3600),
                exp: now + 5400,
                ..good.clone()
            },
            "iat is in the future",
        ),
        (
            "too long",
            Claims {
                iat: Some(now - 60),
                exp: now + 2 * 3600,
                ..good.clone()
            },
            "exceeds the maximum of 2h",
        ),
    ];
    for (what, claims, why) in cases {
        let token = signer.issue(&claims).unwrap();
        let err = artifacts.stat(bearer(stat(), &token)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{what}: {err:?}");
        assert!(err.message().contains(why), "{what}: {}", err.message());
    }
    // nbf already past is fine.
    let started = signer
        .issue(&Claims {
            nbf: Some(now - 5),
            ..good.clone()
        })
        .unwrap();
    let err = artifacts.stat(bearer(stat(), &started)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // IssueJobToken sets iat, aud and iss: its token passes, within its job.
    let mut tokens = TokenServiceClient::new(server.channel().await);
    let request = |seconds| IssueJobTokenRequest {
        project_id: "p".into(),
        workflow_id: "w".into(),
        job_id: "j".into(),
        ttl: Some(prost_types::Duration { seconds, nanos: 0 }),
    };
    let issued = tokens
        .issue_job_token(bearer(request(600), &token))
        .await
        .unwrap()
        .into_inner();
    let err = artifacts
        .stat(bearer(stat(), &issued.token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // Beyond the configured maximum lifetime, nothing is issued.
    let err = tokens
        .issue_job_token(bearer(request(3 * 3600), &token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("ttl: "), "{}", err.message());

    // The CLI reads the same settings, so its tokens pass; without them they do not.
    let cli = |audience: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_artifactd"));
        command
            .args(["token", "issue", "--role", "admin", "--ttl", "10m"])
            .env("ARTIFACTD_JWT_SECRET", SECRET)
            .env("ARTIFACTD_JWT_ISSUER", "https://ci.example")
            .env_remove("ARTIFACTD_JWT_AUDIENCE");
        if let Some(audience) = audience {
            command.env("ARTIFACTD_JWT_AUDIENCE", audience);
        }
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    };
    let err = artifacts
        .stat(bearer(stat(), &cli(Some("artifactd"))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = artifacts
        .stat(bearer(stat(), &cli(None)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    server.stop().await;
}

/// `GET path` over HTTP/1.0: `None` when the connection is refused (nobody listening).
async fn try_http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.get(9..12)?.parse().ok()?;
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    Some((status, body))
}

/// Opens a push and sends its header and a first chunk; the push stays in flight (so the
/// drain waits for it) until the returned sender sends the rest and is dropped.
async fn push_in_flight(
    channel: tonic::transport::Channel,
    http: std::net::SocketAddr,
) -> (
    tokio::sync::mpsc::Sender<artifactd::pb::v1::PushRequest>,
    tokio::task::JoinHandle<
        Result<tonic::Response<artifactd::pb::v1::PushResponse>, tonic::Status>,
    >,
) {
    use artifactd::pb::v1::{
        PushRequest, artifact_service_client::ArtifactServiceClient, push_request,
    };
    let mut client = ArtifactServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel::<PushRequest>(4);
    let call = tokio::spawn(async move {
        client
            .push(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tx.send(PushRequest {
        msg: Some(push_request::Msg::Header(header(
            job("p", "j"),
            "draining.bin",
        ))),
    })
    .await
    .unwrap();
    tx.send(PushRequest {
        msg: Some(push_request::Msg::Chunk(vec![7u8; 64 * 1024].into())),
    })
    .await
    .unwrap();
    // The sends above only queue locally: wait until the server has the call, or a shutdown
    // signalled now could find nothing in flight and (rightly) exit at once.
    await_sample(
        http,
        "artifactd_grpc_requests_in_flight",
        &[
            ("service", "artifactd.v1.ArtifactService"),
            ("method", "Push"),
        ],
        |n| n == 1.0,
    )
    .await;
    (tx, call)
}

async fn finish_push(
    tx: tokio::sync::mpsc::Sender<artifactd::pb::v1::PushRequest>,
    call: tokio::task::JoinHandle<
        Result<tonic::Response<artifactd::pb::v1::PushResponse>, tonic::Status>,
    >,
) {
    use artifactd::pb::v1::{PushRequest, push_request};
    tx.send(PushRequest {
        msg: Some(push_request::Msg::Chunk(vec![7u8; 64 * 1024].into())),
    })
    .await
    .unwrap();
    drop(tx);
    let pushed = call
        .await
        .unwrap()
        .expect("the in-flight push completes during the drain");
    assert_eq!(pushed.into_inner().artifact.unwrap().size, 128 * 1024);
}

/// Through the drain, every gRPC service reports NOT_SERVING and `/readyz` answers 503
/// (it used to be connection-refused), while an in-flight push still completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_reports_not_serving_and_readyz_503() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut server = TestServer::start(Backend::Sqlite).await.unwrap();
    assert_eq!(
        try_http_get(server.http_addr, "/readyz").await,
        Some((200, "ready\n".into()))
    );
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    for service in artifactd::server::HEALTH_SERVICES {
        let status = health
            .check(check(service))
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let (tx, call) = push_in_flight(channel, server.http_addr).await;
    // Existing streams hear the change (new calls on a draining connection are refused, so
    // watch every service from before the shutdown).
    let mut watches = Vec::new();
    for service in artifactd::server::HEALTH_SERVICES {
        let mut watch = health.watch(check(service)).await.unwrap().into_inner();
        assert_eq!(
            watch.message().await.unwrap().unwrap().status,
            ServingStatus::Serving as i32,
            "{service:?}"
        );
        watches.push(watch);
    }
    server.trigger_shutdown();
    for (watch, service) in watches.iter_mut().zip(artifactd::server::HEALTH_SERVICES) {
        assert_eq!(
            watch.message().await.unwrap().unwrap().status,
            ServingStatus::NotServing as i32,
            "{service:?}"
        );
    }
    assert_eq!(
        try_http_get(server.http_addr, "/readyz").await,
        Some((503, "shutting down\n".into())),
        "readiness answers 503 while the push drains"
    );
    assert_eq!(
        try_http_get(server.http_addr, "/healthz").await,
        Some((200, "ok\n".into()))
    );
    drop(watches);
    finish_push(tx, call).await;
    server.stop().await;
}

/// The real binary: SIGTERM during a push → `/readyz` 503 while it drains, the push
/// completes, the process exits 0, and only then does the HTTP side go away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_drains_with_readyz_503_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let server = binary::BinaryServer::start(&binary::local_stores(dir.path())).await;
    let http = server.http;
    let channel = server.channel().await;
    assert_eq!(
        try_http_get(http, "/readyz").await,
        Some((200, "ready\n".into()))
    );
    let (tx, call) = push_in_flight(channel, http).await;

    server.terminate();
    // Readiness flips to 503 promptly, and stays answering (not refused) while draining.
    let mut seen = None;
    for _ in 0..400 {
        seen = try_http_get(http, "/readyz").await;
        if seen.as_ref().is_some_and(|(status, _)| *status == 503) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(seen, Some((503, "shutting down\n".into())));
    finish_push(tx, call).await;
    let status = server.wait().await;
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_eq!(
        try_http_get(http, "/readyz").await,
        None,
        "gone after the drain"
    );
}

/// Every file under `dir`, at any depth.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            files.extend(files_under(&entry.path()));
        } else {
            files.push(entry.path());
        }
    }
    files
}

/// The real binary with fsync on (and so, by default, direct writes): 20 large pushes at
/// once, more than its 4 direct-write blocks, of sizes around the 1 MiB block and the
/// 4 KiB alignment, are stored byte for byte, at least 4 of them past the page cache; the
/// server killed (SIGKILL) right after, then started again on the same directory, serves
/// every one byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_pushes_written_direct_survive_a_kill() {
    const MIB: usize = 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let mut env = common::binary::local_stores(dir.path());
    env.push(("ARTIFACTD_BLOB_FSYNC", "true".to_owned()));
    let server = common::binary::BinaryServer::start(&env).await;
    let channel = server.channel().await;
    let sizes: Vec<usize> = (0..20)
        .map(|i| match i % 5 {
            0 => MIB - 1,
            1 => MIB,
            2 => MIB + 1,
            3 => 3 * MIB + 4096,
            _ => 2 * MIB + 12_345 + i,
        })
        .collect();
    let files: Vec<(String, Vec<u8>)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| (format!("direct/{i}.bin"), content(len, 700 + i as u64)))
        .collect();
    let pushes = files.iter().map(|(path, data)| {
        let mut client = ArtifactServiceClient::new(channel.clone());
        let header = header(job("p", "direct"), path);
        async move { push(&mut client, header, data).await }
    });
    for (response, (path, data)) in futures::future::join_all(pushes)
        .await
        .into_iter()
        .zip(&files)
    {
        let artifact = response.unwrap().artifact.unwrap();
        assert_eq!(artifact.sha256, sha256_hex(data), "{path}");
        assert_eq!(artifact.size, data.len() as i64, "{path}");
    }
    let blob_files = files_under(&dir.path().join("blobs/blobs/sha256"));
    assert_eq!(blob_files.len(), files.len());
    let uncached = blob_files
        .iter()
        .filter(|p| !artifactd::blob::first_page_cached(p).unwrap())
        .count();
    assert!(
        uncached >= 4,
        "only {uncached} of {} blobs were written past the page cache",
        blob_files.len()
    );

    drop(server); // SIGKILL
    let server = common::binary::BinaryServer::start(&env).await;
    let mut client = ArtifactServiceClient::new(server.channel().await);
    for (path, data) in &files {
        let pulled = pull(&mut client, job("p", "direct"), path, 0, 0)
            .await
            .unwrap();
        assert!(pulled.data == *data, "{path} differs after the restart");
    }
}
