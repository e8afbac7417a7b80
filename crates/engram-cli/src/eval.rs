//! `engram eval locomo`: recall quality on LoCoMo conversations, against a running gateway.
//!
//! Each conversation file becomes its own user (`locomo-<file stem>`) and each of its sessions a
//! session of that user (`session_<n>`): one MESSAGE memory per turn, text
//! `"<speaker>: <text>"`, role the speaker, event time the session's date-time,
//! metadata `dia_id`, `session` and `conversation`, and an idempotency key per turn so that a
//! second run over the same cluster stores nothing twice. Writes are SYNC, so everything is
//! indexed before the first question. Then every question of categories 1–4 (category 5 is
//! adversarial: its answer is in no turn; the few questions that list no evidence turn are left
//! out too) is asked with the conversation's last session time as
//! the request time, in each search mode, bypassing the result cache, and scored against its
//! evidence turns: recall@k (any evidence turn in the top k), all-recall@k (every one of
//! them), MRR (of the first evidence turn, 0 beyond k), and the client-side Recall latency
//! (every question is embedded once beforehand, so each mode is timed with the query
//! embedding cached). `--json` adds every scored question with the rank of each of its evidence
//! turns in each mode. [`candidates`] asks every question (category 5 too) once more per mode
//! with an explanation, for `--candidates FILE` and the cross-validation of `--folds`
//! ([`crate::crossval`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use engram_domain::model::Timestamp;
use engram_proto::tonic::Status;
use engram_proto::v1 as pb;
use engram_text::calendar;
use serde::Serialize;
use serde_json::Value;

pub const CATEGORIES: [(u32, &str); 4] = [
    (1, "multi-hop"),
    (2, "temporal"),
    (3, "open-domain"),
    (4, "single-hop"),
];

pub const MODES: [(pb::SearchMode, &str); 3] = [
    (pb::SearchMode::Hybrid, "hybrid"),
    (pb::SearchMode::Semantic, "semantic"),
    (pb::SearchMode::Keyword, "keyword"),
];

/// Turns written per Remember call.
const BATCH: usize = 100;

#[derive(Debug, Clone)]
pub struct Turn {
    pub dia_id: String,
    pub speaker: String,
    pub text: String,
    pub session: u32,
    pub time: Timestamp,
}

#[derive(Debug, Clone)]
pub struct Question {
    pub question: String,
    pub evidence: Vec<String>,
    pub category: u32,
}

#[derive(Debug, Clone)]
pub struct Conversation {
    pub name: String,
    pub turns: Vec<Turn>,
    pub questions: Vec<Question>,
    /// The time of the last session: when the questions are asked.
    pub end: Timestamp,
}

/// A file that is not a LoCoMo conversation, and why.
fn bad(path: &Path, why: impl std::fmt::Display) -> String {
    format!("{}: {why}", path.display())
}

/// Read one LoCoMo conversation file.
pub fn read_conversation(path: &Path) -> Result<Conversation, String> {
    let text = std::fs::read_to_string(path).map_err(|e| bad(path, e))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| bad(path, e))?;
    // Released files wrap the conversation in `conversation`; the shared copies do not.
    let conversation = json.get("conversation").unwrap_or(&json);
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("conversation")
        .to_string();
    let mut turns = Vec::new();
    let mut end = None;
    for session in 1u32.. {
        let Some(time) = conversation.get(format!("session_{session}_date_time")) else {
            break;
        };
        let Some(list) = conversation
            .get(format!("session_{session}"))
            .and_then(Value::as_array)
        else {
            // A date without turns (some files list dates of sessions they do not include).
            continue;
        };
        let time = time
            .as_str()
            .and_then(calendar::parse_datetime)
            .ok_or_else(|| {
                bad(
                    path,
                    format!("session_{session}_date_time {time} is not a date"),
                )
            })?;
        end = Some(end.map_or(time, |e: Timestamp| e.max(time)));
        for turn in list {
            let field = |name: &str| turn.get(name).and_then(Value::as_str).unwrap_or("");
            if field("dia_id").is_empty() || field("text").is_empty() {
                continue;
            }
            turns.push(Turn {
                dia_id: field("dia_id").to_string(),
                speaker: field("speaker").to_string(),
                text: field("text").to_string(),
                session,
                time,
            });
        }
    }
    let end = end.ok_or_else(|| bad(path, "no sessions (session_1_date_time, session_1)"))?;
    let questions = json
        .get("qa")
        .or_else(|| conversation.get("qa"))
        .and_then(Value::as_array)
        .ok_or_else(|| bad(path, "no qa list"))?
        .iter()
        .filter_map(|q| {
            let category = u32::try_from(q.get("category")?.as_u64()?).ok()?;
            let question = q.get("question")?.as_str()?.to_string();
            // Evidence ids are sometimes written together ("D8:6; D9:17").
            let evidence = q
                .get("evidence")?
                .as_array()?
                .iter()
                .filter_map(Value::as_str)
                .flat_map(|e| e.split([';', ',', ' ']))
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(str::to_string)
                .collect();
            Some(Question {
                question,
                evidence,
                category,
            })
        })
        .collect();
    Ok(Conversation {
        name,
        turns,
        questions,
        end,
    })
}

/// Every `*.json` file of `dir`, in name order.
pub fn read_dir(dir: &Path) -> Result<Vec<Conversation>, String> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| bad(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(bad(dir, "holds no .json conversation files"));
    }
    paths.iter().map(|p| read_conversation(p)).collect()
}

fn user(conversation: &Conversation) -> String {
    format!("locomo-{}", conversation.name)
}

/// Store a conversation's turns (SYNC, idempotent); how many were new.
pub async fn ingest(
    client: &mut crate::Client,
    conversation: &Conversation,
) -> Result<usize, Status> {
    let mut created = 0;
    let sessions = conversation.turns.chunk_by(|a, b| a.session == b.session);
    for batch in sessions.flat_map(|session| session.chunks(BATCH)) {
        let memories = batch
            .iter()
            .map(|turn| pb::MemoryInput {
                text: format!("{}: {}", turn.speaker, turn.text),
                kind: pb::Kind::Message.into(),
                role: turn.speaker.clone(),
                metadata: [
                    ("dia_id".to_string(), turn.dia_id.clone()),
                    ("session".to_string(), turn.session.to_string()),
                    ("conversation".to_string(), conversation.name.clone()),
                ]
                .into(),
                event_time: Some(engram_domain::convert::timestamp(turn.time)),
                idempotency_key: format!("locomo:{}:{}", conversation.name, turn.dia_id),
                ..Default::default()
            })
            .collect();
        let response = client
            .remember(pb::RememberRequest {
                scope: Some(pb::Scope {
                    user_id: user(conversation),
                    session_id: format!("session_{}", batch[0].session),
                    ..Default::default()
                }),
                memories,
                mode: pb::WriteMode::Sync.into(),
                extract: false,
                privacy: 0,
            })
            .await?
            .into_inner();
        created += response
            .results
            .iter()
            .filter(|r| r.status() == pb::WriteStatus::Created)
            .count();
    }
    Ok(created)
}

/// Scores of one group of questions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Scores {
    pub questions: usize,
    /// Share of questions with at least one evidence turn in the top k.
    pub recall_any: f64,
    /// Share of questions with every evidence turn in the top k.
    pub recall_all: f64,
    pub mrr: f64,
}

#[derive(Debug, Default)]
struct Tally {
    questions: usize,
    any: usize,
    all: usize,
    reciprocal: f64,
}

impl Tally {
    fn add(&mut self, ranks: &[Option<usize>]) {
        self.questions += 1;
        if ranks.iter().any(Option::is_some) {
            self.any += 1;
        }
        if ranks.iter().all(Option::is_some) {
            self.all += 1;
        }
        if let Some(first) = ranks.iter().flatten().min() {
            self.reciprocal += 1.0 / *first as f64;
        }
    }

    fn scores(&self) -> Scores {
        let n = self.questions.max(1) as f64;
        Scores {
            questions: self.questions,
            recall_any: self.any as f64 / n,
            recall_all: self.all as f64 / n,
            mrr: self.reciprocal / n,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    pub mode: &'static str,
    pub overall: Scores,
    /// By category name.
    pub categories: BTreeMap<&'static str, Scores>,
    pub latency: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub k: u32,
    pub conversations: usize,
    pub turns: usize,
    pub questions: usize,
    pub modes: Vec<ModeReport>,
    /// Every scored question, with the rank of each evidence turn in each mode.
    pub results: Vec<QuestionResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cross_validation: Option<crate::crossval::CrossValidation>,
}

/// One scored question: the 1-based rank of each of its evidence turns in each mode's top k
/// (`null` beyond it).
#[derive(Debug, Clone, Serialize)]
pub struct QuestionResult {
    pub conversation: String,
    pub question: String,
    pub category: u32,
    pub evidence: Vec<String>,
    pub ranks: BTreeMap<&'static str, Vec<Option<usize>>>,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1000.0
}

/// `question` as the eval asks it: in its conversation's user, at the conversation's end,
/// past the result cache.
fn asked(
    conversation: &Conversation,
    question: &Question,
    top_k: u32,
    mode: pb::SearchMode,
) -> pb::RecallRequest {
    pb::RecallRequest {
        scope: Some(pb::Scope {
            user_id: user(conversation),
            ..Default::default()
        }),
        query: question.question.clone(),
        top_k,
        mode: mode.into(),
        bypass_cache: true,
        request_time: Some(engram_domain::convert::timestamp(conversation.end)),
        ..Default::default()
    }
}

/// The LoCoMo turn a hit is (its `dia_id` metadata).
fn dia_id(hit: &pb::Hit) -> &str {
    hit.memory
        .as_ref()
        .and_then(|m| m.metadata.get("dia_id"))
        .map_or("", String::as_str)
}

/// Ask every scored question of `conversations` (already ingested) in every mode.
pub async fn evaluate(
    client: &mut crate::Client,
    conversations: &[Conversation],
    k: u32,
) -> Result<Report, Status> {
    let mut modes = Vec::new();
    let mut results: Vec<QuestionResult> = Vec::new();
    // Embed every question once first, so that each mode's latency has the same (cached)
    // query embedding cost rather than the first mode paying for all of them.
    for conversation in conversations {
        for question in &conversation.questions {
            client
                .recall(pb::RecallRequest {
                    scope: Some(pb::Scope {
                        user_id: user(conversation),
                        ..Default::default()
                    }),
                    query: question.question.clone(),
                    top_k: 1,
                    mode: pb::SearchMode::Semantic.into(),
                    bypass_cache: true,
                    ..Default::default()
                })
                .await?;
        }
    }
    // Category 5 and the few questions without evidence turns cannot be scored.
    let scored =
        |q: &&Question| !q.evidence.is_empty() && CATEGORIES.iter().any(|(c, _)| *c == q.category);
    for (mode_index, (mode, mode_name)) in MODES.into_iter().enumerate() {
        let mut overall = Tally::default();
        let mut question_index = 0;
        let mut by_category: BTreeMap<u32, Tally> = BTreeMap::new();
        let mut latencies = Vec::new();
        for conversation in conversations {
            for question in conversation.questions.iter().filter(scored) {
                let started = Instant::now();
                let response = client
                    .recall(asked(conversation, question, k, mode))
                    .await?
                    .into_inner();
                latencies.push(started.elapsed());
                let found: Vec<&str> = response.hits.iter().map(dia_id).collect();
                let ranks: Vec<Option<usize>> = question
                    .evidence
                    .iter()
                    .map(|e| found.iter().position(|f| f == e).map(|i| i + 1))
                    .collect();
                overall.add(&ranks);
                if mode_index == 0 {
                    results.push(QuestionResult {
                        conversation: conversation.name.clone(),
                        question: question.question.clone(),
                        category: question.category,
                        evidence: question.evidence.clone(),
                        ranks: BTreeMap::new(),
                    });
                }
                results[question_index]
                    .ranks
                    .insert(mode_name, ranks.clone());
                question_index += 1;
                by_category
                    .entry(question.category)
                    .or_default()
                    .add(&ranks);
            }
        }
        latencies.sort();
        modes.push(ModeReport {
            mode: mode_name,
            overall: overall.scores(),
            categories: CATEGORIES
                .iter()
                .map(|(c, name)| {
                    (
                        *name,
                        by_category.get(c).map(Tally::scores).unwrap_or_default(),
                    )
                })
                .collect(),
            latency: Latency {
                p50_ms: percentile(&latencies, 0.50),
                p95_ms: percentile(&latencies, 0.95),
                p99_ms: percentile(&latencies, 0.99),
            },
        });
    }
    Ok(Report {
        k,
        conversations: conversations.len(),
        turns: conversations.iter().map(|c| c.turns.len()).sum(),
        questions: modes.first().map_or(0, |m| m.overall.questions),
        modes,
        results,
        cross_validation: None,
    })
}

/// One candidate of a question, as HYBRID explains it.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub dia_id: String,
    pub dense_rank: u32,
    pub dense_score: f32,
    pub keyword_rank: u32,
    pub keyword_score: f32,
    pub temporal_rank: u32,
    pub temporal_score: f32,
    pub entity_rank: u32,
    pub entity_score: f32,
    pub score: f32,
}

/// A question and every candidate HYBRID found for it, for studying fusion offline.
#[derive(Debug, Clone, Serialize)]
pub struct Candidates {
    pub conversation: String,
    pub question: String,
    pub category: u32,
    pub evidence: Vec<String>,
    pub candidates: Vec<Candidate>,
}

/// Every question of `conversations` (category 5 too) asked in each mode with an explanation
/// and the largest `top_k`: the dense and keyword rankings whole (SEMANTIC, KEYWORD) and the
/// temporal and entity ranks of HYBRID's hits, merged by turn.
pub async fn candidates(
    client: &mut crate::Client,
    conversations: &[Conversation],
) -> Result<Vec<Candidates>, Status> {
    let mut out = Vec::new();
    for conversation in conversations {
        for question in &conversation.questions {
            let mut merged: BTreeMap<String, Candidate> = BTreeMap::new();
            for (mode, _) in MODES {
                let response = client
                    .recall(pb::RecallRequest {
                        explain: true,
                        ..asked(conversation, question, 100, mode)
                    })
                    .await?
                    .into_inner();
                for hit in response.hits {
                    let id = dia_id(&hit).to_string();
                    let e = hit.explanation.unwrap_or_default();
                    let c = merged.entry(id.clone()).or_insert(Candidate {
                        dia_id: id,
                        dense_rank: 0,
                        dense_score: 0.0,
                        keyword_rank: 0,
                        keyword_score: 0.0,
                        temporal_rank: 0,
                        temporal_score: 0.0,
                        entity_rank: 0,
                        entity_score: 0.0,
                        score: 0.0,
                    });
                    match mode {
                        pb::SearchMode::Semantic => {
                            (c.dense_rank, c.dense_score) = (e.dense_rank, e.dense_score)
                        }
                        pb::SearchMode::Keyword => {
                            (c.keyword_rank, c.keyword_score) = (e.keyword_rank, e.keyword_score)
                        }
                        _ => {
                            (c.temporal_rank, c.temporal_score) =
                                (e.temporal_rank, e.temporal_score);
                            (c.entity_rank, c.entity_score) = (e.entity_rank, e.entity_score);
                            c.score = hit.score;
                        }
                    }
                }
            }
            out.push(Candidates {
                conversation: conversation.name.clone(),
                question: question.question.clone(),
                category: question.category,
                evidence: question.evidence.clone(),
                candidates: merged.into_values().collect(),
            });
        }
    }
    Ok(out)
}

/// The report as a table.
pub fn table(report: &Report) -> String {
    let k = report.k;
    let mut out = format!(
        "LoCoMo: {} conversations, {} turns, {} questions (categories 1-4), k = {k}\n\n",
        report.conversations, report.turns, report.questions
    );
    out += &format!(
        "{:<9} {:<12} {:>5} {:>10} {:>14} {:>6}\n",
        "mode",
        "category",
        "n",
        format!("recall@{k}"),
        format!("all-recall@{k}"),
        "MRR"
    );
    for mode in &report.modes {
        let rows = mode
            .categories
            .iter()
            .map(|(name, s)| (*name, s))
            .chain(std::iter::once(("overall", &mode.overall)));
        for (name, s) in rows {
            out += &format!(
                "{:<9} {:<12} {:>5} {:>10.3} {:>14.3} {:>6.3}\n",
                mode.mode, name, s.questions, s.recall_any, s.recall_all, s.mrr
            );
        }
    }
    out += "\nRecall latency (client side, ms)\n";
    out += &format!("{:<9} {:>7} {:>7} {:>7}\n", "mode", "p50", "p95", "p99");
    for mode in &report.modes {
        out += &format!(
            "{:<9} {:>7.2} {:>7.2} {:>7.2}\n",
            mode.mode, mode.latency.p50_ms, mode.latency.p95_ms, mode.latency.p99_ms
        );
    }
    if let Some(cv) = &report.cross_validation {
        out += "\n";
        out += &crate::crossval::table(cv);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_scores_any_all_and_mrr() {
        let mut t = Tally::default();
        t.add(&[Some(3), None]);
        t.add(&[Some(1), Some(2)]);
        t.add(&[None]);
        let s = t.scores();
        assert_eq!(s.questions, 3);
        assert!((s.recall_any - 2.0 / 3.0).abs() < 1e-9);
        assert!((s.recall_all - 1.0 / 3.0).abs() < 1e-9);
        assert!((s.mrr - (1.0 / 3.0 + 1.0) / 3.0).abs() < 1e-9);
    }

    #[test]
    fn reads_the_shared_conversations() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/locomo");
        if !dir.exists() {
            eprintln!("skipped: {} is not on this machine", dir.display());
            return;
        }
        let conversations = read_dir(&dir).unwrap();
        assert_eq!(conversations.len(), 5);
        let c = &conversations[0];
        assert_eq!(c.turns[0].dia_id, "D1:1");
        assert!(
            c.questions
                .iter()
                .filter(|q| !q.evidence.is_empty())
                .count()
                > 100
        );
        assert!(c.turns.iter().all(|t| t.time <= c.end));
    }
}
