#![allow(clippy::unwrap_used)]
//! Push idempotency keys are scoped to the artifact's scope (project + kind + id): a key in
//! one job says nothing about another job's. A replay must be the same push: a different
//! declared size or digest is INVALID_ARGUMENT naming the field. Keys recorded before the
//! scoping migration replay as they did. Real server, SQLite and Postgres.

mod common;

use artifactd::domain::Clock;
use artifactd::pb::v1 as pb;
use common::*;
use sea_orm::ConnectionTrait;
use tonic::Code;

on_both_backends!(
    a_key_in_one_job_says_nothing_about_another,
    a_replay_must_declare_the_same_size_and_digest,
    keys_recorded_before_the_migration_replay_the_same,
);

fn keyed(scope: pb::Scope, path: &str, key: &str) -> pb::PushHeader {
    let mut h = header(scope, path);
    h.idempotency_key = key.into();
    h
}

/// J1 reusing J2's key gets a push of its own (no error naming J2's artifact), and a key J1
/// used first cannot break J2's later push with the same key.
async fn a_key_in_one_job_says_nothing_about_another(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut client = server.client().await;
    let j2_data = content(5_000, 2);
    let j2_header = keyed(job("p", "J2"), "secret/j2-idem.txt", "build-1");
    let j2 = push(&mut client, j2_header.clone(), &j2_data)
        .await
        .unwrap();

    let j1 = push(
        &mut client,
        keyed(job("p", "J1"), "mine.txt", "build-1"),
        &content(7_000, 1),
    )
    .await
    .expect("the same key in another job is a new key");
    let j1_artifact = j1.artifact.unwrap();
    assert_eq!(j1_artifact.path, "mine.txt");
    assert_eq!(j1_artifact.scope, Some(job("p", "J1")));
    assert_eq!(j1_artifact.size, 7_000);

    // J2's retry still replays J2's own push.
    server.clock.advance_seconds(10);
    let replayed = push(&mut client, j2_header, &j2_data).await.unwrap();
    assert_eq!(replayed, j2, "J2's retry returns its first result");

    // No squatting: a key J1 used first does not stop J2 from using it.
    push(
        &mut client,
        keyed(job("p", "J1"), "first.txt", "deploy"),
        &content(100, 3),
    )
    .await
    .unwrap();
    let theirs = push(
        &mut client,
        keyed(job("p", "J2"), "later.txt", "deploy"),
        &content(100, 4),
    )
    .await
    .expect("J1's use of the key does not block J2");
    assert_eq!(theirs.artifact.unwrap().scope, Some(job("p", "J2")));
    // Workflow and project scopes are scopes of their own too.
    for scope in [workflow("p", "J2"), project("p")] {
        push(
            &mut client,
            keyed(scope.clone(), "secret/j2-idem.txt", "build-1"),
            &content(10, 5),
        )
        .await
        .unwrap_or_else(|e| panic!("{scope:?}: {e:?}"));
    }
    server.stop().await;
}

async fn a_replay_must_declare_the_same_size_and_digest(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut client = server.client().await;
    let data = content(10_000, 7);
    let mut h = keyed(job("p", "j"), "r.bin", "k");
    h.expected_size = Some(10_000);
    h.expected_sha256 = sha256_hex(&data);
    let first = push(&mut client, h.clone(), &data).await.unwrap();

    let mut other_size = h.clone();
    other_size.expected_size = Some(9_999);
    other_size.expected_sha256 = String::new();
    let err = push(&mut client, other_size, &data[..9_999])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("header.expected_size:")
            && err.message().contains("9999")
            && err.message().contains("10000"),
        "{}",
        err.message()
    );

    let other = content(10_000, 8);
    let mut other_digest = h.clone();
    other_digest.expected_sha256 = sha256_hex(&other);
    let err = push(&mut client, other_digest, &other).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("header.expected_sha256:")
            && err.message().contains(&sha256_hex(&data)),
        "{}",
        err.message()
    );

    // The same declaration (or none) replays.
    assert_eq!(push(&mut client, h.clone(), &data).await.unwrap(), first);
    let mut undeclared = h;
    undeclared.expected_size = None;
    undeclared.expected_sha256 = String::new();
    assert_eq!(push(&mut client, undeclared, &data).await.unwrap(), first);
    server.stop().await;
}

/// A database written under the previous schema (keys per project) is migrated: each key
/// takes its artifact's scope, replays return the recorded artifact, listings read the same,
/// and the key is now free in other jobs.
async fn keys_recorded_before_the_migration_replay_the_same(backend: Backend) {
    let Some(db) = TestDb::create(backend).await else {
        return;
    };
    let conn = db.connect_migrated_to(5).await;
    let t = TEST_EPOCH_SECONDS * 1_000_000;
    let data = content(3_000, 11);
    let sha = sha256_hex(&data);
    for statement in [
        format!("INSERT INTO blobs (sha256, size, created_at) VALUES ('{sha}', 3000, {t})"),
        format!(
            "INSERT INTO artifacts (id, project_id, scope_kind, scope_id, path, size, sha256, \
             mode, created_at, expires_at, keep, deleted_at, end_reason, upload_id, billing_end) \
             VALUES (7, 'mig', 'job', 'J2', 'out/app.tar', 3000, '{sha}', 420, {t}, NULL, \
             FALSE, NULL, NULL, 'u-7', NULL)"
        ),
        format!(
            "INSERT INTO push_idempotency (project_id, idempotency_key, artifact_id, \
             deduplicated, created_at) VALUES ('mig', 'k-old', 7, FALSE, {t})"
        ),
    ] {
        conn.execute_unprepared(&statement).await.unwrap();
    }
    conn.close().await.unwrap();

    let server = TestServer::start_on(db, |_| {}).await;
    let mut client = server.client().await;
    let before = stat(&mut client, job("mig", "J2"), "out/app.tar")
        .await
        .unwrap();
    assert_eq!(before.size, 3_000);
    // A replay of the recorded push returns the recorded artifact, not a new one.
    server.clock.advance_seconds(3600);
    let mut h = keyed(job("mig", "J2"), "out/app.tar", "k-old");
    h.expected_size = Some(3_000);
    let replayed = push(&mut client, h.clone(), &data).await.unwrap();
    assert_eq!(replayed.artifact, Some(before.clone()));
    let listed = client
        .list(pb::ListRequest {
            scope: Some(job("mig", "J2")),
            prefix: String::new(),
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.artifacts, vec![before]);
    // A different declared size is refused as for any replay.
    h.expected_size = Some(2_999);
    let err = push(&mut client, h, &data[..2_999]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // The key is J2's only: J1 may use it.
    let fresh = push(
        &mut client,
        keyed(job("mig", "J1"), "out/app.tar", "k-old"),
        &data,
    )
    .await
    .unwrap();
    assert_eq!(fresh.artifact.unwrap().scope, Some(job("mig", "J1")));
    assert_eq!(server.clock.now().as_micros(), t + 3_600_000_000);
    server.stop().await;
}
