//! The ingestion service: the write path.
//!
//! A Remember passes through the gRPC adapter (`engram_runtime::rpc::ingestion_server`, which
//! validates and bounds it), then [`Pipeline::submit`]: content hashes are computed, writes
//! already stored in the scope (same content, or same idempotency key) come back as DUPLICATE
//! with the existing id, new memories get time-ordered ids, are embedded by the embedding
//! service and applied to the index through retrieval, and the reply goes out once they are
//! durable and searchable. Update and Forget take the same road.

mod dedup;
pub mod extract;
mod turns;
pub mod worker;

pub use worker::{LogKind, Workers};

use std::sync::Arc;
use std::time::Duration;

use dedup::Resolution;

use async_trait::async_trait;
use engram_cache::{History, Redis, RedisConfig};
use engram_domain::api::{
    Embedder, EntryId, ForgetOutcome, ForgetTarget, GetQuery, Index, IndexOp, IndexWrites,
    IndexedMemory, Ingestion, LogOp, LoggedWrite, Purpose, RememberBatch, RememberOutcome,
    UpdateCommand, UpdateOutcome, WriteResult, WriteState, WriteStatus, WriteToken,
};
use engram_domain::model::{Memory, MemoryId, TenantId, Timestamp, content_hash};
use engram_domain::model::{NewMemory, Scope, WriteMode};
use engram_domain::privacy::{self, PiiKind, PrivacyMode, PrivacyPolicy};
use engram_domain::{Error, Limits, Result};
use engram_models::{ChatArgs, ChatModel};
use engram_proto::tonic::service::Routes;
use engram_runtime::config::{CommonArgs, EmbeddingUrl, RetrievalUrl};
use engram_runtime::rpc;
use engram_runtime::server::{Listeners, ServiceRuntime};
use engram_telemetry::Metrics;
use engram_writelog::{Append, AppendError, Appended, Reserved, WriteLog};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

pub const SERVICE_NAME: &str = "ingestion";

/// The text embedded to check that the embedding path works.
const HEALTH_PROBE: &str = "engram health probe";

engram_runtime::listen_args!(Listen, "ingestion", "INGESTION", "50053", "9093");

/// Where ingestion finds the services it calls (its own binary only; `engram up` wires these).
#[derive(Debug, Clone, clap::Args)]
pub struct IngestionPeers {
    #[command(flatten)]
    pub embedding: EmbeddingUrl,
    #[command(flatten)]
    pub retrieval: RetrievalUrl,
}

/// The write log's settings.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "write-log")]
pub struct LogArgs {
    /// Partitions (Redis Streams) of the write log; one user's writes share one.
    #[arg(
        id = "log-partitions",
        long = "log-partitions",
        env = "ENGRAM_LOG_PARTITIONS",
        default_value_t = 16
    )]
    pub partitions: u32,
    /// Entries a worker indexes together at most.
    #[arg(
        id = "index-batch-max",
        long = "index-batch-max",
        env = "ENGRAM_INDEX_BATCH_MAX",
        default_value_t = 64
    )]
    pub batch_max: usize,
    /// How long a worker waits to fill a batch once it has entries.
    #[arg(id = "index-batch-wait", long = "index-batch-wait", env = "ENGRAM_INDEX_BATCH_WAIT", default_value = "5ms", value_parser = engram_domain::parse_duration)]
    pub batch_wait: Duration,
    /// Unindexed entries per partition beyond which Submit answers RESOURCE_EXHAUSTED.
    #[arg(
        id = "log-max-lag",
        long = "log-max-lag",
        env = "ENGRAM_LOG_MAX_LAG",
        default_value_t = 10_000
    )]
    pub max_lag: u64,
    /// Failed tries of an entry, made while the embedding and retrieval services were
    /// otherwise healthy, before it is moved to the dead-letter stream. Failures during an
    /// outage of those services are not counted.
    #[arg(
        id = "log-max-deliveries",
        long = "log-max-deliveries",
        env = "ENGRAM_LOG_MAX_DELIVERIES",
        default_value_t = 5
    )]
    pub max_deliveries: u64,
    /// How long a partition stays with a worker that stopped renewing its lease (a crashed
    /// replica) before another takes it and its unacknowledged entries.
    #[arg(id = "log-claim-idle", long = "log-claim-idle", env = "ENGRAM_LOG_CLAIM_IDLE", default_value = "15s", value_parser = engram_domain::parse_duration)]
    pub claim_idle: Duration,
    /// Refuse writes (UNAVAILABLE) when Redis is unreachable instead of indexing them
    /// synchronously.
    #[arg(
        id = "log-strict",
        long = "log-strict",
        env = "ENGRAM_LOG_STRICT",
        default_value_t = false
    )]
    pub strict: bool,
    /// How long SYNC writes, Update and Forget wait for their write to be indexed.
    #[arg(id = "log-sync-wait", long = "log-sync-wait", env = "ENGRAM_LOG_SYNC_WAIT", default_value = "10s", value_parser = engram_domain::parse_duration)]
    pub sync_wait: Duration,
    /// Index from the write log in this replica. `false` makes a replica that only accepts
    /// writes, leaving the indexing to the others.
    #[arg(
        id = "log-workers",
        long = "log-workers",
        env = "ENGRAM_LOG_WORKERS",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub workers: bool,
}

impl Default for LogArgs {
    fn default() -> Self {
        Self {
            partitions: 16,
            batch_max: 64,
            batch_wait: Duration::from_millis(5),
            max_lag: 10_000,
            max_deliveries: 5,
            claim_idle: Duration::from_secs(15),
            strict: false,
            sync_wait: Duration::from_secs(10),
            workers: true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub embedding_url: String,
    pub retrieval_url: String,
    pub log: LogArgs,
    /// The chat model fact extraction uses (none: `extract=true` is refused).
    pub chat: ChatArgs,
    pub common: CommonArgs,
}

/// The ingestion binary's own settings.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestionArgs {
    #[command(flatten)]
    pub peers: IngestionPeers,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub chat: ChatArgs,
}

impl engram_runtime::server::CheckArgs for IngestionArgs {
    fn check(&self) -> Result<()> {
        if self.log.partitions == 0 {
            return Err(Error::invalid(
                "ENGRAM_LOG_PARTITIONS",
                "must be at least 1",
            ));
        }
        self.chat.check().map_err(Error::from)
    }
}

impl Config {
    pub fn from_args(args: IngestionArgs, common: CommonArgs) -> Self {
        Self {
            embedding_url: args.peers.embedding.embedding_url,
            retrieval_url: args.peers.retrieval.retrieval_url,
            log: args.log,
            chat: args.chat,
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
    let pipeline = Arc::new(Pipeline::from_config(&config, runtime.metrics())?);
    let workers = match config.log.workers {
        true => pipeline.workers(&config),
        false => None,
    };
    let routes = Routes::new(rpc::ingestion_server(
        pipeline,
        config.common.limits.clone(),
    ));
    let served = runtime
        .serve(
            routes,
            &[engram_proto::internal::v1::ingestion_server::SERVICE_NAME],
            listeners.grpc,
            config.common.drain_grace,
            shutdown,
        )
        .await;
    if let Some(workers) = workers {
        workers.stop().await;
    }
    served
}

/// Indexing workers for `config` with their own connections: what `serve` starts unless
/// `ENGRAM_LOG_WORKERS=false`, for a process that only indexes (and for tests that crash them).
/// `None` without Redis, when there is no log to index from.
pub fn start_workers(config: &Config, metrics: &Metrics) -> Result<Option<Workers>> {
    Ok(Arc::new(Pipeline::from_config(config, metrics)?).workers(config))
}

/// The write log and how to use it.
#[derive(Debug, Clone)]
pub struct LogSettings {
    pub log: WriteLog,
    /// The extraction log: same Redis and partitions, keys under `engram:extract`.
    pub extraction: WriteLog,
    pub args: LogArgs,
}

/// Key prefix of the extraction log.
pub const EXTRACTION_LOG: &str = "engram:extract";

/// Drop every partition lease of the write and extraction logs on the Redis at `url`: see
/// [`WriteLog::break_leases`]; only for a Redis no other live process uses.
pub async fn break_stale_leases(url: &engram_domain::SecretUrl, partitions: u32) -> Result<()> {
    let log = WriteLog::connect("ENGRAM_REDIS_URL", url, partitions)?;
    log.break_leases().await?;
    log.with_prefix(EXTRACTION_LOG).break_leases().await
}

/// [`Ingestion`]: writes go to the durable log and are acknowledged at once (or, without
/// Redis, are embedded and indexed before they are acknowledged).
pub struct Pipeline {
    embedder: Arc<dyn Embedder>,
    index: Arc<dyn Index>,
    /// BM25 weights stored with each memory for keyword search.
    keywords: engram_store::Keywords,
    log: Option<LogSettings>,
    metrics: Option<worker::LogMetrics>,
    privacy: PrivacyPolicy,
    /// Personal data found in writes, by kind and what was done.
    findings: Family<FindingLabels, Counter>,
    history: History,
    chat: Option<Arc<ChatModel>>,
    limits: Limits,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FindingLabels {
    kind: &'static str,
    action: &'static str,
}

fn dedup_key(tenant: &TenantId, scope: &Scope, kind: &str, value: &str) -> String {
    format!(
        "engram:dedup:{}:{}:{kind}:{value}",
        tenant.as_str(),
        scope.exact_key()
    )
}

impl Pipeline {
    pub fn new(embedder: Arc<dyn Embedder>, index: Arc<dyn Index>) -> Self {
        Self {
            embedder,
            index,
            keywords: engram_store::Keywords::new(),
            log: None,
            metrics: None,
            privacy: PrivacyPolicy::default(),
            findings: Family::default(),
            history: History::new(None, Duration::from_secs(1)),
            chat: None,
            limits: Limits::default(),
        }
    }

    /// Personal data found in a field, counted by kind and the mode's action.
    fn count_findings(&self, kinds: &[PiiKind], mode: PrivacyMode) {
        let action = match mode {
            PrivacyMode::Off => "none",
            PrivacyMode::Redact => "redacted",
            PrivacyMode::Block => "blocked",
        };
        for kind in kinds {
            self.findings
                .get_or_create(&FindingLabels {
                    kind: kind.as_str(),
                    action,
                })
                .inc();
        }
    }

    /// Apply the privacy mode to a memory's text and metadata values (`field` names it in
    /// errors, e.g. `memories[2]`).
    fn guard(&self, mode: PrivacyMode, field: &str, memory: &mut NewMemory) -> Result<()> {
        self.guard_field(mode, &format!("{field}.text"), &mut memory.text)?;
        self.guard_metadata(mode, field, &mut memory.metadata)
    }

    fn guard_metadata(
        &self,
        mode: PrivacyMode,
        field: &str,
        metadata: &mut std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        for (key, value) in metadata.iter_mut() {
            self.guard_field(mode, &format!("{field}.metadata[{key}]"), value)?;
        }
        Ok(())
    }

    /// Apply the privacy mode to one field and count what it found, refused or not (a
    /// refused field is scanned again for its kinds: the refusal path only).
    fn guard_field(&self, mode: PrivacyMode, field: &str, text: &mut String) -> Result<()> {
        match privacy::guard(mode, field, text) {
            Ok(kinds) => {
                self.count_findings(&kinds, mode);
                Ok(())
            }
            Err(refused) => {
                self.count_findings(&privacy::kinds(&privacy::scan(text)), mode);
                Err(refused)
            }
        }
    }

    pub fn with_log(mut self, log: Option<LogSettings>, metrics: worker::LogMetrics) -> Self {
        self.log = log;
        self.metrics = Some(metrics);
        self
    }

    /// The pipeline `config` describes: clients of the embedding and retrieval services and,
    /// with Redis, the write log.
    pub fn from_config(config: &Config, metrics: &Metrics) -> Result<Self> {
        let peers = rpc::Peers::new(&config.common, metrics);
        let embedder = Arc::new(rpc::EmbedderClient::connect(
            &peers,
            "ENGRAM_EMBEDDING_URL",
            &config.embedding_url,
        )?);
        let index = Arc::new(rpc::IndexClient::connect(
            &peers,
            "ENGRAM_RETRIEVAL_URL",
            &config.retrieval_url,
        )?);
        let log = match &config.common.redis_url {
            Some(url) => {
                let log = WriteLog::connect("ENGRAM_REDIS_URL", url, config.log.partitions)?;
                Some(LogSettings {
                    extraction: log.clone().with_prefix(EXTRACTION_LOG),
                    log,
                    args: config.log.clone(),
                })
            }
            None => {
                tracing::warn!(
                    "no Redis (ENGRAM_REDIS_URL): writes are indexed before they are acknowledged"
                );
                None
            }
        };
        let redis = match &config.common.redis_url {
            Some(url) => Some(Redis::connect(RedisConfig::new(url.clone()), metrics)?),
            None => None,
        };
        let chat = match config.chat.config().map_err(Error::from)? {
            Some(chat) => {
                let outbound = engram_resilience::OutboundMetrics::new(metrics);
                let model = ChatModel::new(chat, &outbound).map_err(Error::from)?;
                tracing::info!(model = model.model(), "fact extraction with a chat model");
                Some(Arc::new(model))
            }
            None => None,
        };
        let mut pipeline =
            Self::new(embedder, index).with_log(log, worker::LogMetrics::new(metrics));
        pipeline.privacy = config.common.privacy.policy()?;
        pipeline.history = History::new(redis, config.common.history_ttl);
        pipeline.chat = chat;
        pipeline.limits = config.common.limits.clone();
        metrics.register(
            "engram_privacy_findings",
            "Personal data and secrets found in writes, by kind and action (none, redacted, blocked)",
            pipeline.findings.clone(),
        );
        Ok(pipeline)
    }

    /// Workers indexing from this pipeline's log, if it has one.
    pub fn workers(self: &Arc<Self>, config: &Config) -> Option<Workers> {
        let settings = self.log.as_ref()?;
        let metrics = self.metrics.clone()?;
        let mut logs = vec![(settings.log.clone(), LogKind::Write)];
        // Extraction entries only come from a replica with a chat model; one without would
        // fail them all.
        if self.chat.is_some() {
            logs.push((settings.extraction.clone(), LogKind::Extraction));
        }
        Some(Workers::spawn(
            self.clone(),
            logs,
            settings.args.clone(),
            config.common.limits.clone(),
            metrics,
        ))
    }

    /// Embed the memories' texts (dense, turns with the turn before them, see [`turns`]; and
    /// BM25 weights for keyword search) and apply them, in order.
    pub(crate) async fn embed_and_apply(
        &self,
        tenant: &TenantId,
        memories: Vec<Memory>,
    ) -> Result<u64> {
        if memories.is_empty() {
            return Ok(0);
        }
        let previous = turns::previous_texts(&*self.index, tenant, &memories).await?;
        let ops = self
            .upserts(memories.into_iter().zip(previous).collect())
            .await?;
        let outcome = self.index.apply(tenant, IndexWrites { ops }).await?;
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
                let sparse = self.keywords.document(&memory.text);
                IndexOp::Upsert(Box::new(IndexedMemory {
                    memory,
                    dense,
                    sparse,
                }))
            })
            .collect())
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
        let embedded = self.embedder.embed(vec![probe], Purpose::Query).await;
        embedded.is_ok() && self.index.stats(None).await.is_ok()
    }

    /// Apply an update now: the stored memory, patched, embedded again (and the turn after
    /// it, when its text or place changed: that turn was embedded with it).
    pub(crate) async fn apply_update(
        &self,
        tenant: &TenantId,
        command: UpdateCommand,
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
            std::collections::HashSet::from([memory.id])
        } else {
            Default::default()
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
        self.index.apply(tenant, IndexWrites { ops }).await?;
        Ok(memory)
    }

    /// Apply a forget now; how many memories it deleted. Forgetting turns by id embeds the
    /// turns after them again first, without them (one apply: a retry finds the same turns).
    pub(crate) async fn apply_forget(
        &self,
        tenant: &TenantId,
        target: ForgetTarget,
    ) -> Result<u64> {
        let mut ops = Vec::new();
        match target {
            ForgetTarget::Ids(ids) => {
                let removed: std::collections::HashSet<MemoryId> = ids.iter().copied().collect();
                let changed: Vec<(Memory, Option<String>)> = self
                    .index
                    .get(
                        tenant,
                        GetQuery {
                            ids: ids.clone(),
                            after_write_token: None,
                        },
                    )
                    .await?
                    .memories
                    .into_iter()
                    .map(|m| (m, None))
                    .collect();
                let following = turns::following(&*self.index, tenant, &changed, &removed).await?;
                ops = self
                    .upserts(
                        following
                            .into_iter()
                            .map(|f| (f.turn, f.previous))
                            .collect(),
                    )
                    .await?;
                ops.push(IndexOp::DeleteIds(ids));
            }
            ForgetTarget::Scope(scope) => ops.push(IndexOp::DeleteScope(scope)),
        }
        let outcome = self.index.apply(tenant, IndexWrites { ops }).await?;
        Ok(outcome.deleted)
    }

    async fn stored(&self, tenant: &TenantId, id: MemoryId) -> Result<Memory> {
        let found = self
            .index
            .get(
                tenant,
                GetQuery {
                    ids: vec![id],
                    after_write_token: None,
                },
            )
            .await?;
        found
            .memories
            .into_iter()
            .next()
            .ok_or_else(|| Error::NotFound(format!("memory {id} not found")))
    }

    /// The log, unless Redis is away and writes may fall back to the synchronous path.
    fn degraded(&self, reason: &str) -> Result<()> {
        let Some(settings) = &self.log else {
            return Ok(());
        };
        if settings.args.strict {
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

    /// Append one non-Remember operation and wait for it to be applied.
    async fn log_and_wait(
        &self,
        settings: &LogSettings,
        tenant: &TenantId,
        partition: u32,
        op: LogOp,
    ) -> std::result::Result<WriteToken, AppendError> {
        let write = LoggedWrite {
            tenant: tenant.clone(),
            op,
            submitted_unix_ms: Timestamp::now().as_micros() / 1000,
            reservations: Vec::new(),
            traceparent: engram_telemetry::trace::current_traceparent(),
        };
        let appended = settings
            .log
            .append(
                partition,
                &[Append {
                    key_reservation: String::new(),
                    content_reservation: String::new(),
                    id: String::new(),
                    payload: write.encode(),
                    force: false,
                }],
                u64::MAX,
            )
            .await?;
        match appended.first() {
            Some(Appended::Logged(entry)) => Ok(WriteToken::Logged {
                partition,
                entry: *entry,
            }),
            _ => Err(AppendError::Unavailable(
                "the write log did not log the operation".into(),
            )),
        }
    }

    /// Whether the write holding a de-duplication reservation no longer stands: it failed, or
    /// it was indexed and is gone from the index (forgotten). When unsure, it stands.
    async fn stale(
        &self,
        settings: &LogSettings,
        tenant: &TenantId,
        partition: u32,
        held: &Reserved,
    ) -> bool {
        let Some(entry) = held.entry else {
            return false;
        };
        match settings
            .log
            .status(WriteToken::Logged { partition, entry })
            .await
        {
            Ok(WriteState::Failed(_)) => true,
            Ok(WriteState::Indexed) => {
                let Ok(id) = engram_domain::validate::memory_id(&held.id) else {
                    return false;
                };
                matches!(self.stored(tenant, id).await, Err(Error::NotFound(_)))
            }
            _ => false,
        }
    }

    /// Queue the extraction of facts from `created` on the extraction log. The write is
    /// acknowledged even if this fails (Redis failing between the two appends): the memories
    /// are stored, only their extraction is lost, and that is logged and counted.
    async fn log_extraction(
        &self,
        settings: &LogSettings,
        tenant: &TenantId,
        partition: u32,
        created: &[Memory],
        traceparent: &str,
    ) {
        if created.is_empty() {
            return;
        }
        let submitted = Timestamp::now().as_micros() / 1000;
        let appends: Vec<Append> = created
            .iter()
            .map(|memory| Append {
                key_reservation: String::new(),
                content_reservation: String::new(),
                id: memory.id.to_string(),
                payload: LoggedWrite {
                    tenant: tenant.clone(),
                    op: LogOp::Extract(Box::new(memory.clone())),
                    submitted_unix_ms: submitted,
                    reservations: Vec::new(),
                    traceparent: traceparent.to_string(),
                }
                .encode(),
                force: false,
            })
            .collect();
        if let Err(e) = settings
            .extraction
            .append(partition, &appends, u64::MAX)
            .await
        {
            if let Some(metrics) = &self.metrics {
                metrics.extraction_lost.inc_by(appends.len() as u64);
            }
            tracing::warn!(error = ?e, memories = appends.len(), "could not queue fact extraction; the memories are stored without it");
        }
    }

    async fn wait(&self, settings: &LogSettings, token: WriteToken) -> Result<()> {
        let budget = engram_runtime::deadline::answerable_within(settings.args.sync_wait);
        match settings.log.settled(token, budget).await? {
            WriteState::Failed(reason) => Err(failure(&reason)),
            _ => Ok(()),
        }
    }

    async fn submit_sync(
        &self,
        tenant: &TenantId,
        scope: Scope,
        memories: Vec<engram_domain::model::NewMemory>,
        resolutions: Vec<Resolution>,
        ids: Vec<MemoryId>,
    ) -> Result<RememberOutcome> {
        let now = Timestamp::now();
        let mut new_memories = Vec::new();
        let results = results_for(&resolutions, &ids);
        for (i, input) in memories.into_iter().enumerate() {
            if resolutions[i] == Resolution::New {
                new_memories.push(Memory::from_input(
                    ids[i],
                    tenant.clone(),
                    scope.clone(),
                    input,
                    now,
                ));
            }
        }
        self.embed_and_apply(tenant, new_memories).await?;
        Ok(RememberOutcome {
            results,
            write_token: WriteToken::Indexed,
        })
    }
}

/// A failure recorded by a worker as an error for the caller.
fn failure(reason: &str) -> Error {
    match reason.split_once(": ") {
        Some(("not found", message)) => Error::NotFound(message.to_string()),
        Some(("unavailable", message)) => {
            Error::unavailable(format!("the write could not be indexed: {message}"))
        }
        Some((_, message)) => Error::FailedPrecondition(format!("the write failed: {message}")),
        None => Error::FailedPrecondition(format!("the write failed: {reason}")),
    }
}

fn results_for(resolutions: &[Resolution], ids: &[MemoryId]) -> Vec<WriteResult> {
    resolutions
        .iter()
        .enumerate()
        .map(|(i, resolution)| match *resolution {
            Resolution::New => WriteResult {
                id: ids[i],
                status: WriteStatus::Created,
                reason: String::new(),
            },
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
        })
        .collect()
}

/// Batches with more text than this are scanned for personal data off the runtime's turn.
const SCAN_IN_PLACE_BYTES: usize = 64 * 1024;

/// Run CPU-heavy `work` without stalling the tasks of the runtime thread it is on (a
/// multi-threaded runtime hands them to another thread); inline on a current-thread runtime.
fn cpu_bound<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

fn lag_error(backlog: u64) -> Error {
    Error::ResourceExhausted {
        reason: format!("indexing is {backlog} writes behind for this partition; retry shortly"),
        retry_after: Some(Duration::from_secs(1)),
    }
}

#[async_trait]
impl Ingestion for Pipeline {
    async fn submit(&self, tenant: &TenantId, batch: RememberBatch) -> Result<RememberOutcome> {
        let RememberBatch {
            scope,
            mut memories,
            mode,
            extract,
            privacy,
        } = batch;
        let privacy = self.privacy.mode(tenant.as_str(), privacy);
        let guard_all = |memories: &mut Vec<NewMemory>| {
            memories
                .iter_mut()
                .enumerate()
                .try_for_each(|(i, memory)| self.guard(privacy, &format!("memories[{i}]"), memory))
        };
        let bytes: usize = memories
            .iter()
            .map(|m| m.text.len() + m.metadata.values().map(String::len).sum::<usize>())
            .sum();
        if privacy != PrivacyMode::Off && bytes > SCAN_IN_PLACE_BYTES {
            // Scanning a large batch takes milliseconds to seconds of CPU: let the runtime
            // move this worker's other tasks elsewhere meanwhile.
            cpu_bound(|| guard_all(&mut memories))?;
        } else {
            guard_all(&mut memories)?;
        }
        if extract {
            if self.chat.is_none() {
                return Err(Error::FailedPrecondition(
                    "extract=true needs a chat model: set ENGRAM_CHAT_BASE_URL on the ingestion service".into(),
                ));
            }
            if self.log.is_none() {
                return Err(Error::FailedPrecondition(
                    "extract=true needs the write log: set ENGRAM_REDIS_URL on the ingestion service".into(),
                ));
            }
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
        let ids: Vec<MemoryId> = resolutions
            .iter()
            .map(|_| MemoryId::new_time_ordered())
            .collect();
        let Some(settings) = &self.log else {
            return self
                .submit_sync(tenant, scope, memories, resolutions, ids)
                .await;
        };

        let now = Timestamp::now();
        let traceparent = engram_telemetry::trace::current_traceparent();
        let partition = settings.log.partition_of(tenant, &scope);
        let mut appends = Vec::new();
        let mut new_inputs = Vec::new();
        let mut created = Vec::new();
        for (i, input) in memories.iter().enumerate() {
            if resolutions[i] != Resolution::New {
                continue;
            }
            let key_reservation = if input.idempotency_key.is_empty() {
                String::new()
            } else {
                dedup_key(tenant, &scope, "k", &input.idempotency_key)
            };
            let content_reservation = if input.dedup_by_content() {
                dedup_key(tenant, &scope, "h", &hashes[i])
            } else {
                String::new()
            };
            let memory =
                Memory::from_input(ids[i], tenant.clone(), scope.clone(), input.clone(), now);
            created.push((i, memory.clone()));
            let write = LoggedWrite {
                tenant: tenant.clone(),
                op: LogOp::Remember(Box::new(memory)),
                submitted_unix_ms: now.as_micros() / 1000,
                reservations: [&key_reservation, &content_reservation]
                    .into_iter()
                    .filter(|k| !k.is_empty())
                    .cloned()
                    .collect(),
                traceparent: traceparent.clone(),
            };
            appends.push(Append {
                key_reservation,
                content_reservation,
                id: ids[i].to_string(),
                payload: write.encode(),
                force: false,
            });
            new_inputs.push(i);
        }
        if appends.is_empty() {
            return Ok(RememberOutcome {
                results: results_for(&resolutions, &ids),
                write_token: WriteToken::Indexed,
            });
        }
        let appended = match settings
            .log
            .append(partition, &appends, settings.args.max_lag)
            .await
        {
            Ok(appended) => appended,
            Err(AppendError::Lag { backlog }) => {
                if let Some(metrics) = &self.metrics {
                    metrics.refused.inc();
                }
                return Err(lag_error(backlog));
            }
            Err(AppendError::Unavailable(reason)) => {
                self.degraded(&reason)?;
                return self
                    .submit_sync(tenant, scope, memories, resolutions, ids)
                    .await;
            }
        };
        // Writes whose reservation another recent write of the scope holds are duplicates of
        // it — unless that write has since failed or been forgotten, which leaves the
        // reservation stale: those are appended again, over it.
        let mut resolutions = resolutions;
        let mut ids = ids;
        let mut last: Option<EntryId> = None;
        let mut again = Vec::new();
        for ((&i, outcome), append) in new_inputs.iter().zip(&appended).zip(&appends) {
            let (held, why) = match outcome {
                Appended::Logged(entry) => {
                    last = last.max(Some(*entry));
                    continue;
                }
                Appended::DuplicateKey(held) => (held, "same idempotency key"),
                Appended::DuplicateContent(held) => {
                    (held, "same content already stored in this scope")
                }
            };
            if self.stale(settings, tenant, partition, held).await {
                again.push((
                    i,
                    Append {
                        force: true,
                        ..append.clone()
                    },
                ));
                continue;
            }
            if let Ok(id) = engram_domain::validate::memory_id(&held.id) {
                ids[i] = id;
                resolutions[i] = Resolution::DuplicateOf(id, why);
                // Reading "after" this write means after the write it duplicates.
                last = last.max(held.entry);
            }
        }
        if !again.is_empty() {
            let (inputs, appends): (Vec<usize>, Vec<Append>) = again.into_iter().unzip();
            let appended = settings
                .log
                .append(partition, &appends, settings.args.max_lag)
                .await
                .map_err(|e| match e {
                    AppendError::Lag { backlog } => lag_error(backlog),
                    AppendError::Unavailable(reason) => Error::unavailable(format!(
                        "the write log (Redis) failed during the write: {reason}; retry it"
                    )),
                })?;
            for (i, outcome) in inputs.into_iter().zip(appended) {
                match outcome {
                    Appended::Logged(entry) => last = last.max(Some(entry)),
                    _ => {
                        return Err(Error::internal(format!(
                            "write {i} was appended over a stale reservation and still found one"
                        )));
                    }
                }
            }
        }
        let write_token = match last {
            Some(entry) => WriteToken::Logged { partition, entry },
            None => WriteToken::Indexed,
        };
        let created: Vec<Memory> = created
            .into_iter()
            .filter(|(i, _)| resolutions[*i] == Resolution::New)
            .map(|(_, memory)| memory)
            .collect();
        self.history.append(tenant, &created).await;
        if extract {
            self.log_extraction(settings, tenant, partition, &created, &traceparent)
                .await;
        }
        if mode == WriteMode::Sync {
            self.wait(settings, write_token).await?;
        }
        Ok(RememberOutcome {
            results: results_for(&resolutions, &ids),
            write_token,
        })
    }

    async fn update(&self, tenant: &TenantId, command: UpdateCommand) -> Result<UpdateOutcome> {
        let mut command = command;
        let mode = self.privacy.mode(tenant.as_str(), None);
        if let Some(text) = &mut command.patch.text {
            self.guard_field(mode, "memory.text", text)?;
        }
        if let Some(metadata) = &mut command.patch.metadata {
            self.guard_metadata(mode, "memory", metadata)?;
        }
        if let Some(settings) = &self.log {
            // The memory's user decides the partition, so the update follows the user's
            // earlier writes.
            let stored = self.stored(tenant, command.id).await?;
            let partition = settings.log.partition_of(tenant, &stored.scope);
            match self
                .log_and_wait(settings, tenant, partition, LogOp::Update(command.clone()))
                .await
            {
                Ok(token) => {
                    self.wait(settings, token).await?;
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
        let memory = self.apply_update(tenant, command).await?;
        Ok(UpdateOutcome {
            memory,
            write_token: WriteToken::Indexed,
        })
    }

    async fn forget(&self, tenant: &TenantId, target: ForgetTarget) -> Result<ForgetOutcome> {
        if let Some(settings) = &self.log {
            // Forgetting a scope goes to its user's partition; forgetting ids goes to the
            // partitions of the memories' users.
            let mut touched: Vec<Scope> = Vec::new();
            let parts: Vec<(u32, ForgetTarget)> = match &target {
                ForgetTarget::Scope(scope) => {
                    vec![(settings.log.partition_of(tenant, scope), target.clone())]
                }
                ForgetTarget::Ids(ids) => {
                    let found = self
                        .index
                        .get(
                            tenant,
                            GetQuery {
                                ids: ids.clone(),
                                after_write_token: None,
                            },
                        )
                        .await?;
                    let mut by_partition: std::collections::BTreeMap<u32, Vec<MemoryId>> =
                        Default::default();
                    touched = found.memories.iter().map(|m| m.scope.clone()).collect();
                    for memory in found.memories {
                        by_partition
                            .entry(settings.log.partition_of(tenant, &memory.scope))
                            .or_default()
                            .push(memory.id);
                    }
                    by_partition
                        .into_iter()
                        .map(|(p, ids)| (p, ForgetTarget::Ids(ids)))
                        .collect()
                }
            };
            let mut forgotten = 0;
            let mut token = WriteToken::Indexed;
            let mut logged = true;
            let parts_result = self.forget_parts(settings, tenant, parts).await;
            // Forgotten turns must not linger in a cached history.
            match &target {
                ForgetTarget::Scope(scope) => {
                    self.history.invalidate_user(tenant, &scope.user_id).await;
                }
                ForgetTarget::Ids(_) => self.history.invalidate(tenant, &touched).await,
            }
            let (f, t, l) = parts_result?;
            forgotten += f;
            token = t.unwrap_or(token);
            logged &= l;
            return Ok(ForgetOutcome {
                forgotten,
                write_token: if logged { token } else { WriteToken::Indexed },
            });
        }
        let forgotten = self.apply_forget(tenant, target).await?;
        Ok(ForgetOutcome {
            forgotten,
            write_token: WriteToken::Indexed,
        })
    }

    async fn status(&self, token: WriteToken) -> Result<WriteState> {
        match (&self.log, token) {
            (_, WriteToken::Indexed) => Ok(WriteState::Indexed),
            (Some(settings), token) => settings.log.status(token).await,
            (None, _) => Err(Error::FailedPrecondition(
                "this ingestion service has no write log (ENGRAM_REDIS_URL is not set)".into(),
            )),
        }
    }
}

impl Pipeline {
    /// Log each part of a forget and wait for it: memories forgotten, the last token, and
    /// whether every part went through the log.
    async fn forget_parts(
        &self,
        settings: &LogSettings,
        tenant: &TenantId,
        parts: Vec<(u32, ForgetTarget)>,
    ) -> Result<(u64, Option<WriteToken>, bool)> {
        let mut forgotten = 0;
        let mut token = None;
        let mut logged = true;
        for (partition, part) in parts {
            match self
                .log_and_wait(settings, tenant, partition, LogOp::Forget(part.clone()))
                .await
            {
                Ok(t) => {
                    self.wait(settings, t).await?;
                    if let WriteToken::Logged { partition, entry } = t {
                        forgotten += settings.log.forgot(partition, entry).await?;
                    }
                    token = Some(t);
                }
                Err(AppendError::Lag { backlog }) => return Err(lag_error(backlog)),
                Err(AppendError::Unavailable(reason)) => {
                    self.degraded(&reason)?;
                    forgotten += self.apply_forget(tenant, part).await?;
                    logged = false;
                }
            }
        }
        Ok((forgotten, token, logged))
    }
}
