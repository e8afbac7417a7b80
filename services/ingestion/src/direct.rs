//! The direct path: without Redis (or, unless `ENGRAM_LOG_STRICT`, while it is unreachable) a
//! write is embedded and applied to the index before it is acknowledged.

use engram_domain::api::{RememberOutcome, WriteToken};
use engram_domain::model::{Memory, Timestamp};
use engram_domain::{Error, Result};

use crate::Pipeline;
use crate::dedup::Resolution;
use crate::remember::Resolved;

impl Pipeline {
    /// Index a Remember's new memories now, then acknowledge it.
    pub(crate) async fn remember_directly(&self, resolved: Resolved) -> Result<RememberOutcome> {
        let now = Timestamp::now();
        let results = resolved.results();
        let Resolved {
            tenant,
            scope,
            memories,
            resolutions,
            ids,
            ..
        } = resolved;
        let new_memories: Vec<Memory> = memories
            .into_iter()
            .enumerate()
            .filter(|(i, _)| resolutions[*i] == Resolution::New)
            .map(|(i, input)| Memory::from_input(ids[i], tenant.clone(), scope.clone(), input, now))
            .collect();
        self.embed_and_apply(&tenant, new_memories, None).await?;
        Ok(RememberOutcome {
            results,
            write_token: WriteToken::Indexed,
        })
    }

    /// Whether a write may take the direct path while the log is away (`reason`): not under
    /// `ENGRAM_LOG_STRICT`; counted and logged when it does.
    pub(crate) fn degraded(&self, reason: &str) -> Result<()> {
        let Some(logs) = &self.logs else {
            return Ok(());
        };
        if logs.args.strict {
            return Err(Error::unavailable(format!(
                "the write log is unavailable ({reason}) and ENGRAM_LOG_STRICT refuses to index writes without it"
            )));
        }
        if let Some(metrics) = &self.metrics {
            metrics.degraded.inc();
        }
        tracing::warn!(%reason, "write log unavailable: indexing this write synchronously");
        Ok(())
    }
}
