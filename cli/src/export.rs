//! `artifact usage --export`: a month's usage records as the server exports them
//! (`GET /api/v1/usage/export` on its HTTP port: one record per project × meter × day, CSV or
//! JSON lines), passed through byte for byte.
//!
//! The body is streamed chunk by chunk to stdout or to `-o FILE`, never held whole. A file is
//! written under a temporary name beside it and renamed only once the whole export has
//! arrived: a failed export leaves no partial file. The request is retried with backoff while
//! nothing has been written (the server unreachable or answering 502/503/504/429); a body cut
//! mid-way is an error (on stdout the bytes already written cannot be taken back).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ValueEnum;
use serde::Serialize;

use crate::connect::backoff;
use crate::error::{CliError, Exit, Result, certificate_problem};
use crate::output::{Output, human_bytes};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Csv,
    Jsonl,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Jsonl => "jsonl",
        }
    }
}

/// What to export and where to.
pub struct Request<'a> {
    /// The server's HTTP URL (http:// or https://), e.g. `http://127.0.0.1:9090`.
    pub http_url: &'a str,
    pub ca_file: Option<&'a Path>,
    pub token: Option<String>,
    pub retries: u32,
    /// Without one the server picks: the token's project, or every project for an admin.
    pub project: Option<String>,
    /// YYYY-MM.
    pub month: String,
    pub format: Format,
    /// None: stdout.
    pub output: Option<PathBuf>,
}

/// The HTTP URL of a server whose gRPC URL is `grpc_url`: the same scheme and host, on the
/// server's default HTTP port 9090.
pub fn default_http_url(grpc_url: &str) -> String {
    let (scheme, rest) = grpc_url.split_once("://").unwrap_or(("http", grpc_url));
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.rfind(':') {
        // An IPv6 literal's colons are inside brackets.
        Some(i) if !authority[i..].contains(']') => &authority[..i],
        _ => authority,
    };
    format!("{scheme}://{host}:9090")
}

fn client(request: &Request<'_>) -> Result<reqwest::Client> {
    let url = request.http_url;
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true);
    if url.starts_with("https://") {
        if let Some(ca) = request.ca_file {
            let pem =
                std::fs::read(ca).map_err(|e| CliError::io("cannot read the CA file", ca, &e))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                CliError::usage(format!(
                    "the CA file '{}' holds no PEM certificate ({e})",
                    ca.display()
                ))
            })?;
            builder = builder.tls_certs_merge(certs);
        }
    } else if url.starts_with("http://") {
        if request.ca_file.is_some() {
            return Err(CliError::usage(format!(
                "ARTIFACTD_CA_FILE is set but the HTTP URL '{url}' is http://: use an https:// URL"
            )));
        }
    } else {
        return Err(CliError::usage(format!(
            "ARTIFACTD_HTTP_URL '{url}' is not an http or https URL: use http://host:port or https://host:port"
        )));
    }
    builder
        .build()
        .map_err(|e| CliError::usage(format!("cannot set up HTTP ({e})")))
}

#[derive(Serialize)]
struct Exported {
    month: String,
    format: &'static str,
    file: Option<String>,
    bytes: u64,
}

pub async fn run(request: Request<'_>, out: &Output) -> Result<()> {
    let http = client(&request)?;
    let base = request.http_url.trim_end_matches('/');
    let mut url = reqwest::Url::parse(&format!("{base}/api/v1/usage/export")).map_err(|e| {
        CliError::usage(format!(
            "ARTIFACTD_HTTP_URL '{}' is not a URL ({e}): use http://host:port or https://host:port",
            request.http_url
        ))
    })?;
    url.query_pairs_mut()
        .append_pair("month", &request.month)
        .append_pair("format", request.format.name());
    if let Some(project) = &request.project {
        url.query_pairs_mut().append_pair("project", project);
    }
    let what = format!("usage export of {}", request.month);
    let response = send(&http, &url, &request, &what).await?;
    let bytes = match &request.output {
        None => {
            let mut stdout = std::io::stdout().lock();
            let written = copy_body(response, &mut stdout, &what).await?;
            stdout
                .flush()
                .map_err(|e| CliError::io("cannot write", Path::new("stdout"), &e))?;
            written
        }
        Some(path) => to_file(response, path, &what).await?,
    };
    if let Some(path) = &request.output {
        let summary = Exported {
            month: request.month.clone(),
            format: request.format.name(),
            file: Some(path.display().to_string()),
            bytes,
        };
        out.result(&summary, || {
            format!(
                "exported the usage of {} ({}, {}) to '{}'",
                summary.month,
                summary.format,
                human_bytes(bytes),
                path.display()
            )
        });
    }
    Ok(())
}

/// The request, retried while the server is unreachable or says it is busy or restarting;
/// the response once its status is a success.
async fn send(
    http: &reqwest::Client,
    url: &reqwest::Url,
    request: &Request<'_>,
    what: &str,
) -> Result<reqwest::Response> {
    let mut attempt = 0;
    loop {
        let mut call = http.get(url.clone());
        if let Some(token) = &request.token {
            call = call.bearer_auth(token);
        }
        let failure = match call.send().await {
            Ok(response) if response.status().is_success() => return Ok(response),
            Ok(response) => {
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                let error = status_error(what, status, &body, request.http_url);
                if !transient_status(status) {
                    return Err(error);
                }
                error
            }
            Err(error) => {
                if let Some(problem) = certificate_problem(&error) {
                    return Err(CliError::untrusted(what, &problem));
                }
                if !(error.is_connect() || error.is_timeout() || error.is_request()) {
                    return Err(CliError::usage(format!("{what}: {}", chain(&error))));
                }
                CliError::new(
                    Exit::Unavailable,
                    format!(
                        "{what}: {}: the server's HTTP port at {} could not be reached; check \
                         --http-url (ARTIFACTD_HTTP_URL) or try again later",
                        chain(&error),
                        request.http_url
                    ),
                )
            }
        };
        if attempt >= request.retries {
            return Err(failure);
        }
        backoff(attempt).await;
        attempt += 1;
    }
}

fn transient_status(status: reqwest::StatusCode) -> bool {
    use reqwest::StatusCode;
    matches!(
        status,
        StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
            | StatusCode::TOO_MANY_REQUESTS
    )
}

/// The exit code and a one-line message for an HTTP error status; `body` is the server's
/// message (its first line is kept).
fn status_error(what: &str, status: reqwest::StatusCode, body: &str, url: &str) -> CliError {
    use reqwest::StatusCode;
    let server = body.lines().next().unwrap_or_default().trim();
    let server = if server.is_empty() {
        status.to_string()
    } else {
        server.to_owned()
    };
    let (exit, hint) = match status {
        StatusCode::UNAUTHORIZED => (
            Exit::Auth,
            "set ARTIFACTD_TOKEN (or ARTIFACTD_TOKEN_FILE) to a valid token".to_owned(),
        ),
        StatusCode::FORBIDDEN => (
            Exit::Auth,
            "use a billing_reader, maintainer or admin token of this project".to_owned(),
        ),
        StatusCode::NOT_FOUND => (
            Exit::NotFound,
            "check the project id and --http-url (ARTIFACTD_HTTP_URL)".to_owned(),
        ),
        s if transient_status(s) => (
            Exit::Unavailable,
            format!("the server at {url} is unavailable; try again later"),
        ),
        _ => (Exit::Usage, String::new()),
    };
    let mut message = format!("{what}: {server}");
    if !hint.is_empty() {
        message.push_str(": ");
        message.push_str(&hint);
    }
    CliError::new(exit, message)
}

/// An error and its causes on one line.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        next = cause.source();
    }
    text
}

/// Copies the body to `sink` as it arrives; the bytes written.
async fn copy_body(
    mut response: reqwest::Response,
    sink: &mut impl Write,
    what: &str,
) -> Result<u64> {
    let mut written = 0u64;
    loop {
        let chunk = response.chunk().await.map_err(|e| {
            CliError::new(
                Exit::Unavailable,
                format!(
                    "{what}: the export was cut after {written} bytes ({}): run it again",
                    chain(&e)
                ),
            )
        })?;
        let Some(chunk) = chunk else {
            return Ok(written);
        };
        sink.write_all(&chunk)
            .map_err(|e| CliError::usage(format!("{what}: cannot write the export: {e}")))?;
        written += chunk.len() as u64;
    }
}

/// The body into a temporary file beside `path`, renamed to `path` once complete; or
/// straight into `path` when it is a device or a FIFO (`/dev/null`), never renamed over.
async fn to_file(response: reqwest::Response, path: &Path, what: &str) -> Result<u64> {
    if crate::pull::is_stream(path) {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| CliError::io("cannot write", path, &e))?;
        let mut writer = std::io::BufWriter::with_capacity(256 * 1024, file);
        let written = copy_body(response, &mut writer, what).await?;
        writer
            .into_inner()
            .map_err(|e| CliError::io("cannot write", path, e.error()))?;
        return Ok(written);
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "export".into());
    std::fs::create_dir_all(parent)
        .map_err(|e| CliError::io("cannot create the folder", parent, &e))?;
    let temp = parent.join(format!(".{name}.{:016x}.artifact-part", fastrand::u64(..)));
    let file = std::fs::File::create(&temp).map_err(|e| CliError::io("cannot write", &temp, &e))?;
    let mut writer = std::io::BufWriter::with_capacity(256 * 1024, file);
    let result = async {
        let written = copy_body(response, &mut writer, what).await?;
        let file = writer
            .into_inner()
            .map_err(|e| CliError::io("cannot write", &temp, e.error()))?;
        file.sync_all()
            .map_err(|e| CliError::io("cannot write", &temp, &e))?;
        std::fs::rename(&temp, path).map_err(|e| CliError::io("cannot write", path, &e))?;
        Ok(written)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_url_from_the_grpc_url() {
        assert_eq!(
            default_http_url("http://127.0.0.1:50051"),
            "http://127.0.0.1:9090"
        );
        assert_eq!(
            default_http_url("https://artifacts.example.com"),
            "https://artifacts.example.com:9090"
        );
        assert_eq!(
            default_http_url("https://[::1]:50051/"),
            "https://[::1]:9090"
        );
        assert_eq!(default_http_url("http://[::1]"), "http://[::1]:9090");
    }
}
