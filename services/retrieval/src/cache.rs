//! The Recall result cache: `engram-cache`'s two levels (in-process, then Redis), keyed by
//! everything that decides a result and by the generations of the data it was computed from.
//!
//! Key: the scoring version and fusion weights, the tenant, the read scope, the query with its
//! whitespace normalised, every parameter (top_k, mode, filter, min_score, half-life, explain,
//! request time) and the current
//! generations of the tenant and of the scope's user. Retrieval bumps those generations after
//! it applies a write (see [`ResultCache::invalidate`]), so once a write is indexed no replica
//! can reach a result computed before it; the generations are read before a result is
//! computed, so a result is never filed under a generation newer than its data.
//!
//! A result cached without a request time was computed with the clock of its first request;
//! recency factors and relative time expressions ("yesterday") are those of that moment for as
//! long as the entry lives (the TTL, a minute by default).

use std::time::Duration;

use bytes::Bytes;
use engram_cache::{CacheConfig, CacheMetrics, Generations, Redis, TwoLevelCache};
use engram_domain::api::{IndexOp, IndexWrites, RecallQuery, RecallResult};
use engram_domain::convert;
use engram_domain::model::TenantId;
use engram_proto::prost::Message as _;
use sha2::{Digest as _, Sha256};

/// Largest Recall result cached (encoded): a larger one (large memories, a large `top_k`) is
/// computed again each time rather than held in the cache's memory and Redis.
pub const MAX_CACHED_RESULT_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone)]
pub struct ResultCacheConfig {
    /// Bound on the in-process level, bytes.
    pub local_max_bytes: u64,
    /// How long a result lives in either level (generations make it right; the TTL bounds
    /// memory and the drift of "now" for requests without a request time).
    pub ttl: Duration,
}

pub struct ResultCache {
    results: TwoLevelCache,
    generations: Generations,
    /// What decides scores besides the request: the scoring version and the fusion weights,
    /// so replicas (or releases) that score differently never share entries.
    scoring: String,
}

fn tenant_generation(tenant: &TenantId) -> String {
    format!("t:{tenant}")
}

/// Tenant ids hold no ':', so this key cannot collide with another tenant's.
fn user_generation(tenant: &TenantId, user_id: &str) -> String {
    format!("u:{tenant}:{user_id}")
}

impl ResultCache {
    pub fn new(
        config: ResultCacheConfig,
        redis: Option<Redis>,
        metrics: &CacheMetrics,
        weights: &crate::fusion::FusionWeights,
    ) -> Self {
        Self {
            scoring: format!("v{}|{weights}", crate::fusion::SCORING_VERSION),
            results: TwoLevelCache::new(
                CacheConfig {
                    name: "recall",
                    local_max_bytes: config.local_max_bytes,
                    local_ttl: config.ttl,
                    redis_ttl: config.ttl,
                },
                redis.clone(),
                metrics,
            ),
            generations: Generations::new("recall", redis),
        }
    }

    /// The key `query`'s result is cached under now, or `None` when the generations cannot
    /// be read (the cache is then skipped).
    #[tracing::instrument(name = "cache.generations", level = "info", skip_all)]
    pub async fn key(&self, tenant: &TenantId, query: &RecallQuery) -> Option<String> {
        let generations = self
            .generations
            .current(&[
                tenant_generation(tenant),
                user_generation(tenant, &query.scope.user_id),
            ])
            .await?;
        let normalized: Vec<&str> = query.query.split_whitespace().collect();
        // Debug output of these plain values is deterministic (ordered maps, no addresses).
        let material = format!(
            "{}|{tenant:?}|{:?}|{normalized:?}|{}|{:?}|{:?}|{:?}|{:?}|{}|{:?}|{generations:?}",
            self.scoring,
            query.scope,
            query.top_k,
            query.mode,
            query.filter,
            query.min_score.map(f32::to_bits),
            query.recency_half_life,
            query.explain,
            query.request_time,
        );
        Some(hex::encode(Sha256::digest(material.as_bytes())))
    }

    #[tracing::instrument(name = "cache.lookup", level = "info", skip_all)]
    pub async fn get(&self, key: &str, tenant: &TenantId) -> Option<RecallResult> {
        let bytes = self.results.get(key).await?;
        let response = engram_proto::v1::RecallResponse::decode(bytes).ok()?;
        match convert::recall_result_from_pb(response, tenant) {
            Ok(result) => Some(result),
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an unreadable cached recall result");
                None
            }
        }
    }

    /// Cache `tenant`'s result for `query`, unless it is larger than
    /// [`MAX_CACHED_RESULT_BYTES`]; its key joins the sets of its tenant and user, so that a
    /// deletion can drop it ([`Self::drop_results`]).
    #[tracing::instrument(name = "cache.store", level = "info", skip_all)]
    pub async fn put(
        &self,
        key: String,
        tenant: &TenantId,
        query: &RecallQuery,
        result: &RecallResult,
    ) {
        let response = convert::recall_response(result);
        let size = response.encoded_len();
        if size > MAX_CACHED_RESULT_BYTES {
            tracing::debug!(bytes = size, "a recall result too large to cache");
            return;
        }
        let groups = [
            tenant_generation(tenant),
            user_generation(tenant, &query.scope.user_id),
        ];
        self.results
            .put_in_groups(key, Bytes::from(response.encode_to_vec()), &groups)
            .await;
    }

    /// Drop every result cached under the `touched` generations (a deletion: results that
    /// could hold what it deleted), from Redis and from this replica's memory; how many Redis
    /// held. Other replicas' in-process copies are unreachable (the generations moved on) and
    /// expire with the TTL.
    pub async fn drop_results(&self, touched: &[String]) -> u64 {
        self.results.remove_groups(touched).await
    }

    /// Make every result that depends on the `touched` generations ([`Self::touched`])
    /// unreachable: called once the writes are visible in the index.
    /// Make results cached before a write unreachable; false while Redis owes the bump
    /// (other replicas could still serve those results from Redis until it is paid).
    pub async fn invalidate(&self, touched: &[String]) -> bool {
        self.generations.bump(touched).await
    }

    /// The generations `writes` change: the users of upserted memories and forgotten scopes,
    /// and the whole tenant for deletions by id (whose users the write does not name).
    pub fn touched(tenant: &TenantId, writes: &IndexWrites) -> Vec<String> {
        let mut keys: Vec<String> = Vec::new();
        for op in &writes.ops {
            let key = match op {
                IndexOp::Upsert(indexed) => user_generation(tenant, &indexed.memory.scope.user_id),
                IndexOp::DeleteScope(scope) => user_generation(tenant, &scope.user_id),
                IndexOp::DeleteIds(_) => tenant_generation(tenant),
            };
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        keys
    }
}
