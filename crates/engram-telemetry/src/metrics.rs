//! A service's Prometheus registry and the gRPC server metrics layer.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};

use crate::trace::{TraceLayer, Traced, UNAVAILABLE, header_status, split_path};

/// Latency buckets in seconds from 50 µs to about 6.5 s, doubling: engram's fast paths are
/// sub-millisecond and its slow ones (model calls) take seconds.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_05, 2.0, 18)
}

/// One service's metrics registry. Cheap to clone; components register their series at
/// construction and `/metrics` encodes them, with the process's resident memory
/// (`process_resident_memory_bytes`, read when encoded).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    resident: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let resident = Gauge::default();
        let mut registry = Registry::default();
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of the process (all services in it, under `engram up`)",
            resident.clone(),
        );
        Self {
            registry: Arc::new(Mutex::new(registry)),
            resident,
        }
    }
}

/// The process's resident set in bytes (Linux: `VmRSS` of /proc/self/status), 0 where unknown.
fn resident_bytes() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(&self, name: impl Into<String>, help: impl Into<String>, metric: impl Metric) {
        self.registry.lock().register(name, help, metric);
    }

    /// The registry in the Prometheus text exposition format.
    pub fn encode(&self) -> String {
        self.resident.set(resident_bytes());
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry.lock());
        out
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    grpc_service: String,
    grpc_method: String,
    grpc_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_service: String,
    grpc_method: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// Tower layer recording, for every request a server handles, `grpc_server_started_total` and
/// `grpc_server_handling_seconds` (by service and method) and `grpc_server_handled_total` (by
/// service, method and status code). Started minus handled is the number in flight.
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    started: Family<MethodLabels, Counter>,
    handled: Family<HandledLabels, Counter>,
    handling: HistogramFamily<MethodLabels>,
    /// The labels of each path a server serves (`None`: label by the path, for the calls this
    /// process makes itself).
    known: Option<Arc<HashMap<String, MethodLabels>>>,
}

/// The label of both service and method for a path the server does not serve.
pub const UNKNOWN_METHOD: &str = "unknown";

impl GrpcMetricsLayer {
    /// Server metrics labelled by `methods`, the (service, method) full names the server
    /// serves. A request for any other path counts as `unknown`/`unknown`: what a caller sends
    /// never adds a series.
    pub fn new<S, M>(metrics: &Metrics, methods: impl IntoIterator<Item = (S, M)>) -> Self
    where
        S: Into<String>,
        M: Into<String>,
    {
        let known = methods
            .into_iter()
            .map(|(service, method)| {
                let labels = MethodLabels {
                    grpc_service: service.into(),
                    grpc_method: method.into(),
                };
                (
                    format!("/{}/{}", labels.grpc_service, labels.grpc_method),
                    labels,
                )
            })
            .collect();
        Self {
            known: Some(Arc::new(known)),
            ..Self::for_side(metrics, "server")
        }
    }

    /// The same series for calls this process makes (`grpc_client_*`).
    fn for_side(metrics: &Metrics, side: &str) -> Self {
        let started = Family::<MethodLabels, Counter>::default();
        let handled = Family::<HandledLabels, Counter>::default();
        let handling: HistogramFamily<MethodLabels> =
            Family::new_with_constructor(latency_histogram);
        metrics.register(
            format!("grpc_{side}_started"),
            format!("RPCs started on the {side}"),
            started.clone(),
        );
        metrics.register(
            format!("grpc_{side}_handled"),
            format!("RPCs completed on the {side}, by status code"),
            handled.clone(),
        );
        metrics.register(
            format!("grpc_{side}_handling_seconds"),
            format!("Time an RPC took on the {side}, until its response headers"),
            handling.clone(),
        );
        Self {
            started,
            handled,
            handling,
            known: None,
        }
    }

    fn labels(&self, path: &str) -> MethodLabels {
        match &self.known {
            None => MethodLabels::of(path),
            Some(known) => known.get(path).cloned().unwrap_or_else(|| MethodLabels {
                grpc_service: UNKNOWN_METHOD.to_string(),
                grpc_method: UNKNOWN_METHOD.to_string(),
            }),
        }
    }
}

impl GrpcMetricsLayer {
    fn record(&self, labels: MethodLabels, code: &'static str, started: Instant) {
        self.handling
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        self.handled
            .get_or_create(&HandledLabels {
                grpc_service: labels.grpc_service,
                grpc_method: labels.grpc_method,
                grpc_code: code,
            })
            .inc();
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    layer: GrpcMetricsLayer,
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let labels = self.layer.labels(request.uri().path());
        let layer = self.layer.clone();
        layer.started.get_or_create(&labels).inc();
        let started = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let result = response.await;
            // Errors carry their status in the headers (trailers-only responses); a response
            // without one succeeded or streams its status in the trailers.
            let code = match &result {
                Ok(response) => code_name(header_status(response.headers()).unwrap_or(0)),
                Err(_) => code_name(UNAVAILABLE),
            };
            layer.record(labels, code, started);
            result
        })
    }
}

impl MethodLabels {
    fn of(path: &str) -> Self {
        let (service, method) = split_path(path);
        Self {
            grpc_service: service.to_string(),
            grpc_method: method.to_string(),
        }
    }
}

/// The name of gRPC status code `code` as Prometheus labels and ghz reports write it (Go's
/// names: `OK`, `Canceled`, `ResourceExhausted`, ...).
pub fn code_name(code: usize) -> &'static str {
    CODE_NAMES.get(code).copied().unwrap_or("Unknown")
}

/// The name of a status code as gRPC's specification writes it (`INVALID_ARGUMENT`,
/// `UNAVAILABLE`, ...): for people and for clients that match on it.
pub fn status_name(code: tonic::Code) -> String {
    if code == tonic::Code::Ok {
        return "OK".into();
    }
    let code = usize::try_from(i32::from(code)).unwrap_or(2);
    code_name(code)
        .chars()
        .fold(String::new(), |mut name, c| {
            if c.is_uppercase() && !name.is_empty() {
                name.push('_');
            }
            name.push(c.to_ascii_uppercase());
            name
        })
        .replace("CANCELED", "CANCELLED")
}

/// gRPC status code names, indexed by code.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// Client layer, one per service, shared by all its clients: `grpc_client_started_total`,
/// `grpc_client_handled_total` and `grpc_client_handling_seconds` by service, method and
/// code, inside a client span per call whose trace context goes to the peer as `traceparent`.
#[derive(Clone)]
pub struct GrpcClientLayer {
    metrics: GrpcMetricsLayer,
}

impl std::fmt::Debug for GrpcClientLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcClientLayer").finish_non_exhaustive()
    }
}

impl GrpcClientLayer {
    pub fn new(metrics: &Metrics) -> Self {
        Self {
            metrics: GrpcMetricsLayer::for_side(metrics, "client"),
        }
    }
}

/// A client wrapped in its span and its metrics.
pub type GrpcClient<S> = Traced<GrpcMetrics<S>>;

impl<S> tower::Layer<S> for GrpcClientLayer {
    type Service = GrpcClient<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceLayer::client().layer(self.metrics.layer(inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::{Layer as _, Service as _};

    #[tokio::test]
    async fn counts_requests_by_code() {
        let metrics = Metrics::new();
        let known = [("pkg.Svc", "Good"), ("pkg.Svc", "Bad")];
        let mut service = GrpcMetricsLayer::new(&metrics, known).layer(tower::service_fn(
            |request: http::Request<()>| async move {
                let mut response = http::Response::new(());
                if request.uri().path().ends_with("Bad") {
                    response
                        .headers_mut()
                        .insert("grpc-status", http::HeaderValue::from_static("3"));
                }
                Ok::<_, Infallible>(response)
            },
        ));
        for path in [
            "/pkg.Svc/Good",
            "/pkg.Svc/Bad",
            "/pkg.Svc/Bad",
            "/pkg.Svc/Nope",
            "/x",
        ] {
            let request = http::Request::builder().uri(path).body(()).unwrap();
            service.call(request).await.unwrap();
        }
        let text = metrics.encode();
        assert!(text.contains(
            r#"grpc_server_handled_total{grpc_service="pkg.Svc",grpc_method="Bad",grpc_code="InvalidArgument"} 2"#
        ), "{text}");
        assert!(text.contains(
            r#"grpc_server_handled_total{grpc_service="pkg.Svc",grpc_method="Good",grpc_code="OK"} 1"#
        ), "{text}");
        assert!(
            text.contains(
                r#"grpc_server_handling_seconds_count{grpc_service="pkg.Svc",grpc_method="Good"} 1"#
            ),
            "{text}"
        );
        // Paths the server does not serve share one label set.
        assert!(
            text.contains(
                r#"grpc_server_started_total{grpc_service="unknown",grpc_method="unknown"} 2"#
            ),
            "{text}"
        );
        assert!(!text.contains("Nope"), "{text}");
    }
}
