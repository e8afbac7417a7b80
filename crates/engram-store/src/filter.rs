//! Domain selections as filters, once for every backend: [`Conditions`] says which payload
//! conditions a read or delete needs, and each backend translates them to its engine's filter
//! type ([`Conditions::to_edge`] here, the remote store its own). The tenant condition is
//! always the first one.

use engram_domain::model::{MemoryId, Scope, TenantId};
use qdrant_edge::external::ordered_float::OrderedFloat;
use qdrant_edge::{
    Condition, FieldCondition, Filter, HasIdCondition, JsonPath, Match, PointId, Range,
    ValueVariants,
};

use crate::Selection;
use crate::payload;

/// One condition on a point.
#[derive(Debug, Clone, PartialEq)]
pub enum Cond {
    /// The keyword field equals the value (for an array field: contains it).
    Equals(&'static str, String),
    /// The keyword field equals (contains) one of the values.
    AnyOf(&'static str, Vec<String>),
    /// The integer field is within `[gte, lt)`; either end may be open.
    Range {
        field: &'static str,
        gte: Option<i64>,
        lt: Option<i64>,
    },
    /// The point is one of these memories.
    HasId(Vec<MemoryId>),
}

/// Conditions that must all hold, and (when `should` is not empty) at least one of `should`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Conditions {
    pub must: Vec<Cond>,
    pub should: Vec<Cond>,
}

fn tenant(tenant: &TenantId) -> Cond {
    Cond::Equals(payload::TENANT, tenant.as_str().to_string())
}

/// The tenant and a read scope: empty agent or session match any.
fn scope_conditions(tenant_id: &TenantId, scope: &Scope) -> Vec<Cond> {
    let mut must = vec![
        tenant(tenant_id),
        Cond::Equals(payload::USER_ID, scope.user_id.clone()),
    ];
    if !scope.agent_id.is_empty() {
        must.push(Cond::Equals(payload::AGENT_ID, scope.agent_id.clone()));
    }
    if !scope.session_id.is_empty() {
        must.push(Cond::Equals(payload::SESSION_ID, scope.session_id.clone()));
    }
    must
}

fn all(must: Vec<Cond>) -> Conditions {
    Conditions {
        must,
        should: Vec::new(),
    }
}

pub fn selection(selection: &Selection) -> Conditions {
    let Selection {
        tenant,
        scope,
        filter,
    } = selection;
    let mut must = scope_conditions(tenant, scope);
    if !filter.kinds.is_empty() {
        let kinds = filter
            .kinds
            .iter()
            .map(|k| k.as_str().to_string())
            .collect();
        must.push(Cond::AnyOf(payload::KIND, kinds));
    }
    if !filter.tags_any.is_empty() {
        must.push(Cond::AnyOf(payload::TAGS, filter.tags_any.clone()));
    }
    for tag in &filter.tags_all {
        must.push(Cond::Equals(payload::TAGS, tag.clone()));
    }
    if !filter.entities_any.is_empty() {
        must.push(Cond::AnyOf(payload::ENTITIES, filter.entities_any.clone()));
    }
    if filter.event_after.is_some() || filter.event_before.is_some() {
        must.push(Cond::Range {
            field: payload::EVENT_TIME,
            gte: filter.event_after.map(|t| t.as_micros()),
            lt: filter.event_before.map(|t| t.as_micros()),
        });
    }
    for (key, value) in &filter.metadata_equals {
        must.push(Cond::Equals(
            payload::METADATA_KV,
            payload::metadata_pair(key, value),
        ));
    }
    all(must)
}

/// Memories of `tenant` with these ids.
pub fn ids(tenant_id: &TenantId, ids: &[MemoryId]) -> Conditions {
    all(vec![tenant(tenant_id), Cond::HasId(ids.to_vec())])
}

/// Every memory of `tenant` in the read scope.
pub fn scope(tenant_id: &TenantId, scope: &Scope) -> Conditions {
    all(scope_conditions(tenant_id, scope))
}

/// How many memories a duplicate look-up reads at most: each hash or key can match a few.
pub fn duplicates_limit(content_hashes: &[String], idempotency_keys: &[String]) -> usize {
    (content_hashes.len() + idempotency_keys.len()) * 4
}

/// Memories of exactly this scope with one of these hashes or keys.
pub fn duplicates(
    tenant_id: &TenantId,
    scope: &Scope,
    content_hashes: &[String],
    idempotency_keys: &[String],
) -> Conditions {
    let mut should = Vec::new();
    if !content_hashes.is_empty() {
        should.push(Cond::AnyOf(payload::CONTENT_HASH, content_hashes.to_vec()));
    }
    if !idempotency_keys.is_empty() {
        should.push(Cond::AnyOf(
            payload::IDEMPOTENCY_KEY,
            idempotency_keys.to_vec(),
        ));
    }
    Conditions {
        must: vec![
            tenant(tenant_id),
            Cond::Equals(payload::SCOPE_KEY, scope.exact_key()),
        ],
        should,
    }
}

pub fn tenant_only(tenant_id: &TenantId) -> Conditions {
    all(vec![tenant(tenant_id)])
}

pub fn point_id(id: MemoryId) -> PointId {
    PointId::Uuid(id.as_uuid())
}

pub(crate) fn path(field: &'static str) -> JsonPath {
    field
        .parse()
        .unwrap_or_else(|_| unreachable!("payload field {field:?} is a constant, valid JSON path"))
}

impl Cond {
    fn to_edge(&self) -> Condition {
        match self {
            Cond::Equals(field, value) => Condition::Field(FieldCondition::new_match(
                path(field),
                Match::new_value(ValueVariants::String(value.clone())),
            )),
            Cond::AnyOf(field, values) => Condition::Field(FieldCondition::new_match(
                path(field),
                Match::from(values.clone()),
            )),
            // Microsecond timestamps of years 0001..9999 are below 2^53: exact as f64.
            Cond::Range { field, gte, lt } => Condition::Field(FieldCondition::new_range(
                path(field),
                Range {
                    gte: gte.map(|v| OrderedFloat(v as f64)),
                    lt: lt.map(|v| OrderedFloat(v as f64)),
                    gt: None,
                    lte: None,
                },
            )),
            Cond::HasId(ids) => {
                let has_id: HasIdCondition = ids.iter().copied().map(point_id).collect();
                Condition::HasId(has_id)
            }
        }
    }
}

impl Conditions {
    /// The embedded engine's filter.
    pub fn to_edge(&self) -> Filter {
        Filter {
            must: Some(self.must.iter().map(Cond::to_edge).collect()),
            should: (!self.should.is_empty())
                .then(|| self.should.iter().map(Cond::to_edge).collect()),
            min_should: None,
            must_not: None,
        }
    }
}
