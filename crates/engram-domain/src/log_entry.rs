//! The write log's entry: a [`LoggedWrite`] as the protobuf bytes of an internal `LogEntry`,
//! and back, validated again on the way out of the log.

use engram_proto::internal::v1 as ipb;
use engram_proto::prost::Message as _;

use crate::api::{LogOp, LoggedWrite};
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
                sparse: None,
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
        Ok(Self {
            tenant,
            op,
            submitted_unix_ms: entry.submitted_unix_ms,
            reservations: entry.dedup_keys,
            traceparent: entry.traceparent,
        })
    }
}
