//! Update and Forget. With the write log, each travels the partition of the user whose
//! memories it changes, behind that user's earlier writes, and is waited for; without it (or
//! while it is away) it is applied directly. Changed or forgotten turns drop their session's
//! cached history where the change is applied ([`crate::index`]).

use std::collections::BTreeMap;

use engram_domain::api::{
    Erasure, ForgetOutcome, ForgetTarget, LogOp, UpdateCommand, UpdateOutcome, WriteState,
    WriteToken,
};
use engram_domain::model::{Memory, MemoryId, TenantId};
use engram_domain::{Error, Result};
use engram_writelog::{AppendError, WriteLog};

use crate::Pipeline;
use crate::logged::lag_error;
use crate::pipeline::Logs;

/// The parts of a Forget by id, one per partition of the memories' users.
fn by_partition(log: &WriteLog, tenant: &TenantId, found: &[Memory]) -> Vec<(u32, ForgetTarget)> {
    let mut parts: BTreeMap<u32, Vec<MemoryId>> = BTreeMap::new();
    for memory in found {
        parts
            .entry(log.partition_of(tenant, &memory.scope))
            .or_default()
            .push(memory.id);
    }
    parts
        .into_iter()
        .map(|(p, ids)| (p, ForgetTarget::Ids(ids)))
        .collect()
}

/// Why an Update or Forget is refused while the write log is unreachable. Applied directly, it
/// could be overtaken by the user's older writes still in the log (a Forget followed by the
/// write it forgot), so unlike a Remember it waits for the log; the caller retries.
fn needs_the_log(reason: &str) -> Error {
    // What Redis said stays in the service's log: it may name hosts the caller need not see.
    tracing::warn!(%reason, "Update or Forget refused: the write log is unreachable");
    Error::Unavailable {
        reason: "the write log is unreachable; Update and Forget wait for it, because the user's earlier writes in it must be applied first: retry shortly".into(),
        retry_after: Some(std::time::Duration::from_secs(1)),
    }
}

/// What the parts of a Forget came to.
#[derive(Default)]
struct Forgotten {
    receipt: Erasure,
    /// The last part's token.
    token: Option<WriteToken>,
}

impl Pipeline {
    pub(crate) async fn update_memory(
        &self,
        tenant: &TenantId,
        mut command: UpdateCommand,
    ) -> Result<UpdateOutcome> {
        let mode = self.guard.mode(tenant.as_str(), None);
        if let Some(text) = &mut command.patch.text {
            self.guard.field(mode, "memory.text", text)?;
        }
        if let Some(metadata) = &mut command.patch.metadata {
            self.guard.metadata(mode, "memory", metadata)?;
        }
        if let Some(logs) = &self.logs {
            // The memory's user decides the partition, so the update follows the user's
            // earlier writes (after the memory's own, if it is still in the log).
            let stored = match self.stored(tenant, command.id).await {
                Err(Error::NotFound(_))
                    if self.after_pending(logs, tenant, &[command.id]).await? =>
                {
                    self.stored(tenant, command.id).await?
                }
                stored => stored?,
            };
            let partition = logs.write.partition_of(tenant, &stored.scope);
            match self
                .log_change(logs, tenant, partition, LogOp::Update(command.clone()))
                .await
            {
                Ok(token) => {
                    self.wait(logs, token).await?;
                    let memory = self.stored(tenant, command.id).await?;
                    return Ok(UpdateOutcome {
                        memory,
                        write_token: token,
                    });
                }
                Err(AppendError::Lag { backlog }) => return Err(lag_error(backlog)),
                Err(AppendError::Unavailable(reason)) => return Err(needs_the_log(&reason)),
            }
        }
        let memory = self.apply_update(tenant, command, None).await?;
        Ok(UpdateOutcome {
            memory,
            write_token: WriteToken::Indexed,
        })
    }

    pub(crate) async fn forget_memories(
        &self,
        tenant: &TenantId,
        target: ForgetTarget,
    ) -> Result<ForgetOutcome> {
        let Some(logs) = &self.logs else {
            let receipt = self.apply_forget(tenant, target, None).await?;
            return Ok(ForgetOutcome {
                forgotten: receipt.memories,
                write_token: WriteToken::Indexed,
                receipt,
            });
        };
        // Forgetting a scope goes to its user's partition; forgetting ids goes to the
        // partitions of the memories' users.
        let parts: Vec<(u32, ForgetTarget)> = match &target {
            ForgetTarget::Scope(scope) => {
                vec![(logs.write.partition_of(tenant, scope), target.clone())]
            }
            ForgetTarget::Ids(ids) => {
                let mut found = self.stored_of(tenant, ids.clone()).await?;
                let missing: Vec<MemoryId> = ids
                    .iter()
                    .filter(|id| !found.iter().any(|m| m.id == **id))
                    .copied()
                    .collect();
                // Memories still in the log are forgotten once their writes are indexed.
                if self.after_pending(logs, tenant, &missing).await? {
                    found.extend(self.stored_of(tenant, missing).await?);
                }
                by_partition(&logs.write, tenant, &found)
            }
        };
        let forgotten = self.forget_parts(logs, tenant, parts).await?;
        Ok(ForgetOutcome {
            forgotten: forgotten.receipt.memories,
            write_token: forgotten.token.unwrap_or(WriteToken::Indexed),
            receipt: forgotten.receipt,
        })
    }

    /// Wait until the writes of those of `ids` still in the write log are indexed; whether
    /// there were any. Without the log's answer nobody can say whether they exist: UNAVAILABLE.
    async fn after_pending(
        &self,
        logs: &Logs,
        tenant: &TenantId,
        ids: &[MemoryId],
    ) -> Result<bool> {
        if ids.is_empty() {
            return Ok(false);
        }
        let pending = logs
            .write
            .pending(tenant, ids)
            .await
            .map_err(|e| needs_the_log(&e.to_string()))?;
        let mut any = false;
        for (partition, entry) in pending.into_iter().flatten() {
            let token = WriteToken::Logged { partition, entry };
            match self.wait(logs, token).await {
                Ok(()) => any = true,
                // A write that failed left nothing to change.
                Err(_) if matches!(logs.write.status(token).await, Ok(WriteState::Failed(_))) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(any)
    }

    /// Log each part of a forget and wait for it (or, while the log is away, apply it).
    async fn forget_parts(
        &self,
        logs: &Logs,
        tenant: &TenantId,
        parts: Vec<(u32, ForgetTarget)>,
    ) -> Result<Forgotten> {
        let mut forgotten = Forgotten::default();
        for (partition, part) in parts {
            match self
                .log_change(logs, tenant, partition, LogOp::Forget(part))
                .await
            {
                Ok(token) => {
                    self.wait(logs, token).await?;
                    if let WriteToken::Logged { partition, entry } = token {
                        forgotten
                            .receipt
                            .add(logs.write.forgot(partition, entry).await?);
                    }
                    forgotten.token = Some(token);
                }
                Err(AppendError::Lag { backlog }) => return Err(lag_error(backlog)),
                Err(AppendError::Unavailable(reason)) => return Err(needs_the_log(&reason)),
            }
        }
        Ok(forgotten)
    }
}
