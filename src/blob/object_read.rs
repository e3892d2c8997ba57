//! Reading a range of an object-store blob: one ranged GET, its body passed on as it comes.
//!
//! Large buffers of the body are passed on uncopied, cut to at most [`READ_CHUNK_BYTES`];
//! buffers smaller than [`MIN_CHUNK_BYTES`] (an HTTP body yields some of a few KiB) are
//! gathered until they make one, so every chunk but the last is 64 KiB–1 MiB, as from a
//! local directory. An object that is missing, or that ends before the range does, is
//! [`Error::DataLoss`] — up front when the GET's answer already shows it (the object's whole
//! size comes with a ranged answer), else when its body ends short.
//!
//! Several ranged GETs in flight at once (parts fetched ahead of the one being sent) were
//! measured and dropped: moto, the S3 server CI and the bench run, reads an object's whole
//! value for every GET, so 8 MiB parts of a 1 GiB object cost it 84 core-seconds per GiB
//! and the Pull fell to 9 MB/s.

use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::stream::{BoxStream, Stream, StreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};

use super::READ_CHUNK_BYTES;
use crate::domain::{Error, Sha256};

/// The smallest chunk sent but for the last: smaller body buffers are gathered to this.
const MIN_CHUNK_BYTES: usize = 64 * 1024;

/// Streams `range` of the object `key`, blob `sha256`'s bytes.
pub(super) async fn read(
    store: &dyn ObjectStore,
    key: &ObjectPath,
    sha256: &Sha256,
    range: Range<u64>,
) -> Result<ObjectRead, Error> {
    let options = GetOptions {
        range: Some(GetRange::Bounded(range.clone())),
        ..Default::default()
    };
    let error = match store.get_opts(key, options).await {
        Ok(result) if result.meta.size < range.end => {
            return Err(short_blob(sha256, result.meta.size, range.end));
        }
        Ok(result) => {
            return Ok(ObjectRead {
                body: result.into_stream(),
                sha256: sha256.clone(),
                range,
                received: 0,
                piece: Bytes::new(),
                gathered: BytesMut::new(),
                done: false,
            });
        }
        Err(object_store::Error::NotFound { .. }) => return Err(missing(sha256)),
        Err(e) => e,
    };
    // A range that starts past the end of the object is refused (416), which object_store
    // reports as a generic error: the object's size tells lost data from a failing store.
    match store.head(key).await {
        Ok(meta) if meta.size < range.end => Err(short_blob(sha256, meta.size, range.end)),
        Err(object_store::Error::NotFound { .. }) => Err(missing(sha256)),
        _ => Err(Error::blob_store(error)),
    }
}

fn missing(sha256: &Sha256) -> Error {
    Error::DataLoss(format!("blob {sha256} is missing"))
}

fn short_blob(sha256: &Sha256, size: u64, needed: u64) -> Error {
    Error::DataLoss(format!(
        "blob {sha256} holds {size} bytes, {needed} are needed"
    ))
}

/// The stream [`super::BlobStore::read`] returns for an object store.
pub(super) struct ObjectRead {
    body: BoxStream<'static, object_store::Result<Bytes>>,
    sha256: Sha256,
    range: Range<u64>,
    received: u64,
    /// What is left of the body's last buffer.
    piece: Bytes,
    /// Small buffers copied together until they make a chunk of [`MIN_CHUNK_BYTES`].
    gathered: BytesMut,
    done: bool,
}

impl Stream for ObjectRead {
    type Item = Result<Bytes, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        while !this.done {
            if !this.piece.is_empty() {
                if this.gathered.is_empty() && this.piece.len() >= MIN_CHUNK_BYTES {
                    let cut = this.piece.len().min(READ_CHUNK_BYTES);
                    return Poll::Ready(Some(Ok(this.piece.split_to(cut))));
                }
                let take = this.piece.len().min(MIN_CHUNK_BYTES - this.gathered.len());
                this.gathered.extend_from_slice(&this.piece.split_to(take));
                if this.gathered.len() >= MIN_CHUNK_BYTES {
                    return Poll::Ready(Some(Ok(this.gathered.split().freeze())));
                }
                continue;
            }
            match std::task::ready!(this.body.poll_next_unpin(cx)) {
                Some(Ok(piece)) => {
                    this.received += piece.len() as u64;
                    this.piece = piece;
                }
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(Error::blob_store(e))));
                }
                None => {
                    this.done = true;
                    let expected = this.range.end - this.range.start;
                    if this.received < expected {
                        return Poll::Ready(Some(Err(Error::DataLoss(format!(
                            "blob {} ended after {} of {expected} bytes",
                            this.sha256, this.received
                        )))));
                    }
                    if !this.gathered.is_empty() {
                        return Poll::Ready(Some(Ok(this.gathered.split().freeze())));
                    }
                }
            }
        }
        Poll::Ready(None)
    }
}
