//! The one error taxonomy of the service. Messages of user-facing variants are sent to clients
//! as they are, so they name the field or the limit; `Internal` and `Unavailable` causes are
//! logged by the API edge and clients see a generic text.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong; `field` names the offending field (e.g. `header.path`).
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// A size, quota or spend limit; the message carries the limit and the current figure.
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    OutOfRange(String),
    /// No valid credentials (missing, malformed, expired or badly signed token).
    #[error("{0}")]
    Unauthenticated(String),
    /// Valid credentials, but not for this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The request cannot be served in the server's current configuration.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The client went away or gave up; nothing was stored.
    #[error("{0}")]
    Cancelled(String),
    /// The client stopped sending for longer than the server waits.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A concurrent change won a race this request lost (a constraint violation, a
    /// serialization failure); the message is generic, the cause logged where it is seen.
    /// Retrying the whole request may succeed.
    #[error("{0}")]
    Aborted(String),
    /// A dependency (database, blob store) failed in a way worth retrying.
    #[error("{what} unavailable: {cause}")]
    Unavailable { what: &'static str, cause: String },
    /// Stored content is missing or damaged (a blob removed or truncated behind the
    /// service's back): not retryable. Logged with its cause, never sent to the client.
    #[error("data loss: {0}")]
    DataLoss(String),
    /// A bug or broken invariant; logged with its cause, never sent to the client.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn database(cause: impl std::fmt::Display) -> Self {
        Self::Unavailable {
            what: "database",
            cause: cause.to_string(),
        }
    }

    pub fn blob_store(cause: impl std::fmt::Display) -> Self {
        Self::Unavailable {
            what: "blob store",
            cause: cause.to_string(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
