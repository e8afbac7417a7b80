//! A two-level cache: in-process (moka, bounded by bytes, with a TTL) over Redis (shared by
//! every replica, with its own TTL). A read tries the first level, then the second, and fills
//! the first with what the second had; a write goes to both. Redis is used best-effort
//! ([`Redis`]): when it is away the cache keeps working on the first level alone, and it picks
//! Redis up again when it returns. Hits, misses and sizes are reported per cache and level.
//!
//! The cache is an accelerator, never a source of truth: callers must give the same answer
//! with or without it.

mod generations;
pub mod history;
mod redis;

use std::time::Duration;

use bytes::Bytes;
use engram_telemetry::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

pub use crate::generations::Generations;
pub use crate::history::History;
pub use crate::redis::{Redis, RedisConfig, pool, pool_sized};

#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Names the cache in metrics and prefixes its Redis keys (`engram:<name>:`).
    pub name: &'static str,
    /// Bound on the first level, in bytes of values.
    pub local_max_bytes: u64,
    pub local_ttl: Duration,
    pub redis_ttl: Duration,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LevelLabels {
    cache: &'static str,
    level: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    cache: &'static str,
    level: &'static str,
    result: &'static str,
}

/// The cache metric families of one service, shared by its caches.
#[derive(Clone)]
pub struct CacheMetrics {
    requests: Family<ResultLabels, Counter>,
    entries: Family<LevelLabels, Gauge>,
    bytes: Family<LevelLabels, Gauge>,
}

impl CacheMetrics {
    pub fn new(metrics: &Metrics) -> Self {
        let this = Self {
            requests: Family::default(),
            entries: Family::default(),
            bytes: Family::default(),
        };
        metrics.register(
            "engram_cache_requests",
            "Cache lookups by cache, level (local, redis) and result (hit, miss)",
            this.requests.clone(),
        );
        metrics.register(
            "engram_cache_entries",
            "Entries in the in-process level",
            this.entries.clone(),
        );
        metrics.register(
            "engram_cache_bytes",
            "Bytes of values in the in-process level",
            this.bytes.clone(),
        );
        this
    }
}

pub struct TwoLevelCache {
    config: CacheConfig,
    prefix: String,
    local: moka::future::Cache<String, Bytes>,
    redis: Option<Redis>,
    metrics: CacheMetrics,
}

impl std::fmt::Debug for TwoLevelCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwoLevelCache")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TwoLevelCache {
    /// A cache with a Redis second level, or in-process only when `redis` is `None`.
    pub fn new(config: CacheConfig, redis: Option<Redis>, metrics: &CacheMetrics) -> Self {
        let local = moka::future::Cache::builder()
            .max_capacity(config.local_max_bytes)
            .weigher(|key: &String, value: &Bytes| {
                u32::try_from(key.len() + value.len()).unwrap_or(u32::MAX)
            })
            .time_to_live(config.local_ttl)
            .build();
        Self {
            prefix: format!("engram:{}:", config.name),
            config,
            local,
            redis,
            metrics: metrics.clone(),
        }
    }

    fn count(&self, level: &'static str, result: &'static str, n: usize) {
        if n > 0 {
            self.metrics
                .requests
                .get_or_create(&ResultLabels {
                    cache: self.config.name,
                    level,
                    result,
                })
                .inc_by(n as u64);
        }
    }

    fn report_size(&self) {
        let labels = LevelLabels {
            cache: self.config.name,
            level: "local",
        };
        self.metrics
            .entries
            .get_or_create(&labels)
            .set(i64::try_from(self.local.entry_count()).unwrap_or(i64::MAX));
        self.metrics
            .bytes
            .get_or_create(&labels)
            .set(i64::try_from(self.local.weighted_size()).unwrap_or(i64::MAX));
    }

    /// Look up several keys at once: one round trip to Redis for all first-level misses.
    pub async fn get_many(&self, keys: &[String]) -> Vec<Option<Bytes>> {
        let mut found = Vec::with_capacity(keys.len());
        for key in keys {
            found.push(self.local.get(key).await);
        }
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| found[i].is_none()).collect();
        self.count("local", "hit", keys.len() - missing.len());
        self.count("local", "miss", missing.len());
        let Some(redis) = &self.redis else {
            return found;
        };
        if missing.is_empty() {
            return found;
        }
        let redis_keys: Vec<String> = missing
            .iter()
            .map(|&i| format!("{}{}", self.prefix, keys[i]))
            .collect();
        let values: Option<Vec<Option<Vec<u8>>>> = redis
            .best_effort("mget", |mut conn| async move {
                ::redis::cmd("MGET")
                    .arg(&redis_keys)
                    .query_async(&mut conn)
                    .await
            })
            .await;
        let Some(values) = values else {
            return found;
        };
        let mut hits = 0;
        for (&i, value) in missing.iter().zip(values) {
            if let Some(value) = value {
                let value = Bytes::from(value);
                self.local.insert(keys[i].clone(), value.clone()).await;
                found[i] = Some(value);
                hits += 1;
            }
        }
        self.count("redis", "hit", hits);
        self.count("redis", "miss", missing.len() - hits);
        self.report_size();
        found
    }

    pub async fn get(&self, key: &str) -> Option<Bytes> {
        self.get_many(&[key.to_string()]).await.pop().flatten()
    }

    /// Store entries in both levels (Redis best-effort, in one pipeline).
    pub async fn put_many(&self, entries: Vec<(String, Bytes)>) {
        if entries.is_empty() {
            return;
        }
        for (key, value) in &entries {
            self.local.insert(key.clone(), value.clone()).await;
        }
        self.report_size();
        let Some(redis) = &self.redis else {
            return;
        };
        let ttl_ms = u64::try_from(self.config.redis_ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut pipe = ::redis::pipe();
        for (key, value) in &entries {
            pipe.cmd("SET")
                .arg(format!("{}{key}", self.prefix))
                .arg(value.as_ref())
                .arg("PX")
                .arg(ttl_ms)
                .ignore();
        }
        let _: Option<()> = redis
            .best_effort("set", |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await;
    }

    pub async fn put(&self, key: String, value: Bytes) {
        self.put_many(vec![(key, value)]).await;
    }

    /// Drop entries from both levels; how many Redis held. Unlike `put`, a Redis failure is
    /// an error: an erasure must not pass for done.
    /// [`Self::put_many`] of one entry that also joins each of `groups` (a Redis set of keys
    /// per group, living as long as the entries), so that [`Self::remove_groups`] can drop
    /// every entry of a group.
    pub async fn put_in_groups(&self, key: String, value: Bytes, groups: &[String]) {
        if let Some(redis) = &self.redis {
            let ttl_ms = u64::try_from(self.config.redis_ttl.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            // A sorted set per group, each key scored by when its entry expires; members whose
            // entry has expired are trimmed at every put, so a group holds only live entries.
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            let mut pipe = ::redis::pipe();
            for group in groups {
                let members = self.group_key(group);
                pipe.cmd("ZADD")
                    .arg(&members)
                    .arg(now_ms.saturating_add(ttl_ms))
                    .arg(&key)
                    .ignore();
                pipe.cmd("ZREMRANGEBYSCORE")
                    .arg(&members)
                    .arg("-inf")
                    .arg(now_ms)
                    .ignore();
                pipe.cmd("PEXPIRE").arg(&members).arg(ttl_ms).ignore();
            }
            let _: Option<()> = redis
                .best_effort("group", |mut conn| async move {
                    pipe.query_async(&mut conn).await
                })
                .await;
        }
        self.put_many(vec![(key, value)]).await;
    }

    /// Drop every entry of `groups` ([`Self::put_in_groups`]) from Redis and from this
    /// process; how many Redis held.
    pub async fn remove_groups(&self, groups: &[String]) -> u64 {
        let Some(redis) = &self.redis else {
            return 0;
        };
        let mut removed = 0;
        for group in groups {
            let members = self.group_key(group);
            let keys: Vec<String> = redis
                .best_effort("group", |mut conn| {
                    let members = members.clone();
                    async move {
                        ::redis::cmd("ZRANGE")
                            .arg(members)
                            .arg(0)
                            .arg(-1)
                            .query_async(&mut conn)
                            .await
                    }
                })
                .await
                .unwrap_or_default();
            for chunk in keys.chunks(1000) {
                match self.remove_many(chunk).await {
                    Ok(n) => removed += n,
                    Err(e) => {
                        tracing::warn!(error = %e, "cached entries of a group stay until their TTL (unreachable)")
                    }
                }
            }
            let _: Option<u64> = redis
                .best_effort("group", |mut conn| async move {
                    ::redis::cmd("DEL")
                        .arg(members)
                        .query_async(&mut conn)
                        .await
                })
                .await;
        }
        removed
    }

    fn group_key(&self, group: &str) -> String {
        format!("{}group:{group}", self.prefix)
    }

    pub async fn remove_many(&self, keys: &[String]) -> Result<u64, String> {
        for key in keys {
            self.local.invalidate(key).await;
        }
        self.report_size();
        let Some(redis) = &self.redis else {
            return Ok(0);
        };
        if keys.is_empty() {
            return Ok(0);
        }
        let prefixed: Vec<String> = keys.iter().map(|k| format!("{}{k}", self.prefix)).collect();
        redis
            .best_effort("del", |mut conn| async move {
                ::redis::cmd("DEL")
                    .arg(prefixed)
                    .query_async(&mut conn)
                    .await
            })
            .await
            .ok_or_else(|| "Redis did not take the deletion".to_string())
    }

    /// Forget everything in the in-process level (Redis keeps its entries).
    pub async fn clear_local(&self) {
        self.local.invalidate_all();
        self.local.run_pending_tasks().await;
        self.report_size();
    }
}
