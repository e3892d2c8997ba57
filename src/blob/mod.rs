//! Blob storage through `object_store`: content-addressed blobs under `blobs/sha256/ab/cd/<hex>`
//! and in-progress uploads under `uploads/<upload id>`, so a half-written upload can never be
//! mistaken for content.
//!
//! A local directory gets a fast path: uploads are written and blobs read with plain file I/O
//! on blocking threads (no per-chunk object-store round trips, no part buffering), and
//! promotion is a rename. Every other backend (S3-compatible, memory) goes through the generic
//! `object_store` API with multipart uploads.

use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::stream::{self, BoxStream, StreamExt};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, WriteMultipart};
use sha2::Digest;
use tokio::sync::mpsc;

use crate::domain::{Error, Sha256};

/// Size of the chunks blobs are read in: inside Pull's 64 KiB–1 MiB range.
pub const READ_CHUNK_BYTES: usize = 256 * 1024;
/// S3 needs parts of at least 5 MiB (but the last).
const MULTIPART_PART_BYTES: usize = 5 * 1024 * 1024;
/// Chunks queued between the request stream and the file writer, per upload. Small on
/// purpose: memory per upload stays a few chunks however large the file.
const WRITE_QUEUE_CHUNKS: usize = 2;

#[derive(Debug, Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    local: Option<Arc<LocalFileSystem>>,
    fsync: bool,
}

impl BlobStore {
    /// Opens `file://<dir>` (or a bare directory path), `memory://` or `s3://bucket/prefix`
    /// (credentials and endpoint from the usual `AWS_*` variables).
    pub fn open(url: &str, fsync: bool) -> Result<Self, Error> {
        if url == "memory://" || url == "memory:" {
            return Ok(Self {
                store: Arc::new(InMemory::new()),
                local: None,
                fsync,
            });
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(Error::blob_store(format!("{url}: no bucket name")));
            }
            let s3 = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| Error::blob_store(format!("{url}: {e}")))?;
            let store: Arc<dyn ObjectStore> = match prefix.trim_matches('/') {
                "" => Arc::new(s3),
                prefix => Arc::new(PrefixStore::new(s3, prefix)),
            };
            return Ok(Self {
                store,
                local: None,
                fsync,
            });
        }
        let dir = match url.split_once("://") {
            Some(("file", dir)) => dir,
            Some((scheme, _)) => {
                return Err(Error::blob_store(format!(
                    "unsupported blob URL scheme {scheme:?}; use file://, s3:// or memory://"
                )));
            }
            None => url,
        };
        // The uploads directory exists up front, so an upload is one file creation.
        std::fs::create_dir_all(std::path::Path::new(dir).join("uploads"))
            .map_err(|e| Error::blob_store(format!("cannot create {dir}: {e}")))?;
        let local = Arc::new(
            LocalFileSystem::new_with_prefix(dir)
                .map_err(|e| Error::blob_store(format!("{dir}: {e}")))?
                .with_fsync(fsync),
        );
        Ok(Self {
            store: local.clone(),
            local: Some(local),
            fsync,
        })
    }

    /// Starts a temporary upload. Dropping the returned [`Upload`] without `finish` removes
    /// whatever was written, so a cancelled push leaves nothing behind.
    pub async fn begin_upload(&self, upload_id: &str) -> Result<Upload, Error> {
        let key = upload_key(upload_id);
        let sink = match &self.local {
            Some(local) => {
                let path = local.path_to_filesystem(&key).map_err(Error::blob_store)?;
                UploadSink::Local(LocalWriter::start(path, self.fsync))
            }
            None => {
                let upload = self
                    .store
                    .put_multipart(&key)
                    .await
                    .map_err(Error::blob_store)?;
                UploadSink::Multipart(
                    Some(WriteMultipart::new_with_chunk_size(
                        upload,
                        MULTIPART_PART_BYTES,
                    )),
                    Hasher::start(),
                )
            }
        };
        Ok(Upload {
            sink,
            temp: TempBlob {
                store: self.clone(),
                key,
                armed: true,
            },
        })
    }

    /// Moves a finished upload to its content address. Returns `true` when the blob was
    /// already there (the upload is discarded: deduplicated).
    pub async fn promote(&self, mut temp: TempBlob, sha256: &Sha256) -> Result<bool, Error> {
        let key = blob_key(sha256);
        let deduplicated = match self.store.head(&key).await {
            Ok(_) => true,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => return Err(Error::blob_store(e)),
        };
        if deduplicated {
            return Ok(true); // `temp` deletes the upload when dropped
        }
        // Two uploads of the same content may race here; both write identical bytes, so
        // whichever rename lands last is as good as the first.
        self.store
            .rename(&temp.key, &key)
            .await
            .map_err(Error::blob_store)?;
        temp.armed = false;
        Ok(false)
    }

    /// Stores a small blob held in memory in one step: written to a temporary upload and
    /// renamed to its content address (one blocking task on a local directory), or put
    /// directly (object stores make a single PUT appear atomically). Returns `true` when the
    /// content was already stored.
    pub async fn put_small(
        &self,
        upload_id: &str,
        data: Bytes,
        sha256: &Sha256,
    ) -> Result<bool, Error> {
        let key = blob_key(sha256);
        let Some(local) = &self.local else {
            let deduplicated = self.contains(sha256).await?;
            if !deduplicated {
                self.store
                    .put(&key, data.into())
                    .await
                    .map_err(Error::blob_store)?;
            }
            return Ok(deduplicated);
        };
        let temp = local
            .path_to_filesystem(&upload_key(upload_id))
            .map_err(Error::blob_store)?;
        let target = local.path_to_filesystem(&key).map_err(Error::blob_store)?;
        let fsync = self.fsync;
        let stored = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
            if target.exists() {
                return Ok(true);
            }
            let written = (|| {
                let mut file = std::fs::File::create(&temp)?;
                file.write_all(&data)?;
                if fsync {
                    file.sync_data()?;
                }
                // Most pushes land in an existing directory: try the rename first.
                match std::fs::rename(&temp, &target) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        if let Some(dir) = target.parent() {
                            std::fs::create_dir_all(dir)?;
                        }
                        std::fs::rename(&temp, &target)?;
                    }
                    other => other?,
                }
                // The rename itself must survive a crash before the artifact row commits.
                if fsync && let Some(dir) = target.parent() {
                    std::fs::File::open(dir)?.sync_all()?;
                }
                Ok(())
            })();
            if written.is_err() {
                let _ = std::fs::remove_file(&temp);
            }
            written.map(|()| false)
        })
        .await
        .map_err(|e| Error::Internal(format!("blob writer panicked: {e}")))?;
        stored.map_err(Error::blob_store)
    }

    /// Streams `range` of a blob in chunks of [`READ_CHUNK_BYTES`].
    pub async fn read(
        &self,
        sha256: &Sha256,
        range: Range<u64>,
    ) -> Result<BoxStream<'static, Result<Bytes, Error>>, Error> {
        if range.is_empty() {
            return Ok(stream::empty().boxed());
        }
        let key = blob_key(sha256);
        if let Some(local) = &self.local {
            let path = local.path_to_filesystem(&key).map_err(Error::blob_store)?;
            return Ok(read_local(path, range));
        }
        let options = GetOptions {
            range: Some(GetRange::Bounded(range)),
            ..Default::default()
        };
        let result = self
            .store
            .get_opts(&key, options)
            .await
            .map_err(Error::blob_store)?;
        Ok(rechunk(result.into_stream()))
    }

    /// Whether a blob is stored (for tests and the sweeper).
    pub async fn contains(&self, sha256: &Sha256) -> Result<bool, Error> {
        match self.store.head(&blob_key(sha256)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(Error::blob_store(e)),
        }
    }

    /// Keys of uploads in progress or abandoned (for tests and the sweeper).
    pub async fn list_uploads(&self) -> Result<Vec<String>, Error> {
        let prefix = ObjectPath::from("uploads");
        let mut keys = Vec::new();
        let mut listing = self.store.list(Some(&prefix));
        while let Some(meta) = listing.next().await {
            keys.push(meta.map_err(Error::blob_store)?.location.to_string());
        }
        Ok(keys)
    }
}

fn upload_key(upload_id: &str) -> ObjectPath {
    ObjectPath::from(format!("uploads/{upload_id}"))
}

fn blob_key(sha256: &Sha256) -> ObjectPath {
    let hex = sha256.as_str();
    ObjectPath::from(format!("blobs/sha256/{}/{}/{hex}", &hex[0..2], &hex[2..4]))
}

/// An upload being written.
pub struct Upload {
    sink: UploadSink,
    temp: TempBlob,
}

enum UploadSink {
    /// Hashes and writes on one blocking thread.
    Local(LocalWriter),
    /// Parts go to the object store; a blocking thread hashes alongside.
    Multipart(Option<WriteMultipart>, Hasher),
}

impl Upload {
    /// Appends a chunk; waits while the writer is behind (backpressure).
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), Error> {
        match &mut self.sink {
            UploadSink::Local(writer) => writer.write(chunk).await,
            UploadSink::Multipart(Some(upload), hasher) => {
                hasher.update(chunk.clone()).await?;
                upload
                    .wait_for_capacity(2)
                    .await
                    .map_err(Error::blob_store)?;
                upload.put(chunk);
                Ok(())
            }
            UploadSink::Multipart(None, _) => {
                Err(Error::Internal("upload already finished".into()))
            }
        }
    }

    /// Completes the upload and returns the content's SHA-256 with the bytes, durable
    /// (fsync on local disks when enabled) under the temporary key the [`TempBlob`] owns.
    pub async fn finish(mut self) -> Result<(TempBlob, [u8; 32]), Error> {
        let digest = match &mut self.sink {
            UploadSink::Local(writer) => writer.finish().await?,
            UploadSink::Multipart(upload, hasher) => {
                let digest = hasher.finish().await?;
                if let Some(upload) = upload.take() {
                    upload.finish().await.map_err(Error::blob_store)?;
                }
                digest
            }
        };
        Ok((self.temp.take(), digest))
    }
}

/// SHA-256 on a blocking thread fed through a small queue, so hashing overlaps receiving.
struct Hasher {
    queue: Option<mpsc::Sender<Bytes>>,
    done: Option<tokio::task::JoinHandle<[u8; 32]>>,
}

impl Hasher {
    fn start() -> Self {
        let (queue, mut chunks) = mpsc::channel::<Bytes>(WRITE_QUEUE_CHUNKS);
        let done = tokio::task::spawn_blocking(move || {
            let mut hasher = sha2::Sha256::new();
            while let Some(chunk) = chunks.blocking_recv() {
                hasher.update(&chunk);
            }
            <[u8; 32]>::from(hasher.finalize())
        });
        Self {
            queue: Some(queue),
            done: Some(done),
        }
    }

    async fn update(&mut self, chunk: Bytes) -> Result<(), Error> {
        match &self.queue {
            Some(queue) => queue
                .send(chunk)
                .await
                .map_err(|_| Error::Internal("hashing task stopped".into())),
            None => Err(Error::Internal("hash already finished".into())),
        }
    }

    async fn finish(&mut self) -> Result<[u8; 32], Error> {
        self.queue = None;
        match self.done.take() {
            Some(done) => done
                .await
                .map_err(|e| Error::Internal(format!("hashing task failed: {e}"))),
            None => Err(Error::Internal("hash already finished".into())),
        }
    }
}

impl Drop for UploadSink {
    fn drop(&mut self) {
        if let UploadSink::Multipart(upload, _) = self {
            // Unfinished: abort so the store drops the parts. Needs a runtime, which every
            // caller of this module runs in; without one there is nothing to clean anyway.
            if let (Some(upload), Ok(runtime)) =
                (upload.take(), tokio::runtime::Handle::try_current())
            {
                runtime.spawn(async move {
                    let _ = upload.abort().await;
                });
            }
        }
    }
}

/// A completed upload under its temporary key. Deleted on drop unless promoted.
pub struct TempBlob {
    store: BlobStore,
    key: ObjectPath,
    armed: bool,
}

impl TempBlob {
    fn take(&mut self) -> TempBlob {
        self.armed = false;
        TempBlob {
            store: self.store.clone(),
            key: self.key.clone(),
            armed: true,
        }
    }
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(local) = &self.store.local {
            // A local unlink is one cheap syscall: do it now, so it is gone when we return.
            if let Ok(path) = local.path_to_filesystem(&self.key) {
                let _ = std::fs::remove_file(path);
            }
        } else if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let store = self.store.store.clone();
            let key = self.key.clone();
            runtime.spawn(async move {
                let _ = store.delete(&key).await;
            });
        }
    }
}

/// Hashes and writes an upload to a local file on one blocking thread fed through a small
/// queue: one hand-off per chunk, and the receiving task never waits on the disk or the hash.
struct LocalWriter {
    queue: Option<mpsc::Sender<WriteOp>>,
    done: Option<tokio::task::JoinHandle<std::io::Result<[u8; 32]>>>,
}

enum WriteOp {
    Data(Bytes),
    /// End of upload: flush (and fsync) and keep the file. A queue that closes without this
    /// means the upload was abandoned, and the file is removed.
    Finish,
}

impl LocalWriter {
    fn start(path: PathBuf, fsync: bool) -> Self {
        let (queue, mut ops) = mpsc::channel::<WriteOp>(WRITE_QUEUE_CHUNKS);
        let done = tokio::task::spawn_blocking(move || {
            let result = (|| {
                let mut file = match std::fs::File::create(&path) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        if let Some(dir) = path.parent() {
                            std::fs::create_dir_all(dir)?;
                        }
                        std::fs::File::create(&path)?
                    }
                    other => other?,
                };
                let mut hasher = sha2::Sha256::new();
                let mut flusher = Flusher::default();
                while let Some(op) = ops.blocking_recv() {
                    match op {
                        WriteOp::Data(chunk) => {
                            hasher.update(&chunk);
                            file.write_all(&chunk)?;
                            if fsync {
                                flusher.wrote(&file, chunk.len());
                            }
                        }
                        WriteOp::Finish => {
                            flusher.stop();
                            if fsync {
                                file.sync_data()?;
                            }
                            return Ok(Some(<[u8; 32]>::from(hasher.finalize())));
                        }
                    }
                }
                Ok(None)
            })();
            match result {
                Ok(Some(digest)) => Ok(digest),
                Ok(None) => {
                    let _ = std::fs::remove_file(&path);
                    Err(std::io::Error::other("upload abandoned"))
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    Err(e)
                }
            }
        });
        Self {
            queue: Some(queue),
            done: Some(done),
        }
    }

    async fn write(&mut self, chunk: Bytes) -> Result<(), Error> {
        let sent = match &self.queue {
            Some(queue) => queue.send(WriteOp::Data(chunk)).await.is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            // The writer stopped early: its result says why.
            Err(self.join().await.err().unwrap_or_else(|| {
                Error::Internal("upload writer stopped without an error".into())
            }))
        }
    }

    async fn finish(&mut self) -> Result<[u8; 32], Error> {
        if let Some(queue) = self.queue.take() {
            let _ = queue.send(WriteOp::Finish).await;
        }
        self.join().await
    }

    async fn join(&mut self) -> Result<[u8; 32], Error> {
        self.queue = None;
        match self.done.take() {
            Some(handle) => match handle.await {
                Ok(result) => result.map_err(Error::blob_store),
                Err(e) => Err(Error::Internal(format!("upload writer panicked: {e}"))),
            },
            None => Err(Error::Internal("upload writer already joined".into())),
        }
    }
}

/// Flushes a large upload to disk in the background while it is still being written, so the
/// fsync before commit finds little left to do: with durability on, a big push then costs
/// about the longer of receiving and writing its bytes rather than their sum.
#[derive(Default)]
struct Flusher {
    unflushed: usize,
    running: Option<(std::sync::mpsc::SyncSender<()>, std::thread::JoinHandle<()>)>,
}

impl Flusher {
    const EVERY_BYTES: usize = 32 * 1024 * 1024;

    fn wrote(&mut self, file: &std::fs::File, bytes: usize) {
        self.unflushed += bytes;
        if self.unflushed < Self::EVERY_BYTES {
            return;
        }
        self.unflushed = 0;
        if self.running.is_none() {
            let Ok(file) = file.try_clone() else { return };
            let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
            let thread = std::thread::spawn(move || {
                while rx.recv().is_ok() {
                    // Best effort: the final fsync before commit is the one that counts.
                    let _ = file.sync_data();
                }
            });
            self.running = Some((tx, thread));
        }
        if let Some((tx, _)) = &self.running {
            // A flush already pending covers this one too.
            let _ = tx.try_send(());
        }
    }

    fn stop(&mut self) {
        if let Some((tx, thread)) = self.running.take() {
            drop(tx);
            let _ = thread.join();
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        // An abandoned upload: let the flusher finish its current round and exit.
        if let Some((tx, _)) = self.running.take() {
            drop(tx);
        }
    }
}

/// Reads `range` of a local file on a blocking thread, a chunk ahead of the consumer.
fn read_local(path: PathBuf, range: Range<u64>) -> BoxStream<'static, Result<Bytes, Error>> {
    let (tx, rx) = mpsc::channel::<Result<Bytes, Error>>(2);
    tokio::task::spawn_blocking(move || {
        let read = || -> std::io::Result<()> {
            let mut file = std::fs::File::open(&path)?;
            file.seek(SeekFrom::Start(range.start))?;
            let mut remaining = range.end - range.start;
            while remaining > 0 {
                let want = remaining.min(READ_CHUNK_BYTES as u64) as usize;
                // read_to_end fills spare capacity without zeroing it first.
                let mut buf = Vec::with_capacity(want);
                (&mut file).take(want as u64).read_to_end(&mut buf)?;
                if buf.len() != want {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "blob is shorter than its artifact",
                    ));
                }
                remaining -= want as u64;
                if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                    return Ok(()); // the reader went away: stop quietly
                }
            }
            Ok(())
        };
        if let Err(e) = read() {
            let _ = tx.blocking_send(Err(Error::blob_store(e)));
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx).boxed()
}

/// Regroups an object-store byte stream into [`READ_CHUNK_BYTES`] chunks.
fn rechunk(
    input: BoxStream<'static, object_store::Result<Bytes>>,
) -> BoxStream<'static, Result<Bytes, Error>> {
    stream::unfold(
        (input, BytesMut::new(), false),
        |(mut input, mut buf, mut ended)| async move {
            loop {
                if buf.len() >= READ_CHUNK_BYTES || (ended && !buf.is_empty()) {
                    let take = buf.len().min(READ_CHUNK_BYTES);
                    let chunk = buf.split_to(take).freeze();
                    return Some((Ok(chunk), (input, buf, ended)));
                }
                if ended {
                    return None;
                }
                match input.next().await {
                    Some(Ok(bytes)) => buf.extend_from_slice(&bytes),
                    Some(Err(e)) => return Some((Err(Error::blob_store(e)), (input, buf, true))),
                    None => ended = true,
                }
            }
        },
    )
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(data: &[u8]) -> Sha256 {
        Sha256::from_digest(&sha2::Sha256::digest(data).into())
    }

    async fn roundtrip(store: &BlobStore) {
        let data: Vec<u8> = (0..(READ_CHUNK_BYTES * 2 + 7))
            .map(|i| (i % 251) as u8)
            .collect();
        let sha = digest(&data);
        let mut upload = store.begin_upload("u1").await.unwrap();
        for part in data.chunks(100_000) {
            upload.write(Bytes::copy_from_slice(part)).await.unwrap();
        }
        let (temp, digest) = upload.finish().await.unwrap();
        assert_eq!(
            Sha256::from_digest(&digest),
            sha,
            "the upload hashes what it writes"
        );
        assert!(!store.promote(temp, &sha).await.unwrap());
        assert!(store.contains(&sha).await.unwrap());

        let chunks: Vec<Bytes> = store
            .read(&sha, 5..data.len() as u64)
            .await
            .unwrap()
            .map(|c| c.unwrap())
            .collect()
            .await;
        assert!(chunks.iter().all(|c| c.len() <= READ_CHUNK_BYTES));
        assert_eq!(chunks.concat(), &data[5..]);

        // The same content again is deduplicated and its upload removed.
        let mut again = store.begin_upload("u2").await.unwrap();
        again.write(Bytes::from(data.clone())).await.unwrap();
        let (temp, _) = again.finish().await.unwrap();
        assert!(store.promote(temp, &sha).await.unwrap());
        tokio::task::yield_now().await;
        // An abandoned upload leaves nothing.
        let mut abandoned = store.begin_upload("u3").await.unwrap();
        abandoned
            .write(Bytes::from_static(b"partial"))
            .await
            .unwrap();
        drop(abandoned);
        for _ in 0..100 {
            if store.list_uploads().await.unwrap().is_empty() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("uploads left behind: {:?}", store.list_uploads().await);
    }

    #[tokio::test]
    async fn local_directory_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&format!("file://{}", dir.path().display()), false).unwrap();
        roundtrip(&store).await;
    }

    #[tokio::test]
    async fn memory_roundtrip() {
        roundtrip(&BlobStore::open("memory://", false).unwrap()).await;
    }

    #[test]
    fn unknown_scheme_is_refused() {
        let err = BlobStore::open("ftp://x", false).unwrap_err();
        assert!(
            err.to_string().contains("unsupported blob URL scheme"),
            "{err}"
        );
    }
}
