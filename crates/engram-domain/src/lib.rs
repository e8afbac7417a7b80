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
pub mod secret;
pub mod settings;
pub mod validate;

pub use error::{Error, Result};
pub use limits::Limits;
pub use secret::{ClusterSecret, SecretUrl};

/// Durations like `250ms`, `30s` or `5m` (the form of every duration setting).
pub fn parse_duration(value: &str) -> std::result::Result<std::time::Duration, String> {
    humantime::parse_duration(value)
        .map_err(|e| format!("{value:?} is not a duration like 250ms, 30s or 5m: {e}"))
}

/// A path setting, made absolute against the working directory once, at start-up, so that
/// every later use (a child process that changes directory, a log line, the banner) means
/// the same place. The path need not exist yet.
pub fn absolute_path(value: &str) -> std::result::Result<std::path::PathBuf, String> {
    if value.is_empty() {
        return Err("must not be empty".to_string());
    }
    std::path::absolute(value).map_err(|e| format!("{value:?} cannot be made absolute: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_resolved_against_the_working_directory() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(absolute_path("./data").unwrap(), cwd.join("data"));
        assert_eq!(absolute_path("data/x").unwrap(), cwd.join("data/x"));
        assert_eq!(
            absolute_path("/var/lib/engram").unwrap(),
            std::path::PathBuf::from("/var/lib/engram")
        );
        assert!(absolute_path("").is_err());
    }
}
