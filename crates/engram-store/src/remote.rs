//! [`VectorStore`] on a Qdrant server or cluster, through `qdrant-client` (selected with
//! `ENGRAM_QDRANT_URL`).
//!
//! The collection is created on first start if absent, laid out as the embedded store lays out
//! its shard: a named cosine dense vector [`DENSE`], a sparse vector [`KEYWORDS`] with the IDF
//! modifier, and payload indexes on every field reads filter by, with the tenant as the tenant
//! key (Qdrant co-locates each tenant's points). An existing collection is checked: a dense
//! vector of another dimension is refused at start-up with the same message as the embedded
//! store. Upserts go in batches and every write waits for the server to apply it (`wait`), so a
//! write is searchable when `apply` returns. Filters come from [`crate::filter`], the same
//! conditions the embedded store uses. Each strategy of a HYBRID search is its own request (in
//! parallel); retrieval fuses their scores, the same way for every backend.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use engram_domain::api::{ApplyOutcome, DuplicateMatch, IndexOp, IndexWrites, IndexedMemory};
use engram_domain::model::{Memory, MemoryId, Scope, TenantId};
use qdrant_client::qdrant::{
    self, Condition, CountPointsBuilder, CreateCollectionBuilder,
    CreateFieldIndexCollectionBuilder, DeletePointsBuilder, Distance, FieldType,
    IntegerIndexParamsBuilder, KeywordIndexParamsBuilder, Modifier, NamedVectors, PointStruct,
    QueryPointsBuilder, ScrollPointsBuilder, SparseVectorParamsBuilder, SparseVectorsConfigBuilder,
    UpsertPointsBuilder, Vector, VectorInput, VectorParamsBuilder, VectorsConfigBuilder,
};
use qdrant_client::{Payload, Qdrant};

use crate::error::{StoreError, StoreResult};
use crate::filter::{Cond, Conditions};
use crate::{
    Candidate, DENSE, KEYWORDS, Selection, StoreInfo, StoreQuery, VectorStore, check_dimension,
    check_point, filter, payload,
};

/// Points per upsert request.
const UPSERT_BATCH: usize = 256;

#[derive(Debug, Clone)]
pub struct RemoteStoreConfig {
    /// gRPC URL of the Qdrant server, e.g. `http://qdrant:6334`.
    pub url: String,
    pub api_key: Option<String>,
    pub collection: String,
    /// Dimension of the dense vectors (the embedding model's).
    pub dimension: usize,
    /// Bound on one request to Qdrant.
    pub timeout: Duration,
    /// Shards and replicas of a collection this store creates (a cluster's layout).
    pub shards: u32,
    pub replication_factor: u32,
}

impl RemoteStoreConfig {
    pub fn new(url: impl Into<String>, dimension: usize) -> Self {
        Self {
            url: url.into(),
            api_key: None,
            collection: "engram".into(),
            dimension,
            timeout: Duration::from_secs(10),
            shards: 1,
            replication_factor: 1,
        }
    }
}

pub struct RemoteStore {
    client: Qdrant,
    collection: String,
    dimension: usize,
    /// The BM25 weights of each point's text.
    keywords: crate::Keywords,
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStore")
            .field("collection", &self.collection)
            .finish_non_exhaustive()
    }
}

fn remote(operation: &'static str) -> impl Fn(qdrant_client::QdrantError) -> StoreError {
    move |e| StoreError::Engine {
        operation,
        message: format!("Qdrant: {e}"),
    }
}

fn condition(cond: &Cond) -> Condition {
    match cond {
        Cond::Equals(field, value) => Condition::matches(*field, value.clone()),
        Cond::AnyOf(field, values) => Condition::matches(*field, values.clone()),
        Cond::Range { field, gte, lt } => Condition::range(
            *field,
            qdrant::Range {
                gte: gte.map(|v| v as f64),
                lt: lt.map(|v| v as f64),
                gt: None,
                lte: None,
            },
        ),
        Cond::HasId(ids) => Condition::has_id(ids.iter().map(|id| id.to_string())),
    }
}

fn to_filter(conditions: &Conditions) -> qdrant::Filter {
    qdrant::Filter {
        must: conditions.must.iter().map(condition).collect(),
        should: conditions.should.iter().map(condition).collect(),
        ..Default::default()
    }
}

fn memory_id(id: Option<&qdrant::PointId>) -> StoreResult<MemoryId> {
    let corrupt = |reason: &str| StoreError::CorruptPayload {
        id: format!("{id:?}"),
        reason: reason.to_string(),
    };
    match id.and_then(|id| id.point_id_options.as_ref()) {
        Some(qdrant::point_id::PointIdOptions::Uuid(uuid)) => {
            uuid.parse().map_err(|_| corrupt("point id is not a UUID"))
        }
        _ => Err(corrupt("numeric or missing point id; engram writes UUIDs")),
    }
}

fn memory(
    id: Option<&qdrant::PointId>,
    payload: HashMap<String, qdrant::Value>,
) -> StoreResult<Memory> {
    let id = memory_id(id)?;
    payload::from_payload(id.as_uuid(), &json_payload(payload))
}

fn json_payload(
    payload: HashMap<String, qdrant::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    payload
        .into_iter()
        .map(|(k, v)| (k, v.into_json()))
        .collect()
}

/// The candidates of a query's answer (read with [`payload::CANDIDATE_FIELDS`] only).
fn scored(points: Vec<qdrant::ScoredPoint>) -> StoreResult<Vec<Candidate>> {
    points
        .into_iter()
        .map(|p| {
            let id = memory_id(p.id.as_ref())?;
            payload::candidate(id.as_uuid(), p.score, &json_payload(p.payload))
        })
        .collect()
}

impl RemoteStore {
    /// Connect, and create the collection (with its vectors and payload indexes) if absent.
    pub async fn connect(config: RemoteStoreConfig) -> StoreResult<Self> {
        let open_error = |reason: String| StoreError::Open {
            path: format!("{} (collection {})", config.url, config.collection),
            reason,
        };
        let client = Qdrant::from_url(&config.url)
            .api_key(config.api_key.clone())
            .timeout(config.timeout)
            .skip_compatibility_check()
            .build()
            .map_err(|e| open_error(e.to_string()))?;
        let store = Self {
            client,
            collection: config.collection.clone(),
            dimension: config.dimension,
            keywords: crate::Keywords::new(),
        };
        let exists = store
            .client
            .collection_exists(&config.collection)
            .await
            .map_err(|e| open_error(format!("cannot reach Qdrant: {e}")))?;
        if exists {
            store.check_dimension().await.map_err(&open_error)?;
        } else {
            store
                .create(&config)
                .await
                .map_err(|e| open_error(e.to_string()))?;
        }
        Ok(store)
    }

    async fn check_dimension(&self) -> Result<(), String> {
        let info = self
            .client
            .collection_info(&self.collection)
            .await
            .map_err(|e| e.to_string())?;
        let size = info
            .result
            .and_then(|r| r.config)
            .and_then(|c| c.params)
            .and_then(|p| p.vectors_config)
            .and_then(|v| v.config)
            .and_then(|c| match c {
                qdrant::vectors_config::Config::ParamsMap(map) => {
                    map.map.get(DENSE).map(|p| p.size as usize)
                }
                qdrant::vectors_config::Config::Params(_) => None,
            });
        match size {
            Some(size) if size == self.dimension => Ok(()),
            other => Err(format!(
                "it holds {}-dimensional vectors but the embedding model produces {}; use another \
                 collection (ENGRAM_QDRANT_COLLECTION) or re-index with the original model",
                other.map_or_else(|| "no named dense".to_string(), |d| d.to_string()),
                self.dimension
            )),
        }
    }

    async fn create(&self, config: &RemoteStoreConfig) -> StoreResult<()> {
        let mut vectors = VectorsConfigBuilder::default();
        vectors.add_named_vector_params(
            DENSE,
            VectorParamsBuilder::new(config.dimension as u64, Distance::Cosine),
        );
        let mut sparse = SparseVectorsConfigBuilder::default();
        sparse.add_named_vector_params(
            KEYWORDS,
            SparseVectorParamsBuilder::default().modifier(Modifier::Idf as i32),
        );
        self.client
            .create_collection(
                CreateCollectionBuilder::new(&config.collection)
                    .vectors_config(vectors)
                    .sparse_vectors_config(sparse)
                    .shard_number(config.shards)
                    .replication_factor(config.replication_factor)
                    .on_disk_payload(true),
            )
            .await
            .map_err(remote("create collection"))?;
        for (field, kind) in payload::INDEXED {
            let mut index = CreateFieldIndexCollectionBuilder::new(
                &config.collection,
                *field,
                match kind {
                    payload::IndexKind::Tenant | payload::IndexKind::Keyword => FieldType::Keyword,
                    payload::IndexKind::Range => FieldType::Integer,
                },
            )
            .wait(true);
            index = match kind {
                payload::IndexKind::Tenant => {
                    index.field_index_params(KeywordIndexParamsBuilder::default().is_tenant(true))
                }
                payload::IndexKind::Keyword => index,
                payload::IndexKind::Range => index.field_index_params(
                    IntegerIndexParamsBuilder::default()
                        .lookup(false)
                        .range(true),
                ),
            };
            self.client
                .create_field_index(index)
                .await
                .map_err(remote("create payload index"))?;
        }
        tracing::info!(collection = %config.collection, "created the Qdrant collection");
        Ok(())
    }

    /// A query as the server's input and the vector it searches; `None` when it can match
    /// nothing (a keyword query of stop words only).
    fn input(&self, query: StoreQuery) -> StoreResult<Option<(VectorInput, &'static str)>> {
        match query {
            StoreQuery::Dense(vector) => {
                check_dimension("(query)", &vector, self.dimension)?;
                Ok(Some((VectorInput::new_dense(vector), DENSE)))
            }
            StoreQuery::Keywords(terms) if terms.indices.is_empty() => Ok(None),
            StoreQuery::Keywords(terms) => Ok(Some((
                VectorInput::new_sparse(terms.indices, terms.values),
                KEYWORDS,
            ))),
        }
    }

    fn point(&self, tenant: &TenantId, indexed: IndexedMemory) -> StoreResult<PointStruct> {
        check_point(tenant, &indexed, self.dimension)?;
        let IndexedMemory { memory, dense } = indexed;
        let sparse = self.keywords.document(&memory.text);
        let mut vectors = NamedVectors::default().add_vector(DENSE, Vector::new_dense(dense));
        if !sparse.indices.is_empty() {
            vectors =
                vectors.add_vector(KEYWORDS, Vector::new_sparse(sparse.indices, sparse.values));
        }
        Ok(PointStruct::new(
            memory.id.to_string(),
            vectors,
            Payload::from(payload::to_payload(&memory)),
        ))
    }

    async fn upsert(&self, points: &mut Vec<PointStruct>) -> StoreResult<u64> {
        let points = std::mem::take(points);
        let count = points.len() as u64;
        for batch in points.chunks(UPSERT_BATCH) {
            self.client
                .upsert_points(
                    UpsertPointsBuilder::new(&self.collection, batch.to_vec()).wait(true),
                )
                .await
                .map_err(remote("upsert"))?;
        }
        Ok(count)
    }

    async fn delete(&self, conditions: Conditions) -> StoreResult<u64> {
        let matching = self.count_matching(&conditions).await?;
        if matching > 0 {
            self.client
                .delete_points(
                    DeletePointsBuilder::new(&self.collection)
                        .points(to_filter(&conditions))
                        .wait(true),
                )
                .await
                .map_err(remote("delete"))?;
        }
        Ok(matching)
    }

    async fn count_matching(&self, conditions: &Conditions) -> StoreResult<u64> {
        let response = self
            .client
            .count(
                CountPointsBuilder::new(&self.collection)
                    .filter(to_filter(conditions))
                    .exact(true),
            )
            .await
            .map_err(remote("count"))?;
        Ok(response.result.map_or(0, |r| r.count))
    }

    async fn scroll(
        &self,
        conditions: &Conditions,
        limit: usize,
        start: Option<MemoryId>,
    ) -> StoreResult<(Vec<Memory>, Option<MemoryId>)> {
        let mut request = ScrollPointsBuilder::new(&self.collection)
            .filter(to_filter(conditions))
            .limit(u32::try_from(limit).unwrap_or(u32::MAX))
            .with_payload(true)
            .with_vectors(false);
        if let Some(start) = start {
            request = request.offset(start.to_string());
        }
        let response = self
            .client
            .scroll(request)
            .await
            .map_err(remote("scroll"))?;
        let memories = response
            .result
            .into_iter()
            .map(|p| memory(p.id.as_ref(), p.payload))
            .collect::<StoreResult<Vec<_>>>()?;
        let next = response
            .next_page_offset
            .as_ref()
            .map(|id| memory_id(Some(id)))
            .transpose()?;
        Ok((memories, next))
    }
}

#[async_trait]
impl VectorStore for RemoteStore {
    fn dimension(&self) -> usize {
        self.dimension
    }

    async fn apply(&self, tenant: &TenantId, writes: IndexWrites) -> StoreResult<ApplyOutcome> {
        let mut outcome = ApplyOutcome::default();
        let mut pending: Vec<PointStruct> = Vec::new();
        for op in writes.ops {
            match op {
                IndexOp::Upsert(indexed) => pending.push(self.point(tenant, *indexed)?),
                IndexOp::DeleteIds(ids) => {
                    outcome.upserted += self.upsert(&mut pending).await?;
                    outcome.deleted += self.delete(filter::ids(tenant, &ids)).await?;
                }
                IndexOp::DeleteScope(scope) => {
                    outcome.upserted += self.upsert(&mut pending).await?;
                    outcome.deleted += self.delete(filter::scope(tenant, &scope)).await?;
                }
            }
        }
        outcome.upserted += self.upsert(&mut pending).await?;
        Ok(outcome)
    }

    async fn search(
        &self,
        selection: &Selection,
        query: StoreQuery,
        limit: usize,
    ) -> StoreResult<Vec<Candidate>> {
        let Some((input, using)) = self.input(query)? else {
            return Ok(Vec::new());
        };
        let response = self
            .client
            .query(
                QueryPointsBuilder::new(&self.collection)
                    .query(qdrant::Query::new_nearest(input))
                    .using(using)
                    .filter(to_filter(&filter::selection(selection)))
                    .limit(limit as u64)
                    .with_payload(qdrant::PayloadIncludeSelector {
                        fields: payload::CANDIDATE_FIELDS.map(String::from).to_vec(),
                    }),
            )
            .await
            .map_err(remote("search"))?;
        scored(response.result)
    }

    async fn get(&self, tenant: &TenantId, ids: &[MemoryId]) -> StoreResult<Vec<Memory>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self
            .scroll(&filter::ids(tenant, ids), ids.len(), None)
            .await?
            .0)
    }

    async fn list(
        &self,
        selection: &Selection,
        limit: usize,
        start: Option<MemoryId>,
    ) -> StoreResult<(Vec<Memory>, Option<MemoryId>)> {
        self.scroll(&filter::selection(selection), limit, start)
            .await
    }

    async fn find_duplicates(
        &self,
        tenant: &TenantId,
        scope: &Scope,
        content_hashes: Vec<String>,
        idempotency_keys: Vec<String>,
    ) -> StoreResult<Vec<DuplicateMatch>> {
        if content_hashes.is_empty() && idempotency_keys.is_empty() {
            return Ok(Vec::new());
        }
        let limit = filter::duplicates_limit(&content_hashes, &idempotency_keys);
        let conditions = filter::duplicates(tenant, scope, &content_hashes, &idempotency_keys);
        let (memories, _) = self.scroll(&conditions, limit, None).await?;
        Ok(memories
            .into_iter()
            .map(|m| DuplicateMatch {
                id: m.id,
                content_hash: m.content_hash,
                idempotency_key: m.idempotency_key,
            })
            .collect())
    }

    async fn count_selected(&self, selection: &Selection) -> StoreResult<u64> {
        self.count_matching(&filter::selection(selection)).await
    }

    async fn count(&self, tenant: Option<&TenantId>) -> StoreResult<u64> {
        match tenant {
            Some(tenant) => self.count_matching(&filter::tenant_only(tenant)).await,
            None => Ok(self.info().await?.points),
        }
    }

    async fn info(&self) -> StoreResult<StoreInfo> {
        let info = self
            .client
            .collection_info(&self.collection)
            .await
            .map_err(remote("info"))?
            .result
            .unwrap_or_default();
        Ok(StoreInfo {
            points: info.points_count.unwrap_or(0),
            segments: info.segments_count,
            indexed_vectors: info.indexed_vectors_count.unwrap_or(0),
        })
    }

    async fn close(&self) -> StoreResult<()> {
        // Every write was acknowledged by the server (`wait`): nothing is buffered here.
        Ok(())
    }
}
