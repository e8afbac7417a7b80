//! The privacy guard of the write path: each written text and metadata value is scanned for
//! personal data and secrets, and redacted or refused as the tenant's privacy mode (tightened,
//! never loosened, by the request) says. Findings are counted by kind and action.

use std::collections::BTreeMap;

use engram_domain::Result;
use engram_domain::model::NewMemory;
use engram_domain::privacy::{self, PiiKind, PrivacyMode, PrivacyPolicy};
use engram_telemetry::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// Batches with more text than this are scanned off the runtime's turn.
const SCAN_IN_PLACE_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FindingLabels {
    kind: &'static str,
    action: &'static str,
}

/// The tenants' privacy modes and the count of what they found.
pub struct Guard {
    policy: PrivacyPolicy,
    /// Personal data found in writes, by kind and what was done.
    findings: Family<FindingLabels, Counter>,
}

impl Default for Guard {
    fn default() -> Self {
        Self::new(PrivacyPolicy::default())
    }
}

impl Guard {
    pub fn new(policy: PrivacyPolicy) -> Self {
        Self {
            policy,
            findings: Family::default(),
        }
    }

    /// Export the findings counter in `metrics`.
    pub fn register(&self, metrics: &Metrics) {
        metrics.register(
            "engram_privacy_findings",
            "Personal data and secrets found in writes, by kind and action (none, redacted, blocked)",
            self.findings.clone(),
        );
    }

    /// The mode for a write of `tenant` that asked for `requested`.
    pub fn mode(&self, tenant: &str, requested: Option<PrivacyMode>) -> PrivacyMode {
        self.policy.mode(tenant, requested)
    }

    /// Personal data found in a field, counted by kind and the mode's action.
    pub fn count(&self, kinds: &[PiiKind], mode: PrivacyMode) {
        let action = match mode {
            PrivacyMode::Off => "none",
            PrivacyMode::Redact => "redacted",
            PrivacyMode::Block => "blocked",
        };
        for kind in kinds {
            self.findings
                .get_or_create(&FindingLabels {
                    kind: kind.as_str(),
                    action,
                })
                .inc();
        }
    }

    /// Apply the mode to every memory of a batch (`memories[i]` in errors). A large batch is
    /// scanned without stalling the other tasks of the runtime thread it is on.
    pub fn batch(&self, mode: PrivacyMode, memories: &mut [NewMemory]) -> Result<()> {
        if mode == PrivacyMode::Off {
            return Ok(());
        }
        let bytes: usize = memories
            .iter()
            .map(|m| m.text.len() + m.metadata.values().map(String::len).sum::<usize>())
            .sum();
        let mut guard_all = || {
            memories
                .iter_mut()
                .enumerate()
                .try_for_each(|(i, memory)| self.memory(mode, &format!("memories[{i}]"), memory))
        };
        if bytes > SCAN_IN_PLACE_BYTES {
            cpu_bound(guard_all)
        } else {
            guard_all()
        }
    }

    /// Apply the mode to a memory's text and metadata values (`field` names it in errors, e.g.
    /// `memories[2]`).
    fn memory(&self, mode: PrivacyMode, field: &str, memory: &mut NewMemory) -> Result<()> {
        self.field(mode, &format!("{field}.text"), &mut memory.text)?;
        self.metadata(mode, field, &mut memory.metadata)
    }

    /// Apply the mode to each metadata value (`<field>.metadata[<key>]` in errors).
    pub fn metadata(
        &self,
        mode: PrivacyMode,
        field: &str,
        metadata: &mut BTreeMap<String, String>,
    ) -> Result<()> {
        for (key, value) in metadata.iter_mut() {
            self.field(mode, &format!("{field}.metadata[{key}]"), value)?;
        }
        Ok(())
    }

    /// Apply the mode to one field and count what it found, refused or not (a refused field is
    /// scanned again for its kinds: the refusal path only).
    pub fn field(&self, mode: PrivacyMode, field: &str, text: &mut String) -> Result<()> {
        match privacy::guard(mode, field, text) {
            Ok(kinds) => {
                self.count(&kinds, mode);
                Ok(())
            }
            Err(refused) => {
                self.count(&privacy::kinds(&privacy::scan(text)), mode);
                Err(refused)
            }
        }
    }

    #[cfg(test)]
    fn counted(&self, kind: PiiKind, action: &'static str) -> u64 {
        self.findings
            .get_or_create(&FindingLabels {
                kind: kind.as_str(),
                action,
            })
            .get()
    }
}

/// Run CPU-heavy `work` without stalling the tasks of the runtime thread it is on (a
/// multi-threaded runtime hands them to another thread); inline on a current-thread runtime.
fn cpu_bound<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(text: &str, metadata: &[(&str, &str)]) -> NewMemory {
        NewMemory {
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..NewMemory::text(text)
        }
    }

    #[test]
    fn redact_rewrites_text_and_metadata_and_counts_each_finding() {
        let guard = Guard::default();
        let mut batch = vec![
            memory("mail me at ana@example.com", &[]),
            memory("nothing here", &[("contact", "bob@example.org")]),
        ];
        guard.batch(PrivacyMode::Redact, &mut batch).unwrap();
        assert_eq!(batch[0].text, "mail me at [EMAIL]");
        assert_eq!(batch[1].metadata["contact"], "[EMAIL]");
        assert_eq!(guard.counted(PiiKind::Email, "redacted"), 2);
    }

    #[test]
    fn block_refuses_naming_the_field_and_still_counts() {
        let guard = Guard::default();
        let mut batch = vec![
            memory("fine", &[]),
            memory("fine", &[("card", "4111 1111 1111 1111")]),
        ];
        let refused = guard.batch(PrivacyMode::Block, &mut batch).unwrap_err();
        assert!(
            refused.to_string().contains("memories[1].metadata[card]"),
            "{refused}"
        );
        assert_eq!(guard.counted(PiiKind::Card, "blocked"), 1);
    }

    #[test]
    fn off_leaves_everything_and_a_large_batch_is_guarded_too() {
        let guard = Guard::default();
        let mut batch = vec![memory("ana@example.com", &[])];
        guard.batch(PrivacyMode::Off, &mut batch).unwrap();
        assert_eq!(batch[0].text, "ana@example.com");
        let filler = "word ".repeat(SCAN_IN_PLACE_BYTES / 5);
        let mut large = vec![memory(&format!("{filler} ana@example.com"), &[])];
        guard.batch(PrivacyMode::Redact, &mut large).unwrap();
        assert!(large[0].text.ends_with("[EMAIL]"));
    }
}
