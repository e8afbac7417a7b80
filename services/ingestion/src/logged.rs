//! The write log's side of the write path: a Remember's new memories appended to their user's
//! partition with their de-duplication reservations (one Lua script: all or nothing),
//! acknowledged at once (ASYNC) or once indexed (SYNC); an Update or Forget appended and waited
//! for. The workers ([`crate::worker`]) index what is appended, in order.

use engram_domain::api::{EntryId, LogOp, LoggedWrite, RememberOutcome, WriteState, WriteToken};
use engram_domain::model::{Memory, Scope, TenantId, Timestamp};
use engram_domain::{Error, Result};
use engram_writelog::{Append, AppendError, Appended, Reserved};

use crate::Pipeline;
use crate::dedup::Resolution;
use crate::pipeline::Logs;
use crate::remember::Resolved;

/// A de-duplication reservation's key: by idempotency key (`k`) or content hash (`h`) within
/// the exact scope.
pub(crate) fn reservation(tenant: &TenantId, scope: &Scope, by: &str, value: &str) -> String {
    format!(
        "engram:dedup:{}:{}:{by}:{value}",
        tenant.as_str(),
        scope.exact_key()
    )
}

/// The appends of a Remember's new memories, and for each the input it is and its memory.
pub(crate) struct Planned {
    pub appends: Vec<Append>,
    pub inputs: Vec<usize>,
    pub memories: Vec<Memory>,
}

/// Plan the appends of `resolved`'s new inputs, stamped `now`.
pub(crate) fn plan(resolved: &Resolved, now: Timestamp, traceparent: &str) -> Planned {
    let mut planned = Planned {
        appends: Vec::new(),
        inputs: Vec::new(),
        memories: Vec::new(),
    };
    let (tenant, scope) = (&resolved.tenant, &resolved.scope);
    for (i, input, hash) in resolved.new_inputs() {
        let key_reservation = if input.idempotency_key.is_empty() {
            String::new()
        } else {
            reservation(tenant, scope, "k", &input.idempotency_key)
        };
        let content_reservation = if input.dedup_by_content() {
            reservation(tenant, scope, "h", hash)
        } else {
            String::new()
        };
        let memory = Memory::from_input(
            resolved.ids[i],
            tenant.clone(),
            scope.clone(),
            input.clone(),
            now,
        );
        let pending_key = engram_writelog::pending_key(tenant, &resolved.ids[i].to_string());
        let write = LoggedWrite {
            tenant: tenant.clone(),
            op: LogOp::Remember(Box::new(memory.clone())),
            submitted_unix_ms: now.as_micros() / 1000,
            reservations: [&key_reservation, &content_reservation, &pending_key]
                .into_iter()
                .filter(|k| !k.is_empty())
                .cloned()
                .collect(),
            traceparent: traceparent.to_string(),
            derived_from: resolved.derived_from.clone(),
        };
        planned.appends.push(Append {
            key_reservation,
            content_reservation,
            id: resolved.ids[i].to_string(),
            payload: write.encode(),
            force: false,
            pending_key,
        });
        planned.inputs.push(i);
        planned.memories.push(memory);
    }
    planned
}

/// RESOURCE_EXHAUSTED for a partition too far behind.
pub(crate) fn lag_error(backlog: u64) -> Error {
    Error::ResourceExhausted {
        reason: format!("indexing is {backlog} writes behind for this partition; retry shortly"),
        retry_after: Some(std::time::Duration::from_secs(1)),
    }
}

impl Pipeline {
    /// Append a Remember's new memories and acknowledge them (after they are indexed, SYNC).
    pub(crate) async fn remember_logged(
        &self,
        logs: &Logs,
        mut resolved: Resolved,
    ) -> Result<RememberOutcome> {
        let traceparent = engram_telemetry::trace::current_traceparent();
        let partition = logs.write.partition_of(&resolved.tenant, &resolved.scope);
        let planned = plan(&resolved, Timestamp::now(), &traceparent);
        if planned.appends.is_empty() {
            return Ok(RememberOutcome {
                results: resolved.results(),
                write_token: WriteToken::Indexed,
            });
        }
        let appended = match logs
            .write
            .append(partition, &planned.appends, logs.args.max_lag)
            .await
        {
            Ok(appended) => appended,
            Err(AppendError::Lag { backlog }) => {
                if let Some(metrics) = &self.metrics {
                    metrics.refused.inc();
                }
                return Err(lag_error(backlog));
            }
            // Derived facts are checked against their source only on the log's path: without
            // it their extraction waits.
            Err(AppendError::Unavailable(reason)) if resolved.derived_from.is_some() => {
                return Err(Error::unavailable(format!(
                    "the write log is unavailable ({reason}); extracted facts wait for it"
                )));
            }
            Err(AppendError::Unavailable(reason)) => {
                self.degraded(&reason)?;
                return self.remember_directly(resolved).await;
            }
        };
        let last = self
            .settle_reservations(logs, partition, &mut resolved, &planned, appended)
            .await?;
        let write_token = match last {
            Some(entry) => WriteToken::Logged { partition, entry },
            None => WriteToken::Indexed,
        };
        let created: Vec<Memory> = planned
            .inputs
            .iter()
            .zip(planned.memories)
            .filter(|(i, _)| resolved.resolutions[**i] == Resolution::New)
            .map(|(_, memory)| memory)
            .collect();
        self.history.append(&resolved.tenant, &created).await;
        if resolved.extract {
            self.log_extraction(logs, &resolved.tenant, partition, &created, &traceparent)
                .await;
        }
        if resolved.mode == engram_domain::model::WriteMode::Sync {
            self.wait(logs, write_token).await?;
        }
        Ok(RememberOutcome {
            results: resolved.results(),
            write_token,
        })
    }

    /// Settle what the append answered for each planned write: logged; a duplicate of the
    /// recent write holding its reservation (its id and entry are the answer); or, when that
    /// write has since failed or been forgotten, appended again over the stale reservation.
    /// The last entry a read must wait for.
    async fn settle_reservations(
        &self,
        logs: &Logs,
        partition: u32,
        resolved: &mut Resolved,
        planned: &Planned,
        appended: Vec<Appended>,
    ) -> Result<Option<EntryId>> {
        let mut last: Option<EntryId> = None;
        let mut again: Vec<(usize, Append)> = Vec::new();
        for ((&i, outcome), append) in planned.inputs.iter().zip(&appended).zip(&planned.appends) {
            let (held, why) = match outcome {
                Appended::Logged(entry) => {
                    last = last.max(Some(*entry));
                    continue;
                }
                Appended::DuplicateKey(held) => (held, "same idempotency key"),
                Appended::DuplicateContent(held) => {
                    (held, "same content already stored in this scope")
                }
            };
            if self.stale(logs, &resolved.tenant, partition, held).await {
                again.push((
                    i,
                    Append {
                        force: true,
                        ..append.clone()
                    },
                ));
                continue;
            }
            if let Ok(id) = engram_domain::validate::memory_id(&held.id) {
                resolved.ids[i] = id;
                resolved.resolutions[i] = Resolution::DuplicateOf(id, why);
                // Reading "after" this write means after the write it duplicates.
                last = last.max(held.entry);
            }
        }
        if again.is_empty() {
            return Ok(last);
        }
        let appends: Vec<Append> = again.iter().map(|(_, a)| a.clone()).collect();
        let appended = logs
            .write
            .append(partition, &appends, logs.args.max_lag)
            .await
            .map_err(|e| match e {
                AppendError::Lag { backlog } => lag_error(backlog),
                AppendError::Unavailable(reason) => Error::unavailable(format!(
                    "the write log (Redis) failed during the write: {reason}; retry it"
                )),
            })?;
        for ((i, _), outcome) in again.iter().zip(appended) {
            match outcome {
                Appended::Logged(entry) => last = last.max(Some(entry)),
                _ => {
                    return Err(Error::internal(format!(
                        "write {i} was appended over a stale reservation and still found one"
                    )));
                }
            }
        }
        Ok(last)
    }

    /// Whether the write holding a de-duplication reservation no longer stands: it failed, or
    /// it was indexed and is gone from the index (forgotten). When unsure, it stands.
    async fn stale(&self, logs: &Logs, tenant: &TenantId, partition: u32, held: &Reserved) -> bool {
        let Some(entry) = held.entry else {
            return false;
        };
        match logs
            .write
            .status(WriteToken::Logged { partition, entry })
            .await
        {
            Ok(WriteState::Failed(_)) => true,
            Ok(WriteState::Indexed) => {
                let Ok(id) = engram_domain::validate::memory_id(&held.id) else {
                    return false;
                };
                matches!(self.stored(tenant, id).await, Err(Error::NotFound(_)))
            }
            _ => false,
        }
    }

    /// Queue the extraction of facts from `created` on the extraction log. The write is
    /// acknowledged even if this fails (Redis failing between the two appends): the memories
    /// are stored, only their extraction is lost, and that is logged and counted.
    async fn log_extraction(
        &self,
        logs: &Logs,
        tenant: &TenantId,
        partition: u32,
        created: &[Memory],
        traceparent: &str,
    ) {
        if created.is_empty() {
            return;
        }
        let submitted = Timestamp::now().as_micros() / 1000;
        let appends: Vec<Append> = created
            .iter()
            .map(|memory| Append {
                key_reservation: String::new(),
                content_reservation: String::new(),
                id: memory.id.to_string(),
                payload: LoggedWrite {
                    tenant: tenant.clone(),
                    op: LogOp::Extract(Box::new(memory.clone())),
                    submitted_unix_ms: submitted,
                    reservations: Vec::new(),
                    traceparent: traceparent.to_string(),
                    derived_from: None,
                }
                .encode(),
                force: false,
                pending_key: String::new(),
            })
            .collect();
        if let Err(e) = logs.extraction.append(partition, &appends, u64::MAX).await {
            if let Some(metrics) = &self.metrics {
                metrics.extraction_lost.inc_by(appends.len() as u64);
            }
            tracing::warn!(error = ?e, memories = appends.len(), "could not queue fact extraction; the memories are stored without it");
        }
    }

    /// Append one Update or Forget to `partition`.
    pub(crate) async fn log_change(
        &self,
        logs: &Logs,
        tenant: &TenantId,
        partition: u32,
        op: LogOp,
    ) -> std::result::Result<WriteToken, AppendError> {
        let write = LoggedWrite {
            tenant: tenant.clone(),
            op,
            submitted_unix_ms: Timestamp::now().as_micros() / 1000,
            reservations: Vec::new(),
            traceparent: engram_telemetry::trace::current_traceparent(),
            derived_from: None,
        };
        let appended = logs
            .write
            .append(
                partition,
                &[Append {
                    key_reservation: String::new(),
                    content_reservation: String::new(),
                    id: String::new(),
                    payload: write.encode(),
                    force: false,
                    pending_key: String::new(),
                }],
                u64::MAX,
            )
            .await?;
        match appended.first() {
            Some(Appended::Logged(entry)) => Ok(WriteToken::Logged {
                partition,
                entry: *entry,
            }),
            _ => Err(AppendError::Unavailable(
                "the write log did not log the operation".into(),
            )),
        }
    }

    /// Wait (within `ENGRAM_LOG_SYNC_WAIT` and the caller's deadline) until the write behind
    /// `token` is indexed; its failure if it failed.
    pub(crate) async fn wait(&self, logs: &Logs, token: WriteToken) -> Result<()> {
        let budget = engram_runtime::deadline::answerable_within(logs.args.sync_wait);
        engram_runtime::writes::indexed(token, budget, |t| logs.write.status(t)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engram_domain::model::{Kind, MemoryId, NewMemory, WriteMode};

    #[test]
    fn only_new_inputs_are_planned_each_with_its_reservations() {
        let ids: Vec<MemoryId> = (0..3).map(|_| MemoryId::new_time_ordered()).collect();
        let message = NewMemory {
            kind: Kind::Message,
            ..NewMemory::text("hi")
        };
        let keyed = NewMemory {
            idempotency_key: "k1".into(),
            ..NewMemory::text("a fact")
        };
        let resolved = Resolved {
            tenant: TenantId::default_tenant(),
            scope: Scope::user("u"),
            memories: vec![message, NewMemory::text("dup"), keyed],
            hashes: vec!["h0".into(), "h1".into(), "h2".into()],
            resolutions: vec![
                Resolution::New,
                Resolution::DuplicateOfInput(0, "same content earlier in this batch"),
                Resolution::New,
            ],
            ids: ids.clone(),
            mode: WriteMode::Async,
            extract: false,
            derived_from: None,
        };
        let planned = plan(&resolved, Timestamp::now(), "");
        assert_eq!(planned.inputs, vec![0, 2]);
        assert_eq!(planned.memories[1].id, ids[2]);
        // A message is not de-duplicated by content; a fact is, and by its key too.
        assert!(planned.appends[0].content_reservation.is_empty());
        assert!(planned.appends[0].key_reservation.is_empty());
        assert!(planned.appends[1].content_reservation.ends_with(":h:h2"));
        assert!(planned.appends[1].key_reservation.ends_with(":k:k1"));
        // Each records where its write is, for an Update or Forget by id while it is pending.
        assert!(
            planned.appends[0]
                .pending_key
                .ends_with(&ids[0].to_string())
        );
        let entry = LoggedWrite::decode(&planned.appends[1].payload, &Default::default()).unwrap();
        // Released with the reservations once the write is indexed.
        assert_eq!(
            entry.reservations,
            [
                planned.appends[1].key_reservation.clone(),
                planned.appends[1].content_reservation.clone(),
                planned.appends[1].pending_key.clone(),
            ]
        );
        assert!(matches!(entry.op, LogOp::Remember(m) if m.id == ids[2]));
    }
}
