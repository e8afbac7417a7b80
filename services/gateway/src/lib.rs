//! The gateway: engram's only public surface, serving `engram.v1.MemoryService`.
//!
//! A request passes through the server layers (metrics), then the handler here: the tenant is
//! taken from the caller's credentials (until authentication is configured, every caller is the
//! tenant `default`), the request is validated and bounded (`engram_core::validate`), and it is
//! routed: Recall, Get and List to retrieval, Remember, Update and Forget to ingestion.

use std::sync::Arc;

use async_trait::async_trait;
use engram_core::api::{Index, Ingestion};
use engram_core::config::{CommonArgs, IngestionUrl, RetrievalUrl};
use engram_core::model::TenantId;
use engram_core::server::{Listeners, ServiceRuntime};
use engram_core::{Limits, Result, convert, rpc, validate};
use engram_proto::tonic::service::Routes;
use engram_proto::tonic::{Request, Response, Status};
use engram_proto::v1 as pb;
use engram_proto::v1::memory_service_server::{MemoryService, MemoryServiceServer};

pub const SERVICE_NAME: &str = "gateway";

/// Largest request the public API accepts: a full batch of maximal memories fits.
pub const MAX_PUBLIC_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

engram_core::listen_args!(Listen, "gateway", "GATEWAY", "50051", "9091");

/// Where the gateway finds the services it routes to (its own binary only; `engram up` wires
/// these).
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayPeers {
    #[command(flatten)]
    pub retrieval: RetrievalUrl,
    #[command(flatten)]
    pub ingestion: IngestionUrl,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub retrieval_url: String,
    pub ingestion_url: String,
    pub common: CommonArgs,
}

impl Config {
    pub fn from_args(peers: GatewayPeers, common: CommonArgs) -> Self {
        Self {
            retrieval_url: peers.retrieval.retrieval_url,
            ingestion_url: peers.ingestion.ingestion_url,
            common,
        }
    }
}

pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let runtime = ServiceRuntime::start(SERVICE_NAME, listeners.admin);
    let timeout = config.common.internal_timeout;
    let index = Arc::new(rpc::IndexClient::connect_lazy(
        "ENGRAM_RETRIEVAL_URL",
        &config.retrieval_url,
        timeout,
    )?);
    let ingestion = Arc::new(rpc::IngestionClient::connect_lazy(
        "ENGRAM_INGESTION_URL",
        &config.ingestion_url,
        timeout,
    )?);
    tracing::warn!(
        "authentication is off: every caller is the tenant `default`; do not expose this gateway beyond a trusted network"
    );
    let gateway = Gateway {
        index,
        ingestion,
        limits: config.common.limits.clone(),
    };
    let routes = Routes::new(
        MemoryServiceServer::new(gateway)
            .max_decoding_message_size(MAX_PUBLIC_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_PUBLIC_MESSAGE_BYTES),
    );
    runtime
        .serve(
            routes,
            &["engram.v1.MemoryService"],
            listeners.grpc,
            config.common.drain_grace,
            shutdown,
        )
        .await
}

/// Routes the public API onto the internal services.
pub struct Gateway {
    index: Arc<dyn Index>,
    ingestion: Arc<dyn Ingestion>,
    limits: Limits,
}

impl Gateway {
    /// The tenant a request acts for. Until authentication is configured every caller is
    /// `default`; nothing in a request body can choose another.
    fn tenant<T>(&self, _request: &Request<T>) -> TenantId {
        TenantId::default_tenant()
    }
}

#[async_trait]
impl MemoryService for Gateway {
    async fn remember(
        &self,
        request: Request<pb::RememberRequest>,
    ) -> Result<Response<pb::RememberResponse>, Status> {
        let tenant = self.tenant(&request);
        let batch = validate::remember(request.into_inner(), &self.limits)?;
        let outcome = self.ingestion.submit(&tenant, batch).await?;
        Ok(Response::new(convert::remember_response(&outcome)))
    }

    async fn recall(
        &self,
        request: Request<pb::RecallRequest>,
    ) -> Result<Response<pb::RecallResponse>, Status> {
        let tenant = self.tenant(&request);
        let query = validate::recall(request.into_inner(), &self.limits)?;
        let result = self.index.search(&tenant, query).await?;
        Ok(Response::new(convert::recall_response(&result)))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let tenant = self.tenant(&request);
        let query = validate::get(request.into_inner(), &self.limits)?;
        let result = self.index.get(&tenant, query).await?;
        Ok(Response::new(convert::get_response(&result)))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let tenant = self.tenant(&request);
        let query = validate::list(request.into_inner(), &self.limits)?;
        let page = self.index.list(&tenant, query).await?;
        Ok(Response::new(convert::list_response(&page)))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateRequest>,
    ) -> Result<Response<pb::UpdateResponse>, Status> {
        let tenant = self.tenant(&request);
        let command = validate::update(request.into_inner(), &self.limits)?;
        let outcome = self.ingestion.update(&tenant, command).await?;
        Ok(Response::new(convert::update_response(&outcome)))
    }

    async fn forget(
        &self,
        request: Request<pb::ForgetRequest>,
    ) -> Result<Response<pb::ForgetResponse>, Status> {
        let tenant = self.tenant(&request);
        let target = validate::forget(request.into_inner(), &self.limits)?;
        let outcome = self.ingestion.forget(&tenant, target).await?;
        Ok(Response::new(convert::forget_response(&outcome)))
    }
}
