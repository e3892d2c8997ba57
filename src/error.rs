//! The one place a domain [`Error`] becomes a gRPC [`Status`]. Causes of internal and
//! unavailable errors are logged here and replaced by a generic message, so database or
//! filesystem details never reach clients.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::domain::Error;

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            // The message names the field for people; a google.rpc.BadRequest detail names
            // it for programs (the richer error model).
            Error::InvalidArgument { field, reason } => Status::with_error_details(
                Code::InvalidArgument,
                format!("{field}: {reason}"),
                ErrorDetails::with_bad_request_violation(field, reason),
            ),
            Error::NotFound(msg) => Status::not_found(msg),
            Error::AlreadyExists(msg) => Status::already_exists(msg),
            Error::ResourceExhausted(msg) => Status::resource_exhausted(msg),
            Error::OutOfRange(msg) => Status::out_of_range(msg),
            Error::Unauthenticated(msg) => Status::unauthenticated(msg),
            Error::PermissionDenied(msg) => Status::permission_denied(msg),
            Error::FailedPrecondition(msg) => Status::failed_precondition(msg),
            Error::Cancelled(msg) => Status::cancelled(msg),
            Error::Aborted(msg) => Status::aborted(msg),
            Error::DeadlineExceeded(msg) => Status::deadline_exceeded(msg),
            Error::Unavailable { what, cause } => {
                tracing::warn!(what, %cause, "dependency unavailable");
                Status::unavailable(format!("{what} unavailable, retry later"))
            }
            Error::DataLoss(cause) => {
                tracing::error!(%cause, "stored content missing or damaged");
                Status::data_loss(
                    "the artifact's stored content is missing or damaged; retrying will not help",
                )
            }
            Error::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

/// A transport-level failure of a client stream (reset, decode error, oversize message)
/// seen mid-request, as a domain error.
pub fn from_client_stream(status: &Status) -> Error {
    match status.code() {
        Code::ResourceExhausted | Code::OutOfRange => {
            Error::ResourceExhausted(status.message().to_owned())
        }
        _ => Error::Cancelled(format!(
            "the client stream ended with an error ({}); nothing was stored",
            status.message()
        )),
    }
}
