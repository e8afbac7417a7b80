//! Dynamic micro-batching: concurrent Embed calls share provider calls.
//!
//! Callers put their texts on a bounded queue. A worker takes the first waiting request, then
//! gathers more until the batch holds `max_texts` texts or `max_wait` has passed since that
//! first request was queued, and sends the batch to the provider (identical texts once). Each
//! caller gets its own vectors back. While `max_batches_in_flight` batches are running, new
//! requests wait on the queue, so batches grow with load. A full queue is refused at once with
//! RESOURCE_EXHAUSTED and a retry hint rather than a longer and longer wait.
//!
//! A failure is charged to the text that caused it: when a shared call is refused in a way one
//! input can cause (HTTP 400, 413 or 422, or the local model failing on a text), the batch's
//! texts are bisected — each half embedded on its own, a failing half split again — to find the
//! texts the provider refuses, within [`MAX_ISOLATION_CALLS`] calls per batch; only requests
//! holding such a text (or one left unresolved when the budget ran out) fail, the others get
//! their vectors. Outages, timeouts, an open breaker, and refusals no text causes (401, 403,
//! 404: a key or model the provider does not know) fail the whole batch at once.

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
    let count = unique.len();
    match call(provider.as_ref(), unique, purpose, &metrics).await {
        Ok(vectors) => {
            for (job, places) in jobs.into_iter().zip(placements) {
                let mine = places.iter().map(|&i| vectors[i].clone()).collect();
                let _ = job.reply.send(Ok(mine));
            }
        }
        Err(failed) if count == 1 || !failed.input => {
            for job in jobs {
                let _ = job.reply.send(Err(failed.error.clone()));
            }
        }
        Err(failed) if jobs.iter().all(|job| job.reply.is_closed()) => drop(failed),
        Err(failed) => {
            // Some text broke the shared call: find which, so that only its requests fail. The
            // batch's distinct texts again, from the requests (the call consumed its copy).
            let mut all = vec![""; count];
            for (job, places) in jobs.iter().zip(&placements) {
                for (text, &i) in job.texts.iter().zip(places) {
                    all[i] = text;
                }
            }
            let mut search = Isolation {
                provider: provider.as_ref(),
                purpose,
                metrics: &metrics,
                calls_left: MAX_ISOLATION_CALLS,
                found: vec![None; count],
                unresolved: failed.error,
            };
            let indices: Vec<usize> = (0..count).collect();
            search.split(&all, &indices).await;
            for (job, places) in jobs.into_iter().zip(placements) {
                let _ = job.reply.send(search.answer(&places));
            }
        }
    }
}

/// Most provider calls spent finding the texts that broke one batch's call: a request of many
/// texts the provider refuses costs this much at most, whatever its size.
pub const MAX_ISOLATION_CALLS: usize = 32;

/// A failed provider call: the error, and whether one of its inputs may have caused it.
struct Failed {
    error: Error,
    input: bool,
}

/// One provider call for `texts` (distinct), checking it answered one vector per text.
async fn call(
    provider: &dyn EmbeddingProvider,
    texts: Vec<String>,
    purpose: Purpose,
    metrics: &BatchMetrics,
) -> std::result::Result<Vec<Vec<f32>>, Failed> {
    let started = Instant::now();
    let count = texts.len();
    metrics.batch_texts.observe(count as f64);
    let result = provider.embed(texts, purpose).await;
    metrics
        .provider_latency
        .observe(started.elapsed().as_secs_f64());
    let vectors = result.map_err(|e| Failed {
        input: caused_by_input(&e),
        error: Error::from(e),
    })?;
    if vectors.len() != count {
        return Err(Failed {
            error: Error::internal(format!(
                "embedding provider {} returned {} vectors for {count} texts",
                provider.model_id(),
                vectors.len()
            )),
            input: false,
        });
    }
    metrics.embedded.inc_by(count as u64);
    Ok(vectors)
}

/// Whether a failure may be one input's doing, so that the texts apart may fare better: the
/// provider refused the request as malformed or too large (400, 413, 422), or the local model
/// failed on it. Not outages, timeouts, open breakers, or refusals of the caller itself (401,
/// 403, 404), which fail every text alike.
fn caused_by_input(error: &engram_models::ModelError) -> bool {
    use engram_resilience::{CallError, Failure};
    match error {
        engram_models::ModelError::Provider(CallError::Failed {
            failure: Failure::Rejected { status, .. },
            ..
        }) => matches!(status, 400 | 413 | 422),
        engram_models::ModelError::Inference { .. } => true,
        _ => false,
    }
}

/// The search for the texts that broke a batch's call, by bisection.
struct Isolation<'a> {
    provider: &'a dyn EmbeddingProvider,
    purpose: Purpose,
    metrics: &'a BatchMetrics,
    calls_left: usize,
    /// Per distinct text of the batch: its vector, its error, or None while unresolved.
    found: Vec<Option<Result<Vec<f32>>>>,
    /// The answer for texts the budget left unresolved.
    unresolved: Error,
}

impl Isolation<'_> {
    /// Resolve `indices` (of `texts`), known to fail together: embed each half on its own and
    /// split a half that fails because of an input again.
    async fn split(&mut self, texts: &[&str], indices: &[usize]) {
        let mut pending = vec![indices.to_vec()];
        while let Some(part) = pending.pop() {
            if part.len() == 1 {
                continue; // a lone text that failed together: its error is set already
            }
            let (left, right) = part.split_at(part.len() / 2);
            for half in [left, right] {
                if self.calls_left == 0 {
                    return;
                }
                self.calls_left -= 1;
                let batch = half.iter().map(|&i| texts[i].to_string()).collect();
                match call(self.provider, batch, self.purpose, self.metrics).await {
                    Ok(vectors) => {
                        for (&i, vector) in half.iter().zip(vectors) {
                            self.found[i] = Some(Ok(vector));
                        }
                    }
                    Err(failed) if failed.input => {
                        if half.len() == 1 {
                            self.found[half[0]] = Some(Err(failed.error));
                        } else {
                            pending.push(half.to_vec());
                        }
                    }
                    Err(failed) => {
                        // An outage meanwhile: what is still unresolved fails with it.
                        self.unresolved = failed.error;
                        return;
                    }
                }
            }
        }
    }

    /// A request's answer: its vectors if all its texts were embedded, else the error of its
    /// first text that was not.
    fn answer(&self, places: &[usize]) -> Result<Vec<Vec<f32>>> {
        places
            .iter()
            .map(|&i| match &self.found[i] {
                Some(Ok(vector)) => Ok(vector.clone()),
                Some(Err(error)) => Err(error.clone()),
                None => Err(self.unresolved.clone()),
            })
            .collect()
    }
}
