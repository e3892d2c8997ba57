//! The write path of an upload as a pipeline: the receive loop hands each chunk (a refcounted
//! [`Bytes`], never copied) to two [`Stage`]s, the SHA-256 and the file write (or, on an
//! object store, the SHA-256 beside the multipart upload), and goes on receiving. Each stage
//! works through its own small bounded queue in order on a thread of the blocking pool, so
//! receiving, hashing and writing run at once on different threads and a push moves at the
//! speed of its slowest stage (on a machine with SHA-NI and a page cache to write into: the
//! hash), not at the sum of the three. Concurrent pushes each have their own stages, so their
//! hashing spreads over the cores.
//!
//! A stage holds no thread while its queue is empty: a task is started on the pool once an
//! idle stage's queue is three quarters full (or the sender would otherwise wait, or the
//! upload ends), drains the queue and ends. A stage that keeps up with the network thus
//! takes several chunks per start rather than a wake-up per chunk. A client that trickles or
//! stops costs an idle future, as before, and a stage's thread only ever waits on the disk,
//! never on a peer. The queue is bounded in bytes ([`STAGE_QUEUE_BYTES`]), which is the
//! backpressure: the receive loop waits for room, so a push holds at most about that much
//! payload (the two stages share their chunks) whatever its size.
//!
//! A failing chunk (a disk write error) stops the stage: its queue is emptied and the next
//! `submit` or `finish` returns the error. Dropping a stage (a cancelled push) empties its
//! queue too, so at most the chunk being worked on is still finished after the push is gone.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::domain::{Error, Hasher};

/// Payload bytes a stage may have queued or in work: four 256 KiB chunks, enough for a stage
/// not to run dry while the receive loop waits on the network, little enough that 64
/// concurrent pushes hold tens of MiB between them.
pub(super) const STAGE_QUEUE_BYTES: usize = 1024 * 1024;

/// An idle stage is started once this share of its queue (in quarters) is filled, or when
/// the sender would otherwise wait, or at the end: a stage that keeps up then works through
/// several chunks per start instead of being woken for each.
const WAKE_QUARTERS: u32 = 3;

/// What a stage does with each chunk, in order, on the blocking pool.
pub(super) trait Work: Send + 'static {
    fn chunk(&mut self, chunk: &[u8]) -> std::io::Result<()>;

    /// Finishes what the chunks so far started (see [`Stage::flushed`]): a worker that holds
    /// bytes back, as a direct write's block does, writes them out.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Work for Hasher {
    fn chunk(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        self.update(chunk);
        Ok(())
    }
}

/// One serial step of the pipeline, with its queue (see the module documentation).
pub(super) struct Stage<W: Work> {
    shared: Arc<Mutex<Shared<W>>>,
    room: Arc<Semaphore>,
    capacity: u32,
    /// Queued bytes (by weight) at which an idle stage is started.
    wake_at: u32,
}

struct Shared<W> {
    queue: VecDeque<(Bytes, OwnedSemaphorePermit)>,
    /// Weight of the queued chunks (not counting one in work).
    queued: u32,
    /// The worker while no task runs it (`None` while one does, or after a failure).
    idle: Option<W>,
    /// Why the stage stopped: a chunk failed, a task panicked, or the stage was dropped.
    failed: Option<Failure>,
}

#[derive(Clone)]
enum Failure {
    Io(std::io::ErrorKind, String),
    Panicked,
    Dropped,
}

impl<W: Work> Stage<W> {
    pub(super) fn new(worker: W) -> Self {
        Self::with_capacity(worker, STAGE_QUEUE_BYTES)
    }

    fn with_capacity(worker: W, bytes: usize) -> Self {
        let capacity = u32::try_from(bytes.max(1)).unwrap_or(u32::MAX);
        Self {
            shared: Arc::new(Mutex::new(Shared {
                queue: VecDeque::new(),
                queued: 0,
                idle: Some(worker),
                failed: None,
            })),
            room: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
            wake_at: (capacity / 4 * WAKE_QUARTERS).max(1),
        }
    }

    /// Queues `chunk`, waiting while the queue is full. Returns the error of an earlier
    /// chunk if the stage has stopped.
    pub(super) async fn submit(&mut self, chunk: Bytes) -> Result<(), Error> {
        if chunk.is_empty() {
            return self.check();
        }
        // A chunk larger than the whole queue takes all of it.
        let weight = u32::try_from(chunk.len())
            .unwrap_or(u32::MAX)
            .min(self.capacity);
        // No room: an idle stage holding chunks below its wake mark must start, or nothing
        // would ever give room back. (Nobody else takes permits, and an idle stage gives
        // none back, so the count cannot change under this check.)
        if self.room.available_permits() < weight as usize {
            self.start_if_idle();
        }
        let permit = self
            .room
            .clone()
            .acquire_many_owned(weight)
            .await
            .map_err(|_| Error::Internal("upload stage closed".into()))?;
        let mut shared = lock(&self.shared);
        if let Some(failure) = &shared.failed {
            return Err(failure.to_error());
        }
        shared.queue.push_back((chunk, permit));
        shared.queued += weight;
        if shared.queued >= self.wake_at {
            self.start(shared);
        }
        Ok(())
    }

    /// Starts a task on the pool to work through the queue, unless one runs or the queue is
    /// empty.
    fn start(&self, mut shared: MutexGuard<'_, Shared<W>>) {
        if shared.queue.is_empty() {
            return;
        }
        if let Some(worker) = shared.idle.take() {
            let queue = self.shared.clone();
            drop(shared);
            tokio::task::spawn_blocking(move || drain(&queue, worker));
        }
    }

    fn start_if_idle(&self) {
        self.start(lock(&self.shared));
    }

    /// Waits until every chunk handed over is done (the queue empty and no task running).
    pub(super) async fn drained(&mut self) -> Result<(), Error> {
        self.start_if_idle();
        // Every permit back means every chunk is done; the draining task gives its last
        // permit back only under the lock, after it has put the worker back.
        let all = self
            .room
            .acquire_many(self.capacity)
            .await
            .map_err(|_| Error::Internal("upload stage closed".into()))?;
        drop(all);
        self.check()
    }

    /// Waits until every chunk handed over is done, then has the worker flush (on the
    /// blocking pool): whatever it held back is then written. A failing flush stops the
    /// stage, as a failing chunk does.
    pub(super) async fn flushed(&mut self) -> Result<(), Error> {
        self.drained().await?;
        let Some(mut worker) = lock(&self.shared).idle.take() else {
            return Err(Error::Internal("upload stage lost".into()));
        };
        let flushed = tokio::task::spawn_blocking(move || {
            let flushed = worker.flush();
            (worker, flushed)
        })
        .await;
        let mut shared = lock(&self.shared);
        let failure = match flushed {
            Ok((worker, Ok(()))) => {
                shared.idle = Some(worker);
                return Ok(());
            }
            Ok((_, Err(e))) => Failure::Io(e.kind(), e.to_string()),
            Err(_) => Failure::Panicked,
        };
        Err(shared.failed.get_or_insert(failure).to_error())
    }

    /// The worker, once every chunk handed over is done.
    pub(super) async fn finish(mut self) -> Result<W, Error> {
        self.drained().await?;
        let mut shared = lock(&self.shared);
        match shared.idle.take() {
            Some(worker) => Ok(worker),
            None => Err(shared.failed.as_ref().map_or_else(
                || Error::Internal("upload stage lost".into()),
                Failure::to_error,
            )),
        }
    }

    fn check(&self) -> Result<(), Error> {
        match &lock(&self.shared).failed {
            Some(failure) => Err(failure.to_error()),
            None => Ok(()),
        }
    }
}

impl<W: Work> Drop for Stage<W> {
    fn drop(&mut self) {
        let mut shared = lock(&self.shared);
        shared.queue.clear();
        shared.queued = 0;
        shared.failed.get_or_insert(Failure::Dropped);
    }
}

/// The body of a stage's task: works through the queue in order and ends when it is empty
/// (leaving the worker for the next task) or a chunk fails (leaving the failure).
fn drain<W: Work>(shared: &Mutex<Shared<W>>, mut worker: W) {
    let mut done: Option<OwnedSemaphorePermit> = None;
    loop {
        let chunk = {
            let mut shared = lock(shared);
            drop(done.take());
            if shared.failed.is_some() {
                return; // dropped meanwhile: the worker goes with this task
            }
            match shared.queue.pop_front() {
                Some((chunk, permit)) => {
                    shared.queued -= permit.num_permits() as u32;
                    done = Some(permit);
                    chunk
                }
                None => {
                    shared.idle = Some(worker);
                    return;
                }
            }
        };
        let worked =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.chunk(&chunk)));
        let failure = match worked {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => Failure::Io(e.kind(), e.to_string()),
            Err(_) => Failure::Panicked,
        };
        let mut shared = lock(shared);
        shared.queue.clear();
        shared.queued = 0;
        shared.failed.get_or_insert(failure);
        drop(done.take());
        return;
    }
}

fn lock<W>(shared: &Mutex<Shared<W>>) -> MutexGuard<'_, Shared<W>> {
    // The lock guards plain queue operations, which cannot panic half-way.
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Failure {
    fn to_error(&self) -> Error {
        match self {
            Failure::Io(kind, message) => write_error(*kind, message),
            Failure::Panicked => Error::Internal("upload stage task panicked".into()),
            Failure::Dropped => Error::Internal("upload stage already dropped".into()),
        }
    }
}

/// A failed blob write as the taxonomy has it: a full disk (or quota) is RESOURCE_EXHAUSTED,
/// which retrying soon will not cure; any other I/O error is the blob store being
/// unavailable, worth a retry.
pub(super) fn write_error(kind: std::io::ErrorKind, message: &str) -> Error {
    match kind {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
            tracing::warn!(cause = %message, "blob store out of space");
            Error::ResourceExhausted(
                "the blob store is out of space; nothing was stored".to_owned(),
            )
        }
        _ => Error::blob_store(message),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Collects what it is given, failing (or panicking) at a given chunk.
    struct Recorder {
        seen: Vec<u8>,
        chunks: usize,
        fail_at: Option<(usize, std::io::ErrorKind)>,
        panic_at: Option<usize>,
    }

    impl Recorder {
        fn new() -> Self {
            Self {
                seen: Vec::new(),
                chunks: 0,
                fail_at: None,
                panic_at: None,
            }
        }
    }

    impl Work for Recorder {
        fn chunk(&mut self, chunk: &[u8]) -> std::io::Result<()> {
            if let Some((at, kind)) = self.fail_at
                && at == self.chunks
            {
                return Err(std::io::Error::new(kind, "injected write failure"));
            }
            if self.panic_at == Some(self.chunks) {
                panic!("injected panic");
            }
            self.chunks += 1;
            self.seen.extend_from_slice(chunk);
            Ok(())
        }
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// Hashes and records `payload` cut into `cut`-byte chunks through stages with `queue`
    /// bytes of room, as an upload does.
    async fn through_stages(payload: &[u8], cut: usize, queue: usize) -> (Vec<u8>, usize, Hasher) {
        let mut hash = Stage::with_capacity(Hasher::new(), queue);
        let mut write = Stage::with_capacity(Recorder::new(), queue);
        let payload = Bytes::copy_from_slice(payload);
        let mut at = 0;
        while at < payload.len() {
            let chunk = payload.slice(at..(at + cut).min(payload.len()));
            at += chunk.len();
            hash.submit(chunk.clone()).await.unwrap();
            write.submit(chunk).await.unwrap();
        }
        let recorder = write.finish().await.unwrap();
        (recorder.seen, recorder.chunks, hash.finish().await.unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_chunking_arrives_whole_in_order_and_hashes_as_one_shot() {
        let chunk = 256 * 1024;
        for (len, cut, queue) in [
            (0, chunk, STAGE_QUEUE_BYTES),               // empty
            (1, chunk, STAGE_QUEUE_BYTES),               // one byte
            (chunk, chunk, STAGE_QUEUE_BYTES),           // exactly one chunk
            (chunk + 1, chunk, STAGE_QUEUE_BYTES),       // one byte over
            (3 * chunk - 1, chunk, STAGE_QUEUE_BYTES),   // one byte short of three
            (1_000_003, 4093, STAGE_QUEUE_BYTES),        // odd sizes, many chunks queued
            (1_000_003, 7, 64),                          // tiny chunks, tiny queue
            (5 * 1024 * 1024 + 5, 1024 * 1024, 300_000), // chunks larger than the queue
        ] {
            let payload = data(len);
            let (seen, chunks, hasher) = through_stages(&payload, cut, queue).await;
            assert_eq!(seen, payload, "{len} bytes in {cut}-byte chunks");
            assert_eq!(
                chunks,
                len.div_ceil(cut),
                "{len} bytes in {cut}-byte chunks"
            );
            assert_eq!(hasher.finish(), Hasher::digest(&payload), "{len} bytes");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stage_below_its_wake_mark_starts_when_the_sender_would_wait() {
        // 1000 bytes of room, started at 750: the 400 bytes queued first do not start the
        // stage, and the 700 that follow do not fit beside them, so the stage must start
        // for the sender to get room. (The timeout turns a hang into a failure.)
        let mut stage = Stage::with_capacity(Recorder::new(), 1000);
        let chunks = [vec![1u8; 400], vec![2u8; 700], vec![3u8; 10]];
        let recorder = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            for chunk in &chunks {
                stage.submit(Bytes::from(chunk.clone())).await.unwrap();
            }
            stage.finish().await.unwrap()
        })
        .await
        .expect("a stage below its wake mark never started");
        assert_eq!(recorder.seen, chunks.concat());
        assert_eq!(recorder.chunks, 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn empty_chunks_are_skipped() {
        let mut stage = Stage::new(Recorder::new());
        stage.submit(Bytes::new()).await.unwrap();
        stage.submit(Bytes::from_static(b"abc")).await.unwrap();
        stage.submit(Bytes::new()).await.unwrap();
        let recorder = stage.finish().await.unwrap();
        assert_eq!(
            (recorder.seen.as_slice(), recorder.chunks),
            (&b"abc"[..], 1)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_write_stops_the_stage_with_a_precise_error() {
        for (kind, full) in [
            (std::io::ErrorKind::StorageFull, true),
            (std::io::ErrorKind::QuotaExceeded, true),
            (std::io::ErrorKind::Other, false),
        ] {
            let mut recorder = Recorder::new();
            recorder.fail_at = Some((3, kind));
            let mut stage = Stage::with_capacity(recorder, 64 * 1024);
            let mut refused = None;
            for i in 0..100u8 {
                if let Err(e) = stage.submit(Bytes::from(vec![i; 16 * 1024])).await {
                    refused = Some(e);
                    break;
                }
            }
            // The receive loop is refused a later chunk (the queue stops taking them), and
            // finishing reports the same failure.
            let refused = refused.expect("a chunk after the failure is refused");
            let finished = stage.finish().await.err().unwrap();
            for err in [refused, finished] {
                match (&err, full) {
                    (Error::ResourceExhausted(m), true) => assert!(m.contains("out of space")),
                    (Error::Unavailable { what, cause }, false) => {
                        assert_eq!(*what, "blob store");
                        assert!(cause.contains("injected write failure"), "{cause}");
                    }
                    _ => panic!("{kind:?} became {err:?}"),
                }
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failure_in_the_last_chunk_fails_finish() {
        let mut recorder = Recorder::new();
        recorder.fail_at = Some((1, std::io::ErrorKind::Other));
        let mut stage = Stage::new(recorder);
        stage.submit(Bytes::from_static(b"one")).await.unwrap();
        stage.submit(Bytes::from_static(b"two")).await.unwrap();
        assert!(matches!(
            stage.finish().await,
            Err(Error::Unavailable { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_stage_is_an_internal_error_not_a_hang() {
        let mut recorder = Recorder::new();
        recorder.panic_at = Some(0);
        let mut stage = Stage::new(recorder);
        stage.submit(Bytes::from_static(b"boom")).await.unwrap();
        match stage.finish().await {
            Err(Error::Internal(m)) => assert!(m.contains("panicked"), "{m}"),
            other => panic!("{:?}", other.map(|r| r.seen)),
        }
    }

    /// Blocks in its first chunk until released, so a test can hold the stage busy.
    struct Gate {
        release: Arc<std::sync::Barrier>,
        worked: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Work for Gate {
        fn chunk(&mut self, _chunk: &[u8]) -> std::io::Result<()> {
            if self
                .worked
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                == 0
            {
                self.release.wait();
            }
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_queue_is_bounded_and_a_dropped_stage_drops_its_queue() {
        let release = Arc::new(std::sync::Barrier::new(2));
        let worked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut stage = Stage::with_capacity(
            Gate {
                release: release.clone(),
                worked: worked.clone(),
            },
            4,
        );
        // One byte in work and three queued fill the four bytes of room...
        for _ in 0..4 {
            stage.submit(Bytes::from_static(b"x")).await.unwrap();
        }
        // ...so a fifth waits for room.
        let waited = tokio::time::timeout(
            std::time::Duration::from_millis(100),
            stage.submit(Bytes::from_static(b"x")),
        )
        .await;
        assert!(waited.is_err(), "a full queue makes the sender wait");
        // A cancelled push drops its stage: what was queued is never worked on.
        drop(stage);
        let released = release.clone();
        tokio::task::spawn_blocking(move || released.wait())
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(worked.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
