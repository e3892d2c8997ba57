//! The connection: server URL (http or https, with an optional CA of its own), the bearer
//! token, scope ids from flags or the environment, and retries with backoff and jitter.

use std::future::Future;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::error::{CliError, Exit, Result, is_transient};
use crate::pb;

pub const DEFAULT_URL: &str = "http://127.0.0.1:50051";

/// Largest HTTP/2 DATA frame accepted from the server (`artifactd::server::
/// HTTP2_CLIENT_MAX_FRAME_BYTES`): a pulled chunk (up to 1 MiB) arrives in one frame instead of
/// 17 or more at h2's 16 KiB default, whose framing cost as much CPU as the bytes themselves.
const HTTP2_MAX_FRAME_BYTES: u32 = 1024 * 1024;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl Interceptor for Auth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub type Artifacts =
    pb::artifact_service_client::ArtifactServiceClient<InterceptedService<Channel, Auth>>;
pub type Usage = pb::usage_service_client::UsageServiceClient<InterceptedService<Channel, Auth>>;

/// One HTTP/2 connection to the server (every concurrent transfer is a stream on it),
/// reconnected on demand after a failure.
#[derive(Clone)]
pub struct Client {
    pub url: String,
    channel: Channel,
    auth: Auth,
    retries: u32,
}

/// Where the token comes from, in order: `ARTIFACTD_TOKEN`, the file named by
/// `--token-file`/`ARTIFACTD_TOKEN_FILE`, Semaphore's `SEMAPHORE_ARTIFACT_TOKEN`.
pub fn token(token_file: Option<&std::path::Path>) -> Result<Option<String>> {
    if let Some(token) = non_empty_env("ARTIFACTD_TOKEN") {
        return Ok(Some(token));
    }
    let file = token_file
        .map(std::path::Path::to_path_buf)
        .or_else(|| non_empty_env("ARTIFACTD_TOKEN_FILE").map(Into::into));
    if let Some(file) = file {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| CliError::io("cannot read the token file", &file, &e))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(CliError::new(
                Exit::Auth,
                format!(
                    "the token file '{}' is empty: write the token into it",
                    file.display()
                ),
            ));
        }
        return Ok(Some(token.to_owned()));
    }
    Ok(non_empty_env("SEMAPHORE_ARTIFACT_TOKEN"))
}

pub fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl Client {
    pub fn new(
        url: &str,
        ca_file: Option<&std::path::Path>,
        token: Option<String>,
        retries: u32,
    ) -> Result<Self> {
        let bad_url = |why: String| {
            CliError::usage(format!(
                "ARTIFACTD_URL '{url}' {why}: use http://host:port or https://host:port"
            ))
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(bad_url("is not an http or https URL".into()));
        }
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| bad_url(e.to_string()))?
            .tcp_nodelay(true)
            .max_frame_size(HTTP2_MAX_FRAME_BYTES)
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(ca) = ca_file {
                let pem = std::fs::read(ca)
                    .map_err(|e| CliError::io("cannot read the CA file", ca, &e))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| bad_url(format!("cannot use TLS ({e})")))?;
        } else if ca_file.is_some() {
            return Err(CliError::usage(
                "ARTIFACTD_CA_FILE is set but ARTIFACTD_URL is http://: use an https:// URL",
            ));
        }
        let auth = match token {
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| {
                        CliError::new(
                            Exit::Auth,
                            "the token has characters a header cannot carry: check ARTIFACTD_TOKEN",
                        )
                    })?,
            ),
            None => None,
        };
        Ok(Self {
            url: url.to_owned(),
            channel: endpoint.connect_lazy(),
            auth: Auth(auth),
            retries,
        })
    }

    pub fn artifacts(&self) -> Artifacts {
        pb::artifact_service_client::ArtifactServiceClient::with_interceptor(
            self.channel.clone(),
            self.auth.clone(),
        )
    }

    pub fn usage(&self) -> Usage {
        pb::usage_service_client::UsageServiceClient::with_interceptor(
            self.channel.clone(),
            self.auth.clone(),
        )
    }

    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// Runs `call` until it succeeds, fails for good, or has failed transiently
    /// `retries + 1` times; between tries it waits with exponential backoff and full jitter.
    pub async fn retry<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let mut attempt = 0;
        loop {
            match call().await {
                Ok(value) => return Ok(value),
                Err(status) if is_transient(&status) && attempt < self.retries => {
                    backoff(attempt).await;
                    attempt += 1;
                }
                Err(status) => return Err(CliError::status(what, &status, &self.url)),
            }
        }
    }
}

/// Sleeps before retry number `attempt + 1`: a random time between a quarter of and the
/// whole of 200 ms × 2^attempt, capped at 10 s (jitter, so many clients cut at once do not
/// come back at once).
pub async fn backoff(attempt: u32) {
    let ceiling = Duration::from_millis(200)
        .saturating_mul(1 << attempt.min(16))
        .min(Duration::from_secs(10));
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(10_000);
    tokio::time::sleep(Duration::from_millis(fastrand::u64(millis / 4..=millis))).await;
}
