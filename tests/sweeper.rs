//! The sweeper, on the real server over SQLite and Postgres with a driven clock: expired
//! artifacts end once at their expiry and no bill moves; abandoned uploads go while one in
//! progress stays; unreferenced content and crash orphans are collected after the grace
//! period and not before; a push deduplicating against content the sweeper is collecting
//! never commits an artifact without bytes (and, forced with a table lock on Postgres, fails
//! ABORTED and succeeds on retry); two sweepers end each artifact once; and old history is
//! pruned only once every month it bills is invoiced.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use artifactd::blob::Promoted;
use artifactd::domain::metering::{Month, Quantity};
use artifactd::domain::{Clock, ProjectId};
use artifactd::pb::v1::{self as pb, PushRequest, push_request};
use artifactd::service::sweeper::SweepReport;
use common::billing::{at, clients, ts};
use common::blobs::{content_address, local_directory_only};
use common::{
    Backend, TestDb, TestServer, content, header, job, project, pull, push, redis_url, sample,
    sha256_hex, stat,
};
use prost::Message;
use sea_orm::{ConnectionTrait, Statement};
use tonic::Code;

on_both_backends!(
    expired_artifacts_end_once_at_their_expiry_and_bills_do_not_move,
    abandoned_uploads_are_removed_and_one_in_progress_is_spared,
    unreferenced_content_and_orphans_are_collected_after_the_grace_period,
    a_push_deduplicating_against_content_being_collected_never_loses_it,
    two_sweepers_end_each_artifact_once,
    two_sweepers_on_one_redis_lease_end_each_artifact_once,
    history_is_pruned_only_once_its_months_are_invoiced,
    a_database_from_the_previous_schema_is_swept_correctly,
    a_database_from_before_the_index_trim_reads_the_same,
    what_an_asynchronous_sweep_commit_can_lose_is_redone,
);

fn expire_in(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

fn small_header(scope: pb::Scope, path: &str, data: &[u8]) -> pb::PushHeader {
    pb::PushHeader {
        expected_size: Some(data.len() as i64),
        ..header(scope, path)
    }
}

async fn sweep(server: &TestServer) -> SweepReport {
    let report = server.app.sweeper.sweep_once().await.unwrap();
    assert!(report.ran, "the only sweeper must get the lock");
    report
}

async fn count(server: &TestServer, sql: &str) -> i64 {
    let db = server.app.store.connection();
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap()
        .unwrap();
    row.try_get_by_index(0).unwrap()
}

async fn bill_bytes(server: &TestServer, project: &str, month: &str) -> Vec<u8> {
    let mut c = clients(server).await;
    c.usage
        .get_bill(pb::GetBillRequest {
            project_id: project.into(),
            month: month.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .encode_to_vec()
}

async fn list_bytes(server: &TestServer) -> Vec<u8> {
    server
        .client()
        .await
        .list(pb::ListRequest {
            scope: Some(job("p", "j")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .encode_to_vec()
}

async fn usage_bytes(server: &TestServer, project: &str) -> Vec<u8> {
    let mut c = clients(server).await;
    c.usage
        .get_usage(pb::GetUsageRequest {
            project_id: project.into(),
            start: Some(ts(at(2026, 11, 1, 0))),
            end: Some(ts(at(2026, 12, 1, 0))),
        })
        .await
        .unwrap()
        .into_inner()
        .encode_to_vec()
}

/// Three artifacts expire at different instants, one never within the test. The sweep
/// ends exactly the expired ones at their expiry (not at the sweep's time), a second sweep
/// ends nothing, and the bill and usage read byte for byte the same before and after.
async fn expired_artifacts_end_once_at_their_expiry_and_bills_do_not_move(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut client = server.client().await;
    let data = content(40_000, 1);
    let start = server.clock.now();
    for (path, seconds) in [("a.bin", 60), ("b.bin", 3600), ("c.bin", 7200)] {
        let mut h = header(job("p", "j"), path);
        h.expire_in = expire_in(seconds);
        push(&mut client, h, &data).await.unwrap();
    }
    push(&mut client, header(job("p", "j"), "kept.bin"), &data)
        .await
        .unwrap();
    server.clock.advance_seconds(3600); // a.bin and b.bin (to the microsecond) have expired
    let bill_before = bill_bytes(&server, "p", "2026-11").await;
    let usage_before = usage_bytes(&server, "p").await;

    let report = sweep(&server).await;
    assert_eq!(report.ended_artifacts, 2);
    assert_eq!(
        count(
            &server,
            &format!(
                "SELECT COUNT(*) FROM artifacts WHERE end_reason = 'expired' \
                 AND deleted_at = billing_end AND deleted_at = expires_at \
                 AND deleted_at IN ({}, {})",
                start.as_micros() + 60_000_000,
                start.as_micros() + 3_600_000_000
            )
        )
        .await,
        2
    );
    assert_eq!(sweep(&server).await.ended_artifacts, 0, "ended once");
    assert_eq!(bill_bytes(&server, "p", "2026-11").await, bill_before);
    assert_eq!(usage_bytes(&server, "p").await, usage_before);
    assert_eq!(
        stat(&mut client, job("p", "j"), "b.bin")
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    for path in ["c.bin", "kept.bin"] {
        let pulled = pull(&mut client, job("p", "j"), path, 0, 0).await.unwrap();
        assert_eq!(pulled.data, data, "{path} is live and intact");
    }
    // The content is still referenced by live artifacts: nothing collected.
    assert_eq!(report.collected_blobs, 0);
    // What operators see: the sweeper's metrics count each artifact once.
    let scrape = server.app.metrics.render();
    assert_eq!(
        sample(&scrape, "artifactd_sweeper_ended_artifacts_total", &[]),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &scrape,
            "artifactd_sweeper_runs_total",
            &[("outcome", "ok")]
        ),
        Some(2.0)
    );
    assert!(
        sample(
            &scrape,
            "artifactd_sweeper_last_success_timestamp_seconds",
            &[]
        )
        .unwrap()
            > 0.0
    );
    server.stop().await;
}

/// An upload untouched for longer than the max age is removed; one a push is writing right
/// now stays, and that push then completes and pulls back byte for byte.
async fn abandoned_uploads_are_removed_and_one_in_progress_is_spared(backend: Backend) {
    if local_directory_only(
        "an upload is a file under uploads/ only on a local directory (on an object store it \
         is a multipart upload, invisible until complete)",
    ) {
        return;
    }
    let Some(server) = TestServer::start_with(backend, |config| {
        config.upload_max_age = Duration::from_secs(120);
    })
    .await
    else {
        return;
    };
    let uploads = server.blob_dir.path().join("uploads");
    let stale = uploads.join("left-by-a-crash");
    std::fs::write(&stale, content(10_000, 2)).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();

    // A push in progress: the header and a first chunk sent, the rest held back.
    let data = content(300_000, 3);
    let (tx, rx) = tokio::sync::mpsc::channel::<PushRequest>(4);
    let mut client = server.client().await;
    let pushing = tokio::spawn(async move {
        client
            .push(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(tonic::Response::into_inner)
    });
    tx.send(PushRequest {
        msg: Some(push_request::Msg::Header(header(job("p", "j"), "big.bin"))),
    })
    .await
    .unwrap();
    tx.send(PushRequest {
        msg: Some(push_request::Msg::Chunk(bytes::Bytes::copy_from_slice(
            &data[..100_000],
        ))),
    })
    .await
    .unwrap();
    let in_flight = loop {
        let listed = server.leftover_uploads().await;
        if let Some(key) = listed.iter().find(|k| !k.ends_with("left-by-a-crash")) {
            break key.clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };

    let report = sweep(&server).await;
    assert_eq!(report.removed_uploads, 1);
    assert!(!stale.exists(), "the abandoned upload is removed");
    assert_eq!(
        server.leftover_uploads().await,
        [in_flight],
        "the live one stays"
    );

    tx.send(PushRequest {
        msg: Some(push_request::Msg::Chunk(bytes::Bytes::copy_from_slice(
            &data[100_000..],
        ))),
    })
    .await
    .unwrap();
    drop(tx);
    pushing.await.unwrap().unwrap();
    let mut client = server.client().await;
    let pulled = pull(&mut client, job("p", "j"), "big.bin", 0, 0)
        .await
        .unwrap();
    assert_eq!(pulled.data, data);
    assert!(server.leftover_uploads().await.is_empty());
    server.stop().await;
}

/// Content whose artifacts were deleted (a file and an inline row), a blob file with no row
/// (a crash after promotion, before the commit) and a blob row with no artifact are all
/// collected once the grace period has passed since their last use — not a second before —
/// and the same content pushed again afterwards is stored anew and pulls intact.
async fn unreferenced_content_and_orphans_are_collected_after_the_grace_period(backend: Backend) {
    let Some(server) = TestServer::start_with(backend, |config| {
        config.blob_grace = Duration::from_secs(3600);
    })
    .await
    else {
        return;
    };
    let mut client = server.client().await;
    let file_data = content(30_000, 4); // above the inline limit: a file of its own
    let inline_data = content(1_000, 5); // kept in its row
    push(
        &mut client,
        small_header(project("p"), "f.bin", &file_data),
        &file_data,
    )
    .await
    .unwrap();
    push(
        &mut client,
        small_header(project("p"), "i.bin", &inline_data),
        &inline_data,
    )
    .await
    .unwrap();
    let file_sha = sha256_hex(&file_data);
    let inline_sha = sha256_hex(&inline_data);
    assert!(server.blob_exists(&file_sha).await);

    // A blob file with no row at all.
    let orphan = content(25_000, 6);
    let orphan_sha = sha256_hex(&orphan);
    server
        .put_object(&content_address(&orphan_sha), &orphan)
        .await;
    server.clock.advance_seconds(60);
    // A push that leased and stored its blob, then died before committing.
    let half = content(20_000, 7);
    let half_sha = artifactd::domain::Sha256::parse("s", &sha256_hex(&half)).unwrap();
    let epoch = server
        .app
        .store
        .lease_blob(&half_sha, half.len() as i64, server.clock.now())
        .await
        .unwrap();
    let stored = server
        .app
        .artifacts
        .blobs()
        .put_small("crashed", bytes::Bytes::from(half.clone()), &half_sha, None)
        .await
        .unwrap();
    // On an object store the bytes stay in an object of their own, which the push names as
    // its blob's location before it commits: it died after that.
    if let Promoted::Unclaimed(object) = stored {
        let claimed = server
            .app
            .store
            .claim_location(&half_sha, epoch, None, &object.key())
            .await
            .unwrap();
        assert!(claimed);
        object.keep();
    }

    for path in ["f.bin", "i.bin"] {
        client
            .delete(pb::DeleteRequest {
                scope: Some(project("p")),
                path: path.into(),
                recursive: false,
            })
            .await
            .unwrap();
    }
    let first = sweep(&server).await;
    assert_eq!(first.adopted_orphans, 1, "the file without a row is found");
    assert_eq!(
        first.collected_blobs, 0,
        "nothing is collected inside the grace"
    );

    // All four were last used 60 s in: deleted, first seen, leased.
    server.clock.advance_seconds(3599); // the grace has not passed for any of them
    assert_eq!(sweep(&server).await.collected_blobs, 0);
    for sha in [&file_sha, &orphan_sha, half_sha.as_str()] {
        assert!(
            server.blob_exists(sha).await,
            "{sha} is kept inside the grace"
        );
    }
    let inline_rows =
        format!("SELECT COUNT(*) FROM blobs WHERE sha256 = '{inline_sha}' AND content IS NOT NULL");
    assert_eq!(count(&server, &inline_rows).await, 1);

    server.clock.advance_seconds(2);
    let collected = sweep(&server).await;
    assert_eq!(collected.collected_blobs, 4);
    assert_eq!(
        collected.collected_bytes,
        (file_data.len() + inline_data.len() + orphan.len() + half.len()) as u64
    );
    for sha in [&file_sha, &orphan_sha, half_sha.as_str()] {
        assert!(!server.blob_exists(sha).await, "{sha} is collected");
    }
    assert_eq!(count(&server, &inline_rows).await, 0);
    assert_eq!(
        count(
            &server,
            "SELECT COUNT(*) FROM blobs WHERE collected_at IS NOT NULL"
        )
        .await,
        4
    );
    assert_eq!(sweep(&server).await.collected_blobs, 0, "collected once");

    // The same content again: stored anew, pulled intact.
    push(
        &mut client,
        small_header(project("p"), "f2.bin", &file_data),
        &file_data,
    )
    .await
    .unwrap();
    push(
        &mut client,
        small_header(project("p"), "i2.bin", &inline_data),
        &inline_data,
    )
    .await
    .unwrap();
    push(&mut client, header(project("p"), "o.bin"), &orphan)
        .await
        .unwrap();
    for (path, data) in [
        ("f2.bin", &file_data),
        ("i2.bin", &inline_data),
        ("o.bin", &orphan),
    ] {
        let pulled = pull(&mut client, project("p"), path, 0, 0).await.unwrap();
        assert_eq!(&pulled.data, data, "{path}");
    }
    server.stop().await;
}

/// The dedup race, looped: pushers store the same few contents over and over (through a
/// file put in one step, a streamed upload, and inline rows) with short lives, while a
/// sweeper with no grace at all moves the clock past their expiry and collects the content
/// as soon as nothing references it — pushes that leased the content before a sweep commit
/// during it. Every push either commits an artifact whose bytes are there or fails ABORTED
/// having stored nothing; every pull of a live artifact returns its exact bytes (DATA_LOSS
/// would mean a row pointing at collected content). At the end, every live artifact pulls
/// byte for byte.
async fn a_push_deduplicating_against_content_being_collected_never_loses_it(backend: Backend) {
    let Some(server) = TestServer::start_with(backend, |config| {
        config.blob_grace = Duration::ZERO;
        config.metering = false;
    })
    .await
    else {
        return;
    };
    let server = Arc::new(server);
    let contents: Arc<Vec<Vec<u8>>> = Arc::new(vec![
        content(20_000, 10), // stored: one-step put (declared size)
        content(90_000, 11), // stored: streamed upload (no declared size)
        content(2_000, 12),  // inline
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    // Pulls and sweeps take turns (pushes do not): with no grace, a pull that is already
    // streaming when its artifact expires and is collected would lose its bytes — the case
    // the grace period exists for — while a pull that starts after a sweep must always find
    // the bytes of an artifact that is still live.
    let turns = Arc::new(tokio::sync::RwLock::new(()));
    let aborted = Arc::new(AtomicU64::new(0));
    let committed = Arc::new(AtomicU64::new(0));

    let sweeper = {
        let (server, stop, turns) = (server.clone(), stop.clone(), turns.clone());
        tokio::spawn(async move {
            let mut runs = 0;
            while !stop.load(Ordering::SeqCst) {
                let _turn = turns.write().await;
                server.clock.advance_seconds(60);
                sweep(&server).await;
                runs += 1;
                tokio::task::yield_now().await;
            }
            runs
        })
    };
    let mut pushers = Vec::new();
    for worker in 0..3u64 {
        let (server, contents) = (server.clone(), contents.clone());
        let (aborted, committed, turns) = (aborted.clone(), committed.clone(), turns.clone());
        pushers.push(tokio::spawn(async move {
            let mut client = server.client().await;
            for i in 0..150u64 {
                let which = ((i + worker) % 3) as usize;
                let data = &contents[which];
                let path = format!("w{worker}/{i}.bin");
                let mut h = if which == 1 {
                    header(project("race"), &path)
                } else {
                    small_header(project("race"), &path, data)
                };
                h.expire_in = expire_in(60);
                match push(&mut client, h, data).await {
                    Ok(_) => {
                        committed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) if status.code() == Code::Aborted => {
                        aborted.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Err(status) => panic!("push {path}: {status:?}"),
                }
                let _turn = turns.read().await;
                match pull(&mut client, project("race"), &path, 0, 0).await {
                    Ok(pulled) => assert!(pulled.data == *data, "{path}: wrong bytes"),
                    // Expired already: the sweeper moved the clock on.
                    Err(status) if status.code() == Code::NotFound => {}
                    Err(status) => panic!("pull {path}: {status:?}"),
                }
            }
        }));
    }
    for pusher in pushers {
        pusher.await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let runs = sweeper.await.unwrap();

    // The same contents once more, after all those collections, then: whatever is live
    // pulls intact, and what the database says is stored is there.
    let mut client = server.client().await;
    for (i, data) in contents.iter().enumerate() {
        push(
            &mut client,
            small_header(project("race"), &format!("final/{i}"), data),
            data,
        )
        .await
        .unwrap();
    }
    let mut live = 0;
    let mut after = String::new();
    loop {
        let page = client
            .list(pb::ListRequest {
                scope: Some(project("race")),
                prefix: String::new(),
                page_size: 1000,
                page_token: after.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        for artifact in &page.artifacts {
            let pulled = pull(&mut client, project("race"), &artifact.path, 0, 0)
                .await
                .unwrap();
            assert_eq!(
                sha256_hex(&pulled.data),
                artifact.sha256,
                "{}",
                artifact.path
            );
            live += 1;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        after = page.next_page_token;
    }
    for (sha, data) in contents.iter().map(|d| (sha256_hex(d), d)) {
        let referenced = count(
            &server,
            &format!(
                "SELECT COUNT(*) FROM artifacts WHERE sha256 = '{sha}' AND deleted_at IS NULL"
            ),
        )
        .await;
        let stored = count(
            &server,
            &format!("SELECT COUNT(*) FROM blobs WHERE sha256 = '{sha}' AND collected_at IS NULL"),
        )
        .await;
        if referenced > 0 {
            assert_eq!(stored, 1, "referenced content is recorded as stored");
            if data.len() > 16 * 1024 {
                assert!(server.blob_exists(&sha).await, "and its file is there");
            }
        }
    }
    let collected = sample(
        &server.app.metrics.render(),
        "artifactd_sweeper_collected_blobs_total",
        &[],
    )
    .unwrap() as u64;
    eprintln!(
        "{runs} sweeps, {} pushes committed, {} aborted, {collected} collections, {live} live at the end",
        committed.load(Ordering::Relaxed),
        aborted.load(Ordering::Relaxed)
    );
    assert!(
        collected >= 10,
        "the race must actually happen: only {collected} collections"
    );
    assert!(committed.load(Ordering::Relaxed) >= 300);
    assert!(live >= 3);
    Arc::into_inner(server).unwrap().stop().await;
}

/// Two replicas' sweepers on one database, run at the same time over and over: every
/// expired artifact ends exactly once (their reports add up to the number of artifacts,
/// and each row is ended at its expiry), and each unreferenced blob is collected once. On
/// Postgres the advisory lock also keeps a second sweeper out while one runs.
async fn two_sweepers_end_each_artifact_once(backend: Backend) {
    two_sweepers(backend, None).await;
}

/// The same with both replicas on one Redis: the Redis lease keeps the second sweeper out
/// (on SQLite too, where there is no advisory lock; on Postgres the advisory lock stays
/// free, so the lease is what does it).
async fn two_sweepers_on_one_redis_lease_end_each_artifact_once(backend: Backend) {
    let Some(url) = redis_url() else {
        return; // said once on the terminal by `redis_url`
    };
    two_sweepers(
        backend,
        Some((url, format!("test-{}:", uuid::Uuid::new_v4().simple()))),
    )
    .await;
}

async fn two_sweepers(backend: Backend, redis: Option<(String, String)>) {
    let configure = |config: &mut artifactd::config::Config| {
        config.blob_grace = Duration::ZERO;
        config.sweep_batch = 25;
        config.metering = false;
        if let Some((url, prefix)) = &redis {
            config.redis_url = Some(url.clone());
            config.redis_prefix = prefix.clone();
        }
    };
    let Some(first) = TestServer::start_with(backend, configure).await else {
        return;
    };
    let second = TestServer::start_on(first.db.shared(), configure).await;
    second.clock.set(first.clock.now());
    let mut client = first.client().await;
    const N: u64 = 300;
    for i in 0..N {
        let data = content(500, 100 + i % 40); // 40 distinct inline blobs
        let mut h = small_header(job("p", "j"), &format!("{i}.bin"), &data);
        h.expire_in = expire_in(60 + i as i64);
        push(&mut client, h, &data).await.unwrap();
    }
    for server in [&first, &second] {
        server.clock.advance_seconds(3600);
    }

    if redis.is_some() {
        let held = first.app.sweeper.try_lock().await.unwrap().unwrap();
        assert!(
            second.app.sweeper.try_lock().await.unwrap().is_none(),
            "one sweeper at a time"
        );
        assert!(!second.app.sweeper.sweep_once().await.unwrap().ran);
        if backend == Backend::Postgres {
            let advisory = second.app.store.try_sweep_lock().await.unwrap();
            assert!(advisory.is_some(), "the lease, not the advisory lock");
            advisory.unwrap().release().await;
        }
        held.release().await;
    } else if backend == Backend::Postgres {
        let held = first.app.store.try_sweep_lock().await.unwrap().unwrap();
        assert!(
            second.app.store.try_sweep_lock().await.unwrap().is_none(),
            "one sweeper at a time"
        );
        assert!(!second.app.sweeper.sweep_once().await.unwrap().ran);
        held.release().await;
    }

    let (mut ended, mut collected) = (0, 0);
    for _ in 0..5 {
        let (a, b) = tokio::join!(
            first.app.sweeper.sweep_once(),
            second.app.sweeper.sweep_once()
        );
        for report in [a.unwrap(), b.unwrap()] {
            ended += report.ended_artifacts;
            collected += report.collected_blobs;
        }
    }
    assert_eq!(ended, N, "each artifact ended by exactly one sweeper");
    assert_eq!(collected, 40, "each blob collected by exactly one sweeper");
    assert_eq!(
        count(
            &first,
            "SELECT COUNT(*) FROM artifacts WHERE end_reason = 'expired' \
             AND deleted_at = billing_end"
        )
        .await,
        N as i64
    );
    second.stop().await;
    first.stop().await;
}

/// History retention at its minimum (124 days). An artifact deleted in November 2026 is
/// pruned in April 2027 — after its months' invoices exist: the one `GetBill` already froze
/// reads byte for byte the same after the prune, and the one nobody asked for is finalized
/// by the sweeper first and bills the pruned row's exact usage. A row that ended within the
/// retention stays, and so do live ones.
async fn history_is_pruned_only_once_its_months_are_invoiced(backend: Backend) {
    let Some(server) = TestServer::start_with(backend, |config| {
        config.history_retention = Duration::from_secs(124 * 86_400);
    })
    .await
    else {
        return;
    };
    let mut client = server.client().await;
    let data = content(50_000, 20);
    for p in ["frozen", "unasked"] {
        push(&mut client, header(project(p), "old.bin"), &data)
            .await
            .unwrap();
    }
    let created = server.clock.now();
    server.clock.set(at(2026, 11, 11, 0));
    for p in ["frozen", "unasked"] {
        client
            .delete(pb::DeleteRequest {
                scope: Some(project(p)),
                path: "old.bin".into(),
                recursive: false,
            })
            .await
            .unwrap();
    }
    let deleted = server.clock.now();
    // A row that ends within the retention, and a live one.
    server.clock.set(at(2027, 1, 5, 0));
    push(&mut client, header(project("frozen"), "recent.bin"), &data)
        .await
        .unwrap();
    server.clock.set(at(2027, 1, 6, 0));
    client
        .delete(pb::DeleteRequest {
            scope: Some(project("frozen")),
            path: "recent.bin".into(),
            recursive: false,
        })
        .await
        .unwrap();
    push(&mut client, header(project("frozen"), "live.bin"), &data)
        .await
        .unwrap();

    server.clock.set(at(2027, 4, 20, 0)); // Nov 11 + 124 days = Mar 15
    let frozen_before = bill_bytes(&server, "frozen", "2026-11").await;
    let report = sweep(&server).await;
    assert_eq!(report.pruned_rows, 2, "both old rows, and only them");
    assert_eq!(
        count(
            &server,
            "SELECT COUNT(*) FROM artifacts WHERE path = 'old.bin'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &server,
            "SELECT COUNT(*) FROM artifacts WHERE path IN ('recent.bin', 'live.bin')"
        )
        .await,
        2
    );
    assert_eq!(
        bill_bytes(&server, "frozen", "2026-11").await,
        frozen_before
    );
    let mut c = clients(&server).await;
    let unasked = c
        .usage
        .get_bill(pb::GetBillRequest {
            project_id: "unasked".into(),
            month: "2026-11".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(unasked.closed, "finalized before its rows were pruned");
    let expected =
        i128::from(data.len() as i64) * i128::from(deleted.as_micros() - created.as_micros());
    let november = Month::parse("m", "2026-11").unwrap();
    let invoice = server
        .app
        .metering
        .bill(&ProjectId::parse("p", "unasked").unwrap(), november)
        .await
        .unwrap();
    let storage = invoice
        .lines
        .iter()
        .find(|l| l.meter.as_str() == "storage")
        .unwrap();
    assert_eq!(
        storage.usage.reduced(),
        Quantity::gib_months(expected, november).reduced(),
        "the invoice holds the pruned row's exact usage"
    );
    assert_eq!(sweep(&server).await.pruned_rows, 0);
    server.stop().await;
}

/// A database populated under the previous schema (migrations 1–7): a live artifact on a
/// stored blob, an ended one on an inline blob. After the upgrade the blobs' last use is
/// their newest artifact's creation, listings and pulls read the same, the live content is
/// never collected, the unreferenced one is after the grace period, and pushing the stored
/// content again deduplicates against it.
async fn a_database_from_the_previous_schema_is_swept_correctly(backend: Backend) {
    use migrations::{Migrator, MigratorTrait};
    let Some(db) = TestDb::create(backend).await else {
        return;
    };
    let stored = content(30_000, 30);
    let inline = content(800, 31);
    let (stored_sha, inline_sha) = (sha256_hex(&stored), sha256_hex(&inline));
    let t0 = common::TEST_EPOCH_SECONDS * 1_000_000;
    {
        let url = match backend {
            Backend::Sqlite => format!("{}?mode=rwc", db.url),
            Backend::Postgres => db.url.clone(),
        };
        let conn = sea_orm::Database::connect(url.as_str()).await.unwrap();
        Migrator::up(&conn, Some(7)).await.unwrap();
        let backend_db = conn.get_database_backend();
        conn.execute_unprepared(
            "INSERT INTO projects (project_id, plan_id, alert_thresholds, created_at, updated_at) \
             VALUES ('legacy', 'free', '', 0, 0)",
        )
        .await
        .unwrap();
        conn.execute_unprepared(
            "INSERT INTO project_plans (project_id, valid_from, plan_id, assigned_at) \
             VALUES ('legacy', 0, 'free', 0)",
        )
        .await
        .unwrap();
        conn.execute_raw(Statement::from_sql_and_values(
            backend_db,
            match backend {
                Backend::Postgres => {
                    "INSERT INTO blobs (sha256, size, created_at, content) VALUES \
                     ($1, $2, $3, NULL), ($4, $5, $3, $6)"
                }
                Backend::Sqlite => {
                    "INSERT INTO blobs (sha256, size, created_at, content) VALUES \
                     (?1, ?2, ?3, NULL), (?4, ?5, ?3, ?6)"
                }
            },
            [
                stored_sha.clone().into(),
                (stored.len() as i64).into(),
                t0.into(),
                inline_sha.clone().into(),
                (inline.len() as i64).into(),
                inline.clone().into(),
            ],
        ))
        .await
        .unwrap();
        conn.execute_unprepared(&format!(
            "INSERT INTO artifacts (project_id, scope_kind, scope_id, path, size, sha256, mode, \
             created_at, expires_at, keep, deleted_at, end_reason, upload_id, billing_end) VALUES \
             ('legacy', 'project', '', 'live.bin', {}, '{stored_sha}', 420, {}, NULL, false, NULL, NULL, 'u1', NULL), \
             ('legacy', 'project', '', 'gone.bin', {}, '{inline_sha}', 420, {}, NULL, false, {}, 'deleted', 'u2', {})",
            stored.len(),
            t0 + 5_000_000,
            inline.len(),
            t0 + 7_000_000,
            t0 + 9_000_000,
            t0 + 9_000_000,
        ))
        .await
        .unwrap();
        let _ = conn.close().await;
    }
    let server = TestServer::start_on(db, |config| {
        config.blob_grace = Duration::from_secs(3600);
    })
    .await;
    server
        .put_object(&content_address(&stored_sha), &stored)
        .await;
    assert_eq!(
        count(
            &server,
            &format!(
                "SELECT COUNT(*) FROM blobs WHERE collected_at IS NULL AND epoch = 0 AND \
                 ((sha256 = '{stored_sha}' AND last_ref_at = {}) OR \
                  (sha256 = '{inline_sha}' AND last_ref_at = {}))",
                t0 + 5_000_000,
                t0 + 7_000_000
            )
        )
        .await,
        2,
        "last use backfilled from the newest artifact"
    );
    // The ended one's grace runs from its end (t0 + 9 s), not from the upgrade.
    server.clock.advance_seconds(3599);
    let bill_before = bill_bytes(&server, "legacy", "2026-11").await;
    assert_eq!(sweep(&server).await.collected_blobs, 0);
    assert_eq!(bill_bytes(&server, "legacy", "2026-11").await, bill_before);
    server.clock.advance_seconds(10);
    let bill_before = bill_bytes(&server, "legacy", "2026-11").await;
    let report = sweep(&server).await;
    assert_eq!(
        report.collected_blobs, 1,
        "the unreferenced inline blob only"
    );
    assert_eq!(report.collected_bytes, inline.len() as u64);
    assert!(server.blob_exists(&stored_sha).await, "live content stays");
    assert_eq!(bill_bytes(&server, "legacy", "2026-11").await, bill_before);
    let mut client = server.client().await;
    let pulled = pull(&mut client, project("legacy"), "live.bin", 0, 0)
        .await
        .unwrap();
    assert_eq!(pulled.data, stored);
    let again = push(
        &mut client,
        small_header(project("legacy"), "again.bin", &stored),
        &stored,
    )
    .await
    .unwrap();
    assert!(
        again.deduplicated,
        "the migrated row and its file are reused"
    );
    let listed = client
        .list(pb::ListRequest {
            scope: Some(project("legacy")),
            prefix: String::new(),
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let paths: Vec<&str> = listed.artifacts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(paths, ["again.bin", "live.bin"]);
    server.stop().await;
}

/// A database the server wrote under the schema before the index trim (migrations 1–12):
/// after migration 13 the bill, the usage and the listing read byte for byte as before it,
/// and the sweep, one artifact per batch so each batch's content is collected while the
/// next one ends, ends the two expired artifacts and collects exactly the content no live
/// artifact shares.
async fn a_database_from_before_the_index_trim_reads_the_same(backend: Backend) {
    let Some(db) = TestDb::create(backend).await else {
        return;
    };
    {
        db.migrate_to(12).await;
    }
    let index_count = match backend {
        Backend::Sqlite => {
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' \
             AND name = 'artifacts_project_created'"
        }
        Backend::Postgres => {
            "SELECT COUNT(*) FROM pg_indexes WHERE indexname = 'artifacts_project_created'"
        }
    };
    let mut old = TestServer::start_on(db, |config| {
        config.migrate_on_start = false;
        config.redis_url = None;
    })
    .await;
    assert_eq!(count(&old, index_count).await, 1, "the previous schema");
    let (shared, stored, inline, live) = (
        content(40_000, 40),
        content(900, 41),
        content(50_000, 42),
        "live.bin",
    );
    let mut client = old.client().await;
    for (path, data, seconds) in [
        ("a.bin", &shared, Some(60)),
        ("b.bin", &inline, Some(90)),
        (live, &stored, None),
        ("shares-a.bin", &shared, Some(7200)),
    ] {
        let mut h = small_header(job("p", "j"), path, data);
        h.expire_in = seconds.and_then(expire_in);
        push(&mut client, h, data).await.unwrap();
    }
    old.clock.advance_seconds(3600);
    let before = (
        bill_bytes(&old, "p", "2026-11").await,
        usage_bytes(&old, "p").await,
        list_bytes(&old).await,
    );
    old.shut_down().await;

    let blob_url = old.config.blob_url.clone();
    let server = TestServer::start_on(old.db.shared(), |config| {
        config.blob_url = blob_url;
        config.sweep_batch = 1;
        config.blob_grace = Duration::from_secs(60);
    })
    .await;
    assert_eq!(count(&server, index_count).await, 0, "migration 13 ran");
    server.clock.advance_seconds(3600);
    let after = (
        bill_bytes(&server, "p", "2026-11").await,
        usage_bytes(&server, "p").await,
        list_bytes(&server).await,
    );
    assert!(before == after, "bill, usage and listing read the same");

    let report = sweep(&server).await;
    assert_eq!(report.ended_artifacts, 2, "a.bin and b.bin");
    assert_eq!(
        (report.collected_blobs, report.collected_bytes),
        (1, inline.len() as u64),
        "b.bin's content only: shares-a.bin still holds a.bin's"
    );
    assert_eq!(bill_bytes(&server, "p", "2026-11").await, after.0);
    let mut client = server.client().await;
    for (path, data) in [(live, &stored), ("shares-a.bin", &shared)] {
        let pulled = pull(&mut client, job("p", "j"), path, 0, 0).await.unwrap();
        assert!(pulled.data == *data, "{path} intact");
    }
    server.stop().await;
    drop(old);
}

/// The sweeper commits its ending and collecting without waiting for the WAL flush
/// (`store::sweep`, `begin_sweep_transaction`), so a crash of Postgres can lose its last
/// commits — never a later commit without them. This puts the database back in the state
/// such a loss leaves, after a sweep that ended artifacts and collected their content:
///
/// - lost end marks: the artifacts still read as ended (Stat NOT_FOUND, not listed), their
///   paths take a push without `force`, the bill does not move, and the next sweep marks
///   them again at their expiry;
/// - lost collection marks (the bytes were deleted before the commit): a push of the same
///   content writes the bytes again and pulls whole, and the next sweep collects the other
///   row again although its bytes are already gone.
async fn what_an_asynchronous_sweep_commit_can_lose_is_redone(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |config| {
        config.blob_grace = Duration::from_secs(60);
    })
    .await
    else {
        return;
    };
    let mut client = server.client().await;
    let small = content(30_000, 11); // a file written in one step
    let big = content(3 << 20, 12); // a streamed upload, promoted
    let start = server.clock.now();
    for (path, data) in [("small.bin", &small), ("big.bin", &big)] {
        let mut h = header(job("p", "j"), path);
        h.expire_in = expire_in(60);
        push(&mut client, h, data).await.unwrap();
    }
    server.clock.advance_seconds(121); // expired, and the grace has passed since
    let bill_before = bill_bytes(&server, "p", "2026-11").await;
    let report = sweep(&server).await;
    assert_eq!(report.ended_artifacts, 2);
    assert_eq!(report.collected_blobs, 2);
    let (small_sha, big_sha) = (sha256_hex(&small), sha256_hex(&big));
    for sha in [&small_sha, &big_sha] {
        assert!(!server.blob_exists(sha).await);
    }

    // Both commits lost: the rows as they were before the sweep, the bytes gone.
    let db = server.app.store.connection();
    for sql in [
        "UPDATE artifacts SET deleted_at = NULL, end_reason = NULL".to_string(),
        format!(
            "UPDATE blobs SET collected_at = NULL, epoch = epoch - 1 \
             WHERE sha256 IN ('{small_sha}', '{big_sha}')"
        ),
    ] {
        db.execute_raw(Statement::from_string(db.get_database_backend(), sql))
            .await
            .unwrap();
    }
    for path in ["small.bin", "big.bin"] {
        let err = stat(&mut client, job("p", "j"), path).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{path} still reads as ended");
    }
    assert!(
        pb::ListResponse::decode(list_bytes(&server).await.as_slice())
            .unwrap()
            .artifacts
            .is_empty()
    );
    assert_eq!(bill_bytes(&server, "p", "2026-11").await, bill_before);

    // The same small content again, at the same path without force: written anew.
    push(&mut client, header(job("p", "j"), "small.bin"), &small)
        .await
        .unwrap();
    let egress_sql = "SELECT CAST(COUNT(*) AS BIGINT) FROM usage_events WHERE meter = 'egress'";
    let egress_before = count(&server, egress_sql).await;
    let pulled = pull(&mut client, job("p", "j"), "small.bin", 0, 0)
        .await
        .unwrap();
    assert!(pulled.data == small, "pulled whole");
    assert!(server.blob_exists(&small_sha).await);
    // The pull's egress is recorded when its stream ends, a moment after the last byte:
    // wait for that record, so the bill below already holds it.
    for _ in 0..250 {
        if count(&server, egress_sql).await > egress_before {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        count(&server, egress_sql).await,
        egress_before + 1,
        "the pull's egress"
    );
    let bill_after_push = bill_bytes(&server, "p", "2026-11").await;

    // The next sweep marks big.bin again at its expiry and collects its row once more.
    server.clock.advance_seconds(61);
    let again = sweep(&server).await;
    assert_eq!(again.ended_artifacts, 1, "big.bin is marked again");
    assert_eq!(again.collected_blobs, 1, "big's row is collected again");
    assert_eq!(again.collected_bytes, big.len() as u64);
    assert_eq!(
        count(
            &server,
            &format!(
                "SELECT COUNT(*) FROM artifacts WHERE end_reason = 'expired' \
                 AND deleted_at = billing_end AND deleted_at = {}",
                start.as_micros() + 60_000_000
            )
        )
        .await,
        2,
        "the first small.bin and big.bin end at their expiry"
    );
    assert_eq!(
        count(
            &server,
            &format!(
                "SELECT COUNT(*) FROM blobs WHERE sha256 = '{small_sha}' AND collected_at IS NULL"
            )
        )
        .await,
        1,
        "the live small.bin's content stays"
    );
    assert_eq!(
        bill_bytes(&server, "p", "2026-11").await,
        bill_after_push,
        "marking again moves no bill"
    );
    server.stop().await;
}

/// The race behind ABORTED, forced on Postgres with real locks: a streamed push leases
/// content that no artifact references any more, and is held before its commit statement
/// while the sweeper collects that content; the commit then finds its lease broken. The
/// hold is a table lock the test takes on its own connection: `LOCK TABLE jobs IN
/// EXCLUSIVE MODE` lets plain reads through but not the commit statement, which locks
/// `jobs` rows `FOR SHARE` (keep-latest pins) and so must wait for the table lock before it
/// touches any row; the lease before it and the sweep never lock `jobs`. The client sees
/// exactly ABORTED with a message that says to retry, nothing was stored, and the retry
/// stores the content again and pulls back byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_whose_content_is_collected_before_its_commit_is_aborted_and_a_retry_succeeds() {
    let Some(server) = TestServer::start_with(Backend::Postgres, |config| {
        config.blob_grace = Duration::ZERO;
        config.metering = false;
    })
    .await
    else {
        return;
    };
    let mut client = server.client().await;
    // Larger than a small push and of undeclared size: streamed through an upload, leased
    // once its digest is known (a small push would store its bytes again by itself).
    let data = content(300_000, 31);
    let sha = sha256_hex(&data);
    push(&mut client, header(project("race"), "first.bin"), &data)
        .await
        .unwrap();
    client
        .delete(pb::DeleteRequest {
            scope: Some(project("race")),
            path: "first.bin".into(),
            recursive: false,
        })
        .await
        .unwrap();
    assert!(server.blob_exists(&sha).await);
    // The racing push's lease then carries a time of its own.
    server.clock.advance_seconds(1);

    let holder = sea_orm::Database::connect(server.db.url.as_str())
        .await
        .unwrap();
    let hold = sea_orm::TransactionTrait::begin(&holder).await.unwrap();
    hold.execute_unprepared("LOCK TABLE jobs IN EXCLUSIVE MODE")
        .await
        .unwrap();
    let racing = {
        let (mut client, data) = (client.clone(), data.clone());
        tokio::spawn(async move {
            push(&mut client, header(project("race"), "second.bin"), &data).await
        })
    };
    // The push has received its bytes, leased the content (deduplicating onto the stored
    // file) and is waiting in its commit for the lock.
    let waiting = "SELECT COUNT(*) FROM pg_locks WHERE relation = 'jobs'::regclass AND NOT granted";
    let mut waited = 0;
    while count(&server, waiting).await == 0 {
        waited += 1;
        assert!(waited < 1000, "the push never reached its commit");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        count(
            &server,
            &format!(
                "SELECT COUNT(*) FROM blobs WHERE sha256 = '{sha}' AND collected_at IS NULL \
                 AND last_ref_at = {}",
                server.clock.now().as_micros()
            )
        )
        .await,
        1,
        "the push leased the content before its commit"
    );
    server.clock.advance_seconds(1);
    let report = sweep(&server).await;
    assert_eq!(
        report.collected_blobs, 1,
        "the sweeper collects the content"
    );
    assert!(!server.blob_exists(&sha).await);
    hold.rollback().await.unwrap();

    let status = racing.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(
        status.message(),
        "the content was reclaimed while this push committed; nothing was stored, retry the push"
    );
    assert_eq!(
        stat(&mut client, project("race"), "second.bin")
            .await
            .unwrap_err()
            .code(),
        Code::NotFound,
        "nothing was stored"
    );
    assert_eq!(
        count(
            &server,
            "SELECT COUNT(*) FROM artifacts WHERE deleted_at IS NULL"
        )
        .await,
        0
    );

    // The retry the message asks for stores the content again.
    let retried = push(&mut client, header(project("race"), "second.bin"), &data)
        .await
        .unwrap();
    assert!(!retried.deduplicated, "the content was stored anew");
    assert_eq!(retried.artifact.unwrap().sha256, sha);
    assert!(server.blob_exists(&sha).await);
    let pulled = pull(&mut client, project("race"), "second.bin", 0, 0)
        .await
        .unwrap();
    assert!(pulled.data == data, "the retry's bytes pull back intact");
    let _ = holder.close().await;
    server.stop().await;
}
