//! Resilient calls to the outside world (model providers), written once for every service.
//!
//! An [`Outbound`] guards one provider. A call passes, in order: the bulkhead (a bounded
//! number of calls in flight; beyond it the call fails fast with RESOURCE_EXHAUSTED), then up
//! to `max_attempts` attempts, each one admitted by the provider's [`CircuitBreaker`] and
//! bounded by the per-attempt timeout, with exponential backoff and jitter between attempts
//! (`backon`, the maintained successor of the unmaintained `backoff` crate) — all within the
//! overall deadline. Only retryable failures are retried: timeouts, connection errors, 429 and
//! 5xx, waiting at least as long as a `Retry-After` asks. The caller classifies each failed
//! attempt as a [`Failure`]; the guard does the rest and reports metrics.

mod breaker;
mod policy;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable as _};
use engram_telemetry::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

pub use breaker::{BreakerConfig, BreakerState, CircuitBreaker, Rejected, Transition};
pub use policy::{Policy, parse_duration};

/// How one attempt failed, as the caller classifies it.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// No answer within the attempt timeout (set by the guard).
    Timeout(Duration),
    /// Could not connect, or the connection broke before an answer: retryable.
    Connect(String),
    /// Told to slow down (HTTP 429): retryable, after at least `retry_after`. The provider is
    /// healthy, so this does not count against its circuit breaker.
    RateLimited { retry_after: Option<Duration> },
    /// The provider failed (HTTP 5xx): retryable (after `retry_after` if given).
    Server {
        status: u16,
        retry_after: Option<Duration>,
        message: String,
    },
    /// The provider refused the request (HTTP 4xx other than 429): retrying cannot help.
    Rejected { status: u16, message: String },
    /// The provider answered with something the protocol does not allow (a malformed body, a
    /// vector of the wrong dimension): not retried, and counted against the breaker.
    Invalid(String),
}

impl Failure {
    pub fn retryable(&self) -> bool {
        match self {
            Failure::Timeout(_)
            | Failure::Connect(_)
            | Failure::RateLimited { .. }
            | Failure::Server { .. } => true,
            Failure::Rejected { .. } | Failure::Invalid(_) => false,
        }
    }

    fn counts_against_breaker(&self) -> bool {
        match self {
            Failure::Timeout(_)
            | Failure::Connect(_)
            | Failure::Server { .. }
            | Failure::Invalid(_) => true,
            Failure::RateLimited { .. } | Failure::Rejected { .. } => false,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Failure::RateLimited { retry_after } | Failure::Server { retry_after, .. } => {
                *retry_after
            }
            Failure::Timeout(_)
            | Failure::Connect(_)
            | Failure::Rejected { .. }
            | Failure::Invalid(_) => None,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Failure::Timeout(_) => "timeout",
            Failure::Connect(_) => "connect",
            Failure::RateLimited { .. } => "rate_limited",
            Failure::Server { .. } => "server_error",
            Failure::Rejected { .. } => "rejected",
            Failure::Invalid(_) => "invalid",
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Timeout(after) => write!(f, "timed out after {after:?}"),
            Failure::Connect(reason) => write!(f, "could not be reached: {reason}"),
            Failure::RateLimited { retry_after } => match retry_after {
                Some(after) => write!(f, "answered 429 Too Many Requests (retry after {after:?})"),
                None => write!(f, "answered 429 Too Many Requests"),
            },
            Failure::Server {
                status, message, ..
            } => write!(f, "answered {status}: {message}"),
            Failure::Rejected { status, message } => {
                write!(f, "rejected the request with {status}: {message}")
            }
            Failure::Invalid(reason) => write!(f, "sent an invalid response: {reason}"),
        }
    }
}

impl Failure {
    /// What a caller of engram may be told: the kind of failure and the status, never the
    /// provider's response body or connection details (they can hold the provider's URL,
    /// account details or echoed prompts; they go to the log instead).
    pub fn public(&self) -> String {
        match self {
            Failure::Server { status, .. } => format!("answered {status}"),
            Failure::Rejected { status, .. } => format!("rejected the request with {status}"),
            Failure::Connect(_) => "could not be reached".to_string(),
            // Engram's own description, without the parse error and body snippet that follow
            // it (`… response (expected value at …): <body>`).
            Failure::Invalid(reason) => {
                let ours = reason
                    .split(['(', ':'])
                    .next()
                    .unwrap_or_default()
                    .trim_end();
                format!("sent an invalid response: {ours}")
            }
            Failure::Timeout(_) | Failure::RateLimited { .. } => self.to_string(),
        }
    }
}

/// Why a guarded call failed. The messages name the provider and what went wrong, e.g.
/// `embedding provider openai timed out after 2s (attempt 3/3)`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    #[error("{provider} is failing and its circuit is open; next probe in {retry_in:?}")]
    CircuitOpen {
        provider: String,
        retry_in: Duration,
    },
    #[error("{provider} has {limit} calls in flight already")]
    Bulkhead { provider: String, limit: usize },
    #[error("{provider} {failure} (attempt {attempt}/{max_attempts})")]
    Failed {
        provider: String,
        failure: Failure,
        attempt: u32,
        max_attempts: u32,
    },
    #[error("{provider} did not answer within the {deadline:?} deadline ({attempts} attempts)")]
    Deadline {
        provider: String,
        deadline: Duration,
        attempts: u32,
    },
}

impl CallError {
    /// The message without what only the log may hold (see [`Failure`]'s public form).
    pub fn public(&self) -> String {
        match self {
            CallError::Failed {
                provider,
                failure,
                attempt,
                max_attempts,
            } => format!(
                "{provider} {} (attempt {attempt}/{max_attempts})",
                failure.public()
            ),
            other => other.to_string(),
        }
    }
}

/// The error callers see: [`CallError::public`]; the whole message is logged here.
impl From<CallError> for engram_domain::Error {
    fn from(e: CallError) -> Self {
        let message = e.public();
        if let CallError::Failed { .. } = &e {
            tracing::warn!(error = %e, "outbound call failed");
        }
        match e {
            CallError::CircuitOpen { retry_in, .. } => engram_domain::Error::Unavailable {
                reason: message,
                retry_after: Some(retry_in.max(Duration::from_millis(100))),
            },
            CallError::Bulkhead { .. } => engram_domain::Error::ResourceExhausted {
                reason: message,
                retry_after: Some(Duration::from_millis(100)),
            },
            CallError::Failed { failure, .. } => match failure {
                Failure::Rejected { .. } => engram_domain::Error::FailedPrecondition(message),
                Failure::Timeout(_) => engram_domain::Error::DeadlineExceeded(message),
                Failure::Connect(_)
                | Failure::RateLimited { .. }
                | Failure::Server { .. }
                | Failure::Invalid(_) => engram_domain::Error::Unavailable {
                    reason: message,
                    retry_after: failure.retry_after(),
                },
            },
            CallError::Deadline { .. } => engram_domain::Error::DeadlineExceeded(message),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    provider: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    provider: String,
    to: &'static str,
}

/// The outbound metric families of one service; shared by its [`Outbound`]s, which label them
/// with their provider.
#[derive(Clone)]
pub struct OutboundMetrics {
    attempts: Family<OutcomeLabels, Counter>,
    calls: Family<OutcomeLabels, Counter>,
    retries: Family<ProviderLabels, Counter>,
    latency: Family<ProviderLabels, Histogram, fn() -> Histogram>,
    in_flight: Family<ProviderLabels, Gauge>,
    breaker_state: Family<ProviderLabels, Gauge>,
    transitions: Family<TransitionLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(engram_telemetry::latency_buckets())
}

impl OutboundMetrics {
    pub fn new(metrics: &Metrics) -> Self {
        let this = Self {
            attempts: Family::default(),
            calls: Family::default(),
            retries: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            in_flight: Family::default(),
            breaker_state: Family::default(),
            transitions: Family::default(),
        };
        metrics.register(
            "engram_outbound_attempts",
            "Attempts of calls to external providers, by outcome",
            this.attempts.clone(),
        );
        metrics.register(
            "engram_outbound_calls",
            "Calls to external providers (all attempts included), by final outcome",
            this.calls.clone(),
        );
        metrics.register(
            "engram_outbound_retries",
            "Attempts that were retries",
            this.retries.clone(),
        );
        metrics.register(
            "engram_outbound_call_seconds",
            "Duration of calls to external providers, retries included",
            this.latency.clone(),
        );
        metrics.register(
            "engram_outbound_in_flight",
            "Calls to external providers in flight",
            this.in_flight.clone(),
        );
        metrics.register(
            "engram_circuit_breaker_state",
            "Circuit breaker state per provider: 0 closed, 1 open, 2 half-open",
            this.breaker_state.clone(),
        );
        metrics.register(
            "engram_circuit_breaker_transitions",
            "Circuit breaker state changes, by the state entered",
            this.transitions.clone(),
        );
        this
    }
}

/// The guard around one external provider.
pub struct Outbound {
    provider: String,
    policy: Policy,
    breaker: CircuitBreaker,
    bulkhead: Arc<Semaphore>,
    metrics: OutboundMetrics,
}

/// A place in a provider's bulkhead, held for as long as the call's result is in use (a
/// streamed answer holds it until the stream is dropped).
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    in_flight: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

impl fmt::Debug for Outbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbound")
            .field("provider", &self.provider)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// An attempt's result as the retry loop sees it.
#[derive(Debug)]
enum AttemptError {
    Failed(Failure),
    Open(Rejected),
}

impl Outbound {
    /// `provider` names it in errors and metrics, e.g. `embedding provider openai`.
    pub fn new(provider: impl Into<String>, policy: Policy, metrics: &OutboundMetrics) -> Self {
        let provider = provider.into();
        let this = Self {
            breaker: CircuitBreaker::new(policy.breaker),
            bulkhead: Arc::new(Semaphore::new(policy.max_concurrency.max(1))),
            provider,
            policy,
            metrics: metrics.clone(),
        };
        this.labels_gauge(&this.metrics.breaker_state)
            .set(BreakerState::Closed.as_gauge());
        this
    }

    pub fn provider(&self) -> &str {
        &self.provider
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// Whether a call now would fail fast on the open circuit.
    pub fn failing_fast(&self) -> bool {
        self.breaker.failing_fast()
    }

    fn labels(&self) -> ProviderLabels {
        ProviderLabels {
            provider: self.provider.clone(),
        }
    }

    /// A handle on this provider's gauge (a clone shares the value; no lock is held).
    fn labels_gauge(&self, family: &Family<ProviderLabels, Gauge>) -> Gauge {
        family.get_or_create(&self.labels()).clone()
    }

    fn count(&self, family: &Family<OutcomeLabels, Counter>, outcome: &'static str) {
        family
            .get_or_create(&OutcomeLabels {
                provider: self.provider.clone(),
                outcome,
            })
            .inc();
    }

    fn transitioned(&self, transition: Option<Transition>) {
        let Some(Transition { from, to }) = transition else {
            return;
        };
        self.labels_gauge(&self.metrics.breaker_state)
            .set(to.as_gauge());
        self.metrics
            .transitions
            .get_or_create(&TransitionLabels {
                provider: self.provider.clone(),
                to: to.as_str(),
            })
            .inc();
        match to {
            BreakerState::Open => {
                tracing::warn!(provider = %self.provider, from = from.as_str(), cooldown = ?self.policy.breaker.cooldown, "circuit opened: failing fast")
            }
            BreakerState::HalfOpen => {
                tracing::info!(provider = %self.provider, "circuit half-open: probing")
            }
            BreakerState::Closed => {
                tracing::info!(provider = %self.provider, "circuit closed: provider recovered")
            }
        }
    }

    /// Run `attempt` under this guard's policy. `attempt` is called once per attempt and
    /// classifies its own failures.
    pub async fn call<T, F, Fut>(&self, attempt: F) -> Result<T, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        self.call_holding(attempt).await.map(|(value, _slot)| value)
    }

    /// [`Self::call`], keeping the call's place in the bulkhead until the returned [`Slot`]
    /// is dropped: for a streamed answer, whose attempt ends at its first part (retries happen
    /// only before it) while the stream goes on.
    pub async fn call_holding<T, F, Fut>(&self, attempt: F) -> Result<(T, Slot), CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let policy = &self.policy;
        let permit = match tokio::time::timeout(
            policy.bulkhead_wait,
            Arc::clone(&self.bulkhead).acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) | Err(_) => {
                self.count(&self.metrics.calls, "bulkhead");
                return Err(CallError::Bulkhead {
                    provider: self.provider.clone(),
                    limit: policy.max_concurrency,
                });
            }
        };
        let in_flight = self.labels_gauge(&self.metrics.in_flight);
        in_flight.inc();
        let slot = Slot {
            _permit: permit,
            in_flight,
        };
        let started = Instant::now();
        let attempts = AtomicU32::new(0);
        // Called only once the breaker admits the attempt.
        let attempt = parking_lot::Mutex::new(attempt);

        let one_attempt = || {
            let number = attempts.fetch_add(1, Ordering::Relaxed) + 1;
            let attempt = &attempt;
            async move {
                if number > 1 {
                    self.metrics.retries.get_or_create(&self.labels()).inc();
                }
                let (permit, transition) = self.breaker.acquire();
                self.transitioned(transition);
                let permit = match permit {
                    Ok(permit) => permit,
                    Err(rejected) => {
                        self.count(&self.metrics.attempts, "circuit_open");
                        return Err(AttemptError::Open(rejected));
                    }
                };
                let future = (attempt.lock())();
                let outcome = match tokio::time::timeout(policy.attempt_timeout, future).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(Failure::Timeout(policy.attempt_timeout)),
                };
                let healthy = outcome
                    .as_ref()
                    .err()
                    .is_none_or(|f| !f.counts_against_breaker());
                self.transitioned(self.breaker.record(permit, healthy));
                match &outcome {
                    Ok(_) => self.count(&self.metrics.attempts, "ok"),
                    Err(failure) => self.count(&self.metrics.attempts, failure.label()),
                }
                outcome.map_err(AttemptError::Failed)
            }
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(policy.min_backoff)
            .with_max_delay(policy.max_backoff)
            .with_max_times(policy.max_attempts.saturating_sub(1) as usize)
            .with_jitter();
        let retried = one_attempt
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|e| matches!(e, AttemptError::Failed(f) if f.retryable()))
            .adjust(|e, backoff| {
                let wait = match e {
                    AttemptError::Failed(failure) => match failure.retry_after() {
                        // Never sooner than the provider asked.
                        Some(asked) => backoff.map(|b| b.max(asked)),
                        None => backoff,
                    },
                    AttemptError::Open(_) => None,
                }?;
                // No point waiting past the deadline: give up with the failure we have.
                (started.elapsed() + wait < policy.deadline).then_some(wait)
            })
            .notify(|e, wait| {
                tracing::debug!(provider = %self.provider, error = ?e, ?wait, "retrying");
            });
        let result = tokio::time::timeout(policy.deadline, retried).await;
        self.metrics
            .latency
            .get_or_create(&self.labels())
            .observe(started.elapsed().as_secs_f64());
        let attempts = attempts.load(Ordering::Relaxed);
        let result = match result {
            Ok(Ok(value)) => Ok((value, slot)),
            Ok(Err(AttemptError::Open(rejected))) => Err(CallError::CircuitOpen {
                provider: self.provider.clone(),
                retry_in: rejected.retry_in,
            }),
            Ok(Err(AttemptError::Failed(failure))) => Err(CallError::Failed {
                provider: self.provider.clone(),
                failure,
                attempt: attempts,
                max_attempts: policy.max_attempts,
            }),
            Err(_) => Err(CallError::Deadline {
                provider: self.provider.clone(),
                deadline: policy.deadline,
                attempts,
            }),
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(CallError::CircuitOpen { .. }) => "circuit_open",
            Err(CallError::Bulkhead { .. }) => "bulkhead",
            Err(CallError::Failed { .. }) => "error",
            Err(CallError::Deadline { .. }) => "deadline",
        };
        self.count(&self.metrics.calls, outcome);
        result
    }
}

#[cfg(test)]
mod tests;
