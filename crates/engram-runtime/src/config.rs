//! Settings every service shares, and start-up checks that name the variable at fault.

use std::time::Duration;

use engram_domain::privacy::{PrivacyMode, PrivacyPolicy};
use engram_domain::{ClusterSecret, Error, Limits, Result};

use engram_domain::parse_duration;

pub use engram_domain::settings::{defaults, env};

/// Settings shared by every service. Each binary (and `engram up`, once for all four services)
/// flattens these into its command line; every field has a flag and an `ENGRAM_*` variable.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    #[command(flatten)]
    pub limits: Limits,
    /// How long a stopping service waits for in-flight requests before it exits anyway.
    #[arg(long, env = "ENGRAM_DRAIN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub drain_grace: Duration,
    /// Timeout of a call from one engram service to another.
    #[arg(long, env = "ENGRAM_INTERNAL_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub internal_timeout: Duration,
    /// How often a peer URL naming a host (a Kubernetes headless Service) is resolved again to
    /// find the replicas behind it.
    #[arg(long, env = "ENGRAM_DISCOVERY_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub discovery_interval: Duration,
    /// Redis for caches (and the write log), e.g. `redis://127.0.0.1:6379/0`. Unset: caches
    /// are in-process only. `engram up` starts its own Redis when this is unset.
    /// A password in it (`rediss://:PASSWORD@host:6380/0`) is never printed.
    #[arg(long, env = engram_domain::settings::env::REDIS_URL, hide_env_values = true)]
    pub redis_url: Option<engram_domain::SecretUrl>,
    /// Dimension of the embedding model's vectors. The index is created for it and refuses
    /// others; the embedding service checks every provider answer against it.
    #[arg(long, env = "ENGRAM_VECTOR_DIMENSION", default_value_t = 384)]
    pub vector_dimension: usize,
    #[command(flatten)]
    pub privacy: PrivacyArgs,
    /// How long a session's recent turns stay cached in Redis after its last turn (the index
    /// holds them for good).
    #[arg(long, env = "ENGRAM_HISTORY_TTL", default_value = "24h", value_parser = parse_duration)]
    pub history_ttl: Duration,
    /// The secret every service of the cluster shares, at least 32 characters (`openssl rand
    /// -hex 32`): internal calls carry a credential derived from it and the internal ports
    /// refuse calls without it; the gateway signs write tokens with another key derived from
    /// it. Every service binary needs it (set the variable rather than the flag, which `ps`
    /// shows); `engram up` makes one and keeps it in its data directory. Never printed.
    #[arg(long, env = env::CLUSTER_SECRET, hide_env_values = true)]
    pub cluster_secret: Option<ClusterSecret>,
}

impl CommonArgs {
    /// Defaults for tests, without reading flags or the environment.
    pub fn for_test() -> Self {
        Self {
            limits: Limits::default(),
            drain_grace: Duration::from_secs(5),
            internal_timeout: Duration::from_secs(30),
            discovery_interval: Duration::from_secs(5),
            redis_url: None,
            vector_dimension: 384,
            privacy: PrivacyArgs::default(),
            history_ttl: Duration::from_secs(24 * 3600),
            cluster_secret: Some(new_cluster_secret()),
        }
    }

    /// What a service binary needs beyond [`Self::check`]: the cluster secret. (`engram up`
    /// and tests run the services in one process and make their own.)
    pub fn check_service(&self) -> Result<()> {
        self.check()?;
        if self.cluster_secret.is_none() {
            return Err(Error::invalid(
                env::CLUSTER_SECRET,
                "not set: every service of a cluster needs the same secret of at least 32 characters (`openssl rand -hex 32` makes one); see the README's Security section",
            ));
        }
        Ok(())
    }

    pub fn check(&self) -> Result<()> {
        self.limits.check()?;
        if let Some(secret) = &self.cluster_secret {
            secret
                .validate()
                .map_err(|why| Error::invalid(env::CLUSTER_SECRET, why))?;
        }
        if self.internal_timeout.is_zero() {
            return Err(Error::invalid(
                "ENGRAM_INTERNAL_TIMEOUT",
                "must be greater than zero",
            ));
        }
        self.privacy.policy()?;
        if self.discovery_interval.is_zero() {
            return Err(Error::invalid(
                "ENGRAM_DISCOVERY_INTERVAL",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

/// A new random cluster secret (256 bits, hex).
pub fn new_cluster_secret() -> ClusterSecret {
    let bytes: [u8; 32] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    match hex.parse::<ClusterSecret>() {
        Ok(secret) => secret,
        Err(never) => match never {},
    }
}

/// The privacy settings every service reads (flattened into `CommonArgs`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PrivacyArgs {
    /// Privacy mode of tenants not listed in ENGRAM_TENANT_PRIVACY: `off`, `redact` (personal
    /// data and secrets replaced by placeholders like `[EMAIL]` before storage or a model
    /// sees them) or `block` (writes containing them refused).
    #[arg(long = "privacy-mode", env = "ENGRAM_PRIVACY_MODE", default_value = "off", value_parser = parse_privacy_mode)]
    pub privacy_mode: PrivacyMode,
    /// Privacy modes by tenant, e.g. `acme=redact,bank=block`.
    #[arg(
        long = "tenant-privacy",
        env = "ENGRAM_TENANT_PRIVACY",
        default_value = ""
    )]
    pub tenant_privacy: String,
}

impl PrivacyArgs {
    pub fn policy(&self) -> Result<PrivacyPolicy> {
        PrivacyPolicy::parse(self.privacy_mode, &self.tenant_privacy)
    }
}

fn parse_privacy_mode(value: &str) -> std::result::Result<PrivacyMode, String> {
    PrivacyMode::parse(value)
        .ok_or_else(|| format!("{value:?} is not a privacy mode (off, redact, block)"))
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM, whichever comes first.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("received SIGINT"),
        () = terminate => tracing::info!("received SIGTERM"),
    }
}

/// Declare a service's listen addresses as a `clap::Args` struct: `--<service>-listen` /
/// `ENGRAM_<SERVICE>_LISTEN` for gRPC and `--<service>-admin-listen` /
/// `ENGRAM_<SERVICE>_ADMIN_LISTEN` for the admin HTTP port, with the documented default ports.
/// The same struct is flattened into the service's own binary and into `engram up`.
#[macro_export]
macro_rules! listen_args {
    ($name:ident, $service:literal, $env:literal, $grpc_port:literal, $admin_port:literal) => {
        #[derive(Debug, Clone, clap::Args)]
        #[group(id = concat!($service, "-addresses"))]
        pub struct $name {
            #[doc = concat!("gRPC address of the ", $service, " service.")]
            #[arg(
                id = concat!($service, "-listen"),
                long = concat!($service, "-listen"),
                env = concat!("ENGRAM_", $env, "_LISTEN"),
                default_value = concat!("127.0.0.1:", $grpc_port)
            )]
            pub listen: std::net::SocketAddr,
            #[doc = concat!("Admin HTTP address (/healthz, /readyz, /metrics) of the ", $service, " service.")]
            #[arg(
                id = concat!($service, "-admin-listen"),
                long = concat!($service, "-admin-listen"),
                env = concat!("ENGRAM_", $env, "_ADMIN_LISTEN"),
                default_value = concat!("127.0.0.1:", $admin_port)
            )]
            pub admin_listen: std::net::SocketAddr,
        }

        impl $crate::server::ListenAddrs for $name {
            fn addrs(&self) -> (std::net::SocketAddr, std::net::SocketAddr) {
                (self.listen, self.admin_listen)
            }
        }
    };
}

/// Where the embedding service is (for the services that call it).
#[derive(Debug, Clone, clap::Args)]
pub struct EmbeddingUrl {
    /// URL of the embedding service: one `http://host:port`, or several separated by commas;
    /// a host name is re-resolved to find every replica.
    #[arg(
        long = "embedding-url",
        env = engram_domain::settings::env::EMBEDDING_URL,
        default_value = "http://127.0.0.1:50054"
    )]
    pub embedding_url: String,
}

/// Where the retrieval service is (for the services that call it).
#[derive(Debug, Clone, clap::Args)]
pub struct RetrievalUrl {
    /// URL of the retrieval service: one `http://host:port`, or several separated by commas;
    /// a host name is re-resolved to find every replica.
    #[arg(
        long = "retrieval-url",
        env = engram_domain::settings::env::RETRIEVAL_URL,
        default_value = "http://127.0.0.1:50052"
    )]
    pub retrieval_url: String,
}

/// Where the ingestion service is (for the gateway).
#[derive(Debug, Clone, clap::Args)]
pub struct IngestionUrl {
    /// URL of the ingestion service: one `http://host:port`, or several separated by commas;
    /// a host name is re-resolved to find every replica.
    #[arg(
        long = "ingestion-url",
        env = engram_domain::settings::env::INGESTION_URL,
        default_value = "http://127.0.0.1:50053"
    )]
    pub ingestion_url: String,
}
