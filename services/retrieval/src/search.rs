//! Recall: embed the query, search the scope, rescore, cut.
//!
//! score = cosine similarity × recency factor × importance factor, where the recency factor is
//! `0.5^(age / half_life)` when the request gives a half-life (1 otherwise) and the importance
//! factor is `0.75 + importance / 2` (1 for the default importance of 0.5).

use std::time::Instant;

use engram_core::api::{Explanation, Hit, Purpose, RecallQuery, RecallResult, Timings};
use engram_core::model::{SearchMode, TenantId, Timestamp};
use engram_core::{Error, Result};
use engram_store::Selection;
use engram_telemetry::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use crate::Retrieval;

/// Dense candidates fetched per requested hit, so rescoring can promote recent memories.
const OVERSAMPLE: u32 = 3;
const MIN_CANDIDATES: u32 = 30;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
}

/// Per-stage Recall latency.
#[derive(Clone)]
pub struct SearchMetrics {
    stages: Family<StageLabels, Histogram, fn() -> Histogram>,
}

fn histogram() -> Histogram {
    Histogram::new(engram_telemetry::latency_buckets())
}

impl SearchMetrics {
    pub fn new(metrics: &Metrics) -> Self {
        let stages: Family<StageLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(histogram);
        metrics.register(
            "engram_recall_stage_seconds",
            "Time spent in each stage of a Recall (embed, dense, fusion, total)",
            stages.clone(),
        );
        Self { stages }
    }

    fn observe(&self, timings: &Timings) {
        for (stage, duration) in [
            ("embed", timings.embed),
            ("dense", timings.dense),
            ("fusion", timings.fusion),
            ("total", timings.total),
        ] {
            self.stages
                .get_or_create(&StageLabels { stage })
                .observe(duration.as_secs_f64());
        }
    }
}

pub async fn search(
    retrieval: &Retrieval,
    tenant: &TenantId,
    query: RecallQuery,
) -> Result<RecallResult> {
    let started = Instant::now();
    if query.mode == SearchMode::Keyword {
        return Err(Error::FailedPrecondition(
            "mode: KEYWORD search is not available in this version; use SEMANTIC or HYBRID".into(),
        ));
    }
    let mut timings = Timings::default();

    let embed_started = Instant::now();
    let mut embedded = retrieval
        .embedder
        .embed(vec![query.query.clone()], Purpose::Query)
        .await?;
    let vector = embedded
        .vectors
        .pop()
        .ok_or_else(|| Error::internal("the embedding service returned no vector"))?;
    timings.embed = embed_started.elapsed();

    let dense_started = Instant::now();
    let selection = Selection {
        tenant: tenant.clone(),
        scope: query.scope.clone(),
        filter: query.filter.clone(),
    };
    let candidates = (query.top_k * OVERSAMPLE).max(MIN_CANDIDATES) as usize;
    let scored = retrieval
        .store
        .search_dense(&selection, vector, candidates)
        .await?;
    timings.dense = dense_started.elapsed();

    let fusion_started = Instant::now();
    let now = Timestamp::now();
    let mut hits: Vec<Hit> = scored
        .into_iter()
        .enumerate()
        .map(|(rank, candidate)| {
            let recency_factor = query.recency_half_life.map_or(1.0, |half_life| {
                let age = candidate.memory.event_time.elapsed_until(now);
                0.5f64.powf(age.as_secs_f64() / half_life.as_secs_f64()) as f32
            });
            let importance_factor = 0.75 + candidate.memory.importance / 2.0;
            let score = candidate.score * recency_factor * importance_factor;
            Hit {
                explanation: query.explain.then_some(Explanation {
                    dense_rank: rank as u32 + 1,
                    dense_score: candidate.score,
                    keyword_rank: 0,
                    keyword_score: 0.0,
                    fused_score: candidate.score,
                    recency_factor,
                    importance_factor,
                }),
                memory: candidate.memory,
                score,
            }
        })
        .filter(|hit| query.min_score.is_none_or(|min| hit.score >= min))
        .collect();
    hits.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(a.memory.id.cmp(&b.memory.id))
    });
    hits.truncate(query.top_k as usize);
    timings.fusion = fusion_started.elapsed();
    timings.total = started.elapsed();
    retrieval.metrics.observe(&timings);

    Ok(RecallResult {
        hits,
        cache_hit: false,
        timings,
    })
}
