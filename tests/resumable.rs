//! Resumable pushes (`PushHeader.upload_id`, `QueryUpload`) on the real server: a TCP proxy
//! the test controls cuts the connection mid-upload, then the upload resumes from the
//! committed offset; the stored artifact is checked byte for byte and its usage counted
//! once. The real binary killed mid-upload and restarted (fsync on). Wrong offsets,
//! changed headers, other scopes' ids, completed uploads, two Pushes on one upload at once,
//! the sweeper collecting an abandoned upload, and a database from before `uploads`.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use artifactd::pb::v1::artifact_service_client::ArtifactServiceClient;
use artifactd::pb::v1::{self as pb, PushHeader, PushRequest};
use common::{Backend, TestServer, content, header, job, pull, sha256_hex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

const MIB: usize = 1024 * 1024;

/// A TCP proxy in front of the server that closes every connection (both sides) once
/// `budget` bytes have gone from clients to the server, or when `cut` is called.
struct Proxy {
    addr: SocketAddr,
    budget: Arc<AtomicI64>,
    stop: CancellationToken,
}

impl Proxy {
    async fn start(target: SocketAddr, budget: i64) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let budget = Arc::new(AtomicI64::new(budget));
        let stop = CancellationToken::new();
        let (accept_budget, accept_stop) = (budget.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    () = accept_stop.cancelled() => return,
                    accepted = listener.accept() => accepted.unwrap(),
                };
                let server = tokio::net::TcpStream::connect(target).await.unwrap();
                let (budget, stop) = (accept_budget.clone(), accept_stop.clone());
                tokio::spawn(async move {
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let upstream = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = client_read.read(&mut buf).await.unwrap_or(0);
                            if n == 0 || budget.fetch_sub(n as i64, Ordering::SeqCst) < n as i64 {
                                return;
                            }
                            if server_write.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let downstream = tokio::io::copy(&mut server_read, &mut client_write);
                    // Whichever ends first (or a cut) drops all four halves: both
                    // connections close at once, as when a network path fails.
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = upstream => {}
                        _ = downstream => {}
                    }
                });
            }
        });
        Self { addr, budget, stop }
    }

    async fn client(&self) -> ArtifactServiceClient<Channel> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        ArtifactServiceClient::new(channel)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn resumable(scope: pb::Scope, path: &str, upload_id: &str, write_offset: i64) -> PushHeader {
    PushHeader {
        upload_id: upload_id.into(),
        write_offset,
        ..header(scope, path)
    }
}

fn messages(header: PushHeader, data: &[u8]) -> Vec<PushRequest> {
    common::push_messages(header, data, 256 * 1024)
}

async fn push_all(
    client: &mut ArtifactServiceClient<Channel>,
    header: PushHeader,
    data: &[u8],
) -> Result<pb::PushResponse, tonic::Status> {
    client
        .push(tokio_stream::iter(messages(header, data)))
        .await
        .map(tonic::Response::into_inner)
}

async fn query(
    client: &mut ArtifactServiceClient<Channel>,
    scope: pb::Scope,
    upload_id: &str,
) -> Result<pb::QueryUploadResponse, tonic::Status> {
    client
        .query_upload(pb::QueryUploadRequest {
            scope: Some(scope),
            upload_id: upload_id.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// What a client does after a cut: ask where the upload stands and send the rest, again
/// while the server is still finishing the cut-off Push (ABORTED: it holds the upload) or
/// has checkpointed more since the answer (FAILED_PRECONDITION naming the offset).
async fn resume(
    client: &mut ArtifactServiceClient<Channel>,
    header: PushHeader,
    data: &[u8],
) -> (i64, pb::PushResponse) {
    let scope = header.scope.clone().unwrap();
    for _ in 0..200 {
        let at = query(client, scope.clone(), &header.upload_id)
            .await
            .unwrap()
            .committed_offset;
        let header = PushHeader {
            write_offset: at,
            ..header.clone()
        };
        match push_all(client, header, &data[at as usize..]).await {
            Ok(response) => return (at, response),
            Err(status) if matches!(status.code(), Code::Aborted | Code::FailedPrecondition) => {
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
            Err(status) => panic!("resume failed: {status:?}"),
        }
    }
    panic!("the upload never became resumable");
}

/// A Push held open through a proxy of its own: its header and `data` are sent, then it
/// waits for more, or for `proxy.stop` to cut its connection.
struct OpenPush {
    sender: tokio::sync::mpsc::Sender<PushRequest>,
    call: tokio::task::JoinHandle<Result<pb::PushResponse, tonic::Status>>,
    proxy: Proxy,
}

impl OpenPush {
    /// Cuts the connection (as a network failure would) and waits for the client to see it.
    async fn cut(self) {
        self.proxy.stop.cancel();
        let cut = self.call.await.unwrap();
        assert!(cut.is_err(), "the push was cut: {cut:?}");
    }
}

async fn open_push(server: &TestServer, header: PushHeader, data: &[u8]) -> OpenPush {
    let proxy = Proxy::start(server.grpc_addr, i64::MAX).await;
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let mut client = proxy.client().await;
    let call = tokio::spawn(async move {
        client
            .push(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
            .map(tonic::Response::into_inner)
    });
    for message in messages(header, data) {
        sender.send(message).await.unwrap();
    }
    OpenPush {
        sender,
        call,
        proxy,
    }
}

/// Waits until the upload exists and the server has committed at least `at_least` bytes.
async fn committed(
    client: &mut ArtifactServiceClient<Channel>,
    scope: pb::Scope,
    upload_id: &str,
    at_least: i64,
) -> i64 {
    loop {
        match query(client, scope.clone(), upload_id).await {
            Ok(status) if status.committed_offset >= at_least => return status.committed_offset,
            Ok(_) => {}
            Err(status) if status.code() == Code::NotFound => {}
            Err(status) => panic!("QueryUpload failed: {status:?}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Waits until the server has written `bytes` bytes of resumable uploads to its blob
/// directory (received, not yet necessarily committed).
async fn wait_written(server: &TestServer, bytes: u64) {
    let dir = server.blob_dir.path().join("resumable");
    loop {
        let written: u64 = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        if written >= bytes {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The committed offset once no Push writes the upload any more: a Push at an impossible
/// offset is ABORTED while the cut-off one still finishes, and refused for its offset (under
/// the upload's lock, so nothing moves after) once it is done.
async fn settled(client: &mut ArtifactServiceClient<Channel>, header: &PushHeader) -> i64 {
    loop {
        let probe = PushHeader {
            write_offset: 1 << 40,
            ..header.clone()
        };
        let e = push_all(client, probe, &[]).await.unwrap_err();
        match e.code() {
            Code::Aborted => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            Code::FailedPrecondition => {
                let scope = header.scope.clone().unwrap();
                return query(client, scope, &header.upload_id)
                    .await
                    .unwrap()
                    .committed_offset;
            }
            _ => panic!("unexpected {e:?}"),
        }
    }
}

async fn usage(server: &TestServer, project: &str) -> pb::Usage {
    let mut c = common::billing::clients(server).await;
    c.usage
        .get_usage(pb::GetUsageRequest {
            project_id: project.into(),
            start: Some(prost_types::Timestamp {
                seconds: common::TEST_EPOCH_SECONDS,
                nanos: 0,
            }),
            end: Some(prost_types::Timestamp {
                seconds: common::TEST_EPOCH_SECONDS + 86_400,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The connection is cut by the proxy mid-upload; the upload resumes from the committed
/// offset on a new connection and stores exactly the file, billed once.
async fn a_cut_upload_resumes_and_is_counted_once(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let data = content(24 * MIB, 7);
    let proxy = Proxy::start(server.grpc_addr, 12 * MIB as i64).await;
    let scope = job("p", "j1");
    let first = resumable(scope.clone(), "big.bin", "0b5e7c2a-6f1d-4e8b", 0);
    let mut cut_client = proxy.client().await;
    let cut = push_all(&mut cut_client, first.clone(), &data).await;
    assert!(cut.is_err(), "the proxy cut the push: {cut:?}");
    assert!(proxy.budget.load(Ordering::SeqCst) < 0);

    let mut client = server.client().await;
    let (resumed_at, response) = resume(&mut client, first, &data).await;
    assert!(
        resumed_at > 0 && (resumed_at as usize) < data.len(),
        "resumed at {resumed_at}"
    );
    let artifact = response.artifact.unwrap();
    assert_eq!(artifact.size, data.len() as i64);
    assert_eq!(artifact.sha256, sha256_hex(&data));
    let pulled = pull(&mut client, scope.clone(), "big.bin", 0, 0)
        .await
        .unwrap();
    assert!(
        pulled.data == data,
        "the stored artifact is the file byte for byte"
    );

    // Each byte once: ingress is the file's size (not the bytes resent after the cut),
    // stored is the file's size.
    let u = usage(&server, "p").await;
    assert_eq!(u.ingress_bytes, data.len() as i64);
    assert_eq!(u.stored_bytes, data.len() as i64);
    assert_eq!(u.live_artifacts, 1);
    // Nothing held: every attempt's reservation ended with it.
    assert_eq!(
        server
            .app
            .metering
            .reserved_bytes(&artifactd::domain::ProjectId::parse("p", "p").unwrap())
            .await
            .unwrap(),
        0
    );
    // The upload's file became the blob.
    assert!(
        server
            .app
            .artifacts
            .blobs()
            .list_resumable()
            .await
            .unwrap()
            .is_empty()
    );

    // QueryUpload and another Push of the same upload answer the artifact.
    let status = query(&mut client, scope.clone(), "0b5e7c2a-6f1d-4e8b")
        .await
        .unwrap();
    assert!(status.complete);
    assert_eq!(status.committed_offset, data.len() as i64);
    assert_eq!(status.artifact.as_ref(), Some(&artifact));
    let again = push_all(
        &mut client,
        resumable(
            scope.clone(),
            "big.bin",
            "0b5e7c2a-6f1d-4e8b",
            data.len() as i64,
        ),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(again.artifact.as_ref(), Some(&artifact));
    let u = usage(&server, "p").await;
    assert_eq!(
        u.ingress_bytes,
        data.len() as i64,
        "a replay records nothing"
    );
    server.stop().await;
}

/// Offsets other than the committed one, a changed header, bad ids and another scope's id
/// are refused with statuses that say what to do.
async fn wrong_offsets_headers_and_ids_are_refused(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut client = server.client().await;
    let scope = job("p", "j1");
    let data = content(3 * MIB, 3);
    let base = PushHeader {
        expected_size: Some(data.len() as i64),
        expected_sha256: sha256_hex(&data),
        ..resumable(scope.clone(), "a.bin", "u-1", 0)
    };
    // Half the file, then the client goes away.
    let open = open_push(&server, base.clone(), &data[..MIB]).await;
    let held = committed(&mut client, scope.clone(), "u-1", 0).await;
    assert_eq!(held, 0, "nothing committed before the first checkpoint");
    wait_written(&server, MIB as u64).await;
    open.cut().await;
    let at = settled(&mut client, &base).await;
    assert_eq!(at, MIB as i64, "every byte that arrived is kept");

    let refused = |r: Result<pb::PushResponse, tonic::Status>| r.unwrap_err();
    // Ahead of or behind the committed offset.
    for offset in [0, at - 1, at + 1] {
        let e = refused(
            push_all(
                &mut client,
                PushHeader {
                    write_offset: offset,
                    ..base.clone()
                },
                &data[offset as usize..],
            )
            .await,
        );
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert_eq!(
            e.message(),
            format!(
                "header.write_offset is {offset}, but upload \"u-1\" has {at} bytes committed: \
                 push again with write_offset {at} and the content from byte {at} on"
            )
        );
    }
    // A header that differs from the first Push's.
    let e = refused(
        push_all(
            &mut client,
            PushHeader {
                path: "b.bin".into(),
                write_offset: at,
                ..base.clone()
            },
            &data[at as usize..],
        )
        .await,
    );
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "header.path: \"b.bin\" differs from the first Push of upload \"u-1\" (\"a.bin\"); a \
         resumed Push repeats the first header (or starts a new upload_id)"
    );
    let e = refused(
        push_all(
            &mut client,
            PushHeader {
                expected_size: None,
                write_offset: at,
                ..base.clone()
            },
            &data[at as usize..],
        )
        .await,
    );
    assert_eq!(
        e.message(),
        format!(
            "header.expected_size: unset differs from the first Push of upload \"u-1\" ({}); a \
             resumed Push repeats the first header (or starts a new upload_id)",
            data.len()
        )
    );
    let e = refused(
        push_all(
            &mut client,
            PushHeader {
                force: true,
                write_offset: at,
                ..base.clone()
            },
            &data[at as usize..],
        )
        .await,
    );
    assert!(
        e.message().starts_with("header.force: true differs"),
        "{e:?}"
    );

    // Another scope's upload id is unknown there, for QueryUpload and Push alike.
    let sibling = job("p", "j2");
    let e = query(&mut client, sibling.clone(), "u-1")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(
        e.message(),
        "no upload \"u-1\" in job j2 of project p (never started, or collected after \
         ARTIFACTD_RESUMABLE_UPLOAD_MAX_AGE without progress)"
    );
    let e = refused(
        push_all(
            &mut client,
            PushHeader {
                scope: Some(sibling.clone()),
                write_offset: at,
                ..base.clone()
            },
            &data[at as usize..],
        )
        .await,
    );
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        e.message()
            .ends_with("; to start it, push with write_offset 0"),
        "{e:?}"
    );
    let e = query(&mut client, job("q", "j1"), "u-1").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Malformed ids and offsets.
    let e = query(&mut client, scope.clone(), "../x").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "upload_id: contains '/'; use only A-Z a-z 0-9 . _ - (a UUID fits)"
    );
    let e = refused(
        push_all(
            &mut client,
            resumable(scope.clone(), "a.bin", &"x".repeat(129), 0),
            b"x",
        )
        .await,
    );
    assert_eq!(e.message(), "header.upload_id: 129 characters; at most 128");
    let e = refused(push_all(&mut client, resumable(scope.clone(), "a.bin", "", 5), b"x").await);
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "header.write_offset: only a resumable push (one with header.upload_id) starts past 0"
    );
    let e = refused(
        push_all(
            &mut client,
            resumable(scope.clone(), "a.bin", "u-2", -1),
            b"x",
        )
        .await,
    );
    assert_eq!(e.message(), "header.write_offset: must not be negative");

    // The right offset finishes it.
    let done = push_all(
        &mut client,
        PushHeader {
            write_offset: at,
            ..base.clone()
        },
        &data[at as usize..],
    )
    .await
    .unwrap();
    assert_eq!(done.artifact.unwrap().sha256, sha256_hex(&data));
    server.stop().await;
}

/// While one Push writes an upload, another resuming it is ABORTED; the first completes,
/// and from then on the upload answers its artifact.
async fn two_pushes_on_one_upload_one_wins(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut client = server.client().await;
    let scope = job("p", "j1");
    let data = content(12 * MIB, 5);
    let base = PushHeader {
        expected_size: Some(data.len() as i64),
        ..resumable(scope.clone(), "race.bin", "race", 0)
    };
    let first_part = 9 * MIB;
    let open = open_push(&server, base.clone(), &data[..first_part]).await;
    // Past the first checkpoint: the first Push is writing and holds the upload.
    let at = committed(&mut client, scope.clone(), "race", 8 * MIB as i64).await;
    let e = push_all(
        &mut client,
        PushHeader {
            write_offset: at,
            ..base.clone()
        },
        &data[at as usize..],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert_eq!(
        e.message(),
        "upload \"race\" is being written by another Push; ask QueryUpload where it stands \
         once that Push ends, then resume from there"
    );
    // The first sends the rest and wins.
    for message in messages(base.clone(), &data[first_part..])
        .into_iter()
        .skip(1)
    {
        open.sender.send(message).await.unwrap();
    }
    drop(open.sender);
    let won = open.call.await.unwrap().unwrap().artifact.unwrap();
    assert_eq!(won.sha256, sha256_hex(&data));
    // The loser, resuming now, gets the winner's artifact, whatever offset it names.
    let late = push_all(
        &mut client,
        PushHeader {
            write_offset: at,
            ..base.clone()
        },
        &data[at as usize..],
    )
    .await
    .unwrap();
    assert_eq!(late.artifact.as_ref(), Some(&won));
    let listed = client
        .list(pb::ListRequest {
            scope: Some(scope.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.artifacts, vec![won]);
    server.stop().await;
}

/// An upload nobody resumes is removed by the sweeper once it is older than
/// ARTIFACTD_RESUMABLE_UPLOAD_MAX_AGE (on the service clock), bytes and record; it bills
/// nothing meanwhile.
async fn the_sweeper_collects_abandoned_uploads(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |config| {
        config.resumable_upload_max_age = std::time::Duration::from_secs(3600);
    })
    .await
    else {
        return;
    };
    let mut client = server.client().await;
    let scope = job("p", "j1");
    let data = content(2 * MIB, 9);
    let base = PushHeader {
        expected_size: Some(data.len() as i64),
        ..resumable(scope.clone(), "left.bin", "left", 0)
    };
    let open = open_push(&server, base.clone(), &data[..MIB]).await;
    wait_written(&server, MIB as u64).await;
    open.cut().await;
    let at = settled(&mut client, &base).await;
    assert_eq!(at, MIB as i64);
    let files = server.app.artifacts.blobs().list_resumable().await.unwrap();
    assert_eq!(files.len(), 1);

    // Not yet old enough.
    server.clock.advance_seconds(3599);
    server.app.sweeper.sweep_once().await.unwrap();
    assert_eq!(
        query(&mut client, scope.clone(), "left")
            .await
            .unwrap()
            .committed_offset,
        at
    );
    server.clock.advance_seconds(2);
    let report = server.app.sweeper.sweep_once().await.unwrap();
    assert_eq!(report.removed_uploads, 1);
    let e = query(&mut client, scope.clone(), "left").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        server
            .app
            .artifacts
            .blobs()
            .list_resumable()
            .await
            .unwrap()
            .is_empty()
    );
    // Resuming it now is refused; starting it again from 0 works.
    let e = push_all(
        &mut client,
        PushHeader {
            write_offset: at,
            ..base.clone()
        },
        &data[at as usize..],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    push_all(&mut client, base.clone(), &data).await.unwrap();
    let u = usage(&server, "p").await;
    assert_eq!(u.ingress_bytes, data.len() as i64);
    server.stop().await;
}

on_both_backends!(
    a_cut_upload_resumes_and_is_counted_once,
    wrong_offsets_headers_and_ids_are_refused,
    two_pushes_on_one_upload_one_wins,
    the_sweeper_collects_abandoned_uploads,
);

/// The real binary (fsync on) is killed (SIGKILL) mid-upload and started again on the same
/// database and blob directory: the upload resumes from its last checkpoint (bytes after it
/// were received but not committed, and are sent again), and the artifact is the file,
/// billed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_upload_resumes_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = common::binary::local_stores(dir.path());
    env.push(("ARTIFACTD_BLOB_FSYNC", "true".to_owned()));
    let server = common::binary::BinaryServer::start(&env).await;
    let mut client = ArtifactServiceClient::new(server.channel().await);
    let scope = job("p", "j1");
    let data = content(24 * MIB + 1, 21);
    let base = PushHeader {
        expected_size: Some(data.len() as i64),
        expected_sha256: sha256_hex(&data),
        ..resumable(scope.clone(), "restart.bin", "restart-1", 0)
    };
    // 20 MiB sent: checkpoints up to at least 16 MiB are durable (one starts every 8 MiB
    // once the one before it is done, so the last may have started later), the rest is
    // received but perhaps not committed.
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let mut pushing = client.clone();
    let call = tokio::spawn(async move {
        pushing
            .push(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
    });
    for message in messages(base.clone(), &data[..20 * MIB]) {
        sender.send(message).await.unwrap();
    }
    let sent = 20 * MIB as i64;
    let two = 2 * artifactd::service::artifacts::CHECKPOINT_BYTES as i64;
    let checkpoint = committed(&mut client, scope.clone(), "restart-1", two).await;
    assert!(
        (two..=sent).contains(&checkpoint),
        "committed {checkpoint} of {sent} bytes sent"
    );
    drop(server); // SIGKILL
    let cut = call.await.unwrap().unwrap_err();
    // The client is still sending when the server dies: tonic reports the broken pipe as
    // UNKNOWN "transport error" (UNAVAILABLE when the reset is read first) — never a reply.
    assert!(
        matches!(
            (cut.code(), cut.message()),
            (Code::Unknown, "transport error") | (Code::Unavailable, _)
        ),
        "a killed server is a transport failure: {cut:?}"
    );
    drop(sender);

    let server = common::binary::BinaryServer::start(&env).await;
    let channel = server.channel().await;
    let mut client = ArtifactServiceClient::new(channel.clone());
    let status = query(&mut client, scope.clone(), "restart-1")
        .await
        .unwrap();
    // A checkpoint in flight at the kill may have landed after the query above.
    assert!(
        (checkpoint..=sent).contains(&status.committed_offset),
        "committed {} after the restart, {checkpoint} before the kill",
        status.committed_offset
    );
    assert!(!status.complete);
    let (at, response) = resume(&mut client, base.clone(), &data).await;
    assert_eq!(at, status.committed_offset);
    let artifact = response.artifact.unwrap();
    assert_eq!(artifact.sha256, sha256_hex(&data));
    assert_eq!(artifact.size, data.len() as i64);
    let pulled = pull(&mut client, scope.clone(), "restart.bin", 0, 0)
        .await
        .unwrap();
    assert!(
        pulled.data == data,
        "the stored artifact is the file byte for byte"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let u = pb::usage_service_client::UsageServiceClient::new(channel)
        .get_usage(pb::GetUsageRequest {
            project_id: "p".into(),
            start: Some(prost_types::Timestamp {
                seconds: now - 3600,
                nanos: 0,
            }),
            end: Some(prost_types::Timestamp {
                seconds: now + 3600,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u.ingress_bytes, data.len() as i64);
    assert_eq!(u.stored_bytes, data.len() as i64);
    assert!(
        !dir.path()
            .join("blobs/resumable")
            .read_dir()
            .unwrap()
            .any(|_| true),
        "the upload's file became the blob"
    );
}

/// A database written under the schema before `uploads` is migrated: its artifacts list and
/// bill the same (storage byte-seconds and ingress from the rows as they were), an old
/// artifact's upload id is no resumable upload, and resumable pushes work on it.
async fn artifacts_recorded_before_the_uploads_table_read_the_same(backend: Backend) {
    use sea_orm::ConnectionTrait;

    let Some(db) = common::TestDb::create(backend).await else {
        return;
    };
    let conn = db
        .connect_migrated_to(common::TestDb::version_before(
            "m20261127_000012_resumable_uploads",
        ))
        .await;
    let t = common::TEST_EPOCH_SECONDS * 1_000_000;
    let half_hour = 1_800_000_000;
    let (live, ended) = (content(3_000, 1), content(500, 2));
    let (live_sha, ended_sha) = (sha256_hex(&live), sha256_hex(&ended));
    for statement in [
        format!(
            "INSERT INTO blobs (sha256, size, created_at, content) VALUES \
             ('{live_sha}', 3000, {t}, {}), ('{ended_sha}', 500, {t}, {})",
            blob_literal(backend, &live),
            blob_literal(backend, &ended)
        ),
        format!(
            "INSERT INTO artifacts (id, project_id, scope_kind, scope_id, path, size, sha256, \
             mode, created_at, expires_at, keep, deleted_at, end_reason, upload_id, billing_end) \
             VALUES (7, 'mig', 'job', 'J1', 'out/app.tar', 3000, '{live_sha}', 420, {t}, NULL, \
             FALSE, NULL, NULL, 'u-7', NULL), \
             (8, 'mig', 'job', 'J1', 'out/old.log', 500, '{ended_sha}', 420, {t}, NULL, \
             FALSE, {end}, 'deleted', 'u-8', {end})",
            end = t + half_hour
        ),
        format!(
            "INSERT INTO usage_events (id, project_id, meter, bytes, occurred_at) VALUES \
             ('push:u-7', 'mig', 'ingress', 3000, {t}), ('push:u-8', 'mig', 'ingress', 500, {t})"
        ),
    ] {
        conn.execute_unprepared(&statement).await.unwrap();
    }
    conn.close().await.unwrap();

    let server = TestServer::start_on(db, |_| {}).await;
    server.clock.advance_seconds(3600);
    let mut client = server.client().await;
    let scope = job("mig", "J1");
    let listed = client
        .list(pb::ListRequest {
            scope: Some(scope.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed
            .artifacts
            .iter()
            .map(|a| a.path.as_str())
            .collect::<Vec<_>>(),
        ["out/app.tar"]
    );
    // An old artifact's upload id names no resumable upload.
    let e = query(&mut client, scope.clone(), "u-7").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Resumable pushes work on the migrated database (the first push records the project).
    let data = content(100_000, 3);
    let done = push_all(
        &mut client,
        resumable(scope.clone(), "new.bin", "n-1", 0),
        &data,
    )
    .await
    .unwrap();
    assert_eq!(done.artifact.unwrap().sha256, sha256_hex(&data));
    let pulled = pull(&mut client, scope.clone(), "out/app.tar", 0, 0)
        .await
        .unwrap();
    assert!(pulled.data == live);
    let u = usage(&server, "mig").await;
    // 3000 bytes for the hour since t, 500 for the half hour they lived; the new artifact
    // was pushed at this instant.
    assert_eq!(u.storage_byte_seconds, "11700000.000000");
    assert_eq!(u.ingress_bytes, 3_500 + 100_000);
    assert_eq!(u.stored_bytes, 3_000 + 100_000);
    assert_eq!(u.live_artifacts, 2);
    server.stop().await;
}

/// A bytes literal for inline blob content in hand-written SQL.
fn blob_literal(backend: Backend, data: &[u8]) -> String {
    let hex = hex::encode(data);
    match backend {
        Backend::Sqlite => format!("X'{hex}'"),
        Backend::Postgres => format!("'\\x{hex}'::bytea"),
    }
}

mod migrated {
    use super::*;
    on_both_backends!(artifacts_recorded_before_the_uploads_table_read_the_same);
}

/// A storage cap of exactly the file's size: the cut-off attempt's reservation is gone by
/// the time a resume may start, so the resume is admitted, and the cap holds afterwards.
async fn a_cut_leaks_no_reservation(backend: Backend) {
    let Some(server) = TestServer::start_metered(backend, |_| {}).await else {
        return;
    };
    let data = content(12 * MIB, 17);
    let mut c = common::billing::clients(&server).await;
    c.controls
        .update_usage_controls(pb::UpdateUsageControlsRequest {
            project_id: "capped".into(),
            controls: Some(pb::UsageControls {
                storage_cap_bytes: Some(data.len() as i64),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["storage_cap_bytes".into()],
            }),
            apply_to_existing: false,
        })
        .await
        .unwrap();
    let scope = job("capped", "j1");
    let first = PushHeader {
        expected_size: Some(data.len() as i64),
        ..resumable(scope.clone(), "capped.bin", "cap-1", 0)
    };
    for _ in 0..3 {
        // Cut three times, each a little further on.
        let at = settled_or_zero(&mut c.artifacts, &first).await;
        let proxy = Proxy::start(server.grpc_addr, 3 * MIB as i64).await;
        let cut = push_all(
            &mut proxy.client().await,
            PushHeader {
                write_offset: at,
                ..first.clone()
            },
            &data[at as usize..],
        )
        .await;
        assert!(cut.is_err(), "cut: {cut:?}");
    }
    let (at, response) = resume(&mut c.artifacts, first.clone(), &data).await;
    assert!(at > 0);
    assert_eq!(response.artifact.unwrap().sha256, sha256_hex(&data));
    let u = usage(&server, "capped").await;
    assert_eq!(u.ingress_bytes, data.len() as i64);
    assert_eq!(u.stored_bytes, data.len() as i64);
    // The cap is full: one more byte is refused.
    let e = push_all(
        &mut c.artifacts,
        PushHeader {
            expected_size: Some(1),
            ..resumable(scope.clone(), "more.bin", "cap-2", 0)
        },
        b"x",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    server.stop().await;
}

/// [`settled`], or 0 before the upload exists.
async fn settled_or_zero(client: &mut ArtifactServiceClient<Channel>, header: &PushHeader) -> i64 {
    let scope = header.scope.clone().unwrap();
    match query(client, scope, &header.upload_id).await {
        Err(e) if e.code() == Code::NotFound => 0,
        _ => settled(client, header).await,
    }
}

mod capped {
    use super::*;
    on_both_backends!(a_cut_leaks_no_reservation);
}
