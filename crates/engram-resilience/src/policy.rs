//! How hard to try: timeouts, attempts, backoff, breaker and bulkhead, and their settings.

use std::time::Duration;

use crate::BreakerConfig;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Bound on one attempt.
    pub attempt_timeout: Duration,
    /// Bound on the whole call, retries and waits included.
    pub deadline: Duration,
    /// Attempts in all (1 = no retries).
    pub max_attempts: u32,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    pub breaker: BreakerConfig,
    /// Calls in flight at most; more wait up to `bulkhead_wait`, then fail.
    pub max_concurrency: usize,
    pub bulkhead_wait: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            attempt_timeout: Duration::from_secs(10),
            deadline: Duration::from_secs(30),
            max_attempts: 4,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            breaker: BreakerConfig::default(),
            max_concurrency: 8,
            bulkhead_wait: Duration::from_millis(100),
        }
    }
}

/// Declare the settings of one provider's [`Policy`] as a `clap::Args` struct, with flags
/// `--<name>-timeout` etc. and variables `ENGRAM_<NAME>_TIMEOUT` etc.
#[macro_export]
macro_rules! policy_args {
    ($struct:ident, $name:literal, $env:literal) => {
        #[derive(Debug, Clone, clap::Args)]
        #[group(id = concat!($name, "-policy"))]
        pub struct $struct {
            #[doc = concat!("Timeout of one call attempt to the ", $name, " provider.")]
            #[arg(id = concat!($name, "-timeout"), long = concat!($name, "-timeout"), env = concat!("ENGRAM_", $env, "_TIMEOUT"), default_value = "10s", value_parser = $crate::parse_duration)]
            pub attempt_timeout: std::time::Duration,
            #[doc = concat!("Deadline of a call to the ", $name, " provider, retries included.")]
            #[arg(id = concat!($name, "-deadline"), long = concat!($name, "-deadline"), env = concat!("ENGRAM_", $env, "_DEADLINE"), default_value = "30s", value_parser = $crate::parse_duration)]
            pub deadline: std::time::Duration,
            #[doc = concat!("Attempts per call to the ", $name, " provider (1 disables retries).")]
            #[arg(id = concat!($name, "-max-attempts"), long = concat!($name, "-max-attempts"), env = concat!("ENGRAM_", $env, "_MAX_ATTEMPTS"), default_value_t = 4)]
            pub max_attempts: u32,
            #[doc = concat!("Consecutive failures that open the ", $name, " provider's circuit.")]
            #[arg(id = concat!($name, "-breaker-failures"), long = concat!($name, "-breaker-failures"), env = concat!("ENGRAM_", $env, "_BREAKER_FAILURES"), default_value_t = 5)]
            pub breaker_failures: u32,
            #[doc = concat!("How long the ", $name, " provider's circuit stays open before a probe.")]
            #[arg(id = concat!($name, "-breaker-cooldown"), long = concat!($name, "-breaker-cooldown"), env = concat!("ENGRAM_", $env, "_BREAKER_COOLDOWN"), default_value = "30s", value_parser = $crate::parse_duration)]
            pub breaker_cooldown: std::time::Duration,
            #[doc = concat!("Calls to the ", $name, " provider in flight at most.")]
            #[arg(id = concat!($name, "-max-concurrency"), long = concat!($name, "-max-concurrency"), env = concat!("ENGRAM_", $env, "_MAX_CONCURRENCY"), default_value_t = 8)]
            pub max_concurrency: usize,
        }

        impl $struct {
            pub fn policy(&self) -> $crate::Policy {
                let defaults = $crate::Policy::default();
                $crate::Policy {
                    attempt_timeout: self.attempt_timeout,
                    deadline: self.deadline,
                    max_attempts: self.max_attempts.max(1),
                    breaker: $crate::BreakerConfig {
                        consecutive_failures: self.breaker_failures.max(1),
                        cooldown: self.breaker_cooldown,
                        ..defaults.breaker
                    },
                    max_concurrency: self.max_concurrency.max(1),
                    ..defaults
                }
            }
        }
    };
}

/// Durations like `250ms`, `30s` or `5m` (for the settings the macro declares).
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    engram_domain::parse_duration(value)
}
