//! A circuit breaker per provider.
//!
//! Closed: calls pass; their outcomes fill a sliding window. The circuit opens when the last
//! `consecutive_failures` calls all failed, or when the window holds at least `min_calls`
//! outcomes and the failure rate reaches `failure_rate`. Open: calls are refused at once until
//! `cooldown` has passed. Half-open: exactly one probe call passes (the others are refused);
//! its success closes the circuit, its failure opens it again for another cooldown.
//!
//! Written here rather than taken from a crate: recloser and tower-resilience-circuitbreaker
//! time their cooldown with `std::time::Instant`, which tokio's paused clock cannot drive in
//! tests, and recloser lets every call through while half-open instead of a single probe.
//! This one reads `tokio::time::Instant`.

use std::collections::VecDeque;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Open after this many failures in a row.
    pub consecutive_failures: u32,
    /// Open when at least this share of the window failed…
    pub failure_rate: f64,
    /// …over the last `window` calls, once at least `min_calls` were seen.
    pub window: usize,
    pub min_calls: usize,
    /// How long the circuit stays open before a probe is let through.
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            failure_rate: 0.5,
            window: 20,
            min_calls: 10,
            cooldown: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// For the state gauge: 0 closed, 1 open, 2 half-open.
    pub fn as_gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
enum State {
    Closed {
        outcomes: VecDeque<bool>,
        consecutive: u32,
    },
    Open {
        until: Instant,
    },
    HalfOpen {
        probing: bool,
    },
}

/// Why a call was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    /// How long until a probe may be let through (zero while a probe is already in flight).
    pub retry_in: Duration,
}

/// Permission to make one call; report its outcome with [`CircuitBreaker::record`]. Dropping
/// it unreported (a cancelled call) releases a half-open probe slot without an outcome.
#[derive(Debug)]
#[must_use = "report the call's outcome with CircuitBreaker::record"]
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    probe: bool,
    reported: bool,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.reported {
            let mut state = self.breaker.state.lock();
            if let State::HalfOpen { probing } = &mut *state {
                *probing = false;
            }
        }
    }
}

#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    state: Mutex<State>,
}

/// A state change, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: Mutex::new(Self::closed(&config)),
        }
    }

    fn closed(config: &BreakerConfig) -> State {
        State::Closed {
            outcomes: VecDeque::with_capacity(config.window),
            consecutive: 0,
        }
    }

    pub fn state(&self) -> BreakerState {
        match &*self.state.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether a call now would be refused without trying: open and still cooling down.
    pub fn failing_fast(&self) -> bool {
        matches!(&*self.state.lock(), State::Open { until } if Instant::now() < *until)
    }

    /// Ask to make a call. Also returns the transition this caused (open → half-open).
    pub fn acquire(&self) -> (Result<Permit<'_>, Rejected>, Option<Transition>) {
        let mut state = self.state.lock();
        let now = Instant::now();
        match &mut *state {
            State::Closed { .. } => (Ok(self.permit(false)), None),
            State::Open { until } if now >= *until => {
                *state = State::HalfOpen { probing: true };
                let transition = Transition {
                    from: BreakerState::Open,
                    to: BreakerState::HalfOpen,
                };
                (Ok(self.permit(true)), Some(transition))
            }
            State::Open { until } => (
                Err(Rejected {
                    retry_in: *until - now,
                }),
                None,
            ),
            State::HalfOpen { probing: true } => (
                Err(Rejected {
                    retry_in: Duration::ZERO,
                }),
                None,
            ),
            State::HalfOpen { probing } => {
                *probing = true;
                (Ok(self.permit(true)), None)
            }
        }
    }

    fn permit(&self, probe: bool) -> Permit<'_> {
        Permit {
            breaker: self,
            probe,
            reported: false,
        }
    }

    /// Report how a permitted call went; returns the transition it caused, if any.
    pub fn record(&self, mut permit: Permit<'_>, success: bool) -> Option<Transition> {
        permit.reported = true;
        let mut state = self.state.lock();
        let config = &self.config;
        let (from, to) = match &mut *state {
            State::HalfOpen { .. } if success => {
                *state = Self::closed(config);
                (BreakerState::HalfOpen, BreakerState::Closed)
            }
            State::HalfOpen { .. } => {
                *state = State::Open {
                    until: Instant::now() + config.cooldown,
                };
                (BreakerState::HalfOpen, BreakerState::Open)
            }
            State::Closed {
                outcomes,
                consecutive,
            } => {
                if outcomes.len() == config.window.max(1) {
                    outcomes.pop_front();
                }
                outcomes.push_back(success);
                *consecutive = if success { 0 } else { *consecutive + 1 };
                let failures = outcomes.iter().filter(|ok| !**ok).count();
                let rate_tripped = outcomes.len() >= config.min_calls.max(1)
                    && failures as f64 >= config.failure_rate * outcomes.len() as f64;
                if *consecutive >= config.consecutive_failures.max(1) || (!success && rate_tripped)
                {
                    *state = State::Open {
                        until: Instant::now() + config.cooldown,
                    };
                    (BreakerState::Closed, BreakerState::Open)
                } else {
                    return None;
                }
            }
            // A call permitted before the circuit opened finished after: it no longer counts.
            State::Open { .. } => return None,
        };
        Some(Transition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 3,
            failure_rate: 0.5,
            window: 10,
            min_calls: 6,
            cooldown: Duration::from_secs(30),
        })
    }

    fn call(b: &CircuitBreaker, success: bool) -> Result<Option<Transition>, Rejected> {
        let (permit, _) = b.acquire();
        Ok(b.record(permit?, success))
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_probes_once_after_the_cooldown() {
        let b = breaker();
        assert_eq!(call(&b, false), Ok(None));
        assert_eq!(call(&b, false), Ok(None));
        let opened = call(&b, false).unwrap().unwrap();
        assert_eq!(opened.to, BreakerState::Open);
        let rejected = call(&b, true).unwrap_err();
        assert_eq!(rejected.retry_in, Duration::from_secs(30));

        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(
            call(&b, true).is_err(),
            "still open before the cooldown ends"
        );
        tokio::time::advance(Duration::from_secs(1)).await;

        let (probe, transition) = b.acquire();
        let probe = probe.unwrap();
        assert_eq!(transition.unwrap().to, BreakerState::HalfOpen);
        assert!(b.acquire().0.is_err(), "only one probe while half-open");
        assert_eq!(b.record(probe, true).unwrap().to, BreakerState::Closed);
        assert_eq!(call(&b, true), Ok(None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_again_and_a_cancelled_probe_frees_its_slot() {
        let b = breaker();
        for _ in 0..3 {
            let _ = call(&b, false);
        }
        tokio::time::advance(Duration::from_secs(30)).await;
        let (probe, _) = b.acquire();
        drop(probe.unwrap());
        let (probe, _) = b.acquire();
        assert_eq!(
            b.record(probe.unwrap(), false).unwrap().to,
            BreakerState::Open
        );
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_the_failure_rate_without_a_run_of_failures() {
        let b = breaker();
        for success in [false, true, false, true, false] {
            assert_eq!(call(&b, success), Ok(None));
        }
        // Sixth call: 4 of 6 failed, over the 50% threshold, with no run of 3.
        let opened = call(&b, false).unwrap().unwrap();
        assert_eq!(opened.to, BreakerState::Open);
    }
}
