//! `artifactd.v1.TokenService`: job tokens for control planes that do not mint their own.
//! A thin adapter: authorization, proto ⇄ domain, and one call into
//! [`crate::service::tokens`].

use std::time::Duration;

use tonic::{Request, Response, Status};

use super::convert;
use crate::auth::Authenticator;
use crate::domain::{Access, Error, authorize};
use crate::pb::v1::{self as pb, token_service_server};
use crate::service::tokens::{TokenSubject, Tokens};

#[derive(Debug, Clone)]
pub struct TokenApi {
    auth: Authenticator,
    tokens: Tokens,
}

impl TokenApi {
    pub fn new(auth: Authenticator, tokens: Tokens) -> Self {
        Self { auth, tokens }
    }
}

/// The request's `ttl`: absent → the default; negative or malformed → INVALID_ARGUMENT.
fn ttl(d: Option<prost_types::Duration>) -> Result<Option<Duration>, Error> {
    match d {
        None => Ok(None),
        Some(d) => match (u64::try_from(d.seconds), u32::try_from(d.nanos)) {
            (Ok(seconds), Ok(nanos)) if nanos < 1_000_000_000 => {
                Ok(Some(Duration::new(seconds, nanos)))
            }
            _ => Err(Error::invalid(
                "ttl",
                "must be positive, with nanos within 0..1e9",
            )),
        },
    }
}

#[tonic::async_trait]
impl token_service_server::TokenService for TokenApi {
    async fn issue_job_token(
        &self,
        request: Request<pb::IssueJobTokenRequest>,
    ) -> Result<Response<pb::IssueJobTokenResponse>, Status> {
        let principal = self.auth.authenticate_grpc(request.metadata())?;
        authorize(&principal, Access::Administer)?;
        let request = request.into_inner();
        let ttl = ttl(request.ttl)?;
        let subject = TokenSubject::Job {
            project_id: request.project_id.clone(),
            workflow_id: request.workflow_id.clone(),
            job_id: request.job_id.clone(),
        };
        let issued = self.tokens.issue(&subject, ttl)?;
        tracing::info!(
            project = %request.project_id,
            workflow = %request.workflow_id,
            job = %request.job_id,
            "job token issued"
        );
        Ok(Response::new(pb::IssueJobTokenResponse {
            token: issued.token,
            expires_at: Some(convert::timestamp(issued.expires)),
        }))
    }
}
