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
//! and a single `Range` with 206 (416 when it cannot be satisfied); bodies stream from the
//! blob store and are metered as egress exactly as a Pull is.

use std::collections::HashMap;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

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
}

impl Downloads {
    pub fn new(artifacts: ArtifactService, jobs: Jobs, auth: Authenticator) -> Self {
        Self {
            artifacts,
            jobs,
            auth,
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
            Body::from_stream(archive.chunks),
        )
            .into_response())
    }

    /// One file: 304 when the client's ETag matches, 206 for a satisfiable single range,
    /// 416 for an unsatisfiable one, else 200.
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
        let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
            None => None,
            Some(value) => match single_range(value, size) {
                RangeAsked::Ignored => None,
                RangeAsked::Satisfiable(range) => Some(range),
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
        let (offset, length) = match &range {
            Some(range) => (*range.start(), range.end() - range.start() + 1),
            None => (0, size),
        };
        let pull = self
            .artifacts
            .pull(PullSpec {
                target: crate::domain::ScopedPath {
                    scope,
                    path: path.clone(),
                },
                offset: offset as i64,
                // 0 means "to the end" to Pull; an empty file has nothing to send anyway.
                length: length as i64,
            })
            .await?;
        // The file may have been replaced between the two lookups: describe what is sent.
        let sent_size = u64::try_from(pull.artifact.size).unwrap_or(0);
        let length = length.min(sent_size.saturating_sub(offset));
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
            .body(Body::from_stream(pull.chunks))
            .map_err(|e| Error::Internal(format!("building a response: {e}")))
    }
}

/// What a `Range` header asks of a file of `size` bytes. Only one range is served: a header
/// with several, or one that does not parse, is ignored and the whole file sent (RFC 9110
/// lets a server ignore Range).
enum RangeAsked {
    Ignored,
    Satisfiable(std::ops::RangeInclusive<u64>),
    Unsatisfiable,
}

fn single_range(value: &str, size: u64) -> RangeAsked {
    let Ok(parsed) = http_range_header::parse_range_header(value) else {
        return RangeAsked::Ignored;
    };
    if parsed.ranges.len() != 1 {
        return RangeAsked::Ignored;
    }
    match parsed.validate(size) {
        Ok(ranges) => match ranges.into_iter().next() {
            Some(range) if *range.start() < size => RangeAsked::Satisfiable(range),
            _ => RangeAsked::Unsatisfiable,
        },
        Err(_) => RangeAsked::Unsatisfiable,
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

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        use tonic::Code;
        let status = tonic::Status::from(self.0);
        let code = match status.code() {
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
        };
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
    fn ranges_single_suffix_open_and_unsatisfiable() {
        let ok = |v: &str, size: u64| match single_range(v, size) {
            RangeAsked::Satisfiable(r) => Some((*r.start(), *r.end())),
            RangeAsked::Ignored => None,
            RangeAsked::Unsatisfiable => Some((u64::MAX, u64::MAX)),
        };
        assert_eq!(ok("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(ok("bytes=90-", 100), Some((90, 99)));
        assert_eq!(ok("bytes=-10", 100), Some((90, 99)));
        assert_eq!(ok("bytes=50-500", 100), Some((50, 99)));
        assert_eq!(ok("bytes=100-", 100), Some((u64::MAX, u64::MAX)));
        assert_eq!(ok("bytes=0-", 0), Some((u64::MAX, u64::MAX)));
        assert_eq!(ok("bytes=0-1,5-6", 100), None);
        assert_eq!(ok("lines=0-1", 100), None);
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
