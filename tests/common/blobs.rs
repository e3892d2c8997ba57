//! A test server's blob store seen from outside, for tests that look at, plant or damage
//! blobs behind the server's back: its local directory (`blob_dir`), or the object store of
//! `TEST_BLOB_URL=s3://bucket/prefix` (with the `AWS_*` variables), where every server has a
//! prefix of its own. On an object store a pushed blob's bytes stay where the push wrote them
//! (`blobs.location`), so these helpers find a blob by its row, not only by its content
//! address.

use std::sync::Arc;

use artifactd::domain::Sha256;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::TestServer;

/// Whether this run puts the test servers' blobs on an object store (`TEST_BLOB_URL`).
pub fn blobs_on_object_store() -> bool {
    std::env::var("TEST_BLOB_URL").is_ok()
}

/// Says on the terminal that `test` did not run on this run's object store, and why: its
/// subject exists only on a local directory. Returns whether the caller should return.
pub fn local_directory_only(why: &str) -> bool {
    if !blobs_on_object_store() {
        return false;
    }
    use std::io::Write;
    let test = std::thread::current().name().unwrap_or("").to_owned();
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED (not passed) {test} [TEST_BLOB_URL]: {why}; it runs without TEST_BLOB_URL."
    );
    true
}

/// The content address of `sha256` (hex), as the blob store lays it out.
pub fn content_address(sha256: &str) -> String {
    format!("blobs/sha256/{}/{}/{sha256}", &sha256[..2], &sha256[2..4])
}

impl TestServer {
    /// The server's blob store as objects (`None` on a local directory).
    fn object_store(&self) -> Option<Arc<dyn ObjectStore>> {
        let rest = self.config.blob_url.strip_prefix("s3://")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let s3 = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .expect("the S3 store from AWS_* variables");
        Some(match prefix.trim_matches('/') {
            "" => Arc::new(s3),
            prefix => Arc::new(PrefixStore::new(s3, prefix)),
        })
    }

    /// Where `sha256`'s (hex) bytes are in the blob store: its row's location when it has
    /// one, else its content address.
    pub async fn blob_key(&self, sha256: &str) -> String {
        let digest = Sha256::parse("sha256", sha256).unwrap();
        let (_, location) = self.app.store.blob_source(&digest).await.unwrap();
        location.unwrap_or_else(|| content_address(sha256))
    }

    /// Whether the object `key` exists in the blob store.
    pub async fn object_exists(&self, key: &str) -> bool {
        match self.object_store() {
            None => self.blob_dir.path().join(key).is_file(),
            Some(store) => match store.head(&ObjectPath::from(key)).await {
                Ok(_) => true,
                Err(object_store::Error::NotFound { .. }) => false,
                Err(e) => panic!("HEAD {key}: {e}"),
            },
        }
    }

    /// Whether the bytes of `sha256` (hex) are stored (at its location or content address).
    pub async fn blob_exists(&self, sha256: &str) -> bool {
        self.object_exists(&self.blob_key(sha256).await).await
    }

    /// Writes `data` as the object `key`, as something other than the server would (a
    /// crash's leftover, an operator's copy).
    pub async fn put_object(&self, key: &str, data: &[u8]) {
        match self.object_store() {
            None => {
                let path = self.blob_dir.path().join(key);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, data).unwrap();
            }
            Some(store) => {
                store
                    .put(&ObjectPath::from(key), PutPayload::from(data.to_vec()))
                    .await
                    .unwrap();
            }
        }
    }

    /// Removes the bytes of `sha256` (hex) behind the server's back.
    pub async fn remove_blob(&self, sha256: &str) {
        let key = self.blob_key(sha256).await;
        match self.object_store() {
            None => std::fs::remove_file(self.blob_dir.path().join(&key)).unwrap(),
            Some(store) => store.delete(&ObjectPath::from(key)).await.unwrap(),
        }
    }

    /// Cuts the bytes of `sha256` (hex) to their first `len`: in place on a local directory
    /// (a reader that has the file open sees it), by rewriting the object on an object store
    /// (which replaces an object whole; a GET under way keeps reading the old one).
    pub async fn truncate_blob(&self, sha256: &str, len: u64) {
        let key = self.blob_key(sha256).await;
        match self.object_store() {
            None => std::fs::OpenOptions::new()
                .write(true)
                .open(self.blob_dir.path().join(&key))
                .unwrap()
                .set_len(len)
                .unwrap(),
            Some(store) => {
                let path = ObjectPath::from(key);
                let kept = match len {
                    0 => bytes::Bytes::new(),
                    len => store
                        .get_range(&path, 0..len)
                        .await
                        .unwrap_or_else(|e| panic!("GET {path}: {e}")),
                };
                store.put(&path, PutPayload::from(kept)).await.unwrap();
            }
        }
    }
}
