#![allow(clippy::unwrap_used)]
//! The server as operators see it: health, readiness, reflection and an orderly shutdown
//! that lets an in-flight push finish.

mod common;

use artifactd::pb::v1::{PushRequest, push_request};
use common::*;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_reflection() {
    let server = TestServer::start(Backend::Sqlite).await.unwrap();
    assert_eq!(
        http_get(server.http_addr, "/healthz").await,
        (200, "ok\n".into())
    );
    assert_eq!(
        http_get(server.http_addr, "/readyz").await,
        (200, "ready\n".into())
    );

    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "artifactd.v1.ArtifactService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["artifactd.v1.ArtifactService", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    assert!(
        !names.iter().any(|n| n.contains("bench")),
        "the bench service is not exposed"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_an_in_flight_push() {
    let mut server = TestServer::start(Backend::Sqlite).await.unwrap();
    let mut client = server.client().await;
    let mut health = HealthClient::new(server.channel().await);
    let (tx, rx) = tokio::sync::mpsc::channel::<PushRequest>(4);
    let call = tokio::spawn(async move {
        client
            .push(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let data = content(3 * 1024 * 1024, 5);
    tx.send(PushRequest {
        msg: Some(push_request::Msg::Header(header(job("p", "j"), "late.bin"))),
    })
    .await
    .unwrap();
    tx.send(PushRequest {
        msg: Some(push_request::Msg::Chunk(
            data[..1024 * 1024].to_vec().into(),
        )),
    })
    .await
    .unwrap();

    // Shut down while the push is in flight: health watchers hear NOT_SERVING, and the
    // push that already started is allowed to finish within the drain deadline.
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "artifactd.v1.ArtifactService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap().status;
    assert_eq!(first, ServingStatus::Serving as i32);
    server.trigger_shutdown();
    let next = watch.message().await.unwrap().unwrap().status;
    assert_eq!(next, ServingStatus::NotServing as i32);
    drop(watch);

    for part in data[1024 * 1024..].chunks(512 * 1024) {
        tx.send(PushRequest {
            msg: Some(push_request::Msg::Chunk(part.to_vec().into())),
        })
        .await
        .unwrap();
    }
    drop(tx);
    let pushed = call
        .await
        .unwrap()
        .expect("the in-flight push completes during the drain");
    assert_eq!(
        pushed.into_inner().artifact.unwrap().size,
        data.len() as i64
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_metadata_is_refused() {
    let server = TestServer::start(Backend::Sqlite).await.unwrap();
    let mut client = server.client().await;
    let mut request = tonic::Request::new(artifactd::pb::v1::StatRequest {
        scope: Some(job("p", "j")),
        path: "f".into(),
    });
    let huge = "x".repeat(32 * 1024);
    request
        .metadata_mut()
        .insert("x-padding", huge.parse().unwrap());
    // h2 answers an over-long header list with HTTP 431 before any gRPC status exists, which
    // tonic reports as UNKNOWN with the HTTP status in its message.
    let refused = client.stat(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unknown, "{refused:?}");
    assert!(
        refused.message().contains("431"),
        "32 KiB of metadata is refused with HTTP 431: {refused:?}"
    );
    // An ordinary request on a fresh connection still works.
    let mut client = server.client().await;
    let err = stat(&mut client, job("p", "j"), "f").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    server.stop().await;
}

/// Unary calls answer within the request deadline or get DEADLINE_EXCEEDED; streaming
/// calls are not cut by it (they have the idle timeout instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_have_a_deadline_and_streams_do_not() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let server = TestServer::start_with(Backend::Sqlite, |c| {
        c.request_timeout = std::time::Duration::from_millis(300)
    })
    .await
    .unwrap();
    let mut client = server.client().await;
    let data = content(300_000, 1);
    push(&mut client, header(job("p", "j"), "f"), &data)
        .await
        .unwrap();

    // Another writer holds the database, so a Delete cannot finish in time.
    let db = sea_orm::Database::connect(server.db.url.as_str())
        .await
        .unwrap();
    let blocker = db.begin().await.unwrap();
    blocker
        .execute_unprepared("UPDATE plans SET updated_at = updated_at")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let err = client
        .delete(artifactd::pb::v1::DeleteRequest {
            scope: Some(job("p", "j")),
            path: "f".into(),
            recursive: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    blocker.rollback().await.unwrap();
    db.close().await.unwrap();

    // A pull read slowly lasts well past the deadline and still completes.
    let mut stream = client
        .pull(artifactd::pb::v1::PullRequest {
            scope: Some(job("p", "j")),
            path: "f".into(),
            offset: 0,
            length: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let started = std::time::Instant::now();
    let mut received = 0;
    while let Some(message) = stream.message().await.unwrap() {
        if let Some(artifactd::pb::v1::pull_response::Msg::Chunk(chunk)) = message.msg {
            received += chunk.len();
            tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        }
    }
    assert_eq!(received, data.len());
    assert!(started.elapsed() > std::time::Duration::from_millis(600));
    server.stop().await;
}

/// With a certificate and key, gRPC and HTTP are served over TLS only. The certificate for
/// localhost / 127.0.0.1 is issued by a throwaway test CA (tests/fixtures, test-only) that
/// the test clients trust.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_http_over_tls() {
    use std::sync::Arc;
    use tokio_rustls::rustls;
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let server = TestServer::start_with(Backend::Sqlite, |c| {
        c.tls_cert = Some(fixtures.join("tls-cert.pem"));
        c.tls_key = Some(fixtures.join("tls-key.pem"));
    })
    .await
    .unwrap();
    let cert = std::fs::read(fixtures.join("ca-cert.pem")).unwrap();

    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&cert))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", server.grpc_addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client =
        artifactd::pb::v1::artifact_service_client::ArtifactServiceClient::new(channel);
    push(&mut client, header(job("p", "j"), "tls.txt"), b"over tls")
        .await
        .unwrap();
    assert_eq!(
        pull(&mut client, job("p", "j"), "tls.txt", 0, 0)
            .await
            .unwrap()
            .data,
        b"over tls"
    );

    // Plaintext gRPC is refused.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        let mut client =
            artifactd::pb::v1::artifact_service_client::ArtifactServiceClient::new(channel);
        // The TLS listener reads the plaintext preface as a bad record and closes. No gRPC
        // status comes back: the client reports its own broken connection, and which code it
        // picks depends on which side notices first — INTERNAL ("h2 protocol error", a GOAWAY
        // seen), UNKNOWN ("transport error", the pipe closed first) or CANCELLED ("operation
        // was canceled", the connection closed before the request went out).
        let refused = stat(&mut client, job("p", "j"), "tls.txt")
            .await
            .unwrap_err();
        let expected = match refused.code() {
            tonic::Code::Internal => "h2 protocol error",
            tonic::Code::Unknown => "transport error",
            tonic::Code::Cancelled => "operation was canceled",
            other => panic!("plaintext to a TLS listener gave {other:?}: {refused:?}"),
        };
        assert!(refused.message().contains(expected), "{refused:?}");
        assert!(
            std::error::Error::source(&refused).is_some_and(|e| e.is::<tonic::transport::Error>()),
            "a client-side transport failure, not a status from the server: {refused:?}"
        );
    }

    // HTTP probes over TLS.
    let mut roots = rustls::RootCertStore::empty();
    for der in rustls_pki_types::CertificateDer::pem_slice_iter(&cert) {
        roots.add(der.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(server.http_addr)
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.starts_with("HTTP/1.0 200") && response.ends_with("ok\n"),
        "{response}"
    );

    // Signing in to the usage pages over TLS: the cookie is Secure, and the form expects
    // an https origin.
    for (origin, expected) in [
        ("https://localhost", "HTTP/1.0 303"),
        ("http://localhost", "HTTP/1.0 403"),
    ] {
        let tcp = tokio::net::TcpStream::connect(server.http_addr)
            .await
            .unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        let body = "token=a.b.c";
        tls.write_all(
            format!(
                "POST /ui/sign-in HTTP/1.0\r\nHost: localhost\r\nOrigin: {origin}\r\n\
                 Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut response = Vec::new();
        let _ = tls.read_to_end(&mut response).await;
        let response = String::from_utf8_lossy(&response).to_lowercase();
        assert!(response.starts_with(&expected.to_lowercase()), "{response}");
        let secure =
            "set-cookie: artifactd_session=a.b.c; httponly; samesite=strict; path=/; secure\r\n";
        assert_eq!(
            response.contains(secure),
            origin.starts_with("https"),
            "{response}"
        );
    }
    server.stop().await;
}

/// The server lets a client send a whole chunk message in one HTTP/2 DATA frame: its SETTINGS
/// carry SETTINGS_MAX_FRAME_SIZE = 1 MiB (at h2's 16 KiB default, framing cost as much CPU as
/// the bytes). Read off the wire with a raw HTTP/2 handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_settings_allow_one_frame_per_chunk() {
    const SETTINGS: u8 = 0x4;
    const ACK: u8 = 0x1;
    const MAX_FRAME_SIZE: u16 = 0x5;
    let server = TestServer::start(Backend::Sqlite).await.unwrap();
    let mut socket = tokio::net::TcpStream::connect(server.grpc_addr)
        .await
        .unwrap();
    // The client preface and an empty SETTINGS frame (9-byte header, no payload).
    socket
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut advertised = None;
    while advertised.is_none() {
        let mut header = [0u8; 9];
        socket.read_exact(&mut header).await.unwrap();
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; len];
        socket.read_exact(&mut payload).await.unwrap();
        if header[3] == SETTINGS && header[4] & ACK == 0 {
            let settings: Vec<(u16, u32)> = payload
                .chunks_exact(6)
                .map(|p| {
                    (
                        u16::from_be_bytes([p[0], p[1]]),
                        u32::from_be_bytes([p[2], p[3], p[4], p[5]]),
                    )
                })
                .collect();
            advertised = Some(
                settings
                    .iter()
                    .find(|(id, _)| *id == MAX_FRAME_SIZE)
                    .map(|(_, value)| *value),
            );
        }
    }
    assert_eq!(
        advertised,
        Some(Some(artifactd::server::HTTP2_MAX_FRAME_BYTES)),
        "the server's SETTINGS frame"
    );
    assert_eq!(artifactd::server::HTTP2_MAX_FRAME_BYTES, 1024 * 1024);
    drop(socket);
    server.stop().await;
}
