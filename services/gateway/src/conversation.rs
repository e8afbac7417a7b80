//! `ChatService.Converse`: a memory-augmented answer, streamed.
//!
//! 1. The message passes the privacy guard first — it takes microseconds, and it must run
//!    before the message reaches anything that may leave the cluster (an external embedding
//!    provider via recall, the chat model). `block` refuses the call with INVALID_ARGUMENT;
//!    `redact` replaces what it finds, and the redacted message is what is recalled with, sent
//!    and remembered.
//! 2. Recall ∥ the session's recent turns, packed into the token budget ([`crate::context`]).
//! 3. `context` is sent, then the prompt goes to the model: the system prompt with the
//!    memories, the turns as messages, the user's message.
//! 4. Each token is forwarded as a `delta` as it arrives; `done` carries usage and timings.
//!    Failure before or during the answer (provider errors after retries, an open circuit, a
//!    first-token or idle timeout, no model configured) sends `fallback`, with the context
//!    and the reason, and ends the stream — a stream never hangs.
//! 5. After `done` the stream ends, then the user's message and the answer are remembered
//!    (MESSAGE memories of the session) in the background. After a fallback only the user's
//!    message is. A client that goes away cancels the model call at once (the connection to the
//!    provider is closed) and nothing is remembered.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engram_domain::api::{ConverseCommand, Ingestion, RememberBatch};
use engram_domain::model::{Kind, NewMemory, TenantId, WriteMode};
use engram_domain::privacy::{self, PrivacyPolicy};
use engram_domain::{Error, Limits, convert, validate};
use engram_models::{ChatChunk, ChatMessage, ChatModel, ChatRequest, TokenCounter};
use engram_proto::tonic::{Request, Response, Status};
use engram_proto::v1 as pb;
use engram_proto::v1::chat_service_server::ChatService;
use engram_runtime::server::TaskTracker;
use futures::Stream;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::context::{ContextBuilder, Packed, pack};

/// The system prompt unless a request brings its own; the memories follow it.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant with a long-term memory of this user. \
Use the relevant memories below when they help answer; do not mention them otherwise. \
If they do not cover something, say so rather than guess.";

/// Events waiting for a slow client at most; the model call waits for the client beyond it.
const EVENT_BUFFER: usize = 64;

pub struct Chat {
    pub context: Arc<ContextBuilder>,
    pub ingestion: Arc<dyn Ingestion>,
    pub model: Option<Arc<ChatModel>>,
    pub privacy: PrivacyPolicy,
    pub limits: Limits,
    pub metrics: ConverseMetrics,
    pub streams: TenantStreams,
    /// Longest a Converse may last (ENGRAM_CONVERSE_MAX_DURATION).
    pub max_duration: Duration,
    /// The service's background work (a turn being answered, then remembered), which a
    /// stopping gateway waits for.
    pub tasks: TaskTracker,
}

/// How many Converse streams each tenant has open, against a cap per tenant. Tenants come from
/// API keys, so the map holds at most one entry per configured tenant.
pub struct TenantStreams {
    max: usize,
    open: parking_lot::Mutex<std::collections::HashMap<TenantId, Arc<Semaphore>>>,
}

impl TenantStreams {
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            open: parking_lot::Mutex::default(),
        }
    }

    /// A place for one more stream of `tenant`, held until it is dropped.
    fn admit(&self, tenant: &TenantId) -> Result<OwnedSemaphorePermit, Error> {
        let slots = Arc::clone(
            self.open
                .lock()
                .entry(tenant.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(self.max))),
        );
        slots.try_acquire_owned().map_err(|_| Error::ResourceExhausted {
            reason: format!(
                "tenant {tenant} has {} Converse streams open, its limit (ENGRAM_CONVERSE_MAX_STREAMS); retry when one ends",
                self.max
            ),
            retry_after: Some(Duration::from_secs(1)),
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// How Converses end, and how long until their first token.
#[derive(Clone)]
pub struct ConverseMetrics {
    outcomes: Family<OutcomeLabels, Counter>,
    first_token: Histogram,
}

impl ConverseMetrics {
    pub fn new(metrics: &engram_telemetry::Metrics) -> Self {
        let this = Self {
            outcomes: Family::default(),
            first_token: Histogram::new(engram_telemetry::latency_buckets()),
        };
        metrics.register(
            "engram_converse_outcomes",
            "Converse calls by how they ended: done, fallback, partial_fallback (the model failed mid-answer), abandoned (the client left), refused (the privacy guard), error (recall failed)",
            this.outcomes.clone(),
        );
        metrics.register(
            "engram_converse_first_token_seconds",
            "From a Converse's arrival to its first token forwarded",
            this.first_token.clone(),
        );
        this
    }

    fn count(&self, outcome: &'static str) {
        self.outcomes
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ConverseEvent, Status>> + Send>>;

fn event(event: pb::converse_event::Event) -> Result<pb::ConverseEvent, Status> {
    Ok(pb::ConverseEvent { event: Some(event) })
}

fn micros(since: Instant) -> u64 {
    since.elapsed().as_micros() as u64
}

/// The gRPC name of an error's status code, e.g. `UNAVAILABLE`.
fn code_name(error: &Error) -> String {
    engram_telemetry::status_name(error.code())
}

/// One Converse in progress.
struct Turn {
    tenant: TenantId,
    command: ConverseCommand,
    /// The message as it may leave the cluster (redacted if the mode says so).
    message: String,
    redacted: Vec<String>,
    started: Instant,
    /// When the Converse must be over (ENGRAM_CONVERSE_MAX_DURATION after it arrived).
    ends: tokio::time::Instant,
    timings: pb::ConverseTimings,
    events: mpsc::Sender<Result<pb::ConverseEvent, Status>>,
}

impl Turn {
    /// Send an event; false if the client is gone, or stopped reading until the Converse's
    /// time ran out.
    async fn send(&self, e: pb::converse_event::Event) -> bool {
        let sent = tokio::time::timeout_at(self.ends, self.events.send(event(e))).await;
        matches!(sent, Ok(Ok(())))
    }
}

/// How long past its end a Converse's task may take to send its last event and finish.
const WIND_DOWN: Duration = Duration::from_secs(5);

/// The gRPC service: each Converse runs as its own task, feeding the response stream.
pub struct ChatEndpoint(pub Arc<Chat>);

#[engram_proto::tonic::async_trait]
impl ChatService for ChatEndpoint {
    type ConverseStream = EventStream;

    async fn converse(
        &self,
        request: Request<pb::ConverseRequest>,
    ) -> Result<Response<Self::ConverseStream>, Status> {
        let started = Instant::now();
        let tenant = crate::caller_tenant(&request)?;
        let command = validate::converse(request.into_inner(), &self.0.limits)?;
        let chat = Arc::clone(&self.0);
        let mode = chat.privacy.mode(tenant.as_str(), command.privacy);
        let mut message = command.context.query.clone();
        let found = privacy::guard(mode, "message", &mut message)
            .inspect_err(|_| chat.metrics.count("refused"))?;
        let slot = chat.streams.admit(&tenant)?;
        let timings = pb::ConverseTimings {
            privacy_us: micros(started),
            ..Default::default()
        };
        let (events, receiver) = mpsc::channel(EVENT_BUFFER);
        let ends = tokio::time::Instant::now() + chat.max_duration;
        let turn = Turn {
            tenant,
            command,
            message,
            redacted: found.iter().map(|k| k.as_str().to_string()).collect(),
            started,
            ends,
            timings,
            events,
        };
        let tasks = chat.tasks.clone();
        tasks.spawn(async move {
            // Every wait inside is bounded by `ends`; this bounds the rest (recall, opening the
            // model's stream) too.
            let _ = tokio::time::timeout_at(ends + WIND_DOWN, chat.run(turn)).await;
            drop(slot);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }
}

impl Chat {
    async fn run(&self, mut turn: Turn) {
        let mut context = turn.command.context.clone();
        context.query = turn.message.clone();
        let gathered = tokio::select! {
            gathered = self.context.gather(&turn.tenant, &context) => gathered,
            () = turn.events.closed() => {
                self.metrics.count("abandoned");
                return;
            }
        };
        let gathered = match gathered {
            Ok(gathered) => gathered,
            Err(e) => {
                self.metrics.count("error");
                let _ = turn.events.send(Err(Status::from(e))).await;
                return;
            }
        };
        turn.timings.recall_us = gathered.recall.as_micros() as u64;
        turn.timings.history_us = gathered.history.as_micros() as u64;
        let tokens = self.context.tokens;
        let packed = pack(
            tokens,
            gathered.hits,
            gathered.turns,
            context.token_budget as usize,
        );
        turn.timings.context_us = micros(turn.started);
        let sent = turn
            .send(pb::converse_event::Event::Context(pb::ContextEvent {
                memories: packed.hits.iter().map(convert::hit).collect(),
                turns: packed.turns.iter().map(convert::memory).collect(),
                context_tokens: packed.token_count as u32,
                redacted: turn.redacted.clone(),
            }))
            .await;
        if !sent {
            self.metrics.count("abandoned");
            return;
        }
        let Some(model) = self.model.clone() else {
            let reason = Error::FailedPrecondition(
                "no chat model is configured: set ENGRAM_CHAT_BASE_URL on the gateway".into(),
            );
            self.metrics.count("fallback");
            self.fall_back(&turn, &packed, &reason, false).await;
            self.remember(&turn, None);
            return;
        };
        let request = self.prompt(&turn, &packed);
        let answer = self.answer(&mut turn, &model, &request, tokens).await;
        if turn.timings.first_token_us > 0 {
            self.metrics
                .first_token
                .observe(turn.timings.first_token_us as f64 / 1e6);
        }
        match answer {
            Answer::Complete(answer) => {
                self.metrics.count("done");
                // Remembering is spawned: the stream ends as `run` returns.
                self.remember(&turn, Some(answer));
            }
            Answer::Failed { error, partial } => {
                self.metrics.count(if partial {
                    "partial_fallback"
                } else {
                    "fallback"
                });
                self.fall_back(&turn, &packed, &error, partial).await;
                self.remember(&turn, None);
            }
            Answer::Abandoned => self.metrics.count("abandoned"),
        }
    }

    /// The messages sent to the model.
    fn prompt(&self, turn: &Turn, packed: &Packed) -> ChatRequest {
        let mut system = turn
            .command
            .system_prompt
            .clone()
            .unwrap_or_else(|| DEFAULT_SYSTEM_PROMPT.to_string());
        let memories = packed.memories_text();
        if !memories.is_empty() {
            system.push_str("\n\n");
            system.push_str(&memories);
        }
        let mut messages = vec![ChatMessage::new("system", system)];
        for past in &packed.turns {
            let (role, content) = match past.role.as_str() {
                "assistant" => ("assistant", past.text.clone()),
                "user" | "" => ("user", past.text.clone()),
                other => ("user", format!("{other}: {}", past.text)),
            };
            messages.push(ChatMessage::new(role, content));
        }
        messages.push(ChatMessage::new("user", turn.message.clone()));
        ChatRequest {
            messages,
            max_tokens: turn.command.max_tokens,
            json: false,
            temperature: None,
        }
    }

    /// Stream the model's answer to the client.
    async fn answer(
        &self,
        turn: &mut Turn,
        model: &ChatModel,
        request: &ChatRequest,
        tokens: TokenCounter,
    ) -> Answer {
        let opened = tokio::select! {
            opened = model.stream(request) => opened,
            () = turn.events.closed() => return Answer::Abandoned,
        };
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(e) => {
                return Answer::Failed {
                    error: Error::from(e),
                    partial: false,
                };
            }
        };
        let mut text = String::new();
        let mut finish = String::new();
        let mut usage = None;
        // The answer ends here whatever the model does (it may ignore max_tokens).
        let cap = turn
            .command
            .max_tokens
            .unwrap_or(validate::MAX_ANSWER_TOKENS) as usize;
        let mut answered = 0;
        let ends = turn.ends;
        loop {
            let chunk = tokio::select! {
                chunk = stream.next() => chunk,
                () = tokio::time::sleep_until(ends) => {
                    let limit = self.max_duration;
                    return Answer::Failed {
                        error: Error::DeadlineExceeded(format!(
                            "the answer did not finish within {limit:?} (ENGRAM_CONVERSE_MAX_DURATION)"
                        )),
                        partial: !text.is_empty(),
                    };
                }
                // Dropping the stream closes the provider's connection: the request is
                // cancelled upstream.
                () = turn.events.closed() => return Answer::Abandoned,
            };
            match chunk {
                None => break,
                Some(Ok(ChatChunk::Delta(delta))) => {
                    // Nothing past the cap is sent: the answer stops before the delta that
                    // would cross it.
                    let cost = tokens.count(&delta);
                    if answered + cost > cap {
                        finish = "length".into();
                        break;
                    }
                    answered += cost;
                    if text.is_empty() {
                        turn.timings.first_token_us = micros(turn.started);
                    }
                    text.push_str(&delta);
                    let sent = turn
                        .send(pb::converse_event::Event::Delta(pb::DeltaEvent {
                            text: delta,
                        }))
                        .await;
                    if !sent {
                        return Answer::Abandoned;
                    }
                }
                Some(Ok(ChatChunk::Finish(reason))) => finish = reason,
                Some(Ok(ChatChunk::Usage {
                    prompt_tokens,
                    completion_tokens,
                })) => usage = Some((prompt_tokens, completion_tokens)),
                Some(Err(e)) => {
                    return Answer::Failed {
                        error: Error::from(e),
                        partial: !text.is_empty(),
                    };
                }
            }
        }
        let usage = match usage {
            Some((prompt, completion)) => pb::Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                reported_by_model: true,
            },
            None => pb::Usage {
                prompt_tokens: request
                    .messages
                    .iter()
                    .map(|m| tokens.count(&m.content) as u32)
                    .sum(),
                completion_tokens: tokens.count(&text) as u32,
                reported_by_model: false,
            },
        };
        turn.timings.total_us = micros(turn.started);
        let sent = turn
            .send(pb::converse_event::Event::Done(pb::DoneEvent {
                usage: Some(usage),
                timings: Some(turn.timings),
                model: model.model().to_string(),
                finish_reason: finish,
            }))
            .await;
        if !sent {
            return Answer::Abandoned;
        }
        Answer::Complete(text)
    }

    async fn fall_back(&self, turn: &Turn, packed: &Packed, error: &Error, partial: bool) {
        tracing::warn!(error = %error, partial, "Converse fell back: the model did not answer");
        let mut timings = turn.timings;
        timings.total_us = micros(turn.started);
        let _ = turn
            .send(pb::converse_event::Event::Fallback(pb::FallbackEvent {
                reason: error.to_string(),
                code: code_name(error),
                context: packed.text.clone(),
                memories: packed.hits.iter().map(convert::hit).collect(),
                partial,
                timings: Some(timings),
            }))
            .await;
    }

    /// Remember the user's message and, if complete, the answer — in the background.
    fn remember(&self, turn: &Turn, answer: Option<String>) {
        if turn.command.ephemeral {
            return;
        }
        let at = turn.command.context.request_time;
        let message = |text: String, role: &str| NewMemory {
            text,
            kind: Kind::Message,
            role: role.into(),
            event_time: at,
            ..NewMemory::default()
        };
        let mut memories = vec![message(turn.message.clone(), "user")];
        if let Some(answer) = answer.filter(|a| !a.trim().is_empty()) {
            memories.push(message(answer, "assistant"));
        }
        let batch = RememberBatch {
            scope: turn.command.context.scope.clone(),
            memories,
            mode: WriteMode::Async,
            extract: turn.command.extract,
            privacy: turn.command.privacy,
        };
        let ingestion = Arc::clone(&self.ingestion);
        let tenant = turn.tenant.clone();
        self.tasks.spawn(async move {
            if let Err(e) = ingestion.submit(&tenant, batch).await {
                tracing::warn!(error = %e, "could not remember a Converse turn");
            }
        });
    }
}

enum Answer {
    Complete(String),
    Failed {
        error: Error,
        partial: bool,
    },
    /// The client went away.
    Abandoned,
}
