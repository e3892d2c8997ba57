#![allow(clippy::unwrap_used)]
//! ArtifactService end to end: a real server on 127.0.0.1:0, real gRPC, a real database
//! (SQLite and Postgres) and a real blob directory.

mod common;

use std::collections::BTreeSet;

use artifactd::pb::v1::{self as pb, PushRequest, push_request};
use common::*;
use tonic::Code;

on_both_backends!(
    round_trips_preserve_content_and_mode,
    ranges_are_served_and_checked,
    push_without_force_refuses_and_force_replaces,
    ten_concurrent_pushes_to_one_path_have_one_winner,
    digest_or_size_mismatch_stores_nothing,
    cancelled_push_leaves_nothing_visible,
    identical_content_is_deduplicated,
    small_declared_pushes_live_in_the_database,
    inline_blobs_can_be_turned_off,
    idempotent_retry_returns_the_first_result,
    listing_2500_artifacts_page_by_page_has_no_gaps_or_duplicates,
    recursive_delete_removes_a_folder_only,
    scopes_isolate_artifacts,
    bad_paths_and_ids_are_invalid_arguments,
    malformed_push_streams_are_invalid_arguments,
    size_limits_are_resource_exhausted,
);

const MIB: usize = 1024 * 1024;

async fn round_trips_preserve_content_and_mode(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut client = server.client().await;
    for (i, size) in [0, 1, MIB + 1, 64 * MIB].into_iter().enumerate() {
        let data = content(size, i as u64);
        let path = format!("out/file-{size}.bin");
        let mode = if i % 2 == 0 { 0o755 } else { 0 };
        let mut h = header(job("p1", "j1"), &path);
        h.mode = mode;
        h.expected_size = Some(size as i64);
        h.expected_sha256 = sha256_hex(&data);
        let pushed = push(&mut client, h, &data).await.expect("push");
        let artifact = pushed.artifact.expect("artifact");
        assert_eq!(artifact.size, size as i64);
        assert_eq!(artifact.sha256, sha256_hex(&data));
        assert_eq!(artifact.mode, if mode == 0 { 0o644 } else { 0o755 });
        assert_eq!(artifact.path, path);

        let pulled = pull(&mut client, job("p1", "j1"), &path, 0, 0)
            .await
            .expect("pull");
        assert_eq!(
            pulled.artifact, artifact,
            "Pull metadata equals Push result"
        );
        assert!(
            pulled.data == data,
            "content of {size} bytes differs after a round trip"
        );
        let (last, rest) = pulled.chunk_sizes.split_last().unwrap_or((&0, &[]));
        assert!(
            rest.iter().all(|&c| (64 * 1024..=MIB).contains(&c)) && *last <= MIB,
            "chunks outside 64 KiB–1 MiB: {:?}",
            pulled.chunk_sizes
        );
        assert_eq!(
            stat(&mut client, job("p1", "j1"), &path)
                .await
                .expect("stat"),
            artifact
        );
    }
    // Type bits: a regular file's are dropped (it is the default), a symbolic link's are
    // kept (`artifact push --preserve-symlinks` stores the link's target as the content).
    for (path, mode, stored) in [
        ("typed/regular", 0o100_750, 0o750),
        ("typed/link", 0o120_777, 0o120_777),
    ] {
        let mut h = header(job("p1", "j1"), path);
        h.mode = mode;
        let pushed = push(&mut client, h, b"../target").await.expect("push");
        assert_eq!(pushed.artifact.expect("artifact").mode, stored, "{path}");
        let listed = stat(&mut client, job("p1", "j1"), path)
            .await
            .expect("stat");
        assert_eq!(listed.mode, stored, "{path}");
    }
    assert!(server.leftover_uploads().await.is_empty());
    server.stop().await;
}

async fn ranges_are_served_and_checked(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut client = server.client().await;
    let data = content(3 * MIB + 123, 7);
    push(&mut client, header(job("p", "j"), "big.bin"), &data)
        .await
        .expect("push");

    let cases: [(i64, i64, std::ops::Range<usize>); 6] = [
        (0, 10, 0..10),
        (MIB as i64 - 3, 7, MIB - 3..MIB + 4),
        (100, 0, 100..data.len()),
        (data.len() as i64 - 5, 1000, data.len() - 5..data.len()),
        (data.len() as i64, 0, data.len()..data.len()),
        (2 * MIB as i64, MIB as i64, 2 * MIB..3 * MIB),
    ];
    for (offset, length, expected) in cases {
        let pulled = pull(&mut client, job("p", "j"), "big.bin", offset, length)
            .await
            .unwrap_or_else(|e| panic!("range {offset}+{length}: {e}"));
        assert!(
            pulled.data == data[expected.clone()],
            "range {offset}+{length} wrong"
        );
        assert_eq!(pulled.artifact.size, data.len() as i64);
    }

    let past = pull(
        &mut client,
        job("p", "j"),
        "big.bin",
        data.len() as i64 + 1,
        0,
    )
    .await;
    assert_eq!(past.err().map(|e| e.code()), Some(Code::OutOfRange));
    let negative = pull(&mut client, job("p", "j"), "big.bin", -1, 0)
        .await
        .err()
        .unwrap();
    assert_eq!(negative.code(), Code::InvalidArgument);
    assert!(
        negative.message().starts_with("offset:"),
        "{}",
        negative.message()
    );
    let negative = pull(&mut client, job("p", "j"), "big.bin", 0, -1)
        .await
        .err()
        .unwrap();
    assert!(
        negative.message().starts_with("length:"),
        "{}",
        negative.message()
    );
    let missing = pull(&mut client, job("p", "j"), "nope.bin", 0, 0).await;
    assert_eq!(missing.err().map(|e| e.code()), Some(Code::NotFound));
    server.stop().await;
}

async fn push_without_force_refuses_and_force_replaces(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut client = server.client().await;
    let (first, second) = (content(1000, 1), content(2000, 2));
    push(&mut client, header(job("p", "j"), "a.txt"), &first)
        .await
        .expect("first push");

    let refused = push(&mut client, header(job("p", "j"), "a.txt"), &second)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::AlreadyExists);
    assert!(refused.message().contains("force"), "{}", refused.message());
    let kept = pull(&mut client, job("p", "j"), "a.txt", 0, 0)
        .await
        .unwrap();
    assert!(
        kept.data == first,
        "a refused push must not change the artifact"
    );

    let mut forced = header(job("p", "j"), "a.txt");
    forced.force = true;
    let replaced = push(&mut client, forced, &second)
        .await
        .expect("forced push");
    assert_eq!(replaced.artifact.unwrap().sha256, sha256_hex(&second));
    let now = pull(&mut client, job("p", "j"), "a.txt", 0, 0)
        .await
        .unwrap();
    assert!(now.data == second);
    let listed = list_all(&mut client, job("p", "j"), "", 10).await;
    assert_eq!(
        listed.len(),
        1,
        "the old artifact ended when the new one took its place"
    );
    server.stop().await;
}

async fn ten_concurrent_pushes_to_one_path_have_one_winner(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut tasks = Vec::new();
    for i in 0..10u64 {
        let channel = server.channel().await;
        tasks.push(tokio::spawn(async move {
            let mut client = pb::artifact_service_client::ArtifactServiceClient::new(channel);
            // Half declare a small size (stored in one step), half stream an upload.
            let small = i % 2 == 0;
            let size = if small { 1000 } else { 200_000 } + i as usize;
            let data = content(size, 100 + i);
            let mut h = header(job("p", "race"), "same/path.bin");
            if small {
                h.expected_size = Some(size as i64);
            }
            let result = push(&mut client, h, &data).await;
            (data, result)
        }));
    }
    let mut winners = Vec::new();
    let mut losers = 0;
    for task in tasks {
        let (data, result) = task.await.unwrap();
        match result {
            Ok(_) => winners.push(data),
            Err(status) => {
                assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
                losers += 1;
            }
        }
    }
    assert_eq!((winners.len(), losers), (1, 9));
    let mut client = server.client().await;
    let stored = pull(&mut client, job("p", "race"), "same/path.bin", 0, 0)
        .await
        .unwrap();
    assert!(stored.data == winners[0], "stored content is the winner's");
    server.stop().await;
}

async fn digest_or_size_mismatch_stores_nothing(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    // Large pushes stream through an upload; small declared ones are stored in one step.
    for size in [300_000, 1000] {
        mismatch_stores_nothing(&server, size).await;
    }
    server.stop().await;
}

async fn mismatch_stores_nothing(server: &TestServer, size: usize) {
    let mut client = server.client().await;
    let data = content(size, 3);
    let declared = size as i64;

    let mut wrong_digest = header(job("p", "j"), "d.bin");
    wrong_digest.expected_sha256 = sha256_hex(b"something else");
    let err = push(&mut client, wrong_digest, &data).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("header.expected_sha256:"),
        "{}",
        err.message()
    );

    for expected in [declared - 1, declared + 1] {
        let mut wrong_size = header(job("p", "j"), "d.bin");
        wrong_size.expected_size = Some(expected);
        let err = push(&mut client, wrong_size, &data).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with("header.expected_size:"),
            "{}",
            err.message()
        );
    }

    let mut bad_hex = header(job("p", "j"), "d.bin");
    bad_hex.expected_sha256 = sha256_hex(&data).to_uppercase();
    let err = push(&mut client, bad_hex, &data).await.unwrap_err();
    assert!(
        err.message().starts_with("header.expected_sha256:"),
        "{}",
        err.message()
    );

    assert_eq!(
        stat(&mut client, job("p", "j"), "d.bin")
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert!(server.leftover_uploads().await.is_empty());
    assert_eq!(
        blob_location(server, &data).await,
        (false, false),
        "no blob stored, in the blob store or the database"
    );
}

async fn cancelled_push_leaves_nothing_visible(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut client = server.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel::<PushRequest>(4);
    let call = tokio::spawn(async move {
        client
            .push(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tx.send(PushRequest {
        msg: Some(push_request::Msg::Header(header(
            job("p", "j"),
            "partial.bin",
        ))),
    })
    .await
    .unwrap();
    for i in 0..8 {
        tx.send(PushRequest {
            msg: Some(push_request::Msg::Chunk(content(128 * 1024, i).into())),
        })
        .await
        .unwrap();
    }
    // Wait until the server has started writing the upload, then give up mid-stream.
    for _ in 0..200 {
        if !server.leftover_uploads().await.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    call.abort();
    drop(tx);
    let _ = call.await;

    let mut client = server.client().await;
    let mut gone = false;
    for _ in 0..300 {
        if server.leftover_uploads().await.is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(gone, "the temporary upload of a cancelled push is removed");
    assert_eq!(
        stat(&mut client, job("p", "j"), "partial.bin")
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert!(
        list_all(&mut client, job("p", "j"), "", 10)
            .await
            .is_empty()
    );
    server.stop().await;
}

async fn identical_content_is_deduplicated(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut client = server.client().await;
    let data = content(500_000, 9);
    let first = push(&mut client, header(job("p", "j1"), "a.bin"), &data)
        .await
        .unwrap();
    assert!(!first.deduplicated);
    let second = push(&mut client, header(job("p", "j2"), "b.bin"), &data)
        .await
        .unwrap();
    assert!(second.deduplicated, "same content is stored once");
    assert_eq!(
        first.artifact.unwrap().sha256,
        second.artifact.unwrap().sha256
    );
    for (scope, path) in [(job("p", "j1"), "a.bin"), (job("p", "j2"), "b.bin")] {
        assert!(pull(&mut client, scope, path, 0, 0).await.unwrap().data == data);
    }
    // Deleting one leaves the other readable.
    client
        .delete(pb::DeleteRequest {
            scope: Some(job("p", "j1")),
            path: "a.bin".into(),
            recursive: false,
        })
        .await
        .unwrap();
    assert!(
        pull(&mut client, job("p", "j2"), "b.bin", 0, 0)
            .await
            .unwrap()
            .data
            == data
    );
    assert!(server.leftover_uploads().await.is_empty());
    server.stop().await;
}

fn sha(data: &[u8]) -> artifactd::domain::Sha256 {
    artifactd::domain::Sha256::parse("sha", &sha256_hex(data)).unwrap()
}

/// Where a pushed blob ended up: (in the blob store, in its database row).
async fn blob_location(server: &TestServer, data: &[u8]) -> (bool, bool) {
    let app = &server.app.artifacts;
    let (inline, location) = app.store().blob_source(&sha(data)).await.unwrap();
    let in_store = app
        .blobs()
        .contains(&sha(data), location.as_deref())
        .await
        .unwrap();
    if let Some(inline) = &inline {
        assert!(inline[..] == data[..], "the database row holds the content");
    }
    (in_store, inline.is_some())
}

async fn small_declared_pushes_live_in_the_database(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut client = server.client().await;
    let inline_max = server.config.inline_blob_bytes as usize;
    assert_eq!(inline_max, 16 * 1024, "the documented default");
    // (size, declared, expected location): declared pushes up to the limit go to the
    // database; larger ones, and pushes that do not declare a size, to the blob store.
    let cases = [
        (0, true, (false, true)),
        (100, true, (false, true)),
        (inline_max, true, (false, true)),
        (inline_max + 1, true, (true, false)),
        (200, false, (true, false)),
    ];
    for (i, (size, declared, location)) in cases.into_iter().enumerate() {
        let data = content(size, 100 + i as u64);
        let path = format!("small/{i}.bin");
        let mut h = header(job("p", "j"), &path);
        h.expected_size = declared.then_some(size as i64);
        let pushed = push(&mut client, h, &data).await.expect("push");
        assert!(!pushed.deduplicated, "{size} bytes: new content");
        assert_eq!(pushed.artifact.unwrap().sha256, sha256_hex(&data));
        if size > 0 {
            assert_eq!(
                blob_location(&server, &data).await,
                location,
                "{size} bytes (declared: {declared}): (in blob store, in database)"
            );
        }
        let pulled = pull(&mut client, job("p", "j"), &path, 0, 0).await.unwrap();
        assert!(pulled.data == data, "{size} bytes round trip");
        if size >= 60 {
            let part = pull(&mut client, job("p", "j"), &path, 7, 50)
                .await
                .unwrap();
            assert!(part.data == data[7..57], "{size} bytes: range 7..57");
            let tail = pull(&mut client, job("p", "j"), &path, size as i64 - 3, 0)
                .await
                .unwrap();
            assert!(tail.data == data[size - 3..], "{size} bytes: last 3 bytes");
        }
        match pull(&mut client, job("p", "j"), &path, size as i64 + 1, 0).await {
            Err(past) => assert_eq!(past.code(), Code::OutOfRange),
            Ok(_) => panic!("{size} bytes: an offset past the end is served"),
        }
    }

    // Identical small content is stored once, through every commit path: the common one,
    // an idempotent push and a forced overwrite.
    let data = content(3000, 7);
    let declared = |scope, path: &str| {
        let mut h = header(scope, path);
        h.expected_size = Some(3000);
        h
    };
    let first = push(&mut client, declared(job("p", "a"), "x.txt"), &data)
        .await
        .unwrap();
    assert!(!first.deduplicated);
    let mut keyed = declared(job("p", "b"), "x.txt");
    keyed.idempotency_key = "k1".into();
    let second = push(&mut client, keyed, &data).await.unwrap();
    assert!(second.deduplicated, "same content, idempotency key");
    let mut forced = declared(job("p", "a"), "x.txt");
    forced.force = true;
    let third = push(&mut client, forced, &data).await.unwrap();
    assert!(third.deduplicated, "same content, forced overwrite");
    assert_eq!(blob_location(&server, &data).await, (false, true));

    // New content through the transaction paths is stored in its row too.
    let other = content(2000, 8);
    let mut h = header(job("p", "b"), "y.txt");
    h.expected_size = Some(2000);
    h.idempotency_key = "k2".into();
    assert!(!push(&mut client, h, &other).await.unwrap().deduplicated);
    assert_eq!(blob_location(&server, &other).await, (false, true));

    // Deleting one artifact leaves the other readable from the shared row.
    client
        .delete(pb::DeleteRequest {
            scope: Some(job("p", "a")),
            path: "x.txt".into(),
            recursive: false,
        })
        .await
        .unwrap();
    let pulled = pull(&mut client, job("p", "b"), "x.txt", 0, 0)
        .await
        .unwrap();
    assert!(pulled.data == data);
    assert!(server.leftover_uploads().await.is_empty());
    server.stop().await;
}

async fn inline_blobs_can_be_turned_off(backend: Backend) {
    let Some(server) = TestServer::start_with(backend, |c| c.inline_blob_bytes = 0).await else {
        return;
    };
    let mut client = server.client().await;
    let data = content(100, 1);
    let mut h = header(job("p", "j"), "f.txt");
    h.expected_size = Some(100);
    push(&mut client, h, &data).await.unwrap();
    assert_eq!(blob_location(&server, &data).await, (true, false));
    let pulled = pull(&mut client, job("p", "j"), "f.txt", 0, 0)
        .await
        .unwrap();
    assert!(pulled.data == data);
    server.stop().await;
}

async fn idempotent_retry_returns_the_first_result(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut client = server.client().await;
    let data = content(10_000, 11);
    let mut h = header(job("p", "j"), "once.bin");
    h.idempotency_key = "upload-42".into();
    let first = push(&mut client, h.clone(), &data).await.unwrap();
    server.clock.advance_seconds(60);
    let retried = push(&mut client, h.clone(), &data)
        .await
        .expect("a retry succeeds");
    assert_eq!(retried, first, "a retry returns the first result");
    assert_eq!(list_all(&mut client, job("p", "j"), "", 10).await.len(), 1);

    let mut other = h.clone();
    other.path = "other.bin".into();
    let err = push(&mut client, other, &data).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("header.idempotency_key:"),
        "{}",
        err.message()
    );

    // The same key in another project is a different key.
    let mut elsewhere = h.clone();
    elsewhere.scope = Some(job("q", "j"));
    assert!(
        !push(&mut client, elsewhere, &data)
            .await
            .unwrap()
            .artifact
            .unwrap()
            .path
            .is_empty()
    );
    server.stop().await;
}

async fn listing_2500_artifacts_page_by_page_has_no_gaps_or_duplicates(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let scope = project("many");
    let mut expected = BTreeSet::new();
    let mut paths: Vec<String> = (0..2500)
        .map(|i| format!("dir{}/f{:05}.txt", i % 7, i * 7919 % 10007))
        .collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), 2500);
    let chunks: Vec<Vec<String>> = paths.chunks(157).map(<[String]>::to_vec).collect();
    let mut tasks = Vec::new();
    for batch in chunks {
        let channel = server.channel().await;
        let scope = scope.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = pb::artifact_service_client::ArtifactServiceClient::new(channel);
            for path in batch {
                push(&mut client, header(scope.clone(), &path), path.as_bytes())
                    .await
                    .expect("push");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    expected.extend(paths.iter().cloned());

    // Page through while other writes land before and after the cursor.
    let mut client = server.client().await;
    let mut writer = server.client().await;
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut page_no = 0;
    loop {
        let page = client
            .list(pb::ListRequest {
                scope: Some(scope.clone()),
                prefix: String::new(),
                page_size: 100,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.artifacts.len() <= 100);
        seen.extend(page.artifacts.iter().map(|a| a.path.clone()));
        push(
            &mut writer,
            header(scope.clone(), &format!("aaa/new-{page_no}")),
            b"x",
        )
        .await
        .unwrap();
        push(
            &mut writer,
            header(scope.clone(), &format!("zzz/new-{page_no}")),
            b"x",
        )
        .await
        .unwrap();
        page_no += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let unique: BTreeSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no path is listed twice");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "listed in path order");
    let missing: Vec<_> = expected.difference(&unique).take(5).collect();
    assert!(
        missing.is_empty(),
        "every artifact present throughout is listed: missing {missing:?}"
    );

    // A prefix narrows the listing to a folder.
    let dir3 = list_all(&mut client, scope.clone(), "dir3/", 1000).await;
    assert_eq!(
        dir3.len(),
        paths.iter().filter(|p| p.starts_with("dir3/")).count()
    );
    // A token from another listing is refused.
    let err = client
        .list(pb::ListRequest {
            scope: Some(scope.clone()),
            prefix: "dir1/".into(),
            page_size: 10,
            page_token: artifactd::api::convert::encode_page_token("dir3/x"),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with("page_token:"),
        "{}",
        err.message()
    );
    server.stop().await;
}

async fn recursive_delete_removes_a_folder_only(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut client = server.client().await;
    let scope = workflow("p", "wf1");
    for (path, len) in [
        ("dist/a", 10),
        ("dist/b/c", 20),
        ("dist.txt", 1),
        ("distx/a", 1),
        ("dist-2/a", 1),
    ] {
        push(
            &mut client,
            header(scope.clone(), path),
            &content(len, len as u64),
        )
        .await
        .unwrap();
    }
    let not_a_file = client
        .delete(pb::DeleteRequest {
            scope: Some(scope.clone()),
            path: "dist".into(),
            recursive: false,
        })
        .await
        .unwrap_err();
    assert_eq!(not_a_file.code(), Code::NotFound);
    assert!(
        not_a_file.message().contains("recursive"),
        "{}",
        not_a_file.message()
    );

    let deleted = client
        .delete(pb::DeleteRequest {
            scope: Some(scope.clone()),
            path: "dist/".into(),
            recursive: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((deleted.deleted_count, deleted.deleted_bytes), (2, 30));
    let left: Vec<_> = list_all(&mut client, scope.clone(), "", 100)
        .await
        .into_iter()
        .map(|a| a.path)
        .collect();
    assert_eq!(left, ["dist-2/a", "dist.txt", "distx/a"]);

    let one = client
        .delete(pb::DeleteRequest {
            scope: Some(scope.clone()),
            path: "dist.txt".into(),
            recursive: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((one.deleted_count, one.deleted_bytes), (1, 1));
    let again = client
        .delete(pb::DeleteRequest {
            scope: Some(scope.clone()),
            path: "dist.txt".into(),
            recursive: false,
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    // A deleted path can be pushed again without force.
    push(&mut client, header(scope.clone(), "dist/a"), b"again")
        .await
        .expect("push after delete");
    server.stop().await;
}

async fn scopes_isolate_artifacts(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut client = server.client().await;
    push(
        &mut client,
        header(job("p", "jobA"), "report.xml"),
        b"<ok/>",
    )
    .await
    .unwrap();
    for other in [
        job("p", "jobB"),
        workflow("p", "jobA"),
        project("p"),
        job("q", "jobA"),
    ] {
        let err = stat(&mut client, other.clone(), "report.xml")
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "visible from {other:?}");
        assert!(
            pull(&mut client, other.clone(), "report.xml", 0, 0)
                .await
                .is_err()
        );
        assert!(
            list_all(&mut client, other.clone(), "", 10)
                .await
                .is_empty()
        );
        let err = client
            .delete(pb::DeleteRequest {
                scope: Some(other.clone()),
                path: "report.xml".into(),
                recursive: true,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        // The same path in another scope is a different artifact.
        push(
            &mut client,
            header(other.clone(), "report.xml"),
            b"<other/>",
        )
        .await
        .expect("push elsewhere");
    }
    assert_eq!(
        pull(&mut client, job("p", "jobA"), "report.xml", 0, 0)
            .await
            .unwrap()
            .data,
        b"<ok/>"
    );
    server.stop().await;
}

async fn bad_paths_and_ids_are_invalid_arguments(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut client = server.client().await;
    let long_path = "a/".repeat(512) + "b";
    let long_id = "j".repeat(129);
    let kinds = |kind: pb::ScopeKind, id: &str| pb::Scope {
        project_id: "p".into(),
        kind: kind as i32,
        id: id.into(),
    };
    let cases: Vec<(pb::Scope, String, &str)> = vec![
        (job("p", "j"), "".into(), "path"),
        (job("p", "j"), "/etc/passwd".into(), "path"),
        (job("p", "j"), "../escape".into(), "path"),
        (job("p", "j"), "a/../../b".into(), "path"),
        (job("p", "j"), "a/./b".into(), "path"),
        (job("p", "j"), ".".into(), "path"),
        (job("p", "j"), "a//b".into(), "path"),
        (job("p", "j"), "trailing/".into(), "path"),
        (job("p", "j"), "nul\0byte".into(), "path"),
        (job("p", "j"), "line\nbreak".into(), "path"),
        (job("p", "j"), "tab\there".into(), "path"),
        (job("p", "j"), "back\\slash".into(), "path"),
        (job("p", "j"), long_path, "path"),
        (job("", "j"), "f".into(), "scope.project_id"),
        (job("p q", "j"), "f".into(), "scope.project_id"),
        (job("p/x", "j"), "f".into(), "scope.project_id"),
        (job("p", "j/k"), "f".into(), "scope.id"),
        (job("p", "../j"), "f".into(), "scope.id"),
        (job("p", &long_id), "f".into(), "scope.id"),
        (job("p", "ünï"), "f".into(), "scope.id"),
        (job("p", ""), "f".into(), "scope.id"),
        (workflow("p", ""), "f".into(), "scope.id"),
        (kinds(pb::ScopeKind::Project, "j1"), "f".into(), "scope.id"),
        (
            kinds(pb::ScopeKind::Unspecified, "j1"),
            "f".into(),
            "scope.kind",
        ),
        (
            pb::Scope {
                project_id: "p".into(),
                kind: 42,
                id: "j".into(),
            },
            "f".into(),
            "scope.kind",
        ),
    ];
    assert!(cases.len() >= 20);
    for (scope, path, field) in cases {
        let err = stat(&mut client, scope.clone(), &path).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "Stat {scope:?} {path:?}: {err:?}"
        );
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "Stat {path:?}: {}",
            err.message()
        );

        let err = push(&mut client, header(scope.clone(), &path), b"x")
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "Push {scope:?} {path:?}: {err:?}"
        );
        assert!(
            err.message().starts_with(&format!("header.{field}:")),
            "Push {path:?}: {}",
            err.message()
        );
    }
    let err = client
        .stat(pb::StatRequest {
            scope: None,
            path: "f".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "scope: is required")
    );
    // A mode may carry the type of a regular file or a symbolic link, nothing else.
    let mut folder_mode = header(job("p", "j"), "f");
    folder_mode.mode = 0o040_755;
    let err = push(&mut client, folder_mode, b"x").await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::InvalidArgument,
            "header.mode: file type 0o40000 is neither a regular file (0o100000) nor a symbolic \
             link (0o120000)"
        )
    );
    let mut bad_mode = header(job("p", "j"), "f");
    bad_mode.mode = 0o120_000 | 0o10_000;
    let err = push(&mut client, bad_mode, b"x").await.unwrap_err();
    assert!(
        err.message().starts_with("header.mode:"),
        "{}",
        err.message()
    );
    let err = client
        .list(pb::ListRequest {
            scope: Some(job("p", "j")),
            prefix: "/abs".into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("prefix:"), "{}", err.message());
    let err = client
        .list(pb::ListRequest {
            scope: Some(job("p", "j")),
            prefix: String::new(),
            page_size: -1,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("page_size:"), "{}", err.message());
    server.stop().await;
}

async fn malformed_push_streams_are_invalid_arguments(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut client = server.client().await;
    let head = || PushRequest {
        msg: Some(push_request::Msg::Header(header(job("p", "j"), "s.bin"))),
    };
    let chunk = |n: usize| PushRequest {
        msg: Some(push_request::Msg::Chunk(vec![7u8; n].into())),
    };
    let cases: Vec<(&str, Vec<PushRequest>, &str)> = vec![
        ("no header", vec![], "header: missing"),
        (
            "chunk before header",
            vec![chunk(10), head()],
            "header: missing",
        ),
        (
            "two headers",
            vec![head(), chunk(10), head()],
            "header: sent twice",
        ),
        (
            "empty message",
            vec![head(), PushRequest { msg: None }],
            "msg: empty message",
        ),
        (
            "oversize chunk",
            vec![head(), chunk(2 * MIB)],
            "chunk: 2097152 bytes is larger",
        ),
    ];
    for (what, messages, expected) in cases {
        let err = client.push(tokio_stream::iter(messages)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(
            err.message().starts_with(expected),
            "{what}: {}",
            err.message()
        );
    }
    assert_eq!(
        stat(&mut client, job("p", "j"), "s.bin")
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert!(server.leftover_uploads().await.is_empty());
    server.stop().await;
}

async fn size_limits_are_resource_exhausted(backend: Backend) {
    let Some(server) = TestServer::start_with(backend, |c| c.max_artifact_bytes = 1000).await
    else {
        return;
    };
    let mut client = server.client().await;
    let mut declared = header(job("p", "j"), "big.bin");
    declared.expected_size = Some(1001);
    let err = push(&mut client, declared, &[]).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("1000"),
        "the limit is in the message: {}",
        err.message()
    );

    let err = push(
        &mut client,
        header(job("p", "j"), "big.bin"),
        &content(1001, 1),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    push(
        &mut client,
        header(job("p", "j"), "ok.bin"),
        &content(1000, 1),
    )
    .await
    .expect("at the limit");
    assert!(server.leftover_uploads().await.is_empty());
    server.stop().await;
}

async fn list_all(
    client: &mut pb::artifact_service_client::ArtifactServiceClient<tonic::transport::Channel>,
    scope: pb::Scope,
    prefix: &str,
    page_size: i32,
) -> Vec<pb::Artifact> {
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list(pb::ListRequest {
                scope: Some(scope.clone()),
                prefix: prefix.into(),
                page_size,
                page_token: token,
            })
            .await
            .expect("list")
            .into_inner();
        all.extend(page.artifacts);
        if page.next_page_token.is_empty() {
            return all;
        }
        token = page.next_page_token;
    }
}

/// A push that goes quiet is aborted after the idle timeout and leaves nothing behind,
/// whether it stalls before its header or mid-content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pushes_are_aborted_and_cleaned_up() {
    let server = TestServer::start_with(Backend::Sqlite, |c| {
        c.stream_idle_timeout = std::time::Duration::from_millis(500)
    })
    .await
    .unwrap();
    for send_header in [false, true] {
        let mut client = server.client().await;
        let (tx, rx) = tokio::sync::mpsc::channel::<PushRequest>(4);
        if send_header {
            tx.send(PushRequest {
                msg: Some(push_request::Msg::Header(header(job("p", "j"), "slow.bin"))),
            })
            .await
            .unwrap();
            tx.send(PushRequest {
                msg: Some(push_request::Msg::Chunk(content(100_000, 1).into())),
            })
            .await
            .unwrap();
        }
        // `tx` stays open and silent.
        let err = client
            .push(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
        assert!(
            err.message().contains("no message for 500ms"),
            "{}",
            err.message()
        );
        drop(tx);
    }
    let mut client = server.client().await;
    assert_eq!(
        stat(&mut client, job("p", "j"), "slow.bin")
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    // The upload's writer removes its file as soon as it sees the push end.
    for _ in 0..100 {
        if server.leftover_uploads().await.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(server.leftover_uploads().await.is_empty());
    server.stop().await;
}
