//! Writes applied to the index: memories embedded (turns with the turn before them, see
//! [`crate::turns`]) and upserted, updates, forgets. The workers apply logged writes with
//! these, fenced by their partition's lease; without a log (or while it is away) the write
//! path calls them directly, unfenced.

use std::collections::HashSet;

use engram_domain::api::{
    Fence, ForgetTarget, IndexOp, IndexWrites, IndexedMemory, ListQuery, Purpose, UpdateCommand,
};
use engram_domain::model::{Filter, Memory, MemoryId, Scope, TenantId, Timestamp};
use engram_domain::{Error, Result};

use crate::Pipeline;
use crate::turns;

impl Pipeline {
    /// Embed the memories and apply them, in order.
    pub(crate) async fn embed_and_apply(
        &self,
        tenant: &TenantId,
        memories: Vec<Memory>,
        fence: Option<Fence>,
    ) -> Result<u64> {
        if memories.is_empty() {
            return Ok(0);
        }
        let previous = turns::previous_texts(&*self.index, tenant, &memories).await?;
        let ops = self
            .upserts(memories.into_iter().zip(previous).collect())
            .await?;
        let outcome = self.index.apply(tenant, IndexWrites { ops, fence }).await?;
        Ok(outcome.upserted)
    }

    /// Upserts of memories, each embedded alone and, for a turn with the text of the turn
    /// before it, in that context too.
    async fn upserts(&self, memories: Vec<(Memory, Option<String>)>) -> Result<Vec<IndexOp>> {
        if memories.is_empty() {
            return Ok(Vec::new());
        }
        let mut texts: Vec<String> = memories.iter().map(|(m, _)| m.text.clone()).collect();
        texts.extend(
            memories
                .iter()
                .filter_map(|(m, p)| p.as_ref().map(|p| turns::in_context(p, &m.text))),
        );
        let wanted = texts.len();
        let embeddings = self.embedder.embed(texts, Purpose::Document).await?;
        if embeddings.vectors.len() != wanted {
            return Err(Error::internal(format!(
                "embedding service returned {} vectors for {wanted} texts",
                embeddings.vectors.len(),
            )));
        }
        let mut vectors = embeddings.vectors;
        let mut in_context = vectors.split_off(memories.len()).into_iter();
        Ok(memories
            .into_iter()
            .zip(vectors)
            .map(|((memory, previous), own)| {
                // One in-context vector follows for each turn with a previous one, in order.
                let dense = match previous.and_then(|_| in_context.next()) {
                    Some(with_previous) => turns::combine(&own, &with_previous),
                    None => own,
                };
                IndexOp::Upsert(Box::new(IndexedMemory { memory, dense }))
            })
            .collect())
    }

    /// Apply an update now: the stored memory, patched, embedded again (and the turn after
    /// it, when its text or place changed: that turn was embedded with it).
    pub(crate) async fn apply_update(
        &self,
        tenant: &TenantId,
        command: UpdateCommand,
        fence: Option<Fence>,
    ) -> Result<Memory> {
        let stored = self.stored(tenant, command.id).await?;
        let mut memory = stored.clone();
        memory.apply_patch(command.patch, Timestamp::now());
        let moved = memory.scope != stored.scope || memory.kind != stored.kind;
        let changed = if moved || memory.text != stored.text {
            let stays = (!moved).then(|| memory.text.clone());
            vec![(stored, stays)]
        } else {
            Vec::new()
        };
        let removed = if moved {
            HashSet::from([memory.id])
        } else {
            HashSet::new()
        };
        let following = turns::following(&*self.index, tenant, &changed, &removed).await?;
        // The index keeps no vectors we can read back, so the (possibly unchanged) text is
        // embedded again; the embedding cache makes that cheap for unchanged text.
        let previous = turns::previous_texts(&*self.index, tenant, std::slice::from_ref(&memory))
            .await?
            .pop()
            .flatten();
        let mut upserts = vec![(memory.clone(), previous)];
        upserts.extend(following.into_iter().map(|f| (f.turn, f.previous)));
        let ops = self.upserts(upserts).await?;
        self.index.apply(tenant, IndexWrites { ops, fence }).await?;
        Ok(memory)
    }

    /// Apply a forget now; how many memories it deleted. Forgetting turns by id embeds the
    /// turns after them again first, without them (one apply: a retry finds the same turns).
    pub(crate) async fn apply_forget(
        &self,
        tenant: &TenantId,
        target: ForgetTarget,
        fence: Option<Fence>,
    ) -> Result<u64> {
        let ops = match target {
            ForgetTarget::Ids(ids) => {
                let removed: HashSet<MemoryId> = ids.iter().copied().collect();
                let mut forgotten = self.stored_of(tenant, ids.clone()).await?;
                forgotten.sort_by_key(|m| m.id);
                let changed: Vec<(Memory, Option<String>)> =
                    forgotten.iter().map(|m| (m.clone(), None)).collect();
                let following = turns::following(&*self.index, tenant, &changed, &removed).await?;
                let followers: Vec<Memory> = following.iter().map(|f| f.turn.clone()).collect();
                self.forget_embeddings(tenant, &forgotten, &followers)
                    .await?;
                let mut ops = self
                    .upserts(
                        following
                            .into_iter()
                            .map(|f| (f.turn, f.previous))
                            .collect(),
                    )
                    .await?;
                ops.push(IndexOp::DeleteIds(ids));
                ops
            }
            ForgetTarget::Scope(scope) => {
                let forgotten = self.listed(tenant, &scope).await?;
                self.forget_embeddings(tenant, &forgotten, &[]).await?;
                vec![IndexOp::DeleteScope(scope)]
            }
        };
        let outcome = self.index.apply(tenant, IndexWrites { ops, fence }).await?;
        Ok(outcome.deleted)
    }

    /// Every memory of `scope` (empty agent or session: any), oldest first.
    async fn listed(&self, tenant: &TenantId, scope: &Scope) -> Result<Vec<Memory>> {
        let mut memories = Vec::new();
        let mut page_token = None;
        loop {
            let page = self
                .index
                .list(
                    tenant,
                    ListQuery {
                        scope: scope.clone(),
                        filter: Filter::default(),
                        page_size: self.limits.max_page_size,
                        page_token,
                        after_write_token: None,
                    },
                )
                .await?;
            memories.extend(page.memories);
            match page.next_page_token {
                Some(next) => page_token = Some(next),
                None => break,
            }
        }
        memories.sort_by_key(|m| m.id);
        Ok(memories)
    }

    /// Drop from the embedding cache every text the memories about to be forgotten were
    /// embedded as (alone and, for a turn, with the turn before it), and the texts `followers`
    /// (the turns after them, embedded with them as context) were embedded as. Before the
    /// deletion, while the index still knows the turns before them; an error stops the Forget,
    /// to be tried again.
    async fn forget_embeddings(
        &self,
        tenant: &TenantId,
        forgotten: &[Memory],
        followers: &[Memory],
    ) -> Result<()> {
        let previous = turns::previous_texts(&*self.index, tenant, forgotten).await?;
        let mut texts: Vec<String> = Vec::new();
        for (memory, previous) in forgotten.iter().zip(previous) {
            texts.push(memory.text.clone());
            if let Some(previous) = previous {
                texts.push(turns::in_context(&previous, &memory.text));
            }
        }
        for follower in followers {
            let before =
                turns::previous_texts(&*self.index, tenant, std::slice::from_ref(follower))
                    .await?
                    .pop()
                    .flatten();
            if let Some(before) = before {
                texts.push(turns::in_context(&before, &follower.text));
            }
        }
        texts.retain(|t| t.len() <= self.limits.max_text_bytes);
        texts.sort();
        texts.dedup();
        let mut removed = 0;
        for chunk in texts.chunks(self.limits.max_batch.max(1)) {
            removed += self
                .embedder
                .forget(chunk.to_vec(), Purpose::Document)
                .await?;
        }
        tracing::debug!(
            texts = texts.len(),
            removed,
            "forgotten texts dropped from the embedding cache"
        );
        Ok(())
    }
}
