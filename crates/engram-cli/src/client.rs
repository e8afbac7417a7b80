//! Commands that talk to a running gateway.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use engram_proto::tonic::transport::Endpoint;
use engram_proto::tonic::{Code, Status};
use engram_proto::v1 as pb;
use engram_proto::v1::memory_service_client::MemoryServiceClient;
use engram_runtime::rpc::BearerKey;

use crate::output;

#[derive(Debug, clap::Args)]
pub struct Connection {
    /// Address of the gateway.
    #[arg(
        long,
        env = "ENGRAM_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    addr: String,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// API key for a gateway with authentication on.
    #[arg(
        long = "api-key",
        env = "ENGRAM_API_KEY",
        hide_env_values = true,
        global = true
    )]
    api_key: Option<String>,
    /// Give up on a call after this long.
    #[arg(long, default_value = "30s", value_parser = engram_domain::parse_duration, global = true)]
    timeout: Duration,
}

#[derive(Debug, clap::Args)]
pub struct ScopeArgs {
    /// User the memories belong to.
    #[arg(long, short = 'u')]
    user: String,
    /// Agent within the user's scope (optional).
    #[arg(long, default_value = "")]
    agent: String,
    /// Session within the user's scope (optional).
    #[arg(long, default_value = "")]
    session: String,
}

impl ScopeArgs {
    fn scope(&self) -> pb::Scope {
        pb::Scope {
            user_id: self.user.clone(),
            agent_id: self.agent.clone(),
            session_id: self.session.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum KindArg {
    Fact,
    Message,
    Document,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ModeArg {
    Hybrid,
    Semantic,
    Keyword,
}

#[derive(Debug, clap::Args)]
pub struct RememberArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(flatten)]
    scope: ScopeArgs,
    /// What kind of memory these are.
    #[arg(long, value_enum, default_value = "fact")]
    kind: KindArg,
    /// Who said it (for messages).
    #[arg(long, default_value = "")]
    role: String,
    /// A tag (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Metadata as key=value (repeatable).
    #[arg(long = "meta", value_parser = parse_key_value)]
    metadata: Vec<(String, String)>,
    /// Importance from 0 to 1.
    #[arg(long)]
    importance: Option<f32>,
    /// Return as soon as the memories are in the write log, before they are indexed (ASYNC).
    /// By default the command waits until they are searchable (SYNC), so that the next
    /// command finds them.
    #[arg(long = "no-wait")]
    no_wait: bool,
    /// The memories' texts, one memory each.
    #[arg(required = true)]
    texts: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct RecallArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(flatten)]
    scope: ScopeArgs,
    /// How many memories to return (1..=100).
    #[arg(long, short = 'k', default_value_t = 5)]
    top_k: u32,
    #[arg(long, value_enum, default_value = "hybrid")]
    mode: ModeArg,
    /// Down-weight older memories: one this old scores half (e.g. 7d).
    #[arg(long, value_parser = engram_domain::parse_duration)]
    half_life: Option<Duration>,
    /// Drop hits whose relevance (0..1, shown by --explain) is below this.
    #[arg(long)]
    min_score: Option<f32>,
    /// Say why each hit ranks where it does.
    #[arg(long)]
    explain: bool,
    /// Skip the result cache.
    #[arg(long)]
    no_cache: bool,
    /// Ask as of this time (RFC 3339, e.g. 2023-05-17T15:00:00Z): "yesterday" and recency are
    /// relative to it.
    #[arg(long, value_parser = parse_time)]
    at: Option<engram_proto::prost_types::Timestamp>,
    /// The question or text to find memories for.
    query: String,
}

#[derive(Debug, clap::Args)]
pub struct ContextArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(flatten)]
    scope: ScopeArgs,
    /// Most tokens of the context (0: 1024).
    #[arg(long, default_value_t = 0)]
    budget: u32,
    /// Memories recalled at most (0: 20).
    #[arg(long, default_value_t = 0)]
    max_memories: u32,
    /// Recent turns of the session at most (0: 10).
    #[arg(long, default_value_t = 0)]
    max_turns: u32,
    /// What the context is for, usually the user's message.
    query: String,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PrivacyArg {
    Off,
    Redact,
    Block,
}

#[derive(Debug, clap::Args)]
pub struct ChatArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(flatten)]
    scope: ScopeArgs,
    /// Most tokens of memories and history in the prompt (0: 1024).
    #[arg(long, default_value_t = 0)]
    budget: u32,
    /// Replace the default system prompt.
    #[arg(long)]
    system: Option<String>,
    /// A stricter privacy mode than the tenant's for this message.
    #[arg(long, value_enum)]
    privacy: Option<PrivacyArg>,
    /// Extract facts from the turn once it is remembered.
    #[arg(long)]
    extract: bool,
    /// Do not remember the turn.
    #[arg(long)]
    ephemeral: bool,
    /// The user's message.
    message: String,
}

#[derive(Debug, clap::Args)]
pub struct GetArgs {
    #[command(flatten)]
    connection: Connection,
    #[arg(required = true)]
    ids: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(flatten)]
    scope: ScopeArgs,
    /// Memories per page.
    #[arg(long, default_value_t = 100)]
    page_size: u32,
    /// Continue from a previous page.
    #[arg(long, default_value = "")]
    page_token: String,
    /// Follow page tokens to the end.
    #[arg(long)]
    all: bool,
}

#[derive(Debug, clap::Args)]
pub struct ForgetArgs {
    #[command(flatten)]
    connection: Connection,
    /// Forget every memory of the scope given by --user (and --agent, --session).
    #[arg(long, requires = "user", conflicts_with = "ids")]
    all: bool,
    /// User whose scope --all forgets.
    #[arg(long, short = 'u')]
    user: Option<String>,
    #[arg(long, default_value = "")]
    agent: String,
    #[arg(long, default_value = "")]
    session: String,
    /// Ids of the memories to forget.
    #[arg(required_unless_present = "all")]
    ids: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct LocomoArgs {
    #[command(flatten)]
    connection: Connection,
    /// Directory of LoCoMo conversation files (`*.json`).
    #[arg(long)]
    data: std::path::PathBuf,
    /// How many memories each question retrieves (1..=100).
    #[arg(long, short = 'k', default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    k: u32,
    /// Also write every question's HYBRID candidates with their per-strategy ranks and scores
    /// (JSON lines) to this file, to study fusion offline.
    #[arg(long, value_name = "FILE")]
    candidates: Option<std::path::PathBuf>,
    /// Also cross-validate: choose the fusion's dense share, the relevance models and the
    /// context floor on all but one fold of the conversations and score the held-out fold,
    /// for each fold (5 with the five shared conversations: one held out at a time).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(2..=100))]
    folds: Option<u32>,
}

/// Ingest the conversations (idempotently), ask their questions in every mode, report.
pub async fn eval_locomo(args: LocomoArgs) -> Result<(), Failure> {
    let conversations = engram_cli::eval::read_dir(&args.data).map_err(Status::invalid_argument)?;
    let mut client = connect(&args.connection).await?;
    for conversation in &conversations {
        let started = std::time::Instant::now();
        let created = engram_cli::eval::ingest(&mut client, conversation).await?;
        eprintln!(
            "{}: {} turns ({created} new) stored and indexed in {:.1}s",
            conversation.name,
            conversation.turns.len(),
            started.elapsed().as_secs_f64()
        );
    }
    let candidates = if args.candidates.is_some() || args.folds.is_some() {
        engram_cli::eval::candidates(&mut client, &conversations).await?
    } else {
        Vec::new()
    };
    if let Some(path) = &args.candidates {
        let mut text = String::new();
        for question in &candidates {
            text += &serde_json::to_string(question)
                .map_err(|e| Status::internal(format!("encoding candidates: {e}")))?;
            text.push('\n');
        }
        std::fs::write(path, text)
            .map_err(|e| Status::internal(format!("{}: {e}", path.display())))?;
    }
    let mut report = engram_cli::eval::evaluate(&mut client, &conversations, args.k).await?;
    if let Some(folds) = args.folds {
        report.cross_validation = Some(engram_cli::crossval::run(
            &candidates,
            args.k,
            folds as usize,
        ));
    }
    if args.connection.json {
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| Status::internal(format!("encoding the report: {e}")))?;
        println!("{json}");
    } else {
        print!("{}", engram_cli::eval::table(&report));
    }
    Ok(())
}

fn parse_time(value: &str) -> Result<engram_proto::prost_types::Timestamp, String> {
    let time = humantime::parse_rfc3339_weak(value)
        .map_err(|e| format!("{value:?} is not a time like 2023-05-17T15:00:00Z: {e}"))?;
    Ok(engram_domain::convert::timestamp(
        engram_domain::model::Timestamp::from(time),
    ))
}

fn parse_key_value(value: &str) -> Result<(String, String), String> {
    value
        .split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{value:?} is not key=value"))
}

/// A failed command: what to print, and the exit code.
pub struct Failure(Status);

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        Self(status)
    }
}

pub async fn run(command: impl Future<Output = Result<(), Failure>>) -> ExitCode {
    match command.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(status)) => {
            let hint = match status.code() {
                Code::Unavailable => " (is the cluster running? start it with `engram up`)",
                Code::Unauthenticated => " (pass an API key with --api-key or ENGRAM_API_KEY)",
                _ => "",
            };
            eprintln!("error: {:?}: {}{hint}", status.code(), status.message());
            ExitCode::FAILURE
        }
    }
}

async fn connect(connection: &Connection) -> Result<engram_cli::Client, Failure> {
    let (channel, key) = channel(connection).await?;
    Ok(MemoryServiceClient::with_interceptor(channel, key))
}

async fn channel(
    connection: &Connection,
) -> Result<(engram_proto::tonic::transport::Channel, BearerKey), Failure> {
    let key = BearerKey::new("--api-key", connection.api_key.as_deref()).map_err(Status::from)?;
    let endpoint = Endpoint::from_shared(connection.addr.clone())
        .map_err(|e| Status::invalid_argument(format!("--addr {:?}: {e}", connection.addr)))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(connection.timeout);
    let channel = endpoint.connect().await.map_err(|e| {
        Status::unavailable(format!(
            "cannot reach the gateway at {}: {e}",
            connection.addr
        ))
    })?;
    Ok((channel, key))
}

pub async fn remember(args: RememberArgs) -> Result<(), Failure> {
    let mut client = connect(&args.connection).await?;
    let metadata: BTreeMap<String, String> = args.metadata.into_iter().collect();
    let kind = match args.kind {
        KindArg::Fact => pb::Kind::Fact,
        KindArg::Message => pb::Kind::Message,
        KindArg::Document => pb::Kind::Document,
    };
    let memories = args
        .texts
        .iter()
        .map(|text| pb::MemoryInput {
            text: text.clone(),
            kind: kind.into(),
            role: args.role.clone(),
            metadata: metadata.clone(),
            tags: args.tags.clone(),
            importance: args.importance.unwrap_or(0.0),
            ..Default::default()
        })
        .collect();
    let mode = if args.no_wait {
        pb::WriteMode::Async
    } else {
        pb::WriteMode::Sync
    };
    let response = client
        .remember(pb::RememberRequest {
            scope: Some(args.scope.scope()),
            memories,
            mode: mode.into(),
            extract: false,
            privacy: 0,
        })
        .await?
        .into_inner();
    output::remember(&response, &args.texts, args.connection.json);
    Ok(())
}

pub async fn recall(args: RecallArgs) -> Result<(), Failure> {
    let mut client = connect(&args.connection).await?;
    let mode = match args.mode {
        ModeArg::Hybrid => pb::SearchMode::Hybrid,
        ModeArg::Semantic => pb::SearchMode::Semantic,
        ModeArg::Keyword => pb::SearchMode::Keyword,
    };
    let response = client
        .recall(pb::RecallRequest {
            scope: Some(args.scope.scope()),
            query: args.query.clone(),
            top_k: args.top_k,
            mode: mode.into(),
            min_score: args.min_score,
            recency_half_life: args.half_life.map(|d| engram_proto::prost_types::Duration {
                seconds: d.as_secs() as i64,
                nanos: d.subsec_nanos() as i32,
            }),
            explain: args.explain,
            bypass_cache: args.no_cache,
            request_time: args.at,
            ..Default::default()
        })
        .await?
        .into_inner();
    output::recall(&response, args.connection.json);
    Ok(())
}

pub async fn context(args: ContextArgs) -> Result<(), Failure> {
    let mut client = connect(&args.connection).await?;
    let response = client
        .build_context(pb::BuildContextRequest {
            scope: Some(args.scope.scope()),
            query: args.query,
            token_budget: args.budget,
            max_memories: args.max_memories,
            max_turns: args.max_turns,
            request_time: None,
        })
        .await?
        .into_inner();
    output::context(&response, args.connection.json);
    Ok(())
}

pub async fn chat(args: ChatArgs) -> Result<(), Failure> {
    let (channel, key) = channel(&args.connection).await?;
    let mut client =
        engram_proto::v1::chat_service_client::ChatServiceClient::with_interceptor(channel, key);
    if args.scope.session.is_empty() {
        return Err(Status::invalid_argument(
            "--session is required: the session's history is part of the prompt",
        )
        .into());
    }
    let privacy = match args.privacy {
        None => pb::PrivacyMode::Unspecified,
        Some(PrivacyArg::Off) => pb::PrivacyMode::Off,
        Some(PrivacyArg::Redact) => pb::PrivacyMode::Redact,
        Some(PrivacyArg::Block) => pb::PrivacyMode::Block,
    };
    let mut stream = client
        .converse(pb::ConverseRequest {
            scope: Some(args.scope.scope()),
            message: args.message,
            token_budget: args.budget,
            system_prompt: args.system.unwrap_or_default(),
            privacy: privacy.into(),
            extract: args.extract,
            ephemeral: args.ephemeral,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut failed = None;
    while let Some(event) = stream.message().await? {
        if let Some(pb::converse_event::Event::Fallback(f)) = &event.event {
            failed = Some(format!("{}: {}", f.code, f.reason));
        }
        output::converse_event(&event, args.connection.json);
    }
    match failed {
        Some(reason) => {
            Err(Status::unavailable(format!("the model did not answer ({reason})")).into())
        }
        None => Ok(()),
    }
}

pub async fn get(args: GetArgs) -> Result<(), Failure> {
    let mut client = connect(&args.connection).await?;
    let response = client
        .get(pb::GetRequest {
            ids: args.ids,
            after_write_token: String::new(),
        })
        .await?
        .into_inner();
    output::get(&response, args.connection.json);
    Ok(())
}

pub async fn list(args: ListArgs) -> Result<(), Failure> {
    let mut client = connect(&args.connection).await?;
    let mut page_token = args.page_token.clone();
    loop {
        let response = client
            .list(pb::ListRequest {
                scope: Some(args.scope.scope()),
                filter: None,
                page_size: args.page_size,
                page_token,
                after_write_token: String::new(),
            })
            .await?
            .into_inner();
        output::list(&response, args.connection.json);
        if !args.all || response.next_page_token.is_empty() {
            return Ok(());
        }
        page_token = response.next_page_token;
    }
}

pub async fn forget(args: ForgetArgs) -> Result<(), Failure> {
    let mut client = connect(&args.connection).await?;
    let target = if args.all {
        pb::forget_request::Target::Scope(pb::Scope {
            user_id: args.user.unwrap_or_default(),
            agent_id: args.agent,
            session_id: args.session,
        })
    } else {
        pb::forget_request::Target::Ids(pb::MemoryIds { ids: args.ids })
    };
    let response = client
        .forget(pb::ForgetRequest {
            target: Some(target),
        })
        .await?
        .into_inner();
    output::forget(&response, args.connection.json);
    Ok(())
}
