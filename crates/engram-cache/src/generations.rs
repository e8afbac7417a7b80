//! Generations: version stamps for cached results, so a cache never serves an answer computed
//! before a write it should include, on any replica.
//!
//! A cached value's key includes the generations of what it depends on (for a Recall: the
//! tenant's and the user's). Whoever changes the data bumps those generations *after* the
//! change is visible; readers read the generations *before* computing, so a value is stored
//! under generations no newer than its data, and once a bump lands no reader can reach values
//! stored before it.
//!
//! With Redis, generations live there (shared by every replica) as unique stamps rather than
//! counters: a bump writes a fresh stamp, and a generation that is missing (never set, expired,
//! or lost with a Redis restart) is initialised to a fresh stamp, so a reset can never make an
//! old key reachable again. Without Redis they live in the process (one replica).
//!
//! Failures are safe in both directions: when generations cannot be read, callers skip the
//! cache; when a bump cannot be written, it is owed: this replica serves nothing from the
//! cache, and retries the owed bumps before reading generations again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::redis::Redis;

/// How long an untouched generation is kept in Redis. When it expires, the next reader starts
/// a new one, and values cached under the old one are unreachable (never wrong).
const GENERATION_TTL: Duration = Duration::from_secs(24 * 3600);

/// Read every key, setting a missing one to a fresh stamp (ARGV[1] with the key's position).
const CURRENT: &str = r"
local out = {}
for i, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  if not value then
    value = ARGV[1] .. '.' .. i
    redis.call('SET', key, value, 'PX', ARGV[2])
  end
  out[i] = value
end
return out
";

pub struct Generations {
    prefix: String,
    redis: Option<Redis>,
    /// Without Redis: the generations of this process.
    local: Mutex<HashMap<String, u64>>,
    /// Bumps not yet written to Redis, each with the number of the latest request for it (a
    /// payment clears only the requests it covered).
    owed: Mutex<HashMap<String, u64>>,
    counter: AtomicU64,
}

impl std::fmt::Debug for Generations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generations")
            .field("prefix", &self.prefix)
            .field("redis", &self.redis.is_some())
            .finish_non_exhaustive()
    }
}

impl Generations {
    /// Generations named `engram:gen:<name>:<key>` in Redis, or in-process without Redis.
    pub fn new(name: &str, redis: Option<Redis>) -> Self {
        Self {
            prefix: format!("engram:gen:{name}:"),
            redis,
            local: Mutex::default(),
            owed: Mutex::default(),
            counter: AtomicU64::new(0),
        }
    }

    /// A stamp no earlier bump or initialisation of this process or another has used.
    fn fresh(&self) -> String {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or_default();
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{micros:x}.{}.{n:x}", std::process::id())
    }

    /// The current generations of `keys`, in order; `None` when they cannot be known (the
    /// caller must then not use the cache).
    pub async fn current(&self, keys: &[String]) -> Option<Vec<String>> {
        let Some(redis) = &self.redis else {
            let mut local = self.local.lock();
            return Some(
                keys.iter()
                    .map(|k| local.entry(k.clone()).or_insert(0).to_string())
                    .collect(),
            );
        };
        if !self.pay_owed(redis).await {
            return None;
        }
        let redis_keys: Vec<String> = keys.iter().map(|k| format!("{}{k}", self.prefix)).collect();
        let stamp = self.fresh();
        let ttl = GENERATION_TTL.as_millis() as u64;
        redis
            .best_effort("generations", |mut conn| async move {
                ::redis::Script::new(CURRENT)
                    .key(redis_keys)
                    .arg(stamp)
                    .arg(ttl)
                    .invoke_async(&mut conn)
                    .await
            })
            .await
    }

    /// Start new generations of `keys`: values cached under the old ones are unreachable
    /// from now on. A bump Redis does not take is owed (see the module docs); whether these
    /// keys' bumps are paid.
    pub async fn bump(&self, keys: &[String]) -> bool {
        if keys.is_empty() {
            return true;
        }
        let Some(redis) = &self.redis else {
            let mut local = self.local.lock();
            for key in keys {
                *local.entry(key.clone()).or_insert(0) += 1;
            }
            return true;
        };
        {
            let mut owed = self.owed.lock();
            for key in keys {
                owed.insert(key.clone(), self.counter.fetch_add(1, Ordering::Relaxed));
            }
        }
        self.pay_owed(redis).await;
        // Paid unless one of these keys still owes (other keys owing, from concurrent bumps,
        // are not this caller's concern).
        let owed = self.owed.lock();
        keys.iter().all(|key| !owed.contains_key(key))
    }

    /// Write the owed bumps; whether none is left owing.
    async fn pay_owed(&self, redis: &Redis) -> bool {
        let owed: Vec<(String, u64)> = self
            .owed
            .lock()
            .iter()
            .map(|(k, n)| (k.clone(), *n))
            .collect();
        if owed.is_empty() {
            return true;
        }
        let mut pipe = ::redis::pipe();
        let ttl = GENERATION_TTL.as_millis() as u64;
        for (key, _) in &owed {
            pipe.cmd("SET")
                .arg(format!("{}{key}", self.prefix))
                .arg(self.fresh())
                .arg("PX")
                .arg(ttl)
                .ignore();
        }
        let paid: Option<()> = redis
            .best_effort("bump generations", |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await;
        if paid.is_none() {
            return false;
        }
        let mut still = self.owed.lock();
        for (key, request) in &owed {
            if still.get(key) == Some(request) {
                still.remove(key);
            }
        }
        still.is_empty()
    }
}
