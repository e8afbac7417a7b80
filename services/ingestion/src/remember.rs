//! A Remember, from its validated batch to its acknowledgement: the privacy guard, content
//! hashes, de-duplication against the scope's stored memories and the batch itself, ids, then
//! the write log ([`crate::logged`]) or, without one, the index directly ([`crate::direct`]).

use engram_domain::api::{Derivation, RememberBatch, RememberOutcome, WriteResult, WriteStatus};
use engram_domain::model::{MemoryId, NewMemory, Scope, TenantId, WriteMode, content_hash};
use engram_domain::{Error, Result};

use crate::Pipeline;
use crate::dedup::{self, Resolution};

/// A Remember after the guard and de-duplication: what each input resolved to and the id it
/// would have.
pub(crate) struct Resolved {
    pub tenant: TenantId,
    pub scope: Scope,
    pub memories: Vec<NewMemory>,
    pub hashes: Vec<String>,
    pub resolutions: Vec<Resolution>,
    pub ids: Vec<MemoryId>,
    pub mode: WriteMode,
    pub extract: bool,
    /// For extracted facts: the memory they come from (see [`Derivation`]).
    pub derived_from: Option<Derivation>,
}

impl Resolved {
    /// The inputs to write: index, input and content hash.
    pub fn new_inputs(&self) -> impl Iterator<Item = (usize, &NewMemory, &String)> {
        self.memories
            .iter()
            .zip(&self.hashes)
            .enumerate()
            .filter(|(i, _)| self.resolutions[*i] == Resolution::New)
            .map(|(i, (memory, hash))| (i, memory, hash))
    }

    /// Each input's result, as resolved so far.
    pub fn results(&self) -> Vec<WriteResult> {
        self.resolutions
            .iter()
            .enumerate()
            .map(|(i, resolution)| match *resolution {
                Resolution::New => WriteResult {
                    id: self.ids[i],
                    status: WriteStatus::Created,
                    reason: String::new(),
                },
                Resolution::DuplicateOf(id, reason) => WriteResult {
                    id,
                    status: WriteStatus::Duplicate,
                    reason: reason.to_string(),
                },
                Resolution::DuplicateOfInput(first, reason) => WriteResult {
                    id: self.ids[first],
                    status: WriteStatus::Duplicate,
                    reason: reason.to_string(),
                },
            })
            .collect()
    }
}

impl Pipeline {
    pub(crate) async fn remember(
        &self,
        tenant: &TenantId,
        batch: RememberBatch,
    ) -> Result<RememberOutcome> {
        let resolved = self.resolve(tenant, batch, None).await?;
        match &self.logs {
            Some(logs) => self.remember_logged(logs, resolved).await,
            None => self.remember_directly(resolved).await,
        }
    }

    /// The guard, content hashes and de-duplication of a Remember (of facts `derived_from` a
    /// memory, for extraction).
    pub(crate) async fn resolve(
        &self,
        tenant: &TenantId,
        batch: RememberBatch,
        derived_from: Option<Derivation>,
    ) -> Result<Resolved> {
        let RememberBatch {
            scope,
            mut memories,
            mode,
            extract,
            privacy,
        } = batch;
        let privacy = self.guard.mode(tenant.as_str(), privacy);
        self.guard.batch(privacy, &mut memories)?;
        if extract {
            self.check_extraction()?;
        }
        let hashes: Vec<String> = memories
            .iter()
            .map(|m| content_hash(m.kind, &m.role, &m.text))
            .collect();
        let wanted_hashes: Vec<String> = memories
            .iter()
            .zip(&hashes)
            .filter(|(m, _)| m.dedup_by_content())
            .map(|(_, h)| h.clone())
            .collect();
        let wanted_keys: Vec<String> = memories
            .iter()
            .filter(|m| !m.idempotency_key.is_empty())
            .map(|m| m.idempotency_key.clone())
            .collect();
        let existing = self
            .index
            .find_duplicates(tenant, &scope, wanted_hashes, wanted_keys)
            .await?;
        let resolutions = dedup::resolve(&memories, &hashes, &existing);
        Ok(Resolved {
            tenant: tenant.clone(),
            scope,
            ids: resolutions
                .iter()
                .map(|_| MemoryId::new_time_ordered())
                .collect(),
            memories,
            hashes,
            resolutions,
            mode,
            extract,
            derived_from,
        })
    }

    /// Extraction needs a chat model and the extraction log.
    fn check_extraction(&self) -> Result<()> {
        if self.chat.is_none() {
            return Err(Error::FailedPrecondition(
                "extract=true needs a chat model: set ENGRAM_CHAT_BASE_URL on the ingestion service".into(),
            ));
        }
        if self.logs.is_none() {
            return Err(Error::FailedPrecondition(
                "extract=true needs the write log: set ENGRAM_REDIS_URL on the ingestion service"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_name_the_stored_or_earlier_input_a_duplicate_is_of() {
        let stored = MemoryId::new_time_ordered();
        let ids: Vec<MemoryId> = (0..3).map(|_| MemoryId::new_time_ordered()).collect();
        let resolved = Resolved {
            tenant: TenantId::default_tenant(),
            scope: Scope::user("u"),
            memories: vec![
                NewMemory::text("a"),
                NewMemory::text("b"),
                NewMemory::text("a"),
            ],
            hashes: vec!["ha".into(), "hb".into(), "ha".into()],
            resolutions: vec![
                Resolution::New,
                Resolution::DuplicateOf(stored, "same idempotency key"),
                Resolution::DuplicateOfInput(0, "same content earlier in this batch"),
            ],
            ids: ids.clone(),
            derived_from: None,
            mode: WriteMode::Async,
            extract: false,
        };
        let results = resolved.results();
        assert_eq!(
            results.iter().map(|r| (r.id, r.status)).collect::<Vec<_>>(),
            vec![
                (ids[0], WriteStatus::Created),
                (stored, WriteStatus::Duplicate),
                (ids[0], WriteStatus::Duplicate),
            ]
        );
        let new: Vec<usize> = resolved.new_inputs().map(|(i, _, _)| i).collect();
        assert_eq!(new, vec![0]);
    }
}
