//! All four services in one process: what `engram up` runs and what the test sandbox starts.
//!
//! The caller binds every listener first (so a taken port fails before anything starts and
//! tests can use port 0), then [`LocalCluster::start`] wires the services to each other's
//! bound addresses and runs them until [`LocalCluster::shutdown`], which drains them callers
//! first — gateway, ingestion, retrieval, embedding — so a request in flight never finds the
//! service it calls already gone.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use engram_domain::{Error, Result};
use engram_models::EmbeddingProvider;
use engram_runtime::config::CommonArgs;
use engram_runtime::server::Listeners;
use futures::future::select_all;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The listeners of the four services.
#[derive(Debug)]
pub struct ClusterListeners {
    pub gateway: Listeners,
    pub retrieval: Listeners,
    pub ingestion: Listeners,
    pub embedding: Listeners,
}

impl ClusterListeners {
    /// Every service on free loopback ports.
    pub async fn ephemeral() -> Result<Self> {
        Ok(Self {
            gateway: Listeners::ephemeral().await?,
            retrieval: Listeners::ephemeral().await?,
            ingestion: Listeners::ephemeral().await?,
            embedding: Listeners::ephemeral().await?,
        })
    }
}

#[derive(Clone)]
pub struct ClusterConfig {
    /// The retrieval service's settings, among them the data directory.
    pub retrieval: engram_retrieval::RetrievalArgs,
    /// The embedding service's settings (its `common` is replaced by [`Self::common`]).
    pub embedding: engram_embedding::Config,
    /// An already built provider to use instead of building one from `embedding.provider`
    /// (tests share one loaded model, or point at a fake provider).
    pub provider: Option<Arc<dyn EmbeddingProvider>>,
    /// The ingestion service's write log settings.
    pub write_log: engram_ingestion::LogArgs,
    /// How the gateway admits calls: authentication, limits, deadlines.
    pub edge: engram_gateway::EdgeArgs,
    /// The chat model (Converse in the gateway, fact extraction in ingestion).
    pub chat: engram_models::ChatModelArgs,
    pub common: CommonArgs,
}

/// Addresses a running cluster serves on.
#[derive(Debug, Clone, Copy)]
pub struct ClusterAddrs {
    pub gateway: SocketAddr,
    pub retrieval: SocketAddr,
    pub ingestion: SocketAddr,
    pub embedding: SocketAddr,
    pub gateway_admin: Option<SocketAddr>,
    pub retrieval_admin: Option<SocketAddr>,
    pub ingestion_admin: Option<SocketAddr>,
    pub embedding_admin: Option<SocketAddr>,
}

pub struct LocalCluster {
    pub addrs: ClusterAddrs,
    /// In shutdown order: every service's callers come before it.
    services: Vec<RunningService>,
}

struct RunningService {
    name: &'static str,
    stop: CancellationToken,
    task: JoinHandle<Result<()>>,
}

impl RunningService {
    fn spawn<F>(name: &'static str, serve: impl FnOnce(CancellationToken) -> F) -> Self
    where
        F: Future<Output = Result<()>> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(stop.clone()));
        Self { name, stop, task }
    }
}

fn joined(
    name: &str,
    joined: std::result::Result<Result<()>, tokio::task::JoinError>,
) -> Result<()> {
    match joined {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::unavailable(format!(
            "the {name} service failed: {e}"
        ))),
        Err(e) => Err(Error::internal(format!(
            "the {name} service task failed: {e}"
        ))),
    }
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

impl LocalCluster {
    /// Start the four services; they serve until [`Self::shutdown`].
    pub fn start(config: ClusterConfig, listeners: ClusterListeners) -> Result<Self> {
        let addrs = ClusterAddrs {
            gateway: listeners.gateway.grpc_addr()?,
            retrieval: listeners.retrieval.grpc_addr()?,
            ingestion: listeners.ingestion.grpc_addr()?,
            embedding: listeners.embedding.grpc_addr()?,
            gateway_admin: listeners.gateway.admin_addr(),
            retrieval_admin: listeners.retrieval.admin_addr(),
            ingestion_admin: listeners.ingestion.admin_addr(),
            embedding_admin: listeners.embedding.admin_addr(),
        };
        let common = config.common;
        let embedding_config = engram_embedding::Config {
            common: common.clone(),
            ..config.embedding
        };
        let embedding = RunningService::spawn(engram_embedding::SERVICE_NAME, |stop| {
            let listeners = listeners.embedding;
            let provider = config.provider;
            async move {
                let stop = stop.cancelled_owned();
                match provider {
                    None => engram_embedding::serve(embedding_config, listeners, stop).await,
                    Some(provider) => {
                        engram_embedding::serve_with_provider(
                            provider,
                            embedding_config,
                            listeners,
                            stop,
                        )
                        .await
                    }
                }
            }
        });

        let retrieval_config =
            engram_retrieval::Config::new(config.retrieval, url(addrs.embedding), common.clone());
        let retrieval = RunningService::spawn(engram_retrieval::SERVICE_NAME, |stop| {
            engram_retrieval::serve(
                retrieval_config,
                listeners.retrieval,
                stop.cancelled_owned(),
            )
        });

        let ingestion_config = engram_ingestion::Config {
            embedding_url: url(addrs.embedding),
            retrieval_url: url(addrs.retrieval),
            log: config.write_log.clone(),
            chat: config.chat.clone(),
            common: common.clone(),
        };
        let ingestion = RunningService::spawn(engram_ingestion::SERVICE_NAME, |stop| {
            engram_ingestion::serve(
                ingestion_config,
                listeners.ingestion,
                stop.cancelled_owned(),
            )
        });

        let gateway_config = engram_gateway::Config {
            retrieval_url: url(addrs.retrieval),
            ingestion_url: url(addrs.ingestion),
            edge: config.edge,
            chat: config.chat,
            common,
        };
        let gateway = RunningService::spawn(engram_gateway::SERVICE_NAME, |stop| {
            engram_gateway::serve(gateway_config, listeners.gateway, stop.cancelled_owned())
        });

        Ok(Self {
            addrs,
            services: vec![gateway, ingestion, retrieval, embedding],
        })
    }

    /// Wait until every service reports SERVING on its gRPC health service, or one of them
    /// fails, or `timeout` passes.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let addrs = [
            ("embedding", self.addrs.embedding),
            ("retrieval", self.addrs.retrieval),
            ("ingestion", self.addrs.ingestion),
            ("gateway", self.addrs.gateway),
        ];
        let all_serving = async {
            for (name, addr) in addrs {
                wait_serving(name, addr).await?;
            }
            Ok::<(), Error>(())
        };
        tokio::select! {
            result = tokio::time::timeout(timeout, all_serving) => match result {
                Ok(result) => result,
                Err(_) => Err(Error::DeadlineExceeded(format!("the cluster was not ready within {timeout:?}"))),
            },
            stopped = Self::first_stopped(&mut self.services) => Err(match stopped {
                Err(e) => e,
                Ok(name) => Error::unavailable(format!("the {name} service stopped while starting")),
            }),
        }
    }

    /// Resolves when any service stops on its own (an error, since only shutdown stops them).
    pub async fn stopped(&mut self) -> Result<()> {
        Err(match Self::first_stopped(&mut self.services).await {
            Err(e) => e,
            Ok(name) => Error::unavailable(format!("the {name} service stopped")),
        })
    }

    /// The first service to stop (removed from `services`, so shutdown does not wait on it
    /// again): its name if it stopped cleanly, else its error.
    async fn first_stopped(services: &mut Vec<RunningService>) -> Result<&'static str> {
        if services.is_empty() {
            return std::future::pending().await;
        }
        let (result, index, _) = select_all(services.iter_mut().map(|s| &mut s.task)).await;
        let name = services.remove(index).name;
        joined(name, result).map(|()| name)
    }

    /// Drain and stop every service, callers before the services they call; returns the first
    /// error any of them reported.
    pub async fn shutdown(self) -> Result<()> {
        let mut first_error = None;
        for service in self.services {
            service.stop.cancel();
            if let Err(e) = joined(service.name, service.task.await) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

async fn wait_serving(name: &str, addr: SocketAddr) -> Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    loop {
        let channel = engram_proto::tonic::transport::Endpoint::from_shared(url(addr))
            .map_err(|e| Error::invalid(name, format!("{addr}: {e}")))?
            .timeout(Duration::from_secs(2))
            .connect_lazy();
        let status = HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await;
        if let Ok(response) = status
            && response.into_inner().status() == ServingStatus::Serving
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The cluster secret kept in the data directory (readable by its owner only), made on the
/// first start: write tokens stay valid across restarts.
pub fn stored_secret(dir: &Path) -> Result<engram_domain::ClusterSecret> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join("cluster.secret");
    let unusable = |e: String| {
        Error::invalid(
            engram_domain::settings::env::CLUSTER_SECRET,
            format!("{}: {e}", path.display()),
        )
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let secret: engram_domain::ClusterSecret = match text.parse() {
                Ok(secret) => secret,
                Err(never) => match never {},
            };
            secret.validate().map_err(|why| {
                unusable(format!("{why}; delete the file to have a new one made"))
            })?;
            return Ok(secret);
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(unusable(e.to_string()));
        }
        Err(_) => {}
    }
    // Written whole under another name, then renamed: a crash leaves no partial secret.
    let secret = engram_runtime::config::new_cluster_secret();
    let partial = dir.join("cluster.secret.partial");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .map_err(|e| unusable(e.to_string()))?;
    file.write_all(secret.expose().as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&partial, &path))
        .map_err(|e| unusable(e.to_string()))?;
    Ok(secret)
}
