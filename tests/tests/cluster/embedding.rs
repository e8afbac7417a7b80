//! The embedding service against a fake OpenAI-compatible provider (a real HTTP server) and a
//! real Redis: caching, micro-batching, and calm behaviour when the provider misbehaves.

use std::sync::Arc;
use std::time::{Duration, Instant};

use engram_cache::{Redis, RedisConfig};
use engram_cli::redis::{Persistence, RedisProcess};
use engram_domain::api::{Embedder, Purpose};
use engram_domain::error::Code;
use engram_domain::model::TenantId;
use engram_embedding::EmbeddingService;
use engram_models::{EmbeddingProvider, OpenAiConfig, OpenAiEmbedder};
use engram_resilience::{OutboundMetrics, Policy};
use engram_runtime::config::CommonArgs;
use engram_telemetry::Metrics;
use engram_tests::{Behavior, FakeProvider, Options, Sandbox, eventually, fast_policy, pb};

const DIM: usize = 8;

struct Harness {
    service: EmbeddingService,
    fake: FakeProvider,
    metrics: Metrics,
    redis: Option<RedisProcess>,
    _dir: tempfile::TempDir,
}

/// The OpenAI-compatible provider on `fake`, cutting inputs to `max_input_tokens`.
fn openai(
    fake: &FakeProvider,
    max_input_tokens: usize,
    policy: Policy,
    metrics: &Metrics,
) -> OpenAiEmbedder {
    OpenAiEmbedder::new(
        OpenAiConfig {
            base_url: fake.url(),
            model: "fake-embedding".into(),
            api_key: None,
            dimension: DIM,
            max_inputs_per_request: 256,
            max_input_tokens,
            policy,
        },
        &OutboundMetrics::new(metrics),
    )
    .unwrap()
}

async fn harness(
    policy: Policy,
    batch: engram_embedding::batcher::BatchConfig,
    redis: bool,
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeProvider::start(DIM).await;
    let metrics = Metrics::new();
    let provider: Arc<dyn EmbeddingProvider> = Arc::new(openai(&fake, 8191, policy, &metrics));
    let redis_process = if redis {
        Some(
            RedisProcess::start(&dir.path().join("redis"), None, Persistence::None)
                .await
                .unwrap(),
        )
    } else {
        None
    };
    let redis_handle = redis_process.as_ref().map(|r| {
        Redis::connect(
            RedisConfig {
                outage_backoff: Duration::from_millis(200),
                ..RedisConfig::new(r.url())
            },
            &metrics,
        )
        .unwrap()
    });
    let config = engram_embedding::Config {
        batch,
        common: CommonArgs {
            vector_dimension: DIM,
            ..CommonArgs::for_test()
        },
        ..engram_embedding::Config::for_test()
    };
    Harness {
        service: EmbeddingService::new(provider, &config, redis_handle, &metrics),
        fake,
        metrics,
        redis: redis_process,
        _dir: dir,
    }
}

fn batching(
    max_texts: usize,
    queue: usize,
    in_flight: usize,
) -> engram_embedding::batcher::BatchConfig {
    engram_embedding::batcher::BatchConfig {
        max_texts,
        max_wait: Duration::from_millis(2),
        queue_capacity: queue,
        max_batches_in_flight: in_flight,
    }
}

/// Batches that close only when `texts` texts have arrived: concurrent calls share one batch
/// whatever the scheduling.
fn one_batch_of(texts: usize) -> engram_embedding::batcher::BatchConfig {
    engram_embedding::batcher::BatchConfig {
        max_texts: texts,
        max_wait: Duration::from_secs(30),
        queue_capacity: 64,
        max_batches_in_flight: 1,
    }
}

fn sample(metrics: &Metrics, series: &str) -> f64 {
    metrics
        .encode()
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn embed(service: &EmbeddingService, texts: &[&str]) -> engram_domain::Result<Vec<Vec<f32>>> {
    embed_as(service, "acme", texts).await
}

async fn embed_as(
    service: &EmbeddingService,
    tenant: &str,
    texts: &[&str],
) -> engram_domain::Result<Vec<Vec<f32>>> {
    let tenant = TenantId::parse(tenant).unwrap();
    service
        .embed(
            &tenant,
            texts.iter().map(|t| t.to_string()).collect(),
            Purpose::Document,
        )
        .await
        .map(|e| e.vectors)
}

#[tokio::test]
async fn one_tenant_s_cached_vector_never_answers_for_another() {
    let h = harness(fast_policy(), batching(64, 64, 1), true).await;
    let text = "the launch code is 4417";
    embed_as(&h.service, "acme", &[text]).await.unwrap();
    embed_as(&h.service, "acme", &[text]).await.unwrap();
    assert_eq!(
        h.fake.request_count(),
        1,
        "the tenant's own second call is cached"
    );
    // Another tenant's call with the same text reaches the provider: it cannot learn from the
    // answer's speed that acme embedded it.
    embed_as(&h.service, "globex", &[text]).await.unwrap();
    assert_eq!(h.fake.request_count(), 2, "{:?}", h.fake.requests());
    // Its vector is cached for it too, under a key that names neither tenant nor text.
    h.service.clear_local_cache().await;
    embed_as(&h.service, "globex", &[text]).await.unwrap();
    assert_eq!(h.fake.request_count(), 2);
}

#[tokio::test]
async fn a_text_reaches_the_provider_once_then_comes_from_the_cache_levels() {
    let h = harness(fast_policy(), batching(64, 64, 1), true).await;
    let first = embed(&h.service, &["I adopted a cat named Miso"])
        .await
        .unwrap();
    let again = embed(&h.service, &["I adopted a cat named Miso"])
        .await
        .unwrap();
    assert_eq!(first, again);
    assert_eq!(
        first[0],
        FakeProvider::vector_for("I adopted a cat named Miso", DIM)
    );
    assert_eq!(h.fake.request_count(), 1);

    h.service.clear_local_cache().await;
    let from_redis = embed(&h.service, &["I adopted a cat named Miso"])
        .await
        .unwrap();
    assert_eq!(from_redis, first);
    assert_eq!(
        h.fake.request_count(),
        1,
        "served from Redis, not the provider"
    );
    assert_eq!(
        sample(
            &h.metrics,
            r#"engram_cache_requests_total{cache="embeddings",level="redis",result="hit"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn embedding_carries_on_without_redis_and_uses_it_again_when_it_returns() {
    let mut h = harness(fast_policy(), batching(64, 64, 1), true).await;
    embed(&h.service, &["before the outage"]).await.unwrap();

    h.redis.as_mut().unwrap().kill().await;
    // No errors while Redis is gone: new texts go to the provider, known ones to the first level.
    embed(&h.service, &["during the outage"]).await.unwrap();
    embed(&h.service, &["before the outage"]).await.unwrap();
    assert_eq!(sample(&h.metrics, "engram_redis_available"), 0.0);

    h.redis.as_mut().unwrap().restart().await.unwrap();
    // Redis is tried again once the outage backoff has passed: new texts, until one reaches it.
    let mut attempt = 0;
    let text = eventually("Redis used again after its restart", || {
        attempt += 1;
        let text = format!("after the outage, try {attempt}");
        let (service, metrics) = (&h.service, &h.metrics);
        async move {
            embed(service, &[&text]).await.unwrap();
            (sample(metrics, "engram_redis_available") == 1.0).then_some(text)
        }
    })
    .await;
    h.service.clear_local_cache().await;
    let requests = h.fake.request_count();
    embed(&h.service, &[&text]).await.unwrap();
    assert_eq!(
        h.fake.request_count(),
        requests,
        "the second level answered again"
    );
}

#[tokio::test]
async fn concurrent_calls_share_provider_batches_and_each_gets_its_own_vector() {
    let h = Arc::new(harness(fast_policy(), batching(64, 256, 1), false).await);
    h.fake.set_latency(Duration::from_millis(50));
    let calls: Vec<_> = (0..48)
        .map(|i| {
            let h = h.clone();
            tokio::spawn(async move {
                let text = format!("sentence number {i}");
                let vectors = embed(&h.service, &[&text]).await.unwrap();
                (text, vectors)
            })
        })
        .collect();
    for call in calls {
        let (text, vectors) = call.await.unwrap();
        assert_eq!(
            vectors,
            vec![FakeProvider::vector_for(&text, DIM)],
            "{text}"
        );
    }
    let requests = h.fake.requests();
    assert!(
        requests.len() < 48 / 4,
        "{} provider calls for 48 texts",
        requests.len()
    );
    assert_eq!(requests.iter().map(Vec::len).sum::<usize>(), 48);
}

#[tokio::test]
async fn a_text_the_provider_refuses_fails_only_its_own_request() {
    // Four requests, five texts, one batch: it closes when the fifth text arrives.
    let h = Arc::new(harness(fast_policy(), one_batch_of(5), false).await);
    let poison = "a text over the provider's token limit";
    h.fake.poison_with(poison, 400);
    let requests: Vec<Vec<String>> = vec![
        vec!["fine zero".into()],
        vec!["fine one".into()],
        vec!["fine two".into(), poison.into()],
        vec!["fine three".into()],
    ];
    let calls: Vec<_> = requests
        .iter()
        .cloned()
        .map(|texts| {
            let h = h.clone();
            tokio::spawn(async move {
                let tenant = TenantId::default_tenant();
                h.service.embed(&tenant, texts, Purpose::Document).await
            })
        })
        .collect();
    for (texts, call) in requests.iter().zip(calls) {
        let answer = call.await.unwrap();
        if texts.iter().any(|t| t == poison) {
            let error = answer.unwrap_err();
            assert_eq!(error.code(), Code::FailedPrecondition, "{error}");
        } else {
            let expected: Vec<_> = texts
                .iter()
                .map(|t| FakeProvider::vector_for(t, DIM))
                .collect();
            assert_eq!(answer.unwrap().vectors, expected, "{texts:?}");
        }
    }
    let sent = h.fake.requests();
    assert_eq!(
        sent[0].len(),
        5,
        "the four requests shared the first call: {sent:?}"
    );
    // Then bisection: the poison alone at last, in a handful of calls (not one per text).
    assert!(sent.contains(&vec![poison.to_string()]), "{sent:?}");
    assert!(sent.len() <= 7, "{} calls: {sent:?}", sent.len());
}

#[tokio::test]
async fn a_refusal_no_text_causes_fails_the_batch_without_a_search() {
    let h = Arc::new(harness(fast_policy(), one_batch_of(3), false).await);
    // As a provider answers a revoked key: every text would fail alike.
    h.fake.poison_with("one", 401);
    let calls: Vec<_> = ["one", "two", "three"]
        .into_iter()
        .map(|text| {
            let h = h.clone();
            tokio::spawn(async move { embed(&h.service, &[text]).await })
        })
        .collect();
    for call in calls {
        let error = call.await.unwrap().unwrap_err();
        assert_eq!(error.code(), Code::FailedPrecondition, "{error}");
    }
    assert_eq!(h.fake.request_count(), 1, "{:?}", h.fake.requests());
}

#[tokio::test]
async fn texts_over_the_providers_token_limit_are_cut_to_it_before_they_are_sent() {
    let fake = FakeProvider::start(DIM).await;
    let provider = openai(&fake, 64, fast_policy(), &Metrics::new());
    let long = "a long passage of many words ".repeat(100);
    let texts = vec!["short".to_string(), long.clone()];
    let vectors = provider.embed(texts, Purpose::Document).await.unwrap();
    assert_eq!(vectors.len(), 2);
    let sent = fake.requests();
    let inputs = &sent[0];
    assert_eq!(inputs[0], "short");
    assert!(long.starts_with(&inputs[1]) && inputs[1].len() < long.len());
    let tokens = engram_models::TokenCounter::new(engram_models::TokenizerKind::Cl100kBase, "")
        .unwrap()
        .count(&inputs[1]);
    assert!((50..=64).contains(&tokens), "{tokens} tokens sent");
}

#[tokio::test]
async fn a_full_queue_is_refused_with_a_retry_hint() {
    let h = Arc::new(harness(fast_policy(), batching(1, 1, 1), false).await);
    h.fake.set_latency(Duration::from_millis(300));
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let h = h.clone();
            tokio::spawn(async move { embed(&h.service, &[&format!("text {i}")]).await })
        })
        .collect();
    let mut refused = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => {}
            Err(engram_domain::Error::ResourceExhausted { retry_after, .. }) => {
                assert!(retry_after.is_some());
                refused += 1;
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert!(refused > 0, "nothing was refused");
    assert_eq!(
        sample(&h.metrics, "engram_embed_rejected_total"),
        refused as f64
    );
}

#[tokio::test]
async fn a_failing_provider_opens_the_breaker_and_is_not_called_while_open() {
    let policy = Policy {
        max_attempts: 1,
        ..fast_policy()
    };
    let h = harness(policy, batching(64, 64, 1), false).await;
    h.fake.set_default(Behavior::Status {
        status: 500,
        retry_after: None,
    });
    for i in 0..3 {
        let err = embed(&h.service, &[&format!("t{i}")]).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(
            err.to_string()
                .contains("embedding provider fake-embedding answered 500"),
            "{err}"
        );
    }
    let err = embed(&h.service, &["t3"]).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.to_string().contains("circuit is open"), "{err}");
    assert_eq!(
        h.fake.request_count(),
        3,
        "an open circuit does not call the provider"
    );
    assert_eq!(
        sample(
            &h.metrics,
            r#"engram_circuit_breaker_state{provider="embedding provider fake-embedding"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn a_429_is_retried_after_its_retry_after_and_a_400_is_not_retried() {
    let h = harness(fast_policy(), batching(64, 64, 1), false).await;
    h.fake.then(Behavior::Status {
        status: 429,
        retry_after: Some(1),
    });
    let started = Instant::now();
    embed(&h.service, &["rate limited once"]).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "retried after {:?}",
        started.elapsed()
    );
    assert_eq!(h.fake.request_count(), 2);

    h.fake.then(Behavior::Status {
        status: 400,
        retry_after: None,
    });
    let err = embed(&h.service, &["bad request"]).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(h.fake.request_count(), 3, "a 400 is not retried");
}

#[tokio::test]
async fn hangs_and_dropped_connections_are_retried() {
    let h = harness(fast_policy(), batching(64, 64, 1), false).await;
    h.fake.then(Behavior::Hang).then(Behavior::Drop);
    let vectors = embed(&h.service, &["eventually"]).await.unwrap();
    assert_eq!(vectors[0], FakeProvider::vector_for("eventually", DIM));
    assert_eq!(h.fake.request_count(), 3);

    h.fake.set_default(Behavior::Hang);
    let err = embed(&h.service, &["never"]).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(
        err.to_string()
            .contains("timed out after 500ms (attempt 3/3)"),
        "{err}"
    );
}

#[tokio::test]
async fn wrong_dimensions_and_malformed_bodies_are_clear_errors_and_nothing_is_cached() {
    let h = harness(fast_policy(), batching(64, 64, 1), true).await;
    h.fake.then(Behavior::WrongDimension(5));
    let err = embed(&h.service, &["some text"]).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "embedding provider fake-embedding sent an invalid response: 5-dimensional vectors, expected 8 (attempt 1/3)"
    );
    h.fake.then(Behavior::Malformed);
    let err = embed(&h.service, &["some text"]).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("the body is not an embeddings response"),
        "{err}"
    );

    // Nothing was cached: the provider is asked again, and this time answers properly.
    let vectors = embed(&h.service, &["some text"]).await.unwrap();
    assert_eq!(vectors[0], FakeProvider::vector_for("some text", DIM));
    assert_eq!(h.fake.request_count(), 3);
}

#[tokio::test]
async fn a_provider_of_the_wrong_dimension_indexes_nothing_and_loses_nothing() {
    let fake = FakeProvider::start(DIM).await;
    fake.set_default(Behavior::WrongDimension(DIM * 2));
    let mut options = Options::with_fake(&fake, DIM, fast_policy());
    options.write_log.sync_wait = Duration::from_secs(1);
    let sandbox = Sandbox::start_with(None, options).await;
    let mut client = sandbox.client().await;
    let scope = Some(pb::Scope {
        user_id: "wendy".into(),
        ..Default::default()
    });
    let status = client
        .remember(pb::RememberRequest {
            scope: scope.clone(),
            memories: vec![pb::MemoryInput {
                text: "I like tea".into(),
                ..Default::default()
            }],
            mode: pb::WriteMode::Sync.into(),
            extract: false,
            privacy: 0,
        })
        .await
        .unwrap_err();
    // Every text comes back 16-dimensional: the provider is broken for everything, which is an
    // outage, not this write's fault. It waits in the log instead of being dead-lettered.
    assert_eq!(
        status.code(),
        engram_proto::tonic::Code::DeadlineExceeded,
        "{status:?}"
    );
    assert!(
        status.message().contains("stays in the write log"),
        "{}",
        status.message()
    );
    assert_eq!(sandbox.write_log().dead_letters().await.unwrap(), 0);
    let listed = client
        .list(pb::ListRequest {
            scope,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.memories.is_empty());
    sandbox.stop().await;
}
