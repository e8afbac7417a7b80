//! Writes applied to the index: memories embedded (turns with the turn before them, see
//! [`crate::turns`]) and upserted, updates, forgets. The workers apply logged writes with
//! these, fenced by their partition's lease; without a log (or while it is away) the write
//! path calls them directly, unfenced.

use std::collections::HashSet;

use engram_domain::api::{
    Erasure, Fence, ForgetTarget, IndexOp, IndexWrites, IndexedMemory, ListQuery, Purpose,
    UpdateCommand,
};
use engram_domain::model::{Filter, Kind, Memory, MemoryId, Scope, TenantId, Timestamp};
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
            .upserts(tenant, memories.into_iter().zip(previous).collect())
            .await?;
        let outcome = self.index.apply(tenant, IndexWrites { ops, fence }).await?;
        Ok(outcome.upserted)
    }

    /// Upserts of memories, each embedded alone and, for a turn with the text of the turn
    /// before it, in that context too.
    async fn upserts(
        &self,
        tenant: &TenantId,
        memories: Vec<(Memory, Option<String>)>,
    ) -> Result<Vec<IndexOp>> {
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
        let embeddings = self
            .embedder
            .embed(tenant, texts, Purpose::Document)
            .await?;
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
        let stored_scope = stored.scope.clone();
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
        let ops = self.upserts(tenant, upserts).await?;
        self.index.apply(tenant, IndexWrites { ops, fence }).await?;
        self.history
            .invalidate(tenant, &[stored_scope, memory.scope.clone()])
            .await;
        Ok(memory)
    }

    /// Apply a forget now; what it removed. Forgetting turns by id embeds the turns after them
    /// again first, without them (one apply: a retry finds the same turns).
    pub(crate) async fn apply_forget(
        &self,
        tenant: &TenantId,
        target: ForgetTarget,
        fence: Option<Fence>,
    ) -> Result<Erasure> {
        // Whose cached session histories held what is forgotten.
        let mut sessions: Vec<Scope> = Vec::new();
        let mut user = None;
        let receipt;
        let ops = match target {
            ForgetTarget::Ids(ids) => {
                let removed: HashSet<MemoryId> = ids.iter().copied().collect();
                let mut forgotten = self.stored_of(tenant, ids.clone()).await?;
                forgotten.sort_by_key(|m| m.id);
                let changed: Vec<(Memory, Option<String>)> =
                    forgotten.iter().map(|m| (m.clone(), None)).collect();
                let following = turns::following(&*self.index, tenant, &changed, &removed).await?;
                let followers: Vec<Memory> = following.iter().map(|f| f.turn.clone()).collect();
                receipt = self
                    .forget_embeddings(tenant, &forgotten, &followers, false)
                    .await?;
                sessions = forgotten.iter().map(|m| m.scope.clone()).collect();
                let mut ops = self
                    .upserts(
                        tenant,
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
                // Whole sessions when no agent is named: each turn's previous turn is listed too.
                let whole_sessions = scope.agent_id.is_empty();
                receipt = self
                    .forget_embeddings(tenant, &forgotten, &[], whole_sessions)
                    .await?;
                user = Some(scope.user_id.clone());
                vec![IndexOp::DeleteScope(scope)]
            }
        };
        let outcome = self.index.apply(tenant, IndexWrites { ops, fence }).await?;
        // Here, where the deletion is done (the caller's wait may have given up before it): a
        // history rebuilt from the index before the deletion is not cached after it.
        let history_lists = match user {
            Some(user) => self.history.invalidate_user(tenant, &user).await,
            None => self.history.invalidate(tenant, &sessions).await,
        };
        Ok(Erasure {
            memories: outcome.deleted,
            cached_results: outcome.cached_results,
            history_lists,
            ..receipt
        })
    }

    /// Drop what the write log still holds about memories being forgotten: their
    /// de-duplication reservations (named by their content hash or idempotency key) and where
    /// their writes were (their pending keys), which would otherwise live a little longer.
    async fn forget_log_keys(&self, tenant: &TenantId, forgotten: &[Memory]) -> Result<u64> {
        let Some(logs) = &self.logs else {
            return Ok(0);
        };
        let mut keys = Vec::new();
        for memory in forgotten {
            keys.push(engram_writelog::pending_key(tenant, &memory.id.to_string()));
            keys.push(crate::logged::reservation(
                tenant,
                &memory.scope,
                "h",
                &memory.content_hash,
            ));
            if !memory.idempotency_key.is_empty() {
                keys.push(crate::logged::reservation(
                    tenant,
                    &memory.scope,
                    "k",
                    &memory.idempotency_key,
                ));
            }
        }
        let mut dropped = 0;
        for chunk in keys.chunks(1000) {
            dropped += logs.write.drop_keys(chunk.to_vec()).await?;
        }
        Ok(dropped)
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
    /// `whole_sessions`: `forgotten` holds every turn of their sessions, oldest first, so each
    /// turn's previous one is the one before it there; otherwise each is looked up.
    async fn forget_embeddings(
        &self,
        tenant: &TenantId,
        forgotten: &[Memory],
        followers: &[Memory],
        whole_sessions: bool,
    ) -> Result<Erasure> {
        let previous = if whole_sessions {
            turns::previous_texts(&*self.index, tenant, forgotten).await?
        } else {
            self.previous_each(tenant, forgotten).await?
        };
        let mut documents: Vec<String> = Vec::new();
        for (memory, previous) in forgotten.iter().zip(previous) {
            documents.push(memory.text.clone());
            if let Some(previous) = previous {
                documents.push(turns::in_context(&previous, &memory.text));
            }
        }
        for (follower, before) in followers
            .iter()
            .zip(self.previous_each(tenant, followers).await?)
        {
            if let Some(before) = before {
                documents.push(turns::in_context(&before, &follower.text));
            }
        }
        // A memory's own text may have been a query too (a Converse message, a fact's check).
        let queries: Vec<String> = forgotten.iter().map(|m| m.text.clone()).collect();
        let log_keys = self.forget_log_keys(tenant, forgotten).await?;
        let mut removed = 0;
        for (purpose, mut texts) in [(Purpose::Document, documents), (Purpose::Query, queries)] {
            texts.retain(|t| t.len() <= self.limits.max_text_bytes);
            texts.sort();
            texts.dedup();
            for chunk in texts.chunks(self.limits.max_batch.max(1)) {
                removed += self
                    .embedder
                    .forget(tenant, chunk.to_vec(), purpose)
                    .await?;
            }
        }
        tracing::debug!(removed, "forgotten texts dropped from the embedding cache");
        Ok(Erasure {
            cached_embeddings: removed,
            log_keys,
            facts: (forgotten.iter())
                .filter(|m| {
                    m.kind == Kind::Fact && m.metadata.contains_key(crate::extract::SOURCE_ID)
                })
                .count() as u64,
            ..Erasure::default()
        })
    }

    /// For each memory, the text of the turn before it in the index, looked up alone.
    async fn previous_each(
        &self,
        tenant: &TenantId,
        memories: &[Memory],
    ) -> Result<Vec<Option<String>>> {
        let mut previous = Vec::with_capacity(memories.len());
        for memory in memories {
            previous.push(
                turns::previous_texts(&*self.index, tenant, std::slice::from_ref(memory))
                    .await?
                    .pop()
                    .flatten(),
            );
        }
        Ok(previous)
    }
}
