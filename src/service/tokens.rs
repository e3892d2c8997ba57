//! Issuing tokens: what a token artifactd signs says — role, ids, subject, `iat`, `exp`
//! within the maximum lifetime, and the configured `aud` and `iss` — so that everything it
//! issues passes its own verification ([`crate::auth`]). Used by
//! `TokenService.IssueJobToken` (control planes) and `artifactd token issue` (operators).

use std::sync::Arc;
use std::time::Duration;

use crate::auth::{Audience, Authenticator, Claims};
use crate::domain::scope::validate_id;
use crate::domain::{Clock, Error, ProjectId, Role, Timestamp};

/// Lifetime of a token when the request names none.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// Who a token is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSubject {
    /// A CI job: reach limited to its job, workflow and project scopes.
    Job {
        project_id: String,
        workflow_id: String,
        job_id: String,
    },
    /// A person or system with a non-job role; `project_id` is required for maintainers,
    /// optional for billing readers (all projects without it) and admins.
    Other {
        role: Role,
        project_id: Option<String>,
        subject: String,
    },
}

/// A signed token and when it expires.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub expires: Timestamp,
}

#[derive(Debug, Clone)]
pub struct Tokens {
    auth: Authenticator,
    clock: Arc<dyn Clock>,
}

impl Tokens {
    pub fn new(auth: Authenticator, clock: Arc<dyn Clock>) -> Self {
        Self { auth, clock }
    }

    /// Signs a token for `subject`, valid `ttl` from now (`None`: [`DEFAULT_TOKEN_TTL`]).
    /// INVALID_ARGUMENT for bad ids or a lifetime beyond the maximum; FAILED_PRECONDITION
    /// when this server only verifies (public key) and cannot sign.
    pub fn issue(
        &self,
        subject: &TokenSubject,
        ttl: Option<Duration>,
    ) -> Result<IssuedToken, Error> {
        let now = self.clock.now();
        let (claims, expires) = self.claims(subject, ttl.unwrap_or(DEFAULT_TOKEN_TTL), now)?;
        let token = self.auth.issue(&claims)?;
        Ok(IssuedToken { token, expires })
    }

    fn claims(
        &self,
        subject: &TokenSubject,
        ttl: Duration,
        now: Timestamp,
    ) -> Result<(Claims, Timestamp), Error> {
        let rules = self.auth.rules();
        if ttl.is_zero() || ttl > rules.max_ttl {
            return Err(Error::invalid(
                "ttl",
                format!(
                    "must be positive and at most {} (ARTIFACTD_JWT_MAX_TTL)",
                    humantime::format_duration(rules.max_ttl)
                ),
            ));
        }
        let seconds = |t: Timestamp| {
            u64::try_from(t.to_seconds_nanos().0)
                .map_err(|_| Error::Internal("the clock is before 1970".into()))
        };
        let ttl_micros =
            i64::try_from(ttl.as_micros()).map_err(|_| Error::invalid("ttl", "is too long"))?;
        let expires = now.saturating_add_micros(ttl_micros);
        let (role, sub, project_id, workflow_id, job_id) = match subject {
            TokenSubject::Job {
                project_id,
                workflow_id,
                job_id,
            } => {
                ProjectId::parse("project_id", project_id)?;
                validate_id("workflow_id", workflow_id)?;
                validate_id("job_id", job_id)?;
                (
                    Role::Job,
                    format!("job:{project_id}/{workflow_id}/{job_id}"),
                    Some(project_id.clone()),
                    Some(workflow_id.clone()),
                    Some(job_id.clone()),
                )
            }
            TokenSubject::Other {
                role: Role::Job, ..
            } => {
                return Err(Error::invalid(
                    "role",
                    "a job token needs project, workflow and job ids",
                ));
            }
            TokenSubject::Other {
                role,
                project_id,
                subject,
            } => {
                if *role == Role::Maintainer && project_id.is_none() {
                    return Err(Error::invalid(
                        "project_id",
                        "is required for a maintainer token",
                    ));
                }
                if let Some(project) = project_id {
                    ProjectId::parse("project_id", project)?;
                }
                if subject.is_empty() {
                    return Err(Error::invalid("subject", "must not be empty"));
                }
                (*role, subject.clone(), project_id.clone(), None, None)
            }
        };
        let claims = Claims {
            sub,
            role: role.as_str().into(),
            project_id,
            workflow_id,
            job_id,
            exp: seconds(expires)?,
            iat: Some(seconds(now)?),
            nbf: None,
            iss: rules.issuer.clone(),
            aud: rules.audience.clone().map(Audience::One),
        };
        Ok((claims, expires))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::TokenRules;
    use crate::domain::SystemClock;

    const SECRET: &[u8] = b"unit-test-secret-of-at-least-32-bytes";

    #[test]
    fn issued_tokens_pass_the_same_rules() {
        let auth = Authenticator::shared_secret(SECRET)
            .unwrap()
            .with_rules(TokenRules {
                audience: Some("artifactd".into()),
                issuer: Some("ops".into()),
                max_ttl: Duration::from_secs(7200),
            });
        let tokens = Tokens::new(auth.clone(), Arc::new(SystemClock));
        let job = TokenSubject::Job {
            project_id: "p".into(),
            workflow_id: "w".into(),
            job_id: "j".into(),
        };
        let issued = tokens.issue(&job, None).unwrap();
        let principal = auth.authenticate(Some(&issued.token)).unwrap();
        assert_eq!(
            (principal.role, principal.job.as_deref()),
            (Role::Job, Some("j"))
        );
        let admin = TokenSubject::Other {
            role: Role::Admin,
            project_id: None,
            subject: "ops".into(),
        };
        let issued = tokens
            .issue(&admin, Some(Duration::from_secs(7200)))
            .unwrap();
        assert_eq!(
            auth.authenticate(Some(&issued.token)).unwrap().role,
            Role::Admin
        );

        for (subject, ttl, field) in [
            (&job, Duration::from_secs(7201), "ttl"),
            (&job, Duration::ZERO, "ttl"),
            (
                &TokenSubject::Other {
                    role: Role::Maintainer,
                    project_id: None,
                    subject: "x".into(),
                },
                Duration::from_secs(60),
                "project_id",
            ),
            (
                &TokenSubject::Job {
                    project_id: "p".into(),
                    workflow_id: "w\u{202e}".into(),
                    job_id: "j".into(),
                },
                Duration::from_secs(60),
                "workflow_id",
            ),
        ] {
            let err = tokens.issue(subject, Some(ttl)).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidArgument { field: f, .. } if f == field),
                "{subject:?} {ttl:?}: {err}"
            );
        }
    }
}
