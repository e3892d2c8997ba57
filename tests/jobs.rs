#![allow(clippy::unwrap_used)]
//! JobService and `keep_latest_per_ref` over the real server, on SQLite and Postgres: job
//! registration and finishing (idempotent, conflicting, unknown), which job is the latest
//! (finish order, ties, a clock moved back), pins that follow the latest PASSED job of each
//! (ref, name) across three runs on two refs with exact storage figures, the setting
//! switched off and on, pushes racing a newer job passing, and a database migrated from the
//! previous schema.

mod common;

use artifactd::domain::{Clock, Timestamp};
use artifactd::pb::v1::{self as pb, job_service_client::JobServiceClient};
use common::billing::*;
use common::*;
use sea_orm::ConnectionTrait;
use tonic::Code;
use tonic::transport::Channel;

on_both_backends!(
    jobs_register_once_and_finish_once,
    the_latest_job_is_the_last_to_pass,
    latest_artifacts_are_kept_per_ref_across_three_runs,
    pushes_racing_a_newer_job_are_released_with_their_job,
    user_keep_and_the_latest_job_pin_never_clear_each_other,
    a_database_from_the_previous_schema_reads_the_same,
);

const DAY: i64 = 86_400;
const HOUR: i64 = 3_600;

async fn register(
    jobs: &mut JobServiceClient<Channel>,
    project: &str,
    job_id: &str,
    name: &str,
    git_ref: &str,
) -> Result<pb::Job, tonic::Status> {
    jobs.register_job(pb::RegisterJobRequest {
        project_id: project.into(),
        workflow_id: "w1".into(),
        job_id: job_id.into(),
        job_name: name.into(),
        r#ref: git_ref.into(),
    })
    .await
    .map(tonic::Response::into_inner)
}

async fn finish(
    jobs: &mut JobServiceClient<Channel>,
    project: &str,
    job_id: &str,
    status: pb::JobStatus,
) -> Result<pb::Job, tonic::Status> {
    jobs.finish_job(pb::FinishJobRequest {
        project_id: project.into(),
        job_id: job_id.into(),
        status: status as i32,
    })
    .await
    .map(tonic::Response::into_inner)
}

async fn latest(
    jobs: &mut JobServiceClient<Channel>,
    project: &str,
    git_ref: &str,
    name: &str,
) -> Result<pb::Job, tonic::Status> {
    jobs.get_latest_job(pb::GetLatestJobRequest {
        project_id: project.into(),
        r#ref: git_ref.into(),
        job_name: name.into(),
    })
    .await
    .map(tonic::Response::into_inner)
}

async fn jobs_register_once_and_finish_once(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut jobs = JobServiceClient::new(server.channel().await);
    let first = register(&mut jobs, "p", "j1", "test: unit 1/2", "feature/login")
        .await
        .unwrap();
    assert_eq!(
        (
            first.job_name.as_str(),
            first.r#ref.as_str(),
            first.status,
            first.latest
        ),
        (
            "test: unit 1/2",
            "feature/login",
            pb::JobStatus::Running as i32,
            false
        )
    );
    assert_eq!(first.registered_at, Some(ts(server.clock.now())));
    assert_eq!(first.finished_at, None);
    // The same registration again (a retried call) returns the stored job unchanged.
    server.clock.advance_seconds(5);
    let again = register(&mut jobs, "p", "j1", "test: unit 1/2", "feature/login")
        .await
        .unwrap();
    assert_eq!(again, first);
    // The same id with another ref is another job: refused.
    let conflict = register(&mut jobs, "p", "j1", "test: unit 1/2", "main")
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists, "{conflict:?}");
    assert!(
        conflict.message().contains("already registered"),
        "{conflict:?}"
    );
    // The same job id in another project is unrelated.
    register(&mut jobs, "q", "j1", "build", "main")
        .await
        .unwrap();

    for (name, git_ref, field) in [
        ("", "main", "job_name"),
        ("build", "", "ref"),
        ("build\n", "main", "job_name"),
        ("build", "ma\u{202e}in", "ref"),
    ] {
        let bad = register(&mut jobs, "p", "j9", name, git_ref)
            .await
            .unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument, "{name:?} {git_ref:?}");
        assert!(bad.message().starts_with(field), "{bad:?}");
    }

    let unknown = finish(&mut jobs, "p", "nope", pb::JobStatus::Passed)
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    for status in [pb::JobStatus::Running, pb::JobStatus::Unspecified] {
        let bad = finish(&mut jobs, "p", "j1", status).await.unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument, "{status:?}");
    }
    let bad = jobs
        .finish_job(pb::FinishJobRequest {
            project_id: "p".into(),
            job_id: "j1".into(),
            status: 42,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    let finished_at = server.clock.now();
    let passed = finish(&mut jobs, "p", "j1", pb::JobStatus::Passed)
        .await
        .unwrap();
    assert_eq!(passed.status, pb::JobStatus::Passed as i32);
    assert_eq!(passed.finished_at, Some(ts(finished_at)));
    assert!(passed.latest);
    // Finishing again the same way is a retry: nothing changes.
    server.clock.advance_seconds(60);
    assert_eq!(
        finish(&mut jobs, "p", "j1", pb::JobStatus::Passed)
            .await
            .unwrap(),
        passed
    );
    let twice = finish(&mut jobs, "p", "j1", pb::JobStatus::Failed)
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::FailedPrecondition, "{twice:?}");
    assert!(twice.message().contains("already finished as PASSED"));
    // Re-registering a finished job returns it as it is.
    assert_eq!(
        register(&mut jobs, "p", "j1", "test: unit 1/2", "feature/login")
            .await
            .unwrap(),
        passed
    );
    server.stop().await;
}

async fn the_latest_job_is_the_last_to_pass(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut jobs = JobServiceClient::new(server.channel().await);
    let none = latest(&mut jobs, "p", "main", "build").await.unwrap_err();
    assert_eq!(none.code(), Code::NotFound);
    for id in ["a", "b", "c", "d", "e"] {
        register(&mut jobs, "p", id, "build", "main").await.unwrap();
    }
    register(&mut jobs, "p", "other-ref", "build", "dev")
        .await
        .unwrap();
    register(&mut jobs, "p", "other-name", "test", "main")
        .await
        .unwrap();
    // A failed or canceled job is never the latest.
    finish(&mut jobs, "p", "a", pb::JobStatus::Failed)
        .await
        .unwrap();
    finish(&mut jobs, "p", "e", pb::JobStatus::Canceled)
        .await
        .unwrap();
    assert_eq!(
        latest(&mut jobs, "p", "main", "build")
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    // Registered later, finished first: c is the latest until b finishes after it.
    server.clock.advance_seconds(10);
    finish(&mut jobs, "p", "c", pb::JobStatus::Passed)
        .await
        .unwrap();
    assert_eq!(
        latest(&mut jobs, "p", "main", "build")
            .await
            .unwrap()
            .job_id,
        "c"
    );
    server.clock.advance_seconds(10);
    finish(&mut jobs, "p", "b", pb::JobStatus::Passed)
        .await
        .unwrap();
    let b = latest(&mut jobs, "p", "main", "build").await.unwrap();
    assert_eq!((b.job_id.as_str(), b.latest), ("b", true));
    // d finishes at the same instant as b: registered after b, it wins the tie.
    finish(&mut jobs, "p", "d", pb::JobStatus::Passed)
        .await
        .unwrap();
    assert_eq!(
        latest(&mut jobs, "p", "main", "build")
            .await
            .unwrap()
            .job_id,
        "d"
    );
    // Other refs and names have their own latest.
    finish(&mut jobs, "p", "other-ref", pb::JobStatus::Passed)
        .await
        .unwrap();
    assert_eq!(
        latest(&mut jobs, "p", "dev", "build").await.unwrap().job_id,
        "other-ref"
    );
    assert_eq!(
        latest(&mut jobs, "p", "main", "build")
            .await
            .unwrap()
            .job_id,
        "d"
    );
    // A job that passes "before" the latest did (the clock moved back) does not displace it.
    register(&mut jobs, "p", "f", "build", "main")
        .await
        .unwrap();
    server.clock.advance_seconds(-3600);
    let f = finish(&mut jobs, "p", "f", pb::JobStatus::Passed)
        .await
        .unwrap();
    assert!(!f.latest);
    assert_eq!(
        latest(&mut jobs, "p", "main", "build")
            .await
            .unwrap()
            .job_id,
        "d"
    );
    let bad = latest(&mut jobs, "p", "main", "").await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    server.stop().await;
}

async fn set_keep_latest(c: &mut Clients, project: &str, on: bool) {
    let controls = c
        .controls
        .update_usage_controls(pb::UpdateUsageControlsRequest {
            project_id: project.into(),
            controls: Some(pb::UsageControls {
                keep_latest_per_ref: Some(on),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["keep_latest_per_ref".into()],
            }),
            apply_to_existing: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(controls.keep_latest_per_ref, Some(on));
}

async fn usage(c: &mut Clients, project: &str, start: i64, end: i64) -> pb::Usage {
    c.usage
        .get_usage(pb::GetUsageRequest {
            project_id: project.into(),
            start: Some(prost_types::Timestamp {
                seconds: start,
                nanos: 0,
            }),
            end: Some(prost_types::Timestamp {
                seconds: end,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn push_sized(c: &mut Clients, job_id: &str, path: &str, size: usize) -> pb::Artifact {
    let mut h = header(job("p", job_id), path);
    h.expected_size = Some(size as i64);
    push(&mut c.artifacts, h, &content(size, size as u64))
        .await
        .unwrap()
        .artifact
        .unwrap()
}

/// Three runs of job "build" on `main` (passed, failed, passed) and two on `dev` (both
/// passed), one day of retention, the clock driven across expiries: exactly the latest
/// passed job's artifacts of each ref outlive their retention, the released ones end at
/// their own expiry or at the release if that has passed, and storage is billed to the
/// byte-second.
async fn latest_artifacts_are_kept_per_ref_across_three_runs(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let t0 = TEST_EPOCH_SECONDS;
    let mut c = clients(&server).await;
    let mut jobs = JobServiceClient::new(server.channel().await);
    let stat_of = |c: &mut Clients, job_id: &str, path: &str| {
        let mut artifacts = c.artifacts.clone();
        let (job_id, path) = (job_id.to_owned(), path.to_owned());
        async move {
            stat(&mut artifacts, job("p", &job_id), &path)
                .await
                .unwrap()
        }
    };
    // A push creates the project; then one day of job retention.
    push_sized(&mut c, "setup", "x", 1).await;
    c.artifacts
        .delete(pb::DeleteRequest {
            scope: Some(job("p", "setup")),
            path: "x".into(),
            recursive: false,
        })
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
            apply_to_existing: false,
        })
        .await
        .unwrap();
    assert_eq!(
        c.controls
            .get_usage_controls(pb::GetUsageControlsRequest {
                project_id: "p".into()
            })
            .await
            .unwrap()
            .into_inner()
            .keep_latest_per_ref,
        Some(true),
        "on by default"
    );

    // t0: main run 1 (A1) and dev run 1 (B1) push, then pass an hour later.
    register(&mut jobs, "p", "A1", "build", "main")
        .await
        .unwrap();
    register(&mut jobs, "p", "B1", "build", "dev")
        .await
        .unwrap();
    let a1 = push_sized(&mut c, "A1", "a.bin", 1000).await;
    assert_eq!(
        a1.expires_at,
        Some(prost_types::Timestamp {
            seconds: t0 + DAY,
            nanos: 0
        })
    );
    assert!(!a1.kept_latest);
    push_sized(&mut c, "B1", "b.bin", 2000).await;
    server.clock.set(Timestamp::from_seconds(t0 + HOUR));
    finish(&mut jobs, "p", "A1", pb::JobStatus::Passed)
        .await
        .unwrap();
    finish(&mut jobs, "p", "B1", pb::JobStatus::Passed)
        .await
        .unwrap();
    let pinned = stat_of(&mut c, "A1", "a.bin").await;
    assert!(pinned.kept_latest, "{pinned:?}");
    assert_eq!(
        pinned.expires_at, a1.expires_at,
        "the expiry is kept for later"
    );

    // t0+2h: main run 2 (A2) pushes and fails: A1 stays the latest.
    server.clock.set(Timestamp::from_seconds(t0 + 2 * HOUR));
    register(&mut jobs, "p", "A2", "build", "main")
        .await
        .unwrap();
    push_sized(&mut c, "A2", "a.bin", 3000).await;
    finish(&mut jobs, "p", "A2", pb::JobStatus::Failed)
        .await
        .unwrap();
    assert!(stat_of(&mut c, "A1", "a.bin").await.kept_latest);
    assert!(!stat_of(&mut c, "A2", "a.bin").await.kept_latest);

    // t0+3h: main run 3 (A3) pushes, passes at t0+4h: A1 is released (its expiry, t0+1d,
    // is still ahead) and A3 pinned; a file A3 pushes after passing is pinned at once.
    server.clock.set(Timestamp::from_seconds(t0 + 3 * HOUR));
    register(&mut jobs, "p", "A3", "build", "main")
        .await
        .unwrap();
    push_sized(&mut c, "A3", "a.bin", 4000).await;
    server.clock.set(Timestamp::from_seconds(t0 + 4 * HOUR));
    finish(&mut jobs, "p", "A3", pb::JobStatus::Passed)
        .await
        .unwrap();
    let released = stat_of(&mut c, "A1", "a.bin").await;
    assert!(!released.kept_latest);
    assert_eq!(released.expires_at, a1.expires_at);
    assert!(stat_of(&mut c, "A3", "a.bin").await.kept_latest);
    server
        .clock
        .set(Timestamp::from_seconds(t0 + 4 * HOUR + 60));
    let late = push_sized(&mut c, "A3", "late.txt", 700).await;
    assert!(late.kept_latest, "{late:?}");
    // A1 is no longer the latest: what it pushes now expires as usual.
    server.clock.set(Timestamp::from_seconds(t0 + 5 * HOUR));
    let after = push_sized(&mut c, "A1", "after.txt", 100).await;
    assert!(!after.kept_latest);

    // t0+2d: dev run 2 (B2) pushes and passes; B1's expiry (t0+1d) has passed, so it ends
    // now, not in the past.
    server.clock.set(Timestamp::from_seconds(t0 + 2 * DAY));
    register(&mut jobs, "p", "B2", "build", "dev")
        .await
        .unwrap();
    push_sized(&mut c, "B2", "b.bin", 500).await;
    let b1_live = usage(&mut c, "p", t0, t0 + 2 * DAY).await;
    finish(&mut jobs, "p", "B2", pb::JobStatus::Passed)
        .await
        .unwrap();

    // t0+3d+1h: the latest jobs' three files are all that is live.
    let now = t0 + 3 * DAY + HOUR;
    server.clock.set(Timestamp::from_seconds(now));
    let sizes_and_lives: [(i64, i64); 7] = [
        (1000, DAY),                       // A1/a.bin: pinned, released, its own expiry
        (2000, 2 * DAY),                   // B1/b.bin: pinned past expiry, ended at release
        (3000, DAY),                       // A2/a.bin: never pinned
        (4000, now - (t0 + 3 * HOUR)),     // A3/a.bin: pinned, live
        (700, now - (t0 + 4 * HOUR + 60)), // A3/late.txt: pinned at push, live
        (100, DAY),                        // A1/after.txt: pushed after release
        (500, now - (t0 + 2 * DAY)),       // B2/b.bin: pinned, live
    ];
    let expected: i64 = sizes_and_lives.iter().map(|(s, l)| s * l).sum();
    let u = usage(&mut c, "p", t0, now).await;
    assert_eq!(u.storage_byte_seconds, format!("{expected}.000000"));
    assert_eq!((u.stored_bytes, u.live_artifacts), (5200, 3));
    // The window up to B2's pass billed B1 as stored throughout: nothing moved backwards.
    assert_eq!(
        usage(&mut c, "p", t0, t0 + 2 * DAY)
            .await
            .storage_byte_seconds,
        b1_live.storage_byte_seconds
    );
    for (job_id, path) in [("A3", "a.bin"), ("A3", "late.txt"), ("B2", "b.bin")] {
        let a = stat_of(&mut c, job_id, path).await;
        assert!(a.kept_latest, "{job_id}/{path}");
    }

    // Switching the setting off releases every pin, never into the past: all three end now.
    set_keep_latest(&mut c, "p", false).await;
    server.clock.set(Timestamp::from_seconds(now + HOUR));
    let u = usage(&mut c, "p", t0, now + HOUR).await;
    assert_eq!(u.storage_byte_seconds, format!("{expected}.000000"));
    assert_eq!((u.stored_bytes, u.live_artifacts), (0, 0));
    // While off, a passing job pins nothing; switched on, the latest jobs' live files are
    // pinned again (ended ones stay ended).
    let fresh = push_sized(&mut c, "A3", "fresh.txt", 10).await;
    assert!(!fresh.kept_latest);
    set_keep_latest(&mut c, "p", true).await;
    assert!(stat_of(&mut c, "A3", "fresh.txt").await.kept_latest);
    server.clock.set(Timestamp::from_seconds(now + 3 * DAY));
    let u = usage(&mut c, "p", t0, now + 3 * DAY).await;
    assert_eq!(
        u.storage_byte_seconds,
        format!("{}.000000", expected + 10 * (3 * DAY - HOUR))
    );
    assert_eq!((u.stored_bytes, u.live_artifacts), (10, 1));
    server.stop().await;
}

/// Keep (the user's pin) and the latest job's pin are two pins: releasing either leaves the
/// other holding, and the expiry comes back (never into the past) only when both are gone.
async fn user_keep_and_the_latest_job_pin_never_clear_each_other(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let t0 = TEST_EPOCH_SECONDS;
    let mut c = clients(&server).await;
    let mut jobs = JobServiceClient::new(server.channel().await);
    let mut one_day = header(job("p", "J1"), "a.bin");
    one_day.expire_in = Some(prost_types::Duration {
        seconds: DAY,
        nanos: 0,
    });
    push(&mut c.artifacts, one_day.clone(), b"kept twice")
        .await
        .unwrap();
    one_day.path = "b.bin".into();
    push(&mut c.artifacts, one_day, b"latest only")
        .await
        .unwrap();
    register(&mut jobs, "p", "J1", "build", "main")
        .await
        .unwrap();
    finish(&mut jobs, "p", "J1", pb::JobStatus::Passed)
        .await
        .unwrap();
    let keeper = c.artifacts.clone();
    let keep = |path: &str, on: bool| {
        let mut artifacts = keeper.clone();
        let path = path.to_owned();
        async move {
            if on {
                artifacts
                    .keep(pb::KeepRequest {
                        scope: Some(job("p", "J1")),
                        path,
                        recursive: false,
                    })
                    .await
                    .unwrap();
            } else {
                artifacts
                    .unkeep(pb::UnkeepRequest {
                        scope: Some(job("p", "J1")),
                        path,
                        recursive: false,
                    })
                    .await
                    .unwrap();
            }
        }
    };
    keep("a.bin", true).await;
    // Unkeep while the job is the latest: still pinned by it.
    keep("b.bin", true).await;
    keep("b.bin", false).await;
    server.clock.set(Timestamp::from_seconds(t0 + 2 * DAY));
    let b = stat(&mut c.artifacts, job("p", "J1"), "b.bin")
        .await
        .unwrap();
    assert_eq!((b.keep, b.kept_latest), (false, true));
    // A newer job passes: b.bin's expiry (t0+1d) has passed, so it ends now; a.bin stays kept.
    register(&mut jobs, "p", "J2", "build", "main")
        .await
        .unwrap();
    finish(&mut jobs, "p", "J2", pb::JobStatus::Passed)
        .await
        .unwrap();
    let a = stat(&mut c.artifacts, job("p", "J1"), "a.bin")
        .await
        .unwrap();
    assert_eq!((a.keep, a.kept_latest), (true, false));
    assert_eq!(
        a.expires_at,
        Some(prost_types::Timestamp {
            seconds: t0 + DAY,
            nanos: 0
        })
    );
    server.clock.set(Timestamp::from_seconds(t0 + 2 * DAY + 1));
    let gone = stat(&mut c.artifacts, job("p", "J1"), "b.bin")
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    // Unkept at last, a.bin ends now (its expiry is long past), billed until now.
    keep("a.bin", false).await;
    server.clock.set(Timestamp::from_seconds(t0 + 3 * DAY));
    let u = usage(&mut c, "p", t0, t0 + 3 * DAY).await;
    let (a_len, b_len) = (b"kept twice".len() as i64, b"latest only".len() as i64);
    assert_eq!(
        u.storage_byte_seconds,
        format!("{}.000000", a_len * (2 * DAY + 1) + b_len * 2 * DAY)
    );
    assert_eq!(u.live_artifacts, 0);
    server.stop().await;
}

/// Pushes into the latest job race a newer job passing: whichever commits first, no
/// artifact of the older job stays pinned and every one of the newer job's is.
async fn pushes_racing_a_newer_job_are_released_with_their_job(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut jobs = JobServiceClient::new(server.channel().await);
    let client = server.client().await;
    for round in 0..3 {
        let (old, new) = (format!("old{round}"), format!("new{round}"));
        register(&mut jobs, "p", &old, "build", "main")
            .await
            .unwrap();
        register(&mut jobs, "p", &new, "build", "main")
            .await
            .unwrap();
        finish(&mut jobs, "p", &old, pb::JobStatus::Passed)
            .await
            .unwrap();
        let mut pushes = Vec::new();
        for i in 0..16 {
            let mut client = client.clone();
            let old = old.clone();
            pushes.push(tokio::spawn(async move {
                let mut h = header(job("p", &old), &format!("f{i}"));
                h.expected_size = Some(64);
                push(&mut client, h, &content(64, i)).await.unwrap();
            }));
        }
        tokio::task::yield_now().await;
        finish(&mut jobs, "p", &new, pb::JobStatus::Passed)
            .await
            .unwrap();
        for p in pushes {
            p.await.unwrap();
        }
        let conn = server.app.store.connection();
        let rows = conn
            .query_all_raw(sea_orm::Statement::from_string(
                conn.get_database_backend(),
                format!(
                    "SELECT kept_latest, billing_end IS NULL FROM artifacts \
                     WHERE scope_id = '{old}'"
                ),
            ))
            .await
            .unwrap();
        assert_eq!(rows.len(), 16);
        for row in rows {
            let kept: bool = row.try_get_by_index(0).unwrap();
            let endless: bool = row.try_get_by_index(1).unwrap();
            assert!(
                !kept && !endless,
                "round {round}: an old job's artifact stayed pinned"
            );
        }
    }
    server.stop().await;
}

/// A database populated under the previous schema (every migration before the jobs one):
/// its artifacts list and bill the same, none is pinned, and the project keeps the default.
async fn a_database_from_the_previous_schema_reads_the_same(backend: Backend) {
    let Some(db) = TestDb::create(backend).await else {
        return;
    };
    let conn = db
        .connect_migrated_to(TestDb::version_before("m20261127_000009_jobs"))
        .await;
    let t = TEST_EPOCH_SECONDS * 1_000_000;
    let data = content(3_000, 11);
    let sha = sha256_hex(&data);
    for statement in [
        format!(
            "INSERT INTO projects (project_id, plan_id, alert_thresholds, created_at, \
             updated_at) VALUES ('mig', 'free', '', {t}, {t})"
        ),
        format!(
            "INSERT INTO project_plans (project_id, valid_from, plan_id, assigned_at) \
             VALUES ('mig', 0, 'free', {t})"
        ),
        format!("INSERT INTO blobs (sha256, size, created_at) VALUES ('{sha}', 3000, {t})"),
        format!(
            "INSERT INTO artifacts (project_id, scope_kind, scope_id, path, size, sha256, \
             mode, created_at, expires_at, keep, deleted_at, end_reason, upload_id, billing_end) \
             VALUES ('mig', 'job', 'J1', 'out/app.tar', 3000, '{sha}', 420, {t}, {e}, \
             FALSE, NULL, NULL, 'u-1', {e})",
            e = t + 2 * DAY * 1_000_000
        ),
    ] {
        conn.execute_unprepared(&statement).await.unwrap();
    }
    conn.close().await.unwrap();

    let server = TestServer::start_on(db, |_| {}).await;
    let mut c = clients(&server).await;
    let listed = c
        .artifacts
        .list(pb::ListRequest {
            scope: Some(job("mig", "J1")),
            prefix: String::new(),
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.artifacts.len(), 1);
    let a = &listed.artifacts[0];
    assert_eq!(
        (a.size, a.mode, a.keep, a.kept_latest),
        (3000, 420, false, false)
    );
    let controls = c
        .controls
        .get_usage_controls(pb::GetUsageControlsRequest {
            project_id: "mig".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(controls.keep_latest_per_ref, Some(true));
    server
        .clock
        .set(Timestamp::from_seconds(TEST_EPOCH_SECONDS + 3 * DAY));
    let u = usage(
        &mut c,
        "mig",
        TEST_EPOCH_SECONDS,
        TEST_EPOCH_SECONDS + 3 * DAY,
    )
    .await;
    assert_eq!(u.storage_byte_seconds, format!("{}.000000", 3000 * 2 * DAY));
    // Jobs work on the migrated database: J1 passing pins nothing already expired.
    let mut jobs = JobServiceClient::new(server.channel().await);
    register(&mut jobs, "mig", "J1", "build", "main")
        .await
        .unwrap();
    finish(&mut jobs, "mig", "J1", pb::JobStatus::Passed)
        .await
        .unwrap();
    let u = usage(
        &mut c,
        "mig",
        TEST_EPOCH_SECONDS,
        TEST_EPOCH_SECONDS + 3 * DAY,
    )
    .await;
    assert_eq!(u.storage_byte_seconds, format!("{}.000000", 3000 * 2 * DAY));
    server.stop().await;
}
