//! The ingestion service: the write path.
//!
//! A Remember passes through the gRPC adapter (`engram_core::rpc::ingestion_server`, which
//! validates and bounds it), then [`Pipeline::submit`]: content hashes are computed, writes
//! already stored in the scope (same content, or same idempotency key) come back as DUPLICATE
//! with the existing id, new memories get time-ordered ids, are embedded by the embedding
//! service and applied to the index through retrieval, and the reply goes out once they are
//! durable and searchable. Update and Forget take the same road.

mod dedup;

use std::sync::Arc;

use dedup::Resolution;

use async_trait::async_trait;
use engram_core::api::{
    Embedder, ForgetOutcome, ForgetTarget, GetQuery, Index, IndexOp, IndexWrites, IndexedMemory,
    Ingestion, Purpose, RememberBatch, RememberOutcome, UpdateCommand, UpdateOutcome, WriteResult,
    WriteStatus, WriteToken,
};
use engram_core::config::{CommonArgs, EmbeddingUrl, RetrievalUrl};
use engram_core::model::{Memory, MemoryId, TenantId, Timestamp, content_hash};
use engram_core::server::{Listeners, ServiceRuntime};
use engram_core::{Error, Result, rpc};
use engram_proto::tonic::service::Routes;

pub const SERVICE_NAME: &str = "ingestion";

engram_core::listen_args!(Listen, "ingestion", "INGESTION", "50053", "9093");

/// Where ingestion finds the services it calls (its own binary only; `engram up` wires these).
#[derive(Debug, Clone, clap::Args)]
pub struct IngestionPeers {
    #[command(flatten)]
    pub embedding: EmbeddingUrl,
    #[command(flatten)]
    pub retrieval: RetrievalUrl,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub embedding_url: String,
    pub retrieval_url: String,
    pub common: CommonArgs,
}

impl Config {
    pub fn from_args(peers: IngestionPeers, common: CommonArgs) -> Self {
        Self {
            embedding_url: peers.embedding.embedding_url,
            retrieval_url: peers.retrieval.retrieval_url,
            common,
        }
    }
}

pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let runtime = ServiceRuntime::start(SERVICE_NAME, listeners.admin);
    let timeout = config.common.internal_timeout;
    let embedder = Arc::new(rpc::EmbedderClient::connect_lazy(
        "ENGRAM_EMBEDDING_URL",
        &config.embedding_url,
        timeout,
    )?);
    let index = Arc::new(rpc::IndexClient::connect_lazy(
        "ENGRAM_RETRIEVAL_URL",
        &config.retrieval_url,
        timeout,
    )?);
    let pipeline = Arc::new(Pipeline::new(embedder, index));
    let routes = Routes::new(rpc::ingestion_server(
        pipeline,
        config.common.limits.clone(),
    ));
    runtime
        .serve(
            routes,
            &["engram.internal.v1.Ingestion"],
            listeners.grpc,
            config.common.drain_grace,
            shutdown,
        )
        .await
}

/// [`Ingestion`] that embeds and indexes each write before acknowledging it.
pub struct Pipeline {
    embedder: Arc<dyn Embedder>,
    index: Arc<dyn Index>,
}

impl Pipeline {
    pub fn new(embedder: Arc<dyn Embedder>, index: Arc<dyn Index>) -> Self {
        Self { embedder, index }
    }

    /// Embed the memories' texts and apply them, in order, with any deletions after them.
    async fn embed_and_apply(&self, tenant: &TenantId, memories: Vec<Memory>) -> Result<u64> {
        if memories.is_empty() {
            return Ok(0);
        }
        let texts = memories.iter().map(|m| m.text.clone()).collect();
        let embeddings = self.embedder.embed(texts, Purpose::Document).await?;
        if embeddings.vectors.len() != memories.len() {
            return Err(Error::internal(format!(
                "embedding service returned {} vectors for {} texts",
                embeddings.vectors.len(),
                memories.len()
            )));
        }
        let ops = memories
            .into_iter()
            .zip(embeddings.vectors)
            .map(|(memory, dense)| IndexOp::Upsert(Box::new(IndexedMemory { memory, dense })))
            .collect();
        let outcome = self.index.apply(tenant, IndexWrites { ops }).await?;
        Ok(outcome.upserted)
    }
}

#[async_trait]
impl Ingestion for Pipeline {
    async fn submit(&self, tenant: &TenantId, batch: RememberBatch) -> Result<RememberOutcome> {
        let RememberBatch {
            scope, memories, ..
        } = batch;
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

        let now = Timestamp::now();
        let ids: Vec<MemoryId> = resolutions
            .iter()
            .map(|_| MemoryId::new_time_ordered())
            .collect();
        let mut new_memories = Vec::new();
        let mut results = Vec::with_capacity(memories.len());
        for (i, (input, resolution)) in memories.into_iter().zip(&resolutions).enumerate() {
            let result = match *resolution {
                Resolution::New => {
                    new_memories.push(Memory::from_input(
                        ids[i],
                        tenant.clone(),
                        scope.clone(),
                        input,
                        now,
                    ));
                    WriteResult {
                        id: ids[i],
                        status: WriteStatus::Created,
                        reason: String::new(),
                    }
                }
                Resolution::DuplicateOf(id, reason) => WriteResult {
                    id,
                    status: WriteStatus::Duplicate,
                    reason: reason.to_string(),
                },
                Resolution::DuplicateOfInput(first, reason) => WriteResult {
                    id: ids[first],
                    status: WriteStatus::Duplicate,
                    reason: reason.to_string(),
                },
            };
            results.push(result);
        }
        self.embed_and_apply(tenant, new_memories).await?;
        Ok(RememberOutcome {
            results,
            write_token: WriteToken::Indexed,
        })
    }

    async fn update(&self, tenant: &TenantId, command: UpdateCommand) -> Result<UpdateOutcome> {
        let found = self
            .index
            .get(
                tenant,
                GetQuery {
                    ids: vec![command.id],
                    after_write_token: None,
                },
            )
            .await?;
        let mut memory = found
            .memories
            .into_iter()
            .next()
            .ok_or_else(|| Error::NotFound(format!("memory {} not found", command.id)))?;
        memory.apply_patch(command.patch, Timestamp::now());
        // The index keeps no vectors we can read back, so the (possibly unchanged) text is
        // embedded again; the embedding cache makes that cheap for unchanged text.
        self.embed_and_apply(tenant, vec![memory.clone()]).await?;
        Ok(UpdateOutcome {
            memory,
            write_token: WriteToken::Indexed,
        })
    }

    async fn forget(&self, tenant: &TenantId, target: ForgetTarget) -> Result<ForgetOutcome> {
        let op = match target {
            ForgetTarget::Ids(ids) => IndexOp::DeleteIds(ids),
            ForgetTarget::Scope(scope) => IndexOp::DeleteScope(scope),
        };
        let outcome = self
            .index
            .apply(tenant, IndexWrites { ops: vec![op] })
            .await?;
        Ok(ForgetOutcome {
            forgotten: outcome.deleted,
            write_token: WriteToken::Indexed,
        })
    }
}
