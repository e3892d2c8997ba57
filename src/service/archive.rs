//! Zip archives built on the fly: every live file under a scope and prefix, streamed as a
//! zip without staging it on disk or in memory.
//!
//! The zip is written by `async_zip` into [`ZipSink`], which cuts it into chunks of up to
//! [`ARCHIVE_CHUNK_BYTES`] and hands them to a bounded channel; the producer waits whenever
//! the consumer (the client's stream, through flow control) has not taken the previous
//! chunks. Memory per archive is therefore at most 8 queued chunks (2 MiB) plus the
//! central directory the zip format needs at its end (about 100 bytes and the path per
//! entry). Entries are written
//! with data descriptors (sizes and CRC-32 after the content) and zip64 records, so files
//! over 4 GiB, archives over 4 GiB and more than 65,535 entries all work; each entry keeps
//! its artifact's unix mode (as a regular file) and creation time.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use async_zip::base::write::ZipFileWriter;
use async_zip::{Compression, ZipDateTimeBuilder, ZipEntryBuilder};
use bytes::{Bytes, BytesMut};
use futures::io::AsyncWriteExt;
use futures::stream::{BoxStream, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

use crate::domain::metering::civil_from_days;
use crate::domain::{Error, Timestamp};

/// Size of the chunks an archive is sent in.
pub const ARCHIVE_CHUNK_BYTES: usize = 256 * 1024;
/// Chunks that may wait in the channel for the client: enough for the writer to run 2 MiB
/// ahead of a scheduling hiccup (2 left the zip 6–32 % slower than Pull on a busy VM).
const QUEUED_CHUNKS: usize = 8;
/// Fixed bytes a zip64 stream entry adds beyond its content and twice its path: local
/// header (30) with a zip64 field (20), data descriptor (16), central header (46) with a
/// zip64 field (28). Rounded up.
const ENTRY_OVERHEAD: u64 = 160;
/// End records: zip64 end of central directory (56), its locator (20), the classic end (22).
const END_OVERHEAD: u64 = 128;

/// One file of an archive.
pub struct ArchiveEntry {
    pub path: String,
    /// Unix permission bits.
    pub mode: u32,
    pub modified: Timestamp,
    pub content: BoxStream<'static, Result<Bytes, Error>>,
}

/// Most bytes an archive of `files` entries holding `content_bytes` with `path_bytes` of
/// paths can take: the egress reservation made before it is sent. Deflate can grow
/// incompressible data by a few bytes per 16 KiB block.
pub fn archive_size_bound(files: u64, content_bytes: u64, path_bytes: u64, deflate: bool) -> u64 {
    let content = if deflate {
        content_bytes
            .saturating_add(content_bytes / 1024)
            .saturating_add(files.saturating_mul(64))
    } else {
        content_bytes
    };
    content
        .saturating_add(files.saturating_mul(ENTRY_OVERHEAD))
        .saturating_add(path_bytes.saturating_mul(2))
        .saturating_add(END_OVERHEAD)
}

/// Starts writing a zip of `entries` on a task of its own and returns its bytes as a stream.
/// The task ends when the zip is complete, when an entry fails (the error is the stream's
/// last item), or as soon as the stream is dropped (it is aborted).
pub fn stream_archive(
    entries: BoxStream<'static, Result<ArchiveEntry, Error>>,
    deflate: bool,
) -> BoxStream<'static, Result<Bytes, Error>> {
    let (tx, rx) = mpsc::channel(QUEUED_CHUNKS);
    let errors = tx.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = write_archive(entries, ZipSink::new(tx), deflate).await {
            // The receiver may be gone (the client left); then nobody needs to know.
            let _ = errors.send(Err(e)).await;
        }
    });
    Box::pin(Archive {
        chunks: tokio_stream::wrappers::ReceiverStream::new(rx),
        _task: tokio_util::task::AbortOnDropHandle::new(task),
    })
}

/// The archive's chunks; dropping it aborts the task writing them.
struct Archive {
    chunks: tokio_stream::wrappers::ReceiverStream<Result<Bytes, Error>>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl Stream for Archive {
    type Item = Result<Bytes, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.chunks.poll_next_unpin(cx)
    }
}

/// Writes every entry into `sink` as one zip, then its central directory.
pub async fn write_archive(
    mut entries: BoxStream<'static, Result<ArchiveEntry, Error>>,
    sink: ZipSink,
    deflate: bool,
) -> Result<(), Error> {
    let compression = if deflate {
        Compression::Deflate
    } else {
        Compression::Stored
    };
    let mut zip = ZipFileWriter::new(sink);
    while let Some(entry) = entries.next().await {
        let mut entry = entry?;
        let header = ZipEntryBuilder::new(entry.path.into(), compression)
            // The artifact's permission bits, as a regular file unless it was pushed as a
            // symbolic link (whose content is its target, as zip stores links).
            .unix_permissions(zip_mode(entry.mode))
            .last_modification_date(zip_date(entry.modified));
        let mut writer = zip.write_entry_stream(header).await.map_err(zip_error)?;
        while let Some(chunk) = entry.content.next().await {
            writer.write_all(&chunk?).await.map_err(io_error)?;
        }
        writer.close().await.map_err(zip_error)?;
    }
    let mut sink = zip.close().await.map_err(zip_error)?;
    sink.close().await.map_err(io_error)
}

/// The zip's timestamp (local time without a zone; we write UTC, to the even second the
/// format holds). Instants before 1980, which zip cannot hold, become 1980-01-01.
/// The unix mode a zip entry carries: a link stays a link, anything else is a regular file.
fn zip_mode(mode: u32) -> u16 {
    use crate::domain::artifact::{S_IFLNK, S_IFMT, S_IFREG};
    let kind = if mode & S_IFMT == S_IFLNK {
        S_IFLNK
    } else {
        S_IFREG
    };
    u16::try_from(kind | (mode & 0o7777)).unwrap_or(0o100_644)
}

fn zip_date(at: Timestamp) -> async_zip::ZipDateTime {
    let seconds = at.as_micros().div_euclid(1_000_000);
    let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
    let of_day = seconds.rem_euclid(86_400);
    let builder = ZipDateTimeBuilder::new();
    if year < 1980 {
        return builder.year(1980).month(1).day(1).build();
    }
    builder
        .year(year)
        .month(month)
        .day(day)
        .hour((of_day / 3600) as u32)
        .minute((of_day % 3600 / 60) as u32)
        .second((of_day % 60) as u32)
        .build()
}

fn zip_error(e: async_zip::error::ZipError) -> Error {
    match e {
        async_zip::error::ZipError::UpstreamReadError(io) => io_error(io),
        other => Error::Internal(format!("writing a zip: {other}")),
    }
}

/// The sink fails only when the receiver is gone: the client left.
fn io_error(e: std::io::Error) -> Error {
    Error::Cancelled(format!("the archive's reader went away ({e})"))
}

/// An `AsyncWrite` that cuts what is written into chunks and sends them down a bounded
/// channel, waiting (without blocking a thread) while the channel is full.
pub struct ZipSink {
    tx: PollSender<Result<Bytes, Error>>,
    buffer: BytesMut,
}

impl ZipSink {
    pub fn new(tx: mpsc::Sender<Result<Bytes, Error>>) -> Self {
        Self {
            tx: PollSender::new(tx),
            buffer: BytesMut::with_capacity(ARCHIVE_CHUNK_BYTES),
        }
    }

    /// Sends the buffered bytes as one chunk once the channel has room.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.buffer.is_empty() {
            return Poll::Ready(Ok(()));
        }
        ready!(self.tx.poll_reserve(cx)).map_err(|_| gone())?;
        let chunk = self.buffer.split().freeze();
        self.buffer.reserve(ARCHIVE_CHUNK_BYTES);
        self.tx.send_item(Ok(chunk)).map_err(|_| gone())?;
        Poll::Ready(Ok(()))
    }
}

fn gone() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "receiver dropped")
}

impl futures::io::AsyncWrite for ZipSink {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.buffer.len() >= ARCHIVE_CHUNK_BYTES {
            ready!(this.poll_send(cx))?;
        }
        let n = data.len().min(ARCHIVE_CHUNK_BYTES - this.buffer.len());
        this.buffer.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // Chunks go out when full; flushing early would only make them smaller.
        let _ = cx;
        let _ = self;
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().poll_send(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: String, data: &'static [u8], mode: u32) -> Result<ArchiveEntry, Error> {
        Ok(ArchiveEntry {
            path,
            mode,
            modified: Timestamp::from_seconds(1_793_491_200),
            content: futures::stream::iter([Ok(Bytes::from_static(data))]).boxed(),
        })
    }

    async fn collect(mut chunks: BoxStream<'static, Result<Bytes, Error>>) -> Vec<u8> {
        let mut zip = Vec::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.unwrap();
            assert!(chunk.len() <= ARCHIVE_CHUNK_BYTES);
            zip.extend_from_slice(&chunk);
        }
        zip
    }

    /// Checks a zip with `unzip -t` and with Python's zipfile (CRCs included), and returns
    /// Python's "name mode size" lines.
    fn python_listing(zip: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.zip");
        std::fs::write(&file, zip).unwrap();
        let unzip = std::process::Command::new("unzip")
            .args(["-t", "-qq"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            unzip.status.success(),
            "unzip -t: {}{}",
            String::from_utf8_lossy(&unzip.stdout),
            String::from_utf8_lossy(&unzip.stderr)
        );
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(
                "import sys, zipfile\n\
                 z = zipfile.ZipFile(sys.argv[1])\n\
                 assert z.testzip() is None\n\
                 infos = z.infolist()\n\
                 print(len(infos))\n\
                 for i in infos[:3] + infos[-1:]:\n\
                 \x20   print(i.filename, oct(i.external_attr >> 16), i.file_size, z.read(i).decode())\n",
            )
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// More than 65,535 entries need the zip64 end records; Python and unzip read them all.
    #[tokio::test]
    async fn zip64_holds_more_than_65535_entries() {
        let n = 70_000;
        let entries = futures::stream::iter((0..n).map(|i| {
            entry(
                format!("d/{i:05}.txt"),
                b"x",
                if i == 0 { 0o755 } else { 0o644 },
            )
        }))
        .boxed();
        let zip = collect(stream_archive(entries, false)).await;
        let listing = python_listing(&zip);
        assert_eq!(
            listing,
            "70000\nd/00000.txt 0o100755 1 x\nd/00001.txt 0o100644 1 x\n\
             d/00002.txt 0o100644 1 x\nd/69999.txt 0o100644 1 x\n"
        );
        // The bound reserved before sending holds.
        let bound = archive_size_bound(n, n, n * 11, false);
        assert!((zip.len() as u64) <= bound, "{} > {bound}", zip.len());
    }

    /// Deflate, and an entry that fails mid-archive ends the stream with its error.
    #[tokio::test]
    async fn deflate_and_failures() {
        let entries = futures::stream::iter([
            entry("a.txt".into(), b"hello hello hello hello", 0o600),
            entry("b.txt".into(), b"", 0o644),
        ])
        .boxed();
        let zip = collect(stream_archive(entries, true)).await;
        assert_eq!(
            python_listing(&zip),
            "2\na.txt 0o100600 23 hello hello hello hello\nb.txt 0o100644 0 \nb.txt 0o100644 0 \n"
        );
        let failing = futures::stream::iter([
            entry("a.txt".into(), b"a", 0o644),
            Err(Error::DataLoss("blob gone".into())),
        ])
        .boxed();
        let mut chunks = stream_archive(failing, false);
        let mut last = None;
        while let Some(item) = chunks.next().await {
            last = Some(item);
        }
        assert!(matches!(last, Some(Err(Error::DataLoss(_)))));
    }
}
