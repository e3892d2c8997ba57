//! `artifactd.v1.TokenService`: job tokens for control planes that do not mint their own.

use std::time::Duration;

use tonic::{Request, Response, Status};

use super::convert;
use crate::auth::{Authenticator, Claims};
use crate::domain::scope::validate_id;
use crate::domain::{Access, Clock, Error, ProjectId, Timestamp, authorize};
use crate::pb::v1::{self as pb, token_service_server};

pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 86_400);

#[derive(Debug, Clone)]
pub struct TokenApi {
    auth: Authenticator,
    clock: std::sync::Arc<dyn Clock>,
}

impl TokenApi {
    pub fn new(auth: Authenticator, clock: std::sync::Arc<dyn Clock>) -> Self {
        Self { auth, clock }
    }
}

/// A token's `exp` claim (seconds) and instant, `ttl` from `now`, within the allowed range.
pub fn expiry(ttl: Duration, now: Timestamp) -> Result<(u64, Timestamp), Error> {
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        return Err(Error::invalid(
            "ttl",
            "must be positive and at most 30 days",
        ));
    }
    let expires = now.saturating_add_micros(ttl.as_micros() as i64);
    let exp = u64::try_from(expires.to_seconds_nanos().0)
        .map_err(|_| Error::invalid("ttl", "expires before 1970"))?;
    Ok((exp, expires))
}

/// The claims of a job token, checked.
pub fn job_claims(
    project_id: &str,
    workflow_id: &str,
    job_id: &str,
    ttl: Duration,
    now: Timestamp,
) -> Result<(Claims, Timestamp), Error> {
    ProjectId::parse("project_id", project_id)?;
    validate_id("workflow_id", workflow_id)?;
    validate_id("job_id", job_id)?;
    let (exp, expires) = expiry(ttl, now)?;
    Ok((
        Claims {
            sub: format!("job:{project_id}/{workflow_id}/{job_id}"),
            role: "job".into(),
            project_id: Some(project_id.into()),
            workflow_id: Some(workflow_id.into()),
            job_id: Some(job_id.into()),
            exp,
        },
        expires,
    ))
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
        let ttl = match request.ttl {
            None => DEFAULT_TOKEN_TTL,
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                return Err(Error::invalid("ttl", "must be positive").into());
            }
            Some(d) => Duration::new(d.seconds as u64, d.nanos as u32),
        };
        let (claims, expires) = job_claims(
            &request.project_id,
            &request.workflow_id,
            &request.job_id,
            ttl,
            self.clock.now(),
        )?;
        let token = self.auth.issue(&claims)?;
        tracing::info!(
            project = %request.project_id,
            workflow = %request.workflow_id,
            job = %request.job_id,
            "job token issued"
        );
        Ok(Response::new(pb::IssueJobTokenResponse {
            token,
            expires_at: Some(convert::timestamp(expires)),
        }))
    }
}
