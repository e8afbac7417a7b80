//! How HYBRID turns the strategies' ranked lists into one ranking, and how sure a hit is.
//!
//! **Fusion.** Each list's raw scores (cosines, BM25) are mapped to [0, 1] per query: its first
//! score to 1, its score at [`DEPTH`] to 0 (or a raw 0, when the list is shorter: it then
//! holds every memory that scores at all), linearly between, lower ones clipped to 0
//! ([`normalise`]). The fused score is the weighted mean of a
//! memory's normalised scores over the lists that ran, so first place everywhere scores 1.
//! Unlike rank fusion it keeps how far apart the scores are: a BM25 list whose first hit
//! matches every rare term of the query and whose second matches one counts that gap, where
//! reciprocal rank fusion counts only the order. The one parameter is the dense share
//! ([`FusionWeights::balanced`]); the temporal list (cosines inside a time window) counts as
//! dense, the entity list (BM25 among memories sharing a distinctive entity) is off by default.
//! `engram eval locomo --folds 5` chooses the share on four LoCoMo conversations and measures
//! it on the fifth (BENCHMARKS.md).
//!
//! **Relevance.** A hit's relevance in [0, 1] is a logistic model of its raw evidence, fit on
//! the LoCoMo conversations (every candidate of every question, labelled by whether it is an
//! evidence turn, the two labels weighted equally): `σ(b₀ + b₁·cosine + b₂·ln(1 + BM25))`, with
//! one model per mode since SEMANTIC has no BM25 and KEYWORD no cosine. Raw scores, not
//! normalised ones, so a relevance means the same for every query: the second of two unrelated
//! memories is not "nearly as relevant" as the first. A strategy that did not return a memory
//! says its score is at most the lowest it returned (0 when the list was not full).

use std::collections::HashMap;
use std::hash::Hash;

use engram_domain::model::SearchMode;

/// Bumped whenever fusion or the relevance models change what a result holds, so cached
/// results scored the old way are not served (part of the result cache's key).
pub const SCORING_VERSION: u32 = 3;

/// The depth at which a list's scores are normalised: the candidates fetched for a `top_k` of
/// 10 (longer lists, for larger `top_k`, add memories at 0 from that list, so the order of
/// the first ten does not depend on `top_k`).
pub const DEPTH: usize = 30;

/// A list's scores, best first, mapped to [0, 1] (see the module docs).
pub fn normalise(scores: &[f32]) -> Vec<f32> {
    let Some(&first) = scores.first() else {
        return Vec::new();
    };
    let full = scores.len() >= DEPTH;
    let floor = if full { scores[DEPTH - 1] } else { 0.0 };
    let span = first - floor;
    scores
        .iter()
        .map(|&s| {
            if span > 0.0 {
                ((s - floor) / span).clamp(0.0, 1.0)
            } else if full && s >= first {
                // Tied with the first down to DEPTH: first.
                1.0
            } else {
                // Nothing above what a memory the strategy did not find scores.
                0.0
            }
        })
        .collect()
}

/// One ranked list to fuse: its weight and its `(key, raw score)` pairs, best first.
pub struct List<'a, K> {
    pub weight: f32,
    pub hits: &'a [(K, f32)],
}

/// The fused score of every key in the lists: `Σ weight · normalised / Σ weight` over the lists
/// with a weight (an empty list that ran still counts in the denominator).
pub fn fuse<K: Eq + Hash + Clone>(lists: &[List<'_, K>]) -> HashMap<K, f32> {
    let total: f32 = lists.iter().map(|l| l.weight.max(0.0)).sum();
    let mut fused: HashMap<K, f32> = HashMap::new();
    if total <= 0.0 {
        return fused;
    }
    for list in lists.iter().filter(|l| l.weight > 0.0) {
        let scores: Vec<f32> = list.hits.iter().map(|(_, s)| *s).collect();
        for ((key, _), n) in list.hits.iter().zip(normalise(&scores)) {
            *fused.entry(key.clone()).or_default() += list.weight * n / total;
        }
    }
    fused
}

/// How much each strategy's list counts in HYBRID fusion; 0 turns a strategy off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FusionWeights {
    pub dense: f32,
    pub keyword: f32,
    pub temporal: f32,
    pub entity: f32,
}

impl FusionWeights {
    /// The dense share that measured best on the five shared LoCoMo conversations (and was
    /// chosen in three folds of five when each was held out, the others 0.35 and 0.40;
    /// BENCHMARKS.md).
    pub const DENSE_SHARE: f32 = 0.45;

    /// Dense (and temporal) at `dense_share`, keyword at the rest, entity off.
    pub fn balanced(dense_share: f32) -> Self {
        Self {
            dense: dense_share,
            keyword: 1.0 - dense_share,
            temporal: dense_share,
            entity: 0.0,
        }
    }
}

impl Default for FusionWeights {
    fn default() -> Self {
        Self::balanced(Self::DENSE_SHARE)
    }
}

impl std::fmt::Display for FusionWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dense={},keyword={},temporal={},entity={}",
            self.dense, self.keyword, self.temporal, self.entity
        )
    }
}

impl std::str::FromStr for FusionWeights {
    type Err = String;

    /// `dense=0.45,keyword=0.55,temporal=0.45,entity=0`; strategies left out keep their
    /// default.
    fn from_str(text: &str) -> Result<Self, String> {
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
        if weights.dense + weights.keyword <= 0.0 {
            // Temporal and entity only run beside them, on queries that name a time or entity.
            return Err("dense or keyword must have a weight above 0".into());
        }
        Ok(weights)
    }
}

/// A logistic model of relevance: `σ(intercept + cosine·c + ln(1 + bm25)·k)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelevanceModel {
    pub intercept: f64,
    pub cosine: f64,
    pub bm25: f64,
}

/// Raw evidence about one hit.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Evidence {
    pub cosine: f32,
    pub bm25: f32,
}

impl Evidence {
    /// The model's inputs: what a mode's model reads.
    pub fn features(&self) -> [f64; 2] {
        [
            f64::from(self.cosine),
            f64::from(self.bm25.max(0.0)).ln_1p(),
        ]
    }
}

impl RelevanceModel {
    pub fn relevance(&self, evidence: Evidence) -> f32 {
        let [cosine, bm25] = evidence.features();
        let z = self.intercept + self.cosine * cosine + self.bm25 * bm25;
        (1.0 / (1.0 + (-z).exp())) as f32
    }
}

/// The fitted models, by mode: the fit on all five shared conversations that `engram eval
/// locomo --folds 5` prints. LoCoMo's questions reuse their evidence's words, so the fit leans
/// on BM25: a paraphrase ("what pet do I have" for "I adopted a cat") gets a low relevance.
pub fn model(mode: SearchMode) -> RelevanceModel {
    match mode {
        SearchMode::Hybrid => HYBRID,
        SearchMode::Semantic => SEMANTIC,
        SearchMode::Keyword => KEYWORD,
    }
}

pub const HYBRID: RelevanceModel = RelevanceModel {
    intercept: -6.046,
    cosine: 4.039,
    bm25: 2.103,
};
pub const SEMANTIC: RelevanceModel = RelevanceModel {
    intercept: -4.601,
    cosine: 8.932,
    bm25: 0.0,
};
pub const KEYWORD: RelevanceModel = RelevanceModel {
    intercept: -7.138,
    cosine: 0.0,
    bm25: 3.442,
};

/// A memory's score in a list it is missing from: at most the lowest the list returned, or 0
/// when the list was not full (it returned every memory that scores at all).
pub fn missing_score(hits: &[f32], limit: usize) -> f32 {
    match hits.last() {
        Some(&lowest) if hits.len() >= limit => lowest,
        _ => 0.0,
    }
}

/// Fit a [`RelevanceModel`] to labelled features by Newton's method on the logistic loss,
/// each label weighted by the other's share (so both count equally) with a small ridge.
/// `use_cosine`/`use_bm25` pick the features a mode has.
#[allow(clippy::needless_range_loop)] // matrix code reads best indexed
pub fn fit(samples: &[([f64; 2], bool)], use_cosine: bool, use_bm25: bool) -> RelevanceModel {
    let positives = samples.iter().filter(|(_, y)| *y).count().max(1) as f64;
    let negatives = samples.iter().filter(|(_, y)| !*y).count().max(1) as f64;
    let total = positives + negatives;
    let pick = |x: &[f64; 2]| -> [f64; 3] {
        [
            1.0,
            if use_cosine { x[0] } else { 0.0 },
            if use_bm25 { x[1] } else { 0.0 },
        ]
    };
    let mut w = [0.0f64; 3];
    for _ in 0..50 {
        let mut gradient = [0.0f64; 3];
        let mut hessian = [[0.0f64; 3]; 3];
        for (x, y) in samples {
            let x = pick(x);
            let weight = if *y {
                total / (2.0 * positives)
            } else {
                total / (2.0 * negatives)
            };
            let z: f64 = (0..3).map(|i| w[i] * x[i]).sum();
            let p = 1.0 / (1.0 + (-z).exp());
            let target = if *y { 1.0 } else { 0.0 };
            for i in 0..3 {
                gradient[i] += weight * (p - target) * x[i];
                for j in 0..3 {
                    hessian[i][j] += weight * p * (1.0 - p) * x[i] * x[j];
                }
            }
        }
        for (i, row) in hessian.iter_mut().enumerate() {
            row[i] += 1e-3;
            gradient[i] += 1e-3 * w[i];
        }
        let Some(step) = solve(hessian, gradient) else {
            break;
        };
        for i in 0..3 {
            w[i] -= step[i];
        }
        if step.iter().all(|s| s.abs() < 1e-9) {
            break;
        }
    }
    RelevanceModel {
        intercept: w[0],
        cosine: w[1],
        bm25: w[2],
    }
}

/// `a · x = b` for a 3×3 system, by Gaussian elimination with partial pivoting.
#[allow(clippy::needless_range_loop)] // matrix code reads best indexed
fn solve(mut a: [[f64; 3]; 3], mut b: [f64; 3]) -> Option<[f64; 3]> {
    for col in 0..3 {
        let pivot = (col..3).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..3 {
            let factor = a[row][col] / a[col][col];
            for k in col..3 {
                a[row][k] -= factor * a[col][k];
            }
            b[row] -= factor * b[col];
        }
    }
    let mut x = [0.0f64; 3];
    for row in (0..3).rev() {
        let rest: f64 = (row + 1..3).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - rest) / a[row][row];
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_maps_first_to_one_and_depth_to_zero() {
        assert_eq!(normalise(&[]), Vec::<f32>::new());
        assert_eq!(normalise(&[0.3]), vec![1.0]);
        // A short list holds everything that scores: normalised against 0.
        assert_eq!(normalise(&[0.8, 0.4]), vec![1.0, 0.5]);
        assert_eq!(normalise(&[-0.2, -0.3]), vec![0.0, 0.0]);
        // Below the score at DEPTH clips to 0.
        let scores: Vec<f32> = (0..40).map(|i| 100.0 - i as f32).collect();
        let n = normalise(&scores);
        assert_eq!(n[0], 1.0);
        assert_eq!(n[DEPTH - 1], 0.0);
        assert!(n[DEPTH..].iter().all(|&v| v == 0.0));
        // Ties everywhere: all first.
        assert_eq!(normalise(&[2.0, 2.0]), vec![1.0, 1.0]);
        assert_eq!(normalise(&[2.0; DEPTH]), vec![1.0; DEPTH]);
        let mut tied = vec![2.0; DEPTH];
        tied.push(1.0);
        assert_eq!(normalise(&tied)[DEPTH], 0.0, "below the tie is not first");
    }

    #[test]
    fn fusion_is_a_weighted_mean_that_keeps_score_gaps() {
        let dense = [("a", 0.9), ("b", 0.85), ("c", 0.1)];
        let keyword = [("c", 12.0), ("b", 1.0), ("a", 0.5)];
        let fused = fuse(&[
            List {
                weight: 0.5,
                hits: &dense,
            },
            List {
                weight: 0.5,
                hits: &keyword,
            },
        ]);
        // c tops keyword by far and a leads dense by little: the gaps decide, c then a then b.
        let mut order: Vec<(&str, f32)> = fused.iter().map(|(k, v)| (*k, *v)).collect();
        order.sort_by(|x, y| y.1.total_cmp(&x.1));
        let names: Vec<&str> = order.iter().map(|(k, _)| *k).collect();
        assert_eq!(names, ["c", "a", "b"], "{order:?}");
        assert!(order.iter().all(|(_, v)| (0.0..=1.0).contains(v)));
        // First everywhere scores 1; a list with no weight does not count.
        let fused = fuse(&[
            List {
                weight: 1.0,
                hits: &[("a", 0.9), ("b", 0.1)],
            },
            List {
                weight: 0.0,
                hits: &[("b", 5.0)],
            },
        ]);
        assert_eq!(fused["a"], 1.0);
        assert!((fused["b"] - 0.1 / 0.9).abs() < 1e-6);
        // An empty list that ran still counts: nothing can score 1 without it.
        let fused = fuse(&[
            List {
                weight: 1.0,
                hits: &[("a", 0.9)],
            },
            List {
                weight: 1.0,
                hits: &[],
            },
        ]);
        assert_eq!(fused["a"], 0.5);
    }

    #[test]
    fn weights_parse_and_bad_ones_are_named() {
        let w: FusionWeights = "keyword=2, entity=0".parse().unwrap();
        assert_eq!((w.dense, w.keyword, w.entity), (0.45, 2.0, 0.0));
        assert!("dense".parse::<FusionWeights>().is_err());
        assert!(
            "lexical=1"
                .parse::<FusionWeights>()
                .unwrap_err()
                .contains("lexical")
        );
        assert!("dense=-1".parse::<FusionWeights>().is_err());
        assert!(
            "dense=0,keyword=0,temporal=1"
                .parse::<FusionWeights>()
                .is_err()
        );
        let d = FusionWeights::default();
        assert_eq!(d.to_string().parse::<FusionWeights>().unwrap(), d);
    }

    #[test]
    fn relevance_grows_with_evidence_and_stays_in_range() {
        for mode in [
            SearchMode::Hybrid,
            SearchMode::Semantic,
            SearchMode::Keyword,
        ] {
            let m = model(mode);
            let weak = m.relevance(Evidence {
                cosine: 0.05,
                bm25: 0.0,
            });
            let strong = m.relevance(Evidence {
                cosine: 0.8,
                bm25: 20.0,
            });
            assert!((0.0..=1.0).contains(&weak) && (0.0..=1.0).contains(&strong));
            assert!(strong > weak, "{mode:?}: {strong} vs {weak}");
        }
    }

    #[test]
    fn missing_scores_are_bounded_by_full_lists_only() {
        assert_eq!(missing_score(&[0.9, 0.5], 2), 0.5);
        assert_eq!(missing_score(&[0.9, 0.5], 30), 0.0);
        assert_eq!(missing_score(&[], 30), 0.0);
    }

    #[test]
    fn the_fit_recovers_a_separating_direction() {
        // Positives have high cosines, negatives low; bm25 is noise.
        let mut samples = Vec::new();
        for i in 0..200 {
            let c = f64::from(i) / 200.0;
            samples.push(([c, (i % 7) as f64], c > 0.6 || i % 11 == 0));
        }
        let m = fit(&samples, true, true);
        assert!(m.cosine > 3.0, "{m:?}");
        assert!(m.bm25.abs() < m.cosine / 3.0, "{m:?}");
        let semantic = fit(&samples, true, false);
        assert_eq!(semantic.bm25, 0.0);
        let z = semantic.intercept + semantic.cosine * 0.6;
        assert!(z.abs() < 1.5, "the boundary is near 0.6: {semantic:?}");
    }
}
