//! Distributed tracing: spans exported over OTLP, and W3C trace context carried in gRPC metadata
//! across every hop.
//!
//! Every gRPC server is wrapped in [`TraceLayer`] (one span per RPC, continuing the caller's
//! trace from its `traceparent` header) and every gRPC client in [`GrpcClientLayer`] (one client
//! span per call, whose context it sends as `traceparent`). So one Recall is one trace: the
//! gateway's server span, its client span, retrieval's server span, its client span to the
//! embedding service, and so on, each with its parent. Spans are exported only when an OTLP
//! endpoint is configured ([`TraceConfig`]); without one the same spans exist for the logs and
//! cost a few hundred nanoseconds each.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{SpanContext, TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Where spans go.
#[derive(Debug, Clone, clap::Args)]
pub struct TraceConfig {
    /// OTLP/gRPC endpoint to export spans to, e.g. `http://otel-collector:4317`. Unset: the
    /// standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` are used if
    /// set, and otherwise nothing is exported.
    #[arg(long = "otlp-endpoint", env = "ENGRAM_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces sampled, from 0 to 1. A request that arrives with a sampled
    /// trace context is always traced, so one trace is never cut in half.
    #[arg(
        long = "trace-sample-ratio",
        env = "ENGRAM_TRACE_SAMPLE_RATIO",
        default_value_t = 1.0
    )]
    pub sample_ratio: f64,
}

impl Default for TraceConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sample_ratio: 1.0,
        }
    }
}

impl TraceConfig {
    /// The endpoint to export to, from engram's setting or the standard variables.
    fn endpoint(&self) -> Option<Endpoint> {
        if let Some(url) = self.otlp_endpoint.as_ref().filter(|u| !u.is_empty()) {
            return Some(Endpoint::Explicit(url.clone()));
        }
        [
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ]
        .iter()
        .any(|var| std::env::var(var).is_ok_and(|v| !v.is_empty()))
        .then_some(Endpoint::FromEnvironment)
    }
}

enum Endpoint {
    Explicit(String),
    /// The exporter reads the `OTEL_EXPORTER_OTLP_*` variables itself.
    FromEnvironment,
}

/// The exporting half of tracing, kept by the process until it exits; [`Tracing::shutdown`]
/// sends the spans still buffered.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Build the OTLP exporter for `service` (the `service.name` resource, unless
    /// `OTEL_SERVICE_NAME` says otherwise), or `None` when no endpoint is configured. Must run
    /// inside the tokio runtime, which the exporter runs on.
    pub fn start(config: &TraceConfig, service: &str) -> Result<Option<Self>, String> {
        if !(0.0..=1.0).contains(&config.sample_ratio) {
            return Err(format!(
                "ENGRAM_TRACE_SAMPLE_RATIO: {} is not between 0 and 1",
                config.sample_ratio
            ));
        }
        let Some(endpoint) = config.endpoint() else {
            return Ok(None);
        };
        let builder = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_timeout(Duration::from_secs(5));
        let builder = match &endpoint {
            Endpoint::Explicit(url) => builder.with_endpoint(url.clone()),
            Endpoint::FromEnvironment => builder,
        };
        let exporter = builder
            .build()
            .map_err(|e| format!("ENGRAM_OTLP_ENDPOINT: cannot build the OTLP exporter: {e}"))?;
        let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
        let mut resource = opentelemetry_sdk::Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service.to_string());
        }
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(resource.build())
            .build();
        Ok(Some(Self { provider }))
    }

    /// A `tracing` layer that turns spans into OpenTelemetry spans for this exporter.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("engram"))
    }

    /// Export every finished span now (tests; shutdown does it too).
    pub async fn flush(&self) {
        let provider = self.provider.clone();
        let _ = tokio::task::spawn_blocking(move || provider.force_flush()).await;
    }

    /// Export what is buffered and stop.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    }
}

/// Use W3C trace context (`traceparent`, `tracestate`) on every hop. Idempotent.
pub fn install_propagator() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The trace context `headers` carry (empty if none).
pub fn extract(headers: &http::HeaderMap) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
}

/// Write the context of `span` into `headers` as `traceparent`.
pub fn inject(span: &tracing::Span, headers: &mut http::HeaderMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers));
    });
}

/// The W3C `traceparent` of the current span, to store with work done later (empty when the
/// span is not being traced).
pub fn current_traceparent() -> String {
    let mut headers = http::HeaderMap::new();
    inject(&tracing::Span::current(), &mut headers);
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// Link `span` to the span a stored `traceparent` names (background work linked to the request
/// that caused it). Nothing happens for an empty or malformed value.
pub fn link_to(span: &tracing::Span, traceparent: &str) {
    let Ok(value) = http::HeaderValue::from_str(traceparent) else {
        return;
    };
    let mut headers = http::HeaderMap::new();
    headers.insert("traceparent", value);
    let context: SpanContext = extract(&headers).span().span_context().clone();
    if context.is_valid() {
        span.add_link(context);
    }
}

/// `/engram.v1.MemoryService/Recall` → (`engram.v1.MemoryService`, `Recall`).
pub(crate) fn split_path(path: &str) -> (&str, &str) {
    let path = path.trim_start_matches('/');
    path.split_once('/').unwrap_or((path, ""))
}

/// The gRPC status of a response whose status is in its headers (trailers-only responses: every
/// error of a unary call); `None` when it will come in the trailers.
pub(crate) fn header_status(headers: &http::HeaderMap) -> Option<usize> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
}

/// What a server makes of the trace context its caller sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerTraces {
    /// Continue the caller's trace, sampled as the caller decided (engram's own services).
    Continue,
    /// Start a trace of its own, sampled by `ENGRAM_TRACE_SAMPLE_RATIO`, linked to the
    /// caller's: a public caller cannot make every one of its calls traced.
    Link,
}

/// Which end of an RPC a [`TraceLayer`] wraps.
#[derive(Debug, Clone, Copy)]
enum Side {
    /// The span continues (or links to) the caller's trace; the engram service serving is
    /// recorded as `engram.service` so services sharing one process stay distinguishable.
    Server(&'static str, CallerTraces),
    /// The span's context goes to the peer as `traceparent`.
    Client,
}

/// One span per RPC: on a server, child of the trace context the caller sent; on a client,
/// sent to the peer.
#[derive(Debug, Clone)]
pub struct TraceLayer {
    side: Side,
    /// On a server, the paths it serves: a span of any other is named `unknown/unknown`, so
    /// what a caller sends never names a span.
    known: Option<std::sync::Arc<std::collections::HashSet<String>>>,
}

impl TraceLayer {
    /// For the server of `service` (gateway, retrieval, ...) serving `methods`, the (service,
    /// method) full names of what it serves.
    pub fn new(service: &'static str, callers: CallerTraces, methods: &[(String, String)]) -> Self {
        Self {
            side: Side::Server(service, callers),
            known: Some(std::sync::Arc::new(
                methods
                    .iter()
                    .map(|(service, method)| format!("/{service}/{method}"))
                    .collect(),
            )),
        }
    }

    /// For a client (see [`crate::GrpcClientLayer`], which adds the client metrics).
    pub fn client() -> Self {
        Self {
            side: Side::Client,
            known: None,
        }
    }
}

impl<S> tower::Layer<S> for TraceLayer {
    type Service = Traced<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Traced {
            inner,
            side: self.side,
            known: self.known.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Traced<S> {
    inner: S,
    side: Side,
    known: Option<std::sync::Arc<std::collections::HashSet<String>>>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Traced<S>
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

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let (service, method) = match &self.known {
            Some(known) if !known.contains(path) => (
                crate::metrics::UNKNOWN_METHOD,
                crate::metrics::UNKNOWN_METHOD,
            ),
            _ => split_path(path),
        };
        let span = match self.side {
            Side::Server(engram_service, callers) => {
                let span = tracing::info_span!(
                    "grpc.server",
                    otel.name = %format_args!("{service}/{method}"),
                    otel.kind = "server",
                    rpc.system = "grpc",
                    rpc.service = %service,
                    rpc.method = %method,
                    engram.service = engram_service,
                    rpc.grpc.status_code = tracing::field::Empty,
                );
                let parent = extract(request.headers());
                let context = parent.span().span_context().clone();
                if context.is_valid() {
                    match callers {
                        CallerTraces::Continue => {
                            let _ = span.set_parent(parent);
                        }
                        CallerTraces::Link => span.add_link(context),
                    }
                }
                span
            }
            Side::Client => {
                let span = tracing::info_span!(
                    "grpc.client",
                    otel.name = %format_args!("{service}/{method}"),
                    otel.kind = "client",
                    rpc.system = "grpc",
                    rpc.service = %service,
                    rpc.method = %method,
                    rpc.grpc.status_code = tracing::field::Empty,
                );
                inject(&span, request.headers_mut());
                span
            }
        };
        let response = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        let recorded = span.clone();
        Box::pin(
            async move {
                let result = response.await;
                // A transport error is UNAVAILABLE, as the metrics count it.
                let code = match &result {
                    Ok(response) => header_status(response.headers()).unwrap_or(0),
                    Err(_) => UNAVAILABLE,
                };
                recorded.record("rpc.grpc.status_code", code);
                result
            }
            .instrument(span),
        )
    }
}

/// gRPC's code for UNAVAILABLE.
pub(crate) const UNAVAILABLE: usize = 14;
