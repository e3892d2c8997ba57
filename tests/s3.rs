//! Blobs on a real S3 server (`TEST_S3_URL=s3://bucket/prefix` with `AWS_ENDPOINT`,
//! credentials and `AWS_ALLOW_HTTP` as for the server; CI starts moto's), over SQLite and
//! Postgres: a push is one upload that stays where it was written (no copy, nothing at the
//! content address, nothing left over), identical content is stored once even when pushed
//! concurrently, pulls read the blob's location byte for byte, the sweeper deletes content at
//! its location and removes pushed objects no blob names, a missing object is DATA_LOSS, and
//! a database from before locations reads its blobs at their content addresses.
//!
//! Without an S3 server each test says SKIPPED on the terminal and returns;
//! `ARTIFACTD_REQUIRE_S3=1` makes that a failure.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use artifactd::pb::v1 as pb;
use common::{Backend, TestDb, TestServer, content, header, project, pull, push, sha256_hex};
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sea_orm::{ConnectionTrait, Statement};
use tonic::Code;

on_both_backends!(
    a_push_is_one_upload_that_stays_where_it_was_written,
    identical_content_is_stored_once_even_when_pushed_concurrently,
    the_sweeper_deletes_content_at_its_location,
    pushed_objects_no_blob_names_are_removed,
    a_missing_object_is_data_loss,
    a_database_from_before_locations_reads_the_same,
);

/// The S3 test location: `TEST_S3_URL`, else `TEST_BLOB_URL` when it is an `s3://` URL.
fn s3_url() -> Option<String> {
    let url = std::env::var("TEST_S3_URL")
        .ok()
        .or_else(|| std::env::var("TEST_BLOB_URL").ok())
        .filter(|url| url.starts_with("s3://"));
    if url.is_none() {
        if std::env::var("ARTIFACTD_REQUIRE_S3").as_deref() == Ok("1") {
            panic!("ARTIFACTD_REQUIRE_S3=1 but TEST_S3_URL is unset");
        }
        use std::io::Write;
        let test = std::thread::current().name().unwrap_or("").to_owned();
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED (not passed) {test} [s3]: no S3 server. Set TEST_S3_URL=s3://bucket/prefix \
             with AWS_ENDPOINT, AWS_ALLOW_HTTP=true and credentials (e.g. moto_server); \
             ARTIFACTD_REQUIRE_S3=1 makes this a failure."
        );
    }
    url
}

/// A server whose blobs are on S3 under a prefix of its own, and a view of that prefix.
struct S3Server {
    server: TestServer,
    objects: Box<dyn ObjectStore>,
    prefix: String,
}

impl S3Server {
    async fn start(
        backend: Backend,
        tweak: impl FnOnce(&mut artifactd::config::Config),
    ) -> Option<Self> {
        let db = TestDb::create(backend).await?;
        Self::start_on(db, tweak).await
    }

    async fn start_on(
        db: TestDb,
        tweak: impl FnOnce(&mut artifactd::config::Config),
    ) -> Option<Self> {
        let url = s3_url()?;
        let blob_url = format!(
            "{}/{}",
            url.trim_end_matches('/'),
            uuid::Uuid::new_v4().simple()
        );
        let server = TestServer::start_on(db, |config| {
            config.blob_url = blob_url.clone();
            tweak(config);
        })
        .await;
        let (bucket, prefix) = blob_url["s3://".len()..].split_once('/').unwrap();
        let objects = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .unwrap();
        Some(Self {
            server,
            objects: Box::new(objects),
            prefix: prefix.to_owned(),
        })
    }

    /// Every object under the server's prefix (relative key, size), in key order — except
    /// the background scrub's saved place (`scrub/state.json`, written once at start-up,
    /// whenever the scrubber gets to it), which is service state, not content.
    async fn objects(&self) -> Vec<(String, u64)> {
        let prefix = ObjectPath::from(self.prefix.as_str());
        let mut found: Vec<(String, u64)> = self
            .objects
            .list(Some(&prefix))
            .map(|meta| {
                let meta = meta.unwrap();
                let key = meta.location.as_ref()[self.prefix.len() + 1..].to_owned();
                (key, meta.size)
            })
            .filter(|(key, _)| std::future::ready(!key.starts_with("scrub/")))
            .collect()
            .await;
        found.sort();
        found
    }

    /// Waits (briefly) until the objects under the prefix are `expected`: discarded uploads
    /// are deleted just after their push returns.
    async fn settle(&self, expected: impl Fn(&[(String, u64)]) -> bool) -> Vec<(String, u64)> {
        for _ in 0..100 {
            let objects = self.objects().await;
            if expected(&objects) {
                return objects;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.objects().await
    }

    async fn put(&self, key: &str, data: &[u8]) {
        let path = ObjectPath::from(format!("{}/{key}", self.prefix));
        self.objects
            .put(&path, PutPayload::from(data.to_vec()))
            .await
            .unwrap();
    }

    async fn delete(&self, key: &str) {
        let path = ObjectPath::from(format!("{}/{key}", self.prefix));
        self.objects.delete(&path).await.unwrap();
    }

    /// The `blobs` row of `sha256`: (location, collected).
    async fn blob_row(&self, sha256: &str) -> (Option<String>, bool) {
        let db = self.server.app.store.connection();
        let row = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                format!(
                    "SELECT location, collected_at IS NOT NULL FROM blobs WHERE sha256 = '{sha256}'"
                ),
            ))
            .await
            .unwrap()
            .unwrap();
        (
            row.try_get_by_index(0).unwrap(),
            row.try_get_by_index(1).unwrap(),
        )
    }
}

fn pushed_keys(objects: &[(String, u64)]) -> Vec<&str> {
    objects
        .iter()
        .filter(|(key, _)| key.starts_with("blobs/pushed/"))
        .map(|(key, _)| key.as_str())
        .collect()
}

async fn a_push_is_one_upload_that_stays_where_it_was_written(backend: Backend) {
    let Some(s3) = S3Server::start(backend, |_| {}).await else {
        return;
    };
    let mut client = s3.server.client().await;
    // Two multipart parts (5 MiB and the rest), streamed without a declared size.
    let big = content(5 * 1024 * 1024 + 300_007, 1);
    let pushed = push(&mut client, header(project("p"), "big.bin"), &big)
        .await
        .unwrap();
    assert!(!pushed.deduplicated);
    // A small push that declares its size but is too big to inline: one PUT.
    let small = content(20_000, 2);
    let small_header = pb::PushHeader {
        expected_size: Some(small.len() as i64),
        ..header(project("p"), "small.bin")
    };
    push(&mut client, small_header, &small).await.unwrap();

    let objects = s3.objects().await;
    assert_eq!(
        objects.len(),
        2,
        "one object per push, nothing at a content address or under uploads/: {objects:?}"
    );
    for data in [&big, &small] {
        let sha = sha256_hex(data);
        let (location, collected) = s3.blob_row(&sha).await;
        let location = location.expect("the blob names its pushed object");
        assert!(!collected);
        assert!(
            objects.contains(&(location.clone(), data.len() as u64)),
            "{location} in {objects:?}"
        );
        assert!(location.starts_with("blobs/pushed/"), "{location}");
    }

    let whole = pull(&mut client, project("p"), "big.bin", 0, 0)
        .await
        .unwrap();
    assert!(whole.data == big, "pulled back byte for byte");
    let part = pull(
        &mut client,
        project("p"),
        "big.bin",
        5 * 1024 * 1024 - 10,
        20,
    )
    .await
    .unwrap();
    assert_eq!(part.data, &big[5 * 1024 * 1024 - 10..5 * 1024 * 1024 + 10]);
    let tail = pull(
        &mut client,
        project("p"),
        "big.bin",
        big.len() as i64 - 3,
        0,
    )
    .await
    .unwrap();
    assert_eq!(tail.data, &big[big.len() - 3..]);
    let small_back = pull(&mut client, project("p"), "small.bin", 0, 0)
        .await
        .unwrap();
    assert_eq!(small_back.data, small);
    s3.server.stop().await;
}

async fn identical_content_is_stored_once_even_when_pushed_concurrently(backend: Backend) {
    let Some(s3) = S3Server::start(backend, |_| {}).await else {
        return;
    };
    let data = content(300_000, 3);
    let mut client = s3.server.client().await;
    let first = push(&mut client, header(project("p"), "a.bin"), &data)
        .await
        .unwrap();
    assert!(!first.deduplicated);
    let second = push(&mut client, header(project("p"), "b.bin"), &data)
        .await
        .unwrap();
    assert!(second.deduplicated, "same content is stored once");
    let once = |objects: &[(String, u64)]| objects.len() == 1;
    let objects = s3.settle(once).await;
    assert_eq!(
        objects.len(),
        1,
        "the second push's upload is deleted: {objects:?}"
    );

    // Eight pushes of new content at once: each uploads, one names its object, the others
    // deduplicate and delete theirs.
    let racing = content(700_000, 4);
    let mut pushes = Vec::new();
    for i in 0..8 {
        let mut client = s3.server.client().await;
        let racing = racing.clone();
        pushes.push(tokio::spawn(async move {
            push(
                &mut client,
                header(project("p"), &format!("race/{i}")),
                &racing,
            )
            .await
            .unwrap()
            .deduplicated
        }));
    }
    let mut stored = 0;
    for pushed in pushes {
        if !pushed.await.unwrap() {
            stored += 1;
        }
    }
    assert_eq!(stored, 1, "exactly one push stored the content");
    let objects = s3.settle(|objects| objects.len() == 2).await;
    assert_eq!(objects.len(), 2, "one object per content: {objects:?}");
    let (location, _) = s3.blob_row(&sha256_hex(&racing)).await;
    assert!(pushed_keys(&objects).contains(&location.unwrap().as_str()));
    for i in 0..8 {
        let pulled = pull(&mut client, project("p"), &format!("race/{i}"), 0, 0)
            .await
            .unwrap();
        assert!(pulled.data == racing, "race/{i}");
    }
    s3.server.stop().await;
}

async fn the_sweeper_deletes_content_at_its_location(backend: Backend) {
    let Some(s3) = S3Server::start(backend, |config| {
        config.blob_grace = Duration::from_secs(60);
    })
    .await
    else {
        return;
    };
    let data = content(200_000, 5);
    let sha = sha256_hex(&data);
    let mut client = s3.server.client().await;
    let short = pb::PushHeader {
        expire_in: Some(prost_types::Duration {
            seconds: 10,
            nanos: 0,
        }),
        ..header(project("p"), "short.bin")
    };
    push(&mut client, short, &data).await.unwrap();
    let (location, _) = s3.blob_row(&sha).await;
    let location = location.unwrap();

    s3.server.clock.advance_seconds(11 + 60 + 1);
    let report = s3.server.app.sweeper.sweep_once().await.unwrap();
    assert_eq!(report.collected_blobs, 1);
    assert_eq!(report.collected_bytes, data.len() as u64);
    assert_eq!(s3.objects().await, [], "the object at its location is gone");
    assert!(s3.blob_row(&sha).await.1, "collected");

    // Pushed again, the content is stored again at a new location and reads back.
    push(&mut client, header(project("p"), "again.bin"), &data)
        .await
        .unwrap();
    let (again, collected) = s3.blob_row(&sha).await;
    let again = again.unwrap();
    assert!(!collected);
    assert_ne!(again, location);
    assert_eq!(s3.objects().await, [(again, data.len() as u64)]);
    let pulled = pull(&mut client, project("p"), "again.bin", 0, 0)
        .await
        .unwrap();
    assert!(pulled.data == data);
    s3.server.stop().await;
}

async fn pushed_objects_no_blob_names_are_removed(backend: Backend) {
    // Object ages are the S3 server's modification times against the wall clock, so this
    // test waits out a two-second upload age.
    let Some(s3) = S3Server::start(backend, |config| {
        config.stream_idle_timeout = Duration::from_secs(1);
        config.upload_max_age = Duration::from_secs(2);
        config.blob_grace = Duration::from_secs(3600);
    })
    .await
    else {
        return;
    };
    let data = content(100_000, 6);
    let mut client = s3.server.client().await;
    push(&mut client, header(project("p"), "kept.bin"), &data)
        .await
        .unwrap();
    // What a push that died between completing its upload and naming it leaves behind.
    s3.put("blobs/pushed/died-before-its-claim", b"abandoned")
        .await;
    let before = s3.objects().await;
    assert_eq!(before.len(), 2);

    tokio::time::sleep(Duration::from_millis(2500)).await;
    let report = s3.server.app.sweeper.sweep_once().await.unwrap();
    assert_eq!(report.removed_uploads, 1);
    let (location, _) = s3.blob_row(&sha256_hex(&data)).await;
    assert_eq!(
        s3.objects().await,
        [(location.unwrap(), data.len() as u64)],
        "the named object stays, however old"
    );
    let pulled = pull(&mut client, project("p"), "kept.bin", 0, 0)
        .await
        .unwrap();
    assert!(pulled.data == data);
    s3.server.stop().await;
}

async fn a_missing_object_is_data_loss(backend: Backend) {
    let Some(s3) = S3Server::start(backend, |_| {}).await else {
        return;
    };
    let data = content(150_000, 7);
    let mut client = s3.server.client().await;
    push(&mut client, header(project("p"), "lost.bin"), &data)
        .await
        .unwrap();
    let (location, _) = s3.blob_row(&sha256_hex(&data)).await;
    s3.delete(&location.unwrap()).await;
    for (offset, length) in [(0, 0), (1000, 10)] {
        let Err(err) = pull(&mut client, project("p"), "lost.bin", offset, length).await else {
            panic!("a pull of a missing object succeeded");
        };
        assert_eq!(err.code(), Code::DataLoss, "{err:?}");
        assert!(!err.message().contains("blobs/"), "no key leaks: {err:?}");
    }
    // The same content pushed again replaces the lost object; both artifacts read again.
    let again = push(&mut client, header(project("p"), "again.bin"), &data)
        .await
        .unwrap();
    assert!(
        !again.deduplicated,
        "missing content is not deduplicated against"
    );
    for path in ["lost.bin", "again.bin"] {
        let pulled = pull(&mut client, project("p"), path, 0, 0).await.unwrap();
        assert!(pulled.data == data, "{path}");
    }
    s3.server.stop().await;
}

async fn a_database_from_before_locations_reads_the_same(backend: Backend) {
    use migrations::{Migrator, MigratorTrait};
    if s3_url().is_none() {
        return;
    }
    let Some(db) = TestDb::create(backend).await else {
        return;
    };
    let old = content(120_000, 8);
    let sha = sha256_hex(&old);
    let t0 = common::TEST_EPOCH_SECONDS * 1_000_000;
    {
        let url = match backend {
            Backend::Sqlite => format!("{}?mode=rwc", db.url),
            Backend::Postgres => db.url.clone(),
        };
        let conn = sea_orm::Database::connect(url.as_str()).await.unwrap();
        // The schema before blob locations (migration 11).
        Migrator::up(&conn, Some(10)).await.unwrap();
        for sql in [
            "INSERT INTO projects (project_id, plan_id, alert_thresholds, created_at, updated_at) \
             VALUES ('legacy', 'free', '', 0, 0)"
                .to_owned(),
            "INSERT INTO project_plans (project_id, valid_from, plan_id, assigned_at) \
             VALUES ('legacy', 0, 'free', 0)"
                .to_owned(),
            format!(
                "INSERT INTO blobs (sha256, size, created_at, content, last_ref_at) \
                 VALUES ('{sha}', {}, {t0}, NULL, {t0})",
                old.len()
            ),
            format!(
                "INSERT INTO artifacts (project_id, scope_kind, scope_id, path, size, sha256, \
                 mode, created_at, expires_at, keep, deleted_at, end_reason, upload_id, \
                 billing_end) VALUES ('legacy', 'project', '', 'old.bin', {}, '{sha}', 420, \
                 {t0}, NULL, false, NULL, NULL, 'u1', NULL)",
                old.len()
            ),
        ] {
            conn.execute_unprepared(&sql).await.unwrap();
        }
        let _ = conn.close().await;
    }
    let s3 = S3Server::start_on(db, |_| {}).await.unwrap();
    // Before locations, an object store's blobs were at their content addresses.
    let address = format!("blobs/sha256/{}/{}/{sha}", &sha[..2], &sha[2..4]);
    s3.put(&address, &old).await;
    assert_eq!(
        s3.blob_row(&sha).await,
        (None, false),
        "rows carried as they were"
    );

    let mut client = s3.server.client().await;
    let pulled = pull(&mut client, project("legacy"), "old.bin", 0, 0)
        .await
        .unwrap();
    assert!(pulled.data == old, "read at the content address");
    let part = pull(&mut client, project("legacy"), "old.bin", 100, 50)
        .await
        .unwrap();
    assert_eq!(part.data, &old[100..150]);
    let again = push(&mut client, header(project("legacy"), "again.bin"), &old)
        .await
        .unwrap();
    assert!(again.deduplicated, "the content at its address is reused");
    let objects = s3.settle(|objects| objects.len() == 1).await;
    assert_eq!(objects, [(address, old.len() as u64)]);
    s3.server.stop().await;
}
