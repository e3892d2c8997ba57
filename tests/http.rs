#![allow(clippy::unwrap_used)]
//! The HTTP download routes with a real HTTP client, SQLite and Postgres: files with their
//! headers, ranges (206, 416), ETags (304), zips of jobs, workflows, projects and the
//! latest PASSED job of a ref (checked by Python's zipfile and `unzip -t`), a job's
//! artifacts deleted, 400 and 404, and egress billed exactly for what the bodies carried.

mod common;

use artifactd::pb::v1::{self as pb, job_service_client::JobServiceClient};
use common::archive::*;
use common::billing::*;
use common::http::*;
use common::*;
use hyper::{Method, StatusCode};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

on_both_backends!(
    files_come_with_ranges_etags_and_types,
    zips_of_every_scope_and_of_the_latest_job,
    what_is_not_there_or_not_valid,
);

const MIB: usize = 1024 * 1024;

/// HTTP downloads take a slot of `ARTIFACTD_MAX_STREAMS` like gRPC streams, and a client
/// that sends a request and never reads is dropped after the idle timeout: its slot comes
/// back and the server closes its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_hold_a_stream_slot_and_stalled_clients_are_dropped() {
    let idle = Duration::from_secs(2);
    let server = TestServer::start_with(Backend::Sqlite, |c| {
        c.max_streams = 1;
        c.stream_idle_timeout = idle;
    })
    .await
    .unwrap();
    let mut client = server.client().await;
    let data = content(32 * MIB, 11);
    push(&mut client, header(job("p", "j"), "big.bin"), &data)
        .await
        .unwrap();
    let addr = server.http_addr;
    let path = "/api/v1/projects/p/jobs/j/artifacts/big.bin";

    // A raw client sends the request and never reads: `peek` waits for the response to
    // arrive without taking anything out of the socket, so its receive window stays shut.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: artifactd\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let started = Instant::now();
    let mut head = [0u8; 12];
    while stalled.peek(&mut head).await.unwrap() < head.len() {}
    assert_eq!(&head, b"HTTP/1.1 200");

    // It holds the one slot: a gRPC Pull, another download and a zip are refused.
    let refused = pull(&mut client, job("p", "j"), "big.bin", 0, 0)
        .await
        .err()
        .expect("refused while the download holds the slot");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("ARTIFACTD_MAX_STREAMS"));
    for route in [path, "/api/v1/projects/p/jobs/j/artifacts"] {
        let busy = get(addr, route, &[]).await;
        assert_eq!(busy.status, StatusCode::TOO_MANY_REQUESTS, "{route}");
        assert!(
            busy.text().contains("ARTIFACTD_MAX_STREAMS"),
            "{}",
            busy.text()
        );
    }

    // After the idle timeout the slot is back: a Pull gets the whole file.
    let pulled = loop {
        match pull(&mut client, job("p", "j"), "big.bin", 0, 0).await {
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(started.elapsed() < idle * 10, "the slot never came back");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => break other.unwrap(),
        }
    };
    assert!(started.elapsed() >= idle);
    assert_eq!(pulled.data.len(), data.len());

    // And the server closed the connection, though the client still reads nothing: the
    // server's end of it leaves ESTABLISHED (its FIN waits behind the unread bytes).
    let (client_end, server_end) = (stalled.local_addr().unwrap(), addr);
    while tcp_state(server_end, client_end) == Some(TCP_ESTABLISHED) {
        assert!(
            started.elapsed() < idle * 10,
            "the stalled connection is still open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Reading now gets what was queued, then the end, short of the body.
    let mut received = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), stalled.read_to_end(&mut received))
        .await
        .expect("the connection ends");
    assert!(
        received.len() < data.len(),
        "{} bytes of a {}-byte body",
        received.len(),
        data.len()
    );
    server.stop().await;
}

const TCP_ESTABLISHED: u8 = 1;

/// The kernel's state of the IPv4 TCP socket `local` → `remote` (Linux `/proc/net/tcp`).
fn tcp_state(local: std::net::SocketAddr, remote: std::net::SocketAddr) -> Option<u8> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = |field: &str| u16::from_str_radix(field.rsplit(':').next()?, 16).ok();
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (port(fields[1]) == Some(local.port()) && port(fields[2]) == Some(remote.port()))
            .then(|| u8::from_str_radix(fields[3], 16).ok())
            .flatten()
    })
}

async fn push_file(c: &mut Clients, scope: pb::Scope, path: &str, data: &[u8], mode: u32) {
    let mut h = header(scope, path);
    h.mode = mode;
    push(&mut c.artifacts, h, data).await.unwrap();
}

async fn files_come_with_ranges_etags_and_types(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    let data = content(300_000, 7);
    push_file(&mut c, job("p", "j1"), "dist/app.bin", &data, 0o755).await;
    push_file(
        &mut c,
        job("p", "j1"),
        "reports/junit.xml",
        b"<testsuite/>",
        0o644,
    )
    .await;
    push_file(&mut c, job("p", "j1"), "empty.txt", b"", 0o644).await;
    let base = "/api/v1/projects/p/jobs/j1/artifacts";
    let addr = server.http_addr;
    let etag = format!("\"{}\"", sha256_hex(&data));
    let mut sent = 0;

    let full = get(addr, &format!("{base}/dist/app.bin"), &[]).await;
    assert_eq!(full.status, StatusCode::OK);
    assert_eq!(full.body, data);
    assert_eq!(full.header("content-length"), "300000");
    assert_eq!(full.header("content-type"), "application/octet-stream");
    assert_eq!(full.header("etag"), etag);
    assert_eq!(full.header("accept-ranges"), "bytes");
    sent += full.body.len();

    let xml = get(addr, &format!("{base}/reports/junit.xml"), &[]).await;
    assert_eq!(
        (xml.status, xml.header("content-type"), xml.text().as_str()),
        (StatusCode::OK, "text/xml", "<testsuite/>")
    );
    sent += xml.body.len();
    let empty = get(addr, &format!("{base}/empty.txt"), &[]).await;
    assert_eq!(
        (
            empty.status,
            empty.header("content-length"),
            empty.body.len()
        ),
        (StatusCode::OK, "0", 0)
    );

    // Ranges (RFC 9110 §14): a middle, an open end, a suffix; a suffix longer than the
    // file and an open range from 0 are the whole file, as 206; past the end is 416.
    for (range, start, end) in [
        ("bytes=1000-1999", 1000, 2000),
        ("bytes=299990-", 299_990, 300_000),
        ("bytes=-10", 299_990, 300_000),
        ("bytes=0-0", 0, 1),
        ("bytes=-300000", 0, 300_000),
        ("bytes=-400000", 0, 300_000),
        ("bytes=0-", 0, 300_000),
        ("bytes=299999-999999999999", 299_999, 300_000),
    ] {
        let part = get(addr, &format!("{base}/dist/app.bin"), &[("range", range)]).await;
        assert_eq!(part.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(part.body, data[start..end], "{range}");
        assert_eq!(
            part.header("content-range"),
            format!("bytes {start}-{}/300000", end - 1)
        );
        assert_eq!(part.header("content-length"), (end - start).to_string());
        sent += part.body.len();
    }
    for range in [
        "bytes=300000-",
        "bytes=400000-500000",
        "bytes=-0",
        "bytes=300000-400000, 500000-",
    ] {
        let refused = get(addr, &format!("{base}/dist/app.bin"), &[("range", range)]).await;
        assert_eq!(refused.status, StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(refused.header("content-range"), "bytes */300000");
        assert!(refused.body.is_empty());
    }
    for range in ["bytes=0-", "bytes=-5"] {
        let on_empty = get(addr, &format!("{base}/empty.txt"), &[("range", range)]).await;
        assert_eq!(
            on_empty.status,
            StatusCode::RANGE_NOT_SATISFIABLE,
            "{range}"
        );
        assert_eq!(on_empty.header("content-range"), "bytes */0");
    }
    // Several ranges are not served as multipart, a reversed or malformed one is invalid,
    // another unit is unknown: the header is ignored and the whole file comes back (200).
    for range in [
        "bytes=0-1,5-6",
        "bytes=0-1,400000-",
        "bytes=9-5",
        "bytes=x-",
        "lines=1-2",
    ] {
        let whole = get(addr, &format!("{base}/dist/app.bin"), &[("range", range)]).await;
        assert_eq!(whole.status, StatusCode::OK, "{range}");
        assert_eq!(whole.header("content-range"), "", "{range}");
        assert_eq!(whole.body, data, "{range}");
        sent += whole.body.len();
    }
    // If-Range: the range holds only for this version (strong ETag); a date or another tag
    // gets the whole file.
    let resumed = get(
        addr,
        &format!("{base}/dist/app.bin"),
        &[("range", "bytes=100-"), ("if-range", &etag)],
    )
    .await;
    assert_eq!(
        (resumed.status, resumed.body.len()),
        (StatusCode::PARTIAL_CONTENT, 299_900)
    );
    sent += resumed.body.len();
    for other in ["\"0000\"", "W/\"0000\"", "Fri, 27 Nov 2026 10:00:00 GMT"] {
        let changed = get(
            addr,
            &format!("{base}/dist/app.bin"),
            &[("range", "bytes=100-"), ("if-range", other)],
        )
        .await;
        assert_eq!(
            (changed.status, changed.body.len()),
            (StatusCode::OK, 300_000),
            "{other}"
        );
        sent += changed.body.len();
    }

    // If-None-Match with the ETag: 304 and no body; another tag: the file.
    let cached = get(
        addr,
        &format!("{base}/dist/app.bin"),
        &[("if-none-match", &etag)],
    )
    .await;
    assert_eq!(cached.status, StatusCode::NOT_MODIFIED);
    assert!(cached.body.is_empty());
    assert_eq!(cached.header("etag"), etag);
    let stale = get(
        addr,
        &format!("{base}/reports/junit.xml"),
        &[("if-none-match", &etag)],
    )
    .await;
    assert_eq!(stale.status, StatusCode::OK);
    sent += stale.body.len();

    // Workflow and project scopes, and percent-encoded names.
    push_file(
        &mut c,
        workflow("p", "w1"),
        "cov/index.html",
        b"<html/>",
        0o644,
    )
    .await;
    push_file(&mut c, project("p"), "releases/v 1.json", b"{}", 0o644).await;
    let html = get(
        addr,
        "/api/v1/projects/p/workflows/w1/artifacts/cov/index.html",
        &[],
    )
    .await;
    assert_eq!(
        (html.status, html.header("content-type")),
        (StatusCode::OK, "text/html")
    );
    sent += html.body.len();
    let json = get(
        addr,
        "/api/v1/projects/p/artifacts/releases/v%201.json",
        &[],
    )
    .await;
    assert_eq!(
        (
            json.status,
            json.header("content-type"),
            json.text().as_str()
        ),
        (StatusCode::OK, "application/json", "{}")
    );
    sent += json.body.len();

    // Egress: the bytes of the bodies, exactly; 304 and 416 cost nothing.
    egress_settles_at(&mut c, "p", sent as i64).await;
    server.stop().await;
}

async fn zips_of_every_scope_and_of_the_latest_job(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    let mut jobs = JobServiceClient::new(server.channel().await);
    let addr = server.http_addr;
    let big = content(1_000_000, 3);
    push_file(&mut c, job("p", "j1"), "bin/tool", &big, 0o755).await;
    push_file(&mut c, job("p", "j1"), "notes.txt", b"notes\n", 0o600).await;
    let mut sent = 0;

    let zip = get(addr, "/api/v1/projects/p/jobs/j1/artifacts", &[]).await;
    assert_eq!(zip.status, StatusCode::OK);
    assert_eq!(zip.header("content-type"), "application/zip");
    assert_eq!(
        zip.header("content-disposition"),
        "attachment; filename=\"p-job-j1.zip\""
    );
    let entries = unzip(&zip.body);
    assert_eq!(
        entries,
        [
            ("bin/tool".to_string(), (0o100_755, sha256_hex(&big))),
            ("notes.txt".to_string(), (0o100_600, sha256_hex(b"notes\n"))),
        ]
        .into()
    );
    sent += zip.body.len();

    push_file(&mut c, workflow("p", "w1"), "a.txt", b"w", 0o644).await;
    push_file(&mut c, project("p"), "b.txt", b"p", 0o644).await;
    for (route, name, file) in [
        (
            "/api/v1/projects/p/workflows/w1/artifacts",
            "p-workflow-w1.zip",
            "a.txt",
        ),
        ("/api/v1/projects/p/artifacts", "p-project.zip", "b.txt"),
    ] {
        let zip = get(addr, route, &[]).await;
        assert_eq!(zip.status, StatusCode::OK, "{route}");
        assert_eq!(
            zip.header("content-disposition"),
            format!("attachment; filename=\"{name}\"")
        );
        assert_eq!(unzip(&zip.body).into_keys().collect::<Vec<_>>(), [file]);
        sent += zip.body.len();
    }

    // By ref and job name: the latest PASSED job (a ref with a slash, percent-encoded).
    for (job_id, status) in [("j1", pb::JobStatus::Passed), ("j2", pb::JobStatus::Failed)] {
        jobs.register_job(pb::RegisterJobRequest {
            project_id: "p".into(),
            workflow_id: "w1".into(),
            job_id: job_id.into(),
            job_name: "build all".into(),
            r#ref: "feature/x".into(),
        })
        .await
        .unwrap();
        server.clock.advance_seconds(1);
        jobs.finish_job(pb::FinishJobRequest {
            project_id: "p".into(),
            job_id: job_id.into(),
            status: status as i32,
        })
        .await
        .unwrap();
    }
    push_file(&mut c, job("p", "j2"), "notes.txt", b"failed run", 0o644).await;
    let latest = "/api/v1/projects/p/jobs/artifacts/feature%2Fx";
    let zip = get(addr, &format!("{latest}/download?job=build%20all"), &[]).await;
    assert_eq!(zip.status, StatusCode::OK);
    assert_eq!(
        zip.header("content-disposition"),
        "attachment; filename=\"p-feature_x-build_all.zip\""
    );
    assert_eq!(unzip(&zip.body).len(), 2);
    sent += zip.body.len();
    let raw = get(
        addr,
        &format!("{latest}/raw/notes.txt?job=build%20all"),
        &[],
    )
    .await;
    assert_eq!(
        (raw.status, raw.text().as_str()),
        (StatusCode::OK, "notes\n")
    );
    sent += raw.body.len();
    let partial = get(
        addr,
        &format!("{latest}/raw/bin/tool?job=build%20all"),
        &[("range", "bytes=10-19")],
    )
    .await;
    assert_eq!(partial.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(partial.body, big[10..20]);
    sent += partial.body.len();
    egress_settles_at(&mut c, "p", sent as i64).await;

    // DELETE a job's artifacts: 204, then they are gone; a second DELETE is 404.
    let deleted = send(
        addr,
        Method::DELETE,
        "/api/v1/projects/p/jobs/j1/artifacts",
        &[],
    )
    .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_eq!(
        get(addr, "/api/v1/projects/p/jobs/j1/artifacts", &[])
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        send(
            addr,
            Method::DELETE,
            "/api/v1/projects/p/jobs/j1/artifacts",
            &[]
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );
    let u = c
        .usage
        .get_usage(pb::GetUsageRequest {
            project_id: "p".into(),
            start: Some(prost_types::Timestamp {
                seconds: TEST_EPOCH_SECONDS,
                nanos: 0,
            }),
            end: Some(prost_types::Timestamp {
                seconds: TEST_EPOCH_SECONDS + 10,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    // j2's notes, the workflow's and the project's files remain.
    assert_eq!((u.live_artifacts, u.stored_bytes), (3, 12));
    server.stop().await;
}

async fn what_is_not_there_or_not_valid(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut c = clients(&server).await;
    let addr = server.http_addr;
    push_file(&mut c, job("p", "j1"), "a.txt", b"a", 0o644).await;
    for (route, status, says) in [
        (
            "/api/v1/projects/p/jobs/j1/artifacts/missing.txt",
            404,
            "no artifact",
        ),
        ("/api/v1/projects/p/jobs/j9/artifacts", 404, "no artifact"),
        (
            "/api/v1/projects/p/jobs/j1/artifacts/a/../a.txt",
            400,
            "path",
        ),
        ("/api/v1/projects/p/jobs/j1/artifacts/a//b", 400, "path"),
        ("/api/v1/projects/bad%20id/jobs/j1/artifacts", 400, "scope"),
        (
            "/api/v1/projects/p/jobs/artifacts/main/download",
            400,
            "job",
        ),
        (
            "/api/v1/projects/p/jobs/artifacts/main/download?job=nope",
            404,
            "no PASSED job",
        ),
        (
            "/api/v1/projects/p/jobs/artifacts/main/raw/a.txt?job=nope",
            404,
            "no PASSED job",
        ),
    ] {
        let reply = get(addr, route, &[]).await;
        assert_eq!(reply.status.as_u16(), status, "{route}: {}", reply.text());
        assert!(reply.text().contains(says), "{route}: {}", reply.text());
    }
    server.stop().await;
}
