//! The service's connection to Redis, used best-effort by caches.
//!
//! Every cache operation is bounded by a short timeout. A failure marks Redis unavailable:
//! caches then skip it (serving from the in-process level only) and one operation tries again
//! after `outage_backoff`, so a Redis that comes back is used again without a restart. A
//! metric and one log line on each change of state report it; requests never fail for it.

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::{Pool, Runtime};
use engram_domain::{Error, Result, SecretUrl};
use engram_telemetry::Metrics;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://host:port/db` (`rediss://:PASSWORD@host:port/db`; never printed with it).
    pub url: SecretUrl,
    /// Bound on one cache operation.
    pub op_timeout: Duration,
    /// After a failure, how long caches skip Redis before trying it again.
    pub outage_backoff: Duration,
}

impl RedisConfig {
    pub fn new(url: impl Into<SecretUrl>) -> Self {
        Self {
            url: url.into(),
            op_timeout: Duration::from_millis(100),
            outage_backoff: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Default)]
struct Availability {
    /// Set while Redis is considered down: when to try it again.
    retry_at: Option<Instant>,
}

/// A pool of connections to one Redis, shared by the service's caches.
#[derive(Clone)]
pub struct Redis {
    pool: Pool,
    config: RedisConfig,
    availability: Arc<Mutex<Availability>>,
    available: Gauge,
    errors: Counter,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("url", &self.config.url)
            .finish_non_exhaustive()
    }
}

/// A connection pool for `url`; errors name the setting.
pub fn pool(setting: &str, url: &SecretUrl) -> Result<Pool> {
    pool_sized(setting, url, 16)
}

/// [`pool`] with room for `size` connections.
///
/// Connections carry no response timeout of their own (the redis crate's default is 500 ms,
/// which would cut a blocking stream read short): every caller bounds its operations itself.
pub fn pool_sized(setting: &str, url: &SecretUrl, size: usize) -> Result<Pool> {
    // The redis crate's own messages may quote the URL: replace it with the redacted one.
    let invalid = |e: &dyn std::fmt::Display| {
        let reason = e.to_string().replace(url.expose(), &url.redacted());
        Error::invalid(
            setting,
            format!("{url:?} is not a usable Redis URL: {reason}"),
        )
    };
    let connection = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(None);
    let manager = deadpool_redis::Manager::new_with_config(url.expose(), connection)
        .map_err(|e| invalid(&e))?;
    let mut pool = deadpool_redis::PoolConfig::new(size);
    pool.timeouts.wait = Some(Duration::from_millis(500));
    pool.timeouts.create = Some(Duration::from_millis(500));
    pool.timeouts.recycle = Some(Duration::from_millis(500));
    Pool::builder(manager)
        .config(pool)
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| invalid(&e))
}

impl Redis {
    pub fn connect(config: RedisConfig, metrics: &Metrics) -> Result<Self> {
        let pool = pool(engram_domain::settings::env::REDIS_URL, &config.url)?;
        let this = Self {
            pool,
            config,
            availability: Arc::default(),
            available: Gauge::default(),
            errors: Counter::default(),
        };
        this.available.set(1);
        metrics.register(
            "engram_redis_available",
            "1 while caches use Redis, 0 while they skip it after a failure",
            this.available.clone(),
        );
        metrics.register(
            "engram_redis_cache_errors",
            "Cache operations on Redis that failed or timed out",
            this.errors.clone(),
        );
        Ok(this)
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    fn usable(&self) -> bool {
        self.availability
            .lock()
            .retry_at
            .is_none_or(|at| Instant::now() >= at)
    }

    /// Run `op` on a pooled connection within the operation timeout, or return `None` (and
    /// mark Redis unavailable) if Redis is unavailable, fails or is slow.
    pub async fn best_effort<T, F, Fut>(&self, what: &'static str, op: F) -> Option<T>
    where
        F: FnOnce(deadpool_redis::Connection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if !self.usable() {
            return None;
        }
        let attempt = async {
            let conn = self.pool.get().await.map_err(|e| e.to_string())?;
            op(conn).await.map_err(|e| e.to_string())
        };
        let outcome = match tokio::time::timeout(self.config.op_timeout, attempt).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("no answer within {:?}", self.config.op_timeout)),
        };
        match outcome {
            Ok(value) => {
                self.recovered();
                Some(value)
            }
            Err(reason) => {
                self.failed(what, &reason);
                None
            }
        }
    }

    fn failed(&self, what: &str, reason: &str) {
        self.errors.inc();
        let mut availability = self.availability.lock();
        if availability.retry_at.is_none() {
            tracing::warn!(
                url = %self.config.url, operation = what, %reason,
                "redis unreachable: caches continue in-process only and retry redis every {:?}",
                self.config.outage_backoff
            );
        }
        availability.retry_at = Some(Instant::now() + self.config.outage_backoff);
        self.available.set(0);
    }

    fn recovered(&self) {
        let mut availability = self.availability.lock();
        if availability.retry_at.take().is_some() {
            tracing::info!(url = %self.config.url, "redis is reachable again: caches use it");
        }
        self.available.set(1);
    }
}
