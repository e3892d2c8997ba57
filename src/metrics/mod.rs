//! Prometheus metrics: the service's own [`Registry`] (served at `GET /metrics`), the
//! families it exports, and the one tower layer that measures every gRPC call.
//!
//! Every family is named `artifactd_…` in base units (`_bytes`, `_seconds`, `_total` for
//! counters). No label carries a project, job, path or token: label values come from fixed
//! sets (the gRPC methods the server defines, status codes, reasons), so a client cannot
//! grow the series without bound. Billing never reads these figures; they are for operators.
//!
//! One [`Metrics`] per server (tests run several in one process and read their own). Three
//! families are process-wide, registered in every registry: build info, and database and
//! Redis errors, which are counted where those errors are classified (free functions that
//! have no server at hand).
//!
//! The gRPC layer ([`GrpcMetricsLayer`], in `grpc.rs`) sees each call as HTTP: the method
//! from the path, the payload bytes from the request and response bodies, and the status
//! code from the `grpc-status` header (trailers-only responses) or trailer. A call ends when its response
//! body ends — for streams, when the last message and the trailers are sent — or when the
//! client goes away first (CANCELLED). It also opens one tracing span per call (service,
//! method, project once authorized, code, duration, bytes) and logs the call's end in it.
//! `http.rs` measures the HTTP side and serves `/metrics`.

mod grpc;
mod http;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use prost::Message;
use tonic::Code;

pub use grpc::{GrpcMetrics, GrpcMetricsLayer, MeteredBody};
pub use http::{http_middleware, serve_metrics};

/// The version `--version` and `artifactd_build_info` report.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit the binary was built from (`build.rs`; `unknown` outside a checkout).
pub const GIT_SHA: &str = env!("ARTIFACTD_GIT_SHA");
/// `--version`: the version and the commit.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("ARTIFACTD_GIT_SHA"),
    ")"
);

/// How often the live stored bytes and artifacts are read from the database.
pub const STORED_REFRESH: Duration = Duration::from_secs(60);

/// Latency buckets, in seconds: unary calls take milliseconds, streams up to minutes.
const RPC_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Sweep duration buckets, in seconds.
const SWEEP_BUCKETS: &[f64] = &[0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0];

/// Label of a gRPC path the server does not define (answered UNIMPLEMENTED).
const OTHER: &str = "other";

/// Why a request was refused with RESOURCE_EXHAUSTED before moving bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Larger than the plan's or the server's per-artifact limit.
    ArtifactSize,
    /// The BLOCK plan's storage limit or the project's storage cap.
    StorageQuota,
    /// The project's monthly spend cap.
    SpendCap,
    /// The BLOCK plan's included egress for the month.
    EgressQuota,
    /// `ARTIFACTD_MAX_STREAMS` streams (gRPC and HTTP downloads) already open.
    StreamLimit,
}

impl Rejection {
    const ALL: [Self; 5] = [
        Self::ArtifactSize,
        Self::StorageQuota,
        Self::SpendCap,
        Self::EgressQuota,
        Self::StreamLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ArtifactSize => "artifact_size",
            Self::StorageQuota => "storage_quota",
            Self::SpendCap => "spend_cap",
            Self::EgressQuota => "egress_quota",
            Self::StreamLimit => "stream_limit",
        }
    }
}

/// Where a committed push's content went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushStorage {
    /// Into its blob's database row (small declared pushes).
    Inline,
    /// Into the blob store.
    BlobStore,
}

/// The metrics of one server. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Families>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

struct Families {
    registry: Registry,
    /// `/pkg.Service/Method` → (service, method), for every method the server defines.
    methods: HashMap<String, (String, String)>,
    grpc_requests: IntCounterVec,
    grpc_duration: HistogramVec,
    grpc_in_flight: IntGaugeVec,
    grpc_received: IntCounterVec,
    grpc_sent: IntCounterVec,
    http_requests: IntCounterVec,
    http_received: IntCounterVec,
    http_sent: IntCounterVec,
    pushes: IntCounterVec,
    push_groups: IntCounterVec,
    push_group_pushes: IntCounter,
    push_group_waiting: IntGauge,
    dedup_hits: IntCounter,
    rejections: IntCounterVec,
    reservations: IntGauge,
    stored_bytes: IntGauge,
    stored_artifacts: IntGauge,
    usage_records: IntCounterVec,
    usage_replays: IntCounterVec,
    invoices: IntCounter,
    data_loss: IntCounter,
    connections_open: IntGauge,
    connections_refused: IntCounter,
    scrub_blobs: IntCounter,
    scrub_bytes: IntCounter,
    scrub_corrupt: IntCounter,
    scrub_passes: IntCounter,
    sweeper_runs: IntCounterVec,
    sweeper_ended: IntCounter,
    sweeper_blobs: IntCounter,
    sweeper_bytes: IntCounter,
    sweeper_duration: Histogram,
    sweeper_last_success: IntGauge,
}

/// Families shared by every registry of the process.
struct ProcessFamilies {
    build_info: IntGaugeVec,
    database_errors: IntCounterVec,
    redis_errors: IntCounterVec,
}

static PROCESS: LazyLock<ProcessFamilies> = LazyLock::new(|| {
    let build_info = IntGaugeVec::new(
        Opts::new(
            "artifactd_build_info",
            "Always 1; labelled with the version and git commit of the running binary.",
        ),
        &["version", "git_sha"],
    )
    .expect("valid metric");
    build_info.with_label_values(&[VERSION, GIT_SHA]).set(1);
    let database_errors = IntCounterVec::new(
        Opts::new(
            "artifactd_database_errors_total",
            "Database errors by kind: unavailable (retryable), conflict (a concurrent change \
             won; the request is ABORTED), bug (INTERNAL).",
        ),
        &["kind"],
    )
    .expect("valid metric");
    for kind in ["unavailable", "conflict", "bug"] {
        database_errors.with_label_values(&[kind]);
    }
    let redis_errors = IntCounterVec::new(
        Opts::new(
            "artifactd_redis_errors_total",
            "Redis errors by kind (connection, timeout, response, other); while Redis fails, \
             calls that need a quota reservation answer UNAVAILABLE.",
        ),
        &["kind"],
    )
    .expect("valid metric");
    for kind in ["connection", "timeout", "response", "other"] {
        redis_errors.with_label_values(&[kind]);
    }
    ProcessFamilies {
        build_info,
        database_errors,
        redis_errors,
    }
});

/// Counts a database error of `kind` (`unavailable`, `conflict` or `bug`).
pub fn database_error(kind: &'static str) {
    PROCESS.database_errors.with_label_values(&[kind]).inc();
}

/// Counts a Redis error.
pub fn redis_error(err: &redis::RedisError) {
    let kind = if err.is_timeout() {
        "timeout"
    } else if err.is_io_error() || err.is_connection_dropped() || err.is_connection_refusal() {
        "connection"
    } else if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) {
        "response"
    } else {
        "other"
    };
    PROCESS.redis_errors.with_label_values(&[kind]).inc();
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let metric = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

impl Metrics {
    /// A fresh registry with every family registered (and label sets known up front at 0,
    /// so rates and alerts see a series before the first event).
    #[allow(clippy::too_many_lines)]
    pub fn new() -> Self {
        let registry = Registry::new();
        for family in [
            Box::new(PROCESS.build_info.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(PROCESS.database_errors.clone()),
            Box::new(PROCESS.redis_errors.clone()),
        ] {
            registry.register(family).expect("unique metric");
        }
        let r = &registry;
        let rpc = &["service", "method"];
        let rpc_code = &["service", "method", "code"];
        let grpc_duration = HistogramVec::new(
            HistogramOpts::new(
                "artifactd_grpc_request_duration_seconds",
                "gRPC call duration, from the request to the end of the response (the last \
                 message of a stream).",
            )
            .buckets(RPC_BUCKETS.to_vec()),
            rpc_code,
        )
        .expect("valid metric");
        r.register(Box::new(grpc_duration.clone()))
            .expect("unique metric");
        let grpc_in_flight = IntGaugeVec::new(
            Opts::new(
                "artifactd_grpc_requests_in_flight",
                "gRPC calls and streams in progress.",
            ),
            rpc,
        )
        .expect("valid metric");
        r.register(Box::new(grpc_in_flight.clone()))
            .expect("unique metric");
        let sweeper_duration = Histogram::with_opts(
            HistogramOpts::new("artifactd_sweeper_duration_seconds", "Duration of sweeps.")
                .buckets(SWEEP_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        r.register(Box::new(sweeper_duration.clone()))
            .expect("unique metric");

        let families = Families {
            methods: known_methods(),
            grpc_requests: counter_vec(
                r,
                "artifactd_grpc_requests_total",
                "gRPC calls finished, by service, method and status code.",
                rpc_code,
            ),
            grpc_duration,
            grpc_in_flight,
            grpc_received: counter_vec(
                r,
                "artifactd_grpc_received_bytes_total",
                "gRPC request payload received: length-prefixed messages, as on the wire \
                 inside HTTP/2 DATA frames.",
                rpc,
            ),
            grpc_sent: counter_vec(
                r,
                "artifactd_grpc_sent_bytes_total",
                "gRPC response payload sent: length-prefixed messages.",
                rpc,
            ),
            http_requests: counter_vec(
                r,
                "artifactd_http_requests_total",
                "HTTP requests answered, by route and status.",
                &["route", "status"],
            ),
            http_received: counter_vec(
                r,
                "artifactd_http_received_bytes_total",
                "HTTP request body bytes received, by route.",
                &["route"],
            ),
            http_sent: counter_vec(
                r,
                "artifactd_http_sent_bytes_total",
                "HTTP response body bytes sent, by route.",
                &["route"],
            ),
            pushes: counter_vec(
                r,
                "artifactd_pushes_total",
                "Pushes committed, by where their content went: inline (the blob's database \
                 row) or blob_store.",
                &["storage"],
            ),
            push_groups: counter_vec(
                r,
                "artifactd_push_group_commits_total",
                "Group commits of small pushes (Postgres, ARTIFACTD_PUSH_GROUP_COMMITS), by \
                 outcome: committed, or failed (rolled back; its pushes then committed alone).",
                &["outcome"],
            ),
            push_group_pushes: counter(
                r,
                "artifactd_push_group_pushes_total",
                "Pushes in the group commits counted by artifactd_push_group_commits_total \
                 (divided by it: the mean group size).",
            ),
            push_group_waiting: gauge(
                r,
                "artifactd_push_group_waiting",
                "Small pushes waiting for a group commit to start (every group slot busy).",
            ),
            dedup_hits: counter(
                r,
                "artifactd_dedup_hits_total",
                "Pushes whose content was already stored (deduplicated; billed all the same).",
            ),
            rejections: counter_vec(
                r,
                "artifactd_quota_rejections_total",
                "Requests refused with RESOURCE_EXHAUSTED by limit: artifact_size, \
                 storage_quota, spend_cap, egress_quota, stream_limit.",
                &["reason"],
            ),
            reservations: gauge(
                r,
                "artifactd_quota_reservations_outstanding",
                "Quota reservations held by pushes and pulls in progress in this process.",
            ),
            stored_bytes: gauge(
                r,
                "artifactd_stored_bytes",
                "Logical bytes of live artifacts (all projects), read from the database \
                 every minute.",
            ),
            stored_artifacts: gauge(
                r,
                "artifactd_stored_artifacts",
                "Live artifacts (all projects), read from the database every minute.",
            ),
            usage_records: counter_vec(
                r,
                "artifactd_usage_records_written_total",
                "Usage records written to the ledger, by meter (ingress, egress).",
                &["meter"],
            ),
            usage_replays: counter_vec(
                r,
                "artifactd_usage_replays_ignored_total",
                "Usage records whose id was already in the ledger (replays), not written again.",
                &["meter"],
            ),
            invoices: counter(
                r,
                "artifactd_invoices_finalized_total",
                "Monthly invoices finalized (frozen) by this process.",
            ),
            data_loss: counter(
                r,
                "artifactd_data_loss_total",
                "Calls that ended DATA_LOSS: stored content missing or damaged. Should stay 0.",
            ),
            connections_open: gauge(
                r,
                "artifactd_grpc_connections_open",
                "Client connections to the gRPC port served now (at most ARTIFACTD_MAX_CONNECTIONS).",
            ),
            connections_refused: counter(
                r,
                "artifactd_grpc_connections_refused_total",
                "Client connections beyond ARTIFACTD_MAX_CONNECTIONS: answered RESOURCE_EXHAUSTED \
                 and closed, or closed at once.",
            ),
            scrub_blobs: counter(
                r,
                "artifactd_scrub_blobs_total",
                "Stored blobs the scrubber re-read and re-hashed (ARTIFACTD_SCRUB_BYTES_PER_SECOND).",
            ),
            scrub_bytes: counter(
                r,
                "artifactd_scrub_bytes_total",
                "Bytes the scrubber re-read from the blob store.",
            ),
            scrub_corrupt: counter(
                r,
                "artifactd_scrub_corrupt_blobs_total",
                "Stored blobs the scrubber found with a wrong size or digest and quarantined; \
                 their artifacts pull DATA_LOSS until the content is pushed again. Should stay 0.",
            ),
            scrub_passes: counter(
                r,
                "artifactd_scrub_passes_total",
                "Passes over every stored blob the scrubber completed.",
            ),
            sweeper_runs: counter_vec(
                r,
                "artifactd_sweeper_runs_total",
                "Sweeps run by this process, by outcome (ok, error).",
                &["outcome"],
            ),
            sweeper_ended: counter(
                r,
                "artifactd_sweeper_ended_artifacts_total",
                "Expired artifacts the sweeper marked ended.",
            ),
            sweeper_blobs: counter(
                r,
                "artifactd_sweeper_collected_blobs_total",
                "Unreferenced blobs the sweeper deleted.",
            ),
            sweeper_bytes: counter(
                r,
                "artifactd_sweeper_collected_bytes_total",
                "Bytes of the unreferenced blobs the sweeper deleted.",
            ),
            sweeper_duration,
            sweeper_last_success: gauge(
                r,
                "artifactd_sweeper_last_success_timestamp_seconds",
                "Unix time of this process's last successful sweep (0: none yet).",
            ),
            registry,
        };
        for reason in Rejection::ALL {
            families.rejections.with_label_values(&[reason.as_str()]);
        }
        for outcome in ["committed", "failed"] {
            families.push_groups.with_label_values(&[outcome]);
        }
        for storage in ["inline", "blob_store"] {
            families.pushes.with_label_values(&[storage]);
        }
        for meter in ["ingress", "egress"] {
            families.usage_records.with_label_values(&[meter]);
            families.usage_replays.with_label_values(&[meter]);
        }
        for outcome in ["ok", "error"] {
            families.sweeper_runs.with_label_values(&[outcome]);
        }
        Self {
            inner: Arc::new(families),
        }
    }

    /// The text exposition of every family.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec fails only on families with invalid names, which `new` rules out.
        let _ = TextEncoder::new().encode(&self.inner.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// A group commit of `pushes` small pushes ended; `committed`: its statement succeeded.
    pub fn push_group(&self, pushes: usize, committed: bool) {
        let outcome = if committed { "committed" } else { "failed" };
        self.inner.push_groups.with_label_values(&[outcome]).inc();
        self.inner.push_group_pushes.inc_by(pushes as u64);
    }

    /// Pushes waiting for a group commit moved by `delta`.
    pub fn push_group_waiting(&self, delta: i64) {
        self.inner.push_group_waiting.add(delta);
    }

    pub fn push_committed(&self, storage: PushStorage, deduplicated: bool) {
        let label = match storage {
            PushStorage::Inline => "inline",
            PushStorage::BlobStore => "blob_store",
        };
        self.inner.pushes.with_label_values(&[label]).inc();
        if deduplicated {
            self.inner.dedup_hits.inc();
        }
    }

    /// Counts `err` as a rejection for `reason` when it is RESOURCE_EXHAUSTED, and passes
    /// it on (for `map_err`).
    pub fn rejected(&self, reason: Rejection, err: crate::domain::Error) -> crate::domain::Error {
        if matches!(err, crate::domain::Error::ResourceExhausted(_)) {
            self.inner
                .rejections
                .with_label_values(&[reason.as_str()])
                .inc();
        }
        err
    }

    /// A quota reservation held from now until the returned guard is dropped.
    pub fn reservation_held(&self) -> HeldReservation {
        self.inner.reservations.inc();
        HeldReservation(self.inner.reservations.clone())
    }

    /// A usage record of `meter` (`ingress`, `egress`) was written, or was a replay.
    pub fn usage_recorded(&self, meter: &str, written: bool) {
        let family = if written {
            &self.inner.usage_records
        } else {
            &self.inner.usage_replays
        };
        family.with_label_values(&[meter]).inc();
    }

    pub fn connection_opened(&self) {
        self.inner.connections_open.inc();
    }

    pub fn connection_closed(&self) {
        self.inner.connections_open.dec();
    }

    pub fn connection_refused(&self) {
        self.inner.connections_refused.inc();
    }

    pub fn invoice_finalized(&self) {
        self.inner.invoices.inc();
    }

    /// The live stored totals, as just read from the database.
    pub fn set_stored(&self, artifacts: i64, bytes: i64) {
        self.inner.stored_artifacts.set(artifacts);
        self.inner.stored_bytes.set(bytes);
    }

    /// The scrubber re-read `bytes` bytes.
    pub fn scrubbed_bytes(&self, bytes: u64) {
        self.inner.scrub_bytes.inc_by(bytes);
    }

    /// The scrubber checked a blob, and found it damaged if `corrupt`.
    pub fn scrubbed_blob(&self, corrupt: bool) {
        self.inner.scrub_blobs.inc();
        if corrupt {
            self.inner.scrub_corrupt.inc();
        }
    }

    /// The scrubber completed a pass over every stored blob.
    pub fn scrub_pass_completed(&self) {
        self.inner.scrub_passes.inc();
    }

    /// The sweeper marked `ended` expired artifacts ended (counted batch by batch, so a
    /// sweep that fails half-way still counts what it did).
    pub fn swept_artifacts(&self, ended: u64) {
        self.inner.sweeper_ended.inc_by(ended);
    }

    /// The sweeper deleted `blobs` unreferenced blobs of `bytes` bytes.
    pub fn swept_blobs(&self, blobs: u64, bytes: u64) {
        self.inner.sweeper_blobs.inc_by(blobs);
        self.inner.sweeper_bytes.inc_by(bytes);
    }

    /// A sweep finished successfully after `duration`.
    pub fn sweep_finished(&self, duration: Duration) {
        let m = &self.inner;
        m.sweeper_runs.with_label_values(&["ok"]).inc();
        m.sweeper_duration.observe(duration.as_secs_f64());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        m.sweeper_last_success
            .set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    /// A sweep failed after `duration`.
    pub fn sweep_failed(&self, duration: Duration) {
        self.inner.sweeper_runs.with_label_values(&["error"]).inc();
        self.inner.sweeper_duration.observe(duration.as_secs_f64());
    }

    /// Reads the live totals from the database now, then every [`STORED_REFRESH`], until
    /// `stop` is cancelled. A failed read keeps the last figures (and is logged).
    pub async fn refresh_stored(
        self,
        store: crate::store::Store,
        clock: Arc<dyn crate::domain::Clock>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut every = tokio::time::interval(STORED_REFRESH);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            match store.live_totals(clock.now()).await {
                Ok((artifacts, bytes)) => self.set_stored(artifacts, bytes),
                Err(e) => tracing::warn!(error = %e, "could not read the stored totals"),
            }
        }
    }

    fn labels(&self, path: &str) -> (&str, &str) {
        self.inner
            .methods
            .get(path)
            .map_or((OTHER, OTHER), |(s, m)| (s.as_str(), m.as_str()))
    }
}

/// Keeps `artifactd_quota_reservations_outstanding` up by one while alive.
pub struct HeldReservation(IntGauge);

impl Drop for HeldReservation {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl std::fmt::Debug for HeldReservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeldReservation")
    }
}

/// Every method the server serves, from the descriptor sets it registers for reflection.
fn known_methods() -> HashMap<String, (String, String)> {
    let mut methods = HashMap::new();
    for encoded in [
        crate::pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ] {
        let Ok(set) = prost_types::FileDescriptorSet::decode(encoded) else {
            continue;
        };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let service_name = format!("{package}.{}", service.name.unwrap_or_default());
                for method in service.method {
                    let method = method.name.unwrap_or_default();
                    methods.insert(
                        format!("/{service_name}/{method}"),
                        (service_name.clone(), method),
                    );
                }
            }
        }
    }
    methods
}

/// The conventional upper-case name of a gRPC status code.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn grpc_status(headers: &tonic::codegen::http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|value| Code::from_bytes(value.as_bytes()))
}
