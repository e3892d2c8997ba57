//! Use cases: each public method is one thing a client asks for, carried out over the store,
//! the blob store and the clock. No gRPC types come in or go out.

pub mod accounts;
pub mod artifacts;
pub mod metering;
pub mod retention;
pub mod tokens;

pub use crate::domain::ControlsMask;
pub use accounts::Accounts;
pub use artifacts::{ArtifactService, ListPage, PullSpec, PullStream, PushOutcome, PushSpec};
pub use metering::{Bill, DailyUsage, Metering, UsageReport};
pub use retention::{PolicyExpired, PolicyExpiredPages, Retention, RuleFigures};
