#![allow(clippy::unwrap_used)]
//! Group commit of small pushes (`ARTIFACTD_PUSH_GROUP_COMMITS`, Postgres): pushes that
//! collide on a path inside one group, and a group whose statement fails as a whole. Real
//! server, real Postgres (and SQLite, where every push commits alone, for the same
//! outcomes), real Redis when available; the groups are made deterministic by holding a
//! blob row locked from a session of the test's own, so the pushes queue behind a group
//! that cannot finish, and by reading `artifactd_push_group_*` from `/metrics`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use artifactd::domain::Clock;
use artifactd::pb::v1 as pb;
use common::billing::*;
use common::*;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, TransactionTrait};
use tonic::Code;

on_both_backends!(colliding_small_pushes_store_one_per_path_and_bill_it_once);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_group_commits_each_of_its_pushes_alone() {
    failed_group_commits_each_push_alone(Backend::Postgres).await;
}

const PROJECT: &str = "grouped";
const SIZE: usize = 4096;

/// Contended paths, pushers per contended path, and pushes to paths of their own.
const CONTENDED: usize = 8;
const CONTENDERS: usize = 4;
const UNCONTENDED: usize = 8;

async fn colliding_small_pushes_store_one_per_path_and_bill_it_once(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |c| c.push_group_commits = 1).await
    else {
        return;
    };
    let sql = Database::connect(server.db.url.as_str()).await.unwrap();
    let mut c = clients(&server).await;
    let scope = job(PROJECT, "j");

    // Postgres: a push whose group waits on a blob row this test holds locked; every push
    // after it queues for the next group, which therefore holds them all.
    let seed = content(SIZE, 1);
    small_push(&mut c.artifacts, scope.clone(), "seed", &seed)
        .await
        .unwrap();
    let plug = (backend == Backend::Postgres).then(|| seed.clone());
    let held = match &plug {
        Some(data) => Some(hold_blob(&sql, data).await),
        None => None,
    };
    let mut plug_push = None;
    if let Some(data) = plug {
        let channel = server.channel().await;
        let scope = scope.clone();
        plug_push = Some(tokio::spawn(async move {
            let mut client = pb::artifact_service_client::ArtifactServiceClient::new(channel);
            small_push(&mut client, scope, "plug", &data).await
        }));
        wait_for_blocked_groups(&sql, 1).await;
    }

    // Every contended path gets CONTENDERS pushes of distinct content, every other path one.
    let mut pushes = Vec::new();
    for path in 0..CONTENDED {
        for n in 0..CONTENDERS {
            pushes.push((
                format!("contended/{path}"),
                content(SIZE, 100 + (path * 10 + n) as u64),
            ));
        }
    }
    for path in 0..UNCONTENDED {
        pushes.push((format!("own/{path}"), content(SIZE, 1000 + path as u64)));
    }
    let mut tasks = Vec::new();
    for (path, data) in pushes.clone() {
        let channel = server.channel().await;
        let scope = scope.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = pb::artifact_service_client::ArtifactServiceClient::new(channel);
            small_push(&mut client, scope, &path, &data).await
        }));
    }
    if let Some(held) = held {
        wait_for_waiting(&server, pushes.len()).await;
        held.rollback().await.unwrap();
    }

    let mut winners: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for ((path, data), task) in pushes.iter().zip(tasks) {
        match task.await.unwrap() {
            Ok(pushed) => {
                assert_eq!(pushed.artifact.unwrap().size, SIZE as i64);
                assert!(
                    winners.insert(path.clone(), data.clone()).is_none(),
                    "two pushes to {path} succeeded"
                );
            }
            Err(status) => {
                assert_eq!(status.code(), Code::AlreadyExists, "{path}: {status:?}");
                assert!(status.message().contains(path.as_str()), "{status:?}");
                assert!(path.starts_with("contended/"), "{path} was not contended");
            }
        }
    }
    assert_eq!(
        winners.len(),
        CONTENDED + UNCONTENDED,
        "one winner per path"
    );
    if let Some(plug) = plug_push {
        plug.await.unwrap().unwrap();
        winners.insert("plug".into(), seed.clone());
    }
    for (path, data) in &winners {
        let pulled = pull(&mut c.artifacts, scope.clone(), path, 0, 0)
            .await
            .unwrap();
        assert!(&pulled.data == data, "{path} holds its winner's content");
    }
    // The seed and every winner, once each.
    let stored = (1 + winners.len() as i64) * SIZE as i64;

    // Exactly one artifact row per path, and one ingress record per stored artifact, each
    // the artifact's own: nothing of the losers was written but content nobody references.
    let rows = scalar(
        &sql,
        "SELECT CAST(COUNT(*) AS BIGINT) FROM artifacts WHERE project_id = 'grouped'",
    )
    .await;
    assert_eq!(
        rows,
        (winners.len() + 1) as i64,
        "artifact rows: seed + winners"
    );
    let paths = scalar(
        &sql,
        "SELECT CAST(COUNT(DISTINCT path) AS BIGINT) FROM artifacts WHERE project_id = 'grouped'",
    )
    .await;
    assert_eq!(paths, rows);
    let (ingress, all_ingress) = ingress_records(&sql).await;
    assert_eq!(
        (ingress, all_ingress),
        (rows, rows),
        "one ingress record per artifact"
    );

    let now = server.clock.now();
    let usage = c
        .usage
        .get_usage(pb::GetUsageRequest {
            project_id: PROJECT.into(),
            start: Some(ts(now)),
            end: Some(ts(now.saturating_add_micros(1))),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(usage.stored_bytes, stored, "stored bytes: each winner once");
    assert_eq!(
        usage.ingress_bytes, stored,
        "ingress: each stored push once"
    );

    if backend == Backend::Postgres {
        // The seed and the plug committed in groups of one; everything else in one group.
        let (_, scrape) = http_get(server.http_addr, "/metrics").await;
        let committed = sample(
            &scrape,
            "artifactd_push_group_commits_total",
            &[("outcome", "committed")],
        );
        let grouped = sample(&scrape, "artifactd_push_group_pushes_total", &[]);
        assert_eq!(committed, Some(3.0), "{scrape}");
        assert_eq!(grouped, Some((2 + pushes.len()) as f64));
        assert_eq!(
            sample(&scrape, "artifactd_push_group_waiting", &[]),
            Some(0.0)
        );
    }
    drop(sql);
    server.stop().await;
}

/// A group whose statement fails (here: chosen as a deadlock's victim) is rolled back as a
/// whole; each of its pushes then commits alone and is stored and billed exactly once.
async fn failed_group_commits_each_push_alone(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |c| c.push_group_commits = 1).await
    else {
        return;
    };
    let sql = Database::connect(server.db.url.as_str()).await.unwrap();
    let mut c = clients(&server).await;
    let scope = job(PROJECT, "j");

    // Two stored contents: the plug's, and one the failing group will wait on.
    let plug = content(SIZE, 1);
    let blocker = content(SIZE, 2);
    for (path, data) in [("seed/1", &plug), ("seed/2", &blocker)] {
        small_push(&mut c.artifacts, scope.clone(), path, data)
            .await
            .unwrap();
    }
    // New content that sorts before the blocker: the group inserts its blob row first, then
    // waits on the blocker's row.
    let first = (10..)
        .map(|seed| content(SIZE, seed))
        .find(|data| sha256_hex(data) < sha256_hex(&blocker))
        .unwrap();
    let mut pushes = vec![
        ("b/first".to_owned(), first.clone()),
        ("b/blocked".to_owned(), blocker.clone()),
    ];
    for n in 0..6 {
        pushes.push((format!("b/other-{n}"), content(SIZE, 500 + n)));
    }

    let plug_lock = hold_blob(&sql, &plug).await;
    let blocker_lock = hold_blob(&sql, &blocker).await;
    let plug_push = {
        let channel = server.channel().await;
        let scope = scope.clone();
        let data = plug.clone();
        tokio::spawn(async move {
            let mut client = pb::artifact_service_client::ArtifactServiceClient::new(channel);
            small_push(&mut client, scope, "plug", &data).await
        })
    };
    wait_for_blocked_groups(&sql, 1).await;
    let mut tasks = Vec::new();
    for (path, data) in pushes.clone() {
        let channel = server.channel().await;
        let scope = scope.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = pb::artifact_service_client::ArtifactServiceClient::new(channel);
            small_push(&mut client, scope, &path, &data).await
        }));
    }
    wait_for_waiting(&server, pushes.len()).await;
    // The plug's group commits; the next holds every queued push and stops at the blocker.
    plug_lock.rollback().await.unwrap();
    plug_push.await.unwrap().unwrap();
    wait_for_blocked_groups(&sql, 1).await;
    // Waiting on the group's new row while the group waits on ours: a deadlock, and the
    // group, which has waited longer, is the one Postgres rolls back. (Once it has, the
    // push of that content may commit the row alone before this insert looks again.)
    blocker_lock
        .execute_unprepared(&format!(
            "INSERT INTO blobs (sha256, size, created_at) VALUES ('{}', 1, 0) \
             ON CONFLICT (sha256) DO NOTHING",
            sha256_hex(&first)
        ))
        .await
        .expect("the group, not the test's session, is the deadlock's victim");
    blocker_lock.rollback().await.unwrap();

    for ((path, data), task) in pushes.iter().zip(tasks) {
        let pushed = task
            .await
            .unwrap()
            .unwrap_or_else(|s| panic!("{path}: {s:?}"));
        assert_eq!(pushed.artifact.unwrap().size, SIZE as i64);
        let pulled = pull(&mut c.artifacts, scope.clone(), path, 0, 0)
            .await
            .unwrap();
        assert!(&pulled.data == data, "{path} holds its content");
    }
    let (_, scrape) = http_get(server.http_addr, "/metrics").await;
    assert_eq!(
        sample(
            &scrape,
            "artifactd_push_group_commits_total",
            &[("outcome", "failed")]
        ),
        Some(1.0),
        "{scrape}"
    );
    // Seeds, plug and the group's pushes: each one artifact and one ingress record.
    let expected = (3 + pushes.len()) as i64;
    let rows = scalar(
        &sql,
        "SELECT CAST(COUNT(*) AS BIGINT) FROM artifacts WHERE project_id = 'grouped'",
    )
    .await;
    let (ingress, all_ingress) = ingress_records(&sql).await;
    assert_eq!((rows, ingress, all_ingress), (expected, expected, expected));
    let now = server.clock.now();
    let usage = c
        .usage
        .get_usage(pb::GetUsageRequest {
            project_id: PROJECT.into(),
            start: Some(ts(now)),
            end: Some(ts(now.saturating_add_micros(1))),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(usage.stored_bytes, expected * SIZE as i64);
    assert_eq!(usage.ingress_bytes, expected * SIZE as i64);
    drop(sql);
    server.stop().await;
}

async fn small_push(
    client: &mut pb::artifact_service_client::ArtifactServiceClient<tonic::transport::Channel>,
    scope: pb::Scope,
    path: &str,
    data: &[u8],
) -> Result<pb::PushResponse, tonic::Status> {
    let mut h = header(scope, path);
    h.expected_size = Some(data.len() as i64);
    push(client, h, data).await
}

/// A transaction holding the blob row of `data` locked (until it ends).
async fn hold_blob(sql: &DatabaseConnection, data: &[u8]) -> sea_orm::DatabaseTransaction {
    let txn = sql.begin().await.unwrap();
    let locked = txn
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            format!(
                "SELECT sha256 FROM blobs WHERE sha256 = '{}' FOR UPDATE",
                sha256_hex(data)
            ),
        ))
        .await
        .unwrap();
    assert_eq!(locked.len(), 1);
    txn
}

/// Waits until `n` group statements wait on a lock.
async fn wait_for_blocked_groups(sql: &DatabaseConnection, n: i64) {
    for _ in 0..500 {
        let blocked = scalar(
            sql,
            "SELECT CAST(COUNT(*) AS BIGINT) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock' \
             AND query LIKE 'WITH r0 AS%'",
        )
        .await;
        if blocked == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no group commit waited on the held blob row");
}

/// Waits until `n` pushes wait for a group (`artifactd_push_group_waiting`).
async fn wait_for_waiting(server: &TestServer, n: usize) {
    for _ in 0..500 {
        let (_, scrape) = http_get(server.http_addr, "/metrics").await;
        if sample(&scrape, "artifactd_push_group_waiting", &[]) == Some(n as f64) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{n} pushes never queued for a group");
}

/// The project's ingress records that match an artifact's upload and size, and all of them.
async fn ingress_records(sql: &DatabaseConnection) -> (i64, i64) {
    let matched = scalar(
        sql,
        "SELECT CAST(COUNT(*) AS BIGINT) FROM usage_events u JOIN artifacts a \
         ON u.id = 'push:' || a.upload_id AND u.bytes = a.size \
         WHERE u.project_id = 'grouped' AND u.meter = 'ingress'",
    )
    .await;
    let all = scalar(
        sql,
        "SELECT CAST(COUNT(*) AS BIGINT) FROM usage_events WHERE project_id = 'grouped' \
         AND meter = 'ingress'",
    )
    .await;
    (matched, all)
}

async fn scalar(sql: &DatabaseConnection, query: &str) -> i64 {
    let row = sql
        .query_one_raw(sea_orm::Statement::from_string(
            sql.get_database_backend(),
            query,
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get_by_index(0).unwrap()
}
