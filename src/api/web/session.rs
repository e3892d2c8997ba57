//! Signing in and out of the pages with the same JWTs the API takes.
//!
//! `POST /ui/sign-in` verifies the token exactly as a gRPC call would, then keeps it in an
//! `HttpOnly; SameSite=Strict; Path=/` cookie (`Secure` under TLS) and redirects to the
//! pages: from then on the token travels only in that cookie, never in a URL. Job tokens
//! cannot sign in (they read no usage). Both POSTs refuse a request whose `Origin` is not
//! this server (a form on another site cannot sign someone in or out), and no GET changes
//! anything. Tokens are never logged.

use axum::Form;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use maud::html;

use super::pages::layout;
use super::{SESSION_COOKIE, Web};
use crate::domain::{Error, Principal, Role};

#[derive(Debug, serde::Deserialize)]
pub(super) struct SignIn {
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: String,
}

#[derive(Debug, serde::Deserialize)]
pub(super) struct Next {
    #[serde(default)]
    next: String,
}

/// `GET /ui/sign-in`: the form.
pub(super) async fn form(Query(next): Query<Next>) -> Response {
    sign_in_page(StatusCode::OK, &next.next, None)
}

fn sign_in_page(status: StatusCode, next: &str, error: Option<&str>) -> Response {
    let body = html! {
        h1 { "Sign in" }
        p { "Paste an artifactd token (a maintainer, billing_reader or admin JWT, as "
            code { "artifactd token issue" } " prints it). It is kept in a cookie of this "
            "browser only, never in a URL." }
        @if let Some(error) = error {
            p.error role="alert" { (error) }
        }
        form.signin method="post" action="/ui/sign-in" {
            label for="token" { "Token" }
            input #token type="password" name="token" autocomplete="off" required;
            input type="hidden" name="next" value=(safe_next(next).unwrap_or_default());
            button type="submit" { "Sign in" }
        }
    };
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        Html(layout("Sign in", None, body).into_string()),
    )
        .into_response()
}

/// `POST /ui/sign-in`: checks Origin and the token, sets the cookie, redirects.
pub(super) async fn sign_in(
    State(web): State<Web>,
    headers: HeaderMap,
    Form(form): Form<SignIn>,
) -> Response {
    if let Err(why) = same_origin(&web, &headers) {
        return sign_in_page(StatusCode::FORBIDDEN, &form.next, Some(&why));
    }
    let token = form.token.trim();
    let principal = match web.auth.authenticate(Some(token)) {
        Ok(principal) => principal,
        Err(Error::Unauthenticated(why)) => {
            return sign_in_page(StatusCode::UNAUTHORIZED, &form.next, Some(&why));
        }
        Err(e) => {
            let status = tonic::Status::from(e);
            return sign_in_page(
                StatusCode::SERVICE_UNAVAILABLE,
                &form.next,
                Some(status.message()),
            );
        }
    };
    if principal.role == Role::Job {
        return sign_in_page(
            StatusCode::FORBIDDEN,
            &form.next,
            Some(
                "a job token may not read usage; sign in with a maintainer, billing_reader or admin token",
            ),
        );
    }
    // A verified JWT is base64url and dots: a valid cookie value as it is.
    if token.is_empty()
        || !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return sign_in_page(
            StatusCode::UNAUTHORIZED,
            &form.next,
            Some("the token is malformed"),
        );
    }
    let secure = if web.tls { "; Secure" } else { "" };
    let cookie = format!("{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/{secure}");
    let to = safe_next(&form.next).unwrap_or_else(|| home(&principal));
    redirect_with_cookie(&to, &cookie)
}

/// `POST /ui/sign-out`: clears the cookie (after the Origin check) and shows the form.
pub(super) async fn sign_out(State(web): State<Web>, headers: HeaderMap) -> Response {
    if let Err(why) = same_origin(&web, &headers) {
        return sign_in_page(StatusCode::FORBIDDEN, "", Some(&why));
    }
    let secure = if web.tls { "; Secure" } else { "" };
    let cookie = format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{secure}");
    redirect_with_cookie("/ui/sign-in", &cookie)
}

fn redirect_with_cookie(to: &str, cookie: &str) -> Response {
    let (Ok(location), Ok(cookie)) = (HeaderValue::from_str(to), HeaderValue::from_str(cookie))
    else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, location),
            (header::SET_COOKIE, cookie),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
    )
        .into_response()
}

/// Where a principal lands after signing in.
pub(super) fn home(principal: &Principal) -> String {
    match (&principal.project, principal.role) {
        (Some(project), role) if role != Role::Admin => format!("/ui/projects/{project}"),
        _ => "/ui/".to_owned(),
    }
}

/// A page of this site to return to: a path under `/ui/`, nothing that could lead
/// elsewhere (`//host`, a scheme, a backslash).
pub(super) fn safe_next(next: &str) -> Option<String> {
    let ok = next.starts_with("/ui/")
        && !next.contains("//")
        && !next.contains('\\')
        && next
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'<' && b != b'>');
    ok.then(|| next.to_owned())
}

/// A state-changing POST must come from a page of this server: its `Origin` header (which
/// browsers send on every cross-origin and same-origin POST) must be this scheme and host.
fn same_origin(web: &Web, headers: &HeaderMap) -> Result<(), String> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .ok_or("the request has no Host header")?;
    let scheme = if web.tls { "https" } else { "http" };
    let expected = format!("{scheme}://{host}");
    match headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
        Some(origin) if origin.eq_ignore_ascii_case(&expected) => Ok(()),
        Some(_) => Err("this form was sent from another site (Origin does not match)".into()),
        None => Err("the request has no Origin header; sign in from this server's form".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pages_of_this_site_are_returned_to() {
        assert_eq!(
            safe_next("/ui/projects/web?month=2026-11").as_deref(),
            Some("/ui/projects/web?month=2026-11")
        );
        for bad in [
            "",
            "/",
            "//evil.example/ui/",
            "https://evil.example/ui/",
            "/ui//evil",
            "/ui/\\evil",
            "/ui/\"><script>",
            "/api/v1/usage/export",
        ] {
            assert_eq!(safe_next(bad), None, "{bad}");
        }
    }
}
