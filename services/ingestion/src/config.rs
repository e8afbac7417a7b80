//! The ingestion service's settings: where its peers are, the write log, the chat model fact
//! extraction uses. Every default is written once, in the clap attributes.

use std::time::Duration;

use engram_domain::{Error, Result};
use engram_models::ChatModelArgs;
use engram_runtime::config::{CommonArgs, EmbeddingUrl, RetrievalUrl};

engram_runtime::listen_args!(Listen, "ingestion", "INGESTION", "50053", "9093");

/// Where ingestion finds the services it calls (its own binary only; `engram up` wires these).
#[derive(Debug, Clone, clap::Args)]
pub struct IngestionPeers {
    #[command(flatten)]
    pub embedding: EmbeddingUrl,
    #[command(flatten)]
    pub retrieval: RetrievalUrl,
}

/// The write log's settings.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "write-log")]
pub struct LogArgs {
    /// Partitions (Redis Streams) of the write log; one user's writes share one.
    #[arg(
        id = "log-partitions",
        long = "log-partitions",
        env = "ENGRAM_LOG_PARTITIONS",
        default_value_t = 16
    )]
    pub partitions: u32,
    /// Entries a worker indexes together at most.
    #[arg(
        id = "index-batch-max",
        long = "index-batch-max",
        env = "ENGRAM_INDEX_BATCH_MAX",
        default_value_t = 64
    )]
    pub batch_max: usize,
    /// How long a worker waits to fill a batch once it has entries.
    #[arg(id = "index-batch-wait", long = "index-batch-wait", env = "ENGRAM_INDEX_BATCH_WAIT", default_value = "5ms", value_parser = engram_domain::parse_duration)]
    pub batch_wait: Duration,
    /// Unindexed entries per partition beyond which Submit answers RESOURCE_EXHAUSTED.
    #[arg(
        id = "log-max-lag",
        long = "log-max-lag",
        env = "ENGRAM_LOG_MAX_LAG",
        default_value_t = 10_000
    )]
    pub max_lag: u64,
    /// Failed tries of an entry, made while the embedding and retrieval services were
    /// otherwise healthy, before it is moved to the dead-letter stream. Failures during an
    /// outage of those services are not counted.
    #[arg(
        id = "log-max-deliveries",
        long = "log-max-deliveries",
        env = "ENGRAM_LOG_MAX_DELIVERIES",
        default_value_t = 5
    )]
    pub max_deliveries: u64,
    /// How long a partition stays with a worker that stopped renewing its lease (a crashed
    /// replica) before another takes it and its unacknowledged entries.
    #[arg(id = "log-claim-idle", long = "log-claim-idle", env = "ENGRAM_LOG_CLAIM_IDLE", default_value = "15s", value_parser = engram_domain::parse_duration)]
    pub claim_idle: Duration,
    /// Refuse writes (UNAVAILABLE) when Redis is unreachable instead of indexing them
    /// synchronously.
    #[arg(
        id = "log-strict",
        long = "log-strict",
        env = "ENGRAM_LOG_STRICT",
        default_value_t = false
    )]
    pub strict: bool,
    /// How long SYNC writes, Update and Forget wait for their write to be indexed.
    #[arg(id = "log-sync-wait", long = "log-sync-wait", env = "ENGRAM_LOG_SYNC_WAIT", default_value = "10s", value_parser = engram_domain::parse_duration)]
    pub sync_wait: Duration,
    /// Index from the write log in this replica. `false` makes a replica that only accepts
    /// writes, leaving the indexing to the others.
    #[arg(
        id = "log-workers",
        long = "log-workers",
        env = "ENGRAM_LOG_WORKERS",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub workers: bool,
}

impl Default for LogArgs {
    fn default() -> Self {
        engram_runtime::config::defaults()
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub embedding_url: String,
    pub retrieval_url: String,
    pub log: LogArgs,
    /// The chat model fact extraction uses (none: `extract=true` is refused).
    pub chat: ChatModelArgs,
    pub common: CommonArgs,
}

/// The ingestion binary's own settings.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestionArgs {
    #[command(flatten)]
    pub peers: IngestionPeers,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub chat: ChatModelArgs,
}

/// Most entries a worker indexes in one step (the write log's finish script acknowledges them
/// in one call).
const MAX_INDEX_BATCH: usize = 4096;

impl engram_runtime::server::CheckArgs for IngestionArgs {
    fn check(&self) -> Result<()> {
        if self.log.batch_max == 0 || self.log.batch_max > MAX_INDEX_BATCH {
            return Err(Error::invalid(
                "ENGRAM_INDEX_BATCH_MAX",
                format!("must be between 1 and {MAX_INDEX_BATCH}"),
            ));
        }
        let most = engram_domain::limits::fixed::MAX_LOG_PARTITIONS;
        if self.log.partitions == 0 || self.log.partitions > most {
            return Err(Error::invalid(
                "ENGRAM_LOG_PARTITIONS",
                format!("must be between 1 and {most}"),
            ));
        }
        self.chat.check().map_err(Error::from)
    }
}

impl Config {
    pub fn from_args(args: IngestionArgs, common: CommonArgs) -> Self {
        Self {
            embedding_url: args.peers.embedding.embedding_url,
            retrieval_url: args.peers.retrieval.retrieval_url,
            log: args.log,
            chat: args.chat,
            common,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engram_runtime::server::CheckArgs as _;

    #[test]
    fn the_defaults_are_the_documented_ones() {
        let log = LogArgs::default();
        assert_eq!(log.partitions, 16);
        assert_eq!(log.batch_max, 64);
        assert_eq!(log.batch_wait, Duration::from_millis(5));
        assert_eq!(log.max_lag, 10_000);
        assert_eq!(log.max_deliveries, 5);
        assert_eq!(log.claim_idle, Duration::from_secs(15));
        assert!(!log.strict);
        assert_eq!(log.sync_wait, Duration::from_secs(10));
        assert!(log.workers);
    }

    #[test]
    fn no_partitions_is_refused_naming_the_variable() {
        let args = IngestionArgs {
            peers: IngestionPeers {
                embedding: engram_runtime::config::defaults(),
                retrieval: engram_runtime::config::defaults(),
            },
            log: LogArgs {
                partitions: 0,
                ..LogArgs::default()
            },
            chat: ChatModelArgs::default(),
        };
        let refused = args.check().unwrap_err();
        assert!(
            refused.to_string().contains("ENGRAM_LOG_PARTITIONS"),
            "{refused}"
        );
    }
}
