//! De-duplication of a batch against the scope's stored memories and against itself.

use std::collections::HashMap;

use engram_domain::api::DuplicateMatch;
use engram_domain::model::{MemoryId, NewMemory};

/// How one input of a batch resolves before anything is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    New,
    /// Same as a stored memory.
    DuplicateOf(MemoryId, &'static str),
    /// Same as an earlier input of this batch (its index).
    DuplicateOfInput(usize, &'static str),
}

/// An idempotency key matches first, then content (for kinds de-duplicated by content): against
/// the stored `existing` matches, then against earlier inputs of the same batch.
pub fn resolve(
    memories: &[NewMemory],
    hashes: &[String],
    existing: &[DuplicateMatch],
) -> Vec<Resolution> {
    let stored_by_key: HashMap<&str, MemoryId> = existing
        .iter()
        .filter(|d| !d.idempotency_key.is_empty())
        .map(|d| (d.idempotency_key.as_str(), d.id))
        .collect();
    let stored_by_hash: HashMap<&str, MemoryId> = existing
        .iter()
        .map(|d| (d.content_hash.as_str(), d.id))
        .collect();
    let mut batch_keys: HashMap<&str, usize> = HashMap::new();
    let mut batch_hashes: HashMap<&str, usize> = HashMap::new();
    memories
        .iter()
        .zip(hashes)
        .enumerate()
        .map(|(i, (memory, hash))| {
            let key =
                (!memory.idempotency_key.is_empty()).then_some(memory.idempotency_key.as_str());
            let hash = memory.dedup_by_content().then_some(hash.as_str());
            if let Some(id) = key.and_then(|k| stored_by_key.get(k)) {
                return Resolution::DuplicateOf(*id, "same idempotency key");
            }
            if let Some(first) = key.and_then(|k| batch_keys.get(k)) {
                return Resolution::DuplicateOfInput(*first, "same idempotency key");
            }
            if let Some(id) = hash.and_then(|h| stored_by_hash.get(h)) {
                return Resolution::DuplicateOf(*id, "same content already stored in this scope");
            }
            if let Some(first) = hash.and_then(|h| batch_hashes.get(h)) {
                return Resolution::DuplicateOfInput(*first, "same content earlier in this batch");
            }
            if let Some(k) = key {
                batch_keys.insert(k, i);
            }
            if let Some(h) = hash {
                batch_hashes.insert(h, i);
            }
            Resolution::New
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use engram_domain::model::{Kind, content_hash};

    fn input(text: &str, kind: Kind, key: &str) -> NewMemory {
        NewMemory {
            kind,
            idempotency_key: key.to_string(),
            ..NewMemory::text(text)
        }
    }

    fn hashes(memories: &[NewMemory]) -> Vec<String> {
        memories
            .iter()
            .map(|m| content_hash(m.kind, &m.role, &m.text))
            .collect()
    }

    #[test]
    fn facts_dedup_by_content_messages_only_by_key() {
        let stored = MemoryId::new_time_ordered();
        let memories = vec![
            input("likes tea", Kind::Fact, ""),
            input("likes tea", Kind::Fact, ""),
            input("thanks!", Kind::Message, ""),
            input("thanks!", Kind::Message, ""),
            input("hello", Kind::Message, "k1"),
            input("hello again", Kind::Message, "k1"),
            input("known fact", Kind::Fact, ""),
        ];
        let hashes = hashes(&memories);
        let existing = vec![DuplicateMatch {
            id: stored,
            content_hash: hashes[6].clone(),
            idempotency_key: String::new(),
        }];
        let resolutions = resolve(&memories, &hashes, &existing);
        assert_eq!(resolutions[0], Resolution::New);
        assert!(matches!(resolutions[1], Resolution::DuplicateOfInput(0, _)));
        assert_eq!(resolutions[2], Resolution::New);
        assert_eq!(resolutions[3], Resolution::New);
        assert_eq!(resolutions[4], Resolution::New);
        assert!(matches!(resolutions[5], Resolution::DuplicateOfInput(4, _)));
        assert!(matches!(resolutions[6], Resolution::DuplicateOf(id, _) if id == stored));
    }

    #[test]
    fn a_retried_key_is_a_duplicate_even_with_new_content() {
        let stored = MemoryId::new_time_ordered();
        let memories = vec![input("rephrased", Kind::Fact, "req-7")];
        let existing = vec![DuplicateMatch {
            id: stored,
            content_hash: "something else".into(),
            idempotency_key: "req-7".into(),
        }];
        let resolutions = resolve(&memories, &hashes(&memories), &existing);
        assert!(matches!(resolutions[0], Resolution::DuplicateOf(id, _) if id == stored));
    }
}
