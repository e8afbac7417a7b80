//! The vector store behind the retrieval service.
//!
//! [`VectorStore`] is what retrieval needs from an index: ordered batches of writes that are
//! durable when they return, dense (semantic) and sparse (BM25 keyword) search within a tenant
//! and scope, reads by id and by scope in time order, and the lookups de-duplication needs.
//! [`Keywords`] computes the BM25 weights both sides of keyword search use. [`EdgeStore`] is
//! the embedded engine (the default); [`RemoteStore`] a Qdrant server or cluster. [`EdgeStore`] implements it with the
//! embedded qdrant-edge engine: one shard on disk, every engine call on the blocking pool, a
//! background loop that flushes and optimises segments while queries keep being served.
//!
//! Tenancy is enforced here as well as at the edge: every read and delete is filtered by the
//! tenant inside the engine, never only after the fact.

#[cfg(test)]
mod contract;
mod edge;
mod error;
mod filter;
mod keywords;
mod payload;
mod remote;

use async_trait::async_trait;
use engram_domain::api::{ApplyOutcome, DuplicateMatch, IndexWrites, IndexedMemory};
use engram_domain::model::{Filter, Memory, MemoryId, Scope, TenantId, Timestamp};

pub use edge::{EdgeStore, EdgeStoreConfig};
pub use error::{StoreError, StoreResult};
pub use keywords::{Keywords, SparseVector};
pub use remote::{RemoteStore, RemoteStoreConfig};

/// Name of the dense (semantic) vector of every point.
pub const DENSE: &str = "dense";
/// Name of the sparse BM25 vector of every point (IDF applied by the engine at query time).
pub const KEYWORDS: &str = "keywords";

/// Refuse a memory of another tenant than the write's, or a dense vector of another
/// dimension than the store's (every backend checks a point with this before writing it).
fn check_point(tenant: &TenantId, indexed: &IndexedMemory, dimension: usize) -> StoreResult<()> {
    let memory = &indexed.memory;
    if memory.tenant != *tenant {
        return Err(StoreError::TenantMismatch {
            id: memory.id.to_string(),
            expected: tenant.to_string(),
            actual: memory.tenant.to_string(),
        });
    }
    check_dimension(&memory.id.to_string(), &indexed.dense, dimension)
}

/// Refuse a dense vector (of the memory or query `id`) of another dimension than `dimension`.
fn check_dimension(id: &str, vector: &[f32], dimension: usize) -> StoreResult<()> {
    if vector.len() != dimension {
        return Err(StoreError::DimensionMismatch {
            id: id.to_string(),
            expected: dimension,
            got: vector.len(),
        });
    }
    Ok(())
}

/// What a search ranks by.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreQuery {
    /// Cosine similarity to the query's embedding.
    Dense(Vec<f32>),
    /// BM25 with IDF over the query's terms ([`Keywords::query`]).
    Keywords(SparseVector),
}

/// Which memories a read covers: a tenant, a scope (empty agent or session match any) and a
/// filter.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub tenant: TenantId,
    pub scope: Scope,
    pub filter: Filter,
}

/// A memory a search found, without its text, metadata or anything else ranking does not
/// need: a search holds many candidates and keeps few, so only the few are read whole
/// ([`VectorStore::get`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub id: MemoryId,
    pub score: f32,
    pub event_time: Timestamp,
    pub importance: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreInfo {
    pub points: u64,
    pub segments: u64,
    pub indexed_vectors: u64,
}

#[async_trait]
pub trait VectorStore: Send + Sync + 'static {
    /// Dimension of the dense vectors this store indexes.
    fn dimension(&self) -> usize;

    /// Apply writes in order; when this returns they are on disk and visible to reads.
    async fn apply(&self, tenant: &TenantId, writes: IndexWrites) -> StoreResult<ApplyOutcome>;

    /// The `limit` memories of `selection` that score best for `query`, best first, as
    /// [`Candidate`]s (their payloads are not read).
    async fn search(
        &self,
        selection: &Selection,
        query: StoreQuery,
        limit: usize,
    ) -> StoreResult<Vec<Candidate>>;

    /// Memories of `tenant` with these ids (in no particular order; missing ones are absent).
    async fn get(&self, tenant: &TenantId, ids: &[MemoryId]) -> StoreResult<Vec<Memory>>;

    /// Up to `limit` memories of `selection` in id (creation) order, starting at `start`;
    /// returns the id the next page starts at, if any.
    async fn list(
        &self,
        selection: &Selection,
        limit: usize,
        start: Option<MemoryId>,
    ) -> StoreResult<(Vec<Memory>, Option<MemoryId>)>;

    /// Memories of exactly `scope` with one of these content hashes or idempotency keys.
    async fn find_duplicates(
        &self,
        tenant: &TenantId,
        scope: &Scope,
        content_hashes: Vec<String>,
        idempotency_keys: Vec<String>,
    ) -> StoreResult<Vec<DuplicateMatch>>;

    /// Number of memories `selection` covers.
    async fn count_selected(&self, selection: &Selection) -> StoreResult<u64>;

    /// Number of memories of a tenant, or of the whole store.
    async fn count(&self, tenant: Option<&TenantId>) -> StoreResult<u64>;

    async fn info(&self) -> StoreResult<StoreInfo>;

    /// Stop background work and write everything to disk.
    async fn close(&self) -> StoreResult<()>;
}
