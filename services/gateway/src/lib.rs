//! The gateway: engram's only public surface, serving `engram.v1.MemoryService`.
//!
//! A request passes through the server layers (metrics, trace), then the [`edge`] (load
//! shedding, API key, rate limit, deadline), then the handler here: the tenant is the one the
//! caller's key names, the request is validated and bounded (`engram_domain::validate`), and it
//! is routed — Recall, Get and List to retrieval, Remember, Update and Forget to ingestion —
//! over balanced channels to every replica (`engram_runtime::peers`).

mod auth;
pub mod bounds;
pub mod context;
pub mod conversation;
mod edge;
pub mod tokens;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use engram_cache::{History, Redis, RedisConfig};
use engram_domain::api::{Index, Ingestion, WriteToken};
use engram_domain::model::TenantId;
use engram_domain::parse_duration;
use engram_domain::{Error, Limits, Result, convert, validate};
use engram_models::{ChatModel, ChatModelArgs};
use engram_proto::tonic::codec::CompressionEncoding;
use engram_proto::tonic::service::Routes;
use engram_proto::tonic::{Request, Response, Status};
use engram_proto::v1 as pb;
use engram_proto::v1::chat_service_server::ChatServiceServer;
use engram_proto::v1::memory_service_server::{MemoryService, MemoryServiceServer};
use engram_runtime::config::{CommonArgs, IngestionUrl, RetrievalUrl};
use engram_runtime::rpc;
use engram_runtime::server::{Listeners, ServiceRuntime};

use crate::bounds::ByMethod;
use crate::context::ContextBuilder;
use crate::conversation::{Chat, ChatEndpoint};
use crate::tokens::TokenSeal;

pub use auth::{Caller, KeySource, KeyStore, Keys, Rate, Role, new_key};
pub use edge::{Deadlines, Edge, EdgeConfig};

pub const SERVICE_NAME: &str = "gateway";

/// Largest request (a Remember batch) the public API accepts by default. A batch of
/// full-size memories (about 62 KiB each at the limits) fits 270 to a request; other methods
/// have their own, smaller bounds (see [`bounds`]).
pub const MAX_PUBLIC_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// How long past `ENGRAM_CONVERSE_MAX_DURATION` a stream whose client stopped reading keeps its
/// place in flight.
const STREAM_HOLD_GRACE: Duration = Duration::from_secs(10);

/// Largest response: what the server builds from stored memories (a Get of 1,000, a List
/// page) rather than what a caller sends, so it keeps the earlier, larger bound.
pub const MAX_PUBLIC_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

engram_runtime::listen_args!(Listen, "gateway", "GATEWAY", "50051", "9091");

/// Where the gateway finds the services it routes to (its own binary only; `engram up` wires
/// these).
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayPeers {
    #[command(flatten)]
    pub retrieval: RetrievalUrl,
    #[command(flatten)]
    pub ingestion: IngestionUrl,
}

/// The gateway's binary: where its peers are, and its edge.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub peers: GatewayPeers,
    #[command(flatten)]
    pub edge: EdgeArgs,
    #[command(flatten)]
    pub chat: ChatModelArgs,
}

/// Authentication is on unless turned off, and then needs keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Every call needs an API key.
    Keys,
    /// No authentication: every caller is the tenant `default`. Only for a trusted network.
    Off,
}

/// How the gateway admits public calls (also flattened into `engram up`).
#[derive(Debug, Clone, clap::Args)]
pub struct EdgeArgs {
    /// `keys` (every call needs an API key) or `off`. Unset: `keys` when keys are configured;
    /// otherwise the gateway binary refuses to start, and `engram up` runs with it off.
    #[arg(long = "auth", env = "ENGRAM_AUTH", value_enum)]
    pub auth: Option<AuthMode>,
    /// API key file (TOML; see the README), reloaded when it changes and on SIGHUP.
    #[arg(long = "api-keys-file", env = "ENGRAM_API_KEYS_FILE", value_parser = engram_domain::absolute_path)]
    pub api_keys_file: Option<PathBuf>,
    /// API keys inline, in the key file's TOML (read once at start-up).
    #[arg(long = "api-keys", env = "ENGRAM_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,
    /// How often the key file is checked for changes.
    #[arg(long = "api-keys-reload", env = "ENGRAM_API_KEYS_RELOAD", default_value = "5s", value_parser = parse_duration)]
    pub api_keys_reload: Duration,
    /// Calls per second a key may make unless its entry sets `rate` (0: unlimited).
    #[arg(
        long = "rate-limit",
        env = "ENGRAM_RATE_LIMIT",
        default_value_t = 1000.0
    )]
    pub rate_limit: f64,
    /// Burst a key may make unless its entry sets `burst` (default: twice the rate).
    #[arg(long = "rate-burst", env = "ENGRAM_RATE_BURST")]
    pub rate_burst: Option<f64>,
    /// Most public calls running at once; beyond it calls are refused at once with
    /// RESOURCE_EXHAUSTED instead of queueing.
    #[arg(
        long = "max-in-flight",
        env = "ENGRAM_MAX_IN_FLIGHT",
        default_value_t = 512
    )]
    pub max_in_flight: usize,
    /// Deadline of a call whose client sends none (or a later one).
    #[arg(long = "default-deadline", env = "ENGRAM_DEFAULT_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    pub default_deadline: Duration,
    /// Default deadlines by method, e.g. `Recall=2s,Remember=5s`.
    #[arg(
        long = "rpc-deadlines",
        env = "ENGRAM_RPC_DEADLINES",
        default_value = ""
    )]
    pub rpc_deadlines: String,
    /// Largest public request (a Remember batch), in bytes; every other method has a smaller
    /// bound of its own (a Get: its ids), capped by this. Responses may be up to 64 MiB, or
    /// this if larger.
    #[arg(long = "max-message-bytes", env = "ENGRAM_MAX_MESSAGE_BYTES", default_value_t = MAX_PUBLIC_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Bytes of requests the gateway holds at once, across calls: a call holds its bytes as
    /// they arrive (and what a compressed one inflates to) until its handler answers; one whose
    /// bytes do not fit, or would take its tenant past all but one largest request's worth, is
    /// refused at once (RESOURCE_EXHAUSTED). At least twice ENGRAM_MAX_MESSAGE_BYTES and 64 KiB.
    #[arg(long = "max-request-bytes", env = "ENGRAM_MAX_REQUEST_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_request_bytes: usize,
    /// Converse streams one tenant may have open at once; more are refused
    /// (RESOURCE_EXHAUSTED), so one tenant cannot hold every chat slot.
    #[arg(
        long = "converse-max-streams",
        env = "ENGRAM_CONVERSE_MAX_STREAMS",
        default_value_t = 4
    )]
    pub converse_max_streams: usize,
    /// Longest a Converse stream may last, model answer included; then it ends with a
    /// fallback (DEADLINE_EXCEEDED).
    #[arg(long = "converse-max-duration", env = "ENGRAM_CONVERSE_MAX_DURATION", default_value = "5m", value_parser = parse_duration)]
    pub converse_max_duration: Duration,
    /// Memories less relevant than this (Hit.relevance, 0..1) are left out of BuildContext and
    /// Converse contexts, so a question about something never said gets no memories; 0 keeps
    /// every recalled memory.
    #[arg(
        long = "context-min-relevance",
        env = "ENGRAM_CONTEXT_MIN_RELEVANCE",
        default_value_t = context::MIN_RELEVANCE
    )]
    pub context_min_relevance: f32,
    /// Continue the traces public callers send (`traceparent`), sampled as they say. Off: each
    /// call starts a trace of its own, sampled by ENGRAM_TRACE_SAMPLE_RATIO and linked to the
    /// caller's, so a caller cannot have every call traced. Turn on when the callers are your
    /// own services and share your tracing backend.
    #[arg(
        long = "trace-trust-callers",
        env = "ENGRAM_TRACE_TRUST_CALLERS",
        default_value_t = false
    )]
    pub trust_caller_traces: bool,
}

impl Default for EdgeArgs {
    /// Authentication off, the documented defaults otherwise (tests, `engram up`).
    fn default() -> Self {
        Self {
            auth: Some(AuthMode::Off),
            ..engram_runtime::config::defaults()
        }
    }
}

const METHODS: [&str; 8] = [
    "Remember",
    "Recall",
    "Get",
    "List",
    "Update",
    "Forget",
    "BuildContext",
    "Converse",
];

impl engram_runtime::server::CheckArgs for GatewayArgs {
    fn check(&self) -> Result<()> {
        self.edge.check()?;
        self.chat.check().map_err(Error::from)
    }
}

impl EdgeArgs {
    /// Every setting but the keys themselves (which [`Self::build`] loads).
    pub fn check(&self) -> Result<()> {
        self.limits()?;
        self.deadlines()?;
        Ok(())
    }

    /// `engram up`'s reading: no keys and no `ENGRAM_AUTH` means authentication off.
    pub fn off_unless_configured(mut self) -> Self {
        if self.auth.is_none() && self.api_keys_file.is_none() && self.api_keys.is_none() {
            self.auth = Some(AuthMode::Off);
        }
        self
    }

    fn deadlines(&self) -> Result<Deadlines> {
        let bad = |why: String| Error::invalid("ENGRAM_RPC_DEADLINES", why);
        if self.default_deadline.is_zero() {
            return Err(Error::invalid(
                "ENGRAM_DEFAULT_DEADLINE",
                "must be greater than zero",
            ));
        }
        let mut by_method = std::collections::HashMap::new();
        for pair in self
            .rpc_deadlines
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let (method, value) = pair
                .split_once('=')
                .ok_or_else(|| bad(format!("{pair:?} is not Method=duration")))?;
            let method = method.trim();
            if !METHODS.contains(&method) {
                return Err(bad(format!(
                    "unknown method {method:?}; known: {}",
                    METHODS.join(", ")
                )));
            }
            let duration = parse_duration(value.trim()).map_err(bad)?;
            if duration.is_zero() {
                return Err(bad(format!("{method}: must be greater than zero")));
            }
            by_method.insert(method.to_string(), duration);
        }
        Ok(Deadlines {
            default: self.default_deadline,
            by_method,
        })
    }

    /// The rate and in-flight limits, checked.
    fn limits(&self) -> Result<Rate> {
        if self.rate_limit.is_nan() || self.rate_limit < 0.0 {
            return Err(Error::invalid(
                "ENGRAM_RATE_LIMIT",
                "must be 0 (unlimited) or more",
            ));
        }
        let burst = self.rate_burst.unwrap_or((self.rate_limit * 2.0).max(1.0));
        if burst.is_nan() || burst < 1.0 {
            return Err(Error::invalid("ENGRAM_RATE_BURST", "must be at least 1"));
        }
        if self.max_in_flight == 0 {
            return Err(Error::invalid("ENGRAM_MAX_IN_FLIGHT", "must be at least 1"));
        }
        if self.max_request_bytes < bounds::min_request_bytes(self.max_message_bytes) {
            return Err(Error::invalid(
                "ENGRAM_MAX_REQUEST_BYTES",
                format!(
                    "must be at least {} (twice ENGRAM_MAX_MESSAGE_BYTES and 64 KiB: a largest compressed request holds its bytes and what they inflate to)",
                    bounds::min_request_bytes(self.max_message_bytes)
                ),
            ));
        }
        if self.converse_max_streams == 0 {
            return Err(Error::invalid(
                "ENGRAM_CONVERSE_MAX_STREAMS",
                "must be at least 1",
            ));
        }
        if !(0.0..=1.0).contains(&self.context_min_relevance) {
            return Err(Error::invalid(
                "ENGRAM_CONTEXT_MIN_RELEVANCE",
                "must be between 0 and 1",
            ));
        }
        if self.converse_max_duration.is_zero() {
            return Err(Error::invalid(
                "ENGRAM_CONVERSE_MAX_DURATION",
                "must be more than 0",
            ));
        }
        if self.api_keys_file.is_some() && self.api_keys.is_some() {
            return Err(Error::invalid(
                "ENGRAM_API_KEYS",
                "set either ENGRAM_API_KEYS_FILE or ENGRAM_API_KEYS, not both",
            ));
        }
        if self.auth != Some(AuthMode::Off)
            && self.api_keys_file.is_none()
            && self.api_keys.is_none()
        {
            return Err(Error::invalid(
                "ENGRAM_API_KEYS_FILE",
                "authentication is on and no API keys are configured: set ENGRAM_API_KEYS_FILE (or ENGRAM_API_KEYS), or ENGRAM_AUTH=off on a trusted network",
            ));
        }
        Ok(Rate {
            per_second: self.rate_limit,
            burst,
        })
    }

    /// Check the settings and load the keys.
    pub fn build(&self) -> Result<EdgeConfig> {
        let rate = self.limits()?;
        // `limits` refused both sources at once, and none with authentication on.
        let source = match (&self.api_keys_file, &self.api_keys) {
            (Some(path), _) => Some(KeySource::File(path.clone())),
            (None, Some(text)) => Some(KeySource::Inline(text.clone())),
            (None, None) => None,
        };
        let keys = match (self.auth, source) {
            (Some(AuthMode::Off), _) | (_, None) => None,
            (_, Some(source)) => {
                let store = Arc::new(KeyStore::load(source, rate)?);
                if store.keys().is_empty() {
                    tracing::warn!("the API key file lists no keys: every call will be refused");
                }
                store.watch(self.api_keys_reload);
                Some(store)
            }
        };
        Ok(EdgeConfig {
            keys,
            // Rate limits are per key: with authentication off there are none.
            anonymous_rate: Rate {
                per_second: 0.0,
                burst: 1.0,
            },
            max_in_flight: self.max_in_flight,
            deadlines: self.deadlines()?,
            // A stream's place in flight is given back at its end or, if its client stops
            // reading, a grace period after the stream's own limit.
            stream_hold: self.converse_max_duration + STREAM_HOLD_GRACE,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub retrieval_url: String,
    pub ingestion_url: String,
    pub edge: EdgeArgs,
    /// The chat model Converse answers with, and the tokenizer budgets are counted with.
    pub chat: ChatModelArgs,
    pub common: CommonArgs,
}

impl Config {
    pub fn from_args(args: GatewayArgs, common: CommonArgs) -> Self {
        Self {
            retrieval_url: args.peers.retrieval.retrieval_url,
            ingestion_url: args.peers.ingestion.ingestion_url,
            edge: args.edge,
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
    let edge = config.edge.build()?;
    let mut runtime = ServiceRuntime::start(SERVICE_NAME, listeners.admin);
    if !config.edge.trust_caller_traces {
        runtime.link_caller_traces();
    }
    let peers = runtime.peers(&config.common)?;
    let index: Arc<dyn Index> = Arc::new(rpc::IndexClient::connect(
        &peers,
        engram_domain::settings::env::RETRIEVAL_URL,
        &config.retrieval_url,
    )?);
    let ingestion: Arc<dyn Ingestion> = Arc::new(rpc::IngestionClient::connect(
        &peers,
        engram_domain::settings::env::INGESTION_URL,
        &config.ingestion_url,
    )?);
    match &edge.keys {
        Some(store) => tracing::info!(
            keys = store.keys().len(),
            "authentication on: every call needs an API key"
        ),
        None => tracing::warn!(
            "AUTHENTICATION IS OFF: every caller is the tenant `default` with every right; do not expose this gateway beyond a trusted network"
        ),
    }
    let redis = match &config.common.redis_url {
        Some(url) => Some(Redis::connect(
            RedisConfig::new(url.clone()),
            runtime.metrics(),
        )?),
        None => None,
    };
    let tokens = config.chat.token_counter().map_err(Error::from)?;
    let model = match config.chat.config().map_err(Error::from)? {
        Some(chat) => {
            let outbound = engram_resilience::OutboundMetrics::new(runtime.metrics());
            let model = ChatModel::new(chat, &outbound).map_err(Error::from)?;
            tracing::info!(
                model = model.model(),
                tokenizer = tokens.name(),
                "Converse answers with a chat model"
            );
            Some(Arc::new(model))
        }
        None => {
            tracing::info!(
                "no chat model (ENGRAM_CHAT_BASE_URL): Converse answers with a fallback event carrying the context"
            );
            None
        }
    };
    let context = Arc::new(ContextBuilder {
        index: Arc::clone(&index),
        history: History::new(redis, config.common.history_ttl),
        tokens,
        min_relevance: config.edge.context_min_relevance,
    });
    let chat = Arc::new(Chat {
        context: Arc::clone(&context),
        ingestion: Arc::clone(&ingestion),
        model,
        privacy: config.common.privacy.policy()?,
        limits: config.common.limits.clone(),
        metrics: conversation::ConverseMetrics::new(runtime.metrics()),
        streams: conversation::TenantStreams::new(config.edge.converse_max_streams),
        max_duration: config.edge.converse_max_duration,
        tasks: runtime.tasks().clone(),
    });
    let secret = (config.common.cluster_secret.clone()).ok_or_else(|| {
        Error::invalid(
            engram_domain::settings::env::CLUSTER_SECRET,
            "not set: the gateway signs write tokens with it",
        )
    })?;
    let gateway = Gateway {
        index,
        ingestion,
        context,
        limits: config.common.limits.clone(),
        tokens: TokenSeal::new(&secret),
    };
    let max = config.edge.max_message_bytes;
    let method_limits = bounds::method_limits(&config.common.limits, max);
    let other_methods = bounds::MAX_SMALL_MESSAGE_BYTES.min(max);
    let max_response = MAX_PUBLIC_RESPONSE_BYTES.max(max);
    // Every public service: its method's decoding bound, the response bound and compression
    // (the generated servers share these builder methods but no trait).
    macro_rules! public {
        ($server:expr, $limit:expr) => {
            $server
                .max_decoding_message_size($limit)
                .max_encoding_message_size(max_response)
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Zstd)
                .send_compressed(CompressionEncoding::Gzip)
                .send_compressed(CompressionEncoding::Zstd)
        };
    }
    let gateway = Arc::new(gateway);
    let request_bytes = bounds::RequestBytes::new(
        config.edge.max_request_bytes,
        config.edge.max_message_bytes,
        runtime.metrics(),
    );
    let service = ByMethod::checked(
        &method_limits,
        other_methods,
        |limit| public!(MemoryServiceServer::from_arc(Arc::clone(&gateway)), limit),
        bounds::wire_checks(),
        config.common.limits.clone(),
        request_bytes.clone(),
    );
    let chat = Arc::new(ChatEndpoint(chat));
    let chat_service = ByMethod::new(
        &method_limits,
        other_methods,
        |limit| public!(ChatServiceServer::from_arc(Arc::clone(&chat)), limit),
        request_bytes,
    );
    let edge = Edge::new(service, edge, runtime.metrics());
    let chat_edge = edge.also(chat_service);
    let routes = Routes::new(edge).add_service(chat_edge);
    runtime
        .serve(
            routes,
            &[
                engram_proto::v1::memory_service_server::SERVICE_NAME,
                engram_proto::v1::chat_service_server::SERVICE_NAME,
            ],
            listeners.grpc,
            &config.common,
            shutdown,
        )
        .await
}

/// Routes the public API onto the internal services.
pub struct Gateway {
    index: Arc<dyn Index>,
    ingestion: Arc<dyn Ingestion>,
    context: Arc<ContextBuilder>,
    limits: Limits,
    /// Write tokens bound to the tenant they were issued to.
    tokens: TokenSeal,
}

/// The tenant a request acts for: always the one its credential names (the edge put it
/// there); nothing in a request body can choose another.
pub(crate) fn caller_tenant<T>(request: &Request<T>) -> Result<TenantId, Status> {
    request
        .extensions()
        .get::<Caller>()
        .map(|caller| caller.tenant.clone())
        .ok_or_else(|| {
            Status::internal("the call reached its handler without passing the gateway's edge")
        })
}

/// The longest a read waits for the write named by its `after_write_token` (less if the
/// caller's deadline comes sooner).
const READ_YOUR_WRITES_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Gateway {
    fn tenant<T>(&self, request: &Request<T>) -> Result<TenantId, Status> {
        caller_tenant(request)
    }

    /// The internal form of a write token a caller sent back, checked to be one this cluster
    /// issued to `tenant` before anything looks it up.
    fn open(&self, tenant: &TenantId, token: &str) -> Result<String, Status> {
        Ok(self.tokens.open(tenant, "after_write_token", token)?)
    }

    /// Read-your-writes: wait until the write behind a read's `after_write_token` is indexed
    /// (asking ingestion, which owns the write log), then read without it.
    async fn after(&self, token: &mut Option<WriteToken>) -> Result<(), Status> {
        let Some(token) = token.take() else {
            return Ok(());
        };
        let budget = engram_runtime::deadline::answerable_within(READ_YOUR_WRITES_WAIT);
        engram_runtime::writes::indexed(token, budget, |t| self.ingestion.status(t)).await?;
        Ok(())
    }
}

#[async_trait]
impl MemoryService for Gateway {
    async fn remember(
        &self,
        request: Request<pb::RememberRequest>,
    ) -> Result<Response<pb::RememberResponse>, Status> {
        let tenant = self.tenant(&request)?;
        let batch = validate::remember(request.into_inner(), &self.limits)?;
        let outcome = self.ingestion.submit(&tenant, batch).await?;
        let mut response = convert::remember_response(&outcome);
        response.write_token = self.tokens.seal(&tenant, &response.write_token);
        Ok(Response::new(response))
    }

    async fn recall(
        &self,
        request: Request<pb::RecallRequest>,
    ) -> Result<Response<pb::RecallResponse>, Status> {
        let tenant = self.tenant(&request)?;
        let mut request = request.into_inner();
        request.after_write_token = self.open(&tenant, &request.after_write_token)?;
        let mut query = validate::recall(request, &self.limits)?;
        self.after(&mut query.after_write_token).await?;
        let result = self.index.search(&tenant, query).await?;
        Ok(Response::new(convert::recall_response(&result)))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let tenant = self.tenant(&request)?;
        let mut request = request.into_inner();
        request.after_write_token = self.open(&tenant, &request.after_write_token)?;
        let mut query = validate::get(request, &self.limits)?;
        self.after(&mut query.after_write_token).await?;
        let result = self.index.get(&tenant, query).await?;
        Ok(Response::new(convert::get_response(&result)))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let tenant = self.tenant(&request)?;
        let mut request = request.into_inner();
        request.after_write_token = self.open(&tenant, &request.after_write_token)?;
        let mut query = validate::list(request, &self.limits)?;
        self.after(&mut query.after_write_token).await?;
        let page = self.index.list(&tenant, query).await?;
        Ok(Response::new(convert::list_response(&page)))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateRequest>,
    ) -> Result<Response<pb::UpdateResponse>, Status> {
        let tenant = self.tenant(&request)?;
        let command = validate::update(request.into_inner(), &self.limits)?;
        let outcome = self.ingestion.update(&tenant, command).await?;
        let mut response = convert::update_response(&outcome);
        response.write_token = self.tokens.seal(&tenant, &response.write_token);
        Ok(Response::new(response))
    }

    async fn forget(
        &self,
        request: Request<pb::ForgetRequest>,
    ) -> Result<Response<pb::ForgetResponse>, Status> {
        let tenant = self.tenant(&request)?;
        let target = validate::forget(request.into_inner(), &self.limits)?;
        let outcome = self.ingestion.forget(&tenant, target).await?;
        let mut response = convert::forget_response(&outcome);
        response.write_token = self.tokens.seal(&tenant, &response.write_token);
        Ok(Response::new(response))
    }

    async fn build_context(
        &self,
        request: Request<pb::BuildContextRequest>,
    ) -> Result<Response<pb::BuildContextResponse>, Status> {
        let tenant = self.tenant(&request)?;
        let wanted = validate::build_context(request.into_inner(), &self.limits)?;
        let gathered = self.context.gather(&tenant, &wanted).await?;
        let tokens = self.context.tokens;
        let packed = context::pack(
            tokens,
            gathered.hits,
            gathered.turns,
            wanted.token_budget as usize,
        );
        Ok(Response::new(pb::BuildContextResponse {
            memories: packed.hits.iter().map(convert::hit).collect(),
            turns: packed.turns.iter().map(convert::memory).collect(),
            token_count: packed.token_count as u32,
            tokenizer: tokens.name().to_string(),
            dropped: packed.dropped,
            context: packed.text,
        }))
    }
}
