//! Recall through the gateway of an in-process cluster (real local model, real Redis, real
//! embedded Qdrant) with 100,000 memories in one tenant over 1,000 users:
//!
//! 1. cache hit: the same Recall again (result cache, in-process level);
//! 2. cache miss (`bypass_cache`), query embedding cached: HYBRID, SEMANTIC and KEYWORD, with
//!    the median of each stage the server reports (embed, dense, keyword, fusion, total).
//!
//! Seeding: each user holds 100 of the 1,000 sample sentences of `loadtest/data/sentences.txt`
//! (a different 100 per user, so every sentence is held by 100 users), written SYNC in batches
//! of 100; the embedding cache makes repeats cheap, so seeding takes minutes, not hours. Every
//! Recall is confined to one user's 100 memories by the store's payload index, which is what
//! the 100,000 in the tenant cost.
//!
//! Run: `cargo bench -p engram-tests --bench recall` (`RECALL_BENCH_USERS` to seed fewer).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::process::ExitCode;
use std::time::Instant;

use engram_tests::bench::ms;
use engram_tests::{Sandbox, pb};
use hdrhistogram::Histogram;

const PER_USER: usize = 100;
const CALLS: usize = 2_000;

const QUESTIONS: [&str; 10] = [
    "what did I do with my kids",
    "who taught me the cello",
    "how do I deal with stress",
    "what did we eat for dinner",
    "where did I go last weekend",
    "what hobbies am I learning",
    "what did my therapist suggest",
    "when did I visit the farmers market",
    "what happened at the pottery class",
    "which books have I been reading",
];

fn user(u: usize) -> String {
    format!("user-{u:04}")
}

fn main() -> ExitCode {
    engram_runtime::server::main_entry(|| async {
        let users: usize = std::env::var("RECALL_BENCH_USERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000);
        let sentences: Vec<&str> = include_str!("../../loadtest/data/sentences.txt")
            .lines()
            .collect();
        let sandbox = Sandbox::start().await;
        let mut client = sandbox.client().await;

        let started = Instant::now();
        for u in 0..users {
            let memories = (0..PER_USER)
                .map(|i| pb::MemoryInput {
                    text: sentences[(u * 7 + i * 10) % sentences.len()].to_string(),
                    ..Default::default()
                })
                .collect();
            client
                .remember(pb::RememberRequest {
                    scope: Some(pb::Scope {
                        user_id: user(u),
                        ..Default::default()
                    }),
                    memories,
                    mode: pb::WriteMode::Sync.into(),
                    extract: false,
                    privacy: 0,
                })
                .await
                .unwrap();
        }
        println!(
            "Recall through the gateway; {} memories over {users} users seeded in {:.0} s; {} cores",
            users * PER_USER,
            started.elapsed().as_secs_f64(),
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        let request = |n: usize, mode: pb::SearchMode, bypass: bool| pb::RecallRequest {
            scope: Some(pb::Scope {
                user_id: user(n % users),
                ..Default::default()
            }),
            query: QUESTIONS[n % QUESTIONS.len()].to_string(),
            top_k: 10,
            mode: mode.into(),
            bypass_cache: bypass,
            ..Default::default()
        };
        // Warm: every (user, question) pair used below once, so query embeddings and (for the
        // hit run) results are cached.
        let pairs = 200;
        for n in 0..pairs {
            for mode in [
                pb::SearchMode::Hybrid,
                pb::SearchMode::Semantic,
                pb::SearchMode::Keyword,
            ] {
                client.recall(request(n, mode, false)).await.unwrap();
            }
        }

        println!();
        println!(
            "| workload | calls | p50 | p99 | max | cache hits | server embed / dense / keyword / fusion / total (medians) |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- |");
        let runs = [
            ("cache hit, HYBRID", pb::SearchMode::Hybrid, false),
            ("cache miss, HYBRID", pb::SearchMode::Hybrid, true),
            ("cache miss, SEMANTIC", pb::SearchMode::Semantic, true),
            ("cache miss, KEYWORD", pb::SearchMode::Keyword, true),
        ];
        for (name, mode, bypass) in runs {
            let mut latency = Histogram::<u64>::new(3).unwrap();
            let mut stages: [Histogram<u64>; 5] =
                std::array::from_fn(|_| Histogram::<u64>::new(3).unwrap());
            let mut hits = 0;
            for n in 0..CALLS {
                let sent = Instant::now();
                let response = client
                    .recall(request(n % pairs, mode, bypass))
                    .await
                    .unwrap()
                    .into_inner();
                latency.record(sent.elapsed().as_micros() as u64).unwrap();
                hits += usize::from(response.cache_hit);
                let t = response.timings.unwrap_or_default();
                for (h, v) in stages.iter_mut().zip([
                    t.embed_us,
                    t.dense_us,
                    t.keyword_us,
                    t.fusion_us,
                    t.total_us,
                ]) {
                    h.record(v).unwrap();
                }
            }
            let medians: Vec<String> = stages
                .iter()
                .map(|h| ms(h.value_at_quantile(0.5)))
                .collect();
            println!(
                "| {name} | {} | {} | {} | {} | {hits} | {} |",
                latency.len(),
                ms(latency.value_at_quantile(0.5)),
                ms(latency.value_at_quantile(0.99)),
                ms(latency.max()),
                medians.join(" / "),
            );
        }
        sandbox.stop().await;
        ExitCode::SUCCESS
    })
}
