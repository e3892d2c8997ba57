#![allow(clippy::unwrap_used)]
//! Caps that hold: storage limits and caps, the spend cap and included egress, enforced
//! with reservations under concurrency, across a rebuild of the hot figures, across two
//! server processes on one database, and released exactly (overwrites, failures, cancels).
//! Real server, SQLite and Postgres, Redis when `TEST_REDIS_URL` is set.

mod common;

use artifactd::domain::metering::Meter;
use artifactd::domain::{Clock, ProjectId, Timestamp};
use artifactd::pb::v1::{self as pb, artifact_service_client::ArtifactServiceClient};
use common::billing::*;
use common::*;
use tokio::sync::mpsc;
use tonic::Code;

on_both_backends!(
    twenty_concurrent_pushes_end_under_the_cap,
    forced_overwrites_release_the_replaced_size,
    cap_holds_across_a_counter_rebuild_with_pushes_in_flight,
    undeclared_push_is_cut_off_mid_stream,
    spend_cap_refuses_pulls_on_bill_plans,
    concurrent_pulls_stay_within_included_egress,
);

const GIB: i64 = 1 << 30;
const KIB: i64 = 1024;

/// 1.000000 per GiB-month stored and per GiB sent, nothing included.
fn plan(id: &str, policy: pb::OveragePolicy) -> pb::Plan {
    pb::Plan {
        id: id.into(),
        name: format!("Plan {id}"),
        currency: "USD".into(),
        included_storage_gib_months: 0,
        included_egress_gib: 0,
        storage_price_micros: 1_000_000,
        egress_price_micros: 1_000_000,
        ingress_price_micros: 0,
        storage_limit_bytes: None,
        max_artifact_bytes: 100 * GIB,
        max_retention_days: 365,
        overage_policy: policy as i32,
        version: 0,
    }
}

async fn set_storage_cap(c: &mut Clients, project: &str, cap: i64) {
    c.controls
        .update_usage_controls(pb::UpdateUsageControlsRequest {
            project_id: project.into(),
            controls: Some(pb::UsageControls {
                storage_cap_bytes: Some(cap),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["storage_cap_bytes".into()],
            }),
            apply_to_existing: false,
        })
        .await
        .unwrap();
}

async fn set_spend_cap(c: &mut Clients, project: &str, cap: i64) {
    c.controls
        .update_usage_controls(pb::UpdateUsageControlsRequest {
            project_id: project.into(),
            controls: Some(pb::UsageControls {
                spend_cap_micros: Some(cap),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["spend_cap_micros".into()],
            }),
            apply_to_existing: false,
        })
        .await
        .unwrap();
}

async fn usage(c: &mut Clients, project: &str, from: Timestamp) -> pb::Usage {
    let to = from.saturating_add_micros(40 * 86_400 * 1_000_000);
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

/// Bytes stored now, from the artifact log (the ledger, not the hot figures).
async fn stored(server: &TestServer, project: &str) -> i64 {
    let project = ProjectId::parse("p", project).unwrap();
    server
        .app
        .store
        .stored_at(&project, server.clock.now())
        .await
        .unwrap()
        .0
}

fn declared(scope: pb::Scope, path: &str, size: i64) -> pb::PushHeader {
    let mut h = header(scope, path);
    h.expected_size = Some(size);
    h
}

/// A push whose stream stays open: the caller feeds chunks and decides when (or whether)
/// to end it. The response arrives when the server answers, even mid-stream.
struct OpenPush {
    tx: mpsc::Sender<pb::PushRequest>,
    response: tokio::task::JoinHandle<Result<pb::PushResponse, tonic::Status>>,
}

impl OpenPush {
    async fn start(server: &TestServer, header: pb::PushHeader) -> Self {
        let mut client = ArtifactServiceClient::new(server.channel().await);
        let (tx, rx) = mpsc::channel(4);
        tx.send(pb::PushRequest {
            msg: Some(pb::push_request::Msg::Header(header)),
        })
        .await
        .unwrap();
        let response = tokio::spawn(async move {
            client
                .push(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map(tonic::Response::into_inner)
        });
        Self { tx, response }
    }

    /// Sends `data` in 64 KiB chunks; false once the server stopped reading.
    async fn send(&self, data: &[u8]) -> bool {
        for chunk in data.chunks(64 * 1024) {
            let message = pb::PushRequest {
                msg: Some(pb::push_request::Msg::Chunk(bytes::Bytes::copy_from_slice(
                    chunk,
                ))),
            };
            if self.tx.send(message).await.is_err() {
                return false;
            }
        }
        true
    }

    async fn finish(self) -> Result<pb::PushResponse, tonic::Status> {
        drop(self.tx);
        self.response.await.unwrap()
    }
}

/// With a 1,000,000-byte cap, exactly 3 of 20 concurrent 300,000-byte pushes fit and the
/// other 17 are RESOURCE_EXHAUSTED. Exact even with undeclared pushes in the mix: each
/// holds at least one 256 KiB chunk before it can grow, so at most 3 ever hold, and 3 can
/// always finish.
async fn twenty_concurrent_pushes_end_under_the_cap(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    set_storage_cap(&mut c, "twenty", 1_000_000).await;
    let mut tasks = Vec::new();
    for i in 0..20u64 {
        let channel = server.channel().await;
        tasks.push(tokio::spawn(async move {
            let mut client = ArtifactServiceClient::new(channel);
            let mut h = header(job("twenty", &format!("j{i}")), "part.bin");
            // Half declared, half not: undeclared pushes reserve as they stream.
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
    assert_eq!(ok, 3, "3 × 300,000 fit under 1,000,000, a 4th never does");
    assert_eq!(stored(&server, "twenty").await, 900_000);
    server.stop().await;
}

/// Under a 1,000 KiB cap, a 400 KiB file can be overwritten again and again: each forced
/// push releases the size it replaced.
async fn forced_overwrites_release_the_replaced_size(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    set_storage_cap(&mut c, "ow", 1000 * KIB).await;
    let size = (400 * KIB) as usize;
    push(
        &mut c.artifacts,
        header(job("ow", "j"), "f.bin"),
        &content(size, 1),
    )
    .await
    .unwrap();
    for round in 2..=4u64 {
        // Declared and undeclared overwrites alike.
        let mut h = header(job("ow", "j"), "f.bin");
        h.force = true;
        if round % 2 == 0 {
            h.expected_size = Some(400 * KIB);
        }
        push(&mut c.artifacts, h, &content(size, round))
            .await
            .unwrap_or_else(|e| panic!("overwrite {round} refused: {e:?}"));
        assert_eq!(stored(&server, "ow").await, 400 * KIB);
    }
    // What is left under the cap is exactly 600 KiB: it fits, one byte more does not.
    let err = push(
        &mut c.artifacts,
        declared(job("ow", "j"), "g.bin", 600 * KIB + 1),
        &content((600 * KIB + 1) as usize, 9),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    push(
        &mut c.artifacts,
        declared(job("ow", "j"), "g.bin", 600 * KIB),
        &content((600 * KIB) as usize, 9),
    )
    .await
    .expect("exactly at the cap");
    server.stop().await;
}

/// A declared push is in flight when the hot stored figure is lost (it expires every
/// minute, or Redis loses it) and rebuilt from the database, which does not know the push
/// yet: the rebuilt figure must not forget its reservation.
async fn cap_holds_across_a_counter_rebuild_with_pushes_in_flight(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    set_storage_cap(&mut c, "rb", 1000 * KIB).await;
    let project = ProjectId::parse("p", "rb").unwrap();
    let a = OpenPush::start(&server, declared(job("rb", "a"), "a.bin", 600 * KIB)).await;
    let data = content((600 * KIB) as usize, 1);
    assert!(a.send(&data[..(300 * KIB) as usize]).await);

    // Wait until A is admitted (holds its 600 KiB).
    let mut admitted = false;
    for _ in 0..1000 {
        if server.app.metering.reserved_bytes(&project).await.unwrap() == 600 * KIB {
            admitted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(admitted, "push A was never admitted");

    // The figure is lost and rebuilt (from a database that does not know A yet).
    server.app.metering.forget(&project).await;
    if let Some(url) = redis_url() {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        let _: i64 = redis::cmd("DEL")
            .arg(format!("{}artifactd:stored:rb", server.config.redis_prefix))
            .query_async(&mut con)
            .await
            .unwrap();
    }
    for h in [
        declared(job("rb", "b"), "b.bin", 600 * KIB),
        header(job("rb", "c"), "c.bin"),
    ] {
        let err = push(&mut c.artifacts, h, &content((600 * KIB) as usize, 3))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    }
    assert!(a.send(&data[(300 * KIB) as usize..]).await);
    a.finish().await.expect("A completes");
    assert_eq!(stored(&server, "rb").await, 600 * KIB);
    server.stop().await;
}

/// A push without expected_size is refused while its client is still sending, as soon as
/// it passes the storage cap — and, on a BILL plan, the spend cap.
async fn undeclared_push_is_cut_off_mid_stream(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    set_storage_cap(&mut c, "cut", 1_000_000).await;
    push(
        &mut c.artifacts,
        header(job("cut", "j"), "a.bin"),
        &content(600_000, 1),
    )
    .await
    .unwrap();
    let open = OpenPush::start(&server, header(job("cut", "j"), "b.bin")).await;
    // 2 MB offered; the stream is never ended by the client, so only a mid-stream refusal
    // can answer it.
    let _ = open.send(&content(2_000_000, 2)).await;
    let err = open.response.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    for needle in ["1000000", "600000"] {
        assert!(
            err.message().contains(needle),
            "{needle}: {}",
            err.message()
        );
    }
    assert_eq!(stored(&server, "cut").await, 600_000);

    // Spend cap: at the start of the month a byte stored to month end costs 1/2^30 of
    // 1.000000, so 1000 micros hold about 1,073,741 bytes.
    put_on_plan(
        &mut c,
        "spendcut",
        plan("bill-cut", pb::OveragePolicy::Bill),
    )
    .await;
    server.clock.set(at(2026, 11, 1, 0));
    set_spend_cap(&mut c, "spendcut", 1000).await;
    let open = OpenPush::start(&server, header(job("spendcut", "j"), "big.bin")).await;
    let _ = open.send(&content(2_000_000, 3)).await;
    let err = open.response.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("spend cap") && err.message().contains("0.001000"),
        "{}",
        err.message()
    );
    assert_eq!(stored(&server, "spendcut").await, 0);
    // Under the cap, the same undeclared push goes through.
    push(
        &mut c.artifacts,
        header(job("spendcut", "j"), "small.bin"),
        &content(500_000, 4),
    )
    .await
    .expect("under the spend cap");
    server.stop().await;
}

/// On a BILL plan, egress is billable: a pull that would take the projected month total
/// past the spend cap is refused before a byte is sent.
async fn spend_cap_refuses_pulls_on_bill_plans(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    put_on_plan(&mut c, "sp", plan("bill-pull", pb::OveragePolicy::Bill)).await;
    server.clock.set(at(2026, 11, 1, 0));
    set_spend_cap(&mut c, "sp", 1000).await;
    // 500,000 bytes stored to month end ≈ 465 micros; each full pull ≈ 466 more.
    let data = content(500_000, 1);
    push(&mut c.artifacts, header(job("sp", "j"), "f.bin"), &data)
        .await
        .unwrap();
    let first = pull(&mut c.artifacts, job("sp", "j"), "f.bin", 0, 0)
        .await
        .expect("931 micros projected: under the cap");
    assert_eq!(first.data.len(), data.len());
    // Recorded egress counts (the reservation counted until then). The projection reads
    // usage up to "now", exclusive, and the test clock stands still: step it past the record.
    let mut sent = 0;
    for _ in 0..500 {
        sent = usage(&mut c, "sp", at(2026, 11, 1, 0)).await.egress_bytes;
        if sent >= 500_000 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(sent, 500_000);
    server
        .clock
        .set(at(2026, 11, 1, 0).saturating_add_micros(1_000_000));
    let err = pull(&mut c.artifacts, job("sp", "j"), "f.bin", 0, 0)
        .await
        .err()
        .expect("a second pull passes the cap");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("spend cap") && err.message().contains("bill-pull"),
        "{}",
        err.message()
    );
    // A small range still fits (≈ 47 micros for 50,000 bytes) once the refused pull's
    // reservation is released, which happens on the counters' task tracker just after the
    // refusal: until then the projection errs towards refusing, never towards admitting.
    let mut small = pull(&mut c.artifacts, job("sp", "j"), "f.bin", 0, 50_000).await;
    for _ in 0..200 {
        match &small {
            Err(status) if status.code() == Code::ResourceExhausted => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                small = pull(&mut c.artifacts, job("sp", "j"), "f.bin", 0, 50_000).await;
            }
            _ => break,
        }
    }
    assert_eq!(
        small.expect("a small range is under the cap").data.len(),
        50_000
    );
    server.stop().await;
}

/// BLOCK plan, 1 GiB included egress of which 2.5 MiB are left: of four 1 MiB pulls opened
/// together (none finished), two are served and two refused; what is recorded never passes
/// the quota. Cancelling a pull releases what it did not send.
async fn concurrent_pulls_stay_within_included_egress(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    let mut p = plan("egress-block", pb::OveragePolicy::Block);
    p.included_egress_gib = 1;
    put_on_plan(&mut c, "eb", p).await;
    let t0 = server.clock.now();
    let mib = 1usize << 20;
    let data = content(mib, 5);
    push(&mut c.artifacts, header(job("eb", "j"), "m.bin"), &data)
        .await
        .unwrap();
    let project = ProjectId::parse("p", "eb").unwrap();
    server
        .app
        .store
        .record_usage(
            "pull:seed:0",
            &project,
            Meter::Egress,
            GIB - 5 * (1 << 19),
            t0,
        )
        .await
        .unwrap();

    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..4 {
        let mut client = ArtifactServiceClient::new(server.channel().await);
        match client
            .pull(pb::PullRequest {
                scope: Some(job("eb", "j")),
                path: "m.bin".into(),
                offset: 0,
                length: 0,
            })
            .await
        {
            Ok(response) => {
                let mut stream = response.into_inner();
                stream.message().await.unwrap().expect("metadata first");
                open.push(stream);
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("egress-block"), "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((open.len(), refused), (2, 2));
    for mut stream in open {
        let mut received = 0;
        while let Some(message) = stream.message().await.unwrap() {
            if let Some(pb::pull_response::Msg::Chunk(chunk)) = message.msg {
                received += chunk.len();
            }
        }
        assert_eq!(received, mib);
    }
    // Recorded egress reaches the two full pulls and never passes the quota.
    let mut sent = 0;
    for _ in 0..500 {
        sent = usage(&mut c, "eb", t0).await.egress_bytes;
        if sent >= GIB - (1 << 19) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(sent, GIB - (1 << 19), "seed + 2 MiB");
    assert!(sent <= GIB);
    // Half a MiB is left: a range of that size is served, a full pull is not.
    let err = pull(&mut c.artifacts, job("eb", "j"), "m.bin", 0, 0)
        .await
        .err()
        .expect("1 MiB does not fit in what is left");
    assert_eq!(err.code(), Code::ResourceExhausted);
    pull(&mut c.artifacts, job("eb", "j"), "m.bin", 0, 1 << 19)
        .await
        .expect("exactly what is left");
    server.stop().await;
}

/// Two server processes on one Postgres database and no Redis: the database coordinates
/// (row lock on the project, reservations as rows), so 10 concurrent pushes split between
/// them still admit exactly 3 under the cap. A reservation row left by a crashed replica
/// lapses at its own expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cap_holds_across_two_processes_without_redis() {
    let Some(db) = TestDb::create(Backend::Postgres).await else {
        return;
    };
    let shared = db.shared();
    let one = TestServer::start_on(db, |config| config.redis_url = None).await;
    let two = TestServer::start_on(shared, |config| config.redis_url = None).await;
    let mut c = clients(&one).await;
    set_storage_cap(&mut c, "two", 1_000_000).await;
    let mut tasks = Vec::new();
    for i in 0..10u64 {
        let channel = if i % 2 == 0 {
            one.channel().await
        } else {
            two.channel().await
        };
        tasks.push(tokio::spawn(async move {
            let mut client = ArtifactServiceClient::new(channel);
            let mut h = header(job("two", &format!("j{i}")), "part.bin");
            if i % 4 < 2 {
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
    assert_eq!(
        ok, 3,
        "3 × 300,000 fit under 1,000,000 whichever process serves them"
    );
    assert_eq!(stored(&one, "two").await, 900_000);

    // A replica died holding 90,000 bytes for 2 s (database clock): refused until then,
    // admitted after, however often the project is tried meanwhile.
    let conn = sea_orm::Database::connect(one.db.url.as_str())
        .await
        .unwrap();
    use sea_orm::ConnectionTrait;
    conn.execute_unprepared(
        "INSERT INTO quota_reservations (id, project_id, pool, bytes, expires_at) VALUES \
         ('push:crashed', 'two', 'stored', 90000, \
          CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT) + 2000000)",
    )
    .await
    .unwrap();
    let mut client = ArtifactServiceClient::new(two.channel().await);
    let small = declared(job("two", "late"), "late.bin", 50_000);
    let err = push(&mut client, small.clone(), &content(50_000, 99))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let mut admitted = false;
    for _ in 0..1000 {
        match push(&mut client, small.clone(), &content(50_000, 99)).await {
            Ok(_) => {
                admitted = true;
                break;
            }
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(admitted, "the crashed replica's reservation never lapsed");
    conn.close().await.unwrap();
    two.stop().await;
    one.stop().await;
}
