//! gRPC adapters for the internal service contracts of [`engram_domain::api`].
//!
//! For each contract: a server adapter that exposes any implementation over tonic (it only
//! validates and converts, then calls the trait), and a client that implements the same trait
//! over a channel to a peer. Status codes cross each hop intact: a peer's INVALID_ARGUMENT with
//! its field, or RESOURCE_EXHAUSTED with its retry hint, reaches the caller as it was sent.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use engram_proto::internal::v1 as ipb;
use engram_proto::tonic::service::interceptor::InterceptedService;
use engram_proto::tonic::{Code, Request, Response, Status};
use engram_telemetry::{GrpcClient, GrpcClientLayer, Metrics};
use tower::Layer as _;

use crate::cluster_auth::Outgoing;
use crate::config::CommonArgs;
use crate::peers::{Balanced, PeerSettings, RetryBudget};
use engram_domain::ClusterSecret;
use engram_domain::api::{
    ApplyOutcome, DuplicateMatch, Embedder, Embeddings, FailureKind, ForgetOutcome, ForgetTarget,
    GetQuery, GetResult, Index, IndexOp, IndexStats, IndexWrites, IndexedMemory, Ingestion,
    ListPage, ListQuery, Purpose, RecallQuery, RecallResult, RememberBatch, RememberOutcome,
    UpdateCommand, UpdateOutcome, WriteFailure, WriteState, WriteToken,
};
use engram_domain::api::{Fence, LogKind};
use engram_domain::convert;
use engram_domain::error::{Error, Result};
use engram_domain::limits::Limits;
use engram_domain::limits::fixed::MAX_LOG_PARTITIONS;
use engram_domain::model::{Scope, TenantId};
use engram_domain::validate;

/// Largest message an internal server or client accepts: a full batch of maximal memories with
/// their vectors.
pub const MAX_INTERNAL_MESSAGE_BYTES: usize = 128 * 1024 * 1024;

/// How a service reaches its peers: the channel settings and the client layer (metrics and
/// trace context) every client of the service shares.
#[derive(Debug, Clone)]
pub struct Peers {
    settings: PeerSettings,
    layer: GrpcClientLayer,
    outgoing: Outgoing,
}

impl Peers {
    /// Clients reporting into `metrics` (the service's registry: create one `Peers` per
    /// service, since each registers the `grpc_client_*` series).
    pub fn new(common: &CommonArgs, metrics: &Metrics) -> Result<Self> {
        Ok(Self {
            settings: PeerSettings::new(common.internal_timeout, common.discovery_interval),
            layer: GrpcClientLayer::new(metrics),
            outgoing: Outgoing::new(common.cluster_secret.as_ref())?,
        })
    }

    /// For tools and tests: clients with their own unexported metrics, carrying the
    /// credential of the cluster whose secret is `secret`.
    pub fn standalone(request_timeout: Duration, secret: Option<&ClusterSecret>) -> Result<Self> {
        Ok(Self {
            settings: PeerSettings::new(request_timeout, Duration::from_secs(5)),
            layer: GrpcClientLayer::new(&Metrics::new()),
            outgoing: Outgoing::new(secret)?,
        })
    }

    /// A channel to the peers `urls` lists (`setting` names where they came from), whose
    /// calls carry the caller's remaining deadline, trace context and the cluster's credential.
    fn connect(&self, setting: &str, urls: &str) -> Result<Peer> {
        let balanced = Balanced::new(setting, urls, self.settings)?;
        Ok(InterceptedService::new(
            self.layer.layer(balanced),
            self.outgoing.clone(),
        ))
    }
}

/// A balanced channel to a peer's replicas whose calls carry the caller's remaining deadline
/// and the cluster's credential.
type Peer = InterceptedService<GrpcClient<Balanced>, Outgoing>;

/// Run an idempotent read, once more on another endpoint if it failed as UNAVAILABLE and the
/// budget allows.
async fn read<T, Fut>(
    budget: &RetryBudget,
    mut call: impl FnMut() -> Fut,
) -> std::result::Result<T, Status>
where
    Fut: Future<Output = std::result::Result<Response<T>, Status>>,
{
    let mut retried = false;
    loop {
        match call().await {
            Ok(response) => {
                budget.deposit();
                return Ok(response.into_inner());
            }
            Err(status) if status.code() == Code::Unavailable && !retried && budget.withdraw() => {
                tracing::debug!(error = %status.message(), "retrying a read on another endpoint");
                retried = true;
            }
            Err(status) => return Err(status),
        }
    }
}

fn tenant(raw: &str) -> Result<TenantId> {
    TenantId::parse(raw)
}

fn purpose_from_pb(value: i32) -> Result<Purpose> {
    match ipb::Purpose::try_from(value) {
        Ok(ipb::Purpose::Query) => Ok(Purpose::Query),
        Ok(ipb::Purpose::Document | ipb::Purpose::Unspecified) => Ok(Purpose::Document),
        Err(_) => Err(Error::invalid(
            "purpose",
            format!("unknown purpose {value}"),
        )),
    }
}

fn purpose_to_pb(purpose: Purpose) -> ipb::Purpose {
    match purpose {
        Purpose::Query => ipb::Purpose::Query,
        Purpose::Document => ipb::Purpose::Document,
    }
}

// ---- Embedder ----

/// Serves an [`Embedder`] as `engram.internal.v1.Embedder`.
pub fn embedder_server(
    inner: Arc<dyn Embedder>,
    limits: Limits,
) -> ipb::embedder_server::EmbedderServer<EmbedderGrpc> {
    ipb::embedder_server::EmbedderServer::new(EmbedderGrpc { inner, limits })
        .max_decoding_message_size(MAX_INTERNAL_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_INTERNAL_MESSAGE_BYTES)
}

pub struct EmbedderGrpc {
    inner: Arc<dyn Embedder>,
    limits: Limits,
}

/// An Embed or Forget request's texts: at least one, at most a batch, none over the limit.
fn texts_in_bounds(texts: &[String], limits: &Limits) -> Result<()> {
    if texts.is_empty() {
        return Err(Error::invalid("texts", "at least one text is required"));
    }
    if texts.len() > limits.max_batch {
        return Err(Error::invalid(
            "texts",
            format!("at most {} texts per request", limits.max_batch),
        ));
    }
    if let Some(i) = texts.iter().position(|t| t.len() > limits.max_text_bytes) {
        return Err(Error::invalid(
            format!("texts[{i}]"),
            format!("over the limit of {} bytes", limits.max_text_bytes),
        ));
    }
    Ok(())
}

#[async_trait]
impl ipb::embedder_server::Embedder for EmbedderGrpc {
    async fn embed(
        &self,
        request: Request<ipb::EmbedRequest>,
    ) -> Result<Response<ipb::EmbedResponse>, Status> {
        let request = request.into_inner();
        let tenant = tenant(&request.tenant)?;
        let purpose = purpose_from_pb(request.purpose)?;
        texts_in_bounds(&request.texts, &self.limits)?;
        let embeddings = self.inner.embed(&tenant, request.texts, purpose).await?;
        Ok(Response::new(ipb::EmbedResponse {
            embeddings: embeddings
                .vectors
                .into_iter()
                .map(|values| ipb::Embedding { values })
                .collect(),
            model: embeddings.model,
            dimension: u32::try_from(embeddings.dimension).unwrap_or(u32::MAX),
        }))
    }

    async fn forget(
        &self,
        request: Request<ipb::EmbedRequest>,
    ) -> Result<Response<ipb::ForgetEmbeddingsResponse>, Status> {
        let request = request.into_inner();
        let tenant = tenant(&request.tenant)?;
        let purpose = purpose_from_pb(request.purpose)?;
        texts_in_bounds(&request.texts, &self.limits)?;
        let removed = self.inner.forget(&tenant, request.texts, purpose).await?;
        Ok(Response::new(ipb::ForgetEmbeddingsResponse { removed }))
    }
}

/// An [`Embedder`] reached over gRPC.
#[derive(Clone)]
pub struct EmbedderClient {
    client: ipb::embedder_client::EmbedderClient<Peer>,
}

impl EmbedderClient {
    /// A client of the replicas `urls` lists, connecting on first use; `setting` names where
    /// the URLs came from.
    pub fn connect(peers: &Peers, setting: &str, urls: &str) -> Result<Self> {
        Ok(Self {
            client: ipb::embedder_client::EmbedderClient::new(peers.connect(setting, urls)?)
                .max_decoding_message_size(MAX_INTERNAL_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_INTERNAL_MESSAGE_BYTES),
        })
    }
}

#[async_trait]
impl Embedder for EmbedderClient {
    async fn embed(
        &self,
        tenant: &TenantId,
        texts: Vec<String>,
        purpose: Purpose,
    ) -> Result<Embeddings> {
        let expected = texts.len();
        let response = self
            .client
            .clone()
            .embed(ipb::EmbedRequest {
                texts,
                purpose: purpose_to_pb(purpose).into(),
                tenant: tenant.to_string(),
            })
            .await?
            .into_inner();
        let dimension = response.dimension as usize;
        if response.embeddings.len() != expected
            || response
                .embeddings
                .iter()
                .any(|e| e.values.len() != dimension)
        {
            return Err(Error::internal(format!(
                "embedding service returned {} vectors for {expected} texts (model {}, dimension {dimension})",
                response.embeddings.len(),
                response.model
            )));
        }
        Ok(Embeddings {
            model: response.model,
            dimension,
            vectors: response.embeddings.into_iter().map(|e| e.values).collect(),
        })
    }

    async fn forget(&self, tenant: &TenantId, texts: Vec<String>, purpose: Purpose) -> Result<u64> {
        let response = self
            .client
            .clone()
            .forget(ipb::EmbedRequest {
                texts,
                purpose: purpose_to_pb(purpose).into(),
                tenant: tenant.to_string(),
            })
            .await
            .map_err(|status| match status.code() {
                // An embedding service older than this one (a rolling upgrade): the erasure
                // waits for it to be upgraded.
                Code::Unimplemented => Error::unavailable(
                    "the embedding service cannot drop cached vectors yet (an older release); upgrade it",
                ),
                _ => Error::from(status),
            })?
            .into_inner();
        Ok(response.removed)
    }
}

// ---- Index ----

fn index_op_from_pb(op: ipb::IndexOp, tenant: &TenantId) -> Result<IndexOp> {
    match op.op {
        Some(ipb::index_op::Op::Upsert(upsert)) => {
            let mut memory = convert::memory_from_pb(upsert.memory.unwrap_or_default(), tenant)
                .map_err(|e| e.in_field("upsert"))?;
            memory.idempotency_key = upsert.idempotency_key;
            Ok(IndexOp::Upsert(Box::new(IndexedMemory {
                memory,
                dense: upsert.dense.map(|d| d.values).unwrap_or_default(),
            })))
        }
        Some(ipb::index_op::Op::DeleteIds(list)) => list
            .ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                validate::memory_id(id).map_err(|e| e.in_field(&format!("delete_ids.ids[{i}]")))
            })
            .collect::<Result<Vec<_>>>()
            .map(IndexOp::DeleteIds),
        Some(ipb::index_op::Op::DeleteScope(scope)) => validate::write_scope(Some(&scope))
            .map(IndexOp::DeleteScope)
            .map_err(|e| e.in_field("delete_scope")),
        None => Err(Error::invalid("op", "is required")),
    }
}

/// How far a lease epoch may be ahead of this clock (clock skew, leases taken faster than once
/// a millisecond): a day.
const MAX_EPOCH_LEAD_MS: u64 = 24 * 3600 * 1000;

fn fence_from_pb(fence: ipb::Fence) -> Result<Fence> {
    let log = match ipb::LogKind::try_from(fence.log) {
        Ok(ipb::LogKind::Write) => LogKind::Write,
        Ok(ipb::LogKind::Extraction) => LogKind::Extraction,
        _ => return Err(Error::invalid("fence.log", "must be WRITE or EXTRACTION")),
    };
    if fence.partition >= MAX_LOG_PARTITIONS {
        return Err(Error::invalid(
            "fence.partition",
            format!("must be below {MAX_LOG_PARTITIONS}"),
        ));
    }
    // Epochs follow Redis's clock in milliseconds (see the write log's lease): one far ahead
    // of it would fence every later worker out of the partition.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    if fence.epoch > now_ms.saturating_add(MAX_EPOCH_LEAD_MS) {
        return Err(Error::invalid(
            "fence.epoch",
            "is ahead of any lease the write log can have handed out",
        ));
    }
    Ok(Fence {
        log,
        partition: fence.partition,
        epoch: fence.epoch,
    })
}

fn fence_to_pb(fence: Fence) -> ipb::Fence {
    ipb::Fence {
        log: match fence.log {
            LogKind::Write => ipb::LogKind::Write,
            LogKind::Extraction => ipb::LogKind::Extraction,
        } as i32,
        partition: fence.partition,
        epoch: fence.epoch,
    }
}

fn index_op_to_pb(op: IndexOp) -> ipb::IndexOp {
    let op = match op {
        IndexOp::Upsert(u) => {
            let IndexedMemory { memory, dense } = *u;
            ipb::index_op::Op::Upsert(ipb::IndexedMemory {
                memory: Some(convert::memory(&memory)),
                dense: Some(ipb::Embedding { values: dense }),
                idempotency_key: memory.idempotency_key,
            })
        }
        IndexOp::DeleteIds(ids) => ipb::index_op::Op::DeleteIds(engram_proto::v1::MemoryIds {
            ids: ids.iter().map(ToString::to_string).collect(),
        }),
        IndexOp::DeleteScope(scope) => ipb::index_op::Op::DeleteScope(convert::scope(&scope)),
    };
    ipb::IndexOp { op: Some(op) }
}

/// Serves an [`Index`] as `engram.internal.v1.Index`.
pub fn index_server(
    inner: Arc<dyn Index>,
    limits: Limits,
) -> ipb::index_server::IndexServer<IndexGrpc> {
    ipb::index_server::IndexServer::new(IndexGrpc { inner, limits })
        .max_decoding_message_size(MAX_INTERNAL_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_INTERNAL_MESSAGE_BYTES)
}

pub struct IndexGrpc {
    inner: Arc<dyn Index>,
    limits: Limits,
}

#[async_trait]
impl ipb::index_server::Index for IndexGrpc {
    async fn search(
        &self,
        request: Request<ipb::SearchRequest>,
    ) -> Result<Response<engram_proto::v1::RecallResponse>, Status> {
        let request = request.into_inner();
        let tenant = tenant(&request.tenant)?;
        let query = validate::recall(request.recall.unwrap_or_default(), &self.limits)?;
        let result = self.inner.search(&tenant, query).await?;
        Ok(Response::new(convert::recall_response(&result)))
    }

    async fn get(
        &self,
        request: Request<ipb::IndexGetRequest>,
    ) -> Result<Response<engram_proto::v1::GetResponse>, Status> {
        let request = request.into_inner();
        let tenant = tenant(&request.tenant)?;
        let query = validate::get(request.get.unwrap_or_default(), &self.limits)?;
        let result = self.inner.get(&tenant, query).await?;
        Ok(Response::new(convert::get_response(&result)))
    }

    async fn list(
        &self,
        request: Request<ipb::IndexListRequest>,
    ) -> Result<Response<engram_proto::v1::ListResponse>, Status> {
        let request = request.into_inner();
        let tenant = tenant(&request.tenant)?;
        let query = validate::list(request.list.unwrap_or_default(), &self.limits)?;
        let page = self.inner.list(&tenant, query).await?;
        Ok(Response::new(convert::list_response(&page)))
    }

    async fn apply(
        &self,
        request: Request<ipb::ApplyRequest>,
    ) -> Result<Response<ipb::ApplyResponse>, Status> {
        let request = request.into_inner();
        let tenant = tenant(&request.tenant)?;
        let ops = request
            .ops
            .into_iter()
            .enumerate()
            .map(|(i, op)| {
                index_op_from_pb(op, &tenant).map_err(|e| e.in_field(&format!("ops[{i}]")))
            })
            .collect::<Result<Vec<_>>>()?;
        let fence = request.fence.map(fence_from_pb).transpose()?;
        let outcome = self
            .inner
            .apply(&tenant, IndexWrites { ops, fence })
            .await?;
        Ok(Response::new(ipb::ApplyResponse {
            upserted: outcome.upserted,
            deleted: outcome.deleted,
            cached_results: outcome.cached_results,
        }))
    }

    async fn find_duplicates(
        &self,
        request: Request<ipb::FindDuplicatesRequest>,
    ) -> Result<Response<ipb::FindDuplicatesResponse>, Status> {
        let request = request.into_inner();
        let tenant = tenant(&request.tenant)?;
        let scope = validate::write_scope(request.scope.as_ref())?;
        let matches = self
            .inner
            .find_duplicates(
                &tenant,
                &scope,
                request.content_hashes,
                request.idempotency_keys,
            )
            .await?;
        Ok(Response::new(ipb::FindDuplicatesResponse {
            matches: matches
                .into_iter()
                .map(|m| ipb::DuplicateMatch {
                    id: m.id.to_string(),
                    content_hash: m.content_hash,
                    idempotency_key: m.idempotency_key,
                })
                .collect(),
        }))
    }

    async fn stats(
        &self,
        request: Request<ipb::StatsRequest>,
    ) -> Result<Response<ipb::StatsResponse>, Status> {
        let request = request.into_inner();
        let tenant = if request.tenant.is_empty() {
            None
        } else {
            Some(tenant(&request.tenant)?)
        };
        let stats = self.inner.stats(tenant.as_ref()).await?;
        Ok(Response::new(ipb::StatsResponse {
            memories: stats.memories,
            segments: stats.segments,
            indexed_vectors: stats.indexed_vectors,
        }))
    }
}

/// An [`Index`] reached over gRPC.
#[derive(Clone)]
pub struct IndexClient {
    client: ipb::index_client::IndexClient<Peer>,
    budget: Arc<RetryBudget>,
}

impl IndexClient {
    /// A client of the replicas `urls` lists, connecting on first use; `setting` names where
    /// the URLs came from.
    pub fn connect(peers: &Peers, setting: &str, urls: &str) -> Result<Self> {
        Ok(Self {
            client: ipb::index_client::IndexClient::new(peers.connect(setting, urls)?)
                .max_decoding_message_size(MAX_INTERNAL_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_INTERNAL_MESSAGE_BYTES),
            budget: Arc::new(RetryBudget::default()),
        })
    }
}

#[async_trait]
impl Index for IndexClient {
    async fn search(&self, tenant: &TenantId, query: RecallQuery) -> Result<RecallResult> {
        let request = ipb::SearchRequest {
            tenant: tenant.to_string(),
            recall: Some(convert::recall_request(&query)),
        };
        let response = read(&self.budget, || {
            let (mut client, request) = (self.client.clone(), request.clone());
            async move { client.search(request).await }
        })
        .await?;
        convert::recall_result_from_pb(response, tenant)
    }

    async fn get(&self, tenant: &TenantId, query: GetQuery) -> Result<GetResult> {
        let request = ipb::IndexGetRequest {
            tenant: tenant.to_string(),
            get: Some(convert::get_request(&query)),
        };
        let response = read(&self.budget, || {
            let (mut client, request) = (self.client.clone(), request.clone());
            async move { client.get(request).await }
        })
        .await?;
        convert::get_result_from_pb(response, tenant)
    }

    async fn list(&self, tenant: &TenantId, query: ListQuery) -> Result<ListPage> {
        let request = ipb::IndexListRequest {
            tenant: tenant.to_string(),
            list: Some(convert::list_request(&query)),
        };
        let response = read(&self.budget, || {
            let (mut client, request) = (self.client.clone(), request.clone());
            async move { client.list(request).await }
        })
        .await?;
        convert::list_page_from_pb(response, tenant)
    }

    async fn apply(&self, tenant: &TenantId, writes: IndexWrites) -> Result<ApplyOutcome> {
        let request = ipb::ApplyRequest {
            tenant: tenant.to_string(),
            ops: writes.ops.into_iter().map(index_op_to_pb).collect(),
            fence: writes.fence.map(fence_to_pb),
        };
        let response = self.client.clone().apply(request).await?.into_inner();
        Ok(ApplyOutcome {
            upserted: response.upserted,
            deleted: response.deleted,
            cached_results: response.cached_results,
        })
    }

    async fn find_duplicates(
        &self,
        tenant: &TenantId,
        scope: &Scope,
        content_hashes: Vec<String>,
        idempotency_keys: Vec<String>,
    ) -> Result<Vec<DuplicateMatch>> {
        let response = self
            .client
            .clone()
            .find_duplicates(ipb::FindDuplicatesRequest {
                tenant: tenant.to_string(),
                scope: Some(convert::scope(scope)),
                content_hashes,
                idempotency_keys,
            })
            .await?
            .into_inner();
        response
            .matches
            .into_iter()
            .map(|m| {
                Ok(DuplicateMatch {
                    id: validate::memory_id(&m.id)?,
                    content_hash: m.content_hash,
                    idempotency_key: m.idempotency_key,
                })
            })
            .collect()
    }

    async fn stats(&self, tenant: Option<&TenantId>) -> Result<IndexStats> {
        let response = self
            .client
            .clone()
            .stats(ipb::StatsRequest {
                tenant: tenant.map(ToString::to_string).unwrap_or_default(),
            })
            .await?
            .into_inner();
        Ok(IndexStats {
            memories: response.memories,
            segments: response.segments,
            indexed_vectors: response.indexed_vectors,
        })
    }
}

// ---- Ingestion ----

/// Serves an [`Ingestion`] as `engram.internal.v1.Ingestion`.
pub fn ingestion_server(
    inner: Arc<dyn Ingestion>,
    limits: Limits,
) -> ipb::ingestion_server::IngestionServer<IngestionGrpc> {
    ipb::ingestion_server::IngestionServer::new(IngestionGrpc { inner, limits })
        .max_decoding_message_size(MAX_INTERNAL_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_INTERNAL_MESSAGE_BYTES)
}

pub struct IngestionGrpc {
    inner: Arc<dyn Ingestion>,
    limits: Limits,
}

#[async_trait]
impl ipb::ingestion_server::Ingestion for IngestionGrpc {
    async fn submit(
        &self,
        request: Request<ipb::SubmitRequest>,
    ) -> Result<Response<engram_proto::v1::RememberResponse>, Status> {
        let request = request.into_inner();
        let tenant = tenant(&request.tenant)?;
        let batch = validate::remember(request.remember.unwrap_or_default(), &self.limits)?;
        let outcome = self.inner.submit(&tenant, batch).await?;
        Ok(Response::new(convert::remember_response(&outcome)))
    }

    async fn update(
        &self,
        request: Request<ipb::IngestUpdateRequest>,
    ) -> Result<Response<engram_proto::v1::UpdateResponse>, Status> {
        let request = request.into_inner();
        let tenant = tenant(&request.tenant)?;
        let command = validate::update(request.update.unwrap_or_default(), &self.limits)?;
        let outcome = self.inner.update(&tenant, command).await?;
        Ok(Response::new(convert::update_response(&outcome)))
    }

    async fn forget(
        &self,
        request: Request<ipb::IngestForgetRequest>,
    ) -> Result<Response<engram_proto::v1::ForgetResponse>, Status> {
        let request = request.into_inner();
        let tenant = tenant(&request.tenant)?;
        let target = validate::forget(request.forget.unwrap_or_default(), &self.limits)?;
        let outcome = self.inner.forget(&tenant, target).await?;
        Ok(Response::new(convert::forget_response(&outcome)))
    }

    async fn status(
        &self,
        request: Request<ipb::StatusRequest>,
    ) -> Result<Response<ipb::StatusResponse>, Status> {
        let token = WriteToken::decode(&request.into_inner().write_token)
            .map_err(|e| e.in_field("write_token"))?;
        let response = match self.inner.status(token).await? {
            WriteState::Pending => ipb::StatusResponse {
                state: ipb::WriteState::Pending.into(),
                ..Default::default()
            },
            WriteState::Indexed => ipb::StatusResponse {
                state: ipb::WriteState::Indexed.into(),
                ..Default::default()
            },
            WriteState::Failed(failure) => ipb::StatusResponse {
                state: ipb::WriteState::Failed.into(),
                reason: failure.message,
                failure_kind: failure.kind.to_pb().into(),
            },
        };
        Ok(Response::new(response))
    }
}

/// An [`Ingestion`] reached over gRPC.
#[derive(Clone)]
pub struct IngestionClient {
    client: ipb::ingestion_client::IngestionClient<Peer>,
}

impl IngestionClient {
    /// A client of the replicas `urls` lists, connecting on first use; `setting` names where
    /// the URLs came from.
    pub fn connect(peers: &Peers, setting: &str, urls: &str) -> Result<Self> {
        Ok(Self {
            client: ipb::ingestion_client::IngestionClient::new(peers.connect(setting, urls)?)
                .max_decoding_message_size(MAX_INTERNAL_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_INTERNAL_MESSAGE_BYTES),
        })
    }
}

#[async_trait]
impl Ingestion for IngestionClient {
    async fn submit(&self, tenant: &TenantId, batch: RememberBatch) -> Result<RememberOutcome> {
        let response = self
            .client
            .clone()
            .submit(ipb::SubmitRequest {
                tenant: tenant.to_string(),
                remember: Some(convert::remember_request(&batch)),
            })
            .await?;
        convert::remember_outcome_from_pb(response.into_inner())
    }

    async fn update(&self, tenant: &TenantId, command: UpdateCommand) -> Result<UpdateOutcome> {
        let response = self
            .client
            .clone()
            .update(ipb::IngestUpdateRequest {
                tenant: tenant.to_string(),
                update: Some(convert::update_request(&command)),
            })
            .await?;
        convert::update_outcome_from_pb(response.into_inner(), tenant)
    }

    async fn forget(&self, tenant: &TenantId, target: ForgetTarget) -> Result<ForgetOutcome> {
        let response = self
            .client
            .clone()
            .forget(ipb::IngestForgetRequest {
                tenant: tenant.to_string(),
                forget: Some(convert::forget_request(&target)),
            })
            .await?;
        convert::forget_outcome_from_pb(response.into_inner())
    }

    async fn status(&self, token: WriteToken) -> Result<WriteState> {
        let response = self
            .client
            .clone()
            .status(ipb::StatusRequest {
                write_token: token.encode(),
            })
            .await?
            .into_inner();
        match ipb::WriteState::try_from(response.state) {
            Ok(ipb::WriteState::Pending) => Ok(WriteState::Pending),
            Ok(ipb::WriteState::Indexed) => Ok(WriteState::Indexed),
            Ok(ipb::WriteState::Failed) => Ok(WriteState::Failed(WriteFailure {
                kind: FailureKind::from_pb(response.failure_kind),
                message: response.reason,
            })),
            _ => Err(Error::internal(format!(
                "ingestion answered an unknown write state {}",
                response.state
            ))),
        }
    }
}

// ---- Public API clients ----

/// A client interceptor sending an API key as `authorization: Bearer <key>` (no key: nothing).
#[derive(Debug, Clone, Default)]
pub struct BearerKey(Option<engram_proto::tonic::metadata::AsciiMetadataValue>);

impl BearerKey {
    /// `setting` names where the key came from, for the error if it cannot be sent.
    pub fn new(setting: &str, key: Option<&str>) -> Result<Self> {
        key.filter(|k| !k.is_empty())
            .map(|key| {
                format!("Bearer {key}").parse().map_err(|_| {
                    Error::invalid(setting, "an API key is printable ASCII without spaces")
                })
            })
            .transpose()
            .map(Self)
    }
}

impl engram_proto::tonic::service::Interceptor for BearerKey {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}
