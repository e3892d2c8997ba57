//! Helpers for archive and download tests: pulling a zip over gRPC, reading one with
//! Python's zipfile and `unzip -t`, and waiting for egress records.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use artifactd::pb::v1::{
    self as pb, artifact_service_client::ArtifactServiceClient, pull_archive_request,
    pull_archive_response,
};
use tonic::transport::Channel;

use super::TEST_EPOCH_SECONDS;
use super::billing::Clients;

pub struct Received {
    pub info: pb::ArchiveInfo,
    pub zip: Vec<u8>,
}

pub async fn pull_archive(
    client: &mut ArtifactServiceClient<Channel>,
    source: pull_archive_request::Source,
    deflate: bool,
) -> Result<Received, tonic::Status> {
    let mut stream = client
        .pull_archive(pb::PullArchiveRequest {
            source: Some(source),
            deflate,
        })
        .await?
        .into_inner();
    let first = stream.message().await?.expect("a first message");
    let Some(pull_archive_response::Msg::Info(info)) = first.msg else {
        panic!("the first message must be the ArchiveInfo, got {first:?}");
    };
    let mut zip = Vec::new();
    while let Some(message) = stream.message().await? {
        match message.msg {
            Some(pull_archive_response::Msg::Chunk(chunk)) => zip.extend_from_slice(&chunk),
            other => panic!("expected a chunk, got {other:?}"),
        }
    }
    Ok(Received { info, zip })
}

/// Every entry of a zip as Python's zipfile reads it (after `testzip`, which checks every
/// CRC): name → (mode bits of external_attr, sha256 of the content). Also runs `unzip -t`.
pub fn unzip(zip: &[u8]) -> BTreeMap<String, (u32, String)> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("archive.zip");
    std::fs::write(&file, zip).unwrap();
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import hashlib, sys, zipfile\n\
             z = zipfile.ZipFile(sys.argv[1])\n\
             assert z.testzip() is None\n\
             for i in z.infolist():\n\
             \x20   print(i.filename, i.external_attr >> 16, hashlib.sha256(z.read(i)).hexdigest())\n",
        )
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python zipfile: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unzip = std::process::Command::new("unzip")
        .arg("-t")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        unzip.status.success(),
        "unzip -t: {}{}",
        String::from_utf8_lossy(&unzip.stdout),
        String::from_utf8_lossy(&unzip.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let mut parts = line.rsplitn(3, ' ');
            let sha = parts.next().unwrap().to_owned();
            let mode: u32 = parts.next().unwrap().parse().unwrap();
            (parts.next().unwrap().to_owned(), (mode, sha))
        })
        .collect()
}

/// Egress the project has been billed for, once the stream's records are in.
pub async fn egress_settles_at(c: &mut Clients, project: &str, expected: i64) {
    let mut last = 0;
    for _ in 0..250 {
        last = c
            .usage
            .get_usage(pb::GetUsageRequest {
                project_id: project.into(),
                start: Some(prost_types::Timestamp {
                    seconds: TEST_EPOCH_SECONDS - 86_400,
                    nanos: 0,
                }),
                end: Some(prost_types::Timestamp {
                    seconds: TEST_EPOCH_SECONDS + 400 * 86_400,
                    nanos: 0,
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .egress_bytes;
        if last == expected {
            // And it stays there: nothing is recorded twice.
            tokio::time::sleep(Duration::from_millis(100)).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(last, expected, "egress recorded for {project}");
}
