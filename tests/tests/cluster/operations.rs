//! What operators rely on: every service answers gRPC health and reflection, and its admin port
//! serves /healthz, /readyz and Prometheus metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use engram_proto::prost::Message as _;
use engram_proto::prost_types::FileDescriptorProto;

use engram_tests::{InternalChannel, Sandbox, http_get, pb};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

/// A channel to one of the sandbox's ports carrying the cluster's credential, as an operator's
/// tools inside the cluster would (the internal ports refuse reflection without it).
async fn channel(sandbox: &Sandbox, addr: SocketAddr) -> InternalChannel {
    sandbox.internal_channel(addr).await
}

async fn reflect(sandbox: &Sandbox, addr: SocketAddr, request: MessageRequest) -> MessageResponse {
    try_reflect(sandbox, addr, request).await.unwrap()
}

/// A reflection answer, or the status the stream ended with (tonic's reflection answers an
/// unknown symbol with NOT_FOUND).
async fn try_reflect(
    sandbox: &Sandbox,
    addr: SocketAddr,
    request: MessageRequest,
) -> Result<MessageResponse, engram_proto::tonic::Status> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut responses = ServerReflectionClient::new(channel(sandbox, addr).await)
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await?
        .into_inner();
    let response = responses.message().await?.expect("a reflection answer");
    Ok(response.message_response.expect("a reflection answer"))
}

async fn listed_services(sandbox: &Sandbox, addr: SocketAddr) -> BTreeSet<String> {
    match reflect(sandbox, addr, MessageRequest::ListServices(String::new())).await {
        MessageResponse::ListServicesResponse(list) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection response {other:?}"),
    }
}

fn files_of(response: MessageResponse) -> Vec<FileDescriptorProto> {
    match response {
        MessageResponse::FileDescriptorResponse(files) => files
            .file_descriptor_proto
            .iter()
            .map(|bytes| FileDescriptorProto::decode(bytes.as_slice()).unwrap())
            .collect(),
        other => panic!("unexpected reflection response {other:?}"),
    }
}

/// What a client with no built-in descriptors (not even the well-known types) learns of
/// `service` from the port's reflection alone: the file defining it and, by file name, every
/// file that imports, transitively. Building the pool fails if any type cannot be resolved.
async fn reflected_pool(
    sandbox: &Sandbox,
    addr: SocketAddr,
    service: &str,
) -> prost_reflect::DescriptorPool {
    let mut files: BTreeMap<String, FileDescriptorProto> = BTreeMap::new();
    let mut pending = files_of(
        reflect(
            sandbox,
            addr,
            MessageRequest::FileContainingSymbol(service.into()),
        )
        .await,
    );
    while let Some(file) = pending.pop() {
        for dependency in &file.dependency {
            if !files.contains_key(dependency) && pending.iter().all(|f| f.name() != dependency) {
                let answer = reflect(
                    sandbox,
                    addr,
                    MessageRequest::FileByFilename(dependency.clone()),
                );
                pending.extend(files_of(answer.await));
            }
        }
        files.insert(file.name().to_string(), file);
    }
    // Dependencies first.
    let mut ordered = Vec::new();
    while !files.is_empty() {
        let ready: Vec<String> = files
            .iter()
            .filter(|(_, f)| f.dependency.iter().all(|d| !files.contains_key(d)))
            .map(|(name, _)| name.clone())
            .collect();
        assert!(!ready.is_empty(), "an import cycle in {files:?}");
        for name in ready {
            ordered.extend(files.remove(&name));
        }
    }
    let mut pool = prost_reflect::DescriptorPool::new();
    pool.add_file_descriptor_protos(ordered)
        .unwrap_or_else(|e| panic!("{service}: reflection is incomplete: {e}"));
    pool
}

#[tokio::test]
async fn every_service_answers_health_reflection_and_metrics() {
    let sandbox = Sandbox::start().await;
    let a = sandbox.addrs;
    let services = [
        (
            a.gateway,
            a.gateway_admin,
            &["engram.v1.MemoryService", "engram.v1.ChatService"][..],
        ),
        (
            a.retrieval,
            a.retrieval_admin,
            &["engram.internal.v1.Index"],
        ),
        (
            a.ingestion,
            a.ingestion_admin,
            &["engram.internal.v1.Ingestion"],
        ),
        (
            a.embedding,
            a.embedding_admin,
            &["engram.internal.v1.Embedder"],
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

    for (grpc, admin, names) in services {
        let name = names[0];
        for name in names {
            let health = HealthClient::new(channel(&sandbox, grpc).await)
                .check(HealthCheckRequest {
                    service: name.to_string(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(health.status(), ServingStatus::Serving, "{name}");
        }
        // Reflection lists exactly what the port serves, and every request and response type
        // of each of those services can be built from what it answers.
        let listed = listed_services(&sandbox, grpc).await;
        let expected: BTreeSet<String> = names
            .iter()
            .copied()
            .chain([
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ])
            .map(String::from)
            .collect();
        assert_eq!(listed, expected, "reflection of the port serving {name}");
        for service in &listed {
            let pool = reflected_pool(&sandbox, grpc, service).await;
            let descriptor = pool.get_service_by_name(service).unwrap();
            for method in descriptor.methods() {
                let (input, output) = (method.input(), method.output());
                assert!(
                    pool.get_message_by_name(input.full_name()).is_some()
                        && pool.get_message_by_name(output.full_name()).is_some(),
                    "{service}/{}",
                    method.name()
                );
            }
        }

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
    // The public port says nothing of the internal API.
    match try_reflect(
        &sandbox,
        a.gateway,
        MessageRequest::FileContainingSymbol("engram.internal.v1.Index".into()),
    )
    .await
    {
        Ok(MessageResponse::ErrorResponse(e)) => {
            assert_eq!(e.error_code, engram_proto::tonic::Code::NotFound as i32)
        }
        Err(status) => assert_eq!(status.code(), engram_proto::tonic::Code::NotFound),
        Ok(other) => panic!("the gateway described the internal API: {other:?}"),
    }
    // Paths the gateway does not serve, sent without a key, add no series: all count as
    // `unknown`.
    let mut grpc = engram_proto::tonic::client::Grpc::new(channel(&sandbox, a.gateway).await);
    for i in 0..20 {
        grpc.ready().await.unwrap();
        let path = format!("/evil{i}.Service/Method{i}").parse().unwrap();
        let codec = tonic_prost::ProstCodec::<pb::GetRequest, pb::GetResponse>::default();
        let refused = grpc
            .unary(
                engram_proto::tonic::Request::new(pb::GetRequest::default()),
                path,
                codec,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                refused.code(),
                engram_proto::tonic::Code::Unimplemented
                    | engram_proto::tonic::Code::Unauthenticated
            ),
            "{refused:?}"
        );
    }
    let (_, gateway_metrics) = http_get(a.gateway_admin.unwrap(), "/metrics").await;
    assert!(
        gateway_metrics.contains(
            r#"grpc_server_started_total{grpc_service="unknown",grpc_method="unknown"} 20"#
        ),
        "{gateway_metrics}"
    );
    assert!(!gateway_metrics.contains("evil"), "{gateway_metrics}");
    assert!(gateway_metrics.contains(
        r#"grpc_server_handled_total{grpc_service="engram.v1.MemoryService",grpc_method="Recall",grpc_code="OK"} 1"#
    ));
    let (_, retrieval_metrics) = http_get(a.retrieval_admin.unwrap(), "/metrics").await;
    assert!(retrieval_metrics.contains(r#"engram_recall_stage_seconds_count{stage="dense"} 1"#));
    sandbox.stop().await;
}
