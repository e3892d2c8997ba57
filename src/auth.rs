//! Bearer tokens, one piece for gRPC and HTTP: verification (HS256 with a shared secret, or
//! EdDSA / RS256 with a public key so a control plane can sign tokens this service can only
//! verify), signing (with the shared secret), and extraction from gRPC metadata and from HTTP
//! requests (`Authorization: Bearer`, GitLab's `JOB-TOKEN` header, a `job_token` query
//! parameter). Tokens never appear in errors or logs.
//!
//! Verification follows [`TokenRules`]: `exp` and `nbf` (30 s leeway), `aud` and `iss` when
//! configured, and a maximum lifetime `exp − iat`. A token without `iat` is refused, since
//! its lifetime could not be bounded; one whose `iat` lies in the future is refused too, or
//! it could stretch its validity past the maximum. What artifactd itself issues (claims,
//! lifetimes) is decided in [`crate::service::tokens`].

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::domain::scope::validate_id;
use crate::domain::{Error, Principal, ProjectId, Role};

/// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
const LEEWAY_SECONDS: u64 = 30;

/// Claims artifactd reads from (and writes into) a token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Issued at, seconds since the Unix epoch; required (see the module doc).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Not valid before, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Who issued the token; checked against `ARTIFACTD_JWT_ISSUER` when that is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Who the token is for; checked against `ARTIFACTD_JWT_AUDIENCE` when that is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
}

/// The `aud` claim: one string or a list of them (RFC 7519 §4.1.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// What a token must satisfy beyond its signature and expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRules {
    /// Required `aud` (one of the token's audiences must equal it); `None`: any or none.
    pub audience: Option<String>,
    /// Required `iss`; `None`: any or none.
    pub issuer: Option<String>,
    /// Longest lifetime `exp − iat` accepted, and the longest artifactd issues.
    pub max_ttl: Duration,
}

impl TokenRules {
    pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(30 * 86_400);
}

impl Default for TokenRules {
    fn default() -> Self {
        Self {
            audience: None,
            issuer: None,
            max_ttl: Self::DEFAULT_MAX_TTL,
        }
    }
}

#[derive(Clone)]
pub struct Authenticator {
    mode: Arc<Mode>,
    rules: Arc<TokenRules>,
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
            rules: Arc::new(TokenRules::default()),
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
        let rules = TokenRules::default();
        Ok(Self {
            mode: Arc::new(Mode::Jwt {
                decoding: DecodingKey::from_secret(secret),
                validation: validation(Algorithm::HS256, &rules),
                encoding: Some(EncodingKey::from_secret(secret)),
            }),
            rules: Arc::new(rules),
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
        let rules = TokenRules::default();
        Ok(Self {
            mode: Arc::new(Mode::Jwt {
                decoding,
                validation: validation(algorithm, &rules),
                encoding: None,
            }),
            rules: Arc::new(rules),
        })
    }

    /// The same keys under other rules (audience, issuer, maximum lifetime).
    pub fn with_rules(self, rules: TokenRules) -> Self {
        let mode = match &*self.mode {
            Mode::Disabled => Mode::Disabled,
            Mode::Jwt {
                decoding,
                validation: old,
                encoding,
            } => {
                let algorithm = old.algorithms.first().copied().unwrap_or(Algorithm::HS256);
                Mode::Jwt {
                    decoding: decoding.clone(),
                    validation: validation(algorithm, &rules),
                    encoding: encoding.clone(),
                }
            }
        };
        Self {
            mode: Arc::new(mode),
            rules: Arc::new(rules),
        }
    }

    /// The rules tokens are verified against; issuers follow them too.
    pub fn rules(&self) -> &TokenRules {
        &self.rules
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
                    ErrorKind::ExpiredSignature => "the token has expired".to_owned(),
                    ErrorKind::ImmatureSignature => {
                        "the token is not valid yet (nbf is in the future)".to_owned()
                    }
                    ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => {
                        "the token's signature is not valid".to_owned()
                    }
                    ErrorKind::InvalidAudience => {
                        "the token is not meant for this service (aud)".to_owned()
                    }
                    ErrorKind::InvalidIssuer => {
                        "the token's issuer is not trusted (iss)".to_owned()
                    }
                    ErrorKind::MissingRequiredClaim(claim) => {
                        format!("the token has no {claim} claim")
                    }
                    _ => "the token is malformed".to_owned(),
                };
                Error::Unauthenticated(why)
            })?
            .claims;
        check_lifetime(&claims, &self.rules, now_seconds())?;
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

fn validation(algorithm: Algorithm, rules: &TokenRules) -> Validation {
    let mut validation = Validation::new(algorithm);
    let mut required = vec!["exp", "sub"];
    validation.leeway = LEEWAY_SECONDS;
    validation.validate_nbf = true;
    match &rules.audience {
        Some(audience) => {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        // Without a configured audience, a token naming one is still ours to accept.
        None => validation.validate_aud = false,
    }
    if let Some(issuer) = &rules.issuer {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// Wall-clock seconds, as `exp` and `nbf` are checked against (by jsonwebtoken).
fn now_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The lifetime rule: `iat` present and not in the future, and `exp − iat` at most the
/// maximum.
fn check_lifetime(claims: &Claims, rules: &TokenRules, now: u64) -> Result<(), Error> {
    let iat = claims.iat.ok_or_else(|| {
        Error::Unauthenticated(
            "the token has no iat claim; token lifetimes are bounded, so tokens must say \
             when they were issued"
                .into(),
        )
    })?;
    if iat > now.saturating_add(LEEWAY_SECONDS) {
        return Err(Error::Unauthenticated(
            "the token's iat is in the future".into(),
        ));
    }
    if claims.exp.saturating_sub(iat) > rules.max_ttl.as_secs() {
        return Err(Error::Unauthenticated(format!(
            "the token's lifetime (exp − iat) exceeds the maximum of {}",
            humantime::format_duration(rules.max_ttl)
        )));
    }
    Ok(())
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

    fn job_claims() -> Claims {
        let now = now_seconds();
        Claims {
            sub: "ci".into(),
            role: "job".into(),
            project_id: Some("p".into()),
            workflow_id: Some("w".into()),
            job_id: Some("j".into()),
            exp: now + 3600,
            iat: Some(now),
            ..Claims::default()
        }
    }

    fn job_token(auth: &Authenticator) -> String {
        auth.issue(&job_claims()).unwrap()
    }

    fn refusal(auth: &Authenticator, claims: &Claims) -> String {
        let token = auth.issue(claims).unwrap();
        match auth.authenticate(Some(&token)) {
            Err(Error::Unauthenticated(why)) => why,
            other => panic!("expected UNAUTHENTICATED for {claims:?}, got {other:?}"),
        }
    }

    #[test]
    fn lifetime_audience_issuer_and_nbf_are_checked() {
        let plain = Authenticator::shared_secret(SECRET).unwrap();
        let strict = plain.clone().with_rules(TokenRules {
            audience: Some("artifactd".into()),
            issuer: Some("https://ci.example".into()),
            max_ttl: Duration::from_secs(3600),
        });
        let now = now_seconds();
        let good = Claims {
            aud: Some(Audience::Many(vec!["other".into(), "artifactd".into()])),
            iss: Some("https://ci.example".into()),
            ..job_claims()
        };
        strict
            .authenticate(Some(&strict.issue(&good).unwrap()))
            .unwrap();
        // Without configured audience and issuer, any (or none) is fine.
        plain
            .authenticate(Some(&plain.issue(&good).unwrap()))
            .unwrap();
        plain.authenticate(Some(&job_token(&plain))).unwrap();

        let cases = [
            (
                Claims {
                    aud: None,
                    ..good.clone()
                },
                "no aud claim",
            ),
            (
                Claims {
                    aud: Some(Audience::One("other".into())),
                    ..good.clone()
                },
                "aud",
            ),
            (
                Claims {
                    iss: None,
                    ..good.clone()
                },
                "no iss claim",
            ),
            (
                Claims {
                    iss: Some("https://evil.example".into()),
                    ..good.clone()
                },
                "iss",
            ),
            (
                Claims {
                    nbf: Some(now + 600),
                    ..good.clone()
                },
                "not valid yet",
            ),
            (
                Claims {
                    iat: None,
                    ..good.clone()
                },
                "no iat claim",
            ),
            (
                Claims {
                    iat: Some(now + 600),
                    exp: now + 1200,
                    ..good.clone()
                },
                "iat is in the future",
            ),
            (
                Claims {
                    iat: Some(now),
                    exp: now + 3601,
                    ..good.clone()
                },
                "exceeds the maximum of 1h",
            ),
        ];
        for (claims, why) in cases {
            let refused = refusal(&strict, &claims);
            assert!(refused.contains(why), "{claims:?}: {refused}");
        }
        // The default maximum is 30 days, whatever the audience.
        let long = Claims {
            iat: Some(now),
            exp: now + 31 * 86_400,
            ..job_claims()
        };
        assert!(refusal(&plain, &long).contains("exceeds the maximum of 30days"));
        let month = Claims {
            iat: Some(now),
            exp: now + 30 * 86_400,
            ..job_claims()
        };
        plain
            .authenticate(Some(&plain.issue(&month).unwrap()))
            .unwrap();
        // nbf in the past (within or beyond the leeway) is fine.
        let started = Claims {
            nbf: Some(now - 10),
            ..job_claims()
        };
        plain
            .authenticate(Some(&plain.issue(&started).unwrap()))
            .unwrap();
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
