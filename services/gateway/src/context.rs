//! Context for a prompt: recall ∥ the session's recent turns, packed into a token budget.
//!
//! The layout is stable, so a client can rely on it (and a model's prompt cache can too):
//!
//! ```text
//! ## Relevant memories
//! - [2024-05-01] The user moved to Lisbon.        most relevant first
//! - [2024-05-03] user: I adopted a dog named Miso.
//!
//! ## Recent conversation
//! user: What should I pack?                        oldest first
//! assistant: Light clothes; Lisbon is warm in May.
//! ```
//!
//! Memories are recalled from the whole scope of the user (and of the agent, if one is given),
//! across sessions; the session selects the recent turns. A section without entries is left
//! out; a line's newlines become spaces. Packing:
//!
//! 1. recalled memories that are also recent turns are shown once, as turns;
//! 2. turns take at most half the budget, newest first (older turns are dropped first);
//! 3. memories take the rest, in ranking order (best score first), stopping at the first that
//!    does not fit — so what is kept is always the best ranked;
//! 4. the assembled text is counted whole with the model family's tokenizer and, should
//!    tokens merge differently across lines, the least relevant memory (then the oldest turn)
//!    is dropped until it fits. `token_count` is that exact count, never above the budget.

use std::sync::Arc;
use std::time::{Duration, Instant};

use engram_cache::History;
use engram_domain::Result;
use engram_domain::api::{ContextRequest, Hit, Index, RecallQuery};
use engram_domain::model::{Kind, Memory, MemoryId, Scope, TenantId};
use engram_models::TokenCounter;

const MEMORIES_HEADER: &str = "## Relevant memories\n";
const TURNS_HEADER: &str = "## Recent conversation\n";
const SECTION_BREAK: &str = "\n";

/// What a context is built from.
pub struct ContextBuilder {
    pub index: Arc<dyn Index>,
    pub history: History,
    pub tokens: TokenCounter,
    /// Recalled memories below this relevance are left out.
    pub min_relevance: f32,
}

/// The default relevance floor of a context: none. Measured on the shared LoCoMo
/// conversations (`engram eval locomo --folds 5`, BENCHMARKS.md), the floor that keeps 95 % of
/// the evidence turns (0.31) leaves not one question about something never said without
/// memories (their top hits are as relevant as real evidence), and it would drop paraphrased
/// answers such as the README's cat (relevance 0.01): it costs recall and buys nothing, so it
/// is for deployments that calibrate it on their own data.
pub const MIN_RELEVANCE: f32 = 0.0;

/// Recall and history, before packing.
pub struct Gathered {
    pub hits: Vec<Hit>,
    pub turns: Vec<Memory>,
    pub recall: Duration,
    pub history: Duration,
}

/// A packed context.
#[derive(Debug, Clone, Default)]
pub struct Packed {
    pub hits: Vec<Hit>,
    pub turns: Vec<Memory>,
    memory_lines: Vec<String>,
    pub text: String,
    pub token_count: usize,
    pub dropped: u32,
}

impl Packed {
    /// The memories section alone (for a system prompt).
    pub fn memories_text(&self) -> String {
        section(MEMORIES_HEADER, &self.memory_lines)
    }
}

fn one_line(text: &str) -> String {
    text.split(['\r', '\n'])
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn memory_line(memory: &Memory) -> String {
    let speaker = if memory.kind == Kind::Message && !memory.role.is_empty() {
        format!("{}: ", memory.role)
    } else {
        String::new()
    };
    format!(
        "- [{}] {speaker}{}\n",
        memory.event_time.date_string(),
        one_line(&memory.text)
    )
}

fn turn_line(turn: &Memory) -> String {
    let role = if turn.role.is_empty() {
        "user"
    } else {
        &turn.role
    };
    format!("{role}: {}\n", one_line(&turn.text))
}

fn section(header: &str, lines: &[String]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let mut text = header.to_string();
    for line in lines {
        text.push_str(line);
    }
    text
}

fn assemble(memory_lines: &[String], turn_lines: &[String]) -> String {
    let memories = section(MEMORIES_HEADER, memory_lines);
    let turns = section(TURNS_HEADER, turn_lines);
    match (memories.is_empty(), turns.is_empty()) {
        (false, false) => format!("{memories}{SECTION_BREAK}{turns}"),
        _ => format!("{memories}{turns}"),
    }
}

/// Pack `hits` (most relevant first) and `turns` (oldest first) into `budget` tokens.
pub fn pack(tokens: TokenCounter, hits: Vec<Hit>, turns: Vec<Memory>, budget: usize) -> Packed {
    let turn_ids: std::collections::HashSet<MemoryId> = turns.iter().map(|t| t.id).collect();
    let hits: Vec<Hit> = hits
        .into_iter()
        .filter(|h| !turn_ids.contains(&h.memory.id))
        .collect();
    let offered = hits.len() + turns.len();

    // Turns, newest first, within half the budget.
    let turn_budget = budget / 2;
    let mut used = 0;
    let mut kept_turns: Vec<(Memory, String)> = Vec::new();
    for turn in turns.into_iter().rev() {
        let line = turn_line(&turn);
        let header = if kept_turns.is_empty() {
            tokens.count(TURNS_HEADER)
        } else {
            0
        };
        let cost = tokens.count(&line) + header;
        if used + cost > turn_budget {
            break;
        }
        used += cost;
        kept_turns.push((turn, line));
    }
    kept_turns.reverse();

    // Memories, most relevant first, until one does not fit.
    let break_cost = tokens.count(SECTION_BREAK);
    let mut kept_hits: Vec<(Hit, String)> = Vec::new();
    for hit in hits {
        let line = memory_line(&hit.memory);
        let header = if kept_hits.is_empty() {
            tokens.count(MEMORIES_HEADER) + if kept_turns.is_empty() { 0 } else { break_cost }
        } else {
            0
        };
        let cost = tokens.count(&line) + header;
        if used + cost > budget {
            break;
        }
        used += cost;
        kept_hits.push((hit, line));
    }

    // Exact count of the whole; trim if tokens merged differently across lines.
    loop {
        let memory_lines: Vec<String> = kept_hits.iter().map(|(_, l)| l.clone()).collect();
        let turn_lines: Vec<String> = kept_turns.iter().map(|(_, l)| l.clone()).collect();
        let text = assemble(&memory_lines, &turn_lines);
        let token_count = tokens.count(&text);
        if token_count <= budget || (kept_hits.is_empty() && kept_turns.is_empty()) {
            let kept = kept_hits.len() + kept_turns.len();
            return Packed {
                hits: kept_hits.into_iter().map(|(h, _)| h).collect(),
                turns: kept_turns.into_iter().map(|(t, _)| t).collect(),
                memory_lines,
                text,
                token_count,
                dropped: (offered - kept) as u32,
            };
        }
        if kept_hits.pop().is_none() {
            kept_turns.remove(0);
        }
    }
}

impl ContextBuilder {
    /// Recall ∥ recent turns.
    pub async fn gather(&self, tenant: &TenantId, request: &ContextRequest) -> Result<Gathered> {
        let recall = async {
            let started = Instant::now();
            // Long-term memory is the user's (and the agent's, if given), across sessions;
            // the session only selects the history.
            let scope = Scope {
                session_id: String::new(),
                ..request.scope.clone()
            };
            let mut query = RecallQuery::new(scope, request.query.clone(), request.max_memories);
            query.request_time = request.request_time;
            query.min_score = (self.min_relevance > 0.0).then_some(self.min_relevance);
            let result = self.index.search(tenant, query).await;
            (result, started.elapsed())
        };
        let history = async {
            let started = Instant::now();
            let turns = self
                .turns(tenant, &request.scope, request.max_turns as usize)
                .await;
            (turns, started.elapsed())
        };
        let ((recalled, recall), (turns, history)) = tokio::join!(recall, history);
        Ok(Gathered {
            hits: recalled?.hits,
            turns: turns?,
            recall,
            history,
        })
    }

    /// The last `n` turns of the scope's session, oldest first: from the Redis list, or
    /// rebuilt from the index (and cached) when it is missing.
    pub async fn turns(&self, tenant: &TenantId, scope: &Scope, n: usize) -> Result<Vec<Memory>> {
        if n == 0 || scope.session_id.is_empty() {
            return Ok(Vec::new());
        }
        let of_agent = |turns: Vec<Memory>| -> Vec<Memory> {
            let mut turns: Vec<Memory> = turns
                .into_iter()
                .filter(|t| scope.agent_id.is_empty() || t.scope.agent_id == scope.agent_id)
                .collect();
            if turns.len() > n {
                turns.drain(..turns.len() - n);
            }
            turns
        };
        let wanted = if scope.agent_id.is_empty() {
            n
        } else {
            engram_cache::history::MAX_TURNS
        };
        if let Some(turns) = self.history.recent(tenant, scope, wanted).await {
            return Ok(of_agent(turns));
        }
        let session = engram_runtime::session::session_of(scope);
        // Read before the index: a Forget between the two keeps these turns out of the cache.
        let epoch = self.history.epoch(tenant, &scope.user_id).await;
        let turns = engram_runtime::session::turns_before(
            &*self.index,
            tenant,
            &session,
            None,
            engram_cache::history::MAX_TURNS,
        )
        .await?;
        if let Some(epoch) = epoch {
            self.history.fill(tenant, &session, &turns, &epoch).await;
        }
        Ok(of_agent(turns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engram_domain::model::Timestamp;
    use engram_models::TokenizerKind;

    fn memory(text: &str, kind: Kind, role: &str) -> Memory {
        let mut m = Memory::from_input(
            MemoryId::new_time_ordered(),
            TenantId::default_tenant(),
            Scope::user("u"),
            engram_domain::model::NewMemory {
                text: text.into(),
                kind,
                role: role.into(),
                ..Default::default()
            },
            Timestamp::from_micros(1_714_521_600_000_000),
        );
        m.scope.session_id = "s".into();
        m
    }

    fn hit(text: &str) -> Hit {
        Hit {
            memory: memory(text, Kind::Fact, ""),
            score: 1.0,
            relevance: 1.0,
            explanation: None,
        }
    }

    #[test]
    fn the_layout_is_stable_and_budgets_keep_the_most_relevant()
    -> Result<(), engram_models::ModelError> {
        let tokens = TokenCounter::new(TokenizerKind::O200kBase, "")?;
        let hits = vec![
            hit("The user moved to Lisbon."),
            hit("The user has a dog named Miso."),
            hit("The user likes jazz."),
        ];
        let turns = vec![
            memory("What should I pack?", Kind::Message, "user"),
            memory("Light clothes.", Kind::Message, "assistant"),
        ];
        let packed = pack(tokens, hits.clone(), turns.clone(), 1000);
        assert_eq!(
            packed.text,
            "## Relevant memories\n- [2024-05-01] The user moved to Lisbon.\n- [2024-05-01] The user has a dog named Miso.\n- [2024-05-01] The user likes jazz.\n\n## Recent conversation\nuser: What should I pack?\nassistant: Light clothes.\n"
        );
        assert_eq!(packed.token_count, tokens.count(&packed.text));
        assert_eq!(packed.dropped, 0);

        for budget in 0..packed.token_count {
            let cut = pack(tokens, hits.clone(), turns.clone(), budget);
            assert!(cut.token_count <= budget, "{budget}: {}", cut.token_count);
            assert_eq!(cut.token_count, tokens.count(&cut.text));
            // Whatever is kept is a prefix of the ranking.
            for (kept, offered) in cut.hits.iter().zip(&hits) {
                assert_eq!(kept.memory.id, offered.memory.id);
            }
            assert_eq!(cut.dropped as usize, 5 - cut.hits.len() - cut.turns.len());
        }
        Ok(())
    }

    #[test]
    fn a_recalled_turn_is_shown_once() -> Result<(), engram_models::ModelError> {
        let tokens = TokenCounter::new(TokenizerKind::O200kBase, "")?;
        let turn = memory("I adopted a dog.", Kind::Message, "user");
        let hits = vec![Hit {
            memory: turn.clone(),
            score: 1.0,
            relevance: 1.0,
            explanation: None,
        }];
        let packed = pack(tokens, hits, vec![turn], 1000);
        assert!(packed.hits.is_empty());
        assert_eq!(
            packed.text,
            "## Recent conversation\nuser: I adopted a dog.\n"
        );
        Ok(())
    }
}
