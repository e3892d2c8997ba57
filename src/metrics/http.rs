//! The HTTP side's measurements (an axum middleware) and the `/metrics` route.

use super::Metrics;
use super::grpc::CountingBody;

/// Axum middleware: counts each HTTP request by its route template (never the raw path)
/// and status, and its body bytes both ways.
pub async fn http_middleware(
    axum::extract::State(metrics): axum::extract::State<Metrics>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let m = &metrics.inner;
    let request = request.map(|body| {
        axum::body::Body::new(CountingBody {
            inner: body,
            counter: m.http_received.with_label_values(&[&route]),
            total: None,
        })
    });
    let response = next.run(request).await;
    m.http_requests
        .with_label_values(&[route.as_str(), response.status().as_str()])
        .inc();
    let sent = m.http_sent.with_label_values(&[&route]);
    response.map(|body| {
        axum::body::Body::new(CountingBody {
            inner: body,
            counter: sent,
            total: None,
        })
    })
}

/// `GET /metrics`: the text exposition format.
pub async fn serve_metrics(
    axum::extract::State(metrics): axum::extract::State<Metrics>,
) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
}
