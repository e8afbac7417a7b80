//! Validation of every public request: wire types in, domain types out.
//!
//! Each function either returns a fully checked domain value or an INVALID_ARGUMENT naming the
//! field by its path in the request (`memories[2].text`, `filter.kinds[0]`). Nothing here
//! trusts a size, a count, an enum value or an id that came over the wire.

use std::collections::BTreeMap;
use std::time::Duration;

use engram_proto::v1 as pb;

use crate::api::{
    ContextRequest, ConverseCommand, ForgetTarget, GetQuery, ListQuery, RecallQuery, RememberBatch,
    UpdateCommand, WriteToken,
};
use crate::error::{Error, Result};
use crate::limits::{Limits, fixed};
use crate::model::{
    Filter, Kind, MemoryId, MemoryPatch, NewMemory, Scope, SearchMode, Timestamp, WriteMode,
};

/// Earliest and latest accepted timestamps: years 0001 and 9999, as protobuf's Timestamp.
const MIN_SECONDS: i64 = -62_135_596_800;
const MAX_SECONDS: i64 = 253_402_300_799;
const MAX_HALF_LIFE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

pub fn remember(request: pb::RememberRequest, limits: &Limits) -> Result<RememberBatch> {
    let scope = write_scope(request.scope.as_ref())?;
    let count = request.memories.len();
    if count == 0 {
        return Err(Error::invalid(
            "memories",
            "at least one memory is required",
        ));
    }
    if count > limits.max_batch {
        return Err(Error::invalid(
            "memories",
            format!("{count} memories is over the limit of {}", limits.max_batch),
        ));
    }
    let memories = request
        .memories
        .into_iter()
        .enumerate()
        .map(|(i, input)| {
            memory_input(input, limits).map_err(|e| e.in_field(&format!("memories[{i}]")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RememberBatch {
        scope,
        memories,
        mode: write_mode(request.mode)?,
        extract: request.extract,
        privacy: privacy_mode(request.privacy).map_err(|e| e.in_field("privacy"))?,
    })
}

/// A request's privacy mode; `None` means the tenant's.
pub fn privacy_mode(value: i32) -> Result<Option<crate::privacy::PrivacyMode>> {
    use crate::privacy::PrivacyMode;
    match pb::PrivacyMode::try_from(value) {
        Ok(pb::PrivacyMode::Unspecified) => Ok(None),
        Ok(pb::PrivacyMode::Off) => Ok(Some(PrivacyMode::Off)),
        Ok(pb::PrivacyMode::Redact) => Ok(Some(PrivacyMode::Redact)),
        Ok(pb::PrivacyMode::Block) => Ok(Some(PrivacyMode::Block)),
        Err(_) => Err(Error::invalid("", format!("{value} is not a PrivacyMode"))),
    }
}

pub fn memory_input(input: pb::MemoryInput, limits: &Limits) -> Result<NewMemory> {
    Ok(NewMemory {
        text: text(input.text, limits).map_err(|e| e.in_field("text"))?,
        kind: kind(input.kind, true).map_err(|e| e.in_field("kind"))?,
        role: bounded("role", input.role, fixed::MAX_ROLE_BYTES)?,
        metadata: metadata("metadata", input.metadata)?,
        tags: tags("tags", input.tags)?,
        event_time: input
            .event_time
            .map(|t| timestamp(&t).map_err(|e| e.in_field("event_time")))
            .transpose()?,
        importance: importance(input.importance)?,
        idempotency_key: bounded(
            "idempotency_key",
            input.idempotency_key,
            fixed::MAX_ID_BYTES,
        )?,
    })
}

/// Default and largest token budget of a context.
pub const DEFAULT_TOKEN_BUDGET: u32 = 1024;
pub const MAX_TOKEN_BUDGET: u32 = 32_768;
/// Largest answer a Converse may ask the model for. A request naming no limit sends none to
/// the model (its default applies), and the gateway still ends the answer at this many
/// tokens: no caller holds a model stream (and a chat bulkhead slot) for longer.
pub const MAX_ANSWER_TOKENS: u32 = 4096;
/// Default memories and turns of a context; most turns.
pub const DEFAULT_CONTEXT_MEMORIES: u32 = 20;
pub const DEFAULT_CONTEXT_TURNS: u32 = 10;
pub const MAX_CONTEXT_TURNS: u32 = 100;
/// Longest system prompt a Converse may set.
pub const MAX_SYSTEM_PROMPT_BYTES: usize = 16 * 1024;

fn defaulted(field: &str, value: u32, default: u32, max: u32) -> Result<u32> {
    match value {
        0 => Ok(default.min(max)),
        v if v <= max => Ok(v),
        v => Err(Error::invalid(
            field,
            format!("must be at most {max} (0 means {default}), got {v}"),
        )),
    }
}

pub fn build_context(request: pb::BuildContextRequest, limits: &Limits) -> Result<ContextRequest> {
    let scope = read_scope(request.scope.as_ref())?;
    let query = text(request.query, limits).map_err(|e| e.in_field("query"))?;
    if query.len() > limits.max_query_bytes {
        return Err(Error::invalid(
            "query",
            format!(
                "{} bytes is over the limit of {}",
                query.len(),
                limits.max_query_bytes
            ),
        ));
    }
    Ok(ContextRequest {
        scope,
        query,
        token_budget: defaulted(
            "token_budget",
            request.token_budget,
            DEFAULT_TOKEN_BUDGET,
            MAX_TOKEN_BUDGET,
        )?,
        max_memories: defaulted(
            "max_memories",
            request.max_memories,
            DEFAULT_CONTEXT_MEMORIES,
            limits.max_top_k,
        )?,
        max_turns: defaulted(
            "max_turns",
            request.max_turns,
            DEFAULT_CONTEXT_TURNS,
            MAX_CONTEXT_TURNS,
        )?,
        request_time: request
            .request_time
            .map(|t| timestamp(&t).map_err(|e| e.in_field("request_time")))
            .transpose()?,
    })
}

pub fn converse(request: pb::ConverseRequest, limits: &Limits) -> Result<ConverseCommand> {
    let scope = write_scope(request.scope.as_ref())?;
    if scope.session_id.is_empty() {
        return Err(Error::invalid(
            "scope.session_id",
            "is required: the session's history is part of the prompt and the turn is remembered in it",
        ));
    }
    let message = text(request.message, limits).map_err(|e| e.in_field("message"))?;
    let system_prompt = match request.system_prompt {
        p if p.is_empty() => None,
        p if p.len() > MAX_SYSTEM_PROMPT_BYTES => {
            return Err(Error::invalid(
                "system_prompt",
                format!("must be at most {MAX_SYSTEM_PROMPT_BYTES} bytes"),
            ));
        }
        p => Some(p),
    };
    Ok(ConverseCommand {
        context: ContextRequest {
            scope,
            query: message,
            token_budget: defaulted(
                "token_budget",
                request.token_budget,
                DEFAULT_TOKEN_BUDGET,
                MAX_TOKEN_BUDGET,
            )?,
            max_memories: DEFAULT_CONTEXT_MEMORIES.min(limits.max_top_k),
            max_turns: DEFAULT_CONTEXT_TURNS,
            request_time: request
                .request_time
                .map(|t| timestamp(&t).map_err(|e| e.in_field("request_time")))
                .transpose()?,
        },
        system_prompt,
        privacy: privacy_mode(request.privacy).map_err(|e| e.in_field("privacy"))?,
        max_tokens: match request.max_tokens {
            0 => None,
            n if n <= MAX_ANSWER_TOKENS => Some(n),
            n => {
                return Err(Error::invalid(
                    "max_tokens",
                    format!(
                        "must be at most {MAX_ANSWER_TOKENS} (0: the model's default), got {n}"
                    ),
                ));
            }
        },
        extract: request.extract,
        ephemeral: request.ephemeral,
    })
}

pub fn recall(request: pb::RecallRequest, limits: &Limits) -> Result<RecallQuery> {
    let scope = read_scope(request.scope.as_ref())?;
    if request.query.trim().is_empty() {
        return Err(Error::invalid("query", "must not be empty"));
    }
    if request.query.len() > limits.max_query_bytes {
        return Err(Error::invalid(
            "query",
            format!(
                "{} bytes is over the limit of {}",
                request.query.len(),
                limits.max_query_bytes
            ),
        ));
    }
    if request.top_k == 0 || request.top_k > limits.max_top_k {
        return Err(Error::invalid(
            "top_k",
            format!(
                "must be between 1 and {}, got {}",
                limits.max_top_k, request.top_k
            ),
        ));
    }
    if request.min_score.is_some_and(|s| !(0.0..=1.0).contains(&s)) {
        return Err(Error::invalid(
            "min_score",
            "must be a relevance between 0 and 1",
        ));
    }
    let recency_half_life = request
        .recency_half_life
        .map(|d| half_life(&d))
        .transpose()?;
    Ok(RecallQuery {
        scope,
        query: request.query,
        top_k: request.top_k,
        mode: search_mode(request.mode)?,
        filter: filter(request.filter)?,
        min_score: request.min_score,
        recency_half_life,
        explain: request.explain,
        after_write_token: write_token(&request.after_write_token)?,
        bypass_cache: request.bypass_cache,
        request_time: request
            .request_time
            .map(|t| timestamp(&t).map_err(|e| e.in_field("request_time")))
            .transpose()?,
    })
}

pub fn get(request: pb::GetRequest, limits: &Limits) -> Result<GetQuery> {
    Ok(GetQuery {
        ids: ids("ids", &request.ids, limits)?,
        after_write_token: write_token(&request.after_write_token)?,
    })
}

pub fn list(request: pb::ListRequest, limits: &Limits) -> Result<ListQuery> {
    let scope = read_scope(request.scope.as_ref())?;
    let page_size = match request.page_size {
        0 => fixed::DEFAULT_PAGE_SIZE.min(limits.max_page_size),
        n if n > limits.max_page_size => {
            return Err(Error::invalid(
                "page_size",
                format!("must be at most {}, got {n}", limits.max_page_size),
            ));
        }
        n => n,
    };
    let page_token = if request.page_token.is_empty() {
        None
    } else {
        Some(
            request
                .page_token
                .parse::<MemoryId>()
                .map_err(|_| Error::invalid("page_token", "not a page token returned by List"))?,
        )
    };
    Ok(ListQuery {
        scope,
        filter: filter(request.filter)?,
        page_size,
        page_token,
        after_write_token: write_token(&request.after_write_token)?,
    })
}

/// Paths an UpdateRequest's mask may name.
pub const UPDATABLE_FIELDS: &[&str] = &[
    "text",
    "kind",
    "role",
    "metadata",
    "tags",
    "event_time",
    "importance",
];

pub fn update(request: pb::UpdateRequest, limits: &Limits) -> Result<UpdateCommand> {
    let id = memory_id(&request.id).map_err(|e| e.in_field("id"))?;
    let paths = request.update_mask.map(|m| m.paths).unwrap_or_default();
    if paths.is_empty() {
        return Err(Error::invalid(
            "update_mask",
            format!(
                "name at least one field to update, among {}",
                UPDATABLE_FIELDS.join(", ")
            ),
        ));
    }
    // Each field once: a mask repeating a path would re-validate the same text per path.
    if paths.len() > UPDATABLE_FIELDS.len() {
        return Err(Error::invalid(
            "update_mask",
            format!(
                "names {} paths; there are {} updatable fields ({})",
                paths.len(),
                UPDATABLE_FIELDS.len(),
                UPDATABLE_FIELDS.join(", ")
            ),
        ));
    }
    if let Some(i) = (1..paths.len()).find(|&i| paths[..i].contains(&paths[i])) {
        return Err(Error::invalid(
            format!("update_mask.paths[{i}]"),
            format!("{:?} is named twice", paths[i]),
        ));
    }
    let input = request.memory.unwrap_or_default();
    let mut patch = MemoryPatch::default();
    for (i, path) in paths.iter().enumerate() {
        let field = format!("memory.{path}");
        match path.as_str() {
            "text" => {
                patch.text = Some(text(input.text.clone(), limits).map_err(|e| e.in_field(&field))?)
            }
            "kind" => patch.kind = Some(kind(input.kind, true).map_err(|e| e.in_field(&field))?),
            "role" => {
                patch.role = Some(bounded(&field, input.role.clone(), fixed::MAX_ROLE_BYTES)?)
            }
            "metadata" => patch.metadata = Some(metadata(&field, input.metadata.clone())?),
            "tags" => patch.tags = Some(tags(&field, input.tags.clone())?),
            "event_time" => {
                patch.event_time = Some(
                    input
                        .event_time
                        .map(|t| timestamp(&t).map_err(|e| e.in_field(&field)))
                        .transpose()?,
                )
            }
            "importance" => {
                patch.importance =
                    Some(importance(input.importance).map_err(|e| e.in_field("memory"))?)
            }
            other => {
                return Err(Error::invalid(
                    format!("update_mask.paths[{i}]"),
                    format!(
                        "{other:?} is not an updatable field; expected one of {}",
                        UPDATABLE_FIELDS.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(UpdateCommand {
        id,
        patch,
        mode: write_mode(request.mode)?,
    })
}

pub fn forget(request: pb::ForgetRequest, limits: &Limits) -> Result<ForgetTarget> {
    match request.target {
        Some(pb::forget_request::Target::Ids(list)) => {
            Ok(ForgetTarget::Ids(ids("ids.ids", &list.ids, limits)?))
        }
        Some(pb::forget_request::Target::Scope(scope)) => Ok(ForgetTarget::Scope(
            scope_fields(&scope).map_err(|e| e.in_field("scope"))?,
        )),
        None => Err(Error::invalid(
            "target",
            "set either ids or scope to say what to forget",
        )),
    }
}

pub fn filter(filter: Option<pb::Filter>) -> Result<Filter> {
    let Some(f) = filter else {
        return Ok(Filter::default());
    };
    let kinds = bounded_list("filter.kinds", &f.kinds)?
        .iter()
        .enumerate()
        .map(|(i, k)| kind(*k, false).map_err(|e| e.in_field(&format!("filter.kinds[{i}]"))))
        .collect::<Result<Vec<_>>>()?;
    let event_after = f
        .event_after
        .map(|t| timestamp(&t).map_err(|e| e.in_field("filter.event_after")))
        .transpose()?;
    let event_before = f
        .event_before
        .map(|t| timestamp(&t).map_err(|e| e.in_field("filter.event_before")))
        .transpose()?;
    if let (Some(after), Some(before)) = (event_after, event_before)
        && after >= before
    {
        return Err(Error::invalid(
            "filter.event_before",
            "must be later than filter.event_after",
        ));
    }
    Ok(Filter {
        kinds,
        tags_any: tags("filter.tags_any", f.tags_any)?,
        tags_all: tags("filter.tags_all", f.tags_all)?,
        entities_any: tags("filter.entities_any", f.entities_any)?,
        event_after,
        event_before,
        metadata_equals: metadata("filter.metadata_equals", f.metadata_equals)?,
    })
}

/// A scope on a write: the exact scope the memories are stored under.
pub fn write_scope(scope: Option<&pb::Scope>) -> Result<Scope> {
    let scope = scope.ok_or_else(|| Error::invalid("scope.user_id", "is required"))?;
    scope_fields(scope).map_err(|e| e.in_field("scope"))
}

/// A scope on a read: empty agent and session match any.
pub fn read_scope(scope: Option<&pb::Scope>) -> Result<Scope> {
    write_scope(scope)
}

fn scope_fields(scope: &pb::Scope) -> Result<Scope> {
    if scope.user_id.is_empty() {
        return Err(Error::invalid("user_id", "is required"));
    }
    Ok(Scope {
        user_id: identifier("user_id", &scope.user_id)?,
        agent_id: identifier("agent_id", &scope.agent_id)?,
        session_id: identifier("session_id", &scope.session_id)?,
    })
}

fn identifier(field: &str, value: &str) -> Result<String> {
    if value.len() > fixed::MAX_ID_BYTES {
        return Err(Error::invalid(
            field,
            format!("must be at most {} bytes", fixed::MAX_ID_BYTES),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(value.to_string())
}

fn text(text: String, limits: &Limits) -> Result<String> {
    if text.trim().is_empty() {
        return Err(Error::invalid("", "must not be empty"));
    }
    if text.len() > limits.max_text_bytes {
        return Err(Error::invalid(
            "",
            format!(
                "{} bytes is over the limit of {}",
                text.len(),
                limits.max_text_bytes
            ),
        ));
    }
    if text.contains('\0') {
        return Err(Error::invalid("", "must not contain NUL characters"));
    }
    Ok(text)
}

fn bounded(field: &str, value: String, max: usize) -> Result<String> {
    if value.len() > max {
        return Err(Error::invalid(
            field,
            format!("must be at most {max} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(value)
}

fn bounded_list<'a, T>(field: &str, values: &'a [T]) -> Result<&'a [T]> {
    if values.len() > fixed::MAX_FILTER_VALUES {
        return Err(Error::invalid(
            field,
            format!("at most {} values", fixed::MAX_FILTER_VALUES),
        ));
    }
    Ok(values)
}

fn metadata(field: &str, map: BTreeMap<String, String>) -> Result<BTreeMap<String, String>> {
    if map.len() > fixed::MAX_METADATA_ENTRIES {
        return Err(Error::invalid(
            field,
            format!("at most {} entries", fixed::MAX_METADATA_ENTRIES),
        ));
    }
    let total: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > fixed::MAX_METADATA_BYTES {
        return Err(Error::invalid(
            field,
            format!(
                "at most {} bytes of keys and values in all",
                fixed::MAX_METADATA_BYTES
            ),
        ));
    }
    for (key, value) in &map {
        if key.is_empty() || key.len() > fixed::MAX_METADATA_KEY_BYTES {
            return Err(Error::invalid(
                format!("{field}[{key:?}]"),
                format!("keys must be 1..={} bytes", fixed::MAX_METADATA_KEY_BYTES),
            ));
        }
        if key.chars().any(char::is_control) {
            return Err(Error::invalid(
                format!("{field}[{key:?}]"),
                "keys must not contain control characters",
            ));
        }
        if value.len() > fixed::MAX_METADATA_VALUE_BYTES {
            return Err(Error::invalid(
                format!("{field}[{key:?}]"),
                format!(
                    "values must be at most {} bytes",
                    fixed::MAX_METADATA_VALUE_BYTES
                ),
            ));
        }
    }
    Ok(map)
}

fn tags(field: &str, tags: Vec<String>) -> Result<Vec<String>> {
    if tags.len() > fixed::MAX_TAGS {
        return Err(Error::invalid(
            field,
            format!("at most {} values", fixed::MAX_TAGS),
        ));
    }
    for (i, tag) in tags.iter().enumerate() {
        if tag.is_empty() || tag.len() > fixed::MAX_TAG_BYTES {
            return Err(Error::invalid(
                format!("{field}[{i}]"),
                format!("must be 1..={} bytes", fixed::MAX_TAG_BYTES),
            ));
        }
        if tag.chars().any(char::is_control) {
            return Err(Error::invalid(
                format!("{field}[{i}]"),
                "must not contain control characters",
            ));
        }
    }
    Ok(tags)
}

fn importance(value: f32) -> Result<Option<f32>> {
    if !value.is_finite() || !(0.0..=1.0).contains(&value) {
        return Err(Error::invalid("importance", "must be between 0 and 1"));
    }
    Ok((value > 0.0).then_some(value))
}

pub fn timestamp(t: &engram_proto::prost_types::Timestamp) -> Result<Timestamp> {
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&t.seconds) {
        return Err(Error::invalid("", "must be between years 0001 and 9999"));
    }
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(Error::invalid("nanos", "must be in 0..1e9"));
    }
    Ok(Timestamp::from_micros(
        t.seconds * 1_000_000 + i64::from(t.nanos / 1000),
    ))
}

fn half_life(d: &engram_proto::prost_types::Duration) -> Result<Duration> {
    let field = "recency_half_life";
    if d.seconds < 0 || d.nanos < 0 || (d.seconds == 0 && d.nanos == 0) {
        return Err(Error::invalid(field, "must be positive"));
    }
    let duration = Duration::new(d.seconds.unsigned_abs(), d.nanos.unsigned_abs());
    if duration > MAX_HALF_LIFE {
        return Err(Error::invalid(field, "must be at most 100 years"));
    }
    Ok(duration)
}

fn kind(value: i32, unspecified_ok: bool) -> Result<Kind> {
    match pb::Kind::try_from(value) {
        Ok(pb::Kind::Unspecified) if unspecified_ok => Ok(Kind::Fact),
        Ok(pb::Kind::Unspecified) => Err(Error::invalid("", "must not be KIND_UNSPECIFIED")),
        Ok(pb::Kind::Fact) => Ok(Kind::Fact),
        Ok(pb::Kind::Message) => Ok(Kind::Message),
        Ok(pb::Kind::Document) => Ok(Kind::Document),
        Err(_) => Err(Error::invalid("", format!("unknown kind {value}"))),
    }
}

fn write_mode(value: i32) -> Result<WriteMode> {
    match pb::WriteMode::try_from(value) {
        // Until the durable write log exists, every write is indexed before it is acknowledged.
        Ok(pb::WriteMode::Unspecified | pb::WriteMode::Async) => Ok(WriteMode::Async),
        Ok(pb::WriteMode::Sync) => Ok(WriteMode::Sync),
        Err(_) => Err(Error::invalid(
            "mode",
            format!("unknown write mode {value}"),
        )),
    }
}

fn search_mode(value: i32) -> Result<SearchMode> {
    match pb::SearchMode::try_from(value) {
        Ok(pb::SearchMode::Unspecified | pb::SearchMode::Hybrid) => Ok(SearchMode::Hybrid),
        Ok(pb::SearchMode::Semantic) => Ok(SearchMode::Semantic),
        Ok(pb::SearchMode::Keyword) => Ok(SearchMode::Keyword),
        Err(_) => Err(Error::invalid(
            "mode",
            format!("unknown search mode {value}"),
        )),
    }
}

fn write_token(token: &str) -> Result<Option<WriteToken>> {
    if token.is_empty() {
        return Ok(None);
    }
    WriteToken::decode(token)
        .map(Some)
        .map_err(|e| e.in_field("after_write_token"))
}

pub fn memory_id(id: &str) -> Result<MemoryId> {
    if id.is_empty() {
        return Err(Error::invalid("", "is required"));
    }
    id.parse()
}

fn ids(field: &str, ids: &[String], limits: &Limits) -> Result<Vec<MemoryId>> {
    if ids.is_empty() {
        return Err(Error::invalid(field, "at least one id is required"));
    }
    if ids.len() > limits.max_batch {
        return Err(Error::invalid(
            field,
            format!(
                "{} ids is over the limit of {}",
                ids.len(),
                limits.max_batch
            ),
        ));
    }
    ids.iter()
        .enumerate()
        .map(|(i, id)| memory_id(id).map_err(|e| e.in_field(&format!("{field}[{i}]"))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(text: &str) -> pb::MemoryInput {
        pb::MemoryInput {
            text: text.to_string(),
            ..Default::default()
        }
    }

    fn remember_request(memories: Vec<pb::MemoryInput>) -> pb::RememberRequest {
        pb::RememberRequest {
            scope: Some(pb::Scope {
                user_id: "alice".into(),
                ..Default::default()
            }),
            memories,
            ..Default::default()
        }
    }

    fn field_of(err: Error) -> String {
        match err {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn remember_names_the_bad_field() {
        let limits = Limits::default();
        let cases: Vec<(pb::RememberRequest, &str)> = vec![
            (
                remember_request(vec![input("ok"), input("  ")]),
                "memories[1].text",
            ),
            (
                remember_request(vec![input(&"x".repeat(limits.max_text_bytes + 1))]),
                "memories[0].text",
            ),
            (remember_request(vec![]), "memories"),
            (
                remember_request(vec![input("a"); limits.max_batch + 1]),
                "memories",
            ),
            (
                pb::RememberRequest {
                    scope: None,
                    ..remember_request(vec![input("a")])
                },
                "scope.user_id",
            ),
            (
                remember_request(vec![pb::MemoryInput {
                    kind: 42,
                    ..input("a")
                }]),
                "memories[0].kind",
            ),
            (
                remember_request(vec![pb::MemoryInput {
                    importance: 1.5,
                    ..input("a")
                }]),
                "memories[0].importance",
            ),
            (
                pb::RememberRequest {
                    mode: 9,
                    ..remember_request(vec![input("a")])
                },
                "mode",
            ),
            (
                // Each entry within its bounds, too many bytes together.
                remember_request(vec![pb::MemoryInput {
                    metadata: (0..fixed::MAX_METADATA_ENTRIES)
                        .map(|i| (format!("k{i}"), "v".repeat(fixed::MAX_METADATA_VALUE_BYTES)))
                        .collect(),
                    ..input("a")
                }]),
                "memories[0].metadata",
            ),
        ];
        for (request, field) in cases {
            assert_eq!(field_of(remember(request, &limits).unwrap_err()), field);
        }
    }

    #[test]
    fn remember_accepts_the_limits_exactly() {
        let limits = Limits::default();
        let batch = remember(
            remember_request(vec![
                input(&"x".repeat(limits.max_text_bytes));
                limits.max_batch
            ]),
            &limits,
        )
        .unwrap();
        assert_eq!(batch.memories.len(), limits.max_batch);
    }

    #[test]
    fn recall_bounds_top_k() {
        let limits = Limits::default();
        let request = |top_k| pb::RecallRequest {
            scope: Some(pb::Scope {
                user_id: "u".into(),
                ..Default::default()
            }),
            query: "q".into(),
            top_k,
            ..Default::default()
        };
        assert_eq!(field_of(recall(request(0), &limits).unwrap_err()), "top_k");
        assert_eq!(
            field_of(recall(request(101), &limits).unwrap_err()),
            "top_k"
        );
        assert_eq!(recall(request(100), &limits).unwrap().top_k, 100);
    }

    #[test]
    fn recall_min_score_is_a_relevance() {
        let limits = Limits::default();
        let request = |min_score| pb::RecallRequest {
            scope: Some(pb::Scope {
                user_id: "u".into(),
                ..Default::default()
            }),
            query: "q".into(),
            top_k: 10,
            min_score: Some(min_score),
            ..Default::default()
        };
        for bad in [-0.1, 1.5, f32::NAN, f32::INFINITY] {
            let refused = recall(request(bad), &limits).unwrap_err();
            assert_eq!(field_of(refused), "min_score", "{bad}");
        }
        for good in [0.0, 0.3, 1.0] {
            assert_eq!(
                recall(request(good), &limits).unwrap().min_score,
                Some(good)
            );
        }
    }

    #[test]
    fn a_converse_answer_is_bounded() {
        let limits = Limits::default();
        let ask = |max_tokens: u32| {
            converse(
                pb::ConverseRequest {
                    scope: Some(pb::Scope {
                        user_id: "u".into(),
                        session_id: "s".into(),
                        ..Default::default()
                    }),
                    message: "hello".into(),
                    max_tokens,
                    ..Default::default()
                },
                &limits,
            )
        };
        assert_eq!(ask(0).unwrap().max_tokens, None);
        assert_eq!(ask(200).unwrap().max_tokens, Some(200));
        assert_eq!(
            field_of(ask(MAX_ANSWER_TOKENS + 1).unwrap_err()),
            "max_tokens"
        );
    }

    #[test]
    fn contexts_are_bounded_and_converse_needs_a_session() {
        let limits = Limits::default();
        let scope = |session: &str| {
            Some(pb::Scope {
                user_id: "u".into(),
                session_id: session.into(),
                ..Default::default()
            })
        };
        let converse_with = |session: &str, budget: u32, message: &str| {
            converse(
                pb::ConverseRequest {
                    scope: scope(session),
                    message: message.into(),
                    token_budget: budget,
                    ..Default::default()
                },
                &limits,
            )
        };
        let ok = converse_with("s", 0, "hello").unwrap();
        assert_eq!(ok.context.token_budget, DEFAULT_TOKEN_BUDGET);
        assert_eq!(ok.privacy, None);
        for (result, field) in [
            (converse_with("", 0, "hello"), "scope.session_id"),
            (
                converse_with("s", MAX_TOKEN_BUDGET + 1, "hello"),
                "token_budget",
            ),
            (converse_with("s", 0, " "), "message"),
        ] {
            let message = result.unwrap_err().to_string();
            assert!(message.starts_with(field), "{message}");
        }
        let built = build_context(
            pb::BuildContextRequest {
                scope: scope(""),
                query: "trips".into(),
                ..Default::default()
            },
            &limits,
        )
        .unwrap();
        assert_eq!(
            (built.token_budget, built.max_memories, built.max_turns),
            (
                DEFAULT_TOKEN_BUDGET,
                DEFAULT_CONTEXT_MEMORIES,
                DEFAULT_CONTEXT_TURNS
            )
        );
        let too_many = build_context(
            pb::BuildContextRequest {
                scope: scope(""),
                query: "trips".into(),
                max_turns: MAX_CONTEXT_TURNS + 1,
                ..Default::default()
            },
            &limits,
        );
        assert!(too_many.unwrap_err().to_string().starts_with("max_turns"));
    }

    #[test]
    fn ids_must_be_uuids() {
        let limits = Limits::default();
        let err = get(
            pb::GetRequest {
                ids: vec![uuid::Uuid::now_v7().to_string(), "nope".into()],
                ..Default::default()
            },
            &limits,
        )
        .unwrap_err();
        assert_eq!(field_of(err), "ids[1]");
    }

    #[test]
    fn update_mask_is_required_and_checked() {
        let limits = Limits::default();
        let id = uuid::Uuid::now_v7().to_string();
        let request = |paths: &[&str]| pb::UpdateRequest {
            id: id.clone(),
            memory: Some(input("new text")),
            update_mask: Some(engram_proto::prost_types::FieldMask {
                paths: paths.iter().map(|p| p.to_string()).collect(),
            }),
            ..Default::default()
        };
        assert_eq!(
            field_of(update(request(&[]), &limits).unwrap_err()),
            "update_mask"
        );
        assert_eq!(
            field_of(update(request(&["text", "colour"]), &limits).unwrap_err()),
            "update_mask.paths[1]"
        );
        assert_eq!(
            field_of(update(request(&["tags", "text", "text"]), &limits).unwrap_err()),
            "update_mask.paths[2]"
        );
        let many = vec!["text"; 1_000_000];
        assert_eq!(
            field_of(update(request(&many), &limits).unwrap_err()),
            "update_mask"
        );
        let command = update(request(&["text"]), &limits).unwrap();
        assert_eq!(command.patch.text.as_deref(), Some("new text"));
        assert_eq!(command.patch.tags, None);
    }

    #[test]
    fn filter_time_range_must_be_ordered() {
        let t = |seconds| engram_proto::prost_types::Timestamp { seconds, nanos: 0 };
        let err = filter(Some(pb::Filter {
            event_after: Some(t(20)),
            event_before: Some(t(10)),
            ..Default::default()
        }))
        .unwrap_err();
        assert_eq!(field_of(err), "filter.event_before");
    }
}
