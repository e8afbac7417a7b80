//! The test sandbox: all four engram services started in the test process on port-0 listeners
//! over real gRPC, with a temporary data directory and the real local model (loaded once per
//! test process and shared by every sandbox).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use engram_cli::cluster::{
    ClusterAddrs, ClusterConfig, ClusterListeners, LocalCluster, ModelSource,
};
use engram_core::config::CommonArgs;
use engram_models::EmbeddingProvider;
use engram_proto::tonic::transport::Channel;
use engram_proto::v1::memory_service_client::MemoryServiceClient;
use tokio::sync::OnceCell;

pub use engram_proto::v1 as pb;

static MODEL: OnceCell<Arc<dyn EmbeddingProvider>> = OnceCell::const_new();

/// The local model, loaded (and fetched if missing) once per test process.
pub async fn shared_model() -> Arc<dyn EmbeddingProvider> {
    MODEL
        .get_or_init(|| async {
            let dir = engram_embedding::Config::for_test().model_dir;
            let model: Arc<dyn EmbeddingProvider> = engram_embedding::load_local_model(dir)
                .await
                .unwrap_or_else(|e| panic!("the local model is needed by the tests: {e}"));
            model
        })
        .await
        .clone()
}

pub struct Sandbox {
    pub addrs: ClusterAddrs,
    cluster: Option<LocalCluster>,
    data_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl Sandbox {
    /// A cluster on a fresh temporary data directory.
    pub async fn start() -> Self {
        let temp = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary directory: {e}"));
        let mut sandbox = Self::start_in(temp.path()).await;
        sandbox._temp = Some(temp);
        sandbox
    }

    /// A cluster on `data_dir`, which outlives it (to test restarts).
    pub async fn start_in(data_dir: &Path) -> Self {
        Self::start_with(data_dir, CommonArgs::for_test()).await
    }

    pub async fn start_with(data_dir: &Path, common: CommonArgs) -> Self {
        let listeners = ClusterListeners::ephemeral()
            .await
            .unwrap_or_else(|e| panic!("binding listeners: {e}"));
        let config = ClusterConfig {
            data_dir: data_dir.to_path_buf(),
            model: ModelSource::Provider(shared_model().await),
            dimension: engram_models::LOCAL_DIMENSION,
            common,
        };
        let mut cluster = LocalCluster::start(config, listeners)
            .unwrap_or_else(|e| panic!("starting the cluster: {e}"));
        cluster
            .wait_ready(Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("cluster not ready: {e}"));
        Self {
            addrs: cluster.addrs,
            cluster: Some(cluster),
            data_dir: data_dir.to_path_buf(),
            _temp: None,
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A client of the gateway's public API.
    pub async fn client(&self) -> MemoryServiceClient<Channel> {
        MemoryServiceClient::connect(format!("http://{}", self.addrs.gateway))
            .await
            .unwrap_or_else(|e| panic!("connecting to the gateway: {e}"))
    }

    /// Drain and stop every service, asserting they all stopped cleanly.
    pub async fn stop(mut self) {
        if let Some(cluster) = self.cluster.take() {
            cluster
                .shutdown()
                .await
                .unwrap_or_else(|e| panic!("cluster did not stop cleanly: {e}"));
        }
    }
}
