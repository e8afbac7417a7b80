//! Process-wide logging set-up, done once by a binary's `main`.

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::trace::{TraceConfig, Tracing};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub struct LogConfig {
    /// Log filter in `tracing` syntax, e.g. `info` or `engram_retrieval=debug,info`. The
    /// embedded vector engine's own chatter is kept to errors unless named explicitly.
    #[arg(
        long = "log",
        env = "ENGRAM_LOG",
        default_value = "info,qdrant_edge=error"
    )]
    pub filter: String,
    /// Log line format.
    #[arg(long = "log-format", env = "ENGRAM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub format: LogFormat,
    #[command(flatten)]
    pub trace: TraceConfig,
}

/// Install the global subscriber: log lines on stderr and, when an OTLP endpoint is
/// configured, spans exported for `service`. Fails if the filter does not parse, naming the
/// variable. Must run inside the tokio runtime; keep the returned exporter and
/// [`Tracing::shutdown`] it before exiting.
pub fn init_logging(config: &LogConfig, service: &str) -> Result<Option<Tracing>, String> {
    let filter = EnvFilter::try_new(&config.filter)
        .map_err(|e| format!("ENGRAM_LOG: invalid filter {:?}: {e}", config.filter))?;
    let tracing = Tracing::start(&config.trace, service)?;
    crate::trace::install_propagator();
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(true)
        .with_writer(std::io::stderr);
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match config.format {
        LogFormat::Text => Box::new(fmt),
        LogFormat::Json => Box::new(fmt.json().flatten_event(true)),
    };
    let otel = tracing.as_ref().map(Tracing::layer);
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .with(filter)
        .try_init()
        .map_err(|e| format!("logging already initialised: {e}"))?;
    Ok(tracing)
}
