//! `engram up`: the whole cluster in one process, for local development.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use engram_cli::cluster::{ClusterConfig, ClusterListeners, LocalCluster};
use engram_cli::redis::{Persistence, RedisProcess};
use engram_domain::{Error, Result};
use engram_models::fetch;
use engram_runtime::config::{CommonArgs, shutdown_signal};
use engram_runtime::server::ListenAddrs as _;
use engram_telemetry::LogConfig;

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    #[command(flatten)]
    retrieval: engram_retrieval::RetrievalArgs,
    #[command(flatten)]
    embedding: engram_embedding::EmbeddingArgs,
    #[command(flatten)]
    write_log: engram_ingestion::LogArgs,
    #[command(flatten)]
    edge: engram_gateway::EdgeArgs,
    #[command(flatten)]
    chat: engram_models::ChatModelArgs,
    #[command(flatten)]
    gateway_listen: engram_gateway::Listen,
    #[command(flatten)]
    retrieval_listen: engram_retrieval::Listen,
    #[command(flatten)]
    ingestion_listen: engram_ingestion::Listen,
    #[command(flatten)]
    embedding_listen: engram_embedding::Listen,
    #[command(flatten)]
    mcp: crate::mcp::McpListen,
    /// Port of the local Redis that `engram up` starts when ENGRAM_REDIS_URL is not set.
    #[arg(long = "redis-port", env = "ENGRAM_REDIS_PORT", default_value_t = 6380)]
    redis_port: u16,
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    log: LogConfig,
}

pub async fn run(args: UpArgs) -> ExitCode {
    let UpArgs { log, common, .. } = &args;
    let log = log.clone();
    let common = common.clone();
    engram_runtime::server::run_main("engram", &log, common, |common| start(args, common)).await
}

async fn start(args: UpArgs, mut common: CommonArgs) -> Result<()> {
    let started = Instant::now();
    let edge = args.edge.clone().off_unless_configured();
    let auth_off = edge.auth == Some(engram_gateway::AuthMode::Off);
    let data_dir = args.retrieval.data_dir.clone();
    let embedding = engram_embedding::Config::from_args(args.embedding.clone(), common.clone());
    if let Some(dir) = embedding.model_dir() {
        ensure_model(dir.clone()).await?;
    }
    std::fs::create_dir_all(&data_dir).map_err(|e| {
        Error::invalid(
            engram_domain::settings::env::DATA_DIR,
            format!("cannot create {}: {e}", data_dir.display()),
        )
    })?;
    // Before anything touches the directory's Redis or index.
    let _lock = lock_data_dir(&data_dir)?;
    if common.cluster_secret.is_none() {
        common.cluster_secret = Some(engram_cli::cluster::stored_secret(&data_dir)?);
    }
    let mut redis = match &common.redis_url {
        Some(_) => None,
        None => {
            let redis = RedisProcess::start(
                &data_dir.join("redis"),
                Some(args.redis_port),
                Persistence::AppendOnly,
            )
            .await?;
            // This Redis is ours alone: partition leases in it are a killed predecessor's, and
            // its acknowledged writes are indexed now rather than once those leases expire.
            let url = redis.url().into();
            engram_ingestion::break_stale_leases(&url, args.write_log.partitions).await?;
            common.redis_url = Some(url);
            Some(redis)
        }
    };
    let listeners = ClusterListeners {
        gateway: args.gateway_listen.bind().await?,
        retrieval: args.retrieval_listen.bind().await?,
        ingestion: args.ingestion_listen.bind().await?,
        embedding: args.embedding_listen.bind().await?,
    };
    let mcp = match args.mcp.mcp_listen {
        Some(addr) if auth_off && !addr.ip().is_loopback() => {
            return Err(Error::invalid(
                "ENGRAM_MCP_LISTEN",
                format!(
                    "{addr} is beyond loopback while authentication is off: anyone who reaches \
                     it could read and forget every memory; configure API keys \
                     (ENGRAM_API_KEYS_FILE) or listen on 127.0.0.1"
                ),
            ));
        }
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            Error::invalid("ENGRAM_MCP_LISTEN", format!("cannot listen on {addr}: {e}"))
        })?),
        None => None,
    };
    let config = ClusterConfig {
        retrieval: args.retrieval.clone(),
        embedding,
        provider: None,
        write_log: args.write_log.clone(),
        edge: edge.clone(),
        chat: args.chat.clone(),
        common: common.clone(),
    };
    let model_dir = config.embedding.model_dir().cloned();
    let mut cluster = LocalCluster::start(config, listeners)?;
    let mcp_stop = tokio_util::sync::CancellationToken::new();
    let mcp = match mcp {
        Some(listener) => {
            let addr = listener.local_addr().ok();
            let tools = args.mcp.tools(cluster.addrs.gateway);
            let stop = mcp_stop.clone();
            let task = tokio::spawn(async move {
                crate::mcp::serve_http(&tools, listener, async move { stop.cancelled().await })
                    .await
            });
            Some((addr, task))
        }
        None => None,
    };
    let paths = Paths {
        data: data_dir.clone(),
        model: model_dir,
        mcp: mcp.as_ref().and_then(|(addr, _)| *addr),
    };
    let outcome = serve_until_stopped(&mut cluster, &common, &paths, started, auth_off).await;
    mcp_stop.cancel();
    if let Some((_, mut task)) = mcp {
        // Calls in flight get a moment to finish; a stuck connection does not hold the exit.
        match tokio::time::timeout(crate::mcp::DRAIN, &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("engram: {e}"),
            Ok(Err(e)) => eprintln!("engram: the MCP server failed: {e}"),
            Err(_) => task.abort(),
        }
    }
    let stopped = cluster.shutdown().await;
    if let Some(redis) = &mut redis {
        redis.stop().await;
    }
    outcome?;
    stopped?;
    eprintln!("engram: stopped cleanly");
    Ok(())
}

/// Hold `dir` for this process (released when it exits, however it exits): a second
/// `engram up` on the same directory would take its Redis over and share its index.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join("engram.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| {
            Error::invalid(
                engram_domain::settings::env::DATA_DIR,
                format!("cannot create {}: {e}", path.display()),
            )
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::FailedPrecondition(format!(
            "another engram up serves {} (it holds {}); stop it first, or give this one another --data-dir",
            dir.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::invalid(
            engram_domain::settings::env::DATA_DIR,
            format!("cannot lock {}: {e}", path.display()),
        )),
    }
}

/// The directories the cluster uses, absolute (the banner shows them).
struct Paths {
    data: PathBuf,
    model: Option<PathBuf>,
    /// The MCP server's address, when it runs.
    mcp: Option<std::net::SocketAddr>,
}

/// Serve until Ctrl-C/SIGTERM (`Ok`) or until a service fails (`Err`).
async fn serve_until_stopped(
    cluster: &mut LocalCluster,
    common: &CommonArgs,
    paths: &Paths,
    started: Instant,
    auth_off: bool,
) -> Result<()> {
    tokio::select! {
        ready = cluster.wait_ready(Duration::from_secs(120)) => ready?,
        () = shutdown_signal() => return Ok(()),
    }
    print_banner(cluster, common, paths, started.elapsed(), auth_off);
    tokio::select! {
        () = shutdown_signal() => {
            eprintln!("engram: stopping (draining in-flight requests)…");
            Ok(())
        }
        failed = cluster.stopped() => failed,
    }
}

async fn ensure_model(dir: PathBuf) -> Result<()> {
    tokio::task::spawn_blocking(move || fetch::ensure_model(&dir))
        .await
        .map_err(|e| Error::internal(format!("model fetch task failed: {e}")))?
        .map_err(Error::from)
}

fn print_banner(
    cluster: &LocalCluster,
    common: &CommonArgs,
    paths: &Paths,
    took: Duration,
    auth_off: bool,
) {
    let a = cluster.addrs;
    let admin = |addr: Option<std::net::SocketAddr>| {
        addr.map_or_else(|| "-".to_string(), |a| format!("http://{a}"))
    };
    eprintln!();
    eprintln!("engram is up in {:.1}s", took.as_secs_f64());
    if auth_off {
        eprintln!("  !! AUTHENTICATION IS OFF: every caller is tenant `default` with every right.");
        eprintln!(
            "  !! For anything beyond this machine set ENGRAM_API_KEYS_FILE (see `engram keys new`)."
        );
    } else {
        eprintln!("  authentication on: every call needs `authorization: Bearer <API key>`");
    }
    eprintln!(
        "  {:<10} {:<22} admin (/healthz /readyz /metrics)",
        "service", "gRPC"
    );
    eprintln!(
        "  {:<10} {:<22} {}",
        "gateway",
        a.gateway,
        admin(a.gateway_admin)
    );
    eprintln!(
        "  {:<10} {:<22} {}",
        "retrieval",
        a.retrieval,
        admin(a.retrieval_admin)
    );
    eprintln!(
        "  {:<10} {:<22} {}",
        "ingestion",
        a.ingestion,
        admin(a.ingestion_admin)
    );
    eprintln!(
        "  {:<10} {:<22} {}",
        "embedding",
        a.embedding,
        admin(a.embedding_admin)
    );
    if let Some(mcp) = paths.mcp {
        eprintln!("  {:<10} http://{mcp}/mcp (MCP, streamable HTTP)", "mcp");
    }
    eprintln!("  data   {}", paths.data.display());
    if let Some(model) = &paths.model {
        eprintln!("  model  {}", model.display());
    }
    match &common.redis_url {
        Some(url) => eprintln!("  redis  {url}"),
        None => eprintln!("  redis  -"),
    }
    eprintln!();
    eprintln!("try: engram remember --user alice \"I adopted a cat named Miso\"");
    eprintln!("     engram recall --user alice \"what pet do I have\"");
    eprintln!("Ctrl-C stops the cluster.");
}
