//! `artifact`: the command line of artifactd, a drop-in for Semaphore's `artifact` CLI.
//!
//! # Layout
//! - `paths`: Semaphore's path mapping (pure).
//! - `connect`: server URL, TLS, token, retries.
//! - `push` / `pull`: files, folders, symlinks and stdin/stdout, many at once on one
//!   connection; downloads resume where they were cut.
//! - `commands`: yank, list, stat, usage, bill.
//! - `export`: `usage --export`, from the server's HTTP port.
//! - `output`: tables, `--json`, progress bars.
//! - `error`: exit codes.

mod commands;
mod connect;
mod error;
mod export;
mod output;
mod paths;
mod pull;
mod push;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::connect::{Client, non_empty_env};
use crate::error::{CliError, Result};
use crate::output::Output;

pub mod pb {
    tonic::include_proto!("artifactd.v1");
}

/// jemalloc keeps the pages of freed download buffers for the next ones; glibc's malloc
/// returned and refaulted them. A 1 GiB pull to disk, three runs each, same minutes: glibc
/// 1.78–2.37 CPU-s and 23,000–112,000 page faults, jemalloc 1.66–1.82 CPU-s and ~6,000.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Push, pull and manage CI artifacts on an artifactd server.
///
/// Exit codes: 0 ok, 1 usage or other error, 2 not found, 3 already exists, 4 quota or
/// size limit, 5 authentication or permission (or a server certificate that is not
/// trusted), 6 server unavailable after retries.
#[derive(Parser, Debug)]
#[command(name = "artifact", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    global: Global,
}

#[derive(Args, Debug)]
struct Global {
    /// Server URL, http:// or https://.
    #[arg(long, global = true, env = "ARTIFACTD_URL", default_value = connect::DEFAULT_URL)]
    url: String,
    /// The server's HTTP URL, for `usage --export` [default: the --url scheme and host on
    /// port 9090].
    #[arg(long, global = true, env = "ARTIFACTD_HTTP_URL")]
    http_url: Option<String>,
    /// PEM file of the CA that signed the server's certificate (besides the system's); for
    /// both URLs.
    #[arg(long, global = true, env = "ARTIFACTD_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// File holding the bearer token (ARTIFACTD_TOKEN, when set, wins).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// Project id [env: ARTIFACTD_PROJECT_ID, then SEMAPHORE_PROJECT_ID].
    #[arg(long, global = true)]
    project_id: Option<String>,
    /// Workflow id [env: ARTIFACTD_WORKFLOW_ID, then SEMAPHORE_WORKFLOW_ID].
    #[arg(long, global = true)]
    workflow_id: Option<String>,
    /// Job id [env: ARTIFACTD_JOB_ID, then SEMAPHORE_JOB_ID].
    #[arg(long, global = true)]
    job_id: Option<String>,
    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Progress and a line per file even when stderr is not a terminal.
    #[arg(short, long, global = true)]
    verbose: bool,
    /// Retries of a transient failure (server unavailable, connection cut).
    #[arg(long, global = true, env = "ARTIFACTD_RETRIES", default_value_t = 6)]
    retries: u32,
    /// Files in flight at once (all on one connection).
    #[arg(long, global = true, env = "ARTIFACTD_PARALLEL", default_value_t = 32)]
    parallel: usize,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Upload a file, a folder (recursively) or stdin (`-`).
    Push(PushArgs),
    /// Download a file or a folder (or a file to stdout with `-d -`).
    Pull(PullArgs),
    /// Delete a file, or a folder recursively.
    Yank(PathArgs),
    /// List the files of a scope, optionally under a folder.
    List(ListArgs),
    /// Show one file's metadata.
    Stat(PathArgs),
    /// A project's usage for a month, or with --export its usage records (CSV or JSON lines).
    Usage(UsageArgs),
    /// A project's bill for a month.
    Bill(MonthArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScopeArg {
    Job,
    Workflow,
    Project,
}

#[derive(Args, Debug)]
struct PushArgs {
    scope: ScopeArg,
    /// Local file or folder, or `-` for stdin.
    path: String,
    /// Remote path (default: the source's base name).
    #[arg(short, long)]
    destination: Option<String>,
    /// Replace files that already exist.
    #[arg(short, long)]
    force: bool,
    /// How long the artifact lives: 30s, 10m, 12h, 30d, 1w, 1y, or never.
    #[arg(long)]
    expire_in: Option<String>,
    /// Store symlinks as links (recreated on pull) instead of following them.
    #[arg(long)]
    preserve_symlinks: bool,
}

#[derive(Args, Debug)]
struct PullArgs {
    scope: ScopeArg,
    /// Remote file or folder.
    path: String,
    /// Local path (default: the remote base name); `-` writes a file to stdout.
    #[arg(short, long)]
    destination: Option<String>,
    /// Overwrite local files.
    #[arg(short, long)]
    force: bool,
}

#[derive(Args, Debug)]
struct PathArgs {
    scope: ScopeArg,
    path: String,
}

#[derive(Args, Debug)]
struct ListArgs {
    scope: ScopeArg,
    /// Only files under this folder (or with this path prefix).
    prefix: Option<String>,
}

#[derive(Args, Debug)]
struct UsageArgs {
    /// YYYY-MM (UTC); the current month by default.
    #[arg(long)]
    month: Option<String>,
    /// The month's usage records as the server exports them (one per project × meter ×
    /// day), from its HTTP port (--http-url); without a project id, every project the token
    /// may read.
    #[arg(long)]
    export: bool,
    /// Export format.
    #[arg(long, value_enum, default_value = "csv", requires = "export")]
    format: export::Format,
    /// Write the export to FILE (complete, or not at all) instead of stdout.
    #[arg(short, long, value_name = "FILE", requires = "export")]
    output: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct MonthArgs {
    /// YYYY-MM (UTC); the current month by default.
    #[arg(long)]
    month: Option<String>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() { 1 } else { 0 });
        }
    };
    let out = Output::new(cli.global.json, cli.global.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("artifact: cannot start: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli, &out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            out.error(&error);
            ExitCode::from(error.exit as u8)
        }
    }
}

async fn run(cli: Cli, out: &Output) -> Result<()> {
    let g = &cli.global;
    let client = || -> Result<Client> {
        let token = connect::token(g.token_file.as_deref())?;
        Client::new(&g.url, g.ca_file.as_deref(), token, g.retries)
    };
    let parallel = g.parallel.max(1);
    match &cli.command {
        Command::Push(a) => {
            let scope = scope(g, a.scope)?;
            let options = push::Options {
                force: a.force,
                expire_in: a
                    .expire_in
                    .as_deref()
                    .map(push::parse_expire_in)
                    .transpose()?,
                preserve_symlinks: a.preserve_symlinks,
                parallel,
            };
            push::run(
                &client()?,
                out,
                scope,
                &a.path,
                a.destination.as_deref(),
                &options,
            )
            .await
        }
        Command::Pull(a) => {
            let scope = scope(g, a.scope)?;
            pull::run(
                &client()?,
                out,
                scope,
                &a.path,
                a.destination.as_deref(),
                a.force,
                parallel,
            )
            .await
        }
        Command::Yank(a) => commands::yank(&client()?, out, scope(g, a.scope)?, &a.path).await,
        Command::Stat(a) => commands::stat(&client()?, out, scope(g, a.scope)?, &a.path).await,
        Command::List(a) => {
            commands::list(&client()?, out, scope(g, a.scope)?, a.prefix.as_deref()).await
        }
        Command::Usage(a) if a.export => {
            let (month, _, _) = commands::month_bounds(a.month.as_deref())?;
            let http_url = g
                .http_url
                .clone()
                .unwrap_or_else(|| export::default_http_url(&g.url));
            let request = export::Request {
                http_url: &http_url,
                ca_file: g.ca_file.as_deref(),
                token: connect::token(g.token_file.as_deref())?,
                retries: g.retries,
                project: optional_id(&g.project_id, "project"),
                month,
                format: a.format,
                output: a.output.clone(),
            };
            export::run(request, out).await
        }
        Command::Usage(a) => {
            let project = project_id(g)?;
            commands::usage(&client()?, out, &project, a.month.as_deref()).await
        }
        Command::Bill(a) => {
            let project = project_id(g)?;
            commands::bill(&client()?, out, &project, a.month.as_deref()).await
        }
    }
}

/// An id from its flag, else `ARTIFACTD_<NAME>_ID`, else `SEMAPHORE_<NAME>_ID`.
fn id(flag: &Option<String>, name: &str) -> Result<String> {
    let upper = name.to_ascii_uppercase();
    flag.clone()
        .filter(|v| !v.trim().is_empty())
        .or_else(|| non_empty_env(&format!("ARTIFACTD_{upper}_ID")))
        .or_else(|| non_empty_env(&format!("SEMAPHORE_{upper}_ID")))
        .ok_or_else(|| {
            CliError::usage(format!(
                "{name} ID is not set: pass --{name}-id or set ARTIFACTD_{upper}_ID (or SEMAPHORE_{upper}_ID)"
            ))
        })
}

/// An id from its flag or the environment, if set anywhere.
fn optional_id(flag: &Option<String>, name: &str) -> Option<String> {
    id(flag, name).ok()
}

fn project_id(g: &Global) -> Result<String> {
    id(&g.project_id, "project")
}

fn scope(g: &Global, kind: ScopeArg) -> Result<pb::Scope> {
    let (kind, id) = match kind {
        ScopeArg::Job => (pb::ScopeKind::Job, id(&g.job_id, "job")?),
        ScopeArg::Workflow => (pb::ScopeKind::Workflow, id(&g.workflow_id, "workflow")?),
        ScopeArg::Project => (pb::ScopeKind::Project, String::new()),
    };
    let project_id = project_id(g)?;
    Ok(pb::Scope {
        project_id,
        kind: kind as i32,
        id,
    })
}
