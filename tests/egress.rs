#![allow(clippy::unwrap_used)]
//! Egress is recorded durably: a shutdown during pulls bills what the clients received (up
//! to what was in flight), and a transient database error delays a record without losing
//! it. Real server, SQLite and Postgres.

mod common;

use artifactd::pb::v1::{self as pb, artifact_service_client::ArtifactServiceClient};
use common::*;
use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};

on_both_backends!(
    shutdown_during_pulls_records_what_was_sent,
    a_transient_database_error_loses_no_egress,
);

const CHUNK: i64 = 256 * 1024;

/// Egress recorded for `project`, read from the ledger with plain SQL.
async fn recorded_egress(url: &str, project: &str) -> i64 {
    let db = Database::connect(url).await.unwrap();
    let backend = db.get_database_backend();
    let sql = match backend {
        DbBackend::Postgres => {
            "SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM usage_events \
             WHERE meter = 'egress' AND project_id = $1"
        }
        _ => {
            "SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM usage_events \
             WHERE meter = 'egress' AND project_id = ?"
        }
    };
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            sql,
            [project.into()],
        ))
        .await
        .unwrap()
        .unwrap();
    let sum: i64 = row.try_get_by_index(0).unwrap();
    db.close().await.unwrap();
    sum
}

/// A client with a one-chunk HTTP/2 window, so the server can only run a chunk ahead of it.
async fn narrow_client(server: &TestServer) -> ArtifactServiceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .initial_stream_window_size(CHUNK as u32)
        .initial_connection_window_size(CHUNK as u32)
        .connect()
        .await
        .unwrap();
    ArtifactServiceClient::new(channel)
}

/// The server is told to stop (as by SIGTERM) while three pulls are open and their clients
/// have stopped reading, plus one that completed. At the drain each stalled pull records
/// what it handed to the transport and is cut (UNAVAILABLE): the recorded egress is what
/// the clients received, plus at most one chunk per cancelled stream (handed to the
/// transport, never delivered if the connection dies first).
async fn shutdown_during_pulls_records_what_was_sent(backend: Backend) {
    let Some(mut server) = TestServer::start_metered(backend, |config| {
        config.drain_timeout = std::time::Duration::from_secs(1);
    })
    .await
    else {
        return;
    };
    let mut client = server.client().await;
    let data = content(8 << 20, 1);
    push(&mut client, header(job("sd", "j"), "big.bin"), &data)
        .await
        .unwrap();
    let full = pull(&mut client, job("sd", "j"), "big.bin", 0, 0)
        .await
        .unwrap();
    let mut received = full.data.len() as i64;

    let mut open = Vec::new();
    for reads in [1, 2, 3] {
        let mut narrow = narrow_client(&server).await;
        let mut stream = narrow
            .pull(pb::PullRequest {
                scope: Some(job("sd", "j")),
                path: "big.bin".into(),
                offset: 0,
                length: 0,
            })
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().expect("metadata");
        for _ in 0..reads {
            match stream.message().await.unwrap() {
                Some(pb::PullResponse {
                    msg: Some(pb::pull_response::Msg::Chunk(chunk)),
                }) => received += chunk.len() as i64,
                other => panic!("expected a chunk, got {other:?}"),
            }
        }
        open.push((narrow, stream));
    }
    // Let the server fill the clients' windows, then stop it with the streams stalled.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    server.shut_down().await;
    // Whatever reached the clients' side before the server went counts as received.
    let mut cut = 0;
    for (_client, mut stream) in open {
        loop {
            let next = tokio::time::timeout(std::time::Duration::from_secs(2), stream.message());
            match next.await {
                Ok(Ok(Some(pb::PullResponse {
                    msg: Some(pb::pull_response::Msg::Chunk(chunk)),
                }))) => received += chunk.len() as i64,
                Ok(Err(status)) => {
                    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                    cut += 1;
                    break;
                }
                Ok(Ok(_)) => break,
                Err(_) => panic!("a stream outlived its server"),
            }
        }
    }

    assert_eq!(
        cut, 3,
        "each stalled pull ends UNAVAILABLE (retry from its offset)"
    );

    let billed = recorded_egress(&server.db.url, "sd").await;
    eprintln!("billed {billed} for {received} received");
    assert!(billed >= received, "billed {billed} < received {received}");
    assert!(
        billed <= received + 3 * CHUNK,
        "billed {billed} for {received} received"
    );
}

/// The usage table is briefly unavailable (renamed away) when a pull ends: its record fails,
/// is retried with backoff under the same id, and lands once the table is back.
async fn a_transient_database_error_loses_no_egress(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut client = server.client().await;
    let data = content(4 << 20, 2);
    push(&mut client, header(job("tr", "j"), "f.bin"), &data)
        .await
        .unwrap();
    // A one-chunk window keeps the server from finishing before the client reads.
    let mut client = narrow_client(&server).await;
    // Admitted first (admission reads usage on BLOCK plans), then the table goes away
    // while the pull streams, so the record at its end fails.
    let mut stream = client
        .pull(pb::PullRequest {
            scope: Some(job("tr", "j")),
            path: "f.bin".into(),
            offset: 0,
            length: 0,
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("metadata");
    let admin = Database::connect(server.db.url.as_str()).await.unwrap();
    admin
        .execute_unprepared("ALTER TABLE usage_events RENAME TO usage_events_away")
        .await
        .unwrap();
    let mut received = 0;
    while let Some(message) = stream.message().await.unwrap() {
        if let Some(pb::pull_response::Msg::Chunk(chunk)) = message.msg {
            received += chunk.len();
        }
    }
    assert_eq!(received, data.len());
    // The record's first attempts fail while the table is away.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    admin
        .execute_unprepared("ALTER TABLE usage_events_away RENAME TO usage_events")
        .await
        .unwrap();
    admin.close().await.unwrap();
    let mut billed = 0;
    for _ in 0..3000 {
        billed = recorded_egress(&server.db.url, "tr").await;
        if billed > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(billed, data.len() as i64, "recorded once, after the outage");
    server.stop().await;
}
