//! Two replicas, proven: two `artifactd` processes (the real binary) on one Postgres, one
//! blob store (a local directory, or `TEST_BLOB_URL`) and one Redis, started together (they
//! take turns migrating). A push through one is pulled through the other; usage is counted
//! once (both answer the same exact figures); a storage cap holds against pushes racing on
//! both; and one sweeper acts at a time (the Redis lease), each expired artifact ended and
//! each blob collected by exactly one of them.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use artifactd::domain::Timestamp;
use artifactd::domain::metering::Month;
use artifactd::pb::v1 as pb;
use common::billing::Clients;
use common::binary::BinaryServer;
use common::{Backend, TestDb, content, header, http_get, job, pull, push, redis_url, sample};
use sea_orm::{ConnectionTrait, Database, Statement};
use tonic::Code;

/// Two replicas and what they share.
struct Replicas {
    a: BinaryServer,
    b: BinaryServer,
    _blobs: tempfile::TempDir,
    db: TestDb,
}

/// Starts two replicas on a fresh Postgres database, with `extra` settings; `None` (after
/// saying why on the terminal) without Postgres or Redis. `before_start` runs once the
/// Redis prefix is known and before either process starts.
async fn replicas(extra: &[(&str, String)]) -> Option<Replicas> {
    replicas_with(extra, |_, _| {}).await
}

async fn replicas_with(
    extra: &[(&str, String)],
    before_start: impl FnOnce(&str, &str),
) -> Option<Replicas> {
    let db = TestDb::create(Backend::Postgres).await?;
    let redis = redis_url()?;
    let blobs = tempfile::tempdir().unwrap();
    let prefix = format!("replicas-{}:", uuid::Uuid::new_v4().simple());
    let blob_url = match std::env::var("TEST_BLOB_URL") {
        Ok(url) => format!(
            "{}/{}",
            url.trim_end_matches('/'),
            uuid::Uuid::new_v4().simple()
        ),
        Err(_) => format!("file://{}", blobs.path().display()),
    };
    let mut env = vec![
        ("DATABASE_URL", db.url.clone()),
        ("ARTIFACTD_BLOB_URL", blob_url),
        ("REDIS_URL", redis.clone()),
        ("ARTIFACTD_REDIS_PREFIX", prefix.clone()),
        // Two debug servers, moto and the test share two cores in CI: a Redis call there once
        // took over the default 500 ms, and the push answered UNAVAILABLE. These tests are
        // about what the replicas share, not about a Redis that stops answering (restarts.rs).
        ("ARTIFACTD_REDIS_TIMEOUT", "5s".to_owned()),
    ];
    env.extend(extra.iter().cloned());
    before_start(&redis, &prefix);
    let (a, b) = tokio::join!(BinaryServer::start(&env), BinaryServer::start(&env));
    Some(Replicas {
        a,
        b,
        _blobs: blobs,
        db,
    })
}

fn now() -> Timestamp {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros();
    Timestamp::from_micros(i64::try_from(micros).unwrap())
}

fn ts(t: Timestamp) -> prost_types::Timestamp {
    let (seconds, nanos) = t.to_seconds_nanos();
    prost_types::Timestamp { seconds, nanos }
}

async fn usage(c: &mut Clients, project: &str) -> pb::Usage {
    let now = now();
    c.usage
        .get_usage(pb::GetUsageRequest {
            project_id: project.into(),
            start: Some(ts(now.saturating_add_micros(-3_600_000_000))),
            end: Some(ts(now.saturating_add_micros(3_600_000_000))),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The network lines of this month's bill (storage grows with every microsecond, so two
/// reads are compared on what does not).
async fn network_lines(c: &mut Clients, project: &str) -> Vec<pb::LineItem> {
    let bill = c
        .usage
        .get_bill(pb::GetBillRequest {
            project_id: project.into(),
            month: Month::containing(now()).to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    bill.line_items
        .into_iter()
        .filter(|line| line.meter != "storage")
        .collect()
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    let conn = Database::connect(db.url.as_str()).await.unwrap();
    let row = conn
        .query_one_raw(Statement::from_string(conn.get_database_backend(), sql))
        .await
        .unwrap()
        .unwrap();
    let n = row.try_get_by_index(0).unwrap();
    let _ = conn.close().await;
    n
}

async fn scrape(server: &BinaryServer) -> String {
    let (status, body) = http_get(server.http, "/metrics").await;
    assert_eq!(status, 200);
    body
}

/// A push through one replica is pulled through the other, byte for byte, and both answer
/// the same exact usage: each byte pushed and each byte pulled counted once, wherever it
/// went through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_through_one_replica_is_pulled_through_the_other_and_counted_once() {
    let Some(r) = replicas(&[]).await else {
        return;
    };
    let mut a = Clients::on(r.a.channel().await);
    let mut b = Clients::on(r.b.channel().await);
    let big = content(3 * 1024 * 1024 + 17, 1);
    let small = content(200_000, 2);
    push(&mut a.artifacts, header(job("p", "j"), "big.bin"), &big)
        .await
        .unwrap();
    push(&mut b.artifacts, header(job("p", "j"), "small.bin"), &small)
        .await
        .unwrap();
    let pulled = pull(&mut b.artifacts, job("p", "j"), "big.bin", 0, 0)
        .await
        .unwrap();
    assert_eq!(pulled.data, big, "pushed through A, pulled through B");
    let pulled = pull(&mut a.artifacts, job("p", "j"), "small.bin", 0, 0)
        .await
        .unwrap();
    assert_eq!(pulled.data, small, "pushed through B, pulled through A");
    let pulled = pull(&mut a.artifacts, job("p", "j"), "big.bin", 1000, 0)
        .await
        .unwrap();
    assert_eq!(pulled.data, big[1000..]);
    // A push through B of a path A holds needs `force`, as on one server.
    let err = push(&mut b.artifacts, header(job("p", "j"), "big.bin"), b"x")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    let ingress = (big.len() + small.len()) as i64;
    let egress = (big.len() + small.len() + big.len() - 1000) as i64;
    // Egress is recorded when each stream ends (a tracked task): wait for the last record.
    let mut seen = usage(&mut a, "p").await;
    for _ in 0..200 {
        if seen.egress_bytes == egress {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        seen = usage(&mut a, "p").await;
    }
    for (replica, c) in [("A", &mut a), ("B", &mut b)] {
        let u = usage(c, "p").await;
        assert_eq!(u.ingress_bytes, ingress, "{replica}");
        assert_eq!(u.egress_bytes, egress, "{replica}");
        assert_eq!(u.stored_bytes, ingress, "{replica}");
        assert_eq!(u.live_artifacts, 2, "{replica}");
    }
    let lines = network_lines(&mut a, "p").await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(network_lines(&mut b, "p").await, lines);
    assert_eq!(
        count(
            &r.db,
            "SELECT COALESCE(SUM(bytes), 0)::bigint FROM usage_events WHERE meter = 'egress'"
        )
        .await,
        egress,
        "the ledger holds each pulled byte once"
    );
}

/// A storage cap of ten artifacts' worth: 24 pushes race, 12 through each replica, and
/// exactly ten commit — the others are RESOURCE_EXHAUSTED — because both reserve against
/// one Redis before reading a byte. Both then report the capped figure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_holds_across_both_replicas() {
    let Some(r) = replicas(&[]).await else {
        return;
    };
    const SIZE: usize = 64 * 1024;
    let mut a = Clients::on(r.a.channel().await);
    let b = Clients::on(r.b.channel().await);
    a.controls
        .update_usage_controls(pb::UpdateUsageControlsRequest {
            project_id: "cap".into(),
            controls: Some(pb::UsageControls {
                storage_cap_bytes: Some(10 * SIZE as i64),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["storage_cap_bytes".into()],
            }),
            apply_to_existing: false,
        })
        .await
        .unwrap();
    let mut racers = Vec::new();
    for i in 0..24u64 {
        let mut client = if i % 2 == 0 {
            a.artifacts.clone()
        } else {
            b.artifacts.clone()
        };
        racers.push(tokio::spawn(async move {
            let data = content(SIZE, 100 + i);
            let mut h = header(job("cap", "j"), &format!("{i}.bin"));
            h.expected_size = Some(SIZE as i64);
            push(&mut client, h, &data).await.map(|_| ())
        }));
    }
    let (mut committed, mut refused) = (0, 0);
    for racer in racers {
        match racer.await.unwrap() {
            Ok(()) => committed += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((committed, refused), (10, 14));
    let mut b = b;
    for c in [&mut a, &mut b] {
        let u = usage(c, "cap").await;
        assert_eq!(u.stored_bytes, 10 * SIZE as i64);
        assert_eq!(u.live_artifacts, 10);
    }
}

/// Both replicas sweep every 300 ms. While the sweeper lease is held (here by the test,
/// as a third replica would), neither sweeps: expired artifacts stay unmarked. Once it is
/// free, every expired artifact is ended and every blob collected, each by exactly one
/// replica (their metrics add up to the totals).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_sweeper_acts_at_a_time() {
    let lease = std::sync::Mutex::new(None);
    let Some(r) = replicas_with(
        &[
            ("ARTIFACTD_SWEEP_INTERVAL", "300ms".into()),
            ("ARTIFACTD_BLOB_GRACE", "0s".into()),
        ],
        |redis, prefix| {
            let key = format!("{prefix}artifactd:lease:sweeper");
            let mut conn = redis::Client::open(redis)
                .unwrap()
                .get_connection()
                .unwrap();
            let taken: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg("the-test")
                .arg("NX")
                .arg("PX")
                .arg(60_000)
                .query(&mut conn)
                .unwrap();
            assert!(taken.is_some());
            *lease.lock().unwrap() = Some((conn, key));
        },
    )
    .await
    else {
        return;
    };
    const N: i64 = 20;
    let mut a = Clients::on(r.a.channel().await);
    for i in 0..N {
        let data = content(20_000 + i as usize, 500 + i as u64);
        let mut h = header(job("sweep", "j"), &format!("{i}.bin"));
        h.expire_in = Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        });
        push(&mut a.artifacts, h, &data).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        count(
            &r.db,
            "SELECT COUNT(*) FROM artifacts WHERE end_reason = 'expired'"
        )
        .await,
        0,
        "nobody sweeps while another holds the lease"
    );
    for server in [&r.a, &r.b] {
        let scrape = scrape(server).await;
        assert_eq!(
            sample(
                &scrape,
                "artifactd_sweeper_runs_total",
                &[("outcome", "ok")]
            ),
            Some(0.0)
        );
    }
    let (mut conn, key) = lease.lock().unwrap().take().unwrap();
    let _: i64 = redis::cmd("DEL").arg(&key).query(&mut conn).unwrap();

    let collected = "SELECT COUNT(*) FROM blobs WHERE collected_at IS NOT NULL";
    for _ in 0..400 {
        if count(&r.db, collected).await == N {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(count(&r.db, collected).await, N);
    assert_eq!(
        count(
            &r.db,
            "SELECT COUNT(*) FROM artifacts WHERE end_reason = 'expired' \
             AND deleted_at = billing_end"
        )
        .await,
        N
    );
    let (mut ended, mut blobs, mut runs) = (0.0, 0.0, 0.0);
    for server in [&r.a, &r.b] {
        let scrape = scrape(server).await;
        ended += sample(&scrape, "artifactd_sweeper_ended_artifacts_total", &[]).unwrap();
        blobs += sample(&scrape, "artifactd_sweeper_collected_blobs_total", &[]).unwrap();
        runs += sample(
            &scrape,
            "artifactd_sweeper_runs_total",
            &[("outcome", "ok")],
        )
        .unwrap();
    }
    assert_eq!(ended, N as f64, "each artifact ended by one replica");
    assert_eq!(blobs, N as f64, "each blob collected by one replica");
    assert!(runs >= 1.0);
}

/// A retention policy set through one replica applies to the very next push through the
/// other, though small declared pushes take their rules from a cache (their group's
/// statement checks the rules' stamp): one push at a time, and a burst committing in groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_set_through_one_replica_applies_to_the_next_push_through_the_other() {
    let Some(r) = replicas(&[]).await else {
        return;
    };
    const DAY_MICROS: i64 = 86_400_000_000;
    let mut a = Clients::on(r.a.channel().await);
    let b = Clients::on(r.b.channel().await);
    // Small and declared: these pushes commit with a group, on cached rules.
    let lifetime = |pushed: pb::PushResponse| {
        let artifact = pushed.artifact.unwrap();
        let micros = |t: Option<prost_types::Timestamp>| {
            let t = t.unwrap();
            t.seconds * 1_000_000 + i64::from(t.nanos) / 1000
        };
        micros(artifact.expires_at) - micros(artifact.created_at)
    };
    let push_through_b = |path: String| {
        let mut client = b.artifacts.clone();
        async move {
            let data = content(100, 7);
            let mut h = header(job("p", "j"), &path);
            h.expected_size = Some(data.len() as i64);
            lifetime(push(&mut client, h, &data).await.unwrap())
        }
    };
    let no_rule = push_through_b("logs/0.txt".into()).await;
    let rule = |selector: &str, days: i64| pb::RetentionRule {
        selector: selector.into(),
        max_age: Some(prost_types::Duration {
            seconds: days * 86_400,
            nanos: 0,
        }),
    };
    // Several rules, selectors with the stamp's separators and a multi-byte character.
    for (round, days) in [2i64, 3, 2].into_iter().enumerate() {
        a.controls
            .set_retention_policy(pb::SetRetentionPolicyRequest {
                project_id: "p".into(),
                policy: Some(pb::RetentionPolicy {
                    job_rules: vec![
                        rule("bin/a;b:c/*", 1),
                        rule("logs/**", days),
                        rule("**/*.xml", 5),
                        rule("ü/**", 4),
                    ],
                    ..Default::default()
                }),
                apply_to_existing: false,
            })
            .await
            .unwrap();
        assert_eq!(
            push_through_b(format!("logs/{round}-first.txt")).await,
            days * DAY_MICROS,
            "round {round}: the next push"
        );
        let burst: Vec<_> = (0..16)
            .map(|i| tokio::spawn(push_through_b(format!("logs/{round}-{i}.txt"))))
            .collect();
        for pushed in burst {
            assert_eq!(pushed.await.unwrap(), days * DAY_MICROS, "round {round}");
        }
        assert_eq!(
            push_through_b(format!("bin/a;b:c/{round}")).await,
            DAY_MICROS
        );
        assert_eq!(
            push_through_b(format!("x/{round}.xml")).await,
            5 * DAY_MICROS
        );
        assert_eq!(push_through_b(format!("ü/{round}")).await, 4 * DAY_MICROS);
    }
    a.controls
        .set_retention_policy(pb::SetRetentionPolicyRequest {
            project_id: "p".into(),
            policy: Some(pb::RetentionPolicy::default()),
            apply_to_existing: false,
        })
        .await
        .unwrap();
    assert_eq!(push_through_b("logs/last.txt".into()).await, no_rule);
}
