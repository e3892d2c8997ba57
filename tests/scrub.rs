//! The background scrub, on the real server over SQLite and Postgres with a local blob
//! directory: a blob file with one byte flipped behind the server's back is found by the
//! scrubber's own background walk and quarantined, the corrupt-blob metric moves by exactly
//! one, a Pull of its artifact answers DATA_LOSS (never the wrong bytes), the other blobs are
//! untouched, and a push of the right content restores it; and a walk cut short resumes
//! where it stopped on another replica sharing the blob store.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{
    Backend, TestServer, content, header, job, pull, push, redis_url, sample, sha256_hex,
};
use tokio_util::sync::CancellationToken;
use tonic::Code;

on_both_backends!(
    a_flipped_byte_is_found_quarantined_and_repaired_by_a_push,
    a_walk_cut_short_resumes_where_it_stopped,
);

fn blob_path(server: &TestServer, sha256: &str) -> std::path::PathBuf {
    server.blob_dir.path().join(format!(
        "blobs/sha256/{}/{}/{sha256}",
        &sha256[..2],
        &sha256[2..4]
    ))
}

fn metric(server: &TestServer, name: &str) -> f64 {
    sample(&server.app.metrics.render(), name, &[]).unwrap()
}

/// Pushes `n` distinct stored (not inline) files under job `p/j`, `f0.bin`…; returns them.
async fn push_files(server: &TestServer, n: u64) -> Vec<Vec<u8>> {
    let mut client = server.client().await;
    let mut files = Vec::new();
    for i in 0..n {
        let data = content(50_000 + 30_000 * i as usize, 100 + i);
        push(
            &mut client,
            header(job("p", "j"), &format!("f{i}.bin")),
            &data,
        )
        .await
        .unwrap();
        files.push(data);
    }
    files
}

/// Polls `name` until it reaches `at_least` (the background worker's pace), for at most 60 s.
async fn wait_for(server: &TestServer, name: &str, at_least: f64) {
    for _ in 0..600 {
        if metric(server, name) >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name} never reached {at_least}");
}

async fn a_flipped_byte_is_found_quarantined_and_repaired_by_a_push(backend: Backend) {
    if std::env::var("TEST_BLOB_URL").is_ok() {
        return; // flips a byte in a local file
    }
    // Redis, when there is one, carries the one-scrubber lease.
    let redis = redis_url();
    let Some(server) = TestServer::start_with(backend, |config| {
        config.scrub_bytes_per_second = 64 * 1024 * 1024;
        config.scrub_interval = Duration::from_millis(500);
        if let Some(url) = redis {
            config.redis_url = Some(url);
            config.redis_prefix = format!("test-{}:", uuid::Uuid::new_v4().simple());
        }
    })
    .await
    else {
        return;
    };
    let files = push_files(&server, 3).await;
    let damaged = &files[1];
    let path = blob_path(&server, &sha256_hex(damaged));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[damaged.len() / 2] ^= 0x01;
    // Replaced in one rename, so the scrubber reads either the old file or the new one.
    let flipped = path.with_extension("flipped");
    std::fs::write(&flipped, &bytes).unwrap();
    std::fs::rename(&flipped, &path).unwrap();

    // The background walk finds it (within a pass or two: the first may have gone by
    // before the flip).
    wait_for(&server, "artifactd_scrub_corrupt_blobs_total", 1.0).await;
    assert!(!path.exists(), "the damaged file left its content address");
    let quarantined = server
        .app
        .artifacts
        .blobs()
        .list_quarantined()
        .await
        .unwrap();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert!(quarantined[0].contains(&sha256_hex(damaged)));

    let mut client = server.client().await;
    let Err(status) = pull(&mut client, job("p", "j"), "f1.bin", 0, 0).await else {
        panic!("a pull of the damaged blob succeeded");
    };
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    for i in [0, 2] {
        let pulled = pull(&mut client, job("p", "j"), &format!("f{i}.bin"), 0, 0)
            .await
            .unwrap();
        assert!(pulled.data == files[i], "f{i}.bin is untouched");
    }

    // The right content pushed again (to another path) is stored again, and the damaged
    // artifact pulls whole.
    let repaired = push(&mut client, header(job("p", "j"), "again.bin"), damaged)
        .await
        .unwrap();
    assert!(!repaired.deduplicated, "nothing intact was there to reuse");
    let pulled = pull(&mut client, job("p", "j"), "f1.bin", 0, 0)
        .await
        .unwrap();
    assert!(pulled.data == *damaged);

    // Later passes check everything again and find nothing more: exactly one corrupt blob.
    let passes = metric(&server, "artifactd_scrub_passes_total");
    wait_for(&server, "artifactd_scrub_passes_total", passes + 2.0).await;
    assert_eq!(metric(&server, "artifactd_scrub_corrupt_blobs_total"), 1.0);
    assert!(metric(&server, "artifactd_scrub_blobs_total") >= 6.0);
    assert!(
        metric(&server, "artifactd_scrub_bytes_total")
            >= files.iter().map(Vec::len).sum::<usize>() as f64
    );
    server.stop().await;
}

async fn a_walk_cut_short_resumes_where_it_stopped(backend: Backend) {
    if std::env::var("TEST_BLOB_URL").is_ok() {
        return; // the second replica shares a local directory
    }
    // Background scrubs off: the test drives the walk.
    let Some(first) = TestServer::start_with(backend, |config| {
        config.scrub_bytes_per_second = 0;
    })
    .await
    else {
        return;
    };
    let files = push_files(&first, 3).await;
    let sizes: Vec<u64> = {
        let mut by_digest: Vec<(String, u64)> = files
            .iter()
            .map(|f| (sha256_hex(f), f.len() as u64))
            .collect();
        by_digest.sort();
        by_digest.into_iter().map(|(_, size)| size).collect()
    };
    let stop = CancellationToken::new();
    let step = first.app.scrubber.scrub_step(2, &stop).await.unwrap();
    assert!(step.ran && !step.completed_pass);
    assert_eq!((step.blobs, step.bytes), (2, sizes[0] + sizes[1]));

    // Another replica on the same database and blob directory (as after a restart) goes on
    // from the third blob in digest order, and ends the pass.
    let blob_url = first.config.blob_url.clone();
    let second = TestServer::start_on(first.db.shared(), move |config| {
        config.scrub_bytes_per_second = 0;
        config.blob_url = blob_url;
    })
    .await;
    let step = second.app.scrubber.scrub_step(10, &stop).await.unwrap();
    assert!(step.ran && step.completed_pass);
    assert_eq!((step.blobs, step.bytes, step.corrupt), (1, sizes[2], 0));
    // The next pass starts from the beginning.
    let step = second.app.scrubber.scrub_step(10, &stop).await.unwrap();
    assert_eq!((step.blobs, step.completed_pass), (3, true));
    assert_eq!(
        sample(
            &second.app.metrics.render(),
            "artifactd_scrub_passes_total",
            &[]
        ),
        Some(2.0)
    );
    second.stop().await;
    first.stop().await;
}
