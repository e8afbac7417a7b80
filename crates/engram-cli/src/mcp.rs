//! `engram mcp`: engram's memory as Model Context Protocol tools, for agents and assistants.
//!
//! Over stdio (`engram mcp`, launched by the agent) or streamable HTTP (`engram mcp --listen`,
//! or `ENGRAM_MCP_LISTEN` with `engram up`). Every tool is a call to the gateway's public API
//! with the caller's API key — `ENGRAM_API_KEY` over stdio, the HTTP request's bearer token over
//! HTTP — so tenancy, roles and rate limits stay the gateway's. A refused call is a tool error
//! naming the gRPC code and the field.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use engram_proto::tonic::service::interceptor::InterceptedService;
use engram_proto::tonic::transport::{Channel, Endpoint};
use engram_proto::tonic::{Code, Status};
use engram_proto::v1 as pb;
use engram_proto::v1::memory_service_client::MemoryServiceClient;
use engram_runtime::rpc::BearerKey;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::service::RequestContext;
use rmcp::{RoleServer, ServerHandler, ServiceExt as _, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use tonic_types::StatusExt as _;

use crate::output;

/// Largest MCP request body over HTTP: a `remember` of the largest memory (32 KiB of text)
/// with its metadata fits many times over.
const MAX_HTTP_BODY_BYTES: usize = 1 << 20;
/// Largest gateway response the server decodes (the gateway's own response bound): a page of
/// 100 memories with their full metadata fits.
const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// Most ids one `forget` names (each is looked up first, to check whose it is).
const MAX_FORGET_IDS: usize = 100;
/// How long `engram up` waits for MCP calls in flight when it stops.
pub const DRAIN: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, clap::Args)]
pub struct McpArgs {
    /// Address of the gateway the tools call.
    #[arg(long, env = "ENGRAM_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// The user whose memory the tools read and write. Unset: every tool call names its user.
    #[arg(long, short = 'u', env = "ENGRAM_MCP_USER")]
    user: Option<String>,
    /// The agent within the user's scope that writes through this server (optional).
    #[arg(long, env = "ENGRAM_MCP_AGENT", default_value = "")]
    agent: String,
    /// API key sent to the gateway over stdio (over HTTP each caller's bearer token is sent).
    #[arg(long = "api-key", env = "ENGRAM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Serve streamable HTTP at this address (path /mcp) instead of stdio.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Over HTTP beyond loopback: the `Host` names (or `host:port`) requests may carry, comma
    /// separated (DNS-rebinding protection). Loopback names are always allowed.
    #[arg(
        long = "allowed-hosts",
        env = "ENGRAM_MCP_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    allowed_hosts: Vec<String>,
}

impl std::fmt::Debug for McpArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpArgs")
            .field("addr", &self.addr)
            .field("user", &self.user)
            .field("agent", &self.agent)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("listen", &self.listen)
            .field("allowed_hosts", &self.allowed_hosts)
            .finish()
    }
}

/// Where a call's API key comes from.
#[derive(Clone)]
enum Credentials {
    /// One key for every call (stdio: the agent's process is one caller).
    Fixed(BearerKey),
    /// The HTTP request's `Authorization: Bearer <key>`, passed on as the engram key.
    Bearer,
}

/// The tools, bound to a gateway.
#[derive(Clone)]
pub struct Memory {
    channel: Channel,
    user: Option<Arc<str>>,
    agent: Arc<str>,
    credentials: Credentials,
    tool_router: ToolRouter<Self>,
}

type Client = MemoryServiceClient<InterceptedService<Channel, BearerKey>>;

/// A tool call that could not be made or was refused: what the tool answers.
struct Refusal(Box<CallToolResult>);

impl Refusal {
    fn new(code: &str, field: Option<&str>, message: &str) -> Self {
        let text = match field {
            Some(field) => format!("{code} ({field}): {message}"),
            None => format!("{code}: {message}"),
        };
        let mut result = CallToolResult::error(vec![ContentBlock::text(text)]);
        result.structured_content = Some(json!({"code": code, "field": field, "message": message}));
        Self(Box::new(result))
    }

    /// An argument this server checks itself, named as the tool's input names it.
    fn invalid(field: &str, message: &str) -> Self {
        Self::new("INVALID_ARGUMENT", Some(field), message)
    }
}

impl From<Status> for Refusal {
    fn from(status: Status) -> Self {
        let code = engram_telemetry::status_name(status.code());
        let field = status
            .get_details_bad_request()
            .and_then(|bad| bad.field_violations.first().map(|v| v.field.clone()));
        let mut message = status.message().to_string();
        if let Some(field) = &field {
            // The gateway's message starts with its field's path; the refusal names the
            // tool's argument instead.
            if let Some(rest) = message.strip_prefix(&format!("{field}: ")) {
                message = rest.to_string();
            }
        }
        if status.code() == Code::Unavailable {
            message.push_str(" (is the cluster running?)");
        }
        let argument = field.as_deref().map(argument_of);
        Self::new(&code, argument.as_deref(), &message)
    }
}

/// The tool argument a gateway field path stands for (`memories[0].text` is `text`,
/// `scope.session_id` is `session`, `min_score` is `min_relevance`, ...).
fn argument_of(field: &str) -> String {
    let field = field.strip_prefix("memories[0].").unwrap_or(field);
    let field = field.strip_prefix("filter.").unwrap_or(field);
    let field = field.strip_prefix("ids.").unwrap_or(field);
    match field {
        "scope.user_id" => "user".into(),
        "scope.session_id" => "session".into(),
        "scope.agent_id" => "agent".into(),
        "min_score" => "min_relevance".into(),
        "memories" => "text".into(),
        other => other.to_string(),
    }
}

/// A refusal is the tool's answer, marked as an error (`isError`), not a protocol error.
impl rmcp::handler::server::tool::IntoCallToolResult for Refusal {
    fn into_call_tool_result(self) -> Result<rmcp::model::CallToolResponse, rmcp::ErrorData> {
        Ok((*self.0).into())
    }
}

#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum KindArg {
    Fact,
    Message,
    Document,
}

impl From<KindArg> for pb::Kind {
    fn from(kind: KindArg) -> Self {
        match kind {
            KindArg::Fact => Self::Fact,
            KindArg::Message => Self::Message,
            KindArg::Document => Self::Document,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum ModeArg {
    Hybrid,
    Semantic,
    Keyword,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RememberArgs {
    /// What to remember, as a self-contained statement ("Alice adopted a cat named Miso"), a
    /// message of a conversation, or a passage of a document. Up to 32 KiB of text.
    text: String,
    /// `fact` (default): something true about the user; `message`: a turn of a conversation;
    /// `document`: a passage of a document.
    #[serde(default)]
    kind: Option<KindArg>,
    /// For a message: who said it ("user", "assistant", a name).
    #[serde(default)]
    role: Option<String>,
    /// Labels to filter by later (recall's `tags_any`, `tags_all`).
    #[serde(default)]
    tags: Vec<String>,
    /// Free-form string key-value pairs stored with the memory.
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    /// The conversation session this belongs to, if any.
    #[serde(default)]
    session: Option<String>,
    /// The user whose memory this is. Only when the server was started without `--user`.
    #[serde(default)]
    user: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RecallArgs {
    /// What to look for, in natural language ("what pet does the user have?").
    query: String,
    /// How many memories to return, 1..100 (default 5).
    #[serde(default)]
    top_k: Option<u32>,
    /// `hybrid` (default: meaning and words), `semantic` (meaning only) or `keyword` (words
    /// only, BM25).
    #[serde(default)]
    mode: Option<ModeArg>,
    /// Only memories of this session (default: every session of the user).
    #[serde(default)]
    session: Option<String>,
    /// Only memories of these kinds.
    #[serde(default)]
    kinds: Vec<KindArg>,
    /// Only memories with at least one of these tags.
    #[serde(default)]
    tags_any: Vec<String>,
    /// Only memories with all of these tags.
    #[serde(default)]
    tags_all: Vec<String>,
    /// Leave out memories whose relevance (0..1) is below this.
    #[serde(default)]
    min_relevance: Option<f32>,
    /// The user whose memory to search. Only when the server was started without `--user`.
    #[serde(default)]
    user: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct BuildContextArgs {
    /// What the context is for, usually the user's latest message.
    query: String,
    /// Most tokens the context may take, 1..32768 (default 1024).
    #[serde(default)]
    token_budget: Option<u32>,
    /// Most memories to include, 1..100 (default 20).
    #[serde(default)]
    max_memories: Option<u32>,
    /// With a session, its recent turns are included too.
    #[serde(default)]
    session: Option<String>,
    /// The user whose memory to use. Only when the server was started without `--user`.
    #[serde(default)]
    user: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ListArgs {
    /// Only memories of this session (default: every session of the user).
    #[serde(default)]
    session: Option<String>,
    /// Only memories of these kinds.
    #[serde(default)]
    kinds: Vec<KindArg>,
    /// Memories per page, 1..100 (default 20).
    #[serde(default)]
    page_size: Option<u32>,
    /// `next_page_token` of the previous page; absent for the first page.
    #[serde(default)]
    page_token: Option<String>,
    /// The user whose memories to list. Only when the server was started without `--user`.
    #[serde(default)]
    user: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ForgetArgs {
    /// Ids of the memories to remove (from remember, recall or list).
    #[serde(default)]
    ids: Vec<String>,
    /// Remove every memory of the user (or of `session`, if given) instead of `ids`. Cannot be
    /// undone: only when the user asked to forget everything.
    #[serde(default)]
    all_in_scope: bool,
    /// With `all_in_scope`: only this session's memories.
    #[serde(default)]
    session: Option<String>,
    /// The user whose memories to remove. Only when the server was started without `--user`.
    #[serde(default)]
    user: Option<String>,
}

const MAX_LIST_PAGE: u32 = 100;

#[tool_router]
impl Memory {
    /// Tools for the gateway at `addr`.
    fn new(args: &McpArgs, credentials: Credentials) -> Result<Self, String> {
        let endpoint = Endpoint::from_shared(args.addr.clone())
            .map_err(|e| format!("--addr {:?}: {e}", args.addr))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(CALL_TIMEOUT);
        Ok(Self {
            channel: endpoint.connect_lazy(),
            user: args
                .user
                .as_deref()
                .filter(|u| !u.is_empty())
                .map(Arc::from),
            agent: Arc::from(args.agent.as_str()),
            credentials,
            tool_router: Self::tool_router(),
        })
    }

    fn client(&self, context: &RequestContext<RoleServer>) -> Result<Client, Refusal> {
        let key = match &self.credentials {
            Credentials::Fixed(key) => key.clone(),
            Credentials::Bearer => {
                let header = context
                    .extensions
                    .get::<http::request::Parts>()
                    .and_then(|parts| parts.headers.get(http::header::AUTHORIZATION));
                match header {
                    None => BearerKey::default(),
                    Some(value) => {
                        // The scheme is case-insensitive (RFC 9110).
                        let token = value
                            .to_str()
                            .ok()
                            .and_then(|v| v.split_once(' '))
                            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                            .map(|(_, token)| token.trim())
                            .ok_or_else(|| {
                                Refusal::new(
                                    "UNAUTHENTICATED",
                                    None,
                                    "the Authorization header must be `Bearer <engram API key>`",
                                )
                            })?;
                        BearerKey::new("Authorization", Some(token))
                            .map_err(|e| Refusal::new("UNAUTHENTICATED", None, &e.to_string()))?
                    }
                }
            }
        };
        Ok(
            MemoryServiceClient::with_interceptor(self.channel.clone(), key)
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
        )
    }

    /// The scope a call works in: the configured user, or the one the call names.
    fn scope(&self, user: Option<String>, session: Option<String>) -> Result<pb::Scope, Refusal> {
        let user = match (&self.user, user.filter(|u| !u.is_empty())) {
            (Some(bound), Some(asked)) if asked != **bound => {
                return Err(Refusal::new(
                    "PERMISSION_DENIED",
                    Some("user"),
                    &format!("this server works for user {bound:?} only"),
                ));
            }
            (Some(bound), _) => bound.to_string(),
            (None, Some(asked)) => asked,
            (None, None) => {
                return Err(Refusal::invalid(
                    "user",
                    "required: this server was started without --user",
                ));
            }
        };
        Ok(pb::Scope {
            user_id: user,
            agent_id: self.agent.to_string(),
            session_id: session.unwrap_or_default(),
        })
    }

    /// A read scope: the configured agent narrows writes, not what the user's memory holds.
    fn read_scope(
        &self,
        user: Option<String>,
        session: Option<String>,
    ) -> Result<pb::Scope, Refusal> {
        let mut scope = self.scope(user, session)?;
        scope.agent_id.clear();
        Ok(scope)
    }

    #[tool(
        description = "Remember something about the user for later conversations: a fact, a message or a document passage. Answers the stored memory's id, and `duplicate` when the same text was already remembered. The memory is searchable when this returns."
    )]
    async fn remember(
        &self,
        Parameters(args): Parameters<RememberArgs>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, Refusal> {
        let request = pb::RememberRequest {
            scope: Some(self.scope(args.user, args.session)?),
            memories: vec![pb::MemoryInput {
                text: args.text,
                kind: pb::Kind::from(args.kind.unwrap_or(KindArg::Fact)) as i32,
                role: args.role.unwrap_or_default(),
                metadata: args.metadata.into_iter().collect(),
                tags: args.tags,
                ..Default::default()
            }],
            mode: pb::WriteMode::Sync as i32,
            ..Default::default()
        };
        let response = self.client(&context)?.remember(request).await?.into_inner();
        Ok(CallToolResult::structured(output::remember_json(&response)))
    }

    #[tool(
        description = "Search the user's memory for what is relevant to a question or topic. Answers the memories, most relevant first, each with its text, id and a relevance from 0 to 1 (comparable across searches; below about 0.3 it is rarely what was asked about)."
    )]
    async fn recall(
        &self,
        Parameters(args): Parameters<RecallArgs>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, Refusal> {
        let filter = pb::Filter {
            kinds: args
                .kinds
                .into_iter()
                .map(|k| pb::Kind::from(k) as i32)
                .collect(),
            tags_any: args.tags_any,
            tags_all: args.tags_all,
            ..Default::default()
        };
        let mode = match args.mode.unwrap_or(ModeArg::Hybrid) {
            ModeArg::Hybrid => pb::SearchMode::Hybrid,
            ModeArg::Semantic => pb::SearchMode::Semantic,
            ModeArg::Keyword => pb::SearchMode::Keyword,
        };
        let request = pb::RecallRequest {
            scope: Some(self.read_scope(args.user, args.session)?),
            query: args.query,
            top_k: args.top_k.unwrap_or(5),
            mode: mode as i32,
            filter: Some(filter),
            min_score: args.min_relevance,
            ..Default::default()
        };
        let response = self.client(&context)?.recall(request).await?.into_inner();
        let mut body = output::recall_json(&response);
        // What a model needs: the hits; the timings are the operator's.
        if let Some(object) = body.as_object_mut() {
            object.remove("timings_us");
            object.remove("cache_hit");
        }
        Ok(CallToolResult::structured(body))
    }

    #[tool(
        description = "Build the context for answering the user's message: the most relevant memories and, with a session, its recent turns, laid out as Markdown within a token budget. Answers the context text ready to put in a prompt."
    )]
    async fn build_context(
        &self,
        Parameters(args): Parameters<BuildContextArgs>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, Refusal> {
        let request = pb::BuildContextRequest {
            scope: Some(self.read_scope(args.user, args.session)?),
            query: args.query,
            token_budget: args.token_budget.unwrap_or(0),
            max_memories: args.max_memories.unwrap_or(0),
            ..Default::default()
        };
        let response = self
            .client(&context)?
            .build_context(request)
            .await?
            .into_inner();
        let text = if response.context.is_empty() {
            "(nothing relevant is remembered)".to_string()
        } else {
            response.context.clone()
        };
        let mut result = CallToolResult::success(vec![ContentBlock::text(text)]);
        result.structured_content = Some(output::context_json(&response));
        Ok(result)
    }

    #[tool(
        description = "List the user's memories, oldest first, a page at a time. Pass the answer's `next_page_token` as `page_token` for the next page; it is empty on the last page."
    )]
    async fn list(
        &self,
        Parameters(args): Parameters<ListArgs>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, Refusal> {
        let page_size = args.page_size.unwrap_or(20);
        if !(1..=MAX_LIST_PAGE).contains(&page_size) {
            return Err(Refusal::invalid("page_size", "must be 1..100"));
        }
        let request = pb::ListRequest {
            scope: Some(self.read_scope(args.user, args.session)?),
            filter: Some(pb::Filter {
                kinds: args
                    .kinds
                    .into_iter()
                    .map(|k| pb::Kind::from(k) as i32)
                    .collect(),
                ..Default::default()
            }),
            page_size,
            page_token: args.page_token.unwrap_or_default(),
            ..Default::default()
        };
        let response = self.client(&context)?.list(request).await?.into_inner();
        Ok(CallToolResult::structured(output::list_json(&response)))
    }

    #[tool(
        description = "Remove memories: the ones named by `ids`, or, with `all_in_scope: true` and no ids, every memory of the user (or of one session). Answers how many were removed. Removal is permanent."
    )]
    async fn forget(
        &self,
        Parameters(args): Parameters<ForgetArgs>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, Refusal> {
        let target = match (args.ids.is_empty(), args.all_in_scope) {
            (false, false) => {
                if args.ids.len() > MAX_FORGET_IDS {
                    return Err(Refusal::invalid(
                        "ids",
                        &format!("at most {MAX_FORGET_IDS} ids at a time"),
                    ));
                }
                // The ids must be the user's: the gateway checks the tenant, this server the
                // user the call works for.
                let user = self.scope(args.user, None)?.user_id;
                let found = self
                    .client(&context)?
                    .get(pb::GetRequest {
                        ids: args.ids.clone(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                if let Some(other) = found
                    .memories
                    .iter()
                    .find(|m| m.scope.as_ref().is_none_or(|s| s.user_id != user))
                {
                    return Err(Refusal::new(
                        "PERMISSION_DENIED",
                        Some("ids"),
                        &format!("{} is not a memory of user {user:?}", other.id),
                    ));
                }
                pb::forget_request::Target::Ids(pb::MemoryIds { ids: args.ids })
            }
            (true, true) => {
                pb::forget_request::Target::Scope(self.read_scope(args.user, args.session)?)
            }
            (false, true) => {
                return Err(Refusal::invalid(
                    "all_in_scope",
                    "give either ids or all_in_scope: true, not both",
                ));
            }
            (true, false) => {
                return Err(Refusal::invalid(
                    "ids",
                    "name the memories to forget, or set all_in_scope: true to forget every memory of the scope",
                ));
            }
        };
        let request = pb::ForgetRequest {
            target: Some(target),
        };
        let response = self.client(&context)?.forget(request).await?.into_inner();
        Ok(CallToolResult::structured(output::forget_json(&response)))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Memory {
    fn get_info(&self) -> ServerConfig {
        let who = match &self.user {
            Some(user) => format!("the memory of user {user:?}"),
            None => "users' memories (every tool takes the `user` it works for)".to_string(),
        };
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("engram", env!("CARGO_PKG_VERSION")))
            .with_instructions(format!(
                "engram is a long-term memory. These tools read and write {who}. Call `recall` \
                 or `build_context` before answering questions that may depend on what the user \
                 said before; call `remember` for durable facts, preferences and decisions worth \
                 keeping; call `forget` only when the user asks."
            ))
    }
}

/// `engram mcp`: serve stdio (or HTTP with `--listen`) until the client leaves or a signal.
pub async fn run(args: McpArgs) -> std::process::ExitCode {
    let outcome = match args.listen {
        None => serve_stdio(&args).await,
        Some(listen) => match tokio::net::TcpListener::bind(listen).await {
            Ok(listener) => {
                eprintln!("engram mcp: streamable HTTP on http://{listen}/mcp");
                serve_http(&args, listener, engram_runtime::config::shutdown_signal()).await
            }
            Err(e) => Err(format!("cannot listen on {listen}: {e}")),
        },
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("engram mcp: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve_stdio(args: &McpArgs) -> Result<(), String> {
    let key =
        BearerKey::new("ENGRAM_API_KEY", args.api_key.as_deref()).map_err(|e| e.to_string())?;
    let server = Memory::new(args, Credentials::Fixed(key))?;
    let running = server
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| format!("MCP over stdio: {e}"))?;
    running
        .waiting()
        .await
        .map(|_| ())
        .map_err(|e| format!("MCP over stdio: {e}"))
}

/// Serve the tools over streamable HTTP (POST /mcp) on `listener` until `shutdown`.
pub async fn serve_http(
    args: &McpArgs,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService, session::never::NeverSessionManager,
    };
    let server = Memory::new(args, Credentials::Bearer)?;
    let stop = tokio_util::sync::CancellationToken::new();
    let addr = listener
        .local_addr()
        .map_err(|e| format!("MCP over HTTP: {e}"))?;
    // Browsers are not MCP clients: a request with an Origin header is refused, and the Host
    // must be one this server is known by (DNS rebinding).
    let mut config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_cancellation_token(stop.child_token())
        .enforce_origin_validation();
    config.json_response = true;
    config.max_request_body_bytes = MAX_HTTP_BODY_BYTES;
    config = match allowed_hosts(addr, &args.allowed_hosts)? {
        Some(hosts) => config.with_allowed_hosts(hosts),
        None => config.disable_allowed_hosts(),
    };
    // Stateless: no session outlives its request, so no caller can make the server hold one.
    let service = StreamableHttpService::new(
        move || Ok(server.clone()),
        Arc::new(NeverSessionManager::default()),
        config,
    );
    let app = axum::Router::new().nest_service("/mcp", service);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            stop.cancel();
        })
        .await
        .map_err(|e| format!("MCP over HTTP: {e}"))
}

/// The `Host` values the HTTP server accepts on `addr` (None: any, from `*`). Loopback names
/// always; beyond loopback the names must be given, since any address the server is reached by
/// could be a rebinding attacker's.
fn allowed_hosts(addr: SocketAddr, configured: &[String]) -> Result<Option<Vec<String>>, String> {
    let configured: Vec<String> = configured
        .iter()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    if configured.iter().any(|h| h == "*") {
        return Ok(None);
    }
    if !addr.ip().is_loopback() && configured.is_empty() {
        return Err(format!(
            "MCP over HTTP on {addr}, beyond loopback, needs ENGRAM_MCP_ALLOWED_HOSTS: the host \
             names clients reach it by (or * for any)"
        ));
    }
    let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"]
        .into_iter()
        .map(String::from)
        .collect();
    hosts.extend(configured);
    Ok(Some(hosts))
}

/// The `engram up` side: `--mcp-listen` / `ENGRAM_MCP_LISTEN`.
#[derive(Debug, Clone, clap::Args)]
pub struct McpListen {
    /// Serve the MCP tools over streamable HTTP at this address (path /mcp), calling the
    /// gateway with each caller's bearer token. Off unless set.
    #[arg(long = "mcp-listen", env = "ENGRAM_MCP_LISTEN")]
    pub mcp_listen: Option<SocketAddr>,
    /// The user the MCP tools work for (unset: each call names its user).
    #[arg(long = "mcp-user", env = "ENGRAM_MCP_USER")]
    pub mcp_user: Option<String>,
    /// The agent the MCP tools' writes are stored under.
    #[arg(long = "mcp-agent", env = "ENGRAM_MCP_AGENT", default_value = "")]
    pub mcp_agent: String,
    /// Beyond loopback: the `Host` names MCP requests may carry, comma separated (`*`: any).
    #[arg(
        long = "mcp-allowed-hosts",
        env = "ENGRAM_MCP_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    pub mcp_allowed_hosts: Vec<String>,
}

impl McpListen {
    /// The HTTP server `engram up` starts, calling the gateway at `gateway`.
    pub fn tools(&self, gateway: SocketAddr) -> McpArgs {
        McpArgs {
            addr: format!("http://{gateway}"),
            user: self.mcp_user.clone(),
            agent: self.mcp_agent.clone(),
            api_key: None,
            listen: self.mcp_listen,
            allowed_hosts: self.mcp_allowed_hosts.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_fields_are_named_as_the_tools_arguments() {
        assert_eq!(argument_of("memories[0].text"), "text");
        assert_eq!(argument_of("memories[0].tags[3]"), "tags[3]");
        assert_eq!(argument_of("scope.session_id"), "session");
        assert_eq!(argument_of("scope.user_id"), "user");
        assert_eq!(argument_of("min_score"), "min_relevance");
        assert_eq!(argument_of("ids.ids[2]"), "ids[2]");
        assert_eq!(argument_of("filter.tags_any[0]"), "tags_any[0]");
        assert_eq!(argument_of("top_k"), "top_k");
    }

    #[test]
    fn beyond_loopback_the_host_names_must_be_given() {
        let local: SocketAddr = "127.0.0.1:8765".parse().expect("addr");
        let any: SocketAddr = "0.0.0.0:8765".parse().expect("addr");
        assert!(allowed_hosts(local, &[]).is_ok_and(|h| h.is_some()));
        let refused = allowed_hosts(any, &[]).unwrap_err();
        assert!(refused.contains("ENGRAM_MCP_ALLOWED_HOSTS"), "{refused}");
        let named = allowed_hosts(any, &["engram-mcp.memory.svc".into()]).expect("named");
        assert!(named.is_some_and(|h| h.contains(&"engram-mcp.memory.svc".to_string())));
        assert_eq!(allowed_hosts(any, &["*".into()]), Ok(None));
    }

    #[test]
    fn the_api_key_never_shows_in_debug() {
        let args = McpListen {
            mcp_listen: None,
            mcp_user: None,
            mcp_agent: String::new(),
            mcp_allowed_hosts: Vec::new(),
        };
        let mut tools = args.tools("127.0.0.1:50051".parse().expect("addr"));
        tools.api_key = Some("sk-very-secret".into());
        assert!(!format!("{tools:?}").contains("sk-very-secret"));
    }
}
