//! The write log's records: an entry, a [`LoggedWrite`] as the protobuf bytes of an internal
//! `LogEntry`, validated again on the way out of the log; and an entry's [`Outcome`] as the
//! bytes of an internal `Outcome`.

use engram_proto::internal::v1 as ipb;
use engram_proto::prost::Message as _;

use crate::api::{Derivation, FailureKind, LogOp, LoggedWrite, Outcome, WriteFailure};
use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::model::TenantId;
use crate::{convert, validate};

impl LoggedWrite {
    /// The protobuf bytes of a `LogEntry`.
    pub fn encode(&self) -> Vec<u8> {
        let op = match &self.op {
            LogOp::Remember(memory) => ipb::log_entry::Op::Remember(ipb::IndexedMemory {
                memory: Some(convert::memory(memory)),
                dense: None,
                idempotency_key: memory.idempotency_key.clone(),
            }),
            LogOp::Update(command) => ipb::log_entry::Op::Update(convert::update_request(command)),
            LogOp::Forget(target) => ipb::log_entry::Op::Forget(convert::forget_request(target)),
            LogOp::Extract(memory) => ipb::log_entry::Op::Extract(convert::memory(memory)),
        };
        ipb::LogEntry {
            tenant: self.tenant.to_string(),
            op: Some(op),
            submitted_unix_ms: self.submitted_unix_ms,
            dedup_keys: self.reservations.clone(),
            traceparent: self.traceparent.clone(),
            derived_from: self.derived_from.as_ref().map(|d| ipb::Derivation {
                source_id: d.source.to_string(),
                source_hash: d.source_hash.clone(),
            }),
        }
        .encode_to_vec()
    }

    /// Decode and validate an entry the log holds.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Self> {
        let entry = ipb::LogEntry::decode(bytes)
            .map_err(|e| Error::invalid("op", format!("not a LogEntry: {e}")))?;
        let tenant = TenantId::parse(&entry.tenant)?;
        let op = match entry.op {
            Some(ipb::log_entry::Op::Remember(indexed)) => {
                let mut memory =
                    convert::memory_from_pb(indexed.memory.unwrap_or_default(), &tenant)?;
                memory.idempotency_key = indexed.idempotency_key;
                LogOp::Remember(Box::new(memory))
            }
            Some(ipb::log_entry::Op::Update(update)) => {
                LogOp::Update(validate::update(update, limits)?)
            }
            Some(ipb::log_entry::Op::Forget(forget)) => {
                LogOp::Forget(validate::forget(forget, limits)?)
            }
            Some(ipb::log_entry::Op::Extract(memory)) => {
                LogOp::Extract(Box::new(convert::memory_from_pb(memory, &tenant)?))
            }
            None => return Err(Error::invalid("op", "is required")),
        };
        let derived_from = match entry.derived_from {
            Some(d) => Some(Derivation {
                source: validate::memory_id(&d.source_id)
                    .map_err(|e| e.in_field("derived_from"))?,
                source_hash: d.source_hash,
            }),
            None => None,
        };
        Ok(Self {
            tenant,
            op,
            submitted_unix_ms: entry.submitted_unix_ms,
            reservations: entry.dedup_keys,
            traceparent: entry.traceparent,
            derived_from,
        })
    }
}

impl FailureKind {
    pub fn to_pb(self) -> ipb::FailureKind {
        match self {
            FailureKind::Invalid => ipb::FailureKind::Invalid,
            FailureKind::NotFound => ipb::FailureKind::NotFound,
            FailureKind::Unavailable => ipb::FailureKind::Unavailable,
            FailureKind::Failed => ipb::FailureKind::Failed,
        }
    }

    /// Unknown values (a newer peer's) read as [`FailureKind::Failed`].
    pub fn from_pb(kind: i32) -> Self {
        match ipb::FailureKind::try_from(kind) {
            Ok(ipb::FailureKind::Invalid) => FailureKind::Invalid,
            Ok(ipb::FailureKind::NotFound) => FailureKind::NotFound,
            Ok(ipb::FailureKind::Unavailable) => FailureKind::Unavailable,
            Ok(ipb::FailureKind::Failed | ipb::FailureKind::Unspecified) | Err(_) => {
                FailureKind::Failed
            }
        }
    }
}

impl Outcome {
    /// The protobuf bytes of an `Outcome`.
    pub fn encode(&self) -> Vec<u8> {
        let outcome = match self {
            Outcome::Forgot(receipt) => {
                ipb::outcome::Outcome::Erased(crate::convert::receipt(receipt))
            }
            Outcome::Failed(failure) => ipb::outcome::Outcome::Failed(ipb::WriteFailure {
                kind: failure.kind.to_pb().into(),
                message: failure.message.clone(),
            }),
        };
        ipb::Outcome {
            outcome: Some(outcome),
        }
        .encode_to_vec()
    }

    /// Read an outcome the log holds; `None` if it is not one.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        match ipb::Outcome::decode(bytes).ok()?.outcome? {
            ipb::outcome::Outcome::Forgot(n) => Some(Outcome::Forgot(crate::api::Erasure {
                memories: n,
                ..Default::default()
            })),
            ipb::outcome::Outcome::Erased(receipt) => {
                Some(Outcome::Forgot(crate::convert::erasure(receipt)))
            }
            ipb::outcome::Outcome::Failed(failure) => Some(Outcome::Failed(WriteFailure {
                kind: FailureKind::from_pb(failure.kind),
                message: failure.message,
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_survive_the_round_trip() {
        for outcome in [
            Outcome::Forgot(crate::api::Erasure::default()),
            Outcome::Forgot(crate::api::Erasure {
                memories: 12,
                facts: 2,
                cached_embeddings: 30,
                history_lists: 1,
                log_keys: 24,
                cached_results: 3,
            }),
            Outcome::Failed(WriteFailure {
                kind: FailureKind::NotFound,
                message: "memory x not found".into(),
            }),
            Outcome::Failed(WriteFailure {
                kind: FailureKind::Invalid,
                message: String::new(),
            }),
        ] {
            assert_eq!(Outcome::decode(&outcome.encode()), Some(outcome));
        }
        assert_eq!(Outcome::decode(b"failed:old text"), None);
    }

    #[test]
    fn each_failure_kind_maps_to_one_code() {
        use crate::error::{Code, Error};
        let token = crate::api::WriteToken::Indexed;
        for (error, code) in [
            (Error::invalid("text", "too long"), Code::InvalidArgument),
            (Error::NotFound("gone".into()), Code::NotFound),
            (Error::unavailable("down"), Code::Unavailable),
            (Error::DeadlineExceeded("slow".into()), Code::Unavailable),
            (Error::internal("bug"), Code::FailedPrecondition),
            (
                Error::FailedPrecondition("no".into()),
                Code::FailedPrecondition,
            ),
        ] {
            let failure = WriteFailure::of(&error);
            assert_eq!(failure.error(token).code(), code, "{error:?}");
            assert!(
                failure
                    .error(token)
                    .to_string()
                    .contains(&error.to_string())
            );
            let kind = FailureKind::from_pb(failure.kind.to_pb().into());
            assert_eq!(kind, failure.kind);
        }
    }
}
