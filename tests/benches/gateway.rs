//! What the gateway adds to a Recall: the same Recall called through the gateway (API key
//! checked, rate limit on, deadline, routing, metrics and trace layers) and called directly on
//! retrieval's internal Index service, alternating one call of each, in one run.
//!
//! Both answer from retrieval's result cache (the query is asked once first), so the difference
//! is the gateway's own cost plus one more gRPC hop on loopback, not the search's.
//!
//! Run: `cargo bench -p engram-tests --bench gateway`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use engram_domain::api::Index as _;
use engram_domain::model::TenantId;
use engram_gateway::{AuthMode, EdgeArgs, Role};
use engram_proto::internal::v1 as ipb;
use engram_tests::bench::ms;
use engram_tests::{Options, Sandbox, pb};
use hdrhistogram::Histogram;

const CALLS: usize = 5_000;

fn main() -> ExitCode {
    engram_runtime::server::main_entry(|| async {
        let tenant = TenantId::parse("bench").unwrap();
        let (key, entry) = engram_gateway::new_key("bench", &tenant, Role::Write);
        let options = Options {
            edge: EdgeArgs {
                auth: Some(AuthMode::Keys),
                api_keys: Some(format!("{entry}rate = 1000000\n")),
                ..EdgeArgs::default()
            },
            ..Options::default()
        };
        let sandbox = Sandbox::start_with(None, options).await;
        let mut gateway = sandbox.client_with_key(Some(&key)).await;
        let scope = Some(pb::Scope {
            user_id: "alice".into(),
            ..Default::default()
        });
        let sentences: Vec<&str> = include_str!("../../loadtest/data/sentences.txt")
            .lines()
            .take(100)
            .collect();
        gateway
            .remember(pb::RememberRequest {
                scope: scope.clone(),
                memories: sentences
                    .iter()
                    .map(|t| pb::MemoryInput {
                        text: t.to_string(),
                        ..Default::default()
                    })
                    .collect(),
                mode: pb::WriteMode::Sync.into(),
                extract: false,
                privacy: 0,
            })
            .await
            .unwrap();
        let recall = pb::RecallRequest {
            scope,
            query: "what hobbies am I learning".into(),
            top_k: 10,
            ..Default::default()
        };
        let mut direct = ipb::index_client::IndexClient::new(
            sandbox.internal_channel(sandbox.addrs.retrieval).await,
        );
        let search = ipb::SearchRequest {
            tenant: tenant.to_string(),
            recall: Some(recall.clone()),
        };

        // The gateway's own client of retrieval: balanced channel, client metrics and trace
        // layer, deadline propagation, domain conversion.
        let peer = sandbox.index();
        let query =
            engram_domain::validate::recall(recall.clone(), &engram_domain::Limits::default())
                .unwrap();

        // Warm up every path (and fill the result cache).
        for _ in 0..200 {
            gateway.recall(recall.clone()).await.unwrap();
            direct.search(search.clone()).await.unwrap();
            peer.search(&tenant, query.clone()).await.unwrap();
        }
        let mut through = Histogram::<u64>::new(3).unwrap();
        let mut straight = Histogram::<u64>::new(3).unwrap();
        let mut via_peer = Histogram::<u64>::new(3).unwrap();
        // The floor: a gRPC call that does nothing (the gateway's health check) on the same
        // machine, in the same process.
        let channel = engram_proto::tonic::transport::Endpoint::from_shared(format!(
            "http://{}",
            sandbox.addrs.gateway
        ))
        .unwrap()
        .connect()
        .await
        .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let mut floor = Histogram::<u64>::new(3).unwrap();
        for _ in 0..CALLS {
            let started = Instant::now();
            health
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .unwrap();
            floor.record(micros(started.elapsed())).unwrap();

            let started = Instant::now();
            let result = peer.search(&tenant, query.clone()).await.unwrap();
            via_peer.record(micros(started.elapsed())).unwrap();
            assert!(result.cache_hit);

            let started = Instant::now();
            let response = gateway.recall(recall.clone()).await.unwrap().into_inner();
            through.record(micros(started.elapsed())).unwrap();
            assert!(response.cache_hit && !response.hits.is_empty());

            let started = Instant::now();
            let response = direct.search(search.clone()).await.unwrap().into_inner();
            straight.record(micros(started.elapsed())).unwrap();
            assert!(response.cache_hit);
        }
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!(
            "Recall, {CALLS} calls each way alternating, cache hit, authentication and rate limiting on; {cores} cores"
        );
        println!("| path | p50 | p90 | p99 |");
        println!("|---|---|---|---|");
        for (name, h) in [
            ("client → gateway → retrieval", &through),
            ("client → retrieval (Index.Search)", &straight),
            ("engram's peer client → retrieval", &via_peer),
            ("one empty gRPC call (health check)", &floor),
        ] {
            println!(
                "| {name} | {} | {} | {} |",
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.9)),
                ms(h.value_at_quantile(0.99))
            );
        }
        let diff =
            |q: f64| through.value_at_quantile(q) as i64 - straight.value_at_quantile(q) as i64;
        println!(
            "| gateway overhead | {} µs | {} µs | {} µs |",
            diff(0.5),
            diff(0.9),
            diff(0.99)
        );
        sandbox.stop().await;
        ExitCode::SUCCESS
    })
}

fn micros(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
}
