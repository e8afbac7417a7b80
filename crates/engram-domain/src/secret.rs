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

#[cfg(test)]
mod tests {
    use super::*;

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
