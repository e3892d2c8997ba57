//! The tower layer around the tonic server that measures every gRPC call in one place:
//! counts and durations by service, method and status code, calls in flight, payload bytes,
//! and one tracing span per call. See the parent module for how a call's end and status are
//! found.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use prometheus::IntCounter;
use tonic::Code;
use tonic::codegen::http;

use super::{Metrics, code_name, grpc_status};

/// Measures every gRPC call: counts, durations, in-flight calls, payload bytes, and a span.
/// Built off (`ARTIFACTD_GRPC_METRICS=false`, for measuring its cost) it passes calls
/// through untouched but for the response body's wrapper.
#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer {
    metrics: Metrics,
    enabled: bool,
}

impl GrpcMetricsLayer {
    pub fn new(metrics: Metrics, enabled: bool) -> Self {
        Self { metrics, enabled }
    }
}

impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            metrics: self.metrics.clone(),
            enabled: self.enabled,
        }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    inner: S,
    metrics: Metrics,
    enabled: bool,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<http::Request<tonic::body::Body>> for GrpcMetrics<S>
where
    S: tower_service::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<MeteredBody<B>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if !self.enabled {
            let future = self.inner.call(request);
            return Box::pin(async move {
                let response = future.await?;
                Ok(response.map(|inner| MeteredBody { inner, call: None }))
            });
        }
        let call = Call::start(&self.metrics, request.uri().path());
        // The request's head is kept; only its body is wrapped to count bytes.
        let (parts, body) = request.into_parts();
        let body = tonic::body::Body::new(CountingBody {
            inner: body,
            counter: call.received_counter(),
            total: Some(call.received.clone()),
        });
        let span = call.span.clone();
        let future = span.in_scope(|| self.inner.call(http::Request::from_parts(parts, body)));
        Box::pin(tracing::Instrument::instrument(
            async move {
                let response = future.await?;
                let trailers_only = grpc_status(response.headers());
                let mut call = call;
                call.code = trailers_only;
                Ok(response.map(|inner| {
                    let mut body = MeteredBody {
                        inner,
                        call: Some(call),
                    };
                    // Trailers-only response (an error before any message): the status is
                    // final now, and the empty body may never be polled.
                    if let Some(code) = trailers_only {
                        body.finish(code);
                    }
                    body
                }))
            },
            span,
        ))
    }
}

/// One gRPC call being measured; recorded once, when it ends or is dropped.
struct Call {
    metrics: Metrics,
    service: String,
    method: String,
    started: Instant,
    span: tracing::Span,
    received: Arc<AtomicU64>,
    sent: u64,
    /// The status from the response headers, when they carry one.
    code: Option<Code>,
    /// Health checks and reflection log at debug level, API calls at info.
    quiet: bool,
}

impl Call {
    fn start(metrics: &Metrics, path: &str) -> Self {
        let (service, method) = metrics.labels(path);
        let quiet = service.starts_with("grpc.");
        metrics
            .inner
            .grpc_in_flight
            .with_label_values(&[service, method])
            .inc();
        let span = tracing::info_span!(
            "rpc",
            service,
            method,
            project = tracing::field::Empty,
            code = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
            received_bytes = tracing::field::Empty,
            sent_bytes = tracing::field::Empty,
        );
        Self {
            metrics: metrics.clone(),
            service: service.to_owned(),
            method: method.to_owned(),
            started: Instant::now(),
            span,
            received: Arc::default(),
            sent: 0,
            code: None,
            quiet,
        }
    }

    fn received_counter(&self) -> IntCounter {
        self.metrics
            .inner
            .grpc_received
            .with_label_values(&[&self.service, &self.method])
    }

    fn sent_counter(&self) -> IntCounter {
        self.metrics
            .inner
            .grpc_sent
            .with_label_values(&[&self.service, &self.method])
    }

    fn finish(self, code: Code) {
        let m = &self.metrics.inner;
        let labels = [self.service.as_str(), self.method.as_str()];
        let elapsed = self.started.elapsed();
        let name = code_name(code);
        m.grpc_in_flight.with_label_values(&labels).dec();
        m.grpc_requests
            .with_label_values(&[labels[0], labels[1], name])
            .inc();
        m.grpc_duration
            .with_label_values(&[labels[0], labels[1], name])
            .observe(elapsed.as_secs_f64());
        if code == Code::DataLoss {
            m.data_loss.inc();
        }
        let received = self.received.load(Ordering::Relaxed);
        let span = &self.span;
        span.record("code", name);
        span.record("duration_ms", elapsed.as_secs_f64() * 1000.0);
        span.record("received_bytes", received);
        span.record("sent_bytes", self.sent);
        span.in_scope(|| {
            if self.quiet {
                tracing::debug!("rpc finished");
            } else {
                tracing::info!("rpc finished");
            }
        });
    }
}

pin_project_lite::pin_project! {
    /// A body that counts the bytes of its data frames.
    pub(crate) struct CountingBody<B> {
        #[pin]
        pub(crate) inner: B,
        pub(crate) counter: IntCounter,
        // Also added here (the call's own total, for its span), when set.
        pub(crate) total: Option<Arc<AtomicU64>>,
    }
}

impl<B> http_body::Body for CountingBody<B>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.counter.inc_by(data.len() as u64);
            if let Some(total) = this.total {
                total.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A gRPC response body that records its call when it ends: at the trailers (which
    /// carry the status), at its end, or when dropped early (the client went away:
    /// CANCELLED).
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }

    impl<B> PinnedDrop for MeteredBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(call) = this.call.take() {
                call.finish(Code::Cancelled);
            }
        }
    }
}

impl<B> MeteredBody<B> {
    fn finish(&mut self, code: Code) {
        if let Some(call) = self.call.take() {
            call.finish(code);
        }
    }
}

impl<B> http_body::Body for MeteredBody<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        let ended = match &polled {
            Poll::Pending => return polled,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Some(call) = this.call.as_mut()
                {
                    call.sent += data.len() as u64;
                    call.sent_counter().inc_by(data.len() as u64);
                }
                frame.trailers_ref().map(grpc_status)
            }
            // The transport failed mid-response.
            Poll::Ready(Some(Err(_))) => Some(Some(Code::Unknown)),
            // Ended without trailers: the status, if any, came with the headers.
            Poll::Ready(None) => Some(None),
        };
        if let Some(code) = ended
            && let Some(call) = this.call.take()
        {
            let code = code.or(call.code).unwrap_or(Code::Unknown);
            call.finish(code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
