//! Indexing workers: each partition of the write log is worked by the replica holding its
//! lease, in log order. Runs of one tenant's Remembers are embedded and applied together. An
//! entry that fails for good (bad content, a memory that no longer exists) goes to the
//! dead-letter stream with the reason, and the partition moves on.
//!
//! Any other failure stops the partition, which tries again later (backing off) carefully: one
//! entry at a time, each after a probe of the embedding and retrieval services (or right after
//! an entry that went through). While the probe fails, it is an outage: nothing is tried and no
//! entry is blamed, so an outage delays writes but never discards them. An entry that fails
//! right after a passing probe is charged with the failure, and after `max_deliveries` charges
//! it goes to the dead-letter stream too.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument as _;

use engram_domain::api::{Fence, LogKind, LogOp, LoggedWrite, WriteFailure};
use engram_domain::error::Code;
use engram_domain::limits::Limits;
use engram_domain::model::{Memory, MemoryId, TenantId, Timestamp};
use engram_domain::{Error, Result};
use engram_telemetry::Metrics;
use engram_writelog::{Done, Entry, Read, WriteLog};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::watch;

use crate::Pipeline;
use crate::config::LogArgs;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    /// `write` (the write log) or `extract` (the extraction log).
    log: &'static str,
    partition: u32,
}

/// The write log's metrics.
#[derive(Clone)]
pub struct LogMetrics {
    backlog: Family<PartitionLabels, Gauge>,
    pending: Family<PartitionLabels, Gauge>,
    pub(crate) degraded: Counter,
    pub(crate) refused: Counter,
    pub(crate) extraction_lost: Counter,
    reclaimed: Counter,
    dead_lettered: Counter,
    fenced: Counter,
    batch_size: Histogram,
    to_indexed: Histogram,
}

impl LogMetrics {
    pub fn new(metrics: &Metrics) -> Self {
        let this = Self {
            backlog: Family::default(),
            pending: Family::default(),
            degraded: Counter::default(),
            refused: Counter::default(),
            extraction_lost: Counter::default(),
            reclaimed: Counter::default(),
            dead_lettered: Counter::default(),
            fenced: Counter::default(),
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
                "engram_extraction_not_queued",
                "Memories written with extract=true whose extraction could not be queued (Redis failed between the two appends)",
                &this.extraction_lost,
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
            (
                "engram_log_fenced_steps",
                "Indexing steps abandoned because the partition's lease moved to another worker while they ran (a stall longer than ENGRAM_LOG_CLAIM_IDLE)",
                &this.fenced,
            ),
        ] {
            metrics.register(name, help, metric.clone());
        }
        metrics.register(
            "engram_log_backlog",
            "Entries of a partition not yet indexed: its length and its lag (indexed entries are trimmed), sampled each second by its worker",
            this.backlog.clone(),
        );
        metrics.register(
            "engram_log_pending",
            "Entries of a partition delivered to a worker and not yet acknowledged, sampled each second",
            this.pending.clone(),
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

/// The running workers of one replica: one task per partition.
pub struct Workers {
    tasks: tokio::task::JoinSet<()>,
    stop: watch::Sender<bool>,
}

impl Workers {
    /// Start one worker task per partition of each log.
    pub fn spawn(
        pipeline: Arc<Pipeline>,
        logs: Vec<(WriteLog, LogKind)>,
        args: LogArgs,
        limits: Limits,
        metrics: LogMetrics,
    ) -> Self {
        let owner = format!("{}-{}", std::process::id(), uuid::Uuid::now_v7());
        let (stop, stopping) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        for (log, kind) in logs {
            for partition in 0..log.partitions() {
                let worker = PartitionWorker {
                    kind,
                    partition,
                    sampled: tokio::sync::Mutex::new(None),
                    owner: owner.clone(),
                    pipeline: pipeline.clone(),
                    log: log.clone(),
                    args: args.clone(),
                    limits: limits.clone(),
                    metrics: metrics.clone(),
                };
                tasks.spawn(worker.run(stopping.clone()));
            }
        }
        Self { tasks, stop }
    }

    /// Finish the batches in hand, release the leases and stop.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }

    /// Stop at once, wherever the workers are, as a crash would: batches in hand are neither
    /// finished nor acknowledged, and the leases stay until they expire
    /// (`ENGRAM_LOG_CLAIM_IDLE`), when another worker takes the partitions and their entries.
    pub async fn abort(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

struct PartitionWorker {
    kind: LogKind,
    partition: u32,
    /// When the depth was last sampled.
    sampled: tokio::sync::Mutex<Option<tokio::time::Instant>>,
    owner: String,
    pipeline: Arc<Pipeline>,
    log: WriteLog,
    args: LogArgs,
    limits: Limits,
    metrics: LogMetrics,
}

/// The first and the longest pause before a partition tries again after a failure.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Failures that another try cannot fix.
fn permanent(e: &Error) -> bool {
    matches!(
        e.code(),
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition | Code::OutOfRange
    )
}

/// Whether a failure of an entry is a wait rather than its fault: an Update, a Forget or an
/// extraction that met an outage (UNAVAILABLE: a cache's Redis, a provider) or backpressure
/// (RESOURCE_EXHAUSTED: the write log behind) is tried again later, never charged towards the
/// dead-letter stream — an erasure must not be dropped because Redis hiccuped.
fn waits(decoded: &Result<LoggedWrite>, e: &Error) -> bool {
    let change = matches!(
        decoded,
        Ok(LoggedWrite {
            op: LogOp::Update(_) | LogOp::Forget(_) | LogOp::Extract(_),
            ..
        })
    );
    change && matches!(e.code(), Code::Unavailable | Code::ResourceExhausted)
}

/// How a step works through its entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pace {
    /// Runs of one tenant's Remembers applied together; a failure stops the step without
    /// blaming anyone.
    Batched,
    /// After a failed step: one entry at a time, each after the pipeline proved healthy, so a
    /// failure is charged to the entry that caused it.
    Careful,
}

/// The runs a step applies, as index ranges of its entries: in [`Pace::Batched`], each run of
/// consecutive Remembers of one tenant together, anything else alone; in [`Pace::Careful`],
/// every entry alone.
fn runs(decoded: &[Result<LoggedWrite>], pace: Pace) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < decoded.len() {
        let mut end = i + 1;
        if pace == Pace::Batched
            && let Ok(LoggedWrite {
                op: LogOp::Remember(_),
                tenant,
                ..
            }) = &decoded[i]
        {
            while end < decoded.len()
                && matches!(&decoded[end], Ok(LoggedWrite { op: LogOp::Remember(_), tenant: t, .. }) if t == tenant)
            {
                end += 1;
            }
        }
        runs.push(i..end);
        i = end;
    }
    runs
}

/// The lease a step works under.
#[derive(Debug, Clone, Copy)]
struct Lease {
    /// Its epoch: what the step's applies, dead letters and finish are fenced with.
    epoch: u64,
    tenure: Tenure,
}

/// Whether this step is the first since the partition's lease was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tenure {
    /// Just taken: entries already delivered were another worker's (reclaimed).
    Taken,
    /// Held since an earlier step: delivered entries are this worker's own retries.
    Continued,
}

/// What a failed run leads to.
enum AfterFailure {
    /// Stop the step and try again later.
    Stop,
    /// The entry is finished as failed (dead-lettered); go on with the next.
    Settled(Done),
}

impl PartitionWorker {
    async fn run(self, mut stopping: watch::Receiver<bool>) {
        let p = self.partition;
        let lease_ttl = self.args.claim_idle.max(Duration::from_millis(300));
        let mut owned: Option<u64> = None;
        let mut tenure = Tenure::Continued;
        let mut pause = Duration::ZERO;
        while !*stopping.borrow() {
            if !pause.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stopping.changed() => break,
                }
            }
            let epoch = match self.log.lease(p, &self.owner, lease_ttl).await {
                Ok(Some(epoch)) => {
                    if owned != Some(epoch) {
                        owned = Some(epoch);
                        tenure = Tenure::Taken;
                        if let Err(e) = self.log.ensure_group(p).await {
                            tracing::warn!(partition = p, error = %e, "write log group");
                            owned = None;
                            pause = Duration::from_millis(500);
                            continue;
                        }
                    }
                    epoch
                }
                Ok(None) => {
                    owned = None;
                    pause = lease_ttl / 3;
                    continue;
                }
                Err(e) => {
                    tracing::debug!(partition = p, error = %e, "write log lease");
                    owned = None;
                    pause = Duration::from_millis(500);
                    continue;
                }
            };
            // After a failure, entries are tried carefully: one at a time, each after a probe.
            let pace = if pause.is_zero() {
                Pace::Batched
            } else {
                Pace::Careful
            };
            let lease = Lease { epoch, tenure };
            // The lease is renewed while the step runs; a step that loses it stops at once.
            let step = tokio::select! {
                step = self.step(lease_ttl / 3, pace, lease) => step,
                lost = self.keep(epoch, lease_ttl) => Err(lost),
            };
            pause = match step {
                Ok(true) => Duration::ZERO,
                // Try again later, backing off while it keeps failing.
                Ok(false) => (pause * 2).clamp(RETRY_MIN, RETRY_MAX),
                Err(Error::Aborted(reason)) => {
                    // Fenced: a newer worker has the partition and its entries (or the index
                    // has seen a newer epoch than the log's). Giving the lease up makes the
                    // next holder, maybe this worker, take it under a newer epoch.
                    tracing::warn!(partition = p, log = self.kind.as_str(), %reason, "indexing step abandoned: the partition's lease moved on");
                    self.metrics.fenced.inc();
                    if owned.take().is_some() {
                        let _ = self.log.release(p, &self.owner).await;
                    }
                    RETRY_MIN
                }
                Err(e) => {
                    tracing::warn!(partition = p, log = self.kind.as_str(), error = %e, "indexing from the write log");
                    // Redis may have lost the stream's consumer group (a flush, a restart
                    // without persistence): make sure of it again before the next read.
                    owned = None;
                    (pause * 2).clamp(RETRY_MIN, RETRY_MAX)
                }
            };
            tenure = Tenure::Continued;
        }
        if owned.is_some() {
            let _ = self.log.release(p, &self.owner).await;
        }
    }

    /// Renew the lease held under `epoch` every third of `ttl`, for as long as it is this
    /// worker's; the error that ends the step when it is not.
    async fn keep(&self, epoch: u64, ttl: Duration) -> Error {
        loop {
            tokio::time::sleep(ttl / 3).await;
            match self.log.lease(self.partition, &self.owner, ttl).await {
                Ok(Some(held)) if held == epoch => {}
                Ok(_) => {
                    return Error::Aborted(format!(
                        "the lease of partition {} lapsed during a step (epoch {epoch})",
                        self.partition
                    ));
                }
                // Redis is away: the step's own calls will say so.
                Err(_) => {}
            }
        }
    }

    /// Read and index one batch, waiting up to `block` for entries. Ok(false): stopped on a
    /// failure worth retrying later.
    async fn step(&self, block: Duration, pace: Pace, lease: Lease) -> Result<bool> {
        let p = self.partition;
        let max = self.args.batch_max.max(1);
        // Entries delivered before and never acknowledged (this worker's failed step, or a
        // worker that died) come first, in order.
        let mut entries = self.log.read(p, max, Read::Pending).await?;
        if !entries.is_empty() {
            if lease.tenure == Tenure::Taken {
                self.metrics.reclaimed.inc_by(entries.len() as u64);
            }
        } else {
            entries = self.log.read(p, max, Read::New { block }).await?;
            if !entries.is_empty() && entries.len() < max && !self.args.batch_wait.is_zero() {
                tokio::time::sleep(self.args.batch_wait).await;
                let more = self
                    .log
                    .read(
                        p,
                        max - entries.len(),
                        Read::New {
                            block: Duration::ZERO,
                        },
                    )
                    .await?;
                entries.extend(more);
            }
        }
        self.sample_depth().await;
        let (entries, trimmed): (Vec<Entry>, Vec<Entry>) =
            entries.into_iter().partition(|e| e.payload.is_some());
        if !trimmed.is_empty() {
            let ids: Vec<_> = trimmed.iter().map(|e| e.id).collect();
            tracing::warn!(partition = p, entries = ?ids, "delivered entries no longer in the stream (already finished); acknowledging them");
            self.log.ack_trimmed(p, &ids).await?;
        }
        if entries.is_empty() {
            return Ok(true);
        }
        self.metrics.batch_size.observe(entries.len() as f64);
        self.index(entries, pace, lease.epoch).await
    }

    /// Sample the partition's depth into the metrics, once a second at most.
    async fn sample_depth(&self) {
        let mut last = self.sampled.lock().await;
        if last.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last = Some(tokio::time::Instant::now());
        if let Ok(depth) = self.log.depth(self.partition).await {
            let labels = PartitionLabels {
                log: self.kind.as_str(),
                partition: self.partition,
            };
            self.metrics
                .backlog
                .get_or_create(&labels)
                .set(depth.backlog as i64);
            self.metrics
                .pending
                .get_or_create(&labels)
                .set(depth.pending as i64);
        }
    }

    /// Apply `entries` in order (in runs, see [`runs`]) and finish those applied or failed
    /// for good; false if it stopped on a failure to retry. In [`Pace::Careful`] each entry
    /// goes after the pipeline proved healthy — by a probe, or by the entry before it — so a
    /// poison write that also trips the provider's circuit makes the next entry's probe fail,
    /// not the next entry.
    async fn index(&self, entries: Vec<Entry>, pace: Pace, epoch: u64) -> Result<bool> {
        let p = self.partition;
        let fence = Fence {
            log: self.kind,
            partition: p,
            epoch,
        };
        let decoded: Vec<Result<LoggedWrite>> = entries
            .iter()
            .map(|e| LoggedWrite::decode(e.payload.as_deref().unwrap_or_default(), &self.limits))
            .collect();
        let mut done: Vec<(engram_domain::api::EntryId, Done)> = Vec::new();
        let mut healthy = false;
        let mut stopped = false;
        for run in runs(&decoded, pace) {
            if pace == Pace::Careful && !healthy {
                if !self.pipeline.healthy(self.kind).await {
                    tracing::info!(
                        partition = p,
                        "indexing paused: the embedding or retrieval service is failing"
                    );
                    stopped = true;
                    break;
                }
                healthy = true;
            }
            // Indexing is its own trace, linked to the requests that wrote these entries.
            let span = tracing::info_span!("ingest.index", partition = p, writes = run.len());
            for write in decoded[run.clone()].iter().filter_map(|w| w.as_ref().ok()) {
                engram_telemetry::trace::link_to(&span, &write.traceparent);
            }
            match self
                .apply_run(&decoded[run.clone()], fence)
                .instrument(span)
                .await
            {
                Ok(outcomes) => done.extend(run.map(|k| entries[k].id).zip(outcomes)),
                // The lease moved on: nothing of this step is this worker's to finish.
                Err(e @ Error::Aborted(_)) => return Err(e),
                Err(e) => {
                    healthy = false;
                    let first = run.start;
                    match self
                        .after_failure(&entries[first], &decoded[first], run.len(), pace, &e, epoch)
                        .await?
                    {
                        AfterFailure::Stop => {
                            stopped = true;
                            break;
                        }
                        AfterFailure::Settled(outcome) => done.push((entries[first].id, outcome)),
                    }
                }
            }
        }
        self.finish(&decoded, done, epoch).await?;
        Ok(!stopped)
    }

    /// Decide what a failed run leads to. A run of several stops the step, to be tried one
    /// entry at a time; a lone entry that failed for good, or ran out of tries while the
    /// pipeline was healthy, is dead-lettered with its failure.
    async fn after_failure(
        &self,
        entry: &Entry,
        decoded: &Result<LoggedWrite>,
        run_len: usize,
        pace: Pace,
        e: &Error,
        epoch: u64,
    ) -> Result<AfterFailure> {
        let p = self.partition;
        if waits(decoded, e) {
            tracing::info!(partition = p, entry = %entry.id, error = %e, "a change or an extraction waits for a dependency; will retry");
            return Ok(AfterFailure::Stop);
        }
        let failures = if permanent(e) {
            None
        } else if pace == Pace::Careful {
            Some(self.log.charge_failure(p, entry.id).await?)
        } else {
            tracing::info!(partition = p, entry = %entry.id, error = %e, "indexing failed; will retry one at a time");
            return Ok(AfterFailure::Stop);
        };
        if run_len > 1 {
            // A permanent failure of a run: find its entry one at a time.
            return Ok(AfterFailure::Stop);
        }
        if failures.is_some_and(|n| n < self.args.max_deliveries) {
            tracing::info!(partition = p, entry = %entry.id, failures, error = %e, "indexing failed; will retry");
            return Ok(AfterFailure::Stop);
        }
        let failure = WriteFailure::of(e);
        let held = decoded
            .as_ref()
            .map(|w| w.reservations.clone())
            .unwrap_or_default();
        self.log
            .dead_letter(p, epoch, entry, &failure.message, &held)
            .await?;
        self.metrics.dead_lettered.inc();
        tracing::warn!(partition = p, entry = %entry.id, reason = %failure.message, "write moved to the dead-letter stream");
        Ok(AfterFailure::Settled(Done::Failed(failure)))
    }

    /// Record the finished entries (the first `done.len()` of `decoded`, in order): their
    /// outcomes, the end of the applied ones' reservations, their write-to-indexed times.
    async fn finish(
        &self,
        decoded: &[Result<LoggedWrite>],
        done: Vec<(engram_domain::api::EntryId, Done)>,
        epoch: u64,
    ) -> Result<()> {
        let now_ms = Timestamp::now().as_micros() / 1000;
        let mut reservations = Vec::new();
        for (write, (_, outcome)) in decoded.iter().zip(&done) {
            if let Ok(write) = write {
                if matches!(outcome, Done::Applied) {
                    reservations.extend(write.reservations.iter().cloned());
                }
                let waited = (now_ms - write.submitted_unix_ms).max(0) as f64 / 1000.0;
                self.metrics.to_indexed.observe(waited);
            }
        }
        self.log
            .finish(self.partition, epoch, &done, &reservations)
            .await
    }

    /// The memories of a run of Remembers that stand: all but derived facts whose source was
    /// forgotten or changed since they were extracted (by a change logged before them).
    async fn standing(&self, tenant: &TenantId, writes: &[&LoggedWrite]) -> Result<Vec<Memory>> {
        let mut sources: HashMap<MemoryId, bool> = HashMap::new();
        // A source written earlier in this run is not in the index yet, but stands.
        for write in writes {
            if let LogOp::Remember(memory) = &write.op {
                sources.insert(memory.id, true);
            }
        }
        let mut memories = Vec::new();
        for write in writes {
            let LogOp::Remember(memory) = &write.op else {
                continue;
            };
            if let Some(derived) = &write.derived_from {
                let stands = match sources.get(&derived.source) {
                    Some(stands) => *stands,
                    None => {
                        let stands = self.pipeline.stands(tenant, derived).await?;
                        sources.insert(derived.source, stands);
                        stands
                    }
                };
                if !stands {
                    tracing::debug!(memory = %memory.id, source = %derived.source, "a fact whose source is gone or changed is not stored");
                    continue;
                }
            }
            memories.push((**memory).clone());
        }
        Ok(memories)
    }

    /// Apply a run of entries (a run of one tenant's Remembers, or one entry of any kind).
    async fn apply_run(&self, run: &[Result<LoggedWrite>], fence: Fence) -> Result<Vec<Done>> {
        let fence = Some(fence);
        let writes = run
            .iter()
            .map(|w| w.as_ref().map_err(Clone::clone))
            .collect::<Result<Vec<_>>>()?;
        let Some(first) = writes.first() else {
            return Ok(Vec::new());
        };
        let tenant = &first.tenant;
        match (&first.op, writes.len()) {
            (LogOp::Update(command), 1) => {
                self.pipeline
                    .apply_update(tenant, command.clone(), fence)
                    .await?;
                Ok(vec![Done::Applied])
            }
            (LogOp::Forget(target), 1) => {
                let receipt = self
                    .pipeline
                    .apply_forget(tenant, target.clone(), fence)
                    .await?;
                Ok(vec![Done::Forgot(receipt)])
            }
            (LogOp::Extract(memory), 1) => {
                let stored = self.pipeline.extract_facts(tenant, memory).await?;
                tracing::debug!(source = %memory.id, facts = stored, "facts extracted");
                Ok(vec![Done::Applied])
            }
            _ => {
                let n = writes.len();
                let memories = self.standing(tenant, &writes).await?;
                self.pipeline
                    .embed_and_apply(tenant, memories, fence)
                    .await?;
                Ok(vec![Done::Applied; n])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engram_domain::api::ForgetTarget;
    use engram_domain::model::{Memory, MemoryId, NewMemory, Scope, TenantId};

    fn write(tenant: &str, op: LogOp) -> Result<LoggedWrite> {
        Ok(LoggedWrite {
            tenant: TenantId::parse(tenant).unwrap(),
            op,
            submitted_unix_ms: 0,
            reservations: Vec::new(),
            traceparent: String::new(),
            derived_from: None,
        })
    }

    fn remember(tenant: &str) -> Result<LoggedWrite> {
        let memory = Memory::from_input(
            MemoryId::new_time_ordered(),
            TenantId::parse(tenant).unwrap(),
            Scope::user("u"),
            NewMemory::text("x"),
            Timestamp::now(),
        );
        write(tenant, LogOp::Remember(Box::new(memory)))
    }

    #[test]
    fn runs_group_one_tenant_s_consecutive_remembers_and_nothing_else() {
        let forget = || write("a", LogOp::Forget(ForgetTarget::Scope(Scope::user("u"))));
        let broken = || Err(Error::invalid("op", "not a LogEntry"));
        let entries = vec![
            remember("a"),
            remember("a"),
            remember("b"),
            forget(),
            broken(),
            remember("a"),
            remember("a"),
        ];
        assert_eq!(
            runs(&entries, Pace::Batched),
            vec![0..2, 2..3, 3..4, 4..5, 5..7]
        );
        assert_eq!(runs(&entries, Pace::Careful).len(), entries.len());
        assert!(runs(&[], Pace::Batched).is_empty());
    }
}
