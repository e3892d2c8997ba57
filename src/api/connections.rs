//! A global bound on client connections to the gRPC port.
//!
//! Streams are already bounded (`ARTIFACTD_MAX_STREAMS`, 256 per connection), but every open
//! connection costs buffers, a file descriptor and HTTP/2 state whether or not it carries a
//! stream. Up to `max` connections are served as usual. The next ones, up to
//! [`REFUSED_AT_ONCE`] at a time, are still accepted, so their clients learn why: every call
//! on them answers RESOURCE_EXHAUSTED naming the limit, and the connection is closed after
//! [`REFUSED_FOR`]. Past that the server closes new connections as soon as it accepts them
//! (clients see UNAVAILABLE and retry), so a connection flood costs the server nothing that
//! grows with it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::http;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

use crate::metrics::Metrics;

/// Connections beyond the limit that are still answered (with RESOURCE_EXHAUSTED) at once.
pub const REFUSED_AT_ONCE: usize = 64;
/// How long a refused connection stays open to answer its calls.
pub const REFUSED_FOR: Duration = Duration::from_secs(2);

/// Counts the gRPC port's connections against the limit.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    max: usize,
    open: Arc<Semaphore>,
    refused: Arc<Semaphore>,
    metrics: Metrics,
}

impl ConnectionLimit {
    pub fn new(max: usize, metrics: Metrics) -> Self {
        Self {
            max,
            open: Arc::new(Semaphore::new(max)),
            refused: Arc::new(Semaphore::new(REFUSED_AT_ONCE)),
            metrics,
        }
    }

    /// The accepted connections of `incoming`, each holding its place under the limit (or
    /// marked refused); those beyond every bound are closed here.
    pub fn limit<S>(self, incoming: S) -> impl Stream<Item = io::Result<Limited>> + Send
    where
        S: Stream<Item = io::Result<TcpStream>> + Send,
    {
        incoming.filter_map(move |accepted| {
            let admitted = accepted.map(|stream| self.admit(stream)).transpose();
            std::future::ready(admitted)
        })
    }

    fn admit(&self, stream: TcpStream) -> Option<Limited> {
        if let Ok(slot) = self.open.clone().try_acquire_owned() {
            self.metrics.connection_opened();
            return Some(Limited {
                stream,
                place: Place::Admitted {
                    _slot: slot,
                    metrics: self.metrics.clone(),
                },
            });
        }
        self.metrics.connection_refused();
        let Ok(slot) = self.refused.clone().try_acquire_owned() else {
            return None; // dropped: closed at once
        };
        Some(Limited {
            stream,
            place: Place::Refused {
                _slot: slot,
                max: self.max,
                closes: Box::pin(tokio::time::sleep(REFUSED_FOR)),
            },
        })
    }
}

/// An accepted connection and its place under the limit.
pub struct Limited {
    stream: TcpStream,
    place: Place,
}

enum Place {
    Admitted {
        _slot: OwnedSemaphorePermit,
        metrics: Metrics,
    },
    Refused {
        _slot: OwnedSemaphorePermit,
        max: usize,
        closes: Pin<Box<tokio::time::Sleep>>,
    },
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Place::Admitted { metrics, .. } = self {
            metrics.connection_closed();
        }
    }
}

/// What the requests of a connection carry (as a request extension) about it.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub tcp: TcpConnectInfo,
    /// `Some(limit)` when the connection is beyond the limit and its calls are refused.
    pub refused: Option<usize>,
}

impl Connected for Limited {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnectionInfo {
            tcp: self.stream.connect_info(),
            refused: match &self.place {
                Place::Admitted { .. } => None,
                Place::Refused { max, .. } => Some(*max),
            },
        }
    }
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Place::Refused { closes, .. } = &mut self.place
            && closes.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Ok(())); // end of stream: the server closes it
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Answers every call on a refused connection with RESOURCE_EXHAUSTED.
#[derive(Debug, Clone, Copy, Default)]
pub struct RefuseOverLimitLayer;

impl<S> tower_layer::Layer<S> for RefuseOverLimitLayer {
    type Service = RefuseOverLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RefuseOverLimit { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RefuseOverLimit<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for RefuseOverLimit<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let extensions = request.extensions();
        let refused = extensions
            .get::<ConnectionInfo>()
            .or_else(|| {
                extensions
                    .get::<TlsConnectInfo<ConnectionInfo>>()
                    .map(TlsConnectInfo::get_ref)
            })
            .and_then(|info| info.refused);
        match refused {
            Some(max) => Box::pin(std::future::ready(Ok(tonic::Status::resource_exhausted(
                format!(
                    "the server has its maximum of {max} client connections open \
                     (ARTIFACTD_MAX_CONNECTIONS); this connection closes, retry later"
                ),
            )
            .into_http()))),
            None => Box::pin(self.inner.call(request)),
        }
    }
}
