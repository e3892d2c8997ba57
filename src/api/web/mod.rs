//! Usage pages people read and the export finance ingests, on the HTTP port:
//!
//! | route | serves | who |
//! |---|---|---|
//! | `GET /api/v1/usage/export?month=YYYY-MM&format=csv\|jsonl[&project=P]` | one record per project × meter × day | admin, billing_reader: all or one; maintainer, project billing_reader: their own |
//! | `GET /ui/sign-in`, `POST /ui/sign-in`, `POST /ui/sign-out` | the sign-in form; a session cookie set or cleared | anyone (the form checks the token) |
//! | `GET /ui/` | every project's month totals, sortable, paged | admin, billing_reader without a project |
//! | `GET /ui/projects/{project}?month=YYYY-MM` | the month of one project | its maintainer and billing_reader, admin |
//! | `GET /ui/style.css` | the stylesheet | anyone |
//!
//! A request is authenticated by `Authorization: Bearer` or by the session cookie the
//! sign-in form sets (the same JWT, `HttpOnly; SameSite=Strict; Path=/`, `Secure` under
//! TLS), then authorized by the role matrix ([`crate::domain::access`]) as the gRPC calls
//! these pages are made of. Never from the URL: no `?job_token=` here. Pages answer a
//! request without credentials with a redirect to the sign-in form; the export with 401.
//! Nothing here changes state on GET; the two POSTs check `Origin`. Every response forbids
//! scripts and framing (`Content-Security-Policy`, `X-Frame-Options`).

mod charts;
mod export;
mod pages;
mod session;

use axum::Router;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::auth::Authenticator;
use crate::domain::{Error, Principal};
use crate::service::{Accounts, Metering};

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "artifactd_session";

#[derive(Debug, Clone)]
pub struct Web {
    metering: Metering,
    accounts: Accounts,
    auth: Authenticator,
    /// Served over TLS: the cookie is `Secure` and the expected origin is `https://`.
    tls: bool,
}

impl Web {
    pub fn new(metering: Metering, accounts: Accounts, auth: Authenticator, tls: bool) -> Self {
        Self {
            metering,
            accounts,
            auth,
            tls,
        }
    }

    /// The pages and the export, to be merged into the HTTP side's router.
    pub fn router(self) -> Router {
        Router::new()
            .route("/api/v1/usage/export", get(export::export))
            .route(
                "/ui",
                get(|| async { axum::response::Redirect::to("/ui/") }),
            )
            .route("/ui/", get(pages::projects))
            .route("/ui/projects/{project}", get(pages::project))
            .route("/ui/sign-in", get(session::form).post(session::sign_in))
            .route("/ui/sign-out", post(session::sign_out))
            .route("/ui/style.css", get(style))
            .with_state(self)
            .layer(axum::middleware::map_response(hardening_headers))
    }

    /// The principal of a request: its bearer token, else its session cookie.
    /// UNAUTHENTICATED when it has neither (or they do not verify).
    fn principal(&self, headers: &HeaderMap) -> Result<Principal, Error> {
        if headers.contains_key(header::AUTHORIZATION) || self.auth.is_disabled() {
            return self.auth.authenticate_http(headers, None);
        }
        match session_token(headers) {
            Some(token) => self.auth.authenticate(Some(token)),
            None => Err(Error::Unauthenticated(
                "sign in at /ui/sign-in, or send authorization: Bearer <token>".into(),
            )),
        }
    }
}

/// What the browser may do with these responses: nothing but show them. The pages use no
/// script, so none may run (an injected one included); styles come from the stylesheet (and
/// the SVG's own attributes); forms post only here; no other site may frame the pages.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self' 'unsafe-inline'; \
     img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

async fn hardening_headers(mut response: Response) -> Response {
    use axum::http::HeaderValue;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

/// The session cookie's value, if the request carries one.
fn session_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.trim_matches('"'))
        .filter(|value| !value.is_empty())
}

/// `GET /ui/style.css`: one small stylesheet, compiled into the binary.
async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        include_str!("style.css"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        assert_eq!(session_token(&headers), None);
        headers.append(header::COOKIE, HeaderValue::from_static("a=1; b=2"));
        assert_eq!(session_token(&headers), None);
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("x=y; artifactd_session=abc.def.ghi"),
        );
        assert_eq!(session_token(&headers), Some("abc.def.ghi"));
        let mut empty = HeaderMap::new();
        empty.insert(
            header::COOKIE,
            HeaderValue::from_static("artifactd_session="),
        );
        assert_eq!(session_token(&empty), None);
    }
}
