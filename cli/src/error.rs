//! The one error type of the command line and the exit code each kind of failure gets:
//! 0 ok, 1 usage (or any other failure), 2 not found, 3 exists, 4 quota, 5 auth,
//! 6 unavailable after retries. Every message is one line that says what to do.

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
}

/// Whether a failure may pass by itself: the server said UNAVAILABLE, or the connection
/// failed (reset, refused, cut mid-stream) rather than the server answering.
pub fn is_transient(status: &tonic::Status) -> bool {
    use tonic::Code;
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
