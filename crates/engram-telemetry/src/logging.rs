//! Process-wide logging set-up, done once by a binary's `main`.

use tracing_subscriber::EnvFilter;

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
}

/// Install the global subscriber. Fails if the filter does not parse, naming the variable.
pub fn init_logging(config: &LogConfig) -> Result<(), String> {
    let filter = EnvFilter::try_new(&config.filter)
        .map_err(|e| format!("ENGRAM_LOG: invalid filter {:?}: {e}", config.filter))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_writer(std::io::stderr);
    let result = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| format!("logging already initialised: {e}"))
}
