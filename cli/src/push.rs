//! `artifact push`: a file, a folder (recursively, relative paths and unix modes kept), a
//! symlink (followed, or stored as a link with `--preserve-symlinks`) or stdin.
//!
//! Every file is one Push stream on the one connection, `--parallel` of them in flight. A
//! small file is read whole and declares its size and SHA-256, so the server takes it on its
//! inline path and verifies it before committing; a large one streams from a reader thread
//! in 512 KiB chunks with its size declared (a file that changes size meanwhile is refused,
//! nothing stored). A push that fails transiently is retried; a retry after an unseen
//! success returns that success instead of "already exists" (a forced push through its
//! idempotency key, any other by finding its own content at the path).

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use indicatif::ProgressBar;
use serde::Serialize;

use crate::connect::{Client, backoff};
use crate::error::{CliError, Exit, Result, is_transient};
use crate::output::{ArtifactJson, Output, human_bytes};
use crate::{paths, pb};

/// At most this size a push is read whole and sent with its digest (the server's inline path
/// takes up to 64 KiB).
pub const SMALL_FILE: u64 = 64 * 1024;
const CHUNK: usize = 512 * 1024;
/// Unix file-type bits of a symbolic link, carried in the mode of a link stored as a link.
pub const S_IFLNK: u32 = 0o120_000;
pub const S_IFMT: u32 = 0o170_000;

pub struct Options {
    pub force: bool,
    pub expire_in: Option<ExpireIn>,
    pub preserve_symlinks: bool,
    pub parallel: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpireIn {
    After(std::time::Duration),
    /// Pinned (Keep) so it never expires.
    Never,
}

/// `30s`, `10m`, `12h`, `30d`, `1w`, `1y` (365 days) or `never`.
pub fn parse_expire_in(text: &str) -> Result<ExpireIn> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("never") {
        return Ok(ExpireIn::Never);
    }
    let bad = || {
        CliError::usage(format!(
            "--expire-in '{text}' is not a duration: use a number and s, m, h, d, w or y (30d, 1w) or never"
        ))
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        "y" => 365 * 86_400,
        _ => return Err(bad()),
    };
    match number.checked_mul(seconds) {
        Some(0) | None => Err(bad()),
        Some(total) => Ok(ExpireIn::After(std::time::Duration::from_secs(total))),
    }
}

enum Source {
    Stdin,
    File(PathBuf),
    /// A symlink stored as a link: its target is the content.
    Link(Vec<u8>),
}

struct Item {
    source: Source,
    remote: String,
    mode: u32,
    size: u64,
}

#[derive(Serialize)]
struct Pushed {
    files: usize,
    bytes: i64,
    deduplicated: usize,
    artifacts: Vec<ArtifactJson>,
}

pub async fn run(
    client: &Client,
    out: &Output,
    scope: pb::Scope,
    source: &str,
    destination: Option<&str>,
    options: &Options,
) -> Result<()> {
    let (items, folder) = collect(source, destination, options.preserve_symlinks)?;
    if !options.force && folder {
        refuse_existing(client, &scope, &items).await?;
    }
    let total: u64 = items.iter().map(|i| i.size).sum();
    let bar = out.progress(total, "push");
    let header = pb::PushHeader {
        scope: Some(scope.clone()),
        force: options.force,
        expire_in: match options.expire_in {
            Some(ExpireIn::After(d)) => Some(prost_types::Duration {
                seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                nanos: 0,
            }),
            _ => None,
        },
        ..Default::default()
    };
    let header = Arc::new(header);
    let keep = options.expire_in == Some(ExpireIn::Never);
    let results: Vec<pb::PushResponse> = futures::stream::iter(items)
        .map(|item| {
            let (client, header, bar) = (client.clone(), header.clone(), bar.clone());
            async move {
                let response = push_one(&client, &header, item, &bar).await?;
                let artifact = response.artifact.clone().unwrap_or_default();
                if keep {
                    client
                        .retry(&format!("keep of '{}'", artifact.path), || {
                            let mut api = client.artifacts();
                            let request = pb::KeepRequest {
                                scope: artifact.scope.clone(),
                                path: artifact.path.clone(),
                                recursive: false,
                            };
                            async move { api.keep(request).await }
                        })
                        .await?;
                }
                out.file_done(
                    "pushed",
                    &artifact.path,
                    u64::try_from(artifact.size).unwrap_or(0),
                );
                Ok::<_, CliError>(response)
            }
        })
        .buffer_unordered(options.parallel)
        .try_collect()
        .await?;
    bar.finish_and_clear();
    let mut artifacts: Vec<ArtifactJson> = results
        .iter()
        .filter_map(|r| r.artifact.as_ref())
        .map(ArtifactJson::from)
        .collect();
    artifacts.sort_by(|a, b| a.path.cmp(&b.path));
    let summary = Pushed {
        files: artifacts.len(),
        bytes: artifacts.iter().map(|a| a.size).sum(),
        deduplicated: results.iter().filter(|r| r.deduplicated).count(),
        artifacts,
    };
    out.result(&summary, || {
        if folder {
            format!(
                "pushed {} files ({}) to {}",
                summary.files,
                human_bytes(u64::try_from(summary.bytes).unwrap_or(0)),
                scope_name(&scope)
            )
        } else {
            summary
                .artifacts
                .first()
                .map(|a| {
                    format!(
                        "pushed '{}' ({}, sha256 {}) to {}",
                        a.path,
                        human_bytes(u64::try_from(a.size).unwrap_or(0)),
                        a.sha256,
                        scope_name(&scope)
                    )
                })
                .unwrap_or_default()
        }
    });
    Ok(())
}

pub fn scope_name(scope: &pb::Scope) -> String {
    match pb::ScopeKind::try_from(scope.kind) {
        Ok(pb::ScopeKind::Job) => format!("job {}", scope.id),
        Ok(pb::ScopeKind::Workflow) => format!("workflow {}", scope.id),
        _ => format!("project {}", scope.project_id),
    }
}

/// What to push and whether it is a folder.
fn collect(source: &str, destination: Option<&str>, preserve: bool) -> Result<(Vec<Item>, bool)> {
    if source == "-" {
        let remote = destination.map(paths::to_relative).unwrap_or_default();
        if remote.is_empty() {
            return Err(CliError::usage(
                "pushing stdin needs a name: add -d NAME (e.g. `artifact push job - -d log.txt`)",
            ));
        }
        let item = Item {
            source: Source::Stdin,
            remote,
            mode: 0o644,
            size: 0,
        };
        return Ok((vec![item], false));
    }
    let local = Path::new(source);
    let meta = if preserve {
        std::fs::symlink_metadata(local)
    } else {
        std::fs::metadata(local)
    };
    let meta = meta.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => CliError::new(
            Exit::NotFound,
            format!("'{source}' does not exist locally: check the path"),
        ),
        _ => CliError::io("cannot read", local, &e),
    })?;
    let target = paths::push_target(source, destination);
    if meta.is_dir() {
        let items = walk(local, &target, preserve)?;
        return Ok((items, true));
    }
    if target.is_empty() {
        return Err(CliError::usage(format!(
            "'{source}' gives no file name: add -d NAME"
        )));
    }
    let item = item(local, &meta, target)?.ok_or_else(|| {
        CliError::usage(format!(
            "'{source}' is not a regular file, a folder or a symlink"
        ))
    })?;
    Ok((vec![item], false))
}

fn item(path: &Path, meta: &std::fs::Metadata, remote: String) -> Result<Option<Item>> {
    let file_type = meta.file_type();
    if file_type.is_symlink() {
        let target =
            std::fs::read_link(path).map_err(|e| CliError::io("cannot read the link", path, &e))?;
        let target = target.as_os_str().as_bytes().to_vec();
        return Ok(Some(Item {
            size: target.len() as u64,
            source: Source::Link(target),
            remote,
            mode: S_IFLNK | 0o777,
        }));
    }
    if !file_type.is_file() {
        return Ok(None);
    }
    Ok(Some(Item {
        source: Source::File(path.to_owned()),
        remote,
        mode: meta.permissions().mode() & 0o7777,
        size: meta.len(),
    }))
}

/// Every file under `dir` (symlinks followed unless `preserve`), under `target` remotely.
fn walk(dir: &Path, target: &str, preserve: bool) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    for entry in walkdir::WalkDir::new(dir)
        .follow_links(!preserve)
        .sort_by_file_name()
        .min_depth(1)
    {
        let entry = entry.map_err(|e| {
            let path = e.path().unwrap_or(dir).to_owned();
            let exit = match e.io_error().map(std::io::Error::kind) {
                Some(std::io::ErrorKind::NotFound) => Exit::NotFound,
                _ => Exit::Usage,
            };
            let why = e
                .io_error()
                .map_or_else(|| e.to_string(), std::io::Error::to_string);
            CliError::new(
                exit,
                format!(
                    "cannot read '{}': {why}: fix or remove it (a broken link can be pushed with --preserve-symlinks)",
                    path.display()
                ),
            )
        })?;
        if entry.file_type().is_dir() {
            continue;
        }
        let rel = entry.path().strip_prefix(dir).unwrap_or(entry.path());
        let rel = rel
            .to_str()
            .ok_or_else(|| {
                CliError::usage(format!(
                    "'{}' is not a UTF-8 name, which an artifact path must be: rename it",
                    entry.path().display()
                ))
            })?
            .to_owned();
        let meta = entry.metadata().map_err(|e| {
            CliError::usage(format!("cannot read '{}': {e}", entry.path().display()))
        })?;
        match item(entry.path(), &meta, paths::join(target, &rel))? {
            Some(item) => items.push(item),
            None => eprintln!(
                "artifact: skipping '{}': not a regular file or a symlink",
                entry.path().display()
            ),
        }
    }
    Ok(items)
}

/// Without --force a folder is pushed only if none of its targets exists: nothing is
/// uploaded when one does (no half-pushed folder).
async fn refuse_existing(client: &Client, scope: &pb::Scope, items: &[Item]) -> Result<()> {
    let prefix = common_prefix(items.iter().map(|i| i.remote.as_str()));
    let live = list_paths(client, scope, &prefix).await?;
    let taken: Vec<&str> = items
        .iter()
        .map(|i| i.remote.as_str())
        .filter(|p| live.contains(*p))
        .collect();
    if let Some(first) = taken.first() {
        let more = match taken.len() {
            1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        return Err(CliError::new(
            Exit::Exists,
            format!(
                "'{first}'{more} already exists in {}: add --force to replace it; nothing was pushed",
                scope_name(scope)
            ),
        ));
    }
    Ok(())
}

/// The longest folder prefix (`a/b/`) shared by every path, or empty.
fn common_prefix<'a>(mut paths: impl Iterator<Item = &'a str>) -> String {
    let Some(first) = paths.next() else {
        return String::new();
    };
    let mut prefix = match first.rfind('/') {
        Some(i) => &first[..=i],
        None => "",
    };
    for path in paths {
        while !path.starts_with(prefix) {
            prefix = match prefix[..prefix.len() - 1].rfind('/') {
                Some(i) => &prefix[..=i],
                None => "",
            };
        }
    }
    prefix.to_owned()
}

/// Every live path of a scope that starts with `prefix`.
pub async fn list_paths(
    client: &Client,
    scope: &pb::Scope,
    prefix: &str,
) -> Result<HashSet<String>> {
    Ok(list_all(client, scope, prefix)
        .await?
        .into_iter()
        .map(|a| a.path)
        .collect())
}

/// Every live artifact of a scope whose path starts with `prefix`, all pages.
pub async fn list_all(
    client: &Client,
    scope: &pb::Scope,
    prefix: &str,
) -> Result<Vec<pb::Artifact>> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = pb::ListRequest {
            scope: Some(scope.clone()),
            prefix: prefix.to_owned(),
            page_size: 1000,
            page_token: page_token.clone(),
        };
        let page = client
            .retry("list", || {
                let mut api = client.artifacts();
                let request = request.clone();
                async move { api.list(request).await }
            })
            .await?
            .into_inner();
        all.extend(page.artifacts);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        page_token = page.next_page_token;
    }
}

async fn push_one(
    client: &Client,
    header: &pb::PushHeader,
    item: Item,
    bar: &ProgressBar,
) -> Result<pb::PushResponse> {
    let mut header = header.clone();
    header.path = item.remote.clone();
    header.mode = item.mode;
    // A forced push carries an idempotency key, so a retry after an unseen success returns
    // that success instead of replacing it (and counting its ingress twice). A push without
    // --force needs none (a retry that finds the path taken by this push's content was this
    // push, below; a large file has its upload id), and without one the server commits a
    // new path in one statement instead of a transaction of several: a folder of small
    // files goes much faster.
    if header.force {
        header.idempotency_key = format!("{:032x}", fastrand::u128(..));
    }
    let what = format!("push of '{}'", item.remote);
    let data = match &item.source {
        Source::Link(target) => Bytes::from(target.clone()),
        Source::File(path) if item.size <= SMALL_FILE => Bytes::from(
            tokio::fs::read(path)
                .await
                .map_err(|e| CliError::io("cannot read", path, &e))?,
        ),
        Source::File(path) => {
            // Resumable: it retries (and resumes) by itself.
            return push_resumable(client, &header, path, item.size, bar)
                .await?
                .map_err(|status| CliError::status(&what, &status, &client.url));
        }
        Source::Stdin => {
            let stdin = Box::new(std::io::stdin());
            // Stdin cannot be read twice: no retry.
            return push_stream(client, &header, stdin, Path::new("stdin"), bar)
                .await?
                .map_err(|status| CliError::status(&what, &status, &client.url));
        }
    };
    let sha256 = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &data));
    let mut attempt = 0;
    loop {
        match push_whole(client, &header, data.clone(), &sha256).await {
            Ok(response) => {
                bar.inc(data.len() as u64);
                return Ok(response);
            }
            Err(status) if is_transient(&status) && attempt < client.retries() => {
                backoff(attempt).await;
                attempt += 1;
            }
            Err(status)
                if attempt > 0 && !header.force && status.code() == tonic::Code::AlreadyExists =>
            {
                // An earlier try may have been stored with its answer lost.
                if let Some(artifact) = stored_as(client, &header, &sha256).await {
                    bar.inc(data.len() as u64);
                    return Ok(pb::PushResponse {
                        artifact: Some(artifact),
                        deduplicated: false,
                    });
                }
                return Err(CliError::status(&what, &status, &client.url));
            }
            Err(status) => return Err(CliError::status(&what, &status, &client.url)),
        }
    }
}

/// The artifact at the header's path if it holds exactly this push (content and mode);
/// None if it holds something else or cannot be read (the caller reports "exists").
async fn stored_as(client: &Client, header: &pb::PushHeader, sha256: &str) -> Option<pb::Artifact> {
    let request = pb::StatRequest {
        scope: header.scope.clone(),
        path: header.path.clone(),
    };
    let artifact = client
        .retry(&format!("push of '{}'", header.path), || {
            let mut api = client.artifacts();
            let request = request.clone();
            async move { api.stat(request).await }
        })
        .await
        .ok()?
        .into_inner();
    let same = artifact.sha256 == sha256 && artifact.mode & 0o7777 == header.mode & 0o7777;
    same.then_some(artifact)
}

/// A large file pushed resumably (ByteStream-like): under an upload id of its own, so that
/// after a cut (UNAVAILABLE, reset) the push asks the server how many bytes it holds durably
/// (QueryUpload) and sends only the rest, from that offset of the file. ABORTED (the server
/// is still finishing the cut-off stream) and FAILED_PRECONDITION after a cut (it committed
/// more since it answered) mean: ask again. A server whose blob store cannot resume (an
/// object store: FAILED_PRECONDITION on the first Push) gets a plain push instead.
async fn push_resumable(
    client: &Client,
    header: &pb::PushHeader,
    path: &Path,
    size: u64,
    bar: &ProgressBar,
) -> Result<std::result::Result<pb::PushResponse, tonic::Status>> {
    use std::io::{Seek, SeekFrom};
    let mut header = header.clone();
    header.upload_id = format!("{:032x}", fastrand::u128(..));
    header.expected_size = Some(i64::try_from(size).unwrap_or(i64::MAX));
    let mut offset: i64 = 0;
    let mut attempt = 0;
    let mut cut = false;
    loop {
        header.write_offset = offset;
        let mut file =
            std::fs::File::open(path).map_err(|e| CliError::io("cannot read", path, &e))?;
        file.seek(SeekFrom::Start(u64::try_from(offset).unwrap_or(0)))
            .map_err(|e| CliError::io("cannot read", path, &e))?;
        let status = match push_stream(client, &header, Box::new(file), path, bar).await? {
            Ok(response) => return Ok(Ok(response)),
            Err(status) => status,
        };
        let again = is_transient(&status)
            || (cut
                && matches!(
                    status.code(),
                    tonic::Code::Aborted | tonic::Code::FailedPrecondition
                ));
        if !cut && offset == 0 && status.code() == tonic::Code::FailedPrecondition {
            // No resumable uploads on this server: the caller pushes plainly.
            header.upload_id.clear();
            header.write_offset = 0;
            let file =
                std::fs::File::open(path).map_err(|e| CliError::io("cannot read", path, &e))?;
            return push_stream(client, &header, Box::new(file), path, bar).await;
        }
        if !again || attempt >= client.retries() {
            return Ok(Err(status));
        }
        cut = true;
        backoff(attempt).await;
        attempt += 1;
        let query = pb::QueryUploadRequest {
            scope: header.scope.clone(),
            upload_id: header.upload_id.clone(),
        };
        let answer = client
            .retry(&format!("push of '{}'", header.path), || {
                let mut api = client.artifacts();
                let query = query.clone();
                async move { api.query_upload(query).await }
            })
            .await;
        match answer {
            Ok(answer) => {
                let answer = answer.into_inner();
                if answer.complete {
                    return Ok(Ok(pb::PushResponse {
                        artifact: answer.artifact,
                        deduplicated: false,
                    }));
                }
                offset = answer.committed_offset;
            }
            // The header never reached the server: start over.
            Err(error) if error.exit == Exit::NotFound => offset = 0,
            Err(error) => return Err(error),
        }
    }
}

/// A push of content held in memory, with its size and digest declared.
async fn push_whole(
    client: &Client,
    header: &pb::PushHeader,
    data: Bytes,
    sha256: &str,
) -> std::result::Result<pb::PushResponse, tonic::Status> {
    let mut header = header.clone();
    header.expected_size = Some(data.len() as i64);
    header.expected_sha256 = sha256.to_owned();
    let mut messages = vec![pb::PushRequest {
        msg: Some(pb::push_request::Msg::Header(header)),
    }];
    if !data.is_empty() {
        messages.push(pb::PushRequest {
            msg: Some(pb::push_request::Msg::Chunk(data)),
        });
    }
    client
        .artifacts()
        .push(tokio_stream::iter(messages))
        .await
        .map(tonic::Response::into_inner)
}

/// A push streamed from `reader` on a thread of its own. The outer error is the reader's
/// (reported in preference to what the server says of a stream that ended short).
async fn push_stream(
    client: &Client,
    header: &pb::PushHeader,
    reader: Box<dyn std::io::Read + Send>,
    path: &Path,
    bar: &ProgressBar,
) -> Result<std::result::Result<pb::PushResponse, tonic::Status>> {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(4);
    let progress = bar.clone();
    let reading = tokio::task::spawn_blocking(move || read_chunks(reader, &sender, &progress));
    let first = pb::PushRequest {
        msg: Some(pb::push_request::Msg::Header(header.clone())),
    };
    let chunks =
        tokio_stream::wrappers::ReceiverStream::new(receiver).map(|chunk| pb::PushRequest {
            msg: Some(pb::push_request::Msg::Chunk(chunk)),
        });
    let result = client
        .artifacts()
        .push(futures::stream::iter([first]).chain(chunks))
        .await
        .map(tonic::Response::into_inner);
    match reading.await {
        Ok(Ok(())) => Ok(result),
        Ok(Err(error)) => Err(CliError::io("cannot read", path, &error)),
        Err(join) => Err(CliError::usage(format!(
            "reading '{}' failed: {join}",
            path.display()
        ))),
    }
}

fn read_chunks(
    mut reader: Box<dyn std::io::Read + Send>,
    sender: &tokio::sync::mpsc::Sender<Bytes>,
    bar: &ProgressBar,
) -> std::io::Result<()> {
    use std::io::Read;
    loop {
        // `read_to_end` reads into the vector's spare capacity without zeroing it first (a
        // zeroed buffer per chunk cost a sixth of the CLI's CPU on a large push); the
        // `Bytes` takes the vector's allocation as it is.
        let mut buffer = Vec::with_capacity(CHUNK);
        (&mut reader).take(CHUNK as u64).read_to_end(&mut buffer)?;
        let filled = buffer.len();
        if filled == 0 {
            return Ok(());
        }
        bar.inc(filled as u64);
        if sender.blocking_send(Bytes::from(buffer)).is_err() {
            // The push ended (failed): its status says why.
            return Ok(());
        }
        if filled < CHUNK {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expire_in() {
        assert_eq!(parse_expire_in("never").unwrap(), ExpireIn::Never);
        assert_eq!(
            parse_expire_in("1w").unwrap(),
            ExpireIn::After(std::time::Duration::from_secs(604_800))
        );
        assert_eq!(
            parse_expire_in("30d").unwrap(),
            ExpireIn::After(std::time::Duration::from_secs(2_592_000))
        );
        for bad in ["", "d", "1", "0d", "1x", "-1d", "1.5d"] {
            assert_eq!(parse_expire_in(bad).unwrap_err().exit, Exit::Usage, "{bad}");
        }
    }

    #[test]
    fn common_prefixes() {
        assert_eq!(
            common_prefix(["a/b/c", "a/b/d", "a/b/e/f"].into_iter()),
            "a/b/"
        );
        assert_eq!(common_prefix(["a/b", "ab/c"].into_iter()), "");
        assert_eq!(common_prefix(["x"].into_iter()), "");
        assert_eq!(common_prefix(std::iter::empty()), "");
    }
}
