//! LLM fact extraction (`extract=true` on Remember), off the acknowledgement path.
//!
//! Each new memory of such a write becomes an entry of the extraction log (`engram:extract:*`,
//! partitioned like the write log and worked by the same workers' code, so an entry retries
//! with backoff and goes to the dead-letter stream after `ENGRAM_LOG_MAX_DELIVERIES` failures —
//! without ever holding up the write log). An entry is worked in four steps:
//!
//! 1. the chat model is asked for a JSON object `{"facts": ["...", ...]}` (temperature 0);
//! 2. the answer is validated: an object with a `facts` array of at most [`MAX_FACTS`]
//!    non-empty strings within the text limit — anything else is a failure to retry;
//! 3. each fact is redacted as the tenant's privacy mode says (a fact with personal data is
//!    dropped under `block`), de-duplicated against the facts of the user's scope already
//!    stored (cosine similarity ≥ [`DUPLICATE_SIMILARITY`]) and against the others of the batch;
//! 4. the rest are stored as FACT memories in the source's scope, with metadata `source_id`
//!    (the memory they came from) and `extracted_by` (the model). Their idempotency keys derive
//!    from the source and the fact, so a retried entry does not store a fact twice.

use std::collections::BTreeMap;

use engram_domain::api::{Derivation, RecallQuery, RememberBatch, WriteStatus};
use engram_domain::model::{
    Filter, Kind, Memory, MemoryId, NewMemory, Scope, SearchMode, TenantId, WriteMode,
};
use engram_domain::{Error, Result, privacy};
use engram_models::{ChatMessage, ChatRequest};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::Pipeline;

/// The metadata key of an extracted fact that names the message it came from.
pub(crate) const SOURCE_ID: &str = "source_id";

/// Facts one memory may yield at most.
pub const MAX_FACTS: usize = 20;
/// A fact this similar to a stored fact of the scope is a duplicate of it.
pub const DUPLICATE_SIMILARITY: f32 = 0.92;

const SYSTEM_PROMPT: &str = "You extract durable facts from a conversation turn or a passage so that an assistant can remember them later. \
Answer with a JSON object of the form {\"facts\": [\"...\"]}. Each fact is one short, self-contained sentence in the third person \
that names who it is about (for a user's message, \"The user ...\"), states one thing, and stays true outside the conversation. \
Leave out greetings, questions, opinions about the conversation itself and anything not stated in the text. \
If there is nothing worth remembering, answer {\"facts\": []}.";

#[derive(Deserialize)]
struct Facts {
    facts: Vec<serde_json::Value>,
}

/// Validate the model's answer: the facts, trimmed, or why the answer is unusable.
pub fn parse_facts(
    answer: &str,
    max_text_bytes: usize,
) -> std::result::Result<Vec<String>, String> {
    // Some models wrap JSON in a Markdown fence even when asked not to.
    let trimmed = answer.trim();
    let json = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|rest| rest.strip_suffix("```"))
        .unwrap_or(trimmed);
    let parsed: Facts = serde_json::from_str(json).map_err(|e| {
        format!(
            "not a JSON object with a `facts` array ({e}): {}",
            json.chars().take(200).collect::<String>()
        )
    })?;
    if parsed.facts.len() > MAX_FACTS {
        return Err(format!(
            "{} facts, more than the {MAX_FACTS} allowed",
            parsed.facts.len()
        ));
    }
    parsed
        .facts
        .into_iter()
        .enumerate()
        .map(|(i, fact)| match fact {
            serde_json::Value::String(text) => {
                let text = text.trim().to_string();
                if text.is_empty() {
                    Err(format!("facts[{i}] is empty"))
                } else if text.len() > max_text_bytes {
                    Err(format!("facts[{i}] is over {max_text_bytes} bytes"))
                } else {
                    Ok(text)
                }
            }
            other => Err(format!("facts[{i}] is not a string: {other}")),
        })
        .collect()
}

fn fact_key(source: MemoryId, fact: &str) -> String {
    let digest = Sha256::digest(fact.to_lowercase().as_bytes());
    format!("extract:{source}:{}", hex::encode(&digest[..8]))
}

impl Pipeline {
    /// Extract the facts of `source` and store the new ones; how many were stored.
    pub(crate) async fn extract_facts(&self, tenant: &TenantId, source: &Memory) -> Result<u64> {
        let Some(chat) = &self.chat else {
            return Err(Error::FailedPrecondition(
                "fact extraction needs a chat model: set ENGRAM_CHAT_BASE_URL on the ingestion service".into(),
            ));
        };
        // A source forgotten (or changed) before its turn came is not sent to the model.
        if !self.may_stand(tenant, source).await? {
            tracing::debug!(source = %source.id, "extraction skipped: its memory is gone or changed");
            return Ok(0);
        }
        let speaker = if source.role.is_empty() {
            String::new()
        } else {
            format!("{}: ", source.role)
        };
        let request = ChatRequest {
            messages: vec![
                ChatMessage::new("system", SYSTEM_PROMPT),
                ChatMessage::new(
                    "user",
                    format!(
                        "Date: {}\n{speaker}{}",
                        source.event_time.date_string(),
                        source.text
                    ),
                ),
            ],
            max_tokens: Some(1024),
            json: true,
            temperature: Some(0.0),
        };
        let answer = chat.complete(&request).await.map_err(Error::from)?;
        let facts = parse_facts(&answer.text, self.limits.max_text_bytes).map_err(|why| {
            Error::Internal(format!("the chat model's facts are unusable: {why}"))
        })?;

        let mode = self.guard.mode(tenant.as_str(), None);
        let mut seen = std::collections::HashSet::new();
        let mut kept = Vec::new();
        for mut fact in facts {
            match privacy::guard(mode, "fact", &mut fact) {
                Ok(kinds) => self.guard.count(&kinds, mode),
                // `block`: a fact with personal data is not stored.
                Err(_) => continue,
            }
            if seen.insert(fact.to_lowercase()) {
                kept.push(fact);
            }
        }
        if kept.is_empty() {
            return Ok(0);
        }
        // Facts already stored from this source (a retried entry), by idempotency key.
        let keys: Vec<String> = kept.iter().map(|f| fact_key(source.id, f)).collect();
        let stored = self
            .index
            .find_duplicates(tenant, &source.scope, Vec::new(), keys.clone())
            .await?;
        let user_scope = Scope {
            user_id: source.scope.user_id.clone(),
            agent_id: source.scope.agent_id.clone(),
            session_id: String::new(),
        };
        let mut inputs = Vec::new();
        for (fact, key) in kept.into_iter().zip(keys) {
            if stored.iter().any(|d| d.idempotency_key == key) {
                continue;
            }
            if self.similar_fact_stored(tenant, &user_scope, &fact).await? {
                continue;
            }
            let metadata = BTreeMap::from([
                (SOURCE_ID.to_string(), source.id.to_string()),
                ("extracted_by".to_string(), chat.model().to_string()),
            ]);
            inputs.push(NewMemory {
                text: fact,
                kind: Kind::Fact,
                role: String::new(),
                metadata,
                tags: source.tags.clone(),
                event_time: Some(source.event_time),
                importance: None,
                idempotency_key: key,
            });
        }
        self.store_facts(tenant, source, inputs).await
    }

    /// Store facts extracted from `source` through its user's partition of the write log,
    /// behind the source's own write and any Update or Forget of it logged before them: the
    /// worker that applies them stores them only if the source still stands as it was read
    /// (see [`Derivation`]), so facts of a forgotten or changed memory are never stored. (The
    /// source may not be indexed yet here, so it is not checked before that.)
    async fn store_facts(
        &self,
        tenant: &TenantId,
        source: &Memory,
        facts: Vec<NewMemory>,
    ) -> Result<u64> {
        let Some(logs) = &self.logs else {
            return Err(Error::FailedPrecondition(
                "fact extraction needs the write log".into(),
            ));
        };
        if facts.is_empty() {
            return Ok(0);
        }
        let derived_from = Derivation {
            source: source.id,
            source_hash: source.content_hash.clone(),
        };
        let batch = RememberBatch {
            scope: source.scope.clone(),
            memories: facts,
            mode: WriteMode::Async,
            extract: false,
            privacy: None,
        };
        let resolved = self.resolve(tenant, batch, Some(derived_from)).await?;
        let outcome = self.remember_logged(logs, resolved).await?;
        Ok(outcome
            .results
            .iter()
            .filter(|r| r.status == WriteStatus::Created)
            .count() as u64)
    }

    /// Whether `source` may still stand as it was read: stored unchanged, or its write still in
    /// the log (not indexed yet). When the log cannot say, it may.
    async fn may_stand(&self, tenant: &TenantId, source: &Memory) -> Result<bool> {
        let derived = Derivation {
            source: source.id,
            source_hash: source.content_hash.clone(),
        };
        if self.stands(tenant, &derived).await? {
            return Ok(true);
        }
        let Some(logs) = &self.logs else {
            return Ok(false);
        };
        Ok(logs
            .write
            .pending(tenant, &[source.id])
            .await
            .map_or(true, |found| found.first().is_some_and(Option::is_some)))
    }

    /// Whether the source of a derived write is still stored as it was read (not forgotten,
    /// its text unchanged).
    pub(crate) async fn stands(&self, tenant: &TenantId, derived: &Derivation) -> Result<bool> {
        match self.stored(tenant, derived.source).await {
            Ok(now) => Ok(now.content_hash == derived.source_hash),
            Err(Error::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether a fact of the scope says (nearly) the same already.
    async fn similar_fact_stored(
        &self,
        tenant: &TenantId,
        scope: &Scope,
        fact: &str,
    ) -> Result<bool> {
        // A few, since importance reorders them: the closest by cosine may not come first.
        let mut query = RecallQuery::new(scope.clone(), fact, 5);
        query.mode = SearchMode::Semantic;
        query.filter = Filter {
            kinds: vec![Kind::Fact],
            ..Filter::default()
        };
        // The cosine itself (min_score would cut by relevance).
        query.explain = true;
        query.bypass_cache = true;
        let found = self.index.search(tenant, query).await?;
        Ok(found.hits.iter().any(|hit| {
            hit.explanation
                .is_some_and(|e| e.dense_score >= DUPLICATE_SIMILARITY)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_validated() {
        assert_eq!(
            parse_facts(
                r#"{"facts": [" The user lives in Lisbon. ", "The user has a dog."]}"#,
                100
            ),
            Ok(vec![
                "The user lives in Lisbon.".to_string(),
                "The user has a dog.".to_string()
            ])
        );
        assert_eq!(
            parse_facts("```json\n{\"facts\": []}\n```", 100),
            Ok(vec![])
        );
        for bad in [
            "The user lives in Lisbon.",
            r#"{"facts": "Lisbon"}"#,
            r#"{"facts": [1]}"#,
            r#"{"facts": [""]}"#,
            r#"{"facts": ["a very long fact indeed"]}"#,
            r#"{"other": []}"#,
        ] {
            assert!(parse_facts(bad, 10).is_err(), "{bad}");
        }
    }
}
