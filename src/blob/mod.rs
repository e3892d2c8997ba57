//! Blob storage through `object_store`: content-addressed blobs under `blobs/sha256/ab/cd/<hex>`
//! and in-progress uploads under `uploads/<upload id>`, so a half-written upload can never be
//! mistaken for content.
//!
//! A local directory gets a fast path: uploads are written and blobs read with plain file I/O,
//! and promotion is a rename. Every other backend (S3-compatible, memory) goes through the
//! generic `object_store` API with multipart uploads, and a push's object stays where it was
//! written, `blobs/pushed/<upload id>`: an object store has no rename (it is a copy and a
//! delete, and S3 copies at most 5 GB at once), so the key becomes the blob's *location*,
//! recorded in its database row (`blobs.location`; none means the content address). A push
//! then costs its upload and nothing more. An upload in progress there is a multipart upload,
//! invisible until complete; a completed one the database does not name (a push that died
//! before claiming it) is removed by the sweeper, under a lock the claim takes too.
//!
//! No stream ever holds a thread while it waits for its peer. An upload is a pipeline (see
//! `pipeline`): each chunk goes to a hash stage and a write stage, each working through a
//! small bounded queue on the blocking pool only while it has chunks, so receiving, hashing
//! and writing overlap on different threads and a client that trickles bytes costs an idle
//! future, not one of the pool's threads. Reads run a chunk per blocking task, and a read
//! that is flowing reads one chunk ahead of the consumer.
//!
//! Durability (local directory, `fsync` on): an upload is fsynced before promotion, every
//! directory created on the way to a blob's address is fsynced into its parent, and the
//! rename is fsynced into the blob's directory, so a committed artifact row never outlives
//! its blob's directory entry across a power cut. A blob already at a content address is not
//! trusted blindly: its size is checked (and its digest too when blobs are written without
//! fsync, where a crash can leave a torn file), and a damaged one is moved to `quarantine/`
//! and replaced by the upload. Reads report a missing or short blob as
//! [`Error::DataLoss`], never as a short success.

use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::stream::{self, BoxStream, Stream, StreamExt};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use tokio::task::JoinHandle;

use crate::domain::{Error, Hasher, Sha256};

mod direct;
mod object_read;
mod pagecache;
mod pipeline;
mod resumable;
mod scrub;

pub use pagecache::first_page_cached;
use pipeline::Stage;
pub use resumable::{Opened, ResumableFile, ResumableWriter};
pub use scrub::{Pace, Scrubbed};

/// Size of the chunks blobs are read in once a read is flowing: inside Pull's 64 KiB–1 MiB
/// range.
pub const READ_CHUNK_BYTES: usize = 256 * 1024;
/// First chunk of a local read. A read doubles its chunk size up to [`READ_CHUNK_BYTES`], so a
/// client that opens a Pull and never reads pins 64 KiB in the transport, not 256 KiB.
const FIRST_READ_CHUNK_BYTES: usize = 64 * 1024;
/// S3 needs parts of at least 5 MiB (but the last).
const MULTIPART_PART_BYTES: usize = 5 * 1024 * 1024;
/// Parts a multipart upload may have in flight to the object store.
const MULTIPART_PARTS_IN_FLIGHT: usize = 2;
/// While a large upload is written with fsync on, the write stage starts writing back every
/// this many bytes as they are written, and waits for the step before to be on disk, so the
/// fsync before commit finds at most two steps left to do: a big push then costs about the
/// longest of receiving, hashing and writing its bytes rather than their sum.
const FLUSH_STEP_BYTES: u64 = 8 * 1024 * 1024;
/// Where damaged blobs are moved, for an operator to inspect; never read by the service.
const QUARANTINE_PREFIX: &str = "quarantine/sha256";
/// Where pushes to an object store write their content, which stays there (see the module
/// documentation).
const PUSHED_PREFIX: &str = "blobs/pushed";

/// What became of a finished upload (or small content) offered as a blob.
pub enum Promoted {
    /// Intact content was already stored; the upload is discarded.
    Deduplicated,
    /// The content is at its content address (local directory: renamed there).
    AtAddress,
    /// The content is in an object of its own that becomes the blob's location once the
    /// database names it ([`TempBlob::key`]); [`TempBlob::keep`] then, or drop it to delete
    /// the object.
    Unclaimed(TempBlob),
}

#[derive(Debug, Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    local: Option<Arc<LocalFileSystem>>,
    fsync: bool,
    /// Aligned blocks for direct writes of durable local uploads; `None`: every upload is
    /// written through the page cache (see `direct`).
    direct: Option<Arc<direct::BlockPool>>,
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
                direct: None,
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
                direct: None,
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
        std::fs::create_dir_all(Path::new(dir).join("uploads"))
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
            direct: None,
        })
    }

    /// Writes durable uploads to a local directory with `O_DIRECT`, past the page cache (see
    /// `direct`), when `on`; a store without fsync or not local ignores it.
    pub fn with_direct_writes(mut self, on: bool) -> Self {
        self.direct = (on && self.fsync && self.local.is_some()).then(direct::BlockPool::new);
        self
    }

    /// Starts a temporary upload. Dropping the returned [`Upload`] without `finish` removes
    /// whatever was written, so a cancelled push leaves nothing behind.
    pub async fn begin_upload(&self, upload_id: &str) -> Result<Upload, Error> {
        let key = match self.local {
            Some(_) => upload_key(upload_id),
            None => pushed_key(upload_id),
        };
        let sink = match &self.local {
            Some(local) => {
                let path = local.path_to_filesystem(&key).map_err(Error::blob_store)?;
                UploadSink::Local(LocalWriter::create(path, self.fsync, self.direct.clone()).await?)
            }
            None => {
                let upload = self
                    .store
                    .put_multipart(&key)
                    .await
                    .map_err(Error::blob_store)?;
                UploadSink::Multipart(
                    PartUpload(Some(WriteMultipart::new_with_chunk_size(
                        upload,
                        MULTIPART_PART_BYTES,
                    ))),
                    Stage::new(Hasher::new()),
                )
            }
        };
        Ok(Upload {
            sink: Some(sink),
            temp: TempBlob {
                store: self.clone(),
                key,
                armed: true,
            },
        })
    }

    /// Offers a finished upload of `size` bytes as blob `sha256`, whose content is stored at
    /// `location` (its row's; `None`: the content address) if anywhere. Intact content there
    /// wins (the upload is discarded: deduplicated); content that fails verification is
    /// quarantined. Otherwise a local upload is renamed to the content address, and an
    /// object-store upload stays where it is, for the caller to claim as the location.
    pub async fn promote(
        &self,
        mut temp: TempBlob,
        sha256: &Sha256,
        size: u64,
        location: Option<&str>,
    ) -> Result<Promoted, Error> {
        let key = blob_key(sha256);
        let Some(local) = &self.local else {
            if self
                .remote_intact(&stored_key(sha256, location), sha256, size)
                .await?
            {
                return Ok(Promoted::Deduplicated); // `temp` deletes the upload when dropped
            }
            return Ok(Promoted::Unclaimed(temp));
        };
        let source = local
            .path_to_filesystem(&temp.key)
            .map_err(Error::blob_store)?;
        let target = local.path_to_filesystem(&key).map_err(Error::blob_store)?;
        let quarantine = self.quarantine_path(local, sha256)?;
        let (fsync, digest) = (self.fsync, sha256.clone());
        let deduplicated = blocking(move || {
            if local_intact(&target, &digest, size, !fsync, &quarantine)? {
                return Ok(true);
            }
            rename_durably(&source, &target, fsync)?;
            Ok(false)
        })
        .await?;
        if deduplicated {
            return Ok(Promoted::Deduplicated);
        }
        temp.armed = false;
        Ok(Promoted::AtAddress)
    }

    /// Stores a small blob held in memory in one step: written to a temporary upload and
    /// renamed to its content address (one blocking task on a local directory), or put
    /// directly as an object of its own to claim (object stores make a single PUT appear
    /// atomically), unless intact content is already stored at `location` (as in
    /// [`BlobStore::promote`]).
    pub async fn put_small(
        &self,
        upload_id: &str,
        data: Bytes,
        sha256: &Sha256,
        location: Option<&str>,
    ) -> Result<Promoted, Error> {
        let key = blob_key(sha256);
        let size = data.len() as u64;
        let Some(local) = &self.local else {
            if self
                .remote_intact(&stored_key(sha256, location), sha256, size)
                .await?
            {
                return Ok(Promoted::Deduplicated);
            }
            let key = pushed_key(upload_id);
            self.store
                .put(&key, data.into())
                .await
                .map_err(Error::blob_store)?;
            return Ok(Promoted::Unclaimed(TempBlob {
                store: self.clone(),
                key,
                armed: true,
            }));
        };
        let temp = local
            .path_to_filesystem(&upload_key(upload_id))
            .map_err(Error::blob_store)?;
        let target = local.path_to_filesystem(&key).map_err(Error::blob_store)?;
        let quarantine = self.quarantine_path(local, sha256)?;
        let (fsync, digest) = (self.fsync, sha256.clone());
        blocking(move || {
            if local_intact(&target, &digest, size, !fsync, &quarantine)? {
                return Ok(true);
            }
            let written = (|| {
                let mut file = std::fs::File::create(&temp)?;
                file.write_all(&data)?;
                if fsync {
                    file.sync_data()?;
                }
                rename_durably(&temp, &target, fsync)
            })();
            if written.is_err() {
                let _ = std::fs::remove_file(&temp);
            }
            written.map(|()| false)
        })
        .await
        .map(|deduplicated| match deduplicated {
            true => Promoted::Deduplicated,
            false => Promoted::AtAddress,
        })
    }

    /// Streams `range` of a blob stored at `location` (`None`: its content address): chunks
    /// of 64 KiB growing to [`READ_CHUNK_BYTES`] on a local directory; one ranged GET from an
    /// object store, its body's buffers passed on uncopied in chunks of at most
    /// [`READ_CHUNK_BYTES`] (see `object_read`). A blob that is missing,
    /// or shorter than `range`, is [`Error::DataLoss`] (up front when that is already
    /// visible).
    pub async fn read(
        &self,
        sha256: &Sha256,
        location: Option<&str>,
        range: Range<u64>,
    ) -> Result<BoxStream<'static, Result<Bytes, Error>>, Error> {
        if range.is_empty() {
            return Ok(stream::empty().boxed());
        }
        let key = stored_key(sha256, location);
        if let Some(local) = &self.local {
            let path = local.path_to_filesystem(&key).map_err(Error::blob_store)?;
            let digest = sha256.clone();
            let end = range.end;
            // Opening on the pool (not on a runtime thread) and checking the length first
            // turns a missing or truncated blob into DATA_LOSS before any byte is sent.
            let file = tokio::task::spawn_blocking(move || {
                let file = std::fs::File::open(&path)?;
                let len = file.metadata()?.len();
                if len < end {
                    return Err(short_blob(&digest, len, end));
                }
                Ok(file)
            })
            .await
            .map_err(|e| Error::Internal(format!("blob open task failed: {e}")))?
            .map_err(|e| io_read_error(sha256, e))?;
            return Ok(LocalRead::new(file, sha256.clone(), range).boxed());
        }
        Ok(object_read::read(&*self.store, &key, sha256, range)
            .await?
            .boxed())
    }

    /// Whether a blob's content is stored at `location` (`None`: its content address), for
    /// tests.
    pub async fn contains(&self, sha256: &Sha256, location: Option<&str>) -> Result<bool, Error> {
        self.object_exists(stored_key(sha256, location).as_ref())
            .await
    }

    /// Whether the object `key` exists (a blob's location, before a push's claim of it
    /// commits).
    pub async fn object_exists(&self, key: &str) -> Result<bool, Error> {
        match self.store.head(&ObjectPath::from(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(Error::blob_store(e)),
        }
    }

    /// Whether this is a local directory, where every blob is at its content address.
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// Keys of uploads in progress or abandoned (for tests and the sweeper).
    pub async fn list_uploads(&self) -> Result<Vec<String>, Error> {
        self.list(&ObjectPath::from("uploads")).await
    }

    /// Deletes the stored content of `blobs`, each at its location (`None`: its content
    /// address) (the sweeper, under its collection lock). Content already gone is no error.
    /// A local directory deletes on the blocking pool; an object store in bulk requests
    /// where it supports them.
    pub async fn delete_blobs(&self, blobs: &[(Sha256, Option<String>)]) -> Result<(), Error> {
        if blobs.is_empty() {
            return Ok(());
        }
        if let Some(local) = &self.local {
            let paths = blobs
                .iter()
                .map(|(sha256, location)| {
                    local.path_to_filesystem(&stored_key(sha256, location.as_deref()))
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(Error::blob_store)?;
            return blocking(move || {
                for path in paths {
                    match std::fs::remove_file(&path) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
                Ok(())
            })
            .await;
        }
        let keys: Vec<object_store::Result<ObjectPath>> = blobs
            .iter()
            .map(|(sha256, location)| Ok(stored_key(sha256, location.as_deref())))
            .collect();
        let keys = stream::iter(keys).boxed();
        let mut deleted = self.store.delete_stream(keys);
        while let Some(result) = deleted.next().await {
            match result {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(Error::blob_store(e)),
            }
        }
        Ok(())
    }

    /// Every blob in the store, as (digest, size); keys that are not a blob address are
    /// skipped. For the sweeper's search for orphans.
    pub fn list_blobs(&self) -> BoxStream<'_, Result<(Sha256, i64), Error>> {
        self.store
            .list(Some(&ObjectPath::from("blobs/sha256")))
            .filter_map(|meta| async move {
                match meta {
                    Err(e) => Some(Err(Error::blob_store(e))),
                    Ok(meta) => {
                        let name = meta.location.filename()?;
                        let sha256 = Sha256::parse("key", name).ok()?;
                        (meta.location == blob_key(&sha256))
                            .then_some(Ok((sha256, meta.size as i64)))
                    }
                }
            })
            .boxed()
    }

    /// Removes temporary uploads last written before `before` (abandoned by a crash or a
    /// lost client); an upload in progress is written to at least every stream idle
    /// timeout, so a cut-off older than that spares it. Returns how many went and their
    /// bytes.
    pub async fn remove_uploads_before(
        &self,
        before: std::time::SystemTime,
    ) -> Result<(u64, u64), Error> {
        let mut stale = Vec::new();
        let mut listing = self.store.list(Some(&ObjectPath::from("uploads")));
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(Error::blob_store)?;
            if std::time::SystemTime::from(meta.last_modified) < before {
                stale.push((meta.location, meta.size));
            }
        }
        let (mut removed, mut bytes) = (0, 0);
        for (location, size) in stale {
            match self.store.delete(&location).await {
                Ok(()) => {
                    removed += 1;
                    bytes += size;
                }
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(Error::blob_store(e)),
            }
        }
        Ok((removed, bytes))
    }

    /// Keys of pushed objects (see the module documentation) last modified before `before`:
    /// those no blob names as its location were abandoned by a push that died before its
    /// claim. Ages are the store's own modification times, as for uploads.
    pub fn pushed_before(
        &self,
        before: std::time::SystemTime,
    ) -> BoxStream<'_, Result<String, Error>> {
        self.store
            .list(Some(&ObjectPath::from(PUSHED_PREFIX)))
            .filter_map(move |meta| async move {
                match meta {
                    Err(e) => Some(Err(Error::blob_store(e))),
                    Ok(meta) => (std::time::SystemTime::from(meta.last_modified) < before)
                        .then(|| Ok(meta.location.to_string())),
                }
            })
            .boxed()
    }

    /// Deletes the object `key`; one already gone is no error.
    pub async fn delete_object(&self, key: &str) -> Result<(), Error> {
        match self.store.delete(&ObjectPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::blob_store(e)),
        }
    }

    /// Keys of quarantined blobs (for tests and operators).
    pub async fn list_quarantined(&self) -> Result<Vec<String>, Error> {
        self.list(&ObjectPath::from(QUARANTINE_PREFIX)).await
    }

    async fn list(&self, prefix: &ObjectPath) -> Result<Vec<String>, Error> {
        let mut keys = Vec::new();
        let mut listing = self.store.list(Some(prefix));
        while let Some(meta) = listing.next().await {
            keys.push(meta.map_err(Error::blob_store)?.location.to_string());
        }
        Ok(keys)
    }

    /// A fresh quarantine location for a damaged blob (several may be found over time).
    fn quarantine_path(&self, local: &LocalFileSystem, sha256: &Sha256) -> Result<PathBuf, Error> {
        local
            .path_to_filesystem(&quarantine_key(sha256))
            .map_err(Error::blob_store)
    }

    /// Whether an object store holds intact content at `key`. A single PUT or a completed
    /// multipart upload appears atomically there, so the size is the check that matters; a
    /// wrong size is quarantined (copied aside, then deleted) so the caller replaces it.
    async fn remote_intact(
        &self,
        key: &ObjectPath,
        sha256: &Sha256,
        size: u64,
    ) -> Result<bool, Error> {
        let meta = match self.store.head(key).await {
            Ok(meta) => meta,
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(Error::blob_store(e)),
        };
        if meta.size == size {
            return Ok(true);
        }
        tracing::warn!(
            sha256 = %sha256,
            found = meta.size,
            expected = size,
            "damaged blob quarantined and replaced"
        );
        self.store
            .copy(key, &quarantine_key(sha256))
            .await
            .map_err(Error::blob_store)?;
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(Error::blob_store(e)),
        }
    }
}

fn upload_key(upload_id: &str) -> ObjectPath {
    ObjectPath::from(format!("uploads/{upload_id}"))
}

fn pushed_key(upload_id: &str) -> ObjectPath {
    ObjectPath::from(format!("{PUSHED_PREFIX}/{upload_id}"))
}

/// Where a blob's bytes are: its recorded location, or else its content address.
fn stored_key(sha256: &Sha256, location: Option<&str>) -> ObjectPath {
    location.map_or_else(|| blob_key(sha256), ObjectPath::from)
}

fn blob_key(sha256: &Sha256) -> ObjectPath {
    let hex = sha256.as_str();
    ObjectPath::from(format!("blobs/sha256/{}/{}/{hex}", &hex[0..2], &hex[2..4]))
}

fn quarantine_key(sha256: &Sha256) -> ObjectPath {
    ObjectPath::from(format!(
        "{QUARANTINE_PREFIX}/{}.{}",
        sha256.as_str(),
        uuid::Uuid::new_v4().simple()
    ))
}

/// Runs bounded file work on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Internal(format!("blob file task failed: {e}")))?
        .map_err(Error::blob_store)
}

/// The error of a blob file that is shorter than an artifact needs.
fn short_blob(sha256: &Sha256, len: u64, needed: u64) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        format!("blob {sha256} holds {len} bytes, its artifact needs {needed}"),
    )
}

/// A local read failure: a missing or short file is lost data; anything else (permissions,
/// I/O errors, a full descriptor table) is the store being unavailable.
fn io_read_error(sha256: &Sha256, err: std::io::Error) -> Error {
    match err.kind() {
        std::io::ErrorKind::NotFound => Error::DataLoss(format!("blob {sha256} is missing: {err}")),
        std::io::ErrorKind::UnexpectedEof => Error::DataLoss(err.to_string()),
        _ => Error::blob_store(err),
    }
}

/// Whether `target` holds the blob `sha256` of `size` bytes. A file of the wrong size, or
/// (with `check_digest`) the wrong content, is moved to `quarantine` and `false` returned,
/// so the caller puts good content in its place.
fn local_intact(
    target: &Path,
    sha256: &Sha256,
    size: u64,
    check_digest: bool,
    quarantine: &Path,
) -> std::io::Result<bool> {
    let found = match std::fs::metadata(target) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let damage = if found != size {
        Some(format!("{found} bytes, expected {size}"))
    } else if check_digest {
        let mut hasher = Hasher::new();
        match std::fs::File::open(target) {
            Ok(mut file) => {
                std::io::copy(&mut file, &mut hasher)?;
            }
            // Replaced or quarantined by a concurrent push since the metadata call.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
        let digest = hasher.finish();
        (digest != *sha256).then(|| format!("content hashes to {digest}"))
    } else {
        None
    };
    let Some(damage) = damage else {
        return Ok(true);
    };
    tracing::warn!(sha256 = %sha256, %damage, "damaged blob quarantined and replaced");
    if let Some(dir) = quarantine.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::rename(target, quarantine) {
        Ok(()) => Ok(false),
        // A concurrent push quarantined it first.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Renames `source` to `target`, creating `target`'s missing directories. With `fsync`, every
/// directory created is fsynced into its parent and the rename into `target`'s directory, so
/// the blob's whole path survives a crash once this returns.
fn rename_durably(source: &Path, target: &Path, fsync: bool) -> std::io::Result<()> {
    // Most pushes land in an existing directory: try the rename first.
    match std::fs::rename(source, target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && source.exists() => {
            if let Some(dir) = target.parent() {
                create_dirs_durably(dir, fsync)?;
            }
            std::fs::rename(source, target)?;
        }
        other => other?,
    }
    if fsync && let Some(dir) = target.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// `create_dir_all` that (with `fsync`) fsyncs the parent of each directory it creates, top
/// down, so no new directory entry on the path is lost in a crash. A directory another task
/// created meanwhile is synced too: its creator may not have got that far yet.
fn create_dirs_durably(dir: &Path, fsync: bool) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut next = Some(dir);
    while let Some(candidate) = next {
        if candidate.is_dir() {
            break;
        }
        missing.push(candidate);
        next = candidate.parent();
    }
    for created in missing.into_iter().rev() {
        match std::fs::create_dir(created) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if fsync && let Some(parent) = created.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// An upload being written.
pub struct Upload {
    /// `None` once finished.
    sink: Option<UploadSink>,
    temp: TempBlob,
}

enum UploadSink {
    /// Hashes and writes a local file, each on a pipeline stage of its own.
    Local(LocalWriter),
    /// Parts go to the object store; hashing runs alongside on a pipeline stage.
    Multipart(PartUpload, Stage<Hasher>),
}

impl Upload {
    /// Appends a chunk: hands it to the hash and the write (or part upload) and returns
    /// once both have room for it, so a push holds a bounded amount of payload in flight
    /// (backpressure; see `pipeline`).
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), Error> {
        match &mut self.sink {
            Some(UploadSink::Local(writer)) => writer.write(chunk).await,
            Some(UploadSink::Multipart(PartUpload(Some(upload)), hasher)) => {
                hasher.submit(chunk.clone()).await?;
                upload
                    .wait_for_capacity(MULTIPART_PARTS_IN_FLIGHT)
                    .await
                    .map_err(Error::blob_store)?;
                upload.put(chunk);
                Ok(())
            }
            _ => Err(Error::Internal("upload already finished".into())),
        }
    }

    /// Completes the upload and returns the content's SHA-256 with the bytes, durable
    /// (fsync on local disks when enabled) under the temporary key the [`TempBlob`] owns.
    pub async fn finish(mut self) -> Result<(TempBlob, Sha256), Error> {
        let digest = match self.sink.take() {
            Some(UploadSink::Local(writer)) => writer.finish().await?,
            Some(UploadSink::Multipart(mut upload, hasher)) => {
                let digest = hasher.finish().await?.finish();
                if let Some(upload) = upload.0.take() {
                    upload.finish().await.map_err(Error::blob_store)?;
                }
                digest
            }
            None => return Err(Error::Internal("upload already finished".into())),
        };
        Ok((self.temp.take(), digest))
    }
}

/// A multipart upload that is aborted when dropped unfinished, so the store drops its parts.
struct PartUpload(Option<WriteMultipart>);

impl Drop for PartUpload {
    fn drop(&mut self) {
        // Needs a runtime, which every caller of this module runs in; without one there is
        // nothing to clean anyway.
        if let (Some(upload), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(async move {
                let _ = upload.abort().await;
            });
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
    /// The object's key, to record as a blob's location.
    pub fn key(&self) -> String {
        self.key.to_string()
    }

    /// Keeps the object: a blob's row names it now.
    pub fn keep(mut self) {
        self.armed = false;
    }

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
            // A chunk task still writing keeps the unlinked inode until it closes the file.
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

/// Writes an upload to a local file while hashing it: the two are stages of a pipeline
/// (see `pipeline`), so receiving, hashing and writing overlap. The file is created before
/// the first chunk, so whoever drops the upload finds a file to remove.
struct LocalWriter {
    file: Arc<std::fs::File>,
    hash: Stage<Hasher>,
    write: Stage<DiskWriter>,
    fsync: bool,
}

impl LocalWriter {
    /// `direct`: the store's blocks for direct writes, if it makes them (fsync on).
    async fn create(
        path: PathBuf,
        fsync: bool,
        direct: Option<Arc<direct::BlockPool>>,
    ) -> Result<Self, Error> {
        // A block first: an upload the pool cannot lend one to is written through the page
        // cache, and so is one whose filesystem refuses O_DIRECT (the block goes back).
        let block = direct.and_then(|pool| pool.lend());
        let want_direct = block.is_some();
        let (file, is_direct) = blocking(move || match direct::create(&path, want_direct) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                direct::create(&path, want_direct)
            }
            other => other,
        })
        .await?;
        let file = Arc::new(file);
        let writer = match block.filter(|_| is_direct) {
            Some(block) => DiskWriter::Direct(direct::DirectWriter::new(file.clone(), block)),
            None => DiskWriter::Buffered(FileWriter::new(file.clone(), fsync)),
        };
        Ok(Self {
            hash: Stage::new(Hasher::new()),
            write: Stage::new(writer),
            file,
            fsync,
        })
    }

    async fn write(&mut self, chunk: Bytes) -> Result<(), Error> {
        self.hash.submit(chunk.clone()).await?;
        self.write.submit(chunk).await
    }

    async fn finish(self) -> Result<Sha256, Error> {
        let mut write = self.write;
        write.flushed().await?;
        drop(write.finish().await?);
        if self.fsync {
            sync_data(self.file.clone()).await?;
        }
        Ok(self.hash.finish().await?.finish())
    }
}

/// The write stage of a local upload: through the page cache, or direct (see `direct`).
enum DiskWriter {
    Buffered(FileWriter),
    Direct(direct::DirectWriter),
}

impl pipeline::Work for DiskWriter {
    fn chunk(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Buffered(writer) => pipeline::Work::chunk(writer, chunk),
            Self::Direct(writer) => pipeline::Work::chunk(writer, chunk),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Buffered(_) => Ok(()),
            Self::Direct(writer) => pipeline::Work::flush(writer),
        }
    }
}

/// `fdatasync` on the blocking pool; a full disk surfaces here too (delayed allocation).
async fn sync_data(file: Arc<std::fs::File>) -> Result<(), Error> {
    tokio::task::spawn_blocking(move || file.sync_data())
        .await
        .map_err(|e| Error::Internal(format!("blob file task failed: {e}")))?
        .map_err(|e| pipeline::write_error(e.kind(), &e.to_string()))
}

/// The write stage of a local upload: appends each chunk to the file. With fsync on, every
/// [`FLUSH_STEP_BYTES`] written it starts writing that step back to disk
/// (`sync_file_range`) and first waits for the step before it, so the disk works while the
/// push streams, at most two steps are left for the `fdatasync` before commit, and a push
/// writing faster than the disk is held back here (the queue's backpressure) rather than
/// piling up dirty pages. Unlike an `fdatasync` per step, this commits no journal
/// transaction and costs the stage's thread only the wait.
struct FileWriter {
    file: Arc<std::fs::File>,
    flush: bool,
    /// Bytes written so far; writeback has been started below `started` and is known done
    /// below `waited`.
    written: u64,
    started: u64,
    waited: u64,
}

impl FileWriter {
    fn new(file: Arc<std::fs::File>, fsync: bool) -> Self {
        Self {
            file,
            flush: fsync,
            written: 0,
            started: 0,
            waited: 0,
        }
    }
}

impl pipeline::Work for FileWriter {
    fn chunk(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        (&*self.file).write_all(chunk)?;
        self.written += chunk.len() as u64;
        if !self.flush || self.written - self.started < FLUSH_STEP_BYTES {
            return Ok(());
        }
        if self.started > self.waited {
            pagecache::wait_writeback(&self.file, self.waited, self.started - self.waited)?;
            self.waited = self.started;
        }
        pagecache::start_writeback(&self.file, self.started, self.written - self.started)?;
        self.started = self.written;
        Ok(())
    }
}

/// Reads `range` of an open local file in chunks: the first is [`FIRST_READ_CHUNK_BYTES`] and
/// each next one twice as large up to [`READ_CHUNK_BYTES`]. What the page cache already holds
/// is read at once on the polling thread, without waiting for the disk (a warm blob never
/// leaves the runtime: no blocking-pool task and wake-up per chunk); a chunk the cache does
/// not hold whole is finished on a blocking-pool task. Nothing is read ahead on the pool:
/// the kernel's read-ahead keeps ahead of a cold blob, and the next chunk is tried from the
/// cache again. A consumer that stops polling leaves at most the one chunk being read, and
/// no thread waiting on it.
struct LocalRead {
    file: Arc<std::fs::File>,
    sha256: Sha256,
    next: u64,
    end: u64,
    chunk: usize,
    reading: Option<JoinHandle<std::io::Result<Vec<u8>>>>,
    done: bool,
}

impl LocalRead {
    fn new(file: std::fs::File, sha256: Sha256, range: Range<u64>) -> Self {
        Self {
            file: Arc::new(file),
            sha256,
            next: range.start,
            end: range.end,
            chunk: FIRST_READ_CHUNK_BYTES,
            reading: None,
            done: false,
        }
    }

    fn want(&self) -> usize {
        // The chunk is at most READ_CHUNK_BYTES, so the minimum fits a usize.
        (self.end - self.next).min(self.chunk as u64) as usize
    }

    /// The next chunk straight from the page cache: `Ok(Err(buf))` with what it held when it
    /// did not hold the whole chunk (or nothing), for [`Self::start`] to finish.
    fn read_cached(&self) -> std::io::Result<Result<Vec<u8>, Vec<u8>>> {
        let want = self.want();
        let mut buf = Vec::with_capacity(want);
        while buf.len() < want {
            let (at, rest) = (self.next + buf.len() as u64, want - buf.len());
            match pagecache::read_cached(&self.file, at, &mut buf, rest)? {
                Some(0) => return Err(short_blob(&self.sha256, at, self.next + want as u64)),
                Some(_) => {}
                None => return Ok(Err(buf)),
            }
        }
        Ok(Ok(buf))
    }

    /// Starts reading the rest of the next chunk on the pool, after the `buf` already read.
    /// The chunk's position is `self.next`, which only moves when the chunk comes back, so
    /// reads are strictly sequential.
    fn start(&mut self, mut buf: Vec<u8>) {
        let want = self.want();
        let (file, offset, sha256) = (self.file.clone(), self.next, self.sha256.clone());
        self.reading = Some(tokio::task::spawn_blocking(move || {
            let mut file = &*file;
            let at = offset + buf.len() as u64;
            file.seek(SeekFrom::Start(at))?;
            // read_to_end fills spare capacity without zeroing it first.
            file.take((want - buf.len()) as u64).read_to_end(&mut buf)?;
            if buf.len() < want {
                return Err(short_blob(
                    &sha256,
                    offset + buf.len() as u64,
                    offset + want as u64,
                ));
            }
            Ok(buf)
        }));
    }

    fn fail(&mut self, error: Error) -> Poll<Option<Result<Bytes, Error>>> {
        self.done = true;
        Poll::Ready(Some(Err(error)))
    }

    /// Moves past a chunk read whole and hands it on.
    fn deliver(&mut self, buf: Vec<u8>) -> Poll<Option<Result<Bytes, Error>>> {
        self.next += buf.len() as u64;
        self.chunk = (self.chunk * 2).min(READ_CHUNK_BYTES);
        Poll::Ready(Some(Ok(Bytes::from(buf))))
    }
}

impl Stream for LocalRead {
    type Item = Result<Bytes, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.reading.is_none() {
            if self.next >= self.end {
                self.done = true;
                return Poll::Ready(None);
            }
            match self.read_cached() {
                Ok(Ok(buf)) => return self.deliver(buf),
                Ok(Err(partial)) => self.start(partial),
                Err(e) => {
                    let error = io_read_error(&self.sha256, e);
                    return self.fail(error);
                }
            }
        }
        let Some(reading) = self.reading.as_mut() else {
            return Poll::Ready(None);
        };
        let read = std::task::ready!(Pin::new(reading).poll(cx));
        self.reading = None;
        match read {
            Ok(Ok(buf)) => self.deliver(buf),
            Ok(Err(e)) => {
                let error = io_read_error(&self.sha256, e);
                self.fail(error)
            }
            Err(e) => self.fail(Error::Internal(format!("blob read task failed: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(data: &[u8]) -> Sha256 {
        Hasher::digest(data)
    }

    async fn pushed(store: &BlobStore, before: std::time::SystemTime) -> Vec<String> {
        store
            .pushed_before(before)
            .map(Result::unwrap)
            .collect()
            .await
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
        assert_eq!(digest, sha, "the upload hashes what it writes");
        // A local upload moves to the content address; an object stays where it was written
        // and becomes the blob's location.
        let location = match store.promote(temp, &sha, data.len() as u64, None).await {
            Ok(Promoted::AtAddress) if store.is_local() => None,
            Ok(Promoted::Unclaimed(temp)) if !store.is_local() => {
                let key = temp.key();
                temp.keep();
                Some(key)
            }
            _ => panic!("new content is stored"),
        };
        let key = stored_key(&sha, location.as_deref()).to_string();
        assert!(store.object_exists(&key).await.unwrap());

        let chunks: Vec<Bytes> = store
            .read(&sha, location.as_deref(), 5..data.len() as u64)
            .await
            .unwrap()
            .map(|c| c.unwrap())
            .collect()
            .await;
        assert!(
            chunks
                .iter()
                .all(|c| (1..=READ_CHUNK_BYTES).contains(&c.len())),
            "{:?}",
            chunks.iter().map(Bytes::len).collect::<Vec<_>>()
        );
        assert_eq!(chunks.concat(), &data[5..]);

        // The same content again is deduplicated and its upload removed.
        let mut again = store.begin_upload("u2").await.unwrap();
        again.write(Bytes::from(data.clone())).await.unwrap();
        let (temp, _) = again.finish().await.unwrap();
        assert!(matches!(
            store
                .promote(temp, &sha, data.len() as u64, location.as_deref())
                .await,
            Ok(Promoted::Deduplicated)
        ));
        tokio::task::yield_now().await;
        // An abandoned upload leaves nothing.
        let mut abandoned = store.begin_upload("u3").await.unwrap();
        abandoned
            .write(Bytes::from_static(b"partial"))
            .await
            .unwrap();
        drop(abandoned);
        // Nothing stays but the blob: no upload, and no pushed object but its location.
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
        for _ in 0..100 {
            if store.list_uploads().await.unwrap().is_empty()
                && pushed(store, later).await == Vec::from_iter(location.clone())
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!(
            "uploads left behind: {:?} {:?}",
            store.list_uploads().await,
            pushed(store, later).await
        );
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

    async fn read_all(
        store: &BlobStore,
        sha: &Sha256,
        key: &str,
        range: Range<u64>,
    ) -> (Vec<u8>, Result<(), Error>) {
        let mut stream = match store.read(sha, Some(key), range).await {
            Ok(stream) => stream,
            Err(e) => return (Vec::new(), Err(e)),
        };
        let mut got = Vec::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => {
                    assert!(
                        (1..=READ_CHUNK_BYTES).contains(&chunk.len()),
                        "{}",
                        chunk.len()
                    );
                    got.extend_from_slice(&chunk);
                }
                Err(e) => return (got, Err(e)),
            }
        }
        (got, Ok(()))
    }

    /// An object-store read returns exactly its range in chunks of at most
    /// [`READ_CHUNK_BYTES`]; an object cut short before the read is DATA_LOSS up front (also
    /// when the range starts past its end), and a missing one is DATA_LOSS.
    #[tokio::test]
    async fn object_store_reads_report_lost_bytes_up_front() {
        let store = BlobStore::open("memory://", false).unwrap();
        let data: Vec<u8> = (0..(3 * READ_CHUNK_BYTES + 5))
            .map(|i| (i % 251) as u8)
            .collect();
        let sha = digest(&data);
        let key = "blobs/pushed/whole";
        let put = |bytes: &[u8]| {
            let payload = object_store::PutPayload::from(bytes.to_vec());
            let store = store.store.clone();
            async move { store.put(&ObjectPath::from(key), payload).await.unwrap() }
        };
        put(&data).await;
        let len = data.len();
        for range in [0..len, 1..READ_CHUNK_BYTES + 1, len - 1..len] {
            let (got, end) =
                read_all(&store, &sha, key, range.start as u64..range.end as u64).await;
            assert!(end.is_ok(), "{range:?}: {end:?}");
            assert!(got == data[range.clone()], "{range:?}");
        }

        put(&data[..len / 2]).await;
        for range in [0..len as u64, len as u64 - 10..len as u64] {
            let (got, end) = read_all(&store, &sha, key, range.clone()).await;
            assert!(matches!(end, Err(Error::DataLoss(_))), "{range:?}: {end:?}");
            assert!(got.is_empty(), "{range:?}: refused before any byte");
        }
        // A range inside what is left is still served.
        let (got, end) = read_all(&store, &sha, key, 5..100).await;
        assert!(end.is_ok() && got == data[5..100]);

        store.store.delete(&ObjectPath::from(key)).await.unwrap();
        let (_, end) = read_all(&store, &sha, key, 0..len as u64).await;
        assert!(matches!(end, Err(Error::DataLoss(_))), "{end:?}");
    }

    /// An S3 store at `endpoint` that does not retry (object_store retries 5xx and
    /// connection errors with backoff for up to three minutes by default).
    fn s3_without_retries(endpoint: &str) -> BlobStore {
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .with_bucket_name("b")
            .with_region("us-east-1")
            .with_access_key_id("k")
            .with_secret_access_key("s")
            .with_retry(object_store::RetryConfig {
                max_retries: 0,
                ..Default::default()
            })
            .build()
            .unwrap();
        BlobStore {
            store: Arc::new(s3),
            local: None,
            fsync: false,
            direct: None,
        }
    }

    fn is_unavailable(result: Result<impl Sized, Error>) -> bool {
        matches!(result, Err(Error::Unavailable { .. }))
    }

    #[tokio::test]
    async fn s3_throttling_and_connection_errors_are_unavailable() {
        // An S3 endpoint that throttles every request, as S3 does with 503 SlowDown.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let throttling = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let body = "<Error><Code>SlowDown</Code><Message>Please reduce your request \
                        rate.</Message></Error>";
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut request = [0u8; 4096];
                let _ = tcp.read(&mut request).await;
                let reply = format!(
                    "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(reply.as_bytes()).await;
            }
        });
        // And one where nothing listens.
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", listener.local_addr().unwrap())
        };
        let sha = digest(b"content");
        for endpoint in [throttling, closed] {
            let store = s3_without_retries(&endpoint);
            assert!(
                is_unavailable(store.read(&sha, None, 0..7).await),
                "{endpoint}"
            );
            assert!(is_unavailable(store.begin_upload("u").await), "{endpoint}");
            assert!(
                is_unavailable(store.object_exists("blobs/pushed/u").await),
                "{endpoint}"
            );
            assert!(
                is_unavailable(
                    store
                        .put_small("u", Bytes::from_static(b"content"), &sha, None)
                        .await
                ),
                "{endpoint}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_uploads_store_and_hash_every_chunking() {
        let dir = tempfile::tempdir().unwrap();
        for fsync in [false, true] {
            let store =
                BlobStore::open(&format!("file://{}", dir.path().display()), fsync).unwrap();
            let chunk = 256 * 1024;
            for (i, (len, cut)) in [
                (0, chunk),              // empty
                (chunk, chunk),          // exactly one chunk
                (chunk + 1, chunk),      // one byte into a second
                (3 * chunk - 1, 65_537), // odd sizes
                (40 << 20, 1024 * 1024), // past several writeback steps (fsync on)
            ]
            .into_iter()
            .enumerate()
            {
                let data: Vec<u8> = (0..len).map(|b| (b * 7 % 253) as u8).collect();
                let data = Bytes::from(data);
                let mut upload = store.begin_upload(&format!("odd{i}")).await.unwrap();
                let mut at = 0;
                while at < len {
                    let part = data.slice(at..(at + cut).min(len));
                    at += part.len();
                    upload.write(part).await.unwrap();
                }
                let (temp, sha) = upload.finish().await.unwrap();
                assert_eq!(sha, digest(&data), "{len} bytes in {cut}-byte chunks");
                let path = dir.path().join(temp.key());
                assert_eq!(std::fs::read(&path).unwrap(), data, "{len} bytes");
                drop(temp);
                assert!(!path.exists(), "an unpromoted upload is removed");
            }
        }
    }

    /// The error an upload into `path` ends with: the first refused write of 64 × 256 KiB,
    /// else its finish (which must fail).
    async fn first_write_error(
        path: &str,
        fsync: bool,
        direct: Option<Arc<direct::BlockPool>>,
    ) -> Error {
        let mut writer = LocalWriter::create(PathBuf::from(path), fsync, direct)
            .await
            .unwrap();
        for _ in 0..64 {
            if let Err(e) = writer.write(Bytes::from(vec![1u8; 256 * 1024])).await {
                return e;
            }
        }
        writer.finish().await.unwrap_err()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_disk_fails_the_upload_as_resource_exhausted() {
        // /dev/full fails every write with ENOSPC, as a full filesystem does.
        // (Anyone may open it for writing; opening truncates nothing.)
        // Through the page cache, and with direct writes (durable uploads).
        for (fsync, direct) in [(false, None), (true, Some(direct::BlockPool::new()))] {
            let err = first_write_error("/dev/full", fsync, direct).await;
            assert!(
                matches!(&err, Error::ResourceExhausted(m) if m.contains("out of space")),
                "fsync {fsync}: {err:?}"
            );
            assert_eq!(
                tonic::Status::from(err).code(),
                tonic::Code::ResourceExhausted
            );
        }
    }

    fn first_page_cached(path: &Path) -> bool {
        pagecache::first_page_cached(path).unwrap()
    }

    /// Whether the filesystem of `dir` opens files with `O_DIRECT`.
    fn takes_direct_io(dir: &Path) -> bool {
        let (_, direct) = direct::create(&dir.join("probe"), true).unwrap();
        std::fs::remove_file(dir.join("probe")).unwrap();
        direct
    }

    /// A durable store in `dir` that writes directly, and whether the filesystem there takes
    /// `O_DIRECT` (else only the fallback is under test).
    fn direct_store(dir: &Path) -> (BlobStore, bool) {
        let store = BlobStore::open(&format!("file://{}", dir.display()), true)
            .unwrap()
            .with_direct_writes(true);
        (store, takes_direct_io(dir))
    }

    /// Waits (up to a second) until the pool lends at most `lent` blocks: a dropped upload's
    /// stage lets go of its writer, and so of its block, a moment after the drop.
    async fn await_lent(pool: &direct::BlockPool, lent: usize) {
        for _ in 0..200 {
            if pool.lent() <= lent {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Durable uploads written with `O_DIRECT` store every size and chunking byte for byte
    /// (whole blocks, an aligned tail, an odd tail, empty) and leave the page cache alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_uploads_store_every_size_past_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let (store, direct_io) = direct_store(dir.path());
        let block = direct::BLOCK_BYTES;
        for (i, (len, cut)) in [
            (0, 4096),
            (1, 4096),
            (4095, 1000),
            (4096, 4096),
            (4097, 65_537),
            (block - 1, 256 * 1024),
            (block, 256 * 1024),
            (block + 1, 300_001),
            (3 * block + 8192, block), // an aligned tail after whole blocks
            (5 * block + 12_345, 65_537),
        ]
        .into_iter()
        .enumerate()
        {
            let data = Bytes::from((0..len).map(|b| (b * 11 % 239) as u8).collect::<Vec<u8>>());
            let mut upload = store.begin_upload(&format!("direct{i}")).await.unwrap();
            for at in (0..len).step_by(cut) {
                upload
                    .write(data.slice(at..(at + cut).min(len)))
                    .await
                    .unwrap();
            }
            let (temp, sha) = upload.finish().await.unwrap();
            assert_eq!(sha, digest(&data), "{len} bytes in {cut}-byte chunks");
            let path = dir.path().join(temp.key());
            if direct_io && len >= 4096 {
                assert!(
                    !first_page_cached(&path),
                    "{len} bytes: a direct upload went through the page cache"
                );
            }
            assert!(std::fs::read(&path).unwrap() == data, "{len} bytes differ");
        }
        assert_eq!(
            store.direct.as_ref().unwrap().lent(),
            0,
            "blocks given back"
        );
        if !direct_io {
            eprintln!(
                "{} refuses O_DIRECT: only the fallback was tested",
                dir.path().display()
            );
        }
    }

    /// A resumable upload written directly: each checkpoint (`sync`) puts every byte so far
    /// in the file, the partial block's included, at any offset; a writer resumed at an
    /// unaligned checkpoint (after the bytes past it were cut) goes on from there, and the
    /// file ends byte for byte what was sent, with the SHA-256 of all of it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn resumable_uploads_checkpoint_and_resume_with_direct_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, direct_io) = direct_store(dir.path());
        let pool = store.direct.clone().unwrap();
        let block = direct::BLOCK_BYTES;
        let len = 4 * block + 77_777;
        let data = Bytes::from((0..len).map(|b| (b * 3 % 229) as u8).collect::<Vec<u8>>());
        let open = || async {
            match store.open_resumable("r1", true).await.unwrap() {
                Opened::Locked(file) => file,
                _ => panic!("the upload's file is free"),
            }
        };
        // Checkpoints on a page, inside a block, past a whole block, and one byte on.
        let mut at = 0;
        let mut file = open().await;
        let mut writer = file.resume_at(0).await.unwrap();
        assert_eq!(pool.lent(), usize::from(direct_io));
        for checkpoint in [4 * 4096, 100_003, block + 5, block + 6] {
            upload_range(&mut writer, &data, at, checkpoint).await;
            at = checkpoint;
            assert_eq!(writer.sync().await.unwrap(), at as u64);
            let stored = std::fs::read(dir.path().join("resumable/r1")).unwrap();
            assert!(stored == data[..at], "the file after a checkpoint at {at}");
        }
        // Bytes past the last checkpoint, then the writer is dropped (a cut stream): resumed
        // at the checkpoint, the file is cut back there.
        upload_range(&mut writer, &data, at, 2 * block + 999).await;
        drop(writer);
        // Resumed on the same descriptor, which the writer left direct: the bytes before the
        // checkpoint are hashed again (buffered reads) and the file is cut back.
        let again = file.resume_at(at as u64).await.unwrap();
        assert_eq!(file.stored_len().await.unwrap(), at as u64);
        drop(again);
        drop(file);
        await_lent(&pool, 0).await;
        assert_eq!(pool.lent(), 0, "a dropped writer's block comes back");
        file = open().await;
        let mut writer = file.resume_at(at as u64).await.unwrap();
        upload_range(&mut writer, &data, at, len).await;
        let sha = writer.finish().await.unwrap();
        assert_eq!(sha, digest(&data));
        assert_eq!(file.stored_len().await.unwrap(), len as u64);
        let stored = std::fs::read(dir.path().join("resumable/r1")).unwrap();
        assert!(stored == data, "the resumed upload differs");
    }

    /// Hands `data[from..to]` to `writer` in odd chunks.
    async fn upload_range(writer: &mut ResumableWriter, data: &Bytes, from: usize, to: usize) {
        for at in (from..to).step_by(123_457) {
            writer
                .write(data.slice(at..(at + 123_457).min(to)))
                .await
                .unwrap();
        }
    }

    /// The pool lends at most `POOL_BLOCKS` blocks: the upload beyond them is written through
    /// the page cache and is as intact; every block comes back, from a finished upload and
    /// from one dropped mid-stream alike.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uploads_beyond_the_pool_go_through_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let (store, direct_io) = direct_store(dir.path());
        let pool = store.direct.clone().unwrap();
        let len = 2 * direct::BLOCK_BYTES + 100;
        let data = Bytes::from((0..len).map(|b| (b * 5 % 233) as u8).collect::<Vec<u8>>());
        let mut uploads = Vec::new();
        for i in 0..=direct::POOL_BLOCKS {
            let mut upload = store.begin_upload(&format!("many{i}")).await.unwrap();
            upload.write(data.slice(..1000)).await.unwrap();
            uploads.push(upload);
        }
        assert_eq!(pool.lent(), if direct_io { direct::POOL_BLOCKS } else { 0 });
        // One dropped mid-stream gives its block back once its stage lets go of it.
        drop(uploads.remove(3));
        await_lent(&pool, direct::POOL_BLOCKS - 1).await;
        if direct_io {
            assert_eq!(
                pool.lent(),
                direct::POOL_BLOCKS - 1,
                "a dropped upload's block"
            );
        }
        for (i, mut upload) in uploads.into_iter().enumerate() {
            upload.write(data.slice(1000..)).await.unwrap();
            let (temp, sha) = upload.finish().await.unwrap();
            assert_eq!(sha, digest(&data), "upload {i}");
            let path = dir.path().join(temp.key());
            if direct_io {
                // The last upload found the pool empty: the page cache holds its bytes.
                let last = i == direct::POOL_BLOCKS - 1;
                assert_eq!(first_page_cached(&path), last, "upload {i}");
            }
            assert!(std::fs::read(&path).unwrap() == data, "upload {i} differs");
        }
        assert_eq!(pool.lent(), 0, "every block given back");
    }

    /// The chunks a local read of `range` gives, checked to make `data`'s bytes in that range.
    async fn pull_local(
        store: &BlobStore,
        sha: &Sha256,
        data: &[u8],
        range: Range<u64>,
    ) -> Vec<Bytes> {
        let chunks: Vec<Bytes> = store
            .read(sha, None, range.clone())
            .await
            .unwrap()
            .map(|c| c.unwrap())
            .collect()
            .await;
        let (start, end) = (range.start as usize, range.end as usize);
        assert!(chunks.concat() == data[start..end], "{range:?} differs");
        chunks
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_durable_upload_pulls_back_byte_for_byte_from_a_cold_cache() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&format!("file://{}", dir.path().display()), true).unwrap();
        // Three writeback steps and an odd tail, in odd chunks.
        let len = 3 * FLUSH_STEP_BYTES as usize + 4097;
        let data = Bytes::from((0..len).map(|b| (b * 13 % 241) as u8).collect::<Vec<u8>>());
        let mut upload = store.begin_upload("cold").await.unwrap();
        for at in (0..len).step_by(300_001) {
            upload
                .write(data.slice(at..(at + 300_001).min(len)))
                .await
                .unwrap();
        }
        let (temp, sha) = upload.finish().await.unwrap();
        assert_eq!(sha, digest(&data));
        assert!(matches!(
            store.promote(temp, &sha, len as u64, None).await,
            Ok(Promoted::AtAddress)
        ));
        let local = store.local.as_ref().unwrap();
        let path = local.path_to_filesystem(&blob_key(&sha)).unwrap();
        for range in [0..len as u64, 12_345..len as u64 - 3] {
            pagecache::evict(&std::fs::File::open(&path).unwrap()).unwrap();
            pull_local(&store, &sha, &data, range).await;
        }
    }

    /// A blob the page cache holds only in parts (pages dropped here and there, as memory
    /// pressure does) pulls back byte for byte in the usual chunks: what is cached is read at
    /// once, the rest of each chunk from the disk. A blob cut short behind the server's back
    /// while it is read warm is DATA_LOSS at the cut.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partly_cached_blob_pulls_back_in_whole_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&format!("file://{}", dir.path().display()), false).unwrap();
        let len = 5 * READ_CHUNK_BYTES + 12_345;
        let data = Bytes::from((0..len).map(|b| (b * 7 % 251) as u8).collect::<Vec<u8>>());
        let sha = digest(&data);
        store
            .put_small("partly", data.clone(), &sha, None)
            .await
            .unwrap();
        let path = store
            .local
            .as_ref()
            .unwrap()
            .path_to_filesystem(&blob_key(&sha))
            .unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let page = 4096_i64;
        for range in [0..len as u64, 70_000..len as u64 - 5] {
            // Warm the whole file, then drop a page inside the first chunk, two pages across
            // the third chunk's start and everything from the middle of the fifth chunk on.
            std::fs::read(&path).unwrap();
            pagecache::evict_range(&file, 5 * page, page).unwrap();
            let third = (FIRST_READ_CHUNK_BYTES * 3) as i64;
            pagecache::evict_range(&file, third - page, 2 * page).unwrap();
            pagecache::evict_range(&file, 4 * READ_CHUNK_BYTES as i64 + 12 * page, 0).unwrap();
            let chunks = pull_local(&store, &sha, &data, range.clone()).await;
            let (start, end) = (range.start as usize, range.end as usize);
            // 64 KiB, 128 KiB, then 256 KiB chunks, the last one what is left.
            let mut want = Vec::new();
            let (mut at, mut chunk) = (start, FIRST_READ_CHUNK_BYTES);
            while at < end {
                want.push(chunk.min(end - at));
                at += chunk.min(end - at);
                chunk = (chunk * 2).min(READ_CHUNK_BYTES);
            }
            let sizes: Vec<usize> = chunks.iter().map(Bytes::len).collect();
            assert_eq!(sizes, want, "{range:?}");
        }

        // Cut short after the read began, while its pages are cached.
        std::fs::read(&path).unwrap();
        let mut stream = store.read(&sha, None, 0..len as u64).await.unwrap();
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.len(), FIRST_READ_CHUNK_BYTES);
        let cut = 3 * READ_CHUNK_BYTES as u64 + 10;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let mut got = first.len() as u64;
        let error = loop {
            match stream.next().await.unwrap() {
                Ok(chunk) => got += chunk.len() as u64,
                Err(e) => break e,
            }
        };
        assert!(got <= cut, "{got} bytes read from a {cut}-byte file");
        assert!(
            matches!(&error, Error::DataLoss(m) if m.contains(&format!("{cut}"))),
            "{error:?}"
        );
        assert!(stream.next().await.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_writeback_fails_the_upload() {
        // sync_file_range refuses a character device (ESPIPE), as a disk error would fail
        // it: the push must fail, not commit what was never flushed.
        let err = first_write_error("/dev/null", true, None).await;
        assert!(
            matches!(
                &err,
                Error::Unavailable {
                    what: "blob store",
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
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
