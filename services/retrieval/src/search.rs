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
//! (cosine, BM25). HYBRID runs every strategy that applies and fuses their normalised scores
//! by a weighted mean ([`crate::fusion`]), so first place in every strategy that ran scores 1.
//! The final score is `base × recency × importance`, where recency is
//! `0.5^(age / half_life)` when the request gives a half-life (age from the request time) and
//! importance is `0.75 + importance / 2` (1 for the default 0.5). Every hit also carries a
//! relevance in [0, 1] from its raw cosine and BM25 ([`crate::fusion::model`]), comparable
//! across queries and modes; `min_score` applies to it, then `top_k`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use engram_domain::api::{Explanation, Hit, Purpose, RecallQuery, RecallResult, Timings};
use engram_domain::model::{Filter, MemoryId, SearchMode, TenantId, Timestamp};
use engram_domain::{Error, Result};
use engram_store::{Candidate, Selection, StoreQuery};
use engram_telemetry::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use tracing::Instrument as _;

use engram_text::temporal;

use crate::Retrieval;
use crate::fusion::{self, Evidence, FusionWeights};

/// Candidates fetched from each strategy per requested hit, so fusion and rescoring can
/// promote what one strategy ranks low.
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
}

impl Strategy {
    /// The strategy's weight in HYBRID fusion.
    fn weight(self, weights: &FusionWeights) -> f32 {
        match self {
            Strategy::Dense => weights.dense,
            Strategy::Keyword => weights.keyword,
            Strategy::Temporal => weights.temporal,
            Strategy::Entity => weights.entity,
        }
    }
}

/// One strategy's ranking.
struct Ranking {
    strategy: Strategy,
    hits: Vec<Candidate>,
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
async fn embed_query(
    retrieval: &Retrieval,
    tenant: &TenantId,
    query: &str,
) -> Result<(Vec<f32>, Duration)> {
    let started = Instant::now();
    let mut embedded = retrieval
        .embedder
        .embed(tenant, vec![query.to_string()], Purpose::Query)
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
    let dense_side = async {
        if !uses_dense {
            return Ok(DenseSide::default());
        }
        let (vector, embed) = embed_query(retrieval, tenant, &query.query).await?;
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
    let ranked = fuse(query, rankings, &retrieval.weights, candidates, now);
    let hits = read_whole(retrieval, tenant, ranked).await?;
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

/// A candidate that made the cut, before its memory is read.
#[derive(Debug)]
struct Ranked {
    id: MemoryId,
    score: f32,
    relevance: f32,
    explanation: Option<Explanation>,
}

/// The memories of the ranked candidates, read whole (only these: candidates carry no text),
/// in rank order; one deleted since the search is left out.
#[tracing::instrument(name = "store.get", level = "info", skip_all)]
async fn read_whole(
    retrieval: &Retrieval,
    tenant: &TenantId,
    ranked: Vec<Ranked>,
) -> Result<Vec<Hit>> {
    let ids: Vec<MemoryId> = ranked.iter().map(|r| r.id).collect();
    let mut memories: HashMap<MemoryId, engram_domain::model::Memory> = (retrieval.store)
        .get(tenant, &ids)
        .await?
        .into_iter()
        .map(|m| (m.id, m))
        .collect();
    Ok(ranked
        .into_iter()
        .filter_map(|r| {
            memories.remove(&r.id).map(|memory| Hit {
                memory,
                score: r.score,
                relevance: r.relevance,
                explanation: r.explanation,
            })
        })
        .collect())
}

/// Fuse the rankings (normalised scores in HYBRID, the one strategy's score otherwise), apply
/// recency and importance, estimate relevance, apply `min_score` (to the relevance) and
/// `top_k`. `candidates` is how many each strategy was asked for.
fn fuse(
    query: &RecallQuery,
    rankings: Vec<Ranking>,
    weights: &FusionWeights,
    candidates: usize,
    now: Timestamp,
) -> Vec<Ranked> {
    let hybrid = query.mode == SearchMode::Hybrid;
    // A score that is not a number says nothing (the engine should never give one).
    let mut rankings = rankings;
    for ranking in &mut rankings {
        ranking.hits.retain(|h| h.score.is_finite());
    }
    // Strategies without a weight still ran: their scores are evidence for relevance, but
    // they bring no candidates and count nothing in fusion. Weighted ones go first.
    let counts = |r: &Ranking| !hybrid || r.strategy.weight(weights) > 0.0;
    rankings.sort_by_key(|r| !counts(r));
    let lists: Vec<(Strategy, Vec<(MemoryId, f32)>)> = rankings
        .iter()
        .map(|r| {
            let hits = r.hits.iter().map(|h| (h.id, h.score)).collect();
            (r.strategy, hits)
        })
        .collect();
    let fused = if hybrid {
        fusion::fuse(
            &lists
                .iter()
                .map(|(strategy, hits)| fusion::List {
                    weight: strategy.weight(weights),
                    hits,
                })
                .collect::<Vec<_>>(),
        )
    } else {
        HashMap::new()
    };
    // What a list that missed a memory says about its raw score.
    let missing = |strategy: Strategy| {
        lists
            .iter()
            .find(|(s, _)| *s == strategy)
            .map_or(0.0, |(_, hits)| {
                let scores: Vec<f32> = hits.iter().map(|(_, s)| *s).collect();
                fusion::missing_score(&scores, candidates)
            })
    };
    let (missing_cosine, missing_bm25) = (missing(Strategy::Dense), missing(Strategy::Keyword));
    let model = fusion::model(query.mode);

    struct Pooled {
        found: Candidate,
        explanation: Explanation,
        base: f32,
    }
    let mut pool: HashMap<MemoryId, Pooled> = HashMap::new();
    for ranking in rankings {
        let strategy = ranking.strategy;
        let brings_candidates = counts(&ranking);
        for (index, scored) in ranking.hits.into_iter().enumerate() {
            let rank = index as u32 + 1;
            let id = scored.id;
            if !brings_candidates && !pool.contains_key(&id) {
                continue;
            }
            let candidate = pool.entry(id).or_insert_with(|| Pooled {
                found: scored,
                explanation: Explanation::default(),
                base: if hybrid {
                    fused.get(&id).copied().unwrap_or(0.0)
                } else {
                    scored.score
                },
            });
            let e = &mut candidate.explanation;
            match strategy {
                Strategy::Dense => (e.dense_rank, e.dense_score) = (rank, scored.score),
                Strategy::Keyword => (e.keyword_rank, e.keyword_score) = (rank, scored.score),
                Strategy::Temporal => (e.temporal_rank, e.temporal_score) = (rank, scored.score),
                Strategy::Entity => (e.entity_rank, e.entity_score) = (rank, scored.score),
            }
        }
    }

    let mut hits: Vec<Ranked> = pool
        .into_values()
        .map(|c| {
            let e = &c.explanation;
            // The temporal list ranks by the same cosine, the entity list by the same BM25.
            let cosine = match (e.dense_rank, e.temporal_rank) {
                (0, 0) => missing_cosine,
                (0, _) => e.temporal_score,
                _ => e.dense_score,
            };
            let bm25 = match (e.keyword_rank, e.entity_rank) {
                (0, 0) => missing_bm25,
                (0, _) => e.entity_score,
                _ => e.keyword_score,
            };
            let relevance = model.relevance(Evidence { cosine, bm25 });
            let recency_factor = query.recency_half_life.map_or(1.0, |half_life| {
                let age = c.found.event_time.elapsed_until(now);
                0.5f64.powf(age.as_secs_f64() / half_life.as_secs_f64()) as f32
            });
            let importance_factor = 0.75 + c.found.importance / 2.0;
            Ranked {
                id: c.found.id,
                score: c.base * recency_factor * importance_factor,
                relevance,
                explanation: query.explain.then_some(Explanation {
                    fused_score: c.base,
                    recency_factor,
                    importance_factor,
                    ..c.explanation
                }),
            }
        })
        .filter(|hit| query.min_score.is_none_or(|min| hit.relevance >= min))
        .collect();
    // Equal scores (a long tail at 0 when top_k asks for more than the lists normalise) are
    // ordered by relevance, then id.
    hits.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.relevance.total_cmp(&a.relevance))
            .then(a.id.cmp(&b.id))
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

    fn found(m: &Memory, score: f32) -> Candidate {
        Candidate {
            id: m.id,
            score,
            event_time: m.event_time,
            importance: m.importance,
        }
    }

    fn ranking(strategy: Strategy, memories: &[&Memory]) -> Ranking {
        Ranking {
            strategy,
            hits: memories
                .iter()
                .enumerate()
                .map(|(i, m)| found(m, 1.0 - i as f32 / 10.0))
                .collect(),
        }
    }

    fn scored(strategy: Strategy, hits: &[(&Memory, f32)]) -> Ranking {
        Ranking {
            strategy,
            hits: hits.iter().map(|(m, score)| found(m, *score)).collect(),
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
            30,
            Timestamp::from_micros(2_000_000),
        );
        let order: Vec<MemoryId> = hits.iter().map(|h| h.id).collect();
        assert_eq!(order, [b.id, c.id, a.id]);
        let top = hits[0].explanation.unwrap();
        assert_eq!(
            (top.dense_rank, top.keyword_rank, top.temporal_rank),
            (2, 1, 1)
        );
        assert_eq!(top.entity_rank, 0);
        assert!(top.fused_score < 1.0 && top.fused_score > 0.7, "{top:?}");
        // Scores are consistent with the order.
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        for hit in &hits {
            let e = hit.explanation.unwrap();
            let product = e.fused_score * e.recency_factor * e.importance_factor;
            assert!((product - hit.score).abs() < 1e-6);
            assert!((0.0..=1.0).contains(&hit.relevance));
        }
    }

    #[test]
    fn first_place_everywhere_scores_one_and_min_score_cuts_by_relevance() {
        let (a, b) = (memory("a"), memory("b"));
        let mut query = RecallQuery::new(Scope::user("u"), "q", 10);
        // b is second in dense and absent from keyword, but its cosine is near zero: the
        // fused score still ranks it, its relevance says it is unrelated.
        let rankings = || {
            vec![
                scored(Strategy::Dense, &[(&a, 0.6), (&b, 0.05)]),
                scored(Strategy::Keyword, &[(&a, 9.0)]),
            ]
        };
        let hits = fuse(
            &query,
            rankings(),
            &FusionWeights::default(),
            30,
            Timestamp::now(),
        );
        assert!((hits[0].score - 1.0).abs() < 1e-6);
        assert!(hits[0].relevance > 0.5, "{:?}", hits[0]);
        assert!(hits[1].relevance < 0.2, "{:?}", hits[1]);
        query.min_score = Some(0.5);
        let hits = fuse(
            &query,
            rankings(),
            &FusionWeights::default(),
            30,
            Timestamp::now(),
        );
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].id, a.id);
    }

    #[test]
    fn a_strategy_with_no_weight_is_left_out() {
        let (a, b) = (memory("a"), memory("b"));
        let query = RecallQuery::new(Scope::user("u"), "q", 10);
        let weights = FusionWeights {
            keyword: 0.0,
            ..FusionWeights::default()
        };
        let hits = fuse(
            &query,
            vec![
                scored(Strategy::Dense, &[(&a, 0.6)]),
                scored(Strategy::Keyword, &[(&b, 9.0)]),
            ],
            &weights,
            30,
            Timestamp::now(),
        );
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].id, a.id);
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
