//! Hostile callers, through the real gateway and services: what a caller outside the cluster,
//! or a pod inside it without the cluster's credential, can make the services do.
//!
//! Here: the internal ports' credential, write tokens bound to their tenant, request bytes
//! bounded before and while they are decoded (per method and across calls), List pages bounded
//! in bytes. Elsewhere, each beside the feature it attacks: unknown paths in metric labels
//! (`operations`), tenant isolation, roles and rates (`gateway`), Converse streams, token caps
//! and provider bodies (`conversation`), one tenant's cached vectors never answering another
//! (`embedding`), and, as unit tests and property tests of their crates, the privacy scanner
//! in linear time, secrets never printed, and the request walk against prost's decoder.

use bytes::Bytes;
use engram_domain::model::TenantId;
use engram_gateway::Role;
use engram_proto::internal::v1 as ipb;
use engram_proto::tonic::Code;
use engram_proto::tonic::transport::Channel;
use engram_proto::v1 as pb;
use engram_tests::{Options, Sandbox, eventually};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::gateway::{key, keys_edge, scope};

async fn plain_channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A channel whose calls carry the credential of a cluster with another secret.
async fn foreign_channel(addr: std::net::SocketAddr) -> engram_tests::InternalChannel {
    let secret: engram_domain::ClusterSecret =
        "another-cluster-another-secret-0123456789".parse().unwrap();
    let outgoing = engram_runtime::cluster_auth::Outgoing::new(Some(&secret)).unwrap();
    engram_proto::tonic::service::interceptor::InterceptedService::new(
        plain_channel(addr).await,
        outgoing,
    )
}

#[tokio::test]
async fn internal_ports_refuse_calls_without_the_cluster_s_credential() {
    let sandbox = Sandbox::start().await;
    let a = sandbox.addrs;
    for addr in [a.retrieval, a.ingestion, a.embedding] {
        // The kubelet's probes need no credential.
        let health = HealthClient::new(plain_channel(addr).await)
            .check(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(health.status(), ServingStatus::Serving);
    }
    let stats = ipb::StatsRequest {
        tenant: "default".into(),
    };
    let refused = ipb::index_client::IndexClient::new(plain_channel(a.retrieval).await)
        .stats(stats.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("ENGRAM_CLUSTER_SECRET"),
        "{refused:?}"
    );
    let refused = ipb::index_client::IndexClient::new(foreign_channel(a.retrieval).await)
        .stats(stats.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let embed = ipb::EmbedRequest {
        texts: vec!["who else wrote this?".into()],
        purpose: ipb::Purpose::Query.into(),
        tenant: "default".into(),
    };
    let refused = ipb::embedder_client::EmbedderClient::new(plain_channel(a.embedding).await)
        .embed(embed.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let refused = ipb::ingestion_client::IngestionClient::new(plain_channel(a.ingestion).await)
        .submit(ipb::SubmitRequest {
            tenant: "default".into(),
            remember: Some(pb::RememberRequest {
                scope: scope("intruder"),
                memories: vec![pb::MemoryInput {
                    text: "planted".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    // Reflection of the internal API needs it too.
    let refused = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
        plain_channel(a.retrieval).await,
    )
    .server_reflection_info(tokio_stream::iter(vec![
        tonic_reflection::pb::v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                    String::new(),
                ),
            ),
        },
    ]))
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    // With the cluster's credential, the same calls are served.
    ipb::index_client::IndexClient::new(sandbox.internal_channel(a.retrieval).await)
        .stats(stats)
        .await
        .unwrap();
    ipb::embedder_client::EmbedderClient::new(sandbox.internal_channel(a.embedding).await)
        .embed(embed)
        .await
        .unwrap();
    let mut client = sandbox.client().await;
    let listed = client
        .list(pb::ListRequest {
            scope: scope("intruder"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.memories.is_empty(), "{listed:?}");
    sandbox.stop().await;
}

#[tokio::test]
async fn write_tokens_answer_only_the_tenant_they_were_issued_to() {
    let (acme_key, acme) = key("acme-w", "acme", Role::Write, "");
    let (globex_key, globex) = key("globex-w", "globex", Role::Write, "");
    let sandbox = Sandbox::start_with(
        None,
        Options {
            edge: keys_edge(&[&acme, &globex]),
            ..Options::default()
        },
    )
    .await;
    let mut acme_client = sandbox.client_with_key(Some(&acme_key)).await;
    let mut globex_client = sandbox.client_with_key(Some(&globex_key)).await;
    let written = acme_client
        .remember(pb::RememberRequest {
            scope: scope("ada"),
            memories: vec![pb::MemoryInput {
                text: "The vault code is in the blue notebook".into(),
                ..Default::default()
            }],
            mode: pb::WriteMode::Async.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let token = written.write_token;
    assert!(token.starts_with("wt2.l"), "{token}");
    let list = |token: &str| pb::ListRequest {
        scope: scope("ada"),
        after_write_token: token.to_string(),
        ..Default::default()
    };
    // Its own tenant waits for it and reads it.
    let own = acme_client.list(list(&token)).await.unwrap().into_inner();
    assert_eq!(own.memories.len(), 1);
    // Another tenant's read with it is refused at once, saying nothing of the write.
    let refused = globex_client.list(list(&token)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("after_write_token")
            && !refused.message().contains("pending")
            && !refused.message().contains("failed"),
        "{refused:?}"
    );
    // A token made up from a real one (another entry of the same partition, the MAC kept), or
    // an unsigned internal one, is refused by its signature before anything is looked up (a
    // look-up of an entry that does not exist would wait for it).
    let (body, mac) = token.rsplit_once('.').unwrap();
    let forged = [
        format!("{body}9.{mac}"),
        token.replacen("wt2.", "wt1.", 1),
        format!("wt1.{}", body.trim_start_matches("wt2.")),
        "wt2.l0.99999999999999-0.00000000000000000000000000000000".to_string(),
    ];
    for forged in forged {
        let refused = acme_client.list(list(&forged)).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{forged}: {refused:?}"
        );
        assert!(
            refused.message().contains("issued to this tenant"),
            "{forged}: {refused:?}"
        );
    }
    sandbox.stop().await;
}

/// A Remember request's gRPC frame header announcing `length` bytes, uncompressed.
fn frame_header(length: u32) -> Bytes {
    let mut header = vec![0u8];
    header.extend_from_slice(&length.to_be_bytes());
    Bytes::from(header)
}

#[tokio::test]
async fn request_bytes_held_at_once_are_bounded_across_calls_and_tenants() {
    use tower::Service as _;
    const MAX_MESSAGE: usize = 1024 * 1024;
    let (acme_key, acme) = key("acme-b", "acme", Role::Write, "");
    let (globex_key, globex) = key("globex-b", "globex", Role::Write, "");
    let sandbox = Sandbox::start_with(
        None,
        Options {
            edge: engram_gateway::EdgeArgs {
                max_message_bytes: MAX_MESSAGE,
                max_request_bytes: engram_gateway::bounds::min_request_bytes(MAX_MESSAGE),
                ..keys_edge(&[&acme, &globex])
            },
            ..Options::default()
        },
    )
    .await;
    let gateway = sandbox.addrs.gateway;
    // acme announces a Remember of a largest message, sends all of it but its last bytes, and
    // stalls: what it sent is held.
    let (sender, receiver) = tokio::sync::mpsc::channel::<
        Result<http_body::Frame<Bytes>, engram_proto::tonic::Status>,
    >(64);
    let announced = MAX_MESSAGE - 16;
    let body = engram_proto::tonic::body::Body::new(http_body_util::StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(receiver),
    ));
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{gateway}/engram.v1.MemoryService/Remember"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {acme_key}"))
        .body(body)
        .unwrap();
    let mut channel = plain_channel(gateway).await;
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .unwrap();
    let stalled = tokio::spawn(channel.call(request));
    sender
        .send(Ok(http_body::Frame::data(frame_header(announced as u32))))
        .await
        .unwrap();
    for _ in 0..(announced - 1024) / 8192 {
        let chunk = Bytes::from(vec![0u8; 8192]);
        sender
            .send(Ok(http_body::Frame::data(chunk)))
            .await
            .unwrap();
    }
    let admin = sandbox.addrs.gateway_admin.unwrap();
    eventually("the stalled request's bytes to be held", || async move {
        let held = engram_tests::metric(admin, "engram_gateway_request_bytes").await;
        (held.unwrap_or(0.0) > (MAX_MESSAGE / 2) as f64).then_some(())
    })
    .await;

    let remember = || pb::RememberRequest {
        scope: scope("bytes"),
        memories: vec![
            pb::MemoryInput {
                text: "x".repeat(30_000),
                ..Default::default()
            };
            5
        ],
        ..Default::default()
    };
    // acme's own next large request does not fit in its share; globex's still fits in what
    // is left of the whole.
    let mut acme_client = sandbox.client_with_key(Some(&acme_key)).await;
    let mut globex_client = sandbox.client_with_key(Some(&globex_key)).await;
    let refused = acme_client.remember(remember()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("ENGRAM_MAX_REQUEST_BYTES"),
        "{refused:?}"
    );
    globex_client.remember(remember()).await.unwrap();
    // The stalled caller gives up: its bytes are given back and acme's request fits again.
    drop(sender);
    let ended = stalled.await.unwrap();
    assert!(ended.is_ok(), "{ended:?}");
    eventually("the bytes to be given back", || {
        let mut client = acme_client.clone();
        async move { client.remember(remember()).await.ok() }
    })
    .await;
    eventually("every byte to be given back", || async move {
        let held = engram_tests::metric(admin, "engram_gateway_request_bytes").await;
        (held == Some(0.0)).then_some(())
    })
    .await;
    sandbox.stop().await;
}

#[tokio::test]
async fn a_list_page_ends_before_it_holds_too_many_bytes() {
    let sandbox = Sandbox::start().await;
    let mut client = sandbox.client().await;
    // 120 memories of 32 KiB of text and 16 KiB of metadata: about 5.8 MB, more than a page
    // may hold (4 MiB).
    let metadata: std::collections::BTreeMap<String, String> = (0..8)
        .map(|i| (format!("k{i}"), "m".repeat(2_000)))
        .collect();
    for batch in 0..4 {
        client
            .remember(pb::RememberRequest {
                scope: scope("large"),
                memories: (0..30)
                    .map(|i| pb::MemoryInput {
                        text: format!("memory {batch}-{i} ").repeat(4_000)[..32_000].to_string(),
                        metadata: metadata.clone(),
                        ..Default::default()
                    })
                    .collect(),
                mode: pb::WriteMode::Sync.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let page = |token: String| pb::ListRequest {
        scope: scope("large"),
        page_size: 1_000,
        page_token: token,
        ..Default::default()
    };
    let first = client.list(page(String::new())).await.unwrap().into_inner();
    let bytes: usize = first
        .memories
        .iter()
        .map(|m| m.text.len() + m.metadata.values().map(String::len).sum::<usize>())
        .sum();
    assert!(
        first.memories.len() < 120 && bytes <= engram_retrieval::MAX_PAGE_BYTES,
        "{} memories, {bytes} bytes",
        first.memories.len()
    );
    assert!(!first.next_page_token.is_empty());
    let rest = client
        .list(page(first.next_page_token.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.memories.len() + rest.memories.len(), 120);
    assert!(rest.next_page_token.is_empty());
    // Nothing twice, nothing skipped.
    let mut ids: Vec<String> = first
        .memories
        .iter()
        .chain(&rest.memories)
        .map(|m| m.id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 120);
    sandbox.stop().await;
}

#[tokio::test]
async fn a_tenant_cannot_tell_from_recall_timings_what_another_embedded() {
    // Both tenants' queries reach the model: neither is answered from the other's cache. (The
    // embedding tests show it at the cache; this is what a public caller sees.)
    let (acme_key, acme) = key("acme-r", "acme", Role::Write, "");
    let (globex_key, globex) = key("globex-r", "globex", Role::Write, "");
    let sandbox = Sandbox::start_with(
        None,
        Options {
            edge: keys_edge(&[&acme, &globex]),
            ..Options::default()
        },
    )
    .await;
    let recall = |user: &str| pb::RecallRequest {
        scope: scope(user),
        query: "the merger with initech closes friday".into(),
        top_k: 1,
        bypass_cache: true,
        ..Default::default()
    };
    let mut acme_client = sandbox.client_with_key(Some(&acme_key)).await;
    let mut globex_client = sandbox.client_with_key(Some(&globex_key)).await;
    acme_client.recall(recall("ceo")).await.unwrap();
    let redis = redis::Client::open(sandbox.redis_url()).unwrap();
    let connection = redis.get_multiplexed_async_connection().await.unwrap();
    let keys = || {
        let mut connection = connection.clone();
        async move {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("engram:embeddings:*")
                .query_async(&mut connection)
                .await
                .unwrap();
            keys
        }
    };
    let after_acme = keys().await.len();
    globex_client.recall(recall("spy")).await.unwrap();
    // The same text under another tenant is a new entry, not a hit of acme's.
    let after_globex = keys().await.len();
    assert!(after_acme >= 1);
    assert_eq!(after_globex, after_acme + 1);
    let tenant = TenantId::parse("acme").unwrap();
    for key in keys().await {
        assert!(
            !key.contains(tenant.as_str()) && !key.contains("initech"),
            "{key}"
        );
    }
    sandbox.stop().await;
}

#[tokio::test]
async fn each_method_decodes_no_more_than_it_can_carry_compressed_or_not() {
    use engram_proto::tonic::codec::CompressionEncoding;
    use engram_proto::v1::memory_service_client::MemoryServiceClient;
    let sandbox = Sandbox::start().await;
    let client = MemoryServiceClient::connect(format!("http://{}", sandbox.addrs.gateway))
        .await
        .unwrap()
        .max_encoding_message_size(usize::MAX);
    // 300,000 empty ids: 600 KB on the wire, 7 MB of strings once decoded; a Get can carry
    // only 1,000 ids. Refused before decoding, and while inflating when gzip shrinks it to a
    // few kilobytes.
    let amplified = || pb::GetRequest {
        ids: vec![String::new(); 300_000],
        after_write_token: String::new(),
    };
    let refused = client.clone().get(amplified()).await.unwrap_err();
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    let refused = client
        .clone()
        .send_compressed(CompressionEncoding::Gzip)
        .get(amplified())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // 100,000 empty memories: 200 KB on the wire, 15 MB once decoded. Counted in the
    // (inflated) bytes and refused before decoding, so the count is never reached.
    let refused = client
        .clone()
        .send_compressed(CompressionEncoding::Gzip)
        .remember(pb::RememberRequest {
            scope: scope("bounds"),
            memories: vec![pb::MemoryInput::default(); 100_000],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("ENGRAM_MAX_BATCH") && !refused.message().contains("100000"),
        "{refused:?}"
    );
    // As many bytes of memories are within a Remember's bound: accepted.
    let refused = client
        .clone()
        .send_compressed(CompressionEncoding::Gzip)
        .remember(pb::RememberRequest {
            scope: scope("bounds"),
            memories: vec![
                pb::MemoryInput {
                    text: "x".repeat(6_000),
                    ..Default::default()
                };
                100
            ],
            ..Default::default()
        })
        .await;
    assert!(refused.is_ok(), "{refused:?}");
    // A Get at its limit is served.
    let ids = vec![uuid_like(); 1_000];
    let found = client
        .clone()
        .get(pb::GetRequest {
            ids,
            after_write_token: String::new(),
        })
        .await;
    assert!(found.is_ok(), "{found:?}");
    sandbox.stop().await;
}

/// A well-formed memory id that names nothing.
fn uuid_like() -> String {
    "0190d3c8-0000-7000-8000-000000000000".to_string()
}
