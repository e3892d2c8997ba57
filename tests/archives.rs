#![allow(clippy::unwrap_used)]
//! PullArchive over the real server, SQLite and Postgres: the zip is checked by Python's
//! `zipfile` (every CRC) and by `unzip -t`, every file comes back byte for byte with its
//! mode, only files live at that instant are in it (not expired, deleted or outside the
//! prefix), the latest PASSED job of a ref is archived by name, and egress is the zip's
//! bytes exactly.

mod common;

use std::collections::BTreeMap;

use artifactd::pb::v1::{
    self as pb, artifact_service_client::ArtifactServiceClient,
    job_service_client::JobServiceClient, pull_archive_request,
};
use common::archive::*;
use common::billing::*;
use common::*;
use tonic::Code;
use tonic::transport::Channel;

on_both_backends!(
    a_folder_archive_holds_every_live_file_byte_for_byte,
    the_latest_passed_job_is_archived_by_ref_and_name,
    archives_refuse_what_is_not_there,
);

fn folder(scope: pb::Scope, prefix: &str) -> pull_archive_request::Source {
    pull_archive_request::Source::Folder(pb::ArchiveFolder {
        scope: Some(scope),
        prefix: prefix.into(),
    })
}

async fn push_file(
    client: &mut ArtifactServiceClient<Channel>,
    scope: pb::Scope,
    path: &str,
    data: &[u8],
    mode: u32,
) {
    let mut h = header(scope, path);
    h.mode = mode;
    push(client, h, data).await.unwrap();
}

async fn a_folder_archive_holds_every_live_file_byte_for_byte(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let mut c = clients(&server).await;
    let scope = job("p", "j1");
    let big = content(3 * 1024 * 1024 + 17, 1);
    let files: Vec<(&str, Vec<u8>, u32)> = vec![
        ("dist/app.bin", big.clone(), 0o755),
        ("dist/empty", Vec::new(), 0o644),
        ("dist/lib/small.txt", b"small inline file\n".to_vec(), 0o600),
        ("dist/lib/deep/mid.dat", content(100_000, 2), 0o640),
        ("dist/ünïcode name.txt", b"utf-8 names\n".to_vec(), 0o644),
    ];
    for (path, data, mode) in &files {
        push_file(&mut c.artifacts, scope.clone(), path, data, *mode).await;
    }
    // Not in the archive: outside the prefix, deleted, replaced, expired.
    push_file(&mut c.artifacts, scope.clone(), "distant.txt", b"no", 0o644).await;
    push_file(
        &mut c.artifacts,
        scope.clone(),
        "dist/deleted",
        b"gone",
        0o644,
    )
    .await;
    c.artifacts
        .delete(pb::DeleteRequest {
            scope: Some(scope.clone()),
            path: "dist/deleted".into(),
            recursive: false,
        })
        .await
        .unwrap();
    let mut short = header(scope.clone(), "dist/short-lived");
    short.expire_in = Some(prost_types::Duration {
        seconds: 60,
        nanos: 0,
    });
    push(&mut c.artifacts, short, b"expires").await.unwrap();
    server.clock.advance_seconds(60);

    let expected: BTreeMap<String, (u32, String)> = files
        .iter()
        .map(|(path, data, mode)| (path.to_string(), (0o100_000 | mode, sha256_hex(data))))
        .collect();
    let content_bytes: i64 = files.iter().map(|(_, d, _)| d.len() as i64).sum();
    let mut sent = 0;
    for deflate in [false, true] {
        let got = pull_archive(&mut c.artifacts, folder(scope.clone(), "dist/"), deflate)
            .await
            .unwrap();
        assert_eq!(
            got.info,
            pb::ArchiveInfo {
                scope: Some(scope.clone()),
                prefix: "dist/".into(),
                files: 5,
                content_bytes,
            }
        );
        assert_eq!(unzip(&got.zip), expected, "deflate: {deflate}");
        if deflate {
            // The pseudo-random content does not shrink, but the zip still carries it all.
            assert!(got.zip.len() as i64 > content_bytes);
        } else {
            // Stored: content plus headers only.
            assert!((got.zip.len() as i64) < content_bytes + 5 * 400);
        }
        sent += got.zip.len() as i64;
    }
    // Egress is the zip bytes handed to the client, exactly.
    egress_settles_at(&mut c, "p", sent).await;

    // The whole scope (empty prefix) has the file outside the folder too.
    let whole = pull_archive(&mut c.artifacts, folder(scope.clone(), ""), false)
        .await
        .unwrap();
    let names: Vec<String> = unzip(&whole.zip).into_keys().collect();
    assert_eq!(names.len(), 6);
    assert!(names.contains(&"distant.txt".to_string()));
    server.stop().await;
}

async fn the_latest_passed_job_is_archived_by_ref_and_name(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut c = clients(&server).await;
    let mut jobs = JobServiceClient::new(server.channel().await);
    for (job_id, data) in [("j1", "first"), ("j2", "second")] {
        jobs.register_job(pb::RegisterJobRequest {
            project_id: "p".into(),
            workflow_id: "w".into(),
            job_id: job_id.into(),
            job_name: "build".into(),
            r#ref: "main".into(),
        })
        .await
        .unwrap();
        push_file(
            &mut c.artifacts,
            job("p", job_id),
            "out/result.txt",
            data.as_bytes(),
            0o644,
        )
        .await;
    }
    let latest = || {
        pull_archive_request::Source::LatestJob(pb::LatestJobArtifacts {
            project_id: "p".into(),
            r#ref: "main".into(),
            job_name: "build".into(),
        })
    };
    let none = pull_archive(&mut c.artifacts, latest(), false)
        .await
        .err()
        .unwrap();
    assert_eq!(none.code(), Code::NotFound);
    for (job_id, status) in [("j1", pb::JobStatus::Passed), ("j2", pb::JobStatus::Failed)] {
        server.clock.advance_seconds(1);
        jobs.finish_job(pb::FinishJobRequest {
            project_id: "p".into(),
            job_id: job_id.into(),
            status: status as i32,
        })
        .await
        .unwrap();
    }
    let got = pull_archive(&mut c.artifacts, latest(), false)
        .await
        .unwrap();
    assert_eq!(got.info.scope, Some(job("p", "j1")));
    assert_eq!(
        unzip(&got.zip),
        BTreeMap::from([(
            "out/result.txt".to_string(),
            (0o100_644, sha256_hex(b"first"))
        )])
    );
    server.stop().await;
}

async fn archives_refuse_what_is_not_there(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut c = clients(&server).await;
    push_file(&mut c.artifacts, job("p", "j"), "a/b.txt", b"x", 0o644).await;
    let code = |r: Result<Received, tonic::Status>| r.err().map(|s| s.code());
    assert_eq!(
        code(pull_archive(&mut c.artifacts, folder(job("p", "j"), "nothing/"), false).await),
        Some(Code::NotFound)
    );
    assert_eq!(
        code(pull_archive(&mut c.artifacts, folder(job("p", "other"), ""), false).await),
        Some(Code::NotFound)
    );
    assert_eq!(
        code(pull_archive(&mut c.artifacts, folder(job("p", "j"), "/abs"), false).await),
        Some(Code::InvalidArgument)
    );
    let missing = c
        .artifacts
        .pull_archive(pb::PullArchiveRequest {
            source: None,
            deflate: false,
        })
        .await
        .err()
        .unwrap();
    assert_eq!(missing.code(), Code::InvalidArgument);
    assert_eq!(missing.message(), "source: set folder or latest_job");
    // A prefix that is a file's own path archives that file.
    let one = pull_archive(&mut c.artifacts, folder(job("p", "j"), "a/b.txt"), false)
        .await
        .unwrap();
    assert_eq!(one.info.files, 1);
    server.stop().await;
}
