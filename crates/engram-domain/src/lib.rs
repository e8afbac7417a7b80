//! engram's domain: what a memory is, how requests are validated and bounded, the one error
//! type and its gRPC status mapping, the privacy policy, and the contracts between the
//! services as plain Rust traits.
//!
//! A request's path through this crate: a tonic handler hands the wire message to
//! [`validate`], which returns a domain request or an INVALID_ARGUMENT naming the field; the
//! handler calls a service contract from [`api`] (in-process, or through a gRPC client of
//! `engram-runtime`); the answer is [`convert`]ed back to the wire. Nothing here does I/O.

pub mod api;
pub mod convert;
pub mod error;
pub mod limits;
pub mod log_entry;
pub mod model;
pub mod privacy;
pub mod validate;

pub use error::{Error, Result};
pub use limits::Limits;

/// Durations like `250ms`, `30s` or `5m` (the form of every duration setting).
pub fn parse_duration(value: &str) -> std::result::Result<std::time::Duration, String> {
    humantime::parse_duration(value)
        .map_err(|e| format!("{value:?} is not a duration like 250ms, 30s or 5m: {e}"))
}
