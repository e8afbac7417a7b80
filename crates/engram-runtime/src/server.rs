//! How every engram service runs: bound listeners in, gRPC (with health, reflection and the
//! metrics layer) and the admin HTTP port out, until a shutdown signal, then a drain.
//!
//! Server-side layers, outermost first: metrics → the trace span (continuing the caller's trace)
//! → the caller's deadline ([`crate::deadline`]) → the service. (The gateway adds its edge —
//! authentication, rate limits, load shedding — around its own service.)

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use engram_proto::tonic::service::Routes;
use engram_proto::tonic::transport::Server;
use engram_proto::tonic::transport::server::TcpIncoming;
use engram_telemetry::{CallerTraces, GrpcMetricsLayer, Health, Metrics, TraceLayer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
pub use tokio_util::task::TaskTracker;
use tonic_health::ServingStatus;

use engram_domain::error::{Error, Result};

/// The sockets a service serves on, bound before the service starts so that a port conflict
/// is reported at once and tests can bind port 0 and learn the port.
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    /// `None` disables the admin HTTP server.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Bind both addresses; errors name the address that could not be bound.
    pub async fn bind(grpc: SocketAddr, admin: Option<SocketAddr>) -> Result<Self> {
        let grpc = bind(grpc).await?;
        let admin = match admin {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        Ok(Self { grpc, admin })
    }

    /// Both on free loopback ports.
    pub async fn ephemeral() -> Result<Self> {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::bind(loopback, Some(loopback)).await
    }

    pub fn grpc_addr(&self) -> Result<SocketAddr> {
        self.grpc.local_addr().map_err(Error::internal)
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::unavailable(format!("cannot listen on {addr}: {e}")))
}

/// One running service's shared parts: its readiness and metrics, and its admin server.
#[derive(Debug)]
pub struct ServiceRuntime {
    name: &'static str,
    health: Health,
    metrics: Metrics,
    admin_stop: Option<oneshot::Sender<()>>,
    admin_task: Option<tokio::task::JoinHandle<()>>,
    /// Work a request starts and does not wait for (a Converse answer streaming, the
    /// remembering of a turn): [`Self::serve`] waits for it before it returns, within the same
    /// drain grace as the requests.
    tasks: TaskTracker,
    /// Whether the served calls continue their callers' traces (see [`Self::link_caller_traces`]).
    caller_traces: CallerTraces,
}

impl ServiceRuntime {
    /// Start the admin server (if a listener is given) reporting "starting" until [`Self::serve`].
    pub fn start(name: &'static str, admin: Option<TcpListener>) -> Self {
        let health = Health::new();
        let metrics = Metrics::new();
        let (admin_stop, admin_task) = match admin {
            Some(listener) => {
                let (stop, stopped) = oneshot::channel::<()>();
                let (health, metrics) = (health.clone(), metrics.clone());
                let task = tokio::spawn(async move {
                    let shutdown = async move {
                        let _ = stopped.await;
                    };
                    if let Err(e) =
                        engram_telemetry::admin::serve(listener, health, metrics, shutdown).await
                    {
                        tracing::error!(service = name, error = %e, "admin server failed");
                    }
                });
                (Some(stop), Some(task))
            }
            None => (None, None),
        };
        Self {
            name,
            health,
            metrics,
            admin_stop,
            admin_task,
            tasks: TaskTracker::new(),
            caller_traces: CallerTraces::Continue,
        }
    }

    /// Serve calls from outside the cluster: each starts a trace of its own, sampled by this
    /// service's ratio and linked to the caller's, instead of continuing the caller's (and
    /// being sampled because the caller said so).
    pub fn link_caller_traces(&mut self) {
        self.caller_traces = CallerTraces::Link;
    }

    /// Where to spawn work that outlives its request; see the field.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// How this service reaches its peers, reporting into its metrics.
    pub fn peers(&self, common: &crate::config::CommonArgs) -> Result<crate::rpc::Peers> {
        crate::rpc::Peers::new(common, &self.metrics)
    }

    /// Serve `routes` (plus health and reflection) on `listener` until `shutdown` completes,
    /// then stop accepting, let in-flight requests finish for up to the drain grace, and stop
    /// the admin server. `services` names every gRPC service `routes` holds: the health service
    /// reports each, and reflection lists exactly these (with health and reflection itself). A
    /// port serving internal services refuses calls without the cluster's credential
    /// ([`crate::cluster_auth`]).
    pub async fn serve(
        mut self,
        routes: Routes,
        services: &[&'static str],
        listener: TcpListener,
        common: &crate::config::CommonArgs,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let drain_grace = common.drain_grace;
        let methods = methods(services)?;
        let cluster_auth = crate::cluster_auth::ClusterAuthLayer::new(if is_public(services) {
            None
        } else {
            common.cluster_secret.as_ref()
        });
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let (reflection_v1, reflection_v1alpha) = reflection(services)?;
        let routes = routes
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);

        // Mirror readiness into the gRPC health service for every name (and "" for the server).
        let mut readiness = self.health.subscribe();
        let names: Vec<&'static str> = std::iter::once("")
            .chain(services.iter().copied())
            .collect();
        let health_task = tokio::spawn(async move {
            loop {
                let status = if readiness.borrow_and_update().is_ok() {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                for name in &names {
                    reporter.set_service_status(*name, status).await;
                }
                if readiness.changed().await.is_err() {
                    break;
                }
            }
        });

        let local = listener.local_addr().ok();
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let (draining_tx, draining_rx) = oneshot::channel::<()>();
        let health = self.health.clone();
        let name = self.name;
        // When the drain grace ends: requests and background work share it.
        let drained_by = std::sync::Arc::new(std::sync::OnceLock::new());
        let signal = {
            let drained_by = std::sync::Arc::clone(&drained_by);
            async move {
                shutdown.await;
                tracing::info!(service = name, "shutting down: draining in-flight requests");
                let _ = drained_by.set(tokio::time::Instant::now() + drain_grace);
                health.set_not_ready("draining");
                let _ = draining_tx.send(());
            }
        };
        let server = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .layer(GrpcMetricsLayer::new(&self.metrics, methods.clone()))
            .layer(cluster_auth)
            .layer(TraceLayer::new(self.name, self.caller_traces, &methods))
            .layer(crate::deadline::DeadlineLayer)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, signal);

        self.health.set_ready();
        tracing::info!(service = self.name, addr = ?local, "serving gRPC");
        let grace_elapsed = async move {
            if draining_rx.await.is_ok() {
                tokio::time::sleep(drain_grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let result = tokio::select! {
            result = server => result.map_err(|e| Error::unavailable(format!("{} gRPC server failed: {e}", self.name))),
            () = grace_elapsed => {
                tracing::warn!(service = self.name, grace = ?drain_grace, "drain grace period elapsed with requests still in flight");
                Ok(())
            }
        };
        self.tasks.close();
        let deadline = drained_by
            .get()
            .copied()
            .unwrap_or_else(|| tokio::time::Instant::now() + drain_grace);
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                service = self.name,
                tasks = self.tasks.len(),
                "stopping with background work unfinished (drain grace elapsed)"
            );
        }
        self.health.set_not_ready("stopped");
        health_task.abort();
        self.stop_admin().await;
        result
    }

    async fn stop_admin(&mut self) {
        if let Some(stop) = self.admin_stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.admin_task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ServiceRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.admin_stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The reflection services (v1 and v1alpha) of a port serving `services`: they list those,
/// health and reflection, and answer for every file the listed services' files import, the
/// well-known types included, so a client without built-in copies can build every request.
fn reflection(
    services: &[&'static str],
) -> Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    // A public port's files say nothing of the internal API.
    let engram = if is_public(services) {
        engram_proto::PUBLIC_FILE_DESCRIPTOR_SET
    } else {
        engram_proto::FILE_DESCRIPTOR_SET
    };
    let builder = || {
        let builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(engram)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            );
        services
            .iter()
            .chain(&ALWAYS_SERVED)
            .fold(builder, |builder, name| builder.with_service_name(*name))
    };
    Ok((
        builder().build_v1().map_err(Error::internal)?,
        builder().build_v1alpha().map_err(Error::internal)?,
    ))
}

/// The (service, method) names of every method of `services` and of [`ALWAYS_SERVED`], read
/// from the descriptor sets reflection serves: the only labels the server's metrics use.
fn methods(services: &[&'static str]) -> Result<Vec<(String, String)>> {
    use engram_proto::prost::Message as _;
    let served: Vec<&str> = services.iter().chain(&ALWAYS_SERVED).copied().collect();
    let mut methods = Vec::new();
    for set in [
        engram_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ] {
        let set =
            engram_proto::prost_types::FileDescriptorSet::decode(set).map_err(Error::internal)?;
        for file in set.file {
            for service in &file.service {
                let name = format!("{}.{}", file.package(), service.name());
                if served.contains(&name.as_str()) {
                    methods.extend(
                        service
                            .method
                            .iter()
                            .map(|method| (name.clone(), method.name().to_string())),
                    );
                }
            }
        }
    }
    Ok(methods)
}

/// Whether a port serving `services` is the public one: it serves some, all of the public
/// API's package (`engram.v1`).
fn is_public(services: &[&str]) -> bool {
    !services.is_empty() && services.iter().all(|s| s.starts_with("engram.v1."))
}

/// What every port serves beside its own services.
const ALWAYS_SERVED: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// A service's gRPC and admin addresses (declared with [`crate::listen_args!`]).
pub trait ListenAddrs {
    fn addrs(&self) -> (SocketAddr, SocketAddr);

    /// Bind both; errors name the address that could not be bound.
    fn bind(&self) -> impl Future<Output = Result<Listeners>> + Send {
        let (grpc, admin) = self.addrs();
        Listeners::bind(grpc, Some(admin))
    }
}

/// A binary's own settings, checked beyond what parsing checks, without touching anything
/// outside the process (no files read, no connections): what `--check-config` runs.
pub trait CheckArgs {
    fn check(&self) -> Result<()> {
        Ok(())
    }
}

/// The command line of a service binary: its addresses, its own settings, the shared ones
/// and logging.
#[derive(Debug, clap::Parser)]
pub struct ServiceCli<L: clap::Args, A: clap::Args> {
    #[command(flatten)]
    pub listen: L,
    #[command(flatten)]
    pub args: A,
    #[command(flatten)]
    pub common: crate::config::CommonArgs,
    #[command(flatten)]
    pub log: engram_telemetry::LogConfig,
    /// Check the settings (flags and ENGRAM_* variables) and exit without serving: 0 if they
    /// are valid, 2 (with the reason) if not. Deployment checks run it with a ConfigMap's
    /// environment.
    #[arg(long = "check-config")]
    pub check_config: bool,
}

impl<L: clap::Args, A: clap::Args> ServiceCli<L, A> {
    pub fn command(name: &'static str, about: &'static str) -> clap::Command {
        <Self as clap::CommandFactory>::command()
            .name(name)
            .bin_name(name)
            .about(about)
            .version(env!("CARGO_PKG_VERSION"))
    }
}

/// `main` of a service binary: parse `ServiceCli<L, A>`, bind, and serve with `serve` until
/// SIGINT or SIGTERM; see [`run_main`] for exit codes.
pub async fn service_main<L, A, F, Fut>(
    name: &'static str,
    about: &'static str,
    serve: F,
) -> std::process::ExitCode
where
    L: clap::Args + ListenAddrs,
    A: clap::Args + CheckArgs,
    F: FnOnce(A, crate::config::CommonArgs, Listeners) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let matches = ServiceCli::<L, A>::command(name, about).get_matches();
    let cli = match <ServiceCli<L, A> as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let ServiceCli {
        listen,
        args,
        common,
        log,
        check_config,
    } = cli;
    if check_config {
        return match common.check_service().and_then(|()| args.check()) {
            Ok(()) => {
                println!("{name}: the configuration is valid");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::ExitCode::from(2)
            }
        };
    }
    if let Err(e) = common.check_service() {
        eprintln!("error: {e}");
        return std::process::ExitCode::from(2);
    }
    run_main(name, &log, common, |common| async move {
        let listeners = listen.bind().await?;
        serve(args, common, listeners).await
    })
    .await
}

/// The body of every binary's `main`: set up logging and tracing (spans carry `name` as their
/// `service.name`), check the shared settings, run, flush the spans, and
/// turn the outcome into an exit code (0 after a clean drain, 1 on an error, 2 on bad
/// configuration), printing the error where an operator will see it.
pub async fn run_main<F, Fut>(
    name: &str,
    log: &engram_telemetry::LogConfig,
    common: crate::config::CommonArgs,
    run: F,
) -> std::process::ExitCode
where
    F: FnOnce(crate::config::CommonArgs) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let tracing = match engram_telemetry::init_logging(log, name) {
        Ok(tracing) => tracing,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Err(e) = common.check() {
        eprintln!("error: {e}");
        return std::process::ExitCode::from(2);
    }
    let outcome = run(common).await;
    if let Some(tracing) = tracing {
        tracing.shutdown().await;
    }
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "exiting after an error");
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Run `main` of an engram binary: configure the process, start the async runtime, run.
///
/// CPU inference (candle) runs fastest with one single-threaded worker per core rather than
/// one worker spreading each forward pass over the cores: on the 2-core reference machine,
/// 221–226 sentences/s against 181 (see BENCHMARKS.md). candle reads `RAYON_NUM_THREADS` and
/// `CANDLE_NUM_THREADS` from the environment, so they are set here to 1 — unless the operator
/// set them — before any thread exists. qdrant-edge sizes its own thread pools and is not
/// affected.
pub fn main_entry<F, Fut>(run: F) -> std::process::ExitCode
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = std::process::ExitCode>,
{
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            #[allow(unsafe_code)]
            // SAFETY: this runs first thing in `main`, before the runtime or any other thread
            // is started, so nothing can read or write the environment concurrently.
            unsafe {
                std::env::set_var(var, "1");
            }
        }
    }
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The whole `main.rs` of a service binary: `main` runs [`service_main`] with the service's
/// listen addresses, its settings, how to build its config and how to serve it; a test checks
/// the command line is well formed.
#[macro_export]
macro_rules! service_binary {
    (name: $name:literal, about: $about:literal, listen: $listen:ty, args: $args:ty, config: $config:path, serve: $serve:path $(,)?) => {
        #[tokio::main]
        async fn main() -> std::process::ExitCode {
            $crate::server::service_main::<$listen, $args, _, _>(
                $name,
                $about,
                |args, common, listeners| {
                    $serve(
                        $config(args, common),
                        listeners,
                        $crate::config::shutdown_signal(),
                    )
                },
            )
            .await
        }

        #[cfg(test)]
        mod command_line {
            #[test]
            fn is_well_formed() {
                $crate::server::ServiceCli::<$listen, $args>::command($name, $about).debug_assert();
            }
        }
    };
}
