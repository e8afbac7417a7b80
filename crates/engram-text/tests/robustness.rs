//! Arbitrary text through every analysis of this crate: the privacy scanner and redaction,
//! the entity extractor, the query time expressions and the date parsers. A result, never a
//! panic; findings inside the text, in order, without overlaps. The number of cases is bounded
//! for `scripts/test` (`PROPTEST_CASES` raises it).

use engram_text::calendar::{Timestamp, parse_date, parse_datetime};
use engram_text::privacy::{redact, scan};
use engram_text::{entities, temporal};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(512),
        ..ProptestConfig::default()
    }
}

/// Text from the characters the analyses look at (digits, separators, letters, '@', ':'),
/// with some of anything else, so the patterns are reached often.
fn text() -> impl Strategy<Value = String> {
    let shaped = proptest::string::string_regex(
        "([0-9]{1,5}|[a-zA-Z]{1,8}|[ .:@/+()_-]|last|next|week|ago|May|Monday|sk-|AKIA|\n){0,40}",
    )
    .unwrap_or_else(|e| panic!("a valid pattern: {e}"));
    prop_oneof![shaped, any::<String>()]
}

fn check(text: &str) {
    let findings = scan(text);
    for f in &findings {
        assert!(f.start < f.end && f.end <= text.len(), "{f:?} in {text:?}");
        assert!(text.is_char_boundary(f.start) && text.is_char_boundary(f.end));
    }
    assert!(
        findings.windows(2).all(|w| w[0].end <= w[1].start),
        "{findings:?}"
    );
    let _ = redact(text, &findings);
    let _ = entities::extract(text);
    let now = Timestamp::from_micros(1_780_000_000_000_000);
    let _ = temporal::window(text, now);
    let _ = parse_date(text);
    let _ = parse_datetime(text);
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_text_never_panics_an_analysis(text in text()) {
        check(&text);
    }
}
