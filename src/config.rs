//! Command line and environment configuration. Every flag has an environment variable and a
//! documented default; `artifactd --help` lists them all. Values that may hold credentials
//! (the database URL) are never echoed back.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use crate::domain::Error;

pub const GIB: i64 = 1024 * 1024 * 1024;

#[derive(Debug, Parser)]
#[command(
    name = "artifactd",
    version = crate::metrics::LONG_VERSION,
    about = "Stores CI build artifacts and meters their use per project"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Serve the gRPC and HTTP APIs (the default).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Tokens, for operators.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum TokenCommand {
    /// Print a token signed with ARTIFACTD_JWT_SECRET to standard output.
    Issue(IssueToken),
}

#[derive(Debug, Clone, Args)]
pub struct IssueToken {
    /// job, maintainer, billing_reader or admin.
    #[arg(long, default_value = "job")]
    pub role: String,
    /// The project (required for job and maintainer; optional for billing_reader).
    #[arg(long)]
    pub project: Option<String>,
    /// The workflow (job tokens).
    #[arg(long)]
    pub workflow: Option<String>,
    /// The job (job tokens).
    #[arg(long)]
    pub job: Option<String>,
    /// Who the token is for (its `sub` claim).
    #[arg(long, default_value = "operator")]
    pub subject: String,
    /// Lifetime, e.g. `1h`, `7d` (at most ARTIFACTD_JWT_MAX_TTL, 30 days by default).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address the gRPC API listens on. Loopback by default: without authentication the
    /// service must not be reachable from other hosts (see --auth).
    #[arg(long, env = "ARTIFACTD_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    pub grpc_listen: SocketAddr,

    /// Address the HTTP side (/healthz, /readyz) listens on.
    #[arg(long, env = "ARTIFACTD_HTTP_LISTEN", default_value = "127.0.0.1:9090")]
    pub http_listen: SocketAddr,

    /// How requests authenticate: `jwt` (bearer tokens) or `none` (local use only; refused
    /// on a non-loopback address unless --insecure-no-auth).
    #[arg(long, env = "ARTIFACTD_AUTH", value_enum, default_value = "none")]
    pub auth: AuthMode,

    /// HS256 secret (at least 32 bytes) to verify and issue tokens with. Prefer the
    /// environment variable to the flag, which other users can see in the process list.
    #[arg(long, env = "ARTIFACTD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,

    /// PEM public key (Ed25519 or RSA) to verify tokens a control plane signs (EdDSA/RS256).
    #[arg(long, env = "ARTIFACTD_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,

    /// Required `aud` of every token (one of its audiences must match); unset: not checked.
    /// Tokens artifactd issues carry it.
    #[arg(long, env = "ARTIFACTD_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Required `iss` of every token; unset: not checked. Tokens artifactd issues carry it.
    #[arg(long, env = "ARTIFACTD_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Longest token lifetime (`exp − iat`) accepted, and the longest issued (e.g. `7d`);
    /// tokens without `iat` are refused.
    #[arg(long, env = "ARTIFACTD_JWT_MAX_TTL", default_value = "30d", value_parser = humantime::parse_duration)]
    pub jwt_max_ttl: Duration,

    /// PEM certificate chain: serve gRPC and HTTP over TLS (with --tls-key).
    #[arg(long, env = "ARTIFACTD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "ARTIFACTD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Allow `--auth none` on a non-loopback address (logs a warning). Never in production.
    #[arg(long, env = "ARTIFACTD_INSECURE_NO_AUTH", default_value_t = false)]
    pub insecure_no_auth: bool,

    /// Metadata database: `postgres://user:pass@host/db` or `sqlite://<file>`.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://./data/artifactd.db",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Blob store: `file://<dir>`, `s3://bucket/prefix` (AWS_* variables for credentials and
    /// endpoint) or `memory://` (lost on exit; for tests).
    #[arg(
        long,
        env = "ARTIFACTD_BLOB_URL",
        default_value = "file://./data/blobs"
    )]
    pub blob_url: String,

    /// fsync uploaded blobs before their artifact is committed (local directory only).
    #[arg(long, env = "ARTIFACTD_BLOB_FSYNC", default_value_t = true, action = ArgAction::Set)]
    pub blob_fsync: bool,

    /// With ARTIFACTD_BLOB_FSYNC on and a local blob directory, write uploads with `O_DIRECT`
    /// (past the page cache) in aligned 1 MiB blocks: faster to make durable and cheaper in CPU
    /// on the disks measured, but a blob just pushed is then read from disk by its first
    /// Pull. At most 4 uploads at once write directly (4 MiB of blocks); the others, and
    /// filesystems that refuse `O_DIRECT`, go through the page cache.
    #[arg(
        long,
        env = "ARTIFACTD_BLOB_DIRECT_WRITES",
        default_value_t = true,
        action = ArgAction::Set
    )]
    pub blob_direct_writes: bool,

    /// Blobs of at most this many bytes are kept in their database row instead of the blob
    /// store (pushes that declare `expected_size`; 0 turns this off, at most 65536). A small
    /// push then costs one database commit instead of a file or object of its own.
    #[arg(
        long,
        env = "ARTIFACTD_INLINE_BLOB_BYTES",
        default_value_t = 16 * 1024,
        value_parser = clap::value_parser!(i64).range(0..=65536)
    )]
    pub inline_blob_bytes: i64,

    /// Group commit of small pushes on Postgres: how many groups of inline pushes may commit
    /// at once, each group in one statement (one WAL flush); the pushes reaching their commit
    /// while these run form the next groups, and each is answered once its group is durable.
    /// 0 commits every push alone. SQLite ignores it. One group at a time measured a little
    /// ahead of two or four on two cores: the fewer groups, the larger each.
    #[arg(
        long,
        env = "ARTIFACTD_PUSH_GROUP_COMMITS",
        default_value_t = 1,
        value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u32).range(0..=64), |n| n as usize)
    )]
    pub push_group_commits: usize,

    /// Largest artifact accepted, in bytes (default 5 GiB).
    #[arg(
        long,
        env = "ARTIFACTD_MAX_ARTIFACT_BYTES",
        default_value_t = 5 * GIB,
        value_parser = clap::value_parser!(i64).range(0..)
    )]
    pub max_artifact_bytes: i64,

    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish before the server
    /// exits anyway (e.g. `30s`, `2m`).
    #[arg(long, env = "ARTIFACTD_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// How long after a month ends its bill is finalized into an invoice (late usage records
    /// still count until then; after, they are billed on the open month as corrections).
    /// At most 72h.
    #[arg(long, env = "ARTIFACTD_INVOICE_GRACE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub invoice_grace: Duration,

    /// Plan given to a project the first time it is seen (`free`, `team`, `enterprise` or
    /// one created with PlanService).
    #[arg(long, env = "ARTIFACTD_DEFAULT_PLAN", default_value = "free")]
    pub default_plan: String,

    /// Redis for hot quota figures and reservations shared by replicas, and the sweeper's
    /// lease (`redis://host:6379/0`); unset keeps them in process (the sweeper then locks in
    /// Postgres). The database stays the ledger either way.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Prefix of every Redis key artifactd writes, to share one Redis between deployments.
    #[arg(long, env = "ARTIFACTD_REDIS_PREFIX", default_value = "")]
    pub redis_prefix: String,

    /// How long a Redis command or connection may take before Redis counts as not answering:
    /// pushes and pulls that need a quota reservation then answer UNAVAILABLE at once rather
    /// than wait. Raise it for a Redis with slow round trips.
    #[arg(long, env = "ARTIFACTD_REDIS_TIMEOUT", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,

    /// Meter usage and enforce quotas. `false` records no usage and enforces no quota
    /// (plans still bound artifact size and retention); for benchmarks and comparisons.
    #[arg(long, env = "ARTIFACTD_METERING", default_value_t = true, action = ArgAction::Set)]
    pub metering: bool,

    /// Measure every gRPC call: the `artifactd_grpc_*` families, the DATA_LOSS count, and
    /// the per-call span with its log line. `false` turns that layer off (the other
    /// families stay); only for measuring what it costs (`artifactd-bench metrics-cost`).
    #[arg(long, env = "ARTIFACTD_GRPC_METRICS", default_value_t = true, action = ArgAction::Set)]
    pub grpc_metrics: bool,

    /// Deadline of every unary call (all but Push, Pull and watch/reflection streams).
    #[arg(long, env = "ARTIFACTD_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// A Push that sends nothing for this long is aborted and its upload removed; a Pull,
    /// PullArchive or HTTP download whose client reads nothing for this long is abandoned
    /// (DEADLINE_EXCEEDED; over HTTP the connection is closed).
    #[arg(long, env = "ARTIFACTD_STREAM_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub stream_idle_timeout: Duration,

    /// Streams open at once over all connections (Push, Pull, PullArchive, HTTP file and zip
    /// downloads); more are refused with RESOURCE_EXHAUSTED (HTTP 429). Bounds the memory
    /// and file descriptors stalled streams can hold.
    #[arg(
        long,
        env = "ARTIFACTD_MAX_STREAMS",
        default_value_t = 2048,
        value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u32).range(1..=1_000_000), |n| n as usize)
    )]
    pub max_streams: usize,

    /// Client connections to the gRPC port served at once. The next 64 get RESOURCE_EXHAUSTED
    /// for every call and are closed after 2 s; beyond those, new connections are closed as
    /// soon as they are accepted.
    #[arg(
        long,
        env = "ARTIFACTD_MAX_CONNECTIONS",
        default_value_t = 1024,
        value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u32).range(1..=1_000_000), |n| n as usize)
    )]
    pub max_connections: usize,

    /// Database connections idle this long are closed (the pool opens up to 32 under load
    /// and shrinks back, down to none when idle).
    #[arg(long, env = "ARTIFACTD_DB_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub db_idle_timeout: Duration,

    /// Time between sweeper runs (ending expired artifacts, removing abandoned uploads,
    /// collecting content no artifact references, pruning old history); `0s` turns the
    /// sweeper off on this replica. One replica sweeps at a time.
    #[arg(long, env = "ARTIFACTD_SWEEP_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub sweep_interval: Duration,
    /// Rows the sweeper ends, collects or prunes per statement (1–10000).
    #[arg(
        long,
        env = "ARTIFACTD_SWEEP_BATCH",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(1..=10_000)
    )]
    pub sweep_batch: u64,
    /// Content (file, object or inline row) is deleted only once no artifact has referenced
    /// it, and no push has leased it, for this long: pulls that started before an artifact
    /// ended can finish, and pushes deduplicating against it are never cut short.
    #[arg(long, env = "ARTIFACTD_BLOB_GRACE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub blob_grace: Duration,
    /// Temporary uploads not written to for this long are abandoned and removed. Must
    /// exceed ARTIFACTD_STREAM_IDLE_TIMEOUT, so an upload in progress is never taken.
    #[arg(long, env = "ARTIFACTD_UPLOAD_MAX_AGE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub upload_max_age: Duration,
    /// Resumable uploads (pushes naming an upload_id) that no Push has moved on for this
    /// long are abandoned: the sweeper removes their bytes and their record, and QueryUpload
    /// answers NOT_FOUND for them from then on (completed ones too).
    #[arg(long, env = "ARTIFACTD_RESUMABLE_UPLOAD_MAX_AGE", default_value = "24h", value_parser = humantime::parse_duration)]
    pub resumable_upload_max_age: Duration,
    /// Rows of artifacts that ended longer ago than this are pruned, once every month they
    /// bill is finalized (default 13 months; at least 124 days, so the three invoiced
    /// months late records may correct keep their rows).
    #[arg(long, env = "ARTIFACTD_HISTORY_RETENTION", default_value = "13months", value_parser = humantime::parse_duration)]
    pub history_retention: Duration,

    /// Bytes per second the background scrub re-reads and re-hashes stored blobs at (local
    /// directory or object store), quarantining any whose size or digest is wrong so their
    /// Pulls fail DATA_LOSS instead of serving wrong bytes; `0` turns it off on this
    /// replica. One replica scrubs at a time.
    #[arg(long, env = "ARTIFACTD_SCRUB_BYTES_PER_SECOND", default_value_t = 8 * 1024 * 1024)]
    pub scrub_bytes_per_second: u64,
    /// From the start of one scrub pass over every stored blob to the start of the next (the
    /// first pass starts this long after the first start; a pass that takes longer is
    /// followed at once by the next).
    #[arg(long, env = "ARTIFACTD_SCRUB_INTERVAL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub scrub_interval: Duration,

    /// Log format on standard error: `text` (human-readable) or `json` (one JSON object per
    /// line, with the fields of the RPC span it belongs to).
    #[arg(long, env = "ARTIFACTD_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Apply pending migrations at start-up (under a lock on Postgres).
    #[arg(long, env = "ARTIFACTD_MIGRATE_ON_START", default_value_t = true, action = ArgAction::Set)]
    pub migrate_on_start: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    None,
    Jwt,
}

/// A secret setting: never printed, not even by `{:?}`.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl Config {
    /// Refuses settings that must not run: no authentication on a reachable address
    /// (unless explicitly insecure), or `jwt` without a key.
    pub fn validate(&self) -> Result<(), Error> {
        if self.invoice_grace > Duration::from_secs(72 * 3600) {
            return Err(Error::invalid(
                "ARTIFACTD_INVOICE_GRACE",
                "must be at most 72h: a month's invoice must not wait longer",
            ));
        }
        if self.upload_max_age <= self.stream_idle_timeout {
            return Err(Error::invalid(
                "ARTIFACTD_UPLOAD_MAX_AGE",
                "must exceed ARTIFACTD_STREAM_IDLE_TIMEOUT, or uploads in progress could be removed",
            ));
        }
        if self.resumable_upload_max_age <= self.stream_idle_timeout {
            return Err(Error::invalid(
                "ARTIFACTD_RESUMABLE_UPLOAD_MAX_AGE",
                "must exceed ARTIFACTD_STREAM_IDLE_TIMEOUT, or uploads in progress could be removed",
            ));
        }
        if self.history_retention < crate::service::sweeper::MIN_HISTORY_RETENTION {
            return Err(Error::invalid(
                "ARTIFACTD_HISTORY_RETENTION",
                "must be at least 124 days: late records may correct the three invoiced months \
                 before the open one, which needs their rows",
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(Error::invalid(
                "ARTIFACTD_TLS_CERT",
                "ARTIFACTD_TLS_CERT and ARTIFACTD_TLS_KEY go together",
            ));
        }
        if self.redis_timeout.is_zero() {
            return Err(Error::invalid(
                "ARTIFACTD_REDIS_TIMEOUT",
                "must be positive",
            ));
        }
        if self.jwt_max_ttl.is_zero() {
            return Err(Error::invalid("ARTIFACTD_JWT_MAX_TTL", "must be positive"));
        }
        let exposed = !self.grpc_listen.ip().is_loopback() || !self.http_listen.ip().is_loopback();
        match self.auth {
            AuthMode::None if exposed && !self.insecure_no_auth => Err(Error::invalid(
                "ARTIFACTD_AUTH",
                format!(
                    "`none` is for local use, but the server would listen on {} / {}: set \
                     ARTIFACTD_AUTH=jwt, listen on 127.0.0.1, or pass --insecure-no-auth",
                    self.grpc_listen, self.http_listen
                ),
            )),
            AuthMode::None => {
                if exposed {
                    tracing::warn!(
                        "authentication is off on a non-loopback address (--insecure-no-auth): \
                         anyone who can reach this port can read, write and delete everything"
                    );
                }
                Ok(())
            }
            AuthMode::Jwt if self.jwt_secret.is_none() && self.jwt_public_key_file.is_none() => {
                Err(Error::invalid(
                    "ARTIFACTD_AUTH",
                    "`jwt` needs ARTIFACTD_JWT_SECRET or ARTIFACTD_JWT_PUBLIC_KEY_FILE",
                ))
            }
            AuthMode::Jwt => Ok(()),
        }
    }

    /// The sweeper's settings.
    pub fn sweep_settings(&self) -> crate::service::sweeper::SweepSettings {
        crate::service::sweeper::SweepSettings {
            interval: self.sweep_interval,
            batch: self.sweep_batch,
            blob_grace: self.blob_grace,
            upload_max_age: self.upload_max_age,
            resumable_upload_max_age: self.resumable_upload_max_age,
            history_retention: self.history_retention,
        }
    }

    /// The scrubber's settings.
    pub fn scrub_settings(&self) -> crate::service::scrubber::ScrubSettings {
        crate::service::scrubber::ScrubSettings {
            bytes_per_second: self.scrub_bytes_per_second,
            interval: self.scrub_interval,
        }
    }

    /// The token rules these settings ask for.
    pub fn token_rules(&self) -> crate::auth::TokenRules {
        crate::auth::TokenRules {
            audience: self.jwt_audience.clone(),
            issuer: self.jwt_issuer.clone(),
            max_ttl: self.jwt_max_ttl,
        }
    }

    /// The defaults, as if no flag or variable were set, for a database and blob store;
    /// listeners are bound by the caller. Used by tests and the benchmark.
    pub fn with_stores(database_url: &str, blob_url: &str) -> Self {
        Self {
            grpc_listen: ([127, 0, 0, 1], 0).into(),
            http_listen: ([127, 0, 0, 1], 0).into(),
            database_url: database_url.to_owned(),
            blob_url: blob_url.to_owned(),
            blob_fsync: true,
            blob_direct_writes: true,
            inline_blob_bytes: 16 * 1024,
            push_group_commits: 1,
            max_artifact_bytes: 5 * GIB,
            drain_timeout: Duration::from_secs(30),
            invoice_grace: Duration::from_secs(3600),
            auth: AuthMode::None,
            jwt_secret: None,
            jwt_public_key_file: None,
            jwt_audience: None,
            jwt_issuer: None,
            jwt_max_ttl: crate::auth::TokenRules::DEFAULT_MAX_TTL,
            insecure_no_auth: false,
            tls_cert: None,
            tls_key: None,
            default_plan: "free".to_owned(),
            redis_url: None,
            redis_prefix: String::new(),
            redis_timeout: crate::coord::REDIS_TIMEOUT,
            metering: true,
            grpc_metrics: true,
            stream_idle_timeout: Duration::from_secs(60),
            max_streams: 2048,
            max_connections: 1024,
            db_idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            migrate_on_start: true,
            sweep_interval: Duration::from_secs(300),
            sweep_batch: 1000,
            blob_grace: Duration::from_secs(3600),
            upload_max_age: Duration::from_secs(3600),
            resumable_upload_max_age: Duration::from_secs(24 * 3600),
            history_retention: Duration::from_secs(13 * 2_630_016),
            scrub_bytes_per_second: 8 * 1024 * 1024,
            scrub_interval: Duration::from_secs(24 * 3600),
            log_format: LogFormat::Text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// `ARTIFACTD_REDIS_TIMEOUT` is read as a duration (500 ms by default), and zero, which
    /// would make every Redis call time out, is refused by name.
    #[test]
    fn redis_timeout_is_a_positive_duration() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["artifactd"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).map(|cli| cli.config)
        };
        let config = parse(&[]).unwrap();
        assert_eq!(config.redis_timeout, Duration::from_millis(500));
        assert_eq!(
            config.redis_timeout,
            crate::coord::REDIS_TIMEOUT,
            "one default"
        );
        let config = parse(&["--redis-timeout", "2s"]).unwrap();
        assert_eq!(config.redis_timeout, Duration::from_secs(2));
        let mut config = parse(&["--redis-timeout", "0s"]).unwrap();
        config.insecure_no_auth = true;
        let err = config.validate().unwrap_err();
        assert!(
            err.to_string()
                .starts_with("ARTIFACTD_REDIS_TIMEOUT: must be positive"),
            "{err}"
        );
        assert!(parse(&["--redis-timeout", "soon"]).is_err());
    }
}
