//! How the CLI prints responses: aligned text for people, JSON (`--json`) for scripts.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use engram_proto::prost_types::Timestamp;
use engram_proto::v1 as pb;
use serde::Serialize;
use serde_json::json;

#[derive(Serialize)]
struct MemoryView<'a> {
    id: &'a str,
    user_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    agent_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    session_id: &'a str,
    kind: &'static str,
    #[serde(skip_serializing_if = "str::is_empty")]
    role: &'a str,
    text: &'a str,
    metadata: &'a BTreeMap<String, String>,
    tags: &'a [String],
    entities: &'a [String],
    created_at: String,
    event_time: String,
    importance: f32,
}

fn time(t: Option<&Timestamp>) -> String {
    let Some(t) = t else {
        return String::new();
    };
    let since_epoch = Duration::new(t.seconds.unsigned_abs(), t.nanos.unsigned_abs());
    let when = if t.seconds >= 0 {
        UNIX_EPOCH + since_epoch
    } else {
        UNIX_EPOCH - since_epoch
    };
    humantime::format_rfc3339_seconds(when).to_string()
}

fn kind(value: i32) -> &'static str {
    match pb::Kind::try_from(value) {
        Ok(pb::Kind::Message) => "message",
        Ok(pb::Kind::Document) => "document",
        Ok(pb::Kind::Fact | pb::Kind::Unspecified) | Err(_) => "fact",
    }
}

fn view(m: &pb::Memory) -> MemoryView<'_> {
    let scope = m.scope.as_ref();
    MemoryView {
        id: &m.id,
        user_id: scope.map_or("", |s| s.user_id.as_str()),
        agent_id: scope.map_or("", |s| s.agent_id.as_str()),
        session_id: scope.map_or("", |s| s.session_id.as_str()),
        kind: kind(m.kind),
        role: &m.role,
        text: &m.text,
        metadata: &m.metadata,
        tags: &m.tags,
        entities: &m.entities,
        created_at: time(m.created_at.as_ref()),
        event_time: time(m.event_time.as_ref()),
        importance: m.importance,
    }
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

fn status_name(value: i32) -> &'static str {
    match pb::WriteStatus::try_from(value) {
        Ok(pb::WriteStatus::Created) => "created",
        Ok(pb::WriteStatus::Duplicate) => "duplicate",
        Ok(pb::WriteStatus::Rejected) => "rejected",
        Ok(pb::WriteStatus::Unspecified) | Err(_) => "unknown",
    }
}

fn one_line(text: &str, width: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= width {
        flat
    } else {
        let cut: String = flat.chars().take(width.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// A Remember response as `--json` prints it (and the MCP server answers).
pub fn remember_json(response: &pb::RememberResponse) -> serde_json::Value {
    let results: Vec<_> = response
        .results
        .iter()
        .map(|r| json!({"id": r.id, "status": status_name(r.status), "reason": r.reason}))
        .collect();
    json!({"results": results, "write_token": response.write_token})
}

pub fn remember(response: &pb::RememberResponse, texts: &[String], json_output: bool) {
    if json_output {
        print_json(&remember_json(response));
        return;
    }
    for (result, text) in response.results.iter().zip(texts) {
        let reason = if result.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", result.reason)
        };
        println!(
            "{:<9} {}  {}{reason}",
            status_name(result.status),
            result.id,
            one_line(text, 60)
        );
    }
}

/// A Recall response as `--json` prints it (and the MCP server answers).
pub fn recall_json(response: &pb::RecallResponse) -> serde_json::Value {
    let hits: Vec<_> = response
            .hits
            .iter()
            .map(|h| {
                let mut hit = json!({"score": h.score, "relevance": h.relevance, "memory": h.memory.as_ref().map(view)});
                if let Some(e) = &h.explanation {
                    hit["explanation"] = json!({
                        "dense_rank": e.dense_rank, "dense_score": e.dense_score,
                        "keyword_rank": e.keyword_rank, "keyword_score": e.keyword_score,
                        "temporal_rank": e.temporal_rank, "temporal_score": e.temporal_score,
                        "entity_rank": e.entity_rank, "entity_score": e.entity_score,
                        "fused_score": e.fused_score, "recency_factor": e.recency_factor,
                        "importance_factor": e.importance_factor,
                    });
                }
                hit
            })
            .collect();
    let timings = response.timings.unwrap_or_default();
    json!({
        "hits": hits,
        "cache_hit": response.cache_hit,
        "timings_us": {"cache": timings.cache_us, "embed": timings.embed_us,
                       "dense": timings.dense_us, "keyword": timings.keyword_us,
                       "fusion": timings.fusion_us, "total": timings.total_us},
    })
}

pub fn recall(response: &pb::RecallResponse, json_output: bool) {
    if json_output {
        print_json(&recall_json(response));
        return;
    }
    if response.hits.is_empty() {
        println!("no memories found");
        return;
    }
    for (rank, hit) in response.hits.iter().enumerate() {
        let Some(memory) = &hit.memory else { continue };
        println!(
            "{:>2}. {:.3}  {}",
            rank + 1,
            hit.score,
            one_line(&memory.text, 70)
        );
        if let Some(e) = &hit.explanation {
            let ranks: Vec<String> = [
                ("dense", e.dense_rank, e.dense_score),
                ("keyword", e.keyword_rank, e.keyword_score),
                ("temporal", e.temporal_rank, e.temporal_score),
                ("entity", e.entity_rank, e.entity_score),
            ]
            .iter()
            .filter(|(_, rank, _)| *rank > 0)
            .map(|(name, rank, score)| format!("{name} #{rank} ({score:.3})"))
            .collect();
            println!(
                "      {} · fused {:.3} · relevance {:.3} · recency ×{:.3} · importance ×{:.3}",
                ranks.join(" · "),
                e.fused_score,
                hit.relevance,
                e.recency_factor,
                e.importance_factor
            );
        }
    }
    if let Some(t) = response.timings {
        println!(
            "({} hits in {:.1} ms{})",
            response.hits.len(),
            t.total_us as f64 / 1000.0,
            if response.cache_hit {
                ", from the cache"
            } else {
                ""
            }
        );
    }
}

fn print_memories(memories: &[pb::Memory]) {
    for m in memories {
        let v = view(m);
        println!(
            "{}  {:<8} {}  {}",
            v.id,
            v.kind,
            v.event_time,
            one_line(v.text, 60)
        );
    }
}

/// A BuildContext response as `--json` prints it (and the MCP server answers).
pub fn context_json(response: &pb::BuildContextResponse) -> serde_json::Value {
    let memories: Vec<_> = response
        .memories
        .iter()
        .filter_map(|h| h.memory.as_ref())
        .map(view)
        .collect();
    let turns: Vec<_> = response.turns.iter().map(view).collect();
    json!({
        "context": response.context,
        "memories": memories,
        "turns": turns,
        "token_count": response.token_count,
        "tokenizer": response.tokenizer,
        "dropped": response.dropped,
    })
}

pub fn context(response: &pb::BuildContextResponse, json_output: bool) {
    if json_output {
        print_json(&context_json(response));
        return;
    }
    print!("{}", response.context);
    eprintln!(
        "({} tokens ({}), {} memories, {} turns, {} left out)",
        response.token_count,
        response.tokenizer,
        response.memories.len(),
        response.turns.len(),
        response.dropped
    );
}

/// One Converse event: the answer's text on stdout as it streams, the rest on stderr.
pub fn converse_event(event: &pb::ConverseEvent, json_output: bool) {
    use pb::converse_event::Event;
    use std::io::Write as _;
    let Some(event) = &event.event else {
        return;
    };
    if json_output {
        let line = match event {
            Event::Context(c) => json!({"context": {
                "memories": c.memories.iter().filter_map(|h| h.memory.as_ref()).map(view).collect::<Vec<_>>(),
                "turns": c.turns.iter().map(view).collect::<Vec<_>>(),
                "context_tokens": c.context_tokens,
                "redacted": c.redacted,
            }}),
            Event::Delta(d) => json!({"delta": d.text}),
            Event::Done(d) => {
                let usage = d.usage.unwrap_or_default();
                let timings = d.timings.unwrap_or_default();
                json!({"done": {
                    "model": d.model,
                    "finish_reason": d.finish_reason,
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                    "context_us": timings.context_us,
                    "first_token_us": timings.first_token_us,
                    "total_us": timings.total_us,
                }})
            }
            Event::Fallback(f) => json!({"fallback": {
                "code": f.code,
                "reason": f.reason,
                "partial": f.partial,
                "context": f.context,
            }}),
        };
        println!("{line}");
        return;
    }
    match event {
        Event::Context(c) => {
            eprintln!(
                "({} memories, {} turns, {} context tokens{})",
                c.memories.len(),
                c.turns.len(),
                c.context_tokens,
                if c.redacted.is_empty() {
                    String::new()
                } else {
                    format!("; redacted: {}", c.redacted.join(", "))
                }
            );
        }
        Event::Delta(d) => {
            print!("{}", d.text);
            let _ = std::io::stdout().flush();
        }
        Event::Done(d) => {
            println!();
            let usage = d.usage.unwrap_or_default();
            let timings = d.timings.unwrap_or_default();
            eprintln!(
                "({}: {} prompt + {} answer tokens; context in {:.1} ms, first token in {:.1} ms)",
                d.model,
                usage.prompt_tokens,
                usage.completion_tokens,
                timings.context_us as f64 / 1e3,
                timings.first_token_us as f64 / 1e3
            );
        }
        Event::Fallback(f) => {
            if f.partial {
                println!();
            }
            eprintln!("the model did not answer: {}", f.reason);
            if !f.context.is_empty() {
                eprintln!("context recalled:\n{}", f.context);
            }
        }
    }
}

pub fn get(response: &pb::GetResponse, json_output: bool) {
    if json_output {
        let memories: Vec<_> = response.memories.iter().map(view).collect();
        print_json(&json!({"memories": memories, "missing_ids": response.missing_ids}));
        return;
    }
    print_memories(&response.memories);
    for id in &response.missing_ids {
        println!("{id}  not found");
    }
}

/// A List page as `--json` prints it (and the MCP server answers).
pub fn list_json(response: &pb::ListResponse) -> serde_json::Value {
    let memories: Vec<_> = response.memories.iter().map(view).collect();
    json!({"memories": memories, "next_page_token": response.next_page_token})
}

pub fn list(response: &pb::ListResponse, json_output: bool) {
    if json_output {
        print_json(&list_json(response));
        return;
    }
    print_memories(&response.memories);
    if !response.next_page_token.is_empty() {
        println!("(more: --page-token {})", response.next_page_token);
    }
}

/// A Forget response as `--json` prints it (and the MCP server answers).
pub fn forget_json(response: &pb::ForgetResponse) -> serde_json::Value {
    let receipt = response.receipt.unwrap_or_default();
    json!({
        "forgotten": response.forgotten,
        "write_token": response.write_token,
        "receipt": {
            "memories": receipt.memories,
            "facts": receipt.facts,
            "cached_embeddings": receipt.cached_embeddings,
            "history_lists": receipt.history_lists,
            "log_keys": receipt.log_keys,
            "cached_results": receipt.cached_results,
        },
    })
}

pub fn forget(response: &pb::ForgetResponse, json_output: bool) {
    if json_output {
        print_json(&forget_json(response));
        return;
    }
    println!("forgot {} memories", response.forgotten);
}
