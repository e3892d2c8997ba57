//! Bearer tokens, one piece for gRPC and HTTP: verification (HS256 with a shared secret, or
//! EdDSA / RS256 with a public key so a control plane can sign tokens this service can only
//! verify), issuing (with the shared secret), and extraction from gRPC metadata and from HTTP
//! requests (`Authorization: Bearer`, GitLab's `JOB-TOKEN` header, a `job_token` query
//! parameter). Tokens never appear in errors or logs.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::domain::scope::validate_id;
use crate::domain::{Error, Principal, ProjectId, Role};

/// Claims artifactd reads from (and writes into) a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

#[derive(Clone)]
pub struct Authenticator {
    mode: Arc<Mode>,
}

// One value per process, behind an Arc: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum Mode {
    /// `ARTIFACTD_AUTH=none`: every request acts as an unauthenticated admin.
    Disabled,
    Jwt {
        decoding: DecodingKey,
        validation: Validation,
        /// Present with a shared secret: the service can issue tokens too.
        encoding: Option<EncodingKey>,
    },
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are secrets: say only which kind of verification is on.
        let mode = match &*self.mode {
            Mode::Disabled => "none",
            Mode::Jwt {
                encoding: Some(_), ..
            } => "jwt (shared secret)",
            Mode::Jwt { encoding: None, .. } => "jwt (public key)",
        };
        f.debug_struct("Authenticator")
            .field("mode", &mode)
            .finish()
    }
}

impl Authenticator {
    pub fn disabled() -> Self {
        Self {
            mode: Arc::new(Mode::Disabled),
        }
    }

    /// HS256 with a shared secret (verifies and issues).
    pub fn shared_secret(secret: &[u8]) -> Result<Self, Error> {
        if secret.len() < 32 {
            return Err(Error::invalid(
                "ARTIFACTD_JWT_SECRET",
                "must be at least 32 bytes",
            ));
        }
        Ok(Self {
            mode: Arc::new(Mode::Jwt {
                decoding: DecodingKey::from_secret(secret),
                validation: validation(Algorithm::HS256),
                encoding: Some(EncodingKey::from_secret(secret)),
            }),
        })
    }

    /// EdDSA (Ed25519) or RS256 with a PEM public key (verifies only).
    pub fn public_key(pem: &[u8]) -> Result<Self, Error> {
        let (decoding, algorithm) = match DecodingKey::from_ed_pem(pem) {
            Ok(key) => (key, Algorithm::EdDSA),
            Err(_) => match DecodingKey::from_rsa_pem(pem) {
                Ok(key) => (key, Algorithm::RS256),
                Err(_) => {
                    return Err(Error::invalid(
                        "ARTIFACTD_JWT_PUBLIC_KEY_FILE",
                        "is neither an Ed25519 nor an RSA public key in PEM form",
                    ));
                }
            },
        };
        Ok(Self {
            mode: Arc::new(Mode::Jwt {
                decoding,
                validation: validation(algorithm),
                encoding: None,
            }),
        })
    }

    pub fn is_disabled(&self) -> bool {
        matches!(&*self.mode, Mode::Disabled)
    }

    /// The principal a bearer token stands for.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Principal, Error> {
        let (decoding, validation) = match &*self.mode {
            Mode::Disabled => return Ok(Principal::unauthenticated_admin()),
            Mode::Jwt {
                decoding,
                validation,
                ..
            } => (decoding, validation),
        };
        let token = token.ok_or_else(|| {
            Error::Unauthenticated("a bearer token is required (authorization: Bearer …)".into())
        })?;
        let claims = jsonwebtoken::decode::<Claims>(token, decoding, validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                let why = match e.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired",
                    ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => {
                        "the token's signature is not valid"
                    }
                    _ => "the token is malformed",
                };
                Error::Unauthenticated(why.into())
            })?
            .claims;
        principal(claims)
    }

    /// From gRPC metadata: `authorization: Bearer <token>`.
    pub fn authenticate_grpc(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Principal, Error> {
        if self.is_disabled() {
            return Ok(Principal::unauthenticated_admin());
        }
        let header = metadata.get("authorization").map(|v| v.to_str());
        self.authenticate(bearer(header)?)
    }

    /// From an HTTP request: `Authorization: Bearer`, `JOB-TOKEN`, or `?job_token=`.
    pub fn authenticate_http(
        &self,
        headers: &axum::http::HeaderMap,
        query: Option<&str>,
    ) -> Result<Principal, Error> {
        if self.is_disabled() {
            return Ok(Principal::unauthenticated_admin());
        }
        if let Some(value) = headers.get(axum::http::header::AUTHORIZATION) {
            return self.authenticate(bearer(Some(value.to_str()))?);
        }
        if let Some(value) = headers.get("job-token") {
            let token = value
                .to_str()
                .map_err(|_| Error::Unauthenticated("the JOB-TOKEN header is malformed".into()))?;
            return self.authenticate(Some(token));
        }
        let from_query = query.and_then(|q| {
            q.split('&')
                .find_map(|pair| pair.strip_prefix("job_token="))
        });
        self.authenticate(from_query)
    }

    /// Signs a token (shared-secret mode only).
    pub fn issue(&self, claims: &Claims) -> Result<String, Error> {
        match &*self.mode {
            Mode::Jwt {
                encoding: Some(key),
                ..
            } => jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, key)
                .map_err(|e| Error::Internal(format!("signing a token failed: {e}"))),
            _ => Err(Error::FailedPrecondition(
                "this server cannot issue tokens: it verifies with a public key (or auth is off); \
                 issue them where the private key is"
                    .into(),
            )),
        }
    }
}

fn validation(algorithm: Algorithm) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.set_required_spec_claims(&["exp", "sub"]);
    validation.leeway = 30;
    validation
}

fn bearer<E>(header: Option<Result<&str, E>>) -> Result<Option<&str>, Error> {
    match header {
        None => Ok(None),
        Some(Err(_)) => Err(Error::Unauthenticated(
            "the authorization header is malformed".into(),
        )),
        Some(Ok(value)) => {
            let token = value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
                .ok_or_else(|| {
                    Error::Unauthenticated(
                        "the authorization header must be `Bearer <token>`".into(),
                    )
                })?;
            Ok(Some(token.trim()))
        }
    }
}

/// Checks the claims' shape: a known role, and the ids its role needs.
fn principal(claims: Claims) -> Result<Principal, Error> {
    let malformed = |why: &str| Error::Unauthenticated(format!("the token is malformed: {why}"));
    let role = Role::parse(&claims.role).ok_or_else(|| malformed("unknown role"))?;
    let id = |value: Option<String>, what: &str| -> Result<Option<String>, Error> {
        match value {
            Some(v) => {
                validate_id(what, &v).map_err(|_| malformed(&format!("bad {what}")))?;
                Ok(Some(v))
            }
            None => Ok(None),
        }
    };
    let project = id(claims.project_id, "project_id")?
        .map(|p| ProjectId::parse("project_id", &p))
        .transpose()
        .map_err(|_| malformed("bad project_id"))?;
    let workflow = id(claims.workflow_id, "workflow_id")?;
    let job = id(claims.job_id, "job_id")?;
    match role {
        Role::Job if project.is_none() || workflow.is_none() || job.is_none() => {
            return Err(malformed(
                "a job token needs project_id, workflow_id and job_id",
            ));
        }
        Role::Maintainer if project.is_none() => {
            return Err(malformed("a maintainer token needs project_id"));
        }
        _ => {}
    }
    Ok(Principal {
        subject: claims.sub,
        role,
        project,
        workflow,
        job,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"unit-test-secret-of-at-least-32-bytes";

    fn job_token(auth: &Authenticator) -> String {
        auth.issue(&Claims {
            sub: "ci".into(),
            role: "job".into(),
            project_id: Some("p".into()),
            workflow_id: Some("w".into()),
            job_id: Some("j".into()),
            exp: 4_000_000_000,
        })
        .unwrap()
    }

    #[test]
    fn http_requests_carry_tokens_three_ways() {
        use axum::http::{HeaderMap, HeaderValue, header::AUTHORIZATION};
        let auth = Authenticator::shared_secret(SECRET).unwrap();
        let token = job_token(&auth);
        let mut bearer = HeaderMap::new();
        bearer.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        let mut gitlab = HeaderMap::new();
        gitlab.insert("job-token", HeaderValue::from_str(&token).unwrap());
        let query = format!("file=a&job_token={token}");
        for principal in [
            auth.authenticate_http(&bearer, None),
            auth.authenticate_http(&gitlab, None),
            auth.authenticate_http(&HeaderMap::new(), Some(&query)),
        ] {
            let principal = principal.unwrap();
            assert_eq!(
                (principal.role, principal.job.as_deref()),
                (Role::Job, Some("j"))
            );
        }
        let none = auth
            .authenticate_http(&HeaderMap::new(), Some("file=a"))
            .unwrap_err();
        assert!(matches!(none, Error::Unauthenticated(_)));
        // The same checks as gRPC: a bad signature is refused, and says nothing of the token.
        let mut forged = HeaderMap::new();
        forged.insert(
            "job-token",
            HeaderValue::from_str(&format!("{token}x")).unwrap(),
        );
        let err = auth.authenticate_http(&forged, None).unwrap_err();
        assert!(!err.to_string().contains(&token[..20]), "{err}");
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(Authenticator::shared_secret(b"short").is_err());
    }

    #[test]
    fn debug_output_shows_no_key() {
        let auth = Authenticator::shared_secret(SECRET).unwrap();
        let shown = format!("{auth:?}");
        assert!(!shown.contains("unit-test-secret"), "{shown}");
    }
}
