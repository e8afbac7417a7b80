//! Update and Forget. With the write log, each travels the partition of the user whose
//! memories it changes, behind that user's earlier writes, and is waited for; without it (or
//! while it is away) it is applied directly. Changed or forgotten turns drop their session's
//! cached history.

use std::collections::BTreeMap;

use engram_domain::Result;
use engram_domain::api::{
    ForgetOutcome, ForgetTarget, LogOp, UpdateCommand, UpdateOutcome, WriteToken,
};
use engram_domain::model::{Memory, MemoryId, Scope, TenantId};
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

/// What the parts of a Forget came to.
#[derive(Default)]
struct Forgotten {
    count: u64,
    /// The last part's token, if every part went through the log.
    token: Option<WriteToken>,
    logged: bool,
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
            // earlier writes.
            let stored = self.stored(tenant, command.id).await?;
            let partition = logs.write.partition_of(tenant, &stored.scope);
            match self
                .log_change(logs, tenant, partition, LogOp::Update(command.clone()))
                .await
            {
                Ok(token) => {
                    self.wait(logs, token).await?;
                    let memory = self.stored(tenant, command.id).await?;
                    // A changed turn: the session's cached history is rebuilt from the index.
                    self.history
                        .invalidate(tenant, &[stored.scope.clone(), memory.scope.clone()])
                        .await;
                    return Ok(UpdateOutcome {
                        memory,
                        write_token: token,
                    });
                }
                Err(AppendError::Lag { backlog }) => return Err(lag_error(backlog)),
                Err(AppendError::Unavailable(reason)) => self.degraded(&reason)?,
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
            let forgotten = self.apply_forget(tenant, target, None).await?;
            return Ok(ForgetOutcome {
                forgotten,
                write_token: WriteToken::Indexed,
            });
        };
        // Forgetting a scope goes to its user's partition; forgetting ids goes to the
        // partitions of the memories' users.
        let (parts, touched): (Vec<(u32, ForgetTarget)>, Vec<Scope>) = match &target {
            ForgetTarget::Scope(scope) => (
                vec![(logs.write.partition_of(tenant, scope), target.clone())],
                Vec::new(),
            ),
            ForgetTarget::Ids(ids) => {
                let found = self.stored_of(tenant, ids.clone()).await?;
                (
                    by_partition(&logs.write, tenant, &found),
                    found.into_iter().map(|m| m.scope).collect(),
                )
            }
        };
        let forgotten = self.forget_parts(logs, tenant, parts).await;
        // Forgotten turns must not linger in a cached history.
        match &target {
            ForgetTarget::Scope(scope) => {
                self.history.invalidate_user(tenant, &scope.user_id).await;
            }
            ForgetTarget::Ids(_) => self.history.invalidate(tenant, &touched).await,
        }
        let forgotten = forgotten?;
        Ok(ForgetOutcome {
            forgotten: forgotten.count,
            write_token: match (forgotten.logged, forgotten.token) {
                (true, Some(token)) => token,
                _ => WriteToken::Indexed,
            },
        })
    }

    /// Log each part of a forget and wait for it (or, while the log is away, apply it).
    async fn forget_parts(
        &self,
        logs: &Logs,
        tenant: &TenantId,
        parts: Vec<(u32, ForgetTarget)>,
    ) -> Result<Forgotten> {
        let mut forgotten = Forgotten {
            logged: true,
            ..Forgotten::default()
        };
        for (partition, part) in parts {
            match self
                .log_change(logs, tenant, partition, LogOp::Forget(part.clone()))
                .await
            {
                Ok(token) => {
                    self.wait(logs, token).await?;
                    if let WriteToken::Logged { partition, entry } = token {
                        forgotten.count += logs.write.forgot(partition, entry).await?;
                    }
                    forgotten.token = Some(token);
                }
                Err(AppendError::Lag { backlog }) => return Err(lag_error(backlog)),
                Err(AppendError::Unavailable(reason)) => {
                    self.degraded(&reason)?;
                    forgotten.count += self.apply_forget(tenant, part, None).await?;
                    forgotten.logged = false;
                }
            }
        }
        Ok(forgotten)
    }
}
