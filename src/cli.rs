//! The binary's subcommands: `serve` (the default), `migrate` and `token issue`. Each takes
//! the parsed configuration and returns `anyhow::Result`; `main` maps that to an exit code.

use std::sync::Arc;

use anyhow::Context;

use crate::auth::Authenticator;
use crate::config::{Cli, Command, Config, IssueToken, TokenCommand};
use crate::domain::{Role, SystemClock};
use crate::server::{self, App};
use crate::service::tokens::{TokenSubject, Tokens};
use crate::store::Store;

/// Runs the subcommand `cli` names.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cli.config).await,
        Command::Migrate => Store::migrate(&cli.config.database_url)
            .await
            .context("migrating the database"),
        Command::Token {
            command: TokenCommand::Issue(args),
        } => issue_token(&cli.config, &args),
    }
}

/// Binds both listeners, builds the app and serves until SIGTERM/SIGINT. An error — also a
/// listener that dies while serving — makes the process exit non-zero, so a supervisor
/// restarts it rather than leaving a half-alive server behind.
async fn serve(config: Config) -> anyhow::Result<()> {
    config.validate()?;
    // Connections, streams' files and the database pool all take descriptors.
    let wanted = (config.max_connections + config.max_streams + 1024) as u64;
    match crate::process::raise_open_files_limit() {
        Some(limit) if limit < wanted => tracing::warn!(
            limit,
            wanted,
            "the open-files limit is below ARTIFACTD_MAX_CONNECTIONS + ARTIFACTD_MAX_STREAMS + \
             1024; raise it (ulimit -n) or lower those"
        ),
        _ => {}
    }
    let grpc = tokio::net::TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("binding gRPC on {}", config.grpc_listen))?;
    let http = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("binding HTTP on {}", config.http_listen))?;
    let app = App::build(&config, Arc::new(SystemClock))
        .await
        .context("starting")?;
    server::serve(app, grpc, http, shutdown_signal())
        .await
        .context("serving")?;
    Ok(())
}

/// `artifactd token issue`: the token goes to standard output, and nowhere else. It carries
/// the configured audience and issuer, so the server accepts it.
fn issue_token(config: &Config, args: &IssueToken) -> anyhow::Result<()> {
    let secret = config
        .jwt_secret
        .as_ref()
        .context("ARTIFACTD_JWT_SECRET must be set to issue tokens")?;
    let auth =
        Authenticator::shared_secret(secret.expose().as_bytes())?.with_rules(config.token_rules());
    let role = Role::parse(&args.role)
        .context("--role must be job, maintainer, billing_reader or admin")?;
    let subject = match role {
        Role::Job => {
            let id = |value: &Option<String>, name: &str| {
                value
                    .clone()
                    .with_context(|| format!("--{name} is required for a job token"))
            };
            TokenSubject::Job {
                project_id: id(&args.project, "project")?,
                workflow_id: id(&args.workflow, "workflow")?,
                job_id: id(&args.job, "job")?,
            }
        }
        role => TokenSubject::Other {
            role,
            project_id: args.project.clone(),
            subject: args.subject.clone(),
        },
    };
    let issued = Tokens::new(auth, Arc::new(SystemClock)).issue(&subject, Some(args.ttl))?;
    println!("{}", issued.token);
    Ok(())
}

/// Resolves on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
