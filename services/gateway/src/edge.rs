//! The gateway's edge: what every public call passes before its handler runs, cheapest check
//! first, so that refused work costs almost nothing:
//!
//! 1. **Load shedding**: at most `max_in_flight` calls run at once; beyond that a call is
//!    refused at once with RESOURCE_EXHAUSTED (never queued), so overload cannot grow memory
//!    or latency without bound.
//! 2. **Authentication**: `authorization: Bearer <key>` names the caller's tenant and role
//!    (UNAUTHENTICATED, PERMISSION_DENIED).
//! 3. **Rate limit**: a token bucket per key (RESOURCE_EXHAUSTED with `retry-after-ms`).
//! 4. **Deadline**: the client's `grpc-timeout`, or the method's default deadline if sooner or
//!    absent; when it passes the call is answered DEADLINE_EXCEEDED and its work — the calls
//!    to retrieval or ingestion — is dropped, which cancels them on the peer.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use engram_domain::Error;
use engram_domain::model::TenantId;
use engram_proto::tonic::Status;
use engram_proto::tonic::body::Body;
use engram_proto::tonic::server::NamedService;
use engram_runtime::deadline;
use engram_telemetry::Metrics;
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::auth::{Caller, KeyStore, Rate, Role};

/// How the edge admits calls.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// `None`: authentication is off and every caller is the tenant `default` (as admin).
    pub keys: Option<Arc<KeyStore>>,
    /// The rate of the anonymous caller when authentication is off (keys carry their own).
    pub anonymous_rate: Rate,
    pub max_in_flight: usize,
    /// Longest a streaming call (Converse) keeps its place in flight.
    pub stream_hold: Duration,
    /// Deadline of a call whose client sent none (or a later one), by method.
    pub deadlines: Deadlines,
}

/// Default deadlines: one for every method, and overrides by method name.
#[derive(Debug, Clone, PartialEq)]
pub struct Deadlines {
    pub default: Duration,
    pub by_method: HashMap<String, Duration>,
}

impl Deadlines {
    pub fn of(&self, method: &str) -> Duration {
        self.by_method.get(method).copied().unwrap_or(self.default)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    reason: &'static str,
}

/// What the edge shares across calls.
struct EdgeState {
    config: EdgeConfig,
    in_flight: Arc<Semaphore>,
    buckets: Mutex<HashMap<Arc<str>, Bucket>>,
    anonymous: Caller,
    rejected: Family<RejectLabels, Counter>,
    in_flight_gauge: Gauge,
}

/// Wraps the public service.
#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    state: Arc<EdgeState>,
}

impl<S: NamedService> NamedService for Edge<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Edge<S> {
    pub fn new(inner: S, config: EdgeConfig, metrics: &Metrics) -> Self {
        let rejected = Family::<RejectLabels, Counter>::default();
        metrics.register(
            "engram_gateway_rejected",
            "Calls the gateway answered itself, by reason: overloaded, unauthenticated, \
             permission_denied, rate_limited (refused before running) or deadline (cut short)",
            rejected.clone(),
        );
        let in_flight_gauge = Gauge::default();
        metrics.register(
            "engram_gateway_in_flight",
            "Public calls running now",
            in_flight_gauge.clone(),
        );
        let anonymous = Caller {
            key_name: "anonymous".into(),
            tenant: TenantId::default_tenant(),
            role: Role::Admin,
            rate: config.anonymous_rate,
        };
        Self {
            inner,
            state: Arc::new(EdgeState {
                in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
                config,
                buckets: Mutex::new(HashMap::new()),
                anonymous,
                rejected,
                in_flight_gauge,
            }),
        }
    }
}

impl<S> Edge<S> {
    /// Another public service behind this same edge: one in-flight limit, one set of rate
    /// buckets, one set of metrics.
    pub fn also<T>(&self, inner: T) -> Edge<T> {
        Edge {
            inner,
            state: Arc::clone(&self.state),
        }
    }
}

impl EdgeState {
    fn reject(&self, reason: &'static str, error: Error) -> http::Response<Body> {
        self.rejected.get_or_create(&RejectLabels { reason }).inc();
        Status::from(error).into_http()
    }

    /// The caller of `request`, allowed to call `method`.
    fn authenticate(
        &self,
        headers: &http::HeaderMap,
        method: &str,
    ) -> Result<Caller, (&'static str, Error)> {
        let Some(store) = &self.config.keys else {
            return Ok(self.anonymous.clone());
        };
        let unauthenticated =
            |why: &str| ("unauthenticated", Error::Unauthenticated(why.to_string()));
        let header = headers
            .get(http::header::AUTHORIZATION)
            .ok_or_else(|| unauthenticated("missing `authorization: Bearer <API key>` metadata"))?;
        let key = header
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                unauthenticated("the `authorization` metadata must be `Bearer <API key>`")
            })?;
        let keys = store.keys();
        let caller = keys
            .lookup(key)
            .ok_or_else(|| unauthenticated("unknown or revoked API key"))?;
        let needed = Role::needed_for(method);
        if caller.role < needed {
            return Err((
                "permission_denied",
                Error::PermissionDenied(format!(
                    "API key {:?} has the {} role; {method} needs {}",
                    &*caller.key_name,
                    caller.role.as_str(),
                    needed.as_str()
                )),
            ));
        }
        Ok(caller.clone())
    }

    /// Take a token from the caller's bucket, or say how long until one is free.
    fn admit(&self, caller: &Caller) -> Result<(), Duration> {
        if caller.rate.per_second <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock();
        let bucket = buckets
            .entry(Arc::clone(&caller.key_name))
            .or_insert(Bucket {
                tokens: caller.rate.burst,
                updated: now,
            });
        bucket.take(caller.rate, now)
    }
}

/// A token bucket's state.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.updated = now;
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / rate.per_second,
            ))
        }
    }
}

impl<S> tower::Service<http::Request<Body>> for Edge<S>
where
    S: tower::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let state = Arc::clone(&self.state);
        let Ok(permit) = Arc::clone(&state.in_flight).try_acquire_owned() else {
            let limit = state.config.max_in_flight;
            let response = state.reject(
                "overloaded",
                Error::ResourceExhausted {
                    reason: format!(
                        "the gateway is at its limit of {limit} calls in flight; retry shortly"
                    ),
                    retry_after: Some(Duration::from_millis(50)),
                },
            );
            return Box::pin(async move { Ok(response) });
        };
        let method = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let caller = match state.authenticate(request.headers(), &method) {
            Ok(caller) => caller,
            Err((reason, error)) => {
                let response = state.reject(reason, error);
                return Box::pin(async move { Ok(response) });
            }
        };
        if let Err(wait) = state.admit(&caller) {
            let response = state.reject(
                "rate_limited",
                Error::ResourceExhausted {
                    reason: format!(
                        "tenant {} is over the rate of its API key {:?} ({} calls/s, bursts of {})",
                        caller.tenant, &*caller.key_name, caller.rate.per_second, caller.rate.burst
                    ),
                    retry_after: Some(wait.max(Duration::from_millis(1))),
                },
            );
            return Box::pin(async move { Ok(response) });
        }
        // The method's default deadline, or the client's if sooner; the reply is sent a
        // margin before the client's deadline so that it arrives before the client gives up.
        let budget = deadline::remaining()
            .map(|left| left.saturating_sub(deadline::REPLY_MARGIN))
            .map_or(state.config.deadlines.of(&method), |left| {
                left.min(state.config.deadlines.of(&method))
            });
        let expires = Instant::now() + budget;
        let streams = method == "Converse";
        request.extensions_mut().insert(caller);
        let work = self.inner.call(request);
        Box::pin(async move {
            let held = Held::new(permit, state.in_flight_gauge.clone());
            let outcome =
                tokio::time::timeout_at(expires, deadline::scope(Some(expires), work)).await;
            match outcome {
                // A stream (Converse) stays in flight until its body ends, or at most
                // `stream_hold` if its client stops reading; a unary call until its answer.
                Ok(Ok(response)) if streams => {
                    let hold = state.config.stream_hold;
                    Ok(response.map(|body| Body::new(held.around(body, hold))))
                }
                Ok(Ok(response)) => Ok(response),
                Ok(Err(never)) => match never {},
                Err(_) => Ok(state.reject(
                    "deadline",
                    Error::DeadlineExceeded(format!(
                        "{method} did not complete within its deadline of {budget:?}; its work was cancelled"
                    )),
                )),
            }
        })
    }
}

/// A call's place in flight: its permit and its count in `engram_gateway_in_flight`, given
/// back when dropped (with the response body, once it is sent, or with the call).
struct Held {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: Gauge,
}

impl Held {
    fn new(permit: tokio::sync::OwnedSemaphorePermit, gauge: Gauge) -> Self {
        gauge.inc();
        Self {
            _permit: permit,
            gauge,
        }
    }

    /// `body`, holding this place until it ends or is dropped, or for `at_most`.
    fn around(self, body: Body, at_most: Duration) -> HeldBody {
        let held = Arc::new(Mutex::new(Some(self)));
        let expiry = Arc::downgrade(&held);
        tokio::spawn(async move {
            tokio::time::sleep(at_most).await;
            if let Some(held) = expiry.upgrade() {
                held.lock().take();
            }
        });
        HeldBody { body, _held: held }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// A response body that keeps its call in flight until it ends or is dropped.
struct HeldBody {
    body: Body,
    _held: Arc<Mutex<Option<Held>>>,
}

impl http_body::Body for HeldBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bucket_allows_its_burst_then_its_rate() {
        let rate = Rate {
            per_second: 10.0,
            burst: 3.0,
        };
        let start = Instant::now();
        let mut bucket = Bucket {
            tokens: rate.burst,
            updated: start,
        };
        for _ in 0..3 {
            assert!(bucket.take(rate, start).is_ok());
        }
        let wait = bucket.take(rate, start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert!(
            bucket
                .take(rate, start + Duration::from_millis(100))
                .is_ok()
        );
        assert!(
            bucket
                .take(rate, start + Duration::from_millis(100))
                .is_err()
        );
    }
}
