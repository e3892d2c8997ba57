//! Re-reading a stored blob to check it (the scrubber's side of the blob store): its size and
//! its digest, at a bounded byte rate. A blob that fails is quarantined as a push's
//! verification quarantines a damaged dedup target (see [`BlobStore::promote`]): a Pull then
//! ends with DATA_LOSS instead of serving wrong bytes, and the next push of that content
//! stores it again.
//!
//! Reads go a chunk per blocking task, hashed in the same task, so a scrub holds no thread
//! while it waits for its pace.

use std::io::Read;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::{BlobStore, Error, Hasher, ObjectPath, ObjectStoreExt, Sha256, stored_key};

/// Bytes read per step of a scrub.
const SCRUB_CHUNK_BYTES: usize = 1024 * 1024;

/// What a scrub found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scrubbed {
    /// Size and digest are right.
    Intact,
    /// Nothing is stored there (collected meanwhile, quarantined by a push, or a lease
    /// whose push never stored anything): nothing to check.
    Missing,
    /// Wrong size or content: moved to quarantine. The string says what was wrong.
    Quarantined(String),
}

/// Keeps reads at `bytes_per_second` on average since it was started (0: no limit).
#[derive(Debug)]
pub struct Pace {
    bytes_per_second: u64,
    started: Instant,
    bytes: u64,
}

impl Pace {
    pub fn new(bytes_per_second: u64) -> Self {
        Self {
            bytes_per_second,
            started: Instant::now(),
            bytes: 0,
        }
    }

    /// Counts `bytes` read, and waits until reading them was due.
    pub async fn spent(&mut self, bytes: u64) {
        if self.bytes_per_second == 0 {
            return;
        }
        self.bytes += bytes;
        let due = Duration::from_secs_f64(self.bytes as f64 / self.bytes_per_second as f64);
        if let Some(wait) = due.checked_sub(self.started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

impl BlobStore {
    /// Reads blob `sha256` at `location` (`None`: its content address) whole, checks that
    /// it holds `size` bytes hashing to `sha256`, and quarantines it if not. `read` is
    /// called with each chunk's length after it was read (for pacing and counting).
    pub async fn scrub(
        &self,
        sha256: &Sha256,
        size: u64,
        location: Option<&str>,
        pace: &mut Pace,
        mut read: impl FnMut(u64),
    ) -> Result<Scrubbed, Error> {
        let key = stored_key(sha256, location);
        if let Some(local) = &self.local {
            let path = local.path_to_filesystem(&key).map_err(Error::blob_store)?;
            let quarantine = self.quarantine_path(local, sha256)?;
            return scrub_local(path, quarantine, sha256, size, pace, &mut read).await;
        }
        let meta = match self.store.head(&key).await {
            Ok(meta) => meta,
            Err(object_store::Error::NotFound { .. }) => return Ok(Scrubbed::Missing),
            Err(e) => return Err(Error::blob_store(e)),
        };
        let damage = if meta.size != size {
            Some(format!("{} bytes, expected {size}", meta.size))
        } else {
            let mut stream = match self.store.get(&key).await {
                Ok(result) => result.into_stream(),
                Err(object_store::Error::NotFound { .. }) => return Ok(Scrubbed::Missing),
                Err(e) => return Err(Error::blob_store(e)),
            };
            let mut hasher = Hasher::new();
            let mut total = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(Error::blob_store)?;
                let len = chunk.len() as u64;
                hasher = tokio::task::spawn_blocking(move || {
                    hasher.update(&chunk);
                    hasher
                })
                .await
                .map_err(|e| Error::Internal(format!("scrub hash task failed: {e}")))?;
                total += len;
                read(len);
                pace.spent(len).await;
            }
            damage(total, size, &hasher.finish(), sha256)
        };
        let Some(damage) = damage else {
            return Ok(Scrubbed::Intact);
        };
        tracing::error!(%sha256, %damage, "scrub found a damaged blob; quarantined");
        self.store
            .copy(&key, &super::quarantine_key(sha256))
            .await
            .map_err(Error::blob_store)?;
        match self.store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(Error::blob_store(e)),
        }
        Ok(Scrubbed::Quarantined(damage))
    }

    /// Reads the scrubber's saved state (`None`: none saved yet).
    pub async fn read_scrub_state(&self) -> Result<Option<bytes::Bytes>, Error> {
        match self.store.get(&scrub_state_key()).await {
            Ok(result) => Ok(Some(result.bytes().await.map_err(Error::blob_store)?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::blob_store(e)),
        }
    }

    /// Saves the scrubber's state, where every replica finds it.
    pub async fn write_scrub_state(&self, state: bytes::Bytes) -> Result<(), Error> {
        self.store
            .put(&scrub_state_key(), state.into())
            .await
            .map(|_| ())
            .map_err(Error::blob_store)
    }
}

/// Where the scrubber keeps its place: next to the blobs, so every replica sharing them
/// shares it, and a restart resumes the walk.
fn scrub_state_key() -> ObjectPath {
    ObjectPath::from("scrub/state.json")
}

async fn scrub_local(
    path: std::path::PathBuf,
    quarantine: std::path::PathBuf,
    sha256: &Sha256,
    size: u64,
    pace: &mut Pace,
    read: &mut impl FnMut(u64),
) -> Result<Scrubbed, Error> {
    use std::os::unix::fs::MetadataExt;

    let opened = {
        let path = path.clone();
        super::blocking(move || match std::fs::File::open(&path) {
            Ok(file) => {
                let meta = file.metadata()?;
                Ok(Some((file, meta.len(), (meta.dev(), meta.ino()))))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await?
    };
    let Some((mut file, found, identity)) = opened else {
        return Ok(Scrubbed::Missing);
    };
    let damage = if found != size {
        Some(format!("{found} bytes, expected {size}"))
    } else {
        let mut hasher = Hasher::new();
        let mut total = 0u64;
        loop {
            let (back, back_hasher, len) = super::blocking(move || {
                let mut buffer = vec![0u8; SCRUB_CHUNK_BYTES];
                let len = file.read(&mut buffer)?;
                hasher.update(&buffer[..len]);
                Ok((file, hasher, len as u64))
            })
            .await?;
            (file, hasher) = (back, back_hasher);
            if len == 0 {
                break;
            }
            total += len;
            read(len);
            pace.spent(len).await;
        }
        damage(total, size, &hasher.finish(), sha256)
    };
    drop(file);
    let Some(damage) = damage else {
        return Ok(Scrubbed::Intact);
    };
    // Only the file that was read goes: if a push replaced it meanwhile (its own check found
    // it damaged), the replacement moved aside by mistake is put back.
    let moved = super::blocking(move || {
        if let Some(dir) = quarantine.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::rename(&path, &quarantine) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
        let meta = std::fs::metadata(&quarantine)?;
        if (meta.dev(), meta.ino()) != identity {
            std::fs::rename(&quarantine, &path)?;
            return Ok(false);
        }
        Ok(true)
    })
    .await?;
    if !moved {
        return Ok(Scrubbed::Missing);
    }
    tracing::error!(%sha256, %damage, "scrub found a damaged blob; quarantined");
    Ok(Scrubbed::Quarantined(damage))
}

/// What is wrong with a blob read back whole: `total` bytes hashing to `digest`, where
/// `size` bytes hashing to `sha256` were stored. `None` when it is intact.
fn damage(total: u64, size: u64, digest: &Sha256, sha256: &Sha256) -> Option<String> {
    if total != size {
        Some(format!("{total} bytes read, expected {size}"))
    } else {
        (digest != sha256).then(|| format!("content hashes to {digest}"))
    }
}
