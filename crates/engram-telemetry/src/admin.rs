//! The admin HTTP server every service runs beside its gRPC port:
//!
//! - `GET /healthz`: 200 while the process is alive.
//! - `GET /readyz`: 200 when the service can serve traffic, 503 with the reason otherwise.
//! - `GET /metrics`: the service's Prometheus metrics in text format.

use std::future::Future;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::{Health, Metrics};

#[derive(Clone)]
struct AdminState {
    health: Health,
    metrics: Metrics,
}

/// Serve the admin endpoints until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    health: Health,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AdminState { health, metrics });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    match state.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

async fn metrics_text(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// The most of a response [`fetch`] reads: a `/metrics` page of every series engram registers
/// is tens of kilobytes.
pub const MAX_RESPONSE_BYTES: u64 = 16 << 20;

/// `GET path` from an admin server (or any plain HTTP server) at `addr`, as HTTP/1.0 so the
/// body ends with the connection: its status and body. For `engram stats` and the tests; a
/// response over [`MAX_RESPONSE_BYTES`] or slower than `timeout` is an error.
pub async fn fetch(
    addr: std::net::SocketAddr,
    path: &str,
    timeout: std::time::Duration,
) -> std::io::Result<(u16, String)> {
    use std::io::{Error, ErrorKind};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        (&mut stream)
            .take(MAX_RESPONSE_BYTES + 1)
            .read_to_end(&mut response)
            .await?;
        if response.len() as u64 > MAX_RESPONSE_BYTES {
            return Err(Error::new(
                ErrorKind::InvalidData,
                format!("http://{addr}{path}: response over {MAX_RESPONSE_BYTES} bytes"),
            ));
        }
        let response = String::from_utf8_lossy(&response);
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidData,
                    format!("http://{addr}{path}: not an HTTP response"),
                )
            })?;
        Ok((status, body.to_string()))
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| {
        Error::new(
            ErrorKind::TimedOut,
            format!("http://{addr}{path}: no answer within {timeout:?}"),
        )
    })?
}
