//! Local model throughput, as the embedding service runs it: all 1,000 sentences of
//! `loadtest/data/sentences.txt` in one call (length-sorted into forward batches, as
//! sentence-transformers' `encode` does), for forward batch sizes 1, 8 and 32, on the
//! inference workers (one per core unless ENGRAM_INFERENCE_WORKERS says otherwise).
//!
//! Run: `cargo bench -p engram-models --bench local_model`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::process::ExitCode;
use std::time::Instant;

use engram_domain::api::Purpose;
use engram_models::{EmbeddingProvider, LocalEmbedder, LocalOptions, fetch};

const RUNS: usize = 3;

fn main() -> ExitCode {
    engram_runtime::server::main_entry(|| async {
        let sentences: Vec<String> = include_str!("../../../loadtest/data/sentences.txt")
            .lines()
            .map(str::to_string)
            .collect();
        let dir = std::env::var_os("ENGRAM_MODEL_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(fetch::default_model_dir);
        fetch::ensure_model(&dir).unwrap();
        let workers: usize = std::env::var("ENGRAM_INFERENCE_WORKERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        println!(
            "local model {}, {} sentences in one call, median of {RUNS} runs; {} cores, {} inference workers, RAYON_NUM_THREADS={}",
            engram_models::LOCAL_MODEL_ID,
            sentences.len(),
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            LocalOptions {
                workers,
                ..LocalOptions::default()
            }
            .resolved_workers(),
            std::env::var("RAYON_NUM_THREADS").unwrap_or_default(),
        );
        println!("| forward batch size | sentences/s |");
        println!("| --- | --- |");
        for max_batch in [1usize, 8, 32] {
            let model = LocalEmbedder::load(&dir, LocalOptions { workers, max_batch }).unwrap();
            model
                .embed(sentences[..64].to_vec(), Purpose::Document)
                .await
                .unwrap();
            let mut rates = Vec::with_capacity(RUNS);
            for _ in 0..RUNS {
                let started = Instant::now();
                model
                    .embed(sentences.clone(), Purpose::Document)
                    .await
                    .unwrap();
                rates.push(sentences.len() as f64 / started.elapsed().as_secs_f64());
            }
            rates.sort_by(f64::total_cmp);
            println!("| {max_batch} | {:.0} |", rates[RUNS / 2]);
        }
        ExitCode::SUCCESS
    })
}
