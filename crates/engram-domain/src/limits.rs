//! Request bounds: every size and count a client controls is limited, in one place.

use crate::error::{Error, Result};

/// Limits that operators can tune. Validation of every public request reads them; services
/// that receive the same data internally apply the same limits again.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Limits {
    /// Largest memory text accepted, in bytes.
    #[arg(long, env = "ENGRAM_MAX_TEXT_BYTES", default_value_t = 32 * 1024)]
    pub max_text_bytes: usize,
    /// Most memories (or ids) in one request.
    #[arg(long, env = "ENGRAM_MAX_BATCH", default_value_t = 1000)]
    pub max_batch: usize,
    /// Largest Recall query, in bytes.
    #[arg(long, env = "ENGRAM_MAX_QUERY_BYTES", default_value_t = 4096)]
    pub max_query_bytes: usize,
    /// Largest `top_k` a Recall may ask for.
    #[arg(long, env = "ENGRAM_MAX_TOP_K", default_value_t = 100)]
    pub max_top_k: u32,
    /// Largest List page.
    #[arg(long, env = "ENGRAM_MAX_PAGE_SIZE", default_value_t = 1000)]
    pub max_page_size: u32,
}

impl Default for Limits {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

/// Bounds that are part of the API rather than of a deployment.
pub mod fixed {
    /// Most partitions a write log may have (ENGRAM_LOG_PARTITIONS); also bounds what the index
    /// remembers of the partitions' lease epochs.
    pub const MAX_LOG_PARTITIONS: u32 = 4096;
    pub const MAX_ID_BYTES: usize = 256;
    pub const MAX_ROLE_BYTES: usize = 64;
    pub const MAX_METADATA_ENTRIES: usize = 64;
    pub const MAX_METADATA_KEY_BYTES: usize = 128;
    pub const MAX_METADATA_VALUE_BYTES: usize = 2048;
    /// Most bytes of metadata keys and values of one memory, all entries together.
    pub const MAX_METADATA_BYTES: usize = 16 * 1024;
    pub const MAX_TAGS: usize = 64;
    pub const MAX_TAG_BYTES: usize = 128;
    pub const MAX_FILTER_VALUES: usize = 64;
    pub const DEFAULT_PAGE_SIZE: u32 = 100;
}

impl Limits {
    /// Check the configured values at start-up; errors name the environment variable.
    pub fn check(&self) -> Result<()> {
        let checks: [(&str, bool); 5] = [
            ("ENGRAM_MAX_TEXT_BYTES", self.max_text_bytes > 0),
            ("ENGRAM_MAX_BATCH", self.max_batch > 0),
            ("ENGRAM_MAX_QUERY_BYTES", self.max_query_bytes > 0),
            ("ENGRAM_MAX_TOP_K", self.max_top_k > 0),
            ("ENGRAM_MAX_PAGE_SIZE", self.max_page_size > 0),
        ];
        for (var, ok) in checks {
            if !ok {
                return Err(Error::invalid(var, "must be greater than zero"));
            }
        }
        Ok(())
    }
}
