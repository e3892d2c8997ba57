#![allow(clippy::unwrap_used)]
//! Metering, bills and enforcement end to end, with exact figures computed by hand in each
//! test. Real server, real database (SQLite and Postgres), real Redis when
//! `TEST_REDIS_URL` is set, and a clock the tests drive.

mod common;

use artifactd::domain::{ArtifactPath, Clock, Scope, ScopeKind, Sha256, Timestamp};
use artifactd::pb::v1 as pb;
use artifactd::store::NewArtifact;
use common::billing::*;
use common::*;
use tonic::Code;

on_both_backends!(
    githubs_worked_example_bills_exactly,
    storage_splits_exactly_at_a_month_boundary,
    overwrite_delete_and_expiry_end_intervals_at_the_right_second,
    dedup_bills_each_artifact_and_retries_count_once,
    cancelled_pull_bills_the_bytes_sent,
    block_plan_refuses_at_the_limit_and_accepts_after_a_delete,
    concurrent_pushes_cannot_exceed_a_storage_cap,
    spend_cap_refuses_pushes_past_the_projected_total,
    retention_is_bounded_by_the_plan_and_applies_to_new_pushes,
    alerts_fire_once_per_threshold,
    egress_quota_blocks_pulls_on_block_plans,
    daily_usage_and_projects_usage,
    plans_can_be_managed_and_assigned,
    bills_stay_exact_when_history_is_written_behind_cached_days,
);

const GIB: i64 = 1 << 30;

/// A plan with round prices: 1.000000 per GiB-month and per GiB, nothing included.
fn metered_plan(id: &str, policy: pb::OveragePolicy, storage_limit: Option<i64>) -> pb::Plan {
    pb::Plan {
        id: id.into(),
        name: format!("Plan {id}"),
        currency: "USD".into(),
        included_storage_gib_months: 0,
        included_egress_gib: 0,
        storage_price_micros: 1_000_000,
        egress_price_micros: 1_000_000,
        ingress_price_micros: 0,
        storage_limit_bytes: storage_limit,
        max_artifact_bytes: 100 * GIB,
        max_retention_days: 365,
        overage_policy: policy as i32,
        version: 0,
    }
}

/// Records an artifact of any logical size without streaming its bytes (the storage meter
/// only reads the artifact log), through the same store call a push commits with.
async fn record_artifact(server: &TestServer, project: &str, path: &str, size: i64) {
    let scope = Scope::parse("scope", project, ScopeKind::Project, "").unwrap();
    let new = NewArtifact {
        scope,
        path: ArtifactPath::parse("path", path).unwrap(),
        size,
        sha256: Sha256::parse("sha", &sha256_hex(path.as_bytes())).unwrap(),
        mode: 0o644,
        created_at: server.clock.now(),
        expires_at: None,
        upload_id: uuid::Uuid::new_v4().simple().to_string(),
        record_ingress: true,
    };
    common::billing::commit_recorded(server, &new).await;
}

async fn usage(c: &mut Clients, project: &str, from: Timestamp, to: Timestamp) -> pb::Usage {
    c.usage
        .get_usage(pb::GetUsageRequest {
            project_id: project.into(),
            start: Some(ts(from)),
            end: Some(ts(to)),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn bill(c: &mut Clients, project: &str, month: &str) -> pb::Bill {
    c.usage
        .get_bill(pb::GetBillRequest {
            project_id: project.into(),
            month: month.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn delete(c: &mut Clients, scope: pb::Scope, path: &str) {
    c.artifacts
        .delete(pb::DeleteRequest {
            scope: Some(scope),
            path: path.into(),
            recursive: false,
        })
        .await
        .unwrap();
}

async fn githubs_worked_example_bills_exactly(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    put_on_plan(
        &mut c,
        "gh",
        metered_plan("per-gib", pb::OveragePolicy::Bill, None),
    )
    .await;
    // 3 GiB for 10 days, then 12 GiB for 21 days, in January (31 days).
    server.clock.set(at(2026, 1, 1, 0));
    record_artifact(&server, "gh", "small.tar", 3 * GIB).await;
    server.clock.set(at(2026, 1, 11, 0));
    delete(&mut c, project("gh"), "small.tar").await;
    record_artifact(&server, "gh", "big.tar", 12 * GIB).await;
    server.clock.set(at(2026, 2, 15, 0));

    let b = bill(&mut c, "gh", "2026-01").await;
    let storage = &b.line_items[0];
    assert_eq!(
        (storage.meter.as_str(), storage.unit.as_str()),
        ("storage", "GiB-month")
    );
    // 6,768 GiB-hours / 744 hours = 9.096774 GiB-months.
    assert_eq!(storage.usage, "9.096774");
    assert_eq!(storage.billable, "9.096774");
    // 9.0967741935… × 1.000000 → 9.096774 rounded half-up once.
    assert_eq!(storage.amount_micros, 9_096_774);
    assert_eq!(b.total_micros, 9_096_774);
    assert!(b.closed);
    assert_eq!(b.projected_total_micros, None);

    let u = usage(&mut c, "gh", at(2026, 1, 1, 0), at(2026, 2, 1, 0)).await;
    assert_eq!(u.storage_gib_months, "9.096774");
    // 6,768 GiB-hours in byte-seconds.
    assert_eq!(
        u.storage_byte_seconds,
        format!("{}.000000", 6_768i128 * 3600 * GIB as i128)
    );
    server.stop().await;
}

async fn storage_splits_exactly_at_a_month_boundary(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    put_on_plan(
        &mut c,
        "edge",
        metered_plan("per-gib", pb::OveragePolicy::Bill, None),
    )
    .await;
    server.clock.set(at(2026, 1, 31, 12));
    record_artifact(&server, "edge", "a.bin", GIB).await;
    server.clock.set(at(2026, 2, 1, 12));
    delete(&mut c, project("edge"), "a.bin").await;
    server.clock.set(at(2026, 3, 5, 0));
    // 12 hours of 1 GiB in each month: 12/744 of January, 12/672 of February.
    let jan = bill(&mut c, "edge", "2026-01").await;
    let feb = bill(&mut c, "edge", "2026-02").await;
    assert_eq!(jan.line_items[0].usage, "0.016129");
    assert_eq!(jan.line_items[0].amount_micros, 16_129);
    assert_eq!(feb.line_items[0].usage, "0.017857");
    assert_eq!(feb.line_items[0].amount_micros, 17_857);
    let both = usage(&mut c, "edge", at(2026, 1, 31, 0), at(2026, 2, 2, 0)).await;
    assert_eq!(
        both.storage_byte_seconds,
        format!("{}.000000", GIB as i128 * 86_400)
    );
    // 12/744 + 12/672 = 0.0339861751… → 0.033986
    assert_eq!(both.storage_gib_months, "0.033986");
    server.stop().await;
}

async fn overwrite_delete_and_expiry_end_intervals_at_the_right_second(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    let t0 = server.clock.now();
    let scope = job("ivl", "j1");
    push(
        &mut c.artifacts,
        header(scope.clone(), "overwritten"),
        &content(1000, 1),
    )
    .await
    .unwrap();
    push(
        &mut c.artifacts,
        header(scope.clone(), "deleted"),
        &content(1000, 2),
    )
    .await
    .unwrap();
    let mut expiring = header(scope.clone(), "expiring");
    expiring.expire_in = Some(prost_types::Duration {
        seconds: 300,
        nanos: 0,
    });
    let pushed = push(&mut c.artifacts, expiring, &content(1000, 3))
        .await
        .unwrap();
    assert_eq!(
        pushed.artifact.unwrap().expires_at.unwrap().seconds,
        t0.to_seconds_nanos().0 + 300
    );

    server.clock.advance_seconds(100);
    let mut replace = header(scope.clone(), "overwritten");
    replace.force = true;
    push(&mut c.artifacts, replace, &content(500, 4))
        .await
        .unwrap();
    server.clock.advance_seconds(100);
    delete(&mut c, scope.clone(), "deleted").await;
    server.clock.advance_seconds(800);

    // 1000 B × 100 s (overwritten) + 1000 × 200 (deleted) + 1000 × 300 (expired)
    // + 500 × 900 (the replacement, still stored) = 1,050,000 byte-seconds.
    let end = t0.saturating_add_micros(1000 * 1_000_000);
    let u = usage(&mut c, "ivl", t0, end).await;
    assert_eq!(u.storage_byte_seconds, "1050000.000000");
    assert_eq!(u.stored_bytes, 500, "the expired artifact no longer counts");
    assert_eq!(u.ingress_bytes, 3500);
    server.stop().await;
}

async fn dedup_bills_each_artifact_and_retries_count_once(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    let t0 = server.clock.now();
    let data = content(4096, 7);
    push(&mut c.artifacts, header(job("dd", "a"), "x.bin"), &data)
        .await
        .unwrap();
    let second = push(&mut c.artifacts, header(job("dd", "b"), "x.bin"), &data)
        .await
        .unwrap();
    assert!(second.deduplicated);
    let mut keyed = header(job("dd", "c"), "y.bin");
    keyed.idempotency_key = "retry-me".into();
    push(&mut c.artifacts, keyed.clone(), &data).await.unwrap();
    push(&mut c.artifacts, keyed, &data).await.unwrap();
    server.clock.advance_seconds(10);
    let u = usage(&mut c, "dd", t0, server.clock.now()).await;
    assert_eq!(
        u.stored_bytes,
        3 * 4096,
        "each artifact is billed, deduplicated or not"
    );
    assert_eq!(u.live_artifacts, 3);
    assert_eq!(u.storage_byte_seconds, format!("{}.000000", 3 * 4096 * 10));
    assert_eq!(
        u.ingress_bytes,
        3 * 4096,
        "the retried push recorded no new usage"
    );
    server.stop().await;
}

async fn cancelled_pull_bills_the_bytes_sent(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    let t0 = server.clock.now();
    let data = content(16 * 1024 * 1024, 9);
    push(&mut c.artifacts, header(job("eg", "j"), "big.bin"), &data)
        .await
        .unwrap();

    // A full pull bills exactly its bytes.
    let full = pull(&mut c.artifacts, job("eg", "j"), "big.bin", 0, 0)
        .await
        .unwrap();
    assert_eq!(full.data.len(), data.len());
    let after_full = wait_for_egress(&mut c, "eg", t0, data.len() as i64).await;
    assert_eq!(after_full, data.len() as i64);

    // Read three chunks, then hang up. The client's HTTP/2 window is one chunk, so the
    // server can only have sent a little more than the client read.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .initial_stream_window_size(256 * 1024)
        .initial_connection_window_size(256 * 1024)
        .connect()
        .await
        .unwrap();
    let mut small_window = pb::artifact_service_client::ArtifactServiceClient::new(channel);
    let mut stream = small_window
        .pull(pb::PullRequest {
            scope: Some(job("eg", "j")),
            path: "big.bin".into(),
            offset: 0,
            length: 0,
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap(); // metadata
    let mut received = 0;
    for _ in 0..3 {
        let Some(pb::PullResponse {
            msg: Some(pb::pull_response::Msg::Chunk(chunk)),
        }) = stream.message().await.unwrap()
        else {
            panic!("expected a chunk")
        };
        received += chunk.len() as i64;
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    drop(stream);
    let billed = wait_for_egress(&mut c, "eg", t0, after_full + received).await - after_full;
    // Bytes handed to the transport are billed: what the client read, plus what was in
    // flight when it hung up (its one-chunk window, and a chunk in the server's buffers).
    let chunk = 256 * 1024;
    eprintln!("billed {billed} for {received} received");
    assert!(billed >= received, "billed {billed} < received {received}");
    assert!(
        billed <= received + 2 * chunk,
        "billed {billed} for {received} received"
    );
    assert!(
        billed < data.len() as i64 / 2,
        "a cancelled pull is not billed in full"
    );
    server.stop().await;
}

/// Waits until the recorded egress reaches `at_least` (it is written when a stream ends).
async fn wait_for_egress(c: &mut Clients, project: &str, from: Timestamp, at_least: i64) -> i64 {
    let to = from.saturating_add_micros(40 * 86_400 * 1_000_000);
    let mut last = 0;
    for _ in 0..200 {
        last = usage(c, project, from, to).await.egress_bytes;
        if last >= at_least {
            // Give a straggling record a moment, then read the settled figure.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            return usage(c, project, from, to).await.egress_bytes;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("egress stayed at {last}, expected at least {at_least}");
}

async fn block_plan_refuses_at_the_limit_and_accepts_after_a_delete(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    put_on_plan(
        &mut c,
        "blk",
        metered_plan("tiny", pb::OveragePolicy::Block, Some(1_000_000)),
    )
    .await;
    push(
        &mut c.artifacts,
        header(job("blk", "j"), "a.bin"),
        &content(600_000, 1),
    )
    .await
    .unwrap();

    let mut declared = header(job("blk", "j"), "b.bin");
    declared.expected_size = Some(500_000);
    let err = push(&mut c.artifacts, declared.clone(), &content(500_000, 2))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    for needle in ["1000000", "600000", "tiny"] {
        assert!(
            err.message().contains(needle),
            "{needle} missing from {:?}",
            err.message()
        );
    }
    // Without a declared size the stream is cut when it passes the limit.
    let err = push(
        &mut c.artifacts,
        header(job("blk", "j"), "b.bin"),
        &content(500_000, 2),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);

    if let Some(url) = redis_url() {
        // Losing every hot figure changes nothing: they are rebuilt from the database.
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", server.config.redis_prefix))
            .query_async(&mut con)
            .await
            .unwrap();
        assert!(!keys.is_empty(), "figures are kept in Redis");
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut con)
            .await
            .unwrap();
        let err = push(&mut c.artifacts, declared.clone(), &content(500_000, 2))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::ResourceExhausted,
            "still refused after Redis lost its keys"
        );
    }

    delete(&mut c, job("blk", "j"), "a.bin").await;
    push(&mut c.artifacts, declared, &content(500_000, 2))
        .await
        .expect("accepted after a delete");
    server.stop().await;
}

async fn concurrent_pushes_cannot_exceed_a_storage_cap(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    c.controls
        .update_usage_controls(pb::UpdateUsageControlsRequest {
            project_id: "cap".into(),
            controls: Some(pb::UsageControls {
                storage_cap_bytes: Some(1_000_000),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["storage_cap_bytes".into()],
            }),
            apply_to_existing: false,
        })
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..10u64 {
        let channel = server.channel().await;
        tasks.push(tokio::spawn(async move {
            let mut client = pb::artifact_service_client::ArtifactServiceClient::new(channel);
            let mut h = header(job("cap", &format!("j{i}")), "part.bin");
            if i % 2 == 0 {
                h.expected_size = Some(300_000);
            }
            push(&mut client, h, &content(300_000, i)).await
        }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
        }
    }
    assert_eq!(ok, 3, "3 × 300 kB fit under a 1 MB cap, a 4th does not");
    let u = usage(
        &mut c,
        "cap",
        server.clock.now(),
        server.clock.now().saturating_add_micros(1),
    )
    .await;
    assert_eq!(u.stored_bytes, 900_000);
    server.stop().await;
}

async fn spend_cap_refuses_pushes_past_the_projected_total(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    put_on_plan(
        &mut c,
        "spend",
        metered_plan("per-gib", pb::OveragePolicy::Bill, None),
    )
    .await;
    // At the very start of November, a byte stored to month end costs 1/2^30 of 1.000000.
    server.clock.set(at(2026, 11, 1, 0));
    c.controls
        .update_usage_controls(pb::UpdateUsageControlsRequest {
            project_id: "spend".into(),
            controls: Some(pb::UsageControls {
                spend_cap_micros: Some(1000),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["spend_cap_micros".into()],
            }),
            apply_to_existing: false,
        })
        .await
        .unwrap();
    let mut first = header(job("spend", "j"), "a.bin");
    first.expected_size = Some(1_000_000); // projected 931 micros
    push(&mut c.artifacts, first, &content(1_000_000, 1))
        .await
        .unwrap();
    let b = bill(&mut c, "spend", "2026-11").await;
    assert_eq!(
        b.projected_total_micros,
        Some(931),
        "1e6 × 1e6 / 2^30 = 931.3 → 931"
    );
    let mut second = header(job("spend", "j"), "b.bin");
    second.expected_size = Some(200_000); // would make it 1118
    let err = push(&mut c.artifacts, second, &content(200_000, 2))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("spend cap") && err.message().contains("0.001000"),
        "{}",
        err.message()
    );
    server.stop().await;
}

async fn retention_is_bounded_by_the_plan_and_applies_to_new_pushes(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    let set = |days: i32, apply: bool| pb::UpdateUsageControlsRequest {
        project_id: "ret".into(),
        controls: Some(pb::UsageControls {
            retention_job_days: Some(days),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["retention_job_days".into()],
        }),
        apply_to_existing: apply,
    };
    // The free plan keeps artifacts at most 30 days.
    let err = c
        .controls
        .update_usage_controls(set(31, false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("controls.retention_job_days:") && err.message().contains("30"),
        "{}",
        err.message()
    );

    let t0 = server.clock.now();
    let plan_max = t0.to_seconds_nanos().0 + 30 * 86_400;
    let old = push(&mut c.artifacts, header(job("ret", "j"), "old.bin"), b"old")
        .await
        .unwrap();
    // Nothing set: the plan's maximum is the default.
    assert_eq!(old.artifact.unwrap().expires_at.unwrap().seconds, plan_max);
    c.controls
        .update_usage_controls(set(7, false))
        .await
        .unwrap();
    let new = push(&mut c.artifacts, header(job("ret", "j"), "new.bin"), b"new")
        .await
        .unwrap();
    assert_eq!(
        new.artifact.unwrap().expires_at.unwrap().seconds,
        t0.to_seconds_nanos().0 + 7 * 86_400
    );
    let untouched = stat(&mut c.artifacts, job("ret", "j"), "old.bin")
        .await
        .unwrap();
    assert_eq!(
        untouched.expires_at.unwrap().seconds,
        plan_max,
        "new retention applies to new artifacts only"
    );

    c.controls
        .update_usage_controls(set(3, true))
        .await
        .unwrap();
    for path in ["old.bin", "new.bin"] {
        let a = stat(&mut c.artifacts, job("ret", "j"), path).await.unwrap();
        assert_eq!(
            a.expires_at.unwrap().seconds,
            t0.to_seconds_nanos().0 + 3 * 86_400,
            "{path}"
        );
    }
    let mut too_long = header(job("ret", "j"), "long.bin");
    too_long.expire_in = Some(prost_types::Duration {
        seconds: 31 * 86_400,
        nanos: 0,
    });
    let err = push(&mut c.artifacts, too_long, b"x").await.unwrap_err();
    assert!(
        err.message().starts_with("header.expire_in:") && err.message().contains("30 days"),
        "{}",
        err.message()
    );
    server.stop().await;
}

async fn alerts_fire_once_per_threshold(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    c.controls
        .update_usage_controls(pb::UpdateUsageControlsRequest {
            project_id: "al".into(),
            controls: Some(pb::UsageControls {
                storage_cap_bytes: Some(1000),
                alert_thresholds: vec![80, 50, 100],
                ..Default::default()
            }),
            update_mask: None,
            apply_to_existing: false,
        })
        .await
        .unwrap();
    for (i, size) in [500usize, 100, 300, 50].into_iter().enumerate() {
        push(
            &mut c.artifacts,
            header(job("al", "j"), &format!("f{i}")),
            &content(size, i as u64),
        )
        .await
        .unwrap();
        server.clock.advance_seconds(60);
    }
    let alerts = c
        .controls
        .list_usage_alerts(pb::ListUsageAlertsRequest {
            project_id: "al".into(),
            month: "2026-11".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .alerts;
    let got: Vec<(String, u32, String)> = alerts
        .iter()
        .map(|a| (a.meter.clone(), a.threshold_percent, a.figure.clone()))
        .collect();
    assert_eq!(
        got,
        [
            ("storage".to_string(), 50, "500".to_string()),
            ("storage".to_string(), 80, "900".to_string())
        ],
        "50% at the first push, 80% at the third, nothing twice"
    );
    assert_eq!(alerts[0].limit, "1000");
    assert_eq!(alerts[0].basis, "storage_limit");
    server.stop().await;
}

async fn egress_quota_blocks_pulls_on_block_plans(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    let mut plan = metered_plan("egress1", pb::OveragePolicy::Block, None);
    plan.included_egress_gib = 1;
    put_on_plan(&mut c, "eq", plan).await;
    let t0 = server.clock.now();
    let data = content(1 << 20, 3);
    push(&mut c.artifacts, header(job("eq", "j"), "m.bin"), &data)
        .await
        .unwrap();
    // 1023 pulls of 1 MiB fit in 1 GiB; recorded usage is the ledger, so seed it directly
    // with one usage event instead of 1023 real pulls.
    let project = artifactd::domain::ProjectId::parse("p", "eq").unwrap();
    server
        .app
        .store
        .record_usage(
            "pull:seed:0",
            &project,
            artifactd::domain::metering::Meter::Egress,
            GIB - (1 << 20),
            t0,
        )
        .await
        .unwrap();
    pull(&mut c.artifacts, job("eq", "j"), "m.bin", 0, 0)
        .await
        .expect("exactly at the quota");
    wait_for_egress(&mut c, "eq", t0, GIB).await;
    let err = pull(&mut c.artifacts, job("eq", "j"), "m.bin", 0, 0)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("egress") && err.message().contains("egress1"),
        "{}",
        err.message()
    );
    // Next month the quota starts afresh.
    server.clock.set(at(2026, 12, 1, 0));
    pull(&mut c.artifacts, job("eq", "j"), "m.bin", 0, 0)
        .await
        .expect("a new month");
    server.stop().await;
}

async fn daily_usage_and_projects_usage(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    put_on_plan(
        &mut c,
        "big",
        metered_plan("per-gib", pb::OveragePolicy::Bill, None),
    )
    .await;
    server.clock.set(at(2026, 11, 1, 12));
    record_artifact(&server, "big", "a", GIB).await;
    push(
        &mut c.artifacts,
        header(job("small", "j"), "x"),
        &content(1000, 1),
    )
    .await
    .unwrap();
    server.clock.set(at(2026, 11, 3, 0));
    pull(&mut c.artifacts, job("small", "j"), "x", 0, 0)
        .await
        .unwrap();
    wait_for_egress(&mut c, "small", at(2026, 11, 1, 0), 1000).await;

    let days = c
        .usage
        .list_daily_usage(pb::ListDailyUsageRequest {
            project_id: "big".into(),
            start_day: "2026-11-01".into(),
            end_day: "2026-11-03".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .days;
    let figures: Vec<(&str, String, i64)> = days
        .iter()
        .map(|d| {
            (
                d.day.as_str(),
                d.storage_byte_seconds.clone(),
                d.stored_bytes,
            )
        })
        .collect();
    let gib = GIB as i128;
    // The clock stands at the start of the 3rd: that day is counted up to now (nothing
    // yet), never through its end.
    assert_eq!(
        figures,
        [
            ("2026-11-01", format!("{}.000000", gib * 43_200), GIB),
            ("2026-11-02", format!("{}.000000", gib * 86_400), GIB),
            ("2026-11-03", "0.000000".to_owned(), GIB),
        ]
    );
    let small_days = c
        .usage
        .list_daily_usage(pb::ListDailyUsageRequest {
            project_id: "small".into(),
            start_day: "2026-11-01".into(),
            end_day: "2026-11-03".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .days;
    assert_eq!(
        small_days
            .iter()
            .map(|d| (d.ingress_bytes, d.egress_bytes))
            .collect::<Vec<_>>(),
        [(1000, 0), (0, 0), (0, 1000)]
    );

    let listed = c
        .usage
        .list_projects_usage(pb::ListProjectsUsageRequest {
            month: "2026-11".into(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.projects.len(), 1);
    assert_eq!(listed.projects[0].project_id, "big", "largest bill first");
    // 1 GiB for 1.5 days of a 30-day month = 0.05 GiB-months = 50000 micros.
    assert_eq!(listed.projects[0].total_micros, 50_000);
    let rest = c
        .usage
        .list_projects_usage(pb::ListProjectsUsageRequest {
            month: "2026-11".into(),
            page_size: 10,
            page_token: listed.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rest.projects
            .iter()
            .map(|p| p.project_id.as_str())
            .collect::<Vec<_>>(),
        ["small"]
    );
    assert!(rest.next_page_token.is_empty());

    let err = c
        .usage
        .list_daily_usage(pb::ListDailyUsageRequest {
            project_id: "big".into(),
            start_day: "2026-11-31".into(),
            end_day: "2026-12-01".into(),
        })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("start_day:"), "{}", err.message());
    server.stop().await;
}

async fn plans_can_be_managed_and_assigned(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    let plans = c
        .plans
        .list_plans(pb::ListPlansRequest {})
        .await
        .unwrap()
        .into_inner()
        .plans;
    let ids: Vec<_> = plans.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["enterprise", "free", "team"]);
    let team = plans.iter().find(|p| p.id == "team").unwrap();
    assert_eq!(
        (
            team.storage_price_micros,
            team.egress_price_micros,
            team.included_storage_gib_months
        ),
        (70_000, 350_000, 100)
    );
    let free = plans.iter().find(|p| p.id == "free").unwrap();
    assert_eq!(
        (free.storage_limit_bytes, free.overage_policy),
        (Some(2 * GIB), pb::OveragePolicy::Block as i32)
    );

    // A project seen for the first time is on the default plan.
    push(&mut c.artifacts, header(job("newbie", "j"), "a"), b"a")
        .await
        .unwrap();
    let project = c
        .plans
        .get_project(pb::GetProjectRequest {
            project_id: "newbie".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(project.plan.unwrap().id, "free");

    let mut custom = metered_plan("custom", pb::OveragePolicy::Bill, None);
    c.plans
        .create_plan(pb::CreatePlanRequest {
            plan: Some(custom.clone()),
        })
        .await
        .unwrap();
    let dup = c
        .plans
        .create_plan(pb::CreatePlanRequest {
            plan: Some(custom.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    custom.storage_price_micros = 42;
    c.plans
        .update_plan(pb::UpdatePlanRequest {
            plan: Some(custom.clone()),
        })
        .await
        .unwrap();
    let got = c
        .plans
        .get_plan(pb::GetPlanRequest {
            plan_id: "custom".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.storage_price_micros, 42);
    let assigned = c
        .plans
        .assign_plan(pb::AssignPlanRequest {
            project_id: "newbie".into(),
            plan_id: "custom".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(assigned.plan.unwrap().id, "custom");

    let mut bad = custom.clone();
    bad.id = "bad".into();
    bad.currency = "usd".into();
    let err = c
        .plans
        .create_plan(pb::CreatePlanRequest { plan: Some(bad) })
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with("plan.currency:"),
        "{}",
        err.message()
    );
    let err = c
        .plans
        .assign_plan(pb::AssignPlanRequest {
            project_id: "newbie".into(),
            plan_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .plans
        .get_project(pb::GetProjectRequest {
            project_id: "never-seen".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}

/// The month's bill, recomputed by this test's own plain SQL over the raw rows (artifact
/// timestamps and usage events, not the service's derived columns), matches GetBill line by
/// line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_bill_matches_plain_sql_over_raw_rows() {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};
    let Some(server) = TestServer::start_metered(Backend::Postgres, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    c.plans
        .assign_plan(pb::AssignPlanRequest {
            project_id: "acme".into(),
            plan_id: "team".into(),
        })
        .await
        .unwrap();
    // November 2026 (30 days) on the team plan: 100 GiB-months and 100 GiB egress included,
    // then 0.07 per GiB-month and 0.35 per GiB.
    server.clock.set(at(2026, 10, 20, 0));
    record_artifact(&server, "acme", "old-release.tar", 80 * GIB).await; // from October on
    server.clock.set(at(2026, 11, 3, 7));
    record_artifact(&server, "acme", "nightly.tar", 150 * GIB).await;
    server.clock.set(at(2026, 11, 21, 13));
    delete(&mut c, project("acme"), "nightly.tar").await;
    let mut expiring = header(job("acme", "j1"), "log.txt");
    expiring.expire_in = Some(prost_types::Duration {
        seconds: 3 * 86_400 + 17,
        nanos: 0,
    });
    push(&mut c.artifacts, expiring, &content(123_457, 5))
        .await
        .unwrap();
    let project_id = artifactd::domain::ProjectId::parse("p", "acme").unwrap();
    let egress = artifactd::domain::metering::Meter::Egress;
    for (i, bytes) in [(0, 90 * GIB), (1, 37 * GIB + 12_345)] {
        server
            .app
            .store
            .record_usage(
                &format!("pull:seed:{i}"),
                &project_id,
                egress,
                bytes,
                server.clock.now(),
            )
            .await
            .unwrap();
    }
    server.clock.set(at(2026, 12, 2, 0));
    let b = bill(&mut c, "acme", "2026-11").await;

    let (start, end) = (
        at(2026, 11, 1, 0).as_micros(),
        at(2026, 12, 1, 0).as_micros(),
    );
    let gib = GIB;
    let storage_denominator = format!("({gib}::numeric * 1000000 * 30 * 86400)");
    let sql = format!(
        "WITH ended AS (
            SELECT size, created_at,
                   LEAST(COALESCE(deleted_at, {end}),
                         COALESCE(CASE WHEN keep THEN NULL ELSE expires_at END, {end}),
                         {end}) AS until
            FROM artifacts WHERE project_id = 'acme'),
         storage AS (
            SELECT COALESCE(SUM(size::numeric * GREATEST(0, until - GREATEST(created_at, {start}))), 0) AS n
            FROM ended WHERE created_at < {end}),
         net AS (
            SELECT COALESCE(SUM(bytes) FILTER (WHERE meter = 'egress'), 0)::numeric AS egress,
                   COALESCE(SUM(bytes) FILTER (WHERE meter = 'ingress'), 0)::numeric AS ingress
            FROM usage_events
            WHERE project_id = 'acme' AND occurred_at >= {start} AND occurred_at < {end})
         SELECT
            round(storage.n / {storage_denominator}, 6)::text,
            round(GREATEST(0, storage.n - 100 * {storage_denominator}) * 70000 / {storage_denominator})::text,
            round(net.egress / {gib}, 6)::text,
            round(GREATEST(0, net.egress - 100::numeric * {gib}) * 350000 / {gib})::text,
            round(net.ingress / {gib}, 6)::text
         FROM storage, net"
    );
    let db = sea_orm::Database::connect(server.db.url.as_str())
        .await
        .unwrap();
    let row = db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .unwrap()
        .unwrap();
    let col = |i: usize| -> String { row.try_get_by_index(i).unwrap() };
    let storage = &b.line_items[0];
    let egress_line = &b.line_items[1];
    let ingress_line = &b.line_items[2];
    assert_eq!(storage.usage, col(0));
    assert_eq!(storage.amount_micros.to_string(), col(1));
    assert_eq!(egress_line.usage, col(2));
    assert_eq!(egress_line.amount_micros.to_string(), col(3));
    assert_eq!(ingress_line.usage, col(4));
    assert_eq!(ingress_line.amount_micros, 0);
    assert_eq!(
        b.total_micros,
        storage.amount_micros + egress_line.amount_micros
    );
    assert!(
        storage.amount_micros > 0 && egress_line.amount_micros > 0,
        "both meters are over quota: {b:?}"
    );
    db.close().await.unwrap();
    server.stop().await;
}

/// With Redis configured and unreachable, a push that must reserve quota answers
/// UNAVAILABLE and stores nothing (one process's own figures would let replicas together
/// pass the limit); what reserves nothing still answers. `tests/restarts.rs` restarts a
/// real Redis mid-run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_refuses_reservations_with_unavailable() {
    let Some(server) = TestServer::start_with(Backend::Sqlite, |c| {
        c.redis_url = Some("redis://127.0.0.1:1".into())
    })
    .await
    else {
        return;
    };
    let mut c = clients(&server).await;
    put_on_plan(
        &mut c,
        "nr",
        metered_plan("tiny", pb::OveragePolicy::Block, Some(10_000)),
    )
    .await;
    let err = push(
        &mut c.artifacts,
        header(job("nr", "j"), "a"),
        &content(6000, 1),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let err = stat(&mut c.artifacts, job("nr", "j"), "a")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "nothing stored");
    server.stop().await;
}

/// Bills of past days are cached; a write dated before them (a clock set back) must not
/// leave a stale figure behind.
async fn bills_stay_exact_when_history_is_written_behind_cached_days(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    put_on_plan(
        &mut c,
        "tt",
        metered_plan("per-gib", pb::OveragePolicy::Bill, None),
    )
    .await;
    server.clock.set(at(2026, 11, 10, 0));
    record_artifact(&server, "tt", "a", GIB).await;
    server.clock.set(at(2026, 11, 20, 0));
    // 1 GiB × 10 days of a 30-day month.
    assert_eq!(
        bill(&mut c, "tt", "2026-11").await.line_items[0].usage,
        "0.333333"
    );
    server.clock.set(at(2026, 11, 5, 0));
    record_artifact(&server, "tt", "b", 2 * GIB).await;
    server.clock.set(at(2026, 11, 20, 0));
    // + 2 GiB × 15 days: 40 GiB-days / 30 = 1.333333.
    let b = bill(&mut c, "tt", "2026-11").await;
    assert_eq!(b.line_items[0].usage, "1.333333");
    let u = usage(&mut c, "tt", at(2026, 11, 1, 0), at(2026, 11, 20, 0)).await;
    assert_eq!(u.stored_bytes, 3 * GIB);
    assert_eq!(u.live_artifacts, 2);
    server.stop().await;
}
