//! A fast rule-based entity extractor: what a memory is about, for filtering and for the
//! entity strategy of a Recall.
//!
//! It finds emails, URLs, `@handles`, `#tags`, numbers with units ("5 km", "$20", "10%") and
//! proper names (runs of capitalised words that are not common sentence-starting words — a
//! rule, so an unusual imperative opening a sentence can pass for a name — with a possessive
//! `'s` dropped: "Caroline's" gives `Caroline`, "New York City" one entity).
//! Emails, URLs, handles and tags are lower-cased; names keep their case. The same extractor
//! runs on memories at ingestion and on queries at Recall, so a query naming "Caroline" finds
//! memories about Caroline. One pass over the text, no regular expressions; at most
//! [`MAX_ENTITIES`] per text, in order of first appearance.

/// Entities kept per text.
pub const MAX_ENTITIES: usize = 32;
/// Longer candidates (a pasted blob) are not entities.
const MAX_ENTITY_BYTES: usize = 100;

/// Capitalised words that start sentences or questions rather than name things.
const COMMON: &[&str] = &[
    "a",
    "about",
    "after",
    "also",
    "am",
    "an",
    "and",
    "any",
    "anyway",
    "are",
    "as",
    "at",
    "awesome",
    "be",
    "because",
    "been",
    "before",
    "being",
    "both",
    "but",
    "by",
    "can",
    "cool",
    "could",
    "dear",
    "did",
    "do",
    "does",
    "done",
    "during",
    "each",
    "even",
    "ever",
    "every",
    "for",
    "from",
    "glad",
    "good",
    "great",
    "had",
    "has",
    "have",
    "having",
    "he",
    "hello",
    "her",
    "here",
    "hers",
    "hey",
    "hi",
    "him",
    "his",
    "how",
    "however",
    "i",
    "i'd",
    "i'll",
    "i'm",
    "i've",
    "if",
    "in",
    "into",
    "is",
    "it",
    "it's",
    "its",
    "just",
    "let",
    "let's",
    "like",
    "lol",
    "maybe",
    "me",
    "mine",
    "more",
    "most",
    "much",
    "my",
    "nice",
    "no",
    "nope",
    "not",
    "now",
    "of",
    "off",
    "oh",
    "ok",
    "okay",
    "on",
    "once",
    "one",
    "only",
    "or",
    "our",
    "ours",
    "please",
    "really",
    "right",
    "she",
    "should",
    "so",
    "some",
    "sorry",
    "still",
    "such",
    "sure",
    "thank",
    "thanks",
    "that",
    "that's",
    "the",
    "their",
    "them",
    "then",
    "there",
    "there's",
    "these",
    "they",
    "this",
    "those",
    "though",
    "to",
    "too",
    "totally",
    "very",
    "was",
    "we",
    "we're",
    "well",
    "were",
    "what",
    "what's",
    "when",
    "where",
    "which",
    "while",
    "who",
    "why",
    "will",
    "with",
    "wow",
    "would",
    "yeah",
    "yes",
    "yet",
    "you",
    "you're",
    "your",
    "yours",
    "yup",
    "today",
    "tomorrow",
    "yesterday",
    "tonight",
    "last",
    "next",
    "btw",
    "omg",
    "haha",
    "congrats",
    "congratulations",
    "absolutely",
    "definitely",
    "exactly",
    "honestly",
    "actually",
    "anyways",
    "besides",
    "speaking",
    "since",
    "until",
    "although",
    "whether",
    "lastly",
    "finally",
    "first",
    "second",
    "hmm",
    "wait",
    "look",
    "please",
    "remember",
    "write",
    "call",
    "check",
    "make",
    "take",
    "see",
    "go",
    "get",
    "try",
    "tell",
    "keep",
    "give",
    "find",
    "think",
    "love",
    "hope",
    "wish",
    "guess",
    "went",
    "got",
    "made",
    "said",
    "know",
    "want",
    "need",
    "sounds",
    "agreed",
    "agree",
    "happy",
    "same",
    "true",
    "interesting",
];

/// Units that make a number an entity when they follow it.
const UNITS: &[&str] = &[
    "%", "km", "m", "cm", "mm", "mi", "miles", "mile", "kg", "g", "lb", "lbs", "kb", "mb", "gb",
    "tb", "ms", "s", "sec", "min", "mins", "minutes", "h", "hr", "hrs", "hours", "hour", "days",
    "day", "weeks", "week", "months", "month", "years", "year", "usd", "eur", "gbp", "k", "x",
    "kwh", "w", "kw", "mph", "kmh", "l", "ml", "am", "pm",
];

/// A word too common to be an entity: a stop word, a weekday or a month name.
fn is_common(word: &str) -> bool {
    let lower = word.to_lowercase();
    COMMON.contains(&lower.as_str())
        || crate::calendar::weekday(&lower).is_some()
        || crate::calendar::is_month_name(&lower)
}

/// Punctuation trimmed off both ends of a word before it is judged.
fn trim_word(word: &str) -> &str {
    word.trim_matches(|c: char| {
        !(c.is_alphanumeric() || matches!(c, '@' | '#' | '$' | '€' | '£' | '%' | '\'' | '’'))
    })
    .trim_matches(|c: char| matches!(c, '\'' | '’'))
}

fn without_possessive(word: &str) -> &str {
    word.strip_suffix("'s")
        .or_else(|| word.strip_suffix("’s"))
        .unwrap_or(word)
}

fn is_email(word: &str) -> bool {
    let Some((local, domain)) = word.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && local
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && domain
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '.' | '-'))
}

fn is_url(word: &str) -> bool {
    let lower = word.to_ascii_lowercase();
    (lower.starts_with("http://") || lower.starts_with("https://") || lower.starts_with("www."))
        && word.len() > 8
}

fn is_name_word(word: &str) -> bool {
    let mut chars = word.chars();
    chars.next().is_some_and(char::is_uppercase)
        && chars.all(|c| c.is_alphanumeric() || matches!(c, '-' | '.' | '&'))
}

fn number_prefix(word: &str) -> Option<(&str, &str)> {
    let start = usize::from(word.starts_with(['$', '€', '£'])) * word.chars().next()?.len_utf8();
    let digits_end = word[start..]
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_digit() || c == '.' || c == ','))
        .map_or(word.len(), |(i, _)| start + i);
    let number = &word[..digits_end];
    let digits = number.trim_start_matches(['$', '€', '£']);
    (digits.starts_with(|c: char| c.is_ascii_digit())).then_some((number, &word[digits_end..]))
}

struct Found {
    entities: Vec<String>,
}

impl Found {
    fn push(&mut self, entity: String) {
        if entity.is_empty()
            || entity.len() > MAX_ENTITY_BYTES
            || self.entities.len() >= MAX_ENTITIES
        {
            return;
        }
        if !self.entities.contains(&entity) {
            self.entities.push(entity);
        }
    }
}

/// The entities of `text`, in order of first appearance, without repeats.
pub fn extract(text: &str) -> Vec<String> {
    let mut found = Found {
        entities: Vec::new(),
    };
    let raw: Vec<&str> = text.split_whitespace().collect();
    let mut name: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < raw.len() {
        let original = raw[i];
        let word = trim_word(original);
        let ends_sentence = original.ends_with(['.', '!', '?', ':', ';']);
        let breaks_name = ends_sentence || original.ends_with([',', ')', '"']);
        let mut consumed_as_name = false;

        if is_url(word) {
            found.push(
                word.trim_end_matches(['.', ',', ')', '!', '?'])
                    .to_ascii_lowercase(),
            );
        } else if is_email(word) {
            found.push(word.to_lowercase());
        } else if let Some(handle) = word.strip_prefix('@') {
            if !handle.is_empty() && handle.chars().all(|c| c.is_alphanumeric() || c == '_') {
                found.push(format!("@{}", handle.to_lowercase()));
            }
        } else if let Some(tag) = word.strip_prefix('#') {
            if tag.chars().any(char::is_alphabetic)
                && tag.chars().all(|c| c.is_alphanumeric() || c == '_')
            {
                found.push(format!("#{}", tag.to_lowercase()));
            }
        } else if let Some((number, unit)) = number_prefix(word) {
            let unit = unit.to_lowercase();
            let currency = number.starts_with(['$', '€', '£']);
            if currency || (!unit.is_empty() && UNITS.contains(&unit.as_str())) {
                found.push(format!("{number}{unit}"));
            } else if unit.is_empty()
                && !breaks_name
                && let Some(next) = raw.get(i + 1)
            {
                let next_unit = trim_word(next).to_lowercase();
                if UNITS.contains(&next_unit.as_str()) && next_unit.len() > 1 {
                    found.push(format!("{number} {next_unit}"));
                    i += 1;
                }
            }
        } else {
            let bare = without_possessive(word);
            if is_name_word(bare) && !is_common(bare) && bare.len() >= 2 {
                name.push(bare);
                consumed_as_name = true;
            }
        }
        // A run of name words ends at a non-name word, a possessive or punctuation.
        let possessive = word != without_possessive(word);
        if !name.is_empty() && (!consumed_as_name || breaks_name || possessive) {
            found.push(name.join(" "));
            name.clear();
        }
        i += 1;
    }
    if !name.is_empty() {
        found.push(name.join(" "));
    }
    found.entities
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weekdays_and_month_names_are_too_common_to_be_entities() {
        for word in ["Monday", "sunday", "March", "December", "today"] {
            assert!(is_common(word), "{word}");
        }
        // Abbreviations may be names ("Jan"); other words are not common.
        for word in ["Jan", "Caroline", "Porto"] {
            assert!(!is_common(word), "{word}");
        }
    }

    #[test]
    fn finds_each_kind_of_entity() {
        let text = "Caroline's friend Mel moved to New York City. Write to mel@Example.org, \
                    see https://example.org/x, ping @MelDraws about #Pottery; she ran 5 km \
                    and paid $20 for 3.5kg of clay (10% off).";
        assert_eq!(
            extract(text),
            [
                "Caroline",
                "Mel",
                "New York City",
                "mel@example.org",
                "https://example.org/x",
                "@meldraws",
                "#pottery",
                "5 km",
                "$20",
                "3.5kg",
                "10%"
            ]
        );
    }

    #[test]
    fn sentence_starters_and_plain_numbers_are_not_entities() {
        assert!(extract("The cat sat. What did I do? Yesterday I walked 3 times.").is_empty());
        assert_eq!(extract("What did Melanie paint last week?"), ["Melanie"]);
        assert_eq!(extract("hey caroline, how are you"), Vec::<String>::new());
        assert_eq!(extract("Melanie: I love it"), ["Melanie"]);
        assert_eq!(extract("Caroline moved to Boston."), ["Caroline", "Boston"]);
        assert_eq!(
            extract("Please write to me. Remember the milk!"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn output_is_bounded() {
        let many: String = (0..200).map(|i| format!("#tag{i} ")).collect();
        assert_eq!(extract(&many).len(), MAX_ENTITIES);
        assert!(extract(&"A".repeat(10_000)).is_empty());
        assert!(extract("").is_empty());
        assert!(extract("@ # $ 5").is_empty());
    }
}
