//! `engram eval locomo --folds N`: every tunable choice of HYBRID made on some conversations and
//! measured on the others.
//!
//! From each question's candidates ([`crate::eval::candidates`]: the dense and keyword lists
//! whole, the temporal ranks of HYBRID's hits), each strategy's list is cut to the depth the
//! service fetches for `k` and fused with retrieval's own [`engram_retrieval::fusion`] code, so
//! what is scored here is what the service would answer. For each fold (one conversation held
//! out when there are as many folds as conversations), on the others it chooses the dense
//! share of fusion (the grid 0.05…0.95, best recall@k, then MRR), fits the relevance models,
//! and sets the context floor (the highest relevance that keeps 95 % of the evidence turns in
//! the top k); then it scores the held-out conversation with them. The in-sample row makes the
//! same choices on all conversations and scores them too: the gap between the two is the fit.

use std::collections::{BTreeMap, HashMap};

use engram_domain::model::SearchMode;
use engram_retrieval::fusion::{self, Evidence, FusionWeights, RelevanceModel};
use serde::Serialize;

use crate::eval::Candidates;

/// Share of the evidence turns in the top k that the context floor keeps.
const KEEP: f64 = 0.95;

/// One question, its lists cut to the service's depth.
struct Question<'a> {
    conversation: &'a str,
    category: u32,
    evidence: &'a [String],
    dense: Vec<(&'a str, f32)>,
    keyword: Vec<(&'a str, f32)>,
    temporal: Vec<(&'a str, f32)>,
}

impl<'a> Question<'a> {
    fn new(c: &'a Candidates, depth: usize) -> Self {
        let list = |rank: fn(&crate::eval::Candidate) -> (u32, f32)| {
            let mut hits: Vec<(u32, &'a str, f32)> = c
                .candidates
                .iter()
                .map(|x| {
                    let (r, s) = rank(x);
                    (r, x.dia_id.as_str(), s)
                })
                .filter(|(r, _, _)| *r > 0 && *r as usize <= depth)
                .collect();
            hits.sort_by_key(|(r, _, _)| *r);
            hits.into_iter().map(|(_, d, s)| (d, s)).collect::<Vec<_>>()
        };
        Self {
            conversation: &c.conversation,
            category: c.category,
            evidence: &c.evidence,
            dense: list(|x| (x.dense_rank, x.dense_score)),
            keyword: list(|x| (x.keyword_rank, x.keyword_score)),
            temporal: list(|x| (x.temporal_rank, x.temporal_score)),
        }
    }

    fn answerable(&self) -> bool {
        (1..=4).contains(&self.category) && !self.evidence.is_empty()
    }

    /// The ranking a mode gives, best first, with each hit's evidence.
    fn ranking(&self, mode: SearchMode, weights: &FusionWeights, depth: usize) -> Vec<Ranked<'a>> {
        let mut order: Vec<(&'a str, f32)> = match mode {
            SearchMode::Semantic => self.dense.clone(),
            SearchMode::Keyword => self.keyword.clone(),
            SearchMode::Hybrid => {
                let mut lists = vec![
                    fusion::List {
                        weight: weights.dense,
                        hits: &self.dense[..],
                    },
                    fusion::List {
                        weight: weights.keyword,
                        hits: &self.keyword[..],
                    },
                ];
                if !self.temporal.is_empty() {
                    lists.push(fusion::List {
                        weight: weights.temporal,
                        hits: &self.temporal[..],
                    });
                }
                fusion::fuse(&lists).into_iter().collect()
            }
        };
        if mode == SearchMode::Hybrid {
            order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
        }
        let scores = |l: &[(&str, f32)]| l.iter().map(|(_, s)| *s).collect::<Vec<_>>();
        let missing_cosine = fusion::missing_score(&scores(&self.dense), depth);
        let missing_bm25 = fusion::missing_score(&scores(&self.keyword), depth);
        let find = |l: &[(&str, f32)], id: &str| l.iter().find(|(d, _)| *d == id).map(|x| x.1);
        order
            .into_iter()
            .map(|(id, _)| {
                let cosine = find(&self.dense, id)
                    .or_else(|| find(&self.temporal, id))
                    .unwrap_or(missing_cosine);
                let bm25 = find(&self.keyword, id).unwrap_or(missing_bm25);
                Ranked {
                    id,
                    evidence: Evidence { cosine, bm25 },
                }
            })
            .collect()
    }
}

struct Ranked<'a> {
    id: &'a str,
    evidence: Evidence,
}

/// The choices made on training conversations.
#[derive(Debug, Clone, Serialize)]
pub struct Choices {
    pub dense_share: f32,
    pub models: BTreeMap<&'static str, [f64; 3]>,
    pub floor: f32,
}

/// What the choices give on the conversations scored.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    pub questions: usize,
    /// recall@k, all-recall@k, MRR by mode.
    pub recall: BTreeMap<&'static str, [f64; 3]>,
    /// AUC of the top hit's relevance: answerable questions whose top hit is evidence against
    /// category-5 questions, by mode.
    pub auc: BTreeMap<&'static str, f64>,
    /// Share of the evidence turns in HYBRID's top k at or above the floor.
    pub evidence_kept: f64,
    /// Share of category-5 questions with no hit at or above the floor.
    pub adversarial_empty: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Fold {
    pub held_out: Vec<String>,
    pub choices: Choices,
    pub held_out_figures: Figures,
}

#[derive(Debug, Clone, Serialize)]
pub struct CrossValidation {
    pub k: u32,
    pub folds: Vec<Fold>,
    /// Every fold's held-out questions pooled.
    pub held_out: Figures,
    pub in_sample_choices: Choices,
    pub in_sample: Figures,
}

const MODES: [(SearchMode, &str); 3] = [
    (SearchMode::Hybrid, "hybrid"),
    (SearchMode::Semantic, "semantic"),
    (SearchMode::Keyword, "keyword"),
];

fn depth(k: u32) -> usize {
    (k as usize * 3).max(fusion::DEPTH)
}

/// recall@k, all-recall@k, MRR of a mode over the answerable questions.
fn recall(
    questions: &[&Question<'_>],
    mode: SearchMode,
    weights: &FusionWeights,
    k: u32,
) -> [f64; 3] {
    let d = depth(k);
    let (mut any, mut all, mut mrr, mut n) = (0.0, 0.0, 0.0, 0.0);
    for q in questions.iter().filter(|q| q.answerable()) {
        n += 1.0;
        let ranking = q.ranking(mode, weights, d);
        let top: Vec<&str> = ranking.iter().take(k as usize).map(|r| r.id).collect();
        let ranks: Vec<Option<usize>> = q
            .evidence
            .iter()
            .map(|e| top.iter().position(|t| t == e))
            .collect();
        if let Some(first) = ranks.iter().flatten().min() {
            any += 1.0;
            mrr += 1.0 / (*first as f64 + 1.0);
        }
        if ranks.iter().all(Option::is_some) {
            all += 1.0;
        }
    }
    let n = f64::max(n, 1.0);
    [any / n, all / n, mrr / n]
}

/// The probability that a random positive outranks a random negative (ties count half).
pub fn auc(positives: &[f32], negatives: &[f32]) -> f64 {
    if positives.is_empty() || negatives.is_empty() {
        return f64::NAN;
    }
    let mut wins = 0.0;
    for p in positives {
        for n in negatives {
            wins += if p > n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / (positives.len() * negatives.len()) as f64
}

fn as_model(w: [f64; 3]) -> RelevanceModel {
    RelevanceModel {
        intercept: w[0],
        cosine: w[1],
        bm25: w[2],
    }
}

fn choose(questions: &[&Question<'_>], k: u32) -> Choices {
    let d = depth(k);
    let grid: Vec<f32> = (1..20).map(|i| i as f32 * 0.05).collect();
    let mut best = (FusionWeights::DENSE_SHARE, [-1.0f64; 3]);
    for share in grid {
        let r = recall(
            questions,
            SearchMode::Hybrid,
            &FusionWeights::balanced(share),
            k,
        );
        if (r[0], r[2]) > (best.1[0], best.1[2]) {
            best = (share, r);
        }
    }
    let weights = FusionWeights::balanced(best.0);
    let mut models = BTreeMap::new();
    for (mode, name) in MODES {
        let mut samples = Vec::new();
        for q in questions.iter().filter(|q| q.answerable()) {
            for hit in q.ranking(mode, &weights, d) {
                samples.push((
                    hit.evidence.features(),
                    q.evidence.iter().any(|e| e == hit.id),
                ));
            }
        }
        let m = fusion::fit(
            &samples,
            mode != SearchMode::Keyword,
            mode != SearchMode::Semantic,
        );
        models.insert(name, [m.intercept, m.cosine, m.bm25]);
    }
    let hybrid = as_model(models["hybrid"]);
    let mut evidence: Vec<f32> = questions
        .iter()
        .filter(|q| q.answerable())
        .flat_map(|q| {
            q.ranking(SearchMode::Hybrid, &weights, d)
                .into_iter()
                .take(k as usize)
                .filter(|h| q.evidence.iter().any(|e| e == h.id))
                .map(|h| hybrid.relevance(h.evidence))
                .collect::<Vec<_>>()
        })
        .collect();
    evidence.sort_by(f32::total_cmp);
    let dropped = ((evidence.len() as f64) * (1.0 - KEEP)).floor() as usize;
    // Two decimals, rounded down: a setting a person can read, still keeping 95 %.
    let floor = evidence
        .get(dropped)
        .map_or(0.0, |v| (v * 100.0).floor() / 100.0);
    Choices {
        dense_share: best.0,
        models,
        floor,
    }
}

fn measure(questions: &[&Question<'_>], choices: &Choices, k: u32) -> Figures {
    let d = depth(k);
    let weights = FusionWeights::balanced(choices.dense_share);
    let mut figures = Figures {
        questions: questions.iter().filter(|q| q.answerable()).count(),
        ..Figures::default()
    };
    for (mode, name) in MODES {
        figures
            .recall
            .insert(name, recall(questions, mode, &weights, k));
        let model = as_model(choices.models[name]);
        let (mut positives, mut negatives) = (Vec::new(), Vec::new());
        for q in questions {
            let ranking = q.ranking(mode, &weights, d);
            let Some(top) = ranking.first() else { continue };
            let relevance = model.relevance(top.evidence);
            if q.category == 5 {
                negatives.push(relevance);
            } else if q.answerable() && q.evidence.iter().any(|e| e == top.id) {
                positives.push(relevance);
            }
        }
        figures.auc.insert(name, auc(&positives, &negatives));
    }
    let hybrid = as_model(choices.models["hybrid"]);
    let (mut kept, mut evidence, mut empty, mut adversarial) = (0usize, 0usize, 0usize, 0usize);
    for q in questions {
        let top: Vec<Ranked<'_>> = q
            .ranking(SearchMode::Hybrid, &weights, d)
            .into_iter()
            .take(k as usize)
            .collect();
        if q.category == 5 {
            adversarial += 1;
            if top
                .iter()
                .all(|h| hybrid.relevance(h.evidence) < choices.floor)
            {
                empty += 1;
            }
        } else if q.answerable() {
            for h in top.iter().filter(|h| q.evidence.iter().any(|e| e == h.id)) {
                evidence += 1;
                if hybrid.relevance(h.evidence) >= choices.floor {
                    kept += 1;
                }
            }
        }
    }
    figures.evidence_kept = kept as f64 / evidence.max(1) as f64;
    figures.adversarial_empty = empty as f64 / adversarial.max(1) as f64;
    figures
}

/// Cross-validate over `folds` folds of the conversations (in name order, round robin).
pub fn run(candidates: &[Candidates], k: u32, folds: usize) -> CrossValidation {
    let d = depth(k);
    let questions: Vec<Question<'_>> = candidates.iter().map(|c| Question::new(c, d)).collect();
    let mut names: Vec<&str> = questions.iter().map(|q| q.conversation).collect();
    names.sort();
    names.dedup();
    let fold_of: HashMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, i % folds.max(1)))
        .collect();
    let all: Vec<&Question<'_>> = questions.iter().collect();
    let mut out = Vec::new();
    let mut pooled: Vec<(&Question<'_>, usize)> = Vec::new();
    for fold in 0..folds.max(1) {
        let (test, train): (Vec<&Question<'_>>, Vec<&Question<'_>>) =
            all.iter().partition(|q| fold_of[q.conversation] == fold);
        if test.is_empty() || train.is_empty() {
            continue;
        }
        let choices = choose(&train, k);
        let figures = measure(&test, &choices, k);
        pooled.extend(test.iter().map(|q| (*q, out.len())));
        out.push(Fold {
            held_out: names
                .iter()
                .filter(|n| fold_of[**n] == fold)
                .map(|n| n.to_string())
                .collect(),
            choices,
            held_out_figures: figures,
        });
    }
    let held_out = pool(&out, &pooled, k);
    let in_sample_choices = choose(&all, k);
    let in_sample = measure(&all, &in_sample_choices, k);
    CrossValidation {
        k,
        folds: out,
        held_out,
        in_sample_choices,
        in_sample,
    }
}

/// The held-out figures of every fold pooled: each question scored with its own fold's
/// choices (AUC over the pooled relevances).
fn pool(folds: &[Fold], pooled: &[(&Question<'_>, usize)], k: u32) -> Figures {
    let n: usize = folds.iter().map(|f| f.held_out_figures.questions).sum();
    let mut figures = Figures {
        questions: n,
        ..Figures::default()
    };
    let weight = |f: &Fold| f.held_out_figures.questions as f64 / n.max(1) as f64;
    for (_, name) in MODES {
        let mut sum = [0.0; 3];
        for f in folds {
            for (s, v) in sum.iter_mut().zip(f.held_out_figures.recall[name]) {
                *s += v * weight(f);
            }
        }
        figures.recall.insert(name, sum);
    }
    let d = depth(k);
    for (mode, name) in MODES {
        let (mut positives, mut negatives) = (Vec::new(), Vec::new());
        for (q, fold) in pooled {
            let choices = &folds[*fold].choices;
            let ranking = q.ranking(mode, &FusionWeights::balanced(choices.dense_share), d);
            let Some(top) = ranking.first() else { continue };
            let relevance = as_model(choices.models[name]).relevance(top.evidence);
            if q.category == 5 {
                negatives.push(relevance);
            } else if q.answerable() && q.evidence.iter().any(|e| e == top.id) {
                positives.push(relevance);
            }
        }
        figures.auc.insert(name, auc(&positives, &negatives));
    }
    // Shares weighted by each fold's questions, like the recall figures.
    figures.evidence_kept = folds
        .iter()
        .map(|f| f.held_out_figures.evidence_kept * weight(f))
        .sum();
    figures.adversarial_empty = folds
        .iter()
        .map(|f| f.held_out_figures.adversarial_empty * weight(f))
        .sum();
    figures
}

/// The cross-validation as a table.
pub fn table(cv: &CrossValidation) -> String {
    let k = cv.k;
    let mut out = format!(
        "Cross-validation, k = {k}: choices made on the other conversations, scored on the held-out ones\n\n"
    );
    out += &format!(
        "{:<12} {:>6} {:>5} {:>15} {:>15} {:>15} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6}\n",
        "held out",
        "share",
        "n",
        "hybrid r/all/mrr",
        "keyword",
        "semantic",
        "auc-h",
        "auc-s",
        "auc-k",
        "floor",
        "kept",
        "c5-0"
    );
    let row = |name: &str, share: String, floor: String, f: &Figures| {
        let r = |m: &str| {
            let v = f.recall[m];
            format!("{:.3}/{:.3}/{:.3}", v[0], v[1], v[2])
        };
        format!(
            "{:<12} {:>6} {:>5} {:>15} {:>15} {:>15} {:>7.3} {:>7.3} {:>7.3} {:>6} {:>6.3} {:>6.3}\n",
            name,
            share,
            f.questions,
            r("hybrid"),
            r("keyword"),
            r("semantic"),
            f.auc["hybrid"],
            f.auc["semantic"],
            f.auc["keyword"],
            floor,
            f.evidence_kept,
            f.adversarial_empty
        )
    };
    for fold in &cv.folds {
        out += &row(
            &fold.held_out.join(","),
            format!("{:.2}", fold.choices.dense_share),
            format!("{:.2}", fold.choices.floor),
            &fold.held_out_figures,
        );
    }
    out += &row("held-out", "-".into(), "-".into(), &cv.held_out);
    out += &row(
        "in-sample",
        format!("{:.2}", cv.in_sample_choices.dense_share),
        format!("{:.2}", cv.in_sample_choices.floor),
        &cv.in_sample,
    );
    out += "\nRelevance models fit on all conversations (intercept, cosine, ln(1 + BM25)):\n";
    for (name, w) in &cv.in_sample_choices.models {
        out += &format!("  {name:<9} {:.3} {:.3} {:.3}\n", w[0], w[1], w[2]);
    }
    out += "\nshare: dense share of fusion; auc-*: top hit's relevance, answerable (top hit is\n\
            evidence) against category 5; kept: evidence turns in HYBRID's top k at or above the\n\
            floor; c5-0: category-5 questions left with no memory at the floor.\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_counts_wins_and_half_ties() {
        assert_eq!(auc(&[0.9, 0.8], &[0.1]), 1.0);
        assert_eq!(auc(&[0.1], &[0.9]), 0.0);
        assert_eq!(auc(&[0.5], &[0.5]), 0.5);
        assert!(auc(&[], &[0.5]).is_nan());
    }
}
