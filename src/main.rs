//! The `artifactd` binary: parse config, set up logging, run a subcommand, map the outcome
//! to an exit code.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use artifactd::auth::{Authenticator, Claims};
use artifactd::config::{Cli, Command, Config, IssueToken, TokenCommand};
use artifactd::domain::SystemClock;
use artifactd::domain::{Clock, ProjectId, Role};
use artifactd::server::{self, App};
use artifactd::store::Store;
use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cli.config).await,
        Command::Migrate => Store::migrate(&cli.config.database_url)
            .await
            .context("migrating the database"),
        Command::Token {
            command: TokenCommand::Issue(args),
        } => issue_token(&cli.config, &args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    config.validate()?;
    let grpc = tokio::net::TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("binding gRPC on {}", config.grpc_listen))?;
    let http = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("binding HTTP on {}", config.http_listen))?;
    let app = App::build(&config, Arc::new(SystemClock))
        .await
        .context("starting")?;
    server::serve(app, grpc, http, shutdown_signal()).await?;
    Ok(())
}

/// `artifactd token issue`: the token goes to standard output, and nowhere else.
fn issue_token(config: &Config, args: &IssueToken) -> anyhow::Result<()> {
    let secret = config
        .jwt_secret
        .as_ref()
        .context("ARTIFACTD_JWT_SECRET must be set to issue tokens")?;
    let auth = Authenticator::shared_secret(secret.expose().as_bytes())?;
    let now = SystemClock.now();
    let claims = match Role::parse(&args.role) {
        Some(Role::Job) => {
            let field = |v: &Option<String>, name: &str| {
                v.clone()
                    .with_context(|| format!("--{name} is required for a job token"))
            };
            artifactd::api::tokens::job_claims(
                &field(&args.project, "project")?,
                &field(&args.workflow, "workflow")?,
                &field(&args.job, "job")?,
                args.ttl,
                now,
            )?
            .0
        }
        Some(role) => {
            if role == Role::Maintainer && args.project.is_none() {
                anyhow::bail!("--project is required for a maintainer token");
            }
            if let Some(project) = &args.project {
                ProjectId::parse("--project", project)?;
            }
            Claims {
                sub: args.subject.clone(),
                role: role.as_str().into(),
                project_id: args.project.clone(),
                workflow_id: None,
                job_id: None,
                exp: artifactd::api::tokens::expiry(args.ttl, now)?.0,
            }
        }
        None => anyhow::bail!("--role must be job, maintainer, billing_reader or admin"),
    };
    println!("{}", auth.issue(&claims)?);
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
