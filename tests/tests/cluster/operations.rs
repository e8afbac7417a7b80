//! What operators rely on: every service answers gRPC health and reflection, and its admin port
//! serves /healthz, /readyz and Prometheus metrics.

use std::net::SocketAddr;

use engram_proto::tonic::transport::Channel;
use engram_tests::{Sandbox, http_get, pb};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn listed_services(addr: SocketAddr) -> Vec<String> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel(addr).await)
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection response {other:?}"),
    }
}

#[tokio::test]
async fn every_service_answers_health_reflection_and_metrics() {
    let sandbox = Sandbox::start().await;
    let a = sandbox.addrs;
    let services = [
        (a.gateway, a.gateway_admin, "engram.v1.MemoryService"),
        (a.retrieval, a.retrieval_admin, "engram.internal.v1.Index"),
        (
            a.ingestion,
            a.ingestion_admin,
            "engram.internal.v1.Ingestion",
        ),
        (
            a.embedding,
            a.embedding_admin,
            "engram.internal.v1.Embedder",
        ),
    ];
    // Some traffic, so the RPC metrics have something to show.
    let mut client = sandbox.client().await;
    client
        .recall(pb::RecallRequest {
            scope: Some(pb::Scope {
                user_id: "ops".into(),
                ..Default::default()
            }),
            query: "anything".into(),
            top_k: 1,
            ..Default::default()
        })
        .await
        .unwrap();

    for (grpc, admin, name) in services {
        let health = HealthClient::new(channel(grpc).await)
            .check(HealthCheckRequest {
                service: name.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(health.status(), ServingStatus::Serving, "{name}");
        let listed = listed_services(grpc).await;
        assert!(
            listed.iter().any(|s| s == name),
            "{name} not in reflection: {listed:?}"
        );
        assert!(listed.iter().any(|s| s == "grpc.health.v1.Health"));

        let admin = admin.expect("admin port");
        assert_eq!(http_get(admin, "/healthz").await.0, 200);
        assert_eq!(http_get(admin, "/readyz").await.0, 200);
        let (status, metrics) = http_get(admin, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            metrics.contains("grpc_server_handling_seconds"),
            "{name}: {metrics}"
        );
    }
    let (_, gateway_metrics) = http_get(a.gateway_admin.unwrap(), "/metrics").await;
    assert!(gateway_metrics.contains(
        r#"grpc_server_handled_total{grpc_service="engram.v1.MemoryService",grpc_method="Recall",grpc_code="OK"} 1"#
    ));
    let (_, retrieval_metrics) = http_get(a.retrieval_admin.unwrap(), "/metrics").await;
    assert!(retrieval_metrics.contains(r#"engram_recall_stage_seconds_count{stage="dense"} 1"#));
    sandbox.stop().await;
}
