//! The write path through the gateway of an in-process cluster (real local model, real Redis,
//! real embedded Qdrant):
//!
//! 1. Remember ASYNC acknowledgement latency, one memory per call, at concurrency 1 and 16 —
//!    with this replica's indexing workers off (the acknowledgement path alone) and on (the
//!    model indexing on the same two cores at the same time).
//! 2. Accepted memories per second, batches of 1 and of 100 (workers off).
//! 3. Indexing throughput: a backlog of memories accepted with workers off, then the workers
//!    started and timed until the last one is indexed.
//! 4. Write-to-visible latency at a steady rate below that throughput: from sending a
//!    Remember to its write token reporting INDEXED (polled every 2 ms).
//!
//! Run: `cargo bench -p engram-tests --bench ingest`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use engram_domain::api::WriteState;
use engram_ingestion::LogArgs;
use engram_telemetry::Metrics;
use engram_tests::bench::ms;
use engram_tests::{Options, Sandbox, pb};
use hdrhistogram::Histogram;

type Client = engram_cli::Client;

const USERS: usize = 100;

fn main() -> ExitCode {
    engram_runtime::server::main_entry(|| async {
        let sentences: Arc<Vec<String>> = Arc::new(
            include_str!("../../loadtest/data/sentences.txt")
                .lines()
                .map(str::to_string)
                .collect(),
        );
        let fresh = Arc::new(AtomicUsize::new(0));
        let texts = Texts { sentences, fresh };
        println!(
            "Write path through the gateway; {} cores",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );

        println!();
        println!("Remember ASYNC, one memory per call:");
        println!("| indexing workers | concurrency | calls | p50 | p99 | max | calls/s |");
        println!("| --- | --- | --- | --- | --- | --- | --- |");
        for workers in [false, true] {
            let sandbox = start(workers).await;
            let client = sandbox.client().await;
            for (concurrency, calls) in [(1, 2_000), (16, 8_000)] {
                closed_loop(&client, &texts, 20, 1, 20).await;
                let (histogram, elapsed) =
                    closed_loop(&client, &texts, concurrency, 1, calls).await;
                println!(
                    "| {} | {concurrency} | {} | {} | {} | {} | {:.0} |",
                    if workers { "on" } else { "off" },
                    histogram.len(),
                    ms(histogram.value_at_quantile(0.5)),
                    ms(histogram.value_at_quantile(0.99)),
                    ms(histogram.max()),
                    histogram.len() as f64 / elapsed.as_secs_f64(),
                );
            }
            sandbox.stop().await;
        }

        println!();
        println!("Accepted memories per second (workers off):");
        println!("| memories per call | concurrency | calls | p50 | p99 | memories/s |");
        println!("| --- | --- | --- | --- | --- | --- |");
        let sandbox = start(false).await;
        let client = sandbox.client().await;
        for (per_call, concurrency, calls) in [(1, 16, 8_000), (100, 4, 400)] {
            closed_loop(&client, &texts, 4, per_call, 8).await;
            let (histogram, elapsed) =
                closed_loop(&client, &texts, concurrency, per_call, calls).await;
            println!(
                "| {per_call} | {concurrency} | {} | {} | {} | {:.0} |",
                histogram.len(),
                ms(histogram.value_at_quantile(0.5)),
                ms(histogram.value_at_quantile(0.99)),
                (histogram.len() as usize * per_call) as f64 / elapsed.as_secs_f64(),
            );
        }
        sandbox.stop().await;

        // Indexing throughput: a backlog, then the workers.
        let sandbox = start(false).await;
        let client = sandbox.client().await;
        const BACKLOG: usize = 3_000;
        let mut last_tokens = Vec::new();
        for call in 0..BACKLOG / 100 {
            let written =
                remember(&client, &format!("user-{}", call % USERS), texts.next(100)).await;
            last_tokens.push(written.write_token);
        }
        let metrics = Metrics::new();
        let started = Instant::now();
        let workers = engram_ingestion::start_workers(
            &sandbox.ingestion_config(LogArgs::default()),
            &metrics,
        )
        .unwrap()
        .expect("the sandbox has Redis");
        let log = sandbox.write_log();
        for token in &last_tokens {
            let state = sandbox
                .settled(sandbox.write_token(token), Duration::from_secs(600))
                .await
                .unwrap();
            assert_eq!(state, WriteState::Indexed);
        }
        let throughput = BACKLOG as f64 / started.elapsed().as_secs_f64();
        println!();
        println!(
            "Indexing throughput: {BACKLOG} memories (30 calls of 100, {USERS} users) indexed in {:.1} s: {throughput:.0} memories/s",
            started.elapsed().as_secs_f64()
        );

        // Write-to-visible at half that rate, open loop.
        let rate = (throughput / 2.0).max(1.0);
        let writes = (rate * 20.0) as usize;
        let interval = Duration::from_secs_f64(1.0 / rate);
        let begin = tokio::time::Instant::now();
        let mut tasks = Vec::with_capacity(writes);
        for n in 0..writes {
            tokio::time::sleep_until(begin + interval * n as u32).await;
            let (client, log, text) = (client.clone(), log.clone(), texts.next(1));
            let seal = sandbox.token_seal();
            tasks.push(tokio::spawn(async move {
                let sent = Instant::now();
                let written = remember(&client, &format!("user-{}", n % USERS), text).await;
                let token = engram_tests::open_token(&seal, &written.write_token);
                loop {
                    match log.status(token).await.unwrap() {
                        WriteState::Pending => tokio::time::sleep(Duration::from_millis(2)).await,
                        WriteState::Indexed => break,
                        other => panic!("{other:?}"),
                    }
                }
                sent.elapsed().as_micros() as u64
            }));
        }
        let mut histogram = Histogram::<u64>::new(3).unwrap();
        for task in tasks {
            histogram.record(task.await.unwrap()).unwrap();
        }
        println!();
        println!("Write-to-visible (send → INDEXED), one memory per call, open loop:");
        println!("| rate | writes | p50 | p99 | max |");
        println!("| --- | --- | --- | --- | --- |");
        println!(
            "| {rate:.0}/s | {} | {} | {} | {} |",
            histogram.len(),
            ms(histogram.value_at_quantile(0.5)),
            ms(histogram.value_at_quantile(0.99)),
            ms(histogram.max()),
        );
        workers.stop().await;
        sandbox.stop().await;
        ExitCode::SUCCESS
    })
}

async fn start(workers: bool) -> Sandbox {
    let mut options = Options::default();
    options.write_log.workers = workers;
    options.write_log.claim_idle = LogArgs::default().claim_idle;
    Sandbox::start_with(None, options).await
}

/// Realistic, distinct texts: the sample sentences, numbered.
#[derive(Clone)]
struct Texts {
    sentences: Arc<Vec<String>>,
    fresh: Arc<AtomicUsize>,
}

impl Texts {
    fn next(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                let k = self.fresh.fetch_add(1, Ordering::Relaxed);
                format!("{} (note {k})", self.sentences[k % self.sentences.len()])
            })
            .collect()
    }
}

async fn remember(client: &Client, user: &str, texts: Vec<String>) -> pb::RememberResponse {
    client
        .clone()
        .remember(pb::RememberRequest {
            scope: Some(pb::Scope {
                user_id: user.into(),
                ..Default::default()
            }),
            memories: texts
                .into_iter()
                .map(|text| pb::MemoryInput {
                    text,
                    ..Default::default()
                })
                .collect(),
            mode: pb::WriteMode::Async.into(),
            extract: false,
            privacy: 0,
        })
        .await
        .unwrap()
        .into_inner()
}

/// `calls` Remembers of `per_call` memories by `concurrency` callers; latency of each.
async fn closed_loop(
    client: &Client,
    texts: &Texts,
    concurrency: usize,
    per_call: usize,
    calls: usize,
) -> (Histogram<u64>, Duration) {
    let remaining = Arc::new(AtomicUsize::new(calls));
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|c| {
            let (client, texts, remaining) = (client.clone(), texts.clone(), remaining.clone());
            tokio::spawn(async move {
                let mut histogram = Histogram::<u64>::new(3).unwrap();
                let mut n = c;
                while remaining
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                    .is_ok()
                {
                    let batch = texts.next(per_call);
                    let sent = Instant::now();
                    remember(&client, &format!("user-{}", n % USERS), batch).await;
                    histogram.record(sent.elapsed().as_micros() as u64).unwrap();
                    n += concurrency;
                }
                histogram
            })
        })
        .collect();
    let mut histogram = Histogram::<u64>::new(3).unwrap();
    for task in tasks {
        histogram.add(task.await.unwrap()).unwrap();
    }
    (histogram, started.elapsed())
}
