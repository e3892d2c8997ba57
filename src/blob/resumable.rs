//! The bytes of resumable uploads (`PushHeader.upload_id`), local directory only: one file
//! per upload under `resumable/<internal id>`, apart from `uploads/` (whose files the
//! sweeper removes by age alone) and from blobs.
//!
//! Whoever writes an upload holds an exclusive `flock` on its file for as long as it does,
//! so two Pushes resuming one upload at once cannot interleave bytes: the second is
//! refused at once. The lock goes with the process, so a server that dies mid-upload never
//! leaves it stuck (unlike a lease in the database, which would have to expire first).
//!
//! A resumed writer truncates the file to the committed offset (bytes written after the
//! last checkpoint may be torn) and hashes that prefix again to rebuild the SHA-256 state:
//! reading back at disk speed costs less than it sounds next to a resend, needs nothing of
//! the hash library's internals, and proves the prefix is readable before anything is
//! appended to it.

use std::io::{Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path as ObjectPath;

use super::direct::{DirectWriter, set_direct};
use super::pipeline::Stage;
use super::{BlobStore, DiskWriter, FileWriter, TempBlob, blocking};
use crate::domain::{Error, Hasher, Sha256};

const RESUMABLE_PREFIX: &str = "resumable";

/// An upload's file, locked by this holder until dropped.
pub struct ResumableFile {
    store: BlobStore,
    file: Arc<std::fs::File>,
    path: PathBuf,
    key: ObjectPath,
}

/// Why a resumable file could not be opened.
pub enum Opened {
    Locked(ResumableFile),
    /// There is no file (and `create` was not asked for).
    Missing,
    /// Another writer holds it.
    Busy,
}

impl BlobStore {
    /// Whether uploads can be resumed here (a local directory).
    pub fn supports_resumable(&self) -> bool {
        self.local.is_some()
    }

    fn resumable_path(&self, internal_id: &str) -> Result<(ObjectPath, PathBuf), Error> {
        let local = self.local.as_ref().ok_or_else(|| {
            Error::FailedPrecondition("resumable uploads need a local blob directory".into())
        })?;
        let key = ObjectPath::from(format!("{RESUMABLE_PREFIX}/{internal_id}"));
        let path = local.path_to_filesystem(&key).map_err(Error::blob_store)?;
        Ok((key, path))
    }

    /// Opens the file of upload `internal_id` (creating it empty with `create`) and locks
    /// it without waiting.
    pub async fn open_resumable(&self, internal_id: &str, create: bool) -> Result<Opened, Error> {
        let (key, path) = self.resumable_path(internal_id)?;
        let opened_path = path.clone();
        let opened = blocking(move || {
            let open = |path: &PathBuf| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(create)
                    .truncate(false)
                    .open(path)
            };
            let file = match open(&opened_path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                    if let Some(dir) = opened_path.parent() {
                        std::fs::create_dir_all(dir)?;
                    }
                    open(&opened_path)
                }
                other => other,
            };
            let file = match file {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => return Ok(Some(None)),
                Err(std::fs::TryLockError::Error(e)) => return Err(e),
            }
            // Locked, but perhaps an inode its last holder has since renamed away (promoted
            // to a blob) or removed (swept): then the upload's file is not this one.
            match std::fs::metadata(&opened_path) {
                Ok(meta) if meta.ino() == file.metadata()?.ino() => Ok(Some(Some(file))),
                Ok(_) => Ok(Some(None)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await?;
        Ok(match opened {
            None => Opened::Missing,
            Some(None) => Opened::Busy,
            Some(Some(file)) => Opened::Locked(ResumableFile {
                store: self.clone(),
                file: Arc::new(file),
                path,
                key,
            }),
        })
    }

    /// Bytes in the file of upload `internal_id` (0 when it has none), without locking.
    pub async fn resumable_len(&self, internal_id: &str) -> Result<u64, Error> {
        let (_, path) = self.resumable_path(internal_id)?;
        blocking(move || match std::fs::metadata(&path) {
            Ok(meta) => Ok(meta.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        })
        .await
    }

    /// Keys of resumable upload files (for tests).
    pub async fn list_resumable(&self) -> Result<Vec<String>, Error> {
        self.list(&ObjectPath::from(RESUMABLE_PREFIX)).await
    }
}

impl ResumableFile {
    /// Bytes in the file.
    pub async fn stored_len(&self) -> Result<u64, Error> {
        let file = self.file.clone();
        blocking(move || Ok(file.metadata()?.len())).await
    }

    /// Cuts the file to `offset` bytes (all it holds when shorter) and hashes them again:
    /// a writer that appends from there.
    pub async fn resume_at(&self, offset: u64) -> Result<ResumableWriter, Error> {
        let file = self.file.clone();
        let pool = self.store.direct.clone();
        let (hasher, writer) = blocking(move || {
            // An earlier writer on this descriptor may have left it direct, which the
            // buffered reads below cannot use.
            if pool.is_some() {
                set_direct(&file, false)?;
            }
            file.set_len(offset)?;
            let mut reader = &*file;
            reader.seek(SeekFrom::Start(0))?;
            let mut hasher = Hasher::new();
            let read = std::io::copy(&mut std::io::Read::take(reader, offset), &mut hasher)?;
            if read != offset {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("resumable upload holds {read} bytes, {offset} expected"),
                ));
            }
            (&*file).seek(SeekFrom::Start(offset))?;
            // Direct writes (fsync on) while the store has a block to lend; else through the
            // page cache, where checkpoints sync every few MiB: no background writeback.
            let direct = match pool.and_then(|pool| pool.lend()) {
                Some(block) => DirectWriter::resume(file.clone(), block, offset)?,
                None => None,
            };
            let writer = match direct {
                Some(direct) => DiskWriter::Direct(direct),
                None => DiskWriter::Buffered(FileWriter::new(file, false)),
            };
            Ok((hasher, writer))
        })
        .await?;
        Ok(ResumableWriter {
            file: self.file.clone(),
            hash: Stage::new(hasher),
            write: Stage::new(writer),
            written: offset,
            fsync: self.store.fsync,
            unsynced_dir: self.path.parent().map(PathBuf::from),
        })
    }

    /// The file as a finished upload to promote: renamed to the content address, or
    /// removed when that content is already stored (or when dropped unpromoted).
    pub fn to_temp(&self) -> TempBlob {
        TempBlob {
            store: self.store.clone(),
            key: self.key.clone(),
            armed: true,
        }
    }

    /// Removes the file (the lock goes with it when this is dropped).
    pub async fn remove(self) -> Result<(), Error> {
        let path = self.path.clone();
        blocking(move || match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .await
    }
}

/// Appends to a resumable upload, hashing and writing on pipeline stages (as
/// [`super::Upload`] does).
pub struct ResumableWriter {
    file: Arc<std::fs::File>,
    hash: Stage<Hasher>,
    write: Stage<DiskWriter>,
    written: u64,
    fsync: bool,
    /// The directory whose entry for the file is synced at the first sync (fsync on).
    unsynced_dir: Option<PathBuf>,
}

impl ResumableWriter {
    /// Bytes in the upload once the chunks handed over are written.
    pub fn written(&self) -> u64 {
        self.written
    }

    pub async fn write(&mut self, chunk: Bytes) -> Result<(), Error> {
        let len = chunk.len() as u64;
        self.hash.submit(chunk.clone()).await?;
        self.write.submit(chunk).await?;
        self.written += len;
        Ok(())
    }

    /// Waits for the chunks handed over to be written and makes them durable (fsync when
    /// ARTIFACTD_BLOB_FSYNC is on; otherwise handed to the OS, which survives a process
    /// crash). Returns the durable size. Hashing goes on meanwhile.
    pub async fn sync(&mut self) -> Result<u64, Error> {
        self.sync_later().await?.await
    }

    /// Waits for the chunks handed over to be written (a direct writer's partial block too),
    /// then returns the rest of
    /// [`Self::sync`] (the fsync, which takes far longer) as a step of its own, to run while
    /// more chunks are written: it makes every byte written so far durable and resolves to
    /// their count.
    pub async fn sync_later(
        &mut self,
    ) -> Result<impl Future<Output = Result<u64, Error>> + Send + 'static, Error> {
        self.write.flushed().await?;
        let (file, written) = (self.file.clone(), self.written);
        let sync = self.fsync.then(|| self.unsynced_dir.take());
        Ok(async move {
            if let Some(dir) = sync {
                super::sync_data(file).await?;
                if let Some(dir) = dir {
                    blocking(move || super::sync_dir(&dir)).await?;
                }
            }
            Ok(written)
        })
    }

    /// Syncs and returns the SHA-256 of everything written.
    pub async fn finish(mut self) -> Result<Sha256, Error> {
        self.sync().await?;
        Ok(self.hash.finish().await?.finish())
    }
}
