//! [`VectorStore`] on the embedded qdrant-edge engine.
//!
//! The engine is synchronous, so every call runs on tokio's blocking pool (reads bounded by a
//! semaphore so a burst of queries cannot spawn a thread each). Its `flush` asserts that no
//! update holds the WAL and that the segment holder is not being swapped, panicking otherwise:
//! updates and flushes are serialised by `write_lock`, and a flush that meets an optimiser's
//! brief segment swap is retried. Optimisation runs in the background beside both; queries take
//! no lock of ours and keep being served throughout.
//!
//! qdrant-edge 0.7.2 writes a WAL but does not replay it when a shard is loaded, so a write is
//! durable only once the segments are flushed: [`VectorStore::apply`] returns only once a flush
//! that began after its writes has finished. Flushes are group commits: applies that finish
//! writing while a flush runs wait for the next one, which covers them all, so concurrent
//! applies share flushes instead of queueing one each.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use engram_domain::api::{ApplyOutcome, DuplicateMatch, IndexOp, IndexWrites, IndexedMemory};
use engram_domain::model::{Memory, MemoryId, Scope, TenantId};
use parking_lot::{MappedRwLockReadGuard, Mutex, RwLock, RwLockReadGuard};
use qdrant_edge::{
    CountRequest, CreateIndex, CreateVectorName, Distance, EdgeConfig, EdgeOptimizersConfig,
    EdgeShard, EdgeSparseVectorParams, EdgeVectorParams, FieldIndexOperations, Filter,
    IntegerIndexParams, KeywordIndexParams, Modifier, NamedQuery, PayloadFieldSchema,
    PayloadSchemaParams, PayloadSchemaType, PointId, PointInsertOperations, PointOperations,
    PointStructPersisted, QueryEnum, QueryRequest, Record, ScoringQuery, ScrollRequest,
    SparseVectorConfig, UpdateOperation, VectorInternal, VectorNameConfig, VectorNameOperations,
    VectorPersisted, VectorStructPersisted, WithPayloadInterface, WithVector,
};
use tokio::sync::{Semaphore, oneshot};

use crate::error::{StoreError, StoreResult};
use crate::{
    Candidate, DENSE, KEYWORDS, Selection, StoreInfo, StoreQuery, VectorStore, check_dimension,
    check_point, filter, payload,
};

#[derive(Debug, Clone)]
pub struct EdgeStoreConfig {
    /// Directory of the shard; created if missing.
    pub path: PathBuf,
    /// Dimension of the dense vectors (the embedding model's).
    pub dimension: usize,
    /// How often the background loop flushes writes not yet on disk.
    pub flush_interval: Duration,
    /// How often the background loop lets the engine merge and index segments.
    pub optimize_interval: Duration,
    /// Engine reads running at once; more wait.
    pub max_concurrent_reads: usize,
    /// Size (KB of vectors) above which a segment gets an HNSW index; the engine's default
    /// when `None`.
    pub indexing_threshold_kb: Option<usize>,
}

impl EdgeStoreConfig {
    pub fn new(path: impl Into<PathBuf>, dimension: usize) -> Self {
        Self {
            path: path.into(),
            dimension,
            flush_interval: Duration::from_secs(1),
            optimize_interval: Duration::from_secs(10),
            max_concurrent_reads: std::thread::available_parallelism()
                .map(|n| n.get() * 2)
                .unwrap_or(4),
            indexing_threshold_kb: None,
        }
    }
}

struct Inner {
    /// `None` once closed; taken out so the engine is dropped where its flush-on-drop cannot
    /// panic an async worker.
    shard: RwLock<Option<EdgeShard>>,
    write_lock: Mutex<()>,
    /// Writes applied since the last flush.
    dirty: AtomicBool,
    /// Applies so far (counted under `write_lock`), and how many of them the last finished
    /// flush covers.
    applied: AtomicU64,
    flushed: AtomicU64,
    /// Held by the apply that is flushing for everyone.
    flush_lock: Mutex<()>,
    closed: AtomicBool,
    dimension: usize,
    /// The BM25 weights of each point's text.
    keywords: crate::Keywords,
}

pub struct EdgeStore {
    inner: Arc<Inner>,
    reads: Arc<Semaphore>,
    background: Mutex<Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>>,
    path: PathBuf,
}

impl std::fmt::Debug for EdgeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn engine(operation: &'static str) -> impl Fn(qdrant_edge::OperationError) -> StoreError {
    move |e| StoreError::Engine {
        operation,
        message: e.to_string(),
    }
}

/// The engine's schema for each of [`payload::INDEXED`].
fn payload_indexes() -> Vec<(&'static str, PayloadFieldSchema)> {
    payload::INDEXED
        .iter()
        .map(|(field, kind)| {
            let schema = match kind {
                payload::IndexKind::Tenant => PayloadFieldSchema::FieldParams(
                    PayloadSchemaParams::Keyword(KeywordIndexParams {
                        is_tenant: Some(true),
                        ..Default::default()
                    }),
                ),
                payload::IndexKind::Keyword => {
                    PayloadFieldSchema::FieldType(PayloadSchemaType::Keyword)
                }
                payload::IndexKind::Range => PayloadFieldSchema::FieldParams(
                    PayloadSchemaParams::Integer(IntegerIndexParams {
                        lookup: Some(false),
                        range: Some(true),
                        ..Default::default()
                    }),
                ),
            };
            (*field, schema)
        })
        .collect()
}

fn open_shard(config: &EdgeStoreConfig) -> StoreResult<EdgeShard> {
    let (path, dimension) = (config.path.as_path(), config.dimension);
    let open_error = |reason: String| StoreError::Open {
        path: path.display().to_string(),
        reason,
    };
    let in_use = |e: qdrant_edge::OperationError| {
        let message = e.to_string();
        if message.contains("WouldBlock") {
            open_error(
                "it is in use by another engram process (its write-ahead log is locked)".into(),
            )
        } else {
            open_error(message)
        }
    };
    let shard = if path.join("edge_config.json").exists() {
        let shard = EdgeShard::load(path, None).map_err(in_use)?;
        let existing = shard.config().vectors.get(DENSE).map(|v| v.size);
        if existing != Some(dimension) {
            return Err(open_error(format!(
                "it holds {}-dimensional vectors but the embedding model produces {dimension}; \
                 use a new data directory or re-index with the original model",
                existing.map_or_else(|| "no dense".to_string(), |d| d.to_string())
            )));
        }
        shard
    } else {
        std::fs::create_dir_all(path).map_err(|e| open_error(e.to_string()))?;
        let edge_config = EdgeConfig::builder()
            .vector(
                DENSE,
                EdgeVectorParams::builder(dimension, Distance::Cosine).build(),
            )
            .sparse_vector(
                KEYWORDS,
                EdgeSparseVectorParams::builder()
                    .modifier(Modifier::Idf)
                    .build(),
            )
            .on_disk_payload(true)
            .optimizers(EdgeOptimizersConfig {
                indexing_threshold: config.indexing_threshold_kb,
                ..Default::default()
            })
            .build();
        EdgeShard::new(path, edge_config).map_err(in_use)?
    };
    if !shard.config().sparse_vectors.contains_key(KEYWORDS) {
        // A shard from before keyword search: add the sparse vector. Memories already in it
        // are found by keyword search once they are written again.
        shard
            .update(UpdateOperation::VectorNameOperation(
                VectorNameOperations::CreateVectorName(CreateVectorName {
                    vector_name: KEYWORDS.into(),
                    config: VectorNameConfig::sparse(SparseVectorConfig {
                        modifier: Some(Modifier::Idf),
                        datatype: None,
                    }),
                }),
            ))
            .map_err(|e| open_error(format!("adding the keyword index: {e}")))?;
        tracing::warn!(
            path = %path.display(),
            "this index predates keyword search: added the keyword vector; memories stored \
             before now are found by SEMANTIC search and by KEYWORD search once rewritten"
        );
    }
    let existing = shard.info().payload_schema;
    for (field, schema) in payload_indexes() {
        let name = field
            .parse()
            .map_err(|_| open_error(format!("invalid payload field {field}")))?;
        if existing.contains_key(&name) {
            continue;
        }
        shard
            .update(UpdateOperation::FieldIndexOperation(
                FieldIndexOperations::CreateIndex(CreateIndex {
                    field_name: name,
                    field_schema: Some(schema),
                }),
            ))
            .map_err(|e| open_error(format!("creating the index on {field}: {e}")))?;
    }
    catch_panic("flush", || shard.flush())?;
    Ok(shard)
}

impl EdgeStore {
    /// Open the shard at `config.path` (creating it if missing) and start the background
    /// flush and optimisation loop.
    pub async fn open(config: EdgeStoreConfig) -> StoreResult<Self> {
        let started = Instant::now();
        let open_config = config.clone();
        let shard = tokio::task::spawn_blocking(move || open_shard(&open_config))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        let points = shard.info().points_count;
        let inner = Arc::new(Inner {
            shard: RwLock::new(Some(shard)),
            write_lock: Mutex::new(()),
            dirty: AtomicBool::new(false),
            applied: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            flush_lock: Mutex::new(()),
            closed: AtomicBool::new(false),
            dimension: config.dimension,
            keywords: crate::Keywords::new(),
        });
        tracing::info!(
            path = %config.path.display(),
            points,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "opened the embedded vector store"
        );
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(background(inner.clone(), config.clone(), stopped));
        Ok(Self {
            inner,
            reads: Arc::new(Semaphore::new(config.max_concurrent_reads.max(1))),
            background: Mutex::new(Some((stop, task))),
            path: config.path,
        })
    }

    async fn read<T: Send + 'static>(
        &self,
        operation: &'static str,
        f: impl FnOnce(&Inner) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let _permit = self.reads.acquire().await.map_err(|_| StoreError::Closed)?;
        self.blocking(operation, f).await
    }

    /// A query as the engine's vector and the named vector it searches; `None` when it can
    /// match nothing (a keyword query of stop words only).
    fn vector(&self, query: StoreQuery) -> StoreResult<Option<(VectorInternal, &'static str)>> {
        match query {
            StoreQuery::Dense(vector) => {
                check_dimension("(query)", &vector, self.inner.dimension)?;
                Ok(Some((VectorInternal::Dense(vector), DENSE)))
            }
            StoreQuery::Keywords(terms) if terms.indices.is_empty() => Ok(None),
            StoreQuery::Keywords(terms) => {
                let terms =
                    qdrant_edge::SparseVector::new(terms.indices, terms.values).map_err(|e| {
                        StoreError::InvalidVector {
                            id: "(query)".into(),
                            reason: e.to_string(),
                        }
                    })?;
                Ok(Some((VectorInternal::Sparse(terms), KEYWORDS)))
            }
        }
    }

    async fn run_query(&self, query: QueryRequest) -> StoreResult<Vec<Candidate>> {
        self.read("search", move |inner| {
            let points = inner.shard()?.query(query).map_err(engine("search"))?;
            points
                .into_iter()
                .map(|p| {
                    let id = memory_id(p.id)?.as_uuid();
                    let payload = p.payload.ok_or_else(|| StoreError::CorruptPayload {
                        id: id.to_string(),
                        reason: "no payload".into(),
                    })?;
                    payload::candidate(id, p.score, &payload.0)
                })
                .collect()
        })
        .await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        operation: &'static str,
        f: impl FnOnce(&Inner) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Task(format!("{operation}: {e}")))?
    }
}

/// Flush on an interval when there are unflushed writes, and optimise segments on another.
async fn background(inner: Arc<Inner>, config: EdgeStoreConfig, mut stop: oneshot::Receiver<()>) {
    let mut flush = tokio::time::interval(config.flush_interval);
    let mut optimize = tokio::time::interval(config.optimize_interval);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    optimize.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = flush.tick() => {
                if inner.dirty.load(Ordering::Acquire) {
                    let inner = inner.clone();
                    match tokio::task::spawn_blocking(move || inner.flush()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::error!(error = %e, "periodic index flush failed"),
                        Err(e) => tracing::error!(error = %e, "periodic index flush task failed"),
                    }
                }
            }
            _ = optimize.tick() => {
                let inner = inner.clone();
                match tokio::task::spawn_blocking(move || inner.optimize()).await {
                    Ok(Ok(true)) => tracing::debug!("optimised index segments"),
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "index optimisation failed"),
                    Err(e) => tracing::error!(error = %e, "index optimisation task failed"),
                }
            }
        }
    }
}

/// Run an engine call that reports some failures by panicking (its flush does), as an error.
fn catch_panic<T>(operation: &'static str, f: impl FnOnce() -> T) -> StoreResult<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the engine panicked".to_string());
        StoreError::Engine { operation, message }
    })
}

impl Inner {
    fn shard(&self) -> StoreResult<MappedRwLockReadGuard<'_, EdgeShard>> {
        RwLockReadGuard::try_map(self.shard.read(), Option::as_ref).map_err(|_| StoreError::Closed)
    }

    fn flush(&self) -> StoreResult<()> {
        const ATTEMPTS: u32 = 5;
        let _write = self.write_lock.lock();
        let shard = self.shard()?;
        self.dirty.store(false, Ordering::Release);
        let covers = self.applied.load(Ordering::Acquire);
        let mut attempt = 1;
        loop {
            match catch_panic("flush", || shard.flush()) {
                Ok(()) => {
                    self.flushed.fetch_max(covers, Ordering::AcqRel);
                    return Ok(());
                }
                // The optimiser swapping segments holds the lock the flush asserts is free.
                Err(e) if attempt < ATTEMPTS && e.to_string().contains("lock acquired") => {
                    std::thread::sleep(Duration::from_millis(2 * u64::from(attempt)));
                    attempt += 1;
                }
                Err(e) => {
                    self.dirty.store(true, Ordering::Release);
                    return Err(e);
                }
            }
        }
    }

    /// Flush and drop the engine; later calls fail with [`StoreError::Closed`].
    fn close(&self) -> StoreResult<()> {
        let flushed = self.flush();
        let shard = self.shard.write().take();
        self.closed.store(true, Ordering::Release);
        // Dropping flushes again, and panics if that fails.
        catch_panic("close", move || drop(shard))?;
        flushed
    }

    fn optimize(&self) -> StoreResult<bool> {
        let optimized = self.shard()?.optimize().map_err(engine("optimize"))?;
        if optimized {
            self.dirty.store(true, Ordering::Release);
        }
        Ok(optimized)
    }

    fn apply(&self, tenant: &TenantId, ops: Vec<IndexOp>) -> StoreResult<ApplyOutcome> {
        let mut outcome = ApplyOutcome::default();
        let this = {
            let _write = self.write_lock.lock();
            let mut pending_upserts: Vec<PointStructPersisted> = Vec::new();
            for op in ops {
                match op {
                    IndexOp::Upsert(indexed) => {
                        pending_upserts.push(self.point(tenant, *indexed)?);
                        continue;
                    }
                    IndexOp::DeleteIds(ids) => {
                        outcome.upserted += self.upsert(&mut pending_upserts)?;
                        outcome.deleted += self.delete(filter::ids(tenant, &ids).to_edge())?;
                    }
                    IndexOp::DeleteScope(scope) => {
                        outcome.upserted += self.upsert(&mut pending_upserts)?;
                        outcome.deleted += self.delete(filter::scope(tenant, &scope).to_edge())?;
                    }
                }
            }
            outcome.upserted += self.upsert(&mut pending_upserts)?;
            self.dirty.store(true, Ordering::Release);
            self.applied.fetch_add(1, Ordering::AcqRel) + 1
        };
        // Durable before acknowledged: the engine does not replay its WAL on load.
        self.flush_through(this)?;
        Ok(outcome)
    }

    /// Return once a flush covering apply number `apply` has finished: wait for the flush in
    /// progress, which may already cover it, and flush if it did not.
    fn flush_through(&self, apply: u64) -> StoreResult<()> {
        let _flushing = self.flush_lock.lock();
        if self.flushed.load(Ordering::Acquire) >= apply {
            return Ok(());
        }
        self.flush()
    }

    fn point(
        &self,
        tenant: &TenantId,
        indexed: IndexedMemory,
    ) -> StoreResult<PointStructPersisted> {
        check_point(tenant, &indexed, self.dimension)?;
        let IndexedMemory { memory, dense } = indexed;
        let sparse = self.keywords.document(&memory.text);
        let mut vectors = HashMap::from([(
            DENSE.to_string(),
            VectorPersisted::from(VectorInternal::Dense(dense)),
        )]);
        if !sparse.indices.is_empty() {
            let sparse =
                qdrant_edge::SparseVector::new(sparse.indices, sparse.values).map_err(|e| {
                    StoreError::InvalidVector {
                        id: memory.id.to_string(),
                        reason: e.to_string(),
                    }
                })?;
            vectors.insert(KEYWORDS.to_string(), VectorPersisted::Sparse(sparse));
        }
        Ok(PointStructPersisted {
            id: filter::point_id(memory.id),
            vector: VectorStructPersisted::Named(vectors),
            payload: Some(qdrant_edge::Payload(payload::to_payload(&memory))),
        })
    }

    fn upsert(&self, points: &mut Vec<PointStructPersisted>) -> StoreResult<u64> {
        if points.is_empty() {
            return Ok(0);
        }
        let points = std::mem::take(points);
        let count = points.len() as u64;
        self.shard()?
            .update(UpdateOperation::PointOperation(
                PointOperations::UpsertPoints(PointInsertOperations::PointsList(points)),
            ))
            .map_err(engine("upsert"))?;
        Ok(count)
    }

    fn delete(&self, filter: Filter) -> StoreResult<u64> {
        let matching = self.count(filter.clone())?;
        if matching > 0 {
            self.shard()?
                .update(UpdateOperation::PointOperation(
                    PointOperations::DeletePointsByFilter(filter),
                ))
                .map_err(engine("delete"))?;
        }
        Ok(matching)
    }

    fn count(&self, filter: Filter) -> StoreResult<u64> {
        self.shard()?
            .count(CountRequest {
                filter: Some(filter),
                exact: true,
            })
            .map(|n| n as u64)
            .map_err(engine("count"))
    }

    fn scroll(
        &self,
        filter: Filter,
        limit: usize,
        start: Option<PointId>,
    ) -> StoreResult<(Vec<Record>, Option<PointId>)> {
        self.shard()?
            .scroll(ScrollRequest {
                offset: start,
                limit: Some(limit),
                filter: Some(filter),
                with_payload: Some(WithPayloadInterface::Bool(true)),
                with_vector: WithVector::Bool(false),
                order_by: None,
            })
            .map_err(engine("scroll"))
    }
}

fn record_memory(id: PointId, payload: Option<&qdrant_edge::Payload>) -> StoreResult<Memory> {
    let uuid = match id {
        PointId::Uuid(uuid) => uuid,
        PointId::NumId(n) => {
            return Err(StoreError::CorruptPayload {
                id: n.to_string(),
                reason: "numeric point id; engram writes UUIDs".into(),
            });
        }
    };
    let payload = payload.ok_or_else(|| StoreError::CorruptPayload {
        id: uuid.to_string(),
        reason: "no payload".into(),
    })?;
    payload::from_payload(uuid, &payload.0)
}

fn memory_id(id: PointId) -> StoreResult<MemoryId> {
    match id {
        PointId::Uuid(uuid) => Ok(MemoryId::from_uuid(uuid)),
        PointId::NumId(n) => Err(StoreError::CorruptPayload {
            id: n.to_string(),
            reason: "numeric point id; engram writes UUIDs".into(),
        }),
    }
}

#[async_trait]
impl VectorStore for EdgeStore {
    fn dimension(&self) -> usize {
        self.inner.dimension
    }

    async fn apply(&self, tenant: &TenantId, writes: IndexWrites) -> StoreResult<ApplyOutcome> {
        let tenant = tenant.clone();
        self.blocking("apply", move |inner| inner.apply(&tenant, writes.ops))
            .await
    }

    async fn search(
        &self,
        selection: &Selection,
        query: StoreQuery,
        limit: usize,
    ) -> StoreResult<Vec<Candidate>> {
        let Some((vector, using)) = self.vector(query)? else {
            // Nothing but stop words: no memory matches by keyword.
            return Ok(Vec::new());
        };
        self.run_query(QueryRequest {
            prefetches: vec![],
            query: Some(ScoringQuery::Vector(QueryEnum::Nearest(NamedQuery {
                query: vector,
                using: Some(using.to_string()),
            }))),
            filter: Some(filter::selection(selection).to_edge()),
            score_threshold: None,
            limit,
            offset: 0,
            params: None,
            with_vector: WithVector::Bool(false),
            with_payload: WithPayloadInterface::Fields(
                payload::CANDIDATE_FIELDS
                    .iter()
                    .map(|&field| filter::path(field))
                    .collect(),
            ),
        })
        .await
    }

    async fn get(&self, tenant: &TenantId, ids: &[MemoryId]) -> StoreResult<Vec<Memory>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let filter = filter::ids(tenant, ids).to_edge();
        let limit = ids.len();
        self.read("get", move |inner| {
            let (records, _) = inner.scroll(filter, limit, None)?;
            records
                .into_iter()
                .map(|r| record_memory(r.id, r.payload.as_ref()))
                .collect()
        })
        .await
    }

    async fn list(
        &self,
        selection: &Selection,
        limit: usize,
        start: Option<MemoryId>,
    ) -> StoreResult<(Vec<Memory>, Option<MemoryId>)> {
        let filter = filter::selection(selection).to_edge();
        self.read("list", move |inner| {
            let (records, next) = inner.scroll(filter, limit, start.map(filter::point_id))?;
            let memories = records
                .into_iter()
                .map(|r| record_memory(r.id, r.payload.as_ref()))
                .collect::<StoreResult<Vec<_>>>()?;
            Ok((memories, next.map(memory_id).transpose()?))
        })
        .await
    }

    async fn find_duplicates(
        &self,
        tenant: &TenantId,
        scope: &Scope,
        content_hashes: Vec<String>,
        idempotency_keys: Vec<String>,
    ) -> StoreResult<Vec<DuplicateMatch>> {
        if content_hashes.is_empty() && idempotency_keys.is_empty() {
            return Ok(Vec::new());
        }
        let limit = filter::duplicates_limit(&content_hashes, &idempotency_keys);
        let filter =
            filter::duplicates(tenant, scope, &content_hashes, &idempotency_keys).to_edge();
        self.read("find_duplicates", move |inner| {
            let (records, _) = inner.scroll(filter, limit, None)?;
            records
                .into_iter()
                .map(|r| {
                    let memory = record_memory(r.id, r.payload.as_ref())?;
                    Ok(DuplicateMatch {
                        id: memory.id,
                        content_hash: memory.content_hash,
                        idempotency_key: memory.idempotency_key,
                    })
                })
                .collect()
        })
        .await
    }

    async fn count_selected(&self, selection: &Selection) -> StoreResult<u64> {
        let filter = filter::selection(selection).to_edge();
        self.read("count", move |inner| inner.count(filter)).await
    }

    async fn count(&self, tenant: Option<&TenantId>) -> StoreResult<u64> {
        let filter = tenant.map(|t| filter::tenant_only(t).to_edge());
        self.read("count", move |inner| match filter {
            Some(filter) => inner.count(filter),
            None => Ok(inner.shard()?.info().points_count as u64),
        })
        .await
    }

    async fn info(&self) -> StoreResult<StoreInfo> {
        self.read("info", |inner| {
            let info = inner.shard()?.info();
            Ok(StoreInfo {
                points: info.points_count as u64,
                segments: info.segments_count as u64,
                indexed_vectors: info.indexed_vectors_count as u64,
            })
        })
        .await
    }

    async fn close(&self) -> StoreResult<()> {
        let background = self.background.lock().take();
        if let Some((stop, task)) = background {
            let _ = stop.send(());
            let _ = task.await;
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.close())
            .await
            .map_err(|e| StoreError::Task(format!("close: {e}")))??;
        tracing::info!(path = %self.path.display(), "vector store flushed and closed");
        Ok(())
    }
}

impl Drop for EdgeStore {
    fn drop(&mut self) {
        if let Some((stop, task)) = self.background.lock().take() {
            let _ = stop.send(());
            task.abort();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Not closed (a crash path, or a test that failed): flush what we can, never panic.
        if let Some(shard) = self.shard.get_mut().take()
            && let Err(e) = catch_panic("drop", move || drop(shard))
        {
            tracing::error!(error = %e, "the vector store could not be flushed when dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keywords;
    use std::path::Path;

    use crate::contract::{DIM, memory, selection, tenant, unit, upsert};

    async fn open(dir: &Path) -> EdgeStore {
        EdgeStore::open(EdgeStoreConfig::new(dir.join("index"), DIM))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn an_index_from_before_keyword_search_gains_the_keyword_vector() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index");
        std::fs::create_dir_all(&path).unwrap();
        let old = EdgeShard::new(
            &path,
            EdgeConfig::builder()
                .vector(
                    DENSE,
                    EdgeVectorParams::builder(DIM, Distance::Cosine).build(),
                )
                .build(),
        )
        .unwrap();
        drop(old);
        let store = open(dir.path()).await;
        let t = tenant("t");
        let m = memory(&t, "u", "kayaking on lake tahoe");
        store
            .apply(&t, IndexWrites::new(vec![upsert(&m, 0)]))
            .await
            .unwrap();
        let hits = store
            .search(
                &selection(&t, "u"),
                StoreQuery::Keywords(Keywords::new().query("tahoe")),
                5,
            )
            .await
            .unwrap();
        assert_eq!(hits.len(), 1);
        store.close().await.unwrap();
    }

    const CRASH_DIR: &str = "ENGRAM_STORE_TEST_CRASH_DIR";

    /// Runs only as the child of `acknowledged_writes_survive_a_crash`: write, then die
    /// without closing anything.
    #[tokio::test]
    async fn crash_child_writes_then_aborts() {
        let Ok(dir) = std::env::var(CRASH_DIR) else {
            return;
        };
        let store = open(Path::new(&dir)).await;
        let t = tenant("t");
        let m = memory(&t, "u", "durable");
        store
            .apply(&t, IndexWrites::new(vec![upsert(&m, 3)]))
            .await
            .unwrap();
        println!("acknowledged={}", m.id);
        std::process::abort();
    }

    #[tokio::test]
    async fn acknowledged_writes_survive_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "edge::tests::crash_child_writes_then_aborts",
                "--nocapture",
            ])
            .env(CRASH_DIR, dir.path())
            .output()
            .unwrap();
        assert!(!output.status.success(), "the child was meant to abort");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let id: MemoryId = stdout
            .lines()
            .find_map(|l| l.strip_prefix("acknowledged="))
            .unwrap_or_else(|| panic!("child did not acknowledge a write: {stdout}"))
            .parse()
            .unwrap();
        let store = open(dir.path()).await;
        let t = tenant("t");
        assert_eq!(store.get(&t, &[id]).await.unwrap().len(), 1);
        assert_eq!(store.count(Some(&t)).await.unwrap(), 1);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn vectors_of_another_dimension_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = tenant("t");
        let store = open(dir.path()).await;
        let wrong = IndexOp::Upsert(Box::new(IndexedMemory {
            memory: memory(&t, "u", "x"),
            dense: vec![1.0; DIM + 1],
        }));
        let err = store
            .apply(&t, IndexWrites::new(vec![wrong]))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::DimensionMismatch { .. }), "{err}");
        assert_eq!(store.count(Some(&t)).await.unwrap(), 0);
        store.close().await.unwrap();
        drop(store);
        let err = EdgeStore::open(EdgeStoreConfig::new(dir.path().join("index"), DIM * 2))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("8-dimensional"), "{err}");
    }

    #[tokio::test]
    async fn a_second_opener_gets_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let err = EdgeStore::open(EdgeStoreConfig::new(dir.path().join("index"), DIM))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
        store.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_and_queries_continue_while_segments_are_optimised() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = EdgeStoreConfig::new(dir.path().join("index"), DIM);
        config.indexing_threshold_kb = Some(1);
        config.optimize_interval = Duration::from_millis(5);
        let store = Arc::new(EdgeStore::open(config).await.unwrap());
        let t = tenant("t");
        let writer = {
            let (store, t) = (store.clone(), t.clone());
            tokio::spawn(async move {
                let mut written = 0u64;
                for round in 0..40 {
                    let batch: Vec<IndexOp> = (0..50)
                        .map(|i| upsert(&memory(&t, "u", &format!("m {round} {i}")), i))
                        .collect();
                    written += store
                        .apply(&t, IndexWrites::new(batch))
                        .await
                        .unwrap()
                        .upserted;
                }
                written
            })
        };
        let mut searches = 0;
        while !writer.is_finished() {
            store
                .search(&selection(&t, "u"), StoreQuery::Dense(unit(1)), 5)
                .await
                .unwrap();
            searches += 1;
        }
        let written = writer.await.unwrap();
        assert!(searches > 0);
        assert_eq!(store.count(Some(&t)).await.unwrap(), written);
        let info = store.info().await.unwrap();
        assert!(
            info.indexed_vectors > 0,
            "the optimiser never indexed a segment: {info:?}"
        );
        store.close().await.unwrap();
    }
}
