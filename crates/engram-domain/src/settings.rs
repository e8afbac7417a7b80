//! How settings are declared: every field of a settings group is a clap argument whose
//! `default_value` is the one place its default is written, and environment variables that more
//! than one crate names are constants here.

/// A group of settings with every field at its documented default: the `default_value`s of
/// its clap attributes (no flag or environment variable is read). A group's `Default` is this,
/// so code and `--help` cannot disagree.
pub fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults").no_binary_name(true))
        .mut_args(|arg| arg.env(None::<&'static str>));
    command
        .try_get_matches_from(std::iter::empty::<String>())
        .and_then(|matches| T::from_arg_matches(&matches))
        .unwrap_or_else(|e| unreachable!("a settings group without a default for each field: {e}"))
}

/// Environment variables read or set in more than one place (clap attributes, `engram up`,
/// the errors that name the variable at fault).
pub mod env {
    pub const REDIS_URL: &str = "ENGRAM_REDIS_URL";
    pub const DATA_DIR: &str = "ENGRAM_DATA_DIR";
    pub const MODEL_DIR: &str = "ENGRAM_MODEL_DIR";
    pub const RETRIEVAL_URL: &str = "ENGRAM_RETRIEVAL_URL";
    pub const EMBEDDING_URL: &str = "ENGRAM_EMBEDDING_URL";
    pub const INGESTION_URL: &str = "ENGRAM_INGESTION_URL";
    pub const CLUSTER_SECRET: &str = "ENGRAM_CLUSTER_SECRET";
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Limits;

    #[test]
    fn defaults_are_the_clap_default_values_whatever_the_environment() {
        let limits: Limits = defaults();
        assert_eq!(limits.max_text_bytes, 32 * 1024);
        assert_eq!(limits.max_batch, 1000);
        assert_eq!(limits.max_top_k, 100);
    }
}
