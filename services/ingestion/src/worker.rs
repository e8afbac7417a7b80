//! Indexing workers: each partition of the write log is worked by the replica holding its
//! lease, in log order. A batch of entries is embedded and applied together; if that fails,
//! its entries are tried one at a time so that one bad write cannot hold up the rest: an entry
//! that fails for good (bad content, a memory that no longer exists) or that has been delivered
//! `max_deliveries` times goes to the dead-letter stream with the reason, and the partition
//! moves on. Any other failure (the embedding or retrieval service away) stops the partition
//! until the next try, so its order is kept.

use std::sync::Arc;
use std::time::Duration;

use engram_core::api::{LogOp, LoggedWrite};
use engram_core::error::Code;
use engram_core::limits::Limits;
use engram_core::model::Timestamp;
use engram_core::{Error, Result};
use engram_telemetry::Metrics;
use engram_writelog::{Done, Entry, WriteLog};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::watch;

use crate::{LogArgs, Pipeline};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    partition: u32,
}

/// The write log's metrics.
#[derive(Clone)]
pub struct LogMetrics {
    backlog: Family<PartitionLabels, Gauge>,
    pub(crate) degraded: Counter,
    pub(crate) refused: Counter,
    reclaimed: Counter,
    dead_lettered: Counter,
    batch_size: Histogram,
    to_indexed: Histogram,
}

impl LogMetrics {
    pub fn new(metrics: &Metrics) -> Self {
        let this = Self {
            backlog: Family::default(),
            degraded: Counter::default(),
            refused: Counter::default(),
            reclaimed: Counter::default(),
            dead_lettered: Counter::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            to_indexed: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
        };
        for (name, help, metric) in [
            (
                "engram_log_degraded_writes",
                "Writes indexed synchronously because the write log (Redis) was unavailable",
                &this.degraded,
            ),
            (
                "engram_log_refused_writes",
                "Writes refused with RESOURCE_EXHAUSTED because indexing was too far behind",
                &this.refused,
            ),
            (
                "engram_log_reclaimed_entries",
                "Entries taken over from a worker that stopped before acknowledging them",
                &this.reclaimed,
            ),
            (
                "engram_log_dead_lettered_entries",
                "Entries moved to the dead-letter stream",
                &this.dead_lettered,
            ),
        ] {
            metrics.register(name, help, metric.clone());
        }
        metrics.register(
            "engram_log_backlog",
            "Entries of a partition not yet indexed (its lag), sampled by its worker",
            this.backlog.clone(),
        );
        metrics.register(
            "engram_log_batch_size",
            "Entries indexed per batch",
            this.batch_size.clone(),
        );
        metrics.register(
            "engram_log_write_to_indexed_seconds",
            "From a write's acknowledgement to its being indexed",
            this.to_indexed.clone(),
        );
        this
    }
}

/// Start one worker task per partition; they stop (releasing their leases) when `stopping`
/// turns true.
pub fn spawn(
    pipeline: Arc<Pipeline>,
    log: WriteLog,
    args: LogArgs,
    limits: Limits,
    metrics: LogMetrics,
    stopping: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let owner = format!("{}-{}", std::process::id(), uuid::Uuid::now_v7());
    tokio::spawn(async move {
        let tasks: Vec<_> = (0..log.partitions())
            .map(|partition| {
                let worker = PartitionWorker {
                    partition,
                    owner: owner.clone(),
                    pipeline: pipeline.clone(),
                    log: log.clone(),
                    args: args.clone(),
                    limits: limits.clone(),
                    metrics: metrics.clone(),
                };
                let stopping = stopping.clone();
                tokio::spawn(worker.run(stopping))
            })
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    })
}

struct PartitionWorker {
    partition: u32,
    owner: String,
    pipeline: Arc<Pipeline>,
    log: WriteLog,
    args: LogArgs,
    limits: Limits,
    metrics: LogMetrics,
}

/// Failures that another try cannot fix.
fn permanent(e: &Error) -> bool {
    matches!(
        e.code(),
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition | Code::OutOfRange
    )
}

/// The reason kept for a failed write: a class the caller's error is rebuilt from, then the
/// message (see `crate::failure`).
fn reason(e: &Error) -> String {
    match e {
        Error::NotFound(message) => format!("not found: {message}"),
        other if other.code() == Code::Unavailable => format!("unavailable: {other}"),
        other => format!("failed: {other}"),
    }
}

impl PartitionWorker {
    async fn run(self, mut stopping: watch::Receiver<bool>) {
        let p = self.partition;
        let lease_ttl = self.args.claim_idle.max(Duration::from_millis(300));
        let mut owned = false;
        let mut pause = Duration::ZERO;
        while !*stopping.borrow() {
            if !pause.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stopping.changed() => break,
                }
            }
            match self.log.lease(p, &self.owner, lease_ttl).await {
                Ok(true) => {
                    if !owned {
                        owned = true;
                        if let Err(e) = self.log.ensure_group(p).await {
                            tracing::warn!(partition = p, error = %e, "write log group");
                            pause = Duration::from_millis(500);
                            continue;
                        }
                    }
                }
                Ok(false) => {
                    owned = false;
                    pause = lease_ttl / 3;
                    continue;
                }
                Err(e) => {
                    tracing::debug!(partition = p, error = %e, "write log lease");
                    owned = false;
                    pause = Duration::from_millis(500);
                    continue;
                }
            }
            pause = match self.step(lease_ttl / 3).await {
                Ok(true) => Duration::ZERO,
                Ok(false) => Duration::from_millis(200),
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "indexing from the write log");
                    Duration::from_millis(500)
                }
            };
        }
        if owned {
            let _ = self.log.release(p, &self.owner).await;
        }
    }

    /// Read and index one batch. Ok(false): stopped early on a failure worth retrying later.
    async fn step(&self, block: Duration) -> Result<bool> {
        let p = self.partition;
        let max = self.args.batch_max.max(1);
        // Entries this consumer was given before and never acknowledged (a worker that died)
        // come first, in order.
        let mut entries = self.log.read(p, max, true, Duration::ZERO).await?;
        if !entries.is_empty() {
            self.metrics.reclaimed.inc_by(entries.len() as u64);
        } else {
            entries = self.log.read(p, max, false, block).await?;
            if !entries.is_empty() && entries.len() < max && !self.args.batch_wait.is_zero() {
                tokio::time::sleep(self.args.batch_wait).await;
                let more = self
                    .log
                    .read(p, max - entries.len(), false, Duration::ZERO)
                    .await?;
                entries.extend(more);
            }
        }
        if let Ok(backlog) = self.log.backlog(p).await {
            self.metrics
                .backlog
                .get_or_create(&PartitionLabels { partition: p })
                .set(backlog as i64);
        }
        if entries.is_empty() {
            return Ok(true);
        }
        self.metrics.batch_size.observe(entries.len() as f64);
        self.index(entries).await
    }

    async fn index(&self, entries: Vec<Entry>) -> Result<bool> {
        let p = self.partition;
        let decoded: Vec<Result<LoggedWrite>> = entries
            .iter()
            .map(|e| LoggedWrite::decode(&e.payload, &self.limits))
            .collect();
        let mut done: Vec<(engram_core::api::EntryId, Done)> = Vec::new();
        let mut reservations = Vec::new();
        let mut stopped = false;
        // Runs of Remembers of one tenant go together; anything else alone.
        let mut i = 0;
        while i < entries.len() {
            let mut end = i + 1;
            if let Ok(LoggedWrite {
                op: LogOp::Remember(_),
                tenant,
                ..
            }) = &decoded[i]
            {
                while end < entries.len()
                    && matches!(&decoded[end], Ok(LoggedWrite { op: LogOp::Remember(_), tenant: t, .. }) if t == tenant)
                {
                    end += 1;
                }
            }
            let run: Vec<usize> = (i..end).collect();
            // A run is applied together; if that fails (or it is one entry), entry by entry.
            let together = if run.len() > 1 {
                self.apply_run(&run, &decoded).await.ok()
            } else {
                None
            };
            let singles = match together {
                Some(outcomes) => {
                    for (k, d) in run.iter().zip(outcomes) {
                        done.push((entries[*k].id, d));
                    }
                    Vec::new()
                }
                None => run,
            };
            for k in singles {
                match self.apply_run(&[k], &decoded).await {
                    Ok(mut outcomes) => {
                        done.push((entries[k].id, outcomes.pop().unwrap_or(Done::Applied)));
                    }
                    Err(e) => {
                        let deliveries = self.log.deliveries(p, entries[k].id).await.unwrap_or(0);
                        if permanent(&e) || deliveries >= self.args.max_deliveries {
                            let why = reason(&e);
                            let held = decoded[k]
                                .as_ref()
                                .map(|w| w.reservations.clone())
                                .unwrap_or_default();
                            self.log.dead_letter(p, &entries[k], &why, &held).await?;
                            self.metrics.dead_lettered.inc();
                            tracing::warn!(partition = p, entry = %entries[k].id, reason = %why, "write moved to the dead-letter stream");
                            done.push((entries[k].id, Done::Failed(why)));
                        } else {
                            tracing::info!(partition = p, entry = %entries[k].id, deliveries, error = %e, "indexing failed; will retry");
                            stopped = true;
                            break;
                        }
                    }
                }
            }
            if stopped {
                break;
            }
            i = end;
        }
        let now_ms = Timestamp::now().as_micros() / 1000;
        for (k, (_, outcome)) in done.iter().enumerate() {
            if let Ok(write) = &decoded[k] {
                if matches!(outcome, Done::Applied) {
                    reservations.extend(write.reservations.iter().cloned());
                }
                let waited = (now_ms - write.submitted_unix_ms).max(0) as f64 / 1000.0;
                self.metrics.to_indexed.observe(waited);
            }
        }
        self.log.finish(p, &done, &reservations).await?;
        Ok(!stopped)
    }

    /// Apply entries `run` (a run of one tenant's Remembers, or one entry of any kind).
    async fn apply_run(&self, run: &[usize], decoded: &[Result<LoggedWrite>]) -> Result<Vec<Done>> {
        let writes = run
            .iter()
            .map(|&k| decoded[k].as_ref().map_err(Clone::clone))
            .collect::<Result<Vec<_>>>()?;
        let Some(first) = writes.first() else {
            return Ok(Vec::new());
        };
        let tenant = &first.tenant;
        match (&first.op, writes.len()) {
            (LogOp::Update(command), 1) => {
                self.pipeline.apply_update(tenant, command.clone()).await?;
                Ok(vec![Done::Applied])
            }
            (LogOp::Forget(target), 1) => {
                let n = self.pipeline.apply_forget(tenant, target.clone()).await?;
                Ok(vec![Done::Forgot(n)])
            }
            _ => {
                let memories = writes
                    .iter()
                    .filter_map(|w| match &w.op {
                        LogOp::Remember(m) => Some((**m).clone()),
                        _ => None,
                    })
                    .collect::<Vec<_>>();
                let n = memories.len();
                self.pipeline.embed_and_apply(tenant, memories).await?;
                Ok(vec![Done::Applied; n])
            }
        }
    }
}
