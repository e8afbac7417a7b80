//! Telemetry shared by every engram service: structured logs, Prometheus metrics, the gRPC
//! metrics layer, and the admin HTTP server (`/healthz`, `/readyz`, `/metrics`).
//!
//! A service creates one [`Metrics`] registry, hands it to each component so they register
//! their own series, wraps its gRPC server in [`GrpcMetricsLayer`], and serves the registry and
//! its [`Health`] on the admin port with [`admin::serve`]. Each service owns its registry, so
//! several services (or replicas) in one process each report only their own numbers.

pub mod admin;
mod health;
mod logging;
mod metrics;
pub mod trace;

pub use health::Health;
pub use logging::{LogConfig, LogFormat, init_logging};
pub use metrics::{
    GrpcClient, GrpcClientLayer, GrpcMetricsLayer, Metrics, code_name, latency_buckets, status_name,
};
pub use prometheus_client;
pub use trace::{CallerTraces, TraceConfig, TraceLayer, Tracing};
