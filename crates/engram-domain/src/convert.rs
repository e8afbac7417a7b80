//! Domain values to wire messages, and the trusted direction back for internal responses.
//!
//! Requests coming in from a client go through [`crate::validate`]; this module converts what
//! engram itself produced (responses, and requests a client adapter sends to a peer).

use std::time::Duration;

use engram_proto::prost_types;
use engram_proto::v1 as pb;

use crate::api::{
    Erasure, Explanation, ForgetOutcome, ForgetTarget, GetQuery, GetResult, Hit, ListPage,
    ListQuery, RecallQuery, RecallResult, RememberBatch, RememberOutcome, Timings, UpdateCommand,
    UpdateOutcome, WriteResult, WriteStatus, WriteToken,
};
use crate::error::{Error, Result};
use crate::model::{
    Filter, Kind, Memory, MemoryId, MemoryPatch, MemoryState, NewMemory, Scope, SearchMode,
    TenantId, Timestamp, WriteMode,
};
use crate::validate;

pub fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    let micros = t.as_micros();
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

pub fn scope(s: &Scope) -> pb::Scope {
    pb::Scope {
        user_id: s.user_id.clone(),
        agent_id: s.agent_id.clone(),
        session_id: s.session_id.clone(),
    }
}

pub fn kind(k: Kind) -> pb::Kind {
    match k {
        Kind::Fact => pb::Kind::Fact,
        Kind::Message => pb::Kind::Message,
        Kind::Document => pb::Kind::Document,
    }
}

fn state(s: MemoryState) -> pb::MemoryState {
    match s {
        MemoryState::Pending => pb::MemoryState::Pending,
        MemoryState::Indexed => pb::MemoryState::Indexed,
    }
}

fn write_mode(m: WriteMode) -> pb::WriteMode {
    match m {
        WriteMode::Async => pb::WriteMode::Async,
        WriteMode::Sync => pb::WriteMode::Sync,
    }
}

fn search_mode(m: SearchMode) -> pb::SearchMode {
    match m {
        SearchMode::Hybrid => pb::SearchMode::Hybrid,
        SearchMode::Semantic => pb::SearchMode::Semantic,
        SearchMode::Keyword => pb::SearchMode::Keyword,
    }
}

pub fn memory(m: &Memory) -> pb::Memory {
    pb::Memory {
        id: m.id.to_string(),
        scope: Some(scope(&m.scope)),
        kind: kind(m.kind).into(),
        role: m.role.clone(),
        text: m.text.clone(),
        metadata: m.metadata.clone(),
        tags: m.tags.clone(),
        entities: m.entities.clone(),
        created_at: Some(timestamp(m.created_at)),
        event_time: Some(timestamp(m.event_time)),
        importance: m.importance,
        content_hash: m.content_hash.clone(),
        state: state(m.state).into(),
        updated_at: Some(timestamp(m.updated_at)),
        idempotency_key: m.idempotency_key.clone(),
    }
}

/// A memory produced by another engram service (for example in an Apply request). The tenant
/// is not on the wire message; the caller supplies the one the request was made for.
pub fn memory_from_pb(m: pb::Memory, tenant: &TenantId) -> Result<Memory> {
    let ts = |t: Option<prost_types::Timestamp>, field: &str| -> Result<Timestamp> {
        let t = t.ok_or_else(|| Error::invalid(field, "is required"))?;
        validate::timestamp(&t).map_err(|e| e.in_field(field))
    };
    let kind = match pb::Kind::try_from(m.kind) {
        Ok(pb::Kind::Fact | pb::Kind::Unspecified) => Kind::Fact,
        Ok(pb::Kind::Message) => Kind::Message,
        Ok(pb::Kind::Document) => Kind::Document,
        Err(_) => {
            return Err(Error::invalid(
                "memory.kind",
                format!("unknown kind {}", m.kind),
            ));
        }
    };
    let state = match pb::MemoryState::try_from(m.state) {
        Ok(pb::MemoryState::Indexed) => MemoryState::Indexed,
        Ok(pb::MemoryState::Pending | pb::MemoryState::Unspecified) => MemoryState::Pending,
        Err(_) => {
            return Err(Error::invalid(
                "memory.state",
                format!("unknown state {}", m.state),
            ));
        }
    };
    let scope = m.scope.unwrap_or_default();
    Ok(Memory {
        id: validate::memory_id(&m.id).map_err(|e| e.in_field("memory.id"))?,
        tenant: tenant.clone(),
        scope: Scope {
            user_id: scope.user_id,
            agent_id: scope.agent_id,
            session_id: scope.session_id,
        },
        kind,
        role: m.role,
        text: m.text,
        metadata: m.metadata,
        tags: m.tags,
        entities: m.entities,
        created_at: ts(m.created_at, "memory.created_at")?,
        updated_at: ts(m.updated_at, "memory.updated_at")?,
        event_time: ts(m.event_time, "memory.event_time")?,
        importance: m.importance,
        content_hash: m.content_hash,
        idempotency_key: m.idempotency_key,
        state,
    })
}

pub fn filter(f: &Filter) -> pb::Filter {
    pb::Filter {
        kinds: f.kinds.iter().map(|k| kind(*k).into()).collect(),
        tags_any: f.tags_any.clone(),
        tags_all: f.tags_all.clone(),
        entities_any: f.entities_any.clone(),
        event_after: f.event_after.map(timestamp),
        event_before: f.event_before.map(timestamp),
        metadata_equals: f.metadata_equals.clone(),
    }
}

fn token_string(token: &Option<WriteToken>) -> String {
    token.as_ref().map(WriteToken::encode).unwrap_or_default()
}

pub fn recall_request(q: &RecallQuery) -> pb::RecallRequest {
    pb::RecallRequest {
        scope: Some(scope(&q.scope)),
        query: q.query.clone(),
        top_k: q.top_k,
        mode: search_mode(q.mode).into(),
        filter: Some(filter(&q.filter)),
        min_score: q.min_score,
        recency_half_life: q.recency_half_life.map(duration),
        explain: q.explain,
        after_write_token: token_string(&q.after_write_token),
        bypass_cache: q.bypass_cache,
        request_time: q.request_time.map(timestamp),
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

pub fn hit(h: &crate::api::Hit) -> pb::Hit {
    pb::Hit {
        memory: Some(memory(&h.memory)),
        score: h.score,
        relevance: h.relevance,
        explanation: h.explanation.map(|e| pb::Explanation {
            dense_rank: e.dense_rank,
            dense_score: e.dense_score,
            keyword_rank: e.keyword_rank,
            keyword_score: e.keyword_score,
            temporal_rank: e.temporal_rank,
            temporal_score: e.temporal_score,
            entity_rank: e.entity_rank,
            entity_score: e.entity_score,
            fused_score: e.fused_score,
            recency_factor: e.recency_factor,
            importance_factor: e.importance_factor,
        }),
    }
}

pub fn recall_response(r: &RecallResult) -> pb::RecallResponse {
    pb::RecallResponse {
        hits: r.hits.iter().map(hit).collect(),
        cache_hit: r.cache_hit,
        timings: Some(pb::Timings {
            cache_us: micros(r.timings.cache),
            embed_us: micros(r.timings.embed),
            dense_us: micros(r.timings.dense),
            keyword_us: micros(r.timings.keyword),
            fusion_us: micros(r.timings.fusion),
            total_us: micros(r.timings.total),
        }),
    }
}

pub fn recall_result_from_pb(r: pb::RecallResponse, tenant: &TenantId) -> Result<RecallResult> {
    let timings = r.timings.unwrap_or_default();
    Ok(RecallResult {
        hits: r
            .hits
            .into_iter()
            .map(|h| {
                Ok(Hit {
                    memory: memory_from_pb(h.memory.unwrap_or_default(), tenant)?,
                    score: h.score,
                    relevance: h.relevance,
                    explanation: h.explanation.map(|e| Explanation {
                        dense_rank: e.dense_rank,
                        dense_score: e.dense_score,
                        keyword_rank: e.keyword_rank,
                        keyword_score: e.keyword_score,
                        temporal_rank: e.temporal_rank,
                        temporal_score: e.temporal_score,
                        entity_rank: e.entity_rank,
                        entity_score: e.entity_score,
                        fused_score: e.fused_score,
                        recency_factor: e.recency_factor,
                        importance_factor: e.importance_factor,
                    }),
                })
            })
            .collect::<Result<_>>()?,
        cache_hit: r.cache_hit,
        timings: Timings {
            cache: Duration::from_micros(timings.cache_us),
            embed: Duration::from_micros(timings.embed_us),
            dense: Duration::from_micros(timings.dense_us),
            keyword: Duration::from_micros(timings.keyword_us),
            fusion: Duration::from_micros(timings.fusion_us),
            total: Duration::from_micros(timings.total_us),
        },
    })
}

pub fn get_request(q: &GetQuery) -> pb::GetRequest {
    pb::GetRequest {
        ids: q.ids.iter().map(MemoryId::to_string).collect(),
        after_write_token: token_string(&q.after_write_token),
    }
}

pub fn get_response(r: &GetResult) -> pb::GetResponse {
    pb::GetResponse {
        memories: r.memories.iter().map(memory).collect(),
        missing_ids: r.missing_ids.iter().map(MemoryId::to_string).collect(),
    }
}

pub fn get_result_from_pb(r: pb::GetResponse, tenant: &TenantId) -> Result<GetResult> {
    Ok(GetResult {
        memories: r
            .memories
            .into_iter()
            .map(|m| memory_from_pb(m, tenant))
            .collect::<Result<_>>()?,
        missing_ids: r
            .missing_ids
            .iter()
            .map(|id| validate::memory_id(id))
            .collect::<Result<_>>()?,
    })
}

pub fn list_request(q: &ListQuery) -> pb::ListRequest {
    pb::ListRequest {
        scope: Some(scope(&q.scope)),
        filter: Some(filter(&q.filter)),
        page_size: q.page_size,
        page_token: q.page_token.map(|id| id.to_string()).unwrap_or_default(),
        after_write_token: token_string(&q.after_write_token),
    }
}

pub fn list_response(p: &ListPage) -> pb::ListResponse {
    pb::ListResponse {
        memories: p.memories.iter().map(memory).collect(),
        next_page_token: p
            .next_page_token
            .map(|id| id.to_string())
            .unwrap_or_default(),
    }
}

pub fn list_page_from_pb(r: pb::ListResponse, tenant: &TenantId) -> Result<ListPage> {
    Ok(ListPage {
        memories: r
            .memories
            .into_iter()
            .map(|m| memory_from_pb(m, tenant))
            .collect::<Result<_>>()?,
        next_page_token: if r.next_page_token.is_empty() {
            None
        } else {
            Some(validate::memory_id(&r.next_page_token)?)
        },
    })
}

pub fn memory_input(m: &NewMemory) -> pb::MemoryInput {
    pb::MemoryInput {
        text: m.text.clone(),
        kind: kind(m.kind).into(),
        role: m.role.clone(),
        metadata: m.metadata.clone(),
        tags: m.tags.clone(),
        event_time: m.event_time.map(timestamp),
        importance: m.importance.unwrap_or(0.0),
        idempotency_key: m.idempotency_key.clone(),
    }
}

pub fn remember_request(b: &RememberBatch) -> pb::RememberRequest {
    pb::RememberRequest {
        scope: Some(scope(&b.scope)),
        memories: b.memories.iter().map(memory_input).collect(),
        mode: write_mode(b.mode).into(),
        extract: b.extract,
        privacy: privacy_mode(b.privacy).into(),
    }
}

pub fn privacy_mode(mode: Option<crate::privacy::PrivacyMode>) -> pb::PrivacyMode {
    use crate::privacy::PrivacyMode;
    match mode {
        None => pb::PrivacyMode::Unspecified,
        Some(PrivacyMode::Off) => pb::PrivacyMode::Off,
        Some(PrivacyMode::Redact) => pb::PrivacyMode::Redact,
        Some(PrivacyMode::Block) => pb::PrivacyMode::Block,
    }
}

fn write_status(s: WriteStatus) -> pb::WriteStatus {
    match s {
        WriteStatus::Created => pb::WriteStatus::Created,
        WriteStatus::Duplicate => pb::WriteStatus::Duplicate,
        WriteStatus::Rejected => pb::WriteStatus::Rejected,
    }
}

pub fn remember_response(o: &RememberOutcome) -> pb::RememberResponse {
    pb::RememberResponse {
        results: o
            .results
            .iter()
            .map(|r| pb::WriteResult {
                id: r.id.to_string(),
                status: write_status(r.status).into(),
                reason: r.reason.clone(),
            })
            .collect(),
        write_token: o.write_token.encode(),
    }
}

pub fn remember_outcome_from_pb(r: pb::RememberResponse) -> Result<RememberOutcome> {
    Ok(RememberOutcome {
        results: r
            .results
            .into_iter()
            .map(|r| {
                let status = match pb::WriteStatus::try_from(r.status) {
                    Ok(pb::WriteStatus::Created) => WriteStatus::Created,
                    Ok(pb::WriteStatus::Duplicate) => WriteStatus::Duplicate,
                    Ok(pb::WriteStatus::Rejected) => WriteStatus::Rejected,
                    Ok(pb::WriteStatus::Unspecified) | Err(_) => {
                        return Err(Error::internal(format!(
                            "peer sent write status {}",
                            r.status
                        )));
                    }
                };
                Ok(WriteResult {
                    id: validate::memory_id(&r.id)?,
                    status,
                    reason: r.reason,
                })
            })
            .collect::<Result<_>>()?,
        write_token: WriteToken::decode(&r.write_token)?,
    })
}

pub fn update_request(c: &UpdateCommand) -> pb::UpdateRequest {
    let MemoryPatch {
        text,
        kind: patch_kind,
        role,
        metadata,
        tags,
        event_time,
        importance,
    } = &c.patch;
    let mut paths = Vec::new();
    let mut input = pb::MemoryInput::default();
    if let Some(text) = text {
        paths.push("text");
        input.text = text.clone();
    }
    if let Some(k) = patch_kind {
        paths.push("kind");
        input.kind = kind(*k).into();
    }
    if let Some(role) = role {
        paths.push("role");
        input.role = role.clone();
    }
    if let Some(metadata) = metadata {
        paths.push("metadata");
        input.metadata = metadata.clone();
    }
    if let Some(tags) = tags {
        paths.push("tags");
        input.tags = tags.clone();
    }
    if let Some(event_time) = event_time {
        paths.push("event_time");
        input.event_time = event_time.map(timestamp);
    }
    if let Some(importance) = importance {
        paths.push("importance");
        input.importance = importance.unwrap_or(0.0);
    }
    pb::UpdateRequest {
        id: c.id.to_string(),
        memory: Some(input),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.into_iter().map(str::to_string).collect(),
        }),
        mode: write_mode(c.mode).into(),
    }
}

pub fn update_response(o: &UpdateOutcome) -> pb::UpdateResponse {
    pb::UpdateResponse {
        memory: Some(memory(&o.memory)),
        write_token: o.write_token.encode(),
    }
}

pub fn update_outcome_from_pb(r: pb::UpdateResponse, tenant: &TenantId) -> Result<UpdateOutcome> {
    Ok(UpdateOutcome {
        memory: memory_from_pb(r.memory.unwrap_or_default(), tenant)?,
        write_token: WriteToken::decode(&r.write_token)?,
    })
}

pub fn forget_request(t: &ForgetTarget) -> pb::ForgetRequest {
    pb::ForgetRequest {
        target: Some(match t {
            ForgetTarget::Ids(ids) => pb::forget_request::Target::Ids(pb::MemoryIds {
                ids: ids.iter().map(MemoryId::to_string).collect(),
            }),
            ForgetTarget::Scope(s) => pb::forget_request::Target::Scope(scope(s)),
        }),
    }
}

pub fn forget_response(o: &ForgetOutcome) -> pb::ForgetResponse {
    pb::ForgetResponse {
        forgotten: o.forgotten,
        write_token: o.write_token.encode(),
        receipt: Some(receipt(&o.receipt)),
    }
}

pub fn forget_outcome_from_pb(r: pb::ForgetResponse) -> Result<ForgetOutcome> {
    Ok(ForgetOutcome {
        forgotten: r.forgotten,
        write_token: WriteToken::decode(&r.write_token)?,
        receipt: r.receipt.map(erasure).unwrap_or_default(),
    })
}

pub fn receipt(e: &Erasure) -> pb::ErasureReceipt {
    pb::ErasureReceipt {
        memories: e.memories,
        facts: e.facts,
        cached_embeddings: e.cached_embeddings,
        history_lists: e.history_lists,
        log_keys: e.log_keys,
        cached_results: e.cached_results,
    }
}

pub fn erasure(r: pb::ErasureReceipt) -> Erasure {
    Erasure {
        memories: r.memories,
        facts: r.facts,
        cached_embeddings: r.cached_embeddings,
        history_lists: r.history_lists,
        log_keys: r.log_keys,
        cached_results: r.cached_results,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_including_before_the_epoch() {
        for micros in [0, 1, -1, 1_700_000_000_123_456, -62_135_596_800_000_000] {
            let t = Timestamp::from_micros(micros);
            assert_eq!(validate::timestamp(&timestamp(t)).unwrap(), t);
        }
    }

    #[test]
    fn update_requests_round_trip_through_validation() {
        let command = UpdateCommand {
            id: MemoryId::new_time_ordered(),
            patch: MemoryPatch {
                text: Some("new".into()),
                tags: Some(vec!["a".into()]),
                importance: Some(None),
                ..Default::default()
            },
            mode: WriteMode::Sync,
        };
        let back = validate::update(update_request(&command), &Default::default()).unwrap();
        assert_eq!(back, command);
    }
}
