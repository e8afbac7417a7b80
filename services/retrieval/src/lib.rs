//! The retrieval service: owns the index, answers reads, and applies the writes ingestion
//! hands it.
//!
//! A Recall passes through the gRPC adapter (`engram_core::rpc::index_server`, which validates
//! it), then [`Retrieval::search`]: the query is embedded by the embedding service, the dense
//! search runs in the store filtered by tenant and scope, and hits are rescored by recency and
//! importance. Writes arrive as ordered [`IndexWrites`] and are durable when `apply` returns.

mod search;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use engram_core::api::{
    ApplyOutcome, DuplicateMatch, Embedder, GetQuery, GetResult, Index, IndexStats, IndexWrites,
    ListPage, ListQuery, RecallQuery, RecallResult, WriteToken, WriteWaiter,
};
use engram_core::config::{CommonArgs, EmbeddingUrl};
use engram_core::model::{Scope, TenantId};
use engram_core::server::{Listeners, ServiceRuntime};
use engram_core::{Error, Result, rpc};
use engram_proto::tonic::service::Routes;
use engram_store::{EdgeStore, EdgeStoreConfig, Selection, VectorStore};

pub use search::SearchMetrics;

pub const SERVICE_NAME: &str = "retrieval";

engram_core::listen_args!(Listen, "retrieval", "RETRIEVAL", "50052", "9092");

#[derive(Debug, Clone, clap::Args)]
pub struct RetrievalArgs {
    /// Directory for engram's data; the index lives in `<data-dir>/index`.
    #[arg(long = "data-dir", env = "ENGRAM_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
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
    pub common: CommonArgs,
}

impl Config {
    pub fn from_args(args: BinaryArgs, common: CommonArgs) -> Self {
        Self {
            index_dir: args.service.data_dir.join("index"),
            dimension: common.vector_dimension,
            embedding_url: args.embedding.embedding_url,
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
    let store =
        Arc::new(EdgeStore::open(EdgeStoreConfig::new(&config.index_dir, config.dimension)).await?);
    let embedder = Arc::new(rpc::EmbedderClient::connect_lazy(
        "ENGRAM_EMBEDDING_URL",
        &config.embedding_url,
        config.common.internal_timeout,
    )?);
    let mut retrieval = Retrieval::new(store.clone(), embedder, runtime.metrics());
    if let Some(url) = &config.common.redis_url {
        retrieval.writes = Some(Arc::new(engram_writelog::WriteLog::reader(
            "ENGRAM_REDIS_URL",
            url,
        )?));
    }
    let retrieval = Arc::new(retrieval);
    let routes = Routes::new(rpc::index_server(retrieval, config.common.limits.clone()));
    let served = runtime
        .serve(
            routes,
            &["engram.internal.v1.Index"],
            listeners.grpc,
            config.common.drain_grace,
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
    metrics: SearchMetrics,
    /// Where reads with a write token wait for that write (read-your-writes).
    pub writes: Option<Arc<dyn WriteWaiter>>,
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
            metrics: SearchMetrics::new(metrics),
            writes: None,
        }
    }

    /// Wait until the write behind `token` is indexed (bounded by the read's budget).
    async fn after(&self, token: Option<WriteToken>) -> Result<()> {
        match (token, &self.writes) {
            (None | Some(WriteToken::Indexed), _) => Ok(()),
            (Some(token), Some(writes)) => {
                let budget = engram_core::deadline::answerable_within(READ_YOUR_WRITES_WAIT);
                writes.wait_indexed(token, budget).await
            }
            (Some(_), None) => Err(Error::FailedPrecondition(
                "after_write_token names a logged write, but retrieval has no write log (ENGRAM_REDIS_URL is not set)".into(),
            )),
        }
    }
}

/// The longest a read waits for the write named by its `after_write_token` (less if the
/// caller's deadline comes sooner).
const READ_YOUR_WRITES_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[async_trait]
impl Index for Retrieval {
    async fn search(&self, tenant: &TenantId, query: RecallQuery) -> Result<RecallResult> {
        self.after(query.after_write_token).await?;
        search::search(self, tenant, query).await
    }

    async fn get(&self, tenant: &TenantId, query: GetQuery) -> Result<GetResult> {
        self.after(query.after_write_token).await?;
        let found = self.store.get(tenant, &query.ids).await?;
        Ok(GetResult::assemble(&query.ids, found))
    }

    async fn list(&self, tenant: &TenantId, query: ListQuery) -> Result<ListPage> {
        self.after(query.after_write_token).await?;
        let selection = Selection {
            tenant: tenant.clone(),
            scope: query.scope,
            filter: query.filter,
        };
        let (memories, next) = self
            .store
            .list(&selection, query.page_size as usize, query.page_token)
            .await?;
        Ok(ListPage {
            memories,
            next_page_token: next,
        })
    }

    async fn apply(&self, tenant: &TenantId, writes: IndexWrites) -> Result<ApplyOutcome> {
        Ok(self.store.apply(tenant, writes).await?)
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
