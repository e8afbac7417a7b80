//! The ingestion service: the write path.
//!
//! A Remember passes through the gRPC adapter (`engram_runtime::rpc::ingestion_server`, which
//! validates and bounds it), then [`remember`]: the privacy [`guard`], content hashes,
//! de-duplication ([`dedup`]: writes already stored in the scope, by content or idempotency
//! key, come back as DUPLICATE with the existing id), time-ordered ids; then the write log
//! ([`logged`]), which acknowledges at once, or without Redis the [`direct`] path, which
//! embeds and applies first. The [`worker`]s index what the log holds, in order, with
//! [`index`] (embedding turns with the turn before them, [`turns`]); [`extract`] turns new
//! memories into facts off the acknowledgement path. Update and Forget take the same road
//! ([`changes`]). Settings are in [`config`], the wiring in [`pipeline`].

mod changes;
pub mod config;
mod dedup;
mod direct;
pub mod extract;
mod guard;
mod index;
mod logged;
pub mod pipeline;
mod remember;
mod turns;
pub mod worker;

pub use config::{Config, IngestionArgs, IngestionPeers, Listen, LogArgs};
pub use engram_domain::api::LogKind;
pub use pipeline::{EXTRACTION_LOG, Logs, Pipeline};
pub use worker::Workers;

use std::sync::Arc;

use async_trait::async_trait;
use engram_domain::Result;
use engram_domain::api::{
    ForgetOutcome, ForgetTarget, Ingestion, RememberBatch, RememberOutcome, UpdateCommand,
    UpdateOutcome, WriteState, WriteToken,
};
use engram_domain::model::TenantId;
use engram_proto::tonic::service::Routes;
use engram_runtime::rpc;
use engram_runtime::server::{Listeners, ServiceRuntime};
use engram_telemetry::Metrics;
use engram_writelog::WriteLog;

pub const SERVICE_NAME: &str = "ingestion";

pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let runtime = ServiceRuntime::start(SERVICE_NAME, listeners.admin);
    let pipeline = Arc::new(Pipeline::from_config(&config, runtime.metrics())?);
    let workers = match config.log.workers {
        true => pipeline.workers(&config),
        false => None,
    };
    let routes = Routes::new(rpc::ingestion_server(
        pipeline,
        config.common.limits.clone(),
    ));
    let served = runtime
        .serve(
            routes,
            &[engram_proto::internal::v1::ingestion_server::SERVICE_NAME],
            listeners.grpc,
            &config.common,
            shutdown,
        )
        .await;
    if let Some(workers) = workers {
        workers.stop().await;
    }
    served
}

/// Indexing workers for `config` with their own connections: what `serve` starts unless
/// `ENGRAM_LOG_WORKERS=false`, for a process that only indexes (and for tests that crash them).
/// `None` without Redis, when there is no log to index from.
pub fn start_workers(config: &Config, metrics: &Metrics) -> Result<Option<Workers>> {
    Ok(Arc::new(Pipeline::from_config(config, metrics)?).workers(config))
}

/// Drop every partition lease of the write and extraction logs on the Redis at `url`: see
/// [`WriteLog::break_leases`]; only for a Redis no other live process uses.
pub async fn break_stale_leases(url: &engram_domain::SecretUrl, partitions: u32) -> Result<()> {
    let log = WriteLog::connect(engram_domain::settings::env::REDIS_URL, url, partitions)?;
    log.break_leases().await?;
    log.with_prefix(EXTRACTION_LOG).break_leases().await
}

#[async_trait]
impl Ingestion for Pipeline {
    async fn submit(&self, tenant: &TenantId, batch: RememberBatch) -> Result<RememberOutcome> {
        self.remember(tenant, batch).await
    }

    async fn update(&self, tenant: &TenantId, command: UpdateCommand) -> Result<UpdateOutcome> {
        self.update_memory(tenant, command).await
    }

    async fn forget(&self, tenant: &TenantId, target: ForgetTarget) -> Result<ForgetOutcome> {
        self.forget_memories(tenant, target).await
    }

    async fn status(&self, token: WriteToken) -> Result<WriteState> {
        match (&self.logs, token) {
            (_, WriteToken::Indexed) => Ok(WriteState::Indexed),
            (Some(logs), token) => logs.write.status(token).await,
            (None, _) => Err(engram_domain::Error::FailedPrecondition(
                "this ingestion service has no write log (ENGRAM_REDIS_URL is not set)".into(),
            )),
        }
    }
}
