//! The test sandbox: all four engram services started in the test process on port-0 listeners
//! over real gRPC, with a temporary data directory, a private `redis-server` on a free port,
//! and the real local model (loaded once per test process and shared by every sandbox) — or a
//! [`FakeProvider`] standing in for an external embedding API.

pub mod fake_provider;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use engram_cli::cluster::{ClusterAddrs, ClusterConfig, ClusterListeners, LocalCluster};
use engram_cli::redis::{Persistence, RedisProcess};
use engram_embedding::{KeySource, ProviderConfig};
use engram_models::EmbeddingProvider;
use engram_proto::tonic::transport::Channel;
use engram_proto::v1::memory_service_client::MemoryServiceClient;
use engram_runtime::config::CommonArgs;
use tokio::sync::OnceCell;

pub use engram_proto::v1 as pb;
pub use fake_provider::{Behavior, ChatBehavior, FakeProvider};

/// A client of the public ChatService.
pub type ChatClient = engram_proto::v1::chat_service_client::ChatServiceClient<
    engram_proto::tonic::service::interceptor::InterceptedService<
        Channel,
        engram_runtime::rpc::BearerKey,
    >,
>;

/// A channel to an internal port carrying the cluster's credential.
pub type InternalChannel = engram_proto::tonic::service::interceptor::InterceptedService<
    Channel,
    engram_runtime::cluster_auth::Outgoing,
>;

/// The write behind a token the gateway (signing with `seal`) gave the tenant `default`.
pub fn open_token(
    seal: &engram_gateway::tokens::TokenSeal,
    public: &str,
) -> engram_domain::api::WriteToken {
    let tenant = engram_domain::model::TenantId::default_tenant();
    seal.open(&tenant, "write_token", public)
        .and_then(|internal| engram_domain::api::WriteToken::decode(&internal))
        .unwrap_or_else(|e| panic!("write token {public}: {e}"))
}

/// Helpers the benchmarks share.
pub mod bench {
    /// Microseconds as milliseconds with two decimals.
    pub fn ms(us: u64) -> String {
        format!("{:.2} ms", us as f64 / 1e3)
    }
}

/// A resilience policy for fake providers: short timeouts and backoff, a circuit that opens
/// after three failures in a row and stays open for a minute.
pub fn fast_policy() -> engram_resilience::Policy {
    engram_resilience::Policy {
        attempt_timeout: Duration::from_millis(500),
        deadline: Duration::from_secs(5),
        max_attempts: 3,
        min_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        breaker: engram_resilience::BreakerConfig {
            consecutive_failures: 3,
            cooldown: Duration::from_secs(60),
            ..engram_resilience::BreakerConfig::default()
        },
        max_concurrency: 4,
        bulkhead_wait: Duration::from_millis(100),
    }
}

static MODEL: OnceCell<Arc<dyn EmbeddingProvider>> = OnceCell::const_new();

/// The local model, loaded (and fetched if missing) once per test process.
pub async fn shared_model() -> Arc<dyn EmbeddingProvider> {
    MODEL
        .get_or_init(|| async {
            let dir = engram_embedding::Config::for_test()
                .model_dir()
                .cloned()
                .unwrap_or_else(engram_models::fetch::default_model_dir);
            let model: Arc<dyn EmbeddingProvider> =
                engram_embedding::load_local_model(dir, engram_models::LocalOptions::default())
                    .await
                    .unwrap_or_else(|e| panic!("the local model is needed by the tests: {e}"));
            model
        })
        .await
        .clone()
}

/// How to start a sandbox.
pub struct Options {
    /// Start a private Redis (append-only when `persistent`).
    pub redis: bool,
    pub persistent_redis: bool,
    /// Embedding settings; the provider is the shared local model unless `fake` is set.
    pub embedding: engram_embedding::Config,
    /// Embed with this fake external provider instead of the local model.
    pub fake: Option<FakeProvider>,
    /// The ingestion service's write log.
    pub write_log: engram_ingestion::LogArgs,
    /// The gateway's edge (authentication off by default).
    pub edge: engram_gateway::EdgeArgs,
    /// The chat model (none by default).
    pub chat: engram_models::ChatModelArgs,
    pub common: CommonArgs,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            redis: true,
            persistent_redis: false,
            embedding: engram_embedding::Config::for_test(),
            fake: None,
            write_log: engram_ingestion::LogArgs {
                claim_idle: Duration::from_secs(1),
                ..engram_ingestion::LogArgs::default()
            },
            edge: engram_gateway::EdgeArgs::default(),
            chat: engram_models::ChatModelArgs::default(),
            common: CommonArgs::for_test(),
        }
    }
}

impl Options {
    /// Answer Converse and extract facts with `fake` as an OpenAI-compatible chat model under
    /// `policy`, with a 300 ms idle timeout (embeddings stay the local model).
    pub fn with_chat(fake: &FakeProvider, policy: engram_resilience::Policy) -> Self {
        Self {
            chat: engram_models::ChatModelArgs {
                base_url: Some(fake.url()),
                model: "fake-chat".into(),
                idle_timeout: Duration::from_millis(300),
                policy: engram_models::chat::ChatPolicyArgs::from_policy(&policy),
                ..engram_models::ChatModelArgs::default()
            },
            ..Self::default()
        }
    }

    /// Embed through `fake` as an OpenAI-compatible provider with `policy`.
    pub fn with_fake(
        fake: &FakeProvider,
        dimension: usize,
        policy: engram_resilience::Policy,
    ) -> Self {
        let mut options = Self::default();
        options.embedding.provider = ProviderConfig::OpenAi {
            base_url: fake.url(),
            model: "fake-embedding".into(),
            key: KeySource::None,
            max_input_tokens: 8191,
            policy,
        };
        options.embedding.batch.max_batches_in_flight = policy.max_concurrency;
        options.common.vector_dimension = dimension;
        options.fake = Some(fake.clone());
        options
    }
}

pub struct Sandbox {
    pub addrs: ClusterAddrs,
    cluster: Option<LocalCluster>,
    redis: Option<RedisProcess>,
    data_dir: PathBuf,
    common: CommonArgs,
    chat: engram_models::ChatModelArgs,
    partitions: u32,
    _temp: Option<tempfile::TempDir>,
}

impl Sandbox {
    /// A cluster on a fresh temporary data directory, with a private Redis.
    pub async fn start() -> Self {
        Self::start_with(None, Options::default()).await
    }

    /// A cluster on `data_dir`, which outlives it (to test restarts).
    pub async fn start_in(data_dir: &Path) -> Self {
        Self::start_with(Some(data_dir), Options::default()).await
    }

    pub async fn start_with(data_dir: Option<&Path>, options: Options) -> Self {
        let temp = match data_dir {
            Some(_) => None,
            None => {
                Some(tempfile::tempdir().unwrap_or_else(|e| panic!("temporary directory: {e}")))
            }
        };
        let data_dir = data_dir
            .or(temp.as_ref().map(|t| t.path()))
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut common = options.common;
        // Kept in the data directory, as `engram up` keeps it: a restarted sandbox accepts the
        // write tokens its predecessor gave.
        std::fs::create_dir_all(&data_dir).unwrap_or_else(|e| panic!("the data directory: {e}"));
        common.cluster_secret = Some(
            engram_cli::cluster::stored_secret(&data_dir)
                .unwrap_or_else(|e| panic!("the cluster secret: {e}")),
        );
        let redis = if options.redis {
            let persistence = if options.persistent_redis {
                Persistence::AppendOnly
            } else {
                Persistence::None
            };
            let redis = RedisProcess::start(&data_dir.join("redis"), None, persistence)
                .await
                .unwrap_or_else(|e| panic!("starting redis-server: {e}"));
            common.redis_url = Some(redis.url().into());
            Some(redis)
        } else {
            None
        };
        let provider = match options.fake {
            Some(_) => None,
            None => Some(shared_model().await),
        };
        let listeners = ClusterListeners::ephemeral()
            .await
            .unwrap_or_else(|e| panic!("binding listeners: {e}"));
        let partitions = options.write_log.partitions;
        let config = ClusterConfig {
            retrieval: engram_retrieval::RetrievalArgs::in_dir(&data_dir),
            embedding: options.embedding,
            provider,
            write_log: options.write_log,
            edge: options.edge,
            chat: options.chat.clone(),
            common: common.clone(),
        };
        let mut cluster = LocalCluster::start(config, listeners)
            .unwrap_or_else(|e| panic!("starting the cluster: {e}"));
        cluster
            .wait_ready(Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("cluster not ready: {e}"));
        Self {
            addrs: cluster.addrs,
            cluster: Some(cluster),
            redis,
            data_dir,
            common,
            chat: options.chat,
            partitions,
            _temp: temp,
        }
    }

    /// Settings for more ingestion workers (or a whole ingestion service) in this sandbox,
    /// with the write log settings `log`.
    pub fn ingestion_config(&self, log: engram_ingestion::LogArgs) -> engram_ingestion::Config {
        engram_ingestion::Config {
            embedding_url: format!("http://{}", self.addrs.embedding),
            retrieval_url: format!("http://{}", self.addrs.retrieval),
            log,
            chat: self.chat.clone(),
            common: self.common.clone(),
        }
    }

    /// How the sandbox's services reach each other: clients made with these carry the
    /// cluster's credential.
    pub fn peers(&self) -> engram_runtime::rpc::Peers {
        engram_runtime::rpc::Peers::standalone(
            Duration::from_secs(30),
            self.common.cluster_secret.as_ref(),
        )
        .unwrap_or_else(|e| panic!("peers: {e}"))
    }

    /// A channel to one of the sandbox's internal ports whose calls carry the cluster's
    /// credential, for the generated clients.
    pub async fn internal_channel(&self, addr: SocketAddr) -> InternalChannel {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap_or_else(|e| panic!("address: {e}"))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        let outgoing =
            engram_runtime::cluster_auth::Outgoing::new(self.common.cluster_secret.as_ref())
                .unwrap_or_else(|e| panic!("credential: {e}"));
        engram_proto::tonic::service::interceptor::InterceptedService::new(channel, outgoing)
    }

    /// A client of the sandbox's retrieval service, as the other services have one.
    pub fn index(&self) -> engram_runtime::rpc::IndexClient {
        engram_runtime::rpc::IndexClient::connect(
            &self.peers(),
            "retrieval",
            &format!("http://{}", self.addrs.retrieval),
        )
        .unwrap_or_else(|e| panic!("connecting to retrieval: {e}"))
    }

    /// The sandbox's write log (for what only its Redis knows, such as dead letters).
    pub fn write_log(&self) -> engram_writelog::WriteLog {
        engram_writelog::WriteLog::connect("test", &self.redis_url().into(), self.partitions)
            .unwrap_or_else(|e| panic!("connecting to the write log: {e}"))
    }

    /// Wait up to `within` until the write behind `token` is indexed or has failed, asking
    /// the sandbox's ingestion service (`Ingestion.Status`), as the gateway does.
    pub async fn settled(
        &self,
        token: engram_domain::api::WriteToken,
        within: Duration,
    ) -> engram_domain::Result<engram_domain::api::WriteState> {
        use engram_domain::api::Ingestion as _;
        let ingestion = engram_runtime::rpc::IngestionClient::connect(
            &self.peers(),
            "ingestion",
            &format!("http://{}", self.addrs.ingestion),
        )?;
        engram_runtime::writes::settled(token, within, |t| ingestion.status(t)).await
    }

    /// What the gateway signs write tokens with.
    pub fn token_seal(&self) -> engram_gateway::tokens::TokenSeal {
        let secret = self.common.cluster_secret.as_ref();
        let secret =
            secret.unwrap_or_else(|| unreachable!("a sandbox always has a cluster secret"));
        engram_gateway::tokens::TokenSeal::new(secret)
    }

    /// The write behind a token the gateway gave the tenant `default`.
    pub fn write_token(&self, public: &str) -> engram_domain::api::WriteToken {
        open_token(&self.token_seal(), public)
    }

    /// The settings every service of the sandbox shares (its Redis, its cluster secret).
    pub fn common(&self) -> &CommonArgs {
        &self.common
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The sandbox's private Redis.
    pub fn redis(&mut self) -> &mut RedisProcess {
        self.redis
            .as_mut()
            .unwrap_or_else(|| panic!("this sandbox was started without redis"))
    }

    /// The URL of the sandbox's private Redis.
    pub fn redis_url(&self) -> String {
        self.redis
            .as_ref()
            .map(RedisProcess::url)
            .unwrap_or_else(|| panic!("this sandbox was started without redis"))
    }

    /// A client of the gateway's public API.
    pub async fn client(&self) -> engram_cli::Client {
        self.client_with_key(None).await
    }

    /// A client of the gateway's public API sending `key` as its API key.
    pub async fn client_with_key(&self, key: Option<&str>) -> engram_cli::Client {
        client_at(self.addrs.gateway, key).await
    }

    /// A client of the gateway's ChatService.
    pub async fn chat_client(&self) -> ChatClient {
        let channel = Channel::from_shared(format!("http://{}", self.addrs.gateway))
            .unwrap_or_else(|e| panic!("address: {e}"))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connecting to the gateway: {e}"));
        let key =
            engram_runtime::rpc::BearerKey::new("key", None).unwrap_or_else(|e| panic!("{e}"));
        engram_proto::v1::chat_service_client::ChatServiceClient::with_interceptor(channel, key)
    }

    /// Drain and stop every service, asserting they all stopped cleanly.
    pub async fn stop(mut self) {
        if let Some(cluster) = self.cluster.take() {
            cluster
                .shutdown()
                .await
                .unwrap_or_else(|e| panic!("cluster did not stop cleanly: {e}"));
        }
        if let Some(redis) = &mut self.redis {
            redis.stop().await;
        }
    }
}

/// `GET path` from an admin server: status and body.
/// Poll `probe` until it returns `Some`, for at most 30 s.
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    engram_telemetry::admin::fetch(addr, path, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// The value of the Prometheus sample whose line starts with `series` (name and labels).
pub async fn metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let (_, body) = http_get(admin, "/metrics").await;
    body.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// A service started beside a sandbox (another gateway, another retrieval replica), stopped
/// by [`Extra::stop`] with a drain like any service.
pub struct Extra {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<engram_domain::Result<()>>,
}

impl Extra {
    /// Serve with `serve(listeners, shutdown)` on fresh loopback ports.
    pub async fn start<F, Fut>(serve: F) -> Self
    where
        F: FnOnce(
            engram_runtime::server::Listeners,
            futures::future::BoxFuture<'static, ()>,
        ) -> Fut,
        Fut: Future<Output = engram_domain::Result<()>> + Send + 'static,
    {
        let listeners = engram_runtime::server::Listeners::ephemeral()
            .await
            .unwrap_or_else(|e| panic!("binding listeners: {e}"));
        let addr = listeners
            .grpc_addr()
            .unwrap_or_else(|e| panic!("listener address: {e}"));
        let admin = listeners.admin_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Box::pin(async move {
            let _ = stopped.await;
        });
        let task = tokio::spawn(serve(listeners, shutdown));
        Self {
            addr,
            admin,
            stop: Some(stop),
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drain and stop, asserting a clean stop.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task)
            .await
            .unwrap_or_else(|e| panic!("service task: {e}"))
            .unwrap_or_else(|e| panic!("service did not stop cleanly: {e}"));
    }
}

impl Sandbox {
    /// Another gateway in front of this sandbox's ingestion and of `retrieval_urls` (the
    /// sandbox's retrieval if `None`), admitting calls as `edge` says.
    pub async fn gateway(
        &self,
        edge: engram_gateway::EdgeArgs,
        retrieval_urls: Option<String>,
    ) -> Extra {
        let config = engram_gateway::Config {
            retrieval_url: retrieval_urls
                .unwrap_or_else(|| format!("http://{}", self.addrs.retrieval)),
            ingestion_url: format!("http://{}", self.addrs.ingestion),
            edge,
            chat: self.chat.clone(),
            common: self.common.clone(),
        };
        Extra::start(|listeners, shutdown| engram_gateway::serve(config, listeners, shutdown)).await
    }

    /// Another retrieval replica with its own index (in `dir`), embedding through this
    /// sandbox's embedding service.
    pub async fn retrieval_replica(&self, dir: &Path) -> Extra {
        let config = engram_retrieval::Config::new(
            engram_retrieval::RetrievalArgs::in_dir(dir),
            format!("http://{}", self.addrs.embedding),
            self.common.clone(),
        );
        Extra::start(|listeners, shutdown| engram_retrieval::serve(config, listeners, shutdown))
            .await
    }
}

/// A client of the public API at `addr` sending `key` as its API key.
pub async fn client_at(addr: SocketAddr, key: Option<&str>) -> engram_cli::Client {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap_or_else(|e| panic!("address: {e}"))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    let key = engram_runtime::rpc::BearerKey::new("key", key).unwrap_or_else(|e| panic!("{e}"));
    MemoryServiceClient::with_interceptor(channel, key)
}
