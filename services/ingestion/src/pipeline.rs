//! The write path's parts, wired: the embedding and retrieval services it calls, the write
//! and extraction logs (with Redis), the privacy guard, the session history cache and the chat
//! model of fact extraction.

use std::sync::Arc;
use std::time::Duration;

use engram_cache::{History, Redis, RedisConfig};
use engram_domain::api::{Embedder, GetQuery, Index, Purpose};
use engram_domain::model::{Memory, MemoryId, TenantId};
use engram_domain::{Error, Limits, Result};
use engram_models::ChatModel;
use engram_runtime::rpc;
use engram_telemetry::Metrics;
use engram_writelog::WriteLog;

use crate::config::{Config, LogArgs};
use crate::guard::Guard;
use crate::worker::{self, Workers};
use engram_domain::api::LogKind;

/// Key prefix of the extraction log.
pub const EXTRACTION_LOG: &str = "engram:extract";

/// The text embedded to check that the embedding path works.
const HEALTH_PROBE: &str = "engram health probe";

/// The write log and the extraction log (same Redis and partitions, keys under
/// [`EXTRACTION_LOG`]), and how to use them.
#[derive(Debug, Clone)]
pub struct Logs {
    pub write: WriteLog,
    pub extraction: WriteLog,
    pub args: LogArgs,
}

/// [`engram_domain::api::Ingestion`]: writes go to the durable log and are acknowledged at
/// once (or, without Redis, are embedded and indexed before they are acknowledged).
pub struct Pipeline {
    pub(crate) embedder: Arc<dyn Embedder>,
    pub(crate) index: Arc<dyn Index>,
    pub(crate) logs: Option<Logs>,
    pub(crate) metrics: Option<worker::LogMetrics>,
    pub(crate) guard: Guard,
    pub(crate) history: History,
    pub(crate) chat: Option<Arc<ChatModel>>,
    pub(crate) limits: Limits,
}

impl Pipeline {
    /// A pipeline without a log: writes are indexed before they are acknowledged.
    pub fn new(embedder: Arc<dyn Embedder>, index: Arc<dyn Index>) -> Self {
        Self {
            embedder,
            index,
            logs: None,
            metrics: None,
            guard: Guard::default(),
            history: History::new(None, Duration::from_secs(1)),
            chat: None,
            limits: Limits::default(),
        }
    }

    /// The pipeline `config` describes: clients of the embedding and retrieval services and,
    /// with Redis, the write log.
    pub fn from_config(config: &Config, metrics: &Metrics) -> Result<Self> {
        let peers = rpc::Peers::new(&config.common, metrics)?;
        let embedder = Arc::new(rpc::EmbedderClient::connect(
            &peers,
            engram_domain::settings::env::EMBEDDING_URL,
            &config.embedding_url,
        )?);
        let index = Arc::new(rpc::IndexClient::connect(
            &peers,
            engram_domain::settings::env::RETRIEVAL_URL,
            &config.retrieval_url,
        )?);
        let mut pipeline = Self::new(embedder, index);
        pipeline.metrics = Some(worker::LogMetrics::new(metrics));
        match &config.common.redis_url {
            Some(url) => {
                let write = WriteLog::connect(
                    engram_domain::settings::env::REDIS_URL,
                    url,
                    config.log.partitions,
                )?;
                pipeline.logs = Some(Logs {
                    extraction: write.clone().with_prefix(EXTRACTION_LOG),
                    write,
                    args: config.log.clone(),
                });
                let redis = Redis::connect(RedisConfig::new(url.clone()), metrics)?;
                pipeline.history = History::new(Some(redis), config.common.history_ttl);
            }
            None => {
                tracing::warn!(
                    "no Redis (ENGRAM_REDIS_URL): writes are indexed before they are acknowledged"
                );
                pipeline.history = History::new(None, config.common.history_ttl);
            }
        }
        if let Some(chat) = config.chat.config().map_err(Error::from)? {
            let outbound = engram_resilience::OutboundMetrics::new(metrics);
            let model = ChatModel::new(chat, &outbound).map_err(Error::from)?;
            tracing::info!(model = model.model(), "fact extraction with a chat model");
            pipeline.chat = Some(Arc::new(model));
        }
        pipeline.guard = Guard::new(config.common.privacy.policy()?);
        pipeline.guard.register(metrics);
        pipeline.limits = config.common.limits.clone();
        Ok(pipeline)
    }

    /// Workers indexing from this pipeline's logs, if it has them.
    pub fn workers(self: &Arc<Self>, config: &Config) -> Option<Workers> {
        let logs = self.logs.as_ref()?;
        let metrics = self.metrics.clone()?;
        let mut worked = vec![(logs.write.clone(), LogKind::Write)];
        // Extraction entries only come from a replica with a chat model; one without would
        // fail them all.
        if self.chat.is_some() {
            worked.push((logs.extraction.clone(), LogKind::Extraction));
        }
        Some(Workers::spawn(
            self.clone(),
            worked,
            logs.args.clone(),
            config.common.limits.clone(),
            metrics,
        ))
    }

    /// Whether the embedding and retrieval services answer: a probe that tells an entry that
    /// fails on its own from an outage that fails everything.
    /// For extraction, also whether the chat model's circuit is closed: while it is open,
    /// the model is failing for everyone and no entry is to blame.
    pub(crate) async fn healthy(&self, kind: LogKind) -> bool {
        if kind == LogKind::Extraction
            && self
                .chat
                .as_ref()
                .is_some_and(|chat| chat.outbound().failing_fast())
        {
            return false;
        }
        // A text of its own each time, so that no cache answers for the provider.
        let probe = format!("{HEALTH_PROBE} {}", uuid::Uuid::now_v7());
        let tenant = TenantId::default_tenant();
        let embedded = self
            .embedder
            .embed(&tenant, vec![probe], Purpose::Query)
            .await;
        embedded.is_ok() && self.index.stats(None).await.is_ok()
    }

    /// The stored memory `id`, or NOT_FOUND.
    pub(crate) async fn stored(&self, tenant: &TenantId, id: MemoryId) -> Result<Memory> {
        self.stored_of(tenant, vec![id])
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Error::NotFound(format!("memory {id} not found")))
    }

    /// The stored memories among `ids` (those that exist).
    pub(crate) async fn stored_of(
        &self,
        tenant: &TenantId,
        ids: Vec<MemoryId>,
    ) -> Result<Vec<Memory>> {
        let found = self
            .index
            .get(
                tenant,
                GetQuery {
                    ids,
                    after_write_token: None,
                },
            )
            .await?;
        Ok(found.memories)
    }
}
