//! One trace across every hop, received by a real OTLP trace service in this test: a Recall is
//! one trace through gateway → retrieval → embedding with the cache lookups and store queries
//! as child spans; a Remember is one trace through ingestion, and the background indexing of
//! that write links to it. (Its own test binary: it installs the process's global subscriber.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use engram_proto::tonic::{self, Request, Response, Status};
use engram_proto::v1 as pb;
use engram_telemetry::{LogConfig, LogFormat, TraceConfig};
use engram_tests::Sandbox;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use parking_lot::Mutex;

/// An OTLP trace receiver keeping every span it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(Value::StringValue(s)) => Some(s.as_str()),
            _ => None,
        })
}

/// The server span of `service` (gateway, retrieval, …) handling `method`.
fn server_span<'a>(spans: &'a [Span], service: &str, method: &str) -> Option<&'a Span> {
    spans.iter().find(|s| {
        s.name.ends_with(&format!("/{method}"))
            && attribute(s, "engram.service") == Some(service)
            && attribute(s, "rpc.method") == Some(method)
    })
}

/// Wait until `found` finds something in what the receiver holds, flushing as it goes.
async fn wait_for<T>(
    receiver: &Receiver,
    tracing: &engram_telemetry::Tracing,
    found: impl Fn(&[Span]) -> Option<T>,
) -> T {
    for _ in 0..100 {
        tracing.flush().await;
        if let Some(t) = found(&receiver.spans.lock()) {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "never received the spans; got: {:?}",
        receiver
            .spans
            .lock()
            .iter()
            .map(|s| s.name.clone())
            .collect::<Vec<_>>()
    );
}

/// The chain of ancestors of `span` within `trace` (nearest first).
fn ancestors<'a>(span: &'a Span, trace: &HashMap<Vec<u8>, &'a Span>) -> Vec<&'a Span> {
    let mut chain = Vec::new();
    let mut current = span;
    while !current.parent_span_id.is_empty() {
        let parent = trace
            .get(&current.parent_span_id)
            .unwrap_or_else(|| panic!("{}'s parent is not in the trace", current.name));
        chain.push(*parent);
        current = parent;
    }
    chain
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recall_and_a_remember_are_each_one_trace_across_the_services() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let log = LogConfig {
        filter: "info,qdrant_edge=error".into(),
        format: LogFormat::Text,
        trace: TraceConfig {
            otlp_endpoint: Some(format!("http://{addr}")),
            sample_ratio: 1.0,
        },
    };
    let tracing = engram_telemetry::init_logging(&log, "engram-test")
        .unwrap()
        .expect("an endpoint is configured");

    let sandbox = Sandbox::start().await;
    let mut client = sandbox.client().await;

    // A Remember through the write log, then a Recall that misses the cache.
    client
        .remember(pb::RememberRequest {
            scope: Some(pb::Scope {
                user_id: "traced".into(),
                ..Default::default()
            }),
            memories: vec![pb::MemoryInput {
                text: "the traced user keeps bees on the roof".into(),
                ..Default::default()
            }],
            mode: pb::WriteMode::Async.into(),
            extract: false,
            privacy: 0,
        })
        .await
        .unwrap();
    client
        .recall(pb::RecallRequest {
            scope: Some(pb::Scope {
                user_id: "traced".into(),
                ..Default::default()
            }),
            query: "what does the traced user keep?".into(),
            top_k: 5,
            ..Default::default()
        })
        .await
        .unwrap();

    // The Recall: gateway, retrieval and embedding server spans in one trace, each below the
    // one before it, and the cache and store work as children.
    let spans = wait_for(&receiver, &tracing, |spans| {
        let root = server_span(spans, "gateway", "Recall")?;
        let trace: Vec<Span> = spans
            .iter()
            .filter(|s| s.trace_id == root.trace_id)
            .cloned()
            .collect();
        (server_span(&trace, "embedding", "Embed").is_some()
            && trace.iter().any(|s| s.name == "cache.lookup")
            && trace.iter().any(|s| s.name == "store.search"))
        .then_some(trace)
    })
    .await;
    let by_id: HashMap<Vec<u8>, &Span> = spans.iter().map(|s| (s.span_id.clone(), s)).collect();
    let gateway = server_span(&spans, "gateway", "Recall").unwrap();
    let retrieval = server_span(&spans, "retrieval", "Search").unwrap();
    let embedding = server_span(&spans, "embedding", "Embed").unwrap();
    assert!(
        gateway.parent_span_id.is_empty(),
        "the gateway's span is the root"
    );
    let retrieval_chain = ancestors(retrieval, &by_id);
    assert!(
        retrieval_chain.iter().any(|s| s.span_id == gateway.span_id),
        "retrieval's span descends from the gateway's"
    );
    assert_eq!(
        retrieval_chain[0].name, "engram.internal.v1.Index/Search",
        "retrieval's parent is the gateway's client span"
    );
    let embedding_chain = ancestors(embedding, &by_id);
    assert!(
        embedding_chain
            .iter()
            .any(|s| s.span_id == retrieval.span_id)
    );
    for name in ["cache.lookup", "store.search"] {
        let child = spans.iter().find(|s| s.name == name).unwrap();
        assert!(
            ancestors(child, &by_id)
                .iter()
                .any(|s| s.span_id == retrieval.span_id),
            "{name} is inside retrieval's span"
        );
    }

    // The Remember: gateway → ingestion in one trace; the indexing span links to it.
    let (remember_trace, indexed) = wait_for(&receiver, &tracing, |spans| {
        let root = server_span(spans, "gateway", "Remember")?;
        let ingestion = server_span(spans, "ingestion", "Submit")?;
        let linked = spans.iter().find(|s| {
            s.name == "ingest.index" && s.links.iter().any(|l| l.trace_id == root.trace_id)
        })?;
        (ingestion.trace_id == root.trace_id).then(|| (root.trace_id.clone(), linked.clone()))
    })
    .await;
    assert_ne!(
        indexed.trace_id, remember_trace,
        "indexing is its own trace, linked"
    );

    // A public caller's sampled trace context is not continued: the gateway's call is a trace
    // of its own (sampled by the ratio), linked to the caller's.
    let callers_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(pb::RecallRequest {
        scope: Some(pb::Scope {
            user_id: "traced".into(),
            ..Default::default()
        }),
        query: "bees again, from a caller with its own trace".into(),
        top_k: 5,
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{callers_trace}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    client.recall(request).await.unwrap();
    let callers: Vec<u8> = (0..callers_trace.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&callers_trace[i..i + 2], 16).unwrap())
        .collect();
    let linked = wait_for(&receiver, &tracing, |spans| {
        spans
            .iter()
            .find(|s| {
                attribute(s, "engram.service") == Some("gateway")
                    && s.links.iter().any(|l| l.trace_id == callers)
            })
            .cloned()
    })
    .await;
    assert_ne!(
        linked.trace_id, callers,
        "the caller's trace is not continued"
    );
    assert!(linked.parent_span_id.is_empty(), "{linked:?}");

    sandbox.stop().await;
    tracing.shutdown().await;
}
