//! The contracts between engram's services, as plain Rust traits over domain types.
//!
//! Each service implements its trait; the gRPC adapters in `engram-runtime`'s `rpc` expose an
//! implementation over tonic and give callers a client that implements the same trait over a
//! channel. A caller holds an `Arc<dyn Trait>` and does not care which one it has, so tests and
//! `engram up` can wire services in-process or over the network alike.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::model::{
    Filter, Memory, MemoryId, MemoryPatch, NewMemory, Scope, SearchMode, TenantId, Timestamp,
    WriteMode,
};

/// What an embedding is for; some models embed queries and documents differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Purpose {
    Query,
    #[default]
    Document,
}

impl Purpose {
    pub const fn as_str(self) -> &'static str {
        match self {
            Purpose::Query => "query",
            Purpose::Document => "document",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    pub model: String,
    pub dimension: usize,
    /// One per input text, in input order.
    pub vectors: Vec<Vec<f32>>,
}

#[async_trait]
pub trait Embedder: Send + Sync + 'static {
    /// Vectors of `tenant`'s `texts`, in order (cached per tenant).
    async fn embed(
        &self,
        tenant: &TenantId,
        texts: Vec<String>,
        purpose: Purpose,
    ) -> Result<Embeddings>;
    /// Drop the cached vectors of `tenant`'s `texts` from every level of the embedding cache;
    /// how many entries the shared level held.
    async fn forget(&self, tenant: &TenantId, texts: Vec<String>, purpose: Purpose) -> Result<u64>;
}

/// A Redis Stream entry id: milliseconds and a sequence number, ordered as a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId {
    pub ms: u64,
    pub seq: u64,
}

impl EntryId {
    pub fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = s.split_once('-')?;
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Proof of a write that a read can wait for (read-your-writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteToken {
    /// The write was indexed before it was acknowledged: nothing to wait for.
    Indexed,
    /// The write is in the write log's `partition` at `entry`; indexed once the partition's
    /// workers have applied that far.
    Logged { partition: u32, entry: EntryId },
}

/// Where a write stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteState {
    Pending,
    Indexed,
    Failed(WriteFailure),
}

/// Why a logged write failed for good (it is in the dead-letter stream and will not be
/// indexed): what kind of failure settled it, and its message. A worker records it from the
/// error it met ([`WriteFailure::of`]); a caller waiting for the write gets
/// [`WriteFailure::error`], the one mapping of a failed write to an error (and so to a gRPC
/// status), whichever service waited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFailure {
    pub kind: FailureKind,
    pub message: String,
}

/// The kinds of [`WriteFailure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The write's content was refused (by a model provider, say): writing it again fails too.
    Invalid,
    /// The memory an Update or Forget names no longer exists.
    NotFound,
    /// A dependency kept failing on this write until its tries ran out; writing it again may
    /// succeed.
    Unavailable,
    /// Anything else a dependency refused, or a bug.
    Failed,
}

impl WriteFailure {
    /// The failure a worker records for the error that settled a write.
    pub fn of(error: &Error) -> Self {
        let kind = match error {
            Error::InvalidArgument { .. } => FailureKind::Invalid,
            Error::NotFound(_) => FailureKind::NotFound,
            Error::Unavailable { .. }
            | Error::DeadlineExceeded(_)
            | Error::ResourceExhausted { .. }
            | Error::Cancelled(_)
            | Error::Aborted(_) => FailureKind::Unavailable,
            Error::FailedPrecondition(_)
            | Error::Unauthenticated(_)
            | Error::PermissionDenied(_)
            | Error::Internal(_) => FailureKind::Failed,
        };
        Self {
            kind,
            message: error.to_string(),
        }
    }

    /// The error for a caller of the write behind `token`.
    pub fn error(&self, token: WriteToken) -> Error {
        let what = format!(
            "the write {} failed and will not be indexed: {}",
            token.encode(),
            self.message
        );
        match self.kind {
            FailureKind::Invalid => Error::invalid("", what),
            FailureKind::NotFound => Error::NotFound(what),
            FailureKind::Unavailable => Error::unavailable(format!("{what}; write it again")),
            FailureKind::Failed => Error::FailedPrecondition(what),
        }
    }
}

/// What a write log keeps about an applied entry, for [`WriteState`] and forget counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A Forget, with what it removed.
    Forgot(Erasure),
    /// Dead-lettered.
    Failed(WriteFailure),
}

impl WriteToken {
    const PREFIX: &'static str = "wt1.";

    pub fn encode(&self) -> String {
        match self {
            WriteToken::Indexed => format!("{}i", Self::PREFIX),
            WriteToken::Logged { partition, entry } => {
                format!("{}l{partition}.{entry}", Self::PREFIX)
            }
        }
    }

    /// Parse a token a client sent back. Errors name no field; callers add it with `in_field`.
    pub fn decode(token: &str) -> Result<Self> {
        let logged = |rest: &str| {
            let (partition, entry) = rest.split_once('.')?;
            Some(WriteToken::Logged {
                partition: partition.parse().ok()?,
                entry: EntryId::parse(entry)?,
            })
        };
        match token.strip_prefix(Self::PREFIX) {
            Some("i") => Ok(WriteToken::Indexed),
            Some(rest) if rest.starts_with('l') => logged(&rest[1..])
                .ok_or_else(|| Error::invalid("", "not a write token issued by this cluster")),
            _ => Err(Error::invalid(
                "",
                "not a write token issued by this cluster",
            )),
        }
    }
}

impl fmt::Display for WriteToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RecallQuery {
    pub scope: Scope,
    pub query: String,
    pub top_k: u32,
    pub mode: SearchMode,
    pub filter: Filter,
    pub min_score: Option<f32>,
    pub recency_half_life: Option<Duration>,
    pub explain: bool,
    pub after_write_token: Option<WriteToken>,
    pub bypass_cache: bool,
    /// What "now" is for the query's time expressions and recency; the server's clock when
    /// `None`.
    pub request_time: Option<Timestamp>,
}

impl RecallQuery {
    pub fn new(scope: Scope, query: impl Into<String>, top_k: u32) -> Self {
        Self {
            scope,
            query: query.into(),
            top_k,
            mode: SearchMode::Hybrid,
            filter: Filter::default(),
            min_score: None,
            recency_half_life: None,
            explain: false,
            after_write_token: None,
            bypass_cache: false,
            request_time: None,
        }
    }
}

/// Why a hit ranks where it does: its 1-based rank (0: not returned) and raw score in each
/// strategy, the fused score, and the factors applied after fusion.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Explanation {
    pub dense_rank: u32,
    pub dense_score: f32,
    pub keyword_rank: u32,
    pub keyword_score: f32,
    pub temporal_rank: u32,
    pub temporal_score: f32,
    pub entity_rank: u32,
    pub entity_score: f32,
    pub fused_score: f32,
    pub recency_factor: f32,
    pub importance_factor: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub memory: Memory,
    /// Orders the hits: the fused (HYBRID) or the strategy's own score, × recency × importance.
    pub score: f32,
    /// How likely the memory is to be what the query is after, in [0, 1], comparable across
    /// queries and modes (`min_score` applies to it).
    pub relevance: f32,
    pub explanation: Option<Explanation>,
}

/// Time spent per stage of a Recall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timings {
    /// Looking the result up in (and storing it into) the result cache.
    pub cache: Duration,
    pub embed: Duration,
    pub dense: Duration,
    pub keyword: Duration,
    pub fusion: Duration,
    pub total: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RecallResult {
    pub hits: Vec<Hit>,
    pub cache_hit: bool,
    pub timings: Timings,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GetQuery {
    pub ids: Vec<MemoryId>,
    pub after_write_token: Option<WriteToken>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GetResult {
    /// Found memories, in request order.
    pub memories: Vec<Memory>,
    pub missing_ids: Vec<MemoryId>,
}

impl GetResult {
    /// Order `found` as `requested` and list what is missing.
    pub fn assemble(requested: &[MemoryId], mut found: Vec<Memory>) -> Self {
        let mut memories = Vec::with_capacity(requested.len());
        let mut missing_ids = Vec::new();
        for id in requested {
            match found.iter().position(|m| m.id == *id) {
                Some(at) => memories.push(found.swap_remove(at)),
                None => missing_ids.push(*id),
            }
        }
        Self {
            memories,
            missing_ids,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListQuery {
    pub scope: Scope,
    pub filter: Filter,
    pub page_size: u32,
    /// The first id of the page to return.
    pub page_token: Option<MemoryId>,
    pub after_write_token: Option<WriteToken>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListPage {
    pub memories: Vec<Memory>,
    pub next_page_token: Option<MemoryId>,
}

/// A memory with the dense embedding to index it under (the index computes its keyword weights
/// from the text itself).
#[derive(Debug, Clone, PartialEq)]
pub struct IndexedMemory {
    pub memory: Memory,
    pub dense: Vec<f32>,
}

/// One write to the index.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexOp {
    Upsert(Box<IndexedMemory>),
    DeleteIds(Vec<MemoryId>),
    /// Delete every memory matching the scope (empty agent/session match any).
    DeleteScope(Scope),
}

/// Writes applied in order, so a scope's operations keep the order they were made in.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct IndexWrites {
    pub ops: Vec<IndexOp>,
    /// The lease they are applied under, for writes from a log; see [`Fence`].
    pub fence: Option<Fence>,
}

impl IndexWrites {
    /// Writes applied on a caller's behalf (no log lease).
    pub fn new(ops: Vec<IndexOp>) -> Self {
        Self { ops, fence: None }
    }
}

/// Which write log an indexing worker works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogKind {
    /// Remember, Update and Forget.
    Write,
    /// Fact extraction.
    Extraction,
}

impl LogKind {
    /// Its label in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            LogKind::Write => "write",
            LogKind::Extraction => "extract",
        }
    }
}

/// The lease under which an indexing worker applies the entries of one log partition. Its
/// epoch grows each time the lease changes hands; the index refuses an apply under an epoch
/// older than one it has applied for the same partition ([`Error::Aborted`]), so a worker that
/// stalled past its lease cannot apply after its successor did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub log: LogKind,
    pub partition: u32,
    pub epoch: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ApplyOutcome {
    pub upserted: u64,
    pub deleted: u64,
    /// Cached Recall results a deletion dropped (results that could hold what it deleted).
    pub cached_results: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateMatch {
    pub id: MemoryId,
    pub content_hash: String,
    pub idempotency_key: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexStats {
    pub memories: u64,
    pub segments: u64,
    pub indexed_vectors: u64,
}

#[async_trait]
pub trait Index: Send + Sync + 'static {
    async fn search(&self, tenant: &TenantId, query: RecallQuery) -> Result<RecallResult>;
    async fn get(&self, tenant: &TenantId, query: GetQuery) -> Result<GetResult>;
    async fn list(&self, tenant: &TenantId, query: ListQuery) -> Result<ListPage>;
    /// Apply writes; returns once they are durable and searchable.
    async fn apply(&self, tenant: &TenantId, writes: IndexWrites) -> Result<ApplyOutcome>;
    /// Memories of exactly `scope` with one of these content hashes or idempotency keys.
    async fn find_duplicates(
        &self,
        tenant: &TenantId,
        scope: &Scope,
        content_hashes: Vec<String>,
        idempotency_keys: Vec<String>,
    ) -> Result<Vec<DuplicateMatch>>;
    /// Counts for one tenant, or for the whole index.
    async fn stats(&self, tenant: Option<&TenantId>) -> Result<IndexStats>;
}

/// What to put in a prompt's context (BuildContext, and the context of a Converse).
#[derive(Debug, Clone, PartialEq)]
pub struct ContextRequest {
    pub scope: Scope,
    pub query: String,
    pub token_budget: u32,
    pub max_memories: u32,
    pub max_turns: u32,
    pub request_time: Option<Timestamp>,
}

/// A Converse turn, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ConverseCommand {
    /// `query` is the user's message.
    pub context: ContextRequest,
    pub system_prompt: Option<String>,
    pub privacy: Option<crate::privacy::PrivacyMode>,
    pub max_tokens: Option<u32>,
    pub extract: bool,
    pub ephemeral: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RememberBatch {
    pub scope: Scope,
    pub memories: Vec<NewMemory>,
    pub mode: WriteMode,
    pub extract: bool,
    /// A stricter privacy mode than the tenant's, if the request asks for one.
    pub privacy: Option<crate::privacy::PrivacyMode>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteStatus {
    Created,
    Duplicate,
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteResult {
    pub id: MemoryId,
    pub status: WriteStatus,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RememberOutcome {
    /// One per input, in input order.
    pub results: Vec<WriteResult>,
    pub write_token: WriteToken,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpdateCommand {
    pub id: MemoryId,
    pub patch: MemoryPatch,
    pub mode: WriteMode,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpdateOutcome {
    pub memory: Memory,
    pub write_token: WriteToken,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ForgetTarget {
    Ids(Vec<MemoryId>),
    Scope(Scope),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForgetOutcome {
    pub forgotten: u64,
    pub write_token: WriteToken,
    /// Everything the Forget removed.
    pub receipt: Erasure,
}

/// What a Forget removed: its receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Erasure {
    /// Memories deleted from the index (their points: vectors, keywords and payload).
    pub memories: u64,
    /// Of those, facts extracted from messages.
    pub facts: u64,
    /// Vectors dropped from the shared (Redis) level of the embedding cache.
    pub cached_embeddings: u64,
    /// Cached recent-turn lists dropped.
    pub history_lists: u64,
    /// Write-log keys released: de-duplication reservations and where pending writes were.
    pub log_keys: u64,
    /// Cached Recall results dropped (every result cached for the users it forgot from).
    pub cached_results: u64,
}

impl Erasure {
    /// Two receipts as one (a Forget applied in parts).
    pub fn add(&mut self, other: Erasure) {
        self.memories += other.memories;
        self.facts += other.facts;
        self.cached_embeddings += other.cached_embeddings;
        self.history_lists += other.history_lists;
        self.log_keys += other.log_keys;
        self.cached_results += other.cached_results;
    }
}

#[async_trait]
pub trait Ingestion: Send + Sync + 'static {
    async fn submit(&self, tenant: &TenantId, batch: RememberBatch) -> Result<RememberOutcome>;
    async fn update(&self, tenant: &TenantId, command: UpdateCommand) -> Result<UpdateOutcome>;
    async fn forget(&self, tenant: &TenantId, target: ForgetTarget) -> Result<ForgetOutcome>;
    async fn status(&self, token: WriteToken) -> Result<WriteState>;
}

/// One operation of the write log.
#[derive(Debug, Clone, PartialEq)]
pub enum LogOp {
    Remember(Box<Memory>),
    Update(UpdateCommand),
    Forget(ForgetTarget),
    /// Extract facts from a remembered memory (the extraction log only).
    Extract(Box<Memory>),
}

/// A write log entry: the operation, whose it is, when it was acknowledged, and the
/// de-duplication reservations it holds while pending.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedWrite {
    pub tenant: TenantId,
    pub op: LogOp,
    pub submitted_unix_ms: i64,
    pub reservations: Vec<String>,
    /// W3C `traceparent` of the request that wrote it (empty when not traced).
    pub traceparent: String,
    /// For extracted facts: the memory they came from, as it was read.
    pub derived_from: Option<Derivation>,
}

/// The memory a write was derived from (facts from a message), as it was when read: the write
/// stands only while its source does, unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derivation {
    pub source: MemoryId,
    pub source_hash: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_tokens_round_trip_and_order_by_entry() {
        let token = WriteToken::Logged {
            partition: 7,
            entry: EntryId {
                ms: 1_700_000_000_123,
                seq: 4,
            },
        };
        assert_eq!(token.encode(), "wt1.l7.1700000000123-4");
        assert_eq!(WriteToken::decode(&token.encode()).unwrap(), token);
        assert_eq!(WriteToken::decode("wt1.i").unwrap(), WriteToken::Indexed);
        for bad in [
            "",
            "wt1.",
            "wt1.l",
            "wt1.l7",
            "wt1.lx.1-2",
            "wt1.l7.1",
            "wt2.i",
        ] {
            assert!(WriteToken::decode(bad).is_err(), "{bad:?}");
        }
        let earlier = EntryId::parse("1700000000123-9").unwrap();
        let later = EntryId::parse("1700000000124-0").unwrap();
        assert!(earlier < later);
    }
}
