//! The bound on open streams and the idle timeouts, shared by gRPC and HTTP.
//!
//! Every stream that moves artifact bytes — Push, Pull and PullArchive over gRPC, file and
//! zip downloads over HTTP — takes one slot of [`StreamLimit`] (`ARTIFACTD_MAX_STREAMS`)
//! for as long as it is open; one more is refused at once with RESOURCE_EXHAUSTED (HTTP 429).
//! A download whose client reads nothing for `ARTIFACTD_STREAM_IDLE_TIMEOUT` is abandoned
//! ([`IdleStream`]: slot and blob reader released), and on the HTTP port a connection whose
//! writes make no progress for as long is closed ([`WriteStallTimeout`]), so a client that
//! sends a request and never reads holds neither a slot nor a connection past the timeout.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::domain::Error;
use crate::metrics::{Metrics, Rejection};

/// The server-wide bound on open streams and their idle timeout (one per server, shared by
/// the gRPC service and the HTTP downloads).
#[derive(Debug, Clone)]
pub struct StreamLimit {
    /// One permit per open stream.
    slots: Arc<Semaphore>,
    max_streams: usize,
    /// A Push that sends nothing, or a download whose client reads nothing, for this long is
    /// given up.
    idle_timeout: Duration,
    metrics: Metrics,
}

impl StreamLimit {
    pub fn new(max_streams: usize, idle_timeout: Duration, metrics: Metrics) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_streams)),
            max_streams,
            idle_timeout,
            metrics,
        }
    }

    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// A slot for one more stream, or RESOURCE_EXHAUSTED when all are taken. Refusing at
    /// once (rather than queueing) keeps a flood of stalled streams from holding up others
    /// and tells well-behaved clients to back off.
    pub fn slot(&self) -> Result<OwnedSemaphorePermit, Error> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            self.metrics.rejected(
                Rejection::StreamLimit,
                Error::ResourceExhausted(format!(
                    "the server has its maximum of {} streams open (Push, Pull, PullArchive \
                     and HTTP downloads; ARTIFACTD_MAX_STREAMS); retry later",
                    self.max_streams
                )),
            )
        })
    }

    /// `stream`, holding `slot` until it ends, and abandoned (slot released, the next poll an
    /// error) once its client has read nothing for the idle timeout.
    pub fn watch<T, E>(
        &self,
        stream: BoxedStream<T, E>,
        slot: OwnedSemaphorePermit,
    ) -> IdleStream<T, E>
    where
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        IdleStream::new(stream, slot, self.idle_timeout)
    }
}

pub type BoxedStream<T, E> = Pin<Box<dyn Stream<Item = Result<T, E>> + Send>>;

/// A response stream that gives up on a client which reads nothing for `timeout`.
///
/// The transport asks for the next message only when the client has made room for it
/// (HTTP/2 flow control; HTTP/1's write buffer, which fills when the socket does), so the
/// time since a message was handed out without the next being asked for is the time the
/// client has not read. Past `timeout` a watchdog abandons the stream: the blob reader (open
/// file, read-ahead) and the stream slot are released at once, and the next time the
/// transport asks, the stream ends with DEADLINE_EXCEEDED. What stays until the client reads
/// again or its connection closes is the one message the transport already holds for it.
pub struct IdleStream<T, E> {
    shared: Arc<Mutex<IdleState<T, E>>>,
    /// Stops the watchdog when the stream ends or is dropped.
    _watchdog: DropGuard,
    timeout: Duration,
}

struct IdleState<T, E> {
    /// `None` once finished or abandoned.
    inner: Option<BoxedStream<T, E>>,
    slot: Option<OwnedSemaphorePermit>,
    /// When the last message was handed out, while the next has not been asked for.
    handed_out: Option<Instant>,
    abandoned: bool,
}

impl<T, E> IdleState<T, E> {
    fn idle_past(&self, timeout: Duration) -> bool {
        self.handed_out
            .is_some_and(|since| since.elapsed() >= timeout)
    }

    fn abandon(&mut self, timeout: Duration) {
        if self.inner.take().is_some() {
            tracing::info!(
                idle = %humantime::format_duration(timeout),
                "stream abandoned: the client read nothing"
            );
        }
        self.slot = None;
        self.handed_out = None;
        self.abandoned = true;
    }
}

fn lock<T, E>(state: &Mutex<IdleState<T, E>>) -> MutexGuard<'_, IdleState<T, E>> {
    // The state stays consistent under a panic elsewhere (every update is one assignment).
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<T: Send + 'static, E: Send + 'static> IdleStream<T, E> {
    fn new(inner: BoxedStream<T, E>, slot: OwnedSemaphorePermit, timeout: Duration) -> Self {
        let shared = Arc::new(Mutex::new(IdleState {
            inner: Some(inner),
            slot: Some(slot),
            handed_out: None,
            abandoned: false,
        }));
        let stop = CancellationToken::new();
        tokio::spawn(watchdog(Arc::downgrade(&shared), timeout, stop.clone()));
        Self {
            shared,
            _watchdog: stop.drop_guard(),
            timeout,
        }
    }
}

/// Abandons the stream once its client has read nothing for `timeout`. Holds only a weak
/// reference, so it never keeps a finished stream alive.
async fn watchdog<T, E>(
    state: Weak<Mutex<IdleState<T, E>>>,
    timeout: Duration,
    stop: CancellationToken,
) {
    loop {
        let deadline = {
            let Some(state) = state.upgrade() else { return };
            let state = lock(&state);
            if state.inner.is_none() {
                return;
            }
            state.handed_out.unwrap_or_else(Instant::now) + timeout
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(deadline) => {}
        }
        let Some(state) = state.upgrade() else { return };
        let mut state = lock(&state);
        if state.idle_past(timeout) {
            state.abandon(timeout);
            return;
        }
    }
}

impl<T, E: From<Error>> Stream for IdleStream<T, E> {
    type Item = Result<T, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let timeout = self.timeout;
        let mut state = lock(&self.shared);
        if state.idle_past(timeout) {
            state.abandon(timeout);
        }
        if state.abandoned {
            state.abandoned = false; // report once, then end
            return Poll::Ready(Some(Err(Error::DeadlineExceeded(format!(
                "the client read nothing for {}; the stream was abandoned",
                humantime::format_duration(timeout)
            ))
            .into())));
        }
        state.handed_out = None;
        let Some(inner) = state.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let next = inner.poll_next_unpin(cx);
        match &next {
            Poll::Ready(Some(_)) => state.handed_out = Some(Instant::now()),
            Poll::Ready(None) => {
                state.inner = None;
                state.slot = None;
            }
            Poll::Pending => {}
        }
        next
    }
}

/// A connection whose writes fail with `TimedOut` once they have made no progress for
/// `timeout`: the peer has read nothing for that long (its receive window and our send
/// buffer are full). HTTP/1 gives a server no other way to notice such a client: the
/// response stream is not polled while the socket is full, so without this the connection,
/// and the bytes queued for it, would stay until the client reads or goes away.
pub struct WriteStallTimeout<IO> {
    io: IO,
    timeout: Duration,
    /// Running while writes are pending without progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<IO> WriteStallTimeout<IO> {
    pub fn new(io: IO, timeout: Duration) -> Self {
        Self {
            io,
            timeout,
            stalled: None,
        }
    }

    /// Starts (or keeps) the stall clock when a write is pending, stops it when one goes
    /// through, and turns a stall past the timeout into an error.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if stalled.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client read nothing for {}",
                    humantime::format_duration(timeout)
                ),
            )));
        }
        Poll::Pending
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for WriteStallTimeout<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WriteStallTimeout<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, data);
        this.watch(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, data);
        this.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    // Flushing and shutting down pass through: only writes tell whether the peer reads
    // (a TLS stream flushes by writing to the connection underneath, which is this).
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The HTTP listener: accepted connections get a [`WriteStallTimeout`].
pub struct StallGuardedListener {
    listener: TcpListener,
    timeout: Duration,
}

impl StallGuardedListener {
    pub fn new(listener: TcpListener, timeout: Duration) -> Self {
        Self { listener, timeout }
    }
}

impl axum::serve::Listener for StallGuardedListener {
    type Io = WriteStallTimeout<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (tcp, addr) = axum::serve::Listener::accept(&mut self.listener).await;
        (WriteStallTimeout::new(tcp, self.timeout), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}
