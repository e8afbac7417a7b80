//! Embed RPC latency over real gRPC against the embedding service of an in-process cluster
//! (real local model, real Redis): a cached text (served from the in-process cache) and an
//! uncached single sentence (a fresh text each call, so it always reaches the model), at
//! concurrency 1 and 16. Closed loop; latency of each call from send to reply.
//!
//! Run: `cargo bench -p engram-tests --bench embed_rpc`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use engram_proto::internal::v1::embedder_client::EmbedderClient;
use engram_proto::internal::v1::{EmbedRequest, Purpose};
use engram_tests::Sandbox;
use engram_tests::bench::ms;
use hdrhistogram::Histogram;

struct Scenario {
    name: &'static str,
    cached: bool,
    concurrency: usize,
    calls: usize,
}

fn main() -> ExitCode {
    engram_runtime::server::main_entry(|| async {
        let sentences: Arc<Vec<String>> = Arc::new(
            include_str!("../../loadtest/data/sentences.txt")
                .lines()
                .map(str::to_string)
                .collect(),
        );
        let sandbox = Sandbox::start().await;
        let client = EmbedderClient::new(sandbox.internal_channel(sandbox.addrs.embedding).await);
        println!(
            "Embed RPC, one text per call; {} cores",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        println!("| text | concurrency | calls | p50 | p99 | max | calls/s |");
        println!("| --- | --- | --- | --- | --- | --- | --- |");
        let scenarios = [
            Scenario {
                name: "cached",
                cached: true,
                concurrency: 1,
                calls: 5_000,
            },
            Scenario {
                name: "cached",
                cached: true,
                concurrency: 16,
                calls: 20_000,
            },
            Scenario {
                name: "uncached",
                cached: false,
                concurrency: 1,
                calls: 500,
            },
            Scenario {
                name: "uncached",
                cached: false,
                concurrency: 16,
                calls: 2_000,
            },
        ];
        // Distinct texts across all uncached scenarios, so none is a cache hit.
        let fresh = Arc::new(AtomicUsize::new(0));
        for scenario in scenarios {
            if scenario.cached {
                embed(&client, sentences[0].clone()).await;
            }
            // Warm the connection and the model.
            for _ in 0..20 {
                embed(&client, next_fresh(&sentences, &fresh)).await;
            }
            let remaining = Arc::new(AtomicUsize::new(scenario.calls));
            let started = Instant::now();
            let tasks: Vec<_> = (0..scenario.concurrency)
                .map(|_| {
                    let (client, sentences, fresh, remaining) = (
                        client.clone(),
                        sentences.clone(),
                        fresh.clone(),
                        remaining.clone(),
                    );
                    tokio::spawn(async move {
                        let mut histogram = Histogram::<u64>::new(3).unwrap();
                        while remaining
                            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                            .is_ok()
                        {
                            let text = if scenario.cached {
                                sentences[0].clone()
                            } else {
                                next_fresh(&sentences, &fresh)
                            };
                            let sent = Instant::now();
                            embed(&client, text).await;
                            histogram.record(sent.elapsed().as_micros() as u64).unwrap();
                        }
                        histogram
                    })
                })
                .collect();
            let mut histogram = Histogram::<u64>::new(3).unwrap();
            for task in tasks {
                histogram.add(task.await.unwrap()).unwrap();
            }
            let elapsed = started.elapsed();
            println!(
                "| {} | {} | {} | {} | {} | {} | {:.0} |",
                scenario.name,
                scenario.concurrency,
                histogram.len(),
                ms(histogram.value_at_quantile(0.5)),
                ms(histogram.value_at_quantile(0.99)),
                ms(histogram.max()),
                histogram.len() as f64 / elapsed.as_secs_f64(),
            );
        }
        shared_corpus(&sandbox, &client, &sentences).await;
        sandbox.stop().await;
        ExitCode::SUCCESS
    })
}

/// What keying the embedding cache by tenant costs: the same 200 sentences embedded in five
/// passes (batches of 50), once all by one tenant and once by five tenants, one pass each
/// (texts no earlier scenario used). Counts the cache's lookups and hits (both levels) from the
/// embedding service's metrics, and times each run.
async fn shared_corpus(
    sandbox: &Sandbox,
    client: &EmbedderClient<engram_tests::InternalChannel>,
    sentences: &[String],
) {
    let admin = sandbox.addrs.embedding_admin.expect("admin port");
    let counted = || async move {
        let (_, metrics) = engram_tests::http_get(admin, "/metrics").await;
        let sum = |result: &str| -> f64 {
            metrics
                .lines()
                .filter(|l| {
                    l.starts_with("engram_cache_requests_total{")
                        && l.contains("cache=\"embeddings\"")
                        && l.contains("level=\"local\"")
                        && l.contains(&format!("result=\"{result}\""))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        (sum("hit"), sum("miss"))
    };
    println!();
    println!("A shared corpus (200 sentences, five passes of 4 batches of 50):");
    println!("| passes by | local hits | local misses (then Redis, then the model) | time |");
    println!("| --- | --- | --- | --- |");
    for (run, tenants) in [("one tenant", 1usize), ("five tenants", 5)] {
        let offset = if tenants == 1 { 400 } else { 600 };
        let corpus: Vec<String> = (0..200)
            .map(|i| {
                format!(
                    "{} (shared {offset})",
                    sentences[(offset + i) % sentences.len()]
                )
            })
            .collect();
        let (hits, misses) = counted().await;
        let started = Instant::now();
        for pass in 0..5 {
            let tenant = format!("tenant-{}", pass % tenants);
            for batch in corpus.chunks(50) {
                let response = client
                    .clone()
                    .embed(EmbedRequest {
                        texts: batch.to_vec(),
                        purpose: Purpose::Document as i32,
                        tenant: tenant.clone(),
                    })
                    .await
                    .unwrap();
                assert_eq!(response.into_inner().embeddings.len(), batch.len());
            }
        }
        let elapsed = started.elapsed();
        let (hits_after, misses_after) = counted().await;
        println!(
            "| {run} | {:.0} | {:.0} | {:.2} s |",
            hits_after - hits,
            misses_after - misses,
            elapsed.as_secs_f64()
        );
    }
}

fn next_fresh(sentences: &[String], fresh: &AtomicUsize) -> String {
    let n = fresh.fetch_add(1, Ordering::Relaxed);
    format!("{} (note {n})", sentences[n % sentences.len()])
}

async fn embed(client: &EmbedderClient<engram_tests::InternalChannel>, text: String) {
    let response = client
        .clone()
        .embed(EmbedRequest {
            texts: vec![text],
            purpose: Purpose::Query as i32,
            tenant: "bench".into(),
        })
        .await
        .unwrap();
    assert_eq!(response.into_inner().embeddings.len(), 1);
}
