//! The retrieval service: owns the index, answers reads, and applies the writes ingestion
//! hands it.
//!
//! A Recall passes through the gRPC adapter (`engram_runtime::rpc::index_server`, which validates
//! it), then [`Retrieval::search`]: the result cache is consulted ([`cache`]); on a miss the
//! search strategies run in parallel and are fused ([`search`]). Writes arrive as ordered
//! [`IndexWrites`], are durable when `apply` returns, and make the cached results of the
//! scopes they touch unreachable.

mod cache;
mod fences;
pub mod fusion;
mod search;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use engram_domain::api::{
    ApplyOutcome, DuplicateMatch, Embedder, GetQuery, GetResult, Index, IndexStats, IndexWrites,
    ListPage, ListQuery, RecallQuery, RecallResult, Timings, WriteToken,
};
use engram_domain::model::{MemoryId, Scope, TenantId, Timestamp};
use engram_domain::parse_duration;
use engram_domain::{Error, Result};
use engram_proto::tonic::service::Routes;
use engram_runtime::config::{CommonArgs, EmbeddingUrl};
use engram_runtime::rpc;
use engram_runtime::server::{Listeners, ServiceRuntime};
use engram_store::{EdgeStore, EdgeStoreConfig, Keywords, Selection, VectorStore};

pub use cache::{ResultCache, ResultCacheConfig};
pub use fusion::FusionWeights;
pub use search::SearchMetrics;

pub const SERVICE_NAME: &str = "retrieval";

engram_runtime::listen_args!(Listen, "retrieval", "RETRIEVAL", "50052", "9092");

#[derive(Debug, Clone, clap::Args)]
pub struct RetrievalArgs {
    /// Directory for engram's data; the index lives in `<data-dir>/index`.
    #[arg(long = "data-dir", env = engram_domain::settings::env::DATA_DIR, default_value = "./data", value_parser = engram_domain::absolute_path)]
    pub data_dir: PathBuf,
    /// How long a Recall result stays cached; 0 turns the result cache off. Writes make
    /// cached results unreachable as soon as they are indexed, whatever the TTL.
    #[arg(long = "result-cache-ttl", env = "ENGRAM_RESULT_CACHE_TTL", default_value = "1m", value_parser = parse_duration)]
    pub result_cache_ttl: Duration,
    /// In-process Recall result cache size, in MiB (Redis holds a second level).
    #[arg(
        long = "result-cache-local-mb",
        env = "ENGRAM_RESULT_CACHE_LOCAL_MB",
        default_value_t = 64
    )]
    pub result_cache_local_mb: u64,
    /// A Qdrant server or cluster (gRPC URL, e.g. http://qdrant:6334) to keep the index in,
    /// instead of the embedded engine in the data directory.
    #[arg(long = "qdrant-url", env = "ENGRAM_QDRANT_URL")]
    pub qdrant_url: Option<String>,
    /// API key for ENGRAM_QDRANT_URL, if the server requires one.
    #[arg(
        long = "qdrant-api-key",
        env = "ENGRAM_QDRANT_API_KEY",
        hide_env_values = true
    )]
    pub qdrant_api_key: Option<String>,
    /// Collection on ENGRAM_QDRANT_URL (created on first start if absent).
    #[arg(
        long = "qdrant-collection",
        env = "ENGRAM_QDRANT_COLLECTION",
        default_value = "engram"
    )]
    pub qdrant_collection: String,
    /// Shards of the collection when retrieval creates it on ENGRAM_QDRANT_URL (a cluster
    /// spreads them over its peers; at least the number of peers).
    #[arg(
        long = "qdrant-shards",
        env = "ENGRAM_QDRANT_SHARDS",
        default_value_t = 1
    )]
    pub qdrant_shards: u32,
    /// Copies of each shard when retrieval creates the collection (2 on a three-peer cluster
    /// survives losing a peer).
    #[arg(
        long = "qdrant-replication",
        env = "ENGRAM_QDRANT_REPLICATION",
        default_value_t = 1
    )]
    pub qdrant_replication: u32,
    /// How HYBRID fusion weighs each strategy's normalised scores, as
    /// `dense=0.45,keyword=0.55,temporal=0.45,entity=0` (the default; strategies left out keep
    /// theirs); a weight of 0 turns a strategy off.
    #[arg(
        long = "fusion-weights",
        env = "ENGRAM_FUSION_WEIGHTS",
        default_value = ""
    )]
    pub fusion_weights: FusionWeights,
}

impl RetrievalArgs {
    /// The Recall result cache these settings ask for, if any.
    pub fn result_cache(&self) -> Option<ResultCacheConfig> {
        (!self.result_cache_ttl.is_zero()).then(|| ResultCacheConfig {
            local_max_bytes: self.result_cache_local_mb.saturating_mul(1 << 20),
            ttl: self.result_cache_ttl,
        })
    }

    /// The defaults, with the data in `data_dir`.
    pub fn in_dir(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            ..engram_runtime::config::defaults()
        }
    }
}

/// The settings of the `engram-retrieval` binary: its own, and where the embedding service
/// is (`engram up` wires that itself).
#[derive(Debug, Clone, clap::Args)]
pub struct BinaryArgs {
    #[command(flatten)]
    pub service: RetrievalArgs,
    #[command(flatten)]
    pub embedding: EmbeddingUrl,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub index_dir: PathBuf,
    /// Dimension of the embedding model's vectors.
    pub dimension: usize,
    pub embedding_url: String,
    /// `None`: no result cache.
    pub result_cache: Option<ResultCacheConfig>,
    /// `Some`: keep the index on this Qdrant server instead of in `index_dir`.
    pub remote: Option<engram_store::RemoteStoreConfig>,
    pub fusion_weights: FusionWeights,
    pub common: CommonArgs,
}

impl Config {
    pub fn from_args(args: BinaryArgs, common: CommonArgs) -> Self {
        Self::new(args.service, args.embedding.embedding_url, common)
    }

    pub fn new(service: RetrievalArgs, embedding_url: String, common: CommonArgs) -> Self {
        Self {
            index_dir: service.data_dir.join("index"),
            dimension: common.vector_dimension,
            embedding_url,
            result_cache: service.result_cache(),
            fusion_weights: service.fusion_weights,
            remote: service
                .qdrant_url
                .map(|url| engram_store::RemoteStoreConfig {
                    api_key: service.qdrant_api_key,
                    collection: service.qdrant_collection,
                    timeout: common.internal_timeout,
                    shards: service.qdrant_shards.max(1),
                    replication_factor: service.qdrant_replication.max(1),
                    ..engram_store::RemoteStoreConfig::new(url, common.vector_dimension)
                }),
            common,
        }
    }
}

/// Serve the index in `config.index_dir` until `shutdown`; the store is flushed before return.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let runtime = ServiceRuntime::start(SERVICE_NAME, listeners.admin);
    let store: Arc<dyn VectorStore> = match &config.remote {
        Some(remote) => Arc::new(engram_store::RemoteStore::connect(remote.clone()).await?),
        None => Arc::new(
            EdgeStore::open(EdgeStoreConfig::new(&config.index_dir, config.dimension)).await?,
        ),
    };
    let embedder = Arc::new(rpc::EmbedderClient::connect(
        &runtime.peers(&config.common)?,
        engram_domain::settings::env::EMBEDDING_URL,
        &config.embedding_url,
    )?);
    let mut retrieval = Retrieval::new(store.clone(), embedder, runtime.metrics());
    retrieval.weights = config.fusion_weights;
    let redis = match &config.common.redis_url {
        Some(url) => Some(engram_cache::Redis::connect(
            engram_cache::RedisConfig::new(url.clone()),
            runtime.metrics(),
        )?),
        None => None,
    };
    if let Some(cache) = config.result_cache.clone() {
        retrieval.results = Some(ResultCache::new(
            cache,
            redis,
            &engram_cache::CacheMetrics::new(runtime.metrics()),
            &retrieval.weights,
        ));
    }
    let retrieval = Arc::new(retrieval);
    let routes = Routes::new(rpc::index_server(retrieval, config.common.limits.clone()));
    let served = runtime
        .serve(
            routes,
            &[engram_proto::internal::v1::index_server::SERVICE_NAME],
            listeners.grpc,
            &config.common,
            shutdown,
        )
        .await;
    let closed = store.close().await;
    served?;
    closed?;
    Ok(())
}

/// [`Index`] over a vector store and an embedder for queries.
pub struct Retrieval {
    store: Arc<dyn VectorStore>,
    embedder: Arc<dyn Embedder>,
    keywords: Keywords,
    metrics: SearchMetrics,
    /// How HYBRID fusion weighs the strategies.
    pub weights: FusionWeights,
    /// The Recall result cache, if on.
    pub results: Option<ResultCache>,
    fences: fences::Fences,
}

impl Retrieval {
    pub fn new(
        store: Arc<dyn VectorStore>,
        embedder: Arc<dyn Embedder>,
        metrics: &engram_telemetry::Metrics,
    ) -> Self {
        Self {
            store,
            embedder,
            keywords: Keywords::new(),
            metrics: SearchMetrics::new(metrics),
            weights: FusionWeights::default(),
            results: None,
            fences: fences::Fences::default(),
        }
    }
}

/// Reads wait for a write at the gateway (through `Ingestion.Status`), which forwards them
/// without a token: one that still carries a logged write's token came around it.
fn no_write_token(token: Option<WriteToken>) -> Result<()> {
    match token {
        None | Some(WriteToken::Indexed) => Ok(()),
        Some(WriteToken::Logged { .. }) => Err(Error::FailedPrecondition(
            "retrieval does not wait for writes: read through the gateway, which waits for after_write_token first".into(),
        )),
    }
}

/// Most bytes of memories (text, metadata, tags) in one List page: a page ends before it
/// would pass this, and its token says where the next one starts.
pub const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Memories read from the store at a time while a page is filled.
const PAGE_READ: usize = 64;

/// A List page of up to `size` memories from `start`, read a few at a time and ended early
/// before it passes [`MAX_PAGE_BYTES`] (a page holds at least one memory).
async fn list_page(
    store: &dyn VectorStore,
    selection: &Selection,
    size: usize,
    start: Option<MemoryId>,
) -> Result<ListPage> {
    let mut memories = Vec::new();
    let (mut bytes, mut next) = (0, start);
    while memories.len() < size {
        let (read, after) = store
            .list(selection, PAGE_READ.min(size - memories.len()), next)
            .await?;
        for memory in read {
            let weight = memory.weight();
            if !memories.is_empty() && bytes + weight > MAX_PAGE_BYTES {
                return Ok(ListPage {
                    next_page_token: Some(memory.id),
                    memories,
                });
            }
            bytes += weight;
            memories.push(memory);
        }
        next = after;
        if next.is_none() {
            break;
        }
    }
    Ok(ListPage {
        memories,
        next_page_token: next,
    })
}

#[async_trait]
impl Index for Retrieval {
    async fn search(&self, tenant: &TenantId, query: RecallQuery) -> Result<RecallResult> {
        no_write_token(query.after_write_token)?;
        let started = Instant::now();
        let now = query.request_time.unwrap_or_else(Timestamp::now);
        let cache = self.results.as_ref().filter(|_| !query.bypass_cache);
        let mut key = None;
        if let Some(cache) = cache {
            key = cache.key(tenant, &query).await;
            if let Some(key) = &key
                && let Some(mut hit) = cache.get(key, tenant).await
            {
                let elapsed = started.elapsed();
                hit.cache_hit = true;
                hit.timings = Timings {
                    cache: elapsed,
                    total: elapsed,
                    ..Timings::default()
                };
                self.metrics.observe(&hit.timings, true);
                return Ok(hit);
            }
        }
        let cache_time = started.elapsed();
        let mut result = search::run(self, tenant, &query, now).await?;
        if let (Some(cache), Some(key)) = (cache, key) {
            cache.put(key, tenant, &query, &result).await;
        }
        result.timings.cache = cache_time;
        result.timings.total = started.elapsed();
        self.metrics.observe(&result.timings, false);
        Ok(result)
    }

    async fn get(&self, tenant: &TenantId, query: GetQuery) -> Result<GetResult> {
        no_write_token(query.after_write_token)?;
        let found = self.store.get(tenant, &query.ids).await?;
        Ok(GetResult::assemble(&query.ids, found))
    }

    async fn list(&self, tenant: &TenantId, query: ListQuery) -> Result<ListPage> {
        no_write_token(query.after_write_token)?;
        let selection = Selection {
            tenant: tenant.clone(),
            scope: query.scope,
            filter: query.filter,
        };
        list_page(
            &*self.store,
            &selection,
            query.page_size as usize,
            query.page_token,
        )
        .await
    }

    async fn apply(&self, tenant: &TenantId, writes: IndexWrites) -> Result<ApplyOutcome> {
        // A worker's writes wait for their partition's turn, and one that lost its lease is
        // refused (see `fences`).
        let turn = match writes.fence {
            Some(fence) => Some(self.fences.admit(fence).await?),
            None => None,
        };
        let touched = ResultCache::touched(tenant, &writes);
        // A deletion is not done while results cached before it can still be served, so it
        // waits for Redis to take the bump: before (nothing is deleted while it cannot) and
        // after. The caller (a worker) tries again, and the Forget waits, until it is paid.
        let deletes = writes
            .ops
            .iter()
            .any(|op| !matches!(op, engram_domain::api::IndexOp::Upsert(_)));
        let stale = || {
            Error::unavailable(
                "results cached before this deletion cannot be invalidated yet (Redis unreachable); retry",
            )
        };
        if let Some(cache) = &self.results
            && deletes
            && !cache.invalidate(&touched).await
        {
            return Err(stale());
        }
        // The write runs to its end holding the partition's turn even if the caller goes away
        // meanwhile (its deadline), so the next holder's writes cannot overtake it.
        let (store, tenant) = (Arc::clone(&self.store), tenant.clone());
        let applied = tokio::spawn(async move {
            let applied = store.apply(&tenant, writes).await;
            drop(turn);
            applied
        })
        .await
        .map_err(|e| Error::internal(format!("the index write stopped: {e}")))?;
        // Even a failed apply may have changed part of the index.
        let invalidated = match &self.results {
            Some(cache) => cache.invalidate(&touched).await,
            None => true,
        };
        let mut applied = applied?;
        if deletes && !invalidated {
            return Err(stale());
        }
        // What was cached for them is unreachable now; a deletion drops it too.
        if let Some(cache) = &self.results
            && deletes
        {
            applied.cached_results = cache.drop_results(&touched).await;
        }
        Ok(applied)
    }

    async fn find_duplicates(
        &self,
        tenant: &TenantId,
        scope: &Scope,
        content_hashes: Vec<String>,
        idempotency_keys: Vec<String>,
    ) -> Result<Vec<DuplicateMatch>> {
        Ok(self
            .store
            .find_duplicates(tenant, scope, content_hashes, idempotency_keys)
            .await?)
    }

    async fn stats(&self, tenant: Option<&TenantId>) -> Result<IndexStats> {
        let info = self.store.info().await?;
        let memories = match tenant {
            Some(tenant) => self.store.count(Some(tenant)).await?,
            None => info.points,
        };
        Ok(IndexStats {
            memories,
            segments: info.segments,
            indexed_vectors: info.indexed_vectors,
        })
    }
}

/// Every retrieval setting is checked as it is parsed.
impl engram_runtime::server::CheckArgs for BinaryArgs {}
