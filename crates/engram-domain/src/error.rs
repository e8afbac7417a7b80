//! The one error type of engram's domain and its one mapping to and from `tonic::Status`.
//!
//! Crates with failure modes of their own (the store, the models) keep their own error enums and
//! convert into [`Error`]; only this module knows about gRPC status codes. Both directions are
//! exhaustive matches, so adding a variant or meeting a new code is a compile error, not a
//! silently wrong status.

use std::time::Duration;

pub use engram_proto::tonic::Code;
use engram_proto::tonic::Status;
use tonic_types::{ErrorDetails, StatusExt as _};

/// Metadata key carrying the retry hint of RESOURCE_EXHAUSTED and UNAVAILABLE, in milliseconds.
/// The same hint is also sent as a `google.rpc.RetryInfo` detail.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A request field is missing or out of bounds. `field` is its path in the request, such as
    /// `memories[2].text`.
    #[error("{}", join_field(field, reason))]
    InvalidArgument { field: String, reason: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// A limit was hit; the caller may retry after the hint.
    #[error("{reason}")]
    ResourceExhausted {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The request is valid but the system is not in a state to serve it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A dependency (a peer service, Redis, a model provider) cannot be reached or refused.
    #[error("{reason}")]
    Unavailable {
        reason: String,
        retry_after: Option<Duration>,
    },
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The caller went away.
    #[error("{0}")]
    Cancelled(String),
    /// A newer holder of the same work took over (a log partition's lease changed hands): this
    /// caller's work was refused and is its successor's now.
    #[error("{0}")]
    Aborted(String),
    /// A bug or a broken invariant; the message is for operators.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn internal(message: impl std::fmt::Display) -> Self {
        Self::Internal(message.to_string())
    }

    pub fn unavailable(reason: impl Into<String>) -> Self {
        Self::Unavailable {
            reason: reason.into(),
            retry_after: None,
        }
    }

    /// Prefix the field path of an invalid argument, e.g. `text` becomes `memories[2].text`.
    pub fn in_field(self, parent: &str) -> Self {
        match self {
            Self::InvalidArgument { field, reason } => Self::InvalidArgument {
                field: if field.is_empty() {
                    parent.to_string()
                } else if field.starts_with('[') {
                    format!("{parent}{field}")
                } else {
                    format!("{parent}.{field}")
                },
                reason,
            },
            other => other,
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::ResourceExhausted { .. } => Code::ResourceExhausted,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Unavailable { .. } => Code::Unavailable,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::Cancelled(_) => Code::Cancelled,
            Self::Aborted(_) => Code::Aborted,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = error.code();
        let message = error.to_string();
        match error {
            Error::InvalidArgument { field, reason } => Status::with_error_details(
                code,
                message,
                ErrorDetails::with_bad_request_violation(field, reason),
            ),
            Error::ResourceExhausted { retry_after, .. }
            | Error::Unavailable { retry_after, .. } => match retry_after {
                Some(delay) => {
                    let mut metadata = engram_proto::tonic::metadata::MetadataMap::new();
                    if let Ok(value) = delay.as_millis().to_string().parse() {
                        metadata.insert(RETRY_AFTER_MS, value);
                    }
                    Status::with_error_details_and_metadata(
                        code,
                        message,
                        ErrorDetails::with_retry_info(Some(delay)),
                        metadata,
                    )
                }
                None => Status::new(code, message),
            },
            Error::NotFound(_)
            | Error::Unauthenticated(_)
            | Error::PermissionDenied(_)
            | Error::FailedPrecondition(_)
            | Error::DeadlineExceeded(_)
            | Error::Cancelled(_)
            | Error::Aborted(_)
            | Error::Internal(_) => Status::new(code, message),
        }
    }
}

/// Turn a peer's status back into a domain error, keeping field paths and retry hints, so a
/// service relays what its dependency said instead of flattening it to INTERNAL.
impl From<Status> for Error {
    fn from(status: Status) -> Self {
        let message = status.message().to_string();
        match status.code() {
            Code::InvalidArgument => match status.get_details_bad_request() {
                Some(bad) if !bad.field_violations.is_empty() => {
                    let violation = &bad.field_violations[0];
                    Error::invalid(violation.field.clone(), violation.description.clone())
                }
                _ => Error::invalid("", message),
            },
            Code::NotFound => Error::NotFound(message),
            // Between services the only credential is the cluster's: a peer that refuses it is
            // a deployment whose services do not share one secret (a rotation half done), not a
            // caller's fault, and it passes when they do.
            Code::Unauthenticated => Error::Unavailable {
                reason: format!(
                    "a peer refused this service's cluster credential ({message}); every service must share ENGRAM_CLUSTER_SECRET"
                ),
                retry_after: None,
            },
            Code::PermissionDenied => Error::PermissionDenied(message),
            Code::ResourceExhausted => Error::ResourceExhausted {
                reason: message,
                retry_after: retry_after_of(&status),
            },
            Code::Aborted => Error::Aborted(message),
            Code::FailedPrecondition | Code::OutOfRange | Code::AlreadyExists => {
                Error::FailedPrecondition(message)
            }
            Code::Unavailable => Error::Unavailable {
                reason: message,
                retry_after: retry_after_of(&status),
            },
            Code::DeadlineExceeded => Error::DeadlineExceeded(message),
            Code::Cancelled => Error::Cancelled(message),
            Code::Ok | Code::Unknown | Code::Unimplemented | Code::Internal | Code::DataLoss => {
                Error::Internal(message)
            }
        }
    }
}

fn join_field(field: &str, reason: &str) -> String {
    if field.is_empty() {
        reason.to_string()
    } else {
        format!("{field}: {reason}")
    }
}

fn retry_after_of(status: &Status) -> Option<Duration> {
    status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .or_else(|| {
            status
                .metadata()
                .get(RETRY_AFTER_MS)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_millis)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_refusing_the_cluster_credential_is_an_outage_not_a_caller_s_fault() {
        let relayed = Error::from(Status::unauthenticated("needs the cluster's credential"));
        assert_eq!(relayed.code(), Code::Unavailable, "{relayed}");
        assert!(
            relayed.to_string().contains("ENGRAM_CLUSTER_SECRET"),
            "{relayed}"
        );
    }

    #[test]
    fn invalid_argument_round_trips_with_its_field() {
        let status = Status::from(Error::invalid("memories[2].text", "must not be empty"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "memories[2].text: must not be empty");
        assert_eq!(
            Error::from(status),
            Error::invalid("memories[2].text", "must not be empty")
        );
    }

    #[test]
    fn retry_hint_travels_as_detail_and_metadata() {
        let status = Status::from(Error::ResourceExhausted {
            reason: "rate limit".into(),
            retry_after: Some(Duration::from_millis(250)),
        });
        assert_eq!(status.metadata().get(RETRY_AFTER_MS).unwrap(), "250");
        match Error::from(status) {
            Error::ResourceExhausted { retry_after, .. } => {
                assert_eq!(retry_after, Some(Duration::from_millis(250)))
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn field_paths_nest() {
        let e = Error::invalid("text", "too long").in_field("memories[3]");
        assert_eq!(e, Error::invalid("memories[3].text", "too long"));
        let e = Error::invalid("[0]", "bad").in_field("ids");
        assert_eq!(e, Error::invalid("ids[0]", "bad"));
    }
}
