//! Wiring: builds the concrete stores from config and serves gRPC and HTTP until told to
//! stop. The server is a function of its config, two bound listeners and a shutdown future,
//! so tests bind port 0 and stop it with a oneshot.
//!
//! Shutdown order: every gRPC service's health goes NOT_SERVING and `/readyz` answers 503;
//! the gRPC listener stops accepting and in-flight requests drain until the drain deadline,
//! while the HTTP side keeps answering probes (503) so a load balancer sees "draining", not
//! "gone"; then the HTTP side stops and the database pool closes.
//!
//! A listener task that ends on its own (an error, or a panic) is not survivable: health
//! goes NOT_SERVING, the other listener stops, and [`serve`] returns an error so the process
//! exits non-zero and its supervisor restarts it, rather than a half-alive server reporting
//! ready.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;

use crate::api::artifacts::ArtifactApi;
use crate::api::billing::BillingApi;
use crate::api::connections::{ConnectionLimit, RefuseOverLimitLayer};
use crate::api::deadline::UnaryDeadlineLayer;
use crate::api::http::Downloads;
use crate::api::jobs::JobApi;
use crate::api::streams::{StallGuardedListener, StreamLimit, WriteStallTimeout};
use crate::api::tokens::TokenApi;
use crate::auth::Authenticator;
use crate::blob::BlobStore;
use crate::config::{AuthMode, Config};
use crate::coord::Counters;
use crate::domain::{Clock, Error};
use crate::metrics::{GrpcMetricsLayer, Metrics};
use crate::pb::v1::artifact_service_server::ArtifactServiceServer;
use crate::pb::v1::job_service_server::JobServiceServer;
use crate::pb::v1::plan_service_server::PlanServiceServer;
use crate::pb::v1::token_service_server::TokenServiceServer;
use crate::pb::v1::usage_control_service_server::UsageControlServiceServer;
use crate::pb::v1::usage_service_server::UsageServiceServer;
use crate::service::tokens::Tokens;
use crate::service::{Accounts, ArtifactService, Jobs, Metering, Scrubber, Sweeper};
use crate::store::Store;

/// Largest gRPC message accepted or sent: a 1 MiB chunk plus framing, well under tonic's
/// 4 MiB default, which we keep.
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Largest HTTP/2 DATA frame the server accepts (SETTINGS_MAX_FRAME_SIZE): any chunk message
/// (up to 1 MiB) fits one frame whole. At h2's default of 16 KiB a 256 KiB chunk was 17
/// frames, and framing them cost as much CPU as the bytes: a bare tonic stream's server spent
/// 0.89–0.97 CPU-s per GiB at 16 KiB against 0.41–0.58 at 256 KiB–1 MiB frames, and a Pull
/// 1.36–1.46 against 0.89–1.00 (`artifactd-bench throughput`, 2026-11-28, README). The frame
/// size did not move memory: flow-control windows stay hyper's (1 MiB per stream), and 64
/// concurrent 256 MiB pushes peaked at 141–195 MiB of RSS with 16 KiB, 320 KiB and 1 MiB
/// frames alike.
pub const HTTP2_MAX_FRAME_BYTES: u32 = 1024 * 1024;
/// The frame size the `artifact` CLI and the bench advertise for what they receive (Pull).
pub const HTTP2_CLIENT_MAX_FRAME_BYTES: u32 = HTTP2_MAX_FRAME_BYTES;
/// Concurrent HTTP/2 streams one client connection may open.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Total size of a request's headers (metadata), including any bearer token.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// How long the HTTP side may take to close its (probe) connections once gRPC has drained.
const HTTP_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// What grpc.health.v1 reports on: the server as a whole (`""`) and every API service.
pub const HEALTH_SERVICES: [&str; 7] = [
    "",
    "artifactd.v1.ArtifactService",
    "artifactd.v1.PlanService",
    "artifactd.v1.UsageService",
    "artifactd.v1.UsageControlService",
    "artifactd.v1.TokenService",
    "artifactd.v1.JobService",
];

/// Everything a running server holds.
#[derive(Debug, Clone)]
pub struct App {
    pub store: Store,
    /// What `/metrics` serves (created with the store, shared by every layer).
    pub metrics: Metrics,
    pub artifacts: ArtifactService,
    pub metering: Metering,
    pub accounts: Accounts,
    pub jobs: Jobs,
    pub sweeper: Sweeper,
    pub scrubber: Scrubber,
    pub auth: Authenticator,
    /// PEM certificate chain and key, when serving TLS.
    tls: Option<(Vec<u8>, Vec<u8>)>,
    clock: Arc<dyn Clock>,
    drain_timeout: Duration,
    stream_idle_timeout: Duration,
    max_streams: usize,
    max_connections: usize,
    request_timeout: Duration,
    grpc_metrics: bool,
}

impl App {
    /// Connects the database (migrating it first if configured) and opens the blob store.
    pub async fn build(config: &Config, clock: Arc<dyn Clock>) -> Result<Self, Error> {
        config.validate()?;
        let auth = authenticator(config)?;
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some((
                read_file("ARTIFACTD_TLS_CERT", cert)?,
                read_file("ARTIFACTD_TLS_KEY", key)?,
            )),
            _ => None,
        };
        if config.migrate_on_start {
            Store::migrate(&config.database_url).await?;
        }
        let store = Store::connect(&config.database_url, config.db_idle_timeout)
            .await?
            .with_group_commits(config.push_group_commits);
        let blobs = BlobStore::open(&config.blob_url, config.blob_fsync)?
            .with_direct_writes(config.blob_direct_writes);
        if store.get_plan(&config.default_plan).await?.is_none() {
            return Err(Error::invalid(
                "ARTIFACTD_DEFAULT_PLAN",
                format!("no plan {:?} exists", config.default_plan),
            ));
        }
        let counters = match &config.redis_url {
            Some(url) => Counters::redis(url, &config.redis_prefix, config.redis_timeout)?,
            None => Counters::in_process(),
        };
        let metering = Metering::new(
            store.clone(),
            counters.clone(),
            clock.clone(),
            config.default_plan.clone(),
            config.metering,
        )
        .with_invoice_grace(config.invoice_grace);
        let accounts = Accounts::new(store.clone(), metering.clone(), clock.clone());
        let jobs = Jobs::new(store.clone(), metering.clone(), clock.clone());
        let clock_for_tokens = clock.clone();
        let sweeper = Sweeper::new(
            store.clone(),
            blobs.clone(),
            metering.clone(),
            counters.clone(),
            clock.clone(),
            config.sweep_settings(),
        );
        let scrubber = Scrubber::new(
            store.clone(),
            blobs.clone(),
            counters,
            config.scrub_settings(),
        );
        let artifacts = ArtifactService::new(
            store.clone(),
            blobs,
            clock,
            metering.clone(),
            config.max_artifact_bytes,
            config.inline_blob_bytes,
        );
        Ok(Self {
            metrics: store.metrics().clone(),
            store,
            artifacts,
            metering,
            accounts,
            jobs,
            sweeper,
            scrubber,
            auth,
            tls,
            clock: clock_for_tokens,
            drain_timeout: config.drain_timeout,
            stream_idle_timeout: config.stream_idle_timeout,
            max_streams: config.max_streams,
            max_connections: config.max_connections,
            request_timeout: config.request_timeout,
            grpc_metrics: config.grpc_metrics,
        })
    }
}

#[derive(Clone)]
struct HttpState {
    ready: Arc<AtomicBool>,
    store: Store,
    metrics: Metrics,
}

impl axum::extract::FromRef<HttpState> for Metrics {
    fn from_ref(state: &HttpState) -> Self {
        state.metrics.clone()
    }
}

/// Serves until `shutdown` resolves, then drains and returns.
pub async fn serve(
    app: App,
    grpc_listener: TcpListener,
    http_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let grpc_addr = local_addr(&grpc_listener)?;
    let http_addr = local_addr(&http_listener)?;
    // gRPC and HTTP stop at different times: HTTP answers /readyz 503 through the drain.
    let stop_grpc = CancellationToken::new();
    let stop_http = CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(true));

    let (health, health_service) = tonic_health::server::health_reporter();
    for service in HEALTH_SERVICES {
        health
            .set_service_status(service, tonic_health::ServingStatus::Serving)
            .await;
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;

    // One bound on open streams for gRPC and HTTP downloads alike.
    let streams = StreamLimit::new(
        app.max_streams,
        app.stream_idle_timeout,
        app.metrics.clone(),
    );
    let artifact_service = ArtifactServiceServer::new(ArtifactApi::new(
        app.artifacts.clone(),
        app.jobs.clone(),
        app.auth.clone(),
        streams.clone(),
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);

    let billing = BillingApi::new(app.accounts.clone(), app.metering.clone(), app.auth.clone());

    let incoming = ConnectionLimit::new(app.max_connections, app.metrics.clone())
        .limit(TcpIncoming::from(grpc_listener).with_nodelay(Some(true)));
    let mut builder = tonic::transport::Server::builder();
    if let Some((cert, key)) = &app.tls {
        install_crypto_provider();
        builder = builder
            .tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(cert, key)),
            )
            .map_err(|e| Error::invalid("ARTIFACTD_TLS_CERT", format!("unusable for gRPC: {e}")))?;
    }
    let grpc = builder
        // Bounded edges: streams per connection, header size, and keepalives that find
        // peers which vanished without closing their connection.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .max_frame_size(Some(HTTP2_MAX_FRAME_BYTES))
        .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Outermost, so calls cut by the deadline are measured too.
        .layer(GrpcMetricsLayer::new(app.metrics.clone(), app.grpc_metrics))
        .layer(RefuseOverLimitLayer)
        .layer(UnaryDeadlineLayer::new(app.request_timeout))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(artifact_service)
        .add_service(PlanServiceServer::new(billing.clone()))
        .add_service(UsageServiceServer::new(billing.clone()))
        .add_service(UsageControlServiceServer::new(billing))
        .add_service(JobServiceServer::new(JobApi::new(
            app.jobs.clone(),
            app.auth.clone(),
        )))
        .add_service(TokenServiceServer::new(TokenApi::new(
            app.auth.clone(),
            Tokens::new(app.auth.clone(), app.clock.clone()),
        )))
        .serve_with_incoming_shutdown(incoming, stop_grpc.clone().cancelled_owned());

    let state = HttpState {
        ready: ready.clone(),
        store: app.store.clone(),
        metrics: app.metrics.clone(),
    };
    let router = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(crate::metrics::serve_metrics))
        .with_state(state.clone())
        .merge(
            Downloads::new(
                app.artifacts.clone(),
                app.jobs.clone(),
                app.auth.clone(),
                streams,
            )
            .router(),
        )
        .merge(
            crate::api::web::Web::new(
                app.metering.clone(),
                app.accounts.clone(),
                app.auth.clone(),
                app.tls.is_some(),
            )
            .router(),
        )
        // Every route, downloads too, counted by its template and status.
        .layer(axum::middleware::from_fn_with_state(
            state,
            crate::metrics::http_middleware,
        ));
    let http: std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> = match &app.tls {
        None => Box::pin(
            axum::serve(
                StallGuardedListener::new(http_listener, app.stream_idle_timeout),
                router,
            )
            .with_graceful_shutdown(stop_http.clone().cancelled_owned())
            .into_future(),
        ),
        Some((cert, key)) => Box::pin(serve_https(
            http_listener,
            router,
            tls_acceptor(cert, key)?,
            app.stream_idle_timeout,
            stop_http.clone(),
        )),
    };

    tracing::info!(%grpc_addr, %http_addr, "artifactd serving");
    // Last month's invoices, frozen on every replica (idempotent), until draining starts.
    tokio::spawn(app.metering.clone().run_finalizer(stop_grpc.clone()));
    // Expired artifacts, unreferenced content, abandoned uploads and old history, one
    // replica at a time; stopped with the gRPC side and awaited before the pool closes.
    let sweeper = tokio::spawn(app.sweeper.clone().run(stop_grpc.clone()));
    // Stored blobs re-hashed at a bounded rate, one replica at a time; awaited likewise.
    let scrubber = tokio::spawn(app.scrubber.clone().run(stop_grpc.clone()));
    // The stored-totals gauges, read from the database every minute, not per request.
    tokio::spawn(app.metrics.clone().refresh_stored(
        app.store.clone(),
        app.clock.clone(),
        stop_grpc.clone(),
    ));
    let listeners = Listeners {
        grpc: tokio::spawn(async move { grpc.await.map_err(|e| e.to_string()) }),
        http: tokio::spawn(async move { http.await.map_err(|e| e.to_string()) }),
        stop_grpc,
        stop_http,
    };
    let outcome = listeners
        .run(shutdown, &health, &ready, app.drain_timeout)
        .await;
    // Egress records and reservation releases of the streams that just ended.
    if !app.metering.drain(app.drain_timeout).await {
        tracing::warn!("drain deadline passed with egress records or releases pending");
    }
    let _ = sweeper.await;
    let _ = scrubber.await;
    app.store.close().await;
    outcome
}

/// The two listener tasks of a running server and how to stop each.
struct Listeners {
    grpc: tokio::task::JoinHandle<Result<(), String>>,
    http: tokio::task::JoinHandle<Result<(), String>>,
    stop_grpc: CancellationToken,
    stop_http: CancellationToken,
}

impl Listeners {
    /// Serves until `shutdown` resolves (then drains: `Ok`) or a listener task ends on its
    /// own (`Err`). Either way health goes NOT_SERVING and `/readyz` 503 first.
    async fn run(
        mut self,
        shutdown: impl Future<Output = ()> + Send,
        health: &tonic_health::server::HealthReporter,
        ready: &AtomicBool,
        drain_timeout: Duration,
    ) -> Result<(), Error> {
        let died = tokio::select! {
            () = shutdown => None,
            ended = &mut self.grpc => Some(("gRPC", unexpected_end(ended))),
            ended = &mut self.http => Some(("HTTP", unexpected_end(ended))),
        };
        ready.store(false, Ordering::SeqCst);
        for service in HEALTH_SERVICES {
            health
                .set_service_status(service, tonic_health::ServingStatus::NotServing)
                .await;
        }
        if let Some((listener, why)) = died {
            tracing::error!(listener, %why, "a listener stopped; shutting down to be restarted");
            self.stop_grpc.cancel();
            self.stop_http.cancel();
            let deadline = tokio::time::Instant::now() + drain_timeout;
            for task in [&mut self.grpc, &mut self.http] {
                if !task.is_finished()
                    && tokio::time::timeout_at(deadline, &mut *task).await.is_err()
                {
                    task.abort();
                }
            }
            return Err(Error::Internal(format!(
                "the {listener} listener stopped unexpectedly: {why}"
            )));
        }

        tracing::info!(?drain_timeout, "shutting down: draining in-flight requests");
        self.stop_grpc.cancel();
        match tokio::time::timeout(drain_timeout, &mut self.grpc).await {
            Ok(ended) => match outcome(ended) {
                Ok(()) => tracing::info!("drained"),
                Err(why) => tracing::warn!(%why, "the gRPC listener stopped with an error"),
            },
            Err(_) => {
                tracing::warn!("drain deadline passed; exiting with requests in flight");
                self.grpc.abort();
            }
        }
        // Only now does the HTTP side stop answering /readyz (503 all through the drain).
        self.stop_http.cancel();
        if tokio::time::timeout(HTTP_CLOSE_GRACE, &mut self.http)
            .await
            .is_err()
        {
            self.http.abort();
        }
        Ok(())
    }
}

/// How a listener task ended.
fn outcome(ended: Result<Result<(), String>, tokio::task::JoinError>) -> Result<(), String> {
    match ended {
        Ok(result) => result,
        Err(e) if e.is_panic() => Err("it panicked".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// Why a listener task ended before shutdown: even a clean end is a failure then.
fn unexpected_end(ended: Result<Result<(), String>, tokio::task::JoinError>) -> String {
    outcome(ended)
        .err()
        .unwrap_or_else(|| "it ended on its own".to_owned())
}

fn read_file(setting: &str, path: &std::path::Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path)
        .map_err(|e| Error::invalid(setting, format!("cannot read {}: {e}", path.display())))
}

/// One TLS implementation for the process (aws-lc-rs), whatever else the tree compiles in.
fn install_crypto_provider() {
    let _ = tokio_rustls::rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn tls_acceptor(cert: &[u8], key: &[u8]) -> Result<tokio_rustls::TlsAcceptor, Error> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let bad = |what: &str, e: &dyn std::fmt::Display| Error::invalid(what, format!("{e}"));
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("ARTIFACTD_TLS_CERT", &e))?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad("ARTIFACTD_TLS_KEY", &e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad("ARTIFACTD_TLS_CERT", &e))?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| bad("ARTIFACTD_TLS_KEY", &e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The HTTP side over TLS: accepts until told to stop; each connection is served on its
/// own task (probes and, later, downloads).
async fn serve_https(
    listener: TcpListener,
    router: axum::Router,
    acceptor: tokio_rustls::TlsAcceptor,
    stall_timeout: Duration,
    stopping: CancellationToken,
) -> std::io::Result<()> {
    loop {
        let tcp = tokio::select! {
            () = stopping.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            // A client that stops reading is dropped, as on plain HTTP.
            let tcp = WriteStallTimeout::new(tcp, stall_timeout);
            let Ok(tls) = acceptor.accept(tcp).await else {
                return; // a failed handshake is the client's problem
            };
            let service = hyper_util::service::TowerToHyperService::new(router);
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
        });
    }
}

/// The token verifier the config asks for.
pub fn authenticator(config: &Config) -> Result<Authenticator, Error> {
    let auth = match config.auth {
        AuthMode::None => Ok(Authenticator::disabled()),
        AuthMode::Jwt => match (&config.jwt_secret, &config.jwt_public_key_file) {
            (Some(secret), _) => Authenticator::shared_secret(secret.expose().as_bytes()),
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|e| {
                    Error::invalid(
                        "ARTIFACTD_JWT_PUBLIC_KEY_FILE",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                Authenticator::public_key(&pem)
            }
            (None, None) => Err(Error::invalid(
                "ARTIFACTD_AUTH",
                "`jwt` needs ARTIFACTD_JWT_SECRET or ARTIFACTD_JWT_PUBLIC_KEY_FILE",
            )),
        },
    }?;
    Ok(auth.with_rules(config.token_rules()))
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if !state.ready.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n"),
    }
}

fn local_addr(listener: &TcpListener) -> Result<SocketAddr, Error> {
    listener
        .local_addr()
        .map_err(|e| Error::Internal(format!("listener has no address: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_server::Health;

    async fn statuses(health: &tonic_health::server::HealthReporter) -> Vec<i32> {
        let service = tonic_health::server::HealthService::from_health_reporter(health.clone());
        let mut statuses = Vec::new();
        for name in HEALTH_SERVICES {
            let request = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
                service: name.into(),
            });
            match service.check(request).await {
                Ok(response) => statuses.push(response.into_inner().status),
                Err(status) => panic!("{name:?}: {status:?}"),
            }
        }
        statuses
    }

    /// A bug in a listener task, as a panic.
    fn buggy_listener() -> Result<(), String> {
        panic!("listener bug")
    }

    /// A listener task that dies (here: the HTTP one fails; then the gRPC one panics) ends
    /// the server with an error, after health went NOT_SERVING and /readyz unready, and
    /// after the other listener was told to stop.
    #[tokio::test]
    async fn a_dead_listener_ends_the_server_with_an_error() {
        for grpc_panics in [false, true] {
            let (health, _) = tonic_health::server::health_reporter();
            for service in HEALTH_SERVICES {
                health
                    .set_service_status(service, tonic_health::ServingStatus::Serving)
                    .await;
            }
            let ready = AtomicBool::new(true);
            let stop_grpc = CancellationToken::new();
            let stop_http = CancellationToken::new();
            let (grpc, http) = if grpc_panics {
                let grpc = tokio::spawn(async { buggy_listener() });
                let stopped = stop_http.clone();
                let http = tokio::spawn(async move {
                    stopped.cancelled().await;
                    Ok(())
                });
                (grpc, http)
            } else {
                let stopped = stop_grpc.clone();
                let grpc = tokio::spawn(async move {
                    stopped.cancelled().await;
                    Ok(())
                });
                let http = tokio::spawn(async { Err("accept: too many open files".to_owned()) });
                (grpc, http)
            };
            let listeners = Listeners {
                grpc,
                http,
                stop_grpc: stop_grpc.clone(),
                stop_http: stop_http.clone(),
            };
            let result = listeners
                .run(
                    std::future::pending::<()>(),
                    &health,
                    &ready,
                    Duration::from_secs(30),
                )
                .await;
            let err = result.expect_err("a dead listener is an error");
            let text = err.to_string();
            let expected = if grpc_panics {
                "the gRPC listener stopped unexpectedly: it panicked"
            } else {
                "the HTTP listener stopped unexpectedly: accept: too many open files"
            };
            assert!(text.contains(expected), "{text}");
            assert!(!ready.load(Ordering::SeqCst));
            assert!(stop_grpc.is_cancelled() && stop_http.is_cancelled());
            assert_eq!(
                statuses(&health).await,
                vec![ServingStatus::NotServing as i32; HEALTH_SERVICES.len()]
            );
        }
    }
}
