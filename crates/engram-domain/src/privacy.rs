//! Privacy policy: which [`PrivacyMode`] applies to a tenant and a request, and what applying
//! it to a field does — unchanged, redacted in place, or refused with an INVALID_ARGUMENT that
//! names the field and the kinds found. The detection itself is `engram_text::privacy`.

use std::collections::HashMap;

pub use engram_text::privacy::{Finding, PiiKind, PrivacyMode, describe, kinds, redact, scan};

use crate::error::{Error, Result};

/// Most findings one field may hold under `redact` or `block`: a text made of thousands of
/// addresses is refused rather than rewritten placeholder by placeholder.
pub const MAX_FINDINGS_PER_FIELD: usize = 1000;

/// Apply `mode` to one field: unchanged (`off`, or nothing found), redacted in place
/// (`redact`), or an INVALID_ARGUMENT naming the field and what was found (`block`). Returns
/// the kinds found.
pub fn guard(mode: PrivacyMode, field: &str, text: &mut String) -> Result<Vec<PiiKind>> {
    if mode == PrivacyMode::Off {
        return Ok(Vec::new());
    }
    let findings = scan(text);
    if findings.is_empty() {
        return Ok(Vec::new());
    }
    if findings.len() > MAX_FINDINGS_PER_FIELD {
        return Err(Error::invalid(
            field,
            format!(
                "holds {} findings of personal data or secrets, more than the {MAX_FINDINGS_PER_FIELD} one field may hold",
                findings.len()
            ),
        ));
    }
    let kinds = kinds(&findings);
    match mode {
        PrivacyMode::Off => Ok(Vec::new()),
        PrivacyMode::Redact => {
            *text = redact(text, &findings).into_owned();
            Ok(kinds)
        }
        PrivacyMode::Block => Err(Error::invalid(
            field,
            format!(
                "contains {}; this tenant's privacy mode `block` refuses personal data and secrets",
                describe(&kinds)
            ),
        )),
    }
}

/// The privacy mode of every tenant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrivacyPolicy {
    pub default: PrivacyMode,
    pub tenants: HashMap<String, PrivacyMode>,
}

impl PrivacyPolicy {
    /// `default` for every tenant but those listed in `tenants` (`acme=redact,bank=block`,
    /// the form of ENGRAM_TENANT_PRIVACY, which errors name).
    pub fn parse(default: PrivacyMode, tenants: &str) -> Result<Self> {
        let bad = |why: String| Error::invalid("ENGRAM_TENANT_PRIVACY", why);
        let mut modes = HashMap::new();
        for pair in tenants.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (tenant, mode) = pair
                .split_once('=')
                .ok_or_else(|| bad(format!("{pair:?} is not tenant=mode")))?;
            let mode = PrivacyMode::parse(mode).ok_or_else(|| {
                bad(format!(
                    "{tenant}: {mode:?} is not a privacy mode (off, redact, block)"
                ))
            })?;
            modes.insert(tenant.trim().to_string(), mode);
        }
        Ok(Self {
            default,
            tenants: modes,
        })
    }

    /// The tenant's mode, or the request's if that is stricter.
    pub fn mode(&self, tenant: &str, requested: Option<PrivacyMode>) -> PrivacyMode {
        let own = self.tenants.get(tenant).copied().unwrap_or(self.default);
        requested.map_or(own, |r| r.max(own))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_of_too_many_findings_is_refused_not_rewritten() {
        let many = "a@example.com ".repeat(MAX_FINDINGS_PER_FIELD + 1);
        let mut text = many.clone();
        let refused = guard(PrivacyMode::Redact, "memories[3].text", &mut text).unwrap_err();
        assert!(
            refused.to_string().contains("memories[3].text"),
            "{refused}"
        );
        assert_eq!(text, many, "nothing rewritten");
        let mut text = "a@example.com ".repeat(MAX_FINDINGS_PER_FIELD);
        assert!(guard(PrivacyMode::Redact, "text", &mut text).is_ok());
        assert!(!text.contains('@'));
    }

    #[test]
    fn modes_apply_and_requests_only_tighten() {
        let mut text = "write to jane@example.com".to_string();
        assert!(guard(PrivacyMode::Off, "text", &mut text).is_ok_and(|k| k.is_empty()));
        let blocked = guard(PrivacyMode::Block, "memories[0].text", &mut text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(blocked.contains("memories[0].text") && blocked.contains("an email address"));
        assert_eq!(text, "write to jane@example.com");
        assert_eq!(
            guard(PrivacyMode::Redact, "text", &mut text).ok(),
            Some(vec![PiiKind::Email])
        );
        assert_eq!(text, "write to [EMAIL]");

        let policy =
            PrivacyPolicy::parse(PrivacyMode::Off, "acme=redact, bank=block").unwrap_or_default();
        assert_eq!(policy.mode("acme", None), PrivacyMode::Redact);
        assert_eq!(
            policy.mode("acme", Some(PrivacyMode::Off)),
            PrivacyMode::Redact
        );
        assert_eq!(
            policy.mode("acme", Some(PrivacyMode::Block)),
            PrivacyMode::Block
        );
        assert_eq!(
            policy.mode("other", Some(PrivacyMode::Redact)),
            PrivacyMode::Redact
        );
        assert_eq!(policy.mode("bank", None), PrivacyMode::Block);
        assert!(PrivacyPolicy::parse(PrivacyMode::Off, "acme=loose").is_err());
    }
}
