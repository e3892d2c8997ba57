//! gRPC adapters and HTTP routes: each RPC or route converts its request into domain
//! types, makes one service call and converts the answer back. No SQL, object-store or
//! Redis calls here. `streams` bounds what both sides stream.

pub mod artifacts;
pub mod billing;
pub mod connections;
pub mod convert;
pub mod deadline;
pub mod http;
pub mod jobs;
pub mod streams;
pub mod tokens;
pub mod web;
