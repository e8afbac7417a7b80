//! Session history: the recent turns (MESSAGE memories) of each (tenant, user, session) — of
//! every agent in the session — kept in Redis for speed.
//!
//! The index is the source of truth; this is a cache of it, with one twist: ingestion appends a
//! turn when it acknowledges the write, before it is indexed, so a turn is in the history at
//! once. Each session's list is:
//!
//! - filled from the index by the reader that finds it missing ([`History::fill`]) — after a
//!   Redis flush, an expiry (`ttl` after its last write) or a forget;
//! - appended to by ingestion only if it exists (`RPUSHX`), so a partial list is never
//!   mistaken for the whole history, and trimmed to `max_turns`;
//! - deleted when a Forget or an Update touches the scope, so the next reader rebuilds it
//!   (each user has a set naming their cached lists, so forgetting a whole user finds them).
//!   Each deletion also moves the user's epoch on, and a reader fills a list only if the epoch
//!   is still the one it saw before it read the index: turns read before a Forget are never
//!   cached after it.
//!
//! A filled list starts with an empty marker entry, so a session without turns is known to be
//! empty. Redis being away makes every read a miss: callers then read the index.

use std::time::Duration;

use engram_domain::convert;
use engram_domain::model::{Memory, Scope, TenantId};
use engram_proto::prost::Message as _;
use engram_proto::v1 as pb;
use sha2::{Digest as _, Sha256};

use crate::Redis;

/// Recent turns kept per session.
pub const MAX_TURNS: usize = 200;

#[derive(Clone)]
pub struct History {
    redis: Option<Redis>,
    ttl: Duration,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History")
            .field("redis", &self.redis.is_some())
            .field("ttl", &self.ttl)
            .finish()
    }
}

fn short_hash(value: &str) -> String {
    hex::encode(&Sha256::digest(value.as_bytes())[..8])
}

/// The user's part of the keys: every session list of one user matches `{user_prefix}*`.
fn user_prefix(tenant: &TenantId, user_id: &str) -> String {
    format!(
        "engram:history:{}:{}:",
        short_hash(tenant.as_str()),
        short_hash(user_id)
    )
}

/// The set of a user's cached session lists.
fn sessions_key(tenant: &TenantId, user_id: &str) -> String {
    format!("{}sessions", user_prefix(tenant, user_id))
}

/// The user's epoch: moved on by every invalidation of their lists.
fn epoch_key(tenant: &TenantId, user_id: &str) -> String {
    format!("{}epoch", user_prefix(tenant, user_id))
}

/// What a user's epoch reads as before any invalidation (or after it expired).
const NO_EPOCH: &str = "0";

/// Fill a session's list if the user's epoch is still the one the filler saw and no other
/// filler got there first (its list may have appended turns since). KEYS: list, sessions set,
/// epoch. ARGV: epoch seen, ttl seconds, then the entries. Returns 1 if filled.
const FILL: &str = r"
if (redis.call('GET', KEYS[3]) or '0') ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 3, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[2], KEYS[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
";

/// A session's list: one per (tenant, user, session), whichever agents spoke in it.
fn key(tenant: &TenantId, scope: &Scope) -> String {
    format!(
        "{}{}",
        user_prefix(tenant, &scope.user_id),
        short_hash(&scope.session_id)
    )
}

impl History {
    /// `redis` `None`: no history cache (every read is a miss).
    pub fn new(redis: Option<Redis>, ttl: Duration) -> Self {
        Self { redis, ttl }
    }

    /// The last `n` turns of `scope`'s session, oldest first; `None` when the list is not
    /// cached (or Redis is away).
    pub async fn recent(&self, tenant: &TenantId, scope: &Scope, n: usize) -> Option<Vec<Memory>> {
        let redis = self.redis.as_ref()?;
        let key = key(tenant, scope);
        let start = -(n.clamp(1, MAX_TURNS) as isize) - 1;
        let raw: Vec<Vec<u8>> = redis
            .best_effort("history.recent", |mut conn| async move {
                redis::cmd("LRANGE")
                    .arg(&key)
                    .arg(start)
                    .arg(-1)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        if raw.is_empty() {
            return None;
        }
        let mut turns: Vec<Memory> = raw
            .iter()
            .filter(|bytes| !bytes.is_empty())
            .filter_map(|bytes| pb::Memory::decode(bytes.as_slice()).ok())
            .filter_map(|m| convert::memory_from_pb(m, tenant).ok())
            .collect();
        if turns.len() > n {
            turns.drain(..turns.len() - n);
        }
        Some(turns)
    }

    /// The user's epoch, to read before reading the index for [`Self::fill`]; `None` when
    /// Redis is away (there is then nothing to fill).
    pub async fn epoch(&self, tenant: &TenantId, user_id: &str) -> Option<String> {
        let redis = self.redis.as_ref()?;
        let key = epoch_key(tenant, user_id);
        let epoch: Option<String> = redis
            .best_effort("history.epoch", |mut conn| async move {
                redis::cmd("GET").arg(&key).query_async(&mut conn).await
            })
            .await?;
        Some(epoch.unwrap_or_else(|| NO_EPOCH.to_string()))
    }

    /// Cache `turns` (oldest first, read from the index after [`Self::epoch`] gave `epoch`) as
    /// the whole recent history of `scope`, unless the user's lists were invalidated since.
    pub async fn fill(&self, tenant: &TenantId, scope: &Scope, turns: &[Memory], epoch: &str) {
        let Some(redis) = &self.redis else {
            return;
        };
        let key = key(tenant, scope);
        let sessions = sessions_key(tenant, &scope.user_id);
        let epoch_key = epoch_key(tenant, &scope.user_id);
        let mut values: Vec<Vec<u8>> = vec![Vec::new()];
        let skip = turns.len().saturating_sub(MAX_TURNS);
        values.extend(
            turns[skip..]
                .iter()
                .map(|m| convert::memory(m).encode_to_vec()),
        );
        let ttl = self.ttl.as_secs().max(1);
        let epoch = epoch.to_string();
        let _: Option<i64> = redis
            .best_effort("history.fill", |mut conn| async move {
                let script = redis::Script::new(FILL);
                let mut fill = script.prepare_invoke();
                fill.key(&key)
                    .key(&sessions)
                    .key(&epoch_key)
                    .arg(epoch)
                    .arg(ttl);
                for value in &values {
                    fill.arg(value);
                }
                fill.invoke_async(&mut conn).await
            })
            .await;
    }

    /// How long a user's epoch outlives its last move: longer than any fill takes, so a
    /// filler never sees it come back to a value it read before.
    fn epoch_ttl(&self) -> i64 {
        self.ttl.as_secs().max(3600) as i64
    }

    /// Append newly acknowledged turns to the lists of their sessions that are cached.
    pub async fn append(&self, tenant: &TenantId, memories: &[Memory]) {
        let Some(redis) = &self.redis else {
            return;
        };
        let turns: Vec<&Memory> = memories.iter().filter(|m| m.is_turn()).collect();
        if turns.is_empty() {
            return;
        }
        let ttl = self.ttl.as_secs().max(1) as i64;
        let mut pipe = redis::pipe();
        for memory in turns {
            let key = key(tenant, &memory.scope);
            let sessions = sessions_key(tenant, &memory.scope.user_id);
            pipe.cmd("RPUSHX")
                .arg(&key)
                .arg(convert::memory(memory).encode_to_vec())
                .ignore()
                .ltrim(&key, -(MAX_TURNS as isize) - 1, -1)
                .ignore()
                .expire(&key, ttl)
                .ignore()
                // The user's set of lists lives as long as any of them, so forgetting the
                // user finds every one.
                .expire(&sessions, ttl)
                .ignore();
        }
        let _: Option<()> = redis
            .best_effort("history.append", |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await;
    }

    /// Drop the cached lists of these exact scopes (an updated or forgotten turn); how many
    /// there were.
    pub async fn invalidate(&self, tenant: &TenantId, scopes: &[Scope]) -> u64 {
        let Some(redis) = &self.redis else {
            return 0;
        };
        let keys: Vec<String> = scopes.iter().map(|s| key(tenant, s)).collect();
        if keys.is_empty() {
            return 0;
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for scope in scopes {
            let epoch = epoch_key(tenant, &scope.user_id);
            pipe.incr(&epoch, 1).ignore();
            pipe.expire(&epoch, self.epoch_ttl()).ignore();
        }
        pipe.del(keys);
        let done: Option<(u64,)> = redis
            .best_effort("history.invalidate", |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await;
        if done.is_none() {
            tracing::warn!(
                "could not drop a changed session's cached history; it expires within {:?}",
                self.ttl
            );
        }
        done.map_or(0, |(dropped,)| dropped)
    }

    /// Drop every cached list of a user (a whole scope forgotten); how many there were.
    pub async fn invalidate_user(&self, tenant: &TenantId, user_id: &str) -> u64 {
        let Some(redis) = &self.redis else {
            return 0;
        };
        let sessions = sessions_key(tenant, user_id);
        let epoch = epoch_key(tenant, user_id);
        let epoch_ttl = self.epoch_ttl();
        let done: Option<u64> = redis
            .best_effort("history.invalidate", |mut conn| async move {
                redis::pipe()
                    .incr(&epoch, 1)
                    .ignore()
                    .expire(&epoch, epoch_ttl)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await?;
                let lists: Vec<String> = redis::cmd("SMEMBERS")
                    .arg(&sessions)
                    .query_async(&mut conn)
                    .await?;
                let dropped: u64 = if lists.is_empty() {
                    0
                } else {
                    redis::cmd("DEL").arg(lists).query_async(&mut conn).await?
                };
                redis::cmd("DEL")
                    .arg(&sessions)
                    .query_async::<u64>(&mut conn)
                    .await?;
                Ok(dropped)
            })
            .await;
        if done.is_none() {
            tracing::warn!(
                "could not drop a forgotten user's cached session history; it expires within {:?}",
                self.ttl
            );
        }
        done.unwrap_or(0)
    }
}
