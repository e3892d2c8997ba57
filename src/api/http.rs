//! Downloads over HTTP, shaped like GitLab's job artifacts API, for curl and browsers:
//!
//! | route | serves |
//! |---|---|
//! | `GET /api/v1/projects/{project}/jobs/{job}/artifacts` | the job's files as a zip |
//! | `GET …/jobs/{job}/artifacts/{*path}` | one file of the job |
//! | `DELETE …/jobs/{job}/artifacts` | ends every file of the job |
//! | `GET …/jobs/artifacts/{ref}/download?job={name}` | zip of the latest PASSED job |
//! | `GET …/jobs/artifacts/{ref}/raw/{*path}?job={name}` | one file of that job |
//! | `GET …/workflows/{id}/artifacts[/{*path}]`, `GET …/artifacts[/{*path}]` | workflow and project scopes |
//!
//! Tokens are checked by the same code as gRPC (`Authorization: Bearer`, `JOB-TOKEN`,
//! `?job_token=`), then the role matrix, then the request's fields; errors take their HTTP
//! status from the gRPC code they would have (401, 403, 400, 404, 416, 429, 503…), with the
//! same message. Files carry `ETag` (the quoted SHA-256), answer `If-None-Match` with 304
//! and a single `Range` as RFC 9110 says (206, or 416 when unsatisfiable; `If-Range`
//! honoured); bodies stream from the blob store and are metered as egress exactly as a Pull
//! is. Every body (file or zip) holds a slot of the server's stream bound while it is sent
//! and is abandoned when its client reads nothing for the idle timeout, like a Pull.

use std::collections::HashMap;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::streams::StreamLimit;
use crate::auth::Authenticator;
use crate::domain::{
    Access, ArtifactPath, Error, JobLabel, Principal, ProjectId, Scope, ScopeKind, authorize,
};
use crate::service::{ArchiveSpec, ArtifactService, Jobs, PullSpec};

#[derive(Debug, Clone)]
pub struct Downloads {
    artifacts: ArtifactService,
    jobs: Jobs,
    auth: Authenticator,
    /// The server's bound on open streams, shared with gRPC.
    streams: StreamLimit,
}

impl Downloads {
    pub fn new(
        artifacts: ArtifactService,
        jobs: Jobs,
        auth: Authenticator,
        streams: StreamLimit,
    ) -> Self {
        Self {
            artifacts,
            jobs,
            auth,
            streams,
        }
    }

    /// The download routes, to be merged into the HTTP side's router.
    pub fn router(self) -> Router {
        const P: &str = "/api/v1/projects/{project}";
        Router::new()
            .route(
                &format!("{P}/jobs/{{job}}/artifacts"),
                get(job_archive).delete(delete_job_artifacts),
            )
            .route(
                &format!("{P}/jobs/{{job}}/artifacts/{{*path}}"),
                get(job_file),
            )
            .route(
                &format!("{P}/jobs/artifacts/{{git_ref}}/download"),
                get(latest_archive),
            )
            .route(
                &format!("{P}/jobs/artifacts/{{git_ref}}/raw/{{*path}}"),
                get(latest_file),
            )
            .route(
                &format!("{P}/workflows/{{workflow}}/artifacts"),
                get(workflow_archive),
            )
            .route(
                &format!("{P}/workflows/{{workflow}}/artifacts/{{*path}}"),
                get(workflow_file),
            )
            .route(&format!("{P}/artifacts"), get(project_archive))
            .route(&format!("{P}/artifacts/{{*path}}"), get(project_file))
            .with_state(self)
    }

    fn principal(&self, headers: &HeaderMap, uri: &Uri) -> Result<Principal, Error> {
        self.auth.authenticate_http(headers, uri.query())
    }

    /// Authenticates, parses the scope, authorizes reading it.
    fn readable_scope(
        &self,
        headers: &HeaderMap,
        uri: &Uri,
        project: &str,
        kind: ScopeKind,
        id: &str,
    ) -> Result<Scope, Error> {
        let principal = self.principal(headers, uri)?;
        let scope = Scope::parse("scope", project, kind, id)?;
        authorize(&principal, Access::ReadArtifacts(&scope))?;
        Ok(scope)
    }

    /// Authenticates, authorizes reading the project's latest jobs, then finds the latest
    /// PASSED job of (ref, `?job=` name).
    async fn latest_scope(
        &self,
        headers: &HeaderMap,
        uri: &Uri,
        project: &str,
        git_ref: &str,
        query: &HashMap<String, String>,
    ) -> Result<Scope, Error> {
        let principal = self.principal(headers, uri)?;
        let project = ProjectId::parse("project", project)?;
        authorize(&principal, Access::ReadLatestJobs(&project))?;
        let git_ref = JobLabel::parse("ref", git_ref)?;
        let name = query
            .get("job")
            .ok_or_else(|| Error::invalid("job", "the query parameter ?job=NAME is required"))?;
        let name = JobLabel::parse("job", name)?;
        self.jobs.latest_scope(&project, &git_ref, &name).await
    }

    /// A zip of a whole scope, as an attachment named after what it holds.
    async fn archive(&self, scope: Scope, filename: String) -> Result<Response, Error> {
        let slot = self.streams.slot()?;
        let archive = self
            .artifacts
            .archive(ArchiveSpec {
                scope,
                prefix: String::new(),
                deflate: false,
            })
            .await?;
        Ok((
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/zip"),
                ),
                (
                    header::CONTENT_DISPOSITION,
                    header_value(&format!("attachment; filename=\"{filename}\""))?,
                ),
            ],
            Body::from_stream(self.streams.watch(archive.chunks, slot)),
        )
            .into_response())
    }

    /// One file: 304 when the client's ETag matches, 206 for a satisfiable single range
    /// (unless `If-Range` names another version), 416 for an unsatisfiable one, else 200.
    async fn file(&self, scope: Scope, path: &str, headers: &HeaderMap) -> Result<Response, Error> {
        let path = ArtifactPath::parse("path", path)?;
        let artifact = self.artifacts.stat(&scope, &path).await?;
        let etag = header_value(&format!("\"{}\"", artifact.sha256))?;
        if let Some(wanted) = headers.get(header::IF_NONE_MATCH)
            && etag_matches(wanted, &etag)
        {
            return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
        }
        let size = u64::try_from(artifact.size).unwrap_or(0);
        let asked = headers
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .filter(|_| if_range_holds(headers.get(header::IF_RANGE), &etag));
        let range = match asked {
            None => None,
            Some(value) => match byte_range(value, size) {
                RangeAsked::Ignored => None,
                RangeAsked::Satisfiable(first, last) => Some((first, last)),
                RangeAsked::Unsatisfiable => {
                    return Ok((
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        [
                            (
                                header::CONTENT_RANGE,
                                header_value(&format!("bytes */{size}"))?,
                            ),
                            (header::ETAG, etag),
                        ],
                    )
                        .into_response());
                }
            },
        };
        // Pull's length 0 is "to the end": the whole file is whatever is there when it starts.
        let (offset, length) = match range {
            Some((first, last)) => (first, last - first + 1),
            None => (0, 0),
        };
        let slot = self.streams.slot()?;
        let pull = self
            .artifacts
            .pull(PullSpec {
                target: crate::domain::ScopedPath {
                    scope,
                    path: path.clone(),
                },
                offset: i64::try_from(offset).unwrap_or(i64::MAX),
                length: i64::try_from(length).unwrap_or(i64::MAX),
            })
            .await?;
        // The file may have been replaced between the two lookups: describe what is sent.
        let sent_size = u64::try_from(pull.artifact.size).unwrap_or(0);
        let rest = sent_size.saturating_sub(offset);
        let length = if range.is_some() {
            length.min(rest)
        } else {
            rest
        };
        let mut response = Response::builder()
            .header(header::CONTENT_LENGTH, length)
            .header(
                header::CONTENT_TYPE,
                header_value(
                    mime_guess::from_path(path.as_str())
                        .first_or_octet_stream()
                        .essence_str(),
                )?,
            )
            .header(
                header::ETAG,
                header_value(&format!("\"{}\"", pull.artifact.sha256))?,
            )
            .header(header::ACCEPT_RANGES, "bytes");
        if range.is_some() {
            response = response.status(StatusCode::PARTIAL_CONTENT).header(
                header::CONTENT_RANGE,
                format!(
                    "bytes {offset}-{}/{sent_size}",
                    (offset + length).saturating_sub(1)
                ),
            );
        }
        response
            .body(Body::from_stream(self.streams.watch(pull.chunks, slot)))
            .map_err(|e| Error::Internal(format!("building a response: {e}")))
    }
}

/// What a `Range` header asks of a file of `size` bytes (RFC 9110 §14).
#[derive(Debug, PartialEq, Eq)]
enum RangeAsked {
    /// Send the whole file with 200: another unit, a header that does not parse, or several
    /// ranges of which one at least is satisfiable (RFC 9110 lets a server ignore Range; it
    /// serves no multipart bodies).
    Ignored,
    /// 206 with these bytes (first and last, inclusive).
    Satisfiable(u64, u64),
    /// 416 with `Content-Range: bytes */size`.
    Unsatisfiable,
}

fn byte_range(value: &str, size: u64) -> RangeAsked {
    let Some((unit, set)) = value.split_once('=') else {
        return RangeAsked::Ignored;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return RangeAsked::Ignored;
    }
    // `1#range-spec`: elements separated by commas with optional whitespace; empty ones
    // are allowed and do not count.
    let mut asked: Vec<RangeAsked> = set
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| range_spec(s, size))
        .collect();
    if asked.len() == 1 {
        return asked.pop().unwrap_or(RangeAsked::Ignored);
    }
    // Several: 416 only when every one is valid and none can be served.
    if !asked.is_empty() && asked.iter().all(|a| *a == RangeAsked::Unsatisfiable) {
        return RangeAsked::Unsatisfiable;
    }
    RangeAsked::Ignored
}

/// One `range-spec`: `first-last`, `first-` or `-suffix`. `Ignored` when it is not valid
/// (last before first, not digits), which makes the whole header invalid.
fn range_spec(spec: &str, size: u64) -> RangeAsked {
    let Some((first, last)) = spec.split_once('-') else {
        return RangeAsked::Ignored;
    };
    match (first, last) {
        ("", suffix) => match digits(suffix) {
            None => RangeAsked::Ignored,
            // A suffix longer than the file is the whole file; an empty file or a zero
            // suffix has nothing to send.
            Some(0) => RangeAsked::Unsatisfiable,
            Some(_) if size == 0 => RangeAsked::Unsatisfiable,
            Some(n) => RangeAsked::Satisfiable(size - n.min(size), size - 1),
        },
        (first, last) => {
            let Some(first) = digits(first) else {
                return RangeAsked::Ignored;
            };
            let last = match last {
                "" => u64::MAX,
                last => match digits(last) {
                    Some(last) if last >= first => last,
                    _ => return RangeAsked::Ignored,
                },
            };
            if first >= size {
                RangeAsked::Unsatisfiable
            } else {
                RangeAsked::Satisfiable(first, last.min(size - 1))
            }
        }
    }
}

/// A decimal number of one or more digits; one past `u64::MAX` reads as `u64::MAX` (it
/// is beyond any file either way).
fn digits(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.bytes().fold(0u64, |n, b| {
        n.saturating_mul(10).saturating_add(u64::from(b - b'0'))
    }))
}

/// Whether a `Range` may be honoured given `If-Range` (RFC 9110 §13.1.5): with no
/// `If-Range`, yes; with one, only if it is this file's ETag, compared strongly. A date
/// never matches (no `Last-Modified` is sent), so the whole file comes back.
fn if_range_holds(if_range: Option<&HeaderValue>, etag: &HeaderValue) -> bool {
    match if_range {
        None => true,
        Some(value) => value.as_bytes().trim_ascii() == etag.as_bytes(),
    }
}

/// `If-None-Match: "a", "b"` or `*` against the file's ETag (weak comparison).
fn etag_matches(wanted: &HeaderValue, etag: &HeaderValue) -> bool {
    let (Ok(wanted), Ok(etag)) = (wanted.to_str(), etag.to_str()) else {
        return false;
    };
    wanted
        .split(',')
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == "*" || tag == etag)
}

fn header_value(value: &str) -> Result<HeaderValue, Error> {
    HeaderValue::from_str(value).map_err(|_| Error::Internal(format!("bad header value {value:?}")))
}

/// A name for a download: the characters of ids, anything else as `_`.
fn filename(parts: &[&str]) -> String {
    let name: String = parts
        .join("-")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{name}.zip")
}

/// The one mapping from the error taxonomy to HTTP: through the gRPC status, so messages
/// (and what is hidden from clients) are the same on both sides.
pub struct HttpError(Error);

impl From<Error> for HttpError {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

/// The HTTP status of a gRPC code, for every route of the HTTP port.
pub fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code;
    match code {
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::OutOfRange => StatusCode::RANGE_NOT_SATISFIABLE,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = tonic::Status::from(self.0);
        let code = http_status(status.code());
        let body = format!("{}\n", status.message());
        if code == StatusCode::UNAUTHORIZED {
            return (code, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response();
        }
        (code, body).into_response()
    }
}

type Reply = Result<Response, HttpError>;
type Params = Query<HashMap<String, String>>;

async fn job_archive(
    State(d): State<Downloads>,
    Path((project, job)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
) -> Reply {
    let scope = d.readable_scope(&headers, &uri, &project, ScopeKind::Job, &job)?;
    Ok(d.archive(scope, filename(&[&project, "job", &job])).await?)
}

async fn job_file(
    State(d): State<Downloads>,
    Path((project, job, path)): Path<(String, String, String)>,
    headers: HeaderMap,
    uri: Uri,
) -> Reply {
    let scope = d.readable_scope(&headers, &uri, &project, ScopeKind::Job, &job)?;
    Ok(d.file(scope, &path, &headers).await?)
}

/// Ends every file of a job (GitLab's DELETE of a job's artifacts): 204, or 404 when it
/// had none. Who may: as for gRPC Delete of that scope.
async fn delete_job_artifacts(
    State(d): State<Downloads>,
    Path((project, job)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
) -> Reply {
    let principal = d.principal(&headers, &uri)?;
    let scope = Scope::parse("scope", &project, ScopeKind::Job, &job)?;
    authorize(&principal, Access::DeleteArtifacts(&scope))?;
    d.artifacts.delete_scope(&scope).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn latest_archive(
    State(d): State<Downloads>,
    Path((project, git_ref)): Path<(String, String)>,
    Query(query): Params,
    headers: HeaderMap,
    uri: Uri,
) -> Reply {
    let scope = d
        .latest_scope(&headers, &uri, &project, &git_ref, &query)
        .await?;
    let name = query.get("job").map(String::as_str).unwrap_or_default();
    Ok(d.archive(scope, filename(&[&project, &git_ref, name]))
        .await?)
}

async fn latest_file(
    State(d): State<Downloads>,
    Path((project, git_ref, path)): Path<(String, String, String)>,
    Query(query): Params,
    headers: HeaderMap,
    uri: Uri,
) -> Reply {
    let scope = d
        .latest_scope(&headers, &uri, &project, &git_ref, &query)
        .await?;
    Ok(d.file(scope, &path, &headers).await?)
}

async fn workflow_archive(
    State(d): State<Downloads>,
    Path((project, workflow)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
) -> Reply {
    let scope = d.readable_scope(&headers, &uri, &project, ScopeKind::Workflow, &workflow)?;
    Ok(
        d.archive(scope, filename(&[&project, "workflow", &workflow]))
            .await?,
    )
}

async fn workflow_file(
    State(d): State<Downloads>,
    Path((project, workflow, path)): Path<(String, String, String)>,
    headers: HeaderMap,
    uri: Uri,
) -> Reply {
    let scope = d.readable_scope(&headers, &uri, &project, ScopeKind::Workflow, &workflow)?;
    Ok(d.file(scope, &path, &headers).await?)
}

async fn project_archive(
    State(d): State<Downloads>,
    Path(project): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Reply {
    let scope = d.readable_scope(&headers, &uri, &project, ScopeKind::Project, "")?;
    Ok(d.archive(scope, filename(&[&project, "project"])).await?)
}

async fn project_file(
    State(d): State<Downloads>,
    Path((project, path)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
) -> Reply {
    let scope = d.readable_scope(&headers, &uri, &project, ScopeKind::Project, "")?;
    Ok(d.file(scope, &path, &headers).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_as_rfc_9110_reads_them() {
        use RangeAsked::{Ignored, Satisfiable as Part, Unsatisfiable as No};
        for (value, size, asked) in [
            ("bytes=0-9", 100, Part(0, 9)),
            ("bytes=90-", 100, Part(90, 99)),
            ("bytes=0-", 100, Part(0, 99)),
            ("bytes=-10", 100, Part(90, 99)),
            // A suffix longer than the file is the whole file, not 416.
            ("bytes=-100", 100, Part(0, 99)),
            ("bytes=-500", 100, Part(0, 99)),
            ("bytes=-99999999999999999999999", 100, Part(0, 99)),
            ("bytes=50-500", 100, Part(50, 99)),
            ("bytes=0-99999999999999999999999", 100, Part(0, 99)),
            ("bytes=99-99", 100, Part(99, 99)),
            ("Bytes = 1-2", 100, Part(1, 2)),
            ("bytes=, 1-2 ,", 100, Part(1, 2)),
            // Start at or past the end, a zero suffix, anything of an empty file: 416.
            ("bytes=100-", 100, No),
            ("bytes=100-200", 100, No),
            ("bytes=99999999999999999999999-", 100, No),
            ("bytes=-0", 100, No),
            ("bytes=0-", 0, No),
            ("bytes=-5", 0, No),
            ("bytes=200-300,400-", 100, No),
            // Several ranges (one servable), other units, bad syntax: the whole file.
            ("bytes=0-1,5-6", 100, Ignored),
            ("bytes=0-1,200-300", 100, Ignored),
            ("bytes=200-300,0-", 100, Ignored),
            ("bytes=5-1", 100, Ignored),
            ("bytes=200-300,5-1", 100, Ignored),
            ("bytes=a-b", 100, Ignored),
            ("bytes=1-2-3", 100, Ignored),
            ("bytes=--1", 100, Ignored),
            ("bytes=+1-2", 100, Ignored),
            ("bytes= 1 - 2", 100, Ignored),
            ("bytes=", 100, Ignored),
            ("bytes", 100, Ignored),
            ("lines=0-1", 100, Ignored),
        ] {
            assert_eq!(byte_range(value, size), asked, "{value} of {size}");
        }
    }

    #[test]
    fn if_range_takes_only_this_etag_strongly() {
        let etag = HeaderValue::from_static("\"abc\"");
        assert!(if_range_holds(None, &etag));
        assert!(if_range_holds(
            Some(&HeaderValue::from_static("\"abc\"")),
            &etag
        ));
        for no in ["\"abd\"", "W/\"abc\"", "Sat, 29 Oct 1994 19:43:31 GMT", ""] {
            assert!(
                !if_range_holds(Some(&HeaderValue::from_static(no)), &etag),
                "{no}"
            );
        }
    }

    #[test]
    fn etags_match_lists_and_wildcards() {
        let etag = HeaderValue::from_static("\"abc\"");
        for yes in ["\"abc\"", "\"x\", \"abc\"", "*", "W/\"abc\""] {
            assert!(etag_matches(&HeaderValue::from_static(yes), &etag), "{yes}");
        }
        assert!(!etag_matches(&HeaderValue::from_static("\"abd\""), &etag));
    }

    #[test]
    fn filenames_keep_id_characters_only() {
        assert_eq!(
            filename(&["p", "feature/x y", "test: 1"]),
            "p-feature_x_y-test__1.zip"
        );
    }
}
