//! The guard's behaviour on tokio's paused clock: no test here waits in real time.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::*;

/// A provider stand-in that answers attempts from a script and counts them.
#[derive(Clone, Default)]
struct Script {
    answers: Arc<Mutex<VecDeque<Result<u32, Failure>>>>,
    calls: Arc<Mutex<u32>>,
}

impl Script {
    fn new(answers: impl IntoIterator<Item = Result<u32, Failure>>) -> Self {
        Self {
            answers: Arc::new(Mutex::new(answers.into_iter().collect())),
            calls: Arc::default(),
        }
    }

    fn calls(&self) -> u32 {
        *self.calls.lock()
    }

    fn attempt(&self) -> impl Future<Output = Result<u32, Failure>> + use<> {
        *self.calls.lock() += 1;
        let answer = self.answers.lock().pop_front().unwrap_or(Ok(0));
        async move { answer }
    }
}

fn server_error() -> Failure {
    Failure::Server {
        status: 500,
        retry_after: None,
        message: "boom".into(),
    }
}

fn guard(policy: Policy) -> Outbound {
    let metrics = OutboundMetrics::new(&Metrics::new());
    Outbound::new("embedding provider test", policy, &metrics)
}

fn no_retries() -> Policy {
    Policy {
        max_attempts: 1,
        breaker: BreakerConfig {
            consecutive_failures: 3,
            cooldown: Duration::from_secs(30),
            ..BreakerConfig::default()
        },
        ..Policy::default()
    }
}

#[tokio::test(start_paused = true)]
async fn the_breaker_opens_fails_fast_probes_after_the_cooldown_and_recovers() {
    let guard = guard(no_retries());
    let provider = Script::new(vec![Err(server_error()); 3]);
    for _ in 0..3 {
        let err = guard.call(|| provider.attempt()).await.unwrap_err();
        assert!(matches!(err, CallError::Failed { .. }), "{err}");
    }
    assert_eq!(guard.breaker_state(), BreakerState::Open);

    // Open: refused without reaching the provider.
    let err = guard.call(|| provider.attempt()).await.unwrap_err();
    assert!(matches!(err, CallError::CircuitOpen { .. }), "{err}");
    assert_eq!(provider.calls(), 3);
    assert_eq!(
        engram_domain::Error::from(err).code(),
        engram_domain::error::Code::Unavailable
    );

    // After the cooldown one probe goes through; it succeeds and traffic resumes.
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(guard.call(|| provider.attempt()).await, Ok(0));
    assert_eq!(guard.breaker_state(), BreakerState::Closed);
    assert_eq!(guard.call(|| provider.attempt()).await, Ok(0));
    assert_eq!(provider.calls(), 5);
}

#[tokio::test(start_paused = true)]
async fn a_429_is_retried_no_sooner_than_its_retry_after() {
    let guard = guard(Policy {
        min_backoff: Duration::from_millis(10),
        ..Policy::default()
    });
    let provider = Script::new([
        Err(Failure::RateLimited {
            retry_after: Some(Duration::from_secs(2)),
        }),
        Ok(7),
    ]);
    let started = Instant::now();
    assert_eq!(guard.call(|| provider.attempt()).await, Ok(7));
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "waited {:?}",
        started.elapsed()
    );
    assert_eq!(provider.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_rejected_request_is_not_retried() {
    let guard = guard(Policy::default());
    let provider = Script::new([Err(Failure::Rejected {
        status: 400,
        message: "bad input".into(),
    })]);
    let err = guard.call(|| provider.attempt()).await.unwrap_err();
    assert_eq!(provider.calls(), 1);
    assert_eq!(
        err.to_string(),
        "embedding provider test rejected the request with 400: bad input (attempt 1/4)"
    );
    // The provider's body stays in the log; callers get the status.
    let public = engram_domain::Error::from(err);
    assert_eq!(
        public.to_string(),
        "embedding provider test rejected the request with 400 (attempt 1/4)"
    );
}

#[tokio::test(start_paused = true)]
async fn timeouts_are_retried_and_reported_with_the_attempt_count() {
    let guard = guard(Policy {
        attempt_timeout: Duration::from_secs(2),
        max_attempts: 3,
        ..Policy::default()
    });
    let calls = Arc::new(Mutex::new(0));
    let err = guard
        .call(|| {
            *calls.lock() += 1;
            std::future::pending::<Result<u32, Failure>>()
        })
        .await
        .unwrap_err();
    assert_eq!(*calls.lock(), 3);
    assert_eq!(
        err.to_string(),
        "embedding provider test timed out after 2s (attempt 3/3)"
    );
}

#[tokio::test(start_paused = true)]
async fn retries_stop_at_the_deadline() {
    let guard = guard(Policy {
        attempt_timeout: Duration::from_secs(1),
        deadline: Duration::from_secs(5),
        max_attempts: 100,
        ..Policy::default()
    });
    let provider = Script::new(vec![
        Err(Failure::RateLimited {
            retry_after: Some(Duration::from_secs(10)),
        });
        10
    ]);
    let started = Instant::now();
    let err = guard.call(|| provider.attempt()).await.unwrap_err();
    // A retry-after beyond the deadline is not waited for: the caller hears at once.
    assert_eq!(provider.calls(), 1);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(err, CallError::Failed { .. }), "{err}");
}

#[tokio::test(start_paused = true)]
async fn the_bulkhead_bounds_calls_in_flight() {
    let guard = Arc::new(guard(Policy {
        max_concurrency: 1,
        bulkhead_wait: Duration::from_millis(50),
        ..Policy::default()
    }));
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let released = Arc::new(tokio::sync::Mutex::new(Some(released)));
    let busy = {
        let guard = guard.clone();
        tokio::spawn(async move {
            guard
                .call(|| {
                    let released = released.clone();
                    async move {
                        if let Some(rx) = released.lock().await.take() {
                            let _ = rx.await;
                        }
                        Ok::<_, Failure>(1)
                    }
                })
                .await
        })
    };
    tokio::task::yield_now().await;
    let err = guard
        .call(|| async { Ok::<_, Failure>(2) })
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Bulkhead { .. }), "{err}");
    let _ = release.send(());
    assert_eq!(busy.await.unwrap(), Ok(1));
}

#[test]
fn policy_settings_parse_from_flags() {
    crate::policy_args!(TestPolicyArgs, "test", "TEST");
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        policy: TestPolicyArgs,
    }
    let cli = <Cli as clap::Parser>::parse_from([
        "x",
        "--test-timeout",
        "250ms",
        "--test-max-attempts",
        "2",
    ]);
    let policy = cli.policy.policy();
    assert_eq!(policy.attempt_timeout, Duration::from_millis(250));
    assert_eq!(policy.max_attempts, 2);
    assert_eq!(policy.breaker.cooldown, Duration::from_secs(30));
}

#[test]
fn policy_settings_default_to_the_default_policy() {
    crate::policy_args!(TestPolicyArgs, "test", "TEST");
    let settings: TestPolicyArgs = engram_domain::settings::defaults();
    assert_eq!(settings.policy(), Policy::default());
}
