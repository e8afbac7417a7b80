//! Settings that carry credentials: what they print never includes the secret.

use std::fmt;

/// A URL that may hold a password (`rediss://:PASSWORD@host:6380/0`). `Display` and `Debug`
/// show it with the password (and a user name beside it) replaced by `***`, so it can be
/// logged, put in an error or printed by `--help`; [`SecretUrl::expose`] gives the URL itself
/// to the one place that connects with it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its credentials, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any credentials replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl From<String> for SecretUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl From<&str> for SecretUrl {
    fn from(url: &str) -> Self {
        Self(url.to_string())
    }
}

impl std::str::FromStr for SecretUrl {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(value))
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

/// `text` with its credentials replaced by `***`: the user information of the authority
/// (`user:password@`) and query parameters that carry them (`?pass=…`, as Unix-socket Redis
/// URLs do). Text that does not parse as a URL, or whose credential-free form still holds an
/// `@` (a password with an unencoded `/`, `?` or `#` in it), shows only its scheme.
pub fn redact_url(text: &str) -> String {
    let hidden = || match text.split_once("://") {
        Some((scheme, _))
            if scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
        {
            format!("{scheme}://***")
        }
        _ => "***".to_string(),
    };
    let Ok(mut url) = url::Url::parse(text) else {
        return hidden();
    };
    let had_credentials = !url.username().is_empty() || url.password().is_some();
    // An `@` outside the credentials the parser found: a password with an unencoded `?` or
    // `#` that the parser took for the query or the fragment.
    if !had_credentials && text.contains('@') {
        return hidden();
    }
    if had_credentials && (url.set_username("").is_err() || url.set_password(None).is_err()) {
        return hidden();
    }
    if url.query().is_some() {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(key, value)| {
                let secret = ["pass", "password", "user", "username", "token", "auth"]
                    .contains(&key.to_ascii_lowercase().as_str());
                let value = if secret {
                    "***".into()
                } else {
                    value.into_owned()
                };
                (key.into_owned(), value)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    let shown = url.to_string();
    if shown.contains('@') {
        return hidden();
    }
    if had_credentials {
        shown.replacen("://", "://***@", 1)
    } else {
        shown
    }
}

/// The secret every service of one cluster shares (`ENGRAM_CLUSTER_SECRET`, at least
/// [`ClusterSecret::MIN_LEN`] characters). Nothing uses it as it is: each use derives a key of
/// its own from it ([`ClusterSecret::derive`]), so the credential internal calls carry on the
/// wire reveals neither the secret nor the key that signs write tokens. `Display` and `Debug`
/// print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret(String);

impl ClusterSecret {
    /// Shortest secret accepted: 32 characters (`openssl rand -hex 32` gives 64).
    pub const MIN_LEN: usize = 32;

    /// A key for one `purpose` (a fixed label such as `"internal-call"`), derived from the
    /// secret.
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        hmac_sha256(self.0.as_bytes(), &[b"engram/v1/", purpose.as_bytes()])
    }

    /// The secret itself, for the one place that stores it (`engram up`'s data directory).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The value internal calls carry to show they come from this cluster.
    pub fn call_credential(&self) -> String {
        hex::encode(self.derive("internal-call"))
    }
}

impl ClusterSecret {
    /// Whether the secret is usable: at least [`Self::MIN_LEN`] characters, none of them
    /// control characters. The error never quotes the value.
    pub fn validate(&self) -> Result<(), String> {
        if self.0.chars().count() < Self::MIN_LEN {
            return Err(format!(
                "must be at least {} characters (`openssl rand -hex 32` makes one)",
                Self::MIN_LEN
            ));
        }
        if self.0.chars().any(char::is_control) {
            return Err("must not hold control characters".into());
        }
        Ok(())
    }
}

impl std::str::FromStr for ClusterSecret {
    type Err = std::convert::Infallible;

    /// Never fails, so that a parser's error cannot quote the value; surrounding whitespace (a
    /// file's last newline) is dropped. [`ClusterSecret::validate`] says whether it is usable.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Self(value.trim().to_string()))
    }
}

impl fmt::Display for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(***)")
    }
}

/// HMAC-SHA-256 (RFC 2104) of the concatenation of `parts` under `key`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    const BLOCK: usize = 64;
    let mut block = [0u8; BLOCK];
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let mut inner = Sha256::new();
    inner.update(pad(0x36));
    for part in parts {
        inner.update(part);
    }
    let mut outer = Sha256::new();
    outer.update(pad(0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// Whether `a` and `b` are equal, in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test cases 2 and 6 (a key longer than the block).
        assert_eq!(
            hex::encode(hmac_sha256(
                b"Jefe",
                &[b"what do ya want ", b"for nothing?"]
            )),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaa; 131],
                &[b"Test Using Larger Than Block-Size Key - Hash Key First"]
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn a_cluster_secret_is_long_enough_and_never_prints() {
        let short: ClusterSecret = "hunter2".parse().unwrap();
        assert!(!short.validate().unwrap_err().contains("hunter2"));
        let control: ClusterSecret = "hunter2\u{7}hunter2-hunter2-hunter2-hunter2"
            .parse()
            .unwrap();
        assert!(!control.validate().unwrap_err().contains("hunter2"));
        let secret: ClusterSecret = "hunter2-hunter2-hunter2-hunter2-hunter2\n".parse().unwrap();
        assert_eq!(secret.validate(), Ok(()));
        assert_eq!(secret.expose(), "hunter2-hunter2-hunter2-hunter2-hunter2");
        assert!(!format!("{secret} {secret:?} {:?}", Some(&secret)).contains("hunter2"));
        assert_ne!(secret.derive("a"), secret.derive("b"));
        assert_eq!(secret.call_credential().len(), 64);
        assert!(!secret.call_credential().contains("hunter2"));
    }

    #[test]
    fn credentials_never_print() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            (
                "rediss://:hunter2@redis.example:6380/0",
                "rediss://***@redis.example:6380/0",
            ),
            ("redis://admin:hunter2@h/1", "redis://***@h/1"),
            ("redis://a:b@c:hunter2@h:1/0", "redis://***@h:1/0"),
            ("redis://:hunter2@[::1]:6379/0", "redis://***@[::1]:6379/0"),
            (
                "redis+unix:///run/redis.sock?db=0&pass=hunter2",
                "redis+unix:///run/redis.sock?db=0&pass=***",
            ),
            ("redis://:ab/hunter2@h:6379/0", "redis://***"),
            ("redis://:ab#hunter2@h/0", "redis://***"),
            ("redis://u:123/hunter2@h/0", "redis://***"),
            ("redis://user:12?hunter2@host/0", "redis://***"),
            ("not a url :hunter2@h", "***"),
        ] {
            let secret: SecretUrl = url.parse().unwrap();
            assert_eq!(secret.to_string(), shown);
            assert_eq!(format!("{secret:?}"), format!("{shown:?}"));
            assert!(!format!("{:?}", Some(secret.clone())).contains("hunter2"));
            assert_eq!(secret.expose(), url);
        }
    }
}
