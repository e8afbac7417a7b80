//! Domain selections as engine filters. The tenant condition is always the first one.

use engram_core::model::{MemoryId, Scope, TenantId};
use qdrant_edge::external::ordered_float::OrderedFloat;
use qdrant_edge::{
    Condition, FieldCondition, Filter, HasIdCondition, JsonPath, Match, PointId, Range,
    ValueVariants,
};

use crate::Selection;
use crate::payload;

fn path(field: &'static str) -> JsonPath {
    field
        .parse()
        .unwrap_or_else(|_| unreachable!("payload field {field:?} is a constant, valid JSON path"))
}

fn equals(field: &'static str, value: &str) -> Condition {
    Condition::Field(FieldCondition::new_match(
        path(field),
        Match::new_value(ValueVariants::String(value.to_string())),
    ))
}

fn any_of(field: &'static str, values: &[String]) -> Condition {
    Condition::Field(FieldCondition::new_match(
        path(field),
        Match::from(values.to_vec()),
    ))
}

fn tenant(tenant: &TenantId) -> Condition {
    equals(payload::TENANT, tenant.as_str())
}

pub fn point_id(id: MemoryId) -> PointId {
    PointId::Uuid(id.as_uuid())
}

/// The tenant and a read scope: empty agent or session match any.
fn scope_conditions(tenant_id: &TenantId, scope: &Scope) -> Vec<Condition> {
    let mut must = vec![tenant(tenant_id), equals(payload::USER_ID, &scope.user_id)];
    if !scope.agent_id.is_empty() {
        must.push(equals(payload::AGENT_ID, &scope.agent_id));
    }
    if !scope.session_id.is_empty() {
        must.push(equals(payload::SESSION_ID, &scope.session_id));
    }
    must
}

pub fn selection(selection: &Selection) -> Filter {
    let Selection {
        tenant,
        scope,
        filter,
    } = selection;
    let mut must = scope_conditions(tenant, scope);
    if !filter.kinds.is_empty() {
        let kinds: Vec<String> = filter
            .kinds
            .iter()
            .map(|k| k.as_str().to_string())
            .collect();
        must.push(any_of(payload::KIND, &kinds));
    }
    if !filter.tags_any.is_empty() {
        must.push(any_of(payload::TAGS, &filter.tags_any));
    }
    for tag in &filter.tags_all {
        must.push(equals(payload::TAGS, tag));
    }
    if !filter.entities_any.is_empty() {
        must.push(any_of(payload::ENTITIES, &filter.entities_any));
    }
    if filter.event_after.is_some() || filter.event_before.is_some() {
        // Microsecond timestamps of years 0001..9999 are below 2^53: exact as f64.
        must.push(Condition::Field(FieldCondition::new_range(
            path(payload::EVENT_TIME),
            Range {
                gte: filter
                    .event_after
                    .map(|t| OrderedFloat(t.as_micros() as f64)),
                lt: filter
                    .event_before
                    .map(|t| OrderedFloat(t.as_micros() as f64)),
                gt: None,
                lte: None,
            },
        )));
    }
    for (key, value) in &filter.metadata_equals {
        must.push(equals(
            payload::METADATA_KV,
            &payload::metadata_pair(key, value),
        ));
    }
    and(must)
}

/// Memories of `tenant` with these ids.
pub fn ids(tenant_id: &TenantId, ids: &[MemoryId]) -> Filter {
    let has_id: HasIdCondition = ids.iter().copied().map(point_id).collect();
    and(vec![tenant(tenant_id), Condition::HasId(has_id)])
}

/// Every memory of `tenant` in the read scope.
pub fn scope(tenant_id: &TenantId, scope: &Scope) -> Filter {
    and(scope_conditions(tenant_id, scope))
}

/// Memories of exactly this scope with one of these hashes or keys.
pub fn duplicates(
    tenant_id: &TenantId,
    scope: &Scope,
    content_hashes: &[String],
    idempotency_keys: &[String],
) -> Filter {
    let mut should = Vec::new();
    if !content_hashes.is_empty() {
        should.push(any_of(payload::CONTENT_HASH, content_hashes));
    }
    if !idempotency_keys.is_empty() {
        should.push(any_of(payload::IDEMPOTENCY_KEY, idempotency_keys));
    }
    Filter {
        must: Some(vec![
            tenant(tenant_id),
            equals(payload::SCOPE_KEY, &scope.exact_key()),
        ]),
        should: Some(should),
        min_should: None,
        must_not: None,
    }
}

pub fn tenant_only(tenant_id: &TenantId) -> Filter {
    and(vec![tenant(tenant_id)])
}

fn and(must: Vec<Condition>) -> Filter {
    Filter {
        must: Some(must),
        should: None,
        min_should: None,
        must_not: None,
    }
}
