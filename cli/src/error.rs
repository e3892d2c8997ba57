//! The one error type of the command line and the exit code each kind of failure gets:
//! 0 ok, 1 usage (or any other failure), 2 not found, 3 exists, 4 quota, 5 auth (also a
//! server certificate that is not trusted), 6 unavailable after retries. Every message is one line that says what to do.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Usage = 1,
    NotFound = 2,
    Exists = 3,
    Quota = 4,
    Auth = 5,
    Unavailable = 6,
}

#[derive(Debug)]
pub struct CliError {
    pub exit: Exit,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, CliError>;

impl CliError {
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Self {
            exit,
            message: message.into(),
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(Exit::Usage, message)
    }

    /// A local I/O failure on `path`.
    pub fn io(what: &str, path: &std::path::Path, error: &std::io::Error) -> Self {
        let exit = match error.kind() {
            std::io::ErrorKind::NotFound => Exit::NotFound,
            std::io::ErrorKind::AlreadyExists => Exit::Exists,
            _ => Exit::Usage,
        };
        Self::new(exit, format!("{what} '{}': {error}", path.display()))
    }

    /// A gRPC failure of `what` (e.g. "push of 'a/b'"), with a hint for the user.
    pub fn status(what: &str, status: &tonic::Status, url: &str) -> Self {
        use tonic::Code;
        if let Some(problem) = certificate_problem(status) {
            return Self::untrusted(what, &problem);
        }
        let server = one_line(status.message());
        let (exit, hint) = match status.code() {
            Code::NotFound => (
                Exit::NotFound,
                "check the path and the scope id (`artifact list` shows what is there)".to_owned(),
            ),
            Code::AlreadyExists => (Exit::Exists, "add --force to replace it".to_owned()),
            Code::ResourceExhausted => (
                Exit::Quota,
                "yank artifacts you no longer need or ask for a larger plan".to_owned(),
            ),
            Code::Unauthenticated => (
                Exit::Auth,
                "set ARTIFACTD_TOKEN (or ARTIFACTD_TOKEN_FILE) to a valid token".to_owned(),
            ),
            Code::PermissionDenied => (
                Exit::Auth,
                "use a token issued for this project and scope".to_owned(),
            ),
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Internal
                if is_transient(status) =>
            {
                (
                    Exit::Unavailable,
                    format!("the server at {url} could not be reached; try again later"),
                )
            }
            _ => (Exit::Usage, String::new()),
        };
        // The server's own wording of "exists" names the gRPC field; ours names the flag.
        let server = if status.code() == Code::AlreadyExists {
            "already exists".to_owned()
        } else {
            server
        };
        let mut message = format!("{what}: {server}");
        if !hint.is_empty() {
            message.push_str(": ");
            message.push_str(&hint);
        }
        Self::new(exit, message)
    }

    /// The server's TLS certificate was refused: no retry mends that, the user's CA does.
    pub fn untrusted(what: &str, problem: &str) -> Self {
        Self::new(
            Exit::Auth,
            format!(
                "{what}: the server's certificate is not trusted ({problem}): pass --ca-file or \
                 set ARTIFACTD_CA_FILE to the PEM file of the CA that signed it"
            ),
        )
    }
}

/// Why the server's TLS certificate was refused (unknown issuer, wrong name, expired…), if
/// that is what `error` comes down to. A TLS failure reaches the caller wrapped in
/// transport and I/O errors; an `io::Error`'s `source()` skips the error it wraps, so that
/// one is looked into explicitly.
pub fn certificate_problem(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(tls @ rustls::Error::InvalidCertificate(_)) =
            error.downcast_ref::<rustls::Error>()
        {
            return Some(tls.to_string());
        }
        if let Some(inner) = error
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            && let Some(problem) = certificate_problem(inner)
        {
            return Some(problem);
        }
        next = error.source();
    }
    None
}

/// Whether a failure may pass by itself: the server said UNAVAILABLE, or the connection
/// failed (reset, refused, cut mid-stream) rather than the server answering. A refused
/// server certificate does not pass by itself.
pub fn is_transient(status: &tonic::Status) -> bool {
    use tonic::Code;
    if certificate_problem(status).is_some() {
        return false;
    }
    match status.code() {
        Code::Unavailable => true,
        // A transport failure carries its cause; a status the server sent carries none.
        Code::Unknown | Code::Cancelled | Code::Internal | Code::DeadlineExceeded => {
            std::error::Error::source(status).is_some()
        }
        _ => false,
    }
}

fn one_line(text: &str) -> String {
    let line = text.split(['\n', '\r']).next().unwrap_or_default().trim();
    if line.is_empty() {
        "failed".to_owned()
    } else {
        line.to_owned()
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}
