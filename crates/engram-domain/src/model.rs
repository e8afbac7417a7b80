//! Domain types: what a memory is, who it belongs to, and how reads select memories.
//!
//! These are plain Rust values that have already been validated; the conversions from the wire
//! (which do the validating) live in [`crate::validate`], the ones back in [`crate::convert`].

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};
use uuid::Uuid;

pub use engram_text::calendar::Timestamp;

use crate::error::{Error, Result};

/// The tenant a request acts for. Always resolved from credentials by the gateway, never read
/// from a request body, and carried explicitly on every internal call.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

impl TenantId {
    pub const MAX_LEN: usize = 64;

    /// The tenant every call belongs to when authentication is off (local development).
    pub fn default_tenant() -> Self {
        Self("default".to_string())
    }

    pub fn parse(value: &str) -> Result<Self> {
        if value.is_empty() || value.len() > Self::MAX_LEN {
            return Err(Error::invalid(
                "tenant",
                format!("must be 1..={} characters", Self::MAX_LEN),
            ));
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(Error::invalid(
                "tenant",
                "may only contain ASCII letters, digits, '-', '_' and '.'",
            ));
        }
        Ok(Self(value.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A memory's id: a UUIDv7, so ids sort in creation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemoryId(Uuid);

impl MemoryId {
    pub fn new_time_ordered() -> Self {
        Self(Uuid::now_v7())
    }

    pub fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// The smallest time-ordered id of the millisecond `unix_ms`: a page token that starts a
    /// listing at that time.
    pub fn first_at(unix_ms: u64) -> Self {
        Self(uuid::Builder::from_unix_timestamp_millis(unix_ms, &[0; 10]).into_uuid())
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// When a time-ordered id was made, in Unix milliseconds (`None` for other UUIDs).
    pub fn unix_ms(&self) -> Option<u64> {
        let (secs, nanos) = self.0.get_timestamp()?.to_unix();
        Some(secs * 1000 + u64::from(nanos) / 1_000_000)
    }
}

impl FromStr for MemoryId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Uuid::try_parse(s)
            .map(Self)
            .map_err(|_| Error::invalid("", format!("{s:?} is not a memory id (expected a UUID)")))
    }
}

impl fmt::Display for MemoryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Who a memory belongs to. On writes, the exact scope is stored. On reads an empty `agent_id`
/// or `session_id` matches any value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Scope {
    pub user_id: String,
    pub agent_id: String,
    pub session_id: String,
}

impl Scope {
    pub fn user(user_id: impl Into<String>) -> Self {
        Self {
            user_id: user_id.into(),
            ..Self::default()
        }
    }

    /// A stable key of the exact scope (all three fields), for de-duplication and partitioning.
    pub fn exact_key(&self) -> String {
        let mut hasher = Sha256::new();
        for part in [&self.user_id, &self.agent_id, &self.session_id] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        hex::encode(&hasher.finalize()[..16])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Kind {
    #[default]
    Fact,
    Message,
    Document,
}

impl Kind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Fact => "fact",
            Kind::Message => "message",
            Kind::Document => "document",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fact" => Some(Kind::Fact),
            "message" => Some(Kind::Message),
            "document" => Some(Kind::Document),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryState {
    #[default]
    Pending,
    Indexed,
}

/// Importance given to a memory written without one.
pub const DEFAULT_IMPORTANCE: f32 = 0.5;

/// A stored memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Memory {
    pub id: MemoryId,
    pub tenant: TenantId,
    pub scope: Scope,
    pub kind: Kind,
    pub role: String,
    pub text: String,
    pub metadata: BTreeMap<String, String>,
    pub tags: Vec<String>,
    pub entities: Vec<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub event_time: Timestamp,
    pub importance: f32,
    pub content_hash: String,
    pub idempotency_key: String,
    pub state: MemoryState,
}

impl Memory {
    /// About how many bytes this memory takes in an answer: its text, role, metadata, tags and
    /// entities, and a fixed amount for the rest.
    pub fn weight(&self) -> usize {
        let strings = |v: &[String]| v.iter().map(|s| s.len() + 2).sum::<usize>();
        self.text.len()
            + self.role.len()
            + self
                .metadata
                .iter()
                .map(|(k, v)| k.len() + v.len() + 4)
                .sum::<usize>()
            + strings(&self.tags)
            + strings(&self.entities)
            + self.content_hash.len()
            + self.idempotency_key.len()
            + 200
    }

    /// Whether this is a turn of a conversation: a message with a session.
    pub fn is_turn(&self) -> bool {
        self.kind == Kind::Message && !self.scope.session_id.is_empty()
    }

    /// Build the memory a validated input becomes, stamped with `now`.
    pub fn from_input(
        id: MemoryId,
        tenant: TenantId,
        scope: Scope,
        input: NewMemory,
        now: Timestamp,
    ) -> Self {
        let content_hash = content_hash(input.kind, &input.role, &input.text);
        let entities = engram_text::entities::extract(&input.text);
        Self {
            id,
            tenant,
            scope,
            kind: input.kind,
            role: input.role,
            text: input.text,
            metadata: input.metadata,
            tags: input.tags,
            entities,
            created_at: now,
            updated_at: now,
            event_time: input.event_time.unwrap_or(now),
            importance: input.importance.unwrap_or(DEFAULT_IMPORTANCE),
            content_hash,
            idempotency_key: input.idempotency_key,
            state: MemoryState::Pending,
        }
    }

    /// Apply a patch; returns whether the text changed (and so the memory must be re-embedded).
    pub fn apply_patch(&mut self, patch: MemoryPatch, now: Timestamp) -> bool {
        let MemoryPatch {
            text,
            kind,
            role,
            metadata,
            tags,
            event_time,
            importance,
        } = patch;
        let text_changed = text.as_ref().is_some_and(|t| *t != self.text);
        if let Some(text) = text {
            self.entities = engram_text::entities::extract(&text);
            self.text = text;
        }
        if let Some(kind) = kind {
            self.kind = kind;
        }
        if let Some(role) = role {
            self.role = role;
        }
        if let Some(metadata) = metadata {
            self.metadata = metadata;
        }
        if let Some(tags) = tags {
            self.tags = tags;
        }
        if let Some(event_time) = event_time {
            self.event_time = event_time.unwrap_or(self.created_at);
        }
        if let Some(importance) = importance {
            self.importance = importance.unwrap_or(DEFAULT_IMPORTANCE);
        }
        self.content_hash = content_hash(self.kind, &self.role, &self.text);
        self.updated_at = now;
        text_changed
    }
}

/// The de-duplication hash of a memory's content within its scope.
pub fn content_hash(kind: Kind, role: &str, text: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(kind.as_str().as_bytes());
    hasher.update([0]);
    hasher.update(role.as_bytes());
    hasher.update([0]);
    hasher.update(text.as_bytes());
    hex::encode(&hasher.finalize()[..16])
}

/// A validated memory to write.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NewMemory {
    pub text: String,
    pub kind: Kind,
    pub role: String,
    pub metadata: BTreeMap<String, String>,
    pub tags: Vec<String>,
    pub event_time: Option<Timestamp>,
    pub importance: Option<f32>,
    pub idempotency_key: String,
}

impl NewMemory {
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            ..Self::default()
        }
    }

    /// Whether identical content in the same scope makes this write a duplicate. Conversation
    /// messages repeat themselves legitimately ("thanks!"), so only facts and documents are
    /// de-duplicated by content; any kind is de-duplicated by its idempotency key.
    pub fn dedup_by_content(&self) -> bool {
        !matches!(self.kind, Kind::Message)
    }
}

/// Fields to change on a memory; `None` leaves a field as it is.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MemoryPatch {
    pub text: Option<String>,
    pub kind: Option<Kind>,
    pub role: Option<String>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub tags: Option<Vec<String>>,
    /// `Some(None)` resets the event time to the creation time.
    pub event_time: Option<Option<Timestamp>>,
    /// `Some(None)` resets the importance to the default.
    pub importance: Option<Option<f32>>,
}

/// What reads select within a scope.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Filter {
    pub kinds: Vec<Kind>,
    pub tags_any: Vec<String>,
    pub tags_all: Vec<String>,
    pub entities_any: Vec<String>,
    /// Inclusive.
    pub event_after: Option<Timestamp>,
    /// Exclusive.
    pub event_before: Option<Timestamp>,
    pub metadata_equals: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SearchMode {
    #[default]
    Hybrid,
    Semantic,
    Keyword,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteMode {
    #[default]
    Async,
    Sync,
}
