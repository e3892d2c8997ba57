//! `artifact pull`: a file, a folder (file by file, `--parallel` at once on one
//! connection), or a file to stdout (`-d -`).
//!
//! Why file by file rather than PullArchive: each file keeps its own SHA-256 (verified
//! against the server's before the file appears), its unix mode and link type (a zip built as
//! it streams carries neither reliably: its sizes and CRCs come after the data, which
//! streaming readers cannot trust), its own resumable offset, and needs no zip reader; with
//! many streams on one HTTP/2 connection the round trip per file is hidden.
//!
//! A file is written to a temporary file beside its destination, hashed as it arrives,
//! checked against the artifact's SHA-256 and size, given its mode and only then renamed into
//! place: a pull never leaves a truncated file under the real name. A destination that
//! exists and is not a regular file (`/dev/null`, a FIFO, a terminal) is written into
//! directly, as a shell's `>` would, never renamed over (that once replaced `/dev/null` with
//! a regular file), and needs no `--force` since nothing is replaced; its bytes are still
//! checked against the SHA-256, like stdout's. Without `--force` every other existing local
//! target is refused before anything is downloaded. A download cut mid-stream
//! (UNAVAILABLE, reset) resumes at the byte it stopped, with backoff and jitter.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use indicatif::ProgressBar;
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::connect::{Client, backoff};
use crate::error::{CliError, Exit, Result, is_transient};
use crate::output::{Output, human_bytes};
use crate::push::{S_IFLNK, S_IFMT, list_all, scope_name};
use crate::{paths, pb};

/// Files up to this size are gathered in memory and written in one go.
const IN_MEMORY: i64 = 1024 * 1024;

#[derive(Serialize)]
struct PulledFile {
    path: String,
    local: String,
    size: i64,
    sha256: String,
    mode: String,
}

#[derive(Serialize)]
struct Pulled {
    files: usize,
    bytes: i64,
    pulled: Vec<PulledFile>,
}

pub async fn run(
    client: &Client,
    out: &Output,
    scope: pb::Scope,
    source: &str,
    destination: Option<&str>,
    force: bool,
    parallel: usize,
) -> Result<()> {
    let remote = paths::remote_source(source);
    if remote.is_empty() {
        return Err(CliError::usage("name a file or a folder to pull"));
    }
    let stat = client
        .retry(&format!("pull of '{remote}'"), || {
            let mut api = client.artifacts();
            let request = pb::StatRequest {
                scope: Some(scope.clone()),
                path: remote.clone(),
            };
            async move { api.stat(request).await }
        })
        .await;
    let to_stdout = destination == Some("-");
    let (files, folder) = match stat {
        Ok(artifact) => {
            let artifact = artifact.into_inner();
            let local = if to_stdout {
                PathBuf::from("-")
            } else {
                PathBuf::from(paths::pull_target(&remote, destination))
            };
            (vec![(artifact, local)], false)
        }
        Err(error) if error.exit == Exit::NotFound => {
            let listed = list_all(client, &scope, &format!("{remote}/")).await?;
            if listed.is_empty() {
                return Err(CliError::new(
                    Exit::NotFound,
                    format!(
                        "'{remote}' not found in {}: check the path and the id (`artifact list` shows what is there)",
                        scope_name(&scope)
                    ),
                ));
            }
            if to_stdout {
                return Err(CliError::usage(format!(
                    "'{remote}' is a folder: only a file can be written to stdout"
                )));
            }
            let root = PathBuf::from(paths::pull_target(&remote, destination));
            let files = listed
                .into_iter()
                .map(|a| {
                    let rel = a.path[remote.len() + 1..].to_owned();
                    let local = root.join(rel);
                    (a, local)
                })
                .collect();
            (files, true)
        }
        Err(error) => return Err(error),
    };
    if !force && !to_stdout {
        for (_, local) in &files {
            if std::fs::symlink_metadata(local).is_ok() && !is_stream(local) {
                return Err(CliError::new(
                    Exit::Exists,
                    format!(
                        "'{}' already exists locally: delete it first or add --force; nothing was pulled",
                        local.display()
                    ),
                ));
            }
        }
    }
    let total: i64 = files.iter().map(|(a, _)| a.size).sum();
    let bar = out.progress(u64::try_from(total).unwrap_or(0), "pull");
    let (links, regular): (Vec<_>, Vec<_>) = files
        .into_iter()
        .partition(|(a, _)| a.mode & S_IFMT == S_IFLNK);
    let mut pulled: Vec<PulledFile> = futures::stream::iter(regular)
        .map(|(artifact, local)| {
            let (client, bar) = (client.clone(), bar.clone());
            async move {
                if local == Path::new("-") {
                    to_stdout_file(&client, &artifact, &bar).await?;
                } else {
                    to_file(&client, &artifact, &local, &bar).await?;
                }
                out.file_done(
                    "pulled",
                    &artifact.path,
                    u64::try_from(artifact.size).unwrap_or(0),
                );
                Ok::<_, CliError>(described(&artifact, &local))
            }
        })
        .buffer_unordered(parallel)
        .try_collect()
        .await?;
    // Links last, so no file of this pull is written through a link it made.
    for (artifact, local) in links {
        let target = fetch(&client.clone(), &artifact, Sink::Memory(Vec::new()), &bar).await?;
        make_link(&local, &target)?;
        pulled.push(described(&artifact, &local));
    }
    bar.finish_and_clear();
    pulled.sort_by(|a, b| a.path.cmp(&b.path));
    let summary = Pulled {
        files: pulled.len(),
        bytes: pulled.iter().map(|p| p.size).sum(),
        pulled,
    };
    if to_stdout {
        // The content went to stdout; a summary there would corrupt it.
        if out.json {
            let mut stderr = std::io::stderr().lock();
            let _ = serde_json::to_writer(&mut stderr, &summary);
            let _ = std::io::Write::write_all(&mut stderr, b"\n");
        }
        return Ok(());
    }
    out.result(&summary, || {
        if folder {
            format!(
                "pulled {} files ({}) into '{}'",
                summary.files,
                human_bytes(u64::try_from(summary.bytes).unwrap_or(0)),
                paths::pull_target(&remote, destination)
            )
        } else {
            summary
                .pulled
                .first()
                .map(|p| {
                    format!(
                        "pulled '{}' to '{}' ({})",
                        p.path,
                        p.local,
                        human_bytes(u64::try_from(p.size).unwrap_or(0))
                    )
                })
                .unwrap_or_default()
        }
    });
    Ok(())
}

fn described(artifact: &pb::Artifact, local: &Path) -> PulledFile {
    PulledFile {
        path: artifact.path.clone(),
        local: local.display().to_string(),
        size: artifact.size,
        sha256: artifact.sha256.clone(),
        mode: format!("{:o}", artifact.mode),
    }
}

fn make_link(local: &Path, target: &[u8]) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    if let Some(parent) = local.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| CliError::io("cannot create the folder", parent, &e))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(local) {
        if meta.is_dir() {
            return Err(CliError::new(
                Exit::Exists,
                format!(
                    "'{}' is a folder locally: remove it to pull a link there",
                    local.display()
                ),
            ));
        }
        std::fs::remove_file(local).map_err(|e| CliError::io("cannot replace", local, &e))?;
    }
    std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), local)
        .map_err(|e| CliError::io("cannot create the link", local, &e))
}

/// Where the bytes of one download go.
enum Sink {
    Memory(Vec<u8>),
    /// A writer thread that hashes and writes; it answers with the digest at the end.
    Writer(tokio::sync::mpsc::Sender<Bytes>),
    Stdout(tokio::io::Stdout, aws_lc_rs::digest::Context),
}

impl Sink {
    async fn put(&mut self, chunk: Bytes) -> std::io::Result<()> {
        match self {
            Sink::Memory(data) => {
                data.extend_from_slice(&chunk);
                Ok(())
            }
            Sink::Writer(sender) => sender
                .send(chunk)
                .await
                .map_err(|_| std::io::Error::other("the writer stopped")),
            Sink::Stdout(stdout, hasher) => {
                hasher.update(&chunk);
                stdout.write_all(&chunk).await
            }
        }
    }
}

/// Downloads `artifact` into `sink`, resuming at the last byte received after a transient
/// failure; returns the content when the sink is memory (else empty).
async fn fetch(
    client: &Client,
    artifact: &pb::Artifact,
    mut sink: Sink,
    bar: &ProgressBar,
) -> Result<Vec<u8>> {
    let what = format!("pull of '{}'", artifact.path);
    let mut received: i64 = 0;
    let mut attempt = 0;
    loop {
        match fetch_from(client, artifact, &mut sink, &mut received, bar).await {
            Ok(()) if received == artifact.size => break,
            Ok(()) => {
                // The stream ended early without an error: treat it as a cut.
                if attempt >= client.retries() {
                    return Err(CliError::new(
                        Exit::Unavailable,
                        format!("{what}: the server ended the download early: try again later"),
                    ));
                }
            }
            Err(Fetch::Status(status)) if is_transient(&status) && attempt < client.retries() => {}
            Err(Fetch::Status(status)) => {
                return Err(CliError::status(&what, &status, &client.url));
            }
            Err(Fetch::Fatal(error)) => return Err(error),
        }
        backoff(attempt).await;
        attempt += 1;
    }
    match sink {
        Sink::Memory(data) => {
            check_digest(artifact, &sha256_hex(&data))?;
            Ok(data)
        }
        Sink::Stdout(mut stdout, hasher) => {
            stdout
                .flush()
                .await
                .map_err(|e| CliError::io("cannot write", Path::new("stdout"), &e))?;
            check_digest(artifact, &hex::encode(hasher.finish()))?;
            Ok(Vec::new())
        }
        Sink::Writer(_) => Ok(Vec::new()),
    }
}

enum Fetch {
    Status(tonic::Status),
    Fatal(CliError),
}

impl From<tonic::Status> for Fetch {
    fn from(status: tonic::Status) -> Self {
        Fetch::Status(status)
    }
}

/// One Pull from `received` on.
async fn fetch_from(
    client: &Client,
    artifact: &pb::Artifact,
    sink: &mut Sink,
    received: &mut i64,
    bar: &ProgressBar,
) -> std::result::Result<(), Fetch> {
    let mut stream = client
        .artifacts()
        .pull(pb::PullRequest {
            scope: artifact.scope.clone(),
            path: artifact.path.clone(),
            offset: *received,
            length: 0,
        })
        .await?
        .into_inner();
    while let Some(message) = stream.message().await? {
        match message.msg {
            Some(pb::pull_response::Msg::Artifact(now))
                if now.sha256 != artifact.sha256 || now.size != artifact.size =>
            {
                return Err(Fetch::Fatal(CliError::usage(format!(
                    "'{}' was replaced on the server while it was being pulled: pull again",
                    artifact.path
                ))));
            }
            Some(pb::pull_response::Msg::Chunk(chunk)) => {
                let n = chunk.len() as i64;
                if *received + n > artifact.size {
                    return Err(Fetch::Fatal(CliError::usage(format!(
                        "the server sent more of '{}' than its size: pull again",
                        artifact.path
                    ))));
                }
                sink.put(chunk).await.map_err(|e| {
                    Fetch::Fatal(CliError::io("cannot write", Path::new(&artifact.path), &e))
                })?;
                *received += n;
                bar.inc(n as u64);
            }
            Some(pb::pull_response::Msg::Artifact(_)) | None => {}
        }
    }
    Ok(())
}

fn check_digest(artifact: &pb::Artifact, got: &str) -> Result<()> {
    if got == artifact.sha256 {
        Ok(())
    } else {
        Err(CliError::usage(format!(
            "'{}' arrived with SHA-256 {got}, not {}: nothing was kept; pull again",
            artifact.path, artifact.sha256
        )))
    }
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data))
}

async fn to_stdout_file(client: &Client, artifact: &pb::Artifact, bar: &ProgressBar) -> Result<()> {
    let sink = Sink::Stdout(
        tokio::io::stdout(),
        aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256),
    );
    fetch(client, artifact, sink, bar).await.map(|_| ())
}

/// Whether `local` exists and is something to write into rather than a file to replace: a
/// character or block device, a FIFO or a socket (links followed, as `>` follows them).
pub(crate) fn is_stream(local: &Path) -> bool {
    std::fs::metadata(local).is_ok_and(|m| !m.is_file() && !m.is_dir())
}

/// Downloads into a temporary file beside `local`, verifies, sets the mode, renames; or
/// straight into `local` when it is a device or a FIFO ([`is_stream`]).
async fn to_file(
    client: &Client,
    artifact: &pb::Artifact,
    local: &Path,
    bar: &ProgressBar,
) -> Result<()> {
    if is_stream(local) {
        let path = local.to_owned();
        // Opening a FIFO waits for its reader: not on a runtime thread.
        let file = tokio::task::spawn_blocking(move || {
            std::fs::OpenOptions::new().write(true).open(&path)
        })
        .await
        .map_err(|e| CliError::usage(format!("opening failed: {e}")))?
        .map_err(|e| CliError::io("cannot write", local, &e))?;
        return download_to(client, artifact, file, local, bar).await;
    }
    let parent = local
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let name = local
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "artifact".into());
    let temp = parent.join(format!(".{name}.{:016x}.artifact-part", fastrand::u64(..)));
    tokio::fs::create_dir_all(&parent)
        .await
        .map_err(|e| CliError::io("cannot create the folder", &parent, &e))?;
    let result = match std::fs::File::create(&temp) {
        Ok(file) => download_to(client, artifact, file, &temp, bar).await,
        Err(e) => Err(CliError::io("cannot write", &temp, &e)),
    };
    let result = result.and_then(|()| {
        std::fs::set_permissions(
            &temp,
            std::fs::Permissions::from_mode(artifact.mode & 0o7777),
        )
        .map_err(|e| CliError::io("cannot set the mode of", &temp, &e))?;
        if std::fs::symlink_metadata(local).is_ok_and(|m| m.is_dir()) {
            return Err(CliError::new(
                Exit::Exists,
                format!(
                    "'{}' is a folder locally: remove it to pull a file there",
                    local.display()
                ),
            ));
        }
        std::fs::rename(&temp, local).map_err(|e| CliError::io("cannot write", local, &e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// Downloads `artifact` into `file` (opened for writing; `path` names it in errors), checking
/// its size and SHA-256.
async fn download_to(
    client: &Client,
    artifact: &pb::Artifact,
    mut file: std::fs::File,
    path: &Path,
    bar: &ProgressBar,
) -> Result<()> {
    if artifact.size <= IN_MEMORY {
        let data = fetch(client, artifact, Sink::Memory(Vec::new()), bar).await?;
        let path = path.to_owned();
        return tokio::task::spawn_blocking(move || {
            std::io::Write::write_all(&mut file, &data)
                .map_err(|e| CliError::io("cannot write", &path, &e))
        })
        .await
        .map_err(|e| CliError::usage(format!("writing failed: {e}")))?;
    }
    let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(16);
    let writer = tokio::task::spawn_blocking(move || write_and_hash(file, receiver));
    let fetched = fetch(client, artifact, Sink::Writer(sender), bar).await;
    let written = writer
        .await
        .map_err(|e| CliError::usage(format!("writing failed: {e}")))?
        .map_err(|e| CliError::io("cannot write", path, &e));
    fetched?;
    let (size, digest) = written?;
    if i64::try_from(size).ok() != Some(artifact.size) {
        return Err(CliError::usage(format!(
            "'{}' arrived with {size} bytes, not {}: nothing was kept; pull again",
            artifact.path, artifact.size
        )));
    }
    check_digest(artifact, &digest)
}

/// Writes the chunks to `file` on this thread while another hashes them: one core hashes
/// (SHA-256) about as fast as one copies into the page cache, so doing both in turn would
/// halve a download's speed. Chunks go to `write` as they come (each is tens of KiB or more;
/// a buffer would only add a copy). Returns the bytes written and the hex digest.
fn write_and_hash(
    mut file: std::fs::File,
    mut receiver: tokio::sync::mpsc::Receiver<Bytes>,
) -> std::io::Result<(u64, String)> {
    use std::io::Write;
    let (to_hasher, chunks) = std::sync::mpsc::sync_channel::<Bytes>(16);
    let hasher = std::thread::spawn(move || {
        let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for chunk in chunks {
            context.update(&chunk);
        }
        hex::encode(context.finish())
    });
    let mut written = 0u64;
    let mut result = Ok(());
    while let Some(chunk) = receiver.blocking_recv() {
        // A clone of a `Bytes` shares the buffer: no copy.
        if to_hasher.send(chunk.clone()).is_err() {
            result = Err(std::io::Error::other("the hashing thread stopped"));
            break;
        }
        if let Err(error) = file.write_all(&chunk) {
            result = Err(error);
            break;
        }
        written += chunk.len() as u64;
    }
    drop(to_hasher);
    let digest = hasher
        .join()
        .map_err(|_| std::io::Error::other("the hashing thread panicked"))?;
    result.map(|()| (written, digest))
}
