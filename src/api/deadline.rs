//! A deadline for unary calls. Streaming RPCs (Push, Pull, health Watch, reflection) move
//! as much data as they must and are bounded by the stream idle timeout instead; every other
//! call must answer within the deadline or gets DEADLINE_EXCEEDED.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codegen::http;

/// Paths of the streaming methods the deadline does not apply to.
const STREAMING: &[&str] = &[
    "/artifactd.v1.ArtifactService/Push",
    "/artifactd.v1.ArtifactService/Pull",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

#[derive(Debug, Clone, Copy)]
pub struct UnaryDeadlineLayer {
    deadline: Duration,
}

impl UnaryDeadlineLayer {
    pub fn new(deadline: Duration) -> Self {
        Self { deadline }
    }
}

impl<S> tower_layer::Layer<S> for UnaryDeadlineLayer {
    type Service = UnaryDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        UnaryDeadline {
            inner,
            deadline: self.deadline,
        }
    }
}

#[derive(Debug, Clone)]
pub struct UnaryDeadline<S> {
    inner: S,
    deadline: Duration,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for UnaryDeadline<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let streaming = STREAMING.contains(&request.uri().path());
        let call = self.inner.call(request);
        if streaming {
            return Box::pin(call);
        }
        let deadline = self.deadline;
        Box::pin(async move {
            match tokio::time::timeout(deadline, call).await {
                Ok(result) => result,
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "the call took longer than the server's {} deadline",
                    humantime::format_duration(deadline)
                ))
                .into_http()),
            }
        })
    }
}
