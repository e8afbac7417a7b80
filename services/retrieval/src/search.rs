//! Recall: run the search strategies in parallel, fuse their rankings, rescore, cut.
//!
//! Strategies (each a ranked list of the scope's memories, all confined to the tenant, the
//! scope and the request's filter inside the store):
//! - **dense**: cosine similarity to the query's embedding;
//! - **keyword**: BM25 with IDF over the query's terms (no embedding needed, so it runs while
//!   the query is embedded);
//! - **temporal** (HYBRID, when the query names a time, see [`crate::temporal`]): the memories
//!   whose event time falls in that window, by similarity;
//! - **entity** (HYBRID, when the query names entities, see [`engram_text::entities`]): the
//!   memories sharing one of its distinctive entities (those on at most a fifth of the scope's
//!   memories: a name on every other message singles nothing out), by BM25.
//!
//! SEMANTIC runs dense alone and KEYWORD keyword alone; their base score is the strategy's own
//! (cosine, BM25). HYBRID runs every strategy that applies and fuses them by weighted
//! reciprocal rank fusion, `Σ 1 / (rank / weight + 60)` (Qdrant's formula, so a backend that
//! fuses on the server ranks the same), scaled so that first place in every
//! strategy that ran scores 1. The final score is `base × recency × importance`, where recency
//! is `0.5^(age / half_life)` when the request gives a half-life (age from the request time)
//! and importance is `0.75 + importance / 2` (1 for the default 0.5); then `min_score` and
//! `top_k` apply.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use engram_domain::api::{Explanation, Hit, Purpose, RecallQuery, RecallResult, Timings};
use engram_domain::model::{Filter, MemoryId, SearchMode, TenantId, Timestamp};
use engram_domain::{Error, Result};
use engram_store::{Prefetch, ScoredMemory, Selection, StoreQuery};
use engram_telemetry::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use tracing::Instrument as _;

use engram_text::temporal;

use crate::Retrieval;

/// Candidates fetched from each strategy per requested hit, so fusion and rescoring can
/// promote what one strategy ranks low.
const OVERSAMPLE: u32 = 3;
const MIN_CANDIDATES: u32 = 30;
/// The rank constant of reciprocal rank fusion (the usual 60).
const RRF_K: f32 = 60.0;

/// One place's contribution: `1 / (rank / weight + K)`, which is Qdrant's weighted RRF with
/// its `k` set to `K + 1` (0 for a weight of 0).
fn rrf(rank: u32, weight: f32) -> f32 {
    if weight <= 0.0 {
        0.0
    } else {
        1.0 / (rank as f32 / weight + RRF_K)
    }
}

/// How much each strategy counts in HYBRID fusion. Equal weights measured best on LoCoMo
/// (BENCHMARKS.md); a weight of 0 turns a strategy off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FusionWeights {
    pub dense: f32,
    pub keyword: f32,
    pub temporal: f32,
    pub entity: f32,
}

impl FusionWeights {
    /// The weight of one strategy's list (a list the store already fused counts once).
    fn of(&self, strategy: Strategy) -> f32 {
        match strategy {
            Strategy::Dense => self.dense,
            Strategy::Keyword => self.keyword,
            Strategy::Temporal => self.temporal,
            Strategy::Entity => self.entity,
            Strategy::Fused => 1.0,
        }
    }
}

impl std::str::FromStr for FusionWeights {
    type Err = String;

    /// `dense=1,keyword=1,temporal=1,entity=1`; strategies left out keep their default.
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let mut weights = Self::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not strategy=weight"))?;
            let value: f32 = value
                .trim()
                .parse()
                .ok()
                .filter(|v: &f32| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("the weight of {name} must be a number >= 0"))?;
            match name.trim() {
                "dense" => weights.dense = value,
                "keyword" => weights.keyword = value,
                "temporal" => weights.temporal = value,
                "entity" => weights.entity = value,
                other => {
                    return Err(format!(
                        "unknown strategy {other:?} (dense, keyword, temporal, entity)"
                    ));
                }
            }
        }
        Ok(weights)
    }
}

impl Default for FusionWeights {
    fn default() -> Self {
        Self {
            dense: 1.0,
            keyword: 1.0,
            temporal: 1.0,
            entity: 1.0,
        }
    }
}

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
            "Time spent in each stage of a Recall (cache, embed, dense, keyword, fusion, total); \
             embed, dense and keyword only when the result was not cached",
            stages.clone(),
        );
        Self { stages }
    }

    pub(crate) fn observe(&self, timings: &Timings, cache_hit: bool) {
        let mut stages = vec![("cache", timings.cache), ("total", timings.total)];
        if !cache_hit {
            stages.extend([
                ("embed", timings.embed),
                ("dense", timings.dense),
                ("keyword", timings.keyword),
                ("fusion", timings.fusion),
            ]);
        }
        for (stage, duration) in stages {
            self.stages
                .get_or_create(&StageLabels { stage })
                .observe(duration.as_secs_f64());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Strategy {
    Dense,
    Keyword,
    Temporal,
    Entity,
    /// All of them, fused by the store ([`engram_store::VectorStore::search_fused`]): scores are already
    /// the scaled fused score.
    Fused,
}

/// One strategy's ranking.
struct Ranking {
    strategy: Strategy,
    hits: Vec<ScoredMemory>,
}

/// Strategies beyond dense and keyword, each with its narrowed selection.
type Extra = Vec<(Strategy, Selection)>;

/// What the dense side found, and how long it took.
#[derive(Default)]
struct DenseSide {
    rankings: Vec<Ranking>,
    embed: Duration,
    search: Duration,
}

/// The filter narrowed to a window, or `None` when the window and the filter's own range do
/// not meet.
fn within_window(filter: &Filter, window: temporal::Window) -> Option<Filter> {
    let after = filter
        .event_after
        .map_or(window.from, |a| a.max(window.from));
    let before = filter.event_before.map_or(window.to, |b| b.min(window.to));
    (after < before).then(|| Filter {
        event_after: Some(after),
        event_before: Some(before),
        ..filter.clone()
    })
}

/// An entity shared by more than this share of the scope's memories (a speaker's name in a
/// two-person chat) says nothing about which memory a query is after.
const MAX_ENTITY_SHARE: f64 = 0.2;
/// Query entities looked at.
const MAX_QUERY_ENTITIES: usize = 4;

/// The query's entities that single out few of the scope's memories: counted in the index
/// (one indexed count each, in parallel), like an inverse document frequency cut.
#[tracing::instrument(name = "store.count_entities", level = "info", skip_all)]
async fn distinctive_entities(
    retrieval: &Retrieval,
    selection: &Selection,
    query: &str,
) -> Result<Vec<String>> {
    let mut entities = engram_text::entities::extract(query);
    entities.truncate(MAX_QUERY_ENTITIES);
    if entities.is_empty() {
        return Ok(entities);
    }
    let count = |entity: Option<String>| {
        let selection = Selection {
            filter: Filter {
                entities_any: entity.into_iter().collect(),
                ..selection.filter.clone()
            },
            ..selection.clone()
        };
        async move { retrieval.store.count_selected(&selection).await }
    };
    let (total, each) = tokio::try_join!(
        count(None),
        futures::future::try_join_all(entities.iter().cloned().map(|e| count(Some(e))))
    )?;
    let limit = (total as f64 * MAX_ENTITY_SHARE).max(1.0);
    Ok(entities
        .into_iter()
        .zip(each)
        .filter(|(_, n)| *n > 0 && (*n as f64) <= limit)
        .map(|(e, _)| e)
        .collect())
}

/// The query's embedding (through the embedding service and its cache), and how long it took.
#[tracing::instrument(name = "embed.query", level = "info", skip_all)]
async fn embed_query(retrieval: &Retrieval, query: &str) -> Result<(Vec<f32>, Duration)> {
    let started = Instant::now();
    let mut embedded = retrieval
        .embedder
        .embed(vec![query.to_string()], Purpose::Query)
        .await?;
    let vector = embedded
        .vectors
        .pop()
        .ok_or_else(|| Error::internal("the embedding service returned no vector"))?;
    Ok((vector, started.elapsed()))
}

/// Run `query` for each strategy's selection, in parallel.
async fn ranked(
    retrieval: &Retrieval,
    strategies: Vec<(Strategy, &Selection)>,
    query: StoreQuery,
    candidates: usize,
) -> Result<Vec<Ranking>> {
    let searches = strategies.into_iter().map(|(strategy, selection)| {
        let query = query.clone();
        async move {
            let hits = retrieval
                .store
                .search(selection, query, candidates)
                .instrument(tracing::info_span!("store.search", strategy = ?strategy))
                .await?;
            Ok::<_, Error>(Ranking { strategy, hits })
        }
    });
    futures::future::try_join_all(searches).await
}

/// Run the strategies of `query` (not cached), fuse and rescore.
pub(crate) async fn run(
    retrieval: &Retrieval,
    tenant: &TenantId,
    query: &RecallQuery,
    now: Timestamp,
) -> Result<RecallResult> {
    let selection = Selection {
        tenant: tenant.clone(),
        scope: query.scope.clone(),
        filter: query.filter.clone(),
    };
    let candidates = (query.top_k * OVERSAMPLE).max(MIN_CANDIDATES) as usize;
    let hybrid = query.mode == SearchMode::Hybrid;
    let uses_dense = query.mode != SearchMode::Keyword;
    let uses_keyword = query.mode != SearchMode::Semantic;

    // The strategies to run besides dense and keyword (HYBRID only, and only with a weight):
    // a time window ranked by similarity, shared entities ranked by BM25.
    let mut dense_extra: Extra = Vec::new();
    let mut keyword_extra: Extra = Vec::new();
    if hybrid
        && retrieval.weights.temporal > 0.0
        && let Some(window) = temporal::window(&query.query, now)
        && let Some(filter) = within_window(&query.filter, window)
    {
        dense_extra.push((
            Strategy::Temporal,
            Selection {
                filter,
                ..selection.clone()
            },
        ));
    }
    // A request that filters by entities already confines every strategy to them.
    if hybrid && retrieval.weights.entity > 0.0 && query.filter.entities_any.is_empty() {
        let entities = distinctive_entities(retrieval, &selection, &query.query).await?;
        if !entities.is_empty() {
            keyword_extra.push((
                Strategy::Entity,
                Selection {
                    filter: Filter {
                        entities_any: entities,
                        ..query.filter.clone()
                    },
                    ..selection.clone()
                },
            ));
        }
    }
    if hybrid && !query.explain && retrieval.store.fuses() {
        return fused_in_store(
            retrieval,
            query,
            &selection,
            (dense_extra, keyword_extra),
            candidates,
            now,
        )
        .await;
    }

    let dense_side = async {
        if !uses_dense {
            return Ok(DenseSide::default());
        }
        let (vector, embed) = embed_query(retrieval, &query.query).await?;
        let started = Instant::now();
        let strategies = std::iter::once((Strategy::Dense, &selection))
            .chain(dense_extra.iter().map(|(s, sel)| (*s, sel)))
            .collect();
        let rankings = ranked(retrieval, strategies, StoreQuery::Dense(vector), candidates).await?;
        Ok::<_, Error>(DenseSide {
            rankings,
            embed,
            search: started.elapsed(),
        })
    };
    let keyword_side = async {
        if !uses_keyword {
            return Ok((Vec::new(), Duration::ZERO));
        }
        let started = Instant::now();
        let terms = retrieval.keywords.query(&query.query);
        let strategies = std::iter::once((Strategy::Keyword, &selection))
            .chain(keyword_extra.iter().map(|(s, sel)| (*s, sel)))
            .collect();
        let rankings = ranked(
            retrieval,
            strategies,
            StoreQuery::Keywords(terms),
            candidates,
        )
        .await?;
        Ok::<_, Error>((rankings, started.elapsed()))
    };
    let (dense, (keyword, keyword_time)) = tokio::try_join!(dense_side, keyword_side)?;

    let fusion_started = Instant::now();
    let mut rankings = dense.rankings;
    rankings.extend(keyword);
    let hits = fuse(query, rankings, &retrieval.weights, now);
    Ok(RecallResult {
        hits,
        cache_hit: false,
        timings: Timings {
            embed: dense.embed,
            dense: dense.search,
            keyword: keyword_time,
            fusion: fusion_started.elapsed(),
            ..Timings::default()
        },
    })
}

/// HYBRID in one request to a store that fuses in its engine (a Qdrant server): each strategy
/// a prefetch, weighted RRF on the server with the same formula [`fuse`] uses, so the order and
/// scores match the embedded engine's. Used when no explanation is asked for, since the server
/// returns only the fused ranking.
async fn fused_in_store(
    retrieval: &Retrieval,
    query: &RecallQuery,
    selection: &Selection,
    (dense_extra, keyword_extra): (Extra, Extra),
    candidates: usize,
    now: Timestamp,
) -> Result<RecallResult> {
    let (vector, embed) = embed_query(retrieval, &query.query).await?;
    let weights = &retrieval.weights;
    let terms = retrieval.keywords.query(&query.query);
    let prefetch = |selection: Selection, query: StoreQuery, weight: f32| Prefetch {
        selection,
        query,
        weight,
        limit: candidates,
    };
    let mut prefetches = vec![
        prefetch(
            selection.clone(),
            StoreQuery::Dense(vector.clone()),
            weights.dense,
        ),
        prefetch(
            selection.clone(),
            StoreQuery::Keywords(terms.clone()),
            weights.keyword,
        ),
    ];
    for (strategy, selection) in dense_extra {
        prefetches.push(prefetch(
            selection,
            StoreQuery::Dense(vector.clone()),
            weights.of(strategy),
        ));
    }
    for (strategy, selection) in keyword_extra {
        prefetches.push(prefetch(
            selection,
            StoreQuery::Keywords(terms.clone()),
            weights.of(strategy),
        ));
    }
    prefetches.retain(|p| p.weight > 0.0);
    let best: f32 = prefetches
        .iter()
        .map(|p| rrf(1, p.weight))
        .sum::<f32>()
        .max(f32::MIN_POSITIVE);
    let started = Instant::now();
    let mut hits = retrieval
        .store
        .search_fused(prefetches, RRF_K as u32 + 1, candidates)
        .instrument(tracing::info_span!("store.search_fused"))
        .await?;
    let search = started.elapsed();
    for hit in &mut hits {
        hit.score /= best;
    }
    let fusion_started = Instant::now();
    let hits = fuse(
        query,
        vec![Ranking {
            strategy: Strategy::Fused,
            hits,
        }],
        weights,
        now,
    );
    Ok(RecallResult {
        hits,
        cache_hit: false,
        timings: Timings {
            embed,
            dense: search,
            fusion: fusion_started.elapsed(),
            ..Timings::default()
        },
    })
}

/// Fuse the rankings (weighted RRF in HYBRID, the one strategy's score otherwise), apply
/// recency and importance, `min_score` and `top_k`.
fn fuse(
    query: &RecallQuery,
    rankings: Vec<Ranking>,
    weights: &FusionWeights,
    now: Timestamp,
) -> Vec<Hit> {
    let hybrid = query.mode == SearchMode::Hybrid;
    // Best possible fused score: first place in every strategy that ran.
    let best: f32 = rankings
        .iter()
        .filter(|r| r.strategy != Strategy::Fused)
        .map(|r| rrf(1, weights.of(r.strategy)))
        .sum::<f32>()
        .max(f32::MIN_POSITIVE);

    struct Candidate {
        memory: engram_domain::model::Memory,
        explanation: Explanation,
        base: f32,
    }
    let mut candidates: HashMap<MemoryId, Candidate> = HashMap::new();
    for ranking in rankings {
        let strategy = ranking.strategy;
        if hybrid && weights.of(strategy) == 0.0 {
            continue;
        }
        for (index, scored) in ranking.hits.into_iter().enumerate() {
            let rank = index as u32 + 1;
            let contribution = match strategy {
                Strategy::Fused => scored.score,
                _ if hybrid => rrf(rank, weights.of(strategy)) / best,
                _ => scored.score,
            };
            let candidate = candidates
                .entry(scored.memory.id)
                .or_insert_with(|| Candidate {
                    memory: scored.memory,
                    explanation: Explanation::default(),
                    base: 0.0,
                });
            candidate.base += contribution;
            let e = &mut candidate.explanation;
            match strategy {
                Strategy::Dense => (e.dense_rank, e.dense_score) = (rank, scored.score),
                Strategy::Keyword => (e.keyword_rank, e.keyword_score) = (rank, scored.score),
                Strategy::Temporal => (e.temporal_rank, e.temporal_score) = (rank, scored.score),
                Strategy::Entity => (e.entity_rank, e.entity_score) = (rank, scored.score),
                Strategy::Fused => {}
            }
        }
    }

    let mut hits: Vec<Hit> = candidates
        .into_values()
        .map(|c| {
            let recency_factor = query.recency_half_life.map_or(1.0, |half_life| {
                let age = c.memory.event_time.elapsed_until(now);
                0.5f64.powf(age.as_secs_f64() / half_life.as_secs_f64()) as f32
            });
            let importance_factor = 0.75 + c.memory.importance / 2.0;
            Hit {
                score: c.base * recency_factor * importance_factor,
                explanation: query.explain.then_some(Explanation {
                    fused_score: c.base,
                    recency_factor,
                    importance_factor,
                    ..c.explanation
                }),
                memory: c.memory,
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
    hits
}

#[cfg(test)]
mod tests {
    use super::*;
    use engram_domain::model::{Memory, NewMemory, Scope};

    fn memory(text: &str) -> Memory {
        Memory::from_input(
            MemoryId::new_time_ordered(),
            TenantId::parse("t").unwrap(),
            Scope::user("u"),
            NewMemory::text(text),
            Timestamp::from_micros(1_000_000),
        )
    }

    fn ranking(strategy: Strategy, memories: &[&Memory]) -> Ranking {
        Ranking {
            strategy,
            hits: memories
                .iter()
                .enumerate()
                .map(|(i, m)| ScoredMemory {
                    memory: (*m).clone(),
                    score: 1.0 - i as f32 / 10.0,
                })
                .collect(),
        }
    }

    #[test]
    fn fusion_rewards_agreement_and_explains_every_rank() {
        let (a, b, c) = (memory("a"), memory("b"), memory("c"));
        let mut query = RecallQuery::new(Scope::user("u"), "q", 10);
        query.explain = true;
        let hits = fuse(
            &query,
            vec![
                ranking(Strategy::Dense, &[&a, &b, &c]),
                ranking(Strategy::Keyword, &[&b, &c]),
                ranking(Strategy::Temporal, &[&b]),
            ],
            &FusionWeights::default(),
            Timestamp::from_micros(2_000_000),
        );
        let order: Vec<&str> = hits.iter().map(|h| h.memory.text.as_str()).collect();
        assert_eq!(order, ["b", "c", "a"]);
        let top = hits[0].explanation.unwrap();
        assert_eq!(
            (top.dense_rank, top.keyword_rank, top.temporal_rank),
            (2, 1, 1)
        );
        assert_eq!(top.entity_rank, 0);
        assert!(top.fused_score < 1.0 && top.fused_score > 0.9, "{top:?}");
        // Scores are consistent with the order.
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        for hit in &hits {
            let e = hit.explanation.unwrap();
            let product = e.fused_score * e.recency_factor * e.importance_factor;
            assert!((product - hit.score).abs() < 1e-6);
        }
    }

    #[test]
    fn first_place_everywhere_scores_one_and_min_score_cuts() {
        let a = memory("a");
        let b = memory("b");
        let mut query = RecallQuery::new(Scope::user("u"), "q", 10);
        let rankings = || {
            vec![
                ranking(Strategy::Dense, &[&a, &b]),
                ranking(Strategy::Keyword, &[&a]),
            ]
        };
        let hits = fuse(
            &query,
            rankings(),
            &FusionWeights::default(),
            Timestamp::now(),
        );
        assert!((hits[0].score - 1.0).abs() < 1e-6);
        query.min_score = Some(0.9);
        let hits = fuse(
            &query,
            rankings(),
            &FusionWeights::default(),
            Timestamp::now(),
        );
        assert_eq!(hits.len(), 1);
    }

    #[test]
    fn weights_parse_and_bad_ones_are_named() {
        let w: FusionWeights = "keyword=2, entity=0".parse().unwrap();
        assert_eq!((w.dense, w.keyword, w.entity), (1.0, 2.0, 0.0));
        assert!("dense".parse::<FusionWeights>().is_err());
        assert!(
            "lexical=1"
                .parse::<FusionWeights>()
                .unwrap_err()
                .contains("lexical")
        );
        assert!("dense=-1".parse::<FusionWeights>().is_err());
    }

    #[test]
    fn a_window_outside_the_filter_range_is_dropped() {
        let window = temporal::Window {
            from: Timestamp::from_micros(100),
            to: Timestamp::from_micros(200),
        };
        let filter = Filter {
            event_after: Some(Timestamp::from_micros(150)),
            ..Filter::default()
        };
        let narrowed = within_window(&filter, window).unwrap();
        assert_eq!(narrowed.event_after, Some(Timestamp::from_micros(150)));
        assert_eq!(narrowed.event_before, Some(Timestamp::from_micros(200)));
        let disjoint = Filter {
            event_before: Some(Timestamp::from_micros(100)),
            ..Filter::default()
        };
        assert_eq!(within_window(&disjoint, window), None);
    }
}
