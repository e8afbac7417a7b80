//! The caller's deadline, carried across every hop.
//!
//! A server reads the `grpc-timeout` a client sent ([`DeadlineLayer`]) and runs the handler with
//! that deadline in scope; every internal client sends what is left of it to the next service
//! ([`propagate`]), and code that waits (read-your-writes, for one) waits no longer than
//! [`remaining`] allows. Without a `grpc-timeout` there is no deadline in scope, and each wait
//! keeps its own bound.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use engram_proto::tonic::{Request, Status};
use tokio::time::Instant;

tokio::task_local! {
    static DEADLINE: Instant;
}

/// Time left before the caller's deadline, if the request in scope has one.
pub fn remaining() -> Option<Duration> {
    DEADLINE
        .try_with(|deadline| deadline.saturating_duration_since(Instant::now()))
        .ok()
}

/// `bound`, or less if the caller's deadline comes sooner.
pub fn within(bound: Duration) -> Duration {
    remaining().map_or(bound, |left| left.min(bound))
}

/// Time left to wait, at most `bound`, while leaving [`REPLY_MARGIN`] before the caller's
/// deadline to send the reply that says why the wait ended.
pub fn answerable_within(bound: Duration) -> Duration {
    match remaining() {
        Some(left) => left.saturating_sub(REPLY_MARGIN).min(bound),
        None => bound,
    }
}

/// Kept before the caller's deadline for a reply to reach it.
pub const REPLY_MARGIN: Duration = Duration::from_millis(20);

/// Run `work` with `deadline` in scope (none: as it is).
pub async fn scope<F: Future>(deadline: Option<Instant>, work: F) -> F::Output {
    match deadline {
        Some(deadline) => DEADLINE.scope(deadline, work).await,
        None => work.await,
    }
}

/// A client interceptor: send the time left before the deadline in scope as `grpc-timeout`.
pub fn propagate(mut request: Request<()>) -> Result<Request<()>, Status> {
    if let Some(left) = remaining() {
        if left.is_zero() {
            return Err(Status::deadline_exceeded(
                "the caller's deadline passed before this call was made",
            ));
        }
        request.set_timeout(left);
    }
    Ok(request)
}

/// The value of a `grpc-timeout` header: an integer of at most 8 digits and a unit
/// (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Server layer: runs each request's handler with the deadline its `grpc-timeout` gives.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct DeadlineService<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for DeadlineService<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let deadline = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map(|timeout| Instant::now() + timeout);
        let response = self.inner.call(request);
        Box::pin(scope(deadline, response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("150m"), Some(Duration::from_millis(150)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "10", "5x", "123456789S", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn within_is_bounded_by_the_deadline_in_scope() {
        assert_eq!(within(Duration::from_secs(10)), Duration::from_secs(10));
        let deadline = Instant::now() + Duration::from_secs(2);
        scope(Some(deadline), async {
            assert_eq!(within(Duration::from_secs(10)), Duration::from_secs(2));
            assert_eq!(within(Duration::from_secs(1)), Duration::from_secs(1));
            assert_eq!(
                answerable_within(Duration::from_secs(10)),
                Duration::from_secs(2) - REPLY_MARGIN
            );
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert_eq!(remaining(), Some(Duration::ZERO));
            let refused = propagate(Request::new(())).unwrap_err();
            assert_eq!(refused.code(), engram_proto::tonic::Code::DeadlineExceeded);
        })
        .await;
    }
}
