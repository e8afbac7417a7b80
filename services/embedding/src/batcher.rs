//! Dynamic micro-batching: concurrent Embed calls share provider calls.
//!
//! Callers put their texts on a bounded queue. A worker takes the first waiting request, then
//! gathers more until the batch holds `max_texts` texts or `max_wait` has passed since that
//! first request was queued, and sends the batch to the provider (identical texts once). Each
//! caller gets its own vectors back. While `max_batches_in_flight` batches are running, new
//! requests wait on the queue, so batches grow with load. A full queue is refused at once with
//! RESOURCE_EXHAUSTED and a retry hint rather than a longer and longer wait.
//!
//! A failure is charged to the text that caused it: when a shared call fails in a way the input
//! can cause (the provider refused it, or answered it wrongly), each request of the batch is
//! embedded alone, and a failing request's texts one by one, before any request fails; a
//! request then fails with the error of its first failing text, named by its index. An outage
//! (timeouts, 5xx, an open breaker) fails the whole batch at once: splitting cannot help it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use engram_domain::api::Purpose;
use engram_domain::{Error, Result};
use engram_models::EmbeddingProvider;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Texts per provider call to aim for (a single larger request is sent alone).
    pub max_texts: usize,
    /// How long the first request of a batch may wait for company.
    pub max_wait: Duration,
    /// Requests waiting at most; more are refused.
    pub queue_capacity: usize,
    /// Provider calls running at once.
    pub max_batches_in_flight: usize,
}

struct Job {
    texts: Vec<String>,
    queued_at: Instant,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>>>,
}

#[derive(Clone)]
pub struct BatchMetrics {
    batch_texts: Histogram,
    queue_wait: Histogram,
    provider_latency: Histogram,
    embedded: Counter,
    rejected: Counter,
}

impl BatchMetrics {
    pub fn new(metrics: &engram_telemetry::Metrics) -> Self {
        let this = Self {
            batch_texts: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            queue_wait: Histogram::new(engram_telemetry::latency_buckets()),
            provider_latency: Histogram::new(engram_telemetry::latency_buckets()),
            embedded: Counter::default(),
            rejected: Counter::default(),
        };
        metrics.register(
            "engram_embed_batch_texts",
            "Texts per provider call",
            this.batch_texts.clone(),
        );
        metrics.register(
            "engram_embed_queue_seconds",
            "Time a request waited before its batch went to the provider",
            this.queue_wait.clone(),
        );
        metrics.register(
            "engram_embed_seconds",
            "Duration of one provider call (a batch)",
            this.provider_latency.clone(),
        );
        metrics.register(
            "engram_embed_texts",
            "Texts embedded by the provider (cache misses)",
            this.embedded.clone(),
        );
        metrics.register(
            "engram_embed_rejected",
            "Requests refused because the batching queue was full",
            this.rejected.clone(),
        );
        this
    }
}

/// The queue and worker for one purpose (queries and documents are batched apart).
pub struct Batcher {
    jobs: mpsc::Sender<Job>,
    config: BatchConfig,
    metrics: BatchMetrics,
}

impl Batcher {
    /// Start the worker; it stops when the batcher is dropped.
    pub fn start(
        provider: Arc<dyn EmbeddingProvider>,
        purpose: Purpose,
        config: BatchConfig,
        metrics: BatchMetrics,
    ) -> Self {
        let (jobs, queue) = mpsc::channel(config.queue_capacity.max(1));
        tokio::spawn(worker(queue, provider, purpose, config, metrics.clone()));
        Self {
            jobs,
            config,
            metrics,
        }
    }

    /// Embed `texts` in a shared batch; vectors come back in input order.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            texts,
            queued_at: Instant::now(),
            reply,
        };
        self.jobs.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                self.metrics.rejected.inc();
                Error::ResourceExhausted {
                    reason: format!(
                        "the embedding queue is full ({} requests waiting)",
                        self.config.queue_capacity
                    ),
                    retry_after: Some(self.config.max_wait.max(Duration::from_millis(20))),
                }
            }
            mpsc::error::TrySendError::Closed(_) => {
                Error::unavailable("the embedding service is stopping")
            }
        })?;
        answer
            .await
            .map_err(|_| Error::unavailable("the embedding batch was dropped"))?
    }
}

async fn worker(
    mut queue: mpsc::Receiver<Job>,
    provider: Arc<dyn EmbeddingProvider>,
    purpose: Purpose,
    config: BatchConfig,
    metrics: BatchMetrics,
) {
    let in_flight = Arc::new(Semaphore::new(config.max_batches_in_flight.max(1)));
    while let Some(first) = queue.recv().await {
        // While earlier batches run, requests pile up on the queue and join this one.
        let Ok(slot) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let deadline = first.queued_at + config.max_wait;
        let mut size = first.texts.len();
        let mut batch = vec![first];
        while size < config.max_texts {
            let next = match queue.try_recv() {
                Ok(job) => Some(job),
                Err(mpsc::error::TryRecvError::Empty) => {
                    tokio::time::timeout_at(deadline, queue.recv())
                        .await
                        .ok()
                        .flatten()
                }
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
            let Some(job) = next else { break };
            size += job.texts.len();
            batch.push(job);
        }
        tokio::spawn(run_batch(
            batch,
            provider.clone(),
            purpose,
            slot,
            metrics.clone(),
        ));
    }
}

async fn run_batch(
    jobs: Vec<Job>,
    provider: Arc<dyn EmbeddingProvider>,
    purpose: Purpose,
    _slot: OwnedSemaphorePermit,
    metrics: BatchMetrics,
) {
    let started = Instant::now();
    // Each distinct text once; every job remembers where its texts went.
    let mut unique: Vec<String> = Vec::new();
    let mut position: HashMap<&str, usize> = HashMap::new();
    let mut placements: Vec<Vec<usize>> = Vec::with_capacity(jobs.len());
    for job in &jobs {
        metrics
            .queue_wait
            .observe((started - job.queued_at).as_secs_f64());
        let mut places = Vec::with_capacity(job.texts.len());
        for text in &job.texts {
            let at = *position.entry(text.as_str()).or_insert_with(|| {
                unique.push(text.clone());
                unique.len() - 1
            });
            places.push(at);
        }
        placements.push(places);
    }
    let single = unique.len() == 1;
    match call(provider.as_ref(), unique, purpose, &metrics).await {
        Ok(vectors) => {
            for (job, places) in jobs.into_iter().zip(placements) {
                let mine = places.iter().map(|&i| vectors[i].clone()).collect();
                let _ = job.reply.send(Ok(mine));
            }
        }
        Err(error) if single || !caused_by_input(&error) => {
            for job in jobs {
                let _ = job.reply.send(Err(error.clone()));
            }
        }
        Err(_) => {
            // Someone's text broke the shared call: find whose, so only they fail. A request
            // that was the whole batch goes straight to its texts one by one.
            let together = jobs.len() > 1;
            for job in jobs {
                let answer =
                    alone(provider.as_ref(), &job.texts, together, purpose, &metrics).await;
                let _ = job.reply.send(answer);
            }
        }
    }
}

/// One provider call for `texts` (distinct), checking it answered one vector per text.
async fn call(
    provider: &dyn EmbeddingProvider,
    texts: Vec<String>,
    purpose: Purpose,
    metrics: &BatchMetrics,
) -> Result<Vec<Vec<f32>>> {
    let started = Instant::now();
    let count = texts.len();
    metrics.batch_texts.observe(count as f64);
    let result = provider.embed(texts, purpose).await.map_err(Error::from);
    metrics
        .provider_latency
        .observe(started.elapsed().as_secs_f64());
    let vectors = result?;
    if vectors.len() != count {
        return Err(Error::internal(format!(
            "embedding provider {} returned {} vectors for {count} texts",
            provider.model_id(),
            vectors.len()
        )));
    }
    metrics.embedded.inc_by(count as u64);
    Ok(vectors)
}

/// Whether a failed call may have failed because of one of its texts (the provider refused the
/// request, or answered it wrongly), so that the texts alone may fare better. Outages,
/// timeouts and open breakers are not: they fail everyone alike.
fn caused_by_input(error: &Error) -> bool {
    matches!(
        error,
        Error::InvalidArgument { .. } | Error::FailedPrecondition(_) | Error::Internal(_)
    )
}

/// Embed one request's texts on their own (`together`: first in one call); if that fails
/// because of a text, each text alone, failing with the first text that fails (named
/// `texts[i]`).
async fn alone(
    provider: &dyn EmbeddingProvider,
    texts: &[String],
    together: bool,
    purpose: Purpose,
    metrics: &BatchMetrics,
) -> Result<Vec<Vec<f32>>> {
    if texts.is_empty() {
        return Ok(Vec::new());
    }
    let mut unique: Vec<String> = Vec::new();
    let mut places = Vec::with_capacity(texts.len());
    {
        let mut position: HashMap<&str, usize> = HashMap::new();
        for text in texts {
            places.push(*position.entry(text.as_str()).or_insert_with(|| {
                unique.push(text.clone());
                unique.len() - 1
            }));
        }
    }
    let first = if together || unique.len() == 1 {
        call(provider, unique.clone(), purpose, metrics).await
    } else {
        Err(Error::internal("split at once"))
    };
    let vectors = match first {
        Ok(vectors) => vectors,
        Err(error) if unique.len() == 1 || !caused_by_input(&error) => {
            return Err(charged(error, texts, &unique[0]));
        }
        Err(_) => {
            let mut vectors = Vec::with_capacity(unique.len());
            for text in &unique {
                let mut one = call(provider, vec![text.clone()], purpose, metrics)
                    .await
                    .map_err(|error| charged(error, texts, text))?;
                vectors.append(&mut one);
            }
            vectors
        }
    };
    Ok(places.iter().map(|&i| vectors[i].clone()).collect())
}

/// `error`, naming the request's first text equal to `text` when the request has several.
fn charged(error: Error, texts: &[String], text: &str) -> Error {
    if texts.len() < 2 {
        return error;
    }
    let index = texts.iter().position(|t| t == text).unwrap_or(0);
    let at = |reason: String| format!("texts[{index}]: {reason}");
    match error {
        Error::FailedPrecondition(reason) => Error::FailedPrecondition(at(reason)),
        Error::Internal(reason) => Error::Internal(at(reason)),
        Error::InvalidArgument { field, reason } if field.is_empty() => Error::InvalidArgument {
            field: format!("texts[{index}]"),
            reason,
        },
        other => other,
    }
}
