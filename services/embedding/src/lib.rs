//! The embedding service: turns texts into vectors for the rest of the cluster.
//!
//! A request passes through the gRPC adapter (`engram_core::rpc::embedder_server`, which bounds
//! the batch), then [`EmbeddingService`], then the configured [`EmbeddingProvider`] — today the
//! local all-MiniLM-L6-v2, which runs each request's texts as length-sorted model batches on
//! the blocking pool.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use engram_core::api::{Embedder, Embeddings, Purpose};
use engram_core::config::CommonArgs;
use engram_core::server::{Listeners, ServiceRuntime};
use engram_core::{Error, Result, rpc};
use engram_models::{EmbeddingProvider, LocalEmbedder, fetch};
use engram_proto::tonic::service::Routes;
use engram_telemetry::prometheus_client::metrics::counter::Counter;
use engram_telemetry::prometheus_client::metrics::histogram::Histogram;

pub const SERVICE_NAME: &str = "embedding";

engram_core::listen_args!(Listen, "embedding", "EMBEDDING", "50054", "9094");

#[derive(Debug, Clone, clap::Args)]
pub struct EmbeddingArgs {
    /// Directory of the local model (config.json, tokenizer.json, model.safetensors); fetched
    /// there on first start if missing. Default: ~/.cache/engram/models/all-MiniLM-L6-v2.
    #[arg(long = "model-dir", env = "ENGRAM_MODEL_DIR")]
    pub model_dir: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub model_dir: PathBuf,
    pub common: CommonArgs,
}

impl Config {
    pub fn from_args(args: EmbeddingArgs, common: CommonArgs) -> Self {
        Self {
            model_dir: args.model_dir.unwrap_or_else(fetch::default_model_dir),
            common,
        }
    }

    pub fn for_test() -> Self {
        Self {
            model_dir: std::env::var_os("ENGRAM_MODEL_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(fetch::default_model_dir),
            common: CommonArgs::for_test(),
        }
    }
}

/// Load the local model from `dir`, fetching it first if it is not there. Blocking work runs
/// off the async runtime.
pub async fn load_local_model(dir: PathBuf) -> Result<Arc<LocalEmbedder>> {
    let started = Instant::now();
    let model = tokio::task::spawn_blocking(move || {
        fetch::ensure_model(&dir)?;
        LocalEmbedder::load(&dir)
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

/// Serve embeddings from the local model in `config.model_dir` until `shutdown`.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let runtime = ServiceRuntime::start(SERVICE_NAME, listeners.admin);
    let provider = load_local_model(config.model_dir.clone()).await?;
    serve_runtime(runtime, provider, config, listeners.grpc, shutdown).await
}

/// Serve embeddings from an already loaded provider (tests share one model across clusters).
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
    let service = Arc::new(EmbeddingService::new(provider, runtime.metrics()));
    let routes = Routes::new(rpc::embedder_server(service, config.common.limits.clone()));
    runtime
        .serve(
            routes,
            &["engram.internal.v1.Embedder"],
            listener,
            config.common.drain_grace,
            shutdown,
        )
        .await
}

/// [`Embedder`] over one provider.
pub struct EmbeddingService {
    provider: Arc<dyn EmbeddingProvider>,
    texts: Counter,
    latency: Histogram,
}

impl EmbeddingService {
    pub fn new(provider: Arc<dyn EmbeddingProvider>, metrics: &engram_telemetry::Metrics) -> Self {
        let texts = Counter::default();
        let latency = Histogram::new(engram_telemetry::latency_buckets());
        metrics.register("engram_embed_texts", "Texts embedded", texts.clone());
        metrics.register(
            "engram_embed_seconds",
            "Time to embed one request's texts with the model",
            latency.clone(),
        );
        Self {
            provider,
            texts,
            latency,
        }
    }
}

#[async_trait]
impl Embedder for EmbeddingService {
    async fn embed(&self, texts: Vec<String>, _purpose: Purpose) -> Result<Embeddings> {
        let count = texts.len();
        let started = Instant::now();
        // all-MiniLM-L6-v2 embeds queries and documents alike; `purpose` matters to providers
        // with asymmetric models.
        let vectors = self.provider.embed(texts).await?;
        self.latency.observe(started.elapsed().as_secs_f64());
        self.texts.inc_by(count as u64);
        Ok(Embeddings {
            model: self.provider.model_id().to_string(),
            dimension: self.provider.dimension(),
            vectors,
        })
    }
}
