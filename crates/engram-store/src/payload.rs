//! How a memory is laid out as a point payload, and back.

use std::collections::BTreeMap;

use engram_domain::model::{Kind, Memory, MemoryId, MemoryState, Scope, TenantId, Timestamp};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::error::StoreError;

pub const TENANT: &str = "tenant";
pub const USER_ID: &str = "user_id";
pub const AGENT_ID: &str = "agent_id";
pub const SESSION_ID: &str = "session_id";
/// Hash of the exact (user, agent, session) triple, for de-duplication within a scope.
pub const SCOPE_KEY: &str = "scope_key";
pub const KIND: &str = "kind";
pub const ROLE: &str = "role";
pub const TEXT: &str = "text";
pub const METADATA: &str = "metadata";
/// `key \u{1f} value` strings: equality filters on any metadata key, whatever characters it
/// holds, through one keyword index.
pub const METADATA_KV: &str = "metadata_kv";
pub const TAGS: &str = "tags";
pub const ENTITIES: &str = "entities";
pub const CREATED_AT: &str = "created_at";
pub const UPDATED_AT: &str = "updated_at";
pub const EVENT_TIME: &str = "event_time";
pub const IMPORTANCE: &str = "importance";
pub const CONTENT_HASH: &str = "content_hash";
pub const IDEMPOTENCY_KEY: &str = "idempotency_key";

/// The payload fields a search reads of each candidate (see [`candidate`]).
pub const CANDIDATE_FIELDS: [&str; 2] = [EVENT_TIME, IMPORTANCE];

/// A search result from the [`CANDIDATE_FIELDS`] of its payload.
pub fn candidate(
    id: Uuid,
    score: f32,
    map: &Map<String, Value>,
) -> Result<crate::Candidate, StoreError> {
    let corrupt = |reason: &str| StoreError::CorruptPayload {
        id: id.to_string(),
        reason: reason.to_string(),
    };
    Ok(crate::Candidate {
        id: MemoryId::from_uuid(id),
        score,
        event_time: map
            .get(EVENT_TIME)
            .and_then(Value::as_i64)
            .map(Timestamp::from_micros)
            .ok_or_else(|| corrupt("event_time is missing or not an integer"))?,
        importance: map
            .get(IMPORTANCE)
            .and_then(Value::as_f64)
            .ok_or_else(|| corrupt("importance is missing"))? as f32,
    })
}

/// How a payload field is indexed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexKind {
    /// Keyword index that is also the tenant key (points stored together per tenant).
    Tenant,
    Keyword,
    /// Integer index for range conditions.
    Range,
}

/// The payload indexes every backend keeps: the tenant as the tenant key, and every field
/// reads filter on.
pub const INDEXED: &[(&str, IndexKind)] = &[
    (TENANT, IndexKind::Tenant),
    (USER_ID, IndexKind::Keyword),
    (AGENT_ID, IndexKind::Keyword),
    (SESSION_ID, IndexKind::Keyword),
    (SCOPE_KEY, IndexKind::Keyword),
    (KIND, IndexKind::Keyword),
    (TAGS, IndexKind::Keyword),
    (ENTITIES, IndexKind::Keyword),
    (METADATA_KV, IndexKind::Keyword),
    (CONTENT_HASH, IndexKind::Keyword),
    (IDEMPOTENCY_KEY, IndexKind::Keyword),
    (EVENT_TIME, IndexKind::Range),
    (CREATED_AT, IndexKind::Range),
];

pub fn metadata_pair(key: &str, value: &str) -> String {
    format!("{key}\u{1f}{value}")
}

/// The payload of a memory's point, as JSON (every backend stores this object).
pub fn to_payload(memory: &Memory) -> Map<String, Value> {
    let metadata_kv: Vec<String> = memory
        .metadata
        .iter()
        .map(|(k, v)| metadata_pair(k, v))
        .collect();
    let value = json!({
        TENANT: memory.tenant.as_str(),
        USER_ID: memory.scope.user_id,
        AGENT_ID: memory.scope.agent_id,
        SESSION_ID: memory.scope.session_id,
        SCOPE_KEY: memory.scope.exact_key(),
        KIND: memory.kind.as_str(),
        ROLE: memory.role,
        TEXT: memory.text,
        METADATA: memory.metadata,
        METADATA_KV: metadata_kv,
        TAGS: memory.tags,
        ENTITIES: memory.entities,
        CREATED_AT: memory.created_at.as_micros(),
        UPDATED_AT: memory.updated_at.as_micros(),
        EVENT_TIME: memory.event_time.as_micros(),
        IMPORTANCE: memory.importance,
        CONTENT_HASH: memory.content_hash,
        IDEMPOTENCY_KEY: memory.idempotency_key,
    });
    match value {
        Value::Object(map) => map,
        // `json!` of an object literal is always an object.
        _ => Map::new(),
    }
}

pub fn from_payload(id: Uuid, map: &Map<String, Value>) -> Result<Memory, StoreError> {
    let corrupt = |reason: String| StoreError::CorruptPayload {
        id: id.to_string(),
        reason,
    };
    let string = |field: &str| -> Result<String, StoreError> {
        match map.get(field) {
            Some(Value::String(s)) => Ok(s.clone()),
            None => Ok(String::new()),
            Some(other) => Err(corrupt(format!("{field} is not a string: {other}"))),
        }
    };
    let strings = |field: &str| -> Result<Vec<String>, StoreError> {
        match map.get(field) {
            Some(Value::Array(values)) => values
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(corrupt(format!("{field} holds a non-string {other}"))),
                })
                .collect(),
            None => Ok(Vec::new()),
            Some(other) => Err(corrupt(format!("{field} is not an array: {other}"))),
        }
    };
    let micros = |field: &str| -> Result<Timestamp, StoreError> {
        map.get(field)
            .and_then(Value::as_i64)
            .map(Timestamp::from_micros)
            .ok_or_else(|| corrupt(format!("{field} is missing or not an integer")))
    };
    let tenant = TenantId::parse(&string(TENANT)?).map_err(|e| corrupt(e.to_string()))?;
    let kind_name = string(KIND)?;
    let kind =
        Kind::parse(&kind_name).ok_or_else(|| corrupt(format!("unknown kind {kind_name:?}")))?;
    let metadata: BTreeMap<String, String> = match map.get(METADATA) {
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                other => Err(corrupt(format!("metadata {k:?} is not a string: {other}"))),
            })
            .collect::<Result<_, _>>()?,
        None => BTreeMap::new(),
        Some(other) => return Err(corrupt(format!("metadata is not an object: {other}"))),
    };
    let importance = map
        .get(IMPORTANCE)
        .and_then(Value::as_f64)
        .ok_or_else(|| corrupt("importance is missing".into()))? as f32;
    Ok(Memory {
        id: MemoryId::from_uuid(id),
        tenant,
        scope: Scope {
            user_id: string(USER_ID)?,
            agent_id: string(AGENT_ID)?,
            session_id: string(SESSION_ID)?,
        },
        kind,
        role: string(ROLE)?,
        text: string(TEXT)?,
        metadata,
        tags: strings(TAGS)?,
        entities: strings(ENTITIES)?,
        created_at: micros(CREATED_AT)?,
        updated_at: micros(UPDATED_AT)?,
        event_time: micros(EVENT_TIME)?,
        importance,
        content_hash: string(CONTENT_HASH)?,
        idempotency_key: string(IDEMPOTENCY_KEY)?,
        state: MemoryState::Indexed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use engram_domain::model::NewMemory;

    #[test]
    fn payload_round_trips_every_field() {
        let mut input = NewMemory::text("I adopted a cat named Miso");
        input.kind = Kind::Message;
        input.role = "user".into();
        input.metadata = BTreeMap::from([("a.b c".into(), "x=y".into())]);
        input.tags = vec!["pets".into()];
        input.importance = Some(0.7);
        input.event_time = Some(Timestamp::from_micros(1_600_000_000_123_456));
        input.idempotency_key = "k1".into();
        let mut memory = Memory::from_input(
            MemoryId::new_time_ordered(),
            TenantId::parse("acme").unwrap(),
            Scope {
                user_id: "alice".into(),
                agent_id: "a".into(),
                session_id: "s".into(),
            },
            input,
            Timestamp::from_micros(1_700_000_000_000_001),
        );
        memory.entities = vec!["Miso".into()];
        memory.state = MemoryState::Indexed;
        let back = from_payload(memory.id.as_uuid(), &to_payload(&memory)).unwrap();
        assert_eq!(back, memory);
        let mut fields = to_payload(&memory);
        fields.retain(|k, _| CANDIDATE_FIELDS.contains(&k.as_str()));
        let found = candidate(memory.id.as_uuid(), 0.5, &fields).unwrap();
        assert_eq!(
            (found.id, found.event_time, found.importance),
            (memory.id, memory.event_time, memory.importance)
        );
    }
}
