//! The durable write log: Redis Streams, one per partition.
//!
//! A write is appended to the stream of its partition (chosen by the hash of tenant and user,
//! so that one user's writes — including a Forget of the whole user — keep their order) by one
//! Lua script that also reserves its de-duplication keys, so a write is either logged with its
//! reservation or not at all. Its acknowledgement carries a [`WriteToken`]: the partition and
//! the entry id.
//!
//! Each partition is worked by one worker at a time, the holder of the partition's lease, who
//! reads it through the consumer group `indexers` as the consumer `p<partition>`. A worker that
//! dies leaves its lease to expire and its unacknowledged entries in that consumer's pending
//! list, where the next holder reads them first: entries are reclaimed after the lease's idle
//! timeout, in order. After applying entries the worker acknowledges them, records outcomes
//! worth keeping (failures, forget counts), and moves the partition's watermark — the last
//! applied entry — which is what [`WriteLog::status`] compares tokens with.

use std::time::Duration;

use deadpool_redis::{Connection, Pool};
use engram_domain::api::{EntryId, Erasure, Outcome, WriteFailure, WriteState, WriteToken};
use engram_domain::model::{MemoryId, Scope, TenantId};
use engram_domain::{Error, Result, SecretUrl};
use redis::Value;
use redis::streams::StreamReadReply;

pub const GROUP: &str = "indexers";
const DEAD_LETTER: &str = "engram:log:dead";
/// Outcomes (failures, forget counts) are kept this long for status queries.
const OUTCOME_TTL_SECS: u64 = 24 * 3600;
/// De-duplication reservations outlive indexing by this long, covering a Submit that checked
/// the index just before the write became visible there.
const RESERVATION_TTL_SECS: u64 = 120;

/// Append entries unless the partition's backlog is over the bound; reserve de-duplication
/// keys (each holds `<id> <entry>`) and record where each new memory's write is (its pending
/// key holds `<partition> <entry>`). ARGV: max backlog, count, partition, then per entry:
/// idempotency key, content key, id, payload, '1' to append whatever the reservations say (they
/// are stale), and the pending key (kept a week at most if the write never leaves the log; its
/// finish shortens that). Returns {'LAG', backlog} or {'OK', last entry id, per entry
/// 'N'<entry> | 'K'<held> | 'H'<held>}.
const APPEND: &str = r"
local len = redis.call('XLEN', KEYS[1])
local n = tonumber(ARGV[2])
if len > 0 and len + n > tonumber(ARGV[1]) then return {'LAG', tostring(len)} end
local out = {'OK', ''}
local i = 4
for j = 1, n do
  local kkey, hkey, id, payload, force, pkey = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  i = i + 6
  local by_key = force ~= '1' and kkey ~= '' and redis.call('GET', kkey)
  local by_hash = force ~= '1' and (not by_key) and hkey ~= '' and redis.call('GET', hkey)
  if by_key then table.insert(out, 'K' .. by_key)
  elseif by_hash then table.insert(out, 'H' .. by_hash)
  else
    local entry = redis.call('XADD', KEYS[1], '*', 'op', payload)
    if kkey ~= '' then redis.call('SET', kkey, id .. ' ' .. entry) end
    if hkey ~= '' then redis.call('SET', hkey, id .. ' ' .. entry) end
    if pkey ~= '' then redis.call('SET', pkey, ARGV[3] .. ' ' .. entry, 'EX', 604800) end
    out[2] = entry
    table.insert(out, 'N' .. entry)
  end
end
return out
";

/// Take the lease if free, or renew it if ours; the lease holds `<owner> <epoch>`, and the
/// epoch (KEYS[2]) grows each time the lease changes hands: to the next number, or to Redis's
/// clock in milliseconds if that is later. So an epoch taken now is above any handed out
/// before even if Redis lost or rolled back its data (leases change hands far less often than
/// once a millisecond), and the index, which remembers the newest epoch it applied, does not
/// refuse the new holder. ARGV: owner, ttl ms. Returns the epoch the lease is held under, or 0
/// if another owner holds it.
const LEASE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder then
  local owner, epoch = string.match(holder, '^(%S+) (%d+)$')
  if owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(epoch)
  end
  return 0
end
local now = redis.call('TIME')
local clock = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local epoch = redis.call('INCR', KEYS[2])
if epoch < clock then
  epoch = clock
  redis.call('SET', KEYS[2], string.format('%d', epoch))
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. string.format('%d', epoch), 'PX', ARGV[2])
return epoch
";

/// Give the lease up if ours; ARGV: owner.
const RELEASE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder and string.match(holder, '^(%S+) ') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Finish entries, if the lease's epoch (KEYS[1]) is still ARGV[1]: a worker whose lease moved
/// on may not finish anything. KEYS: epoch, stream, outcomes, failures, watermark. ARGV: epoch,
/// last entry, group, outcome TTL, reservation TTL, n, the n entry ids, m, m pairs of (entry
/// id, encoded outcome), then the reservations whose end starts now. The watermark only moves
/// forward. Returns 1, or 0 when fenced out.
const FINISH: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local function parse(id)
  local ms, seq = string.match(id or '', '^(%d+)-(%d+)$')
  if not ms then return nil end
  return tonumber(ms), tonumber(seq)
end
local last, group, outcome_ttl, reservation_ttl = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local n = tonumber(ARGV[6])
local i = 7
local ids = {}
for j = 1, n do ids[j] = ARGV[i]; i = i + 1 end
local m = tonumber(ARGV[i]); i = i + 1
for j = 1, m do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
end
if m > 0 then redis.call('EXPIRE', KEYS[3], outcome_ttl) end
if n > 0 then
  redis.call('XACK', KEYS[2], group, unpack(ids))
  redis.call('HDEL', KEYS[4], unpack(ids))
end
-- The watermark moves forward to the last entry finished, but not past an older entry still
-- delivered and unacknowledged (one a stalled worker read late): everything up to it is applied.
local l1, l2 = parse(last)
local summary = redis.call('XPENDING', KEYS[2], group)
local p1, p2 = parse(summary[2])
if p1 and (p1 < l1 or (p1 == l1 and p2 < l2)) then
  l1 = nil
end
local mark = redis.call('GET', KEYS[5])
local m1, m2 = parse(mark)
if l1 and (not m1 or l1 > m1 or (l1 == m1 and l2 > m2)) then
  redis.call('SET', KEYS[5], last)
  m1, m2 = l1, l2
end
for j = i, #ARGV do redis.call('EXPIRE', ARGV[j], reservation_ttl) end
-- Entries up to the watermark are applied and acknowledged, and none still delivered is
-- trimmed: the stream's length is the backlog.
if m1 then
  local t1, t2 = m1, m2 + 1
  if p1 and (p1 < t1 or (p1 == t1 and p2 < t2)) then t1, t2 = p1, p2 end
  redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d-%d', t1, t2))
end
return 1
";

/// Dead-letter an entry, if the lease's epoch (KEYS[1]) is still ARGV[1]. KEYS: epoch, the
/// dead-letter stream. ARGV: epoch, partition, entry, reason, payload, then the reservations to
/// drop (a failed write must not stand in the way of the same write made again). Returns 1, or
/// 0 when fenced out.
const DEAD_LETTER_ENTRY: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('XADD', KEYS[2], '*', 'partition', ARGV[2], 'entry', ARGV[3], 'reason', ARGV[4], 'op', ARGV[5])
for j = 6, #ARGV do redis.call('DEL', ARGV[j]) end
return 1
";

/// See [`WriteLog::depth`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Depth {
    pub backlog: u64,
    pub pending: u64,
}

/// A write moved to the dead-letter stream, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub partition: u32,
    /// Its entry id in its partition's stream.
    pub entry: String,
    pub reason: String,
}

/// One write to append.
#[derive(Debug, Clone)]
pub struct Append {
    /// De-duplication reservation by idempotency key (empty: none).
    pub key_reservation: String,
    /// De-duplication reservation by content (empty: none).
    pub content_reservation: String,
    /// The id the write will have.
    pub id: String,
    /// The encoded `LogEntry`.
    pub payload: Vec<u8>,
    /// Append even if a reservation is held (the caller found it stale).
    pub force: bool,
    /// Where an Update or Forget of the new memory finds its write while it is in the log
    /// ([`pending_key`]; empty: none). Like the reservations, it outlives indexing briefly.
    pub pending_key: String,
}

/// The key recording which partition and entry hold the write of memory `id` of `tenant`,
/// while it is in the write log (see [`WriteLog::pending`]).
pub fn pending_key(tenant: &TenantId, id: &str) -> String {
    format!("engram:log:id:{}:{id}", tenant.as_str())
}

/// What became of one appended write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    Logged(EntryId),
    /// A recent write of the scope has the same idempotency key.
    DuplicateKey(Reserved),
    /// A recent write of the scope has the same content.
    DuplicateContent(Reserved),
}

/// The write holding a de-duplication reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    /// Its memory id.
    pub id: String,
    /// Its entry in the same partition (unknown for reservations made before entries were
    /// recorded in them).
    pub entry: Option<EntryId>,
}

impl Reserved {
    fn parse(held: &str) -> Self {
        match held.split_once(' ') {
            Some((id, entry)) => Self {
                id: id.to_string(),
                entry: EntryId::parse(entry),
            },
            None => Self {
                id: held.to_string(),
                entry: None,
            },
        }
    }
}

#[derive(Debug)]
pub enum AppendError {
    /// The partition's backlog is over the bound.
    Lag { backlog: u64 },
    /// Redis could not be reached or did not answer.
    Unavailable(String),
}

/// Which entries [`WriteLog::read`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Those delivered before and never acknowledged, oldest first.
    Pending,
    /// Those not delivered yet, waiting up to `block` for some.
    New { block: Duration },
}

/// One entry read from a partition.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: EntryId,
    /// `None` for an entry still listed as delivered but no longer in the stream (trimmed).
    pub payload: Option<Vec<u8>>,
}

/// What a worker records when it is done with an entry.
#[derive(Debug, Clone)]
pub enum Done {
    Applied,
    /// A Forget, with what it removed.
    Forgot(Erasure),
    /// Dead-lettered: why.
    Failed(WriteFailure),
}

/// An entry's outcome as the log holds it: an encoded [`Outcome`], or the text that releases
/// before it wrote (`forgot:<n>`, `failed:<reason>`), which lives out its day after an upgrade.
fn read_outcome(bytes: &[u8]) -> Option<Outcome> {
    if let Some(outcome) = Outcome::decode(bytes) {
        return Some(outcome);
    }
    let text = std::str::from_utf8(bytes).ok()?;
    if let Some(n) = text.strip_prefix("forgot:") {
        return n.parse().ok().map(|memories| {
            Outcome::Forgot(Erasure {
                memories,
                ..Erasure::default()
            })
        });
    }
    text.strip_prefix("failed:").map(|reason| {
        Outcome::Failed(WriteFailure {
            kind: engram_domain::api::FailureKind::Failed,
            message: reason.to_string(),
        })
    })
}

#[derive(Clone)]
pub struct WriteLog {
    pool: Pool,
    partitions: u32,
    op_timeout: Duration,
    /// Prefix of the partitions' keys: `engram:log` for writes, `engram:extract` for fact
    /// extraction.
    prefix: &'static str,
}

impl std::fmt::Debug for WriteLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteLog")
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

/// The consumer that reads a partition, whoever holds its lease.
fn consumer(partition: u32) -> String {
    format!("p{partition}")
}

/// A fenced script's answer: 1 done, 0 refused because the lease moved on from `epoch`.
fn fenced(answer: i64, partition: u32, epoch: u64) -> Result<()> {
    if answer == 1 {
        Ok(())
    } else {
        Err(Error::Aborted(format!(
            "the lease of write log partition {partition} moved on from epoch {epoch}: a newer worker finishes its entries"
        )))
    }
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::unavailable(format!("the write log (Redis) is unavailable: {e}"))
}

impl WriteLog {
    fn stream(&self, partition: u32) -> String {
        format!("{}:{partition}", self.prefix)
    }

    fn watermark_key(&self, partition: u32) -> String {
        format!("{}:{partition}:applied", self.prefix)
    }

    fn outcome_key(&self, partition: u32) -> String {
        format!("{}:{partition}:outcome", self.prefix)
    }

    fn failures_key(&self, partition: u32) -> String {
        format!("{}:{partition}:failures", self.prefix)
    }

    fn lease_key(&self, partition: u32) -> String {
        format!("{}:{partition}:lease", self.prefix)
    }

    fn epoch_key(&self, partition: u32) -> String {
        format!("{}:{partition}:epoch", self.prefix)
    }

    /// The same Redis and partitioning under another key prefix: a second log with its own
    /// streams, workers and leases (its dead letters go to the one dead-letter stream).
    pub fn with_prefix(mut self, prefix: &'static str) -> Self {
        self.prefix = prefix;
        self
    }

    /// A log of `partitions` streams on the Redis at `url`; `setting` names the URL's source.
    pub fn connect(setting: &str, url: &SecretUrl, partitions: u32) -> Result<Self> {
        // Workers hold a connection per partition in blocking reads; writers need their own.
        let pool = engram_cache::pool_sized(setting, url, partitions as usize + 32)?;
        Ok(Self {
            pool,
            partitions: partitions.max(1),
            op_timeout: Duration::from_secs(2),
            prefix: "engram:log",
        })
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The partition of a scope: all of one user's writes share it.
    pub fn partition_of(&self, tenant: &TenantId, scope: &Scope) -> u32 {
        // FNV-1a: stable across processes and releases (unlike std's hasher).
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in tenant
            .as_str()
            .bytes()
            .chain([0])
            .chain(scope.user_id.bytes())
        {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        (hash % u64::from(self.partitions)) as u32
    }

    async fn conn(&self) -> Result<Connection> {
        match tokio::time::timeout(self.op_timeout, self.pool.get()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(unavailable("no connection within the timeout")),
        }
    }

    /// Run one Redis operation within the operation timeout.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.conn().await?;
        match tokio::time::timeout(self.op_timeout, op(conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(unavailable("no answer within the timeout")),
        }
    }

    /// Append writes to `partition`, all or nothing, unless its backlog exceeds `max_backlog`.
    pub async fn append(
        &self,
        partition: u32,
        writes: &[Append],
        max_backlog: u64,
    ) -> std::result::Result<Vec<Appended>, AppendError> {
        let script = redis::Script::new(APPEND);
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.stream(partition))
            .arg(max_backlog)
            .arg(writes.len())
            .arg(partition);
        for w in writes {
            invocation
                .arg(&w.key_reservation)
                .arg(&w.content_reservation)
                .arg(&w.id)
                .arg(&w.payload)
                .arg(if w.force { "1" } else { "0" })
                .arg(&w.pending_key);
        }
        let reply: Vec<String> = match self
            .run(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await
        {
            Ok(reply) => reply,
            Err(e) => return Err(AppendError::Unavailable(e.to_string())),
        };
        let bad = || AppendError::Unavailable("the write log answered unexpectedly".into());
        match reply.first().map(String::as_str) {
            Some("LAG") => Err(AppendError::Lag {
                backlog: reply.get(1).and_then(|v| v.parse().ok()).unwrap_or(0),
            }),
            Some("OK") => reply
                .get(2..)
                .filter(|outcomes| outcomes.len() == writes.len())
                .ok_or_else(bad)?
                .iter()
                .map(|r| {
                    let (tag, rest) = r.split_at_checked(1).ok_or_else(bad)?;
                    match tag {
                        "N" => EntryId::parse(rest).map(Appended::Logged).ok_or_else(bad),
                        "K" => Ok(Appended::DuplicateKey(Reserved::parse(rest))),
                        "H" => Ok(Appended::DuplicateContent(Reserved::parse(rest))),
                        _ => Err(bad()),
                    }
                })
                .collect(),
            _ => Err(bad()),
        }
    }

    /// Where the write behind `token` stands.
    pub async fn status(&self, token: WriteToken) -> Result<WriteState> {
        let (partition, entry) = match token {
            WriteToken::Indexed => return Ok(WriteState::Indexed),
            WriteToken::Logged { partition, entry } => (partition, entry),
        };
        if partition >= self.partitions {
            return Err(Error::invalid(
                "write_token",
                format!(
                    "names partition {partition}, but the log has {}",
                    self.partitions
                ),
            ));
        }
        let (outcome, watermark): (Option<Vec<u8>>, Option<String>) = self
            .run(|mut conn| async move {
                redis::pipe()
                    .hget(self.outcome_key(partition), entry.to_string())
                    .get(self.watermark_key(partition))
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        if let Some(Outcome::Failed(failure)) = outcome.as_deref().and_then(read_outcome) {
            return Ok(WriteState::Failed(failure));
        }
        let applied = watermark.as_deref().and_then(EntryId::parse);
        Ok(match applied {
            Some(applied) if applied >= entry => WriteState::Indexed,
            _ => WriteState::Pending,
        })
    }

    /// For each of `ids`, the partition and entry of its write if it is in the log (not yet
    /// indexed, or indexed in the last couple of minutes).
    pub async fn pending(
        &self,
        tenant: &TenantId,
        ids: &[MemoryId],
    ) -> Result<Vec<Option<(u32, EntryId)>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids
            .iter()
            .map(|id| pending_key(tenant, &id.to_string()))
            .collect();
        let found: Vec<Option<String>> =
            self.run(|mut conn| async move {
                redis::cmd("MGET").arg(&keys).query_async(&mut conn).await
            })
            .await?;
        Ok(found
            .into_iter()
            .map(|held| {
                let (partition, entry) = held.as_deref()?.split_once(' ')?;
                let partition: u32 = partition.parse().ok()?;
                (partition < self.partitions).then_some(())?;
                Some((partition, EntryId::parse(entry)?))
            })
            .collect())
    }

    /// Delete keys the log holds for writes (de-duplication reservations, pending keys) of
    /// memories being forgotten; how many there were.
    pub async fn drop_keys(&self, keys: Vec<String>) -> Result<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        self.run(|mut conn| async move { redis::cmd("DEL").arg(keys).query_async(&mut conn).await })
            .await
    }

    /// What the Forget at `entry` removed, once it is applied.
    pub async fn forgot(&self, partition: u32, entry: EntryId) -> Result<Erasure> {
        let outcome: Option<Vec<u8>> = self
            .run(|mut conn| async move {
                redis::cmd("HGET")
                    .arg(self.outcome_key(partition))
                    .arg(entry.to_string())
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(match outcome.as_deref().and_then(read_outcome) {
            Some(Outcome::Forgot(receipt)) => receipt,
            _ => Erasure::default(),
        })
    }

    /// Create the consumer group of `partition` (and its stream) if missing.
    pub async fn ensure_group(&self, partition: u32) -> Result<()> {
        let created: redis::RedisResult<()> = async {
            let mut conn = self.conn().await.map_err(|e| {
                redis::RedisError::from((redis::ErrorKind::Io, "pool", e.to_string()))
            })?;
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(self.stream(partition))
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await
        }
        .await;
        match created {
            Err(e) if e.code() != Some("BUSYGROUP") => Err(unavailable(e)),
            _ => Ok(()),
        }
    }

    /// Take or renew the lease of `partition` for `owner`: the epoch it is held under (see
    /// [`Fence`](engram_domain::api::Fence)), or None while another owner holds it.
    pub async fn lease(&self, partition: u32, owner: &str, ttl: Duration) -> Result<Option<u64>> {
        let owner = owner.to_string();
        let epoch: u64 = self
            .run(|mut conn| async move {
                redis::Script::new(LEASE)
                    .key(self.lease_key(partition))
                    .key(self.epoch_key(partition))
                    .arg(owner)
                    .arg(ttl.as_millis() as u64)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok((epoch > 0).then_some(epoch))
    }

    pub async fn release(&self, partition: u32, owner: &str) -> Result<()> {
        let owner = owner.to_string();
        self.run(|mut conn| async move {
            redis::Script::new(RELEASE)
                .key(self.lease_key(partition))
                .arg(owner)
                .invoke_async::<i64>(&mut conn)
                .await
        })
        .await
        .map(drop)
    }

    /// Drop the lease of every partition, whoever holds it. Only for a Redis one process uses
    /// alone (the one `engram up` starts for its data directory): a lease found there can only
    /// be a dead predecessor's, and waiting for it to expire would leave acknowledged writes
    /// unindexed for `ENGRAM_LOG_CLAIM_IDLE`. Their pending entries are read first as usual.
    pub async fn break_leases(&self) -> Result<()> {
        let keys: Vec<String> = (0..self.partitions).map(|p| self.lease_key(p)).collect();
        self.run(|mut conn| async move {
            redis::cmd("DEL")
                .arg(&keys)
                .query_async::<i64>(&mut conn)
                .await
        })
        .await
        .map(drop)
    }

    /// Read up to `count` entries of `partition` (see [`Read`]).
    pub async fn read(&self, partition: u32, count: usize, which: Read) -> Result<Vec<Entry>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(consumer(partition))
            .arg("COUNT")
            .arg(count);
        let (from, block) = match which {
            Read::Pending => ("0", Duration::ZERO),
            Read::New { block } => (">", block),
        };
        if !block.is_zero() {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(self.stream(partition)).arg(from);
        let mut conn = self.conn().await?;
        let reply: Option<StreamReadReply> =
            match tokio::time::timeout(self.op_timeout + block, cmd.query_async(&mut conn)).await {
                Ok(Ok(reply)) => reply,
                Ok(Err(e)) => return Err(unavailable(e)),
                Err(_) => return Err(unavailable("no answer within the timeout")),
            };
        let mut entries = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for id in key.ids {
                let Some(entry) = EntryId::parse(&id.id) else {
                    continue;
                };
                let payload = match id.map.get("op") {
                    Some(Value::BulkString(bytes)) => Some(bytes.clone()),
                    _ => None,
                };
                entries.push(Entry { id: entry, payload });
            }
        }
        Ok(entries)
    }

    /// Acknowledge entries delivered but no longer in the stream: they were finished and
    /// trimmed already, so there is nothing to apply.
    pub async fn ack_trimmed(&self, partition: u32, entries: &[EntryId]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut ack = redis::cmd("XACK");
        ack.arg(self.stream(partition)).arg(GROUP);
        for id in entries {
            ack.arg(id.to_string());
        }
        self.run(|mut conn| async move { ack.query_async::<()>(&mut conn).await })
            .await
    }

    /// Count one more failed attempt at `entry` that was its own fault (the rest of the
    /// pipeline worked at the time); returns how many it has had.
    pub async fn charge_failure(&self, partition: u32, entry: EntryId) -> Result<u64> {
        self.run(|mut conn| async move {
            redis::cmd("HINCRBY")
                .arg(self.failures_key(partition))
                .arg(entry.to_string())
                .arg(1)
                .query_async(&mut conn)
                .await
        })
        .await
    }

    /// Record that the entries in `done` (in log order) are finished: outcomes, acknowledgement,
    /// the watermark (which only moves forward), the end of their de-duplication reservations,
    /// and trimming — unless the lease moved on from `epoch`, which is [`Error::Aborted`].
    pub async fn finish(
        &self,
        partition: u32,
        epoch: u64,
        done: &[(EntryId, Done)],
        reservations: &[String],
    ) -> Result<()> {
        let Some((last, _)) = done.last() else {
            return Ok(());
        };
        let script = redis::Script::new(FINISH);
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.epoch_key(partition))
            .key(self.stream(partition))
            .key(self.outcome_key(partition))
            .key(self.failures_key(partition))
            .key(self.watermark_key(partition))
            .arg(epoch)
            .arg(last.to_string())
            .arg(GROUP)
            .arg(OUTCOME_TTL_SECS)
            .arg(RESERVATION_TTL_SECS)
            .arg(done.len());
        for (id, _) in done {
            invocation.arg(id.to_string());
        }
        let kept: Vec<(EntryId, Outcome)> = done
            .iter()
            .filter_map(|(id, outcome)| match outcome {
                Done::Applied => None,
                Done::Forgot(receipt) => Some((*id, Outcome::Forgot(*receipt))),
                Done::Failed(failure) => Some((*id, Outcome::Failed(failure.clone()))),
            })
            .collect();
        invocation.arg(kept.len());
        for (id, outcome) in &kept {
            invocation.arg(id.to_string()).arg(outcome.encode());
        }
        for key in reservations {
            invocation.arg(key);
        }
        let finished: i64 = self
            .run(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await?;
        fenced(finished, partition, epoch)
    }

    /// Keep a failed entry, with why, in the dead-letter stream (unless the lease moved on from
    /// `epoch`: [`Error::Aborted`]).
    pub async fn dead_letter(
        &self,
        partition: u32,
        epoch: u64,
        entry: &Entry,
        reason: &str,
        reservations: &[String],
    ) -> Result<()> {
        let script = redis::Script::new(DEAD_LETTER_ENTRY);
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.epoch_key(partition))
            .key(DEAD_LETTER)
            .arg(epoch)
            .arg(partition)
            .arg(entry.id.to_string())
            .arg(reason)
            .arg(entry.payload.as_deref().unwrap_or_default());
        for key in reservations {
            invocation.arg(key);
        }
        let kept: i64 = self
            .run(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await?;
        fenced(kept, partition, epoch)
    }

    /// How deep `partition` is: entries not yet applied (its lag: applied entries are trimmed),
    /// and of those, the ones delivered to a worker and not yet acknowledged.
    pub async fn depth(&self, partition: u32) -> Result<Depth> {
        let (backlog, pending): (u64, Value) = self
            .run(|mut conn| async move {
                redis::pipe()
                    .cmd("XLEN")
                    .arg(self.stream(partition))
                    .cmd("XPENDING")
                    .arg(self.stream(partition))
                    .arg(GROUP)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        // XPENDING's summary starts with the count (an error if the group does not exist yet).
        let pending = match pending {
            Value::Array(summary) => match summary.first() {
                Some(Value::Int(n)) => (*n).max(0) as u64,
                _ => 0,
            },
            _ => 0,
        };
        Ok(Depth { backlog, pending })
    }

    /// The oldest `count` writes in the dead-letter stream.
    pub async fn dead_lettered(&self, count: usize) -> Result<Vec<DeadLetter>> {
        let reply: redis::streams::StreamRangeReply = self
            .run(|mut conn| async move {
                redis::cmd("XRANGE")
                    .arg(DEAD_LETTER)
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(count)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|id| {
                let field = |name: &str| id.get::<String>(name).unwrap_or_default();
                DeadLetter {
                    partition: field("partition").parse().unwrap_or(0),
                    entry: field("entry"),
                    reason: field("reason"),
                }
            })
            .collect())
    }

    /// Entries in the dead-letter stream.
    pub async fn dead_letters(&self) -> Result<u64> {
        self.run(|mut conn| async move {
            redis::cmd("XLEN")
                .arg(DEAD_LETTER)
                .query_async(&mut conn)
                .await
        })
        .await
    }
}
