#![allow(clippy::unwrap_used)]
//! `GET /metrics` after a real workload: the payload byte counters move by exactly the bytes
//! of the gRPC messages, every call is counted under its method and status code (streams
//! when they end, cancelled ones too), and the domain counters (pushes, dedup, usage
//! records, replays, rejections) match what happened. With `ARTIFACTD_SCRAPE_DIR` set, the
//! final scrape is written there for `promtool check metrics` (CI).

mod common;

use artifactd::domain::Clock;
use artifactd::pb::v1 as pb;
use common::*;
use prost::Message;
use tonic::Code;

/// Bytes of gRPC messages on the wire: a 5-byte prefix (compression flag, length) each.
fn wire_bytes<M: Message>(messages: &[M]) -> f64 {
    messages.iter().map(|m| 5 + m.encoded_len()).sum::<usize>() as f64
}

async fn scrape(server: &TestServer) -> String {
    let (status, body) = http_get(server.http_addr, "/metrics").await;
    assert_eq!(status, 200);
    body
}

fn rpc<'a>(method: &'a str, code: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("service", "artifactd.v1.ArtifactService"),
        ("method", method),
        ("code", code),
    ]
}

fn method(method: &str) -> Vec<(&str, &str)> {
    vec![
        ("service", "artifactd.v1.ArtifactService"),
        ("method", method),
    ]
}

/// Waits until the scrape satisfies `done` (for what is recorded just after a client saw
/// its response end: egress records, a cancelled stream noticed by the server).
async fn scrape_until(server: &TestServer, done: impl Fn(&str) -> bool) -> String {
    for _ in 0..200 {
        let text = scrape(server).await;
        if done(&text) {
            return text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    scrape(server).await
}

async fn counts_and_bytes(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut client = server.client().await;
    let before = scrape(&server).await;
    assert_eq!(
        sample(
            &before,
            "artifactd_grpc_received_bytes_total",
            &method("Push")
        ),
        None,
        "no call yet"
    );
    let build = sample(
        &before,
        "artifactd_build_info",
        &[
            ("version", artifactd::metrics::VERSION),
            ("git_sha", artifactd::metrics::GIT_SHA),
        ],
    );
    assert_eq!(build, Some(1.0));

    // A push of 600 KiB in 256 KiB chunks.
    let data = content(600 * 1024, 1);
    let messages = push_messages(header(job("p", "j1"), "app.bin"), &data, 256 * 1024);
    let pushed = client
        .push(tokio_stream::iter(messages.clone()))
        .await
        .unwrap()
        .into_inner();
    // The same content again at another path: deduplicated.
    let again = push(&mut client, header(job("p", "j1"), "copy.bin"), &data)
        .await
        .unwrap();
    assert!(again.deduplicated);
    // A small declared push: kept inline in the database.
    let small = b"tiny";
    let mut small_header = header(job("p", "j1"), "small.txt");
    small_header.expected_size = Some(4);
    small_header.idempotency_key = "retry-1".into();
    let tiny = push(&mut client, small_header.clone(), small)
        .await
        .unwrap();
    // Its retry is answered from the idempotency key: no second ingress record.
    let retried = push(&mut client, small_header, small).await.unwrap();
    assert_eq!(retried.artifact, tiny.artifact);

    // A pull of the first artifact, every message kept to count its bytes.
    let request = pb::PullRequest {
        scope: Some(job("p", "j1")),
        path: "app.bin".into(),
        offset: 0,
        length: 0,
    };
    let mut stream = client.pull(request.clone()).await.unwrap().into_inner();
    let mut pulled = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        pulled.push(message);
    }
    let content_bytes: usize = pulled
        .iter()
        .filter_map(|m| match &m.msg {
            Some(pb::pull_response::Msg::Chunk(c)) => Some(c.len()),
            _ => None,
        })
        .sum();
    assert_eq!(content_bytes, data.len());

    // Errors: NOT_FOUND and INVALID_ARGUMENT, each under its code.
    let missing = stat(&mut client, job("p", "j1"), "missing")
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let bad = stat(&mut client, job("p", "j1"), "../etc")
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    let text = scrape_until(&server, |t| {
        sample(
            t,
            "artifactd_usage_records_written_total",
            &[("meter", "egress")],
        ) == Some(1.0)
    })
    .await;
    let value = |name: &str, labels: &[(&str, &str)]| sample(&text, name, labels);

    // Push: the three pushes' messages exactly; Pull: its request and every message sent.
    let small_messages = {
        let mut h = header(job("p", "j1"), "small.txt");
        h.expected_size = Some(4);
        h.idempotency_key = "retry-1".into();
        push_messages(h, small, 256 * 1024)
    };
    let copy_messages = push_messages(header(job("p", "j1"), "copy.bin"), &data, 256 * 1024);
    let push_in =
        wire_bytes(&messages) + wire_bytes(&copy_messages) + 2.0 * wire_bytes(&small_messages);
    assert_eq!(
        value("artifactd_grpc_received_bytes_total", &method("Push")),
        Some(push_in)
    );
    assert_eq!(
        value("artifactd_grpc_received_bytes_total", &method("Pull")),
        Some(wire_bytes(&[request]))
    );
    assert_eq!(
        value("artifactd_grpc_sent_bytes_total", &method("Pull")),
        Some(wire_bytes(&pulled))
    );
    assert_eq!(
        value("artifactd_grpc_sent_bytes_total", &method("Push")),
        Some(wire_bytes(&[pushed, again, tiny, retried]))
    );

    assert_eq!(
        value("artifactd_grpc_requests_total", &rpc("Push", "OK")),
        Some(4.0)
    );
    assert_eq!(
        value("artifactd_grpc_requests_total", &rpc("Pull", "OK")),
        Some(1.0)
    );
    assert_eq!(
        value("artifactd_grpc_requests_total", &rpc("Stat", "NOT_FOUND")),
        Some(1.0)
    );
    assert_eq!(
        value(
            "artifactd_grpc_requests_total",
            &rpc("Stat", "INVALID_ARGUMENT")
        ),
        Some(1.0)
    );
    assert_eq!(
        value("artifactd_grpc_requests_total", &rpc("Stat", "OK")),
        None
    );
    assert_eq!(
        value(
            "artifactd_grpc_request_duration_seconds_count",
            &rpc("Push", "OK")
        ),
        Some(4.0)
    );
    assert_eq!(
        value("artifactd_grpc_requests_in_flight", &method("Pull")),
        Some(0.0)
    );

    assert_eq!(
        value("artifactd_pushes_total", &[("storage", "blob_store")]),
        Some(2.0)
    );
    assert_eq!(
        value("artifactd_pushes_total", &[("storage", "inline")]),
        Some(1.0)
    );
    assert_eq!(value("artifactd_dedup_hits_total", &[]), Some(1.0));
    assert_eq!(
        value(
            "artifactd_usage_records_written_total",
            &[("meter", "ingress")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            "artifactd_usage_replays_ignored_total",
            &[("meter", "ingress")]
        ),
        Some(1.0)
    );
    assert_eq!(value("artifactd_data_loss_total", &[]), Some(0.0));
    assert_eq!(
        value("artifactd_quota_reservations_outstanding", &[]),
        Some(0.0)
    );

    // HTTP: the earlier scrapes are counted by route, with their body bytes.
    let (_, health) = http_get(server.http_addr, "/healthz").await;
    let (status, _) = http_get(server.http_addr, "/no/such/page").await;
    assert_eq!(status, 404);
    let text = scrape(&server).await;
    assert_eq!(
        sample(
            &text,
            "artifactd_http_requests_total",
            &[("route", "/healthz"), ("status", "200")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "artifactd_http_sent_bytes_total",
            &[("route", "/healthz")]
        ),
        Some(health.len() as f64)
    );
    assert_eq!(
        sample(
            &text,
            "artifactd_http_requests_total",
            &[("route", "unmatched"), ("status", "404")]
        ),
        Some(1.0),
        "unknown paths share one label, never their own"
    );
    assert!(!text.contains("/no/such/page"));
    for secret in ["app.bin", "j1", "\"p\""] {
        assert!(!text.contains(secret), "{secret} in the scrape");
    }
    write_scrape(backend, &text);
    server.stop().await;
}

/// A stream the client abandons is counted CANCELLED when the server sees it go, and stops
/// being in flight; the live totals the gauges are refreshed from count live artifacts.
async fn cancelled_streams_and_live_totals(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut client = server.client().await;
    let data = content(3 * 1024 * 1024, 2);
    push(&mut client, header(job("p", "j1"), "big.bin"), &data)
        .await
        .unwrap();
    let mut stream = client
        .pull(pb::PullRequest {
            scope: Some(job("p", "j1")),
            path: "big.bin".into(),
            offset: 0,
            length: 0,
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    let text = scrape(&server).await;
    assert_eq!(
        sample(&text, "artifactd_grpc_requests_in_flight", &method("Pull")),
        Some(1.0)
    );
    drop(stream);
    let text = scrape_until(&server, |t| {
        sample(
            t,
            "artifactd_grpc_requests_total",
            &rpc("Pull", "CANCELLED"),
        ) == Some(1.0)
    })
    .await;
    assert_eq!(
        sample(
            &text,
            "artifactd_grpc_requests_total",
            &rpc("Pull", "CANCELLED")
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "artifactd_grpc_requests_in_flight", &method("Pull")),
        Some(0.0)
    );

    let store = &server.app.store;
    let now = server.clock.now();
    assert_eq!(
        store.live_totals(now).await.unwrap(),
        (1, data.len() as i64)
    );
    let mut small = header(job("p", "j2"), "a.txt");
    small.expected_size = Some(3);
    push(&mut client, small, b"abc").await.unwrap();
    assert_eq!(
        store.live_totals(server.clock.now()).await.unwrap(),
        (2, data.len() as i64 + 3)
    );
    // Past the free plan's 30-day retention nothing is live, swept or not.
    server.clock.advance_seconds(31 * 86_400);
    assert_eq!(store.live_totals(server.clock.now()).await.unwrap(), (0, 0));
    server.stop().await;
}

/// Refusals are counted by reason: an artifact over the plan's size, and a push past the
/// storage limit.
async fn rejections_by_reason(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |c| c.max_artifact_bytes = 1000).await
    else {
        return;
    };
    let mut client = server.client().await;
    let mut too_big = header(job("p", "j1"), "big.bin");
    too_big.expected_size = Some(1001);
    let err = push(&mut client, too_big, &content(1001, 3))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // Undeclared: cut off while streaming.
    let err = push(
        &mut client,
        header(job("p", "j1"), "big2.bin"),
        &content(1001, 3),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let text = scrape(&server).await;
    assert_eq!(
        sample(
            &text,
            "artifactd_quota_rejections_total",
            &[("reason", "artifact_size")]
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            "artifactd_quota_rejections_total",
            &[("reason", "storage_quota")]
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            "artifactd_grpc_requests_total",
            &rpc("Push", "RESOURCE_EXHAUSTED")
        ),
        Some(2.0)
    );
    server.stop().await;
}

fn write_scrape(backend: Backend, text: &str) {
    if let Ok(dir) = std::env::var("ARTIFACTD_SCRAPE_DIR") {
        let name = format!("scrape-{backend:?}.prom").to_lowercase();
        std::fs::write(std::path::Path::new(&dir).join(name), text).unwrap();
    }
}

on_both_backends!(
    counts_and_bytes,
    cancelled_streams_and_live_totals,
    rejections_by_reason
);
