//! Any OpenAI-compatible `POST {base_url}/chat/completions` endpoint (OpenAI, vLLM, Ollama,
//! llama.cpp's server, LiteLLM), streamed as server-sent events.
//!
//! Every call goes through the provider's [`Outbound`] guard. One attempt lasts from the
//! request until the first token of the answer (bounded by the attempt timeout — the
//! first-token timeout — after a connect timeout): failures up to there (429 honouring
//! `Retry-After`, 5xx, connection errors, a first token too slow) are retried with backoff,
//! counted by the circuit breaker and bounded by the call's deadline. Once the first token is
//! in hand nothing is retried, since it may have been forwarded already: the rest of the
//! stream is read with an idle timeout between chunks, and the call keeps its place in the
//! bulkhead until the stream is dropped. Dropping a [`ChatStream`] closes the connection, which
//! cancels the request upstream.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use engram_resilience::{Failure, Outbound, OutboundMetrics, Policy, Slot};
use futures::{Stream, StreamExt as _};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::openai::{
    ProviderKey, classify_status, describe, install_tls_provider, retry_after, snippet,
};
use crate::tokens::{TokenCounter, TokenizerKind};

#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// Up to and including the version, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    pub model: String,
    pub api_key: Option<ProviderKey>,
    /// Attempts, first-token timeout (`attempt_timeout`), deadline, breaker, bulkhead.
    pub policy: Policy,
    pub connect_timeout: Duration,
    /// Longest silence between two chunks of a stream once it has started.
    pub idle_timeout: Duration,
    pub tokenizer: TokenizerKind,
}

/// One message of a conversation, as the chat API takes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<u32>,
    /// Ask for a JSON object (`response_format: json_object`).
    pub json: bool,
    pub temperature: Option<f32>,
}

/// A piece of a streamed answer.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatChunk {
    Delta(String),
    Finish(String),
    Usage {
        prompt_tokens: u32,
        completion_tokens: u32,
    },
}

/// A whole answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Completion {
    pub text: String,
    pub finish_reason: String,
    pub usage: Option<(u32, u32)>,
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    stream: bool,
    stream_options: StreamOptions,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<ResponseFormat>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Deserialize)]
struct WireChunk {
    #[serde(default)]
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct WireChoice {
    #[serde(default)]
    delta: Option<WireDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireDelta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
}

type Body = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// Splits a server-sent event stream into the `data` of each event.
#[derive(Default)]
struct SseParser {
    buffer: Vec<u8>,
    data: Vec<String>,
}

impl SseParser {
    /// Feed bytes; returns the data of every event they complete.
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if !self.data.is_empty() {
                    events.push(self.data.join("\n"));
                    self.data.clear();
                }
            } else if let Some(value) = line.strip_prefix("data:") {
                self.data
                    .push(value.strip_prefix(' ').unwrap_or(value).to_string());
            }
            // Comments (`:`), `event:`, `id:` and `retry:` lines carry nothing we use.
        }
        events
    }
}

/// What one event says.
enum Event {
    Chunks(Vec<ChatChunk>),
    Done,
}

fn parse_event(data: &str) -> Result<Event, Failure> {
    if data.trim() == "[DONE]" {
        return Ok(Event::Done);
    }
    let chunk: WireChunk = serde_json::from_str(data).map_err(|e| {
        Failure::Invalid(format!(
            "an event is not a chat completion chunk ({e}): {}",
            snippet(data.as_bytes())
        ))
    })?;
    if let Some(error) = chunk.error {
        return Err(Failure::Server {
            status: 502,
            retry_after: None,
            message: format!(
                "error in the stream: {}",
                snippet(error.to_string().as_bytes())
            ),
        });
    }
    let mut chunks = Vec::new();
    for choice in chunk.choices.into_iter().take(1) {
        if let Some(text) = choice.delta.and_then(|d| d.content)
            && !text.is_empty()
        {
            chunks.push(ChatChunk::Delta(text));
        }
        if let Some(reason) = choice.finish_reason {
            chunks.push(ChatChunk::Finish(reason));
        }
    }
    if let Some(usage) = chunk.usage {
        chunks.push(ChatChunk::Usage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
        });
    }
    Ok(Event::Chunks(chunks))
}

/// A streamed answer. Dropping it closes the connection (cancelling the request upstream)
/// and frees its place in the bulkhead.
pub struct ChatStream {
    provider: String,
    pending: VecDeque<ChatChunk>,
    body: Body,
    parser: SseParser,
    /// `[DONE]` was received, or the stream failed.
    ended: bool,
    idle_timeout: Duration,
    _slot: Option<Slot>,
}

impl std::fmt::Debug for ChatStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatStream")
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

impl ChatStream {
    /// The next piece of the answer; `None` once it is complete. A failure ends the stream.
    pub async fn next(&mut self) -> Option<Result<ChatChunk, ModelError>> {
        loop {
            if let Some(chunk) = self.pending.pop_front() {
                return Some(Ok(chunk));
            }
            if self.ended {
                return None;
            }
            // `reason` may be told to callers; `detail` (what the provider sent) only logged.
            let failed = |stream: &mut Self, reason: String, detail: String| {
                stream.ended = true;
                Some(Err(ModelError::Stream {
                    provider: stream.provider.clone(),
                    reason,
                    detail,
                }))
            };
            let bytes = match tokio::time::timeout(self.idle_timeout, self.body.next()).await {
                Err(_) => {
                    let idle = self.idle_timeout;
                    let reason =
                        format!("sent nothing for {idle:?} mid-answer (ENGRAM_CHAT_IDLE_TIMEOUT)");
                    return failed(self, reason, String::new());
                }
                Ok(None) => {
                    let reason = "closed the stream before it finished";
                    return failed(self, reason.into(), String::new());
                }
                Ok(Some(Err(e))) => {
                    let reason = "broke off the stream";
                    return failed(self, reason.into(), describe(&e));
                }
                Ok(Some(Ok(bytes))) => bytes,
            };
            for data in self.parser.push(&bytes) {
                match parse_event(&data) {
                    Ok(Event::Chunks(chunks)) => self.pending.extend(chunks),
                    Ok(Event::Done) => self.ended = true,
                    Err(failure) => {
                        self.pending.clear();
                        return failed(self, failure.public(), failure.to_string());
                    }
                }
            }
        }
    }

    /// Read the rest of the answer.
    pub async fn collect(mut self) -> Result<Completion, ModelError> {
        let mut completion = Completion::default();
        while let Some(chunk) = self.next().await {
            match chunk? {
                ChatChunk::Delta(text) => completion.text.push_str(&text),
                ChatChunk::Finish(reason) => completion.finish_reason = reason,
                ChatChunk::Usage {
                    prompt_tokens,
                    completion_tokens,
                } => completion.usage = Some((prompt_tokens, completion_tokens)),
            }
        }
        Ok(completion)
    }
}

/// A chat model behind an OpenAI-compatible API.
pub struct ChatModel {
    client: reqwest::Client,
    url: String,
    config: ChatConfig,
    outbound: Outbound,
    tokens: TokenCounter,
}

impl std::fmt::Debug for ChatModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatModel")
            .field("url", &self.url)
            .field("model", &self.config.model)
            .finish_non_exhaustive()
    }
}

impl ChatModel {
    pub fn new(config: ChatConfig, metrics: &OutboundMetrics) -> Result<Self, ModelError> {
        install_tls_provider();
        let base = config.base_url.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ModelError::Config {
                setting: "ENGRAM_CHAT_BASE_URL".into(),
                reason: format!("{:?} is not an http(s) URL", config.base_url),
            });
        }
        if config.model.trim().is_empty() {
            return Err(ModelError::Config {
                setting: "ENGRAM_CHAT_MODEL".into(),
                reason: "is empty".into(),
            });
        }
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ModelError::Config {
                setting: "ENGRAM_CHAT_BASE_URL".into(),
                reason: format!("cannot build an HTTP client: {e}"),
            })?;
        let tokens = TokenCounter::new(config.tokenizer, &config.model)?;
        let outbound = Outbound::new(
            format!("chat provider {}", config.model),
            config.policy,
            metrics,
        );
        Ok(Self {
            client,
            url: format!("{base}/chat/completions"),
            config,
            outbound,
            tokens,
        })
    }

    pub fn model(&self) -> &str {
        &self.config.model
    }

    pub fn outbound(&self) -> &Outbound {
        &self.outbound
    }

    /// The tokenizer of this model's family.
    pub fn tokens(&self) -> TokenCounter {
        self.tokens
    }

    /// Start an answer: resolves once its first token (or its end) has arrived, after as many
    /// attempts as the policy allows.
    pub async fn stream(&self, request: &ChatRequest) -> Result<ChatStream, ModelError> {
        let body = WireRequest {
            model: &self.config.model,
            messages: &request.messages,
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
            max_tokens: request.max_tokens,
            temperature: request.temperature,
            response_format: request.json.then_some(ResponseFormat {
                kind: "json_object",
            }),
        };
        let (mut stream, slot) = self.outbound.call_holding(|| self.open(&body)).await?;
        stream._slot = Some(slot);
        Ok(stream)
    }

    /// The whole answer to `request`.
    pub async fn complete(&self, request: &ChatRequest) -> Result<Completion, ModelError> {
        self.stream(request).await?.collect().await
    }

    /// One attempt: send, check the status, read until the first token.
    async fn open(&self, body: &WireRequest<'_>) -> Result<ChatStream, Failure> {
        let mut request = self
            .client
            .post(&self.url)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .json(body);
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key.expose());
        }
        let response = request
            .send()
            .await
            .map_err(|e| Failure::Connect(describe(&e)))?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = retry_after(response.headers());
            let body = response.bytes().await.unwrap_or_default();
            return Err(classify_status(status, retry_after, &body));
        }
        let mut stream = ChatStream {
            provider: self.outbound.provider().to_string(),
            pending: VecDeque::new(),
            body: Box::pin(response.bytes_stream()),
            parser: SseParser::default(),
            ended: false,
            idle_timeout: self.config.idle_timeout,
            _slot: None,
        };
        loop {
            let started = stream
                .pending
                .iter()
                .any(|c| matches!(c, ChatChunk::Delta(_)));
            if started || stream.ended {
                return Ok(stream);
            }
            let bytes = match stream.body.next().await {
                Some(Ok(bytes)) => bytes,
                Some(Err(e)) => return Err(Failure::Connect(describe(&e))),
                None => {
                    return Err(Failure::Connect(
                        "the stream ended before the answer began".into(),
                    ));
                }
            };
            for data in stream.parser.push(&bytes) {
                match parse_event(&data)? {
                    Event::Chunks(chunks) => stream.pending.extend(chunks),
                    Event::Done => stream.ended = true,
                }
            }
        }
    }
}

engram_resilience::policy_args!(ChatPolicyArgs, "chat", "CHAT");

/// The chat model's settings (gateway for Converse, ingestion for fact extraction).
#[derive(Debug, Clone, clap::Args)]
pub struct ChatModelArgs {
    /// OpenAI-compatible API up to the version, e.g. `https://api.openai.com/v1` or Ollama's
    /// `http://localhost:11434/v1`. Unset: no chat model (Converse answers with a fallback
    /// event carrying the context; Remember with `extract` is refused).
    #[arg(
        id = "chat-base-url",
        long = "chat-base-url",
        env = "ENGRAM_CHAT_BASE_URL"
    )]
    pub base_url: Option<String>,
    /// The model name sent with each request.
    #[arg(
        id = "chat-model",
        long = "chat-model",
        env = "ENGRAM_CHAT_MODEL",
        default_value = "gpt-4o-mini"
    )]
    pub model: String,
    /// Environment variable holding the API key (empty: no key).
    #[arg(
        id = "chat-api-key-env",
        long = "chat-api-key-env",
        env = "ENGRAM_CHAT_API_KEY_ENV",
        default_value = ""
    )]
    pub api_key_env: String,
    /// File holding the API key (a mounted Secret); takes precedence over the variable.
    #[arg(
        id = "chat-api-key-file",
        long = "chat-api-key-file",
        env = "ENGRAM_CHAT_API_KEY_FILE",
        value_parser = engram_domain::absolute_path
    )]
    pub api_key_file: Option<std::path::PathBuf>,
    /// Longest wait for a connection to the chat provider.
    #[arg(id = "chat-connect-timeout", long = "chat-connect-timeout", env = "ENGRAM_CHAT_CONNECT_TIMEOUT", default_value = "5s", value_parser = engram_resilience::parse_duration)]
    pub connect_timeout: Duration,
    /// Longest silence between two chunks once an answer is streaming.
    #[arg(id = "chat-idle-timeout", long = "chat-idle-timeout", env = "ENGRAM_CHAT_IDLE_TIMEOUT", default_value = "30s", value_parser = engram_resilience::parse_duration)]
    pub idle_timeout: Duration,
    /// Vocabulary that counts tokens for budgets: `auto` (from the model name),
    /// `o200k_base` or `cl100k_base`.
    #[arg(id = "chat-tokenizer", long = "chat-tokenizer", env = "ENGRAM_CHAT_TOKENIZER", value_enum, default_value_t = TokenizerKind::Auto)]
    pub tokenizer: TokenizerKind,
    /// The attempt timeout (`ENGRAM_CHAT_TIMEOUT`) is the first-token timeout.
    #[command(flatten)]
    pub policy: ChatPolicyArgs,
}

impl ChatPolicyArgs {
    /// Settings that give `policy` (its backoff and bulkhead wait stay the defaults).
    pub fn from_policy(policy: &Policy) -> Self {
        Self {
            attempt_timeout: policy.attempt_timeout,
            deadline: policy.deadline,
            max_attempts: policy.max_attempts,
            breaker_failures: policy.breaker.consecutive_failures,
            breaker_cooldown: policy.breaker.cooldown,
            max_concurrency: policy.max_concurrency,
        }
    }
}

impl Default for ChatModelArgs {
    /// No chat model; the documented defaults otherwise.
    fn default() -> Self {
        engram_domain::settings::defaults()
    }
}

impl ChatModelArgs {
    /// Every setting but the API key (which [`Self::config`] reads).
    pub fn check(&self) -> Result<(), ModelError> {
        let bad = |setting: &str, reason: String| ModelError::Config {
            setting: setting.into(),
            reason,
        };
        if self.idle_timeout.is_zero() {
            return Err(bad(
                "ENGRAM_CHAT_IDLE_TIMEOUT",
                "must be greater than zero".into(),
            ));
        }
        if let Some(url) = self.base_url.as_deref().filter(|u| !u.trim().is_empty())
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(bad(
                "ENGRAM_CHAT_BASE_URL",
                format!("{url:?} is not an http(s) URL"),
            ));
        }
        if self.model.trim().is_empty() {
            return Err(bad("ENGRAM_CHAT_MODEL", "is empty".into()));
        }
        Ok(())
    }

    /// The model's settings, or `None` when no chat model is configured.
    pub fn config(&self) -> Result<Option<ChatConfig>, ModelError> {
        self.check()?;
        let Some(base_url) = self.base_url.clone().filter(|u| !u.trim().is_empty()) else {
            return Ok(None);
        };
        let api_key = match (&self.api_key_file, self.api_key_env.trim()) {
            (Some(file), _) => Some(ProviderKey::from_file("ENGRAM_CHAT_API_KEY_FILE", file)?),
            (None, "") => None,
            (None, var) => Some(ProviderKey::from_env("ENGRAM_CHAT_API_KEY_ENV", var)?),
        };
        Ok(Some(ChatConfig {
            base_url,
            model: self.model.clone(),
            api_key,
            policy: self.policy.policy(),
            connect_timeout: self.connect_timeout,
            idle_timeout: self.idle_timeout,
            tokenizer: self.tokenizer,
        }))
    }

    /// The tokenizer budgets are counted with, with or without a chat model.
    pub fn token_counter(&self) -> Result<TokenCounter, ModelError> {
        TokenCounter::new(self.tokenizer, &self.model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_reads_are_parsed() {
        let mut parser = SseParser::default();
        assert!(parser.push(b"data: {\"a\"").is_empty());
        assert_eq!(
            parser.push(b":1}\r\n\r\n: comment\n\ndata: [DONE]\n"),
            vec!["{\"a\":1}"]
        );
        assert_eq!(parser.push(b"\n"), vec!["[DONE]"]);
    }

    #[test]
    fn chunks_carry_text_finish_and_usage() -> Result<(), Failure> {
        let Event::Chunks(chunks) = parse_event(
            r#"{"choices":[{"delta":{"content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1}}"#,
        )?
        else {
            return Err(Failure::Invalid("expected chunks".into()));
        };
        assert_eq!(
            chunks,
            vec![
                ChatChunk::Delta("Hi".into()),
                ChatChunk::Finish("stop".into()),
                ChatChunk::Usage {
                    prompt_tokens: 5,
                    completion_tokens: 1
                }
            ]
        );
        assert!(matches!(parse_event("not json"), Err(Failure::Invalid(_))));
        assert!(matches!(
            parse_event(r#"{"error":{"message":"overloaded"}}"#),
            Err(Failure::Server { .. })
        ));
        Ok(())
    }
}
