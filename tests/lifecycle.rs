#![allow(clippy::unwrap_used)]
//! The life of an artifact, over the real server on SQLite and Postgres with a driven clock:
//! it ends at its expiry to the microsecond for every read and frees its path without
//! `force` (concurrent pushes included) while its bill stays exactly what it was; expire_in is
//! bounded by the plan; Keep pins and Unkeep gives the expiry back, never into the past;
//! retention rules (first match wins, `*` vs `**`), their validation, the dry run and
//! applying a policy to live artifacts only; a database from the previous schema; and expiry
//! in real time over the real binary.

mod common;

use std::sync::Arc;

use artifactd::domain::metering::Month;
use artifactd::domain::{Clock, ManualClock, ProjectId, Scope, ScopeKind, Timestamp};
use artifactd::pb::v1 as pb;
use artifactd::server::App;
use common::billing::*;
use common::*;
use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
use tonic::Code;

on_both_backends!(
    an_artifact_ends_at_its_expiry_to_the_microsecond,
    concurrent_pushes_to_an_expired_path_one_wins,
    expire_in_beyond_the_plan_is_refused_naming_the_maximum,
    keep_pins_and_unkeep_never_ends_in_the_past,
    the_first_matching_rule_gives_the_lifetime,
    bad_rules_are_refused_with_the_field_and_the_limit,
    the_dry_run_counts_what_applying_the_policy_ends,
    applying_retention_never_touches_ended_or_kept_artifacts,
    keep_and_retention_page_through_thousands_of_artifacts,
    a_database_from_schema_7_lists_and_bills_the_same,
);

const HOUR_MICROS: i64 = 3_600_000_000;
const DAY_MICROS: i64 = 24 * HOUR_MICROS;

fn duration(micros: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: micros / 1_000_000,
        nanos: ((micros % 1_000_000) * 1_000) as i32,
    }
}

fn micros(t: &prost_types::Timestamp) -> i64 {
    t.seconds * 1_000_000 + i64::from(t.nanos / 1_000)
}

fn expiring(scope: pb::Scope, path: &str, lifetime: i64) -> pb::PushHeader {
    let mut h = header(scope, path);
    h.expire_in = Some(duration(lifetime));
    h
}

fn rule(selector: &str, max_age: i64) -> pb::RetentionRule {
    pb::RetentionRule {
        selector: selector.into(),
        max_age: Some(duration(max_age)),
    }
}

/// Σ size × seconds stored over `[from, to)`, as GetUsage reports it (six decimals).
async fn byte_seconds(c: &mut Clients, project: &str, from: Timestamp, to: Timestamp) -> String {
    c.usage
        .get_usage(pb::GetUsageRequest {
            project_id: project.into(),
            start: Some(ts(from)),
            end: Some(ts(to)),
        })
        .await
        .unwrap()
        .into_inner()
        .storage_byte_seconds
}

async fn stored_bytes(c: &mut Clients, project: &str, now: Timestamp) -> i64 {
    c.usage
        .get_usage(pb::GetUsageRequest {
            project_id: project.into(),
            start: Some(ts(now)),
            end: Some(ts(now.saturating_add_micros(1))),
        })
        .await
        .unwrap()
        .into_inner()
        .stored_bytes
}

async fn listed(c: &mut Clients, scope: pb::Scope, prefix: &str) -> Vec<String> {
    c.artifacts
        .list(pb::ListRequest {
            scope: Some(scope),
            prefix: prefix.into(),
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .artifacts
        .into_iter()
        .map(|a| a.path)
        .collect()
}

async fn keep(
    c: &mut Clients,
    scope: pb::Scope,
    path: &str,
    recursive: bool,
) -> Result<i64, tonic::Status> {
    c.artifacts
        .keep(pb::KeepRequest {
            scope: Some(scope),
            path: path.into(),
            recursive,
        })
        .await
        .map(|r| r.into_inner().kept_count)
}

async fn unkeep(
    c: &mut Clients,
    scope: pb::Scope,
    path: &str,
    recursive: bool,
) -> Result<i64, tonic::Status> {
    c.artifacts
        .unkeep(pb::UnkeepRequest {
            scope: Some(scope),
            path: path.into(),
            recursive,
        })
        .await
        .map(|r| r.into_inner().unkept_count)
}

async fn set_policy(
    c: &mut Clients,
    project: &str,
    policy: pb::RetentionPolicy,
    apply_to_existing: bool,
) -> Result<pb::SetRetentionPolicyResponse, tonic::Status> {
    c.controls
        .set_retention_policy(pb::SetRetentionPolicyRequest {
            project_id: project.into(),
            policy: Some(policy),
            apply_to_existing,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// One artifact row as stored: (deleted_at, end_reason, billing_end, expires_at, keep),
/// read with plain SQL, independently of the service.
type Row = (Option<i64>, Option<String>, Option<i64>, Option<i64>, bool);

async fn rows(server: &TestServer, project: &str, path: &str) -> Vec<Row> {
    let conn = Database::connect(server.db.url.as_str()).await.unwrap();
    let backend = conn.get_database_backend();
    let sql = match backend {
        DbBackend::Postgres => {
            "SELECT deleted_at, end_reason, billing_end, expires_at, keep FROM artifacts \
             WHERE project_id = $1 AND path = $2 ORDER BY id"
        }
        _ => {
            "SELECT deleted_at, end_reason, billing_end, expires_at, keep FROM artifacts \
             WHERE project_id = ? AND path = ? ORDER BY id"
        }
    };
    let found = conn
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            sql,
            [project.into(), path.into()],
        ))
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.try_get_by_index(0).unwrap(),
                r.try_get_by_index(1).unwrap(),
                r.try_get_by_index(2).unwrap(),
                r.try_get_by_index(3).unwrap(),
                r.try_get_by_index(4).unwrap(),
            )
        })
        .collect();
    let _ = conn.close().await;
    found
}

/// At `expires_at` an artifact is gone for Stat, Pull, List, Delete and Keep at once, not a
/// microsecond earlier; a push takes its path without `force`, marking the old row ended at
/// its expiry; the byte-seconds billed for it are the same before and after.
async fn an_artifact_ends_at_its_expiry_to_the_microsecond(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut c = clients(&server).await;
    let t0 = server.clock.now();
    // One hour and one microsecond.
    let lifetime = HOUR_MICROS + 1;
    let expiry = t0.saturating_add_micros(lifetime);
    let scope = job("p", "j");
    let first = content(1000, 1);
    let pushed = push(
        &mut c.artifacts,
        expiring(scope.clone(), "dist/app.bin", lifetime),
        &first,
    )
    .await
    .unwrap()
    .artifact
    .unwrap();
    assert_eq!(
        micros(pushed.expires_at.as_ref().unwrap()),
        expiry.as_micros()
    );

    server
        .clock
        .set(Timestamp::from_micros(expiry.as_micros() - 1));
    let live = stat(&mut c.artifacts, scope.clone(), "dist/app.bin")
        .await
        .unwrap();
    assert_eq!(live.sha256, sha256_hex(&first));
    assert_eq!(
        pull(&mut c.artifacts, scope.clone(), "dist/app.bin", 0, 0)
            .await
            .unwrap()
            .data,
        first
    );
    assert_eq!(listed(&mut c, scope.clone(), "").await, ["dist/app.bin"]);
    let taken = push(
        &mut c.artifacts,
        header(scope.clone(), "dist/app.bin"),
        b"early",
    )
    .await
    .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");

    server.clock.set(expiry);
    let gone = stat(&mut c.artifacts, scope.clone(), "dist/app.bin")
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    assert_eq!(
        gone.message(),
        "no artifact \"dist/app.bin\" in job j of project p"
    );
    let gone = pull(&mut c.artifacts, scope.clone(), "dist/app.bin", 0, 0)
        .await
        .err()
        .unwrap();
    assert_eq!(gone.code(), Code::NotFound);
    assert!(listed(&mut c, scope.clone(), "").await.is_empty());
    let delete = c
        .artifacts
        .delete(pb::DeleteRequest {
            scope: Some(scope.clone()),
            path: "dist".into(),
            recursive: true,
        })
        .await
        .unwrap_err();
    assert_eq!(delete.code(), Code::NotFound);
    assert_eq!(
        keep(&mut c, scope.clone(), "dist/app.bin", false)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    // 1000 B × 3600.000001 s, whatever happens to the row from now on.
    let window = (t0, expiry.saturating_add_micros(HOUR_MICROS));
    let billed = byte_seconds(&mut c, "p", window.0, window.1).await;
    assert_eq!(billed, "3600000.001000");

    // The path is free: no force needed, and the old row ends at its expiry, not now.
    let second = content(1000, 2);
    server.clock.set(expiry.saturating_add_micros(5));
    push(
        &mut c.artifacts,
        header(scope.clone(), "dist/app.bin"),
        &second,
    )
    .await
    .unwrap();
    let history = rows(&server, "p", "dist/app.bin").await;
    assert_eq!(
        history[0],
        (
            Some(expiry.as_micros()),
            Some("expired".into()),
            Some(expiry.as_micros()),
            Some(expiry.as_micros()),
            false
        )
    );
    assert_eq!(history.len(), 2);
    assert_eq!(history[1].0, None);
    assert_eq!(
        pull(&mut c.artifacts, scope.clone(), "dist/app.bin", 0, 0)
            .await
            .unwrap()
            .data,
        second
    );
    assert_eq!(
        byte_seconds(&mut c, "p", window.0, expiry).await,
        billed,
        "the expired artifact's bill did not move"
    );
    // Then the new artifact counts from its own creation only.
    server.clock.set(window.1);
    assert_eq!(
        byte_seconds(&mut c, "p", window.0, window.1).await,
        "7199999.996000"
    );

    // A forced push over an expired row ends it as expired too, not as overwritten.
    let short = expiring(scope.clone(), "short.txt", 10);
    push(&mut c.artifacts, short, b"s").await.unwrap();
    let pushed_at = server.clock.now();
    server.clock.set(pushed_at.saturating_add_micros(20));
    let mut forced = header(scope.clone(), "short.txt");
    forced.force = true;
    push(&mut c.artifacts, forced, b"t").await.unwrap();
    let history = rows(&server, "p", "short.txt").await;
    let end = pushed_at.as_micros() + 10;
    assert_eq!(
        history[0],
        (
            Some(end),
            Some("expired".into()),
            Some(end),
            Some(end),
            false
        )
    );
    server.stop().await;
}

/// Eight pushes without force race for the path of an expired artifact: exactly one wins,
/// the others are ALREADY_EXISTS, and the old row is marked ended once, at its expiry.
async fn concurrent_pushes_to_an_expired_path_one_wins(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut c = clients(&server).await;
    let scope = job("p", "j");
    // Undeclared (existence check, then the transaction), declared small (a blob file,
    // settled at commit) and inline (on Postgres the one-statement insert first).
    for (round, (size, declared)) in [(100_000usize, false), (20_000, true), (100, true)]
        .into_iter()
        .enumerate()
    {
        let path = format!("race-{round}.bin");
        let base = server.clock.now();
        let mut h = expiring(scope.clone(), &path, HOUR_MICROS);
        if declared {
            h.expected_size = Some(size as i64);
        }
        push(&mut c.artifacts, h, &content(size, 99)).await.unwrap();
        server.clock.set(base.saturating_add_micros(HOUR_MICROS));
        let mut tasks = Vec::new();
        for i in 0..8u64 {
            let mut client = server.client().await;
            let scope = scope.clone();
            let path = path.clone();
            tasks.push(tokio::spawn(async move {
                let mut h = header(scope, &path);
                if declared {
                    h.expected_size = Some(size as i64);
                }
                let data = content(size, 1000 + i);
                push(&mut client, h, &data).await.map(|_| data)
            }));
        }
        let mut winners = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                Ok(data) => winners.push(data),
                Err(status) => assert_eq!(status.code(), Code::AlreadyExists, "{status:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}");
        let history = rows(&server, "p", &path).await;
        let expiry = base.as_micros() + HOUR_MICROS;
        assert_eq!(history.len(), 2, "round {round}: {history:?}");
        assert_eq!(history[0].0, Some(expiry));
        assert_eq!(history[0].1.as_deref(), Some("expired"));
        assert_eq!(history[1].0, None);
        assert_eq!(
            pull(&mut c.artifacts, scope.clone(), &path, 0, 0)
                .await
                .unwrap()
                .data,
            winners[0]
        );
    }
    server.stop().await;
}

async fn expire_in_beyond_the_plan_is_refused_naming_the_maximum(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut c = clients(&server).await;
    // The free plan keeps artifacts at most 30 days: one microsecond more is refused.
    let err = push(
        &mut c.artifacts,
        expiring(job("p", "j"), "a.bin", 30 * DAY_MICROS + 1),
        b"x",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "header.expire_in: is longer than the free plan's maximum retention of 30 days"
    );
    let t0 = server.clock.now();
    let exact = push(
        &mut c.artifacts,
        expiring(job("p", "j"), "a.bin", 30 * DAY_MICROS),
        b"x",
    )
    .await
    .unwrap()
    .artifact
    .unwrap();
    assert_eq!(
        micros(exact.expires_at.as_ref().unwrap()),
        t0.as_micros() + 30 * DAY_MICROS
    );
    server.stop().await;
}

/// Keep pins (billed while stored, past its expiry); Unkeep before the expiry gives it
/// back, after it ends the artifact now — never in the past; keeping something ended is
/// NOT_FOUND.
async fn keep_pins_and_unkeep_never_ends_in_the_past(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut c = clients(&server).await;
    let t0 = server.clock.now();
    let scope = job("p", "j");
    let expiry = t0.as_micros() + HOUR_MICROS;
    for path in [
        "a.txt",
        "dir/b.txt",
        "dir/c.txt",
        "dir/sub/d.txt",
        "gone.txt",
    ] {
        push(
            &mut c.artifacts,
            expiring(scope.clone(), path, HOUR_MICROS),
            &[7u8; 100],
        )
        .await
        .unwrap();
    }
    assert_eq!(
        keep(&mut c, scope.clone(), "a.txt", false).await.unwrap(),
        1
    );
    assert_eq!(
        keep(&mut c, scope.clone(), "a.txt", false).await.unwrap(),
        0,
        "keeping a kept artifact changes nothing"
    );
    let kept = stat(&mut c.artifacts, scope.clone(), "a.txt")
        .await
        .unwrap();
    assert!(kept.keep);
    assert_eq!(micros(kept.expires_at.as_ref().unwrap()), expiry);
    assert_eq!(keep(&mut c, scope.clone(), "dir/", true).await.unwrap(), 3);
    let folder = keep(&mut c, scope.clone(), "dir", false).await.unwrap_err();
    assert_eq!(folder.code(), Code::NotFound);
    assert_eq!(
        folder.message(),
        "no live artifact \"dir\" in job j of project p (for a folder, set recursive)"
    );
    c.artifacts
        .delete(pb::DeleteRequest {
            scope: Some(scope.clone()),
            path: "gone.txt".into(),
            recursive: false,
        })
        .await
        .unwrap();
    assert_eq!(
        keep(&mut c, scope.clone(), "gone.txt", false)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound,
        "a deleted artifact stays deleted"
    );

    // Unkept before its expiry: the expiry comes back as it was.
    server
        .clock
        .set(Timestamp::from_micros(t0.as_micros() + HOUR_MICROS / 2));
    assert_eq!(
        unkeep(&mut c, scope.clone(), "dir/c.txt", false)
            .await
            .unwrap(),
        1
    );
    let c_row = stat(&mut c.artifacts, scope.clone(), "dir/c.txt")
        .await
        .unwrap();
    assert!(!c_row.keep);
    assert_eq!(micros(c_row.expires_at.as_ref().unwrap()), expiry);

    // At the original expiry the kept ones stay, the unkept one is gone.
    server.clock.set(Timestamp::from_micros(expiry));
    for path in ["a.txt", "dir/b.txt", "dir/sub/d.txt"] {
        assert!(
            stat(&mut c.artifacts, scope.clone(), path).await.is_ok(),
            "{path}"
        );
    }
    assert_eq!(
        stat(&mut c.artifacts, scope.clone(), "dir/c.txt")
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        keep(&mut c, scope.clone(), "dir/c.txt", false)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound,
        "an expired artifact cannot be kept back to life"
    );
    assert_eq!(
        listed(&mut c, scope.clone(), "").await,
        ["a.txt", "dir/b.txt", "dir/sub/d.txt"]
    );

    // Unkept two hours in, past the original expiry: it ends now, not an hour ago.
    let two_hours = t0.as_micros() + 2 * HOUR_MICROS;
    server.clock.set(Timestamp::from_micros(two_hours));
    assert_eq!(
        unkeep(&mut c, scope.clone(), "dir/b.txt", false)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        stat(&mut c.artifacts, scope.clone(), "dir/b.txt")
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        rows(&server, "p", "dir/b.txt").await,
        [(None, None, Some(two_hours), Some(two_hours), false)]
    );
    assert_eq!(
        unkeep(&mut c, scope.clone(), "dir/b.txt", false)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        unkeep(&mut c, scope.clone(), "a.txt", false).await.unwrap(),
        1
    );
    assert_eq!(
        keep(&mut c, scope.clone(), "a.txt", false)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(unkeep(&mut c, scope.clone(), "dir", true).await.unwrap(), 1);

    // Three hours in: a.txt, b.txt and d.txt were billed for two hours (kept past their
    // expiry, then released), c.txt for its hour, gone.txt (deleted at once) for nothing.
    let three_hours = Timestamp::from_micros(t0.as_micros() + 3 * HOUR_MICROS);
    server.clock.set(three_hours);
    assert_eq!(
        byte_seconds(&mut c, "p", t0, three_hours).await,
        format!("{}.000000", 100 * (3 * 7200 + 3600))
    );
    server.stop().await;
}

async fn the_first_matching_rule_gives_the_lifetime(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut c = clients(&server).await;
    let t0 = server.clock.now().as_micros();
    c.controls
        .update_usage_controls(pb::UpdateUsageControlsRequest {
            project_id: "p".into(),
            controls: Some(pb::UsageControls {
                retention_job_days: Some(10),
                ..Default::default()
            }),
            update_mask: None,
            apply_to_existing: false,
        })
        .await
        .unwrap();
    let policy = pb::RetentionPolicy {
        job_rules: vec![
            rule("/logs/debug/**", DAY_MICROS),
            rule("logs/**", 7 * DAY_MICROS),
            rule("**/*.xml", 3 * DAY_MICROS),
            rule("bin/*", 2 * DAY_MICROS),
        ],
        workflow_rules: vec![],
        project_rules: vec![rule("releases/**", 30 * DAY_MICROS)],
    };
    let stored = set_policy(&mut c, "p", policy, false).await.unwrap();
    assert_eq!(stored.updated_artifacts, 0);
    let got = c
        .controls
        .get_retention_policy(pb::GetRetentionPolicyRequest {
            project_id: "p".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, stored.policy.unwrap());
    assert_eq!(
        got.job_rules[0].selector, "logs/debug/**",
        "a leading / is dropped"
    );

    let expires =
        |a: pb::PushResponse| micros(a.artifact.unwrap().expires_at.as_ref().unwrap()) - t0;
    for (scope, path, lifetime) in [
        (job("p", "j"), "logs/debug/x/y.txt", DAY_MICROS),
        // First match wins: logs/** comes before **/*.xml.
        (job("p", "j"), "logs/report.xml", 7 * DAY_MICROS),
        (job("p", "j"), "reports/deep/er/t.xml", 3 * DAY_MICROS),
        (job("p", "j"), "t.xml", 3 * DAY_MICROS),
        (job("p", "j"), "bin/tool", 2 * DAY_MICROS),
        // `*` stays in its folder: no rule matches, the project's setting applies.
        (job("p", "j"), "bin/sub/tool", 10 * DAY_MICROS),
        // No workflow rules, no workflow setting: the plan's maximum.
        (workflow("p", "w"), "logs/a", 30 * DAY_MICROS),
        (project("p"), "releases/v1/app", 30 * DAY_MICROS),
    ] {
        let pushed = push(&mut c.artifacts, header(scope, path), b"x")
            .await
            .unwrap();
        assert_eq!(expires(pushed), lifetime, "{path}");
    }
    // The push's own expire_in wins over every rule.
    let pushed = push(
        &mut c.artifacts,
        expiring(job("p", "j"), "logs/own.txt", 5 * HOUR_MICROS),
        b"x",
    )
    .await
    .unwrap();
    assert_eq!(expires(pushed), 5 * HOUR_MICROS);

    // A new policy applies to the next push at once (read per push, no stale cache).
    set_policy(
        &mut c,
        "p",
        pb::RetentionPolicy {
            job_rules: vec![rule("logs/**", 4 * DAY_MICROS)],
            ..Default::default()
        },
        false,
    )
    .await
    .unwrap();
    let pushed = push(
        &mut c.artifacts,
        header(job("p", "j"), "logs/next.txt"),
        b"x",
    )
    .await
    .unwrap();
    assert_eq!(expires(pushed), 4 * DAY_MICROS);
    let untouched = stat(&mut c.artifacts, job("p", "j"), "logs/report.xml")
        .await
        .unwrap();
    assert_eq!(
        micros(untouched.expires_at.as_ref().unwrap()) - t0,
        7 * DAY_MICROS,
        "without apply_to_existing, existing artifacts keep their expiry"
    );
    set_policy(&mut c, "p", pb::RetentionPolicy::default(), false)
        .await
        .unwrap();
    let pushed = push(
        &mut c.artifacts,
        header(job("p", "j"), "logs/last.txt"),
        b"x",
    )
    .await
    .unwrap();
    assert_eq!(expires(pushed), 10 * DAY_MICROS, "no rules: the setting");

    // The setting applied to existing artifacts leaves those a rule selects to the rule.
    set_policy(
        &mut c,
        "p",
        pb::RetentionPolicy {
            job_rules: vec![rule("logs/**", 4 * DAY_MICROS)],
            ..Default::default()
        },
        false,
    )
    .await
    .unwrap();
    c.controls
        .update_usage_controls(pb::UpdateUsageControlsRequest {
            project_id: "p".into(),
            controls: Some(pb::UsageControls {
                retention_job_days: Some(1),
                ..Default::default()
            }),
            update_mask: None,
            apply_to_existing: true,
        })
        .await
        .unwrap();
    let ruled = stat(&mut c.artifacts, job("p", "j"), "logs/next.txt")
        .await
        .unwrap();
    assert_eq!(
        micros(ruled.expires_at.as_ref().unwrap()) - t0,
        4 * DAY_MICROS
    );
    let set = stat(&mut c.artifacts, job("p", "j"), "bin/sub/tool")
        .await
        .unwrap();
    assert_eq!(micros(set.expires_at.as_ref().unwrap()) - t0, DAY_MICROS);
    server.stop().await;
}

async fn bad_rules_are_refused_with_the_field_and_the_limit(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut c = clients(&server).await;
    let good = pb::RetentionPolicy {
        job_rules: vec![rule("logs/**", DAY_MICROS)],
        ..Default::default()
    };
    set_policy(&mut c, "p", good.clone(), false).await.unwrap();
    let cases = [
        (
            pb::RetentionPolicy {
                job_rules: vec![rule("logs/**", DAY_MICROS), rule("a/[b", DAY_MICROS)],
                ..Default::default()
            },
            "policy.job_rules[1].selector: is not a valid glob: error parsing glob 'a/[b': \
             unclosed character class; missing ']'",
        ),
        (
            pb::RetentionPolicy {
                workflow_rules: vec![rule("x", 0)],
                ..Default::default()
            },
            "policy.workflow_rules[0].max_age: must be positive",
        ),
        (
            pb::RetentionPolicy {
                project_rules: vec![pb::RetentionRule {
                    selector: "x".into(),
                    max_age: Some(prost_types::Duration {
                        seconds: -60,
                        nanos: 0,
                    }),
                }],
                ..Default::default()
            },
            "policy.project_rules[0].max_age: must be positive",
        ),
        (
            pb::RetentionPolicy {
                job_rules: vec![pb::RetentionRule {
                    selector: "x".into(),
                    max_age: None,
                }],
                ..Default::default()
            },
            "policy.job_rules[0].max_age: is required",
        ),
        (
            pb::RetentionPolicy {
                workflow_rules: vec![rule("x", 30 * DAY_MICROS + 1)],
                ..Default::default()
            },
            "policy.workflow_rules[0].max_age: is longer than the free plan's maximum \
             retention of 30 days",
        ),
        (
            pb::RetentionPolicy {
                project_rules: vec![rule("x", DAY_MICROS); 101],
                ..Default::default()
            },
            "policy.project_rules: more than 100 rules",
        ),
        (
            pb::RetentionPolicy {
                job_rules: vec![rule("", DAY_MICROS)],
                ..Default::default()
            },
            "policy.job_rules[0].selector: must not be empty",
        ),
    ];
    for (policy, message) in cases {
        let err = set_policy(&mut c, "p", policy.clone(), true)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{message}");
        assert_eq!(err.message(), message);
        let err = c
            .controls
            .dry_run_retention(pb::DryRunRetentionRequest {
                project_id: "p".into(),
                policy: Some(policy),
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.message(),
            message,
            "the dry run checks rules the same way"
        );
    }
    // 100 rules are fine; the refused ones left the stored policy as it was.
    let got = c
        .controls
        .get_retention_policy(pb::GetRetentionPolicyRequest {
            project_id: "p".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, good);
    let hundred = pb::RetentionPolicy {
        project_rules: vec![rule("x/**", DAY_MICROS); 100],
        ..Default::default()
    };
    let stored = set_policy(&mut c, "p", hundred, false).await.unwrap();
    assert_eq!(stored.policy.unwrap().project_rules.len(), 100);
    let missing = c
        .controls
        .get_retention_policy(pb::GetRetentionPolicyRequest {
            project_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    server.stop().await;
}

/// The dry run's figures per rule are exactly what applying the same policy then ends:
/// live artifacts and stored bytes drop by them, nothing else moves, and the dry run
/// itself ends nothing.
async fn the_dry_run_counts_what_applying_the_policy_ends(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut c = clients(&server).await;
    let t0 = server.clock.now();
    let j = job("p", "j1");
    let w = workflow("p", "w1");
    for (scope, path, size) in [
        (j.clone(), "logs/a.log", 100),
        (j.clone(), "logs/b.log", 200),
        (j.clone(), "logs/deep/c.log", 300),
        (j.clone(), "dist/app", 1000),
        (j.clone(), "reports/r.xml", 50),
        (w.clone(), "logs/w.log", 7),
    ] {
        push(
            &mut c.artifacts,
            header(scope, path),
            &content(size, size as u64),
        )
        .await
        .unwrap();
    }
    keep(&mut c, j.clone(), "logs/b.log", false).await.unwrap();
    let now = t0.saturating_add_micros(2 * DAY_MICROS);
    server.clock.set(now);
    push(
        &mut c.artifacts,
        header(j.clone(), "logs/new.log"),
        &content(400, 4),
    )
    .await
    .unwrap();
    let policy = pb::RetentionPolicy {
        job_rules: vec![
            rule("logs/*.log", DAY_MICROS),
            rule("logs/**", 3 * DAY_MICROS),
            rule("**", 2 * DAY_MICROS),
        ],
        workflow_rules: vec![rule("**", DAY_MICROS)],
        project_rules: vec![],
    };
    let dry = c
        .controls
        .dry_run_retention(pb::DryRunRetentionRequest {
            project_id: "p".into(),
            policy: Some(policy.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    let figures: Vec<(i32, u32, &str, i64, i64)> = dry
        .rules
        .iter()
        .map(|r| {
            (
                r.scope_kind,
                r.position,
                r.rule.as_ref().unwrap().selector.as_str(),
                r.artifacts,
                r.bytes,
            )
        })
        .collect();
    let (jk, wk) = (pb::ScopeKind::Job as i32, pb::ScopeKind::Workflow as i32);
    assert_eq!(
        figures,
        [
            // a.log (b.log is kept, new.log is young)
            (jk, 0, "logs/*.log", 1, 100),
            // deep/c.log is 2 days old: within 3
            (jk, 1, "logs/**", 0, 0),
            // dist/app and reports/r.xml: exactly 2 days old, so due now
            (jk, 2, "**", 2, 1050),
            (wk, 0, "**", 1, 7),
        ]
    );
    assert_eq!((dry.artifacts, dry.bytes), (4, 1157));
    assert_eq!(micros(dry.at.as_ref().unwrap()), now.as_micros());
    // Nothing ended, and the stored (empty) policy would end nothing.
    assert!(
        stat(&mut c.artifacts, j.clone(), "logs/a.log")
            .await
            .is_ok()
    );
    let stored = c
        .controls
        .dry_run_retention(pb::DryRunRetentionRequest {
            project_id: "p".into(),
            policy: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (stored.rules.len(), stored.artifacts, stored.bytes),
        (0, 0, 0)
    );

    let before_listed =
        listed(&mut c, j.clone(), "").await.len() + listed(&mut c, w.clone(), "").await.len();
    let before_stored = stored_bytes(&mut c, "p", now).await;
    let applied = set_policy(&mut c, "p", policy, true).await.unwrap();
    // Every live, unkept artifact a rule selects: a, c, new, app, r.xml, w.
    assert_eq!(applied.updated_artifacts, 6);
    let after_listed =
        listed(&mut c, j.clone(), "").await.len() + listed(&mut c, w.clone(), "").await.len();
    assert_eq!(before_listed - after_listed, 4);
    assert_eq!(before_stored - stored_bytes(&mut c, "p", now).await, 1157);
    assert_eq!(
        listed(&mut c, j.clone(), "").await,
        ["logs/b.log", "logs/deep/c.log", "logs/new.log"]
    );
    // They end now, not in the past.
    assert_eq!(
        rows(&server, "p", "dist/app").await,
        [(
            None,
            None,
            Some(now.as_micros()),
            Some(now.as_micros()),
            false
        )]
    );
    let again = c
        .controls
        .dry_run_retention(pb::DryRunRetentionRequest {
            project_id: "p".into(),
            policy: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.rules.len(), again.artifacts, again.bytes), (4, 0, 0));
    server.stop().await;
}

/// Applying retention (rules or the setting) to existing artifacts moves only the future
/// end of artifacts live and unkept now: deleted, overwritten and expired rows, swept or
/// not, and kept ones are untouched, and the billed past stays the same to the microsecond.
async fn applying_retention_never_touches_ended_or_kept_artifacts(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut c = clients(&server).await;
    let t0 = server.clock.now();
    let j = job("p", "j");
    for path in ["deleted.bin", "over.bin", "kept.bin", "live.bin"] {
        push(&mut c.artifacts, header(j.clone(), path), &[1u8; 1000])
            .await
            .unwrap();
    }
    push(
        &mut c.artifacts,
        expiring(j.clone(), "expired.bin", 2 * HOUR_MICROS),
        &[1u8; 1000],
    )
    .await
    .unwrap();
    keep(&mut c, j.clone(), "kept.bin", false).await.unwrap();
    server.clock.set(t0.saturating_add_micros(HOUR_MICROS));
    c.artifacts
        .delete(pb::DeleteRequest {
            scope: Some(j.clone()),
            path: "deleted.bin".into(),
            recursive: false,
        })
        .await
        .unwrap();
    let mut forced = header(j.clone(), "over.bin");
    forced.force = true;
    push(&mut c.artifacts, forced, &[2u8; 10]).await.unwrap();
    let now = t0.saturating_add_micros(3 * HOUR_MICROS);
    server.clock.set(now);
    let before = ended_rows(&server, now).await;
    assert_eq!(before.len(), 4);
    let billed = byte_seconds(&mut c, "p", t0, now).await;
    assert_eq!(
        billed,
        format!(
            "{}.000000",
            // deleted 1 h, over 1 h then 10 B × 2 h, kept and live 3 h, expired 2 h
            1000 * 3600 + 1000 * 3600 + 10 * 7200 + 2 * 1000 * 10800 + 1000 * 7200
        )
    );
    set_policy(
        &mut c,
        "p",
        pb::RetentionPolicy {
            job_rules: vec![rule("**", HOUR_MICROS)],
            ..Default::default()
        },
        true,
    )
    .await
    .unwrap();
    c.controls
        .update_usage_controls(pb::UpdateUsageControlsRequest {
            project_id: "p".into(),
            controls: Some(pb::UsageControls {
                retention_job_days: Some(1),
                ..Default::default()
            }),
            update_mask: None,
            apply_to_existing: true,
        })
        .await
        .unwrap();
    assert_eq!(ended_rows(&server, now).await, before);
    assert_eq!(byte_seconds(&mut c, "p", t0, now).await, billed);
    // The live ones (live.bin and the new over.bin) end now under the one-hour rule.
    assert_eq!(listed(&mut c, j.clone(), "").await, ["kept.bin"]);
    server.stop().await;
}

/// Keep, Unkeep, the dry run and applying a policy work 1,000 rows at a time: 2,700
/// artifacts over two jobs take several pages (one crossing from one job to the next), and
/// every artifact is counted once.
async fn keep_and_retention_page_through_thousands_of_artifacts(backend: Backend) {
    use artifactd::domain::{ArtifactPath, Sha256};
    use artifactd::store::{NewArtifact, PushedBlob};
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut c = clients(&server).await;
    let t0 = server.clock.now();
    push(&mut c.artifacts, header(job("p", "j0"), "first"), b"x")
        .await
        .unwrap();
    let sha = Sha256::parse("sha", &sha256_hex(b"x")).unwrap();
    // The lease a push takes on its blob before committing, as Push does.
    let epoch = server.app.store.lease_blob(&sha, 1, t0).await.unwrap();
    for (job_id, count) in [("j1", 1500), ("j2", 1200)] {
        for i in 0..count {
            let new = NewArtifact {
                scope: Scope::parse("scope", "p", ScopeKind::Job, job_id).unwrap(),
                path: ArtifactPath::parse("path", &format!("f/{i:05}")).unwrap(),
                size: 10,
                sha256: sha.clone(),
                mode: 0o644,
                created_at: t0,
                expires_at: Some(t0.saturating_add_micros(30 * DAY_MICROS)),
                upload_id: uuid::Uuid::new_v4().simple().to_string(),
                record_ingress: false,
            };
            server
                .app
                .store
                .commit_push(
                    &new,
                    false,
                    None,
                    &PushedBlob::Stored {
                        deduplicated: true,
                        epoch,
                    },
                )
                .await
                .unwrap();
        }
    }
    assert_eq!(keep(&mut c, job("p", "j1"), "f", true).await.unwrap(), 1500);
    assert_eq!(keep(&mut c, job("p", "j1"), "f", true).await.unwrap(), 0);
    assert_eq!(
        unkeep(&mut c, job("p", "j1"), "f", true).await.unwrap(),
        1500
    );
    assert_eq!(
        keep(&mut c, job("p", "j2"), "f/00007", false)
            .await
            .unwrap(),
        1
    );
    server.clock.set(t0.saturating_add_micros(DAY_MICROS));
    let policy = pb::RetentionPolicy {
        job_rules: vec![rule("f/*", DAY_MICROS)],
        ..Default::default()
    };
    let dry = c
        .controls
        .dry_run_retention(pb::DryRunRetentionRequest {
            project_id: "p".into(),
            policy: Some(policy.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    // Every f/ file but the kept one; "first" matches no rule.
    assert_eq!((dry.artifacts, dry.bytes), (2699, 26_990));
    let applied = set_policy(&mut c, "p", policy, true).await.unwrap();
    assert_eq!(applied.updated_artifacts, 2699);
    assert!(listed(&mut c, job("p", "j1"), "").await.is_empty());
    assert_eq!(listed(&mut c, job("p", "j2"), "").await, ["f/00007"]);
    server.stop().await;
}

/// The rows that ended before `now` (deleted, overwritten, expired) or are kept.
async fn ended_rows(server: &TestServer, now: Timestamp) -> Vec<Row> {
    let mut all = Vec::new();
    for path in ["deleted.bin", "over.bin", "kept.bin", "expired.bin"] {
        all.extend(
            rows(server, "p", path)
                .await
                .into_iter()
                .filter(|row| row.4 || row.2.is_some_and(|end| end < now.as_micros())),
        );
    }
    all
}

/// A database populated under schema 7 — a live artifact, one expired that nothing marked,
/// one deleted — migrates: it lists the live one only, bills October exactly as before, and
/// the expired one's path takes a push without force.
async fn a_database_from_schema_7_lists_and_bills_the_same(backend: Backend) {
    let Some(db) = TestDb::create(backend).await else {
        return;
    };
    let (oct1, oct11, oct21) = (
        at(2026, 10, 1, 0).as_micros(),
        at(2026, 10, 11, 0).as_micros(),
        at(2026, 10, 21, 0).as_micros(),
    );
    let dec31 = at(2026, 12, 31, 0).as_micros();
    let gib: i64 = 1 << 30;
    {
        let conn = db.connect_migrated_to(7).await;
        let a = "a".repeat(64);
        let statements = [
            "INSERT INTO projects (project_id, plan_id, alert_thresholds, created_at, updated_at) \
             VALUES ('legacy', 'team', '', 0, 0)"
                .to_owned(),
            "INSERT INTO project_plans (project_id, valid_from, plan_id, assigned_at) \
             VALUES ('legacy', 0, 'team', 0)"
                .to_owned(),
            format!("INSERT INTO blobs (sha256, size, created_at) VALUES ('{a}', 1, 0)"),
            format!(
                "INSERT INTO artifacts (project_id, scope_kind, scope_id, path, size, sha256, mode, \
                 created_at, expires_at, keep, deleted_at, end_reason, upload_id, billing_end) VALUES \
                 ('legacy', 'project', '', 'live.bin', {}, '{a}', 420, {oct1}, {dec31}, false, NULL, NULL, 'u1', {dec31}), \
                 ('legacy', 'project', '', 'expired.bin', {}, '{a}', 420, {oct1}, {oct11}, false, NULL, NULL, 'u2', {oct11}), \
                 ('legacy', 'project', '', 'deleted.bin', {}, '{a}', 420, {oct1}, {dec31}, false, {oct21}, 'deleted', 'u3', {oct21})",
                gib,
                3 * gib,
                2 * gib
            ),
        ];
        for statement in statements {
            conn.execute_unprepared(&statement).await.unwrap();
        }
        let _ = conn.close().await;
    }
    let blob_dir = tempfile::tempdir().unwrap();
    let config = artifactd::config::Config::with_stores(
        &db.url,
        &format!("file://{}", blob_dir.path().display()),
    );
    let clock = ManualClock::new(at(2026, 11, 27, 0));
    let app = App::build(&config, Arc::new(clock)).await.unwrap();
    let project_id = ProjectId::parse("p", "legacy").unwrap();
    let october = Month::parse("m", "2026-10").unwrap();
    let storage = |bill: &artifactd::service::Bill| {
        bill.lines
            .iter()
            .find(|l| l.meter.as_str() == "storage")
            .unwrap()
            .usage
            .to_decimal()
    };
    let bill = app.metering.bill(&project_id, october).await.unwrap();
    // 1 GiB × 31 days + 3 GiB × 10 days + 2 GiB × 20 days = 101/31 GiB-months.
    assert_eq!(storage(&bill), "3.258065");
    let scope = Scope::parse("s", "legacy", ScopeKind::Project, "").unwrap();
    let listed = app.artifacts.list(&scope, "", None, 10).await.unwrap();
    let paths: Vec<&str> = listed.artifacts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(paths, ["live.bin"]);
    let expired = artifactd::domain::ArtifactPath::parse("p", "expired.bin").unwrap();
    assert!(matches!(
        app.artifacts.stat(&scope, &expired).await,
        Err(artifactd::domain::Error::NotFound(_))
    ));
    assert!(
        app.store
            .retention_policy(&project_id)
            .await
            .unwrap()
            .is_empty(),
        "no rules after the migration"
    );
    // Its path is free without force; October's storage is the same afterwards.
    let spec = artifactd::service::PushSpec {
        target: artifactd::domain::ScopedPath {
            scope: scope.clone(),
            path: expired.clone(),
        },
        mode: 0o644,
        force: false,
        expected_size: None,
        expected_sha256: None,
        expire_in_micros: None,
        idempotency_key: None,
        resume: None,
    };
    let chunks = futures::stream::iter([Ok(bytes::Bytes::from_static(b"new"))]);
    app.artifacts.push(spec, chunks).await.unwrap();
    let again = app.metering.bill(&project_id, october).await.unwrap();
    assert_eq!(storage(&again), "3.258065");
    assert_eq!(again.total_micros, bill.total_micros);
    app.store.clone().close().await;
}

/// In real time over the real binary: an artifact pushed with a one-second expire_in is
/// there, then gone for Stat and List the moment its expiry passes, with no sweeper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_ends_artifacts_at_their_expiry_in_real_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = binary::BinaryServer::start(&binary::local_stores(dir.path())).await;
    let mut client =
        pb::artifact_service_client::ArtifactServiceClient::new(server.channel().await);
    let scope = job("p", "j");
    let pushed = push(
        &mut client,
        expiring(scope.clone(), "a.txt", 1_000_000),
        b"soon gone",
    )
    .await
    .unwrap()
    .artifact
    .unwrap();
    let expiry = micros(pushed.expires_at.as_ref().unwrap());
    assert!(stat(&mut client, scope.clone(), "a.txt").await.is_ok());
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as i64
    };
    assert!(now() < expiry, "the first Stat ran within the second");
    tokio::time::sleep(std::time::Duration::from_micros(
        (expiry - now()).max(0) as u64 + 1_000,
    ))
    .await;
    let gone = stat(&mut client, scope.clone(), "a.txt").await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let listing = client
        .list(pb::ListRequest {
            scope: Some(scope.clone()),
            prefix: String::new(),
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listing.artifacts.is_empty());
    push(&mut client, header(scope.clone(), "a.txt"), b"again")
        .await
        .unwrap();
}
