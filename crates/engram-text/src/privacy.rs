//! The privacy guard: a rule-based detector of personal data and secrets, and the privacy mode
//! that decides what happens to them.
//!
//! [`scan`] finds, in one pass per rule and without any model:
//!
//! | kind | placeholder | what is matched |
//! | --- | --- | --- |
//! | secret | `[SECRET]` | API keys and tokens of common shapes: `sk-…` (OpenAI, Anthropic), `AKIA…` (AWS), `ghp_…`/`github_pat_…` (GitHub), `xox?-…` (Slack), `AIza…` (Google), `sk_live_…` (Stripe), JWTs, `Bearer …`, PEM private keys |
//! | email | `[EMAIL]` | `name@domain.tld` |
//! | iban | `[IBAN]` | IBANs, with or without spaces, whose mod-97 check passes |
//! | card | `[CARD]` | 13 to 19 digits, plain or in the printed groups (4-4-4-4, 4-6-5) with spaces or dashes, whose Luhn check passes |
//! | national_id | `[NATIONAL_ID]` | US Social Security numbers (`123-45-6789`, valid areas only), UK National Insurance numbers |
//! | ip | `[IP]` | IPv4 and IPv6 addresses that parse |
//! | phone | `[PHONE]` | a phone number: 8 to 15 digits after a leading `+`, 10 to 15 digits in groups separated by spaces, dots, dashes or parentheses, or one run of 10 to 12 digits |
//!
//! Near-misses are not flagged: a number failing Luhn is not a card, `999.1.2.3` is not an
//! address, a date or a year range has too few digits for a phone number. Where matches
//! overlap, the kind higher in the table wins.
//!
//! A [`PrivacyMode`] says what happens to what is found: `off` < `redact` < `block`, from the
//! least to the most strict. Which mode applies to a tenant and a request, and the error a
//! blocked field becomes, are the domain's (`engram_domain::privacy`).

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::Regex;

/// What to do with personal data found in a text, from the least to the most strict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum PrivacyMode {
    /// Store and send text as it is.
    #[default]
    Off,
    /// Replace what is found with a typed placeholder such as `[EMAIL]` before the text is
    /// stored or sent to a model.
    Redact,
    /// Refuse a write (or a message) containing any of it, naming what was found.
    Block,
}

impl PrivacyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PrivacyMode::Off => "off",
            PrivacyMode::Redact => "redact",
            PrivacyMode::Block => "block",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "off" => Some(PrivacyMode::Off),
            "redact" => Some(PrivacyMode::Redact),
            "block" => Some(PrivacyMode::Block),
            _ => None,
        }
    }
}

/// A kind of personal data or secret, in the order of precedence when matches overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PiiKind {
    Secret,
    Email,
    Iban,
    Card,
    NationalId,
    Ip,
    Phone,
}

impl PiiKind {
    pub const ALL: [PiiKind; 7] = [
        PiiKind::Secret,
        PiiKind::Email,
        PiiKind::Iban,
        PiiKind::Card,
        PiiKind::NationalId,
        PiiKind::Ip,
        PiiKind::Phone,
    ];

    /// The typed placeholder that replaces it in `redact` mode.
    pub fn placeholder(self) -> &'static str {
        match self {
            PiiKind::Secret => "[SECRET]",
            PiiKind::Email => "[EMAIL]",
            PiiKind::Iban => "[IBAN]",
            PiiKind::Card => "[CARD]",
            PiiKind::NationalId => "[NATIONAL_ID]",
            PiiKind::Ip => "[IP]",
            PiiKind::Phone => "[PHONE]",
        }
    }

    /// The metric label and machine-readable name.
    pub fn as_str(self) -> &'static str {
        match self {
            PiiKind::Secret => "secret",
            PiiKind::Email => "email",
            PiiKind::Iban => "iban",
            PiiKind::Card => "card",
            PiiKind::NationalId => "national_id",
            PiiKind::Ip => "ip",
            PiiKind::Phone => "phone",
        }
    }

    /// How an error message names it.
    pub fn describe(self) -> &'static str {
        match self {
            PiiKind::Secret => "an API key or token",
            PiiKind::Email => "an email address",
            PiiKind::Iban => "an IBAN",
            PiiKind::Card => "a payment card number",
            PiiKind::NationalId => "a national id number",
            PiiKind::Ip => "an IP address",
            PiiKind::Phone => "a phone number",
        }
    }
}

/// One match: its kind and byte range in the scanned text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    pub kind: PiiKind,
    pub start: usize,
    pub end: usize,
}

#[allow(clippy::expect_used)] // the patterns are constants, checked by the tests
fn regex(pattern: &str) -> Regex {
    Regex::new(pattern).expect("a valid built-in pattern")
}

static SECRET: LazyLock<Regex> = LazyLock::new(|| {
    regex(concat!(
        r"\bsk-(?:proj-|ant-[a-z0-9]+-)?[A-Za-z0-9_-]{20,}",
        r"|\bAKIA[0-9A-Z]{16}\b",
        r"|\bgh[pousr]_[A-Za-z0-9]{30,}",
        r"|\bgithub_pat_[A-Za-z0-9_]{22,}",
        r"|\bxox[abprs]-[A-Za-z0-9-]{10,}",
        r"|\bAIza[0-9A-Za-z_-]{35}",
        r"|\b[srp]k_(?:live|test)_[A-Za-z0-9]{16,}",
        r"|\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
        r"|(?i:\bbearer)\s+[A-Za-z0-9._~+/=-]{20,}",
        r"|-----BEGIN [A-Z ]*PRIVATE KEY-----(?s:.*?)(?:-----END [A-Z ]*PRIVATE KEY-----|$)",
    ))
});
static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    regex(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
});
static IBAN: LazyLock<Regex> =
    LazyLock::new(|| regex(r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"));
static CARD: LazyLock<Regex> = LazyLock::new(|| {
    regex(concat!(
        r"\b(?:[0-9]{13,19}",
        r"|[0-9]{4}(?:[ -][0-9]{4}){2,3}(?:[ -][0-9]{1,4})?",
        r"|[0-9]{4}[ -][0-9]{6}[ -][0-9]{4,5})\b",
    ))
});
static SSN: LazyLock<Regex> = LazyLock::new(|| regex(r"\b([0-9]{3})-([0-9]{2})-([0-9]{4})\b"));
static NINO: LazyLock<Regex> = LazyLock::new(|| {
    regex(r"\b[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?[0-9]{2} ?[0-9]{2} ?[0-9]{2} ?[A-D]\b")
});
static IPV4: LazyLock<Regex> =
    LazyLock::new(|| regex(r"\b[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\b"));
static IPV6: LazyLock<Regex> =
    LazyLock::new(|| regex(r"(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}"));
static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    regex(r"(?:\+[0-9]{1,3}[ .-]?)?(?:\([0-9]{1,4}\)[ .-]?)?[0-9]{2,12}(?:[ .-][0-9]{2,6}){0,5}")
});

fn digits(s: &str) -> impl Iterator<Item = u32> + '_ {
    s.chars().filter_map(|c| c.to_digit(10))
}

fn luhn(number: &str) -> bool {
    let ds: Vec<u32> = digits(number).collect();
    let sum: u32 = ds
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| match i % 2 {
            1 if d * 2 > 9 => d * 2 - 9,
            1 => d * 2,
            _ => d,
        })
        .sum();
    !ds.is_empty() && sum.is_multiple_of(10)
}

fn iban_valid(candidate: &str) -> bool {
    let compact: String = candidate.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut remainder: u32 = 0;
    for c in tail.chars().chain(head.chars()) {
        let value = match c.to_digit(36) {
            Some(v) => v,
            None => return false,
        };
        let scale = if value >= 10 { 100 } else { 10 };
        remainder = (remainder * scale + value) % 97;
    }
    remainder == 1
}

/// The character before `start` and after `end` are not part of a longer word or number.
fn standalone(text: &str, start: usize, end: usize) -> bool {
    let before = text[..start].chars().next_back();
    let after = text[end..].chars().next();
    let joins = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    !joins(before) && !joins(after)
}

fn candidates(text: &str) -> Vec<Finding> {
    let mut found = Vec::new();
    let mut add = |kind: PiiKind, start: usize, end: usize| {
        found.push(Finding { kind, start, end });
    };
    for m in SECRET.find_iter(text) {
        add(PiiKind::Secret, m.start(), m.end());
    }
    for m in EMAIL.find_iter(text) {
        add(PiiKind::Email, m.start(), m.end());
    }
    for m in IBAN.find_iter(text) {
        // A trailing short group may be the next word ("… 00 AND"): try without it.
        let mut candidate = m.as_str();
        loop {
            if iban_valid(candidate) {
                add(PiiKind::Iban, m.start(), m.start() + candidate.len());
                break;
            }
            match candidate.rsplit_once(' ') {
                Some((shorter, _)) if shorter.len() >= 15 => candidate = shorter,
                _ => break,
            }
        }
    }
    for m in CARD.find_iter(text) {
        let count = digits(m.as_str()).count();
        if (13..=19).contains(&count) && luhn(m.as_str()) {
            add(PiiKind::Card, m.start(), m.end());
        }
    }
    for c in SSN.captures_iter(text) {
        let (area, group, serial) = (&c[1], &c[2], &c[3]);
        if area != "000"
            && area != "666"
            && !area.starts_with('9')
            && group != "00"
            && serial != "0000"
        {
            let m = c.get(0).map(|m| (m.start(), m.end())).unwrap_or_default();
            add(PiiKind::NationalId, m.0, m.1);
        }
    }
    for m in NINO.find_iter(text) {
        add(PiiKind::NationalId, m.start(), m.end());
    }
    for m in IPV4.find_iter(text) {
        if m.as_str().parse::<std::net::Ipv4Addr>().is_ok() {
            add(PiiKind::Ip, m.start(), m.end());
        }
    }
    for m in IPV6.find_iter(text) {
        let s = m.as_str();
        if s.matches(':').count() >= 2
            && s.parse::<std::net::Ipv6Addr>().is_ok()
            && standalone(text, m.start(), m.end())
        {
            add(PiiKind::Ip, m.start(), m.end());
        }
    }
    for m in PHONE.find_iter(text) {
        let s = m.as_str();
        let count = digits(s).count();
        let plain = s.chars().all(|c| c.is_ascii_digit());
        let shaped = if plain {
            (10..=12).contains(&count)
        } else if s.starts_with('+') {
            (8..=15).contains(&count)
        } else {
            (10..=15).contains(&count)
        };
        if shaped && standalone(text, m.start(), m.end()) {
            add(PiiKind::Phone, m.start(), m.end());
        }
    }
    found
}

/// Every match in `text`, without overlaps, in text order.
pub fn scan(text: &str) -> Vec<Finding> {
    let mut candidates = candidates(text);
    // The kind higher in precedence wins an overlap; then the longer match.
    candidates.sort_by_key(|f| (f.kind, std::cmp::Reverse(f.end - f.start), f.start));
    // Kept findings never overlap, so among those starting before a candidate ends, the one
    // starting last also ends last: it alone can overlap the candidate. O(n log n) in all.
    let mut kept: std::collections::BTreeMap<usize, Finding> = std::collections::BTreeMap::new();
    for f in candidates {
        let overlaps = kept
            .range(..f.end)
            .next_back()
            .is_some_and(|(_, k)| k.end > f.start);
        if !overlaps {
            kept.insert(f.start, f);
        }
    }
    kept.into_values().collect()
}

/// The distinct kinds among `findings`, in precedence order.
pub fn kinds(findings: &[Finding]) -> Vec<PiiKind> {
    let mut kinds: Vec<PiiKind> = findings.iter().map(|f| f.kind).collect();
    kinds.sort();
    kinds.dedup();
    kinds
}

/// `text` with every finding replaced by its placeholder.
pub fn redact<'a>(text: &'a str, findings: &[Finding]) -> Cow<'a, str> {
    if findings.is_empty() {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for f in findings {
        out.push_str(&text[at..f.start]);
        out.push_str(f.kind.placeholder());
        at = f.end;
    }
    out.push_str(&text[at..]);
    Cow::Owned(out)
}

/// "an email address and a payment card number"
pub fn describe(kinds: &[PiiKind]) -> String {
    let names: Vec<&str> = kinds.iter().map(|k| k.describe()).collect();
    match names.as_slice() {
        [] => String::new(),
        [one] => (*one).to_string(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(text: &str) -> Vec<PiiKind> {
        scan(text).into_iter().map(|f| f.kind).collect()
    }

    #[test]
    fn each_kind_is_detected() {
        let cases: &[(&str, PiiKind, &str)] = &[
            (
                "mail me at jane.doe+work@example.co.uk today",
                PiiKind::Email,
                "jane.doe+work@example.co.uk",
            ),
            (
                "call +44 20 7946 0958 after six",
                PiiKind::Phone,
                "+44 20 7946 0958",
            ),
            ("call (415) 555-0132", PiiKind::Phone, "(415) 555-0132"),
            ("my number is 415-555-0132.", PiiKind::Phone, "415-555-0132"),
            (
                "card 4111 1111 1111 1111 exp 12/29",
                PiiKind::Card,
                "4111 1111 1111 1111",
            ),
            (
                "card 5500-0000-0000-0004",
                PiiKind::Card,
                "5500-0000-0000-0004",
            ),
            ("amex 378282246310005 ok", PiiKind::Card, "378282246310005"),
            (
                "pay to DE89 3704 0044 0532 0130 00 AND thanks",
                PiiKind::Iban,
                "DE89 3704 0044 0532 0130 00",
            ),
            (
                "iban GB82WEST12345698765432",
                PiiKind::Iban,
                "GB82WEST12345698765432",
            ),
            (
                "server 192.168.10.254 is down",
                PiiKind::Ip,
                "192.168.10.254",
            ),
            (
                "v6 2001:db8::8a2e:370:7334 here",
                PiiKind::Ip,
                "2001:db8::8a2e:370:7334",
            ),
            (
                "key sk-proj-abcdefghijklmnopqrstuvwx123",
                PiiKind::Secret,
                "sk-proj-abcdefghijklmnopqrstuvwx123",
            ),
            (
                "aws AKIAIOSFODNN7EXAMPLE",
                PiiKind::Secret,
                "AKIAIOSFODNN7EXAMPLE",
            ),
            (
                "gh ghp_abcdefghijklmnopqrstuvwxyz0123456789",
                PiiKind::Secret,
                "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
            ),
            (
                "slack xoxb-123456789012-abcdefghij",
                PiiKind::Secret,
                "xoxb-123456789012-abcdefghij",
            ),
            (
                "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
                PiiKind::Secret,
                "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
            ),
            (
                "Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345",
                PiiKind::Secret,
                "Bearer abcdefghijklmnopqrstuvwxyz012345",
            ),
            (
                "stripe sk_live_abcdefghijklmnop1234",
                PiiKind::Secret,
                "sk_live_abcdefghijklmnop1234",
            ),
            (
                "ssn 123-45-6789 on file",
                PiiKind::NationalId,
                "123-45-6789",
            ),
            (
                "NI number AB 12 34 56 C",
                PiiKind::NationalId,
                "AB 12 34 56 C",
            ),
        ];
        for (text, kind, matched) in cases {
            let findings = scan(text);
            assert_eq!(findings.len(), 1, "{text:?}: {findings:?}");
            let f = findings[0];
            assert_eq!(f.kind, *kind, "{text:?}");
            assert_eq!(&text[f.start..f.end], *matched, "{text:?}");
        }
    }

    #[test]
    fn near_misses_are_not_flagged() {
        for text in [
            // Fails Luhn: not a card (and too long for a phone number).
            "order 4111 1111 1111 1112 shipped",
            "ref 1234567812345678",
            // Not an address.
            "999.1.2.3 and 1.2.3",
            // Dates, years, times, versions, prices and short numbers.
            "met on 2024-05-01 at 10:30, years 2019-2024, v1.2.3, $1,250.00, room 4521",
            // An IBAN whose check digits are wrong.
            "DE00 3704 0044 0532 0130 00",
            // Not an SSN: area 000, 666 or 9xx.
            "000-12-3456 666-12-3456 912-12-3456",
            // An @ without a domain.
            "ping @jane or jane@localhost",
            // A word that starts like a key.
            "the sk-ills of AKIA and ghp_short",
            "ordinary text about memory and retrieval",
        ] {
            assert_eq!(found(text), Vec::<PiiKind>::new(), "{text:?}");
        }
    }

    #[test]
    fn overlaps_resolve_as_the_precedence_table_says() {
        // Digits inside a secret-shaped token are the secret's, not a card or a phone; an
        // address is kept whole.
        let text = "key sk-live-4111111111111111abcdefgh and bo@example.com";
        let findings = scan(text);
        assert!(findings.windows(2).all(|w| w[0].end <= w[1].start));
        let texts: Vec<&str> = findings.iter().map(|f| &text[f.start..f.end]).collect();
        assert_eq!(
            texts,
            ["sk-live-4111111111111111abcdefgh", "bo@example.com"]
        );
    }

    #[test]
    fn a_text_of_many_candidates_is_scanned_in_one_pass() {
        // 32 KiB of "::" separators: thousands of IPv6-shaped candidates. Checked for the
        // result here; BENCHMARKS.md has the time.
        let text = ":: ".repeat(32 * 1024 / 3);
        let findings = scan(&text);
        assert!(findings.windows(2).all(|w| w[0].end <= w[1].start));
    }

    #[test]
    fn redaction_replaces_every_finding_with_its_placeholder() {
        let text =
            "Jane (jane@example.com, +1 415 555 0132) paid with 4111-1111-1111-1111 from 10.0.0.1";
        let findings = scan(text);
        assert_eq!(
            kinds(&findings),
            vec![PiiKind::Email, PiiKind::Card, PiiKind::Ip, PiiKind::Phone]
        );
        assert_eq!(
            redact(text, &findings),
            "Jane ([EMAIL], [PHONE]) paid with [CARD] from [IP]"
        );
    }
}
