//! Write tokens as public callers see them: bound to the tenant they were issued to.
//!
//! Inside the cluster a write token names a write-log partition and entry (`wt1.…`, see
//! [`engram_domain::api::WriteToken`]). The gateway hands callers `wt2.<that>.<mac>`, where the
//! MAC is an HMAC-SHA-256 (truncated to 128 bits) of the tenant and the token under a key
//! derived from the cluster secret. A token sent back is checked before anything else looks at
//! it: another tenant's token, or one made up, is refused (INVALID_ARGUMENT) without a Redis
//! look-up, so it neither reveals another tenant's write nor makes the read wait.

use engram_domain::model::TenantId;
use engram_domain::secret::{constant_time_eq, hmac_sha256};
use engram_domain::{ClusterSecret, Error, Result};

const PUBLIC_PREFIX: &str = "wt2.";
const INTERNAL_PREFIX: &str = "wt1.";
/// Hex digits of the MAC (128 bits).
const MAC_HEX: usize = 32;
/// Longest public token read: an internal token is at most about 50 characters.
const MAX_TOKEN: usize = 128;

/// Seals and opens write tokens for public callers.
#[derive(Clone)]
pub struct TokenSeal {
    key: [u8; 32],
}

impl TokenSeal {
    pub fn new(secret: &ClusterSecret) -> Self {
        Self {
            key: secret.derive("write-token"),
        }
    }

    fn mac(&self, tenant: &TenantId, body: &str) -> String {
        let mac = hmac_sha256(
            &self.key,
            &[tenant.as_str().as_bytes(), b"\0", body.as_bytes()],
        );
        hex::encode(&mac[..MAC_HEX / 2])
    }

    /// The public form of an internal token issued to `tenant` (empty stays empty).
    pub fn seal(&self, tenant: &TenantId, token: &str) -> String {
        match token.strip_prefix(INTERNAL_PREFIX) {
            Some(body) => format!("{PUBLIC_PREFIX}{body}.{}", self.mac(tenant, body)),
            None => token.to_string(),
        }
    }

    /// The internal token behind a public one `tenant` sent back (empty stays empty); `field`
    /// names the field in the error.
    pub fn open(&self, tenant: &TenantId, field: &str, token: &str) -> Result<String> {
        if token.is_empty() {
            return Ok(String::new());
        }
        let refused = || {
            Error::invalid(
                field,
                "not a write token this cluster issued to this tenant",
            )
        };
        if token.len() > MAX_TOKEN {
            return Err(refused());
        }
        let (body, mac) = token
            .strip_prefix(PUBLIC_PREFIX)
            .and_then(|rest| rest.rsplit_once('.'))
            .ok_or_else(refused)?;
        if !constant_time_eq(mac.as_bytes(), self.mac(tenant, body).as_bytes()) {
            return Err(refused());
        }
        Ok(format!("{INTERNAL_PREFIX}{body}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(secret: &str) -> TokenSeal {
        TokenSeal::new(&format!("{secret:0<32}").parse().unwrap())
    }

    #[test]
    fn a_token_opens_only_for_its_tenant_and_cluster() {
        let ours = seal("ours");
        let acme = TenantId::parse("acme").unwrap();
        let globex = TenantId::parse("globex").unwrap();
        for internal in ["wt1.l3.1700000000000-4", "wt1.i"] {
            let public = ours.seal(&acme, internal);
            assert!(public.starts_with("wt2."), "{public}");
            assert_eq!(ours.open(&acme, "t", &public).unwrap(), internal);
            assert!(ours.open(&globex, "t", &public).is_err());
            assert!(seal("theirs").open(&acme, "t", &public).is_err());
            // The internal form, or the body with another entry, is refused.
            assert!(ours.open(&acme, "t", internal).is_err());
            let (_, mac) = public.rsplit_once('.').unwrap();
            let forged = format!("wt2.l9.1-0.{mac}");
            assert!(ours.open(&acme, "t", &forged).is_err());
        }
        assert_eq!(ours.seal(&acme, ""), "");
        assert_eq!(ours.open(&acme, "t", "").unwrap(), "");
        for garbage in ["wt2.", "wt2.x", "wt2..", "x".repeat(10_000).as_str()] {
            let error = ours.open(&acme, "after_write_token", garbage).unwrap_err();
            assert!(error.to_string().contains("after_write_token"), "{error}");
        }
    }
}
