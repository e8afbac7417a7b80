//! The embedding service: turns texts into vectors for the rest of the cluster.
//!
//! An Embed call passes through the gRPC adapter (`engram_runtime::rpc::embedder_server`, which
//! bounds the batch), then [`EmbeddingService`]: each text is looked up in the embedding cache
//! by (model, purpose, SHA-256 of the text) — in process, then in Redis — and only the misses
//! go to the [`batcher`], which coalesces concurrent calls into provider batches. New vectors
//! are cached (compactly, as little-endian f32) once the provider has answered and they passed
//! its checks; a failed call caches nothing.
//!
//! Providers: the local all-MiniLM-L6-v2 (default), or any OpenAI-compatible endpoint through
//! `engram-resilience`.

pub mod batcher;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use engram_cache::{CacheConfig, CacheMetrics, Redis, RedisConfig, TwoLevelCache};
use engram_domain::api::{Embedder, Embeddings, Purpose};
use engram_domain::model::TenantId;
use engram_domain::parse_duration;
use engram_domain::{Error, Result};
use engram_models::{
    EmbeddingProvider, LocalEmbedder, LocalOptions, OpenAiConfig, OpenAiEmbedder, ProviderKey,
    fetch,
};
use engram_proto::tonic::service::Routes;
use engram_resilience::OutboundMetrics;
use engram_runtime::config::CommonArgs;
use engram_runtime::rpc;
use engram_runtime::server::{Listeners, ServiceRuntime};
use sha2::{Digest as _, Sha256};

use crate::batcher::{BatchConfig, BatchMetrics, Batcher};

pub const SERVICE_NAME: &str = "embedding";

engram_runtime::listen_args!(Listen, "embedding", "EMBEDDING", "50054", "9094");
engram_resilience::policy_args!(EmbeddingPolicyArgs, "embedding", "EMBEDDING");

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProviderKind {
    /// all-MiniLM-L6-v2 on this machine's CPU.
    Local,
    /// An OpenAI-compatible `/embeddings` endpoint.
    Openai,
}

#[derive(Debug, Clone, clap::Args)]
pub struct EmbeddingArgs {
    /// Where embeddings come from.
    #[arg(long = "embedding-provider", env = "ENGRAM_EMBEDDING_PROVIDER", value_enum, default_value_t = ProviderKind::Local)]
    pub provider: ProviderKind,
    /// Directory of the local model (config.json, tokenizer.json, model.safetensors); fetched
    /// there on first start if missing. Default: ~/.cache/engram/models/all-MiniLM-L6-v2.
    #[arg(long = "model-dir", env = engram_domain::settings::env::MODEL_DIR, value_parser = engram_domain::absolute_path)]
    pub model_dir: Option<PathBuf>,
    /// Inference threads of the local model; 0 means one per core.
    #[arg(
        long = "inference-workers",
        env = "ENGRAM_INFERENCE_WORKERS",
        default_value_t = 0
    )]
    pub inference_workers: usize,
    /// Base URL of the OpenAI-compatible API, up to the version (provider `openai`).
    #[arg(
        long = "embedding-base-url",
        env = "ENGRAM_EMBEDDING_BASE_URL",
        default_value = "https://api.openai.com/v1"
    )]
    pub base_url: String,
    /// Model name sent to the API (provider `openai`).
    #[arg(
        long = "embedding-model",
        env = "ENGRAM_EMBEDDING_MODEL",
        default_value = "text-embedding-3-small"
    )]
    pub model: String,
    /// Name of the environment variable holding the API key (provider `openai`); empty for
    /// endpoints that need no key.
    #[arg(
        long = "embedding-api-key-env",
        env = "ENGRAM_EMBEDDING_API_KEY_ENV",
        default_value = "OPENAI_API_KEY"
    )]
    pub api_key_env: String,
    /// File holding the API key, e.g. a mounted Secret; takes precedence over the variable.
    #[arg(long = "embedding-api-key-file", env = "ENGRAM_EMBEDDING_API_KEY_FILE", value_parser = engram_domain::absolute_path)]
    pub api_key_file: Option<PathBuf>,
    /// With `openai`: longest input the provider takes, in cl100k_base tokens; longer texts are
    /// cut to it before they are sent (0: sent whole).
    #[arg(
        long = "embedding-max-input-tokens",
        env = "ENGRAM_EMBEDDING_MAX_INPUT_TOKENS",
        default_value_t = 8191
    )]
    pub max_input_tokens: usize,
    /// Texts per provider batch to aim for.
    #[arg(
        long = "embed-batch-max",
        env = "ENGRAM_EMBED_BATCH_MAX",
        default_value_t = 64
    )]
    pub batch_max: usize,
    /// How long a request may wait for others to share its batch.
    #[arg(long = "embed-batch-wait", env = "ENGRAM_EMBED_BATCH_WAIT", default_value = "2ms", value_parser = parse_duration)]
    pub batch_wait: Duration,
    /// Requests waiting for a batch at most; beyond it callers get RESOURCE_EXHAUSTED.
    #[arg(
        long = "embed-queue",
        env = "ENGRAM_EMBED_QUEUE",
        default_value_t = 1024
    )]
    pub queue: usize,
    /// In-process embedding cache size, in MiB.
    #[arg(
        long = "embed-cache-local-mb",
        env = "ENGRAM_EMBED_CACHE_LOCAL_MB",
        default_value_t = 64
    )]
    pub cache_local_mb: u64,
    /// How long embeddings stay in the Redis cache.
    #[arg(long = "embed-cache-ttl", env = "ENGRAM_EMBED_CACHE_TTL", default_value = "7days", value_parser = parse_duration)]
    pub cache_ttl: Duration,
    #[command(flatten)]
    pub policy: EmbeddingPolicyArgs,
}

/// Where the service's vectors come from.
#[derive(Debug, Clone)]
pub enum ProviderConfig {
    Local {
        model_dir: PathBuf,
        options: LocalOptions,
    },
    OpenAi {
        base_url: String,
        model: String,
        key: KeySource,
        /// Longest input in cl100k_base tokens; longer ones are cut (0: no limit).
        max_input_tokens: usize,
        policy: engram_resilience::Policy,
    },
}

/// Where the API key is read from at start-up.
#[derive(Debug, Clone)]
pub enum KeySource {
    Env(String),
    File(PathBuf),
    /// The endpoint needs no key (Ollama, a local text-embeddings-inference).
    None,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub provider: ProviderConfig,
    pub batch: BatchConfig,
    pub cache_local_bytes: u64,
    pub cache_ttl: Duration,
    pub common: CommonArgs,
}

impl Config {
    pub fn from_args(args: EmbeddingArgs, common: CommonArgs) -> Self {
        let provider = match args.provider {
            ProviderKind::Local => ProviderConfig::Local {
                model_dir: args.model_dir.unwrap_or_else(fetch::default_model_dir),
                options: LocalOptions {
                    workers: args.inference_workers,
                    ..LocalOptions::default()
                },
            },
            ProviderKind::Openai => ProviderConfig::OpenAi {
                base_url: args.base_url,
                model: args.model,
                key: match args.api_key_file {
                    Some(file) => KeySource::File(file),
                    None if args.api_key_env.is_empty() => KeySource::None,
                    None => KeySource::Env(args.api_key_env),
                },
                max_input_tokens: args.max_input_tokens,
                policy: args.policy.policy(),
            },
        };
        let batches_in_flight = match &provider {
            // As many batches as inference workers: more would only queue.
            ProviderConfig::Local { options, .. } => options.resolved_workers(),
            ProviderConfig::OpenAi { policy, .. } => policy.max_concurrency,
        };
        Self {
            provider,
            batch: BatchConfig {
                max_texts: args.batch_max.max(1),
                max_wait: args.batch_wait,
                queue_capacity: args.queue.max(1),
                max_batches_in_flight: batches_in_flight,
            },
            cache_local_bytes: args.cache_local_mb.saturating_mul(1024 * 1024),
            cache_ttl: args.cache_ttl,
            common,
        }
    }

    /// The local model, no Redis, test-sized settings.
    pub fn for_test() -> Self {
        Self {
            provider: ProviderConfig::Local {
                model_dir: std::env::var_os(engram_domain::settings::env::MODEL_DIR)
                    .map(PathBuf::from)
                    .unwrap_or_else(fetch::default_model_dir),
                options: LocalOptions::default(),
            },
            batch: BatchConfig {
                max_texts: 64,
                max_wait: Duration::from_millis(2),
                queue_capacity: 1024,
                max_batches_in_flight: LocalOptions::default().resolved_workers(),
            },
            cache_local_bytes: 16 * 1024 * 1024,
            cache_ttl: Duration::from_secs(3600),
            common: CommonArgs::for_test(),
        }
    }

    pub fn model_dir(&self) -> Option<&PathBuf> {
        match &self.provider {
            ProviderConfig::Local { model_dir, .. } => Some(model_dir),
            ProviderConfig::OpenAi { .. } => None,
        }
    }
}

/// Load the local model from `dir`, fetching it first if it is not there. Blocking work runs
/// off the async runtime.
pub async fn load_local_model(dir: PathBuf, options: LocalOptions) -> Result<Arc<LocalEmbedder>> {
    let started = Instant::now();
    let model = tokio::task::spawn_blocking(move || {
        fetch::ensure_model(&dir)?;
        LocalEmbedder::load(&dir, options)
    })
    .await
    .map_err(|e| Error::internal(format!("model loading task failed: {e}")))??;
    tracing::info!(
        model = engram_models::LOCAL_MODEL_ID,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "loaded the local embedding model"
    );
    Ok(Arc::new(model))
}

async fn provider(
    config: &Config,
    metrics: &engram_telemetry::Metrics,
) -> Result<Arc<dyn EmbeddingProvider>> {
    let dimension = config.common.vector_dimension;
    match &config.provider {
        ProviderConfig::Local { model_dir, options } => {
            if dimension != engram_models::LOCAL_DIMENSION {
                return Err(Error::invalid(
                    "ENGRAM_VECTOR_DIMENSION",
                    format!(
                        "is {dimension}, but the local model {} produces {}-dimensional vectors",
                        engram_models::LOCAL_MODEL_ID,
                        engram_models::LOCAL_DIMENSION
                    ),
                ));
            }
            Ok(load_local_model(model_dir.clone(), *options).await?)
        }
        ProviderConfig::OpenAi {
            base_url,
            model,
            key,
            max_input_tokens,
            policy,
        } => {
            let api_key = match key {
                KeySource::File(path) => Some(ProviderKey::from_file(
                    "ENGRAM_EMBEDDING_API_KEY_FILE",
                    path,
                )?),
                KeySource::Env(var) => {
                    Some(ProviderKey::from_env("ENGRAM_EMBEDDING_API_KEY_ENV", var)?)
                }
                KeySource::None => None,
            };
            let embedder = OpenAiEmbedder::new(
                OpenAiConfig {
                    base_url: base_url.clone(),
                    model: model.clone(),
                    api_key,
                    dimension,
                    max_inputs_per_request: 256,
                    max_input_tokens: *max_input_tokens,
                    policy: *policy,
                },
                &OutboundMetrics::new(metrics),
            )?;
            tracing::info!(%base_url, %model, dimension, "embedding with an OpenAI-compatible provider");
            Ok(Arc::new(embedder))
        }
    }
}

/// Serve embeddings from the configured provider until `shutdown`.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let runtime = ServiceRuntime::start(SERVICE_NAME, listeners.admin);
    let provider = provider(&config, runtime.metrics()).await?;
    serve_runtime(runtime, provider, config, listeners.grpc, shutdown).await
}

/// Serve embeddings from an already built provider (tests share one model, or point it at a
/// fake provider).
pub async fn serve_with_provider(
    provider: Arc<dyn EmbeddingProvider>,
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let runtime = ServiceRuntime::start(SERVICE_NAME, listeners.admin);
    serve_runtime(runtime, provider, config, listeners.grpc, shutdown).await
}

async fn serve_runtime(
    runtime: ServiceRuntime,
    provider: Arc<dyn EmbeddingProvider>,
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let redis = match &config.common.redis_url {
        Some(url) => Some(Redis::connect(
            RedisConfig::new(url.clone()),
            runtime.metrics(),
        )?),
        None => None,
    };
    let service = Arc::new(EmbeddingService::new(
        provider,
        &config,
        redis,
        runtime.metrics(),
    ));
    let routes = Routes::new(rpc::embedder_server(service, config.common.limits.clone()));
    runtime
        .serve(
            routes,
            &[engram_proto::internal::v1::embedder_server::SERVICE_NAME],
            listener,
            &config.common,
            shutdown,
        )
        .await
}

/// [`Embedder`] over a provider, with the embedding cache and micro-batching in front of it.
pub struct EmbeddingService {
    provider: Arc<dyn EmbeddingProvider>,
    cache: TwoLevelCache,
    queries: Batcher,
    documents: Batcher,
}

impl EmbeddingService {
    pub fn new(
        provider: Arc<dyn EmbeddingProvider>,
        config: &Config,
        redis: Option<Redis>,
        metrics: &engram_telemetry::Metrics,
    ) -> Self {
        let cache = TwoLevelCache::new(
            CacheConfig {
                name: "embeddings",
                local_max_bytes: config.cache_local_bytes,
                local_ttl: config.cache_ttl.min(Duration::from_secs(24 * 3600)),
                redis_ttl: config.cache_ttl,
            },
            redis,
            &CacheMetrics::new(metrics),
        );
        let batch_metrics = BatchMetrics::new(metrics);
        let batcher = |purpose| {
            Batcher::start(
                provider.clone(),
                purpose,
                config.batch,
                batch_metrics.clone(),
            )
        };
        Self {
            queries: batcher(Purpose::Query),
            documents: batcher(Purpose::Document),
            provider,
            cache,
        }
    }

    /// Forget the in-process cache level (tests: show the Redis level answers).
    pub async fn clear_local_cache(&self) {
        self.cache.clear_local().await;
    }

    /// A text's cache key: its model, purpose and [`text_digest`].
    fn cache_key(&self, tenant: &TenantId, purpose: Purpose, text: &str) -> String {
        format!(
            "{}:{}:{}",
            self.provider.model_id(),
            purpose.as_str(),
            text_digest(tenant, text)
        )
    }
}

/// What names a tenant's text in the embedding cache: a hash of the tenant with the text, so
/// each tenant's vectors are cached apart (a tenant cannot tell from an answer's speed whether
/// another embedded the same text) and the key names neither.
pub fn text_digest(tenant: &TenantId, text: &str) -> String {
    let digest = Sha256::new()
        .chain_update(tenant.as_str().as_bytes())
        .chain_update([0])
        .chain_update(text.as_bytes())
        .finalize();
    hex::encode(&digest[..16])
}

fn encode(vector: &[f32]) -> Bytes {
    vector.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn decode(bytes: &[u8], dimension: usize) -> Option<Vec<f32>> {
    if bytes.len() != dimension * 4 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    )
}

#[async_trait]
impl Embedder for EmbeddingService {
    async fn embed(
        &self,
        tenant: &TenantId,
        texts: Vec<String>,
        purpose: Purpose,
    ) -> Result<Embeddings> {
        let dimension = self.provider.dimension();
        let keys: Vec<String> = (texts.iter())
            .map(|t| self.cache_key(tenant, purpose, t))
            .collect();
        let mut vectors: Vec<Option<Vec<f32>>> = self
            .cache
            .get_many(&keys)
            .await
            .into_iter()
            .map(|hit| hit.and_then(|bytes| decode(&bytes, dimension)))
            .collect();
        let missing: Vec<usize> = (0..texts.len()).filter(|&i| vectors[i].is_none()).collect();
        if !missing.is_empty() {
            let batcher = match purpose {
                Purpose::Query => &self.queries,
                Purpose::Document => &self.documents,
            };
            let fresh = batcher
                .embed(missing.iter().map(|&i| texts[i].clone()).collect())
                .await?;
            let entries = missing
                .iter()
                .zip(&fresh)
                .map(|(&i, vector)| (keys[i].clone(), encode(vector)))
                .collect();
            self.cache.put_many(entries).await;
            for (i, vector) in missing.into_iter().zip(fresh) {
                vectors[i] = Some(vector);
            }
        }
        Ok(Embeddings {
            model: self.provider.model_id().to_string(),
            dimension,
            // Every slot is filled: hits from the cache, misses from the provider.
            vectors: vectors.into_iter().flatten().collect(),
        })
    }

    async fn forget(&self, tenant: &TenantId, texts: Vec<String>, purpose: Purpose) -> Result<u64> {
        let keys: Vec<String> = (texts.iter())
            .map(|t| self.cache_key(tenant, purpose, t))
            .collect();
        self.cache
            .remove_many(&keys)
            .await
            .map_err(|reason| Error::Unavailable {
                reason: format!("the embedding cache could not drop forgotten texts: {reason}"),
                retry_after: None,
            })
    }
}

/// Every embedding setting is checked as it is parsed; the provider's key is read at start-up.
impl engram_runtime::server::CheckArgs for EmbeddingArgs {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_round_trip_through_their_cached_bytes() {
        let vector = vec![0.25, -1.5, f32::MIN_POSITIVE, 3.0];
        assert_eq!(decode(&encode(&vector), 4), Some(vector));
        assert_eq!(decode(&encode(&[1.0, 2.0]), 4), None);
    }
}
